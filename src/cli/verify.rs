//! `vma-writer verify ARCHIVE [-v]`: reads everything and exits 0 only for a
//! valid and complete archive.

use std::process::ExitCode;

use anyhow::Context;

use super::archive_input;
use super::list::print_header;
use super::progress::{Progress, Style};
use crate::vma::Reader;

/// Arguments of `verify`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The archive (`-` for stdin).
    pub archive: String,
    /// Print the header and progress, as `vma verify -v` does.
    #[arg(short, long)]
    pub verbose: bool,
}

/// Prints Proxmox's closing statistics lines.
pub fn print_totals(bytes: u64, zero: u64) {
    if bytes == 0 {
        eprintln!("vma archive contains no image data");
        return;
    }
    let pct = zero as f64 * 100.0 / bytes as f64;
    eprintln!("total bytes read {bytes}, sparse bytes {zero} ({pct:.2}%)");
    eprintln!("space reduction due to 4K zero blocks {pct:.2}%");
}

/// Runs `verify`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let input = archive_input::open(&a.archive)?;
    let mut reader =
        Reader::new(input).with_context(|| format!("{}: not a valid VMA archive", a.archive))?;
    if a.verbose {
        print_header(&mut std::io::stdout().lock(), reader.header())?;
    }
    let mut progress = Progress::new(reader.total_clusters(), a.verbose, Style::Read, "verify");
    loop {
        match reader.next_extent() {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                progress.finish();
                return Err(e).with_context(|| format!("{}: verification failed", a.archive));
            }
        }
        let s = reader.stats();
        progress.update(s.clusters, reader.position());
    }
    progress.finish();
    let s = reader.stats();
    if a.verbose {
        print_totals(s.bytes, s.zero_bytes);
    }
    Ok(ExitCode::SUCCESS)
}
