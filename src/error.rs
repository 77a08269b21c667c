//! Start-up errors: each names the problem in one line for the user.

use std::fmt;
use std::io;

use nix::libc;

/// Why the proxy could not start (or had to stop).
#[derive(Debug)]
pub enum Error {
    /// A flag value is invalid; the text says which and why.
    Usage(String),
    /// `-i` names an interface that does not exist.
    UnknownInterface(String),
    /// Creating the TUN and installing routes needs CAP_NET_ADMIN (root).
    NotPermitted(&'static str),
    /// The kernel offers no TUN driver.
    NoTun(io::Error),
    /// The TUN name is already taken by an interface we did not create.
    TunExists(String),
    /// io_uring could not be set up (not built in, disabled by sysctl or seccomp, or
    /// RLIMIT_MEMLOCK too low).
    IoUring(io::Error),
    /// The kernel's io_uring lacks something the proxy needs.
    Kernel(crate::uring::features::Unsupported),
    /// The TUN interface was deleted under the running proxy.
    TunDeleted(String),
    /// Any other system call failure during set-up or in the event loop.
    Io(&'static str, io::Error),
    /// The control socket or metrics endpoint could not be set up, or `uringproxy
    /// status` could not get or read a reply; the text says which and why.
    Control(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(text) => write!(f, "{text}"),
            Error::UnknownInterface(name) => {
                write!(
                    f,
                    "unknown interface '{name}' (see `ip link` for the names)"
                )
            }
            Error::NotPermitted(what) => {
                write!(
                    f,
                    "not permitted to {what}: run as root (needs CAP_NET_ADMIN)"
                )
            }
            Error::NoTun(err) => write!(
                f,
                "cannot open /dev/net/tun: {err} (is the tun module loaded?)"
            ),
            Error::TunExists(name) => {
                write!(
                    f,
                    "interface '{name}' already exists; pick another --tun name"
                )
            }
            Error::IoUring(err) => match err.raw_os_error() {
                Some(libc::ENOSYS) => write!(
                    f,
                    "io_uring unavailable: {err} (this kernel was built without io_uring)"
                ),
                // Measured on 6.18: set-up needs more than 256 KiB of it.
                Some(libc::ENOMEM) => write!(
                    f,
                    "io_uring unavailable: {err} (without CAP_IPC_LOCK its rings count against \
                     RLIMIT_MEMLOCK: raise it to 8 MiB, e.g. LimitMEMLOCK=8M in a systemd unit)"
                ),
                _ => write!(
                    f,
                    "io_uring unavailable: {err} (check the kernel.io_uring_disabled sysctl and seccomp)"
                ),
            },
            Error::Kernel(unsupported) => write!(f, "{unsupported}"),
            Error::TunDeleted(name) => write!(f, "the TUN '{name}' was deleted; exiting"),
            Error::Io(what, err) => write!(f, "{what}: {err}"),
            Error::Control(text) => write!(f, "{text}"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// Maps a failed io_uring set-up: EINVAL means a kernel that does not know the ring
    /// flags the proxy sets (IORING_SETUP_DEFER_TASKRUN arrived in 6.1).
    pub fn from_ring_setup(err: io::Error) -> Error {
        if err.raw_os_error() == Some(libc::EINVAL) {
            return Error::Kernel(crate::uring::features::Unsupported {
                found: crate::uring::features::release(),
                missing: "IORING_SETUP_DEFER_TASKRUN",
            });
        }
        Error::IoUring(err)
    }

    /// Maps a failed registration of provided buffers (`what`): EINVAL means a kernel
    /// without provided buffer rings (IORING_REGISTER_PBUF_RING, Linux 5.19).
    pub fn from_buffer_ring(what: &'static str, err: io::Error) -> Error {
        if err.raw_os_error() == Some(libc::EINVAL) {
            return Error::Kernel(crate::uring::features::Unsupported {
                found: crate::uring::features::release(),
                missing: "provided buffer rings (IORING_REGISTER_PBUF_RING, Linux 5.19)",
            });
        }
        Error::Io(what, err)
    }

    /// Maps EPERM/EACCES to `NotPermitted`, anything else to `Io`.
    pub fn from_io(what: &'static str, err: io::Error) -> Error {
        match err.kind() {
            io::ErrorKind::PermissionDenied => Error::NotPermitted(what),
            _ => Error::Io(what, err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_shortfalls_are_named_with_their_version() {
        let einval = || io::Error::from_raw_os_error(libc::EINVAL);
        let text = Error::from_buffer_ring("register TUN read buffers", einval()).to_string();
        assert!(
            text.contains("provided buffer rings") && text.contains("5.19"),
            "{text}"
        );
        let text = Error::from_ring_setup(einval()).to_string();
        assert!(text.contains("IORING_SETUP_DEFER_TASKRUN"), "{text}");
        let enosys = io::Error::from_raw_os_error(libc::ENOSYS);
        let text = Error::IoUring(enosys).to_string();
        assert!(text.contains("built without io_uring"), "{text}");
        // Without CAP_IPC_LOCK the rings count against RLIMIT_MEMLOCK (a service's
        // default may be 64 KiB): ENOMEM at set-up says so.
        let enomem = io::Error::from_raw_os_error(libc::ENOMEM);
        let text = Error::from_ring_setup(enomem).to_string();
        assert!(text.contains("RLIMIT_MEMLOCK"), "{text}");
        let enomem = io::Error::from_raw_os_error(libc::ENOMEM);
        let text = Error::from_buffer_ring("register TUN read buffers", enomem).to_string();
        assert!(text.starts_with("register TUN read buffers: "), "{text}");
    }
}
