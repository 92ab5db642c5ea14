//! One status, three views: every figure of [`ServiceStatus`] has a metric family in
//! `/metrics` ([`super::exposition`]) and shows in `status` ([`super::render`]), and every
//! metric family comes from a figure of the status — or the figure is on one of the lists
//! below, with the reason.
//!
//! How: [`full`] is a snapshot with every optional part filled and every list holding one
//! item (the test fails if a field serializes as `null`: give it a value there). Each number,
//! flag and state ([`STATES`]) of its JSON is changed on its own and the snapshot read back
//! (typed); the field
//! "has a metric" when the exposition changes, and "has a line" when the rendered `status`
//! changes. A new counter added to a status struct without a metric or a line fails here until
//! it gets one, or a documented place on a list.

use super::exposition;
use super::render::render_status;
use super::{Part, ServiceStatus};
use crate::metrics::Metrics;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

/// Figures with no metric, on purpose. Paths are JSON paths with list indices as `[]`; a path
/// ending in `.` covers everything under it.
const NO_METRIC: &[(&str, &str)] = &[
    (
        "uptime_seconds",
        "Prometheus has process_start_time and `up`; not a service figure",
    ),
    (
        "tap_listeners",
        "a debugging aid; shown in `status --json` only",
    ),
    ("shutting_down", "the process goes away; `up` shows it"),
    (
        "broker_connected",
        "what /ready judges; the alerts use the publisher's series",
    ),
    (
        "canal.state",
        "a state: /ready and `status` say it; the alerts watch lag, rollbacks and reconnects",
    ),
    ("canal.epoch", "an internal generation number"),
    (
        "canal.inflight_bytes",
        "shown in `status`; the in-flight bound is in batches (canal_inflight_batches)",
    ),
    (
        "canal.abandoned_batches",
        "internal bookkeeping of rolled-back epochs",
    ),
    (
        "canal.abandoned_total",
        "follows canal_rollbacks_total and canal_reconnects_total",
    ),
    (
        "canal.batches_acked",
        "canal_batches_total minus canal_inflight_batches",
    ),
    (
        "canal.conflicts",
        "shown as state `conflict` and its last error",
    ),
    (
        "canal.ha.zookeeper",
        "a state: /ready and `status` say it; ha_active shows the role",
    ),
    ("canal.last_position.", "a binlog position is not a metric"),
    ("canal.acked_position.", "a binlog position is not a metric"),
    ("canal.stall.after.", "a binlog position is not a metric"),
    (
        "canal.last_executed_at",
        "feeds canal_lag_seconds only without heartbeats (this snapshot has them)",
    ),
    (
        "canal.acked_executed_at",
        "canal_lag_seconds comes from the fetched side",
    ),
    (
        "heartbeat.last_seen",
        "a time stamp; canal_lag_seconds is what it gives",
    ),
    ("heartbeat.pending", "folded into canal_lag_seconds"),
    ("heartbeat.oldest_pending", "folded into canal_lag_seconds"),
    ("broker.node", "which URL is in use: shown in `status`"),
    ("broker.nodes", "configuration"),
    ("broker.max_unconfirmed", "configuration"),
    (
        "broker.oldest_unconfirmed_ms",
        "shown in `status` while stalled; the stall alert uses publisher_unconfirmed",
    ),
    (
        "broker.connects",
        "shown in `status`; reconnects follow publisher failures (canal_rollbacks_total)",
    ),
    (
        "broker.lost",
        "shown in `status`; lost publishes roll back (canal_rollbacks_total)",
    ),
    (
        "broker.late_confirms",
        "shown in `status`; follows publisher_timeouts_total",
    ),
    (
        "broker.renewed_channels",
        "shown in `status`; follows publisher_nacked_total and lost confirms",
    ),
    (
        "broker.cancelled",
        "shown in `status`; follows canal_rollbacks_total",
    ),
    (
        "broker.refused",
        "shown in `status`; those messages are parked (consumer_parked_total)",
    ),
    (
        "broker.broken_routes[].",
        "shown per route in `status`; their messages count in consumer_parked_total",
    ),
    (
        "consumers[].state",
        "a state: consumer_enabled and consumer_restarts_total show it",
    ),
    (
        "lossy_text[].first_position.",
        "a binlog position is not a metric",
    ),
    ("backfills[].spec.", "what the operator asked for"),
    ("backfills[].progress.last_key[]", "a key, not a figure"),
    ("backfills[].progress.max_key[]", "a key, not a figure"),
    ("backfills[].progress.rows_dropped", "on `backfill status`"),
    ("backfills[].progress.chunks", "on `backfill status`"),
    ("backfills[].progress.started_at", "a time stamp"),
    ("backfills[].progress.finished_at", "a time stamp"),
    (
        "backfills[].eta_seconds",
        "derived from the rate and the estimate",
    ),
    ("backfills[].reading", "a moment's state"),
    (
        "backfills[].yielding",
        "a moment's state, shown on `status`",
    ),
];

