//! The admin endpoint against a fake `Control`: routes through actix-web's test service, the
//! access rules (token, Host, Origin) with browser-shaped requests, serialized state writes,
//! the tap, and the command-line client against a real bound port.
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

use canal_consumer::admin::access::{Access, Token};
use canal_consumer::admin::client::{self, ClientError, TapQuery};
use canal_consumer::admin::server::{AdminState, configure};
use canal_consumer::admin::{AdminError, ConsumerState, ConsumerStatus, Control, ServiceStatus};
use canal_consumer::metrics::Metrics;
use canal_consumer::state::StateFile;
use canal_consumer::tap::Tap;
use futures::future::BoxFuture;
use std::sync::{Arc, Mutex};

const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn token() -> Token {
    Token::new(TOKEN)
}

fn state(control: Arc<Fake>, state_file: Option<StateFile>, tap: Tap) -> AdminState {
    AdminState {
        backfills: None,
        control,
        metrics: Metrics::new(),
        state_file,
        access: Access::new(token(), "127.0.0.1:9090".parse().unwrap()),
        tap,
    }
}

/// Applies enable/disable after a yield, as the real Control does after a hop to the Manager.
struct Fake(Arc<Mutex<ServiceStatus>>);

impl Fake {
    fn new() -> Arc<Self> {
        let mut s = ServiceStatus::new();
        s.canal.state = canal_consumer::canal::connection::ConnectionState::Connecting;
        s.canal.destination = "example".into();
        let consumer = |name: &str| ConsumerStatus {
            name: name.into(),
            enabled: true,
            state: ConsumerState::Running,
            events: 4,
            triggers: 3,
            errors: 0,
            restarts: 0,
            parked: 0,
            lag_seconds: None,
            last_error: None,
        };
        s.consumers = vec![consumer("example_consumer"), consumer("teacher_consumer")];
        Arc::new(Fake(Arc::new(Mutex::new(s))))
    }
    fn live(&self) -> std::collections::BTreeMap<String, bool> {
        let s = self.0.lock().unwrap();
        s.consumers
            .iter()
            .map(|c| (c.name.clone(), c.enabled))
            .collect()
    }
    fn connect(&self) {
        let mut s = self.0.lock().unwrap();
        s.canal.state = canal_consumer::canal::connection::ConnectionState::Connected;
        s.broker_connected = true;
        let mut broker = canal_consumer::publisher::PublisherStatus::connecting(
            "amqp://127.0.0.1:5672/%2f".into(),
            1,
            "plugin_tasks".into(),
            8,
        );
        broker.state = canal_consumer::publisher::PublisherState::Connected;
        s.broker = Some(broker);
    }
}

impl Control for Fake {
    fn status(&self) -> BoxFuture<'static, ServiceStatus> {
        let s = self.0.lock().unwrap().clone();
        Box::pin(async move { s })
    }
    fn set_enabled(&self, name: &str, enabled: bool) -> BoxFuture<'static, Result<(), AdminError>> {
        let status = self.0.clone();
        let name = name.to_string();
        Box::pin(async move {
            tokio::task::yield_now().await;
            let mut s = status.lock().unwrap();
            match s.consumers.iter_mut().find(|c| c.name == name) {
                Some(c) => {
                    c.enabled = enabled;
                    c.state = if enabled {
                        ConsumerState::Running
                    } else {
                        ConsumerState::Disabled
                    };
                    Ok(())
                }
                None => Err(AdminError::UnknownConsumer(name)),
            }
        })
    }
}

