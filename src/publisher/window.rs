//! The publisher's confirm window as a plain state machine (no I/O, no actix, no lapin).
//!
//! [`ConfirmWindow`] decides what is published next, what a confirm, a return, a nack, a
//! timeout or a lost connection means, and when a job (one `Publish`) is answered. The AMQP
//! session (`session.rs`) turns channel events into calls on it and its answers into replies;
//! the delivery simulation (`tests/delivery_sim.rs`) drives it the same way with a fake broker.
//!
//! Rules it enforces:
//! - messages are published in job arrival order, at most `max_unconfirmed` unconfirmed;
//! - a job is answered `Ok` only when every one of its messages was acked and none was returned;
//!   it is answered at its first failure (return, nack, timeout, lost connection);
//! - every job belongs to a Canal *epoch* (a connection or rollback generation). A job of a newer
//!   epoch, or [`ConfirmWindow::cancel_before`], cancels every unpublished message of older
//!   epochs: that work was abandoned upstream and will be redelivered, so publishing it would
//!   only add duplicates and let stale rows overtake their redelivered predecessors;
//! - a failure settles the whole epoch: once a message of epoch `e` failed, nothing else of epoch
//!   `e` (or older) is published, so a worker never sees row r4 before the redelivered r3;
//! - a channel that nacked a publish is in doubt: nothing more is published on it; once its last
//!   publish settled the window asks for a new channel
//!   ([`ConfirmWindow::wants_new_channel`]) and publishing goes on after
//!   [`ConfirmWindow::channel_renewed`]. A channel's state at the broker can go stale: on
//!   RabbitMQ 3.x a channel whose first publish to a quorum queue met a dead leader nacks every
//!   later publish to it, for as long as the channel lives; a new channel asks for the leader
//!   again. (A lost confirm does not: the broker is slow, blocked or without a majority, and a
//!   new channel would not help; opening one on a blocked connection waits for the block);
//! - returns are matched to the exact publish (its sequence number, carried on the wire in a
//!   header), never by message id: the same id is legitimately in flight twice when a batch is
//!   redelivered while its first copy still awaits its confirm.
//!
//! Time is an input (`now`), so the window is deterministic under test.

use super::PublishError;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Identifies one `Publish` within a window.
pub type JobNo = u64;

/// What the window needs to know about a message.
pub trait Outgoing {
    /// The message's deterministic id (for error messages).
    fn id(&self) -> &str;
}

/// How a published message ended, as the broker said.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Acked,
    Nacked,
    Returned {
        returned: super::Returned,
        /// The route itself is fine and may come back (our own queue was deleted and is
        /// being declared again): fail like a nack. Otherwise the message is unroutable as
        /// configured and its job reports it with [`PublishError::Unroutable`].
        transient: bool,
    },
}

/// A published message awaiting its confirm.
#[derive(Debug)]
struct Unconfirmed {
    seq: u64,
    job: JobNo,
    id: String,
    deadline: Instant,
    published_at: Instant,
    outcome: Option<Outcome>,
}

#[derive(Debug)]
struct JobState<M> {
    no: JobNo,
    epoch: u64,
    /// Not yet published, in order.
    pending: VecDeque<M>,
    /// Published and not yet settled.
    unsettled: usize,
    /// Answered already (with an error, or cancelled).
    answered: bool,
    /// Messages the broker returned as unroutable (definite): reported when the job ends.
    unroutable: Vec<super::Returned>,
}

/// Counters the window keeps; the publisher's status carries them as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WindowStats {
    /// Messages handed to the channel (lapin queues them for writing).
    pub published: u64,
    /// Messages acked by the broker without being returned.
    pub confirmed: u64,
    /// Messages the broker returned as unroutable.
    pub returned: u64,
    pub nacked: u64,
    /// Messages without a confirm within `confirm_timeout`.
    pub timeouts: u64,
    /// Messages still unconfirmed when the channel or connection was lost.
    pub lost: u64,
    /// Confirms that arrived after their message had timed out.
    pub late_confirms: u64,
    /// Publishing channels replaced after a nack.
    #[serde(default)]
    pub renewed_channels: u64,
    /// Accepted messages never published because their Canal epoch was abandoned (a rollback
    /// or reconnect; Canal redelivers those rows) or an earlier message of it failed.
    #[serde(default)]
    pub cancelled: u64,
    /// Messages not published because their route is known to be broken (an exchange deleted
    /// while the service runs, [`super::routes`]): reported as unroutable, so they are parked.
    #[serde(default)]
    pub refused: u64,
}