/// Figures `status` leaves out, on purpose (they are in `status --json`).
const NOT_ON_SCREEN: &[(&str, &str)] = &[
    ("tap_listeners", "a debugging aid"),
    ("canal.epoch", "an internal generation number"),
    (
        "canal.inflight_batches",
        "the Manager's batches_in_flight is shown (the same figure)",
    ),
    (
        "canal.abandoned_batches",
        "internal bookkeeping of rolled-back epochs",
    ),
    (
        "canal.abandoned_total",
        "internal bookkeeping of rolled-back epochs",
    ),
    ("canal.batches_acked", "batches minus in flight"),
    (
        "canal.conflicts",
        "shown as state `conflict` and its last error",
    ),
    ("canal.stall.after.", "the stall line names what to skip"),
    (
        "canal.last_executed_at",
        "shown as the lag without heartbeats (this snapshot has them)",
    ),
    (
        "canal.acked_executed_at",
        "the lag is shown from the fetched side",
    ),
    (
        "canal.last_position.server_id",
        "a position is shown as file:offset#row",
    ),
    (
        "canal.acked_position.server_id",
        "a position is shown as file:offset#row",
    ),
    (
        "lossy_text[].first_position.server_id",
        "a position is shown as file:offset#row",
    ),
    (
        "heartbeat.trips",
        "in /metrics; the screen shows the lag they give",
    ),
    (
        "heartbeat.last_trip_ms",
        "in /metrics; the screen shows the lag they give",
    ),
    ("heartbeat.last_seen", "the screen shows the lag they give"),
    ("heartbeat.pending", "the screen shows the lag they give"),
    (
        "heartbeat.oldest_pending",
        "the screen shows the lag they give",
    ),
    (
        "broker.broken_routes[].checks",
        "the line says when the next check is",
    ),
    ("backfills[].spec.", "on `backfill status`"),
    (
        "backfills[].progress.last_key[]",
        "a key, on `backfill status`",
    ),
    (
        "backfills[].progress.max_key[]",
        "a key, on `backfill status`",
    ),
    (
        "backfills[].progress.rows_emitted",
        "on `backfill status`; the bar shows rows read",
    ),
    ("backfills[].progress.rows_dropped", "on `backfill status`"),
    ("backfills[].progress.chunks", "on `backfill status`"),
    ("backfills[].progress.rereads", "on `backfill status`"),
    ("backfills[].progress.started_at", "a time stamp"),
    ("backfills[].progress.finished_at", "a time stamp"),
    ("backfills[].reading", "a moment's state"),
];

/// Metric families that are not a status figure.
const NOT_FROM_STATUS: &[(&str, &str)] = &[(
    "canal_commit_to_confirm_seconds",
    "a distribution, observed by the Manager as parts are confirmed (metrics::Metrics)",
)];

