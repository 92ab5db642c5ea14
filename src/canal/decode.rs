//! Entries to [`ChangeEvent`]s.
//!
//! A MESSAGES packet carries serialized `Entry` messages; this module decodes them and turns
//! each changed row (or DDL statement) into a [`ChangeEvent`]. Transaction begin/end entries are
//! boundaries and produce nothing; internal entry kinds (heartbeat, GTID log) are skipped.
//!
//! Canal renders every column value as a string. We restore types from the column's declared
//! MySQL type (falling back on its `java.sql.Types` code):
//! - integers (including Canal's "bumped" unsigned types) become `Int`/`UInt`, YEAR and BIT too;
//! - FLOAT/DOUBLE become `Float`;
//! - DECIMAL, dates, times and text stay exact `Text` (DECIMAL padded back to its declared scale:
//!   Canal drops a last group of fraction digits that is all zeros);
//! - binary types arrive as one char per byte (ISO-8859-1) and are restored to exact `Bytes`;
//!   `BINARY(n)` gets back the trailing zero bytes the binlog strips (n from the declared type);
//! - ENUM arrives as a 1-based index and SET as a bitmask; both are mapped back to their labels
//!   from the declared type (`enum('a','b')`), so the value equals what was written;
//! - JSON columns (MySQL's JSON type) are parsed; MariaDB's JSON is a LONGTEXT alias, so there
//!   the text is kept as written (whether Canal's table meta calls it `longtext` or `json`).
//!
//! Canal names a row's values (which the binlog carries by position) with the table structure
//! it knows. If that structure is not the one the row was written with (a DDL Canal did not
//! track), values shift under the wrong names. Every non-NULL value is checked against the
//! SQL type Canal derives from the declared type of the column it is named with; a value that
//! cannot belong there is a [`DecodeError`] naming the table, position and column, never a
//! silently shifted row.
//!
//! Failures are [`DecodeError`]s naming the entry; a malformed entry never panics.
//!
//! (Why this file is long: about 320 of its lines are the unit tests of every column type's
//! byte-level decoding, kept beside the code they pin.)

use crate::canal::charset::{self, BinlogPos, CharsetError, CharsetMap, Lookup, Need, TableName};
use crate::canal::proto::entry::{
    Column, Entry, EntryType, EventType as WireEventType, RowChange, RowData,
};
use crate::event::{ChangeEvent, EventType, Position, Row, Value};
use prost::Message as _;
use std::collections::HashMap;

/// A decoding failure inside a batch.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("entry {index}: malformed {what}: {source}")]
    Protobuf {
        index: usize,
        what: &'static str,
        source: prost::DecodeError,
    },
    #[error("entry {index}: {reason}")]
    Invalid { index: usize, reason: String },
    /// A text value that cannot be decoded with its column's charset (raw text mode).
    #[error("entry {index}: {table} at {log_file}:{offset}: {source}")]
    Charset {
        index: usize,
        table: String,
        log_file: String,
        offset: i64,
        source: Box<CharsetError>,
    },
    /// Raw text mode: the charsets of these tables must be looked up before the batch can be
    /// decoded (not a failure of the batch: decode it again after the lookup).
    #[error("column charsets of {} needed", needs_list(.0))]
    CharsetsNeeded(Vec<(Need, Vec<String>)>),
}

fn needs_list(needs: &[(Need, Vec<String>)]) -> String {
    needs
        .iter()
        .map(|(n, _)| format!("{}.{}", n.table.0, n.table.1))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How the values of text columns (CHAR, VARCHAR, TEXT, JSON) are read.
#[derive(Debug, Clone, Copy)]
pub enum TextMode<'a> {
    /// As Canal decoded them with its connection charset (UTF-8): taken as they are.
    AsShipped,
    /// Canal shipped their bytes as ISO-8859-1 characters (`connectionCharset=ISO-8859-1`):
    /// decoded with each column's charset from this map (`canal::charset`).
    Raw(&'a CharsetMap),
}

/// Statistics of one decoded batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeStats {
    pub entries: usize,
    pub transaction_boundaries: usize,
    pub skipped: usize,
}

/// Decodes every entry of a batch, appending the events to `out`.
pub fn decode_entries<B: AsRef<[u8]>>(
    destination: &str,
    entries: &[B],
    out: &mut Vec<ChangeEvent>,
) -> Result<DecodeStats, DecodeError> {
    decode_entries_with(destination, entries, out, TextMode::AsShipped)
}

