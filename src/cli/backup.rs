//! `vma-writer backup --qmp PATH ...`: back up a running QEMU's drives into
//! one archive, all drives at one point in time.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};

use super::live::LiveDisplay;
use super::serve::{ArchiveOpts, parse_size, stop_signal};
use crate::backup::{self, BackupDrive};
use crate::nbd::ListenAddr;
use crate::qmp::Qmp;

/// Arguments of `backup`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// QEMU's QMP socket (qemu-system or qemu-storage-daemon).
    #[arg(long, value_name = "PATH")]
    pub qmp: PathBuf,
    /// A drive to back up: a node or drive name, optionally =NAME for its
    /// name in the archive (default: drive-<id>).
    #[arg(long = "drive", value_name = "NODE[=NAME]")]
    pub drives: Vec<String>,
    /// Back up every writable drive QEMU has.
    #[arg(long)]
    pub all: bool,
    /// The archive to write, or `-` for stdout.
    #[arg(
        short,
        long,
        value_name = "ARCHIVE",
        conflicts_with = "output_dir",
        required_unless_present = "output_dir"
    )]
    pub output: Option<String>,
    /// Write vzdump-qemu-VMID-YYYY_MM_DD-HH_MM_SS.vma[.zst] into DIR.
    #[arg(long, value_name = "DIR", requires = "vmid")]
    pub output_dir: Option<PathBuf>,
    /// VM id for the archive name (with --output-dir).
    #[arg(long, value_name = "N")]
    pub vmid: Option<u32>,
    /// Rate limit of the backup jobs in bytes per second (K/M/G suffixes).
    #[arg(long, value_name = "BYTES_PER_S", value_parser = parse_size)]
    pub speed: Option<u64>,
    /// Archive options.
    #[command(flatten)]
    pub archive: ArchiveOpts,
}

/// Proxmox's archive name: `vzdump-qemu-<vmid>-YYYY_MM_DD-HH_MM_SS.vma`,
/// local time, `.zst` added when compressed.
pub fn vzdump_name(vmid: u32, zstd: bool) -> String {
    let now = chrono::Local::now().format("%Y_%m_%d-%H_%M_%S");
    format!(
        "vzdump-qemu-{vmid}-{now}.vma{}",
        if zstd { ".zst" } else { "" }
    )
}

/// Runs a backup of `drives` over `qmp` with the CLI's display; shared by
/// `backup`, `create` and `demo`.
pub async fn run_with_display(
    qmp: &Qmp,
    drives: &[BackupDrive],
    opts: &ArchiveOpts,
    output: &str,
    speed: Option<u64>,
) -> anyhow::Result<crate::target::Report> {
    let dir = tempfile::Builder::new()
        .prefix("vma-writer-")
        .tempdir()
        .context("cannot create a private socket directory")?;
    let listen = ListenAddr::Unix(dir.path().join("nbd.sock"));
    let cfg = opts.target_config(listen, Vec::new(), output)?;
    let initial: Vec<_> = drives
        .iter()
        .map(|d| crate::assembler::DriveStatus {
            name: d.name.clone(),
            size: d.size,
            done: 0,
            complete: false,
            connections: 0,
            ever_connected: false,
            idle_since: None,
            settled: false,
        })
        .collect();
    let mut display = LiveDisplay::new(opts.json, &initial);
    let res = {
        let mut observer = |s: &[crate::assembler::DriveStatus]| display.update(s);
        backup::run(qmp, drives, cfg, speed, &mut observer, stop_signal()).await
    };
    match res {
        Ok(r) => {
            display.finished(&r);
            Ok(r)
        }
        Err(backup::Error::Failed { reason, incomplete }) => {
            display.failed(&reason.to_string(), &incomplete);
            Err(backup::Error::Failed { reason, incomplete }.into())
        }
        Err(e) => {
            let e = anyhow::Error::from(e);
            display.failed(&format!("{e:#}"), &[]);
            Err(e)
        }
    }
}

/// Runs `backup`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let output = match (&a.output, &a.output_dir, a.vmid) {
        (Some(o), _, _) => o.clone(),
        (None, Some(dir), Some(vmid)) => dir
            .join(vzdump_name(vmid, a.archive.zstd.is_some()))
            .to_string_lossy()
            .into_owned(),
        _ => bail!("give --output ARCHIVE or --output-dir DIR --vmid N"),
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let qmp = Qmp::connect(&a.qmp)
            .await
            .with_context(|| format!("cannot connect to QMP at {}", a.qmp.display()))?;
        let drives = backup::resolve_drives(&qmp, &a.drives, a.all).await?;
        match run_with_display(&qmp, &drives, &a.archive, &output, a.speed).await {
            Ok(_) => Ok(ExitCode::SUCCESS),
            Err(_) => Ok(ExitCode::FAILURE),
        }
    })
}
