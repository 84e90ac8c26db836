//! The bitmap chain of incremental backups, as policy: every archive a
//! backup commits has, on each of its drives' nodes, a dirty bitmap named
//! from the archive's uuid ([`bitmap_name`]) that records every write after
//! the archive's point in time. A later backup with that archive as its
//! base copies only what that bitmap marks, and takes every other cluster
//! from the base ([`plan`] decides per drive, and says why a drive is
//! backed up in full instead). Once the new archive is committed, the
//! base's bitmap and any other bitmap of ours but the new one are removed
//! ([`stale_bitmaps`]); on failure only the new ones are, so the base's
//! keeps recording every write since the base.
//!
//! Pure: the QMP calls are [`super::run`](mod@super::run)'s, the base
//! archive is [`super::base`]'s.

use std::fmt;

use uuid::Uuid;

use super::base::BaseArchive;
use super::drives::BackupDrive;
use crate::qmp::NodeBitmaps;
use crate::vma::DevId;
use crate::vma::consts::VMA_CLUSTER_SIZE;

/// Every bitmap vma-writer makes starts with this; nothing else of ours
/// does, and we remove no bitmap without it.
pub const BITMAP_PREFIX: &str = "vma-writer-";

/// Bytes per bit of our bitmaps: one VMA cluster, the unit QEMU's backup
/// job copies into our target.
pub const BITMAP_GRANULARITY: u64 = VMA_CLUSTER_SIZE as u64;

/// The block driver whose nodes can store persistent bitmaps.
pub const PERSISTENT_DRIVER: &str = "qcow2";

/// The bitmap that belongs to the archive with `uuid`:
/// `vma-writer-<uuid>`.
pub fn bitmap_name(uuid: &Uuid) -> String {
    format!("{BITMAP_PREFIX}{}", uuid.hyphenated())
}

/// How one drive is backed up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Every cluster from QEMU; `reason` says why when there was a base.
    Full {
        /// Why not incremental (`None` without a base).
        reason: Option<FullReason>,
    },
    /// Only the clusters `bitmap` marks from QEMU, the rest from the base.
    Incremental {
        /// The drive's device in the base.
        base_dev: DevId,
        /// The base's bitmap on the drive's node.
        bitmap: String,
        /// Bytes the bitmap marks now (about what QEMU will send).
        dirty: u64,
    },
}

impl Mode {
    /// True for [`Mode::Incremental`].
    pub fn is_incremental(&self) -> bool {
        matches!(self, Mode::Incremental { .. })
    }
}

/// Why a drive is backed up in full although there is a base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FullReason {
    /// The base cannot be opened or read at random.
    BaseUnusable {
        /// The base's path.
        path: String,
        /// Why.
        error: String,
    },
    /// The base has no device of this name: the drive is new.
    NewDrive,
    /// The drive's size differs from the base's device.
    SizeChanged {
        /// Bytes in the base.
        base: u64,
        /// Bytes now.
        now: u64,
    },
    /// The node has no bitmap for the base.
    NoBitmap {
        /// The bitmap looked for.
        bitmap: String,
        /// The node.
        node: String,
    },
    /// The bitmap's granularity is not one cluster.
    Granularity {
        /// The bitmap.
        bitmap: String,
        /// Its granularity.
        found: u64,
    },
    /// QEMU did not store the persistent bitmap cleanly (it crashed).
    Inconsistent {
        /// The bitmap.
        bitmap: String,
    },
    /// The bitmap does not record writes (someone disabled it).
    Disabled {
        /// The bitmap.
        bitmap: String,
    },
    /// Another operation uses the bitmap.
    Busy {
        /// The bitmap.
        bitmap: String,
    },
}

impl fmt::Display for FullReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FullReason::BaseUnusable { path, error } => {
                write!(f, "the base {path} cannot be used: {error}")
            }
            FullReason::NewDrive => f.write_str("new since the base (the base has no such drive)"),
            FullReason::SizeChanged { base, now } => {
                write!(f, "its size changed ({base} bytes in the base, {now} now)")
            }
            FullReason::NoBitmap { bitmap, node } => write!(
                f,
                "node {node} has no bitmap {bitmap} (QEMU restarted and the bitmap was not \
                 persistent, or the base is from another VM or an older backup)"
            ),
            FullReason::Granularity { bitmap, found } => write!(
                f,
                "bitmap {bitmap} has a granularity of {found} bytes, not {BITMAP_GRANULARITY}"
            ),
            FullReason::Inconsistent { bitmap } => write!(
                f,
                "bitmap {bitmap} is inconsistent (QEMU did not store it cleanly) and may miss writes"
            ),
            FullReason::Disabled { bitmap } => {
                write!(f, "bitmap {bitmap} is disabled and may miss writes")
            }
            FullReason::Busy { bitmap } => {
                write!(f, "bitmap {bitmap} is in use by another operation")
            }
        }
    }
}

