//! `vma-writer list ARCHIVE`: the header, printed as Proxmox's `vma list`
//! prints it, so scripts that parse that output (qmrestore does) keep
//! working. What the archive index records of a backup chain (which bitmap
//! continues it, which drives were incremental) goes to stderr.

use std::io::Write;
use std::process::ExitCode;

use chrono::TimeZone;

use super::archive_input;
use crate::archive::Input;
use crate::backup::bitmap_name;
use crate::vma::{ArchiveIndex, Header};

/// Arguments of `list`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The archive (`-` for stdin; zstd, gzip and lzop are detected).
    pub archive: String,
}

/// C `ctime()` format, local time, without the newline.
pub fn ctime_string(t: i64) -> String {
    match chrono::Local.timestamp_opt(t, 0) {
        chrono::LocalResult::Single(d) | chrono::LocalResult::Ambiguous(d, _) => {
            d.format("%a %b %e %H:%M:%S %Y").to_string()
        }
        chrono::LocalResult::None => format!("@{t}"),
    }
}

/// Writes the `list` lines for `h`.
pub fn print_header(out: &mut impl Write, h: &Header) -> std::io::Result<()> {
    for c in &h.configs {
        writeln!(out, "CFG: size: {} name: {}", c.data.len(), c.name)?;
    }
    for d in &h.devices {
        if d.name == "vmstate" {
            // Legacy VM-state stream: Proxmox prints its size as memory.
            writeln!(out, "VMSTATE: dev_id={} memory: {}", d.id, d.size)?;
        } else {
            writeln!(
                out,
                "DEV: dev_id={} size: {} devname: {}",
                d.id, d.size, d.name
            )?;
        }
    }
    writeln!(out, "CTIME: {}", ctime_string(h.ctime))
}

/// The chain lines of an archive whose index records one (nothing for
/// one written outside a chain): the bitmap that continues it, and each
/// drive's mode with where its bytes came from.
pub fn chain_lines(h: &Header, index: &ArchiveIndex) -> Vec<String> {
    let devices: Vec<_> = h
        .devices
        .iter()
        .filter_map(|d| Some((d, index.device(d.id)?.chain)))
        .collect();
    let with_bitmap: Vec<&str> = devices
        .iter()
        .filter(|(_, c)| c.bitmap)
        .map(|(d, _)| d.name.as_str())
        .collect();
    let chained = devices.iter().any(|(_, c)| c.from_base);
    let mut out = Vec::new();
    if !with_bitmap.is_empty() {
        out.push(format!(
            "BITMAP: {} on {} (an incremental backup from this archive uses it)",
            bitmap_name(&h.uuid),
            with_bitmap.join(", ")
        ));
    }
    for (d, c) in devices.iter().filter(|_| chained) {
        out.push(if c.from_base {
            format!(
                "INCREMENTAL: {}: {} bytes from QEMU, {} from the base",
                d.name,
                d.size - c.base_bytes,
                c.base_bytes
            )
        } else {
            format!("FULL: {}", d.name)
        });
    }
    out
}

/// Runs `list`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let (header, chain) = match archive_input::open(&a.archive)? {
        // Only a file has an index; one that cannot be used is verify's
        // business, not list's.
        Input::File(f) => {
            let chain = match f.load_index() {
                Ok(Some(index)) => chain_lines(f.header(), &index),
                _ => Vec::new(),
            };
            (f.header().clone(), chain)
        }
        input => (archive_input::header_of(&a.archive, input)?, Vec::new()),
    };
    for line in chain {
        eprintln!("{line}");
    }
    let mut out = std::io::stdout().lock();
    match print_header(&mut out, &header).and_then(|_| out.flush()) {
        // A reader that stopped early (`| head`) is not our failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r?,
    }
    Ok(ExitCode::SUCCESS)
}
