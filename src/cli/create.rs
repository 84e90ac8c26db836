//! `vma-writer create ARCHIVE [-c CONFIG]... -d NAME=IMAGE...`: an archive
//! from raw images (files or block devices), read in 1 MiB chunks; holes
//! found with SEEK_DATA/SEEK_HOLE are archived as zero clusters without
//! being read.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use bytes::Bytes;

use super::backup::run_with_display;
use super::progress::{Progress, Style};
use super::serve::ArchiveOpts;
use crate::backup::BackupDrive;
use crate::qemu::{DaemonOptions, Image, StorageDaemon};
use crate::sink::{Sink, SinkOptions, Target};
use crate::vma::consts::VMA_CLUSTER_SIZE;
use crate::vma::{DevId, Writer, WriterBuilder};

/// Clusters read per `pread`: large enough that syscalls do not matter,
/// small enough that the writer's pending extent pins little memory.
const READ_CLUSTERS: u64 = 16;

/// Arguments of `create`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output archive, or `-` for stdout. Must not exist.
    pub archive: String,
    /// A config file to store (by its file name), e.g. qemu-server.conf.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub configs: Vec<PathBuf>,
    /// A drive: NAME=IMAGE, or Proxmox's spelling format=raw:NAME=IMAGE.
    #[arg(short = 'd', long = "drive", value_name = "NAME=IMAGE")]
    pub drives: Vec<String>,
    /// Print progress and per-drive totals to stderr.
    #[arg(short, long)]
    pub verbose: bool,
    /// Compress the archive with zstd (optionally at LEVEL, default 3).
    #[arg(long, value_name = "LEVEL", num_args = 0..=1, default_missing_value = "3")]
    pub zstd: Option<i32>,
    /// zstd worker threads (0: compress on the writing thread).
    #[arg(long, default_value_t = 0)]
    pub zstd_threads: u32,
    /// Clusters per extent (Proxmox writes 58; 59 is legal).
    #[arg(long, default_value_t = crate::vma::consts::PROXMOX_CLUSTERS_PER_EXTENT)]
    pub clusters_per_extent: usize,
}

/// One `-d` argument, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveSpec {
    /// Image format (`raw` unless given).
    pub format: String,
    /// Device name in the archive.
    pub name: String,
    /// Image path.
    pub path: PathBuf,
}

/// Parses `NAME=IMAGE` or `format=FMT:NAME=IMAGE`.
pub fn parse_drive(s: &str) -> anyhow::Result<DriveSpec> {
    let (format, rest) = match s.strip_prefix("format=") {
        Some(r) => {
            let (f, rest) = r
                .split_once(':')
                .with_context(|| format!("drive '{s}': expected format=FMT:NAME=IMAGE"))?;
            (f.to_string(), rest)
        }
        None => ("raw".to_string(), s),
    };
    let (name, path) = rest
        .split_once('=')
        .with_context(|| format!("drive '{s}': expected NAME=IMAGE"))?;
    if path.is_empty() {
        bail!("drive '{s}': IMAGE must not be empty");
    }
    // extract makes disk-NAME.raw, so NAME must be a plain file name.
    crate::vma::header::check_file_name("drive", name)?;
    Ok(DriveSpec {
        format,
        name: name.to_string(),
        path: PathBuf::from(path),
    })
}

/// Reads config files, each named by its file name (Proxmox stores only
/// the base name).
pub fn read_configs(configs: &[PathBuf]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    configs
        .iter()
        .map(|c| {
            let data =
                std::fs::read(c).with_context(|| format!("cannot read config {}", c.display()))?;
            let name = c
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| format!("config {}: no usable file name", c.display()))?;
            Ok((name.to_string(), data))
        })
        .collect()
}

/// Size of a file or block device.
fn image_size(f: &mut File, path: &Path) -> anyhow::Result<u64> {
    f.seek(SeekFrom::End(0))
        .with_context(|| format!("cannot get the size of {}", path.display()))
}

/// Byte ranges holding data, from SEEK_DATA/SEEK_HOLE; the whole file when
/// the filesystem cannot tell.
fn data_ranges(f: &File, size: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on a valid fd has no memory effects.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return vec![(0, size)];
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 {
            size
        } else {
            (hole as u64).min(size)
        };
        if end <= data as u64 {
            return vec![(0, size)];
        }
        out.push((data as u64, end));
        pos = end;
    }
    out
}

