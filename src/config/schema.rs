//! The configuration's shape: one [`Config`] with a section per pipeline stage, each with its
//! defaults. Types carry what they can (enums for fixed choices, non-zero integers where zero
//! is meaningless); `validate.rs` checks the rest.

use crate::secret::{Secret, string_or_scalar};
use serde::{Deserialize, Serialize};
use std::num::{NonZeroU16, NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

/// A non-zero literal for defaults (zero is a compile error).
const fn nz(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(v) => v,
        None => panic!("zero"),
    }
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
    pub backfill: BackfillConfig,
    pub heartbeat: HeartbeatConfig,
}

/// `[canal]`: the Canal server and the fetch loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CanalConfig {
    pub host: String,
    pub port: NonZeroU16,
    pub destination: String,
    #[serde(deserialize_with = "string_or_scalar")]
    pub client_id: String,
    #[serde(deserialize_with = "string_or_scalar")]
    pub username: String,
    pub password: Secret,
    /// Canal GET size: KiB in Canal's default MEMSIZE batch mode (sent as that many
    /// `mem_unit`s), entries in ITEMSIZE mode.
    pub batch_size: i32,
    /// Bytes in one of Canal's MEMSIZE units: the server's
    /// `canal.instance.memory.buffer.memunit` (Canal's default 1024). Canal counts GET sizes
    /// in these units and answers a long poll once one unit of changes exists, so a unit
    /// smaller than a one-row transaction (128) lets a quiet table's change end the poll.
    pub mem_unit: u32,
    /// Extra Canal subscription filter ORed into the one built from consumer filters. Leave
    /// empty: the service subscribes to exactly what enabled consumers want.
    pub filter: String,
    /// The rewind guard: keep the newest confirmed position (in a file beside
    /// `consumers.state_file`) and ack without delivering what Canal sends again at or before
    /// it, as after a Canal restart from a cursor older than our last ack. Turn it off (or
    /// delete that file while the service is stopped) to replay on purpose by moving Canal's
    /// cursor back. The file also keeps where the deliveries not yet acked ended, so that after
    /// a restart rows Canal sends again come in the same bulk messages.
    pub rewind_guard: bool,
    /// How long an idle long poll (the GET after one that found nothing) waits on the server;
    /// GETs while rows flow never wait (`canal::window::GetMode`).
    #[serde(with = "humantime_serde")]
    pub fetch_wait: Duration,
    /// Caught up with batches in flight, how long the long poll waits for their acks before it
    /// goes out without them (at most `fetch_wait`). An ack written behind a long poll takes
    /// effect only when Canal answers the poll; rows fetched meanwhile wait for this. Short, so
    /// that a batch whose confirms take long (a backfill chunk's rows) does not hold up the
    /// live rows behind it; confirms of live batches are typically a millisecond away.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    pub max_frame_bytes: NonZeroUsize,
    pub max_inflight_batches: NonZeroUsize,
    pub max_inflight_bytes: NonZeroUsize,
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// ZooKeeper connect string (`host:port,host:port`). Empty: the simple mode, `host`/`port`.
    /// Set: the Canal server is the one ZooKeeper says runs `destination`, and replicas of the
    /// service run active/standby (see `crate::ha`); `host`/`port` are then unused.
    pub zk_servers: String,
    /// Canal's root path in ZooKeeper.
    pub zk_root: String,
    /// The ZooKeeper session timeout (the server may clamp it): how long a replica that died
    /// keeps the destination before a standby takes over.
    #[serde(with = "humantime_serde")]
    pub zk_session_timeout: Duration,
    /// The destination's `canal.instance.connectionCharset`: `UTF-8` (Canal decodes text, and
    /// non-UTF-8 columns lose their non-ASCII characters inside Canal) or `ISO-8859-1` (Canal
    /// ships text as raw bytes and the service decodes each column with its own charset, read
    /// from `source_url`; database and table names must then be ASCII). docs/types.md.
    pub connection_charset: ConnectionCharset,
    /// `mysql://user:password@host:port` of the database Canal reads, for column charsets
    /// (`information_schema`); required with `connection_charset = "ISO-8859-1"`.
    pub source_url: Secret,
    /// `connection_charset = "UTF-8"` only: what to do with a row whose text arrived with
    /// U+FFFD, the mark of a non-UTF-8 column Canal decoded lossily (`crate::canal::lossy`):
    /// `deliver` it as it is (counted, warned once per column; the default) or `park` it in
    /// the dead-letter queue instead of delivering changed data.
    pub on_lossy_text: crate::canal::lossy::OnLossyText,
}

