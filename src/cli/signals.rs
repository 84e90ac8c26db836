//! SIGINT and SIGTERM for every command, and the exit status they lead to
//! (128 + the signal number: 130 and 143, as shells report them).
//!
//! - The live commands (`serve`, `backup`, `create` through QEMU, `demo`)
//!   run on tokio: [`stop_signal`] is a future their run loop selects on,
//!   and the library abandons the archive in its own cleanup path.
//! - The offline commands (`create` from raw images, `extract`) run on
//!   plain threads, blocked in reads and writes: [`Leftovers::watch`]
//!   starts a thread that, on a signal, removes what the command has left
//!   half-written (unless `--keep-partial`), says so in one line, and exits.

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;

/// A stop request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM.
    Terminate,
}

impl Signal {
    fn number(self) -> i32 {
        match self {
            Signal::Interrupt => signal_hook::consts::SIGINT,
            Signal::Terminate => signal_hook::consts::SIGTERM,
        }
    }

    fn from_number(n: i32) -> Signal {
        if n == signal_hook::consts::SIGINT {
            Signal::Interrupt
        } else {
            Signal::Terminate
        }
    }

    /// The exit status of a command stopped by this signal.
    pub fn exit_status(self) -> u8 {
        128 + self.number() as u8
    }

    /// [`Self::exit_status`] as an [`ExitCode`].
    pub fn exit_code(self) -> ExitCode {
        ExitCode::from(self.exit_status())
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        })
    }
}

/// A future that resolves with the first SIGINT or SIGTERM. The handlers
/// are installed when this is called (inside the runtime), not when the
/// future is first polled, so a signal during set-up is not lost or fatal.
pub fn stop_signal() -> impl Future<Output = Signal> + use<> {
    use tokio::signal::unix::{SignalKind, signal};
    let signals = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        let (Ok(mut int), Ok(mut term)) = signals else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => Signal::Interrupt,
            _ = term.recv() => Signal::Terminate,
        }
    }
}

/// Files and directories an offline command is writing, removed if a
/// signal stops it; see the module docs.
#[derive(Clone)]
pub struct Leftovers {
    state: Arc<Mutex<State>>,
}

struct State {
    command: &'static str,
    keep: bool,
    /// In creation order; removed in reverse.
    paths: Vec<PathBuf>,
    /// Private working directories (sockets): removed silently, even
    /// with `--keep-partial`.
    scratch: Vec<PathBuf>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Leftovers {
    /// Starts watching for SIGINT and SIGTERM on behalf of `command`.
    /// With `keep`, what was written stays (and the message says where).
    pub fn watch(command: &'static str, keep: bool) -> anyhow::Result<Leftovers> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .context("cannot install the signal handlers")?;
        let state = Arc::new(Mutex::new(State {
            command,
            keep,
            paths: Vec::new(),
            scratch: Vec::new(),
        }));
        let watched = state.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(n) = signals.forever().next() {
                    let signal = Signal::from_number(n);
                    // Waits for a commit in progress: a finished archive
                    // is never removed, a half-made one always is.
                    let st = lock(&watched);
                    let mut what = st.clean_up();
                    let aborted = crate::object::upload::abort_in_progress();
                    if !aborted.is_empty() {
                        what += &format!("; aborted the upload of {}", aborted.join(", "));
                    }
                    eprintln!("vma-writer: {} interrupted by {signal}{what}", st.command);
                    std::process::exit(i32::from(signal.exit_status()));
                }
            })
            .context("cannot start the signal thread")?;
        Ok(Leftovers { state })
    }

    /// Runs `make`, which creates files or directories, with signals held
    /// off, and registers what `made` says it created (directories are
    /// removed with their contents): a signal never finds a file created
    /// but not yet registered.
    pub fn create<T, E>(
        &self,
        make: impl FnOnce() -> Result<T, E>,
        made: impl FnOnce(&T) -> Vec<PathBuf>,
    ) -> Result<T, E> {
        let mut st = lock(&self.state);
        let out = make()?;
        st.paths.extend(made(&out));
        Ok(out)
    }

    /// Opens the archive output `target`, registering its partial files.
    /// Signals are held off only while files are created: opening an
    /// existing FIFO blocks until a reader comes, and a signal must still
    /// end the command then.
    pub fn sink(
        &self,
        target: &crate::sink::Target,
        opts: &crate::sink::SinkOptions,
    ) -> std::io::Result<crate::sink::Sink> {
        if target.creates_files() {
            self.create(|| crate::sink::Sink::create(target, opts), |s| s.partials())
        } else {
            crate::sink::Sink::create(target, opts)
        }
    }

    /// A private temporary directory (e.g. for a socket), made with
    /// signals held off; a signal removes it silently, `--keep-partial` or
    /// not. Dropping it removes it as usual.
    pub fn scratch_dir(&self) -> std::io::Result<tempfile::TempDir> {
        let mut st = lock(&self.state);
        let dir = tempfile::Builder::new().prefix("vma-writer-").tempdir()?;
        st.scratch.push(dir.path().to_path_buf());
        Ok(dir)
    }

    /// Runs `commit` (the step that makes the output final) with signals
    /// held off, then forgets every registered path: from now on they are
    /// the command's finished output.
    pub fn commit<T>(&self, commit: impl FnOnce() -> T) -> T {
        let mut st = lock(&self.state);
        let out = commit();
        st.paths.clear();
        out
    }
}

impl State {
    /// Removes the registered paths (unless kept); returns the tail of the
    /// message that says what happened to them.
    fn clean_up(&self) -> String {
        for p in &self.scratch {
            let _ = std::fs::remove_dir_all(p);
        }
        if self.paths.is_empty() {
            return String::new();
        }
        let list = |paths: &[PathBuf]| {
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if self.keep {
            let kept: Vec<PathBuf> = self.paths.iter().filter(|p| p.exists()).cloned().collect();
            if kept.is_empty() {
                return String::new();
            }
            return format!("; kept {} (--keep-partial)", list(&kept));
        }
        let mut removed = Vec::new();
        let mut failed = Vec::new();
        for p in self.paths.iter().rev() {
            let res = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
            match res {
                Ok(()) => removed.push(p.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => failed.push(format!("{} ({e})", p.display())),
            }
        }
        removed.reverse();
        let mut msg = String::new();
        if !removed.is_empty() {
            msg += &format!("; removed {}", list(&removed));
        }
        if !failed.is_empty() {
            msg += &format!("; could not remove {}", failed.join(", "));
        }
        msg
    }
}
