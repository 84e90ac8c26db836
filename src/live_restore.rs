//! A live restore with stock QEMU: a VM runs from its backup at once while
//! the backup streams into its disks in the background.
//!
//! Each restored drive is a qcow2 overlay whose backing file is the drive's
//! read-only NBD export ([`crate::export`]). The VM reads every byte of the
//! backup at once (what it has not written itself comes from the export),
//! its writes go to the overlay, and a `block-stream` job copies the rest
//! into the overlay. When a job completes, QEMU drops the overlay's backing
//! file (in the image header too): the overlay is a self-contained image
//! and the export may stop. QEMU does all of this with stock features;
//! vma-writer only serves the export and drives QMP.
//!
//! - [`overlay_backing`] (pure): the backing file name an overlay
//!   records: the export, with `reconnect-delay` so that QEMU rides out a
//!   restart of the export instead of failing the VM's reads at once.
//! - [`prepare`]: the overlays, created with `qemu-img` (an existing one of
//!   this export is kept: it holds what the VM wrote before a restart).
//! - [`attach`]: finds each overlay among QEMU's nodes (a VM started with
//!   it on its command line) or `blockdev-add`s it.
//! - [`stream`]: starts the jobs (or follows those still running from an
//!   earlier run), reports progress, and returns once every overlay is
//!   self-contained; [`cancel`] stops them.
//!
//! Leaves to others: serving the export ([`crate::export`]), QMP
//! ([`crate::qmp`]), running `qemu-img` ([`crate::qemu_img`]), what the
//! user sees and when to stop (`vma-writer live-restore`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::nbd::ListenAddr;
use crate::qemu::MAX_NODE_NAME;
use crate::qemu_img;
use crate::qmp::{self, JobEvent, Qmp, SocketAddress};

/// Default seconds QEMU's NBD client waits for the export to come back
/// after losing it before it fails the guest's reads of data not yet
/// streamed: long enough to restart `vma-writer live-restore`.
pub const DEFAULT_RECONNECT_DELAY: u64 = 30;

/// How often [`stream`] asks QEMU for the jobs' progress.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Why a live restore cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `qemu-img` failed to create or inspect an overlay.
    #[error("overlay {}", path.display())]
    Overlay {
        /// The overlay.
        path: PathBuf,
        /// What qemu-img said.
        source: qemu_img::Error,
    },
    /// An overlay exists that belongs to another export.
    #[error(
        "{} exists with backing file {backing}, not this export's; restore into another \
         directory, or serve the export it names",
        path.display()
    )]
    Foreign {
        /// The overlay.
        path: PathBuf,
        /// The backing file it names.
        backing: String,
    },
    /// A drive name QEMU would not take as a node name.
    #[error(
        "drive '{name}' makes no QEMU node name (at most {MAX_NODE_NAME} bytes: a letter, then \
         letters, digits, '-', '.', '_')"
    )]
    NodeName {
        /// The drive's name.
        name: String,
    },
    /// A QMP command failed or the connection was lost.
    #[error(transparent)]
    Qmp(#[from] qmp::Error),
    /// A stream job ended without making its overlay self-contained.
    #[error("the stream of drive {drive} failed: {reason}")]
    Failed {
        /// The drive.
        drive: String,
        /// QEMU's error, or what happened.
        reason: String,
    },
}

/// One drive's overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// The drive's name (its export's name).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// The overlay image, absolute.
    pub path: PathBuf,
    /// True when [`prepare`] created it (false: it was there already).
    pub created: bool,
}

/// An overlay opened in QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// The overlay.
    pub overlay: Overlay,
    /// Its node name in QEMU.
    pub node: String,
    /// True when [`attach`] added it (false: QEMU had it open already).
    pub added: bool,
    /// The id of its stream job.
    pub job: String,
}

/// One drive's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The drive's name.
    pub name: String,
    /// Its size.
    pub size: u64,
    /// Bytes streamed so far (as the job counts them).
    pub done: u64,
    /// The overlay no longer has a backing file.
    pub complete: bool,
}

/// The backing file name of an overlay over export `export` at `addr`:
/// QEMU's `json:` syntax for a raw image on an NBD client, so that the
/// overlay alone tells QEMU everything, `reconnect-delay` included. A
/// Unix socket path is made absolute.
pub fn overlay_backing(addr: &ListenAddr, export: &str, reconnect_delay: u64) -> String {
    let server = match addr {
        ListenAddr::Unix(p) => SocketAddress::Unix(std::path::absolute(p).unwrap_or(p.clone())),
        ListenAddr::Tcp(a) => SocketAddress::Inet {
            host: a.ip().to_string(),
            port: a.port().to_string(),
        },
        ListenAddr::Systemd => {
            unreachable!("an export's address is its bound listener's, never `systemd`")
        }
    };
    let v = json!({
        "driver": "raw",
        "file": {
            "driver": "nbd",
            "server": server.to_qapi(),
            "export": export,
            "reconnect-delay": reconnect_delay,
        },
    });
    format!("json:{v}")
}

