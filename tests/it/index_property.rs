//! The archive index against archives of random shape: random devices
//! (count, odd sizes), a random order of their clusters, random contents
//! (zero clusters, zero 4 KiB blocks inside data clusters, a partial last
//! cluster) and a random extent size. The index must say exactly where
//! every cluster is in the plain stream, and its digest must be that of
//! the restored bytes; the random-access reader must give back every
//! cluster from a plain `.vma` with its index, one without (mapped from
//! its extent headers) and a seekable `.vma.zst`.

use bytes::Bytes;
use proptest::prelude::*;

use vma_writer::archive::RandomArchive;
use vma_writer::sink::{Sink, SinkOptions, Target};
use vma_writer::vma::cluster::{cluster_len, clusters_of, expand_into, stored_len};
use vma_writer::vma::index::cluster_digest;
use vma_writer::vma::zero::block_mask;
use vma_writer::vma::{ArchiveIndex, DevId, WriterBuilder};

/// One cluster's content: 0 all zero, 1 full, 2 some blocks zero.
fn content(kind: u8, len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match kind {
                0 => 0,
                1 => (x as u8) | 1,
                _ if (i / 4096 + seed as usize).is_multiple_of(3) => 0,
                _ => x as u8,
            }
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Shape {
    sizes: Vec<u64>,
    /// Per cluster of all devices in order: its content kind.
    kinds: Vec<u8>,
    /// A permutation key per cluster (sorted to get the write order).
    order: Vec<u32>,
    per_extent: usize,
}

fn shape() -> impl Strategy<Value = Shape> {
    (prop::collection::vec(1u64..400_000, 1..5), 1usize..=59)
        .prop_flat_map(|(sizes, per_extent)| {
            let n: usize = sizes.iter().map(|&s| clusters_of(s) as usize).sum();
            (
                Just(sizes),
                prop::collection::vec(0u8..3, n),
                prop::collection::vec(any::<u32>(), n),
                Just(per_extent),
            )
        })
        .prop_map(|(sizes, kinds, order, per_extent)| Shape {
            sizes,
            kinds,
            order,
            per_extent,
        })
}

/// Writes the archive of `shape` through `out`; returns the index (when
/// the output holds one) and every device's content.
fn write<W: vma_writer::vma::ArchiveOut>(
    shape: &Shape,
    out: W,
) -> (W, Option<Vec<u8>>, Vec<Vec<u8>>) {
    let mut b = WriterBuilder::new()
        .index(true)
        .uuid(uuid::Uuid::from_u128(0x1234))
        .ctime(1_700_000_000)
        .clusters_per_extent(shape.per_extent)
        .unwrap();
    let mut clusters = Vec::new();
    let mut contents = Vec::new();
    for (d, &size) in shape.sizes.iter().enumerate() {
        let dev = b.add_device(&format!("d{d}"), size).unwrap();
        let mut dev_bytes = Vec::new();
        for c in 0..clusters_of(size) {
            let i = clusters.len();
            let data = content(shape.kinds[i], cluster_len(size, c), i as u64 * 7919 + 1);
            dev_bytes.extend_from_slice(&data);
            clusters.push((shape.order[i], dev, c, data));
        }
        contents.push(dev_bytes);
    }
    clusters.sort_by_key(|c| c.0);
    let mut w = b.start(out).unwrap();
    for (_, dev, c, data) in clusters {
        w.write_cluster(dev, c, Bytes::from(data)).unwrap();
    }
    let (out, index) = w.finish_indexed().unwrap();
    (out, index, contents)
}

fn check_reader(path: &std::path::Path, contents: &[Vec<u8>], digests: bool) {
    let ra = RandomArchive::open(path.to_str().unwrap()).unwrap();
    assert_eq!(ra.has_digests(), digests);
    for (d, bytes) in contents.iter().enumerate() {
        let dev = DevId(d as u8 + 1);
        for (c, want) in bytes.chunks(65536).enumerate() {
            let got = ra.read_cluster(dev, c as u64).unwrap();
            let mut out = vec![0xAA; want.len()];
            got.data().expand_into(&mut out);
            assert!(out == want, "{}: dev {dev} cluster {c}", path.display());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_index_locates_every_cluster_and_digests_match(shape in shape()) {
        let (archive, index, contents) = write(&shape, Vec::new());
        let decoded = ArchiveIndex::decode(&index.unwrap()).unwrap();
        let index = &decoded;
        prop_assert_eq!(index.stream_len, archive.len() as u64);
        for (d, bytes) in contents.iter().enumerate() {
            let dev = DevId(d as u8 + 1);
            for (c, want) in bytes.chunks(65536).enumerate() {
                let loc = index.locate(dev, c as u64).unwrap();
                prop_assert_eq!(loc.mask, block_mask(want));
                let at = loc.stream_offset as usize;
                let stored = &archive[at..at + stored_len(loc.mask)];
                let mut out = vec![0xAA; want.len()];
                expand_into(loc.mask, stored, &mut out);
                prop_assert!(out == want, "dev {} cluster {}", dev, c);
                let digest = (loc.mask != 0).then(|| cluster_digest(want));
                prop_assert_eq!(loc.digest, digest);
            }
            prop_assert!(index.locate(dev, (bytes.len() as u64).div_ceil(65536)).is_none());
        }

        // The same archive as files, read at random.
        let t = tempfile::tempdir().unwrap();
        let plain = t.path().join("a.vma");
        let opts = SinkOptions { threads: 2, ..Default::default() };
        let (sink, index, _) = write(&shape, Sink::create(&Target::File(plain.clone()), &opts).unwrap());
        sink.commit(index.as_deref()).unwrap();
        prop_assert!(std::fs::read(&plain).unwrap() == archive);
        check_reader(&plain, &contents, true);
        std::fs::remove_file(t.path().join("a.vma.index")).unwrap();
        check_reader(&plain, &contents, false);
        let mapped = RandomArchive::open(plain.to_str().unwrap()).unwrap();
        prop_assert_eq!(mapped.index().extents.len(), decoded.extents.len());
        for (x, rec) in mapped.index().extents.iter().enumerate() {
            prop_assert_eq!(&decoded.extents[x].entries, &rec.entries);
            prop_assert_eq!(decoded.extents[x].stream_offset, rec.stream_offset);
        }
        prop_assert_eq!(&mapped.index().devices, &decoded.devices);
        let zst = t.path().join("a.vma.zst");
        let opts = SinkOptions { zstd_level: Some(1), threads: 2, ..Default::default() };
        let (sink, index, _) = write(&shape, Sink::create(&Target::File(zst.clone()), &opts).unwrap());
        sink.commit(index.as_deref()).unwrap();
        prop_assert!(zstd::decode_all(&std::fs::read(&zst).unwrap()[..]).unwrap() == archive);
        check_reader(&zst, &contents, true);
    }
}
