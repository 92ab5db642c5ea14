//! The checks types cannot express. Each error names the key; [`super::load`] adds where the
//! value came from.

use super::error::{ConfigError, Origin};
use super::schema::Config;

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
}
