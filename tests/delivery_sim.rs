//! Deterministic simulation of the delivery path: the three sans-IO cores wired together
//! (the connection's [`BatchWindow`], the Manager's [`Router`], the publisher's
//! [`ConfirmWindow`]) with a model Canal server, model consumers and a model broker.
//!
//! A seeded RNG picks, at every step, one of: fetch, write acks, a consumer answering (ok,
//! error/panic → restart and retry, quarantine), a retry timer, publishing, a broker ack /
//! multi-ack / nack / return / confirm timeout / connection loss, a Canal disconnect and
//! reconnect, enable and disable of a consumer, and a drain (graceful shutdown). After every
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
//!   before it), unless the wait for those acks ended (the shell's `fetch_wait` timer, a step
//!   here), so a batch stuck downstream does not stop the fetching;
//! - (h) once a drain has ended (the window said [`BatchWindow::drained`]: the shell then stops
//!   the publisher and closes the session), no batch of that epoch arrives any more: a GET
//!   written before the drain began is answered before the drain ends.
//!
//! Rows are committed over time (a step commits a few more), so GETs also find nothing. A GET
//! is two steps, as on the wire: written (the model server answers it then), and its answer
//! read later, with other steps between; acks wait while it is out (one session, in order).
//!
//! A failing seed reproduces exactly: `SIM_SEED=1234 cargo test --test delivery_sim -- --nocapture`.
//! More seeds: `SIM_SEEDS=1000000 cargo test --release --test delivery_sim` (see README).
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

use canal_consumer::canal::window::{BatchRef, BatchWindow, GetMode};
use canal_consumer::event::{EventType, Position};
use canal_consumer::manager::core::{
    Command, Mode, OnPoison, PartError, PoisonPolicy, Processed, Router,
};
use canal_consumer::publisher::PublishError;
use canal_consumer::publisher::window::{ConfirmWindow, JobNo, Outgoing};
use canal_consumer::trigger::{SourceRef, message_id};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

const MAX_BATCHES: usize = 4;
const ROW_BYTES: usize = 100;
const MAX_ROWS_PER_BATCH: usize = 5;
const MAX_BYTES: usize = 8 * ROW_BYTES;
const MAX_UNCONFIRMED: usize = 6;
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
const CONSUMERS: usize = 3;

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

/// The model Canal server: one client identity, a cursor, batches handed out in order.
struct Server {
    /// Table (0..3) of each row of the binlog.
    rows: Vec<u8>,
    /// Rows committed so far (the rest are not in the binlog yet).
    committed: usize,
    acked_upto: usize,
    delivered_upto: usize,
    outstanding: VecDeque<(i64, usize, usize)>,
    next_id: i64,
}

impl Server {
    fn get(&mut self, max_rows: usize) -> Option<(i64, usize, usize)> {
        if self.delivered_upto >= self.committed {
            return None;
        }
        let start = self.delivered_upto;
        let end = (start + max_rows).min(self.committed);
        self.delivered_upto = end;
        let id = self.next_id;
        self.next_id += 1;
        self.outstanding.push_back((id, start, end));
        Some((id, start, end))
    }

    /// Canal refuses an ack that is not for its oldest outstanding batch.
    fn ack(&mut self, id: i64) -> (usize, usize) {
        let (first, start, end) = *self
            .outstanding
            .front()
            .unwrap_or_else(|| panic!("ack of batch {id} with nothing outstanding"));
        assert_eq!(first, id, "acks must reach canal in batch order");
        self.outstanding.pop_front();
        assert_eq!(start, self.acked_upto);
        self.acked_upto = end;
        (start, end)
    }

