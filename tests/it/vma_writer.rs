//! Writer behaviour seen from outside: header layout rules of VMA.md §3.4
//! (blob allocation decides `header_size`), extent packing (§9), lazy
//! flushing, failing outputs, and the writer's refusals.

use std::io::{self, Write};

use crate::support::*;
use bytes::Bytes;
use proptest::prelude::*;
use vma_writer::vma::{DevId, FormatError, WriterBuilder};

/// VMA.md §3.4 "Writer allocation", applied literally: returns
/// (blob_buffer_size, header_size) for blobs of the given lengths in order.
fn spec_allocation(lens: &[usize]) -> (usize, usize) {
    let (mut used, mut allocated) = (1usize, 0usize);
    for &l in lens {
        if allocated < used + 2 + l {
            allocated += (2 + l).div_ceil(512) * 512;
        }
        used += 2 + l;
    }
    if used > allocated {
        allocated += 512;
    }
    (used, 12288 + allocated)
}

fn header_fields(configs: &[(String, usize)], devs: &[String]) -> ((usize, usize), Vec<u8>) {
    let mut b = WriterBuilder::new().uuid(TEST_UUID).ctime(TEST_CTIME);
    let mut lens = Vec::new();
    for (name, len) in configs {
        b.add_config(name, &vec![b'x'; *len]).unwrap();
        lens.push(name.len() + 1);
        lens.push(*len);
    }
    for d in devs {
        b.add_device(d, 512).unwrap();
        lens.push(d.len() + 1);
    }
    let h = b.header().encode().unwrap();
    (spec_allocation(&lens), h)
}

#[test]
fn blob_allocation_matches_the_spec_for_known_cases() {
    // §14: one config of 417 bytes + drive-scsi0 → 453 used, 12800.
    let ((used, hs), h) =
        header_fields(&[("qemu-server.conf".into(), 417)], &["drive-scsi0".into()]);
    assert_eq!((used, hs), (453, 12800));
    assert_eq!((be32(&h, 52) as usize, be32(&h, 56) as usize), (453, 12800));
    assert_eq!(h.len(), 12800);

    // §3.4 edge case: first entry 2 + L = 512 (a 509-byte device name, no
    // configs): used = 513 > allocated = 512, so the writer adds 512.
    let ((used, hs), h) = header_fields(&[], &["a".repeat(509)]);
    assert_eq!((used, hs), (513, 13312));
    assert_eq!((be32(&h, 52) as usize, be32(&h, 56) as usize), (513, 13312));
}

