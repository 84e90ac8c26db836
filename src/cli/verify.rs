//! `vma-writer verify ARCHIVE [-v]`: reads the whole archive and exits 0
//! only when its structure is valid and complete and, when the archive has
//! an index, every data cluster matches its digest and every extent is
//! where the index says. With `-v`, prints what Proxmox's `vma verify -v`
//! prints, on stdout; what the payload check covered goes to stderr.

use std::process::ExitCode;

use anyhow::Context;

use super::archive_input;
use super::list::print_header;
use super::progress::ReadProgress;
use crate::archive::IndexCheck;

/// Arguments of `verify`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "What is checked: the header's and every extent's MD5 checksum, \
    magics, uuids and bounds, that no cluster appears twice, and that every cluster of \
    every device is present. With an archive index (inside a .vma.zst written by \
    vma-writer, or ARCHIVE.index beside a .vma), also every data cluster against its \
    digest and the index against the extent headers; stderr then says `payload: N \
    clusters verified against digests`. Without one the drive data itself is not \
    checked (VMA has no checksum of its payload; Proxmox's `vma verify` cannot check it \
    either) and stderr says `payload not checksummed (no index)`; `vma-writer convert` \
    adds an index. zstd frames carry zstd's content checksum, which catches corruption \
    of the compressed file."
)]
pub struct Args {
    /// The archive (`-` for stdin; zstd, gzip and lzop are detected).
    pub archive: String,
    /// Print the header, progress and totals on stdout, as `vma verify -v`
    /// does.
    #[arg(short, long)]
    pub verbose: bool,
}

/// Runs `verify`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let input = archive_input::open(&a.archive)?;
    let (mut reader, index) = archive_input::reader_with_index(&a.archive, input)?;
    let header = reader.header().clone();
    if a.verbose {
        print_header(&mut std::io::stdout().lock(), &header)?;
    }
    let mut progress = ReadProgress::new(&header, a.verbose, "verify");
    let res = (|| -> anyhow::Result<Option<u64>> {
        let mut check = index
            .clone()
            .map(|ix| IndexCheck::start(ix, &header))
            .transpose()?;
        while let Some(ext) = reader.next_extent()? {
            for c in ext.clusters() {
                let dev = header.device(c.dev).expect("the reader checked the device");
                progress.cluster(dev, c.cluster, c.mask);
            }
            let (offset, entries) = (ext.offset, ext.entries().to_vec());
            if let Some(c) = check.as_mut() {
                c.extent(&mut reader, offset, &entries)?;
            }
        }
        Ok(check.map(IndexCheck::finish).transpose()?)
    })();
    progress.finish(res.is_ok());
    let verified = res.with_context(|| format!("{}: verification failed", a.archive))?;
    // A report, not a result: stdout stays Proxmox's lines.
    match verified {
        Some(n) if index.as_ref().is_some_and(|ix| ix.has_digests()) => {
            eprintln!("payload: {n} clusters verified against digests");
        }
        _ => eprintln!("payload not checksummed (no index)"),
    }
    Ok(ExitCode::SUCCESS)
}
