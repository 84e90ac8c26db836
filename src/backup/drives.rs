//! Which drives a backup copies, and under which names: `--drive
//! NODE[=NAME]` and `--all` resolved against the nodes and drives QEMU
//! reports, Proxmox's `drive-` naming, and the rules for what a VM or a
//! storage daemon "has" as drives.
//!
//! Policy only: the raw queries are [`crate::qmp`]'s typed commands; running
//! the backup is [`super::run`](mod@super::run)'s.

use std::collections::HashSet;

use super::error::Error;
use crate::qmp::{self, BlockGraph, BlockInfo, BlockNode, ErrorClass, Qmp};

/// One drive to back up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupDrive {
    /// QEMU node (or drive) name of the source.
    pub node: String,
    /// Device name in the archive and NBD export name.
    pub name: String,
    /// Exact size in bytes.
    pub size: u64,
}

/// A block node and the drive that uses it, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedNode {
    /// The node as QEMU describes it.
    pub node: BlockNode,
    /// The drive (BlockBackend) name, or else the guest device's qdev id,
    /// when a device has this node inserted. `None` in qemu-storage-daemon.
    pub drive_name: Option<String>,
}

/// Proxmox's device name for a QEMU drive: `drive-` + the drive id, unless
/// it already starts with `drive-`.
pub fn archive_name(id: &str) -> String {
    if id.starts_with("drive-") {
        id.to_string()
    } else {
        format!("drive-{id}")
    }
}

/// Every named block node, with the name of the drive that uses it.
pub async fn block_nodes(qmp: &Qmp) -> Result<Vec<NamedNode>, qmp::Error> {
    Ok(inventory(qmp).await?.0)
}

/// The drives `vma-writer backup --all` backs up, in `query-block` order
/// for a VM and sorted by node name for the storage daemon:
///
/// - When QEMU has drives (`query-block` lists any, i.e. a VM): the top
///   node of every drive that has a medium inserted, is not removable
///   (CD-ROM, floppy) and is writable. Read-only drives are install
///   media or shared images, not VM state.
/// - Otherwise (qemu-storage-daemon, or a VM with no drives): every node
///   that no other block node uses as a child (the roots of
///   `x-debug-query-block-graph`), e.g. the `qcow2` node but not the
///   `file` node under it; NBD exports and jobs do not count as parents.
///   Read-only roots are included: there is no guest, and read-only is
///   how `create`/`demo` open source images (QEMU backs them up fine).
///   Without that command (it is unstable API), a protocol node (`file`,
///   `host_device`) is dropped when another node reports the same file
///   name.
///
/// Each is named [`archive_name`] of its drive name, else of its node
/// name. Call it before adding backup targets: NBD target nodes and the
/// copy-before-write filters of running jobs are roots too.
pub async fn all_drives(qmp: &Qmp) -> Result<Vec<BackupDrive>, qmp::Error> {
    let (nodes, drives) = inventory(qmp).await?;
    all_of(qmp, &nodes, &drives).await
}

/// The nodes (named after their drives) and the drives QEMU has.
async fn inventory(qmp: &Qmp) -> Result<(Vec<NamedNode>, Vec<BlockInfo>), qmp::Error> {
    let nodes = qmp.query_named_block_nodes().await?;
    let drives = qmp.query_block().await?;
    Ok((name_nodes(nodes, &drives), drives))
}

/// [`all_drives`] once the nodes and drives are known.
async fn all_of(
    qmp: &Qmp,
    nodes: &[NamedNode],
    drives: &[BlockInfo],
) -> Result<Vec<BackupDrive>, qmp::Error> {
    let picked = if drives.is_empty() {
        let roots = match qmp.query_block_graph().await {
            Ok(g) => graph_roots(&g),
            Err(qmp::Error::Command {
                class: ErrorClass::CommandNotFound,
                ..
            }) => roots_by_filename(nodes),
            Err(e) => return Err(e),
        };
        let mut out: Vec<&NamedNode> = nodes
            .iter()
            .filter(|n| roots.contains(&n.node.node_name))
            .collect();
        out.sort_by(|a, b| a.node.node_name.cmp(&b.node.node_name));
        out
    } else {
        vm_drives(nodes, drives)
    };
    Ok(picked
        .into_iter()
        .map(|n| BackupDrive {
            node: n.node.node_name.clone(),
            name: archive_name(n.drive_name.as_ref().unwrap_or(&n.node.node_name)),
            size: n.node.size,
        })
        .collect())
}

