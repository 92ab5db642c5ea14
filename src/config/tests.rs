//! Tests of loading, layering, errors and redaction.

use super::*;
use crate::secret::url_password;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[test]
fn secrets_do_not_print() {
    let mut c = Config::default();
    c.canal.password = Secret::new("hunter2");
    let shown = format!("{c:?}");
    assert!(!shown.contains("hunter2"));
    assert!(!shown.contains("guest:guest"));
}

#[test]
fn defaults_round_trip_through_toml() {
    let c = Config::default();
    let text = toml::to_string(&c).unwrap();
    let back: Config = toml::from_str(&text).unwrap();
    assert_eq!(back, c);
}

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn nowhere() -> &'static Path {
    Path::new("/nonexistent/canal-consumer.toml")
}

#[test]
fn layers_stack_defaults_file_env_cli() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "c.toml",
        "[canal]\nhost = \"file-host\"\nport = 2000\ndestination = \"file-dest\"\n\
         batch_size = 7\nclient_id = 42\n[amqp]\nconfirm_timeout = \"3s\"\n",
    );
    // Defaults only.
    let c = load_from(None, nowhere(), env(&[]), CliOverrides::default()).unwrap();
    assert_eq!(c, Config::default());
    // File over defaults; a numeric client_id is read as its text.
    let c = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap();
    assert_eq!(c.canal.host, "file-host");
    assert_eq!(c.canal.port.get(), 2000);
    assert_eq!(c.canal.client_id, "42");
    assert_eq!(c.amqp.confirm_timeout, Duration::from_secs(3));
    assert_eq!(c.amqp.max_unconfirmed.get(), 512);
    // Env over file: reference names and the prefixed form (which wins over them).
    let vars = env(&[
        ("CANAL_HOST", "env-host"),
        ("CANAL_PORT", "3000"),
        ("CANAL_DESTINATION", "env-dest"),
        ("CANAL_BATCH_SIZE", "50"),
        ("CANAL_CONSUMER__CANAL__DESTINATION", "prefixed-dest"),
        ("CANAL_CONSUMER__AMQP__CONFIRM_TIMEOUT", "10s"),
        ("CANAL_CONSUMER__AMQP__QUEUE__NAME", "other_tasks"),
        ("CANAL_CONSUMER__LOG__FILE", "logs/app.log"),
        ("CANAL_CONSUMER__ADMIN__ENABLED", "false"),
        ("CANAL_UNRELATED", "x"),
        ("CANAL_CONSUMER__CANAL__USERNAME", ""),
    ]);
    let c = load_from(
        Some(&file),
        nowhere(),
        vars.clone(),
        CliOverrides::default(),
    )
    .unwrap();
    assert_eq!(c.canal.host, "env-host");
    assert_eq!(c.canal.port.get(), 3000);
    assert_eq!(c.canal.destination, "prefixed-dest");
    assert_eq!(c.canal.batch_size, 50);
    assert_eq!(c.amqp.confirm_timeout, Duration::from_secs(10));
    assert_eq!(c.amqp.queue.name, "other_tasks");
    assert_eq!(c.log.file, Some(PathBuf::from("logs/app.log")));
    assert!(!c.admin.enabled);
    assert_eq!(c.canal.username, "");
    // CLI over env.
    let cli = CliOverrides {
        canal: CanalFlags {
            host: Some("cli-host".into()),
            port: Some(4000),
            batch_size: Some(9),
            ..Default::default()
        },
        service: ServiceFlags {
            admin_bind: Some("0.0.0.0:9191".into()),
            ..Default::default()
        },
    };
    let c = load_from(Some(&file), nowhere(), vars, cli).unwrap();
    assert_eq!(c.canal.host, "cli-host");
    assert_eq!(c.canal.port.get(), 4000);
    assert_eq!(c.canal.batch_size, 9);
    assert_eq!(c.canal.destination, "prefixed-dest");
    assert_eq!(c.admin.bind, "0.0.0.0:9191");
}

#[test]
fn default_file_is_used_when_present_and_explicit_missing_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "d.toml", "[canal]\ndestination = \"from-default\"\n");
    let c = load_from(None, &file, env(&[]), CliOverrides::default()).unwrap();
    assert_eq!(c.canal.destination, "from-default");
    let missing = dir.path().join("missing.toml");
    let err = load_from(Some(&missing), &file, env(&[]), CliOverrides::default()).unwrap_err();
    assert!(matches!(err, ConfigError::FileMissing { .. }), "{err}");
    assert!(err.to_string().contains("missing.toml"), "{err}");
}

