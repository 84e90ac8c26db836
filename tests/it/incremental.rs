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
        let mut cmd = vma_async(["backup"]);
        cmd.args(self.backup_args(&self.qmp_socket(), args));
        cmd
    }

    /// The arguments of `backup --json` of every disk over QMP socket
    /// `qmp`, then `args`.
    fn backup_args(&self, qmp: &Path, args: &[&str]) -> Vec<std::ffi::OsString> {
        let mut out: Vec<std::ffi::OsString> = vec!["--json".into(), "--qmp".into(), qmp.into()];
        for d in &self.disks {
            out.extend(["--drive".into(), d.node.into()]);
        }
        out.extend(args.iter().map(Into::into));
        out
    }

    /// Adds a new raw disk of `size` to the running VM (hot-plug):
    /// `blockdev-add` of its file and raw nodes, exported for the guest.
    async fn add_disk(&mut self, node: &'static str, size: u64, seed: u64) {
        let model = holey_data(size as usize, seed);
        let path = self.dir.join(format!("{node}.raw"));
        std::fs::write(&path, &model).unwrap();
        let qmp = self.spare().await;
        qmp.execute(
            "blockdev-add",
            Some(serde_json::json!({"driver": "raw", "node-name": node,
                "file": {"driver": "file", "filename": path.to_str().unwrap()}})),
        )
        .await
        .unwrap();
        drop(qmp);
        let daemon = self.daemon.as_mut().unwrap();
        self.nbd = daemon.export_nbd(node, node, true).await.unwrap();
        self.disks.push(Disk {
            node,
            format: "raw",
            path,
            model,
            dirty: BTreeSet::new(),
        });
    }

    /// Grows disk `i` to `size` (`block_resize`; the new bytes read as
    /// zeros). Its NBD export, which does not share the resize, is
    /// removed first (export ids are `export<n>` in the order the disks
    /// were exported) and made again after.
    async fn resize(&mut self, i: usize, size: u64) {
        let qmp = self.spare().await;
        qmp.execute(
            "block-export-del",
            Some(serde_json::json!({"id": format!("export{i}")})),
        )
        .await
        .unwrap();
        qmp.execute(
            "block_resize",
            Some(serde_json::json!({"node-name": self.disks[i].node, "size": size})),
        )
        .await
        .unwrap();
        drop(qmp);
        let node = self.disks[i].node;
        let daemon = self.daemon.as_mut().unwrap();
        self.nbd = daemon.export_nbd(node, node, true).await.unwrap();
        self.disks[i].model.resize(size as usize, 0);
    }

    /// Waits until QEMU runs no job of ours (after a vma-writer that could
    /// not cancel its jobs, they fail on their own).
    async fn wait_jobs_gone(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let qmp = self.spare().await;
            let jobs = qmp.query_block_jobs().await.unwrap();
            if !jobs.iter().any(|j| j.device.starts_with("vmaw")) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "jobs left: {jobs:?}");
            drop(qmp);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
        let ours: Vec<_> = jobs
            .iter()
            .filter(|j| j.device.starts_with("vmaw"))
            .collect();
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
        let (ended, at) = vm
            .backup_during(&format!("g{generation}"), &nightly, 6)
            .await;
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
            ended
                .stderr
                .contains("drive-scsi1: the bitmap lives in QEMU's memory only"),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_bitmap_survives_a_restart_raw_falls_back_to_full() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut vm = Vm::new(dir, QCOW2_RAW, 2000).await;
    let a0 = dir.join("a0.vma");
    let (ended, at) = vm.backup("a0", &out_args(&a0)).await;
    vm.check(&ended, &at, &[Some(""), Some("")]);
    // Writes before and after QEMU restarts: the qcow2 bitmap, stored in
    // the image at the clean stop, has them all.
    vm.write_all(10);
    vm.restart().await;
    vm.write_all(10);
    let a1 = dir.join("a1.vma");
    let (ended, at) = vm
        .backup("a1", &[out_args(&a1), base_args(&a0)].concat())
        .await;
    vm.check(&ended, &at, &[None, Some("node scsi1 has no bitmap")]);
    assert!(
        ended
            .stderr
            .contains("QEMU restarted and the bitmap was not persistent"),
        "{}",
        ended.stderr
    );
    vm.assert_bitmaps(&[&a1]).await;
    vm.daemon.take().unwrap().shutdown().await.unwrap();
}

