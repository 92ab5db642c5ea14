//! The watermark windows against a model table: a seeded simulation of DBLog's algorithm with a
//! writer that inserts, updates (also the key) and deletes while a backfill reads chunks, the
//! binlog cut into random batches, some of them abandoned (a publish failed: the stream
//! comes again from the last ack and the reads whose rows they carried are read again), reads
//! whose rows were lost. The batches go through the Manager's own [`Router`] (with its
//! SNAPSHOT lane, the parts cut by the Manager's own [`segments`] and [`row_keys`]) to two
//! model consumers, one taking SNAPSHOT rows in the lane, one taking every batch whole, and a
//! model publisher that confirms parts in any order, sometimes fails one (the batch rolls
//! back), and consumers that sometimes fail a part (retried after a backoff).
//!
//! Checked: after each run, for every key, the last event a consumer saw must carry the row's
//! final state (a deleted key's last event removes it), and every row of the final table must
//! have been seen: the table's final state is the independent expectation. After every publish,
//! the per-key order README "Backfill" promises: within an epoch, each event a consumer gets for
//! a key is at least as new as the one before (every write stores its binlog position in the
//! row, so a SNAPSHOT row says which write it shows; a SNAPSHOT must not come before a live
//! event it shows or after a newer one).

use super::Progress;
use super::chunks::{Chunks, Key, Pace, Yield};
use super::*;
use crate::canal::connection::BatchRef;
use crate::event::{Columns, Position};
use crate::manager::core::{
    Command, OnPoison, PartError, PoisonPolicy, Processed, Router, SupervisionConfig,
};
use crate::manager::{row_keys, segments};
use crate::publisher::PublishError;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

fn columns() -> Arc<Columns> {
    Arc::new(Columns::new(vec!["id".into(), "v".into()]))
}

fn row(cols: &Arc<Columns>, id: i64, v: i64) -> Row {
    Row::from_values(cols.clone(), vec![Value::Int(id), Value::Int(v)])
}

fn event(t: EventType, db: &str, table: &str, data: Row, old: Option<Row>, n: u64) -> ChangeEvent {
    ChangeEvent {
        destination: "d".into(),
        database: db.into(),
        table: table.into(),
        event_type: t,
        data,
        old,
        changed: Default::default(),
        primary_keys: Default::default(),
        position: Position {
            log_file: "bin.000001".into(),
            offset: n,
            row_index: 0,
            server_id: 1,
            gtid: None,
        },
        executed_at: n as i64,
        is_ddl: false,
        sql: None,
        snapshot: None,
    }
}

pub(crate) fn wm_table() -> WatermarkTable {
    WatermarkTable {
        database: "cc".into(),
        table: "watermark".into(),
    }
}

pub(crate) fn wm_event(kind: &str, nonce: &str, n: u64) -> ChangeEvent {
    let cols = Arc::new(Columns::new(vec!["id".into(), "watermark".into()]));
    let data = Row::from_values(
        cols,
        vec![
            Value::Text("b1".into()),
            Value::Text(format!("{kind}:{nonce}")),
        ],
    );
    event(EventType::Update, "cc", "watermark", data, None, n)
}

fn ddl_event(n: u64) -> ChangeEvent {
    let mut e = event(
        EventType::Alter,
        "db",
        "t",
        Row::from_values(Arc::new(Columns::new(vec![])), vec![]),
        None,
        n,
    );
    e.is_ddl = true;
    e.sql = Some("ALTER TABLE t COMMENT 'x'".into());
    e
}

pub(crate) fn plan(nonce: &str, layout: u64) -> ChunkPlan {
    ChunkPlan {
        nonce: nonce.into(),
        backfill: "b1".into(),
        database: "db".into(),
        table: "t".into(),
        key_columns: vec!["id".into()],
        consumer: None,
        layout,
    }
}

/// What a consumer of table `db.t` saw last, per key: Some(v) for a row, None for a delete.
type Seen = BTreeMap<i64, Option<i64>>;

fn apply_seen(seen: &mut Seen, e: &ChangeEvent) {
    if &*e.database != "db" || &*e.table != "t" {
        return;
    }
    let id = |r: &Row| match r.get("id") {
        Some(Value::Int(i)) => *i,
        other => panic!("no id: {other:?}"),
    };
    let v = |r: &Row| match r.get("v") {
        Some(Value::Int(i)) => *i,
        other => panic!("no v: {other:?}"),
    };
    match e.event_type {
        EventType::Insert | EventType::Snapshot => {
            seen.insert(id(&e.data), Some(v(&e.data)));
        }
        EventType::Update => {
            if let Some(Value::Int(old_id)) = e.old.as_ref().and_then(|o| o.get("id")) {
                seen.insert(*old_id, None);
            }
            seen.insert(id(&e.data), Some(v(&e.data)));
        }
        EventType::Delete => {
            seen.insert(id(&e.data), None);
        }
        _ => {}
    }
}

