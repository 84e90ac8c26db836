//! Helpers for the QMP / qemu-storage-daemon tests: source images made with
//! qemu-img and qemu-io, an nbdkit `memory` server as the backup target, and
//! process checks.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Tools every test in these files needs.
pub const TOOLS: &[&str] = &["qemu-storage-daemon", "qemu-img", "qemu-io", "nbdkit"];

/// How long a test waits for a helper process to come up.
pub const TOOL_START_TIMEOUT: Duration = Duration::from_secs(10);

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img create -f FORMAT DIR/NAME SIZE`.
pub fn make_image(dir: &Path, name: &str, format: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(&path)
        .arg(size.to_string()));
    path
}

/// Writes `pattern` bytes at `offset..offset+len` with qemu-io (image not
/// open elsewhere). `image` may also be an NBD URI.
pub fn write_pattern(image: &str, format: &str, pattern: u8, offset: u64, len: u64) {
    run(Command::new("qemu-io")
        .args(["-f", format, image, "-c"])
        .arg(format!("write -P {pattern:#x} {offset} {len}")));
}

/// True when `qemu-img compare` finds the two images identical; `-U` so an
/// image qemu-storage-daemon holds open can be read.
pub fn images_equal(a: &str, a_fmt: &str, b: &str, b_fmt: &str) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", a_fmt, "-F", b_fmt, a, b])
        .output()
        .expect("run qemu-img compare");
    if !out.status.success() {
        eprintln!(
            "qemu-img compare: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

/// `nbdkit -f -U SOCK memory SIZE`: a RAM disk the backup writes into.
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

/// Sends `sig` to `pid`.
pub fn kill(pid: u32, sig: libc::c_int) {
    // SAFETY: plain syscall.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}
