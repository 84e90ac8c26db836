//! The extent header decoder: a 16-byte uuid, a flag byte (bit 0: re-seal
//! uuid and md5), then the 512-byte header. A decoded header's entries
//! must encode to a header that decodes to the same entries.

#![no_main]

use libfuzzer_sys::fuzz_target;
use uuid::Uuid;
use vma_writer::vma::extent::{BlockInfo, ExtentHeader, payload_ranges};

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 + 512 {
        return;
    }
    let uuid: [u8; 16] = data[..16].try_into().unwrap();
    let mut head: [u8; 512] = data[17..17 + 512].try_into().unwrap();
    if data[16] & 1 != 0 {
        vma_writer_fuzz::reseal_extent(&mut head, &uuid);
    }
    let uuid = Uuid::from_bytes(uuid);
    let Ok(ext) = ExtentHeader::decode(&head, &uuid, 4096) else {
        return;
    };
    let entries: Vec<BlockInfo> = ext.entries().map(|(_, e)| e).collect();
    let stored: usize = payload_ranges(&entries).map(|(_, r)| r.len()).sum();
    assert_eq!(
        stored,
        ext.payload_len(),
        "payload ranges disagree with block_count"
    );
    let again = ExtentHeader::encode(&uuid, &entries);
    let back = ExtentHeader::decode(&again, &uuid, 4096).expect("an encoded extent decodes");
    let back: Vec<BlockInfo> = back.entries().map(|(_, e)| e).collect();
    assert_eq!(back, entries);
});
