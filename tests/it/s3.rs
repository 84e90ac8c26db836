//! Archives in S3-compatible object storage, against a real S3 server
//! (s3s-fs, in this process: [`crate::support::s3`]): written by
//! `create` and `convert` as multipart uploads, byte for byte what the
//! same command writes to a file; read back by `list`, `config`,
//! `verify`, `extract` and `export` through ranged GETs, fetching only
//! what they need (counted at the server); and the failures: an existing
//! key, a missing bucket or key, wrong credentials, a store lost in the
//! middle of an upload (nothing left behind, not even parts).

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::support::s3::S3Server;
use crate::support::*;

const UUID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
const CTIME: &str = "1700000000";

/// Bytes of response headers and XML per request, and what a block
/// cache fetches around the header: a generous bound.
const REQUEST_SLACK: u64 = 256 << 10;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `vma-writer ARGS` with `server`'s credentials.
fn on(server: &S3Server, args: &[&str]) -> Command {
    let mut c = vma(args);
    server.env(&mut c);
    c
}

fn ok_on(server: &S3Server, args: &[&str]) -> Output {
    let out = run(&mut on(server, args));
    assert_success(&out, &args);
    out
}

fn fails_on(server: &S3Server, args: &[&str]) -> String {
    let out = run(&mut on(server, args));
    assert_failure(&out, &args)
}

/// Drive images (name, size, seed) in `dir`: `-d NAME=PATH` arguments
/// and the contents.
fn images(dir: &Path, drives: &[(&str, usize, u64)]) -> (Vec<String>, Vec<Vec<u8>>) {
    let mut args = Vec::new();
    let mut contents = Vec::new();
    for &(name, size, seed) in drives {
        let d = holey_data(size, seed);
        let p = dir.join(format!("{name}.img"));
        std::fs::write(&p, &d).unwrap();
        args.push("-d".to_string());
        args.push(format!("{name}={}", p.display()));
        contents.push(d);
    }
    (args, contents)
}

fn create_args<'a>(out: &'a str, drives: &'a [String], conf: &'a str) -> Vec<&'a str> {
    let mut args = vec![
        "create",
        out,
        "--uuid",
        UUID,
        "--ctime",
        CTIME,
        "--threads",
        "2",
        "-c",
        conf,
    ];
    args.extend(drives.iter().map(String::as_str));
    args
}

/// Bytes of `archive` that hold the extents (or their frames) with
/// clusters of drive `name`.
fn drive_share(archive: &Path, name: &str) -> u64 {
    use vma_writer::archive::RandomArchive;
    use vma_writer::archive::file::Layout;
    let ra = RandomArchive::open(s(archive)).unwrap();
    let dev = ra
        .header()
        .devices
        .iter()
        .find(|d| d.name == name)
        .unwrap()
        .id;
    let xs = ra.index().extents_of(&[dev]);
    match ra.file().layout() {
        Layout::Seekable { frames, .. } => {
            let mut fs: Vec<u32> = xs.iter().map(|&x| ra.index().extents[x].frame).collect();
            fs.dedup();
            fs.iter()
                .map(|&f| u64::from(frames.frame(f as usize).unwrap().2.compressed))
                .sum()
        }
        Layout::Plain => xs.iter().map(|&x| ra.index().extents[x].len()).sum(),
    }
}

fn check_drive(dir: &Path, name: &str, content: &[u8]) {
    let got = std::fs::read(dir.join(format!("disk-{name}.raw"))).unwrap();
    assert!(got == as_restored(content), "drive {name} differs");
}

