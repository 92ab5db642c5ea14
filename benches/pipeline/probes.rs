//! The limits every speed figure is printed beside: the broker probe (confirmed publishes of
//! copies of the service's message, as fast as the broker takes them), the Canal probe (a bare
//! client reading the same rows) and RabbitMQ PerfTest (cluster mode).

use crate::env::destination;
use crate::source::{canal_session, insert_bulk, local_canal};
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use std::collections::VecDeque;
use std::process::Command;
use std::time::{Duration, Instant};

pub(crate) const PROBE_QUEUE: &str = "cc_bench_probe";

/// The source's own limit: `n` rows inserted as in the throughput phase, read by a bare client
/// (GET without waiting, the service's fetch size, ack, rows counted with the service's decoder;
/// nothing published). Rows/s from the first INSERT until the last row has arrived. Run before
/// the service starts, on its client id, so the service never sees these rows.
pub(crate) async fn canal_probe(from: u64, n: u64) -> f64 {
    let mut s = canal_session().await;
    let fetch = local_canal().fetch_units();
    let mut decoder = canal_consumer::canal::decode::Decoder::new(&destination());
    let mut events = Vec::new();
    let t0 = Instant::now();
    let inserter = insert_bulk(from, from + n - 1);
    let mut rows = 0u64;
    let by = t0 + Duration::from_secs(300);
    while rows < n {
        assert!(Instant::now() < by, "canal probe: only {rows} of {n} rows");
        let b = s.get(fetch, Duration::ZERO).await.unwrap();
        if b.is_empty() {
            continue;
        }
        events.clear();
        decoder.decode_entries(&b.entries, &mut events).unwrap();
        rows += events.len() as u64;
        s.ack(b.batch_id).await.unwrap();
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    inserter.join().unwrap();
    rate
}

/// The broker's own confirmed-publish rate: `n` copies of `sample` (same body, same properties)
/// to a fresh durable queue with `args`, at most `window` unconfirmed, a consumer draining it
/// as the bench's sink drains the service's queue. Messages per second.
pub(crate) async fn probe(
    conn: &Connection,
    args: FieldTable,
    sample: &(Vec<u8>, BasicProperties),
    n: u64,
    window: usize,
    drain: bool,
) -> f64 {
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(PROBE_QUEUE.into(), QueueDeleteOptions::default())
        .await;
    ch.queue_declare(
        PROBE_QUEUE.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let drain_ch = conn.create_channel().await.unwrap();
    let mut sink = crate::broker::no_ack_consumer(&drain_ch, PROBE_QUEUE, "bench-probe-sink").await;
    if !drain {
        // no consumer: the messages pile up in the queue, as when the workers fall behind
        let _ = drain_ch
            .basic_cancel("bench-probe-sink".into(), Default::default())
            .await;
    }
    let drainer = tokio::spawn(async move { while let Some(Ok(_)) = sink.next().await {} });
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let t0 = Instant::now();
    publish_confirmed(&ch, sample, n, window).await;
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    drainer.abort();
    let _ = drain_ch.close(200, "done".into()).await;
    let _ = ch
        .queue_delete(PROBE_QUEUE.into(), QueueDeleteOptions::default())
        .await;
    let _ = ch.close(200, "done".into()).await;
    rate
}

/// Publish `n` copies with confirms, at most `window` unconfirmed, as fast as the broker takes
/// them. Each publish is polled once when it is made (lapin then queues its frames) and not
/// awaited until its confirm is the oldest one left, so the probe never waits for lapin's I/O
/// thread to write one message before it makes the next: what it measures is the broker.
pub(crate) async fn publish_confirmed(
    ch: &Channel,
    sample: &(Vec<u8>, BasicProperties),
    n: u64,
    window: usize,
) {
    type Confirmed =
        std::pin::Pin<Box<futures::future::MaybeDone<futures::future::BoxFuture<'static, bool>>>>;
    let mut pending: VecDeque<Confirmed> = VecDeque::with_capacity(window);
    for i in 0..n {
        if pending.len() >= window {
            let mut c = pending.pop_front().unwrap();
            c.as_mut().await;
            assert!(c.as_mut().take_output().unwrap(), "probe message nacked");
        }
        let props = sample
            .1
            .clone()
            .with_message_id(format!("probe-{i}").into());
        let (ch, body) = (ch.clone(), sample.0.clone());
        let publish = async move {
            ch.basic_publish(
                "".into(),
                PROBE_QUEUE.into(),
                // as the service publishes: mandatory, so the broker checks the route
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap()
            .is_ack()
        };
        let mut c = Box::pin(futures::future::maybe_done(publish.boxed()));
        let _ = futures::poll!(c.as_mut());
        pending.push_back(c);
    }
    for mut c in pending {
        c.as_mut().await;
        assert!(c.as_mut().take_output().unwrap(), "probe message nacked");
    }
}

/// RabbitMQ PerfTest (from Maven Central, `deploy/local/perftest/fetch`): one producer with
/// `window` unconfirmed, persistent `size`-byte messages to a fresh quorum queue drained by one
/// consumer, for `seconds`. Its average confirmed-publish rate, msg/s.
pub(crate) fn perftest(url: &str, size: usize, window: usize, seconds: u64) -> f64 {
    let fetch =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local/perftest/fetch");
    let out = Command::new(&fetch)
        .output()
        .expect("deploy/local/perftest/fetch");
    assert!(
        out.status.success(),
        "fetching PerfTest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lib = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = Command::new("java")
        .arg("-cp")
        .arg(format!("{lib}/*"))
        .arg("com.rabbitmq.perf.PerfTest")
        .args([
            "--uri",
            url,
            "--queue",
            "cc_bench_perftest",
            "--quorum-queue",
        ])
        .args([
            "--flag",
            "persistent",
            "--producers",
            "1",
            "--consumers",
            "1",
        ])
        .args([
            "--confirm",
            &window.to_string(),
            "--size",
            &size.to_string(),
        ])
        .args(["--time", &seconds.to_string(), "--auto-delete", "false"])
        .output()
        .expect("java (PerfTest)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .filter_map(|l| l.split("sending rate avg:").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse::<f64>().ok())
        .next_back()
        .unwrap_or_else(|| {
            panic!(
                "no rate in PerfTest's output: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}