/// `canal.connection_charset`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectionCharset {
    #[default]
    #[serde(rename = "UTF-8", alias = "utf-8", alias = "UTF8", alias = "utf8")]
    Utf8,
    #[serde(
        rename = "ISO-8859-1",
        alias = "iso-8859-1",
        alias = "ISO_8859_1",
        alias = "latin1"
    )]
    Iso8859_1,
}

impl Default for CanalConfig {
    fn default() -> Self {
        CanalConfig {
            host: "127.0.0.1".into(),
            port: NonZeroU16::new(11111).expect("non-zero"),
            destination: "example".into(),
            client_id: "1001".into(),
            username: String::new(),
            password: Secret::default(),
            batch_size: 100,
            mem_unit: 1024,
            filter: String::new(),
            rewind_guard: true,
            fetch_wait: Duration::from_millis(100),
            ack_wait: Duration::from_millis(5),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(3600),
            max_frame_bytes: nz(crate::canal::codec::DEFAULT_MAX_FRAME_BYTES),
            max_inflight_batches: nz(128),
            max_inflight_bytes: nz(2 * 1024 * 1024),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            zk_servers: String::new(),
            zk_root: "/otter/canal".into(),
            zk_session_timeout: Duration::from_secs(10),
            connection_charset: ConnectionCharset::Utf8,
            source_url: Secret::default(),
            on_lossy_text: crate::canal::lossy::OnLossyText::Deliver,
        }
    }
}

impl CanalConfig {
    /// The lossy-text check of UTF-8 mode (`on_lossy_text`), or None in raw text mode, where
    /// the service decodes text itself and a U+FFFD is data.
    pub fn lossy_text_check(&self) -> Option<crate::canal::lossy::OnLossyText> {
        match self.connection_charset {
            ConnectionCharset::Utf8 => Some(self.on_lossy_text),
            ConnectionCharset::Iso8859_1 => None,
        }
    }

    /// ZooKeeper mode settings, or None in the simple mode.
    pub fn ha(&self) -> Option<crate::ha::HaConfig> {
        if self.zk_servers.trim().is_empty() {
            return None;
        }
        Some(crate::ha::HaConfig {
            servers: self.zk_servers.trim().to_string(),
            root: self.zk_root.trim_end_matches('/').to_string(),
            destination: self.destination.clone(),
            client_id: self.client_id.clone(),
            address: crate::ha::default_address(),
            session_timeout: self.zk_session_timeout,
        })
    }

    /// What identifies the Canal client for the per-host instance lock: the server (or the
    /// ZooKeeper ensemble and root in ZooKeeper mode), destination and client id.
    pub fn lock_server(&self) -> String {
        if self.zk_servers.trim().is_empty() {
            format!("{}:{}", self.host, self.port)
        } else {
            format!("zk-{}{}", self.zk_servers.trim(), self.zk_root)
        }
    }

    /// The GET size in Canal's units: `batch_size` KiB as `mem_unit`s, rounded up (entries in
    /// ITEMSIZE mode, where `mem_unit` stays 1024). Validation keeps it within `i32`.
    pub fn fetch_units(&self) -> i32 {
        let bytes = u64::try_from(self.batch_size).unwrap_or(0) * 1024;
        let units = bytes.div_ceil(u64::from(self.mem_unit.max(1)));
        units.clamp(1, i32::MAX as u64) as i32
    }

    /// The connection actor settings for this section and a subscription filter.
    pub fn connection(&self, filter: String, fail_fast: bool) -> crate::canal::ConnectionConfig {
        crate::canal::ConnectionConfig {
            session: crate::canal::SessionConfig {
                host: self.host.clone(),
                port: self.port.get(),
                destination: self.destination.clone(),
                client_id: self.client_id.clone(),
                username: self.username.clone(),
                password: self.password.expose().to_string(),
                connect_timeout: self.connect_timeout,
                read_timeout: self.read_timeout,
                idle_timeout: self.idle_timeout,
                max_frame_bytes: self.max_frame_bytes.get(),
            },
            core: crate::canal::connection::CoreConfig {
                server: format!("{}:{}", self.host, self.port.get()),
                destination: self.destination.clone(),
                client_id: self.client_id.clone(),
                filter,
                fetch_size: self.fetch_units(),
                mem_unit: self.mem_unit,
                fetch_wait: self.fetch_wait,
                ack_wait: self.ack_wait.min(self.fetch_wait),
                max_inflight_batches: self.max_inflight_batches.get(),
                max_inflight_bytes: self.max_inflight_bytes.get(),
                reconnect_min: self.reconnect_min,
                reconnect_max: self.reconnect_max,
                fail_fast,
                jitter_seed: 0,
            },
            lease: None,
            confirmed_file: None,
            text: match self.connection_charset {
                ConnectionCharset::Utf8 => crate::canal::TextSource::AsShipped,
                ConnectionCharset::Iso8859_1 => crate::canal::TextSource::Raw {
                    source_url: self.source_url.clone(),
                },
            },
        }
    }
}

