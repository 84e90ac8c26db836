//! Options shared by the commands that write an archive (`create`, `serve`,
//! `backup`): declared once here, flattened into each command, so every
//! flag has one spelling and one help text. Also where an output name
//! becomes a [`Target`] and config files become blobs.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use super::values::{Size, ZstdLevel};
use crate::assembler::{AssemblerConfig, DEFAULT_PARTIAL_LIMIT, DriveSpec};
use crate::nbd::{ListenAddr, MemoryBudget, ServerConfig, Tls, TlsFiles};
use crate::sink::{SinkOptions, Target};
use crate::target::{
    DEFAULT_MEMORY_BUDGET, DEFAULT_RECONNECT_TIMEOUT, MAX_MEMORY_BUDGET, MIN_MEMORY_BUDGET,
    TARGET_BYTES_IN_FLIGHT, TargetConfig,
};
use crate::vma::WriterBuilder;
use crate::vma::consts::{PROXMOX_CLUSTERS_PER_EXTENT, VMA_BLOCKS_PER_EXTENT};

/// How the archive is written.
#[derive(Debug, Clone, clap::Args)]
pub struct ArchiveOpts {
    /// A config file to store in the archive (by its file name), e.g.
    /// qemu-server.conf. May be repeated.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub configs: Vec<PathBuf>,
    /// Compression and what happens to a failed output.
    #[command(flatten)]
    pub output: OutputOpts,
    /// Archive uuid, instead of a random one (reproducible archives).
    #[arg(long, value_name = "UUID")]
    pub uuid: Option<uuid::Uuid>,
    /// Archive creation time in Unix seconds, instead of now.
    #[arg(long, value_name = "SECONDS")]
    pub ctime: Option<i64>,
    /// Clusters per extent, 1 to 59 (Proxmox writes 58).
    #[arg(long, value_name = "N", default_value_t = PROXMOX_CLUSTERS_PER_EXTENT,
          value_parser = clusters_per_extent)]
    pub clusters_per_extent: usize,
}

/// How an archive file is written, for every command that writes one
/// (`create`, `serve`, `backup`, `convert`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OutputOpts {
    /// Compress the archive with zstd, at LEVEL (default 3), as seekable
    /// zstd: one frame per extent, each with zstd's checksum, a seek table
    /// and the archive index at the end. An output name ending in `.zst`
    /// implies it.
    #[arg(long, value_name = "LEVEL", num_args = 0..=1, default_missing_value = "3")]
    pub zstd: Option<ZstdLevel>,
    /// zstd compression threads (default: one per core).
    #[arg(long, value_name = "N", alias = "zstd-threads", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// Keep ARCHIVE.partial when the command fails or is interrupted.
    #[arg(long)]
    pub keep_partial: bool,
}

/// zstd level of `--zstd` without a level, and of a `.zst` output name:
/// zstd's own default.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// `--memory`: a [`Size`] from [`MIN_MEMORY_BUDGET`] to [`MAX_MEMORY_BUDGET`].
fn memory_size(s: &str) -> Result<Size, String> {
    let size: Size = s.parse()?;
    if size.0 < MIN_MEMORY_BUDGET as u64 || size.0 > MAX_MEMORY_BUDGET as u64 {
        return Err(format!(
            "{s}: the memory budget must be {} KiB to {} MiB",
            MIN_MEMORY_BUDGET >> 10,
            MAX_MEMORY_BUDGET >> 20
        ));
    }
    Ok(size)
}

fn clusters_per_extent(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of clusters"))?;
    if n == 0 || n > VMA_BLOCKS_PER_EXTENT {
        return Err(format!(
            "{n} clusters per extent: must be 1 to {VMA_BLOCKS_PER_EXTENT}"
        ));
    }
    Ok(n)
}

impl Default for ArchiveOpts {
    fn default() -> Self {
        ArchiveOpts {
            configs: Vec::new(),
            output: OutputOpts::default(),
            uuid: None,
            ctime: None,
            clusters_per_extent: PROXMOX_CLUSTERS_PER_EXTENT,
        }
    }
}

