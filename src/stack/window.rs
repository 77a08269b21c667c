//! The receive window a flow advertises to its client, held to the flow's memory
//! allowance. smoltcp advertises all the free space of its receive buffer; the TUN
//! device rewrites the window of each segment it writes for the flow to at most the
//! allowance, and the flow sends a window update of its own when the allowance opens
//! again, since smoltcp, believing it advertised more all along, would not. Every edge
//! offered stays a window-scale unit short of smoltcp's own, so the client never sends
//! what smoltcp would refuse; for that it may move back by less than one unit (RFC 9293
//! 3.8.6 asks for none), and bytes up to the furthest edge are still let through.

use smoltcp::wire::{IpEndpoint, TcpOption};

use crate::wire::tcp::{self, after};

/// What the flow's own side of the connection last told the client, as read from the
/// segments written for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowState {
    /// The window shift announced in our SYN|ACK (0 without window scaling); `None`
    /// before it was sent.
    pub shift: Option<u8>,
    /// The last acknowledgement number sent.
    pub ack: u32,
    /// The right edge of the window last advertised (ack + window).
    pub edge: Option<u32>,
    /// The furthest right edge ever advertised: the client may send up to it, even if a
    /// later window (rounded to its scale) ended a little short of it.
    pub furthest: Option<u32>,
    /// The right edge smoltcp itself advertised last (before the limit): it takes bytes
    /// only up to there.
    smoltcp_edge: Option<u32>,
    /// The sequence number after the last byte (or SYN/FIN) sent.
    pub seq_end: u32,
    /// The last pure ACK (no data, no SYN/FIN): its ack number and window field, as
    /// smoltcp wrote it and as sent.
    last_pure: Option<(u32, u16, u16)>,
}

impl WindowState {
    fn advertise(&mut self, edge: u32) {
        self.edge = Some(edge);
        if self.furthest.is_none_or(|furthest| after(edge, furthest)) {
            self.furthest = Some(edge);
        }
    }

    /// Whether the client's segment in `packet` (an IP packet) may reach smoltcp: not if
    /// it carries bytes beyond the furthest edge advertised to it (a sender never sends
    /// them but as a zero-window probe, RFC 9293 3.10.7.4, and a receiver may drop
    /// them). Any before a window was advertised may.
    pub fn admit(&self, packet: &[u8]) -> Admission {
        let Some(furthest) = self.furthest else {
            return Admission::Pass;
        };
        let Some(tcp) = tcp::packet(packet) else {
            return Admission::Pass;
        };
        let seq = tcp.seq_number().0 as u32;
        let payload = tcp
            .as_ref()
            .len()
            .saturating_sub(usize::from(tcp.header_len())) as u32;
        if payload == 0 || !after(seq.wrapping_add(payload), furthest) {
            Admission::Pass
        } else if tcp.rst() {
            Admission::Drop
        } else {
            Admission::DropAndAck
        }
    }
}

/// What becomes of a client's segment (`WindowState::admit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Pass,
    /// An unacceptable reset: dropped silently (RFC 9293 3.10.7.4).
    Drop,
    /// Unacceptable, it is dropped, but its sender must hear the current window
    /// (RFC 9293 3.10.7.4): a zero-window probe otherwise learns nothing.
    DropAndAck,
}

/// What to do with a segment after its window was looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Send,
    /// A window update of smoltcp's that the limit turned into a duplicate ACK: sending
    /// it would count towards the client's fast retransmit.
    Drop,
}

