//! Shared helpers for the live-backup restore and failure tests
//! (`tests/live_*.rs`): the `vma-writer` binary as a child process with a
//! deadline on everything, source images with known content, restore and
//! byte-for-byte comparison, and QMP checks on a qemu-storage-daemon.
//!
//! Every wait has a limit: a hung child is killed and the test fails with
//! the child's stderr instead of blocking CI.

#![allow(dead_code)]

use std::borrow::BorrowMut;
use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use vma_writer::qmp::Qmp;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_vma-writer");

/// Tools the daemon-based tests need.
pub const QSD_TOOLS: &[&str] = &["qemu-storage-daemon", "qemu-img", "qemu-io"];

/// Limit for short commands (list, verify, extract, qemu-img, qemu-io).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// Limit for a whole backup run (the throttled ones take ~8 s).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(90);

/// 64 KiB: the VMA cluster and QEMU's default backup cluster.
pub const CLUSTER: u64 = 64 * 1024;

/// 10 MiB + 1536 B: ends in the middle of a cluster and of a 4 KiB block.
pub const ODD_SIZE: u64 = 10 * 1024 * 1024 + 1536;

/// Turns on logs of in-process code when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

// ---------------------------------------------------------------------
// Processes with deadlines
// ---------------------------------------------------------------------

/// Runs `cmd` to its end within `timeout` (killed and a panic otherwise).
pub async fn run_with_timeout(mut cmd: impl BorrowMut<Command>, timeout: Duration) -> Output {
    let cmd = cmd.borrow_mut();
    cmd.kill_on_drop(true).stdin(Stdio::null());
    let what = format!("{:?}", cmd.as_std());
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("{what}: {e}"),
        // Dropping the future drops the child, which kills it.
        Err(_) => panic!("{what} did not finish within {timeout:?}"),
    }
}

/// Runs `cmd` and asserts it succeeds; returns its stdout.
pub async fn run_ok(mut cmd: impl BorrowMut<Command>) -> String {
    let cmd = cmd.borrow_mut();
    let what = format!("{:?}", cmd.as_std());
    let out = run_with_timeout(cmd, CMD_TIMEOUT).await;
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `vma-writer ARGS...` as a command.
pub fn vma_cmd<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new(BIN);
    c.args(args);
    c
}

/// Sends `sig` to `pid`.
pub fn kill(pid: u32, sig: libc::c_int) {
    // SAFETY: plain syscall.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// How a [`Proc`] ended.
#[derive(Debug)]
pub struct Ended {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stderr.
    pub stderr: String,
    /// Every line it printed on stdout (with `--json`), parsed; lines that
    /// are not JSON appear as JSON strings.
    pub events: Vec<Value>,
    /// How long after spawning it ended.
    pub elapsed: Duration,
}

impl Ended {
    /// The `failed` JSON event, if one was printed.
    pub fn failed_event(&self) -> Option<&Value> {
        self.events.iter().find(|e| e["event"] == "failed")
    }
}

/// A long-running child (`serve`, `backup`, a writer) whose stderr is
/// collected and, with `json`, whose stdout lines are parsed as JSON
/// events. Killed when dropped.
pub struct Proc {
    child: Child,
    what: String,
    started: Instant,
    events: Option<mpsc::UnboundedReceiver<Value>>,
    seen: Vec<Value>,
    stdout_task: Option<JoinHandle<()>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_task: JoinHandle<()>,
}

impl Proc {
    /// Spawns `cmd`. With `json`, stdout is read as JSON lines (see
    /// [`Proc::next_event`]); otherwise stdout stays as `cmd` set it, and
    /// [`Proc::take_stdout`] hands out a pipe if one was asked for.
    pub fn spawn(mut cmd: Command, json: bool) -> Proc {
        cmd.kill_on_drop(true)
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        if json {
            cmd.stdout(Stdio::piped());
        }
        let what = format!("{:?}", cmd.as_std());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut pipe = child.stderr.take().expect("stderr piped");
        let sink = stderr.clone();
        let stderr_task = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            loop {
                match pipe.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
        });
        let (events, stdout_task) = if json {
            let (tx, rx) = mpsc::unbounded_channel();
            let out = child.stdout.take().expect("stdout piped");
            let task = tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    // A line that is not JSON is kept as a JSON string, so
                    // tests can assert on it.
                    let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            });
            (Some(rx), Some(task))
        } else {
            (None, None)
        };
        Proc {
            child,
            what,
            started: Instant::now(),
            events,
            seen: Vec::new(),
            stdout_task,
            stderr,
            stderr_task,
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("not reaped yet")
    }

    /// Sends `sig` to the child.
    pub fn signal(&self, sig: libc::c_int) {
        kill(self.pid(), sig);
    }

    /// The stdout pipe, when the command was given `Stdio::piped()` and
    /// `json` was false.
    pub fn take_stdout(&mut self) -> tokio::process::ChildStdout {
        self.child
            .stdout
            .take()
            .expect("stdout piped and not taken")
    }

    /// Stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// True once the child has exited (it is not reaped here).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits up to `timeout` for the first JSON event `pred` accepts.
    /// Panics (with the child's stderr) on timeout or when stdout ends.
    pub async fn next_event(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        let rx = self.events.as_mut().expect("spawned with json");
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(v)) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Ok(None) => panic!(
                    "{} ended its output before the awaited event; events {:?}; stderr:\n{}",
                    self.what,
                    self.seen,
                    self.stderr()
                ),
                Err(_) => panic!(
                    "no awaited event from {} within {timeout:?}; events {:?}; stderr:\n{}",
                    self.what,
                    self.seen,
                    self.stderr()
                ),
            }
        }
    }

    /// Waits up to `timeout` for the child to exit; kills it and panics
    /// (quoting its stderr) when it does not.
    pub async fn wait(mut self, timeout: Duration) -> Ended {
        let status = match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(s) => s.expect("wait for child"),
            Err(_) => {
                let _ = self.child.kill().await;
                // Let the reader tasks catch the last output.
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "{} did not exit within {timeout:?} (killed); stderr:\n{}",
                    self.what,
                    self.stderr()
                );
            }
        };
        let elapsed = self.started.elapsed();
        // The pipes close with the process (unless it left children that
        // hold them; then give up after a while).
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.stderr_task).await;
        if let Some(t) = self.stdout_task.as_mut() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        let mut events = std::mem::take(&mut self.seen);
        if let Some(rx) = self.events.as_mut() {
            while let Ok(v) = rx.try_recv() {
                events.push(v);
            }
        }
        Ended {
            status,
            stderr: self.stderr(),
            events,
            elapsed,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        self.stderr_task.abort();
        if let Some(t) = &self.stdout_task {
            t.abort();
        }
    }
}

