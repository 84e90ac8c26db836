//! Progress of the offline commands.
//!
//! - [`CreateProgress`]: `create -v` prints `vma create -v`'s lines on
//!   stderr; a terminal gets a bar instead.
//! - [`ReadProgress`]: `verify -v` and `extract -v` print Proxmox's
//!   progress and total lines on **stdout**, exactly as `vma` does
//!   (qmrestore and scripts parse them); without `-v`, a terminal on
//!   stderr gets a bar.
//! - [`ConvertProgress`]: `extract --format`'s, the same two ways, from
//!   the bytes qemu-img has converted.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressStyle};

use crate::vma::{Device, Header, RestoreStats};

fn bar(total: u64, label: &str, template: &str) -> ProgressBar {
    let b = ProgressBar::new(total);
    b.set_style(ProgressStyle::with_template(template).expect("valid template"));
    b.set_message(label.to_string());
    b
}

/// One line on stdout, flushed at once as Proxmox does. A closed stdout
/// does not fail the command: the lines are a report, not its result.
pub fn stdout_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}

/// `create`'s progress; see the module docs.
pub struct CreateProgress {
    bar: Option<ProgressBar>,
    plain: bool,
    total: u64,
    last_pct: Option<u64>,
}

impl CreateProgress {
    /// A display for `total` bytes of drives.
    pub fn new(total: u64, verbose: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        CreateProgress {
            bar: tty.then(|| {
                bar(
                    total,
                    "create",
                    "{msg} [{elapsed_precise}] {wide_bar} {percent:>3}% {binary_bytes_per_sec}",
                )
            }),
            plain: verbose && !tty,
            total,
            last_pct: None,
        }
    }

    /// Reports `done` bytes, `zero` of them in zero blocks.
    pub fn update(&mut self, done: u64, zero: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
        }
        if !self.plain {
            return;
        }
        let pct = (done * 100).checked_div(self.total).unwrap_or(100);
        if self.last_pct != Some(pct) {
            self.last_pct = Some(pct);
            eprintln!("progress {pct}% {done}/{} {zero}", self.total);
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// `verify`'s and `extract`'s progress; see the module docs.
pub struct ReadProgress {
    stats: RestoreStats,
    verbose: bool,
    bar: Option<ProgressBar>,
}

impl ReadProgress {
    /// A display for reading the archive with `header`.
    pub fn new(header: &Header, verbose: bool, label: &str) -> Self {
        let clusters = header.devices.iter().map(|d| d.clusters()).sum();
        ReadProgress {
            stats: RestoreStats::new(&header.devices),
            verbose,
            bar: (!verbose && std::io::stderr().is_terminal()).then(|| {
                bar(
                    clusters,
                    label,
                    "{msg} [{elapsed_precise}] {wide_bar} {percent:>3}%",
                )
            }),
        }
    }

    /// Counts one cluster of `dev`, stored with `mask`.
    pub fn cluster(&mut self, dev: &Device, cluster: u64, mask: u16) {
        let line = self.stats.add_cluster(dev, cluster, mask);
        if let Some(b) = &self.bar {
            b.inc(1);
        }
        if let (Some(line), true) = (line, self.verbose) {
            stdout_line(&line);
        }
    }

    /// Removes the bar; with `-v`, prints the totals.
    pub fn finish(&self, success: bool) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if success && self.verbose {
            for line in self.stats.summary() {
                stdout_line(&line);
            }
        }
    }
}

/// `extract --format`'s progress; see the module docs.
pub struct ConvertProgress {
    bar: Option<ProgressBar>,
    verbose: bool,
    total: u64,
    started: std::time::Instant,
    last_pct: Option<u64>,
}

impl ConvertProgress {
    /// A display for converting `total` bytes of drives.
    pub fn new(total: u64, verbose: bool, label: &str) -> Self {
        ConvertProgress {
            bar: (!verbose && std::io::stderr().is_terminal()).then(|| {
                bar(
                    total,
                    label,
                    "{msg} [{elapsed_precise}] {wide_bar} {percent:>3}%",
                )
            }),
            verbose,
            total,
            started: std::time::Instant::now(),
            last_pct: None,
        }
    }

    /// Reports `done` bytes converted; with `-v`, a line per percent, as
    /// `extract -v` prints them.
    pub fn update(&mut self, done: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
        }
        let pct = (done * 100).checked_div(self.total).unwrap_or(100);
        if self.verbose && self.last_pct != Some(pct) {
            self.last_pct = Some(pct);
            stdout_line(&format!(
                "progress {pct}% (read {done} bytes, duration {} sec)",
                self.started.elapsed().as_secs()
            ));
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
