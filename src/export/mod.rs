//! Serving an archive's drives read-only over NBD: instant restore.
//!
//! [`ArchiveExport::start`] serves each drive (or the chosen ones) of a
//! random-access archive (a plain `.vma`, with or without its index, or a
//! seekable `.vma.zst`) as an NBD export named after the drive, the size of
//! the drive, read-only and multi-conn. Nothing is scanned at start: the
//! archive index (or, for a plain `.vma` without one, its extent headers)
//! is all [`RandomArchive`] reads before the first READ can be answered.
//!
//! - [`drive`]: [`DriveExport`], the NBD backend of one drive: READ
//!   checked against the digests, BLOCK_STATUS from the index, CACHE and
//!   read-ahead.
//! - [`reads`]: what the drives of one export share: the archive, the
//!   workers that run its blocking reads off the tokio workers, and the
//!   budget that bounds READ data in memory.
//! - [`status`]: `base:allocation` runs from cluster masks (pure).
//! - [`readahead`]: recognising sequential readers (pure).
//!
//! Memory stays bounded whatever the clients do: the frame cache
//! ([`RandomArchive::with_cache_size`]), frames being decompressed (at most
//! one per worker), and READ data ([`reads::READ_BUDGET`] over all
//! connections).
//!
//! Leaves to others: the NBD protocol ([`crate::nbd`]), reading the archive
//! ([`crate::archive`]), and who the clients are (`vma-writer export`,
//! `extract --format`, `live-restore`).

pub mod drive;
pub mod readahead;
pub mod reads;
pub mod status;

use std::io;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use drive::{DriveExport, DriveStats};

use crate::archive::RandomArchive;
use crate::nbd::{Export, ListenAddr, Listener, Server, ServerConfig};
use reads::Reads;

/// Bytes in flight per NBD connection of an export (READ data answered
/// but not yet sent, plus a small charge per request): 32 MiB is more
/// than nbdcopy (64 × 256 KiB) or QEMU (16 × 2 MiB) keep in flight, and
/// half of the export's whole [`reads::READ_BUDGET`], so one client that
/// stops reading its replies cannot stall the others.
pub const EXPORT_BYTES_IN_FLIGHT: usize = 32 << 20;

/// What [`ArchiveExport::start`] needs besides the archive.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// Where to listen.
    pub listen: ListenAddr,
    /// The drives to serve, by name; empty for all.
    pub drives: Vec<String>,
    /// Reads run at once; see [`reads::default_workers`].
    pub workers: usize,
    /// Bound on READ data in memory; see [`reads::READ_BUDGET`].
    pub read_budget: usize,
    /// NBD server limits.
    pub server: ServerConfig,
    /// STARTTLS, when offered (`None`: plain text only).
    pub tls: Option<crate::nbd::Tls>,
}

impl ExportConfig {
    /// All drives on `listen`, with the default limits.
    pub fn new(listen: ListenAddr) -> ExportConfig {
        ExportConfig {
            listen,
            drives: Vec::new(),
            workers: reads::default_workers(),
            read_budget: reads::READ_BUDGET,
            server: ServerConfig {
                max_bytes_in_flight: EXPORT_BYTES_IN_FLIGHT,
                ..ServerConfig::default()
            },
            tls: None,
        }
    }
}

/// Why an export cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A drive asked for is not in the archive.
    #[error("drive '{name}' is not in the archive (it has: {})", available.join(", "))]
    UnknownDrive {
        /// The name asked for.
        name: String,
        /// The archive's drives.
        available: Vec<String>,
    },
    /// The NBD listener cannot be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address asked for.
        addr: ListenAddr,
        /// Why binding failed.
        source: io::Error,
    },
}

/// A running export; see the module docs. Dropping it without
/// [`stop`](Self::stop) leaves the server running until the runtime ends.
pub struct ArchiveExport {
    addr: ListenAddr,
    drives: Vec<Arc<DriveExport>>,
    archive: Arc<RandomArchive>,
    cancel: CancellationToken,
    server: JoinHandle<io::Result<()>>,
}

