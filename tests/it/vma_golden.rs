//! Golden vectors (`format/golden/`): small archives generated
//! deterministically (fixed uuid, ctime and pseudo-random content), committed
//! as binary files with their index (`NAME.vma.index`, `format/INDEX.md`),
//! their expected `list` output (`NAME.list`, UTC) and the sha256 of every
//! extracted drive (`NAME.sha256`); `worked-example` also as a seekable
//! `.vma.zst`. Any change to the bytes the writer produces, to the index,
//! to `list`, or to extraction fails here.
//!
//! Regenerate deliberately with `VMA_WRITER_BLESS=1 cargo test --release --test it
//! vma_golden` (see `format/golden/README.md`).

use std::path::{Path, PathBuf};

use crate::support::*;
use sha2::{Digest, Sha256};
use uuid::Uuid;
use vma_writer::archive::RandomArchive;
use vma_writer::sink::{Sink, SinkOptions, Target};
use vma_writer::vma::index::stored_digest;
use vma_writer::vma::{ArchiveIndex, DevId, Reader, Writer, WriterBuilder};

const BLESS_ENV: &str = "VMA_WRITER_BLESS";

/// Where the golden files are read (and blessed) instead of
/// `format/golden/`: lets a blessing run write new files elsewhere for
/// review.
const DIR_ENV: &str = "VMA_WRITER_GOLDEN_DIR";

