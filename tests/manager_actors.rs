//! The Manager and consumer actors without Canal or a broker: a fake connection records
//! acks/rollbacks and a channel sink stands in for the publisher, so failures can be injected
//! exactly. End-to-end behaviour with the real services is in `pipeline_real.rs`.
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

use actix::prelude::*;
use canal_consumer::canal::connection::{
    AckBatch, Batch, BatchRef, CanalEvent, ReleaseBatch, RollbackBatch, SetFilter,
};
use canal_consumer::consumer::actor::ConsumerActor;
use canal_consumer::consumer::{Consumer, ConsumerContext, ConsumerError, TableFilter};
use canal_consumer::event::{ChangeEvent, EventType, Position, Row, Value};
use canal_consumer::manager::SupervisionConfig;
use canal_consumer::manager::{
    AttachConnection, ConnectionLink, ConsumerEntry, GetManagerStatus, Manager, ManagerConfig,
    OnPoison, PoisonPolicy,
};
use canal_consumer::publisher::{Publish, PublishError};
use canal_consumer::trigger::{MessageFormat, Priority, Route, Trigger};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Debug)]
enum ConnMsg {
    Ack(BatchRef),
    Rollback(BatchRef),
    Release(BatchRef),
    Filter(String),
}

struct FakeConnection(mpsc::UnboundedSender<ConnMsg>);
impl Actor for FakeConnection {
    type Context = Context<Self>;
}
impl Handler<AckBatch> for FakeConnection {
    type Result = ();
    fn handle(&mut self, m: AckBatch, _: &mut Context<Self>) {
        let _ = self.0.send(ConnMsg::Ack(m.0));
    }
}
impl Handler<RollbackBatch> for FakeConnection {
    type Result = ();
    fn handle(&mut self, m: RollbackBatch, _: &mut Context<Self>) {
        let _ = self.0.send(ConnMsg::Rollback(m.batch));
    }
}
impl Handler<SetFilter> for FakeConnection {
    type Result = ();
    fn handle(&mut self, m: SetFilter, _: &mut Context<Self>) {
        let _ = self.0.send(ConnMsg::Filter(m.filter));
        if let Some(applied) = m.applied {
            let _ = applied.send(());
        }
    }
}
impl Handler<ReleaseBatch> for FakeConnection {
    type Result = ();
    fn handle(&mut self, m: ReleaseBatch, _: &mut Context<Self>) {
        let _ = self.0.send(ConnMsg::Release(m.0));
    }
}

type Held = Arc<Mutex<Vec<tokio::sync::oneshot::Sender<Result<(), PublishError>>>>>;

/// Publisher stand-in: forwards every trigger to a channel; confirms at once unless the
/// trigger's consumer is in `hold`, in which case the reply is kept until released.
struct ChannelSink {
    tx: mpsc::UnboundedSender<Trigger>,
    hold: Vec<String>,
    held: Held,
}
impl Actor for ChannelSink {
    type Context = Context<Self>;
}
impl Handler<Publish> for ChannelSink {
    type Result = ();
    fn handle(&mut self, m: Publish, _: &mut Context<Self>) {
        let held = m.triggers.iter().any(|t| self.hold.contains(&t.consumer));
        for t in m.triggers {
            let _ = self.tx.send(t);
        }
        if held {
            self.held.lock().unwrap().push(m.reply);
        } else {
            let _ = m.reply.send(Ok(()));
        }
    }
}

/// Triggers `echo` with the row id; panics on `panic_on` while `panics_left` > 0; fails
/// fatally every time if `always_fail`.
#[derive(Clone)]
struct TestConsumer {
    name: String,
    filters: Vec<TableFilter>,
    panic_on: Option<i64>,
    panics_left: Arc<AtomicU32>,
    always_fail: bool,
    /// How many instances the supervisor built (shared by the clones).
    built: Arc<AtomicU32>,
    /// Every event fails with an event error (handled by the error_handler policy).
    bad_rows: bool,
    poison: PoisonPolicy,
    /// When (tokio's clock, paused in timer tests) each event was handed to it.
    seen_at: Arc<Mutex<Vec<tokio::time::Instant>>>,
}

impl TestConsumer {
    fn new(name: &str, table: &str) -> Self {
        TestConsumer {
            name: name.into(),
            filters: vec![TableFilter::new("db", table, &[EventType::Insert])],
            panic_on: None,
            panics_left: Arc::new(AtomicU32::new(0)),
            always_fail: false,
            built: Arc::new(AtomicU32::new(0)),
            bad_rows: false,
            seen_at: Arc::default(),
            // the older tests here describe the stall policy; parking has its own test
            poison: PoisonPolicy {
                on_poison: OnPoison::Stall,
                attempts: 3,
            },
        }
    }
}

