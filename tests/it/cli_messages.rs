//! What the CLI says: refusals and their messages (a directory as an
//! image, an out-of-range zstd level, a drive size QEMU cannot have, an
//! archive to a terminal), each cause said once, no colour codes in logs
//! written to a pipe, `verify --help` on what is and is not checked, zstd
//! frames that carry their content checksum, and `demo` failing fast
//! without qemu-storage-daemon.

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

use crate::support::*;

/// A directory given as an image: exit 1, the message says so (not a
/// 9223372036854775807-byte device), and nothing is created.
#[test]
fn a_directory_as_an_image_is_refused() {
    let env = TestEnv::new();
    std::fs::create_dir(env.path("dir")).unwrap();
    let err = env.fails(["create", "a.vma", "-d", "drive-scsi0=dir"]);
    assert_eq!(
        err,
        "vma-writer: error: drive 'drive-scsi0': dir is a directory, not a disk image\n"
    );
    assert_eq!(tree(env.dir.path()), [std::path::Path::new("dir")]);
}

/// `--zstd=99`: a usage error naming the allowed range.
#[test]
fn zstd_level_out_of_range_is_a_usage_error() {
    let env = TestEnv::new();
    env.write("img", &random_data(4096, 1));
    for level in ["99", "23", "-200000"] {
        let err = env.fails_usage(["create", "a.vma", &format!("--zstd={level}"), "-d", "d=img"]);
        assert!(
            err.contains(&format!("zstd level {level} is out of range ("))
                && err.contains(" to 22)"),
            "{level}: {err}"
        );
    }
    assert!(!env.path("a.vma").exists() && !env.path("a.vma.partial").exists());
    // The edges are accepted.
    env.ok(["create", "b.vma.zst", "--zstd=22", "-d", "d=img"]);
    env.ok(["create", "c.vma.zst", "--zstd=1", "-d", "d=img"]);
}

/// `serve --drive NAME=SIZE` with a size that is not whole 512-byte
/// sectors (no QEMU drive has one): a usage error saying so.
#[test]
fn serve_refuses_a_drive_size_that_is_not_whole_sectors() {
    let env = TestEnv::new();
    for size in ["4600", "1", "511", "1048577"] {
        let err = env.fails_usage([
            "serve",
            "--listen",
            "unix:nbd.sock",
            "--drive",
            &format!("drive-scsi0={size}"),
            "-o",
            "a.vma",
        ]);
        assert!(
            err.contains(&format!(
                "drive 'drive-scsi0': {size} bytes is not a multiple of 512"
            )),
            "{size}: {err}"
        );
    }
    assert!(tree(env.dir.path()).is_empty());
}

/// An error caused by an I/O error names its cause once (not `... (os
/// error 2): No such file or directory (os error 2)`).
#[test]
fn an_io_error_cause_is_printed_once() {
    let env = TestEnv::new();
    let err = env.fails(["create", "a.vma", "-d", "d=missing.raw"]);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let err = env.fails(["list", "missing.vma"]);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    let err = env.fails([
        "create",
        "a.vma",
        "-c",
        "missing.conf",
        "-d",
        "d=missing.raw",
    ]);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

/// `verify --help` says what `verify` checks, and that the drive data
/// itself is not checksummed.
#[test]
fn verify_help_says_the_payload_is_not_checksummed() {
    let out = run_ok(&mut vma(["verify", "--help"]));
    let help = stdout_text(&out);
    for needle in [
        "What is checked: the header's and every extent's MD5 checksum",
        "Without one the drive data itself is not checked",
        "VMA has no checksum of its payload",
        "payload not checksummed (no index)",
    ] {
        assert!(help.contains(needle), "{needle:?} missing:\n{help}");
    }
}

/// The zstd frames of `data`: for each, whether its header sets the
/// Content_Checksum_flag (RFC 8878 §3.1.1), after walking its blocks to
/// the next frame. Skippable frames are passed over.
fn zstd_frame_checksum_flags(data: &[u8]) -> Vec<bool> {
    let le = |at: usize, n: usize| {
        data[at..at + n]
            .iter()
            .rev()
            .fold(0u64, |v, &b| (v << 8) | u64::from(b))
    };
    let mut flags = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let magic = le(at, 4) as u32;
        if magic & 0xFFFF_FFF0 == 0x184D_2A50 {
            at += 8 + le(at + 4, 4) as usize;
            continue;
        }
        assert_eq!(magic, 0xFD2F_B528, "no zstd frame at byte {at}");
        let fhd = data[at + 4];
        let single_segment = fhd & 0x20 != 0;
        let checksum = fhd & 0x04 != 0;
        let dict_len = [0, 1, 2, 4][usize::from(fhd & 3)];
        let fcs_len = match fhd >> 6 {
            0 => usize::from(single_segment),
            1 => 2,
            2 => 4,
            _ => 8,
        };
        at += 5 + usize::from(!single_segment) + dict_len + fcs_len;
        loop {
            let bh = le(at, 3);
            let size = (bh >> 3) as usize;
            at += 3 + match (bh >> 1) & 3 {
                1 => 1, // RLE: one byte, repeated
                3 => panic!("reserved block type at byte {at}"),
                _ => size,
            };
            if bh & 1 != 0 {
                break;
            }
        }
        if checksum {
            at += 4;
        }
        flags.push(checksum);
    }
    assert_eq!(at, data.len(), "the last frame overruns the file");
    flags
}

