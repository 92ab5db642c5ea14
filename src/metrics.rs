//! The service's metrics: one registry shared by every actor, rendered for Prometheus.
//!
//! [`Metrics`] is created once and handed around as a [`MetricsHandle`] (`Arc<Metrics>`). The
//! series are `prometheus-client` counters and gauges (relaxed atomics) registered in one
//! [`Registry`]; [`Metrics::render`] is that crate's Prometheus text encoder (format 0.0.4,
//! `# HELP` and `# TYPE` lines, label values escaped). Process-wide series are plain fields;
//! per-consumer series are families with the label `consumer`, the only label. Label
//! cardinality is bounded: after [`MAX_CONSUMER_SERIES`] names, further names share one
//! `consumer="_other"` series.
//!
//! Who updates them: the actors keep their own counts in their status snapshots, and the
//! admin endpoint copies a fresh snapshot into the registry at every scrape
//! (`admin::server::observe`): counters catch up with the actors' totals
//! ([`Counter::observe`], never backwards), gauges take the snapshot's values. The one series
//! updated between scrapes is the histogram `canal_commit_to_confirm_seconds`
//! ([`LatencyHistogram`]), which the Manager observes as parts are confirmed (a distribution
//! cannot be copied from a snapshot). Nothing here fails.
//!
//! The exported names (what `deploy/grafana` and `deploy/prometheus` query):
//! `canal_{batches,events,rollbacks,reconnects,rewind_skipped}_total`, `canal_inflight_batches`,
//! `canal_lag_seconds`, `canal_commit_to_confirm_seconds` (histogram),
//! `canal_heartbeat_trips_total`, `canal_heartbeat_trip_seconds`,
//! `publisher_{published,confirmed,returned,nacked,timeouts}_total`,
//! `publisher_unconfirmed`, `publisher_blocked`, `ha_active` (1 active or no ZooKeeper, 0 standby),
//! and per consumer
//! `consumer_{events,triggers,errors,restarts}_total`, `consumer_lag_seconds`,
//! `consumer_enabled`; per table column whose text arrived with U+FFFD (UTF-8 mode, see
//! `canal::lossy`) `canal_lossy_text_rows_total{database,table,column}` (bounded by the
//! schema: one series per such column); per backfill that is not done or cancelled
//! `backfill_rows_{read,emitted,estimated,per_second}{backfill,table}` and
//! `backfill_rereads{backfill,table}`, and `backfills{state}` (bounded by the backfills an
//! operator keeps running).

use dashmap::DashMap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter as PromCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge as PromGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// The content type of [`Metrics::render`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Most distinct consumer names given their own series.
pub const MAX_CONSUMER_SERIES: usize = 1000;

/// The label value shared by consumers beyond [`MAX_CONSUMER_SERIES`].
pub const OVERFLOW_CONSUMER: &str = "_other";

/// The shared handle.
pub type MetricsHandle = Arc<Metrics>;

/// A monotonically increasing count (a registered `prometheus-client` counter).
#[derive(Debug, Clone, Default)]
pub struct Counter(PromCounter<u64, AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.inc_by(n);
    }
    pub fn get(&self) -> u64 {
        self.0.get()
    }
    /// Catch up with a count kept elsewhere (an actor's status): never goes backwards, so it
    /// can be mixed with [`Counter::inc`] without double counting.
    pub fn observe(&self, total: u64) {
        self.0.inner().fetch_max(total, Ordering::Relaxed);
    }
}

/// A value that goes up and down.
#[derive(Debug, Clone, Default)]
pub struct Gauge(PromGauge<i64, AtomicI64>);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.set(v);
    }
    pub fn set_bool(&self, v: bool) {
        self.set(v as i64);
    }
    pub fn add(&self, n: i64) {
        self.0.inc_by(n);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn dec(&self) {
        self.add(-1);
    }
    pub fn get(&self) -> i64 {
        self.0.get()
    }
}

/// A floating-point gauge (seconds of lag).
#[derive(Debug, Clone, Default)]
pub struct FloatGauge(PromGauge<f64, AtomicU64>);

impl FloatGauge {
    pub fn set(&self, v: f64) {
        self.0.set(v);
    }
    pub fn get(&self) -> f64 {
        self.0.get()
    }
}

