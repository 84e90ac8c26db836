//! Typed QMP commands for a live backup, a live restore and their tests:
//! the block-node queries (`query-named-block-nodes`, `query-block`,
//! `x-debug-query-block-graph`), `blockdev-add` of an NBD client node or a
//! qcow2 image file, a `transaction` of `blockdev-backup`s (with dirty
//! bitmaps added in it), the dirty bitmaps of each node,
//! `block-dirty-bitmap-add` and `-remove`, `block-stream`,
//! `block-job-cancel`, `block-job-set-speed`, `query-block-jobs`,
//! `blockdev-del`, `nbd-server-start`, `block-export-add` and `quit`.
//!
//! Each turns Rust arguments into the QAPI JSON QEMU expects and its reply
//! into Rust types; no policy. Which nodes a backup picks is the backup's
//! business ([`crate::backup`]); the connection is [`super::client`]'s.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Value, json};

use super::client::{Error, Qmp};
use super::protocol::{DecodeError, JobStatus, clip};

/// Where a QEMU NBD client connects to, or a QEMU NBD server listens on
/// (QAPI `SocketAddress`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddress {
    /// A Unix socket path.
    Unix(PathBuf),
    /// TCP; `port` is a string in QAPI (it may be a service name).
    Inet {
        /// Host name or address.
        host: String,
        /// Port number or service name.
        port: String,
    },
}

impl SocketAddress {
    /// The flat QAPI form (`{"type":"unix","path":...}`) used by
    /// `blockdev-add`'s `server` and `nbd-server-start`'s `addr`.
    pub fn to_qapi(&self) -> Value {
        match self {
            SocketAddress::Unix(p) => json!({"type": "unix", "path": p.to_string_lossy()}),
            SocketAddress::Inet { host, port } => {
                json!({"type": "inet", "host": host, "port": port})
            }
        }
    }

    /// The `SocketAddressLegacy` form (`{"type":"unix","data":{"path":...}}`)
    /// used by `nbd-server-start`'s `addr`.
    pub fn to_qapi_legacy(&self) -> Value {
        match self {
            SocketAddress::Unix(p) => {
                json!({"type": "unix", "data": {"path": p.to_string_lossy()}})
            }
            SocketAddress::Inet { host, port } => {
                json!({"type": "inet", "data": {"host": host, "port": port}})
            }
        }
    }
}

impl From<&Path> for SocketAddress {
    fn from(p: &Path) -> Self {
        SocketAddress::Unix(p.to_path_buf())
    }
}

impl From<PathBuf> for SocketAddress {
    fn from(p: PathBuf) -> Self {
        SocketAddress::Unix(p)
    }
}

impl From<&PathBuf> for SocketAddress {
    fn from(p: &PathBuf) -> Self {
        SocketAddress::Unix(p.clone())
    }
}

/// A block node as `query-named-block-nodes` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "RawNode")]
pub struct BlockNode {
    /// The node name; what `blockdev-backup`'s `device` takes.
    pub node_name: String,
    /// Exact virtual size in bytes; the NBD export must have this size.
    pub size: u64,
    /// The node is opened read-only.
    pub read_only: bool,
    /// Block driver: the format (`raw`, `qcow2`, ...) or protocol (`file`).
    pub driver: String,
    /// The file name QEMU reports for the node.
    pub filename: String,
    /// The backing file its image names (`None`: no backing file), as
    /// QEMU has it now: a completed `block-stream` clears it.
    pub backing_file: Option<String>,
}

/// The part of `query-named-block-nodes` we use.
#[derive(Deserialize)]
struct RawNode {
    #[serde(rename = "node-name")]
    node_name: String,
    ro: bool,
    drv: String,
    #[serde(default)]
    file: String,
    image: RawImage,
}

#[derive(Deserialize)]
struct RawImage {
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename", default)]
    backing_filename: Option<String>,
}

