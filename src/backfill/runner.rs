//! The backfill runner: for as long as the service runs, it reads the records, reads chunks of
//! the running backfills (one read at a time, live batches first, smaller and slower while
//! live changes flow), hands their rows to the
//! stream through the Manager, waits for their outcomes, and stores progress. Each chunk's
//! decisions (what to read next, when progress may move, when to store it) are in the pure
//! core [`crate::manager::snapshot::chunks::Chunks`]; this is its shell. A failure of the source
//! database is retried with backoff and never loses progress: a chunk counts only once
//! confirmed, and one read again keeps its message ids.

use super::*;

/// A backfill this replica runs.
struct Active {
    /// As listed when it started here (its progress lives in `chunks`).
    b: Backfill,
    chunks: Chunks,
    layout: Option<Layout>,
    /// Every consumer it is for is disabled: no reads.
    held: bool,
    /// When it last moved (for its rate figure).
    since: Instant,
    /// Its last chunk yielded to live changes.
    yielding: bool,
}

/// What the runner keeps between steps.
#[derive(Default)]
struct Runner {
    active: BTreeMap<String, Active>,
    /// The outcomes of chunks read: (backfill, nonce, outcome or `None` when timed out).
    pending: FuturesUnordered<LocalBoxFuture<'static, (String, String, Option<Outcome>)>>,
    /// When the records were last read (`None`: read them now).
    listed: Option<Instant>,
    turn: usize,
}

/// A table's layout as a backfill last read it.
#[derive(Debug, Clone)]
struct Layout {
    meta: TableMeta,
    /// The stream's DDL count of the table before it was read ([`DdlSeen`]).
    ddl_seen: u64,
    read_at: Instant,
}

