//! `vma-writer extract ARCHIVE DIR [-d NAME,...] [-v]`: restores configs and
//! drives into a new directory, printing what Proxmox's `vma extract`
//! prints (`DEVINFO` lines; with `-v` progress and totals), on stdout.
//! Drives are written sparse (zero blocks are never written) as
//! `tmp-disk-NAME.raw` and renamed to `disk-NAME.raw` only once the whole
//! archive has been read and found complete. A failed or interrupted
//! extraction removes the directory it created (unless `--keep-partial`).
//!
//! Nothing is ever written outside DIR, whatever the archive says: config
//! and drive names that are not plain file names (empty, `.`, `..`, a `/`,
//! a NUL) are refused before DIR is created, as are two configs of one
//! name and a config named like a drive's image. DIR must not exist, and
//! every file in it is created with `O_CREAT|O_EXCL|O_NOFOLLOW` and renamed
//! into place without replacing anything, so a file or symlink that appears
//! in DIR meanwhile is neither followed nor overwritten: the extraction
//! fails instead. (Proxmox's `vma extract` joins the names to DIR
//! unchecked.)
//!
//! `--format FMT` (any format `qemu-img` writes but raw: qcow2, vmdk,
//! vhdx, ...) restores `disk-NAME.FMT` instead, through a private
//! read-only export of the archive ([`crate::export`]) that `qemu-img
//! convert` reads: regions the export reports as zero stay unallocated.
//! The same names, temporary files and cleanup rules apply.
//!
//! When the archive has an index, every data cluster is checked against
//! its digest before it is written; a mismatch fails the extraction. A
//! subset of the drives (`-d`) of a plain `.vma` or seekable `.vma.zst`
//! file is read at random: only the extents holding those drives'
//! clusters are read (located by the index, or by the extent headers of a
//! `.vma` without one).

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};

use super::archive_input;
use super::progress::{ConvertProgress, ReadProgress, stdout_line};
use super::signals::Leftovers;
use crate::archive::file::Layout;
use crate::archive::{IndexCheck, Input, RandomArchive, Stream};
use crate::export::{ArchiveExport, ExportConfig};
use crate::nbd::ListenAddr;
use crate::qemu_img;
use crate::vma::header::check_file_name;
use crate::vma::reader::ClusterData;
use crate::vma::{ArchiveIndex, DevId, Device, Header, Reader};

/// Arguments of `extract`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The archive (`-` for stdin; zstd, gzip and lzop are detected).
    pub archive: String,
    /// Directory to create; must not exist.
    pub dir: PathBuf,
    /// Restore only these drives (comma-separated names).
    #[arg(
        short = 'd',
        long = "drives",
        value_name = "NAMES",
        value_delimiter = ','
    )]
    pub drives: Vec<String>,
    /// Print progress and totals on stdout, as `vma extract -v` does.
    #[arg(short, long)]
    pub verbose: bool,
    /// Keep DIR and its partial files when the extraction fails or is
    /// interrupted.
    #[arg(long)]
    pub keep_partial: bool,
    /// Image format of the drives: raw, or any format qemu-img writes
    /// (qcow2, vmdk, vhdx, ...: written sparse by qemu-img, from a plain
    /// .vma or a seekable .vma.zst).
    #[arg(long, value_name = "FORMAT", default_value = "raw")]
    pub format: String,
}

impl Args {
    /// The image file of drive `name`, and its temporary name.
    fn image_names(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("disk-{name}.{}", self.format)),
            self.dir.join(format!("tmp-disk-{name}.{}", self.format)),
        )
    }

    /// True for raw images, which vma-writer writes itself.
    fn raw(&self) -> bool {
        self.format == "raw"
    }
}

struct Out {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
}

