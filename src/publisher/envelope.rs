//! The default wire format: a documented, versioned JSON envelope (see `docs/envelope.md`).
//!
//! This module owns the envelope's shape and its version number. It only encodes (and, for
//! tests and Rust workers, decodes); it never talks to the broker. Encoding fails only if the
//! payload cannot be serialised, which surfaces as [`PublishError::Encode`] before anything is
//! published.
//!
//! Compatibility rule: adding a field keeps `version: 1`; renaming, removing or changing the
//! meaning of a field bumps [`ENVELOPE_VERSION`].

use super::PublishError;
use crate::clock::rfc3339_ms;
use crate::trigger::Trigger;
use serde::{Deserialize, Serialize};

/// The envelope version this build writes.
pub const ENVELOPE_VERSION: u32 = 1;

/// AMQP `type` property of envelope messages, so consumers can tell formats apart.
pub const ENVELOPE_TYPE: &str = "canal_consumer.trigger.v1";

/// One plugin trigger as it travels to the workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Always [`ENVELOPE_VERSION`] for messages written by this build.
    pub version: u32,
    /// Deterministic trigger id (also the AMQP `message_id`); equal ids are duplicates.
    pub id: String,
    /// The plugin to run, e.g. `email_service`.
    pub plugin: String,
    /// The plugin's arguments, as the consumer built them.
    pub payload: serde_json::Value,
    /// `high`, `normal` or `low` (the AMQP priority property carries the mapped number).
    pub priority: String,
    /// The consumer that fired.
    pub consumer: String,
    /// The config rule that fired, or null for code-defined consumers.
    pub rule: Option<String>,
    /// The row change that caused the trigger.
    pub source: EnvelopeSource,
    /// When this message was encoded, RFC 3339 UTC with milliseconds.
    pub published_at: String,
    /// Bulk messages only (a rule with `batch`): `payload` is the list of the rows'
    /// payloads, `source` the first row; this gives the count and the last row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk: Option<EnvelopeBulk>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvelopeBulk {
    /// How many rows (the length of `payload`).
    pub rows: u32,
    /// The last row's position.
    pub last_position: EnvelopePosition,
    /// When MySQL executed the last row's change, ms since the Unix epoch.
    pub last_executed_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvelopeSource {
    /// Canal destination (instance) name.
    pub destination: String,
    pub database: String,
    pub table: String,
    /// `INSERT`, `UPDATE`, `DELETE`, or a DDL kind.
    pub event_type: String,
    pub position: EnvelopePosition,
    /// When MySQL executed the change, milliseconds since the Unix epoch.
    pub executed_at: i64,
    /// `SNAPSHOT` events only: the backfill that read the row and its key (`position` and
    /// `executed_at` are then those of the high watermark the row was emitted at).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<crate::event::SnapshotOrigin>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvelopePosition {
    pub log_file: String,
    pub offset: u64,
    pub row_index: u32,
    /// The MySQL server id that wrote the event.
    #[serde(default)]
    pub server_id: u64,
    /// GTID set at this event, or null when the server does not track GTIDs.
    pub gtid: Option<String>,
}

impl Envelope {
    /// The envelope for `trigger`, stamped with `published_at`.
    pub fn from_trigger(trigger: &Trigger, published_at: chrono::DateTime<chrono::Utc>) -> Self {
        let s = &trigger.source;
        Envelope {
            version: ENVELOPE_VERSION,
            id: trigger.id.clone(),
            plugin: trigger.plugin.clone(),
            payload: trigger.payload.clone(),
            priority: trigger.priority.as_str().to_string(),
            consumer: trigger.consumer.clone(),
            rule: trigger.rule.clone(),
            source: EnvelopeSource {
                destination: s.destination.to_string(),
                database: s.database.to_string(),
                table: s.table.to_string(),
                event_type: event_type_name(s.event_type),
                position: EnvelopePosition {
                    log_file: s.position.log_file.to_string(),
                    offset: s.position.offset,
                    row_index: s.position.row_index,
                    server_id: s.position.server_id,
                    gtid: s.position.gtid.as_ref().map(|g| g.to_string()),
                },
                executed_at: s.executed_at,
                snapshot: s.snapshot.as_deref().cloned(),
            },
            published_at: rfc3339_ms(published_at),
            bulk: trigger.bulk.as_ref().map(|b| EnvelopeBulk {
                rows: b.rows,
                last_position: EnvelopePosition {
                    log_file: b.last.log_file.to_string(),
                    offset: b.last.offset,
                    row_index: b.last.row_index,
                    server_id: b.last.server_id,
                    gtid: b.last.gtid.as_ref().map(|g| g.to_string()),
                },
                last_executed_at: b.last_executed_at,
            }),
        }
    }
}

/// [`Envelope`] borrowing from the trigger, for encoding without copying it first: the same
/// fields in the same order, so the same bytes.
#[derive(Serialize)]
struct EnvelopeRef<'a> {
    version: u32,
    id: &'a str,
    plugin: &'a str,
    payload: &'a serde_json::Value,
    priority: &'a str,
    consumer: &'a str,
    rule: Option<&'a str>,
    source: SourceRef<'a>,
    published_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    bulk: Option<BulkRef<'a>>,
}

#[derive(Serialize)]
struct BulkRef<'a> {
    rows: u32,
    last_position: PositionRef<'a>,
    last_executed_at: i64,
}

#[derive(Serialize)]
struct SourceRef<'a> {
    destination: &'a str,
    database: &'a str,
    table: &'a str,
    event_type: &'a str,
    position: PositionRef<'a>,
    executed_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot: Option<&'a crate::event::SnapshotOrigin>,
}

