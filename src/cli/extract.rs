//! `vma-writer extract ARCHIVE DIR [-d NAME,...] [-v]`: restores configs and
//! drives into a new directory. Drives are written sparse (zero blocks are
//! never written) as `tmp-disk-NAME.raw` and renamed to `disk-NAME.raw` only
//! once the whole archive has been read and found complete.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};

use super::archive_input;
use super::progress::{Progress, Style};
use super::verify::print_totals;
use crate::vma::header::check_file_name;
use crate::vma::{DevId, Reader};

/// Arguments of `extract`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The archive (`-` for stdin).
    pub archive: String,
    /// Directory to create; must not exist.
    pub dir: PathBuf,
    /// Restore only these drives (comma-separated names).
    #[arg(short = 'd', long = "drives", value_delimiter = ',')]
    pub drives: Vec<String>,
    /// Print DEVINFO lines and progress, as `vma extract -v` does.
    #[arg(short, long)]
    pub verbose: bool,
}

struct Out {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
}

/// Runs `extract`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let input = archive_input::open(&a.archive)?;
    let mut reader =
        Reader::new(input).with_context(|| format!("{}: not a valid VMA archive", a.archive))?;
    let header = reader.header().clone();
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
    for want in &a.drives {
        if header.devices.iter().all(|d| &d.name != want) {
            bail!("drive '{want}' is not in the archive");
        }
    }
    std::fs::create_dir(&a.dir).with_context(|| {
        format!(
            "cannot create directory {} (it must not exist)",
            a.dir.display()
        )
    })?;
    for c in &header.configs {
        let p = a.dir.join(&c.name);
        std::fs::write(&p, &c.data).with_context(|| format!("cannot write {}", p.display()))?;
    }
    let mut outs: HashMap<DevId, Out> = HashMap::new();
    let mut total_clusters = 0;
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
        if a.verbose {
            println!("DEVINFO {} {}", tmp.display(), d.size);
        }
        total_clusters += d.clusters();
        outs.insert(d.id, Out { file, tmp, path });
    }
    let mut progress = Progress::new(total_clusters, a.verbose, Style::Read, "extract");
    let mut restored = 0u64;
    let res = (|| -> anyhow::Result<()> {
        while let Some(ext) = reader.next_extent()? {
            for c in ext.clusters() {
                let Some(out) = outs.get(&c.dev) else {
                    continue;
                };
                let base = c.device_offset();
                for (off, run) in c.runs() {
                    out.file
                        .write_all_at(run, base + off as u64)
                        .with_context(|| format!("write error on {}", out.tmp.display()))?;
                }
                restored += 1;
            }
            progress.update(restored, reader.position());
        }
        Ok(())
    })();
    progress.finish();
    if let Err(e) = res {
        return Err(e.context(format!(
            "extraction failed; incomplete tmp-disk-*.raw files left in {}",
            a.dir.display()
        )));
    }
    for out in outs.values() {
        out.file
            .sync_all()
            .with_context(|| format!("cannot sync {}", out.tmp.display()))?;
        std::fs::rename(&out.tmp, &out.path)
            .with_context(|| format!("cannot rename {}", out.tmp.display()))?;
    }
    sync_dir(&a.dir)?;
    if a.verbose {
        let s = reader.stats();
        print_totals(s.bytes, s.zero_bytes);
    }
    Ok(ExitCode::SUCCESS)
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}