struct Golden {
    name: &'static str,
    uuid: Uuid,
    ctime: i64,
    /// C ctime() of `ctime` in UTC, written out by hand.
    ctime_utc: &'static str,
    per_extent: usize,
    configs: Vec<(&'static str, Vec<u8>)>,
    devs: Vec<TestDev>,
    /// (device index, cluster) in submission order.
    order: Vec<(usize, usize)>,
}

fn sequential(devs: &[TestDev]) -> Vec<(usize, usize)> {
    devs.iter()
        .enumerate()
        .flat_map(|(d, dev)| (0..dev.clusters()).map(move |c| (d, c)))
        .collect()
}

/// Round-robin over devices: d0 c0, d1 c0, d0 c1, d1 c1, ...
fn interleaved(devs: &[TestDev]) -> Vec<(usize, usize)> {
    let max = devs.iter().map(|d| d.clusters()).max().unwrap_or(0);
    (0..max)
        .flat_map(|c| {
            devs.iter()
                .enumerate()
                .filter(move |(_, d)| c < d.clusters())
                .map(move |(i, _)| (i, c))
        })
        .collect()
}

/// A 417-byte qemu-server.conf, as in VMA.md §14.
fn worked_example_config() -> Vec<u8> {
    let mut c = b"boot: order=scsi0\ncores: 2\nmemory: 2048\nname: golden\n\
        net0: virtio=BC:24:11:00:00:01,bridge=vmbr0\nostype: l26\n\
        scsi0: local:100/vm-100-disk-0.raw,size=75264\nscsihw: virtio-scsi-single\n"
        .to_vec();
    while c.len() < 416 {
        c.push(b'#');
    }
    c.push(b'\n');
    assert_eq!(c.len(), 417);
    c
}

/// VMA.md §14: 75264 bytes; cluster 0 has data in every block; cluster 1:
/// block 0 data, block 1 zero, block 2 data in its 1536 in-device bytes.
fn worked_example_drive() -> Vec<u8> {
    let mut d = random_data(75264, 14);
    d[CLUSTER + BLOCK..CLUSTER + 2 * BLOCK].fill(0);
    d
}

fn goldens() -> Vec<Golden> {
    let sectors = sector_sizes_devs();
    let ex = vec![TestDev::new("drive-scsi0", worked_example_drive())];

    let two = vec![
        TestDev::new("drive-scsi0", holey_data(3 * CLUSTER + 1000, 2)),
        TestDev::new("drive-virtio1", vec![0; 3 * 1024 * 1024 + 512]),
    ];

    let mut big = vec![0u8; 100 * CLUSTER + 3 * 1024];
    let mut rng = XorShift::new(3);
    for (cluster, block) in [
        (0, 0),
        (0, 15),
        (57, 3),
        (58, 0),
        (59, 9),
        (77, 1),
        (100, 0),
    ] {
        let at = cluster * CLUSTER + block * BLOCK;
        let end = (at + BLOCK).min(big.len());
        rng.fill(&mut big[at..end]);
    }
    let three = vec![
        TestDev::new("drive-scsi0", big),
        TestDev::new("drive-efidisk0", vec![0x42]),
    ];

    vec![
        Golden {
            name: "worked-example",
            uuid: TEST_UUID,
            ctime: TEST_CTIME,
            ctime_utc: "Mon May  6 08:03:09 2024",
            per_extent: 58,
            configs: vec![("qemu-server.conf", worked_example_config())],
            order: sequential(&ex),
            devs: ex,
        },
        Golden {
            name: "two-devices",
            uuid: Uuid::from_bytes(*b"two-devices-uuid"),
            ctime: 1_700_000_000,
            ctime_utc: "Tue Nov 14 22:13:20 2023",
            per_extent: 58,
            configs: vec![],
            order: interleaved(&two),
            devs: two,
        },
        Golden {
            name: "three-configs-59",
            uuid: Uuid::from_bytes(*b"3cfg-59-clusters"),
            ctime: 1_234_567_890,
            ctime_utc: "Fri Feb 13 23:31:30 2009",
            per_extent: 59,
            configs: vec![
                ("qemu-server.conf", b"cores: 1\nmemory: 512\n".to_vec()),
                ("qemu-server.fw", b"[OPTIONS]\nenable: 1\n".to_vec()),
                ("notes.bin", (0..=255u8).rev().collect()),
            ],
            order: {
                // Reverse order: the reader must not care.
                let mut o = sequential(&three);
                o.reverse();
                o
            },
            devs: three,
        },
        Golden {
            name: "sector-sizes",
            uuid: Uuid::from_bytes(*b"sector-sizes-vma"),
            ctime: 1_767_225_600,
            ctime_utc: "Thu Jan  1 00:00:00 2026",
            per_extent: 58,
            configs: vec![("qemu-server.conf", b"sata0: local:100/a.raw\n".to_vec())],
            order: sequential(&sectors),
            devs: sectors,
        },
    ]
}

/// `create`'s device sizes for raw images of 1, 511, 4097, 4600, 65537,
/// 66047, 69633 and 1 MiB + 70000 bytes: each rounded up to 512, the
/// source's bytes (data in its first block and up to its last byte), then
/// zeros. These are the sizes Proxmox's `vma` could not read unrounded.
fn sector_sizes_devs() -> Vec<TestDev> {
    let sources = [1, 511, 4097, 4600, 65537, 66047, 69633, 1024 * 1024 + 70000];
    sources
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let mut rng = XorShift::new(40 + i as u64);
            let mut d = vec![0u8; len];
            let head = len.min(BLOCK);
            rng.fill(&mut d[..head]);
            let tail = len.saturating_sub(1000).max(head);
            rng.fill(&mut d[tail..]);
            d.resize(len.next_multiple_of(512), 0);
            TestDev::new(&format!("drive-sata{i}"), d)
        })
        .collect()
}

/// The golden archive written as a seekable `.vma.zst` as well.
const SEEKABLE_GOLDEN: &str = "worked-example";

impl Golden {
    fn build(&self) -> Vec<u8> {
        self.build_indexed().0
    }

    /// The archive and its index, as `create` writes them to a `.vma`.
    fn build_indexed(&self) -> (Vec<u8>, Vec<u8>) {
        let mut w = self.builder().index(true).start(Vec::new()).unwrap();
        self.write_clusters(&mut w);
        let (archive, index) = w.finish_indexed().unwrap();
        (archive, index.expect("an indexed writer returns its index"))
    }

