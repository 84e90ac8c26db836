//! `vma-writer generate man DIR` and `vma-writer generate completions
//! SHELL`: man pages (vma-writer(1) and one per subcommand) and shell
//! completion scripts, made from the clap definitions, so they always say
//! what `--help` says.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;

/// Arguments of `generate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to generate.
    #[command(subcommand)]
    pub what: What,
}

/// What `generate` writes.
#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// Write man pages (vma-writer.1, vma-writer-SUBCOMMAND.1) into DIR,
    /// e.g. /usr/local/share/man/man1.
    Man {
        /// Directory to write the pages into (created if missing).
        dir: PathBuf,
    },
    /// Print the completion script for SHELL on stdout.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// Runs `generate`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let cmd = super::Cli::command();
    match a.what {
        What::Man { dir } => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
        }
        What::Completions { shell } => {
            let mut cmd = cmd;
            clap_complete::generate(shell, &mut cmd, "vma-writer", &mut std::io::stdout());
        }
    }
    Ok(ExitCode::SUCCESS)
}
