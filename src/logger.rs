//! The stderr logger behind the `log` facade, filtered with env_logger's syntax (from
//! RUST_LOG, or one level from --log-level), and the path for replies to the user (the
//! counters SIGUSR1 asks for) that print whatever the level.

use std::fmt;
use std::io::Write;
use std::sync::OnceLock;

use log::{LevelFilter, Log, Metadata, Record};

/// This crate's log target and the root of its module targets (`uringproxy::...`).
const OURS: &str = env!("CARGO_CRATE_NAME");

/// Which records to print: a default level and levels for targets, as env_logger reads
/// `RUST_LOG` (comma-separated `LEVEL`, `TARGET` or `TARGET=LEVEL`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// For targets no directive names (info unless a bare level sets it).
    default: LevelFilter,
    /// Target and level, longest target first, so the most specific match wins.
    targets: Vec<(String, LevelFilter)>,
}

impl Filter {
    /// Every target at `level`.
    pub fn level(level: LevelFilter) -> Filter {
        Filter {
            default: level,
            targets: Vec::new(),
        }
    }

    /// Parses a RUST_LOG value; also returns the parts it did not understand, which
    /// are ignored (env_logger's `/REGEX` message filter among them).
    pub fn parse(spec: &str) -> (Filter, Vec<String>) {
        let mut filter = Filter::level(LevelFilter::Info);
        let mut ignored = Vec::new();
        let (directives, message_filter) = match spec.split_once('/') {
            Some((directives, regex)) => (directives, Some(regex)),
            None => (spec, None),
        };
        for part in directives.split(',').map(str::trim) {
            if part.is_empty() {
                continue;
            }
            let parsed = match part.split_once('=') {
                // A bare name is a level if it is one, otherwise a target with
                // everything enabled.
                None => match part.parse() {
                    Ok(level) => {
                        filter.default = level;
                        continue;
                    }
                    Err(_) => Some((part, LevelFilter::Trace)),
                },
                Some((target, "")) => Some((target.trim(), LevelFilter::Trace)),
                Some((target, level)) => level
                    .trim()
                    .parse()
                    .ok()
                    .map(|level| (target.trim(), level)),
            };
            match parsed {
                Some((target, level)) if !target.is_empty() => {
                    filter.targets.retain(|(known, _)| known != target);
                    filter.targets.push((target.to_string(), level));
                }
                _ => ignored.push(part.to_string()),
            }
        }
        if let Some(regex) = message_filter {
            ignored.push(format!("/{regex}"));
        }
        filter
            .targets
            .sort_by_key(|(target, _)| std::cmp::Reverse(target.len()));
        (filter, ignored)
    }

    /// The level records of `target` are printed up to.
    pub fn level_of(&self, target: &str) -> LevelFilter {
        let named = self.targets.iter().find(|(name, _)| {
            target
                .strip_prefix(name.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        });
        match named {
            Some(&(_, level)) => level,
            // Other crates' debug logs (smoltcp's are per packet) only when everything
            // is traced or their target is named.
            None if !is_ours(target) && self.default < LevelFilter::Trace => {
                self.default.min(LevelFilter::Info)
            }
            None => self.default,
        }
    }

    /// The most verbose level any target gets, for `log::set_max_level`.
    fn max(&self) -> LevelFilter {
        self.targets
            .iter()
            .map(|&(_, level)| level)
            .fold(self.default, Ord::max)
    }
}

fn is_ours(target: &str) -> bool {
    target
        .strip_prefix(OURS)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
}

/// `--log-level`'s value: one level name.
pub fn parse_level(text: &str) -> Result<LevelFilter, String> {
    text.parse()
        .map_err(|_| format!("'{text}' is not one of off, error, warn, info, debug, trace"))
}

struct StderrLogger {
    filter: Filter,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.filter.level_of(metadata.target())
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            let level = record.level().as_str().to_lowercase();
            line(format_args!("{level}: {}", record.args()));
        }
    }

    fn flush(&self) {}
}

/// Writes `uringproxy: {text}` to stderr. A closed stderr is no reason to panic.
pub fn line(text: fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "uringproxy: {text}");
}