/// `create --zstd` writes zstd's content checksum (XXH64) in every frame,
/// as the zstd CLI does by default, with or without worker threads; `zstd
/// -lv` and `zstd -t` agree.
#[test]
fn zstd_output_carries_the_content_checksum() {
    let env = TestEnv::new();
    env.write("img", &holey_data(5 * 1024 * 1024 + 1000, 3));
    env.ok(["create", "a.vma.zst", "--zstd", "-d", "d=img"]);
    env.ok([
        "create",
        "b.vma.zst",
        "--zstd=9",
        "--zstd-threads",
        "2",
        "-d",
        "d=img",
    ]);
    for name in ["a.vma.zst", "b.vma.zst"] {
        let data = std::fs::read(env.path(name)).unwrap();
        let flags = zstd_frame_checksum_flags(&data);
        assert!(
            !flags.is_empty() && flags.iter().all(|&c| c),
            "{name}: frames' checksum flags {flags:?}"
        );
        if require_tools(&["zstd"]) {
            let out = run_ok(Command::new("zstd").args(["-lv"]).arg(env.path(name)));
            let text = stdout_text(&out);
            assert!(text.contains("Check: XXH64"), "{name}: {text}");
            run_ok(Command::new("zstd").args(["-tq"]).arg(env.path(name)));
        }
    }
    // The parser itself: the zstd CLI's own output has the flag, and
    // without it (--no-check) it does not.
    if require_tools(&["zstd"]) {
        for (flag, want) in [("--check", true), ("--no-check", false)] {
            let out = env.path(format!("img{flag}.zst"));
            run_ok(
                Command::new("zstd")
                    .args(["-q", flag, "-o"])
                    .arg(&out)
                    .arg(env.path("img")),
            );
            let flags = zstd_frame_checksum_flags(&std::fs::read(&out).unwrap());
            assert!(flags.iter().all(|&c| c == want), "{flag}: {flags:?}");
        }
    }
}

/// Log lines go to stderr without ANSI colour codes when it is not a
/// terminal, and a failed live backup says its failure once (a failing
/// `serve` with `--keep-partial` logs a WARN line about the kept file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_pipe_have_no_colour_and_failures_are_said_once() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let archive = dir.join("a.vma");
    let mut cmd = ServeCmd::unix(dir, &[("drive-scsi0", MIB)], &archive).args([
        "--keep-partial",
        "--reconnect-timeout",
        "1",
    ]);
    cmd.command().env("RUST_LOG", "info").env_remove("NO_COLOR");
    let (serve, at) = cmd.start().await;
    qemu_io(
        &at.uri("drive-scsi0"),
        "raw",
        &["write -P 0x11 0 64k".into()],
    );
    let ended = serve.wait(RUN_TIMEOUT).await;
    ended.assert_backup_failed(&["did not reconnect within 1s"]);
    assert!(ended.stderr.contains(" INFO "), "{}", ended.stderr);
    assert!(ended.stderr.contains(" WARN "), "{}", ended.stderr);
    assert!(
        !ended.stderr.contains("\x1b["),
        "colour codes in piped logs: {:?}",
        ended.stderr
    );
    assert_eq!(
        ended.stderr.matches("did not reconnect").count(),
        1,
        "{}",
        ended.stderr
    );
}

