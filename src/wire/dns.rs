//! DNS messages (RFC 1035, 3596, 6891) as the proxy's own resolver reads and writes
//! them, pure and without allocation: the one question of a query parsed out of its
//! bytes, and replies written into a buffer the caller lends. Queries come from any
//! client on the TUN: every read is bounds-checked and fails with an `Error`, never a
//! panic. Not a general DNS library: no compression is read, no record but A, AAAA, PTR
//! and OPT is written.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 12;
/// Longest name on the wire, its length bytes and the root's included (RFC 1035 2.3.4).
pub const MAX_NAME: usize = 255;
/// Longest name as dotted text: the wire form less its first length byte and the root.
pub const MAX_TEXT: usize = MAX_NAME - 2;
/// Longest label (RFC 1035 2.3.4); larger length bytes are pointers or reserved types.
pub const MAX_LABEL: usize = 63;
/// Largest reply over UDP to a query without EDNS (RFC 1035 4.2.1).
pub const UDP_MAX: usize = 512;
/// The UDP payload size our replies announce to a query with EDNS: the DNS flag day
/// 2020 value, which fits a 1280-byte IPv6 MTU.
pub const EDNS_PAYLOAD: u16 = 1232;

/// Record types the resolver tells apart.
pub const TYPE_A: u16 = 1;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_SVCB: u16 = 64;
pub const TYPE_HTTPS: u16 = 65;
/// Incremental and full zone transfers, then MAILB and MAILA (RFC 1035 3.2.3), before
/// ANY: meta types that ask for more than one reply or are obsolete.
pub const TYPE_IXFR: u16 = 251;
pub const TYPE_ANY: u16 = 255;
/// The Internet class, the only one answered.
pub const CLASS_IN: u16 = 1;

const FLAG_QR: u16 = 0x8000;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;
const FLAG_CD: u16 = 0x0010;
const OPCODE_SHIFT: u16 = 11;
const OPCODE_QUERY: u8 = 0;
/// The two top bits of a length byte that make it a compression pointer.
const POINTER: u8 = 0xc0;
/// Bytes of a record after its name: type, class, TTL, RDLENGTH.
const RECORD_FIXED: usize = 10;
/// A pointer to the question's name, which always starts right after the header.
const QUESTION_POINTER: [u8; 2] = [POINTER, HEADER_LEN as u8];
/// The OPT record of a reply: root name, type, our payload size, extended RCODE,
/// version 0 and flags all zero, no options.
const OPT_RECORD: [u8; 11] = {
    let size = EDNS_PAYLOAD.to_be_bytes();
    let kind = TYPE_OPT.to_be_bytes();
    [0, kind[0], kind[1], size[0], size[1], 0, 0, 0, 0, 0, 0]
};

/// Response codes the resolver answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rcode {
    NoError = 0,
    FormErr = 1,
    ServFail = 2,
    NxDomain = 3,
    NotImp = 4,
    Refused = 5,
}

/// Why a message is not a query the resolver can answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Fewer bytes than a header: there is no id to answer to.
    Header,
    /// A response (QR set), which is never answered: two resolvers would loop.
    Response,
    /// An opcode other than QUERY.
    Opcode(u8),
    /// QDCOUNT other than 1.
    Questions(u16),
    /// Answer or authority records in a query.
    Records,
    /// Additional records other than one OPT with the root name.
    Additional,
    /// The message ends inside a name, the question or the OPT record.
    Truncated,
    /// A compression pointer, or a reserved label type (length bytes 64 to 191).
    Label,
    /// A name longer than 255 bytes on the wire.
    LongName,
    /// Bytes after the last record.
    Trailing,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Header => f.write_str("shorter than a DNS header"),
            Error::Response => f.write_str("a response, not a query"),
            Error::Opcode(op) => write!(f, "opcode {op} is not QUERY"),
            Error::Questions(n) => write!(f, "{n} questions instead of 1"),
            Error::Records => f.write_str("answer or authority records in a query"),
            Error::Additional => f.write_str("additional records other than one OPT"),
            Error::Truncated => f.write_str("truncated"),
            Error::Label => f.write_str("a compression pointer or reserved label type"),
            Error::LongName => f.write_str("a name longer than 255 bytes"),
            Error::Trailing => f.write_str("bytes after the last record"),
        }
    }
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    let pair = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([pair[0], pair[1]]))
}