    fn rollback(&mut self) {
        self.outstanding.clear();
        self.delivered_upto = self.acked_upto;
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
    row: usize,
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
    /// The next answer is a quarantine (a poison fault), for non-stable consumers.
    poisoned: bool,
}

/// The id of the dead letter that parks `row` of `consumer`.
fn parked_id(row: usize, consumer: usize) -> String {
    format!("dead-letter:{}", row_id(row, consumer))
}

fn name(c: usize) -> String {
    format!("c{c}")
}

fn row_id(row: usize, consumer: usize) -> String {
    let source = SourceRef {
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
    };
    message_id(&source, &name(consumer), Some("r"), "p", 0)
}

/// A GET on the wire: the epoch it was written in, how it asked, and the model server's answer.
struct PendingGet {
    epoch: u64,
    mode: GetMode,
    max: usize,
    answer: Option<(i64, usize, usize)>,
}

struct Sim {
    rng: Rng,
    /// The GET written and not yet answered (one session: at most one).
    pending_get: Option<PendingGet>,
    /// The epoch in which the drain ended (invariant (h)).
    drain_ended: Option<u64>,
    faults: bool,
    now: Instant,
    server: Server,
    connected: bool,
    draining: bool,
    window: BatchWindow,
    /// The last answered GET of this epoch found nothing (the model of (f)).
    last_get_empty: bool,
    /// The shell's timer ended this idle period's wait for acks (invariant (g)).
    ack_wait_ended: bool,
    router: Router<SimPart>,
    publisher: ConfirmWindow<Msg>,
    consumers: Vec<Consumer>,
    batch_rows: HashMap<BatchRef, (usize, usize)>,
    jobs: HashMap<JobNo, (usize, BatchRef, u64)>,
    retries: Vec<usize>,
    /// Published and not yet confirmed, by publish sequence number.
    unconfirmed: BTreeMap<u64, Msg>,
    /// Publishes the broker returned (their ack follows).
    returned: BTreeSet<u64>,
    /// Ids of messages the broker accepted (acked without a return).
    accepted: BTreeSet<String>,
    /// Per consumer: (epoch, row) of the last channel write.
    last_write: Vec<Option<(u64, usize)>>,
    /// Highest epoch with a settled (non-cancel) failure.
    failed_epoch: Option<u64>,
    steps: u64,
    trace: Vec<String>,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let rows = (0..20 + rng.below(40))
            .map(|_| rng.below(3) as u8)
            .collect::<Vec<u8>>();
        let committed = rng.below(rows.len() + 1);
        let consumers: Vec<Consumer> = (0..CONSUMERS)
            .map(|c| Consumer {
                tables: [0b011, 0b110, 0b101][c],
                // consumer 2 is the one the operator toggles
                stable: c != 2,
                inbox: None,
                poisoned: false,
            })
            .collect();
        Sim {
            rng,
            pending_get: None,
            drain_ended: None,
            faults: true,
            now: Instant::now(),
            server: Server {
                committed,
                rows,
                acked_upto: 0,
                delivered_upto: 0,
                outstanding: VecDeque::new(),
                next_id: 1,
            },
            connected: true,
            draining: false,
            window: BatchWindow::new(MAX_BATCHES, MAX_BYTES),
            last_get_empty: false,
            ack_wait_ended: false,
            // both poison policies are exercised: consumer 1 stalls, the others park
            router: Router::with_policies((0..CONSUMERS).map(|c| {
                (
                    true,
                    PoisonPolicy {
                        on_poison: if c == 1 {
                            OnPoison::Stall
                        } else {
                            OnPoison::Park
                        },
                        attempts: 2,
                    },
                )
            })),
            publisher: ConfirmWindow::new(MAX_UNCONFIRMED, CONFIRM_TIMEOUT),
            consumers,
            batch_rows: HashMap::new(),
            jobs: HashMap::new(),
            retries: Vec::new(),
            unconfirmed: BTreeMap::new(),
            returned: BTreeSet::new(),
            accepted: BTreeSet::new(),
            last_write: vec![None; CONSUMERS],
            failed_epoch: None,
            steps: 0,
            trace: Vec::new(),
        }
    }

    fn log(&mut self, s: String) {
        if self.trace.len() > 400 {
            self.trace.remove(0);
        }
        self.trace.push(format!("{:>5} {s}", self.steps));
    }

    fn new_epoch(&mut self, new_session: bool) {
        if new_session {
            // the GET on the wire died with the session
            self.pending_get = None;
        }
        let (epoch, _) = self.window.begin_epoch(new_session);
        self.last_get_empty = false;
        self.ack_wait_ended = false;
        self.router.reset(epoch);
        self.server.rollback();
        self.run_commands();
    }

