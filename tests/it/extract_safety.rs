//! Restoring a malicious archive: `extract` never writes outside DIR.
//! Names that are not plain file names are refused before DIR exists,
//! files planted in DIR meanwhile are neither followed nor replaced, every
//! size a header claims is checked before memory is spent on it, and a
//! 1 TiB sparse drive restores sparse, in bounded memory and time.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::support::*;
use vma_writer::vma::consts::MAX_DEVICE_SIZE;
use vma_writer::vma::{Config, DevId, Device, Header};

/// An archive with the given configs and drives (each one cluster of data).
fn archive_with(configs: &[(&str, &[u8])], drives: &[&str]) -> Vec<u8> {
    let devs: Vec<TestDev> = drives
        .iter()
        .enumerate()
        .map(|(i, n)| TestDev::new(n, random_data(CLUSTER, i as u64 + 1)))
        .collect();
    build_archive(configs, &devs, 4)
}

/// Runs `extract a.vma out` on `archive` in a fresh env; requires a failure
/// whose message holds `needle`, no `out`, and nothing new anywhere near.
fn refused(archive: &[u8], needle: &str) -> String {
    let env = TestEnv::new();
    env.write("a.vma", archive);
    let before = tree(env.dir.path());
    let err = env.fails(["extract", "a.vma", "out"]);
    assert!(err.contains(needle), "message lacks {needle:?}: {err}");
    assert!(!env.path("out").exists(), "extract created its directory");
    assert_eq!(tree(env.dir.path()), before, "extract left files behind");
    err
}

#[test]
fn names_that_are_not_file_names_are_refused_before_dir_exists() {
    for bad in [
        "..",
        ".",
        "../escape",
        "/tmp/vma-writer-abs-escape",
        "a/b",
        "x/../../y",
    ] {
        let err = refused(
            &archive_with(&[(bad, b"x")], &["drive-a"]),
            "refusing to extract",
        );
        assert!(err.contains("config"), "{bad}: {err}");
        let err = refused(
            &archive_with(&[("qemu-server.conf", b"x")], &[bad]),
            "refusing to extract",
        );
        assert!(err.contains("device"), "{bad}: {err}");
    }
    assert!(!Path::new("/tmp/vma-writer-abs-escape").exists());
    // Unusual but plain names are fine.
    let env = TestEnv::new();
    env.write(
        "a.vma",
        &archive_with(&[("-rf .conf", b"x")], &["drive with space", "ünï"]),
    );
    env.ok(["extract", "a.vma", "out"]);
    for f in ["-rf .conf", "disk-drive with space.raw", "disk-ünï.raw"] {
        assert!(env.path("out").join(f).is_file(), "{f}");
    }
}

#[test]
fn empty_and_nul_config_names_are_refused() {
    // "c2.conf\0" (8 bytes) becomes "\0" plus a 5-byte filler entry, so
    // the blob walk stays aligned: an empty name.
    let base = archive_with(&[("c1.conf", b"1"), ("c2.conf", b"2")], &["drive-a"]);
    let mut a = base.clone();
    let at = find_blob(&a, b"c2.conf\0");
    a[at..at + 2].copy_from_slice(&1u16.to_le_bytes());
    a[at + 2] = 0;
    a[at + 3..at + 5].copy_from_slice(&5u16.to_le_bytes());
    reseal_header(&mut a);
    refused(&a, "empty");
    // A NUL inside the name: the reader refuses the header.
    let mut a = base.clone();
    let at = find_blob(&a, b"c2.conf\0");
    a[at + 2 + 2] = 0; // "c2\0conf"
    reseal_header(&mut a);
    refused(&a, "config 1 name");
}

#[test]
fn duplicate_and_colliding_names_are_refused() {
    // Two configs of one name (the writer refuses to make them; edit).
    let mut a = archive_with(&[("c1.conf", b"1"), ("c2.conf", b"2")], &["drive-a"]);
    let at = find_blob(&a, b"c2.conf\0");
    a[at + 2 + 1] = b'1';
    reseal_header(&mut a);
    refused(&a, "two configs named 'c1.conf'");
    // Two drives of one name: the reader refuses the header.
    let mut a = archive_with(&[("c.conf", b"1")], &["drive-a", "drive-b"]);
    let at = find_blob(&a, b"drive-b\0");
    a[at + 2 + 6] = b'a';
    reseal_header(&mut a);
    refused(&a, "drive-a");
    // A config named like a drive's image, final or temporary.
    for name in ["disk-drive-a.raw", "tmp-disk-drive-a.raw"] {
        refused(
            &archive_with(&[(name, b"x")], &["drive-a"]),
            "would collide with the image of drive 'drive-a'",
        );
    }
}

