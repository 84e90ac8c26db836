//! Incremental backups (`docs/incremental.md`) with qemu-storage-daemon as
//! the VM: the guest writes through the daemon's NBD export with qemu-io,
//! between backups and while they run, and the test keeps the image each
//! drive must restore to. Every archive is listed, verified, extracted and
//! compared byte for byte; the bytes QEMU sent for an incremental drive
//! are exactly its dirty clusters.
//!
//! - five generations (full, then four incrementals) of a qcow2 and a raw
//!   drive with `--output-dir --vmid --incremental`;
//! - a persistent bitmap across a daemon restart (qcow2 stays
//!   incremental, raw falls back to full and says why);
//! - faults: the archive write fails after QEMU's job succeeded, SIGTERM
//!   mid-job, SIGKILL after the rename but before the bitmap step, QEMU's
//!   job cancelled, the QMP connection lost; after each, the next
//!   incremental from the last committed archive is correct;
//! - a resized drive, a base from another VM, a base whose payload is
//!   corrupt, a base that is a stream without index (and one that cannot be
//!   read at random);
//! - a 3-drive VM where one drive is new since the base.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use vma_writer::archive::RandomArchive;
use vma_writer::backup::bitmap_name;
use vma_writer::qemu::StorageDaemon;
use vma_writer::qmp::Qmp;

use crate::support::{self, *};

/// Speed limit of backups that the guest writes during: slow enough that
/// the job still runs when the writes land.
const SLOW: &str = "512K";

/// One drive of the test VM and the image it must restore to.
struct Disk {
    /// Node name in the daemon (and NBD export name).
    node: &'static str,
    /// `raw` or `qcow2`.
    format: &'static str,
    path: PathBuf,
    /// The guest's view of the drive now.
    model: Vec<u8>,
    /// Clusters written since the last backup's point in time.
    dirty: BTreeSet<u64>,
}

impl Disk {
    fn name(&self) -> String {
        format!("drive-{}", self.node)
    }

    fn size(&self) -> u64 {
        self.model.len() as u64
    }
}

/// A VM: a qemu-storage-daemon serving the disks, each also exported
/// writable over NBD for the guest's writes.
struct Vm {
    dir: PathBuf,
    daemon: Option<StorageDaemon>,
    nbd: PathBuf,
    disks: Vec<Disk>,
    rng: XorShift,
    /// The second of the last `--output-dir` backup's start: the next one
    /// waits for a new second, so its vzdump name is new.
    last_second: u64,
}

impl Vm {
    /// Creates `disks` (node, format, size) with holey content under `dir`
    /// and starts the daemon.
    async fn new(dir: &Path, disks: &[(&'static str, &'static str, u64)], seed: u64) -> Vm {
        let disks = disks
            .iter()
            .enumerate()
            .map(|(i, &(node, format, size))| {
                let model = holey_data(size as usize, seed + i as u64);
                let path = dir.join(format!("{node}.{format}"));
                if format == "raw" {
                    std::fs::write(&path, &model).unwrap();
                } else {
                    let raw = dir.join(format!("{node}.src.raw"));
                    std::fs::write(&raw, &model).unwrap();
                    run_ok(
                        std::process::Command::new("qemu-img")
                            .args(["convert", "-f", "raw", "-O", format])
                            .arg(&raw)
                            .arg(&path),
                    );
                    std::fs::remove_file(raw).unwrap();
                }
                Disk {
                    node,
                    format,
                    path,
                    model,
                    dirty: BTreeSet::new(),
                }
            })
            .collect();
        let mut vm = Vm {
            dir: dir.to_path_buf(),
            daemon: None,
            nbd: PathBuf::new(),
            disks,
            rng: XorShift::new(seed ^ 0x5eed),
            last_second: 0,
        };
        vm.start().await;
        vm
    }

    fn daemon(&self) -> &StorageDaemon {
        self.daemon.as_ref().expect("daemon running")
    }

    fn qmp_socket(&self) -> PathBuf {
        self.daemon().qmp_socket().to_path_buf()
    }

    /// A connection to the spare monitor (close it before the next
    /// `export_nbd` or restart: a monitor serves one client).
    async fn spare(&self) -> Qmp {
        Qmp::connect(self.daemon().spare_qmp_socket())
            .await
            .unwrap()
    }

