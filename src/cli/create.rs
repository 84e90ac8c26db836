//! `vma-writer create ARCHIVE [-c CONFIG]... -d NAME=IMAGE...`: an archive
//! from disk images. Raw images (files or block devices) are read here in
//! 1 MiB chunks on a read-ahead thread; holes found with SEEK_DATA /
//! SEEK_HOLE are archived as zero clusters without being read. Images in
//! any other format go through a private qemu-storage-daemon and the live
//! backup path.
//!
//! Device sizes are whole 512-byte sectors, as QEMU counts them: a raw
//! image of another size is recorded rounded up, and the tail reads as
//! zeros (Proxmox's `vma create` does the same).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::process::ExitCode;

use anyhow::{Context, bail};
use bytes::Bytes;

use super::live::{Ended, backup_with_display};
use super::options::{ArchiveOpts, LiveOpts, output_target};
use super::progress::CreateProgress;
use super::signals::Leftovers;
use super::values::{DriveImage, SECTOR_SIZE};
use crate::backup::{BackupDrive, RunOptions};
use crate::pool::BufferPool;
use crate::qemu::{DaemonOptions, Image, StorageDaemon};
use crate::vma::consts::VMA_CLUSTER_SIZE;
use crate::vma::{ArchiveOut, DevId, Writer};

/// Clusters read per `pread`: large enough that syscalls do not matter,
/// small enough that the writer's pending extent pins little memory.
const READ_CLUSTERS: u64 = 16;

/// Idle read buffers kept for reuse: a fresh 1 MiB buffer costs page
/// faults and a memset that together exceed the cost of the read itself;
/// the writer holds at most one extent's clusters, so a few buffers cycle.
const POOL_BYTES: usize = 16 * (READ_CLUSTERS as usize * VMA_CLUSTER_SIZE);

/// Chunks read ahead of the writer: lets reading (one copy from the page
/// cache) overlap with zero detection and writing on the other core.
const READ_AHEAD: usize = 4;

/// Arguments of `create`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output archive, or `-` for stdout. Must not exist.
    pub archive: String,
    /// A drive: NAME=IMAGE for a raw image (file or block device), or
    /// format=FMT:NAME=IMAGE for any format QEMU reads (qcow2, vmdk, vdi,
    /// vhdx, ...; read through a private qemu-storage-daemon). A raw image
    /// whose size is not a multiple of 512 is recorded rounded up, its
    /// tail reading as zeros, as Proxmox's `vma create` does.
    #[arg(short = 'd', long = "drive", value_name = "NAME=IMAGE")]
    pub drives: Vec<DriveImage>,
    /// Print progress and per-drive totals to stderr.
    #[arg(short, long)]
    pub verbose: bool,
    /// How the archive is written.
    #[command(flatten)]
    pub archive_opts: ArchiveOpts,
}

/// A raw image opened for reading.
struct RawImage {
    spec: DriveImage,
    file: File,
    /// Bytes in the file.
    file_size: u64,
    /// Device size in the archive: `file_size` rounded up to a sector.
    size: u64,
}

/// Refuses what is not a disk image with a message that says what it is.
fn check_image(spec: &DriveImage) -> anyhow::Result<()> {
    let meta = std::fs::metadata(&spec.path).with_context(|| {
        format!(
            "drive '{}': cannot open image {}",
            spec.name,
            spec.path.display()
        )
    })?;
    if meta.is_dir() {
        bail!(
            "drive '{}': {} is a directory, not a disk image",
            spec.name,
            spec.path.display()
        );
    }
    Ok(())
}

fn open_raw(spec: DriveImage) -> anyhow::Result<RawImage> {
    check_image(&spec)?;
    let what = || format!("drive '{}' ({})", spec.name, spec.path.display());
    let mut file =
        File::open(&spec.path).with_context(|| format!("{}: cannot open the image", what()))?;
    // Block devices report 0 in metadata; seeking to the end works for both.
    let file_size = file
        .seek(SeekFrom::End(0))
        .with_context(|| format!("{}: cannot get the image size", what()))?;
    if file_size == 0 {
        bail!("{}: the image is empty", what());
    }
    let size = file_size.next_multiple_of(SECTOR_SIZE);
    Ok(RawImage {
        spec,
        file,
        file_size,
        size,
    })
}