/// The fixed header, readable from any 12 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl Header {
    pub fn parse(message: &[u8]) -> Option<Header> {
        let field = |i: usize| u16_at(message, 2 * i);
        Some(Header {
            id: field(0)?,
            flags: field(1)?,
            qdcount: field(2)?,
            ancount: field(3)?,
            nscount: field(4)?,
            arcount: field(5)?,
        })
    }

    pub fn is_response(&self) -> bool {
        self.flags & FLAG_QR != 0
    }

    pub fn opcode(&self) -> u8 {
        ((self.flags >> OPCODE_SHIFT) & 0xf) as u8
    }

    /// Recursion desired: echoed in the reply.
    pub fn rd(&self) -> bool {
        self.flags & FLAG_RD != 0
    }

    /// Read by tests and the fuzz target; the proxy writes TC, never reads it.
    #[cfg(any(test, fuzzing))]
    pub fn tc(&self) -> bool {
        self.flags & FLAG_TC != 0
    }

    #[cfg(any(test, fuzzing))]
    pub fn rcode(&self) -> u8 {
        (self.flags & 0xf) as u8
    }

    /// The flags of a reply to this header: QR, the opcode, RD and CD echoed, RA set
    /// (the resolver answers every name itself), and `rcode`.
    fn reply_flags(&self, rcode: Rcode) -> u16 {
        FLAG_QR | (self.flags & (0xf << OPCODE_SHIFT | FLAG_RD | FLAG_CD)) | FLAG_RA | rcode as u16
    }
}

/// A name in wire form, checked: labels of 1 to 63 bytes ending with the root, at most
/// 255 bytes in all, no pointers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Name<'a>(&'a [u8]);

impl<'a> Name<'a> {
    /// The name at the start of `bytes`, and its length on the wire.
    pub fn parse(bytes: &'a [u8]) -> Result<Name<'a>, Error> {
        let mut at = 0;
        loop {
            let len = *bytes.get(at).ok_or(Error::Truncated)?;
            // A pointer would point elsewhere (and could loop); a question's name is
            // the first one in the message, so a query has no reason to compress it.
            if len & POINTER != 0 {
                return Err(Error::Label);
            }
            at += 1 + usize::from(len);
            if at > MAX_NAME {
                return Err(Error::LongName);
            }
            if len == 0 {
                return Ok(Name(&bytes[..at]));
            }
        }
    }

    /// The name's bytes on the wire.
    pub fn wire(&self) -> &'a [u8] {
        self.0
    }

    /// The labels, from the first to the last before the root.
    pub fn labels(&self) -> Labels<'a> {
        Labels(self.0)
    }

    /// The root name, ".".
    #[cfg(test)]
    pub fn is_root(&self) -> bool {
        self.0 == [0]
    }

    /// The name as lower-case dotted text without the final dot (the root is ""), written
    /// into `out`; `None` if a label holds a byte other than a letter, digit, '-' or '_':
    /// such a name cannot be handed to an upstream as text unambiguously.
    pub fn text<'b>(&self, out: &'b mut [u8; MAX_TEXT]) -> Option<&'b str> {
        let mut len = 0;
        for label in self.labels() {
            if len > 0 {
                out[len] = b'.';
                len += 1;
            }
            for &byte in label {
                if !(byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_') {
                    return None;
                }
                out[len] = byte.to_ascii_lowercase();
                len += 1;
            }
        }
        std::str::from_utf8(&out[..len]).ok()
    }

    /// The address a reverse-lookup name stands for: `d.c.b.a.in-addr.arpa` or the 32
    /// nibbles of `ip6.arpa` (RFC 3596 2.5), in full; anything else (a partial zone, a
    /// leading zero) is `None`.
    pub fn reverse(&self) -> Option<IpAddr> {
        let mut labels = [&[][..]; 34];
        let mut count = 0;
        for label in self.labels() {
            *labels.get_mut(count)? = label;
            count += 1;
        }
        let suffix = |zone: &[&[u8]]| {
            count > zone.len()
                && labels[count - zone.len()..count]
                    .iter()
                    .zip(zone)
                    .all(|(label, want)| label.eq_ignore_ascii_case(want))
        };
        if count == 6 && suffix(&[b"in-addr", b"arpa"]) {
            let mut octets = [0u8; 4];
            for (octet, label) in octets.iter_mut().rev().zip(&labels[..4]) {
                *octet = decimal_octet(label)?;
            }
            return Some(IpAddr::V4(Ipv4Addr::from(octets)));
        }
        if count == 34 && suffix(&[b"ip6", b"arpa"]) {
            let mut addr = 0u128;
            for label in labels[..32].iter().rev() {
                let [digit] = label else { return None };
                addr = addr << 4 | u128::from(char::from(*digit).to_digit(16)?);
            }
            return Some(IpAddr::V6(Ipv6Addr::from(addr)));
        }
        None
    }
}

