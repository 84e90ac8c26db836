//! The live-backup target: one NBD export per drive in front of one
//! [`Assembler`], and the rules that decide when the archive is final and
//! when the backup has failed. Used by `serve`, `backup`, `create` (for
//! non-raw images) and `demo`; knows nothing of QMP.
//!
//! The archive is final when every drive is complete and each drive's
//! clients have flushed or disconnected. An incremental drive (its
//! [`DriveSpec::chain`] says `from_base`) is ready once its client has
//! gone: the caller then copies the rest from the base
//! ([`BackupTarget::fill_from_base`]). The backup fails ([`Failure`]) when
//! the archive writer fails, when a drive's last client leaves with clusters
//! missing and none reconnects within the reconnect timeout, or when the
//! caller stops it (signals). Starting and finishing report an [`Error`].
//!
//! Leaves to others: the NBD protocol ([`crate::nbd`]), cluster assembly
//! ([`crate::assembler`]), the output file ([`crate::sink`]), and who
//! drives the clients (QEMU over QMP in [`crate::backup`], or anyone for
//! `serve`).

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::archive::RandomArchive;
use crate::assembler::{
    Assembler, AssemblerConfig, Drive, DriveSpec, DriveStatus, FillError, FillStats, Summary,
};
use crate::nbd::{Export, ListenAddr, Listener, Server, ServerConfig, Tls};
use crate::sink::{Sink, SinkOptions, Target};
use crate::vma::{DevId, FormatError, WriterBuilder};

/// Default time a drive may stay incomplete with no client connected (after
/// one was connected) before the backup fails. QEMU reconnects within its
/// `reconnect-delay`, a few seconds at most when it is set at all.
pub const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes in flight per NBD connection of a backup target (payloads and
/// requests until their replies are written). QEMU keeps at most 16
/// requests of 1 MiB in flight, so 32 MiB never throttles it; the memory of
/// the whole backup is bounded by [`DEFAULT_MEMORY_BUDGET`] instead, which
/// does not grow with the number of drives.
pub const TARGET_BYTES_IN_FLIGHT: usize = 32 << 20;

/// Default budget for the WRITE payloads of all drives of a backup target
/// together, from the socket until the assembler has taken them
/// ([`crate::nbd::MemoryBudget`], shared fairly by the drives; `--memory`).
/// 24 MiB is more than one drive at full speed needs (QEMU keeps 16 ×
/// 1 MiB in flight), so one drive alone is never throttled, and with the
/// writer channel ([`crate::assembler::CHANNEL_CLUSTERS`]), the extent
/// being assembled and idle buffers it keeps an 8-drive backup at full
/// speed under 64 MiB peak RSS (measured by `bench/memory.sh`).
pub const DEFAULT_MEMORY_BUDGET: usize = 24 << 20;

/// Smallest `--memory`: one cluster. Less works (every WRITE then runs
/// alone) but only makes the backup crawl.
pub const MIN_MEMORY_BUDGET: usize = 64 << 10;

/// Largest `--memory`: the budget counts bytes in a semaphore of `u32`
/// permits.
pub const MAX_MEMORY_BUDGET: usize = (4 << 30) - (1 << 20);

/// Everything needed to start a target.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// Where to listen.
    pub listen: ListenAddr,
    /// The drives, in archive order.
    pub drives: Vec<DriveSpec>,
    /// Config blobs: (file name, content).
    pub configs: Vec<(String, Vec<u8>)>,
    /// Archive destination.
    pub output: Target,
    /// Plain or zstd, keep-partial.
    pub sink: SinkOptions,
    /// Assembler bounds.
    pub assembler: AssemblerConfig,
    /// Clusters per extent (Proxmox: 58).
    pub clusters_per_extent: usize,
    /// A fixed archive uuid (reproducible archives); random if `None`.
    pub uuid: Option<uuid::Uuid>,
    /// A fixed creation time (Unix seconds); now if `None`.
    pub ctime: Option<i64>,
    /// See [`DEFAULT_RECONNECT_TIMEOUT`].
    pub reconnect_timeout: Duration,
    /// NBD server limits; give it a [`ServerConfig::memory`] budget (see
    /// [`DEFAULT_MEMORY_BUDGET`]), or memory grows with the drives.
    pub server: ServerConfig,
    /// STARTTLS offered or required, when set.
    pub tls: Option<Tls>,
}

