//! The Manager actor: routes Canal batches to consumers and decides when a batch is acked.
//!
//! For each batch from the `CanalConnection` it picks, per enabled consumer, the events that
//! consumer's filters match, and queues that part on the consumer. Each consumer gets one part
//! at a time, in batch order, so its triggers leave in binlog order. A batch is acked once every
//! consumer part of it is processed *and* confirmed by the publisher; the connection then acks
//! batches to Canal strictly in order. So no batch is acked before all its consumers finish,
//! and none before the batches fetched ahead of it.
//!
//! Failures:
//! - a consumer that fails a part is restarted by its supervisor; the Manager retries that
//!   same part after the consumer's backoff. Other consumers keep going (up to the Canal
//!   in-flight window), so one slow or failing consumer does not stop the rest;
//! - a quarantined consumer, or a publish that fails (nack, return, timeout, lost broker),
//!   rolls the batch back: Canal redelivers it and every consumer sees it again (duplicates
//!   carry the same message ids);
//! - when the connection starts a new epoch (reconnect or rollback) everything older is
//!   forgotten; work already running finishes but can no longer ack.
//!
//! The Canal subscription filter is the union of the enabled consumers' filters, updated live
//! when a consumer is enabled or disabled.

use crate::canal::connection::{
    AckBatch, Batch, BatchRef, CanalConnection, CanalEvent, RollbackBatch, SetFilter,
};
use crate::consumer::TableFilter;
use crate::consumer::actor::{ConsumerActor, ProcessBatch, ProcessFailure, Processed, Reinstate};
use crate::consumer::filter::canal_filter;
use crate::event::ChangeEvent;
use actix::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// A consumer as the Manager knows it.
pub struct ConsumerEntry {
    pub name: String,
    pub filters: Vec<TableFilter>,
    pub enabled: bool,
    pub addr: Addr<ConsumerActor>,
}

struct Part {
    batch: BatchRef,
    events: Arc<Vec<ChangeEvent>>,
    indices: Arc<Vec<usize>>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ConsumerStats {
    pub name: String,
    pub enabled: bool,
    /// running, retrying, quarantined or disabled (the last two derived when a snapshot is
    /// taken, from the slot)
    pub state: &'static str,
    pub events: u64,
    pub triggers: u64,
    pub errors: u64,
    pub restarts: u32,
    pub queued_parts: usize,
    pub last_error: Option<String>,
    /// Source execution time of the newest event whose triggers were confirmed (ms).
    pub confirmed_executed_at: Option<i64>,
}

struct Slot {
    entry: ConsumerEntry,
    queue: VecDeque<Part>,
    busy: bool,
    stats: ConsumerStats,
    quarantined: bool,
}

struct Track {
    pending: usize,
}

/// Manager settings.
#[derive(Debug, Clone, Default)]
pub struct ManagerConfig {
    /// Extra Canal filter ORed into the consumers' one.
    pub extra_filter: String,
}

/// The Manager actor.
pub struct Manager {
    cfg: ManagerConfig,
    connection: Option<ConnectionLink>,
    slots: Vec<Slot>,
    batches: BTreeMap<BatchRef, Track>,
    epoch: u64,
}

/// Give the Manager its connection (the connection is created with the Manager's address).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachConnection(pub ConnectionLink);

/// What the Manager sends to the connection.
#[derive(Clone)]
pub struct ConnectionLink {
    pub ack: Recipient<AckBatch>,
    pub rollback: Recipient<RollbackBatch>,
    pub filter: Recipient<SetFilter>,
}

impl From<&Addr<CanalConnection>> for ConnectionLink {
    fn from(addr: &Addr<CanalConnection>) -> Self {
        ConnectionLink {
            ack: addr.clone().recipient(),
            rollback: addr.clone().recipient(),
            filter: addr.clone().recipient(),
        }
    }
}

/// Enable or disable a consumer live.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct SetEnabled {
    pub name: String,
    pub enabled: bool,
}

/// Ask for a status snapshot.
#[derive(Message)]
#[rtype(result = "ManagerStatus")]
pub struct GetManagerStatus;

#[derive(Debug, Clone, Serialize, Default)]
pub struct ManagerStatus {
    pub batches_in_flight: usize,
    pub consumers: Vec<ConsumerStats>,
    pub filter: String,
}

/// A part finished (internal).
#[derive(Message)]
#[rtype(result = "()")]
struct PartDone {
    slot: usize,
    batch: BatchRef,
    result: Result<(), String>,
    executed_at: Option<i64>,
}

impl Manager {
    pub fn new(cfg: ManagerConfig, consumers: Vec<ConsumerEntry>) -> Self {
        let slots = consumers
            .into_iter()
            .map(|entry| Slot {
                stats: ConsumerStats {
                    name: entry.name.clone(),
                    ..Default::default()
                },
                entry,
                queue: VecDeque::new(),
                busy: false,
                quarantined: false,
            })
            .collect();
        Manager {
            cfg,
            connection: None,
            slots,
            batches: BTreeMap::new(),
            epoch: 0,
        }
    }

