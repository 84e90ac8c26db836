//! `vma-writer live-restore ARCHIVE --qmp SOCK --dir DIR [-d NAME]...`:
//! runs a VM from its backup while the backup streams into its disks
//! ([`crate::live_restore`] has the design).
//!
//! Serves the archive's drives read-only over NBD, creates the qcow2
//! overlays `DIR/disk-NAME.qcow2` over them, waits for QEMU's QMP socket
//! (a VM started with the overlays on its command line, or a running QEMU
//! into which the overlays are `blockdev-add`ed), streams every drive,
//! and stops the export once no overlay needs it: exit 0. A failed stream
//! leaves the export serving (the VM still reads from it) until SIGINT or
//! SIGTERM, then exits 1; a signal before the end cancels the streams and
//! exits 130/143 (run it again with the same DIR to resume).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use super::archive_input;
use super::display::{LiveDisplay, StatusOut, TICK};
use super::signals::{Signal, stop_signal};
use super::values::Size;
use crate::assembler::DriveStatus;
use crate::export::{ArchiveExport, ExportConfig};
use crate::live_restore::{self, Attached, DEFAULT_RECONNECT_DELAY, Overlay, Progress};
use crate::nbd::ListenAddr;
use crate::qmp::Qmp;

/// How long, after the last stream completed, QEMU's NBD clients may take
/// to disconnect before the export stops anyway (they have nothing left
/// to read).
const CLIENTS_LEAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Arguments of `live-restore`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The archive: a plain .vma (with or without its index) or a seekable
    /// .vma.zst.
    pub archive: String,
    /// QEMU's QMP socket (a monitor of its own: it is held to the end).
    /// Waited for when it is not there yet.
    #[arg(long, value_name = "SOCK")]
    pub qmp: PathBuf,
    /// Directory of the overlays DIR/disk-NAME.qcow2 (created if missing;
    /// overlays already there from an earlier run are kept).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Restore only these drives (repeat, or separate with commas).
    #[arg(
        short = 'd',
        long = "drives",
        value_name = "NAMES",
        value_delimiter = ','
    )]
    pub drives: Vec<String>,
    /// Where the export listens (default unix:DIR/nbd.sock). The overlays
    /// record it: a restarted live-restore must listen there again.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<ListenAddr>,
    /// Seconds QEMU waits for a lost export to come back before the VM's
    /// reads of data not yet streamed fail.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_RECONNECT_DELAY)]
    pub reconnect_delay: u64,
    /// Rate limit of the stream jobs in bytes per second (K/M/G suffixes).
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub speed: Option<Size>,
    /// Seconds to wait for the QMP socket to accept.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub qmp_wait: u64,
    /// Decompressed frames of a .vma.zst kept in memory (K/M/G suffixes).
    #[arg(long, value_name = "SIZE", default_value = "64M")]
    pub cache_size: Size,
    /// Print progress and the result as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `live-restore`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let archive = archive_input::random(&a.archive)?
        .with_cache_size(usize::try_from(a.cache_size.0).unwrap_or(usize::MAX));
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create directory {}", a.dir.display()))?;
    let listen = match &a.listen {
        Some(l) => l.clone(),
        None => ListenAddr::Unix(std::path::absolute(a.dir.join("nbd.sock"))?),
    };
    let rt = tokio::runtime::Runtime::new()?;
    let (export, stop) = {
        let _rt = rt.enter();
        let cfg = ExportConfig {
            drives: a.drives.clone(),
            ..ExportConfig::new(listen)
        };
        let export = ArchiveExport::start(archive, cfg)
            .map_err(|e| anyhow::anyhow!("{}: {}", a.archive, super::describe(&e)))?;
        (export, stop_signal())
    };
    let drives: Vec<(String, u64)> = export
        .drives()
        .iter()
        .map(|d| (d.name.clone(), d.size))
        .collect();
    // qemu-img opens each new overlay's backing: the export serves on the
    // runtime's workers meanwhile.
    let overlays = match live_restore::prepare(&a.dir, export.addr(), &drives, a.reconnect_delay) {
        Ok(o) => o,
        Err(e) => {
            let _ = rt.block_on(export.stop());
            return Err(e.into());
        }
    };
    report_ready(&a, &export, &overlays);
    rt.block_on(restore(&a, export, overlays, stop))
}

/// Prints where the export listens and the overlays a VM may be started
/// with.
fn report_ready(a: &Args, export: &ArchiveExport, overlays: &[Overlay]) {
    if a.json {
        StatusOut::Stdout.json_line(json!({
            "event": "ready",
            "address": export.addr().to_string(),
            "qmp": a.qmp,
            "drives": overlays.iter().map(|o| json!({
                "name": o.name, "size": o.size, "overlay": o.path,
                "created": o.created, "uri": export.uri(&o.name),
            })).collect::<Vec<_>>(),
        }));
        return;
    }
    eprintln!(
        "vma-writer: serving {} drive(s) of {} on {}; overlays:",
        overlays.len(),
        a.archive,
        export.addr()
    );
    for o in overlays {
        let how = if o.created { "created" } else { "kept" };
        eprintln!("  {}  ({how})", o.path.display());
    }
    eprintln!(
        "vma-writer: waiting for QMP on {} (start the VM with the overlays as its drives, or \
         they are added to the running QEMU)",
        a.qmp.display()
    );
}

