//! TLS (STARTTLS) of `serve`, with certificates made by the `openssl` CLI
//! for each test ([`Pki`]): raw protocol edges (what a plain-text client
//! is told under `--tls require`, a second STARTTLS, option state dropped
//! at the upgrade, plain-text bytes after STARTTLS), real clients over TLS
//! (nbdinfo, qemu-img, QEMU's blockdev-backup from qemu-storage-daemon),
//! client certificates (`--tls-verify-client`: ours accepted, a foreign
//! CA's and none refused), and the CLI's errors for bad TLS options.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use vma_writer::nbd::wire::*;

use crate::support::{self, *};

const MIB: u64 = 1 << 20;

fn connect(sock: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads the greeting and sends the client flags (FIXED_NEWSTYLE |
/// NO_ZEROES).
fn greet(s: &mut UnixStream) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[0..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
}

/// The port of a `serve` listening on TCP.
fn port(at: &Listening) -> u16 {
    let addr = at.event.as_ref().unwrap()["address"].as_str().unwrap();
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// Under `--tls require`, a plain-text client learns nothing: every
/// option but STARTTLS and ABORT gets ERR_TLS_REQD (LIST names no
/// export), STARTTLS with a payload is invalid, EXPORT_NAME closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_refuses_plain_text_options() {
    if !require_tools(&["openssl"]) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    let (serve, at) = ServeCmd::unix(dir, &[("drive-secret", MIB)], dir.join("a.vma"))
        .args(pki.serve_args("require", false))
        .start()
        .await;
    let sock = at.sock.clone().unwrap();

    let mut c = RawClient::connect(&sock);
    c.start(3);
    let refused: [(OptionCode, Vec<u8>); 7] = [
        (NBD_OPT_LIST, vec![]),
        (NBD_OPT_GO, go_payload("drive-secret", &[])),
        (NBD_OPT_INFO, go_payload("drive-secret", &[1, 2])),
        (NBD_OPT_STRUCTURED_REPLY, vec![]),
        (NBD_OPT_EXTENDED_HEADERS, vec![]),
        (NBD_OPT_LIST_META_CONTEXT, meta_payload("drive-secret", &[])),
        (
            NBD_OPT_SET_META_CONTEXT,
            meta_payload("", &["base:allocation"]),
        ),
    ];
    for (opt, payload) in refused {
        c.send_option(opt.0, &payload);
        let r = c.read_option_replies();
        assert_eq!(r.len(), 1, "{opt}: {r:?}");
        assert_eq!(r[0].0, opt.0);
        assert_eq!(r[0].1, NBD_REP_ERR_TLS_REQD.0, "{opt}: {r:?}");
        assert!(
            !String::from_utf8_lossy(&r[0].2).contains("secret"),
            "{opt} revealed an export: {r:?}"
        );
    }
    c.send_option(NBD_OPT_STARTTLS.0, b"x");
    let r = c.read_option_replies();
    assert_eq!(r[0].1, NBD_REP_ERR_INVALID.0, "{r:?}");
    // EXPORT_NAME has no error reply: the server hangs up.
    c.send_option(NBD_OPT_EXPORT_NAME.0, b"drive-secret");
    assert!(c.is_closed(), "EXPORT_NAME without TLS was not refused");

    // ABORT is still answered.
    let mut c = RawClient::connect(&sock);
    c.start(3);
    c.send_option(NBD_OPT_ABORT.0, &[]);
    assert_eq!(c.read_option_reply().1, NBD_REP_ACK.0);
    assert!(c.is_closed());
    drop(serve);
}

/// `--tls on`: a plain-text client may proceed; STARTTLS forgets what was
/// negotiated before it (structured replies, the meta context), a second
/// STARTTLS is invalid, and the whole transmission runs over TLS into an
/// archive. Bytes sent after STARTTLS before the TLS handshake close the
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_drops_negotiated_state() {
    if !require_tools(&["openssl", "nbdinfo"]) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    let archive = dir.join("on.vma");
    let (serve, at) = ServeCmd::unix(dir, &[("drive-a", MIB)], &archive)
        .args(pki.serve_args("on", false))
        .start()
        .await;
    let sock = at.sock.clone().unwrap();

    // Plain text is allowed with --tls on.
    let out = run_ok(Command::new("nbdinfo").args(["--size", &at.uri("drive-a")]));
    assert_eq!(stdout_text(&out).trim(), MIB.to_string());

    // Plain-text bytes queued behind STARTTLS: ACK, then the server hangs up.
    let mut s = connect(&sock);
    greet(&mut s);
    let mut both = option_bytes(NBD_OPT_STARTTLS.0, &[]);
    both.extend(option_bytes(NBD_OPT_LIST.0, &[]));
    s.write_all(&both).unwrap();
    let r = read_option_replies_on(&mut s);
    assert_eq!(r[0].1, NBD_REP_ACK.0);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "server went on after injected bytes");

    let mut s = connect(&sock);
    greet(&mut s);
    send_option_on(&mut s, NBD_OPT_STRUCTURED_REPLY.0, &[]);
    assert_eq!(read_option_replies_on(&mut s)[0].1, NBD_REP_ACK.0);
    let meta = meta_payload("drive-a", &["base:allocation"]);
    send_option_on(&mut s, NBD_OPT_SET_META_CONTEXT.0, &meta);
    let r = read_option_replies_on(&mut s);
    assert_eq!(
        r.len(),
        2,
        "base:allocation not selected in plain text: {r:?}"
    );
    send_option_on(&mut s, NBD_OPT_STARTTLS.0, &[]);
    assert_eq!(read_option_replies_on(&mut s)[0].1, NBD_REP_ACK.0);

    let mut t = tls_client(pki.rustls_client(None), s);
    send_option_on(&mut t, NBD_OPT_STARTTLS.0, &[]);
    let r = read_option_replies_on(&mut t);
    assert_eq!(r[0].1, NBD_REP_ERR_INVALID.0, "second STARTTLS: {r:?}");
    // Structured replies were dropped: SET_META_CONTEXT needs them.
    send_option_on(&mut t, NBD_OPT_SET_META_CONTEXT.0, &meta);
    let r = read_option_replies_on(&mut t);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].1, NBD_REP_ERR_INVALID.0, "{r:?}");
    send_option_on(&mut t, NBD_OPT_GO.0, &go_payload("drive-a", &[]));
    let mut flags = None;
    for (_, kind, p) in read_option_replies_on(&mut t) {
        assert!(kind == NBD_REP_INFO.0 || kind == NBD_REP_ACK.0, "{kind:#x}");
        if kind == NBD_REP_INFO.0 && p[0..2] == [0, 0] {
            flags = Some(u16::from_be_bytes(p[10..12].try_into().unwrap()));
        }
    }
    // DF is only offered with structured replies.
    assert_eq!(
        flags.unwrap() & NBD_FLAG_SEND_DF,
        0,
        "structured replies survived"
    );

    // Transmission over TLS, simple replies.
    let data = random_data(MIB as usize, 7);
    let mut b = encode_request(&req(NBD_CMD_WRITE, 0, 1, 0, MIB), false);
    b.extend_from_slice(&data);
    t.write_all(&b).unwrap();
    t.write_all(&encode_request(&req(NBD_CMD_READ, 0, 2, 4096, 4096), false))
        .unwrap();
    t.flush().unwrap();
    for cookie in [1u64, 2] {
        let mut h = [0u8; 16];
        t.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            NBD_SIMPLE_REPLY_MAGIC
        );
        assert_eq!(&h[4..8], &[0, 0, 0, 0], "error reply");
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), cookie);
        if cookie == 2 {
            let mut got = vec![0u8; 4096];
            t.read_exact(&mut got).unwrap();
            assert_eq!(got, data[4096..8192]);
        }
    }
    t.write_all(&encode_request(&req(NBD_CMD_DISC, 0, 3, 0, 0), false))
        .unwrap();
    t.flush().unwrap();
    let ended = serve.wait(RUN_TIMEOUT).await;
    ended.assert_success();
    // The injected bytes were caught before the TLS handshake, not merely
    // taken for a bad ClientHello.
    assert!(
        ended.stderr.contains("16 byte(s) sent after STARTTLS"),
        "{}",
        ended.stderr
    );
    let expected = dir.join("expected.raw");
    std::fs::write(&expected, &data).unwrap();
    check_archive(&archive, &[("drive-a", MIB, &expected)], dir);
}

