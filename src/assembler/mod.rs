//! The cluster assembler: the NBD backend of every drive export of a live
//! backup. It turns writes of any size, alignment and order (and
//! WRITE_ZEROES/TRIM) into whole 64 KiB clusters, each archived exactly
//! once, and feeds them to the single archive writer thread.
//!
//! # Data path and copies
//!
//! A cluster's bytes are copied at most once inside vma-writer:
//! 1. socket → the WRITE's request buffer (the NBD layer; unavoidable);
//! 2. a write that covers a whole cluster is passed on as a slice of that
//!    buffer (**no copy**); only a write that covers part of a cluster is
//!    copied into the cluster's partial buffer ([`Assembler`] counts these
//!    bytes as `copied_bytes`);
//! 3. the writer thread hands the slices to one vectored `write` (the
//!    kernel's copy), or to zstd, which copies into its window.
//!
//! # Bounds
//!
//! Every request is cancel-safe: it reserves room in the writer channel
//! before it changes any state and never awaits between the change and the
//! send, so a request dropped because its client vanished loses nothing.
//!
//! Partial buffers are limited in total (`partial_limit`); a write that needs
//! a new one waits for room, up to `partial_wait`, then fails with EIO. The
//! channel to the writer is bounded ([`CHANNEL_CLUSTERS`]); a full channel
//! makes the NBD request wait, and the NBD layer then stops reading.
//!
//! # Replays
//!
//! After a reconnect QEMU replays requests. A rewrite of an archived cluster
//! is accepted when its content is identical, and gets EIO otherwise, since
//! the archive cannot represent it. Zero clusters are recognised by a bit
//! per cluster; other clusters are compared by reading the archive back
//! when it is an uncompressed file, else against a 32-bit digest kept per
//! cluster (hashing every cluster costs about 6 % of the server's CPU, so
//! it is only done when there is no archive to read back).

mod coverage;
mod writer_thread;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use self::coverage::Coverage;
use self::writer_thread::{Locations, Msg, Payload};
use crate::nbd::{Backend, BackendCaps, BlockStatus, split_range};
use crate::sink::Sink;
use crate::vma::cluster::{self, clusters_of, stored_len};
use crate::vma::consts::VMA_CLUSTER_SIZE;
use crate::vma::{ClusterBitmap, DevId, Writer, WriterBuilder};

/// Clusters the channel to the writer thread holds (16 MiB of data, as much
/// as QEMU keeps in flight): enough to absorb the pause of one 3.7 MB extent
/// write without stalling QEMU's requests, small enough to keep
/// vma-writer's memory under 64 MiB (measured peak RSS 37–41 MiB).
pub const CHANNEL_CLUSTERS: usize = 256;

/// Default bound on partial-cluster buffers: 1024 clusters. QEMU's backup
/// job needs at most one per drive (the tail of an odd-sized disk); generic
/// clients writing unaligned data need more.
pub const DEFAULT_PARTIAL_LIMIT: usize = 64 << 20;

/// Default time a write waits for partial-buffer room before failing with
/// EIO. Room comes back only when other writes complete clusters, so a
/// client that scatters partial writes everywhere would otherwise wait
/// forever.
pub const DEFAULT_PARTIAL_WAIT: Duration = Duration::from_secs(30);

/// Most clusters one BLOCK_STATUS answer looks at (4 GiB); the client asks
/// again for the rest.
const BLOCK_STATUS_MAX_CLUSTERS: u64 = 65536;

/// Tunables of an [`Assembler`].
#[derive(Debug, Clone)]
pub struct AssemblerConfig {
    /// Bytes of partial-cluster buffers allowed at once.
    pub partial_limit: usize,
    /// How long a write waits for partial-buffer room.
    pub partial_wait: Duration,
}

impl Default for AssemblerConfig {
    fn default() -> Self {
        AssemblerConfig {
            partial_limit: DEFAULT_PARTIAL_LIMIT,
            partial_wait: DEFAULT_PARTIAL_WAIT,
        }
    }
}

/// State every drive shares: the writer channel and the first failure.
pub struct Shared {
    tx: mpsc::Sender<Msg>,
    failed: AtomicBool,
    failure: Mutex<Option<io::Error>>,
    partial_permits: Arc<Semaphore>,
    partial_wait: Duration,
    readback: Option<(File, Arc<Mutex<Locations>>)>,
    changed: watch::Sender<u64>,
    copied_bytes: AtomicU64,
    /// When the first client of any drive connected (the backup's start,
    /// for throughput figures).
    first_connect: std::sync::OnceLock<Instant>,
}

impl Shared {
    fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The first failure, if any, as a fresh io::Error.
    fn failure(&self) -> Option<io::Error> {
        if !self.failed() {
            return None;
        }
        lock(&self.failure).as_ref().map(writer_thread::clone_err)
    }