/// The write of one row of the model table: its event, and the table changed. A written row's
/// `v` is the write's position `n`, so every state of a row names the write that made it.
fn write(
    rng: &mut fastrand::Rng,
    cols: &Arc<Columns>,
    table: &mut BTreeMap<i64, i64>,
    next_id: &mut i64,
    n: u64,
) -> Option<ChangeEvent> {
    if rng.u8(0..40) == 0 {
        // a DDL that changes nothing the model sees
        return Some(ddl_event(n));
    }
    let pick = |rng: &mut fastrand::Rng, table: &BTreeMap<i64, i64>| {
        *table.keys().nth(rng.usize(0..table.len())).unwrap()
    };
    match rng.u8(0..4) {
        0 => {
            *next_id += rng.i64(1..3);
            let v = n as i64;
            table.insert(*next_id, v);
            Some(event(
                EventType::Insert,
                "db",
                "t",
                row(cols, *next_id, v),
                None,
                n,
            ))
        }
        1 if !table.is_empty() => {
            let k = pick(rng, table);
            let v = n as i64;
            table.insert(k, v);
            let old = Row::from_values(
                Arc::new(Columns::new(vec!["v".into()])),
                vec![Value::Int(0)],
            );
            Some(event(
                EventType::Update,
                "db",
                "t",
                row(cols, k, v),
                Some(old),
                n,
            ))
        }
        2 if !table.is_empty() => {
            // the key changes (to an unused key, maybe inside a read chunk)
            let k = pick(rng, table);
            let mut to = rng.i64(0..*next_id + 5);
            while table.contains_key(&to) {
                to += 1;
            }
            *next_id = (*next_id).max(to);
            table.remove(&k).unwrap();
            let v = n as i64;
            table.insert(to, v);
            let old = Row::from_values(
                Arc::new(Columns::new(vec!["id".into()])),
                vec![Value::Int(k)],
            );
            Some(event(
                EventType::Update,
                "db",
                "t",
                row(cols, to, v),
                Some(old),
                n,
            ))
        }
        3 if !table.is_empty() => {
            let k = pick(rng, table);
            let v = table.remove(&k).unwrap();
            Some(event(
                EventType::Delete,
                "db",
                "t",
                row(cols, k, v),
                None,
                n,
            ))
        }
        _ => None,
    }
}

/// The table's keys up to `max` (none when `max` is `None`), in order.
fn range_keys(table: &BTreeMap<i64, i64>, max: Option<i64>) -> impl Iterator<Item = i64> + '_ {
    table.keys().copied().take_while(move |&k| Some(k) <= max)
}

fn int_key(k: &Option<Key>) -> Option<i64> {
    k.as_ref().map(|k| match k.as_slice() {
        [Value::Int(i)] => *i,
        other => panic!("not a model key: {other:?}"),
    })
}

/// The model consumers: 0 takes SNAPSHOT rows in the lane, 1 takes every batch whole (as a
/// consumer that gets only SNAPSHOT events does).
const CONSUMERS: usize = 2;

/// How new an event is for its key: a live event's position, or the write a SNAPSHOT row
/// shows, ranked just after that write's own event.
type Rank = (u64, u8);

/// The model table's keys an event touches, with its rank (none for other tables).
fn ranks(e: &ChangeEvent) -> Vec<(i64, Rank)> {
    if &*e.database != "db" || &*e.table != "t" || !e.event_type.is_row() {
        return Vec::new();
    }
    let int = |v: Option<&Value>| match v {
        Some(Value::Int(i)) => *i,
        other => panic!("not a model value: {other:?}"),
    };
    let id = int(e.data.get("id"));
    if e.event_type == EventType::Snapshot {
        return vec![(id, (int(e.data.get("v")) as u64, 1))];
    }
    let at = (e.position.offset, 0);
    let mut out = vec![(id, at)];
    if let Some(old) = e.old.as_ref().and_then(|o| o.get("id")) {
        out.push((int(Some(old)), at));
    }
    out
}

/// The Manager's [`Router`] with model consumers and a model publisher around it.
struct Downstream {
    router: Router<Vec<ChangeEvent>>,
    lane_rows: usize,
    lane_parts: usize,
    /// The part inside each consumer.
    inbox: Vec<Option<(BatchRef, u32, Vec<ChangeEvent>)>>,
    /// Parts published, awaiting their confirms, in publish order.
    awaiting: Vec<(usize, BatchRef, u32)>,
    /// Consumers whose retry timer is armed.
    retries: Vec<usize>,
    /// Batches the router acked (every part confirmed), not yet acked by the connection.
    acked: BTreeSet<BatchRef>,
    /// A part failed: the connection rolls back.
    rollback: bool,
    /// What each consumer saw last per key, at the broker (in publish order).
    seen: Vec<Seen>,
    /// Per consumer, epoch and key: the rank of the last event published.
    last: HashMap<(usize, u64, i64), Rank>,
}