/// An octet in a reverse name: 0 to 255 in decimal, without leading zeros.
fn decimal_octet(label: &[u8]) -> Option<u8> {
    if label.is_empty() || label.len() > 3 || (label.len() > 1 && label[0] == b'0') {
        return None;
    }
    let mut value = 0u16;
    for &digit in label {
        if !digit.is_ascii_digit() {
            return None;
        }
        value = value * 10 + u16::from(digit - b'0');
    }
    u8::try_from(value).ok()
}

/// The labels of a checked name.
pub struct Labels<'a>(&'a [u8]);

impl<'a> Iterator for Labels<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let (&len, rest) = self.0.split_first()?;
        let len = usize::from(len);
        // A checked name holds every label it announces; the root ends it.
        let label = rest.get(..len).filter(|_| len > 0)?;
        self.0 = &rest[len..];
        Some(label)
    }
}

/// A query with its one question, and what a reply needs of the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query<'a> {
    pub header: Header,
    pub name: Name<'a>,
    pub qtype: u16,
    pub qclass: u16,
    /// The query carried an OPT record (EDNS): the reply carries one too.
    pub edns: bool,
    /// The largest reply the client takes over UDP: 512 bytes without EDNS, else the
    /// payload size its OPT record announces (512 if it announces less, RFC 6891 6.2.5).
    pub udp_size: u16,
    /// The question as it came (name, type, class), echoed byte for byte: clients that
    /// randomise the case of names (0x20 bits) check it.
    question: &'a [u8],
}

impl<'a> Query<'a> {
    pub fn parse(message: &'a [u8]) -> Result<Query<'a>, Error> {
        let header = Header::parse(message).ok_or(Error::Header)?;
        if header.is_response() {
            return Err(Error::Response);
        }
        if header.opcode() != OPCODE_QUERY {
            return Err(Error::Opcode(header.opcode()));
        }
        if header.qdcount != 1 {
            return Err(Error::Questions(header.qdcount));
        }
        if header.ancount != 0 || header.nscount != 0 {
            return Err(Error::Records);
        }
        let body = &message[HEADER_LEN..];
        let name = Name::parse(body)?;
        let end = name.0.len() + 4;
        let question = body.get(..end).ok_or(Error::Truncated)?;
        let qtype = u16_at(question, end - 4).ok_or(Error::Truncated)?;
        let qclass = u16_at(question, end - 2).ok_or(Error::Truncated)?;
        let rest = &body[end..];
        let (rest, udp_size) = match header.arcount {
            0 => (rest, UDP_MAX as u16),
            1 => opt_record(rest)?,
            _ => return Err(Error::Additional),
        };
        if !rest.is_empty() {
            return Err(Error::Trailing);
        }
        Ok(Query {
            header,
            name,
            qtype,
            qclass,
            edns: header.arcount == 1,
            udp_size,
            question,
        })
    }
}

/// Reads an OPT record (RFC 6891 6.1.2) off the start of `bytes`; returns what follows
/// and the UDP payload size it announces. Its options do not matter.
fn opt_record(bytes: &[u8]) -> Result<(&[u8], u16), Error> {
    let (&root, rest) = bytes.split_first().ok_or(Error::Truncated)?;
    if root != 0 {
        return Err(Error::Additional);
    }
    let kind = u16_at(rest, 0).ok_or(Error::Truncated)?;
    if kind != TYPE_OPT {
        return Err(Error::Additional);
    }
    let size = u16_at(rest, 2).ok_or(Error::Truncated)?;
    let rdlen = usize::from(u16_at(rest, 8).ok_or(Error::Truncated)?);
    let rest = rest.get(RECORD_FIXED + rdlen..).ok_or(Error::Truncated)?;
    Ok((rest, size.max(UDP_MAX as u16)))
}

/// What an answer record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rdata<'a> {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// A name as dotted text (no final dot), such as `Name::text` writes.
    Ptr(&'a str),
}

/// An answer to the question, owned by the question's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub ttl: u32,
    pub data: Rdata<'a>,
}