#[test]
fn numeric_env_values_fill_string_fields() {
    let vars = env(&[
        ("CANAL_CONSUMER__CANAL__PASSWORD", "12345"),
        ("CANAL_CONSUMER__CANAL__CLIENT_ID", "1002"),
        ("CANAL_CONSUMER__CANAL__USERNAME", "true"),
        ("CANAL_CONSUMER__AMQP__QUEUE__NAME", "[odd]"),
    ]);
    let c = load_from(None, nowhere(), vars, CliOverrides::default()).unwrap();
    assert_eq!(c.canal.password.expose(), "12345");
    assert_eq!(c.canal.client_id, "1002");
    assert_eq!(c.canal.username, "true");
    assert_eq!(c.amqp.queue.name, "[odd]");
}

#[test]
fn numeric_secret_in_file_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "c.toml", "[canal]\npassword = 98765\n");
    let c = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap();
    assert_eq!(c.canal.password.expose(), "98765");
}

#[test]
fn unknown_key_in_file_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "bad.toml", "[amqp]\nmax_unconfirmd = 5\n");
    let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("bad.toml"), "{text}");
    assert!(text.contains("amqp.max_unconfirmd"), "{text}");
    assert!(text.contains("unknown key"), "{text}");
    let file = write(&dir, "bad2.toml", "[amqq]\nx = 1\n");
    let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
    assert!(err.to_string().contains("bad2.toml"), "{err}");
    assert!(err.to_string().contains("`amqq`"), "{err}");
}

#[test]
fn unknown_key_in_env_names_the_real_variable() {
    let vars = env(&[("CANAL_CONSUMER__AMQP__MAX_UNCONFIRMD", "5")]);
    let err = load_from(None, nowhere(), vars, CliOverrides::default()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("environment variable CANAL_CONSUMER__AMQP__MAX_UNCONFIRMD"),
        "{text}"
    );
    assert!(text.contains("amqp.max_unconfirmd"), "{text}");
}

#[test]
fn wrong_type_names_origin_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "t.toml", "[amqp]\nmax_unconfirmed = \"lots\"\n");
    let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("config file") && text.contains("t.toml"),
        "{text}"
    );
    assert!(text.contains("amqp.max_unconfirmed"), "{text}");

    let vars = env(&[("CANAL_CONSUMER__AMQP__MAX_UNCONFIRMED", "lots")]);
    let err = load_from(Some(&file), nowhere(), vars, CliOverrides::default()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("environment variable CANAL_CONSUMER__AMQP__MAX_UNCONFIRMED"),
        "{text}"
    );
    assert!(!text.contains("AMQP.MAX_UNCONFIRMED\""), "{text}");
    assert!(text.contains("`amqp.max_unconfirmed`"), "{text}");

    let vars = env(&[("CANAL_PORT", "eleven")]);
    let err = load_from(None, nowhere(), vars, CliOverrides::default()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("environment variable CANAL_PORT"), "{text}");
    assert!(text.contains("canal.port"), "{text}");
}

#[test]
fn bad_duration_names_origin_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "d.toml", "[shutdown]\ndeadline = \"5 fortnights\"\n");
    let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("d.toml") && text.contains("shutdown.deadline"),
        "{text}"
    );
    let file = write(&dir, "e.toml", "[shutdown]\ndeadline = 30\n");
    let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
    assert!(err.to_string().contains("shutdown.deadline"), "{err}");

    let vars = env(&[("CANAL_CONSUMER__AMQP__CONFIRM_TIMEOUT", "soon")]);
    let err = load_from(None, nowhere(), vars, CliOverrides::default()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("CANAL_CONSUMER__AMQP__CONFIRM_TIMEOUT")
            && text.contains("amqp.confirm_timeout"),
        "{text}"
    );
}