#[actix_rt::test]
async fn routes_answer_as_documented() {
    use actix_web::{App, http::StatusCode, test};
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new();
    let metrics = Metrics::new();
    fake.0.lock().unwrap().canal.batches_received = 5;
    let state_file = StateFile::new(dir.path().join("state/consumers.json"));
    let mut st = state(fake.clone(), Some(state_file.clone()), Tap::new());
    st.metrics = metrics.clone();
    let app = test::init_service(App::new().configure(configure(st))).await;

    let get = |path: &str| {
        test::TestRequest::get()
            .uri(path)
            .insert_header(("Host", "127.0.0.1:9090"))
            .to_request()
    };
    let resp = test::call_service(&app, get("/health")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(test::read_body(resp).await, "ok\n");

    let resp = test::call_service(&app, get("/ready")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = String::from_utf8(test::read_body(resp).await.to_vec()).unwrap();
    assert!(body.contains("canal is connecting"), "{body}");
    fake.connect();
    let resp = test::call_service(&app, get("/ready")).await;
    assert_eq!(resp.status(), StatusCode::OK);

    let resp = test::call_service(&app, get("/status")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: serde_json::Value = test::read_body_json(resp).await;
    assert_eq!(v["canal"]["state"], "connected");
    assert_eq!(v["consumers"][0]["name"], "example_consumer");
    assert_eq!(v["consumers"][0]["state"], "running");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));

    let resp = test::call_service(&app, get("/metrics")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let ct = resp
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let body = String::from_utf8(test::read_body(resp).await.to_vec()).unwrap();
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    let sample = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .value
            .clone()
    };
    // Every figure is taken from the status snapshot at scrape time.
    assert_eq!(
        sample("canal_batches_total"),
        prometheus_parse::Value::Counter(5.0)
    );
    assert_eq!(
        sample("consumer_events_total"),
        prometheus_parse::Value::Counter(4.0)
    );
    assert_eq!(
        sample("consumer_triggers_total"),
        prometheus_parse::Value::Counter(3.0)
    );
    assert_eq!(
        sample("consumer_enabled"),
        prometheus_parse::Value::Gauge(1.0)
    );

    let post = |path: &str| {
        test::TestRequest::post()
            .uri(path)
            .insert_header(("Host", "localhost:9090"))
            .insert_header(("Authorization", format!("Bearer {TOKEN}")))
            .to_request()
    };
    let resp = test::call_service(&app, post("/consumers/nobody/enable")).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = test::call_service(&app, post("/consumers/example_consumer/disable")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: serde_json::Value = test::read_body_json(resp).await;
    assert_eq!(v["enabled"], false);
    assert_eq!(v["persisted"], true);
    assert!(!fake.0.lock().unwrap().consumers[0].enabled);
    assert_eq!(
        state_file.load().unwrap().get("example_consumer"),
        Some(&false)
    );
    let resp = test::call_service(&app, get("/consumers")).await;
    let v: serde_json::Value = test::read_body_json(resp).await;
    assert_eq!(v[0]["state"], "disabled");

    let resp = test::call_service(&app, get("/consumers/example_consumer/enable")).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "enable is POST only");
}

/// A browser on the operator's machine can reach 127.0.0.1 but holds no token and sends its
/// page's Origin (or `null`) and, under DNS rebinding, its own host name.
#[actix_rt::test]
async fn browser_shaped_requests_are_refused_and_change_nothing() {
    use actix_web::{App, http::StatusCode, test};
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new();
    let state_file = StateFile::new(dir.path().join("consumers.json"));
    let app = test::init_service(App::new().configure(configure(state(
        fake.clone(),
        Some(state_file.clone()),
        Tap::new(),
    ))))
    .await;
    let before = fake.live();
    let bearer = format!("Bearer {TOKEN}");
    let cases: Vec<(&str, test::TestRequest, StatusCode)> = vec![
        (
            "HTML form POST from a foreign page",
            test::TestRequest::post()
                .uri("/consumers/example_consumer/disable")
                .insert_header(("Host", "127.0.0.1:9090"))
                .insert_header(("Origin", "http://evil.example"))
                .insert_header(("Content-Type", "application/x-www-form-urlencoded"))
                .set_payload("x=1"),
            StatusCode::FORBIDDEN,
        ),
        (
            "no-cors text/plain POST with Origin: null",
            test::TestRequest::post()
                .uri("/consumers/example_consumer/disable")
                .insert_header(("Host", "127.0.0.1:9090"))
                .insert_header(("Origin", "null"))
                .insert_header(("Content-Type", "text/plain;charset=UTF-8"))
                .set_payload("{}"),
            StatusCode::FORBIDDEN,
        ),
        (
            "foreign Origin even with the token",
            test::TestRequest::post()
                .uri("/consumers/example_consumer/disable")
                .insert_header(("Host", "127.0.0.1:9090"))
                .insert_header(("Origin", "http://evil.example"))
                .insert_header(("Authorization", bearer.as_str())),
            StatusCode::FORBIDDEN,
        ),
        (
            "DNS rebinding: foreign Host, POST",
            test::TestRequest::post()
                .uri("/consumers/example_consumer/disable")
                .insert_header(("Host", "evil.example:9090"))
                .insert_header(("Authorization", bearer.as_str())),
            StatusCode::MISDIRECTED_REQUEST,
        ),
        (
            "no token",
            test::TestRequest::post()
                .uri("/consumers/example_consumer/disable")
                .insert_header(("Host", "127.0.0.1:9090")),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "wrong token",
            test::TestRequest::post()
                .uri("/consumers/example_consumer/disable")
                .insert_header(("Host", "127.0.0.1:9090"))
                .insert_header(("Authorization", format!("Bearer {}", "f".repeat(64)))),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "DNS rebinding: foreign Host, GET /status",
            test::TestRequest::get()
                .uri("/status")
                .insert_header(("Host", "evil.example:9090")),
            StatusCode::MISDIRECTED_REQUEST,
        ),
        (
            "cross-origin read of /consumers",
            test::TestRequest::get()
                .uri("/consumers")
                .insert_header(("Host", "127.0.0.1:9090"))
                .insert_header(("Origin", "http://evil.example")),
            StatusCode::FORBIDDEN,
        ),
        (
            "cross-origin read of /metrics",
            test::TestRequest::get()
                .uri("/metrics")
                .insert_header(("Host", "127.0.0.1:9090"))
                .insert_header(("Origin", "http://evil.example")),
            StatusCode::FORBIDDEN,
        ),
        (
            "tap without the token",
            test::TestRequest::get()
                .uri("/tap")
                .insert_header(("Host", "127.0.0.1:9090")),
            StatusCode::UNAUTHORIZED,
        ),
    ];
    for (what, req, expected) in cases {
        let resp = test::call_service(&app, req.to_request()).await;
        assert_eq!(resp.status(), expected, "{what}");
        if expected == StatusCode::UNAUTHORIZED {
            assert_eq!(resp.headers().get("www-authenticate").unwrap(), "Bearer");
        }
        let v: serde_json::Value = test::read_body_json(resp).await;
        assert!(v["error"].as_str().unwrap().len() > 10, "{what}: {v}");
    }
    assert_eq!(fake.live(), before, "nothing changed live");
    assert!(!state_file.path().exists(), "nothing saved");

    // Probes stay open to any Host (kubelet uses the pod IP, Prometheus a Service name).
    for (path, host) in [("/health", "10.1.2.3:9090"), ("/metrics", "svc.ns:9090")] {
        let req = test::TestRequest::get()
            .uri(path)
            .insert_header(("Host", host))
            .to_request();
        assert_eq!(test::call_service(&app, req).await.status(), StatusCode::OK);
    }
    // The service's own origin is not foreign.
    let req = test::TestRequest::post()
        .uri("/consumers/example_consumer/disable")
        .insert_header(("Host", "127.0.0.1:9090"))
        .insert_header(("Origin", "http://127.0.0.1:9090"))
        .insert_header(("Authorization", bearer.as_str()))
        .to_request();
    assert_eq!(test::call_service(&app, req).await.status(), StatusCode::OK);
    assert!(!fake.live()["example_consumer"]);
}

/// A shared buffer the test's global subscriber writes to.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[actix_rt::test]
async fn a_newline_in_a_consumer_name_never_reaches_the_log() {
    // Global: the server logs from its own worker thread. Only this test reads it.
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .init();
    let fake = Fake::new();
    let admin =
        canal_consumer::admin::serve("127.0.0.1:0", state(fake.clone(), None, Tap::new())).unwrap();
    let addr = admin.addr.to_string();
    actix_rt::spawn(admin.server);
    let before = fake.live();
    for name in [
        "x%0A2026-01-01T00:00:00Z%20INFO%20forged%20line",
        "x%0D%0Aforged",
        "x%1B%5B31mforged",
        "..%2Fetc",
    ] {
        let r = client::request_with(
            &addr,
            "POST",
            &format!("/consumers/{name}/disable"),
            Some(&token()),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 400, "{name}: {}", r.body);
        assert!(
            !r.body.contains("forged"),
            "the name is not echoed: {}",
            r.body
        );
        assert!(
            !r.body.contains('\n') && !r.body.contains('\u{1b}'),
            "{}",
            r.body
        );
    }
    // a valid but unknown name is logged as an ordinary refusal
    let r = client::request_with(&addr, "POST", "/consumers/ghost/disable", Some(&token()))
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    admin.handle.stop(true).await;
    assert_eq!(fake.live(), before);
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        log.contains("ghost"),
        "the subscriber captured the server's log:\n{log}"
    );
    assert!(!log.contains("forged"), "{log}");
    assert!(!log.contains('\u{1b}'), "{log}");
}