/// [`decode_entries`] with a choice of how text columns are read. In [`TextMode::Raw`] a batch
/// with rows of tables the map cannot serve yet ends in [`DecodeError::CharsetsNeeded`] (and
/// `out` is then incomplete): look them up and decode the batch again.
pub fn decode_entries_with<B: AsRef<[u8]>>(
    destination: &str,
    entries: &[B],
    out: &mut Vec<ChangeEvent>,
    text: TextMode<'_>,
) -> Result<DecodeStats, DecodeError> {
    let mut raw_text = match text {
        TextMode::AsShipped => None,
        TextMode::Raw(map) => Some(RawText {
            map,
            ddl_seen: HashMap::new(),
            needs: Vec::new(),
        }),
    };
    let mut stats = DecodeStats {
        entries: entries.len(),
        ..Default::default()
    };
    for (index, raw) in entries.iter().enumerate() {
        let entry = Entry::decode(raw.as_ref()).map_err(|source| DecodeError::Protobuf {
            index,
            what: "Entry",
            source,
        })?;
        match entry_kind(&entry) {
            Some(EntryType::RowData) => {
                if !decode_row_entry(destination, index, &entry, out, raw_text.as_mut())? {
                    stats.skipped += 1;
                }
            }
            Some(EntryType::TransactionBegin) | Some(EntryType::TransactionEnd) => {
                stats.transaction_boundaries += 1
            }
            _ => stats.skipped += 1,
        }
    }
    if let Some(raw) = raw_text
        && !raw.needs.is_empty()
    {
        return Err(DecodeError::CharsetsNeeded(raw.needs));
    }
    Ok(stats)
}

/// Raw text mode state while one batch is decoded.
struct RawText<'a> {
    map: &'a CharsetMap,
    /// The latest DDL on each table so far in this batch.
    ddl_seen: HashMap<TableName, BinlogPos>,
    /// Lookups the batch needs, with the columns found missing.
    needs: Vec<(Need, Vec<String>)>,
}

impl RawText<'_> {
    fn need(&mut self, need: Need, missing: Vec<String>) {
        match self.needs.iter_mut().find(|(n, _)| n.table == need.table) {
            Some((n, cols)) => {
                if need.after_ddl > n.after_ddl {
                    n.after_ddl = need.after_ddl;
                }
                for c in missing {
                    if !cols.contains(&c) {
                        cols.push(c);
                    }
                }
            }
            None => self.needs.push((need, missing)),
        }
    }
}

/// Declared types whose values Canal decodes with its connection charset (MySQL's JSON too:
/// its strings); ENUM and SET arrive as numbers and get their labels from the declared type.
fn is_charset_text(base: &str) -> bool {
    matches!(
        base,
        "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" | "json"
    )
}

/// `java.sql.Types.CLOB`.
const SQL_CLOB: i32 = 2005;

/// Raw text mode: the row with every text value decoded with its column's charset (a BLOB-typed
/// one retyped CLOB, so it is read as text from here on), or the columns the table's entry
/// lacks (look the table up again first).
fn recode_row(
    row: &RowData,
    table: &charset::TableCharsets,
) -> Result<Result<RowData, Vec<String>>, CharsetError> {
    let mut row = row.clone();
    let mut missing = Vec::new();
    for col in row
        .before_columns
        .iter_mut()
        .chain(row.after_columns.iter_mut())
    {
        if col.is_null.unwrap_or(false) {
            continue;
        }
        let declared = col.mysql_type.to_ascii_lowercase();
        if !is_charset_text(base_type(&declared)) {
            continue;
        }
        match charset::decode_text(table, &col.name, &col.value)? {
            Some(v) => {
                col.value = v;
                if col.sql_type == SQL_BLOB {
                    col.sql_type = SQL_CLOB;
                }
            }
            None => {
                if !missing.contains(&col.name) {
                    missing.push(col.name.clone());
                }
            }
        }
    }
    Ok(if missing.is_empty() {
        Ok(row)
    } else {
        Err(missing)
    })
}

fn entry_kind(entry: &Entry) -> Option<EntryType> {
    // Canal always sets the entry type; a proto2 reader would default an absent one to ROWDATA.
    match entry.entry_type {
        None => Some(EntryType::RowData),
        Some(v) => EntryType::try_from(v).ok(),
    }
}

fn map_event_type(v: i32) -> Option<EventType> {
    let wire = WireEventType::try_from(v).ok()?;
    Some(match wire {
        WireEventType::Unspecified => return None,
        WireEventType::Insert => EventType::Insert,
        WireEventType::Update => EventType::Update,
        WireEventType::Delete => EventType::Delete,
        WireEventType::Create => EventType::Create,
        WireEventType::Alter => EventType::Alter,
        WireEventType::Erase => EventType::Erase,
        WireEventType::Query => EventType::Query,
        WireEventType::Truncate => EventType::Truncate,
        WireEventType::Rename => EventType::Rename,
        WireEventType::Cindex => EventType::Cindex,
        WireEventType::Dindex => EventType::Dindex,
        WireEventType::Gtid => EventType::Gtid,
        WireEventType::Xacommit => EventType::Xacommit,
        WireEventType::Xarollback => EventType::Xarollback,
        WireEventType::Mheartbeat => EventType::Mheartbeat,
    })
}

