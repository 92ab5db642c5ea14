//! The container as users run it (issue 22): our image from `deploy/Dockerfile`, the two Compose
//! files and the Kubernetes manifests, with podman.
//!
//! - The image (target `prebuilt`: the binary `cargo test` already built, so the project is not
//!   compiled again in a container) runs as 10001:10001 with a read-only root filesystem,
//!   answers `/health`, `/ready` and `/metrics`, and carries a row from the local MariaDB to
//!   RabbitMQ with only the service inside the container (host network, the local stack).
//! - `podman stop` (SIGTERM, then the default 10 s grace period) drains mid-stream and exits 0,
//!   every fetched batch acked; the restarted container delivers every row.
//! - `deploy/docker-compose.yml` from nothing: the whole stack up, a row end to end.
//! - `deploy/docker-compose.ha.yml`: the active replica's container and then the running Canal
//!   server's container killed while rows are written; every row arrives.
//! - `deploy/k8s` and `deploy/k8s/ha` render with `kubectl kustomize`, every document decodes
//!   strictly into its Kubernetes API type (`deploy/container/build k8s-check`), and the security
//!   context matches the image's user and group.
//!
//! Images come from `deploy/container/build` (deploy/local/test builds the base and service
//! images before the tests; this file builds our image, seconds when cached). Containers,
//! volumes and Compose projects are named `cc-test-*` and removed when a test ends, pass or fail
//! (deploy/local/test also removes any a killed run left). When no container engine could be
//! installed, deploy/local/test sets `CC_CONTAINER_SKIP` to the reason and these tests say so and
//! pass; `CC_CONTAINER_TESTS=0` skips them too.
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use common::proc::output_within;
use common::service::*;
use common::*;
use futures::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DB: &str = "cc_it";
const IMAGE: &str = "localhost/canal-consumer:test";

/// One container test at a time (they share the 2 cores and the image build).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// None (and a message) when the tests cannot run here.
fn skip_reason() -> Option<String> {
    if env_or("CC_CONTAINER_TESTS", "1") == "0" {
        return Some("CC_CONTAINER_TESTS=0".into());
    }
    if let Ok(r) = std::env::var("CC_CONTAINER_SKIP")
        && !r.is_empty()
    {
        return Some(r);
    }
    if Command::new("podman").arg("--version").output().is_err() {
        return Some("podman is not installed (deploy/container/build engine installs it)".into());
    }
    None
}

fn skipped(test: &str) -> bool {
    match skip_reason() {
        Some(why) => {
            eprintln!("SKIPPED {test}: no container engine: {why}");
            true
        }
        None => false,
    }
}

fn run(what: &str, cmd: &mut Command, timeout: Duration) -> String {
    let out = output_within(what, cmd, timeout);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn podman(args: &[&str]) -> String {
    run(
        &format!("podman {}", args.join(" ")),
        Command::new("podman").args(args),
        Duration::from_secs(120),
    )
}

fn podman_ok(args: &[&str]) -> bool {
    output_within(
        "podman",
        Command::new("podman").args(args),
        Duration::from_secs(60),
    )
    .status
    .success()
}

/// Our image from the binary this test run built, once per test binary.
fn build_image() {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let started = Instant::now();
        run(
            "deploy/container/build image",
            Command::new(repo_root().join("deploy/container/build"))
                .args(["image", "--binary", env!("CARGO_BIN_EXE_canal-consumer")])
                .env("CC_IMAGE", IMAGE),
            Duration::from_secs(600),
        );
        eprintln!(
            "measured: image build (target prebuilt) took {:?}",
            started.elapsed()
        );
    });
}

/// Removes what a test created (containers, volumes, Compose projects), pass or fail.
#[derive(Default)]
struct Cleanup {
    containers: Vec<String>,
    volumes: Vec<String>,
    projects: Vec<(String, String)>,
}

