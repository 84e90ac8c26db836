//! Filling an incremental drive from its base archive. QEMU sends only the
//! clusters that changed since the base; once its client has gone (the
//! job completed, the target was removed, QEMU flushed and disconnected),
//! every cluster the drive's archived bitmap still lacks is copied from the
//! base, as the base stores it.
//!
//! The base is read by extent (never cluster by cluster) on blocking
//! threads, a few extents ahead of the one being sent; every data cluster
//! taken is checked against the base's digest when the base has an index
//! ([`RandomArchive::read_extent_clusters`]), and a mismatch fails the fill
//! rather than carry corruption into the new archive. The clusters go to
//! the writer thread through the drive's channel like any other (so a slow
//! output holds the reads back) with their mask, stored blocks and digest:
//! nothing is zero-scanned or digested again
//! ([`crate::vma::Writer::write_stored_cluster`]). Extents whose wanted
//! clusters are all zero are not read at all.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};

use super::drive::Drive;
use crate::archive::{ArchiveError, Cluster, RandomArchive};
use crate::vma::cluster::cluster_len;
use crate::vma::{ClusterBitmap, DevId};

/// Extents of the base read ahead of the one being sent: enough to keep a
/// core decompressing (zstd) or the disk busy (plain) while the writer
/// works, at most 4 × 3.7 MiB held.
pub const FILL_READ_AHEAD: usize = 4;

/// What a fill copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FillStats {
    /// In-device bytes of the clusters copied from the base.
    pub bytes: u64,
    /// How long the fill took.
    pub elapsed: Duration,
}

/// Why a fill failed.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    /// The base cannot be read, or a cluster fails its digest check.
    #[error("drive {drive}: cannot copy from the base archive: {source}")]
    Base {
        /// The drive.
        drive: String,
        /// What is wrong with the base.
        source: ArchiveError,
    },
    /// The base's device does not match the drive (a caller's mistake).
    #[error("drive {drive}: the base's device {dev} is {base_size} bytes, the drive {size}")]
    Mismatch {
        /// The drive.
        drive: String,
        /// The base's device.
        dev: DevId,
        /// Its size.
        base_size: u64,
        /// The drive's.
        size: u64,
    },
    /// Our own archive failed (its first failure).
    #[error(transparent)]
    Archive(io::Error),
}

/// Copies every cluster `drive` lacks from device `base_dev` of `base`.
pub(super) async fn fill(
    drive: &Drive,
    base: &Arc<RandomArchive>,
    base_dev: DevId,
) -> Result<FillStats, FillError> {
    let started = Instant::now();
    let base_size = base.header().device(base_dev).map_or(0, |d| d.size);
    if base_size != drive.size() {
        return Err(FillError::Mismatch {
            drive: drive.name().to_string(),
            dev: base_dev,
            base_size,
            size: drive.size(),
        });
    }
    let archived = Arc::new(drive.archived());
    let index = base.index().clone();
    let extents: Vec<usize> = index
        .extents_of(&[base_dev])
        .into_iter()
        .filter(|&x| {
            index.extents[x]
                .entries
                .iter()
                .any(|e| e.dev == base_dev.0 && !archived.get(u64::from(e.cluster)))
        })
        .collect();
    let mut reads = stream::iter(extents)
        .map(|x| {
            let (base, archived) = (base.clone(), archived.clone());
            async move {
                tokio::task::spawn_blocking(move || wanted(&base, x, base_dev, &archived))
                    .await
                    .map_err(|e| ArchiveError::Io(io::Error::other(format!("base reader: {e}"))))?
            }
        })
        .buffered(FILL_READ_AHEAD);
    let mut bytes = 0;
    while let Some(clusters) = reads.next().await {
        let clusters = clusters.map_err(|source| FillError::Base {
            drive: drive.name().to_string(),
            source,
        })?;
        for c in clusters {
            let len = c.len as u64;
            drive
                .put_from_base(c.cluster, c.mask, c.stored, c.digest)
                .await
                .map_err(FillError::Archive)?;
            bytes += len;
        }
    }
    Ok(FillStats {
        bytes,
        elapsed: started.elapsed(),
    })
}

/// The clusters of device `dev` in extent `x` that `archived` lacks: read
/// and checked, or made from the index alone when all of them are zero.
fn wanted(
    base: &RandomArchive,
    x: usize,
    dev: DevId,
    archived: &ClusterBitmap,
) -> Result<Vec<Cluster>, ArchiveError> {
    let want = |d: DevId, c: u64| d == dev && !archived.get(c);
    let entries = &base.index().extents[x].entries;
    let all_zero = entries
        .iter()
        .filter(|e| want(DevId(e.dev), u64::from(e.cluster)))
        .all(|e| e.mask == 0);
    if !all_zero {
        return base.read_extent_clusters(x, want);
    }
    let size = base.header().device(dev).map_or(0, |d| d.size);
    Ok(entries
        .iter()
        .filter(|e| want(DevId(e.dev), u64::from(e.cluster)))
        .map(|e| Cluster {
            dev,
            cluster: u64::from(e.cluster),
            mask: 0,
            len: cluster_len(size, u64::from(e.cluster)),
            stored: bytes::Bytes::new(),
            digest: None,
        })
        .collect())
}
