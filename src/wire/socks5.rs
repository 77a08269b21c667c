//! SOCKS5 (RFC 1928) as a client speaks it, with username/password authentication
//! (RFC 1929), pure: the messages a client sends, written into byte slices, and the
//! server's replies parsed out of them. Each reply's length is known from its first
//! bytes, so a reader never has to take a byte past it; the datagram header of UDP
//! ASSOCIATE is written and parsed here too. Replies come from the network: every
//! parser is bounds-checked and fails with an `Error`, never a panic.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const VERSION: u8 = 5;
/// Version of the RFC 1929 sub-negotiation.
const AUTH_VERSION: u8 = 1;
const METHOD_NONE: u8 = 0x00;
const METHOD_PASSWORD: u8 = 0x02;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const ATYP_IPV4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_IPV6: u8 = 4;

/// Longest user name and password RFC 1929 can carry (one length byte each).
pub const MAX_CREDENTIAL: usize = 255;
/// Longest message a client sends: the username/password request.
pub const MAX_REQUEST: usize = 3 + 2 * MAX_CREDENTIAL;
/// Longest reply to a request: a domain name of 255 bytes as the bound address.
pub const MAX_REPLY: usize = 4 + 1 + 255 + 2;
/// Bytes of the method and authentication replies.
pub const SHORT_REPLY: usize = 2;
/// Bytes of a request's reply that tell its length: the shortest reply (an empty domain
/// name) is longer, so reading this many never takes a byte past it.
pub const REPLY_PREFIX: usize = 5;

/// What a request asks the server for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Connect = 1,
    UdpAssociate = 3,
}

/// The user name and password for RFC 1929, each 1 to 255 bytes. Their `Debug` shows
/// neither: configurations are printed in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    user: Box<[u8]>,
    password: Box<[u8]>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// Why credentials cannot be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialsError {
    EmptyUser,
    EmptyPassword,
    LongUser,
    LongPassword,
}

impl fmt::Display for CredentialsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CredentialsError::EmptyUser => "the user name is empty",
            CredentialsError::EmptyPassword => "the password is empty",
            CredentialsError::LongUser => "the user name is longer than 255 bytes",
            CredentialsError::LongPassword => "the password is longer than 255 bytes",
        })
    }
}

impl Credentials {
    pub fn new(user: &[u8], password: &[u8]) -> Result<Credentials, CredentialsError> {
        match (user.len(), password.len()) {
            (0, _) => Err(CredentialsError::EmptyUser),
            (_, 0) => Err(CredentialsError::EmptyPassword),
            (n, _) if n > MAX_CREDENTIAL => Err(CredentialsError::LongUser),
            (_, n) if n > MAX_CREDENTIAL => Err(CredentialsError::LongPassword),
            _ => Ok(Credentials {
                user: user.into(),
                password: password.into(),
            }),
        }
    }
}

/// Reply codes of a request other than success (RFC 1928 section 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyCode {
    GeneralFailure,
    NotAllowed,
    NetworkUnreachable,
    HostUnreachable,
    ConnectionRefused,
    TtlExpired,
    CommandNotSupported,
    AddressNotSupported,
    Unassigned(u8),
}

impl ReplyCode {
    fn of(code: u8) -> ReplyCode {
        match code {
            1 => ReplyCode::GeneralFailure,
            2 => ReplyCode::NotAllowed,
            3 => ReplyCode::NetworkUnreachable,
            4 => ReplyCode::HostUnreachable,
            5 => ReplyCode::ConnectionRefused,
            6 => ReplyCode::TtlExpired,
            7 => ReplyCode::CommandNotSupported,
            8 => ReplyCode::AddressNotSupported,
            other => ReplyCode::Unassigned(other),
        }
    }
}

/// What is wrong with a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Not a SOCKS5 (or RFC 1929) message: a wrong version byte.
    Version(u8),
    /// The server chose a method that was not offered.
    Method(u8),
    /// The server accepts none of the methods offered (0xFF): it wants a password we do
    /// not have, or another method.
    NoAcceptableMethod,
    /// The username/password was refused (the RFC 1929 status).
    AuthRejected(u8),
    /// An address type RFC 1928 does not define.
    AddressType(u8),
    /// The request failed with this reply code.
    Refused(ReplyCode),
    /// Fewer bytes than the message needs.
    Truncated,
}

