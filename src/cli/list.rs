//! `vma-writer list ARCHIVE`: the header, printed as Proxmox's `vma list`
//! prints it, so scripts that parse that output (qmrestore does) keep
//! working.

use std::io::Write;
use std::process::ExitCode;

use chrono::TimeZone;

use super::archive_input;
use crate::vma::Header;

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

/// Runs `list`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let header = archive_input::header(&a.archive)?;
    let mut out = std::io::stdout().lock();
    match print_header(&mut out, &header).and_then(|_| out.flush()) {
        // A reader that stopped early (`| head`) is not our failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r?,
    }
    Ok(ExitCode::SUCCESS)
}
