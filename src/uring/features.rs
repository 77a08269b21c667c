//! What the running kernel's io_uring offers, probed once at start-up before anything
//! else is created, and the choices the proxy makes from it.

use std::fmt;

use io_uring::{IoUring, Probe, opcode};

/// A kernel version, major.minor: what each io_uring feature first appeared in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
}

impl KernelVersion {
    pub const fn new(major: u32, minor: u32) -> KernelVersion {
        KernelVersion { major, minor }
    }

    /// Parses the start of a release string: `6.1`, `6.1.0-57-cloud-amd64`, `6.12.48+deb12`.
    pub fn parse(text: &str) -> Option<KernelVersion> {
        let mut parts = text.trim().splitn(3, '.');
        let major = parts.next()?.parse().ok()?;
        let minor: String = parts
            .next()?
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        Some(KernelVersion::new(major, minor.parse().ok()?))
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The oldest kernel the proxy runs on: the ring set-up (IORING_SETUP_DEFER_TASKRUN),
/// provided buffer rings (5.19) and multishot receives (6.0) are all needed.
pub const FLOOR: KernelVersion = KernelVersion::new(6, 1);
/// IORING_OP_READ_MULTISHOT: one armed read delivers every TUN packet.
const READ_MULTISHOT: KernelVersion = KernelVersion::new(6, 7);
/// The optional features, with the kernel that brought each, as a cap names them.
const OPTIONAL: [(KernelVersion, &str); 1] = [(READ_MULTISHOT, "multishot TUN reads")];

/// Operations the proxy cannot do without, with the kernel that brought each. All are
/// older than `FLOOR`; a kernel that lacks one is older than it claims or restricted.
const REQUIRED: [(u8, &str); 11] = [
    (opcode::Read::CODE, "IORING_OP_READ"),
    (opcode::Write::CODE, "IORING_OP_WRITE"),
    (opcode::Send::CODE, "IORING_OP_SEND"),
    (opcode::Recv::CODE, "IORING_OP_RECV"),
    // Multishot (6.0), for the datagram flows' receives with their control messages.
    (opcode::RecvMsg::CODE, "IORING_OP_RECVMSG"),
    (opcode::Connect::CODE, "IORING_OP_CONNECT"),
    (opcode::Close::CODE, "IORING_OP_CLOSE"),
    (opcode::AsyncCancel::CODE, "IORING_OP_ASYNC_CANCEL"),
    (opcode::LinkTimeout::CODE, "IORING_OP_LINK_TIMEOUT"),
    // For the control socket and metrics endpoint (multishot accepts came in 5.19).
    (opcode::Accept::CODE, "IORING_OP_ACCEPT"),
    (opcode::Timeout::CODE, "IORING_OP_TIMEOUT"),
];

/// Why this kernel cannot run the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// The kernel's release (`uname -r`), or the cap that stands in for it.
    pub found: String,
    /// The first thing found missing.
    pub missing: &'static str,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kernel {} lacks {} (uringproxy needs Linux {FLOOR} or newer)",
            self.found, self.missing
        )
    }
}

/// The optional io_uring features in use, each chosen from the probe (and the cap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// TUN packets arrive through one multishot read; otherwise a batch of single reads
    /// from the same provided buffers is kept in flight.
    pub read_multishot: bool,
}

impl Features {
    /// Everything the newest kernels offer.
    pub const ALL: Features = Features {
        read_multishot: true,
    };

    /// Checks `ring`'s kernel for what the proxy needs and picks the optional features.
    /// `cap` (URINGPROXY_MAX_URING) makes a newer kernel behave like an older one, so
    /// every fallback path can be exercised anywhere.
    pub fn probe(ring: &IoUring, cap: Option<KernelVersion>) -> Result<Features, Unsupported> {
        let found = || match cap {
            Some(cap) => format!("{} (capped to {cap} by {CAP_ENV})", release()),
            None => release(),
        };
        if cap.is_some_and(|cap| cap < FLOOR) {
            return Err(Unsupported {
                found: found(),
                missing: "IORING_SETUP_DEFER_TASKRUN",
            });
        }
        if !ring.params().is_feature_ext_arg() {
            return Err(Unsupported {
                found: found(),
                missing: "IORING_FEAT_EXT_ARG",
            });
        }
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|_| Unsupported {
                found: found(),
                missing: "IORING_REGISTER_PROBE",
            })?;
        if let Some(&(_, name)) = REQUIRED.iter().find(|(code, _)| !probe.is_supported(*code)) {
            return Err(Unsupported {
                found: found(),
                missing: name,
            });
        }
        let allowed = |since: KernelVersion| cap.is_none_or(|cap| cap >= since);
        Ok(Features {
            read_multishot: probe.is_supported(opcode::ReadMulti::CODE) && allowed(READ_MULTISHOT),
        })
    }
}

/// Environment variable capping the io_uring features used to those of a kernel version
/// (e.g. `6.1`), like URINGPROXY_MAX_OFFLOAD caps the offload probe.
pub const CAP_ENV: &str = "URINGPROXY_MAX_URING";

/// The optional features a cap to `cap` turns off, whatever the kernel has.
pub fn capped_off(cap: KernelVersion) -> Vec<&'static str> {
    OPTIONAL
        .iter()
        .filter(|&&(since, _)| cap < since)
        .map(|&(_, name)| name)
        .collect()
}

/// The running kernel's release, as `uname -r` prints it.
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|text| text.trim().to_string())
        .unwrap_or_else(|_| "(unknown release)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_from_releases_and_caps() {
        assert_eq!(KernelVersion::parse("6.1"), Some(KernelVersion::new(6, 1)));
        assert_eq!(
            KernelVersion::parse("6.1.0-57-cloud-amd64"),
            Some(KernelVersion::new(6, 1))
        );
        assert_eq!(
            KernelVersion::parse("6.12.48+deb12-cloud-amd64"),
            Some(KernelVersion::new(6, 12))
        );
        assert_eq!(
            KernelVersion::parse("6.18-rc2"),
            Some(KernelVersion::new(6, 18))
        );
        for bad in ["", "6", "six.one", "6.", ".1", "6.x"] {
            assert_eq!(KernelVersion::parse(bad), None, "{bad:?}");
        }
        assert!(KernelVersion::new(6, 12) > KernelVersion::new(6, 7));
        assert!(KernelVersion::new(5, 19) < FLOOR);
    }

    #[test]
    fn the_refusal_names_the_kernel_and_the_floor() {
        let text = Unsupported {
            found: "5.15.0-91-generic".into(),
            missing: "IORING_SETUP_DEFER_TASKRUN",
        }
        .to_string();
        assert!(text.contains("5.15.0-91-generic"), "{text}");
        assert!(text.contains("6.1 or newer"), "{text}");
    }
}
