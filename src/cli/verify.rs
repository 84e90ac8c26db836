//! `vma-writer verify ARCHIVE [-v]`: reads the whole archive and exits 0
//! only when its structure is valid and complete. With `-v`, prints what
//! Proxmox's `vma verify -v` prints, on stdout.

use std::process::ExitCode;

use anyhow::Context;

use super::archive_input;
use super::list::print_header;
use super::progress::ReadProgress;
use crate::vma::Reader;

/// Arguments of `verify`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "What is checked: the header's and every extent's MD5 checksum, \
    magics, uuids and bounds, that no cluster appears twice, and that every cluster of \
    every device is present. What is not: the drive data itself. VMA has no checksum of \
    its payload (Proxmox's `vma verify` cannot check it either), so a flipped data byte \
    passes. A zstd-compressed archive written by vma-writer carries zstd's content \
    checksum per frame, which catches corruption of the compressed file."
)]
pub struct Args {
    /// The archive (`-` for stdin; zstd-compressed input is detected).
    pub archive: String,
    /// Print the header, progress and totals on stdout, as `vma verify -v`
    /// does.
    #[arg(short, long)]
    pub verbose: bool,
}

/// Runs `verify`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let input = archive_input::open(&a.archive)?;
    let mut reader =
        Reader::new(input).with_context(|| format!("{}: not a valid VMA archive", a.archive))?;
    let header = reader.header().clone();
    if a.verbose {
        print_header(&mut std::io::stdout().lock(), &header)?;
    }
    let mut progress = ReadProgress::new(&header, a.verbose, "verify");
    let res = (|| {
        while let Some(ext) = reader.next_extent()? {
            for c in ext.clusters() {
                let dev = header.device(c.dev).expect("the reader checked the device");
                progress.cluster(dev, c.cluster, c.mask);
            }
        }
        Ok::<_, crate::vma::FormatError>(())
    })();
    progress.finish(res.is_ok());
    res.with_context(|| format!("{}: verification failed", a.archive))?;
    Ok(ExitCode::SUCCESS)
}