impl From<RawNode> for BlockNode {
    fn from(n: RawNode) -> BlockNode {
        BlockNode {
            node_name: n.node_name,
            size: n.image.virtual_size,
            read_only: n.ro,
            driver: n.drv,
            filename: n.file,
            backing_file: n.image.backing_filename,
        }
    }
}

/// A drive (BlockBackend) as `query-block` describes it: a VM has one per
/// disk, CD-ROM or floppy; qemu-storage-daemon has none.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "RawBlockInfo")]
pub struct BlockInfo {
    /// The drive's name (`-drive id=`); empty for a `-blockdev` drive.
    pub device: String,
    /// The guest device's id or QOM path, when a device has the drive.
    pub qdev: Option<String>,
    /// CD-ROM or floppy: the medium can be changed.
    pub removable: bool,
    /// The top node of the inserted medium; `None` when empty.
    pub node_name: Option<String>,
}

/// The part of `query-block` we use.
#[derive(Deserialize)]
struct RawBlockInfo {
    device: String,
    #[serde(default)]
    qdev: Option<String>,
    #[serde(default)]
    removable: bool,
    #[serde(default)]
    inserted: Option<RawInserted>,
}

#[derive(Deserialize)]
struct RawInserted {
    #[serde(rename = "node-name", default)]
    node_name: Option<String>,
}

impl From<RawBlockInfo> for BlockInfo {
    fn from(b: RawBlockInfo) -> BlockInfo {
        BlockInfo {
            device: b.device,
            qdev: b.qdev,
            removable: b.removable,
            node_name: b.inserted.and_then(|i| i.node_name),
        }
    }
}

/// The block graph as `x-debug-query-block-graph` reports it (unstable
/// API: QEMU may drop the command).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockGraph {
    /// Block-driver nodes, block backends and jobs.
    pub nodes: Vec<BlockGraphNode>,
    /// Parent-child links between them.
    pub edges: Vec<BlockGraphEdge>,
}

/// One node of a [`BlockGraph`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockGraphNode {
    /// Graph-local id, referenced by the edges.
    pub id: u64,
    /// `block-driver`, `block-backend`, `block-job` or `block-export`.
    #[serde(rename = "type")]
    pub node_type: String,
    /// Node name, or the backend's or job's name; may be empty.
    pub name: String,
}

/// One edge of a [`BlockGraph`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockGraphEdge {
    /// Id of the node that uses `child`.
    pub parent: u64,
    /// Id of the used node.
    pub child: u64,
}

/// One `blockdev-backup` of a [`Qmp::blockdev_backup_transaction`]:
/// `sync: full`, or `sync: bitmap` with a [`bitmap`](Self::bitmap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupJob {
    /// Job id; events name the job by it (their `device` field).
    pub job_id: String,
    /// Source node name (or drive name).
    pub device: String,
    /// Target node name, e.g. the one [`Qmp::blockdev_add_nbd`] added.
    pub target: String,
    /// Rate limit in bytes per second; `None` is unlimited.
    pub speed: Option<u64>,
    /// Name of the copy-before-write filter the job inserts over `device`,
    /// so that it can be addressed while the job runs.
    pub filter_node_name: Option<String>,
    /// With a dirty bitmap of `device`: copy only the clusters it marks
    /// (`sync: bitmap`), and leave the bitmap as it is afterwards
    /// (`bitmap-mode: never`: it goes on recording, whatever the job's
    /// outcome). `None`: copy everything (`sync: full`).
    pub bitmap: Option<String>,
}

/// A `block-dirty-bitmap-add`, alone or as a transaction action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapAdd {
    /// The node to track.
    pub node: String,
    /// The bitmap's name (unique per node).
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Stored in the image and loaded again when QEMU restarts (qcow2
    /// only; QEMU refuses it elsewhere).
    pub persistent: bool,
}

impl BitmapAdd {
    fn args(&self) -> Value {
        json!({
            "node": self.node,
            "name": self.name,
            "granularity": self.granularity,
            "persistent": self.persistent,
        })
    }
}

