//! Text the command line prints from the admin endpoint's answers: the `status` screen (fit
//! for `watch -n 5`), the `list` table and the backfill bar. Pure functions of the typed status
//! ([`ServiceStatus`], [`ConsumerStatus`], [`BackfillView`]) and the clock, so they are tested
//! on fixed inputs; the HTTP side, and reading the JSON back into those types, is in the
//! `client` module. Nothing here reads JSON by key: a field renamed in the status is a compile
//! error here, and an answer that does not fit the types is the client's error, never a `-`.

use super::{ConsumerStatus, ServiceStatus};
use crate::backfill::BackfillView;
use crate::backfill::record::State as BackfillState;
use crate::canal::lossy::{LossyColumn, OnLossyText};
use crate::clock::short_duration;
use crate::event::Position;
use crate::publisher::PublisherStatus;
use crate::publisher::routes::BrokenRoute;
use std::fmt::Write as _;

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn position(p: Option<&Position>) -> String {
    match p {
        Some(p) => p.to_string(),
        None => "-".into(),
    }
}

/// The human status, for `watch -n 5`. `now_ms` is the wall clock (ms since the epoch), for
/// the lag.
pub fn render_status(v: &ServiceStatus, now_ms: i64) -> String {
    let mut out = String::new();
    let canal = &v.canal;
    let ready = if v.shutting_down {
        "SHUTTING DOWN"
    } else if v.canal_ready() && v.broker_connected {
        "ready"
    } else {
        "NOT READY"
    };
    let _ = writeln!(
        out,
        "canal-consumer {}  up {}  {ready}",
        v.version,
        short_duration(v.uptime_seconds as f64)
    );
    if !v.unanswered.is_empty() {
        let parts: Vec<String> = v.unanswered.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "        NO ANSWER from {} (their figures are missing)",
            parts.join(", ")
        );
    }
    // With heartbeats: the lag they measure. Without: nothing in flight means caught up with
    // everything Canal has served.
    let lag = if let Some(hb) = v.heartbeat.as_ref().and_then(|h| h.lag_seconds) {
        format!("{} (heartbeat)", short_duration(hb))
    } else if canal.inflight_batches == 0 {
        "0s".to_string()
    } else {
        canal
            .last_executed_at
            .map(|t| short_duration(((now_ms - t).max(0)) as f64 / 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    let _ = writeln!(
        out,
        "canal   {:<12} {}  destination {}  lag {lag}",
        canal.state.as_str(),
        canal.server,
        canal.destination,
    );
    if let Some(ha) = &canal.ha {
        let why = match (&ha.reason, &ha.holder) {
            (Some(r), _) => format!("  ({r})"),
            (None, Some(h)) => format!("  (held by {h})"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "replica {:<12} zookeeper {}  canal server {}{why}",
            ha.role.as_str().to_uppercase(),
            ha.zookeeper.as_str(),
            ha.canal_server.as_deref().unwrap_or("-"),
        );
    }
    let _ = writeln!(
        out,
        "        fetched {}  acked {}  in flight {} batches ({})",
        position(canal.last_position.as_ref()),
        position(canal.acked_position.as_ref()),
        v.batches_in_flight,
        bytes(canal.inflight_bytes as u64),
    );
    let _ = writeln!(
        out,
        "        batches {}  events {}  rollbacks {}  reconnects {}",
        canal.batches_received, canal.events_received, canal.rollbacks, canal.reconnects,
    );
    if let Some(stall) = &canal.stall {
        let _ = writeln!(
            out,
            "        STALLED since {}: {}",
            stall.since, stall.reason
        );
        let _ = writeln!(out, "        to go on: {}", stall.how);
    } else if let Some(e) = &canal.last_error {
        let _ = writeln!(out, "        last error: {e}");
    }
    if canal.rewind_skipped > 0 {
        let _ = writeln!(
            out,
            "        canal rewound {} rows (sent again at or before the confirmed position); skipped",
            canal.rewind_skipped
        );
    }
    if let Some(w) = &canal.config_warning {
        let _ = writeln!(out, "        config: {w}");
    }
    if let Some(last) = canal.skipped.last() {
        let _ = writeln!(
            out,
            "        skipped {} (last: {last})",
            canal.skipped.len()
        );
    }
    lossy_text(&mut out, &v.lossy_text);
    match &v.broker {
        Some(b) => broker(&mut out, b),
        None => {
            let _ = writeln!(out, "broker  {:<12} -  queue -", "none");
        }
    }
    for b in v.backfills.iter().filter(|b| !b.backfill.state.is_final()) {
        let _ = writeln!(out, "backfill {}", bar(b));
        if let Some(e) = &b.backfill.progress.error {
            let _ = writeln!(out, "        {e}");
        }
    }
    out.push('\n');
    out.push_str(&consumer_table(&v.consumers, true));
    out
}

/// The publisher's lines.
fn broker(out: &mut String, b: &PublisherStatus) {
    // with several broker URLs (amqp.urls), which one is in use
    let node = if b.nodes > 1 {
        format!(" (node {} of {})", b.node, b.nodes)
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "broker  {:<12} {}{node}  queue {}",
        b.state.to_string(),
        b.broker,
        b.queue
    );
    let c = &b.counters;
    let _ = writeln!(
        out,
        "        unconfirmed {}/{}  published {}  confirmed {}  returned {}  nacked {}  timeouts {}  lost {}",
        b.unconfirmed,
        b.max_unconfirmed,
        c.published,
        c.confirmed,
        c.returned,
        c.nacked,
        c.timeouts,
        c.lost
    );
    let _ = writeln!(
        out,
        "        connects {}  channels renewed {}  late confirms {}  cancelled {}  refused {}",
        b.connects, c.renewed_channels, c.late_confirms, c.cancelled, c.refused
    );
    if let Some(since) = &b.stalled_since {
        let _ = writeln!(
            out,
            "        STALLED since {since}: no confirm for {} s",
            b.oldest_unconfirmed_ms.unwrap_or(0) / 1000
        );
    }
    broken_routes(out, &b.broken_routes);
    if let Some(e) = &b.blocked_reason {
        let _ = writeln!(out, "        blocked reason: {e}");
    }
    if let Some(e) = &b.last_error {
        let _ = writeln!(out, "        last error: {e}");
    }
}

/// The routes the publisher found gone while running.
fn broken_routes(out: &mut String, routes: &[BrokenRoute]) {
    for r in routes {
        let _ = writeln!(
            out,
            "        ROUTE GONE exchange '{}': {} messages parked, next check in {}: {}",
            r.exchange,
            r.refused,
            short_duration(r.next_check_in_ms as f64 / 1000.0),
            r.reason
        );
    }
}

/// The columns whose text arrived lossy.
fn lossy_text(out: &mut String, columns: &[LossyColumn]) {
    for c in columns {
        let done = match c.policy {
            OnLossyText::Deliver => "delivered as they arrived",
            OnLossyText::Park => "parked",
        };
        let _ = writeln!(
            out,
            "        LOSSY TEXT {}.{}.{}: {} rows with U+FFFD since {} ({done})",
            c.database, c.table, c.column, c.rows, c.first_position
        );
    }
    if let Some(c) = columns.first() {
        let _ = writeln!(out, "        fix: {}", c.fix);
    }
}

fn consumer_table(list: &[ConsumerStatus], counters: bool) -> String {
    let mut out = String::new();
    if list.is_empty() {
        out.push_str("no consumers\n");
        return out;
    }
    let width = list
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(8)
        .max("CONSUMER".len());
    if counters {
        let _ = writeln!(
            out,
            "{:<width$}  {:<7}  {:<11}  {:>9}  {:>9}  {:>6}  {:>8}  {:>6}  {:>7}  LAST ERROR",
            "CONSUMER",
            "ENABLED",
            "STATE",
            "EVENTS",
            "TRIGGERS",
            "ERRORS",
            "RESTARTS",
            "PARKED",
            "LAG"
        );
    } else {
        let _ = writeln!(out, "{:<width$}  {:<7}  STATE", "CONSUMER", "ENABLED");
    }
    for c in list {
        let enabled = if c.enabled { "yes" } else { "no" };
        if counters {
            let lag = c
                .lag_seconds
                .map(short_duration)
                .unwrap_or_else(|| "-".into());
            let mut err = c.last_error.as_deref().unwrap_or("-").replace('\n', " ");
            if err.chars().count() > 60 {
                err = err.chars().take(59).collect::<String>() + "…";
            }
            let _ = writeln!(
                out,
                "{:<width$}  {:<7}  {:<11}  {:>9}  {:>9}  {:>6}  {:>8}  {:>6}  {:>7}  {err}",
                c.name,
                enabled,
                c.state.as_str(),
                c.events,
                c.triggers,
                c.errors,
                c.restarts,
                c.parked,
                lag,
            );
        } else {
            let _ = writeln!(
                out,
                "{:<width$}  {:<7}  {}",
                c.name,
                enabled,
                c.state.as_str()
            );
        }
    }
    out
}

/// The human list of consumers (`GET /consumers`).
pub fn render_list(consumers: &[ConsumerStatus]) -> String {
    consumer_table(consumers, false)
}

/// `[#######-------]  45%  45000/100000 rows  1234 rows/s  ETA 44s  running`
pub fn bar(b: &BackfillView) -> String {
    let p = &b.backfill.progress;
    let read = p.rows_read;
    let estimate = p.estimate.max(read);
    let state = b.backfill.state;
    let frac = if state == BackfillState::Done {
        1.0
    } else if estimate == 0 {
        0.0
    } else {
        read as f64 / estimate as f64
    };
    let width = 30usize;
    let filled = ((frac * width as f64).round() as usize).min(width);
    let mut s = format!(
        "{} [{}{}] {:>3.0}%  {read}/{estimate} rows",
        b.backfill.id,
        "#".repeat(filled),
        "-".repeat(width - filled),
        frac * 100.0
    );
    if let Some(r) = b.rows_per_second {
        let _ = write!(s, "  {r:.0} rows/s");
    }
    if let Some(eta) = b.eta_seconds {
        let _ = write!(
            s,
            "  ETA {}",
            humantime::format_duration(std::time::Duration::from_secs(eta))
        );
    }
    let _ = write!(s, "  {state}");
    if b.yielding {
        s.push_str(", yielding to live changes");
    }
    s
}

/// One line: id, table, state, counts.
pub fn line(b: &BackfillView) -> String {
    let p = &b.backfill.progress;
    let spec = &b.backfill.spec;
    let mut s = format!(
        "{} {}.{} {}: {} rows read of ~{}, {} emitted, {} left to live changes, {} chunks",
        b.backfill.id,
        spec.database,
        spec.table,
        b.backfill.state,
        p.rows_read,
        p.estimate,
        p.rows_emitted,
        p.rows_dropped,
        p.chunks,
    );
    if b.yielding {
        s.push_str(", yielding to live changes");
    }
    if let Some(e) = &p.error {
        let _ = write!(s, " ({e})");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::HeartbeatStatus;
    use serde_json::Value;

    /// `patch` over `base`, objects merged key by key.
    fn merge(base: &mut Value, patch: &Value) {
        match (base, patch) {
            (Value::Object(b), Value::Object(p)) => {
                for (k, v) in p {
                    merge(b.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
            (b, p) => *b = p.clone(),
        }
    }

    /// A typed status from the fields a test cares about (the rest at their defaults).
    fn status(partial: Value) -> ServiceStatus {
        let mut base = serde_json::to_value(ServiceStatus::new()).unwrap();
        base["broker"] = serde_json::to_value(PublisherStatus::connecting(
            String::new(),
            1,
            String::new(),
            0,
        ))
        .unwrap();
        base["heartbeat"] = serde_json::to_value(HeartbeatStatus::default()).unwrap();
        let mut partial = partial;
        if let Some(list) = partial["consumers"].as_array_mut() {
            for c in list {
                let mut one = serde_json::to_value(ConsumerStatus::default()).unwrap();
                merge(&mut one, c);
                *c = one;
            }
        }
        if partial.get("heartbeat").is_none() {
            base.as_object_mut().unwrap().remove("heartbeat");
        }
        merge(&mut base, &partial);
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn a_stall_says_what_and_how_to_go_on() {
        let v = serde_json::json!({
            "version": "0.2.0", "uptime_seconds": 5,
            "canal": {"state": "stalled", "server": "s", "destination": "example",
                      "inflight_batches": 0,
                      "stall": {"token": "frame-1", "since": "2026-11-29T09:00:00.000Z",
                                "reason": "the next batch is a 200299-byte frame",
                                "how": "run `canal-consumer skip frame-1`"},
                      "skipped": ["frame of 10 bytes (canal batch 3) after the start"],
                      "last_error": "x",
                      "config_warning": "canal.mem_unit is 128 bytes, but"},
            "broker": {"state": "connected", "stalled_since": "2026-11-29T09:00:01.000Z",
                       "oldest_unconfirmed_ms": 7_400},
            "broker_connected": false, "consumers": []
        });
        let text = render_status(&status(v), 0);
        assert!(text.contains("NOT READY"), "{text}");
        assert!(
            text.contains(
                "STALLED since 2026-11-29T09:00:00.000Z: the next batch is a 200299-byte frame"
            ),
            "{text}"
        );
        assert!(
            text.contains("to go on: run `canal-consumer skip frame-1`"),
            "{text}"
        );
        assert!(
            text.contains("skipped 1 (last: frame of 10 bytes"),
            "{text}"
        );
        assert!(
            text.contains("config: canal.mem_unit is 128 bytes, but"),
            "{text}"
        );
        assert!(
            text.contains("STALLED since 2026-11-29T09:00:01.000Z: no confirm for 7 s"),
            "{text}"
        );
    }
    #[test]
    fn a_standby_replica_says_so_and_who_holds_the_destination() {
        let v = serde_json::json!({
            "version": "0.2.0", "uptime_seconds": 5,
            "canal": {"state": "standby", "server": "127.0.0.1:11121", "destination": "example",
                      "inflight_batches": 0,
                      "ha": {"role": "standby", "zookeeper": "connected",
                             "canal_server": "127.0.0.1:11121", "holder": "host-a:17",
                             "reason": "standby: client running node held by host-a:17"}},
            "broker": {"state": "connected"}, "broker_connected": true, "consumers": []
        });
        let text = render_status(&status(v.clone()), 0);
        assert!(text.contains("  ready"), "{text}");
        assert!(text.contains("canal   standby"), "{text}");
        assert!(
            text.contains("replica STANDBY      zookeeper connected  canal server 127.0.0.1:11121  (standby: client running node held by host-a:17)"),
            "{text}"
        );
        // without zookeeper mode there is no replica line
        let mut plain = v.clone();
        plain["canal"].as_object_mut().unwrap().remove("ha");
        plain["canal"]["state"] = "connected".into();
        assert!(!render_status(&status(plain), 0).contains("replica"));
    }
    #[test]
    fn names_the_broker_node_in_use_when_there_are_several() {
        let mut v = serde_json::json!({
            "version": "0.1.0", "uptime_seconds": 1,
            "canal": {"state": "connected"},
            "broker": {"state": "connected", "broker": "amqp://u:***@rabbit2:5672/%2f",
                       "node": 2, "nodes": 3, "queue": "plugin_tasks"},
            "broker_connected": true, "consumers": []
        });
        let text = render_status(&status(v.clone()), 2_000);
        assert!(
            text.contains(
                "broker  connected    amqp://u:***@rabbit2:5672/%2f (node 2 of 3)  queue plugin_tasks"
            ),
            "{text}"
        );
        // one broker: no node count
        v["broker"]["nodes"] = 1.into();
        let text = render_status(&status(v), 2_000);
        assert!(
            text.contains("amqp://u:***@rabbit2:5672/%2f  queue plugin_tasks"),
            "{text}"
        );
    }

    #[test]
    fn a_broken_route_and_lossy_text_are_shown_with_what_to_do() {
        let v = serde_json::json!({
            "version": "0.2.0", "uptime_seconds": 5,
            "canal": {"state": "connected", "server": "127.0.0.1:11111", "destination": "example",
                      "inflight_batches": 0},
            "broker": {"state": "connected", "broken_routes": [
                {"exchange": "orders", "reason": "NOT_FOUND - no exchange 'orders' in vhost '/'",
                 "refused": 50, "checks": 2, "next_check_in_ms": 1500}]},
            "broker_connected": true, "consumers": [],
            "lossy_text": [{"database": "shop", "table": "users", "column": "name", "rows": 7,
                            "first_position": {"log_file": "mysql-bin.000001", "offset": 4,
                                               "row_index": 1},
                            "policy": "park", "fix": "use the raw-text mode"}]
        });
        let text = render_status(&status(v.clone()), 0);
        assert!(
            text.contains(
                "        ROUTE GONE exchange 'orders': 50 messages parked, next check in 1.5s: \
                 NOT_FOUND - no exchange 'orders' in vhost '/'\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "        LOSSY TEXT shop.users.name: 7 rows with U+FFFD since \
                 mysql-bin.000001:4#1 (parked)\n        fix: use the raw-text mode\n"
            ),
            "{text}"
        );
        // none: no such lines
        let mut clean = v.clone();
        clean["broker"]["broken_routes"] = serde_json::json!([]);
        clean["lossy_text"] = serde_json::json!([]);
        let text = render_status(&status(clean), 0);
        assert!(
            !text.contains("ROUTE GONE") && !text.contains("LOSSY"),
            "{text}"
        );
    }

    #[test]
    fn renders_a_compact_status() {
        let v = serde_json::json!({
            "version": "0.1.0",
            "uptime_seconds": 3725,
            "canal": {
                "state": "connected", "server": "127.0.0.1:11111", "destination": "example",
                "inflight_batches": 2, "inflight_bytes": 2048, "batches_received": 10,
                "events_received": 300, "rollbacks": 1, "reconnects": 0,
                "last_position": {"log_file": "mysql-bin.000003", "offset": 4567, "row_index": 2},
                "last_executed_at": 1_000_000, "acked_position": null
            },
            "broker": {"state": "connected", "broker": "amqp://u:***@rabbit:5672/%2f",
                       "queue": "plugin_tasks", "unconfirmed": 3, "max_unconfirmed": 512,
                       "confirmed": 40, "last_error": null},
            "broker_connected": true,
            "shutting_down": false,
            "batches_in_flight": 2,
            "consumers": [
                {"name": "example_consumer", "enabled": true, "state": "running", "events": 12,
                 "triggers": 8, "errors": 0, "restarts": 0, "parked": 3, "lag_seconds": 0.5,
                 "last_error": null},
                {"name": "teacher_consumer", "enabled": false, "state": "disabled", "events": 0,
                 "triggers": 0, "errors": 2, "restarts": 1, "last_error": "boom"}
            ]
        });
        let typed = status(v.clone());
        let text = render_status(&typed, 1_002_500);
        assert!(
            text.starts_with("canal-consumer 0.1.0  up 1h02m  ready\n"),
            "{text}"
        );
        assert!(text.contains("connected"), "{text}");
        assert!(text.contains("destination example  lag 2.5s"), "{text}");
        // with heartbeats, their lag
        let mut hb = v.clone();
        hb["heartbeat"] = serde_json::json!({"lag_seconds": 0.004, "trips": 3});
        let text_hb = render_status(&status(hb), 9_000_000);
        assert!(
            text_hb.contains("destination example  lag 4ms (heartbeat)"),
            "{text_hb}"
        );
        assert!(
            text.contains("fetched mysql-bin.000003:4567#2  acked -"),
            "{text}"
        );
        assert!(text.contains("in flight 2 batches (2.0 KiB)"), "{text}");
        assert!(
            text.contains("broker  connected    amqp://u:***@rabbit:5672/%2f  queue plugin_tasks"),
            "{text}"
        );
        assert!(
            text.contains(
                "unconfirmed 3/512  published 0  confirmed 40  returned 0  nacked 0  timeouts 0  lost 0\n"
            ),
            "{text}"
        );
        let row = text
            .lines()
            .find(|l| l.starts_with("example_consumer"))
            .unwrap();
        let cols: Vec<_> = row.split_whitespace().collect();
        assert_eq!(
            cols,
            [
                "example_consumer",
                "yes",
                "running",
                "12",
                "8",
                "0",
                "0",
                "3",
                "500ms",
                "-"
            ]
        );
        let row = text
            .lines()
            .find(|l| l.starts_with("teacher_consumer"))
            .unwrap();
        assert!(row.ends_with("boom"), "{row}");
        let list = render_list(&typed.consumers);
        assert!(
            list.contains("teacher_consumer  no       disabled"),
            "{list}"
        );
    }
    #[test]
    fn the_bar_shows_share_rate_and_time_left() {
        let read = |v: &Value| bar(&serde_json::from_value(v.clone()).unwrap());
        let b = serde_json::json!({
            "id": "bf-1", "state": "running",
            "spec": {"database": "d", "table": "t", "chunk": 100, "owner": "example/1001",
                     "key_columns": ["id"]},
            "progress": {"rows_read": 250, "estimate": 1000},
            "rows_per_second": 50.0, "eta_seconds": 15
        });
        assert_eq!(
            read(&b),
            "bf-1 [########----------------------]  25%  250/1000 rows  50 rows/s  ETA 15s  running"
        );
        let mut live = b.clone();
        live["yielding"] = true.into();
        assert!(
            read(&live).ends_with("ETA 15s  running, yielding to live changes"),
            "{}",
            read(&live)
        );
        let mut done = b.clone();
        done["state"] = "done".into();
        done["progress"] = serde_json::json!({"rows_read": 3, "estimate": 0});
        assert!(read(&done).contains("100%"), "{}", read(&done));
    }
}