/// Byte ranges of `f` holding data, from SEEK_DATA/SEEK_HOLE; the whole
/// file when the filesystem cannot tell.
fn data_ranges(f: &File, size: u64) -> Vec<(u64, u64)> {
    use rustix::fs::{SeekFrom as Whence, seek};
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let data = match seek(f, Whence::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break, // no data after pos
            Err(_) => return vec![(0, size)],
        };
        let end = match seek(f, Whence::Hole(data)) {
            Ok(h) => h.min(size),
            Err(_) => size,
        };
        if end <= data {
            return vec![(0, size)];
        }
        out.push((data, end));
        pos = end;
    }
    out
}

/// What the reader thread hands the writer.
enum Chunk {
    /// `count` clusters from `first` are holes: zero without reading.
    Zero { first: u64, count: u64 },
    /// Clusters from `first`, read.
    Data { first: u64, data: Bytes },
}

/// Reads an image in cluster-aligned chunks, skipping holes; runs on its
/// own thread. Bytes between the end of the file and the end of the
/// device read as zeros.
fn read_chunks(img: &RawImage, tx: &std::sync::mpsc::SyncSender<std::io::Result<Chunk>>) {
    let cs = VMA_CLUSTER_SIZE as u64;
    let clusters = img.size.div_ceil(cs);
    let pool = BufferPool::new(POOL_BYTES);
    let mut next = 0u64;
    let mut ranges = data_ranges(&img.file, img.file_size);
    ranges.push((img.size, img.size)); // sentinel: zero-fill to the end
    for (start, end) in ranges {
        let first = (start / cs).max(next);
        let last = end.div_ceil(cs).min(clusters);
        if next < first {
            let _ = tx.send(Ok(Chunk::Zero {
                first: next,
                count: first - next,
            }));
            next = first;
        }
        while next < last {
            let n = READ_CLUSTERS.min(last - next);
            let off = next * cs;
            let len = (n * cs).min(img.size - off) as usize;
            let in_file = img.file_size.saturating_sub(off).min(len as u64) as usize;
            let mut buf = pool.get_filled(len);
            if let Err(e) = img.file.read_exact_at(&mut buf[..in_file], off) {
                let _ = tx.send(Err(std::io::Error::new(
                    e.kind(),
                    format!("read error at offset {off}: {e}"),
                )));
                return;
            }
            // A recycled buffer holds old data past the file's end.
            buf[in_file..len].fill(0);
            let data = buf.freeze();
            if tx.send(Ok(Chunk::Data { first: next, data })).is_err() {
                return; // the writer gave up
            }
            next += n;
        }
    }
}

/// Archives one image; `progress` counts bytes over all drives.
fn write_image<W: ArchiveOut>(
    w: &mut Writer<W>,
    dev: DevId,
    img: &RawImage,
    progress: &mut CreateProgress,
    done: &mut u64,
) -> anyhow::Result<()> {
    let cs = VMA_CLUSTER_SIZE as u64;
    let base = *done;
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel(READ_AHEAD);
        scope.spawn(move || read_chunks(img, &tx));
        for chunk in rx {
            match chunk? {
                Chunk::Zero { first, count } => {
                    for c in first..first + count {
                        w.write_zero_cluster(dev, c)?;
                    }
                    *done = base + ((first + count) * cs).min(img.size);
                }
                Chunk::Data { first, mut data } => {
                    let mut c = first;
                    let end = first * cs + data.len() as u64;
                    while !data.is_empty() {
                        let take = data.len().min(VMA_CLUSTER_SIZE);
                        w.write_cluster(dev, c, data.split_to(take))?;
                        c += 1;
                    }
                    *done = base + end;
                }
            }
            progress.update(*done, w.zero_bytes());
        }
        Ok(())
    })
}

/// Prints `vma create -v`'s closing line per image.
fn print_image_totals(name: &str, size: u64, zero: u64) {
    eprintln!(
        "image {name}: size={size} zeros={zero} saved={}",
        size - zero
    );
}