/// The buckets of `canal_commit_to_confirm_seconds`: 1 ms to 60 s.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// A latency distribution in seconds (a registered `prometheus-client` histogram).
#[derive(Debug, Clone)]
pub struct LatencyHistogram(Histogram);

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram(Histogram::new(LATENCY_BUCKETS))
    }
}

impl LatencyHistogram {
    pub fn observe(&self, seconds: f64) {
        self.0.observe(seconds);
    }
}

/// One consumer's series (label `consumer`): handles into the registry's families.
#[derive(Debug, Clone, Default)]
pub struct ConsumerMetrics {
    /// Events routed to the consumer.
    pub events_total: Counter,
    /// Plugin triggers it emitted.
    pub triggers_total: Counter,
    /// Events it failed to handle.
    pub errors_total: Counter,
    /// Supervisor restarts.
    pub restarts_total: Counter,
    pub parked_total: Counter,
    /// Now minus the source time of the newest event it handled.
    pub lag_seconds: FloatGauge,
    /// 1 when enabled, 0 when disabled.
    pub enabled: Gauge,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumerLabel {
    consumer: String,
}

/// The per-consumer families, registered once.
#[derive(Debug, Default)]
struct ConsumerFamilies {
    events_total: Family<ConsumerLabel, PromCounter<u64, AtomicU64>>,
    triggers_total: Family<ConsumerLabel, PromCounter<u64, AtomicU64>>,
    errors_total: Family<ConsumerLabel, PromCounter<u64, AtomicU64>>,
    restarts_total: Family<ConsumerLabel, PromCounter<u64, AtomicU64>>,
    parked_total: Family<ConsumerLabel, PromCounter<u64, AtomicU64>>,
    lag_seconds: Family<ConsumerLabel, PromGauge<f64, AtomicU64>>,
    enabled: Family<ConsumerLabel, PromGauge<i64, AtomicI64>>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ColumnLabel {
    database: String,
    table: String,
    column: String,
}

/// Every metric of the service.
#[derive(Debug)]
pub struct Metrics {
    pub canal_batches_total: Counter,
    pub canal_events_total: Counter,
    pub canal_rollbacks_total: Counter,
    pub canal_reconnects_total: Counter,
    pub canal_rewind_skipped_total: Counter,
    pub canal_inflight_batches: Gauge,
    pub canal_lag_seconds: FloatGauge,
    /// Commit on the source to confirmed by the broker, per live event (observed by the Manager).
    pub canal_commit_to_confirm_seconds: LatencyHistogram,
    pub canal_heartbeat_trips_total: Counter,
    pub canal_heartbeat_trip_seconds: FloatGauge,
    pub publisher_published_total: Counter,
    pub publisher_confirmed_total: Counter,
    pub publisher_returned_total: Counter,
    pub publisher_nacked_total: Counter,
    pub publisher_timeouts_total: Counter,
    pub publisher_unconfirmed: Gauge,
    pub publisher_blocked: Gauge,
    /// 1 while this replica is the active one (always 1 without ZooKeeper), 0 on standby.
    pub ha_active: Gauge,
    families: ConsumerFamilies,
    consumers: DashMap<String, Arc<ConsumerMetrics>>,
    lossy_text_rows: Family<ColumnLabel, PromCounter<u64, AtomicU64>>,
    backfills: BackfillFamilies,
    registry: Registry,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackfillLabel {
    backfill: String,
    table: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

/// Backfill series: per backfill that is not done or cancelled (label `backfill`, `table`),
/// and a count per state. Rebuilt at every scrape, so a finished backfill leaves them.
#[derive(Debug, Default)]
struct BackfillFamilies {
    rows_read: Family<BackfillLabel, PromGauge<i64, AtomicI64>>,
    rows_emitted: Family<BackfillLabel, PromGauge<i64, AtomicI64>>,
    rows_estimated: Family<BackfillLabel, PromGauge<i64, AtomicI64>>,
    rows_per_second: Family<BackfillLabel, PromGauge<f64, AtomicU64>>,
    rereads: Family<BackfillLabel, PromGauge<i64, AtomicI64>>,
    by_state: Family<StateLabel, PromGauge<i64, AtomicI64>>,
}

/// What the backfill series show of one backfill.
#[derive(Debug, Clone, PartialEq)]
pub struct BackfillFigures {
    pub id: String,
    pub table: String,
    pub state: &'static str,
    pub rows_read: u64,
    pub rows_emitted: u64,
    pub rows_estimated: u64,
    pub rows_per_second: Option<f64>,
    pub rereads: u64,
}

/// `prometheus-client` adds `_total` to counter names and a full stop to help texts.
fn counter_name(name: &str) -> &str {
    name.strip_suffix("_total").unwrap_or(name)
}

fn help(text: &str) -> &str {
    text.strip_suffix('.').unwrap_or(text)
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            canal_batches_total: Counter::default(),
            canal_events_total: Counter::default(),
            canal_rollbacks_total: Counter::default(),
            canal_reconnects_total: Counter::default(),
            canal_rewind_skipped_total: Counter::default(),
            canal_inflight_batches: Gauge::default(),
            canal_lag_seconds: FloatGauge::default(),
            canal_commit_to_confirm_seconds: LatencyHistogram::default(),
            canal_heartbeat_trips_total: Counter::default(),
            canal_heartbeat_trip_seconds: FloatGauge::default(),
            publisher_published_total: Counter::default(),
            publisher_confirmed_total: Counter::default(),
            publisher_returned_total: Counter::default(),
            publisher_nacked_total: Counter::default(),
            publisher_timeouts_total: Counter::default(),
            publisher_unconfirmed: Gauge::default(),
            publisher_blocked: Gauge::default(),
            ha_active: Gauge::default(),
            families: ConsumerFamilies::default(),
            consumers: DashMap::new(),
            lossy_text_rows: Family::default(),
            backfills: BackfillFamilies::default(),
            registry: Registry::default(),
        };
        m.register();
        m
    }
}

impl Metrics {
    pub fn new() -> MetricsHandle {
        Arc::new(Metrics::default())
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        let counters: [(&str, &str, &Counter); 11] = [
            (
                "canal_batches_total",
                "Canal batches fetched.",
                &self.canal_batches_total,
            ),
            (
                "canal_events_total",
                "Row changes and statements decoded from Canal batches.",
                &self.canal_events_total,
            ),
            (
                "canal_rollbacks_total",
                "Canal rollbacks (batches to be redelivered).",
                &self.canal_rollbacks_total,
            ),
            (
                "canal_reconnects_total",
                "Reconnections to the Canal server.",
                &self.canal_reconnects_total,
            ),
            (
                "canal_rewind_skipped_total",
                "Events Canal sent again at or before the newest confirmed position (its cursor went backwards), acked without being delivered.",
                &self.canal_rewind_skipped_total,
            ),
            (
                "canal_heartbeat_trips_total",
                "Heartbeat rows ([heartbeat] enabled) written by this process that came back through Canal.",
                &self.canal_heartbeat_trips_total,
            ),
            (
                "publisher_published_total",
                "Task messages published to the broker.",
                &self.publisher_published_total,
            ),
            (
                "publisher_confirmed_total",
                "Task messages confirmed (acked) by the broker.",
                &self.publisher_confirmed_total,
            ),
            (
                "publisher_returned_total",
                "Task messages returned as unroutable by the broker.",
                &self.publisher_returned_total,
            ),
            (
                "publisher_nacked_total",
                "Task messages nacked by the broker.",
                &self.publisher_nacked_total,
            ),
            (
                "publisher_timeouts_total",
                "Task messages not confirmed within amqp.confirm_timeout.",
                &self.publisher_timeouts_total,
            ),
        ];
        for (name, text, c) in counters {
            r.register(counter_name(name), help(text), c.0.clone());
        }
        let gauges: [(&str, &str, &Gauge); 4] = [
            (
                "canal_inflight_batches",
                "Canal batches fetched and not yet acked.",
                &self.canal_inflight_batches,
            ),
            (
                "publisher_unconfirmed",
                "Task messages published and not yet confirmed.",
                &self.publisher_unconfirmed,
            ),
            (
                "publisher_blocked",
                "1 while the broker blocks publishing (resource alarm), else 0.",
                &self.publisher_blocked,
            ),
            (
                "ha_active",
                "1 while this replica is the active one (always 1 without ZooKeeper), 0 on standby.",
                &self.ha_active,
            ),
        ];
        for (name, text, g) in gauges {
            r.register(name, help(text), g.0.clone());
        }
        r.register(
            "canal_lag_seconds",
            help(
                "How far the stream is behind the source, in seconds. With [heartbeat] enabled: the trip time of the newest heartbeat when every heartbeat written came through (near 0 when idle), else now minus the write time of the oldest one not yet seen (a tick missed while Canal was not connected counts), and at most the age of the newest change that came through. Without heartbeats: now minus the source time of the newest fetched event (grows on an idle database).",
            ),
            self.canal_lag_seconds.0.clone(),
        );
        r.register(
            "canal_heartbeat_trip_seconds",
            help(
                "Trip time of the newest heartbeat: written to the watermark table until it came through Canal to the service.",
            ),
            self.canal_heartbeat_trip_seconds.0.clone(),
        );
        r.register(
            "canal_commit_to_confirm_seconds",
            help(
                "Per live event (SNAPSHOT rows left out): from its commit on the source to the broker's confirm of its consumer's triggers. The commit time is the binlog's, in whole seconds, so each observation is up to 1 s high.",
            ),
            self.canal_commit_to_confirm_seconds.0.clone(),
        );
        let f = &self.families;
        r.register(
            counter_name("consumer_events_total"),
            help("Events routed to the consumer."),
            f.events_total.clone(),
        );
        r.register(
            counter_name("consumer_triggers_total"),
            help("Plugin triggers emitted by the consumer."),
            f.triggers_total.clone(),
        );
        r.register(
            counter_name("consumer_errors_total"),
            help("Events the consumer failed to handle."),
            f.errors_total.clone(),
        );
        r.register(
            counter_name("consumer_restarts_total"),
            help("Supervisor restarts of the consumer."),
            f.restarts_total.clone(),
        );
        r.register(
            counter_name("consumer_parked_total"),
            help("Events (or refused triggers) the consumer parked in the dead-letter queue."),
            f.parked_total.clone(),
        );
        r.register(
            "consumer_lag_seconds",
            help(
                "Seconds between now and the source time of the newest event the consumer handled.",
            ),
            f.lag_seconds.clone(),
        );
        r.register(
            "consumer_enabled",
            help("1 when the consumer is enabled, 0 when disabled."),
            f.enabled.clone(),
        );
        r.register(
            counter_name("canal_lossy_text_rows_total"),
            help(
                "Rows whose text in this column arrived with U+FFFD: Canal decoded a non-UTF-8 column lossily (canal.connection_charset = UTF-8).",
            ),
            self.lossy_text_rows.clone(),
        );
        let b = &self.backfills;
        r.register(
            "backfill_rows_read",
            help("Rows a backfill has read in confirmed chunks (backfills not done or cancelled)."),
            b.rows_read.clone(),
        );
        r.register(
            "backfill_rows_emitted",
            help("Rows a backfill emitted as SNAPSHOT events, confirmed."),
            b.rows_emitted.clone(),
        );
        r.register(
            "backfill_rows_estimated",
            help("The source's estimate of the rows a backfill reads, when it started."),
            b.rows_estimated.clone(),
        );
        r.register(
            "backfill_rows_per_second",
            help("A running backfill's recent rate on this replica."),
            b.rows_per_second.clone(),
        );
        r.register(
            "backfill_rereads",
            help("Chunks a backfill had to read again (timeouts, rollbacks, DDL)."),
            b.rereads.clone(),
        );
        r.register(
            "backfills",
            help("Backfills of this service by state."),
            b.by_state.clone(),
        );
    }

