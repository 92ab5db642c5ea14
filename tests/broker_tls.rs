//! TLS to the broker (`amqps://` with `[amqp.tls]`), against a RabbitMQ node of the test's own:
//! the test makes a CA, a server certificate for `localhost` and a client certificate with
//! `openssl`, starts Debian's rabbitmq-server as node `cctls<pid>@<host>` with a TLS listener on
//! a free loopback port (its own data dir, killed with the test), and publishes through the
//! publisher actor with confirms. A certificate from another CA and a host name the certificate
//! does not list are refused with [`PublishError::Tls`] naming the cause.
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use actix::prelude::*;
use canal_consumer::config::{AmqpConfig, QueueConfig, Secret, TlsConfig};
use canal_consumer::event::{EventType, Position};
use canal_consumer::publisher::{AmqpPublisher, Publish, PublishError};
use canal_consumer::trigger::{MessageFormat, Priority, Route, SourceRef, Trigger};
use common::proc::ChildGuard;
use common::service::free_port;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<name>-ca.pem`) and, signed by it, a certificate for `cn` with `san`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            &format!("{name}-ca.key"),
            "-out",
            &format!("{name}-ca.pem"),
            "-subj",
            &format!("/CN=canal-consumer test CA {name}"),
        ],
    );
}

fn make_cert(dir: &Path, ca: &str, name: &str, san: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName={san}\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}-ca.pem"),
            "-CAkey",
            &format!("{ca}-ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.pem"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

/// A RabbitMQ node with only a TLS listener, killed when dropped.
struct TlsBroker {
    _node: ChildGuard,
    port: u16,
    dir: PathBuf,
}

impl TlsBroker {
    fn start(dir: &Path) -> TlsBroker {
        let port = free_port();
        let dist = free_port();
        let host = String::from_utf8(Command::new("hostname").arg("-s").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        let node = format!("cctls{}@{host}", std::process::id());
        let conf = format!(
            "listeners.tcp = none\n\
             listeners.ssl.default = 127.0.0.1:{port}\n\
             distribution.listener.interface = 127.0.0.1\n\
             loopback_users.guest = true\n\
             ssl_options.cacertfile = {d}/main-ca.pem\n\
             ssl_options.certfile = {d}/server.pem\n\
             ssl_options.keyfile = {d}/server.key\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = false\n",
            d = dir.display()
        );
        std::fs::write(dir.join("rabbitmq.conf"), conf).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // the node runs as the package's user rabbitmq (its Erlang cookie); it reads our files
        let status = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success());
        let child = ChildGuard::spawn(
            "rabbitmq-server (TLS test node)",
            Command::new("setpriv")
                .args(["--reuid=rabbitmq", "--regid=rabbitmq", "--init-groups"])
                .arg("env")
                .arg("HOME=/var/lib/rabbitmq")
                // the script then execs the VM instead of waiting on it: the guard's pid is
                // the node's, so the guard's kill ends the node
                .arg("RUNNING_UNDER_SYSTEMD=true")
                .arg(format!("RABBITMQ_NODENAME={node}"))
                .arg(format!("RABBITMQ_DIST_PORT={dist}"))
                .arg(format!(
                    "RABBITMQ_CONFIG_FILE={}/rabbitmq.conf",
                    dir.display()
                ))
                .arg(format!(
                    "RABBITMQ_ADVANCED_CONFIG_FILE={}/advanced.config",
                    dir.display()
                ))
                .arg(format!(
                    "RABBITMQ_ENABLED_PLUGINS_FILE={}/enabled_plugins",
                    dir.display()
                ))
                .arg(format!("RABBITMQ_MNESIA_BASE={}/mnesia", dir.display()))
                .arg(format!("RABBITMQ_LOG_BASE={}/log", dir.display()))
                .arg(format!("RABBITMQ_PID_FILE={}/pid", dir.display()))
                .arg("/usr/lib/rabbitmq/bin/rabbitmq-server")
                .current_dir("/var/lib/rabbitmq")
                .stdin(std::process::Stdio::null())
                .stdout(std::fs::File::create(dir.join("node.out")).unwrap())
                .stderr(std::fs::File::create(dir.join("node.err")).unwrap()),
        );
        let broker = TlsBroker {
            _node: child,
            port,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the TLS test node did not listen on {port}: {}",
                std::fs::read_to_string(dir.join("node.out")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        broker
    }
}

fn trigger(n: u64, queue: &str) -> Trigger {
    Trigger {
        id: format!("{queue}-{n}"),
        plugin: "email_service".into(),
        payload: json!({"user_id": n}),
        priority: Priority::Normal,
        consumer: "example_consumer".into(),
        rule: Some("welcome".into()),
        source: SourceRef {
            destination: "example".into(),
            database: "test_db".into(),
            table: "users".into(),
            event_type: EventType::Insert,
            position: Position {
                log_file: "mysql-bin.000001".into(),
                offset: n,
                row_index: 0,
                server_id: 1,
                gtid: None,
            },
            executed_at: 1_700_000_000_000,
            snapshot: None,
        },
        route: Route {
            exchange: String::new(),
            routing_key: queue.to_string(),
        },
        format: MessageFormat::Envelope,
        bulk: None,
    }
}

fn config(url: String, tls: TlsConfig) -> AmqpConfig {
    AmqpConfig {
        url: Secret::new(url),
        tls,
        confirm_timeout: Duration::from_secs(5),
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(1),
        queue: QueueConfig {
            name: "cc_tls".into(),
            ..QueueConfig::default()
        },
        ..AmqpConfig::default()
    }
}

async fn publish_one(addr: &Addr<AmqpPublisher>, n: u64) -> Result<(), PublishError> {
    let (reply, rx) = oneshot::channel();
    addr.send(Publish {
        triggers: vec![trigger(n, "cc_tls")],
        epoch: 1,
        reply,
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .expect("answered")
        .expect("reply")
}

#[cfg_attr(
    not(real_services),
    ignore = "needs the local services: run deploy/local/test (CC_REAL_SERVICES=1)"
)]
#[actix_rt::test]
async fn amqps_with_our_ca_and_client_certificate_publishes_and_wrong_ca_or_host_is_named() {
    let dir = std::env::temp_dir().join(format!("cc-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    make_ca(&dir, "main");
    make_ca(&dir, "other");
    make_cert(&dir, "main", "server", "DNS:localhost");
    make_cert(&dir, "main", "client", "DNS:canal-consumer");
    let broker = TlsBroker::start(&dir);
    let d = &broker.dir;
    let good = TlsConfig {
        ca_file: Some(d.join("main-ca.pem")),
        cert_file: Some(d.join("client.pem")),
        key_file: Some(d.join("client.key")),
    };
    let url = |host: &str| format!("amqps://guest:guest@{host}:{}/%2f", broker.port);

    // our CA and a client certificate: connected, a publish is confirmed
    let addr = AmqpPublisher::start_checked(config(url("localhost"), good.clone()))
        .await
        .expect("connects over TLS");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match publish_one(&addr, 1).await {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "no confirm over TLS: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // without a client certificate, as the broker allows
    let no_client = TlsConfig {
        cert_file: None,
        key_file: None,
        ..good.clone()
    };
    AmqpPublisher::start_checked(config(url("localhost"), no_client))
        .await
        .expect("connects over TLS without a client certificate");

    // another CA: refused at start, saying so, password hidden
    let wrong_ca = TlsConfig {
        ca_file: Some(d.join("other-ca.pem")),
        ..good.clone()
    };
    match AmqpPublisher::start_checked(config(url("localhost"), wrong_ca)).await {
        Err(PublishError::Tls(text)) => {
            assert!(
                text.contains("not signed by a CA in amqp.tls.ca_file"),
                "{text}"
            );
            assert!(text.contains("guest:***@localhost"), "{text}");
        }
        other => panic!("expected a TLS error, got {:?}", other.map(|_| "connected")),
    }
    // a host name the certificate does not list
    match AmqpPublisher::start_checked(config(url("127.0.0.1"), good)).await {
        Err(PublishError::Tls(text)) => {
            assert!(
                text.contains("not valid for the host name '127.0.0.1'"),
                "{text}"
            );
        }
        other => panic!("expected a TLS error, got {:?}", other.map(|_| "connected")),
    }
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
