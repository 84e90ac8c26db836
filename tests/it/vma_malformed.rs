//! A corpus of malformed archives. Each case starts from a good archive
//! written by the library, breaks exactly one rule byte-precisely (re-sealing
//! md5s when the case targets a later check, so each case reaches the rule
//! it means), and asserts the exact `FormatError` variant, its fields, and
//! that the message names the offset and the rule (`format/VMA.md` §10).

use std::io::Read;

use crate::support::*;
use proptest::prelude::*;
use vma_writer::vma::{DevId, FormatError, Reader};

const CONF: &str = "qemu-server.conf";
/// drive-scsi0: 3 full clusters + 512 bytes, so its last cluster has one
/// valid block (mask 0x0001).
const D1_SIZE: usize = 3 * CLUSTER + 512;
/// drive-scsi1: 2 full clusters.
const D2_SIZE: usize = 2 * CLUSTER;

fn conf_data() -> Vec<u8> {
    let mut c = b"boot: order=scsi0\ncores: 2\nmemory: 2048\n".to_vec();
    c.resize(417, b'#');
    c
}

/// The good archive: 1 config, 2 devices, 3 clusters per extent, so
/// extent 0 = d1 c0..c2, extent 1 = d1 c3, d2 c0, d2 c1.
fn good() -> Vec<u8> {
    let devs = [
        TestDev::new("drive-scsi0", random_data(D1_SIZE, 1)),
        TestDev::new("drive-scsi1", random_data(D2_SIZE, 2)),
    ];
    build_archive(&[(CONF, &conf_data())], &devs, 3)
}

/// Reads the whole archive and requires an error.
fn read_err(archive: &[u8]) -> FormatError {
    match read_back(archive) {
        Ok(_) => panic!("malformed archive was accepted"),
        Err(e) => e,
    }
}

/// The message names the offset and contains every given fragment.
fn assert_msg(e: &FormatError, offset: usize, fragments: &[&str]) {
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("offset {offset}")),
        "message does not name offset {offset}: {msg}"
    );
    for f in fragments {
        assert!(msg.contains(f), "message lacks {f:?}: {msg}");
    }
}

fn extents(a: &[u8]) -> (usize, usize) {
    let e = extent_offsets(a);
    assert_eq!(e.len(), 2, "test archive layout changed");
    (e[0], e[1])
}

#[test]
fn the_base_archive_is_valid() {
    let a = good();
    let (h, devs) = read_back(&a).unwrap();
    assert_eq!(h.devices.len(), 2);
    assert_eq!(devs[0], random_data(D1_SIZE, 1));
    assert_eq!(devs[1], random_data(D2_SIZE, 2));
    let (e0, e1) = extents(&a);
    assert_eq!(e0, header_size(&a));
    assert_eq!(blockinfo(&a, e1, 0), (0x0001, 1, 3));
    assert_eq!(blockinfo(&a, e0, 1), (0xFFFF, 1, 1));
}

// ------------------------------------------------------------ header ----

#[test]
fn empty_stream_is_truncated() {
    let e = read_err(&[]);
    assert!(
        matches!(
            e,
            FormatError::Truncated {
                offset: 0,
                need: 12288,
                got: 0,
                ..
            }
        ),
        "{e:?}"
    );
    assert_msg(&e, 0, &["truncated", "archive header"]);
}

#[test]
fn bad_magic() {
    let mut a = good();
    a[1] = b'X';
    let e = read_err(&a);
    let FormatError::BadMagic {
        offset,
        what,
        found,
        expected,
    } = e
    else {
        panic!("{e:?}")
    };
    assert_eq!((offset, what), (0, "archive"));
    assert_eq!(found, *b"VXA\0");
    assert_eq!(expected, *b"VMA\0");
    assert_msg(&read_err(&a), 0, &["magic"]);
}

#[test]
fn bad_magic_on_a_short_random_file() {
    // A non-VMA file shorter than the fixed header is "bad magic", not
    // "truncated".
    let e = read_err(b"hello world, this is not an archive");
    assert!(
        matches!(e, FormatError::BadMagic { offset: 0, .. }),
        "{e:?}"
    );
}

