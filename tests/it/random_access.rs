//! Reading archives (issue 8, parts 3 and 4), through the binary and the
//! library: seekable `.vma.zst` is the plain archive under zstd; every
//! input format reads (plain zstd streams, Proxmox's `.vma.zst`, `.vma.gz`,
//! `.vma.lzo`); `convert` keeps the VMA bytes; a single-drive extract reads
//! only that drive's frames (counted by the reader and by the kernel); and
//! a corpus of corruptions, each failing with an error that names the
//! place.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use vma_writer::archive::{ArchiveError, RandomArchive};
use vma_writer::seekable::{FOOTER_LEN, FrameMap, decode_seek_table, seek_table_len};
use vma_writer::vma::DevId;

const UUID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
const CTIME: &str = "1700000000";

fn bin() -> Command {
    crate::support::cmd::vma::<[&str; 0], &str>([])
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run vma-writer")
}

/// Runs and asserts success; returns stdout and stderr.
fn ok(args: &[&str]) -> (String, String) {
    let o = run(args);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "{args:?} failed:\n{err}");
    (out, err)
}

/// Runs and asserts failure; returns stderr.
fn fails(args: &[&str]) -> String {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{args:?} succeeded");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// True when every tool is there; skips (or fails in CI) otherwise.
fn require(tools: &[&str]) -> bool {
    crate::support::tools::require_tools(tools)
}

/// Proxmox's reference archives (`tests/fixtures/proxmox`).
fn fixtures() -> Option<PathBuf> {
    Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proxmox"))
}

/// Deterministic bytes: random, with whole zero clusters and zero 4 KiB
/// blocks inside data clusters.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = vec![0u8; len];
    for (i, b) in v.iter_mut().enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let block = i / 4096;
        if block % 7 != 3 && (i / 65536) % 5 != 2 {
            *b = x as u8;
        }
    }
    v
}

fn zstd_dc(p: &Path) -> Vec<u8> {
    let o = Command::new("zstd").args(["-dc", s(p)]).output().unwrap();
    assert!(o.status.success(), "zstd -dc {}", p.display());
    o.stdout
}

/// Writes images for `drives` (name, size, seed) into `dir`; returns the
/// `-d NAME=PATH` arguments and the contents.
fn images(dir: &Path, drives: &[(&str, usize, u64)]) -> (Vec<String>, Vec<Vec<u8>>) {
    let mut args = Vec::new();
    let mut contents = Vec::new();
    for &(name, size, seed) in drives {
        let d = data(size, seed);
        let p = dir.join(format!("{name}.img"));
        std::fs::write(&p, &d).unwrap();
        args.push("-d".to_string());
        args.push(format!("{name}={}", p.display()));
        contents.push(d);
    }
    (args, contents)
}

fn create(out: &Path, drive_args: &[String], extra: &[&str]) {
    let mut args = vec![
        "create",
        s(out),
        "--uuid",
        UUID,
        "--ctime",
        CTIME,
        "--threads",
        "2",
    ];
    args.extend(extra);
    args.extend(drive_args.iter().map(String::as_str));
    ok(&args);
}

fn check_extracted(dir: &Path, names: &[&str], contents: &[Vec<u8>]) {
    for (n, c) in names.iter().zip(contents) {
        let got = std::fs::read(dir.join(format!("disk-{n}.raw"))).unwrap();
        assert!(
            got == crate::support::data::as_restored(c),
            "drive {n} differs"
        );
    }
}

/// Every cluster of every drive through the library, on each kind of
/// random-access file.
fn check_random(path: &Path, names: &[&str], contents: &[Vec<u8>], digests: bool) {
    let ra = RandomArchive::open(s(path)).unwrap();
    assert_eq!(ra.has_digests(), digests, "{}", path.display());
    for (i, c) in contents.iter().enumerate() {
        let dev = DevId(i as u8 + 1);
        assert_eq!(ra.header().device(dev).unwrap().name, names[i]);
        let want = crate::support::data::as_restored(c);
        let mut got = vec![0u8; want.len()];
        for (k, chunk) in got.chunks_mut(65536).enumerate() {
            ra.read_cluster(dev, k as u64)
                .unwrap()
                .data()
                .expand_into(chunk);
        }
        assert!(
            got == want,
            "{}: drive {} differs",
            path.display(),
            names[i]
        );
    }
    check_unaligned_and_cached(path, contents);
}