impl Cleanup {
    fn remove_all(&self) {
        for c in &self.containers {
            let _ = podman_ok(&["rm", "-f", "-t", "0", c]);
        }
        for v in &self.volumes {
            let _ = podman_ok(&["volume", "rm", "-f", v]);
        }
        for (file, project) in &self.projects {
            compose_down(file, project);
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.remove_all();
    }
}

fn compose_cmd(file: &str, project: &str) -> Command {
    let mut c = Command::new(repo_root().join("deploy/container/compose"));
    c.current_dir(repo_root())
        .env("CC_IMAGE", IMAGE)
        .args(["-p", project, "-f", file]);
    c
}

fn compose_down(file: &str, project: &str) {
    let _ = output_within(
        "compose down",
        compose_cmd(file, project).args(["down", "-v", "-t", "5"]),
        Duration::from_secs(180),
    );
}

/// The container of `service` in Compose project `project`.
fn container_of(project: &str, service: &str) -> String {
    let names = podman(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=com.docker.compose.project={project}"),
        "--filter",
        &format!("label=com.docker.compose.service={service}"),
        "--format",
        "{{.Names}}",
    ]);
    names
        .lines()
        .next()
        .unwrap_or_else(|| panic!("no container for {project}/{service}"))
        .to_string()
}

async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    canal_consumer::admin::client::request(addr, "GET", path)
        .await
        .ok()
        .map(|r| (r.status, r.body))
}