/// Real clients over TCP with `--tls require --tls-verify-client`: nbdinfo
/// lists the export with our client certificate and learns nothing
/// without TLS; a foreign CA's certificate and no certificate fail in the
/// TLS handshake; qemu-img writes the drive over TLS, and the archive
/// restores to its source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_and_qemu_img_with_client_certificates() {
    if !require_tools(&["openssl", "nbdinfo", "qemu-img"]) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    let size = 4 * MIB;
    let src = raw_islands(&dir.join("a.raw"), size, 21, 6, MIB);
    let archive = dir.join("tls.vma");
    let (serve, at) = ServeCmd::tcp(&[("drive-a", size)], &archive)
        .args(pki.serve_args("require", true))
        .start()
        .await;
    assert_eq!(at.event.as_ref().unwrap()["tls"], "require");
    let port = port(&at);
    let uri = |export: &str, client: &str| {
        format!(
            "nbds://localhost:{port}/{export}?tls-certificates={}",
            pki.client(client).display()
        )
    };

    let out = run_ok(Command::new("nbdinfo").args(["--list", &uri("", "good")]));
    let listed = stdout_text(&out);
    assert!(listed.contains("export=\"drive-a\""), "{listed}");
    assert!(listed.contains("with TLS"), "{listed}");

    let plain = format!("nbd://localhost:{port}/drive-a");
    for args in [
        vec!["--list", plain.as_str()],
        vec!["--size", plain.as_str()],
    ] {
        let out = run(Command::new("nbdinfo").args(&args));
        assert!(
            !out.status.success(),
            "plain text nbdinfo {args:?} succeeded"
        );
        assert!(
            !stdout_text(&out).contains("drive-a"),
            "{args:?} revealed the export"
        );
    }
    for client in ["foreign", "nocert"] {
        let out = run(Command::new("nbdinfo").args(["--size", &uri("drive-a", client)]));
        assert!(!out.status.success(), "client {client} was accepted");
    }

    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw"])
            .arg(&src)
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                pki.client("good").display()
            ))
            .arg("--target-image-opts")
            .arg(format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},\
                 export=drive-a,tls-creds=tls0"
            )),
    );
    let ended = serve.wait(RUN_TIMEOUT).await;
    ended.assert_success();
    let refusals = ended.stderr.matches("TLS handshake failed").count();
    assert_eq!(refusals, 2, "{}", ended.stderr);
    check_archive(&archive, &[("drive-a", size, &src)], dir);
}

