//! Heartbeats end to end against the real services (the `canal-consumer` binary, Canal,
//! MariaDB, RabbitMQ; `deploy/local/up`): with `[heartbeat] enabled` the lag stays near 0 on an
//! idle database, grows while the stream is stuck (Canal stopped), and comes back down when it
//! moves again; commit-to-confirm latencies are observed as rows flow. The service writes its
//! heartbeats as the `backfill` account of deploy/local/mariadb/users.sql.
//!
//! Every wait polls `/status` or `/metrics` against a deadline; the idle phase samples both for
//! a fixed time on purpose (the claim is about what they show over that time).
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use common::service::*;
use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const DB: &str = "cc_hb";

/// Starts Canal again if the test ends (or panics) while it is stopped.
struct CanalBackUp;
impl Drop for CanalBackUp {
    fn drop(&mut self) {
        script("deploy/local/canal-ctl", &["start"]);
    }
}

/// A gauge or counter from `/metrics` (no labels).
async fn metric(svc: &ServiceProc, name: &str) -> Option<f64> {
    let (code, text) = svc.get("/metrics").await;
    assert_eq!(code, 200, "{text}");
    text.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The heartbeat part of `/status`.
async fn heartbeat(svc: &ServiceProc) -> Value {
    svc.status().await["heartbeat"].clone()
}

/// Polls `what` until it returns Some, failing with the service's log after `timeout`.
async fn poll<T, F, Fut>(svc: &ServiceProc, what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}; status {:#}\n{}",
            svc.status().await,
            svc.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
async fn lag_stays_near_zero_when_idle_and_grows_only_while_the_stream_is_stuck() {
    let _canal = canal_lock().await;
    script("deploy/local/canal-ctl", &["start"]);
    mysql(&format!(
        "CREATE DATABASE IF NOT EXISTS {DB}; DROP TABLE IF EXISTS {DB}.t; \
         CREATE TABLE {DB}.t (id INT PRIMARY KEY, v INT NOT NULL); \
         DROP TABLE IF EXISTS canal_consumer.wm_hb;"
    ));
    let queue = queue("heartbeat-lag");
    delete_queue(&queue).await;
    let consumer = format!(
        r#"
[consumers.hb]
[[consumers.hb.filters]]
database = "{DB}"
table = "t"
events = ["INSERT"]

[[consumers.hb.rules]]
name = "row"
when = {{ events = ["INSERT"] }}
plugin = "row"
payload = {{ id = "${{data.id}}" }}
"#
    );
    let mut svc = ServiceProc::prepare(
        "heartbeat-lag",
        &queue,
        &[("hb.toml", &consumer)],
        r#"
[backfill]
watermark_table = "canal_consumer.wm_hb"

[heartbeat]
enabled = true
interval = "1s"
"#,
    );
    svc.env
        .push(("CANAL_CONSUMER__CANAL__SOURCE_URL".into(), backfill_url()));
    svc.start().await;

    // heartbeats come back
    poll(
        &svc,
        "two heartbeat trips",
        Duration::from_secs(30),
        || async {
            let hb = heartbeat(&svc).await;
            (hb["trips"].as_u64().unwrap_or(0) >= 2).then_some(())
        },
    )
    .await;
    let row = mysql("SELECT state, spec, progress, watermark FROM canal_consumer.wm_hb");
    let cols: Vec<&str> = row.trim().split('\t').collect();
    assert_eq!(cols[..3], ["heartbeat", "{}", "{}"], "{row}");
    assert!(cols[3].starts_with("hb:"), "{row}");

    // rows flow: every one is confirmed and observed in the histogram
    mysql(&format!(
        "USE {DB}; INSERT INTO t SELECT seq, seq FROM seq_1_to_20"
    ));
    let got = consume_until(&queue, Duration::from_secs(60), |g| g.len() >= 20).await;
    assert_eq!(got.len(), 20);
    let count = poll(
        &svc,
        "20 commit-to-confirm observations",
        Duration::from_secs(30),
        || async {
            metric(&svc, "canal_commit_to_confirm_seconds_count")
                .await
                .filter(|c| *c >= 20.0)
        },
    )
    .await;
    let sum = metric(&svc, "canal_commit_to_confirm_seconds_sum")
        .await
        .unwrap();
    // the binlog's commit time is in whole seconds: each observation is at most ~1 s high
    assert!(sum / count < 3.0, "mean {} s over {count}", sum / count);

    // idle for 8 s: the lag stays near 0 on /metrics and in status, and heartbeats keep coming
    let trips_before = heartbeat(&svc).await["trips"].as_u64().unwrap();
    let idle_from = Instant::now();
    let mut idle_max: f64 = 0.0;
    while idle_from.elapsed() < Duration::from_secs(8) {
        let m = metric(&svc, "canal_lag_seconds").await.unwrap();
        let status = svc.status().await;
        let s = status["heartbeat"]["lag_seconds"].as_f64().unwrap();
        assert!(m < 2.0, "canal_lag_seconds {m} while idle\n{status:#}");
        assert!(s < 2.0, "status lag {s} while idle\n{status:#}");
        let text = canal_consumer::admin::render::render_status(
            &serde_json::from_value(status.clone()).unwrap(),
            chrono::Utc::now().timestamp_millis(),
        );
        assert!(text.contains("(heartbeat)"), "{text}");
        idle_max = idle_max.max(m).max(s);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let trips_after = heartbeat(&svc).await["trips"].as_u64().unwrap();
    assert!(
        trips_after >= trips_before + 5,
        "heartbeats while idle: {trips_before} -> {trips_after}"
    );
    eprintln!(
        "idle 8 s: lag at most {idle_max:.3} s, {} heartbeats, newest trip {} ms",
        trips_after - trips_before,
        heartbeat(&svc).await["last_trip_ms"]
    );

    // the stream is stuck (Canal stopped): the lag grows past the idle value
    let back_up = CanalBackUp;
    script("deploy/local/canal-ctl", &["stop"]);
    let stopped = Instant::now();
    let stuck = poll(
        &svc,
        "lag growing while Canal is down",
        Duration::from_secs(60),
        || async {
            let m = metric(&svc, "canal_lag_seconds").await?;
            let s = heartbeat(&svc).await["lag_seconds"].as_f64()?;
            (m > idle_max + 3.0 && s > idle_max + 3.0).then_some(m)
        },
    )
    .await;
    eprintln!(
        "Canal stopped: lag {stuck:.1} s after {:.1} s",
        stopped.elapsed().as_secs_f64()
    );
    // and it keeps growing while it stays down
    let later = poll(
        &svc,
        "lag still growing",
        Duration::from_secs(30),
        || async {
            metric(&svc, "canal_lag_seconds")
                .await
                .filter(|m| *m > stuck + 1.0)
        },
    )
    .await;
    assert!(later > stuck);

    // Canal back: the lag comes down again once a heartbeat comes through
    drop(back_up);
    poll(&svc, "lag back near 0", Duration::from_secs(90), || async {
        let m = metric(&svc, "canal_lag_seconds").await?;
        (m < 2.0).then_some(())
    })
    .await;
    let hb = heartbeat(&svc).await;
    // nothing older than the heartbeat in flight is owed any more
    assert!(hb["pending"].as_u64().unwrap() <= 1, "{hb:#}");
    let trips = metric(&svc, "canal_heartbeat_trips_total").await.unwrap();
    assert!(trips >= trips_after as f64, "{trips}");
    let _ = svc.terminate(Duration::from_secs(30));
    delete_queue(&queue).await;
}