impl Consumer for TestConsumer {
    fn name(&self) -> &str {
        &self.name
    }
    fn filters(&self) -> &[TableFilter] {
        &self.filters
    }
    fn process_event(
        &mut self,
        event: &ChangeEvent,
        ctx: &mut ConsumerContext,
    ) -> Result<(), ConsumerError> {
        self.seen_at
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        if self.always_fail {
            return Err(ConsumerError::Fatal("downstream is gone".into()));
        }
        if self.bad_rows {
            return Err(ConsumerError::Event("this row cannot be rendered".into()));
        }
        let id = match event.data.get("id") {
            Some(Value::Int(i)) => *i,
            _ => return Err(ConsumerError::Event("no id".into())),
        };
        ctx.trigger_plugin("echo", serde_json::json!({ "id": id }), Priority::Normal);
        if Some(id) == self.panic_on && self.panics_left.load(Ordering::SeqCst) > 0 {
            self.panics_left.fetch_sub(1, Ordering::SeqCst);
            panic!("boom on row {id}");
        }
        Ok(())
    }
}

fn event(table: &str, id: i64, offset: u64) -> ChangeEvent {
    let mut data = Row::new();
    data.insert("id".into(), Value::Int(id));
    ChangeEvent {
        destination: "example".into(),
        database: "db".into(),
        table: table.into(),
        event_type: EventType::Insert,
        data,
        old: None,
        changed: ["id"].into(),
        primary_keys: ["id"].into(),
        position: Position {
            log_file: "mysql-bin.000001".into(),
            offset,
            row_index: 0,
            server_id: 1,
            gtid: None,
        },
        executed_at: 1_700_000_000_000,
        is_ddl: false,
        sql: None,
        snapshot: None,
    }
}

fn batch(id: i64, events: Vec<ChangeEvent>) -> CanalEvent {
    CanalEvent::Batch(Batch {
        batch: BatchRef::new(1, id),
        events: Arc::new(events),
        bytes: 100,
        entries: 1,
    })
}

struct Harness {
    manager: Addr<Manager>,
    conn_rx: mpsc::UnboundedReceiver<ConnMsg>,
    trig_rx: mpsc::UnboundedReceiver<Trigger>,
    held: Held,
}

fn supervision(max_restarts: u32) -> SupervisionConfig {
    SupervisionConfig {
        restart_min: Duration::from_millis(20),
        restart_max: Duration::from_millis(200),
        max_restarts,
        quarantine_window: Duration::from_secs(60),
    }
}

fn harness(consumers: Vec<TestConsumer>, hold: &[&str], max_restarts: u32) -> Harness {
    let (conn_tx, conn_rx) = mpsc::unbounded_channel();
    let (trig_tx, trig_rx) = mpsc::unbounded_channel();
    let held: Held = Arc::default();
    let sink = ChannelSink {
        tx: trig_tx,
        hold: hold.iter().map(|s| s.to_string()).collect(),
        held: held.clone(),
    }
    .start();
    let entries = consumers
        .into_iter()
        .map(|c| {
            let name = c.name.clone();
            let filters = c.filters.clone();
            let poison = c.poison;
            let addr = ConsumerActor::new(
                Box::new(move || {
                    c.built.fetch_add(1, Ordering::SeqCst);
                    Box::new(c.clone())
                }),
                sink.clone().recipient(),
                Route::default(),
                MessageFormat::Envelope,
            )
            .start_supervised();
            ConsumerEntry {
                name,
                filters,
                poison,
                supervision: supervision(max_restarts),
                enabled: true,
                addr,
            }
        })
        .collect();
    let manager = Manager::new(ManagerConfig::default(), entries).start();
    let conn = FakeConnection(conn_tx).start();
    manager.do_send(AttachConnection(ConnectionLink {
        ack: conn.clone().recipient(),
        rollback: conn.clone().recipient(),
        release: conn.clone().recipient(),
        filter: conn.recipient(),
    }));
    Harness {
        manager,
        conn_rx,
        trig_rx,
        held,
    }
}

async fn next_conn(h: &mut Harness) -> ConnMsg {
    tokio::time::timeout(Duration::from_secs(10), h.conn_rx.recv())
        .await
        .expect("a message to the connection")
        .expect("open")
}

async fn next_trigger(h: &mut Harness) -> Trigger {
    tokio::time::timeout(Duration::from_secs(10), h.trig_rx.recv())
        .await
        .expect("a trigger")
        .expect("open")
}

