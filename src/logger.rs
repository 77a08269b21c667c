//! A minimal stderr logger for the `log` facade; the level comes from RUST_LOG.

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        // smoltcp logs per packet at debug; only let it through when asked for trace.
        let ours = metadata.target().starts_with(env!("CARGO_CRATE_NAME"));
        metadata.level() <= log::max_level() && (ours || log::max_level() == LevelFilter::Trace)
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "uringproxy: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Parses a RUST_LOG value: a plain level name; anything else falls back to info.
pub fn level_from(value: Option<&str>) -> LevelFilter {
    value
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(LevelFilter::Info)
}

pub fn init() {
    let level = level_from(std::env::var("RUST_LOG").ok().as_deref());
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_defaults_to_info() {
        assert_eq!(level_from(None), LevelFilter::Info);
        assert_eq!(level_from(Some("nonsense")), LevelFilter::Info);
        assert_eq!(level_from(Some("debug")), LevelFilter::Debug);
        assert_eq!(level_from(Some(" WARN ")), LevelFilter::Warn);
    }
}
