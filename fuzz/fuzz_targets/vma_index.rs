//! The archive index decoder (`format/INDEX.md`) on an arbitrary body: the
//! input is a flag byte (bit 0: framed), the archive's stream length (8
//! bytes, LE), then the uncompressed body; the harness compresses it and
//! writes a head with a correct digest, so that mutations reach the body's
//! checks instead of failing the digest. A decoded index must answer
//! lookups without panicking.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vma_writer::vma::{ArchiveIndex, DevId};

fuzz_target!(|data: &[u8]| {
    let Some(b) = vma_writer_fuzz::index_file(data) else {
        return;
    };
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
