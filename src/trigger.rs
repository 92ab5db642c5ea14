//! A plugin trigger: the unit of work a consumer hands to the publisher.
//!
//! The reference system calls `trigger_plugin(name, payload, priority)`; a [`Trigger`] is that
//! call plus everything the publisher needs to turn it into an AMQP message: who asked, for
//! which change, where to route it, in which format, and its deterministic id.
//!
//! Ids are UUIDv5 over the source (destination, server id), the binlog position (log file,
//! offset, row index, event time), the consumer, the rule and the plugin (see [`message_id`]), so
//! a redelivered change produces byte-identical ids and workers can drop duplicates.

use crate::event::{ChangeEvent, EventType, Position, SnapshotOrigin};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;
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
    pub destination: Arc<str>,
    pub database: Arc<str>,
    pub table: Arc<str>,
    pub event_type: EventType,
    pub position: Position,
    pub executed_at: i64,
    /// SNAPSHOT events: the backfill and the row's key (the message id is made of these
    /// instead of the position, see [`message_id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Arc<SnapshotOrigin>>,
}

impl SourceRef {
    /// The read a SNAPSHOT row came from ([`crate::event::other_read`]); `None` otherwise.
    pub fn read(&self) -> Option<crate::event::ReadMark<'_>> {
        self.snapshot
            .as_ref()
            .map(|_| (&self.position, self.executed_at))
    }
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
            snapshot: e.snapshot.clone(),
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
    /// Set for a bulk trigger (a rule with `batch`): `payload` is the list of the per-row
    /// payloads, `source` is the first row, this says how many rows and which is the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk: Option<BulkRange>,
}

/// The rows a bulk trigger covers: `rows` rows from its `source` (the first) to `last`, in
/// binlog order, all from one Canal batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BulkRange {
    pub rows: u32,
    /// The last row's position and event time.
    pub last: Position,
    pub last_executed_at: i64,
    /// Every row's position, in payload order (in process only: parking a refused bulk
    /// turns it back into its rows).
    #[serde(skip)]
    pub positions: Vec<Position>,
}

/// Namespace for trigger ids (a fixed random UUID; changing it changes every id).
const ID_NAMESPACE: Uuid = Uuid::from_bytes([
    0x5b, 0x0e, 0x8a, 0x43, 0x1f, 0x2c, 0x4e, 0x11, 0x9a, 0x6d, 0x2f, 0x7c, 0x0b, 0x91, 0xd3, 0x58,
]);

/// The deterministic id of a trigger (scheme `v2`).
///
/// UUIDv5 (namespace `ID_NAMESPACE`) of the NUL-joined fields
/// `v2, destination, server_id, log_file, offset, row_index, executed_at, consumer, rule, plugin,
/// seq`, where `seq` counts the triggers one consumer fired for the same plugin and rule on one
/// row (so two calls from code-defined consumers stay distinct; the first has `seq = 0`) and a
/// missing rule is the empty string.
///
/// Why these fields: file and offset alone repeat across Canal destinations, after a MySQL
/// failover to another server, and after `RESET MASTER`; the destination and the server id
/// tell sources apart, and the binlog event's own timestamp (`executed_at`) tells a reused
/// file+offset apart. All of them are properties of the binlog event, so a redelivered change
/// gets the same id. The GTID is not part of it: Canal's header carries the server's GTID *set*
/// (not the event's GTID), and only while Canal runs in GTID mode, so it would differ between a
/// first delivery and a redelivery after a Canal restart. The scheme is pinned by golden values
/// computed independently (Python's `uuid.uuid5`) in the tests below: changing it changes every
/// id and breaks duplicate detection across versions.
///
/// A SNAPSHOT event (a row a backfill read) has no binlog event of its own: its id (scheme
/// `snap-v1`) is the UUIDv5 of `snap-v1, database, table, backfill id, key, consumer, rule,
/// plugin, seq`, so a chunk read again after a crash or a rollback gives the same ids.
pub fn message_id(
    source: &SourceRef,
    consumer: &str,
    rule: Option<&str>,
    plugin: &str,
    seq: u32,
) -> String {
    if let Some(snap) = &source.snapshot {
        let mut key = IdKey::new("snap-v1", 96 + snap.key.len());
        key.snapshot(source, snap);
        key.text(consumer);
        key.text(rule.unwrap_or(""));
        key.text(plugin);
        key.num(seq);
        return key.uuid();
    }
    let p = &source.position;
    let mut key = IdKey::new(
        "v2",
        64 + source.destination.len() + p.log_file.len() + consumer.len() + plugin.len(),
    );
    key.text(&source.destination);
    key.position(source);
    key.text(consumer);
    key.text(rule.unwrap_or(""));
    key.text(plugin);
    key.num(seq);
    key.uuid()
}