#[derive(Serialize)]
struct PositionRef<'a> {
    log_file: &'a str,
    offset: u64,
    row_index: u32,
    server_id: u64,
    gtid: Option<&'a str>,
}

/// The JSON body of the envelope for `trigger`.
pub fn encode(
    trigger: &Trigger,
    published_at: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<u8>, PublishError> {
    let s = &trigger.source;
    let envelope = EnvelopeRef {
        version: ENVELOPE_VERSION,
        id: &trigger.id,
        plugin: &trigger.plugin,
        payload: &trigger.payload,
        priority: trigger.priority.as_str(),
        consumer: &trigger.consumer,
        rule: trigger.rule.as_deref(),
        source: SourceRef {
            destination: &s.destination,
            database: &s.database,
            table: &s.table,
            event_type: s.event_type.as_str(),
            position: PositionRef {
                log_file: &s.position.log_file,
                offset: s.position.offset,
                row_index: s.position.row_index,
                server_id: s.position.server_id,
                gtid: s.position.gtid.as_deref(),
            },
            executed_at: s.executed_at,
            snapshot: s.snapshot.as_deref(),
        },
        published_at: rfc3339_ms(published_at),
        bulk: trigger.bulk.as_ref().map(|b| BulkRef {
            rows: b.rows,
            last_position: PositionRef {
                log_file: &b.last.log_file,
                offset: b.last.offset,
                row_index: b.last.row_index,
                server_id: b.last.server_id,
                gtid: b.last.gtid.as_deref(),
            },
            last_executed_at: b.last_executed_at,
        }),
    };
    // the fixed part is about 400 bytes: no regrowing the buffer for a typical message
    let mut out = Vec::with_capacity(512);
    serde_json::to_writer(&mut out, &envelope).map_err(|e| PublishError::Encode {
        id: trigger.id.clone(),
        reason: e.to_string(),
    })?;
    Ok(out)
}

/// The event type as the envelope spells it (the serde name, e.g. `INSERT`).
pub(crate) fn event_type_name(t: crate::event::EventType) -> String {
    match serde_json::to_value(t) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{t:?}").to_ascii_uppercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventType, Position};
    use crate::trigger::{MessageFormat, Priority, Route, SourceRef};

    pub(crate) fn trigger() -> Trigger {
        Trigger {
            id: "0b6f6f7e-0000-5000-8000-000000000001".into(),
            plugin: "email_service".into(),
            payload: serde_json::json!({"operation": "send_welcome", "user_id": 7}),
            priority: Priority::High,
            consumer: "example_consumer".into(),
            rule: Some("welcome".into()),
            source: SourceRef {
                destination: "example".into(),
                database: "test_db".into(),
                table: "users".into(),
                event_type: EventType::Insert,
                position: Position {
                    log_file: "mysql-bin.000003".into(),
                    offset: 4242,
                    row_index: 1,
                    server_id: 1,
                    gtid: None,
                },
                executed_at: 1_700_000_000_123,
                snapshot: None,
            },
            route: Route::default(),
            format: MessageFormat::Envelope,
            bulk: None,
        }
    }

    #[test]
    fn envelope_has_the_documented_shape() {
        let at = chrono::DateTime::from_timestamp_millis(1_700_000_001_456).unwrap();
        let body = encode(&trigger(), at).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "version": 1,
                "id": "0b6f6f7e-0000-5000-8000-000000000001",
                "plugin": "email_service",
                "payload": {"operation": "send_welcome", "user_id": 7},
                "priority": "high",
                "consumer": "example_consumer",
                "rule": "welcome",
                "source": {
                    "destination": "example",
                    "database": "test_db",
                    "table": "users",
                    "event_type": "INSERT",
                    "position": {
                        "log_file": "mysql-bin.000003",
                        "offset": 4242,
                        "row_index": 1,
                        "server_id": 1,
                        "gtid": null
                    },
                    "executed_at": 1_700_000_000_123i64
                },
                "published_at": "2023-11-14T22:13:21.456Z"
            })
        );
        let back: Envelope = serde_json::from_slice(&body).unwrap();
        assert_eq!(back.version, ENVELOPE_VERSION);
        // the borrowing encoder writes exactly the bytes of the owned `Envelope`
        assert_eq!(
            body,
            serde_json::to_vec(&Envelope::from_trigger(&trigger(), at)).unwrap()
        );
        let mut t = trigger();
        t.rule = None;
        t.source.position.gtid = Some("0-1-5".into());
        assert_eq!(
            encode(&t, at).unwrap(),
            serde_json::to_vec(&Envelope::from_trigger(&t, at)).unwrap()
        );
        // a bulk message: the list payload and the `bulk` section
        let mut last = t.source.position.clone();
        last.offset = 9000;
        t.payload = serde_json::json!([{"id": 1}, {"id": 2}]);
        t.bulk = Some(crate::trigger::BulkRange {
            rows: 2,
            last,
            last_executed_at: 1_700_000_000_500,
            positions: Vec::new(),
        });
        let body = encode(&t, at).unwrap();
        assert_eq!(
            body,
            serde_json::to_vec(&Envelope::from_trigger(&t, at)).unwrap()
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["bulk"]["rows"], 2);
        assert_eq!(v["bulk"]["last_position"]["offset"], 9000);
        assert_eq!(v["bulk"]["last_executed_at"], 1_700_000_000_500i64);
        assert_eq!(v["payload"][1]["id"], 2);
        let back: Envelope = serde_json::from_slice(&body).unwrap();
        assert_eq!(back.bulk.map(|b| b.rows), Some(2));
    }
}
