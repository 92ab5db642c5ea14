//! Deterministic simulation of the delivery path: the sans-IO cores wired together (the Canal
//! connection's [`ConnectionCore`] with its batch window, the Manager's [`Router`], the
//! publisher's [`ConfirmWindow`]) with a model Canal server, model consumers, a model broker
//! and a virtual clock. Two of the five consumers are real [`ConfigConsumer`]s built from a
//! TOML spec: one with a bulk rule (`max_rows = 2`: several rows per message, never across a
//! delivery), one whose rule fails on every third row with `on_error = "error_handler"`
//! (one `error_handler` message per failing row). In ZooKeeper seeds (one in four) there are
//! two replicas, each with its own connection core, router, publisher and consumers, each fed
//! by the real [`HaCore`] from a model ZooKeeper: sessions that end a session timeout after the
//! servers last heard from them, and the client running node one session holds.
//!
//! A seeded RNG picks, at every step, one of: the answer of the operation on the Canal session
//! (connect, GET, acks + GET, subscribe, rollback, close), the end of a batch's decoding
//! (sometimes undecodable: a stall the operator skips; sometimes a panic: a rollback), a
//! consumer answering (ok, error/panic → restart and retry; a poisoned consumer fails until the
//! router quarantines it), a retry timer,
//! publishing, a broker ack / multi-ack / nack / return / confirm timeout / connection loss / a
//! channel gone stale (nacks everything until replaced),
//! the Canal connection dropping, the Canal server restarting (its saved cursor may be older
//! than the last ack: it **rewinds**; it numbers batches from 1 again), Canal flushing its
//! cursor, an ack written but never received, the clock jumping to the next armed timer
//! (reconnect backoff, the pause after a rollback, the ack wait), enable and disable of a
//! consumer (which changes the subscription: the model server filters rows when it parses
//! them, as Canal does), and a drain (graceful shutdown). In ZooKeeper seeds: which replica
//! steps, its ZooKeeper client reading an answer (claimed, held by the other, heartbeat,
//! node gone, expired), sending a heartbeat, getting its connection back, time passing, and
//! the faults: its ZooKeeper connection dropping, the process freezing (for up to two session
//! timeouts), freezing between the lease check and a write (up to `SIM_GATE_FREEZE_MS`, by
//! default just under the third of the session timeout the lease leaves as margin), or being
//! killed and started again (its old session holds the node until it times out). After every
//! step the invariants are checked:
//!
//! - (a) Canal acks a batch only when, for every consumer that was never disabled, every row up
//!   to the end of that batch has a message the broker accepted (acks also go in batch order:
//!   the model server refuses any other order);
//! - (b) once faults stop, every row reaches the broker for every such consumer (liveness);
//! - (c) per consumer, channel writes within an epoch follow binlog order; no write of an older
//!   epoch follows a write of a newer one; after a failure of epoch `e` settles, nothing of
//!   epoch `e` or older is written again;
//! - (d) every copy of a row's message carries the same id (the real `message_id`);
//! - (e) batches and bytes in flight (abandoned ones included) and the publisher's unconfirmed
//!   and queued messages stay within their bounds;
//! - (f) a GET waits on the server (long-polls) only right after a GET of the same epoch came back
//!   empty or short; after any other batch, and after a new epoch starts, the next GET takes
//!   what is there without waiting (so latency never depends on a fixed wait while rows keep
//!   coming);
//! - (g) a long poll is written with no batch of its epoch in flight (their acks went out
//!   before it), unless the wait for those acks ended (the `ack_wait` timer fired), so a batch
//!   stuck downstream does not stop the fetching;
//! - (h) once a drain has ended (the core said [`Action::Drained`]: the shell then stops the
//!   publisher and closes the session), no batch of that epoch is delivered any more;
//! - (i) a row Canal sends again after it was acked (a rewind) is not published again: no
//!   channel write for a row at or before the newest row shipped in an acked batch repeats a
//!   message the broker had accepted when its row was acked;
//! - (j) the toggled consumer: once its `enable` has returned (the core said the filter is in
//!   force), every row of its tables committed after that reaches it while it stays enabled;
//! - (k) ZooKeeper seeds: every GET, ACK, subscribe and rollback lands
//!   while the writing replica's session holds the client running node in the model ZooKeeper,
//!   whatever froze in between; (a), (b) and (d) hold across handovers;
//! - (l) single-replica seeds: the connection never reports a conflict with another client;
//! - (m) nothing more is written on a publishing channel once it nacked a publish, until the
//!   publisher renewed the channel (a channel's state at the broker can go
//!   stale: on RabbitMQ 3.x, a channel that first published to a quorum queue while its leader
//!   was down nacks every later publish; the model broker's stale channel does the same).
//!
//! A GET is two steps, as on the wire: written (the model server answers it then), and its
//! answer read later, with other steps between; one operation is on the session at a time.
//!
//! - (n) bulk ids across redelivery: a bulk row a replica writes again (after a rollback, a
//!   reconnect, a Canal restart that cut the batches elsewhere, or a restart of the replica,
//!   which reads its rewind guard file) is carried by a bulk with the id of the first bulk
//!   that carried it, unless the replica delivered held rows as they were since (a drain, a
//!   long poll that found nothing, held rows filling the window), the model Canal restarted at
//!   a row where none of the acks ended since (a real Canal restarts where it was acked), the
//!   other replica ever wrote to Canal (it acks where it cut, and a rewind can land there), or
//!   an operator skipped a
//!   batch (a skipped batch has no position: after a Canal rewind its rows come again and join
//!   the delivery after them): the connection core cuts rows Canal sends again where their
//!   first delivery ended (`canal::connection::core::recut`).
//!
//! The run prints what (n) does not check: bulk rows written again under another id after a
//! handover between replicas (the delivery ends are not shared between them), or after a
//! re-cut flush or a skip. It also prints the handovers, the freezes between a lease check
//! and a write, and, under `SIM_MUTATION=ungated_rollback`, the rollbacks a replica wrote after
//! its lease ended. `SIM_MUTATION=no_gate | lease_without_margin |
//! heartbeat_on_expired_session | claim_ignores_holder | ungated_rollback` breaks the model's
//! ZooKeeper shell on purpose (see [`Mutation`]).
//!
//! A failing seed reproduces exactly: `SIM_SEED=1234 cargo test --test delivery_sim -- --nocapture`.
//! More seeds: `SIM_SEEDS=1000000 cargo test --release --test delivery_sim` (see README).
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

use canal_consumer::canal::connection::ConnectionState;
use canal_consumer::canal::connection::core::{
    Action, ConnectionCore, CoreConfig, Decoded, Done, EventsView, Failure, FailureKind, Input, Op,
    RawView, Timer,
};
use canal_consumer::canal::window::BatchRef;
use canal_consumer::consumer::ConsumerContext;
use canal_consumer::consumer::actor::{finish_part, process_event};
use canal_consumer::event::{ChangeEvent, EventType, Position, Row, Value};
use canal_consumer::ha::Role;
use canal_consumer::ha::core::{Action as HaAction, Event as HaEvent, HaCore};
use canal_consumer::manager::core::{
    Command, ConsumerState, Mode, OnPoison, PartError, PoisonPolicy, Processed, Router,
    SupervisionConfig,
};
use canal_consumer::publisher::PublishError;
use canal_consumer::publisher::window::{ConfirmWindow, JobNo, Outgoing};
use canal_consumer::rules::{ConfigConsumer, ConsumerSpec, parse_file};
use canal_consumer::trigger::{MessageFormat, Route, SourceRef, bulk_message_id, message_id};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const MAX_BATCHES: usize = 4;
const ROW_BYTES: usize = 100;
/// GET size in rows (one row, one Canal unit of ROW_BYTES).
const FETCH_ROWS: usize = 5;
const MAX_BYTES: usize = 8 * ROW_BYTES;
const MAX_UNCONFIRMED: usize = 6;
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
const FETCH_WAIT: Duration = Duration::from_millis(100);
/// `canal.ack_wait`: shorter than `FETCH_WAIT`, as by default.
const ACK_WAIT: Duration = Duration::from_millis(5);
const LEASE: Duration = Duration::from_secs(2);
const CONSUMERS: usize = 5;
const TABLES: usize = 4;
/// The toggled consumer.
const TOGGLED: usize = 2;
/// The real [`ConfigConsumer`] with a bulk rule (`max_rows = BULK_ROWS`).
const BULK: usize = 3;
const BULK_ROWS: usize = 2;
/// The real [`ConfigConsumer`] whose rule fails on some rows (policy `error_handler`).
const ERRH: usize = 4;

/// The two consumers the sim runs for real, as the operator writes them. Both stall on poison
/// (they are never parked nor quarantined here: their failures come back as rollbacks).
const REAL_CONSUMERS: &str = r#"
[consumers.c3]
on_poison = "stall"
[[consumers.c3.filters]]
database = "db"
table = "t"
[[consumers.c3.rules]]
name = "r"
plugin = "p"
payload = { id = "${data.id}" }
batch = { max_rows = 2 }

[consumers.c4]
on_poison = "stall"
[[consumers.c4.filters]]
database = "db"
table = "t"
[[consumers.c4.rules]]
name = "r"
plugin = "p"
on_error = "error_handler"
payload = { id = "${data.id}", x = "${data.x}" }
"#;

fn real_specs() -> &'static [ConsumerSpec] {
    static SPECS: OnceLock<Vec<ConsumerSpec>> = OnceLock::new();
    SPECS.get_or_init(|| {
        let mut specs = parse_file(Path::new("sim.toml"), REAL_CONSUMERS).unwrap();
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[1].rules[0].batch, None);
        assert_eq!(specs[0].rules[0].batch.map(|b| b.max_rows), Some(BULK_ROWS));
        specs
    })
}

/// Rows the error_handler consumer's rule fails on (they lack column `x`).
fn rule_fails(row: usize) -> bool {
    row % 3 == 1
}
const BASE_MS: i64 = 1_700_000_000_000;

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

fn position(row: usize) -> Position {
    Position {
        log_file: "mysql-bin.000001".into(),
        offset: 4 + 100 * row as u64,
        row_index: 0,
        server_id: 1,
        gtid: None,
    }
}

/// A GET's answer as the model server sends it: rows `start..end`, one entry each; `events`
/// are the rows its filter let through (when it parsed them).
#[derive(Debug, Clone)]
struct SimRaw {
    id: i64,
    start: usize,
    end: usize,
    asked: i32,
    shipped: Vec<usize>,
}