    /// The archive as a seekable `.vma.zst` (one compression thread, so
    /// the bytes do not depend on the machine).
    fn build_seekable(&self) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.vma.zst");
        let opts = SinkOptions {
            zstd_level: Some(3),
            threads: 1,
            keep_partial: false,
            size_bound: None,
        };
        let sink = Sink::create(&Target::File(path.clone()), &opts).unwrap();
        let mut w = self.builder().index(true).start(sink).unwrap();
        self.write_clusters(&mut w);
        let (sink, index) = w.finish_indexed().unwrap();
        sink.commit(index.as_deref()).unwrap();
        std::fs::read(path).unwrap()
    }

    fn write_clusters<W: vma_writer::vma::ArchiveOut>(&self, w: &mut Writer<W>) {
        for &(d, c) in &self.order {
            w.write_cluster(DevId(d as u8 + 1), c as u64, self.devs[d].cluster(c))
                .unwrap();
        }
    }

    fn builder(&self) -> WriterBuilder {
        let mut b = WriterBuilder::new()
            .uuid(self.uuid)
            .ctime(self.ctime)
            .clusters_per_extent(self.per_extent)
            .unwrap();
        for (n, d) in &self.configs {
            b.add_config(n, d).unwrap();
        }
        for (i, d) in self.devs.iter().enumerate() {
            let id = b.add_device(&d.name, d.data.len() as u64).unwrap();
            assert_eq!(id, DevId(i as u8 + 1));
        }
        b
    }

    /// The expected `list` output, written out from the inputs (not from
    /// the CLI), with the hand-written UTC ctime.
    fn list(&self) -> String {
        let mut s = String::new();
        for (n, d) in &self.configs {
            s += &format!("CFG: size: {} name: {n}\n", d.len());
        }
        for (i, d) in self.devs.iter().enumerate() {
            s += &format!(
                "DEV: dev_id={} size: {} devname: {}\n",
                i + 1,
                d.data.len(),
                d.name
            );
        }
        s += &format!("CTIME: {}\n", self.ctime_utc);
        s
    }

    /// `<hex>  disk-NAME.raw` per drive, from the source data.
    fn sha256(&self) -> String {
        self.devs
            .iter()
            .map(|d| format!("{}  disk-{}.raw\n", sha256_hex(&d.data), d.name))
            .collect()
    }
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn golden_dir() -> PathBuf {
    match std::env::var_os(DIR_ENV) {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("format/golden"),
    }
}

fn blessing() -> bool {
    std::env::var(BLESS_ENV).as_deref() == Ok("1")
}

/// With VMA_WRITER_BLESS=1, (re)writes every golden file, once per run,
/// before any test reads them.
fn bless_once() {
    static BLESS: std::sync::Once = std::sync::Once::new();
    BLESS.call_once(|| {
        if !blessing() {
            return;
        }
        std::fs::create_dir_all(golden_dir()).unwrap();
        for g in goldens() {
            let w = |ext: &str, data: &[u8]| {
                std::fs::write(golden_dir().join(format!("{}.{ext}", g.name)), data).unwrap()
            };
            let (archive, index) = g.build_indexed();
            w("vma", &archive);
            w("vma.index", &index);
            if g.name == SEEKABLE_GOLDEN {
                w("vma.zst", &g.build_seekable());
            }
            w("list", g.list().as_bytes());
            w("sha256", g.sha256().as_bytes());
        }
        eprintln!(
            "{BLESS_ENV}=1: rewrote the files in {}",
            golden_dir().display()
        );
    });
}

/// Reads a committed golden file.
fn golden_file(name: &str) -> Vec<u8> {
    bless_once();
    let p = golden_dir().join(name);
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; generate it with {BLESS_ENV}=1 cargo test --release --test it vma_golden",
            p.display()
        )
    })
}

