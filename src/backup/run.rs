//! Running one live backup: decide per drive between full and incremental
//! ([`super::chain`]), serve the drives on a private Unix socket,
//! `blockdev-add` one NBD node per drive, start every `blockdev-backup` in
//! one transaction (one point in time) that also adds the new archive's
//! dirty bitmap to each drive, wait for the jobs, `blockdev-del` the
//! targets (QEMU then flushes and disconnects), copy what the incremental
//! drives lack from the base, and commit the archive. Only then are the
//! base's bitmap and other stale bitmaps of ours removed.
//!
//! Every step returns a [`Failure`] with `?`; a failed backup is cleaned up
//! in one place (`Backup::clean_up`): cancel the jobs that still run, wait
//! for them, remove the targets still added and the bitmaps this run
//! added, abandon the archive. The base's bitmap stays: it still records
//! every write since the base.
//!
//! Leaves to others: which drives ([`super::drives`]), the QMP commands
//! ([`crate::qmp`]), the NBD exports and the archive ([`crate::target`]),
//! and display ([`Observer`]).

use std::collections::HashSet;
use std::future::{Future, pending};
use std::path::Path;
use std::time::Duration;

use std::sync::Arc;

use tracing::{debug, info, warn};
use uuid::Uuid;

use super::base::BaseArchive;
use super::chain::{
    BITMAP_GRANULARITY, BITMAP_PREFIX, DrivePlan, Mode, PERSISTENT_DRIVER, bitmap_name, plan,
    stale_bitmaps,
};
use super::drives::BackupDrive;
use super::error::{Error, Failure};
use crate::archive::RandomArchive;
use crate::assembler::{DriveSpec, DriveStatus, FillError, FillStats};
use crate::nbd::ListenAddr;
use crate::qmp::{self, BackupJob, BitmapAdd, Event, EventStream, JobEvent, NodeBitmaps, Qmp};
use crate::target::{self, BackupTarget, Report, TargetConfig, WaitOutcome, incomplete_drives};
use crate::vma::DeviceChain;

/// How long cancelled jobs get to report their end before we go on.
pub const CANCEL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the targets get to flush and disconnect after `blockdev-del`
/// before the backup is declared failed.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How often progress is reported to the [`Observer`].
pub const TICK: Duration = Duration::from_millis(500);

/// Receives progress; the CLI draws bars or prints JSON.
pub trait Observer {
    /// Called every [`TICK`] while the jobs run and the base is read.
    fn progress(&mut self, status: &[DriveStatus]);

    /// Called once each drive's mode is decided, before anything starts.
    fn planned(&mut self, _plan: &[DrivePlan]) {}