/// One drive's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrivePlan {
    /// Its archive name.
    pub name: String,
    /// Its node.
    pub node: String,
    /// Full or incremental.
    pub mode: Mode,
}

/// Decides, for each of `drives`, whether it is backed up incrementally
/// from `base` or in full and why: incrementally when the base has a
/// device of the same name and size and the drive's node has a bitmap for
/// the base with a granularity of one cluster that records writes, is
/// consistent and is not in use. `nodes` is what QEMU reports.
pub fn plan(
    drives: &[BackupDrive],
    base: Option<&BaseArchive>,
    nodes: &[NodeBitmaps],
) -> Vec<DrivePlan> {
    drives
        .iter()
        .map(|d| DrivePlan {
            name: d.name.clone(),
            node: d.node.clone(),
            mode: match base {
                None => Mode::Full { reason: None },
                Some(base) => drive_mode(d, base, nodes),
            },
        })
        .collect()
}

fn drive_mode(d: &BackupDrive, base: &BaseArchive, nodes: &[NodeBitmaps]) -> Mode {
    let full = |reason| Mode::Full {
        reason: Some(reason),
    };
    let archive = match base {
        BaseArchive::Unusable { path, error } => {
            return full(FullReason::BaseUnusable {
                path: path.display().to_string(),
                error: error.clone(),
            });
        }
        BaseArchive::Open { archive, .. } => archive,
    };
    let header = archive.header();
    let Some(dev) = header.devices.iter().find(|x| x.name == d.name) else {
        return full(FullReason::NewDrive);
    };
    if dev.size != d.size {
        return full(FullReason::SizeChanged {
            base: dev.size,
            now: d.size,
        });
    }
    let bitmap = bitmap_name(&header.uuid);
    let found = nodes
        .iter()
        .filter(|n| n.node_name == d.node)
        .flat_map(|n| &n.bitmaps)
        .find(|b| b.name == bitmap);
    let Some(b) = found else {
        return full(FullReason::NoBitmap {
            bitmap,
            node: d.node.clone(),
        });
    };
    if b.granularity != BITMAP_GRANULARITY {
        return full(FullReason::Granularity {
            bitmap,
            found: b.granularity,
        });
    }
    if b.inconsistent {
        return full(FullReason::Inconsistent { bitmap });
    }
    if !b.recording {
        return full(FullReason::Disabled { bitmap });
    }
    if b.busy {
        return full(FullReason::Busy { bitmap });
    }
    Mode::Incremental {
        base_dev: dev.id,
        bitmap,
        dirty: b.count,
    }
}

