//! The one way to start `vma-writer export` in a test: [`ExportCmd`]
//! builds the command line (always with `--json`), [`ExportCmd::start`]
//! waits for its `listening` event, which names every export and its URI
//! ([`Exported`]); the server's peak memory comes from /proc
//! ([`peak_rss`]).

use std::ffi::OsStr;
use std::path::Path;

use serde_json::Value;

use super::{LISTEN_TIMEOUT, Proc, vma_async};

/// An `export` command line being built; see the module docs.
pub struct ExportCmd {
    cmd: tokio::process::Command,
}

/// What a started `export` serves: its `listening` event.
#[derive(Debug, Clone)]
pub struct Exported {
    pub event: Value,
}

impl Exported {
    /// The URI of export `name`, as the server announced it.
    pub fn uri(&self, name: &str) -> String {
        self.event["exports"]
            .as_array()
            .expect("exports")
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no export {name} in {}", self.event))["uri"]
            .as_str()
            .expect("uri")
            .to_string()
    }

    /// The exports' names and sizes, in the order announced.
    pub fn exports(&self) -> Vec<(String, u64)> {
        self.event["exports"]
            .as_array()
            .expect("exports")
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_string(),
                    e["size"].as_u64().unwrap(),
                )
            })
            .collect()
    }
}

impl ExportCmd {
    /// `export ARCHIVE --listen unix:SOCK --json`.
    pub fn unix(archive: &Path, sock: &Path) -> ExportCmd {
        Self::with_listen(archive, &format!("unix:{}", sock.display()))
    }

    /// `export ARCHIVE --listen tcp:127.0.0.1:0 --json` (the port comes
    /// with the `listening` event).
    pub fn tcp(archive: &Path) -> ExportCmd {
        Self::with_listen(archive, "tcp:127.0.0.1:0")
    }

    fn with_listen(archive: &Path, listen: &str) -> ExportCmd {
        let mut cmd = vma_async(["export"]);
        cmd.arg(archive).args(["--listen", listen, "--json"]);
        ExportCmd { cmd }
    }

    /// Adds flags.
    pub fn args<I, S>(mut self, args: I) -> ExportCmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd.args(args);
        self
    }

    /// The command, for its environment.
    pub fn command(&mut self) -> &mut tokio::process::Command {
        &mut self.cmd
    }

    /// Starts `export` and waits until it listens.
    pub async fn start(self) -> (Proc, Exported) {
        let mut p = Proc::spawn(self.cmd, true);
        let event = p
            .next_event(LISTEN_TIMEOUT, |e| e["event"] == "listening")
            .await;
        (p, Exported { event })
    }
}

/// Peak resident memory of process `pid` in bytes (`VmHWM`).
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib * 1024
}
