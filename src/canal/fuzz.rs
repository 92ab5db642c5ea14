//! Entry points for fuzzing the byte-facing code: the frame codec, packet and entry decoding.
//!
//! Each function takes arbitrary bytes and must return without panicking; the frame codec must
//! never buffer more than one capped frame. They are driven by the libFuzzer targets in `fuzz/`
//! (`cargo +nightly fuzz run frames`, see `fuzz/README.md`) and by a short seeded run in the test
//! suite (`tests/fuzz_smoke.rs`), so CI exercises them on every change.

use crate::canal::codec::{FrameCodec, HEADER_LEN};
use crate::canal::decode::decode_entries;
use crate::canal::proto::packet::{Messages, Packet};
use bytes::BytesMut;
use prost::Message;
use tokio_util::codec::Decoder;

/// The frame cap the fuzz targets use (small, so oversized frames are common).
pub const FUZZ_MAX_FRAME: usize = 4096;

/// Feed `data` to a [`FrameCodec`] in chunks whose sizes come from the data itself, then decode
/// every frame as a packet. Panics if a frame exceeds the cap or the buffer grows beyond one
/// capped frame plus the unread input.
pub fn frames(data: &[u8]) {
    let mut codec = FrameCodec::new(FUZZ_MAX_FRAME);
    let mut buf = BytesMut::new();
    let mut rest = data;
    let mut step = 1usize;
    while !rest.is_empty() {
        let n = step.min(rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        step = (step * 7 + usize::from(rest.first().copied().unwrap_or(1))) % 97 + 1;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= FUZZ_MAX_FRAME, "frame over the cap");
                    packet(&frame);
                }
                Ok(None) => break,
                Err(_) => return,
            }
            assert!(
                buf.capacity() <= HEADER_LEN + FUZZ_MAX_FRAME + data.len(),
                "buffered {} bytes for a {FUZZ_MAX_FRAME}-byte cap",
                buf.capacity()
            );
        }
    }
    let _ = codec.decode_eof(&mut buf);
}

/// Decode `data` as a Canal packet and, if it holds messages, decode their entries.
pub fn packet(data: &[u8]) {
    let Ok(p) = Packet::decode(data) else {
        return;
    };
    if let Ok(msgs) = Messages::decode(&p.body[..]) {
        decode_all(&msgs.messages);
    }
}

/// Decode `data` as a Messages body (a batch of serialized entries).
pub fn messages(data: &[u8]) {
    if let Ok(msgs) = Messages::decode(data) {
        decode_all(&msgs.messages);
    }
}

/// Decode `data` as one serialized entry.
pub fn entry(data: &[u8]) {
    decode_all(&[data]);
}

fn decode_all<B: AsRef<[u8]>>(entries: &[B]) {
    let mut events = Vec::new();
    let _ = decode_entries("fuzz", entries, &mut events);
    for e in &events {
        // rendering must not panic either
        let _ = e.to_json();
    }
}
