//! Typed command-line values: clap value parsers for sizes, zstd levels,
//! `NAME=SIZE` drive exports and `NAME=IMAGE` drive images. A value is
//! checked here, at the edge, so the subcommands only ever see valid ones
//! and every rejection names the offending argument.

use std::path::PathBuf;
use std::str::FromStr;

use crate::vma::header::check_file_name;

/// QEMU counts drive sizes in whole 512-byte sectors, and Proxmox's reader
/// clamps restores to them: a device whose size is not a multiple of this
/// is one no QEMU drive has, and one Proxmox's `vma` may refuse to read.
pub const SECTOR_SIZE: u64 = 512;

/// A byte count: a number, optionally with a K/M/G/T suffix (powers of
/// 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
            Some('K') => (&t[..t.len() - 1], 1u64 << 10),
            Some('M') => (&t[..t.len() - 1], 1 << 20),
            Some('G') => (&t[..t.len() - 1], 1 << 30),
            Some('T') => (&t[..t.len() - 1], 1 << 40),
            _ => (t, 1),
        };
        let n: u64 = num
            .parse()
            .map_err(|_| format!("'{s}' is not a size (bytes, or a number with K/M/G/T)"))?;
        n.checked_mul(mult)
            .map(Size)
            .ok_or_else(|| format!("'{s}' is too large"))
    }
}

/// A zstd compression level, checked against the range the linked zstd
/// library supports (negative levels are its fast modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZstdLevel(pub i32);

impl FromStr for ZstdLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let range = zstd::compression_level_range();
        let level: i32 = s
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not a zstd level (a whole number)"))?;
        if !range.contains(&level) {
            return Err(format!(
                "zstd level {level} is out of range ({} to {})",
                range.start(),
                range.end()
            ));
        }
        Ok(ZstdLevel(level))
    }
}

/// `serve --drive NAME=SIZE`: a drive export and its exact size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveSize {
    /// Device and export name.
    pub name: String,
    /// Size in bytes, a multiple of [`SECTOR_SIZE`].
    pub size: u64,
}

impl FromStr for DriveSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, size) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}': expected NAME=SIZE"))?;
        check_file_name("drive", name).map_err(|e| e.to_string())?;
        let Size(size) = size.parse()?;
        if size == 0 {
            return Err(format!("drive '{name}': the size must not be 0"));
        }
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(format!(
                "drive '{name}': {size} bytes is not a multiple of {SECTOR_SIZE}; QEMU drives \
                 have whole 512-byte sectors, so give the size `qemu-img info` reports"
            ));
        }
        Ok(DriveSize {
            name: name.to_string(),
            size,
        })
    }
}

/// `create -d [format=FMT:]NAME=IMAGE`: a drive to archive from an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveImage {
    /// Image format (`raw` unless given); any format QEMU reads.
    pub format: String,
    /// Device name in the archive.
    pub name: String,
    /// Image path.
    pub path: PathBuf,
}

impl FromStr for DriveImage {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (format, rest) = match s.strip_prefix("format=") {
            Some(r) => {
                let (f, rest) = r
                    .split_once(':')
                    .ok_or_else(|| format!("'{s}': expected format=FMT:NAME=IMAGE"))?;
                if f.is_empty() {
                    return Err(format!("'{s}': the format must not be empty"));
                }
                (f.to_string(), rest)
            }
            None => ("raw".to_string(), s),
        };
        let (name, path) = rest
            .split_once('=')
            .ok_or_else(|| format!("'{s}': expected NAME=IMAGE"))?;
        if path.is_empty() {
            return Err(format!("'{s}': IMAGE must not be empty"));
        }
        // extract makes disk-NAME.raw, so NAME must be a plain file name.
        check_file_name("drive", name).map_err(|e| e.to_string())?;
        Ok(DriveImage {
            format,
            name: name.to_string(),
            path: PathBuf::from(path),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!("10487296".parse(), Ok(Size(10487296)));
        assert_eq!("64M".parse(), Ok(Size(64 << 20)));
        assert_eq!("1g".parse(), Ok(Size(1 << 30)));
        assert!("x".parse::<Size>().is_err());
        assert!("99999999999T".parse::<Size>().is_err());
    }

    #[test]
    fn zstd_levels() {
        assert_eq!("3".parse(), Ok(ZstdLevel(3)));
        assert_eq!("19".parse(), Ok(ZstdLevel(19)));
        let e = "99".parse::<ZstdLevel>().unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        assert!("fast".parse::<ZstdLevel>().is_err());
    }

    #[test]
    fn drive_sizes() {
        let d: DriveSize = "drive-scsi0=10M".parse().unwrap();
        assert_eq!((d.name.as_str(), d.size), ("drive-scsi0", 10 << 20));
        let e = "d=4600".parse::<DriveSize>().unwrap_err();
        assert!(e.contains("not a multiple of 512"), "{e}");
        assert!("d=0".parse::<DriveSize>().is_err());
        assert!("noequals".parse::<DriveSize>().is_err());
        assert!("../x=1M".parse::<DriveSize>().is_err());
    }

    #[test]
    fn drive_images() {
        let d: DriveImage = "drive-scsi0=/tmp/a.raw".parse().unwrap();
        assert_eq!((d.format.as_str(), d.name.as_str()), ("raw", "drive-scsi0"));
        let d: DriveImage = "format=qcow2:drive-virtio1=/x=y.qcow2".parse().unwrap();
        assert_eq!(d.format, "qcow2");
        assert_eq!(d.path, PathBuf::from("/x=y.qcow2"));
        assert!("noequals".parse::<DriveImage>().is_err());
        assert!("format=raw".parse::<DriveImage>().is_err());
        assert!("=x".parse::<DriveImage>().is_err());
        assert!("format=:a=b".parse::<DriveImage>().is_err());
    }
}
