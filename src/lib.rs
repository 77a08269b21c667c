//! uringproxy as a library: the layers the binary runs, exposed for benchmarks.
#![deny(unsafe_code)]

pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod error;
pub mod event_loop;
pub mod flow;
pub mod logger;
pub mod routing;
pub mod stack;
pub mod stats;
pub mod sys;
pub mod tun;
pub mod uring;
pub mod wire;
