//! Unit tests of the connection core.
use super::*;

#[derive(Debug)]
struct Raw(i64, usize);
impl RawView for Raw {
    fn batch_id(&self) -> i64 {
        self.0
    }
    fn frame_bytes(&self) -> usize {
        self.1 * 100
    }
    fn asked(&self) -> i32 {
        10
    }
    fn entry_sizes(&self) -> impl ExactSizeIterator<Item = usize> + '_ {
        (0..self.1).map(|_| 100)
    }
}

#[derive(Debug)]
struct Rows(Vec<(Position, i64)>);
impl EventsView for Rows {
    fn count(&self) -> usize {
        self.0.len()
    }
    fn key(&self, i: usize) -> (&Position, i64) {
        (&self.0[i].0, self.0[i].1)
    }
    fn drop_first(&mut self, n: usize) {
        self.0.drain(..n);
    }
    fn split_off(&mut self, n: usize) -> Self {
        Rows(self.0.split_off(n))
    }
    fn append(&mut self, mut more: Self) {
        self.0.append(&mut more.0)
    }
}

fn pos(file: &str, offset: u64) -> Position {
    Position {
        log_file: file.into(),
        offset,
        row_index: 0,
        server_id: 1,
        gtid: None,
    }
}

fn rows(offsets: std::ops::Range<u64>) -> Rows {
    Rows(
        offsets
            .map(|o| (pos("mysql-bin.000002", o), o as i64))
            .collect(),
    )
}

fn core() -> (ConnectionCore<Raw, Rows>, Instant) {
    let cfg = CoreConfig {
        server: "canal:11111".into(),
        destination: "example".into(),
        client_id: "1001".into(),
        filter: ".*".into(),
        fetch_size: 10,
        mem_unit: 100,
        fetch_wait: Duration::from_millis(100),
        ack_wait: Duration::from_millis(20),
        max_inflight_batches: 8,
        max_inflight_bytes: 1 << 20,
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(1),
        fail_fast: false,
        jitter_seed: 1,
    };
    let now = Instant::now();
    let mut c = ConnectionCore::new(cfg, false);
    c.on(now, Input::Start);
    c.on(
        now,
        Input::Connected {
            generation: 0,
            filter: ".*".into(),
        },
    );
    c.take_actions();
    (c, now)
}

/// Answer the GET on the wire with `raw`, decode it into `events`; the delivered batch.
fn fetch(
    c: &mut ConnectionCore<Raw, Rows>,
    now: Instant,
    raw: Raw,
    events: Rows,
) -> Option<(BatchRef, usize)> {
    fetch_all(c, now, raw, events)
        .first()
        .map(|&(batch, _, n)| (batch, n))
}

/// The ack ids of the operation the core runs next, if it acks.
fn acks(c: &mut ConnectionCore<Raw, Rows>) -> Vec<i64> {
    c.take_actions()
        .into_iter()
        .find_map(|a| match a {
            Action::Run {
                op: Op::Ack { ids, .. },
                ..
            } => Some(ids),
            _ => None,
        })
        .unwrap_or_default()
}

#[test]
fn positions_compare_within_one_binlog_only() {
    let a = pos("mysql-bin.000002", 500);
    assert!(not_after(&a, &a));
    assert!(not_after(&pos("mysql-bin.000002", 400), &a));
    assert!(not_after(&pos("mysql-bin.000001", 900), &a));
    assert!(!not_after(&pos("mysql-bin.000003", 4), &a));
    // another stem or another server: never "before"
    assert!(!not_after(&pos("other-bin.000001", 4), &a));
    let mut other = pos("mysql-bin.000001", 4);
    other.server_id = 2;
    assert!(!not_after(&other, &a));
    // rows of one event
    let mut later_row = a.clone();
    later_row.row_index = 1;
    assert!(!not_after(&later_row, &a));
}

/// The acks `ids` were written (no GET behind them).
fn written(c: &mut ConnectionCore<Raw, Rows>, now: Instant, ids: Vec<i64>) {
    c.on(
        now,
        Input::Done {
            generation: c.generation(),
            done: Done::Acked { ids, fetched: None },
        },
    );
}

