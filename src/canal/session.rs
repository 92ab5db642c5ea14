//! One Canal TCP session: handshake, authentication, subscribe, get, ack, rollback.
//!
//! A [`Session`] owns the socket and speaks strictly request/response, with a deadline on every
//! read, so a dead server is noticed by timeout rather than by hanging. It always sends the
//! GET `timeout` and `unit` fields (an absent timeout makes Canal block without limit). CLIENTACK
//! and CLIENTROLLBACK get no reply on success; if Canal rejects one, its error ACK arrives in
//! place of the next response, and the session reports it as a [`CanalError::Server`]: the
//! connection is then out of step and must be dropped, which is what the connection actor does.

use crate::canal::CanalError;
use crate::canal::auth::scramble;
use crate::canal::codec::FrameCodec;
use crate::canal::decode::wire;
use crate::canal::proto::packet::{
    Ack, ClientAck, ClientAuth, ClientRollback, Compression, Get, Handshake, Messages, Packet,
    PacketType, Sub,
};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// TimeUnit ordinal for milliseconds in Canal's GET.
const UNIT_MILLIS: i32 = 2;

/// Everything needed to open a session.
#[derive(Clone)]
pub struct SessionConfig {
    pub host: String,
    pub port: u16,
    pub destination: String,
    /// Canal client id; must be a decimal i16. Canal clients use 1001.
    pub client_id: String,
    pub username: String,
    pub password: String,
    pub connect_timeout: Duration,
    /// Deadline for any response, on top of the GET wait.
    pub read_timeout: Duration,
    /// The server closes the session after this long without a request.
    pub idle_timeout: Duration,
    pub max_frame_bytes: usize,
}

impl std::fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("destination", &self.destination)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field(
                "password",
                &if self.password.is_empty() { "" } else { "***" },
            )
            .finish_non_exhaustive()
    }
}

impl SessionConfig {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// The raw result of a GET: a batch id and its undecoded entries.
#[derive(Debug, Clone)]
pub struct RawBatch {
    /// `-1` when nothing was available.
    pub batch_id: i64,
    pub entries: Vec<Bytes>,
    /// Size of the MESSAGES frame body.
    pub frame_bytes: usize,
    /// The `fetch_size` the GET asked for (Canal's units): with the entries' sizes it tells a
    /// short answer from a cut one (`canal::window::took_all`).
    pub asked: i32,
}

/// What [`Session::get_skipping_oversized`] got.
#[derive(Debug)]
pub enum Fetch {
    Batch(RawBatch),
    Skipped(SkippedFrame),
}

/// An over-cap frame that was read past without being buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkippedFrame {
    pub batch_id: i64,
    pub frame_bytes: usize,
}

