//! Loading in layers: built-in defaults < the config file < environment < command-line flags,
//! each error translated to name the layer (file path, variable, flag) and the key.

use super::cli::CliOverrides;
use super::error::{ConfigError, Origin};
use super::schema::Config;
use super::{DEFAULT_FILE, ENV_PREFIX, REFERENCE_ENV, SECRET_KEYS};
use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Which layer set which key, to name the origin of a bad value. The layer that set a key last
/// (in merge order) is the one whose value was extracted.
#[derive(Debug, Default)]
struct Sources {
    file: Option<(PathBuf, BTreeSet<String>)>,
    env: BTreeMap<String, String>,
    cli: BTreeMap<String, String>,
}

impl Sources {
    fn origin(&self, key: &str) -> Origin {
        let hit = |k: &String| k == key || k.starts_with(&format!("{key}."));
        if let Some((_, flag)) = self.cli.iter().find(|(k, _)| hit(k)) {
            return Origin::Flag(flag.clone());
        }
        if let Some((_, var)) = self.env.iter().find(|(k, _)| hit(k)) {
            return Origin::Env(var.clone());
        }
        if let Some((path, keys)) = &self.file
            && keys.iter().any(hit)
        {
            return Origin::File(path.clone());
        }
        Origin::Defaults
    }
}

/// All leaf keys of a dict, dotted.
fn flatten(prefix: &str, dict: &Dict, out: &mut BTreeMap<String, Value>) {
    for (k, v) in dict {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Dict(_, d) if !d.is_empty() => flatten(&key, d, out),
            v => {
                out.insert(key, v.clone());
            }
        }
    }
}

/// Keys whose value is a string (taken verbatim from the environment).
fn string_keys() -> BTreeSet<String> {
    let mut all = BTreeMap::new();
    if let Ok(map) = Serialized::defaults(Config::default()).data()
        && let Some(d) = map.get(&Profile::Default)
    {
        flatten("", d, &mut all);
    }
    let mut keys: BTreeSet<String> = all
        .into_iter()
        .filter(|(_, v)| matches!(v, Value::String(..)))
        .map(|(k, _)| k)
        .collect();
    // Optional string fields, absent from the serialized defaults.
    keys.insert("log.file".into());
    keys
}

/// The environment layer: one provider for the reference variables and the prefixed ones.
struct EnvLayer {
    /// `(variable, key, value)`, in precedence order (later wins).
    vars: Vec<(String, String, Value)>,
}

impl EnvLayer {
    fn new(env: impl IntoIterator<Item = (String, String)>) -> Self {
        let strings = string_keys();
        let mut reference = Vec::new();
        let mut prefixed = Vec::new();
        for (name, raw) in env {
            if raw.is_empty() {
                continue;
            }
            let key = if let Some((_, key)) = REFERENCE_ENV.iter().find(|(v, _)| *v == name) {
                key.to_string()
            } else if let Some(rest) = name.strip_prefix(ENV_PREFIX) {
                rest.split("__")
                    .map(|s| s.to_ascii_lowercase())
                    .collect::<Vec<_>>()
                    .join(".")
            } else {
                continue;
            };
            let value = if strings.contains(&key) {
                Value::from(raw)
            } else {
                raw.parse::<Value>().unwrap_or_else(|e| match e {})
            };
            if name.starts_with(ENV_PREFIX) {
                prefixed.push((name, key, value));
            } else {
                reference.push((name, key, value));
            }
        }
        reference.sort_by(|a, b| a.0.cmp(&b.0));
        prefixed.sort_by(|a, b| a.0.cmp(&b.0));
        reference.extend(prefixed);
        EnvLayer { vars: reference }
    }
}

