//! The tap: a read-only copy of what the consumers process, for `canal-consumer tail`.
//!
//! Like `vector tap`, it observes the running pipeline instead of opening a second Canal
//! client. Each consumer actor calls [`Tap::publish`] after it processed a batch, with the
//! batch's events it handled and the triggers it produced. Every listener (one per `GET /tap`
//! request of the admin endpoint) gets, for each matching (consumer, event), one JSON line:
//!
//! ```json
//! {"consumer":"example_consumer","event":{...the change event...},"triggers":[{"plugin":"email_service","id":"...","priority":"normal","rule":"welcome"}]}
//! ```
//!
//! An event routed to two consumers shows once per consumer; an event no consumer handles
//! does not show. Filters ([`TapFilter`]): a regex on `database.table`, one consumer, or only
//! events that fired at least one trigger.
//!
//! It cannot hurt the pipeline: [`Tap::publish`] is one atomic load when nobody listens, and
//! otherwise never waits: each listener has its own bounded queue, and a line that does not fit
//! is dropped for that listener and counted. The listener's stream then reports the count as a
//! line `{"dropped":N}` (N lines dropped since the previous report). Memory is bounded by the
//! listeners' queue sizes times the line size. An idle stream sends an empty line every
//! [`KEEPALIVE`], so a reader that went away is noticed and detached.

use crate::event::ChangeEvent;
use crate::trigger::Trigger;
use bytes::Bytes;
use futures::Stream;
use regex::Regex;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::mpsc;

/// Lines queued per listener unless it asks otherwise.
pub const DEFAULT_BUFFER: usize = 1024;
/// The largest queue a listener may ask for.
pub const MAX_BUFFER: usize = 65536;
/// An idle stream sends an empty line this often.
pub const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(1);

/// What one listener wants to see.
#[derive(Debug, Clone, Default)]
pub struct TapFilter {
    /// Matched (unanchored) against `database.table`.
    pub table: Option<Regex>,
    /// Only this consumer.
    pub consumer: Option<String>,
    /// Only events that produced at least one trigger.
    pub fired_only: bool,
}

impl TapFilter {
    fn wants(&self, consumer: &str, table: &str, fired: bool) -> bool {
        (!self.fired_only || fired)
            && self.consumer.as_deref().is_none_or(|c| c == consumer)
            && self.table.as_ref().is_none_or(|r| r.is_match(table))
    }
}

struct Listener {
    id: u64,
    filter: TapFilter,
    tx: mpsc::Sender<Bytes>,
    dropped: Arc<AtomicU64>,
}

#[derive(Default)]
struct Inner {
    listening: AtomicUsize,
    next_id: AtomicU64,
    listeners: Mutex<Vec<Listener>>,
}

/// The hub. Cheap to clone (one `Arc`).
#[derive(Clone, Default)]
pub struct Tap {
    inner: Arc<Inner>,
}

/// The process's tap, the one the consumer actors publish to and the admin endpoint serves.
pub fn global() -> &'static Tap {
    static GLOBAL: OnceLock<Tap> = OnceLock::new();
    GLOBAL.get_or_init(Tap::default)
}

#[derive(Serialize)]
struct TriggerLine<'a> {
    plugin: &'a str,
    id: &'a str,
    priority: crate::trigger::Priority,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
}

#[derive(Serialize)]
struct Line<'a> {
    consumer: &'a str,
    event: &'a ChangeEvent,
    triggers: Vec<TriggerLine<'a>>,
}

impl Tap {
    /// A new, separate hub (tests; the service uses [`global`]).
    pub fn new() -> Self {
        Tap::default()
    }

    /// How many listeners are attached.
    pub fn listeners(&self) -> usize {
        self.inner.listening.load(Ordering::Acquire)
    }