    /// A remark for the user, one line: a bitmap that cannot persist, a
    /// base without digests, a stale bitmap that could not be removed.
    fn note(&mut self, _line: &str) {}
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

/// How a backup runs, beyond its drives and target.
#[derive(Default)]
pub struct RunOptions {
    /// Rate limit of the jobs in bytes per second; `None` is unlimited.
    pub speed: Option<u64>,
    /// The base archive: the drives whose bitmap for it QEMU has are
    /// backed up incrementally ([`super::chain::plan`]).
    pub base: Option<BaseArchive>,
    /// Add the new archive's dirty bitmap to each drive in the jobs'
    /// transaction, and once the archive is committed remove the other
    /// bitmaps of ours from those drives. Without it no bitmap is added or
    /// removed (a base's bitmap is only read).
    pub bitmap: bool,
}

/// What a finished backup reports.
#[derive(Debug)]
pub struct Finished {
    /// The archive's totals.
    pub report: Report,
    /// Each drive's mode, in drive order.
    pub plan: Vec<DrivePlan>,
    /// For each incremental drive, what its fill from the base copied.
    pub fills: Vec<Option<FillStats>>,
}

/// Runs the backup. `cfg.listen` must be a Unix socket QEMU can reach;
/// `cfg.drives` is filled from `drives`, `cfg.uuid` chosen if unset (the
/// new bitmap is named from it). `stop` resolves on SIGINT/SIGTERM (or
/// never). Returns the finished archive's report; a backup abandoned
/// after it started is [`Error::Failed`].
pub async fn run(
    qmp: &Qmp,
    drives: &[BackupDrive],
    mut cfg: TargetConfig,
    opts: &RunOptions,
    observer: &mut dyn Observer,
    stop: impl Future<Output = ()>,
) -> Result<Finished, Error> {
    let ListenAddr::Unix(socket) = cfg.listen.clone() else {
        return Err(Error::NotUnixSocket { listen: cfg.listen });
    };
    let uuid = *cfg.uuid.get_or_insert_with(Uuid::new_v4);
    let nodes = if opts.bitmap || opts.base.is_some() {
        qmp.query_dirty_bitmaps().await.map_err(Error::Bitmaps)?
    } else {
        Vec::new()
    };
    let plan = plan(drives, opts.base.as_ref(), &nodes);
    observer.planned(&plan);
    let base = opts.base.as_ref().and_then(BaseArchive::archive);
    if let Some(b) = base.filter(|b| !b.has_digests())
        && plan.iter().any(|p| p.mode.is_incremental())
    {
        observer.note(&format!(
            "the base {} has no index: the clusters taken from it are not checked against digests",
            b.file().path().display()
        ));
    }
    let new_bitmap = opts.bitmap.then(|| bitmap_name(&uuid));
    let bitmaps = match &new_bitmap {
        Some(name) => bitmap_adds(qmp, &plan, &nodes, name, observer).await?,
        None => Vec::new(),
    };
    cfg.drives = drives
        .iter()
        .zip(&plan)
        .map(|(d, p)| DriveSpec {
            chain: DeviceChain {
                bitmap: new_bitmap.is_some(),
                from_base: p.mode.is_incremental(),
                base_bytes: 0,
            },
            ..DriveSpec::new(d.name.clone(), d.size)
        })
        .collect();
    let target = BackupTarget::start(cfg).await?;
    let mut backup = Backup {
        qmp,
        events: qmp.subscribe(),
        target,
        added: Vec::new(),
        running: HashSet::new(),
        bitmaps: Vec::new(),
    };
    tokio::pin!(stop);
    let copied = backup
        .copy(
            drives, &plan, &bitmaps, base, &socket, opts.speed, observer, &mut stop,
        )
        .await;
    let fills = match copied {
        Ok(fills) => fills,
        Err(reason) => return Err(backup.clean_up(reason).await),
    };
    observer.progress(&backup.target.status());
    let report = match backup.target.finish(&mut stop).await {
        Ok(r) => r,
        Err(e @ target::Error::Published(_)) => {
            // The archive is in place although its commit then failed: the
            // new bitmap belongs to it, as after a clean commit.
            if let Some(keep) = &new_bitmap {
                remove_stale(qmp, &plan, keep, observer).await;
            }
            return Err(e.into());
        }
        Err(e) => {
            remove_bitmaps(qmp, &backup.bitmaps).await;
            return Err(e.into());
        }
    };
    // Committed: the new bitmap now belongs to an archive on disk, and the
    // base's (and any leftover of ours) is no longer needed.
    if let Some(keep) = &new_bitmap {
        remove_stale(qmp, &plan, keep, observer).await;
    }
    Ok(Finished {
        report,
        plan,
        fills,
    })
}

/// The bitmaps to add for the new archive, one per drive, named `name`:
/// persistent where the node can store it (qcow2 v3, found by adding and
/// removing a probe bitmap), else in QEMU's memory only, which is said.
async fn bitmap_adds(
    qmp: &Qmp,
    plan: &[DrivePlan],
    nodes: &[NodeBitmaps],
    name: &str,
    observer: &mut dyn Observer,
) -> Result<Vec<BitmapAdd>, Error> {
    let mut adds = Vec::new();
    for p in plan {
        let driver = nodes
            .iter()
            .find(|n| n.node_name == p.node)
            .map_or("unknown", |n| n.driver.as_str());
        let persistent = if driver == PERSISTENT_DRIVER {
            let probe = BitmapAdd {
                node: p.node.clone(),
                name: format!("{BITMAP_PREFIX}probe-{}", std::process::id()),
                granularity: BITMAP_GRANULARITY,
                persistent: true,
            };
            match qmp.block_dirty_bitmap_add(&probe).await {
                Ok(()) => {
                    qmp.block_dirty_bitmap_remove(&probe.node, &probe.name)
                        .await
                        .map_err(Error::Bitmaps)?;
                    true
                }
                Err(qmp::Error::Command { desc, .. }) => {
                    observer.note(&format!(
                        "{}: the bitmap lives in QEMU's memory only ({desc}): after QEMU \
                         restarts, the next backup of this drive is full",
                        p.name
                    ));
                    false
                }
                Err(e) => return Err(Error::Bitmaps(e)),
            }
        } else {
            observer.note(&format!(
                "{}: the bitmap lives in QEMU's memory only (a {driver} node cannot store it): \
                         after QEMU restarts, the next backup of this drive is full",
                p.name
            ));
            false
        };
        adds.push(BitmapAdd {
            node: p.node.clone(),
            name: name.to_string(),
            granularity: BITMAP_GRANULARITY,
            persistent,
        });
    }
    Ok(adds)
}

/// Removes `bitmaps` (those this run added), logging what fails.
async fn remove_bitmaps(qmp: &Qmp, bitmaps: &[BitmapAdd]) {
    for b in bitmaps {
        if let Err(e) = qmp.block_dirty_bitmap_remove(&b.node, &b.name).await {
            warn!(node = %b.node, bitmap = %b.name, "cannot remove the new bitmap: {e}");
        }
    }
}

/// After the commit: removes every bitmap of ours but `keep` from the
/// drives' nodes (the base's, and leftovers of interrupted runs). What
/// fails is said; the next backup tries again.
async fn remove_stale(qmp: &Qmp, plan: &[DrivePlan], keep: &str, observer: &mut dyn Observer) {
    let nodes = match qmp.query_dirty_bitmaps().await {
        Ok(n) => n,
        Err(e) => {
            observer.note(&format!(
                "cannot list the bitmaps to remove the base's ({e}); the next backup removes them"
            ));
            return;
        }
    };
    for p in plan {
        for name in stale_bitmaps(&nodes, &p.node, &[keep]) {
            match qmp.block_dirty_bitmap_remove(&p.node, name).await {
                Ok(()) => info!(node = %p.node, bitmap = %name, "stale bitmap removed"),
                Err(e) => observer.note(&format!(
                    "{}: cannot remove bitmap {name} ({e}); the next backup removes it",
                    p.name
                )),
            }
        }
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
    /// Bitmaps this run added (in the jobs' transaction).
    bitmaps: Vec<BitmapAdd>,
}

impl Backup<'_> {
    /// Everything up to a complete, settled archive; returns what each
    /// incremental drive's fill copied.
    #[allow(clippy::too_many_arguments)]
    async fn copy(
        &mut self,
        drives: &[BackupDrive],
        plan: &[DrivePlan],
        bitmaps: &[BitmapAdd],
        base: Option<&Arc<RandomArchive>>,
        socket: &Path,
        speed: Option<u64>,
        observer: &mut dyn Observer,
        stop: &mut (impl Future<Output = ()> + Unpin),
    ) -> Result<Vec<Option<FillStats>>, Failure> {
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
            .zip(plan)
            .enumerate()
            .map(|(i, (d, p))| BackupJob {
                job_id: job_id(i),
                device: d.node.clone(),
                target: target_node(i),
                speed,
                filter_node_name: Some(qemu_name("cbw", i)),
                bitmap: match &p.mode {
                    Mode::Incremental { bitmap, .. } => Some(bitmap.clone()),
                    Mode::Full { .. } => None,
                },
            })
            .collect();
        self.qmp
            .backup_transaction(bitmaps, &jobs)
            .await
            .map_err(Failure::JobsRefused)?;
        self.bitmaps = bitmaps.to_vec();
        self.running.extend(jobs.into_iter().map(|j| j.job_id));
        self.wait_jobs(plan, speed.is_some(), observer, stop)
            .await?;
        // Every job completed: removing the targets makes QEMU flush and
        // disconnect, which settles the drives (full ones complete,
        // incremental ones awaiting their base).
        self.remove_targets().await?;
        self.target.clients_done();
        self.settle(stop).await?;
        self.fill(plan, base, observer, stop).await
    }

    /// Copies what each incremental drive lacks from the base, one drive
    /// after the other, reporting progress.
    async fn fill(
        &self,
        plan: &[DrivePlan],
        base: Option<&Arc<RandomArchive>>,
        observer: &mut dyn Observer,
        stop: &mut (impl Future<Output = ()> + Unpin),
    ) -> Result<Vec<Option<FillStats>>, Failure> {
        let mut fills = vec![None; plan.len()];
        for (i, p) in plan.iter().enumerate() {
            let (Mode::Incremental { base_dev, .. }, Some(base)) = (&p.mode, base) else {
                continue;
            };
            let fill = self.target.fill_from_base(i, base, *base_dev);
            tokio::pin!(fill);
            let mut tick = tokio::time::interval(TICK);
            let filled = loop {
                tokio::select! {
                    _ = &mut *stop => return Err(Failure::Stopped),
                    r = &mut fill => break r,
                    _ = tick.tick() => observer.progress(&self.target.status()),
                }
            };
            fills[i] = Some(filled.map_err(|e| match e {
                FillError::Archive(e) => Failure::Target(target::Failure::Writer(e.to_string())),
                e => Failure::Base(e),
            })?);
            info!(drive = %p.name, "filled from the base");
        }
        Ok(fills)
    }

    /// Waits until every job has completed, watching the target and the
    /// stop request. With a rate limit (`throttled`), a job whose data is
    /// all in gets its limit lifted (see [`lift_limits`]).
    async fn wait_jobs(
        &mut self,
        plan: &[DrivePlan],
        throttled: bool,
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
        let mut lifted = HashSet::new();
        while !running.is_empty() {
            tokio::select! {
                _ = &mut *stop => return Err(Failure::Stopped),
                o = &mut target_wait => return Err(match o {
                    WaitOutcome::Failed(f) => Failure::Target(f),
                    outcome => Failure::TargetEndedEarly { outcome },
                }),
                _ = tick.tick() => {
                    let status = target.status();
                    observer.progress(&status);
                    if throttled {
                        lift_limits(qmp, plan, &status, running, &mut lifted, observer).await;
                    }
                }
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
        // The jobs have ended (a bitmap-mode `never` job has given its
        // bitmap back): the base's bitmap stays, ours go.
        remove_bitmaps(self.qmp, &self.bitmaps).await;
        let incomplete = self.target.abort().await;
        Error::Failed { reason, incomplete }
    }
}

/// Lifts the rate limit of every running job whose data is all in: its
/// drive is complete in the archive (a full drive), or QEMU counts every
/// byte of the job as copied. QEMU's rate limiter also charges the
/// copy-before-write traffic of guest writes, so under guest writes a
/// throttled job can keep sleeping long after the last cluster was copied
/// (a 256 MiB drive at 5 MB/s rewritten by its guest: every cluster
/// archived after 5 s, the job complete after 37 s). Nothing is left to
/// throttle then, so the limit goes and the job ends at once. Failures are
/// logged only: the job still ends, later.
async fn lift_limits(
    qmp: &Qmp,
    plan: &[DrivePlan],
    status: &[DriveStatus],
    running: &HashSet<String>,
    lifted: &mut HashSet<String>,
    observer: &mut dyn Observer,
) {
    let pending = |i: usize| {
        let job = job_id(i);
        (running.contains(&job) && !lifted.contains(&job)).then_some(job)
    };
    if !(0..plan.len()).any(|i| pending(i).is_some()) {
        return;
    }
    let jobs = match qmp.query_block_jobs().await {
        Ok(j) => j,
        Err(e) => {
            debug!("cannot query the jobs to lift their rate limits: {e}");
            return;
        }
    };
    let mut done = Vec::new();
    for (i, p) in plan.iter().enumerate() {
        let Some(job) = pending(i) else { continue };
        let Some(info) = jobs.iter().find(|j| j.device == job) else {
            continue;
        };
        let archived = !p.mode.is_incremental() && status.get(i).is_some_and(|s| s.complete);
        let copied = info.len > 0 && info.offset >= info.len;
        if info.speed == 0 || !(archived || copied) {
            continue;
        }
        match qmp.block_job_set_speed(&job, 0).await {
            Ok(()) => {
                observer.note(&format!(
                    "{}: every cluster is in; rate limit lifted so the job ends now",
                    p.name
                ));
                done.push(job);
            }
            Err(e) => debug!(job = %job, "cannot lift the rate limit: {e}"),
        }
    }
    lifted.extend(done);
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