/// Our bitmaps on `node` other than those in `keep`: after a commit,
/// everything but the new archive's (the base's, and leftovers of runs
/// that were interrupted before they could clean up).
pub fn stale_bitmaps<'a>(nodes: &'a [NodeBitmaps], node: &str, keep: &[&str]) -> Vec<&'a str> {
    nodes
        .iter()
        .filter(|n| n.node_name == node)
        .flat_map(|n| &n.bitmaps)
        .map(|b| b.name.as_str())
        .filter(|name| name.starts_with(BITMAP_PREFIX) && !keep.contains(name))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    fn drive(node: &str, name: &str, size: u64) -> BackupDrive {
        BackupDrive {
            node: node.into(),
            name: name.into(),
            size,
        }
    }

    #[test]
    fn names_and_stale_bitmaps() {
        let u = Uuid::from_u128(0x1234);
        assert_eq!(
            bitmap_name(&u),
            "vma-writer-00000000-0000-0000-0000-000000001234"
        );
        let nodes: Vec<NodeBitmaps> = Deserialize::deserialize(&json!([
            {"node-name": "a", "drv": "qcow2", "dirty-bitmaps": [
                {"name": "vma-writer-new", "granularity": 65536, "count": 0},
                {"name": "vma-writer-base", "granularity": 65536, "count": 0},
                {"name": "vma-writer-old", "granularity": 65536, "count": 0},
                {"name": "someone-elses", "granularity": 65536, "count": 0}]},
            {"node-name": "b", "drv": "raw", "dirty-bitmaps": [
                {"name": "vma-writer-other-drive", "granularity": 65536, "count": 0}]}
        ]))
        .unwrap();
        assert_eq!(
            stale_bitmaps(&nodes, "a", &["vma-writer-new"]),
            ["vma-writer-base", "vma-writer-old"]
        );
    }

    #[test]
    fn each_drive_gets_its_mode_and_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base.vma");
        let mut b = crate::vma::WriterBuilder::new().uuid(Uuid::from_u128(7));
        let d1 = b.add_device("drive-a", 65536).unwrap();
        let d2 = b.add_device("drive-b", 65536).unwrap();
        let mut w = b.start(std::fs::File::create(&path).unwrap()).unwrap();
        w.write_zero_cluster(d1, 0).unwrap();
        w.write_zero_cluster(d2, 0).unwrap();
        w.finish().unwrap();
        let base = BaseArchive::open(&path);
        let name = bitmap_name(&Uuid::from_u128(7));
        let bm = |granularity: u64, extra: serde_json::Value| {
            let mut v = json!({"name": name, "granularity": granularity, "count": 4096,
                               "recording": true});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        let nodes: Vec<NodeBitmaps> = Deserialize::deserialize(&json!([
            {"node-name": "a", "drv": "qcow2", "dirty-bitmaps": [bm(65536, json!({}))]},
            {"node-name": "g", "drv": "qcow2", "dirty-bitmaps": [bm(4096, json!({}))]},
            {"node-name": "i", "drv": "qcow2", "dirty-bitmaps": [
                bm(65536, json!({"inconsistent": true, "recording": false}))]},
            {"node-name": "o", "drv": "qcow2", "dirty-bitmaps": [
                bm(65536, json!({"recording": false}))]},
            {"node-name": "u", "drv": "qcow2", "dirty-bitmaps": [bm(65536, json!({"busy": true}))]}
        ]))
        .unwrap();
        let drives = [
            drive("a", "drive-a", 65536),
            drive("b", "drive-b", 131072),
            drive("c", "drive-c", 65536),
            drive("n", "drive-b", 65536),
            drive("g", "drive-b", 65536),
            drive("i", "drive-b", 65536),
            drive("o", "drive-b", 65536),
            drive("u", "drive-b", 65536),
        ];
        let modes: Vec<String> = plan(&drives, Some(&base), &nodes)
            .into_iter()
            .map(|p| match p.mode {
                Mode::Incremental {
                    base_dev, dirty, ..
                } => format!("incremental {base_dev} {dirty}"),
                Mode::Full { reason } => reason.unwrap().to_string(),
            })
            .collect();
        assert_eq!(modes[0], "incremental 1 4096");
        assert_eq!(
            modes[1],
            "its size changed (65536 bytes in the base, 131072 now)"
        );
        assert!(modes[2].starts_with("new since the base"), "{}", modes[2]);
        assert!(
            modes[3].starts_with(&format!("node n has no bitmap {name} (QEMU restarted")),
            "{}",
            modes[3]
        );
        assert!(
            modes[4].contains("granularity of 4096 bytes"),
            "{}",
            modes[4]
        );
        assert!(modes[5].contains("is inconsistent"), "{}", modes[5]);
        assert!(modes[6].contains("is disabled"), "{}", modes[6]);
        assert!(modes[7].contains("in use"), "{}", modes[7]);
        // Without a base: full, no reason; an unusable base: full, its reason.
        assert_eq!(
            plan(&drives[..1], None, &nodes)[0].mode,
            Mode::Full { reason: None }
        );
        let bad = BaseArchive::open(&PathBuf::from("/nonexistent/base.vma"));
        let Mode::Full { reason: Some(r) } = &plan(&drives[..1], Some(&bad), &nodes)[0].mode else {
            panic!("an unusable base makes a full backup")
        };
        assert!(
            r.to_string()
                .starts_with("the base /nonexistent/base.vma cannot be used: "),
            "{r}"
        );
    }
}