/// Connects to `path`, retrying until it accepts or `limit` has passed.
async fn connect_waiting(path: &std::path::Path, limit: Duration) -> anyhow::Result<Qmp> {
    let deadline = Instant::now() + limit;
    loop {
        match Qmp::connect(path).await {
            Ok(q) => return Ok(q),
            Err(e) if Instant::now() >= deadline => {
                return Err(anyhow::Error::new(e).context(format!(
                    "no QMP monitor accepted on {} within {limit:?}",
                    path.display()
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The restore's progress as the live display shows it.
fn statuses(progress: &[Progress], export: &ArchiveExport) -> Vec<DriveStatus> {
    let served = export.drives();
    progress
        .iter()
        .map(|p| DriveStatus {
            name: p.name.clone(),
            size: p.size,
            done: p.done,
            complete: p.complete,
            connections: served
                .iter()
                .find(|d| d.name == p.name)
                .map_or(0, |d| d.connections as u32),
            ever_connected: true,
            idle_since: None,
            settled: p.complete,
            base_bytes: 0,
            awaits_base: false,
        })
        .collect()
}

/// Attaches the overlays, streams them, and ends the export as the
/// module docs say.
async fn restore(
    a: &Args,
    export: ArchiveExport,
    overlays: Vec<Overlay>,
    stop: impl Future<Output = Signal>,
) -> anyhow::Result<ExitCode> {
    tokio::pin!(stop);
    let out = StatusOut::Stdout;
    let started = Instant::now();
    let qmp = tokio::select! {
        q = connect_waiting(&a.qmp, Duration::from_secs(a.qmp_wait)) => q,
        s = &mut stop => {
            export.stop().await?;
            eprintln!("vma-writer: live restore stopped by {s} before QEMU connected");
            return Ok(s.exit_code());
        }
    };
    let attached = match qmp {
        Ok(qmp) => live_restore::attach(&qmp, overlays)
            .await
            .map(|d| (qmp, d))
            .map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    let (qmp, attached) = match attached {
        Ok(x) => x,
        Err(e) => {
            // The attach error is the one to report; a failed stop is logged.
            if let Err(stop) = export.stop().await {
                tracing::warn!("the export did not stop cleanly: {stop}");
            }
            return Err(e);
        }
    };
    report_attached(a, &attached);
    let initial: Vec<Progress> = attached
        .iter()
        .map(|d| Progress {
            name: d.overlay.name.clone(),
            size: d.overlay.size,
            done: 0,
            complete: false,
        })
        .collect();
    let mut display = LiveDisplay::new(a.json, out, &statuses(&initial, &export));
    let speed = a.speed.map(|s| s.0);
    let mut last_shown = Instant::now() - TICK;
    let mut signal = None;
    let res = {
        let observe = |p: &[Progress]| {
            if last_shown.elapsed() >= TICK {
                last_shown = Instant::now();
                display.update(&statuses(p, &export));
            }
        };
        tokio::select! {
            r = live_restore::stream(&qmp, &attached, speed, observe) => Some(r),
            s = &mut stop => { signal = Some(s); None }
        }
    };
    display.clear();
    match (res, signal) {
        (Some(Ok(())), _) => {
            // QEMU closed its NBD clients when the streams completed; let
            // the last disconnects arrive before the server goes.
            let deadline = Instant::now() + CLIENTS_LEAVE_TIMEOUT;
            while export.drives().iter().any(|d| d.connections > 0) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let read = export.archive().bytes_read();
            export.stop().await?;
            if a.json {
                out.json_line(json!({
                    "event": "finished",
                    "duration_s": started.elapsed().as_secs_f64(),
                    "archive_bytes_read": read,
                    "drives": attached.iter().map(|d| json!({
                        "name": d.overlay.name, "size": d.overlay.size,
                        "overlay": d.overlay.path, "node": d.node,
                    })).collect::<Vec<_>>(),
                }));
            }
            eprintln!(
                "vma-writer: live restore complete: {} drive(s) in {}; the overlays no longer \
                 need the export",
                attached.len(),
                a.dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        (Some(Err(e)), _) => {
            let reason = super::describe(&e);
            if a.json {
                out.json_line(json!({"event": "failed", "reason": reason, "serving": true}));
            }
            eprintln!(
                "vma-writer: live restore failed: {reason}\nvma-writer: the VM still reads from \
                 the export: serving on {} until SIGINT or SIGTERM",
                export.addr()
            );
            let s = stop.await;
            export.stop().await?;
            eprintln!("vma-writer: export stopped by {s}");
            Ok(ExitCode::FAILURE)
        }
        (None, s) => {
            let s = s.unwrap_or(Signal::Terminate);
            live_restore::cancel(&qmp, &attached).await;
            export.stop().await?;
            if a.json {
                out.json_line(json!({"event": "failed", "reason": format!("stopped by {s}"), "serving": false}));
            }
            eprintln!(
                "vma-writer: live restore stopped by {s}: the streams are cancelled and the \
                 export is gone; run live-restore again with --dir {} within {} s to resume",
                a.dir.display(),
                a.reconnect_delay
            );
            Ok(s.exit_code())
        }
    }
}

/// Prints which node each overlay is in QEMU.
fn report_attached(a: &Args, attached: &[Attached]) {
    if a.json {
        StatusOut::Stdout.json_line(json!({
            "event": "attached",
            "drives": attached.iter().map(|d| json!({
                "name": d.overlay.name, "node": d.node, "added": d.added, "job": d.job,
            })).collect::<Vec<_>>(),
        }));
        return;
    }
    for d in attached {
        let how = if d.added {
            "added with blockdev-add"
        } else {
            "already open"
        };
        eprintln!("  {} is node {} ({how})", d.overlay.name, d.node);
    }
}