#[test]
fn toml_syntax_error_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "s.toml", "[canal\nhost = 1\n");
    let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
    assert!(matches!(err, ConfigError::FileSyntax { .. }), "{err}");
    assert!(err.to_string().contains("s.toml"), "{err}");
    // The parser's excerpt of the bad line is not repeated: it could hold a secret.
    let file = write(&dir, "p.toml", "[canal]\npassword = \"hunter2\n");
    let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("p.toml") && text.contains("line 2"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

#[test]
fn zero_where_zero_is_invalid_names_origin_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "v.toml", "[canal]\nmax_inflight_batches = 0\n");
    let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "config file {}: key `canal.max_inflight_batches`: must be greater than 0",
            file.display()
        )
    );
    let cli = CliOverrides {
        canal: CanalFlags {
            port: Some(0),
            ..Default::default()
        },
        ..Default::default()
    };
    let err = load_from(None, nowhere(), env(&[]), cli).unwrap_err();
    assert_eq!(
        err.to_string(),
        "command-line flag --port: key `canal.port`: must be greater than 0"
    );
    let vars = env(&[("CANAL_CONSUMER__CONSUMERS__MAX_RESTARTS", "0")]);
    let err = load_from(None, nowhere(), vars, CliOverrides::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "environment variable CANAL_CONSUMER__CONSUMERS__MAX_RESTARTS: key \
         `consumers.max_restarts`: must be greater than 0"
    );
}

#[test]
fn how_backfills_yield_to_live_changes_is_checked_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key, want) in [
        (
            "rate_while_live = -5",
            "backfill.rate_while_live",
            "must be 0 (backfills do not yield) or at least 0.01 rows per second, got -5",
        ),
        (
            "rate_while_live = nan",
            "backfill.rate_while_live",
            "got NaN",
        ),
        (
            "live_window = \"1ms\"",
            "backfill.live_window",
            "must be between 10ms and 1h, got 1ms",
        ),
        (
            "chunk_while_live = 200000",
            "backfill.chunk_while_live",
            "must be at most 100000 rows, got 200000",
        ),
    ] {
        let file = write(&dir, "y.toml", &format!("[backfill]\n{text}\n"));
        let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("`{key}`")), "{text}: {err}");
        assert!(err.ends_with(want), "{text}: {err}");
    }
    // 0 turns yielding off, and is no error
    let file = write(&dir, "y.toml", "[backfill]\nrate_while_live = 0\n");
    let cfg = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap();
    assert_eq!(cfg.backfill.rate_while_live, 0.0);
}

#[test]
fn a_non_number_for_a_non_zero_key_is_not_called_zero() {
    for (value, want) in [
        ("abc", "expected a port number (1 to 65535)"),
        ("70000", "expected a port number (1 to 65535)"),
        ("0", "must be greater than 0"),
    ] {
        let err = load_from(
            None,
            nowhere(),
            env(&[("CANAL_PORT", value)]),
            CliOverrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("environment variable CANAL_PORT: key `canal.port`: "),
            "{err}"
        );
        assert!(err.ends_with(want), "{value}: {err}");
    }
    let err = load_from(
        None,
        nowhere(),
        env(&[("CANAL_CONSUMER__AMQP__MAX_UNCONFIRMED", "-3")]),
        CliOverrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.ends_with("expected a whole number greater than 0"),
        "{err}"
    );
}

