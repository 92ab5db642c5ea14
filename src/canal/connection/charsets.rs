//! Raw text mode in the connection actor (`canal.connection_charset = "ISO-8859-1"`): decoding
//! a batch may first need the column charsets of some tables from the source database
//! (`canal::source`). The batch then waits in the actor and fetching pauses (no GET is issued
//! while a batch is decoded or waits, so batches still reach the window in fetch order); when
//! the lookup answers, the batch is decoded again with the new charsets. Nothing is rolled back
//! for a lookup, so no consumer sees a duplicate because of one. A failed lookup is retried with
//! backoff and shown as the connection's `last_error`.

use super::{CanalConnection, core};
use crate::canal::charset::{CharsetMap, Need, TableCharsets};
use crate::canal::session::RawBatch;
use crate::canal::source::{SourceError, SourceSchema};
use crate::event::ChangeEvent;
use actix::prelude::*;
use std::sync::Arc;

/// The raw-text state of the actor.
pub(super) struct RawText {
    /// The lookup pool (`Err`: the URL could not be used; every lookup fails with it).
    source: Result<Arc<SourceSchema>, String>,
    /// Shared with the decoding job on the blocking pool; changed only between jobs.
    pub(super) map: Arc<CharsetMap>,
    /// A lookup in progress and the batch waiting for it.
    wait: Option<Wait>,
}

struct Wait {
    needs: Vec<(Need, Vec<String>)>,
    epoch: u64,
    batch: RawBatch,
    attempt: u32,
}

impl RawText {
    pub(super) fn new(source_url: &crate::config::Secret) -> RawText {
        let source = SourceSchema::new(source_url.expose(), source_url.redacted())
            .map(Arc::new)
            .map_err(|e| e.to_string());
        RawText {
            source,
            map: Arc::new(CharsetMap::default()),
            wait: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum LookupError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Source(#[from] SourceError),
}

impl CanalConnection {
    /// The charset map for the next decoding job (raw text mode only).
    pub(super) fn charset_map(&self) -> Option<Arc<CharsetMap>> {
        self.raw_text.as_ref().map(|r| r.map.clone())
    }

    /// A decoded batch passed these DDLs: what is known about their tables is stale.
    pub(super) fn ddls_passed(&mut self, events: &[ChangeEvent]) {
        let Some(rt) = self.raw_text.as_mut() else {
            return;
        };
        for e in events.iter().filter(|e| e.is_ddl && !e.table.is_empty()) {
            Arc::make_mut(&mut rt.map).ddl_passed(
                &(e.database.to_string(), e.table.to_string()),
                &(e.position.log_file.to_string(), e.position.offset),
            );
        }
    }

    /// Decoding `batch` needs these lookups first: keep it and look them up.
    pub(super) fn wait_for_charsets(
        &mut self,
        epoch: u64,
        batch: RawBatch,
        needs: Vec<(Need, Vec<String>)>,
        ctx: &mut Context<Self>,
    ) {
        let Some(rt) = self.raw_text.as_mut() else {
            return;
        };
        tracing::debug!(
            tables = needs.len(),
            batch_id = batch.batch_id,
            "looking up column charsets in the source database"
        );
        rt.wait = Some(Wait {
            needs,
            epoch,
            batch,
            attempt: 0,
        });
        self.look_up(ctx);
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
                let map = Arc::make_mut(&mut rt.map);
                for (need, missing, mut charsets) in found {
                    charsets.cover(&missing);
                    map.insert(&need, charsets);
                }
                let Some(wait) = rt.wait.take() else {
                    return;
                };
                self.feed(core::Input::LookupError(None), ctx);
                // decode it again (dropped by the core if a rollback or reconnect came meanwhile)
                self.decode(wait.epoch, wait.batch, ctx);
            }
            Err(e) => {
                let attempt = rt.wait.as_ref().map_or(0, |w| w.attempt);
                if let Some(w) = rt.wait.as_mut() {
                    w.attempt = w.attempt.saturating_add(1);
                }
                let delay = self.backoff(attempt);
                tracing::warn!(error = %e, retry_in = ?delay, "column charset lookup failed; fetching paused");
                self.feed(
                    core::Input::LookupError(Some(format!("{e}; retrying in {delay:?}"))),
                    ctx,
                );
                ctx.run_later(delay, |act, ctx| act.look_up(ctx));
            }
        }
    }
}