/// `[amqp]`: the broker and the publisher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost`; the password part is redacted when shown.
    pub url: Secret,
    /// Several brokers (the nodes of one cluster), tried in order; when set, `url` is unused.
    /// A list, or one string of comma-separated URLs (the environment:
    /// `CANAL_CONSUMER__AMQP__URLS=amqp://a,amqp://b`). See [`AmqpConfig::endpoints`].
    #[serde(
        deserialize_with = "secret_list",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub urls: Vec<Secret>,
    /// TLS for `amqps://` URLs: the CA to trust and an optional client certificate.
    pub tls: TlsConfig,
    /// Most messages published but not yet confirmed.
    pub max_unconfirmed: NonZeroUsize,
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
            urls: Vec::new(),
            tls: TlsConfig::default(),
            max_unconfirmed: nz(512),
            confirm_timeout: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            queue: QueueConfig::default(),
            priorities: PriorityMap::default(),
        }
    }
}

impl AmqpConfig {
    /// The brokers to connect to, in order: `urls` when set, else `url`.
    pub fn endpoints(&self) -> Vec<Secret> {
        if self.urls.is_empty() {
            vec![self.url.clone()]
        } else {
            self.urls.clone()
        }
    }
}

/// `[amqp.tls]`: how an `amqps://` connection is verified. The broker's certificate must chain
/// to `ca_file` (PEM; empty = the system's roots) and name the URL's host.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA certificate(s) that signed the broker's certificate.
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM file of our client certificate (for brokers that require one); needs `key_file`.
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM file of the client certificate's private key (PKCS#8); never logged.
    pub key_file: Option<std::path::PathBuf>,
}

/// A list of secrets from a TOML array, or from one comma-separated string.
fn secret_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<Secret>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(Secret::new)
            .collect(),
        OneOrMany::Many(v) => v,
    })
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
    /// `x-max-priority`; must equal the workers' (Celery: `task_queue_max_priority`). `0` in a
    /// file or the environment means none (the loader turns it into `None`).
    pub max_priority: Option<u8>,
    /// `classic` or `quorum`.
    pub queue_type: QueueType,
    /// `x-dead-letter-exchange`: where the broker dead-letters messages (rejected, or over
    /// `delivery_limit`). In `declare` mode the exchange (fanout, durable) and the dead-letter
    /// queue `<name>.dead_letter` bound to it are declared too. Empty: none.
    pub dead_letter_exchange: String,
    /// `x-dead-letter-strategy` (quorum only): `at-least-once` (the broker keeps a message
    /// until the dead-letter queue confirms it; implies `x-overflow = reject-publish`) or
    /// `at-most-once` (RabbitMQ's default).
    pub dead_letter_strategy: DeadLetterStrategy,
    /// `x-delivery-limit` (quorum only): deliveries before the broker dead-letters a message.
    pub delivery_limit: Option<u32>,
}

/// `amqp.queue.dead_letter_strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeadLetterStrategy {
    AtMostOnce,
    AtLeastOnce,
}

impl DeadLetterStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterStrategy::AtMostOnce => "at-most-once",
            DeadLetterStrategy::AtLeastOnce => "at-least-once",
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            name: "plugin_tasks".into(),
            declare: DeclareMode::Declare,
            durable: true,
            max_priority: Some(10),
            queue_type: QueueType::Classic,
            dead_letter_exchange: String::new(),
            dead_letter_strategy: DeadLetterStrategy::AtMostOnce,
            delivery_limit: None,
        }
    }
}

/// `amqp.queue.queue_type`: the RabbitMQ queue type (`x-queue-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Classic,
    Quorum,
}

impl QueueType {
    /// The `x-queue-type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

impl std::fmt::Display for QueueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
    pub max_restarts: NonZeroU32,
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
            max_restarts: NonZeroU32::new(5).expect("non-zero"),
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
    pub format: LogFormat,
    /// tracing filter, e.g. `info,canal_consumer=debug`; `RUST_LOG` wins when set.
    pub level: String,
    /// Also write to this file (e.g. `logs/app.log`).
    pub file: Option<PathBuf>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
            file: None,
        }
    }
}

/// `log.format`: human-readable lines or one JSON object per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
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

