//! What can be wrong with the configuration, and where a value came from.

use std::fmt;
use std::path::PathBuf;

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Defaults,
    File(PathBuf),
    /// An environment variable, by its real name.
    Env(String),
    /// A command-line flag, e.g. `--port`.
    Flag(String),
    /// Not known (a [`Config`](super::Config) checked on its own).
    Unknown,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Defaults => f.write_str("built-in defaults"),
            Origin::File(p) => write!(f, "config file {}", p.display()),
            Origin::Env(v) => write!(f, "environment variable {v}"),
            Origin::Flag(flag) => write!(f, "command-line flag {flag}"),
            Origin::Unknown => f.write_str("configuration"),
        }
    }
}

/// Everything that can be wrong with the configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {}: not found", path.display())]
    FileMissing { path: PathBuf },
    #[error("config file {}: cannot read: {message}", path.display())]
    FileUnreadable { path: PathBuf, message: String },
    #[error("config file {}: not valid TOML: {message}", path.display())]
    FileSyntax { path: PathBuf, message: String },
    #[error("{origin}: unknown key `{key}` (expected {expected})")]
    UnknownKey {
        origin: Origin,
        key: String,
        expected: String,
    },
    #[error("{origin}: key `{key}`: {message}")]
    Invalid {
        origin: Origin,
        key: String,
        message: String,
    },
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ConfigError>),
}

impl ConfigError {
    /// The individual problems.
    pub fn problems(&self) -> Vec<&ConfigError> {
        match self {
            ConfigError::Several(v) => v.iter().flat_map(|e| e.problems()).collect(),
            e => vec![e],
        }
    }

    pub(crate) fn from_list(mut v: Vec<ConfigError>) -> Option<ConfigError> {
        match v.len() {
            0 => None,
            1 => v.pop(),
            _ => Some(ConfigError::Several(v)),
        }
    }
}
