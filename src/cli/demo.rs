//! `vma-writer demo`: the whole product on one screen, for a new user. It
//! makes two small drives (one of an odd size, both with data and holes),
//! serves them from a qemu-storage-daemon as a running VM would, backs them
//! up live while the "guest" writes to one of them, then verifies and
//! extracts the archive and compares every drive with its point-in-time
//! source. Processes are cleaned up on every path (the daemon also dies
//! with us if we are killed).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};

use super::live::{Ended, backup_with_display};
use super::options::{ArchiveOpts, LiveOpts};
use super::signals::Leftovers;
use super::values::Size;
use crate::backup::{BackupDrive, RunOptions, vzdump_name};
use crate::qemu::{DaemonOptions, Image, StorageDaemon};
use crate::sink::Target;
use crate::vma::Reader;

const MIB: u64 = 1 << 20;

/// The guest's write during the backup: 1 MiB of 0x77 at 48 MiB of the
/// first drive, which holds other data at the point in time.
const GUEST_WRITE_OFFSET: u64 = 48 * MIB;

/// Arguments of `demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Work directory (created; must not exist). Default: a new directory
    /// under the system temp dir, kept afterwards.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Backup rate limit, so that the guest's write lands mid-backup.
    #[arg(long, value_name = "BYTES_PER_SEC", default_value = "32M")]
    pub speed: Size,
    /// Print progress as JSON lines.
    #[arg(long)]
    pub json: bool,
}

