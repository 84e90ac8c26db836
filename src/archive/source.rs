//! Opening an archive: a path or `-` for stdin, its compression found
//! from its first bytes (also on stdin, whatever the name says), and the
//! way it can be read: a regular plain `.vma` or seekable `.vma.zst` file
//! at random ([`Input::File`]), anything else as a stream of plain VMA
//! bytes ([`Input::Stream`]). Streams of gzip and lzop go through
//! `gzip -dc` / `lzop -dc` ([`super::filter`]), zstd streams through
//! [`ZstdStream`].

use std::fs::File;
use std::io::{self, Cursor, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::error::ArchiveError;
use super::file::FileArchive;
use super::filter::{Filter, FilterInput};
use super::zstd_stream::ZstdStream;
use crate::seekable::ZSTD_FRAME_MAGIC;
use crate::vma::consts::VMA_MAGIC;

/// First bytes of a gzip stream.
pub const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// First bytes of an lzop file.
pub const LZOP_MAGIC: [u8; 9] = [0x89, 0x4c, 0x5a, 0x4f, 0x00, 0x0d, 0x0a, 0x1a, 0x0a];
/// Bytes read to tell the formats apart (the longest magic).
const MAGIC_LEN: usize = LZOP_MAGIC.len();

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

/// An opened archive; see the module docs.
pub enum Input {
    /// A regular file that can be read at random (and as a stream).
    File(FileArchive),
    /// Only a stream.
    Stream(Stream),
}

impl Input {
    /// The archive as a stream of plain VMA bytes, from its start.
    pub fn into_stream(self) -> Result<Stream, ArchiveError> {
        match self {
            Input::File(f) => f.stream(),
            Input::Stream(s) => Ok(s),
        }
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_head(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Opens `path` (`-`: stdin); see the module docs.
pub fn open(path: &str) -> Result<Input, ArchiveError> {
    if path == "-" {
        // An unbuffered handle on fd 0; the readers do large reads.
        let mut stdin = File::from(io::stdin().as_fd().try_clone_to_owned()?);
        let mut head = [0u8; MAGIC_LEN];
        let got = read_head(&mut stdin, &mut head)?;
        let head = head[..got].to_vec();
        let format = Format::detect(&head);
        return decode_stream(format, FilterInput::Pipe(head, Box::new(stdin)));
    }
    let file = File::open(path).map_err(|e| {
        ArchiveError::Io(io::Error::new(
            e.kind(),
            format!("cannot open archive {path}: {e}"),
        ))
    })?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        // A FIFO or a device: a stream, read once from its start.
        let mut file = file;
        let mut head = [0u8; MAGIC_LEN];
        let got = read_head(&mut file, &mut head)?;
        let head = head[..got].to_vec();
        let format = Format::detect(&head);
        return decode_stream(format, FilterInput::Pipe(head, Box::new(file)));
    }
    let mut head = [0u8; MAGIC_LEN];
    let got = read_head_at(&file, &mut head)?;
    let format = Format::detect(&head[..got]);
    match format {
        Format::Vma => Ok(Input::File(FileArchive::plain(file, Path::new(path))?)),
        Format::Zstd => match FileArchive::seekable(file, Path::new(path))? {
            Ok(f) => Ok(Input::File(f)),
            Err(file) => decode_stream(format, FilterInput::File(file)),
        },
        _ => decode_stream(format, FilterInput::File(file)),
    }
}

fn read_head_at(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The plain VMA bytes of `input`, encoded as `format`.
fn decode_stream(format: Format, input: FilterInput) -> Result<Input, ArchiveError> {
    let reader: Box<dyn Read + Send> = match (format, input) {
        (Format::Gzip, input) => Box::new(Filter::spawn("gzip", format, input)?),
        (Format::Lzop, input) => Box::new(Filter::spawn("lzop", format, input)?),
        (Format::Zstd, FilterInput::File(f)) => Box::new(ZstdStream::new(f)),
        (Format::Zstd, FilterInput::Pipe(head, rest)) => {
            Box::new(ZstdStream::new(Cursor::new(head).chain(rest)))
        }
        (_, FilterInput::File(f)) => Box::new(f),
        (_, FilterInput::Pipe(head, rest)) => Box::new(Cursor::new(head).chain(rest)),
    };
    Ok(Input::Stream(Stream::new(format, reader)))
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