impl RawView for SimRaw {
    fn batch_id(&self) -> i64 {
        self.id
    }
    fn frame_bytes(&self) -> usize {
        (self.end - self.start) * ROW_BYTES
    }
    fn asked(&self) -> i32 {
        self.asked
    }
    fn entry_sizes(&self) -> impl ExactSizeIterator<Item = usize> + '_ {
        (self.start..self.end).map(|_| ROW_BYTES)
    }
}

/// Decoded rows: (row, position, executed at).
#[derive(Debug, Clone, Default)]
struct SimEvents(Vec<(usize, Position, i64)>);

impl EventsView for SimEvents {
    fn count(&self) -> usize {
        self.0.len()
    }
    fn key(&self, i: usize) -> (&Position, i64) {
        (&self.0[i].1, self.0[i].2)
    }
    fn drop_first(&mut self, n: usize) {
        self.0.drain(..n);
    }
    fn split_off(&mut self, n: usize) -> Self {
        SimEvents(self.0.split_off(n))
    }
    fn append(&mut self, mut more: Self) {
        self.0.append(&mut more.0)
    }
}

type Core = ConnectionCore<SimRaw, SimEvents>;

/// The model Canal server: one client identity, a cursor, batches handed out in order.
struct Server {
    /// Table of each row of the binlog.
    rows: Vec<u8>,
    /// Rows committed so far (the rest are not in the binlog yet).
    committed: usize,
    /// Whether the filter in force when the row was parsed let it through.
    parsed: Vec<bool>,
    /// The subscription filter in force (a table mask).
    filter: u8,
    acked_upto: usize,
    /// The cursor as last flushed to its meta store: a restart resumes anywhere from here to
    /// `acked_upto` (Canal flushes periodically).
    saved_upto: usize,
    /// Where acked batches ended (and 0): the cursors a real Canal can restart at.
    ack_ends: BTreeSet<usize>,
    delivered_upto: usize,
    /// Batches handed out and not acked: id, rows, and the last row it shipped.
    outstanding: VecDeque<(i64, usize, usize, Option<usize>)>,
    next_id: i64,
    /// Accepting connections.
    up: bool,
    /// The highest row ever acked (the cursor may go back; this does not).
    high_acked: usize,
}

impl Server {
    fn commit(&mut self, n: usize) {
        let to = (self.committed + n).min(self.rows.len());
        for r in self.committed..to {
            self.parsed[r] = self.filter & (1 << self.rows[r]) != 0;
        }
        self.committed = to;
    }

    fn get(&mut self, asked: usize, overshoot: bool) -> SimRaw {
        let start = self.delivered_upto;
        if start >= self.committed {
            return SimRaw {
                id: -1,
                start,
                end: start,
                asked: asked as i32,
                shipped: Vec::new(),
            };
        }
        // Canal takes entries while it has taken at most `asked` units: one more may ride along
        let end = (start + asked + usize::from(overshoot)).min(self.committed);
        self.delivered_upto = end;
        let id = self.next_id;
        self.next_id += 1;
        let shipped: Vec<usize> = (start..end).filter(|&r| self.parsed[r]).collect();
        self.outstanding
            .push_back((id, start, end, shipped.last().copied()));
        SimRaw {
            id,
            start,
            end,
            asked: asked as i32,
            shipped,
        }
    }

    /// Canal refuses an ack that is not for its oldest outstanding batch.
    fn ack(&mut self, id: i64) -> (usize, usize, Option<usize>) {
        let (first, start, end, last_shipped) = *self
            .outstanding
            .front()
            .unwrap_or_else(|| panic!("ack of batch {id} with nothing outstanding"));
        assert_eq!(first, id, "acks must reach canal in batch order");
        self.outstanding.pop_front();
        assert_eq!(start, self.acked_upto);
        self.acked_upto = end;
        self.ack_ends.insert(end);
        self.high_acked = self.high_acked.max(end);
        (start, end, last_shipped)
    }

    fn rollback(&mut self) {
        self.outstanding.clear();
        self.delivered_upto = self.acked_upto;
    }

    /// A restart: the cursor comes back from the meta store (possibly older than the last
    /// ack), batch ids start again at 1, rows are parsed again with the filter in force.
    fn restart(&mut self, cursor: usize) {
        self.acked_upto = cursor;
        self.saved_upto = cursor;
        self.outstanding.clear();
        self.delivered_upto = cursor;
        self.next_id = 1;
        for r in cursor..self.committed {
            self.parsed[r] = self.filter & (1 << self.rows[r]) != 0;
        }
    }
}

#[derive(Debug, Clone)]
struct SimPart {
    rows: Vec<usize>,
}

#[derive(Debug, Clone)]
struct Msg {
    id: String,
    consumer: usize,
    /// The (first) row of the message.
    row: usize,
    /// Every row it carries: one, or a bulk's.
    rows: Vec<usize>,
    epoch: u64,
}

impl Outgoing for Msg {
    fn id(&self) -> &str {
        &self.id
    }
}

struct Consumer {
    /// Bit i set: wants table i.
    tables: u8,
    /// Never disabled, enabled or quarantined in this run: the strong checks apply to it.
    stable: bool,
    inbox: Option<(BatchRef, SimPart, Mode)>,
    /// A poison fault, for non-stable consumers: it fails every normal part until the router
    /// quarantines it.
    poisoned: bool,
    /// The real consumer and its context ([`BULK`] and [`ERRH`]).
    real: Option<(ConfigConsumer, ConsumerContext)>,
}

/// The id of the dead letter that parks `row` of `consumer`.
fn parked_id(row: usize, consumer: usize) -> String {
    format!("dead-letter:{}", row_id(row, consumer))
}

fn name(c: usize) -> String {
    format!("c{c}")
}

/// A row as the real consumers see it: rows the error_handler rule fails on lack `x`.
fn event(row: usize) -> ChangeEvent {
    let mut data = Row::new();
    data.insert("id".into(), Value::Int(row as i64));
    if !rule_fails(row) {
        data.insert("x".into(), Value::Int(10 * row as i64));
    }
    ChangeEvent {
        destination: "example".into(),
        database: "db".into(),
        table: "t".into(),
        event_type: EventType::Insert,
        data,
        old: None,
        changed: Default::default(),
        primary_keys: ["id"].into(),
        position: position(row),
        executed_at: 1_700_000_000_000,
        is_ddl: false,
        sql: None,
        snapshot: None,
    }
}

/// The id of a row's message: the rule `r` triggering plugin `p` (for [`ERRH`], the
/// `error_handler` message of a row its rule fails on).
fn row_id(row: usize, consumer: usize) -> String {
    let plugin = if consumer == ERRH && rule_fails(row) {
        "error_handler"
    } else {
        "p"
    };
    message_id(&source(row), &name(consumer), Some("r"), plugin, 0)
}

/// The id of a bulk message of [`BULK`] carrying `rows` (consecutive rows of one part).
fn bulk_id(rows: &[usize]) -> String {
    let (first, last) = (rows[0], rows[rows.len() - 1]);
    bulk_message_id(
        &source(first),
        &source(last),
        rows.len() as u32,
        &name(BULK),
        "r",
        "p",
    )
}

fn source(row: usize) -> SourceRef {
    SourceRef {
        destination: "example".into(),
        database: "db".into(),
        table: "t".into(),
        event_type: EventType::Insert,
        position: Position {
            log_file: "mysql-bin.000001".into(),
            offset: 4 + 100 * row as u64,
            row_index: 0,
            server_id: 1,
            gtid: None,
        },
        executed_at: 1_700_000_000_000,
        snapshot: None,
    }
}

/// The consumers' tables (bit i: table i). Table 3 is wanted by the toggled consumer alone:
/// disabling it changes what the server ships.
const TABLE_MASKS: [u8; CONSUMERS] = [0b0011, 0b0110, 0b1001, 0b0111, 0b0101];
/// ZooKeeper's session timeout in the model; the HA core's lease is two thirds of it.
const ZK_SESSION: Duration = Duration::from_secs(3);

/// A deliberately broken shell, to show the ZooKeeper faults find what they are meant to find
/// (`SIM_MUTATION=name`; none by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mutation {
    None,
    /// The gate before a write trusts the lease for the whole session timeout (no margin for
    /// a freeze between the check and the write).
    LeaseWithoutMargin,
    /// The gate lets every write through (a replica that woke from a freeze writes).
    NoGate,
    /// The shell takes the answer to a heartbeat on an expired session as a renewal.
    HeartbeatOnExpiredSession,
    /// The shell writes rollbacks without checking the lease (as it did before the
    /// simulator found seed 40663).
    UngatedRollback,
    /// The shell takes a claim refused because another replica holds the node (a replica
    /// started again after a kill, whose old session still holds it) as granted.
    ClaimIgnoresHolder,
}

impl Mutation {
    fn from_env() -> Self {
        match std::env::var("SIM_MUTATION").as_deref() {
            Err(_) | Ok("") | Ok("none") => Mutation::None,
            Ok("lease_without_margin") => Mutation::LeaseWithoutMargin,
            Ok("no_gate") => Mutation::NoGate,
            Ok("heartbeat_on_expired_session") => Mutation::HeartbeatOnExpiredSession,
            Ok("claim_ignores_holder") => Mutation::ClaimIgnoresHolder,
            Ok("ungated_rollback") => Mutation::UngatedRollback,
            Ok(other) => panic!("unknown SIM_MUTATION {other}"),
        }
    }
}