    /// Replace the backfill series with `all` (every backfill of the service).
    pub fn observe_backfills(&self, all: &[BackfillFigures]) {
        let b = &self.backfills;
        b.rows_read.clear();
        b.rows_emitted.clear();
        b.rows_estimated.clear();
        b.rows_per_second.clear();
        b.rereads.clear();
        b.by_state.clear();
        for f in all {
            b.by_state
                .get_or_create(&StateLabel {
                    state: f.state.to_string(),
                })
                .inc();
            if matches!(f.state, "done" | "cancelled") {
                continue;
            }
            let l = BackfillLabel {
                backfill: f.id.clone(),
                table: f.table.clone(),
            };
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            b.rows_read.get_or_create(&l).set(n(f.rows_read));
            b.rows_emitted.get_or_create(&l).set(n(f.rows_emitted));
            b.rows_estimated.get_or_create(&l).set(n(f.rows_estimated));
            b.rereads.get_or_create(&l).set(n(f.rereads));
            if let Some(r) = f.rows_per_second {
                b.rows_per_second.get_or_create(&l).set(r);
            }
        }
    }

    /// Catch up with the count of rows whose text in `database.table.column` arrived lossy.
    pub fn observe_lossy_text(&self, database: &str, table: &str, column: &str, rows: u64) {
        let label = ColumnLabel {
            database: database.to_string(),
            table: table.to_string(),
            column: column.to_string(),
        };
        self.lossy_text_rows
            .get_or_create(&label)
            .inner()
            .fetch_max(rows, Ordering::Relaxed);
    }

