//! External programs a test needs, and what happens when one is missing:
//! on a developer's machine the test prints a reason and returns early; in
//! CI (`VMA_WRITER_REQUIRE_TOOLS=1`, set by `.ci/run`) it fails, so a broken
//! install never passes silently. [`require`] applies the same rule to any
//! other precondition of the machine (a sysfs file, a time zone).

use std::path::PathBuf;

/// Environment variable that turns a skipped test into a failure.
pub const REQUIRE_TOOLS_ENV: &str = "VMA_WRITER_REQUIRE_TOOLS";

/// Tools the qemu-storage-daemon based tests need.
pub const QSD_TOOLS: &[&str] = &["qemu-storage-daemon", "qemu-img", "qemu-io"];

/// Python interpreter that has the `nbd` module (Debian's python3-libnbd is
/// installed for /usr/bin/python3 only, not for a pyenv python3 on PATH).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Finds `name` on PATH (or takes it as a path when it contains a `/`).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// True when `ok`. Otherwise prints `missing` as the reason the test (or
/// the part of it that needs it) is skipped and returns false, or panics
/// with it when `VMA_WRITER_REQUIRE_TOOLS=1`.
#[must_use]
pub fn require(ok: bool, missing: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var(REQUIRE_TOOLS_ENV).as_deref() == Ok("1") {
        panic!("{missing} ({REQUIRE_TOOLS_ENV}=1 makes this a failure)");
    }
    eprintln!("SKIPPED: {missing}");
    false
}

/// True when every tool in `names` is on PATH; see [`require`].
#[must_use]
pub fn require_tools(names: &[&str]) -> bool {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| find_tool(n).is_none())
        .collect();
    require(
        missing.is_empty(),
        &format!("tools not installed: {}", missing.join(", ")),
    )
}

/// True when `/usr/bin/python3 -c 'import nbd'` works; see [`require`].
#[must_use]
pub fn require_python_nbd() -> bool {
    let ok = std::process::Command::new(SYSTEM_PYTHON)
        .args(["-c", "import nbd"])
        .stdin(std::process::Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    require(
        ok,
        &format!("python3-libnbd not installed ({SYSTEM_PYTHON} -c 'import nbd' failed)"),
    )
}

/// Turns on logs of in-process code (servers, the QMP client) when
/// `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
