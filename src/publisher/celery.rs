//! Celery task protocol v2 messages, so unchanged Celery workers run our triggers.
//!
//! This module owns the Celery message shape: the headers a worker reads (`task`, `id`, ...),
//! the `[args, kwargs, embed]` JSON body, and how a trigger's payload maps to the task call
//! ([`CeleryMapping`]). It never talks to the broker; the publisher sets the AMQP properties
//! (`content_type`, `content_encoding`, `correlation_id` = task id, priority, persistence).
//!
//! Failure: encoding fails only if the payload cannot be serialised
//! ([`PublishError::Encode`]). Things this module cannot check: that the worker registered
//! `task`, and that it accepts `application/json`; a worker drops such messages, so the task
//! name must match the worker's (see `tests/workers/tasks.py`).
//!
//! Our own metadata rides in extra headers prefixed `canal_consumer_`; Celery copies unknown
//! headers into the task's request context and otherwise ignores them.

use super::PublishError;
use crate::trigger::{CeleryMapping, Trigger};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use serde_json::{Value, json};

/// Celery truncates `argsrepr`/`kwargsrepr` to this many characters; so do we.
const REPR_MAX: usize = 1024;

/// A Celery v2 message: its headers and its JSON body.
#[derive(Debug, Clone)]
pub struct CeleryMessage {
    pub headers: FieldTable,
    pub body: Vec<u8>,
}

/// The positional and keyword arguments the task is called with.
pub fn call_arguments(trigger: &Trigger, mapping: CeleryMapping) -> (Value, Value) {
    match mapping {
        CeleryMapping::Kwargs => match &trigger.payload {
            Value::Object(_) => (json!([]), trigger.payload.clone()),
            other => (json!([]), json!({ "payload": other })),
        },
        CeleryMapping::Args => (json!([trigger.plugin, trigger.payload]), json!({})),
        CeleryMapping::Payload => (
            json!([]),
            json!({ "plugin": trigger.plugin, "payload": trigger.payload }),
        ),
    }
}

/// Celery's `origin` header for this process: `gen<pid>@<host>`.
pub fn origin() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string());
    format!("gen{}@{}", std::process::id(), host)
}

/// Encode `trigger` as a call of Celery task `task`.
pub fn encode(
    trigger: &Trigger,
    task: &str,
    mapping: CeleryMapping,
    origin: &str,
) -> Result<CeleryMessage, PublishError> {
    let (args, kwargs) = call_arguments(trigger, mapping);
    let embed = json!({"callbacks": null, "errbacks": null, "chain": null, "chord": null});
    let body =
        serde_json::to_vec(&json!([args, kwargs, embed])).map_err(|e| PublishError::Encode {
            id: trigger.id.clone(),
            reason: e.to_string(),
        })?;

    let mut h = FieldTable::default();
    let s = |v: &str| AMQPValue::LongString(LongString::from(v.as_bytes()));
    h.insert("lang".into(), s("py"));
    h.insert("task".into(), s(task));
    h.insert("id".into(), s(&trigger.id));
    h.insert("shadow".into(), AMQPValue::Void);
    h.insert("eta".into(), AMQPValue::Void);
    h.insert("expires".into(), AMQPValue::Void);
    h.insert("group".into(), AMQPValue::Void);
    h.insert("group_index".into(), AMQPValue::Void);
    h.insert("retries".into(), AMQPValue::LongInt(0));
    // [hard, soft], as Celery's sender and worker use it (the protocol doc says the opposite)
    h.insert(
        "timelimit".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void, AMQPValue::Void])),
    );
    h.insert("root_id".into(), s(&trigger.id));
    h.insert("parent_id".into(), AMQPValue::Void);
    h.insert("argsrepr".into(), s(&repr(&args)));
    h.insert("kwargsrepr".into(), s(&repr(&kwargs)));
    h.insert("origin".into(), s(origin));
    h.insert("ignore_result".into(), AMQPValue::Boolean(true));
    // our metadata; harmless to Celery
    h.insert("canal_consumer_plugin".into(), s(&trigger.plugin));
    h.insert("canal_consumer_consumer".into(), s(&trigger.consumer));
    if let Some(rule) = &trigger.rule {
        h.insert("canal_consumer_rule".into(), s(rule));
    }
    let src = &trigger.source;
    h.insert(
        "canal_consumer_table".into(),
        s(&format!("{}.{}", src.database, src.table)),
    );
    h.insert(
        "canal_consumer_event_type".into(),
        s(&super::envelope::event_type_name(src.event_type)),
    );
    h.insert(
        "canal_consumer_position".into(),
        s(&format!(
            "{}:{}:{}",
            src.position.log_file, src.position.offset, src.position.row_index
        )),
    );
    h.insert(
        "canal_consumer_priority".into(),
        s(trigger.priority.as_str()),
    );
    if let Some(b) = &trigger.bulk {
        // a bulk message: the payload (the task's list argument) holds `rows` rows, from
        // `canal_consumer_position` to this
        h.insert(
            "canal_consumer_bulk_rows".into(),
            AMQPValue::LongUInt(b.rows),
        );
        h.insert(
            "canal_consumer_last_position".into(),
            s(&format!(
                "{}:{}:{}",
                b.last.log_file, b.last.offset, b.last.row_index
            )),
        );
    }
    Ok(CeleryMessage { headers: h, body })
}