/// `create` with images QEMU must read (qcow2, vmdk, ...): the same live
/// backup path as `backup`, through a qemu-storage-daemon that opens every
/// image read-only and is stopped afterwards. QEMU counts whole sectors,
/// so raw images of odd sizes are rounded up as in [`open_raw`].
fn create_via_qemu(a: &Args) -> anyhow::Result<ExitCode> {
    for s in &a.drives {
        check_image(s)?;
    }
    let output = output_target(&a.archive)?;
    let live = LiveOpts::default();
    // QEMU only knows its node names; errors it reports name drives instead.
    let node = |i: usize| format!("vmaw{i}");
    let explain = |msg: String| {
        a.drives.iter().enumerate().rev().fold(msg, |m, (i, s)| {
            m.replace(
                &node(i),
                &format!("drive '{}' ({})", s.name, s.path.display()),
            )
        })
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let dir = tempfile::Builder::new()
            .prefix("vma-writer-qsd-")
            .tempdir()
            .context("cannot create a runtime directory")?;
        let mut dopts = DaemonOptions::new(dir.path());
        for (i, s) in a.drives.iter().enumerate() {
            let path = std::path::absolute(&s.path)
                .with_context(|| format!("image {}", s.path.display()))?;
            dopts = dopts.image(Image::new(node(i), path, &s.format).read_only());
        }
        let daemon = StorageDaemon::start(dopts).await.map_err(|e| {
            anyhow::anyhow!(explain(format!(
                "qemu-storage-daemon cannot open the images: {e}"
            )))
        })?;
        let res = async {
            let qmp = daemon.connect().await?;
            let nodes = qmp.query_named_block_nodes().await?;
            let mut drives = Vec::new();
            for (i, s) in a.drives.iter().enumerate() {
                let size = nodes
                    .iter()
                    .find(|n| n.node_name == node(i))
                    .map(|n| n.size)
                    .with_context(|| {
                        format!("qemu-storage-daemon did not open {}", s.path.display())
                    })?;
                drives.push(BackupDrive {
                    node: node(i),
                    name: s.name.clone(),
                    size,
                });
            }
            // No bitmap: the images are not a VM's, and a persistent
            // bitmap would be stored in the user's qcow2.
            let run = RunOptions::default();
            backup_with_display(&qmp, &drives, &a.archive_opts, &live, output, &run).await
        }
        .await;
        if let Err(e) = daemon.shutdown().await {
            tracing::warn!("qemu-storage-daemon did not stop cleanly: {e}");
        }
        let ended = res.map_err(|e| anyhow::anyhow!(explain(super::describe(&*e))))?;
        if let (Ended::Done(report), true) = (&ended, a.verbose) {
            for d in &report.summary.drives {
                print_image_totals(&d.name, d.size, d.zero_bytes);
            }
        }
        Ok(ended.exit_code())
    })
}

/// Runs `create`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if a.drives.iter().any(|s| s.format != "raw") {
        return create_via_qemu(&a);
    }
    let mut builder = a.archive_opts.writer_builder()?;
    let mut images = Vec::new();
    for spec in a.drives.iter().cloned() {
        let img = open_raw(spec)?;
        let dev = builder
            .add_device(&img.spec.name, img.size)
            .with_context(|| format!("drive '{}' ({})", img.spec.name, img.spec.path.display()))?;
        images.push((dev, img));
    }
    let target = output_target(&a.archive)?;
    let leftovers = Leftovers::watch("create", a.archive_opts.keep_partial())?;
    let mut opts = a.archive_opts.sink_options(&target);
    let total: u64 = images.iter().map(|(_, img)| img.size).sum();
    opts.size_bound = Some(crate::object::upload::archive_bound(total));
    let sink = leftovers
        .sink(&target, &opts)
        .with_context(|| format!("cannot create archive {}", a.archive))?;
    let mut w = builder
        .index(sink.can_hold_index())
        .start(sink)
        .context("cannot write the archive header")?;
    let mut progress = CreateProgress::new(total, a.verbose);
    let mut done = 0;
    for (dev, img) in &images {
        write_image(&mut w, *dev, img, &mut progress, &mut done)
            .with_context(|| format!("drive '{}' ({})", img.spec.name, img.spec.path.display()))?;
    }
    progress.finish();
    let stats = w.stats();
    let (sink, index) = w.finish_indexed().context("cannot finish the archive")?;
    // Sealing (the last frames, the index, fsync) can take a while and
    // stays interruptible; only the renames are held off against signals.
    let sealed = sink
        .seal(index.as_deref())
        .with_context(|| format!("cannot commit archive {}", a.archive))?;
    leftovers
        .commit(|| sealed.publish())
        .with_context(|| format!("cannot commit archive {}", a.archive))?;
    if a.verbose {
        for s in stats {
            print_image_totals(&s.name, s.size, s.zero_bytes);
        }
    }
    Ok(ExitCode::SUCCESS)
}
