//! `qemu-storage-daemon` as a child process.
//!
//! Owns: finding the binary, building its command line (one `file` node and
//! one format node per image, two QMP monitors), starting it and waiting
//! until QMP answers, capturing its stderr so start-up failures quote QEMU's
//! own message, an optional NBD export of a node (for tests that write to a
//! source while it is being backed up), and stopping it on every path:
//! [`StorageDaemon::shutdown`] (QMP `quit`, then signals), `Drop` (SIGTERM,
//! then SIGKILL), and `PR_SET_PDEATHSIG` so the daemon dies with us even
//! when vma-writer is killed hard.
//!
//! Used by `vma-writer create -d format=qcow2:NAME=IMAGE`, `vma-writer demo`
//! and the tests. Leaves the QMP protocol to [`crate::qmp`]; knows nothing of
//! our NBD server or VMA.
//!
//! # Layout of the runtime directory
//!
//! Every instance gets a unique prefix `qsd<pid>-<n>` in the caller's
//! private runtime directory: `<prefix>-m0.sock` (the monitor for the caller,
//! [`StorageDaemon::qmp_socket`]), `<prefix>-m1.sock` (a spare monitor used
//! by [`StorageDaemon::shutdown`] and [`StorageDaemon::export_nbd`], since a
//! QMP socket serves one client at a time), `<prefix>-nbd.sock` (the NBD
//! export, when asked for) and `<prefix>-stderr.log`. Sockets are removed at
//! the end; the stderr log is kept for the caller to read or delete.

use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use tokio::process::{Child, Command};
use tracing::{debug, warn};

use crate::qmp::{self, Qmp};

/// Binary name looked up on `PATH`.
pub const BINARY_NAME: &str = "qemu-storage-daemon";

/// Environment variable naming the binary to use instead of the one on
/// `PATH`.
pub const BINARY_ENV: &str = "QEMU_STORAGE_DAEMON";

/// How long [`StorageDaemon::start`] waits for the QMP sockets to accept.
/// Opening images is quick; this only trips on a hung daemon.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`StorageDaemon::shutdown`] gives QMP `quit` (connect, reply)
/// before it falls back to SIGTERM.
pub const QUIT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the daemon may take to exit after `quit` or SIGTERM before it
/// gets SIGKILL. qemu-storage-daemon flushes and closes its images first.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `Drop` blocks waiting after SIGTERM, and again after SIGKILL.
/// `Drop` cannot await, so it polls; kept short because it blocks a thread.
pub const DROP_WAIT: Duration = Duration::from_secs(1);

/// Poll interval while waiting for sockets or exit.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// QEMU node names are at most 31 bytes; we append `-file` for the
/// protocol node, so an image's node name may have 26.
pub const MAX_NODE_NAME: usize = 31 - FILE_NODE_SUFFIX.len();

/// Suffix of the `file` node under each image's format node.
pub const FILE_NODE_SUFFIX: &str = "-file";

/// Bytes of the stderr log quoted in errors (the end of it).
const STDERR_TAIL: usize = 4096;

