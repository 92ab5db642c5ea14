//! Service control: the `canal-consumer` process the bench measures (its config, start, readiness,
//! kill on drop), and the waits on its `/status` and on the queue it publishes to.

use crate::broker::{QUEUE, amqp_url, cluster, normal_priority};
use crate::env::{backfill_url, canal_host, canal_password, canal_port, canal_user, destination};
use crate::source::local_canal;
use futures::StreamExt;
use lapin::Connection;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) async fn status(addr: &str) -> serde_json::Value {
    canal_consumer::admin::client::fetch_status(addr)
        .await
        .unwrap_or(serde_json::Value::Null)
}

pub(crate) async fn confirmed(addr: &str) -> u64 {
    status(addr).await["broker"]["confirmed"]
        .as_u64()
        .unwrap_or(0)
}

/// The service process; killed when dropped, so a failed bench leaves nothing running.
pub(crate) struct Service(pub(crate) Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// What a service with backfills gets besides the bench consumer (`BENCH_BACKFILL`).
pub(crate) struct BackfillService {
    /// `database.table` of its watermark table.
    pub(crate) watermark_table: String,
    /// `max_rows` of the bulk consumer's rule.
    pub(crate) bulk_max_rows: u64,
}

/// The service's consumer files and config in `dir`, and the process started on them. With
/// `backfill`, the `bench` consumer takes SNAPSHOT rows too, a `bulk` consumer takes only
/// SNAPSHOT rows (one bulk rule), and the service reads the source as the `backfill` account.
pub(crate) fn start_service(
    dir: &std::path::Path,
    admin: &str,
    max_priority: Option<u8>,
    bulk: Option<u64>,
    backfill: Option<&BackfillService>,
) -> Service {
    std::fs::create_dir_all(dir.join("consumers")).unwrap();
    let batch = bulk
        .map(|n| format!("batch = {{ max_rows = {n}, max_wait = \"50ms\" }}\n"))
        .unwrap_or_default();
    let events = if backfill.is_some() {
        r#"["INSERT", "SNAPSHOT"]"#
    } else {
        r#"["INSERT"]"#
    };
    let (source_url, backfill_section) = match backfill {
        Some(b) => {
            std::fs::write(
                dir.join("consumers/bulk.toml"),
                format!(
                    r#"
[consumers.bulk]
[[consumers.bulk.filters]]
database = "cc_bench"
table = "rows"
events = ["SNAPSHOT"]
[[consumers.bulk.rules]]
name = "rows"
plugin = "bench_task"
payload = {{ id = "${{data.id}}", user_id = "${{data.user_id}}", email = "${{data.email}}", amount = "${{data.amount}}", score = "${{data.score}}" }}
batch = {{ max_rows = {}, max_wait = "50ms" }}
"#,
                    b.bulk_max_rows
                ),
            )
            .unwrap();
            (
                format!("source_url = \"{}\"\n", backfill_url()),
                format!("[backfill]\nwatermark_table = \"{}\"\n", b.watermark_table),
            )
        }
        None => (String::new(), String::new()),
    };
    std::fs::write(
        dir.join("consumers/bench.toml"),
        format!(
            r#"
[consumers.bench]
[[consumers.bench.filters]]
database = "cc_bench"
table = "rows"
events = {events}
[[consumers.bench.rules]]
name = "row"
plugin = "bench_task"
payload = {{ id = "${{data.id}}", user_id = "${{data.user_id}}", email = "${{data.email}}", amount = "${{data.amount}}", score = "${{data.score}}" }}
{batch}"#
        ),
    )
    .unwrap();
    let config = dir.join("bench.toml");
    // the queue's priority levels, and the message priorities within them
    let urls = if cluster() {
        format!("urls = {:?}", crate::env::amqp_cluster_urls())
    } else {
        String::new()
    };
    let queue_priority = match max_priority {
        _ if cluster() => format!(
            "queue_type = \"quorum\"\nmax_priority = 0\ndead_letter_exchange = \"{QUEUE}.dlx\"\n\
             dead_letter_strategy = \"at-least-once\"\ndelivery_limit = 5\n"
        ),
        Some(p) => format!(
            "max_priority = {p}\n[amqp.priorities]\nhigh = {}\nnormal = {}\nlow = 1\n",
            p.min(9),
            normal_priority(p),
        ),
        None => "max_priority = 0\n".into(),
    };
    std::fs::write(
        &config,
        format!(
            r#"
[canal]
host = "{canal_host}"
port = {canal_port}
destination = "{destination}"
username = "{canal_user}"
password = "{canal_password}"
mem_unit = {mem_unit}
{source_url}
[consumers]
dir = "{consumers}"
state_file = "{state}"
[admin]
bind = "{admin}"
[log]
level = "warn"
[amqp]
url = "{amqp}"
{urls}
[amqp.queue]
name = "{QUEUE}"
{queue_priority}
{backfill_section}
"#,
            amqp = amqp_url(),
            consumers = dir.join("consumers").display(),
            state = dir.join("state.json").display(),
            mem_unit = local_canal().mem_unit,
            canal_host = canal_host(),
            canal_port = canal_port(),
            destination = destination(),
            canal_user = canal_user(),
            canal_password = canal_password(),
        ),
    )
    .unwrap();
    Service(
        Command::new(env!("CARGO_BIN_EXE_canal-consumer"))
            .args(["start", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("service.log")).unwrap())
            .spawn()
            .expect("canal-consumer"),
    )
}

/// The service's directory (fresh) and a free admin address.
pub(crate) fn service_dir() -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("cc-bench-pipeline-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let admin = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    (dir, admin)
}

/// Wait (at most 60 s) until the service answers `/ready` with 200.
pub(crate) async fn wait_ready(admin: &str, service: &mut Service, dir: &std::path::Path) {
    let ready_by = Instant::now() + Duration::from_secs(60);
    while canal_consumer::admin::client::request(admin, "GET", "/ready")
        .await
        .map(|r| r.status)
        .unwrap_or(0)
        != 200
    {
        assert!(
            Instant::now() < ready_by && service.0.try_wait().unwrap().is_none(),
            "service not ready; see {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The throughput phase's end on the sink: wait until `n` rows have arrived at the queue's
/// consumer (one per message, or with `bulk` each message's `bulk.rows`); returns the arrival
/// time of the last and the messages seen. Reading the sink rather than polling `/status` adds
/// no admin requests to the service's CPU while rows flow.
pub(crate) async fn wait_rows(sink: &mut lapin::Consumer, n: u64, bulk: bool) -> (Instant, u64) {
    let (mut rows, mut messages) = (0u64, 0u64);
    // one deadline for the phase rather than a timer per message, like the probe's drain: the
    // sink's CPU shares the machine with the service
    let all = async {
        while rows < n {
            let d = sink.next().await.unwrap().unwrap();
            rows += if bulk {
                let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
                body["bulk"]["rows"].as_u64().unwrap_or(1)
            } else {
                1
            };
            messages += 1;
        }
    };
    if tokio::time::timeout(Duration::from_secs(600), all)
        .await
        .is_err()
    {
        panic!("only {rows} of {n} rows arrived within 600 s");
    }
    (Instant::now(), messages)
}

/// Wait until `queue` holds `n` messages: a passive declare every 10 ms, which the broker
/// answers from the queue's counters, so the service is not asked while rows flow.
pub(crate) async fn wait_queued(conn: &Connection, queue: &str, n: u64) {
    let ch = conn.create_channel().await.unwrap();
    let by = Instant::now() + Duration::from_secs(600);
    loop {
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        if u64::from(q.message_count()) >= n {
            break;
        }
        assert!(
            Instant::now() < by,
            "only {} of {n} messages queued within 600 s",
            q.message_count()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = ch.close(200, "done".into()).await;
}

/// Wait until the service has confirmed `n` triggers, emptying the sink meanwhile.
pub(crate) async fn wait_confirmed(
    admin: &str,
    n: u64,
    sink: &mut lapin::Consumer,
    mut sample: impl FnMut(),
) -> Instant {
    let by = Instant::now() + Duration::from_secs(900);
    loop {
        while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::ZERO, sink.next()).await {}
        let c = confirmed(admin).await;
        if c >= n {
            return Instant::now();
        }
        assert!(Instant::now() < by, "only {c} of {n} confirmed");
        sample();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Wait until the service's `/status` counts `total` messages confirmed.
pub(crate) async fn wait_all_confirmed(admin: &str, total: u64) -> Instant {
    let by = Instant::now() + Duration::from_secs(60);
    loop {
        let c = confirmed(admin).await;
        if c >= total {
            return Instant::now();
        }
        assert!(Instant::now() < by, "only {c} of {total} confirmed");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub(crate) async fn empty_sink(sink: &mut lapin::Consumer) {
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_millis(300), sink.next()).await
    {
    }
}
