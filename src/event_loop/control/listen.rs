//! The control socket's file and the metrics endpoint's listening socket, made before
//! the privileges go: the socket file 0600 (its default directory 0700) and both owned
//! by the user the proxy will run as; a stale file of a killed proxy replaced, a live
//! one refused; the file removed again when the proxy is done with it.

use std::fs;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, lchown};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, warn};
use nix::sys::stat::Mode;
use nix::unistd::User;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::config::ControlSocket;
use crate::error::Error;

/// Connections waiting to be accepted; more are refused by the kernel.
const BACKLOG: i32 = 16;
/// A killed proxy's socket still takes connections for a moment after its process is
/// gone (measured: 20 ms; the kernel tears its ring down afterwards, with the accept
/// that holds the socket): one counts as live only if it keeps taking them this long.
const LIVE_FOR: Duration = Duration::from_secs(1);
const LIVE_RECHECK: Duration = Duration::from_millis(50);

/// The control socket's file: removed when dropped, if it is still the one we made.
pub struct SocketFile {
    path: PathBuf,
    identity: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.identity);
        if ours && let Err(err) = fs::remove_file(&self.path) {
            debug!("cannot remove {}: {err}", self.path.display());
        }
    }
}

fn failed(what: &str, path: &Path, err: impl std::fmt::Display) -> Error {
    Error::Control(format!("{what} {}: {err}", path.display()))
}

/// Listens on the control socket `config` names, for `owner` (the `--user`, else us).
pub fn control_socket(
    config: &ControlSocket,
    owner: Option<&User>,
) -> Result<(Socket, SocketFile), Error> {
    let path = &config.path;
    // Never through a symbolic link: the owner-to-be can write in the directory, so it
    // could swap the socket for a link to a file of root's between the bind and this.
    let chown = |path: &Path| match owner {
        Some(user) => lchown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .map_err(|err| failed("cannot hand to --user", path, err)),
        None => Ok(()),
    };
    if config.owns_dir
        && let Some(dir) = path.parent()
    {
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(err) if err.kind() == ErrorKind::AlreadyExists => {}
            Err(err) => return Err(failed("cannot create", dir, err)),
        }
        let meta = fs::symlink_metadata(dir).map_err(|err| failed("cannot see", dir, err))?;
        if !meta.is_dir() {
            return Err(failed("cannot use", dir, "not a directory"));
        }
        // The directory is shared by every proxy on the host, and its owner could swap
        // their sockets: it belongs to root, or to one `--user` at a time. A proxy
        // running as root takes it back (a `--user` proxy still running then cannot
        // remove its socket at exit, which its next start replaces as stale).
        let owner_uid = owner.map_or(0, |user| user.uid.as_raw());
        if meta.uid() != 0 && meta.uid() != owner_uid && owner_uid != 0 {
            return Err(failed(
                "cannot use",
                dir,
                format_args!(
                    "it belongs to uid {}, the --user of another proxy; pass --control PATH",
                    meta.uid()
                ),
            ));
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|err| failed("cannot restrict", dir, err))?;
        if owner.is_none() && meta.uid() != 0 {
            nix::unistd::chown(dir, Some(0.into()), Some(0.into()))
                .map_err(|err| failed("cannot take back", dir, err))?;
        }
        chown(dir)?;
    }
    replace_stale(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)
        .map_err(|err| failed("cannot create the control socket", path, err))?;
    let address = SockAddr::unix(path).map_err(|err| failed("bad control socket", path, err))?;
    // Made 0600 by the umask rather than a chmod after the bind, which would follow a
    // link swapped in for the socket. Set-up runs on the one thread there is.
    let umask = nix::sys::stat::umask(Mode::from_bits_truncate(0o177));
    let bound = socket.bind(&address);
    nix::sys::stat::umask(umask);
    bound.map_err(|err| failed("cannot create the control socket", path, err))?;
    let meta = fs::symlink_metadata(path).map_err(|err| failed("cannot see", path, err))?;
    // From here on the file goes again should set-up fail.
    let file = SocketFile {
        path: path.clone(),
        identity: (meta.dev(), meta.ino()),
    };
    chown(path)?;
    socket
        .listen(BACKLOG)
        .map_err(|err| failed("cannot listen on", path, err))?;
    Ok((socket, file))
}

/// Removes what a killed proxy left at `path` (a socket nobody listens on); refuses a
/// socket a running proxy serves, and anything that is not a socket.
fn replace_stale(path: &Path) -> Result<(), Error> {
    match fs::symlink_metadata(path) {
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(failed("cannot see", path, err)),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(failed("cannot use", path, "it exists and is not a socket"));
        }
        Ok(_) => {}
    }
    let live_until = Instant::now() + LIVE_FOR;
    loop {
        match UnixStream::connect(path) {
            Ok(_) if Instant::now() >= live_until => {
                return Err(Error::Control(format!(
                    "control socket {} is in use by a running proxy: stop it, or give this \
                     one another --tun, or --control PATH (or none)",
                    path.display()
                )));
            }
            Ok(_) => std::thread::sleep(LIVE_RECHECK),
            Err(err) if err.kind() == ErrorKind::ConnectionRefused => {
                debug!("replacing the stale control socket {}", path.display());
                return fs::remove_file(path).map_err(|err| failed("cannot replace", path, err));
            }
            Err(err) => return Err(failed("cannot check", path, err)),
        }
    }
}

/// Listens for metrics scrapes at `addr`; returns the address it got (port 0 asks the
/// kernel for one).
pub fn metrics_socket(addr: SocketAddr) -> Result<(Socket, SocketAddr), Error> {
    let fail = |err: std::io::Error| Error::Control(format!("--metrics {addr}: {err}"));
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )
    .map_err(fail)?;
    // A restart must not wait for the last run's connections in TIME-WAIT.
    socket.set_reuse_address(true).map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    socket.listen(BACKLOG).map_err(fail)?;
    let local = socket
        .local_addr()
        .map_err(fail)?
        .as_socket()
        .unwrap_or(addr);
    if !addr.ip().is_loopback() {
        warn!(
            "metrics at http://{local}/metrics are served to anyone who can reach that \
             address (flow counts, traffic volumes); a loopback address keeps them local"
        );
    }
    Ok((socket, local))
}
