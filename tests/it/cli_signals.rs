//! Ctrl-C (SIGINT) and SIGTERM during the offline commands, `create` and
//! `extract`: the command removes what it left half-written (unless
//! `--keep-partial`), says so in exactly one line, exits 128 + the signal
//! (130 / 143), and the same command then succeeds when rerun. A
//! `.partial` left by a run killed hard (SIGKILL) makes the next `create`
//! fail with a message that says what it is and that it can be deleted.
//!
//! To catch each command mid-way without racing it: `create` compresses
//! 8 MiB of random data at zstd level 19 (seconds of work after it has
//! created `ARCHIVE.partial`), and `extract` reads its archive from a pipe
//! the test stops feeding half-way.

use std::io::Write;
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use crate::support::*;

/// How long the commands may take to start, or to end after a signal.
const TIMEOUT: Duration = Duration::from_secs(60);

/// `create a.vma.zst --zstd=19 -d drive-scsi0=img` (plus `extra`).
fn create_args(extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["create", "a.vma.zst", "--zstd=19", "-d", "drive-scsi0=img"]
        .map(String::from)
        .to_vec();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// An env with the 8 MiB random image `img`.
fn create_env() -> TestEnv {
    let env = TestEnv::new();
    env.write("img", &random_data(8 << 20, 99));
    env
}

/// Starts `create` and waits until it has created `a.vma.zst.partial`.
fn start_create(env: &TestEnv, extra: &[&str]) -> Child {
    let mut child = spawn_piped(&mut env.cmd(create_args(extra)));
    let partial = env.path("a.vma.zst.partial");
    wait_until("create to make a.vma.zst.partial", TIMEOUT, || {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("create ended ({s}) before it was interrupted");
        }
        partial.exists()
    });
    child
}

/// The stderr of a command stopped by `sig`: exit status 128 + `sig` and
/// exactly the line `vma-writer: COMMAND interrupted by SIG...; TAIL`.
fn assert_interrupted(out: &Output, sig: libc::c_int, command: &str, tail: &str) {
    let err = assert_exit(out, 128 + sig, &command);
    assert_eq!(
        err,
        format!(
            "vma-writer: {command} interrupted by {}; {tail}\n",
            signal_name(sig)
        )
    );
}

fn create_interrupted(sig: libc::c_int) {
    let env = create_env();
    let child = start_create(&env, &[]);
    kill(child.id(), sig);
    let out = wait_within(child, TIMEOUT);
    assert_interrupted(&out, sig, "create", "removed a.vma.zst.partial");
    assert_eq!(tree(env.dir.path()), [std::path::Path::new("img")]);
    // Nothing stands in the way of the same command.
    env.ok(create_args(&[]));
    let (_, devs) =
        read_back(&zstd::decode_all(&std::fs::read(env.path("a.vma.zst")).unwrap()[..]).unwrap())
            .unwrap();
    assert_same(&devs[0], &random_data(8 << 20, 99), "drive-scsi0");
}

#[test]
fn create_interrupted_by_sigint_cleans_up_and_reruns() {
    create_interrupted(libc::SIGINT);
}

#[test]
fn create_interrupted_by_sigterm_cleans_up_and_reruns() {
    create_interrupted(libc::SIGTERM);
}

/// The next `create` of an archive whose `.partial` an earlier run left
/// behind: refused (exit 1) with a message that the file exists, is not a
/// complete archive, and can be deleted; once it is, the command works.
fn create_refuses_leftover_partial(env: &TestEnv) {
    let partial = env.path("a.vma.zst.partial");
    let before = std::fs::read(&partial).unwrap();
    let err = env.fails(create_args(&[]));
    assert!(
        err.contains("a.vma.zst.partial exists")
            && err.contains("not a complete archive")
            && err.contains("delete it"),
        "{err}"
    );
    assert_eq!(std::fs::read(&partial).unwrap(), before, "partial touched");
    assert!(!env.path("a.vma.zst").exists());
    std::fs::remove_file(&partial).unwrap();
    env.ok(create_args(&[]));
}

