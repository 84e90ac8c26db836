//! QEMU and other peers: the library's own [`StorageDaemon`] started with
//! the test's images ([`start_daemon`]), `qemu-img` / `qemu-io` wrappers,
//! an nbdkit RAM disk as a plain backup target, checks that QEMU holds
//! nothing of ours, and process checks.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vma_writer::qemu::{DaemonOptions, Image, StorageDaemon};
use vma_writer::qmp::Qmp;

use super::{run, run_ok, stdout_text};

/// How long a test waits for a helper process to come up.
pub const TOOL_START_TIMEOUT: Duration = Duration::from_secs(10);

/// A qemu-storage-daemon (runtime dir `DIR/run`) serving `images` as
/// (node name, path, format).
pub async fn start_daemon<P: AsRef<Path>>(dir: &Path, images: &[(&str, P, &str)]) -> StorageDaemon {
    let mut opts = DaemonOptions::new(dir.join("run"));
    for (node, path, format) in images {
        opts = opts.image(Image::new(*node, path.as_ref(), format));
    }
    StorageDaemon::start(opts)
        .await
        .unwrap_or_else(|e| panic!("qemu-storage-daemon: {e}"))
}

/// `qemu-img create -f FORMAT PATH SIZE`; returns the path.
pub fn qemu_img_create(path: &Path, format: &str, size: u64) -> PathBuf {
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", format])
            .arg(path)
            .arg(size.to_string()),
    );
    path.to_path_buf()
}

/// `qemu-img convert -f FORMAT -O raw SRC DST`.
pub fn qemu_img_to_raw(src: &Path, format: &str, dst: &Path) {
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", format, "-O", "raw"])
            .arg(src)
            .arg(dst),
    );
}

/// Runs qemu-io on `image` (a file of `format`, or an NBD URI with format
/// raw): each command is one `-c` (e.g. `write -P 0x11 0 4k`). Fails the
/// test when qemu-io reports an error (it exits 0 after a failed command).
pub fn qemu_io(image: &str, format: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", format, image]).env("LC_ALL", "C");
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = stdout_text(&run_ok(&mut c));
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io {cmds:?}: {out}"
    );
}

/// qemu-io `cmds` on `image` (format raw) that are expected to fail;
/// returns stdout and stderr together.
pub fn qemu_io_text(image: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", image])
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = run(&mut c);
    stdout_text(&out) + &String::from_utf8_lossy(&out.stderr)
}

/// Writes `pattern` bytes at `offset..offset+len` with qemu-io.
pub fn write_pattern(image: &str, format: &str, pattern: u8, offset: u64, len: u64) {
    qemu_io(
        image,
        format,
        &[format!("write -P {pattern:#x} {offset} {len}")],
    );
}

/// The commands [`qcow2_scattered`] writes, as qemu-io commands.
pub fn qcow2_commands(size: u64) -> Vec<String> {
    let m = 1u64 << 20;
    vec![
        format!("write -P 0x11 {} {}", 0, 512 * 1024),
        format!("write -P 0x22 {} {}", 100 * m + 4321, 2 * m + 5),
        format!("write -P 0x33 {} {}", 333 * m, 64 * 1024),
        format!("write -P 0x44 {} {}", 512 * m - 3000, 6000),
        // qcow2 zero clusters over data written before.
        format!("write -z {} {}", 100 * m + 512 * 1024, 1024 * 1024),
        format!("write -P 0x55 {} {}", 777 * m + 65536, m),
        format!("write -P 0x66 {} {}", size - 70000, 70000),
    ]
}

/// Creates a sparse qcow2 of `size` with a few MiB of data at scattered
/// offsets ([`qcow2_commands`]) and its expected raw content at
/// `expected` (converted before any daemon opens the image).
pub fn qcow2_scattered(path: &Path, size: u64, expected: &Path) {
    qemu_img_create(path, "qcow2", size);
    qemu_io(path.to_str().unwrap(), "qcow2", &qcow2_commands(size));
    qemu_img_to_raw(path, "qcow2", expected);
    assert_eq!(std::fs::metadata(expected).unwrap().len(), size);
}

/// True when `qemu-img compare` finds the two images identical; `-U` so an
/// image qemu-storage-daemon holds open can be read.
pub fn images_equal(a: &str, a_fmt: &str, b: &str, b_fmt: &str) -> bool {
    let out = run(Command::new("qemu-img")
        .args(["compare", "-U", "-f", a_fmt, "-F", b_fmt, a, b])
        .stdin(Stdio::null()));
    if !out.status.success() {
        eprintln!(
            "qemu-img compare: {}{}",
            stdout_text(&out),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

/// `nbdkit -f -U SOCK memory SIZE`: a RAM disk a backup writes into.
/// Killed and reaped on drop.
pub struct Nbdkit {
    child: Child,
    pub socket: PathBuf,
}

impl Nbdkit {
    pub fn memory(dir: &Path, name: &str, size: u64) -> Nbdkit {
        let socket = dir.join(format!("{name}.sock"));
        let pidfile = dir.join(format!("{name}.pid"));
        let child = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-U"])
            .arg(&socket)
            .arg("-P")
            .arg(&pidfile)
            .args(["memory", &size.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .expect("start nbdkit");
        let mut n = Nbdkit { child, socket };
        // nbdkit writes the pid file once it accepts connections.
        let deadline = Instant::now() + TOOL_START_TIMEOUT;
        while !std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n')) {
            if let Ok(Some(status)) = n.child.try_wait() {
                panic!("nbdkit exited: {status}");
            }
            assert!(Instant::now() < deadline, "nbdkit did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        n
    }

    /// An NBD URI for qemu-img / qemu-io.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts QEMU has no block job and no node left from `vma-writer
/// backup` (`vmaw<pid>-job*`, `-tgt*`, `-cbw*`).
pub async fn assert_no_leftovers(qmp: &Qmp) {
    let jobs = qmp.query_block_jobs().await.unwrap();
    assert!(
        jobs.iter().all(|j| !j.device.starts_with("vmaw")),
        "block jobs left: {jobs:?}"
    );
    let nodes = qmp.query_named_block_nodes().await.unwrap();
    let left: Vec<&str> = nodes
        .iter()
        .map(|n| n.node_name.as_str())
        .filter(|n| n.starts_with("vmaw"))
        .collect();
    assert!(left.is_empty(), "nodes left: {left:?}");
}

/// Sends `sig` to `pid`.
pub fn kill(pid: u32, sig: libc::c_int) {
    // SAFETY: plain syscall.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// True while `pid` is a live (not zombie) process.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the ")" that ends the command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => false,
    }
}

/// Live processes whose command line mentions `needle` (e.g. a temp dir
/// holding their images or sockets), as (pid, command line).
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // Zombies have an empty command line.
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(needle) {
            out.push((pid, cmd));
        }
    }
    out
}

/// Waits up to `timeout` until no process mentions `needle`; panics
/// listing those left.
pub fn assert_no_process_mentions(needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = processes_mentioning(needle);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "processes left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
