//! Log setup: `tracing` events to stderr, and optionally to a file too.
//!
//! [`init`] installs the global subscriber from [`LogConfig`]: `text` (human, coloured when
//! stderr is a terminal) or `json` (one object per line) to stderr, plus, when `log.file` is
//! set, the same events to that file (e.g. `logs/app.log`, which the reference tails), written
//! by a background thread. The level is `log.level`, unless `RUST_LOG` is set, which wins.
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

/// The filter: `RUST_LOG` when set and not empty, else `level`.
pub fn filter(level: &str) -> Result<EnvFilter, LoggingError> {
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(&v).map_err(|e| LoggingError::Filter {
            filter: v,
            origin: "RUST_LOG",
            message: e.to_string(),
        }),
        _ => EnvFilter::try_new(level).map_err(|e| LoggingError::Filter {
            filter: level.to_string(),
            origin: "log.level",
            message: e.to_string(),
        }),
    }
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
    fn a_bad_level_is_an_error() {
        if std::env::var("RUST_LOG").is_err() {
            assert!(matches!(
                filter("info,=[bad"),
                Err(LoggingError::Filter { .. })
            ));
        }
    }
}