/// Unaligned ranges through `read_into`, then the same through
/// `read_into_if_cached`, which answers only from memory: a fresh
/// `.vma.zst` has no frame decompressed (so it must say so), and once its
/// frames are loaded (or a plain file's pages cached, as a file just
/// written is) it gives the same bytes.
fn check_unaligned_and_cached(path: &Path, contents: &[Vec<u8>]) {
    let ra = RandomArchive::open(s(path)).unwrap();
    let zst = path.extension().is_some_and(|e| e == "zst");
    for (i, c) in contents.iter().enumerate() {
        let dev = DevId(i as u8 + 1);
        let want = crate::support::data::as_restored(c);
        let ranges = [
            (0, want.len()),
            (1, 4096),
            (65536 - 7, 70_000),
            (123_457, 1),
        ];
        for (at, len) in ranges {
            let (at, len) = (at.min(want.len()), len.min(want.len() - at.min(want.len())));
            let clusters = at as u64 / 65536..(at + len).div_ceil(65536) as u64;
            let frames = ra.frames_holding(dev, clusters, u64::MAX);
            let stored = want[at..at + len].iter().any(|&b| b != 0);
            if zst && stored {
                assert!(!frames.is_empty(), "{}: data but no frame", path.display());
            }
            if !zst {
                assert!(frames.is_empty(), "a plain archive has no frames");
            }
            let mut got = vec![0xa5u8; len];
            if zst && frames.iter().any(|&f| !ra.frame_loaded(f)) {
                assert!(
                    !ra.read_into_if_cached(dev, at as u64, &mut got).unwrap(),
                    "{}: [{at}, +{len}) read from memory before its frames were loaded",
                    path.display()
                );
                for &f in &frames {
                    ra.load_frame(f).unwrap();
                    assert!(ra.frame_loaded(f));
                }
            }
            if ra.read_into_if_cached(dev, at as u64, &mut got).unwrap() {
                assert!(
                    got == want[at..at + len],
                    "{}: cached [{at}, +{len})",
                    path.display()
                );
            } else {
                assert!(
                    !zst,
                    "{}: loaded frames but not read from memory",
                    path.display()
                );
            }
            ra.read_into(dev, at as u64, &mut got).unwrap();
            assert!(
                got == want[at..at + len],
                "{}: [{at}, +{len})",
                path.display()
            );
        }
    }
}