/// Decodes one ROWDATA entry; returns false when it was skipped (a non-DDL QUERY entry).
fn decode_row_entry(
    destination: &str,
    index: usize,
    entry: &Entry,
    out: &mut Vec<ChangeEvent>,
    mut raw: Option<&mut RawText<'_>>,
) -> Result<bool, DecodeError> {
    let header = entry.header.clone().unwrap_or_default();
    let change =
        RowChange::decode(entry.store_value.as_ref()).map_err(|source| DecodeError::Protobuf {
            index,
            what: "RowChange",
            source,
        })?;
    // Header and RowChange both carry the type; Canal's Java reader defaults an absent one to
    // UPDATE, which we refuse to guess.
    let raw_type = change
        .event_type
        .or(header.event_type)
        .ok_or_else(|| DecodeError::Invalid {
            index,
            reason: format!(
                "row entry for {}.{} has no event type",
                header.schema_name, header.table_name
            ),
        })?;
    let event_type = map_event_type(raw_type).ok_or_else(|| DecodeError::Invalid {
        index,
        reason: format!("unknown event type {raw_type}"),
    })?;
    let gtid = (!header.gtid.is_empty()).then(|| header.gtid.clone());
    let position = |row_index: u32| Position {
        log_file: header.logfile_name.clone(),
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
        if let Some(raw) = raw.as_deref_mut()
            && !header.table_name.is_empty()
        {
            raw.ddl_seen.insert(
                (database.clone(), header.table_name.clone()),
                (
                    header.logfile_name.clone(),
                    header.logfile_offset.max(0) as u64,
                ),
            );
        }
        out.push(ChangeEvent {
            destination: destination.to_string(),
            database,
            table: header.table_name.clone(),
            event_type,
            data: Row::new(),
            old: None,
            changed: Vec::new(),
            primary_keys: Vec::new(),
            position: position(0),
            executed_at: header.execute_time,
            is_ddl,
            sql: (!change.sql.is_empty()).then(|| change.sql.clone()),
        });
        return Ok(true);
    }

    let table: TableName = (header.schema_name.clone(), header.table_name.clone());
    for (row_index, row) in change.row_datas.iter().enumerate() {
        for col in row.before_columns.iter().chain(&row.after_columns) {
            if let Some(reason) = type_mismatch(col) {
                return Err(DecodeError::Invalid {
                    index,
                    reason: format!(
                        "{}.{} at {}:{} row {row_index}: {reason}; the row's values do not line \
                         up with the table structure Canal named them with (a DDL Canal did not \
                         track? run Canal with canal.instance.tsdb.enable=true)",
                        header.schema_name,
                        header.table_name,
                        header.logfile_name,
                        header.logfile_offset
                    ),
                });
            }
        }
        let recoded;
        let row = match raw.as_deref_mut() {
            None => row,
            Some(raw) => {
                let after_ddl = raw.ddl_seen.get(&table).cloned();
                let need = |missing| {
                    (
                        Need {
                            table: table.clone(),
                            after_ddl: after_ddl.clone(),
                        },
                        missing,
                    )
                };
                let charsets = match raw.map.get(&table, after_ddl.as_ref()) {
                    Lookup::Known(c) => c,
                    Lookup::Needed => {
                        let (n, m) = need(Vec::new());
                        raw.need(n, m);
                        continue;
                    }
                };
                match recode_row(row, charsets) {
                    Ok(Ok(r)) => {
                        recoded = r;
                        &recoded
                    }
                    Ok(Err(missing)) => {
                        let (n, m) = need(missing);
                        raw.need(n, m);
                        continue;
                    }
                    Err(source) => {
                        return Err(DecodeError::Charset {
                            index,
                            table: format!("{}.{}", table.0, table.1),
                            log_file: header.logfile_name.clone(),
                            offset: header.logfile_offset,
                            source: Box::new(source),
                        });
                    }
                }
            }
        };
        out.push(row_event(
            destination,
            &header.schema_name,
            &header.table_name,
            event_type,
            row,
            position(row_index as u32),
            header.execute_time,
        ));
    }
    Ok(true)
}