    /// Carry out the router's commands, like the Manager actor does.
    fn run_commands(&mut self) {
        loop {
            let cmds = self.router.take_commands();
            if cmds.is_empty() {
                return;
            }
            for cmd in cmds {
                match cmd {
                    Command::Process {
                        slot,
                        batch,
                        part,
                        mode,
                    } => {
                        assert!(
                            self.consumers[slot].inbox.is_none(),
                            "two parts in consumer {slot} at once"
                        );
                        self.consumers[slot].inbox = Some((batch, part, mode));
                    }
                    Command::RetryAfter { slot, .. } => self.retries.push(slot),
                    Command::Ack(b) => {
                        self.window.ack(b);
                    }
                    Command::Rollback { batch, reason } => {
                        if batch.epoch == self.window.epoch() {
                            self.log(format!("rollback {batch}: {reason}"));
                            self.new_epoch(false);
                        }
                    }
                    Command::Release(b) => {
                        self.window.release(b);
                    }
                    Command::CancelBefore(e) => self.publisher.cancel_before(e),
                }
            }
            self.flush_publisher();
        }
    }

    /// Deliver the publisher's answers to the router.
    fn flush_publisher(&mut self) {
        self.publisher.take_failures();
        for (job, res) in self.publisher.take_replies() {
            let (slot, batch, epoch) = self.jobs.remove(&job).expect("known job");
            // a transient failure settles its whole epoch; an unroutable message does not
            if let Err(e) = &res
                && e.is_transient()
                && !matches!(e, PublishError::Cancelled { .. })
            {
                self.failed_epoch = Some(self.failed_epoch.map_or(epoch, |f| f.max(epoch)));
            }
            let res = res.map_err(|e| match e {
                PublishError::Unroutable { returned } => PartError::Unroutable {
                    ids: returned.into_iter().map(|r| r.id).collect(),
                    reason: "unroutable".into(),
                },
                e => PartError::Transient(e.to_string()),
            });
            self.router.confirmed(slot, batch, res);
        }
    }

    /// Write a GET; the model server answers it now, the answer is read by [`Self::answer_get`].
    fn send_get(&mut self) {
        if !self.connected || self.draining || self.pending_get.is_some() {
            return;
        }
        let Some(mode) = self.window.next_get() else {
            return;
        };
        assert_eq!(
            mode == GetMode::LongPoll,
            self.last_get_empty,
            "(f) a GET waits exactly when the last one of this epoch found nothing more"
        );
        if mode == GetMode::LongPoll {
            assert!(
                self.window.current_is_empty() || self.ack_wait_ended,
                "(g) a long poll with {} batches in flight before the ack wait ended",
                self.window.inflight_batches()
            );
        }
        let max = match mode {
            // the smallest batch Canal makes: one unit, and it may overshoot by an entry
            GetMode::LongPoll => 1 + self.rng.below(2),
            GetMode::Drain => 1 + self.rng.below(MAX_ROWS_PER_BATCH),
        };
        let answer = self.server.get(max);
        self.window.get_sent();
        let epoch = self.window.epoch();
        self.log(format!("get ({mode:?}) written in epoch {epoch}"));
        self.pending_get = Some(PendingGet {
            epoch,
            mode,
            max,
            answer,
        });
    }

