//! Signals arrive through the ring like any other event: blocked for the thread and
//! read from a signalfd. SIGUSR1 asks for the counters; SIGINT, SIGTERM, SIGHUP (the
//! terminal closing) and SIGQUIT stop the proxy the same clean way.

use std::os::fd::AsFd;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::error::Error;
use crate::uring::{Op, Region, Ring, Slice, Token};

/// Size of `struct signalfd_siginfo`.
const SIGINFO_LEN: usize = 128;

/// What a signal asks of the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Counters,
    Stop(Signal),
}

pub struct Signals {
    fd: SignalFd,
    /// One `signalfd_siginfo`, filled by the pending read.
    info: Region,
    armed: bool,
}

impl Signals {
    /// Blocks the signals for this thread (and the threads it starts) and opens the
    /// signalfd they are read from instead.
    pub fn new() -> Result<Signals, Error> {
        let mut mask = SigSet::empty();
        for signal in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
            Signal::SIGUSR1,
        ] {
            mask.add(signal);
        }
        mask.thread_block()
            .map_err(|err| Error::Io("block signals", err.into()))?;
        // Non-blocking: io_uring then reads it inline and polls, on kernels where the
        // signalfd does not say it can (6.1) as well, instead of a worker thread.
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(|err| Error::Io("create signalfd", err.into()))?;
        let info = Region::new(SIGINFO_LEN).ok_or_else(|| {
            Error::Io(
                "allocate the signal buffer",
                std::io::ErrorKind::OutOfMemory.into(),
            )
        })?;
        Ok(Signals {
            fd,
            info,
            armed: false,
        })
    }

    /// Keeps one read of the signalfd pending.
    pub fn arm(&mut self, ring: &mut Ring) {
        if !self.armed {
            let buf = Slice {
                region: self.info.clone(),
                range: 0..SIGINFO_LEN,
            };
            ring.read(self.fd.as_fd(), buf, Token::new(Op::Signal, 0, 0).encode());
            self.armed = true;
        }
    }

    /// The read completed with `result` (bytes or -errno).
    pub fn on_read(&mut self, result: i32) -> Option<Request> {
        self.armed = false;
        if result != SIGINFO_LEN as i32 {
            return None;
        }
        let signo = self.info.with_mut(0..4, |bytes| {
            i32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
        });
        match Signal::try_from(signo).ok()? {
            Signal::SIGUSR1 => Some(Request::Counters),
            signal => Some(Request::Stop(signal)),
        }
    }
}
