//! The Canal connection's batch window as a plain state machine (no I/O, no actix).
//!
//! [`BatchWindow`] knows which batches were fetched and not yet acked, in fetch order, which of
//! them the subscriber has finished, and which *abandoned* batches (of an epoch that ended with
//! a rollback or a lost session) still hold work downstream. It decides:
//! - whether another GET may be issued: batches and frame bytes in flight, abandoned ones
//!   included until the subscriber releases them, stay within `max_batches` / `max_bytes`;
//! - which acks may be written: only the finished prefix, so acks reach Canal in batch order;
//! - what an ack or release means: one for an abandoned epoch is never written to Canal;
//! - when a drain (graceful shutdown) may end: nothing of the epoch in flight and no GET on the
//!   wire, since its answer can still bring a batch ([`BatchWindow::drained`]);
//! - how the next GET asks ([`GetMode`]): while data keeps coming it takes what Canal has at once
//!   (no server-side wait), so while rows flow latency has no fixed wait in it; only after a GET
//!   showed that Canal had nothing more (it came back empty, or short: [`took_all`]) does it
//!   long-poll for the smallest batch Canal makes, which Canal answers as soon as that much data
//!   exists (or when the wait runs out, with nothing). See [`GetMode`]. Before that long poll it
//!   waits for the acks of the batches in flight, so they are written before it, not behind it
//!   ([`BatchWindow::next_get`]).
//!
//! It also watches Canal's batch ids: the server numbers the batches of one client identity
//! consecutively, so within a session a jump means another process fetched batches as the same
//! client (a second instance). [`Fetched::gap`] reports it.

use crate::event::Position;
use std::collections::{BTreeMap, VecDeque};

/// Identifies what the subscriber is handed and acks: Canal's batch id within a connection
/// epoch, and which piece of it. A batch is usually delivered whole (piece 0). A batch that
/// Canal sends again is cut where the first delivery of its rows ended (the connection core's
/// re-cut), so one Canal batch may become several pieces, and a piece may also hold the rows
/// of earlier batches: it is named after the batch its last row came from, the pieces ending
/// in one batch numbered from 0. Ordered as delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct BatchRef {
    pub epoch: u64,
    pub id: i64,
    pub piece: u32,
}

impl BatchRef {
    /// Piece 0 of batch `id`: a whole batch.
    pub fn new(epoch: u64, id: i64) -> Self {
        BatchRef {
            epoch,
            id,
            piece: 0,
        }
    }
}

impl std::fmt::Display for BatchRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.piece == 0 {
            write!(f, "{}/{}", self.epoch, self.id)
        } else {
            write!(f, "{}/{}.{}", self.epoch, self.id, self.piece)
        }
    }
}

/// A piece handed to the subscriber (or recorded as done), in delivery order.
#[derive(Debug)]
struct InFlight {
    id: i64,
    piece: u32,
    bytes: usize,
    /// The subscriber finished it (or it had nothing to deliver).
    done: bool,
    /// It was handed to the subscriber, which must release it if it is abandoned.
    delivered: bool,
    /// The Canal batches acked once this piece and every earlier one are done: those whose
    /// last row it holds (usually just its own batch; none for a piece cut from the middle of
    /// a batch).
    acks: Vec<i64>,
    /// The newest position those acks cover (with its execution time).
    last: Option<(Position, i64)>,
}

/// A fetched batch as the window recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetched {
    pub batch: BatchRef,
    /// `(expected, got)` when Canal's batch id skipped numbers: someone else fetched them.
    pub gap: Option<(i64, i64)>,
}

/// What an ack from the subscriber meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// Recorded; it is written once every earlier batch is done too.
    Recorded,
    /// The batch's epoch was abandoned: it only releases the batch.
    Abandoned,
    /// No such batch in flight.
    Unknown,
}

/// Acks ready to write, in order, and the newest position they cover.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ackable {
    pub ids: Vec<i64>,
    pub last: Option<(Position, i64)>,
}

/// How the next GET asks Canal for data.
///
/// Canal 1.1.7 (`CanalServerWithEmbedded.getWithoutAck`, `MemoryEventStoreWithBuffer.get`): a GET
/// with timeout `-1` returns at once with what is there (possibly nothing); a GET with a timeout
/// returns as soon as `fetch_size` units are unfetched (MEMSIZE mode: `fetch_size` × the
/// server's `memunit` bytes of raw entries; ITEMSIZE mode: `fetch_size` entries) and otherwise
/// waits out the timeout. So a GET that waits with the full batch size adds up to that wait to
/// every quiet-stream row, while one with size 1 is answered as soon as one unit of changes
/// exists: any transaction when the unit is smaller than one (128 bytes, or ITEMSIZE mode), a
/// lone small one only at the timeout with Canal's default 1 KiB unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetMode {
    /// Data kept coming: the full batch size, no wait.
    Drain,
    /// The last GET found nothing more: the smallest batch, waiting up to `fetch_wait` for it.
    LongPoll,
}

