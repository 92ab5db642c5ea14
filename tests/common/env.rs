//! Where the real services are: the `CC_TEST_*` environment variables, with the local stack of
//! `deploy/local/up` as the default (deploy/local/README.md lists them). Shared by the tests
//! (`common`, which re-exports it) and the pipeline bench (`#[path]`), so both reach the same
//! stack; std only, for that reason.
#![allow(dead_code)]

/// `key` from the environment, or `default`.
pub fn env_or(key: &str, default: &str) -> String {
    std::env::var(key)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn env_port(key: &str, default: u16) -> u16 {
    let v = env_or(key, &default.to_string());
    v.parse()
        .unwrap_or_else(|_| panic!("{key}={v:?} is not a port number"))
}

/// Canal server host (`CC_TEST_CANAL_HOST`, default 127.0.0.1).
pub fn canal_host() -> String {
    env_or("CC_TEST_CANAL_HOST", "127.0.0.1")
}
/// Canal server port (`CC_TEST_CANAL_PORT`, default 11111).
pub fn canal_port() -> u16 {
    env_port("CC_TEST_CANAL_PORT", 11111)
}
/// Canal destination (`CC_TEST_CANAL_DESTINATION`, default `example`).
pub fn destination() -> String {
    env_or("CC_TEST_CANAL_DESTINATION", "example")
}
/// Canal client user (`CC_TEST_CANAL_USER`, default `canal`).
pub fn canal_user() -> String {
    env_or("CC_TEST_CANAL_USER", "canal")
}
/// Canal client password (`CC_TEST_CANAL_PASSWORD`, default `canal`).
pub fn canal_password() -> String {
    env_or("CC_TEST_CANAL_PASSWORD", "canal")
}
/// The Canal server's `canal.instance.memory.buffer.memunit`, the service's `canal.mem_unit`
/// (`CC_TEST_CANAL_MEM_UNIT`, default 128 as in deploy/local/canal/conf/canal.properties).
pub fn canal_mem_unit() -> u32 {
    env_or("CC_TEST_CANAL_MEM_UNIT", "128")
        .parse()
        .expect("CC_TEST_CANAL_MEM_UNIT is a number of bytes")
}
/// MariaDB/MySQL host the tests write to (`CC_TEST_MYSQL_HOST`, default 127.0.0.1).
pub fn mysql_host() -> String {
    env_or("CC_TEST_MYSQL_HOST", "127.0.0.1")
}
/// Its port (`CC_TEST_MYSQL_PORT`, default 3306).
pub fn mysql_port() -> u16 {
    env_port("CC_TEST_MYSQL_PORT", 3306)
}
/// A user with ALL on the test databases (`CC_TEST_MYSQL_USER`, default `test`).
pub fn mysql_user() -> String {
    env_or("CC_TEST_MYSQL_USER", "test")
}
/// Its password (`CC_TEST_MYSQL_PASSWORD`, default `test`).
pub fn mysql_password() -> String {
    env_or("CC_TEST_MYSQL_PASSWORD", "test")
}
/// The broker (`CC_TEST_AMQP_URL`, or the older `AMQP_URL`, default guest@127.0.0.1:5672).
pub fn amqp_url() -> String {
    std::env::var("CC_TEST_AMQP_URL")
        .or_else(|_| std::env::var("AMQP_URL"))
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The RabbitMQ cluster's AMQP URLs, node 1 first (`CC_TEST_AMQP_CLUSTER_URLS`,
/// comma-separated; default the three nodes of `deploy/local/rabbit-cluster-ctl`).
pub fn amqp_cluster_urls() -> Vec<String> {
    env_or(
        "CC_TEST_AMQP_CLUSTER_URLS",
        "amqp://guest:guest@127.0.0.1:5781/%2f,amqp://guest:guest@127.0.0.1:5782/%2f,amqp://guest:guest@127.0.0.1:5783/%2f",
    )
    .split(',')
    .map(|s| s.trim().to_string())
    .collect()
}

/// The service's `canal.source_url` for backfills (`CC_TEST_BACKFILL_URL`; default the
/// `backfill` account of deploy/local/mariadb/users.sql on the test database server).
pub fn backfill_url() -> String {
    env_or(
        "CC_TEST_BACKFILL_URL",
        &format!(
            "mysql://backfill:backfill@{}:{}",
            mysql_host(),
            mysql_port()
        ),
    )
}

/// The `mysql` client's options that reach the test database server as the test user.
pub fn mysql_client_args() -> [String; 4] {
    [
        format!("-h{}", mysql_host()),
        format!("-P{}", mysql_port()),
        format!("-u{}", mysql_user()),
        format!("-p{}", mysql_password()),
    ]
}