    /// Records the first failure; later ones are only logged.
    fn fail_with(&self, e: io::Error, what: &str) {
        tracing::error!("{what}: {e}");
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

    fn check(&self) -> io::Result<()> {
        match self.failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn notify(&self) {
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
    async fn reserve(&self) -> io::Result<mpsc::Permit<'_, Msg>> {
        self.check()?;
        self.tx
            .reserve()
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the archive is already closed"))
    }

    async fn flush(&self, sync: bool) -> io::Result<()> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Flush { sync, reply }).await?;
        rx.await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the archive writer stopped"))?
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// 32-bit content digest of an archived cluster, to recognise replays.
fn digest(data: &[u8]) -> u32 {
    xxhash_rust::xxh3::xxh3_64(data) as u32
}

/// What a replayed whole cluster is, compared with the archived one.
enum Replay {
    /// Identical: accept without archiving again.
    Same,
    /// Different: refuse.
    Different,
    /// Only the archive itself can tell: read it back.
    ReadBack,
}

/// What [`Drive::partial_step`] did.
enum Step {
    /// The cluster is archived already.
    Archived,
    /// No partial buffer is free: wait for one.
    NeedRoom,
    /// Copied; the cluster is still incomplete.
    Buffered,
    /// Copied, and the cluster is now complete (drive complete too?).
    Completed(Bytes, bool),
}

struct Partial {
    buf: BytesMut,
    covered: Coverage,
    _permit: OwnedSemaphorePermit,
}

struct DriveState {
    /// Clusters handed to the writer.
    archived: ClusterBitmap,
    /// Archived clusters that are all zeros.
    zero: ClusterBitmap,
    /// Digest per cluster, valid where `archived` is set; kept only when
    /// the archive cannot be read back (compressed or streamed), since
    /// hashing every cluster costs more than reading back a rare replay.
    digests: Vec<u32>,
    partial: HashMap<u64, Partial>,
    bytes_done: u64,
    connections: u32,
    ever_connected: bool,
    /// Set when the last connection closed while clusters were missing.
    idle_since: Option<Instant>,
    /// A FLUSH arrived after the drive became complete.
    flushed_complete: bool,
}

impl DriveState {
    fn new(clusters: u64, keep_digests: bool) -> Self {
        DriveState {
            archived: ClusterBitmap::new(clusters),
            zero: ClusterBitmap::new(clusters),
            digests: if keep_digests {
                vec![0; clusters as usize]
            } else {
                Vec::new()
            },
            partial: HashMap::new(),
            bytes_done: 0,
            connections: 0,
            ever_connected: false,
            idle_since: None,
            flushed_complete: false,
        }
    }

    fn set_archived(&mut self, c: u64, zero: bool, digest: Option<u32>, len: u64) {
        let again = self.archived.set(c);
        debug_assert!(!again, "cluster {c} archived twice");
        if zero {
            self.zero.set(c);
        }
        if let Some(d) = digest {
            self.digests[c as usize] = d;
        }
        self.bytes_done += len;
    }

    /// Every cluster is archived.
    fn complete(&self) -> bool {
        self.archived.is_full()
    }

    /// Compares a replayed whole cluster with the archived one.
    fn replay(&self, c: u64, zero: bool, digest: Option<u32>) -> Replay {
        match (self.zero.get(c), zero) {
            (true, true) => Replay::Same,
            (true, false) | (false, true) => Replay::Different,
            (false, false) => match digest {
                Some(d) if self.digests[c as usize] == d => Replay::Same,
                Some(_) => Replay::Different,
                None => Replay::ReadBack,
            },
        }
    }
}

/// One drive export: implements [`Backend`]; see the module docs.
pub struct Drive {
    dev: DevId,
    name: String,
    size: u64,
    state: Mutex<DriveState>,
    shared: Arc<Shared>,
}

/// A drive's progress, for displays and completion decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveStatus {
    /// Export/device name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// In-device bytes of archived clusters.
    pub done: u64,
    /// Every cluster archived.
    pub complete: bool,
    /// Open NBD connections.
    pub connections: u32,
    /// A client has connected at least once.
    pub ever_connected: bool,
    /// Incomplete with no connection since then.
    pub idle_since: Option<Instant>,
    /// Complete, and its clients have flushed or disconnected.
    pub settled: bool,
}

impl Drive {
    fn cluster_len(&self, c: u64) -> usize {
        cluster::cluster_len(self.size, c)
    }

    /// Export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Current status.
    pub fn status(&self) -> DriveStatus {
        let s = lock(&self.state);
        let complete = s.complete();
        DriveStatus {
            name: self.name.clone(),
            size: self.size,
            done: s.bytes_done,
            complete,
            connections: s.connections,
            ever_connected: s.ever_connected,
            idle_since: s.idle_since,
            settled: complete && s.ever_connected && (s.connections == 0 || s.flushed_complete),
        }
    }