#[test]
fn bad_header_md5() {
    let mut a = good();
    a[1000] ^= 0x40; // reserved area: only the md5 notices
    let e = read_err(&a);
    let FormatError::BadChecksum { offset, what, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!((*offset, *what), (0, "archive header"));
    assert_msg(&e, 0, &["md5", "archive header"]);

    // A flipped byte in the blob slack is covered too (§4.1).
    let mut a = good();
    let hs = header_size(&a);
    a[hs - 1] ^= 1;
    assert!(matches!(
        read_err(&a),
        FormatError::BadChecksum { offset: 0, .. }
    ));
}

#[test]
fn truncated_fixed_header() {
    let a = good();
    let e = read_err(&a[..5000]);
    assert!(
        matches!(
            e,
            FormatError::Truncated {
                offset: 0,
                need: 12288,
                got: 5000,
                ..
            }
        ),
        "{e:?}"
    );
    assert_msg(&e, 0, &["truncated", "archive header", "5000 of 12288"]);
}

#[test]
fn truncated_blob_area() {
    let a = good();
    let hs = header_size(&a);
    assert!(hs > FIXED_HEADER);
    let e = read_err(&a[..FIXED_HEADER + 100]);
    let FormatError::Truncated {
        offset, need, got, ..
    } = e
    else {
        panic!("{e:?}")
    };
    assert_eq!((offset, need, got), (0, hs as u64, 12388));
    assert_msg(&read_err(&a[..FIXED_HEADER + 100]), 0, &["archive header"]);
}

#[test]
fn unsupported_version() {
    let mut a = good();
    put32(&mut a, 4, 2);
    reseal_header(&mut a);
    let e = read_err(&a);
    assert!(matches!(e, FormatError::UnsupportedVersion(2)), "{e:?}");
    assert_msg(&e, 4, &["version 2"]);
}

#[test]
fn header_size_too_small() {
    for bad in [0u32, 512, 12288] {
        let mut a = good();
        put32(&mut a, 56, bad);
        let e = read_err(&a);
        let FormatError::BadHeaderField {
            offset,
            field,
            value,
            ..
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!((offset, field, value), (56, "header_size", u64::from(bad)));
    }
}

/// A reader that yields `prefix` and then zeros forever, counting bytes.
struct Endless {
    prefix: Vec<u8>,
    pos: u64,
}

impl Read for Endless {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(1 << 20);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            let p = self.pos as usize + i;
            *b = self.prefix.get(p).copied().unwrap_or(0);
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[test]
fn header_size_of_4_gib_fails_fast() {
    let mut a = good();
    put32(&mut a, 56, u32::MAX);
    let mut input = Endless {
        prefix: a[..FIXED_HEADER].to_vec(),
        pos: 0,
    };
    let e = match Reader::new(&mut input) {
        Ok(_) => panic!("a 4 GiB header was accepted"),
        Err(e) => e,
    };
    let FormatError::BadHeaderField {
        offset,
        field,
        value,
        ..
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!((*offset, *field, *value), (56, "header_size", 0xFFFF_FFFF));
    assert_msg(&e, 56, &["header_size", "4294967295"]);
    // Fail fast: nothing past the fixed header was even read.
    assert!(input.pos <= 1 << 20, "read {} bytes", input.pos);
}

#[test]
fn header_size_just_over_64_mib_is_refused_but_64_mib_is_read_lazily() {
    let mut a = good();
    put32(&mut a, 56, (64 << 20) + 512);
    assert!(matches!(
        read_err(&a),
        FormatError::BadHeaderField {
            offset: 56,
            field: "header_size",
            ..
        }
    ));
    // 64 MiB is within the bound: a short stream is then "truncated",
    // naming the claimed size.
    put32(&mut a, 56, 64 << 20);
    let e = read_err(&a[..FIXED_HEADER + 10]);
    assert!(
        matches!(
            e,
            FormatError::Truncated {
                offset: 0,
                need: 67_108_864,
                got: 12298,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn blob_buffer_offset_and_size_out_of_bounds() {
    let mut a = good();
    put32(&mut a, 48, 4096);
    reseal_header(&mut a);
    let e = read_err(&a);
    assert!(
        matches!(
            e,
            FormatError::BadHeaderField {
                offset: 48,
                field: "blob_buffer_offset",
                value: 4096,
                ..
            }
        ),
        "{e:?}"
    );
    assert_msg(&e, 48, &["blob_buffer_offset"]);

    let mut a = good();
    let hs = header_size(&a) as u32;
    put32(&mut a, 52, hs - 12288 + 1);
    reseal_header(&mut a);
    let e = read_err(&a);
    assert!(
        matches!(
            e,
            FormatError::BadHeaderField {
                offset: 52,
                field: "blob_buffer_size",
                ..
            }
        ),
        "{e:?}"
    );
    // u32::MAX must not overflow the bounds check.
    let mut a = good();
    put32(&mut a, 52, u32::MAX);
    reseal_header(&mut a);
    assert!(matches!(
        read_err(&a),
        FormatError::BadHeaderField { offset: 52, .. }
    ));
}

/// Offset of dev_info[slot].devname_ptr.
fn dev_name_ptr_at(slot: usize) -> usize {
    4096 + 32 * slot
}

#[test]
fn device_blob_pointer_into_nowhere() {
    for ptr in [5000u32, 2, u32::MAX] {
        let mut a = good();
        put32(&mut a, dev_name_ptr_at(1), ptr);
        reseal_header(&mut a);
        let e = read_err(&a);
        let FormatError::BadBlobPointer { offset, ptr: p, .. } = &e else {
            panic!("ptr {ptr}: {e:?}")
        };
        assert_eq!((*offset, *p), (4128, ptr));
        assert_msg(&e, 4128, &["pointer", &ptr.to_string(), "device 1"]);
    }
}

#[test]
fn config_blob_pointers_into_nowhere() {
    let mut a = good();
    put32(&mut a, 2044, 4000);
    reseal_header(&mut a);
    let e = read_err(&a);
    assert!(
        matches!(
            e,
            FormatError::BadBlobPointer {
                offset: 2044,
                ptr: 4000,
                ..
            }
        ),
        "{e:?}"
    );
    assert_msg(&e, 2044, &["config 0 name", "pointer 4000"]);

    let mut a = good();
    put32(&mut a, 3068, 21); // one past the start of the content blob (20)
    reseal_header(&mut a);
    let e = read_err(&a);
    assert!(
        matches!(
            e,
            FormatError::BadBlobPointer {
                offset: 3068,
                ptr: 21,
                ..
            }
        ),
        "{e:?}"
    );
    assert_msg(&e, 3068, &["qemu-server.conf", "pointer 21"]);
}

#[test]
fn a_config_slot_with_one_zero_pointer_is_skipped() {
    // §3.3: a slot is used only if both pointers are non-zero.
    let mut a = good();
    put32(&mut a, 3068, 0);
    reseal_header(&mut a);
    let (h, _) = read_back(&a).unwrap();
    assert!(h.configs.is_empty());
}

#[test]
fn device_name_without_nul() {
    let mut a = good();
    let at = find_blob(&a, b"drive-scsi0\0");
    a[at + 2 + 11] = b'X';
    reseal_header(&mut a);
    let e = read_err(&a);
    assert!(
        matches!(e, FormatError::BadName { offset: 4128, .. }),
        "{e:?}"
    );
    assert_msg(&e, 4128, &["NUL-terminated", "device 1 name"]);
}

#[test]
fn config_name_without_nul() {
    let mut a = good();
    let at = find_blob(&a, b"qemu-server.conf\0");
    assert_eq!(at, FIXED_HEADER + 1, "first blob at relative offset 1");
    a[at + 2 + 16] = b'X';
    reseal_header(&mut a);
    let e = read_err(&a);
    assert!(
        matches!(
            e,
            FormatError::BadName {
                offset: 2044,
                ptr: 1,
                ..
            }
        ),
        "{e:?}"
    );
    assert_msg(&e, 2044, &["NUL-terminated", "config 0 name"]);
}

#[test]
fn duplicate_device_names() {
    let mut a = good();
    let p1 = be32(&a, dev_name_ptr_at(1));
    put32(&mut a, dev_name_ptr_at(2), p1);
    reseal_header(&mut a);
    let e = read_err(&a);
    let FormatError::DuplicateName { what, name } = &e else {
        panic!("{e:?}")
    };
    assert_eq!((*what, name.as_str()), ("device", "drive-scsi0"));
    assert!(e.to_string().contains("drive-scsi0"));
}

#[test]
fn header_reserved_areas_are_not_checked() {
    // §3.1: reserved (60..2044) and reserved1 (4092) are not checked.
    let mut a = good();
    a[4092..4096].copy_from_slice(&[1, 2, 3, 4]);
    a[100] = 7;
    a[4096 + 32 + 4] = 9; // dev_info[1].reserved0
    reseal_header(&mut a);
    let (_, devs) = read_back(&a).unwrap();
    assert_eq!(devs[0], random_data(D1_SIZE, 1));
}

// ------------------------------------------------------------ extents ----

#[test]
fn bad_extent_md5() {
    let mut a = good();
    let (_, e1) = extents(&a);
    a[blockinfo_at(e1, 50)] ^= 1; // an unused slot: only the md5 notices
    let e = read_err(&a);
    let FormatError::BadChecksum { offset, what, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!((*offset, *what), (e1 as u64, "extent header"));
    assert_msg(&e, e1, &["md5", "extent header"]);
}

#[test]
fn extent_payload_is_not_checksummed() {
    // §4.3: a flipped payload byte is undetectable and must be accepted.
    let mut a = good();
    let (e0, _) = extents(&a);
    a[e0 + 512 + 10] ^= 0xFF;
    let (_, devs) = read_back(&a).unwrap();
    assert_ne!(devs[0], random_data(D1_SIZE, 1));
}

#[test]
fn bad_extent_magic() {
    // Without re-sealing, the md5 fails too; the error says "magic".
    let mut a = good();
    let (_, e1) = extents(&a);
    a[e1 + 3] = b'X';
    let e = read_err(&a);
    let FormatError::BadMagic {
        offset,
        what,
        found,
        ..
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!((*offset, *what, *found), (e1 as u64, "extent", *b"VMAX"));
    assert_msg(&e, e1, &["extent magic"]);
    // Re-sealed, it fails at the magic check proper.
    reseal_extent(&mut a, e1);
    assert!(matches!(
        read_err(&a),
        FormatError::BadMagic { what: "extent", .. }
    ));
}

#[test]
fn extent_reserved1_not_zero() {
    let mut a = good();
    let (e0, _) = extents(&a);
    a[e0 + 5] = 1;
    reseal_extent(&mut a, e0);
    let e = read_err(&a);
    let FormatError::ReservedNotZero {
        offset,
        field,
        value,
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!((*offset, *field, *value), ((e0 + 4) as u64, "reserved1", 1));
    assert_msg(&e, e0 + 4, &["reserved1", "must be 0"]);
}

#[test]
fn wrong_extent_uuid() {
    let mut a = good();
    let (_, e1) = extents(&a);
    a[e1 + 8] ^= 0xFF;
    reseal_extent(&mut a, e1);
    let e = read_err(&a);
    let FormatError::UuidMismatch {
        offset,
        found,
        expected,
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!(*offset, e1 as u64);
    assert_eq!(*expected, TEST_UUID);
    assert_ne!(*found, TEST_UUID);
    assert_msg(&e, e1, &["uuid", &TEST_UUID.to_string()]);
}

#[test]
fn block_count_mismatch() {
    for delta in [1i32, -1] {
        let mut a = good();
        let (e0, _) = extents(&a);
        let bc = u16::from_be_bytes([a[e0 + 6], a[e0 + 7]]);
        assert_eq!(bc, 48);
        let bad = (i32::from(bc) + delta) as u16;
        a[e0 + 6..e0 + 8].copy_from_slice(&bad.to_be_bytes());
        reseal_extent(&mut a, e0);
        let e = read_err(&a);
        let FormatError::BlockCountMismatch {
            offset,
            block_count,
            mask_blocks,
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(
            (*offset, *block_count, *mask_blocks),
            ((e0 + 6) as u64, u64::from(bad), 48)
        );
        assert_msg(&e, e0 + 6, &["block_count", "masks"]);
    }
}

#[test]
fn truncated_extent_header() {
    let a = good();
    let (_, e1) = extents(&a);
    let e = read_err(&a[..e1 + 100]);
    let FormatError::Truncated {
        offset,
        what,
        need,
        got,
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!(
        (*offset, *what, *need, *got),
        (e1 as u64, "extent header", 512, 100)
    );
    assert_msg(&e, e1, &["truncated", "extent header"]);
}

#[test]
fn truncated_extent_payload() {
    let a = good();
    let (_, e1) = extents(&a);
    let e = read_err(&a[..e1 + 512 + 5000]);
    let FormatError::Truncated {
        offset,
        what,
        need,
        got,
    } = &e
    else {
        panic!("{e:?}")
    };
    // extent 1: d1 c3 (1 block) + d2 c0, c1 (16 each) = 33 blocks.
    assert_eq!(
        (*offset, *what, *need, *got),
        (e1 as u64, "extent payload", 512 + 33 * 4096, 5512)
    );
    assert_msg(&e, e1, &["truncated", "extent payload"]);
    // One byte short of the end is still truncated.
    assert!(matches!(
        read_err(&a[..a.len() - 1]),
        FormatError::Truncated {
            what: "extent payload",
            ..
        }
    ));
}

#[test]
fn trailing_bytes_after_the_last_extent() {
    let mut a = good();
    let end = a.len();
    a.extend_from_slice(&[0u8; 100]);
    assert!(matches!(
        read_err(&a),
        FormatError::Truncated { offset, what: "extent header", .. } if offset == end as u64
    ));
    a.resize(end + 512, 0);
    assert!(matches!(
        read_err(&a),
        FormatError::BadMagic { offset, what: "extent", .. } if offset == end as u64
    ));
}

#[test]
fn cut_at_an_extent_boundary_is_incomplete() {
    let a = good();
    let (e0, e1) = extents(&a);
    let e = read_err(&a[..e1]);
    let FormatError::Incomplete { offset, missing } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(*offset, e1 as u64);
    assert_eq!(missing.len(), 2);
    assert_eq!(
        (missing[0].dev, missing[0].missing, missing[0].first),
        (DevId(1), 1, 3)
    );
    assert_eq!(missing[0].name, "drive-scsi0");
    assert_eq!(
        (missing[1].dev, missing[1].missing, missing[1].first),
        (DevId(2), 2, 0)
    );
    assert_msg(
        &e,
        e1,
        &[
            "missing",
            "drive-scsi0",
            "first missing cluster 3",
            "drive-scsi1",
        ],
    );
    // Cut right after the header: no extent at all.
    let e = read_err(&a[..e0]);
    let FormatError::Incomplete { offset, missing } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(*offset, e0 as u64);
    assert_eq!(
        missing.iter().map(|m| m.missing).collect::<Vec<_>>(),
        [4, 2]
    );
    // Reader::verify reports the same.
    assert!(matches!(
        Reader::new(&a[..e1]).unwrap().verify(),
        Err(FormatError::Incomplete { .. })
    ));
}

#[test]
fn duplicate_cluster_in_the_same_extent() {
    let mut a = good();
    let (e0, _) = extents(&a);
    set_blockinfo(&mut a, e0, 1, (0xFFFF, 1, 0));
    reseal_extent(&mut a, e0);
    let e = read_err(&a);
    let FormatError::DuplicateCluster {
        offset,
        dev,
        cluster,
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!(
        (*offset, *dev, *cluster),
        (blockinfo_at(e0, 1) as u64, DevId(1), 0)
    );
    assert_msg(&e, blockinfo_at(e0, 1), &["cluster 0 of device 1", "twice"]);
}

#[test]
fn duplicate_cluster_in_different_extents() {
    let mut a = good();
    let (_, e1) = extents(&a);
    // d1 c3 (mask 0x0001) becomes a second d1 c1.
    set_blockinfo(&mut a, e1, 0, (0x0001, 1, 1));
    reseal_extent(&mut a, e1);
    let e = read_err(&a);
    assert!(
        matches!(
            e,
            FormatError::DuplicateCluster { offset, dev: DevId(1), cluster: 1 }
                if offset == blockinfo_at(e1, 0) as u64
        ),
        "{e:?}"
    );
    assert_msg(&e, blockinfo_at(e1, 0), &["twice"]);
}

#[test]
fn cluster_past_the_end() {
    for bad in [4u32, 5, u32::MAX] {
        let mut a = good();
        let (e0, _) = extents(&a);
        set_blockinfo(&mut a, e0, 2, (0xFFFF, 1, bad));
        reseal_extent(&mut a, e0);
        let e = read_err(&a);
        let FormatError::ClusterOutOfRange {
            offset,
            dev,
            cluster,
            clusters,
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(
            (*offset, *dev, *cluster, *clusters),
            (blockinfo_at(e0, 2) as u64, DevId(1), u64::from(bad), 4)
        );
        assert_msg(&e, blockinfo_at(e0, 2), &["past its end", "4 clusters"]);
    }
}

#[test]
fn zero_cluster_past_the_end_is_refused_too() {
    // §11 (c): even a mask-0 entry past the end is an error.
    let mut a = good();
    let (_, e1) = extents(&a);
    // d2 has 2 clusters; claim a zero cluster 2 in the unused slot 3.
    set_blockinfo(&mut a, e1, 3, (0, 2, 2));
    reseal_extent(&mut a, e1);
    assert!(matches!(
        read_err(&a),
        FormatError::ClusterOutOfRange {
            dev: DevId(2),
            cluster: 2,
            clusters: 2,
            ..
        }
    ));
}

#[test]
fn mask_bit_past_the_end() {
    // d1's last cluster holds 512 bytes: only block 0 is in the device.
    let mut a = good();
    let (_, e1) = extents(&a);
    set_blockinfo(&mut a, e1, 0, (0x0002, 1, 3)); // same popcount
    reseal_extent(&mut a, e1);
    let e = read_err(&a);
    let FormatError::MaskPastEnd {
        offset,
        dev,
        cluster,
        mask,
        size,
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!(
        (*offset, *dev, *cluster, *mask, *size),
        (
            blockinfo_at(e1, 0) as u64,
            DevId(1),
            3,
            0x0002,
            D1_SIZE as u64
        )
    );
    assert_msg(&e, blockinfo_at(e1, 0), &["0x0002", "past the device end"]);
}

#[test]
fn full_mask_past_the_end() {
    // §6.2: a 0xFFFF mask on the partial last cluster is refused as well
    // (Proxmox ignores the extra blocks). Insert the 15 extra blocks so that
    // block_count and the payload stay consistent.
    let mut a = good();
    let (_, e1) = extents(&a);
    set_blockinfo(&mut a, e1, 0, (0xFFFF, 1, 3));
    let bc = u16::from_be_bytes([a[e1 + 6], a[e1 + 7]]) + 15;
    a[e1 + 6..e1 + 8].copy_from_slice(&bc.to_be_bytes());
    reseal_extent(&mut a, e1);
    let at = e1 + 512 + BLOCK;
    a.splice(at..at, std::iter::repeat_n(0xA5, 15 * BLOCK));
    let e = read_err(&a);
    assert!(
        matches!(
            e,
            FormatError::MaskPastEnd {
                mask: 0xFFFF,
                cluster: 3,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn unknown_dev_id() {
    // 3: an empty slot; 255: never a device (§3.2), even if filled.
    for dev in [3u8, 200, 255] {
        let mut a = good();
        let (e0, _) = extents(&a);
        set_blockinfo(&mut a, e0, 0, (0xFFFF, dev, 0));
        reseal_extent(&mut a, e0);
        let e = read_err(&a);
        let FormatError::UnknownDevice { offset, dev: d } = &e else {
            panic!("{e:?}")
        };
        assert_eq!((*offset, *d), (blockinfo_at(e0, 0) as u64, dev));
        assert_msg(
            &e,
            blockinfo_at(e0, 0),
            &["unknown device", &dev.to_string()],
        );
    }
}

#[test]
fn slot_255_is_ignored_even_when_filled() {
    let mut a = good();
    // Copy slot 1 into slot 255 (reusing drive-scsi0's name pointer would be
    // a duplicate name if it counted; it must not count).
    let s1 = dev_name_ptr_at(1);
    let s255 = dev_name_ptr_at(255);
    let slot: Vec<u8> = a[s1..s1 + 32].to_vec();
    a[s255..s255 + 32].copy_from_slice(&slot);
    reseal_header(&mut a);
    let (h, _) = read_back(&a).unwrap();
    assert_eq!(h.devices.len(), 2);
}

#[test]
fn dev_id_zero_slots_are_ignored_whatever_they_hold() {
    let mut a = good();
    let (_, e1) = extents(&a);
    set_blockinfo(&mut a, e1, 40, (0, 0, 12345));
    // A dev_id-0 slot with a mask: its bits do not count in block_count.
    set_blockinfo(&mut a, e1, 41, (0x00FF, 0, 7));
    reseal_extent(&mut a, e1);
    let (_, devs) = read_back(&a).unwrap();
    assert_eq!(devs[1], random_data(D2_SIZE, 2));
}

// -------------------------------------------------- never panics ----

fn small_archive() -> Vec<u8> {
    let devs = [
        TestDev::new("a", holey_data(CLUSTER + 4096 + 100, 7)),
        TestDev::new("b", holey_data(2 * CLUSTER, 8)),
    ];
    build_archive(&[("c.conf", b"x=1\n")], &devs, 2)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Random byte edits (optionally re-sealed so they reach the later
    /// checks) and truncations: the reader returns Ok or Err, never panics.
    #[test]
    fn reader_never_panics(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        focus in 0u8..3,
        reseal in any::<bool>(),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let base = small_archive();
        let exts = extent_offsets(&base);
        let hs = header_size(&base);
        let mut a = base.clone();
        for (pos, val) in edits {
            let at = match focus {
                // header fields, slots and blob area
                0 => [pos % 64, 2044 + pos % 8, 3068 + pos % 8, 4096 + pos % 96,
                      FIXED_HEADER + pos % (hs - FIXED_HEADER)][pos % 5],
                // an extent header
                1 => exts[pos % exts.len()] + pos % 512,
                _ => pos % a.len(),
            };
            a[at] = val;
        }
        if reseal {
            reseal_header_len(&mut a, hs);
            for &e in &exts {
                reseal_extent(&mut a, e);
            }
        }
        if let Some(c) = cut {
            a.truncate(c % (a.len() + 1));
        }
        // Ok or Err are both fine; a panic fails the test.
        let res = walk(&a);
        if a == base {
            prop_assert!(res.is_ok());
        }
    }
}

#[test]
fn every_truncation_of_a_small_archive_is_an_error() {
    let a = small_archive();
    assert!(read_back(&a).is_ok());
    let exts = extent_offsets(&a);
    for len in (0..a.len()).step_by(97).chain(exts.iter().copied()) {
        let e = read_err(&a[..len]);
        if exts.contains(&len) {
            assert!(
                matches!(e, FormatError::Incomplete { .. }),
                "cut {len}: {e:?}"
            );
        } else {
            assert!(
                matches!(
                    e,
                    FormatError::Truncated { .. } | FormatError::BadMagic { .. }
                ),
                "cut {len}: {e:?}"
            );
        }
    }
}

// ---------------------------------------------------------- via the CLI ----

#[test]
fn cli_verify_rejects_malformed_archives_with_a_readable_message() {
    let env = TestEnv::new();
    let good = good();
    let (e0, e1) = extents(&good);

    let mut bad_md5 = good.clone();
    bad_md5[1000] ^= 1;
    let mut dup = good.clone();
    set_blockinfo(&mut dup, e0, 1, (0xFFFF, 1, 0));
    reseal_extent(&mut dup, e0);
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        ("bad-md5.vma", bad_md5, "md5 mismatch".into()),
        ("cut.vma", good[..e1].to_vec(), "clusters missing".into()),
        ("dup.vma", dup, format!("offset {}", blockinfo_at(e0, 1))),
        ("short.vma", good[..5000].to_vec(), "truncated".into()),
    ];
    env.write("good.vma", &good);
    env.ok(["verify", "good.vma"]);
    for (name, bytes, needle) in cases {
        env.write(name, &bytes);
        let err = env.fails(["verify", name]);
        assert!(err.contains(name), "{name}: {err}");
        assert!(err.contains(&needle), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        // Through stdin, too.
        let out = env.run_stdin(["verify", "-"], &bytes);
        let err = assert_failure(&out, &name);
        assert!(err.contains(&needle), "{name} via stdin: {err}");
    }
}

#[test]
fn cli_list_and_config_reject_a_bad_header() {
    let env = TestEnv::new();
    let mut a = good();
    a[0] = b'Z';
    env.write("bad.vma", &a);
    for args in [
        vec!["list", "bad.vma"],
        vec!["config", "bad.vma"],
        vec!["extract", "bad.vma", "out"],
    ] {
        let err = env.fails(&args);
        assert!(err.contains("magic"), "{args:?}: {err}");
    }
    assert!(!env.path("out").exists(), "extract created its directory");
}

// ------------------------------------------------------- resource bounds ----

/// The good archive with device 1's size field set to `size` (re-sealed).
fn with_dev1_size(size: u64) -> Vec<u8> {
    let mut a = good();
    let at = dev_name_ptr_at(1) + 8;
    a[at..at + 8].copy_from_slice(&size.to_be_bytes());
    reseal_header(&mut a);
    a
}

#[test]
fn huge_device_size_is_an_error_not_an_abort() {
    // A device size beyond VMA's 2^48-byte limit (§8: cluster numbers are
    // u32) must be refused, not turned into a per-cluster bitmap of 2^42
    // words. Run through the CLI so that an allocation abort cannot take the
    // test harness down with it.
    let env = TestEnv::new();
    for (name, size) in [("max.vma", u64::MAX), ("2p60.vma", 1u64 << 60)] {
        env.write(name, &with_dev1_size(size));
        let out = env.run(["verify", name]);
        assert!(
            out.status.code().is_some(),
            "{name}: verify was killed by a signal ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let err = assert_failure(&out, &name);
        assert!(err.contains("offset"), "{name}: {err}");
    }
}

// ------------------------------------------------- more header rules ----

#[test]
fn md5_is_checked_before_version() {
    // §10 order: md5 (5) before version (6).
    let mut a = good();
    put32(&mut a, 4, 2);
    assert!(matches!(
        read_err(&a),
        FormatError::BadChecksum { offset: 0, .. }
    ));
}

#[test]
fn a_size_0_slot_is_not_a_device() {
    // §3.2: drive-scsi1's slot with size 0 is no device, so its clusters
    // in extent 1 name an unknown device.
    let mut a = good();
    let at = dev_name_ptr_at(2) + 8;
    a[at..at + 8].fill(0);
    reseal_header(&mut a);
    let (_, e1) = extents(&a);
    let e = read_err(&a);
    assert!(
        matches!(e, FormatError::UnknownDevice { offset, dev: 2 } if offset == blockinfo_at(e1, 1) as u64),
        "{e:?}"
    );
    let h = Reader::new(&a[..]).unwrap();
    assert_eq!(h.header().devices.len(), 1);
}

#[test]
fn device_names_must_be_utf8_without_inner_nul() {
    for (i, bad) in [0xFFu8, 0].into_iter().enumerate() {
        let mut a = good();
        let at = find_blob(&a, b"drive-scsi1\0");
        a[at + 2 + 3] = bad; // "driXe-scsi1"
        reseal_header(&mut a);
        let e = read_err(&a);
        assert!(
            matches!(e, FormatError::BadName { offset: 4160, .. }),
            "case {i}: {e:?}"
        );
        assert_msg(&e, 4160, &["device 2 name"]);
    }
}

#[test]
fn a_blob_that_overruns_blob_buffer_size_does_not_resolve() {
    // §3.4 walk: an entry with p + 2 + L > blob_buffer_size is not
    // registered. Shrinking the size by one drops the last blob, the name
    // of device 2.
    let mut a = good();
    let size = be32(&a, 52);
    put32(&mut a, 52, size - 1);
    reseal_header(&mut a);
    let e = read_err(&a);
    assert!(
        matches!(e, FormatError::BadBlobPointer { offset: 4160, .. }),
        "{e:?}"
    );
}

#[test]
fn empty_names_are_read_but_refused_by_extract() {
    // A name blob of just "\0" is a valid (empty) string for the format.
    let mut a = good();
    let at = find_blob(&a, b"drive-scsi1\0");
    // Turn the 12-byte entry into a 1-byte "\0" entry followed by a
    // 9-byte filler entry, keeping the walk aligned.
    a[at..at + 2].copy_from_slice(&1u16.to_le_bytes());
    a[at + 2] = 0;
    a[at + 3..at + 5].copy_from_slice(&9u16.to_le_bytes());
    reseal_header(&mut a);
    let (h, _) = read_back(&a).unwrap();
    assert_eq!(h.devices[1].name, "");
    let env = TestEnv::new();
    env.write("a.vma", &a);
    let err = env.fails(["extract", "a.vma", "out"]);
    assert!(err.contains("refusing"), "{err}");
    assert!(!env.path("out").exists());
}

// ------------------------------------ unusual but valid: accepted ----

#[test]
fn blob_area_need_not_start_at_12288() {
    // Readers require blob_buffer_offset >= 12288, not == (§3.1).
    let base = good();
    let mut a = base.clone();
    let hs = header_size(&a) as u32;
    a.splice(FIXED_HEADER..FIXED_HEADER, [0u8; 512]);
    put32(&mut a, 48, 12800);
    put32(&mut a, 56, hs + 512);
    reseal_header(&mut a);
    let (h, devs) = read_back(&a).unwrap();
    let (h0, devs0) = read_back(&base).unwrap();
    assert_eq!((h, devs), (h0, devs0));
}

#[test]
fn empty_extents_are_legal_anywhere() {
    let base = good();
    let (e0, e1) = extents(&base);
    let mut empty = [0u8; 512];
    empty[..4].copy_from_slice(b"VMAE");
    empty[8..24].copy_from_slice(TEST_UUID.as_bytes());
    let d = md5::compute(empty);
    empty[24..40].copy_from_slice(&d.0);
    let mut a = base.clone();
    a.extend_from_slice(&empty);
    a.splice(e1..e1, empty);
    a.splice(e0..e0, empty);
    let (_, devs) = read_back(&a).unwrap();
    assert_eq!(devs, read_back(&base).unwrap().1);
    assert_eq!(extent_offsets(&a).len(), 5);
}

#[test]
fn a_sized_device_slot_with_a_zero_name_pointer_is_refused() {
    // §3.2: a slot with size != 0 is a device, so its name must resolve;
    // pointer 0 never does (Proxmox would silently drop the slot).
    let mut a = good();
    put32(&mut a, dev_name_ptr_at(2), 0);
    reseal_header(&mut a);
    let e = read_err(&a);
    assert!(
        matches!(
            e,
            FormatError::BadBlobPointer {
                offset: 4160,
                ptr: 0,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn header_size_need_not_be_a_multiple_of_512() {
    // §10: "whether header_size is a multiple of 512" is not checked.
    let base = good();
    let hs = header_size(&base);
    let mut a = base.clone();
    a.insert(hs, 0);
    put32(&mut a, 56, hs as u32 + 1);
    reseal_header(&mut a);
    assert_eq!(read_back(&a).unwrap(), read_back(&base).unwrap());
}