#[test]
fn blob_allocation_counter_after_the_edge_case() {
    // After the edge case, `allocated` is a plain counter (§3.4): a second
    // name of 599 bytes (L = 600) adds roundup(602, 512) = 1024 to 512, so
    // header_size = 12288 + 1536, as Proxmox computes it.
    let names = ["a".repeat(509), "b".repeat(599)];
    let ((used, hs), h) = header_fields(&[], &names);
    assert_eq!((used, hs), (1115, 13824));
    assert_eq!(
        (be32(&h, 52) as usize, be32(&h, 56) as usize),
        (used, hs),
        "blob_buffer_size / header_size differ from VMA.md §3.4"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    /// header_size and blob_buffer_size follow §3.4 for any blob lengths
    /// that do not hit the 509/1021/... first-entry edge case.
    #[test]
    fn blob_allocation_matches_the_spec(
        configs in proptest::collection::vec((1usize..256, 0usize..3000), 0..4),
        devs in proptest::collection::vec(1usize..1100, 0..4),
    ) {
        prop_assume!(!configs.is_empty() || !devs.is_empty());
        // Skip the edge case (first entry 2 + L a multiple of 512).
        let first = configs.first().map(|c| c.0 + 1).or(devs.first().map(|d| d + 1)).unwrap();
        prop_assume!((2 + first) % 512 != 0);
        let configs: Vec<(String, usize)> = configs
            .iter()
            .enumerate()
            .map(|(i, &(n, l))| (format!("{i}{}", "c".repeat(n.saturating_sub(1).max(1))), l))
            .collect();
        let devs: Vec<String> = devs
            .iter()
            .enumerate()
            .map(|(i, &n)| format!("{i}{}", "d".repeat(n.saturating_sub(1).max(1))))
            .collect();
        let ((used, hs), h) = header_fields(&configs, &devs);
        prop_assert_eq!(be32(&h, 52) as usize, used);
        prop_assert_eq!(be32(&h, 56) as usize, hs);
        prop_assert_eq!(h.len(), hs);
        prop_assert!(h[12288 + used..].iter().all(|&b| b == 0), "slack is zero");
    }
}

#[test]
fn header_is_written_at_start_and_extents_are_lazy() {
    let mut b = WriterBuilder::new().uuid(TEST_UUID).ctime(TEST_CTIME);
    let d = b.add_device("d", 60 * CLUSTER as u64).unwrap();
    let mut w = b.start(Vec::new()).unwrap();
    let hs = w.header_len();
    assert_eq!(w.position(), hs);
    assert_eq!(w.get_ref().len() as u64, hs, "header written by start()");
    // 58 clusters stay pending; the 59th flushes the first extent.
    for c in 0..58 {
        w.write_zero_cluster(d, c).unwrap();
    }
    assert_eq!(
        w.get_ref().len() as u64,
        hs,
        "no extent before the 59th cluster"
    );
    w.write_zero_cluster(d, 58).unwrap();
    assert_eq!(w.get_ref().len() as u64, hs + 512);
    // flush_extent writes the pending cluster now; a second one is a no-op.
    w.flush_extent().unwrap();
    assert_eq!(w.get_ref().len() as u64, hs + 1024);
    w.flush_extent().unwrap();
    assert_eq!(w.get_ref().len() as u64, hs + 1024);
    w.write_cluster(d, 59, Bytes::from(vec![1u8; CLUSTER]))
        .unwrap();
    let a = w.finish().unwrap();
    let exts = extent_offsets(&a);
    assert_eq!(exts.len(), 3);
    let used = |at: usize| (0..59).filter(|&s| blockinfo(&a, at, s).1 != 0).count();
    assert_eq!(
        exts.iter().map(|&e| used(e)).collect::<Vec<_>>(),
        [58, 1, 1]
    );
    read_back(&a).unwrap();
}

#[test]
fn an_archive_without_devices_is_header_plus_one_empty_extent() {
    let mut b = WriterBuilder::new().uuid(TEST_UUID).ctime(TEST_CTIME);
    b.add_config("qemu-server.conf", b"x").unwrap();
    let a = b.start(Vec::new()).unwrap().finish().unwrap();
    let hs = header_size(&a);
    assert_eq!(a.len(), hs + 512);
    assert_eq!(a[hs..hs + 8], [0x56, 0x4D, 0x41, 0x45, 0, 0, 0, 0]);
    let (h, devs) = read_back(&a).unwrap();
    assert!(devs.is_empty());
    assert_eq!(h.configs[0].data, b"x");
    // Neither configs nor devices: refused.
    assert!(matches!(
        WriterBuilder::new().start(Vec::new()),
        Err(FormatError::EmptyArchive)
    ));
}

#[test]
fn header_over_512_kib_is_refused() {
    let mut b = WriterBuilder::new();
    // §3.4: the first config takes 512 + 66048 bytes of blob table, each
    // further one 66048 (its name fits the previous slack).
    for i in 0..7 {
        b.add_config(&format!("c{i}"), &vec![1; 65535]).unwrap();
    }
    let h = b.header().encode().unwrap();
    assert_eq!(h.len(), 12288 + 512 + 7 * 66048);
    assert_eq!(h.len(), spec_allocation(&[3, 65535].repeat(7)).1);
    b.add_config("c7", &vec![1; 65535]).unwrap();
    let Err(FormatError::HeaderTooLarge { size, max }) = b.start(Vec::new()) else {
        panic!("an 8 x 64 KiB header must be refused")
    };
    assert_eq!((size, max), (12288 + 512 + 8 * 66048, 512 * 1024));
}

#[test]
fn writer_refusals() {
    let mut b = WriterBuilder::new();
    assert!(matches!(
        b.add_config("", b"x"),
        Err(FormatError::InvalidName { .. })
    ));
    assert!(matches!(
        b.add_device("a\0b", 1),
        Err(FormatError::InvalidName { .. })
    ));
    assert!(matches!(
        b.add_device("big", (1u64 << 48) + 1),
        Err(FormatError::DeviceTooLarge { .. })
    ));
    // 2^48 is the largest legal size (2^32 clusters); a separate builder,
    // since starting it would allocate a 512 MiB cluster bitmap.
    WriterBuilder::new().add_device("max", 1u64 << 48).unwrap();
    b.add_device("other", 3).unwrap();
    let d = b.add_device("odd", 65536 + 512).unwrap();
    let mut w = b.start(Vec::new()).unwrap();
    // The tail cluster must be exactly its in-device length.
    for len in [511, 513, 4096, 65536] {
        assert!(matches!(
            w.write_cluster(d, 1, Bytes::from(vec![1; len])),
            Err(FormatError::ClusterLength { expected: 512, .. })
        ));
    }
    assert_eq!(w.write_cluster(d, 1, Bytes::from(vec![1; 512])).unwrap(), 1);
    assert!(matches!(
        w.write_cluster(d, 1, Bytes::from(vec![1; 512])),
        Err(FormatError::DuplicateCluster { cluster: 1, .. })
    ));
    assert!(matches!(
        w.write_zero_cluster(DevId(0), 0),
        Err(FormatError::NoSuchDevice(DevId(0)))
    ));
    assert!(matches!(
        w.write_zero_cluster(DevId(3), 0),
        Err(FormatError::NoSuchDevice(DevId(3)))
    ));
    let Err(FormatError::Unfinished(m)) = w.finish() else {
        panic!("incomplete archive finished")
    };
    assert_eq!(m.len(), 2);
    assert_eq!((m[0].dev, m[0].missing, m[0].first), (DevId(1), 1, 0));
    assert_eq!((m[1].dev, m[1].missing, m[1].first), (DevId(2), 1, 0));
}

/// Accepts `limit` bytes, then fails every write.
struct FailAfter {
    buf: Vec<u8>,
    limit: usize,
}

impl Write for FailAfter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() >= self.limit {
            return Err(io::Error::other("disk full"));
        }
        let n = data.len().min(self.limit - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failing_output_poisons_the_writer() {
    let mut b = WriterBuilder::new().clusters_per_extent(1).unwrap();
    let d = b.add_device("d", 4 * CLUSTER as u64).unwrap();
    let hs = b.header().encode().unwrap().len();
    let mut w = b
        .start(FailAfter {
            buf: Vec::new(),
            limit: hs + 1000,
        })
        .unwrap();
    w.write_cluster(d, 0, Bytes::from(vec![1; CLUSTER]))
        .unwrap();
    // The second cluster flushes the first extent, which fails.
    assert!(matches!(
        w.write_cluster(d, 1, Bytes::from(vec![1; CLUSTER])),
        Err(FormatError::Io(_))
    ));
    // From then on every call fails, finish included.
    assert!(w.write_zero_cluster(d, 2).is_err());
    assert!(w.finish().is_err());
}

#[test]
fn header_too_short_to_hold_its_blob_is_impossible() {
    // Every header the writer emits is readable by the reader, including
    // the largest blobs: 254 devices with long names and 256 configs do not
    // fit 512 KiB, but 254 devices with 1000-byte names do.
    let mut b = WriterBuilder::new().uuid(TEST_UUID).ctime(TEST_CTIME);
    for i in 0..254 {
        b.add_device(&format!("{i:03}{}", "n".repeat(997)), 1)
            .unwrap();
    }
    let mut w = b.start(Vec::new()).unwrap();
    for i in 1..=254u8 {
        w.write_zero_cluster(DevId(i), 0).unwrap();
    }
    let a = w.finish().unwrap();
    let (h, devs) = read_back(&a).unwrap();
    assert_eq!(h.devices.len(), 254);
    assert!(devs.iter().all(|d| d == &[0]));
}