    /// The Canal subscription filter for the enabled consumers.
    pub fn filter(&self) -> String {
        let mut parts = vec![canal_filter(
            self.slots
                .iter()
                .filter(|s| s.entry.enabled)
                .flat_map(|s| s.entry.filters.iter()),
        )];
        if !self.cfg.extra_filter.is_empty() {
            parts.push(self.cfg.extra_filter.clone());
        }
        parts.retain(|p| !p.is_empty());
        parts.join(",")
    }

    fn route(&mut self, batch: Batch, ctx: &mut Context<Self>) {
        if batch.batch.epoch < self.epoch {
            return;
        }
        self.epoch = batch.batch.epoch;
        let mut pending = 0;
        let mut to_kick = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if !slot.entry.enabled {
                continue;
            }
            let indices: Vec<usize> = batch
                .events
                .iter()
                .enumerate()
                .filter(|(_, e)| slot.entry.filters.iter().any(|f| f.matches(e)))
                .map(|(i, _)| i)
                .collect();
            if indices.is_empty() {
                continue;
            }
            slot.stats.events += indices.len() as u64;
            slot.queue.push_back(Part {
                batch: batch.batch,
                events: batch.events.clone(),
                indices: Arc::new(indices),
            });
            pending += 1;
            to_kick.push(i);
        }
        if pending == 0 {
            self.ack(batch.batch);
            return;
        }
        self.batches.insert(batch.batch, Track { pending });
        for i in to_kick {
            self.kick(i, ctx);
        }
    }

    fn ack(&self, batch: BatchRef) {
        if let Some(conn) = &self.connection {
            conn.ack.do_send(AckBatch(batch));
        }
    }

    fn rollback(&mut self, batch: BatchRef, reason: String) {
        if self.batches.remove(&batch).is_none() {
            return; // already rolled back or from an older epoch
        }
        if let Some(conn) = &self.connection {
            conn.rollback.do_send(RollbackBatch { batch, reason });
        }
    }

    /// Send the next queued part of a consumer, if it is idle.
    fn kick(&mut self, i: usize, ctx: &mut Context<Self>) {
        let epoch = self.epoch;
        let slot = &mut self.slots[i];
        // drop parts of abandoned epochs
        while slot.queue.front().is_some_and(|p| p.batch.epoch < epoch) {
            slot.queue.pop_front();
        }
        if slot.busy {
            return;
        }
        let Some(part) = slot.queue.front() else {
            return;
        };
        slot.busy = true;
        let batch = part.batch;
        let last_at = part
            .indices
            .last()
            .and_then(|&j| part.events.get(j))
            .map(|e| e.executed_at);
        let msg = ProcessBatch {
            events: part.events.clone(),
            indices: part.indices.clone(),
        };
        let fut = slot.entry.addr.send(msg);
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            let slot = &mut act.slots[i];
            slot.busy = false;
            match res {
                Ok(Ok(processed)) => {
                    // a reset may already have removed it
                    if slot.queue.front().is_some_and(|p| p.batch == batch) {
                        slot.queue.pop_front();
                    }
                    slot.stats.triggers += processed.triggers as u64;
                    slot.stats.errors += processed.event_errors as u64;
                    slot.stats.state = "running";
                    act.await_confirm(i, batch, processed, last_at, ctx);
                    act.kick(i, ctx);
                }
                Ok(Err(failure)) => act.part_failed(i, batch, failure, ctx),
                Err(mailbox) => {
                    // the actor stopped while handling it (restart in progress)
                    let failure = ProcessFailure::Restarting {
                        retry_in: Duration::from_millis(50),
                    };
                    tracing::debug!(error = %mailbox, "consumer mailbox error");
                    act.part_failed(i, batch, failure, ctx)
                }
            }
        }));
    }

    fn part_failed(
        &mut self,
        i: usize,
        batch: BatchRef,
        failure: ProcessFailure,
        ctx: &mut Context<Self>,
    ) {
        let slot = &mut self.slots[i];
        match &failure {
            ProcessFailure::Failed {
                error,
                restarts,
                retry_in,
            } => {
                slot.stats.errors += 1;
                slot.stats.restarts = *restarts;
                slot.stats.last_error = Some(error.clone());
                slot.stats.state = "retrying";
                let delay = *retry_in;
                ctx.run_later(delay, move |act, ctx| act.kick(i, ctx));
            }
            ProcessFailure::Restarting { retry_in } => {
                slot.stats.state = "retrying";
                let delay = *retry_in;
                ctx.run_later(delay, move |act, ctx| act.kick(i, ctx));
            }
            ProcessFailure::Quarantined {
                restarts,
                last_error,
            } => {
                slot.stats.restarts = *restarts;
                slot.stats.last_error = Some(last_error.clone());
                slot.quarantined = true;
                // The part cannot be processed: nothing of this batch may be acked.
                slot.queue.clear();
                let reason = format!("consumer '{}' is quarantined", slot.entry.name);
                self.rollback(batch, reason);
            }
        }
    }

    fn await_confirm(
        &mut self,
        i: usize,
        batch: BatchRef,
        processed: Processed,
        executed_at: Option<i64>,
        ctx: &mut Context<Self>,
    ) {
        let me = ctx.address();
        actix::spawn(async move {
            let result = match processed.confirmed.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("publisher dropped the confirmation".to_string()),
            };
            me.do_send(PartDone {
                slot: i,
                batch,
                result,
                executed_at,
            });
        });
    }
}

