//! DNS over TCP (RFC 1035 4.2.2, RFC 7766): messages with a 2-byte length prefix, cut
//! out of a byte stream by a bounded reassembler, and the prefix put before a reply.

use std::fmt;

/// Bytes of the length prefix.
pub const PREFIX: usize = 2;

/// Why a stream cannot be read on: the connection is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// A message announced longer than the reassembler takes.
    TooLarge(usize),
    /// A message of 0 bytes: not even a header.
    Empty,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::TooLarge(len) => write!(f, "a DNS message of {len} bytes over TCP"),
            Error::Empty => f.write_str("an empty DNS message over TCP"),
        }
    }
}

/// Messages cut out of a stream, in a buffer of fixed size: at most `max_messages`
/// complete messages of at most `max_message` bytes each wait in it, and `push` takes
/// no more bytes than fit (the rest stay in the socket: backpressure on a client that
/// pipelines queries without reading replies).
pub struct Reassembler {
    buf: Box<[u8]>,
    /// Bytes of `buf` taken by `message` already.
    start: usize,
    /// Bytes in `buf`.
    end: usize,
    max_message: usize,
    max_messages: usize,
}

impl Reassembler {
    pub fn new(max_message: usize, max_messages: usize) -> Reassembler {
        let max_message = max_message.clamp(1, usize::from(u16::MAX));
        let max_messages = max_messages.max(1);
        Reassembler {
            buf: vec![0; max_messages * (PREFIX + max_message)].into_boxed_slice(),
            start: 0,
            end: 0,
            max_message,
            max_messages,
        }
    }

    /// Takes bytes from the start of `bytes`; how many were taken (0 when full).
    pub fn push(&mut self, bytes: &[u8]) -> Result<usize, Error> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let mut taken = 0;
        // Message by message: an announced length is checked before its bytes are taken,
        // and no more complete messages wait than allowed.
        while taken < bytes.len() {
            let (complete, wanted) = self.scan()?;
            if complete >= self.max_messages {
                break;
            }
            // Fewer complete messages than allowed leave room for the next one whole.
            let n = (wanted - self.end).min(bytes.len() - taken);
            self.buf[self.end..self.end + n].copy_from_slice(&bytes[taken..taken + n]);
            self.end += n;
            taken += n;
        }
        self.scan()?;
        Ok(taken)
    }

    /// The next complete message, taken off the buffer.
    pub fn message(&mut self) -> Option<&[u8]> {
        let len = self.message_len(self.start)?;
        let at = self.start + PREFIX;
        if self.end - at < len {
            return None;
        }
        self.start = at + len;
        Some(&self.buf[at..at + len])
    }

    /// Bytes waiting, complete messages or not.
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The length a message at `at` announces, if its prefix is in.
    fn message_len(&self, at: usize) -> Option<usize> {
        let prefix = self
            .buf
            .get(at..at + PREFIX)
            .filter(|_| at + PREFIX <= self.end)?;
        Some(usize::from(u16::from_be_bytes([prefix[0], prefix[1]])))
    }

    /// Complete messages from `start`, and where the bytes the next one wants end (its
    /// prefix, or all of it once the prefix is in); fails on a length refused.
    fn scan(&self) -> Result<(usize, usize), Error> {
        let mut at = self.start;
        let mut complete = 0;
        while let Some(len) = self.message_len(at) {
            if len == 0 {
                return Err(Error::Empty);
            }
            if len > self.max_message {
                return Err(Error::TooLarge(len));
            }
            let end = at + PREFIX + len;
            if end > self.end {
                return Ok((complete, end));
            }
            at = end;
            complete += 1;
        }
        Ok((complete, at + PREFIX))
    }
}

/// Puts the length prefix before a message of `len` bytes written at `out[PREFIX..]`;
/// the framed length, or `None` if `len` does not fit a prefix or `out`.
pub fn frame(out: &mut [u8], len: usize) -> Option<usize> {
    let prefix = u16::try_from(len).ok()?.to_be_bytes();
    let framed = PREFIX + len;
    if out.len() < framed {
        return None;
    }
    out[..PREFIX].copy_from_slice(&prefix);
    Some(framed)
}

#[cfg(test)]
mod tests;
