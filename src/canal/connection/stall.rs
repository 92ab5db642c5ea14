//! The connection's ways of stopping: a stall it must not pass on its own (a frame over the
//! cap, an entry that cannot be decoded) until `canal-consumer skip` says so, and a conflict
//! with another process fetching as the same Canal client.

use super::*;

impl CanalConnection {
    /// Stop fetching until an operator acts; say so everywhere.
    pub(super) fn stall(&mut self, token: String, reason: String, how: String) {
        tracing::error!(reason = %reason, how = %how, "canal stream stalled");
        self.status.last_error = Some(format!("{reason}; {how}"));
        self.status.stall = Some(StallInfo {
            token,
            reason,
            after: self.status.acked_position.clone(),
            how,
            since: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        });
        self.state = ConnectionState::Stalled;
    }

    pub(super) fn record_skip(&mut self, what: String) {
        tracing::warn!(skipped = %what, "skipped at the operator's request; its rows were not delivered");
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
    pub(super) fn on_conflict(&mut self, evidence: String, ctx: &mut Context<Self>) {
        let e = CanalError::Conflict {
            destination: self.cfg.session.destination.clone(),
            client_id: self.cfg.session.client_id.clone(),
            evidence,
        };
        tracing::error!(error = %e, retry_in = ?self.cfg.reconnect_max, "second client detected");
        self.status.conflicts += 1;
        self.status.last_error = Some(e.to_string());
        self.session = None;
        self.begin_epoch(&e.to_string(), true);
        self.state = ConnectionState::Conflict;
        let delay = self.backoff_from(self.cfg.reconnect_max);
        ctx.run_later(delay, |act, ctx| {
            if act.state == ConnectionState::Conflict {
                act.connect(ctx);
            }
        });
    }

    /// Canal's answer when a batch we ack was already acked or rolled back by another process
    /// with our client identity: `ack error , clientId:1001 batchId:7 is not exist`.
    pub(super) fn vanished_batch(e: &CanalError) -> Option<String> {
        match e {
            CanalError::Server { message, .. }
                if message.contains("ack error") && message.contains("is not exist") =>
            {
                Some(format!(
                    "a batch vanished before its ack (canal: {})",
                    message
                        .rsplit("exception=")
                        .next()
                        .unwrap_or(message)
                        .trim()
                ))
            }
            _ => None,
        }
    }

    /// `base`, shortened by up to 20% so two conflicting instances do not retry in lockstep.
    fn backoff_from(&self, base: Duration) -> Duration {
        Backoff::new(base, base).with_jitter(0.2).delay(0)
    }
}

impl Handler<SkipStalled> for CanalConnection {
    type Result = Result<String, String>;

    fn handle(&mut self, msg: SkipStalled, ctx: &mut Context<Self>) -> Self::Result {
        let Some(stall) = self.status.stall.clone() else {
            return Err("the canal stream is not stalled; nothing to skip".into());
        };
        if msg.0 != stall.token {
            return Err(format!(
                "the stream is stalled at {}, not {}; nothing was skipped",
                stall.token, msg.0
            ));
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
            self.drive(ctx);
            return Ok(format!("skipped {}", stall.token));
        }
        // an oversized frame: reconnect and read past it on the next fetch
        self.skip_oversized = true;
        self.status.stall = None;
        self.connect(ctx);
        Ok(format!(
            "skipping {}: the next fetch reads past it (see `canal-consumer status`)",
            stall.token
        ))
    }
}