/// A settled failure, for the session's log line.
#[derive(Debug, Clone)]
pub struct Settled {
    pub job: JobNo,
    pub error: PublishError,
}

/// The confirm window. See the module docs.
#[derive(Debug)]
pub struct ConfirmWindow<M> {
    max_unconfirmed: usize,
    confirm_timeout: Duration,
    /// Jobs of epochs below this are cancelled.
    floor: u64,
    jobs: VecDeque<JobState<M>>,
    inflight: VecDeque<Unconfirmed>,
    next_job: JobNo,
    next_seq: u64,
    replies: Vec<(JobNo, Result<(), PublishError>)>,
    failures: Vec<Settled>,
    stats: WindowStats,
    /// The channel nacked a publish: nothing more goes out on it.
    in_doubt: bool,
}

impl<M: Outgoing> ConfirmWindow<M> {
    pub fn new(max_unconfirmed: usize, confirm_timeout: Duration) -> Self {
        ConfirmWindow {
            max_unconfirmed: max_unconfirmed.max(1),
            confirm_timeout,
            floor: 0,
            jobs: VecDeque::new(),
            inflight: VecDeque::new(),
            next_job: 0,
            next_seq: 0,
            replies: Vec::new(),
            failures: Vec::new(),
            stats: WindowStats::default(),
            in_doubt: false,
        }
    }

    /// Count on from `stats` (the totals of the connections before this one), so the
    /// publisher's counters cover the whole process, not one connection.
    pub fn counting_from(mut self, stats: WindowStats) -> Self {
        self.stats = stats;
        self
    }

    /// Queue a job of `epoch`. A job of an epoch below the floor is answered `Cancelled` at
    /// once; a job of a newer epoch raises the floor (cancelling older unpublished work).
    pub fn submit(&mut self, epoch: u64, messages: Vec<M>) -> JobNo {
        let no = self.next_job;
        self.next_job += 1;
        if epoch < self.floor {
            self.stats.cancelled += messages.len() as u64;
            self.replies
                .push((no, Err(PublishError::Cancelled { epoch })));
            return no;
        }
        if epoch > self.floor {
            self.cancel_before(epoch);
        }
        if messages.is_empty() {
            self.replies.push((no, Ok(())));
            return no;
        }
        self.jobs.push_back(JobState {
            no,
            epoch,
            pending: messages.into(),
            unsettled: 0,
            answered: false,
            unroutable: Vec::new(),
        });
        no
    }

    /// Cancel every unpublished message of epochs below `epoch` and answer their jobs
    /// `Cancelled`. Messages already published still await their confirms (they count against
    /// the window) but no longer hold an answer back.
    pub fn cancel_before(&mut self, epoch: u64) {
        if epoch <= self.floor {
            return;
        }
        self.floor = epoch;
        self.cancel_where(|e| e < epoch);
    }

    fn cancel_where(&mut self, old: impl Fn(u64) -> bool) {
        for job in self.jobs.iter_mut().filter(|j| old(j.epoch)) {
            self.stats.cancelled += job.pending.len() as u64;
            job.pending.clear();
            if !job.answered {
                job.answered = true;
                self.replies
                    .push((job.no, Err(PublishError::Cancelled { epoch: job.epoch })));
            }
        }
        self.drop_finished();
    }

    /// The caller of `job` went away: publish nothing more of it.
    pub fn abandon(&mut self, job: JobNo) {
        if let Some(j) = self.jobs.iter_mut().find(|j| j.no == job) {
            self.stats.cancelled += j.pending.len() as u64;
            j.pending.clear();
            j.answered = true;
        }
        self.drop_finished();
    }

    /// True while the window has room for another publish (and the channel is trusted).
    pub fn has_room(&self) -> bool {
        self.inflight.len() < self.max_unconfirmed && !self.in_doubt
    }