#[test]
fn golden_archives_are_reproduced_byte_for_byte() {
    for g in goldens() {
        let fresh = g.build();
        assert!(
            fresh.len() <= 300 * 1024,
            "{}: {} bytes",
            g.name,
            fresh.len()
        );
        let committed = golden_file(&format!("{}.vma", g.name));
        if committed != fresh {
            let first = committed
                .iter()
                .zip(&fresh)
                .position(|(a, b)| a != b)
                .unwrap_or(committed.len().min(fresh.len()));
            panic!(
                "{}.vma: the writer's output changed (lengths {} vs {}, first difference at byte {first}); \
                 if intended, regenerate with {BLESS_ENV}=1",
                g.name,
                committed.len(),
                fresh.len()
            );
        }
        // The committed archive decodes back to the sources.
        let (h, devs) = read_back(&committed).unwrap();
        assert_eq!((h.uuid, h.ctime), (g.uuid, g.ctime));
        for (got, want) in devs.iter().zip(&g.devs) {
            assert!(*got == want.data, "{}: {} differs", g.name, want.name);
        }
    }
}

#[test]
fn golden_list_output() {
    for g in goldens() {
        let want = golden_file(&format!("{}.list", g.name));
        let env = TestEnv::new();
        let archive = golden_dir().join(format!("{}.vma", g.name));
        let out = env.ok([std::ffi::OsStr::new("list"), archive.as_os_str()]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            String::from_utf8(want).unwrap(),
            "{}: list output",
            g.name
        );
    }
}

#[test]
fn golden_extract_sha256() {
    for g in goldens() {
        let want = golden_file(&format!("{}.sha256", g.name));
        let archive = golden_dir().join(format!("{}.vma", g.name));
        g.check_extract(&archive, &String::from_utf8(want).unwrap());
    }
}

impl Golden {
    /// `extract` of `archive` gives drives whose sha256 are `sha256` (the
    /// `NAME.sha256` format) and the configs; `verify` passes.
    fn check_extract(&self, archive: &Path, sha256: &str) {
        let env = TestEnv::new();
        env.ok([
            std::ffi::OsStr::new("extract"),
            archive.as_os_str(),
            std::ffi::OsStr::new("out"),
        ]);
        let mut lines = 0;
        for line in sha256.lines() {
            let (hex, file) = line.split_once("  ").expect("<hex>  <file>");
            let data = std::fs::read(env.path("out").join(file)).unwrap();
            assert_eq!(sha256_hex(&data), hex, "{}: {file}", self.name);
            lines += 1;
        }
        assert_eq!(
            lines,
            self.devs.len(),
            "{}.sha256: one line per drive",
            self.name
        );
        for (name, data) in &self.configs {
            assert_eq!(
                std::fs::read(env.path("out").join(name)).unwrap(),
                *data,
                "{}: config {name}",
                self.name
            );
        }
        assert_eq!(
            tree(&env.path("out")).len(),
            self.devs.len() + self.configs.len(),
            "{}: extracted files",
            self.name
        );
        env.ok([std::ffi::OsStr::new("verify"), archive.as_os_str()]);
    }
}

