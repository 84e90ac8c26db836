//! VMA archives built with the library, read back with it, and edited
//! byte by byte (with md5 re-sealing) for the format suites.

use bytes::Bytes;
use uuid::Uuid;
use vma_writer::vma::{DevId, FormatError, Header, Reader, WriterBuilder};

use super::{BLOCK, CLUSTER};

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