/// A short textual form of the call arguments for worker logs (JSON, cut like Celery does).
fn repr(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(REPR_MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventType, Position};
    use crate::trigger::{MessageFormat, Priority, Route, SourceRef};

    fn trigger(payload: Value) -> Trigger {
        Trigger {
            id: "task-1".into(),
            plugin: "order_processor".into(),
            payload,
            priority: Priority::High,
            consumer: "example_consumer".into(),
            rule: None,
            source: SourceRef {
                destination: "example".into(),
                database: "test_db".into(),
                table: "orders".into(),
                event_type: EventType::Insert,
                position: Position {
                    log_file: "mysql-bin.000001".into(),
                    offset: 99,
                    row_index: 0,
                    server_id: 1,
                    gtid: None,
                },
                executed_at: 0,
                snapshot: None,
            },
            route: Route::default(),
            format: MessageFormat::Celery {
                task: "plugins.run".into(),
                mapping: CeleryMapping::Kwargs,
            },
            bulk: None,
        }
    }

    fn header<'a>(m: &'a CeleryMessage, k: &str) -> &'a AMQPValue {
        m.headers
            .inner()
            .get(k)
            .unwrap_or_else(|| panic!("missing {k}"))
    }

    fn text(v: &AMQPValue) -> String {
        match v {
            AMQPValue::LongString(s) => s.to_string(),
            other => panic!("not a string: {other:?}"),
        }
    }

    #[test]
    fn mappings() {
        let obj = trigger(json!({"order_id": 5}));
        assert_eq!(
            call_arguments(&obj, CeleryMapping::Kwargs),
            (json!([]), json!({"order_id": 5}))
        );
        let scalar = trigger(json!(5));
        assert_eq!(
            call_arguments(&scalar, CeleryMapping::Kwargs),
            (json!([]), json!({"payload": 5}))
        );
        assert_eq!(
            call_arguments(&obj, CeleryMapping::Args),
            (json!(["order_processor", {"order_id": 5}]), json!({}))
        );
        assert_eq!(
            call_arguments(&obj, CeleryMapping::Payload),
            (
                json!([]),
                json!({"plugin": "order_processor", "payload": {"order_id": 5}})
            )
        );
    }

    #[test]
    fn message_has_the_v2_headers_and_body() {
        let t = trigger(json!({"order_id": 5}));
        let m = encode(&t, "plugins.run", CeleryMapping::Kwargs, "gen1@h").unwrap();
        let body: Value = serde_json::from_slice(&m.body).unwrap();
        assert_eq!(
            body,
            json!([[], {"order_id": 5},
                {"callbacks": null, "errbacks": null, "chain": null, "chord": null}])
        );
        assert_eq!(text(header(&m, "task")), "plugins.run");
        assert_eq!(text(header(&m, "id")), "task-1");
        assert_eq!(text(header(&m, "root_id")), "task-1");
        assert_eq!(text(header(&m, "lang")), "py");
        assert_eq!(text(header(&m, "origin")), "gen1@h");
        assert_eq!(text(header(&m, "kwargsrepr")), r#"{"order_id":5}"#);
        assert_eq!(*header(&m, "parent_id"), AMQPValue::Void);
        assert_eq!(*header(&m, "group"), AMQPValue::Void);
        assert_eq!(*header(&m, "retries"), AMQPValue::LongInt(0));
        assert_eq!(*header(&m, "ignore_result"), AMQPValue::Boolean(true));
        assert_eq!(
            *header(&m, "timelimit"),
            AMQPValue::FieldArray(vec![AMQPValue::Void, AMQPValue::Void].into())
        );
        assert_eq!(
            text(header(&m, "canal_consumer_position")),
            "mysql-bin.000001:99:0"
        );
        assert_eq!(text(header(&m, "canal_consumer_plugin")), "order_processor");
    }

    #[test]
    fn repr_is_cut_at_a_char_boundary() {
        let long = Value::String("é".repeat(2000));
        let r = repr(&long);
        assert!(r.ends_with("..."));
        assert_eq!(r.chars().count(), REPR_MAX + 3);
    }
}