/// QEMU's blockdev-backup from qemu-storage-daemon (tls-creds-x509 with a
/// client certificate) into a TLS-only `serve`: the archive verifies and
/// restores to the source byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_backup_into_tls_only_serve() {
    if !require_tools(&["openssl", "qemu-storage-daemon", "qemu-img"]) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    let size = 16 * MIB + 512;
    let src = raw_islands(&dir.join("a.raw"), size, 31, 10, 2 * MIB);
    let daemon = start_daemon(dir, &[("a", &src, "raw")]).await;
    let archive = dir.join("qsd-tls.vma.zst");
    let (serve, at) = ServeCmd::tcp(&[("drive-scsi0", size)], &archive)
        .args(pki.serve_args("require", true))
        .start()
        .await;
    let port = port(&at);
    let qmp = daemon.connect().await.unwrap();
    let mut events = qmp.subscribe();
    qmp.execute(
        "object-add",
        Some(serde_json::json!({
            "qom-type": "tls-creds-x509", "id": "tls0",
            "dir": pki.client("good"), "endpoint": "client",
        })),
    )
    .await
    .unwrap();
    qmp.execute(
        "blockdev-add",
        Some(serde_json::json!({
            "driver": "nbd", "node-name": "tgt",
            "server": {"type": "inet", "host": "127.0.0.1", "port": port.to_string()},
            "export": "drive-scsi0", "tls-creds": "tls0",
        })),
    )
    .await
    .unwrap();
    qmp.execute(
        "blockdev-backup",
        Some(serde_json::json!({
            "job-id": "job-a", "device": "a", "target": "tgt", "sync": "full",
        })),
    )
    .await
    .unwrap();
    let ends = events
        .wait_jobs_ended(&["job-a"], Duration::from_secs(60))
        .await
        .unwrap();
    assert!(ends[0].is_success(), "{ends:?}");
    qmp.blockdev_del("tgt").await.unwrap();
    let ended = serve.wait(RUN_TIMEOUT).await;
    ended.assert_success();
    check_archive(&archive, &[("drive-scsi0", size, &src)], dir);
    drop(qmp);
    daemon.shutdown().await.unwrap();
}