/// A VM with a full backup as the base and writes since: the start of
/// every fault test.
async fn after_a_full_backup(dir: &Path, seed: u64) -> (Vm, PathBuf) {
    let mut vm = Vm::new(dir, QCOW2_RAW, seed).await;
    let base = dir.join("base.vma");
    let (ended, at) = vm.backup("base", &out_args(&base)).await;
    vm.check(&ended, &at, &[Some(""), Some("")]);
    vm.write_all(10);
    (vm, base)
}

/// After a failed incremental from `base` (its point in time `at`): the
/// new archive is not there, the base's bitmap is, and the next
/// incremental from `base` (with more writes) sends every cluster written
/// since the base and restores exactly; only its bitmap is left then.
/// `leftovers` bitmaps of ours besides the base's are expected before.
async fn next_incremental_is_correct(
    vm: &mut Vm,
    base: &Path,
    failed: &Path,
    at: PointInTime,
    leftovers: usize,
) {
    assert_no_archive(failed, false);
    vm.failed(at);
    vm.wait_jobs_gone().await;
    for (d, names) in vm.disks.iter().zip(vm.bitmaps().await) {
        assert!(
            names.contains(&archive_bitmap(base)),
            "{}: {names:?}",
            d.node
        );
        assert_eq!(names.len(), 1 + leftovers, "{}: {names:?}", d.node);
    }
    vm.write_all(5);
    let next = vm.dir.join("next.vma");
    let (ended, at) = vm
        .backup("next", &[out_args(&next), base_args(base)].concat())
        .await;
    vm.check(&ended, &at, &[None, None]);
    vm.assert_bitmaps(&[&next]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_archive_write_fails_after_the_job_succeeded() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut vm, base) = after_a_full_backup(dir, 3000).await;
    let spare = vm.spare().await;
    let mut events = spare.subscribe();
    let failed = dir.join("efbig.vma");
    let at = vm.point_in_time("efbig");
    // 4 to 8 MiB: more than QEMU's changed clusters, less than the copy.
    let args = vm.backup_args(
        &vm.qmp_socket(),
        &[out_args(&failed), base_args(&base)].concat(),
    );
    let backup = Proc::spawn(
        vma_async_file_limit(8192, std::iter::once("backup".into()).chain(args)),
        true,
    );
    let jobs = [0, 1].map(|i| format!("vmaw{}-job{i}", backup.pid()));
    let ended = backup.wait(RUN_TIMEOUT).await;
    ended.assert_backup_failed(&["backup failed: writing the archive failed: File too large"]);
    let ends = events
        .wait_jobs_ended(&jobs, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(ends.iter().all(|e| e.is_success()), "QEMU's jobs: {ends:?}");
    drop(events);
    drop(spare);
    next_incremental_is_correct(&mut vm, &base, &failed, at, 0).await;
    vm.daemon.take().unwrap().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_sigterm_mid_job() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut vm, base) = after_a_full_backup(dir, 4000).await;
    let failed = dir.join("term.vma");
    let (backup, at) = vm
        .start_slow_backup("term", &[out_args(&failed), base_args(&base)].concat())
        .await;
    vm.write_all(3);
    backup.signal(libc::SIGTERM);
    let ended = backup.wait(RUN_TIMEOUT).await;
    ended.assert_stopped_by(libc::SIGTERM);
    next_incremental_is_correct(&mut vm, &base, &failed, at, 0).await;
    vm.daemon.take().unwrap().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_qemu_job_cancelled() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut vm, base) = after_a_full_backup(dir, 5000).await;
    let failed = dir.join("cancel.vma");
    let (backup, at) = vm
        .start_slow_backup("cancel", &[out_args(&failed), base_args(&base)].concat())
        .await;
    let qmp = vm.spare().await;
    let job = format!("vmaw{}-job0", backup.pid());
    qmp.block_job_cancel(&job, true).await.unwrap();
    drop(qmp);
    let ended = backup.wait(RUN_TIMEOUT).await;
    ended.assert_backup_failed(&[&format!("backup job {job} was cancelled")]);
    next_incremental_is_correct(&mut vm, &base, &failed, at, 0).await;
    vm.daemon.take().unwrap().shutdown().await.unwrap();
}

