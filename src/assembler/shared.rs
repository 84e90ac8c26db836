//! What every drive export and the writer thread share: the bounded channel
//! to the writer thread and the messages it carries, the archive's first
//! failure, the pool of partial-cluster buffers, the change notifications
//! and the counters of the summary. It owns no cluster data and does no IO.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use crate::vma::DevId;
use crate::vma::index::Digest;

/// A cluster's content on its way to the archive.
#[derive(Debug)]
pub enum Payload {
    /// The cluster's in-device bytes; a slice of the client's WRITE buffer
    /// when the write covered the whole cluster (no copy), else the
    /// assembled partial buffer.
    Data(Bytes),
    /// An all-zero cluster (mask 0, no payload).
    Zero,
}

/// What the drive exports ask of the writer thread.
pub enum Msg {
    /// Archive one cluster (the exports guarantee each cluster once).
    Cluster {
        /// Device.
        dev: DevId,
        /// Cluster number.
        cluster: u64,
        /// Its content.
        payload: Payload,
    },
    /// Archive one cluster as another archive stores it (an incremental
    /// drive's cluster copied from its base).
    StoredCluster {
        /// Device.
        dev: DevId,
        /// Cluster number.
        cluster: u64,
        /// Its stored-block mask.
        mask: u16,
        /// Its stored blocks.
        stored: Bytes,
        /// The digest of its restored bytes, when the base has one.
        digest: Option<Digest>,
    },
    /// Write out the pending extent; with `sync`, also fdatasync.
    Flush {
        /// fdatasync after writing.
        sync: bool,
        /// Gets the outcome.
        reply: oneshot::Sender<io::Result<()>>,
    },
    /// Stop and hand the writer back (to finish or drop it).
    Close,
}

/// Why [`Shared::partial_room`] gave no buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    /// None came free within the wait.
    TimedOut,
    /// The backup is being abandoned ([`Shared::close_partial_room`]).
    Closed,
}

/// State every drive shares: the writer channel and the first failure.
pub struct Shared {
    tx: mpsc::Sender<Msg>,
    failed: AtomicBool,
    failure: Mutex<Option<io::Error>>,
    /// One permit per cluster-sized partial buffer allowed at once.
    partial_permits: Arc<Semaphore>,
    /// How long a write waits for a partial buffer.
    partial_wait: Duration,
    changed: watch::Sender<u64>,
    copied_bytes: AtomicU64,
    /// When the first client of any drive connected (the backup's start,
    /// for throughput figures).
    first_connect: OnceLock<Instant>,
    /// Taken by a write while it sends its whole clusters, so they reach
    /// the channel one after another instead of interleaved with other
    /// writes' clusters (see [`Shared::send_turn`]).
    turn: tokio::sync::Mutex<()>,
}

