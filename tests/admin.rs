//! The admin endpoint against a fake `Control`: routes through actix-web's test service, and
//! the command-line client against a real bound port.
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

use canal_consumer::admin::client::{self, ClientError};
use canal_consumer::admin::server::{AdminState, configure};
use canal_consumer::admin::{AdminError, ConsumerState, ConsumerStatus, Control, ServiceStatus};
use canal_consumer::metrics::Metrics;
use canal_consumer::state::StateFile;
use futures::future::BoxFuture;
use std::sync::{Arc, Mutex};

struct Fake(Mutex<ServiceStatus>);

impl Fake {
    fn new() -> Arc<Self> {
        let mut s = ServiceStatus::new();
        s.canal.state = canal_consumer::canal::connection::ConnectionState::Connecting;
        s.canal.destination = "example".into();
        s.consumers = vec![ConsumerStatus {
            name: "example_consumer".into(),
            enabled: true,
            state: ConsumerState::Running,
            events: 4,
            triggers: 3,
            errors: 0,
            restarts: 0,
            parked: 0,
            lag_seconds: None,
            last_error: None,
        }];
        Arc::new(Fake(Mutex::new(s)))
    }
    fn connect(&self) {
        let mut s = self.0.lock().unwrap();
        s.canal.state = canal_consumer::canal::connection::ConnectionState::Connected;
        s.broker_connected = true;
        s.broker = serde_json::json!({"state": "connected"});
    }
}

impl Control for Fake {
    fn status(&self) -> BoxFuture<'static, ServiceStatus> {
        let s = self.0.lock().unwrap().clone();
        Box::pin(async move { s })
    }
    fn set_enabled(&self, name: &str, enabled: bool) -> BoxFuture<'static, Result<(), AdminError>> {
        let mut s = self.0.lock().unwrap();
        let r = match s.consumers.iter_mut().find(|c| c.name == name) {
            Some(c) => {
                c.enabled = enabled;
                c.state = if enabled {
                    ConsumerState::Running
                } else {
                    ConsumerState::Disabled
                };
                Ok(())
            }
            None => Err(AdminError::UnknownConsumer(name.to_string())),
        };
        Box::pin(async move { r })
    }
}

#[actix_rt::test]
async fn routes_answer_as_documented() {
    use actix_web::{App, http::StatusCode, test};
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new();
    let metrics = Metrics::new();
    metrics.canal_batches_total.add(5);
    let state_file = StateFile::new(dir.path().join("state/consumers.json"));
    let app = test::init_service(App::new().configure(configure(AdminState {
        control: fake.clone(),
        metrics: metrics.clone(),
        state_file: Some(state_file.clone()),
    })))
    .await;

    let get = |path: &str| test::TestRequest::get().uri(path).to_request();
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
    // Counted by an actor directly.
    assert_eq!(
        sample("canal_batches_total"),
        prometheus_parse::Value::Counter(5.0)
    );
    // Taken from the status snapshot at scrape time.
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

    let post = |path: &str| test::TestRequest::post().uri(path).to_request();
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

#[actix_rt::test]
async fn command_line_client_talks_to_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new();
    fake.connect();
    let state_file = StateFile::new(dir.path().join("consumers.json"));
    let admin = canal_consumer::admin::serve(
        "127.0.0.1:0",
        AdminState {
            control: fake.clone(),
            metrics: Metrics::new(),
            state_file: Some(state_file.clone()),
        },
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

    let msg = client::set_enabled(&addr, &state_file, "example_consumer", false)
        .await
        .unwrap();
    assert!(msg.contains("disabled (live, saved)"), "{msg}");
    assert!(!fake.0.lock().unwrap().consumers[0].enabled);
    let err = client::set_enabled(&addr, &state_file, "ghost", true)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::UnknownConsumer(_)), "{err}");

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
    assert_ne!(err.exit_code(), 0);
    assert!(matches!(
        client::list(&addr, true).await,
        Err(ClientError::NotRunning { .. })
    ));

    let dir = tempfile::tempdir().unwrap();
    let state_file = StateFile::new(dir.path().join("state/consumers.json"));
    let msg = client::set_enabled(&addr, &state_file, "teacher_consumer", false)
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
    let state = || AdminState {
        control: Fake::new(),
        metrics: Metrics::new(),
        state_file: None,
    };
    let err = canal_consumer::admin::serve(&addr, state()).err().unwrap();
    assert!(matches!(err, AdminError::Bind { .. }), "{err}");
    assert!(err.to_string().contains(&addr), "{err}");
    let err = canal_consumer::admin::serve("localhost", state())
        .err()
        .unwrap();
    assert!(matches!(err, AdminError::Bind { .. }), "{err}");
}
