//! Helpers shared by the integration tests.
//!
//! Tests that need an external program (qemu-img, nbdsh, qemu-storage-daemon
//! ...) call [`require_tool`] first. On a developer's machine a missing tool
//! makes the test print a reason and return early; in CI
//! (`VMA_WRITER_REQUIRE_TOOLS=1`, set by `.ci/run`) it fails the test, so a
//! broken install never passes silently.

#![allow(dead_code)]

use std::path::PathBuf;

/// Environment variable that turns a skipped tool test into a failure.
pub const REQUIRE_TOOLS_ENV: &str = "VMA_WRITER_REQUIRE_TOOLS";

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

/// Returns true when every tool in `names` is available. Otherwise prints
/// which are missing and returns false, or panics when
/// `VMA_WRITER_REQUIRE_TOOLS=1`.
#[must_use]
pub fn require_tools(names: &[&str]) -> bool {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| find_tool(n).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var(REQUIRE_TOOLS_ENV).as_deref() == Ok("1") {
        panic!("required tools missing: {}", missing.join(", "));
    }
    eprintln!("SKIPPED: tools not installed: {}", missing.join(", "));
    false
}

/// Python interpreter that has the `nbd` module (Debian's python3-libnbd is
/// installed for /usr/bin/python3 only, not for a pyenv python3 on PATH).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// True when `/usr/bin/python3 -c 'import nbd'` works; same skip/fail rules
/// as [`require_tools`].
#[must_use]
pub fn require_python_nbd() -> bool {
    let ok = std::process::Command::new(SYSTEM_PYTHON)
        .args(["-c", "import nbd"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        return true;
    }
    if std::env::var(REQUIRE_TOOLS_ENV).as_deref() == Ok("1") {
        panic!("python3-libnbd missing: {SYSTEM_PYTHON} -c 'import nbd' failed");
    }
    eprintln!("SKIPPED: python3-libnbd not installed");
    false
}
