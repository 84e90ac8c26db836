//! The one error type of reading archives: each variant says what was
//! being read (device and cluster, frame and extent, the index) so a
//! message names the place that is broken.

use std::io;

use crate::seekable::SeekTableError;
use crate::vma::index::IndexError;
use crate::vma::{DevId, FormatError};

/// Why an archive cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Opening or reading the file failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The VMA structure is invalid.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The seek table of a `.vma.zst` is malformed.
    #[error(transparent)]
    SeekTable(#[from] SeekTableError),
    /// The archive index is unusable: corrupt, stale, foreign.
    #[error("{place}: {source}")]
    Index {
        /// Where the index is (`ARCHIVE.index`, or the index frame).
        place: String,
        /// What is wrong with it.
        source: IndexError,
    },
    /// A zstd frame is corrupt, truncated, or not what the seek table says.
    #[error("zstd frame {frame} ({holds}): {problem}")]
    Frame {
        /// The frame number (0: the archive header).
        frame: u32,
        /// What it holds: `extent 7`, `the archive header`, or where it is.
        holds: String,
        /// What is wrong.
        problem: String,
    },
    /// A cluster's data does not match its digest in the index.
    #[error(
        "device {dev} ('{name}') cluster {cluster}: the data does not match its digest in the \
         index (index {expected}, data {found}): corrupt payload"
    )]
    Digest {
        /// The device.
        dev: DevId,
        /// Its name.
        name: String,
        /// The cluster number.
        cluster: u64,
        /// The digest in the index, hex.
        expected: String,
        /// The digest of the data read, hex.
        found: String,
    },
    /// The index does not describe the extent found where it points.
    #[error(
        "the index does not match extent {extent} at stream offset {offset}: {problem} (a stale \
         index from another archive?)"
    )]
    IndexMismatch {
        /// The extent's number.
        extent: u64,
        /// Its offset in the plain VMA stream.
        offset: u64,
        /// What differs.
        problem: String,
    },
    /// The external decompressor a format needs is not installed.
    #[error("cannot read a {format} archive: `{tool}` is not installed ({source})")]
    MissingTool {
        /// `gzip`, `lzop`.
        tool: &'static str,
        /// The compression found.
        format: &'static str,
        /// The error from starting it.
        source: io::Error,
    },
    /// The external decompressor failed: corrupt or truncated input.
    #[error("`{command}` failed ({status}){}", stderr_tail(.stderr))]
    Filter {
        /// The command, e.g. `gzip -dc`.
        command: &'static str,
        /// How it ended.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The archive cannot be read at random (a stream, a `.vma.zst`
    /// without seek table or index).
    #[error("{0}; `vma-writer convert` makes a copy that can be read at random")]
    NotRandomAccess(String),
}

fn stderr_tail(s: &str) -> String {
    let s = s.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!(": {s}")
    }
}

/// Lower-case hex of a digest, for messages.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl From<ArchiveError> for io::Error {
    fn from(e: ArchiveError) -> Self {
        match e {
            ArchiveError::Io(e) => e,
            other => io::Error::other(other),
        }
    }
}
