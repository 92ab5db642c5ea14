//! The AMQP publisher against a real RabbitMQ (127.0.0.1:5672, guest/guest; start it with
//! `deploy/local/up` or `deploy/local/rabbit-ctl start`; `CC_TEST_AMQP_URL` overrides the
//! address, `CC_TEST_RABBIT_NODE` the node `rabbitmqctl` drives, `CC_TEST_QUEUE_PREFIX` is put
//! before every queue name).
//!
//! What these prove: messages arrive with our ids, headers, priority and body in both formats;
//! an unroutable message fails its `Publish` (never Ok) and is counted; a queue that exists with
//! other arguments fails the start with a message naming the argument; a high-priority trigger
//! overtakes a backlog; a broker outage fails pending publishes, never loses an Ok'd one, and
//! publishing resumes after it; a memory alarm shows as `blocked` and publishes fail instead of
//! succeeding; a real Celery worker runs our Celery-format messages with our task ids.
//!
//! Every test uses its own queue. Tests that stop the broker or raise an alarm take the
//! [`BROKER`] lock exclusively; the others take it shared. Waits poll with a deadline.
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use actix::prelude::*;
use canal_consumer::config::{AmqpConfig, DeclareMode, QueueConfig, QueueType, Secret};
use canal_consumer::event::{EventType, Position};
use canal_consumer::publisher::{
    AmqpPublisher, GetPublisherStatus, Publish, PublishError, PublisherState, PublisherStatus,
    StopPublishing,
};
use canal_consumer::trigger::{CeleryMapping, MessageFormat, Priority, Route, SourceRef, Trigger};
use common::proc::ChildGuard;
use common::rabbitmqctl_cmd;
use lapin::{
    Channel, Connection, ConnectionProperties,
    options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{RwLock, oneshot};

/// Shared by ordinary tests, exclusive for tests that disturb the broker.
static BROKER: RwLock<()> = RwLock::const_new(());

fn amqp_url() -> String {
    common::amqp_url()
}

/// A queue name of its own for each test: `[CC_TEST_QUEUE_PREFIX]cc_pub_<what>_<pid>_<n>`. A
/// broker policy (set once per run) expires such queues after 10 idle minutes, so failed runs
/// leave no litter; policies, unlike queue arguments, do not take part in the declaration
/// equivalence check.
fn unique(prefix: &str) -> String {
    static POLICY: std::sync::Once = std::sync::Once::new();
    let base = common::queue("cc_pub_");
    POLICY.call_once(|| {
        let _ = rabbitmqctl_cmd()
            .args([
                "-q",
                "set_policy",
                "--apply-to",
                "queues",
                "canal-consumer-publisher-tests",
                &format!("^{}", regex::escape(&base)),
                r#"{"expires":600000}"#,
            ])
            .output();
    });
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{base}{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn config(queue: &str, declare: DeclareMode, max_priority: Option<u8>) -> AmqpConfig {
    AmqpConfig {
        url: Secret::new(amqp_url()),
        max_unconfirmed: NonZeroUsize::new(64).unwrap(),
        confirm_timeout: Duration::from_secs(5),
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(1),
        queue: QueueConfig {
            name: queue.to_string(),
            declare,
            durable: true,
            max_priority,
            queue_type: QueueType::Classic,
            ..QueueConfig::default()
        },
        ..AmqpConfig::default()
    }
}

fn trigger(n: u64, queue: &str, priority: Priority, format: MessageFormat) -> Trigger {
    Trigger {
        id: format!("{queue}-{n}"),
        plugin: "email_service".into(),
        payload: json!({"operation": "send_welcome", "user_id": n}),
        priority,
        consumer: "example_consumer".into(),
        rule: Some("welcome".into()),
        source: SourceRef {
            destination: "example".into(),
            database: "test_db".into(),
            table: "users".into(),
            event_type: EventType::Insert,
            position: Position {
                log_file: "mysql-bin.000001".into(),
                offset: 1000 + n,
                row_index: 0,
                server_id: 1,
                gtid: None,
            },
            executed_at: 1_700_000_000_000,
            snapshot: None,
        },
        route: Route {
            exchange: String::new(),
            routing_key: queue.to_string(),
        },
        format,
        bulk: None,
    }
}

fn celery(task: &str, mapping: CeleryMapping) -> MessageFormat {
    MessageFormat::Celery {
        task: task.into(),
        mapping,
    }
}

/// Publish and wait for the answer (bounded, so a hang fails the test instead of stalling).
async fn publish(addr: &Addr<AmqpPublisher>, triggers: Vec<Trigger>) -> Result<(), PublishError> {
    let (reply, rx) = oneshot::channel();
    addr.send(Publish {
        triggers,
        epoch: 1,
        reply,
    })
    .await
    .expect("publisher alive");
    tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .expect("a Publish must always be answered")
        .expect("reply sender dropped without an answer")
}

async fn status(addr: &Addr<AmqpPublisher>) -> PublisherStatus {
    addr.send(GetPublisherStatus)
        .await
        .expect("publisher alive")
}

async fn wait_status(
    addr: &Addr<AmqpPublisher>,
    what: &str,
    limit: Duration,
    pred: impl Fn(&PublisherStatus) -> bool,
) -> PublisherStatus {
    let deadline = Instant::now() + limit;
    loop {
        let st = status(addr).await;
        if pred(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; status: {st:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logs to the test output (`RUST_LOG=canal_consumer=debug` for more).
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "canal_consumer=info".into()),
        )
        .try_init();
}

async fn start_connected(cfg: AmqpConfig) -> Addr<AmqpPublisher> {
    init_logs();
    let addr = AmqpPublisher::start_checked(cfg)
        .await
        .expect("publisher starts");
    wait_status(&addr, "connected", Duration::from_secs(20), |s| {
        s.state == PublisherState::Connected
    })
    .await;
    addr
}

/// A plain lapin connection for the test's own reads and setup.
async fn raw() -> (Connection, Channel) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "RabbitMQ is not reachable ({e}); start it with deploy/local/up or \
                 deploy/local/rabbit-ctl start"
            )
        });
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

async fn declare_raw(ch: &Channel, queue: &str, max_priority: Option<i32>) {
    let mut args = FieldTable::default();
    if let Some(p) = max_priority {
        args.insert("x-max-priority".into(), AMQPValue::LongInt(p));
    }
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .expect("declare test queue");
}

async fn delete_queue(queue: &str) {
    let (conn, ch) = raw().await;
    let _ = ch
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
}

/// Take every message now in `queue` (no ack needed).
async fn drain(ch: &Channel, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic_get")
    {
        out.push(m);
    }
    out
}

fn header_str(m: &lapin::message::Delivery, k: &str) -> Option<String> {
    match m.properties.headers().as_ref()?.inner().get(k)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = rabbitmqctl_cmd()
        .args(args)
        .output()
        .expect("rabbitmqctl is installed with the broker");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[actix_rt::test]
async fn messages_arrive_with_ids_headers_priority_and_body() {
    let _shared = BROKER.read().await;
    let queue = unique("formats");
    let addr = start_connected(config(&queue, DeclareMode::Declare, Some(10))).await;

    let triggers = vec![
        trigger(1, &queue, Priority::High, MessageFormat::Envelope),
        trigger(
            2,
            &queue,
            Priority::Normal,
            celery("plugins.run", CeleryMapping::Kwargs),
        ),
        trigger(
            3,
            &queue,
            Priority::Low,
            celery("plugins.run", CeleryMapping::Args),
        ),
    ];
    publish(&addr, triggers.clone()).await.expect("published");
    let st = status(&addr).await;
    assert_eq!(
        (st.counters.published, st.counters.confirmed, st.unconfirmed),
        (3, 3, 0)
    );

    let (conn, ch) = raw().await;
    let got = drain(&ch, &queue).await;
    assert_eq!(got.len(), 3);
    // published high, normal, low; the priority queue hands them out high (9), normal (5),
    // low (1) -- checked as delivered, not sorted into that order
    for (m, t) in got.iter().zip(&triggers) {
        let p = &m.properties;
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), t.id);
        assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), t.id);
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(p.content_encoding().as_ref().unwrap().as_str(), "utf-8");
        assert!(p.timestamp().is_some());
    }
    let prio: Vec<_> = got.iter().map(|m| *m.properties.priority()).collect();
    assert_eq!(prio, vec![Some(9), Some(5), Some(1)]);

    // envelope
    let env: Value = serde_json::from_slice(&got[0].data).unwrap();
    assert_eq!(env["version"], 1);
    assert_eq!(env["id"], triggers[0].id);
    assert_eq!(env["plugin"], "email_service");
    assert_eq!(
        env["payload"],
        json!({"operation": "send_welcome", "user_id": 1})
    );
    assert_eq!(env["priority"], "high");
    assert_eq!(env["source"]["table"], "users");
    assert_eq!(env["source"]["event_type"], "INSERT");
    assert_eq!(env["source"]["position"]["offset"], 1001);
    assert_eq!(
        got[0].properties.kind().as_ref().unwrap().as_str(),
        "canal_consumer.trigger.v1"
    );

    // celery, kwargs mapping
    let c = &got[1];
    assert_eq!(header_str(c, "task").as_deref(), Some("plugins.run"));
    assert_eq!(
        header_str(c, "id").as_deref(),
        Some(triggers[1].id.as_str())
    );
    assert_eq!(
        header_str(c, "root_id").as_deref(),
        Some(triggers[1].id.as_str())
    );
    assert_eq!(header_str(c, "lang").as_deref(), Some("py"));
    assert_eq!(
        header_str(c, "canal_consumer_position").as_deref(),
        Some("mysql-bin.000001:1002:0")
    );
    let body: Value = serde_json::from_slice(&c.data).unwrap();
    assert_eq!(
        body,
        json!([[], {"operation": "send_welcome", "user_id": 2},
               {"callbacks": null, "errbacks": null, "chain": null, "chord": null}])
    );
    // celery, args mapping
    let body: Value = serde_json::from_slice(&got[2].data).unwrap();
    assert_eq!(
        body[0],
        json!(["email_service", {"operation": "send_welcome", "user_id": 3}])
    );
    assert_eq!(body[1], json!({}));

    let _ = conn.close(200, "bye".into()).await;
    delete_queue(&queue).await;
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[actix_rt::test]
async fn unroutable_messages_fail_their_publish_and_are_counted() {
    let _shared = BROKER.read().await;
    let missing = unique("missing");
    // declare = none: nothing creates the queue, so the default exchange cannot route
    let addr = start_connected(config(&missing, DeclareMode::None, None)).await;
    let t = trigger(1, &missing, Priority::Normal, MessageFormat::Envelope);
    // unroutable as configured (not our own re-declarable queue): reported per message
    match publish(&addr, vec![t.clone()]).await {
        Err(PublishError::Unroutable { returned }) => {
            assert_eq!(returned.len(), 1);
            assert_eq!(returned[0].id, t.id);
            assert_eq!(returned[0].routing_key, missing);
        }
        other => panic!("expected Unroutable, got {other:?}"),
    }
    let st = status(&addr).await;
    assert_eq!(st.counters.returned, 1, "{st:#?}");
    assert_eq!(st.counters.confirmed, 0);

    // one unroutable message in the middle of a big batch to a real queue: the batch reports
    // exactly that message, and all the others are published and confirmed (an unroutable
    // message is parked upstream; it does not stop the rest)
    let real = unique("real");
    let (conn, ch) = raw().await;
    declare_raw(&ch, &real, None).await;
    let mut batch: Vec<Trigger> = (0..300)
        .map(|n| trigger(n, &real, Priority::Normal, MessageFormat::Envelope))
        .collect();
    batch[137].route.routing_key = missing.clone();
    let bad_id = batch[137].id.clone();
    match publish(&addr, batch).await {
        Err(PublishError::Unroutable { returned }) => {
            let ids: Vec<_> = returned.iter().map(|r| r.id.clone()).collect();
            assert_eq!(ids, vec![bad_id]);
        }
        other => panic!("expected Unroutable, got {other:?}"),
    }
    let st = status(&addr).await;
    assert_eq!(st.unconfirmed, 0, "{st:#?}");
    assert_eq!(st.counters.returned, 2, "{st:#?}");
    assert_eq!(st.counters.confirmed, 299, "{st:#?}");
    let arrived = drain(&ch, &real).await.len();
    assert_eq!(arrived, 299);

    // the channel still works afterwards
    publish(
        &addr,
        vec![trigger(9, &real, Priority::Normal, MessageFormat::Envelope)],
    )
    .await
    .expect("routable publish after a return");
    let _ = conn.close(200, "bye".into()).await;
    delete_queue(&real).await;
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[actix_rt::test]
async fn queue_argument_mismatch_names_the_argument() {
    let _shared = BROKER.read().await;
    let queue = unique("mismatch");
    let (conn, ch) = raw().await;
    declare_raw(&ch, &queue, Some(10)).await;

    let err = AmqpPublisher::start_checked(config(&queue, DeclareMode::Declare, None))
        .await
        .expect_err("a mismatch fails the start");
    let PublishError::Topology(text) = &err else {
        panic!("expected Topology, got {err:?}");
    };
    assert!(
        text.contains(&format!(
            "queue '{queue}' exists with x-max-priority=10 but amqp.queue.max_priority is unset; \
             set amqp.queue.max_priority = 10"
        )),
        "{text}"
    );
    assert!(text.contains("task_queue_max_priority"), "{text}");

    let err = AmqpPublisher::start_checked(config(&queue, DeclareMode::Declare, Some(5)))
        .await
        .expect_err("a different value fails too");
    assert!(
        err.to_string()
            .contains("x-max-priority=10 but amqp.queue.max_priority = 5"),
        "{err}"
    );

    // passive: a missing queue is named; an existing one is accepted whatever its arguments
    let missing = unique("absent");
    let err = AmqpPublisher::start_checked(config(&missing, DeclareMode::Passive, None))
        .await
        .expect_err("passive on a missing queue fails");
    assert!(
        err.to_string()
            .contains(&format!("queue '{missing}' does not exist")),
        "{err}"
    );
    let addr = start_connected(config(&queue, DeclareMode::Passive, None)).await;
    publish(
        &addr,
        vec![trigger(1, &queue, Priority::High, MessageFormat::Envelope)],
    )
    .await
    .expect("passive mode publishes");

    // matching arguments are accepted
    let addr2 = start_connected(config(&queue, DeclareMode::Declare, Some(10))).await;
    publish(
        &addr2,
        vec![trigger(2, &queue, Priority::High, MessageFormat::Envelope)],
    )
    .await
    .expect("matching declaration publishes");
    let _ = conn.close(200, "bye".into()).await;
    delete_queue(&queue).await;
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[actix_rt::test]
async fn high_priority_overtakes_a_backlog() {
    let _shared = BROKER.read().await;
    let queue = unique("priority");
    let addr = start_connected(config(&queue, DeclareMode::Declare, Some(10))).await;
    let backlog: Vec<Trigger> = (0..200)
        .map(|n| trigger(n, &queue, Priority::Normal, MessageFormat::Envelope))
        .collect();
    publish(&addr, backlog).await.expect("backlog published");
    let urgent = trigger(1000, &queue, Priority::High, MessageFormat::Envelope);
    publish(&addr, vec![urgent.clone()])
        .await
        .expect("urgent published");
    let low = trigger(2000, &queue, Priority::Low, MessageFormat::Envelope);
    publish(&addr, vec![low.clone()])
        .await
        .expect("low published");

    let (conn, ch) = raw().await;
    let got = drain(&ch, &queue).await;
    assert_eq!(got.len(), 202);
    let ids: Vec<String> = got
        .iter()
        .map(|m| m.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(ids[0], urgent.id, "the high-priority message comes first");
    assert_eq!(ids[201], low.id, "the low-priority message comes last");
    // the normal ones keep their order
    let normal: Vec<&String> = ids[1..201].iter().collect();
    let expected: Vec<String> = (0..200).map(|n| format!("{queue}-{n}")).collect();
    assert!(normal.iter().zip(&expected).all(|(a, b)| *a == b));
    let _ = conn.close(200, "bye".into()).await;
    delete_queue(&queue).await;
}

/// Restores the memory watermark even if the test fails.
struct WatermarkGuard;

impl Drop for WatermarkGuard {
    fn drop(&mut self) {
        let _ = rabbitmqctl_cmd()
            .args(["set_vm_memory_high_watermark", "0.4"])
            .output();
    }
}

/// Starts the broker app again even if the test fails.
struct AppGuard;

impl Drop for AppGuard {
    fn drop(&mut self) {
        let _ = rabbitmqctl_cmd().arg("start_app").output();
    }
}

/// Messages of `queue` ready for delivery and delivered but not yet acked, as the broker
/// counts them (`rabbitmqctl list_queues`; a passive declare only tells the ready ones).
async fn queue_depth(queue: &str) -> (u64, u64) {
    let q = queue.to_string();
    let vhost = amqp_url()
        .parse::<lapin::uri::AMQPUri>()
        .expect("the test broker URL parses")
        .vhost;
    tokio::task::spawn_blocking(move || {
        let out = rabbitmqctl(&[
            "-q",
            "list_queues",
            "-p",
            &vhost,
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ]);
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(q.as_str()))
            .unwrap_or_else(|| panic!("rabbitmqctl list_queues does not list {q}:\n{out}"));
        let n: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|n| n.parse().expect("a message count"))
            .collect();
        assert_eq!(n.len(), 2, "unexpected list_queues line {line:?}");
        (n[0], n[1])
    })
    .await
    .expect("rabbitmqctl task")
}

async fn ctl(args: &'static [&'static str]) -> String {
    tokio::task::spawn_blocking(move || rabbitmqctl(args))
        .await
        .expect("rabbitmqctl task")
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[actix_rt::test]
async fn broker_outage_fails_pending_publishes_and_publishing_resumes() {
    let _exclusive = BROKER.write().await;
    let queue = unique("outage");
    let addr = start_connected(config(&queue, DeclareMode::Declare, Some(10))).await;

    // publish continuously, one Publish of 20 triggers at a time, recording every answer
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let pub_addr = addr.clone();
    let q = queue.clone();
    let publisher = actix_rt::spawn(async move {
        let mut results: Vec<(Vec<String>, Result<(), PublishError>, Duration)> = Vec::new();
        let mut n = 0u64;
        while stop_rx.try_recv().is_err() {
            let batch: Vec<Trigger> = (0..20)
                .map(|i| trigger(n * 20 + i, &q, Priority::Normal, MessageFormat::Envelope))
                .collect();
            n += 1;
            let ids = batch.iter().map(|t| t.id.clone()).collect();
            let started = Instant::now();
            let res = publish(&pub_addr, batch).await;
            let failed = res.is_err();
            results.push((ids, res, started.elapsed()));
            if failed {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        results
    });

    wait_status(&addr, "some confirms", Duration::from_secs(10), |s| {
        s.counters.confirmed >= 200
    })
    .await;
    let _app = AppGuard;
    ctl(&["stop_app"]).await;
    // the state and the error are recorded one after the other: wait for both
    let st = wait_status(
        &addr,
        "disconnected with an error",
        Duration::from_secs(30),
        |s| {
            matches!(
                s.state,
                PublisherState::Disconnected | PublisherState::Connecting
            ) && s.last_error.is_some()
        },
    )
    .await;
    assert!(st.last_error.is_some());

    // while the broker is away, a Publish is answered at once, with an error
    let started = Instant::now();
    let res = publish(
        &addr,
        vec![trigger(
            999_999,
            &queue,
            Priority::Normal,
            MessageFormat::Envelope,
        )],
    )
    .await;
    assert!(matches!(res, Err(PublishError::Unavailable(_))), "{res:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    ctl(&["start_app"]).await;
    wait_status(&addr, "reconnected", Duration::from_secs(60), |s| {
        s.state == PublisherState::Connected && s.connects >= 2
    })
    .await;
    // publishing works again
    let before = status(&addr).await.counters.confirmed;
    wait_status(
        &addr,
        "confirms after the restart",
        Duration::from_secs(20),
        |s| s.counters.confirmed >= before + 100,
    )
    .await;
    let _ = stop_tx.send(());
    let results = publisher.await.expect("publishing task");

    let failures: Vec<&PublishError> = results.iter().filter_map(|r| r.1.as_ref().err()).collect();
    assert!(!failures.is_empty(), "the outage failed some publishes");
    assert!(
        failures.iter().all(|e| matches!(
            e,
            PublishError::ConnectionLost { .. }
                | PublishError::Unavailable(_)
                | PublishError::ConfirmTimeout { .. }
        )),
        "{failures:?}"
    );
    assert!(
        results.iter().all(|r| r.2 < Duration::from_secs(15)),
        "no Publish waited long"
    );
    // nothing answered Ok is missing: durable queue, persistent messages, confirms
    let ok_ids: HashSet<String> = results
        .iter()
        .filter(|r| r.1.is_ok())
        .flat_map(|r| r.0.iter().cloned())
        .collect();
    let (conn, ch) = raw().await;
    let stored: HashSet<String> = drain(&ch, &queue)
        .await
        .iter()
        .map(|m| m.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    let missing: Vec<&String> = ok_ids.difference(&stored).collect();
    assert!(
        missing.is_empty(),
        "{} confirmed messages are missing, e.g. {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    let _ = conn.close(200, "bye".into()).await;
    delete_queue(&queue).await;
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[actix_rt::test]
async fn memory_alarm_shows_blocked_and_publishes_fail() {
    let _exclusive = BROKER.write().await;
    let queue = unique("alarm");
    let mut cfg = config(&queue, DeclareMode::Declare, Some(10));
    cfg.confirm_timeout = Duration::from_secs(3);
    let addr = start_connected(cfg).await;
    publish(
        &addr,
        vec![trigger(
            0,
            &queue,
            Priority::Normal,
            MessageFormat::Envelope,
        )],
    )
    .await
    .expect("published before the alarm");

    let _restore = WatermarkGuard;
    ctl(&["set_vm_memory_high_watermark", "0.000001"]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctl(&["eval", "rabbit_alarm:get_alarms()."])
        .await
        .contains("memory")
    {
        assert!(Instant::now() < deadline, "the memory alarm did not go off");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // every publish during the alarm fails (time out or refused); the status says blocked
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 1;
    let mut outcomes = Vec::new();
    loop {
        let res = publish(
            &addr,
            vec![trigger(
                n,
                &queue,
                Priority::Normal,
                MessageFormat::Envelope,
            )],
        )
        .await;
        n += 1;
        assert!(res.is_err(), "a publish succeeded during a memory alarm");
        outcomes.push(res.unwrap_err());
        let st = status(&addr).await;
        if st.state == PublisherState::Blocked {
            assert!(st.blocked_reason.is_some());
            break;
        }
        assert!(Instant::now() < deadline, "never blocked: {st:#?}");
    }
    let res = publish(
        &addr,
        vec![trigger(
            n,
            &queue,
            Priority::Normal,
            MessageFormat::Envelope,
        )],
    )
    .await;
    assert!(
        matches!(res, Err(PublishError::Unavailable(ref m)) if m.contains("blocks publishing")),
        "{res:?}"
    );
    assert!(
        outcomes.iter().all(|e| matches!(
            e,
            PublishError::ConfirmTimeout { .. }
                | PublishError::Unavailable(_)
                | PublishError::ConnectionLost { .. }
        )),
        "{outcomes:?}"
    );

    ctl(&["set_vm_memory_high_watermark", "0.4"]).await;
    wait_status(&addr, "unblocked", Duration::from_secs(30), |s| {
        s.state == PublisherState::Connected
    })
    .await;
    publish(
        &addr,
        vec![trigger(
            n + 1,
            &queue,
            Priority::Normal,
            MessageFormat::Envelope,
        )],
    )
    .await
    .expect("publishing works after the alarm");
    delete_queue(&queue).await;
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[actix_rt::test]
async fn a_real_celery_worker_runs_our_tasks_with_our_ids() {
    let celery_bin = common::celery_bin();
    assert!(
        std::path::Path::new(&celery_bin).exists(),
        "{celery_bin} is missing; deploy/local/up creates the Celery venv"
    );
    let _shared = BROKER.read().await;
    let queue = unique("celery");
    let addr = start_connected(config(&queue, DeclareMode::Declare, Some(10))).await;

    let mut triggers = vec![
        trigger(
            1,
            &queue,
            Priority::High,
            celery("plugins.run", CeleryMapping::Kwargs),
        ),
        trigger(
            2,
            &queue,
            Priority::Normal,
            celery("plugins.run", CeleryMapping::Kwargs),
        ),
        trigger(
            3,
            &queue,
            Priority::Low,
            celery("plugins.run", CeleryMapping::Args),
        ),
        trigger(
            4,
            &queue,
            Priority::Normal,
            celery("plugins.run", CeleryMapping::Payload),
        ),
    ];
    triggers[1].payload = json!(42); // not an object: becomes kwargs {"payload": 42}
    publish(&addr, triggers.clone()).await.expect("published");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tasks.jsonl");
    let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
    let workers_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers");
    let broker = amqp_url().replace("/%2f", "//");
    let mut worker = ChildGuard::spawn(
        "celery worker",
        Command::new(&celery_bin)
            .args([
                "-A",
                "publisher_check",
                "worker",
                "-Q",
                &queue,
                "-c",
                "1",
                "--pool",
                "solo",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel",
                "INFO",
            ])
            .current_dir(&workers_dir)
            .env("TASKS_OUT", &out)
            .env("CELERY_BROKER_URL", &broker)
            .env("TASK_QUEUE_MAX_PRIORITY", "10")
            .stdout(log.try_clone().unwrap())
            .stderr(log),
    );

    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        // a line being written may be incomplete: count the complete ones
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() >= triggers.len() {
            break;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default();
            panic!(
                "the worker ran {} of {} tasks; its log:\n{log}",
                lines.len(),
                triggers.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // "Each task ran exactly once" means: one line per trigger, and the broker holds nothing
    // more to run, neither ready nor taken and unacked. A line is written when the task has run,
    // but the worker's ack of that message reaches the broker on its own: killed before it
    // does, the worker leaves the message unacked and the broker puts it back in the queue
    // (an at-least-once redelivery, not a second message from us). So wait until the broker
    // has recorded the worker's acks, then stop the worker: from then on its output is final.
    let st = status(&addr).await;
    assert_eq!(
        (st.counters.published, st.counters.confirmed),
        (4, 4),
        "{st:#?}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ready, unacked) = queue_depth(&queue).await;
        if (ready, unacked) == (0, 0) {
            break;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default();
            panic!(
                "the worker ran every task but the broker still holds {ready} ready and \
                 {unacked} unacked messages of {queue}; its log:\n{log}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.kill();
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(
        lines.len(),
        triggers.len(),
        "each task ran exactly once: {lines:#?}"
    );
    let (conn, ch) = raw().await;
    let left = ch
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the worker queue exists")
        .message_count();
    assert_eq!(left, 0, "nothing left to run twice");
    let _ = conn.close(200, "bye".into()).await;

    let find = |id: &str| {
        lines
            .iter()
            .find(|l| l["id"] == id)
            .unwrap_or_else(|| panic!("task {id} did not run: {lines:#?}"))
    };
    let l = find(&triggers[0].id);
    assert_eq!(l["task"], "plugins.run");
    assert_eq!(l["root_id"], triggers[0].id);
    assert_eq!(l["args"], json!([]));
    assert_eq!(
        l["kwargs"],
        json!({"operation": "send_welcome", "user_id": 1})
    );
    assert_eq!(l["priority"], 9);
    let l = find(&triggers[1].id);
    assert_eq!(l["kwargs"], json!({"payload": 42}));
    let l = find(&triggers[2].id);
    assert_eq!(
        l["args"],
        json!(["email_service", {"operation": "send_welcome", "user_id": 3}])
    );
    assert_eq!(l["kwargs"], json!({}));
    let l = find(&triggers[3].id);
    assert_eq!(l["args"], json!([]));
    assert_eq!(
        l["kwargs"],
        json!({"plugin": "email_service",
               "payload": {"operation": "send_welcome", "user_id": 4}})
    );
    delete_queue(&queue).await;
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[actix_rt::test]
async fn window_bounds_unconfirmed_and_order_follows_arrival() {
    let _shared = BROKER.read().await;
    let queue = unique("window");
    let mut cfg = config(&queue, DeclareMode::Declare, None);
    cfg.max_unconfirmed = NonZeroUsize::new(4).unwrap();
    let addr = start_connected(cfg).await;

    // watch the window while 50 Publishes of 20 triggers are sent without waiting in between
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let watch_addr = addr.clone();
    let watcher = actix_rt::spawn(async move {
        let mut max = 0;
        while stop_rx.try_recv().is_err() {
            max = max.max(status(&watch_addr).await.unconfirmed);
            tokio::task::yield_now().await;
        }
        max
    });
    let mut replies = Vec::new();
    let mut expected = Vec::new();
    for p in 0..50u64 {
        let batch: Vec<Trigger> = (0..20)
            .map(|i| {
                trigger(
                    p * 20 + i,
                    &queue,
                    Priority::Normal,
                    MessageFormat::Envelope,
                )
            })
            .collect();
        expected.extend(batch.iter().map(|t| t.id.clone()));
        let (reply, rx) = oneshot::channel();
        addr.do_send(Publish {
            epoch: 1,
            triggers: batch,
            reply,
        });
        replies.push(rx);
    }
    for rx in replies {
        tokio::time::timeout(Duration::from_secs(60), rx)
            .await
            .expect("answered")
            .expect("reply")
            .expect("published");
    }
    let _ = stop_tx.send(());
    let max = watcher.await.unwrap();
    assert!(max <= 4, "at most max_unconfirmed in flight, saw {max}");
    let st = status(&addr).await;
    assert_eq!((st.counters.published, st.counters.confirmed), (1000, 1000));

    let (conn, ch) = raw().await;
    let ids: Vec<String> = drain(&ch, &queue)
        .await
        .iter()
        .map(|m| m.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(
        ids, expected,
        "messages leave in the order Publishes arrive"
    );
    let _ = conn.close(200, "bye".into()).await;
    delete_queue(&queue).await;
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[actix_rt::test]
async fn a_missing_exchange_closes_the_channel_once_then_its_messages_are_refused_until_it_is_back()
{
    let _shared = BROKER.read().await;
    let queue = unique("noexchange");
    let addr = start_connected(config(&queue, DeclareMode::Declare, None)).await;
    // a routing key AMQP cannot carry is refused before anything is sent
    let mut long = trigger(0, &queue, Priority::Normal, MessageFormat::Envelope);
    long.route.routing_key = "k".repeat(300);
    let res = publish(&addr, vec![long]).await;
    assert!(matches!(res, Err(PublishError::Encode { .. })), "{res:?}");
    assert_eq!(status(&addr).await.connects, 1);

    let exchange = unique("gone_x");
    let to_exchange = |n| {
        let mut t = trigger(n, &queue, Priority::Normal, MessageFormat::Envelope);
        t.route.exchange = exchange.clone();
        t
    };
    let err = publish(&addr, vec![to_exchange(1)])
        .await
        .expect_err("must fail");
    // The broker answers by closing the channel (404 NOT_FOUND "no exchange '...'"). The
    // publisher may notice the closed channel before lapin hands over the broker's words; it
    // waits for them, so the error always names the exchange. What was unconfirmed on that
    // channel is in doubt: a transient failure (rolled back and redelivered upstream).
    match &err {
        PublishError::ConnectionLost { reason, .. } => {
            assert!(
                reason.contains(&exchange),
                "the error names the exchange: {err}"
            );
        }
        other => panic!("expected ConnectionLost, got {other:?}"),
    }
    assert!(err.is_transient());
    // the route is broken; a new channel on the same connection carries everything else
    let st = status(&addr).await;
    assert_eq!(
        (st.state, st.connects),
        (PublisherState::Connected, 1),
        "{st:#?}"
    );
    assert_eq!(st.broken_routes.len(), 1, "{st:#?}");
    assert_eq!(st.broken_routes[0].exchange, exchange);
    publish(
        &addr,
        vec![trigger(
            2,
            &queue,
            Priority::Normal,
            MessageFormat::Envelope,
        )],
    )
    .await
    .expect("publishing works after the channel error");
    // the broken route's messages are refused without a channel close: definite, parked
    // upstream; the others of the same Publish are delivered
    let ok = trigger(4, &queue, Priority::Normal, MessageFormat::Envelope);
    let err = publish(&addr, vec![to_exchange(3), ok])
        .await
        .expect_err("refused");
    match &err {
        PublishError::Unroutable { returned } => {
            assert_eq!(returned.len(), 1);
            assert_eq!(returned[0].id, format!("{queue}-3"));
            assert!(
                returned[0]
                    .reason
                    .contains(&format!("exchange '{exchange}' is gone")),
                "{err}"
            );
        }
        other => panic!("expected Unroutable, got {other:?}"),
    }
    assert!(!err.is_transient());
    let st = status(&addr).await;
    assert_eq!(
        (st.connects, st.counters.refused, st.counters.lost),
        (1, 1, 1),
        "{st:#?}"
    );
    // the exchange comes back (bound to our queue): found by a re-check, used again
    let (conn, ch) = raw().await;
    ch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Direct,
        lapin::options::ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        queue.as_str().into(),
        lapin::options::QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    wait_status(
        &addr,
        "the route found again",
        Duration::from_secs(20),
        |s| s.broken_routes.is_empty(),
    )
    .await;
    publish(&addr, vec![to_exchange(5)])
        .await
        .expect("published through the exchange again");
    assert_eq!(status(&addr).await.connects, 1);
    let _ = ch
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
    delete_queue(&queue).await;
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[actix_rt::test]
async fn shutdown_drains_what_was_accepted() {
    let _shared = BROKER.read().await;
    let queue = unique("shutdown");
    let mut cfg = config(&queue, DeclareMode::Declare, None);
    cfg.max_unconfirmed = NonZeroUsize::new(8).unwrap();
    let addr = start_connected(cfg).await;
    let batch: Vec<Trigger> = (0..500)
        .map(|n| trigger(n, &queue, Priority::Normal, MessageFormat::Envelope))
        .collect();
    let (reply, rx) = oneshot::channel();
    addr.do_send(Publish {
        epoch: 1,
        triggers: batch,
        reply,
    });
    addr.send(StopPublishing {
        deadline: Duration::from_secs(30),
    })
    .await
    .expect("publisher alive")
    .expect("drained in time");
    rx.await
        .expect("answered")
        .expect("the accepted batch was published and confirmed");
    let st = status(&addr).await;
    assert_eq!(st.state, PublisherState::Disconnected);
    assert_eq!((st.counters.confirmed, st.unconfirmed), (500, 0));
    let res = publish(
        &addr,
        vec![trigger(
            501,
            &queue,
            Priority::Normal,
            MessageFormat::Envelope,
        )],
    )
    .await;
    assert!(matches!(res, Err(PublishError::Unavailable(_))), "{res:?}");
    let (conn, ch) = raw().await;
    assert_eq!(drain(&ch, &queue).await.len(), 500);
    let _ = conn.close(200, "bye".into()).await;
    delete_queue(&queue).await;
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[actix_rt::test]
async fn returns_are_matched_to_their_publish_under_load() {
    let _shared = BROKER.read().await;
    let queue = unique("returns");
    let missing = unique("nowhere");
    let mut cfg = config(&queue, DeclareMode::Declare, None);
    cfg.max_unconfirmed = NonZeroUsize::new(512).unwrap();
    let addr = start_connected(cfg).await;

    // 60 Publishes of 50 triggers sent back to back, so broker multi-acks span several of
    // them; every 7th Publish has one unroutable trigger at a varying position
    let mut pending = Vec::new();
    for p in 0..60u64 {
        let mut batch: Vec<Trigger> = (0..50)
            .map(|i| {
                trigger(
                    p * 50 + i,
                    &queue,
                    Priority::Normal,
                    MessageFormat::Envelope,
                )
            })
            .collect();
        let bad = (p % 7 == 3).then(|| {
            let i = (p as usize * 13) % 50;
            batch[i].route.routing_key = missing.clone();
            batch[i].id.clone()
        });
        let (reply, rx) = oneshot::channel();
        addr.do_send(Publish {
            epoch: 1,
            triggers: batch,
            reply,
        });
        pending.push((bad, rx));
    }
    for (p, (bad, rx)) in pending.into_iter().enumerate() {
        let res = tokio::time::timeout(Duration::from_secs(60), rx)
            .await
            .expect("answered")
            .expect("reply");
        match (bad, res) {
            (None, Ok(())) => {}
            (Some(bad), Err(PublishError::Unroutable { returned })) => {
                let ids: Vec<_> = returned.iter().map(|r| r.id.as_str()).collect();
                assert_eq!(ids, vec![bad.as_str()], "publish {p}")
            }
            (bad, res) => panic!("publish {p}: unroutable {bad:?} but got {res:?}"),
        }
    }
    delete_queue(&queue).await;
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[actix_rt::test]
async fn a_deleted_queue_is_declared_again() {
    let _shared = BROKER.read().await;
    let queue = unique("redeclare");
    let addr = start_connected(config(&queue, DeclareMode::Declare, Some(10))).await;
    publish(
        &addr,
        vec![trigger(
            1,
            &queue,
            Priority::Normal,
            MessageFormat::Envelope,
        )],
    )
    .await
    .expect("published");
    delete_queue(&queue).await;
    // the first publish after the deletion comes back unroutable and fails ...
    let res = publish(
        &addr,
        vec![trigger(
            2,
            &queue,
            Priority::Normal,
            MessageFormat::Envelope,
        )],
    )
    .await;
    assert!(matches!(res, Err(PublishError::Returned(_))), "{res:?}");
    // ... and the publisher declares the queue again (same arguments), so a retry succeeds
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match publish(
            &addr,
            vec![trigger(3, &queue, Priority::High, MessageFormat::Envelope)],
        )
        .await
        {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "retry never succeeded: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // with the configured arguments: a declaration with x-max-priority 10 is accepted
    let (conn, ch) = raw().await;
    declare_raw(&ch, &queue, Some(10)).await;
    let _ = conn.close(200, "bye".into()).await;
    delete_queue(&queue).await;
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[actix_rt::test]
async fn quorum_queues_are_declared_with_their_type() {
    let _shared = BROKER.read().await;
    let queue = unique("quorum");
    let mut cfg = config(&queue, DeclareMode::Declare, None);
    cfg.queue.queue_type = QueueType::Quorum;
    let addr = start_connected(cfg.clone()).await;
    publish(
        &addr,
        vec![trigger(
            1,
            &queue,
            Priority::Normal,
            MessageFormat::Envelope,
        )],
    )
    .await
    .expect("published to a quorum queue");
    // a classic declaration of the same queue is refused, naming x-queue-type
    let mut classic = cfg.clone();
    classic.queue.queue_type = QueueType::Classic;
    let err = AmqpPublisher::start_checked(classic)
        .await
        .expect_err("classic vs quorum");
    eprintln!("classic vs quorum: {err}");
    assert!(err.to_string().contains("x-queue-type"), "{err}");
    // priorities on a quorum queue: whatever the broker says, the error is a clear start failure
    let mut prio = cfg.clone();
    prio.queue.name = unique("quorum_prio");
    prio.queue.max_priority = Some(10);
    match AmqpPublisher::start_checked(prio.clone()).await {
        Ok(_) => {
            eprintln!("this broker accepts x-max-priority on quorum queues");
            delete_queue(&prio.queue.name).await;
        }
        Err(e) => {
            eprintln!("quorum + x-max-priority: {e}");
            assert!(
                e.to_string()
                    .contains("cannot be declared with x-max-priority as a quorum queue"),
                "{e}"
            );
        }
    }
    delete_queue(&queue).await;
}

/// Resumes the broker's VM when dropped (also when the test fails).
struct Frozen(i32);

impl Frozen {
    /// SIGSTOP our RabbitMQ node (pid from its pid file): the link stays up, carries nothing.
    fn broker() -> Frozen {
        let file = std::env::var("CC_TEST_RABBIT_PID_FILE")
            .unwrap_or_else(|_| "/var/run/rabbitmq/pid".into());
        let pid: i32 = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .trim()
            .parse()
            .unwrap();
        signal(pid, "-STOP");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.0, "-CONT");
    }
}

fn signal(pid: i32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid}");
}

/// Issue 9: with the AMQP link frozen (no FIN, no RST) the publisher used to say `connected`
/// and ready while confirms never came. Now the status says "stalled since ...: no confirm for
/// N s" once the oldest message waits half the confirm timeout, and clears when confirms flow.
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[actix_rt::test]
async fn a_frozen_link_shows_as_stalled_and_recovers() {
    let _exclusive = BROKER.write().await;
    let queue = unique("frozen");
    let mut cfg = config(&queue, DeclareMode::Declare, Some(10));
    cfg.confirm_timeout = Duration::from_secs(8);
    let addr = start_connected(cfg).await;
    publish(
        &addr,
        vec![trigger(
            0,
            &queue,
            Priority::Normal,
            MessageFormat::Envelope,
        )],
    )
    .await
    .expect("published before the freeze");
    let frozen = Frozen::broker();
    let pending = addr.clone();
    let q = queue.clone();
    let waiting = actix_rt::spawn(async move {
        publish(
            &pending,
            vec![trigger(1, &q, Priority::Normal, MessageFormat::Envelope)],
        )
        .await
    });
    let st = wait_status(&addr, "stalled", Duration::from_secs(20), |s| {
        s.stalled_since.is_some()
    })
    .await;
    assert_eq!(st.state, PublisherState::Connected, "{st:#?}");
    let why = st
        .unavailable()
        .expect("a stalled publisher is not available");
    assert!(why.contains("stalled since"), "{why}");
    assert!(why.contains("no confirm for"), "{why}");
    drop(frozen);
    let res = waiting.await.unwrap();
    // the confirm comes once the broker runs again (well within the 8 s timeout), or the
    // message timed out: either way it was answered, never lost silently
    assert!(
        matches!(res, Ok(()) | Err(PublishError::ConfirmTimeout { .. })),
        "{res:?}"
    );
    wait_status(&addr, "no longer stalled", Duration::from_secs(30), |s| {
        s.stalled_since.is_none() && s.state == PublisherState::Connected
    })
    .await;
    delete_queue(&queue).await;
}
