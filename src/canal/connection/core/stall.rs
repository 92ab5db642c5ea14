//! The core's ways of stopping: a stall it must not pass on its own (a frame over the cap, an
//! entry that cannot be decoded) until `canal-consumer skip` says so, and a conflict with
//! another process fetching as the same Canal client.

use super::*;

impl<R: RawView, E: EventsView> ConnectionCore<R, E> {
    /// Pass what the stream is stalled at (`canal-consumer skip TOKEN`).
    pub fn skip(&mut self, now: Instant, token: &str) -> Result<Skipped, SkipError> {
        let Some(stall) = self.status.stall.clone() else {
            return Err(SkipError::NotStalled);
        };
        if token != stall.token {
            return Err(SkipError::OtherToken {
                stalled: stall.token,
                given: token.to_string(),
            });
        }
        if let Some(batch) = self.held.take() {
            self.window.ack(batch);
            self.record_skip(format!(
                "canal batch {} ({}) after {}",
                batch.id,
                stall.reason,
                stall
                    .after
                    .as_ref()
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "the start".into())
            ));
            self.state = ConnectionState::Connected;
            self.drive(now);
            return Ok(Skipped::Batch { token: stall.token });
        }
        // an oversized frame: reconnect and read past it on the next fetch
        self.skip_oversized = true;
        self.status.stall = None;
        self.connect(now);
        Ok(Skipped::Frame { token: stall.token })
    }

    /// Stop fetching until an operator acts; say so everywhere.
    pub(super) fn stall(&mut self, token: String, reason: String, how: String) {
        tracing::error!(reason = %reason, how = %how, "canal stream stalled");
        self.status.last_error = Some(format!("{reason}; {how}"));
        self.status.stall = Some(StallInfo {
            token,
            reason,
            after: self.status.acked_position.clone(),
            how,
            since: crate::clock::now_rfc3339(),
        });
        self.state = ConnectionState::Stalled;
    }

    pub(super) fn record_skip(&mut self, what: String) {
        tracing::warn!(skipped = %what, "skipped at the operator's request; its rows were not delivered");
        // the rows after it no longer start where a delivery started (see `recut`)
        self.recut_flushes += 1;
        self.status.skipped.push(what);
        let n = self.status.skipped.len();
        if n > 20 {
            self.status.skipped.drain(..n - 20);
        }
        self.status.stall = None;
        self.status.last_error = None;
    }

    /// Another process fetched batches as our Canal client: stop, roll back, show it, and try
    /// again after `reconnect_max`.
    pub(super) fn on_conflict(&mut self, evidence: String) {
        let e = crate::canal::CanalError::Conflict {
            destination: self.cfg.destination.clone(),
            client_id: self.cfg.client_id.clone(),
            evidence,
        };
        tracing::error!(error = %e, retry_in = ?self.cfg.reconnect_max, "second client detected");
        self.status.conflicts += 1;
        self.status.last_error = Some(e.to_string());
        if self.link != Link::None {
            // an operation still running on it answers with an old generation
            self.generation += 1;
            self.link = Link::None;
            self.actions.push(Action::DropSession);
        }
        self.begin_epoch(&e.to_string(), true);
        self.state = ConnectionState::Conflict;
        let base = self.cfg.reconnect_max;
        let delay = self.jittered(Backoff::new(base, base), 0);
        self.actions.push(Action::Timer {
            timer: Timer::ConflictRetry,
            after: delay,
        });
    }
}
