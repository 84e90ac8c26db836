//! The archive header decoder on arbitrary bytes. The first byte says
//! whether the md5 is re-sealed first (so that field mutations reach the
//! checks behind it). A header that decodes and encodes again must decode
//! to the same header.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vma_writer::vma::Header;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut buf = rest.to_vec();
    if flags & 1 != 0 {
        vma_writer_fuzz::reseal_header(&mut buf);
    }
    let _ = Header::check_fixed(&buf);
    let Ok(h) = Header::decode(&buf) else {
        return;
    };
    if let Ok(again) = h.encode() {
        let back = Header::decode(&again).expect("an encoded header decodes");
        assert_eq!(back, h, "header changed in an encode/decode round trip");
    }
});