/// A dirty bitmap as `query-named-block-nodes` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DirtyBitmap {
    /// Its name; empty for an anonymous bitmap (one a job or the
    /// copy-before-write filter made for itself).
    #[serde(default)]
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// It records writes now (false: disabled, or inconsistent).
    #[serde(default)]
    pub recording: bool,
    /// It is stored in the image.
    #[serde(default)]
    pub persistent: bool,
    /// An operation (a backup job) uses it.
    #[serde(default)]
    pub busy: bool,
    /// A persistent bitmap QEMU did not store cleanly (it crashed): it
    /// may miss writes and can only be removed.
    #[serde(default)]
    pub inconsistent: bool,
    /// Bytes it marks dirty.
    pub count: u64,
}

/// The dirty bitmaps of one named node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NodeBitmaps {
    /// The node.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// Its block driver (`qcow2`, `raw`, ...).
    #[serde(rename = "drv")]
    pub driver: String,
    /// Its bitmaps.
    #[serde(rename = "dirty-bitmaps", default)]
    pub bitmaps: Vec<DirtyBitmap>,
}

/// One block job as `query-block-jobs` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JobInfo {
    /// The job id (QEMU calls it `device` here).
    pub device: String,
    /// Job type, e.g. `backup`.
    #[serde(rename = "type")]
    pub job_type: String,
    /// Total amount of work, in bytes for a backup.
    pub len: u64,
    /// Work done so far.
    pub offset: u64,
    /// Rate limit in bytes per second, 0 for none.
    pub speed: u64,
    /// Job state.
    pub status: JobStatus,
    /// Error message, when the job failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// Runs a command and deserializes its reply.
async fn call<T: for<'de> Deserialize<'de>>(
    qmp: &Qmp,
    command: &str,
    args: Option<Value>,
) -> Result<T, Error> {
    let v = qmp.execute(command, args).await?;
    T::deserialize(&v).map_err(|e| {
        DecodeError {
            what: format!("unexpected reply to {command}: {e}"),
            text: clip(&v.to_string()),
        }
        .into()
    })
}

impl Qmp {
    /// Every named block node (`query-named-block-nodes` with `flat`).
    pub async fn query_named_block_nodes(&self) -> Result<Vec<BlockNode>, Error> {
        call(self, "query-named-block-nodes", Some(json!({"flat": true}))).await
    }

    /// Every drive (`query-block`); empty in qemu-storage-daemon.
    pub async fn query_block(&self) -> Result<Vec<BlockInfo>, Error> {
        call(self, "query-block", None).await
    }

    /// The block graph (`x-debug-query-block-graph`). Unstable API: fails
    /// with [`ErrorClass::CommandNotFound`](super::protocol::ErrorClass::CommandNotFound) where QEMU
    /// lacks it.
    pub async fn query_block_graph(&self) -> Result<BlockGraph, Error> {
        call(self, "x-debug-query-block-graph", None).await
    }

    /// Adds an NBD client node `node_name` connected to `server`, export
    /// `export`. QEMU runs the NBD handshake inside this command, so a
    /// server that refuses shows up as [`Error::Command`].
    pub async fn blockdev_add_nbd(
        &self,
        node_name: &str,
        server: impl Into<SocketAddress>,
        export: &str,
    ) -> Result<(), Error> {
        let args = json!({
            "driver": "nbd",
            "node-name": node_name,
            "server": server.into().to_qapi(),
            "export": export,
        });
        self.execute("blockdev-add", Some(args)).await.map(drop)
    }

    /// Adds the qcow2 image file `path` as node `node_name` (its backing
    /// file, if its header names one, is opened too, as the header says).
    pub async fn blockdev_add_qcow2(&self, node_name: &str, path: &Path) -> Result<(), Error> {
        let args = json!({
            "driver": "qcow2",
            "node-name": node_name,
            "file": {"driver": "file", "filename": path.to_string_lossy()},
        });
        self.execute("blockdev-add", Some(args)).await.map(drop)
    }