fn id_of(t: &Trigger) -> i64 {
    t.payload["id"].as_i64().unwrap()
}

#[actix_rt::test]
async fn a_panicking_consumer_is_restarted_and_the_batch_waits_for_it() {
    let mut flaky = TestConsumer::new("flaky", "b");
    flaky.panic_on = Some(2);
    flaky.panics_left.store(1, Ordering::SeqCst);
    let built = flaky.built.clone();
    let mut h = harness(vec![TestConsumer::new("steady", "a"), flaky], &[], 5);
    h.manager.do_send(batch(
        1,
        vec![
            event("a", 1, 10),
            event("b", 1, 20),
            event("b", 2, 30),
            event("a", 2, 40),
        ],
    ));
    let mut by_consumer: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for _ in 0..4 {
        let t = next_trigger(&mut h).await;
        by_consumer
            .entry(t.consumer.clone())
            .or_default()
            .push(id_of(&t));
    }
    match next_conn(&mut h).await {
        ConnMsg::Ack(b) => assert_eq!(b.id, 1),
        other => panic!("expected the ack, got {other:?}"),
    }
    // the failed attempt published nothing; the retry published each row once, in order
    assert_eq!(by_consumer["steady"], [1, 2]);
    assert_eq!(by_consumer["flaky"], [1, 2]);
    // the restart ran on a new instance from the factory, not the one that panicked
    assert_eq!(built.load(Ordering::SeqCst), 2);
    let status = h.manager.send(GetManagerStatus).await.unwrap();
    let flaky = status.consumers.iter().find(|c| c.name == "flaky").unwrap();
    assert_eq!(flaky.restarts, 1);
    // the status text is the one it always was
    assert_eq!(
        flaky.last_error.as_deref(),
        Some("panic in process_event: boom on row 2")
    );
    assert!(h.trig_rx.try_recv().is_err(), "no duplicate triggers");
}

#[actix_rt::test]
async fn a_consumer_that_keeps_failing_is_quarantined_and_its_batch_rolled_back() {
    let mut broken = TestConsumer::new("broken", "b");
    broken.always_fail = true;
    let mut h = harness(vec![TestConsumer::new("steady", "a"), broken], &[], 2);
    h.manager
        .do_send(batch(1, vec![event("a", 1, 10), event("b", 1, 20)]));
    assert_eq!(id_of(&next_trigger(&mut h).await), 1); // steady is unaffected
    match next_conn(&mut h).await {
        ConnMsg::Rollback(b) => assert_eq!(b.id, 1),
        other => panic!("expected a rollback, never an ack: {other:?}"),
    }
    let status = h.manager.send(GetManagerStatus).await.unwrap();
    let broken = status
        .consumers
        .iter()
        .find(|c| c.name == "broken")
        .unwrap();
    assert_eq!(
        broken.state,
        canal_consumer::manager::ConsumerState::Quarantined
    );
    assert_eq!(broken.restarts, 3);
}

#[actix_rt::test]
async fn a_stuck_consumer_does_not_stop_the_other_and_holds_the_ack() {
    // "slow" never gets its confirms until released; "fast" keeps going
    let mut h = harness(
        vec![
            TestConsumer::new("fast", "a"),
            TestConsumer::new("slow", "b"),
        ],
        &["slow"],
        5,
    );
    for id in 1..=3 {
        h.manager.do_send(batch(
            id,
            vec![
                event("a", id, id as u64 * 10),
                event("b", id, id as u64 * 10 + 5),
            ],
        ));
    }
    let mut fast = Vec::new();
    while fast.len() < 3 {
        let t = next_trigger(&mut h).await;
        if t.consumer == "fast" {
            fast.push(id_of(&t));
        }
    }
    assert_eq!(fast, [1, 2, 3], "fast progressed through every batch");
    assert!(
        h.conn_rx.try_recv().is_err(),
        "no ack while slow is unconfirmed"
    );
    // release slow's confirms: the three batches are acked
    let held: Vec<_> = h.held.lock().unwrap().drain(..).collect();
    assert_eq!(held.len(), 3);
    for r in held {
        let _ = r.send(Ok(()));
    }
    let mut acked = Vec::new();
    while acked.len() < 3 {
        if let ConnMsg::Ack(b) = next_conn(&mut h).await {
            acked.push(b.id);
        }
    }
    acked.sort();
    assert_eq!(acked, [1, 2, 3]);
}

