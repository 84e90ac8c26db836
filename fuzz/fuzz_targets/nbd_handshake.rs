//! The option phase, fed arbitrary client bytes after the greeting: the
//! real server (`Server::serve_stream`) on an in-memory pipe. Whatever the
//! bytes, the connection must end (no hang) without a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let out = vma_writer_fuzz::converse(data);
    // The greeting always goes out first.
    assert!(out.starts_with(b"NBDMAGICIHAVEOPT"), "no greeting");
});