/// The longest freeze between the gate's check and the write (`SIM_GATE_FREEZE_MS`; by default
/// just under the margin between the lease and the session timeout, which is what the lease
/// covers).
fn gate_freeze_max() -> Duration {
    std::env::var("SIM_GATE_FREEZE_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(ZK_SESSION / 3 - Duration::from_millis(1))
}

/// The model ZooKeeper ensemble (ZooKeeper seeds): live sessions with when the servers last
/// heard from them, and which session holds the client running node. A session expires
/// `ZK_SESSION` after it was last heard from; its node goes with it.
#[derive(Debug, Default)]
struct ZkModel {
    sessions: BTreeMap<u64, Instant>,
    node: Option<u64>,
    next_session: u64,
}

impl ZkModel {
    fn alive(&self, session: u64, now: Instant) -> bool {
        self.sessions
            .get(&session)
            .is_some_and(|&heard| now < heard + ZK_SESSION)
    }

    /// The truth (k) is checked against: `session` holds the node at `now`.
    fn holds(&self, session: u64, now: Instant) -> bool {
        self.node == Some(session) && self.alive(session, now)
    }

    /// Sessions not heard from for a session timeout end, and the node of one goes.
    fn expire(&mut self, now: Instant) -> bool {
        let dead: Vec<u64> = self
            .sessions
            .iter()
            .filter(|&(_, &heard)| now >= heard + ZK_SESSION)
            .map(|(&s, _)| s)
            .collect();
        let mut node_gone = false;
        for s in dead {
            self.sessions.remove(&s);
            if self.node == Some(s) {
                self.node = None;
                node_gone = true;
            }
        }
        node_gone
    }
}

/// A replica's ZooKeeper client: its session, what the servers answered and it has not read
/// yet, and the real [`HaCore`] it feeds.
struct Ha {
    core: HaCore,
    session: u64,
    connected: bool,
    watching: bool,
    inbox: VecDeque<HaEvent>,
}

impl Replica {
    fn new(
        id: usize,
        incarnation: usize,
        seed: u64,
        zookeeper: bool,
        now: Instant,
        file: StateFile,
    ) -> Self {
        let consumers: Vec<Consumer> = (0..CONSUMERS)
            .map(|c| Consumer {
                tables: TABLE_MASKS[c],
                stable: c != TOGGLED,
                inbox: None,
                poisoned: false,
                real: (c >= BULK).then(|| {
                    let spec = real_specs()[c - BULK].clone();
                    assert_eq!(spec.name, name(c));
                    let route = Route {
                        exchange: String::new(),
                        routing_key: "plugin_tasks".into(),
                    };
                    (
                        ConfigConsumer::new(spec),
                        ConsumerContext::new(&name(c), route, MessageFormat::Envelope),
                    )
                }),
            })
            .collect();
        let all: u8 = TABLE_MASKS.iter().fold(0, |m, t| m | t);
        let core = ConnectionCore::new(
            CoreConfig {
                server: "canal:11111".into(),
                destination: "example".into(),
                client_id: "1001".into(),
                filter: mask_filter(all),
                fetch_size: FETCH_ROWS as i32,
                mem_unit: ROW_BYTES as u32,
                fetch_wait: FETCH_WAIT,
                ack_wait: ACK_WAIT,
                max_inflight_batches: MAX_BATCHES,
                max_inflight_bytes: MAX_BYTES,
                reconnect_min: Duration::from_millis(100),
                reconnect_max: Duration::from_secs(5),
                fail_fast: false,
                jitter_seed: seed + incarnation as u64,
            },
            zookeeper,
        )
        .with_confirmed(file.confirmed.clone(), file.cuts.clone());
        Replica {
            id,
            incarnation,
            core,
            file,
            session_alive: false,
            pending: Vec::new(),
            decoding: VecDeque::new(),
            timers: Vec::new(),
            last_get_short: false,
            ack_wait_fired: false,
            draining: false,
            drain_ended: None,
            stopped: false,
            stalled_rows: None,
            toggled_since: Some(0),
            toggled_enable_pending: false,
            // both poison policies are exercised: consumer 1 and the real ones (their spec says)
            // stall, the others park; only the toggled consumer is ever quarantined (its third
            // restart within the hour)
            router: Router::with_policies((0..CONSUMERS).map(|c| {
                (
                    true,
                    if c >= BULK {
                        real_specs()[c - BULK].poison
                    } else {
                        PoisonPolicy {
                            on_poison: if c == 1 {
                                OnPoison::Stall
                            } else {
                                OnPoison::Park
                            },
                            attempts: 2,
                        }
                    },
                    SupervisionConfig {
                        restart_min: Duration::from_millis(10),
                        restart_max: Duration::from_millis(100),
                        max_restarts: if c == TOGGLED { 2 } else { u32::MAX },
                        quarantine_window: Duration::from_secs(3600),
                    },
                )
            })),
            publisher: ConfirmWindow::new(MAX_UNCONFIRMED, CONFIRM_TIMEOUT),
            consumers,
            jobs: HashMap::new(),
            retries: Vec::new(),
            unconfirmed: BTreeMap::new(),
            returned: BTreeSet::new(),
            channel_stale: false,
            channel_in_doubt: false,
            confirmed_row: None,
            last_write: vec![None; CONSUMERS],
            failed_epoch: None,
            ha: zookeeper.then(|| Ha {
                core: HaCore::new(ZK_SESSION),
                session: 0,
                connected: false,
                watching: false,
                inbox: VecDeque::new(),
            }),
            frozen_until: now,
        }
    }

    fn frozen(&self, now: Instant) -> bool {
        now < self.frozen_until
    }
}

/// An operation on the session, written; its answer is read by a later step.
enum Pending {
    Connect {
        generation: u64,
        filter: String,
    },
    Op {
        generation: u64,
        result: Result<Done<SimRaw>, Failure>,
        /// The GET in it: its epoch, how many rows it asked for and got (for (f) and (g)).
        get: Option<(u64, usize, usize)>,
    },
}

fn lost() -> Failure {
    Failure {
        kind: FailureKind::Transient,
        message: "canal connection lost".into(),
    }
}

fn mask_filter(mask: u8) -> String {
    mask.to_string()
}

struct Sim {
    rng: Rng,
    faults: bool,
    now: Instant,
    server: Server,
    skipped_rows: BTreeSet<usize>,
    /// Ids of messages the broker accepted (acked without a return).
    accepted: BTreeSet<String>,
    /// (consumer, row) carried by a message the broker accepted (bulk rows: (a), (b)).
    accepted_rows: BTreeSet<(usize, usize)>,
    /// Rows of [`BULK`] that had an accepted bulk when their batch was acked ((i) for bulks).
    acked_bulk_rows: BTreeSet<usize>,
    /// Per row of [`BULK`]: the replica, its incarnation and epoch, the id of the first bulk
    /// that carried it to the channel, and the replica's re-cut flushes then.
    bulk_first: HashMap<usize, (Writer, String, (u64, usize))>,
    /// Rows of [`BULK`] written again in a later epoch, and those of them written under a
    /// different bulk id than the first time: after a handover (by the other replica, whose
    /// delivery ends are not shared, or after it wrote to Canal), or after the replica delivered
    /// held rows as they were (a re-cut flush) or a batch was skipped.
    bulk_redelivered: BTreeSet<usize>,
    bulk_other_id: BTreeSet<usize>,
    bulk_other_id_flushed: BTreeSet<usize>,
    /// Ids of messages the broker had accepted when their row was acked to Canal, and the
    /// newest row Canal shipped in an acked batch (i).
    acked_msgs: BTreeSet<String>,
    /// Rollbacks written by a replica whose session did not hold the node (measured).
    stale_rollbacks: usize,
    /// ZooKeeper seeds: who wrote to Canal last (replica, incarnation), how many times the
    /// writer changed, how many writes froze between the gate and the write.
    last_writer: Option<(usize, usize)>,
    handovers: usize,
    /// Writes to Canal by a replica other than the one before, and restarts of the model Canal
    /// at a row where no ack ended (for (n)).
    replica_switches: usize,
    rewinds_between_acks: usize,
    gate_freezes: usize,
    steps: u64,
    trace: Vec<String>,
    /// The replica that takes the next step.
    rep: Replica,
    seed: u64,
    /// ZooKeeper seeds: the other replica (standby, frozen, or killed and started again).
    other: Option<Replica>,
    /// ZooKeeper seeds: the model ZooKeeper.
    zk: Option<ZkModel>,
    mutation: Mutation,
}

/// Who wrote: the replica, its incarnation and the epoch.
type Writer = (usize, usize, u64);

/// A replica's rewind guard file (`canal.rewind_guard`), and the re-cut flushes of its earlier
/// incarnations (not in the real file: for (n)).
#[derive(Debug, Clone, Default)]
struct StateFile {
    confirmed: Option<(Position, i64)>,
    cuts: Vec<(Position, i64)>,
    flushes: u64,
}

/// What one replica (one process of the service) holds: its cores, its consumers, its AMQP
/// channel, and what the model knows about its sessions.
struct Replica {
    /// 0 or 1, and how many times this replica was started (killed and started again).
    id: usize,
    incarnation: usize,
    core: Core,
    /// Its rewind guard's file: the confirmed position (written with each ack) and the
    /// delivery ends (written before each delivery is handed on), as the shell does; a replica
    /// started again reads it. It
    /// also keeps the held rows delivered as they were (re-cut flushes) of earlier
    /// incarnations.
    file: StateFile,
    /// The TCP connection to the model server is alive.
    session_alive: bool,
    /// Operations written and not answered yet: the one on the current session, and ones
    /// still running on sessions the core retired (their answers carry an old generation).
    pending: Vec<Pending>,
    /// Batches being decoded, oldest first.
    decoding: VecDeque<(u64, SimRaw)>,
    timers: Vec<(Timer, Instant)>,
    /// The last answered GET of this epoch found nothing more (the model of (f)).
    last_get_short: bool,
    /// The ack-wait timer of this idle period fired (the model of (g)).
    ack_wait_fired: bool,
    draining: bool,
    /// The epoch in which the drain ended (invariant (h)).
    drain_ended: Option<u64>,
    stopped: bool,
    /// The rows of the batch the connection is stalled on, and rows the operator skipped.
    stalled_rows: Option<(usize, usize)>,
    /// (j): the toggled consumer's enable is in force since this many rows were committed.
    toggled_since: Option<usize>,
    toggled_enable_pending: bool,
    router: Router<SimPart>,
    publisher: ConfirmWindow<Msg>,
    consumers: Vec<Consumer>,
    jobs: HashMap<JobNo, (usize, BatchRef, u64)>,
    retries: Vec<usize>,
    /// Published and not yet confirmed, by publish sequence number.
    unconfirmed: BTreeMap<u64, Msg>,
    /// Publishes the broker returned (their ack follows).
    returned: BTreeSet<u64>,
    /// The channel's state at the broker went stale (RabbitMQ 3.x after a quorum queue's
    /// leader changed): every publish on it is nacked until the shell opens a new channel.
    channel_stale: bool,
    /// A nack happened on the current channel (invariant (m)).
    channel_in_doubt: bool,
    confirmed_row: Option<usize>,
    /// Per consumer: (epoch, row) of the last channel write.
    last_write: Vec<Option<(u64, usize)>>,
    /// Highest epoch with a settled (non-cancel) failure.
    failed_epoch: Option<u64>,
    /// ZooKeeper seeds: its ZooKeeper client and the real HA core it feeds.
    ha: Option<Ha>,
    /// The process is frozen (SIGSTOP, a GC pause) until then: it takes no step.
    frozen_until: Instant,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let rows = (0..20 + rng.below(40))
            .map(|_| rng.below(TABLES) as u8)
            .collect::<Vec<u8>>();
        let all: u8 = TABLE_MASKS.iter().fold(0, |m, t| m | t);
        let zookeeper = seed % 4 == 3;
        let now = Instant::now();
        let mut server = Server {
            parsed: vec![false; rows.len()],
            rows,
            committed: 0,
            filter: all,
            acked_upto: 0,
            saved_upto: 0,
            ack_ends: BTreeSet::from([0]),
            delivered_upto: 0,
            outstanding: VecDeque::new(),
            next_id: 1,
            up: true,
            high_acked: 0,
        };
        let initial = rng.below(server.rows.len() + 1);
        server.commit(initial);
        let mut sim = Sim {
            rng,
            faults: true,
            now,
            server,
            skipped_rows: BTreeSet::new(),
            accepted: BTreeSet::new(),
            accepted_rows: BTreeSet::new(),
            acked_bulk_rows: BTreeSet::new(),
            bulk_first: HashMap::new(),
            bulk_redelivered: BTreeSet::new(),
            bulk_other_id: BTreeSet::new(),
            bulk_other_id_flushed: BTreeSet::new(),
            acked_msgs: BTreeSet::new(),
            stale_rollbacks: 0,
            last_writer: None,
            handovers: 0,
            replica_switches: 0,
            rewinds_between_acks: 0,
            gate_freezes: 0,
            steps: 0,
            trace: Vec::new(),
            rep: Replica::new(0, 0, seed, zookeeper, now, StateFile::default()),
            seed,
            other: zookeeper.then(|| Replica::new(1, 0, seed ^ 1, true, now, StateFile::default())),
            zk: zookeeper.then(ZkModel::default),
            mutation: Mutation::from_env(),
        };
        sim.start_replica();
        if sim.other.is_some() {
            sim.switch();
            sim.start_replica();
            sim.switch();
        }
        sim
    }

    /// A replica (process) starts: its ZooKeeper client opens a session, its connection starts.
    fn start_replica(&mut self) {
        if self.rep.ha.is_some() {
            self.zk_new_session();
            let lease = self.rep.ha.as_ref().unwrap().core.lease();
            self.feed(Input::Lease(lease));
        }
        self.feed(Input::Start);
    }

    /// The other replica takes the next steps.
    fn switch(&mut self) {
        if let Some(other) = &mut self.other {
            std::mem::swap(&mut self.rep, other);
        }
    }

    fn log(&mut self, s: String) {
        if self.trace.len() > 400 {
            self.trace.remove(0);
        }
        if self.other.is_some() {
            self.trace
                .push(format!("{:>5} r{} {s}", self.steps, self.rep.id));
        } else {
            self.trace.push(format!("{:>5} {s}", self.steps));
        }
    }

    /// Feed the connection core and carry out what it decides, like its actor does.
    fn feed(&mut self, input: Input<SimRaw, SimEvents>) {
        self.rep.core.on(self.now, input);
        self.run_actions();
    }

    fn run_actions(&mut self) {
        loop {
            let actions = self.rep.core.take_actions();
            if actions.is_empty() {
                return;
            }
            for a in actions {
                self.action(a);
            }
        }
    }

    fn action(&mut self, a: Action<SimRaw, SimEvents>) {
        match a {
            Action::Connect {
                generation, filter, ..
            } => {
                self.log(format!("connect (generation {generation})"));
                self.assert_idle(generation);
                self.rep
                    .pending
                    .push(Pending::Connect { generation, filter });
            }
            Action::Run { generation, op } => {
                if let Op::Ack { .. } = op {
                    // the shell appends the new confirmed position to the file's log
                    self.rep.file.confirmed = self.rep.core.confirmed().cloned();
                }
                self.write(generation, op)
            }
            Action::DropSession => {
                self.log("session dropped".into());
                self.rep.session_alive = false;
            }
            Action::Decode { epoch, raw } => self.rep.decoding.push_back((epoch, raw)),
            Action::Deliver { batch, events, .. } => {
                let core = &self.rep.core;
                self.rep.file.confirmed = core.confirmed().cloned();
                self.rep.file.cuts = core.cuts().ends().cloned().collect();
                self.deliver(batch, events)
            }
            Action::Reset { epoch, reason } => {
                self.log(format!("epoch {epoch}: {reason}"));
                self.rep.last_get_short = false;
                self.rep.ack_wait_fired = false;
                self.rep.router.reset(epoch);
                self.run_commands();
            }
            Action::Timer { timer, after } => {
                self.rep.timers.retain(|(t, _)| *t != timer);
                self.rep.timers.push((timer, self.now + after));
            }
            Action::CancelTimer(timer) => self.rep.timers.retain(|(t, _)| *t != timer),
            Action::FilterApplied => {
                if self.rep.toggled_enable_pending && self.rep.router.is_enabled(TOGGLED) {
                    self.rep.toggled_enable_pending = false;
                    self.rep.toggled_since = Some(self.server.committed);
                    self.log(format!(
                        "c{TOGGLED} enabled: its rows from {} on must reach it",
                        self.server.committed
                    ));
                }
            }
            Action::Drained => {
                let epoch = self.rep.core.window().epoch();
                self.log(format!("drain ended in epoch {epoch}"));
                self.rep.drain_ended = Some(epoch);
            }
            Action::Finished(_) => self.rep.stopped = true,
            Action::Fatal(e) => panic!("the connection gave up: {e}"),
        }
    }

    /// The shell's gate: the newest lease, right before a write. ZooKeeper seeds: the process
    /// may freeze between the check and the write; (k) the write lands while this replica's
    /// session still holds the client running node.
    fn gate(&mut self) -> Result<(), Failure> {
        let Some(ha) = &self.rep.ha else {
            return Ok(());
        };
        let lease = ha.core.lease();
        let session = ha.session;
        let may = match self.mutation {
            Mutation::NoGate => true,
            Mutation::LeaseWithoutMargin => {
                lease.may_write(self.now.checked_sub(ZK_SESSION / 3).unwrap_or(self.now))
            }
            _ => lease.may_write(self.now),
        };
        if !may {
            return Err(Failure {
                kind: FailureKind::NotActive,
                message: "not the active replica".into(),
            });
        }
        if self.faults && self.rng.chance(50) {
            let max = gate_freeze_max().as_millis() as usize;
            // often close to the longest: the freeze that matters is the long one
            let ms = if self.rng.chance(500) {
                max - self.rng.below(max / 10 + 1)
            } else {
                self.rng.below(max + 1)
            };
            let d = Duration::from_millis(ms as u64);
            self.log(format!(
                "replica {} freezes for {d:?} between the lease check and the write",
                self.rep.id
            ));
            self.now += d;
            self.gate_freezes += 1;
            self.zk_tick();
        }
        assert!(
            self.zk.as_ref().unwrap().holds(session, self.now),
            "(k) replica {} wrote to canal while its session did not hold the client running node",
            self.rep.id
        );
        let writer = (self.rep.id, self.rep.incarnation);
        if self.last_writer.is_some_and(|w| w != writer) {
            self.handovers += 1;
        }
        if self.last_writer.is_some_and(|w| w.0 != writer.0) {
            self.replica_switches += 1;
        }
        self.last_writer = Some(writer);
        Ok(())
    }

    /// The gate before a rollback. The shell checks the lease before rollbacks as before acks
    /// and GETs; `SIM_MUTATION=ungated_rollback` is the shell before that check: a replica
    /// whose lease ended rolls back, on the client identity the replicas share, the batches the
    /// active replica has outstanding (counted; (c) fails when the active one then gets rows
    /// again within its epoch).
    fn gate_rollback(&mut self) -> Result<(), Failure> {
        if self.mutation != Mutation::UngatedRollback {
            return self.gate();
        }
        if let Some(ha) = &self.rep.ha
            && !self.zk.as_ref().unwrap().holds(ha.session, self.now)
        {
            self.stale_rollbacks += 1;
            self.log(format!(
                "replica {} rolls back on canal after its lease ended",
                self.rep.id
            ));
        }
        Ok(())
    }

    /// Write a GET for `size` rows (the model server answers it now).
    fn write_get(&mut self, epoch: u64, size: i32, wait: Duration) -> Result<SimRaw, Failure> {
        self.gate()?;
        let long_poll = size == 1 && !wait.is_zero();
        assert_eq!(
            long_poll, self.rep.last_get_short,
            "(f) a GET waits exactly when the last one of this epoch found nothing more"
        );
        if long_poll {
            assert!(
                self.rep.core.window().current_is_empty() || self.rep.ack_wait_fired,
                "(g) a long poll with {} batches in flight before the ack wait ended",
                self.rep.core.window().inflight_batches()
            );
        }
        let overshoot = self.rng.chance(300);
        let raw = self.server.get(size as usize, overshoot);
        self.log(format!(
            "get {} rows (epoch {epoch}, long poll {long_poll}): batch {} rows {}..{}",
            size, raw.id, raw.start, raw.end
        ));
        Ok(raw)
    }

    /// An operation is written: the model server acts on it now; its answer comes later.
    fn write(&mut self, generation: u64, op: Op) {
        self.assert_idle(generation);
        let mut get = None;
        let result = if !self.rep.session_alive {
            Err(lost())
        } else {
            match op {
                Op::Get { epoch, size, wait } => self.write_get(epoch, size, wait).map(|raw| {
                    get = Some((epoch, size as usize, raw.end - raw.start));
                    Done::Fetched { epoch, raw }
                }),
                Op::GetSkipping { epoch, wait } => self.write_get(epoch, 1, wait).map(|raw| {
                    get = Some((epoch, 1, raw.end - raw.start));
                    Done::Fetched { epoch, raw }
                }),
                Op::Ack { ids, then_get } => self.write_acks(ids, then_get, &mut get),
                Op::Subscribe(filter) => self.gate().map(|()| {
                    self.server.filter = filter.parse().unwrap();
                    self.log(format!("subscribe {filter}"));
                    Done::Subscribed(filter)
                }),
                Op::Rollback => self.gate_rollback().map(|()| {
                    self.log("rollback".into());
                    self.server.rollback();
                    Done::RolledBack
                }),
                Op::Close { rollback } => {
                    if rollback && self.gate_rollback().is_ok() {
                        self.server.rollback();
                    }
                    self.rep.session_alive = false;
                    Ok(Done::Closed)
                }
            }
        };
        self.rep.pending.push(Pending::Op {
            generation,
            result,
            get,
        });
    }

    /// One operation at a time on a session.
    fn assert_idle(&self, generation: u64) {
        assert!(
            !self.rep.pending.iter().any(|p| match p {
                Pending::Connect { generation: g, .. } | Pending::Op { generation: g, .. } =>
                    *g == generation,
            }),
            "two operations on the session of generation {generation} at once"
        );
    }

    fn write_acks(
        &mut self,
        ids: Vec<i64>,
        then_get: Option<(u64, i32, Duration)>,
        get: &mut Option<(u64, usize, usize)>,
    ) -> Result<Done<SimRaw>, Failure> {
        for &id in &ids {
            self.gate()?;
            if self.faults && self.rng.chance(20) {
                // the connection died as the ack was written: Canal never got it
                self.log(format!("ack {id} lost on the wire"));
                self.rep.session_alive = false;
                return Err(lost());
            }
            if self.other.is_some() && self.server.outstanding.front().is_none_or(|b| b.0 != id) {
                // another session of the same client rolled it back: Canal refuses the ack
                self.log(format!("canal refuses ack {id}: no such batch outstanding"));
                return Err(Failure {
                    kind: FailureKind::Vanished {
                        evidence: format!("canal refused ack {id}"),
                    },
                    message: format!("canal refused ack {id}"),
                });
            }
            let (start, end, last_shipped) = self.server.ack(id);
            if let Some(l) = last_shipped {
                self.rep.confirmed_row = self.rep.confirmed_row.max(Some(l));
            }
            self.log(format!("canal ack {id} rows {start}..{end}"));
            self.check_acked(end);
            for r in start..end {
                for c in 0..CONSUMERS {
                    let id = row_id(r, c);
                    if self.accepted.contains(&id) {
                        self.acked_msgs.insert(id);
                    }
                }
                if self.accepted_rows.contains(&(BULK, r)) {
                    self.acked_bulk_rows.insert(r);
                }
            }
        }
        let fetched = match then_get {
            Some((epoch, size, wait)) => {
                let raw = self.write_get(epoch, size, wait)?;
                *get = Some((epoch, size as usize, raw.end - raw.start));
                Some((epoch, raw))
            }
            None => None,
        };
        Ok(Done::Acked { ids, fetched })
    }

    /// Read the answer of the operation on the session.
    fn answer(&mut self) {
        if self.rep.pending.is_empty() {
            return;
        }
        let i = self.rng.below(self.rep.pending.len());
        let pending = self.rep.pending.remove(i);
        match pending {
            Pending::Connect { generation, filter } => {
                if generation != self.rep.core.generation() {
                    // a connect of a retired session: the shell drops what it opened
                    return self.feed(Input::Failed {
                        generation,
                        failure: lost(),
                    });
                }
                if self.server.up && (!self.faults || !self.rng.chance(100)) {
                    // the shell checks the lease before it subscribes and rolls back
                    if let Err(failure) = self.gate() {
                        self.log("connected, but not active".into());
                        return self.feed(Input::Failed {
                            generation,
                            failure,
                        });
                    }
                    self.server.filter = filter.parse().unwrap();
                    self.server.rollback();
                    self.rep.session_alive = true;
                    self.log(format!("connected with filter {filter}"));
                    self.feed(Input::Connected { generation, filter });
                } else {
                    self.log("connect failed".into());
                    self.feed(Input::Failed {
                        generation,
                        failure: lost(),
                    });
                }
            }
            Pending::Op {
                generation,
                result,
                get,
            } => {
                if let (Ok(_), Some((epoch, asked, got))) = (&result, get)
                    && epoch == self.rep.core.window().epoch()
                    && generation == self.rep.core.generation()
                {
                    // what the window learns from this answer (the model of (f) and (g))
                    if got == 0 {
                        if !self.rep.last_get_short {
                            self.rep.ack_wait_fired = false; // a new idle period
                        }
                        self.rep.last_get_short = true;
                    } else {
                        self.rep.ack_wait_fired = false;
                        self.rep.last_get_short = got < asked;
                    }
                }
                match result {
                    Ok(done) => self.feed(Input::Done { generation, done }),
                    Err(failure) => {
                        self.log(format!("operation failed: {}", failure.message));
                        self.rep.session_alive = false;
                        self.feed(Input::Failed {
                            generation,
                            failure,
                        })
                    }
                }
            }
        }
    }

    /// The connection drops: the operation on the wire gets no answer but an error.
    fn connection_lost(&mut self) {
        self.rep.session_alive = false;
        for p in &mut self.rep.pending {
            if let Pending::Op { result, .. } = p {
                *result = Err(lost());
            }
        }
    }

    /// A decoding job ends.
    fn decoded(&mut self) {
        let Some((epoch, raw)) = self.rep.decoding.pop_front() else {
            return;
        };
        let roll = self.rng.below(1000);
        let outcome = if self.faults && roll < 6 && self.rep.stalled_rows.is_none() {
            self.log(format!("batch {} undecodable", raw.id));
            if epoch == self.rep.core.window().epoch() {
                self.rep.stalled_rows = Some((raw.start, raw.end));
                // a held batch is a batch that came: the next GET drains
                self.rep.last_get_short = false;
            }
            Decoded::Undecodable("model: undecodable entry".into())
        } else if self.faults && roll < 10 {
            self.log(format!("decoding batch {} panicked", raw.id));
            Decoded::Panicked("model panic".into())
        } else {
            Decoded::Events(SimEvents(
                raw.shipped
                    .iter()
                    .map(|&r| (r, position(r), BASE_MS + r as i64))
                    .collect(),
            ))
        };
        self.feed(Input::Decoded {
            epoch,
            raw,
            outcome,
        });
    }

    /// The operator skips what the stream is stalled at.
    fn operator_skip(&mut self) {
        if self.rep.core.state() != ConnectionState::Stalled {
            return;
        }
        let Some(stall) = self.rep.core.snapshot().stall else {
            return;
        };
        let r = self.rep.core.skip(self.now, &stall.token);
        self.log(format!("operator skip {}: {r:?}", stall.token));
        if r.is_ok()
            && stall.token.starts_with("batch:")
            && let Some((start, end)) = self.rep.stalled_rows.take()
        {
            self.skipped_rows.extend(start..end);
        }
        self.run_actions();
    }

    fn deliver(&mut self, batch: BatchRef, events: SimEvents) {
        assert_ne!(
            self.rep.drain_ended,
            Some(batch.epoch),
            "(h) batch {batch} delivered after the drain had ended"
        );
        let rows: Vec<usize> = events.0.iter().map(|e| e.0).collect();
        self.log(format!("deliver {batch} rows {rows:?}"));
        let parts = (0..CONSUMERS)
            .filter_map(|c| {
                let mine: Vec<usize> = rows
                    .iter()
                    .copied()
                    .filter(|&r| self.rep.consumers[c].tables & (1 << self.server.rows[r]) != 0)
                    .collect();
                (!mine.is_empty()).then_some((c, SimPart { rows: mine }))
            })
            .collect();
        self.rep.router.route(batch, parts);
        self.run_commands();
    }

    /// Carry out the router's commands, like the Manager actor does.
    fn run_commands(&mut self) {
        loop {
            let cmds = self.rep.router.take_commands();
            if cmds.is_empty() {
                return;
            }
            for cmd in cmds {
                match cmd {
                    // one part per batch and consumer here (`Router::route`): part number 0
                    Command::Process {
                        slot,
                        batch,
                        seq: 0,
                        part,
                        mode,
                    } => {
                        assert!(
                            self.rep.consumers[slot].inbox.is_none(),
                            "two parts in consumer {slot} at once"
                        );
                        self.rep.consumers[slot].inbox = Some((batch, part, mode));
                    }
                    Command::Process { seq, .. } => panic!("part {seq} of a batch routed whole"),
                    Command::RetryAfter { slot, .. } => self.rep.retries.push(slot),
                    Command::Ack(b) => self.feed(Input::Ack(b)),
                    Command::Rollback { batch, reason } => {
                        self.log(format!("rollback {batch}: {reason}"));
                        self.feed(Input::Rollback { batch, reason });
                    }
                    Command::Release(b) => self.feed(Input::Release(b)),
                    Command::CancelBefore(e) => self.rep.publisher.cancel_before(e),
                }
            }
            self.flush_publisher();
        }
    }

    /// Deliver the publisher's answers to the router.
    fn flush_publisher(&mut self) {
        self.rep.publisher.take_failures();
        for (job, res) in self.rep.publisher.take_replies() {
            let (slot, batch, epoch) = self.rep.jobs.remove(&job).expect("known job");
            // a transient failure settles its whole epoch; an unroutable message does not
            if let Err(e) = &res
                && e.is_transient()
                && !matches!(e, PublishError::Cancelled { .. })
            {
                self.rep.failed_epoch = Some(self.rep.failed_epoch.map_or(epoch, |f| f.max(epoch)));
            }
            // the Manager's own mapping
            self.rep
                .router
                .confirmed(slot, batch, 0, res.map_err(PartError::from));
        }
    }

    /// (a): everything up to `end` reached the broker for every stable consumer; (j): and for
    /// the toggled one, from where its enable was in force.
    fn check_acked(&self, end: usize) {
        for (c, consumer) in self.rep.consumers.iter().enumerate() {
            let from = if consumer.stable {
                0
            } else {
                match self.rep.toggled_since {
                    Some(from) => from,
                    None => continue,
                }
            };
            for r in from..end {
                if consumer.tables & (1 << self.server.rows[r]) != 0
                    && !self.skipped_rows.contains(&r)
                {
                    assert!(
                        if c == BULK {
                            self.accepted_rows.contains(&(c, r))
                        } else {
                            self.accepted.contains(&row_id(r, c))
                                || self.accepted.contains(&parked_id(r, c))
                        },
                        "({}) batch acked up to row {end} but row {r} of consumer {c} was never accepted by the broker",
                        if consumer.stable { "a" } else { "j" }
                    );
                }
            }
        }
    }
    /// Run a part through a real consumer as its actor does (each event with its error
    /// policy, then the end of the part); check what it emits against what the spec says.
    fn run_real(&mut self, c: usize, batch: BatchRef, rows: &[usize]) -> Vec<Msg> {
        let (consumer, cctx) = self.rep.consumers[c].real.as_mut().unwrap();
        for &row in rows {
            process_event(consumer, cctx, &event(row)).expect("error_handler fails no event");
        }
        finish_part(consumer, cctx).expect("end of part");
        cctx.take_errors();
        cctx.take_last_error();
        let triggers = cctx.take_triggers();
        let msg = |rows: Vec<usize>, id: String| Msg {
            id,
            consumer: c,
            row: rows[0],
            rows,
            epoch: batch.epoch,
        };
        if c == BULK {
            // the part's rows in order, BULK_ROWS per message: a bulk never spans a batch
            let expected: Vec<Vec<usize>> = rows.chunks(BULK_ROWS).map(<[usize]>::to_vec).collect();
            let got: Vec<Vec<usize>> = triggers
                .iter()
                .map(|t| {
                    let payloads = t.payload.as_array().expect("a bulk payload is a list");
                    payloads
                        .iter()
                        .map(|p| p["id"].as_u64().expect("row id") as usize)
                        .collect()
                })
                .collect();
            assert_eq!(got, expected, "bulks of {batch}");
            triggers
                .into_iter()
                .zip(got)
                .map(|(t, rows)| msg(rows, t.id))
                .collect()
        } else {
            // one message per row: the rule's, or an error_handler message where it fails
            let got: Vec<(usize, &str)> = triggers
                .iter()
                .map(|t| {
                    let row = ((t.source.position.offset - 4) / 100) as usize;
                    (row, t.plugin.as_str())
                })
                .collect();
            let expected: Vec<(usize, &str)> = rows
                .iter()
                .map(|&r| (r, if rule_fails(r) { "error_handler" } else { "p" }))
                .collect();
            assert_eq!(got, expected, "messages of {batch}");
            triggers
                .into_iter()
                .zip(rows)
                .map(|(t, &r)| msg(vec![r], t.id))
                .collect()
        }
    }

    fn consumer_step(&mut self, c: usize) {
        let Some((batch, part, mode)) = self.rep.consumers[c].inbox.take() else {
            return;
        };
        let msg = |row: usize, id: String| Msg {
            id,
            consumer: c,
            row,
            rows: vec![row],
            epoch: batch.epoch,
        };
        let fails = |rng: &mut Rng, faults: bool| faults && rng.chance(150);
        let outcome = match &mode {
            Mode::Normal if self.rep.consumers[c].poisoned => Processed::Failed {
                error: "poison".into(),
            },
            Mode::Normal if fails(&mut self.rng, self.faults) => Processed::Failed {
                error: "boom".into(),
            },
            Mode::Normal if self.rep.consumers[c].real.is_some() => {
                let msgs = self.run_real(c, batch, &part.rows);
                let job = self.rep.publisher.submit(batch.epoch, msgs);
                self.rep.jobs.insert(job, (c, batch, batch.epoch));
                Processed::Published
            }
            mode if self.rep.consumers[c].real.is_some() => {
                panic!("consumer {c} stalls on poison: it never runs a part in mode {mode:?}")
            }
            mode => {
                let mut msgs = Vec::new();
                for &row in &part.rows {
                    let parks = match mode {
                        Mode::Normal => false,
                        // each event may fail again; a failing one is parked
                        Mode::ParkFailures { .. } => fails(&mut self.rng, self.faults),
                        Mode::ParkAll { .. } => true,
                        Mode::ParkIds { ids, .. } => {
                            if ids.contains(&row_id(row, c)) {
                                msgs.push(msg(row, parked_id(row, c)));
                            }
                            continue;
                        }
                    };
                    let id = if parks {
                        parked_id(row, c)
                    } else {
                        row_id(row, c)
                    };
                    msgs.push(msg(row, id));
                }
                let job = self.rep.publisher.submit(batch.epoch, msgs);
                self.rep.jobs.insert(job, (c, batch, batch.epoch));
                Processed::Published
            }
        };
        self.log(format!("consumer {c} {batch} {mode:?}: {outcome:?}"));
        self.rep.router.processed(c, batch, 0, outcome, self.now);
        if self.rep.router.state(c) == ConsumerState::Quarantined {
            self.rep.consumers[c].poisoned = false;
        }
        self.flush_publisher();
        self.run_commands();
    }

    fn publish(&mut self) {
        if self.rep.publisher.wants_new_channel() {
            // the old channel closes: publishes on it that timed out may or may not have been taken
            self.lose_unconfirmed();
            self.log("new publishing channel".into());
            self.rep.channel_stale = false;
            self.rep.channel_in_doubt = false;
            self.rep.publisher.channel_renewed();
        }
        while let Some((seq, msg)) = self.rep.publisher.poll_publish(self.now) {
            // (m) nothing more is written on a channel that nacked
            assert!(
                !self.rep.channel_in_doubt,
                "(m) row {} written on a channel that nacked",
                msg.row
            );
            // (c) order of channel writes
            if let Some(f) = self.rep.failed_epoch {
                assert!(
                    msg.epoch > f,
                    "(c) wrote row {} of epoch {} after a failure of epoch {f} settled",
                    msg.row,
                    msg.epoch
                );
            }
            // dead letters are out of band: parked rows leave the order by definition
            let parked = msg.id == parked_id(msg.row, msg.consumer);
            if let Some((e, r)) = self.rep.last_write[msg.consumer].filter(|_| !parked) {
                assert!(
                    msg.epoch >= e,
                    "(c) consumer {}: epoch {} written after epoch {e}",
                    msg.consumer,
                    msg.epoch
                );
                if msg.epoch == e {
                    assert!(
                        msg.row > r,
                        "(c) consumer {}: row {} written after row {r} in epoch {e}",
                        msg.consumer,
                        msg.row
                    );
                }
            }
            // (i) a message accepted before its row was acked to Canal is not published again,
            // whatever Canal sends again (a batch the operator skipped was acked with no
            // position: not guarded)
            if msg.consumer == BULK {
                for &r in &msg.rows {
                    assert!(
                        self.skipped_rows.contains(&r)
                            || self.rep.confirmed_row.is_none_or(|c| r > c)
                            || !self.acked_bulk_rows.contains(&r),
                        "(i) row {r} of the bulk consumer published again after its batch was acked"
                    );
                }
                self.measure_bulk(&msg);
            } else if !parked
                && !self.skipped_rows.contains(&msg.row)
                && self.rep.confirmed_row.is_some_and(|c| msg.row <= c)
            {
                assert!(
                    !self.acked_msgs.contains(&msg.id),
                    "(i) row {} of consumer {} published again after its batch was acked (canal acked up to row {})",
                    msg.row,
                    msg.consumer,
                    self.server.high_acked
                );
            }
            // (d) every copy carries the id of the original
            let expected = if msg.consumer == BULK {
                bulk_id(&msg.rows)
            } else {
                row_id(msg.row, msg.consumer)
            };
            assert!(
                msg.id == expected || msg.id == parked_id(msg.row, msg.consumer),
                "(d) row {} of consumer {} carries id {}",
                msg.row,
                msg.consumer,
                msg.id
            );
            if !parked {
                self.rep.last_write[msg.consumer] = Some((msg.epoch, msg.row));
            }
            self.log(format!(
                "publish #{seq} c{} row {} epoch {}",
                msg.consumer, msg.row, msg.epoch
            ));
            self.rep.unconfirmed.insert(seq, msg);
        }
    }

    /// A bulk written to the channel: is any of its rows written again, in a later epoch (after
    /// a rollback, a reconnect, a Canal restart or a restart of the replica), under another id
    /// than the first time? (n): not by the same replica, unless it delivered held rows as they
    /// were since (a re-cut flush); another replica does not know where the first one cut.
    fn measure_bulk(&mut self, msg: &Msg) {
        let when = (self.rep.id, self.rep.incarnation, msg.epoch);
        // what may have moved Canal's cursor to where this replica did not cut: its own
        // flushes and skips, and a model Canal restarting between two of its acks
        let flushes = (
            self.rep.file.flushes + self.rep.core.recut_flushes(),
            self.rewinds_between_acks,
        );
        for &r in &msg.rows {
            match self.bulk_first.get(&r) {
                None => {
                    self.bulk_first.insert(r, (when, msg.id.clone(), flushes));
                }
                Some((first, id, first_flushes)) if *first != when => {
                    self.bulk_redelivered.insert(r);
                    if *id != msg.id {
                        // a skipped batch's rows have no position: a Canal rewind sends them
                        // again, and they join the delivery after them
                        if first.0 == self.rep.id
                            && *first_flushes == flushes
                            && self.replica_switches == 0
                            && self.skipped_rows.is_empty()
                        {
                            panic!(
                                "(n) row {r} of the bulk consumer written again by replica {} under bulk id {} instead of {id} (first written in {first:?}, now {when:?})",
                                self.rep.id, msg.id
                            );
                        }
                        if self.replica_switches == 0 {
                            self.bulk_other_id_flushed.insert(r);
                        } else {
                            self.bulk_other_id.insert(r);
                        }
                    }
                }
                Some(_) => {}
            }
        }
    }

    fn broker_ack(&mut self, seq: u64, multiple: bool) {
        let seqs: Vec<u64> = if multiple {
            self.rep
                .unconfirmed
                .range(..=seq)
                .map(|(s, _)| *s)
                .collect()
        } else {
            vec![seq]
        };
        for s in seqs {
            if let Some(m) = self.rep.unconfirmed.remove(&s)
                && !self.rep.returned.remove(&s)
            {
                self.accept(m);
            }
        }
        self.rep.publisher.on_confirm(seq, true, multiple);
        self.settle();
    }

    /// The channel closes: the broker may or may not have taken what was unconfirmed on it.
    fn lose_unconfirmed(&mut self) {
        let lost: Vec<(u64, Msg)> = std::mem::take(&mut self.rep.unconfirmed)
            .into_iter()
            .collect();
        for (s, m) in lost {
            if !self.rep.returned.remove(&s) && self.rng.chance(500) {
                self.accept(m);
            }
        }
    }

    fn accept(&mut self, m: Msg) {
        for &r in &m.rows {
            self.accepted_rows.insert((m.consumer, r));
        }
        self.accepted.insert(m.id);
    }

    fn nack(&mut self, seq: u64) {
        self.rep.unconfirmed.remove(&seq);
        self.rep.channel_in_doubt = true;
        self.rep.publisher.on_confirm(seq, false, false);
        self.settle();
    }

    fn settle(&mut self) {
        self.rep.publisher.settle(self.now);
        self.flush_publisher();
        self.run_commands();
    }

    fn broker_step(&mut self) {
        let Some((&first, _)) = self.rep.unconfirmed.iter().next() else {
            return;
        };
        let seqs: Vec<u64> = self.rep.unconfirmed.keys().copied().collect();
        let any = seqs[self.rng.below(seqs.len())];
        let roll = self.rng.below(1000);
        if self.rep.channel_stale {
            self.log(format!("broker nack #{first} (stale channel)"));
            self.nack(first);
        } else if !self.faults || roll < 600 {
            self.log(format!("broker ack #{first}"));
            self.broker_ack(first, false);
        } else if roll < 800 {
            self.log(format!("broker multi-ack up to #{any}"));
            self.broker_ack(any, true);
        } else if roll < 860 {
            self.log(format!("broker ack #{any} (out of order)"));
            self.broker_ack(any, false);
        } else if roll < 890 {
            self.log(format!("broker nack #{any}"));
            self.nack(any);
        } else if roll < 900 {
            self.log(format!("channel goes stale; broker nack #{any}"));
            self.rep.channel_stale = true;
            self.nack(any);
        } else if roll < 940 {
            // unroutable: the return comes first, then the ack of the same publish
            let transient = self.rng.chance(500);
            self.log(format!("broker return #{any} (transient: {transient})"));
            self.rep.returned.insert(any);
            self.rep
                .publisher
                .on_return(any, "", "q", "312 NO_ROUTE", transient);
            self.broker_ack(any, false);
        } else if roll < 970 {
            self.log("confirm timeout".into());
            self.now += CONFIRM_TIMEOUT + Duration::from_millis(1);
            self.settle();
        } else {
            // connection loss: the broker may or may not have taken what was unconfirmed
            self.log("broker connection lost".into());
            self.lose_unconfirmed();
            self.rep.publisher.connection_lost("simulated");
            // a new connection comes with a new channel
            self.rep.channel_stale = false;
            self.rep.channel_in_doubt = false;
            self.flush_publisher();
            self.run_commands();
        }
    }

    /// (e) bounds; (l) one client: no conflict is ever seen.
    fn check_bounds(&self) {
        // two replicas: a conflict is what a stale replica's rollback looks like to the other
        assert_eq!(
            if self.other.is_some() {
                0
            } else {
                self.rep.core.snapshot().conflicts
            },
            0,
            "(l) a conflict with another client, with one client: {:?}",
            self.rep.core.snapshot().last_error
        );
        let w = self.rep.core.window();
        assert!(
            w.inflight_batches() + w.abandoned_batches() <= MAX_BATCHES,
            "(e) batches in flight {} + abandoned {} > {MAX_BATCHES}",
            w.inflight_batches(),
            w.abandoned_batches()
        );
        // batches whose rows the re-cut holds back count as in flight
        let bytes = w.inflight_bytes() + w.abandoned_bytes();
        assert!(
            bytes < MAX_BYTES + (FETCH_ROWS + 1) * ROW_BYTES,
            "(e) bytes in flight {bytes}"
        );
        // the rows the re-cut holds back (their frames count above; a remembered delivery can
        // hold more rows than the first time when the filter lets more through now)
        assert!(
            self.rep.core.held_rows() * ROW_BYTES < MAX_BYTES + (FETCH_ROWS + 1) * ROW_BYTES,
            "(e) rows held back by the re-cut: {}",
            self.rep.core.held_rows()
        );
        assert!(
            self.rep.publisher.unconfirmed() <= MAX_UNCONFIRMED,
            "(e) unconfirmed"
        );
        assert!(
            self.rep.publisher.queued() <= MAX_BATCHES * (FETCH_ROWS + 1) * CONSUMERS,
            "(e) publisher backlog {}",
            self.rep.publisher.queued()
        );
    }

    /// Both replicas (ZooKeeper seeds), the one stepping first.
    fn replicas_mut(&mut self) -> impl Iterator<Item = &mut Replica> {
        std::iter::once(&mut self.rep).chain(self.other.as_mut())
    }

    /// ZooKeeper: sessions not heard from for a session timeout end; a watcher of the node
    /// hears that it went.
    fn zk_tick(&mut self) {
        let now = self.now;
        let Some(zk) = &mut self.zk else { return };
        if !zk.expire(now) {
            return;
        }
        self.log("zookeeper: the client running node went with its session".into());
        for r in self.replicas_mut() {
            if let Some(ha) = &mut r.ha
                && ha.watching
            {
                ha.watching = false;
                ha.inbox.push_back(HaEvent::NodeGone);
            }
        }
    }

    /// The stepping replica's ZooKeeper client opens a new session.
    fn zk_new_session(&mut self) {
        let zk = self.zk.as_mut().unwrap();
        zk.next_session += 1;
        let session = zk.next_session;
        zk.sessions.insert(session, self.now);
        let ha = self.rep.ha.as_mut().unwrap();
        ha.session = session;
        ha.connected = true;
        ha.watching = false;
        // what was in flight on the old session is gone with it
        ha.inbox.clear();
        ha.inbox
            .push_back(HaEvent::CanalRunning(Some("canal:11111".into())));
        ha.inbox.push_back(HaEvent::Connected);
    }

    /// Feed the stepping replica's HA core an event, carry out its actions like the ZooKeeper
    /// shell does, and publish the lease to the connection.
    fn ha_event(&mut self, event: HaEvent) {
        let id = self.rep.id;
        self.log(format!("replica {id}: zookeeper {event:?}"));
        let actions = self.rep.ha.as_mut().unwrap().core.on(event);
        for a in actions {
            match a {
                HaAction::Claim => self.zk_claim(),
                HaAction::WatchNode => {
                    let gone = self.zk.as_ref().unwrap().node.is_none();
                    let ha = self.rep.ha.as_mut().unwrap();
                    if gone {
                        ha.inbox.push_back(HaEvent::NodeGone);
                    } else {
                        ha.watching = true;
                    }
                }
                HaAction::NewSession => self.zk_new_session(),
            }
        }
        let lease = self.rep.ha.as_ref().unwrap().core.lease();
        self.feed(Input::Lease(lease));
    }

    /// The shell sends a claim of the client running node; ZooKeeper decides it now, the
    /// answer is read later.
    fn zk_claim(&mut self) {
        let now = self.now;
        let mutation = self.mutation;
        let other = 1 - self.rep.id;
        let zk = self.zk.as_mut().unwrap();
        let ha = self.rep.ha.as_mut().unwrap();
        let answer = if !ha.connected {
            HaEvent::ClaimFailed
        } else if !zk.alive(ha.session, now) {
            HaEvent::Expired
        } else if zk.node.is_none_or(|n| n == ha.session) {
            zk.node = Some(ha.session);
            zk.sessions.insert(ha.session, now);
            HaEvent::Claimed { sent: now }
        } else if mutation == Mutation::ClaimIgnoresHolder {
            HaEvent::Claimed { sent: now }
        } else {
            HaEvent::HeldBy {
                address: format!("replica-{other}"),
            }
        };
        ha.inbox.push_back(answer);
    }

    /// A ZooKeeper step of the stepping replica: read an answer, send a heartbeat, get the
    /// connection back, or let time pass.
    fn zk_step(&mut self) {
        let now = self.now;
        let mutation = self.mutation;
        let roll = self.rng.below(100);
        let zk = self.zk.as_mut().unwrap();
        let ha = self.rep.ha.as_mut().unwrap();
        match roll {
            0..50 => {
                if let Some(event) = ha.inbox.pop_front() {
                    self.ha_event(event);
                }
            }
            50..80 if ha.connected => {
                // a heartbeat: the servers hear the session now, the answer is read later
                if zk.alive(ha.session, now) {
                    zk.sessions.insert(ha.session, now);
                    ha.inbox.push_back(HaEvent::Heartbeat { sent: now });
                } else if mutation == Mutation::HeartbeatOnExpiredSession {
                    ha.inbox.push_back(HaEvent::Heartbeat { sent: now });
                } else {
                    ha.connected = false;
                    ha.inbox.push_back(HaEvent::Expired);
                }
            }
            50..80 => {
                // the client gets its connection back: the same session, or it learns it expired
                if zk.alive(ha.session, now) {
                    ha.connected = true;
                    zk.sessions.insert(ha.session, now);
                    ha.inbox.push_back(HaEvent::Connected);
                } else {
                    ha.inbox.push_back(HaEvent::Expired);
                }
            }
            _ => self.time_passes(),
        }
    }

    fn time_passes(&mut self) {
        let d = Duration::from_millis(10 + self.rng.below(700) as u64);
        self.now += d;
        self.log(format!("{d:?} pass"));
    }

    /// A ZooKeeper fault on the stepping replica: its connection to ZooKeeper drops (the
    /// session lives on at the servers until it times out), the process freezes, or it is
    /// killed (its session lives on until it times out) and started again.
    fn zk_fault(&mut self) {
        let id = self.rep.id;
        match self.rng.below(3) {
            0 => {
                let ha = self.rep.ha.as_mut().unwrap();
                if !ha.connected {
                    return;
                }
                ha.connected = false;
                // requests in flight fail with the connection
                for e in &mut ha.inbox {
                    if matches!(e, HaEvent::Claimed { .. }) {
                        *e = HaEvent::ClaimFailed;
                    }
                }
                ha.inbox.retain(|e| !matches!(e, HaEvent::Heartbeat { .. }));
                self.ha_event(HaEvent::Disconnected);
            }
            1 => {
                let d = Duration::from_millis(
                    self.rng.below(2 * ZK_SESSION.as_millis() as usize) as u64
                );
                self.log(format!("replica {id} freezes for {d:?}"));
                self.rep.frozen_until = self.now + d;
            }
            _ => {
                self.log(format!("replica {id} killed and started again"));
                let mut file = self.rep.file.clone();
                file.flushes += self.rep.core.recut_flushes();
                let fresh = Replica::new(
                    id,
                    self.rep.incarnation + 1,
                    self.seed ^ id as u64,
                    true,
                    self.now,
                    file,
                );
                let old = std::mem::replace(&mut self.rep, fresh);
                // what it had published unconfirmed the broker may or may not have taken
                for (s, m) in old.unconfirmed {
                    if !old.returned.contains(&s) && self.rng.chance(500) {
                        self.accept(m);
                    }
                }
                self.start_replica();
            }
        }
    }

    /// The clock jumps to the next armed timer, which fires.
    fn fire_timer(&mut self) {
        let Some(i) = (0..self.rep.timers.len()).min_by_key(|&i| self.rep.timers[i].1) else {
            return;
        };
        let (timer, at) = self.rep.timers.swap_remove(i);
        self.now = self.now.max(at);
        if let Timer::AckWait(p) = timer
            && self.rep.core.window().waiting_for_acks() == Some(p)
        {
            self.rep.ack_wait_fired = true;
        }
        self.log(format!("timer {timer:?} fired"));
        self.feed(Input::Timer(timer));
    }

    /// The operator toggles the toggled consumer; the Manager changes the subscription.
    fn toggle(&mut self) {
        let enable = !self.rep.router.is_enabled(TOGGLED);
        self.log(format!("set c{TOGGLED} enabled={enable}"));
        self.rep.toggled_since = None;
        self.rep.toggled_enable_pending = enable;
        self.rep.router.set_enabled(TOGGLED, enable);
        self.run_commands();
        let mask = (0..CONSUMERS)
            .filter(|&c| self.rep.router.is_enabled(c))
            .fold(0u8, |m, c| m | self.rep.consumers[c].tables);
        self.feed(Input::SetFilter(mask_filter(mask)));
    }

    fn step(&mut self) {
        self.steps += 1;
        if self.other.is_some() {
            if self.rng.chance(300) {
                self.switch();
            }
            self.zk_tick();
            if self.rep.frozen(self.now) {
                // a frozen process does nothing; the world goes on
                match self.rng.below(3) {
                    0 => self.time_passes(),
                    1 => self.switch(),
                    _ => {
                        let n = 1 + self.rng.below(4);
                        self.server.commit(n);
                    }
                }
                return;
            }
        }
        let two = self.other.is_some();
        if two && self.rng.chance(120) {
            // the ZooKeeper client works as often as the rest
            self.zk_step();
            self.check_bounds();
            return;
        }
        let roll = self.rng.below(1000);
        match roll {
            0..150 => self.answer(),
            150..200 => self.decoded(),
            200..450 => {
                let c = self.rng.below(CONSUMERS);
                self.consumer_step(c);
            }
            450..500 if !self.rep.retries.is_empty() => {
                let i = self.rng.below(self.rep.retries.len());
                let slot = self.rep.retries.swap_remove(i);
                self.rep.router.retry(slot);
                self.run_commands();
            }
            500..600 => self.publish(),
            600..780 => self.broker_step(),
            780..830 => self.fire_timer(),
            830..880 => {
                let n = 1 + self.rng.below(4);
                if self.server.committed < self.server.rows.len() {
                    self.server.commit(n);
                    self.log(format!("commit up to row {}", self.server.committed));
                }
            }
            880..890 if self.faults => {
                self.log("canal connection lost".into());
                self.connection_lost();
            }
            890..894 if self.faults && self.server.up => {
                // a restart from the cursor last flushed, or any later one up to the last ack
                let from = self.server.saved_upto;
                let cursor = from + self.rng.below(self.server.acked_upto - from + 1);
                self.log(format!(
                    "canal server restarts at row {cursor} (acked up to {})",
                    self.server.acked_upto
                ));
                if !self.server.ack_ends.contains(&cursor) {
                    // the model may restart at any row in between; a real Canal restarts at
                    // a position it was acked at (for (n))
                    self.rewinds_between_acks += 1;
                }
                self.server.up = false;
                self.server.restart(cursor);
                // every client's connection drops
                self.connection_lost();
                if self.other.is_some() {
                    self.switch();
                    self.connection_lost();
                    self.switch();
                }
            }
            894..910 if !self.server.up => {
                self.log("canal server up".into());
                self.server.up = true;
            }
            910..920 => self.server.saved_upto = self.server.acked_upto,
            // the operator's toggle and drain act on one process: single-replica seeds only
            920..940 if self.faults && !two => self.toggle(),
            940..945 if self.faults => {
                // a poison row: the toggled consumer fails until it is quarantined
                self.rep.consumers[TOGGLED].poisoned = true;
            }
            945..955 => self.operator_skip(),
            975..980 if self.faults && two => self.zk_fault(),
            980..982 if self.faults && !two && !self.rep.draining => {
                self.log("drain (shutdown)".into());
                self.rep.draining = true;
                self.feed(Input::Drain);
            }
            _ => {}
        }
        self.check_bounds();
    }

    /// Faults stop: the server comes back, the operator lifts what stalls, and everything
    /// runs until delivered.
    fn quiesce(&mut self) {
        self.faults = false;
        self.server.up = true;
        // the rest of the binlog arrives
        let rest = self.server.rows.len();
        self.server.commit(rest);
        for _ in 0..1 + usize::from(self.other.is_some()) {
            self.rep.frozen_until = self.now;
            self.rep.consumers[TOGGLED].poisoned = false;
            if !self.rep.router.is_enabled(TOGGLED) {
                self.toggle();
            }
            if self.rep.router.state(TOGGLED) != Default::default() {
                self.rep.router.set_enabled(TOGGLED, true);
                self.run_commands();
            }
            self.switch();
        }
        for _ in 0..200_000 {
            if self.rep.ha.is_some() {
                // the ZooKeeper shell: reconnects, reads its answers, heartbeats in time
                let ha = self.rep.ha.as_ref().unwrap();
                if !ha.connected && ha.inbox.is_empty() {
                    self.zk_step();
                }
                while let Some(e) = self.rep.ha.as_mut().unwrap().inbox.pop_front() {
                    self.ha_event(e);
                }
                let ha = self.rep.ha.as_ref().unwrap();
                if ha.connected
                    && ha.core.role() == Role::Active
                    && !ha.core.lease().may_write(self.now + LEASE / 2)
                {
                    let session = ha.session;
                    let zk = self.zk.as_mut().unwrap();
                    if zk.alive(session, self.now) {
                        zk.sessions.insert(session, self.now);
                        self.ha_event(HaEvent::Heartbeat { sent: self.now });
                    }
                }
            }
            let done = if self.rep.draining {
                self.rep.drain_ended.is_some()
            } else {
                self.server.acked_upto == self.server.rows.len()
            };
            let idle = |r: &Replica| r.unconfirmed.is_empty() && r.publisher.is_idle();
            if done && idle(&self.rep) && self.other.as_ref().is_none_or(idle) {
                return;
            }
            self.step();
        }
        panic!(
            "(b) no progress once faults stopped: acked {} of {} rows, state {}, window {} batches, {} abandoned, publisher idle {}",
            self.server.acked_upto,
            self.server.rows.len(),
            self.rep.core.state(),
            self.rep.core.window().inflight_batches(),
            self.rep.core.window().abandoned_batches(),
            self.rep.publisher.is_idle()
        );
    }

    fn dump(&self) -> String {
        format!(
            "core {:?}\npending {}, decoding {}, timers {:?}, router queued {:?}",
            self.rep.core,
            self.rep.pending.len(),
            self.rep.decoding.len(),
            self.rep.timers,
            (0..CONSUMERS)
                .map(|c| self.rep.router.queued(c))
                .collect::<Vec<_>>()
        )
    }

    /// (b): every row up to the acked cursor reached the broker for every stable consumer.
    fn check_delivered(&self) {
        self.check_acked(self.server.acked_upto);
        if !self.rep.draining {
            assert_eq!(self.server.acked_upto, self.server.rows.len(), "(b)");
        }
    }
}