    /// Starts job `job_id` copying into node `device` everything it reads
    /// from its backing chain (`block-stream` without a base); once it
    /// completes, `device` has no backing file any more. `speed` limits it
    /// (bytes per second).
    pub async fn block_stream(
        &self,
        job_id: &str,
        device: &str,
        speed: Option<u64>,
    ) -> Result<(), Error> {
        let mut args = json!({"job-id": job_id, "device": device});
        if let Some(speed) = speed {
            args["speed"] = json!(speed);
        }
        self.execute("block-stream", Some(args)).await.map(drop)
    }

    /// Starts every job in one `transaction` of `blockdev-backup`s, so
    /// all drives are copied from the same point in time. Either all jobs
    /// start or none does.
    pub async fn blockdev_backup_transaction(&self, jobs: &[BackupJob]) -> Result<(), Error> {
        self.backup_transaction(&[], jobs).await
    }

    /// One `transaction`: first every bitmap of `bitmaps` is added, then
    /// every job starts; all at one point in time, so each new bitmap
    /// records exactly the writes after the jobs' image. Either everything
    /// happens or nothing does.
    pub async fn backup_transaction(
        &self,
        bitmaps: &[BitmapAdd],
        jobs: &[BackupJob],
    ) -> Result<(), Error> {
        let actions: Vec<Value> = bitmaps
            .iter()
            .map(|b| json!({"type": "block-dirty-bitmap-add", "data": b.args()}))
            .chain(
                jobs.iter()
                    .map(|j| json!({"type": "blockdev-backup", "data": backup_args(j)})),
            )
            .collect();
        self.execute("transaction", Some(json!({ "actions": actions })))
            .await
            .map(drop)
    }

    /// The dirty bitmaps of every named node (`query-named-block-nodes`).
    pub async fn query_dirty_bitmaps(&self) -> Result<Vec<NodeBitmaps>, Error> {
        call(self, "query-named-block-nodes", Some(json!({"flat": true}))).await
    }

    /// Adds a dirty bitmap, enabled: it records every write from now on.
    pub async fn block_dirty_bitmap_add(&self, bitmap: &BitmapAdd) -> Result<(), Error> {
        self.execute("block-dirty-bitmap-add", Some(bitmap.args()))
            .await
            .map(drop)
    }

    /// Removes a dirty bitmap (from the image too when it is persistent).
    pub async fn block_dirty_bitmap_remove(&self, node: &str, name: &str) -> Result<(), Error> {
        self.execute(
            "block-dirty-bitmap-remove",
            Some(json!({"node": node, "name": name})),
        )
        .await
        .map(drop)
    }

    /// Cancels a block job; a `BLOCK_JOB_CANCELLED` event follows. `force`
    /// matters only for jobs in the ready state (mirror).
    pub async fn block_job_cancel(&self, job_id: &str, force: bool) -> Result<(), Error> {
        self.execute(
            "block-job-cancel",
            Some(json!({"device": job_id, "force": force})),
        )
        .await
        .map(drop)
    }

    /// Changes a job's rate limit (bytes per second, 0 for none).
    pub async fn block_job_set_speed(&self, job_id: &str, speed: u64) -> Result<(), Error> {
        self.execute(
            "block-job-set-speed",
            Some(json!({"device": job_id, "speed": speed})),
        )
        .await
        .map(drop)
    }

    /// Every block job with its progress.
    pub async fn query_block_jobs(&self) -> Result<Vec<JobInfo>, Error> {
        call(self, "query-block-jobs", None).await
    }

    /// Removes a node added with `blockdev-add`. For an NBD client node this
    /// makes QEMU send FLUSH and then DISC to the server.
    pub async fn blockdev_del(&self, node_name: &str) -> Result<(), Error> {
        self.execute("blockdev-del", Some(json!({ "node-name": node_name })))
            .await
            .map(drop)
    }

