//! Queue topology checked or declared at connect time (and again by the publisher when the
//! configured queue vanishes while connected).
//!
//! This module owns the worker queue's declaration as configured by `[amqp.queue]`:
//! `declare` creates it (durable, non-exclusive, non-auto-delete, `x-max-priority` and
//! `x-queue-type` when set) exactly as Celery workers would, `passive` only checks it exists,
//! `none` does nothing (a missing queue then shows as returned messages). All of it runs on a
//! separate short-lived channel, because a failed declare closes its channel.
//!
//! How it fails: a queue that exists with other arguments (RabbitMQ 406 PRECONDITION_FAILED), a
//! missing queue in passive mode (404) or a refused declare (403) becomes
//! [`PublishError::Topology`] whose text names the differing argument, the config key, and the
//! value to set; those will not fix themselves by retrying. Broker or network errors during the
//! declare are [`PublishError::Unavailable`], worth retrying.

use super::PublishError;
use crate::config::{DeadLetterStrategy, DeclareMode, QueueConfig, QueueType};
use lapin::{
    Connection, ErrorKind,
    options::QueueDeclareOptions,
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable, LongString},
};

/// The `x-` arguments this service declares the queue with.
pub fn declare_arguments(q: &QueueConfig) -> FieldTable {
    let mut args = FieldTable::default();
    if let Some(p) = q.max_priority {
        // a signed 32-bit int, as Celery (py-amqp) sends it
        args.insert("x-max-priority".into(), AMQPValue::LongInt(i32::from(p)));
    }
    if q.queue_type != QueueType::Classic {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from(q.queue_type.as_str().as_bytes())),
        );
    }
    let text = |v: &str| AMQPValue::LongString(LongString::from(v.as_bytes()));
    if !q.dead_letter_exchange.is_empty() {
        args.insert(
            "x-dead-letter-exchange".into(),
            text(&q.dead_letter_exchange),
        );
    }
    if q.queue_type == QueueType::Quorum {
        if q.dead_letter_strategy == DeadLetterStrategy::AtLeastOnce {
            args.insert(
                "x-dead-letter-strategy".into(),
                text(DeadLetterStrategy::AtLeastOnce.as_str()),
            );
            // RabbitMQ requires it: with drop-head a dropped message could not wait for the
            // dead-letter queue's confirm
            args.insert("x-overflow".into(), text("reject-publish"));
        }
        if let Some(limit) = q.delivery_limit {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(i32::try_from(limit).unwrap_or(i32::MAX)),
            );
        }
    }
    args
}

/// What `amqp.priorities` mean on a quorum queue, when that differs from what they say: a
/// warning for the log at start, `None` on classic queues (there `x-max-priority` and the
/// config checks make them exact).
///
/// Quorum queues take no `x-max-priority`. RabbitMQ 3.x delivers them FIFO whatever the
/// message priority; RabbitMQ 4.0+ has two levels, priority 0-4 (normal) and 5 and above
/// (high, served first in a 2:1 ratio).
pub fn quorum_priority_note(q: &QueueConfig, p: &crate::config::PriorityMap) -> Option<String> {
    if q.queue_type != QueueType::Quorum {
        return None;
    }
    let level = |v: u8| if v > 4 { "high" } else { "normal" };
    Some(format!(
        "quorum queue '{}': task priorities are not ordered on RabbitMQ 3.x (FIFO); RabbitMQ \
         4.0+ has two levels, and amqp.priorities maps high={} ({}), normal={} ({}), low={} ({}) \
         there{}",
        q.name,
        p.high,
        level(p.high),
        p.normal,
        level(p.normal),
        p.low,
        level(p.low),
        if level(p.normal) == level(p.high) {
            "; set amqp.priorities.normal to 4 or less for high to go first"
        } else {
            ""
        }
    ))
}

/// The config key that sets an `x-` argument, for mismatch messages.
pub fn config_key_of(arg: &str) -> Option<&'static str> {
    Some(match arg {
        "x-max-priority" => "amqp.queue.max_priority",
        "x-queue-type" => "amqp.queue.queue_type",
        "x-dead-letter-exchange" => "amqp.queue.dead_letter_exchange",
        "x-dead-letter-strategy" | "x-overflow" => "amqp.queue.dead_letter_strategy",
        "x-delivery-limit" => "amqp.queue.delivery_limit",
        _ => return None,
    })
}