/// Errors starting or stopping the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No binary found.
    #[error("{BINARY_NAME} not found ({searched}); install qemu-utils or set {BINARY_ENV}")]
    NotFound {
        /// Where we looked.
        searched: String,
    },
    /// A node name QEMU would reject, or one that could inject options.
    #[error(
        "bad node name {name:?}: {BINARY_NAME} wants a letter then letters, digits, '-', '.', '_', at most {MAX_NODE_NAME} bytes"
    )]
    BadNodeName {
        /// The rejected name.
        name: String,
    },
    /// A format name with characters outside `[a-z0-9_-]`.
    #[error("bad image format {format:?} for node {node_name}")]
    BadFormat {
        /// The image's node name.
        node_name: String,
        /// The rejected format.
        format: String,
    },
    /// The runtime directory's path makes a socket path too long.
    #[error("socket path {} is {len} bytes, longer than {MAX_SOCKET_PATH}; use a shorter runtime dir", path.display())]
    SocketPathTooLong {
        /// The socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// Filesystem or process error around the daemon.
    #[error("{op}: {source}")]
    Io {
        /// What we were doing.
        op: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The daemon exited while starting (bad image, locked file, ...).
    #[error("{BINARY_NAME} exited during start-up ({status}): {stderr}")]
    Exited {
        /// Its exit status.
        status: ExitStatus,
        /// The end of its stderr.
        stderr: String,
    },
    /// The QMP sockets did not accept within the limit.
    #[error("{BINARY_NAME} did not open its QMP sockets within {timeout:?}; stderr: {stderr}")]
    StartTimeout {
        /// The limit.
        timeout: Duration,
        /// The end of its stderr.
        stderr: String,
    },
    /// A QMP command to the daemon failed.
    #[error(transparent)]
    Qmp(#[from] qmp::Error),
}

/// One image the daemon opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Node name of the format node (what a backup names as `device`); the
    /// protocol node under it is `<node_name>-file`.
    pub node_name: String,
    /// Image file.
    pub path: PathBuf,
    /// QEMU format driver: `raw`, `qcow2`, or any other QEMU knows.
    pub format: String,
    /// Open both nodes read-only (no write lock, no writes possible).
    pub read_only: bool,
}

impl Image {
    /// A writable image.
    pub fn new(node_name: impl Into<String>, path: impl Into<PathBuf>, format: &str) -> Image {
        Image {
            node_name: node_name.into(),
            path: path.into(),
            format: format.to_string(),
            read_only: false,
        }
    }

    /// The same image, opened read-only.
    pub fn read_only(self) -> Image {
        Image {
            read_only: true,
            ..self
        }
    }
}

/// What [`StorageDaemon::start`] needs.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Private directory for sockets and the stderr log; created (mode 0700)
    /// when missing. Keep its path short: socket paths have a
    /// [`MAX_SOCKET_PATH`] limit.
    pub runtime_dir: PathBuf,
    /// Images to open, in order.
    pub images: Vec<Image>,
    /// Binary to run; `None` uses [`find_binary`].
    pub binary: Option<PathBuf>,
    /// Limit for the start-up; [`START_TIMEOUT`] by default.
    pub start_timeout: Duration,
}

impl DaemonOptions {
    /// Options with no images yet and the defaults.
    pub fn new(runtime_dir: impl Into<PathBuf>) -> DaemonOptions {
        DaemonOptions {
            runtime_dir: runtime_dir.into(),
            images: Vec::new(),
            binary: None,
            start_timeout: START_TIMEOUT,
        }
    }

    /// Adds an image.
    pub fn image(mut self, image: Image) -> DaemonOptions {
        self.images.push(image);
        self
    }
}

/// Finds the daemon: `$QEMU_STORAGE_DAEMON` when set, else `PATH`.
pub fn find_binary() -> Result<PathBuf, Error> {
    find_program(BINARY_NAME, BINARY_ENV).map_err(|searched| Error::NotFound { searched })
}

/// Finds program `name`: the file `$env` names when that is set, else
/// `name` on `PATH`. On failure, says where it looked.
pub fn find_program(name: &str, env: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{env}={}", p.display()))
        };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| "PATH".into())
}

/// Checks a node name against QEMU's rules (`id_wellformed`), which also
/// keeps `,` and `=` out of our option strings.
fn check_node_name(name: &str) -> Result<(), Error> {
    let ok = name.len() <= MAX_NODE_NAME
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadNodeName {
            name: name.to_string(),
        })
    }
}

/// QEMU's option syntax splits on `,`; a literal comma is written `,,`.
fn escape_option_value(p: &Path) -> OsString {
    let mut out = Vec::new();
    for &b in p.as_os_str().as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// The two `--blockdev` values for one image.
fn blockdev_args(img: &Image) -> Result<[OsString; 2], Error> {
    check_node_name(&img.node_name)?;
    if img.format.is_empty()
        || !img
            .format
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    {
        return Err(Error::BadFormat {
            node_name: img.node_name.clone(),
            format: img.format.clone(),
        });
    }
    let ro = if img.read_only { ",read-only=on" } else { "" };
    let file_node = format!("{}{FILE_NODE_SUFFIX}", img.node_name);
    let mut file = OsString::from("driver=file,filename=");
    file.push(escape_option_value(&img.path));
    file.push(format!(",node-name={file_node}{ro}"));
    let format = OsString::from(format!(
        "driver={},file={file_node},node-name={}{ro}",
        img.format, img.node_name
    ));
    Ok([file, format])
}

fn socket_path(dir: &Path, name: String) -> Result<PathBuf, Error> {
    let path = dir.join(name);
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Error::SocketPathTooLong { path, len });
    }
    Ok(path)
}

