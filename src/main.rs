//! uringproxy: parse the command line, validate it into a `Config`, run the proxy.
#![deny(unsafe_code)]

mod cli;
mod config;
mod demo;
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
    let demo = std::env::args().nth(1).as_deref() == Some("demo");
    let result = if demo {
        logger::init();
        demo::run()
    } else {
        let args: cli::Args = argh::from_env();
        logger::init();
        config::Config::from_args(args).and_then(event_loop::run)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("uringproxy: error: {err}");
            ExitCode::FAILURE
        }
    }
}