/// Read a frame header; if it announces more than `cap`, read past the frame (if `expected` is
/// given, it must announce exactly that many bytes), keeping only its head. `Ok(None)`: the frame is within the cap and
/// still unread (header included) in `buf`.
async fn skip_frame(
    io: &mut TcpStream,
    buf: &mut bytes::BytesMut,
    cap: usize,
    expected: Option<usize>,
) -> Result<Option<SkippedFrame>, CanalError> {
    use bytes::Buf as _;
    use tokio::io::AsyncReadExt as _;
    const HEAD: usize = 256;
    let addr = io.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let closed = || CanalError::Closed {
        addr: addr.clone(),
        during: "skipping an oversized frame",
    };
    while buf.len() < 4 {
        if io.read_buf(buf).await.map_err(io_error)? == 0 {
            return Err(closed());
        }
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let len = usize::try_from(len)
        .map_err(|_| CanalError::Frame(crate::canal::codec::FrameError::NegativeLength(len)))?;
    if len <= cap {
        return Ok(None);
    }
    if let Some(expected) = expected
        && len != expected
    {
        return Err(CanalError::SkipMismatch { expected, got: len });
    }
    let head_len = HEAD.min(len);
    while buf.len() < 4 + head_len {
        if io.read_buf(buf).await.map_err(io_error)? == 0 {
            return Err(closed());
        }
    }
    let batch_id =
        wire::batch_id_from_head(&buf[4..4 + head_len]).ok_or(CanalError::SkipNoBatchId)?;
    // drop what is buffered of this frame, then read and discard the rest
    let buffered = (buf.len() - 4).min(len);
    buf.advance(4 + buffered);
    let mut remaining = len - buffered;
    let mut scratch = vec![0u8; 64 * 1024];
    while remaining > 0 {
        let want = remaining.min(scratch.len());
        let n = io.read(&mut scratch[..want]).await.map_err(io_error)?;
        if n == 0 {
            return Err(closed());
        }
        remaining -= n;
    }
    Ok(Some(SkippedFrame {
        batch_id,
        frame_bytes: len,
    }))
}

fn io_error(e: std::io::Error) -> CanalError {
    CanalError::Frame(crate::canal::codec::FrameError::Io(e))
}

impl RawBatch {
    pub fn is_empty(&self) -> bool {
        self.batch_id == -1
    }
}

/// An authenticated session.
pub struct Session {
    framed: Framed<TcpStream, FrameCodec>,
    cfg: SessionConfig,
    addr: String,
    /// The server-side wait of the last GET (its answer may take that long).
    last_wait: Duration,
}

impl Session {
    /// Connects, reads the handshake and authenticates. Subscribing is a separate step.
    pub async fn connect(cfg: &SessionConfig) -> Result<Session, CanalError> {
        let addr = cfg.addr();
        let stream = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| CanalError::Timeout {
                addr: addr.clone(),
                during: "connecting",
                after: cfg.connect_timeout,
            })?
            .map_err(|source| CanalError::Connect {
                addr: addr.clone(),
                source,
            })?;
        stream.set_nodelay(true).ok();
        let mut session = Session {
            framed: Framed::new(stream, FrameCodec::new(cfg.max_frame_bytes)),
            cfg: cfg.clone(),
            addr,
            last_wait: Duration::ZERO,
        };
        let handshake = session
            .read_packet("waiting for the handshake", cfg.read_timeout)
            .await?;
        if handshake.r#type != PacketType::Handshake as i32 {
            return Err(CanalError::Unexpected {
                expected: "HANDSHAKE",
                got: packet_type_name(handshake.r#type),
            });
        }
        let hs = Handshake::decode(handshake.body).map_err(|source| CanalError::Protobuf {
            what: "Handshake",
            source,
        })?;
        let idle_ms = cfg.idle_timeout.as_millis().min(i32::MAX as u128) as i32;
        let auth = ClientAuth {
            username: cfg.username.clone(),
            password: scramble(&cfg.password, &hs.seeds).into_bytes().into(),
            net_read_timeout: Some(idle_ms),
            net_write_timeout: Some(idle_ms),
            ..Default::default()
        };
        session
            .write(PacketType::ClientAuthentication, auth.encode_to_vec())
            .await?;
        // Read the auth ACK before sending anything else: until Canal has written it, any frame
        // is parsed as another ClientAuth.
        match session.read_ack("authenticating", cfg.read_timeout).await {
            Ok(()) => Ok(session),
            Err(CanalError::Server { code, message, .. }) => Err(CanalError::Auth {
                destination: cfg.destination.clone(),
                user: cfg.username.clone(),
                code,
                message,
            }),
            Err(CanalError::Closed { .. }) => Err(CanalError::Auth {
                destination: cfg.destination.clone(),
                user: cfg.username.clone(),
                code: 0,
                message: "the server closed the connection during authentication \
                          (is canal.passwd the hex SHA1(SHA1(password)) hash?)"
                    .into(),
            }),
            Err(e) => Err(e),
        }
    }

    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// Subscribes this client to the destination. An empty filter keeps the server's own table
    /// filter; a non-empty one replaces it (Canal persists it with the subscription).
    pub async fn subscribe(&mut self, filter: &str) -> Result<(), CanalError> {
        let sub = Sub {
            destination: self.cfg.destination.clone(),
            client_id: self.cfg.client_id.clone(),
            filter: filter.to_string(),
        };
        self.write(PacketType::Subscription, sub.encode_to_vec())
            .await?;
        self.read_ack("subscribing", self.cfg.read_timeout).await
    }

    /// A GET without ack for up to `fetch_size`, letting the server wait up to `wait`.
    fn get_request(&self, fetch_size: i32, wait: Duration) -> Get {
        let wait_ms = wait.as_millis().min(i64::MAX as u128) as i64;
        Get {
            destination: self.cfg.destination.clone(),
            client_id: self.cfg.client_id.clone(),
            fetch_size: fetch_size.max(1),
            // -1 is Canal's "do not wait"; 0 would mean "wait forever".
            timeout: Some(if wait_ms == 0 { -1 } else { wait_ms }),
            unit: Some(UNIT_MILLIS),
            auto_ack: Some(false),
        }
    }

    /// Fetches up to `fetch_size` (Canal's unit: the server's memunit in MEMSIZE mode, entries
    /// in ITEMSIZE mode) without acking, letting the server wait up to `wait` for data.
    pub async fn get(&mut self, fetch_size: i32, wait: Duration) -> Result<RawBatch, CanalError> {
        let get = self.get_request(fetch_size, wait);
        self.write(PacketType::Get, get.encode_to_vec()).await?;
        self.last_wait = wait;
        self.read_messages(fetch_size).await
    }

    /// Read the MESSAGES answer to a GET for `asked` units.
    async fn read_messages(&mut self, asked: i32) -> Result<RawBatch, CanalError> {
        let packet = self
            .read_packet(
                "waiting for MESSAGES",
                self.last_wait + self.cfg.read_timeout,
            )
            .await?;
        match PacketType::try_from(packet.r#type) {
            Ok(PacketType::Messages) => {
                check_compression(&packet)?;
                let frame_bytes = packet.body.len();
                let msgs =
                    Messages::decode(packet.body).map_err(|source| CanalError::Protobuf {
                        what: "Messages",
                        source,
                    })?;
                Ok(RawBatch {
                    batch_id: msgs.batch_id,
                    entries: msgs.messages,
                    frame_bytes,
                    asked,
                })
            }
            Ok(PacketType::Ack) => {
                let ack = decode_ack(&packet.body)?;
                Err(self.server_error("fetching a batch", ack))
            }
            _ => Err(CanalError::Unexpected {
                expected: "MESSAGES",
                got: packet_type_name(packet.r#type),
            }),
        }
    }

    /// Fetch like [`Session::get`], except that a MESSAGES frame over the size cap (announcing
    /// exactly `oversized_len` bytes, when given) is *skipped*: only its head is read (to learn
    /// the batch id, which Canal writes first), the rest is read and discarded without being
    /// buffered. The caller must ack the returned batch id to move past it. A frame within the
    /// cap is returned as usual; an over-cap frame of another size than `oversized_len` is an
    /// error (what was approved for skipping is not what arrived).
    pub async fn get_skipping_oversized(
        self,
        fetch_size: i32,
        wait: Duration,
        oversized_len: Option<usize>,
    ) -> (Session, Result<Fetch, CanalError>) {
        let mut session = self;
        let get = session.get_request(fetch_size, wait);
        if let Err(e) = session.write(PacketType::Get, get.encode_to_vec()).await {
            return (session, Err(e));
        }
        let Session {
            framed,
            cfg,
            addr,
            last_wait: _,
        } = session;
        let cap = framed.codec().max_frame_bytes();
        let mut parts = framed.into_parts();
        let limit = wait + cfg.read_timeout;
        let res = tokio::time::timeout(
            limit,
            skip_frame(&mut parts.io, &mut parts.read_buf, cap, oversized_len),
        )
        .await
        .unwrap_or_else(|_| {
            Err(CanalError::Timeout {
                addr: addr.clone(),
                during: "skipping an oversized frame",
                after: limit,
            })
        });
        let mut session = Session {
            framed: Framed::from_parts(parts),
            cfg,
            addr,
            last_wait: wait,
        };
        let res = match res {
            Ok(Some(skipped)) => Ok(Fetch::Skipped(skipped)),
            // within the cap: an ordinary frame, read through the codec as usual
            Ok(None) => session.read_messages(fetch_size).await.map(Fetch::Batch),
            Err(e) => Err(e),
        };
        (session, res)
    }

    /// Acknowledges one batch. Canal requires acks one by one in the order batches were got.
    pub async fn ack(&mut self, batch_id: i64) -> Result<(), CanalError> {
        let ack = ClientAck {
            destination: self.cfg.destination.clone(),
            client_id: self.cfg.client_id.clone(),
            batch_id,
        };
        self.write(PacketType::ClientAck, ack.encode_to_vec()).await
    }

    /// Rolls back `batch_id`, or every outstanding batch when it is 0. The next GET redelivers.
    pub async fn rollback(&mut self, batch_id: i64) -> Result<(), CanalError> {
        let rb = ClientRollback {
            destination: self.cfg.destination.clone(),
            client_id: self.cfg.client_id.clone(),
            batch_id,
        };
        self.write(PacketType::ClientRollback, rb.encode_to_vec())
            .await
    }

    async fn write(&mut self, kind: PacketType, body: Vec<u8>) -> Result<(), CanalError> {
        let packet = Packet {
            r#type: kind as i32,
            body: body.into(),
            ..Default::default()
        };
        let addr = self.addr.clone();
        let timeout = self.cfg.read_timeout;
        tokio::time::timeout(timeout, self.framed.send(packet.encode_to_vec()))
            .await
            .map_err(|_| CanalError::Timeout {
                addr,
                during: "writing a request",
                after: timeout,
            })?
            .map_err(CanalError::from)
    }

    async fn read_packet(
        &mut self,
        during: &'static str,
        timeout: Duration,
    ) -> Result<Packet, CanalError> {
        let frame = tokio::time::timeout(timeout, self.framed.next())
            .await
            .map_err(|_| CanalError::Timeout {
                addr: self.addr.clone(),
                during,
                after: timeout,
            })?;
        match frame {
            None => Err(CanalError::Closed {
                addr: self.addr.clone(),
                during,
            }),
            Some(Err(e)) => Err(e.into()),
            Some(Ok(body)) => Packet::decode(body).map_err(|source| CanalError::Protobuf {
                what: "Packet",
                source,
            }),
        }
    }

    async fn read_ack(
        &mut self,
        during: &'static str,
        timeout: Duration,
    ) -> Result<(), CanalError> {
        let packet = self.read_packet(during, timeout).await?;
        if packet.r#type != PacketType::Ack as i32 {
            return Err(CanalError::Unexpected {
                expected: "ACK",
                got: packet_type_name(packet.r#type),
            });
        }
        let ack = decode_ack(&packet.body)?;
        if ack.error_code.unwrap_or(0) != 0 {
            return Err(self.server_error(during, ack));
        }
        Ok(())
    }

    fn server_error(&self, during: &'static str, ack: Ack) -> CanalError {
        CanalError::Server {
            destination: self.cfg.destination.clone(),
            during,
            code: ack.error_code.unwrap_or(0),
            message: first_line(&ack.error_message),
        }
    }
}

fn decode_ack(body: &[u8]) -> Result<Ack, CanalError> {
    Ack::decode(body).map_err(|source| CanalError::Protobuf {
        what: "Ack",
        source,
    })
}

fn check_compression(packet: &Packet) -> Result<(), CanalError> {
    match packet.compression {
        None | Some(0) => Ok(()),
        Some(c) if c == Compression::None as i32 => Ok(()),
        Some(c) => Err(CanalError::Compression(c)),
    }
}

/// Canal error messages often carry a whole Java stack trace; keep the first meaningful line.
fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or("").trim();
    let mut s: String = line.chars().take(500).collect();
    if s.len() < line.len() {
        s.push('…');
    }
    s
}

pub(crate) fn packet_type_name(t: i32) -> String {
    PacketType::try_from(t)
        .map(|p| p.as_str_name().to_string())
        .unwrap_or_else(|_| format!("unknown type {t}"))
}

#[cfg(test)]
mod skip_tests {
    use super::*;
    use crate::canal::proto::packet::Packet;

    #[test]
    fn the_batch_id_is_read_from_the_head_of_a_messages_packet() {
        let msgs = Messages {
            batch_id: 123_456_789,
            messages: vec![Bytes::from(vec![7u8; 10_000])],
        };
        let packet = Packet {
            version: Some(1),
            r#type: PacketType::Messages as i32,
            body: msgs.encode_to_vec().into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(wire::batch_id_from_head(&packet[..64]), Some(123_456_789));
        assert_eq!(wire::batch_id_from_head(&packet[..3]), None);
        assert_eq!(
            wire::batch_id_from_head(b"garbage that is not a packet"),
            None
        );
    }
}
