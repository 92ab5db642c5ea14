//! `/metrics` from a status snapshot: the one place the service's metric families are named
//! and mapped to the status fields they show.
//!
//! At each scrape the admin endpoint takes a fresh [`ServiceStatus`] (the same snapshot
//! `GET /status` serves) and encodes it through [`Snapshot`], a `prometheus-client`
//! [`Collector`]; [`crate::metrics::Metrics`] adds the one series kept between scrapes (the
//! commit-to-confirm histogram). Nothing is mirrored: a counter is the actor's own total, read
//! at scrape time, so `status` and `/metrics` cannot disagree. `admin::coverage` checks that
//! every figure of the status has a metric and a line of `status` (or is a listed exception).
//!
//! The exported names (what `deploy/grafana` and `deploy/prometheus` query):
//! `canal_{batches,events,rollbacks,reconnects,rewind_skipped}_total`, `canal_inflight_batches`,
//! `canal_lag_seconds`, `canal_commit_to_confirm_seconds` (histogram),
//! `canal_heartbeat_trips_total`, `canal_heartbeat_trip_seconds`,
//! `publisher_{published,confirmed,returned,nacked,timeouts}_total`,
//! `publisher_unconfirmed`, `publisher_blocked`, `ha_active` (1 active or no ZooKeeper, 0
//! standby), and per consumer `consumer_{events,triggers,errors,restarts,parked}_total`,
//! `consumer_lag_seconds`, `consumer_enabled`; per table column whose text arrived with U+FFFD
//! (UTF-8 mode, see `canal::lossy`) `canal_lossy_text_rows_total{database,table,column}`
//! (bounded by the schema); per backfill that is not done or cancelled
//! `backfill_rows_{read,emitted,estimated,per_second}{backfill,table}` and
//! `backfill_rereads{backfill,table}`, and `backfills{state}`.
//!
//! Label cardinality is bounded: after [`MAX_CONSUMER_SERIES`] consumers, the others share one
//! `consumer="_other"` series (counters summed, gauges at their largest).
//!
//! How it fails: it does not; a part of the service that did not answer for this snapshot
//! ([`ServiceStatus::unanswered`]) has its series left out of this scrape (Prometheus marks
//! them stale) rather than shown as zeros, which a counter would read as a reset.