/// Declare or check the queue per `q.declare`, on a channel of its own.
pub async fn ensure_queue(conn: &Connection, q: &QueueConfig) -> Result<(), PublishError> {
    let passive = match q.declare {
        DeclareMode::None => return Ok(()),
        DeclareMode::Passive => true,
        DeclareMode::Declare => false,
    };
    let channel = conn.create_channel().await.map_err(|e| {
        PublishError::Unavailable(format!("cannot open a channel to declare queues: {e}"))
    })?;
    let options = QueueDeclareOptions {
        passive,
        durable: q.durable,
        exclusive: false,
        auto_delete: false,
        nowait: false,
    };
    let args = if passive {
        FieldTable::default()
    } else {
        declare_arguments(q)
    };
    let res = channel
        .queue_declare(q.name.as_str().into(), options, args)
        .await;
    // after a 406/404 the broker has closed the channel already; nothing to do then
    if channel.status().connected() {
        let _ = channel.close(200, "topology checked".into()).await;
    }
    match res {
        Ok(_) => Ok(()),
        Err(e) => Err(explain_error(q, passive, &e)),
    }
}

/// Declare the dead-letter queue `<queue>.dead_letter` that parked events go to (durable, no
/// arguments) in `declare` mode. In `passive` mode it is only checked, and a missing one is
/// logged, not refused: parking into it would then be unroutable, which stalls (never loses)
/// the consumer that parks.
pub async fn ensure_dead_letter_queue(
    conn: &Connection,
    q: &QueueConfig,
) -> Result<(), PublishError> {
    let dlq = QueueConfig {
        name: dead_letter_queue(&q.name),
        declare: q.declare,
        durable: true,
        max_priority: None,
        // a quorum queue's dead letters are kept as safely as the queue itself
        queue_type: q.queue_type,
        ..QueueConfig::default()
    };
    let res = match ensure_queue(conn, &dlq).await {
        Ok(()) if q.declare == DeclareMode::Declare && !q.dead_letter_exchange.is_empty() => {
            bind_dead_letter_exchange(conn, &q.dead_letter_exchange, &dlq.name).await
        }
        res => res,
    };
    match (res, q.declare) {
        (Err(e), DeclareMode::Passive) => {
            tracing::error!(
                queue = %dlq.name,
                error = %e,
                "the dead-letter queue does not exist (amqp.queue.declare = \"passive\"); declare it, or parked rows stall their consumer"
            );
            Ok(())
        }
        (res, _) => res,
    }
}

/// Declare the dead-letter exchange (fanout, durable) and bind the dead-letter queue to it, so
/// what the broker dead-letters from the worker queue lands in `<queue>.dead_letter`.
async fn bind_dead_letter_exchange(
    conn: &Connection,
    exchange: &str,
    dlq: &str,
) -> Result<(), PublishError> {
    let channel = conn.create_channel().await.map_err(|e| {
        PublishError::Unavailable(format!("cannot open a channel to declare queues: {e}"))
    })?;
    let res = async {
        channel
            .exchange_declare(
                exchange.into(),
                lapin::ExchangeKind::Fanout,
                lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                dlq.into(),
                exchange.into(),
                "".into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }
    .await;
    if channel.status().connected() {
        let _ = channel
            .close(200, "dead-letter exchange declared".into())
            .await;
    }
    res.map_err(|e| match e.kind() {
        ErrorKind::ProtocolError(amqp)
            if matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            ) =>
        {
            PublishError::Topology(format!(
                "exchange '{exchange}' (amqp.queue.dead_letter_exchange) exists with other \
                 properties than a durable fanout exchange; delete it or name another one \
                 (broker said: {})",
                amqp.get_message()
            ))
        }
        _ => PublishError::Unavailable(format!(
            "declaring the dead-letter exchange '{exchange}' failed: {e}"
        )),
    })
}

/// Where one rule (or consumer default) routes, for [`check_routes`].
#[derive(Debug, Clone)]
pub struct RouteUse {
    /// e.g. `consumer example_consumer, rule welcome (config/consumers/example.toml)`.
    pub who: String,
    pub exchange: String,
    pub routing_key: String,
}

