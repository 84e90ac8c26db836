//! Proxmox's own `vma` as external golden vectors (`tests/fixtures/proxmox/`,
//! see its README): archives made by Proxmox VE's `vma create` and the
//! exact output of its `list`, `verify -v` and `extract`, with TZ=UTC. Our
//! reader must decode them to the sources, our commands must print
//! Proxmox's lines, `create` must round an odd size as Proxmox does, and our
//! writer, given the same uuid, ctime, configs and cluster order, must write
//! Proxmox's bytes exactly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use vma_writer::vma::{DevId, Reader, WriterBuilder};

use crate::support::*;

/// The fixture directory.
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proxmox")
}

fn fixture(name: &str) -> Vec<u8> {
    let p = fixtures().join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn fixture_text(name: &str) -> String {
    String::from_utf8(fixture(name)).unwrap()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `SHA256SUMS`: hash by file name (the odd-size restore is listed as
/// `odd-size restored disk-drive-sata0.raw (70144 bytes)`).
fn sums() -> BTreeMap<String, String> {
    fixture_text("SHA256SUMS")
        .lines()
        .map(|l| {
            let (hex, name) = l.split_once("  ").expect("<hex>  <name>");
            (name.to_string(), hex.to_string())
        })
        .collect()
}

/// A temp dir holding copies of the fixtures `names`, to run commands in
/// with Proxmox's relative paths.
fn env_with(names: &[&str]) -> TestEnv {
    let env = TestEnv::new();
    for n in names {
        env.write(n, &fixture(n));
    }
    env
}

/// The fixtures are what their README and SHA256SUMS say.
#[test]
fn fixtures_match_their_sha256sums() {
    let sums = sums();
    for name in [
        "drive-scsi0.raw",
        "drive-virtio1.raw",
        "odd.raw",
        "two-drives.vma",
        "odd-size.vma",
    ] {
        assert_eq!(sha256_hex(&fixture(name)), sums[name], "{name}");
    }
}

/// Our reader decodes Proxmox's archives to the sources (the odd-size one
/// to the source followed by 144 zero bytes: Proxmox recorded 70144 B).
#[test]
fn reader_decodes_proxmox_archives_to_the_sources() {
    let (h, devs) = read_back(&fixture("two-drives.vma")).unwrap();
    let names: Vec<&str> = h.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["drive-scsi0", "drive-virtio1"]);
    assert_same(&devs[0], &fixture("drive-scsi0.raw"), "drive-scsi0");
    assert_same(&devs[1], &fixture("drive-virtio1.raw"), "drive-virtio1");
    let configs: Vec<(&str, &[u8])> = h
        .configs
        .iter()
        .map(|c| (c.name.as_str(), c.data.as_slice()))
        .collect();
    assert_eq!(
        configs,
        [
            ("qemu-server.conf", &fixture("qemu-server.conf")[..]),
            ("qemu-server.fw", &fixture("qemu-server.fw")[..]),
        ]
    );

    let (h, devs) = read_back(&fixture("odd-size.vma")).unwrap();
    assert_eq!(h.devices[0].name, "drive-sata0");
    assert_eq!(h.devices[0].size, 70144);
    let mut want = fixture("odd.raw");
    assert_eq!(want.len(), 70000);
    want.resize(70144, 0);
    assert_same(&devs[0], &want, "drive-sata0");
}

/// `list` prints exactly what Proxmox's `vma list` printed.
#[test]
fn list_prints_proxmox_lines() {
    let env = env_with(&["two-drives.vma", "odd-size.vma"]);
    for name in ["two-drives", "odd-size"] {
        let out = env.ok(["list", &format!("{name}.vma")]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            fixture_text(&format!("{name}.list")),
            "{name}"
        );
    }
}

/// `duration N sec` depends on speed: the one field normalised.
fn without_durations(text: &str) -> String {
    text.lines()
        .map(|l| match l.find(", duration ") {
            Some(i) if l.ends_with(" sec)") => format!("{}, duration N sec)", &l[..i]),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `verify -v` prints exactly Proxmox's lines on stdout (header, progress
/// counting whole clusters up to 110 %, totals); stderr has only our
/// payload report (Proxmox's archive has no index).
#[test]
fn verify_verbose_prints_proxmox_lines() {
    let env = env_with(&["two-drives.vma"]);
    let out = env.run(["verify", "-v", "two-drives.vma"]);
    assert_success(&out, &"verify -v");
    let want = fixture_text("two-drives.verify-v.stdout");
    assert!(want.contains("duration 0 sec"), "fixture changed?");
    assert_eq!(
        without_durations(&String::from_utf8(out.stdout).unwrap()),
        without_durations(&want)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "payload not checksummed (no index)\n"
    );
}

/// Checks the drives and configs of an extraction against SHA256SUMS and
/// the config fixtures.
fn check_restore_of_two_drives(dir: &Path) {
    let sums = sums();
    for drive in ["drive-scsi0", "drive-virtio1"] {
        let got = std::fs::read(dir.join(format!("disk-{drive}.raw"))).unwrap();
        assert_eq!(sha256_hex(&got), sums[&format!("{drive}.raw")], "{drive}");
    }
    for c in ["qemu-server.conf", "qemu-server.fw"] {
        assert_eq!(std::fs::read(dir.join(c)).unwrap(), fixture(c), "{c}");
    }
    assert_eq!(tree(dir).len(), 4, "{:?}", tree(dir));
}

/// `extract` and `extract -v` print exactly Proxmox's lines (run with the
/// same relative directory names), and restore Proxmox's drives.
#[test]
fn extract_prints_proxmox_lines_and_restores_the_drives() {
    let env = env_with(&["two-drives.vma", "odd-size.vma"]);
    for (args, dir, want) in [
        (
            &["extract", "two-drives.vma", "restore"][..],
            "restore",
            "two-drives.extract.stdout",
        ),
        (
            &["extract", "-v", "two-drives.vma", "restore-v"][..],
            "restore-v",
            "two-drives.extract-v.stdout",
        ),
    ] {
        let out = env.run(args);
        assert_success(&out, &args);
        assert_eq!(
            without_durations(&String::from_utf8(out.stdout).unwrap()),
            without_durations(&fixture_text(want)),
            "{args:?}"
        );
        assert_eq!(String::from_utf8_lossy(&out.stderr), "", "{args:?}");
        check_restore_of_two_drives(&env.path(dir));
    }

    let out = env.ok(["extract", "odd-size.vma", "restore-odd"]);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        fixture_text("odd-size.extract.stdout")
    );
    let got = std::fs::read(env.path("restore-odd/disk-drive-sata0.raw")).unwrap();
    assert_eq!(got.len(), 70144);
    assert_eq!(
        sha256_hex(&got),
        sums()["odd-size restored disk-drive-sata0.raw (70144 bytes)"]
    );
}

/// `create` of Proxmox's 70,000-byte source records 70,144 bytes, as
/// Proxmox's `vma create` did, and lists like Proxmox's archive but for
/// the ctime.
#[test]
fn create_rounds_odd_raw_like_proxmox() {
    let env = env_with(&["odd.raw"]);
    env.ok(["create", "ours.vma", "-d", "format=raw:drive-sata0=odd.raw"]);
    let list = String::from_utf8(env.ok(["list", "ours.vma"])).unwrap();
    let want = fixture_text("odd-size.list");
    let strip_ctime = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with("CTIME: "))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    };
    assert_eq!(strip_ctime(&list), strip_ctime(&want));
    assert_eq!(
        strip_ctime(&list),
        "DEV: dev_id=1 size: 70144 devname: drive-sata0\n"
    );
    let (_, devs) = read_back(&std::fs::read(env.path("ours.vma")).unwrap()).unwrap();
    let (_, theirs) = read_back(&fixture("odd-size.vma")).unwrap();
    assert_same(&devs[0], &theirs[0], "drive-sata0");
}

/// One extent of an archive: `(device, cluster)` in blockinfo order.
type ExtentOrder = Vec<(DevId, u64)>;

/// The cluster order of an archive, extent by extent.
fn cluster_order(archive: &[u8]) -> Vec<ExtentOrder> {
    let mut r = Reader::new(archive).unwrap();
    let mut out = Vec::new();
    while let Some(ext) = r.next_extent().unwrap() {
        out.push(ext.clusters().map(|c| (c.dev, c.cluster)).collect());
    }
    out
}

/// Writes `archive` again with our writer: Proxmox's uuid, ctime,
/// configs, devices and cluster order (read from the archive, extent by
/// extent), the data from the sources (`device name` -> fixture file,
/// read as zeros past its end). Returns (ours, theirs).
fn rewrite(archive: &str, sources: &[(&str, &str)]) -> (Vec<u8>, Vec<u8>) {
    let theirs = fixture(archive);
    let h = Reader::new(&theirs[..]).unwrap().header().clone();
    let order = cluster_order(&theirs);
    let per_extent = order.iter().map(Vec::len).max().unwrap();
    let mut b = WriterBuilder::new()
        .uuid(h.uuid)
        .ctime(h.ctime)
        .clusters_per_extent(per_extent)
        .unwrap();
    for c in &h.configs {
        b.add_config(&c.name, &c.data).unwrap();
    }
    let mut data = BTreeMap::new();
    for d in &h.devices {
        assert_eq!(b.add_device(&d.name, d.size).unwrap(), d.id);
        let (_, file) = sources.iter().find(|(n, _)| *n == d.name).unwrap();
        let mut bytes = fixture(file);
        assert!(bytes.len() as u64 <= d.size);
        bytes.resize(d.size as usize, 0);
        data.insert(d.id, bytes);
    }
    let mut w = b.start(Vec::new()).unwrap();
    for extent in &order {
        for &(dev, cluster) in extent {
            let bytes = &data[&dev];
            let from = cluster as usize * CLUSTER;
            let to = (from + CLUSTER).min(bytes.len());
            w.write_cluster(dev, cluster, Bytes::copy_from_slice(&bytes[from..to]))
                .unwrap();
        }
        w.flush_extent().unwrap();
    }
    (w.finish().unwrap(), theirs)
}

/// Our writer, given what Proxmox's `vma create` was given (and the order
/// it wrote the clusters in), writes Proxmox's archives byte for byte.
#[test]
fn writer_reproduces_proxmox_bytes_exactly() {
    for (archive, sources) in [
        (
            "two-drives.vma",
            &[
                ("drive-scsi0", "drive-scsi0.raw"),
                ("drive-virtio1", "drive-virtio1.raw"),
            ][..],
        ),
        ("odd-size.vma", &[("drive-sata0", "odd.raw")][..]),
    ] {
        let (ours, theirs) = rewrite(archive, sources);
        if let Some(i) = first_difference(&ours, &theirs) {
            panic!(
                "{archive}: ours differs from Proxmox's at byte {i} (lengths {} and {})",
                ours.len(),
                theirs.len()
            );
        }
    }
}
