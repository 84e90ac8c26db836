//! Reading archives: opening any archive we can read, reading it front to
//! back, or at random by cluster, and checking what is read against the
//! archive index.
//!
//! - [`format`]: an archive's encoding from its magic bytes (plain VMA,
//!   zstd, gzip, lzop), and [`Stream`], its plain VMA bytes front to back.
//! - [`source`]: opens a path or stdin; gives an [`Input`]: a
//!   random-access [`FileArchive`] or a sequential [`Stream`].
//! - [`filter`]: `gzip -dc` / `lzop -dc` as child processes.
//! - [`zstd_stream`]: sequential zstd that names the frame in its errors
//!   and checks frames against the seek table.
//! - [`counted`]: `pread` on the archive file, counting the bytes read.
//! - [`file`]: a regular plain `.vma` or seekable `.vma.zst`: its layout,
//!   its header alone, its stored index (checked: stale or foreign is an
//!   error), a map of a plain archive from its extent headers.
//! - [`frame`]: one zstd frame read and checked against the seek table.
//! - [`cache`]: bounded cache of decompressed frames, one decompression
//!   per frame however many threads want it.
//! - [`random`]: [`RandomArchive`], reads by cluster or extent from many
//!   threads, every data cluster checked against its digest.
//! - [`check`]: the checks against the index (extents where it says,
//!   cluster digests), for sequential and random readers.
//!
//! The VMA format itself (headers, extents, the index's bytes) is
//! [`crate::vma`]'s; this module adds files, processes and decompression.

mod cache;
pub mod check;
pub mod counted;
mod error;
pub mod file;
pub mod filter;
pub mod format;
pub mod frame;
pub mod random;
pub mod source;
pub mod zstd_stream;

pub use cache::{DEFAULT_CACHE_BYTES, FrameCache};
pub use check::IndexCheck;
pub use error::ArchiveError;
pub use file::FileArchive;
pub use format::{Format, Stream};
pub use random::{Cluster, RandomArchive};
pub use source::{Input, open};