impl Downstream {
    fn new(lane_rows: usize, lane_parts: usize) -> Self {
        Downstream {
            router: Self::router(lane_parts),
            lane_rows,
            lane_parts,
            inbox: vec![None; CONSUMERS],
            awaiting: Vec::new(),
            retries: Vec::new(),
            acked: BTreeSet::new(),
            rollback: false,
            seen: vec![Seen::new(); CONSUMERS],
            last: HashMap::new(),
        }
    }

    fn router(lane_parts: usize) -> Router<Vec<ChangeEvent>> {
        let stall = PoisonPolicy {
            on_poison: OnPoison::Stall,
            attempts: 1,
        };
        let supervision = SupervisionConfig {
            max_restarts: u32::MAX,
            ..Default::default()
        };
        Router::with_policies((0..CONSUMERS).map(|_| (true, stall, supervision.clone())))
            .with_lane_parts(lane_parts)
    }

    /// The service restarted: nothing downstream is left but what the broker has.
    fn restart(&mut self) {
        *self = Downstream {
            seen: std::mem::take(&mut self.seen),
            last: std::mem::take(&mut self.last),
            ..Downstream::new(self.lane_rows, self.lane_parts)
        };
    }

    /// Route a batch as the Manager does (watermark-table events left out).
    fn route(&mut self, b: BatchRef, events: &[ChangeEvent], windows: &Windows) {
        let keys = row_keys(windows, events);
        let indices: Vec<usize> = (0..events.len())
            .filter(|&i| !wm_table().is(&events[i]))
            .collect();
        let parts = if indices.is_empty() {
            Vec::new()
        } else {
            (0..CONSUMERS)
                .map(|c| {
                    let part = |ix: Vec<usize>| ix.iter().map(|&i| events[i].clone()).collect();
                    let segs =
                        segments(events, indices.clone(), c == 0, self.lane_rows, &keys, part);
                    (c, segs)
                })
                .collect()
        };
        self.router.route_segments(b, parts);
    }

    /// Carry out the router's commands: the windows hear of acked and released batches as
    /// the Manager tells them.
    fn run(
        &mut self,
        windows: &mut Windows,
        outcomes: &mut Vec<(String, Outcome)>,
        confirmed: &mut HashSet<String>,
    ) {
        for cmd in self.router.take_commands() {
            match cmd {
                Command::Process {
                    slot,
                    batch,
                    seq,
                    part,
                    ..
                } => {
                    assert!(self.inbox[slot].is_none(), "two parts in consumer {slot}");
                    self.inbox[slot] = Some((batch, seq, part));
                }
                Command::RetryAfter { slot, .. } => self.retries.push(slot),
                Command::Ack(b) => {
                    self.acked.insert(b);
                    for (nonce, o) in windows.settled(b, true) {
                        confirmed.insert(nonce.clone());
                        outcomes.push((nonce, o));
                    }
                }
                Command::Rollback { .. } => self.rollback = true,
                Command::Release(b) => outcomes.extend(windows.settled(b, false)),
                Command::CancelBefore(_) => {}
            }
        }
    }

    /// Consumer `c` publishes the part in its inbox; the per-key order is checked.
    fn publish(&mut self, c: usize, seed: u64, now: Instant) {
        let Some((b, seq, part)) = self.inbox[c].take() else {
            return;
        };
        for e in &part {
            for (key, rank) in ranks(e) {
                let last = self.last.entry((c, b.epoch, key)).or_insert(rank);
                assert!(
                    *last <= rank,
                    "seed {seed}: consumer {c} got {} of key {key} (rank {rank:?}) after rank {last:?} in epoch {}",
                    e.event_type,
                    b.epoch
                );
                *last = rank;
            }
            apply_seen(&mut self.seen[c], e);
        }
        self.awaiting.push((c, b, seq));
        self.router.processed(c, b, seq, Processed::Published, now);
    }
}

