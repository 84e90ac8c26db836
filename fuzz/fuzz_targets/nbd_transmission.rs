//! The transmission phase: a valid handshake (the first byte picks simple,
//! structured or extended replies and the export), then arbitrary bytes as
//! requests and payloads, through the real server on an in-memory pipe.
//! Every connection must end without a panic or a hang.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let export = ["a", "big", ""][(sel as usize / 3) % 3];
    let mut input = vma_writer_fuzz::handshake(sel, export);
    input.extend_from_slice(rest);
    vma_writer_fuzz::converse(&input);
});