    /// Whether `data` is all zeros, and its digest when digests are kept.
    fn fingerprint(&self, data: &[u8]) -> (bool, Option<u32>) {
        let zero = crate::vma::zero::is_zero(data);
        let keep = self.shared.readback.is_none() && !zero;
        (zero, keep.then(|| digest(data)))
    }

    /// Archives a whole cluster, or checks a replay of one.
    async fn full_cluster(&self, c: u64, payload: Payload) -> io::Result<()> {
        let len = self.cluster_len(c);
        let (zero, d) = match &payload {
            Payload::Data(b) => self.fingerprint(b),
            Payload::Zero => (true, None),
        };
        // Room in the channel first: from the state change to the send
        // nothing may await, so a request dropped mid-way (its client is
        // gone) never leaves a cluster marked archived but not sent.
        let slot = self.shared.reserve().await?;
        let (complete, replay) = {
            let mut s = lock(&self.state);
            if s.archived.get(c) {
                (false, Some(s.replay(c, zero, d)))
            } else {
                // A whole-cluster write supersedes any partial data.
                s.partial.remove(&c);
                s.set_archived(c, zero, d, len as u64);
                (s.complete(), None)
            }
        };
        match replay {
            None => {}
            Some(Replay::Same) => return Ok(()),
            Some(Replay::Different) => return Err(self.rewrite_error(c)),
            Some(Replay::ReadBack) => {
                drop(slot);
                let old = self.read_archived(c).await?;
                let same = match &payload {
                    Payload::Data(b) => old[..] == b[..],
                    Payload::Zero => crate::vma::zero::is_zero(&old),
                };
                return if same {
                    Ok(())
                } else {
                    Err(self.rewrite_error(c))
                };
            }
        }
        slot.send(Msg::Cluster {
            dev: self.dev,
            cluster: c,
            payload,
        });
        if complete {
            tracing::info!(drive = %self.name, "all clusters archived");
            self.shared.notify();
        }
        Ok(())
    }

    fn rewrite_error(&self, c: u64) -> io::Error {
        tracing::error!(
            drive = %self.name,
            cluster = c,
            "rewrite of an archived cluster with different content; the archive cannot represent it"
        );
        io::Error::other(format!(
            "drive {}: cluster {c} was already archived with different content",
            self.name
        ))
    }

    /// Writes part of a cluster (`data`, or zeros when `None`) at `off`.
    async fn partial_piece(
        &self,
        c: u64,
        off: usize,
        len: usize,
        data: Option<Bytes>,
    ) -> io::Result<()> {
        let mut permit: Option<OwnedSemaphorePermit> = None;
        loop {
            // As in full_cluster: channel room before any state change.
            let slot = self.shared.reserve().await?;
            let step = self.partial_step(c, off, len, data.as_deref(), &mut permit);
            match step {
                Step::Archived => {
                    drop(slot);
                    return self
                        .check_archived_range(c, off, len, data.as_deref())
                        .await;
                }
                Step::NeedRoom => {
                    drop(slot);
                    permit = Some(self.wait_for_partial_room().await?);
                }
                Step::Buffered => return Ok(()),
                Step::Completed(buf, complete) => {
                    slot.send(Msg::Cluster {
                        dev: self.dev,
                        cluster: c,
                        payload: Payload::Data(buf),
                    });
                    if complete {
                        tracing::info!(drive = %self.name, "all clusters archived");
                        self.shared.notify();
                    }
                    return Ok(());
                }
            }
        }
    }

    /// The locked part of [`Self::partial_piece`]: never awaits.
    fn partial_step(
        &self,
        c: u64,
        off: usize,
        len: usize,
        data: Option<&[u8]>,
        permit: &mut Option<OwnedSemaphorePermit>,
    ) -> Step {
        let clen = self.cluster_len(c);
        let mut s = lock(&self.state);
        if s.archived.get(c) {
            return Step::Archived;
        }
        if let Entry::Vacant(slot) = s.partial.entry(c) {
            let p = match permit.take() {
                Some(p) => p,
                None => match self.shared.partial_permits.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => return Step::NeedRoom,
                },
            };
            slot.insert(Partial {
                buf: BytesMut::zeroed(clen),
                covered: Coverage::default(),
                _permit: p,
            });
        }
        let p = s.partial.get_mut(&c).expect("inserted above");
        let dst = &mut p.buf[off..off + len];
        match data {
            // The one copy of this path: into the partial buffer.
            Some(b) => dst.copy_from_slice(b),
            None => dst.fill(0),
        }
        self.shared
            .copied_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        p.covered.insert(off as u32, (off + len) as u32);
        if !p.covered.is_full(clen as u32) {
            return Step::Buffered;
        }
        let p = s.partial.remove(&c).expect("present");
        let buf = p.buf.freeze();
        let (zero, d) = self.fingerprint(&buf);
        s.set_archived(c, zero, d, clen as u64);
        Step::Completed(buf, s.complete())
    }

