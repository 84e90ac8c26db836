//! `vma-writer serve`: be the NBD target of a backup that someone else
//! drives (e.g. a QEMU job started by hand over QMP). One export per drive;
//! the archive is finalised once every drive is complete and its clients
//! have flushed or disconnected.

use std::process::ExitCode;

use super::display::{LiveDisplay, StatusOut};
use super::live::serve_to_end;
use super::options::{ArchiveOpts, LiveOpts, TlsOpts, output_target};
use super::values::DriveSize;
use crate::assembler::DriveSpec;
use crate::nbd::ListenAddr;
use crate::target::BackupTarget;

/// Arguments of `serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// unix:PATH, tcp:HOST:PORT (HOST defaults to 127.0.0.1), or systemd:
    /// the socket passed by systemd socket activation (LISTEN_FDS=1).
    #[arg(long, value_name = "ADDR")]
    pub listen: ListenAddr,
    /// A drive export: NAME=SIZE, SIZE in bytes or with a K/M/G/T suffix
    /// (powers of 1024). It must equal the source drive's size, a multiple
    /// of 512 bytes.
    #[arg(long = "drive", value_name = "NAME=SIZE", required = true)]
    pub drives: Vec<DriveSize>,
    /// The archive to write, or `-` for stdout. Must not exist.
    #[arg(short, long, value_name = "ARCHIVE")]
    pub output: String,
    /// How the archive is written.
    #[command(flatten)]
    pub archive: ArchiveOpts,
    /// Limits and reporting.
    #[command(flatten)]
    pub live: LiveOpts,
    /// TLS for the clients.
    #[command(flatten)]
    pub tls: TlsOpts,
}

/// Runs `serve`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let drives = a
        .drives
        .iter()
        .map(|d| DriveSpec::new(d.name.clone(), d.size))
        .collect();
    let output = output_target(&a.output)?;
    let status_out = StatusOut::for_output(&output);
    let tls = a.tls.load()?;
    let tls_mode = a.tls.mode_name();
    let mut cfg = a.archive.target_config(&a.live, a.listen, drives, output)?;
    cfg.tls = tls;
    crate::pool::use_one_malloc_arena();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let target = BackupTarget::start(cfg).await?;
        let status = target.status();
        if a.live.json {
            status_out.json_line(serde_json::json!({
                "event": "listening",
                "address": target.addr().to_string(),
                "exports": status.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
                "tls": tls_mode,
            }));
        } else {
            eprintln!(
                "vma-writer: serving {} drive(s) on {} (TLS {tls_mode})",
                status.len(),
                target.addr()
            );
        }
        let mut display = LiveDisplay::new(a.live.json, status_out, &status);
        Ok(serve_to_end(target, &mut display).await.exit_code())
    })
}
