//! `vma-writer export`'s own rules: SIGINT and SIGTERM end it with exit 0
//! after a clean shutdown (socket removed, `stopped` event), also with a
//! client connected; the Unix socket is 0600; TCP works; `-d` picks
//! drives; archives that cannot be read at random are refused with a hint
//! to `vma-writer convert`.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{TWO, archives};
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_ends_the_export_cleanly_with_exit_0() {
    if !require_tools(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let a = archives(dir, "sig", TWO);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let sock = dir.join("sig.sock");
        let (p, at) = ExportCmd::unix(&a.zst, &sock).start().await;
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
        // A client that stays connected does not hold up the shutdown.
        let mut io = tokio::process::Command::new("qemu-io");
        io.args(["-r", "-f", "raw"])
            .arg(at.uri("drive-virtio0"))
            .args(["-c", "read 0 64k", "-c", "sleep 20000"])
            .stdout(Stdio::null());
        let client = Proc::spawn(io, false);
        let size = run_ok(
            Command::new("nbdinfo")
                .arg("--size")
                .arg(at.uri("drive-efidisk0")),
        );
        assert_eq!(stdout_text(&size).trim(), (528 * 1024).to_string());
        p.signal(sig);
        let ended = p.wait(Duration::from_secs(20)).await;
        drop(client);
        ended.assert_success();
        let stopped = ended
            .events
            .iter()
            .find(|e| e["event"] == "stopped")
            .unwrap_or_else(|| panic!("no stopped event: {:?}", ended.events));
        assert_eq!(stopped["signal"], signal_name(sig));
        assert_eq!(stopped["drives"][1]["bytes_served"], 0);
        assert!(!sock.exists(), "the socket is left behind");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_a_subset_of_the_drives() {
    if !require_tools(&["nbdcopy", "nbdinfo"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let a = archives(dir, "tcp", TWO);
    let (p, at) = ExportCmd::tcp(&a.indexed)
        .args(["-d", "drive-efidisk0"])
        .start()
        .await;
    let addr = at.event["address"].as_str().unwrap();
    assert!(
        addr.starts_with("tcp:127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    assert_eq!(at.exports(), [("drive-efidisk0".to_string(), 528 * 1024)]);
    let uri = at.uri("drive-efidisk0");
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    let copy = dir.join("efi.raw");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&copy));
    assert_same_file(&copy, &a.expected("drive-efidisk0"));
    let list = stdout_text(&run_ok(Command::new("nbdinfo").arg("--list").arg(&uri)));
    assert!(!list.contains("drive-virtio0"), "{list}");
    p.signal(libc::SIGTERM);
    p.wait(Duration::from_secs(20)).await.assert_success();
}

#[test]
fn archives_that_cannot_be_read_at_random_are_refused() {
    if !require_tools(&["zstd"]) {
        return;
    }
    let env = TestEnv::new();
    let a = archives(env.dir.path(), "no", TWO);
    let sock = env.path("x.sock");
    let listen = format!("unix:{}", sock.display());
    // A plain zstd stream: no seek table.
    let stream = env.path("stream.vma.zst");
    run_ok(
        Command::new("zstd")
            .args(["-q", "-c"])
            .arg(&a.plain)
            .stdout(std::fs::File::create(&stream).unwrap()),
    );
    let err = env.fails([
        "export".as_ref(),
        stream.as_os_str(),
        "--listen".as_ref(),
        listen.as_ref(),
    ]);
    assert!(
        err.contains("without a seek table") && err.contains("vma-writer convert"),
        "{err}"
    );
    // Stdin, whatever it holds.
    let out = output_within(
        env.cmd(["export", "-", "--listen", &listen])
            .stdin(std::fs::File::open(&a.zst).unwrap()),
        CMD_TIMEOUT,
    );
    let err = assert_failure(&out, &"export -");
    assert!(err.contains("vma-writer convert"), "{err}");
    // A drive it does not have.
    let err = env.fails([
        "export".as_ref(),
        a.indexed.as_os_str(),
        "--listen".as_ref(),
        listen.as_ref(),
        "-d".as_ref(),
        "drive-nosuch".as_ref(),
    ]);
    assert!(
        err.contains(
            "drive 'drive-nosuch' is not in the archive (it has: drive-virtio0, drive-efidisk0)"
        ),
        "{err}"
    );
    assert!(!sock.exists());
}
