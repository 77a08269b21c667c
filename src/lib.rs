//! uringproxy as a library: what the binary runs, plus the layers that benchmarks and
//! fuzz targets drive directly (wire, stack, flow, the ring's memory, control's parsers).
#![deny(unsafe_code)]

pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod error;
pub mod event_loop;
pub mod flow;
pub mod logger;
mod routing;
pub mod stack;
mod stats;
mod sys;
mod tun;
pub mod uring;
pub mod wire;
