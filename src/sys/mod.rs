//! Thin wrappers over the Linux ioctls and syscalls that nix and socket2 do not cover.
#![allow(unsafe_code)]

pub mod cmsg;
pub mod netlink;

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use nix::libc;

/// Turns a libc-style `-1` return into `io::Error::last_os_error()`.
macro_rules! syscall {
    ($call:expr) => {{
        let ret = $call;
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }};
}

/// An `ifreq` with `ifr_name` set; rejects names the kernel would truncate or misread.
fn ifreq_named(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name must be 1-15 bytes without NUL",
        ));
    }
    // SAFETY: ifreq is a plain C struct/union; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

/// SO_MEMINFO (asm-generic/socket.h; x86, arm and riscv use the generic values).
const SO_MEMINFO: libc::c_int = 55;

/// Packets the kernel dropped for socket `fd` (a full receive buffer, for UDP): the
/// drop count of SO_MEMINFO.
pub fn socket_drops(fd: BorrowedFd) -> io::Result<u32> {
    let mut info = [0u32; libc::SK_MEMINFO_DROPS as usize + 1];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes, and the kernel writes at most `len`
    // (it truncates to what we pass) and reports how many in `len`.
    syscall!(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    let drops = libc::SK_MEMINFO_DROPS as usize;
    if (len as usize) < (drops + 1) * 4 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "SO_MEMINFO without a drop count",
        ));
    }
    Ok(info[drops])
}

/// Index of a network interface by name, or `None` if it does not exist.
pub fn interface_index(name: &str) -> Option<u32> {
    let c_name = CString::new(name).ok()?;
    nix::net::if_::if_nametoindex(c_name.as_c_str()).ok()
}

/// Attaches the open /dev/net/tun `fd` to a new TUN interface `name` (TUNSETIFF).
pub fn tun_set_iff(fd: RawFd, name: &str, flags: libc::c_int) -> io::Result<()> {
    let mut req = ifreq_named(name)?;
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes an ifreq; `req` is a valid, live ifreq.
    syscall!(unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req) })?;
    Ok(())
}

/// Whether the TUN `fd` is still attached to its interface: TUNGETIFF fails with
/// EBADFD once the interface was deleted (the fd stays open, detached).
pub fn tun_attached(fd: RawFd) -> io::Result<bool> {
    // SAFETY: ifreq is a plain C struct/union; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes the interface's name and flags into `req`, a valid,
    // live ifreq.
    match syscall!(unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) }) {
        Ok(_) => Ok(true),
        Err(err) if err.raw_os_error() == Some(libc::EBADFD) => Ok(false),
        Err(err) => Err(err),
    }
}

/// Asks the TUN to hand us (and accept from us) the offloads in `flags` (TUNSETOFFLOAD);
/// EINVAL means the kernel does not know one of them.
pub fn tun_set_offload(fd: RawFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is passed.
    syscall!(unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) })?;
    Ok(())
}

/// Writes one packet with write(2); only used for the start-up offload probe.
pub fn write_packet(fd: RawFd, packet: &[u8]) -> io::Result<usize> {
    // SAFETY: `packet` is a valid, initialised slice for the duration of the call.
    let written = syscall!(unsafe { libc::write(fd, packet.as_ptr().cast(), packet.len()) })?;
    Ok(written as usize)
}

/// Sets the MTU of interface `name` through control socket `ctl` (SIOCSIFMTU).
pub fn set_mtu(ctl: &impl AsRawFd, name: &str, mtu: u32) -> io::Result<()> {
    let mut req = ifreq_named(name)?;
    req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    // SAFETY: SIOCSIFMTU reads an ifreq; `req` is valid for the call.
    syscall!(unsafe { libc::ioctl(ctl.as_raw_fd(), libc::SIOCSIFMTU as _, &mut req) })?;
    Ok(())
}

/// Sets the transmit queue length of interface `name` (SIOCSIFTXQLEN). For a TUN this is
/// the queue of packets the kernel holds for us to read.
pub fn set_tx_queue_len(ctl: &impl AsRawFd, name: &str, len: u32) -> io::Result<()> {
    let mut req = ifreq_named(name)?;
    req.ifr_ifru.ifru_metric = len as libc::c_int;
    // SAFETY: SIOCSIFTXQLEN reads ifr_qlen (the int member of the union) from `req`.
    syscall!(unsafe { libc::ioctl(ctl.as_raw_fd(), libc::SIOCSIFTXQLEN as _, &mut req) })?;
    Ok(())
}