/// One run: a table of `initial` rows, a writer and a backfill of chunk size `chunk` whose
/// decisions are [`Chunks`]' (the next chunk read while earlier ones wait, progress stored
/// with the next low watermark or alone), the binlog delivered in random batches acked later
/// in order, some abandoned (their publish failed: the stream comes again from the last ack
/// and the reads whose rows they carried are read again), reads whose rows were lost, reads
/// the backfill gives up on (its timeout), outcomes reaching the backfill in any order, and
/// restarts of the service (everything not stored is lost; it goes on from the stored
/// progress). After each step the invariants below are checked.
fn run(seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let cols = columns();
    let mut table: BTreeMap<i64, i64> = BTreeMap::new();
    let initial = rng.usize(0..40);
    let mut next_id = 0i64;
    for _ in 0..initial {
        next_id += rng.i64(1..4);
        table.insert(next_id, 0);
    }
    let chunk = rng.usize(1..8);
    let rate = (rng.u8(0..4) == 0).then(|| rng.f64() * 2000.0 + 100.0);
    // a per-row backfill's pace or a bulk-only one's: 1 to 4 chunks outstanding
    let pace = Pace {
        chunk,
        outstanding: rng.usize(1..=2),
        bulk_chunk: chunk,
        bulk_outstanding: rng.usize(1..=4),
    };
    let max_outstanding = pace.outstanding(rng.bool());
    let t0 = Instant::now();
    // the backfill ends at the largest key when it started (later rows come live)
    let max_key = table.keys().last().copied();
    let mut stored = Progress {
        max_key: max_key.map(|k| vec![Value::Int(k)]),
        ..Default::default()
    };
    // live changes flow at times: then a read may be smaller and slower; for a backfill whose
    // rows a bulk rule takes, a whole number of its bulks' period
    let mut live = Yield {
        rate: (rng.u8(0..3) == 0).then(|| rng.f64() * 2000.0 + 100.0),
        chunk: rng.bool().then(|| rng.usize(1..=chunk)),
    };
    let period = rng.bool().then(|| rng.usize(1..=chunk));
    if let Some(p) = period {
        live = live.bulk(p, chunk);
    }
    let mut chunks = Chunks::new(stored.clone(), chunk, rate, max_outstanding).with_yield(live);
    let mut asking = chunk; // rows the read under way asked for
    let mut log: Vec<ChangeEvent> = Vec::new();
    let mut n = 0u64;
    // now and then no writes at all: the rows' order then checks where reads start (below)
    let max_writes = if rng.u8(0..4) == 0 {
        0
    } else {
        rng.u64(50..400)
    };
    let initial_keys: Vec<i64> = table.keys().copied().collect();
    // no row of the backfill's range was ever inserted or deleted
    let mut untouched = true;
    let mut windows = Windows::new(wm_table());
    // consumer side
    let mut ds = Downstream::new(rng.usize(1..4), rng.usize(1..3));
    let mut delivered = 0usize; // log events handed to the windows (the stream's cursor)
    let mut acked = 0usize; // the cursor a redelivery restarts from
    let mut inflight: VecDeque<(BatchRef, usize)> = VecDeque::new(); // batches not acked, with their end
    let (mut epoch, mut batch_id) = (1u64, 0i64);
    // backfill side
    let mut done = stored.max_key.is_none();
    // the read under way: (nonce, the key it reads after, stage: 0 low written, 1 rows read)
    let mut read: Option<(String, Option<Key>, u8)> = None;
    // outcomes on their way to the backfill (it takes them in any order)
    let mut outcomes: Vec<(String, Outcome)> = Vec::new();
    let mut reads = 0u32;
    // the table's layout as the backfill last read it: the windows' DDL count before the
    // read, and how much of the log the read saw
    let mut layout: Option<(u64, usize)> = None;
    // per read: where its layout was read, and where its high watermark is in the log
    let mut layout_at: HashMap<String, usize> = HashMap::new();
    let mut high_at: HashMap<String, usize> = HashMap::new();
    // independent of the core: per read, the key it read after and its last key; the reads
    // whose rows were confirmed (acked)
    let mut spans: HashMap<String, (Option<i64>, Option<i64>)> = HashMap::new();
    let mut confirmed: HashSet<String> = HashSet::new();
    let mut restarts = 0;
    let mut checked: Option<Option<i64>> = None; // the stored key last checked
    let mut steps = 0u64;
    while !(done && delivered == log.len() && inflight.is_empty()) {
        steps += 1;
        assert!(
            steps < 100_000,
            "seed {seed}: no progress: done {done}, delivered {delivered}/{}, in flight {inflight:?}, inbox {:?}, awaiting {:?}, retries {:?}, router {:?}",
            log.len(),
            ds.inbox
                .iter()
                .map(|i| i.as_ref().map(|(b, s, _)| (*b, *s)))
                .collect::<Vec<_>>(),
            ds.awaiting,
            ds.retries,
            ds.router.debug_state(),
        );
        let now = t0 + Duration::from_millis(steps);
        match rng.u8(0..20) {
            // the writer (a few hundred writes at most, so the stream catches up)
            0..=2 if n < max_writes => {
                n += 1;
                if let Some(e) = write(&mut rng, &cols, &mut table, &mut next_id, n) {
                    log.push(e);
                }
                untouched &= initial_keys.iter().copied().eq(range_keys(&table, max_key));
            }
            // the backfill: one step of its read, or a new read, or progress stored alone
            3..=5 if !done => match read.clone() {
                None if chunks.may_read(now) => {
                    reads += 1;
                    let nonce = format!("r{reads}");
                    if layout.is_none() || rng.u8(0..5) == 0 {
                        layout = Some((windows.ddl_seen("db", "t"), log.len()));
                    }
                    let (ddl_seen, seen_log) = layout.unwrap();
                    layout_at.insert(nonce.clone(), seen_log);
                    windows.expect(plan(&nonce, ddl_seen));
                    let (after, asked) = chunks.begin(&nonce, now, rng.bool());
                    assert!(
                        asked >= 1 && asked <= chunk,
                        "read {nonce} asks {asked} rows"
                    );
                    // with the table's rows as they were, a read starts a whole number of
                    // bulk periods into a chunk of the grid (counted from the first row) and
                    // does not cross into the next: its bulks are those of whole chunks
                    if untouched {
                        let at = int_key(&after)
                            .map_or(0, |k| initial_keys.iter().filter(|&&i| i <= k).count());
                        let into = at % chunk;
                        assert!(
                            into + asked <= chunk,
                            "seed {seed}: read {nonce} of {asked} rows starts {into} rows into a chunk of {chunk}"
                        );
                        if let (Some(p), Some(_)) = (period, live.chunk) {
                            assert_eq!(
                                into % p,
                                0,
                                "seed {seed}: read {nonce} starts {into} rows into a chunk, not a whole number of periods of {p}"
                            );
                        }
                    }
                    asking = asked;
                    // the low watermark carries the progress not stored yet
                    if let Some((version, p)) = chunks.to_fold() {
                        stored = p;
                        chunks.stored(version);
                    }
                    n += 1;
                    log.push(wm_event("low", &nonce, n));
                    read = Some((nonce, after, 0));
                }
                None => {
                    if chunks.save_due(now)
                        && let Some((version, p)) = chunks.to_fold()
                    {
                        stored = p;
                        chunks.stored(version);
                    }
                }
                Some((nonce, after, 0)) => {
                    let after = int_key(&after);
                    let rows: Vec<Row> = table
                        .range(after.map_or(i64::MIN, |k| k + 1)..)
                        .take_while(|(k, _)| Some(**k) <= max_key)
                        .take(asking)
                        .map(|(k, v)| row(&cols, *k, *v))
                        .collect();
                    let last = rows.last().map(|r| vec![r.get("id").unwrap().clone()]);
                    spans.insert(nonce.clone(), (after, int_key(&last)));
                    chunks.read(&nonce, rows.len(), last);
                    // sometimes the rows are lost (the service restarted between SELECT and
                    // hand-over)
                    if rng.u8(0..20) != 0 {
                        windows.rows(&nonce, rows);
                    }
                    read = Some((nonce, None, 1));
                }
                Some((nonce, _, _)) => {
                    n += 1;
                    high_at.insert(nonce.clone(), log.len());
                    log.push(wm_event("high", &nonce, n));
                    chunks.high_written(&nonce);
                    read = None;
                }
            },
            // the stream: deliver a batch
            6..=8 if delivered < log.len() => {
                let size = rng.usize(1..=(log.len() - delivered).min(6));
                batch_id += 1;
                let b = BatchRef::new(epoch, batch_id);
                let batch = &log[delivered..delivered + size];
                let scan = windows.route(b, batch);
                let events = scan.events.as_deref().unwrap_or(batch);
                ds.route(b, events, &windows);
                // a read emitted saw the table's current layout: no DDL between its layout
                // read and its high watermark
                for (nonce, _, _) in &scan.emitted {
                    let (from, to) = (layout_at[nonce], high_at[nonce]);
                    assert!(
                        !log[from..to].iter().any(|e| e.is_ddl),
                        "seed {seed}: read {nonce} emitted over a DDL after its layout was read"
                    );
                }
                for (nonce, why) in scan.failed {
                    outcomes.push((nonce, Outcome::Failed(why)));
                }
                delivered += size;
                inflight.push_back((b, delivered));
            }
            // a consumer answers: its part published, or it failed (retried after a backoff)
            9 | 16 | 17 => {
                let busy: Vec<usize> = (0..CONSUMERS).filter(|&c| ds.inbox[c].is_some()).collect();
                if !busy.is_empty() {
                    let c = busy[rng.usize(0..busy.len())];
                    if rng.u8(0..30) == 0 {
                        let (b, seq, _) = ds.inbox[c].take().unwrap();
                        let error = "boom".into();
                        ds.router
                            .processed(c, b, seq, Processed::Failed { error }, now);
                    } else {
                        ds.publish(c, seed, now);
                    }
                }
            }
            // the publisher settles a part (nearly in order), now and then with a nack
            10 | 18 | 19 if !ds.awaiting.is_empty() => {
                let (c, b, seq) = ds.awaiting.remove(rng.usize(0..ds.awaiting.len().min(3)));
                let result = if rng.u8(0..100) == 0 {
                    Err(PartError::Publish(PublishError::Nacked { id: "m".into() }))
                } else {
                    Ok(())
                };
                ds.router.confirmed(c, b, seq, result);
            }
            // a consumer's retry timer fires
            14 if !ds.retries.is_empty() => {
                let c = ds.retries.swap_remove(rng.usize(0..ds.retries.len()));
                ds.router.retry(c);
            }
            // the Canal connection drops: every batch in flight is abandoned
            15 if !inflight.is_empty() && rng.u8(0..40) == 0 => ds.rollback = true,
            // the backfill takes an outcome (any of those that came)
            // (between reads: the runner reads a chunk in one go)
            11 if !outcomes.is_empty() && read.is_none() => {
                let (nonce, o) = outcomes.swap_remove(rng.usize(0..outcomes.len()));
                match o {
                    Outcome::Confirmed { emitted, dropped } => {
                        if chunks.confirmed(&nonce, emitted, dropped, now).finished {
                            // done: stored with the state
                            stored = chunks.progress().clone();
                            done = true;
                        }
                    }
                    Outcome::Failed(why) => {
                        layout = None;
                        for later in chunks.failed(&nonce, &why, now) {
                            windows.forget(&later);
                        }
                    }
                }
            }
            // the backfill gives up on a chunk it waits for (backfill.chunk_timeout)
            12 if rng.u8(0..8) == 0 && read.is_none() => {
                if let Some(nonce) = chunks.nonces().last().map(str::to_string) {
                    windows.forget(&nonce);
                    for later in chunks.failed(&nonce, "timeout", now) {
                        windows.forget(&later);
                    }
                }
            }
            // the service restarts: what is not stored is lost, the stream comes again
            // from the last ack
            13 if rng.u8(0..30) == 0 && restarts < 3 && !done => {
                restarts += 1;
                windows = Windows::new(wm_table());
                chunks = Chunks::new(stored.clone(), chunk, rate, max_outstanding).with_yield(live);
                read = None;
                layout = None;
                outcomes.clear();
                inflight.clear();
                epoch += 1;
                delivered = acked;
                ds.restart();
            }
            _ => {}
        }
        // the Manager carries the router's commands out; a rollback starts a new epoch from
        // the last ack (the connection acks in batch order)
        loop {
            ds.run(&mut windows, &mut outcomes, &mut confirmed);
            if !std::mem::take(&mut ds.rollback) {
                break;
            }
            epoch += 1;
            ds.router.reset(epoch);
            ds.acked.clear();
            inflight.clear();
            delivered = acked;
        }
        while let Some(&(b, end)) = inflight.front()
            && ds.acked.remove(&b)
        {
            inflight.pop_front();
            acked = end;
        }
        // invariants, after every step
        assert!(
            chunks.outstanding() <= max_outstanding,
            "seed {seed}: {} chunks outstanding",
            chunks.outstanding()
        );
        // at most one read between its watermarks: windows disjoint in binlog order
        assert_eq!(
            chunks.reading(),
            read.is_some(),
            "seed {seed}: the core and the read under way disagree"
        );
        // what is stored claims only confirmed chunks, in key order: its last key is reached
        // from the start through confirmed reads, each starting where the one before ended
        let claimed = int_key(&stored.last_key);
        if claimed.is_some() && checked != Some(claimed) {
            checked = Some(claimed);
            let mut reach: HashSet<Option<i64>> = HashSet::from([None]);
            loop {
                let before = reach.len();
                for (nonce, (after, last)) in &spans {
                    if confirmed.contains(nonce) && reach.contains(after) {
                        reach.insert(*last);
                    }
                }
                if reach.len() == before {
                    break;
                }
            }
            assert!(
                reach.contains(&claimed),
                "seed {seed}: stored progress claims {claimed:?}, not reached by confirmed chunks in order"
            );
        }
        // the core's progress moves only forward, and is never behind what is stored
        assert!(
            chunks.progress().chunks >= stored.chunks,
            "seed {seed}: the progress went back behind what is stored"
        );
    }
    assert!(chunks.finished() || stored.max_key.is_none(), "seed {seed}");
    for (c, seen) in ds.seen.iter().enumerate() {
        // every key the consumer knows of ends in the table's final state
        for (k, v) in seen {
            assert_eq!(
                table.get(k).copied(),
                *v,
                "seed {seed}: consumer {c}, key {k}"
            );
        }
        // and every final row was seen
        for (k, v) in &table {
            assert_eq!(
                seen.get(k),
                Some(&Some(*v)),
                "seed {seed}: row {k} never reached consumer {c}"
            );
        }
    }
}

