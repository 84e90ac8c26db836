//! A whole live backup driven over QMP: serve the drives on a private Unix
//! socket, `blockdev-add` one NBD node per drive, start every
//! `blockdev-backup` in one transaction (one point in time), wait for the
//! jobs, `blockdev-del` the targets (QEMU then flushes and disconnects) and
//! finish the archive. On a job error, a lost QMP connection, a target
//! failure or a stop request it cancels the jobs, removes the targets and
//! abandons the archive.
//!
//! Used by `backup`, `create` (non-raw images) and `demo`. Display is left
//! to the caller through [`Observer`].

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use anyhow::bail;

pub mod drives;

pub use drives::{BackupDrive, NamedNode, all_drives, archive_name, block_nodes, resolve_drives};

use crate::assembler::{DriveSpec, DriveStatus};
use crate::nbd::ListenAddr;
use crate::qmp::{self, BackupJob, JobEvent, Qmp};
use crate::target::{
    BackupTarget, IncompleteDrive, Report, TargetConfig, WaitOutcome, incomplete_drives,
};

/// How long cancelled jobs get to report their end before we go on.
pub const CANCEL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the targets get to flush and disconnect after `blockdev-del`
/// before the backup is declared failed.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How often progress is reported to the [`Observer`].
pub const TICK: Duration = Duration::from_millis(500);

/// Receives progress; the CLI draws bars or prints JSON.
pub trait Observer {
    /// Called every [`TICK`] while the jobs run.
    fn progress(&mut self, status: &[DriveStatus]);
}

impl<F: FnMut(&[DriveStatus])> Observer for F {
    fn progress(&mut self, status: &[DriveStatus]) {
        self(status)
    }
}

/// Node and job names carry our pid, so two backups of one QEMU (of
/// different drives) do not collide. QEMU allows 31 characters.
fn qemu_name(kind: &str, i: usize) -> String {
    format!("vmaw{}-{kind}{i}", std::process::id())
}

fn target_node(i: usize) -> String {
    qemu_name("tgt", i)
}

fn job_id(i: usize) -> String {
    qemu_name("job", i)
}

/// Why a running backup stopped early.
enum Abort {
    Failed(String),
    Stopped,
}

