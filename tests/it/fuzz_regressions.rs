//! Inputs the fuzz targets (`fuzz/`) once crashed on, replayed as plain
//! tests: `tests/fixtures/fuzz/TARGET/*` go through the same steps as the
//! target's harness did, and must now end in an error, not a panic. (The
//! debug-build run of the suite in `.ci/run` has the overflow checks the
//! fuzz build has.) To add one: copy `fuzz/artifacts/TARGET/crash-*` there.

use std::path::PathBuf;

use twox_hash::XxHash3_128;
use vma_writer::vma::index::{FLAG_FRAMED, INDEX_MAGIC, INDEX_VERSION};
use vma_writer::vma::{ArchiveIndex, Reader};

/// The crash inputs of `target`.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut v: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|e| {
            let p = e.unwrap().path();
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    v
}

/// `fuzz/fuzz_targets/vma_index.rs`'s harness: flag byte, stream length,
/// uncompressed body; returns the index file it makes.
fn index_of(data: &[u8]) -> Vec<u8> {
    let flags = if data[0] & 1 != 0 { FLAG_FRAMED } else { 0 };
    let body = zstd::encode_all(&data[9..], 1).unwrap();
    let mut b = Vec::new();
    b.extend_from_slice(&INDEX_MAGIC);
    b.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(b"fuzz-index-uuid!");
    b.extend_from_slice(&data[1..9]);
    b.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let mut h = XxHash3_128::new();
    h.write(&b[..48]);
    h.write(&body);
    b.extend_from_slice(&h.finish_128().to_be_bytes());
    b.extend_from_slice(&body);
    b
}

#[test]
fn vma_index_crashes_are_errors() {
    // crash-f6f6...: device totals near 2^64 whose sum wrapped (an
    // overflow panic in debug builds; in release a wrong sum could match).
    let all = inputs("vma_index");
    assert!(!all.is_empty());
    for (path, data) in all {
        let res = ArchiveIndex::decode(&index_of(&data));
        assert!(res.is_err(), "{}: accepted", path.display());
    }
}

#[test]
fn vma_reader_crashes_are_errors() {
    for (path, data) in inputs("vma_reader") {
        // Without the harness's optional re-sealing: the raw bytes.
        let res = Reader::new(&data[1..]).and_then(|r| r.verify());
        assert!(res.is_err(), "{}: accepted", path.display());
    }
}