#[test]
fn every_key_ends_in_the_tables_final_state_across_seeds() {
    let seeds: u64 = std::env::var("SNAPSHOT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    for seed in 0..seeds {
        run(seed);
    }
}

#[test]
fn while_live_changes_flow_a_read_is_smaller_and_keeps_to_the_live_rate() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let key = |i: i64| Some(vec![Value::Int(i)]);
    let p = Progress {
        max_key: key(1000),
        ..Default::default()
    };
    let live = Yield {
        rate: Some(1000.0),
        chunk: Some(100),
    };
    let mut c = Chunks::new(p.clone(), 500, None, 1).with_yield(live);
    // no live changes: the backfill's own chunk size, and no pause after it
    assert_eq!(c.begin("a", t0, false), (None, 500));
    c.read("a", 500, key(500));
    c.high_written("a");
    assert_eq!(c.confirmed("a", 500, 0, t0).chunks, 1);
    assert!(c.may_read(t0));
    // live changes: 100 rows, and the next read not before 100 ms (1000 rows/s) after it began
    assert_eq!(c.begin("b", t0, true), (key(500), 100));
    c.read("b", 100, key(600));
    c.high_written("b");
    let moved = c.confirmed("b", 100, 0, t0);
    assert!(!moved.finished, "100 rows of the 100 asked is not the end");
    assert!(!c.may_read(t0 + ms(99)));
    assert!(c.may_read(t0 + ms(100)));
    // fewer rows than that smaller chunk asked for: the last one
    assert_eq!(c.begin("c", t0 + ms(100), true), (key(600), 100));
    c.read("c", 40, key(640));
    c.high_written("c");
    let moved = c.confirmed("c", 40, 0, t0 + ms(100));
    assert!(moved.finished);
    assert_eq!(c.progress().rows_read, 640);
    assert_eq!(c.progress().chunks, 3);

    // no smaller reads (a bulk period not below the chunk, see Yield::bulk): its own chunk
    // size; the lower rate wins
    let mut c = Chunks::new(p.clone(), 500, Some(200.0), 1).with_yield(Yield {
        rate: Some(1000.0),
        chunk: None,
    });
    assert_eq!(c.begin("a", t0, true), (None, 500));
    c.read("a", 500, key(500));
    c.high_written("a");
    c.confirmed("a", 500, 0, t0);
    assert!(!c.may_read(t0 + ms(2499)), "500 rows at 200 rows/s: 2.5 s");
    assert!(c.may_read(t0 + ms(2500)));
    // its own rate is slower than the live one either way
    let mut c = Chunks::new(p, 500, Some(5000.0), 1).with_yield(live);
    assert_eq!(c.begin("a", t0, true), (None, 100));
    c.read("a", 100, key(100));
    c.high_written("a");
    c.confirmed("a", 100, 0, t0);
    assert!(
        !c.may_read(t0 + ms(99)),
        "the live rate, 1000 rows/s, is the lower"
    );
    assert!(c.may_read(t0 + ms(100)));
}

