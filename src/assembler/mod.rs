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
//! the archive cannot represent it; such a conflict (a second writer, or a
//! client that changed data it had sent) also fails the backup. Zero clusters are recognised by a bit
//! per cluster; other clusters are compared by reading the archive back
//! when it is an uncompressed file, else against a 32-bit digest kept per
//! cluster (hashing every cluster costs about 6 % of the server's CPU, so
//! it is only done when there is no archive to read back).
//!
//! # Layout
//!
//! - this file: [`Assembler`]: starts the writer thread and the drives,
//!   reports their status, and finishes or abandons the archive.
//! - `drive`: [`Drive`], one export's [`Backend`](crate::nbd::Backend):
//!   partial clusters, replays, reads and BLOCK_STATUS.
//! - `shared`: what the drives and the writer thread share: the channel and
//!   its messages, the first failure, the partial-buffer pool, counters.
//! - `writer_thread`: the one thread that owns the [`Writer`].
//! - `fill`: an incremental drive's missing clusters copied from its base
//!   archive ([`Assembler::fill_from_base`]).
//! - `readback`: where archived clusters lie in an uncompressed archive
//!   file, and reading them back.
//! - `coverage`: which bytes of a partial cluster have been written.
//!
//! Cluster geometry and masks belong to [`crate::vma::cluster`]; nothing
//! here does arithmetic on mask bits.

mod coverage;
mod drive;
mod fill;
mod readback;
mod shared;
mod writer_thread;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

pub use self::drive::{Drive, DriveStatus};
pub use self::fill::{FILL_READ_AHEAD, FillError, FillStats};
use self::readback::ReadBack;
use self::shared::Shared;
use crate::archive::RandomArchive;
use crate::sink::Sink;
use crate::vma::consts::VMA_CLUSTER_SIZE;
use crate::vma::{DevId, DeviceChain, Writer, WriterBuilder};

/// Clusters the channel to the writer thread holds, for all drives
/// together (4 MiB of data): a little more than one extent, enough to
/// keep the writer busy while it writes one. Requests waiting for room hold
/// their data in the NBD server's memory budget meanwhile, which is the
/// real buffer; data in the channel (and in the extent being assembled) is
/// outside that budget, so the channel is kept small. 256 clusters cost
/// 12 MiB more peak RSS in an 8-drive backup and gained no throughput
/// (`bench/memory.sh`).
pub const CHANNEL_CLUSTERS: usize = 64;

/// Default bound on partial-cluster buffers: 1024 clusters. QEMU's backup
/// job needs at most one per drive (the tail of an odd-sized disk); generic
/// clients writing unaligned data need more.
pub const DEFAULT_PARTIAL_LIMIT: usize = 64 << 20;

/// Default time a write waits for partial-buffer room before failing with
/// EIO. Room comes back only when other writes complete clusters, so a
/// client that scatters partial writes everywhere would otherwise wait
/// forever.
pub const DEFAULT_PARTIAL_WAIT: Duration = Duration::from_secs(30);

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

/// One drive of the archive to assemble.
#[derive(Debug, Clone)]
pub struct DriveSpec {
    /// Device and export name (Proxmox style: `drive-scsi0`).
    pub name: String,
    /// Exact size in bytes (the source's size).
    pub size: u64,
    /// Its place in a backup chain, recorded in the index. With
    /// `from_base`, the client sends only the clusters that changed and
    /// [`Assembler::fill_from_base`] copies the rest (`base_bytes` is
    /// counted then; give 0).
    pub chain: DeviceChain,
}

impl DriveSpec {
    /// A drive outside any backup chain.
    pub fn new(name: impl Into<String>, size: u64) -> DriveSpec {
        DriveSpec {
            name: name.into(),
            size,
            chain: DeviceChain::default(),
        }
    }
}

/// One drive of a finished archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveSummary {
    /// Its name.
    pub name: String,
    /// Its size.
    pub size: u64,
    /// In-device bytes of its zero blocks (not stored).
    pub zero_bytes: u64,
    /// Bytes a client sent (the rest came from the base).
    pub received_bytes: u64,
    /// Bytes copied from a base archive.
    pub base_bytes: u64,
}