/// The method the server chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    NoAuth,
    Password,
}

/// The address a successful reply names: where a UDP association's relay listens (for
/// CONNECT, the server's end of its connection, of no use to us).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    Addr(SocketAddr),
    /// A domain name: a relay address we would have to resolve.
    Domain,
}

/// Writes the greeting, offering no authentication and, with credentials, RFC 1929 too.
/// Returns its length (at most 4 bytes).
pub fn greeting(buf: &mut [u8], password: bool) -> usize {
    let message: &[u8] = if password {
        &[VERSION, 2, METHOD_NONE, METHOD_PASSWORD]
    } else {
        &[VERSION, 1, METHOD_NONE]
    };
    buf[..message.len()].copy_from_slice(message);
    message.len()
}

/// Parses the server's choice of method; `password` says whether RFC 1929 was offered.
pub fn method_reply(reply: [u8; SHORT_REPLY], password: bool) -> Result<Method, Error> {
    match reply {
        [VERSION, METHOD_NONE] => Ok(Method::NoAuth),
        [VERSION, METHOD_PASSWORD] if password => Ok(Method::Password),
        [VERSION, NO_ACCEPTABLE_METHOD] => Err(Error::NoAcceptableMethod),
        [VERSION, method] => Err(Error::Method(method)),
        [version, _] => Err(Error::Version(version)),
    }
}

/// Writes the RFC 1929 request; returns its length (at most `MAX_REQUEST`).
pub fn auth_request(buf: &mut [u8], credentials: &Credentials) -> usize {
    let (user, password) = (&credentials.user, &credentials.password);
    buf[0] = AUTH_VERSION;
    // Both at most 255 bytes: `Credentials::new` checked.
    buf[1] = user.len() as u8;
    buf[2..2 + user.len()].copy_from_slice(user);
    let at = 2 + user.len();
    buf[at] = password.len() as u8;
    buf[at + 1..at + 1 + password.len()].copy_from_slice(password);
    at + 1 + password.len()
}

/// Parses the RFC 1929 status: 0 is success.
pub fn auth_reply(reply: [u8; SHORT_REPLY]) -> Result<(), Error> {
    match reply {
        [AUTH_VERSION, 0] => Ok(()),
        [AUTH_VERSION, status] => Err(Error::AuthRejected(status)),
        [version, _] => Err(Error::Version(version)),
    }
}

/// Parses the first two bytes of a request's reply: success, or the reply code (known
/// before the rest: a server may close right after a failure's first bytes).
pub fn reply_status(start: [u8; SHORT_REPLY]) -> Result<(), Error> {
    match start {
        [VERSION, 0] => Ok(()),
        [VERSION, code] => Err(Error::Refused(ReplyCode::of(code))),
        [version, _] => Err(Error::Version(version)),
    }
}

/// Bytes an address of `addr`'s family takes with its type and port.
fn address_len(addr: &SocketAddr) -> usize {
    match addr {
        SocketAddr::V4(_) => 1 + 4 + 2,
        SocketAddr::V6(_) => 1 + 16 + 2,
    }
}

/// Writes ATYP, the address and the port; returns the bytes written.
fn put_address(buf: &mut [u8], addr: &SocketAddr) -> usize {
    let len = address_len(addr);
    match addr.ip() {
        IpAddr::V4(ip) => {
            buf[0] = ATYP_IPV4;
            buf[1..5].copy_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            buf[0] = ATYP_IPV6;
            buf[1..17].copy_from_slice(&ip.octets());
        }
    }
    buf[len - 2..len].copy_from_slice(&addr.port().to_be_bytes());
    len
}

/// Writes a request for `command` to `addr` (an address, never a name); returns its
/// length (10 bytes for IPv4, 22 for IPv6).
pub fn request(buf: &mut [u8], command: Command, addr: SocketAddr) -> usize {
    buf[..3].copy_from_slice(&[VERSION, command as u8, 0]);
    3 + put_address(&mut buf[3..], &addr)
}

/// Writes a request for `command` to the host `name` (ATYP 3, the server resolves it)
/// and `port`; returns its length. `None` for a name longer than 255 bytes or empty.
pub fn request_name(buf: &mut [u8], command: Command, name: &[u8], port: u16) -> Option<usize> {
    buf[..3].copy_from_slice(&[VERSION, command as u8, 0]);
    Some(3 + put_name(&mut buf[3..], name, port)?)
}