/// Refuses archives whose names would escape or clobber DIR, and drives
/// the user named that the archive does not have.
fn check_names(header: &Header, wanted: &[String], format: &str) -> anyhow::Result<()> {
    let refuse = |e: crate::vma::FormatError| {
        anyhow::anyhow!(
            "{e}; refusing to extract: the name would escape or clobber the target directory"
        )
    };
    let mut config_names = HashSet::new();
    for c in &header.configs {
        check_file_name("config", &c.name).map_err(refuse)?;
        if !config_names.insert(c.name.as_str()) {
            bail!(
                "the archive holds two configs named '{}'; refusing to extract either",
                c.name
            );
        }
    }
    for d in &header.devices {
        check_file_name("device", &d.name).map_err(refuse)?;
        for file in [
            format!("disk-{}.{format}", d.name),
            format!("tmp-disk-{}.{format}", d.name),
        ] {
            if config_names.contains(file.as_str()) {
                bail!(
                    "config '{file}' would collide with the image of drive '{}'; refusing to extract",
                    d.name
                );
            }
        }
    }
    for want in wanted {
        if header.devices.iter().all(|d| &d.name != want) {
            bail!("drive '{want}' is not in the archive");
        }
    }
    Ok(())
}

/// How the drives are read.
// One per run: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Source {
    /// Front to back, checked against the stored index when there is one.
    Stream {
        reader: Reader<Stream>,
        index: Option<Arc<ArchiveIndex>>,
    },
    /// Only the extents holding the wanted drives' clusters.
    Random(RandomArchive),
    /// Served read-only over NBD to `qemu-img convert`.
    Export(RandomArchive),
}

impl Source {
    /// A subset of the drives of a file that can be read at random is
    /// read at random; anything else front to back.
    fn open(a: &Args) -> anyhow::Result<Source> {
        if !a.raw() {
            crate::qemu_img::check_format(&a.format)?;
            return Ok(Source::Export(archive_input::random(&a.archive)?));
        }
        let input = archive_input::open(&a.archive)?;
        let random = match &input {
            Input::File(f) if !a.drives.is_empty() => match f.layout() {
                Layout::Plain => true,
                Layout::Seekable { index_frame, .. } => index_frame.is_some(),
            },
            _ => false,
        };
        if random {
            let Input::File(f) = input else {
                unreachable!()
            };
            let ra = RandomArchive::from_file(f)
                .with_context(|| format!("{}: cannot read the archive", a.archive))?;
            return Ok(Source::Random(ra));
        }
        let (reader, index) = archive_input::reader_with_index(&a.archive, input)?;
        Ok(Source::Stream { reader, index })
    }

    fn header(&self) -> &Header {
        match self {
            Source::Stream { reader, .. } => reader.header(),
            Source::Random(ra) | Source::Export(ra) => ra.header(),
        }
    }
}

/// Runs `extract`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let source = Source::open(&a)?;
    let header = source.header().clone();
    check_names(&header, &a.drives, &a.format)?;
    let leftovers = Leftovers::watch("extract", a.keep_partial)?;
    leftovers
        .create(|| std::fs::create_dir(&a.dir), |_| vec![a.dir.clone()])
        .with_context(|| {
            format!(
                "cannot create directory {} (it must not exist)",
                a.dir.display()
            )
        })?;
    let res = extract_into(&a, &header, source, &leftovers);
    if let Err(e) = res {
        let fate = if a.keep_partial {
            format!("partial files kept in {}", a.dir.display())
        } else {
            match std::fs::remove_dir_all(&a.dir) {
                Ok(()) => format!("removed {}", a.dir.display()),
                Err(r) => format!("could not remove {}: {r}", a.dir.display()),
            }
        };
        return Err(e.context(format!("extraction failed; {fate}")));
    }
    Ok(ExitCode::SUCCESS)
}

impl Out {
    /// Writes the stored runs of `c` where they belong (zero blocks are
    /// left as holes).
    fn write(&self, c: &ClusterData<'_>) -> anyhow::Result<()> {
        let base = c.device_offset();
        for (off, run) in c.runs() {
            self.file
                .write_all_at(run, base + off as u64)
                .with_context(|| format!("write error on {}", self.tmp.display()))?;
        }
        Ok(())
    }
}