/// Check that every exchange a rule publishes to exists, and every queue it names on the
/// default exchange exists, with passive declares (each on its own channel: a 404 closes it).
/// Refused with [`PublishError::Topology`] naming the rule and what is missing.
pub async fn check_routes(conn: &Connection, uses: &[RouteUse]) -> Result<(), PublishError> {
    let mut seen = std::collections::BTreeSet::new();
    for u in uses {
        if !seen.insert((u.exchange.clone(), u.routing_key.clone())) {
            continue;
        }
        let channel = conn.create_channel().await.map_err(|e| {
            PublishError::Unavailable(format!("cannot open a channel to check routes: {e}"))
        })?;
        let res = if u.exchange.is_empty() {
            channel
                .queue_declare(
                    u.routing_key.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(|_| ())
        } else {
            channel
                .exchange_declare(
                    u.exchange.as_str().into(),
                    lapin::ExchangeKind::Direct,
                    lapin::options::ExchangeDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
        };
        if channel.status().connected() {
            let _ = channel.close(200, "route checked".into()).await;
        }
        if let Err(e) = res {
            let what = if u.exchange.is_empty() {
                format!("queue '{}' (default exchange)", u.routing_key)
            } else {
                format!("exchange '{}'", u.exchange)
            };
            return Err(PublishError::Topology(format!(
                "{} routes to {what}, which the broker does not have ({e}); declare it, or fix the route",
                u.who
            )));
        }
    }
    Ok(())
}

fn explain_error(q: &QueueConfig, passive: bool, e: &lapin::Error) -> PublishError {
    if let ErrorKind::ProtocolError(amqp) = e.kind() {
        let text = amqp.get_message().to_string();
        match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => {
                return PublishError::Topology(explain_precondition_failed(q, &text));
            }
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) if passive => {
                return PublishError::Topology(format!(
                    "queue '{}' does not exist, and amqp.queue.declare = \"passive\" requires it; \
                     start the workers once so they declare it, or set \
                     amqp.queue.declare = \"declare\" (broker said: {text})",
                    q.name
                ));
            }
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                return PublishError::Topology(format!(
                    "not allowed to declare queue '{}'; grant the user configure permission on \
                     it, or set amqp.queue.declare = \"passive\" (broker said: {text})",
                    q.name
                ));
            }
            _ => {}
        }
    }
    PublishError::Unavailable(format!("declaring queue '{}' failed: {e}", q.name))
}

/// What RabbitMQ's "inequivalent arg" text says: the argument, what we sent, what the queue has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inequivalent {
    pub arg: String,
    /// `None` when we did not send the argument.
    pub received: Option<String>,
    /// `None` when the existing queue does not have it.
    pub current: Option<String>,
}

/// Parse `inequivalent arg 'ARG' for queue 'Q' in vhost 'V': received X but current is Y`.
pub fn parse_inequivalent(text: &str) -> Option<Inequivalent> {
    let rest = &text[text.find("inequivalent arg '")? + "inequivalent arg '".len()..];
    let arg = &rest[..rest.find('\'')?];
    let after = &rest[rest.find(": received ")? + ": received ".len()..];
    let split = after.find(" but current is ")?;
    let value = |part: &str| -> Option<String> {
        let part = part.trim();
        if part == "none" {
            return None;
        }
        // "the value '10' of type 'signedint'" or "'true'"
        let start = part.find('\'')? + 1;
        let len = part[start..].find('\'')?;
        Some(part[start..start + len].to_string())
    };
    Some(Inequivalent {
        arg: arg.to_string(),
        received: value(&after[..split]),
        current: value(&after[split + " but current is ".len()..]),
    })
}

/// The argument in `invalid arg 'ARG' for queue 'Q' in vhost 'V' of queue type T` (an
/// argument the queue type does not support, e.g. `x-max-priority` on quorum queues).
pub fn parse_invalid_arg(text: &str) -> Option<String> {
    let rest = &text[text.find("invalid arg '")? + "invalid arg '".len()..];
    if text.contains("inequivalent arg '") {
        return None;
    }
    Some(rest[..rest.find('\'')?].to_string())
}

