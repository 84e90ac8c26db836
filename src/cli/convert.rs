//! `vma-writer convert IN OUT`: re-encodes any archive we can read (plain
//! `.vma`, Proxmox's `.vma.zst`, `.vma.gz`, `.vma.lzo`, ours) as a
//! seekable `.vma.zst` (OUT ending in `.zst`, or `--zstd`) or a plain
//! `.vma` with its index beside it. The VMA bytes are copied unchanged,
//! the header and each extent as one unit (one zstd frame each), so
//! `zstd -dc OUT` equals the decompressed input byte for byte; the index
//! is built from them (a digest per data cluster). An input that has an
//! index is checked against it on the way. The output is committed like
//! every archive we write: `OUT.partial` until complete, removed on
//! failure or Ctrl-C unless `--keep-partial`.

use std::process::ExitCode;

use anyhow::Context;
use bytes::Bytes;

use super::archive_input;
use super::options::{OutputOpts, output_target};
use super::signals::Leftovers;
use crate::archive::IndexCheck;
use crate::vma::index::{NO_FRAME, stored_digest};
use crate::vma::{ArchiveOut, IndexBuilder};

/// Arguments of `convert`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The archive to read (`-` for stdin; zstd, gzip and lzop are
    /// detected).
    pub input: String,
    /// The archive to write (`-` for stdout); must not exist.
    pub output: String,
    /// How the output is written.
    #[command(flatten)]
    pub output_opts: OutputOpts,
}

/// Runs `convert`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let target = output_target(&a.output)?;
    let input = archive_input::open(&a.input)?;
    let (mut reader, index) = archive_input::reader_with_index(&a.input, input)?;
    let header = reader.header().clone();
    let mut opts = a.output_opts.sink_options(&target);
    let drive_bytes = header.devices.iter().map(|d| d.size).sum();
    opts.size_bound = Some(crate::object::upload::archive_bound(drive_bytes));
    let leftovers = Leftovers::watch("convert", opts.keep_partial)?;
    let mut sink = leftovers
        .sink(&target, &opts)
        .with_context(|| format!("cannot create archive {}", a.output))?;
    let written = format!("cannot write {}", a.output);
    let frame = sink
        .write_unit(&[Bytes::copy_from_slice(reader.raw_header())])
        .context(written.clone())?;
    let mut builder = if sink.can_hold_index() {
        Some(
            IndexBuilder::new(&header, reader.header_len(), frame.is_some())
                .context(written.clone())?,
        )
    } else {
        None
    };
    let mut check = index.map(|ix| IndexCheck::start(ix, &header)).transpose()?;
    let read_failed = || format!("{}: cannot read the archive", a.input);
    while let Some(ext) = reader.next_extent().with_context(read_failed)? {
        let frame = sink
            .write_unit(&[
                Bytes::copy_from_slice(ext.raw_head()),
                Bytes::copy_from_slice(ext.payload()),
            ])
            .context(written.clone())?;
        if let Some(b) = builder.as_mut() {
            let digests: Vec<_> = ext
                .clusters()
                .filter(|c| c.mask != 0)
                .map(|c| stored_digest(c.mask, c.stored, c.len))
                .collect();
            b.add_extent(
                ext.offset,
                frame.unwrap_or(NO_FRAME),
                ext.entries(),
                &digests,
            )
            .context(written.clone())?;
        }
        let (offset, entries) = (ext.offset, ext.entries().to_vec());
        if let Some(c) = check.as_mut() {
            c.extent(&mut reader, offset, &entries)
                .with_context(read_failed)?;
        }
    }
    if let Some(c) = check {
        c.finish().with_context(read_failed)?;
    }
    let index = builder
        .map(IndexBuilder::finish)
        .transpose()
        .context(written)?;
    let sealed = sink
        .seal(index.as_deref())
        .with_context(|| format!("cannot commit archive {}", a.output))?;
    leftovers
        .commit(|| sealed.publish())
        .with_context(|| format!("cannot commit archive {}", a.output))?;
    Ok(ExitCode::SUCCESS)
}