/// The committed worked-example archive against VMA.md §14, field by field.
#[test]
fn worked_example_matches_vma_md_section_14() {
    let a = golden_file("worked-example.vma");
    let be32 = |at: usize| u32::from_be_bytes(a[at..at + 4].try_into().unwrap());

    // §14.2 header fields.
    assert_eq!(a[0..4], [0x56, 0x4D, 0x41, 0x00]);
    assert_eq!(a[4..8], [0, 0, 0, 1]);
    assert_eq!(a[8..24], *TEST_UUID.as_bytes());
    assert_eq!(a[24..32], TEST_CTIME.to_be_bytes());
    assert_eq!(a[48..52], [0x00, 0x00, 0x30, 0x00], "blob_buffer_offset");
    assert_eq!(a[52..56], [0x00, 0x00, 0x01, 0xC5], "blob_buffer_size 453");
    assert_eq!(a[56..60], [0x00, 0x00, 0x32, 0x00], "header_size 12800");
    assert_eq!(a[2044..2048], [0, 0, 0, 1], "config_names[0]");
    assert_eq!(a[3068..3072], [0, 0, 0, 0x14], "config_data[0]");
    assert_eq!(a[4128..4132], [0, 0, 0x01, 0xB7], "dev_info[1].devname_ptr");
    assert_eq!(a[4136..4144], [0, 0, 0, 0, 0, 0x01, 0x26, 0x00], "size");
    // "All other bytes below 12288 are zero."
    let fields = [
        0..8,
        8..24,
        24..32,
        32..48,
        48..60,
        2044..2048,
        3068..3072,
        4128..4132,
        4136..4144,
    ];
    for (i, b) in a[..12288].iter().enumerate() {
        if !fields.iter().any(|r| r.contains(&i)) {
            assert_eq!(*b, 0, "byte {i} of the fixed header");
        }
    }
    // md5 of [0, 12800) with the md5 field zeroed.
    let mut h = a[..12800].to_vec();
    h[32..48].fill(0);
    assert_eq!(a[32..48], md5::compute(&h).0);

    // §14.1 blob area.
    assert_eq!(a[12288], 0, "unused byte 0");
    assert_eq!(a[12289..12291], [0x11, 0x00]);
    assert_eq!(&a[12291..12308], b"qemu-server.conf\0");
    assert_eq!(a[12308..12310], [0xA1, 0x01]);
    assert_eq!(a[12310..12727], worked_example_config());
    assert_eq!(a[12727..12729], [0x0C, 0x00]);
    assert_eq!(&a[12729..12741], b"drive-scsi0\0");
    assert!(a[12741..12800].iter().all(|&b| b == 0), "59 bytes of slack");

    // §14.3 the extent.
    let e = 12800;
    assert_eq!(a[e..e + 8], [0x56, 0x4D, 0x41, 0x45, 0, 0, 0x00, 0x12]);
    assert_eq!(a[e + 8..e + 24], *TEST_UUID.as_bytes());
    let mut eh = a[e..e + 512].to_vec();
    eh[24..40].fill(0);
    assert_eq!(a[e + 24..e + 40], md5::compute(&eh).0, "extent md5");
    assert_eq!(a[e + 40..e + 48], [0xFF, 0xFF, 0, 1, 0, 0, 0, 0], "slot 0");
    assert_eq!(a[e + 48..e + 56], [0x00, 0x05, 0, 1, 0, 0, 0, 1], "slot 1");
    assert!(a[e + 56..e + 512].iter().all(|&b| b == 0), "slots 2..58");
    assert_eq!(be32(56), 12800);

    // Payload (file offsets).
    let d = worked_example_drive();
    assert_eq!(a[13312..78848], d[0..65536], "cluster 0");
    assert_eq!(a[78848..82944], d[65536..69632], "cluster 1 block 0");
    assert_eq!(a[82944..84480], d[73728..75264], "cluster 1 block 2");
    assert!(a[84480..87040].iter().all(|&b| b == 0), "padding");
    assert_eq!(a.len(), 87040);
}

