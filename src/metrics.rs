//! The service's metrics: the Prometheus text exposition, and the one series kept between
//! scrapes.
//!
//! Nearly every figure `/metrics` shows is a field of the service's status snapshot (what
//! `GET /status` serves): the admin endpoint takes a fresh snapshot at each scrape and encodes
//! it through a `prometheus-client` [`Collector`] (`admin::exposition`), so each counter exists
//! once, in the actor that counts it, and a metric cannot drift from `status`. What lives here
//! is what a snapshot cannot give and the plumbing:
//!
//! - [`Metrics`]: the registry of series updated between scrapes. There is one, the histogram
//!   `canal_commit_to_confirm_seconds` ([`LatencyHistogram`]), which the Manager observes as
//!   parts are confirmed (a distribution cannot be read from a snapshot). [`Metrics::render`]
//!   encodes it followed by a snapshot's collector, with `prometheus-client`'s text encoder
//!   (format 0.0.4: `# HELP` and `# TYPE` lines, label values escaped).
//! - [`Sink`]: how a collector writes a family: name, help and value(s) in one call, so each
//!   metric is spelled once. Counter names are given with their `_total` (as dashboards query
//!   them); a family without series is left out (as `prometheus-client` does for its own).
//! - The label sets ([`ConsumerLabel`], [`ColumnLabel`], [`BackfillLabel`], [`StateLabel`]) and
//!   [`BackfillFigures`], what a backfill shows.
//!
//! Nothing here fails: writing into a `String` cannot fail, and the encoder's only error is
//! the writer's.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// The content type of [`Metrics::render`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Most distinct consumer names given their own series.
pub const MAX_CONSUMER_SERIES: usize = 1000;

/// The label value shared by consumers beyond [`MAX_CONSUMER_SERIES`].
pub const OVERFLOW_CONSUMER: &str = "_other";

/// The shared handle.
pub type MetricsHandle = Arc<Metrics>;

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

/// The label of per-consumer series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabel {
    pub consumer: String,
}

/// The labels of per-column series (lossy text).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ColumnLabel {
    pub database: String,
    pub table: String,
    pub column: String,
}

/// The labels of per-backfill series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackfillLabel {
    pub backfill: String,
    pub table: String,
}

/// The label of a count by state.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
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

/// Series kept between scrapes (see the module docs).
#[derive(Debug)]
pub struct Metrics {
    /// Commit on the source to confirmed by the broker, per live event (observed by the Manager).
    pub canal_commit_to_confirm_seconds: LatencyHistogram,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let canal_commit_to_confirm_seconds = LatencyHistogram::default();
        let mut registry = Registry::default();
        registry.register(
            "canal_commit_to_confirm_seconds",
            // the registry adds the full stop
            "Per live event (SNAPSHOT rows left out): from its commit on the source to the broker's confirm of its consumer's triggers. The commit time is the binlog's, in whole seconds, so each observation is up to 1 s high",
            canal_commit_to_confirm_seconds.0.clone(),
        );
        Metrics {
            canal_commit_to_confirm_seconds,
            registry,
        }
    }
}

impl Metrics {
    pub fn new() -> MetricsHandle {
        Arc::new(Metrics::default())
    }

    /// The Prometheus text exposition (format 0.0.4): the series kept here, then what
    /// `snapshot` writes (a collector over one status snapshot).
    pub fn render(&self, snapshot: impl Collector) -> String {
        let mut out = String::with_capacity(8192);
        let mut scrape = Registry::default();
        scrape.register_collector(Box::new(snapshot));
        for r in [&self.registry, &scrape] {
            // Writing into a String cannot fail; the encoder's only error is the writer's.
            let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, r);
        }
        out
    }
}

/// Writes metric families for a [`Collector`]: each call is one family, spelled once (name,
/// help, value).
pub struct Sink<'a>(DescriptorEncoder<'a>);

impl<'a> From<DescriptorEncoder<'a>> for Sink<'a> {
    fn from(e: DescriptorEncoder<'a>) -> Self {
        Sink(e)
    }
}

/// `prometheus-client` appends `_total` to a counter's name.
fn bare(name: &str, kind: MetricType) -> &str {
    match kind {
        MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
        _ => name,
    }
}

