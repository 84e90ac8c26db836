//! Running programs to their end, synchronously: the binary under test
//! ([`vma`], [`TestEnv`]) and external tools ([`run_ok`]), each within a
//! deadline (a hung child is killed and the test fails quoting its
//! stderr), plus the assertions on how they ended. Long-running children
//! (`serve`, `backup`, clients that stay connected) are [`super::Proc`]s.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_vma-writer");

/// Limit for short commands (list, verify, extract, qemu-img, qemu-io).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// Limit for a whole backup run (the throttled ones take ~8 s).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(90);

/// `vma-writer ARGS...` with TZ=UTC (so `CTIME:` lines are comparable),
/// without RUST_LOG (no logs unless a test asks) and stdin from /dev/null.
pub fn vma<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new(BIN);
    c.args(args)
        .env("TZ", "UTC")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    c
}

/// [`vma`] as a tokio command, for [`super::Proc`] and async tests.
pub fn vma_async<I, S>(args: I) -> tokio::process::Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    tokio::process::Command::from(vma(args))
}

/// [`vma_async`] under `ulimit -f BLOCKS` (1 KiB blocks in bash, 512 B in
/// dash: either way a small limit), so writing the archive fails with
/// EFBIG.
pub fn vma_async_file_limit<I, S>(blocks: u64, args: I) -> tokio::process::Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("ulimit -f {blocks}; exec \"$0\" \"$@\""))
        .arg(BIN)
        .args(args)
        .env("TZ", "UTC")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    tokio::process::Command::from(c)
}

/// Runs `cmd` to its end within `timeout`, stdout and stderr captured
/// (whatever `cmd` set for them); a child still running at the deadline is
/// killed and the test fails.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Output {
    feed_within(cmd, None, timeout)
}

/// [`output_within`], writing `stdin` (if any) to the child's stdin from
/// another thread (EPIPE ignored: the child may stop reading early).
fn feed_within(cmd: &mut Command, stdin: Option<Vec<u8>>, timeout: Duration) -> Output {
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = spawn_piped(cmd);
    let feeder = stdin.map(|data| {
        let mut sin = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            let _ = sin.write_all(&data);
        })
    });
    let out = wait_within(child, timeout);
    if let Some(f) = feeder {
        f.join().unwrap();
    }
    out
}

