//! Long-running children, asynchronously: `serve`, `backup`, `demo`, or a
//! client that stays connected, as a [`Proc`] whose stderr is collected and
//! whose `--json` stdout lines arrive as events; [`run_async`] runs a short
//! one to its end. Every wait has a limit: a hung child is killed and the
//! test fails with the child's stderr instead of blocking CI.

use std::process::{ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::kill;

/// Runs `cmd` to its end within `timeout` (killed and a panic otherwise);
/// stdin from /dev/null, stdout and stderr captured.
pub async fn run_async(cmd: &mut Command, timeout: Duration) -> Output {
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

    /// The `finished` JSON event; panics when there is none.
    pub fn finished_event(&self) -> &Value {
        self.events
            .iter()
            .find(|e| e["event"] == "finished")
            .unwrap_or_else(|| panic!("no finished event: {:?}\n{}", self.events, self.stderr))
    }

    /// Requires exit status 0.
    pub fn assert_success(&self) {
        assert!(
            self.status.success(),
            "failed ({}); stderr:\n{}",
            self.status,
            self.stderr
        );
    }

    /// Requires exit status `code` and a stderr holding every one of
    /// `needles`.
    pub fn assert_exit(&self, code: i32, needles: &[&str]) {
        assert_eq!(
            self.status.code(),
            Some(code),
            "exit status ({}); stderr:\n{}",
            self.status,
            self.stderr
        );
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "stderr does not say {n:?}:\n{}",
                self.stderr
            );
        }
    }

    /// Requires a failed live run: exit status 1 (not a panic's 101, not a
    /// signal's), the message `vma-writer: backup failed: ...` exactly once,
    /// and every one of `needles` in stderr.
    pub fn assert_backup_failed(&self, needles: &[&str]) {
        self.assert_exit(1, needles);
        assert_eq!(
            self.stderr.matches("backup failed: ").count(),
            1,
            "the failure is not reported exactly once:\n{}",
            self.stderr
        );
    }

    /// Requires a run stopped by `sig` (SIGINT or SIGTERM): exit status 128
    /// + its number and the message `stopped by SIGINT` / `SIGTERM`.
    pub fn assert_stopped_by(&self, sig: libc::c_int) {
        self.assert_exit(128 + sig, &[&format!("stopped by {}", signal_name(sig))]);
    }
}

/// `SIGINT` or `SIGTERM`.
pub fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGKILL => "SIGKILL",
        _ => panic!("no name for signal {sig}"),
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
