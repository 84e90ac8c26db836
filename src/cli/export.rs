//! `vma-writer export ARCHIVE --listen ADDR [-d NAME]...`: serves the
//! drives of an archive read-only over NBD, one export per drive, until
//! SIGINT or SIGTERM. Stopping is how an export ends, so it then exits 0
//! (after answering the requests in flight and removing its socket).

use std::process::ExitCode;
use std::time::Instant;

use serde_json::json;

use super::archive_input;
use super::display::StatusOut;
use super::options::TlsOpts;
use super::signals::stop_signal;
use super::values::Size;
use crate::export::{ArchiveExport, DriveStats, ExportConfig};
use crate::nbd::ListenAddr;

/// Arguments of `export`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The archive: a plain .vma (with or without its index) or a seekable
    /// .vma.zst (as `create --zstd` and `convert` write it).
    pub archive: String,
    /// unix:PATH or tcp:HOST:PORT (HOST defaults to 127.0.0.1).
    #[arg(long, value_name = "ADDR")]
    pub listen: ListenAddr,
    /// Serve only these drives (repeat, or separate with commas).
    #[arg(
        short = 'd',
        long = "drives",
        value_name = "NAMES",
        value_delimiter = ','
    )]
    pub drives: Vec<String>,
    /// Decompressed frames of a .vma.zst kept in memory (K/M/G suffixes).
    #[arg(long, value_name = "SIZE", default_value = "64M")]
    pub cache_size: Size,
    /// Print the exports and the final totals as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tls: TlsOpts,
}

/// A drive's figures as JSON.
fn drive_json(d: &DriveStats, uri: Option<String>) -> serde_json::Value {
    let mut v = json!({
        "name": d.name, "size": d.size, "bytes_served": d.bytes_served,
        "read_errors": d.read_errors,
    });
    if let Some(uri) = uri {
        v["uri"] = json!(uri);
    }
    v
}

/// Runs `export`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let tls = a.tls.load()?;
    let opened = Instant::now();
    let archive = archive_input::random(&a.archive)?
        .with_cache_size(usize::try_from(a.cache_size.0).unwrap_or(usize::MAX));
    let open_ms = opened.elapsed().as_secs_f64() * 1e3;
    let digests = archive.has_digests();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let stop = stop_signal();
        let cfg = ExportConfig {
            drives: a.drives.clone(),
            tls,
            ..ExportConfig::new(a.listen.clone())
        };
        let export = ArchiveExport::start(archive, cfg)
            .map_err(|e| anyhow::anyhow!("{}: {}", a.archive, super::describe(&e)))?;
        let drives = export.drives();
        if a.json {
            StatusOut::Stdout.json_line(json!({
                "event": "listening",
                "address": export.addr().to_string(),
                "tls": a.tls.mode_name(),
                "archive": a.archive,
                "digests": digests,
                "open_ms": open_ms,
                "exports": drives.iter().map(|d| drive_json(d, Some(export.uri(&d.name)))).collect::<Vec<_>>(),
            }));
        } else {
            eprintln!(
                "vma-writer: exporting {} drive(s) of {} read-only on {} (TLS {}){}",
                drives.len(),
                a.archive,
                export.addr(),
                a.tls.mode_name(),
                if digests {
                    ""
                } else {
                    " (no index: reads are not checked against digests)"
                }
            );
            for d in &drives {
                eprintln!("  {:<20} {:>14} bytes  {}", d.name, d.size, export.uri(&d.name));
            }
        }
        let signal = stop.await;
        let drives = export.drives();
        let (read, frames) = (
            export.archive().bytes_read(),
            export.archive().frames_decompressed(),
        );
        export.stop().await?;
        if a.json {
            StatusOut::Stdout.json_line(json!({
                "event": "stopped",
                "signal": signal.to_string(),
                "archive_bytes_read": read,
                "frames_decompressed": frames,
                "drives": drives.iter().map(|d| drive_json(d, None)).collect::<Vec<_>>(),
            }));
        } else {
            eprintln!("vma-writer: export stopped by {signal}");
        }
        Ok(ExitCode::SUCCESS)
    })
}