    async fn wait_for_partial_room(&self) -> io::Result<OwnedSemaphorePermit> {
        let sem = self.shared.partial_permits.clone();
        match tokio::time::timeout(self.shared.partial_wait, sem.acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => {
                tracing::error!(
                    drive = %self.name,
                    "partial-cluster buffer limit reached and no cluster completed for {:?}",
                    self.shared.partial_wait
                );
                Err(io::Error::other(
                    "partial-cluster buffer limit reached; raise --buffer-limit or write whole clusters",
                ))
            }
        }
    }

    /// A partial rewrite of an archived cluster: accepted when the bytes
    /// equal what was archived.
    async fn check_archived_range(
        &self,
        c: u64,
        off: usize,
        len: usize,
        data: Option<&[u8]>,
    ) -> io::Result<()> {
        let archived_zero = lock(&self.state).zero.get(c);
        let new_zero = data.is_none_or(crate::vma::zero::is_zero);
        if archived_zero {
            return if new_zero {
                Ok(())
            } else {
                Err(self.rewrite_error(c))
            };
        }
        let old = self.read_archived(c).await?;
        let same = match data {
            Some(d) => old[off..off + len] == *d,
            None => crate::vma::zero::is_zero(&old[off..off + len]),
        };
        if same {
            Ok(())
        } else {
            Err(self.rewrite_error(c))
        }
    }

    /// The in-device bytes of an archived cluster, read back from the file.
    async fn read_archived(&self, c: u64) -> io::Result<Vec<u8>> {
        let clen = self.cluster_len(c);
        let zero = lock(&self.state).zero.get(c);
        if zero {
            return Ok(vec![0; clen]);
        }
        let Some((file, locs)) = &self.shared.readback else {
            tracing::warn!(
                drive = %self.name,
                cluster = c,
                "cannot read an archived cluster: the archive is compressed or not a file"
            );
            return Err(io::Error::other(
                "archived clusters cannot be read back from a compressed or streamed archive",
            ));
        };
        let first = lock(locs).find(self.dev, c);
        let found = match first {
            Some(f) => Some(f),
            None => {
                // Still queued or in the pending extent: write it out.
                self.shared.flush(false).await?;
                lock(locs).find(self.dev, c)
            }
        };
        let (at, mask) =
            found.ok_or_else(|| io::Error::other("archived cluster not found in the archive"))?;
        let mut stored = vec![0u8; stored_len(mask)];
        file.read_exact_at(&mut stored, at)?;
        let mut out = vec![0u8; clen];
        cluster::expand_into(mask, &stored, &mut out);
        Ok(out)
    }

    /// Splits `[offset, offset + len)` into per-cluster pieces
    /// `(cluster, offset in cluster, length)`. The server keeps requests
    /// inside the export, so no piece passes the device end.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> {
        debug_assert!(offset + len <= self.size);
        split_range(offset, len, VMA_CLUSTER_SIZE as u64)
    }

    async fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.shared.check()?;
        for (c, off, n) in self.pieces(offset, len) {
            if off == 0 && n == self.cluster_len(c) {
                self.full_cluster(c, Payload::Zero).await?;
            } else {
                self.partial_piece(c, off, n, None).await?;
            }
        }
        Ok(())
    }
}

impl Backend for Drive {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> BackendCaps {
        BackendCaps {
            read_only: false,
            // One writer serves every connection, so a FLUSH covers all.
            flush_is_global: true,
            fast_zero: true,
            trim: true,
        }
    }

    async fn write(&self, offset: u64, data: Bytes) -> io::Result<()> {
        self.shared.check()?;
        let mut pos = 0usize;
        for (c, off, n) in self.pieces(offset, data.len() as u64) {
            let piece = data.slice(pos..pos + n);
            pos += n;
            if off == 0 && n == self.cluster_len(c) {
                self.full_cluster(c, Payload::Data(piece)).await?;
            } else {
                self.partial_piece(c, off, n, Some(piece)).await?;
            }
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool) -> io::Result<()> {
        // NO_HOLE or not, a zero range is recorded as zero blocks: VMA
        // stores zeros as cleared mask bits either way.
        self.zero_range(offset, len).await
    }

    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        // Trimmed ranges read as zeros and are archived as zero blocks.
        self.zero_range(offset, len).await
    }