#[test]
fn fixed_choices_are_enums_and_name_the_choices() {
    let vars = env(&[("CANAL_CONSUMER__AMQP__QUEUE__QUEUE_TYPE", "stream")]);
    let err = load_from(None, nowhere(), vars, CliOverrides::default()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(
            "environment variable CANAL_CONSUMER__AMQP__QUEUE__QUEUE_TYPE: key \
             `amqp.queue.queue_type`: "
        ),
        "{text}"
    );
    assert!(
        text.contains("`classic`") && text.contains("`quorum`"),
        "{text}"
    );
    let cli = CliOverrides {
        service: ServiceFlags {
            log_format: Some("xml".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let err = load_from(None, nowhere(), env(&[]), cli).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("command-line flag --log-format: key `log.format`: "),
        "{text}"
    );
    assert!(text.contains("`text`") && text.contains("`json`"), "{text}");
    let c = load_from(
        None,
        nowhere(),
        env(&[("CANAL_CONSUMER__LOG__FORMAT", "json")]),
        CliOverrides::default(),
    )
    .unwrap();
    assert_eq!(c.log.format, LogFormat::Json);
}

#[test]
fn validation_errors_name_origin_and_key() {
    let vars = env(&[("CANAL_BATCH_SIZE", "0")]);
    let cli = CliOverrides {
        service: ServiceFlags {
            admin_bind: Some("nowhere".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let err = load_from(None, nowhere(), vars, cli).unwrap_err();
    let text = err.to_string();
    assert_eq!(err.problems().len(), 2, "{text}");
    assert!(
        text.contains("environment variable CANAL_BATCH_SIZE: key `canal.batch_size`"),
        "{text}"
    );
    assert!(
        text.contains("command-line flag --admin-bind: key `admin.bind`"),
        "{text}"
    );
}

#[test]
fn batch_size_is_sent_in_the_canal_servers_memory_units() {
    let dir = tempfile::tempdir().unwrap();
    // Canal's default unit: KiB, sent as is (also how ITEMSIZE entries pass through)
    let c = load_from(None, nowhere(), env(&[]), CliOverrides::default()).unwrap();
    assert_eq!((c.canal.batch_size, c.canal.mem_unit), (100, 1024));
    assert_eq!(
        c.canal.connection(String::new(), false).core.fetch_size,
        100
    );
    // a 128-byte unit: 100 KiB is 800 units; a part unit rounds up
    let file = write(&dir, "u.toml", "[canal]\nmem_unit = 128\n");
    let c = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap();
    assert_eq!(
        c.canal.connection(String::new(), false).core.fetch_size,
        800
    );
    let file = write(&dir, "v.toml", "[canal]\nmem_unit = 1000\nbatch_size = 3\n");
    let c = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap();
    assert_eq!(c.canal.fetch_units(), 4, "3072 bytes in 1000-byte units");
    // out of range: named with the server key it must match; Canal's int budget guarded
    for (text, key, want) in [
        (
            "mem_unit = 0",
            "canal.mem_unit",
            "must be between 1 and 1048576 bytes",
        ),
        (
            "mem_unit = 2097152",
            "canal.mem_unit",
            "memunit), got 2097152",
        ),
        (
            "batch_size = 2097152",
            "canal.batch_size",
            "must be at most 2097151 (KiB)",
        ),
    ] {
        let file = write(&dir, "w.toml", &format!("[canal]\n{text}\n"));
        let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("key `{key}`: ")), "{text}: {err}");
        assert!(err.contains(want), "{text}: {err}");
    }
    let file = write(&dir, "y.toml", "[canal]\nfetch_wait = \"11s\"\n");
    let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("key `canal.fetch_wait`: must be at most 10s") && err.ends_with("got 11s"),
        "{err}"
    );
    // a graceful stop outlasts a long poll on the wire
    let file = write(
        &dir,
        "z.toml",
        "[canal]\nfetch_wait = \"5s\"\n[shutdown]\ndeadline = \"5s\"\n",
    );
    let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("key `shutdown.deadline`: must be longer than canal.fetch_wait (5s)")
            && err.ends_with("got 5s"),
        "{err}"
    );
    let file = write(
        &dir,
        "x.toml",
        "[canal]\nbatch_size = 2097151\nmem_unit = 1\nfetch_wait = \"10s\"\n",
    );
    let c = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap();
    assert_eq!(c.canal.fetch_units(), i32::MAX - 1023);
}

#[test]
fn an_amqp_url_with_a_bad_port_is_refused_with_the_password_hidden() {
    for (url, why) in [
        ("amqp://bob:s3cret@rabbit:99999/%2f", "invalid port number"),
        ("amqp://bob:s3cret@rabbit:56x2/%2f", "invalid port number"),
        ("amqp://bob:s3cret@rabbit:0/%2f", "port 0"),
        (
            "http://bob:s3cret@rabbit/",
            "must start with amqp:// or amqps://",
        ),
    ] {
        let vars = env(&[("CANAL_CONSUMER__AMQP__URL", url)]);
        let err = load_from(None, nowhere(), vars, CliOverrides::default()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("environment variable CANAL_CONSUMER__AMQP__URL: key `amqp.url`: "),
            "{text}"
        );
        assert!(text.contains(why), "{url}: {text}");
        assert!(text.contains("bob:***@rabbit"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
    let ok = env(&[("CANAL_CONSUMER__AMQP__URL", "amqps://u:p@h:5671/v")]);
    assert!(load_from(None, nowhere(), ok, CliOverrides::default()).is_ok());
}

#[test]
fn heartbeats_need_the_source_and_a_sane_interval() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "hb.toml",
        "[heartbeat]\nenabled = true\ninterval = \"50ms\"\n",
    );
    let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("key `heartbeat.enabled`: needs canal.source_url"),
        "{text}"
    );
    assert!(
        text.contains("key `heartbeat.interval`: must be at least 100ms, got 50ms"),
        "{text}"
    );
    let file = write(
        &dir,
        "hb-ok.toml",
        "[canal]\nsource_url = \"mysql://u:p@db:3306\"\n[heartbeat]\nenabled = true\ninterval = \"250ms\"\n",
    );
    let c = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap();
    assert!(c.heartbeat.enabled);
    assert_eq!(c.heartbeat.interval, std::time::Duration::from_millis(250));
    // off by default, every 3 s when on
    let d = Config::default().heartbeat;
    assert!(!d.enabled);
    assert_eq!(d.interval, std::time::Duration::from_secs(3));
    // the row's id must fit the watermark table's id column
    let long = "d".repeat(60);
    let vars = env(&[
        ("CANAL_CONSUMER__CANAL__SOURCE_URL", "mysql://u:p@db:3306"),
        ("CANAL_CONSUMER__HEARTBEAT__ENABLED", "true"),
        ("CANAL_DESTINATION", &long),
    ]);
    let text = load_from(None, nowhere(), vars, CliOverrides::default())
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("longer than the watermark table's id column"),
        "{text}"
    );
}

