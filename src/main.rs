//! The `vma-writer` binary: parses the command line, starts logging, runs
//! the command and maps the outcome to an exit status. No logic lives here.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // A file size limit (ulimit -f) must fail the write with EFBIG, not
    // kill the process with SIGXFSZ before it can clean up.
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = vma_writer::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match vma_writer::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vma-writer: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