/// `--json` progress: `done` of the drive named `name`, if present.
pub fn progress_done(ev: &Value, name: &str) -> Option<u64> {
    if ev["event"] != "progress" {
        return None;
    }
    ev["drives"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == name)?["done"]
        .as_u64()
}

// ---------------------------------------------------------------------
// Source images
// ---------------------------------------------------------------------

/// A small deterministic generator (splitmix64) for test data.
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Creates a sparse raw image of `size` bytes holding random "islands" of
/// data between holes: `count` islands at random, unaligned offsets of up
/// to `max_len` bytes, plus one island straddling a cluster boundary and
/// one ending exactly at the end of the image. Returns the path.
pub fn raw_islands(path: &Path, size: u64, seed: u64, count: usize, max_len: u64) -> PathBuf {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng::new(seed);
    let mut islands: Vec<(u64, u64)> = (0..count)
        .map(|_| {
            let len = 1 + rng.below(max_len.min(size));
            (rng.below(size - len + 1), len)
        })
        .collect();
    let edge = (size / 2) / CLUSTER * CLUSTER;
    islands.push((edge - 777, 1500.min(size - edge + 777)));
    let tail = 3000.min(size);
    islands.push((size - tail, tail));
    for (off, len) in islands {
        let mut buf = vec![0u8; len as usize];
        rng.fill(&mut buf);
        f.write_all_at(&buf, off).unwrap();
    }
    f.sync_all().unwrap();
    path.to_path_buf()
}

/// Writes with qemu-io into `image` (a file of `format`, or an NBD URI
/// with format raw): each command is one `-c` (e.g. `write -P 0x11 0 4k`).
pub async fn qemu_io(image: &str, format: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", format, image]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = run_ok(&mut c).await;
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io {cmds:?}: {out}"
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
pub async fn qcow2_scattered(path: &Path, size: u64, expected: &Path) {
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path)
            .arg(size.to_string()),
    )
    .await;
    qemu_io(path.to_str().unwrap(), "qcow2", &qcow2_commands(size)).await;
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(path)
            .arg(expected),
    )
    .await;
    assert_eq!(std::fs::metadata(expected).unwrap().len(), size);
}

// ---------------------------------------------------------------------
// Archive checks
// ---------------------------------------------------------------------

/// `(name, size)` of each `DEV:` line of `vma-writer list`.
pub async fn list_devices(archive: &Path) -> Vec<(String, u64)> {
    let out = run_ok(vma_cmd(["list".as_ref(), archive.as_os_str()])).await;
    out.lines()
        .filter_map(|l| l.strip_prefix("DEV: "))
        .map(|l| {
            // "dev_id=1 size: 67108864 devname: drive-scsi0"
            let size = l
                .split("size: ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad DEV line {l:?}"));
            let name = l
                .split("devname: ")
                .nth(1)
                .unwrap_or_else(|| panic!("bad DEV line {l:?}"));
            (name.trim().to_string(), size)
        })
        .collect()
}

/// `vma-writer verify ARCHIVE` must succeed.
pub async fn verify_ok(archive: &Path) {
    run_ok(vma_cmd(["verify".as_ref(), archive.as_os_str()])).await;
}