/// Read buffers kept for reuse. A fresh 1 MiB buffer costs page faults and
/// a memset that together exceed the cost of the read itself; the writer
/// holds at most one extent's clusters, so a few buffers cycle.
const POOL_BUFFERS: usize = 16;

/// Chunks read ahead of the writer: lets reading (one copy from the page
/// cache) overlap with zero detection and writing on the other core.
const READ_AHEAD: usize = 4;

#[derive(Default)]
struct BufPool(std::sync::Mutex<Vec<Vec<u8>>>);

/// A pooled buffer inside a `Bytes`; goes back to the pool when the last
/// slice of it is dropped (after its extent is written).
struct PoolBuf {
    buf: Vec<u8>,
    pool: std::sync::Arc<BufPool>,
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        let mut free = self.pool.0.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < POOL_BUFFERS {
            free.push(std::mem::take(&mut self.buf));
        }
    }
}

/// What the reader thread hands the writer.
enum Chunk {
    /// `count` clusters from `first` are holes: zero without reading.
    Zero { first: u64, count: u64 },
    /// Clusters from `first`, read.
    Data { first: u64, data: Bytes },
}

/// Reads an image in cluster-aligned chunks, skipping holes; runs on its
/// own thread.
fn read_chunks(file: &File, size: u64, tx: &std::sync::mpsc::SyncSender<std::io::Result<Chunk>>) {
    let cs = VMA_CLUSTER_SIZE as u64;
    let clusters = size.div_ceil(cs);
    let pool = std::sync::Arc::new(BufPool::default());
    let chunk_len = (READ_CLUSTERS * cs) as usize;
    let mut next = 0u64;
    let mut ranges = data_ranges(file, size);
    ranges.push((size, size)); // sentinel: zero-fill to the end
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
            let len = (n * cs).min(size - off) as usize;
            let buf = pool.0.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let mut buf = buf.unwrap_or_else(|| vec![0u8; chunk_len]);
            if let Err(e) = file.read_exact_at(&mut buf[..len], off) {
                let _ = tx.send(Err(std::io::Error::new(
                    e.kind(),
                    format!("read error at offset {off}: {e}"),
                )));
                return;
            }
            let data = Bytes::from_owner(PoolBuf {
                buf,
                pool: pool.clone(),
            })
            .slice(..len);
            if tx.send(Ok(Chunk::Data { first: next, data })).is_err() {
                return; // the writer gave up
            }
            next += n;
        }
    }
}