    async fn start(&mut self) {
        let images: Vec<(&str, &Path, &str)> = self
            .disks
            .iter()
            .map(|d| (d.node, d.path.as_path(), d.format))
            .collect();
        let mut daemon = start_daemon(&self.dir, &images).await;
        for d in &self.disks {
            self.nbd = daemon.export_nbd(d.node, d.node, true).await.unwrap();
        }
        self.daemon = Some(daemon);
    }

    /// Stops the daemon cleanly (persistent bitmaps are stored) and starts
    /// it again on the same images.
    async fn restart(&mut self) {
        self.daemon.take().unwrap().shutdown().await.unwrap();
        self.start().await;
    }

    fn uri(&self, i: usize) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.disks[i].node,
            self.nbd.display()
        )
    }

    /// `n` random guest writes to disk `i` (data of one byte value, or
    /// zeroes; some unaligned, some whole clusters), through the NBD
    /// export; the model and the dirty set follow.
    fn write_random(&mut self, i: usize, n: usize) {
        let size = self.disks[i].size();
        let mut cmds = Vec::new();
        for _ in 0..n {
            let (off, len) = if self.rng.below(3) == 0 {
                let c = self.rng.below(size / CLUSTER as u64);
                (c * CLUSTER as u64, CLUSTER as u64 * (1 + self.rng.below(3)))
            } else {
                (self.rng.below(size), 1 + self.rng.below(200_000))
            };
            let len = len.min(size - off);
            let byte = 1 + self.rng.below(255) as u8;
            let zero = self.rng.below(5) == 0;
            cmds.push(if zero {
                format!("write -z {off} {len}")
            } else {
                format!("write -P {byte:#x} {off} {len}")
            });
            let d = &mut self.disks[i];
            d.model[off as usize..(off + len) as usize].fill(if zero { 0 } else { byte });
            let (first, last) = (off / CLUSTER as u64, (off + len - 1) / CLUSTER as u64);
            d.dirty.extend(first..=last);
        }
        qemu_io(&self.uri(i), "raw", &cmds);
    }

    /// Random writes to every disk.
    fn write_all(&mut self, n: usize) {
        for i in 0..self.disks.len() {
            self.write_random(i, n);
        }
    }

    /// Writes each disk's model to a file: the images an archive taken now
    /// must restore to.
    fn snapshot(&self, tag: &str) -> Vec<PathBuf> {
        self.disks
            .iter()
            .map(|d| {
                let p = self.dir.join(format!("expect-{tag}-{}.raw", d.node));
                std::fs::write(&p, &d.model).unwrap();
                p
            })
            .collect()
    }

    /// Waits for a second no backup started in (vzdump names have
    /// seconds).
    async fn next_second(&mut self) {
        let now = || {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        };
        while now() <= self.last_second {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.last_second = now();
    }

    /// Our bitmaps (`vma-writer-*`) on each disk's node.
    async fn bitmaps(&self) -> Vec<Vec<String>> {
        let qmp = self.spare().await;
        let nodes = qmp.query_dirty_bitmaps().await.unwrap();
        self.disks
            .iter()
            .map(|d| {
                let mut names: Vec<String> = nodes
                    .iter()
                    .filter(|n| n.node_name == d.node)
                    .flat_map(|n| &n.bitmaps)
                    .map(|b| b.name.clone())
                    .filter(|n| n.starts_with("vma-writer-"))
                    .collect();
                names.sort();
                names
            })
            .collect()
    }

    /// Asserts every disk carries exactly the bitmaps of `archives`.
    async fn assert_bitmaps(&self, archives: &[&Path]) {
        let mut want: Vec<String> = archives.iter().map(|a| archive_bitmap(a)).collect();
        want.sort();
        for (d, got) in self.disks.iter().zip(self.bitmaps().await) {
            assert_eq!(got, want, "bitmaps of {}", d.node);
        }
    }

    /// `vma-writer backup --json` of every disk with `args`.
    fn backup_cmd(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = vma_async(["backup", "--json", "--qmp"]);
        cmd.arg(self.qmp_socket());
        for d in &self.disks {
            cmd.args(["--drive", d.node]);
        }
        cmd.args(args);
        cmd
    }

    /// The point in time of a backup about to start: the images it must
    /// restore to and the clusters written since the last one (then
    /// cleared: the new bitmaps start empty).
    fn point_in_time(&mut self, tag: &str) -> PointInTime {
        PointInTime {
            expect: self.snapshot(tag),
            dirty: self
                .disks
                .iter_mut()
                .map(|d| std::mem::take(&mut d.dirty))
                .collect(),
            sizes: self.disks.iter().map(Disk::size).collect(),
        }
    }

    /// A backup from `at` failed: its clusters are dirty again (the base's
    /// bitmap still has them).
    fn failed(&mut self, at: PointInTime) {
        for (d, dirty) in self.disks.iter_mut().zip(at.dirty) {
            d.dirty.extend(dirty);
        }
    }

    /// Checks a finished backup from `at`: per drive its mode (`None`:
    /// incremental; `Some(text)`: full, for a reason containing `text`
    /// when it is not empty), the bytes QEMU sent (the whole drive, or its
    /// clusters dirty at `at`) and those from the base; then the archive.
    fn check(&self, ended: &Ended, at: &PointInTime, full_because: &[Option<&str>]) -> PathBuf {
        ended.assert_success();
        let fin = ended.finished_event();
        let drives = fin["drives"].as_array().expect("drives");
        assert_eq!(drives.len(), self.disks.len(), "{fin}");
        for (i, (d, v)) in self.disks.iter().zip(drives).enumerate() {
            assert_eq!(v["name"], d.name(), "{fin}");
            let received = v["received_bytes"].as_u64().unwrap();
            match full_because[i] {
                None => {
                    assert_eq!(v["mode"], "incremental", "{} in {fin}", d.node);
                    assert_eq!(received, at.dirty_bytes(i), "bytes QEMU sent of {}", d.node);
                }
                Some(reason) => {
                    assert_eq!(v["mode"], "full", "{} in {fin}", d.node);
                    assert_eq!(received, at.sizes[i], "{fin}");
                    if !reason.is_empty() {
                        let got = v["reason"].as_str().unwrap_or_default();
                        assert!(got.contains(reason), "{} full because {got:?}", d.node);
                        let line = format!("{}: full backup: {got}", d.name());
                        assert!(ended.stderr.contains(&line), "{}", ended.stderr);
                    }
                }
            }
            assert_eq!(v["base_bytes"].as_u64().unwrap(), at.sizes[i] - received);
        }
        let archive = PathBuf::from(fin["archive"].as_str().expect("archive path"));
        let names: Vec<String> = self.disks.iter().map(Disk::name).collect();
        let drives: Vec<(&str, u64, &Path)> = names
            .iter()
            .zip(&at.sizes)
            .zip(&at.expect)
            .map(|((n, s), e)| (n.as_str(), *s, e.as_path()))
            .collect();
        check_archive(&archive, &drives, &self.dir);
        archive
    }

    /// Runs a backup with `args` (no writes while it runs).
    async fn backup(&mut self, tag: &str, args: &[&str]) -> (Ended, PointInTime) {
        let at = self.point_in_time(tag);
        let ended = Proc::spawn(self.backup_cmd(args), true)
            .wait(RUN_TIMEOUT)
            .await;
        (ended, at)
    }

    /// Starts a backup with `args`, slowed to [`SLOW`], and returns once
    /// its job has sent data (it still runs).
    async fn start_slow_backup(&mut self, tag: &str, args: &[&str]) -> (Proc, PointInTime) {
        let at = self.point_in_time(tag);
        let mut args = args.to_vec();
        args.extend(["--speed", SLOW]);
        let mut backup = Proc::spawn(self.backup_cmd(&args), true);
        backup
            .next_event(Duration::from_secs(30), |e| {
                e["event"] == "progress"
                    && e["drives"]
                        .as_array()
                        .is_some_and(|ds| ds.iter().any(|d| d["done"].as_u64() > Some(0)))
            })
            .await;
        (backup, at)
    }

    /// Asserts that a backup job of ours runs now, and lifts the speed
    /// limit of every one.
    async fn assert_job_runs_then_unthrottle(&self) {
        let qmp = self.spare().await;
        let jobs = qmp.query_block_jobs().await.unwrap();
        let ours: Vec<_> = jobs.iter().filter(|j| j.device.starts_with("vmaw")).collect();
        assert!(!ours.is_empty(), "no backup job runs: {jobs:?}");
        for j in ours {
            // A job may end in between.
            let _ = qmp.block_job_set_speed(&j.device, 0).await;
        }
    }

    /// Runs a backup with `args` while the guest writes `n` times to
    /// every disk (the job is seen running before and after the writes,
    /// which belong to the next backup; then it runs at full speed).
    async fn backup_during(&mut self, tag: &str, args: &[&str], n: usize) -> (Ended, PointInTime) {
        let (backup, at) = self.start_slow_backup(tag, args).await;
        self.write_all(n);
        self.assert_job_runs_then_unthrottle().await;
        (backup.wait(RUN_TIMEOUT).await, at)
    }
}

