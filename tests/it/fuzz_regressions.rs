//! Inputs the fuzz targets (`fuzz/`) once crashed on, replayed as plain
//! tests: `tests/fixtures/fuzz/TARGET/*` go through the same steps as the
//! target's harness did, and must now end in an error, not a panic. (The
//! debug-build run of the suite in `.ci/run` has the overflow checks the
//! fuzz build has.) To add one: copy `fuzz/artifacts/TARGET/crash-*` there
//! (a target without a test here yet, e.g. `vma_reader`, gets one that
//! replays its inputs through its harness's steps).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use vma_writer::nbd::{Export, MemoryBackend, Server, ServerConfig};

use twox_hash::XxHash3_128;
use vma_writer::vma::ArchiveIndex;
use vma_writer::vma::index::{FLAG_FRAMED, INDEX_MAGIC, INDEX_VERSION};

/// The crash inputs of `target`; at least one (a test that replays
/// nothing would pass without checking anything).
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz")
        .join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut v: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|e| {
            let p = e.unwrap().path();
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no crash inputs in {}", dir.display());
    v
}

/// `fuzz/fuzz_targets/vma_index.rs`'s harness: flag byte, stream length,
/// uncompressed body; returns the index file it makes.
fn index_of(data: &[u8]) -> Vec<u8> {
    let flags = if data[0] & 1 != 0 { FLAG_FRAMED } else { 0 };
    let body = zstd::encode_all(&data[9..], 1).unwrap();
    let mut b = Vec::new();
    b.extend_from_slice(&INDEX_MAGIC);
    b.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(b"fuzz-index-uuid!");
    b.extend_from_slice(&data[1..9]);
    b.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let mut h = XxHash3_128::new();
    h.write(&b[..48]);
    h.write(&body);
    b.extend_from_slice(&h.finish_128().to_be_bytes());
    b.extend_from_slice(&body);
    b
}

#[test]
fn vma_index_crashes_are_errors() {
    // crash-f6f6...: device totals near 2^64 whose sum wrapped (an
    // overflow panic in debug builds; in release a wrong sum could match).
    for (path, data) in inputs("vma_index") {
        let res = ArchiveIndex::decode(&index_of(&data));
        assert!(res.is_err(), "{}: accepted", path.display());
    }
}

/// `fuzz/src/lib.rs`'s client bytes of a handshake ending in GO on
/// `export`: `mode % 3` is simple, structured or extended replies.
fn handshake(mode: u8, export: &str) -> Vec<u8> {
    let mut b = 3u32.to_be_bytes().to_vec();
    let opt = |b: &mut Vec<u8>, code: u32, payload: &[u8]| {
        b.extend(crate::support::option_bytes(code, payload));
    };
    if !mode.is_multiple_of(3) {
        opt(&mut b, if mode % 3 == 1 { 8 } else { 11 }, &[]);
        opt(
            &mut b,
            10,
            &crate::support::meta_payload(export, &["base:allocation"]),
        );
    }
    opt(&mut b, 7, &crate::support::go_payload(export, &[]));
    b
}

/// The nbd_transmission harness: its three exports, the input after a
/// handshake, everything the server answers read; the connection must end
/// by itself within `limit`.
fn converse(input: &[u8], limit: Duration) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let export = |name: &str, size: u64| Export {
            name: name.to_owned(),
            description: String::new(),
            backend: Arc::new(MemoryBackend::new(size)),
        };
        let server = Server::new(
            vec![
                export("a", 1 << 20),
                export("big", 1 << 30),
                export("", 4096),
            ],
            ServerConfig {
                max_connections: 1,
                max_bytes_in_flight: 64 * 1024,
                handshake_timeout: Duration::from_secs(5),
                memory: None,
                payload_timeout: Duration::from_secs(5),
            },
        );
        let (client, srv) = tokio::io::duplex(16 * 1024);
        let (mut cr, mut cw) = tokio::io::split(client);
        let shutdown = CancellationToken::new();
        let send = async {
            let _ = cw.write_all(input).await;
            let _ = cw.shutdown().await;
            drop(cw);
        };
        let recv = async {
            let mut out = Vec::new();
            let _ = cr.read_to_end(&mut out).await;
        };
        let all = async {
            tokio::join!(send, recv, server.serve_stream(srv, &shutdown));
        };
        tokio::time::timeout(limit, all)
            .await
            .expect("the connection did not end");
    });
}

#[test]
fn nbd_transmission_inputs_end() {
    // timeout-51da...: WRITE_ZEROES with NO_HOLE of 2^56 bytes on what was
    // a 2^62-byte RAM disk, which then allocated a zero marker per 64 KiB
    // page: the harness's backend doing as asked (a 1 GiB export now
    // refuses the range with ENOSPC), not a server fault.
    for (path, data) in inputs("nbd_transmission") {
        let Some((&sel, rest)) = data.split_first() else {
            continue;
        };
        let export = ["a", "big", ""][(sel as usize / 3) % 3];
        let mut input = handshake(sel, export);
        input.extend_from_slice(rest);
        eprintln!("{}", path.display());
        converse(&input, Duration::from_secs(10));
    }
}
