//! The layered configuration against a real process environment and the default config file:
//! `canal-consumer check-config` run as a child process with its own environment (so no test
//! changes this process's environment), in the package root where
//! `config/canal-consumer.toml` (all defaults) exists.
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn check_config(vars: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_canal-consumer"));
    cmd.arg("check-config")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("CANAL_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().expect("runs")
}

#[test]
fn the_process_environment_and_the_default_file_make_the_effective_config() {
    let out = check_config(
        &[
            ("CANAL_HOST", "env-host"),
            ("CANAL_BATCH_SIZE", "64"),
            ("CANAL_CONSUMER__AMQP__CONFIRM_TIMEOUT", "10s"),
            ("CANAL_CONSUMER__CANAL__PASSWORD", "12345"),
        ],
        // a flag beats the environment
        &["--port", "12000"],
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective: toml::Value = toml::from_str(&shown).expect("check-config prints TOML");
    assert_eq!(effective["canal"]["host"].as_str(), Some("env-host"));
    assert_eq!(effective["canal"]["batch_size"].as_integer(), Some(64));
    assert_eq!(effective["canal"]["port"].as_integer(), Some(12000));
    assert_eq!(effective["amqp"]["confirm_timeout"].as_str(), Some("10s"));
    assert!(
        !shown.contains("12345"),
        "the password is redacted: {shown}"
    );

    let out = check_config(&[("CANAL_CONSUMER__AMQP__MAX_UNCONFIRMED", "many")], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(
            "error: environment variable CANAL_CONSUMER__AMQP__MAX_UNCONFIRMED: key `amqp.max_unconfirmed`:"
        ),
        "{err}"
    );
}
