//! How the binary reports: the log subscriber (filter from `--log-level` or `RUST_LOG`, human
//! or JSON lines on stderr, colour only on a terminal) and an error as the one line the user
//! sees.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// The shape of each log line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event (timestamp, level, target, message, fields).
    #[default]
    Human,
    /// One JSON object per line, for cluster log pipelines.
    Json,
}

/// The filter when neither `--log-level` nor `RUST_LOG` names one. boringtun logs routine
/// session expiry at ERROR: keep its chatter out by default.
const DEFAULT_FILTER: &str = "info,boringtun=off";

/// The filter: `--log-level`, else a non-empty `RUST_LOG`, else [`DEFAULT_FILTER`]. A filter
/// that does not parse is an error rather than silently logging nothing.
pub fn filter(log_level: Option<&str>, rust_log: Option<&str>) -> anyhow::Result<EnvFilter> {
    // The filter's parse error repeats itself in its source chain: keep only its message.
    let parse = |what: &str, filter: &str| {
        EnvFilter::try_new(filter).map_err(|e| anyhow::anyhow!("bad {what} `{filter}`: {e}"))
    };
    match (log_level, rust_log) {
        (Some(level), _) => parse("--log-level", level),
        (None, Some(level)) if !level.is_empty() => parse("RUST_LOG", level),
        _ => Ok(EnvFilter::new(DEFAULT_FILTER)),
    }
}

/// Colour escapes only for a person at a terminal: a container's log file or a JSON pipeline
/// would keep them as garbage bytes.
pub fn use_ansi(format: LogFormat, stderr_is_terminal: bool) -> bool {
    format == LogFormat::Human && stderr_is_terminal
}

/// Logs to stderr in `format`, filtered as [`filter`] says.
pub fn init(log_level: Option<&str>, format: LogFormat) -> anyhow::Result<()> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = filter(log_level, rust_log.as_deref())?;
    let ansi = use_ansi(format, std::io::stderr().is_terminal());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

/// An error as the one line the user sees: the whole cause chain, joined with ": ".
pub fn one_line(err: &anyhow::Error) -> String {
    format!("{err:#}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_for_people_at_a_terminal() {
        assert!(use_ansi(LogFormat::Human, true));
        assert!(!use_ansi(LogFormat::Human, false));
        assert!(!use_ansi(LogFormat::Json, true));
        assert!(!use_ansi(LogFormat::Json, false));
    }

    #[test]
    fn filter_comes_from_the_flag_then_rust_log_then_the_default() {
        let shown = |f: EnvFilter| f.to_string();
        assert_eq!(shown(filter(Some("debug"), Some("warn")).unwrap()), "debug");
        assert_eq!(shown(filter(None, Some("warn")).unwrap()), "warn");
        assert_eq!(
            shown(filter(None, Some("")).unwrap()),
            shown(EnvFilter::new(DEFAULT_FILTER))
        );
        assert_eq!(
            shown(filter(None, None).unwrap()),
            shown(EnvFilter::new(DEFAULT_FILTER))
        );
        let err = filter(Some("=[bad"), None).unwrap_err();
        assert!(
            err.to_string().starts_with("bad --log-level `=[bad`"),
            "{err}"
        );
        let err = filter(None, Some("=[bad")).unwrap_err();
        assert!(err.to_string().starts_with("bad RUST_LOG"), "{err}");
    }

    #[test]
    fn errors_become_one_line() {
        let err = anyhow::anyhow!("inner\nsecond line").context("outer");
        assert_eq!(one_line(&err), "outer: inner second line");
    }
}
