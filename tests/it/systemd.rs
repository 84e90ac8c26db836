//! systemd socket activation of `serve --listen systemd`: the test binds a
//! listening socket and passes it as systemd does (descriptor 3,
//! `LISTEN_FDS=1`, `LISTEN_PID` = the server's pid, set by a `sh` that
//! then execs the binary and so keeps its pid), then a real client
//! (qemu-img on a Unix socket, nbdcopy on TCP) writes a drive; the archive
//! restores to the source; and `export` serves an archive the same way.
//! Plus the errors when the variables do not name this process.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::process::Command;

use crate::support::{self, *};

const MIB: u64 = 1 << 20;

/// `vma-writer ARGS` started the way systemd starts a socket-activated
/// service, with `fd` as its listening socket.
fn activated(fd: RawFd, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#)
        .arg(BIN)
        .args(args)
        .env("LISTEN_FDS", "1")
        .env_remove("LISTEN_PID")
        .env("TZ", "UTC")
        .env_remove("RUST_LOG");
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and
    // exec.
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == 3 {
                // dup2(3, 3) would keep close-on-exec.
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

async fn serve_activated(fd: RawFd, size: u64, archive: &Path) -> (Proc, String) {
    let drive = format!("drive-a={size}");
    let archive = archive.display().to_string();
    let cmd = activated(
        fd,
        &[
            "serve", "--listen", "systemd", "--json", "--drive", &drive, "-o", &archive,
        ],
    );
    let mut p = Proc::spawn(cmd, true);
    let ev = p
        .next_event(LISTEN_TIMEOUT, |e| e["event"] == "listening")
        .await;
    let addr = ev["address"].as_str().unwrap().to_owned();
    (p, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activated_unix_serve_with_qemu_img() {
    if !require_tools(&["qemu-img"]) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 6 * MIB + 512;
    let src = raw_islands(&dir.join("a.raw"), size, 41, 6, MIB);
    let sock = dir.join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let archive = dir.join("activated.vma");
    let (serve, addr) = serve_activated(listener.as_raw_fd(), size, &archive).await;
    assert_eq!(addr, format!("unix:{}", sock.display()));
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(nbd_uri(&sock, "drive-a")),
    );
    let ended = serve.wait(RUN_TIMEOUT).await;
    ended.assert_success();
    // The socket file is systemd's: it stays.
    assert!(sock.exists(), "the activated socket file was removed");
    drop(listener);
    check_archive(&archive, &[("drive-a", size, &src)], dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activated_tcp_serve_with_nbdcopy() {
    if !require_tools(&["nbdcopy"]) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 8 * MIB;
    let src = raw_islands(&dir.join("a.raw"), size, 42, 8, MIB);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let archive = dir.join("activated.vma.zst");
    let (serve, addr) = serve_activated(listener.as_raw_fd(), size, &archive).await;
    assert_eq!(addr, format!("tcp:127.0.0.1:{port}"));
    run_ok(
        Command::new("nbdcopy")
            .arg(&src)
            .arg(format!("nbd://127.0.0.1:{port}/drive-a")),
    );
    let ended = serve.wait(RUN_TIMEOUT).await;
    ended.assert_success();
    drop(listener);
    check_archive(&archive, &[("drive-a", size, &src)], dir);
}

/// `export --listen systemd` (contrib/systemd/vma-writer-export@.socket):
/// nbdcopy reads the drive back through the passed socket; SIGTERM ends it
/// with status 0 and leaves systemd's socket file alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activated_export_with_nbdcopy() {
    if !require_tools(&["nbdcopy"]) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 5 * MIB + 512;
    let src = raw_islands(&dir.join("a.raw"), size, 43, 5, MIB);
    let archive = dir.join("a.vma.zst");
    run_ok(
        Command::new(BIN)
            .arg("create")
            .arg(&archive)
            .arg("-d")
            .arg(format!("drive-a={}", src.display())),
    );
    let sock = dir.join("export.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let archive = archive.display().to_string();
    let cmd = activated(
        listener.as_raw_fd(),
        &["export", &archive, "--listen", "systemd", "--json"],
    );
    let mut export = Proc::spawn(cmd, true);
    let ev = export
        .next_event(LISTEN_TIMEOUT, |e| e["event"] == "listening")
        .await;
    assert_eq!(ev["address"], format!("unix:{}", sock.display()), "{ev}");
    let out = dir.join("out.raw");
    run_ok(
        Command::new("nbdcopy")
            .arg(nbd_uri(&sock, "drive-a"))
            .arg(&out),
    );
    assert_same_file(&out, &src);
    export.signal(libc::SIGTERM);
    export.wait(RUN_TIMEOUT).await.assert_success();
    assert!(sock.exists(), "the activated socket file was removed");
}

/// Without the variables, or with ones naming another process, `--listen
/// systemd` fails and says why, before any archive is created.
#[test]
fn listen_systemd_without_a_socket_fails() {
    let env = TestEnv::new();
    let out = env.path("x.vma");
    let args = [
        "serve",
        "--listen",
        "systemd",
        "--drive",
        "d=1M",
        "-o",
        out.to_str().unwrap(),
    ];
    let mut cmd = env.cmd(args);
    cmd.env_remove("LISTEN_PID").env_remove("LISTEN_FDS");
    let e = assert_failure(&output_within(&mut cmd, RUN_TIMEOUT), &args);
    assert!(e.contains("LISTEN_PID is not set"), "{e}");
    let mut cmd = env.cmd(args);
    cmd.env("LISTEN_PID", "1").env("LISTEN_FDS", "1");
    let e = assert_failure(&output_within(&mut cmd, RUN_TIMEOUT), &args);
    assert!(e.contains("LISTEN_PID=1 is not this process"), "{e}");
    assert!(!out.exists());
}
