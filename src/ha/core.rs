//! The active/standby decision, sans-IO: what this replica may do given what ZooKeeper said.
//!
//! [`HaCore`] is fed what the ZooKeeper shell (`zk.rs`) observed, with the time it
//! observed it, and answers two things: the [`Lease`] the Canal connection obeys (connect to
//! which Canal server, and until when acks and fetches may be written), and the next
//! [`Action`]s for the shell (claim the client running node, wait for it to go, open a new
//! session). No I/O, no clock of its own: `now` is always an argument, so the unit tests
//! below drive every transition, including the frozen-process case, with made-up instants.
//!
//! The rules:
//! - Active means: we created the client running node in the current session, the session is
//!   connected, and the lease has not run out. Only then may the connection fetch or ack.
//! - The lease ends at `sent + lease_len` for the newest ZooKeeper request (claim or heartbeat)
//!   that was answered, `sent` taken before the request went out. An answered request proves the
//!   session was alive after `sent`, and ZooKeeper keeps a live session's ephemeral node for at
//!   least the session timeout after it last heard from it; `lease_len` is shorter than that, so
//!   no standby can have taken the node before our lease ends. A process that was frozen (SIGSTOP,
//!   a long GC pause, a suspended VM) wakes with its lease run out, whatever its ZooKeeper client
//!   has not noticed yet: its first ack is refused.
//! - Disconnected: stop at once (the lease is dropped, not waited out). If the same session
//!   comes back, the node is still ours and we resume (reconnect to Canal, roll back).
//! - Expired or closed: the node is gone; open a new session and try to claim again.
//! - Standby: someone else holds the node; wait for it to be deleted, then claim.

use std::time::{Duration, Instant};

/// Where the replica stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Holds the client running node (it may still be suspended: see [`Lease::may_write`]).
    Active,
    /// Someone else holds the node, or we have no session to claim it with.
    #[default]
    Standby,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Standby => "standby",
        }
    }
}

/// The ZooKeeper session as the shell last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZkSession {
    #[default]
    Connecting,
    Connected,
    /// Lost the connection; the session may still be alive on the servers.
    Disconnected,
    /// The servers ended the session: every ephemeral node of it is gone.
    Expired,
}

impl ZkSession {
    pub fn as_str(self) -> &'static str {
        match self {
            ZkSession::Connecting => "connecting",
            ZkSession::Connected => "connected",
            ZkSession::Disconnected => "disconnected",
            ZkSession::Expired => "expired",
        }
    }
}

/// What the connection obeys: published by the shell after every event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lease {
    pub role: Role,
    pub session: ZkSession,
    /// The Canal server that runs the destination (`ip:port` from Canal's running node).
    pub canal: Option<String>,
    /// Acks and fetches may be written before this instant (active only).
    pub valid_until: Option<Instant>,
    /// Who holds the client running node when we do not (its `address`).
    pub holder: Option<String>,
    /// Why the replica does not work right now, for `status` (None while it does).
    pub reason: Option<String>,
}

impl Lease {
    /// May the connection write a GET or an ACK to Canal at `now`?
    pub fn may_write(&self, now: Instant) -> bool {
        self.role == Role::Active
            && self.session == ZkSession::Connected
            && self.valid_until.is_some_and(|t| now < t)
    }

    /// The Canal server the connection should be connected to at `now`, if any.
    pub fn target(&self, now: Instant) -> Option<&str> {
        if self.may_write(now) {
            self.canal.as_deref()
        } else {
            None
        }
    }
}

/// What the shell observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The session is connected (new, or the same one back after a disconnection).
    Connected,
    Disconnected,
    /// The session expired or was closed: its ephemeral nodes are gone.
    Expired,
    /// We created the client running node; the request was sent at `sent`.
    Claimed {
        sent: Instant,
    },
    /// The node exists and is not ours; `address` is what its holder wrote.
    HeldBy {
        address: String,
    },
    /// The claim got no answer either way (a request error); the shell claims again later.
    ClaimFailed,
    /// The client running node was deleted (by its holder's session ending, or by hand).
    NodeGone,
    /// Canal's running node for the destination: the server's address, or None when no server
    /// runs it right now.
    CanalRunning(Option<String>),
    /// A ZooKeeper request sent at `sent` was answered on our session.
    Heartbeat {
        sent: Instant,
    },
}

