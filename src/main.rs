//! uringproxy: parse the command line, validate it into a `Config`, run the proxy.
#![deny(unsafe_code)]

mod cli;
mod config;
mod error;
mod event_loop;
mod logger;
mod relay;
mod stack;
mod stats;
mod sys;
mod tun;
mod uring;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: cli::Args = argh::from_env();
    logger::init();
    match config::Config::from_args(args).and_then(event_loop::run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("uringproxy: error: {err}");
            ExitCode::FAILURE
        }
    }
}
