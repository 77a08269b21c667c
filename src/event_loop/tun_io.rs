//! The TUN side of the loop: the read buffers and the reads (one multishot read, or on
//! kernels without it a chain of single reads), each packet's virtio-net header
//! checked, the writes the transmit pool has filled submitted, and the TUN's deletion
//! noticed.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use log::warn;
use nix::libc;

use crate::error::Error;
use crate::stack::device::MAX_SEGMENTATION_PACKET;
use crate::stack::{TxPool, Write};
use crate::stats::Stats;
use crate::sys::{self, netlink};
use crate::tun::Tun;
use crate::uring::{Completion, Features, Op, Region, Ring, Slice, Token};
use crate::wire::vnet;

/// Buffer group of the TUN read buffers.
pub const READ_GROUP: u16 = 0;
/// TUN read buffers (kernel-provided ring); each holds one packet, up to 64 KiB with
/// segmentation offload. With offload each pool holds at most 8 MiB, and only the pages
/// packets filled are resident.
const READ_BUFFERS: u16 = 512;
const READ_BUFFERS_TSO: u16 = 128;
/// TUN write buffers; when all are in flight smoltcp holds data back.
const WRITE_BUFFERS: u16 = 1024;
const WRITE_BUFFERS_TSO: u16 = 128;
/// Single reads in each chain where the kernel has no multishot read (before 6.7):
/// each delivers one packet, so this bounds the packets taken per turn.
const SINGLE_READS: u16 = 64;

/// A packet read from the TUN: where its IP packet starts in the read buffer, and the
/// datagram size of a UDP segmentation super-packet.
#[derive(Clone, Copy, Debug)]
pub struct Frame {
    pub bid: u16,
    pub len: usize,
    pub ip_start: usize,
    pub udp_segment: Option<u16>,
}

pub struct TunIo {
    pub tun: Tun,
    reads: Reads,
    links: Option<LinkWatch>,
}

/// Link notifications of the namespace, watched for the TUN's deletion. A deleted TUN
/// usually ends the pending read with EBADFD, but the kernel wakes its readers before it
/// detaches the file (tun_detach_all), and a multishot read retried in between finds no
/// packet and waits for a wake-up that does not come; RTM_DELLINK goes out after the
/// detach. Only an RTM_DELLINK of the TUN's index (or lost notifications) is checked
/// with TUNGETIFF, which takes the kernel's RTNL lock.
struct LinkWatch {
    fd: OwnedFd,
    /// The pending read's buffer: the start of a notification is all that is looked at
    /// (the rest of a longer one is cut off).
    buf: Region,
    armed: bool,
    tun_index: u32,
}

const LINK_BUF: usize = 256;

impl TunIo {
    /// Registers the read buffers and makes the transmit pool for `tun`.
    pub fn new(
        tun: Tun,
        features: Features,
        ring: &mut Ring,
        mtu: usize,
    ) -> Result<(TunIo, TxPool), Error> {
        let offload = tun.offload();
        let (read_buffers, write_buffers, max_packet) = if offload.tso() {
            (READ_BUFFERS_TSO, WRITE_BUFFERS_TSO, MAX_SEGMENTATION_PACKET)
        } else {
            (READ_BUFFERS, WRITE_BUFFERS, mtu)
        };
        ring.provide_buffers(READ_GROUP, read_buffers, offload.header_len() + max_packet)
            .map_err(|err| Error::from_buffer_ring("register TUN read buffers", err))?;
        let tx = TxPool::new(write_buffers, mtu, offload).ok_or_else(|| {
            Error::Io(
                "allocate TUN write buffers",
                std::io::ErrorKind::OutOfMemory.into(),
            )
        })?;
        let reads = if features.read_multishot {
            Reads::multishot()
        } else {
            Reads::chained(SINGLE_READS.min(read_buffers))
        };
        let links = netlink::link_events()
            .map_err(|err| Error::Io("open a netlink socket for link notifications", err))?;
        let buf = Region::new(LINK_BUF).ok_or_else(|| {
            Error::Io(
                "allocate the link notification buffer",
                std::io::ErrorKind::OutOfMemory.into(),
            )
        })?;
        let tun_index = sys::interface_index(tun.name())
            .ok_or_else(|| Error::Io("look up the TUN", std::io::ErrorKind::NotFound.into()))?;
        let links = Some(LinkWatch {
            fd: links,
            buf,
            armed: false,
            tun_index,
        });
        Ok((TunIo { tun, reads, links }, tx))
    }

    /// The error that ends the proxy once the TUN is gone.
    pub fn deleted(&self) -> Error {
        Error::TunDeleted(self.tun.name().to_string())
    }

    /// Single reads in a chain (1 with a multishot read).
    pub fn read_limit(&self) -> u16 {
        self.reads.limit
    }

