//! High availability on ZooKeeper: follow the Canal server that runs the destination, and run
//! replicas of the service in active/standby.
//!
//! With `canal.zk_servers` set, the Canal connection takes its server address and its right to
//! work from here instead of `canal.host`/`canal.port`:
//! - [`core`] (sans-IO) decides: active while this replica holds the destination's client
//!   running node, `{root}/destinations/{destination}/{client_id}/running`, the ephemeral node
//!   Canal's own Java client (`ClientRunningMonitor`) creates, with the same JSON
//!   (`{"active":true,"address":…,"clientId":…}`), so a Java client and this service exclude
//!   each other; standby otherwise. It also keeps the lease that bounds when acks and fetches
//!   may be written (see its docs for why a frozen process cannot ack after waking).
//! - [`zk`] is the shell: one ZooKeeper session (crate `zookeeper-client`), the claim, the
//!   watches on the client node and on Canal's server running node
//!   (`{root}/destinations/{destination}/running`, `{"active":true,"address":"ip:port"}`),
//!   heartbeats; it feeds [`core`] and publishes the resulting [`Lease`] on a watch channel the
//!   connection reads before every write, and tells the connection when it changed.
//!
//! Failures: ZooKeeper unreachable or a session lost means standby (connected to no Canal
//! server) until a session is back and the node is ours; the shell retries forever with
//! backoff. Nothing here ever acks or rolls back: the connection's usual reconnect path
//! (connect, subscribe, rollback) does that when the lease points it at a server.

pub mod core;
pub mod zk;

pub use self::core::{Lease, Role, ZkSession};

use std::time::Duration;

/// Settings of the ZooKeeper shell.
#[derive(Debug, Clone)]
pub struct HaConfig {
    /// ZooKeeper connect string (`host:port,host:port`).
    pub servers: String,
    /// Canal's root path, `/otter/canal` unless Canal was built with another.
    pub root: String,
    pub destination: String,
    /// Canal client id (decimal i16).
    pub client_id: String,
    /// What this replica writes as `address` in the client running node.
    pub address: String,
    pub session_timeout: Duration,
}

impl HaConfig {
    /// Canal's running node for the destination (its server address).
    pub fn server_running_path(&self) -> String {
        format!("{}/destinations/{}/running", self.root, self.destination)
    }

    /// The client running node this replica competes for.
    pub fn client_running_path(&self) -> String {
        format!(
            "{}/destinations/{}/{}/running",
            self.root, self.destination, self.client_id
        )
    }

    /// The JSON Canal's Java client writes into the client running node (`ClientRunningData`).
    pub fn client_running_data(&self) -> Vec<u8> {
        let client_id: serde_json::Value = self
            .client_id
            .parse::<i16>()
            .map(serde_json::Value::from)
            .unwrap_or_else(|_| serde_json::Value::from(self.client_id.clone()));
        serde_json::json!({
            "active": true,
            "address": self.address,
            "clientId": client_id,
        })
        .to_string()
        .into_bytes()
    }
}

/// The `address` of a running node's JSON (Canal's server and client running data both have
/// one), or a description of what the node held instead.
pub fn running_address(data: &[u8]) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct Running {
        address: String,
        #[serde(default = "yes")]
        active: bool,
    }
    fn yes() -> bool {
        true
    }
    let r: Running = serde_json::from_slice(data).map_err(|e| {
        format!(
            "not canal's running data ({e}): {}",
            String::from_utf8_lossy(&data[..data.len().min(200)])
        )
    })?;
    if !r.active {
        return Err(format!("{} is released (active=false)", r.address));
    }
    Ok(r.address)
}

/// This replica's default `address`: host name and pid (unique per process; Canal's Java
/// client writes its IP, and only compares it with its own).
pub fn default_address() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "canal-consumer".into());
    format!("{host}:{}", std::process::id())
}

/// What `status` shows about ZooKeeper mode.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HaStatus {
    pub role: Role,
    pub zookeeper: ZkSession,
    /// The Canal server ZooKeeper says runs the destination.
    pub canal_server: Option<String>,
    /// Who holds the client running node when we do not.
    pub holder: Option<String>,
    /// Why the replica is not working right now.
    pub reason: Option<String>,
}

impl From<&Lease> for HaStatus {
    fn from(l: &Lease) -> Self {
        HaStatus {
            role: l.role,
            zookeeper: l.session,
            canal_server: l.canal.clone(),
            holder: l.holder.clone(),
            reason: l.reason.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HaConfig {
        HaConfig {
            servers: "127.0.0.1:2181".into(),
            root: "/otter/canal".into(),
            destination: "example".into(),
            client_id: "1001".into(),
            address: "h:1".into(),
            session_timeout: Duration::from_secs(6),
        }
    }

    #[test]
    fn paths_and_data_in_canal_layout() {
        let c = cfg();
        assert_eq!(
            c.server_running_path(),
            "/otter/canal/destinations/example/running"
        );
        assert_eq!(
            c.client_running_path(),
            "/otter/canal/destinations/example/1001/running"
        );
        let v: serde_json::Value = serde_json::from_slice(&c.client_running_data()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"active": true, "address": "h:1", "clientId": 1001})
        );
    }

    #[test]
    fn reads_running_addresses() {
        assert_eq!(
            running_address(br#"{"active":true,"address":"127.0.0.1:11121"}"#).unwrap(),
            "127.0.0.1:11121"
        );
        // Java's ClientRunningData, and a server node with a cid
        assert_eq!(
            running_address(br#"{"active":true,"address":"10.1.2.3","clientId":1001}"#).unwrap(),
            "10.1.2.3"
        );
        assert_eq!(
            running_address(br#"{"active":true,"address":"a:1","cid":1}"#).unwrap(),
            "a:1"
        );
        assert!(running_address(br#"{"active":false,"address":"a:1"}"#).is_err());
        assert!(running_address(b"garbage").is_err());
    }
}
