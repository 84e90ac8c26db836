//! The live-backup target: one NBD export per drive in front of one
//! [`Assembler`], and the rules that decide when the archive is final and
//! when the backup has failed. Used by `serve`, `backup`, `create` (for
//! non-raw images) and `demo`; knows nothing of QMP.
//!
//! The archive is final when every drive is complete and each drive's
//! clients have flushed or disconnected. The backup fails when the archive
//! writer fails, when a drive's last client leaves with clusters missing and
//! none reconnects within the reconnect timeout, or when the caller stops it
//! (signals).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::assembler::{Assembler, AssemblerConfig, Drive, DriveSpec, DriveStatus, Summary};
use crate::nbd::{Export, ListenAddr, Listener, Server, ServerConfig};
use crate::sink::{Sink, SinkOptions, Target};
use crate::vma::WriterBuilder;

/// Default time a drive may stay incomplete with no client connected (after
/// one was connected) before the backup fails. QEMU reconnects within its
/// `reconnect-delay`, a few seconds at most when it is set at all.
pub const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes in flight per NBD connection of a backup target. QEMU keeps at
/// most 16 requests of 1 MiB in flight, so 32 MiB never throttles it, and it
/// keeps vma-writer's peak memory (payloads + writer queue + partial
/// buffers) under 64 MiB for a backup.
pub const TARGET_BYTES_IN_FLIGHT: usize = 32 << 20;

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
    /// See [`DEFAULT_RECONNECT_TIMEOUT`].
    pub reconnect_timeout: Duration,
    /// NBD server limits.
    pub server: ServerConfig,
}

/// How [`BackupTarget::wait`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Every drive is complete and settled: call [`BackupTarget::finish`].
    Settled,
    /// The backup cannot complete; the reason.
    Failed(String),
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

/// Describes incomplete drives: "drive-scsi0: 1048576 of 4194304 bytes missing".
pub fn describe_incomplete(status: &[DriveStatus]) -> Vec<String> {
    status
        .iter()
        .filter(|s| !s.complete)
        .map(|s| {
            format!(
                "{}: {} of {} bytes missing",
                s.name,
                s.size - s.done,
                s.size
            )
        })
        .collect()
}

impl BackupTarget {
    /// Creates the archive (header written), binds the listener and starts
    /// serving the drive exports.
    pub async fn start(cfg: TargetConfig) -> anyhow::Result<BackupTarget> {
        let mut builder = WriterBuilder::new().clusters_per_extent(cfg.clusters_per_extent)?;
        for (name, data) in &cfg.configs {
            builder
                .add_config(name, data)
                .with_context(|| format!("config {name}"))?;
        }
        for d in &cfg.drives {
            builder
                .add_device(&d.name, d.size)
                .with_context(|| format!("drive {}", d.name))?;
        }
        let listener = Listener::bind(&cfg.listen)
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let sink = Sink::create(&cfg.output, &cfg.sink).context("cannot create the archive")?;
        let assembler = Assembler::start(builder, &cfg.drives, sink, &cfg.assembler)
            .context("cannot start the archive writer")?;
        let exports = assembler
            .drives()
            .iter()
            .map(|d: &Arc<Drive>| Export {
                name: d.name().to_string(),
                description: format!("vma-writer backup target for {}", d.name()),
                backend: d.clone(),
            })
            .collect();
        let server = Server::new(exports, cfg.server.clone());
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
                return WaitOutcome::Failed(e.to_string());
            }
            let status = self.assembler.status();
            if status.iter().all(|s| s.settled) {
                return WaitOutcome::Settled;
            }
            let now = Instant::now();
            let mut next_deadline: Option<Instant> = None;
            for s in &status {
                if let Some(since) = s.idle_since {
                    let deadline = since + self.reconnect_timeout;
                    if deadline <= now {
                        return WaitOutcome::Failed(format!(
                            "the client of drive {} disconnected with {} of {} bytes missing and did not reconnect within {:?}",
                            s.name,
                            s.size - s.done,
                            s.size,
                            self.reconnect_timeout
                        ));
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
                r = changed.changed() => if r.is_err() { return WaitOutcome::Failed("archive state lost".into()) },
                _ = sleep => {}
            }
        }
    }

    async fn stop_server(&mut self) {
        self.cancel.cancel();
        match (&mut self.server).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("NBD server ended with an error: {e}"),
            Err(e) => tracing::warn!("NBD server task failed: {e}"),
        }
    }

    /// Stops serving and completes the archive (last extent, fsync, rename).
    pub async fn finish(mut self) -> anyhow::Result<Report> {
        self.stop_server().await;
        // Throughput counts from the first client, not from when we started
        // waiting for one.
        let started = self.assembler.first_connect().unwrap_or(self.started);
        let summary = self
            .assembler
            .finish()
            .await
            .context("cannot finish the archive")?;
        let bytes = summary.drives.iter().map(|d| d.1).sum();
        let zero_bytes = summary.drives.iter().map(|d| d.2).sum();
        Ok(Report {
            summary,
            bytes,
            zero_bytes,
            duration: started.elapsed(),
        })
    }

    /// Stops serving and abandons the archive; returns the incomplete
    /// drives' descriptions.
    pub async fn abort(mut self) -> Vec<String> {
        // Fail pending requests first, so the server's shutdown does not
        // wait for writes blocked on buffer room.
        self.assembler.fail("the backup was abandoned");
        self.stop_server().await;
        let missing = describe_incomplete(&self.assembler.status());
        self.assembler.abort().await;
        missing
    }
}

/// `ARCHIVE.partial` for a file target.
pub fn partial_of(target: &Target) -> Option<PathBuf> {
    match target {
        Target::File(p) => Some(crate::sink::partial_path(p)),
        Target::Stdout => None,
    }
}
