//! A TCP proxy in front of the test broker whose client-to-broker direction can be **held**:
//! what the client writes meanwhile is read and kept (its writes succeed, as when they sit in
//! a socket buffer or on a congested path) and reaches the broker, in order, only when the
//! hold is released. The broker-to-client direction can be held the same way
//! ([`HoldProxy::hold_replies`]: the broker takes what is published, and its confirms wait).
//!
//! It counts the AMQP `basic.publish` messages that pass (method, header and body frames all
//! written), and how many of them were written while the hold was on: an independent count of
//! what the client published, taken from the wire.
//!
//! It runs on a thread with a runtime of its own, so a test that blocks its own runtime (a
//! `join`, a script) never stalls the forwarding. Dropping it stops the thread and closes every
//! connection through it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

#[derive(Default)]
struct Counts {
    published: AtomicU64,
    held: AtomicU64,
}

pub struct HoldProxy {
    port: u16,
    /// The broker URL (`CC_TEST_AMQP_URL`) the proxy forwards to.
    target: lapin::uri::AMQPUri,
    hold: watch::Sender<bool>,
    hold_replies: watch::Sender<bool>,
    counts: Arc<Counts>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HoldProxy {
    /// A proxy to the test broker (`super::amqp_url()`, plain AMQP), forwarding.
    pub fn start() -> HoldProxy {
        let target: lapin::uri::AMQPUri = super::amqp_url()
            .parse()
            .unwrap_or_else(|e| panic!("the test broker URL does not parse: {e}"));
        let upstream = format!("{}:{}", target.authority.host, target.authority.port);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let port = listener.local_addr().expect("bound").port();
        let (hold, hold_rx) = watch::channel(false);
        let (hold_replies, replies_rx) = watch::channel(false);
        let counts = Arc::new(Counts::default());
        let (stop, stop_rx) = oneshot::channel();
        let c = Arc::clone(&counts);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the proxy's runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("tokio listener");
                let accept = async {
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            continue;
                        };
                        tokio::spawn(pipe(
                            client,
                            upstream.clone(),
                            hold_rx.clone(),
                            replies_rx.clone(),
                            Arc::clone(&c),
                        ));
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
            });
            // dropping the runtime ends every connection task and closes its sockets
        });
        HoldProxy {
            port,
            target,
            hold,
            hold_replies,
            counts,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The broker URL through the proxy, with AMQP heartbeats every `heartbeat` seconds (a
    /// hold must stay well under two of them, or the broker closes the connection).
    pub fn url(&self, heartbeat: u16) -> String {
        let mut uri = self.target.clone();
        uri.authority.host = "127.0.0.1".into();
        uri.authority.port = self.port;
        uri.query.heartbeat = Some(heartbeat);
        uri.to_string()
    }

    /// From now on, keep what clients write.
    pub fn hold(&self) {
        self.hold.send_replace(true);
    }

    /// Write what was kept to the broker, in order, and forward again.
    pub fn release(&self) {
        self.hold.send_replace(false);
    }

    /// From now on, keep what the broker writes to its clients (confirms, heartbeats: keep the
    /// hold shorter than two heartbeats).
    pub fn hold_replies(&self) {
        self.hold_replies.send_replace(true);
    }

    /// Write what the broker wrote meanwhile to its clients, and forward again.
    pub fn release_replies(&self) {
        self.hold_replies.send_replace(false);
    }

    /// `basic.publish` messages the clients wrote completely so far, held or not.
    pub fn published(&self) -> u64 {
        self.counts.published.load(Ordering::SeqCst)
    }

    /// Of those, the ones completed while the hold was on.
    pub fn held(&self) -> u64 {
        self.counts.held.load(Ordering::SeqCst)
    }
}

impl Drop for HoldProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One client connection, each direction through its hold.
async fn pipe(
    client: TcpStream,
    upstream: String,
    mut hold: watch::Receiver<bool>,
    mut hold_down: watch::Receiver<bool>,
    counts: Arc<Counts>,
) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let (from_client, mut to_client) = client.into_split();
    let (from_server, mut to_server) = server.into_split();
    let down = async move {
        forward(from_server, &mut to_client, &mut hold_down, |_, _| {}).await;
        let _ = to_client.shutdown().await;
    };
    let up = async move {
        let mut publishes = Publishes::default();
        let kept = forward(from_client, &mut to_server, &mut hold, |data, holding| {
            let done = publishes.feed(data);
            counts.published.fetch_add(done, Ordering::SeqCst);
            if holding {
                counts.held.fetch_add(done, Ordering::SeqCst);
            }
        })
        .await;
        // the client closed: what was kept still goes, once released
        if !kept.is_empty() && hold.wait_for(|h| !*h).await.is_ok() {
            let _ = to_server.write_all(&kept).await;
        }
        let _ = to_server.shutdown().await;
    };
    tokio::join!(up, down);
}

