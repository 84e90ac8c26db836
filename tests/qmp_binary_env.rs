//! `QEMU_STORAGE_DAEMON` overrides the binary. Alone in its own test binary
//! because it changes the process environment.

use vma_writer::qemu::{self, BINARY_ENV, DaemonOptions, StorageDaemon};

#[tokio::test]
async fn binary_env_override() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-qsd");
    // SAFETY: the only test in this binary; nothing else reads the
    // environment concurrently.
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
}
