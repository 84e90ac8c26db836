//! What a test checks of an archive, through the binary: `list` (device
//! names and sizes), `verify`, `extract` and the restored drives compared
//! byte for byte with their expected images.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{assert_same_file, run_ok, stdout_text, vma};

/// `(name, size)` of each `DEV:` line of `vma-writer list`.
pub fn list_devices(archive: &Path) -> Vec<(String, u64)> {
    let out = stdout_text(&run_ok(&mut vma(["list".as_ref(), archive.as_os_str()])));
    out.lines()
        .filter_map(|l| l.strip_prefix("DEV: "))
        .map(|l| {
            // "dev_id=1 size: 67108864 devname: drive-scsi0"
            let size = l
                .split("size: ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad DEV line {l:?}"));
            let name = l
                .split("devname: ")
                .nth(1)
                .unwrap_or_else(|| panic!("bad DEV line {l:?}"));
            (name.trim().to_string(), size)
        })
        .collect()
}

/// `vma-writer verify ARCHIVE` must succeed.
pub fn verify_ok(archive: &Path) {
    run_ok(&mut vma(["verify".as_ref(), archive.as_os_str()]));
}

/// Extracts `archive` into a new directory under `dir`; returns it.
pub fn extract(archive: &Path, dir: &Path) -> PathBuf {
    let out = dir.join(format!(
        "restored-{}",
        archive.file_name().unwrap().to_string_lossy()
    ));
    run_ok(&mut vma([
        "extract".as_ref(),
        archive.as_os_str(),
        out.as_os_str(),
    ]));
    out
}

/// The restored image of drive `name` in an extract directory.
pub fn restored(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("disk-{name}.raw"))
}

/// Checks the archive of a backup: `list` shows `drives` (name, size) in
/// order, `verify` passes, and each extracted drive equals its expected
/// image file.
pub fn check_archive(archive: &Path, drives: &[(&str, u64, &Path)], scratch: &Path) {
    let t = Instant::now();
    let listed = list_devices(archive);
    let want: Vec<(String, u64)> = drives.iter().map(|(n, s, _)| (n.to_string(), *s)).collect();
    assert_eq!(listed, want, "list of {}", archive.display());
    verify_ok(archive);
    let dir = extract(archive, scratch);
    for (name, _, expected) in drives {
        assert_same_file(&restored(&dir, name), expected);
    }
    eprintln!(
        "{}: listed, verified, extracted and compared in {:?}",
        archive.display(),
        t.elapsed()
    );
}

/// Asserts that neither `archive` nor, unless `keep_partial`,
/// `archive.partial` exists; with `keep_partial` the partial file must
/// exist.
pub fn assert_no_archive(archive: &Path, keep_partial: bool) {
    assert!(
        !archive.exists(),
        "{} exists after a failed backup",
        archive.display()
    );
    let partial = vma_writer::sink::partial_path(archive);
    assert_eq!(
        partial.exists(),
        keep_partial,
        "{} exists: {}, expected {keep_partial}",
        partial.display(),
        partial.exists()
    );
}

/// `vma-writer verify` of an incomplete archive (e.g. a kept
/// `ARCHIVE.partial`) must fail (exit 1), saying the archive is invalid
/// or incomplete.
pub fn verify_rejects(archive: &Path) {
    let out = super::run(&mut vma(["verify".as_ref(), archive.as_os_str()]));
    let err = super::assert_failure(&out, &archive);
    assert!(
        err.contains("verification failed") || err.contains("not a valid VMA archive"),
        "{err}"
    );
}
