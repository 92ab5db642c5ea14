//! Logging setup end to end: a real global subscriber, so it runs in its own test binary.
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

use canal_consumer::config::{LogConfig, LogFormat};
use canal_consumer::logging::{LoggingError, init};

#[test]
fn writes_to_the_file_and_refuses_a_second_init() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("logs/app.log");
    let cfg = LogConfig {
        format: LogFormat::Json,
        level: "info".into(),
        file: Some(path.clone()),
    };
    // RUST_LOG may be set by whoever runs the tests; the event below is at error level so any
    // sensible filter lets it through.
    let guard = init(&cfg).unwrap();
    tracing::error!(
        consumer = "example_consumer",
        "probe event for the log file"
    );
    assert!(matches!(init(&cfg), Err(LoggingError::AlreadySet(_))));
    drop(guard);
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("probe event"))
        .expect("event in file");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["fields"]["consumer"], "example_consumer");
    assert_eq!(v["level"], "ERROR");
}