/// A 406 on queue.declare, explained: which argument differs and what to set.
pub fn explain_precondition_failed(q: &QueueConfig, text: &str) -> String {
    let name = &q.name;
    if let Some(arg) = parse_invalid_arg(text) {
        let key = match arg.as_str() {
            "x-max-priority" => "unset amqp.queue.max_priority",
            "x-queue-type" => "fix amqp.queue.queue_type",
            _ => "remove that argument",
        };
        return format!(
            "queue '{name}' cannot be declared with {arg} as a {} queue; {key}, or set \
             amqp.queue.queue_type = \"classic\" (the workers must declare it the same way) \
             (broker said: {text})",
            q.queue_type
        );
    }
    let Some(d) = parse_inequivalent(text) else {
        return format!(
            "queue '{name}' exists with different properties than amqp.queue declares; make \
             amqp.queue match it, or set amqp.queue.declare = \"passive\" (broker said: {text})"
        );
    };
    let current = d.current.clone();
    let advice = match d.arg.as_str() {
        "x-max-priority" => match (current, q.max_priority) {
            (Some(c), None) => format!(
                "queue '{name}' exists with x-max-priority={c} but amqp.queue.max_priority is \
                 unset; set amqp.queue.max_priority = {c} to match the workers (Celery \
                 task_queue_max_priority)"
            ),
            (None, Some(ours)) => format!(
                "queue '{name}' exists without x-max-priority but amqp.queue.max_priority = \
                 {ours}; unset amqp.queue.max_priority to use the queue as it is (or delete the \
                 queue so it is declared with priorities, and set Celery \
                 task_queue_max_priority = {ours} on the workers)"
            ),
            (Some(c), Some(ours)) => format!(
                "queue '{name}' exists with x-max-priority={c} but amqp.queue.max_priority = \
                 {ours}; set amqp.queue.max_priority = {c} to match the workers (Celery \
                 task_queue_max_priority)"
            ),
            (None, None) => format!("queue '{name}' differs in x-max-priority"),
        },
        "x-queue-type" => {
            let c = current.unwrap_or_else(|| "classic".into());
            format!(
                "queue '{name}' exists with x-queue-type={c} but amqp.queue.queue_type = \"{}\"; \
                 set amqp.queue.queue_type = \"{c}\" to match the workers (Celery \
                 task_default_queue_type / task_create_missing_queue_type)",
                q.queue_type
            )
        }
        "durable" => {
            let c = current.unwrap_or_else(|| "?".into());
            format!(
                "queue '{name}' exists with durable={c} but amqp.queue.durable = {}; set \
                 amqp.queue.durable = {c}",
                q.durable
            )
        }
        "exclusive" | "auto_delete" => format!(
            "queue '{name}' exists with {}={}, which this service never declares; delete the \
             queue, or set amqp.queue.declare = \"passive\" to use it as it is",
            d.arg,
            current.unwrap_or_else(|| "?".into())
        ),
        other if config_key_of(other).is_some() => {
            let key = config_key_of(other).unwrap_or("amqp.queue");
            let c = current.map_or_else(|| "no value".to_string(), |c| format!("'{c}'"));
            let r = d
                .received
                .clone()
                .map_or_else(|| "no value".to_string(), |r| format!("'{r}'"));
            format!(
                "queue '{name}' exists with {other} = {c} but this service declares {r}; set \
                 {key} to match the queue (and the workers' declaration), or set \
                 amqp.queue.declare = \"passive\" to use the queue as it is"
            )
        }
        other => {
            let c = current.map_or_else(|| "no value".to_string(), |c| format!("'{c}'"));
            let r = d
                .received
                .clone()
                .map_or_else(|| "no value".to_string(), |r| format!("'{r}'"));
            format!(
                "queue '{name}' exists with {other} = {c} but this service declares {r}; set \
                 amqp.queue.declare = \"passive\" to use the queue as it is, or put {other} in \
                 a policy instead of a queue argument"
            )
        }
    };
    format!("{advice} (broker said: {text})")
}