fn row_event(
    destination: &str,
    database: &str,
    table: &str,
    event_type: EventType,
    row: &RowData,
    position: Position,
    executed_at: i64,
) -> ChangeEvent {
    let image = if event_type == EventType::Delete {
        &row.before_columns
    } else {
        &row.after_columns
    };
    let mut data = Row::with_capacity(image.len());
    let mut changed = Vec::new();
    let mut primary_keys = Vec::new();
    for col in image {
        data.insert(col.name.clone(), column_value(col));
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
    ChangeEvent {
        destination: destination.to_string(),
        database: database.to_string(),
        table: table.to_string(),
        event_type,
        data,
        old,
        changed,
        primary_keys,
        position,
        executed_at,
        is_ddl: false,
        sql: None,
    }
}

/// The base name of a declared MySQL type: `bigint(20) unsigned` -> `bigint`.
///
/// Canal's table meta keeps the spelling of the DDL it parsed (with its table-meta history,
/// `BOOLEAN` stays `boolean`, `SERIAL` stays `serial`), so MySQL's synonyms are mapped to the
/// type they stand for. Expects lower case.
fn base_type(mysql_type: &str) -> &str {
    let end = mysql_type.find(['(', ' ']).unwrap_or(mysql_type.len());
    match &mysql_type[..end] {
        "bool" | "boolean" | "int1" => "tinyint",
        "int2" => "smallint",
        "int3" | "middleint" => "mediumint",
        "int4" | "integer" => "int",
        "int8" | "serial" => "bigint",
        "float4" => "float",
        "float8" | "real" => "double",
        "dec" | "numeric" | "fixed" => "decimal",
        "long" if mysql_type.starts_with("long varbinary") => "mediumblob",
        "long" => "mediumtext",
        other => other,
    }
}

/// The `java.sql.Types` codes Canal 1.1.x gives a non-NULL value decoded from the binlog, by the
/// declared type of the column it names it with (LogEventConvert/RowsLogBuffer): integers keep
/// their width or move one up when unsigned, binary strings, BLOBs and geometry become BLOB,
/// text becomes CLOB, YEAR is VARCHAR, ENUM an INTEGER index, SET a BIT mask. `None` for types
/// we do not check.
fn expected_sql_types(base: &str) -> Option<&'static [i32]> {
    const TINYINT: i32 = -6;
    const SMALLINT: i32 = 5;
    const INTEGER: i32 = 4;
    const BIGINT: i32 = -5;
    const DECIMAL: i32 = 3;
    const REAL: i32 = 7;
    const DOUBLE: i32 = 8;
    const BIT: i32 = -7;
    const CHAR: i32 = 1;
    const VARCHAR: i32 = 12;
    const DATE: i32 = 91;
    const TIME: i32 = 92;
    const TIMESTAMP: i32 = 93;
    const BLOB: i32 = 2004;
    const CLOB: i32 = 2005;
    Some(match base {
        "tinyint" => &[TINYINT, SMALLINT],
        "smallint" => &[SMALLINT, INTEGER],
        "mediumint" => &[INTEGER],
        "int" => &[INTEGER, BIGINT],
        "bigint" => &[BIGINT, DECIMAL],
        "decimal" => &[DECIMAL],
        "float" => &[REAL],
        "double" => &[DOUBLE],
        "bit" => &[BIT],
        "datetime" | "timestamp" => &[TIMESTAMP],
        "date" => &[DATE],
        "time" => &[TIME],
        "year" => &[VARCHAR],
        "enum" => &[INTEGER],
        "set" => &[BIT],
        "char" => &[CHAR],
        "varchar" => &[VARCHAR],
        // BLOB when Canal's meta spells the type so that Canal misses it is text (`text(n)`)
        "tinytext" | "text" | "mediumtext" | "longtext" => &[CLOB, BLOB],
        // MySQL's JSON type (VARCHAR), MariaDB's LONGTEXT alias named `json` or `longtext`
        "json" => &[VARCHAR, BLOB, CLOB],
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" | "geometry"
        | "point" | "linestring" | "polygon" | "multipoint" | "multilinestring"
        | "multipolygon" | "geometrycollection" => &[BLOB],
        _ => return None,
    })
}

/// Why a column's value cannot be the column it is named as (Canal named the binlog's values
/// with a table structure that does not match them), or `None`.
fn type_mismatch(col: &Column) -> Option<String> {
    if col.is_null.unwrap_or(false) || col.mysql_type.is_empty() {
        return None;
    }
    let declared = col.mysql_type.to_ascii_lowercase();
    let expected = expected_sql_types(base_type(&declared))?;
    (!expected.contains(&col.sql_type)).then(|| {
        format!(
            "column `{}` (position {}) is declared {} but holds a binlog value of SQL type {}",
            col.name, col.index, col.mysql_type, col.sql_type
        )
    })
}