/// Did a GET for `asked` units take everything Canal had, judging by what came back
/// (`entry_bytes`: the size of each entry, Canal's `rawLength` of a raw entry)? Canal's store
/// (`MemoryEventStoreWithBuffer.doGet`) takes entries while it has them and, in MEMSIZE mode,
/// while the bytes taken so far are at most `asked × unit_bytes`; in ITEMSIZE mode, up to
/// `asked` entries. So an answer with fewer entries than asked and no more bytes than that
/// stopped because the store ran out: another GET right away would find (almost) nothing, and
/// the next one may as well long-poll. A cut answer has more bytes (MEMSIZE) or exactly
/// `asked` entries (ITEMSIZE). If the server's unit is larger than `unit_bytes` this never
/// says so wrongly; if it is smaller, a cut answer can look short, and the next GET long-polls
/// for the rest, which Canal answers at once as long as one unit of it is left.
pub fn took_all(
    asked: i32,
    unit_bytes: u32,
    entry_bytes: impl ExactSizeIterator<Item = usize>,
) -> bool {
    let asked = u64::try_from(asked).unwrap_or(0);
    if entry_bytes.len() as u64 >= asked {
        return false;
    }
    let taken: u64 = entry_bytes.map(|b| b as u64).sum();
    taken <= asked * u64::from(unit_bytes)
}

/// Was a GET for one unit answered with more than `unit_bytes` before its last entry? Canal's
/// store (MEMSIZE mode) takes another entry only while it has taken at most `asked × memunit`
/// bytes, so that can only happen when the server's unit is larger than `unit_bytes`
/// (`canal.mem_unit`): then GETs are that much larger than meant, and a long poll waits for
/// that much. Returns the bytes before the last entry. Only one-unit GETs are judged: in
/// ITEMSIZE mode those get one entry, so they never look like this.
pub fn server_unit_larger(
    asked: i32,
    unit_bytes: u32,
    entry_bytes: impl ExactSizeIterator<Item = usize>,
) -> Option<u64> {
    if asked != 1 || entry_bytes.len() < 2 {
        return None;
    }
    let n = entry_bytes.len();
    let before_last: u64 = entry_bytes.take(n - 1).map(|b| b as u64).sum();
    (before_last > u64::from(unit_bytes)).then_some(before_last)
}

/// Watches short answers for the mark of a Canal memunit *smaller* than `canal.mem_unit`
/// (the case [`server_unit_larger`] cannot see). Canal's store (MEMSIZE mode) stops taking
/// entries once it has taken more than `asked × memunit` bytes, so an answer it cut there has
/// `asked × memunit` in `[bytes before its last entry, all its bytes)`. With a smaller server
/// unit every answer is cut that way while rows wait, yet looks short by our unit
/// ([`took_all`]): each GET brings `mem_unit / memunit` times less than `canal.batch_size`
/// means, and nothing else shows it.
///
/// An answer counts only if it holds no more bytes than our unit allows, has two entries or
/// more but not exactly `asked` (which could be a full ITEMSIZE answer), and does not end at a
/// transaction's end: Canal's parser puts whole transactions into its store, so a
/// store that ran out ends at one (a cut lands there only by chance). The bounds of every
/// counted answer must agree on one unit smaller than ours ([`Self::ANSWERS`] in a row, of at
/// least two different sizes: a large transaction that the parser hands over in equal pieces
/// can also run the store out mid-transaction, always at the same size); an answer that does not
/// agree starts the count again.
#[derive(Debug, Clone, Default)]
pub struct SmallUnitProbe {
    /// The server unit's bounds (bytes, inclusive) the counted answers agree on.
    bounds: Option<(u64, u64)>,
    counted: u32,
    /// Some counted answer's size differed from the first one's.
    sizes_differ: bool,
    first_size: u64,
    named: bool,
}

impl SmallUnitProbe {
    /// Agreeing answers in a row before the unit is named.
    pub const ANSWERS: u32 = 8;