/// A message id's key: NUL-joined fields after the scheme's tag, built without the formatting
/// machinery, then its UUIDv5 in [`ID_NAMESPACE`].
struct IdKey {
    key: Vec<u8>,
    num: itoa::Buffer,
}

impl IdKey {
    fn new(scheme: &str, capacity: usize) -> IdKey {
        let mut key = Vec::with_capacity(capacity);
        key.extend_from_slice(scheme.as_bytes());
        IdKey {
            key,
            num: itoa::Buffer::new(),
        }
    }

    fn text(&mut self, s: &str) {
        self.key.push(0);
        self.key.extend_from_slice(s.as_bytes());
    }

    fn num(&mut self, n: impl itoa::Integer) {
        self.key.push(0);
        self.key.extend_from_slice(self.num.format(n).as_bytes());
    }

    /// server id, binlog file, offset, row index, event time.
    fn position(&mut self, s: &SourceRef) {
        let p = &s.position;
        self.num(p.server_id);
        self.text(&p.log_file);
        self.num(p.offset);
        self.num(p.row_index);
        self.num(s.executed_at);
    }

    /// database, table, backfill id, key.
    fn snapshot(&mut self, s: &SourceRef, snap: &SnapshotOrigin) {
        self.text(&s.database);
        self.text(&s.table);
        self.text(&snap.backfill);
        self.text(&snap.key);
    }

    fn uuid(self) -> String {
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        Uuid::new_v5(&ID_NAMESPACE, &self.key)
            .hyphenated()
            .encode_lower(&mut text)
            .to_string()
    }
}