#[test]
fn create_to_s3_is_the_local_archive_and_reads_back_by_ranges() {
    let server = S3Server::start();
    server.bucket("bkt");
    let t = TestEnv::new();
    let big = 6 << 20;
    let names = ["big1", "small", "big2", "big3"];
    let (drives, contents) = images(
        t.dir.path(),
        &[
            ("big1", big, 1),
            ("small", 200_000, 2),
            ("big2", big, 3),
            ("big3", big, 4),
        ],
    );
    let conf = t.write("qemu-server.conf", b"memory: 512\nname: s3test\n");
    for name in ["a.vma", "a.vma.zst"] {
        let local = t.path(name);
        ok_on(&server, &create_args(s(&local), &drives, s(&conf)));
        let url = format!("s3://bkt/backups/{name}");
        // Small parts, so the upload has several.
        let mut args = create_args(&url, &drives, s(&conf));
        args.extend(["--s3-part-size", "5M", "--s3-parts-in-flight", "2"]);
        ok_on(&server, &args);
        let object = server.object_path("bkt", &format!("backups/{name}"));
        assert_same_file(&object, &local);
        let index = t.path(format!("{name}.index"));
        let index_object = server.object_path("bkt", &format!("backups/{name}.index"));
        assert_eq!(index.exists(), index_object.exists(), "{name}");
        if index.exists() {
            assert_same_file(&index_object, &index);
        }
        assert!(server.upload_leftovers().is_empty());
        let object_len = std::fs::metadata(&object).unwrap().len();

        // list and config read the header only.
        let before = server.sent();
        let listed = ok_on(&server, &["list", &url]).stdout;
        assert!(
            server.sent() - before < REQUEST_SLACK,
            "{name}: list fetched {} bytes",
            server.sent() - before
        );
        assert_eq!(listed, ok_on(&server, &["list", s(&local)]).stdout);
        let config = ok_on(&server, &["config", &url, "-c", "qemu-server.conf"]).stdout;
        assert_eq!(config, std::fs::read(&conf).unwrap());

        ok_on(&server, &["verify", &url]);
        let from_s3 = t.path(format!("x-s3-{name}"));
        let from_file = t.path(format!("x-file-{name}"));
        ok_on(&server, &["extract", &url, s(&from_s3)]);
        ok_on(&server, &["extract", s(&local), s(&from_file)]);
        assert_eq!(tree(&from_s3), tree(&from_file));
        for n in names {
            let f = format!("disk-{n}.raw");
            assert_same_file(&from_s3.join(&f), &from_file.join(&f));
        }
        for (n, c) in names.iter().zip(&contents) {
            check_drive(&from_s3, n, c);
        }

        // One drive: only its extents (a small share of the object).
        let before = server.sent();
        let one = t.path(format!("x-small-{name}"));
        ok_on(&server, &["extract", "-d", "small", &url, s(&one)]);
        let fetched = server.sent() - before;
        check_drive(&one, "small", &contents[1]);
        assert!(!one.join("disk-big1.raw").exists());
        let share = drive_share(&local, "small");
        assert!(
            fetched <= share + REQUEST_SLACK && fetched < object_len / 3,
            "{name}: extract -d small fetched {fetched} of {object_len} bytes; its extents \
             take {share}"
        );
    }
}

#[test]
fn convert_between_file_and_object() {
    let server = S3Server::start();
    server.bucket("bkt");
    let t = TestEnv::new();
    let (drives, contents) = images(t.dir.path(), &[("a", 3 << 20, 7), ("b", 1 << 20, 8)]);
    let conf = t.write("qemu-server.conf", b"name: c\n");
    let plain = t.path("a.vma");
    ok_on(&server, &create_args(s(&plain), &drives, s(&conf)));
    // File -> object (seekable zstd) -> file (plain): the same archive.
    ok_on(&server, &["convert", s(&plain), "s3://bkt/c.vma.zst"]);
    let back = t.path("back.vma");
    ok_on(&server, &["convert", "s3://bkt/c.vma.zst", s(&back)]);
    assert_same_file(&back, &plain);
    let x = t.path("x");
    ok_on(&server, &["extract", "s3://bkt/c.vma.zst", s(&x)]);
    check_drive(&x, "a", &contents[0]);
    check_drive(&x, "b", &contents[1]);
}

#[test]
fn a_zstd_object_without_seek_table_is_read_as_one_stream() {
    if !require_tools(&["zstd"]) {
        return;
    }
    let server = S3Server::start();
    server.bucket("bkt");
    let t = TestEnv::new();
    let (drives, contents) = images(t.dir.path(), &[("a", 2 << 20, 9)]);
    let conf = t.write("qemu-server.conf", b"name: z\n");
    let plain = t.path("a.vma");
    ok_on(&server, &create_args(s(&plain), &drives, s(&conf)));
    // A plain zstd stream, as `zstd` writes it, put in place by hand.
    let obj = server.object_path("bkt", "z.vma.zst");
    run_ok(Command::new("zstd").args(["-q", "-o", s(&obj), s(&plain)]));
    ok_on(&server, &["verify", "s3://bkt/z.vma.zst"]);
    let x = t.path("x");
    ok_on(&server, &["extract", "s3://bkt/z.vma.zst", s(&x)]);
    check_drive(&x, "a", &contents[0]);
    let err = fails_on(
        &server,
        &[
            "export",
            "--listen",
            "tcp:127.0.0.1:0",
            "s3://bkt/z.vma.zst",
        ],
    );
    assert!(err.contains("without a seek table"), "{err}");
}

