//! `canal-consumer dlq list | show ID | replay [--consumer NAME] [--id ID] | purge`: the parked
//! events in the dead-letter queue (`<amqp.queue.name>.dead_letter`).
//!
//! `list` and `show` read the queue without consuming it (every message is fetched
//! unacknowledged and returned to the queue when the channel closes). `replay` runs each parked
//! event through the *current* definition of its consumer and publishes the result with
//! publisher confirms; the trigger ids are the original ones (they derive from the event), so
//! workers that drop duplicates are safe. A dead letter leaves the queue only once its replay is
//! confirmed; one that still fails stays, and the command says why. `purge` empties the queue.
//!
//! Failures: a broker that cannot be reached is exit code 1 with the broker's words; a dead
//! letter that is not ours (no `event`) is reported and left alone.

use crate::config::{Config, redact_url};
use crate::consumer::dead_letter_queue;
use crate::event::ChangeEvent;
use crate::publisher::{AmqpPublisher, Publish};
use crate::rules::{self, ConfigConsumer, ConsumerSpec};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};
use lapin::{Channel, Connection, ConnectionProperties};
use std::fmt::Write as _;

/// What to do with the dead-letter queue.
#[derive(Debug, Clone)]
pub enum Action {
    List,
    Show(String),
    Replay {
        consumer: Option<String>,
        id: Option<String>,
    },
    Purge,
}

/// Most messages one command looks at.
const MAX_MESSAGES: usize = 100_000;

/// One parked message as read from the queue.
struct Parked {
    tag: u64,
    id: String,
    body: serde_json::Value,
}

impl Parked {
    fn payload(&self) -> &serde_json::Value {
        &self.body["payload"]
    }
    fn consumer(&self) -> &str {
        self.payload()["consumer"].as_str().unwrap_or("-")
    }
}

async fn open(cfg: &Config) -> Result<(Connection, Channel), String> {
    let broker = redact_url(cfg.amqp.url.expose());
    let conn = crate::publisher::connect::connect_any(&cfg.amqp, ConnectionProperties::default())
        .await
        .map_err(|e| format!("cannot connect to the broker: {e}"))?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| format!("cannot open a channel on {broker}: {e}"))?;
    Ok((conn, channel))
}

/// Fetch every message (unacknowledged) from `queue`.
async fn fetch_all(channel: &Channel, queue: &str) -> Result<Vec<Parked>, String> {
    let mut out = Vec::new();
    while out.len() < MAX_MESSAGES {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| format!("cannot read {queue}: {e}"))?;
        let Some(msg) = got else { break };
        let id = crate::publisher::message_id_of(&msg.delivery.properties);
        let body = serde_json::from_slice(&msg.delivery.data).unwrap_or(serde_json::Value::Null);
        out.push(Parked {
            tag: msg.delivery.delivery_tag,
            id,
            body,
        });
    }
    Ok(out)
}

fn one_line(p: &Parked) -> String {
    let pl = p.payload();
    let ev = &pl["event"];
    let pos = &ev["position"];
    let error: String = pl["error"]
        .as_str()
        .unwrap_or("-")
        .chars()
        .take(80)
        .collect();
    format!(
        "{:<36}  {:<20}  {:<16}  {:<28}  {}:{}#{}  {}",
        p.id,
        p.consumer(),
        pl["rule"].as_str().unwrap_or("-"),
        format!(
            "{}.{}",
            ev["database"].as_str().unwrap_or("?"),
            ev["table"].as_str().unwrap_or("?")
        ),
        pos["log_file"].as_str().unwrap_or("?"),
        pos["offset"],
        pos["row_index"],
        error.replace(['\n', '\r'], " ")
    )
}

