//! The loop's side of the datagram flows' receives: what a completion brought, to the flow.

// Each receive is a multishot recvmsg into the shared provided buffers: one datagram, or
// with UDP_GRO several coalesced back to back with their segment size in a control
// message. They are split (through an upstream, each relay's header comes off) and
// handed to the flow as one batch, which writes them to the TUN as one super-packet
// when it can.

use nix::errno::Errno;

use super::RECV_GROUP;
use crate::event_loop::Proxy;
use crate::flow::Id;
use crate::flow::datagram::{self, Arrival, Received, RecvError};
use crate::flow::upstream;
use crate::sys;
use crate::uring::{Completion, InBuffer, Message, RECVMSG_OVERHEAD};
use crate::wire::icmp::Reason;

impl Proxy {
    /// A completion of flow `id`'s multishot receive.
    pub(in crate::event_loop) fn on_udp_received(&mut self, id: Id, completion: &Completion) {
        let now = self.now();
        let bid = completion.buffer_id();
        if completion.result == -nix::libc::ENOBUFS {
            // Every circulating receive buffer was in use: let more circulate.
            self.ring.more_buffers(RECV_GROUP);
        }
        let ring = &self.ring;
        let result = received(completion.result, bid, |bid, len| {
            ring.message(RECV_GROUP, bid, len)
        });
        let udp = &mut self.udp;
        let more = completion.more();
        let relay = udp
            .flows
            .get(id)
            .filter(|flow| flow.io.association.is_some())
            .map(|flow| (flow.key().server_addr(), flow.io.name.is_some()));
        let mut ranges = std::mem::take(&mut udp.batch);
        let bytes = match relay {
            Some((server, by_name)) => upstream::from_relay(
                result,
                server,
                by_name,
                &mut ranges,
                &mut self.stats.upstream,
            ),
            None => result.map(|(bytes, segment_size)| {
                datagram::split(bytes, segment_size, &mut ranges);
                bytes
            }),
        };
        // A direct flow's datagrams are the buffer's payload as received.
        let received_in = bid.filter(|_| relay.is_none()).zip(bytes.as_ref().ok());
        let received_in = received_in.map(|(bid, bytes)| InBuffer {
            group: RECV_GROUP,
            bid,
            start: RECVMSG_OVERHEAD as u32,
            len: bytes.len() as u32,
        });
        let received = match bytes {
            // Nothing for the client: every datagram from the relay was dropped.
            Ok(_) if ranges.is_empty() => udp.flows.on_dropped(id, more),
            Ok(bytes) => {
                let batch = Arrival {
                    bytes,
                    datagrams: &ranges,
                    received_in,
                };
                let tx = &mut self.stack.tx;
                udp.flows.on_received(id, now, Ok(batch), more, tx)
            }
            Err(error) => {
                let tx = &mut self.stack.tx;
                udp.flows.on_received(id, now, Err(error), more, tx)
            }
        };
        udp.batch = ranges;
        if let Some(bid) = bid {
            // A TUN write queued to take the payload from this buffer: it goes back
            // when that write completes (the recycle below leaves it alone until then).
            if let Some(payload) = self.stack.tx.take_gathered() {
                self.ring.hold(payload.group, payload.bid);
            }
            self.ring.recycle(RECV_GROUP, bid);
        }
        match received {
            Received::Rearm => udp.arm_recv(&mut self.ring, id),
            Received::Close => udp.finish_close(&mut self.ring, id),
            Received::Nothing => {}
        }
    }
}

/// What a receive completion with `result` and provided buffer `bid` brought: its bytes
/// and, when it coalesced several datagrams, their size (or the error); `message`
/// finds the message in a buffer we hold.
fn received<'b>(
    result: i32,
    bid: Option<u16>,
    message: impl FnOnce(u16, usize) -> Option<Message<'b>>,
) -> Result<(&'b [u8], Option<u16>), RecvError> {
    match (result, bid) {
        (n, _) if n < 0 => Err(recv_error(Errno::from_raw(-n))),
        (n, Some(bid)) => match message(bid, n as usize) {
            // Longer than any datagram or coalesced receive can be: not relayed cut.
            Some(message) if message.truncated => Err(RecvError::Other),
            Some(message) => Ok((message.payload, sys::cmsg::udp_gro_segment(message.control))),
            None => Err(RecvError::Other),
        },
        // Bytes in no buffer we hold: nothing we can relay.
        (_, None) => Err(RecvError::Other),
    }
}

/// What the kernel's error on a flow's socket is to the flow.
fn recv_error(errno: Errno) -> RecvError {
    match errno {
        Errno::ENOBUFS => RecvError::NoBuffers,
        Errno::ECONNREFUSED => RecvError::Unreachable(Reason::Port),
        Errno::EHOSTUNREACH => RecvError::Unreachable(Reason::Host),
        Errno::ENETUNREACH => RecvError::Unreachable(Reason::Network),
        _ => RecvError::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_brings_its_datagrams_and_errors_their_cause() {
        let (bytes, control): (&[u8], &[u8]) = (&[7; 16], &[]);
        let held = |truncated| {
            move |bid: u16, len: usize| {
                (bid == 3).then_some(Message {
                    payload: &bytes[..len.min(16)],
                    control,
                    truncated,
                })
            }
        };
        assert_eq!(received(0, Some(3), held(false)), Ok((&bytes[..0], None)));
        assert_eq!(received(5, Some(3), held(false)), Ok((&bytes[..5], None)));
        assert_eq!(received(5, Some(3), held(true)), Err(RecvError::Other));
        let not_ours = received(5, Some(4), held(false));
        assert_eq!(not_ours, Err(RecvError::Other));
        let no_buffer = received(5, None, held(false));
        assert_eq!(no_buffer, Err(RecvError::Other));
        let error = |errno: Errno| received(-(errno as i32), None, held(false));
        assert_eq!(
            error(Errno::ECONNREFUSED),
            Err(RecvError::Unreachable(Reason::Port))
        );
        assert_eq!(error(Errno::ENOBUFS), Err(RecvError::NoBuffers));
        assert_eq!(
            error(Errno::EHOSTUNREACH),
            Err(RecvError::Unreachable(Reason::Host))
        );
        assert_eq!(
            error(Errno::ENETUNREACH),
            Err(RecvError::Unreachable(Reason::Network))
        );
        assert_eq!(error(Errno::EMSGSIZE), Err(RecvError::Other));
    }
}