/// Whether two overlay backing names (see [`overlay_backing`]) name the
/// same export, whatever `reconnect-delay` each carries: a restarted live
/// restore may choose another delay and must still resume.
fn same_export(a: &str, b: &str) -> bool {
    let export = |s: &str| {
        let mut v: serde_json::Value = serde_json::from_str(s.strip_prefix("json:")?).ok()?;
        v.get_mut("file")?
            .as_object_mut()?
            .remove("reconnect-delay");
        Some(v)
    };
    a == b || matches!((export(a), export(b)), (Some(x), Some(y)) if x == y)
}

/// The overlay file of drive `name` in `dir`: `disk-NAME.qcow2`, as
/// `extract --format qcow2` names its images.
pub fn overlay_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("disk-{name}.qcow2"))
}

/// Creates the overlay of each drive (name, size) in `dir` over its export
/// at `addr`; keeps an overlay that is already there when it belongs to
/// this export (or has been streamed completely). Blocking: qemu-img opens
/// each new overlay's backing, so the export must be serving.
pub fn prepare(
    dir: &Path,
    addr: &ListenAddr,
    drives: &[(String, u64)],
    reconnect_delay: u64,
) -> Result<Vec<Overlay>, Error> {
    let mut out = Vec::new();
    for (name, size) in drives {
        let path = std::path::absolute(overlay_path(dir, name)).unwrap_or(overlay_path(dir, name));
        let backing = overlay_backing(addr, name, reconnect_delay);
        let fail = |source| Error::Overlay {
            path: path.clone(),
            source,
        };
        let created = if path.exists() {
            match qemu_img::backing_file(&path).map_err(fail)? {
                Some(b) if !same_export(&b, &backing) => {
                    return Err(Error::Foreign { path, backing: b });
                }
                _ => false,
            }
        } else {
            qemu_img::create_overlay(&path, &backing, "raw", *size).map_err(fail)?;
            true
        };
        out.push(Overlay {
            name: name.clone(),
            size: *size,
            path,
            created,
        });
    }
    Ok(out)
}

/// `name` as a QEMU id: characters QEMU does not allow become `_`, and it
/// starts with a letter.
fn qemu_id(name: &str) -> String {
    let mut id: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !id.starts_with(|c: char| c.is_ascii_alphabetic()) {
        id.insert(0, 'd');
    }
    id
}

/// True when QEMU's file name `qemu` is the file at `ours`.
fn same_file(qemu: &str, ours: &Path) -> bool {
    match (std::fs::metadata(qemu), std::fs::metadata(ours)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => Path::new(qemu) == ours,
    }
}

/// Opens each overlay in the QEMU behind `qmp`: a qcow2 node QEMU already
/// has on the overlay file (a VM started with it) is used as it is;
/// otherwise the overlay is `blockdev-add`ed as a node named after its
/// drive, for the caller to attach to a device or export.
pub async fn attach(qmp: &Qmp, overlays: Vec<Overlay>) -> Result<Vec<Attached>, Error> {
    let nodes = qmp.query_named_block_nodes().await?;
    let mut out = Vec::new();
    for o in overlays {
        let id = qemu_id(&o.name);
        let job = format!("vmaw-restore-{id}");
        let open = nodes
            .iter()
            .find(|n| n.driver == "qcow2" && same_file(&n.filename, &o.path));
        let (node, added) = match open {
            Some(n) => (n.node_name.clone(), false),
            None => {
                if id.len() > MAX_NODE_NAME {
                    return Err(Error::NodeName { name: o.name });
                }
                qmp.blockdev_add_qcow2(&id, &o.path).await?;
                (id, true)
            }
        };
        out.push(Attached {
            overlay: o,
            node,
            added,
            job,
        });
    }
    Ok(out)
}

/// Stream jobs started per drive before its failure is final. A job that
/// failed while the export was away (longer than the reconnect delay)
/// succeeds once QEMU has reconnected, and copies only what is still
/// missing; a job that fails on a corrupt cluster fails every time.
pub const STREAM_ATTEMPTS: u32 = 5;

/// Wait before the second job of a drive; doubled for each further one
/// (2, 4, 8, 16 s: about the back-off of QEMU's NBD reconnection, which
/// must find the export again before a new job can read from it).
pub const RETRY_WAIT: Duration = Duration::from_secs(2);