impl Record<'_> {
    fn kind(&self) -> u16 {
        match self.data {
            Rdata::A(_) => TYPE_A,
            Rdata::Aaaa(_) => TYPE_AAAA,
            Rdata::Ptr(_) => TYPE_PTR,
        }
    }

    /// Writes the record into `out`; its length, or `None` (`out` partly written) when
    /// it does not fit or a PTR's name is not one.
    fn emit(&self, out: &mut [u8]) -> Option<usize> {
        let rdata_at = QUESTION_POINTER.len() + RECORD_FIXED;
        let rdata = out.get_mut(rdata_at..)?;
        let rdlen = match self.data {
            Rdata::A(addr) => put(rdata, 0, &addr.octets())?,
            Rdata::Aaaa(addr) => put(rdata, 0, &addr.octets())?,
            Rdata::Ptr(text) => emit_name(rdata, text)?,
        };
        let mut at = put(out, 0, &QUESTION_POINTER)?;
        at = put(out, at, &self.kind().to_be_bytes())?;
        at = put(out, at, &CLASS_IN.to_be_bytes())?;
        at = put(out, at, &self.ttl.to_be_bytes())?;
        put(out, at, &(rdlen as u16).to_be_bytes())?;
        Some(rdata_at + rdlen)
    }
}

/// Copies `bytes` into `out` at `at`; the offset after them, or `None` if they do not fit.
fn put(out: &mut [u8], at: usize, bytes: &[u8]) -> Option<usize> {
    let end = at.checked_add(bytes.len())?;
    out.get_mut(at..end)?.copy_from_slice(bytes);
    Some(end)
}

/// Writes dotted `text` as a name in wire form; its length, or `None` if it does not fit
/// or has an empty or overlong label ("" is the root).
fn emit_name(out: &mut [u8], text: &str) -> Option<usize> {
    let mut at = 0;
    if !text.is_empty() {
        for label in text.split('.') {
            if label.is_empty() || label.len() > MAX_LABEL {
                return None;
            }
            at = put(out, at, &[label.len() as u8])?;
            at = put(out, at, label.as_bytes())?;
        }
    }
    at = put(out, at, &[0])?;
    (at <= MAX_NAME).then_some(at)
}

/// Writes into `out` the reply to `query` with `rcode` and `record` as its answer (which
/// must answer the question's type); returns its length. A reply the answer does not
/// fit in goes without it, with TC set; `None` (`out` partly written) when not even the
/// question fits.
pub fn reply(out: &mut [u8], query: &Query, rcode: Rcode, record: Option<Record>) -> Option<usize> {
    let header_end = HEADER_LEN;
    let question_end = put(out, header_end, query.question)?;
    let mut at = question_end;
    let mut flags = query.header.reply_flags(rcode);
    let mut answers = 0;
    if let Some(record) = record {
        match out.get_mut(at..).and_then(|rest| record.emit(rest)) {
            Some(len) => {
                at += len;
                answers = 1;
            }
            None => flags |= FLAG_TC,
        }
    }
    let mut additional = 0;
    if query.edns
        && let Some(end) = put(out, at, &OPT_RECORD)
    {
        at = end;
        additional = 1;
    }
    write_header(out, query.header.id, flags, [1, answers, 0, additional]);
    Some(at)
}

/// Writes into `out` a reply with `rcode` and no question to a message whose header is
/// `header` but whose question cannot be read (FORMERR, NOTIMP); returns its length, or
/// `None` if `out` is shorter than a header.
pub fn error(out: &mut [u8], header: &Header, rcode: Rcode) -> Option<usize> {
    let out = out.get_mut(..HEADER_LEN)?;
    write_header(out, header.id, header.reply_flags(rcode), [0; 4]);
    Some(HEADER_LEN)
}

/// Cuts `message`, a reply longer than `limit` (a forwarded server's reply to a client
/// over UDP, say), down to its header and question with TC set: the client asks again
/// over TCP (RFC 1035 4.2.1). Returns the length to send (the whole message if it fits),
/// or `None` if the reply to cut has no one question that fits in `limit`.
pub fn truncate(message: &mut [u8], limit: usize) -> Option<usize> {
    if message.len() <= limit {
        return Some(message.len());
    }
    let header = Header::parse(message)?;
    if header.qdcount != 1 {
        return None;
    }
    let name = Name::parse(&message[HEADER_LEN..]).ok()?;
    let end = HEADER_LEN + name.0.len() + 4;
    if end > limit.min(message.len()) {
        return None;
    }
    write_header(message, header.id, header.flags | FLAG_TC, [1, 0, 0, 0]);
    Some(end)
}

/// Writes a header with `counts` (QD, AN, NS, AR) into `out`, at least 12 bytes long.
fn write_header(out: &mut [u8], id: u16, flags: u16, counts: [u16; 4]) {
    let fields = [id, flags, counts[0], counts[1], counts[2], counts[3]];
    for (chunk, field) in out[..HEADER_LEN].chunks_exact_mut(2).zip(fields) {
        chunk.copy_from_slice(&field.to_be_bytes());
    }
}

#[cfg(test)]
mod tests;
