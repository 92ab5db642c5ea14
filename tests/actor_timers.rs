//! The timers of the actor shells on tokio's paused clock: no real sleep, no wall-clock
//! assertion. Time moves only when every task waits (tokio's auto-advance to the next armed
//! timer) or when a test sleeps until a virtual instant, so each event is stamped with the
//! exact virtual time it happened at.
//!
//! - the heartbeat writer (`backfill::heartbeat::run`) with a fake table and a fake connection:
//!   a write every `interval`, a failed write tried again at the next tick and not sooner, a
//!   slow write delaying the next tick instead of bunching the missed ones, and the lag the
//!   Manager's tracker computes from the writer's notes at given virtual times;
//! - the publisher's reconnect backoff (`AmqpPublisher`), with connection attempts that fail
//!   before any I/O, timed by the "connecting to the broker" log line.
//!
//! The pure decisions behind them have their own unit tests (`manager::heartbeat`,
//! `publisher::failover`, `publisher::window`, `ha::core`).
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

use actix::prelude::*;
use canal_consumer::backfill::BackfillError;
use canal_consumer::backfill::heartbeat::{self, HeartbeatTable};
use canal_consumer::canal::connection::{ConnectionState, ConnectionStatus, GetConnectionStatus};
use canal_consumer::manager::HeartbeatNote;
use canal_consumer::manager::heartbeat::{Note, Tracker};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Run `test` in an actix system on a clock paused from the start: the runtime's timer wheel
/// (1 ms ticks) then counts from the instant the test begins, so a timer set a whole number of
/// ms from then fires exactly on time (`tokio::time::pause` later in a test leaves the clock
/// off the wheel's grid, and every timer fires up to 1 ms late).
fn on_paused_clock(test: impl std::future::Future<Output = ()>) {
    actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    })
    .block_on(test);
}

/// The heartbeat values' epoch ms at virtual time 0.
const BASE_MS: i64 = 1_700_000_000_000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Virtual ms since `start`.
fn at(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

/// What the fakes saw, stamped with virtual ms since the test began.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Note(Note),
    EnsureTable(bool),
    Write { value: String, ok: bool },
}

/// A connection whose state the test sets.
struct FakeConnection(Arc<Mutex<ConnectionState>>);
impl Actor for FakeConnection {
    type Context = Context<Self>;
}
impl Handler<GetConnectionStatus> for FakeConnection {
    type Result = MessageResult<GetConnectionStatus>;
    fn handle(&mut self, _: GetConnectionStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(ConnectionStatus {
            state: *self.0.lock().unwrap(),
            ..Default::default()
        })
    }
}

/// The Manager's side: records every note and feeds it into a tracker, as the Manager does.
struct FakeManager {
    start: Instant,
    seen: mpsc::UnboundedSender<(u64, Seen)>,
    tracker: Arc<Mutex<Tracker>>,
}
impl Actor for FakeManager {
    type Context = Context<Self>;
}
impl Handler<HeartbeatNote> for FakeManager {
    type Result = ();
    fn handle(&mut self, m: HeartbeatNote, _: &mut Context<Self>) {
        self.tracker.lock().unwrap().note(m.0);
        let _ = self.seen.send((at(self.start), Seen::Note(m.0)));
    }
}

/// How the fake table answers its next calls (front first; empty: succeed at once).
#[derive(Debug, Clone, Copy)]
enum Answer {
    Ok,
    Fail,
    /// Succeed after this much virtual time.
    Slow(Duration),
    /// Never answer (a frozen source).
    Hang,
}

#[derive(Clone)]
struct FakeTable {
    start: Instant,
    seen: mpsc::UnboundedSender<(u64, Seen)>,
    ensure: Arc<Mutex<VecDeque<Answer>>>,
    writes: Arc<Mutex<VecDeque<Answer>>>,
    /// Canal brings a written row back to the tracker after this much virtual time.
    trip: Option<(Duration, Arc<Mutex<Tracker>>)>,
}

fn down() -> BackfillError {
    BackfillError::Invalid("fake source: down".into())
}

