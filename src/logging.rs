//! Log setup: `tracing` events to stderr, and optionally to a file too.
//!
//! [`init`] installs the global subscriber from [`LogConfig`]: `text` (human, coloured when
//! stderr is a terminal) or `json` (one object per line) to stderr, plus, when `log.file` is
//! set, the same events to that file (e.g. `logs/app.log`, which the reference tails), written
//! by a background thread. The level is `log.level`, unless `RUST_LOG` is set, which wins.
//!
//! Row data never reaches the logs at the default level. Our own code logs events and messages
//! by position and id only; the one dependency that logs message bodies is lapin, which logs
//! every message the broker returns (unroutable, mandatory) with its whole body at WARN under
//! the target `lapin::returned_messages`. [`filter`] therefore adds
//! `lapin::returned_messages=error` to whatever filter is in force (`log.level` or `RUST_LOG`)
//! unless that filter names this target itself, e.g. `info,lapin::returned_messages=warn` to
//! see the bodies when debugging. Our publisher logs each return with its message id.
//!
//! Keep the returned [`LogGuard`] alive for the life of the process: dropping it flushes the
//! file writer. How it fails: an invalid filter, a log file that cannot be opened, or a
//! subscriber already installed is a [`LoggingError`]; nothing is installed then. (Loading the
//! configuration already refuses a `log.file` that is a directory or cannot be written, naming
//! where it was set; see `config::validate`.)

use crate::config::{LogConfig, LogFormat};
use std::path::PathBuf;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("log filter `{filter}` ({origin}) is invalid: {message}")]
    Filter {
        filter: String,
        origin: &'static str,
        message: String,
    },
    #[error("log.file {}: cannot open it for appending: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("logging is already initialised: {0}")]
    AlreadySet(String),
}

/// Flushes the file writer when dropped.
#[must_use = "dropping the guard stops file logging"]
pub struct LogGuard {
    _file: Option<tracing_appender::non_blocking::WorkerGuard>,
}

type BoxLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Log targets of dependencies that write message bodies (row data), held at ERROR unless a
/// filter names them. See the module docs.
pub const BODY_TARGETS: &[&str] = &["lapin::returned_messages"];

/// `filter` with every [`BODY_TARGETS`] entry it does not name held at ERROR.
pub fn with_privacy(filter: &str) -> String {
    let mut out = filter.trim().to_string();
    if out.is_empty() {
        return out; // EnvFilter's own default: ERROR only
    }
    for target in BODY_TARGETS {
        if !out.contains(target) {
            out.push(',');
            out.push_str(target);
            out.push_str("=error");
        }
    }
    out
}

/// The filter: `RUST_LOG` when set and not empty, else `level`; with [`with_privacy`].
pub fn filter(level: &str) -> Result<EnvFilter, LoggingError> {
    let (text, origin) = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => (v, "RUST_LOG"),
        _ => (level.to_string(), "log.level"),
    };
    EnvFilter::try_new(with_privacy(&text)).map_err(|e| LoggingError::Filter {
        filter: text,
        origin,
        message: e.to_string(),
    })
}

fn layer<W>(json: bool, ansi: bool, writer: W) -> BoxLayer
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(true);
    if json {
        fmt.json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed()
    } else {
        fmt.with_ansi(ansi).boxed()
    }
}

/// Install the global subscriber. See the module docs.
pub fn init(cfg: &LogConfig) -> Result<LogGuard, LoggingError> {
    let json = cfg.format == LogFormat::Json;
    let filter = filter(&cfg.level)?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut layers: Vec<BoxLayer> = vec![layer(json, ansi, std::io::stderr)];
    let mut guard = None;
    if let Some(path) = &cfg.file {
        let ferr = |source| LoggingError::File {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(ferr)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(ferr)?;
        let (writer, g) = tracing_appender::non_blocking(file);
        guard = Some(g);
        layers.push(layer(json, false, writer));
    }
    tracing_subscriber::registry()
        .with(layers)
        .with(filter)
        .try_init()
        .map_err(|e| LoggingError::AlreadySet(e.to_string()))?;
    Ok(LogGuard { _file: guard })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_targets_are_held_at_error_unless_named() {
        assert_eq!(with_privacy("info"), "info,lapin::returned_messages=error");
        assert_eq!(
            with_privacy("debug,lapin=trace"),
            "debug,lapin=trace,lapin::returned_messages=error"
        );
        assert_eq!(
            with_privacy("info,lapin::returned_messages=warn"),
            "info,lapin::returned_messages=warn"
        );
        assert_eq!(with_privacy(""), "");
    }

    #[test]
    fn a_bad_level_is_an_error() {
        if std::env::var("RUST_LOG").is_err() {
            assert!(matches!(
                filter("info,=[bad"),
                Err(LoggingError::Filter { .. })
            ));
        }
    }
}