/// How `s3://BUCKET/KEY` archives are reached and written: global flags,
/// so every command that takes an archive name takes them. Credentials
/// and region come from the `AWS_*` variables or the profile files.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct S3Opts {
    /// The S3 endpoint URL for s3:// archives, e.g. http://10.0.0.5:3900
    /// for a store on a private network (default: AWS_ENDPOINT_URL, the
    /// profile's endpoint_url, or AWS). Requests use path-style addressing.
    #[arg(long, value_name = "URL", global = true)]
    pub s3_endpoint: Option<String>,
    /// Part size of an upload to S3 (K/M/G suffixes; at least 5M; default
    /// 16M, raised so that the archive fits in S3's 10,000 parts).
    #[arg(long, value_name = "SIZE", global = true, value_parser = part_size)]
    pub s3_part_size: Option<Size>,
    /// Parts of an upload to S3 in flight at once; memory is bounded by
    /// (N + 1) x part size.
    #[arg(long, value_name = "N", global = true,
          default_value_t = crate::object::upload::DEFAULT_PARTS_IN_FLIGHT,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub s3_parts_in_flight: usize,
    /// Retries of an S3 request on a transient error (with exponential
    /// backoff).
    #[arg(long, value_name = "N", global = true,
          default_value_t = crate::object::DEFAULT_RETRIES)]
    pub s3_retries: usize,
}

fn part_size(s: &str) -> Result<Size, String> {
    use crate::object::upload::{MAX_PART_SIZE, MIN_PART_SIZE};
    let size: Size = s.parse()?;
    if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&size.0) {
        return Err(format!(
            "{} bytes: a part is {MIN_PART_SIZE} to {MAX_PART_SIZE} bytes (S3's limits)",
            size.0
        ));
    }
    Ok(size)
}

impl S3Opts {
    /// The object client's settings.
    pub fn settings(&self) -> crate::object::Settings {
        crate::object::Settings {
            endpoint: self.s3_endpoint.clone(),
            part_size: self.s3_part_size.map(|s| s.0),
            parts_in_flight: self.s3_parts_in_flight,
            retries: self.s3_retries,
        }
    }
}

/// Limits and reporting of the live commands (`serve`, `backup`).
#[derive(Debug, Clone, clap::Args)]
pub struct LiveOpts {
    /// Bound on buffered partial clusters (K/M/G suffixes).
    #[arg(long, value_name = "SIZE", default_value = "64M")]
    pub buffer_limit: Size,
    /// Memory for the data the drives' clients send, all drives together
    /// (K/M/G suffixes): shared fairly by the drives, it bounds what the
    /// backup holds however many drives it has. Less costs throughput.
    #[arg(long, value_name = "SIZE", default_value = "24M", value_parser = memory_size)]
    pub memory: Size,
    /// Seconds an incomplete drive may stay without a client before the
    /// backup fails.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_RECONNECT_TIMEOUT.as_secs())]
    pub reconnect_timeout: u64,
    /// Print progress and the result as JSON lines (on stdout; on stderr
    /// when the archive itself goes to stdout).
    #[arg(long)]
    pub json: bool,
}

impl Default for LiveOpts {
    fn default() -> Self {
        LiveOpts {
            buffer_limit: Size(DEFAULT_PARTIAL_LIMIT as u64),
            memory: Size(DEFAULT_MEMORY_BUDGET as u64),
            reconnect_timeout: DEFAULT_RECONNECT_TIMEOUT.as_secs(),
            json: false,
        }
    }
}

/// `--tls`: whether the NBD server offers STARTTLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    /// No TLS (STARTTLS is answered ERR_UNSUP).
    #[default]
    Off,
    /// TLS offered; plain-text clients may proceed too.
    On,
    /// TLS required: before STARTTLS every option is refused with
    /// ERR_TLS_REQD (EXPORT_NAME closes the connection).
    Require,
}

/// TLS of the NBD server (`serve`): declared once, flattened into each
/// command that listens for clients.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsOpts {
    /// TLS for NBD clients (STARTTLS, X.509): off, on (optional) or
    /// require. rustls has no TLS-PSK.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = TlsMode::Off)]
    pub tls: TlsMode,
    /// The server certificate chain (PEM), with --tls on|require.
    #[arg(long, value_name = "FILE",
          required_if_eq_any = [("tls", "on"), ("tls", "require")])]
    pub tls_cert: Option<PathBuf>,
    /// The server's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE",
          required_if_eq_any = [("tls", "on"), ("tls", "require")])]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to (with
    /// --tls-verify-client).
    #[arg(long, value_name = "FILE", requires = "tls_verify_client")]
    pub tls_ca: Option<PathBuf>,
    /// Require a client certificate signed by --tls-ca: clients without
    /// one fail in the TLS handshake.
    #[arg(long, requires = "tls_ca")]
    pub tls_verify_client: bool,
}

