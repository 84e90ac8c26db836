//! The faults a file system or an operator causes at the worst moment: a
//! disk that fills up (a size-limited tmpfs), an fsync that fails, and
//! SIGTERM or SIGKILL while the archive is being finished. Each test checks
//! the exit status, the message, and that nothing at the final name looks
//! like a complete archive (after SIGKILL, only the `.partial` may stay).
//!
//! The fsync failure and the pause at the commit come from the
//! `fault-injection` feature (`src/fault.rs`), which `.ci/run` enables;
//! without it those tests say SKIPPED (and fail under
//! `VMA_WRITER_REQUIRE_TOOLS=1`). The full disk needs root (a tmpfs mount).

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::time::Duration;

use crate::support::{self, *};

/// How long a command may take here.
const TIMEOUT: Duration = Duration::from_secs(60);

/// What `pause-commit` prints when it starts pausing.
const PAUSE_MARK: &str = "fault injection: pausing at the commit";

/// True when the fault-injection feature is built in; see
/// [`support::require`].
fn require_faults() -> bool {
    support::require(
        cfg!(feature = "fault-injection"),
        "built without the fault-injection feature (cargo test --features fault-injection)",
    )
}

/// The files in `dir`, sorted by name (not recursive).
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Waits until `p`'s stderr shows the pause mark.
async fn until_paused(p: &mut Proc) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !p.stderr().contains(PAUSE_MARK) {
        assert!(
            !p.has_exited(),
            "ended before the commit; stderr:\n{}",
            p.stderr()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "never reached the commit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `vma-writer create OUT -d drive-scsi0=IMG` in `dir` with `fault`.
fn create_cmd(dir: &Path, out: &str, fault: Option<&str>) -> tokio::process::Command {
    let mut cmd = vma_async(["create", out, "-d", "drive-scsi0=img"]);
    cmd.current_dir(dir);
    if let Some(f) = fault {
        cmd.env("VMA_WRITER_FAULT", f);
    }
    cmd
}

#[tokio::test]
async fn create_whose_fsync_fails_leaves_nothing() {
    if !require_faults() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("img"), random_data(4 << 20, 5)).unwrap();
    for out in ["a.vma", "a.vma.zst"] {
        let ended = Proc::spawn(create_cmd(dir, out, Some("fsync")), false)
            .wait(TIMEOUT)
            .await;
        ended.assert_exit(
            1,
            &[
                &format!("cannot commit archive {out}"),
                &format!("cannot fsync {out}.partial"),
                "the archive is not safely on disk",
            ],
        );
        assert_eq!(names_in(dir), ["img"], "{out}");
    }
}

/// `create` stopped by `sig` while it commits: nothing stays.
async fn create_signalled_at_the_commit(sig: libc::c_int) {
    if !require_faults() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("img"), random_data(4 << 20, 6)).unwrap();
    let mut p = Proc::spawn(create_cmd(dir, "a.vma", Some("pause-commit")), false);
    until_paused(&mut p).await;
    p.signal(sig);
    let ended = p.wait(TIMEOUT).await;
    if sig == libc::SIGKILL {
        assert_eq!(
            ended.status.signal(),
            Some(libc::SIGKILL),
            "{}",
            ended.stderr
        );
        assert_eq!(names_in(dir), ["a.vma.partial", "img"]);
        // The next run says what the leftover is.
        let again = Proc::spawn(create_cmd(dir, "a.vma", None), false)
            .wait(TIMEOUT)
            .await;
        again.assert_exit(1, &["a.vma.partial exists", "not a complete archive"]);
    } else {
        ended.assert_exit(
            128 + sig,
            &[&format!(
                "create interrupted by {}; removed a.vma.partial",
                signal_name(sig)
            )],
        );
        assert_eq!(names_in(dir), ["img"]);
    }
}

#[tokio::test]
async fn create_sigterm_at_the_commit_removes_the_partial_file() {
    create_signalled_at_the_commit(libc::SIGTERM).await;
}

#[tokio::test]
async fn create_sigkill_at_the_commit_leaves_only_the_partial_file() {
    create_signalled_at_the_commit(libc::SIGKILL).await;
}

/// A 16 MiB raw source in a qemu-storage-daemon; `backup` of it into
/// `out` with `fault` (and `extra` args) is started by the caller.
struct LiveSetup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    daemon: vma_writer::qemu::StorageDaemon,
    size: u64,
}

async fn live_setup() -> LiveSetup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let size = 16 * MIB;
    let src = raw_islands(&dir.join("scsi0.raw"), size, 7, 8, MIB);
    let daemon = start_daemon(&dir, &[("scsi0", &src, "raw")]).await;
    LiveSetup {
        _tmp: tmp,
        dir,
        daemon,
        size,
    }
}

