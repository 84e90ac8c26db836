//! What every drive of one export shares: the archive, the threads its
//! reads run on, and the bound on read data held in memory.
//!
//! Reading an archive blocks (`pread`, zstd decompression, digests), so it
//! never runs on a tokio worker: every READ, CACHE and read-ahead runs on
//! tokio's blocking pool, at most `workers` at once. That also bounds the
//! frames being decompressed besides those the frame cache holds. The data
//! of every READ holds permits from one budget ([`READ_BUDGET`] bytes by
//! default) shared by all connections, from before it is read until its
//! reply is on the wire, so the export's memory stays bounded however many
//! clients read at once.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::archive::{ArchiveError, RandomArchive};
use crate::pool::{BufferPool, PooledBuf};
use crate::vma::DevId;

/// Default bound on READ data held at once, over all connections (being
/// read, or read and waiting to be sent). 64 MiB is nbdcopy's whole queue
/// (4 connections × 64 requests × 256 KiB) or four QEMU clients' (16 ×
/// 1 MiB); past it, READs wait for earlier replies to go out. Each
/// connection may hold at most [`super::EXPORT_BYTES_IN_FLIGHT`] of it, so
/// one client that stops reading its replies cannot take it all.
pub const READ_BUDGET: usize = 64 << 20;

/// Idle read buffers kept for reuse (a fresh buffer of 256 KiB or more is
/// `mmap`ed and page-faulted on first touch, which costs more than filling
/// it).
const IDLE_BUFFERS: usize = 16 << 20;

/// Default number of reads run at once: two per core (while one waits for
/// the disk the other decompresses), at least 4, at most 16.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(4, |n| (2 * n.get()).clamp(4, 16))
}

/// The shared read side of an export; see the module docs.
pub struct Reads {
    archive: Arc<RandomArchive>,
    workers: Arc<Semaphore>,
    budget: Arc<Semaphore>,
    budget_bytes: usize,
    pool: Arc<BufferPool>,
}

/// READ data and its share of the budget, released together.
struct ReadBuf {
    buf: PooledBuf,
    _permit: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for ReadBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Reads {
    /// Reads of `archive`, `workers` at once, holding at most `budget`
    /// bytes of READ data.
    pub fn new(archive: Arc<RandomArchive>, workers: usize, budget: usize) -> Reads {
        let budget = budget.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Reads {
            archive,
            workers: Arc::new(Semaphore::new(workers.max(1))),
            budget: Arc::new(Semaphore::new(budget)),
            budget_bytes: budget,
            pool: BufferPool::new(IDLE_BUFFERS),
        }
    }

    /// The archive.
    pub fn archive(&self) -> &Arc<RandomArchive> {
        &self.archive
    }

    /// `len` bytes of `dev` at `offset`, read and checked on a worker
    /// ([`RandomArchive::read_into`]). The bytes hold their share of the
    /// budget until the last reference to them is dropped.
    pub async fn read(&self, dev: DevId, offset: u64, len: usize) -> Result<Bytes, ArchiveError> {
        // A request larger than the whole budget takes all of it and runs
        // alone (the NBD layer caps requests far below the default).
        let want = len.clamp(1, self.budget_bytes) as u32;
        let permit = Arc::clone(&self.budget)
            .acquire_many_owned(want)
            .await
            .expect("the budget is never closed");
        let mut buf = self.pool.get_filled(len);
        let (buf, res) = self
            .run(move |a| {
                let res = a.read_into(dev, offset, &mut buf);
                (buf, res)
            })
            .await;
        res?;
        Ok(Bytes::from_owner(ReadBuf {
            buf,
            _permit: permit,
        }))
    }

    /// Runs `f` on the archive on a worker, waiting for a free one. The
    /// work goes on (and holds its worker) even if the future is dropped.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RandomArchive) -> T + Send + 'static,
    ) -> T {
        let worker = Arc::clone(&self.workers)
            .acquire_owned()
            .await
            .expect("the workers are never closed");
        let archive = Arc::clone(&self.archive);
        let task = tokio::task::spawn_blocking(move || {
            let _worker = worker;
            f(&archive)
        });
        match task.await {
            Ok(v) => v,
            // A panic in the archive code is the request's: the NBD layer
            // answers it EIO.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Runs `f` on the archive in the background if a worker is free now;
    /// otherwise not at all (the workers are busy with reads, which is
    /// all the parallelism there is). For warming ahead of readers.
    pub fn run_if_idle(&self, f: impl FnOnce(&RandomArchive) + Send + 'static) -> bool {
        let Ok(worker) = Arc::clone(&self.workers).try_acquire_owned() else {
            return false;
        };
        let archive = Arc::clone(&self.archive);
        tokio::task::spawn_blocking(move || {
            let _worker = worker;
            f(&archive)
        });
        true
    }
}