#[test]
fn a_symlink_planted_in_dir_is_neither_followed_nor_replaced() {
    // The archive comes through a pipe, so extract waits after the header
    // (configs and temporary images exist by then) for the rest: that is
    // when a symlink is planted at the final image name and at a name a
    // config already has.
    let env = TestEnv::new();
    let victim = env.write("victim", b"precious");
    let a = archive_with(&[("qemu-server.conf", b"cfg")], &["drive-a"]);
    let hs = header_size(&a);
    let mut cmd = env.cmd(["extract", "-", "out"]);
    cmd.stdin(Stdio::piped());
    let mut child = spawn_piped(&mut cmd);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&a[..hs]).unwrap();
    let out = env.path("out");
    wait_until("the temporary image", Duration::from_secs(20), || {
        out.join("tmp-disk-drive-a.raw").exists()
    });
    assert_eq!(std::fs::read(out.join("qemu-server.conf")).unwrap(), b"cfg");
    std::os::unix::fs::symlink(&victim, out.join("disk-drive-a.raw")).unwrap();
    stdin.write_all(&a[hs..]).unwrap();
    drop(stdin);
    let res = wait_within(child, CMD_TIMEOUT);
    let err = assert_failure(&res, &"extract with a planted symlink");
    assert!(err.contains("disk-drive-a.raw"), "{err}");
    assert!(err.contains("left alone"), "{err}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(!out.exists(), "the failed extraction left {out:?}");
    assert!(victim.exists(), "cleaning up followed the symlink");
}

/// A header-only archive of 254 drives of 256 TiB each: 12 KiB of bytes
/// that claim 2^40 clusters.
fn huge_header() -> Vec<u8> {
    Header {
        uuid: TEST_UUID,
        ctime: TEST_CTIME,
        configs: vec![Config {
            name: "qemu-server.conf".into(),
            data: b"memory: 1\n".to_vec(),
        }],
        devices: (1..=254u8)
            .map(|i| Device {
                id: DevId(i),
                name: format!("d{i}"),
                size: MAX_DEVICE_SIZE,
            })
            .collect(),
    }
    .encode()
    .expect("encodes")
}

