//! Property tests of the writer and reader together: random devices (sizes
//! that are not multiples of 64 KiB, 4 KiB or 512 B), contents with zero
//! blocks and zero clusters, clusters submitted in random orders interleaved
//! across devices, random clusters per extent and extra `flush_extent`
//! calls. The reader must give back exactly what went in, the header must
//! round-trip, and cutting the archive at any extent boundary must fail with
//! `Incomplete`.

use std::collections::BTreeMap;

use crate::support::*;
use bytes::Bytes;
use proptest::prelude::*;
use uuid::Uuid;
use vma_writer::vma::{DevId, FormatError, Header, Reader, WriterBuilder};

/// A device size: whole clusters plus an awkward tail.
fn size_strategy() -> impl Strategy<Value = usize> {
    let tail = prop_oneof![
        Just(0usize),
        Just(1),
        Just(511),
        Just(512),
        Just(1536),
        Just(4095),
        Just(4096),
        Just(4097),
        Just(65535),
        1usize..65536,
    ];
    (0usize..5, tail).prop_map(|(c, t)| (c * CLUSTER + t).max(1))
}

/// Device content from a seed: each cluster is zero, random, or a mix of
/// zero blocks, random blocks and blocks with a single non-zero byte.
fn content(size: usize, seed: u64, zero_pct: u64) -> Vec<u8> {
    let mut rng = XorShift::new(seed);
    let mut v = vec![0u8; size];
    for cluster in v.chunks_mut(CLUSTER) {
        match rng.below(4) {
            0 => {} // zero cluster
            1 => rng.fill(cluster),
            _ => {
                for block in cluster.chunks_mut(BLOCK) {
                    if rng.below(100) < zero_pct {
                        continue;
                    }
                    if rng.below(3) == 0 {
                        let i = rng.below(block.len() as u64) as usize;
                        block[i] = 1 + rng.below(255) as u8;
                    } else {
                        rng.fill(block);
                    }
                }
            }
        }
    }
    v
}

#[derive(Debug, Clone)]
struct Case {
    configs: Vec<(String, Vec<u8>)>,
    devs: Vec<TestDev>,
    /// (device index, cluster) in submission order.
    order: Vec<(usize, usize)>,
    per_extent: usize,
    /// Call flush_extent after submission i when flush[i].
    flush: Vec<bool>,
    /// Submit all-zero clusters with write_zero_cluster (else write_cluster).
    zero_api: bool,
    uuid: [u8; 16],
    ctime: i64,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let devs = proptest::collection::vec((size_strategy(), any::<u64>(), 0u64..100), 1..5);
    let configs = proptest::collection::vec(
        (
            "[a-z][a-z0-9._-]{0,20}",
            proptest::collection::vec(any::<u8>(), 0..600),
        ),
        0..4,
    );
    (
        devs,
        configs,
        1usize..=59,
        any::<bool>(),
        any::<[u8; 16]>(),
        any::<i64>(),
    )
        .prop_flat_map(|(devs, configs, per_extent, zero_api, uuid, ctime)| {
            let devs: Vec<TestDev> = devs
                .iter()
                .enumerate()
                .map(|(i, &(size, seed, zp))| {
                    TestDev::new(&format!("drive-scsi{i}"), content(size, seed, zp))
                })
                .collect();
            // Config names must be unique.
            let mut seen = std::collections::HashSet::new();
            let configs: Vec<(String, Vec<u8>)> = configs
                .into_iter()
                .filter(|(n, _)| seen.insert(n.clone()))
                .collect();
            let order: Vec<(usize, usize)> = devs
                .iter()
                .enumerate()
                .flat_map(|(d, dev)| (0..dev.clusters()).map(move |c| (d, c)))
                .collect();
            let n = order.len();
            (
                Just(devs),
                Just(configs),
                Just(order).prop_shuffle(),
                Just(per_extent),
                proptest::collection::vec(proptest::bool::weighted(0.1), n),
                Just(zero_api),
                Just(uuid),
                Just(ctime),
            )
        })
        .prop_map(
            |(devs, configs, order, per_extent, flush, zero_api, uuid, ctime)| Case {
                configs,
                devs,
                order,
                per_extent,
                flush,
                zero_api,
                uuid,
                ctime,
            },
        )
}

/// Writes the case; returns the archive and the expected header.
fn write(case: &Case) -> (Vec<u8>, Header) {
    let mut b = WriterBuilder::new()
        .uuid(Uuid::from_bytes(case.uuid))
        .ctime(case.ctime)
        .clusters_per_extent(case.per_extent)
        .unwrap();
    for (n, d) in &case.configs {
        b.add_config(n, d).unwrap();
    }
    let ids: Vec<DevId> = case
        .devs
        .iter()
        .map(|d| b.add_device(&d.name, d.data.len() as u64).unwrap())
        .collect();
    let header = b.header();
    let mut w = b.start(Vec::new()).unwrap();
    for (i, &(d, c)) in case.order.iter().enumerate() {
        let data = case.devs[d].cluster(c);
        if case.zero_api && data.iter().all(|&x| x == 0) {
            w.write_zero_cluster(ids[d], c as u64).unwrap();
        } else {
            let mask = w.write_cluster(ids[d], c as u64, data.clone()).unwrap();
            assert_eq!(mask, expected_mask(&data), "mask returned by write_cluster");
        }
        if case.flush[i] {
            w.flush_extent().unwrap();
        }
    }
    (w.finish().unwrap(), header)
}

