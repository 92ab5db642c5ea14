//! The checks types cannot express. Each error names the key; `load.rs` adds where the
//! value came from.

use super::error::{ConfigError, Origin};
use super::schema::{Config, ConnectionCharset};
use crate::secret::{Secret, url_password};
use std::path::Path;

/// The longest `canal.fetch_wait` accepted (see its check).
pub const MAX_FETCH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Config {
    /// Semantic checks that types cannot express. Errors name the key; [`load`](fn@super::load) adds where the
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
        if c.destination.trim().is_empty() {
            bad("canal.destination", "must not be empty".into());
        }
        if c.client_id.trim().is_empty() {
            bad("canal.client_id", "must not be empty".into());
        }
        if !c.zk_servers.trim().is_empty() {
            for server in c.zk_servers.trim().split(',') {
                let ok = server.rsplit_once(':').is_some_and(|(h, p)| {
                    !h.trim().is_empty() && p.trim().parse::<u16>().is_ok_and(|p| p > 0)
                });
                if !ok {
                    bad(
                        "canal.zk_servers",
                        format!("`{server}` is not host:port (expected e.g. `zk1:2181,zk2:2181`)"),
                    );
                }
            }
            if !c.zk_root.starts_with('/') || c.zk_root.len() < 2 {
                bad(
                    "canal.zk_root",
                    format!(
                        "must be an absolute ZooKeeper path such as /otter/canal, got `{}`",
                        c.zk_root
                    ),
                );
            }
            if c.client_id.trim().parse::<i16>().is_err() {
                bad(
                    "canal.client_id",
                    format!(
                        "must be a number from 1 to 32767 with canal.zk_servers (canal's client running node is named after it), got `{}`",
                        c.client_id
                    ),
                );
            }
            if c.zk_session_timeout < std::time::Duration::from_secs(1) {
                bad(
                    "canal.zk_session_timeout",
                    "must be at least 1s (ZooKeeper's own minimum is two ticks)".into(),
                );
            }
        }
        match (c.connection_charset, c.source_url.is_empty()) {
            (ConnectionCharset::Iso8859_1, true) => bad(
                "canal.source_url",
                "must be set with canal.connection_charset = \"ISO-8859-1\": the service reads \
                 each text column's charset from the source database (mysql://user:password@host:port)"
                    .into(),
            ),
            (_, false) => {
                if let Err(e) = crate::canal::source::check_url(c.source_url.expose()) {
                    bad("canal.source_url", e.to_string().replace("canal.source_url: ", ""));
                }
            }
            (ConnectionCharset::Utf8, true) => {}
        }
        if let Err(e) = self.backfill.watermark() {
            bad("backfill.watermark_table", e);
        }
        if self.backfill.chunk.get() > 100_000 {
            bad(
                "backfill.chunk",
                format!("must be at most 100000 rows, got {}", self.backfill.chunk),
            );
        }
        if self.backfill.bulk_chunk.get() > 100_000 {
            bad(
                "backfill.bulk_chunk",
                format!(
                    "must be at most 100000 rows, got {}",
                    self.backfill.bulk_chunk
                ),
            );
        }
        if self.backfill.lane_rows.get() > 100_000 {
            bad(
                "backfill.lane_rows",
                format!(
                    "must be at most 100000 rows, got {}",
                    self.backfill.lane_rows
                ),
            );
        }
        if !(1..=64).contains(&self.backfill.lane_parts) {
            bad(
                "backfill.lane_parts",
                format!(
                    "must be between 1 and 64 parts, got {}",
                    self.backfill.lane_parts
                ),
            );
        }
        for (key, n) in [
            ("backfill.chunks_in_flight", self.backfill.chunks_in_flight),
            (
                "backfill.bulk_chunks_in_flight",
                self.backfill.bulk_chunks_in_flight,
            ),
        ] {
            if !(1..=8).contains(&n) {
                bad(key, format!("must be between 1 and 8 chunks, got {n}"));
            }
        }
        let r = self.backfill.rate_while_live;
        if !r.is_finite() || r < 0.0 || (r > 0.0 && r < super::schema::MIN_BACKFILL_RATE) {
            bad(
                "backfill.rate_while_live",
                format!(
                    "must be 0 (backfills do not yield) or at least {} rows per second, got {r}",
                    super::schema::MIN_BACKFILL_RATE
                ),
            );
        }
        if self.backfill.chunk_while_live.get() > 100_000 {
            bad(
                "backfill.chunk_while_live",
                format!(
                    "must be at most 100000 rows, got {}",
                    self.backfill.chunk_while_live
                ),
            );
        }
        let w = self.backfill.live_window;
        if w < std::time::Duration::from_millis(10) || w > std::time::Duration::from_secs(3600) {
            bad(
                "backfill.live_window",
                format!(
                    "must be between 10ms and 1h, got {}",
                    humantime::format_duration(w)
                ),
            );
        }
        if self.backfill.chunk_timeout < std::time::Duration::from_secs(1) {
            bad(
                "backfill.chunk_timeout",
                format!(
                    "must be at least 1s (a chunk's rows come back through Canal and are confirmed in it), got {}",
                    humantime::format_duration(self.backfill.chunk_timeout)
                ),
            );
        }
        let hb = &self.heartbeat;
        if hb.enabled {
            if c.source_url.is_empty() {
                bad(
                    "heartbeat.enabled",
                    "needs canal.source_url: heartbeats are written to backfill.watermark_table \
                     on the source (mysql://user:password@host:port, with INSERT and UPDATE on it)"
                        .into(),
                );
            }
            if hb.interval < super::schema::HeartbeatConfig::MIN_INTERVAL {
                bad(
                    "heartbeat.interval",
                    format!(
                        "must be at least 100ms, got {}",
                        humantime::format_duration(hb.interval)
                    ),
                );
            }
            let id = super::schema::heartbeat_row_id(&c.destination, &c.client_id);
            if id.chars().count() > super::schema::HEARTBEAT_MAX_ID {
                bad(
                    "heartbeat.enabled",
                    format!(
                        "the heartbeat row's id `{id}` (from canal.destination and \
                         canal.client_id) is longer than the watermark table's id column ({} \
                         characters)",
                        super::schema::HEARTBEAT_MAX_ID
                    ),
                );
            }
        }
        if c.batch_size <= 0 {
            bad(
                "canal.batch_size",
                format!("must be greater than 0, got {}", c.batch_size),
            );
        } else if i64::from(c.batch_size) * 1024 > i64::from(i32::MAX) {
            // Canal computes a GET's byte budget as units x memunit in a Java int
            bad(
                "canal.batch_size",
                format!(
                    "must be at most {} (KiB), got {}",
                    i32::MAX / 1024,
                    c.batch_size
                ),
            );
        }
        if c.mem_unit == 0 || c.mem_unit > 1 << 20 {
            bad(
                "canal.mem_unit",
                format!(
                    "must be between 1 and 1048576 bytes (the Canal server's \
                     canal.instance.memory.buffer.memunit), got {}",
                    c.mem_unit
                ),
            );
        }
        if c.fetch_wait > MAX_FETCH_WAIT {
            // Canal 1.1.x answers requests on its network threads (no executor in the netty
            // pipeline): a waiting GET holds one, and every client whose connection that thread
            // serves waits with it
            bad(
                "canal.fetch_wait",
                format!(
                    "must be at most {}s: Canal holds one of its network threads while a long poll \
                     waits, stalling its other clients; got {}",
                    MAX_FETCH_WAIT.as_secs(),
                    humantime::format_duration(c.fetch_wait)
                ),
            );
        }
        if self.shutdown.deadline <= c.fetch_wait {
            // a graceful stop waits for the answer of the GET on the wire, which a long poll
            // holds up to `fetch_wait`: a shorter deadline would end every idle stop with exit 1
            bad(
                "shutdown.deadline",
                format!(
                    "must be longer than canal.fetch_wait ({}): a graceful stop waits for the \
                     answer of the long poll on the wire; got {}",
                    humantime::format_duration(c.fetch_wait),
                    humantime::format_duration(self.shutdown.deadline)
                ),
            );
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
        if let Err(m) = check_amqp_url(&self.amqp.url) {
            bad("amqp.url", m);
        }
        for (i, url) in self.amqp.urls.iter().enumerate() {
            if let Err(m) = check_amqp_url(url) {
                bad("amqp.urls", format!("entry {}: {m}", i + 1));
            }
        }
        for (key, m) in check_tls(&self.amqp.tls) {
            bad(key, m);
        }
        let q = &self.amqp.queue;
        if q.name.trim().is_empty() {
            bad("amqp.queue.name", "must not be empty".into());
        }
        for (key, m) in check_queue_type_arguments(q) {
            bad(key, m);
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
        if let Some(path) = &self.log.file
            && let Err(m) = check_log_file(path)
        {
            bad("log.file", m);
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            bad("log.level", format!("not a valid filter: {e}"));
        }
        match ConfigError::from_list(errs) {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// `amqp.url` must be an AMQP URL the client can use: scheme `amqp`/`amqps`, a host, a port
/// in 1..=65535 when one is given. Messages show the URL with its password redacted.
fn check_amqp_url(url: &Secret) -> Result<(), String> {
    let raw = url.expose();
    let shown = url.redacted();
    if !(raw.starts_with("amqp://") || raw.starts_with("amqps://")) {
        return Err(format!("`{shown}` must start with amqp:// or amqps://"));
    }
    let parsed = raw.parse::<lapin::uri::AMQPUri>().map_err(|e| {
        // the parser may quote its input: never let the password through
        let e = e.replace(raw, &shown);
        let e = match url_password(raw) {
            Some(p) if !p.is_empty() => e.replace(&p, "***"),
            _ => e,
        };
        format!("`{shown}` is not a valid AMQP URL: {e}")
    })?;
    if parsed.authority.port == 0 {
        return Err(format!("`{shown}`: port 0 is not a port to connect to"));
    }
    if parsed.authority.host.is_empty() {
        return Err(format!("`{shown}` names no host"));
    }
    Ok(())
}

/// `[amqp.tls]`: the files must be readable; a client certificate needs its key.
fn check_tls(tls: &super::schema::TlsConfig) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for (key, file) in [
        ("amqp.tls.ca_file", &tls.ca_file),
        ("amqp.tls.cert_file", &tls.cert_file),
        ("amqp.tls.key_file", &tls.key_file),
    ] {
        if let Some(path) = file
            && let Err(e) = std::fs::File::open(path)
        {
            out.push((key, format!("{} cannot be read: {e}", path.display())));
        }
    }
    match (&tls.cert_file, &tls.key_file) {
        (Some(_), None) => out.push((
            "amqp.tls.key_file",
            "must be set with amqp.tls.cert_file (the client certificate's private key)".into(),
        )),
        (None, Some(_)) => out.push((
            "amqp.tls.cert_file",
            "must be set with amqp.tls.key_file (the client certificate)".into(),
        )),
        _ => {}
    }
    out
}

/// What a queue type allows: quorum queues have no `x-max-priority` (RabbitMQ before 4.0
/// ignores message priorities on them, 4.0+ knows two levels), and the quorum-only arguments
/// (`x-delivery-limit`, at-least-once dead lettering) are refused on classic queues.
pub fn check_queue_type_arguments(q: &super::schema::QueueConfig) -> Vec<(&'static str, String)> {
    use super::schema::{DeadLetterStrategy, QueueType};
    let mut out = Vec::new();
    match q.queue_type {
        QueueType::Quorum => {
            if let Some(p) = q.max_priority {
                out.push((
                    "amqp.queue.max_priority",
                    format!(
                        "is {p}, but a quorum queue takes no x-max-priority (the broker refuses \
                         it): RabbitMQ 3.x quorum queues ignore message priorities (FIFO), 4.0+ \
                         serve priority 5 and above before the rest (two levels). Set \
                         max_priority = 0, and declare the workers' queue without \
                         x-max-priority (Celery: no task_queue_max_priority)"
                    ),
                ));
            }
            if q.dead_letter_strategy == DeadLetterStrategy::AtLeastOnce
                && q.dead_letter_exchange.is_empty()
            {
                out.push((
                    "amqp.queue.dead_letter_strategy",
                    "at-least-once needs amqp.queue.dead_letter_exchange (where to dead-letter)"
                        .into(),
                ));
            }
        }
        QueueType::Classic => {
            if q.dead_letter_strategy == DeadLetterStrategy::AtLeastOnce {
                out.push((
                    "amqp.queue.dead_letter_strategy",
                    "at-least-once dead lettering exists only for quorum queues; set \
                     amqp.queue.queue_type = \"quorum\" or use at-most-once"
                        .into(),
                ));
            }
            if q.delivery_limit.is_some() {
                out.push((
                    "amqp.queue.delivery_limit",
                    "x-delivery-limit exists only for quorum queues; set \
                     amqp.queue.queue_type = \"quorum\" or remove it"
                        .into(),
                ));
            }
        }
    }
    if q.delivery_limit == Some(0) {
        out.push((
            "amqp.queue.delivery_limit",
            "must be at least 1 (leave it out for no limit)".into(),
        ));
    }
    out
}

/// `log.file` must be a file the service can append to: not a directory, and either an
/// existing file that opens for appending, or a path whose nearest existing ancestor is a
/// directory (the logger creates the missing directories and the file at start).
fn check_log_file(path: &Path) -> Result<(), String> {
    let shown = path.display();
    if path.as_os_str().is_empty() {
        return Err("must not be empty (leave the key out for no log file)".into());
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(format!("{shown} is a directory, not a file")),
        Ok(_) => std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
            .map_err(|e| format!("{shown} cannot be opened for appending: {e}")),
        Err(_) => {
            let mut dir = path.parent();
            while let Some(parent) = dir {
                let last = parent.as_os_str().is_empty();
                let d = if last { Path::new(".") } else { parent };
                match std::fs::metadata(d) {
                    Ok(m) if m.is_dir() => {
                        if m.permissions().readonly() {
                            return Err(format!(
                                "{shown} cannot be created: {} is read-only",
                                d.display()
                            ));
                        }
                        return Ok(());
                    }
                    Ok(_) => {
                        return Err(format!(
                            "{shown} cannot be created: {} is not a directory",
                            d.display()
                        ));
                    }
                    Err(_) if last => break,
                    Err(_) => dir = parent.parent(),
                }
            }
            Ok(())
        }
    }
}
