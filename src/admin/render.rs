//! Text the command line prints from the admin endpoint's JSON: the `status` screen (fit for
//! `watch -n 5`) and the `list` table. Pure functions of the JSON and the clock, so they are
//! tested on fixed inputs; the HTTP side is in the `client` module.

use crate::canal::lossy::{LossyColumn, OnLossyText};
use crate::publisher::routes::BrokenRoute;
use serde_json::Value;
use std::fmt::Write as _;

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("-")
}

fn n(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// `1h02m`, `3m05s`, `4.2s`, `120ms`.
pub fn short_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    let whole = secs as u64;
    if secs < 1.0 {
        format!("{}ms", (secs * 1000.0).round() as u64)
    } else if secs < 60.0 {
        format!("{secs:.1}s")
    } else if whole < 3600 {
        format!("{}m{:02}s", whole / 60, whole % 60)
    } else if whole < 86400 {
        format!("{}h{:02}m", whole / 3600, (whole % 3600) / 60)
    } else {
        format!("{}d{:02}h", whole / 86400, (whole % 86400) / 3600)
    }
}

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

fn position(v: &Value) -> String {
    match v {
        Value::Object(_) => format!(
            "{}:{}#{}",
            s(v, "log_file"),
            n(v, "offset"),
            n(v, "row_index")
        ),
        _ => "-".into(),
    }
}

