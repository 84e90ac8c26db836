//! The Proxmox VMA archive format (`format/VMA.md` is its specification).
//!
//! - [`consts`]: every number of the format.
//! - [`cluster`]: cluster geometry and masks: clusters of a device, bytes of
//!   a cluster inside it, the runs of stored 4 KiB blocks of a mask and where
//!   they lie in the payload. The only place that does arithmetic on masks.
//! - [`ClusterBitmap`]: one bit per cluster (seen, archived, zero).
//! - [`zero`]: zero detection per 4 KiB block and the mask of a cluster.
//! - [`header`], [`extent`]: pure encode/decode of the archive header and of
//!   extent headers; no IO.
//! - [`writer`]: streaming writer to any [`ArchiveOut`] (any `Write`, or a
//!   sink that compresses per extent); never seeks.
//! - [`reader`]: streaming, validating reader from any `Read`.
//! - [`index`]: the archive index (`format/INDEX.md`): where every cluster
//!   is and the digest of every data cluster.
//! - [`restore_stats`]: the totals Proxmox's `vma` prints while reading,
//!   with its arithmetic.
//!
//! Nothing here knows about NBD, tokio or files.

#![deny(missing_docs)]

mod bitmap;
pub mod cluster;
pub mod consts;
mod error;
pub mod extent;
pub mod header;
pub mod index;
pub mod reader;
pub mod restore_stats;
pub mod writer;
pub mod zero;

pub use bitmap::ClusterBitmap;
pub use error::{FormatError, MissingClusters};
pub use header::{Config, Device, Header};
pub use index::{ArchiveIndex, DeviceChain, IndexBuilder, IndexError};
pub use reader::{ClusterData, Extent, ReadStats, Reader};
pub use restore_stats::RestoreStats;
pub use writer::{ArchiveOut, DeviceStats, Writer, WriterBuilder};

/// A device id: the index of the device's header slot (1..=254 when we
/// write; a reader also accepts 255). 0 means "no device".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevId(pub u8);

impl std::fmt::Display for DevId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}