/// A QMP proxy between vma-writer and the daemon, for one client. It
/// passes everything on, except that with `hold_removes` it holds back the
/// first `block-dirty-bitmap-remove` that is not a probe's, and all after
/// it (vma-writer then waits for QEMU's reply forever), and that
/// [`QmpProxy::cut`] closes the connection.
struct QmpProxy {
    path: PathBuf,
    held: std::sync::Arc<tokio::sync::Notify>,
    cut: std::sync::Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl QmpProxy {
    fn start(path: PathBuf, upstream: PathBuf, hold_removes: bool) -> QmpProxy {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let held = std::sync::Arc::new(tokio::sync::Notify::new());
        let cut = std::sync::Arc::new(tokio::sync::Notify::new());
        let (h, c) = (held.clone(), cut.clone());
        let task = tokio::spawn(async move {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let up = tokio::net::UnixStream::connect(&upstream).await.unwrap();
            let (client_r, mut client_w) = client.into_split();
            let (mut up_r, mut up_w) = up.into_split();
            let down = tokio::io::copy(&mut up_r, &mut client_w);
            let upward = async {
                let mut r = tokio::io::BufReader::new(client_r);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    if r.read_until(b'\n', &mut line).await? == 0 {
                        return Ok::<_, std::io::Error>(());
                    }
                    let text = String::from_utf8_lossy(&line);
                    if hold_removes
                        && text.contains("block-dirty-bitmap-remove")
                        && !text.contains("-probe-")
                    {
                        h.notify_one();
                        std::future::pending::<()>().await;
                    }
                    up_w.write_all(&line).await?;
                }
            };
            tokio::select! {
                _ = down => {}
                _ = upward => {}
                _ = c.notified() => {}
            }
        });
        QmpProxy {
            path,
            held,
            cut,
            task,
        }
    }

    /// Waits until a bitmap removal is held back.
    async fn held(&self) {
        tokio::time::timeout(Duration::from_secs(60), self.held.notified())
            .await
            .expect("no bitmap removal was held back");
    }

    /// Closes the connection both ways.
    fn cut(&self) {
        self.cut.notify_one();
    }
}

impl Drop for QmpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// SIGKILL of vma-writer after the new archive was renamed into place but
/// before it removed the base's bitmap (the proxy holds that command
/// back): both bitmaps are left; the next nightly run takes the newest
/// archive as its base, finds its bitmap, and removes the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_sigkill_after_rename_before_the_bitmap_step() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let dump = dir.join("dump");
    std::fs::create_dir(&dump).unwrap();
    let nightly = [
        "--output-dir",
        dump.to_str().unwrap(),
        "--vmid",
        "7",
        "--incremental",
    ];
    let mut vm = Vm::new(dir, QCOW2_RAW, 6000).await;
    vm.next_second().await;
    let (ended, at) = vm.backup("base", &nightly).await;
    let base = vm.check(&ended, &at, &[Some(""), Some("")]);
    vm.write_all(10);
    vm.next_second().await;
    let proxy = QmpProxy::start(dir.join("proxy.sock"), vm.qmp_socket(), true);
    let at = vm.point_in_time("killed");
    let mut cmd = vma_async(["backup"]);
    cmd.args(vm.backup_args(&proxy.path, &nightly));
    let backup = Proc::spawn(cmd, true);
    proxy.held().await;
    // Committed: the archive and its index are in place.
    let killed = backup_archive_in(&dump, &[&base]);
    assert!(vma_writer::sink::index_path(&killed).exists());
    backup.signal(libc::SIGKILL);
    let ended = backup.wait(RUN_TIMEOUT).await;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(ended.status.signal(), Some(libc::SIGKILL));
    drop(proxy);
    let names: Vec<String> = vm.disks.iter().map(Disk::name).collect();
    let drives: Vec<(&str, u64, &Path)> = names
        .iter()
        .zip(&vm.disks)
        .zip(&at.expect)
        .map(|((n, d), e)| (n.as_str(), d.size(), e.as_path()))
        .collect();
    check_archive(&killed, &drives, dir);
    vm.assert_bitmaps(&[&base, &killed]).await;
    // The next run: the newest archive is the killed run's, and its
    // bitmap has every write since.
    vm.write_all(5);
    vm.next_second().await;
    let (ended, at) = vm.backup("after", &nightly).await;
    assert!(
        ended.stderr.contains(&format!("base {}", killed.display())),
        "{}",
        ended.stderr
    );
    let next = vm.check(&ended, &at, &[None, None]);
    vm.assert_bitmaps(&[&next]).await;
    vm.daemon.take().unwrap().shutdown().await.unwrap();
}