/// The dead-letter queue that goes with a worker queue: `<queue>.dead_letter`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead_letter")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(max: Option<u8>) -> QueueConfig {
        QueueConfig {
            name: "plugin_tasks".into(),
            max_priority: max,
            ..QueueConfig::default()
        }
    }

    #[test]
    fn parses_rabbitmq_texts() {
        let t = "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue \
                 'plugin_tasks' in vhost '/': received none but current is the value '10' of \
                 type 'signedint'";
        assert_eq!(
            parse_inequivalent(t),
            Some(Inequivalent {
                arg: "x-max-priority".into(),
                received: None,
                current: Some("10".into())
            })
        );
        let t = "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' in vhost '/': \
                 received 'false' but current is 'true'";
        assert_eq!(
            parse_inequivalent(t),
            Some(Inequivalent {
                arg: "durable".into(),
                received: Some("false".into()),
                current: Some("true".into())
            })
        );
        assert_eq!(parse_inequivalent("something else"), None);
    }

    #[test]
    fn explains_the_priority_mismatch() {
        let t = "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue \
                 'plugin_tasks' in vhost '/': received none but current is the value '10' of \
                 type 'signedint'";
        let msg = explain_precondition_failed(&q(None), t);
        assert!(msg.starts_with(
            "queue 'plugin_tasks' exists with x-max-priority=10 but amqp.queue.max_priority is \
             unset; set amqp.queue.max_priority = 10 to match the workers (Celery \
             task_queue_max_priority)"
        ));
        let t = "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue \
                 'plugin_tasks' in vhost '/': received the value '5' of type 'signedint' but \
                 current is none";
        let msg = explain_precondition_failed(&q(Some(5)), t);
        assert!(msg.contains("exists without x-max-priority but amqp.queue.max_priority = 5"));
    }

    #[test]
    fn explains_an_argument_the_queue_type_refuses() {
        let t = "PRECONDITION_FAILED - invalid arg 'x-max-priority' for queue 'q' in vhost '/' \
                 of queue type rabbit_quorum_queue";
        let quorum = QueueConfig {
            name: "q".into(),
            queue_type: QueueType::Quorum,
            max_priority: Some(10),
            ..QueueConfig::default()
        };
        let msg = explain_precondition_failed(&quorum, t);
        assert!(
            msg.starts_with(
                "queue 'q' cannot be declared with x-max-priority as a quorum queue; unset \
                 amqp.queue.max_priority"
            ),
            "{msg}"
        );
        assert_eq!(parse_invalid_arg("inequivalent arg 'x' for"), None);
    }

    #[test]
    fn quorum_arguments_follow_the_config() {
        let quorum = QueueConfig {
            queue_type: QueueType::Quorum,
            max_priority: None,
            dead_letter_exchange: "plugin_tasks.dlx".into(),
            dead_letter_strategy: DeadLetterStrategy::AtLeastOnce,
            delivery_limit: Some(5),
            ..QueueConfig::default()
        };
        let a = declare_arguments(&quorum);
        let text = |v: &str| Some(AMQPValue::LongString(v.into()));
        assert_eq!(a.inner().get("x-queue-type").cloned(), text("quorum"));
        assert_eq!(
            a.inner().get("x-dead-letter-exchange").cloned(),
            text("plugin_tasks.dlx")
        );
        assert_eq!(
            a.inner().get("x-dead-letter-strategy").cloned(),
            text("at-least-once")
        );
        assert_eq!(a.inner().get("x-overflow").cloned(), text("reject-publish"));
        assert_eq!(
            a.inner().get("x-delivery-limit"),
            Some(&AMQPValue::LongInt(5))
        );
        // at-most-once is RabbitMQ's default: nothing to declare, and no overflow either
        let at_most = QueueConfig {
            dead_letter_strategy: DeadLetterStrategy::AtMostOnce,
            ..quorum
        };
        let a = declare_arguments(&at_most);
        assert!(!a.inner().contains_key("x-dead-letter-strategy"));
        assert!(!a.inner().contains_key("x-overflow"));
    }

    #[test]
    fn priorities_on_a_quorum_queue_are_explained() {
        let quorum = QueueConfig {
            queue_type: QueueType::Quorum,
            max_priority: None,
            ..QueueConfig::default()
        };
        let note = quorum_priority_note(&quorum, &crate::config::PriorityMap::default())
            .expect("a note for quorum queues");
        assert!(note.contains("not ordered on RabbitMQ 3.x"), "{note}");
        assert!(
            note.contains("high=9 (high), normal=5 (high), low=1 (normal)"),
            "{note}"
        );
        assert!(
            note.contains("set amqp.priorities.normal to 4 or less"),
            "{note}"
        );
        let two_levels = crate::config::PriorityMap {
            high: 9,
            normal: 4,
            low: 0,
        };
        let note = quorum_priority_note(&quorum, &two_levels).unwrap();
        assert!(!note.contains("set amqp.priorities.normal"), "{note}");
        assert_eq!(
            quorum_priority_note(&q(Some(10)), &crate::config::PriorityMap::default()),
            None
        );
    }

    #[test]
    fn a_quorum_argument_mismatch_names_the_argument_and_the_key() {
        let t = "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'q' in \
                 vhost '/': received the value '5' of type 'signedint' but current is the \
                 value '3' of type 'signedint'";
        let q = QueueConfig {
            name: "q".into(),
            queue_type: QueueType::Quorum,
            max_priority: None,
            delivery_limit: Some(5),
            ..QueueConfig::default()
        };
        let msg = explain_precondition_failed(&q, t);
        assert!(
            msg.starts_with(
                "queue 'q' exists with x-delivery-limit = '3' but this service declares '5'; \
                 set amqp.queue.delivery_limit"
            ),
            "{msg}"
        );
    }

    #[test]
    fn arguments_follow_the_config() {
        let a = declare_arguments(&q(Some(10)));
        assert_eq!(
            a.inner().get("x-max-priority"),
            Some(&AMQPValue::LongInt(10))
        );
        assert!(!a.inner().contains_key("x-queue-type"));
        let quorum = QueueConfig {
            queue_type: QueueType::Quorum,
            max_priority: None,
            ..QueueConfig::default()
        };
        let a = declare_arguments(&quorum);
        assert_eq!(
            a.inner().get("x-queue-type"),
            Some(&AMQPValue::LongString("quorum".into()))
        );
        assert!(!a.inner().contains_key("x-max-priority"));
    }
}