/// Why a target could not start or finish its archive.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The archive layout is invalid, e.g. clusters per extent out of range.
    #[error(transparent)]
    Layout(FormatError),
    /// A config blob cannot go into the archive (name, size, count).
    #[error("config {name}")]
    Config {
        /// The config's file name.
        name: String,
        /// What is wrong with it.
        source: FormatError,
    },
    /// A drive cannot go into the archive (name, size, count).
    #[error("drive {name}")]
    Drive {
        /// The drive's name.
        name: String,
        /// What is wrong with it.
        source: FormatError,
    },
    /// The NBD listener cannot be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address asked for.
        addr: ListenAddr,
        /// Why binding failed.
        source: io::Error,
    },
    /// The bound listener cannot tell its address.
    #[error("cannot read the address of the listener on {addr}")]
    LocalAddr {
        /// The address asked for.
        addr: ListenAddr,
        /// Why.
        source: io::Error,
    },
    /// The archive file (or stdout stream) cannot be created.
    #[error("cannot create the archive")]
    CreateArchive(#[source] io::Error),
    /// The archive writer cannot start (e.g. writing the header failed).
    #[error("cannot start the archive writer")]
    StartWriter(#[source] io::Error),
    /// The last extent, fsync or rename failed, or a drive is incomplete.
    #[error("cannot finish the archive")]
    Finish(#[source] io::Error),
    /// The archive was made final, but what followed failed (renaming its
    /// index, syncing the directory): the archive is complete and in place.
    #[error("the archive was made final, but its commit did not complete")]
    Published(#[source] io::Error),
    /// A stop request arrived while the archive was being finished, before
    /// it was made final: it was abandoned.
    #[error("stopped while the archive was being finished; it was not made final")]
    Stopped,
}

/// Why a target's backup cannot complete any more ([`WaitOutcome::Failed`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The archive writer failed (write error, disk full, broken pipe...);
    /// its message.
    #[error("{0}")]
    Writer(String),
    /// A drive's last client left with data missing and none reconnected
    /// in time.
    #[error(
        "the client of drive {} disconnected with {} of {} bytes missing and did not reconnect within {timeout:?}",
        drive.name,
        drive.missing,
        drive.size
    )]
    ClientGone {
        /// The drive and what it lacks.
        drive: IncompleteDrive,
        /// The reconnect timeout that passed.
        timeout: Duration,
    },
    /// The assembler's state channel closed (its writer is gone).
    #[error("archive state lost")]
    StateLost,
}

/// A drive that is missing data when a backup ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncompleteDrive {
    /// The drive's name in the archive.
    pub name: String,
    /// Bytes not yet written.
    pub missing: u64,
    /// The drive's size.
    pub size: u64,
}

impl fmt::Display for IncompleteDrive {
    /// "drive-scsi0: 1048576 of 4194304 bytes missing".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} of {} bytes missing",
            self.name, self.missing, self.size
        )
    }
}

impl IncompleteDrive {
    /// The drive `s` describes, as incomplete.
    fn of(s: &DriveStatus) -> IncompleteDrive {
        IncompleteDrive {
            name: s.name.clone(),
            missing: s.size - s.done,
            size: s.size,
        }
    }
}

/// The drives of `status` that are not complete.
pub fn incomplete_drives(status: &[DriveStatus]) -> Vec<IncompleteDrive> {
    status
        .iter()
        .filter(|s| !s.complete)
        .map(IncompleteDrive::of)
        .collect()
}

/// How [`BackupTarget::wait`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Every drive is complete and settled, or incremental and awaiting
    /// its base ([`DriveStatus::awaits_base`]): fill those
    /// ([`BackupTarget::fill_from_base`]), then [`BackupTarget::finish`].
    Settled,
    /// The backup cannot complete.
    Failed(Failure),
    /// The caller's stop future fired (e.g. SIGTERM).
    Stopped,
}