/// A commit that fails after the rename (the directory's fsync, by fault
/// injection): the backup fails, but its archive is complete and in
/// place, so its bitmap is kept and the base's removed, as after a clean
/// commit; the next incremental from it sends only what changed since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_dir_sync_after_the_rename_keeps_the_new_archives_bitmap() {
    if !require_tools(QSD_TOOLS)
        || !support::require(
            cfg!(feature = "fault-injection"),
            "built without the fault-injection feature (cargo test --features fault-injection)",
        )
    {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut vm, base) = after_a_full_backup(dir, 7000).await;
    let done = dir.join("dirsync.vma");
    let at = vm.point_in_time("dirsync");
    let mut cmd = vm.backup_cmd(&[out_args(&done), base_args(&base)].concat());
    cmd.env("VMA_WRITER_FAULT", "dirsync");
    let ended = Proc::spawn(cmd, true).wait(RUN_TIMEOUT).await;
    assert!(!ended.status.success(), "{}", ended.stderr);
    assert!(
        ended
            .stderr
            .contains(&format!("the archive {} is complete", done.display())),
        "{}",
        ended.stderr
    );
    let names: Vec<String> = vm.disks.iter().map(Disk::name).collect();
    let drives: Vec<(&str, u64, &Path)> = names
        .iter()
        .zip(&vm.disks)
        .zip(&at.expect)
        .map(|((n, d), e)| (n.as_str(), d.size(), e.as_path()))
        .collect();
    check_archive(&done, &drives, dir);
    vm.assert_bitmaps(&[&done]).await;
    vm.write_all(5);
    let next = dir.join("next.vma");
    let (ended, at) = vm
        .backup("next", &[out_args(&next), base_args(&done)].concat())
        .await;
    vm.check(&ended, &at, &[None, None]);
    vm.assert_bitmaps(&[&next]).await;
    vm.daemon.take().unwrap().shutdown().await.unwrap();
}

/// The one archive in `dump` that is not one of `known`.
fn backup_archive_in(dump: &Path, known: &[&Path]) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dump)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "vma"))
        .filter(|p| !known.contains(&p.as_path()))
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

