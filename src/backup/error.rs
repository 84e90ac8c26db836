//! What can go wrong with a live backup: [`Error`] for choosing the drives,
//! starting and finishing, and [`Failure`] for why a started backup was
//! abandoned (carried with the drives it left incomplete).
//!
//! Only types; the drive rules are [`super::drives`]'s and the run is
//! [`super::run`](mod@super::run)'s.

use std::time::Duration;

use crate::assembler::FillError;
use crate::nbd::ListenAddr;
use crate::qmp;
use crate::target::{self, IncompleteDrive, WaitOutcome};
use crate::vma::FormatError;

/// Errors of [`resolve_drives`](super::drives::resolve_drives) and
/// [`run`](super::run::run).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `query-named-block-nodes` or `query-block` failed.
    #[error("cannot list QEMU's block nodes")]
    ListNodes(#[source] qmp::Error),
    /// Picking the drives for `--all` failed (the block graph query).
    #[error("cannot list QEMU's drives")]
    ListDrives(#[source] qmp::Error),
    /// The dirty bitmaps of the drives cannot be listed or probed.
    #[error("cannot prepare QEMU's dirty bitmaps")]
    Bitmaps(#[source] qmp::Error),
    /// `--drive NODE` names neither a node nor a drive.
    #[error("QEMU has no block node or drive named '{node}'")]
    NoSuchNode {
        /// The name given.
        node: String,
    },
    /// Neither `--drive` nor `--all` found anything.
    #[error("no drives to back up: name them with --drive NODE[=NAME] or use --all")]
    NoDrives,
    /// A drive's archive name is not a valid VMA device name.
    #[error(transparent)]
    BadName(FormatError),
    /// Two drives would get the same archive name.
    #[error("drive name '{name}' is used twice")]
    DuplicateName {
        /// The name.
        name: String,
    },
    /// QEMU reaches the target only over a Unix socket here.
    #[error("backup serves QEMU on a Unix socket, not on {listen}")]
    NotUnixSocket {
        /// The address given.
        listen: ListenAddr,
    },
    /// The target could not start, or could not finish the archive after
    /// every drive arrived.
    #[error(transparent)]
    Target(#[from] target::Error),
    /// The backup was abandoned: jobs cancelled, targets removed, archive
    /// dropped.
    #[error("{reason}{}", list_incomplete(incomplete))]
    Failed {
        /// Why.
        reason: Failure,
        /// Every drive it left incomplete.
        incomplete: Vec<IncompleteDrive>,
    },
}

/// "; incomplete drives: a; b", or nothing.
fn list_incomplete(incomplete: &[IncompleteDrive]) -> String {
    if incomplete.is_empty() {
        return String::new();
    }
    format!("; incomplete drives: {}", join(incomplete))
}

/// "a: 1 of 2 bytes missing; b: ...".
fn join(incomplete: &[IncompleteDrive]) -> String {
    let list: Vec<String> = incomplete.iter().map(ToString::to_string).collect();
    list.join("; ")
}

/// Why a started backup was abandoned. Each message includes its cause, so
/// that one line tells the whole story.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// `blockdev-add` of a drive's NBD target failed (QEMU runs the NBD
    /// handshake in it).
    #[error("QEMU cannot open the backup target for {drive}: {error}")]
    TargetRefused {
        /// The drive's archive name.
        drive: String,
        /// QEMU's answer.
        error: qmp::Error,
    },
    /// The `transaction` of `blockdev-backup`s failed; no job started.
    #[error("QEMU refused the backup jobs: {0}")]
    JobsRefused(qmp::Error),
    /// A job ended with an error.
    #[error("backup job {job} failed: {error}")]
    JobFailed {
        /// The job id.
        job: String,
        /// QEMU's message.
        error: String,
    },
    /// Someone else cancelled a job.
    #[error("backup job {job} was cancelled")]
    JobCancelled {
        /// The job id.
        job: String,
    },
    /// Events were dropped, and a job we wait for is gone from
    /// `query-block-jobs`: its end was among them.
    #[error("lost track of a backup job's end (QMP events dropped)")]
    LostJobEnd,
    /// `query-block-jobs` failed while recovering from dropped events.
    #[error("QMP failed: {0}")]
    Qmp(qmp::Error),
    /// The QMP connection ended while jobs ran.
    #[error("lost the QMP connection: {0}")]
    QmpLost(qmp::Error),
    /// The target failed (writer error, a client gone for good).
    #[error("{0}")]
    Target(target::Failure),
    /// The target ended in another way while jobs still ran.
    #[error("the backup target ended early ({outcome:?})")]
    TargetEndedEarly {
        /// How it ended.
        outcome: WaitOutcome,
    },
    /// `blockdev-del` of a target failed after the jobs completed.
    #[error("cannot remove backup target {node}: {error}")]
    RemoveTarget {
        /// The target node.
        node: String,
        /// QEMU's answer.
        error: qmp::Error,
    },
    /// After the jobs completed and the targets were removed, the drives
    /// did not become final in time.
    #[error(
        "jobs completed but the drives did not settle within {timeout:?}: {}",
        join(incomplete)
    )]
    NotSettled {
        /// The limit that passed.
        timeout: Duration,
        /// The drives still incomplete then.
        incomplete: Vec<IncompleteDrive>,
    },
    /// The base archive failed while its clusters were copied into an
    /// incremental drive: unreadable, or a cluster that does not match its
    /// digest. Nothing of it reaches a committed archive.
    #[error("{0}; back up without --base and --incremental (a full backup) to start a new chain")]
    Base(FillError),
    /// The caller's stop future fired (SIGINT or SIGTERM).
    #[error("stopped by signal")]
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(name: &str) -> IncompleteDrive {
        IncompleteDrive {
            name: name.into(),
            missing: 1024,
            size: 4096,
        }
    }

    #[test]
    fn failed_names_reason_then_incomplete_drives() {
        let e = Error::Failed {
            reason: Failure::Stopped,
            incomplete: vec![drive("drive-a"), drive("drive-b")],
        };
        assert_eq!(
            e.to_string(),
            "stopped by signal; incomplete drives: drive-a: 1024 of 4096 bytes missing; \
             drive-b: 1024 of 4096 bytes missing"
        );
        let e = Error::Failed {
            reason: Failure::JobCancelled { job: "j0".into() },
            incomplete: Vec::new(),
        };
        assert_eq!(e.to_string(), "backup job j0 was cancelled");
        let e = Failure::NotSettled {
            timeout: Duration::from_secs(60),
            incomplete: vec![drive("drive-a")],
        };
        assert_eq!(
            e.to_string(),
            "jobs completed but the drives did not settle within 60s: \
             drive-a: 1024 of 4096 bytes missing"
        );
    }
}
