//! The ring against the kernel: memory held until completion, buffers handed over once.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use nix::libc;

use super::*;

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe().expect("pipe")
}

fn completions(ring: &mut Ring, want: usize) -> Vec<Completion> {
    let mut all = Vec::new();
    let mut batch = Vec::new();
    for _ in 0..100 {
        if all.len() >= want {
            break;
        }
        ring.submit_and_wait(Some(Duration::from_millis(10)))
            .expect("io_uring_enter");
        ring.drain(&mut batch, 64);
        all.extend_from_slice(&batch);
    }
    all
}

#[test]
fn a_region_outlives_its_owner_until_the_read_into_it_completes() {
    let mut ring = Ring::new().expect("io_uring");
    let (reader, writer) = pipe();
    let region = Region::new(4096).unwrap();
    let buf = Slice {
        region: region.clone(),
        range: 100..200,
    };
    ring.read(reader.as_fd(), buf, 7);
    let _ = ring.submit_and_wait(Some(Duration::ZERO));
    assert_eq!(region.holders(), 2, "the pending read holds the region");
    let watch = region.clone();
    drop(region);
    nix::unistd::write(&writer, b"hello").expect("write the pipe");
    let done = completions(&mut ring, 1);
    assert_eq!((done[0].token, done[0].result), (7, 5));
    assert_eq!(watch.kernel_read(100..105), b"hello");
    assert_eq!(watch.holders(), 1, "let go once complete");
}

#[test]
fn a_multishot_receive_hands_over_each_buffer_once() {
    let mut ring = Ring::new().expect("io_uring");
    let size = RECVMSG_OVERHEAD + 256;
    ring.provide_buffers(3, 4, size).unwrap();
    assert!(
        ring.provide_buffers(3, 4, size).is_err(),
        "a group is registered once"
    );
    let (ours, peer) = UnixDatagram::pair().expect("socketpair");
    ring.recvmsg_multishot(ours.as_fd(), 3, 9);
    let _ = ring.submit_and_wait(Some(Duration::ZERO));
    peer.send(b"one").unwrap();
    peer.send(b"two").unwrap();
    peer.send(b"").unwrap();
    let done = completions(&mut ring, 3);
    assert_eq!(done.len(), 3);
    for (completion, expected) in done.iter().zip([&b"one"[..], b"two", b""]) {
        let bid = completion.buffer_id().expect("a provided buffer");
        let len = completion.result as usize;
        let message = ring.message(3, bid, len).expect("a message");
        assert_eq!(message.payload, expected);
        assert!(message.control.is_empty() && !message.truncated);
    }
    assert!(done[0].more() && done[1].more(), "still armed");
    assert!(
        !done[2].more(),
        "an empty datagram, brought, ends it as recv's does"
    );
    assert!(ring.inflight.is_empty());
    ring.recvmsg_multishot(ours.as_fd(), 3, 9);
    let _ = ring.submit_and_wait(Some(Duration::ZERO));
    assert_eq!(
        ring.inflight.len(),
        1,
        "one entry while the receive stays armed"
    );
    let first = done[0].buffer_id().unwrap();
    ring.recycle(3, first);
    assert_eq!(
        ring.message(3, first, RECVMSG_OVERHEAD + 3),
        None,
        "the kernel's again"
    );
    ring.recycle(3, first); // twice: ignored, never two ring entries for one buffer
    ring.recycle(3, 400); // not a buffer at all
    assert_eq!(ring.buffer(3, 400, 1), None);
    // Longer than the buffer: cut, and said so.
    peer.send(&[7; 300]).unwrap();
    let done = completions(&mut ring, 1);
    let bid = done[0].buffer_id().expect("a provided buffer");
    let message = ring.message(3, bid, done[0].result as usize).unwrap();
    assert!(message.truncated);
    assert_eq!(message.payload, &[7; 256][..]);
    assert!(ring.cancel_all(Duration::from_secs(1)));
    assert!(ring.inflight.is_empty());
}

#[test]
fn a_chain_of_reads_takes_what_is_queued_and_is_cancelled_quickly() {
    let mut ring = Ring::new().expect("io_uring");
    ring.provide_buffers(2, 16, 64).unwrap();
    let (reader, writer) = pipe();
    ring.read_chain(reader.as_fd(), 2, 16, 5);
    for byte in [b"a", b"b", b"c"] {
        nix::unistd::write(&writer, byte).expect("write the pipe");
        let done = completions(&mut ring, 1);
        assert_eq!(done.len(), 1, "one read at a time takes each write");
        let bid = done[0].buffer_id().unwrap();
        assert_eq!(ring.buffer(2, bid, 1), Some(&byte[..]));
        ring.recycle(2, bid);
        ring.publish(2);
    }
    assert_eq!(ring.inflight.len(), 13);
    let started = Instant::now();
    assert!(ring.cancel_all(Duration::from_secs(1)));
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "each cancelled read started the next: {:?}",
        started.elapsed()
    );
}