/// A backup's point in time, as the test knows it.
struct PointInTime {
    /// Per disk, the image it must restore to.
    expect: Vec<PathBuf>,
    /// Per disk, the clusters written since the backup before.
    dirty: Vec<BTreeSet<u64>>,
    /// Per disk, its size then.
    sizes: Vec<u64>,
}

impl PointInTime {
    /// In-device bytes of disk `i`'s dirty clusters: what QEMU sends of
    /// it in an incremental backup.
    fn dirty_bytes(&self, i: usize) -> u64 {
        let size = self.sizes[i];
        self.dirty[i]
            .iter()
            .map(|&c| (size - c * CLUSTER as u64).min(CLUSTER as u64))
            .sum()
    }
}

/// The bitmap of the archive at `path`: named from its uuid.
fn archive_bitmap(path: &Path) -> String {
    let a = RandomArchive::open(path.to_str().unwrap()).unwrap();
    bitmap_name(&a.header().uuid)
}

/// `vma-writer list` of `archive`: its stderr (the chain lines).
fn list_chain(archive: &Path) -> String {
    let out = run_ok(&mut vma(["list".as_ref(), archive.as_os_str()]));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A qcow2 drive (persistent bitmap) and a raw one (bitmap in memory).
const QCOW2_RAW: &[(&str, &str, u64)] = &[("scsi0", "qcow2", 24 * MIB), ("scsi1", "raw", 16 * MIB)];

/// `--base ARCHIVE` as arguments.
fn base_args(archive: &Path) -> Vec<&str> {
    vec!["--base", archive.to_str().unwrap()]
}

/// `-o ARCHIVE` as arguments.
fn out_args(archive: &Path) -> Vec<&str> {
    vec!["-o", archive.to_str().unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_generations_with_writes_between_and_during() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let dump = dir.join("dump");
    std::fs::create_dir(&dump).unwrap();
    let mut vm = Vm::new(dir, QCOW2_RAW, 1000).await;
    let nightly = [
        "--output-dir",
        dump.to_str().unwrap(),
        "--vmid",
        "100",
        "--incremental",
    ];
    let mut archives: Vec<PathBuf> = Vec::new();
    for generation in 0..5 {
        if generation > 0 {
            vm.write_all(12);
        }
        vm.next_second().await;
        let (ended, at) = vm.backup_during(&format!("g{generation}"), &nightly, 6).await;
        let archive = if generation == 0 {
            assert!(
                ended.stderr.contains("no earlier archive of VM 100"),
                "{}",
                ended.stderr
            );
            vm.check(&ended, &at, &[Some(""), Some("")])
        } else {
            let base = archives.last().unwrap();
            assert!(
                ended.stderr.contains(&format!("base {}", base.display())),
                "{}",
                ended.stderr
            );
            vm.check(&ended, &at, &[None, None])
        };
        // The raw drive's bitmap lives in QEMU's memory, and it is said.
        assert!(
            ended.stderr.contains("drive-scsi1: the bitmap lives in QEMU's memory only"),
            "{}",
            ended.stderr
        );
        // Only the new archive's bitmap is left on the drives.
        vm.assert_bitmaps(&[&archive]).await;
        archives.push(archive);
    }
    // `list` shows the chain of the last archive on stderr; stdout stays
    // Proxmox's lines.
    let last = archives.last().unwrap();
    let chain = list_chain(last);
    assert!(
        chain.contains(&format!(
            "BITMAP: {} on drive-scsi0, drive-scsi1",
            archive_bitmap(last)
        )),
        "{chain}"
    );
    assert!(chain.contains("INCREMENTAL: drive-scsi0: "), "{chain}");
    assert!(list_chain(&archives[0]).contains("BITMAP: "));
    assert!(!list_chain(&archives[0]).contains("INCREMENTAL"));
    assert_eq!(list_devices(last).len(), 2);
    vm.daemon.take().unwrap().shutdown().await.unwrap();
}