impl Backfills {
    /// The runner: read chunks of running backfills, one read at a time, and wait for their
    /// outcomes, for as long as the service runs. While a backfill's chunk waits for its
    /// confirms, its next chunk (or another backfill's) may be read.
    pub async fn run(self: Arc<Self>) {
        let backoff =
            crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut failures = 0u32;
        let mut r = Runner::default();
        loop {
            match self.step(&mut r).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    let wait = backoff.delay(failures);
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, retry_in = ?wait, transient = e.is_transient(), "backfill runner: the source database failed; trying again");
                    r.listed = None;
                    tokio::time::sleep(wait).await;
                }
            }
            if let Ok(mut held) = self.held.lock() {
                held.reading = r
                    .active
                    .iter()
                    // a stopped one until what it did is stored
                    .filter(|(_, a)| a.chunks.outstanding() > 0 || a.chunks.stopping())
                    .map(|(id, _)| id.clone())
                    .collect();
                held.active = r.active.keys().cloned().collect();
                held.yielding = r
                    .active
                    .iter()
                    .filter(|(_, a)| a.yielding)
                    .map(|(id, _)| id.clone())
                    .collect();
            }
        }
    }

    /// Whether this replica streams and the live stream leaves room for a chunk: `None` when
    /// not, else whether live changes flow (the chunk then yields to them, [`Settings::live`]).
    /// Live batches go first, but a stream that never leaves room does not starve the
    /// backfill: after [`MAX_YIELD`] of waiting a chunk goes anyway. `own`: chunks in flight,
    /// whose watermark batches (a low and a high each, at most) are not live batches.
    ///
    /// The batches counted are the Manager's: delivered and not yet confirmed. The
    /// connection's count would include confirmed batches whose acks wait behind a long poll
    /// (up to `canal.fetch_wait` when nothing is committed); a gate on it kept the next chunk
    /// from starting until that poll ended, and since only the chunk would have committed
    /// anything, the poll always ran its full time.
    async fn may_read(&self, own: usize) -> Option<bool> {
        match self.connection.send(GetConnectionStatus).await {
            Ok(st) if st.state == ConnectionState::Connected => {}
            _ => return None,
        }
        let manager = self.manager.send(GetManagerStatus).await.ok()?;
        let live = manager
            .live_at
            .is_some_and(|t| t.elapsed() < self.settings.live_window);
        let mut busy = self.busy_since.lock().ok()?;
        if manager.batches_in_flight <= self.settings.max_live_batches + 2 * own {
            *busy = None;
            return Some(live);
        }
        let since = *busy.get_or_insert_with(Instant::now);
        if since.elapsed() >= MAX_YIELD {
            *busy = None;
            return Some(live);
        }
        None
    }

    /// One step of the runner: the outcomes that came, the records when due, progress to
    /// store, then one read, or a wait for the next thing to do.
    async fn step(&self, r: &mut Runner) -> Result<(), BackfillError> {
        while let Some(Some((id, nonce, o))) = r.pending.next().now_or_never() {
            self.outcome(r, id, nonce, o).await;
        }
        let now = Instant::now();
        if r.listed.is_none_or(|t| now >= t + LIST_EVERY) {
            self.sync(r).await?;
            r.listed = Some(now);
        }
        self.settle(r).await?;
        let mut busy = false;
        if let Some(id) = self.next_read(r, now) {
            let own = r.active.values().map(|a| a.chunks.outstanding()).sum();
            if let Some(live) = self.may_read(own).await {
                return self.read(r, &id, live).await;
            }
            busy = true;
        }
        // nothing to do now: wait for an outcome, an operator, or the next due time
        let mut until = r.listed.unwrap_or(now) + LIST_EVERY;
        for a in r.active.values() {
            let read_at = (!a.held).then(|| a.chunks.not_before()).flatten();
            for t in [a.chunks.save_at(), read_at].into_iter().flatten() {
                until = until.min(t);
            }
        }
        if busy {
            until = until.min(now + Duration::from_millis(20));
        }
        let until = until.max(now + Duration::from_millis(1));
        tokio::select! {
            Some((id, nonce, o)) = r.pending.next(), if !r.pending.is_empty() => {
                self.outcome(r, id, nonce, o).await;
            }
            _ = self.wake.notified() => r.listed = None,
            _ = tokio::time::sleep_until(until.into()) => {}
        }
        Ok(())
    }

    /// Read the records: backfills to run here, the ones an operator stopped, the ones whose
    /// consumers are all disabled.
    async fn sync(&self, r: &mut Runner) -> Result<(), BackfillError> {
        let mut all = self.source.list(&self.settings.owner).await?;
        let now = Instant::now();
        for b in &all {
            match (b.state, r.active.get_mut(&b.id)) {
                (State::Running, None) => {
                    let bulk_only =
                        self.bulk_only(&b.spec.database, &b.spec.table, b.spec.consumer.as_deref());
                    let mut live = self.settings.live;
                    let consumer = b.spec.consumer.as_deref();
                    if let Some(p) = self.bulk_period(&b.spec.database, &b.spec.table, consumer) {
                        // smaller reads only where they cut the same bulks (and ids)
                        live = live.bulk(p, b.spec.chunk);
                    }
                    let chunks = Chunks::new(
                        b.progress.clone(),
                        b.spec.chunk,
                        b.spec.rate,
                        self.settings.pace.outstanding(bulk_only),
                    )
                    .with_yield(live);
                    r.active.insert(
                        b.id.clone(),
                        Active {
                            b: b.clone(),
                            chunks,
                            layout: None,
                            held: false,
                            since: now,
                            yielding: false,
                        },
                    );
                }
                (State::Running, Some(_)) => {}
                (_, Some(a)) => {
                    a.chunks.stop();
                }
                _ => {}
            }
        }
        for (id, a) in r.active.iter_mut() {
            if !all.iter().any(|b| b.id == *id) {
                a.chunks.stop();
            }
        }
        for a in r.active.values_mut() {
            let why = self.no_taker_enabled(&a.b).await;
            a.held = why.is_some();
            if why.is_some() {
                // rows emitted now would reach nobody
                a.chunks.note(why, now);
            }
        }
        for b in all.iter_mut() {
            if let Some(a) = r.active.get(&b.id) {
                b.progress = a.chunks.progress().clone();
            }
        }
        if let Ok(mut s) = self.seen.lock() {
            *s = all;
        }
        Ok(())
    }

    /// Show `id`'s progress in `status` (see [`Self::seen`]).
    fn show(&self, id: &str, p: &Progress) {
        if let Ok(mut s) = self.seen.lock()
            && let Some(b) = s.iter_mut().find(|b| b.id == id)
        {
            b.progress = p.clone();
        }
    }

    /// Store what is due: the progress no low watermark will carry soon, and the backfills
    /// done or stopped here.
    async fn settle(&self, r: &mut Runner) -> Result<(), BackfillError> {
        let now = Instant::now();
        let ids: Vec<String> = r.active.keys().cloned().collect();
        for id in ids {
            let Some(a) = r.active.get_mut(&id) else {
                continue;
            };
            if a.chunks.finished() {
                let p = a.chunks.progress().clone();
                self.finish(&a.b, p).await?;
                r.active.remove(&id);
            } else if a.chunks.stopped() {
                // what it did before the operator stopped it
                if let Some((_, p)) = a.chunks.to_fold() {
                    self.source.save_progress(&id, &p).await?;
                }
                r.active.remove(&id);
            } else if a.chunks.save_due(now)
                && let Some((version, p)) = a.chunks.to_fold()
            {
                self.source.save_progress(&id, &p).await?;
                a.chunks.stored(version);
            }
        }
        Ok(())
    }

    /// The backfill whose chunk is read next (in turn among those that may read now).
    fn next_read(&self, r: &mut Runner, now: Instant) -> Option<String> {
        let ready: Vec<&String> = r
            .active
            .iter()
            .filter(|(_, a)| !a.held && a.chunks.may_read(now))
            .map(|(id, _)| id)
            .collect();
        if ready.is_empty() {
            return None;
        }
        r.turn = (r.turn + 1) % ready.len();
        Some(ready[r.turn].clone())
    }

    /// `b`'s table layout, read again: the stream's DDL count first, so that a DDL after the
    /// read makes its chunks fail ([`ChunkPlan::layout`]).
    async fn read_layout(&self, b: &Backfill) -> Result<Layout, BackfillError> {
        let ddl_seen = self
            .manager
            .send(DdlSeen(b.spec.database.clone(), b.spec.table.clone()))
            .await
            .unwrap_or(0);
        let read_at = Instant::now();
        let meta = self
            .source
            .table_meta(&b.spec.database, &b.spec.table)
            .await?;
        Ok(Layout {
            meta,
            ddl_seen,
            read_at,
        })
    }

    /// Read one chunk of backfill `id` (low watermark with its unstored progress, SELECT,
    /// rows to the Manager, high watermark); its outcome comes later. `live`: live changes
    /// flow, so the chunk yields to them.
    async fn read(&self, r: &mut Runner, id: &str, live: bool) -> Result<(), BackfillError> {
        let Some(a) = r.active.get_mut(id) else {
            return Ok(());
        };
        let layout = match a
            .layout
            .clone()
            .filter(|l| l.read_at.elapsed() < LAYOUT_TTL)
        {
            Some(l) => l,
            None => match self.read_layout(&a.b).await {
                Ok(l) => {
                    a.layout = Some(l.clone());
                    l
                }
                Err(BackfillError::Invalid(why)) => return self.fail(r, id, why).await,
                Err(e) => return Err(e),
            },
        };
        let meta = layout.meta;
        let key: Vec<String> = meta.key.iter().map(|k| k.to_string()).collect();
        if key != a.b.spec.key_columns {
            let why = format!(
                "the primary key of {} changed from ({}) to ({}) during the backfill; start a new one",
                a.b.spec.full_table(),
                a.b.spec.key_columns.join(", "),
                key.join(", ")
            );
            return self.fail(r, id, why).await;
        }
        let Some(max) = a.chunks.progress().max_key.clone() else {
            return Ok(()); // nothing to read: finished
        };
        let nonce = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let (after, asked) = a.chunks.begin(&nonce, Instant::now(), live);
        a.yielding = live && self.settings.live != Yield::default();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let plan = ChunkPlan {
            nonce: nonce.clone(),
            backfill: Arc::<str>::from(id),
            database: Arc::<str>::from(meta.database.as_str()),
            table: Arc::<str>::from(meta.table.as_str()),
            key_columns: meta.key.clone(),
            consumer: a.b.spec.consumer.as_deref().map(Arc::<str>::from),
            layout: layout.ddl_seen,
        };
        if self
            .manager
            .send(ExpectChunk {
                plan,
                done: done_tx,
            })
            .await
            .is_err()
        {
            a.chunks.abandon(&nonce);
            return Ok(()); // the service is stopping
        }
        let fold = a.chunks.to_fold();
        let read = async {
            if !self
                .source
                .write_low_watermark(id, &format!("low:{nonce}"), fold.as_ref().map(|f| &f.1))
                .await?
            {
                return Ok(None); // paused or cancelled meanwhile
            }
            let rows = self
                .source
                .read_chunk(
                    &meta,
                    a.b.spec.condition.as_deref(),
                    after.as_deref(),
                    &max,
                    asked,
                )
                .await?;
            Ok::<_, BackfillError>(Some(rows))
        };
        let rows = match read.await {
            Ok(Some(rows)) => rows,
            Ok(None) => {
                // paused or cancelled meanwhile: read the records before storing what it did
                self.manager.do_send(ForgetChunk(nonce.clone()));
                a.chunks.abandon(&nonce);
                a.chunks.stop();
                r.listed = None;
                return Ok(());
            }
            Err(e) => {
                self.manager.do_send(ForgetChunk(nonce.clone()));
                a.chunks.abandon(&nonce);
                a.layout = None;
                return Err(e);
            }
        };
        if let Some((version, _)) = fold {
            a.chunks.stored(version);
        }
        a.chunks.read(
            &nonce,
            rows.len(),
            rows.last().map(|r| key_values(r, &meta.key)),
        );
        let handed = self
            .manager
            .send(ChunkRows {
                nonce: nonce.clone(),
                rows,
            })
            .await
            .unwrap_or(false);
        if !handed {
            a.chunks.abandon(&nonce);
            return Ok(());
        }
        if let Err(e) = self
            .source
            .write_watermark(id, &format!("high:{nonce}"))
            .await
        {
            self.manager.do_send(ForgetChunk(nonce.clone()));
            a.chunks.abandon(&nonce);
            return Err(e);
        }
        a.chunks.high_written(&nonce);
        let timeout = self.settings.chunk_timeout;
        let id = id.to_string();
        r.pending.push(Box::pin(async move {
            let o = match tokio::time::timeout(timeout, done_rx).await {
                Ok(Ok(o)) => Some(o),
                Ok(Err(_)) => Some(Outcome::Failed("the service dropped the chunk".into())),
                Err(_) => None,
            };
            (id, nonce, o)
        }));
        Ok(())
    }

    /// How read `nonce` of backfill `id` ended (`None`: not within `backfill.chunk_timeout`).
    async fn outcome(&self, r: &mut Runner, id: String, nonce: String, o: Option<Outcome>) {
        let o = match o {
            Some(o) => o,
            None => {
                let why = self
                    .manager
                    .send(ForgetChunk(nonce.clone()))
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| "it was not done".into());
                Outcome::Failed(format!(
                    "{why} (backfill.chunk_timeout {:?})",
                    self.settings.chunk_timeout
                ))
            }
        };
        let Some(a) = r.active.get_mut(&id) else {
            return;
        };
        let now = Instant::now();
        match o {
            Outcome::Confirmed { emitted, dropped } => {
                let moved = a.chunks.confirmed(&nonce, emitted, dropped, now);
                if moved.chunks > 0 {
                    self.note_rate(&id, moved.rows, now.duration_since(a.since));
                    a.since = now;
                }
            }
            Outcome::Failed(why) => {
                if !a.chunks.nonces().any(|n| n == nonce) {
                    return; // forgotten: an earlier chunk failed
                }
                tracing::info!(backfill = %id, table = %a.b.spec.full_table(), reason = %why, "backfill chunk read again");
                for later in a.chunks.failed(&nonce, &why, now) {
                    self.manager.do_send(ForgetChunk(later));
                }
                a.layout = None;
            }
        }
        self.show(&id, a.chunks.progress());
    }

    /// Why `b` must wait: every consumer it is for is disabled (its rows would reach nobody).
    async fn no_taker_enabled(&self, b: &Backfill) -> Option<String> {
        let status = self.manager.send(GetManagerStatus).await.ok()?;
        let targets: Vec<&str> = match &b.spec.consumer {
            Some(c) => vec![c.as_str()],
            None => self.takers(&b.spec.database, &b.spec.table),
        };
        let enabled = status
            .consumers
            .iter()
            .any(|c| c.enabled && targets.contains(&c.name.as_str()));
        (!enabled).then(|| {
            format!(
                "waiting: every consumer it is for is disabled ({}); enable one to go on",
                targets.join(", ")
            )
        })
    }

    fn note_rate(&self, id: &str, rows: u64, took: Duration) {
        let now = rows as f64 / took.as_secs_f64().max(1e-3);
        if let Ok(mut r) = self.rates.lock() {
            let e = r.entry(id.to_string()).or_default();
            e.rows_per_second = if e.rows_per_second == 0.0 {
                now
            } else {
                0.7 * e.rows_per_second + 0.3 * now
            };
        }
    }

    async fn finish(&self, b: &Backfill, mut p: Progress) -> Result<(), BackfillError> {
        p.error = None;
        let mut done = p.clone();
        done.finished_at = Some(now_ms());
        if !self
            .source
            .set_state(
                &b.id,
                State::Running,
                State::Done,
                ProgressWrite::Replace(&done),
            )
            .await?
        {
            // paused or cancelled while its last chunk was in flight: keep what it did
            return self.source.save_progress(&b.id, &p).await;
        }
        let p = done;
        tracing::info!(
            backfill = %b.id,
            table = %b.spec.full_table(),
            rows_read = p.rows_read,
            rows_emitted = p.rows_emitted,
            rows_dropped = p.rows_dropped,
            chunks = p.chunks,
            "backfill done"
        );
        Ok(())
    }

    /// Backfill `id` cannot go on (`why`): forget its reads, store it failed.
    async fn fail(&self, r: &mut Runner, id: &str, why: String) -> Result<(), BackfillError> {
        let Some(a) = r.active.get_mut(id) else {
            return Ok(());
        };
        for nonce in a.chunks.nonces() {
            self.manager.do_send(ForgetChunk(nonce.to_string()));
        }
        let mut p = a.chunks.progress().clone();
        p.error = Some(why.clone());
        self.source
            .set_state(
                id,
                State::Running,
                State::Failed,
                ProgressWrite::Replace(&p),
            )
            .await?;
        tracing::error!(backfill = %id, table = %a.b.spec.full_table(), error = %why, "backfill failed");
        r.active.remove(id);
        Ok(())
    }
}
