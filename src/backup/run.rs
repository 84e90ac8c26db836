//! Running one live backup: serve the drives on a private Unix socket,
//! `blockdev-add` one NBD node per drive, start every `blockdev-backup` in
//! one transaction (one point in time), wait for the jobs, `blockdev-del`
//! the targets (QEMU then flushes and disconnects) and finish the archive.
//!
//! Every step returns a [`Failure`] with `?`; a failed backup is cleaned up
//! in one place (`Backup::clean_up`): cancel the jobs that still run, wait
//! for them, remove the targets still added, abandon the archive.
//!
//! Leaves to others: which drives ([`super::drives`]), the QMP commands
//! ([`crate::qmp`]), the NBD exports and the archive ([`crate::target`]),
//! and display ([`Observer`]).

use std::collections::HashSet;
use std::future::{Future, pending};
use std::path::Path;
use std::time::Duration;

use tracing::{info, warn};

use super::drives::BackupDrive;
use super::error::{Error, Failure};
use crate::assembler::{DriveSpec, DriveStatus};
use crate::nbd::ListenAddr;
use crate::qmp::{self, BackupJob, Event, EventStream, JobEvent, Qmp};
use crate::target::{BackupTarget, Report, TargetConfig, WaitOutcome, incomplete_drives};

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

/// Runs the backup. `cfg.listen` must be a Unix socket QEMU can reach;
/// `cfg.drives` is filled from `drives`. `stop` resolves on SIGINT/SIGTERM
/// (or never). Returns the report of the finished archive; a backup
/// abandoned after it started is [`Error::Failed`].
pub async fn run(
    qmp: &Qmp,
    drives: &[BackupDrive],
    mut cfg: TargetConfig,
    speed: Option<u64>,
    observer: &mut dyn Observer,
    stop: impl Future<Output = ()>,
) -> Result<Report, Error> {
    let ListenAddr::Unix(socket) = cfg.listen.clone() else {
        return Err(Error::NotUnixSocket { listen: cfg.listen });
    };
    cfg.drives = drives
        .iter()
        .map(|d| DriveSpec::new(d.name.clone(), d.size))
        .collect();
    let target = BackupTarget::start(cfg).await?;
    let mut backup = Backup {
        qmp,
        events: qmp.subscribe(),
        target,
        added: Vec::new(),
        running: HashSet::new(),
    };
    tokio::pin!(stop);
    match backup
        .copy(drives, &socket, speed, observer, &mut stop)
        .await
    {
        Ok(()) => {
            observer.progress(&backup.target.status());
            Ok(backup.target.finish().await?)
        }
        Err(reason) => Err(backup.clean_up(reason).await),
    }
}

/// A backup under way: what [`Backup::clean_up`] must undo.
struct Backup<'a> {
    qmp: &'a Qmp,
    /// Subscribed before the first command, so no job event is missed.
    events: EventStream,
    target: BackupTarget,
    /// Target nodes added and not yet removed.
    added: Vec<String>,
    /// Jobs started that have not reported their end.
    running: HashSet<String>,
}

