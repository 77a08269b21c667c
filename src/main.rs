//! uringproxy: parse the command line, validate it into a `Config`, run the proxy.
#![deny(unsafe_code)]

use std::process::ExitCode;

use uringproxy::{cli, config, demo, event_loop, logger};

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
