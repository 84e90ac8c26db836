//! Inputs the fuzz targets (`fuzz/`) once crashed on, replayed as plain
//! tests: `tests/fixtures/fuzz/TARGET/*` go through the same steps as the
//! target's harness did (the steps themselves are shared:
//! `vma_writer::fuzzing`), and must now end in an error, not a panic. (The
//! debug-build run of the suite in `.ci/run` has the overflow checks the
//! fuzz build has.) To add one: copy `fuzz/artifacts/TARGET/crash-*` there
//! (a target without a test here yet, e.g. `vma_reader`, gets one that
//! replays its inputs through its harness's steps).

use std::path::PathBuf;
use std::time::Duration;

use vma_writer::fuzzing;
use vma_writer::vma::ArchiveIndex;

/// The crash inputs of `target`; at least one (a test that replays
/// nothing would pass without checking anything).
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz")
        .join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut v: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|e| {
            let p = e.unwrap().path();
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no crash inputs in {}", dir.display());
    v
}

#[test]
fn vma_index_crashes_are_errors() {
    // crash-f6f6...: device totals near 2^64 whose sum wrapped (an
    // overflow panic in debug builds; in release a wrong sum could match).
    for (path, data) in inputs("vma_index") {
        let res =
            ArchiveIndex::decode(&fuzzing::index_file(&data).expect("an input with its head"));
        assert!(res.is_err(), "{}: accepted", path.display());
    }
}

/// The nbd_transmission harness's conversation; it must end by itself
/// within `limit`.
fn converse(input: &[u8], limit: Duration) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(limit, fuzzing::converse(input))
            .await
            .expect("the connection did not end");
    });
}

#[test]
fn nbd_transmission_inputs_end() {
    // timeout-51da...: WRITE_ZEROES with NO_HOLE of 2^56 bytes on what was
    // a 2^62-byte RAM disk, which then allocated a zero marker per 64 KiB
    // page: the harness's backend doing as asked (a 1 GiB export now
    // refuses the range with ENOSPC), not a server fault.
    for (path, data) in inputs("nbd_transmission") {
        let Some((&sel, rest)) = data.split_first() else {
            continue;
        };
        let export = ["a", "big", ""][(sel as usize / 3) % 3];
        let mut input = fuzzing::handshake(sel, export);
        input.extend_from_slice(rest);
        eprintln!("{}", path.display());
        converse(&input, Duration::from_secs(10));
    }
}