#[test]
fn a_log_file_that_cannot_be_written_is_refused_naming_key_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let a_file = write(&dir, "plain.txt", "x");
    for (path, why) in [
        (dir.path().to_path_buf(), "is a directory".to_string()),
        (
            a_file.join("app.log"),
            format!("{} is not a directory", a_file.display()),
        ),
    ] {
        let cli = CliOverrides {
            service: ServiceFlags {
                log_file: Some(path.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = load_from(None, nowhere(), env(&[]), cli).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "command-line flag --log-file: key `log.file`: {}",
                path.display()
            )),
            "{text}"
        );
        assert!(text.contains(&why), "{text}");
    }
    // a new file in a new directory is fine (the logger creates both)
    let fresh = dir.path().join("logs/new/app.log");
    let cli = CliOverrides {
        service: ServiceFlags {
            log_file: Some(fresh.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(load_from(None, nowhere(), env(&[]), cli).is_ok());
    assert!(!fresh.exists(), "loading creates nothing");
}

#[test]
fn secrets_stay_out_of_errors_and_rendering() {
    let vars = env(&[
        (
            "CANAL_CONSUMER__AMQP__URL",
            "amqp://bob:s3cret@rabbit:5672/%2f",
        ),
        ("CANAL_CONSUMER__CANAL__PASSWORD", "hunter2"),
    ]);
    let c = load_from(None, nowhere(), vars, CliOverrides::default()).unwrap();
    let shown = c.to_redacted_toml();
    assert!(
        !shown.contains("s3cret") && !shown.contains("hunter2"),
        "{shown}"
    );
    assert!(shown.contains("amqp://bob:***@rabbit:5672/%2f"), "{shown}");
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("s3cret") && !dbg.contains("hunter2"), "{dbg}");
    // The rendering is itself a valid config once the secrets are put back.
    let back: Config = toml::from_str(&shown).unwrap();
    assert_eq!(back.canal.host, c.canal.host);

    let vars = env(&[("CANAL_CONSUMER__AMQP__URL", "http://bob:s3cret@x/")]);
    let err = load_from(None, nowhere(), vars, CliOverrides::default()).unwrap_err();
    assert!(!err.to_string().contains("s3cret"), "{err}");
    assert!(err.to_string().contains("amqp.url"), "{err}");
}

#[test]
fn redact_url_shapes() {
    assert_eq!(redact_url("amqp://u:p@h:1/v"), "amqp://u:***@h:1/v");
    assert_eq!(redact_url("amqp://u:p@ss@h/v"), "amqp://u:***@h/v");
    assert_eq!(redact_url("amqp://h:5672/v"), "amqp://h:5672/v");
    assert_eq!(redact_url("garbage"), "***");
    assert_eq!(
        redact_url("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
        "amqp://guest:***@127.0.0.1:5672/%2f"
    );
    assert_eq!(redact_url("amqps://u:p@ss@host/"), "amqps://u:***@host/");
    assert_eq!(redact_url("amqp://host:5672"), "amqp://host:5672");
    assert_eq!(redact_url("amqp://user@host"), "amqp://user@host");
    assert_eq!(redact_url("amqp://u:p%40ss@h/v"), "amqp://u:***@h/v");
    assert_eq!(
        redact_url("amqps://u:p@[::1]:5671/%2f"),
        "amqps://u:***@[::1]:5671/%2f"
    );
    assert_eq!(
        redact_url("mysql://backfill:s3cret@db.example:3306"),
        "mysql://backfill:***@db.example:3306"
    );
    assert_eq!(redact_url("http://u:p@h/x"), "http://u:***@h/x");
    // not a valid URL (port): still shown, password hidden
    assert_eq!(
        redact_url("amqp://bob:s3cret@rabbit:99999/%2f"),
        "amqp://bob:***@rabbit:99999/%2f"
    );
    // a password with an unencoded '?', '#' or '/': the URL parser ends the authority there
    // and would read `u:12` as host and port, the rest of the password as query or path
    for (raw, password) in [
        ("amqp://u:12?ss@h/v", "12?ss"),
        ("amqp://u:12#ss@h/v", "12#ss"),
        ("amqp://u:12/ss@h/v", "12/ss"),
        ("amqp://u:p?ss@h/v", "p?ss"),
    ] {
        assert_eq!(redact_url(raw), "amqp://u:***@h/v", "{raw}");
        assert_eq!(url_password(raw).as_deref(), Some(password), "{raw}");
    }
    assert_eq!(
        url_password("amqp://u:s3cret@h:1/v").as_deref(),
        Some("s3cret")
    );
    assert_eq!(url_password("amqp://u@h/v"), None);
}

/// `canal.instance.memory.buffer.memunit` of the local Canal server (deploy/local/canal).
fn local_canal_memunit(root: &Path) -> u32 {
    let props =
        std::fs::read_to_string(root.join("deploy/local/canal/conf/canal.properties")).unwrap();
    props
        .lines()
        .find_map(|l| l.strip_prefix("canal.instance.memory.buffer.memunit"))
        .and_then(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().parse().expect("memunit is a number"))
        .expect("the local Canal sets its memunit")
}

#[test]
fn shipped_config_files_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The documented example holds exactly the defaults, except what it must share with the
    // local Canal server that deploy/local/up starts: its credentials and its memory unit.
    let example = root.join("config/canal-consumer.toml");
    let c = load_from(Some(&example), nowhere(), env(&[]), CliOverrides::default()).unwrap();
    let mut expected = Config::default();
    expected.canal.username = "canal".into();
    expected.canal.password = Secret::new("canal");
    expected.canal.mem_unit = local_canal_memunit(root);
    assert_eq!(c, expected);
    // The compose deployment: its config file with its env file.
    let compose = root.join("deploy/canal-consumer.compose.toml");
    let env_file = std::fs::read_to_string(root.join("deploy/compose.env")).unwrap();
    let vars: Vec<(String, String)> = env_file
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=VALUE");
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    assert!(vars.iter().any(|(k, _)| k == "CANAL_HOST"));
    let c = load_from(Some(&compose), nowhere(), vars, CliOverrides::default()).unwrap();
    assert_eq!(c.canal.host, "canal-server");
    assert_eq!(c.admin.bind, "0.0.0.0:9090");
    assert!(c.amqp.url.expose().contains("@rabbitmq:5672"));
    // The Kubernetes ConfigMap's embedded file, with the Secret's variables.
    let cm = std::fs::read_to_string(root.join("deploy/k8s/base/configmap.yaml")).unwrap();
    let start = cm.find("canal-consumer.toml: |").expect("config key") + 1;
    let toml_text: String = cm[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "k8s.toml", &toml_text);
    let vars = env(&[
        (
            "CANAL_CONSUMER__AMQP__URL",
            "amqp://canal:x@rabbitmq:5672/%2f",
        ),
        ("CANAL_CONSUMER__CANAL__USERNAME", ""),
        ("CANAL_DESTINATION", "example"),
    ]);
    let c = load_from(Some(&file), nowhere(), vars, CliOverrides::default()).unwrap();
    assert_eq!(c.canal.host, "canal-server");
    assert_eq!(
        c.consumers.state_file,
        Path::new("/var/lib/canal-consumer/consumers.json")
    );
}

#[test]
fn zookeeper_mode_from_the_environment_and_its_checks() {
    let vars = env(&[
        ("CANAL_CONSUMER__CANAL__ZK_SERVERS", "zk1:2181,zk2:2181"),
        ("CANAL_CONSUMER__CANAL__ZK_SESSION_TIMEOUT", "4s"),
    ]);
    let c = load_from(None, nowhere(), vars, CliOverrides::default()).unwrap();
    let ha = c.canal.ha().expect("zookeeper mode");
    assert_eq!(ha.servers, "zk1:2181,zk2:2181");
    assert_eq!(ha.root, "/otter/canal");
    assert_eq!(ha.session_timeout, std::time::Duration::from_secs(4));
    assert_eq!(
        ha.client_running_path(),
        "/otter/canal/destinations/example/1001/running"
    );
    assert_eq!(c.canal.lock_server(), "zk-zk1:2181,zk2:2181/otter/canal");
    // the simple mode without it
    let plain = load_from(None, nowhere(), env(&[]), CliOverrides::default()).unwrap();
    assert!(plain.canal.ha().is_none());
    assert_eq!(plain.canal.lock_server(), "127.0.0.1:11111");

    let vars = env(&[
        ("CANAL_CONSUMER__CANAL__ZK_SERVERS", "zk1:2181,zk2"),
        ("CANAL_CONSUMER__CANAL__ZK_ROOT", "otter"),
        ("CANAL_CONSUMER__CANAL__CLIENT_ID", "abc"),
    ]);
    let err = load_from(None, nowhere(), vars, CliOverrides::default()).unwrap_err();
    let text = err.to_string();
    assert_eq!(err.problems().len(), 3, "{text}");
    assert!(
        text.contains(
            "CANAL_CONSUMER__CANAL__ZK_SERVERS: key `canal.zk_servers`: `zk2` is not host:port"
        ),
        "{text}"
    );
    assert!(
        text.contains("key `canal.zk_root`: must be an absolute"),
        "{text}"
    );
    assert!(
        text.contains("key `canal.client_id`: must be a number"),
        "{text}"
    );
}

#[test]
fn raw_text_needs_a_source_url_and_keeps_its_password_secret() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "raw.toml",
        "[canal]\nconnection_charset = \"ISO-8859-1\"\n",
    );
    let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("canal.source_url"), "{text}");
    assert!(text.contains("must be set"), "{text}");

    let vars = env(&[(
        "CANAL_CONSUMER__CANAL__SOURCE_URL",
        "postgres://u:hunter2@h/db",
    )]);
    let err = load_from(Some(&file), nowhere(), vars, CliOverrides::default()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("mysql://"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");

    let vars = env(&[(
        "CANAL_CONSUMER__CANAL__SOURCE_URL",
        "mysql://u:hunter2@h:3306",
    )]);
    let c = load_from(Some(&file), nowhere(), vars, CliOverrides::default()).unwrap();
    assert_eq!(c.canal.connection_charset, ConnectionCharset::Iso8859_1);
    let shown = c.to_redacted_toml();
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("mysql://u:***@h:3306"), "{shown}");

    let file = write(&dir, "bad.toml", "[canal]\nconnection_charset = \"GBK\"\n");
    let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
    assert!(err.to_string().contains("connection_charset"), "{err}");
}

