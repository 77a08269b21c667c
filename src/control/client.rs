//! `uringproxy status`: asks a running proxy over its control socket (a plain blocking
//! Unix socket: this runs in its own process, far from the data path) and prints the
//! reply as text or JSON.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{STATUS_REQUEST, render, socket_path, wire};
use crate::cli::{DEFAULT_TUN, StatusArgs};
use crate::error::Error;

/// How long the proxy may take to send its whole reply (it closes slow readers after
/// 10 s itself).
const TIMEOUT: Duration = Duration::from_secs(15);
/// The most of a reply read: ~110 bytes a flow, so millions of flows.
const MAX_REPLY: u64 = 512 << 20;

pub fn run(args: StatusArgs) -> Result<(), Error> {
    let path = match (&args.tun, &args.control) {
        (Some(_), Some(_)) => {
            return Err(Error::Usage(
                "--tun and --control both name the socket: give one of them".into(),
            ));
        }
        (_, Some(path)) => PathBuf::from(path),
        (tun, None) => socket_path(tun.as_deref().unwrap_or(DEFAULT_TUN)),
    };
    let text = fetch(&path, &args)?;
    let reply =
        wire::parse(&text).map_err(|err| Error::Control(format!("{}: {err}", path.display())))?;
    let output = if args.json {
        render::json(&reply, args.top)
    } else {
        render::text(&reply, args.top)
    };
    // A closed pipe (`status | head`) is not worth an error.
    let _ = std::io::stdout().write_all(output.as_bytes());
    Ok(())
}

/// The whole reply of the proxy at `path`.
fn fetch(path: &Path, args: &StatusArgs) -> Result<String, Error> {
    let shown = path.display();
    let mut stream = UnixStream::connect(path).map_err(|err| {
        let hint = match err.kind() {
            ErrorKind::NotFound if args.control.is_none() => format!(
                " (is a proxy running with --tun {}? one started with --control PATH needs \
                 that --control here)",
                args.tun.as_deref().unwrap_or(DEFAULT_TUN)
            ),
            ErrorKind::PermissionDenied => {
                " (only the proxy's user and root may ask it)".to_string()
            }
            ErrorKind::ConnectionRefused => " (the proxy that made it is gone)".to_string(),
            _ => String::new(),
        };
        Error::Control(format!("cannot connect to {shown}: {err}{hint}"))
    })?;
    let io_error = |err: std::io::Error| {
        let why = match err.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                format!("no complete reply within {} s", TIMEOUT.as_secs())
            }
            _ => err.to_string(),
        };
        Error::Control(format!("{shown}: {why}"))
    };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io_error)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io_error)?;
    // A proxy that closed without reading what we sent (it refused us at once) resets
    // the connection: what came before that counts (the parser tells a whole reply from
    // a cut one; nothing at all is said below).
    let closed = |err: &std::io::Error| {
        matches!(
            err.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
        )
    };
    let mut bytes = Vec::new();
    match stream.write_all(STATUS_REQUEST) {
        Err(err) if closed(&err) => {}
        Err(err) => return Err(io_error(err)),
        Ok(()) => {
            // The timeout bounds the whole reply, not each read: a proxy (or whatever
            // listens there) trickling bytes cannot keep us waiting.
            let deadline = Instant::now() + TIMEOUT;
            let mut chunk = vec![0; 64 * 1024];
            while (bytes.len() as u64) < MAX_REPLY {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io_error(ErrorKind::TimedOut.into()));
                }
                stream.set_read_timeout(Some(left)).map_err(io_error)?;
                match stream.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                    Err(err) if err.kind() == ErrorKind::Interrupted => {}
                    Err(err) if closed(&err) => break,
                    Err(err) => return Err(io_error(err)),
                }
            }
        }
    }
    if bytes.is_empty() {
        return Err(Error::Control(format!(
            "{shown}: closed without a reply (the proxy serves only its own user and root, \
             and a few clients at a time)"
        )));
    }
    String::from_utf8(bytes)
        .map_err(|_| Error::Control(format!("{shown}: {}", wire::Error::NotStatus)))
}
