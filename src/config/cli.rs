//! The command-line flags that override the file and the environment.
//!
//! Each flag is declared once, in `flags!`: its field, type, the config key it sets and its
//! help text. The macro makes the clap argument group (used by `main.rs`'s subcommands as is)
//! and the list of `(key, flag, value)` the override layer merges, so a new flag cannot be
//! parsed and then forgotten, or named differently in errors. Secrets have no flag (they would
//! show in `ps`).

use figment::value::Value;
use std::path::PathBuf;

/// A flag's value as a figment value.
trait FlagValue {
    fn to_value(&self) -> Value;
}

impl FlagValue for String {
    fn to_value(&self) -> Value {
        Value::from(self.clone())
    }
}

impl FlagValue for PathBuf {
    fn to_value(&self) -> Value {
        Value::from(self.to_string_lossy().into_owned())
    }
}

impl FlagValue for u16 {
    fn to_value(&self) -> Value {
        Value::from(*self)
    }
}

impl FlagValue for i32 {
    fn to_value(&self) -> Value {
        Value::from(*self)
    }
}

/// `flags! { Group { field: Type => "config.key", "flag-name", [clap attrs]; ... } }`
macro_rules! flags {
    ($(
        $(#[$gm:meta])*
        $group:ident {
            $(
                $(#[doc = $doc:literal])*
                $field:ident : $ty:ty => $key:literal, $flag:literal $(, $arg:meta)* ;
            )*
        }
    )*) => {
        $(
            $(#[$gm])*
            #[derive(clap::Args, Debug, Clone, Default, PartialEq)]
            pub struct $group {
                $(
                    $(#[doc = $doc])*
                    #[doc = concat!("\n\nSets `", $key, "`.")]
                    #[arg(long = $flag $(, $arg)*)]
                    pub $field: Option<$ty>,
                )*
            }

            impl $group {
                /// `(key, flag, value)` for every flag that was given.
                fn entries(&self) -> Vec<(&'static str, &'static str, Value)> {
                    let mut out = Vec::new();
                    $(
                        if let Some(v) = &self.$field {
                            out.push(($key, concat!("--", $flag), FlagValue::to_value(v)));
                        }
                    )*
                    out
                }

                /// Every flag of the group: `(key, flag)`.
                pub fn keys() -> &'static [(&'static str, &'static str)] {
                    &[$(($key, concat!("--", $flag))),*]
                }
            }
        )*
    };
}

flags! {
    /// Where the Canal server is and how to fetch (`start`, `tail`, `check-config`).
    CanalFlags {
        /// Canal server host (env CANAL_HOST)
        host: String => "canal.host", "host";
        /// Canal server port (env CANAL_PORT)
        port: u16 => "canal.port", "port";
        /// Canal destination (env CANAL_DESTINATION)
        destination: String => "canal.destination", "destination";
        /// Canal GET size (env CANAL_BATCH_SIZE)
        batch_size: i32 => "canal.batch_size", "batch-size";
        /// Canal client id
        client_id: String => "canal.client_id", "client-id";
    }

    /// Where the service keeps its consumers, state, admin endpoint and logs.
    ServiceFlags {
        /// Directory of consumer definitions
        consumers_dir: PathBuf => "consumers.dir", "consumers-dir", value_name = "DIR";
        /// Where enable/disable state is kept
        state_file: PathBuf => "consumers.state_file", "state-file", value_name = "FILE";
        /// Admin endpoint address (host:port)
        admin_bind: String => "admin.bind", "admin-bind", value_name = "ADDR";
        /// Log filter, e.g. info or info,canal_consumer=debug
        log_level: String => "log.level", "log-level";
        /// Log format: text or json
        log_format: String => "log.format", "log-format";
        /// Also write logs to this file (e.g. logs/app.log)
        log_file: PathBuf => "log.file", "log-file", value_name = "FILE";
    }
}

/// Command-line flags that override the config file and the environment. `None` leaves the
/// key alone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CliOverrides {
    pub canal: CanalFlags,
    pub service: ServiceFlags,
}

impl CliOverrides {
    /// `(key, flag, value)` for every flag that was given.
    pub(crate) fn entries(&self) -> Vec<(&'static str, &'static str, Value)> {
        let mut out = self.canal.entries();
        out.extend(self.service.entries());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_sets_a_key_that_exists_in_the_config() {
        let defaults = toml::Value::try_from(super::super::Config::default()).unwrap();
        for (key, flag) in CanalFlags::keys().iter().chain(ServiceFlags::keys()) {
            let mut at = &defaults;
            let mut parts = key.split('.').peekable();
            while let Some(part) = parts.next() {
                match at.get(part) {
                    Some(v) => at = v,
                    // optional keys (log.file) are absent from the defaults: their section is not
                    None if parts.peek().is_none() && *key == "log.file" => break,
                    None => panic!("{flag} sets `{key}`, which is not a config key"),
                }
            }
        }
    }

    #[test]
    fn given_flags_become_entries_with_their_names() {
        let o = CliOverrides {
            canal: CanalFlags {
                port: Some(12000),
                ..Default::default()
            },
            service: ServiceFlags {
                log_file: Some(PathBuf::from("/tmp/x.log")),
                ..Default::default()
            },
        };
        let e = o.entries();
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].0, e[0].1), ("canal.port", "--port"));
        assert_eq!((e[1].0, e[1].1), ("log.file", "--log-file"));
    }
}
