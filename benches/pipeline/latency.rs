//! Latency at fixed rates: stamped single-row INSERTs, and the readers that report each row's
//! arrival (the service's queue consumer, or a bare Canal client fetching as the service does).

use crate::env::{destination, mysql_client_args};
use crate::source::{canal_session, local_canal, stamped_row};
use canal_consumer::canal::window::took_all;
use futures::StreamExt;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

pub(crate) struct Latency {
    pub(crate) rate: u64,
    pub(crate) achieved: f64,
    pub(crate) n: usize,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    /// CPU seconds of the service and of the local Canal server over the phase.
    pub(crate) cpu: Option<(f64, Option<f64>)>,
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The median of a few figures (the upper of the middle two for an even count), NaN for none.
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One stamped row seen by a reader: its id, its statement stamp and the arrival time (seconds
/// since the epoch, same host clock).
pub(crate) type Arrival = (u64, f64, f64);

pub(crate) fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Reads the service's messages from the queue consumer and reports each stamped row.
pub(crate) fn sink_arrivals(
    mut sink: lapin::Consumer,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<Arrival>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        const SNAPSHOT: &[u8] = br#""event_type":"SNAPSHOT""#;
        while let Some(Ok(d)) = sink.next().await {
            let now = now_s();
            // a backfill's rows carry no stamp: skip them without parsing them, so that the
            // reader keeps up with a full-speed backfill on the same queue
            if d.data.windows(SNAPSHOT.len()).any(|w| w == SNAPSHOT) {
                continue;
            }
            let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap_or_default();
            let id = body["payload"]["id"]
                .as_u64()
                .or_else(|| body["payload"]["id"].as_str().and_then(|s| s.parse().ok()));
            let score = &body["payload"]["score"];
            let stamp = score
                .as_f64()
                .or_else(|| score.as_str().and_then(|s| s.parse().ok()));
            if let (Some(id), Some(stamp)) = (id, stamp)
                && tx.send((id, stamp, now)).is_err()
            {
                return;
            }
        }
    });
    (task, rx)
}

/// Canal alone, for the latency limit: a bare client that fetches as the service does (the full
/// batch size without waiting while rows come; after an empty GET the smallest batch, waiting up
/// to the service's `canal.fetch_wait`), acks each batch and reports each stamped row.
pub(crate) fn canal_arrivals() -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<Arrival>,
) {
    use canal_consumer::event::Value;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let defaults = local_canal();
        let mut s = canal_session().await;
        let mut decoder = canal_consumer::canal::decode::Decoder::new(&destination());
        let mut events = Vec::new();
        let mut idle = false;
        loop {
            let (asked, wait) = if idle {
                (1, defaults.fetch_wait)
            } else {
                (defaults.fetch_units(), Duration::ZERO)
            };
            let b = s.get(asked, wait).await.unwrap();
            // as the service: long-poll after an empty or a short answer
            idle = b.is_empty()
                || took_all(
                    b.asked,
                    defaults.mem_unit,
                    b.entries.iter().map(|e| e.len()),
                );
            if b.is_empty() {
                continue;
            }
            let now = now_s();
            events.clear();
            decoder.decode_entries(&b.entries, &mut events).unwrap();
            s.ack(b.batch_id).await.unwrap();
            for e in &events {
                let id = match e.get("id") {
                    Some(Value::Int(i)) => *i as u64,
                    Some(Value::UInt(i)) => *i,
                    _ => continue,
                };
                let stamp = match e.get("score") {
                    Some(Value::Float(f)) => *f,
                    Some(Value::Text(t)) => t.parse().unwrap_or(f64::NAN),
                    _ => continue,
                };
                if tx.send((id, stamp, now)).is_err() {
                    return;
                }
            }
        }
    });
    (task, rx)
}

/// One autocommit INSERT per period for `seconds`; latency per row from its server stamp to its
/// arrival at the reader behind `arrivals`.
pub(crate) async fn latency(
    arrivals: &mut tokio::sync::mpsc::UnboundedReceiver<Arrival>,
    base: u64,
    rate: u64,
    seconds: u64,
) -> Latency {
    let total = rate * seconds;
    let mut writer = Command::new("mysql")
        .args(mysql_client_args())
        .args(["--batch", "--unbuffered"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = writer.stdin.take().unwrap();
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut lat = Vec::with_capacity(total as usize);
    let mut seen = vec![false; total as usize];
    let mut i = 0u64;
    let deadline = start + Duration::from_secs(seconds + 60);
    while (lat.len() as u64) < total && Instant::now() < deadline {
        let due = start + period.mul_f64(i as f64);
        if i < total && Instant::now() >= due {
            writeln!(
                stdin,
                "INSERT INTO cc_bench.rows VALUES {};",
                stamped_row(base + i)
            )
            .unwrap();
            stdin.flush().unwrap();
            i += 1;
            continue;
        }
        let wait = if i < total {
            due.saturating_duration_since(Instant::now())
        } else {
            Duration::from_millis(50)
        };
        if let Ok(Some((id, stamp, now))) = tokio::time::timeout(wait, arrivals.recv()).await
            && id >= base
            && id < base + total
            && !seen[(id - base) as usize]
        {
            seen[(id - base) as usize] = true;
            lat.push((now - stamp) * 1000.0);
        }
    }
    let achieved = i as f64 / start.elapsed().as_secs_f64().max(1e-9);
    drop(stdin);
    let _ = writer.wait();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Latency {
        rate,
        achieved: achieved.min(rate as f64),
        n: lat.len(),
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        max: lat.last().copied().unwrap_or(f64::NAN),
        cpu: None,
    }
}
