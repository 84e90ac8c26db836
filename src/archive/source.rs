//! Opening an archive: a path or `-` for stdin, its compression found
//! from its first bytes (also on stdin, whatever the name says), and the
//! way it can be read: a regular plain `.vma` or seekable `.vma.zst` file
//! at random ([`Input::File`]), anything else as a stream of plain VMA
//! bytes ([`Input::Stream`]). Streams of gzip and lzop go through
//! `gzip -dc` / `lzop -dc` ([`super::filter`]), zstd streams through
//! [`ZstdStream`]. An `s3://BUCKET/KEY` name is an object
//! ([`crate::object`]): read at random by ranged GETs when it is a plain
//! VMA or seekable zstd, else as a stream, in one streamed GET.

use std::fs::File;
use std::io::{self, Cursor, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::counted::CountedFile;
use super::error::ArchiveError;
use super::file::FileArchive;
use super::filter::{Filter, FilterInput};
use super::format::{Format, MAGIC_LEN, Stream};
use super::zstd_stream::ZstdStream;
use crate::vma::reader::read_full;

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

/// A pipe, FIFO or device, read once from its start: its first bytes
/// tell the format.
fn pipe(mut f: File) -> Result<Input, ArchiveError> {
    let mut head = [0u8; MAGIC_LEN];
    let got = read_full(&mut f, &mut head)?;
    let head = head[..got].to_vec();
    let format = Format::detect(&head);
    decode_stream(format, FilterInput::Pipe(head, Box::new(f)))
}

/// Opens `path` (`-`: stdin); see the module docs.
pub fn open(path: &str) -> Result<Input, ArchiveError> {
    if path == "-" {
        // An unbuffered handle on fd 0; the readers do large reads.
        return pipe(File::from(io::stdin().as_fd().try_clone_to_owned()?));
    }
    if crate::object::is_object_name(path) {
        return open_object(path);
    }
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return pipe(file);
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

/// Opens the object `name`, like a regular file.
fn open_object(name: &str) -> Result<Input, ArchiveError> {
    use crate::object::{ObjectUrl, RemoteObject};
    let url = ObjectUrl::parse(name).map_err(io::Error::from)?;
    let object = RemoteObject::open(&url).map_err(io::Error::from)?;
    let file = CountedFile::remote(object);
    let mut head = [0u8; MAGIC_LEN];
    let got = file.read_at(&mut head, 0)?;
    let format = Format::detect(&head[..got]);
    let stream = |file: CountedFile| -> Result<Input, ArchiveError> {
        let file = std::sync::Arc::new(file);
        let rest = file.reader(0, file.len())?;
        decode_stream(format, FilterInput::Pipe(Vec::new(), rest))
    };
    match format {
        Format::Vma => Ok(Input::File(FileArchive::plain_from(file, Path::new(name))?)),
        Format::Zstd => match FileArchive::seekable_from(file, Path::new(name))? {
            Ok(f) => Ok(Input::File(f)),
            Err(file) => {
                tracing::info!(
                    "{name} has no seek table: it is read front to back, in one streamed GET"
                );
                stream(file)
            }
        },
        _ => stream(file),
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
