//! The streaming reader on arbitrary archive bytes: header, then every
//! extent, every cluster expanded. The first byte says whether the header
//! and the extent headers are re-sealed (md5, uuid) first. Errors are
//! fine; a panic, a hang or a large allocation is a bug.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vma_writer::vma::Reader;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut a = rest.to_vec();
    if flags & 1 != 0 {
        vma_writer_fuzz::reseal_archive(&mut a);
    }
    let Ok(mut r) = Reader::new(&a[..]) else {
        return;
    };
    let mut scratch = vec![0u8; 65536];
    loop {
        match r.next_extent() {
            Ok(Some(ext)) => {
                for c in ext.clusters() {
                    assert!(c.len <= 65536);
                    c.expand_into(&mut scratch);
                    for (off, run) in c.runs() {
                        assert!(off + run.len() <= c.len);
                    }
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
});