    /// The series of one consumer, created on first use.
    pub fn consumer(&self, name: &str) -> Arc<ConsumerMetrics> {
        if let Some(m) = self.consumers.get(name) {
            return m.clone();
        }
        let key = if self.consumers.len() >= MAX_CONSUMER_SERIES {
            OVERFLOW_CONSUMER
        } else {
            name
        };
        self.consumers
            .entry(key.to_string())
            .or_insert_with(|| {
                let label = ConsumerLabel {
                    consumer: key.to_string(),
                };
                let f = &self.families;
                Arc::new(ConsumerMetrics {
                    events_total: Counter(f.events_total.get_or_create_owned(&label)),
                    triggers_total: Counter(f.triggers_total.get_or_create_owned(&label)),
                    errors_total: Counter(f.errors_total.get_or_create_owned(&label)),
                    restarts_total: Counter(f.restarts_total.get_or_create_owned(&label)),
                    parked_total: Counter(f.parked_total.get_or_create_owned(&label)),
                    lag_seconds: FloatGauge(f.lag_seconds.get_or_create_owned(&label)),
                    enabled: Gauge(f.enabled.get_or_create_owned(&label)),
                })
            })
            .clone()
    }

    /// Drop a consumer's series (it was removed from the configuration).
    pub fn remove_consumer(&self, name: &str) {
        if self.consumers.remove(name).is_some() {
            let label = ConsumerLabel {
                consumer: name.to_string(),
            };
            let f = &self.families;
            f.events_total.remove(&label);
            f.triggers_total.remove(&label);
            f.errors_total.remove(&label);
            f.restarts_total.remove(&label);
            f.parked_total.remove(&label);
            f.lag_seconds.remove(&label);
            f.enabled.remove(&label);
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail; the encoder's only error is the writer's.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_parse::{Scrape, Value};

    fn parse(text: &str) -> Scrape {
        Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
    }

    fn value(s: &Scrape, name: &str, consumer: Option<&str>) -> Value {
        s.samples
            .iter()
            .find(|x| x.metric == name && x.labels.get("consumer") == consumer)
            .unwrap_or_else(|| panic!("no sample {name} {consumer:?}"))
            .value
            .clone()
    }

    #[test]
    fn renders_and_parses_back() {
        let m = Metrics::new();
        m.canal_batches_total.add(3);
        m.canal_events_total.add(120);
        m.canal_rollbacks_total.inc();
        m.canal_inflight_batches.set(2);
        m.canal_lag_seconds.set(1.5);
        m.publisher_published_total.add(10);
        m.publisher_confirmed_total.add(9);
        m.publisher_unconfirmed.set(1);
        m.publisher_blocked.set_bool(true);
        let a = m.consumer("example_consumer");
        a.events_total.add(7);
        a.triggers_total.add(5);
        a.enabled.set(1);
        a.lag_seconds.set(0.25);
        let b = m.consumer("teacher_consumer");
        b.errors_total.inc();
        b.restarts_total.add(2);

        let text = m.render();
        let s = parse(&text);
        assert_eq!(value(&s, "canal_batches_total", None), Value::Counter(3.0));
        assert_eq!(value(&s, "canal_events_total", None), Value::Counter(120.0));
        assert_eq!(
            value(&s, "canal_rollbacks_total", None),
            Value::Counter(1.0)
        );
        assert_eq!(
            value(&s, "canal_reconnects_total", None),
            Value::Counter(0.0)
        );
        assert_eq!(value(&s, "canal_inflight_batches", None), Value::Gauge(2.0));
        assert_eq!(value(&s, "canal_lag_seconds", None), Value::Gauge(1.5));
        assert_eq!(
            value(&s, "publisher_published_total", None),
            Value::Counter(10.0)
        );
        assert_eq!(
            value(&s, "publisher_confirmed_total", None),
            Value::Counter(9.0)
        );
        assert_eq!(value(&s, "publisher_unconfirmed", None), Value::Gauge(1.0));
        assert_eq!(value(&s, "publisher_blocked", None), Value::Gauge(1.0));
        let ex = Some("example_consumer");
        let te = Some("teacher_consumer");
        assert_eq!(value(&s, "consumer_events_total", ex), Value::Counter(7.0));
        assert_eq!(
            value(&s, "consumer_triggers_total", ex),
            Value::Counter(5.0)
        );
        assert_eq!(value(&s, "consumer_enabled", ex), Value::Gauge(1.0));
        assert_eq!(value(&s, "consumer_lag_seconds", ex), Value::Gauge(0.25));
        assert_eq!(value(&s, "consumer_errors_total", te), Value::Counter(1.0));
        assert_eq!(
            value(&s, "consumer_restarts_total", te),
            Value::Counter(2.0)
        );
        assert_eq!(value(&s, "consumer_enabled", te), Value::Gauge(0.0));
        // Every metric has HELP and TYPE.
        for name in [
            "canal_batches_total",
            "publisher_timeouts_total",
            "consumer_lag_seconds",
        ] {
            assert!(s.docs.contains_key(name), "no HELP for {name}");
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "no TYPE for {name}"
            );
        }
        // The same handle is returned for the same name.
        m.consumer("example_consumer").events_total.inc();
        assert_eq!(a.events_total.get(), 8);
    }

    #[test]
    fn commit_to_confirm_is_a_histogram_from_1ms_to_60s() {
        let m = Metrics::new();
        m.canal_commit_to_confirm_seconds.observe(0.003);
        m.canal_commit_to_confirm_seconds.observe(0.7);
        m.canal_commit_to_confirm_seconds.observe(90.0);
        let text = m.render();
        assert!(
            text.contains("# TYPE canal_commit_to_confirm_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("canal_commit_to_confirm_seconds_bucket{le=\"0.001\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("canal_commit_to_confirm_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("canal_commit_to_confirm_seconds_bucket{le=\"60\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("canal_commit_to_confirm_seconds_bucket{le=\"+Inf\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("canal_commit_to_confirm_seconds_count 3"),
            "{text}"
        );
        let s = parse(&text);
        assert!(s.docs.contains_key("canal_commit_to_confirm_seconds"));
        assert!(s.docs.contains_key("canal_heartbeat_trips_total"));
    }

    #[test]
    fn label_values_are_escaped_and_cardinality_bounded() {
        let m = Metrics::new();
        m.consumer("we\"ird").events_total.inc();
        assert!(
            m.render()
                .contains("consumer_events_total{consumer=\"we\\\"ird\"} 1")
        );
        for i in 0..MAX_CONSUMER_SERIES + 5 {
            m.consumer(&format!("c{i}")).events_total.inc();
        }
        assert!(m.consumers.len() <= MAX_CONSUMER_SERIES + 1);
        assert!(m.consumers.contains_key(OVERFLOW_CONSUMER));
    }

    #[test]
    fn special_floats_render_as_prometheus_expects() {
        let m = Metrics::new();
        m.canal_lag_seconds.set(f64::INFINITY);
        assert!(m.render().contains("\ncanal_lag_seconds +Inf\n"));
        m.canal_lag_seconds.set(f64::NAN);
        assert!(m.render().contains("\ncanal_lag_seconds NaN\n"));
        m.canal_lag_seconds.set(2.0);
        let s = parse(&m.render());
        assert_eq!(value(&s, "canal_lag_seconds", None), Value::Gauge(2.0));
    }

    #[test]
    fn a_removed_consumer_leaves_the_exposition() {
        let m = Metrics::new();
        m.consumer("gone").events_total.inc();
        m.consumer("kept").events_total.inc();
        m.remove_consumer("gone");
        let text = m.render();
        assert!(!text.contains("consumer=\"gone\""), "{text}");
        assert!(
            text.contains("consumer_events_total{consumer=\"kept\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn observe_never_goes_backwards() {
        let c = Counter::default();
        c.observe(10);
        c.observe(4);
        assert_eq!(c.get(), 10);
        c.inc();
        c.observe(11);
        assert_eq!(c.get(), 11);
    }
}
