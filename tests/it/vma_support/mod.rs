//! Helpers shared by the VMA format and CLI test suites (`tests/vma_*.rs`,
//! `tests/cli_*.rs`): deterministic test data, archives built with the
//! library, byte-level surgery on archives (with md5 re-sealing), and a
//! fd-style [`TestEnv`] that runs the `vma-writer` binary in a temp dir.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use bytes::Bytes;
use uuid::Uuid;
use vma_writer::vma::{DevId, FormatError, Header, Reader, WriterBuilder};

/// 64 KiB.
pub const CLUSTER: usize = 65536;
/// 4 KiB.
pub const BLOCK: usize = 4096;
/// Fixed part of the archive header.
pub const FIXED_HEADER: usize = 12288;
/// Extent header.
pub const EXTENT_HEADER: usize = 512;

/// The uuid used by tests that need reproducible bytes.
pub const TEST_UUID: Uuid = Uuid::from_bytes([
    0x5e, 0x1f, 0x0d, 0x2c, 0x7a, 0x43, 0x4b, 0x8e, 0x9c, 0x10, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77,
]);
/// 2024-05-06 08:03:09 UTC (the date of VMA.md §13's example).
pub const TEST_CTIME: i64 = 1_714_982_589;

// ---------------------------------------------------------------- data ----

/// xorshift64*: deterministic pseudo-random bytes without the rand crate.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with non-trivial bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `len` pseudo-random bytes. Every 4 KiB block is non-zero (a zero block
/// of 4096 random bytes is impossible in practice, and we force byte 0).
pub fn random_data(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    XorShift::new(seed).fill(&mut v);
    for b in v.chunks_mut(BLOCK) {
        b[0] |= 1;
    }
    v
}

