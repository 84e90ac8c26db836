//! The one file comparator: [`assert_same_file`] compares two files byte
//! for byte without reading the holes both have, and names the first
//! differing offset; [`assert_same`] does the same for bytes in memory.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The ranges of `f` that may hold data (`SEEK_DATA`/`SEEK_HOLE`); the
/// rest reads as zeros. Reading the holes of a 1 GiB sparse image costs
/// seconds in a debug build, so comparisons skip them. Any `lseek` error
/// but ENXIO ("no data past here") fails the test: silently comparing
/// less is how a comparator passes what it should not.
pub fn data_ranges(f: &File) -> Vec<(u64, u64)> {
    let len = f.metadata().unwrap().len();
    let fd = f.as_raw_fd();
    let seek = |pos: u64, whence: libc::c_int, name: &str| -> Option<u64> {
        // SAFETY: plain syscall on a descriptor `f` keeps open.
        let r = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
        if r >= 0 {
            return Some(r as u64);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return None;
        }
        panic!("lseek({pos}, {name}) failed: {e}");
    };
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let Some(data) = seek(pos, libc::SEEK_DATA, "SEEK_DATA") else {
            break; // only a hole is left
        };
        let hole = seek(data, libc::SEEK_HOLE, "SEEK_HOLE")
            .unwrap_or_else(|| panic!("SEEK_HOLE after data at {data}: ENXIO"));
        assert!(hole > data, "SEEK_HOLE({data}) = {hole}");
        out.push((data, hole));
        pos = hole;
    }
    out
}

/// Merges two sorted range lists into their sorted union.
fn union(mut a: Vec<(u64, u64)>, b: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    a.extend(b);
    a.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in a {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Asserts the file `actual` holds exactly `expected`'s bytes; on a
/// mismatch names the first differing offset. Holes in both files are
/// not read (see [`data_ranges`]).
pub fn assert_same_file(actual: &Path, expected: &Path) {
    let a = File::open(actual).unwrap_or_else(|e| panic!("open {}: {e}", actual.display()));
    let b = File::open(expected).unwrap_or_else(|e| panic!("open {}: {e}", expected.display()));
    let (la, lb) = (a.metadata().unwrap().len(), b.metadata().unwrap().len());
    assert_eq!(
        la,
        lb,
        "{} has {la} bytes, {} has {lb}",
        actual.display(),
        expected.display()
    );
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    for (start, end) in union(data_ranges(&a), data_ranges(&b)) {
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(ba.len());
            a.read_exact_at(&mut ba[..n], off).unwrap();
            b.read_exact_at(&mut bb[..n], off).unwrap();
            if ba[..n] != bb[..n] {
                let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
                panic!(
                    "{} differs from {} at byte {} ({:#04x} vs {:#04x})",
                    actual.display(),
                    expected.display(),
                    off + i as u64,
                    ba[i],
                    bb[i]
                );
            }
            off += n as u64;
        }
    }
}

/// Asserts the file `actual` holds exactly `expected`.
pub fn assert_file_is(actual: &Path, expected: &[u8]) {
    let data = std::fs::read(actual).unwrap_or_else(|e| panic!("{}: {e}", actual.display()));
    assert_same(&data, expected, &actual.display().to_string());
}

/// Index of the first differing byte, for readable assertion messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        return Some(i);
    }
    (a.len() != b.len()).then(|| a.len().min(b.len()))
}

/// Asserts `got == want`, naming the first differing byte.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = first_difference(got, want) {
        panic!(
            "{what}: contents differ at byte {i} (lengths {} and {})",
            got.len(),
            want.len()
        );
    }
}

/// An `lseek` that fails with anything but ENXIO stops the comparison
/// (here EBADF: an `O_PATH` descriptor has a size but cannot seek).
#[test]
#[should_panic(expected = "lseek(0, SEEK_DATA) failed")]
fn data_ranges_fails_on_lseek_errors() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    std::fs::write(&p, [1u8; 4096]).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(&p)
        .unwrap();
    data_ranges(&f);
}

/// Holes are found, data ranges cover the data.
#[test]
fn data_ranges_of_a_sparse_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = super::sparse_image(&dir.path().join("f"), 8 << 20, &[(4 << 20, 4096)], 1);
    let ranges = data_ranges(&File::open(&p).unwrap());
    assert!(
        ranges
            .iter()
            .any(|&(s, e)| s <= 4 << 20 && e >= (4 << 20) + 4096),
        "{ranges:?}"
    );
    assert!(
        ranges.iter().all(|&(s, e)| s < e && e <= 8 << 20),
        "{ranges:?}"
    );
}