#[test]
fn rows_sent_again_at_or_before_the_confirmed_position_are_acked_not_delivered() {
    let (mut c, now) = core();
    // rows 10..15 delivered, confirmed, acked
    let (b, n) = fetch(&mut c, now, Raw(1, 5), rows(10..15)).unwrap();
    assert_eq!(n, 5);
    c.on(now, Input::Ack(b));
    assert_eq!(acks(&mut c), vec![1]);
    assert_eq!(c.confirmed().unwrap().0.offset, 14);
    written(&mut c, now, vec![1]);
    // Canal restarts from an older cursor: rows 12..14 again, then new rows 15..17
    reconnect(&mut c, now);
    // entirely old: acked, nothing delivered, and the guard does not move back
    assert_eq!(fetch(&mut c, now, Raw(1, 3), rows(12..15)), None);
    assert_eq!(acks(&mut c), vec![1]);
    assert_eq!(c.confirmed().unwrap().0.offset, 14);
    written(&mut c, now, vec![1]);
    // partly old: only the new rows go on
    let (_, n) = fetch(&mut c, now, Raw(2, 4), rows(13..17)).unwrap();
    assert_eq!(n, 2, "rows 15 and 16");
    assert_eq!(c.snapshot().rewind_skipped, 5);
}

#[test]
fn a_batch_whose_id_jumped_is_not_left_waiting_for_a_release() {
    let (mut c, now) = core();
    let (b, _) = fetch(&mut c, now, Raw(1, 1), rows(1..2)).unwrap();
    c.on(now, Input::Ack(b));
    c.take_actions();
    // batch 5 after batch 1: someone else fetched 2..4
    assert_eq!(fetch(&mut c, now, Raw(5, 1), rows(2..3)), None);
    assert_eq!(c.state(), ConnectionState::Conflict);
    assert_eq!(
        c.window().abandoned_batches(),
        0,
        "nothing downstream holds it"
    );
}

/// `skip` answers in types: nothing stalled, another token, then what it passed; the texts
/// are the command's answers.
#[test]
fn skip_answers_what_it_passed_or_why_not() {
    let (mut c, now) = core();
    assert_eq!(c.skip(now, "batch:3"), Err(SkipError::NotStalled));
    // batch 3 cannot be decoded: held, and the stream stalls at it
    let epoch = c.window().epoch();
    c.on(
        now,
        Input::Done {
            generation: c.generation(),
            done: Done::Fetched {
                epoch,
                raw: Raw(3, 2),
            },
        },
    );
    let raw = c.take_actions().into_iter().find_map(|a| match a {
        Action::Decode { raw, .. } => Some(raw),
        _ => None,
    });
    c.on(
        now,
        Input::Decoded {
            epoch,
            raw: raw.expect("a decode of batch 3"),
            outcome: Decoded::Undecodable("entry 1: malformed header".into()),
        },
    );
    assert_eq!(c.state(), ConnectionState::Stalled);
    let wrong = c.skip(now, "batch:4").expect_err("another token");
    assert_eq!(
        wrong,
        SkipError::OtherToken {
            stalled: "batch:3".into(),
            given: "batch:4".into(),
        }
    );
    assert_eq!(
        wrong.to_string(),
        "the stream is stalled at batch:3, not batch:4; nothing was skipped"
    );
    assert_eq!(c.state(), ConnectionState::Stalled);
    let done = c.skip(now, "batch:3").expect("skips the held batch");
    assert_eq!(
        done,
        Skipped::Batch {
            token: "batch:3".into()
        }
    );
    assert_eq!(done.to_string(), "skipped batch:3");
    assert_eq!(c.state(), ConnectionState::Connected);
    assert_eq!(acks(&mut c), vec![3], "acked without being delivered");
}

