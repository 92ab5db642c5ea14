//! `canal-consumer test NAME`: run one consumer on sample events and print the messages it
//! would publish, exactly as the publisher would encode them. No Canal server, no broker.

use crate::consumer::Consumer;
use crate::event::ChangeEvent;
use crate::publisher::{celery, envelope};
use crate::rules::{ConfigConsumer, ConsumerSpec, run_on_events_routed};
use crate::trigger::{MessageFormat, Route, Trigger};
use serde_json::{Value, json};

/// The message a trigger becomes, as JSON for printing.
pub fn describe_message(t: &Trigger) -> Value {
    let now = chrono::Utc::now();
    let (format, headers, body) = match &t.format {
        MessageFormat::Envelope => {
            let body = envelope::encode(t, now)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .unwrap_or(Value::Null);
            ("envelope".to_string(), Value::Null, body)
        }
        MessageFormat::Celery { task, mapping } => {
            match celery::encode(t, task, *mapping, &celery::origin()) {
                Ok(m) => (
                    format!("celery ({task})"),
                    serde_json::to_value(&m.headers).unwrap_or(Value::Null),
                    serde_json::from_slice::<Value>(&m.body).unwrap_or(Value::Null),
                ),
                Err(e) => (
                    "celery".to_string(),
                    Value::Null,
                    json!({"error": e.to_string()}),
                ),
            }
        }
    };
    json!({
        "message_id": t.id,
        "plugin": t.plugin,
        "priority": t.priority,
        "rule": t.rule,
        "exchange": t.route.exchange,
        "routing_key": t.route.routing_key,
        "format": format,
        "headers": headers,
        "body": body,
    })
}

/// Run and print. Returns the exit code: 0, or 1 when the consumer would stop.
pub fn run(spec: ConsumerSpec, events: &[ChangeEvent], route: Route) -> i32 {
    let mut consumer = ConfigConsumer::new(spec);
    let run = run_on_events_routed(&mut consumer, events, route);
    let messages: Vec<Value> = run.triggers.iter().map(describe_message).collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&messages).expect("json values serialize")
    );
    eprintln!(
        "{}: {} events, {} matched its filters, {} messages",
        consumer.name(),
        events.len(),
        run.matched,
        messages.len()
    );
    match run.stopped {
        Some((i, err)) => {
            eprintln!("the consumer would stop at event {}: {err}", i + 1);
            1
        }
        None => 0,
    }
}
