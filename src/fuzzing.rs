//! The harness steps the fuzz targets (`fuzz/`) and their regression
//! tests (`tests/it/fuzz_regressions.rs`) share, kept here once so that a
//! replayed crash goes through exactly what the target ran: the real NBD
//! server over an in-memory pipe, the client bytes of a handshake, and an
//! arbitrary index body wrapped into an index file with a valid digest.
//! Not an API: hidden from the docs.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use twox_hash::XxHash3_128;

use crate::nbd::{Export, MemoryBackend, MemoryBudget, Server, ServerConfig};
use crate::vma::index::{FLAG_FRAMED, INDEX_MAGIC, INDEX_VERSION};

/// Bytes of the in-memory pipe between the fuzz client and the server;
/// small, so that back-pressure paths run too.
const PIPE: usize = 16 * 1024;

/// Per-connection and shared byte budget of the fuzzed server: small, so
/// that the inputs the fuzzer makes exhaust it.
const BUDGET: usize = 64 * 1024;

/// A fresh server (so that no input's writes pile up in memory across
/// runs) with the exports every NBD target uses: a small writable one, a
/// larger sparse one, and one named "" (the default); with the shared
/// memory budget, as `serve` and `backup` run it.
///
/// The larger one is 1 GiB, not 2^62 bytes: a RAM disk keeps a marker per
/// 64 KiB page zeroed with NO_HOLE (allocated zeros), so on a 2^62-byte
/// export one WRITE_ZEROES could ask for 2^46 of them. That is
/// `MemoryBackend` doing what it is asked (it is for tests and demos; the
/// backup target records zeros per cluster), and it made the first
/// timeout the transmission target reported.
fn server() -> Server<MemoryBackend> {
    let export = |name: &str, size: u64| Export {
        name: name.to_owned(),
        description: format!("fuzz export {name}"),
        backend: Arc::new(MemoryBackend::new(size)),
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
            memory: Some(MemoryBudget::new(BUDGET)),
            payload_timeout: Duration::from_secs(5),
        },
    )
}

/// Connects a client that sends `input` (then closes its side) to a fresh
/// server, reads everything the server answers, and returns it. The
/// connection must end by itself: a hang is a bug.
pub async fn converse(input: &[u8]) -> Vec<u8> {
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

/// The index file (`format/INDEX.md`) of an arbitrary input: a flag byte
/// (bit 0: framed), the archive's stream length (8 bytes, LE), then the
/// uncompressed body, which is compressed and given a head with a correct
/// digest, so that mutations reach the body's checks instead of failing
/// the digest. `None` for an input shorter than its head fields.
pub fn index_file(data: &[u8]) -> Option<Vec<u8>> {
    let (&flag, rest) = data.split_first()?;
    let (stream_len, body) = rest.split_at_checked(8)?;
    let flags = if flag & 1 != 0 { FLAG_FRAMED } else { 0 };
    let body = zstd::encode_all(body, 1).expect("compressing into memory");
    let mut b = Vec::with_capacity(64 + body.len());
    b.extend_from_slice(&INDEX_MAGIC);
    b.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(b"fuzz-index-uuid!");
    b.extend_from_slice(stream_len);
    b.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let mut h = XxHash3_128::new();
    h.write(&b[..48]);
    h.write(&body);
    b.extend_from_slice(&h.finish_128().to_be_bytes());
    b.extend_from_slice(&body);
    Some(b)
}