    async fn flush(&self) -> io::Result<()> {
        self.shared.flush(true).await?;
        let mut s = lock(&self.state);
        if s.complete() {
            s.flushed_complete = true;
            drop(s);
            self.shared.notify();
        }
        Ok(())
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Bytes> {
        let mut out = BytesMut::zeroed(len as usize);
        let mut pos = 0usize;
        for (c, off, n) in self.pieces(offset, u64::from(len)) {
            let dst = &mut out[pos..pos + n];
            pos += n;
            let archived = {
                let s = lock(&self.state);
                if s.archived.get(c) {
                    true
                } else {
                    if let Some(p) = s.partial.get(&c) {
                        for &(a, b) in p.covered.ranges() {
                            let (a, b) = (a as usize, b as usize);
                            let (lo, hi) = (a.max(off), b.min(off + n));
                            if lo < hi {
                                dst[lo - off..hi - off].copy_from_slice(&p.buf[lo..hi]);
                            }
                        }
                    }
                    false
                }
            };
            if archived {
                let data = self.read_archived(c).await?;
                dst.copy_from_slice(&data[off..off + n]);
            }
        }
        Ok(out.freeze())
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<BlockStatus>> {
        const DATA: u32 = 0;
        const UNWRITTEN: u32 = BlockStatus::HOLE | BlockStatus::ZERO;
        let mut runs: Vec<BlockStatus> = Vec::new();
        let mut push = |len: u64, flags: u32| match runs.last_mut() {
            Some(r) if r.flags == flags => r.len += len,
            _ => runs.push(BlockStatus { len, flags }),
        };
        let s = lock(&self.state);
        for (i, (c, off, n)) in self.pieces(offset, len).enumerate() {
            if i as u64 >= BLOCK_STATUS_MAX_CLUSTERS {
                break;
            }
            if s.archived.get(c) {
                let zero = s.zero.get(c);
                push(n as u64, if zero { BlockStatus::ZERO } else { DATA });
            } else if let Some(p) = s.partial.get(&c) {
                let mut pos = off;
                for &(a, b) in p.covered.ranges() {
                    let (a, b) = ((a as usize).max(off), (b as usize).min(off + n));
                    if a >= b {
                        continue;
                    }
                    if a > pos {
                        push((a - pos) as u64, UNWRITTEN);
                    }
                    push((b - a) as u64, DATA);
                    pos = b;
                }
                if pos < off + n {
                    push((off + n - pos) as u64, UNWRITTEN);
                }
            } else {
                push(n as u64, UNWRITTEN);
            }
        }
        Ok(runs)
    }

    fn connected(&self) {
        self.shared.first_connect.get_or_init(Instant::now);
        let mut s = lock(&self.state);
        s.connections += 1;
        s.ever_connected = true;
        s.idle_since = None;
        drop(s);
        tracing::info!(drive = %self.name, "client connected");
        self.shared.notify();
    }

    fn disconnected(&self, clean: bool) {
        let mut s = lock(&self.state);
        s.connections = s.connections.saturating_sub(1);
        if s.connections == 0 && !s.complete() {
            s.idle_since = Some(Instant::now());
        }
        drop(s);
        tracing::info!(drive = %self.name, clean, "client disconnected");
        self.shared.notify();
    }
}

/// One drive of the archive to assemble.
#[derive(Debug, Clone)]
pub struct DriveSpec {
    /// Device and export name (Proxmox style: `drive-scsi0`).
    pub name: String,
    /// Exact size in bytes (the source's size).
    pub size: u64,
}

/// Totals of a finished archive.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Final path, for a file target.
    pub path: Option<PathBuf>,
    /// Bytes written to the output (before compression).
    pub archive_bytes: u64,
    /// Per drive: name, size, bytes in zero blocks.
    pub drives: Vec<(String, u64, u64)>,
    /// Bytes copied into partial-cluster buffers.
    pub copied_bytes: u64,
}

/// A live archive under assembly: the drives (NBD backends) and the writer
/// thread. Finish it with [`Assembler::finish`] or drop it with
/// [`Assembler::abort`].
pub struct Assembler {
    drives: Vec<Arc<Drive>>,
    shared: Arc<Shared>,
    /// The writer thread; taken when it is stopped.
    thread: Option<JoinHandle<Writer<Sink>>>,
    changed: watch::Receiver<u64>,
}

impl Drop for Assembler {
    fn drop(&mut self) {
        // Dropped without finish/abort: stop the thread without blocking;
        // it drops the sink, which removes the partial file.
        if self.thread.is_some() && self.shared.tx.try_send(Msg::Close).is_err() {
            // The channel is full: wait for room on a thread of its own, so
            // the writer still stops (and its partial file goes) without
            // blocking whoever dropped us.
            let tx = self.shared.tx.clone();
            std::thread::spawn(move || {
                let _ = tx.blocking_send(Msg::Close);
            });
        }
    }
}

impl Assembler {
    /// Writes the archive header to `sink` and starts the writer thread.
    /// `builder` has the configs and devices registered (in `drives` order).
    pub fn start(
        builder: WriterBuilder,
        drives: &[DriveSpec],
        sink: Sink,
        cfg: &AssemblerConfig,
    ) -> io::Result<Assembler> {
        let readback = match (sink.is_plain_file(), sink.partial()) {
            (true, Some(p)) => Some((File::open(p)?, Arc::new(Mutex::new(Locations::default())))),
            _ => None,
        };
        let header = builder.header();
        let writer = builder.start(sink).map_err(io::Error::from)?;
        let (tx, rx) = mpsc::channel(CHANNEL_CLUSTERS);
        let (changed_tx, changed) = watch::channel(0);
        let permits = (cfg.partial_limit / VMA_CLUSTER_SIZE).max(1);
        let shared = Arc::new(Shared {
            tx,
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            partial_permits: Arc::new(Semaphore::new(permits)),
            partial_wait: cfg.partial_wait,
            readback,
            changed: changed_tx,
            copied_bytes: AtomicU64::new(0),
            first_connect: std::sync::OnceLock::new(),
        });
        let locations = shared.readback.as_ref().map(|(_, l)| l.clone());
        let thread = writer_thread::spawn(writer, rx, shared.clone(), locations)?;
        let drives = drives
            .iter()
            .zip(&header.devices)
            .map(|(d, dev)| {
                Arc::new(Drive {
                    dev: dev.id,
                    name: d.name.clone(),
                    size: d.size,
                    state: Mutex::new(DriveState::new(
                        clusters_of(d.size),
                        shared.readback.is_none(),
                    )),
                    shared: shared.clone(),
                })
            })
            .collect();
        Ok(Assembler {
            drives,
            shared,
            thread: Some(thread),
            changed,
        })
    }