/// The QMP connection is lost mid-job: vma-writer cannot cancel its jobs
/// or remove its new bitmaps; the jobs fail when its target goes away and
/// give the base's bitmap back; the next incremental from the base is
/// correct and removes the leftover bitmap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_qmp_connection_lost() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut vm, base) = after_a_full_backup(dir, 7000).await;
    let proxy = QmpProxy::start(dir.join("proxy.sock"), vm.qmp_socket(), false);
    let failed = dir.join("lost.vma");
    let at = vm.point_in_time("lost");
    let mut args = [out_args(&failed), base_args(&base)].concat();
    args.extend(["--speed", SLOW]);
    let mut cmd = vma_async(["backup"]);
    cmd.args(vm.backup_args(&proxy.path, &args));
    let mut backup = Proc::spawn(cmd, true);
    backup
        .next_event(Duration::from_secs(30), |e| {
            progress_done(e, "drive-scsi0").is_some_and(|d| d > 0)
        })
        .await;
    proxy.cut();
    let ended = backup.wait(RUN_TIMEOUT).await;
    ended.assert_backup_failed(&["lost the QMP connection"]);
    drop(proxy);
    next_incremental_is_correct(&mut vm, &base, &failed, at, 1).await;
    vm.daemon.take().unwrap().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resized_drive_is_backed_up_in_full() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut vm, base) = after_a_full_backup(dir, 8000).await;
    vm.resize(1, 20 * MIB).await;
    vm.write_all(3);
    let a1 = dir.join("a1.vma");
    let (ended, at) = vm
        .backup("a1", &[out_args(&a1), base_args(&base)].concat())
        .await;
    vm.check(
        &ended,
        &at,
        &[
            None,
            Some("its size changed (16777216 bytes in the base, 20971520 now)"),
        ],
    );
    vm.assert_bitmaps(&[&a1]).await;
    vm.daemon.take().unwrap().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_from_another_vm_gives_full_backups() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir(&dir_a).unwrap();
    std::fs::create_dir(&dir_b).unwrap();
    let (mut vm_a, base_a) = after_a_full_backup(&dir_a, 9000).await;
    let mut vm_b = Vm::new(&dir_b, QCOW2_RAW, 9100).await;
    let b0 = dir_b.join("b0.vma");
    let (ended, at) = vm_b
        .backup("b0", &[out_args(&b0), base_args(&base_a)].concat())
        .await;
    let why = Some("has no bitmap");
    vm_b.check(&ended, &at, &[why, why]);
    vm_b.assert_bitmaps(&[&b0]).await;
    // VM A's chain is untouched.
    vm_a.assert_bitmaps(&[&base_a]).await;
    vm_a.daemon.take().unwrap().shutdown().await.unwrap();
    vm_b.daemon.take().unwrap().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_base_fails_the_backup_and_a_full_one_starts_anew() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut vm, base) = after_a_full_backup(dir, 10_000).await;
    // Flip a byte in a data cluster of drive-scsi0 the guest did not
    // write since: the incremental must copy it from the base.
    let (cluster, at) = {
        let ra = RandomArchive::open(base.to_str().unwrap()).unwrap();
        let dev = ra.header().devices[0].id;
        (0..ra.header().devices[0].clusters())
            .filter(|c| !vm.disks[0].dirty.contains(c))
            .find_map(|c| {
                let l = ra.index().locate(dev, c).unwrap();
                (l.mask != 0).then_some((c, l.stream_offset))
            })
            .unwrap()
    };
    let mut bytes = std::fs::read(&base).unwrap();
    bytes[at as usize + 7] ^= 0x20;
    std::fs::write(&base, bytes).unwrap();
    let failed = dir.join("corrupt.vma");
    let (ended, pit) = vm
        .backup("corrupt", &[out_args(&failed), base_args(&base)].concat())
        .await;
    ended.assert_backup_failed(&[
        &format!("drive drive-scsi0: cannot copy from the base archive: device 1 ('drive-scsi0') cluster {cluster}: the data does not match its digest"),
        "back up without --base and --incremental (a full backup) to start a new chain",
    ]);
    assert_no_archive(&failed, false);
    vm.failed(pit);
    vm.assert_bitmaps(&[&base]).await;
    // The full backup the message asks for; it ends the old chain.
    let full = dir.join("full.vma");
    let (ended, at) = vm.backup("full", &out_args(&full)).await;
    vm.check(&ended, &at, &[Some(""), Some("")]);
    vm.assert_bitmaps(&[&full]).await;
    vm.daemon.take().unwrap().shutdown().await.unwrap();
}