/// Streams every drive: starts a `block-stream` job (limited to `speed`
/// bytes per second) for each overlay that still has a backing file,
/// unless its job is running already (an earlier run started it), and
/// starts it again when it fails (up to [`STREAM_ATTEMPTS`] jobs); calls
/// `observe` with the progress every [`POLL_INTERVAL`]; returns once every
/// overlay is self-contained, or the first failure once every job has
/// ended.
pub async fn stream(
    qmp: &Qmp,
    drives: &[Attached],
    speed: Option<u64>,
    mut observe: impl FnMut(&[Progress]),
) -> Result<(), Error> {
    /// Where one drive's stream stands.
    #[derive(Default)]
    struct Job {
        /// Jobs started for it.
        attempts: u32,
        /// QEMU's error for its last job.
        error: Option<String>,
        /// When to start the next job, after one failed.
        retry_at: Option<tokio::time::Instant>,
        /// No more attempts: it failed.
        failed: bool,
    }
    let mut events = qmp.subscribe();
    let running = qmp.query_block_jobs().await?;
    let nodes = qmp.query_named_block_nodes().await?;
    let mut progress: Vec<Progress> = Vec::new();
    let mut jobs: Vec<Job> = Vec::new();
    for d in drives {
        let backed = nodes
            .iter()
            .any(|n| n.node_name == d.node && n.backing_file.is_some());
        let mut job = Job::default();
        if backed && !running.iter().any(|j| j.device == d.job) {
            qmp.block_stream(&d.job, &d.node, speed).await?;
            job.attempts = 1;
        }
        jobs.push(job);
        progress.push(Progress {
            name: d.overlay.name.clone(),
            size: d.overlay.size,
            done: if backed { 0 } else { d.overlay.size },
            complete: !backed,
        });
    }
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    loop {
        observe(&progress);
        if progress
            .iter()
            .zip(&jobs)
            .all(|(p, j)| p.complete || j.failed)
        {
            break;
        }
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(ev) => {
                    let (end, cancelled) = match ev.typed() {
                        Ok(Some(JobEvent::Completed(end))) => (end, false),
                        Ok(Some(JobEvent::Cancelled(end))) => (end, true),
                        _ => continue,
                    };
                    if let Some(i) = drives.iter().position(|d| d.job == end.device) {
                        if cancelled {
                            // Someone else cancelled it: not ours to undo.
                            jobs[i].error = Some("the job was cancelled".into());
                            jobs[i].failed = true;
                        } else if end.error.is_some() {
                            jobs[i].error = end.error;
                        }
                    }
                }
                // Lost events are made up for by the polling below.
                Err(qmp::Error::EventsLost { .. }) => {}
                Err(e) => return Err(e.into()),
            },
            _ = tick.tick() => {
                let running = qmp.query_block_jobs().await?;
                let nodes = qmp.query_named_block_nodes().await?;
                for (i, d) in drives.iter().enumerate() {
                    if progress[i].complete || jobs[i].failed {
                        continue;
                    }
                    if let Some(j) = running.iter().find(|j| j.device == d.job) {
                        progress[i].done = (j.offset as u128 * d.overlay.size as u128
                            / u128::from(j.len.max(1))) as u64;
                        continue;
                    }
                    // The job is gone: its overlay is complete, or it failed.
                    let backed = nodes.iter().any(|n| n.node_name == d.node && n.backing_file.is_some());
                    if !backed {
                        progress[i].done = d.overlay.size;
                        progress[i].complete = true;
                    } else if jobs[i].attempts < STREAM_ATTEMPTS {
                        let job = &mut jobs[i];
                        let now = tokio::time::Instant::now();
                        let at = *job.retry_at.get_or_insert_with(|| {
                            now + RETRY_WAIT * (1 << job.attempts.saturating_sub(1))
                        });
                        if now >= at {
                            qmp.block_stream(&d.job, &d.node, speed).await?;
                            job.attempts += 1;
                            job.retry_at = None;
                        }
                    } else {
                        jobs[i].failed = true;
                    }
                }
            }
        }
    }
    match drives.iter().zip(jobs).find(|(_, j)| j.failed) {
        Some((d, j)) => Err(Error::Failed {
            drive: d.overlay.name.clone(),
            reason: format!(
                "{} (after {} job(s))",
                j.error
                    .unwrap_or_else(|| "the job ended before it was complete".into()),
                j.attempts
            ),
        }),
        None => Ok(()),
    }
}

/// Cancels the stream jobs of `drives` that are still running (errors are
/// ignored: a job may just have ended).
pub async fn cancel(qmp: &Qmp, drives: &[Attached]) {
    for d in drives {
        let _ = qmp.block_job_cancel(&d.job, false).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_names_the_export_with_its_reconnect_delay() {
        let unix = ListenAddr::Unix("/run/vmaw/nbd.sock".into());
        assert_eq!(
            overlay_backing(&unix, "drive-scsi0", 30),
            r#"json:{"driver":"raw","file":{"driver":"nbd","export":"drive-scsi0","reconnect-delay":30,"server":{"path":"/run/vmaw/nbd.sock","type":"unix"}}}"#
        );
        let tcp = ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap());
        let b = overlay_backing(&tcp, "d", 5);
        assert!(
            b.contains(r#""server":{"host":"127.0.0.1","port":"10809","type":"inet"}"#),
            "{b}"
        );
        assert!(same_export(&b, &overlay_backing(&tcp, "d", 60)));
        assert!(!same_export(&b, &overlay_backing(&tcp, "e", 5)));
        assert!(!same_export(&b, "/some/other.qcow2"));
    }

    #[test]
    fn ids_for_qemu() {
        assert_eq!(qemu_id("drive-scsi0"), "drive-scsi0");
        assert_eq!(qemu_id("0disk"), "d0disk");
        assert_eq!(qemu_id("a b:c"), "a_b_c");
    }
}