/// Looks at a segment the flow is about to write to its client, learns from it, and
/// with a `limit` (the sequence number of the client's up to which it may send: the
/// first byte not yet passed on plus the allowance) lowers its window to end there.
/// `checksummed`: the segment carries its full checksum (no offload), which is then
/// patched; otherwise the kernel completes it later. Anything but a TCP
/// segment is left alone.
pub fn shape(
    packet: &mut [u8],
    state: &mut WindowState,
    limit: Option<u32>,
    checksummed: bool,
) -> Verdict {
    let Some(mut tcp) = tcp::packet_mut(packet) else {
        return Verdict::Send;
    };
    let seq = tcp.seq_number().0 as u32;
    let bytes = tcp.as_ref();
    let header = usize::from(tcp.header_len()).min(bytes.len());
    let payload = (bytes.len() - header) as u32;
    let (syn, fin) = (tcp.syn(), tcp.fin());
    let seq_end = seq
        .wrapping_add(payload)
        .wrapping_add(u32::from(syn) + u32::from(fin));
    if state.seq_end == 0 || after(seq_end, state.seq_end) {
        state.seq_end = seq_end;
    }
    if tcp.rst() || !tcp.ack() {
        return Verdict::Send;
    }
    let ack = tcp.ack_number().0 as u32;
    let raw = tcp.window_len();
    if syn {
        // The window of a SYN is never scaled; it announces the shift for later ones.
        let options = &tcp.as_ref()[20.min(header)..header];
        let scale = tcp::options(options).find_map(|(_, option)| match option {
            TcpOption::WindowScale(scale) => Some(scale.min(14)),
            _ => None,
        });
        state.shift = Some(scale.unwrap_or(0));
        let window = match limit.map(|edge| room(edge, ack)) {
            Some(room) if room < u32::from(raw) => {
                tcp::set_window(&mut tcp, room as u16, checksummed);
                room as u16
            }
            _ => raw,
        };
        state.ack = ack;
        state.smoltcp_edge = Some(ack.wrapping_add(u32::from(raw)));
        state.advertise(ack.wrapping_add(u32::from(window)));
        return Verdict::Send;
    }
    let shift = state.shift.unwrap_or(0);
    // smoltcp rounds its free space down to its window scale: the edge it advertises
    // lies up to a unit short of where its buffer ends, moving back and forth within
    // that unit as its acknowledgement number moves, and it takes bytes only up to the
    // edge it advertised last. A client that sent up to a further edge as the buffer
    // filled would keep a sequence number past smoltcp's behind a zero window, and
    // smoltcp drops every later segment of such a client as out of window, with the
    // acknowledgement it carries. Offering one unit less keeps every edge the client
    // learns short of any smoltcp advertises later (where its buffer ends never moves
    // back), so smoltcp always takes what the client sends.
    let ceiling = if shift > 0 {
        raw.saturating_sub(1)
    } else {
        raw
    };
    let mut sent = ceiling;
    if let Some(limit) = limit {
        let wanted = (u32::from(raw) << shift).min(room(limit, ack));
        let mut edge = ack.wrapping_add(wanted);
        if let Some(before) = state.edge
            && after(before, edge)
        {
            edge = before;
        }
        let window = edge.wrapping_sub(ack);
        // Rounded up, not to move the edge kept back; the ceiling still bounds it.
        let scaled = window.div_ceil(1 << shift).min(u32::from(u16::MAX)) as u16;
        sent = sent.min(scaled);
    }
    if sent != raw {
        tcp::set_window(&mut tcp, sent, checksummed);
    }
    // Recorded even for a segment dropped below: smoltcp believes it sent it, takes
    // bytes up to there, and announces no more until its window doubles; a stale edge
    // would hold our own window updates below one that smoltcp never repeats.
    state.smoltcp_edge = Some(ack.wrapping_add(u32::from(raw) << shift));
    if payload == 0 && !fin {
        // smoltcp changed its window (a window update) but after the limit the client
        // would see the very ACK it saw last: a duplicate, which it would count.
        if let Some((last_ack, last_raw, last_sent)) = state.last_pure
            && last_ack == ack
            && last_raw != raw
            && last_sent == sent
        {
            return Verdict::Drop;
        }
        state.last_pure = Some((ack, raw, sent));
    } else {
        state.last_pure = None;
    }
    state.ack = ack;
    state.advertise(ack.wrapping_add(u32::from(sent) << shift));
    Verdict::Send
}

/// Bytes from `ack` up to the edge `limit` (none if the edge is not after it).
fn room(limit: u32, ack: u32) -> u32 {
    if after(limit, ack) {
        limit.wrapping_sub(ack)
    } else {
        0
    }
}

/// The window field a pure ACK acknowledging `ack` offers with `limit`: up to the limit
/// or smoltcp's own edge, whichever is nearer, rounded down to the scale and one unit
/// short, as `shape` keeps smoltcp's windows; or to the edge offered before if that is
/// further, rounded down too (rounding up could pass smoltcp's edge, while the few bytes
/// below the old edge it gives up smoltcp still takes). `None` before the connection
/// was set up.
fn offer(state: &WindowState, ack: u32, limit: u32) -> Option<u16> {
    let shift = state.shift?;
    let target = match state.smoltcp_edge {
        Some(edge) if after(limit, edge) => edge,
        _ => limit,
    };
    let mut scaled = (room(target, ack) >> shift).saturating_sub(u32::from(shift > 0));
    if let Some(edge) = state.edge
        && after(edge, ack.wrapping_add(scaled << shift))
    {
        scaled = room(edge, ack) >> shift;
    }
    Some(scaled.min(u32::from(u16::MAX)) as u16)
}

