//! The TUN side of the loop: the read buffers and reads kept armed (one multishot read,
//! or a batch of single reads on kernels without it), each packet's virtio-net header
//! checked, and the writes the transmit pool has filled submitted.

use std::os::fd::AsFd;

use crate::error::Error;
use crate::stack::TxPool;
use crate::stack::device::MAX_SEGMENTATION_PACKET;
use crate::stats::Stats;
use crate::tun::Tun;
use crate::uring::{Completion, Features, Op, Ring, Token};
use crate::wire::vnet;

/// Buffer group of the TUN read buffers.
pub const READ_GROUP: u16 = 0;
/// TUN read buffers (kernel-provided ring); each holds one packet, up to 64 KiB with
/// segmentation offload.
const READ_BUFFERS: u16 = 512;
const READ_BUFFERS_TSO: u16 = 256;
/// TUN write buffers; when all are in flight smoltcp holds data back.
const WRITE_BUFFERS: u16 = 1024;
const WRITE_BUFFERS_TSO: u16 = 256;
/// Most single-shot TUN reads kept in flight where the kernel has no multishot read
/// (before 6.7): each delivers one packet, so this bounds the packets taken per turn.
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
    multishot: bool,
    depth: ReadDepth,
}

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
        let limit = if features.read_multishot {
            1
        } else {
            SINGLE_READS.min(read_buffers)
        };
        let io = TunIo {
            tun,
            multishot: features.read_multishot,
            depth: ReadDepth::new(limit),
        };
        Ok((io, tx))
    }

    /// Single reads kept in flight at most (1 with a multishot read).
    pub fn read_limit(&self) -> u16 {
        self.depth.limit
    }

    /// Keeps the reads armed: re-arms a multishot read that ended (ENOBUFS) and
    /// replaces each completed single read.
    pub fn arm_reads(&mut self, ring: &mut Ring) {
        let token = Token::new(Op::TunRead, 0, 0).encode();
        for _ in 0..self.depth.arm_now() {
            if self.multishot {
                ring.read_multishot(self.tun.as_fd(), READ_GROUP, token);
            } else {
                ring.read_selected(self.tun.as_fd(), READ_GROUP, token);
            }
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
        self.depth.completed(completion.more(), result > 0);
        let Some(bid) = completion.buffer_id() else {
            if result == -nix::libc::ENOBUFS {
                // Every circulating buffer was in use: let more circulate.
                ring.more_buffers(READ_GROUP);
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

    /// Submits a write for every packet the pool has filled.
    pub fn flush_writes(&self, ring: &mut Ring, tx: &mut TxPool) {
        let fd = self.tun.as_fd();
        tx.take_ready(|index, packet| {
            ring.write(
                fd,
                packet,
                Token::new(Op::TunWrite, 0, usize::from(index)).encode(),
            );
        });
    }
}

/// How many TUN reads to keep armed. A multishot read is one; single reads are kept
/// at twice what the last turn took, up to `limit`: every armed read is woken for each
/// packet (and all but one go back to waiting), so a deep batch only pays off when the
/// TUN is busy.
struct ReadDepth {
    limit: u16,
    armed: u16,
    taken: u16,
}

impl ReadDepth {
    fn new(limit: u16) -> ReadDepth {
        ReadDepth {
            limit,
            armed: 0,
            taken: 0,
        }
    }

    /// A TUN read completed; `armed` says whether it stays armed (multishot).
    fn completed(&mut self, armed: bool, packet: bool) {
        if !armed {
            self.armed = self.armed.saturating_sub(1);
        }
        self.taken = self.taken.saturating_add(u16::from(packet));
    }

    /// Reads to arm now; counts them as armed and starts the next turn's tally.
    fn arm_now(&mut self) -> u16 {
        let target = self.taken.saturating_mul(2).clamp(1, self.limit);
        self.taken = 0;
        let more = target.saturating_sub(self.armed);
        self.armed += more;
        more
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_depth_follows_the_packets_each_turn_took() {
        let mut multishot = ReadDepth::new(1);
        assert_eq!(multishot.arm_now(), 1);
        multishot.completed(true, true);
        assert_eq!(multishot.arm_now(), 0, "still armed");
        multishot.completed(false, false); // ENOBUFS ended it
        assert_eq!(multishot.arm_now(), 1);

        // A busy TUN: every armed read finds a packet each turn.
        let mut single = ReadDepth::new(64);
        let mut depths = Vec::new();
        for _ in 0..8 {
            single.arm_now();
            depths.push(single.armed);
            for _ in 0..single.armed {
                single.completed(false, true);
            }
        }
        assert_eq!(depths, [1, 2, 4, 8, 16, 32, 64, 64]);
        // Quiet again: one packet a turn leaves the armed reads waiting, none added.
        single.arm_now();
        single.completed(false, true);
        assert_eq!(single.arm_now(), 0, "63 armed already cover a quiet turn");
        assert_eq!(single.armed, 63);
    }
}