/// What the shell should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Create the client running node (ephemeral); report Claimed or HeldBy.
    Claim,
    /// Watch the node; report NodeGone when it is deleted.
    WatchNode,
    /// The session is over: open a new one.
    NewSession,
}

/// The decision state. See the module docs.
#[derive(Debug, Clone)]
pub struct HaCore {
    lease_len: Duration,
    session: ZkSession,
    holds_node: bool,
    holder: Option<String>,
    canal: Option<String>,
    valid_until: Option<Instant>,
    /// A claim is outstanding (do not ask for another).
    claiming: bool,
}

impl HaCore {
    /// `session_timeout` as negotiated with ZooKeeper; the lease lasts two thirds of it.
    pub fn new(session_timeout: Duration) -> Self {
        HaCore {
            lease_len: session_timeout * 2 / 3,
            session: ZkSession::Connecting,
            holds_node: false,
            holder: None,
            canal: None,
            valid_until: None,
            claiming: false,
        }
    }

    /// The negotiated timeout may differ from the requested one: the lease follows it.
    pub fn set_session_timeout(&mut self, session_timeout: Duration) {
        self.lease_len = session_timeout * 2 / 3;
    }

    /// How often the shell should send a heartbeat so the lease never runs out while healthy.
    pub fn heartbeat_every(&self) -> Duration {
        (self.lease_len / 4).max(Duration::from_millis(50))
    }

    pub fn role(&self) -> Role {
        if self.holds_node {
            Role::Active
        } else {
            Role::Standby
        }
    }

