//! Raw text mode in the connection actor (`canal.connection_charset = "ISO-8859-1"`): decoding
//! a batch may first need the column charsets of some tables from the source database
//! (`canal::source`). The batch then waits in the actor, with any batch fetched after it, and
//! fetching pauses; when the lookup answers they are decoded in fetch order. Nothing is rolled
//! back for a lookup, so no consumer sees a duplicate because of one. A failed lookup is retried
//! with backoff and shown as the connection's `last_error`.

use super::CanalConnection;
use crate::canal::charset::{CharsetMap, Need, TableCharsets};
use crate::canal::decode::{DecodeError, TextMode, decode_entries_with};
use crate::canal::session::RawBatch;
use crate::canal::source::{SourceError, SourceSchema};
use crate::event::ChangeEvent;
use actix::prelude::*;
use std::collections::VecDeque;
use std::sync::Arc;

/// The raw-text state of the actor.
pub(super) struct RawText {
    /// The lookup pool (`Err`: the URL could not be used; every lookup fails with it).
    source: Result<Arc<SourceSchema>, String>,
    map: CharsetMap,
    /// A lookup in progress and the batches waiting for it, oldest first.
    wait: Option<Wait>,
}

struct Wait {
    needs: Vec<(Need, Vec<String>)>,
    queue: VecDeque<(u64, RawBatch)>,
    attempt: u32,
}

impl RawText {
    pub(super) fn new(source_url: &crate::config::Secret) -> RawText {
        let source = SourceSchema::new(source_url.expose(), source_url.redacted())
            .map(Arc::new)
            .map_err(|e| e.to_string());
        RawText {
            source,
            map: CharsetMap::default(),
            wait: None,
        }
    }
}

/// What decoding a fetched batch gave.
pub(super) enum Decoded {
    Events(Vec<ChangeEvent>),
    /// Waiting for a charset lookup (the batch is kept; nothing to do now).
    Waiting,
    Failed(DecodeError),
}

impl CanalConnection {
    /// Whether a lookup holds fetching back.
    pub(super) fn waiting_for_charsets(&self) -> bool {
        self.raw_text.as_ref().is_some_and(|r| r.wait.is_some())
    }

    /// Decodes a fetched batch of the current epoch in the configured text mode; in raw mode
    /// it may wait for a lookup (or join the batches already waiting for one).
    pub(super) fn decode_batch(
        &mut self,
        epoch: u64,
        raw: RawBatch,
        ctx: &mut Context<Self>,
    ) -> (Decoded, Option<RawBatch>) {
        let destination = self.cfg.session.destination.clone();
        let mut events = Vec::new();
        let Some(rt) = self.raw_text.as_mut() else {
            let r =
                decode_entries_with(&destination, &raw.entries, &mut events, TextMode::AsShipped);
            return match r {
                Ok(_) => (Decoded::Events(events), Some(raw)),
                Err(e) => (Decoded::Failed(e), Some(raw)),
            };
        };
        if let Some(wait) = rt.wait.as_mut() {
            wait.queue.push_back((epoch, raw));
            return (Decoded::Waiting, None);
        }
        match decode_entries_with(
            &destination,
            &raw.entries,
            &mut events,
            TextMode::Raw(&rt.map),
        ) {
            Ok(_) => {
                for e in events.iter().filter(|e| e.is_ddl && !e.table.is_empty()) {
                    rt.map.ddl_passed(
                        &(e.database.clone(), e.table.clone()),
                        &(e.position.log_file.clone(), e.position.offset),
                    );
                }
                (Decoded::Events(events), Some(raw))
            }
            Err(DecodeError::CharsetsNeeded(needs)) => {
                tracing::debug!(
                    tables = needs.len(),
                    batch_id = raw.batch_id,
                    "looking up column charsets in the source database"
                );
                let mut queue = VecDeque::new();
                queue.push_back((epoch, raw));
                rt.wait = Some(Wait {
                    needs,
                    queue,
                    attempt: 0,
                });
                self.look_up(ctx);
                (Decoded::Waiting, None)
            }
            Err(e) => (Decoded::Failed(e), Some(raw)),
        }
    }

    fn look_up(&mut self, ctx: &mut Context<Self>) {
        let Some(rt) = self.raw_text.as_ref() else {
            return;
        };
        let Some(wait) = rt.wait.as_ref() else {
            return;
        };
        let needs = wait.needs.clone();
        let source = rt.source.clone();
        let fut = async move {
            let source = source.map_err(LookupError::Config)?;
            let mut found = Vec::with_capacity(needs.len());
            for (need, missing) in needs {
                let charsets = source
                    .table_charsets(&need.table)
                    .await
                    .map_err(LookupError::Source)?;
                found.push((need, missing, charsets));
            }
            Ok::<_, LookupError>(found)
        };
        ctx.spawn(
            fut.into_actor(self)
                .map(|res, act, ctx| act.looked_up(res, ctx)),
        );
    }

    fn looked_up(
        &mut self,
        res: Result<Vec<(Need, Vec<String>, TableCharsets)>, LookupError>,
        ctx: &mut Context<Self>,
    ) {
        let Some(rt) = self.raw_text.as_mut() else {
            return;
        };
        match res {
            Ok(found) => {
                for (need, missing, mut charsets) in found {
                    charsets.cover(&missing);
                    rt.map.insert(&need, charsets);
                }
                let Some(wait) = rt.wait.take() else {
                    return;
                };
                if self
                    .status
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains(LOOKUP_MARK))
                {
                    self.status.last_error = None;
                }
                let mut queue = wait.queue;
                while let Some((epoch, raw)) = queue.pop_front() {
                    self.on_fetched(epoch, raw, ctx);
                    if let Some(w) = self.raw_text.as_mut().and_then(|r| r.wait.as_mut()) {
                        // a later batch needs another lookup: the rest wait behind it
                        w.queue.extend(queue.drain(..));
                        return;
                    }
                }
                self.drive(ctx);
            }
            Err(e) => {
                let attempt = rt.wait.as_ref().map_or(0, |w| w.attempt);
                if let Some(w) = rt.wait.as_mut() {
                    w.attempt = w.attempt.saturating_add(1);
                }
                let delay = self.backoff(attempt);
                tracing::warn!(error = %e, retry_in = ?delay, "column charset lookup failed; fetching paused");
                self.status.last_error = Some(format!("{LOOKUP_MARK}: {e}; retrying in {delay:?}"));
                ctx.run_later(delay, |act, ctx| act.look_up(ctx));
            }
        }
    }
}

const LOOKUP_MARK: &str = "column charset lookup failed";

#[derive(Debug, thiserror::Error)]
enum LookupError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Source(#[from] SourceError),
}