/// A base that is a plain stream (`backup -o -` saved to a file, no
/// index): usable, its clusters are not checked (said), the new archive
/// has its own index. A zstd stream without seek table cannot be read at
/// random: every drive is backed up in full, saying why. `--no-bitmap`
/// leaves the chain as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_index_as_the_base() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut vm = Vm::new(dir, QCOW2_RAW, 11_000).await;
    let stream = dir.join("stream.vma");
    let at = vm.point_in_time("stream");
    let mut cmd = vm.backup_cmd(&["-o", "-"]);
    cmd.stdout(std::fs::File::create(&stream).unwrap());
    let ended = Proc::spawn(cmd, false).wait(RUN_TIMEOUT).await;
    ended.assert_success();
    assert!(!vma_writer::sink::index_path(&stream).exists());
    let names: Vec<String> = vm.disks.iter().map(Disk::name).collect();
    let drives: Vec<(&str, u64, &Path)> = names
        .iter()
        .zip(&at.sizes)
        .zip(&at.expect)
        .map(|((n, s), e)| (n.as_str(), *s, e.as_path()))
        .collect();
    check_archive(&stream, &drives, dir);

    vm.write_all(10);
    let a1 = dir.join("a1.vma");
    let (ended, at) = vm
        .backup("a1", &[out_args(&a1), base_args(&stream)].concat())
        .await;
    vm.check(&ended, &at, &[None, None]);
    assert!(
        ended
            .stderr
            .contains("has no index: the clusters taken from it are not checked"),
        "{}",
        ended.stderr
    );
    assert!(
        RandomArchive::open(a1.to_str().unwrap())
            .unwrap()
            .has_digests()
    );
    vm.assert_bitmaps(&[&a1]).await;

    // --no-bitmap: incremental from a1, and a1's bitmap stays the chain's.
    vm.write_all(5);
    let copy = dir.join("copy.vma");
    let (ended, at) = vm
        .backup(
            "copy",
            &[out_args(&copy), base_args(&a1), vec!["--no-bitmap"]].concat(),
        )
        .await;
    vm.check(&ended, &at, &[None, None]);
    vm.assert_bitmaps(&[&a1]).await;
    assert!(
        !list_chain(&copy).contains("BITMAP"),
        "{}",
        list_chain(&copy)
    );
    vm.failed(at); // a1's bitmap still has those clusters

    let zst = dir.join("stream.vma.zst");
    let plain = std::fs::read(&stream).unwrap();
    std::fs::write(&zst, zstd::encode_all(&plain[..], 3).unwrap()).unwrap();
    let a2 = dir.join("a2.vma");
    let (ended, at) = vm
        .backup("a2", &[out_args(&a2), base_args(&zst)].concat())
        .await;
    let why = Some("cannot be used");
    vm.check(&ended, &at, &[why, why]);
    assert!(
        ended.stderr.contains("vma-writer convert"),
        "{}",
        ended.stderr
    );
    vm.assert_bitmaps(&[&a2]).await;
    vm.daemon.take().unwrap().shutdown().await.unwrap();
}

/// A VM that got a third drive since the base: the two old drives are
/// incremental (one of them ends mid-cluster), the new one full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_drives_one_new_since_the_base() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let two = &[
        ("scsi0", "qcow2", 16 * MIB),
        ("scsi1", "raw", 8 * MIB + 1536),
    ];
    let mut vm = Vm::new(dir, two, 12_000).await;
    let base = dir.join("base.vma");
    let (ended, at) = vm.backup("base", &out_args(&base)).await;
    vm.check(&ended, &at, &[Some(""), Some("")]);
    vm.write_all(10);
    vm.add_disk("scsi2", 4 * MIB, 12_100).await;
    vm.write_random(2, 3);
    let a1 = dir.join("a1.vma");
    let (ended, at) = vm
        .backup_during("a1", &[out_args(&a1), base_args(&base)].concat(), 4)
        .await;
    vm.check(&ended, &at, &[None, None, Some("new since the base")]);
    vm.assert_bitmaps(&[&a1]).await;
    vm.daemon.take().unwrap().shutdown().await.unwrap();
}