/// The 59-per-extent golden really uses slot 58, and the two-device golden
/// interleaves its devices inside one extent.
#[test]
fn golden_archive_shapes() {
    let a = golden_file("three-configs-59.vma");
    let exts = extent_offsets(&a);
    assert_eq!(exts.len(), 2);
    let used = |at: usize| (0..59).filter(|&s| blockinfo(&a, at, s).1 != 0).count();
    assert_eq!((used(exts[0]), used(exts[1])), (59, 43));
    // Submitted in reverse: the first entry is drive-efidisk0's only
    // cluster (1 byte: mask 0x0001), then drive-scsi0 from cluster 100 down.
    assert_eq!(blockinfo(&a, exts[0], 0), (0x0001, 2, 0));
    assert_eq!(blockinfo(&a, exts[0], 1), (0x0001, 1, 100));
    assert_eq!(blockinfo(&a, exts[1], 42), (0x8001, 1, 0));

    let a = golden_file("two-devices.vma");
    let exts = extent_offsets(&a);
    assert_eq!(exts.len(), 1);
    let devs: Vec<u8> = (0..8).map(|s| blockinfo(&a, exts[0], s).1).collect();
    assert_eq!(devs, [1, 2, 1, 2, 1, 2, 1, 2]);
    // 49 zero clusters of drive-virtio1 have mask 0.
    let zero = (0..59)
        .map(|s| blockinfo(&a, exts[0], s))
        .filter(|b| b.1 == 2)
        .inspect(|b| assert_eq!(b.0, 0))
        .count();
    assert_eq!(zero, 49);
}

/// Every golden archive's index (`format/INDEX.md`) is reproduced byte for
/// byte, decodes, names its archive, and locates every cluster where the
/// archive has it, with the digest of its restored bytes.
#[test]
fn golden_indexes_are_reproduced_and_locate_every_cluster() {
    for g in goldens() {
        let (archive, fresh) = g.build_indexed();
        let committed = golden_file(&format!("{}.vma.index", g.name));
        assert!(
            committed == fresh,
            "{}.vma.index: the index changed; if intended, regenerate with {BLESS_ENV}=1",
            g.name
        );
        let index = ArchiveIndex::decode(&committed).unwrap();
        let mut r = Reader::new(&archive[..]).unwrap();
        index
            .check_archive(r.header(), Some(archive.len() as u64))
            .unwrap();
        assert!(!index.framed && index.has_digests());
        let mut extents = 0;
        while let Some(ext) = r.next_extent().unwrap() {
            assert_eq!(
                index.extents[extents].stream_offset, ext.offset,
                "{}",
                g.name
            );
            extents += 1;
            for c in ext.clusters() {
                let at = index.locate(c.dev, c.cluster).unwrap();
                assert_eq!(at.mask, c.mask);
                let stored = &archive[at.stream_offset as usize..][..c.stored.len()];
                assert_eq!(stored, c.stored, "{}: cluster {}", g.name, c.cluster);
                let want = (c.mask != 0).then(|| stored_digest(c.mask, c.stored, c.len));
                assert_eq!(
                    at.digest, want,
                    "{}: digest of cluster {}",
                    g.name, c.cluster
                );
            }
        }
        assert_eq!(extents, index.extents.len());
    }
}

/// The seekable golden `.vma.zst` is reproduced byte for byte, `zstd -d`
/// gives the plain golden archive, and it reads at random to the sources.
#[test]
fn golden_seekable_archive() {
    let g = goldens()
        .into_iter()
        .find(|g| g.name == SEEKABLE_GOLDEN)
        .unwrap();
    let committed = golden_file(&format!("{SEEKABLE_GOLDEN}.vma.zst"));
    assert!(
        committed == g.build_seekable(),
        "{SEEKABLE_GOLDEN}.vma.zst changed; if intended, regenerate with {BLESS_ENV}=1"
    );
    assert_eq!(
        zstd::decode_all(&committed[..]).unwrap(),
        golden_file(&format!("{SEEKABLE_GOLDEN}.vma"))
    );
    let path = golden_dir().join(format!("{SEEKABLE_GOLDEN}.vma.zst"));
    let a = RandomArchive::open(path.to_str().unwrap()).unwrap();
    assert!(a.index().framed && a.has_digests());
    for (i, d) in g.devs.iter().enumerate() {
        for c in 0..d.clusters() {
            let got = a.read_cluster(DevId(i as u8 + 1), c as u64).unwrap();
            let mut out = vec![0u8; got.len];
            got.data().expand_into(&mut out);
            assert_eq!(out, d.cluster(c).to_vec(), "cluster {c}");
        }
    }
}