fn backup_cmd(s: &LiveSetup, out: &Path, fault: Option<&str>) -> tokio::process::Command {
    let mut cmd = vma_async(["backup", "--qmp"]);
    cmd.arg(s.daemon.qmp_socket())
        .args(["--drive", "scsi0", "-o"])
        .arg(out);
    if let Some(f) = fault {
        cmd.env("VMA_WRITER_FAULT", f);
    }
    cmd
}

/// `backup` stopped by `sig` while it commits: QEMU is left clean, the
/// final name is free, and after SIGKILL only the partial file stays.
async fn backup_signalled_at_the_commit(sig: libc::c_int) {
    if !require_faults() || !require_tools(QSD_TOOLS) {
        return;
    }
    let s = live_setup().await;
    let out_dir = s.dir.join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let archive = out_dir.join("b.vma");
    let mut p = Proc::spawn(backup_cmd(&s, &archive, Some("pause-commit")), false);
    until_paused(&mut p).await;
    p.signal(sig);
    let ended = p.wait(TIMEOUT).await;
    if sig == libc::SIGKILL {
        assert_eq!(
            ended.status.signal(),
            Some(libc::SIGKILL),
            "{}",
            ended.stderr
        );
        assert_eq!(names_in(&out_dir), ["b.vma.partial"]);
    } else {
        ended.assert_exit(
            128 + sig,
            &[&format!(
                "stopped by {} while the archive was being finished; it was not made final",
                signal_name(sig)
            )],
        );
        assert_eq!(names_in(&out_dir), Vec::<String>::new());
    }
    // The targets were gone before the commit began: QEMU has nothing of
    // ours left either way.
    let qmp = vma_writer::qmp::Qmp::connect(s.daemon.qmp_socket())
        .await
        .unwrap();
    support::assert_no_leftovers(&qmp).await;
    drop(qmp);
    // And the next backup works.
    let again = archive.with_file_name("c.vma");
    Proc::spawn(backup_cmd(&s, &again, None), false)
        .wait(TIMEOUT)
        .await
        .assert_success();
    check_archive(
        &again,
        &[("drive-scsi0", s.size, &s.dir.join("scsi0.raw"))],
        &s.dir,
    );
    s.daemon.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_sigterm_at_the_commit_leaves_nothing() {
    backup_signalled_at_the_commit(libc::SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_sigkill_at_the_commit_leaves_only_the_partial_file() {
    backup_signalled_at_the_commit(libc::SIGKILL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_whose_fsync_fails_leaves_nothing() {
    if !require_faults() || !require_tools(QSD_TOOLS) {
        return;
    }
    let s = live_setup().await;
    let out_dir = s.dir.join("out");
    std::fs::create_dir(&out_dir).unwrap();
    for name in ["b.vma", "b.vma.zst"] {
        let ended = Proc::spawn(backup_cmd(&s, &out_dir.join(name), Some("fsync")), false)
            .wait(TIMEOUT)
            .await;
        ended.assert_exit(
            1,
            &[
                &format!("cannot fsync {}.partial", out_dir.join(name).display()),
                "the archive is not safely on disk",
            ],
        );
        assert_eq!(names_in(&out_dir), Vec::<String>::new(), "{name}");
    }
    s.daemon.shutdown().await.unwrap();
}

/// A tmpfs of `size` bytes mounted on `at`, unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    /// `None` (with SKIPPED, or a failure under REQUIRE_TOOLS) when this
    /// process may not mount.
    fn mount(at: &Path, size: u64) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).unwrap();
        let ok = StdCommand::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        support::require(ok, "cannot mount a tmpfs (needs root)").then(|| SmallDisk(at.into()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = StdCommand::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn create_onto_a_full_disk_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("img"), random_data(16 << 20, 8)).unwrap();
    let Some(disk) = SmallDisk::mount(&dir.join("small"), 4 << 20) else {
        return;
    };
    for out in ["small/a.vma", "small/a.vma.zst"] {
        let ended = Proc::spawn(create_cmd(dir, out, None), false)
            .wait(TIMEOUT)
            .await;
        ended.assert_exit(1, &["No space left on device"]);
        assert_eq!(names_in(&disk.0), Vec::<String>::new(), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_onto_a_full_disk_fails_qemu_job_and_leaves_nothing() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    let s = live_setup().await;
    let Some(disk) = SmallDisk::mount(&s.dir.join("small"), 4 << 20) else {
        return;
    };
    let ended = Proc::spawn(backup_cmd(&s, &disk.0.join("b.vma"), None), false)
        .wait(TIMEOUT)
        .await;
    ended.assert_exit(1, &["No space left on device"]);
    assert_eq!(names_in(&disk.0), Vec::<String>::new());
    let qmp = vma_writer::qmp::Qmp::connect(s.daemon.qmp_socket())
        .await
        .unwrap();
    support::assert_no_leftovers(&qmp).await;
    drop(qmp);
    s.daemon.shutdown().await.unwrap();
}
