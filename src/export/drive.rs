//! [`DriveExport`]: one drive of an archive as a read-only NBD backend.
//!
//! - READ: the drive's bytes as a restore writes them, read on a worker
//!   and checked against the index's digests; a mismatch (or any read
//!   error) answers EIO for that request only and is logged with the
//!   drive, the range and the cluster.
//! - BLOCK_STATUS: from the cluster masks the index gave at start, without
//!   reading the archive ([`super::status`]).
//! - CACHE, and sequential reads ([`super::readahead`]): the frames (or
//!   file pages) the range needs are loaded ahead on idle workers.
//! - WRITE, WRITE_ZEROES and TRIM never arrive: the export is read-only,
//!   so the NBD layer answers them EPERM itself.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tracing::{debug, warn};

use super::readahead::Streams;
use super::reads::Reads;
use super::status::block_status;
use crate::nbd::{Backend, BackendCaps, BlockStatus, MAX_EXTENTS};
use crate::vma::consts::{VMA_BLOCKS_PER_EXTENT, VMA_CLUSTER_SIZE};
use crate::vma::{DevId, Device};

/// Device bytes one warming job covers: one extent's worth of clusters,
/// so the frames of a window decompress on several workers at once.
const WARM_STEP: u64 = (VMA_BLOCKS_PER_EXTENT * VMA_CLUSTER_SIZE) as u64;

/// What a drive export has done, for status lines and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveStats {
    /// The drive's name (the export name).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Clients connected now.
    pub connections: usize,
    /// READ bytes answered.
    pub bytes_served: u64,
    /// READs answered with an error.
    pub read_errors: u64,
}

/// One drive's export; see the module docs.
pub struct DriveExport {
    dev: DevId,
    name: String,
    size: u64,
    /// The mask of every cluster, from the index.
    masks: Vec<u16>,
    reads: Arc<Reads>,
    streams: Mutex<Streams>,
    connections: AtomicUsize,
    bytes_served: AtomicU64,
    read_errors: AtomicU64,
}

impl DriveExport {
    /// The export of `device`, read through `reads`.
    pub fn new(device: &Device, reads: Arc<Reads>) -> DriveExport {
        DriveExport {
            dev: device.id,
            name: device.name.clone(),
            size: device.size,
            masks: reads.archive().index().cluster_masks(device.id),
            reads,
            streams: Mutex::new(Streams::default()),
            connections: AtomicUsize::new(0),
            bytes_served: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
        }
    }

    /// The drive's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What it has done so far.
    pub fn stats(&self) -> DriveStats {
        DriveStats {
            name: self.name.clone(),
            size: self.size,
            connections: self.connections.load(Ordering::Relaxed),
            bytes_served: self.bytes_served.load(Ordering::Relaxed),
            read_errors: self.read_errors.load(Ordering::Relaxed),
        }
    }

    /// Warms `[from, to)` in the background: a seekable archive's frames
    /// one per idle worker, a plain archive's pages one extent's worth per
    /// idle worker; stops at the first step no worker is free for.
    fn warm_ahead(&self, from: u64, to: u64) {
        let budget = self.warm_budget();
        let cluster = VMA_CLUSTER_SIZE as u64;
        let (from, to) = (from, to.min(self.size));
        if self.reads.archive().cache_budget() > 0 {
            let clusters = from / cluster..to.div_ceil(cluster);
            let frames = self
                .reads
                .archive()
                .frames_holding(self.dev, clusters, budget);
            self.reads.load_ahead(&frames);
            return;
        }
        let mut at = from;
        while at < to {
            let step_end = (at + WARM_STEP).min(to);
            let (dev, clusters) = (self.dev, at / cluster..step_end.div_ceil(cluster));
            let started = self.reads.run_if_idle(move |a| {
                if let Err(e) = a.prefetch(dev, clusters, budget) {
                    // The READ that needs it will report it.
                    debug!(error = %e, "read-ahead failed");
                }
            });
            if !started {
                break;
            }
            at = step_end;
        }
    }

    /// Most bytes one warming job may load: a quarter of the frame cache
    /// (so warming never pushes out the frames readers are using), or a
    /// whole step for a plain archive (the kernel's page cache).
    fn warm_budget(&self) -> u64 {
        match self.reads.archive().cache_budget() {
            0 => WARM_STEP,
            cache => (cache / 4) as u64,
        }
    }
}

impl Backend for DriveExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> BackendCaps {
        BackendCaps {
            read_only: true,
            // Nothing is ever written, so every connection sees the same
            // data: multi-conn is safe.
            flush_is_global: true,
            fast_zero: false,
            trim: false,
        }
    }

    async fn write(&self, _offset: u64, _data: Bytes) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _may_trim: bool) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }

    async fn trim(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Bytes> {
        let ahead = self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset, u64::from(len));
        if let Some(w) = ahead {
            self.warm_ahead(w.start, w.end);
        }
        match self.reads.read(self.dev, offset, len as usize).await {
            Ok(data) => {
                self.bytes_served
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                Ok(data)
            }
            Err(e) => {
                self.read_errors.fetch_add(1, Ordering::Relaxed);
                warn!(drive = %self.name, offset, len, "READ answered EIO: {e}");
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
        }
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<BlockStatus>> {
        Ok(block_status(
            &self.masks,
            self.size,
            offset,
            len,
            MAX_EXTENTS,
        ))
    }

    async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        // Advisory: at most what the cache can hold without evicting
        // what it just loaded.
        let end = offset + len.min(self.warm_budget());
        let cluster = VMA_CLUSTER_SIZE as u64;
        let (dev, clusters, budget) = (
            self.dev,
            offset / cluster..end.div_ceil(cluster),
            self.warm_budget(),
        );
        if let Err(e) = self
            .reads
            .run(move |a| a.prefetch(dev, clusters, budget))
            .await
        {
            debug!(drive = %self.name, offset, len, error = %e, "CACHE failed");
        }
        Ok(())
    }

    fn connected(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    fn disconnected(&self, _clean: bool) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }
}