/// Copy `from` to `to` until either side fails or `from` closes: what is read while `hold`
/// is on is kept and written, in order, once it is off. `seen` sees every read and whether it
/// was kept. Returns what was still kept when the copy ended.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    hold: &mut watch::Receiver<bool>,
    mut seen: impl FnMut(&[u8], bool),
) -> Vec<u8> {
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            read = from.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let holding = *hold.borrow();
                seen(&buf[..n], holding);
                if holding {
                    kept.extend_from_slice(&buf[..n]);
                    continue;
                }
                if !kept.is_empty() && to.write_all(&kept).await.is_err() {
                    break;
                }
                kept.clear();
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            changed = hold.changed() => {
                if changed.is_err() {
                    break;
                }
                if !*hold.borrow() && !kept.is_empty() {
                    if to.write_all(&kept).await.is_err() {
                        break;
                    }
                    kept.clear();
                }
            }
        }
    }
    kept
}

/// Counts the `basic.publish` messages in a client's byte stream as they complete: the
/// protocol header, then frames of `type(1) channel(2) size(4) payload(size) 0xCE`; a publish
/// is a method frame (class 60, method 40), a content header frame (its body size at bytes
/// 4..12 of the payload) and body frames that add up to that size.
#[derive(Default)]
struct Publishes {
    buf: Vec<u8>,
    started: bool,
    /// Per channel, a publish under way: `None` until its header came, then the body bytes due.
    open: HashMap<u16, Option<u64>>,
}

impl Publishes {
    fn feed(&mut self, data: &[u8]) -> u64 {
        self.buf.extend_from_slice(data);
        let mut at = 0;
        if !self.started {
            if self.buf.len() < 8 {
                return 0;
            }
            at = 8; // "AMQP\0\0\x09\x01"
            self.started = true;
        }
        let mut done = 0;
        while self.buf.len() - at >= 7 {
            let f = &self.buf[at..];
            let kind = f[0];
            let channel = u16::from_be_bytes([f[1], f[2]]);
            let size = u32::from_be_bytes([f[3], f[4], f[5], f[6]]) as usize;
            if f.len() < 7 + size + 1 {
                break;
            }
            let payload = &f[7..7 + size];
            match kind {
                1 if payload.starts_with(&[0, 60, 0, 40]) => {
                    self.open.insert(channel, None);
                }
                2 if payload.len() >= 12 && self.open.get(&channel) == Some(&None) => {
                    let mut body = [0u8; 8];
                    body.copy_from_slice(&payload[4..12]);
                    let body = u64::from_be_bytes(body);
                    if body == 0 {
                        self.open.remove(&channel);
                        done += 1;
                    } else {
                        self.open.insert(channel, Some(body));
                    }
                }
                3 => {
                    if let Some(Some(due)) = self.open.get(&channel).copied() {
                        let due = due.saturating_sub(size as u64);
                        if due == 0 {
                            self.open.remove(&channel);
                            done += 1;
                        } else {
                            self.open.insert(channel, Some(due));
                        }
                    }
                }
                _ => {}
            }
            at += 7 + size + 1;
        }
        self.buf.drain(..at);
        done
    }
}