impl FakeTable {
    async fn answer(queue: &Mutex<VecDeque<Answer>>) -> Result<(), BackfillError> {
        let next = queue.lock().unwrap().pop_front().unwrap_or(Answer::Ok);
        match next {
            Answer::Ok => Ok(()),
            Answer::Fail => Err(down()),
            Answer::Slow(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Answer::Hang => std::future::pending().await,
        }
    }
}

impl HeartbeatTable for FakeTable {
    async fn ensure_table(&self) -> Result<(), BackfillError> {
        let res = FakeTable::answer(&self.ensure).await;
        let _ = self
            .seen
            .send((at(self.start), Seen::EnsureTable(res.is_ok())));
        res
    }

    async fn write_heartbeat(&self, _id: &str, value: &str) -> Result<(), BackfillError> {
        let res = FakeTable::answer(&self.writes).await;
        let _ = self.seen.send((
            at(self.start),
            Seen::Write {
                value: value.to_string(),
                ok: res.is_ok(),
            },
        ));
        if let (Ok(()), Some((trip, tracker))) = (&res, &self.trip) {
            let (trip, tracker) = (*trip, tracker.clone());
            let hb: i64 = value.strip_prefix("hb:").unwrap().parse().unwrap();
            let start = self.start;
            actix::spawn(async move {
                tokio::time::sleep(trip).await;
                let now = BASE_MS + at(start) as i64;
                tracker.lock().unwrap().seen(hb, now);
            });
        }
        res
    }
}

struct Writer {
    start: Instant,
    state: Arc<Mutex<ConnectionState>>,
    tracker: Arc<Mutex<Tracker>>,
    seen: mpsc::UnboundedReceiver<(u64, Seen)>,
    /// Keeps the fake connection alive (the writer ends when it is gone).
    _connection: Addr<FakeConnection>,
}

impl Writer {
    /// What the fakes saw up to virtual time `last_ms` (time moves on while the test waits),
    /// in time order; at one instant the notes first (the Manager's mailbox and the table
    /// are served in an order that means nothing).
    async fn until(&mut self, last_ms: u64) -> Vec<(u64, Seen)> {
        let mut got = Vec::new();
        loop {
            let (t, seen) = self.seen.recv().await.unwrap();
            if t > last_ms {
                break;
            }
            got.push((t, seen));
        }
        got.sort_by_key(|(t, seen)| (*t, !matches!(seen, Seen::Note(_))));
        got
    }