    /// Offer what `consumer` just processed: `events[i]` for each `i` in `indices`, and the
    /// `triggers` it produced for them (matched to their event by source position). Never
    /// blocks; does nothing when nobody listens.
    pub fn publish(
        &self,
        consumer: &str,
        events: &[ChangeEvent],
        indices: &[usize],
        triggers: &[Trigger],
    ) {
        if self.listeners() == 0 {
            return;
        }
        let listeners = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for event in indices.iter().filter_map(|&i| events.get(i)) {
            let fired: Vec<&Trigger> = triggers
                .iter()
                .filter(|t| {
                    t.source.position == event.position
                        && t.source.table == event.table
                        && t.source.database == event.database
                })
                .collect();
            let table = event.full_table();
            let mut line: Option<Bytes> = None;
            for l in listeners.iter() {
                if !l.filter.wants(consumer, &table, !fired.is_empty()) {
                    continue;
                }
                let bytes = line
                    .get_or_insert_with(|| {
                        let record = Line {
                            consumer,
                            event,
                            triggers: fired
                                .iter()
                                .map(|t| TriggerLine {
                                    plugin: &t.plugin,
                                    id: &t.id,
                                    priority: t.priority,
                                    rule: t.rule.as_deref(),
                                })
                                .collect(),
                        };
                        let mut v = serde_json::to_vec(&record).unwrap_or_default();
                        v.push(b'\n');
                        Bytes::from(v)
                    })
                    .clone();
                if let Err(mpsc::error::TrySendError::Full(_)) = l.tx.try_send(bytes) {
                    l.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Attach a listener with a queue of `buffer` lines (clamped to 1..=[`MAX_BUFFER`]).
    pub fn subscribe(&self, filter: TapFilter, buffer: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(buffer.clamp(1, MAX_BUFFER));
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut listeners = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        listeners.push(Listener {
            id,
            filter,
            tx,
            dropped: dropped.clone(),
        });
        self.inner
            .listening
            .store(listeners.len(), Ordering::Release);
        Subscription {
            tap: self.clone(),
            id,
            rx,
            dropped,
        }
    }
}

/// One listener. Dropping it detaches it.
pub struct Subscription {
    tap: Tap,
    id: u64,
    rx: mpsc::Receiver<Bytes>,
    dropped: Arc<AtomicU64>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut listeners = self
            .tap
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        listeners.retain(|l| l.id != self.id);
        self.tap
            .inner
            .listening
            .store(listeners.len(), Ordering::Release);
    }
}

impl Subscription {
    /// The next line: a `{"dropped":N}` report when lines were dropped since the last one,
    /// else the next queued record, waiting for it at most [`KEEPALIVE`]; after that, an
    /// empty line (readers skip it; writing it is how the server notices a reader that went
    /// away, which detaches it). `None` once the hub is gone.
    pub async fn next_line(&mut self) -> Option<Bytes> {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            return Some(Bytes::from(format!("{{\"dropped\":{dropped}}}\n")));
        }
        match tokio::time::timeout(KEEPALIVE, self.rx.recv()).await {
            Ok(line) => line,
            Err(_) => Some(Bytes::from_static(b"\n")),
        }
    }

    /// The lines as a stream (for a streaming HTTP body).
    pub fn into_stream(self) -> impl Stream<Item = Bytes> {
        futures::stream::unfold(self, |mut s| async move {
            let line = s.next_line().await?;
            Some((line, s))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventType, Position};
    use crate::trigger::{Priority, SourceRef};

    fn event(table: &str, offset: u64) -> ChangeEvent {
        ChangeEvent {
            destination: "example".into(),
            database: "test_db".into(),
            table: table.into(),
            event_type: EventType::Insert,
            data: Default::default(),
            old: None,
            changed: Default::default(),
            primary_keys: Default::default(),
            position: Position {
                log_file: "mysql-bin.000001".into(),
                offset,
                row_index: 0,
                ..Default::default()
            },
            executed_at: 0,
            is_ddl: false,
            sql: None,
            snapshot: None,
        }
    }

    fn trigger(e: &ChangeEvent, plugin: &str) -> Trigger {
        Trigger {
            id: format!("id-{plugin}-{}", e.position.offset),
            plugin: plugin.into(),
            payload: serde_json::json!({}),
            priority: Priority::High,
            consumer: "c".into(),
            rule: Some("r".into()),
            source: SourceRef::from(e),
            route: Default::default(),
            format: Default::default(),
            bulk: None,
        }
    }

    fn json(b: &Bytes) -> serde_json::Value {
        serde_json::from_slice(b).unwrap()
    }

    #[tokio::test]
    async fn filters_pair_triggers_with_their_event_and_count_drops() {
        let tap = Tap::new();
        let events = vec![event("users", 1), event("orders", 2), event("users", 3)];
        let triggers = vec![trigger(&events[1], "order_processor")];
        // nobody listens: nothing happens, nothing is kept
        tap.publish("c", &events, &[0, 1, 2], &triggers);
        let mut all = tap.subscribe(TapFilter::default(), 16);
        let mut fired = tap.subscribe(
            TapFilter {
                fired_only: true,
                ..Default::default()
            },
            16,
        );
        let mut users = tap.subscribe(
            TapFilter {
                table: Some(Regex::new(r"^test_db\.users$").unwrap()),
                consumer: Some("c".into()),
                ..Default::default()
            },
            1,
        );
        let mut other = tap.subscribe(
            TapFilter {
                consumer: Some("someone_else".into()),
                ..Default::default()
            },
            16,
        );
        assert_eq!(tap.listeners(), 4);
        tap.publish("c", &events, &[0, 1, 2], &triggers);

        let mut seen = Vec::new();
        for _ in 0..3 {
            let v = json(&all.next_line().await.unwrap());
            seen.push((
                v["event"]["position"]["offset"].as_u64().unwrap(),
                v["triggers"].as_array().unwrap().len(),
            ));
        }
        assert_eq!(seen, [(1, 0), (2, 1), (3, 0)]);
        let v = json(&fired.next_line().await.unwrap());
        assert_eq!(v["consumer"], "c");
        assert_eq!(v["event"]["table"], "orders");
        assert_eq!(
            v["triggers"],
            serde_json::json!([{"plugin": "order_processor", "id": "id-order_processor-2",
                                "priority": "high", "rule": "r"}])
        );
        // queue of 1: offset 1 kept, offset 3 dropped and reported
        let v = json(&users.next_line().await.unwrap());
        assert_eq!(v, serde_json::json!({"dropped": 1}));
        let v = json(&users.next_line().await.unwrap());
        assert_eq!(v["event"]["position"]["offset"], 1);
        assert!(other.rx.try_recv().is_err());
        drop((all, fired, users));
        assert_eq!(tap.listeners(), 1);
        drop(other);
        assert_eq!(tap.listeners(), 0);
    }
}
