//! `QEMU_STORAGE_DAEMON` overrides the binary. The checks change the
//! process environment (that variable and `PATH`), which the other tests of
//! this binary, running in parallel, must not see: so
//! [`binary_env_override`] re-runs this test binary in a child process with
//! only [`checks_in_child`] selected, which does the real work there.

use std::process::Command;

use vma_writer::qemu::{self, BINARY_ENV, DaemonOptions, StorageDaemon};

/// Set in the child process; [`checks_in_child`] does nothing without it.
const CHILD_ENV: &str = "VMA_WRITER_IT_ENV_CHILD";

/// Printed by the child once every check passed.
const DONE: &str = "binary_env checks done";

#[test]
fn binary_env_override() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "qmp_binary_env::checks_in_child",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(DONE),
        "child test run failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The checks; only in the child started by [`binary_env_override`].
#[tokio::test]
async fn checks_in_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-qsd");
    // SAFETY: this child process runs this one test on one thread; nothing
    // else reads the environment concurrently.
    unsafe { std::env::set_var(BINARY_ENV, &missing) };
    let e = qemu::find_binary().unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("no-such-qsd"), "{msg}");
    assert!(msg.contains("install qemu-utils"), "{msg}");
    assert!(matches!(
        StorageDaemon::start(DaemonOptions::new(dir.path().join("run"))).await,
        Err(qemu::Error::NotFound { .. })
    ));

    let fake = dir.path().join("qsd");
    std::fs::write(&fake, "").unwrap();
    unsafe { std::env::set_var(BINARY_ENV, &fake) };
    assert_eq!(qemu::find_binary().unwrap(), fake);

    unsafe { std::env::remove_var(BINARY_ENV) };
    unsafe { std::env::set_var("PATH", dir.path().join("empty")) };
    let msg = qemu::find_binary().unwrap_err().to_string();
    assert_eq!(
        msg,
        "qemu-storage-daemon not found (PATH); install qemu-utils or set QEMU_STORAGE_DAEMON"
    );
    println!("{DONE}");
}