#[test]
fn seekable_zstd_is_the_plain_archive_for_1_2_and_8_devices() {
    if !require(&["zstd"]) {
        return;
    }
    let sizes = [
        70_000,
        3 * 65536 + 4096 + 512,
        1,
        65536,
        400_000 + 17,
        5 * 65536,
        123_457,
        2 * 65536 - 1,
    ];
    for n in [1usize, 2, 8] {
        let t = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..n).map(|i| format!("drive-scsi{i}")).collect();
        let drives: Vec<(&str, usize, u64)> = (0..n)
            .map(|i| (names[i].as_str(), sizes[i], i as u64 + 10 * n as u64))
            .collect();
        let (args, contents) = images(t.path(), &drives);
        let plain = t.path().join("a.vma");
        let zst = t.path().join("a.vma.zst");
        create(&plain, &args, &[]);
        create(&zst, &args, &["--zstd"]);
        let plain_bytes = std::fs::read(&plain).unwrap();
        let unz = zstd_dc(&zst);
        if unz != plain_bytes {
            let at = unz.iter().zip(&plain_bytes).position(|(a, b)| a != b);
            panic!(
                "{n} devices: zstd -dc differs at {at:?} ({} vs {} bytes)",
                unz.len(),
                plain_bytes.len()
            );
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        for (p, tag) in [(&plain, "p"), (&zst, "z")] {
            let (_, err) = ok(&["verify", s(p)]);
            assert!(
                err.contains("clusters verified against digests"),
                "{n} devices, {tag}: {err}"
            );
            let dir = t.path().join(format!("x-{tag}"));
            ok(&["extract", s(p), s(&dir)]);
            check_extracted(&dir, &names, &contents);
            check_random(p, &names, &contents, true);
        }
        // Without its sidecar a plain archive is mapped from its extent
        // headers.
        std::fs::remove_file(t.path().join("a.vma.index")).unwrap();
        check_random(&plain, &names, &contents, false);
        let (_, err) = ok(&["verify", s(&plain)]);
        assert!(err.contains("payload not checksummed (no index)"), "{err}");
        // A subset, read at random.
        let last = names[n - 1];
        for p in [&plain, &zst] {
            let dir = t
                .path()
                .join(format!("sub-{}", p.extension().unwrap().to_str().unwrap()));
            ok(&["extract", "-d", last, s(p), s(&dir)]);
            check_extracted(&dir, &[last], &contents[n - 1..]);
            assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        }
    }
}

