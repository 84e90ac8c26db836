//! What the fuzz targets share: the real NBD server driven over an
//! in-memory pipe, and re-sealing of VMA checksums so that mutated
//! archives get past the md5 checks to the rules behind them.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use vma_writer::nbd::{Export, MemoryBackend, MemoryBudget, Server, ServerConfig};

/// Bytes of the in-memory pipe between the fuzz client and the server; small,
/// so that back-pressure paths run too.
const PIPE: usize = 16 * 1024;

/// Per-connection byte budget of the fuzzed server: small, so that the
/// budget is exhausted by the inputs the fuzzer makes.
const BUDGET: usize = 64 * 1024;

/// A fresh server (so that no input's writes pile up in memory across
/// runs) with the exports every NBD target uses: a small writable one, a
/// larger sparse one, and one named "" (the default).
///
/// The larger one is 1 GiB, not 2^62 bytes: a RAM disk keeps a marker per
/// 64 KiB page zeroed with NO_HOLE (allocated zeros), so on a 2^62-byte
/// export one WRITE_ZEROES could ask for 2^46 of them. That is
/// `MemoryBackend` doing what it is asked (it is for tests and demos; the
/// backup target records zeros per cluster), and it made the first
/// timeout this target reported.
fn server() -> Server<MemoryBackend> {
    {
        let export = |name: &str, size: u64| Export {
            name: name.to_owned(),
            description: format!("fuzz export {name}"),
            backend: std::sync::Arc::new(MemoryBackend::new(size)),
        };
        Server::new(
            vec![
                export("a", 1 << 20),
                export("big", 1 << 30),
                export("", 4096),
            ],
            ServerConfig {
                max_connections: 1,
                max_bytes_in_flight: BUDGET,
                handshake_timeout: Duration::from_secs(5),
                // The shared budget as serve and backup run it, so its
                // charging and draining paths are fuzzed too.
                memory: Some(MemoryBudget::new(BUDGET)),
                payload_timeout: Duration::from_secs(5),
            },
        )
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// Connects a client that sends `input` (then closes its side) to the real
/// server, reads everything the server answers, and returns it. The
/// connection must end by itself: a hang is a bug (libFuzzer's -timeout
/// reports it).
pub fn converse(input: &[u8]) -> Vec<u8> {
    runtime().block_on(async {
        let (client, srv) = tokio::io::duplex(PIPE);
        let (mut cr, mut cw) = tokio::io::split(client);
        let shutdown = CancellationToken::new();
        let send = async {
            // The server may hang up before reading everything: fine.
            let _ = cw.write_all(input).await;
            let _ = cw.shutdown().await;
            drop(cw);
        };
        let recv = async {
            let mut out = Vec::new();
            let _ = cr.read_to_end(&mut out).await;
            out
        };
        let server = server();
        let serve = server.serve_stream(srv, &shutdown);
        let ((), out, ()) = tokio::join!(send, recv, serve);
        out
    })
}

/// Client bytes of a complete handshake ending in GO on `export`, in one
/// of three reply modes (`mode % 3`: simple, structured, extended), with
/// `base:allocation` selected when the mode allows it.
pub fn handshake(mode: u8, export: &str) -> Vec<u8> {
    let mut b = 3u32.to_be_bytes().to_vec(); // FIXED_NEWSTYLE | NO_ZEROES
    let opt = |b: &mut Vec<u8>, code: u32, payload: &[u8]| {
        b.extend_from_slice(b"IHAVEOPT");
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        b.extend_from_slice(payload);
    };
    let name = |p: &mut Vec<u8>| {
        p.extend_from_slice(&(export.len() as u32).to_be_bytes());
        p.extend_from_slice(export.as_bytes());
    };
    match mode % 3 {
        0 => {}
        m => {
            opt(&mut b, if m == 1 { 8 } else { 11 }, &[]); // STRUCTURED_REPLY / EXTENDED_HEADERS
            let mut p = Vec::new();
            name(&mut p);
            p.extend_from_slice(&1u32.to_be_bytes());
            let q = b"base:allocation";
            p.extend_from_slice(&(q.len() as u32).to_be_bytes());
            p.extend_from_slice(q);
            opt(&mut b, 10, &p); // SET_META_CONTEXT
        }
    }
    let mut p = Vec::new();
    name(&mut p);
    p.extend_from_slice(&0u16.to_be_bytes());
    opt(&mut b, 7, &p); // GO
    b
}

/// Header size field (offset 56) of an archive, if it has one.
fn header_size(a: &[u8]) -> Option<usize> {
    a.get(56..60)
        .map(|b| u32::from_be_bytes(b.try_into().unwrap()) as usize)
}

/// Recomputes the header md5 over `[0, header_size)` (or what there is).
pub fn reseal_header(a: &mut [u8]) {
    let Some(hs) = header_size(a) else { return };
    if a.len() < 48 {
        return;
    }
    let hs = hs.min(a.len());
    a[32..48].fill(0);
    let d = md5::compute(&a[..hs]);
    a[32..48].copy_from_slice(&d.0);
}

/// Recomputes the md5 of the 512-byte extent header at the start of `e`,
/// after setting its uuid to `uuid`.
pub fn reseal_extent(e: &mut [u8], uuid: &[u8; 16]) {
    if e.len() < 512 {
        return;
    }
    e[8..24].copy_from_slice(uuid);
    e[24..40].fill(0);
    let d = md5::compute(&e[..512]);
    e[24..40].copy_from_slice(&d.0);
}

/// Re-seals the header and every extent header of an archive, walking the
/// extents by their block_count fields, so that mutations of fields reach
/// the checks behind the md5s.
pub fn reseal_archive(a: &mut [u8]) {
    reseal_header(a);
    let (Some(hs), Some(uuid)) = (header_size(a), a.get(8..24)) else {
        return;
    };
    let uuid: [u8; 16] = uuid.try_into().unwrap();
    let mut at = hs;
    while at + 512 <= a.len() {
        reseal_extent(&mut a[at..], &uuid);
        let blocks = u16::from_be_bytes([a[at + 6], a[at + 7]]) as usize;
        at += 512 + blocks * 4096;
    }
}
