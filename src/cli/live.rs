//! Running a live target to its end with a display: `serve` (a target that
//! someone else's QEMU job writes to) and a whole QMP-driven backup
//! (`backup`, `create` through QEMU, `demo`). Turns the library's outcome
//! into what the user sees and the exit status.

use std::process::ExitCode;

use anyhow::Context;

use super::display::{LiveDisplay, StatusOut, TICK};
use super::options::{ArchiveOpts, LiveOpts};
use super::signals::{Signal, stop_signal};
use crate::assembler::DriveStatus;
use crate::backup::{self, BackupDrive, DrivePlan, Observer, RunOptions};
use crate::nbd::ListenAddr;
use crate::qmp::Qmp;
use crate::sink::Target;
use crate::target::{BackupTarget, Report, WaitOutcome};

/// How a live command ended.
#[derive(Debug)]
pub enum Ended {
    /// The archive is complete.
    Done(Report),
    /// It failed; the display has said why.
    Failed,
    /// A signal stopped it; the display has said so.
    Stopped(Signal),
}

impl Ended {
    /// The exit status: 0, 1, or 128 + the signal.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Ended::Done(_) => ExitCode::SUCCESS,
            Ended::Failed => ExitCode::FAILURE,
            Ended::Stopped(s) => s.exit_code(),
        }
    }
}

/// Runs a started target to its end: finishes the archive when every
/// drive is settled, abandons it on failure or a signal.
pub async fn serve_to_end(target: BackupTarget, display: &mut LiveDisplay) -> Ended {
    let stop = stop_signal();
    tokio::pin!(stop);
    let mut signal = None;
    let outcome = {
        let wait = target.wait(async {
            signal = Some((&mut stop).await);
        });
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
        WaitOutcome::Settled => {
            let finished = target
                .finish(async {
                    signal = Some((&mut stop).await);
                })
                .await;
            match finished {
                Ok(r) => {
                    display.finished(&r);
                    Ended::Done(r)
                }
                Err(crate::target::Error::Stopped) => {
                    let signal = signal.unwrap_or(Signal::Terminate);
                    display.failed(
                        &format!(
                            "stopped by {signal} while the archive was being finished; it was \
                             not made final"
                        ),
                        &[],
                    );
                    Ended::Stopped(signal)
                }
                Err(e) => {
                    display.failed(&super::describe(&e), &[]);
                    Ended::Failed
                }
            }
        }
        WaitOutcome::Failed(reason) => {
            let missing = target.abort().await;
            display.failed(&reason.to_string(), &missing);
            Ended::Failed
        }
        WaitOutcome::Stopped => {
            let missing = target.abort().await;
            let signal = signal.unwrap_or(Signal::Terminate);
            display.failed(
                &format!("stopped by {signal} before the archive was complete"),
                &missing,
            );
            Ended::Stopped(signal)
        }
    }
}

/// A backup's [`Observer`]: everything goes to the display.
struct Shown<'a>(&'a mut LiveDisplay);

impl Observer for Shown<'_> {
    fn progress(&mut self, status: &[DriveStatus]) {
        self.0.update(status);
    }

    fn planned(&mut self, plan: &[DrivePlan]) {
        self.0.planned(plan);
    }

    fn note(&mut self, line: &str) {
        self.0.note(line);
    }
}

/// Backs up `drives` of the QEMU behind `qmp` into `output`, showing
/// progress; `opts` has the jobs' speed limit and the backup chain.
pub async fn backup_with_display(
    qmp: &Qmp,
    drives: &[BackupDrive],
    archive: &ArchiveOpts,
    live: &LiveOpts,
    output: Target,
    opts: &RunOptions,
) -> anyhow::Result<Ended> {
    let dir = tempfile::Builder::new()
        .prefix("vma-writer-")
        .tempdir()
        .context("cannot create a private socket directory")?;
    let listen = ListenAddr::Unix(dir.path().join("nbd.sock"));
    let status_out = StatusOut::for_output(&output);
    let cfg = archive.target_config(live, listen, Vec::new(), output)?;
    let initial: Vec<DriveStatus> = drives
        .iter()
        .map(|d| DriveStatus {
            name: d.name.clone(),
            size: d.size,
            done: 0,
            complete: false,
            connections: 0,
            ever_connected: false,
            idle_since: None,
            settled: false,
            base_bytes: 0,
            awaits_base: false,
        })
        .collect();
    let mut display = LiveDisplay::new(live.json, status_out, &initial);
    let stop = stop_signal();
    tokio::pin!(stop);
    let mut signal = None;
    let res = {
        let mut observer = Shown(&mut display);
        let stop = async {
            signal = Some((&mut stop).await);
        };
        backup::run(qmp, drives, cfg, opts, &mut observer, stop).await
    };
    Ok(match res {
        Ok(f) => {
            display.finished_backup(&f);
            Ended::Done(f.report)
        }
        Err(e) => {
            let finishing = matches!(e, backup::Error::Target(crate::target::Error::Stopped));
            let (reason, incomplete) = match e {
                backup::Error::Failed { reason, incomplete } => (reason.to_string(), incomplete),
                e => (super::describe(&e), Vec::new()),
            };
            match signal {
                Some(s) => {
                    let reason = if finishing {
                        format!(
                            "stopped by {s} while the archive was being finished; it was not \
                             made final"
                        )
                    } else {
                        format!("stopped by {s} before the archive was complete")
                    };
                    display.failed(&reason, &incomplete);
                    Ended::Stopped(s)
                }
                None => {
                    display.failed(&reason, &incomplete);
                    Ended::Failed
                }
            }
        }
    })
}