    /// The drive backends, in registration order.
    pub fn drives(&self) -> &[Arc<Drive>] {
        &self.drives
    }

    /// Status of every drive.
    pub fn status(&self) -> Vec<DriveStatus> {
        self.drives.iter().map(|d| d.status()).collect()
    }

    /// The first failure of the archive writer, if any.
    pub fn failure(&self) -> Option<io::Error> {
        self.shared.failure()
    }

    /// Bytes copied into partial-cluster buffers so far.
    pub fn copied_bytes(&self) -> u64 {
        self.shared.copied_bytes.load(Ordering::Relaxed)
    }

    /// When the first client connected, if one has.
    pub fn first_connect(&self) -> Option<Instant> {
        self.shared.first_connect.get().copied()
    }

    /// A receiver that changes whenever a drive connects, disconnects,
    /// completes or flushes, or the writer fails.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.clone()
    }

    /// Stops the writer thread after what is queued and returns the writer.
    /// Blocking: call from a blocking context.
    fn stop_thread(&mut self) -> Writer<Sink> {
        // The drives hold senders too, so the channel never closes by
        // itself. Blocks while the channel is full, which the thread drains.
        let _ = self.shared.tx.blocking_send(Msg::Close);
        let thread = self.thread.take().expect("writer thread already stopped");
        thread.join().expect("archive writer thread panicked")
    }

    /// Completes the archive: every drive must be complete. Writes the last
    /// extent, fsyncs, renames `ARCHIVE.partial` to `ARCHIVE`, fsyncs the
    /// directory.
    pub async fn finish(self) -> io::Result<Summary> {
        if let Some(e) = self.failure() {
            self.abort().await;
            return Err(e);
        }
        let incomplete: Vec<String> = self
            .status()
            .iter()
            .filter(|s| !s.complete)
            .map(|s| {
                format!(
                    "{} ({} of {} bytes missing)",
                    s.name,
                    s.size - s.done,
                    s.size
                )
            })
            .collect();
        if !incomplete.is_empty() {
            self.abort().await;
            return Err(io::Error::other(format!(
                "drives incomplete: {}",
                incomplete.join(", ")
            )));
        }
        let mut this = self;
        tokio::task::spawn_blocking(move || {
            let writer = this.stop_thread();
            let shared = this.shared.clone();
            if let Some(e) = shared.failure() {
                return Err(e);
            }
            let stats = writer.stats();
            let sink = writer.finish().map_err(io::Error::from)?;
            // Counted after the last extent, before compression.
            let archive_bytes = sink.written();
            let path = sink.commit()?;
            Ok(Summary {
                path,
                archive_bytes,
                drives: stats
                    .into_iter()
                    .map(|s| (s.name, s.size, s.zero_bytes))
                    .collect(),
                copied_bytes: shared.copied_bytes.load(Ordering::Relaxed),
            })
        })
        .await
        .map_err(|e| io::Error::other(format!("archive finishing task failed: {e}")))?
    }

