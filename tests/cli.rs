//! The command line as a user meets it, without any service running: bad configuration stops
//! `start` and `check-config` with the file and key named, `status` says plainly that nothing
//! runs, and `test`/`list` work from the definitions alone.
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn run(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_canal-consumer"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .env_remove("CANAL_HOST")
        .env_remove("CANAL_PORT")
        .output()
        .expect("runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("cc-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("consumers")).unwrap();
    dir
}

#[test]
fn start_refuses_a_bad_consumer_definition_naming_file_and_key() {
    let dir = scratch("badrule");
    let file = dir.join("consumers/broken.toml");
    std::fs::write(
        &file,
        "[consumers.broken]\n[[consumers.broken.filters]]\ndatabase = \"d\"\ntable_pattern = \"(unclosed\"\n",
    )
    .unwrap();
    let out = run(
        &[
            "start",
            "--consumers-dir",
            dir.join("consumers").to_str().unwrap(),
            "--admin-bind",
            "127.0.0.1:0",
        ],
        repo(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains(file.to_str().unwrap()), "{err}");
    assert!(
        err.contains("consumers.broken.filters[0].table_pattern"),
        "{err}"
    );
}

#[test]
fn two_consumers_with_one_name_stop_the_start() {
    let dir = scratch("dup");
    let body = |n: &str| {
        format!(
            "[consumers.{n}]\n[[consumers.{n}.filters]]\ndatabase = \"d\"\ntable = \"t\"\n[[consumers.{n}.rules]]\nname = \"r\"\nplugin = \"p\"\n"
        )
    };
    std::fs::write(dir.join("consumers/a.toml"), body("same")).unwrap();
    std::fs::write(dir.join("consumers/b.toml"), body("same")).unwrap();
    let out = run(
        &[
            "check-config",
            "--consumers-dir",
            dir.join("consumers").to_str().unwrap(),
        ],
        repo(),
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("same"), "{err}");
    assert!(err.contains("b.toml") || err.contains("a.toml"), "{err}");
}

#[test]
fn a_bad_config_key_names_the_file_and_the_key() {
    let dir = scratch("badkey");
    let cfg = dir.join("cc.toml");
    std::fs::write(&cfg, "[amqp]\nconfirm_timout = \"5s\"\n").unwrap();
    let out = run(&["check-config", cfg.to_str().unwrap()], repo());
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains(cfg.to_str().unwrap()), "{err}");
    assert!(err.contains("amqp.confirm_timout"), "{err}");
}