fn insert_path(dict: &mut Dict, path: &[&str], value: Value) {
    match path {
        [] => {}
        [leaf] => {
            dict.insert(leaf.to_string(), value);
        }
        [head, rest @ ..] => {
            let entry = dict
                .entry(head.to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, d) = entry {
                insert_path(d, rest, value);
            }
        }
    }
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable(s)")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (_, key, value) in &self.vars {
            let path: Vec<&str> = key.split('.').collect();
            insert_path(&mut dict, &path, value.clone());
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// The command-line layer.
struct CliLayer(Vec<(&'static str, &'static str, Value)>);

impl Provider for CliLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named("command-line flag(s)")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, _, value) in &self.0 {
            let path: Vec<&str> = key.split('.').collect();
            insert_path(&mut dict, &path, value.clone());
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// Load the configuration: defaults < `file` (or [`DEFAULT_FILE`] if it exists) < the process
/// environment < `overrides`, then [`Config::validate`].
pub fn load(file: Option<&Path>, overrides: CliOverrides) -> Result<Config, ConfigError> {
    load_from(file, Path::new(DEFAULT_FILE), std::env::vars(), overrides)
}

/// [`load`] with the default file and the environment given explicitly (tests, tools).
pub fn load_from(
    file: Option<&Path>,
    default_file: &Path,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: CliOverrides,
) -> Result<Config, ConfigError> {
    let mut sources = Sources::default();
    let mut figment = Figment::from(Serialized::defaults(Config::default()));

    let chosen = match file {
        Some(path) if !path.is_file() => {
            return Err(ConfigError::FileMissing {
                path: path.to_path_buf(),
            });
        }
        Some(path) => Some(path.to_path_buf()),
        None if default_file.is_file() => Some(default_file.to_path_buf()),
        None => None,
    };
    if let Some(path) = chosen {
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::FileUnreadable {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let dict = Toml::string(&text)
            .data()
            .map_err(|e| ConfigError::FileSyntax {
                path: path.clone(),
                message: toml_message(&e.kind.to_string()),
            })?
            .remove(&Profile::Default)
            .unwrap_or_default();
        let mut keys = BTreeMap::new();
        flatten("", &dict, &mut keys);
        sources.file = Some((path.clone(), keys.into_keys().collect()));
        figment = figment.merge(Toml::file_exact(&path));
    }

    let env = EnvLayer::new(env);
    for (var, key, _) in &env.vars {
        sources.env.insert(key.clone(), var.clone());
    }
    figment = figment.merge(env);

    let cli = CliLayer(overrides.entries());
    for (key, flag, _) in &cli.0 {
        sources.cli.insert(key.to_string(), flag.to_string());
    }
    figment = figment.merge(cli);

    let mut config: Config = figment.extract().map_err(|e| figment_error(e, &sources))?;
    // `max_priority = 0` is how a file (or CANAL_CONSUMER__AMQP__QUEUE__MAX_PRIORITY=0) says
    // "no x-max-priority": TOML has no null to unset the default with
    if config.amqp.queue.max_priority == Some(0) {
        config.amqp.queue.max_priority = None;
    }
    config.validate().map_err(|e| attribute(e, &sources))?;
    Ok(config)
}

/// A TOML parser message without its source excerpt (which could show a secret): keeps the
/// position and the explanation, drops the `N | text` and caret lines.
fn toml_message(raw: &str) -> String {
    raw.lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l
                    .trim_start_matches(|c: char| c.is_ascii_digit())
                    .trim_start()
                    .starts_with('|')
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Turn figment's errors into ours, naming the real origin of each key.
fn figment_error(err: figment::Error, sources: &Sources) -> ConfigError {
    let list = err
        .into_iter()
        .map(|e| {
            let mut path = e.path.clone();
            match &e.kind {
                figment::error::Kind::UnknownField(field, expected) => {
                    if path.last() != Some(field) {
                        path.push(field.clone());
                    }
                    let key = path.join(".");
                    ConfigError::UnknownKey {
                        origin: sources.origin(&key),
                        expected: if expected.is_empty() {
                            "no keys here".into()
                        } else {
                            expected
                                .iter()
                                .map(|k| format!("`{k}`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        },
                        key,
                    }
                }
                kind => {
                    let key = path.join(".");
                    let message = if SECRET_KEYS.iter().any(|s| key == *s) {
                        "invalid value (not shown: it is a secret)".to_string()
                    } else {
                        plain_message(kind.to_string())
                    };
                    let origin = if let Some(path) = e
                        .metadata
                        .as_ref()
                        .and_then(|m| m.source.as_ref()?.file_path())
                    {
                        Origin::File(path.to_path_buf())
                    } else {
                        sources.origin(&key)
                    };
                    ConfigError::Invalid {
                        origin,
                        key,
                        message,
                    }
                }
            }
        })
        .collect();
    ConfigError::from_list(list).unwrap_or(ConfigError::Invalid {
        origin: Origin::Unknown,
        key: String::new(),
        message: "unknown configuration error".into(),
    })
}

/// Serde's words for the non-zero integer types, said the way the rest of the checks say it:
/// a zero is "must be greater than 0"; anything else keeps serde's account of what was found.
fn plain_message(message: String) -> String {
    let Some(at) = message.find("expected a nonzero") else {
        return message;
    };
    if message.contains("`0`") || message.contains(" 0,") {
        return "must be greater than 0".into();
    }
    let wanted = if message[at..].contains("u16") {
        "expected a port number (1 to 65535)"
    } else {
        "expected a whole number greater than 0"
    };
    format!("{}{wanted}", &message[..at])
}

/// Fill in the origin of validation errors.
fn attribute(err: ConfigError, sources: &Sources) -> ConfigError {
    match err {
        ConfigError::Invalid {
            origin: Origin::Unknown,
            key,
            message,
        } => ConfigError::Invalid {
            origin: sources.origin(&key),
            key,
            message,
        },
        ConfigError::Several(v) => {
            ConfigError::Several(v.into_iter().map(|e| attribute(e, sources)).collect())
        }
        e => e,
    }
}