impl Backup<'_> {
    /// Everything up to a settled archive.
    async fn copy(
        &mut self,
        drives: &[BackupDrive],
        socket: &Path,
        speed: Option<u64>,
        observer: &mut dyn Observer,
        stop: &mut (impl Future<Output = ()> + Unpin),
    ) -> Result<(), Failure> {
        // Targets first: QEMU connects and negotiates in blockdev-add.
        for (i, d) in drives.iter().enumerate() {
            self.qmp
                .blockdev_add_nbd(&target_node(i), socket, &d.name)
                .await
                .map_err(|error| Failure::TargetRefused {
                    drive: d.name.clone(),
                    error,
                })?;
            self.added.push(target_node(i));
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
                bitmap: None,
            })
            .collect();
        self.qmp
            .blockdev_backup_transaction(&jobs)
            .await
            .map_err(Failure::JobsRefused)?;
        self.running.extend(jobs.into_iter().map(|j| j.job_id));
        self.wait_jobs(observer, stop).await?;
        // Every job completed: removing the targets makes QEMU flush and
        // disconnect, which settles the drives.
        self.remove_targets().await?;
        self.settle(stop).await
    }

    /// Waits until every job has completed, watching the target and the
    /// stop request.
    async fn wait_jobs(
        &mut self,
        observer: &mut dyn Observer,
        stop: &mut (impl Future<Output = ()> + Unpin),
    ) -> Result<(), Failure> {
        let Backup {
            qmp,
            events,
            target,
            running,
            ..
        } = self;
        let target_wait = target.wait(pending());
        tokio::pin!(target_wait);
        let mut tick = tokio::time::interval(TICK);
        while !running.is_empty() {
            tokio::select! {
                _ = &mut *stop => return Err(Failure::Stopped),
                o = &mut target_wait => return Err(match o {
                    WaitOutcome::Failed(f) => Failure::Target(f),
                    outcome => Failure::TargetEndedEarly { outcome },
                }),
                _ = tick.tick() => observer.progress(&target.status()),
                ev = events.recv() => on_event(qmp, running, ev).await?,
            }
        }
        Ok(())
    }

    /// Removes every added target, all of them even when one fails.
    async fn remove_targets(&mut self) -> Result<(), Failure> {
        let mut result = Ok(());
        for node in std::mem::take(&mut self.added) {
            if let Err(error) = self.qmp.blockdev_del(&node).await {
                result = Err(Failure::RemoveTarget { node, error });
            }
        }
        result
    }

    /// Waits, up to [`SETTLE_TIMEOUT`], until the archive can be finished.
    async fn settle(&self, stop: &mut (impl Future<Output = ()> + Unpin)) -> Result<(), Failure> {
        match tokio::time::timeout(SETTLE_TIMEOUT, self.target.wait(stop)).await {
            Ok(WaitOutcome::Settled) => Ok(()),
            Ok(WaitOutcome::Stopped) => Err(Failure::Stopped),
            Ok(WaitOutcome::Failed(f)) => Err(Failure::Target(f)),
            Err(_) => Err(Failure::NotSettled {
                timeout: SETTLE_TIMEOUT,
                incomplete: incomplete_drives(&self.target.status()),
            }),
        }
    }

    /// The one cleanup path: cancels what runs, removes the targets, drops
    /// the archive. Problems on the way are logged; the result is the
    /// error for `reason`.
    async fn clean_up(mut self, reason: Failure) -> Error {
        for j in &self.running {
            if let Err(e) = self.qmp.block_job_cancel(j, true).await {
                warn!(job = %j, "cannot cancel backup job: {e}");
            }
        }
        if !self.running.is_empty() {
            let ids: Vec<&String> = self.running.iter().collect();
            if let Err(e) = self.events.wait_jobs_ended(&ids, CANCEL_TIMEOUT).await {
                warn!("cancelled jobs did not all report their end: {e}");
            }
        }
        for n in &self.added {
            if let Err(e) = self.qmp.blockdev_del(n).await {
                warn!(node = %n, "cannot remove backup target: {e}");
            }
        }
        let incomplete = self.target.abort().await;
        Error::Failed { reason, incomplete }
    }
}

/// Applies one event (or the event stream's error) to the running jobs.
async fn on_event(
    qmp: &Qmp,
    running: &mut HashSet<String>,
    ev: Result<Event, qmp::Error>,
) -> Result<(), Failure> {
    let ev = match ev {
        Ok(ev) => ev,
        Err(qmp::Error::EventsLost { count }) => {
            warn!("{count} QMP events lost; checking the jobs");
            let live: HashSet<String> = qmp
                .query_block_jobs()
                .await
                .map_err(Failure::Qmp)?
                .into_iter()
                .map(|j| j.device)
                .collect();
            if running.iter().any(|j| !live.contains(j)) {
                return Err(Failure::LostJobEnd);
            }
            return Ok(());
        }
        Err(e) => return Err(Failure::QmpLost(e)),
    };
    match ev.typed() {
        Ok(Some(JobEvent::Completed(end))) if running.contains(&end.device) => {
            running.remove(&end.device);
            if let Some(error) = end.error {
                return Err(Failure::JobFailed {
                    job: end.device,
                    error,
                });
            }
            info!(job = %end.device, "backup job completed");
        }
        Ok(Some(JobEvent::Cancelled(end))) if running.contains(&end.device) => {
            running.remove(&end.device);
            return Err(Failure::JobCancelled { job: end.device });
        }
        Ok(Some(JobEvent::Error(e))) if running.contains(&e.device) => {
            warn!(job = %e.device, operation = %e.operation, "backup job I/O error");
        }
        _ => {}
    }
    Ok(())
}