/// What a run measured of bulk ids across redeliveries: rows of the bulk consumer written,
/// written again in a later epoch, and of those, written again under another bulk id.
#[derive(Debug, Default, Clone, Copy)]
struct BulkCounts {
    rows: usize,
    redelivered: usize,
    /// Written again under another id by another replica, or after a re-cut flush.
    other_id: usize,
    other_id_flushed: usize,
    seeds_with_other_id: usize,
    /// ZooKeeper seeds: handovers between writers, freezes between the gate and the write,
    /// rollbacks written after the lease ended (and in how many seeds).
    handovers: usize,
    gate_freezes: usize,
    stale_rollbacks: usize,
    seeds_with_stale_rollback: usize,
}

fn run_seed(seed: u64) -> BulkCounts {
    let mut sim = Sim::new(seed);
    let steps = 300 + sim.rng.below(600);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..steps {
            sim.step();
        }
        sim.quiesce();
        sim.check_delivered();
    }));
    if let Err(e) = result {
        let trace = format!("{}\n{}", sim.trace.join("\n"), sim.dump());
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!(
            "seed {seed} failed at step {}: {msg}\nreproduce: SIM_SEED={seed} cargo test --test delivery_sim -- --nocapture\nlast steps:\n{trace}",
            sim.steps
        );
    }
    BulkCounts {
        rows: sim.bulk_first.len(),
        redelivered: sim.bulk_redelivered.len(),
        other_id: sim.bulk_other_id.len(),
        other_id_flushed: sim.bulk_other_id_flushed.len(),
        seeds_with_other_id: usize::from(
            !sim.bulk_other_id.is_empty() || !sim.bulk_other_id_flushed.is_empty(),
        ),
        handovers: sim.handovers,
        gate_freezes: sim.gate_freezes,
        stale_rollbacks: sim.stale_rollbacks,
        seeds_with_stale_rollback: usize::from(sim.stale_rollbacks > 0),
    }
}

