//! uringproxy: parse the command line, validate it into a `Config`, run the proxy (or
//! the demo, or the status client); every start-up error ends up as one
//! `uringproxy: error:` line.
#![deny(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

use uringproxy::cli::{self, Command};
use uringproxy::error::Error;
use uringproxy::{config, control, demo, event_loop, logger};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            logger::line(format_args!("error: {err}"));
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Error> {
    match cli::from_env()? {
        Command::Print(text) => {
            // A closed pipe (`--help | head`) is not worth a panic or an error.
            let _ = std::io::stdout().write_all(text.as_bytes());
            Ok(())
        }
        Command::Demo(args) => {
            logger::init(None);
            demo::run(args)
        }
        Command::Status(args) => control::client::run(args),
        Command::Run(args) => {
            logger::init(args.log_level);
            config::Config::from_args(*args).and_then(event_loop::run)
        }
    }
}