/// Declared types MySQL stores like BLOBs in the binlog but that hold text.
fn is_blob_stored_text(base: &str) -> bool {
    matches!(
        base,
        "tinytext" | "text" | "mediumtext" | "longtext" | "json"
    )
}

/// `java.sql.Types.BLOB`: what Canal reports for values it ships as ISO-8859-1 bytes.
const SQL_BLOB: i32 = 2004;

/// Restores a typed value from Canal's string rendering.
pub fn column_value(col: &Column) -> Value {
    if col.is_null.unwrap_or(false) {
        return Value::Null;
    }
    let v = col.value.as_str();
    let declared = col.mysql_type.to_ascii_lowercase();
    match base_type(&declared) {
        "tinyint" | "smallint" | "mediumint" | "int" | "bigint" | "year" => integer(v),
        "bit" => v.parse().map(Value::UInt).unwrap_or_else(|_| text(v)),
        "float" | "double" => float(v),
        "decimal" => Value::Text(decimal_text(v, &declared)),
        "binary" => Value::Bytes(padded(latin1_bytes(v), &declared)),
        "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" | "geometry" | "point"
        | "linestring" | "polygon" | "multipoint" | "multilinestring" | "multipolygon"
        | "geometrycollection" => Value::Bytes(latin1_bytes(v)),
        "enum" => enum_label(&col.mysql_type, v).map_or_else(|| text(v), Value::Text),
        "set" => set_labels(&col.mysql_type, v).map_or_else(|| text(v), Value::Text),
        // Text stored as a BLOB in the binlog (TEXT types, MariaDB's JSON) that Canal did not
        // recognise as text because its table meta spells the type differently (`json` for a
        // table it saw created, `text(1000)`, `long varchar`): Canal then ships the bytes as
        // ISO-8859-1 characters (SQL type BLOB). Decode them as Canal decodes text (its
        // connection charset, UTF-8), so the value is the same as for `longtext`.
        base if col.sql_type == SQL_BLOB && is_blob_stored_text(base) => Value::Text(
            String::from_utf8(latin1_bytes(v))
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        ),
        // MariaDB's JSON (a LONGTEXT alias Canal ships as bytes) after `recode_row` decoded it
        // with its column's charset in raw text mode: text, as in the branch above
        "json" if col.sql_type == SQL_CLOB => text(v),
        // MySQL's binary JSON, rendered as JSON text by Canal
        "json" => serde_json::from_str(v)
            .map(Value::Json)
            .unwrap_or_else(|_| text(v)),
        "" => by_sql_type(col.sql_type, v),
        _ => text(v),
    }
}

/// Fallback when the declared type is unknown: decide by the `java.sql.Types` code.
fn by_sql_type(sql_type: i32, v: &str) -> Value {
    match sql_type {
        -6 | 5 | 4 | -5 => integer(v),
        -7 => v.parse().map(Value::UInt).unwrap_or_else(|_| text(v)),
        6..=8 => float(v),
        2004 | -2 | -3 | -4 => Value::Bytes(latin1_bytes(v)),
        _ => text(v),
    }
}

fn text(v: &str) -> Value {
    Value::Text(v.to_string())
}

fn integer(v: &str) -> Value {
    if let Ok(i) = v.parse::<i64>() {
        Value::Int(i)
    } else if let Ok(u) = v.parse::<u64>() {
        Value::UInt(u)
    } else {
        text(v)
    }
}

fn float(v: &str) -> Value {
    match v {
        "NaN" => Value::Float(f64::NAN),
        "Infinity" => Value::Float(f64::INFINITY),
        "-Infinity" => Value::Float(f64::NEG_INFINITY),
        _ => v.parse().map(Value::Float).unwrap_or_else(|_| text(v)),
    }
}

/// Canal maps each byte to the char with the same code (ISO-8859-1); undo that. A char above
/// U+00FF cannot come from that mapping, so such text is kept as its UTF-8 bytes.
fn latin1_bytes(v: &str) -> Vec<u8> {
    if v.chars().all(|c| (c as u32) <= 0xff) {
        v.chars().map(|c| c as u8).collect()
    } else {
        v.as_bytes().to_vec()
    }
}

/// DECIMAL as MariaDB prints it: with exactly the declared scale. Canal drops the last group
/// of fraction digits when it is zero (`0.00` arrives as `0.0`, `1.50000000000` in a
/// `DECIMAL(20,11)` as `1.500000000`): pad the fraction back with zeros to the declared scale.
/// The digits themselves are never changed.
fn decimal_text(v: &str, declared: &str) -> String {
    let scale = declared
        .split_once('(')
        .and_then(|(_, args)| args.split(')').next())
        .and_then(|args| args.split(',').nth(1))
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let have = v.split_once('.').map_or(0, |(_, f)| f.len());
    if scale == 0
        || have >= scale
        || !v
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len() + scale - have + 1);
    out.push_str(v);
    if !v.contains('.') {
        out.push('.');
    }
    out.extend(std::iter::repeat_n('0', scale - have));
    out
}