/// Extracts `archive` into a new directory under `dir`; returns it.
pub async fn extract(archive: &Path, dir: &Path) -> PathBuf {
    let out = dir.join(format!(
        "restored-{}",
        archive.file_name().unwrap().to_string_lossy()
    ));
    run_ok(vma_cmd([
        "extract".as_ref(),
        archive.as_os_str(),
        out.as_os_str(),
    ]))
    .await;
    out
}

/// The restored image of drive `name` in an extract directory.
pub fn restored(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("disk-{name}.raw"))
}

/// The ranges of `f` that may hold data (`SEEK_DATA`/`SEEK_HOLE`); the
/// rest reads as zeros. Reading the holes of a 1 GiB sparse image costs
/// seconds in a debug build, so comparisons skip them.
pub fn data_ranges(f: &std::fs::File) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let len = f.metadata().unwrap().len();
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: plain syscalls on an open descriptor.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole is left
        }
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        assert!(hole >= data, "SEEK_HOLE failed");
        out.push((data as u64, hole as u64));
        pos = hole as u64;
    }
    out
}

/// Merges two sorted range lists into their sorted union.
fn union(mut a: Vec<(u64, u64)>, b: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    a.extend(b);
    a.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in a {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Asserts the file `actual` holds exactly `expected`'s bytes; on a
/// mismatch names the first differing offset. Holes in both files are
/// not read (see [`data_ranges`]).
pub fn assert_same_file(actual: &Path, expected: &Path) {
    let a = std::fs::File::open(actual)
        .unwrap_or_else(|e| panic!("open restored {}: {e}", actual.display()));
    let b = std::fs::File::open(expected).unwrap();
    let (la, lb) = (a.metadata().unwrap().len(), b.metadata().unwrap().len());
    assert_eq!(
        la,
        lb,
        "{} has {la} bytes, {} has {lb}",
        actual.display(),
        expected.display()
    );
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    for (start, end) in union(data_ranges(&a), data_ranges(&b)) {
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(ba.len());
            a.read_exact_at(&mut ba[..n], off).unwrap();
            b.read_exact_at(&mut bb[..n], off).unwrap();
            if ba[..n] != bb[..n] {
                let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
                panic!(
                    "{} differs from {} at byte {} ({:#04x} vs {:#04x})",
                    actual.display(),
                    expected.display(),
                    off + i as u64,
                    ba[i],
                    bb[i]
                );
            }
            off += n as u64;
        }
    }
}

/// Asserts the file `actual` holds exactly `expected`.
pub fn assert_file_is(actual: &Path, expected: &[u8]) {
    let data = std::fs::read(actual).unwrap();
    assert_eq!(data.len(), expected.len(), "{} size", actual.display());
    if let Some(i) = (0..data.len()).find(|&i| data[i] != expected[i]) {
        panic!(
            "{} differs at byte {i} ({:#04x}, expected {:#04x})",
            actual.display(),
            data[i],
            expected[i]
        );
    }
}

/// Checks the archive of a backup: `list` shows `drives` (name, size) in
/// order, `verify` passes, and each extracted drive equals its expected
/// image file.
pub async fn check_archive(archive: &Path, drives: &[(&str, u64, &Path)], scratch: &Path) {
    let t = Instant::now();
    let listed = list_devices(archive).await;
    let want: Vec<(String, u64)> = drives.iter().map(|(n, s, _)| (n.to_string(), *s)).collect();
    assert_eq!(listed, want, "list of {}", archive.display());
    verify_ok(archive).await;
    eprintln!(
        "{}: listed and verified in {:?}",
        archive.display(),
        t.elapsed()
    );
    let dir = extract(archive, scratch).await;
    eprintln!("{}: extracted in {:?}", archive.display(), t.elapsed());
    for (name, _, expected) in drives {
        assert_same_file(&restored(&dir, name), expected);
    }
    eprintln!("{}: compared in {:?}", archive.display(), t.elapsed());
}

/// Asserts that neither `archive` nor, unless `keep_partial`,
/// `archive.partial` exists; with `keep_partial` the partial file must
/// exist.
pub fn assert_no_archive(archive: &Path, keep_partial: bool) {
    assert!(
        !archive.exists(),
        "{} exists after a failed backup",
        archive.display()
    );
    let partial = vma_writer::sink::partial_path(archive);
    assert_eq!(
        partial.exists(),
        keep_partial,
        "{} exists: {}, expected {keep_partial}",
        partial.display(),
        partial.exists()
    );
}

// ---------------------------------------------------------------------
// QMP checks
// ---------------------------------------------------------------------

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

/// Creates a dense raw image of `size` random bytes (nothing for QEMU to
/// skip, so a throttled backup really takes size/speed seconds).
pub fn dense_random(path: &Path, size: u64, seed: u64) -> PathBuf {
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; size as usize];
    rng.fill(&mut data);
    std::fs::write(path, &data).unwrap();
    path.to_path_buf()
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
pub async fn assert_no_process_mentions(needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = processes_mentioning(needle);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "processes left behind: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
