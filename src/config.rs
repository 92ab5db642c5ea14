//! Service configuration: one [`Config`] with a section per pipeline stage.
//!
//! Loaded in layers by [`load`]: built-in defaults < the config file
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
//! the key. [`Config::validate`] adds the semantic checks (ports, sizes, addresses) that types
//! cannot express. Secrets ([`Secret`]) never print: not in `Debug`, not in
//! [`Config::to_redacted_toml`], not in error messages.

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A string that never shows in logs, status output or errors.
///
/// Deserializes from a string, or from a number or boolean (taken as its text), so that a
/// numeric password in a TOML file or the environment is not a type error that would echo it.
#[derive(Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        string_or_scalar(d).map(Secret)
    }
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself; use only where it is sent to the peer that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// What may be shown: `""` when empty, a URL with its password replaced by `***`, or `***`.
    pub fn redacted(&self) -> String {
        if self.0.is_empty() {
            String::new()
        } else if self.0.contains("://") {
            redact_url(&self.0)
        } else {
            "***".into()
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

/// `scheme://user:pass@host/...` with the password replaced by `***`. Anything before the last
/// `@` is treated as credentials, so an odd URL is over-redacted rather than leaked; a user
/// without a password is shown as it is.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".into();
    };
    match rest.rfind('@') {
        None => url.to_string(),
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{}", &rest[at + 1..])
        }
    }
}

/// A string field that also accepts a number or a boolean (as its text): `client_id = 1001`.
pub fn string_or_scalar<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_char<E: serde::de::Error>(self, v: char) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub canal: CanalConfig,
    pub amqp: AmqpConfig,
    pub consumers: ConsumersConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
}

/// `[canal]`: the Canal server and the fetch loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CanalConfig {
    pub host: String,
    pub port: u16,
    pub destination: String,
    #[serde(deserialize_with = "string_or_scalar")]
    pub client_id: String,
    #[serde(deserialize_with = "string_or_scalar")]
    pub username: String,
    pub password: Secret,
    /// Canal GET size (KiB in Canal's default MEMSIZE batch mode, entries in ITEMSIZE mode).
    pub batch_size: i32,
    /// Extra Canal subscription filter ORed into the one built from consumer filters. Leave
    /// empty: the service subscribes to exactly what enabled consumers want.
    pub filter: String,
    #[serde(with = "humantime_serde")]
    pub fetch_wait: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    pub max_frame_bytes: usize,
    pub max_inflight_batches: usize,
    pub max_inflight_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
}

impl Default for CanalConfig {
    fn default() -> Self {
        CanalConfig {
            host: "127.0.0.1".into(),
            port: 11111,
            destination: "example".into(),
            client_id: "1001".into(),
            username: String::new(),
            password: Secret::default(),
            batch_size: 100,
            filter: String::new(),
            fetch_wait: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(3600),
            max_frame_bytes: crate::canal::codec::DEFAULT_MAX_FRAME_BYTES,
            max_inflight_batches: 8,
            max_inflight_bytes: 64 * 1024 * 1024,
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
        }
    }
}

impl CanalConfig {
    /// The connection actor settings for this section and a subscription filter.
    pub fn connection(&self, filter: String, fail_fast: bool) -> crate::canal::ConnectionConfig {
        crate::canal::ConnectionConfig {
            session: crate::canal::SessionConfig {
                host: self.host.clone(),
                port: self.port,
                destination: self.destination.clone(),
                client_id: self.client_id.clone(),
                username: self.username.clone(),
                password: self.password.expose().to_string(),
                connect_timeout: self.connect_timeout,
                read_timeout: self.read_timeout,
                idle_timeout: self.idle_timeout,
                max_frame_bytes: self.max_frame_bytes,
            },
            filter,
            fetch_size: self.batch_size,
            fetch_wait: self.fetch_wait,
            max_inflight_batches: self.max_inflight_batches,
            max_inflight_bytes: self.max_inflight_bytes,
            reconnect_min: self.reconnect_min,
            reconnect_max: self.reconnect_max,
            fail_fast,
        }
    }
}

