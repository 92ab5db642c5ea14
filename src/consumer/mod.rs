//! Consumers: what reacts to change events.
//!
//! A consumer has a name, table filters, and `process_event`, which sees each matching
//! [`ChangeEvent`] and calls [`ConsumerContext::trigger_plugin`] to emit work, exactly like the
//! reference system's consumer classes. Consumers written in Rust implement [`Consumer`];
//! config-defined consumers (`rules`) are one implementation of it.
//!
//! `process_event` must be deterministic for a given event: on redelivery it runs again and its
//! triggers get the same ids. Returning an error (or panicking) fails the event; the consumer
//! actor then applies the consumer's [`ErrorPolicy`].

pub mod actor;
pub mod canal_regex;
pub mod filter;
pub mod policy;

pub use filter::TableFilter;
pub use policy::{Mode, OnPoison, PoisonPolicy, ProcessFailure};

use crate::event::ChangeEvent;
use crate::trigger::{
    BulkRange, MessageFormat, Priority, Route, SourceRef, Trigger, bulk_message_id, message_id,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A per-event failure inside a consumer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConsumerError {
    /// This event could not be handled (bad data, a rule that cannot render this row). The
    /// consumer's error policy decides what happens.
    #[error("{0}")]
    Event(String),
    /// The consumer cannot continue: it is stopped, restarted with backoff by its supervisor,
    /// and the event is retried after the restart.
    #[error("consumer must stop: {0}")]
    Fatal(String),
}

/// What to do with an event whose processing failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum ErrorPolicy {
    /// Trigger a plugin (by default `error_handler`) with the event and the error.
    #[default]
    ErrorHandler,
    /// Publish the event and the error to a dead-letter route.
    DeadLetter {
        #[serde(default = "default_dead_letter_route")]
        route: Route,
    },
    /// Stop the consumer; it is restarted with backoff and retries the event.
    Stop,
}

/// Where `dead_letter` sends failed events when no route is configured.
pub fn default_dead_letter_route() -> Route {
    Route {
        exchange: String::new(),
        routing_key: "plugin_tasks.dead_letter".into(),
    }
}

pub use crate::publisher::topology::dead_letter_queue;

/// Where parked events go: the dead-letter queue of `default_route`'s queue, on the default
/// exchange.
pub fn dead_letter_route(default_route: &Route) -> Route {
    Route {
        exchange: String::new(),
        routing_key: dead_letter_queue(&default_route.routing_key),
    }
}

/// The plugin triggered by the `error_handler` policy.
pub const ERROR_HANDLER_PLUGIN: &str = "error_handler";

/// The plugin name of dead-letter messages.
pub const DEAD_LETTER_PLUGIN: &str = "dead_letter";

/// An event that failed, as an error policy reports it.
#[derive(Debug, Clone)]
pub struct Failure<'a> {
    pub consumer: &'a str,
    /// The config rule that failed, if any (in the message body and its id).
    pub rule: Option<&'a str>,
    pub event: &'a ChangeEvent,
    pub error: &'a str,
    /// Route of an `error_handler` message; `None` keeps the context's default.
    pub route: Option<Route>,
    /// Format of an `error_handler` message; `None` keeps the context's default.
    pub format: Option<MessageFormat>,
}

/// A consumer: filters plus `process_event`.
pub trait Consumer: Send + 'static {
    /// Unique name, e.g. `example_consumer`.
    fn name(&self) -> &str;

    /// Which tables and event types this consumer wants.
    fn filters(&self) -> &[TableFilter];

    /// Handle one event; emit work through `ctx`.
    fn process_event(
        &mut self,
        event: &ChangeEvent,
        ctx: &mut ConsumerContext,
    ) -> Result<(), ConsumerError>;

    /// What to do when `process_event` fails with [`ConsumerError::Event`].
    fn error_policy(&self) -> ErrorPolicy {
        ErrorPolicy::ErrorHandler
    }

    /// Called after the last event of each part (the consumer's events of one Canal batch):
    /// emit what was held back for the part (bulk rules), through `ctx`. Nothing may be held
    /// past it: the batch is acked once the part's triggers are confirmed.
    fn end_of_part(&mut self, _ctx: &mut ConsumerContext) -> Result<(), ConsumerError> {
        Ok(())
    }

    /// True if this consumer wants `event` (any filter matches).
    fn wants(&self, event: &ChangeEvent) -> bool {
        self.filters().iter().any(|f| f.matches(event))
    }
}

