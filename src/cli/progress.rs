//! Progress reporting for the offline commands: an indicatif bar when
//! stderr is a terminal, Proxmox-style plain lines when it is not and the
//! user asked for `-v`, nothing otherwise.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// How a plain progress line is worded.
#[derive(Debug, Clone, Copy)]
pub enum Style {
    /// `vma create -v`: `progress P% transferred/total zero_bytes`.
    Create,
    /// `vma verify/extract -v`: `progress P% (read N bytes, duration S sec)`.
    Read,
}

/// One progress display; see the module docs.
pub struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    style: Style,
    total: u64,
    last_pct: Option<u64>,
    start: Instant,
}

impl Progress {
    /// A display for `total` units (bytes or clusters).
    pub fn new(total: u64, verbose: bool, style: Style, label: &str) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = tty.then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg} [{elapsed_precise}] {wide_bar} {percent:>3}% {binary_bytes_per_sec}",
                )
                .expect("valid template"),
            );
            b.set_message(label.to_string());
            b
        });
        Progress {
            bar,
            plain: verbose && !tty,
            style,
            total,
            last_pct: None,
            start: Instant::now(),
        }
    }

    /// Reports `done` units, plus `zero` bytes (create) or bytes read.
    pub fn update(&mut self, done: u64, extra: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
        }
        if !self.plain {
            return;
        }
        let pct = (done * 100).checked_div(self.total).unwrap_or(100);
        if self.last_pct == Some(pct) {
            return;
        }
        self.last_pct = Some(pct);
        match self.style {
            Style::Create => eprintln!("progress {pct}% {done}/{} {extra}", self.total),
            Style::Read => eprintln!(
                "progress {pct}% (read {extra} bytes, duration {} sec)",
                self.start.elapsed().as_secs()
            ),
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
