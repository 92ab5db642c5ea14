//! What operators look at: `deploy/grafana/canal-consumer.json` and
//! `deploy/prometheus/alerts.yml` ask only for metrics the service's `/metrics` serves (the
//! exposition `admin::server` sends is `admin::exposition::render` of a status snapshot), and
//! the alert rules are complete.
//! `tests/pipeline_real.rs` checks the same names against a running service's `/metrics`.
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use common::promql::*;
use std::collections::BTreeSet;

/// The metric names in the service's exposition, with one consumer so per-consumer series
/// have samples and a publisher; a histogram's series are its `_bucket`, `_sum` and `_count`.
fn exported() -> BTreeSet<String> {
    let m = canal_consumer::metrics::Metrics::new();
    let mut s = canal_consumer::admin::ServiceStatus::new();
    s.consumers.push(canal_consumer::admin::ConsumerStatus {
        name: "probe".into(),
        events: 1,
        ..Default::default()
    });
    s.broker = Some(canal_consumer::publisher::PublisherStatus::connecting(
        "amqp://127.0.0.1:5672/%2f".into(),
        1,
        "plugin_tasks".into(),
        8,
    ));
    let text = canal_consumer::admin::exposition::render(&m, s, 0);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("the exposition parses");
    let names = served_names(&scrape);
    for n in names.iter().filter(|n| n.ends_with("_bucket")) {
        assert!(
            text.contains(&format!("\n{n}{{")),
            "{n} not in the exposition"
        );
    }
    names
}

#[test]
fn every_metric_the_dashboard_and_alerts_query_is_exported() {
    let exported = exported();
    let queries = operator_queries();
    assert!(queries.len() >= 20, "found only {} queries", queries.len());
    let mut used = BTreeSet::new();
    let mut missing = Vec::new();
    for (where_, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{where_}: no metric in `{expr}`");
        for n in names {
            if !exported.contains(&n)
                && !PROMETHEUS_OWN.contains(&n.as_str())
                && !PENDING.contains(&n.as_str())
            {
                missing.push(format!("{where_}: `{n}` in `{expr}`"));
            }
            used.insert(n);
        }
    }
    assert!(
        missing.is_empty(),
        "queried but not in /metrics:\n{}",
        missing.join("\n")
    );
    // the pending list stays honest: a name the service now exports is checked like the rest
    for p in PENDING {
        assert!(
            !exported.contains(*p),
            "`{p}` is exported now: remove it from PENDING in tests/common/promql.rs"
        );
        assert!(used.contains(*p), "`{p}` is pending but nothing queries it");
    }
    // what operators were promised to see: lag, stalls, rollbacks, parked, restarts, unconfirmed
    for must in [
        "canal_lag_seconds",
        "consumer_lag_seconds",
        "canal_inflight_batches",
        "canal_rollbacks_total",
        "consumer_parked_total",
        "consumer_restarts_total",
        "canal_commit_to_confirm_seconds_bucket",
        "publisher_unconfirmed",
        "publisher_blocked",
    ] {
        assert!(
            used.contains(must),
            "neither the dashboard nor an alert shows {must}"
        );
    }
}

#[test]
fn every_alert_has_a_severity_and_a_summary() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml"),
    )
    .unwrap();
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
    let mut names = BTreeSet::new();
    for group in docs[0]["groups"].as_vec().unwrap() {
        for rule in group["rules"].as_vec().unwrap() {
            let name = rule["alert"].as_str().expect("an alert name");
            assert!(names.insert(name.to_string()), "{name} twice");
            let severity = rule["labels"]["severity"].as_str();
            assert!(
                matches!(severity, Some("critical" | "warning")),
                "{name}: severity {severity:?}"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name}: no summary"
            );
        }
    }
    assert!(names.len() >= 10, "{names:?}");
}

#[test]
fn names_come_out_of_expressions() {
    let got = metric_names(
        r#"max by (instance) (canal_lag_seconds{job="x", a=~"$i"}) > 300 and on (instance) sum by (instance) (rate(canal_events_total[5m])) > 0"#,
    );
    assert_eq!(
        got,
        BTreeSet::from([
            "canal_lag_seconds".to_string(),
            "canal_events_total".to_string()
        ])
    );
    assert_eq!(
        metric_names("sum(increase(a_total[$__rate_interval]) + increase(b_total[1h])) > 1e3"),
        BTreeSet::from(["a_total".to_string(), "b_total".to_string()])
    );
    assert_eq!(
        metric_names(r#"up{job="canal-consumer"} == 0"#),
        BTreeSet::from(["up".to_string()])
    );
    assert_eq!(
        label_values_metric("label_values(consumer_enabled, consumer)").as_deref(),
        Some("consumer_enabled")
    );
}