    /// Read the answer of the GET on the wire.
    fn answer_get(&mut self) {
        let Some(PendingGet {
            epoch,
            mode,
            max,
            answer,
        }) = self.pending_get.take()
        else {
            return;
        };
        if epoch != self.window.epoch() {
            // written before a rollback: the shell drops it (the rollback returns its rows) but
            // notes its batch id, which the server's numbering counted
            if let Some((id, _, _)) = answer {
                self.window.observe_id(id);
            }
            self.log(format!(
                "get of epoch {epoch} answered after the epoch ended: dropped"
            ));
            return;
        }
        self.window.get_answered();
        let Some((id, start, end)) = answer else {
            // a long poll that saw nothing until its wait ran out, or a GET that found nothing
            self.log(format!("get ({mode:?}) found nothing"));
            if !self.last_get_empty {
                self.ack_wait_ended = false; // a new idle period
            }
            self.window.caught_up();
            self.last_get_empty = true;
            return;
        };
        assert_ne!(
            self.drain_ended,
            Some(epoch),
            "(h) batch {epoch}/{id} arrived after the drain had ended"
        );
        self.ack_wait_ended = false;
        let fetched = self
            .window
            .fetched(id, (end - start) * ROW_BYTES, None, true);
        // a short answer (the server ran out before `max` when it answered): the connection
        // tells it with `took_all` and the next GET long-polls; an answer of exactly `max` is
        // taken as cut even when nothing was left, and the next GET drains (and finds nothing)
        self.last_get_empty = end - start < max;
        if self.last_get_empty {
            self.window.caught_up();
        }
        assert_eq!(fetched.gap, None, "one client: batch ids are consecutive");
        self.batch_rows.insert(fetched.batch, (start, end));
        let parts = (0..CONSUMERS)
            .filter_map(|c| {
                let rows: Vec<usize> = (start..end)
                    .filter(|&r| self.consumers[c].tables & (1 << self.server.rows[r]) != 0)
                    .collect();
                (!rows.is_empty()).then_some((c, SimPart { rows }))
            })
            .collect();
        self.log(format!("fetch {} rows {start}..{end}", fetched.batch));
        self.router.route(fetched.batch, parts);
        self.run_commands();
    }

    fn write_acks(&mut self) {
        // one session: acks wait while a GET is out
        if !self.connected || self.pending_get.is_some() {
            return;
        }
        let ackable = self.window.take_ackable();
        let epoch = self.window.epoch();
        for id in ackable.ids {
            let (start, end) = self.server.ack(id);
            self.log(format!("canal ack {epoch}/{id} rows {start}..{end}"));
            self.check_acked(end);
        }
    }

    /// (a): everything up to `end` reached the broker for every stable consumer.
    fn check_acked(&self, end: usize) {
        for (c, consumer) in self.consumers.iter().enumerate() {
            if !consumer.stable {
                continue;
            }
            for r in 0..end {
                if consumer.tables & (1 << self.server.rows[r]) != 0 {
                    assert!(
                        self.accepted.contains(&row_id(r, c))
                            || self.accepted.contains(&parked_id(r, c)),
                        "(a) batch acked up to row {end} but row {r} of consumer {c} was never accepted by the broker"
                    );
                }
            }
        }
    }

