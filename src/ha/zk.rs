//! The ZooKeeper shell of [`super::core`]: one session at a time, the claim of the client
//! running node, the watches, the heartbeats. Every observation goes into [`HaCore`]; after each
//! one the resulting [`Lease`] is published on a watch channel (the connection reads it before
//! every write), which the connection also watches for changes.
//!
//! Failures: a session that cannot be opened is retried with backoff (standby meanwhile); an
//! expired or closed session is dropped and a new one opened; a failed request is logged and
//! retried on the next heartbeat. It never panics and never stops until the service does.

use super::HaConfig;
use super::core::{Action, Event, HaCore, Lease};
use crate::backoff::Backoff;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use zookeeper_client as zk;

type Watch = Pin<Box<dyn Future<Output = zk::WatchedEvent> + Send>>;

/// Creates the lease channel: the receiver goes into the connection's configuration, the
/// sender to [`run`].
pub fn channel() -> (watch::Sender<Lease>, watch::Receiver<Lease>) {
    watch::channel(Lease::default())
}

/// Asks the shell to give up the client running node (clean shutdown, after the connection
/// stopped): answered once the node is deleted, so a standby takes over at once instead of
/// after the session timeout.
pub type Release = tokio::sync::oneshot::Sender<tokio::sync::oneshot::Sender<()>>;