#[test]
fn the_delivery_cores_keep_every_invariant_under_every_interleaving() {
    if let Ok(seed) = std::env::var("SIM_SEED") {
        let counts = run_seed(seed.parse().expect("SIM_SEED is a number"));
        println!("{counts:?}");
        return;
    }
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3_000);
    let first: u64 = std::env::var("SIM_FIRST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut total = BulkCounts::default();
    for seed in first..first + seeds {
        let c = run_seed(seed);
        total.rows += c.rows;
        total.redelivered += c.redelivered;
        total.other_id += c.other_id;
        total.other_id_flushed += c.other_id_flushed;
        total.seeds_with_other_id += c.seeds_with_other_id;
        total.handovers += c.handovers;
        total.gate_freezes += c.gate_freezes;
        total.stale_rollbacks += c.stale_rollbacks;
        total.seeds_with_stale_rollback += c.seeds_with_stale_rollback;
    }
    // (n) checks the rest: a replica writes a bulk row again under its first id
    println!(
        "{seeds} seeds: bulk rows written: {}, written again in a later epoch: {}, under a different bulk id: after a handover between replicas {}, after a re-cut flush or a skip {} (in {} seeds)",
        total.rows,
        total.redelivered,
        total.other_id,
        total.other_id_flushed,
        total.seeds_with_other_id
    );
    println!(
        "zookeeper seeds: handovers between replicas: {}, freezes between the lease check and the write: {}, rollbacks written after the lease ended (ungated_rollback only): {} (in {} seeds)",
        total.handovers, total.gate_freezes, total.stale_rollbacks, total.seeds_with_stale_rollback
    );
}