impl TlsOpts {
    /// `off`, `on` or `require`, as typed.
    pub fn mode_name(&self) -> &'static str {
        match self.tls {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        }
    }

    /// Loads the certificate, key and CA, once at startup; errors name the
    /// file. `None` with `--tls off`.
    pub fn load(&self) -> anyhow::Result<Option<Tls>> {
        let (cert, key) = match (self.tls, &self.tls_cert, &self.tls_key) {
            (TlsMode::Off, None, None) if self.tls_ca.is_none() => return Ok(None),
            (TlsMode::Off, ..) => {
                bail!("--tls-cert, --tls-key and --tls-ca need --tls on or --tls require")
            }
            (_, Some(cert), Some(key)) => (cert.clone(), key.clone()),
            _ => bail!("--tls on|require needs --tls-cert and --tls-key"),
        };
        let files = TlsFiles {
            cert,
            key,
            client_ca: self.tls_ca.clone(),
        };
        let tls =
            Tls::from_files(&files, self.tls == TlsMode::Require).context("cannot set up TLS")?;
        Ok(Some(tls))
    }
}

/// Where an archive named `name` goes: `-` is stdout, which must not be a
/// terminal (an archive is binary; `zstd` refuses the same way);
/// `s3://BUCKET/KEY` an object.
pub fn output_target(name: &str) -> anyhow::Result<Target> {
    let target = Target::parse(name)?;
    if target == Target::Stdout && std::io::stdout().is_terminal() {
        bail!(
            "refusing to write an archive to a terminal: redirect stdout (`-o - > FILE`) or give \
             a file name"
        );
    }
    Ok(target)
}

impl OutputOpts {
    /// How the sink writes to `target`: zstd when asked for, or when the
    /// name ends in `.zst`.
    pub fn sink_options(&self, target: &Target) -> SinkOptions {
        let level = self
            .zstd
            .map(|l| l.0)
            .or_else(|| target.implies_zstd().then_some(DEFAULT_ZSTD_LEVEL));
        SinkOptions {
            zstd_level: level,
            threads: self.threads.map_or_else(
                || std::thread::available_parallelism().map_or(1, |n| n.get()),
                usize::from,
            ),
            keep_partial: self.keep_partial,
            size_bound: None,
        }
    }
}

impl ArchiveOpts {
    /// The config files, each named by its file name (Proxmox stores only
    /// the base name).
    pub fn read_configs(&self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        self.configs
            .iter()
            .map(|c| {
                let data = std::fs::read(c)
                    .with_context(|| format!("cannot read config {}", c.display()))?;
                let name = c
                    .file_name()
                    .and_then(|n| n.to_str())
                    .with_context(|| format!("config {}: no usable file name", c.display()))?;
                Ok((name.to_string(), data))
            })
            .collect()
    }

    /// How the sink writes to `target`: see [`OutputOpts::sink_options`].
    pub fn sink_options(&self, target: &Target) -> SinkOptions {
        self.output.sink_options(target)
    }

    /// Keep a failed output (`--keep-partial`).
    pub fn keep_partial(&self) -> bool {
        self.output.keep_partial
    }

    /// True when the archive to `target` is zstd-compressed.
    pub fn compressed(&self, target: &Target) -> bool {
        self.sink_options(target).zstd_level.is_some()
    }

    /// A writer builder with these options and the config files added.
    pub fn writer_builder(&self) -> anyhow::Result<WriterBuilder> {
        let mut builder = WriterBuilder::new().clusters_per_extent(self.clusters_per_extent)?;
        if let Some(uuid) = self.uuid {
            builder = builder.uuid(uuid);
        }
        if let Some(ctime) = self.ctime {
            builder = builder.ctime(ctime);
        }
        for (name, data) in self.read_configs()? {
            builder
                .add_config(&name, &data)
                .with_context(|| format!("config {name}"))?;
        }
        Ok(builder)
    }

    /// The configuration of a live target serving `drives` on `listen`
    /// and writing to `output`.
    pub fn target_config(
        &self,
        live: &LiveOpts,
        listen: ListenAddr,
        drives: Vec<DriveSpec>,
        output: Target,
    ) -> anyhow::Result<TargetConfig> {
        Ok(TargetConfig {
            listen,
            drives,
            configs: self.read_configs()?,
            sink: self.sink_options(&output),
            output,
            uuid: self.uuid,
            ctime: self.ctime,
            assembler: AssemblerConfig {
                partial_limit: usize::try_from(live.buffer_limit.0).unwrap_or(usize::MAX),
                ..Default::default()
            },
            clusters_per_extent: self.clusters_per_extent,
            reconnect_timeout: Duration::from_secs(live.reconnect_timeout),
            server: ServerConfig {
                max_bytes_in_flight: TARGET_BYTES_IN_FLIGHT,
                memory: Some(MemoryBudget::new(
                    usize::try_from(live.memory.0).unwrap_or(usize::MAX),
                )),
                ..ServerConfig::default()
            },
            tls: None,
        })
    }
}