/// One turn of the loop over a chain of single reads, with `wait` as its wait: how many
/// of the `QUEUED` datagrams (one per read, as TUN packets) it took.
fn one_turn_of_a_chain(wait: impl FnOnce(&mut Ring)) -> usize {
    // As many as provided buffers circulate at first.
    const QUEUED: u16 = 32;
    let mut ring = Ring::new().expect("io_uring");
    ring.provide_buffers(2, QUEUED, 64).unwrap();
    let (reader, writer) = UnixDatagram::pair().expect("socketpair");
    for i in 0..QUEUED {
        writer.send(&i.to_le_bytes()).unwrap();
    }
    ring.read_chain(reader.as_fd(), 2, QUEUED, 5);
    wait(&mut ring);
    let mut done = Vec::new();
    ring.drain(&mut done, usize::from(QUEUED));
    for (i, completion) in done.iter().enumerate() {
        let bid = completion
            .buffer_id()
            .unwrap_or_else(|| panic!("read {i}: {}", completion.result));
        assert_eq!(ring.buffer(2, bid, 2), Some(&(i as u16).to_le_bytes()[..]));
    }
    assert!(ring.cancel_all(Duration::from_secs(1)));
    done.len()
}

#[test]
fn a_chain_of_reads_takes_every_queued_packet_in_one_turn() {
    // A wait for one completion takes one or two on 6.18 (the reason for
    // `submit_and_run`); how many is the kernel's business, so it is only shown.
    let waited = one_turn_of_a_chain(|ring| ring.submit_and_wait(None).unwrap());
    eprintln!("a wait for one completion took {waited} of the queued packets");
    let ran = one_turn_of_a_chain(|ring| ring.submit_and_run(32).unwrap());
    assert_eq!(ran, 32, "the chain stopped short of the queued packets");
}

