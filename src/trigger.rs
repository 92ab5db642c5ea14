//! A plugin trigger: the unit of work a consumer hands to the publisher.
//!
//! The reference system calls `trigger_plugin(name, payload, priority)`; a [`Trigger`] is that
//! call plus everything the publisher needs to turn it into an AMQP message: who asked, for
//! which change, where to route it, in which format, and its deterministic id.
//!
//! Ids are UUIDv5 over the binlog position (log file, offset, row index), the consumer, the rule
//! and the plugin (see [`message_id`]), so a redelivered change produces byte-identical ids and
//! workers can drop duplicates.

use crate::event::{ChangeEvent, EventType, Position};
use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// Task priority as the reference system names it. Mapped to AMQP priorities by the publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        match s.trim().to_ascii_lowercase().as_str() {
            "low" => Some(Priority::Low),
            "normal" => Some(Priority::Normal),
            "high" => Some(Priority::High),
            _ => None,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The wire format of a trigger's message.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum MessageFormat {
    /// Our versioned JSON envelope (see `publisher::envelope`).
    #[default]
    Envelope,
    /// Celery task protocol v2.
    Celery {
        /// The Celery task name the workers registered, e.g. `plugins.run`.
        task: String,
        /// How the payload maps to the task call: `kwargs` (the payload object becomes
        /// keyword arguments), `args` (`[plugin, payload]` positional) or `payload` (one
        /// keyword argument `payload`, plus `plugin`).
        #[serde(default)]
        mapping: CeleryMapping,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CeleryMapping {
    #[default]
    Kwargs,
    Args,
    Payload,
}

/// Where a message goes. The default is the default exchange with routing key `plugin_tasks`,
/// i.e. straight to the `plugin_tasks` queue the workers listen on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Route {
    #[serde(default)]
    pub exchange: String,
    pub routing_key: String,
}

impl Default for Route {
    fn default() -> Self {
        Route {
            exchange: String::new(),
            routing_key: "plugin_tasks".to_string(),
        }
    }
}

/// The part of the source event a message carries along.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRef {
    pub destination: String,
    pub database: String,
    pub table: String,
    pub event_type: EventType,
    pub position: Position,
    pub executed_at: i64,
}

impl From<&ChangeEvent> for SourceRef {
    fn from(e: &ChangeEvent) -> Self {
        SourceRef {
            destination: e.destination.clone(),
            database: e.database.clone(),
            table: e.table.clone(),
            event_type: e.event_type,
            position: e.position.clone(),
            executed_at: e.executed_at,
        }
    }
}

/// One `trigger_plugin` call, ready to publish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    /// Deterministic id: AMQP `message_id` and, in Celery mode, the task id.
    pub id: String,
    pub plugin: String,
    pub payload: serde_json::Value,
    pub priority: Priority,
    pub consumer: String,
    /// The config rule that fired, if the consumer is config-driven.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub source: SourceRef,
    #[serde(default)]
    pub route: Route,
    #[serde(default)]
    pub format: MessageFormat,
}

/// Namespace for trigger ids (a fixed random UUID; changing it changes every id).
const ID_NAMESPACE: Uuid = Uuid::from_bytes([
    0x5b, 0x0e, 0x8a, 0x43, 0x1f, 0x2c, 0x4e, 0x11, 0x9a, 0x6d, 0x2f, 0x7c, 0x0b, 0x91, 0xd3, 0x58,
]);

/// The deterministic id of a trigger.
///
/// UUIDv5 of `log_file \0 offset \0 row_index \0 consumer \0 rule \0 plugin \0 seq`, where
/// `seq` counts the triggers one consumer fired for the same plugin and rule on one row (so two
/// calls from code-defined consumers stay distinct, and the first one has `seq = 0`).
pub fn message_id(
    position: &Position,
    consumer: &str,
    rule: Option<&str>,
    plugin: &str,
    seq: u32,
) -> String {
    let key = format!(
        "{}\0{}\0{}\0{}\0{}\0{}\0{}",
        position.log_file,
        position.offset,
        position.row_index,
        consumer,
        rule.unwrap_or(""),
        plugin,
        seq
    );
    Uuid::new_v5(&ID_NAMESPACE, key.as_bytes()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos() -> Position {
        Position {
            log_file: "mysql-bin.000001".into(),
            offset: 4242,
            row_index: 3,
            gtid: None,
        }
    }

    #[test]
    fn ids_are_deterministic_and_distinguish_every_component() {
        let base = message_id(&pos(), "c", Some("r"), "p", 0);
        assert_eq!(base, message_id(&pos(), "c", Some("r"), "p", 0));
        let mut other = pos();
        other.row_index = 4;
        let variants = [
            message_id(&other, "c", Some("r"), "p", 0),
            message_id(&pos(), "c2", Some("r"), "p", 0),
            message_id(&pos(), "c", None, "p", 0),
            message_id(&pos(), "c", Some("r"), "p2", 0),
            message_id(&pos(), "c", Some("r"), "p", 1),
        ];
        for v in variants {
            assert_ne!(v, base);
        }
        // the gtid is informational and does not change the id
        let mut with_gtid = pos();
        with_gtid.gtid = Some("0-1-5".into());
        assert_eq!(message_id(&with_gtid, "c", Some("r"), "p", 0), base);
    }
}