/// `BINARY(n)` values are stored right-padded with zero bytes to n bytes, and that is what
/// MySQL returns; the binlog carries them with the trailing zeros stripped. Pad them back.
fn padded(mut bytes: Vec<u8>, declared: &str) -> Vec<u8> {
    let n = declared
        .strip_prefix("binary(")
        .and_then(|r| r.split(')').next())
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or(1); // plain BINARY is BINARY(1)
    if bytes.len() < n {
        bytes.resize(n, 0);
    }
    bytes
}

/// The quoted labels of `enum('a','b')` / `set('x','y')`; `''` inside a label is a quote.
pub fn type_labels(declared: &str) -> Option<Vec<String>> {
    let open = declared.find('(')?;
    let close = declared.rfind(')')?;
    let inner = declared.get(open + 1..close)?;
    let mut labels = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        match chars.next() {
            None => break,
            Some(',') | Some(' ') => continue,
            Some('\'') => {
                let mut label = String::new();
                loop {
                    match chars.next() {
                        None => return None,
                        Some('\'') if chars.peek() == Some(&'\'') => {
                            chars.next();
                            label.push('\'');
                        }
                        Some('\'') => break,
                        Some('\\') => label.push(chars.next()?),
                        Some(c) => label.push(c),
                    }
                }
                labels.push(label);
            }
            Some(_) => return None,
        }
    }
    Some(labels)
}

fn enum_label(declared: &str, v: &str) -> Option<String> {
    let index: usize = v.parse().ok()?;
    if index == 0 {
        return Some(String::new()); // MySQL's "invalid value" enum member
    }
    type_labels(declared)?.get(index - 1).cloned()
}

