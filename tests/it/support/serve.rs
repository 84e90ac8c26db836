//! The one way to start `vma-writer serve` in a test: [`ServeCmd`] builds
//! the command line (listener, drives, output, extra flags), and
//! [`ServeCmd::start`] waits until it accepts clients: its `listening`
//! event with `--json`, its socket file without.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Proc, vma_async};

/// How long `serve` may take to listen.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// An NBD URI for export `export` on the Unix socket `sock`.
pub fn nbd_uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// A `serve` command line being built; see the module docs.
pub struct ServeCmd {
    cmd: tokio::process::Command,
    sock: Option<PathBuf>,
    json: bool,
}

/// Where a started `serve` listens.
#[derive(Debug, Clone)]
pub struct Listening {
    /// The Unix socket, for a `unix:` listener.
    pub sock: Option<PathBuf>,
    /// The `listening` event (with `--json`).
    pub event: Option<Value>,
}

impl Listening {
    /// An NBD URI for `export`.
    pub fn uri(&self, export: &str) -> String {
        match (&self.sock, &self.event) {
            (Some(sock), _) => nbd_uri(sock, export),
            (None, Some(ev)) => {
                let addr = ev["address"].as_str().expect("address in listening event");
                format!(
                    "nbd://{}/{export}",
                    addr.strip_prefix("tcp:").unwrap_or(addr)
                )
            }
            (None, None) => panic!("a TCP listener needs --json to learn its port"),
        }
    }
}

impl ServeCmd {
    /// `serve --listen unix:DIR/nbd.sock --drive NAME=SIZE... -o OUTPUT`.
    pub fn unix(dir: &Path, drives: &[(&str, u64)], output: impl AsRef<OsStr>) -> ServeCmd {
        let sock = dir.join("nbd.sock");
        let mut s = Self::with_listen(
            &format!("unix:{}", sock.display()),
            drives,
            output,
            vma_async(["serve"]),
        );
        s.sock = Some(sock);
        s
    }

    /// `serve --json --listen tcp:127.0.0.1:0 ...` (the port is learnt from
    /// the `listening` event).
    pub fn tcp(drives: &[(&str, u64)], output: impl AsRef<OsStr>) -> ServeCmd {
        Self::with_listen("tcp:127.0.0.1:0", drives, output, vma_async(["serve"])).json()
    }

    /// Like [`ServeCmd::unix`], for a `serve` command started by `cmd`
    /// (e.g. [`super::vma_async_file_limit`]).
    pub fn unix_with(
        cmd: tokio::process::Command,
        dir: &Path,
        drives: &[(&str, u64)],
        output: impl AsRef<OsStr>,
    ) -> ServeCmd {
        let sock = dir.join("nbd.sock");
        let mut s = Self::with_listen(&format!("unix:{}", sock.display()), drives, output, cmd);
        s.sock = Some(sock);
        s
    }

    fn with_listen(
        listen: &str,
        drives: &[(&str, u64)],
        output: impl AsRef<OsStr>,
        mut cmd: tokio::process::Command,
    ) -> ServeCmd {
        cmd.args(["--listen", listen]);
        for (name, size) in drives {
            cmd.arg("--drive").arg(format!("{name}={size}"));
        }
        cmd.arg("-o").arg(output);
        ServeCmd {
            cmd,
            sock: None,
            json: false,
        }
    }

    /// Adds `--json`: progress and the result as events.
    pub fn json(mut self) -> ServeCmd {
        self.cmd.arg("--json");
        self.json = true;
        self
    }

    /// Adds flags.
    pub fn args<I, S>(mut self, args: I) -> ServeCmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd.args(args);
        self
    }

    /// The command, for environment and stdout settings.
    pub fn command(&mut self) -> &mut tokio::process::Command {
        &mut self.cmd
    }

    /// Starts `serve` and waits until it listens.
    pub async fn start(self) -> (Proc, Listening) {
        let mut p = Proc::spawn(self.cmd, self.json);
        let event = if self.json {
            Some(
                p.next_event(LISTEN_TIMEOUT, |e| e["event"] == "listening")
                    .await,
            )
        } else {
            let sock = self.sock.as_ref().expect("without --json, a unix listener");
            let deadline = Instant::now() + LISTEN_TIMEOUT;
            while !sock.exists() {
                assert!(
                    !p.has_exited(),
                    "serve exited before listening: {}",
                    p.stderr()
                );
                assert!(Instant::now() < deadline, "serve did not listen");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None
        };
        (
            p,
            Listening {
                sock: self.sock,
                event,
            },
        )
    }
}