/// `[amqp]`: the broker and the publisher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost`; the password part is redacted when shown.
    pub url: Secret,
    /// Most messages published but not yet confirmed.
    pub max_unconfirmed: usize,
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// The default queue, on the default exchange.
    pub queue: QueueConfig,
    /// AMQP priority for each task priority.
    pub priorities: PriorityMap,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            max_unconfirmed: 512,
            confirm_timeout: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            queue: QueueConfig::default(),
            priorities: PriorityMap::default(),
        }
    }
}

/// The worker queue, declared to match what the workers declare.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    pub name: String,
    /// `declare` (create if missing, fail if it differs), `passive` (must exist and match), or
    /// `none` (rely on mandatory returns).
    pub declare: DeclareMode,
    pub durable: bool,
    /// `x-max-priority`; must equal the workers' (Celery: `task_queue_max_priority`).
    pub max_priority: Option<u8>,
    /// `classic` or `quorum`.
    pub queue_type: String,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            name: "plugin_tasks".into(),
            declare: DeclareMode::Declare,
            durable: true,
            max_priority: Some(10),
            queue_type: "classic".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeclareMode {
    Declare,
    Passive,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PriorityMap {
    pub high: u8,
    pub normal: u8,
    pub low: u8,
}

impl Default for PriorityMap {
    fn default() -> Self {
        PriorityMap {
            high: 9,
            normal: 5,
            low: 1,
        }
    }
}

impl PriorityMap {
    pub fn get(&self, p: crate::trigger::Priority) -> u8 {
        match p {
            crate::trigger::Priority::High => self.high,
            crate::trigger::Priority::Normal => self.normal,
            crate::trigger::Priority::Low => self.low,
        }
    }
}

/// `[consumers]`: where consumer definitions live and how failing ones are supervised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumersConfig {
    /// Directory of consumer TOML files.
    pub dir: PathBuf,
    /// Enabled/disabled overrides written by `enable`/`disable`.
    pub state_file: PathBuf,
    #[serde(with = "humantime_serde")]
    pub restart_min: Duration,
    #[serde(with = "humantime_serde")]
    pub restart_max: Duration,
    /// Restarts within `quarantine_window` after which a consumer is quarantined.
    pub max_restarts: u32,
    #[serde(with = "humantime_serde")]
    pub quarantine_window: Duration,
}

impl Default for ConsumersConfig {
    fn default() -> Self {
        ConsumersConfig {
            dir: PathBuf::from("config/consumers"),
            state_file: PathBuf::from("state/consumers.json"),
            restart_min: Duration::from_millis(100),
            restart_max: Duration::from_secs(30),
            max_restarts: 5,
            quarantine_window: Duration::from_secs(300),
        }
    }
}

/// `[admin]`: the admin HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub enabled: bool,
    /// `host:port`; loopback by default.
    pub bind: String,
    /// Binding a non-loopback address needs this opt-in (see `admin::access`).
    pub allow_remote: bool,
    /// The admin token file; default `admin.token` beside `consumers.state_file`.
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            bind: "127.0.0.1:9090".into(),
            allow_remote: false,
            token_file: None,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// tracing filter, e.g. `info,canal_consumer=debug`; `RUST_LOG` wins when set.
    pub level: String,
    /// Also write to this file (e.g. `logs/app.log`).
    pub file: Option<PathBuf>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
            file: None,
        }
    }
}

/// `[shutdown]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long a graceful shutdown may take before it is forced (nothing unconfirmed is acked).
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            deadline: Duration::from_secs(30),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

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
const SECRET_KEYS: &[&str] = &["canal.password", "amqp.url"];