impl Shared {
    /// State around the sending end of the writer channel; `changed` is
    /// bumped on every change a status display cares about.
    pub fn new(
        tx: mpsc::Sender<Msg>,
        changed: watch::Sender<u64>,
        partial_buffers: usize,
        partial_wait: Duration,
    ) -> Self {
        Shared {
            tx,
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            partial_permits: Arc::new(Semaphore::new(partial_buffers)),
            partial_wait,
            changed,
            copied_bytes: AtomicU64::new(0),
            first_connect: OnceLock::new(),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// True once the archive failed.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The first failure, if any, as a fresh io::Error.
    pub fn failure(&self) -> Option<io::Error> {
        if !self.failed() {
            return None;
        }
        lock(&self.failure).as_ref().map(clone_err)
    }

    /// Records the first failure; later ones are only logged. The first
    /// reaches the user as the backup's failure, so it is not logged above
    /// debug level (one message per failure).
    pub fn fail_with(&self, e: io::Error, what: &str) {
        tracing::debug!("{what}: {e}");
        let mut f = lock(&self.failure);
        if f.is_none() {
            // EFBIG (a file size limit) is "no space" to an NBD client.
            let e = if e.raw_os_error() == Some(libc::EFBIG) {
                io::Error::new(io::ErrorKind::StorageFull, format!("{what}: {e}"))
            } else {
                io::Error::new(e.kind(), format!("{what}: {e}"))
            };
            *f = Some(e);
            self.failed.store(true, Ordering::Release);
        }
        drop(f);
        self.notify();
    }

    /// The first failure as an error, or Ok.
    pub fn check(&self) -> io::Result<()> {
        match self.failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Tells the status watchers that something changed.
    pub fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    async fn send(&self, msg: Msg) -> io::Result<()> {
        self.tx.send(msg).await.map_err(|_| {
            io::Error::new(io::ErrorKind::BrokenPipe, "the archive is already closed")
        })?;
        self.check()
    }

    /// A guaranteed place in the channel to the writer (waits while it is
    /// full: back-pressure). Fails once the archive failed or closed.
    pub async fn reserve(&self) -> io::Result<mpsc::Permit<'_, Msg>> {
        self.check()?;
        self.tx
            .reserve()
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the archive is already closed"))
    }

    /// The turn to send whole clusters: a write holds it while it sends a
    /// run of them (not while it waits for partial-buffer room), so one
    /// write's clusters lie together in the channel and in the extents.
    /// That bounds what the archive stage keeps alive: a cluster is a
    /// slice of its WRITE's buffer, which lives until its last cluster is
    /// written out, so interleaved writes would each keep a whole buffer
    /// alive per cluster queued or in the pending extent. First come,
    /// first served (tokio's mutex is fair).
    pub async fn send_turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.turn.lock().await
    }

    /// Has the writer thread write out its pending extent (and fdatasync
    /// with `sync`); returns when it has.
    pub async fn flush(&self, sync: bool) -> io::Result<()> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Flush { sync, reply }).await?;
        rx.await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the archive writer stopped"))?
    }

    /// Asks the writer thread to stop after what is queued. Blocks while
    /// the channel is full, which the thread drains.
    pub fn close_blocking(&self) {
        let _ = self.tx.blocking_send(Msg::Close);
    }

    /// [`close_blocking`](Self::close_blocking) without blocking the
    /// caller: when the channel is full, a thread of its own waits for room,
    /// so the writer still stops.
    pub fn close_in_background(&self) {
        if self.tx.try_send(Msg::Close).is_err() {
            let tx = self.tx.clone();
            std::thread::spawn(move || {
                let _ = tx.blocking_send(Msg::Close);
            });
        }
    }

    /// A partial buffer's permit if one is free now.
    pub fn try_partial_room(&self) -> Option<OwnedSemaphorePermit> {
        self.partial_permits.clone().try_acquire_owned().ok()
    }

    /// Waits up to the partial wait for a partial buffer's permit; `None`
    /// when none came back in time or the pool was closed.
    pub async fn partial_room(&self) -> Result<OwnedSemaphorePermit, NoRoom> {
        let sem = self.partial_permits.clone();
        match tokio::time::timeout(self.partial_wait, sem.acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(NoRoom::Closed),
            Err(_) => Err(NoRoom::TimedOut),
        }
    }

    /// How long [`partial_room`](Self::partial_room) waits.
    pub fn partial_wait(&self) -> Duration {
        self.partial_wait
    }

    /// Makes every wait for a partial buffer give up at once.
    pub fn close_partial_room(&self) {
        self.partial_permits.close();
    }

    /// Counts bytes copied into a partial buffer.
    pub fn add_copied(&self, n: usize) {
        self.copied_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes copied into partial buffers so far.
    pub fn copied_bytes(&self) -> u64 {
        self.copied_bytes.load(Ordering::Relaxed)
    }

    /// Notes a client connection; the first one starts the clock.
    pub fn connected(&self) {
        self.first_connect.get_or_init(Instant::now);
    }

    /// When the first client of any drive connected, if one has.
    pub fn first_connect(&self) -> Option<Instant> {
        self.first_connect.get().copied()
    }
}

/// Locks `m`; a mutex poisoned by a thread that panicked is used as it is.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// io::Error is not Clone; keep kind, errno and text.
pub fn clone_err(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}