/// Runs the shell until the process ends or `release` asks it to step down (spawn it on the
/// actix system).
pub async fn run(
    cfg: HaConfig,
    tx: watch::Sender<Lease>,
    mut release: tokio::sync::oneshot::Receiver<tokio::sync::oneshot::Sender<()>>,
) {
    let mut core = HaCore::new(cfg.session_timeout);
    let publish = |core: &HaCore| {
        let lease = core.lease();
        // receivers (the connection watches it) see only real changes
        tx.send_if_modified(|old| {
            if *old == lease {
                false
            } else {
                *old = lease.clone();
                true
            }
        });
    };
    let backoff =
        Backoff::new(Duration::from_millis(200), Duration::from_secs(10)).with_jitter(0.2);
    let mut attempt = 0u32;
    loop {
        let connect = zk::Client::connector()
            .with_session_timeout(cfg.session_timeout)
            .with_connection_timeout(cfg.session_timeout / 3)
            .connect(&cfg.servers);
        let client = match tokio::time::timeout(cfg.session_timeout * 2, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let delay = backoff.delay(attempt);
                attempt = attempt.saturating_add(1);
                tracing::warn!(servers = %cfg.servers, error = %e, retry_in = ?delay, "cannot open a zookeeper session");
                core.on(Event::Disconnected);
                publish(&core);
                tokio::time::sleep(delay).await;
                continue;
            }
            Err(_) => {
                let delay = backoff.delay(attempt);
                attempt = attempt.saturating_add(1);
                tracing::warn!(servers = %cfg.servers, retry_in = ?delay, "zookeeper session not established in time");
                core.on(Event::Disconnected);
                publish(&core);
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        attempt = 0;
        core.set_session_timeout(client.session_timeout());
        tracing::info!(
            servers = %cfg.servers,
            session = %client.session_id(),
            timeout = ?client.session_timeout(),
            node = %cfg.client_running_path(),
            "zookeeper session established"
        );
        tokio::select! {
            _ = session(&cfg, &client, &mut core, &publish) => {}
            done = &mut release => {
                step_down(&cfg, &client).await;
                if let Ok(done) = done {
                    let _ = done.send(());
                }
                return;
            }
        }
        tracing::warn!(session = %client.session_id(), "zookeeper session ended; opening a new one");
        drop(client);
    }
}

/// One session, until it expires or closes.
async fn session(
    cfg: &HaConfig,
    client: &zk::Client,
    core: &mut HaCore,
    publish: &impl Fn(&HaCore),
) {
    let mut states = client.state_watcher();
    let mut node_watch: Option<Watch> = None;
    let mut canal_watch: Option<Watch> = None;
    let mut pending: Vec<Action> = core.on(Event::Connected);
    let mut need_canal_read = true;
    publish(core);
    let mut heartbeat = tokio::time::interval(core.heartbeat_every());
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // what the core asked for
        for action in std::mem::take(&mut pending) {
            match action {
                Action::NewSession => return,
                Action::WatchNode => {} // the claim set the watch already
                Action::Claim => {
                    // bounded, so a request stuck behind a lost connection does not hold up the
                    // session events (the heartbeat and read below are bounded the same way)
                    let (event, watch) =
                        tokio::time::timeout(cfg.session_timeout, claim(cfg, client))
                            .await
                            .unwrap_or((None, None));
                    if let Some(w) = watch {
                        node_watch = Some(w);
                    }
                    let event = event.unwrap_or(Event::ClaimFailed);
                    {
                        let role_before = core.role();
                        pending.extend(core.on(event));
                        if core.role() != role_before {
                            tracing::warn!(
                                role = core.role().as_str(),
                                holder = ?core.lease().holder,
                                "replica role changed"
                            );
                        } else if let Some(h) = &core.lease().holder {
                            tracing::info!(holder = %h, "standby: another client holds the destination");
                        }
                    }
                    publish(core);
                }
            }
        }
        if !pending.is_empty() {
            continue;
        }
        if need_canal_read {
            need_canal_read = false;
            let read = tokio::time::timeout(cfg.session_timeout, read_canal(cfg, client))
                .await
                .unwrap_or(Err(zk::Error::Timeout));
            match read {
                Ok((addr, w)) => {
                    if core.lease().canal != addr {
                        tracing::info!(canal = ?addr, "canal server running the destination");
                    }
                    pending.extend(core.on(Event::CanalRunning(addr)));
                    canal_watch = Some(w);
                    publish(core);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read canal's running node; retrying");
                    need_canal_read = true;
                    tokio::time::sleep(core.heartbeat_every()).await;
                }
            }
            continue;
        }
        tokio::select! {
            state = states.changed() => {
                use zk::SessionState as S;
                let event = match state {
                    S::SyncConnected | S::ConnectedReadOnly => Event::Connected,
                    S::Disconnected => Event::Disconnected,
                    S::Expired | S::Closed | S::AuthFailed => Event::Expired,
                };
                tracing::warn!(state = ?state, "zookeeper session state");
                if event == Event::Connected {
                    need_canal_read = true;
                }
                pending.extend(core.on(event));
                publish(core);
                if matches!(state, S::Expired | S::Closed | S::AuthFailed) {
                    return;
                }
            }
            ev = wait(&mut node_watch) => {
                node_watch = None;
                if ev.event_type == zk::EventType::NodeDeleted {
                    tracing::info!(node = %cfg.client_running_path(), "client running node deleted");
                    pending.extend(core.on(Event::NodeGone));
                    publish(core);
                } else if ev.event_type != zk::EventType::Session {
                    // data changed (someone rewrote it): look again
                    pending.extend(core.on(Event::NodeGone));
                }
            }
            ev = wait(&mut canal_watch) => {
                canal_watch = None;
                if ev.event_type != zk::EventType::Session {
                    need_canal_read = true;
                }
            }
            _ = heartbeat.tick() => {
                let sent = Instant::now();
                let answer = tokio::time::timeout(
                    core.heartbeat_every(),
                    client.check_stat(&cfg.client_running_path()),
                )
                .await
                .unwrap_or(Err(zk::Error::Timeout));
                match answer {
                    Ok(stat) => {
                        let ours = stat.is_some_and(|s| s.ephemeral_owner == client.session_id().0);
                        if ours {
                            pending.extend(core.on(Event::Heartbeat { sent }));
                        } else if core.role() == super::Role::Active {
                            // our node is gone and its watch did not say so (yet)
                            pending.extend(core.on(Event::NodeGone));
                        }
                        publish(core);
                    }
                    Err(e) => tracing::debug!(error = %e, "zookeeper heartbeat failed"),
                }
                if node_watch.is_none() && core.role() == super::Role::Standby && pending.is_empty() {
                    // a standby without a watch (it failed to set one): claim again
                    pending.extend(core.on(Event::NodeGone));
                }
            }
        }
    }
}