#[test]
fn max_priority_zero_means_a_queue_without_priorities() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "p.toml", "[amqp.queue]\nmax_priority = 0\n");
    let c = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap();
    assert_eq!(c.amqp.queue.max_priority, None);
    // the same through the environment
    let c = load_from(
        None,
        nowhere(),
        env(&[("CANAL_CONSUMER__AMQP__QUEUE__MAX_PRIORITY", "0")]),
        CliOverrides::default(),
    )
    .unwrap();
    assert_eq!(c.amqp.queue.max_priority, None);
    // without it the default declares priorities
    let c = load_from(None, nowhere(), env(&[]), CliOverrides::default()).unwrap();
    assert!(c.amqp.queue.max_priority.is_some());
}

#[test]
fn several_broker_urls_from_a_file_or_one_environment_variable() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "u.toml",
        "[amqp]\nurls = [\"amqp://u:s3cret@n1:5781/%2f\", \"amqp://u:s3cret@n2:5782/%2f\"]\n",
    );
    let c = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap();
    let shown: Vec<String> = c.amqp.endpoints().iter().map(|u| u.redacted()).collect();
    assert_eq!(
        shown,
        ["amqp://u:***@n1:5781/%2f", "amqp://u:***@n2:5782/%2f"]
    );
    let rendered = c.to_redacted_toml();
    assert!(!rendered.contains("s3cret"), "{rendered}");
    assert!(rendered.contains("amqp://u:***@n2:5782/%2f"), "{rendered}");
    let vars = env(&[(
        "CANAL_CONSUMER__AMQP__URLS",
        "amqp://a:5781/%2f, amqp://b:5782/%2f,amqp://c:5783/%2f",
    )]);
    let c = load_from(None, nowhere(), vars, CliOverrides::default()).unwrap();
    assert_eq!(c.amqp.endpoints().len(), 3);
    // without urls, url is the one endpoint
    assert_eq!(
        Config::default().amqp.endpoints(),
        vec![Config::default().amqp.url]
    );
    // a bad entry is named, its password hidden
    let vars = env(&[(
        "CANAL_CONSUMER__AMQP__URLS",
        "amqp://a:5781/%2f,amqp://bob:s3cret@b:99999/%2f",
    )]);
    let text = load_from(None, nowhere(), vars, CliOverrides::default())
        .unwrap_err()
        .to_string();
    assert!(text.contains("key `amqp.urls`: entry 2: "), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
}

