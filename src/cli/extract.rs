//! `vma-writer extract ARCHIVE DIR [-d NAME,...] [-v]`: restores configs and
//! drives into a new directory, printing what Proxmox's `vma extract`
//! prints (`DEVINFO` lines; with `-v` progress and totals), on stdout.
//! Drives are written sparse (zero blocks are never written) as
//! `tmp-disk-NAME.raw` and renamed to `disk-NAME.raw` only once the whole
//! archive has been read and found complete. A failed or interrupted
//! extraction removes the directory it created (unless `--keep-partial`).

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};

use super::archive_input;
use super::progress::{ReadProgress, stdout_line};
use super::signals::Leftovers;
use crate::vma::header::check_file_name;
use crate::vma::{DevId, Header, Reader};

/// Arguments of `extract`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The archive (`-` for stdin; zstd-compressed input is detected).
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
}

struct Out {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
}

/// Refuses archives whose names would escape or clobber DIR, and drives
/// the user named that the archive does not have.
fn check_names(header: &Header, wanted: &[String]) -> anyhow::Result<()> {
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
            format!("disk-{}.raw", d.name),
            format!("tmp-disk-{}.raw", d.name),
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

/// Runs `extract`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let input = archive_input::open(&a.archive)?;
    let mut reader =
        Reader::new(input).with_context(|| format!("{}: not a valid VMA archive", a.archive))?;
    let header = reader.header().clone();
    check_names(&header, &a.drives)?;
    let leftovers = Leftovers::watch("extract", a.keep_partial)?;
    std::fs::create_dir(&a.dir).with_context(|| {
        format!(
            "cannot create directory {} (it must not exist)",
            a.dir.display()
        )
    })?;
    leftovers.add(&a.dir);
    let res = extract_into(&a, &header, &mut reader, &leftovers);
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

fn extract_into(
    a: &Args,
    header: &Header,
    reader: &mut Reader<Box<dyn std::io::Read + Send>>,
    leftovers: &Leftovers,
) -> anyhow::Result<()> {
    for c in &header.configs {
        let p = a.dir.join(&c.name);
        std::fs::write(&p, &c.data).with_context(|| format!("cannot write {}", p.display()))?;
    }
    let mut outs: HashMap<DevId, Out> = HashMap::new();
    for d in &header.devices {
        if !a.drives.is_empty() && !a.drives.contains(&d.name) {
            continue;
        }
        let tmp = a.dir.join(format!("tmp-disk-{}.raw", d.name));
        let path = a.dir.join(format!("disk-{}.raw", d.name));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        file.set_len(d.size)
            .with_context(|| format!("cannot size {}", tmp.display()))?;
        stdout_line(&format!("DEVINFO {} {}", tmp.display(), d.size));
        outs.insert(d.id, Out { file, tmp, path });
    }
    let mut progress = ReadProgress::new(header, a.verbose, "extract");
    let res = (|| -> anyhow::Result<()> {
        while let Some(ext) = reader.next_extent()? {
            for c in ext.clusters() {
                let dev = header.device(c.dev).expect("the reader checked the device");
                progress.cluster(dev, c.cluster, c.mask);
                let Some(out) = outs.get(&c.dev) else {
                    continue;
                };
                let base = c.device_offset();
                for (off, run) in c.runs() {
                    out.file
                        .write_all_at(run, base + off as u64)
                        .with_context(|| format!("write error on {}", out.tmp.display()))?;
                }
            }
        }
        Ok(())
    })();
    progress.finish(res.is_ok());
    res?;
    for out in outs.values() {
        out.file
            .sync_all()
            .with_context(|| format!("cannot sync {}", out.tmp.display()))?;
    }
    leftovers.commit(|| -> anyhow::Result<()> {
        for out in outs.values() {
            std::fs::rename(&out.tmp, &out.path)
                .with_context(|| format!("cannot rename {}", out.tmp.display()))?;
        }
        sync_dir(&a.dir)
    })
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}