use super::{Part, ServiceStatus};
use crate::backfill::BackfillView;
use crate::manager::ConsumerStatus;
use crate::metrics::{
    BackfillFigures, BackfillLabel, ColumnLabel, ConsumerLabel, MAX_CONSUMER_SERIES, Metrics,
    OVERFLOW_CONSUMER, Sink, StateLabel,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use std::collections::BTreeMap;
use std::fmt::Result;

/// One status snapshot, as a collector (see the module docs).
#[derive(Debug)]
pub struct Snapshot {
    pub status: ServiceStatus,
    /// The wall clock of the scrape (ms since the epoch), for lags.
    pub now_ms: i64,
}

/// The whole exposition of `metrics` and `status`.
pub fn render(metrics: &Metrics, status: ServiceStatus, now_ms: i64) -> String {
    metrics.render(Snapshot { status, now_ms })
}

impl Collector for Snapshot {
    fn encode(&self, e: DescriptorEncoder) -> Result {
        let mut out = Sink::from(e);
        let s = &self.status;
        let answered = |p| !s.unanswered.contains(&p);
        if answered(Part::Canal) {
            canal(&mut out, s)?;
        }
        if answered(Part::Manager) {
            heartbeat(&mut out, s)?;
        }
        if let Some(b) = &s.broker {
            publisher(&mut out, b)?;
        }
        if answered(Part::Canal) {
            out.gauge(
                "ha_active",
                "1 while this replica is the active one (always 1 without ZooKeeper), 0 on standby.",
                u64::from(
                    s.canal
                        .ha
                        .as_ref()
                        .is_none_or(|h| h.role == crate::ha::Role::Active),
                ),
            )?;
        }
        lag(&mut out, s, self.now_ms)?;
        consumers(&mut out, &s.consumers)?;
        out.counters(
            "canal_lossy_text_rows_total",
            "Rows whose text in this column arrived with U+FFFD: Canal decoded a non-UTF-8 column lossily (canal.connection_charset = UTF-8).",
            s.lossy_text.iter().map(|c| {
                let label = ColumnLabel {
                    database: c.database.clone(),
                    table: c.table.clone(),
                    column: c.column.clone(),
                };
                (label, c.rows)
            }),
        )?;
        backfills(&mut out, &s.backfills)
    }
}

fn canal(out: &mut Sink, s: &ServiceStatus) -> Result {
    let c = &s.canal;
    out.counter(
        "canal_batches_total",
        "Canal batches fetched.",
        c.batches_received,
    )?;
    out.counter(
        "canal_events_total",
        "Row changes and statements decoded from Canal batches.",
        c.events_received,
    )?;
    out.counter(
        "canal_rollbacks_total",
        "Canal rollbacks (batches to be redelivered).",
        c.rollbacks,
    )?;
    out.counter(
        "canal_reconnects_total",
        "Reconnections to the Canal server.",
        c.reconnects,
    )?;
    out.counter(
        "canal_rewind_skipped_total",
        "Events Canal sent again at or before the newest confirmed position (its cursor went backwards), acked without being delivered.",
        c.rewind_skipped,
    )?;
    out.gauge(
        "canal_inflight_batches",
        "Canal batches fetched and not yet acked.",
        s.batches_in_flight.max(c.inflight_batches) as u64,
    )
}

fn heartbeat(out: &mut Sink, s: &ServiceStatus) -> Result {
    let hb = s.heartbeat.as_ref();
    out.counter(
        "canal_heartbeat_trips_total",
        "Heartbeat rows ([heartbeat] enabled) written by this process that came back through Canal.",
        hb.map_or(0, |h| h.trips),
    )?;
    out.gauge(
        "canal_heartbeat_trip_seconds",
        "Trip time of the newest heartbeat: written to the watermark table until it came through Canal to the service.",
        hb.and_then(|h| h.last_trip_ms)
            .map_or(0.0, |ms| ms as f64 / 1000.0),
    )
}

fn publisher(out: &mut Sink, b: &crate::publisher::PublisherStatus) -> Result {
    let c = &b.counters;
    out.counter(
        "publisher_published_total",
        "Task messages published to the broker.",
        c.published,
    )?;
    out.counter(
        "publisher_confirmed_total",
        "Task messages confirmed (acked) by the broker.",
        c.confirmed,
    )?;
    out.counter(
        "publisher_returned_total",
        "Task messages returned as unroutable by the broker.",
        c.returned,
    )?;
    out.counter(
        "publisher_nacked_total",
        "Task messages nacked by the broker.",
        c.nacked,
    )?;
    out.counter(
        "publisher_timeouts_total",
        "Task messages not confirmed within amqp.confirm_timeout.",
        c.timeouts,
    )?;
    out.gauge(
        "publisher_unconfirmed",
        "Task messages published and not yet confirmed.",
        b.unconfirmed as u64,
    )?;
    out.gauge(
        "publisher_blocked",
        "1 while the broker blocks publishing (resource alarm), else 0.",
        u64::from(b.state == crate::publisher::PublisherState::Blocked),
    )
}

/// `canal_lag_seconds`: with heartbeats, their lag once there is one (see `manager::heartbeat`);
/// else the age of the newest fetched event; 0 before anything came through.
fn lag(out: &mut Sink, s: &ServiceStatus, now_ms: i64) -> Result {
    let heartbeat = s.heartbeat.as_ref().and_then(|hb| hb.lag_seconds);
    let fetched = s
        .canal
        .last_executed_at
        .filter(|_| !s.unanswered.contains(&Part::Canal))
        .map(|t| (now_ms - t).max(0) as f64 / 1000.0);
    let Some(lag) = heartbeat.or(fetched).or_else(|| {
        // nothing known yet: 0, unless the part that would know did not answer
        (!s.unanswered.contains(&Part::Canal)).then_some(0.0)
    }) else {
        return Ok(());
    };
    out.gauge(
        "canal_lag_seconds",
        "How far the stream is behind the source, in seconds. With [heartbeat] enabled: the trip time of the newest heartbeat when every heartbeat written came through (near 0 when idle), else now minus the write time of the oldest one not yet seen (a tick missed while Canal was not connected counts), and at most the age of the newest change that came through. Without heartbeats: now minus the source time of the newest fetched event (grows on an idle database).",
        lag,
    )
}

/// One value per consumer label: the first [`MAX_CONSUMER_SERIES`] consumers of the status, the
/// rest merged into [`OVERFLOW_CONSUMER`] with `merge`.
fn by_consumer<V: Copy>(
    list: &[ConsumerStatus],
    value: impl Fn(&ConsumerStatus) -> V,
    merge: impl Fn(V, V) -> V,
) -> Vec<(ConsumerLabel, V)> {
    let label = |consumer: &str| ConsumerLabel {
        consumer: consumer.to_string(),
    };
    let mut out: Vec<(ConsumerLabel, V)> =
        Vec::with_capacity(list.len().min(MAX_CONSUMER_SERIES + 1));
    let mut other: Option<V> = None;
    for (i, c) in list.iter().enumerate() {
        let v = value(c);
        if i < MAX_CONSUMER_SERIES {
            out.push((label(&c.name), v));
        } else {
            other = Some(other.map_or(v, |o| merge(o, v)));
        }
    }
    if let Some(v) = other {
        out.push((label(OVERFLOW_CONSUMER), v));
    }
    out
}

/// A per-consumer counter: its name, help and field.
type ConsumerCounter = (&'static str, &'static str, fn(&ConsumerStatus) -> u64);

fn consumers(out: &mut Sink, list: &[ConsumerStatus]) -> Result {
    let counters: [ConsumerCounter; 5] = [
        (
            "consumer_events_total",
            "Events routed to the consumer.",
            |c| c.events,
        ),
        (
            "consumer_triggers_total",
            "Plugin triggers emitted by the consumer.",
            |c| c.triggers,
        ),
        (
            "consumer_errors_total",
            "Events the consumer failed to handle.",
            |c| c.errors,
        ),
        (
            "consumer_restarts_total",
            "Supervisor restarts of the consumer.",
            |c| c.restarts,
        ),
        (
            "consumer_parked_total",
            "Events (or refused triggers) the consumer parked in the dead-letter queue.",
            |c| c.parked,
        ),
    ];
    for (name, help, value) in counters {
        out.counters(name, help, by_consumer(list, value, u64::saturating_add))?;
    }
    out.gauges(
        "consumer_lag_seconds",
        "Seconds between now and the source time of the newest event the consumer handled.",
        by_consumer(list, |c| c.lag_seconds.unwrap_or(0.0), f64::max),
    )?;
    out.gauges(
        "consumer_enabled",
        "1 when the consumer is enabled, 0 when disabled.",
        by_consumer(list, |c| u64::from(c.enabled), u64::max),
    )
}

fn backfills(out: &mut Sink, all: &[BackfillView]) -> Result {
    let figures: Vec<BackfillFigures> = all.iter().map(BackfillView::figures).collect();
    let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
    for f in &figures {
        *by_state.entry(f.state).or_default() += 1;
    }
    // per backfill: those not done or cancelled
    let live: Vec<&BackfillFigures> = figures
        .iter()
        .filter(|f| !matches!(f.state, "done" | "cancelled"))
        .collect();
    let label = |f: &BackfillFigures| BackfillLabel {
        backfill: f.id.clone(),
        table: f.table.clone(),
    };
    let each = |value: fn(&BackfillFigures) -> u64| {
        live.iter()
            .map(|f| (label(f), value(f)))
            .collect::<Vec<_>>()
    };
    out.gauges(
        "backfill_rows_read",
        "Rows a backfill has read in confirmed chunks (backfills not done or cancelled).",
        each(|f| f.rows_read),
    )?;
    out.gauges(
        "backfill_rows_emitted",
        "Rows a backfill emitted as SNAPSHOT events, confirmed.",
        each(|f| f.rows_emitted),
    )?;
    out.gauges(
        "backfill_rows_estimated",
        "The source's estimate of the rows a backfill reads, when it started.",
        each(|f| f.rows_estimated),
    )?;
    out.gauges(
        "backfill_rows_per_second",
        "A running backfill's recent rate on this replica.",
        live.iter()
            .filter_map(|f| f.rows_per_second.map(|r| (label(f), r))),
    )?;
    out.gauges(
        "backfill_rereads",
        "Chunks a backfill had to read again (timeouts, rollbacks, DDL).",
        each(|f| f.rereads),
    )?;
    out.gauges(
        "backfills",
        "Backfills of this service by state.",
        by_state.into_iter().map(|(state, n)| {
            let state = state.to_string();
            (StateLabel { state }, n)
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::HeartbeatStatus;
    use prometheus_parse::{Scrape, Value};

    fn scrape(s: &ServiceStatus, now_ms: i64) -> Scrape {
        let text = render(&Metrics::default(), s.clone(), now_ms);
        Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
    }

    fn value(s: &Scrape, name: &str, consumer: Option<&str>) -> Option<Value> {
        s.samples
            .iter()
            .find(|x| x.metric == name && x.labels.get("consumer") == consumer)
            .map(|x| x.value.clone())
    }

    fn gauge(s: &Scrape, name: &str) -> f64 {
        match value(s, name, None) {
            Some(Value::Gauge(v)) => v,
            v => panic!("{name}: {v:?}"),
        }
    }

    #[test]
    fn lag_comes_from_heartbeats_when_they_are_on() {
        let mut s = ServiceStatus::new();
        s.canal.last_executed_at = Some(1_000);
        // without heartbeats: the age of the newest fetched event
        assert_eq!(gauge(&scrape(&s, 7_000), "canal_lag_seconds"), 6.0);
        // with them, before the first one came through: the same
        s.heartbeat = Some(HeartbeatStatus::default());
        assert_eq!(gauge(&scrape(&s, 8_000), "canal_lag_seconds"), 7.0);
        // then their lag, however long the database has been idle
        s.heartbeat = Some(HeartbeatStatus {
            lag_seconds: Some(0.004),
            trips: 5,
            last_trip_ms: Some(4),
            ..Default::default()
        });
        let m = scrape(&s, 60_000);
        assert_eq!(gauge(&m, "canal_lag_seconds"), 0.004);
        assert_eq!(gauge(&m, "canal_heartbeat_trip_seconds"), 0.004);
        assert_eq!(
            value(&m, "canal_heartbeat_trips_total", None),
            Some(Value::Counter(5.0))
        );
    }

    #[test]
    fn consumers_have_their_series_and_the_many_share_one() {
        let mut s = ServiceStatus::new();
        let one = |i: usize| ConsumerStatus {
            name: format!("c{i}"),
            enabled: true,
            events: 2,
            lag_seconds: Some(i as f64),
            ..Default::default()
        };
        s.consumers = (0..MAX_CONSUMER_SERIES + 3).map(one).collect();
        let m = scrape(&s, 0);
        assert_eq!(
            value(&m, "consumer_events_total", Some("c1")),
            Some(Value::Counter(2.0))
        );
        assert_eq!(
            value(&m, "consumer_events_total", Some(OVERFLOW_CONSUMER)),
            Some(Value::Counter(6.0))
        );
        assert_eq!(
            value(&m, "consumer_lag_seconds", Some(OVERFLOW_CONSUMER)),
            Some(Value::Gauge((MAX_CONSUMER_SERIES + 2) as f64))
        );
        let series = m
            .samples
            .iter()
            .filter(|x| x.metric == "consumer_events_total")
            .count();
        assert_eq!(series, MAX_CONSUMER_SERIES + 1);
        // a removed consumer is simply not in the next snapshot
        s.consumers.truncate(1);
        let m = scrape(&s, 0);
        assert_eq!(value(&m, "consumer_events_total", Some("c1")), None);
    }

    #[test]
    fn a_part_that_did_not_answer_leaves_its_series_out() {
        let mut s = ServiceStatus::new();
        s.canal.batches_received = 9;
        assert_eq!(
            value(&scrape(&s, 0), "canal_batches_total", None),
            Some(Value::Counter(9.0))
        );
        s.unanswered = vec![Part::Canal, Part::Manager];
        let m = scrape(&s, 0);
        for name in [
            "canal_batches_total",
            "canal_inflight_batches",
            "canal_lag_seconds",
            "canal_heartbeat_trips_total",
            "ha_active",
        ] {
            assert_eq!(value(&m, name, None), None, "{name}");
        }
    }
}