#[test]
fn a_plain_zstd_stream_reads_front_to_back() {
    if !require(&["zstd"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (args, contents) = images(t.path(), &[("a", 300_000, 1), ("b", 100_000, 2)]);
    let plain = t.path().join("a.vma");
    create(&plain, &args, &[]);
    let z = t.path().join("p.vma.zst");
    let st = Command::new("zstd")
        .args(["-q", "-3", s(&plain), "-o", s(&z)])
        .status()
        .unwrap();
    assert!(st.success());
    let (_, err) = ok(&["verify", s(&z)]);
    assert!(err.contains("payload not checksummed (no index)"), "{err}");
    let dir = t.path().join("x");
    ok(&["extract", "-d", "b", s(&z), s(&dir)]);
    check_extracted(&dir, &["b"], &contents[1..]);
    let e = RandomArchive::open(s(&z)).err().unwrap();
    assert!(matches!(e, ArchiveError::NotRandomAccess(_)), "{e}");
    assert!(e.to_string().contains("vma-writer convert"), "{e}");
    // On stdin too, whatever the name.
    let o = bin()
        .args(["verify", "-"])
        .stdin(std::fs::File::open(&z).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success());
    // And converted, it becomes random access with the same bytes.
    let c = t.path().join("c.vma.zst");
    ok(&["convert", s(&z), s(&c)]);
    assert!(zstd_dc(&c) == std::fs::read(&plain).unwrap());
    check_random(&c, &["a", "b"], &contents, true);
}

/// Drops the `duration N sec` of progress lines (it depends on speed).
fn without_durations(s: &str) -> String {
    s.lines()
        .map(|l| l.split(", duration").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn proxmox_archives_read_in_every_compression_and_convert_unchanged() {
    let Some(fx) = fixtures() else { return };
    if !require(&["zstd", "gzip", "lzop"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let plain = std::fs::read(fx.join("two-drives.vma")).unwrap();
    let list = std::fs::read_to_string(fx.join("two-drives.list")).unwrap();
    let verify = std::fs::read_to_string(fx.join("two-drives.verify-v.stdout")).unwrap();
    let sources: Vec<Vec<u8>> = ["drive-scsi0.raw", "drive-virtio1.raw"]
        .iter()
        .map(|n| std::fs::read(fx.join(n)).unwrap())
        .collect();
    for ext in ["vma", "vma.zst", "vma.gz", "vma.lzo"] {
        let input = fx.join(format!("two-drives.{ext}"));
        assert_eq!(ok(&["list", s(&input)]).0, list, "{ext}");
        let (out, err) = ok(&["verify", "-v", s(&input)]);
        assert_eq!(without_durations(&out), without_durations(&verify), "{ext}");
        assert!(err.contains("payload not checksummed (no index)"), "{err}");
        let dir = t.path().join(format!("x-{ext}"));
        ok(&["extract", s(&input), s(&dir)]);
        check_extracted(&dir, &["drive-scsi0", "drive-virtio1"], &sources);
        // From stdin: detected by magic.
        let o = bin()
            .args(["list", "-"])
            .stdin(std::fs::File::open(&input).unwrap())
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&o.stdout), list, "{ext} on stdin");
        // convert: the same VMA bytes, now with an index.
        let out = t
            .path()
            .join(format!("c-{}.vma.zst", ext.replace('.', "-")));
        ok(&["convert", "--threads", "2", s(&input), s(&out)]);
        assert!(
            zstd_dc(&out) == plain,
            "convert of {ext} changed the VMA bytes"
        );
        let (_, err) = ok(&["verify", s(&out)]);
        assert!(
            err.contains("payload: 16 clusters verified against digests"),
            "{err}"
        );
        let out = t.path().join(format!("c-{}.vma", ext.replace('.', "-")));
        ok(&["convert", s(&input), s(&out)]);
        assert!(std::fs::read(&out).unwrap() == plain);
        assert!(
            t.path()
                .join(format!("c-{}.vma.index", ext.replace('.', "-")))
                .exists()
        );
    }
    // A single drive read at random prints Proxmox's progress and totals:
    // the clusters it skips count too, from the index.
    let want = std::fs::read_to_string(fx.join("two-drives.extract-v.stdout")).unwrap();
    let want: Vec<&str> = want.lines().filter(|l| !l.starts_with("DEVINFO")).collect();
    for input in [fx.join("two-drives.vma"), t.path().join("c-vma.vma.zst")] {
        let dir = t.path().join("one");
        let (out, _) = ok(&["extract", "-v", "-d", "drive-virtio1", s(&input), s(&dir)]);
        let got: Vec<&str> = out.lines().filter(|l| !l.starts_with("DEVINFO")).collect();
        assert_eq!(
            without_durations(&got.join("\n")),
            without_durations(&want.join("\n"))
        );
        assert_eq!(out.lines().filter(|l| l.starts_with("DEVINFO")).count(), 1);
        check_extracted(&dir, &["drive-virtio1"], &sources[1..]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // A corrupt gzip stream fails (the child's failure is an error).
    let mut gz = std::fs::read(fx.join("two-drives.vma.gz")).unwrap();
    let n = gz.len();
    gz.truncate(n - 100);
    let bad = t.path().join("cut.vma.gz");
    std::fs::write(&bad, &gz).unwrap();
    let err = fails(&["verify", s(&bad)]);
    assert!(
        err.contains("gzip -dc") || err.contains("truncated"),
        "{err}"
    );
}

/// Runs vma-writer with `args` and returns how many bytes it read, as the
/// kernel counts them (`rchar` of `/proc/PID/io`, read once the process
/// has exited but before it is reaped).
fn rchar_of(args: &[&str]) -> u64 {
    let child = bin()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // SAFETY: waitid on our own child, with a zeroed siginfo to fill.
    let r = unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT)
    };
    assert_eq!(r, 0, "waitid");
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    let st = child.wait_with_output().unwrap();
    assert!(
        st.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .parse()
        .unwrap()
}

/// Bytes a process reads besides the archive (the binary's libraries,
/// /proc, locale files): a generous bound.
const PROCESS_SLACK: u64 = 256 << 10;

#[test]
fn a_single_drive_extract_reads_only_that_drives_frames() {
    let t = tempfile::tempdir().unwrap();
    let big = 24 << 20;
    let (args, contents) = images(
        t.path(),
        &[("big1", big, 1), ("small", 200_000, 2), ("big2", big, 3)],
    );
    let zst = t.path().join("a.vma.zst");
    let plain = t.path().join("a.vma");
    create(&zst, &args, &[]);
    create(&plain, &args, &[]);
    let small = DevId(2);
    for p in [&zst, &plain] {
        let file_len = std::fs::metadata(p).unwrap().len();
        let ra = RandomArchive::open(s(p)).unwrap();
        let opened = ra.bytes_read();
        let xs = ra.index().extents_of(&[small]);
        assert!(xs.len() <= 2, "{xs:?}");
        // What the small drive's extents take in the file.
        let share: u64 = match ra.file().layout() {
            vma_writer::archive::file::Layout::Seekable { frames, .. } => {
                let mut fs: Vec<u32> = xs.iter().map(|&x| ra.index().extents[x].frame).collect();
                fs.dedup();
                fs.iter()
                    .map(|&f| u64::from(frames.frame(f as usize).unwrap().2.compressed))
                    .sum()
            }
            vma_writer::archive::file::Layout::Plain => {
                xs.iter().map(|&x| ra.index().extents[x].len()).sum()
            }
        };
        let mut got = Vec::new();
        for &x in &xs {
            got.extend(ra.read_extent(x, |d| d == small).unwrap());
        }
        assert_eq!(got.len(), 4, "the small drive's 4 clusters");
        assert_eq!(ra.bytes_read() - opened, share, "{}", p.display());
        assert!(
            ra.bytes_read() < file_len / 5,
            "{}: {}",
            p.display(),
            ra.bytes_read()
        );

        // The CLI, measured by the kernel.
        let dir = t
            .path()
            .join(format!("x-{}", p.extension().unwrap().to_str().unwrap()));
        let rchar = rchar_of(&["extract", "-d", "small", s(p), s(&dir)]);
        check_extracted(&dir, &["small"], &contents[1..2]);
        assert!(
            rchar <= opened + share + PROCESS_SLACK,
            "{}: extract read {rchar} bytes; the drive's share is {share}, opening {opened}",
            p.display()
        );
        assert!(
            rchar < file_len / 5,
            "{}: {rchar} of {file_len}",
            p.display()
        );
    }
    // list reads the header only: frame 0 (and the seek table).
    let rchar = rchar_of(&["list", s(&zst)]);
    assert!(
        rchar < (64 << 10) + PROCESS_SLACK,
        "list read {rchar} bytes"
    );
}

/// The frames of a seekable file: (compressed offset, compressed size).
fn frames_of(bytes: &[u8]) -> Vec<(usize, usize)> {
    let n = seek_table_len(&bytes[bytes.len() - FOOTER_LEN..]).unwrap() as usize;
    let table = decode_seek_table(&bytes[bytes.len() - n..]).unwrap();
    FrameMap::new(&table)
        .iter()
        .map(|(at, _, e)| (at as usize, e.compressed as usize))
        .collect()
}

#[test]
fn corruption_corpus() {
    let t = tempfile::tempdir().unwrap();
    let (args, _) = images(t.path(), &[("a", 5 * 65536, 1), ("b", 9 * 65536 + 1000, 2)]);
    let dir = |n: &str| t.path().join(n);

    // A flipped payload byte in a plain .vma with its index.
    // Small extents, so that the archives have several.
    let small = ["--clusters-per-extent", "4"];
    let plain = dir("p.vma");
    create(&plain, &args, &small);
    let ra = RandomArchive::open(s(&plain)).unwrap();
    let loc = ra.index().locate(DevId(2), 6).unwrap();
    assert_ne!(loc.mask, 0);
    drop(ra);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(&plain)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, loc.stream_offset + 77).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], loc.stream_offset + 77)
        .unwrap();
    drop(f);
    let want = "device 2 ('b') cluster 6: the data does not match its digest";
    assert!(fails(&["verify", s(&plain)]).contains(want));
    let err = fails(&["extract", s(&plain), s(&dir("x1"))]);
    assert!(err.contains(want), "{err}");
    assert!(!dir("x1").exists(), "a failed extract leaves nothing");
    let err = fails(&["extract", "-d", "b", s(&plain), s(&dir("x2"))]);
    assert!(err.contains(want), "{err}");
    assert!(!dir("x2").exists());
    let e = RandomArchive::open(s(&plain))
        .unwrap()
        .read_cluster(DevId(2), 6)
        .unwrap_err();
    assert!(e.to_string().contains(want), "{e}");
    // The other drive is intact and extracts.
    ok(&["extract", "-d", "a", s(&plain), s(&dir("x3"))]);

    // A corrupt zstd frame (a byte inside frame 2: extent 1).
    let zst = dir("z.vma.zst");
    create(&zst, &args, &["--zstd", "--clusters-per-extent", "4"]);
    let good = std::fs::read(&zst).unwrap();
    let frames = frames_of(&good);
    let (at, len) = frames[2];
    let mut bad = good.clone();
    bad[at + len / 2] ^= 0x55;
    let corrupt = dir("corrupt.vma.zst");
    std::fs::write(&corrupt, &bad).unwrap();
    for cmd in [vec!["verify"], vec!["extract", "-d", "b"], vec!["extract"]] {
        let mut a = cmd.clone();
        a.push(s(&corrupt));
        let out = dir("xc");
        if cmd[0] == "extract" {
            a.push(s(&out));
        }
        let err = fails(&a);
        assert!(err.contains("zstd frame 2 (extent 1)"), "{cmd:?}: {err}");
        assert!(!out.exists());
    }

    // A truncated frame, the seek table intact: 100 bytes cut from frame
    // 2, its seek table entry shortened to match.
    let mut cut = good[..at + len - 100].to_vec();
    cut.extend_from_slice(&good[at + len..]);
    let n = cut.len();
    let table_len = seek_table_len(&cut[n - FOOTER_LEN..]).unwrap() as usize;
    let entry = n - table_len + 8 + 2 * 8; // skippable header, then entry 2
    let c = u32::from_le_bytes(cut[entry..entry + 4].try_into().unwrap());
    cut[entry..entry + 4].copy_from_slice(&(c - 100).to_le_bytes());
    let truncated = dir("truncated.vma.zst");
    std::fs::write(&truncated, &cut).unwrap();
    let err = fails(&["extract", "-d", "b", s(&truncated), s(&dir("xt"))]);
    assert!(err.contains("zstd frame 2 (extent 1): truncated"), "{err}");
    let err = fails(&["verify", s(&truncated)]);
    assert!(err.contains("zstd frame 2 (extent 1)"), "{err}");
    // A file cut inside a frame loses its seek table: read as a stream,
    // the error still names the frame and the extent being read.
    let cut_file = dir("cut.vma.zst");
    std::fs::write(&cut_file, &good[..at + len / 2]).unwrap();
    let err = fails(&["verify", s(&cut_file)]);
    assert!(
        err.contains("zstd frame 2") && err.contains("truncated"),
        "{err}"
    );
    assert!(err.contains("extent 1 (offset"), "{err}");

    // A stale index: another archive of the same name and uuid, of another
    // length.
    let other = tempfile::tempdir().unwrap();
    let (args2, _) = images(other.path(), &[("a", 5 * 65536, 1), ("b", 2 * 65536, 7)]);
    let stale_src = other.path().join("p.vma");
    create(&stale_src, &args2, &small);
    let stale = dir("s.vma");
    create(&stale, &args, &small);
    std::fs::remove_file(dir("s.vma.index")).unwrap();
    std::fs::copy(other.path().join("p.vma.index"), dir("s.vma.index")).unwrap();
    for a in [
        vec!["verify", s(&stale)],
        vec!["extract", "-d", "a", s(&stale), s(&dir("xs"))],
    ] {
        let err = fails(&a);
        assert!(err.contains("s.vma.index"), "{err}");
        assert!(err.contains("stale or foreign index"), "{err}");
    }
    // ... of the same length, other data: the digests tell.
    let same_len = tempfile::tempdir().unwrap();
    let (args3, _) = images(
        same_len.path(),
        &[("a", 5 * 65536, 1), ("b", 9 * 65536 + 1000, 2)],
    );
    // Same masks, other bytes: xor the images with a constant.
    for name in ["a.img", "b.img"] {
        let p = same_len.path().join(name);
        let d: Vec<u8> = std::fs::read(&p)
            .unwrap()
            .iter()
            .map(|&x| if x == 0 { 0 } else { x.wrapping_add(1).max(1) })
            .collect();
        std::fs::write(&p, d).unwrap();
    }
    create(&same_len.path().join("p.vma"), &args3, &small);
    let stale2 = dir("s2.vma");
    create(&stale2, &args, &small);
    std::fs::remove_file(dir("s2.vma.index")).unwrap();
    std::fs::copy(same_len.path().join("p.vma.index"), dir("s2.vma.index")).unwrap();
    let err = fails(&["verify", s(&stale2)]);
    assert!(err.contains("device 1 ('a') cluster 0"), "{err}");

    // A foreign index: another uuid.
    let foreign = dir("f.vma");
    let mut a = vec![
        "create".to_string(),
        s(&foreign).to_string(),
        "--uuid".into(),
        "11111111-2222-3333-4444-555555555555".into(),
    ];
    a.extend(args.iter().cloned());
    ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    std::fs::remove_file(dir("f.vma.index")).unwrap();
    std::fs::copy(dir("s2.vma.index"), dir("f.vma.index")).unwrap();
    let err = fails(&["verify", s(&foreign)]);
    assert!(
        err.contains("the index belongs to another archive"),
        "{err}"
    );
    let err = fails(&["extract", "-d", "b", s(&foreign), s(&dir("xf"))]);
    assert!(
        err.contains("the index belongs to another archive"),
        "{err}"
    );
}

#[test]
fn convert_commits_only_a_complete_archive() {
    let t = tempfile::tempdir().unwrap();
    let (args, _) = images(t.path(), &[("a", 40 * 65536, 1)]);
    let plain = t.path().join("a.vma");
    create(&plain, &args, &["--clusters-per-extent", "4"]);
    let bytes = std::fs::read(&plain).unwrap();

    // Interrupted: the input stalls half-way, then Ctrl-C.
    for keep in [false, true] {
        let out = t.path().join(format!("int-{keep}.vma.zst"));
        let mut a = vec!["convert", "-", s(&out)];
        if keep {
            a.push("--keep-partial");
        }
        let mut child = bin()
            .args(&a)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        std::io::Write::write_all(&mut stdin, &bytes[..bytes.len() / 2]).unwrap();
        let partial = t.path().join(format!("int-{keep}.vma.zst.partial"));
        for _ in 0..500 {
            if partial.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(partial.exists());
        std::thread::sleep(std::time::Duration::from_millis(100));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let o = child.wait_with_output().unwrap();
        drop(stdin);
        assert_eq!(o.status.code(), Some(130));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("convert interrupted by SIGINT"), "{err}");
        assert!(!out.exists());
        assert_eq!(partial.exists(), keep, "{err}");
    }

    // Failed: a corrupt input leaves no output.
    let mut bad = bytes.clone();
    let n = bad.len();
    bad.truncate(n - 4096);
    let cut = t.path().join("cut.vma");
    std::fs::write(&cut, &bad).unwrap();
    let out = t.path().join("out.vma");
    let err = fails(&["convert", s(&cut), s(&out)]);
    assert!(err.contains("truncated"), "{err}");
    for p in [
        "out.vma",
        "out.vma.partial",
        "out.vma.index",
        "out.vma.index.partial",
    ] {
        assert!(!t.path().join(p).exists(), "{p}");
    }
    // Refuses to overwrite.
    let err = fails(&["convert", s(&plain), s(&plain)]);
    assert!(err.contains("already exists"), "{err}");
}