/// Resolves `--drive NODE[=NAME]` and `--all` against what QEMU reports:
/// the `--all` drives first, then the named ones. Archive names must be
/// valid and unique.
pub async fn resolve_drives(
    qmp: &Qmp,
    specs: &[String],
    all: bool,
) -> Result<Vec<BackupDrive>, Error> {
    let (nodes, drives) = inventory(qmp).await.map_err(Error::ListNodes)?;
    let mut out = Vec::new();
    if all {
        out = all_of(qmp, &nodes, &drives)
            .await
            .map_err(Error::ListDrives)?;
    }
    for s in specs {
        let (node, name) = match s.split_once('=') {
            Some((n, name)) => (n, Some(name.to_string())),
            None => (s.as_str(), None),
        };
        let found = nodes
            .iter()
            .find(|n| n.node.node_name == node || n.drive_name.as_deref() == Some(node))
            .ok_or_else(|| Error::NoSuchNode {
                node: node.to_string(),
            })?;
        out.push(BackupDrive {
            node: found.node.node_name.clone(),
            name: name.unwrap_or_else(|| archive_name(node)),
            size: found.node.size,
        });
    }
    if out.is_empty() {
        return Err(Error::NoDrives);
    }
    let mut seen = HashSet::new();
    for d in &out {
        crate::vma::header::check_file_name("drive", &d.name).map_err(Error::BadName)?;
        if !seen.insert(d.name.as_str()) {
            return Err(Error::DuplicateName {
                name: d.name.clone(),
            });
        }
    }
    Ok(out)
}

/// Prefix of the QOM path of a guest device created with an `id`.
const QOM_PERIPHERAL: &str = "/machine/peripheral/";

/// A drive's name: its BlockBackend name (`-drive id=`), else the guest
/// device's id (taken from a `/machine/peripheral/ID/...` QOM path), else
/// the whole qdev path.
fn drive_name(d: &BlockInfo) -> Option<String> {
    if !d.device.is_empty() {
        return Some(d.device.clone());
    }
    let qdev = d.qdev.as_deref().filter(|q| !q.is_empty())?;
    let id = qdev
        .strip_prefix(QOM_PERIPHERAL)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or(qdev);
    Some(id.to_string())
}

/// Names the nodes a drive uses after that drive.
fn name_nodes(nodes: Vec<BlockNode>, drives: &[BlockInfo]) -> Vec<NamedNode> {
    nodes
        .into_iter()
        .map(|node| {
            let drive_name = drives
                .iter()
                .find(|d| d.node_name.as_deref() == Some(node.node_name.as_str()))
                .and_then(drive_name);
            NamedNode { node, drive_name }
        })
        .collect()
}

/// `--all` on a VM: the top node of each non-removable drive with a medium,
/// when writable, in `query-block` order.
fn vm_drives<'a>(nodes: &'a [NamedNode], drives: &[BlockInfo]) -> Vec<&'a NamedNode> {
    drives
        .iter()
        .filter(|d| !d.removable)
        .filter_map(|d| {
            let name = d.node_name.as_deref()?;
            nodes.iter().find(|n| n.node.node_name == name)
        })
        .filter(|n| !n.node.read_only)
        .collect()
}

/// Named block-driver nodes with no block-driver parent.
fn graph_roots(g: &BlockGraph) -> Vec<String> {
    let is_driver = |id: u64| {
        g.nodes
            .iter()
            .any(|n| n.id == id && n.node_type == "block-driver")
    };
    g.nodes
        .iter()
        .filter(|n| n.node_type == "block-driver" && !n.name.is_empty())
        .filter(|n| {
            !g.edges
                .iter()
                .any(|e| e.child == n.id && is_driver(e.parent))
        })
        .map(|n| n.name.clone())
        .collect()
}

