//! The base archive of an incremental backup: opening it for reading at
//! random (any plain `.vma`, with or without its index, or a seekable
//! `.vma.zst`), and Proxmox's archive names in a dump directory: the name
//! a backup gets ([`vzdump_name`]) and the newest committed archive of a
//! VM ([`newest_archive`]), the base of `--incremental`.
//!
//! Reading the base is [`crate::archive`]'s; which drives use it is
//! [`super::chain`]'s.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::archive::RandomArchive;

/// Decompressed frames of a `.vma.zst` base kept at once: the extents read
/// ahead ([`crate::assembler::FILL_READ_AHEAD`]) and a few more; a fill
/// reads each frame once, front to back.
pub const BASE_CACHE_BYTES: usize = 16 << 20;

/// A base archive, or why it cannot serve as one (a backup then copies
/// every drive in full and says why).
pub enum BaseArchive {
    /// Open for reading at random.
    Open {
        /// Its path.
        path: PathBuf,
        /// The archive.
        archive: Arc<RandomArchive>,
    },
    /// It cannot be read at random.
    Unusable {
        /// Its path.
        path: PathBuf,
        /// Why.
        error: String,
    },
}

impl BaseArchive {
    /// Opens `path` (reads its header and index, or maps a plain archive
    /// from its extent headers). Blocking.
    pub fn open(path: &Path) -> BaseArchive {
        match RandomArchive::open(&path.to_string_lossy()) {
            Ok(a) => BaseArchive::Open {
                path: path.to_path_buf(),
                archive: Arc::new(a.with_cache_size(BASE_CACHE_BYTES).mapped()),
            },
            Err(e) => BaseArchive::Unusable {
                path: path.to_path_buf(),
                error: e.to_string(),
            },
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        match self {
            BaseArchive::Open { path, .. } | BaseArchive::Unusable { path, .. } => path,
        }
    }

    /// The archive, when it is usable.
    pub fn archive(&self) -> Option<&Arc<RandomArchive>> {
        match self {
            BaseArchive::Open { archive, .. } => Some(archive),
            BaseArchive::Unusable { .. } => None,
        }
    }
}

/// Proxmox's archive name: `vzdump-qemu-<vmid>-YYYY_MM_DD-HH_MM_SS.vma`,
/// local time, `.zst` added when compressed.
pub fn vzdump_name(vmid: u32, zstd: bool) -> String {
    let now = chrono::Local::now().format("%Y_%m_%d-%H_%M_%S");
    format!(
        "vzdump-qemu-{vmid}-{now}.vma{}",
        if zstd { ".zst" } else { "" }
    )
}

/// The time stamp of a [`vzdump_name`] of VM `vmid` that a base can be
/// read from (`.vma` or `.vma.zst`; not `.partial`, `.index` or another
/// compression), e.g. `2026_11_27-09_46_00`.
fn vzdump_stamp(name: &str, vmid: u32) -> Option<&str> {
    let rest = name.strip_prefix(&format!("vzdump-qemu-{vmid}-"))?;
    let stamp = rest
        .strip_suffix(".vma")
        .or_else(|| rest.strip_suffix(".vma.zst"))?;
    let b = stamp.as_bytes();
    let shape = b.len() == 19
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 | 13 | 16 => *c == b'_',
            10 => *c == b'-',
            _ => c.is_ascii_digit(),
        });
    shape.then_some(stamp)
}

/// The newest committed archive of VM `vmid` in `dir` by the time stamp
/// in its name ([`vzdump_name`]); `None` when there is none.
pub fn newest_archive(dir: &Path, vmid: u32) -> io::Result<Option<PathBuf>> {
    let mut best: Option<(String, PathBuf)> = None;
    let name = dir.to_string_lossy();
    if crate::object::is_object_name(&name) {
        // An S3 prefix: only completed uploads are listed.
        for n in crate::object::list_dir(&name)? {
            if let Some(stamp) = vzdump_stamp(&n, vmid)
                && best.as_ref().is_none_or(|(b, _)| stamp > b.as_str())
            {
                best = Some((stamp.to_string(), dir.join(&n)));
            }
        }
        return Ok(best.map(|(_, p)| p));
    }
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stamp) = vzdump_stamp(name, vmid) else {
            continue;
        };
        if !e.file_type()?.is_file() {
            continue;
        }
        if best.as_ref().is_none_or(|(b, _)| stamp > b.as_str()) {
            best = Some((stamp.to_string(), e.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_committed_archive_of_the_vm() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(newest_archive(d, 100).unwrap(), None);
        for name in [
            "vzdump-qemu-100-2026_01_02-03_04_05.vma",
            "vzdump-qemu-100-2026_01_03-00_00_00.vma.zst",
            "vzdump-qemu-100-2026_01_03-00_00_00.vma.zst.index",
            "vzdump-qemu-100-2026_01_04-00_00_00.vma.partial",
            "vzdump-qemu-100-2026_01_05-00_00_00.vma.lzo",
            "vzdump-qemu-1000-2026_01_06-00_00_00.vma",
            "vzdump-qemu-100-2026_01_07-00_00.vma",
            "vzdump-qemu-101-2026_01_08-00_00_00.vma",
        ] {
            std::fs::write(d.join(name), b"").unwrap();
        }
        assert_eq!(
            newest_archive(d, 100).unwrap(),
            Some(d.join("vzdump-qemu-100-2026_01_03-00_00_00.vma.zst"))
        );
        assert_eq!(
            newest_archive(d, 101).unwrap(),
            Some(d.join("vzdump-qemu-101-2026_01_08-00_00_00.vma"))
        );
        let name = vzdump_name(7, true);
        assert!(vzdump_stamp(&name, 7).is_some(), "{name}");
    }
}