#[actix_rt::test]
async fn concurrent_enable_disable_leaves_the_file_equal_to_the_live_state() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new();
    let state_file = StateFile::new(dir.path().join("consumers.json"));
    let admin = canal_consumer::admin::serve(
        "127.0.0.1:0",
        state(fake.clone(), Some(state_file.clone()), Tap::new()),
    )
    .unwrap();
    let addr = admin.addr.to_string();
    actix_rt::spawn(admin.server);
    let t = token();
    let mut server_errors = 0;
    let mut disagreements = 0;
    for round in 0..40 {
        let calls = ["example_consumer", "teacher_consumer"]
            .iter()
            .flat_map(|name| {
                ["enable", "disable"]
                    .into_iter()
                    .map(move |verb| format!("/consumers/{name}/{verb}"))
            })
            .collect::<Vec<_>>();
        let mut order = calls.clone();
        order.rotate_left(round % calls.len());
        let answers = futures::future::join_all(
            order
                .iter()
                .map(|p| client::request_with(&addr, "POST", p, Some(&t))),
        )
        .await;
        for a in answers {
            let a = a.unwrap();
            if a.status != 200 {
                server_errors += 1;
            }
        }
        if state_file.load().unwrap() != fake.live() {
            disagreements += 1;
        }
    }
    admin.handle.stop(true).await;
    assert_eq!((server_errors, disagreements), (0, 0));
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("consumers.json")]);
}