fn set_labels(declared: &str, v: &str) -> Option<String> {
    let mask: u64 = v.parse().ok()?;
    let labels = type_labels(declared)?;
    if labels.len() < 64 && mask >> labels.len() != 0 {
        return None;
    }
    let chosen: Vec<&str> = labels
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1u64 << i) != 0)
        .map(|(_, l)| l.as_str())
        .collect();
    Some(chosen.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canal::proto::entry::{Header, Pair, TransactionEnd};

    /// A column with the SQL type Canal gives a value of its declared type.
    fn col(name: &str, mysql_type: &str, value: Option<&str>) -> Column {
        let base = base_type(mysql_type).to_ascii_lowercase();
        Column {
            index: 0,
            sql_type: expected_sql_types(&base).map_or(12, |t| t[0]),
            name: name.into(),
            is_key: name == "id",
            updated: true,
            is_null: Some(value.is_none()),
            props: vec![],
            value: value.unwrap_or_default().into(),
            length: 0,
            mysql_type: mysql_type.into(),
        }
    }

    #[test]
    fn restores_types() {
        assert_eq!(
            column_value(&col("a", "int(11)", Some("-3"))),
            Value::Int(-3)
        );
        assert_eq!(
            column_value(&col(
                "a",
                "bigint(20) unsigned",
                Some("18446744073709551615")
            )),
            Value::UInt(u64::MAX)
        );
        assert_eq!(
            column_value(&col("a", "decimal(10,2)", Some("1.50"))),
            Value::Text("1.50".into())
        );
        assert_eq!(
            column_value(&col("a", "double", Some("1.0E-5"))),
            Value::Float(1e-5)
        );
        assert_eq!(
            column_value(&col("a", "blob", Some("\u{0}\u{ff}\u{80}a"))),
            Value::Bytes(vec![0, 0xff, 0x80, b'a'])
        );
        assert_eq!(column_value(&col("a", "varchar(8)", None)), Value::Null);
        assert_eq!(
            column_value(&col("a", "varchar(8)", Some(""))),
            Value::Text(String::new())
        );
        assert_eq!(
            column_value(&col("a", "enum('s','m''x','l')", Some("2"))),
            Value::Text("m'x".into())
        );
        assert_eq!(
            column_value(&col("a", "set('a','b','c')", Some("5"))),
            Value::Text("a,c".into())
        );
        assert_eq!(
            column_value(&col("a", "bit(8)", Some("255"))),
            Value::UInt(255)
        );
        assert_eq!(
            column_value(&col("a", "year(4)", Some("2024"))),
            Value::Int(2024)
        );
        assert_eq!(
            column_value(&col("a", "json", Some("{\"k\": [1]}"))),
            Value::Json(serde_json::json!({"k": [1]}))
        );
    }

    fn header(event_type: Option<WireEventType>) -> Header {
        Header {
            logfile_name: "mysql-bin.000002".into(),
            logfile_offset: 1234,
            schema_name: "db".into(),
            table_name: "t".into(),
            execute_time: 1_700_000_000_000,
            event_type: event_type.map(|e| e as i32),
            ..Default::default()
        }
    }

    fn encode_entry(entry_type: EntryType, header: Header, value: Vec<u8>) -> Vec<u8> {
        Entry {
            header: Some(header),
            entry_type: Some(entry_type as i32),
            store_value: value.into(),
        }
        .encode_to_vec()
    }

    #[test]
    fn update_rows_carry_old_values_of_changed_columns_only() {
        let mut id = col("id", "int(11)", Some("7"));
        id.updated = false;
        let mut name_before = col("name", "varchar(8)", Some("old"));
        name_before.updated = false;
        let mut id_before = id.clone();
        id_before.updated = false;
        let change = RowChange {
            event_type: Some(WireEventType::Update as i32),
            is_ddl: Some(false),
            row_datas: vec![RowData {
                before_columns: vec![id_before, name_before],
                after_columns: vec![id, col("name", "varchar(8)", Some("new"))],
                props: vec![],
            }],
            ..Default::default()
        };
        let entries = vec![
            encode_entry(
                EntryType::RowData,
                header(Some(WireEventType::Update)),
                change.encode_to_vec(),
            ),
            encode_entry(
                EntryType::TransactionEnd,
                header(None),
                TransactionEnd {
                    transaction_id: "9".into(),
                    props: vec![Pair::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        ];
        let mut out = Vec::new();
        let stats = decode_entries("example", &entries, &mut out).unwrap();
        assert_eq!(stats.transaction_boundaries, 1);
        assert_eq!(out.len(), 1);
        let e = &out[0];
        assert_eq!(e.event_type, EventType::Update);
        assert_eq!(e.data["name"], Value::Text("new".into()));
        assert_eq!(e.changed, vec!["name".to_string()]);
        assert_eq!(e.old.as_ref().unwrap().len(), 1);
        assert_eq!(e.old_value("name"), Some(&Value::Text("old".into())));
        assert_eq!(e.primary_keys, vec!["id".to_string()]);
        assert_eq!(e.position.offset, 1234);
    }

    #[test]
    fn annotate_rows_query_entries_are_skipped_but_ddl_queries_are_kept() {
        let annotate = RowChange {
            event_type: Some(WireEventType::Query as i32),
            is_ddl: Some(false),
            sql: "INSERT INTO t VALUES (1)".into(),
            ..Default::default()
        };
        let create_db = RowChange {
            event_type: Some(WireEventType::Query as i32),
            is_ddl: Some(true),
            sql: "CREATE DATABASE x".into(),
            ..Default::default()
        };
        let entries = vec![
            encode_entry(
                EntryType::RowData,
                header(Some(WireEventType::Query)),
                annotate.encode_to_vec(),
            ),
            encode_entry(
                EntryType::RowData,
                header(Some(WireEventType::Query)),
                create_db.encode_to_vec(),
            ),
        ];
        let mut out = Vec::new();
        let stats = decode_entries("example", &entries, &mut out).unwrap();
        assert_eq!(stats.skipped, 1);
        assert_eq!(out.len(), 1);
        assert!(out[0].is_ddl);
        assert_eq!(out[0].event_type, EventType::Query);
        assert_eq!(out[0].sql.as_deref(), Some("CREATE DATABASE x"));
    }

    #[test]
    fn text_shipped_as_bytes_stays_text() {
        // "中" as UTF-8 bytes, one ISO-8859-1 char each, as Canal ships a `json` BLOB
        let mut j = col("j", "json", Some("{\"s\": \"\u{e4}\u{b8}\u{ad}\"}"));
        j.sql_type = SQL_BLOB;
        assert_eq!(column_value(&j), Value::Text("{\"s\": \"中\"}".into()));
        assert_eq!(type_mismatch(&j), None);
        // `TEXT(1000)` from a DDL Canal parsed: same treatment
        let mut t = col("t", "text(1000)", Some("caf\u{c3}\u{a9}"));
        t.sql_type = SQL_BLOB;
        assert_eq!(column_value(&t), Value::Text("café".into()));
        assert_eq!(type_mismatch(&t), None);
        // DECIMAL keeps its declared scale
        let dec = |t: &str, v: &str| column_value(&col("d", t, Some(v)));
        assert_eq!(dec("decimal(10,2)", "0.0"), Value::Text("0.00".into()));
        assert_eq!(dec("numeric(10,2)", "-5.0"), Value::Text("-5.00".into()));
        assert_eq!(
            dec("decimal(20,11)", "1.500000000"),
            Value::Text("1.50000000000".into())
        );
        assert_eq!(
            dec("decimal(10,2) unsigned", "3"),
            Value::Text("3.00".into())
        );
        assert_eq!(dec("decimal(10,0)", "7"), Value::Text("7".into()));
        assert_eq!(dec("decimal", "7"), Value::Text("7".into()));
        assert_eq!(dec("decimal(5,2)", "1.25"), Value::Text("1.25".into()));
        // synonyms kept by Canal's DDL-parsed meta
        assert_eq!(
            column_value(&col("b", "boolean", Some("-1"))),
            Value::Int(-1)
        );
        assert_eq!(
            column_value(&col("s", "serial", Some("18446744073709551615"))),
            Value::UInt(u64::MAX)
        );
        assert_eq!(
            column_value(&col("r", "real", Some("0.5"))),
            Value::Float(0.5)
        );
        let mut lv = col("lv", "long varbinary", Some("\u{ff}"));
        lv.sql_type = SQL_BLOB;
        assert_eq!(column_value(&lv), Value::Bytes(vec![0xff]));
        let mut lt = col("lt", "long varchar", Some("\u{c3}\u{bc}"));
        lt.sql_type = SQL_BLOB;
        assert_eq!(column_value(&lt), Value::Text("ü".into()));
        // a real BLOB keeps its bytes
        let mut b = col("b", "blob", Some("caf\u{c3}\u{a9}"));
        b.sql_type = SQL_BLOB;
        assert_eq!(column_value(&b), Value::Bytes(b"caf\xc3\xa9".to_vec()));
    }

    #[test]
    fn binary_n_gets_its_trailing_zeros_back() {
        assert_eq!(
            column_value(&col("a", "binary(16)", Some("\u{ab}"))),
            Value::Bytes([vec![0xab], vec![0; 15]].concat())
        );
        assert_eq!(
            column_value(&col("a", "BINARY(4)", Some(""))),
            Value::Bytes(vec![0; 4])
        );
        assert_eq!(
            column_value(&col("a", "binary", Some(""))),
            Value::Bytes(vec![0])
        );
        // VARBINARY keeps what was written
        assert_eq!(
            column_value(&col("a", "varbinary(16)", Some("\u{ab}\u{0}"))),
            Value::Bytes(vec![0xab, 0])
        );
    }

    #[test]
    fn a_value_that_cannot_belong_to_its_column_is_an_error_naming_table_and_position() {
        // after `MODIFY COLUMN n INT AFTER id` decoded with the new structure: the VARCHAR value
        // of old column 2 is named `n` (declared int)
        let mut shifted = col("n", "int(11)", Some("v1"));
        shifted.sql_type = 12;
        shifted.index = 1;
        let change = RowChange {
            event_type: Some(WireEventType::Insert as i32),
            is_ddl: Some(false),
            row_datas: vec![RowData {
                before_columns: vec![],
                after_columns: vec![col("id", "int(11)", Some("1")), shifted],
                props: vec![],
            }],
            ..Default::default()
        };
        let entry = encode_entry(
            EntryType::RowData,
            header(Some(WireEventType::Insert)),
            change.encode_to_vec(),
        );
        let mut out = Vec::new();
        let err = decode_entries("example", &[entry], &mut out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("db.t at mysql-bin.000002:1234 row 0"), "{err}");
        assert!(
            err.contains("column `n` (position 1) is declared int(11)"),
            "{err}"
        );
        assert!(out.is_empty());
        // NULL carries no type to compare; every declared type accepts its own Canal SQL type
        let mut null = col("n", "int(11)", None);
        null.sql_type = 12;
        assert_eq!(type_mismatch(&null), None);
        for t in [
            "int(10) unsigned",
            "varchar(3)",
            "longtext",
            "binary(2)",
            "set('a')",
            "year",
        ] {
            assert_eq!(type_mismatch(&col("x", t, Some("1"))), None, "{t}");
        }
    }

    #[test]
    fn garbage_entries_are_errors_not_panics() {
        let mut out = Vec::new();
        let err = decode_entries("example", &[vec![0xff, 0xff, 0xff]], &mut out).unwrap_err();
        assert!(
            err.to_string().starts_with("entry 0: malformed Entry"),
            "{err}"
        );
        // a row entry without any event type
        let entry = encode_entry(
            EntryType::RowData,
            header(None),
            RowChange::default().encode_to_vec(),
        );
        let err = decode_entries("example", &[entry], &mut out).unwrap_err();
        assert!(err.to_string().contains("no event type"), "{err}");
    }
}