#[test]
fn a_multishot_accept_hands_over_each_connection_once() {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    let dir = std::env::temp_dir().join(format!("uring-accept-{}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let listener = UnixListener::bind(&dir).unwrap();
    let mut first = UnixStream::connect(&dir).unwrap();
    let mut second = UnixStream::connect(&dir).unwrap();
    std::fs::remove_file(&dir).unwrap();
    let mut ring = Ring::new().expect("io_uring");
    // Both are waiting: the accept takes them as it is submitted.
    ring.accept_multishot(listener.as_fd(), 11);
    ring.submit_and_wait(Some(Duration::from_secs(1))).unwrap();
    let mut done = Vec::new();
    ring.drain(&mut done, 16);
    assert_eq!(done.len(), 2, "{done:?}");
    assert!(done.iter().all(|c| c.token == 11 && c.more()), "{done:?}");
    // The first is claimed and works; the second is not, and is closed.
    let owned = ring.take_accepted(&done[0]).expect("an fd");
    assert!(ring.take_accepted(&done[0]).is_none(), "handed over once");
    let mut server = UnixStream::from(owned);
    first.write_all(b"hi").unwrap();
    let mut got = [0u8; 2];
    server.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hi");
    ring.drain(&mut Vec::new(), 16);
    let mut rest = Vec::new();
    assert_eq!(
        second.read_to_end(&mut rest).unwrap(),
        0,
        "unclaimed: closed"
    );
    ring.timeout(Duration::from_millis(1), 12);
    let done = completions(&mut ring, 1);
    assert_eq!((done[0].token, done[0].result), (12, -libc::ETIME));
    assert!(ring.take_accepted(&done[0]).is_none(), "not an accept's");
    assert!(ring.cancel_all(Duration::from_secs(1)));
}

#[test]
fn cancel_all_ends_every_pending_operation() {
    let mut ring = Ring::new().expect("io_uring");
    let pipes: Vec<_> = (0..4).map(|_| pipe()).collect();
    let region = Region::new(4096).unwrap();
    for (i, (reader, _)) in pipes.iter().enumerate() {
        let buf = Slice {
            region: region.clone(),
            range: i * 16..i * 16 + 16,
        };
        ring.read(reader.as_fd(), buf, i as u64);
    }
    let _ = ring.submit_and_wait(Some(Duration::ZERO));
    assert_eq!(ring.inflight.len(), 4);
    assert!(ring.cancel_all(Duration::from_secs(1)));
    assert!(ring.inflight.is_empty());
    assert_eq!(
        region.holders(),
        1,
        "no operation holds the memory any more"
    );
}

#[test]
fn a_segmented_send_arrives_as_its_datagrams_and_bad_message_ranges_are_refused() {
    let mut ring = Ring::new().expect("io_uring");
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    receiver
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    sender.connect(receiver.local_addr().unwrap()).unwrap();
    let region = Region::new(8192).unwrap();
    let bytes: Vec<u8> = (0..2500u32).map(|i| (i * 7 + i / 256) as u8).collect();
    region.with_mut(0..bytes.len(), |buf| buf.copy_from_slice(&bytes));
    let data = |range: std::ops::Range<usize>| Slice {
        region: region.clone(),
        range,
    };
    // Misaligned, overlapping the data, too short, outside the region: nothing queued.
    for message in [
        4097..4097 + MESSAGE_LEN,
        2000..2000 + MESSAGE_LEN,
        4096..4100,
    ] {
        assert!(!ring.send_segmented(sender.as_fd(), data(0..2500), message, 1000, 1));
    }
    assert!(!ring.send_segmented(
        sender.as_fd(),
        data(0..2500),
        8190..8190 + MESSAGE_LEN,
        1000,
        1
    ));
    assert_eq!(region.holders(), 1, "refused sends hold nothing");
    assert!(ring.send_segmented(
        sender.as_fd(),
        data(0..2500),
        4096..4096 + MESSAGE_LEN,
        1000,
        2
    ));
    let done = completions(&mut ring, 1);
    assert_eq!((done[0].token, done[0].result), (2, 2500));
    let mut buf = [0u8; 4096];
    for expected in [&bytes[..1000], &bytes[1000..2000], &bytes[2000..]] {
        let n = receiver.recv(&mut buf).expect("a datagram");
        assert_eq!(&buf[..n], expected, "one segment, one datagram");
    }
    assert_eq!(region.holders(), 1, "let go once complete");
}

#[test]
fn a_gathered_write_keeps_its_payload_buffer_until_it_completes() {
    let mut ring = Ring::new().expect("io_uring");
    let size = RECVMSG_OVERHEAD + 256;
    ring.provide_buffers(3, 4, size).unwrap();
    let (ours, peer) = UnixDatagram::pair().expect("socketpair");
    ring.recvmsg_multishot(ours.as_fd(), 3, 9);
    let _ = ring.submit_and_wait(Some(Duration::ZERO));
    peer.send(b"payload").unwrap();
    let done = completions(&mut ring, 1);
    let bid = done[0].buffer_id().expect("a provided buffer");
    let region = Region::new(4096).unwrap();
    region.kernel_write(64, b"HDR");
    let headers = Slice {
        region: region.clone(),
        range: 64..67,
    };
    let payload = InBuffer {
        group: 3,
        bid,
        start: RECVMSG_OVERHEAD as u32,
        len: 7,
    };
    let (reader, writer) = pipe();
    let write = |ring: &mut Ring, headers: &Slice, iovecs, payload| {
        ring.write_gathered(writer.as_fd(), headers.clone(), iovecs, payload, 5)
    };
    assert!(
        !write(&mut ring, &headers, 0..IOVECS_LEN, payload),
        "not held"
    );
    ring.hold(3, bid);
    assert!(
        !write(&mut ring, &headers, 4..4 + IOVECS_LEN, payload),
        "misaligned"
    );
    assert!(
        !write(&mut ring, &headers, 56..56 + IOVECS_LEN, payload),
        "overlapping"
    );
    let past = InBuffer {
        len: 257,
        ..payload
    };
    assert!(
        !write(&mut ring, &headers, 0..IOVECS_LEN, past),
        "past the buffer"
    );
    // A full pipe: the write waits, and the buffer with it, recycled or not.
    let full = vec![0u8; 65536];
    assert_eq!(nix::unistd::write(&writer, &full), Ok(full.len()));
    assert!(write(&mut ring, &headers, 0..IOVECS_LEN, payload));
    ring.recycle(3, bid);
    let _ = ring.submit_and_wait(Some(Duration::from_millis(10)));
    let mut batch = Vec::new();
    ring.drain(&mut batch, 64);
    assert!(batch.is_empty(), "the write waits for room");
    let held = ring
        .message(3, bid, RECVMSG_OVERHEAD + 7)
        .expect("still ours");
    assert_eq!(held.payload, b"payload");
    let mut drained = vec![0u8; full.len()];
    assert_eq!(nix::unistd::read(&reader, &mut drained), Ok(full.len()));
    let done = completions(&mut ring, 1);
    assert_eq!((done[0].token, done[0].result), (5, 10));
    let mut packet = [0u8; 16];
    assert_eq!(nix::unistd::read(&reader, &mut packet), Ok(10));
    assert_eq!(&packet[..10], b"HDRpayload");
    assert_eq!(
        ring.message(3, bid, RECVMSG_OVERHEAD + 7),
        None,
        "given back once written"
    );
    drop(headers);
    assert_eq!(region.holders(), 1, "let go once complete");
    assert!(ring.cancel_all(Duration::from_secs(1)));
}
