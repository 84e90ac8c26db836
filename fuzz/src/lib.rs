//! What the fuzz targets share: the harness steps the regression tests
//! replay too (`vma_writer::fuzzing`: the real NBD server driven over an
//! in-memory pipe, handshake bytes, index files), and re-sealing of VMA
//! checksums so that mutated archives get past the md5 checks to the rules
//! behind them.

use std::sync::OnceLock;

/// The harness steps shared with the regression tests.
pub use vma_writer::fuzzing::{handshake, index_file};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// [`vma_writer::fuzzing::converse`] on the target's runtime: `input` to a
/// fresh server, everything it answers back. A hang is a bug (libFuzzer's
/// -timeout reports it).
pub fn converse(input: &[u8]) -> Vec<u8> {
    runtime().block_on(vma_writer::fuzzing::converse(input))
}

/// Header size field (offset 56) of an archive, if it has one.
fn header_size(a: &[u8]) -> Option<usize> {
    a.get(56..60)
        .map(|b| u32::from_be_bytes(b.try_into().unwrap()) as usize)
}

/// Recomputes the header md5 over `[0, header_size)` (or what there is).
pub fn reseal_header(a: &mut [u8]) {
    let Some(hs) = header_size(a) else { return };
    if a.len() < 48 {
        return;
    }
    let hs = hs.min(a.len());
    a[32..48].fill(0);
    let d = md5::compute(&a[..hs]);
    a[32..48].copy_from_slice(&d.0);
}

/// Recomputes the md5 of the 512-byte extent header at the start of `e`,
/// after setting its uuid to `uuid`.
pub fn reseal_extent(e: &mut [u8], uuid: &[u8; 16]) {
    if e.len() < 512 {
        return;
    }
    e[8..24].copy_from_slice(uuid);
    e[24..40].fill(0);
    let d = md5::compute(&e[..512]);
    e[24..40].copy_from_slice(&d.0);
}

/// Re-seals the header and every extent header of an archive, walking the
/// extents by their block_count fields, so that mutations of fields reach
/// the checks behind the md5s.
pub fn reseal_archive(a: &mut [u8]) {
    reseal_header(a);
    let (Some(hs), Some(uuid)) = (header_size(a), a.get(8..24)) else {
        return;
    };
    let uuid: [u8; 16] = uuid.try_into().unwrap();
    let mut at = hs;
    while at + 512 <= a.len() {
        reseal_extent(&mut a[at..], &uuid);
        let blocks = u16::from_be_bytes([a[at + 6], a[at + 7]]) as usize;
        at += 512 + blocks * 4096;
    }
}