/// The rows at which bulk messages start when every read's rows are cut into bulks of
/// `max_rows` from the read's first row (a consumer that takes only SNAPSHOT rows), by ordinal.
fn bulk_starts(reads: &[usize], max_rows: usize) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = 0;
    for &n in reads {
        starts.extend((at..at + n).step_by(max_rows));
        at += n;
    }
    starts
}

#[test]
fn reads_keep_to_the_chunk_grid_so_a_yielding_bulk_backfill_cuts_the_same_bulks() {
    // while yielding, a bulk backfill reads whole periods of its bulks, at least
    // chunk_while_live; no smaller reads when that is not below its chunk
    let live = Yield {
        rate: Some(1000.0),
        chunk: Some(100),
    };
    assert_eq!(live.bulk(500, 5000).chunk, Some(500));
    assert_eq!(live.bulk(64, 5000).chunk, Some(128));
    assert_eq!(live.bulk(40, 5000).chunk, Some(120));
    assert_eq!(live.bulk(5000, 5000).chunk, None);
    assert_eq!(live.bulk(usize::MAX, 5000).chunk, None);
    assert_eq!(live.bulk(500, 5000).rate, Some(1000.0));

    // a chunk of 1000 rows, yielding reads of 300 (a bulk of 300 rows at most): a read asks
    // for the rest of the grid's chunk it starts in, or less while yielding
    let t0 = Instant::now();
    let key = |i: i64| Some(vec![Value::Int(i)]);
    let p = Progress {
        max_key: key(10_000),
        ..Default::default()
    };
    let y = Yield {
        rate: None,
        chunk: Some(300),
    };
    let mut c = Chunks::new(p.clone(), 1000, None, 2).with_yield(y);
    let mut at = 0i64;
    let mut asked = Vec::new();
    let mut step = |c: &mut Chunks, nonce: &str, live: bool, confirm: bool| {
        let (after, n) = c.begin(nonce, t0, live);
        assert_eq!(after, if at == 0 { None } else { key(at) }, "read {nonce}");
        at += n as i64;
        c.read(nonce, n, key(at));
        c.high_written(nonce);
        if confirm {
            c.confirmed(nonce, n as u64, 0, t0);
        }
        asked.push(n);
    };
    step(&mut c, "a", true, true);
    // the next read begins while "b" is outstanding: its rows count
    step(&mut c, "b", true, false);
    step(&mut c, "c", true, true);
    c.confirmed("b", 300, 0, t0);
    step(&mut c, "d", true, true); // the 100 left of the first chunk
    step(&mut c, "e", false, true); // a whole chunk
    step(&mut c, "f", true, true);
    step(&mut c, "g", false, true); // the 700 left of the third
    assert_eq!(asked, vec![300, 300, 300, 100, 1000, 300, 700]);
    assert_eq!(
        bulk_starts(&asked, 300),
        bulk_starts(&[1000, 1000, 1000], 300),
        "the same bulks as whole chunks"
    );
    // restarted from the stored progress (2300 rows read): the rest of the third chunk
    let stored = c.progress().clone();
    assert_eq!(stored.rows_read, 3000);
    let mut again = Chunks::new(
        Progress {
            rows_read: 2300,
            last_key: key(2300),
            ..stored
        },
        1000,
        None,
        1,
    )
    .with_yield(y);
    assert_eq!(again.begin("h", t0, false), (key(2300), 700));
    let mut again = Chunks::new(
        Progress {
            rows_read: 2300,
            last_key: key(2300),
            ..p
        },
        1000,
        None,
        1,
    )
    .with_yield(y);
    assert_eq!(again.begin("h", t0, true), (key(2300), 300));
}