    fn lag_at(&self, virtual_ms: u64) -> Option<i64> {
        self.tracker
            .lock()
            .unwrap()
            .lag_ms(BASE_MS + virtual_ms as i64)
    }
}

/// Start the writer at virtual time 0 with heartbeats every `interval`.
fn writer(
    interval: Duration,
    ensure: &[Answer],
    writes: &[Answer],
    trip: Option<Duration>,
) -> Writer {
    let start = Instant::now();
    let (tx, rx) = mpsc::unbounded_channel();
    let tracker = Arc::new(Mutex::new(Tracker::new()));
    let state = Arc::new(Mutex::new(ConnectionState::Connected));
    let connection = FakeConnection(state.clone()).start();
    let manager = FakeManager {
        start,
        seen: tx.clone(),
        tracker: tracker.clone(),
    }
    .start();
    let table = FakeTable {
        start,
        seen: tx,
        ensure: Arc::new(Mutex::new(ensure.iter().copied().collect())),
        writes: Arc::new(Mutex::new(writes.iter().copied().collect())),
        trip: trip.map(|t| (t, tracker.clone())),
    };
    actix::spawn(heartbeat::run(
        table,
        "heartbeat:example/1001".into(),
        interval,
        manager.recipient(),
        connection.clone().recipient(),
        move || BASE_MS + at(start) as i64,
    ));
    Writer {
        start,
        state,
        tracker,
        seen: rx,
        _connection: connection,
    }
}

fn written(t: u64) -> Seen {
    Seen::Note(Note::Written(BASE_MS + t as i64))
}

fn write(t: u64, ok: bool) -> Seen {
    Seen::Write {
        value: format!("hb:{}", BASE_MS + t as i64),
        ok,
    }
}

/// `heartbeat.interval` of virtual time between writes, the first at once; a failed write (and
/// a failed table check) is tried again at the next tick, not sooner and not in a burst; the
/// table is checked until it once succeeded, then never again.
#[test]
fn heartbeats_are_written_every_interval_and_a_failed_write_waits_for_the_next_tick() {
    on_paused_clock(async {
        use Answer::*;
        let mut w = writer(
            Duration::from_secs(1),
            &[Fail, Ok],
            &[Ok, Fail, Fail, Ok],
            None,
        );
        let got = w.until(6000).await;
        let expected = vec![
            // tick 0: the table check fails, so nothing is written
            (0, written(0)),
            (0, Seen::EnsureTable(false)),
            (1000, written(1000)),
            (1000, Seen::EnsureTable(true)),
            (1000, write(1000, true)),
            (2000, written(2000)),
            (2000, write(2000, false)),
            (3000, written(3000)),
            (3000, write(3000, false)),
            (4000, written(4000)),
            (4000, write(4000, true)),
            (5000, written(5000)),
            (5000, write(5000, true)),
            (6000, written(6000)),
            (6000, write(6000, true)),
        ];
        assert_eq!(got, expected);
    });
}

/// A write that takes longer than the interval (a slow source) delays the next tick to when it
/// ends, and the interval counts from there: the ticks it missed are not made up in a burst
/// of writes (`MissedTickBehavior::Delay`).
#[test]
fn a_slow_write_delays_the_next_heartbeat_instead_of_bunching_the_missed_ones() {
    on_paused_clock(async {
        use Answer::*;
        let mut w = writer(
            Duration::from_secs(1),
            &[],
            &[Ok, Slow(ms(2500)), Ok, Ok],
            None,
        );
        let got = w.until(4500).await;
        let expected = vec![
            (0, written(0)),
            (0, Seen::EnsureTable(true)),
            (0, write(0, true)),
            (1000, written(1000)),
            // the write of 1000 ends at 3500; the ticks of 2000 and 3000 are gone
            (3500, written(3500)),
            (3500, write(1000, true)),
            (3500, write(3500, true)),
            (4500, written(4500)),
            (4500, write(4500, true)),
        ];
        assert_eq!(got, expected);
    });
}

/// A write the source never answers (a frozen source) is abandoned after
/// `heartbeat::WRITE_TIMEOUT` as a failed one, and the writer goes on at the next tick: an
/// idle database's lag comes back with the next heartbeat instead of waiting on it for the
/// minutes TCP takes to give up.
#[test]
fn a_write_the_source_never_answers_is_abandoned_and_the_writer_goes_on() {
    on_paused_clock(async {
        use Answer::*;
        let mut w = writer(
            Duration::from_secs(1),
            &[],
            &[Ok, Hang, Ok, Ok],
            Some(ms(30)),
        );
        let timeout = heartbeat::WRITE_TIMEOUT.as_millis() as u64;
        let last = 1000 + timeout + 1000;
        // virtual time: without the timeout the writer waits forever and the clock runs out
        let got = tokio::time::timeout(Duration::from_secs(3600), w.until(last))
            .await
            .expect("the writer is stuck on a write the source never answers");
        let expected = vec![
            (0, written(0)),
            (0, Seen::EnsureTable(true)),
            (0, write(0, true)),
            // the write of 1000 never ends: abandoned at 1000 + WRITE_TIMEOUT, unseen
            (1000, written(1000)),
            (1000 + timeout, written(1000 + timeout)),
            (1000 + timeout, write(1000 + timeout, true)),
            (last, written(last)),
            (last, write(last, true)),
        ];
        assert_eq!(got, expected);
        // the heartbeats written after it came back: the lag is their trip again
        assert_eq!(w.lag_at(last + 1000), Some(30));
    });
}

/// The lag the Manager's tracker computes from the writer's notes, at given virtual times: the
/// trip time while heartbeats come through (Canal brings each row back 30 ms after it is
/// written), growing from the oldest missed tick while the connection is down, back to the
/// trip once a heartbeat comes through again, and unknown on a standby.
#[test]
fn the_lag_from_heartbeats_follows_the_stream_in_virtual_time() {
    on_paused_clock(async {
        let interval = Duration::from_secs(1);
        let w = writer(interval, &[], &[], Some(ms(30)));
        let until = |t: u64| tokio::time::sleep_until(w.start + ms(t));
        until(20).await;
        // written at 0, not back yet: owed since 0
        assert_eq!(w.lag_at(20), Some(20));
        until(2500).await;
        assert_eq!(w.lag_at(2500), Some(30));
        // Canal goes away: the ticks at 3000, 4000, 5000 are missed
        *w.state.lock().unwrap() = ConnectionState::Reconnecting;
        until(5500).await;
        assert_eq!(w.lag_at(5500), Some(2500));
        *w.state.lock().unwrap() = ConnectionState::Connected;
        // written at 6000, back at 6030
        until(6010).await;
        assert_eq!(w.lag_at(6010), Some(3010));
        until(6500).await;
        assert_eq!(w.lag_at(6500), Some(30));
        let st = w.tracker.lock().unwrap().status(BASE_MS + 6500);
        assert_eq!(st.pending, 0);
        assert_eq!(st.last_seen, Some(BASE_MS + 6000));
        assert_eq!(st.trips, 4, "heartbeats of 0, 1000, 2000 and 6000");
        // a standby owes nothing and knows no lag
        *w.state.lock().unwrap() = ConnectionState::Standby;
        until(9500).await;
        assert_eq!(w.lag_at(9500), None);
    });
}

/// Records the virtual time and node of every "connecting to the broker" log line.
struct Attempts {
    start: Instant,
    seen: Arc<Mutex<Vec<(u64, u64)>>>,
}

#[derive(Default)]
struct Fields {
    message: String,
    node: Option<u64>,
}

impl tracing::field::Visit for Fields {
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name() == "node" {
            self.node = Some(value);
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Attempts {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        if f.message == "connecting to the broker" {
            let node = f.node.unwrap();
            self.seen.lock().unwrap().push((at(self.start), node));
        }
    }
}

/// The publisher actor's reconnect timer: two broker nodes that both fail (the CA file of
/// `[amqp.tls]` is missing, so every attempt fails before any I/O), `reconnect_min` 100 ms,
/// `reconnect_max` 1 s. Each round tries both nodes at once, then waits 100 ms, doubling per
/// failed round, capped at 1 s: attempts at 0, 100, 300, 700, 1500, 2500, 3500 ms of virtual
/// time, never sooner.
#[test]
fn the_publisher_reconnects_after_a_backoff_that_doubles_up_to_reconnect_max() {
    use canal_consumer::config::{AmqpConfig, Secret, TlsConfig};
    use canal_consumer::publisher::AmqpPublisher;
    use tracing_subscriber::layer::SubscriberExt;
    let seen = Arc::new(Mutex::new(Vec::new()));
    on_paused_clock(async {
        let start = Instant::now();
        let _log =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(Attempts {
                start,
                seen: seen.clone(),
            }));
        let dir = tempfile::tempdir().unwrap();
        let cfg = AmqpConfig {
            urls: vec![
                Secret::new("amqps://guest:guest@node-a.invalid:5671/%2f"),
                Secret::new("amqps://guest:guest@node-b.invalid:5671/%2f"),
            ],
            tls: TlsConfig {
                ca_file: Some(dir.path().join("missing-ca.pem")),
                ..TlsConfig::default()
            },
            reconnect_min: ms(100),
            reconnect_max: ms(1000),
            ..AmqpConfig::default()
        };
        let publisher = AmqpPublisher::new(cfg).start();
        tokio::time::sleep_until(start + ms(3600)).await;
        drop(publisher);
    });
    let seen = seen.lock().unwrap().clone();
    let expected: Vec<(u64, u64)> = [0, 100, 300, 700, 1500, 2500, 3500]
        .iter()
        .flat_map(|&t| [(t, 1), (t, 2)])
        .collect();
    assert_eq!(seen, expected);
}
