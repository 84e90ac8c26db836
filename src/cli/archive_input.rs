//! Opening an archive for the reading commands through [`crate::archive`],
//! with the path in every error: its header alone (`list`, `config`), a
//! stream of it with its stored index, when it has one (`verify`,
//! `extract`, `convert`), or the file read at random (`export`,
//! `extract --format`, `live-restore`).

use std::sync::Arc;

use anyhow::Context;

use crate::archive::{self, Input, RandomArchive, Stream};
use crate::vma::{ArchiveIndex, Header, Reader};

/// Opens `path` (`-`: stdin).
pub fn open(path: &str) -> anyhow::Result<Input> {
    archive::open(path).with_context(|| format!("{path}: cannot read the archive"))
}

/// The header of `path`, reading no more than it needs: a plain file's
/// header bytes, a seekable `.vma.zst`'s frame 0, a stream's first bytes.
pub fn header(path: &str) -> anyhow::Result<Header> {
    header_of(path, open(path)?)
}

/// The header of `input`, opened from `path`.
pub fn header_of(path: &str, input: Input) -> anyhow::Result<Header> {
    let not_valid = || format!("{path}: not a valid VMA archive");
    match input {
        Input::File(f) => Ok(f.header().clone()),
        Input::Stream(s) => Ok(Reader::new(s).with_context(not_valid)?.header().clone()),
    }
}

/// `input` as a validating reader from its start, and its stored index
/// (checked against it) when it has one.
pub fn reader_with_index(
    path: &str,
    input: Input,
) -> anyhow::Result<(Reader<Stream>, Option<Arc<ArchiveIndex>>)> {
    let (stream, index) = match input {
        Input::File(f) => {
            let index = f
                .load_index()
                .with_context(|| format!("{path}: unusable archive index"))?
                .map(Arc::new);
            (f.stream_named(index.clone())?, index)
        }
        Input::Stream(s) => (s, None),
    };
    let reader = Reader::new(stream).with_context(|| format!("{path}: not a valid VMA archive"))?;
    Ok((reader, index))
}

/// `path` read at random: a plain `.vma` (with or without its index) or a
/// seekable `.vma.zst`. Anything else fails with a message that suggests
/// `vma-writer convert`.
pub fn random(path: &str) -> anyhow::Result<RandomArchive> {
    RandomArchive::open(path).with_context(|| format!("{path}: cannot read the archive at random"))
}
