//! What an archive's bytes are: its encoding told from its first bytes
//! ([`Format`], the same on a file and on stdin), and [`Stream`], the
//! plain VMA bytes an input yields when read front to back.

use std::io::{self, Read};

use crate::seekable::ZSTD_FRAME_MAGIC;
use crate::vma::consts::VMA_MAGIC;

/// First bytes of a gzip stream.
pub const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// First bytes of an lzop file.
pub const LZOP_MAGIC: [u8; 9] = [0x89, 0x4c, 0x5a, 0x4f, 0x00, 0x0d, 0x0a, 0x1a, 0x0a];
/// Bytes read to tell the formats apart (the longest magic).
pub const MAGIC_LEN: usize = LZOP_MAGIC.len();

/// How an archive's bytes are encoded, from its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A plain VMA archive.
    Vma,
    /// zstd: a plain stream or seekable frames.
    Zstd,
    /// gzip (Proxmox's `.vma.gz`).
    Gzip,
    /// lzop (Proxmox's `.vma.lzo`).
    Lzop,
    /// None of these: read as plain VMA, whose reader names the bad magic.
    Unknown,
}

impl Format {
    /// The format whose magic `head` starts with.
    pub fn detect(head: &[u8]) -> Format {
        if head.starts_with(&VMA_MAGIC) {
            Format::Vma
        } else if head.starts_with(&ZSTD_FRAME_MAGIC) {
            Format::Zstd
        } else if head.starts_with(&GZIP_MAGIC) {
            Format::Gzip
        } else if head.starts_with(&LZOP_MAGIC) {
            Format::Lzop
        } else {
            Format::Unknown
        }
    }

    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Format::Vma => "plain VMA",
            Format::Zstd => "zstd",
            Format::Gzip => "gzip",
            Format::Lzop => "lzop",
            Format::Unknown => "unknown",
        }
    }
}

/// An archive read front to back as plain VMA bytes.
pub struct Stream {
    /// How it was encoded.
    pub format: Format,
    reader: Box<dyn Read + Send>,
}

impl Stream {
    /// A stream of `format` reading from `reader` (already decoded).
    pub fn new(format: Format, reader: Box<dyn Read + Send>) -> Stream {
        Stream { format, reader }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_magic() {
        assert_eq!(Format::detect(b"VMA\0rest"), Format::Vma);
        assert_eq!(Format::detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]), Format::Zstd);
        assert_eq!(Format::detect(&[0x1f, 0x8b, 8]), Format::Gzip);
        assert_eq!(Format::detect(&LZOP_MAGIC), Format::Lzop);
        assert_eq!(Format::detect(&LZOP_MAGIC[..8]), Format::Unknown);
        assert_eq!(Format::detect(b""), Format::Unknown);
    }
}