impl Sink<'_> {
    fn one(&mut self, name: &str, help: &str, m: &impl EncodeMetric) -> std::fmt::Result {
        let kind = m.metric_type();
        let e = self
            .0
            .encode_descriptor(bare(name, kind), help, None, kind)?;
        m.encode(e)
    }

    fn family<L: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
        &mut self,
        name: &str,
        help: &str,
        series: Vec<(L, M)>,
    ) -> std::fmt::Result {
        if series.is_empty() {
            return Ok(());
        }
        let mut e = self
            .0
            .encode_descriptor(bare(name, M::TYPE), help, None, M::TYPE)?;
        for (labels, m) in &series {
            m.encode(e.encode_family(labels)?)?;
        }
        Ok(())
    }

    /// A counter (`name` ends in `_total`).
    pub fn counter(&mut self, name: &str, help: &str, v: u64) -> std::fmt::Result {
        self.one(name, help, &ConstCounter::new(v))
    }

    /// A gauge.
    pub fn gauge(&mut self, name: &str, help: &str, v: impl EncodeGaugeValue) -> std::fmt::Result {
        self.one(name, help, &ConstGauge::new(v))
    }

    /// A counter family, one series per label set; nothing when `series` is empty.
    pub fn counters<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (L, u64)>,
    ) -> std::fmt::Result {
        let series = series
            .into_iter()
            .map(|(l, v)| (l, ConstCounter::new(v)))
            .collect();
        self.family(name, help, series)
    }

    /// A gauge family, one series per label set; nothing when `series` is empty.
    pub fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (L, V)>,
    ) -> std::fmt::Result {
        let series = series
            .into_iter()
            .map(|(l, v)| (l, ConstGauge::new(v)))
            .collect();
        self.family(name, help, series)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_parse::{Scrape, Value};

    fn parse(text: &str) -> Scrape {
        Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
    }

    /// A collector of fixed figures.
    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let mut s = Sink::from(e);
            s.counter("canal_batches_total", "Canal batches fetched.", 3)?;
            s.gauge("canal_inflight_batches", "In flight.", 2i64)?;
            s.gauge("canal_lag_seconds", "Lag.", f64::INFINITY)?;
            s.gauges(
                "consumer_lag_seconds",
                "Lag.",
                [(
                    ConsumerLabel {
                        consumer: "we\"ird".into(),
                    },
                    0.25,
                )],
            )?;
            s.counters::<ConsumerLabel>("consumer_events_total", "Events.", [])?;
            s.gauge("nan_seconds", "Not a number.", f64::NAN)
        }
    }

    #[test]
    fn renders_the_histogram_and_a_snapshot_with_help_and_type() {
        let m = Metrics::new();
        m.canal_commit_to_confirm_seconds.observe(0.003);
        let text = m.render(Fixed);
        let s = parse(&text);
        let value = |name: &str| {
            s.samples
                .iter()
                .find(|x| x.metric == name)
                .unwrap_or_else(|| panic!("no {name}: {text}"))
                .value
                .clone()
        };
        assert_eq!(value("canal_batches_total"), Value::Counter(3.0));
        assert_eq!(value("canal_inflight_batches"), Value::Gauge(2.0));
        assert!(
            text.contains("# TYPE canal_batches_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP canal_batches_total Canal batches fetched.\n"),
            "{text}"
        );
        assert!(text.contains("\ncanal_lag_seconds +Inf\n"), "{text}");
        assert!(text.contains("\nnan_seconds NaN\n"), "{text}");
        assert!(
            text.contains("consumer_lag_seconds{consumer=\"we\\\"ird\"} 0.25"),
            "{text}"
        );
        // a family without series is left out
        assert!(!text.contains("consumer_events_total"), "{text}");
    }

    #[test]
    fn commit_to_confirm_is_a_histogram_from_1ms_to_60s() {
        let m = Metrics::new();
        m.canal_commit_to_confirm_seconds.observe(0.003);
        m.canal_commit_to_confirm_seconds.observe(0.7);
        m.canal_commit_to_confirm_seconds.observe(90.0);
        let text = m.render(Fixed);
        assert!(
            text.contains("# TYPE canal_commit_to_confirm_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("# HELP canal_commit_to_confirm_seconds Per live event"),
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
        assert!(text.contains("up to 1 s high.\n"), "{text}");
        let s = parse(&text);
        assert!(s.docs.contains_key("canal_commit_to_confirm_seconds"));
    }
}
