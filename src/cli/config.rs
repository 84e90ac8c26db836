//! `vma-writer config ARCHIVE [-c NAME]`: one config blob, raw, to stdout.

use std::io::Write;
use std::process::ExitCode;

use anyhow::bail;

use super::archive_input;

/// Arguments of `config`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The archive (`-` for stdin).
    pub archive: String,
    /// Which config to print.
    #[arg(short = 'c', long = "config", default_value = "qemu-server.conf")]
    pub name: String,
}

/// Runs `config`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let header = archive_input::header(&a.archive)?;
    let Some(c) = header.config(&a.name) else {
        bail!("unable to find configuration data '{}'", a.name);
    };
    let mut out = std::io::stdout().lock();
    match out.write_all(&c.data).and_then(|_| out.flush()) {
        // A reader that stopped early (`| head`) is not our failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r?,
    }
    Ok(ExitCode::SUCCESS)
}