    /// Starts QEMU's NBD server (one per QEMU process).
    pub async fn nbd_server_start(&self, addr: impl Into<SocketAddress>) -> Result<(), Error> {
        let addr = addr.into().to_qapi_legacy();
        self.execute("nbd-server-start", Some(json!({ "addr": addr })))
            .await
            .map(drop)
    }

    /// Exports `node_name` over QEMU's NBD server under the name `name`.
    pub async fn block_export_add_nbd(
        &self,
        id: &str,
        node_name: &str,
        name: &str,
        writable: bool,
    ) -> Result<(), Error> {
        let args = json!({
            "type": "nbd",
            "id": id,
            "node-name": node_name,
            "name": name,
            "writable": writable,
        });
        self.execute("block-export-add", Some(args)).await.map(drop)
    }

    /// Asks QEMU to exit. Succeeds also when QEMU closes the connection
    /// before its reply arrives.
    pub async fn quit(&self) -> Result<(), Error> {
        match self.execute("quit", None).await {
            Ok(_) | Err(Error::Closed { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn backup_args(j: &BackupJob) -> Value {
    let mut data = json!({
        "job-id": j.job_id,
        "device": j.device,
        "target": j.target,
        "sync": "full",
    });
    if let Some(b) = &j.bitmap {
        data["sync"] = json!("bitmap");
        data["bitmap"] = json!(b);
        data["bitmap-mode"] = json!("never");
    }
    if let Some(speed) = j.speed {
        data["speed"] = json!(speed);
    }
    if let Some(f) = &j.filter_node_name {
        data["filter-node-name"] = json!(f);
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_info() {
        let v = json!([{"auto-finalize": true, "io-status": "ok", "device": "backup-a", "auto-dismiss": true, "busy": false, "len": 10486272, "offset": 1048576, "status": "running", "paused": false, "speed": 1048576, "ready": false, "type": "backup"}]);
        let jobs: Vec<JobInfo> = Deserialize::deserialize(&v).unwrap();
        assert_eq!(jobs[0].device, "backup-a");
        assert_eq!(jobs[0].status, JobStatus::Running);
        assert_eq!(jobs[0].speed, 1048576);
    }

    #[test]
    fn backup_job_args() {
        let j = BackupJob {
            job_id: "backup-a".into(),
            device: "a".into(),
            target: "nbd-a".into(),
            speed: Some(4096),
            filter_node_name: Some("cbw-a".into()),
            bitmap: None,
        };
        assert_eq!(
            backup_args(&j),
            json!({"job-id": "backup-a", "device": "a", "target": "nbd-a", "sync": "full", "speed": 4096, "filter-node-name": "cbw-a"})
        );
        let j = BackupJob {
            speed: None,
            filter_node_name: None,
            ..j
        };
        assert_eq!(
            backup_args(&j),
            json!({"job-id": "backup-a", "device": "a", "target": "nbd-a", "sync": "full"})
        );
        let j = BackupJob {
            bitmap: Some("vma-writer-x".into()),
            ..j
        };
        assert_eq!(
            backup_args(&j),
            json!({"job-id": "backup-a", "device": "a", "target": "nbd-a", "sync": "bitmap",
                   "bitmap": "vma-writer-x", "bitmap-mode": "never"})
        );
    }

    #[test]
    fn dirty_bitmaps_reply() {
        // As qemu-storage-daemon 10.0 answers after a crash left a
        // persistent bitmap inconsistent.
        let nodes: Vec<NodeBitmaps> = Deserialize::deserialize(&json!([
            {"node-name": "a", "drv": "qcow2", "ro": false, "image": {"virtual-size": 1},
             "dirty-bitmaps": [{"name": "p1", "recording": false, "persistent": true,
                                "busy": false, "granularity": 65536, "count": 0,
                                "inconsistent": true}]},
            {"node-name": "a-file", "drv": "file", "ro": false, "image": {"virtual-size": 1}},
            {"node-name": "#block034", "drv": "copy-before-write", "dirty-bitmaps": [
                {"busy": false, "count": 0, "granularity": 65536, "persistent": false,
                 "recording": false}]}
        ]))
        .unwrap();
        assert_eq!(nodes[0].driver, "qcow2");
        let b = &nodes[0].bitmaps[0];
        assert!(b.inconsistent && b.persistent && !b.recording);
        assert_eq!(b.granularity, 65536);
        assert!(nodes[1].bitmaps.is_empty());
        assert_eq!(nodes[2].bitmaps[0].name, "");
    }

    #[test]
    fn socket_address_forms() {
        let unix = SocketAddress::from(Path::new("/run/x.sock"));
        assert_eq!(
            unix.to_qapi(),
            json!({"type": "unix", "path": "/run/x.sock"})
        );
        assert_eq!(
            unix.to_qapi_legacy(),
            json!({"type": "unix", "data": {"path": "/run/x.sock"}})
        );
        let inet = SocketAddress::Inet {
            host: "127.0.0.1".into(),
            port: "10809".into(),
        };
        assert_eq!(
            inet.to_qapi(),
            json!({"type": "inet", "host": "127.0.0.1", "port": "10809"})
        );
        assert_eq!(
            inet.to_qapi_legacy(),
            json!({"type": "inet", "data": {"host": "127.0.0.1", "port": "10809"}})
        );
    }

    #[test]
    fn node_and_drive_replies() {
        // Shaped like qemu-system-x86_64 10.0's replies.
        let nodes: Vec<BlockNode> = Deserialize::deserialize(&json!([
            {"node-name": "#block123", "ro": false, "drv": "qcow2", "file": "/img/a.qcow2",
             "image": {"virtual-size": 1073741824, "filename": "/img/a.qcow2"}},
            {"node-name": "ro0", "ro": true, "drv": "raw",
             "image": {"virtual-size": 4096, "backing-filename": "nbd+unix:///d?socket=/s"}}
        ]))
        .unwrap();
        assert_eq!(
            nodes,
            [
                BlockNode {
                    node_name: "#block123".into(),
                    size: 1 << 30,
                    read_only: false,
                    driver: "qcow2".into(),
                    filename: "/img/a.qcow2".into(),
                    backing_file: None,
                },
                BlockNode {
                    node_name: "ro0".into(),
                    size: 4096,
                    read_only: true,
                    driver: "raw".into(),
                    filename: String::new(),
                    backing_file: Some("nbd+unix:///d?socket=/s".into()),
                },
            ]
        );
        let drives: Vec<BlockInfo> = Deserialize::deserialize(&json!([
            {"device": "drive-virtio0", "qdev": "/machine/peripheral/virtio0/virtio-backend",
             "removable": false, "locked": false, "type": "unknown",
             "inserted": {"node-name": "#block123", "ro": false, "drv": "qcow2"}},
            {"device": "ide2-cd0", "qdev": "ide2", "removable": true, "locked": false,
             "tray_open": false, "type": "unknown"}
        ]))
        .unwrap();
        assert_eq!(drives[0].node_name.as_deref(), Some("#block123"));
        assert_eq!(drives[0].device, "drive-virtio0");
        assert!(!drives[0].removable);
        assert_eq!(drives[1].node_name, None);
        assert!(drives[1].removable);
        assert_eq!(drives[1].qdev.as_deref(), Some("ide2"));
    }

    #[test]
    fn block_graph_reply() {
        let g: BlockGraph = Deserialize::deserialize(&json!({
            "edges": [{"name": "file", "parent": 2, "child": 3, "perm": [], "shared-perm": []}],
            "nodes": [{"name": "a", "type": "block-driver", "id": 2},
                      {"name": "", "type": "block-backend", "id": 1}]}))
        .unwrap();
        assert_eq!(
            g.edges,
            [BlockGraphEdge {
                parent: 2,
                child: 3
            }]
        );
        assert_eq!(g.nodes[0].node_type, "block-driver");
        assert_eq!(g.nodes[1].name, "");
    }
}