    /// Judge one answer: `ends_transaction` says whether its last entry is a transaction's end.
    /// Returns the server unit's bounds in bytes, once, when they are known to be below
    /// `unit_bytes`.
    pub fn observe(
        &mut self,
        asked: i32,
        unit_bytes: u32,
        entry_bytes: impl ExactSizeIterator<Item = usize>,
        ends_transaction: bool,
    ) -> Option<(u64, u64)> {
        let n = entry_bytes.len();
        let Ok(asked) = u64::try_from(asked) else {
            return None;
        };
        if self.named || asked == 0 || n < 2 || ends_transaction || n as u64 == asked {
            // `asked` entries may be a full ITEMSIZE answer
            return None;
        }
        // one pass, no allocation: this runs on every answer
        let (total, last) = entry_bytes.fold((0u64, 0u64), |(t, _), b| (t + b as u64, b as u64));
        if total > asked * u64::from(unit_bytes) {
            // cut by our unit, or more: the server's is not smaller
            return None;
        }
        let before_last = total - last;
        // asked × unit in [before_last, total): the unit in [⌈before_last/asked⌉, ⌊(total-1)/asked⌋]
        let (lo, hi) = (before_last.div_ceil(asked), (total - 1) / asked);
        if lo > hi {
            // no whole unit could have cut it there: not a cut answer
            *self = SmallUnitProbe::default();
            return None;
        }
        let agreed = self
            .bounds
            .map(|(l, h)| (l.max(lo), h.min(hi)))
            .filter(|(l, h)| l <= h);
        match agreed {
            Some(b) => {
                self.bounds = Some(b);
                self.counted += 1;
                self.sizes_differ |= total != self.first_size;
            }
            None => {
                self.bounds = Some((lo, hi));
                self.counted = 1;
                self.sizes_differ = false;
                self.first_size = total;
            }
        }
        let (lo, hi) = self.bounds?;
        if self.counted >= Self::ANSWERS && self.sizes_differ && hi < u64::from(unit_bytes) {
            self.named = true;
            return Some((lo, hi));
        }
        None
    }
}

/// The batch window. See the module docs.
#[derive(Debug)]
pub struct BatchWindow {
    max_batches: usize,
    max_bytes: usize,
    epoch: u64,
    inflight: VecDeque<InFlight>,
    inflight_bytes: usize,
    /// Abandoned pieces still downstream: their bytes and how many Canal batches they ack.
    abandoned: BTreeMap<BatchRef, (usize, usize)>,
    abandoned_bytes: usize,
    abandoned_count: usize,
    /// Canal batches the pieces in flight ack.
    inflight_count: usize,
    /// The last batch id fetched in this session.
    last_id: Option<i64>,
    /// The last answered GET found nothing more.
    idle: bool,
    /// Counts the times the window became idle; names the current idle period.
    idle_period: u64,
    /// In this idle period the long poll no longer waits for the acks in flight.
    ack_wait_over: bool,
    /// A GET of this epoch was written and its answer is not recorded yet: it may bring a batch.
    get_outstanding: bool,
    /// The batch id and piece number of the last piece recorded in this epoch.
    last_piece: Option<(i64, u32)>,
    /// Batches (and their bytes) whose rows the core holds back, not yet recorded as pieces
    /// ([`Self::set_held`]).
    held_batches: usize,
    held_bytes: usize,
}

