//! Entry points for fuzzing the byte-facing code: the frame codec, packet and entry decoding.
//!
//! Each function takes arbitrary bytes and must return without panicking; the frame codec must
//! never buffer more than one capped frame. They are driven by the libFuzzer targets in `fuzz/`
//! (`cargo +nightly fuzz run frames`, see `fuzz/README.md`) and by a short seeded run in the test
//! suite (`tests/fuzz_smoke.rs`), so CI exercises them on every change.

use crate::canal::codec::{FrameCodec, HEADER_LEN};
use crate::canal::decode::{
    DecodeStats, column_mismatch, column_value, decode_entries, map_event_type,
};
use crate::canal::proto::entry::{Entry, EntryType, RowChange};
use crate::canal::proto::packet::{Messages, Packet};
use crate::event::{ChangeEvent, ColumnSet, EventType, Position, Row};
use bytes::BytesMut;
use prost::Message;
use std::sync::Arc;
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
    let got = decode_entries("fuzz", entries, &mut events);
    for e in &events {
        // rendering must not panic either
        let _ = e.to_json();
    }
    // the zero-copy decoder agrees with the prost-based reference on every input
    let mut expected = Vec::new();
    let want = reference_decode("fuzz", entries, &mut expected);
    assert_eq!(
        got.is_ok(),
        want.is_ok(),
        "decoder: {got:?}, reference: {want:?}"
    );
    if got.is_ok() {
        let json = |e: &[ChangeEvent]| serde_json::to_string(e).unwrap_or_default();
        assert_eq!(json(&events), json(&expected), "decoded events differ");
        assert_eq!(got.ok(), want.ok(), "decode stats differ");
    }
}

/// The straightforward decoder the zero-copy one replaced: prost decodes every message into
/// owned strings, each column's declared type is parsed for each value. It defines what
/// [`decode_entries`] must produce (checked on every fuzz input); too slow for service use.
pub fn reference_decode<B: AsRef<[u8]>>(
    destination: &str,
    entries: &[B],
    out: &mut Vec<ChangeEvent>,
) -> Result<DecodeStats, String> {
    let mut stats = DecodeStats {
        entries: entries.len(),
        ..Default::default()
    };
    for (index, raw) in entries.iter().enumerate() {
        let entry = Entry::decode(raw.as_ref()).map_err(|e| format!("entry {index}: {e}"))?;
        let kind = match entry.entry_type {
            None => Some(EntryType::RowData),
            Some(v) => EntryType::try_from(v).ok(),
        };
        match kind {
            Some(EntryType::RowData) => {
                if !reference_row_entry(destination, index, &entry, out)? {
                    stats.skipped += 1;
                }
            }
            Some(EntryType::TransactionBegin) | Some(EntryType::TransactionEnd) => {
                stats.transaction_boundaries += 1
            }
            _ => stats.skipped += 1,
        }
    }
    Ok(stats)
}

fn reference_row_entry(
    destination: &str,
    index: usize,
    entry: &Entry,
    out: &mut Vec<ChangeEvent>,
) -> Result<bool, String> {
    let header = entry.header.clone().unwrap_or_default();
    let change =
        RowChange::decode(entry.store_value.as_ref()).map_err(|e| format!("entry {index}: {e}"))?;
    let raw_type = change
        .event_type
        .or(header.event_type)
        .ok_or_else(|| format!("entry {index}: no event type"))?;
    let event_type = map_event_type(raw_type)
        .ok_or_else(|| format!("entry {index}: unknown event type {raw_type}"))?;
    let gtid = (!header.gtid.is_empty()).then(|| Arc::<str>::from(header.gtid.as_str()));
    let position = |row_index: u32| Position {
        log_file: header.logfile_name.as_str().into(),
        offset: header.logfile_offset.max(0) as u64,
        row_index,
        server_id: header.server_id.max(0) as u64,
        gtid: gtid.clone(),
    };
    let is_ddl = change.is_ddl.unwrap_or(false);
    if event_type == EventType::Query && !is_ddl {
        return Ok(false);
    }
    if is_ddl || !event_type.is_row() {
        let database = if header.schema_name.is_empty() {
            change.ddl_schema_name.clone()
        } else {
            header.schema_name.clone()
        };
        out.push(ChangeEvent {
            destination: destination.into(),
            database: database.into(),
            table: header.table_name.as_str().into(),
            event_type,
            data: Row::new(),
            old: None,
            changed: ColumnSet::new(),
            primary_keys: ColumnSet::new(),
            position: position(0),
            executed_at: header.execute_time,
            is_ddl,
            sql: (!change.sql.is_empty()).then(|| change.sql.clone()),
            snapshot: None,
        });
        return Ok(true);
    }
    for (row_index, row) in change.row_datas.iter().enumerate() {
        for col in row.before_columns.iter().chain(&row.after_columns) {
            if let Some(reason) = column_mismatch(col) {
                return Err(format!("entry {index}: row {row_index}: {reason}"));
            }
        }
        let image = if event_type == EventType::Delete {
            &row.before_columns
        } else {
            &row.after_columns
        };
        let mut data = Row::new();
        let mut changed = Vec::new();
        let mut primary_keys = Vec::new();
        for col in image {
            data.insert(col.name.as_str().into(), column_value(col));
            if col.is_key {
                primary_keys.push(col.name.clone());
            }
            if col.updated && event_type != EventType::Delete {
                changed.push(col.name.clone());
            }
        }
        let old = (event_type == EventType::Update).then(|| {
            row.before_columns
                .iter()
                .filter(|c| changed.iter().any(|n| n == &c.name))
                .map(|c| (c.name.clone(), column_value(c)))
                .collect::<Row>()
        });
        out.push(ChangeEvent {
            destination: destination.into(),
            database: header.schema_name.as_str().into(),
            table: header.table_name.as_str().into(),
            event_type,
            data,
            old,
            changed: changed.into(),
            primary_keys: primary_keys.into(),
            position: position(row_index as u32),
            executed_at: header.execute_time,
            is_ddl: false,
            sql: None,
            snapshot: None,
        });
    }
    Ok(true)
}