#[test]
fn an_existing_key_is_never_overwritten() {
    let server = S3Server::start();
    server.bucket("bkt");
    let t = TestEnv::new();
    let (drives, _) = images(t.dir.path(), &[("a", 1 << 20, 1)]);
    let conf = t.write("qemu-server.conf", b"x\n");
    ok_on(&server, &create_args("s3://bkt/a.vma", &drives, s(&conf)));
    let object = server.object_path("bkt", "a.vma");
    let first = std::fs::read(&object).unwrap();
    let (other, _) = images(t.dir.path(), &[("a", 1 << 20, 2)]);
    let err = fails_on(&server, &create_args("s3://bkt/a.vma", &other, s(&conf)));
    assert!(err.contains("s3://bkt/a.vma already exists"), "{err}");
    assert_eq!(std::fs::read(&object).unwrap(), first);
    // An index without its archive blocks the name too.
    std::fs::remove_file(&object).unwrap();
    let err = fails_on(&server, &create_args("s3://bkt/a.vma", &other, s(&conf)));
    assert!(err.contains("a.vma.index"), "{err}");
    assert!(!object.exists());
    assert!(server.upload_leftovers().is_empty());
}

#[test]
fn missing_bucket_missing_key_and_wrong_credentials_are_named() {
    let server = S3Server::start();
    server.bucket("bkt");
    let t = TestEnv::new();
    let (drives, _) = images(t.dir.path(), &[("a", 1 << 20, 1)]);
    let conf = t.write("qemu-server.conf", b"x\n");
    let err = fails_on(&server, &create_args("s3://nope/a.vma", &drives, s(&conf)));
    assert!(err.contains("no such bucket nope"), "{err}");
    let err = fails_on(&server, &["list", "s3://bkt/missing.vma"]);
    assert!(
        err.contains("s3://bkt/missing.vma: no such object"),
        "{err}"
    );
    let err = fails_on(&server, &["verify", "s3://nope/missing.vma"]);
    assert!(err.contains("no such bucket nope"), "{err}");
    assert!(!server.root.path().join("nope").exists());

    let mut c = vma(create_args("s3://bkt/a.vma", &drives, s(&conf)));
    server.env_with_secret(&mut c, "not-the-secret");
    let err = assert_failure(&run(&mut c), &"create with a wrong secret");
    assert!(err.contains("access denied"), "{err}");
    assert!(!server.object_path("bkt", "a.vma").exists());

    // The endpoint flag wins over the environment.
    let mut c = vma([
        "list",
        "--s3-endpoint",
        "http://127.0.0.1:9",
        "s3://bkt/a.vma",
    ]);
    server.env(&mut c);
    c.args(["--s3-retries", "0"]);
    let (sent, received) = (server.sent(), server.received());
    let err = assert_failure(&run(&mut c), &"list through a closed port");
    assert!(err.contains("s3://bkt/a.vma"), "{err}");
    // Had the environment's endpoint (the server) been used, the answer
    // would be the server's "no such object", and the server would have
    // seen the request.
    assert!(!err.contains("no such object"), "{err}");
    assert_eq!((server.sent(), server.received()), (sent, received));
    let err = fails_on(&server, &["list", "s3://bkt"]);
    assert!(err.contains("no key"), "{err}");
}

