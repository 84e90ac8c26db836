//! The archive index decoder (`format/INDEX.md`) on an arbitrary body: the
//! input is a flag byte (bit 0: framed), the archive's stream length (8
//! bytes, LE), then the uncompressed body; the harness compresses it and
//! writes a head with a correct digest, so that mutations reach the body's
//! checks instead of failing the digest. A decoded index must answer
//! lookups without panicking.

#![no_main]

use libfuzzer_sys::fuzz_target;
use twox_hash::XxHash3_128;
use vma_writer::vma::index::{FLAG_FRAMED, INDEX_MAGIC, INDEX_VERSION};
use vma_writer::vma::{ArchiveIndex, DevId};

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let flags = if data[0] & 1 != 0 { FLAG_FRAMED } else { 0 };
    let stream_len: [u8; 8] = data[1..9].try_into().unwrap();
    let body = zstd::encode_all(&data[9..], 1).expect("compress");
    let mut b = Vec::with_capacity(64 + body.len());
    b.extend_from_slice(&INDEX_MAGIC);
    b.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(b"fuzz-index-uuid!");
    b.extend_from_slice(&stream_len);
    b.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let mut h = XxHash3_128::new();
    h.write(&b[..48]);
    h.write(&body);
    b.extend_from_slice(&h.finish_128().to_be_bytes());
    b.extend_from_slice(&body);
    let Ok(ix) = ArchiveIndex::decode(&b) else {
        return;
    };
    for d in &ix.devices {
        for c in [0, 1, u64::from(u32::MAX), u64::MAX] {
            let _ = ix.locate(DevId(d.dev.0), c);
        }
    }
    for off in [0, ix.header_len, ix.stream_len.saturating_sub(1), u64::MAX] {
        let _ = ix.extent_at(off);
    }
    let _ = ix.extent_of_frame(0);
});