/// Installs the logger: `level` (--log-level) if given, else RUST_LOG's filter, else
/// info. What RUST_LOG says that is not understood is named in one warning.
pub fn init(level: Option<LevelFilter>) {
    let filter = match (level, std::env::var("RUST_LOG")) {
        (Some(level), _) => Filter::level(level),
        (None, Ok(spec)) => {
            let (filter, ignored) = Filter::parse(&spec);
            if !ignored.is_empty() {
                line(format_args!(
                    "warn: RUST_LOG: ignoring {} (expected comma-separated LEVEL, TARGET or \
                     TARGET=LEVEL; LEVEL is off, error, warn, info, debug or trace)",
                    ignored
                        .iter()
                        .map(|part| format!("'{part}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            filter
        }
        (None, Err(_)) => Filter::level(LevelFilter::Info),
    };
    let max = filter.max();
    static LOGGER: OnceLock<StderrLogger> = OnceLock::new();
    let logger = LOGGER.get_or_init(|| StderrLogger { filter });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LevelFilter::{Debug, Info, Off, Trace, Warn};

    fn parse(spec: &str) -> Filter {
        let (filter, ignored) = Filter::parse(spec);
        assert!(ignored.is_empty(), "{spec:?}: ignored {ignored:?}");
        filter
    }

    #[test]
    fn a_bare_level_sets_the_default() {
        assert_eq!(parse(""), Filter::level(Info));
        assert_eq!(parse("debug"), Filter::level(Debug));
        assert_eq!(parse(" WARN "), Filter::level(Warn));
        assert_eq!(parse("off"), Filter::level(Off));
        assert_eq!(parse("debug").level_of("uringproxy::event_loop"), Debug);
    }

    #[test]
    fn targets_match_whole_module_path_segments() {
        let filter = parse("uringproxy=debug");
        assert_eq!(filter.level_of("uringproxy"), Debug);
        assert_eq!(filter.level_of("uringproxy::event_loop::report"), Debug);
        assert_eq!(filter.level_of("uringproxyd"), Info);
        assert_eq!(filter.level_of("smoltcp::iface"), Info);
        assert_eq!(filter.max(), Debug);
    }

    #[test]
    fn the_most_specific_target_wins_and_the_last_repeat_counts() {
        let filter = parse("warn,uringproxy=info,uringproxy::flow=trace,uringproxy=debug");
        assert_eq!(filter.level_of("uringproxy::flow::tcp"), Trace);
        assert_eq!(filter.level_of("uringproxy::stack"), Debug);
        assert_eq!(filter.level_of("uringproxy"), Debug);
        assert_eq!(filter.level_of("other"), Warn);
    }

    #[test]
    fn smoltcp_logs_per_packet_only_when_traced() {
        assert_eq!(parse("debug").level_of("smoltcp::iface"), Info);
        assert_eq!(parse("warn").level_of("smoltcp::iface"), Warn);
        assert_eq!(parse("trace").level_of("smoltcp::iface"), Trace);
        let both = parse("uringproxy=debug,smoltcp=trace");
        assert_eq!(both.level_of("smoltcp::socket::tcp"), Trace);
        assert_eq!(both.level_of("uringproxy::flow"), Debug);
        // A bare target enables everything for it, as with env_logger.
        assert_eq!(parse("smoltcp").level_of("smoltcp::iface"), Trace);
        assert_eq!(parse("smoltcp=").level_of("smoltcp"), Trace);
    }

    #[test]
    fn what_is_not_understood_is_returned_and_the_rest_applies() {
        let (filter, ignored) = Filter::parse("uringproxy=loud,debug,=info,a=b=c");
        assert_eq!(ignored, ["uringproxy=loud", "=info", "a=b=c"]);
        assert_eq!(filter, Filter::level(Debug));
        let (filter, ignored) = Filter::parse("uringproxy=debug/flow \\d+");
        assert_eq!(ignored, ["/flow \\d+"]);
        assert_eq!(filter.level_of("uringproxy"), Debug);
        // Everything after the first '/' is the message filter, commas included.
        let (filter, ignored) = Filter::parse("warn/a,b=c");
        assert_eq!(ignored, ["/a,b=c"]);
        assert_eq!(filter, Filter::level(Warn));
        // Spaces around a directive's parts do not count.
        assert_eq!(parse(" uringproxy = debug ").level_of("uringproxy"), Debug);
    }

    #[test]
    fn log_level_flag_takes_one_level_name() {
        assert_eq!(parse_level("Trace"), Ok(Trace));
        assert_eq!(parse_level("off"), Ok(Off));
        let err = parse_level("loud").unwrap_err();
        assert!(err.contains("'loud'") && err.contains("debug"), "{err}");
        assert!(parse_level("uringproxy=debug").is_err());
    }
}
