//! Progress and result display for the live commands (`serve`, `backup`,
//! `create` through QEMU): per-drive indicatif bars on a terminal, JSON
//! lines with `--json`, and a closing summary either way. Where status
//! lines go ([`StatusOut`]) is decided by the caller: stderr whenever the
//! archive itself is on stdout.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;

use crate::assembler::{DriveStatus, FillStats};
use crate::backup::{DrivePlan, Finished, Mode};
use crate::target::{IncompleteDrive, Report};

/// How often the live commands refresh progress.
pub const TICK: Duration = Duration::from_millis(500);

/// Where machine-readable status lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusOut {
    /// Standard output (the default).
    Stdout,
    /// Standard error: the archive is on stdout.
    Stderr,
}

impl StatusOut {
    /// Status lines go to stderr when the archive goes to `output`'s
    /// stdout.
    pub fn for_output(output: &crate::sink::Target) -> StatusOut {
        if *output == crate::sink::Target::Stdout {
            StatusOut::Stderr
        } else {
            StatusOut::Stdout
        }
    }

    /// Prints one JSON line of machine-readable status.
    pub fn json_line(self, v: serde_json::Value) {
        match self {
            StatusOut::Stderr => eprintln!("{v}"),
            StatusOut::Stdout => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{v}");
                let _ = out.flush();
            }
        }
    }
}

/// `v` with `mode` (`full` or `incremental`), and the `reason` of a full
/// backup or the `bitmap` of an incremental one.
fn mode_json(mode: &Mode, mut v: serde_json::Value) -> serde_json::Value {
    match mode {
        Mode::Incremental { bitmap, .. } => {
            v["mode"] = json!("incremental");
            v["bitmap"] = json!(bitmap);
        }
        Mode::Full { reason } => {
            v["mode"] = json!("full");
            if let Some(r) = reason {
                v["reason"] = json!(r.to_string());
            }
        }
    }
    v
}

/// One live display; see the module docs.
pub struct LiveDisplay {
    json: bool,
    out: StatusOut,
    bars: Option<(MultiProgress, Vec<ProgressBar>)>,
    ticks: u64,
}

impl LiveDisplay {
    /// A display for drives named in `initial`.
    pub fn new(json: bool, out: StatusOut, initial: &[DriveStatus]) -> Self {
        let bars = (!json && std::io::stderr().is_terminal()).then(|| {
            let mp = MultiProgress::new();
            let style = ProgressStyle::with_template(
                "{prefix:<16} {wide_bar} {binary_bytes:>10}/{binary_total_bytes:<10} {msg}",
            )
            .expect("valid template");
            let bars = initial
                .iter()
                .map(|s| {
                    let b = mp.add(ProgressBar::new(s.size));
                    b.set_style(style.clone());
                    b.set_prefix(s.name.clone());
                    b
                })
                .collect();
            (mp, bars)
        });
        LiveDisplay {
            json,
            out,
            bars,
            ticks: 0,
        }
    }

    /// Shows the current status.
    pub fn update(&mut self, status: &[DriveStatus]) {
        self.ticks += 1;
        if let Some((_, bars)) = &self.bars {
            for (b, s) in bars.iter().zip(status) {
                b.set_position(s.done);
                b.set_message(if s.complete {
                    "complete".to_string()
                } else if s.connections > 0 {
                    format!("{} client(s)", s.connections)
                } else if s.ever_connected {
                    "disconnected".to_string()
                } else {
                    "waiting".to_string()
                });
            }
        }
        // JSON progress once a second, not on every tick.
        if self.json && self.ticks.is_multiple_of(2) {
            self.out.json_line(json!({
                "event": "progress",
                "drives": status.iter().map(|s| json!({
                    "name": s.name, "size": s.size, "done": s.done,
                    "complete": s.complete, "connections": s.connections,
                })).collect::<Vec<_>>(),
            }));
        }
    }

    /// Removes the bars.
    pub fn clear(&mut self) {
        if let Some((mp, bars)) = self.bars.take() {
            for b in bars {
                b.finish_and_clear();
            }
            let _ = mp.clear();
        }
    }

    /// A remark, one line on stderr (above the bars while they show).
    pub fn note(&mut self, line: &str) {
        let line = format!("vma-writer: {line}");
        match &self.bars {
            Some((mp, _)) => {
                let _ = mp.println(&line);
            }
            None => eprintln!("{line}"),
        }
    }