#[actix_rt::test]
async fn a_failed_publish_rolls_the_batch_back() {
    let mut h = harness(vec![TestConsumer::new("c", "a")], &["c"], 5);
    h.manager.do_send(batch(7, vec![event("a", 1, 10)]));
    next_trigger(&mut h).await;
    let reply = h.held.lock().unwrap().pop().unwrap();
    let _ = reply.send(Err(PublishError::Nacked { id: "x".into() }));
    match next_conn(&mut h).await {
        ConnMsg::Rollback(b) => assert_eq!(b.id, 7),
        other => panic!("{other:?}"),
    }
}

#[actix_rt::test]
async fn triggers_leave_in_binlog_order_per_consumer() {
    let mut h = harness(
        vec![TestConsumer::new("a_c", "a"), TestConsumer::new("b_c", "b")],
        &[],
        5,
    );
    let batches = 60;
    let per_batch = 100;
    let mut offset = 0;
    for b in 1..=batches {
        let mut events = Vec::new();
        for i in 0..per_batch {
            offset += 1;
            let id = (b - 1) * per_batch + i;
            events.push(event(if id % 3 == 0 { "b" } else { "a" }, id, offset));
        }
        h.manager.do_send(batch(b, events));
    }
    let total = (batches * per_batch) as usize;
    let mut a = Vec::new();
    let mut b = Vec::new();
    for _ in 0..total {
        let t = next_trigger(&mut h).await;
        if t.consumer == "a_c" {
            a.push(id_of(&t))
        } else {
            b.push(id_of(&t))
        }
    }
    assert!(a.windows(2).all(|w| w[0] < w[1]), "a_c out of order");
    assert!(b.windows(2).all(|w| w[0] < w[1]), "b_c out of order");
    assert_eq!(a.len() + b.len(), total);
    let mut acks = 0;
    while acks < batches {
        if let ConnMsg::Ack(_) = next_conn(&mut h).await {
            acks += 1;
        }
    }
}

/// Defect: disabling a consumer while its part was being published drained that part twice
/// and acked the batch before the other consumer's trigger was confirmed. Now the part in
/// flight finishes normally: a nack of the disabled consumer's trigger rolls the batch back.
#[actix_rt::test]
async fn disabling_a_consumer_mid_publish_neither_acks_early_nor_loses_its_part() {
    let mut h = harness(
        vec![TestConsumer::new("a_c", "a"), TestConsumer::new("b_c", "b")],
        &["a_c"],
        5,
    );
    h.manager
        .do_send(batch(1, vec![event("a", 1, 10), event("b", 2, 11)]));
    next_trigger(&mut h).await;
    next_trigger(&mut h).await;
    h.manager
        .send(canal_consumer::manager::SetEnabled {
            name: "a_c".into(),
            enabled: false,
        })
        .await
        .unwrap()
        .unwrap();
    match next_conn(&mut h).await {
        ConnMsg::Filter(f) => assert_eq!(f, "db\\.b"),
        other => panic!("expected the narrowed filter first, got {other:?}"),
    }
    // the held publish of a_c now fails: the batch must be rolled back, never acked
    let reply = loop {
        if let Some(r) = h.held.lock().unwrap().pop() {
            break r;
        }
        tokio::task::yield_now().await;
    };
    reply
        .send(Err(PublishError::Nacked { id: "x".into() }))
        .unwrap();
    match next_conn(&mut h).await {
        ConnMsg::Rollback(b) => assert_eq!(b.id, 1),
        other => panic!("expected a rollback of batch 1, got {other:?}"),
    }
    // nothing of batch 1 runs any more: it is released, so it stops holding the window
    match next_conn(&mut h).await {
        ConnMsg::Release(b) => assert_eq!(b.id, 1),
        other => panic!("expected batch 1 to be released, got {other:?}"),
    }
    let err = h
        .manager
        .send(canal_consumer::manager::SetEnabled {
            name: "nope".into(),
            enabled: false,
        })
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err,
        canal_consumer::manager::SetEnabledError::UnknownConsumer("nope".into())
    );
}