#[test]
fn claimed_sizes_cost_no_memory_before_data_arrives() {
    // Under a 4 GiB address-space limit: a bitmap per claimed drive
    // (254 × 512 MiB) or a cluster map from an index (254 × 16 GiB) would
    // fail to allocate and abort; what is claimed must cost nothing until
    // clusters arrive.
    let env = TestEnv::new();
    env.write("huge.vma", &huge_header());
    for (args, code, needle) in [
        (vec!["list", "huge.vma"], 0, ""),
        (vec!["verify", "huge.vma"], 1, "clusters missing"),
        (vec!["extract", "huge.vma", "out"], 1, "extraction failed"),
        (
            vec!["extract", "-d", "d7", "huge.vma", "out"],
            1,
            "more than the 0 it can list",
        ),
    ] {
        let m = run_measured(&mut env.cmd(&args), Some(4 << 30), CMD_TIMEOUT);
        let err = String::from_utf8_lossy(&m.out.stderr);
        assert_eq!(m.out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(
            m.max_rss_kib < 64 << 10,
            "{args:?} peaked at {} KiB",
            m.max_rss_kib
        );
        assert!(!env.path("out").exists());
    }
}

#[test]
fn a_1_tib_sparse_drive_restores_sparse_in_bounded_memory() {
    // On a real filesystem (tmpfs may cap sizes): a 1 TiB sparse image with
    // three islands of data, archived by `create`, restored twice: from a
    // pipe (no index: a 2 MiB cluster bitmap) and from the file (its index
    // lists all 2^24 clusters).
    let base = if Path::new("/var/tmp").is_dir() {
        "/var/tmp"
    } else {
        "/tmp"
    };
    let dir = tempfile::Builder::new()
        .prefix("vma-tests-1tib-")
        .tempdir_in(base)
        .unwrap();
    let d = dir.path();
    const TIB: u64 = 1 << 40;
    let islands = [(0, 4096), (TIB / 2 + 12345, 70000), (TIB - 512, 512)];
    let img = sparse_image(&d.join("big.raw"), TIB, &islands, 3);
    let m = run_measured(
        vma(["create"])
            .arg(d.join("big.vma"))
            .arg("-d")
            .arg(format!("drive-scsi0={}", img.display())),
        None,
        Duration::from_secs(120),
    );
    assert_success(&m.out, &"create of a 1 TiB sparse image");
    eprintln!(
        "create 1 TiB: {:?}, {} MiB peak; archive {} MB",
        m.elapsed,
        m.max_rss_kib >> 10,
        std::fs::metadata(d.join("big.vma")).unwrap().len() >> 20
    );

    let check = |out: &Path, what: &str| {
        let restored = out.join("disk-drive-scsi0.raw");
        let md = std::fs::metadata(&restored).unwrap();
        assert_eq!(md.len(), TIB, "{what}");
        assert!(
            md.blocks() * 512 < 8 << 20,
            "{what}: restored image is not sparse: {} blocks",
            md.blocks()
        );
        assert_same_file(&restored, &img);
    };
    // From a pipe: no index, the streaming reader only.
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "exec \"$0\" extract - {} < {}",
            d.join("piped").display(),
            d.join("big.vma").display()
        ))
        .arg(BIN);
    let m = run_measured(&mut cmd, None, Duration::from_secs(120));
    assert_success(&m.out, &"extract - of a 1 TiB drive");
    eprintln!(
        "extract 1 TiB from a pipe: {:?}, {} MiB peak",
        m.elapsed,
        m.max_rss_kib >> 10
    );
    assert!(m.max_rss_kib < 64 << 10, "peak {} KiB", m.max_rss_kib);
    check(&d.join("piped"), "from a pipe");
    std::fs::remove_dir_all(d.join("piped")).unwrap();
    // From the file, with its index (every extent record in memory).
    let m = run_measured(
        vma(["extract"]).arg(d.join("big.vma")).arg(d.join("file")),
        None,
        Duration::from_secs(120),
    );
    assert_success(&m.out, &"extract of a 1 TiB drive");
    eprintln!(
        "extract 1 TiB with its index: {:?}, {} MiB peak",
        m.elapsed,
        m.max_rss_kib >> 10
    );
    assert!(m.max_rss_kib < 1 << 20, "peak {} KiB", m.max_rss_kib);
    check(&d.join("file"), "from the file");
}

#[test]
fn a_header_that_claims_more_clusters_than_its_archive_holds_maps_nothing() {
    // The index of a plain .vma without one is built from its extent
    // headers; 254 × 256 TiB claimed by a header-only archive must be
    // refused before a cluster map (4 bytes a cluster) is allocated.
    let env = TestEnv::new();
    env.write("huge.vma", &huge_header());
    let m = run_measured(
        &mut env.cmd(["export", "huge.vma", "--listen", "unix:nbd.sock"]),
        Some(4 << 30),
        CMD_TIMEOUT,
    );
    let err = String::from_utf8_lossy(&m.out.stderr);
    assert_eq!(m.out.status.code(), Some(1), "{err}");
    assert!(m.max_rss_kib < 64 << 10, "peak {} KiB", m.max_rss_kib);
}

#[test]
fn a_64_mib_header_of_empty_blobs_costs_little_more_than_itself() {
    // The largest header we read, its blob area 33 million empty entries
    // after the real ones: only the entries pointers name are kept (a map
    // of all of them took 2.5 GB and 10 s).
    let mut a = archive_with(&[("qemu-server.conf", b"x")], &["drive-a"]);
    let hs = header_size(&a);
    let big = 64 << 20;
    let mut h = a[..hs].to_vec();
    h.resize(big, 0);
    put32(&mut h, 56, big as u32);
    put32(&mut h, 52, (big - FIXED_HEADER) as u32);
    reseal_header(&mut h);
    h.extend_from_slice(&a.split_off(hs));
    let env = TestEnv::new();
    env.write("big-header.vma", &h);
    for args in [
        vec!["list", "big-header.vma"],
        vec!["verify", "big-header.vma"],
    ] {
        let m = run_measured(&mut env.cmd(&args), Some(4 << 30), CMD_TIMEOUT);
        assert_success(&m.out, &args);
        assert!(
            m.max_rss_kib < 256 << 10,
            "{args:?} peaked at {} KiB",
            m.max_rss_kib
        );
        // md5 of 64 MiB and the walk: 1 s in a release build, 14 s in a
        // debug one (the binary under test has the test's profile).
        let limit = Duration::from_secs(if cfg!(debug_assertions) { 60 } else { 10 });
        assert!(m.elapsed < limit, "{args:?}: {:?}", m.elapsed);
    }
}