    /// Keeps the reads going: re-arms a multishot read that ended (ENOBUFS), or submits
    /// the next chain of single reads once the last one is done.
    pub fn arm_reads(&mut self, ring: &mut Ring) {
        let fd = self.tun.as_fd();
        let token = Token::new(Op::TunRead, 0, 0).encode();
        match self.reads.next_submission() {
            Submit::Nothing => {}
            Submit::Multishot => ring.read_multishot(fd, READ_GROUP, token),
            Submit::Chain(count) => ring.read_chain(fd, READ_GROUP, count, token),
        }
        if let Some(links) = self.links.as_mut().filter(|links| !links.armed) {
            let buf = Slice {
                region: links.buf.clone(),
                range: 0..LINK_BUF,
            };
            let token = Token::new(Op::LinkEvent, 0, 0).encode();
            ring.read(links.fd.as_fd(), buf, token);
            links.armed = true;
        }
    }

    /// A link notification (or an error: ENOBUFS when notifications were lost) came.
    pub fn on_link_event(&mut self, result: i32) -> Result<(), Error> {
        let Some(links) = self.links.as_mut() else {
            return Ok(());
        };
        links.armed = false;
        let maybe_deleted = match usize::try_from(result) {
            Ok(len) => {
                let len = len.min(LINK_BUF);
                let deleted = links
                    .buf
                    .with_mut(0..len, |bytes| netlink::deleted_link(bytes));
                deleted == Some(links.tun_index)
            }
            Err(_) if result == -libc::ENOBUFS => true,
            Err(_) => {
                // Re-reading would fail the same way every turn; reads and writes still
                // see a deleted TUN in most cases.
                warn!(
                    "link notifications: {}; no longer watching for the TUN's deletion",
                    std::io::Error::from_raw_os_error(-result)
                );
                self.links = None;
                false
            }
        };
        if maybe_deleted && !self.tun.attached() {
            Err(self.deleted())
        } else {
            Ok(())
        }
    }

    /// Submits what is queued and waits for completions or `timeout`, or, while a chain
    /// of single reads is taking packets, lets the kernel run it on through those
    /// queued without sleeping (`Ring::submit_and_run`): otherwise each turn would take
    /// only the first link or two, and the TUN queue would overflow under load.
    pub fn submit_and_wait(
        &mut self,
        ring: &mut Ring,
        timeout: Option<Duration>,
    ) -> std::io::Result<()> {
        match self.reads.run_on() {
            Some(reads) => ring.submit_and_run(u32::from(reads)),
            None => ring.submit_and_wait(timeout),
        }
    }

    /// A read completed: the buffer it filled, to be recycled once handled, and the
    /// packet in it, if usable (its header checked and counted). A read error other
    /// than ENOBUFS (every buffer in use; re-armed next turn) is fatal: EBADFD from a
    /// TUN deleted under us will not get better by retrying.
    pub fn on_read(
        &mut self,
        ring: &mut Ring,
        completion: &Completion,
        stats: &mut Stats,
    ) -> Result<Option<(u16, Option<Frame>)>, Error> {
        let result = completion.result;
        self.reads.on_read(completion.more());
        let Some(bid) = completion.buffer_id() else {
            if result == -libc::ENOBUFS {
                // Every circulating buffer was in use: let more circulate.
                ring.more_buffers(READ_GROUP);
            } else if result == -libc::EBADFD {
                return Err(self.deleted());
            } else if result < 0 {
                return Err(Error::Io(
                    "read from the TUN",
                    std::io::Error::from_raw_os_error(-result),
                ));
            }
            return Ok(None);
        };
        Ok(Some((bid, self.frame(ring, bid, result, stats))))
    }

    fn frame(&self, ring: &Ring, bid: u16, result: i32, stats: &mut Stats) -> Option<Frame> {
        let len = usize::try_from(result).ok().filter(|&len| len > 0)?;
        stats.tun_reads += 1;
        stats.tun_read_bytes += len as u64;
        let Some(buffer) = ring.buffer(READ_GROUP, bid, len) else {
            stats.malformed += 1;
            return None;
        };
        if !self.tun.offload().vnet_header() {
            return Some(Frame {
                bid,
                len,
                ip_start: 0,
                udp_segment: None,
            });
        }
        match vnet::Header::parse(buffer) {
            Ok((header, packet)) => {
                stats.count_read_header(&header, packet.len());
                Some(Frame {
                    bid,
                    len,
                    ip_start: vnet::LEN,
                    udp_segment: (header.gso == vnet::Gso::UdpL4).then_some(header.gso_size),
                })
            }
            Err(_) => {
                stats.bad_vnet_header += 1;
                None
            }
        }
    }

    /// Submits a write for every packet the pool has queued, in order.
    pub fn flush_writes(&self, ring: &mut Ring, tx: &mut TxPool, stats: &mut Stats) {
        let fd = self.tun.as_fd();
        tx.take_writes(|write| match write {
            Write::Packet(index, packet) => {
                let token = Token::new(Op::TunWrite, 0, usize::from(index));
                ring.write(fd, packet, token.encode());
                true
            }
            Write::Gathered {
                slot,
                headers,
                iovecs,
                payload,
            } => {
                let token = Token::new(Op::TunGather, 0, usize::from(slot)).encode();
                let queued = ring.write_gathered(fd, headers, iovecs, payload, token);
                if !queued {
                    // Not a buffer we hold (never expected): the packet is lost, as a
                    // failed write's would be, and the buffer goes back.
                    ring.unhold(payload.group, payload.bid);
                    stats.tun_write_errors += 1;
                }
                queued
            }
        });
    }
}