/// Random data with holes: whole zero clusters, zero 4 KiB blocks and a few
/// isolated non-zero bytes in otherwise zero blocks.
pub fn holey_data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = XorShift::new(seed);
    let mut v = random_data(len, seed ^ 0xABCD);
    for (ci, cluster) in v.chunks_mut(CLUSTER).enumerate() {
        match (ci % 4, rng.below(3)) {
            (1, _) => cluster.fill(0),
            _ => {
                for block in cluster.chunks_mut(BLOCK) {
                    match rng.below(4) {
                        0 => block.fill(0),
                        1 => {
                            block.fill(0);
                            let i = rng.below(block.len() as u64) as usize;
                            block[i] = 0x5a;
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    v
}

/// True when the 4 KiB block `i` of `data` is all zero.
pub fn block_is_zero(data: &[u8], i: usize) -> bool {
    data[i * BLOCK..((i + 1) * BLOCK).min(data.len())]
        .iter()
        .all(|&b| b == 0)
}

// ------------------------------------------------------------ archives ----

/// One device of a test archive.
#[derive(Debug, Clone)]
pub struct TestDev {
    pub name: String,
    pub data: Vec<u8>,
}

impl TestDev {
    pub fn new(name: &str, data: Vec<u8>) -> Self {
        TestDev {
            name: name.into(),
            data,
        }
    }

    pub fn clusters(&self) -> usize {
        self.data.len().div_ceil(CLUSTER)
    }

    /// In-device bytes of `cluster`.
    pub fn cluster(&self, cluster: usize) -> Bytes {
        let from = cluster * CLUSTER;
        let to = (from + CLUSTER).min(self.data.len());
        Bytes::copy_from_slice(&self.data[from..to])
    }
}

/// Builds an archive writing each device's clusters in order, device after
/// device, with a fixed uuid and ctime.
pub fn build_archive(configs: &[(&str, &[u8])], devs: &[TestDev], per_extent: usize) -> Vec<u8> {
    let order: Vec<(usize, usize)> = devs
        .iter()
        .enumerate()
        .flat_map(|(d, dev)| (0..dev.clusters()).map(move |c| (d, c)))
        .collect();
    build_archive_ordered(configs, devs, per_extent, &order)
}

/// Builds an archive writing `(device index, cluster)` in the given order.
pub fn build_archive_ordered(
    configs: &[(&str, &[u8])],
    devs: &[TestDev],
    per_extent: usize,
    order: &[(usize, usize)],
) -> Vec<u8> {
    let mut b = WriterBuilder::new()
        .uuid(TEST_UUID)
        .ctime(TEST_CTIME)
        .clusters_per_extent(per_extent)
        .expect("valid clusters per extent");
    for (name, data) in configs {
        b.add_config(name, data).expect("add_config");
    }
    let ids: Vec<DevId> = devs
        .iter()
        .map(|d| {
            b.add_device(&d.name, d.data.len() as u64)
                .expect("add_device")
        })
        .collect();
    let mut w = b.start(Vec::new()).expect("start");
    for &(d, c) in order {
        w.write_cluster(ids[d], c as u64, devs[d].cluster(c))
            .expect("write_cluster");
    }
    w.finish().expect("finish")
}

/// Reads a whole archive and reassembles every device's bytes.
pub fn read_back(archive: &[u8]) -> Result<(Header, Vec<Vec<u8>>), FormatError> {
    let mut r = Reader::new(archive)?;
    let header = r.header().clone();
    let mut out: Vec<Vec<u8>> = header
        .devices
        .iter()
        .map(|d| vec![0xEE; d.size as usize])
        .collect();
    let index = |dev: DevId| {
        header
            .devices
            .iter()
            .position(|d| d.id == dev)
            .expect("reader hands out only known devices")
    };
    while let Some(ext) = r.next_extent()? {
        for c in ext.clusters() {
            let buf = &mut out[index(c.dev)];
            let at = c.device_offset() as usize;
            c.expand_into(&mut buf[at..at + c.len]);
        }
    }
    Ok((header, out))
}

/// Reads a whole archive like [`read_back`] but without keeping the
/// devices: each cluster is expanded into a 64 KiB scratch buffer, so a
/// corrupt device size cannot make the test allocate it.
pub fn walk(archive: &[u8]) -> Result<u64, FormatError> {
    let mut r = Reader::new(archive)?;
    let mut scratch = vec![0u8; CLUSTER];
    let mut clusters = 0;
    while let Some(ext) = r.next_extent()? {
        for c in ext.clusters() {
            c.expand_into(&mut scratch);
            clusters += 1;
        }
    }
    Ok(clusters)
}

/// Header size field of an archive.
pub fn header_size(archive: &[u8]) -> usize {
    be32(archive, 56) as usize
}

/// Offsets of every extent of a well-formed archive.
pub fn extent_offsets(archive: &[u8]) -> Vec<usize> {
    let mut at = header_size(archive);
    let mut out = Vec::new();
    while at < archive.len() {
        out.push(at);
        let blocks = u16::from_be_bytes([archive[at + 6], archive[at + 7]]) as usize;
        at += EXTENT_HEADER + blocks * BLOCK;
    }
    assert_eq!(
        at,
        archive.len(),
        "archive does not end at an extent boundary"
    );
    out
}

pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Recomputes the archive header md5 (§4.1) after an edit.
pub fn reseal_header(archive: &mut [u8]) {
    let hs = header_size(archive);
    reseal_header_len(archive, hs);
}

/// Recomputes the header md5 over the first `hs` bytes (for headers whose
/// `header_size` field was itself edited).
pub fn reseal_header_len(archive: &mut [u8], hs: usize) {
    let hs = hs.min(archive.len());
    archive[32..48].fill(0);
    let d = md5::compute(&archive[..hs]);
    archive[32..48].copy_from_slice(&d.0);
}

/// Recomputes the md5 of the extent header at `at` (§4.2) after an edit.
pub fn reseal_extent(archive: &mut [u8], at: usize) {
    archive[at + 24..at + 40].fill(0);
    let d = md5::compute(&archive[at..at + EXTENT_HEADER]);
    archive[at + 24..at + 40].copy_from_slice(&d.0);
}

/// Archive offset of blockinfo slot `slot` of the extent at `at`.
pub fn blockinfo_at(at: usize, slot: usize) -> usize {
    at + 40 + 8 * slot
}

/// Reads blockinfo `slot` of the extent at `at`: (mask, dev, cluster).
pub fn blockinfo(archive: &[u8], at: usize, slot: usize) -> (u16, u8, u32) {
    let p = blockinfo_at(at, slot);
    let v = u64::from_be_bytes(archive[p..p + 8].try_into().unwrap());
    ((v >> 48) as u16, (v >> 32) as u8, v as u32)
}

/// Writes blockinfo `slot` of the extent at `at` (does not reseal).
pub fn set_blockinfo(archive: &mut [u8], at: usize, slot: usize, bi: (u16, u8, u32)) {
    let p = blockinfo_at(at, slot);
    let v = (u64::from(bi.0) << 48) | (u64::from(bi.1) << 32) | u64::from(bi.2);
    archive[p..p + 8].copy_from_slice(&v.to_be_bytes());
}

/// Finds the absolute offset of the blob whose data is exactly `data`
/// (searches the blob area for the 2-byte LE length + data).
pub fn find_blob(archive: &[u8], data: &[u8]) -> usize {
    let mut needle = (data.len() as u16).to_le_bytes().to_vec();
    needle.extend_from_slice(data);
    let hs = header_size(archive);
    archive[FIXED_HEADER..hs]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| FIXED_HEADER + p)
        .expect("blob present")
}

// ------------------------------------------------------------- the CLI ----

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vma-writer")
}

/// A temp dir plus helpers to run `vma-writer` in it (fd's `TestEnv`).
pub struct TestEnv {
    pub dir: tempfile::TempDir,
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl TestEnv {
    pub fn new() -> Self {
        TestEnv {
            dir: tempfile::Builder::new()
                .prefix("vma-tests-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes a file (relative to the env) and returns its path.
    pub fn write(&self, rel: impl AsRef<Path>, data: &[u8]) -> PathBuf {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, data).unwrap();
        p
    }

    /// A command for the binary, cwd = the env, TZ=UTC, no RUST_LOG.
    pub fn cmd<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = Command::new(bin());
        c.args(args)
            .current_dir(self.dir.path())
            .env("TZ", "UTC")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        c
    }

    /// Runs with `stdin` as input.
    pub fn run_stdin<I, S>(&self, args: I, stdin: &[u8]) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.cmd(args);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn vma-writer");
        let mut sin = child.stdin.take().unwrap();
        let data = stdin.to_vec();
        let feeder = std::thread::spawn(move || {
            // The tool may stop reading early on an error: ignore EPIPE.
            let _ = sin.write_all(&data);
        });
        let out = child.wait_with_output().expect("wait vma-writer");
        feeder.join().unwrap();
        out
    }

    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd(args).output().expect("run vma-writer")
    }

    /// Runs and requires exit status 0; returns stdout.
    pub fn ok<I, S>(&self, args: I) -> Vec<u8>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let out = self.run(&args);
        assert_success(&out, &args);
        out.stdout
    }

    /// Runs and requires failure; returns stderr as text.
    pub fn fails<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let out = self.run(&args);
        assert_failure(&out, &args)
    }

    /// Runs the binary; requires a usage error (exit 2); returns stderr.
    pub fn fails_usage<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let out = self.run(&args);
        assert_usage_error(&out, &args)
    }
}

pub fn assert_success(out: &Output, what: &dyn std::fmt::Debug) {
    assert!(
        out.status.success(),
        "{what:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Requires a non-zero exit and a non-empty, readable error on stderr.
pub fn assert_failure(out: &Output, what: &dyn std::fmt::Debug) -> String {
    assert!(
        !out.status.success(),
        "{what:?} unexpectedly succeeded; stdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1), "{what:?}: exit status");
    let err = String::from_utf8(out.stderr.clone()).expect("stderr is UTF-8");
    assert!(
        err.contains("error:"),
        "{what:?}: stderr has no error message: {err:?}"
    );
    err
}

/// Requires a usage error: exit status 2 (clap's), with a message.
pub fn assert_usage_error(out: &Output, what: &dyn std::fmt::Debug) -> String {
    assert_eq!(out.status.code(), Some(2), "{what:?}: exit status");
    let err = String::from_utf8(out.stderr.clone()).expect("stderr is UTF-8");
    assert!(
        err.contains("error:"),
        "{what:?}: no error message: {err:?}"
    );
    err
}

/// Every path under `dir`, relative, sorted.
pub fn tree(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            out.push(p.strip_prefix(base).unwrap().to_path_buf());
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}