/// Totals of a finished archive.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Final path, for a file target.
    pub path: Option<PathBuf>,
    /// Bytes written to the output (before compression).
    pub archive_bytes: u64,
    /// Per drive, in archive order.
    pub drives: Vec<DriveSummary>,
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
        // Even when the channel is full, the writer still stops (and its
        // partial file goes) without blocking whoever dropped us.
        if self.thread.is_some() {
            self.shared.close_in_background();
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
            (true, Some(p)) => Some(Arc::new(ReadBack::open(p)?)),
            _ => None,
        };
        let header = builder.header();
        let builder = builder.index(sink.can_hold_index());
        let writer = builder.start(sink).map_err(io::Error::from)?;
        let (tx, rx) = mpsc::channel(CHANNEL_CLUSTERS);
        let (changed_tx, changed) = watch::channel(0);
        let permits = (cfg.partial_limit / VMA_CLUSTER_SIZE).max(1);
        let shared = Arc::new(Shared::new(tx, changed_tx, permits, cfg.partial_wait));
        let thread = writer_thread::spawn(writer, rx, shared.clone(), readback.clone())?;
        let drives = drives
            .iter()
            .zip(&header.devices)
            .map(|(d, dev)| {
                Arc::new(Drive::new(
                    dev.id,
                    d.name.clone(),
                    d.size,
                    d.chain,
                    shared.clone(),
                    readback.clone(),
                ))
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

    /// Says that no client will connect any more (the backup jobs ended
    /// and their targets are gone): incremental drives then await their
    /// base ([`DriveStatus::awaits_base`]) instead of a reconnect.
    pub fn clients_done(&self) {
        for d in &self.drives {
            d.clients_done();
        }
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
        self.shared.copied_bytes()
    }

    /// When the first client connected, if one has.
    pub fn first_connect(&self) -> Option<Instant> {
        self.shared.first_connect()
    }

    /// Copies every cluster drive `i` lacks from device `base_dev` of
    /// `base`, through the writer channel (see the `fill` module). Call it
    /// once the drive's client has gone ([`DriveStatus::awaits_base`]).
    pub async fn fill_from_base(
        &self,
        i: usize,
        base: &Arc<RandomArchive>,
        base_dev: DevId,
    ) -> Result<FillStats, FillError> {
        fill::fill(&self.drives[i], base, base_dev).await
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
        self.shared.close_blocking();
        let thread = self.thread.take().expect("writer thread already stopped");
        thread.join().expect("archive writer thread panicked")
    }

    /// Completes the archive: every drive must be complete. Writes the last
    /// extent, fsyncs, renames `ARCHIVE.partial` to `ARCHIVE`, fsyncs the
    /// directory.
    ///
    /// Setting `interrupt` before the archive is sealed abandons it
    /// instead: the result is an [`io::ErrorKind::Interrupted`] error and
    /// nothing appears at the final name.
    pub async fn finish(self, interrupt: Arc<AtomicBool>) -> io::Result<Summary> {
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
            let mut writer = this.stop_thread();
            let shared = this.shared.clone();
            if let Some(e) = shared.failure() {
                return Err(e);
            }
            let chains: Vec<DeviceChain> = this.drives.iter().map(|d| d.chain()).collect();
            for (d, chain) in this.drives.iter().zip(&chains) {
                writer.set_device_chain(d.dev(), *chain);
            }
            let stats = writer.stats();
            let (sink, index) = writer.finish_indexed().map_err(io::Error::from)?;
            // Counted after the last extent, before compression.
            let archive_bytes = sink.written();
            let sealed = sink.seal(index.as_deref())?;
            if interrupt.load(Ordering::SeqCst) {
                // Dropping the sealed archive removes its partial files.
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "stopped before the archive was made final",
                ));
            }
            let path = sealed.publish()?;
            Ok(Summary {
                path,
                archive_bytes,
                drives: stats
                    .into_iter()
                    .zip(chains)
                    .map(|(s, chain)| DriveSummary {
                        name: s.name,
                        size: s.size,
                        zero_bytes: s.zero_bytes,
                        received_bytes: s.size - chain.base_bytes,
                        base_bytes: chain.base_bytes,
                    })
                    .collect(),
                copied_bytes: shared.copied_bytes(),
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
        self.shared.close_partial_room();
    }

    /// Abandons the archive: the partial file is removed (or kept, as the
    /// sink was configured) and nothing appears at the final name.
    pub async fn abort(mut self) {
        let _ = tokio::task::spawn_blocking(move || drop(self.stop_thread())).await;
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use bytes::Bytes;

    use super::*;
    use crate::nbd::{Backend, BlockStatus};
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
            .map(|(i, &size)| DriveSpec::new(format!("drive-scsi{i}"), size))
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
        let summary = asm.finish(Arc::default()).await.unwrap();
        assert_eq!(summary.path.as_deref(), Some(path.as_path()));
        let disks = read_back(&path);
        assert_eq!(disks[0], expect0);
        assert_eq!(disks[1], vec![0u8; 3 * 65536]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_conflicting_rewrite_fails_the_backup() {
        for whole in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (asm, _path) = one_of_four_written(dir.path()).await;
            let d = asm.drives()[0].clone();
            // Identical replays are fine, whole or in part.
            d.write(0, Bytes::from(vec![5u8; 65536])).await.unwrap();
            d.write(10, Bytes::from(vec![5u8; 7])).await.unwrap();
            assert!(asm.failure().is_none());
            let err = if whole {
                d.write(0, Bytes::from(vec![6u8; 65536])).await
            } else {
                d.write(5, Bytes::from(vec![6u8; 1])).await
            }
            .unwrap_err();
            assert!(
                err.to_string().contains("cluster 0 was written again"),
                "{err}"
            );
            let failure = asm.failure().expect("the backup failed").to_string();
            assert!(
                failure.contains("conflicting writes: drive drive-scsi0: cluster 0"),
                "{failure}"
            );
            // Later writes fail too, and the archive cannot be finished.
            assert!(d.write(65536, Bytes::from(vec![7u8; 65536])).await.is_err());
            assert!(asm.finish(Arc::default()).await.is_err());
        }
    }

    /// One drive of 4 clusters, the first of them written.
    async fn one_of_four_written(dir: &std::path::Path) -> (Assembler, PathBuf) {
        let (asm, path) = start(dir, &[65536 * 4], AssemblerConfig::default());
        asm.drives()[0]
            .write(0, Bytes::from(vec![5u8; 65536]))
            .await
            .unwrap();
        (asm, path)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abort_leaves_no_archive() {
        let dir = tempfile::tempdir().unwrap();
        let (asm, path) = one_of_four_written(dir.path()).await;
        assert!(asm.status()[0].done == 65536);
        asm.abort().await;
        assert!(!path.exists());
        assert!(!crate::sink::partial_path(&path).exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finish_refuses_incomplete_drives() {
        let dir = tempfile::tempdir().unwrap();
        let (asm, path) = one_of_four_written(dir.path()).await;
        let err = asm.finish(Arc::default()).await.unwrap_err();
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

    /// Writes a one-drive archive at `path` through an assembler whose
    /// drive has `chain`: `writes` are (cluster, content) pairs written
    /// whole by a client that then disconnects; with a base, the rest is
    /// filled from device 1 of it. Returns the summary.
    async fn chain_archive(
        path: &std::path::Path,
        size: u64,
        chain: crate::vma::DeviceChain,
        writes: &[(u64, Vec<u8>)],
        base: Option<&std::path::Path>,
        zstd: bool,
    ) -> Result<Summary, FillError> {
        let mut b = WriterBuilder::new();
        let spec = DriveSpec {
            chain,
            ..DriveSpec::new("drive-scsi0", size)
        };
        b.add_device(&spec.name, size).unwrap();
        let opts = SinkOptions {
            zstd_level: zstd.then_some(1),
            threads: 1,
            ..Default::default()
        };
        let sink = Sink::create(&Target::File(path.to_path_buf()), &opts).unwrap();
        let asm = Assembler::start(b, &[spec], sink, &AssemblerConfig::default()).unwrap();
        let d = asm.drives()[0].clone();
        d.connected();
        for (c, data) in writes {
            d.write(c * 65536, Bytes::from(data.clone())).await.unwrap();
        }
        d.disconnected(true);
        if let Some(base) = base {
            let st = &asm.status()[0];
            assert!(!st.awaits_base && st.idle_since.is_some(), "{st:?}");
            asm.clients_done();
            let st = &asm.status()[0];
            assert!(st.awaits_base && st.idle_since.is_none(), "{st:?}");
            // A plain base is read through a mapping, as a backup does.
            let base = RandomArchive::open(base.to_str().unwrap()).unwrap();
            let base = Arc::new(base.mapped());
            match asm.fill_from_base(0, &base, DevId(1)).await {
                Ok(stats) => {
                    let sent: u64 = writes.iter().map(|(_, w)| w.len() as u64).sum();
                    assert_eq!(stats.bytes, size - sent);
                }
                Err(e) => {
                    asm.abort().await;
                    return Err(e);
                }
            }
        }
        assert!(asm.status()[0].complete);
        Ok(asm.finish(Arc::default()).await.unwrap())
    }

    /// Clusters of a 130-cluster drive with a 1000-byte tail: data, some
    /// all zero, one with only its last block set.
    fn generation(size: u64, seed: u8) -> Vec<(u64, Vec<u8>)> {
        (0..crate::vma::cluster::clusters_of(size))
            .map(|c| {
                let len = crate::vma::cluster::cluster_len(size, c);
                let data = match c % 5 {
                    0 => vec![0; len],
                    1 => {
                        let mut v = vec![0; len];
                        v[len - 1] = seed;
                        v
                    }
                    _ => pattern(len, seed.wrapping_add(c as u8)),
                };
                (c, data)
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cluster_written_in_part_fails_the_fill() {
        use crate::vma::DeviceChain;
        let size = 8 * 65536;
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vma");
        let full = DeviceChain {
            bitmap: true,
            ..Default::default()
        };
        chain_archive(&base, size, full, &generation(size, 1), None, false)
            .await
            .unwrap();
        let incremental = DeviceChain {
            bitmap: true,
            from_base: true,
            base_bytes: 0,
        };
        let new = dir.path().join("new.vma");
        let part = [(5u64, vec![7u8; 4096])];
        let err = chain_archive(&new, size, incremental, &part, Some(&base), false)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("cluster 5 was written only in part"),
            "{err}"
        );
        assert!(!new.exists(), "a failed fill leaves no archive");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_incremental_drive_is_filled_from_its_base() {
        use crate::vma::DeviceChain;
        let size = 130 * 65536 + 1000;
        for zstd in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let base = dir
                .path()
                .join(if zstd { "base.vma.zst" } else { "base.vma" });
            let old = generation(size, 1);
            let full = DeviceChain {
                bitmap: true,
                ..Default::default()
            };
            chain_archive(&base, size, full, &old, None, zstd)
                .await
                .unwrap();
            // QEMU sends three changed clusters, the tail among them.
            let mut expect = old.clone();
            let changed = [3u64, 50, 130];
            let sent: Vec<(u64, Vec<u8>)> = changed
                .iter()
                .map(|&c| (c, pattern(expect[c as usize].1.len(), 99)))
                .collect();
            for (c, data) in &sent {
                expect[*c as usize].1 = data.clone();
            }
            let new = dir.path().join("new.vma");
            let incremental = DeviceChain {
                bitmap: true,
                from_base: true,
                base_bytes: 0,
            };
            let summary = chain_archive(&new, size, incremental, &sent, Some(&base), false)
                .await
                .unwrap();
            let received = 2 * 65536 + 1000;
            assert_eq!(summary.drives[0].received_bytes, received);
            assert_eq!(summary.drives[0].base_bytes, size - received);
            let disk: Vec<u8> = expect.into_iter().flat_map(|(_, d)| d).collect();
            assert_eq!(read_back(&new)[0], disk);
            // The index records the chain and has every digest.
            let ra = RandomArchive::open(new.to_str().unwrap()).unwrap();
            assert!(ra.has_digests());
            let chain = ra.index().device(DevId(1)).unwrap().chain;
            assert_eq!(
                chain,
                DeviceChain {
                    base_bytes: size - received,
                    ..incremental
                }
            );
            for c in 0..131 {
                ra.read_cluster(DevId(1), c).unwrap();
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_base_cluster_fails_the_fill() {
        let size = 130 * 65536 + 1000;
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vma");
        let chain = crate::vma::DeviceChain::default();
        chain_archive(&base, size, chain, &generation(size, 1), None, false)
            .await
            .unwrap();
        // Flip a byte of cluster 7's payload.
        let at = {
            let ra = RandomArchive::open(base.to_str().unwrap()).unwrap();
            ra.index().locate(DevId(1), 7).unwrap().stream_offset
        };
        let mut bytes = std::fs::read(&base).unwrap();
        bytes[at as usize + 100] ^= 1;
        std::fs::write(&base, bytes).unwrap();
        let new = dir.path().join("new.vma");
        let incremental = crate::vma::DeviceChain {
            from_base: true,
            ..Default::default()
        };
        let e = chain_archive(&new, size, incremental, &[], Some(&base), false)
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("cluster 7: the data does not match its digest"),
            "{e}"
        );
        assert!(!new.exists() && !crate::sink::partial_path(&new).exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn identical_replays_leave_a_compressed_archive_correct() {
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
        // Replays accepted on the digest and the zero mark change nothing.
        d.write(0, data.clone()).await.unwrap();
        d.write(65536, Bytes::from(vec![0u8; 65536])).await.unwrap();
        asm.finish(Arc::default()).await.unwrap();
        let plain = zstd::decode_all(File::open(&path).unwrap()).unwrap();
        let unpacked = dir.path().join("plain.vma");
        std::fs::write(&unpacked, plain).unwrap();
        let disks = read_back(&unpacked);
        assert_eq!(&disks[0][..65536], &data[..]);
        assert!(disks[0][65536..].iter().all(|&b| b == 0));
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
        // Reading archived data back is impossible when compressed.
        assert!(d.read(0, 10).await.is_err());
        assert_eq!(&d.read(65536, 10).await.unwrap()[..], &[0u8; 10]);
        // Different content is refused (and fails the backup), whether the
        // digest or the zero mark tells.
        assert!(d.write(65536, data.clone()).await.is_err());
        assert!(d.write(0, Bytes::from(pattern(65536, 4))).await.is_err());
        assert!(asm.finish(Arc::default()).await.is_err());
        assert!(!path.exists());
    }
}