/// Deterministic pseudo-random bytes (xorshift64*), so every run makes the
/// same drives.
fn fill(buf: &mut [u8], mut seed: u64) {
    for chunk in buf.chunks_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let v = seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Writes a sparse raw image of `size` bytes with data at `islands`
/// (offset, length); everything else is a hole.
fn make_image(path: &Path, size: u64, islands: &[(u64, u64)], seed: u64) -> anyhow::Result<u64> {
    let f = File::create_new(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.set_len(size)?;
    let mut data = 0;
    for (i, &(off, len)) in islands.iter().enumerate() {
        let mut buf = vec![0u8; len as usize];
        fill(&mut buf, seed + i as u64 + 1);
        f.write_all_at(&buf, off)?;
        data += len;
    }
    f.sync_all()?;
    Ok(data)
}

fn same_file(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    let len = fa.metadata()?.len();
    if len != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut x, mut y) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut off = 0;
    while off < len {
        let n = (len - off).min(MIB) as usize;
        fa.read_exact_at(&mut x[..n], off)?;
        fb.read_exact_at(&mut y[..n], off)?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

/// The guest writes to drive-scsi0 through the daemon's NBD export of it
/// (QEMU routes the write through the backup's copy-before-write filter).
async fn guest_write(socket: PathBuf) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_millis(400)).await;
    let uri = format!("nbd+unix:///live?socket={}", socket.display());
    let out = tokio::process::Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c"])
        .arg(format!("write -P 0x77 {GUEST_WRITE_OFFSET} 1M"))
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run qemu-io")?;
    if !out.status.success() {
        bail!(
            "qemu-io failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Prints the demo's narrative: stdout, or stderr with `--json` (stdout
/// then holds only JSON lines).
macro_rules! say {
    ($json:expr, $($arg:tt)*) => {
        if $json { eprintln!($($arg)*) } else { println!($($arg)*) }
    };
}

/// The path of `tool` on PATH.
fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// Runs `demo`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    // Nothing is made before we know the demo can run.
    crate::qemu::find_binary().context(
        "the demo needs qemu-storage-daemon (Debian: apt-get install qemu-utils; \
         QEMU 8.2 or newer)",
    )?;
    which("qemu-io").context("the demo needs qemu-io (Debian: apt-get install qemu-utils)")?;
    let dir = match &a.dir {
        Some(d) => {
            std::fs::create_dir(d)
                .with_context(|| format!("cannot create {} (it must not exist)", d.display()))?;
            std::path::absolute(d)?
        }
        None => tempfile::Builder::new()
            .prefix("vma-writer-demo-")
            .tempdir()
            .context("cannot create a work directory")?
            .keep(),
    };
    say!(a.json, "vma-writer demo: working in {}", dir.display());
    let disk0 = dir.join("scsi0.raw");
    let disk1 = dir.join("scsi1.raw");
    let size0 = 64 * MIB;
    let size1 = 10 * MIB + 1536;
    let d0 = make_image(
        &disk0,
        size0,
        &[
            (MIB, 2 * MIB),
            (20 * MIB, MIB),
            (47 * MIB, 2 * MIB),
            (63 * MIB + 4096, 4096),
        ],
        1,
    )?;
    let d1 = make_image(
        &disk1,
        size1,
        &[(0, MIB), (5 * MIB + 512, 700_000), (size1 - 3000, 3000)],
        2,
    )?;
    say!(
        a.json,
        "  made drive-scsi0: {} MiB raw, {} KiB of data, the rest holes",
        size0 / MIB,
        d0 / 1024
    );
    say!(
        a.json,
        "  made drive-scsi1: {size1} bytes raw (not a multiple of 64 KiB), {} KiB of data",
        d1 / 1024
    );
    let config = dir.join("qemu-server.conf");
    std::fs::write(
        &config,
        "# vma-writer demo VM\nmemory: 1024\nscsi0: local:100/scsi0.raw,size=64M\nscsi1: local:100/scsi1.raw\n",
    )?;
    // The point-in-time images the archive must restore to.
    let expect0 = dir.join("expected-scsi0.raw");
    std::fs::copy(&disk0, &expect0)?;

    let rt = tokio::runtime::Runtime::new()?;
    let archive = dir.join(vzdump_name(100, false));
    let report = rt.block_on(async {
        let runtime_dir = dir.join("run");
        std::fs::create_dir(&runtime_dir)?;
        let mut daemon = StorageDaemon::start(
            DaemonOptions::new(&runtime_dir)
                .image(Image::new("scsi0", &disk0, "raw"))
                .image(Image::new("scsi1", &disk1, "raw")),
        )
        .await
        .context("cannot start qemu-storage-daemon (from qemu-utils)")?;
        say!(a.json, "  started qemu-storage-daemon (pid {}) serving both drives, as a running VM would", daemon.pid());
        let res = async {
            let live = daemon.export_nbd("scsi0", "live", true).await?;
            let qmp = daemon.connect().await?;
            let drives = vec![
                BackupDrive { node: "scsi0".into(), name: "drive-scsi0".into(), size: size0 },
                BackupDrive { node: "scsi1".into(), name: "drive-scsi1".into(), size: size1 },
            ];
            let opts = ArchiveOpts {
                configs: vec![config.clone()],
                ..ArchiveOpts::default()
            };
            let live_opts = LiveOpts {
                json: a.json,
                ..LiveOpts::default()
            };
            say!(a.json,
                "  backing up both drives at one point in time, throttled to {} MiB/s; the guest writes meanwhile",
                a.speed.0 / MIB
            );
            let writer = tokio::spawn(guest_write(live));
            let run = RunOptions { speed: Some(a.speed.0), ..RunOptions::default() };
            let ended = backup_with_display(&qmp, &drives, &opts, &live_opts, Target::File(archive.clone()), &run).await?;
            match writer.await {
                Ok(Ok(())) => say!(a.json,
                    "  the guest wrote 1 MiB at offset {} MiB of drive-scsi0 while the backup ran",
                    GUEST_WRITE_OFFSET / MIB
                ),
                Ok(Err(e)) => say!(a.json, "  (the guest write could not run: {})", super::describe(&*e)),
                Err(e) => say!(a.json, "  (the guest write task failed: {e})"),
            }
            Ok::<_, anyhow::Error>(ended)
        }
        .await;
        if let Err(e) = daemon.shutdown().await {
            tracing::warn!("qemu-storage-daemon did not stop cleanly: {e}");
        }
        res
    });
    let report = match report {
        Ok(Ended::Done(r)) => r,
        Ok(ended) => {
            eprintln!(
                "demo failed: the backup did not complete\n  work directory kept: {}",
                dir.display()
            );
            return Ok(ended.exit_code());
        }
        Err(e) => {
            eprintln!(
                "demo failed: {}\n  work directory kept: {}",
                super::describe(&*e),
                dir.display()
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    say!(
        a.json,
        "  archive: {} ({} bytes for {} bytes of drives, {:.2} s)",
        archive.display(),
        report.summary.archive_bytes,
        report.bytes,
        report.duration.as_secs_f64()
    );
    // tokio's handlers stay installed after its runtime is gone; from here
    // on a signal ends the demo at once (its directory is kept anyway).
    let _signals = Leftovers::watch("demo", true)?;
    let stats = Reader::new(File::open(&archive)?)
        .and_then(|r| r.verify())
        .context("the archive does not verify")?;
    say!(
        a.json,
        "  verify: valid and complete ({} clusters)",
        stats.clusters
    );
    let restore = dir.join("restore");
    // Its DEVINFO lines are not the demo's output (stdout may be JSON).
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("extract")
        .arg(&archive)
        .arg(&restore)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run vma-writer extract")?;
    if !out.status.success() {
        bail!("extract failed ({})", out.status);
    }
    say!(a.json, "  extracted to {}", restore.display());
    let mut ok = true;
    for (name, expect) in [("drive-scsi0", &expect0), ("drive-scsi1", &disk1)] {
        let got = restore.join(format!("disk-{name}.raw"));
        let same = same_file(&got, expect)?;
        ok &= same;
        say!(
            a.json,
            "  {name}: {}",
            if same {
                "restored image is identical to the point-in-time source"
            } else {
                "MISMATCH"
            }
        );
    }
    if !same_file(&disk0, &expect0)? {
        say!(
            a.json,
            "  (drive-scsi0 has changed since: the guest's write is in the source, not in the archive)"
        );
    }
    if !ok {
        eprintln!("demo FAILED: a restored drive differs from its source");
        return Ok(ExitCode::FAILURE);
    }
    say!(
        a.json,
        "demo passed. Try:\n  vma-writer list {0}\n  vma-writer verify -v {0}\n\
         Everything the demo made is in {1}; remove it with: rm -r {1}",
        archive.display(),
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