#[actix_rt::test]
async fn command_line_client_talks_to_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new();
    fake.connect();
    let state_file = StateFile::new(dir.path().join("consumers.json"));
    let tap = Tap::new();
    let admin = canal_consumer::admin::serve(
        "127.0.0.1:0",
        state(fake.clone(), Some(state_file.clone()), tap.clone()),
    )
    .unwrap();
    let addr = admin.addr.to_string();
    actix_rt::spawn(admin.server);

    let text = client::status(&addr, false).await.unwrap();
    assert!(text.contains("ready"), "{text}");
    assert!(text.contains("example_consumer"), "{text}");
    let json = client::status(&addr, true).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["canal"]["destination"], "example");
    let list = client::list(&addr, false).await.unwrap();
    assert!(
        list.contains("example_consumer  yes      running"),
        "{list}"
    );

    let err = client::set_enabled(&addr, None, &state_file, "example_consumer", false)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Unauthorized(_)), "{err}");
    assert!(fake.0.lock().unwrap().consumers[0].enabled);
    let msg = client::set_enabled(
        &addr,
        Some(&token()),
        &state_file,
        "example_consumer",
        false,
    )
    .await
    .unwrap();
    assert!(msg.contains("disabled (live, saved)"), "{msg}");
    assert!(!fake.0.lock().unwrap().consumers[0].enabled);
    let err = client::set_enabled(&addr, Some(&token()), &state_file, "ghost", true)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::UnknownConsumer(_)), "{err}");

    // The tap: the subscription exists once the answer's head arrived; then lines stream.
    let err = client::tap(&addr, None, &TapQuery::default(), || (), |_| true)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Unauthorized(_)), "{err}");
    let publisher = {
        let tap = tap.clone();
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while tap.listeners() == 0 {
                assert!(std::time::Instant::now() < deadline, "no tap listener");
                std::thread::yield_now();
            }
            let e: canal_consumer::event::ChangeEvent = serde_json::from_value(serde_json::json!({
                "destination": "example", "database": "test_db", "table": "users",
                "event_type": "INSERT", "data": {"id": "7"},
                "position": {"log_file": "mysql-bin.000001", "offset": 4, "row_index": 0},
                "executed_at": 0
            }))
            .unwrap();
            tap.publish("example_consumer", &[e], &[0], &[]);
        })
    };
    let mut lines = Vec::new();
    client::tap(
        &addr,
        Some(&token()),
        &TapQuery {
            consumer: Some("example_consumer".into()),
            ..Default::default()
        },
        || (),
        |l| {
            lines.push(serde_json::from_slice::<serde_json::Value>(l).unwrap());
            false
        },
    )
    .await
    .unwrap();
    publisher.join().unwrap();
    assert_eq!(lines[0]["consumer"], "example_consumer");
    assert_eq!(lines[0]["event"]["data"]["id"], "7");
    assert_eq!(lines[0]["triggers"], serde_json::json!([]));

    admin.handle.stop(true).await;
}

#[tokio::test]
async fn client_says_plainly_when_the_service_is_not_running() {
    // A port that was free a moment ago and has no listener now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let err = client::status(&addr, false).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("canal-consumer is not running (no admin endpoint at {addr})")
    );
    assert_eq!(err.exit_code(), 3);
    assert!(matches!(
        client::list(&addr, true).await,
        Err(ClientError::NotRunning { .. })
    ));

    let dir = tempfile::tempdir().unwrap();
    let state_file = StateFile::new(dir.path().join("state/consumers.json"));
    let msg = client::set_enabled(&addr, None, &state_file, "teacher_consumer", false)
        .await
        .unwrap();
    assert!(msg.contains("is not running"), "{msg}");
    assert!(msg.contains("at the next start"), "{msg}");
    assert_eq!(
        state_file.load().unwrap().get("teacher_consumer"),
        Some(&false)
    );
}

#[actix_rt::test]
async fn an_address_in_use_or_malformed_is_a_bind_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let st = || state(Fake::new(), None, Tap::new());
    let err = canal_consumer::admin::serve(&addr, st()).err().unwrap();
    assert!(matches!(err, AdminError::Bind { .. }), "{err}");
    assert!(err.to_string().contains(&addr), "{err}");
    let err = canal_consumer::admin::serve("localhost", st())
        .err()
        .unwrap();
    assert!(matches!(err, AdminError::Bind { .. }), "{err}");
}