impl BatchWindow {
    pub fn new(max_batches: usize, max_bytes: usize) -> Self {
        BatchWindow {
            max_batches: max_batches.max(1),
            max_bytes: max_bytes.max(1),
            epoch: 0,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            abandoned: BTreeMap::new(),
            abandoned_bytes: 0,
            abandoned_count: 0,
            inflight_count: 0,
            last_id: None,
            idle: false,
            idle_period: 0,
            ack_wait_over: false,
            get_outstanding: false,
            last_piece: None,
            held_batches: 0,
            held_bytes: 0,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Batches fetched in this epoch and not yet acked, held ones included. (A batch cut into
    /// pieces counts once, with the piece that acks it.)
    pub fn inflight_batches(&self) -> usize {
        self.inflight_count + self.held_batches
    }

    pub fn inflight_bytes(&self) -> usize {
        self.inflight_bytes + self.held_bytes
    }

    /// Frame bytes of the batches whose rows are held back ([`Self::set_held`]).
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Do the held batches alone fill the window (so no GET may be issued until they go)?
    pub fn held_full(&self) -> bool {
        self.held_batches >= self.max_batches || self.held_bytes >= self.max_bytes
    }

    /// The core holds back the rows of `batches` fetched batches (`bytes` of frames) until
    /// more come (its re-cut): they count against the bounds like recorded ones (the core
    /// stops holding when they alone fill the window).
    pub fn set_held(&mut self, batches: usize, bytes: usize) {
        self.held_batches = batches;
        self.held_bytes = bytes;
    }

    /// Batches of abandoned epochs the subscriber still works on.
    pub fn abandoned_batches(&self) -> usize {
        self.abandoned_count
    }

    pub fn abandoned_bytes(&self) -> usize {
        self.abandoned_bytes
    }

    /// True if nothing is in flight (abandoned work included).
    pub fn is_empty(&self) -> bool {
        self.inflight.is_empty() && self.abandoned.is_empty()
    }

    /// True if nothing of the current epoch is in flight.
    pub fn current_is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    /// A GET was written. Until [`Self::get_answered`] (or the epoch ends) a batch may still
    /// arrive, so the window is not [`Self::drained`].
    pub fn get_sent(&mut self) {
        self.get_outstanding = true;
    }

    /// The GET's answer came back (the shell records its batch next, if it has one).
    pub fn get_answered(&mut self) {
        self.get_outstanding = false;
    }

    /// A drain (graceful shutdown) may end: nothing of this epoch is in flight, and no GET is
    /// out whose answer could still bring a batch (one written just before the drain began;
    /// the drain writes no new ones). Ending with one out would stop the publisher before its
    /// batch is published: it would be fetched and not acked.
    pub fn drained(&self) -> bool {
        self.inflight.is_empty() && !self.get_outstanding
    }

    /// May another GET be issued?
    pub fn may_fetch(&self) -> bool {
        self.inflight_batches() + self.abandoned_count < self.max_batches
            && self.inflight_bytes() + self.abandoned_bytes < self.max_bytes
    }

    /// The GET to issue next, if one may be issued now ([`Self::may_fetch`]).
    ///
    /// A long poll holds the session until Canal answers it (up to `fetch_wait`), and acks
    /// written behind it wait as long; should the session die meanwhile, confirmed rows come
    /// again. So while batches of this epoch are in flight (their confirms typically a
    /// millisecond away) the long poll waits for their acks, which then go out in the same
    /// turn as the poll, until [`Self::end_ack_wait`] says it waited long enough (`ack_wait`:
    /// a batch stuck downstream must not stop the fetching, and one whose confirms take long,
    /// like a backfill chunk's, must not hold up the live rows behind it).
    pub fn next_get(&self) -> Option<GetMode> {
        if !self.may_fetch() {
            None
        } else if !self.idle {
            Some(GetMode::Drain)
        } else if self.inflight.is_empty() || self.ack_wait_over {
            Some(GetMode::LongPoll)
        } else {
            None
        }
    }

    /// The long poll is waiting for the acks in flight: the idle period to pass to
    /// [`Self::end_ack_wait`] when the wait should end.
    pub fn waiting_for_acks(&self) -> Option<u64> {
        (self.may_fetch() && self.idle && !self.inflight.is_empty() && !self.ack_wait_over)
            .then_some(self.idle_period)
    }

    /// The long poll of idle period `period` has waited long enough for acks: issue it. (A
    /// later period is not affected.)
    pub fn end_ack_wait(&mut self, period: u64) {
        if self.idle && period == self.idle_period {
            self.ack_wait_over = true;
        }
    }

    /// The last answered GET showed Canal had nothing more (the next one long-polls).
    pub fn is_idle(&self) -> bool {
        self.idle
    }

    /// An answered GET showed Canal had nothing more (empty, or [`took_all`]): the next one
    /// long-polls. After [`Self::fetched`] for a batch, which assumes more may be waiting.
    pub fn caught_up(&mut self) {
        if !self.idle {
            self.idle_period += 1;
            self.ack_wait_over = false;
        }
        self.idle = true;
    }

    /// End the current epoch (rollback or lost session): everything in flight is abandoned and
    /// will be redelivered by Canal. Returns the new epoch and how many batches were abandoned.
    /// `new_session` also forgets the batch-id sequence (a new session may restart it).
    pub fn begin_epoch(&mut self, new_session: bool) -> (u64, usize) {
        let abandoned = self.inflight_count;
        self.inflight_count = 0;
        for b in self.inflight.drain(..) {
            if b.delivered && !b.done {
                let key = BatchRef {
                    epoch: self.epoch,
                    id: b.id,
                    piece: b.piece,
                };
                self.abandoned.insert(key, (b.bytes, b.acks.len()));
                self.abandoned_bytes += b.bytes;
                self.abandoned_count += b.acks.len();
            }
        }
        self.inflight_bytes = 0;
        // the answer of a GET still on the wire belongs to the old epoch
        self.get_outstanding = false;
        self.epoch += 1;
        self.last_piece = None;
        self.held_batches = 0;
        self.held_bytes = 0;
        // redelivery starts at once: Canal has the rolled-back batches ready
        self.idle = false;
        if new_session {
            self.last_id = None;
        }
        (self.epoch, abandoned)
    }

    /// Record a fetched, non-empty batch. `deliver` is false when it has nothing for the
    /// subscriber (only transaction boundaries): it is then done at once.
    pub fn fetched(
        &mut self,
        id: i64,
        bytes: usize,
        last: Option<(Position, i64)>,
        deliver: bool,
    ) -> Fetched {
        let gap = self.observe_id(id);
        let batch = self.piece(id, bytes, vec![id], last, deliver);
        Fetched { batch, gap }
    }

    /// Record one piece cut from fetched batches (the connection core's re-cut; their ids were
    /// observed with [`Self::observe_id`]): its last row came from batch `id`; `acks` are the
    /// batches to ack once it and every earlier piece are done, `last` the newest position
    /// they cover; `deliver` as for [`Self::fetched`].
    pub fn piece(
        &mut self,
        id: i64,
        bytes: usize,
        acks: Vec<i64>,
        last: Option<(Position, i64)>,
        deliver: bool,
    ) -> BatchRef {
        let piece = match self.last_piece {
            Some((last, n)) if last == id => n + 1,
            _ => 0,
        };
        self.last_piece = Some((id, piece));
        self.inflight_count += acks.len();
        self.inflight.push_back(InFlight {
            id,
            piece,
            bytes,
            done: !deliver,
            delivered: deliver,
            acks,
            last,
        });
        self.inflight_bytes += bytes;
        BatchRef {
            epoch: self.epoch,
            id,
            piece,
        }
    }

    /// Record a fetched batch that must not be acked until the operator decides (it could not
    /// be decoded): it holds every later ack back until [`Self::ack`] is called for it.
    pub fn hold(&mut self, id: i64, bytes: usize) -> BatchRef {
        self.observe_id(id);
        let batch = self.piece(id, bytes, vec![id], None, false);
        if let Some(b) = self.inflight.back_mut() {
            // not done until the operator decides, and nothing downstream to release
            b.done = false;
        }
        batch
    }

    /// Would batch id `id` be a jump in this session's sequence? (`(expected, got)`, as
    /// [`Fetched::gap`]; nothing is recorded.)
    pub fn gap(&self, id: i64) -> Option<(i64, i64)> {
        match self.last_id {
            Some(prev) if id != prev + 1 => Some((prev + 1, id)),
            _ => None,
        }
    }

    /// Note a batch id Canal handed out in this session (also one whose batch is discarded);
    /// returns `(expected, got)` if ids were skipped.
    pub fn observe_id(&mut self, id: i64) -> Option<(i64, i64)> {
        // a batch came: more may be waiting, take it without waiting
        self.idle = false;
        let gap = self.gap(id);
        self.last_id = Some(id);
        gap
    }

    /// The subscriber finished `batch`: every trigger of it is confirmed.
    pub fn ack(&mut self, batch: BatchRef) -> AckOutcome {
        if batch.epoch != self.epoch {
            self.release(batch);
            return AckOutcome::Abandoned;
        }
        match self
            .inflight
            .iter_mut()
            .find(|b| b.id == batch.id && b.piece == batch.piece)
        {
            Some(b) => {
                b.done = true;
                AckOutcome::Recorded
            }
            None => AckOutcome::Unknown,
        }
    }

    /// The subscriber holds nothing of the abandoned `batch` any more.
    pub fn release(&mut self, batch: BatchRef) -> bool {
        match self.abandoned.remove(&batch) {
            Some((bytes, count)) => {
                self.abandoned_bytes -= bytes;
                self.abandoned_count -= count;
                true
            }
            None => false,
        }
    }

    /// Pop the finished prefix: these acks may be written now, in this order. (Popped before
    /// the write: if the write fails the session is dropped and the epoch abandoned, so Canal
    /// redelivers them anyway.)
    pub fn take_ackable(&mut self) -> Ackable {
        let mut out = Ackable::default();
        while self.inflight.front().is_some_and(|b| b.done) {
            let Some(b) = self.inflight.pop_front() else {
                break;
            };
            self.inflight_bytes -= b.bytes;
            self.inflight_count -= b.acks.len();
            out.ids.extend(b.acks);
            if b.last.is_some() {
                out.last = b.last;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_get_on_the_wire_keeps_a_drain_from_ending() {
        let mut w = BatchWindow::new(8, 1 << 20);
        assert!(w.drained());
        w.get_sent();
        assert!(!w.drained(), "its answer may bring a batch");
        w.get_answered();
        let a = w.fetched(1, 10, None, true).batch;
        assert!(!w.drained(), "a batch in flight");
        w.ack(a);
        assert_eq!(w.take_ackable().ids, vec![1]);
        assert!(w.drained());
        // a GET out when the epoch ends: its answer belongs to the old epoch and is dropped
        w.get_sent();
        w.begin_epoch(false);
        assert!(w.drained());
    }

    #[test]
    fn acks_leave_in_fetch_order() {
        let mut w = BatchWindow::new(8, 1 << 20);
        let a = w.fetched(1, 10, None, true).batch;
        let b = w.fetched(2, 10, None, true).batch;
        assert_eq!(w.ack(b), AckOutcome::Recorded);
        assert!(w.take_ackable().ids.is_empty());
        assert_eq!(w.ack(a), AckOutcome::Recorded);
        assert_eq!(w.take_ackable().ids, vec![1, 2]);
        assert!(w.is_empty());
    }

    #[test]
    fn abandoned_batches_count_against_the_bounds_until_released() {
        let mut w = BatchWindow::new(2, 1 << 20);
        let a = w.fetched(1, 10, None, true).batch;
        w.fetched(2, 10, None, false);
        assert!(!w.may_fetch());
        let (epoch, n) = w.begin_epoch(false);
        assert_eq!((epoch, n), (1, 2));
        // batch 2 had nothing downstream; batch 1 still has work there
        assert_eq!(w.abandoned_batches(), 1);
        w.fetched(3, 10, None, true);
        assert!(!w.may_fetch());
        assert_eq!(w.ack(a), AckOutcome::Abandoned);
        assert!(w.may_fetch());
    }

    #[test]
    fn only_a_get_after_an_empty_one_waits() {
        let mut w = BatchWindow::new(2, 1 << 20);
        assert_eq!(w.next_get(), Some(GetMode::Drain));
        w.caught_up();
        assert_eq!(w.next_get(), Some(GetMode::LongPoll));
        w.caught_up();
        assert_eq!(w.next_get(), Some(GetMode::LongPoll));
        // the long poll was answered with data: drain without waiting
        let a = w.fetched(1, 10, None, true).batch;
        assert_eq!(w.next_get(), Some(GetMode::Drain));
        w.fetched(2, 10, None, true);
        assert_eq!(w.next_get(), None, "window full");
        w.ack(a);
        w.take_ackable();
        assert_eq!(w.next_get(), Some(GetMode::Drain));
        w.caught_up();
        // a rollback: Canal redelivers at once
        w.begin_epoch(false);
        assert_eq!(w.next_get(), Some(GetMode::Drain));
    }

    #[test]
    fn a_short_answer_means_canal_had_nothing_more() {
        // MEMSIZE, 800 units of 128 bytes (100 KiB): Canal takes entries while it has taken at
        // most 102,400 bytes, so an answer within that ran out of entries...
        assert!(took_all(800, 128, [109, 400, 57].into_iter()));
        assert!(took_all(800, 128, [102_000, 400].into_iter()));
        // ...and one past it may have been cut (the entry that crossed the budget is the last)
        assert!(!took_all(800, 128, [102_000, 401].into_iter()));
        assert!(!took_all(800, 128, [50_000, 50_000, 30_000].into_iter()));
        // the long poll's one unit: BEGIN + ROW crossed 128 bytes, the END may be left
        assert!(!took_all(1, 128, [109, 125].into_iter()));
        // one entry for one unit could be a full ITEMSIZE answer: not taken as short
        assert!(!took_all(1, 128, [57].into_iter()));
        // ITEMSIZE (unit left at 1024): `asked` entries is a full answer whatever their size
        assert!(!took_all(100, 1024, [10; 100].into_iter()));
        assert!(took_all(100, 1024, [10; 99].into_iter()));
        // nothing asked (never sent) is never short
        assert!(!took_all(0, 1024, [].into_iter()));
        // the window long-polls after a short answer (once its batch is acked), drains after
        // a full one
        let mut w = BatchWindow::new(8, 1 << 20);
        let a = w.fetched(1, 600, None, true).batch;
        assert_eq!(w.next_get(), Some(GetMode::Drain));
        w.caught_up();
        w.ack(a);
        assert_eq!(w.take_ackable().ids, [1]);
        assert_eq!(w.next_get(), Some(GetMode::LongPoll));
        w.fetched(2, 600, None, true);
        assert_eq!(w.next_get(), Some(GetMode::Drain));
    }

    #[test]
    fn the_long_poll_waits_for_the_acks_in_flight_until_told_not_to() {
        let mut w = BatchWindow::new(8, 1 << 20);
        let a = w.fetched(1, 10, None, true).batch;
        let b = w.fetched(2, 10, None, true).batch;
        w.caught_up();
        // caught up, two batches unconfirmed: no GET (their acks would wait behind it)
        assert_eq!(w.next_get(), None);
        let period = w.waiting_for_acks().expect("waiting");
        w.ack(a);
        assert_eq!(w.take_ackable().ids, [1]);
        assert_eq!(w.next_get(), None, "one still in flight");
        // the last ack: it goes out with the long poll
        w.ack(b);
        assert_eq!(w.take_ackable().ids, [2]);
        assert_eq!(w.waiting_for_acks(), None);
        assert_eq!(w.next_get(), Some(GetMode::LongPoll));

        // a batch stuck downstream: the wait ends when the shell says so, and an empty long
        // poll does not start it again
        let stuck = w.fetched(3, 10, None, true).batch;
        w.caught_up();
        let p2 = w.waiting_for_acks().expect("waiting");
        assert_ne!(p2, period, "a new idle period");
        w.end_ack_wait(period); // a timer of the earlier period changes nothing
        assert_eq!(w.next_get(), None);
        w.end_ack_wait(p2);
        assert_eq!(w.waiting_for_acks(), None);
        assert_eq!(w.next_get(), Some(GetMode::LongPoll));
        w.caught_up();
        assert_eq!(w.next_get(), Some(GetMode::LongPoll));
        // data again, then caught up again: a new wait
        w.fetched(4, 10, None, true);
        assert_eq!(w.next_get(), Some(GetMode::Drain));
        w.caught_up();
        assert_eq!(w.next_get(), None);
        // a rollback: Canal redelivers at once
        w.begin_epoch(false);
        assert_eq!(w.next_get(), Some(GetMode::Drain));
        assert_eq!(w.ack(stuck), AckOutcome::Abandoned);
    }

    #[test]
    fn a_long_poll_answer_past_one_unit_shows_a_larger_server_unit() {
        // Canal at 128-byte units, the service told so: BEGIN (109) then the row crossed it
        assert_eq!(server_unit_larger(1, 128, [109, 125].into_iter()), None);
        // Canal at 1 KiB units, the service told 128: four small transactions before the last
        assert_eq!(
            server_unit_larger(1, 128, [109, 125, 57, 109, 125, 57, 109].into_iter()),
            Some(582)
        );
        // one entry (ITEMSIZE, or a big entry alone) and drain GETs are never judged
        assert_eq!(server_unit_larger(1, 128, [5000].into_iter()), None);
        assert_eq!(server_unit_larger(800, 128, [60_000; 3].into_iter()), None);
    }

    #[test]
    fn a_jump_in_batch_ids_is_reported() {
        let mut w = BatchWindow::new(8, 1 << 20);
        assert_eq!(w.fetched(5, 1, None, true).gap, None);
        assert_eq!(w.fetched(7, 1, None, true).gap, Some((6, 7)));
        w.begin_epoch(true);
        assert_eq!(w.fetched(1, 1, None, true).gap, None);
    }

    /// Canal's MEMSIZE store answering a GET for `asked` units of `unit` bytes from `store`
    /// (entry size, ends a transaction): it takes entries while it has taken at most
    /// `asked × unit` bytes.
    fn canal_get(store: &mut VecDeque<(usize, bool)>, asked: u64, unit: u64) -> Vec<(usize, bool)> {
        let mut taken = 0u64;
        let mut out = Vec::new();
        while taken <= asked * unit
            && let Some(e) = store.pop_front()
        {
            taken += e.0 as u64;
            out.push(e);
        }
        out
    }

    /// Transactions of 1-20 rows of 80-400 bytes between a BEGIN and an END.
    fn transactions(rng: &mut fastrand::Rng, n: usize) -> VecDeque<(usize, bool)> {
        let mut store = VecDeque::new();
        for _ in 0..n {
            store.push_back((rng.usize(55..70), false));
            for _ in 0..rng.usize(1..=20) {
                store.push_back((rng.usize(80..=400), false));
            }
            store.push_back((rng.usize(45..60), true));
        }
        store
    }

    /// Feeds `answers` to a probe; the bounds it names, if any.
    fn probe(answers: &[Vec<(usize, bool)>], asked: u64, unit: u32) -> Option<(u64, u64)> {
        let mut p = SmallUnitProbe::default();
        let mut named = None;
        for a in answers {
            let ends = a.last().is_some_and(|e| e.1);
            if let Some(b) = p.observe(asked as i32, unit, a.iter().map(|e| e.0), ends) {
                assert!(named.is_none(), "named twice");
                named = Some(b);
            }
        }
        named
    }

    #[test]
    fn a_server_unit_smaller_than_ours_is_named_from_a_backlog() {
        for seed in 0..200 {
            let mut rng = fastrand::Rng::with_seed(seed);
            // canal.mem_unit 1024 asks 64 units for 64 KiB; the server's are 128 or 256 bytes
            for server in [128u64, 256] {
                let mut store = transactions(&mut rng, 400);
                let mut answers = Vec::new();
                while !store.is_empty() {
                    answers.push(canal_get(&mut store, 64, server));
                }
                let (lo, hi) = probe(&answers, 64, 1024)
                    .unwrap_or_else(|| panic!("seed {seed}: a {server}-byte unit not named"));
                assert!(lo <= server && server <= hi, "seed {seed}: {lo}..={hi}");
            }
        }
    }

    #[test]
    fn a_server_unit_like_ours_or_larger_is_never_named() {
        for seed in 0..200 {
            let mut rng = fastrand::Rng::with_seed(seed);
            for server in [1024u64, 4096] {
                let mut store = transactions(&mut rng, 400);
                let mut answers = Vec::new();
                while !store.is_empty() {
                    answers.push(canal_get(&mut store, 64, server));
                }
                assert_eq!(
                    probe(&answers, 64, 1024),
                    None,
                    "seed {seed}, unit {server}"
                );
            }
        }
    }

    #[test]
    fn a_store_that_runs_out_is_not_taken_for_a_small_unit() {
        for seed in 0..200 {
            let mut rng = fastrand::Rng::with_seed(seed);
            // the parser hands over whole transactions, one to three between two GETs
            let answers: Vec<Vec<(usize, bool)>> = (0..300)
                .map(|_| {
                    let n = rng.usize(1..=3);
                    transactions(&mut rng, n).into_iter().collect()
                })
                .collect();
            assert_eq!(probe(&answers, 64, 1024), None, "seed {seed}");
            // a large transaction handed over in pieces of 1,024 rows: each answer ends inside
            // it, all of one size when its rows are...
            let same: Vec<Vec<(usize, bool)>> = (0..30).map(|_| vec![(100, false); 1024]).collect();
            assert_eq!(probe(&same, 4096, 1024), None);
            // ...and of many sizes when they are not
            let mixed: Vec<Vec<(usize, bool)>> = (0..30)
                .map(|_| (0..1024).map(|_| (rng.usize(80..=400), false)).collect())
                .collect();
            assert_eq!(probe(&mixed, 4096, 1024), None, "seed {seed}");
        }
    }

    #[test]
    fn each_guard_of_the_probe_is_needed() {
        // steady one-row transactions, one per answer: their bounds agree (on a unit of about
        // 3 bytes); only their ending at a transaction's end keeps them from counting
        let mut rng = fastrand::Rng::with_seed(7);
        let steady: Vec<Vec<(usize, bool)>> = (0..30)
            .map(|_| vec![(60, false), (rng.usize(80..=100), false), (50, true)])
            .collect();
        assert_eq!(probe(&steady, 64, 1024), None);
        let unmarked: Vec<Vec<(usize, bool)>> = steady
            .iter()
            .map(|a| a.iter().map(|e| (e.0, false)).collect())
            .collect();
        assert!(probe(&unmarked, 64, 1024).is_some());
        // identical answers that end inside a transaction agree with each other whatever cut
        // them; only answers of different sizes show a unit
        let same: Vec<Vec<(usize, bool)>> = (0..30).map(|_| vec![(200, false); 5]).collect();
        assert_eq!(probe(&same, 4, 1024), None);
        let mut varied = same.clone();
        varied[29] = vec![
            (190, false),
            (200, false),
            (200, false),
            (200, false),
            (200, false),
        ];
        assert_eq!(probe(&varied, 4, 1024), Some((200, 247)));
    }

    #[test]
    fn itemsize_answers_are_not_judged() {
        // ITEMSIZE: `asked` entries, whatever their bytes
        let full: Vec<Vec<(usize, bool)>> = (0..30)
            .map(|i| (0..64).map(|j| (100 + (i + j) % 7, false)).collect())
            .collect();
        assert_eq!(probe(&full, 64, 1024), None);
    }
}