/// With `--keep-partial`, Ctrl-C keeps `ARCHIVE.partial` and says so.
#[test]
fn create_interrupted_with_keep_partial_keeps_it() {
    let env = create_env();
    let child = start_create(&env, &["--keep-partial"]);
    kill(child.id(), libc::SIGINT);
    let out = wait_within(child, TIMEOUT);
    assert_interrupted(
        &out,
        libc::SIGINT,
        "create",
        "kept a.vma.zst.partial (--keep-partial)",
    );
    assert!(env.path("a.vma.zst.partial").exists());
    verify_rejects(&env.path("a.vma.zst.partial"));
    create_refuses_leftover_partial(&env);
}

/// A run killed hard cannot clean up: its `.partial` stays, and the next
/// `create` says what it is.
#[test]
fn create_killed_leaves_a_partial_the_next_run_explains() {
    let env = create_env();
    let child = start_create(&env, &[]);
    kill(child.id(), libc::SIGKILL);
    let out = wait_within(child, TIMEOUT);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGKILL));
    create_refuses_leftover_partial(&env);
}

/// An env with `a.vma`: a 4 MiB random drive `d` and a config.
fn extract_env() -> (TestEnv, Vec<u8>) {
    let env = TestEnv::new();
    env.write("img", &random_data(4 << 20, 98));
    env.write("vm.conf", b"cores: 1\n");
    env.ok(["create", "a.vma", "-c", "vm.conf", "-d", "d=img"]);
    let archive = std::fs::read(env.path("a.vma")).unwrap();
    (env, archive)
}

/// `extract - out` fed the first half of `archive` through a pipe that
/// then stays open; returns once `out/tmp-disk-d.raw` exists (with the
/// pipe, which must outlive the signal).
fn start_extract(
    env: &TestEnv,
    archive: &[u8],
    extra: &[&str],
) -> (Child, std::process::ChildStdin) {
    let mut cmd = env.cmd(["extract", "-", "out"]);
    cmd.args(extra).stdin(Stdio::piped());
    let mut child = spawn_piped(&mut cmd);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&archive[..archive.len() / 2]).unwrap();
    let tmp = env.path("out/tmp-disk-d.raw");
    wait_until("extract to create out/tmp-disk-d.raw", TIMEOUT, || {
        tmp.exists()
    });
    (child, stdin)
}

fn extract_interrupted(sig: libc::c_int) {
    let (env, archive) = extract_env();
    let (child, stdin) = start_extract(&env, &archive, &[]);
    kill(child.id(), sig);
    let out = wait_within(child, TIMEOUT);
    drop(stdin);
    assert_interrupted(&out, sig, "extract", "removed out");
    assert!(!env.path("out").exists(), "{:?}", tree(env.dir.path()));
    // The same command works.
    let out = env.run_stdin(["extract", "-", "out"], &archive);
    assert_success(&out, &"extract - out");
    assert_file_is(&env.path("out/disk-d.raw"), &random_data(4 << 20, 98));
}

#[test]
fn extract_interrupted_by_sigint_removes_its_directory_and_reruns() {
    extract_interrupted(libc::SIGINT);
}

#[test]
fn extract_interrupted_by_sigterm_removes_its_directory_and_reruns() {
    extract_interrupted(libc::SIGTERM);
}

/// With `--keep-partial`, the directory and its partial files stay, and
/// the line says so.
#[test]
fn extract_interrupted_with_keep_partial_keeps_the_directory() {
    let (env, archive) = extract_env();
    let (child, stdin) = start_extract(&env, &archive, &["--keep-partial"]);
    kill(child.id(), libc::SIGINT);
    let out = wait_within(child, TIMEOUT);
    drop(stdin);
    assert_interrupted(&out, libc::SIGINT, "extract", "kept out (--keep-partial)");
    assert_eq!(
        tree(&env.path("out")),
        [
            std::path::Path::new("tmp-disk-d.raw"),
            std::path::Path::new("vm.conf")
        ]
    );
}
