use super::*;

fn framed(messages: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for message in messages {
        out.extend_from_slice(&(message.len() as u16).to_be_bytes());
        out.extend_from_slice(message);
    }
    out
}

/// Everything `stream` holds, fed `chunk` bytes at a time, messages taken as they come.
fn reassemble(stream: &[u8], chunk: usize) -> Result<Vec<Vec<u8>>, Error> {
    let mut reassembler = Reassembler::new(512, 4);
    let mut out = Vec::new();
    for piece in stream.chunks(chunk) {
        let mut rest = piece;
        while !rest.is_empty() {
            let taken = reassembler.push(rest)?;
            rest = &rest[taken..];
            while let Some(message) = reassembler.message() {
                out.push(message.to_vec());
            }
            assert!(
                taken > 0 || rest.is_empty(),
                "room once the messages are taken"
            );
        }
    }
    assert_eq!(reassembler.buffered(), 0);
    Ok(out)
}

#[test]
fn messages_come_out_whole_however_the_stream_is_cut() {
    let messages: [&[u8]; 3] = [b"first query", &[7; 512], b"x"];
    let stream = framed(&messages);
    for chunk in 1..=stream.len() {
        assert_eq!(
            reassemble(&stream, chunk).unwrap(),
            messages,
            "chunks of {chunk}"
        );
    }
}

#[test]
fn oversized_and_empty_messages_end_the_stream() {
    let big = [0u8; 513];
    assert_eq!(
        reassemble(&framed(&[b"ok", &big]), 3),
        Err(Error::TooLarge(513))
    );
    assert_eq!(reassemble(&framed(&[b"ok", b""]), 1), Err(Error::Empty));
}

#[test]
fn no_more_than_max_messages_wait() {
    let mut reassembler = Reassembler::new(100, 2);
    let stream = framed(&[b"one", b"two", b"three"]);
    // Two complete messages and nothing of the third.
    assert_eq!(reassembler.push(&stream), Ok(10));
    assert_eq!(reassembler.push(&stream[10..]), Ok(0));
    assert_eq!(reassembler.message(), Some(&b"one"[..]));
    assert_eq!(reassembler.push(&stream[10..]), Ok(7));
    assert_eq!(reassembler.message(), Some(&b"two"[..]));
    assert_eq!(reassembler.message(), Some(&b"three"[..]));
    assert_eq!(reassembler.message(), None);
    // The largest messages fit as many as allowed.
    let full = framed(&[&[1; 100], &[2; 100], &[3; 100]]);
    assert_eq!(reassembler.push(&full), Ok(204));
}

#[test]
fn frames_a_reply_in_place() {
    let mut out = [0u8; 10];
    out[2..7].copy_from_slice(b"reply");
    assert_eq!(frame(&mut out, 5), Some(7));
    assert_eq!(&out[..7], b"\0\x05reply");
    assert_eq!(frame(&mut out, 9), None);
    assert_eq!(frame(&mut vec![0; 70_000], 65_536), None);
}
