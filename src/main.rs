//! uringproxy: parse the command line, validate it into a `Config`, run the proxy.
#![deny(unsafe_code)]

use std::process::ExitCode;

use uringproxy::{cli, config, demo, event_loop, logger};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = if args.get(1).map(String::as_str) == Some("demo") {
        let rest: Vec<&str> = args[2..].iter().map(String::as_str).collect();
        let demo_args =
            match <demo::Args as argh::FromArgs>::from_args(&["uringproxy", "demo"], &rest) {
                Ok(demo_args) => demo_args,
                Err(exit) => return cli::early_exit(exit),
            };
        logger::init(None);
        demo::run(demo_args)
    } else {
        let args: cli::Args = argh::from_env();
        logger::init(None);
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