fn expected_mask(data: &Bytes) -> u16 {
    let mut m = 0u16;
    for (i, b) in data.chunks(BLOCK).enumerate() {
        if b.iter().any(|&x| x != 0) {
            m |= 1 << i;
        }
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn reader_returns_exactly_what_the_writer_got(case in case_strategy()) {
        let (archive, header) = write(&case);

        // Header round trip, through the pure codec and through the reader.
        let hs = header_size(&archive);
        prop_assert_eq!(hs % 512, 0);
        prop_assert_eq!(&Header::decode(&archive[..hs]).unwrap(), &header);
        prop_assert_eq!(&header.encode().unwrap()[..], &archive[..hs]);
        prop_assert_eq!(header.uuid, Uuid::from_bytes(case.uuid));
        prop_assert_eq!(header.ctime, case.ctime);

        // Cluster by cluster: same order, masks, lengths and extent sizes.
        let mut r = Reader::new(&archive[..]).unwrap();
        prop_assert_eq!(r.header(), &header);
        let mut seen = Vec::new();
        let mut extents = Vec::new();
        let mut out: Vec<Vec<u8>> = case.devs.iter().map(|d| vec![0xEE; d.data.len()]).collect();
        while let Some(ext) = r.next_extent().unwrap() {
            prop_assert!(ext.len() <= case.per_extent);
            // Flushing is lazy, so the only empty extent is the one finish()
            // writes after an explicit flush_extent() of the last cluster.
            if ext.is_empty() {
                prop_assert_eq!(seen.len(), case.order.len());
                prop_assert!(*case.flush.last().unwrap());
            }
            extents.push((ext.offset as usize, ext.len()));
            for c in ext.clusters() {
                let d = c.dev.0 as usize - 1;
                let src = case.devs[d].cluster(c.cluster as usize);
                prop_assert_eq!(c.len, src.len());
                prop_assert_eq!(c.mask, expected_mask(&src));
                prop_assert_eq!(c.stored.len(), c.mask.count_ones() as usize * BLOCK);
                // Stored blocks past the device end are zero padding.
                let mut pos = 0;
                for i in 0..16 {
                    if c.mask & (1 << i) != 0 {
                        let start = i * BLOCK;
                        let in_dev = src.len().saturating_sub(start).min(BLOCK);
                        prop_assert_eq!(&c.stored[pos..pos + in_dev], &src[start..start + in_dev]);
                        prop_assert!(c.stored[pos + in_dev..pos + BLOCK].iter().all(|&x| x == 0));
                        pos += BLOCK;
                    }
                }
                let at = c.device_offset() as usize;
                c.expand_into(&mut out[d][at..at + c.len]);
                seen.push((d, c.cluster as usize));
            }
        }
        prop_assert_eq!(&seen, &case.order, "submission order is archive order");
        for (d, dev) in case.devs.iter().enumerate() {
            prop_assert!(out[d] == dev.data, "device {} differs", d);
        }
        let stats = r.stats();
        prop_assert_eq!(stats.clusters as usize, case.order.len());
        prop_assert_eq!(stats.bytes as usize, case.devs.iter().map(|d| d.data.len()).sum::<usize>());

        // Extents are back to back from header_size to EOF.
        prop_assert_eq!(
            extents.iter().map(|e| e.0).collect::<Vec<_>>(),
            extent_offsets(&archive)
        );

        // Cut at every extent boundary but the end: Incomplete, counting
        // exactly the clusters of the missing extents.
        let mut before = 0usize;
        for &(at, n) in &extents {
            if before == case.order.len() {
                // Only the trailing empty extent is cut off: still complete.
                prop_assert!(read_back(&archive[..at]).is_ok());
                continue;
            }
            let e = read_back(&archive[..at]).err();
            let Some(FormatError::Incomplete { offset, missing }) = e else {
                return Err(TestCaseError::fail(format!("cut at {at}: {e:?}")));
            };
            prop_assert_eq!(offset as usize, at);
            let mut want: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
            for &(d, c) in &case.order[before..] {
                let e = want.entry(d).or_insert((0, u64::MAX));
                e.0 += 1;
                e.1 = e.1.min(c as u64);
            }
            let got: BTreeMap<usize, (u64, u64)> = missing
                .iter()
                .map(|m| (m.dev.0 as usize - 1, (m.missing, m.first)))
                .collect();
            prop_assert_eq!(got, want);
            before += n;
        }
        prop_assert!(read_back(&archive).is_ok());
    }
}

/// Deterministic companion: the straddling-block padding and tails at the
/// awkward sizes, each with a non-zero last byte.
#[test]
fn awkward_tails_round_trip() {
    for size in [
        1,
        511,
        512,
        513,
        4095,
        4096,
        4097,
        65535,
        65537,
        65536 + 512,
    ] {
        let mut data = vec![0u8; size];
        data[size - 1] = 0xFF;
        let devs = [TestDev::new("d", data.clone())];
        for per_extent in [1, 58, 59] {
            let a = build_archive(&[], &devs, per_extent);
            let (_, got) = read_back(&a).unwrap();
            assert_eq!(got[0], data, "size {size}");
            // Exactly one stored block: the one holding the last byte.
            let exts = extent_offsets(&a);
            let last = *exts.last().unwrap();
            let entries: Vec<(u16, u8, u32)> = (0..59)
                .map(|s| blockinfo(&a, last, s))
                .filter(|b| b.1 != 0)
                .collect();
            let (mask, dev, cluster) = *entries.last().unwrap();
            assert_eq!((dev, cluster as usize), (1, (size - 1) / CLUSTER));
            assert_eq!(mask, 1 << (((size - 1) % CLUSTER) / BLOCK), "size {size}");
            // Every other entry is a zero cluster.
            assert!(entries[..entries.len() - 1].iter().all(|b| b.0 == 0));
            assert_eq!(a.len(), last + EXTENT_HEADER + BLOCK);
        }
    }
}