#[test]
fn a_store_lost_mid_upload_fails_the_backup_and_leaves_nothing() {
    let server = S3Server::start();
    server.bucket("bkt");
    let t = TestEnv::new();
    let (drives, _) = images(t.dir.path(), &[("a", 48 << 20, 5)]);
    let conf = t.write("qemu-server.conf", b"x\n");
    let mut args = create_args("s3://bkt/lost.vma", &drives, s(&conf));
    args.extend([
        "--s3-part-size",
        "5M",
        "--s3-parts-in-flight",
        "1",
        "--s3-retries",
        "1",
    ]);
    // Two parts go in, the third stalls, then the store goes away.
    server.stall_after(12 << 20);
    let mut cmd = on(&server, &args);
    let child = spawn_piped(&mut cmd);
    wait_until("the upload to stall", Duration::from_secs(60), || {
        server.received() > 12 << 20
    });
    server.set_down(true);
    // It comes back once the writer has given up and tries to abort.
    wait_until("the abort", Duration::from_secs(60), || {
        server.refused().iter().any(|l| l.starts_with("DELETE "))
    });
    server.set_down(false);
    let out = wait_within(child, Duration::from_secs(90));
    let err = assert_failure(&out, &"create to a store that went away");
    assert!(err.contains("s3://bkt/lost.vma"), "{err}");
    assert!(!server.object_path("bkt", "lost.vma").exists());
    assert!(!server.object_path("bkt", "lost.vma.index").exists());
    assert_eq!(server.upload_leftovers(), Vec::<String>::new());
}

/// `export` of an object serves each drive as `extract` writes it
/// (nbdcopy reads it whole), from a plain `.vma` with its index object
/// and from a seekable `.vma.zst`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_serves_an_object() {
    if !require_tools(&["nbdcopy"]) {
        return;
    }
    let server = S3Server::start();
    server.bucket("bkt");
    let t = TestEnv::new();
    let (drives, contents) = images(t.dir.path(), &[("a", 3 << 20, 11), ("b", 1 << 20, 12)]);
    let conf = t.write("qemu-server.conf", b"name: e\n");
    for name in ["e.vma", "e.vma.zst"] {
        let url = format!("s3://bkt/{name}");
        ok_on(&server, &create_args(&url, &drives, s(&conf)));
        let sock = t.path(format!("{name}.sock"));
        let mut cmd = ExportCmd::unix(Path::new(&url), &sock);
        server.env_async(cmd.command());
        let (p, at) = cmd.start().await;
        for (n, c) in ["a", "b"].iter().zip(&contents) {
            let copy = t.path(format!("{name}-{n}.raw"));
            run_ok(Command::new("nbdcopy").arg(at.uri(n)).arg(&copy));
            assert_file_is(&copy, &as_restored(c));
        }
        p.signal(libc::SIGTERM);
        p.wait(CMD_TIMEOUT).await;
    }
}

/// `serve -o s3://...`: a client writes the drive, the object appears
/// when the archive is complete, and restores to what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_into_an_object() {
    if !require_tools(&["nbdcopy"]) {
        return;
    }
    let server = S3Server::start();
    server.bucket("bkt");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 8 << 20;
    let src = raw_islands(&dir.join("src.raw"), size, 3, 6, 1 << 20);
    for name in ["serve.vma", "serve.vma.zst"] {
        let url = format!("s3://bkt/{name}");
        let sub = dir.join(name.replace('.', "-"));
        std::fs::create_dir(&sub).unwrap();
        let mut cmd = ServeCmd::unix(&sub, &[("drive-scsi0", size)], &url).json();
        server.env_async(cmd.command());
        let (serve, at) = cmd.start().await;
        assert!(server.keys("bkt").iter().all(|k| k != name));
        run_ok(Command::new("nbdcopy").arg(&src).arg(at.uri("drive-scsi0")));
        let ended = serve.wait(RUN_TIMEOUT).await;
        ended.assert_success();
        assert_eq!(
            ended.finished_event()["archive"].as_str(),
            Some(url.as_str())
        );
        let x = sub.join("x");
        ok_on(&server, &["extract", &url, s(&x)]);
        assert_same_file(&x.join("disk-drive-scsi0.raw"), &src);
        assert!(server.upload_leftovers().is_empty());
    }
}