/// Deletes the client running node if this session holds it.
async fn step_down(cfg: &HaConfig, client: &zk::Client) {
    let path = cfg.client_running_path();
    match client.check_stat(&path).await {
        Ok(Some(stat)) if stat.ephemeral_owner == client.session_id().0 => {
            match client.delete(&path, Some(stat.version)).await {
                Ok(()) => tracing::info!(node = %path, "released the client running node"),
                Err(e) => {
                    tracing::warn!(node = %path, error = %e, "cannot release the client running node; it goes with the session")
                }
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(node = %path, error = %e, "cannot check the client running node"),
    }
}

async fn wait(w: &mut Option<Watch>) -> zk::WatchedEvent {
    match w {
        Some(f) => f.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Create the client running node; on NodeExists read who holds it and watch it. No event:
/// the claim failed (the caller reports ClaimFailed and claims again on a later heartbeat).
async fn claim(cfg: &HaConfig, client: &zk::Client) -> (Option<Event>, Option<Watch>) {
    let path = cfg.client_running_path();
    let data = cfg.client_running_data();
    let ephemeral = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
    let parent = path
        .rsplit_once('/')
        .map(|(p, _)| p.to_string())
        .unwrap_or_default();
    for _ in 0..3 {
        let sent = Instant::now();
        match client.create(&path, &data, &ephemeral).await {
            Ok(_) => {
                tracing::warn!(node = %path, "claimed the client running node: this replica is active");
                let watch = client
                    .get_and_watch_data(&path)
                    .await
                    .ok()
                    .map(|(_, _, w)| Box::pin(w.changed()) as Watch);
                return (Some(Event::Claimed { sent }), watch);
            }
            Err(zk::Error::NodeExists) => match client.get_and_watch_data(&path).await {
                Ok((held, stat, w)) => {
                    let watch = Some(Box::pin(w.changed()) as Watch);
                    if stat.ephemeral_owner == client.session_id().0 {
                        // ours, from this session (a claim whose answer was lost)
                        return (Some(Event::Claimed { sent }), watch);
                    }
                    let address = super::running_address(&held).unwrap_or_else(|e| e);
                    return (Some(Event::HeldBy { address }), watch);
                }
                Err(zk::Error::NoNode) => continue, // it just went: try again
                Err(e) => {
                    tracing::warn!(node = %path, error = %e, "cannot read the client running node");
                    return (None, None);
                }
            },
            Err(zk::Error::NoNode) => {
                let dir = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
                if let Err(e) = client.mkdir(&parent, &dir).await {
                    tracing::warn!(node = %parent, error = %e, "cannot create the client node's parent");
                    return (None, None);
                }
            }
            Err(e) => {
                tracing::warn!(node = %path, error = %e, "cannot create the client running node");
                return (None, None);
            }
        }
    }
    (None, None)
}

/// Canal's running node: the server's address (None when absent or released) and a watch for
/// its next change.
async fn read_canal(
    cfg: &HaConfig,
    client: &zk::Client,
) -> Result<(Option<String>, Watch), zk::Error> {
    let path = cfg.server_running_path();
    loop {
        match client.get_and_watch_data(&path).await {
            Ok((data, _, w)) => {
                let addr = match super::running_address(&data) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        tracing::warn!(node = %path, problem = %e, "canal's running node names no server");
                        None
                    }
                };
                return Ok((addr, Box::pin(w.changed())));
            }
            Err(zk::Error::NoNode) => match client.check_and_watch_stat(&path).await? {
                (None, w) => return Ok((None, Box::pin(w.changed()))),
                (Some(_), _) => continue, // created meanwhile: read it
            },
            Err(e) => return Err(e),
        }
    }
}
