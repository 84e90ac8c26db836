//! What every drive of one export shares: the archive, the threads its
//! reads run on, and the bound on read data held in memory.
//!
//! Reading an archive may block (`pread` from disk, zstd decompression), so
//! that never runs on a tokio worker: a READ whose bytes are all in memory
//! already (file pages in the page cache, frames in the frame cache) is
//! answered in place; every other READ, and every CACHE and read-ahead,
//! runs on tokio's blocking pool, at most `workers` at once. That also bounds the
//! frames being decompressed besides those the frame cache holds. The data
//! of every READ holds permits from one budget ([`READ_BUDGET`] bytes by
//! default) shared by all connections, from before it is read until its
//! reply is on the wire, so the export's memory stays bounded however many
//! clients read at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::debug;

use crate::archive::{ArchiveError, RandomArchive};
use crate::pool::{BufferPool, PooledBuf};
use crate::vma::DevId;
use crate::vma::consts::VMA_CLUSTER_SIZE;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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
    /// Frame loads under way, by frame: a READ that needs one awaits it
    /// here (no thread waits), and no frame is decompressed twice at once.
    /// The receiver's channel closes when the load ends.
    loading: Arc<Mutex<HashMap<u32, watch::Receiver<()>>>>,
}

/// The end of a frame load; see [`Reads::start_load`].
struct LoadDone {
    loading: Arc<Mutex<HashMap<u32, watch::Receiver<()>>>>,
    frame: u32,
    /// Dropped after `drop` has removed the entry: that wakes the waiters.
    _tx: watch::Sender<()>,
}

impl Drop for LoadDone {
    fn drop(&mut self) {
        lock(&self.loading).remove(&self.frame);
    }
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
            loading: Arc::default(),
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
        // Data already in memory is read here, on the async worker: a
        // hand-off to a blocking thread and back costs more than the copy.
        // Frames not decompressed yet are loaded on workers (several at
        // once when a READ spans several) and awaited, then read here.
        let mut cached = self.archive.read_into_if_cached(dev, offset, &mut buf)?;
        if !cached {
            let cluster = VMA_CLUSTER_SIZE as u64;
            let clusters = offset / cluster..(offset + len as u64).div_ceil(cluster);
            let frames = self.archive.frames_holding(dev, clusters, u64::MAX);
            if !frames.is_empty() {
                self.load_frames(&frames).await;
                cached = self.archive.read_into_if_cached(dev, offset, &mut buf)?;
            }
        }
        if cached {
            return Ok(Bytes::from_owner(ReadBuf {
                buf,
                _permit: permit,
            }));
        }
        // Not in memory: file pages to read from disk, or a frame pushed
        // out of the cache again meanwhile.
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

    /// Waits until each of `frames` is decompressed (or its load failed:
    /// the read that follows reports the error), starting the loads that
    /// are not under way, each on a worker as one becomes free.
    async fn load_frames(&self, frames: &[u32]) {
        let mut waits = Vec::with_capacity(frames.len());
        for &frame in frames {
            if self.archive.frame_loaded(frame) {
                continue;
            }
            if let Some(rx) = self.loading_of(frame) {
                waits.push(rx);
                continue;
            }
            let worker = Arc::clone(&self.workers)
                .acquire_owned()
                .await
                .expect("the workers are never closed");
            waits.push(self.start_load(frame, worker));
        }
        for mut rx in waits {
            // Ends with an error when the loader drops its sender: done.
            while rx.changed().await.is_ok() {}
        }
    }

    /// Starts loading `frame`s of `frames` on free workers, in order,
    /// until none is free: read-ahead. Returns how many it started.
    pub fn load_ahead(&self, frames: &[u32]) -> usize {
        let mut started = 0;
        for &frame in frames {
            if self.archive.frame_loaded(frame) || self.loading_of(frame).is_some() {
                continue;
            }
            let Ok(worker) = Arc::clone(&self.workers).try_acquire_owned() else {
                break;
            };
            self.start_load(frame, worker);
            started += 1;
        }
        started
    }

    /// The load of `frame` under way, if any.
    fn loading_of(&self, frame: u32) -> Option<watch::Receiver<()>> {
        lock(&self.loading).get(&frame).cloned()
    }

    /// Loads `frame` on `worker` unless a load of it is under way already;
    /// either way, returns that load's receiver.
    fn start_load(&self, frame: u32, worker: OwnedSemaphorePermit) -> watch::Receiver<()> {
        let tx = {
            let mut loading = lock(&self.loading);
            if let Some(rx) = loading.get(&frame) {
                return rx.clone();
            }
            let (tx, rx) = watch::channel(());
            loading.insert(frame, rx.clone());
            (tx, rx)
        };
        let (tx, rx) = tx;
        let archive = Arc::clone(&self.archive);
        let loading = Arc::clone(&self.loading);
        tokio::task::spawn_blocking(move || {
            // Ends the load (even by a panic): forgotten, then its waiters
            // woken by the sender's drop.
            let _done = LoadDone {
                loading,
                frame,
                _tx: tx,
            };
            let _worker = worker;
            if let Err(e) = archive.load_frame(frame) {
                // The READ that needs it gets its own error.
                debug!(frame, error = %e, "frame load failed");
            }
        });
        rx
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