/// With `fail_fast`, a definite failure at the first connect gives up with that failure;
/// a transient one is retried.
#[test]
fn fail_fast_gives_up_on_a_definite_failure_only() {
    let failed = |kind| {
        let mut cfg = core().0.cfg.clone();
        cfg.fail_fast = true;
        let now = Instant::now();
        let mut c: ConnectionCore<Raw, Rows> = ConnectionCore::new(cfg, false);
        c.on(now, Input::Start);
        c.take_actions();
        let failure = Failure {
            kind,
            message: "authentication failed".into(),
        };
        c.on(
            now,
            Input::Failed {
                generation: c.generation(),
                failure,
            },
        );
        c.take_actions()
    };
    let fatal = failed(FailureKind::Definite);
    assert!(
        matches!(fatal.as_slice(), [Action::Fatal(f)] if f.kind == FailureKind::Definite
            && f.to_string() == "authentication failed"),
        "{fatal:?}"
    );
    let retried = failed(FailureKind::Transient);
    assert!(
        !retried.iter().any(|a| matches!(a, Action::Fatal(_))),
        "{retried:?}"
    );
}

/// Answer the GET on the wire with `raw`, decode it into `events`: every piece delivered, as
/// (batch, first offset, rows).
fn fetch_all(
    c: &mut ConnectionCore<Raw, Rows>,
    now: Instant,
    raw: Raw,
    events: Rows,
) -> Vec<(BatchRef, u64, usize)> {
    let epoch = c.window().epoch();
    c.on(
        now,
        Input::Done {
            generation: c.generation(),
            done: Done::Fetched { epoch, raw },
        },
    );
    let Some(raw) = c.take_actions().into_iter().find_map(|a| match a {
        Action::Decode { raw, .. } => Some(raw),
        _ => None,
    }) else {
        return Vec::new();
    };
    c.on(
        now,
        Input::Decoded {
            epoch,
            raw,
            outcome: Decoded::Events(events),
        },
    );
    let actions = c.take_actions();
    let out = actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver { batch, events, .. } => {
                Some((*batch, events.key(0).0.offset, events.count()))
            }
            _ => None,
        })
        .collect();
    c.actions = actions;
    out
}

/// The session drops and a new one is up (Canal redelivers everything not acked).
fn reconnect(c: &mut ConnectionCore<Raw, Rows>, now: Instant) {
    c.on(
        now,
        Input::Failed {
            generation: c.generation(),
            failure: Failure {
                kind: FailureKind::Transient,
                message: "canal closed the connection".into(),
            },
        },
    );
    c.on(now, Input::Timer(Timer::Reconnect));
    c.on(
        now,
        Input::Connected {
            generation: c.generation(),
            filter: ".*".into(),
        },
    );
    c.take_actions();
}

#[test]
fn rows_sent_again_are_delivered_in_the_pieces_they_were_first_delivered_in() {
    let (mut c, now) = core();
    // first delivery: rows 10..15 and 15..20, neither acked
    let first = fetch_all(&mut c, now, Raw(1, 5), rows(10..15));
    let second = fetch_all(&mut c, now, Raw(2, 5), rows(15..20));
    assert_eq!((first.len(), second.len()), (1, 1));
    reconnect(&mut c, now);
    // Canal cuts the same rows as 10..13 and 13..20: the first is held back, the second brings
    // the rest, and the two deliveries of the first time come out
    assert_eq!(fetch_all(&mut c, now, Raw(1, 3), rows(10..13)), vec![]);
    assert_eq!(c.held_rows(), 3);
    let again = fetch_all(&mut c, now, Raw(2, 7), rows(13..20));
    let pieces: Vec<(u64, usize)> = again.iter().map(|d| (d.1, d.2)).collect();
    assert_eq!(pieces, vec![(10, 5), (15, 5)]);
    assert_eq!(c.held_rows(), 0);
    // both batches are acked with the last piece, the one that ends where batch 2 ends
    c.on(now, Input::Ack(again[1].0));
    assert_eq!(
        acks(&mut c),
        Vec::<i64>::new(),
        "the first piece is not confirmed yet"
    );
    c.on(now, Input::Ack(again[0].0));
    assert_eq!(acks(&mut c), vec![1, 2]);
    assert_eq!(c.confirmed().unwrap().0.offset, 19);
    assert!(c.cuts().is_empty(), "acked ends are forgotten");
}