/// Writes ATYP 3, the name and the port; returns the bytes written.
fn put_name(buf: &mut [u8], name: &[u8], port: u16) -> Option<usize> {
    let len = u8::try_from(name.len()).ok().filter(|&len| len > 0)?;
    let end = 2 + name.len();
    buf[0] = ATYP_DOMAIN;
    buf[1] = len;
    buf[2..end].copy_from_slice(name);
    buf[end..end + 2].copy_from_slice(&port.to_be_bytes());
    Some(end + 2)
}

/// Bytes of the UDP request header for a datagram to host `name`.
pub fn udp_header_name_len(name: &[u8]) -> usize {
    3 + 2 + name.len() + 2
}

/// Writes the UDP request header for a datagram to host `name` and `port` (not
/// fragmented); returns its length, `udp_header_name_len`, or `None` for a name longer
/// than 255 bytes or empty.
pub fn udp_header_name(buf: &mut [u8], name: &[u8], port: u16) -> Option<usize> {
    buf[..3].copy_from_slice(&[0, 0, 0]);
    Some(3 + put_name(&mut buf[3..], name, port)?)
}

/// Bytes of the address (type byte, address, port) starting at `start[0]`, from its
/// first two bytes.
fn address_len_of(start: &[u8]) -> Result<Option<usize>, Error> {
    match start {
        [ATYP_IPV4, ..] => Ok(Some(1 + 4 + 2)),
        [ATYP_IPV6, ..] => Ok(Some(1 + 16 + 2)),
        [ATYP_DOMAIN, len, ..] => Ok(Some(1 + 1 + usize::from(*len) + 2)),
        [ATYP_DOMAIN] | [] => Ok(None),
        [atyp, ..] => Err(Error::AddressType(*atyp)),
    }
}

/// The address at the start of `bytes`, which `address_len_of` has measured.
fn address(bytes: &[u8]) -> Bound {
    let port = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
    match bytes[0] {
        ATYP_IPV4 => {
            let octets: [u8; 4] = bytes[1..5].try_into().expect("4 bytes");
            Bound::Addr(SocketAddr::new(Ipv4Addr::from(octets).into(), port(5)))
        }
        ATYP_IPV6 => {
            let octets: [u8; 16] = bytes[1..17].try_into().expect("16 bytes");
            Bound::Addr(SocketAddr::new(Ipv6Addr::from(octets).into(), port(17)))
        }
        _ => Bound::Domain,
    }
}

/// The total length of the reply that starts with `start` (at least `REPLY_PREFIX`
/// bytes of it), or why it is not a reply. Never more than `MAX_REPLY`.
pub fn reply_len(start: &[u8]) -> Result<usize, Error> {
    match start {
        [VERSION, _, _, rest @ ..] => address_len_of(rest)?
            .map(|len| 3 + len)
            .ok_or(Error::Truncated),
        [VERSION, ..] | [] => Err(Error::Truncated),
        [version, ..] => Err(Error::Version(*version)),
    }
}

/// Parses a whole reply (`reply_len` bytes): the bound address, or the reply code of a
/// failed request. The reserved byte is not checked: no client needs it.
pub fn reply(bytes: &[u8]) -> Result<Bound, Error> {
    let len = reply_len(bytes)?;
    if bytes.len() < len {
        return Err(Error::Truncated);
    }
    reply_status([bytes[0], bytes[1]])?;
    Ok(address(&bytes[3..len]))
}

/// Bytes of the UDP request header for a datagram to `addr`: RSV, FRAG, the address.
pub fn udp_header_len(addr: &SocketAddr) -> usize {
    3 + address_len(addr)
}

/// Writes the UDP request header for a datagram to `addr` (not fragmented); returns
/// its length, `udp_header_len`.
pub fn udp_header(buf: &mut [u8], addr: SocketAddr) -> usize {
    buf[..3].copy_from_slice(&[0, 0, 0]);
    3 + put_address(&mut buf[3..], &addr)
}

/// Why a datagram from the relay is not relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpError {
    /// One fragment of a datagram (FRAG is not 0): reassembly is optional in RFC 1928
    /// and nobody sends them, so they are dropped.
    Fragment,
    /// Shorter than its header, an unknown address type, or a name as the source.
    Malformed,
}