/// Command-line flags that override the config file and the environment. `None` leaves the
/// key alone. Secrets have no flag (they would show in `ps`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CliOverrides {
    /// `--host` → `canal.host`
    pub host: Option<String>,
    /// `--port` → `canal.port`
    pub port: Option<u16>,
    /// `--destination` → `canal.destination`
    pub destination: Option<String>,
    /// `--batch-size` → `canal.batch_size`
    pub batch_size: Option<i32>,
    /// `--client-id` → `canal.client_id`
    pub client_id: Option<String>,
    /// `--consumers-dir` → `consumers.dir`
    pub consumers_dir: Option<PathBuf>,
    /// `--state-file` → `consumers.state_file`
    pub state_file: Option<PathBuf>,
    /// `--admin-bind` → `admin.bind`
    pub admin_bind: Option<String>,
    /// `--log-level` → `log.level`
    pub log_level: Option<String>,
    /// `--log-format` → `log.format`
    pub log_format: Option<String>,
    /// `--log-file` → `log.file`
    pub log_file: Option<PathBuf>,
}

impl CliOverrides {
    /// `(key, flag, value)` for every flag that was given.
    fn entries(&self) -> Vec<(&'static str, &'static str, Value)> {
        fn path(p: &Path) -> Value {
            Value::from(p.to_string_lossy().into_owned())
        }
        let mut out = Vec::new();
        let mut put = |key, flag, v: Option<Value>| {
            if let Some(v) = v {
                out.push((key, flag, v));
            }
        };
        put("canal.host", "--host", self.host.clone().map(Value::from));
        put("canal.port", "--port", self.port.map(Value::from));
        put(
            "canal.destination",
            "--destination",
            self.destination.clone().map(Value::from),
        );
        put(
            "canal.batch_size",
            "--batch-size",
            self.batch_size.map(Value::from),
        );
        put(
            "canal.client_id",
            "--client-id",
            self.client_id.clone().map(Value::from),
        );
        put(
            "consumers.dir",
            "--consumers-dir",
            self.consumers_dir.as_deref().map(path),
        );
        put(
            "consumers.state_file",
            "--state-file",
            self.state_file.as_deref().map(path),
        );
        put(
            "admin.bind",
            "--admin-bind",
            self.admin_bind.clone().map(Value::from),
        );
        put(
            "log.level",
            "--log-level",
            self.log_level.clone().map(Value::from),
        );
        put(
            "log.format",
            "--log-format",
            self.log_format.clone().map(Value::from),
        );
        put("log.file", "--log-file", self.log_file.as_deref().map(path));
        out
    }
}

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Defaults,
    File(PathBuf),
    /// An environment variable, by its real name.
    Env(String),
    /// A command-line flag, e.g. `--port`.
    Flag(String),
    /// Not known (a [`Config`] checked on its own).
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

    fn from_list(mut v: Vec<ConfigError>) -> Option<ConfigError> {
        match v.len() {
            0 => None,
            1 => v.pop(),
            _ => Some(ConfigError::Several(v)),
        }
    }
}

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

    let config: Config = figment.extract().map_err(|e| figment_error(e, &sources))?;
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
                        kind.to_string()
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
    /// Semantic checks that types cannot express. Errors name the key; [`load`] adds where the
    /// value came from.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        let mut bad = |key: &str, message: String| {
            errs.push(ConfigError::Invalid {
                origin: Origin::Unknown,
                key: key.to_string(),
                message,
            })
        };
        let c = &self.canal;
        if c.host.trim().is_empty() {
            bad("canal.host", "must not be empty".into());
        }
        if c.port == 0 {
            bad("canal.port", "must be between 1 and 65535".into());
        }
        if c.destination.trim().is_empty() {
            bad("canal.destination", "must not be empty".into());
        }
        if c.client_id.trim().is_empty() {
            bad("canal.client_id", "must not be empty".into());
        }
        if c.batch_size <= 0 {
            bad(
                "canal.batch_size",
                format!("must be greater than 0, got {}", c.batch_size),
            );
        }
        for (key, v) in [
            ("canal.max_frame_bytes", c.max_frame_bytes),
            ("canal.max_inflight_batches", c.max_inflight_batches),
            ("canal.max_inflight_bytes", c.max_inflight_bytes),
            ("amqp.max_unconfirmed", self.amqp.max_unconfirmed),
        ] {
            if v == 0 {
                bad(key, "must be greater than 0".into());
            }
        }
        for (key, d) in [
            ("canal.connect_timeout", c.connect_timeout),
            ("canal.read_timeout", c.read_timeout),
            ("amqp.confirm_timeout", self.amqp.confirm_timeout),
            ("shutdown.deadline", self.shutdown.deadline),
        ] {
            if d.is_zero() {
                bad(key, "must be longer than 0s".into());
            }
        }
        for (min_key, min, max_key, max) in [
            (
                "canal.reconnect_min",
                c.reconnect_min,
                "canal.reconnect_max",
                c.reconnect_max,
            ),
            (
                "amqp.reconnect_min",
                self.amqp.reconnect_min,
                "amqp.reconnect_max",
                self.amqp.reconnect_max,
            ),
            (
                "consumers.restart_min",
                self.consumers.restart_min,
                "consumers.restart_max",
                self.consumers.restart_max,
            ),
        ] {
            if min > max {
                bad(
                    max_key,
                    format!(
                        "must not be shorter than {min_key} ({})",
                        humantime::format_duration(min)
                    ),
                );
            }
        }
        let url = self.amqp.url.expose();
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            bad(
                "amqp.url",
                "must start with amqp:// or amqps:// (value not shown)".into(),
            );
        }
        let q = &self.amqp.queue;
        if q.name.trim().is_empty() {
            bad("amqp.queue.name", "must not be empty".into());
        }
        if !matches!(q.queue_type.as_str(), "classic" | "quorum") {
            bad(
                "amqp.queue.queue_type",
                format!("must be `classic` or `quorum`, got `{}`", q.queue_type),
            );
        }
        if let Some(max) = q.max_priority {
            let p = &self.amqp.priorities;
            for (key, v) in [
                ("amqp.priorities.high", p.high),
                ("amqp.priorities.normal", p.normal),
                ("amqp.priorities.low", p.low),
            ] {
                if v > max {
                    bad(key, format!("{v} is above amqp.queue.max_priority ({max})"));
                }
            }
        }
        if self.admin.bind.parse::<std::net::SocketAddr>().is_err() {
            bad(
                "admin.bind",
                format!(
                    "`{}` is not an address like 127.0.0.1:9090",
                    self.admin.bind
                ),
            );
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            bad(
                "log.format",
                format!("must be `text` or `json`, got `{}`", self.log.format),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            bad("log.level", format!("not a valid filter: {e}"));
        }
        if self.consumers.max_restarts == 0 {
            bad("consumers.max_restarts", "must be greater than 0".into());
        }
        match ConfigError::from_list(errs) {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

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
        }
        if let Some(t) = value.get_mut("amqp").and_then(|v| v.as_table_mut()) {
            t.insert("url".into(), toml::Value::String(self.amqp.url.redacted()));
        }
        toml::to_string(&value).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let mut c = Config::default();
        c.canal.password = Secret::new("hunter2");
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"));
        assert!(!shown.contains("guest:guest"));
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let c = Config::default();
        let text = toml::to_string(&c).unwrap();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn nowhere() -> &'static Path {
        Path::new("/nonexistent/canal-consumer.toml")
    }

    #[test]
    fn layers_stack_defaults_file_env_cli() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            &dir,
            "c.toml",
            "[canal]\nhost = \"file-host\"\nport = 2000\ndestination = \"file-dest\"\n\
             batch_size = 7\nclient_id = 42\n[amqp]\nconfirm_timeout = \"3s\"\n",
        );
        // Defaults only.
        let c = load_from(None, nowhere(), env(&[]), CliOverrides::default()).unwrap();
        assert_eq!(c, Config::default());
        // File over defaults; a numeric client_id is read as its text.
        let c = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap();
        assert_eq!(c.canal.host, "file-host");
        assert_eq!(c.canal.port, 2000);
        assert_eq!(c.canal.client_id, "42");
        assert_eq!(c.amqp.confirm_timeout, Duration::from_secs(3));
        assert_eq!(c.amqp.max_unconfirmed, 512);
        // Env over file: reference names and the prefixed form (which wins over them).
        let vars = env(&[
            ("CANAL_HOST", "env-host"),
            ("CANAL_PORT", "3000"),
            ("CANAL_DESTINATION", "env-dest"),
            ("CANAL_BATCH_SIZE", "50"),
            ("CANAL_CONSUMER__CANAL__DESTINATION", "prefixed-dest"),
            ("CANAL_CONSUMER__AMQP__CONFIRM_TIMEOUT", "10s"),
            ("CANAL_CONSUMER__AMQP__QUEUE__NAME", "other_tasks"),
            ("CANAL_CONSUMER__LOG__FILE", "logs/app.log"),
            ("CANAL_CONSUMER__ADMIN__ENABLED", "false"),
            ("CANAL_UNRELATED", "x"),
            ("CANAL_CONSUMER__CANAL__USERNAME", ""),
        ]);
        let c = load_from(
            Some(&file),
            nowhere(),
            vars.clone(),
            CliOverrides::default(),
        )
        .unwrap();
        assert_eq!(c.canal.host, "env-host");
        assert_eq!(c.canal.port, 3000);
        assert_eq!(c.canal.destination, "prefixed-dest");
        assert_eq!(c.canal.batch_size, 50);
        assert_eq!(c.amqp.confirm_timeout, Duration::from_secs(10));
        assert_eq!(c.amqp.queue.name, "other_tasks");
        assert_eq!(c.log.file, Some(PathBuf::from("logs/app.log")));
        assert!(!c.admin.enabled);
        assert_eq!(c.canal.username, "");
        // CLI over env.
        let cli = CliOverrides {
            host: Some("cli-host".into()),
            port: Some(4000),
            batch_size: Some(9),
            admin_bind: Some("0.0.0.0:9191".into()),
            ..Default::default()
        };
        let c = load_from(Some(&file), nowhere(), vars, cli).unwrap();
        assert_eq!(c.canal.host, "cli-host");
        assert_eq!(c.canal.port, 4000);
        assert_eq!(c.canal.batch_size, 9);
        assert_eq!(c.canal.destination, "prefixed-dest");
        assert_eq!(c.admin.bind, "0.0.0.0:9191");
    }

    #[test]
    fn default_file_is_used_when_present_and_explicit_missing_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(&dir, "d.toml", "[canal]\ndestination = \"from-default\"\n");
        let c = load_from(None, &file, env(&[]), CliOverrides::default()).unwrap();
        assert_eq!(c.canal.destination, "from-default");
        let missing = dir.path().join("missing.toml");
        let err = load_from(Some(&missing), &file, env(&[]), CliOverrides::default()).unwrap_err();
        assert!(matches!(err, ConfigError::FileMissing { .. }), "{err}");
        assert!(err.to_string().contains("missing.toml"), "{err}");
    }

    #[test]
    fn numeric_env_values_fill_string_fields() {
        let vars = env(&[
            ("CANAL_CONSUMER__CANAL__PASSWORD", "12345"),
            ("CANAL_CONSUMER__CANAL__CLIENT_ID", "1002"),
            ("CANAL_CONSUMER__CANAL__USERNAME", "true"),
            ("CANAL_CONSUMER__AMQP__QUEUE__NAME", "[odd]"),
        ]);
        let c = load_from(None, nowhere(), vars, CliOverrides::default()).unwrap();
        assert_eq!(c.canal.password.expose(), "12345");
        assert_eq!(c.canal.client_id, "1002");
        assert_eq!(c.canal.username, "true");
        assert_eq!(c.amqp.queue.name, "[odd]");
    }

    #[test]
    fn numeric_secret_in_file_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(&dir, "c.toml", "[canal]\npassword = 98765\n");
        let c = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap();
        assert_eq!(c.canal.password.expose(), "98765");
    }

    #[test]
    fn unknown_key_in_file_names_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(&dir, "bad.toml", "[amqp]\nmax_unconfirmd = 5\n");
        let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("bad.toml"), "{text}");
        assert!(text.contains("amqp.max_unconfirmd"), "{text}");
        assert!(text.contains("unknown key"), "{text}");
        let file = write(&dir, "bad2.toml", "[amqq]\nx = 1\n");
        let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
        assert!(err.to_string().contains("bad2.toml"), "{err}");
        assert!(err.to_string().contains("`amqq`"), "{err}");
    }

    #[test]
    fn unknown_key_in_env_names_the_real_variable() {
        let vars = env(&[("CANAL_CONSUMER__AMQP__MAX_UNCONFIRMD", "5")]);
        let err = load_from(None, nowhere(), vars, CliOverrides::default()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("environment variable CANAL_CONSUMER__AMQP__MAX_UNCONFIRMD"),
            "{text}"
        );
        assert!(text.contains("amqp.max_unconfirmd"), "{text}");
    }

    #[test]
    fn wrong_type_names_origin_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(&dir, "t.toml", "[amqp]\nmax_unconfirmed = \"lots\"\n");
        let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("config file") && text.contains("t.toml"),
            "{text}"
        );
        assert!(text.contains("amqp.max_unconfirmed"), "{text}");

        let vars = env(&[("CANAL_CONSUMER__AMQP__MAX_UNCONFIRMED", "lots")]);
        let err = load_from(Some(&file), nowhere(), vars, CliOverrides::default()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("environment variable CANAL_CONSUMER__AMQP__MAX_UNCONFIRMED"),
            "{text}"
        );
        assert!(!text.contains("AMQP.MAX_UNCONFIRMED\""), "{text}");
        assert!(text.contains("`amqp.max_unconfirmed`"), "{text}");

        let vars = env(&[("CANAL_PORT", "eleven")]);
        let err = load_from(None, nowhere(), vars, CliOverrides::default()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("environment variable CANAL_PORT"), "{text}");
        assert!(text.contains("canal.port"), "{text}");
    }

    #[test]
    fn bad_duration_names_origin_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(&dir, "d.toml", "[shutdown]\ndeadline = \"5 fortnights\"\n");
        let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("d.toml") && text.contains("shutdown.deadline"),
            "{text}"
        );
        let file = write(&dir, "e.toml", "[shutdown]\ndeadline = 30\n");
        let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
        assert!(err.to_string().contains("shutdown.deadline"), "{err}");

        let vars = env(&[("CANAL_CONSUMER__AMQP__CONFIRM_TIMEOUT", "soon")]);
        let err = load_from(None, nowhere(), vars, CliOverrides::default()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("CANAL_CONSUMER__AMQP__CONFIRM_TIMEOUT")
                && text.contains("amqp.confirm_timeout"),
            "{text}"
        );
    }

    #[test]
    fn toml_syntax_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(&dir, "s.toml", "[canal\nhost = 1\n");
        let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
        assert!(matches!(err, ConfigError::FileSyntax { .. }), "{err}");
        assert!(err.to_string().contains("s.toml"), "{err}");
        // The parser's excerpt of the bad line is not repeated: it could hold a secret.
        let file = write(&dir, "p.toml", "[canal]\npassword = \"hunter2\n");
        let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("p.toml") && text.contains("line 2"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn validation_errors_name_origin_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(&dir, "v.toml", "[canal]\nmax_inflight_batches = 0\n");
        let vars = env(&[("CANAL_BATCH_SIZE", "0")]);
        let cli = CliOverrides {
            port: Some(0),
            admin_bind: Some("nowhere".into()),
            ..Default::default()
        };
        let err = load_from(Some(&file), nowhere(), vars, cli).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems().len(), 4, "{text}");
        assert!(
            text.contains("command-line flag --port: key `canal.port`"),
            "{text}"
        );
        assert!(
            text.contains("environment variable CANAL_BATCH_SIZE: key `canal.batch_size`"),
            "{text}"
        );
        assert!(
            text.contains("v.toml: key `canal.max_inflight_batches`"),
            "{text}"
        );
        assert!(
            text.contains("command-line flag --admin-bind: key `admin.bind`"),
            "{text}"
        );
    }

    #[test]
    fn secrets_stay_out_of_errors_and_rendering() {
        let vars = env(&[
            (
                "CANAL_CONSUMER__AMQP__URL",
                "amqp://bob:s3cret@rabbit:5672/%2f",
            ),
            ("CANAL_CONSUMER__CANAL__PASSWORD", "hunter2"),
        ]);
        let c = load_from(None, nowhere(), vars, CliOverrides::default()).unwrap();
        let shown = c.to_redacted_toml();
        assert!(
            !shown.contains("s3cret") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert!(shown.contains("amqp://bob:***@rabbit:5672/%2f"), "{shown}");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cret") && !dbg.contains("hunter2"), "{dbg}");
        // The rendering is itself a valid config once the secrets are put back.
        let back: Config = toml::from_str(&shown).unwrap();
        assert_eq!(back.canal.host, c.canal.host);

        let vars = env(&[("CANAL_CONSUMER__AMQP__URL", "http://bob:s3cret@x/")]);
        let err = load_from(None, nowhere(), vars, CliOverrides::default()).unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(err.to_string().contains("amqp.url"), "{err}");
    }

    #[test]
    fn redact_url_shapes() {
        assert_eq!(redact_url("amqp://u:p@h:1/v"), "amqp://u:***@h:1/v");
        assert_eq!(redact_url("amqp://u:p@ss@h/v"), "amqp://u:***@h/v");
        assert_eq!(redact_url("amqp://h:5672/v"), "amqp://h:5672/v");
        assert_eq!(redact_url("garbage"), "***");
        assert_eq!(
            redact_url("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqps://u:p@ss@host/"), "amqps://u:***@host/");
        assert_eq!(redact_url("amqp://host:5672"), "amqp://host:5672");
        assert_eq!(redact_url("amqp://user@host"), "amqp://user@host");
    }

    #[test]
    fn shipped_config_files_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        // The documented example holds exactly the defaults, except the credentials of the
        // local Canal server that deploy/local/up starts.
        let example = root.join("config/canal-consumer.toml");
        let c = load_from(Some(&example), nowhere(), env(&[]), CliOverrides::default()).unwrap();
        let mut expected = Config::default();
        expected.canal.username = "canal".into();
        expected.canal.password = Secret::new("canal");
        assert_eq!(c, expected);
        // The compose deployment: its config file with its env file.
        let compose = root.join("deploy/canal-consumer.compose.toml");
        let env_file = std::fs::read_to_string(root.join("deploy/compose.env")).unwrap();
        let vars: Vec<(String, String)> = env_file
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .map(|l| {
                let (k, v) = l.split_once('=').expect("KEY=VALUE");
                (k.trim().to_string(), v.trim().to_string())
            })
            .collect();
        assert!(vars.iter().any(|(k, _)| k == "CANAL_HOST"));
        let c = load_from(Some(&compose), nowhere(), vars, CliOverrides::default()).unwrap();
        assert_eq!(c.canal.host, "canal-server");
        assert_eq!(c.admin.bind, "0.0.0.0:9090");
        assert!(c.amqp.url.expose().contains("@rabbitmq:5672"));
        // The Kubernetes ConfigMap's embedded file, with the Secret's variables.
        let cm = std::fs::read_to_string(root.join("deploy/k8s/configmap.yaml")).unwrap();
        let start = cm.find("canal-consumer.toml: |").expect("config key") + 1;
        let toml_text: String = cm[start..]
            .lines()
            .skip(1)
            .take_while(|l| l.is_empty() || l.starts_with("    "))
            .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let file = write(&dir, "k8s.toml", &toml_text);
        let vars = env(&[
            (
                "CANAL_CONSUMER__AMQP__URL",
                "amqp://canal:x@rabbitmq:5672/%2f",
            ),
            ("CANAL_CONSUMER__CANAL__USERNAME", ""),
            ("CANAL_DESTINATION", "example"),
        ]);
        let c = load_from(Some(&file), nowhere(), vars, CliOverrides::default()).unwrap();
        assert_eq!(c.canal.host, "canal-server");
        assert_eq!(
            c.consumers.state_file,
            Path::new("/var/lib/canal-consumer/consumers.json")
        );
    }
}