    /// Makes every request in progress or to come fail with `reason`:
    /// writes waiting for partial-buffer room give up at once, so a server
    /// shutting down does not wait for them.
    pub fn fail(&self, reason: &str) {
        self.shared
            .fail_with(io::Error::other("backup aborted"), reason);
        self.shared.partial_permits.close();
    }

    /// Abandons the archive: the partial file is removed (or kept, as the
    /// sink was configured) and nothing appears at the final name.
    pub async fn abort(mut self) {
        let _ = tokio::task::spawn_blocking(move || drop(self.stop_thread())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::{SinkOptions, Target};
    use crate::vma::Reader;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    fn start(dir: &std::path::Path, sizes: &[u64], cfg: AssemblerConfig) -> (Assembler, PathBuf) {
        start_with(dir, sizes, cfg, SinkOptions::default())
    }

    fn start_with(
        dir: &std::path::Path,
        sizes: &[u64],
        cfg: AssemblerConfig,
        opts: SinkOptions,
    ) -> (Assembler, PathBuf) {
        let path = dir.join("a.vma");
        let mut b = WriterBuilder::new();
        let specs: Vec<DriveSpec> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| DriveSpec {
                name: format!("drive-scsi{i}"),
                size,
            })
            .collect();
        for d in &specs {
            b.add_device(&d.name, d.size).unwrap();
        }
        let sink = Sink::create(&Target::File(path.clone()), &opts).unwrap();
        (Assembler::start(b, &specs, sink, &cfg).unwrap(), path)
    }

    fn read_back(path: &std::path::Path) -> Vec<Vec<u8>> {
        let mut r = Reader::new(File::open(path).unwrap()).unwrap();
        let mut disks: Vec<Vec<u8>> = r
            .header()
            .devices
            .iter()
            .map(|d| vec![0xEE; d.size as usize])
            .collect();
        while let Some(ext) = r.next_extent().unwrap() {
            for c in ext.clusters() {
                let at = c.device_offset() as usize;
                c.expand_into(&mut disks[c.dev.0 as usize - 1][at..at + c.len]);
            }
        }
        disks
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn any_order_any_alignment_restores_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let size0 = 10 * 65536 + 1536;
        let (asm, path) = start(dir.path(), &[size0, 3 * 65536], AssemblerConfig::default());
        let d0 = asm.drives()[0].clone();
        let d1 = asm.drives()[1].clone();
        let src0 = pattern(size0 as usize, 7);
        let mut expect0 = src0.clone();
        // Whole clusters, out of order, 2 clusters at once.
        d0.write(
            4 * 65536,
            Bytes::copy_from_slice(&src0[4 * 65536..6 * 65536]),
        )
        .await
        .unwrap();
        // Zeros first, then unaligned overlapping data over part of them:
        // the later write wins inside a cluster that is not complete yet.
        d0.write_zeroes(5000, 3000, false).await.unwrap();
        d0.write(100, Bytes::copy_from_slice(&src0[100..6000]))
            .await
            .unwrap();
        expect0[6000..8000].fill(0);
        d0.write(8000, Bytes::copy_from_slice(&src0[8000..70000]))
            .await
            .unwrap();
        d0.write(0, Bytes::copy_from_slice(&src0[0..200]))
            .await
            .unwrap();
        d0.write(69000, Bytes::copy_from_slice(&src0[69000..4 * 65536]))
            .await
            .unwrap();
        // Whole zero clusters, then the unaligned tail of the device.
        d0.write_zeroes(6 * 65536, 2 * 65536, false).await.unwrap();
        expect0[6 * 65536..8 * 65536].fill(0);
        d0.write(
            8 * 65536 + 7,
            Bytes::copy_from_slice(&src0[8 * 65536 + 7..]),
        )
        .await
        .unwrap();
        d0.write(
            8 * 65536,
            Bytes::copy_from_slice(&src0[8 * 65536..8 * 65536 + 7]),
        )
        .await
        .unwrap();
        assert!(asm.copied_bytes() > 0);
        // Replays: identical whole clusters and partial pieces are accepted.
        d0.write(
            4 * 65536,
            Bytes::copy_from_slice(&src0[4 * 65536..5 * 65536]),
        )
        .await
        .unwrap();
        d0.write(
            4 * 65536 + 10,
            Bytes::copy_from_slice(&src0[4 * 65536 + 10..4 * 65536 + 20]),
        )
        .await
        .unwrap();
        // A different rewrite is refused.
        assert!(
            d0.write(4 * 65536, Bytes::from(vec![1u8; 65536]))
                .await
                .is_err()
        );
        assert!(
            d0.write(4 * 65536 + 5, Bytes::from(vec![1u8; 1]))
                .await
                .is_err()
        );
        // Reads see archived data (read back from the file) and holes.
        let r = d0.read(65536 - 10, 20).await.unwrap();
        assert_eq!(&r[..], &expect0[65526..65546]);
        // The last cluster, shorter than its straddling block, too.
        let r = d0.read(10 * 65536, 1536).await.unwrap();
        assert_eq!(&r[..], &expect0[10 * 65536..]);
        assert!(!asm.status()[1].complete);
        let r = d1.read(0, 100).await.unwrap();
        assert!(r.iter().all(|&b| b == 0));
        d1.write(65536 + 3, Bytes::from_static(b"abc"))
            .await
            .unwrap();
        let r = d1.read(65536, 8).await.unwrap();
        assert_eq!(&r[..], b"\0\0\0abc\0\0");
        let bs = d1.block_status(65536, 65536).await.unwrap();
        assert_eq!(
            bs,
            vec![
                BlockStatus { len: 3, flags: 3 },
                BlockStatus { len: 3, flags: 0 },
                BlockStatus {
                    len: 65530,
                    flags: 3
                }
            ]
        );
        d1.trim(0, 3 * 65536).await.unwrap();
        assert!(asm.status().iter().all(|s| s.complete));
        let summary = asm.finish().await.unwrap();
        assert_eq!(summary.path.as_deref(), Some(path.as_path()));
        let disks = read_back(&path);
        assert_eq!(disks[0], expect0);
        assert_eq!(disks[1], vec![0u8; 3 * 65536]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abort_leaves_no_archive() {
        let dir = tempfile::tempdir().unwrap();
        let (asm, path) = start(dir.path(), &[65536 * 4], AssemblerConfig::default());
        asm.drives()[0]
            .write(0, Bytes::from(vec![5u8; 65536]))
            .await
            .unwrap();
        assert!(asm.status()[0].done == 65536);
        asm.abort().await;
        assert!(!path.exists());
        assert!(!crate::sink::partial_path(&path).exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finish_refuses_incomplete_drives() {
        let dir = tempfile::tempdir().unwrap();
        let (asm, path) = start(dir.path(), &[65536 * 4], AssemblerConfig::default());
        asm.drives()[0]
            .write(0, Bytes::from(vec![5u8; 65536]))
            .await
            .unwrap();
        let err = asm.finish().await.unwrap_err();
        assert!(
            err.to_string()
                .contains("drive-scsi0 (196608 of 262144 bytes missing)"),
            "{err}"
        );
        assert!(!path.exists() && !crate::sink::partial_path(&path).exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partial_buffers_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AssemblerConfig {
            partial_limit: 65536,
            partial_wait: Duration::from_millis(50),
        };
        let (asm, _path) = start(dir.path(), &[65536 * 4], cfg);
        let d = asm.drives()[0].clone();
        d.write(10, Bytes::from_static(b"x")).await.unwrap();
        let err = d
            .write(65536 + 10, Bytes::from_static(b"y"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("buffer limit"), "{err}");
        // Completing the first cluster frees its buffer for the next one.
        d.write(0, Bytes::from(vec![1u8; 65536])).await.unwrap();
        d.write(65536 + 10, Bytes::from_static(b"y")).await.unwrap();
        asm.abort().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replays_are_checked_by_digest_when_the_archive_is_compressed() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SinkOptions {
            zstd_level: Some(1),
            ..Default::default()
        };
        let (asm, path) = start_with(dir.path(), &[2 * 65536], AssemblerConfig::default(), opts);
        let d = asm.drives()[0].clone();
        let data = Bytes::from(pattern(65536, 3));
        d.write(0, data.clone()).await.unwrap();
        d.write_zeroes(65536, 65536, false).await.unwrap();
        // Identical replays pass on the digest and the zero mark.
        d.write(0, data.clone()).await.unwrap();
        d.write(65536, Bytes::from(vec![0u8; 65536])).await.unwrap();
        // Different content is refused; reading archived data is impossible.
        assert!(d.write(0, Bytes::from(pattern(65536, 4))).await.is_err());
        assert!(d.write(65536, data.clone()).await.is_err());
        assert!(d.read(0, 10).await.is_err());
        assert_eq!(&d.read(65536, 10).await.unwrap()[..], &[0u8; 10]);
        asm.finish().await.unwrap();
        let plain = zstd::decode_all(File::open(&path).unwrap()).unwrap();
        let unpacked = dir.path().join("plain.vma");
        std::fs::write(&unpacked, plain).unwrap();
        let disks = read_back(&unpacked);
        assert_eq!(&disks[0][..65536], &data[..]);
        assert!(disks[0][65536..].iter().all(|&b| b == 0));
    }
}
