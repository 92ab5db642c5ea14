//! Routes that break while the service runs, as a plain state machine (no I/O, no lapin).
//!
//! `start` refuses a rule routed to an exchange the broker does not have, but an exchange can
//! be deleted while the service runs. Publishing to it then does not come back as a return:
//! the broker closes the whole publishing channel (`404 NOT_FOUND - no exchange 'x' in vhost
//! '/'`), and with it every unconfirmed message of every consumer. Retrying the batch would
//! close the channel again, for ever, and stall everyone. [`BrokenRoutes`] decides instead:
//!
//! - [`classify_close`] tells a channel close that belongs to one route (a missing exchange)
//!   from one that does not (anything else ends the session as before);
//! - a route found gone is *broken*: the session reopens the channel for everyone else, and
//!   from then on messages to that exchange are not published but refused at once
//!   ([`BrokenRoutes::refusal`]), as unroutable: the Manager parks those rows in the
//!   dead-letter queue with the reason, like a poison row, and the other consumers flow on.
//!   (The messages that were unconfirmed on the closed channel are in doubt, whichever route
//!   they took: their batches are rolled back once and redelivered, with their ids.);
//! - a broken route is re-checked (a passive declare, done by the session) after a backoff
//!   that doubles from `min` to `max` while it stays missing ([`BrokenRoutes::due`],
//!   [`BrokenRoutes::checked`]); once it exists again it is published to again.
//!
//! Time is an input (`now`), so it is deterministic under test.

use crate::backoff::Backoff;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// AMQP's `NOT_FOUND` reply code.
pub const NOT_FOUND: u16 = 404;

/// What a channel close means for routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelFault {
    /// The exchange a message was published to does not exist: only that route is broken.
    RouteGone { exchange: String },
    /// Anything else: the channel (or the connection) is the problem.
    Other,
}

/// Classify a channel close by its reply code and text (e.g. `404`, `NOT_FOUND - no exchange
/// 'orders' in vhost '/'`). The default exchange (`''`) always exists, so it never names a
/// broken route.
pub fn classify_close(code: u16, text: &str) -> ChannelFault {
    if code != NOT_FOUND {
        return ChannelFault::Other;
    }
    let Some(rest) = text.split_once("no exchange '").map(|(_, r)| r) else {
        return ChannelFault::Other;
    };
    // the name runs to the last "' in vhost '": exchange names may contain quotes
    match rest.rsplit_once("' in vhost '") {
        Some((exchange, _)) if !exchange.is_empty() => ChannelFault::RouteGone {
            exchange: exchange.to_string(),
        },
        _ => ChannelFault::Other,
    }
}

/// One broken route, as the publisher's status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokenRoute {
    pub exchange: String,
    /// The broker's words when it closed the channel.
    pub reason: String,
    /// Messages refused (not published, parked upstream) since it broke.
    pub refused: u64,
    /// Checks that found it still missing.
    pub checks: u32,
    /// Milliseconds until the next check (0: due or under way).
    pub next_check_in_ms: u64,
}

#[derive(Debug)]
struct Broken {
    reason: String,
    refused: u64,
    /// Checks that found it missing so far.
    checks: u32,
    next_check: Instant,
    checking: bool,
}

/// The routes known to be broken. See the module docs.
#[derive(Debug)]
pub struct BrokenRoutes {
    backoff: Backoff,
    routes: BTreeMap<String, Broken>,
}