/// Frees what the TUN write of `token` used (a pool buffer, or a gathered write's
/// header slot) once it has completed; false for a token of no TUN write.
pub fn release_write(tx: &mut TxPool, token: Token) -> bool {
    match token.op {
        Op::TunWrite => tx.release(token.key as u16),
        Op::TunGather => tx.release_gathered(token.key as u16),
        _ => return false,
    }
    true
}

/// What to submit for TUN reads this turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Submit {
    Nothing,
    Multishot,
    Chain(u16),
}

/// How the TUN is read. With a multishot read, one read stays armed. Without (before
/// 6.7), a chain of single reads, each issued once the one before it completed (hard
/// links): one read waits for the next packet at a time, and those queued are taken one
/// after the other, within the same turn as long as the wait lets the kernel run the
/// chain on (`run_on`). Several reads armed side by side would instead all be woken by
/// each packet (and on 6.1, those woken for nothing are handed to io-wq worker threads).
#[derive(Debug)]
struct Reads {
    multishot: bool,
    limit: u16,
    /// Reads (the multishot one, or those of the chain) not completed for good yet.
    in_flight: u16,
    /// A read of the chain completed since the last wait: the kernel has issued the
    /// next one, which takes a packet at once if one is queued.
    progressed: bool,
}

impl Reads {
    fn multishot() -> Reads {
        Reads {
            multishot: true,
            limit: 1,
            in_flight: 0,
            progressed: false,
        }
    }

    fn chained(limit: u16) -> Reads {
        Reads {
            multishot: false,
            limit: limit.max(1),
            in_flight: 0,
            progressed: false,
        }
    }

    fn next_submission(&mut self) -> Submit {
        if self.in_flight > 0 {
            return Submit::Nothing;
        }
        self.in_flight = self.limit;
        if self.multishot {
            Submit::Multishot
        } else {
            Submit::Chain(self.limit)
        }
    }

    /// A read completed; `still_armed` for a multishot read that goes on.
    fn on_read(&mut self, still_armed: bool) {
        if !still_armed {
            self.in_flight = self.in_flight.saturating_sub(1);
            self.progressed = !self.multishot;
        }
    }

    /// How many reads of the chain the next wait should let the kernel run on through
    /// what is queued, without sleeping; `None` to wait as usual (multishot, or a chain
    /// whose waiting read has taken nothing since the last wait: the TUN is empty).
    fn run_on(&mut self) -> Option<u16> {
        let progressed = std::mem::take(&mut self.progressed);
        (progressed && self.in_flight > 0).then_some(self.in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multishot_read_is_rearmed_only_when_it_ends() {
        let mut reads = Reads::multishot();
        assert_eq!(reads.next_submission(), Submit::Multishot);
        reads.on_read(true);
        assert_eq!(reads.next_submission(), Submit::Nothing, "still armed");
        reads.on_read(false); // ENOBUFS ended it
        assert_eq!(reads.next_submission(), Submit::Multishot);
    }

    #[test]
    fn the_next_chain_of_single_reads_goes_out_once_the_last_is_done() {
        let mut reads = Reads::chained(64);
        assert_eq!(reads.next_submission(), Submit::Chain(64));
        for _ in 0..63 {
            reads.on_read(false);
            assert_eq!(
                reads.next_submission(),
                Submit::Nothing,
                "one chain at a time"
            );
        }
        reads.on_read(false);
        assert_eq!(reads.next_submission(), Submit::Chain(64));
    }

    #[test]
    fn a_chain_that_takes_packets_is_run_on_and_an_idle_one_waited_for() {
        let mut reads = Reads::chained(64);
        assert_eq!(reads.next_submission(), Submit::Chain(64));
        assert_eq!(reads.run_on(), None, "nothing taken yet: sleep");
        reads.on_read(false);
        reads.on_read(false);
        assert_eq!(reads.run_on(), Some(62), "the rest of the chain, at once");
        assert_eq!(reads.run_on(), None, "took nothing since: the TUN is empty");
        for _ in 0..62 {
            reads.on_read(false);
        }
        assert_eq!(reads.next_submission(), Submit::Chain(64));
        assert_eq!(reads.run_on(), Some(64), "the new chain runs on, too");
    }

    #[test]
    fn a_multishot_read_is_always_waited_for() {
        let mut reads = Reads::multishot();
        assert_eq!(reads.next_submission(), Submit::Multishot);
        reads.on_read(true);
        assert_eq!(reads.run_on(), None);
        reads.on_read(false);
        assert_eq!(reads.next_submission(), Submit::Multishot);
        assert_eq!(reads.run_on(), None);
    }
}