/// The text `NBD_OPT_LIST` shows for a drive of `archive`: its file name
/// and creation time.
fn description(archive: &RandomArchive) -> String {
    let file = archive.file().path();
    let name = file
        .file_name()
        .unwrap_or(file.as_os_str())
        .to_string_lossy();
    let ctime = chrono::DateTime::from_timestamp(archive.header().ctime, 0).map_or_else(
        || archive.header().ctime.to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    );
    format!("archive {name}, created {ctime}")
}

impl ArchiveExport {
    /// Binds `cfg.listen` and starts serving the drives of `archive`. Call
    /// it within a tokio runtime.
    pub fn start(archive: RandomArchive, cfg: ExportConfig) -> Result<ArchiveExport, Error> {
        let devices = &archive.header().devices;
        for name in &cfg.drives {
            if devices.iter().all(|d| &d.name != name) {
                return Err(Error::UnknownDrive {
                    name: name.clone(),
                    available: devices.iter().map(|d| d.name.clone()).collect(),
                });
            }
        }
        let wanted: Vec<_> = devices
            .iter()
            .filter(|d| cfg.drives.is_empty() || cfg.drives.contains(&d.name))
            .cloned()
            .collect();
        let description = description(&archive);
        let archive = Arc::new(archive);
        let reads = Arc::new(Reads::new(
            Arc::clone(&archive),
            cfg.workers,
            cfg.read_budget,
        ));
        let drives: Vec<Arc<DriveExport>> = wanted
            .iter()
            .map(|d| Arc::new(DriveExport::new(d, Arc::clone(&reads))))
            .collect();
        let listener = Listener::bind(&cfg.listen).map_err(|source| Error::Listen {
            addr: cfg.listen.clone(),
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| Error::Listen {
            addr: cfg.listen.clone(),
            source,
        })?;
        let exports = drives
            .iter()
            .map(|d| Export {
                name: d.name().to_string(),
                description: description.clone(),
                backend: Arc::clone(d),
            })
            .collect();
        let cancel = CancellationToken::new();
        let server = tokio::spawn(
            Server::new(exports, cfg.server)
                .with_tls(cfg.tls)
                .run(listener, cancel.clone()),
        );
        Ok(ArchiveExport {
            addr,
            drives,
            archive,
            cancel,
            server,
        })
    }

    /// The address clients connect to (the real port of `tcp:HOST:0`).
    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// The archive.
    pub fn archive(&self) -> &RandomArchive {
        &self.archive
    }

    /// Each served drive, in archive order.
    pub fn drives(&self) -> Vec<DriveStats> {
        self.drives.iter().map(|d| d.stats()).collect()
    }

    /// An NBD URI for drive `name` (`nbd+unix:///NAME?socket=PATH`, or
    /// `nbd://HOST:PORT/NAME`), as qemu-img and libnbd take it.
    pub fn uri(&self, name: &str) -> String {
        nbd_uri(&self.addr, name)
    }

    /// Stops serving: clients' requests in flight are answered, then the
    /// connections close and the Unix socket is removed.
    pub async fn stop(self) -> io::Result<()> {
        self.cancel.cancel();
        match self.server.await {
            Ok(r) => r,
            Err(e) => Err(io::Error::other(format!("the NBD server task failed: {e}"))),
        }
    }
}

/// An NBD URI for export `name` at `addr`.
pub fn nbd_uri(addr: &ListenAddr, name: &str) -> String {
    match addr {
        ListenAddr::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
        ListenAddr::Tcp(a) => format!("nbd://{a}/{name}"),
        // `Export::addr` is the bound listener's address, so a socket
        // from systemd shows as the Unix or TCP address it has.
        ListenAddr::Systemd => format!("nbd:///{name} (on the socket from systemd)"),
    }
}