    /// Shows each drive's mode when a base was given: one line per drive,
    /// saying why a drive is backed up in full; with `--json` also a
    /// `plan` event.
    pub fn planned(&mut self, plan: &[DrivePlan]) {
        let chained = plan
            .iter()
            .any(|p| !matches!(p.mode, Mode::Full { reason: None }));
        if !chained {
            return;
        }
        if self.json {
            self.out.json_line(json!({
                "event": "plan",
                "drives": plan.iter().map(|p| mode_json(&p.mode, json!({"name": p.name}))).collect::<Vec<_>>(),
            }));
        }
        for p in plan {
            let line = match &p.mode {
                Mode::Incremental { bitmap, dirty, .. } => {
                    format!(
                        "{}: incremental: {dirty} bytes changed since the base ({bitmap})",
                        p.name
                    )
                }
                Mode::Full { reason: Some(r) } => format!("{}: full backup: {r}", p.name),
                Mode::Full { reason: None } => format!("{}: full backup", p.name),
            };
            self.note(&line);
        }
    }

    /// Reports a backup's success, with each drive's mode and where its
    /// bytes came from when a base was given.
    pub fn finished_backup(&mut self, f: &Finished) {
        self.finished_with(&f.report, &f.plan, &f.fills);
    }

    /// Reports success.
    pub fn finished(&mut self, r: &Report) {
        self.finished_with(r, &[], &[]);
    }

    fn finished_with(&mut self, r: &Report, plan: &[DrivePlan], fills: &[Option<FillStats>]) {
        self.clear();
        let path = r.summary.path.as_ref().map(|p| p.display().to_string());
        let full = Mode::Full { reason: None };
        let drives = r.summary.drives.iter().enumerate().map(|(i, d)| {
            let mode = plan.get(i).map_or(&full, |p| &p.mode);
            let fill = fills.get(i).copied().flatten();
            (d, mode, fill)
        });
        if self.json {
            self.out.json_line(json!({
                "event": "finished",
                "archive": path,
                "bytes": r.bytes,
                "zero_bytes": r.zero_bytes,
                "archive_bytes": r.summary.archive_bytes,
                "copied_bytes": r.summary.copied_bytes,
                "duration_s": r.duration.as_secs_f64(),
                "mb_per_s": r.mb_per_s(),
                "drives": drives.map(|(d, mode, fill)| {
                    let mut v = json!({
                        "name": d.name, "size": d.size, "zero_bytes": d.zero_bytes,
                        "received_bytes": d.received_bytes, "base_bytes": d.base_bytes,
                    });
                    if let Some(f) = fill {
                        v["fill_s"] = json!(f.elapsed.as_secs_f64());
                    }
                    mode_json(mode, v)
                }).collect::<Vec<_>>(),
            }));
        } else {
            eprintln!(
                "archive {}: {} bytes from {} drive(s), {} zero bytes, {} archive bytes, {:.1} s, {:.0} MB/s",
                path.as_deref().unwrap_or("(stdout)"),
                r.bytes,
                r.summary.drives.len(),
                r.zero_bytes,
                r.summary.archive_bytes,
                r.duration.as_secs_f64(),
                r.mb_per_s()
            );
            let chained = plan
                .iter()
                .any(|p| !matches!(p.mode, Mode::Full { reason: None }));
            for (d, mode, fill) in drives.filter(|_| chained) {
                match (mode, fill) {
                    (Mode::Incremental { .. }, Some(f)) => eprintln!(
                        "  {}: incremental, {} bytes from QEMU, {} from the base ({:.1} s, {:.0} MB/s)",
                        d.name,
                        d.received_bytes,
                        d.base_bytes,
                        f.elapsed.as_secs_f64(),
                        f.bytes as f64 / 1e6 / f.elapsed.as_secs_f64().max(1e-9)
                    ),
                    _ => eprintln!("  {}: full, {} bytes from QEMU", d.name, d.received_bytes),
                }
            }
        }
    }

    /// Reports failure; `missing` lists incomplete drives.
    pub fn failed(&mut self, reason: &str, missing: &[IncompleteDrive]) {
        self.clear();
        if self.json {
            let missing: Vec<String> = missing.iter().map(ToString::to_string).collect();
            self.out
                .json_line(json!({"event": "failed", "reason": reason, "incomplete": missing}));
        }
        eprintln!("vma-writer: backup failed: {reason}");
        for m in missing {
            eprintln!("  incomplete drive {m}");
        }
    }
}