#[test]
fn chunks_overlap_two_reads_and_store_progress_in_key_order() {
    let t0 = Instant::now();
    let key = |i: i64| Some(vec![Value::Int(i)]);
    let p = Progress {
        max_key: key(100),
        ..Default::default()
    };
    let mut c = Chunks::new(p, 10, None, 2);
    assert_eq!(c.begin("a", t0, false).0, None);
    // one read at a time: not before its high watermark is written
    assert!(!c.may_read(t0));
    c.read("a", 10, key(10));
    assert!(!c.may_read(t0));
    c.high_written("a");
    assert!(c.may_read(t0));
    assert_eq!(c.begin("b", t0, false).0, key(10));
    c.read("b", 10, key(20));
    c.high_written("b");
    // two outstanding: no third
    assert!(!c.may_read(t0));
    // b confirmed first: held until a is
    assert_eq!(c.confirmed("b", 10, 0, t0).chunks, 0);
    assert_eq!(c.to_fold(), None);
    let moved = c.confirmed("a", 9, 1, t0);
    assert_eq!((moved.chunks, moved.rows, moved.finished), (2, 20, false));
    let (version, stored) = c.to_fold().unwrap();
    assert_eq!(stored.last_key, key(20));
    assert_eq!((stored.rows_emitted, stored.rows_dropped), (19, 1));
    // not due alone right away (the next low watermark carries it), but after FOLD_WAIT
    assert!(!c.save_due(t0));
    assert!(c.save_due(t0 + chunks::FOLD_WAIT));
    c.stored(version);
    assert!(!c.save_due(t0 + chunks::FOLD_WAIT));
    // a failure rewinds to the end of the chunk before it and forgets the later ones
    c.begin("c", t0, false);
    c.read("c", 10, key(30));
    c.high_written("c");
    c.begin("d", t0, false);
    c.read("d", 10, key(40));
    c.high_written("d");
    assert_eq!(c.failed("c", "rolled back", t0), vec!["d".to_string()]);
    assert_eq!(c.confirmed("d", 10, 0, t0).chunks, 0);
    assert_eq!(c.progress().rereads, 1);
    assert_eq!(c.begin("e", t0, false).0, key(20));
    // the last chunk (short) finishes it
    c.read("e", 3, key(23));
    c.high_written("e");
    assert!(!c.may_read(t0));
    assert!(c.confirmed("e", 3, 0, t0).finished);
    assert!(c.finished());
}

#[test]
fn a_bulk_only_backfill_gets_larger_chunks_and_more_in_flight_unless_the_operator_says() {
    let pace = Pace {
        chunk: 1000,
        outstanding: 1,
        bulk_chunk: 5000,
        bulk_outstanding: 2,
    };
    assert_eq!(pace.chunk(None, false), 1000);
    assert_eq!(pace.chunk(None, true), 5000);
    // what the operator asks is what it gets
    assert_eq!(pace.chunk(Some(100), true), 100);
    assert_eq!(pace.chunk(Some(20_000), false), 20_000);
    assert_eq!(pace.outstanding(false), 1);
    assert_eq!(pace.outstanding(true), 2);
    // a bulk-only backfill never has fewer in flight than a per-row one
    let more = Pace {
        outstanding: 3,
        ..pace
    };
    assert_eq!(more.outstanding(true), 3);
}