/// The last [`STDERR_TAIL`] bytes of a file, trimmed, or a note that it is
/// empty.
fn read_tail(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let tail = &bytes[bytes.len().saturating_sub(STDERR_TAIL)..];
    let s = String::from_utf8_lossy(tail).trim().to_string();
    if s.is_empty() {
        "(no output)".into()
    } else {
        s
    }
}

/// Distinguishes instances started by this process.
static INSTANCE: AtomicU32 = AtomicU32::new(0);

/// A running `qemu-storage-daemon`. Dropping it stops the daemon (blocking
/// up to twice [`DROP_WAIT`]); prefer [`StorageDaemon::shutdown`] in async
/// code.
pub struct StorageDaemon {
    /// `None` once shut down.
    child: Option<Child>,
    pid: u32,
    /// `[caller's monitor, spare monitor]`.
    qmp_sockets: [PathBuf; 2],
    nbd_socket: PathBuf,
    nbd_started: bool,
    exports: u32,
    stderr_path: PathBuf,
    images: Vec<Image>,
}

impl fmt::Debug for StorageDaemon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageDaemon")
            .field("pid", &self.pid)
            .field("qmp_socket", &self.qmp_sockets[0])
            .field("images", &self.images)
            .finish_non_exhaustive()
    }
}

impl StorageDaemon {
    /// Starts the daemon with `opts.images` open and waits until both QMP
    /// sockets accept. Call it from an async task, not a `spawn_blocking`
    /// thread: the daemon gets SIGKILL when the spawning thread exits.
    pub async fn start(opts: DaemonOptions) -> Result<StorageDaemon, Error> {
        let binary = match opts.binary {
            Some(b) => b,
            None => find_binary()?,
        };
        let dir = &opts.runtime_dir;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::Io {
                op: format!("create runtime dir {}", dir.display()),
                source,
            })?;
        let prefix = format!(
            "qsd{}-{}",
            std::process::id(),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        );
        let qmp_sockets = [
            socket_path(dir, format!("{prefix}-m0.sock"))?,
            socket_path(dir, format!("{prefix}-m1.sock"))?,
        ];
        let nbd_socket = socket_path(dir, format!("{prefix}-nbd.sock"))?;
        let stderr_path = dir.join(format!("{prefix}-stderr.log"));

        // Stale files exist only if an earlier process with our pid was
        // killed hard. QEMU replaces its sockets itself; clearing them here
        // also clears an NBD socket QEMU would only create later.
        for p in qmp_sockets.iter().chain([&nbd_socket]) {
            let _ = std::fs::remove_file(p);
        }