impl BrokenRoutes {
    /// Re-check a broken route after `min`, doubling up to `max` while it stays missing.
    pub fn new(min: Duration, max: Duration) -> Self {
        BrokenRoutes {
            backoff: Backoff::new(min, max),
            routes: BTreeMap::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The broker closed the channel because `exchange` is gone. Returns false if it was known
    /// broken already (its check schedule is kept).
    pub fn route_gone(&mut self, exchange: &str, reason: &str, now: Instant) -> bool {
        if self.routes.contains_key(exchange) {
            return false;
        }
        self.routes.insert(
            exchange.to_string(),
            Broken {
                reason: reason.to_string(),
                refused: 0,
                checks: 0,
                next_check: now + self.backoff.base(0),
                checking: false,
            },
        );
        true
    }

    /// Why a message to `exchange` must not be published now (None: publish it). Counts the
    /// refusal.
    pub fn refusal(&mut self, exchange: &str) -> Option<String> {
        let b = self.routes.get_mut(exchange)?;
        b.refused += 1;
        Some(format!(
            "exchange '{exchange}' is gone (the broker closed the publishing channel: {}); \
             not published, re-checked with backoff",
            b.reason
        ))
    }

    /// The routes whose check is due: the caller checks each and reports with
    /// [`Self::checked`]. A route is handed out once per check.
    pub fn due(&mut self, now: Instant) -> Vec<String> {
        self.routes
            .iter_mut()
            .filter(|(_, b)| !b.checking && b.next_check <= now)
            .map(|(e, b)| {
                b.checking = true;
                e.clone()
            })
            .collect()
    }

    /// The check of `exchange` found it (`exists`) or not; a check that could not be made
    /// counts as not found.
    pub fn checked(&mut self, exchange: &str, exists: bool, now: Instant) {
        if exists {
            self.routes.remove(exchange);
            return;
        }
        if let Some(b) = self.routes.get_mut(exchange) {
            b.checking = false;
            b.checks = b.checks.saturating_add(1);
            b.next_check = now + self.backoff.base(b.checks);
        }
    }

    /// When the next check is due, if one is waiting.
    pub fn next_check(&self) -> Option<Instant> {
        self.routes
            .values()
            .filter(|b| !b.checking)
            .map(|b| b.next_check)
            .min()
    }

    /// The broken routes, for status.
    pub fn snapshot(&self, now: Instant) -> Vec<BrokenRoute> {
        self.routes
            .iter()
            .map(|(e, b)| BrokenRoute {
                exchange: e.clone(),
                reason: b.reason.clone(),
                refused: b.refused,
                checks: b.checks,
                next_check_in_ms: b.next_check.saturating_duration_since(now).as_millis() as u64,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GONE: &str = "NOT_FOUND - no exchange 'cc_orders' in vhost '/'";

    #[test]
    fn only_a_missing_exchange_is_one_route_s_fault() {
        assert_eq!(
            classify_close(404, GONE),
            ChannelFault::RouteGone {
                exchange: "cc_orders".into()
            }
        );
        assert_eq!(
            classify_close(404, "NOT_FOUND - no exchange 'it''s' in vhost 'a'b'"),
            ChannelFault::RouteGone {
                exchange: "it''s".into()
            }
        );
        // a missing queue, another code, or no exchange named: not a route's fault
        assert_eq!(
            classify_close(404, "NOT_FOUND - no queue 'q' in vhost '/'"),
            ChannelFault::Other
        );
        assert_eq!(
            classify_close(406, "PRECONDITION_FAILED - no exchange 'x' in vhost '/'"),
            ChannelFault::Other
        );
        assert_eq!(
            classify_close(404, "NOT_FOUND - no exchange '' in vhost '/'"),
            ChannelFault::Other
        );
        assert_eq!(
            classify_close(320, "CONNECTION_FORCED"),
            ChannelFault::Other
        );
    }

    #[test]
    fn a_broken_route_is_refused_and_rechecked_with_backoff_until_it_is_back() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut r = BrokenRoutes::new(ms(100), ms(350));
        assert_eq!(r.refusal("cc_orders"), None);
        assert!(r.route_gone("cc_orders", GONE, t0));
        assert!(
            !r.route_gone("cc_orders", GONE, t0 + ms(50)),
            "known already"
        );
        let why = r.refusal("cc_orders").expect("refused");
        assert!(why.contains("exchange 'cc_orders' is gone"), "{why}");
        assert!(why.contains(GONE), "{why}");
        assert_eq!(r.refusal("other"), None, "other routes are published");

        // checks: after 100 ms, then 200, then 350 (capped), 350 ...
        assert_eq!(r.next_check(), Some(t0 + ms(100)));
        assert!(r.due(t0 + ms(99)).is_empty());
        let mut now = t0 + ms(100);
        for expected_gap in [200, 350, 350] {
            assert_eq!(r.due(now), vec!["cc_orders".to_string()]);
            assert!(r.due(now).is_empty(), "handed out once per check");
            assert_eq!(r.next_check(), None, "no timer while a check runs");
            r.checked("cc_orders", false, now);
            assert_eq!(r.next_check(), Some(now + ms(expected_gap)));
            now += ms(expected_gap);
        }
        let st = r.snapshot(now - ms(100));
        assert_eq!(st.len(), 1);
        assert_eq!(
            (st[0].refused, st[0].checks, st[0].next_check_in_ms),
            (1, 3, 100)
        );

        // back: published again, no more checks
        assert_eq!(r.due(now).len(), 1);
        r.checked("cc_orders", true, now);
        assert_eq!(r.refusal("cc_orders"), None);
        assert_eq!(r.next_check(), None);
        assert!(r.is_empty());
    }
}