/// Fallback without the graph: drop protocol nodes that share their file
/// name with another node (the format node over them).
fn roots_by_filename(nodes: &[NamedNode]) -> Vec<String> {
    const PROTOCOL_DRIVERS: &[&str] = &["file", "host_device", "host_cdrom"];
    let is_protocol = |n: &BlockNode| PROTOCOL_DRIVERS.contains(&n.driver.as_str());
    nodes
        .iter()
        .map(|n| &n.node)
        .filter(|n| {
            !(is_protocol(n)
                && nodes.iter().map(|o| &o.node).any(|o| {
                    o.node_name != n.node_name && o.filename == n.filename && !is_protocol(o)
                }))
        })
        .map(|n| n.node_name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    #[test]
    fn names() {
        assert_eq!(archive_name("scsi0"), "drive-scsi0");
        assert_eq!(archive_name("drive-scsi0"), "drive-scsi0");
    }

    #[test]
    fn roots_of_graph() {
        // As qemu-storage-daemon 10.0 answers with an NBD export on "a".
        let v = json!({"edges": [
            {"name": "file", "parent": 5, "child": 4, "perm": [], "shared-perm": []},
            {"name": "file", "parent": 2, "child": 3, "perm": [], "shared-perm": []},
            {"name": "root", "parent": 1, "child": 2, "perm": [], "shared-perm": []}],
          "nodes": [
            {"name": "b", "type": "block-driver", "id": 5},
            {"name": "b-file", "type": "block-driver", "id": 4},
            {"name": "a", "type": "block-driver", "id": 2},
            {"name": "a-file", "type": "block-driver", "id": 3},
            {"name": "", "type": "block-backend", "id": 1}]});
        let g: BlockGraph = Deserialize::deserialize(&v).unwrap();
        assert_eq!(graph_roots(&g), vec!["b".to_string(), "a".to_string()]);
    }

    #[test]
    fn vm_drive_selection() {
        // Shaped like qemu-system-x86_64 10.0: a -drive disk, a -blockdev
        // disk on a device with an id, a read-only disk, an empty CD-ROM and
        // a CD-ROM with a medium.
        let blocks = json!([
            {"device": "drive-virtio0", "qdev": "/machine/peripheral/virtio0/virtio-backend",
             "removable": false, "locked": false, "type": "unknown",
             "inserted": {"node-name": "#block123", "ro": false, "drv": "qcow2"}},
            {"device": "", "qdev": "/machine/peripheral/scsi0/virtio-backend",
             "removable": false, "locked": false, "type": "unknown",
             "inserted": {"node-name": "drive-scsi0", "ro": false, "drv": "raw"}},
            {"device": "", "qdev": "ro-disk", "removable": false, "locked": false,
             "type": "unknown", "inserted": {"node-name": "ro0", "ro": true, "drv": "raw"}},
            {"device": "ide2-cd0", "qdev": "ide2", "removable": true, "locked": false,
             "tray_open": false, "type": "unknown"},
            {"device": "ide3-cd0", "qdev": "ide3", "removable": true, "locked": false,
             "tray_open": false, "type": "unknown",
             "inserted": {"node-name": "#block9", "ro": true, "drv": "raw"}}
        ]);
        let node = |name: &str, size: u64, ro: bool, drv: &str| {
            json!({"node-name": name, "ro": ro, "drv": drv, "file": format!("/img/{name}"),
                   "image": {"virtual-size": size}})
        };
        let nodes = json!([
            node("#block123", 1 << 30, false, "qcow2"),
            node("#block045", 200_000, false, "file"),
            node("drive-scsi0", 10_487_296, false, "raw"),
            node("ro0", 4096, true, "raw"),
            node("#block9", 1 << 20, true, "raw"),
        ]);
        let drives = Vec::<BlockInfo>::deserialize(&blocks).unwrap();
        let nodes = name_nodes(Vec::<BlockNode>::deserialize(&nodes).unwrap(), &drives);
        let picked: Vec<_> = vm_drives(&nodes, &drives)
            .into_iter()
            .map(|n| (n.node.node_name.clone(), n.drive_name.clone(), n.node.size))
            .collect();
        assert_eq!(
            picked,
            [
                ("#block123".into(), Some("drive-virtio0".into()), 1 << 30),
                ("drive-scsi0".into(), Some("scsi0".into()), 10_487_296),
            ]
        );
        let ro = nodes.iter().find(|n| n.node.node_name == "ro0").unwrap();
        assert_eq!(ro.drive_name.as_deref(), Some("ro-disk"));
    }

    #[test]
    fn roots_without_graph() {
        let node = |name: &str, drv: &str, file: &str| NamedNode {
            node: BlockNode {
                node_name: name.into(),
                size: 1,
                read_only: false,
                driver: drv.into(),
                filename: file.into(),
                backing_file: None,
            },
            drive_name: None,
        };
        let nodes = vec![
            node("a", "qcow2", "/x/a.qcow2"),
            node("a-file", "file", "/x/a.qcow2"),
            node("lonely", "file", "/x/lonely.raw"),
        ];
        assert_eq!(roots_by_filename(&nodes), vec!["a", "lonely"]);
    }
}