    /// The channel nacked and nothing is in flight on it any more: the
    /// caller should open a new channel and call [`Self::channel_renewed`] (or
    /// [`Self::connection_lost`] if it cannot).
    pub fn wants_new_channel(&self) -> bool {
        self.in_doubt && self.inflight.is_empty()
    }

    /// A new channel replaced the one in doubt: publishing goes on.
    pub fn channel_renewed(&mut self) {
        debug_assert!(self.inflight.is_empty(), "renewed with publishes in flight");
        if self.in_doubt {
            self.in_doubt = false;
            self.stats.renewed_channels += 1;
        }
    }

    /// The next message to publish, if the window has room. The caller must publish it (or
    /// report [`Self::connection_lost`]); its confirm is then expected under `seq`.
    pub fn poll_publish(&mut self, now: Instant) -> Option<(u64, M)> {
        self.poll_publish_or_refuse(now, |_| None)
    }

    /// [`Self::poll_publish`], but a message for which `refuse` gives a [`super::Returned`]
    /// (its route is known to be broken) is not published: its job reports it as unroutable
    /// when it ends, exactly like a message the broker returned, and the next one is taken.
    pub fn poll_publish_or_refuse(
        &mut self,
        now: Instant,
        mut refuse: impl FnMut(&M) -> Option<super::Returned>,
    ) -> Option<(u64, M)> {
        if !self.has_room() {
            return None;
        }
        let (job, msg) = loop {
            let job = self.jobs.iter_mut().find(|j| !j.pending.is_empty())?;
            let msg = job.pending.pop_front()?;
            match refuse(&msg) {
                None => break (job, msg),
                Some(returned) => {
                    // not logged per message: the session said once that the route broke
                    self.stats.refused += 1;
                    job.unroutable.push(returned);
                    self.drop_finished();
                }
            }
        };
        job.unsettled += 1;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.inflight.push_back(Unconfirmed {
            seq,
            job: job.no,
            id: msg.id().to_string(),
            deadline: now + self.confirm_timeout,
            published_at: now,
            outcome: None,
        });
        self.stats.published += 1;
        Some((seq, msg))
    }

    fn find(&mut self, seq: u64) -> Option<&mut Unconfirmed> {
        let first = self.inflight.front()?.seq;
        self.inflight.get_mut(seq.checked_sub(first)? as usize)
    }

    /// The broker acked (`ack`) or nacked the publish `seq` (and, with `multiple`, every
    /// earlier one). Call [`Self::settle`] afterwards.
    pub fn on_confirm(&mut self, seq: u64, ack: bool, multiple: bool) {
        let outcome = if ack { Outcome::Acked } else { Outcome::Nacked };
        if !ack {
            self.in_doubt = true;
        }
        if multiple {
            let mut any = false;
            for f in self.inflight.iter_mut().filter(|f| f.seq <= seq) {
                any = true;
                if f.outcome.is_none() {
                    f.outcome = Some(outcome.clone());
                }
            }
            if !any {
                self.stats.late_confirms += 1;
            }
            return;
        }
        match self.find(seq) {
            // a return recorded for this publish wins over its ack
            Some(f) if f.outcome.is_none() => f.outcome = Some(outcome),
            Some(_) => {}
            None => self.stats.late_confirms += 1,
        }
    }

    /// The broker returned the publish `seq` as unroutable (a return always precedes the
    /// publish's own ack). `transient`: see `Outcome::Returned`. Returns false if that
    /// publish is no longer in flight.
    pub fn on_return(
        &mut self,
        seq: u64,
        exchange: &str,
        routing_key: &str,
        reason: &str,
        transient: bool,
    ) -> bool {
        match self.find(seq) {
            Some(f) => {
                let returned = super::Returned {
                    id: f.id.clone(),
                    exchange: exchange.to_string(),
                    routing_key: routing_key.to_string(),
                    reason: reason.to_string(),
                };
                f.outcome = Some(Outcome::Returned {
                    returned,
                    transient,
                });
                true
            }
            None => {
                self.stats.returned += 1;
                false
            }
        }
    }

