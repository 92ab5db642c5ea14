//! Byte-level fault injection against the Canal session, and the order of what the connection
//! writes (acks before a long poll) and when it says it is drained, using a fake server on
//! loopback.
//! The real-server behaviour is covered by `canal_real_server.rs`; these cases are ones a real
//! server will not produce on demand.
// Test code: a failed unwrap is a failed test (lint policy: Cargo.toml [lints], clippy.toml).
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use canal_consumer::canal::codec::FrameError;
use canal_consumer::canal::proto::packet::{Ack, Handshake, Messages, Packet, PacketType};
use canal_consumer::canal::{CanalError, Session, SessionConfig};
use prost::Message;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn config(port: u16, max_frame_bytes: usize) -> SessionConfig {
    SessionConfig {
        host: "127.0.0.1".into(),
        port,
        destination: "example".into(),
        client_id: "1001".into(),
        username: "canal".into(),
        password: "canal".into(),
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
        max_frame_bytes,
    }
}

fn frame(packet: Packet) -> Vec<u8> {
    let body = packet.encode_to_vec();
    let mut out = (body.len() as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

fn packet(kind: PacketType, body: Vec<u8>) -> Packet {
    Packet {
        version: Some(1),
        r#type: kind as i32,
        body: body.into(),
        ..Default::default()
    }
}

fn ok_ack() -> Vec<u8> {
    frame(Packet {
        version: Some(1),
        r#type: PacketType::Ack as i32,
        ..Default::default()
    })
}

fn error_ack(code: i32, msg: &str) -> Vec<u8> {
    frame(packet(
        PacketType::Ack,
        Ack {
            error_code: Some(code),
            error_message: msg.into(),
        }
        .encode_to_vec(),
    ))
}

async fn read_frame(s: &mut TcpStream) -> Option<Packet> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.ok()?;
    let mut body = vec![0u8; i32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.ok()?;
    Packet::decode(Bytes::from(body)).ok()
}

/// Accept one client: send the handshake, read its auth and answer it with `auth_reply`.
async fn accept_login(listener: TcpListener, auth_reply: &[u8]) -> TcpStream {
    let (mut s, _) = listener.accept().await.unwrap();
    let hs = Handshake {
        seeds: vec![1, 2, 3, 4, 5, 6, 7, 8].into(),
        ..Default::default()
    };
    s.write_all(&frame(packet(PacketType::Handshake, hs.encode_to_vec())))
        .await
        .unwrap();
    let auth = read_frame(&mut s).await.unwrap();
    assert_eq!(auth.r#type, PacketType::ClientAuthentication as i32);
    s.write_all(auth_reply).await.unwrap();
    s
}

/// A fake server: handshake, accept auth (or reply `auth_reply`), accept a subscribe, then
/// answer the first GET with `get_reply` raw bytes and keep the socket open (or close it).
async fn fake_server(auth_reply: Vec<u8>, get_reply: Vec<u8>, close_after: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut s = accept_login(listener, &auth_reply).await;
        while let Some(p) = read_frame(&mut s).await {
            match PacketType::try_from(p.r#type).unwrap() {
                PacketType::Subscription => s.write_all(&ok_ack()).await.unwrap(),
                PacketType::Get => {
                    s.write_all(&get_reply).await.unwrap();
                    if close_after {
                        return;
                    }
                }
                _ => {}
            }
        }
    });
    port
}

async fn get_with(get_reply: Vec<u8>, close_after: bool, max: usize) -> CanalError {
    let port = fake_server(ok_ack(), get_reply, close_after).await;
    let mut session = Session::connect(&config(port, max))
        .await
        .expect("connects");
    session.subscribe("").await.expect("subscribes");
    session
        .get(100, Duration::from_millis(10))
        .await
        .expect_err("the GET must fail")
}

#[tokio::test]
async fn a_frame_over_the_cap_is_rejected_without_allocating_it() {
    // announce 1 GiB; the cap is 1 MiB
    let reply = (1i32 << 30).to_be_bytes().to_vec();
    let err = get_with(reply, false, 1 << 20).await;
    assert!(
        matches!(
            err,
            CanalError::Frame(FrameError::TooLarge {
                len: 1073741824,
                max: 1048576
            })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("exceeds the maximum"), "{err}");
}

#[tokio::test]
async fn a_truncated_frame_is_reported() {
    let mut reply = frame(packet(
        PacketType::Messages,
        Messages {
            batch_id: 3,
            messages: vec![Bytes::from_static(b"xxxxxxxxxxxx")],
        }
        .encode_to_vec(),
    ));
    reply.truncate(reply.len() - 5);
    let err = get_with(reply, true, 1 << 20).await;
    assert!(
        matches!(err, CanalError::Frame(FrameError::Truncated { .. })),
        "{err}"
    );
}

#[tokio::test]
async fn garbage_bytes_are_a_protocol_error() {
    let body = b"\xff\xff\xff\xff\xff\xff\xff".to_vec();
    let mut reply = (body.len() as i32).to_be_bytes().to_vec();
    reply.extend_from_slice(&body);
    let err = get_with(reply, false, 1 << 20).await;
    assert!(
        matches!(err, CanalError::Protobuf { what: "Packet", .. }),
        "{err}"
    );
    // a negative length is garbage too
    let err = get_with(vec![0x80, 0, 0, 1], false, 1 << 20).await;
    assert!(
        matches!(err, CanalError::Frame(FrameError::NegativeLength(_))),
        "{err}"
    );
}

#[tokio::test]
async fn an_error_ack_in_place_of_messages_is_a_server_error() {
    // what Canal sends unsolicited after a bad CLIENTACK, read as the GET's answer
    let reply = error_ack(400, "batchId:7 is not the firstly:5\n\tat com.alibaba...");
    let err = get_with(reply, false, 1 << 20).await;
    match err {
        CanalError::Server {
            code,
            ref message,
            ref destination,
            ..
        } => {
            assert_eq!(code, 400);
            assert_eq!(message, "batchId:7 is not the firstly:5");
            assert_eq!(destination, "example");
        }
        other => panic!("unexpected {other}"),
    }
}

#[tokio::test]
async fn a_rejected_login_names_the_destination_and_user() {
    let port = fake_server(error_ack(400, "auth failed for user:canal"), vec![], false).await;
    let err = match Session::connect(&config(port, 1 << 20)).await {
        Err(e) => e,
        Ok(_) => panic!("login must fail"),
    };
    assert!(matches!(err, CanalError::Auth { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("destination 'example'"), "{text}");
    assert!(text.contains("user 'canal'"), "{text}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn a_silent_server_hits_the_read_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _keep = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        // never says anything
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    });
    let mut cfg = config(port, 1 << 20);
    cfg.read_timeout = Duration::from_millis(200);
    let err = match Session::connect(&cfg).await {
        Err(e) => e,
        Ok(_) => panic!("must time out"),
    };
    assert!(
        matches!(
            err,
            CanalError::Timeout {
                during: "waiting for the handshake",
                ..
            }
        ),
        "{err}"
    );
}

/// What a scripted server saw, in order.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// A GET: its fetch size and server-side wait (ms; -1: none).
    Get {
        size: i32,
        wait: i64,
    },
    Ack(i64),
    Other(PacketType),
}

/// A server that answers the first GET with batch 1 (one row; once `hold` fires, if given),
/// every later GET that does not wait with "nothing", and holds every waiting GET (a long poll)
/// unanswered; it reports every packet after the handshake on `seen`.
async fn scripted_server(
    seen: tokio::sync::mpsc::UnboundedSender<Seen>,
    mut hold: Option<tokio::sync::oneshot::Receiver<()>>,
) -> u16 {
    use canal_consumer::canal::proto::entry::{
        Column, Entry, EntryType, EventType, Header, RowChange, RowData,
    };
    use canal_consumer::canal::proto::packet::Get;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut s = accept_login(listener, &ok_ack()).await;
        let row = RowChange {
            event_type: Some(EventType::Insert as i32),
            row_datas: vec![RowData {
                after_columns: vec![Column {
                    name: "id".into(),
                    value: "1".into(),
                    sql_type: 4,
                    mysql_type: "int(11)".into(),
                    is_key: true,
                    updated: true,
                    is_null: Some(false),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let entry = Entry {
            header: Some(Header {
                logfile_name: "mysql-bin.000001".into(),
                logfile_offset: 4,
                schema_name: "db".into(),
                table_name: "t".into(),
                execute_time: 1_700_000_000_000,
                event_type: Some(EventType::Insert as i32),
                ..Default::default()
            }),
            entry_type: Some(EntryType::RowData as i32),
            store_value: row.encode_to_vec().into(),
        };
        let mut gets = 0;
        while let Some(p) = read_frame(&mut s).await {
            let kind = PacketType::try_from(p.r#type).unwrap();
            let _ = seen.send(match kind {
                PacketType::Get => {
                    let g = Get::decode(p.body.clone()).unwrap();
                    Seen::Get {
                        size: g.fetch_size,
                        wait: g.timeout.unwrap_or(0),
                    }
                }
                PacketType::ClientAck => Seen::Ack(
                    canal_consumer::canal::proto::packet::ClientAck::decode(p.body.clone())
                        .unwrap()
                        .batch_id,
                ),
                other => Seen::Other(other),
            });
            match kind {
                PacketType::Subscription => s.write_all(&ok_ack()).await.unwrap(),
                PacketType::Get => {
                    gets += 1;
                    let g = Get::decode(p.body).unwrap();
                    let (batch_id, messages) = if gets == 1 {
                        if let Some(hold) = hold.take() {
                            let _ = hold.await;
                        }
                        (1, vec![Bytes::from(entry.encode_to_vec())])
                    } else if g.timeout == Some(-1) {
                        (-1, vec![])
                    } else {
                        continue; // a long poll: held
                    };
                    let m = Messages { batch_id, messages };
                    s.write_all(&frame(packet(PacketType::Messages, m.encode_to_vec())))
                        .await
                        .unwrap();
                }
                _ => {}
            }
        }
    });
    port
}

/// Acks every batch it gets (if `ack`) and counts them.
struct Subscriber {
    conn: Option<actix::Addr<canal_consumer::canal::connection::CanalConnection>>,
    ack: bool,
    got: tokio::sync::mpsc::UnboundedSender<()>,
}

impl actix::Actor for Subscriber {
    type Context = actix::Context<Self>;
}

impl actix::Handler<canal_consumer::canal::connection::CanalEvent> for Subscriber {
    type Result = ();
    fn handle(
        &mut self,
        msg: canal_consumer::canal::connection::CanalEvent,
        _: &mut Self::Context,
    ) {
        if let canal_consumer::canal::connection::CanalEvent::Batch(b) = msg {
            let _ = self.got.send(());
            if self.ack
                && let Some(c) = &self.conn
            {
                c.do_send(canal_consumer::canal::connection::AckBatch(b.batch));
            }
        }
    }
}

#[derive(actix::Message)]
#[rtype(result = "()")]
struct SetConn(actix::Addr<canal_consumer::canal::connection::CanalConnection>);

impl actix::Handler<SetConn> for Subscriber {
    type Result = ();
    fn handle(&mut self, msg: SetConn, _: &mut Self::Context) {
        self.conn = Some(msg.0);
    }
}

type Conn = actix::Addr<canal_consumer::canal::connection::CanalConnection>;

/// A connection to the scripted server on `port` and its subscriber (acking every batch if
/// `ack`); the subscriber reports each batch it gets on the returned receiver. The long poll
/// waits `waits.0` (`canal.fetch_wait`) on the server, and up to `waits.1`
/// (`canal.ack_wait`) for the acks in flight before it goes out.
fn connect(
    port: u16,
    ack: bool,
    (fetch_wait, ack_wait): (Duration, Duration),
) -> (Conn, tokio::sync::mpsc::UnboundedReceiver<()>) {
    use actix::Actor;
    let cfg = canal_consumer::config::CanalConfig {
        port: std::num::NonZeroU16::new(port).unwrap(),
        username: "canal".into(),
        password: canal_consumer::config::Secret::new("canal"),
        fetch_wait,
        ack_wait,
        ..Default::default()
    };
    let (got_tx, got) = tokio::sync::mpsc::unbounded_channel();
    let sub = Subscriber {
        conn: None,
        ack,
        got: got_tx,
    }
    .start();
    let conn = canal_consumer::canal::connection::CanalConnection::new(
        cfg.connection("db\\.t".into(), false),
        sub.clone().recipient(),
    )
    .start();
    sub.do_send(SetConn(conn.clone()));
    (conn, got)
}

/// The next packet the scripted server saw that is not `Other`, within 30 s.
async fn next_seen(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Seen>) -> Seen {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("the server saw nothing more within 30 s")
            .expect("server alive")
        {
            Seen::Other(_) => continue,
            s => return s,
        }
    }
}

/// Runs the connection against the scripted server until it writes its first long poll;
/// returns what the server saw up to and including it.
async fn until_the_long_poll(ack: bool, waits: (Duration, Duration)) -> Vec<Seen> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let port = scripted_server(tx, None).await;
    let (_conn, mut got) = connect(port, ack, waits);
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no long poll within 30 s; saw {seen:?}"))
            .expect("server alive");
        let long_poll = matches!(s, Seen::Get { wait, .. } if wait > 0);
        seen.push(s);
        if long_poll {
            break;
        }
    }
    assert!(got.try_recv().is_ok(), "the batch reached the subscriber");
    seen
}

/// Caught up with a batch unconfirmed, the connection does not long-poll (an ack written
/// behind a long poll waits until Canal answers it, up to `fetch_wait`): the ack goes first,
/// in the same turn.
#[actix_rt::test]
async fn the_ack_goes_out_before_the_long_poll() {
    // an ack wait as long as the poll's, so that a slow machine cannot end it first
    let ten = Duration::from_secs(10);
    let seen = until_the_long_poll(true, (ten, ten)).await;
    let tail: Vec<_> = seen
        .iter()
        .filter(|s| !matches!(s, Seen::Other(_)))
        .cloned()
        .collect();
    // the first GET takes batch 1 (one row: a short answer), then the ack, then the long poll
    assert_eq!(
        tail,
        [
            Seen::Get {
                size: 100,
                wait: -1
            },
            Seen::Ack(1),
            Seen::Get {
                size: 1,
                wait: 10_000
            },
        ],
        "{seen:?}"
    );
}

/// A batch that is never confirmed (stuck downstream, or a backfill chunk's many rows) does not
/// stop the fetching: after `ack_wait` the long poll goes out without its ack.
#[actix_rt::test]
async fn a_batch_never_acked_delays_the_long_poll_by_the_ack_wait_only() {
    let waits = (Duration::from_secs(10), Duration::from_millis(200));
    let seen = until_the_long_poll(false, waits).await;
    assert!(!seen.iter().any(|s| matches!(s, Seen::Ack(_))), "{seen:?}");
    assert_eq!(
        seen.last(),
        Some(&Seen::Get {
            size: 1,
            wait: 10_000
        })
    );
}

/// A GET written just before a drain (graceful shutdown) began can still bring a batch. The
/// drain ends only once that batch has been delivered and acked: the service stops the
/// publisher when the drain ends, so a batch arriving after it would be fetched and never acked
/// (seen in `pipeline_real::sigterm_mid_stream_exits_in_time_and_loses_nothing`; the
/// simulation's invariant (h)).
#[actix_rt::test]
async fn a_drain_waits_for_the_answer_of_the_get_on_the_wire() {
    use canal_consumer::canal::connection::{Drain, GetConnectionStatus};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (release, hold) = tokio::sync::oneshot::channel();
    let port = scripted_server(tx, Some(hold)).await;
    let ten = Duration::from_secs(10);
    let (conn, mut got) = connect(port, true, (ten, ten));
    // the first GET is on the wire, and the server holds it
    assert_eq!(
        next_seen(&mut rx).await,
        Seen::Get {
            size: 100,
            wait: -1
        }
    );
    let mut drain = Box::pin(conn.send(Drain));
    // two round trips through the connection's mailbox: the Drain was handled, and on this
    // single-threaded runtime any answer it had was sent by now
    for _ in 0..2 {
        conn.send(GetConnectionStatus).await.unwrap();
    }
    assert!(
        futures::poll!(drain.as_mut()).is_pending(),
        "the drain ended with a GET on the wire"
    );
    release.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), drain)
        .await
        .expect("the drain ends once the batch is acked")
        .unwrap();
    assert!(
        got.try_recv().is_ok(),
        "the batch reached the subscriber before the drain ended"
    );
    // its ack was written, and no GET after it: draining fetches nothing more
    assert_eq!(next_seen(&mut rx).await, Seen::Ack(1));
    assert!(rx.try_recv().is_err(), "nothing after the ack");
}