#[test]
fn quorum_queue_arguments_are_checked_against_the_queue_type() {
    let dir = tempfile::tempdir().unwrap();
    let load = |text: &str| {
        let file = write(&dir, "q.toml", text);
        load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default())
    };
    // the default max_priority on a quorum queue: refused with the reason
    let text = load("[amqp.queue]\nqueue_type = \"quorum\"\n")
        .unwrap_err()
        .to_string();
    assert!(text.contains("key `amqp.queue.max_priority`"), "{text}");
    assert!(
        text.contains("a quorum queue takes no x-max-priority"),
        "{text}"
    );
    let c = load(
        "[amqp.queue]\nqueue_type = \"quorum\"\nmax_priority = 0\n\
         dead_letter_exchange = \"dlx\"\ndead_letter_strategy = \"at-least-once\"\n\
         delivery_limit = 5\n",
    )
    .unwrap();
    assert_eq!(c.amqp.queue.delivery_limit, Some(5));
    assert_eq!(
        c.amqp.queue.dead_letter_strategy,
        DeadLetterStrategy::AtLeastOnce
    );
    let text = load(
        "[amqp.queue]\nqueue_type = \"quorum\"\nmax_priority = 0\n\
         dead_letter_strategy = \"at-least-once\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        text.contains("key `amqp.queue.dead_letter_strategy`: at-least-once needs"),
        "{text}"
    );
    let text = load("[amqp.queue]\ndelivery_limit = 3\n")
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("key `amqp.queue.delivery_limit`: x-delivery-limit exists only for quorum"),
        "{text}"
    );
}