    /// Settle from the front of the window: decided publishes, and those past their deadline.
    /// Publishes settle in publish order, so answers keep arrival order.
    pub fn settle(&mut self, now: Instant) {
        while let Some(front) = self.inflight.front() {
            if front.outcome.is_none() && front.deadline > now {
                break;
            }
            let Some(f) = self.inflight.pop_front() else {
                break;
            };
            let err = match f.outcome {
                Some(Outcome::Acked) => {
                    self.stats.confirmed += 1;
                    None
                }
                Some(Outcome::Returned {
                    returned,
                    transient,
                }) => {
                    self.stats.returned += 1;
                    if !transient {
                        self.unroutable(f.job, returned);
                        continue;
                    }
                    Some(PublishError::Returned(returned))
                }
                Some(Outcome::Nacked) => {
                    self.stats.nacked += 1;
                    Some(PublishError::Nacked { id: f.id })
                }
                None => {
                    self.stats.timeouts += 1;
                    Some(PublishError::ConfirmTimeout {
                        id: f.id,
                        timeout: self.confirm_timeout,
                    })
                }
            };
            self.settle_one(f.job, err);
        }
        self.drop_finished();
    }

    /// A definite return: the job goes on (its other messages are fine) and reports it at the
    /// end; nothing else is cancelled, so other consumers are not disturbed.
    fn unroutable(&mut self, job: JobNo, returned: super::Returned) {
        let Some(j) = self.jobs.iter_mut().find(|j| j.no == job) else {
            return;
        };
        j.unsettled = j.unsettled.saturating_sub(1);
        self.failures.push(Settled {
            job,
            error: PublishError::Returned(returned.clone()),
        });
        j.unroutable.push(returned);
    }

    fn settle_one(&mut self, job: JobNo, err: Option<PublishError>) {
        let Some(j) = self.jobs.iter_mut().find(|j| j.no == job) else {
            return;
        };
        j.unsettled = j.unsettled.saturating_sub(1);
        let Some(e) = err else { return };
        let epoch = j.epoch;
        if !j.answered {
            j.answered = true;
            self.failures.push(Settled {
                job,
                error: e.clone(),
            });
            self.replies.push((job, Err(e)));
        }
        // The whole epoch rolls back: nothing more of it (or older) may be published.
        self.cancel_where(|e| e <= epoch);
    }

    /// Answer `Ok` to finished jobs at the front, and forget answered ones with nothing in
    /// flight.
    fn drop_finished(&mut self) {
        while let Some(front) = self.jobs.front() {
            if !front.pending.is_empty() || front.unsettled > 0 {
                break;
            }
            let Some(job) = self.jobs.pop_front() else {
                break;
            };
            if !job.answered {
                let result = if job.unroutable.is_empty() {
                    Ok(())
                } else {
                    Err(PublishError::Unroutable {
                        returned: job.unroutable,
                    })
                };
                self.replies.push((job.no, result));
            }
        }
    }

    /// The channel or connection is gone: every unsettled publish is lost and every job is
    /// answered with `ConnectionLost`.
    pub fn connection_lost(&mut self, reason: &str) {
        self.stats.lost += self.inflight.len() as u64;
        for job in self.jobs.drain(..) {
            if !job.answered {
                let unconfirmed = self.inflight.iter().filter(|f| f.job == job.no).count();
                self.replies.push((
                    job.no,
                    Err(PublishError::ConnectionLost {
                        unconfirmed,
                        reason: reason.to_string(),
                    }),
                ));
            }
        }
        self.inflight.clear();
        // whatever comes next comes on a new channel
        self.in_doubt = false;
    }

    /// Answers decided since the last call, in the order they were decided.
    pub fn take_replies(&mut self) -> Vec<(JobNo, Result<(), PublishError>)> {
        std::mem::take(&mut self.replies)
    }

    /// Failures settled since the last call (for logging).
    pub fn take_failures(&mut self) -> Vec<Settled> {
        std::mem::take(&mut self.failures)
    }

