//! The `vma-writer` command line: one module per subcommand, each turning
//! its clap arguments into library calls, and the pieces they share:
//! `options` (flags of every command that writes an archive), `values`
//! (typed parsers for sizes, levels and drive specs), `signals` (SIGINT,
//! SIGTERM and exit statuses), `display` and `progress` (what the user
//! sees), `live` (running a live target or backup to its end) and
//! `archive_input` (opening an archive to read, through [`crate::archive`]). With `main.rs`, the only
//! home of `anyhow`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod archive_input;
mod backup;
mod config;
mod convert;
mod create;
mod demo;
mod display;
mod export;
mod extract;
mod generate;
mod list;
mod live;
mod live_restore;
mod options;
mod progress;
mod serve;
mod signals;
mod values;
mod verify;

/// Proxmox-compatible VMA archives from stock QEMU.
#[derive(Debug, Parser)]
#[command(name = "vma-writer", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// How s3:// archives are reached (every command).
    #[command(flatten)]
    pub s3: options::S3Opts,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an archive from disk images (raw, or any format QEMU reads).
    Create(create::Args),
    /// Print an archive's configs, devices and creation time.
    List(list::Args),
    /// Write one config blob of an archive to stdout.
    Config(config::Args),
    /// Read a whole archive and check its structure is valid and complete.
    Verify(verify::Args),
    /// Restore an archive's drives and configs into a new directory.
    Extract(extract::Args),
    /// Re-encode any archive we read (.vma, .vma.zst, .vma.gz, .vma.lzo)
    /// as a seekable .vma.zst, or a .vma with its index; the VMA bytes stay
    /// the same.
    Convert(convert::Args),
    /// Serve an archive's drives read-only over NBD (instant restore).
    Export(export::Args),
    /// Be the NBD target of a live backup and write its archive.
    Serve(serve::Args),
    /// Run a VM from an archive while its drives stream back: qcow2
    /// overlays over a read-only export, block-stream jobs over QMP.
    LiveRestore(live_restore::Args),
    /// Back up a running QEMU's drives over QMP into one archive.
    Backup(backup::Args),
    /// Run a self-contained live backup and restore check, end to end.
    Demo(demo::Args),
    /// Write man pages or print shell completions.
    Generate(generate::Args),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    crate::object::configure(cli.s3.settings());
    match cli.command {
        Command::Create(a) => create::run(a),
        Command::List(a) => list::run(a),
        Command::Config(a) => config::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Extract(a) => extract::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Export(a) => export::run(a),
        Command::Serve(a) => serve::run(a),
        Command::LiveRestore(a) => live_restore::run(a),
        Command::Backup(a) => backup::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Generate(a) => generate::run(a),
    }
}

/// An error and its causes, joined by ": ", each said once: a cause whose
/// text the message already holds (an I/O error quoted by the error that
/// wraps it) is not repeated.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = String::new();
    let mut cause = Some(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
        cause = c.source();
    }
    msg
}
