//! One drive export of a live backup: the [`Backend`] that turns NBD
//! writes of any size, alignment and order (and WRITE_ZEROES/TRIM) into
//! whole 64 KiB clusters, each handed to the writer thread exactly once.
//! It buffers the partial clusters, recognises replays of archived ones
//! (the rules are in the `assembler` module docs) and answers reads and
//! BLOCK_STATUS from what it has. Cluster geometry comes from
//! [`crate::vma::cluster`]; the channel and failure state from `shared`.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::OwnedSemaphorePermit;

use super::coverage::Coverage;
use super::readback::ReadBack;
use super::shared::{Msg, NoRoom, Payload, Shared, lock};
use crate::nbd::{Backend, BackendCaps, BlockStatus, split_range};
use crate::vma::cluster::{self, clusters_of};
use crate::vma::consts::VMA_CLUSTER_SIZE;
use crate::vma::index::Digest;
use crate::vma::{ClusterBitmap, DevId, DeviceChain};

/// Most clusters one BLOCK_STATUS answer looks at (4 GiB); the client asks
/// again for the rest.
const BLOCK_STATUS_MAX_CLUSTERS: u64 = 65536;

/// 32-bit content digest of an archived cluster, to recognise replays.
fn digest(data: &[u8]) -> u32 {
    twox_hash::XxHash3_64::oneshot(data) as u32
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
    /// Of `bytes_done`, the bytes copied from a base archive.
    base_bytes: u64,
    connections: u32,
    ever_connected: bool,
    /// Set when the last connection closed while clusters were missing.
    idle_since: Option<Instant>,
    /// A FLUSH arrived after the drive became complete.
    flushed_complete: bool,
    /// No client will come any more ([`Drive::clients_done`]).
    clients_done: bool,
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
            base_bytes: 0,
            connections: 0,
            ever_connected: false,
            idle_since: None,
            flushed_complete: false,
            clients_done: false,
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
    /// Its place in a backup chain; with `from_base` the client sends only
    /// the clusters that changed and the rest is filled from the base.
    chain: DeviceChain,
    state: Mutex<DriveState>,
    shared: Arc<Shared>,
    /// The archive file to read archived clusters from, when it is one.
    readback: Option<Arc<ReadBack>>,
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
    /// Of `done`, the bytes copied from a base archive.
    pub base_bytes: u64,
    /// An incremental drive whose client has come and gone: the clusters
    /// still missing are to be copied from the base.
    pub awaits_base: bool,
}

impl Drive {
    /// The export of device `dev` of `size` bytes; nothing archived yet.
    pub(super) fn new(
        dev: DevId,
        name: String,
        size: u64,
        chain: DeviceChain,
        shared: Arc<Shared>,
        readback: Option<Arc<ReadBack>>,
    ) -> Self {
        // Digests stand in for the archive only when it cannot be read.
        let state = DriveState::new(clusters_of(size), readback.is_none());
        Drive {
            dev,
            name,
            size,
            chain,
            state: Mutex::new(state),
            shared,
            readback,
        }
    }

    fn cluster_len(&self, c: u64) -> usize {
        cluster::cluster_len(self.size, c)
    }