/// Runs the backup. `cfg.listen` must be a Unix socket QEMU can reach;
/// `cfg.drives` is filled from `drives`. `stop` resolves on SIGINT/SIGTERM
/// (or never). Returns the report of the finished archive.
pub async fn run(
    qmp: &Qmp,
    drives: &[BackupDrive],
    mut cfg: TargetConfig,
    speed: Option<u64>,
    observer: &mut dyn Observer,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<Report> {
    let ListenAddr::Unix(socket) = cfg.listen.clone() else {
        bail!("backup serves QEMU on a Unix socket");
    };
    cfg.drives = drives
        .iter()
        .map(|d| DriveSpec {
            name: d.name.clone(),
            size: d.size,
        })
        .collect();
    let target = BackupTarget::start(cfg).await?;
    let mut events = qmp.subscribe();
    tokio::pin!(stop);

    // Targets first: QEMU connects and negotiates in blockdev-add.
    let mut added = Vec::new();
    let mut abort: Option<Abort> = None;
    for (i, d) in drives.iter().enumerate() {
        match qmp
            .blockdev_add_nbd(&target_node(i), socket.as_path(), &d.name)
            .await
        {
            Ok(()) => added.push(target_node(i)),
            Err(e) => {
                abort = Some(Abort::Failed(format!(
                    "QEMU cannot open the backup target for {}: {e}",
                    d.name
                )));
                break;
            }
        }
    }
    let jobs: Vec<BackupJob> = drives
        .iter()
        .enumerate()
        .map(|(i, d)| BackupJob {
            job_id: job_id(i),
            device: d.node.clone(),
            target: target_node(i),
            speed,
            filter_node_name: Some(qemu_name("cbw", i)),
        })
        .collect();
    let mut running: HashSet<String> = HashSet::new();
    if abort.is_none() {
        match qmp.blockdev_backup_transaction(&jobs).await {
            Ok(()) => running.extend(jobs.iter().map(|j| j.job_id.clone())),
            Err(e) => abort = Some(Abort::Failed(format!("QEMU refused the backup jobs: {e}"))),
        }
    }

    // Wait for every job, watching the target and the stop request.
    if abort.is_none() {
        let target_wait = target.wait(std::future::pending());
        tokio::pin!(target_wait);
        let mut tick = tokio::time::interval(TICK);
        while !running.is_empty() {
            tokio::select! {
                _ = &mut stop => { abort = Some(Abort::Stopped); break; }
                o = &mut target_wait => {
                    abort = Some(Abort::Failed(match o {
                        WaitOutcome::Failed(r) => r.to_string(),
                        other => format!("the backup target ended early ({other:?})"),
                    }));
                    break;
                }
                _ = tick.tick() => observer.progress(&target.status()),
                ev = events.recv() => match ev {
                    Err(qmp::Error::EventsLost { count }) => {
                        tracing::warn!("{count} QMP events lost; checking the jobs");
                        match qmp.query_block_jobs().await {
                            Ok(list) => {
                                let live: HashSet<String> = list.into_iter().map(|j| j.device).collect();
                                if running.iter().any(|j| !live.contains(j)) {
                                    abort = Some(Abort::Failed("lost track of a backup job's end (QMP events dropped)".into()));
                                    break;
                                }
                            }
                            Err(e) => { abort = Some(Abort::Failed(format!("QMP failed: {e}"))); break; }
                        }
                    }
                    Err(e) => { abort = Some(Abort::Failed(format!("lost the QMP connection: {e}"))); break; }
                    Ok(ev) => match ev.typed() {
                        Ok(Some(JobEvent::Completed(end))) if running.contains(&end.device) => {
                            running.remove(&end.device);
                            if let Some(err) = end.error {
                                abort = Some(Abort::Failed(format!("backup job {} failed: {err}", end.device)));
                                break;
                            }
                            tracing::info!(job = %end.device, "backup job completed");
                        }
                        Ok(Some(JobEvent::Cancelled(end))) if running.contains(&end.device) => {
                            running.remove(&end.device);
                            abort = Some(Abort::Failed(format!("backup job {} was cancelled", end.device)));
                            break;
                        }
                        Ok(Some(JobEvent::Error(e))) if running.contains(&e.device) => {
                            tracing::warn!(job = %e.device, operation = %e.operation, "backup job I/O error");
                        }
                        _ => {}
                    },
                },
            }
        }
    }

    if abort.is_none() {
        // Every job completed: removing the targets makes QEMU flush and
        // disconnect, which settles the drives.
        for n in added.drain(..) {
            if let Err(e) = qmp.blockdev_del(&n).await {
                abort = Some(Abort::Failed(format!(
                    "cannot remove backup target {n}: {e}"
                )));
            }
        }
    }
    if abort.is_none() {
        let settled = tokio::time::timeout(SETTLE_TIMEOUT, target.wait(&mut stop)).await;
        match settled {
            Ok(WaitOutcome::Settled) => {
                observer.progress(&target.status());
                return Ok(target.finish().await?);
            }
            Ok(WaitOutcome::Stopped) => abort = Some(Abort::Stopped),
            Ok(WaitOutcome::Failed(r)) => abort = Some(Abort::Failed(r.to_string())),
            Err(_) => {
                abort = Some(Abort::Failed(format!(
                    "jobs completed but the drives did not settle within {SETTLE_TIMEOUT:?}: {}",
                    incomplete_drives(&target.status())
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                )))
            }
        }
    }

    // Failure: cancel what runs, remove the targets, drop the archive.
    let reason = match abort.expect("set on every path that gets here") {
        Abort::Failed(r) => r,
        Abort::Stopped => "stopped by signal".to_string(),
    };
    for j in &running {
        if let Err(e) = qmp.block_job_cancel(j, true).await {
            tracing::warn!(job = %j, "cannot cancel backup job: {e}");
        }
    }
    if !running.is_empty() {
        let ids: Vec<&String> = running.iter().collect();
        if let Err(e) = events.wait_jobs_ended(&ids, CANCEL_TIMEOUT).await {
            tracing::warn!("cancelled jobs did not all report their end: {e}");
        }
    }
    for n in &added {
        if let Err(e) = qmp.blockdev_del(n).await {
            tracing::warn!(node = %n, "cannot remove backup target: {e}");
        }
    }
    let incomplete = target.abort().await;
    Err(BackupFailed { reason, incomplete }.into())
}

/// Why a backup failed, and which drives it left incomplete.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}{}", if incomplete.is_empty() { String::new() } else { format!("; incomplete drives: {}", incomplete.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")) })]
pub struct BackupFailed {
    /// What went wrong.
    pub reason: String,
    /// Every drive the backup left incomplete.
    pub incomplete: Vec<IncompleteDrive>,
}