/// Starts `cmd` with stdout and stderr piped (for [`wait_within`]).
pub fn spawn_piped(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Waits for a child started by [`spawn_piped`] to end within `timeout`,
/// collecting its output; a child still running at the deadline is killed
/// and the test fails quoting its stderr.
pub fn wait_within(mut child: Child, timeout: Duration) -> Output {
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout piped")));
    let err = drain(Box::new(child.stderr.take().expect("stderr piped")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for child") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = err.join().unwrap_or_default();
            panic!(
                "child {} did not finish within {timeout:?} (killed); stderr:\n{}",
                child.id(),
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Runs `cmd` within [`CMD_TIMEOUT`].
pub fn run(cmd: &mut Command) -> Output {
    output_within(cmd, CMD_TIMEOUT)
}

/// Runs a tool (stdin from /dev/null) and requires success; returns its
/// output.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd.stdin(Stdio::null()));
    assert_success(&out, &cmd);
    out
}

/// Stdout as text.
pub fn stdout_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Requires exit status 0.
pub fn assert_success(out: &Output, what: &dyn std::fmt::Debug) {
    assert!(
        out.status.success(),
        "{what:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Requires exit status `code`; returns stderr as text.
pub fn assert_exit(out: &Output, code: i32, what: &dyn std::fmt::Debug) -> String {
    let err = String::from_utf8(out.stderr.clone()).expect("stderr is UTF-8");
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what:?}: exit status ({}); stdout {} bytes; stderr:\n{err}",
        out.status,
        out.stdout.len()
    );
    err
}

/// Requires a failure: exit status 1 and an error message on stderr.
pub fn assert_failure(out: &Output, what: &dyn std::fmt::Debug) -> String {
    let err = assert_exit(out, 1, what);
    assert!(
        err.contains("error:"),
        "{what:?}: stderr has no error message: {err:?}"
    );
    err
}

/// Requires a usage error: exit status 2 (clap's), with a message.
pub fn assert_usage_error(out: &Output, what: &dyn std::fmt::Debug) -> String {
    let err = assert_exit(out, 2, what);
    assert!(
        err.contains("error:"),
        "{what:?}: no error message: {err:?}"
    );
    err
}

/// A temp dir plus helpers to run `vma-writer` in it (fd's `TestEnv`).
pub struct TestEnv {
    pub dir: tempfile::TempDir,
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl TestEnv {
    pub fn new() -> Self {
        TestEnv {
            dir: tempfile::Builder::new()
                .prefix("vma-tests-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes a file (relative to the env) and returns its path.
    pub fn write(&self, rel: impl AsRef<Path>, data: &[u8]) -> PathBuf {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, data).unwrap();
        p
    }

    /// [`vma`] with the env as working directory.
    pub fn cmd<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = vma(args);
        c.current_dir(self.dir.path());
        c
    }

    /// Runs with `stdin` as input, within [`CMD_TIMEOUT`].
    pub fn run_stdin<I, S>(&self, args: I, stdin: &[u8]) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        feed_within(&mut self.cmd(args), Some(stdin.to_vec()), CMD_TIMEOUT)
    }

    /// Runs within [`CMD_TIMEOUT`].
    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(&mut self.cmd(args))
    }

    /// Runs and requires exit status 0; returns stdout.
    pub fn ok<I, S>(&self, args: I) -> Vec<u8>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args = os_args(args);
        let out = self.run(&args);
        assert_success(&out, &args);
        out.stdout
    }

    /// Runs and requires a failure (exit 1); returns stderr as text.
    pub fn fails<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args = os_args(args);
        let out = self.run(&args);
        assert_failure(&out, &args)
    }

    /// Runs and requires a usage error (exit 2); returns stderr.
    pub fn fails_usage<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args = os_args(args);
        let out = self.run(&args);
        assert_usage_error(&out, &args)
    }
}

/// Arguments as owned strings, to run them and quote them in a message.
fn os_args<I, S>(args: I) -> Vec<std::ffi::OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    args.into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect()
}

/// Every path under `dir`, relative, sorted.
pub fn tree(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            out.push(p.strip_prefix(base).unwrap().to_path_buf());
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Polls `cond` until it holds; fails the test after `timeout`, naming
/// `what` it waited for.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How a [`run_measured`] child ended and how much memory it used.
#[derive(Debug)]
pub struct Measured {
    pub out: Output,
    /// Peak resident set size in KiB: the child's VmHWM, sampled every
    /// few milliseconds while it runs. (wait4's ru_maxrss cannot be used:
    /// a child inherits its parent's high-water mark through fork and
    /// exec, and the test binary is large.)
    pub max_rss_kib: u64,
    pub elapsed: Duration,
}

/// Runs `cmd` to its end within `timeout` like [`output_within`], optionally
/// under an address-space limit (`RLIMIT_AS`, bytes: a huge allocation then
/// fails instead of being overcommitted), and reports its peak RSS.
pub fn run_measured(cmd: &mut Command, as_limit: Option<u64>, timeout: Duration) -> Measured {
    use std::os::unix::process::CommandExt;
    if let Some(limit) = as_limit {
        // SAFETY: setrlimit is async-signal-safe; nothing else runs
        // between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let l = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let start = Instant::now();
    let mut child = spawn_piped(cmd);
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout piped")));
    let err = drain(Box::new(child.stderr.take().expect("stderr piped")));
    let pid = child.id();
    let deadline = start + timeout;
    let mut max_rss_kib = 0;
    let status = loop {
        if let Some(hwm) = vm_hwm_kib(pid) {
            max_rss_kib = max_rss_kib.max(hwm);
        }
        if let Some(s) = child.try_wait().expect("wait for child") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?} (killed)");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    Measured {
        out: Output {
            status,
            stdout: out.join().unwrap(),
            stderr: err.join().unwrap(),
        },
        max_rss_kib,
        elapsed: start.elapsed(),
    }
}

/// VmHWM (peak RSS) of process `pid` in KiB, while it runs.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
