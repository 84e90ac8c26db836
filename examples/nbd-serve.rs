//! Serves NBD exports backed by memory or nothing, for benchmarks and
//! manual testing:
//!
//! ```sh
//! cargo run --release --example nbd-serve -- \
//!     --listen unix:/tmp/x.sock --export disk0=1G:memory --export null=4G:null
//! ```
//!
//! Runs until SIGINT/SIGTERM, then shuts down gracefully.

use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use tokio_util::sync::CancellationToken;
use vma_writer::nbd::{
    Backend, BackendCaps, BlockStatus, Export, ListenAddr, Listener, MemoryBackend, NullBackend,
    Server, ServerConfig,
};

/// Serve NBD exports backed by RAM (`memory`) or by nothing (`null`).
#[derive(Parser, Debug)]
struct Opts {
    /// Where to listen: unix:PATH or tcp:HOST:PORT.
    #[arg(long)]
    listen: ListenAddr,
    /// An export: NAME=SIZE[:memory|null]; SIZE takes K/M/G/T suffixes
    /// (powers of 1024). Repeatable. Default kind: memory.
    #[arg(long = "export", value_parser = parse_export, required = true)]
    exports: Vec<ExportSpec>,
    /// Serve every export read-only.
    #[arg(long)]
    read_only: bool,
    /// Most connections served at once.
    #[arg(long, default_value_t = vma_writer::nbd::MAX_CONNECTIONS)]
    max_connections: usize,
    /// Tokio worker threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Debug, Clone)]
struct ExportSpec {
    name: String,
    size: u64,
    null: bool,
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => bail!("unknown size suffix {c:?}"),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().with_context(|| format!("bad size {s:?}"))?;
    n.checked_mul(mult).context("size overflows")
}

fn parse_export(s: &str) -> Result<ExportSpec, String> {
    let (name, rest) = s
        .split_once('=')
        .ok_or("expected NAME=SIZE[:memory|null]")?;
    let (size, kind) = rest.split_once(':').unwrap_or((rest, "memory"));
    let size = parse_size(size).map_err(|e| format!("{e:#}"))?;
    let null = match kind {
        "memory" => false,
        "null" => true,
        k => return Err(format!("unknown backend {k:?} (memory or null)")),
    };
    Ok(ExportSpec {
        name: name.to_owned(),
        size,
        null,
    })
}

/// Either built-in backend behind one type, so one server serves both.
enum AnyBackend {
    Memory(MemoryBackend),
    Null(NullBackend),
}

macro_rules! each {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            AnyBackend::Memory($b) => $e,
            AnyBackend::Null($b) => $e,
        }
    };
}

impl Backend for AnyBackend {
    fn size(&self) -> u64 {
        each!(self, b => b.size())
    }
    fn caps(&self) -> BackendCaps {
        each!(self, b => b.caps())
    }
    async fn write(&self, offset: u64, data: bytes::Bytes) -> std::io::Result<()> {
        each!(self, b => b.write(offset, data).await)
    }
    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> std::io::Result<()> {
        each!(self, b => b.write_zeroes(offset, len, may_trim).await)
    }
    async fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        each!(self, b => b.trim(offset, len).await)
    }
    async fn flush(&self) -> std::io::Result<()> {
        each!(self, b => b.flush().await)
    }
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<bytes::Bytes> {
        each!(self, b => b.read(offset, len).await)
    }
    async fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<BlockStatus>> {
        each!(self, b => b.block_status(offset, len).await)
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let opts = Opts::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = opts.threads {
        rt.worker_threads(n.max(1));
    }
    rt.build()
        .context("starting the tokio runtime")?
        .block_on(serve(opts))
}

async fn serve(opts: Opts) -> anyhow::Result<()> {
    let exports = opts
        .exports
        .iter()
        .map(|e| {
            let backend = match (e.null, opts.read_only) {
                (true, false) => AnyBackend::Null(NullBackend::new(e.size)),
                (true, true) => AnyBackend::Null(NullBackend::read_only(e.size)),
                (false, false) => AnyBackend::Memory(MemoryBackend::new(e.size)),
                (false, true) => AnyBackend::Memory(MemoryBackend::new(e.size).into_read_only()),
            };
            Export {
                name: e.name.clone(),
                description: format!(
                    "{} bytes, {}",
                    e.size,
                    if e.null { "null" } else { "memory" }
                ),
                backend: Arc::new(backend),
            }
        })
        .collect();
    let listener =
        Listener::bind(&opts.listen).with_context(|| format!("binding {}", opts.listen))?;
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        s.cancel();
    });
    let config = ServerConfig {
        max_connections: opts.max_connections,
        ..ServerConfig::default()
    };
    Server::new(exports, config)
        .run(listener, shutdown)
        .await
        .context("serving")?;
    Ok(())
}