/// A snapshot with every part filled in (distinct values, so a change shows).
fn full() -> ServiceStatus {
    let v = json!({
        "version": "0.1.0",
        "uptime_seconds": 3725,
        "canal": {
            "state": "connected", "server": "127.0.0.1:11111", "destination": "example",
            "filter": "test_db\\.users", "epoch": 3, "inflight_batches": 2,
            "inflight_bytes": 2048, "abandoned_batches": 1, "abandoned_total": 4,
            "batches_received": 10, "events_received": 300, "batches_acked": 8,
            "rollbacks": 1, "reconnects": 2, "rewind_skipped": 5, "conflicts": 6,
            "ha": {"role": "active", "zookeeper": "connected", "canal_server": "10.0.0.1:11111",
                   "holder": "host-a:17", "reason": "because"},
            "stall": {"token": "frame-1", "reason": "a frame over the cap",
                      "after": {"log_file": "mysql-bin.000003", "offset": 40, "row_index": 1,
                                "server_id": 7, "gtid": "g:1-2"},
                      "how": "run `canal-consumer skip frame-1`",
                      "since": "2026-11-29T09:00:00.000Z"},
            "skipped": ["frame of 10 bytes"],
            "last_error": "x",
            "config_warning": "mem_unit",
            "last_position": {"log_file": "mysql-bin.000003", "offset": 4567, "row_index": 2,
                              "server_id": 7, "gtid": "g:1-3"},
            "last_executed_at": 1_000_000,
            "acked_position": {"log_file": "mysql-bin.000003", "offset": 4000, "row_index": 3,
                               "server_id": 7, "gtid": "g:1-2"},
            "acked_executed_at": 999_000
        },
        "broker": {
            "state": "connected", "broker": "amqp://u:***@rabbit:5672/%2f", "node": 1,
            "nodes": 2, "queue": "plugin_tasks", "blocked_reason": "memory",
            "unconfirmed": 3, "max_unconfirmed": 512, "published": 50, "confirmed": 40,
            "returned": 1, "nacked": 2, "timeouts": 3, "lost": 4, "late_confirms": 5,
            "renewed_channels": 6, "cancelled": 7, "refused": 8,
            "oldest_unconfirmed_ms": 7_400, "stalled_since": "2026-11-29T09:00:01.000Z",
            "broken_routes": [{"exchange": "orders", "reason": "NOT_FOUND", "refused": 50,
                               "checks": 2, "next_check_in_ms": 1500}],
            "connects": 2, "last_error": "boom", "state_since": "2026-11-29T08:00:00.000Z"
        },
        "broker_connected": true,
        "shutting_down": false,
        "batches_in_flight": 2,
        "backfills": [{
            "id": "bf-1", "state": "running",
            "spec": {"database": "d", "table": "t", "consumer": "example_consumer",
                     "where": "id > 0", "chunk": 100, "rate": 500.0, "owner": "example/1001",
                     "key_columns": ["id"]},
            "progress": {"last_key": [10], "max_key": [1000], "estimate": 1000,
                         "rows_read": 250, "rows_emitted": 240, "rows_dropped": 10,
                         "chunks": 3, "rereads": 1, "started_at": 5, "finished_at": 6,
                         "error": "read again"},
            "rows_per_second": 50.0, "eta_seconds": 15, "reading": true, "yielding": true
        }],
        "tap_listeners": 1,
        "consumers": [{"name": "example_consumer", "enabled": true, "state": "running",
                       "events": 12, "triggers": 8, "errors": 1, "restarts": 2, "parked": 3,
                       "lag_seconds": 0.5, "last_error": "bad row"}],
        "lossy_text": [{"database": "shop", "table": "users", "column": "name", "rows": 7,
                        "first_position": {"log_file": "mysql-bin.000001", "offset": 4,
                                           "row_index": 1, "server_id": 7, "gtid": "g:1"},
                        "policy": "park", "fix": "use the raw-text mode"}],
        "heartbeat": {"lag_seconds": 0.25, "trips": 3, "last_trip_ms": 4, "last_seen": 999_500,
                      "pending": 1, "oldest_pending": 999_800},
        "unanswered": []
    });
    serde_json::from_value(v).unwrap()
}

const NOW_MS: i64 = 1_002_500;

/// Text figures that are states, with another value to try (other text is names and
/// messages, not figures).
const STATES: &[(&str, &str)] = &[
    ("canal.state", "reconnecting"),
    ("canal.ha.role", "standby"),
    ("canal.ha.zookeeper", "disconnected"),
    ("broker.state", "blocked"),
    ("consumers[].state", "quarantined"),
    ("backfills[].state", "paused"),
];

/// Every number and flag of `v` with its path (`consumers[].events`).
fn leaves(v: &Value, path: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                leaves(x, &p, out);
            }
        }
        Value::Array(a) => {
            for x in a {
                leaves(x, &format!("{path}[]"), out);
            }
        }
        Value::Number(_) | Value::Bool(_) => out.push(path.to_string()),
        Value::Null => panic!("{path} is null in full(): give it a value"),
        Value::String(_) if STATES.iter().any(|(p, _)| *p == path) => out.push(path.to_string()),
        Value::String(_) => {}
    }
}

/// `v` with the leaf at `path` changed.
fn changed(v: &Value, path: &str) -> Value {
    fn walk(v: &mut Value, parts: &[&str], path: &str) {
        let Some((first, rest)) = parts.split_first() else {
            *v = match &*v {
                Value::Bool(b) => Value::Bool(!b),
                Value::Number(n) if n.is_u64() => json!(n.as_u64().unwrap() + 1_000_003),
                Value::Number(n) if n.is_i64() => json!(n.as_i64().unwrap() + 1_000_003),
                Value::Number(n) => json!(n.as_f64().unwrap() + 1_000.5),
                Value::String(_) => json!(STATES.iter().find(|(p, _)| *p == path).unwrap().1),
                other => panic!("not a leaf: {other}"),
            };
            return;
        };
        match first.strip_suffix("[]") {
            Some(key) => {
                for x in v[key].as_array_mut().unwrap() {
                    walk(x, rest, path);
                }
            }
            None => walk(&mut v[*first], rest, path),
        }
    }
    let mut v = v.clone();
    let parts: Vec<&str> = path.split('.').collect();
    walk(&mut v, &parts, path);
    v
}