        let mut cmd = Command::new(&binary);
        for img in &opts.images {
            for arg in blockdev_args(img)? {
                cmd.arg("--blockdev").arg(arg);
            }
        }
        // Monitors last: once they accept, every image is open.
        for (i, sock) in qmp_sockets.iter().enumerate() {
            let mut chardev = OsString::from("socket,path=");
            chardev.push(escape_option_value(sock));
            chardev.push(format!(",server=on,wait=off,id=qmp{i}"));
            cmd.arg("--chardev")
                .arg(chardev)
                .arg("--monitor")
                .arg(format!("chardev=qmp{i}"));
        }
        let stderr = std::fs::File::create(&stderr_path).map_err(|source| Error::Io {
            op: format!("create {}", stderr_path.display()),
            source,
        })?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        die_with_parent(cmd.as_std_mut());
        debug!(binary = %binary.display(), args = ?cmd.as_std().get_args().collect::<Vec<_>>(), "starting qemu-storage-daemon");
        let child = cmd.spawn().map_err(|source| Error::Io {
            op: format!("start {}", binary.display()),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let mut daemon = StorageDaemon {
            child: Some(child),
            pid,
            qmp_sockets,
            nbd_socket,
            nbd_started: false,
            exports: 0,
            stderr_path,
            images: opts.images,
        };
        daemon.wait_ready(opts.start_timeout).await?;
        debug!(pid, "qemu-storage-daemon ready");
        Ok(daemon)
    }

    /// Polls until both QMP sockets accept a connection. On failure the
    /// caller drops `self`, which stops the daemon.
    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let mut ready = [false; 2];
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().map_err(|source| Error::Io {
                op: "wait for qemu-storage-daemon".into(),
                source,
            })? {
                return Err(Error::Exited {
                    status,
                    stderr: self.stderr(),
                });
            }
            for (i, sock) in self.qmp_sockets.iter().enumerate() {
                // Connect and hang up at once: QEMU greets nobody and goes
                // back to listening.
                if !ready[i] && tokio::net::UnixStream::connect(sock).await.is_ok() {
                    ready[i] = true;
                }
            }
            if ready.iter().all(|&r| r) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::StartTimeout {
                    timeout,
                    stderr: self.stderr(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The images it was started with.
    pub fn images(&self) -> &[Image] {
        &self.images
    }

    /// The QMP monitor meant for the caller (e.g. the backup command).
    pub fn qmp_socket(&self) -> &Path {
        &self.qmp_sockets[0]
    }

    /// The second QMP monitor. [`StorageDaemon::shutdown`] and
    /// [`StorageDaemon::export_nbd`] use it briefly; a long-lived client on
    /// it makes them wait up to [`QUIT_TIMEOUT`] / [`qmp::CONNECT_TIMEOUT`].
    pub fn spare_qmp_socket(&self) -> &Path {
        &self.qmp_sockets[1]
    }

    /// Connects a QMP client to [`StorageDaemon::qmp_socket`].
    pub async fn connect(&self) -> Result<Qmp, Error> {
        Ok(Qmp::connect(self.qmp_socket()).await?)
    }

    /// The end of the daemon's stderr so far.
    pub fn stderr(&self) -> String {
        read_tail(&self.stderr_path)
    }

    /// Where the daemon's stderr goes.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// Exports `node_name` over the daemon's own NBD server (started on
    /// first use, on a Unix socket in the runtime dir) under the export name
    /// `export`; returns the socket path. A writable export lets a test
    /// write to a source while a backup of it runs: QEMU moves the export
    /// onto the backup's copy-before-write filter.
    ///
    /// Uses the spare monitor, so it works while another client holds
    /// [`StorageDaemon::qmp_socket`].
    pub async fn export_nbd(
        &mut self,
        node_name: &str,
        export: &str,
        writable: bool,
    ) -> Result<PathBuf, Error> {
        let qmp = Qmp::connect(self.spare_qmp_socket()).await?;
        if !self.nbd_started {
            qmp.nbd_server_start(self.nbd_socket.as_path()).await?;
            self.nbd_started = true;
        }
        let id = format!("export{}", self.exports);
        qmp.block_export_add_nbd(&id, node_name, export, writable)
            .await?;
        self.exports += 1;
        Ok(self.nbd_socket.clone())
    }

    /// Stops the daemon: QMP `quit` on the spare monitor (or SIGTERM when
    /// that fails within [`QUIT_TIMEOUT`]), then SIGKILL after
    /// [`EXIT_TIMEOUT`]. Reaps the child and returns its exit status.
    pub async fn shutdown(mut self) -> Result<ExitStatus, Error> {
        let Some(mut child) = self.child.take() else {
            unreachable!("child is only taken by shutdown or drop");
        };
        let quit = async {
            let qmp = Qmp::connect_with_timeout(self.spare_qmp_socket(), QUIT_TIMEOUT).await?;
            qmp.quit().await
        };
        match tokio::time::timeout(QUIT_TIMEOUT, quit).await {
            Ok(Ok(())) => debug!(pid = self.pid, "qemu-storage-daemon: quit sent"),
            Ok(Err(e)) => {
                debug!(pid = self.pid, error = %e, "quit failed; sending SIGTERM");
                signal(&mut child, Signal::TERM);
            }
            Err(_) => {
                debug!(pid = self.pid, "quit timed out; sending SIGTERM");
                signal(&mut child, Signal::TERM);
            }
        }
        let status = match tokio::time::timeout(EXIT_TIMEOUT, child.wait()).await {
            Ok(r) => r,
            Err(_) => {
                warn!(
                    pid = self.pid,
                    "qemu-storage-daemon did not exit; killing it"
                );
                // kill() sends SIGKILL and reaps; wait() then returns the status.
                match child.kill().await {
                    Ok(()) => child.wait().await,
                    Err(e) => Err(e),
                }
            }
        }
        .map_err(|source| Error::Io {
            op: format!("wait for qemu-storage-daemon (pid {})", self.pid),
            source,
        })?;
        self.remove_sockets();
        Ok(status)
    }

    fn remove_sockets(&self) {
        for p in self.qmp_sockets.iter().chain([&self.nbd_socket]) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Makes the child `cmd` starts get SIGKILL when the thread that starts
/// it exits (`PR_SET_PDEATHSIG`): a QEMU tool never outlives vma-writer,
/// even when vma-writer is killed hard. Start it from a thread that lives
/// as long as the child should (not a `spawn_blocking` thread).
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = Pid::from_raw(std::process::id() as i32);
    // SAFETY: the closure only makes async-signal-safe calls (prctl,
    // getppid, as raw syscalls) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            // We may have died between fork and prctl.
            if rustix::process::getppid() != parent {
                return Err(rustix::io::Errno::SRCH.into());
            }
            Ok(())
        });
    }
}

/// Sends `sig` to the child unless it has been reaped (so the pid cannot
/// belong to another process yet).
fn signal(child: &mut Child, sig: Signal) {
    if let Ok(None) = child.try_wait()
        && let Some(pid) = child.id().and_then(|p| Pid::from_raw(p as i32))
    {
        // Only fails when the child is already gone (ESRCH).
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Polls `try_wait` for up to `limit`; true when the child is reaped.
fn wait_blocking(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => std::thread::sleep(POLL_INTERVAL),
        }
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(&mut child, Signal::TERM);
        if !wait_blocking(&mut child, DROP_WAIT) {
            warn!(
                pid = self.pid,
                "qemu-storage-daemon ignored SIGTERM; killing it"
            );
            let _ = child.start_kill();
            // If even this times out, kill_on_drop and tokio's orphan
            // reaper finish the job.
            wait_blocking(&mut child, DROP_WAIT);
        }
        self.remove_sockets();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for ok in ["a", "drive0", "A.b_c-d", &"x".repeat(MAX_NODE_NAME)] {
            assert!(check_node_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "0drive",
            "-a",
            "a,driver=null-co",
            "a=b",
            "a b",
            "é",
            &"x".repeat(MAX_NODE_NAME + 1),
        ] {
            assert!(
                matches!(check_node_name(bad), Err(Error::BadNodeName { ref name }) if name == bad),
                "{bad}"
            );
        }
    }

    #[test]
    fn blockdev_command_line() {
        let img = Image::new("drive0", "/tmp/a,b.qcow2", "qcow2");
        let [file, format] = blockdev_args(&img).unwrap();
        assert_eq!(
            file,
            "driver=file,filename=/tmp/a,,b.qcow2,node-name=drive0-file"
        );
        assert_eq!(format, "driver=qcow2,file=drive0-file,node-name=drive0");

        let [file, format] = blockdev_args(&Image::new("d", "/x", "raw").read_only()).unwrap();
        assert_eq!(
            file,
            "driver=file,filename=/x,node-name=d-file,read-only=on"
        );
        assert_eq!(format, "driver=raw,file=d-file,node-name=d,read-only=on");

        let bad = Image::new("d", "/x", "raw,file=y");
        assert!(matches!(
            blockdev_args(&bad),
            Err(Error::BadFormat { ref format, .. }) if format == "raw,file=y"
        ));
    }

    #[test]
    fn socket_path_limit() {
        let long = PathBuf::from(format!("/{}", "d".repeat(100)));
        assert!(matches!(
            socket_path(&long, "qsd1-0-m0.sock".into()),
            Err(Error::SocketPathTooLong { len, .. }) if len > MAX_SOCKET_PATH
        ));
        assert!(socket_path(Path::new("/tmp/x"), "qsd1-0-m0.sock".into()).is_ok());
    }

    #[test]
    fn not_found_message() {
        let e = Error::NotFound {
            searched: "PATH".into(),
        };
        assert_eq!(
            e.to_string(),
            "qemu-storage-daemon not found (PATH); install qemu-utils or set QEMU_STORAGE_DAEMON"
        );
    }
}
