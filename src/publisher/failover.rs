//! Which broker node to connect to next: the sans-IO decision behind `amqp.urls`.
//!
//! [`Failover`] holds the nodes' order and what happened so far; the publisher actor asks it
//! which node to try ([`Failover::target`]) and tells it what came of the attempt. The rules:
//! - a connection attempt that fails moves on to the next node at once, until every node has
//!   been tried once in this round; then the round ends and the actor backs off
//!   ([`Next::BackOff`], the round number drives the delay) before the next round;
//! - a connection that worked and later broke (a node killed, stopped, frozen past the
//!   heartbeat) starts a new round at the *next* node: the one that just failed is tried last;
//! - a successful connection resets the rounds.
//!
//! With one node it degenerates to "retry that node with backoff", the single-URL behaviour.
//!
//! How long to wait is decided here too ([`Next::delay`], [`Failover::after_loss`]): nothing
//! between the attempts of one round; `amqp.reconnect_min` after the first failed round,
//! doubling with every further one up to `amqp.reconnect_max`; `reconnect_min` after a
//! connection that worked was lost. The actor only arms the timer (`tests/actor_timers.rs`
//! checks it on a paused clock).

use crate::backoff::Backoff;
use std::time::Duration;

/// What to do after a failed connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try [`Failover::target`] now: some node of this round is still untried.
    TryNow,
    /// Every node failed in this round: wait (backoff for this many failed rounds, from 0),
    /// then try [`Failover::target`].
    BackOff { round: u32 },
}

impl Next {
    /// How long to wait before trying [`Failover::target`]: nothing for [`Next::TryNow`],
    /// `backoff`'s delay for the round otherwise.
    pub fn delay(self, backoff: &Backoff) -> Duration {
        match self {
            Next::TryNow => Duration::ZERO,
            Next::BackOff { round } => backoff.delay(round),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Failover {
    nodes: usize,
    current: usize,
    /// Nodes tried (and failed) in the current round.
    failed_in_round: usize,
    /// Rounds in a row in which every node failed.
    rounds_failed: u32,
}

impl Failover {
    /// `nodes` brokers, tried from the first. At least one.
    pub fn new(nodes: usize) -> Self {
        Failover {
            nodes: nodes.max(1),
            current: 0,
            failed_in_round: 0,
            rounds_failed: 0,
        }
    }

    /// The node (index into the URL list) to connect to now.
    pub fn target(&self) -> usize {
        self.current
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// The attempt on [`Self::target`] succeeded.
    pub fn connected(&mut self) {
        self.failed_in_round = 0;
        self.rounds_failed = 0;
    }

    /// The attempt on [`Self::target`] failed.
    pub fn attempt_failed(&mut self) -> Next {
        self.current = (self.current + 1) % self.nodes;
        self.failed_in_round += 1;
        if self.failed_in_round < self.nodes {
            return Next::TryNow;
        }
        self.failed_in_round = 0;
        let round = self.rounds_failed;
        self.rounds_failed = self.rounds_failed.saturating_add(1);
        Next::BackOff { round }
    }

    /// The connection to [`Self::target`], established earlier, was lost: the next round
    /// starts at the following node.
    pub fn connection_lost(&mut self) {
        self.current = (self.current + 1) % self.nodes;
        self.failed_in_round = 0;
        self.rounds_failed = 0;
    }

    /// [`Self::connection_lost`], and how long to wait before trying [`Self::target`]:
    /// `backoff`'s shortest delay (the lost node may be the only one, restarting).
    pub fn after_loss(&mut self, backoff: &Backoff) -> Duration {
        self.connection_lost();
        backoff.min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_attempt_tries_every_node_once_before_backing_off() {
        let mut f = Failover::new(3);
        assert_eq!(f.target(), 0);
        assert_eq!(f.attempt_failed(), Next::TryNow);
        assert_eq!(f.target(), 1);
        assert_eq!(f.attempt_failed(), Next::TryNow);
        assert_eq!(f.target(), 2);
        assert_eq!(f.attempt_failed(), Next::BackOff { round: 0 });
        assert_eq!(f.target(), 0);
        // the next round fails too: the backoff grows
        assert_eq!(f.attempt_failed(), Next::TryNow);
        assert_eq!(f.attempt_failed(), Next::TryNow);
        assert_eq!(f.attempt_failed(), Next::BackOff { round: 1 });
        // node 0 answers: the rounds start over
        f.connected();
        assert_eq!(f.target(), 0);
        assert_eq!(f.attempt_failed(), Next::TryNow);
        assert_eq!(f.attempt_failed(), Next::TryNow);
        assert_eq!(f.attempt_failed(), Next::BackOff { round: 0 });
    }

    #[test]
    fn a_lost_connection_moves_on_and_tries_the_lost_node_last() {
        let mut f = Failover::new(3);
        assert_eq!(f.attempt_failed(), Next::TryNow);
        f.connected();
        assert_eq!(f.target(), 1);
        f.connection_lost();
        assert_eq!(f.target(), 2);
        assert_eq!(f.attempt_failed(), Next::TryNow);
        assert_eq!(f.target(), 0);
        assert_eq!(f.attempt_failed(), Next::TryNow);
        assert_eq!(f.target(), 1, "the node that was lost comes last");
        assert_eq!(f.attempt_failed(), Next::BackOff { round: 0 });
    }

    /// The delays the publisher waits between attempts, `reconnect_min` 100 ms and
    /// `reconnect_max` 1 s, two nodes: none within a round, then 100 ms doubling per failed
    /// round up to 1 s; a success starts over, and a lost connection waits the shortest.
    #[test]
    fn reconnect_delays_double_per_failed_round_up_to_the_cap() {
        let ms = Duration::from_millis;
        let backoff = Backoff::new(ms(100), ms(1000));
        let mut f = Failover::new(2);
        let delays: Vec<(usize, Duration)> = (0..14)
            .map(|_| {
                let d = f.attempt_failed().delay(&backoff);
                (f.target(), d)
            })
            .collect();
        let expected: Vec<(usize, Duration)> =
            [0, 100, 0, 200, 0, 400, 0, 800, 0, 1000, 0, 1000, 0, 1000]
                .iter()
                .enumerate()
                .map(|(i, &d)| ((i + 1) % 2, ms(d)))
                .collect();
        assert_eq!(delays, expected);
        f.connected();
        assert_eq!(f.attempt_failed().delay(&backoff), ms(0));
        assert_eq!(f.attempt_failed().delay(&backoff), ms(100));
        f.connected();
        assert_eq!(f.target(), 0);
        assert_eq!(f.after_loss(&backoff), ms(100));
        assert_eq!(f.target(), 1);
        // a failed attempt after a loss is the first of a new round
        assert_eq!(f.attempt_failed().delay(&backoff), ms(0));
        assert_eq!(f.attempt_failed().delay(&backoff), ms(100));
    }

    #[test]
    fn one_node_backs_off_after_each_failure() {
        let mut f = Failover::new(1);
        assert_eq!(f.attempt_failed(), Next::BackOff { round: 0 });
        assert_eq!(f.attempt_failed(), Next::BackOff { round: 1 });
        assert_eq!(f.target(), 0);
        f.connection_lost();
        assert_eq!(f.target(), 0);
        assert_eq!(f.attempt_failed(), Next::BackOff { round: 0 });
        assert_eq!(Failover::new(0).nodes(), 1);
    }
}