/// The exposition's samples by family (histogram series under their family's name).
fn samples(s: &ServiceStatus) -> BTreeMap<String, Vec<String>> {
    let text = exposition::render(&Metrics::default(), s.clone(), NOW_MS);
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut family = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            family = rest.split(' ').next().unwrap_or_default().to_string();
            out.entry(family.clone()).or_default();
        } else if !line.starts_with('#') && !line.is_empty() {
            out.entry(family.clone())
                .or_default()
                .push(line.to_string());
        }
    }
    out
}

fn listed<'a>(list: &'a [(&str, &str)], path: &str) -> Option<&'a str> {
    list.iter()
        .find(|(p, _)| *p == path || (p.ends_with('.') && path.starts_with(p)))
        .map(|(p, _)| *p)
}

#[test]
fn every_figure_has_a_metric_and_a_line_and_every_metric_a_figure() {
    let base = full();
    let json = serde_json::to_value(&base).unwrap();
    let mut paths = Vec::new();
    leaves(&json, "", &mut paths);
    paths.dedup();
    let metrics = samples(&base);
    let screen = render_status(&base, NOW_MS);
    let mut problems = Vec::new();
    let mut fed = BTreeSet::new();
    let mut used_lists = BTreeSet::new();
    for path in &paths {
        let other: ServiceStatus = serde_json::from_value(changed(&json, path))
            .unwrap_or_else(|e| panic!("{path}: changed snapshot does not read back: {e}"));
        let m = samples(&other);
        let families: Vec<&String> = m
            .iter()
            .filter(|(k, v)| metrics.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .chain(metrics.keys().filter(|k| !m.contains_key(*k)))
            .collect();
        fed.extend(families.iter().map(|f| f.to_string()));
        match (families.is_empty(), listed(NO_METRIC, path)) {
            (true, None) => problems.push(format!("{path}: no metric (add one in admin::exposition, or list it in NO_METRIC with the reason)")),
            (false, Some(p)) => problems.push(format!("{path}: feeds {families:?}, but NO_METRIC lists `{p}`")),
            (_, Some(p)) => {
                used_lists.insert(("NO_METRIC", p));
            }
            (false, None) => {}
        }
        let shown = render_status(&other, NOW_MS) != screen;
        match (shown, listed(NOT_ON_SCREEN, path)) {
            (false, None) => problems.push(format!("{path}: not in `status` (add it in admin::render, or list it in NOT_ON_SCREEN with the reason)")),
            (true, Some(p)) => problems.push(format!("{path}: shown in `status`, but NOT_ON_SCREEN lists `{p}`")),
            (_, Some(p)) => {
                used_lists.insert(("NOT_ON_SCREEN", p));
            }
            (true, None) => {}
        }
    }
    // the reverse: every family comes from a figure
    for family in metrics.keys() {
        let listed = NOT_FROM_STATUS.iter().any(|(f, _)| f == family);
        if fed.contains(family) == listed {
            problems.push(if listed {
                format!("{family}: fed by the status, but NOT_FROM_STATUS lists it")
            } else {
                format!("{family}: no status figure feeds it")
            });
        }
    }
    // the lists stay honest: every entry matches a figure of the snapshot
    for (name, list) in [("NO_METRIC", NO_METRIC), ("NOT_ON_SCREEN", NOT_ON_SCREEN)] {
        for (p, _) in list {
            if !used_lists.contains(&(name, *p)) {
                problems.push(format!(
                    "{name} lists `{p}`, which is no figure of the status"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn the_full_snapshot_is_whole_and_every_part_answered() {
    let s = full();
    assert!(s.unanswered.is_empty());
    assert!(s.broker.is_some() && s.heartbeat.is_some() && s.canal.ha.is_some());
    // what `unanswered` names is shown
    let mut silent = s.clone();
    silent.unanswered = vec![Part::Canal, Part::Publisher];
    let text = render_status(&silent, NOW_MS);
    assert!(
        text.contains("NO ANSWER from canal connection, publisher"),
        "{text}"
    );
}