    /// Export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device id in the archive.
    pub fn dev(&self) -> DevId {
        self.dev
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its chain facts, with the bytes copied from the base so far.
    pub fn chain(&self) -> DeviceChain {
        DeviceChain {
            base_bytes: lock(&self.state).base_bytes,
            ..self.chain
        }
    }

    /// Current status.
    pub fn status(&self) -> DriveStatus {
        let s = lock(&self.state);
        let complete = s.complete();
        let gone = s.ever_connected && s.connections == 0;
        // An incremental drive waits for its base only once no client
        // will come: until then a client that left may be reconnecting
        // (QEMU's job still runs), and is awaited like any other.
        let awaits_base = self.chain.from_base && !complete && gone && s.clients_done;
        DriveStatus {
            name: self.name.clone(),
            size: self.size,
            done: s.bytes_done,
            complete,
            connections: s.connections,
            ever_connected: s.ever_connected,
            idle_since: if awaits_base { None } else { s.idle_since },
            settled: complete && s.ever_connected && (s.connections == 0 || s.flushed_complete),
            base_bytes: s.base_bytes,
            awaits_base,
        }
    }

    /// Says that no client will connect any more (QEMU's job ended and
    /// its target is gone): an incremental drive's missing clusters are
    /// then the base's to fill ([`DriveStatus::awaits_base`]).
    pub(super) fn clients_done(&self) {
        lock(&self.state).clients_done = true;
        self.shared.notify();
    }

    /// Which clusters are archived now.
    pub(super) fn archived(&self) -> ClusterBitmap {
        lock(&self.state).archived.clone()
    }

    /// Archives cluster `c` as the base archive stores it (`mask`,
    /// `stored`, `digest`), unless a client archived it meanwhile (then
    /// the client's copy, the newer, stays).
    pub(super) async fn put_from_base(
        &self,
        c: u64,
        mask: u16,
        stored: Bytes,
        digest: Option<Digest>,
    ) -> io::Result<()> {
        let len = self.cluster_len(c) as u64;
        // As in full_cluster: room in the channel before the state changes.
        let slot = self.shared.reserve().await?;
        let complete = {
            let mut s = lock(&self.state);
            if s.archived.get(c) {
                return Ok(());
            }
            if s.partial.contains_key(&c) {
                // A client wrote part of this cluster and never the rest
                // (QEMU writes whole clusters): neither its bytes alone nor
                // the base's are the cluster at the backup's point in time.
                return Err(io::Error::other(format!(
                    "drive {}: cluster {c} was written only in part by the client; \
                     an incremental backup takes whole clusters from QEMU",
                    self.name
                )));
            }
            s.set_archived(c, mask == 0, None, len);
            s.base_bytes += len;
            s.complete()
        };
        slot.send(Msg::StoredCluster {
            dev: self.dev,
            cluster: c,
            mask,
            stored,
            digest,
        });
        if complete {
            tracing::info!(drive = %self.name, "all clusters archived (filled from the base)");
            self.shared.notify();
        }
        Ok(())
    }

    /// Whether `data` is all zeros, and its digest when digests are kept.
    fn fingerprint(&self, data: &[u8]) -> (bool, Option<u32>) {
        let zero = crate::vma::zero::is_zero(data);
        let keep = self.readback.is_none() && !zero;
        (zero, keep.then(|| digest(data)))
    }

    /// Archives a whole cluster whose [`fingerprint`](Self::fingerprint)
    /// is `(zero, d)` (all zeros: `(true, None)`), or checks a replay of
    /// one.
    async fn full_cluster(
        &self,
        c: u64,
        payload: Payload,
        (zero, d): (bool, Option<u32>),
    ) -> io::Result<()> {
        let len = self.cluster_len(c);
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

    /// A rewrite of archived cluster `c` with different content: the
    /// request fails with EIO, and so does the backup. Two writers (or a
    /// client that changed data it had already sent) mean the archive
    /// cannot be trusted to hold one point in time, and which content is
    /// right cannot be told; an identical replay (a reconnect) is fine.
    fn rewrite_error(&self, c: u64) -> io::Error {
        let msg = format!(
            "drive {}: cluster {c} was written again with different content after it was archived \
             (a second writer, or a client that changed data it had already sent)",
            self.name
        );
        tracing::error!(drive = %self.name, cluster = c, "{msg}; failing the backup");
        self.shared
            .fail_with(io::Error::other(msg.clone()), "conflicting writes");
        self.shared.close_partial_room();
        io::Error::other(msg)
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
                None => match self.shared.try_partial_room() {
                    Some(p) => p,
                    None => return Step::NeedRoom,
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
        self.shared.add_copied(len);
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
        match self.shared.partial_room().await {
            Ok(p) => Ok(p),
            // Shutting down: the backup's own failure says why.
            Err(NoRoom::Closed) => Err(self
                .shared
                .check()
                .err()
                .unwrap_or_else(|| io::Error::other("the backup was abandoned"))),
            Err(NoRoom::TimedOut) => {
                tracing::error!(
                    drive = %self.name,
                    "partial-cluster buffer limit reached and no cluster completed for {:?}",
                    self.shared.partial_wait()
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
        let Some(readback) = &self.readback else {
            tracing::warn!(
                drive = %self.name,
                cluster = c,
                "cannot read an archived cluster: the archive is compressed or not a file"
            );
            return Err(io::Error::other(
                "archived clusters cannot be read back from a compressed or streamed archive",
            ));
        };
        let found = match readback.find(self.dev, c) {
            Some(f) => Some(f),
            None => {
                // Still queued or in the pending extent: write it out.
                self.shared.flush(false).await?;
                readback.find(self.dev, c)
            }
        };
        let (at, mask) =
            found.ok_or_else(|| io::Error::other("archived cluster not found in the archive"))?;
        readback.read(at, mask, clen)
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
                self.full_cluster(c, Payload::Zero, (true, None)).await?;
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
        // The whole clusters' fingerprints (zero scan, digest) first:
        // work that must not hold up other drives' writes waiting for the
        // turn below.
        let mut pos = 0usize;
        let pieces: Vec<_> = self
            .pieces(offset, data.len() as u64)
            .map(|(c, off, n)| {
                let piece = data.slice(pos..pos + n);
                pos += n;
                let whole = off == 0 && n == self.cluster_len(c);
                let print = whole.then(|| self.fingerprint(&piece));
                (c, off, n, piece, print)
            })
            .collect();
        // Whole clusters are sent in one turn (see Shared::send_turn).
        let mut turn = None;
        for (c, off, n, piece, print) in pieces {
            if let Some(print) = print {
                if turn.is_none() {
                    turn = Some(self.shared.send_turn().await);
                }
                self.full_cluster(c, Payload::Data(piece), print).await?;
            } else {
                turn = None; // never held while waiting for partial room
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
        self.shared.connected();
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
        // Incomplete: a reconnect is awaited (an incremental drive stops
        // awaiting one once the caller says no client will come).
        if s.connections == 0 && !s.complete() {
            s.idle_since = Some(Instant::now());
        }
        drop(s);
        tracing::info!(drive = %self.name, clean, "client disconnected");
        self.shared.notify();
    }
}
