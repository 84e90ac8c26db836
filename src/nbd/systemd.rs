//! systemd socket activation (`sd_listen_fds(3)`), by hand: when
//! `LISTEN_PID` names this process and `LISTEN_FDS` is 1, file descriptor 3
//! is a listening socket that systemd (or any manager speaking the same
//! protocol) bound for us. [`take_listen_fd`] checks that and hands the
//! descriptor out once; `nbd::server` turns it into a Unix or TCP
//! [`Listener`](super::Listener) by its address family.
//!
//! The variables are left in the environment (removing them is not
//! thread-safe once the runtime runs); they name our pid, so a child
//! process would not take them for its own. The descriptor is marked
//! close-on-exec, so children do not inherit the socket.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
pub const SD_LISTEN_FDS_START: RawFd = 3;

/// Why no socket could be taken from systemd.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivationError {
    /// `LISTEN_PID` or `LISTEN_FDS` is not set.
    #[error(
        "no socket passed by systemd: {0} is not set (--listen systemd needs a socket unit, \
         see contrib/)"
    )]
    NotSet(&'static str),
    /// A variable is not a number.
    #[error("{name}={value:?} is not a number")]
    NotANumber {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
    },
    /// The sockets are meant for another process.
    #[error("LISTEN_PID={listen_pid} is not this process ({pid}): the sockets are not ours")]
    OtherPid {
        /// `LISTEN_PID`.
        listen_pid: u32,
        /// Our pid.
        pid: u32,
    },
    /// Not exactly one socket.
    #[error("LISTEN_FDS={0}: exactly one socket is needed (one ListenStream= in the socket unit)")]
    FdCount(u32),
    /// The socket was taken before.
    #[error("the systemd socket was already taken by this process")]
    Taken,
}

/// Checks `LISTEN_PID` and `LISTEN_FDS` (as read from the environment)
/// against our `pid`. Pure, so the rules are testable.
pub fn check_env(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    pid: u32,
) -> Result<(), ActivationError> {
    let number = |name: &'static str, v: Option<&str>| -> Result<u32, ActivationError> {
        let v = v.ok_or(ActivationError::NotSet(name))?;
        v.trim().parse().map_err(|_| ActivationError::NotANumber {
            name,
            value: v.to_owned(),
        })
    };
    let listen_pid = number("LISTEN_PID", listen_pid)?;
    let fds = number("LISTEN_FDS", listen_fds)?;
    if listen_pid != pid {
        return Err(ActivationError::OtherPid { listen_pid, pid });
    }
    if fds != 1 {
        return Err(ActivationError::FdCount(fds));
    }
    Ok(())
}

/// Takes descriptor 3 when the environment passes it to this process, once
/// per process. Checks that it is a listening stream socket and marks it
/// close-on-exec.
pub fn take_listen_fd() -> io::Result<OwnedFd> {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let var = |n| std::env::var(n).ok();
    check_env(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        std::process::id(),
    )
    .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e))?;
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(io::Error::other(ActivationError::Taken));
    }
    let fd = SD_LISTEN_FDS_START;
    let sockopt = |opt: libc::c_int| -> io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: reads one int option into a local of the right size.
        let r = unsafe {
            libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut v).cast(), &raw mut len)
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(v)
    };
    let not_listening = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} from systemd: {why}"),
        )
    };
    match sockopt(libc::SO_TYPE) {
        Ok(libc::SOCK_STREAM) => {}
        Ok(t) => {
            return Err(not_listening(format!(
                "socket type {t}, not a stream socket"
            )));
        }
        Err(e) => return Err(not_listening(format!("not a socket ({e})"))),
    }
    if sockopt(libc::SO_ACCEPTCONN)? == 0 {
        return Err(not_listening("the socket is not listening".to_owned()));
    }
    // SAFETY: fcntl on a descriptor we just checked is an open socket.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open, passed to this process for its own
    // use, and TAKEN makes sure only one OwnedFd ever owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The address family of a socket (`AF_UNIX`, `AF_INET`, `AF_INET6`).
pub fn socket_family(fd: &OwnedFd) -> io::Result<libc::c_int> {
    use std::os::fd::AsRawFd;
    // SAFETY: sockaddr_storage is plain data, valid when zeroed.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `ss`.
    let r = unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut ss).cast(), &raw mut len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(libc::c_int::from(ss.ss_family))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_rules() {
        assert_eq!(check_env(Some("42"), Some("1"), 42), Ok(()));
        assert_eq!(
            check_env(None, Some("1"), 42),
            Err(ActivationError::NotSet("LISTEN_PID"))
        );
        assert_eq!(
            check_env(Some("42"), None, 42),
            Err(ActivationError::NotSet("LISTEN_FDS"))
        );
        assert_eq!(
            check_env(Some("41"), Some("1"), 42),
            Err(ActivationError::OtherPid {
                listen_pid: 41,
                pid: 42
            })
        );
        assert_eq!(
            check_env(Some("42"), Some("2"), 42),
            Err(ActivationError::FdCount(2))
        );
        assert_eq!(
            check_env(Some("42"), Some("0"), 42),
            Err(ActivationError::FdCount(0))
        );
        assert!(matches!(
            check_env(Some("x"), Some("1"), 42),
            Err(ActivationError::NotANumber { .. })
        ));
    }
}