/// A running target; see the module docs.
pub struct BackupTarget {
    assembler: Assembler,
    addr: ListenAddr,
    cancel: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
    reconnect_timeout: Duration,
    started: Instant,
}

/// What a finished backup reports.
#[derive(Debug, Clone)]
pub struct Report {
    /// The assembler's totals.
    pub summary: Summary,
    /// Sum of drive sizes.
    pub bytes: u64,
    /// Bytes in zero blocks.
    pub zero_bytes: u64,
    /// From the first client's connection to the final rename.
    pub duration: Duration,
}

impl Report {
    /// Drive bytes per second, in MB/s (10^6).
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.duration.as_secs_f64().max(1e-9)
    }
}

impl BackupTarget {
    /// Creates the archive (header written), binds the listener and starts
    /// serving the drive exports.
    pub async fn start(cfg: TargetConfig) -> Result<BackupTarget, Error> {
        let mut builder = WriterBuilder::new()
            .clusters_per_extent(cfg.clusters_per_extent)
            .map_err(Error::Layout)?;
        if let Some(uuid) = cfg.uuid {
            builder = builder.uuid(uuid);
        }
        if let Some(ctime) = cfg.ctime {
            builder = builder.ctime(ctime);
        }
        for (name, data) in &cfg.configs {
            builder
                .add_config(name, data)
                .map_err(|source| Error::Config {
                    name: name.clone(),
                    source,
                })?;
        }
        for d in &cfg.drives {
            builder
                .add_device(&d.name, d.size)
                .map_err(|source| Error::Drive {
                    name: d.name.clone(),
                    source,
                })?;
        }
        let listener = Listener::bind(&cfg.listen).map_err(|source| Error::Listen {
            addr: cfg.listen.clone(),
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| Error::LocalAddr {
            addr: cfg.listen.clone(),
            source,
        })?;
        let mut sink_opts = cfg.sink.clone();
        let drive_bytes = cfg.drives.iter().map(|d| d.size).sum();
        sink_opts.size_bound = Some(crate::object::upload::archive_bound(drive_bytes));
        let sink = Sink::create(&cfg.output, &sink_opts).map_err(Error::CreateArchive)?;
        let assembler = Assembler::start(builder, &cfg.drives, sink, &cfg.assembler)
            .map_err(Error::StartWriter)?;
        let exports = assembler
            .drives()
            .iter()
            .map(|d: &Arc<Drive>| Export {
                name: d.name().to_string(),
                description: format!("vma-writer backup target for {}", d.name()),
                backend: d.clone(),
            })
            .collect();
        let server = Server::new(exports, cfg.server.clone()).with_tls(cfg.tls.clone());
        let cancel = CancellationToken::new();
        let server = tokio::spawn(server.run(listener, cancel.clone()));
        Ok(BackupTarget {
            assembler,
            addr,
            cancel,
            server,
            reconnect_timeout: cfg.reconnect_timeout,
            started: Instant::now(),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// Says that no client will connect any more; see
    /// [`Assembler::clients_done`].
    pub fn clients_done(&self) {
        self.assembler.clients_done();
    }

    /// Per-drive status.
    pub fn status(&self) -> Vec<DriveStatus> {
        self.assembler.status()
    }

    /// Bytes copied into partial-cluster buffers so far.
    pub fn copied_bytes(&self) -> u64 {
        self.assembler.copied_bytes()
    }

    /// Waits until the archive can be finished, the backup has failed, or
    /// `stop` fires.
    pub async fn wait(&self, stop: impl Future<Output = ()>) -> WaitOutcome {
        let mut changed = self.assembler.watch();
        tokio::pin!(stop);
        loop {
            if let Some(e) = self.assembler.failure() {
                return WaitOutcome::Failed(Failure::Writer(e.to_string()));
            }
            let status = self.assembler.status();
            if status.iter().all(|s| s.settled || s.awaits_base) {
                return WaitOutcome::Settled;
            }
            let now = Instant::now();
            let mut next_deadline: Option<Instant> = None;
            for s in &status {
                if let Some(since) = s.idle_since {
                    let deadline = since + self.reconnect_timeout;
                    if deadline <= now {
                        return WaitOutcome::Failed(Failure::ClientGone {
                            drive: IncompleteDrive::of(s),
                            timeout: self.reconnect_timeout,
                        });
                    }
                    next_deadline = Some(next_deadline.map_or(deadline, |d| d.min(deadline)));
                }
            }
            let sleep = tokio::time::sleep_until(
                next_deadline
                    .unwrap_or(now + Duration::from_secs(3600))
                    .into(),
            );
            tokio::select! {
                _ = &mut stop => return WaitOutcome::Stopped,
                r = changed.changed() => if r.is_err() { return WaitOutcome::Failed(Failure::StateLost) },
                _ = sleep => {}
            }
        }
    }

    /// Copies every cluster drive `i` lacks from device `base_dev` of
    /// `base` (see [`Assembler::fill_from_base`]).
    pub async fn fill_from_base(
        &self,
        i: usize,
        base: &Arc<RandomArchive>,
        base_dev: DevId,
    ) -> Result<FillStats, FillError> {
        self.assembler.fill_from_base(i, base, base_dev).await
    }

    async fn stop_server(&mut self) {
        self.cancel.cancel();
        match (&mut self.server).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("NBD server ended with an error: {e}"),
            Err(e) => tracing::warn!("NBD server task failed: {e}"),
        }
    }

    /// Stops serving and completes the archive (last extent, fsync,
    /// rename). When `stop` completes before the archive is sealed (a
    /// signal during the commit), the archive is abandoned instead:
    /// [`Error::Stopped`], nothing at the final name.
    pub async fn finish(mut self, stop: impl Future<Output = ()>) -> Result<Report, Error> {
        self.stop_server().await;
        // Throughput counts from the first client, not from when we started
        // waiting for one.
        let started = self.assembler.first_connect().unwrap_or(self.started);
        let interrupt = Arc::new(AtomicBool::new(false));
        let finish = self.assembler.finish(interrupt.clone());
        tokio::pin!(finish);
        tokio::pin!(stop);
        let finished = tokio::select! {
            r = &mut finish => r,
            () = &mut stop => {
                interrupt.store(true, Ordering::SeqCst);
                finish.await
            }
        };
        let summary = finished.map_err(|e| match e.kind() {
            io::ErrorKind::Interrupted => Error::Stopped,
            _ if crate::sink::is_published(&e) => Error::Published(e),
            _ => Error::Finish(e),
        })?;
        let bytes = summary.drives.iter().map(|d| d.size).sum();
        let zero_bytes = summary.drives.iter().map(|d| d.zero_bytes).sum();
        Ok(Report {
            summary,
            bytes,
            zero_bytes,
            duration: started.elapsed(),
        })
    }

    /// Stops serving and abandons the archive; returns the drives it
    /// leaves incomplete.
    pub async fn abort(mut self) -> Vec<IncompleteDrive> {
        // Fail pending requests first, so the server's shutdown does not
        // wait for writes blocked on buffer room.
        self.assembler.fail("the backup was abandoned");
        self.stop_server().await;
        let missing = incomplete_drives(&self.assembler.status());
        self.assembler.abort().await;
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, size: u64, done: u64) -> DriveStatus {
        DriveStatus {
            name: name.into(),
            size,
            done,
            complete: done == size,
            connections: 0,
            ever_connected: true,
            idle_since: None,
            settled: false,
            base_bytes: 0,
            awaits_base: false,
        }
    }

    #[test]
    fn incomplete_drives_as_data() {
        let missing = incomplete_drives(&[status("a", 4096, 4096), status("b", 4096, 1024)]);
        assert_eq!(
            missing,
            [IncompleteDrive {
                name: "b".into(),
                missing: 3072,
                size: 4096
            }]
        );
        assert_eq!(missing[0].to_string(), "b: 3072 of 4096 bytes missing");
        let gone = Failure::ClientGone {
            drive: missing[0].clone(),
            timeout: Duration::from_secs(30),
        };
        assert_eq!(
            gone.to_string(),
            "the client of drive b disconnected with 3072 of 4096 bytes missing and did not \
             reconnect within 30s"
        );
    }
}
