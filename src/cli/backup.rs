//! `vma-writer backup --qmp PATH ...`: back up a running QEMU's drives into
//! one archive, all drives at one point in time; with `--base ARCHIVE` or
//! `--incremental`, only what changed since the base comes from QEMU
//! (`docs/incremental.md`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};

use super::live::backup_with_display;
use super::options::{ArchiveOpts, LiveOpts, output_target};
use super::values::Size;
use crate::backup::{self, BaseArchive, RunOptions, newest_archive, vzdump_name};
use crate::qmp::Qmp;

/// Arguments of `backup`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// QEMU's QMP socket (qemu-system or qemu-storage-daemon). Give
    /// vma-writer a monitor of its own (`-qmp unix:PATH,server=on,wait=off`):
    /// it holds it for the whole backup.
    #[arg(long, value_name = "PATH")]
    pub qmp: PathBuf,
    /// A drive to back up: a node or drive name, optionally =NAME for its
    /// name in the archive (default: `drive-<id>`).
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
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub speed: Option<Size>,
    /// Back up incrementally from this archive (a .vma or seekable
    /// .vma.zst of an earlier backup of this VM): QEMU sends only what
    /// changed since, the rest is copied from ARCHIVE. The new archive is
    /// complete on its own. A drive whose bitmap for ARCHIVE is missing
    /// is backed up in full, with the reason.
    #[arg(long, value_name = "ARCHIVE", conflicts_with = "incremental")]
    pub base: Option<PathBuf>,
    /// With --output-dir and --vmid: back up incrementally from the
    /// newest archive of the VM in DIR (in full when there is none).
    #[arg(long, requires = "output_dir")]
    pub incremental: bool,
    /// Add no dirty bitmap for this archive and remove none (a one-off
    /// copy that leaves the VM's chain of backups as it is).
    #[arg(long)]
    pub no_bitmap: bool,
    /// How the archive is written.
    #[command(flatten)]
    pub archive: ArchiveOpts,
    /// Limits and reporting.
    #[command(flatten)]
    pub live: LiveOpts,
}

/// The base archive `a` asks for, found before the new archive exists:
/// `--base`, or the newest archive of the VM with `--incremental`.
fn base_path(a: &Args) -> anyhow::Result<Option<PathBuf>> {
    if let Some(b) = &a.base {
        return Ok(Some(b.clone()));
    }
    let (true, Some(dir), Some(vmid)) = (a.incremental, &a.output_dir, a.vmid) else {
        return Ok(None);
    };
    let found = newest_archive(dir, vmid)
        .with_context(|| format!("cannot list {} for the newest archive", dir.display()))?;
    if found.is_none() {
        eprintln!(
            "vma-writer: no earlier archive of VM {vmid} in {}: a full backup",
            dir.display()
        );
    }
    Ok(found)
}

/// Runs `backup`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let output = match (&a.output, &a.output_dir, a.vmid) {
        (Some(o), _, _) => o.clone(),
        (None, Some(dir), Some(vmid)) => dir
            .join(vzdump_name(vmid, a.archive.output.zstd.is_some()))
            .to_string_lossy()
            .into_owned(),
        _ => bail!("give --output ARCHIVE or --output-dir DIR --vmid N"),
    };
    let output = output_target(&output)?;
    let base = base_path(&a)?.map(|p| BaseArchive::open(&p));
    if let Some(b) = &base {
        eprintln!("vma-writer: base {}", b.path().display());
    }
    let opts = RunOptions {
        speed: a.speed.map(|s| s.0),
        base,
        bitmap: !a.no_bitmap,
    };
    crate::pool::use_one_malloc_arena();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let qmp = Qmp::connect(&a.qmp).await.with_context(|| {
            format!(
                "cannot connect to QMP at {} (a QMP socket serves one client at a time: give \
                 vma-writer a monitor of its own)",
                a.qmp.display()
            )
        })?;
        let drives = backup::resolve_drives(&qmp, &a.drives, a.all).await?;
        let ended = backup_with_display(&qmp, &drives, &a.archive, &a.live, output, &opts).await?;
        Ok(ended.exit_code())
    })
}