    /// When the oldest undecided publish times out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.inflight
            .front()
            .filter(|f| f.outcome.is_none())
            .map(|f| f.deadline)
    }

    /// When the oldest unconfirmed publish was written (for "no confirm for N s").
    pub fn oldest_unconfirmed_at(&self) -> Option<Instant> {
        self.inflight.front().map(|f| f.published_at)
    }

    pub fn unconfirmed(&self) -> usize {
        self.inflight.len()
    }

    /// Messages accepted and not yet published.
    pub fn queued(&self) -> usize {
        self.jobs.iter().map(|j| j.pending.len()).sum()
    }

    /// Nothing queued, nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.jobs.is_empty() && self.inflight.is_empty()
    }

    pub fn stats(&self) -> &WindowStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct M(&'static str);
    impl Outgoing for M {
        fn id(&self) -> &str {
            self.0
        }
    }

    fn t0() -> Instant {
        Instant::now()
    }

    fn publish_all(w: &mut ConfirmWindow<M>, now: Instant) -> Vec<(u64, M)> {
        std::iter::from_fn(|| w.poll_publish(now)).collect()
    }

    #[test]
    fn a_job_is_answered_only_when_every_message_is_acked() {
        let now = t0();
        let mut w = ConfirmWindow::new(8, Duration::from_secs(5));
        let job = w.submit(1, vec![M("a"), M("b")]);
        let sent = publish_all(&mut w, now);
        assert_eq!(sent.len(), 2);
        w.on_confirm(sent[0].0, true, false);
        w.settle(now);
        assert!(w.take_replies().is_empty());
        w.on_confirm(sent[1].0, true, false);
        w.settle(now);
        assert_eq!(
            w.take_replies(),
            vec![(job, Ok(()))].into_iter().collect::<Vec<_>>()
        );
    }

    /// After a nack nothing more goes out on that channel; once its last publish settled the
    /// window asks for a new channel, and publishing goes on after it is renewed. A lost
    /// confirm does not ask for one; a lost connection brings a new channel anyway.
    #[test]
    fn a_channel_that_nacked_is_replaced_before_anything_else_goes_out() {
        let now = t0();
        let timeout = Duration::from_secs(5);
        let mut w = ConfirmWindow::new(8, timeout);
        w.submit(1, vec![M("a"), M("b")]);
        let sent = publish_all(&mut w, now);
        w.on_confirm(sent[1].0, false, false);
        w.submit(2, vec![M("a"), M("b"), M("c")]);
        assert!(
            w.poll_publish(now).is_none(),
            "published on a channel that nacked"
        );
        assert!(
            !w.wants_new_channel(),
            "renewal asked with a publish in flight"
        );
        w.on_confirm(sent[0].0, true, false);
        w.settle(now);
        assert!(w.wants_new_channel());
        w.channel_renewed();
        assert_eq!(w.stats().renewed_channels, 1);
        let sent = publish_all(&mut w, now);
        assert_eq!(sent.len(), 3);

        // a lost confirm: the epoch fails, the channel stays
        w.on_confirm(sent[0].0, true, false);
        w.settle(now + timeout + Duration::from_millis(1));
        assert_eq!(w.stats().timeouts, 2);
        assert!(!w.wants_new_channel());
        w.submit(3, vec![M("d")]);
        assert_eq!(publish_all(&mut w, now).len(), 1);

        // a nack, then the connection goes: its new channel is trusted
        w.submit(4, vec![M("e"), M("f")]);
        let sent = publish_all(&mut w, now);
        w.on_confirm(sent[0].0, false, false);
        w.connection_lost("gone");
        assert!(!w.wants_new_channel());
        w.submit(5, vec![M("g")]);
        assert_eq!(publish_all(&mut w, now).len(), 1);
    }

    /// A message whose route is known broken is not published; its job goes on with the
    /// others and reports it as unroutable at its end (so it is parked upstream), and jobs of
    /// other routes are answered Ok.
    #[test]
    fn refused_messages_are_reported_unroutable_without_being_published() {
        let now = t0();
        let mut w = ConfirmWindow::new(8, Duration::from_secs(5));
        let mixed = w.submit(1, vec![M("ok-1"), M("gone-1"), M("ok-2")]);
        let healthy = w.submit(1, vec![M("ok-3")]);
        let refuse = |m: &M| {
            m.0.starts_with("gone").then(|| crate::publisher::Returned {
                id: m.0.to_string(),
                exchange: "cc_gone".into(),
                routing_key: "k".into(),
                reason: "exchange 'cc_gone' is gone".into(),
            })
        };
        let sent: Vec<(u64, M)> =
            std::iter::from_fn(|| w.poll_publish_or_refuse(now, refuse)).collect();
        let ids: Vec<&str> = sent.iter().map(|(_, m)| m.0).collect();
        assert_eq!(ids, ["ok-1", "ok-2", "ok-3"]);
        assert_eq!((w.stats().published, w.stats().refused), (3, 1));
        for (seq, _) in &sent {
            w.on_confirm(*seq, true, false);
        }
        w.settle(now);
        let replies = w.take_replies();
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[0].0, mixed);
        match &replies[0].1 {
            Err(PublishError::Unroutable { returned }) => {
                let ids: Vec<&str> = returned.iter().map(|r| r.id.as_str()).collect();
                assert_eq!(ids, ["gone-1"]);
            }
            other => panic!("expected Unroutable, got {other:?}"),
        }
        assert_eq!(replies[1], (healthy, Ok(())));
        // a job of refused messages only is answered at once
        let only = w.submit(1, vec![M("gone-2")]);
        assert_eq!(w.poll_publish_or_refuse(now, refuse), None);
        let replies = w.take_replies();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].0, only);
        assert!(matches!(replies[0].1, Err(PublishError::Unroutable { .. })));
        assert!(w.is_idle());
    }

    #[test]
    fn the_window_bounds_unconfirmed_publishes() {
        let now = t0();
        let mut w = ConfirmWindow::new(2, Duration::from_secs(5));
        w.submit(1, vec![M("a"), M("b"), M("c")]);
        assert_eq!(publish_all(&mut w, now).len(), 2);
        w.on_confirm(0, true, true);
        w.on_confirm(1, true, true);
        w.settle(now);
        assert_eq!(publish_all(&mut w, now).len(), 1);
    }

    #[test]
    fn a_return_fails_the_exact_copy_even_when_its_id_is_in_flight_twice() {
        let now = t0();
        let mut w = ConfirmWindow::new(8, Duration::from_secs(5));
        let old = w.submit(1, vec![M("same")]);
        let (old_seq, _) = w.poll_publish(now).unwrap();
        let new = w.submit(2, vec![M("same")]);
        let (new_seq, _) = w.poll_publish(now).unwrap();
        assert_ne!(old_seq, new_seq);
        // the old job was cancelled by the newer epoch (its copy is still in flight)
        assert!(matches!(
            w.take_replies().as_slice(),
            [(j, Err(PublishError::Cancelled { .. }))] if *j == old
        ));
        w.on_confirm(old_seq, true, false);
        assert!(w.on_return(new_seq, "", "q", "312 NO_ROUTE", true));
        w.on_confirm(new_seq, true, false);
        w.settle(now);
        let replies = w.take_replies();
        assert!(
            matches!(replies.as_slice(), [(j, Err(PublishError::Returned(_)))] if *j == new),
            "{replies:?}"
        );
    }

    #[test]
    fn an_unroutable_message_is_reported_at_the_end_of_its_job_and_disturbs_nothing_else() {
        let now = t0();
        let mut w = ConfirmWindow::new(8, Duration::from_secs(5));
        let a = w.submit(1, vec![M("a1"), M("a2")]);
        let b = w.submit(1, vec![M("b1")]);
        let sent = publish_all(&mut w, now);
        assert_eq!(sent.len(), 3);
        assert!(w.on_return(sent[0].0, "nope", "k", "312 NO_ROUTE", false));
        for (seq, _) in &sent {
            w.on_confirm(*seq, true, false);
        }
        w.settle(now);
        let replies = w.take_replies();
        assert_eq!(replies.len(), 2, "{replies:?}");
        match &replies[0] {
            (j, Err(PublishError::Unroutable { returned })) if *j == a => {
                assert_eq!(returned.len(), 1);
                assert_eq!(returned[0].id, "a1");
                assert_eq!(returned[0].exchange, "nope");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(replies[1], (j, Ok(())) if j == b));
    }

    #[test]
    fn a_failure_stops_every_later_publish_of_its_epoch() {
        let now = t0();
        let mut w = ConfirmWindow::new(1, Duration::from_secs(5));
        let a = w.submit(3, vec![M("r3")]);
        let b = w.submit(3, vec![M("r4")]);
        let (s, _) = w.poll_publish(now).unwrap();
        w.on_confirm(s, false, false);
        w.settle(now);
        assert!(
            w.poll_publish(now).is_none(),
            "r4 must not leave after r3 failed"
        );
        let replies = w.take_replies();
        assert!(matches!(replies[0], (j, Err(PublishError::Nacked { .. })) if j == a));
        assert!(matches!(replies[1], (j, Err(PublishError::Cancelled { .. })) if j == b));
    }

    /// `amqp.confirm_timeout` counts from each message's own publish: a confirm in the last
    /// moment of it is in time; a publish without a confirm fails exactly `confirm_timeout`
    /// after it went out and not a moment before (`next_deadline` is the instant the session
    /// sleeps until), whatever the publishes before it did.
    #[test]
    fn a_publish_times_out_exactly_confirm_timeout_after_it_went_out_not_before() {
        let timeout = Duration::from_secs(5);
        let moment = Duration::from_nanos(1);
        let now = t0();
        let mut w = ConfirmWindow::new(8, timeout);
        let a = w.submit(1, vec![M("a")]);
        let (a_seq, _) = w.poll_publish(now).unwrap();
        let later = now + Duration::from_secs(2);
        let b = w.submit(1, vec![M("b")]);
        w.poll_publish(later).unwrap();
        assert_eq!(w.next_deadline(), Some(now + timeout));
        w.on_confirm(a_seq, true, false);
        w.settle(now + timeout - moment);
        assert_eq!(w.take_replies(), vec![(a, Ok(()))]);
        assert_eq!(w.next_deadline(), Some(later + timeout));
        w.settle(now + timeout);
        w.settle(later + timeout - moment);
        assert!(w.take_replies().is_empty());
        assert_eq!(w.unconfirmed(), 1);
        w.settle(later + timeout);
        assert_eq!(
            w.take_replies(),
            vec![(
                b,
                Err(PublishError::ConfirmTimeout {
                    id: "b".into(),
                    timeout
                })
            )]
        );
        assert_eq!((w.stats().confirmed, w.stats().timeouts), (1, 1));
    }

    #[test]
    fn timeouts_settle_in_order_and_late_confirms_are_counted() {
        let now = t0();
        let mut w = ConfirmWindow::new(4, Duration::from_secs(1));
        let job = w.submit(1, vec![M("a")]);
        let (s, _) = w.poll_publish(now).unwrap();
        assert_eq!(w.next_deadline(), Some(now + Duration::from_secs(1)));
        w.settle(now + Duration::from_secs(2));
        assert!(matches!(
            w.take_replies().as_slice(),
            [(j, Err(PublishError::ConfirmTimeout { .. }))] if *j == job
        ));
        w.on_confirm(s, true, false);
        assert_eq!(w.stats().late_confirms, 1);
        assert_eq!(w.stats().timeouts, 1);
    }

    #[test]
    fn stale_epochs_are_refused_and_connection_loss_fails_everything() {
        let now = t0();
        let mut w = ConfirmWindow::new(4, Duration::from_secs(1));
        w.cancel_before(5);
        let stale = w.submit(4, vec![M("x")]);
        assert!(matches!(
            w.take_replies().as_slice(),
            [(j, Err(PublishError::Cancelled { epoch: 4 }))] if *j == stale
        ));
        let live = w.submit(5, vec![M("y"), M("z")]);
        w.poll_publish(now).unwrap();
        w.connection_lost("gone");
        assert!(matches!(
            w.take_replies().as_slice(),
            [(j, Err(PublishError::ConnectionLost { unconfirmed: 1, .. }))] if *j == live
        ));
        assert!(w.is_idle());
    }
}