/// Sets IFF_UP on interface `name` (SIOCGIFFLAGS + SIOCSIFFLAGS).
pub fn set_up(ctl: &impl AsRawFd, name: &str) -> io::Result<()> {
    let mut req = ifreq_named(name)?;
    // SAFETY: SIOCGIFFLAGS writes the flags into the valid `req`.
    syscall!(unsafe { libc::ioctl(ctl.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) })?;
    // SAFETY: the union was just filled in as flags by the kernel.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the valid `req`.
    syscall!(unsafe { libc::ioctl(ctl.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut req) })?;
    Ok(())
}

/// A private anonymous mapping: pages cost memory only once touched, and all of it goes
/// back to the OS when dropped. Flow buffers live here rather than on the heap, where
/// glibc may serve large requests from (and keep) fragmented heap memory.
pub struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps `len` zeroed bytes; `None` when memory or the map count is exhausted.
    pub fn new(len: usize) -> Option<Mapping> {
        use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous};
        let length = std::num::NonZeroUsize::new(len)?;
        // SAFETY: a fresh private anonymous mapping aliases nothing.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }
        .ok()?;
        Some(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The first byte; `len()` bytes from here are readable and writable until drop.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Gives the pages wholly inside `range` back to the kernel (MADV_DONTNEED): they
    /// read as zero afterwards and cost memory again only once touched.
    pub fn discard(&self, range: std::ops::Range<usize>) {
        const PAGE: usize = 4096;
        let start = range.start.next_multiple_of(PAGE);
        let end = range.end.min(self.len) / PAGE * PAGE;
        if start >= end {
            return;
        }
        // SAFETY: a page-aligned range inside the mapping; dropping the contents of
        // anonymous private pages is what the callers ask for (nothing in them is live).
        let _ = unsafe {
            nix::sys::mman::madvise(
                self.ptr.add(start).cast(),
                end - start,
                nix::sys::mman::MmapAdvise::MADV_DONTNEED,
            )
        };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `new`. Its only users,
        // `uring::memory` regions, drop it once no borrow or operation points into it.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
}

/// Switches to `user` (and its primary group, no supplementary groups), keeping only
/// CAP_NET_ADMIN (to remove `--route` rules at exit) and CAP_NET_RAW (raw ICMP sockets
/// for ping; SO_BINDTODEVICE needs none).
pub fn drop_privileges(user: &nix::unistd::User) -> io::Result<()> {
    use caps::{CapSet, Capability};
    use nix::unistd::{setgid, setgroups, setuid};
    // Keep the permitted set across setuid; it is narrowed right after.
    nix::sys::prctl::set_keepcaps(true)?;
    setgroups(&[])?;
    setgid(user.gid)?;
    setuid(user.uid)?;
    let kept = caps::CapsHashSet::from([Capability::CAP_NET_ADMIN, Capability::CAP_NET_RAW]);
    for set in [CapSet::Permitted, CapSet::Effective] {
        caps::set(None, set, &kept).map_err(io::Error::other)?;
    }
    nix::sys::prctl::set_keepcaps(false)?;
    Ok(())
}

/// Hands free heap pages back to the kernel (glibc otherwise keeps them mapped).
#[cfg(target_env = "gnu")]
pub fn release_free_heap() {
    // SAFETY: malloc_trim has no preconditions; it only walks the allocator's own free
    // lists (under the allocator's lock) and returns whole free pages with madvise.
    unsafe { libc::malloc_trim(0) };
}

/// Other C libraries have no malloc_trim; their allocators decide for themselves.
#[cfg(not(target_env = "gnu"))]
pub fn release_free_heap() {}

/// Raises the soft RLIMIT_NOFILE towards `want` (capped by the hard limit); returns the result.
pub fn raise_fd_limit(want: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    let target = want.min(hard).max(soft);
    if target > soft && setrlimit(Resource::RLIMIT_NOFILE, target, hard).is_ok() {
        return target;
    }
    soft
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    #[test]
    fn socket_drops_counts_datagrams_a_full_receive_buffer_refused() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket2::SockRef::from(&receiver)
            .set_recv_buffer_size(4096)
            .unwrap();
        assert_eq!(socket_drops(receiver.as_fd()).unwrap(), 0);
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Loopback delivers each datagram as it is sent: most of these find no room.
        for _ in 0..64 {
            sender
                .send_to(&[7; 1000], receiver.local_addr().unwrap())
                .unwrap();
        }
        let drops = socket_drops(receiver.as_fd()).unwrap();
        assert!((32..=64).contains(&drops), "{drops} drops");
    }
}