/// Run a `dlq` subcommand; returns the exit code.
pub fn run(cfg: Config, specs: Vec<ConsumerSpec>, action: Action) -> i32 {
    let queue = dead_letter_queue(&cfg.amqp.queue.name);
    let sys = actix::System::new();
    let res = sys.block_on(async move { act(&cfg, specs, &queue, action).await });
    match res {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

async fn act(
    cfg: &Config,
    specs: Vec<ConsumerSpec>,
    queue: &str,
    action: Action,
) -> Result<String, String> {
    let (conn, channel) = open(cfg).await?;
    let mut out = String::new();
    match action {
        Action::Purge => {
            let n = channel
                .queue_purge(queue.into(), QueuePurgeOptions::default())
                .await
                .map_err(|e| format!("cannot purge {queue}: {e}"))?;
            let _ = writeln!(out, "{queue}: purged {n} parked messages");
        }
        Action::List => {
            let all = fetch_all(&channel, queue).await?;
            let _ = writeln!(out, "{queue}: {} parked", all.len());
            if !all.is_empty() {
                let _ = writeln!(
                    out,
                    "{:<36}  {:<20}  {:<16}  {:<28}  POSITION  ERROR",
                    "ID", "CONSUMER", "RULE", "TABLE"
                );
            }
            for p in &all {
                let _ = writeln!(out, "{}", one_line(p));
            }
        }
        Action::Show(id) => {
            let all = fetch_all(&channel, queue).await?;
            let Some(p) = all.iter().find(|p| p.id == id) else {
                return Err(format!("no parked message with id {id} in {queue}"));
            };
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&p.body).unwrap_or_default()
            );
        }
        Action::Replay { consumer, id } => {
            let all = fetch_all(&channel, queue).await?;
            let publisher = AmqpPublisher::start_checked(cfg.amqp.clone())
                .await
                .map_err(|e| e.to_string())?;
            let route = crate::service::default_route(cfg);
            let (mut replayed, mut kept) = (0, 0);
            for p in all.iter().filter(|p| {
                consumer.as_deref().is_none_or(|c| c == p.consumer())
                    && id.as_deref().is_none_or(|i| i == p.id)
            }) {
                match replay_one(p, &specs, route.clone(), &publisher).await {
                    Ok(n) => {
                        channel
                            .basic_ack(p.tag, BasicAckOptions::default())
                            .await
                            .map_err(|e| format!("cannot remove {} from {queue}: {e}", p.id))?;
                        replayed += 1;
                        let _ = writeln!(out, "replayed {} ({} messages published)", p.id, n);
                    }
                    Err(why) => {
                        kept += 1;
                        let _ = writeln!(out, "kept {}: {why}", p.id);
                    }
                }
            }
            let _ = writeln!(out, "{replayed} replayed, {kept} kept in {queue}");
        }
    }
    // unacknowledged messages return to the queue
    let _ = channel.close(200, "dlq done".into()).await;
    let _ = conn.close(200, "dlq done".into()).await;
    Ok(out)
}

/// Run one parked event through its consumer's current definition and publish the result.
async fn replay_one(
    p: &Parked,
    specs: &[ConsumerSpec],
    route: crate::trigger::Route,
    publisher: &actix::Addr<AmqpPublisher>,
) -> Result<usize, String> {
    let event: ChangeEvent = serde_json::from_value(p.payload()["event"].clone())
        .map_err(|e| format!("not a parked event of ours ({e})"))?;
    let name = p.consumer();
    let spec = specs
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| format!("consumer {name} is not defined any more"))?;
    let mut consumer = ConfigConsumer::new(spec.clone());
    let run = rules::run_on_events_routed(&mut consumer, std::slice::from_ref(&event), route);
    if let Some((_, error)) = run.stopped {
        return Err(format!("consumer {name} still fails on it: {error}"));
    }
    if run.matched == 0 {
        return Err(format!("consumer {name}'s filters no longer match it"));
    }
    let mut triggers = run.triggers;
    // a trigger the broker could not route: only that one goes out again (the others of the
    // event were delivered when it was parked)
    if let Some(original) = p.payload()["original_id"].as_str()
        && triggers.iter().any(|t| t.id == original)
    {
        triggers.retain(|t| t.id == original);
    }
    let n = triggers.len();
    let (tx, rx) = tokio::sync::oneshot::channel();
    publisher
        .send(Publish {
            triggers,
            epoch: 1,
            reply: tx,
        })
        .await
        .map_err(|e| format!("publisher: {e}"))?;
    match rx.await {
        Ok(Ok(())) => Ok(n),
        Ok(Err(e)) => Err(format!("publish failed: {e}")),
        Err(_) => Err("the publisher went away".into()),
    }
}