impl Actor for Manager {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(4096);
    }
}

impl Handler<AttachConnection> for Manager {
    type Result = ();

    fn handle(&mut self, msg: AttachConnection, _: &mut Context<Self>) {
        self.connection = Some(msg.0);
    }
}

impl Handler<CanalEvent> for Manager {
    type Result = ();

    fn handle(&mut self, msg: CanalEvent, ctx: &mut Context<Self>) {
        match msg {
            CanalEvent::Batch(batch) => self.route(batch, ctx),
            CanalEvent::Reset { epoch, reason } => {
                tracing::info!(epoch, reason = %reason, "batch tracking reset");
                self.epoch = epoch;
                self.batches.retain(|b, _| b.epoch >= epoch);
                for slot in &mut self.slots {
                    slot.queue.retain(|p| p.batch.epoch >= epoch);
                }
            }
            CanalEvent::Fatal { error } => {
                tracing::error!(error = %error, "canal connection gave up; stopping");
                System::current().stop_with_code(2);
            }
        }
    }
}

impl Handler<PartDone> for Manager {
    type Result = ();

    fn handle(&mut self, msg: PartDone, _: &mut Context<Self>) {
        match msg.result {
            Ok(()) => {
                if let Some(at) = msg.executed_at {
                    self.slots[msg.slot].stats.confirmed_executed_at = Some(at);
                }
                let Some(track) = self.batches.get_mut(&msg.batch) else {
                    return;
                };
                track.pending -= 1;
                if track.pending == 0 {
                    self.batches.remove(&msg.batch);
                    self.ack(msg.batch);
                }
            }
            Err(reason) => {
                let slot = &mut self.slots[msg.slot];
                slot.stats.last_error = Some(reason.clone());
                tracing::warn!(
                    consumer = %slot.entry.name,
                    batch = %msg.batch,
                    error = %reason,
                    "publish failed; rolling back the batch"
                );
                self.rollback(msg.batch, reason);
            }
        }
    }
}

impl Handler<SetEnabled> for Manager {
    type Result = Result<(), String>;

    fn handle(&mut self, msg: SetEnabled, ctx: &mut Context<Self>) -> Self::Result {
        let Some(i) = self.slots.iter().position(|s| s.entry.name == msg.name) else {
            return Err(format!("no consumer named '{}'", msg.name));
        };
        let slot = &mut self.slots[i];
        slot.entry.enabled = msg.enabled;
        if msg.enabled {
            slot.quarantined = false;
            slot.stats.state = "running";
            slot.entry.addr.do_send(Reinstate);
        } else {
            // Its queued parts no longer hold their batches back.
            let parts: Vec<BatchRef> = slot.queue.drain(..).map(|p| p.batch).collect();
            for b in parts {
                if let Some(t) = self.batches.get_mut(&b) {
                    t.pending -= 1;
                    if t.pending == 0 {
                        self.batches.remove(&b);
                        self.ack(b);
                    }
                }
            }
        }
        tracing::info!(consumer = %msg.name, enabled = msg.enabled, "consumer state changed");
        let filter = self.filter();
        if let Some(conn) = &self.connection {
            conn.filter.do_send(SetFilter(filter));
        }
        self.kick(i, ctx);
        Ok(())
    }
}

impl Handler<GetManagerStatus> for Manager {
    type Result = MessageResult<GetManagerStatus>;

    fn handle(&mut self, _: GetManagerStatus, _: &mut Context<Self>) -> Self::Result {
        let consumers = self
            .slots
            .iter()
            .map(|s| {
                let mut st = s.stats.clone();
                st.enabled = s.entry.enabled;
                st.queued_parts = s.queue.len();
                st.state = if !s.entry.enabled {
                    "disabled"
                } else if s.quarantined {
                    "quarantined"
                } else if st.state.is_empty() {
                    "running"
                } else {
                    st.state
                };
                st
            })
            .collect();
        MessageResult(ManagerStatus {
            batches_in_flight: self.batches.len(),
            consumers,
            filter: self.filter(),
        })
    }
}
