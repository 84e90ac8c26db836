//! The pure NBD decoders of `nbd::wire` on arbitrary bytes: option headers,
//! GO/INFO and META_CONTEXT payloads, request and reply headers. Every
//! decoded request must encode back to the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vma_writer::nbd::wire::*;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, p)) = data.split_first() else {
        return;
    };
    let option = OptionCode(u32::from(sel % 12));
    let _ = decode_export_request(option, p);
    let _ = decode_meta_context_request(option, p);
    if let Ok(h) = <&[u8; OPTION_HEADER_LEN]>::try_from(p.get(..OPTION_HEADER_LEN).unwrap_or(&[])) {
        let _ = decode_option_header(h);
    }
    let _ = check_client_flags(u32::from_be_bytes([sel, sel, sel, sel]), u16::from(sel));
    for extended in [false, true] {
        if let Ok(r) = decode_request(p, extended) {
            let n = if extended {
                EXTENDED_REQUEST_LEN
            } else {
                REQUEST_LEN
            };
            assert_eq!(encode_request(&r, extended), &p[..n]);
            let _ = r.payload_len(extended);
        }
    }
    if let Ok(Some((_, n))) = decode_reply_header(p) {
        assert!(n <= p.len());
    }
});
