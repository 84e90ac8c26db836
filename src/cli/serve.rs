//! `vma-writer serve`: be the NBD target of a backup that someone else
//! drives (e.g. a QEMU job started by hand over QMP). One export per drive;
//! the archive is finalised once every drive is complete and its clients
//! have flushed or disconnected.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use super::live::{LiveDisplay, TICK, json_line};
use crate::assembler::{AssemblerConfig, DriveSpec};
use crate::nbd::{ListenAddr, ServerConfig};
use crate::sink::{SinkOptions, Target};
use crate::target::{BackupTarget, DEFAULT_RECONNECT_TIMEOUT, TargetConfig, WaitOutcome};

/// Options shared by `serve` and `backup`: the archive and its limits.
#[derive(Debug, Clone, clap::Args)]
pub struct ArchiveOpts {
    /// A config file to store (by file name), e.g. qemu-server.conf.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub configs: Vec<PathBuf>,
    /// Compress with zstd (optionally at LEVEL, default 3).
    #[arg(long, value_name = "LEVEL", num_args = 0..=1, default_missing_value = "3")]
    pub zstd: Option<i32>,
    /// zstd worker threads (0: compress on the writer thread).
    #[arg(long, default_value_t = 0)]
    pub zstd_threads: u32,
    /// Keep ARCHIVE.partial when the backup fails.
    #[arg(long)]
    pub keep_partial: bool,
    /// Bound on buffered partial clusters (K/M/G suffixes).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64M")]
    pub buffer_limit: u64,
    /// Seconds an incomplete drive may stay without a client before the
    /// backup fails.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_RECONNECT_TIMEOUT.as_secs())]
    pub reconnect_timeout: u64,
    /// Clusters per extent (Proxmox writes 58).
    #[arg(long, default_value_t = crate::vma::consts::PROXMOX_CLUSTERS_PER_EXTENT)]
    pub clusters_per_extent: usize,
    /// Print progress and the result as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// unix:PATH or tcp:HOST:PORT (HOST defaults to 127.0.0.1).
    #[arg(long, value_name = "ADDR")]
    pub listen: ListenAddr,
    /// A drive export: NAME=SIZE, SIZE in bytes or with a K/M/G/T suffix
    /// (powers of 1024). It must equal the source drive's size.
    #[arg(long = "drive", value_name = "NAME=SIZE", required = true)]
    pub drives: Vec<String>,
    /// The archive to write, or `-` for stdout. Must not exist.
    #[arg(short, long, value_name = "ARCHIVE")]
    pub output: String,
    /// Archive options.
    #[command(flatten)]
    pub archive: ArchiveOpts,
}

/// Parses a byte count with an optional K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('T') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (bytes, or a number with K/M/G/T)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Parses NAME=SIZE.
pub fn parse_drive_size(s: &str) -> anyhow::Result<DriveSpec> {
    let (name, size) = s
        .split_once('=')
        .with_context(|| format!("drive '{s}': expected NAME=SIZE"))?;
    crate::vma::header::check_file_name("drive", name)?;
    let size = parse_size(size).map_err(|e| anyhow::anyhow!("drive '{s}': {e}"))?;
    Ok(DriveSpec {
        name: name.to_string(),
        size,
    })
}

impl ArchiveOpts {
    /// The target configuration for these options.
    pub fn target_config(
        &self,
        listen: ListenAddr,
        drives: Vec<DriveSpec>,
        output: &str,
    ) -> anyhow::Result<TargetConfig> {
        if output == "-" {
            super::live::status_to_stderr();
        }
        let configs = super::create::read_configs(&self.configs)?;
        Ok(TargetConfig {
            listen,
            drives,
            configs,
            output: Target::parse(output),
            sink: SinkOptions {
                zstd_level: self.zstd,
                zstd_threads: self.zstd_threads,
                keep_partial: self.keep_partial,
            },
            assembler: AssemblerConfig {
                partial_limit: self.buffer_limit as usize,
                ..Default::default()
            },
            clusters_per_extent: self.clusters_per_extent,
            reconnect_timeout: Duration::from_secs(self.reconnect_timeout),
            server: ServerConfig {
                max_bytes_in_flight: crate::target::TARGET_BYTES_IN_FLIGHT,
                ..ServerConfig::default()
            },
        })
    }
}

/// A future that resolves on SIGINT or SIGTERM. The handlers are installed
/// when this is called (inside the runtime), not when the future is first
/// polled, so a signal during set-up is not lost or fatal.
pub fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let signals = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        let (Ok(mut int), Ok(mut term)) = signals else {
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = int.recv() => tracing::warn!("SIGINT received"),
            _ = term.recv() => tracing::warn!("SIGTERM received"),
        }
    }
}

/// Runs a started target to its end with a display: finishes the archive
/// when settled, aborts it otherwise. Returns the exit status.
pub async fn drive_to_end(target: BackupTarget, json: bool) -> ExitCode {
    let mut display = LiveDisplay::new(json, &target.status());
    let outcome = {
        let wait = target.wait(stop_signal());
        tokio::pin!(wait);
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                o = &mut wait => break o,
                _ = tick.tick() => display.update(&target.status()),
            }
        }
    };
    display.update(&target.status());
    match outcome {
        WaitOutcome::Settled => match target.finish().await {
            Ok(r) => {
                display.finished(&r);
                ExitCode::SUCCESS
            }
            Err(e) => {
                display.failed(&format!("{:#}", anyhow::Error::from(e)), &[]);
                ExitCode::FAILURE
            }
        },
        WaitOutcome::Failed(reason) => {
            let missing = target.abort().await;
            display.failed(&reason.to_string(), &missing);
            ExitCode::FAILURE
        }
        WaitOutcome::Stopped => {
            let missing = target.abort().await;
            display.failed(
                "stopped by signal before the archive was complete",
                &missing,
            );
            ExitCode::FAILURE
        }
    }
}

/// Runs `serve`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let drives = a
        .drives
        .iter()
        .map(|d| parse_drive_size(d))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cfg = a.archive.target_config(a.listen, drives, &a.output)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let target = BackupTarget::start(cfg).await?;
        if a.archive.json {
            json_line(
                serde_json::json!({"event": "listening", "address": target.addr().to_string(),
                "exports": target.status().iter().map(|s| s.name.clone()).collect::<Vec<_>>()}),
            );
        } else {
            eprintln!(
                "vma-writer: serving {} drive(s) on {}",
                target.status().len(),
                target.addr()
            );
        }
        Ok(drive_to_end(target, a.archive.json).await)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10487296"), Ok(10487296));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
        let d = parse_drive_size("drive-scsi0=10M").unwrap();
        assert_eq!((d.name.as_str(), d.size), ("drive-scsi0", 10 << 20));
    }
}