/// The deterministic id of a bulk trigger (scheme `bulk-v1`).
///
/// UUIDv5 (namespace `ID_NAMESPACE`) of the NUL-joined fields
/// `bulk-v1, destination, first server_id, first log_file, first offset, first row_index,
/// first executed_at, last server_id, last log_file, last offset, last row_index,
/// last executed_at, rows, consumer, rule, plugin`: the same rows of the same rule give the
/// same id, so a redelivered Canal batch that Canal cuts the same way regenerates the same
/// messages. A bulk never spans a Canal batch. Pinned by golden values computed with Python's
/// `uuid.uuid5` in the tests below and in `docs/envelope.md`.
pub fn bulk_message_id(
    first: &SourceRef,
    last: &SourceRef,
    rows: u32,
    consumer: &str,
    rule: &str,
    plugin: &str,
) -> String {
    if let (Some(a), Some(b)) = (&first.snapshot, &last.snapshot) {
        // SNAPSHOT rows: `snap-bulk-v1, first row's database, table, backfill, key, then the
        // last row's, rows, consumer, rule, plugin`
        let mut key = IdKey::new("snap-bulk-v1", 160 + a.key.len() + b.key.len());
        key.snapshot(first, a);
        key.snapshot(last, b);
        key.num(rows);
        key.text(consumer);
        key.text(rule);
        key.text(plugin);
        return key.uuid();
    }
    let mut key = IdKey::new("bulk-v1", 160);
    key.text(&first.destination);
    key.position(first);
    key.position(last);
    key.num(rows);
    key.text(consumer);
    key.text(rule);
    key.text(plugin);
    key.uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(destination: &str, server_id: u64, executed_at: i64) -> SourceRef {
        SourceRef {
            destination: destination.into(),
            database: "db".into(),
            table: "t".into(),
            event_type: EventType::Insert,
            position: Position {
                log_file: "mysql-bin.000001".into(),
                offset: 4242,
                row_index: 3,
                server_id,
                gtid: None,
            },
            executed_at,
            snapshot: None,
        }
    }

    /// Golden values from an independent implementation (Python 3 `uuid.uuid5` over the
    /// documented key); they pin the scheme across versions.
    #[test]
    fn ids_match_the_golden_values() {
        let base = src("example", 1, 1_700_000_000_000);
        assert_eq!(
            message_id(&base, "c", Some("r"), "p", 0),
            "205333ad-d1f4-53d1-9f41-54b12fd93db8"
        );
        assert_eq!(
            message_id(&base, "example_consumer", None, "email_service", 0),
            "63167f45-8313-52ef-a285-fe89fc4e8fe1"
        );
        assert_eq!(
            message_id(&src("other", 1, 1_700_000_000_000), "c", Some("r"), "p", 0),
            "c247c193-7f36-545a-b223-9caa81b759e4"
        );
        assert_eq!(
            message_id(
                &src("example", 2, 1_700_000_000_000),
                "c",
                Some("r"),
                "p",
                0
            ),
            "27d44d1b-8800-542d-a55f-58763741c651"
        );
        assert_eq!(
            message_id(
                &src("example", 1, 1_700_000_001_000),
                "c",
                Some("r"),
                "p",
                1
            ),
            "9c4377f2-efa2-599c-90a3-5c73f60690d0"
        );
    }

    /// Golden values computed with Python 3's `uuid.uuid5` over the documented `bulk-v1` key
    /// (the script is in docs/envelope.md).
    #[test]
    fn bulk_ids_match_the_golden_values() {
        let first = src("example", 1, 1_700_000_000_000);
        let mut last = src("example", 1, 1_700_000_000_500);
        last.position.offset = 9000;
        last.position.row_index = 0;
        assert_eq!(
            bulk_message_id(&first, &last, 250, "c", "r", "p"),
            "73fed8b8-dbfb-5ed2-924b-d75656633e6c"
        );
        assert_eq!(
            bulk_message_id(&first, &first, 1, "c", "r", "p"),
            "ccdb9faa-3205-5570-8308-bcb883677f46"
        );
        assert_eq!(
            bulk_message_id(
                &first,
                &last,
                250,
                "example_consumer",
                "bulk_rows",
                "email_service"
            ),
            "0721dd33-e875-5eab-96f8-eee08d5619d9"
        );
        // never the id of a per-row trigger of the first row
        assert_ne!(
            bulk_message_id(&first, &first, 1, "c", "r", "p"),
            message_id(&first, "c", Some("r"), "p", 0)
        );
    }

    fn snap(key: &str, position_offset: u64, executed_at: i64) -> SourceRef {
        let mut s = src("example", 1, executed_at);
        s.position.offset = position_offset;
        s.event_type = EventType::Snapshot;
        s.snapshot = Some(Arc::new(SnapshotOrigin {
            backfill: "bf-1".into(),
            key: key.into(),
            consumer: Some("c".into()),
        }));
        s
    }

    /// SNAPSHOT ids: golden values from Python's `uuid.uuid5` over the documented key; the
    /// position and time of the high watermark a row was emitted at are not part of them, so a
    /// chunk read again gives the same ids.
    #[test]
    fn snapshot_ids_match_the_golden_values_and_ignore_where_they_were_emitted() {
        let a = snap("[42]", 4242, 1_700_000_000_000);
        assert_eq!(
            message_id(&a, "c", Some("r"), "p", 0),
            "bac68d2d-26fb-57a8-b941-3b01fe664abe"
        );
        let again = snap("[42]", 999_999, 1_800_000_000_000);
        assert_eq!(
            message_id(&again, "c", Some("r"), "p", 0),
            message_id(&a, "c", Some("r"), "p", 0)
        );
        assert_eq!(
            message_id(&snap("[\"eu\",7]", 1, 1), "c", None, "p", 0),
            "a0742ae7-68dd-517e-8d9e-cef152d40096"
        );
        assert_eq!(
            bulk_message_id(&snap("[1]", 1, 1), &snap("[9]", 2, 2), 5, "c", "r", "p"),
            "724dada6-ca3a-5a44-b0bc-ac349a9f8f90"
        );
        // a live event at the same position keeps the position-based id
        let mut live = a.clone();
        live.snapshot = None;
        assert_ne!(
            message_id(&live, "c", Some("r"), "p", 0),
            message_id(&a, "c", Some("r"), "p", 0)
        );
    }

    #[test]
    fn ids_distinguish_every_component_but_not_the_gtid() {
        let base_src = src("example", 1, 1_700_000_000_000);
        let base = message_id(&base_src, "c", Some("r"), "p", 0);
        let mut other = base_src.clone();
        other.position.row_index = 4;
        let mut offset = base_src.clone();
        offset.position.offset += 1;
        let mut file = base_src.clone();
        file.position.log_file = "mysql-bin.000002".into();
        let variants = [
            message_id(&other, "c", Some("r"), "p", 0),
            message_id(&offset, "c", Some("r"), "p", 0),
            message_id(&file, "c", Some("r"), "p", 0),
            message_id(&base_src, "c2", Some("r"), "p", 0),
            message_id(&base_src, "c", None, "p", 0),
            message_id(&base_src, "c", Some("r"), "p2", 0),
            message_id(&base_src, "c", Some("r"), "p", 1),
        ];
        for v in variants {
            assert_ne!(v, base);
        }
        let mut with_gtid = base_src.clone();
        with_gtid.position.gtid = Some("0-1-5".into());
        assert_eq!(message_id(&with_gtid, "c", Some("r"), "p", 0), base);
    }
}