/// A full trigger request, for callers that need more than `trigger_plugin`.
#[derive(Debug, Clone, Default)]
pub struct TriggerRequest {
    pub plugin: String,
    pub payload: serde_json::Value,
    pub priority: Priority,
    /// The config rule name, if any (part of the message id).
    pub rule: Option<String>,
    /// Overrides the consumer's default route.
    pub route: Option<Route>,
    /// Overrides the consumer's default format.
    pub format: Option<MessageFormat>,
}

/// Handed to `process_event`: collects the triggers for the current event.
#[derive(Debug)]
pub struct ConsumerContext {
    consumer: String,
    default_route: Route,
    default_format: MessageFormat,
    source: Option<SourceRef>,
    seq: HashMap<(Option<String>, String), u32>,
    triggers: Vec<Trigger>,
    errors: usize,
    /// The newest failure an error policy handled (for `status`).
    last_error: Option<String>,
}

impl ConsumerContext {
    pub fn new(consumer: &str, default_route: Route, default_format: MessageFormat) -> Self {
        ConsumerContext {
            consumer: consumer.to_string(),
            default_route,
            default_format,
            source: None,
            seq: HashMap::new(),
            triggers: Vec::new(),
            errors: 0,
            last_error: None,
        }
    }

    /// Point the context at the next event (resets the per-event id counters).
    pub fn begin_event(&mut self, event: &ChangeEvent) {
        self.source = Some(SourceRef::from(event));
        self.seq.clear();
    }

    /// The reference API: trigger `plugin` with `payload` at `priority`.
    pub fn trigger_plugin(
        &mut self,
        plugin: &str,
        payload: serde_json::Value,
        priority: Priority,
    ) -> &Trigger {
        self.trigger(TriggerRequest {
            plugin: plugin.to_string(),
            payload,
            priority,
            ..Default::default()
        })
    }

    /// Trigger with every option.
    pub fn trigger(&mut self, req: TriggerRequest) -> &Trigger {
        let source = self
            .source
            .clone()
            .expect("ConsumerContext::begin_event must be called before triggering");
        let key = (req.rule.clone(), req.plugin.clone());
        let seq = self.seq.entry(key).or_insert(0);
        let id = message_id(
            &source,
            &self.consumer,
            req.rule.as_deref(),
            &req.plugin,
            *seq,
        );
        *seq += 1;
        self.triggers.push(Trigger {
            id,
            plugin: req.plugin,
            payload: req.payload,
            priority: req.priority,
            consumer: self.consumer.clone(),
            rule: req.rule,
            source,
            route: req.route.unwrap_or_else(|| self.default_route.clone()),
            format: req.format.unwrap_or_else(|| self.default_format.clone()),
            bulk: None,
        });
        self.triggers.last().expect("just pushed")
    }

    /// A bulk trigger: `req.payload` holds the payloads of `rows` rows from `first` to `last`
    /// (of one Canal batch, in binlog order); its id is [`bulk_message_id`] of that range.
    pub fn trigger_bulk(
        &mut self,
        req: TriggerRequest,
        first: SourceRef,
        last: &SourceRef,
        positions: Vec<crate::event::Position>,
    ) -> &Trigger {
        let rows = positions.len() as u32;
        let id = bulk_message_id(
            &first,
            last,
            rows,
            &self.consumer,
            req.rule.as_deref().unwrap_or(""),
            &req.plugin,
        );
        self.triggers.push(Trigger {
            id,
            plugin: req.plugin,
            payload: req.payload,
            priority: req.priority,
            consumer: self.consumer.clone(),
            rule: req.rule,
            source: first,
            route: req.route.unwrap_or_else(|| self.default_route.clone()),
            format: req.format.unwrap_or_else(|| self.default_format.clone()),
            bulk: Some(BulkRange {
                rows,
                last: last.position.clone(),
                last_executed_at: last.executed_at,
                positions,
            }),
        });
        self.triggers.last().expect("just pushed")
    }