/// Whether the client should be told that its window now ends at `limit`: the window a
/// pure ACK would offer goes past the edge it knows by at least `min_step` bytes, and
/// that edge is short of it by half the window or more. Judged on what would be sent,
/// so that an update it would not change is not sent over and over.
pub fn update_due(state: &WindowState, limit: u32, min_step: u32) -> bool {
    let (Some(shift), Some(edge)) = (state.shift, state.edge) else {
        return false;
    };
    let Some(window) = offer(state, state.ack, limit) else {
        return false;
    };
    let (known, offered) = (room(edge, state.ack), u32::from(window) << shift);
    offered > known && offered - known >= min_step && known < offered / 2
}

/// Writes into `buf` a pure ACK from `from` to `to` with the state's sequence number,
/// acknowledgement number `ack` and the window `offer` gives for `limit`; returns its
/// length and records it in `state`. Its checksum is complete. `None` when `buf` is too
/// small or the state has not seen the connection set up yet.
pub fn pure_ack(
    buf: &mut [u8],
    ends: (IpEndpoint, IpEndpoint),
    state: &mut WindowState,
    ack: u32,
    limit: u32,
) -> Option<usize> {
    let shift = state.shift?;
    let window = offer(state, ack, limit)?;
    let len = tcp::pure_ack(buf, ends, state.seq_end, ack, window)?;
    // smoltcp's next window update for this ACK would now show the client nothing new.
    state.ack = ack;
    state.advertise(ack.wrapping_add(u32::from(window) << shift));
    state.last_pure = Some((ack, u16::MAX, window));
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::demux::tests::v4;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        IpAddress, IpProtocol, IpRepr, Ipv4Packet, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    };

    const PROXY: IpEndpoint = IpEndpoint {
        addr: IpAddress::Ipv4(smoltcp::wire::Ipv4Address::new(10, 0, 0, 2)),
        port: 80,
    };

    fn segment(
        control: TcpControl,
        seq: u32,
        ack: u32,
        window: u16,
        scale: Option<u8>,
        payload: &[u8],
    ) -> Vec<u8> {
        let client = v4([10, 0, 0, 1], 5000);
        let tcp = TcpRepr {
            src_port: PROXY.port,
            dst_port: client.port,
            control,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: Some(TcpSeqNumber(ack as i32)),
            window_len: window,
            window_scale: scale,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload,
        };
        let caps = ChecksumCapabilities::default();
        let ip = IpRepr::new(
            PROXY.addr,
            client.addr,
            IpProtocol::Tcp,
            tcp.buffer_len(),
            64,
        );
        let mut buf = vec![0u8; ip.buffer_len()];
        ip.emit(&mut buf[..], &caps);
        tcp.emit(
            &mut TcpPacket::new_unchecked(&mut buf[ip.header_len()..]),
            &PROXY.addr,
            &client.addr,
            &caps,
        );
        buf
    }

    fn window_of(packet: &[u8]) -> (u16, bool) {
        let ip = Ipv4Packet::new_checked(packet).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        let valid = tcp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into());
        (tcp.window_len(), valid)
    }

    #[test]
    fn the_window_is_held_to_the_limit_and_checksums_stay_valid() {
        let mut state = WindowState::default();
        let mut synack = segment(TcpControl::Syn, 100, 500, 65535, Some(5), &[]);
        assert_eq!(
            shape(&mut synack, &mut state, Some(1500), true),
            Verdict::Send
        );
        assert_eq!(state.shift, Some(5));
        assert_eq!(window_of(&synack), (1000, true), "unscaled in a SYN");
        // smoltcp offers 32768 << 5 = 1 MiB; the limit is 16 KiB.
        let mut ack = segment(TcpControl::None, 101, 500, 32768, None, &[]);
        assert_eq!(
            shape(&mut ack, &mut state, Some(500 + 16384), true),
            Verdict::Send
        );
        assert_eq!(
            window_of(&ack),
            (512, true),
            "16 KiB >> 5, checksum patched"
        );
        assert_eq!(state.edge, Some(500 + 16384));
        // A tighter limit later never pulls the right edge back.
        let mut later = segment(TcpControl::None, 101, 1500, 32768, None, b"x");
        shape(&mut later, &mut state, Some(2500), true);
        let kept = u32::from(window_of(&later).0) << 5;
        let edge_left = 500 + 16384 - 1500;
        assert!(
            (edge_left..edge_left + 32).contains(&kept),
            "{kept}: rounded up only"
        );
    }

    #[test]
    fn bytes_beyond_the_furthest_edge_are_dropped_and_acknowledged() {
        let mut state = WindowState::default();
        let probe = segment(TcpControl::None, 5000, 1, 100, None, b"x");
        assert_eq!(
            Admission::Pass,
            state.admit(&probe),
            "no window advertised yet"
        );
        let mut synack = segment(TcpControl::Syn, 100, 5000, 1000, Some(0), &[]);
        shape(&mut synack, &mut state, None, true);
        assert_eq!(state.furthest, Some(6000));
        // A later, smaller window does not take back what the client was offered.
        let mut ack = segment(TcpControl::None, 101, 5500, 100, None, &[]);
        shape(&mut ack, &mut state, None, true);
        assert_eq!((state.edge, state.furthest), (Some(5600), Some(6000)));
        let up_to_edge = segment(TcpControl::None, 5500, 101, 100, None, &[7; 500]);
        assert_eq!(Admission::Pass, state.admit(&up_to_edge));
        let past_edge = segment(TcpControl::None, 5500, 101, 100, None, &[7; 501]);
        assert_eq!(state.admit(&past_edge), Admission::DropAndAck);
        let rst = segment(TcpControl::Rst, 5500, 101, 100, None, &[7; 501]);
        assert_eq!(state.admit(&rst), Admission::Drop, "never answered");
        // A FIN or a bare ACK at the edge carries no bytes.
        let fin = segment(TcpControl::Fin, 6000, 101, 100, None, &[]);
        assert_eq!(Admission::Pass, state.admit(&fin));
        assert_eq!(Admission::Pass, state.admit(&[0x45, 0, 0]), "garbage");
    }

    #[test]
    fn a_window_update_the_limit_hides_is_dropped_but_real_duplicates_go_out() {
        let mut state = WindowState {
            shift: Some(0),
            ..WindowState::default()
        };
        let mut first = segment(TcpControl::None, 1, 100, 30000, None, &[]);
        assert_eq!(
            shape(&mut first, &mut state, Some(4100), true),
            Verdict::Send
        );
        // smoltcp's window grew (an update) but the limit keeps it where it was.
        let mut update = segment(TcpControl::None, 1, 100, 60000, None, &[]);
        assert_eq!(
            shape(&mut update, &mut state, Some(4100), true),
            Verdict::Drop
        );
        // The same ACK again with smoltcp's window unchanged is a genuine duplicate ACK
        // (it answers an out-of-order segment): the client must see it.
        let mut dupack = segment(TcpControl::None, 1, 100, 30000, None, &[]);
        assert_eq!(
            shape(&mut dupack, &mut state, Some(4100), true),
            Verdict::Send
        );
        // Data segments always go.
        let mut data = segment(TcpControl::None, 1, 100, 60000, None, b"abc");
        assert_eq!(
            shape(&mut data, &mut state, Some(4100), true),
            Verdict::Send
        );
        assert_eq!(state.seq_end, 4);
    }

    #[test]
    fn a_window_update_is_due_when_the_client_knows_little_of_the_limit() {
        let mut state = WindowState {
            shift: Some(2),
            ..WindowState::default()
        };
        // smoltcp offers far more than the limit (60,000 units of 4 bytes).
        let mut ack = segment(TcpControl::None, 7, 1000, 60_000, None, &[]);
        shape(&mut ack, &mut state, Some(1400), true);
        assert_eq!(state.edge, Some(1400));
        assert!(!update_due(&state, 1400, 100));
        assert!(update_due(&state, 1000 + 65536, 3000));
        let mut buf = [0u8; 64];
        let ack = state.ack;
        let len = pure_ack(
            &mut buf,
            (PROXY, v4([10, 0, 0, 1], 5000)),
            &mut state,
            ack,
            1000 + 65536,
        )
        .expect("an ACK");
        let (window, valid) = window_of(&buf[..len]);
        assert!(valid);
        assert_eq!(
            u32::from(window),
            (65536 >> 2) - 1,
            "one unit short of the limit"
        );
        assert!(!update_due(&state, 1000 + 65536, 3000), "told now");
        let ip = Ipv4Packet::new_checked(&buf[..len]).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!((tcp.seq_number().0, tcp.ack_number().0), (7, 1000));
    }

    #[test]
    fn an_update_that_would_offer_nothing_new_is_not_due() {
        // Window scale 11 (2 KiB units, 64 MiB buffers): with 3000 bytes allowed past a
        // closed window, one unit short rounds the offer down to nothing, the ACK the
        // client already has; it was due, and sent, on every poll.
        let mut state = WindowState {
            shift: Some(11),
            ..WindowState::default()
        };
        let mut zero = segment(TcpControl::None, 7, 1000, 30_000, None, &[]);
        shape(&mut zero, &mut state, Some(1000), true);
        assert_eq!(state.edge, Some(1000));
        assert!(!update_due(&state, 1000 + 3000, 2920));
        assert!(update_due(&state, 1000 + 3 * 2048, 2920));
    }

    #[test]
    fn a_window_update_dropped_as_a_duplicate_still_moves_smoltcps_edge() {
        // smoltcp's buffer was full (window 0); it opens to 100 units, but the limit
        // still holds the client at 0: that update is dropped as a duplicate ACK.
        let mut state = WindowState {
            shift: Some(5),
            ..WindowState::default()
        };
        let mut closed = segment(TcpControl::None, 7, 1000, 0, None, &[]);
        assert_eq!(
            shape(&mut closed, &mut state, Some(1000), true),
            Verdict::Send
        );
        let mut opened = segment(TcpControl::None, 7, 1000, 100, None, &[]);
        assert_eq!(
            shape(&mut opened, &mut state, Some(1000), true),
            Verdict::Drop
        );
        // smoltcp will not announce again before its window doubles: once the
        // allowance opens, our own update must, up to smoltcp's 100 units.
        assert!(update_due(&state, 1000 + 4096, 1024));
    }

    #[test]
    fn a_window_update_never_offers_past_smoltcps_own_edge() {
        // smoltcp offered 10 units of 32 bytes from 1000; the limit lies far beyond.
        let mut state = WindowState {
            shift: Some(5),
            ..WindowState::default()
        };
        let mut ack = segment(TcpControl::None, 7, 1000, 10, None, &[]);
        shape(&mut ack, &mut state, Some(1000 + 64), true);
        let mut buf = [0u8; 64];
        let len = pure_ack(
            &mut buf,
            (PROXY, v4([10, 0, 0, 1], 5000)),
            &mut state,
            1000,
            1000 + (1 << 20),
        )
        .expect("an ACK");
        let (window, _) = window_of(&buf[..len]);
        assert_eq!(window, 9, "one unit short of smoltcp's 10");
    }

    #[test]
    fn no_edge_offered_lies_in_the_unit_smoltcp_rounds_away() {
        // smoltcp's buffer ends at `end`; as its acknowledgement number moves it offers
        // that end rounded down to its scale, 32 bytes, so its later windows may end up
        // to 31 bytes short of it. Nothing offered may reach into those bytes, with or
        // without a limit (a limit can be where the buffer ends).
        let end = 1_040_000u32;
        for limit in [None, Some(end)] {
            let mut state = WindowState {
                shift: Some(5),
                ..WindowState::default()
            };
            for ack in (1_000_000..end).step_by(1_337) {
                let raw = ((end - ack) >> 5) as u16;
                let mut ack_segment = segment(TcpControl::None, 7, ack, raw, None, &[]);
                shape(&mut ack_segment, &mut state, limit, true);
                let (window, valid) = window_of(&ack_segment);
                assert!(valid);
                let edge = ack + (u32::from(window) << 5);
                assert!(edge <= end - 32, "{edge} offered at {ack} ({limit:?})");
            }
            assert!(state.furthest.is_some_and(|furthest| furthest <= end - 32));
        }
        // Without window scaling nothing is rounded: the window goes out as it is.
        let mut state = WindowState {
            shift: Some(0),
            ..WindowState::default()
        };
        let mut unscaled = segment(TcpControl::None, 7, 1000, 4000, None, &[]);
        shape(&mut unscaled, &mut state, None, true);
        assert_eq!(window_of(&unscaled), (4000, true));
    }

    #[test]
    fn garbage_and_other_protocols_are_left_alone() {
        let mut state = WindowState::default();
        for len in 0..60 {
            let mut garbage = vec![0x45u8; len];
            assert_eq!(
                shape(&mut garbage, &mut state, Some(1), true),
                Verdict::Send
            );
        }
        let mut udp = segment(TcpControl::None, 1, 1, 100, None, &[]);
        udp[9] = 17;
        let before = udp.clone();
        shape(&mut udp, &mut state, Some(1), true);
        assert_eq!(udp, before);
    }
}