fn extract_into(
    a: &Args,
    header: &Header,
    mut source: Source,
    leftovers: &Leftovers,
) -> anyhow::Result<()> {
    for c in &header.configs {
        let p = a.dir.join(&c.name);
        create_new(&p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &c.data))
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    if let Source::Export(ra) = source {
        return convert_drives(a, header, ra, leftovers);
    }
    let mut outs: HashMap<DevId, Out> = HashMap::new();
    for d in wanted(a, header) {
        let (path, tmp) = a.image_names(&d.name);
        let file = create_new(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        file.set_len(d.size)
            .with_context(|| format!("cannot size {}", tmp.display()))?;
        stdout_line(&format!("DEVINFO {} {}", tmp.display(), d.size));
        outs.insert(d.id, Out { file, tmp, path });
    }
    let mut progress = ReadProgress::new(header, a.verbose, "extract");
    let res = match &mut source {
        Source::Stream { reader, index } => {
            read_stream(header, reader, index.clone(), &outs, &mut progress)
        }
        Source::Random(ra) => read_random(header, ra, &outs, &mut progress),
        Source::Export(_) => unreachable!("converted above"),
    };
    progress.finish(res.is_ok());
    res?;
    for out in outs.values() {
        out.file
            .sync_all()
            .with_context(|| format!("cannot sync {}", out.tmp.display()))?;
    }
    leftovers.commit(|| -> anyhow::Result<()> {
        for out in outs.values() {
            rename_into_place(&out.tmp, &out.path)?;
        }
        sync_dir(&a.dir)
    })
}

/// The drives to restore: those named with `-d`, or all.
fn wanted<'h>(a: &Args, header: &'h Header) -> impl Iterator<Item = &'h Device> {
    header
        .devices
        .iter()
        .filter(|d| a.drives.is_empty() || a.drives.contains(&d.name))
}

