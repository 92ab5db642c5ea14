//! Canal framing: every message in both directions is a 4-byte big-endian signed length
//! followed by that many bytes of protobuf.
//!
//! Canal itself enforces no maximum, so this codec applies a configurable cap: a length over the
//! cap, or a negative one, is a [`FrameError`] before a single byte of the body is buffered. A
//! connection that closes in the middle of a frame is reported as [`FrameError::Truncated`].
//! Frame bodies are returned undecoded; turning them into packets is the session's job.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// Default cap on one frame body: 128 MiB.
///
/// Canal ships binary column values as one ISO-8859-1 character per byte inside protobuf
/// strings, and protobuf writes every character from U+0080 as two UTF-8 bytes: a BLOB costs
/// up to twice its size on the wire. An UPDATE carries the row twice (before and after). So
/// a 20 MiB BLOB makes a frame of up to ~40 MiB (INSERT, DELETE) or ~80 MiB (UPDATE); 128 MiB
/// carries both with room for the rest of the batch.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 128 * 1024 * 1024;

/// A framing failure. All of them poison the connection.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(
        "frame of {len} bytes exceeds the maximum of {max} bytes (raise canal.max_frame_bytes if rows this large are expected)"
    )]
    TooLarge { len: usize, max: usize },
    #[error("invalid frame header: negative length {0}")]
    NegativeLength(i32),
    #[error("truncated frame: connection closed after {got} of {expected} bytes")]
    Truncated { expected: usize, got: usize },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Length-prefixed frame codec with a size cap.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_bytes: usize,
}

impl FrameCodec {
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameCodec { max_frame_bytes }
    }

    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Checks a header and returns the body length it announces.
    fn body_len(&self, header: [u8; 4]) -> Result<usize, FrameError> {
        let len = i32::from_be_bytes(header);
        if len < 0 {
            return Err(FrameError::NegativeLength(len));
        }
        let len = len as usize;
        if len > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        Ok(len)
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME_BYTES)
    }
}

impl Decoder for FrameCodec {
    type Item = Bytes;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let header = [src[0], src[1], src[2], src[3]];
        let len = self.body_len(header)?;
        if src.len() < HEADER_LEN + len {
            // Reserve only what the (already capped) frame needs.
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        Ok(Some(src.split_to(len).freeze()))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => {
                let expected = if src.len() >= HEADER_LEN {
                    HEADER_LEN + self.body_len([src[0], src[1], src[2], src[3]])?
                } else {
                    HEADER_LEN
                };
                Err(FrameError::Truncated {
                    expected,
                    got: src.len(),
                })
            }
        }
    }
}

impl<T: AsRef<[u8]>> Encoder<T> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, body: T, dst: &mut BytesMut) -> Result<(), FrameError> {
        let body = body.as_ref();
        if body.len() > self.max_frame_bytes || body.len() > i32::MAX as usize {
            return Err(FrameError::TooLarge {
                len: body.len(),
                max: self.max_frame_bytes,
            });
        }
        dst.reserve(HEADER_LEN + body.len());
        dst.put_i32(body.len() as i32);
        dst.put_slice(body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        FrameCodec::default().encode(body, &mut b).unwrap();
        b
    }

    #[test]
    fn round_trips_and_splits_consecutive_frames() {
        let mut buf = frame(b"hello");
        buf.extend_from_slice(&frame(b""));
        buf.extend_from_slice(&frame(b"world!"));
        let mut codec = FrameCodec::default();
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap(), &b"hello"[..]);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap(), &b""[..]);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap(), &b"world!"[..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn waits_for_a_partial_frame() {
        let full = frame(b"abcdef");
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&full[..7]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&full[7..]);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap(), &b"abcdef"[..]);
    }

    #[test]
    fn rejects_a_frame_over_the_cap_before_buffering_it() {
        let mut codec = FrameCodec::new(16);
        let mut buf = BytesMut::from(&[0x00, 0x00, 0x01, 0x00][..]);
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len: 256, max: 16 }),
            "{err}"
        );
        assert!(err.to_string().contains("256"));
        // nothing was reserved for the oversized body
        assert!(buf.capacity() < 256);
    }

    #[test]
    fn rejects_negative_lengths() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xfe][..]);
        let err = FrameCodec::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::NegativeLength(-2)));
    }

    #[test]
    fn reports_truncation_at_eof() {
        let full = frame(b"abcdef");
        let mut buf = BytesMut::from(&full[..6]);
        let err = FrameCodec::default().decode_eof(&mut buf).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::Truncated {
                    expected: 10,
                    got: 6
                }
            ),
            "{err}"
        );
        let mut header_only = BytesMut::from(&full[..2]);
        assert!(matches!(
            FrameCodec::default().decode_eof(&mut header_only),
            Err(FrameError::Truncated {
                expected: 4,
                got: 2
            })
        ));
    }
}