/// A consumer that fails on its row (panics, fatal errors) under the default `park` policy:
/// after `attempts` failures the row becomes a dead letter with the error and the event, the
/// batch is acked, and the healthy consumer's trigger is published exactly once.
#[actix_rt::test]
async fn a_poison_row_is_parked_and_the_batch_proceeds_without_duplicates() {
    let mut broken = TestConsumer::new("a_c", "a");
    broken.always_fail = true;
    broken.poison = PoisonPolicy {
        on_poison: OnPoison::Park,
        attempts: 2,
    };
    let mut h = harness(vec![broken, TestConsumer::new("b_c", "b")], &[], 50);
    h.manager
        .do_send(batch(1, vec![event("a", 1, 10), event("b", 2, 11)]));
    loop {
        match next_conn(&mut h).await {
            ConnMsg::Ack(b) => {
                assert_eq!(b.id, 1);
                break;
            }
            ConnMsg::Rollback(b) => panic!("batch {b} rolled back: the poison row must be parked"),
            _ => {}
        }
    }
    // everything published before the ack was confirmed, so it is all in the channel now
    let mut got = Vec::new();
    while let Ok(t) = h.trig_rx.try_recv() {
        got.push(t);
    }
    let healthy: Vec<_> = got.iter().filter(|t| t.consumer == "b_c").collect();
    assert_eq!(healthy.len(), 1, "{got:#?}");
    let parked: Vec<_> = got.iter().filter(|t| t.consumer == "a_c").collect();
    assert_eq!(parked.len(), 1, "{got:#?}");
    let dl = parked[0];
    assert_eq!(dl.plugin, "dead_letter");
    assert_eq!(dl.route.routing_key, "plugin_tasks.dead_letter");
    assert!(
        dl.payload["error"]
            .as_str()
            .unwrap()
            .contains("downstream is gone"),
        "{}",
        dl.payload
    );
    assert_eq!(dl.payload["event"]["data"]["id"], 1);
    let st = h.manager.send(GetManagerStatus).await.unwrap();
    let a = st.consumers.iter().find(|c| c.name == "a_c").unwrap();
    assert_eq!(a.parked, 1);
}

/// Issue 10: a consumer whose every row fails under the `error_handler` policy was counted
/// (`errors`) but showed no last error; the reason now reaches `status`.
#[actix_rt::test]
async fn errors_handled_by_a_policy_show_their_reason_in_status() {
    let mut bad = TestConsumer::new("a_c", "a");
    bad.bad_rows = true;
    let mut h = harness(vec![bad], &[], 5);
    h.manager
        .do_send(batch(1, vec![event("a", 1, 10), event("a", 2, 11)]));
    loop {
        if let ConnMsg::Ack(_) = next_conn(&mut h).await {
            break;
        }
    }
    let st = h.manager.send(GetManagerStatus).await.unwrap();
    let a = &st.consumers[0];
    assert_eq!(a.errors, 2);
    assert_eq!(a.last_error.as_deref(), Some("this row cannot be rendered"));
    // each failure went to the error_handler plugin
    let t = next_trigger(&mut h).await;
    assert_eq!(t.plugin, "error_handler");
}

/// The Manager actor's retry timer (`ctx.run_later` on the router's `RetryAfter`) on tokio's
/// paused clock, without a real sleep: a part whose consumer panics is run again after the
/// restart backoff, `restart_min` (20 ms) doubling per restart up to `restart_max` (200 ms),
/// to tokio's timer tick (1 ms). Expected gaps from the policy's arithmetic: 20, 40, 80, 160,
/// then 200 twice.
#[actix_rt::test]
async fn a_failing_part_is_retried_after_the_restart_backoff_in_virtual_time() {
    tokio::time::pause();
    let mut flaky = TestConsumer::new("flaky", "b");
    flaky.panic_on = Some(1);
    flaky.panics_left.store(6, Ordering::SeqCst);
    let seen_at = flaky.seen_at.clone();
    let mut h = harness(vec![flaky], &[], 10);
    h.manager.do_send(batch(1, vec![event("b", 1, 10)]));
    // the seventh attempt succeeds: its trigger, then the ack (the paused clock moves to the
    // next armed timer only while every task waits)
    let t = next_trigger(&mut h).await;
    assert_eq!(id_of(&t), 1);
    match next_conn(&mut h).await {
        ConnMsg::Ack(b) => assert_eq!(b.id, 1),
        other => panic!("expected the ack, got {other:?}"),
    }
    let seen = seen_at.lock().unwrap().clone();
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1] - w[0]).collect();
    let backoff = [20, 40, 80, 160, 200, 200].map(Duration::from_millis);
    assert_eq!(gaps.len(), backoff.len(), "attempts at {seen:?}");
    // tokio's timer wheel rounds a deadline up to its next 1 ms tick
    for (gap, delay) in gaps.iter().zip(backoff) {
        assert!(
            *gap >= delay && *gap <= delay + Duration::from_millis(1),
            "retried after {gap:?}, the backoff is {delay:?} (gaps {gaps:?})"
        );
    }
    assert!(h.trig_rx.try_recv().is_err(), "one trigger for the row");
}