/// Restores the wanted drives with `qemu-img convert` from a private
/// read-only export of `archive`, each into its temporary file; renames
/// them all once every one is complete.
fn convert_drives(
    a: &Args,
    header: &Header,
    archive: RandomArchive,
    leftovers: &Leftovers,
) -> anyhow::Result<()> {
    let drives: Vec<&Device> = wanted(a, header).collect();
    let mut images = Vec::new();
    for d in &drives {
        let (path, tmp) = a.image_names(&d.name);
        // Made here, new, so that qemu-img (which opens the name it is
        // given, following symlinks) writes into our own file.
        create_new(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        stdout_line(&format!("DEVINFO {} {}", tmp.display(), d.size));
        images.push((d, tmp, path));
    }
    // The export's socket lives in a private directory, removed on a
    // signal like the rest.
    let sockets = leftovers
        .scratch_dir()
        .context("cannot create a private socket directory")?;
    let rt = tokio::runtime::Runtime::new()?;
    let cfg = ExportConfig {
        drives: drives.iter().map(|d| d.name.clone()).collect(),
        ..ExportConfig::new(ListenAddr::Unix(sockets.path().join("nbd.sock")))
    };
    let export = {
        let _rt = rt.enter();
        ArchiveExport::start(archive, cfg)?
    };
    let total = drives.iter().map(|d| d.size).sum();
    let mut progress = ConvertProgress::new(total, a.verbose, "extract");
    let mut before = 0u64;
    let mut res = Ok(());
    for (d, tmp, _) in &images {
        let size = d.size as f64;
        res = qemu_img::convert(&export.uri(&d.name), &a.format, tmp, |pct| {
            progress.update(before + (size * pct / 100.0) as u64)
        })
        .with_context(|| format!("cannot restore drive {}", d.name));
        if res.is_err() {
            break;
        }
        before += d.size;
    }
    progress.finish();
    // The conversion's own error first: it is the one the user must see.
    let stopped = rt.block_on(export.stop());
    res?;
    stopped.context("the archive export did not stop cleanly")?;
    for (_, tmp, _) in &images {
        File::open(tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot sync {}", tmp.display()))?;
    }
    leftovers.commit(|| -> anyhow::Result<()> {
        for (_, tmp, path) in &images {
            rename_into_place(tmp, path)?;
        }
        sync_dir(&a.dir)
    })
}

/// Reads the whole archive front to back, checking each extent against the
/// index (digests on another thread, all before the files are renamed).
fn read_stream(
    header: &Header,
    reader: &mut Reader<Stream>,
    index: Option<Arc<ArchiveIndex>>,
    outs: &HashMap<DevId, Out>,
    progress: &mut ReadProgress,
) -> anyhow::Result<()> {
    let mut check = index.map(|ix| IndexCheck::start(ix, header)).transpose()?;
    while let Some(ext) = reader.next_extent()? {
        for c in ext.clusters() {
            let dev = header.device(c.dev).expect("the reader checked the device");
            progress.cluster(dev, c.cluster, c.mask);
            if let Some(out) = outs.get(&c.dev) {
                out.write(&c)?;
            }
        }
        let (offset, entries) = (ext.offset, ext.entries().to_vec());
        if let Some(c) = check.as_mut() {
            c.extent(reader, offset, &entries)?;
        }
    }
    if let Some(c) = check {
        c.finish()?;
    }
    Ok(())
}

/// Reads only the extents that hold clusters of the wanted drives; the
/// others count for the progress lines (Proxmox counts every cluster) from
/// the index, unread.
fn read_random(
    header: &Header,
    ra: &RandomArchive,
    outs: &HashMap<DevId, Out>,
    progress: &mut ReadProgress,
) -> anyhow::Result<()> {
    for (x, rec) in ra.index().extents.iter().enumerate() {
        if rec.entries.iter().any(|e| outs.contains_key(&DevId(e.dev))) {
            for c in ra.read_extent(x, |d| outs.contains_key(&d))? {
                outs[&c.dev].write(&c.data())?;
            }
        }
        for e in &rec.entries {
            let dev = header
                .device(DevId(e.dev))
                .expect("the index checked the device");
            progress.cluster(dev, u64::from(e.cluster), e.mask);
        }
    }
    Ok(())
}

/// Creates a new file for writing; never opens one that exists, and never
/// follows a symlink (`O_EXCL` already refuses one; `O_NOFOLLOW` says so).
fn create_new(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Renames a finished image to its final name, refusing to replace
/// whatever appeared there meanwhile (a file or a symlink).
fn rename_into_place(tmp: &Path, path: &Path) -> anyhow::Result<()> {
    crate::sink::rename_noreplace(tmp, path).with_context(|| {
        format!(
            "cannot rename {} to {}{}",
            tmp.display(),
            path.display(),
            if path.symlink_metadata().is_ok() {
                " (something else created it meanwhile; it was left alone)"
            } else {
                ""
            }
        )
    })
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_created_new_and_symlinks_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"precious").unwrap();
        let link = dir.path().join("qemu-server.conf");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let e = create_new(&link).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        // A dangling symlink is not followed either (O_CREAT alone would
        // create its target).
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("made-through-link"), &dangling).unwrap();
        assert!(create_new(&dangling).is_err());
        assert!(!dir.path().join("made-through-link").exists());
        // A regular file is not reopened.
        assert!(create_new(&outside).is_err());
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");

        let tmp = dir.path().join("tmp-disk-a.raw");
        std::fs::write(&tmp, b"image").unwrap();
        let err = rename_into_place(&tmp, &link).unwrap_err();
        assert!(format!("{err:#}").contains("left alone"), "{err:#}");
        assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
        rename_into_place(&tmp, &dir.path().join("disk-a.raw")).unwrap();
    }
}
