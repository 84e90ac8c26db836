//! Instant restore (issue 9, part 4) with real clients: `vma-writer
//! export` read by nbdcopy, qemu-img, qemu-io, nbdinfo and libnbd
//! ([`clients`]); the command's own rules: signals, sockets, JSON,
//! refusals ([`cli`]); `extract --format` ([`formats`]); and a live restore
//! with qemu-storage-daemon standing in for the VM ([`live_restore`]).
//!
//! The archives are made here, by `vma-writer create`, in the three forms
//! that can be read at random ([`Archives`]), with odd sizes, zero
//! clusters and zero blocks inside clusters; what `extract` writes is the
//! expected content of every export.

mod cli;
mod clients;
mod formats;
mod live_restore;

use std::path::{Path, PathBuf};

use crate::support::*;

/// The archive uuid and creation time of every test archive.
const UUID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
const CTIME: &str = "1700000000";

/// 1, 2 and 8 drives: odd sizes (multiples of 512, most ending inside a
/// cluster or a 4 KiB block), as (name, size, seed).
const ONE: &[(&str, u64, u64)] = &[("drive-scsi0", 3 * MIB + 512, 1)];
const TWO: &[(&str, u64, u64)] = &[
    ("drive-virtio0", MIB + 1536, 2),
    ("drive-efidisk0", 528 * 1024, 3),
];
const EIGHT: &[(&str, u64, u64)] = &[
    ("drive-scsi0", 5 * 65536 + 512, 4),
    ("drive-scsi1", 7 * 512, 5),
    ("drive-scsi2", 300 * 1024 + 512, 6),
    ("drive-scsi3", MIB, 7),
    ("drive-scsi4", 70 * 1024, 8),
    ("drive-scsi5", 8 * 1024 + 512, 9),
    ("drive-scsi6", 2 * MIB - 512, 10),
    ("drive-scsi7", 200 * 1024, 11),
];

/// One archive in each form that can be read at random, and its drives
/// as `extract` restores them.
pub struct Archives {
    /// A plain `.vma` without its index (mapped from its extent headers).
    pub plain: PathBuf,
    /// The same `.vma` with its index beside it.
    pub indexed: PathBuf,
    /// A seekable `.vma.zst` of the same drives.
    pub zst: PathBuf,
    /// The drives' names and sizes, in archive order.
    pub drives: Vec<(String, u64)>,
    /// `extract`'s output directory (`disk-NAME.raw`).
    pub restored: PathBuf,
}

impl Archives {
    /// The three forms, named for messages.
    pub fn forms(&self) -> [(&'static str, &Path); 3] {
        [
            ("plain", &self.plain),
            ("indexed", &self.indexed),
            ("zst", &self.zst),
        ]
    }

    /// What `extract` wrote for drive `name`.
    pub fn expected(&self, name: &str) -> PathBuf {
        restored(&self.restored, name)
    }
}

/// Makes the archives of `drives` (name, size, seed) under `dir`, their
/// files named after `tag`: images with holes, zero blocks inside
/// clusters and lone bytes in zero blocks ([`holey_data`]).
pub fn archives(dir: &Path, tag: &str, drives: &[(&str, u64, u64)]) -> Archives {
    let mut args: Vec<String> = vec!["--uuid".into(), UUID.into(), "--ctime".into(), CTIME.into()];
    for (name, size, seed) in drives {
        let img = dir.join(format!("{tag}-{name}.img"));
        write_image(&img, &holey_data(*size as usize, *seed), Layout::Sparse);
        args.push("-d".into());
        args.push(format!("{name}={}", img.display()));
    }
    let indexed = dir.join(format!("{tag}.vma"));
    let zst = dir.join(format!("{tag}.vma.zst"));
    for out in [&indexed, &zst] {
        run_ok(vma(["create".as_ref(), out.as_os_str()]).args(&args));
    }
    assert!(
        dir.join(format!("{tag}.vma.index")).exists(),
        "create wrote no index"
    );
    let plain = dir.join(format!("{tag}-noindex.vma"));
    std::fs::copy(&indexed, &plain).unwrap();
    Archives {
        restored: extract(&indexed, dir),
        plain,
        indexed,
        zst,
        drives: drives.iter().map(|d| (d.0.to_string(), d.1)).collect(),
    }
}