/// Parses the header of a datagram from the relay: the source it came from and where
/// its payload starts.
pub fn udp_datagram(datagram: &[u8]) -> Result<(SocketAddr, usize), UdpError> {
    let [_, _, frag, rest @ ..] = datagram else {
        return Err(UdpError::Malformed);
    };
    if *frag != 0 {
        return Err(UdpError::Fragment);
    }
    let len = match address_len_of(rest) {
        Ok(Some(len)) if len <= rest.len() => len,
        _ => return Err(UdpError::Malformed),
    };
    match address(&rest[..len]) {
        Bound::Addr(source) => Ok((source, 3 + len)),
        Bound::Domain => Err(UdpError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_go_as_atyp_3() {
        let mut buf = [0u8; 300];
        let len = request_name(&mut buf, Command::Connect, b"example.com", 443).unwrap();
        assert_eq!(&buf[..len], b"\x05\x01\x00\x03\x0bexample.com\x01\xbb");
        let len = udp_header_name(&mut buf, b"a.b", 53).unwrap();
        assert_eq!(len, udp_header_name_len(b"a.b"));
        assert_eq!(&buf[..len], b"\x00\x00\x00\x03\x03a.b\x00\x35");
        let long = [b'a'; 256];
        assert_eq!(
            request_name(&mut [0; 300], Command::Connect, &long, 1),
            None
        );
        assert_eq!(udp_header_name(&mut [0; 300], b"", 1), None);
        let len = request_name(&mut buf, Command::Connect, &long[..255], 1).unwrap();
        assert_eq!(len, 3 + 1 + 1 + 255 + 2);
    }

    fn v4(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn greetings_offer_the_password_method_only_with_credentials() {
        let mut buf = [0u8; 8];
        let n = greeting(&mut buf, false);
        assert_eq!(&buf[..n], [5, 1, 0]);
        let n = greeting(&mut buf, true);
        assert_eq!(&buf[..n], [5, 2, 0, 2]);
    }

    #[test]
    fn method_replies() {
        assert_eq!(method_reply([5, 0], false), Ok(Method::NoAuth));
        assert_eq!(method_reply([5, 0], true), Ok(Method::NoAuth));
        assert_eq!(method_reply([5, 2], true), Ok(Method::Password));
        assert_eq!(method_reply([5, 2], false), Err(Error::Method(2)));
        assert_eq!(method_reply([5, 1], true), Err(Error::Method(1)));
        assert_eq!(
            method_reply([5, 0xff], true),
            Err(Error::NoAcceptableMethod)
        );
        assert_eq!(method_reply([4, 0], false), Err(Error::Version(4)));
        // An HTTP server's answer.
        assert_eq!(method_reply(*b"HT", false), Err(Error::Version(b'H')));
    }

    #[test]
    fn credentials_are_bounded_and_never_shown() {
        let long = [b'a'; 256];
        assert_eq!(
            Credentials::new(&long, b"p"),
            Err(CredentialsError::LongUser)
        );
        assert_eq!(
            Credentials::new(b"u", &long),
            Err(CredentialsError::LongPassword)
        );
        assert_eq!(
            Credentials::new(b"", b"p"),
            Err(CredentialsError::EmptyUser)
        );
        assert_eq!(
            Credentials::new(b"u", b""),
            Err(CredentialsError::EmptyPassword)
        );
        let credentials = Credentials::new(b"alice", b"s3cret").unwrap();
        let shown = format!("{credentials:?}");
        assert!(
            !shown.contains("alice") && !shown.contains("s3cret"),
            "{shown}"
        );

        let longest = Credentials::new(&long[..255], &long[..255]).unwrap();
        let mut buf = [0u8; MAX_REQUEST];
        assert_eq!(auth_request(&mut buf, &longest), MAX_REQUEST);
        let n = auth_request(&mut buf, &credentials);
        assert_eq!(&buf[..n], b"\x01\x05alice\x06s3cret");
    }

    #[test]
    fn auth_replies() {
        assert_eq!(auth_reply([1, 0]), Ok(()));
        assert_eq!(auth_reply([1, 1]), Err(Error::AuthRejected(1)));
        assert_eq!(auth_reply([5, 0]), Err(Error::Version(5)));
    }

    #[test]
    fn requests_carry_the_address_and_port() {
        let mut buf = [0u8; 32];
        let n = request(&mut buf, Command::Connect, v4("192.0.2.1:443"));
        assert_eq!(&buf[..n], [5, 1, 0, 1, 192, 0, 2, 1, 1, 187]);
        let n = request(&mut buf, Command::UdpAssociate, v4("[2001:db8::7]:53"));
        assert_eq!(n, 22);
        assert_eq!(&buf[..4], [5, 3, 0, 4]);
        assert_eq!(
            &buf[4..20],
            "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(&buf[20..22], [0, 53]);
    }

    #[test]
    fn reply_lengths_come_from_their_first_five_bytes() {
        assert_eq!(reply_len(&[5, 0, 0, 1, 9]), Ok(10));
        assert_eq!(reply_len(&[5, 0, 0, 4, 9]), Ok(22));
        assert_eq!(reply_len(&[5, 0, 0, 3, 0]), Ok(7));
        assert_eq!(reply_len(&[5, 0, 0, 3, 255]), Ok(MAX_REPLY));
        assert_eq!(reply_len(&[5, 0, 0, 9, 0]), Err(Error::AddressType(9)));
        assert_eq!(
            reply_len(&[0x48, 0x54, 0x54, 0x50, 0x2f]),
            Err(Error::Version(0x48))
        );
        // The shortest reply is longer than the prefix read to measure it.
        assert!(reply_len(&[5, 0, 0, 3, 0]).unwrap() >= REPLY_PREFIX);
    }

    #[test]
    fn replies_give_the_bound_address_or_the_code() {
        assert_eq!(
            reply(&[5, 0, 0, 1, 10, 0, 0, 1, 0x1f, 0x90]),
            Ok(Bound::Addr(v4("10.0.0.1:8080")))
        );
        let mut v6 = vec![5, 0, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0, 80]);
        assert_eq!(reply(&v6), Ok(Bound::Addr(v4("[::1]:80"))));
        assert_eq!(reply(b"\x05\x00\x00\x03\x03abc\x00\x50"), Ok(Bound::Domain));
        let codes = [
            (1, ReplyCode::GeneralFailure),
            (2, ReplyCode::NotAllowed),
            (3, ReplyCode::NetworkUnreachable),
            (4, ReplyCode::HostUnreachable),
            (5, ReplyCode::ConnectionRefused),
            (6, ReplyCode::TtlExpired),
            (7, ReplyCode::CommandNotSupported),
            (8, ReplyCode::AddressNotSupported),
            (9, ReplyCode::Unassigned(9)),
            (0xff, ReplyCode::Unassigned(0xff)),
        ];
        for (code, expected) in codes {
            assert_eq!(
                reply(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0]),
                Err(Error::Refused(expected))
            );
        }
        // Truncated: never a panic.
        for len in 0..10 {
            assert!(reply(&[5, 0, 0, 1, 10, 0, 0, 1, 0x1f, 0x90][..len]).is_err());
        }
    }

    #[test]
    fn udp_headers_round_trip_and_fragments_are_refused() {
        let mut buf = [0u8; 64];
        for addr in [v4("198.51.100.9:53"), v4("[2001:db8::1]:4433")] {
            let n = udp_header(&mut buf, addr);
            assert_eq!(n, udp_header_len(&addr));
            buf[n..n + 3].copy_from_slice(b"dns");
            assert_eq!(udp_datagram(&buf[..n + 3]), Ok((addr, n)));
            // Any truncation of the header is malformed, never a panic.
            for len in 0..n {
                assert_eq!(udp_datagram(&buf[..len]), Err(UdpError::Malformed));
            }
        }
        let n = udp_header(&mut buf, v4("198.51.100.9:53"));
        buf[2] = 1;
        assert_eq!(udp_datagram(&buf[..n]), Err(UdpError::Fragment));
        assert_eq!(
            udp_datagram(b"\x00\x00\x00\x03\x03abc\x00\x35"),
            Err(UdpError::Malformed),
            "a name as the source"
        );
        assert_eq!(udp_datagram(&[0, 0, 0, 7, 1, 2]), Err(UdpError::Malformed));
    }
}