/// The human status, for `watch -n 5`. `now_ms` is the wall clock (ms since the epoch), for
/// the lag.
pub fn render_status(v: &Value, now_ms: i64) -> String {
    let mut out = String::new();
    let canal = &v["canal"];
    let ready = if v["shutting_down"].as_bool() == Some(true) {
        "SHUTTING DOWN"
    } else if (canal["state"] == "connected"
        || (canal["state"] == "standby" && canal["ha"]["zookeeper"] == "connected"))
        && v["broker_connected"].as_bool() == Some(true)
    {
        "ready"
    } else {
        "NOT READY"
    };
    let _ = writeln!(
        out,
        "canal-consumer {}  up {}  {ready}",
        s(v, "version"),
        short_duration(n(v, "uptime_seconds") as f64)
    );
    // With heartbeats: the lag they measure. Without: nothing in flight means caught up with
    // everything Canal has served.
    let lag = if let Some(hb) = v["heartbeat"]["lag_seconds"].as_f64() {
        format!("{} (heartbeat)", short_duration(hb))
    } else if canal["inflight_batches"].as_u64() == Some(0) {
        "0s".to_string()
    } else {
        canal["last_executed_at"]
            .as_i64()
            .map(|t| short_duration(((now_ms - t).max(0)) as f64 / 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    let _ = writeln!(
        out,
        "canal   {:<12} {}  destination {}  lag {lag}",
        s(canal, "state"),
        s(canal, "server"),
        s(canal, "destination"),
    );
    if let Some(ha) = canal["ha"].as_object() {
        let get = |k: &str| ha.get(k).and_then(Value::as_str).unwrap_or("-");
        let why = match (
            ha.get("reason").and_then(Value::as_str),
            ha.get("holder").and_then(Value::as_str),
        ) {
            (Some(r), _) => format!("  ({r})"),
            (None, Some(h)) => format!("  (held by {h})"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "replica {:<12} zookeeper {}  canal server {}{why}",
            get("role").to_uppercase(),
            get("zookeeper"),
            get("canal_server"),
        );
    }
    let _ = writeln!(
        out,
        "        fetched {}  acked {}  in flight {} batches ({})",
        position(&canal["last_position"]),
        position(&canal["acked_position"]),
        v["batches_in_flight"]
            .as_u64()
            .unwrap_or_else(|| n(canal, "inflight_batches")),
        bytes(n(canal, "inflight_bytes")),
    );
    let _ = writeln!(
        out,
        "        batches {}  events {}  rollbacks {}  reconnects {}",
        n(canal, "batches_received"),
        n(canal, "events_received"),
        n(canal, "rollbacks"),
        n(canal, "reconnects"),
    );
    if let Some(stall) = canal["stall"].as_object() {
        let _ = writeln!(
            out,
            "        STALLED since {}: {}",
            stall.get("since").and_then(Value::as_str).unwrap_or("-"),
            stall.get("reason").and_then(Value::as_str).unwrap_or("-")
        );
        let _ = writeln!(
            out,
            "        to go on: {}",
            stall.get("how").and_then(Value::as_str).unwrap_or("-")
        );
    } else if let Some(e) = canal["last_error"].as_str() {
        let _ = writeln!(out, "        last error: {e}");
    }
    if let Some(rewound) = canal["rewind_skipped"].as_u64().filter(|n| *n > 0) {
        let _ = writeln!(
            out,
            "        canal rewound {rewound} rows (sent again at or before the confirmed position); skipped"
        );
    }
    if let Some(w) = canal["config_warning"].as_str() {
        let _ = writeln!(out, "        config: {w}");
    }
    if let Some(skipped) = canal["skipped"].as_array().filter(|a| !a.is_empty()) {
        let last = skipped.last().and_then(Value::as_str).unwrap_or("-");
        let _ = writeln!(out, "        skipped {} (last: {last})", skipped.len());
    }
    lossy_text(&mut out, &v["lossy_text"]);
    let broker = &v["broker"];
    let state = broker.get("state").and_then(Value::as_str).unwrap_or(
        if v["broker_connected"].as_bool() == Some(true) {
            "connected"
        } else {
            "down"
        },
    );
    // with several broker URLs (amqp.urls), which one is in use
    let node = match (
        broker.get("node").and_then(Value::as_u64),
        broker.get("nodes").and_then(Value::as_u64),
    ) {
        (Some(n), Some(of)) if of > 1 => format!(" (node {n} of {of})"),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "broker  {state:<12} {}{node}  queue {}",
        s(broker, "broker"),
        s(broker, "queue")
    );
    // The publisher's counters, those it reports, in a fixed order.
    let mut counts = Vec::new();
    if let Some(u) = broker.get("unconfirmed").and_then(Value::as_u64) {
        match broker.get("max_unconfirmed").and_then(Value::as_u64) {
            Some(max) => counts.push(format!("unconfirmed {u}/{max}")),
            None => counts.push(format!("unconfirmed {u}")),
        }
    }
    for key in [
        "published",
        "confirmed",
        "returned",
        "nacked",
        "timeouts",
        "lost",
    ] {
        if let Some(x) = broker.get(key).and_then(Value::as_u64) {
            counts.push(format!("{key} {x}"));
        }
    }
    if !counts.is_empty() {
        let _ = writeln!(out, "        {}", counts.join("  "));
    }
    if let Some(since) = broker.get("stalled_since").and_then(Value::as_str) {
        let _ = writeln!(
            out,
            "        STALLED since {since}: no confirm for {} s",
            broker
                .get("oldest_unconfirmed_ms")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                / 1000
        );
    }
    broken_routes(&mut out, &broker["broken_routes"]);
    for key in ["blocked_reason", "last_error"] {
        if let Some(e) = broker.get(key).and_then(Value::as_str) {
            let _ = writeln!(out, "        {}: {e}", key.replace('_', " "));
        }
    }
    if let Some(all) = v["backfills"].as_array() {
        for b in all
            .iter()
            .filter(|b| !matches!(b["state"].as_str(), Some("done" | "cancelled")))
        {
            let _ = writeln!(out, "backfill {}", backfill_bar(b));
            if let Some(e) = b["progress"]["error"].as_str() {
                let _ = writeln!(out, "        {e}");
            }
        }
    }
    out.push('\n');
    out.push_str(&consumer_table(&v["consumers"], true));
    out
}

/// The routes the publisher found gone while running (typed from the status, not read by
/// key).
fn broken_routes(out: &mut String, v: &Value) {
    let Ok(routes) = serde_json::from_value::<Vec<BrokenRoute>>(v.clone()) else {
        return;
    };
    for r in &routes {
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

/// The columns whose text arrived lossy (typed from the status, not read by key).
fn lossy_text(out: &mut String, v: &Value) {
    let Ok(columns) = serde_json::from_value::<Vec<LossyColumn>>(v.clone()) else {
        return;
    };
    for c in &columns {
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

fn consumer_table(consumers: &Value, counters: bool) -> String {
    let mut out = String::new();
    let empty = Vec::new();
    let list = consumers.as_array().unwrap_or(&empty);
    if list.is_empty() {
        out.push_str("no consumers\n");
        return out;
    }
    let width = list
        .iter()
        .map(|c| s(c, "name").len())
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
        let enabled = if c["enabled"].as_bool() == Some(true) {
            "yes"
        } else {
            "no"
        };
        if counters {
            let lag = c["lag_seconds"]
                .as_f64()
                .map(short_duration)
                .unwrap_or_else(|| "-".into());
            let mut err = c["last_error"].as_str().unwrap_or("-").replace('\n', " ");
            if err.chars().count() > 60 {
                err = err.chars().take(59).collect::<String>() + "…";
            }
            let _ = writeln!(
                out,
                "{:<width$}  {:<7}  {:<11}  {:>9}  {:>9}  {:>6}  {:>8}  {:>6}  {:>7}  {err}",
                s(c, "name"),
                enabled,
                s(c, "state"),
                n(c, "events"),
                n(c, "triggers"),
                n(c, "errors"),
                n(c, "restarts"),
                n(c, "parked"),
                lag,
            );
        } else {
            let _ = writeln!(
                out,
                "{:<width$}  {:<7}  {}",
                s(c, "name"),
                enabled,
                s(c, "state")
            );
        }
    }
    out
}

/// The human list of consumers (`GET /consumers`).
pub fn render_list(consumers: &Value) -> String {
    consumer_table(consumers, false)
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// `[#######-------]  45%  45000/100000 rows  1234 rows/s  ETA 44s  running`
pub fn backfill_bar(b: &Value) -> String {
    let p = &b["progress"];
    let read = num(&p["rows_read"]);
    let estimate = num(&p["estimate"]).max(read);
    let state = b["state"].as_str().unwrap_or("?");
    let frac = if state == "done" {
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
        b["id"].as_str().unwrap_or("?"),
        "#".repeat(filled),
        "-".repeat(width - filled),
        frac * 100.0
    );
    if let Some(r) = b["rows_per_second"].as_f64() {
        let _ = write!(s, "  {r:.0} rows/s");
    }
    if let Some(eta) = b["eta_seconds"].as_u64() {
        let _ = write!(
            s,
            "  ETA {}",
            humantime::format_duration(std::time::Duration::from_secs(eta))
        );
    }
    let _ = write!(s, "  {state}");
    s
}

/// One line: id, table, state, counts.
pub fn backfill_line(b: &Value) -> String {
    let p = &b["progress"];
    let spec = &b["spec"];
    let mut s = format!(
        "{} {}.{} {}: {} rows read of ~{}, {} emitted, {} left to live changes, {} chunks",
        b["id"].as_str().unwrap_or("?"),
        spec["database"].as_str().unwrap_or("?"),
        spec["table"].as_str().unwrap_or("?"),
        b["state"].as_str().unwrap_or("?"),
        num(&p["rows_read"]),
        num(&p["estimate"]),
        num(&p["rows_emitted"]),
        num(&p["rows_dropped"]),
        num(&p["chunks"]),
    );
    if let Some(e) = p["error"].as_str() {
        let _ = write!(s, " ({e})");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_short() {
        assert_eq!(short_duration(0.12), "120ms");
        assert_eq!(short_duration(4.25), "4.2s");
        assert_eq!(short_duration(185.0), "3m05s");
        assert_eq!(short_duration(3720.0), "1h02m");
        assert_eq!(short_duration(90000.0), "1d01h");
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
        let text = render_status(&v, 0);
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
        let text = render_status(&v, 0);
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
        assert!(!render_status(&plain, 0).contains("replica"));
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
        let text = render_status(&v, 2_000);
        assert!(
            text.contains(
                "broker  connected    amqp://u:***@rabbit2:5672/%2f (node 2 of 3)  queue plugin_tasks"
            ),
            "{text}"
        );
        // one broker: no node count
        v["broker"]["nodes"] = 1.into();
        let text = render_status(&v, 2_000);
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
        let text = render_status(&v, 0);
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
        let text = render_status(&clean, 0);
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
        let text = render_status(&v, 1_002_500);
        assert!(
            text.starts_with("canal-consumer 0.1.0  up 1h02m  ready\n"),
            "{text}"
        );
        assert!(text.contains("connected"), "{text}");
        assert!(text.contains("destination example  lag 2.5s"), "{text}");
        // with heartbeats, their lag
        let mut hb = v.clone();
        hb["heartbeat"] = serde_json::json!({"lag_seconds": 0.004, "trips": 3});
        let text_hb = render_status(&hb, 9_000_000);
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
        assert!(text.contains("unconfirmed 3/512  confirmed 40\n"), "{text}");
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
        let list = render_list(&v["consumers"]);
        assert!(
            list.contains("teacher_consumer  no       disabled"),
            "{list}"
        );
    }
    #[test]
    fn the_bar_shows_share_rate_and_time_left() {
        let b = serde_json::json!({
            "id": "bf-1", "state": "running",
            "spec": {"database": "d", "table": "t"},
            "progress": {"rows_read": 250, "estimate": 1000},
            "rows_per_second": 50.0, "eta_seconds": 15
        });
        assert_eq!(
            backfill_bar(&b),
            "bf-1 [########----------------------]  25%  250/1000 rows  50 rows/s  ETA 15s  running"
        );
        let done = serde_json::json!({"id": "bf-1", "state": "done", "progress": {"rows_read": 3, "estimate": 0}});
        assert!(
            backfill_bar(&done).contains("100%"),
            "{}",
            backfill_bar(&done)
        );
    }
}