/// Archives one image; `progress` counts bytes over all drives.
fn write_image<W: std::io::Write>(
    w: &mut Writer<W>,
    dev: DevId,
    file: &File,
    size: u64,
    progress: &mut Progress,
    done: &mut u64,
) -> anyhow::Result<()> {
    let cs = VMA_CLUSTER_SIZE as u64;
    let base = *done;
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel(READ_AHEAD);
        scope.spawn(move || read_chunks(file, size, &tx));
        for chunk in rx {
            match chunk? {
                Chunk::Zero { first, count } => {
                    for c in first..first + count {
                        w.write_zero_cluster(dev, c)?;
                    }
                    *done = base + ((first + count) * cs).min(size);
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

/// `create` with images QEMU must read (qcow2, vmdk, ...): the same live
/// backup path as `backup`, through a qemu-storage-daemon that opens every
/// image read-only and is stopped afterwards.
fn create_via_qemu(a: &Args, specs: &[DriveSpec]) -> anyhow::Result<ExitCode> {
    let opts = ArchiveOpts {
        configs: a.configs.clone(),
        zstd: a.zstd,
        zstd_threads: a.zstd_threads,
        keep_partial: false,
        buffer_limit: crate::assembler::DEFAULT_PARTIAL_LIMIT as u64,
        reconnect_timeout: crate::target::DEFAULT_RECONNECT_TIMEOUT.as_secs(),
        clusters_per_extent: a.clusters_per_extent,
        json: false,
    };
    for s in specs.iter().filter(|s| s.format == "raw") {
        let size = File::open(&s.path)
            .and_then(|mut f| f.seek(SeekFrom::End(0)))
            .with_context(|| format!("cannot open image {}", s.path.display()))?;
        if size % 512 != 0 {
            // QEMU counts whole sectors and would archive a larger drive.
            bail!(
                "drive '{}': raw image {} is {size} bytes, not a multiple of 512; next to non-raw \
                 images it would be read through QEMU, which rounds its size up. Archive it with a \
                 separate create (raw images alone keep their exact size).",
                s.name,
                s.path.display()
            );
        }
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let dir = tempfile::Builder::new()
            .prefix("vma-writer-qsd-")
            .tempdir()
            .context("cannot create a runtime directory")?;
        let mut dopts = DaemonOptions::new(dir.path());
        for (i, s) in specs.iter().enumerate() {
            let path = std::path::absolute(&s.path)
                .with_context(|| format!("image {}", s.path.display()))?;
            dopts = dopts.image(Image::new(format!("vmaw{i}"), path, &s.format).read_only());
        }
        let names: Vec<String> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                format!(
                    "vmaw{i} is drive '{}' ({}, {})",
                    s.name,
                    s.path.display(),
                    s.format
                )
            })
            .collect();
        let daemon = StorageDaemon::start(dopts).await.with_context(|| {
            format!(
                "qemu-storage-daemon cannot open the images; {}",
                names.join("; ")
            )
        })?;
        let res = async {
            let qmp = daemon.connect().await?;
            let nodes = qmp.query_named_block_nodes().await?;
            let mut drives = Vec::new();
            for (i, s) in specs.iter().enumerate() {
                let node = format!("vmaw{i}");
                let size = nodes
                    .iter()
                    .find(|n| n.node_name == node)
                    .map(|n| n.size)
                    .with_context(|| {
                        format!("qemu-storage-daemon did not open {}", s.path.display())
                    })?;
                drives.push(BackupDrive {
                    node,
                    name: s.name.clone(),
                    size,
                });
            }
            run_with_display(&qmp, &drives, &opts, &a.archive, None).await
        }
        .await;
        if let Err(e) = daemon.shutdown().await {
            tracing::warn!("qemu-storage-daemon did not stop cleanly: {e}");
        }
        let report = res?;
        if a.verbose {
            for (name, size, zero) in &report.summary.drives {
                eprintln!(
                    "image {name}: size={size} zeros={zero} saved={}",
                    size - zero
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Runs `create`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let specs = a
        .drives
        .iter()
        .map(|d| parse_drive(d))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if specs.iter().any(|s| s.format != "raw") {
        return create_via_qemu(&a, &specs);
    }
    let mut builder = WriterBuilder::new().clusters_per_extent(a.clusters_per_extent)?;
    for (name, data) in read_configs(&a.configs)? {
        builder
            .add_config(&name, &data)
            .with_context(|| format!("config {name}"))?;
    }
    let mut images = Vec::new();
    for spec in specs {
        let mut f = File::open(&spec.path)
            .with_context(|| format!("cannot open image {}", spec.path.display()))?;
        let size = image_size(&mut f, &spec.path)?;
        let dev = builder
            .add_device(&spec.name, size)
            .with_context(|| format!("drive '{}' ({})", spec.name, spec.path.display()))?;
        images.push((dev, spec, f, size));
    }
    let target = Target::parse(&a.archive);
    let sink = Sink::create(
        &target,
        &SinkOptions {
            zstd_level: a.zstd,
            zstd_threads: a.zstd_threads,
            keep_partial: false,
        },
    )
    .with_context(|| format!("cannot create archive {}", a.archive))?;
    let mut w = builder
        .start(sink)
        .context("cannot write the archive header")?;
    let total: u64 = images.iter().map(|i| i.3).sum();
    let mut progress = Progress::new(total, a.verbose, Style::Create, "create");
    let mut done = 0;
    for (dev, spec, f, size) in &images {
        write_image(&mut w, *dev, f, *size, &mut progress, &mut done)
            .with_context(|| format!("drive '{}' ({})", spec.name, spec.path.display()))?;
    }
    progress.finish();
    let stats = w.stats();
    let sink = w.finish().context("cannot finish the archive")?;
    sink.commit()
        .with_context(|| format!("cannot commit archive {}", a.archive))?;
    if a.verbose {
        for s in stats {
            eprintln!(
                "image {}: size={} zeros={} saved={}",
                s.name,
                s.size,
                s.zero_bytes,
                s.size - s.zero_bytes
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_specs() {
        let d = parse_drive("drive-scsi0=/tmp/a.raw").unwrap();
        assert_eq!((d.format.as_str(), d.name.as_str()), ("raw", "drive-scsi0"));
        let d = parse_drive("format=qcow2:drive-virtio1=/x=y.qcow2").unwrap();
        assert_eq!(d.format, "qcow2");
        assert_eq!(d.path, PathBuf::from("/x=y.qcow2"));
        assert!(parse_drive("noequals").is_err());
        assert!(parse_drive("format=raw").is_err());
        assert!(parse_drive("=x").is_err());
    }
}