#[test]
fn tls_files_must_be_readable_and_a_certificate_needs_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = write(&dir, "ca.pem", "-----BEGIN CERTIFICATE-----\n");
    let file = write(
        &dir,
        "t.toml",
        &format!(
            "[amqp.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\n",
            ca.display(),
            ca.display()
        ),
    );
    let text = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default())
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("key `amqp.tls.key_file`: must be set"),
        "{text}"
    );
    let file = write(
        &dir,
        "t2.toml",
        "[amqp.tls]\nca_file = \"/nonexistent/ca.pem\"\n",
    );
    let text = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default())
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("key `amqp.tls.ca_file`: /nonexistent/ca.pem cannot be read"),
        "{text}"
    );
}

#[test]
fn on_lossy_text_is_a_utf8_mode_policy_named_in_errors() {
    use crate::canal::lossy::OnLossyText;
    let dir = tempfile::tempdir().unwrap();
    // the default: check, and deliver
    let c = load_from(None, nowhere(), env(&[]), CliOverrides::default()).unwrap();
    assert_eq!(c.canal.lossy_text_check(), Some(OnLossyText::Deliver));
    let file = write(&dir, "park.toml", "[canal]\non_lossy_text = \"park\"\n");
    let c = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap();
    assert_eq!(c.canal.lossy_text_check(), Some(OnLossyText::Park));
    // raw text mode decodes text itself: a U+FFFD there is data, no check
    let vars = env(&[
        ("CANAL_CONSUMER__CANAL__CONNECTION_CHARSET", "ISO-8859-1"),
        ("CANAL_CONSUMER__CANAL__SOURCE_URL", "mysql://u:p@h:3306"),
    ]);
    let c = load_from(Some(&file), nowhere(), vars, CliOverrides::default()).unwrap();
    assert_eq!(c.canal.lossy_text_check(), None);
    // a wrong value names the file and the key
    let file = write(&dir, "bad.toml", "[canal]\non_lossy_text = \"drop\"\n");
    let err = load_from(Some(&file), nowhere(), env(&[]), CliOverrides::default()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("bad.toml"), "{text}");
    assert!(text.contains("on_lossy_text"), "{text}");
}
