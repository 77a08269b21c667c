//! io_uring `user_data` tokens: operation kind, slab generation and slab key in one u64.

/// What a completion is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Read of packets from the TUN (multishot, or one of the single reads).
    TunRead = 1,
    /// Write of one packet to the TUN; the key is the transmit buffer index.
    TunWrite = 2,
    /// Outbound connect of a flow.
    Connect = 3,
    /// Gathered write of one packet to the TUN (headers, then a payload where it was
    /// received); the key is the header slot.
    TunGather = 6,
    /// Send of client bytes to the outbound socket.
    Send = 4,
    /// Receive of server bytes from the outbound socket.
    Recv = 5,
    /// A signal read from the signalfd.
    Signal = 8,
    /// Send of one client datagram; the key is the send slot.
    UdpSend = 9,
    /// Receive of one server datagram for a UDP flow.
    UdpRecv = 10,
    /// A connection to the control socket or the metrics endpoint (multishot); the
    /// key says which.
    ControlAccept = 11,
    /// Receive of a control or metrics client's request.
    ControlRecv = 12,
    /// Send of part of a control or metrics client's reply.
    ControlSend = 13,
    /// The control clients' deadline check, once a second while any is connected.
    ControlTick = 14,
    /// A link notification read from the netlink socket that watches the TUN.
    LinkEvent = 15,
    /// Connect, send and receive of a UDP flow's control connection to its SOCKS5
    /// upstream (the key is the UDP flow's).
    AssociationConnect = 20,
    AssociationSend = 21,
    AssociationRecv = 22,
    /// Connect, send and receive of a DNS query forwarded through the SOCKS5 upstream
    /// (`--dns-server`; the key is the exchange's slot).
    DnsConnect = 23,
    DnsSend = 24,
    DnsRecv = 25,
    /// Receive and send on the proxy's end of a DNS-over-TCP flow's socket pair (the
    /// key is the connection's slot).
    DnsTcpRecv = 26,
    DnsTcpSend = 27,
}

impl Op {
    fn from_u8(value: u8) -> Option<Op> {
        Some(match value {
            1 => Op::TunRead,
            2 => Op::TunWrite,
            3 => Op::Connect,
            4 => Op::Send,
            5 => Op::Recv,
            6 => Op::TunGather,
            8 => Op::Signal,
            9 => Op::UdpSend,
            10 => Op::UdpRecv,
            11 => Op::ControlAccept,
            12 => Op::ControlRecv,
            13 => Op::ControlSend,
            14 => Op::ControlTick,
            15 => Op::LinkEvent,
            20 => Op::AssociationConnect,
            21 => Op::AssociationSend,
            22 => Op::AssociationRecv,
            23 => Op::DnsConnect,
            24 => Op::DnsSend,
            25 => Op::DnsRecv,
            26 => Op::DnsTcpRecv,
            27 => Op::DnsTcpSend,
            _ => return None,
        })
    }
}

/// Generations wrap at 24 bits: a stale completion must outlive 16 million reuses of
/// the same slab slot to be mistaken for a live one.
pub const GENERATION_MASK: u32 = 0x00ff_ffff;

/// A decoded `user_data`: `op << 56 | generation << 32 | key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub op: Op,
    pub generation: u32,
    pub key: u32,
}

impl Token {
    pub fn new(op: Op, generation: u32, key: usize) -> Token {
        Token {
            op,
            generation: generation & GENERATION_MASK,
            key: key as u32,
        }
    }

    pub fn encode(self) -> u64 {
        (self.op as u64) << 56
            | u64::from(self.generation & GENERATION_MASK) << 32
            | u64::from(self.key)
    }

    /// `None` for user_data we never produced.
    pub fn decode(user_data: u64) -> Option<Token> {
        Some(Token {
            op: Op::from_u8((user_data >> 56) as u8)?,
            generation: (user_data >> 32) as u32 & GENERATION_MASK,
            key: user_data as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_op() {
        for op in [
            Op::TunRead,
            Op::TunWrite,
            Op::Connect,
            Op::Send,
            Op::Recv,
            Op::TunGather,
            Op::Signal,
            Op::UdpSend,
            Op::UdpRecv,
            Op::ControlAccept,
            Op::ControlRecv,
            Op::ControlSend,
            Op::ControlTick,
            Op::AssociationConnect,
            Op::AssociationSend,
            Op::AssociationRecv,
            Op::DnsConnect,
            Op::DnsSend,
            Op::DnsRecv,
            Op::DnsTcpRecv,
            Op::DnsTcpSend,
        ] {
            let token = Token::new(op, 0x00ab_cdef, 0xfeed_beef);
            assert_eq!(Token::decode(token.encode()), Some(token));
        }
    }

    #[test]
    fn generation_wraps_at_24_bits() {
        let token = Token::new(Op::Send, 0x0100_0005, 7);
        assert_eq!(Token::decode(token.encode()).unwrap().generation, 5);
    }

    #[test]
    fn unknown_op_is_rejected() {
        assert_eq!(Token::decode(0), None);
        assert_eq!(Token::decode(0xff << 56), None);
    }
}