/// Bad TLS options: usage errors for missing companions, and file errors
/// naming the file, before anything is written.
#[test]
fn tls_option_errors_name_the_problem() {
    if !require_tools(&["openssl"]) {
        return;
    }
    let env = TestEnv::new();
    let pki = Pki::new(&env.path("pki"));
    let sock = env.path("nbd.sock");
    let listen = format!("unix:{}", sock.display());
    let out = env.path("x.vma");
    let base = |extra: &[&str]| {
        let mut v: Vec<String> = ["serve", "--listen", &listen, "--drive", "d=1M", "-o"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.push(out.display().to_string());
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cert = pki.cert("server").display().to_string();
    let key = pki.key("server").display().to_string();

    let e = env.fails_usage(base(&["--tls", "require"]));
    assert!(e.contains("--tls-cert"), "{e}");
    let e = env.fails_usage(base(&[
        "--tls",
        "on",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-verify-client",
    ]));
    assert!(e.contains("--tls-ca"), "{e}");
    let e = env.fails(base(&["--tls-cert", &cert, "--tls-key", &key]));
    assert!(e.contains("--tls on"), "{e}");
    let e = env.fails(base(&[
        "--tls",
        "on",
        "--tls-cert",
        &cert,
        "--tls-key",
        "/nonexistent/key.pem",
    ]));
    assert!(e.contains("private key /nonexistent/key.pem"), "{e}");
    let e = env.fails(base(&[
        "--tls",
        "on",
        "--tls-cert",
        &key,
        "--tls-key",
        &key,
    ]));
    assert!(e.contains("no CERTIFICATE") && e.contains(&key), "{e}");
    let client_key = pki.key("client").display().to_string();
    let e = env.fails(base(&[
        "--tls",
        "on",
        "--tls-cert",
        &cert,
        "--tls-key",
        &client_key,
    ]));
    assert!(e.contains(&client_key) && e.contains(&cert), "{e}");
    let e = env.fails(base(&[
        "--tls",
        "on",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-ca",
        &key,
        "--tls-verify-client",
    ]));
    assert!(e.contains("client CA") && e.contains(&key), "{e}");
    assert!(!out.exists() && !sock.exists());
}

/// `export` under `--tls require --tls-verify-client`: nbdcopy with our
/// client certificate reads the drive as the archive holds it; a plain
/// text client and a foreign certificate get nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_over_tls_with_client_certificates() {
    if !require_tools(&["openssl", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    let size = 4 * MIB;
    let src = raw_islands(&dir.join("a.raw"), size, 23, 6, MIB);
    let archive = dir.join("a.vma");
    run_ok(
        vma(["create"])
            .arg(&archive)
            .arg("-d")
            .arg(format!("drive-a={}", src.display())),
    );
    let mut cmd = vma_async(["export"]);
    cmd.arg(&archive)
        .args(["--listen", "tcp:127.0.0.1:0", "--json"])
        .args(pki.serve_args("require", true));
    let mut export = Proc::spawn(cmd, true);
    let ev = export
        .next_event(RUN_TIMEOUT, |e| e["event"] == "listening")
        .await;
    assert_eq!(ev["tls"], "require");
    let addr = ev["address"].as_str().unwrap().to_owned();
    let port = addr.rsplit_once(':').unwrap().1;
    let uri = |client: &str| {
        format!(
            "nbds://localhost:{port}/drive-a?tls-certificates={}",
            pki.client(client).display()
        )
    };
    let copy = dir.join("copy.raw");
    run_ok(Command::new("nbdcopy").arg(uri("good")).arg(&copy));
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&src).unwrap());
    let plain = format!("nbd://localhost:{port}/drive-a");
    for target in [plain, uri("foreign"), uri("nocert")] {
        let out = run(Command::new("nbdinfo").args(["--size", &target]));
        assert!(!out.status.success(), "{target} was served");
    }
    export.signal(libc::SIGTERM);
    export.wait(RUN_TIMEOUT).await.assert_success();
}