    /// Apply an event; returns what the shell must do next.
    pub fn on(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::Connected => {
                self.session = ZkSession::Connected;
                if self.holds_node {
                    // the same session came back: the node is still ours; a heartbeat renews the lease
                    Vec::new()
                } else {
                    self.claim()
                }
            }
            Event::Disconnected => {
                if self.session != ZkSession::Expired {
                    self.session = ZkSession::Disconnected;
                }
                // stop at once, do not wait for the lease to run out
                self.valid_until = None;
                Vec::new()
            }
            Event::Expired => {
                self.session = ZkSession::Expired;
                self.holds_node = false;
                self.holder = None;
                self.valid_until = None;
                self.claiming = false;
                vec![Action::NewSession]
            }
            Event::Claimed { sent } => {
                self.claiming = false;
                if self.session == ZkSession::Expired {
                    return Vec::new();
                }
                self.holds_node = true;
                self.holder = None;
                self.extend(sent);
                Vec::new()
            }
            Event::HeldBy { address } => {
                self.claiming = false;
                self.holds_node = false;
                self.holder = Some(address);
                self.valid_until = None;
                vec![Action::WatchNode]
            }
            Event::ClaimFailed => {
                self.claiming = false;
                Vec::new()
            }
            Event::NodeGone => {
                // ours deleted by hand, or the holder's session ended: stop, and try to claim
                self.holds_node = false;
                self.holder = None;
                self.valid_until = None;
                if self.session == ZkSession::Connected {
                    self.claim()
                } else {
                    Vec::new()
                }
            }
            Event::CanalRunning(addr) => {
                self.canal = addr;
                Vec::new()
            }
            Event::Heartbeat { sent } => {
                if self.holds_node && self.session == ZkSession::Connected {
                    self.extend(sent);
                }
                Vec::new()
            }
        }
    }

    fn claim(&mut self) -> Vec<Action> {
        if self.claiming {
            return Vec::new();
        }
        self.claiming = true;
        vec![Action::Claim]
    }

    fn extend(&mut self, sent: Instant) {
        let until = sent + self.lease_len;
        if self.valid_until.is_none_or(|t| t < until) {
            self.valid_until = Some(until);
        }
    }

    /// The lease to publish.
    pub fn lease(&self) -> Lease {
        let reason = if self.session != ZkSession::Connected {
            Some(format!("zookeeper session {}", self.session.as_str()))
        } else if !self.holds_node {
            Some(match &self.holder {
                Some(h) => format!("standby: client running node held by {h}"),
                None => "standby: claiming the client running node".to_string(),
            })
        } else if self.canal.is_none() {
            Some("no canal server runs the destination (waiting for canal's running node)".into())
        } else {
            None
        };
        Lease {
            role: self.role(),
            session: self.session,
            canal: self.canal.clone(),
            valid_until: if self.holds_node && self.session == ZkSession::Connected {
                self.valid_until
            } else {
                None
            },
            holder: self.holder.clone(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(3);

    fn active(now: Instant) -> HaCore {
        let mut c = HaCore::new(T);
        assert_eq!(c.on(Event::Connected), vec![Action::Claim]);
        c.on(Event::CanalRunning(Some("10.0.0.1:11111".into())));
        assert!(c.on(Event::Claimed { sent: now }).is_empty());
        c
    }

    #[test]
    fn claims_on_connect_and_becomes_active() {
        let t0 = Instant::now();
        let c = active(t0);
        let l = c.lease();
        assert_eq!(l.role, Role::Active);
        assert!(l.may_write(t0 + Duration::from_millis(100)));
        assert_eq!(l.target(t0), Some("10.0.0.1:11111"));
        assert_eq!(l.reason, None);
    }

    #[test]
    fn a_held_node_means_standby_until_it_goes() {
        let t0 = Instant::now();
        let mut c = HaCore::new(T);
        c.on(Event::Connected);
        c.on(Event::CanalRunning(Some("a:1".into())));
        assert_eq!(
            c.on(Event::HeldBy {
                address: "other".into()
            }),
            vec![Action::WatchNode]
        );
        let l = c.lease();
        assert_eq!(l.role, Role::Standby);
        assert!(!l.may_write(t0));
        assert_eq!(l.target(t0), None);
        assert_eq!(l.holder.as_deref(), Some("other"));
        // the holder went: claim, and only the answered claim makes us active
        assert_eq!(c.on(Event::NodeGone), vec![Action::Claim]);
        assert!(!c.lease().may_write(t0));
        c.on(Event::Claimed { sent: t0 });
        assert!(c.lease().may_write(t0));
    }

    #[test]
    fn only_one_claim_outstanding() {
        let mut c = HaCore::new(T);
        assert_eq!(c.on(Event::Connected), vec![Action::Claim]);
        assert!(c.on(Event::Connected).is_empty());
        assert!(c.on(Event::NodeGone).is_empty());
    }

    #[test]
    fn a_failed_claim_can_be_retried() {
        let t0 = Instant::now();
        let mut c = HaCore::new(T);
        assert_eq!(c.on(Event::Connected), vec![Action::Claim]);
        assert!(c.on(Event::ClaimFailed).is_empty());
        assert!(!c.lease().may_write(t0));
        assert_eq!(c.on(Event::NodeGone), vec![Action::Claim], "claims again");
    }

    #[test]
    fn disconnection_stops_writing_at_once_and_the_same_session_resumes() {
        let t0 = Instant::now();
        let mut c = active(t0);
        c.on(Event::Disconnected);
        let l = c.lease();
        assert_eq!(l.role, Role::Active, "the node may still be ours");
        assert!(
            !l.may_write(t0),
            "no write while disconnected, lease or not"
        );
        // the session is back: still ours, but writing waits for a renewed lease
        assert!(c.on(Event::Connected).is_empty());
        assert!(!c.lease().may_write(t0));
        let t1 = t0 + Duration::from_millis(500);
        c.on(Event::Heartbeat { sent: t1 });
        assert!(c.lease().may_write(t1));
    }

    #[test]
    fn expiry_drops_the_node_and_asks_for_a_new_session() {
        let t0 = Instant::now();
        let mut c = active(t0);
        assert_eq!(c.on(Event::Expired), vec![Action::NewSession]);
        assert_eq!(c.lease().role, Role::Standby);
        assert!(!c.lease().may_write(t0));
        // a claim answer that arrives late (from the old session) changes nothing
        assert!(c.on(Event::Claimed { sent: t0 }).is_empty());
        assert_eq!(c.role(), Role::Standby);
        // the new session claims again
        assert_eq!(c.on(Event::Connected), vec![Action::Claim]);
    }

    #[test]
    fn a_frozen_process_wakes_with_its_lease_run_out() {
        let t0 = Instant::now();
        let mut c = active(t0);
        let l = c.lease();
        // frozen for longer than the session timeout: nothing was observed meanwhile
        let woke = t0 + T + Duration::from_secs(1);
        assert!(!l.may_write(woke));
        assert_eq!(l.target(woke), None);
        // just before two thirds of the timeout it still could (the node outlives that)
        assert!(l.may_write(t0 + T * 2 / 3 - Duration::from_millis(1)));
        // a heartbeat sent before the freeze and answered after it proves nothing newer
        c.on(Event::Heartbeat { sent: t0 });
        assert!(!c.lease().may_write(woke));
    }

    /// The lease at the shell's cadence (`zk.rs`: a heartbeat every `heartbeat_every`, sent
    /// at the tick, each given `heartbeat_every` to be answered). While every heartbeat is
    /// answered, even in its last moment, the lease never lapses. Then ZooKeeper cannot be
    /// reached and the client has not noticed yet (no Disconnected): heartbeats go unanswered,
    /// and the replica may write until two thirds of the session timeout after the last
    /// answered one was sent, and not a moment longer. The servers heard from it no earlier
    /// than that send, so they cannot expire its session (and let a standby claim the node)
    /// before a whole session timeout after it: a third of the timeout to spare.
    #[test]
    fn a_replica_cut_off_from_zookeeper_stops_writing_before_its_session_can_expire() {
        let moment = Duration::from_nanos(1);
        let t0 = Instant::now();
        let mut c = active(t0);
        let every = c.heartbeat_every();
        assert_eq!(every, T * 2 / 3 / 4);
        let mut sent = t0;
        for _ in 0..40 {
            sent += every;
            let answered = sent + every - moment;
            assert!(c.lease().may_write(answered), "lapsed before {answered:?}");
            c.on(Event::Heartbeat { sent });
            assert!(c.lease().may_write(answered));
        }
        let last = sent;
        // cut off: the heartbeats sent after `last` time out, nothing is observed
        let lease = c.lease();
        assert!(lease.may_write(last + T * 2 / 3 - moment));
        assert_eq!(
            lease.target(last + T * 2 / 3 - moment),
            Some("10.0.0.1:11111")
        );
        assert!(!lease.may_write(last + T * 2 / 3));
        assert_eq!(lease.target(last + T * 2 / 3), None);
        // the earliest the servers can expire the session, with a third of it to spare
        let earliest_expiry = last + T;
        assert_eq!(earliest_expiry - (last + T * 2 / 3), T / 3);
        assert!(!lease.may_write(earliest_expiry));
        // a heartbeat sent before the cut and answered late proves nothing newer
        c.on(Event::Heartbeat { sent: last - every });
        assert!(!c.lease().may_write(last + T * 2 / 3));
        // the client notices: nothing more at once, whatever the lease said
        c.on(Event::Disconnected);
        assert!(!c.lease().may_write(last + every));
    }

    #[test]
    fn heartbeats_keep_the_lease_and_never_shorten_it() {
        let t0 = Instant::now();
        let mut c = active(t0);
        let mut now = t0;
        for _ in 0..20 {
            now += c.heartbeat_every();
            c.on(Event::Heartbeat { sent: now });
            assert!(c.lease().may_write(now + c.heartbeat_every()));
        }
        let before = c.lease().valid_until;
        c.on(Event::Heartbeat { sent: t0 });
        assert_eq!(c.lease().valid_until, before);
        // heartbeats of a standby do not make it active
        let mut s = HaCore::new(T);
        s.on(Event::Connected);
        s.on(Event::HeldBy {
            address: "x".into(),
        });
        s.on(Event::Heartbeat { sent: t0 });
        assert!(!s.lease().may_write(t0));
    }

    #[test]
    fn follows_canal_and_waits_without_a_server() {
        let t0 = Instant::now();
        let mut c = active(t0);
        c.on(Event::CanalRunning(None));
        let l = c.lease();
        assert!(l.may_write(t0), "still active");
        assert_eq!(l.target(t0), None, "but nowhere to connect");
        assert!(l.reason.unwrap().contains("no canal server"));
        c.on(Event::CanalRunning(Some("10.0.0.2:11111".into())));
        assert_eq!(c.lease().target(t0), Some("10.0.0.2:11111"));
    }

    #[test]
    fn our_node_deleted_by_hand_stops_us_and_we_claim_again() {
        let t0 = Instant::now();
        let mut c = active(t0);
        assert_eq!(c.on(Event::NodeGone), vec![Action::Claim]);
        assert!(!c.lease().may_write(t0));
    }
}