/// A pseudo-terminal: (master, path of the slave).
fn open_pty() -> (OwnedFd, String) {
    // SAFETY: plain libc calls; the fd is owned from here on.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(m >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        let master = OwnedFd::from_raw_fd(m);
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        let mut buf = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(m, buf.as_mut_ptr(), buf.len()), 0);
        let path = std::ffi::CStr::from_ptr(buf.as_ptr())
            .to_string_lossy()
            .into_owned();
        (master, path)
    }
}

/// `create -` with stdout a terminal is refused (an archive is binary), as
/// `zstd` does; nothing reaches the terminal.
#[test]
fn create_to_a_terminal_is_refused() {
    let env = TestEnv::new();
    env.write("img", &random_data(4096, 1));
    let (_master, slave) = open_pty();
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&slave)
        .unwrap();
    let mut cmd = env.cmd(["create", "-", "-d", "d=img"]);
    cmd.stdout(tty).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // Nothing reads the terminal: a create that wrote to it would block.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("create - to a terminal did not end");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    let err = assert_failure(&out, &"create - > tty");
    assert!(
        err.contains("refusing to write an archive to a terminal"),
        "{err}"
    );
}

/// `demo` without qemu-storage-daemon fails at once, saying what it
/// needs, and makes nothing: its `--dir` does not exist afterwards.
#[test]
fn demo_without_qemu_storage_daemon_fails_before_making_anything() {
    let env = TestEnv::new();
    let empty = env.path("empty");
    std::fs::create_dir(&empty).unwrap();
    let cases: [(&str, &str, &std::path::Path); 2] = [
        (
            "QEMU_STORAGE_DAEMON",
            "/nonexistent/qemu-storage-daemon",
            std::path::Path::new("/usr/bin:/bin"),
        ),
        ("QEMU_STORAGE_DAEMON", "", &empty),
    ];
    for (var, value, path) in cases {
        let mut cmd = env.cmd(["demo", "--dir", "demo"]);
        cmd.env(var, value).env("PATH", path);
        let out = output_within(&mut cmd, Duration::from_secs(30));
        let err = assert_failure(&out, &(value, path));
        assert!(
            err.contains("the demo needs qemu-storage-daemon")
                && err.contains("qemu-storage-daemon not found"),
            "{err}"
        );
        assert!(!env.path("demo").exists(), "demo made its directory");
        assert_eq!(out.stdout, b"", "demo said something on stdout");
    }
}

/// `generate man DIR` writes vma-writer(1) and a page per subcommand;
/// `generate completions SHELL` prints a script that knows the
/// subcommands (and bash's parses).
#[test]
fn generated_man_pages_and_completions() {
    let env = TestEnv::new();
    env.ok(["generate", "man", "man1"]);
    for page in [
        "vma-writer.1",
        "vma-writer-backup.1",
        "vma-writer-verify.1",
        "vma-writer-convert.1",
    ] {
        let text = std::fs::read_to_string(env.path("man1").join(page)).unwrap();
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}: {text:.80}"
        );
    }
    for shell in ["bash", "zsh", "fish"] {
        let script = String::from_utf8(env.ok(["generate", "completions", shell])).unwrap();
        for sub in ["backup", "serve", "extract", "convert"] {
            assert!(script.contains(sub), "{shell}: no {sub}");
        }
        if shell == "bash" {
            let path = env.write("vma-writer.bash", script.as_bytes());
            run_ok(std::process::Command::new("bash").arg("-n").arg(path));
        }
    }
}