    fn consumer_step(&mut self, c: usize) {
        let Some((batch, part, mode)) = self.consumers[c].inbox.take() else {
            return;
        };
        let msg = |row: usize, id: String| Msg {
            id,
            consumer: c,
            row,
            epoch: batch.epoch,
        };
        let fails = |rng: &mut Rng, faults: bool| faults && rng.chance(150);
        let outcome = match &mode {
            Mode::Normal if self.consumers[c].poisoned => {
                self.consumers[c].poisoned = false;
                Processed::Quarantined
            }
            Mode::Normal if fails(&mut self.rng, self.faults) => Processed::Failed {
                retry_in: Duration::from_millis(10),
                error: "boom".into(),
            },
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
                let job = self.publisher.submit(batch.epoch, msgs);
                self.jobs.insert(job, (c, batch, batch.epoch));
                Processed::Published
            }
        };
        self.log(format!("consumer {c} {batch} {mode:?}: {outcome:?}"));
        self.router.processed(c, batch, outcome);
        self.flush_publisher();
        self.run_commands();
    }

    fn publish(&mut self) {
        while let Some((seq, msg)) = self.publisher.poll_publish(self.now) {
            // (c) order of channel writes
            if let Some(f) = self.failed_epoch {
                assert!(
                    msg.epoch > f,
                    "(c) wrote row {} of epoch {} after a failure of epoch {f} settled",
                    msg.row,
                    msg.epoch
                );
            }
            // dead letters are out of band: parked rows leave the order by definition
            let parked = msg.id == parked_id(msg.row, msg.consumer);
            if let Some((e, r)) = self.last_write[msg.consumer].filter(|_| !parked) {
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
            // (d) every copy carries the id of the original
            assert!(
                msg.id == row_id(msg.row, msg.consumer)
                    || msg.id == parked_id(msg.row, msg.consumer),
                "(d) row {} of consumer {} carries id {}",
                msg.row,
                msg.consumer,
                msg.id
            );
            if !parked {
                self.last_write[msg.consumer] = Some((msg.epoch, msg.row));
            }
            self.log(format!(
                "publish #{seq} c{} row {} epoch {}",
                msg.consumer, msg.row, msg.epoch
            ));
            self.unconfirmed.insert(seq, msg);
        }
    }

    fn broker_ack(&mut self, seq: u64, multiple: bool) {
        let seqs: Vec<u64> = if multiple {
            self.unconfirmed.range(..=seq).map(|(s, _)| *s).collect()
        } else {
            vec![seq]
        };
        for s in seqs {
            if let Some(m) = self.unconfirmed.remove(&s)
                && !self.returned.remove(&s)
            {
                self.accepted.insert(m.id);
            }
        }
        self.publisher.on_confirm(seq, true, multiple);
        self.settle();
    }

    fn settle(&mut self) {
        self.publisher.settle(self.now);
        self.flush_publisher();
        self.run_commands();
    }

    fn broker_step(&mut self) {
        let Some((&first, _)) = self.unconfirmed.iter().next() else {
            return;
        };
        let seqs: Vec<u64> = self.unconfirmed.keys().copied().collect();
        let any = seqs[self.rng.below(seqs.len())];
        let roll = self.rng.below(1000);
        if !self.faults || roll < 600 {
            self.log(format!("broker ack #{first}"));
            self.broker_ack(first, false);
        } else if roll < 800 {
            self.log(format!("broker multi-ack up to #{any}"));
            self.broker_ack(any, true);
        } else if roll < 860 {
            self.log(format!("broker ack #{any} (out of order)"));
            self.broker_ack(any, false);
        } else if roll < 900 {
            self.log(format!("broker nack #{any}"));
            self.unconfirmed.remove(&any);
            self.publisher.on_confirm(any, false, false);
            self.settle();
        } else if roll < 940 {
            // unroutable: the return comes first, then the ack of the same publish
            let transient = self.rng.chance(500);
            self.log(format!("broker return #{any} (transient: {transient})"));
            self.returned.insert(any);
            self.publisher
                .on_return(any, "", "q", "312 NO_ROUTE", transient);
            self.broker_ack(any, false);
        } else if roll < 970 {
            self.log("confirm timeout".into());
            self.now += CONFIRM_TIMEOUT + Duration::from_millis(1);
            self.settle();
        } else {
            // connection loss: the broker may or may not have taken what was unconfirmed
            self.log("broker connection lost".into());
            let lost: Vec<(u64, Msg)> = std::mem::take(&mut self.unconfirmed).into_iter().collect();
            for (s, m) in lost {
                if !self.returned.remove(&s) && self.rng.chance(500) {
                    self.accepted.insert(m.id);
                }
            }
            self.publisher.connection_lost("simulated");
            self.flush_publisher();
            self.run_commands();
        }
    }

    /// (e) bounds.
    fn check_bounds(&self) {
        assert!(
            self.window.inflight_batches() + self.window.abandoned_batches() <= MAX_BATCHES,
            "(e) batches in flight {} + abandoned {} > {MAX_BATCHES}",
            self.window.inflight_batches(),
            self.window.abandoned_batches()
        );
        let bytes = self.window.inflight_bytes() + self.window.abandoned_bytes();
        assert!(
            bytes < MAX_BYTES + MAX_ROWS_PER_BATCH * ROW_BYTES,
            "(e) bytes in flight {bytes}"
        );
        assert!(
            self.publisher.unconfirmed() <= MAX_UNCONFIRMED,
            "(e) unconfirmed"
        );
        assert!(
            self.publisher.queued() <= MAX_BATCHES * MAX_ROWS_PER_BATCH * CONSUMERS,
            "(e) publisher backlog {}",
            self.publisher.queued()
        );
    }

    fn step(&mut self) {
        self.steps += 1;
        let roll = self.rng.below(1000);
        match roll {
            0..200 if self.pending_get.is_some() => self.answer_get(),
            0..200 => self.send_get(),
            200..300 => self.write_acks(),
            300..550 => {
                let c = self.rng.below(CONSUMERS);
                self.consumer_step(c);
            }
            550..600 if !self.retries.is_empty() => {
                let i = self.rng.below(self.retries.len());
                let slot = self.retries.swap_remove(i);
                self.router.retry(slot);
                self.run_commands();
            }
            600..700 => self.publish(),
            700..900 => self.broker_step(),
            900..930 if self.faults => {
                if self.connected {
                    self.log("canal disconnect".into());
                    self.connected = false;
                    self.new_epoch(true);
                } else {
                    self.log("canal reconnect".into());
                    self.connected = true;
                    self.new_epoch(true);
                }
            }
            930..960 if self.faults => {
                let enable = !self.router.is_enabled(2);
                self.log(format!("set c2 enabled={enable}"));
                self.router.set_enabled(2, enable);
                self.run_commands();
            }
            960..965 if self.faults => {
                // a poison row: consumer 2 quarantines on its next part
                self.consumers[2].poisoned = true;
            }
            967..990 => {
                let n = 1 + self.rng.below(4);
                self.server.committed = (self.server.committed + n).min(self.server.rows.len());
                self.log(format!("commit up to row {}", self.server.committed));
            }
            990..1000 => {
                // the shell's timer: the long poll has waited `fetch_wait` for acks
                if let Some(period) = self.window.waiting_for_acks() {
                    self.log("ack wait over".into());
                    self.window.end_ack_wait(period);
                    self.ack_wait_ended = true;
                }
            }
            965..967 if self.faults && !self.draining => {
                self.log("drain (shutdown)".into());
                self.draining = true;
            }
            _ => {}
        }
        if self.draining && self.drain_ended.is_none() && self.window.drained() {
            // the shell now stops the publisher and closes the session
            self.log(format!("drain ended in epoch {}", self.window.epoch()));
            self.drain_ended = Some(self.window.epoch());
        }
        self.check_bounds();
    }

    /// Faults stop: reconnect, lift quarantines, and run until everything is delivered.
    fn quiesce(&mut self) {
        self.faults = false;
        if !self.connected {
            self.connected = true;
            self.new_epoch(true);
        }
        self.consumers[2].poisoned = false;
        // the rest of the binlog arrives
        self.server.committed = self.server.rows.len();
        if !self.router.is_enabled(2) || self.router.state(2) != Default::default() {
            self.router.set_enabled(2, true);
            self.run_commands();
        }
        let target = if self.draining {
            None
        } else {
            Some(self.server.rows.len())
        };
        for _ in 0..200_000 {
            let done = match target {
                Some(t) => self.server.acked_upto == t,
                None => self.window.drained() && self.pending_get.is_none(),
            };
            if done && self.unconfirmed.is_empty() && self.publisher.is_idle() {
                return;
            }
            self.step();
        }
        panic!(
            "(b) no progress once faults stopped: acked {} of {} rows, window {} batches, {} abandoned, publisher idle {}",
            self.server.acked_upto,
            self.server.rows.len(),
            self.window.inflight_batches(),
            self.window.abandoned_batches(),
            self.publisher.is_idle()
        );
    }

    /// (b): every row up to the acked cursor reached the broker for every stable consumer.
    fn check_delivered(&self) {
        self.check_acked(self.server.acked_upto);
        if !self.draining {
            assert_eq!(self.server.acked_upto, self.server.rows.len(), "(b)");
        }
    }
}

fn run_seed(seed: u64) {
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
        let trace = sim.trace.join("\n");
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
}

#[test]
fn the_delivery_cores_keep_every_invariant_under_every_interleaving() {
    if let Ok(seed) = std::env::var("SIM_SEED") {
        run_seed(seed.parse().expect("SIM_SEED is a number"));
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
    for seed in first..first + seeds {
        run_seed(seed);
    }
}