/// Polls `/ready` on `addr` until 200; panics with the container's logs after `timeout`.
async fn wait_ready(addr: &str, container: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((200, _)) = http_get(addr, "/ready").await {
            return;
        }
        let running = podman(&["inspect", "--format", "{{.State.Running}}", container]);
        assert!(
            running == "true" || Instant::now() < deadline,
            "{container} exited:\n{}",
            logs(container)
        );
        assert!(
            Instant::now() < deadline,
            "{container} not ready on {addr} within {timeout:?}:\n{}",
            logs(container)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn logs(container: &str) -> String {
    let out = output_within(
        "podman logs",
        Command::new("podman").args(["logs", "--tail", "60", container]),
        Duration::from_secs(30),
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A consumer triggering `row_task` with `{id}` for inserts into cc_it.`table`.
fn row_consumer(table: &str) -> String {
    format!(
        r#"
[consumers.container_rows]
[[consumers.container_rows.filters]]
database = "{DB}"
table = "{table}"
events = ["INSERT"]

[[consumers.container_rows.rules]]
name = "row"
plugin = "row_task"
payload = {{ id = "${{data.id}}" }}
"#
    )
}

/// Message ids per value of `field` in the payload.
fn by_payload(got: &[Got], field: &str) -> BTreeMap<i64, BTreeSet<String>> {
    let mut out: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
    for g in got {
        let v = &g.body["payload"][field];
        if let Some(id) = v
            .as_i64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        {
            out.entry(id).or_default().insert(g.message_id.clone());
        }
    }
    out
}

fn assert_rows(got: &[Got], field: &str, upto: i64) {
    let rows = by_payload(got, field);
    let missing: Vec<i64> = (1..=upto).filter(|i| !rows.contains_key(i)).collect();
    assert!(missing.is_empty(), "rows missing: {missing:?}");
    for (id, ids) in &rows {
        assert_eq!(
            ids.len(),
            1,
            "row {id} came with different message ids: {ids:?}"
        );
    }
}

/// Reads a queue on any broker into a shared list until dropped (the task is aborted).
struct Reader {
    got: Arc<Mutex<Vec<Got>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Reader {
    async fn start(url: &str, queue: &str, timeout: Duration) -> Reader {
        let deadline = Instant::now() + timeout;
        let (conn, ch) = loop {
            // the queue exists once the service declared it
            if let Ok(conn) = Connection::connect(url, ConnectionProperties::default()).await
                && let Ok(ch) = conn.create_channel().await
                && let Ok(c) = ch
                    .basic_consume(
                        queue.into(),
                        "container-test".into(),
                        BasicConsumeOptions {
                            no_ack: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
            {
                break (conn, c);
            }
            assert!(Instant::now() < deadline, "cannot consume {queue} at {url}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        let mut consumer = ch;
        let task = tokio::spawn(async move {
            let _conn = conn;
            while let Some(Ok(d)) = consumer.next().await {
                sink.lock().unwrap().push(Got {
                    message_id: d
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                    priority: *d.properties.priority(),
                    body: serde_json::from_slice(&d.data).unwrap_or(Value::Null),
                });
            }
        });
        Reader { got, task }
    }

    fn snapshot(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until every value 1..=upto of payload `field` arrived.
    async fn wait_rows(&self, field: &str, upto: i64, timeout: Duration, what: &str) -> Vec<Got> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.snapshot();
            let rows = by_payload(&got, field);
            if (1..=upto).all(|i| rows.contains_key(&i)) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {} of {upto} rows within {timeout:?}",
                rows.range(1..=upto).count()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Our image on the host network against the local stack, its own queue and consumer.
struct ImageRun {
    name: String,
    admin: String,
    queue: String,
    table: String,
    _dir: PathBuf,
    cleanup: Cleanup,
}

async fn run_image(tag: &str) -> ImageRun {
    build_image();
    let table = format!("container_{tag}");
    note_table(DB, &table);
    let queue = queue(&format!("container_{tag}"));
    delete_queue(&queue).await;
    let dir = std::env::temp_dir().join(format!("cc-container-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("consumers")).unwrap();
    std::fs::write(dir.join("consumers/rows.toml"), row_consumer(&table)).unwrap();
    let name = format!("cc-test-image-{tag}");
    let volume = format!("cc-test-image-{tag}-state");
    let mut cleanup = Cleanup::default();
    cleanup.containers.push(name.clone());
    cleanup.volumes.push(volume.clone());
    cleanup.remove_all(); // a killed earlier run's leftovers
    let admin = format!("127.0.0.1:{}", free_port());
    let env = [
        ("CANAL_HOST", canal_host()),
        ("CANAL_PORT", canal_port().to_string()),
        ("CANAL_DESTINATION", destination()),
        ("CANAL_CONSUMER__CANAL__USERNAME", canal_user()),
        ("CANAL_CONSUMER__CANAL__PASSWORD", canal_password()),
        (
            "CANAL_CONSUMER__CANAL__MEM_UNIT",
            canal_mem_unit().to_string(),
        ),
        ("CANAL_CONSUMER__AMQP__URL", amqp_url()),
        ("CANAL_CONSUMER__AMQP__QUEUE__NAME", queue.clone()),
        ("CANAL_CONSUMER__ADMIN__BIND", admin.clone()),
        ("CANAL_CONSUMER__SHUTDOWN__DEADLINE", "8s".into()),
    ];
    let mut args: Vec<String> = [
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "host",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "-v",
        &format!("{volume}:/var/lib/canal-consumer"),
        "-v",
        &format!(
            "{}:/app/config/consumers:ro",
            dir.join("consumers").display()
        ),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (k, v) in env {
        args.push("-e".into());
        args.push(format!("{k}={v}"));
    }
    args.push(IMAGE.into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    podman(&args);
    wait_ready(&admin, &name, Duration::from_secs(60)).await;
    ImageRun {
        name,
        admin,
        queue,
        table,
        _dir: dir,
        cleanup,
    }
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test(flavor = "multi_thread")]
async fn the_image_runs_read_only_as_10001_answers_probes_and_delivers_a_row() {
    if skipped("the_image_runs_read_only_as_10001_answers_probes_and_delivers_a_row") {
        return;
    }
    let _serial = serial().await;
    let _canal = canal_lock().await;
    let started = Instant::now();
    let r = run_image("probe").await;
    eprintln!(
        "measured: container start to /ready {:?} (image {IMAGE})",
        started.elapsed()
    );

    // non-root, the user and group the manifests name, read-only root filesystem
    assert_eq!(
        podman(&["inspect", "--format", "{{.Config.User}}", &r.name]),
        "10001:10001"
    );
    assert_eq!(
        podman(&[
            "inspect",
            "--format",
            "{{.HostConfig.ReadonlyRootfs}}",
            &r.name
        ]),
        "true"
    );
    assert_eq!(podman(&["exec", &r.name, "id", "-u"]), "10001");
    assert_eq!(podman(&["exec", &r.name, "id", "-g"]), "10001");
    assert_eq!(podman(&["exec", &r.name, "id", "-gn"]), "canal");
    assert!(
        !podman_ok(&["exec", &r.name, "touch", "/app/config/probe"]),
        "the root filesystem is writable"
    );
    // the state dir (the shipped config's state/ links to it): lock and admin token are there
    let listing = podman(&["exec", &r.name, "ls", "-A", "/app/state/"]);
    assert!(listing.contains("admin.token"), "state dir: {listing}");

    for path in ["/health", "/ready"] {
        let (code, body) = http_get(&r.admin, path).await.unwrap();
        assert_eq!(code, 200, "{path}: {body}");
    }
    let (code, metrics) = http_get(&r.admin, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("ha_active 1") && metrics.contains("canal_batches_total"),
        "metrics: {metrics}"
    );

    // a row from the local MariaDB, through the local Canal, to the local RabbitMQ
    insert_notes(DB, &r.table, 1, 20);
    let got = consume_until(&r.queue, Duration::from_secs(60), |g| {
        (1..=20).all(|i| by_payload(g, "id").contains_key(&i))
    })
    .await;
    assert_rows(&got, "id", 20);
    assert!(got.iter().all(|g| g.body["plugin"] == "row_task"));
    drop(r.cleanup);
    delete_queue(&r.queue).await;
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test(flavor = "multi_thread")]
async fn podman_stop_mid_stream_drains_and_exits_0_within_the_default_grace_period() {
    if skipped("podman_stop_mid_stream_drains_and_exits_0_within_the_default_grace_period") {
        return;
    }
    let _serial = serial().await;
    let _canal = canal_lock().await;
    let r = run_image("stop").await;
    let n = 400;
    let table = r.table.clone();
    let writer = std::thread::spawn(move || {
        for chunk in 0..20 {
            insert_notes(DB, &table, chunk * 20 + 1, chunk * 20 + 20);
        }
    });
    // stop while rows are being written and fetched
    let reader = Reader::start(&amqp_url(), &r.queue, Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while reader.snapshot().len() < 20 {
        assert!(Instant::now() < deadline, "no rows before the stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopping = Instant::now();
    podman(&["stop", &r.name]); // default: SIGTERM, SIGKILL after 10 s
    let took = stopping.elapsed();
    eprintln!("measured: podman stop mid-stream took {took:?}");
    let code = podman(&["inspect", "--format", "{{.State.ExitCode}}", &r.name]);
    let log = logs(&r.name);
    assert_eq!(code, "0", "exit code after podman stop:\n{log}");
    assert!(took < Duration::from_secs(10), "stop took {took:?}:\n{log}");
    assert!(
        log.contains("shutdown complete: every fetched batch was confirmed and acked"),
        "{log}"
    );
    writer.join().unwrap();
    // nothing was lost: the same container started again delivers every row
    podman(&["start", &r.name]);
    wait_ready(&r.admin, &r.name, Duration::from_secs(60)).await;
    let got = reader
        .wait_rows("id", n, Duration::from_secs(90), "after restart")
        .await;
    assert_rows(&got, "id", n);
    drop(reader);
    drop(r.cleanup);
    delete_queue(&r.queue).await;
}

/// `podman exec` of SQL as root in the Compose project's MySQL container.
fn compose_sql(project: &str, sql: &str) -> String {
    let mysql = container_of(project, "mysql");
    run(
        "compose mysql",
        Command::new("podman").args([
            "exec",
            &mysql,
            "mysql",
            "-uroot",
            "-proot",
            "--batch",
            "--skip-column-names",
            "-e",
            sql,
        ]),
        Duration::from_secs(60),
    )
}

fn insert_users(project: &str, from: i64, to: i64) {
    let values: Vec<String> = (from..=to)
        .map(|i| format!("({i}, 'user{i}', 'u{i}@example.com')"))
        .collect();
    compose_sql(
        project,
        &format!(
            "INSERT INTO test_db.users (id, name, email) VALUES {}",
            values.join(",")
        ),
    );
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test(flavor = "multi_thread")]
async fn the_compose_file_brings_the_stack_up_from_nothing_and_a_row_goes_end_to_end() {
    if skipped("the_compose_file_brings_the_stack_up_from_nothing_and_a_row_goes_end_to_end") {
        return;
    }
    let _serial = serial().await;
    build_image();
    let file = "deploy/docker-compose.yml";
    let project = "cc-test-compose";
    let mut cleanup = Cleanup::default();
    cleanup.projects.push((file.into(), project.into()));
    cleanup.remove_all(); // from nothing: no volumes, no containers of an earlier run
    let amqp_port = free_port();
    let admin_port = free_port();
    let started = Instant::now();
    run(
        "compose up",
        compose_cmd(file, project)
            .env("CC_COMPOSE_AMQP_PORT", amqp_port.to_string())
            .env("CC_COMPOSE_MANAGEMENT_PORT", free_port().to_string())
            .env("CC_COMPOSE_CANAL_PORT", free_port().to_string())
            .env("CC_COMPOSE_ADMIN_PORT", admin_port.to_string())
            .args(["up", "-d"]),
        Duration::from_secs(300),
    );
    let admin = format!("127.0.0.1:{admin_port}");
    let service = container_of(project, "canal-consumer");
    wait_ready(&admin, &service, Duration::from_secs(240)).await;
    eprintln!(
        "measured: compose up to the service's /ready {:?}",
        started.elapsed()
    );
    // the published admin port answers the probes; the service runs as 10001
    assert_eq!(http_get(&admin, "/health").await.unwrap().0, 200);
    assert_eq!(podman(&["exec", &service, "id", "-u"]), "10001");

    let url = format!("amqp://canal:canal-secret@127.0.0.1:{amqp_port}/%2f");
    let reader = Reader::start(&url, "plugin_tasks", Duration::from_secs(60)).await;
    insert_users(project, 1, 3);
    let got = reader
        .wait_rows("user_id", 3, Duration::from_secs(60), "compose end to end")
        .await;
    assert_rows(&got, "user_id", 3);
    let g = got
        .iter()
        .find(|g| g.body["payload"]["user_id"] == 1 || g.body["payload"]["user_id"] == "1")
        .unwrap();
    assert_eq!(g.body["plugin"], "email_service");
    assert_eq!(g.body["payload"]["operation"], "send_welcome");
    drop(reader);
    drop(cleanup);
}

/// The replica (service name) whose `/metrics` says `ha_active 1`, with its admin address.
async fn active_replica(replicas: &[(&str, String)], timeout: Duration) -> (String, String) {
    let deadline = Instant::now() + timeout;
    loop {
        for (service, admin) in replicas {
            if let Some((200, m)) = http_get(admin, "/metrics").await
                && m.lines().any(|l| l == "ha_active 1")
                && let Some((200, _)) = http_get(admin, "/ready").await
            {
                return (service.to_string(), admin.clone());
            }
        }
        assert!(
            Instant::now() < deadline,
            "no active replica within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn ip_of(container: &str) -> String {
    podman(&[
        "inspect",
        "--format",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        container,
    ])
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[tokio::test(flavor = "multi_thread")]
async fn the_ha_compose_file_survives_killing_the_active_replica_and_the_running_canal_server() {
    if skipped(
        "the_ha_compose_file_survives_killing_the_active_replica_and_the_running_canal_server",
    ) {
        return;
    }
    let _serial = serial().await;
    build_image();
    let file = "deploy/docker-compose.ha.yml";
    let project = "cc-test-ha";
    let mut cleanup = Cleanup::default();
    cleanup.projects.push((file.into(), project.into()));
    cleanup.remove_all();
    let amqp_port = free_port();
    let (a_port, b_port) = (free_port(), free_port());
    let started = Instant::now();
    run(
        "compose up (HA)",
        compose_cmd(file, project)
            .env("CC_COMPOSE_HA_AMQP_PORT", amqp_port.to_string())
            .env("CC_COMPOSE_HA_MANAGEMENT_PORT", free_port().to_string())
            .env("CC_COMPOSE_HA_ADMIN_A_PORT", a_port.to_string())
            .env("CC_COMPOSE_HA_ADMIN_B_PORT", b_port.to_string())
            .args(["up", "-d"]),
        Duration::from_secs(300),
    );
    let replicas = [
        ("canal-consumer-a", format!("127.0.0.1:{a_port}")),
        ("canal-consumer-b", format!("127.0.0.1:{b_port}")),
    ];
    let (active, _) = active_replica(&replicas, Duration::from_secs(240)).await;
    eprintln!(
        "measured: HA compose up to an active replica {:?} ({active})",
        started.elapsed()
    );
    let url = format!("amqp://canal:canal-secret@127.0.0.1:{amqp_port}/%2f");
    let reader = Reader::start(&url, "plugin_tasks", Duration::from_secs(60)).await;

    insert_users(project, 1, 30);
    reader
        .wait_rows(
            "user_id",
            30,
            Duration::from_secs(60),
            "before the failovers",
        )
        .await;

    // 1. the active replica's container dies; rows written meanwhile still arrive
    let killed_at = Instant::now();
    podman(&["kill", &container_of(project, &active)]);
    insert_users(project, 31, 60);
    reader
        .wait_rows(
            "user_id",
            60,
            Duration::from_secs(120),
            "after killing the active replica",
        )
        .await;
    eprintln!(
        "measured: killed replica {active}, rows 31-60 all arrived after {:?}",
        killed_at.elapsed()
    );

    // 2. the Canal server running the destination dies
    // (`/status` answers only its bound address as Host, so ask inside the container)
    let (now_active, _) = active_replica(&replicas, Duration::from_secs(60)).await;
    let status: Value = serde_json::from_str(&podman(&[
        "exec",
        &container_of(project, &now_active),
        "canal-consumer",
        "status",
        "--json",
    ]))
    .unwrap();
    let server = status["canal"]["server"].as_str().unwrap().to_string();
    let server_ip = server.split(':').next().unwrap().to_string();
    let canal = ["canal-server-1", "canal-server-2"]
        .into_iter()
        .map(|s| container_of(project, s))
        .find(|c| ip_of(c) == server_ip)
        .unwrap_or_else(|| panic!("no Canal container has address {server}"));
    let killed_at = Instant::now();
    podman(&["kill", &canal]);
    insert_users(project, 61, 90);
    let got = reader
        .wait_rows(
            "user_id",
            90,
            Duration::from_secs(180),
            "after killing the running Canal server",
        )
        .await;
    eprintln!(
        "measured: killed {canal} (the Canal server of {now_active}), rows 61-90 all arrived after {:?}",
        killed_at.elapsed()
    );
    // every row counted: each one arrived, redeliveries only under their original id
    assert_rows(&got, "user_id", 90);
    drop(reader);
    drop(cleanup);
}

/// The rendered Kubernetes manifests, as far as this machine can check them.
#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[test]
fn the_k8s_manifests_render_and_run_as_the_images_user_and_group() {
    if skipped("the_k8s_manifests_render_and_run_as_the_images_user_and_group") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _serial = rt.block_on(serial());
    build_image();
    // schema: every rendered document decodes strictly into its Kubernetes API type
    let out = output_within(
        "deploy/container/build k8s-check",
        Command::new(repo_root().join("deploy/container/build"))
            .args(["k8s-check", "deploy/k8s", "deploy/k8s/ha"])
            .current_dir(repo_root()),
        Duration::from_secs(600),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => assert_eq!(text.matches(": ok").count(), 13, "{text}"),
        Some(3) => eprintln!("SKIPPED the schema check: {text}"),
        _ => panic!("the manifests do not match the Kubernetes API types:\n{text}"),
    }
    let uid = podman(&["run", "--rm", "--entrypoint", "id", IMAGE, "-u"]);
    let gid = podman(&["run", "--rm", "--entrypoint", "id", IMAGE, "-g"]);
    for dir in ["deploy/k8s", "deploy/k8s/ha"] {
        let yaml = run(
            "kubectl kustomize",
            Command::new("kubectl")
                .args(["kustomize", dir])
                .current_dir(repo_root()),
            Duration::from_secs(60),
        );
        let docs = yaml_rust2::YamlLoader::load_from_str(&yaml).unwrap();
        let mut checked = 0;
        for d in &docs {
            let kind = d["kind"].as_str().unwrap_or("");
            if kind != "Deployment" && kind != "StatefulSet" {
                continue;
            }
            let spec = &d["spec"]["template"]["spec"];
            for c in spec["containers"].as_vec().unwrap() {
                let image = c["image"].as_str().unwrap_or("");
                if !image.starts_with("canal-consumer") {
                    continue;
                }
                let pod = &spec["securityContext"];
                assert_eq!(pod["runAsUser"].as_i64().unwrap().to_string(), uid, "{dir}");
                assert_eq!(
                    pod["runAsGroup"].as_i64().unwrap().to_string(),
                    gid,
                    "{dir}"
                );
                assert_eq!(pod["fsGroup"].as_i64().unwrap().to_string(), gid, "{dir}");
                assert_eq!(pod["runAsNonRoot"].as_bool(), Some(true), "{dir}");
                let sc = &c["securityContext"];
                assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{dir}");
                assert_eq!(
                    sc["allowPrivilegeEscalation"].as_bool(),
                    Some(false),
                    "{dir}"
                );
                // the state dir the image makes writable is where the manifests mount state
                let mounts = c["volumeMounts"].as_vec().unwrap();
                assert!(
                    mounts
                        .iter()
                        .any(|m| m["mountPath"].as_str() == Some("/var/lib/canal-consumer")),
                    "{dir}: no volume on /var/lib/canal-consumer"
                );
                checked += 1;
            }
        }
        assert!(checked > 0, "{dir}: no canal-consumer container found");
    }
}