#[test]
fn status_says_plainly_that_the_service_is_not_running() {
    let out = run(&["status", "--admin-bind", "127.0.0.1:1"], repo());
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("canal-consumer is not running"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn test_and_list_work_from_the_definitions_alone() {
    let dir = scratch("offline");
    let state = dir.join("state.json");
    let out = run(
        &[
            "test",
            "example_consumer",
            "--state-file",
            state.to_str().unwrap(),
        ],
        repo(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let messages: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let plugins: Vec<&str> = messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["plugin"].as_str().unwrap())
        .collect();
    assert_eq!(plugins, ["email_service", "order_processor"]);
    assert_eq!(messages[1]["body"]["priority"], "high");

    // disable while stopped: saved for the next start, and list shows it
    // no admin endpoint listens on port 1: the service counts as stopped
    let offline = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend([
            "--state-file",
            state.to_str().unwrap(),
            "--admin-bind",
            "127.0.0.1:1",
        ]);
        run(&all, repo())
    };
    let out = offline(&["disable", "teacher_consumer"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = offline(&["list", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let teacher = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "teacher_consumer")
        .unwrap();
    assert_eq!(teacher["enabled"], false, "{teacher:#}");
    let out = offline(&["enable", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
}

/// Defect: two `start`s with the same configuration both ran, stole each other's batches and
/// duplicated rows. The second one on a host is now refused, naming the first one's pid.
#[test]
fn a_second_instance_for_the_same_canal_client_is_refused() {
    let dir = scratch("second");
    let state = dir.join("state/consumers.json");
    let args = |admin: &str| {
        vec![
            "start".to_string(),
            "--consumers-dir".into(),
            repo().join("config/consumers").to_str().unwrap().into(),
            "--state-file".into(),
            state.to_str().unwrap().into(),
            "--admin-bind".into(),
            admin.into(),
            // nothing listens there: the instance keeps retrying and stays up
            "--port".into(),
            "1".into(),
        ]
    };
    let spawn = |admin: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_canal-consumer"));
        cmd.args(args(admin))
            .current_dir(repo())
            .env(
                "CANAL_CONSUMER__AMQP__URL",
                "amqp://guest:guest@127.0.0.1:1/%2f",
            )
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        cmd
    };
    let first = common::proc::ChildGuard::spawn(
        "canal-consumer start (first instance)",
        spawn("127.0.0.1:0").stderr(std::process::Stdio::null()),
    );
    let lock =
        canal_consumer::instance::lock_path(&dir.join("state"), "127.0.0.1:1", "example", "1001");
    let pid = first.id().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_to_string(&lock).unwrap_or_default().trim() != pid {
        assert!(
            std::time::Instant::now() < deadline,
            "the first instance never took its lock"
        );
        std::thread::yield_now();
    }
    let out = common::proc::output_within(
        "canal-consumer start (second instance)",
        &mut spawn("127.0.0.1:0"),
        std::time::Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    assert!(
        err.contains("destination 'example' as client 1001"),
        "{err}"
    );
}
/// `start` with `config`, which must be refused at load: exit 2 within 30 s (a `start` that
/// got past loading would run on and be killed, failing the test).
fn start_refused(config: &Path) -> String {
    let out = common::proc::output_within(
        "canal-consumer start",
        Command::new(env!("CARGO_BIN_EXE_canal-consumer"))
            .args(["start", "--config", config.to_str().unwrap()])
            .args(["--admin-bind", "127.0.0.1:0"])
            .current_dir(repo())
            .env_remove("RUST_LOG")
            .env_remove("CANAL_HOST")
            .env_remove("CANAL_PORT"),
        Duration::from_secs(30),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    err
}

#[test]
fn an_amqp_url_with_an_invalid_port_stops_the_start_naming_the_key() {
    let dir = scratch("amqpport");
    let cfg = dir.join("cc.toml");
    std::fs::write(
        &cfg,
        "[amqp]\nurl = \"amqp://bob:s3cret@127.0.0.1:99999/%2f\"\n",
    )
    .unwrap();
    let err = start_refused(&cfg);
    assert!(
        err.starts_with(&format!(
            "error: config file {}: key `amqp.url`: `amqp://bob:***@127.0.0.1:99999/%2f` is not \
             a valid AMQP URL: invalid port number",
            cfg.display()
        )),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
}

#[test]
fn a_condition_that_is_not_a_boolean_stops_the_start() {
    let dir = scratch("celliteral");
    let file = dir.join("consumers/lit.toml");
    std::fs::write(
        &file,
        "[consumers.lit]\n[[consumers.lit.filters]]\ndatabase = \"d\"\ntable = \"t\"\n\
         [[consumers.lit.rules]]\nname = \"r\"\nplugin = \"p\"\nwhen = { condition = '\"yes\"' }\n",
    )
    .unwrap();
    let cfg = dir.join("cc.toml");
    std::fs::write(
        &cfg,
        format!(
            "[consumers]\ndir = \"{}\"\nstate_file = \"{}\"\n",
            dir.join("consumers").display(),
            dir.join("state.json").display()
        ),
    )
    .unwrap();
    let err = start_refused(&cfg);
    assert!(err.contains(file.to_str().unwrap()), "{err}");
    assert!(
        err.contains(
            "consumers.lit.rules[0].when.condition: condition `\"yes\"` is always a string \
             (yes), not a boolean"
        ),
        "{err}"
    );
}

#[test]
fn a_log_file_that_is_a_directory_or_unwritable_stops_the_start_naming_key_and_path() {
    let dir = scratch("logfile");
    let plain = dir.join("plain.txt");
    std::fs::write(&plain, "x").unwrap();
    for (path, why) in [
        (dir.clone(), "is a directory".to_string()),
        (
            plain.join("app.log"),
            format!("{} is not a directory", plain.display()),
        ),
    ] {
        let cfg = dir.join("cc.toml");
        std::fs::write(&cfg, format!("[log]\nfile = \"{}\"\n", path.display())).unwrap();
        let err = start_refused(&cfg);
        assert!(
            err.starts_with(&format!(
                "error: config file {}: key `log.file`: {}",
                cfg.display(),
                path.display()
            )),
            "{err}"
        );
        assert!(err.contains(&why), "{err}");
    }
}

#[test]
fn a_non_loopback_admin_bind_needs_the_opt_in() {
    let dir = scratch("remote");
    let state = dir.join("state/consumers.json");
    let args = |cmd: &'static str, extra: &[&'static str]| {
        let mut a = vec![
            cmd,
            "--admin-bind",
            "0.0.0.0:0",
            "--state-file",
            state.to_str().unwrap(),
        ];
        a.extend(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    for cmd in ["start", "check-config"] {
        let a = args(cmd, &[]);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = run(&a, repo());
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(err.contains("admin.bind = `0.0.0.0:0`"), "{cmd}: {err}");
        assert!(err.contains("admin.allow_remote = true"), "{cmd}: {err}");
    }
    // no token file was generated by a refused start
    assert!(!dir.join("state/admin.token").exists());
    // with the opt-in, the configuration is accepted
    let out = Command::new(env!("CARGO_BIN_EXE_canal-consumer"))
        .args(["check-config", "--admin-bind", "0.0.0.0:9090"])
        .current_dir(repo())
        .env("CANAL_CONSUMER__ADMIN__ALLOW_REMOTE", "true")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("allow_remote = true"));
}

#[test]
fn test_reads_the_lines_tail_prints_from_the_tap() {
    let dir = scratch("taplines");
    let file = dir.join("tap.jsonl");
    std::fs::write(
        &file,
        r#"{"consumer":"example_consumer","event":{"destination":"example","database":"test_db","table":"users","event_type":"INSERT","data":{"id":41,"name":"Ann"},"position":{"log_file":"mysql-bin.000003","offset":4,"row_index":0},"executed_at":0},"triggers":[]}
"#,
    )
    .unwrap();
    let out = run(
        &[
            "test",
            "example_consumer",
            "--event",
            file.to_str().unwrap(),
        ],
        repo(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let messages: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(messages[0]["plugin"], "email_service");
    assert_eq!(messages[0]["body"]["payload"]["user_id"], 41);
}

#[test]
fn tail_without_a_service_says_it_reads_canal_directly_and_as_whom() {
    // tap-only options need the running service
    let out = run(
        &["tail", "--admin-bind", "127.0.0.1:1", "--consumer", "x"],
        repo(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("need the running service's tap"),
        "{}",
        text(&out.stderr)
    );
    // no admin endpoint answers: it says so before touching Canal (nothing listens on port 1)
    let mut child = Command::new(env!("CARGO_BIN_EXE_canal-consumer"))
        .args([
            "tail",
            "--admin-bind",
            "127.0.0.1:1",
            "--port",
            "1",
            "--client-id",
            "4242",
        ])
        .current_dir(repo())
        .env_remove("RUST_LOG")
        .env_remove("CANAL_HOST")
        .env_remove("CANAL_DESTINATION")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stderr.take().unwrap()),
        &mut first,
    )
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        first.trim_end(),
        "tail: canal-consumer is not running (no admin endpoint at 127.0.0.1:1); reading Canal \
         directly at 127.0.0.1:1, destination example, as client id 4242; it rolls back on exit, \
         so nothing is consumed"
    );
}
