//! The service's metrics: one registry shared by every actor, rendered for Prometheus.
//!
//! [`Metrics`] is created once and handed around as a [`MetricsHandle`] (`Arc<Metrics>`).
//! Updating is a relaxed atomic operation, so actors update freely on their hot paths; nothing
//! here locks except the first lookup of a consumer's series. Process-wide series are plain
//! fields; per-consumer series live in a map keyed by consumer name, the only label besides
//! fixed ones. Label cardinality is bounded: after [`MAX_CONSUMER_SERIES`] names, further
//! names share one `consumer="_other"` series.
//!
//! Actors may update the series directly; the admin endpoint also refreshes them from the
//! status snapshots at every scrape (`admin::server::observe`), so the counters are right even
//! where an actor does not touch the registry.
//!
//! [`Metrics::render`] writes the Prometheus text exposition format (version 0.0.4) with
//! `# HELP` and `# TYPE` lines, label values escaped. Nothing here fails.

use dashmap::DashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Most distinct consumer names given their own series.
pub const MAX_CONSUMER_SERIES: usize = 1000;

/// The label value shared by consumers beyond [`MAX_CONSUMER_SERIES`].
pub const OVERFLOW_CONSUMER: &str = "_other";

/// The shared handle.
pub type MetricsHandle = Arc<Metrics>;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    /// Catch up with a count kept elsewhere (an actor's status): never goes backwards, so it
    /// can be mixed with [`Counter::inc`] without double counting.
    pub fn observe(&self, total: u64) {
        self.0.fetch_max(total, Ordering::Relaxed);
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn set_bool(&self, v: bool) {
        self.set(v as i64);
    }
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn dec(&self) {
        self.add(-1);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A floating-point gauge (seconds of lag).
#[derive(Debug, Default)]
pub struct FloatGauge(AtomicU64);

impl FloatGauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// One consumer's series (label `consumer`).
#[derive(Debug, Default)]
pub struct ConsumerMetrics {
    /// Events routed to the consumer.
    pub events_total: Counter,
    /// Plugin triggers it emitted.
    pub triggers_total: Counter,
    /// Events it failed to handle.
    pub errors_total: Counter,
    /// Supervisor restarts.
    pub restarts_total: Counter,
    /// Now minus the source time of the newest event it handled.
    pub lag_seconds: FloatGauge,
    /// 1 when enabled, 0 when disabled.
    pub enabled: Gauge,
}

/// Every metric of the service.
#[derive(Debug, Default)]
pub struct Metrics {
    pub canal_batches_total: Counter,
    pub canal_events_total: Counter,
    pub canal_rollbacks_total: Counter,
    pub canal_reconnects_total: Counter,
    pub canal_inflight_batches: Gauge,
    pub canal_lag_seconds: FloatGauge,
    pub publisher_published_total: Counter,
    pub publisher_confirmed_total: Counter,
    pub publisher_returned_total: Counter,
    pub publisher_nacked_total: Counter,
    pub publisher_timeouts_total: Counter,
    pub publisher_unconfirmed: Gauge,
    pub publisher_blocked: Gauge,
    consumers: DashMap<String, Arc<ConsumerMetrics>>,
}

enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn as_str(&self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// Escape a label value: backslash, double quote and newline.
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        v.to_string()
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: Kind) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {}", kind.as_str());
}

impl Metrics {
    pub fn new() -> MetricsHandle {
        Arc::new(Metrics::default())
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
        self.consumers.entry(key.to_string()).or_default().clone()
    }

    /// Drop a consumer's series (it was removed from the configuration).
    pub fn remove_consumer(&self, name: &str) {
        self.consumers.remove(name);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let counters: [(&str, &str, &Counter); 9] = [
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
        for (name, help, c) in counters {
            header(&mut out, name, help, Kind::Counter);
            let _ = writeln!(out, "{name} {}", c.get());
        }
        let gauges: [(&str, &str, &Gauge); 3] = [
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
        ];
        for (name, help, g) in gauges {
            header(&mut out, name, help, Kind::Gauge);
            let _ = writeln!(out, "{name} {}", g.get());
        }
        header(
            &mut out,
            "canal_lag_seconds",
            "Seconds between now and the source time of the newest fetched event.",
            Kind::Gauge,
        );
        let _ = writeln!(
            out,
            "canal_lag_seconds {}",
            number(self.canal_lag_seconds.get())
        );

        let mut consumers: Vec<(String, Arc<ConsumerMetrics>)> = self
            .consumers
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        consumers.sort_by(|a, b| a.0.cmp(&b.0));
        type Pick = fn(&ConsumerMetrics) -> String;
        let per_consumer: [(&str, &str, Kind, Pick); 6] = [
            (
                "consumer_events_total",
                "Events routed to the consumer.",
                Kind::Counter,
                |m| m.events_total.get().to_string(),
            ),
            (
                "consumer_triggers_total",
                "Plugin triggers emitted by the consumer.",
                Kind::Counter,
                |m| m.triggers_total.get().to_string(),
            ),
            (
                "consumer_errors_total",
                "Events the consumer failed to handle.",
                Kind::Counter,
                |m| m.errors_total.get().to_string(),
            ),
            (
                "consumer_restarts_total",
                "Supervisor restarts of the consumer.",
                Kind::Counter,
                |m| m.restarts_total.get().to_string(),
            ),
            (
                "consumer_lag_seconds",
                "Seconds between now and the source time of the newest event the consumer handled.",
                Kind::Gauge,
                |m| number(m.lag_seconds.get()),
            ),
            (
                "consumer_enabled",
                "1 when the consumer is enabled, 0 when disabled.",
                Kind::Gauge,
                |m| m.enabled.get().to_string(),
            ),
        ];
        for (name, help, kind, pick) in per_consumer {
            header(&mut out, name, help, kind);
            for (consumer, m) in &consumers {
                let _ = writeln!(
                    out,
                    "{name}{{consumer=\"{}\"}} {}",
                    escape_label_value(consumer),
                    pick(m)
                );
            }
        }
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
    fn label_values_are_escaped_and_cardinality_bounded() {
        assert_eq!(escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
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
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NEG_INFINITY), "-Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(2.0), "2");
    }
}