/// `[backfill]`: reading existing rows through the consumers (the `backfill` module). Backfills
/// read and write the source database through `canal.source_url`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackfillConfig {
    /// `database.table` of the watermark table: created on first use, the only table the
    /// service writes to on the source, and where backfills and their progress are kept. The
    /// service subscribes to it; Canal's black filter must not exclude it.
    pub watermark_table: String,
    /// Rows per chunk when `backfill start` gives no `--chunk`.
    pub chunk: NonZeroUsize,
    /// How long a chunk's rows may take to come back through Canal and be confirmed before it
    /// is read again.
    #[serde(with = "humantime_serde")]
    pub chunk_timeout: Duration,
    /// Start a chunk only while at most this many live batches are in flight, delivered and
    /// not yet confirmed (live changes go first).
    pub max_live_batches: usize,
    /// Chunks of one backfill read and not yet confirmed, at most: the next chunk is read
    /// while earlier ones' messages are confirmed. 1 (the default) reads one chunk after
    /// another; more can help a bulk consumer, but queues more chunks ahead of that consumer's
    /// live changes; each chunk in flight holds its rows in memory.
    pub chunks_in_flight: usize,
    /// SNAPSHOT rows per part for a consumer that also gets live events: its SNAPSHOT rows
    /// travel in a lane of their own, in parts of at most this many rows, so its live changes
    /// wait only for the rows of their own key (`manager::core`).
    pub lane_rows: NonZeroUsize,
    /// SNAPSHOT parts of one consumer out (being rendered or awaiting confirms) at a time: a
    /// live change waits behind at most this many parts' messages at the publisher.
    pub lane_parts: usize,
    /// Rows per chunk when `backfill start` gives no `--chunk` and every consumer the backfill
    /// is for only has bulk rules (`batch`) for its rows: such a chunk becomes a few bulk
    /// messages, so a larger one costs little memory and spreads a chunk's fixed cost (its
    /// watermarks' trip through Canal) over more rows.
    pub bulk_chunk: NonZeroUsize,
    /// `chunks_in_flight` for such a backfill (the larger of the two applies).
    pub bulk_chunks_in_flight: usize,
    /// While live changes flow (a live row went to a consumer within `live_window`), a
    /// backfill reads at most this many rows per second (live changes first); 0: backfills do
    /// not yield (full speed, their own chunk size, always). `backfill start --rate` still
    /// applies, the lower of the two.
    pub rate_while_live: f64,
    /// While live changes flow, a backfill's reads have at most this many rows, so its work
    /// comes in small pieces; for a backfill whose rows a bulk rule takes, rounded up to a
    /// whole number of its bulks (`Yield::bulk`), so its bulk messages stay those of whole
    /// chunks.
    pub chunk_while_live: NonZeroUsize,
    /// Live changes flow while one went to a consumer less than this long ago; a backfill
    /// goes back to full speed this long after the last.
    #[serde(with = "humantime_serde")]
    pub live_window: Duration,
}

impl BackfillConfig {
    /// `watermark_table` split into database and table.
    pub fn watermark(&self) -> Result<(String, String), String> {
        let name = self.watermark_table.trim();
        let ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 64
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        };
        match name.split_once('.') {
            Some((db, t)) if ok(db) && ok(t) => Ok((db.to_string(), t.to_string())),
            _ => Err(format!(
                "must be database.table (letters, digits, _ and $), got {name:?}"
            )),
        }
    }
}

impl Default for BackfillConfig {
    fn default() -> Self {
        BackfillConfig {
            watermark_table: "canal_consumer.watermark".into(),
            chunk: nz(5000),
            chunk_timeout: Duration::from_secs(60),
            max_live_batches: 2,
            chunks_in_flight: 1,
            lane_rows: nz(64),
            lane_parts: 2,
            bulk_chunk: nz(5000),
            bulk_chunks_in_flight: 1,
            rate_while_live: 1000.0,
            chunk_while_live: nz(100),
            live_window: Duration::from_secs(1),
        }
    }
}

/// The smallest rate a backfill may be given (rows per second): `backfill start --rate` and
/// `backfill.rate_while_live` (besides its 0, no yielding).
pub const MIN_BACKFILL_RATE: f64 = 0.01;

/// The longest row id of the watermark table (its `id` column is `VARCHAR(64)`).
pub const HEARTBEAT_MAX_ID: usize = 64;

/// The heartbeat row's id for a Canal destination and client id.
pub fn heartbeat_row_id(destination: &str, client_id: &str) -> String {
    format!("heartbeat:{destination}/{client_id}")
}

/// `[heartbeat]`: honest lag. While this replica streams, the service writes a heartbeat row
/// (`heartbeat:<destination>/<client_id>`) to `backfill.watermark_table` every `interval`
/// through `canal.source_url` and measures how long it takes to come back through Canal (the
/// manager's heartbeat tracker).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatConfig {
    pub enabled: bool,
    /// Time between two heartbeats (at least 100 ms).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl HeartbeatConfig {
    /// The shortest `interval` accepted.
    pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            enabled: false,
            interval: Duration::from_secs(3),
        }
    }
}