    /// Triggers collected so far.
    pub fn triggers(&self) -> &[Trigger] {
        &self.triggers
    }

    /// Drop the triggers of the current event (used when it fails).
    pub fn truncate(&mut self, len: usize) {
        self.triggers.truncate(len);
    }

    /// Count an event that failed and was handled by an error policy (it shows in the
    /// consumer's `errors` in status and metrics).
    pub fn record_error(&mut self) {
        self.errors += 1;
    }

    /// Apply `policy` to a failure: trigger `error_handler`, or a dead-letter message (always
    /// in the envelope format), with `{consumer, rule (if any), error, event}` as payload, and
    /// count it. Returns false for `stop`: the caller must fail the event.
    #[must_use]
    pub fn handle_failure(&mut self, policy: &ErrorPolicy, failure: Failure<'_>) -> bool {
        let (plugin, route, format) = match policy {
            ErrorPolicy::Stop => return false,
            ErrorPolicy::ErrorHandler => (ERROR_HANDLER_PLUGIN, failure.route, failure.format),
            ErrorPolicy::DeadLetter { route } => (
                DEAD_LETTER_PLUGIN,
                Some(route.clone()),
                Some(MessageFormat::Envelope),
            ),
        };
        let mut body = serde_json::Map::new();
        body.insert("consumer".into(), failure.consumer.into());
        if let Some(rule) = failure.rule {
            body.insert("rule".into(), rule.into());
        }
        body.insert("error".into(), failure.error.into());
        body.insert("event".into(), failure.event.to_json());
        self.last_error = Some(match failure.rule {
            Some(rule) => format!("rule {rule}: {}", failure.error),
            None => failure.error.to_string(),
        });
        self.trigger(TriggerRequest {
            plugin: plugin.into(),
            payload: body.into(),
            priority: Priority::Normal,
            rule: failure.rule.map(str::to_string),
            route,
            format,
        });
        self.record_error();
        true
    }

    /// Park a failure in the dead-letter queue (`<default queue>.dead_letter`, declared by the
    /// publisher): a message with `{consumer, rule (if any), error, event}` and, when a trigger
    /// could not be routed, `original_id` and `original` (its plugin, payload, priority and
    /// route). `canal-consumer dlq replay` runs the event through the consumer again, which
    /// publishes with the original ids.
    pub fn park(&mut self, failure: Failure<'_>, original: Option<&Trigger>) {
        let mut body = serde_json::Map::new();
        body.insert("consumer".into(), failure.consumer.into());
        if let Some(rule) = failure.rule {
            body.insert("rule".into(), rule.into());
        }
        body.insert("error".into(), failure.error.into());
        if let Some(t) = original {
            body.insert("original_id".into(), t.id.clone().into());
            body.insert(
                "original".into(),
                serde_json::json!({
                    "plugin": t.plugin,
                    "payload": t.payload,
                    "priority": t.priority,
                    "exchange": t.route.exchange,
                    "routing_key": t.route.routing_key,
                }),
            );
        }
        body.insert("event".into(), failure.event.to_json());
        let plugin = match original {
            Some(t) => format!("{DEAD_LETTER_PLUGIN}:{}", t.plugin),
            None => DEAD_LETTER_PLUGIN.to_string(),
        };
        self.trigger(TriggerRequest {
            plugin,
            payload: body.into(),
            priority: Priority::Normal,
            rule: failure.rule.map(str::to_string),
            route: Some(dead_letter_route(&self.default_route)),
            format: Some(MessageFormat::Envelope),
        });
    }

    /// Take the newest failure handled by an error policy since the last call.
    pub fn take_last_error(&mut self) -> Option<String> {
        self.last_error.take()
    }

    /// Take the count of handled failures since the last call.
    pub fn take_errors(&mut self) -> usize {
        std::mem::take(&mut self.errors)
    }

    /// Take every trigger collected so far.
    pub fn take_triggers(&mut self) -> Vec<Trigger> {
        std::mem::take(&mut self.triggers)
    }
}