/// `backup --output-dir s3://BUCKET/PREFIX/ --vmid`, then
/// `--incremental` from the newest archive under that prefix: both
/// restore to the source, and the second reads its base from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_into_a_prefix_then_incrementally_from_it() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    let server = S3Server::start();
    server.bucket("bkt");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 16 << 20;
    let src = raw_islands(&dir.join("scsi0.raw"), size, 21, 8, 1 << 20);
    let daemon = start_daemon(dir, &[("scsi0", &src, "raw")]).await;
    let mut archives = Vec::new();
    for generation in 0..2 {
        if generation > 0 {
            // Archive names have a one-second time stamp.
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let mut cmd = vma_async(["backup", "--qmp"]);
        cmd.arg(daemon.qmp_socket()).args([
            "--drive",
            "scsi0",
            "--vmid",
            "100",
            "--json",
            "--output-dir",
            "s3://bkt/dump/",
            "--incremental",
            "--zstd",
        ]);
        server.env_async(&mut cmd);
        let before = server.sent();
        let ended = Proc::spawn(cmd, true).wait(RUN_TIMEOUT).await;
        ended.assert_success();
        let url = ended.finished_event()["archive"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(url.starts_with("s3://bkt/dump/vzdump-qemu-100-"), "{url}");
        if generation == 0 {
            assert!(
                ended.stderr.contains("no earlier archive"),
                "{}",
                ended.stderr
            );
        } else {
            let base = format!("base {}", archives[0]);
            assert!(ended.stderr.contains(&base), "{}", ended.stderr);
            // The base's data came from the store.
            assert!(server.sent() - before > 1 << 20);
        }
        let x = dir.join(format!("x{generation}"));
        ok_on(&server, &["extract", &url, s(&x)]);
        assert_same_file(&x.join("disk-drive-scsi0.raw"), &src);
        archives.push(url);
    }
    assert_eq!(
        server.keys("bkt").len(),
        2,
        "two objects: {:?}",
        server.keys("bkt")
    );
    daemon.shutdown().await.unwrap();
}

/// SIGTERM in the middle of an upload: the command says it aborted the
/// upload, exits 143, and neither the object nor its parts remain.
#[test]
fn a_signal_aborts_the_upload() {
    let server = S3Server::start();
    server.bucket("bkt");
    let t = TestEnv::new();
    let (drives, _) = images(t.dir.path(), &[("a", 32 << 20, 6)]);
    let conf = t.write("qemu-server.conf", b"x\n");
    let mut args = create_args("s3://bkt/sig.vma", &drives, s(&conf));
    args.extend(["--s3-part-size", "5M", "--s3-parts-in-flight", "1"]);
    server.stall_after(7 << 20);
    let child = spawn_piped(&mut on(&server, &args));
    wait_until("the upload to stall", Duration::from_secs(60), || {
        server.received() > 7 << 20
    });
    // The stalled part stays stalled; new requests (the abort) go through.
    server.stall_after(u64::MAX);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let out = wait_within(child, Duration::from_secs(60));
    let err = assert_exit(&out, 143, &"create stopped by SIGTERM");
    assert!(
        err.contains("aborted the upload of s3://bkt/sig.vma"),
        "{err}"
    );
    // The stalled part's connection goes too.
    server.set_down(true);
    assert!(!server.object_path("bkt", "sig.vma").exists());
    wait_until("no parts left", Duration::from_secs(10), || {
        server.upload_leftovers().is_empty()
    });
}

/// A live backup whose store goes away mid-upload: the backup fails (and
/// says so once), its upload is aborted once the store is back, and
/// neither an object nor a part is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_whose_store_goes_away_fails_and_leaves_nothing() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    let server = S3Server::start();
    server.bucket("bkt");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 64 << 20;
    let src = dense_random(&dir.join("scsi0.raw"), size, 31);
    let daemon = start_daemon(dir, &[("scsi0", &src, "raw")]).await;
    server.stall_after(12 << 20);
    let mut cmd = vma_async(["backup", "--qmp"]);
    cmd.arg(daemon.qmp_socket()).args([
        "--drive",
        "scsi0",
        "--no-bitmap",
        "-o",
        "s3://bkt/gone.vma",
        "--s3-part-size",
        "5M",
        "--s3-parts-in-flight",
        "1",
        "--s3-retries",
        "1",
    ]);
    server.env_async(&mut cmd);
    let p = Proc::spawn(cmd, false);
    wait_async("the upload to stall", || server.received() > 12 << 20).await;
    server.set_down(true);
    wait_async("the abort", || {
        server.refused().iter().any(|l| l.starts_with("DELETE "))
    })
    .await;
    server.set_down(false);
    let ended = p.wait(RUN_TIMEOUT).await;
    ended.assert_backup_failed(&["s3://bkt/gone.vma"]);
    assert!(!server.object_path("bkt", "gone.vma").exists());
    assert_eq!(server.upload_leftovers(), Vec::<String>::new());
    daemon.shutdown().await.unwrap();
}

/// Polls `cond` on a tokio test until it holds; fails the test after 60 s
/// (a hang guard, not a timing assertion).
async fn wait_async(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