#[test]
fn a_batch_sent_again_whole_is_split_where_its_rows_were_first_delivered() {
    let (mut c, now) = core();
    fetch_all(&mut c, now, Raw(1, 5), rows(10..15));
    fetch_all(&mut c, now, Raw(2, 2), rows(15..17));
    reconnect(&mut c, now);
    let again = fetch_all(&mut c, now, Raw(1, 9), rows(10..19));
    let pieces: Vec<(BatchRef, u64, usize)> = again.clone();
    assert_eq!(
        pieces.iter().map(|d| (d.1, d.2)).collect::<Vec<_>>(),
        vec![(10, 5), (15, 2), (17, 2)]
    );
    // named after batch 1, pieces 0..2, in delivery order
    assert_eq!(
        pieces.iter().map(|d| d.0.piece).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    for d in &again {
        c.on(now, Input::Ack(d.0));
    }
    assert_eq!(acks(&mut c), vec![1]);
}

#[test]
fn held_rows_go_as_they_are_when_a_long_poll_finds_nothing_more() {
    let (mut c, now) = core();
    fetch_all(&mut c, now, Raw(1, 5), rows(10..15));
    reconnect(&mut c, now);
    assert_eq!(fetch_all(&mut c, now, Raw(1, 2), rows(10..12)), vec![]);
    // a short answer: the next GET is a long poll for the rest (the window is idle)
    assert!(c.window().is_idle());
    let epoch = c.window().epoch();
    assert_eq!(c.recut_flushes(), 0);
    // long polls that find nothing: after a few, the rest is taken as not coming
    for _ in 0..recut::EMPTY_POLLS {
        assert_eq!(c.held_rows(), 2);
        c.on(
            now,
            Input::Done {
                generation: c.generation(),
                done: Done::Fetched {
                    epoch,
                    raw: Raw(-1, 0),
                },
            },
        );
    }
    assert_eq!(c.held_rows(), 0);
    assert_eq!(c.recut_flushes(), 1);
    let delivered: Vec<(u64, usize)> = c
        .take_actions()
        .iter()
        .filter_map(|a| match a {
            Action::Deliver { events, .. } => Some((events.key(0).0.offset, events.count())),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, vec![(10, 2)]);
}

/// Caught up with a batch in flight, the long poll waits `ack_wait` for its ack, then goes out
/// without it: it does not wait `fetch_wait`, since a batch whose confirms take long (a
/// backfill chunk's rows ride in one) would hold up every row behind it that long.
#[test]
fn caught_up_with_a_batch_unconfirmed_the_long_poll_waits_ack_wait_for_its_ack() {
    let (mut c, now) = core();
    // a short answer: Canal had nothing more, and the batch is not confirmed yet
    assert_eq!(fetch_all(&mut c, now, Raw(1, 2), rows(10..12)).len(), 1);
    assert!(c.window().is_idle());
    let actions = c.take_actions();
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Run { .. })),
        "no GET while the ack may still come: {actions:?}"
    );
    let waits: Vec<(Timer, Duration)> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Timer { timer, after } => Some((*timer, *after)),
            _ => None,
        })
        .collect();
    let [(timer @ Timer::AckWait(_), after)] = waits[..] else {
        panic!("one ack wait armed: {actions:?}");
    };
    assert_eq!(
        after,
        Duration::from_millis(20),
        "canal.ack_wait, not fetch_wait"
    );
    // the wait ends: the long poll goes out without the ack
    c.on(now + after, Input::Timer(timer));
    let ops: Vec<Op> = c
        .take_actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::Run { op, .. } => Some(op),
            _ => None,
        })
        .collect();
    assert!(
        matches!(ops[..], [Op::Get { size: 1, wait, .. }] if wait == Duration::from_millis(100)),
        "{ops:?}"
    );
}
