//! Service configuration: one [`Config`] with a section per pipeline stage.
//!
//! Loaded in layers by [`load`](fn@load): built-in defaults < the config file
//! (`config/canal-consumer.toml` when it exists, or the file given with `--config`, which must
//! exist) < environment < command-line flags ([`CliOverrides`]).
//!
//! Environment: the reference's `CANAL_HOST`, `CANAL_PORT`, `CANAL_DESTINATION` and
//! `CANAL_BATCH_SIZE`, and `CANAL_CONSUMER__<SECTION>__<KEY>` for every key (nested sections
//! with more `__`, e.g. `CANAL_CONSUMER__AMQP__QUEUE__NAME`). The prefixed form wins over the
//! reference form when both are set. Values are parsed like TOML scalars, except that keys
//! whose type is a string (passwords, ids, paths, durations) take the variable's text as is,
//! so `CANAL_CONSUMER__CANAL__PASSWORD=12345` is the string "12345". Empty variables count as
//! unset.
//!
//! Durations are humantime strings ("30s", "500ms"). Unknown keys are errors.
//!
//! How it fails: every problem is a [`ConfigError`] that names where the value came from (the
//! config file's path, the environment variable by its real name, the command-line flag) and
//! the key. Types refuse what they can at extraction: non-zero integers for ports, sizes and
//! counts, enums for fixed choices (`amqp.queue.queue_type`, `amqp.queue.declare`,
//! `log.format`). [`Config::validate`] adds the checks types cannot express: the AMQP URL
//! (scheme, port), addresses, durations, priorities, the log filter, and a `log.file` that is
//! a directory or cannot be written. Secrets ([`Secret`]) never print: not in `Debug`, not in
//! [`Config::to_redacted_toml`], not in error messages.

//!
//! Layout: [`schema`] (the sections, their defaults and enums), [`crate::secret`] ([`Secret`] and URL
//! redaction), [`cli`] (the command-line flags, declared once for clap and for the override
//! layer), [`load`](mod@load) (the layers and the translation of their errors), [`validate`] (the
//! checks types cannot express), [`error`] ([`ConfigError`], [`Origin`]).

pub mod cli;
pub mod error;
pub mod load;
pub mod schema;

#[cfg(test)]
mod tests;
pub mod validate;

pub use crate::secret::{Secret, redact_url, string_or_scalar};
pub use cli::{CanalFlags, CliOverrides, ServiceFlags};
pub use error::{ConfigError, Origin};
pub use load::{load, load_from};
pub use schema::*;

use std::path::Path;

/// The config file read when none is given and it exists.
pub const DEFAULT_FILE: &str = "config/canal-consumer.toml";

/// Prefix of the environment variables that set any key: `CANAL_CONSUMER__AMQP__URL`.
pub const ENV_PREFIX: &str = "CANAL_CONSUMER__";

/// The reference system's environment variables and the keys they set.
pub const REFERENCE_ENV: &[(&str, &str)] = &[
    ("CANAL_HOST", "canal.host"),
    ("CANAL_PORT", "canal.port"),
    ("CANAL_DESTINATION", "canal.destination"),
    ("CANAL_BATCH_SIZE", "canal.batch_size"),
];

/// Keys whose values are secrets: never echoed in errors.
const SECRET_KEYS: &[&str] = &[
    "canal.password",
    "canal.source_url",
    "amqp.url",
    "amqp.urls",
];

/// Load, validate and render the effective configuration (secrets redacted): what
/// `canal-consumer check-config` prints.
pub fn check(file: Option<&Path>) -> Result<String, ConfigError> {
    let config = load(file, CliOverrides::default())?;
    Ok(format!(
        "# canal-consumer effective configuration (file < environment < flags; secrets redacted)\n{}",
        config.to_redacted_toml()
    ))
}

impl Config {
    /// The configuration as TOML, secrets redacted (the AMQP URL keeps everything but its
    /// password). What `check-config` prints.
    pub fn to_redacted_toml(&self) -> String {
        let mut value = match toml::Value::try_from(self) {
            Ok(v) => v,
            Err(e) => return format!("# cannot render configuration: {e}\n"),
        };
        if let Some(t) = value.get_mut("canal").and_then(|v| v.as_table_mut()) {
            t.insert(
                "password".into(),
                toml::Value::String(self.canal.password.redacted()),
            );
            t.insert(
                "source_url".into(),
                toml::Value::String(self.canal.source_url.redacted()),
            );
        }
        if let Some(t) = value.get_mut("amqp").and_then(|v| v.as_table_mut()) {
            t.insert("url".into(), toml::Value::String(self.amqp.url.redacted()));
            if !self.amqp.urls.is_empty() {
                t.insert(
                    "urls".into(),
                    toml::Value::Array(
                        self.amqp
                            .urls
                            .iter()
                            .map(|u| toml::Value::String(u.redacted()))
                            .collect(),
                    ),
                );
            }
        }
        toml::to_string(&value).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}
