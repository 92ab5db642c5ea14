//! The change-event model every consumer sees.
//!
//! A [`ChangeEvent`] is one row change (or one DDL statement) decoded from a Canal entry. It is
//! independent of the wire format: the Canal codec builds it (`canal::decode`), consumers read
//! it, and rules render it. Column values are typed ([`Value`]): SQL NULL is distinct from the
//! empty string, binary columns hold their exact bytes, and decimals, dates and times keep their
//! exact text so nothing is lost to floating point or time-zone conversion.
//!
//! Transaction begin/end are boundaries, not events: they never become a `ChangeEvent`.
//!
//! Names are shared, not copied per row: database, table and binlog file names are `Arc<str>`s,
//! and a row's column names live in [`Columns`] that every row of the same table layout shares
//! ([`Row`], [`ColumnSet`]).

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// What happened. Row events are INSERT/UPDATE/DELETE; the rest are statement-level kinds
/// that Canal reports for DDL and other queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EventType {
    Insert,
    Update,
    Delete,
    Create,
    Alter,
    Erase,
    Query,
    Truncate,
    Rename,
    Cindex,
    Dindex,
    Gtid,
    Xacommit,
    Xarollback,
    Mheartbeat,
    /// A row read by a backfill (the `backfill` module), not a binlog change: the full row as it
    /// was when its chunk was read. Never routed to a filter that does not name it.
    Snapshot,
}

impl EventType {
    /// Every kind Canal sends, in Canal's numbering order (not [`EventType::Snapshot`], which
    /// only a backfill makes).
    pub const ALL: [EventType; 15] = [
        EventType::Insert,
        EventType::Update,
        EventType::Delete,
        EventType::Create,
        EventType::Alter,
        EventType::Erase,
        EventType::Query,
        EventType::Truncate,
        EventType::Rename,
        EventType::Cindex,
        EventType::Dindex,
        EventType::Gtid,
        EventType::Xacommit,
        EventType::Xarollback,
        EventType::Mheartbeat,
    ];

    /// The upper-case name used in config files and JSON (`"INSERT"`, `"ALTER"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Insert => "INSERT",
            EventType::Update => "UPDATE",
            EventType::Delete => "DELETE",
            EventType::Create => "CREATE",
            EventType::Alter => "ALTER",
            EventType::Erase => "ERASE",
            EventType::Query => "QUERY",
            EventType::Truncate => "TRUNCATE",
            EventType::Rename => "RENAME",
            EventType::Cindex => "CINDEX",
            EventType::Dindex => "DINDEX",
            EventType::Gtid => "GTID",
            EventType::Xacommit => "XACOMMIT",
            EventType::Xarollback => "XAROLLBACK",
            EventType::Mheartbeat => "MHEARTBEAT",
            EventType::Snapshot => "SNAPSHOT",
        }
    }

    /// True for INSERT, UPDATE, DELETE and SNAPSHOT: the events that carry a row.
    pub fn is_row(self) -> bool {
        matches!(
            self,
            EventType::Insert | EventType::Update | EventType::Delete | EventType::Snapshot
        )
    }

    /// Parses a name case-insensitively; `DDL` is not accepted here (it is a set, see
    /// [`EventType::DDL`]).
    pub fn parse(name: &str) -> Option<EventType> {
        let upper = name.trim().to_ascii_uppercase();
        EventType::ALL
            .into_iter()
            .chain([EventType::Snapshot])
            .find(|t| t.as_str() == upper)
    }

    /// The statement kinds Canal reports for schema changes.
    pub const DDL: [EventType; 7] = [
        EventType::Create,
        EventType::Alter,
        EventType::Erase,
        EventType::Truncate,
        EventType::Rename,
        EventType::Cindex,
        EventType::Dindex,
    ];
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One column value.
///
/// JSON form (used by `tail`, the envelope and templates): `Null` is `null`, integers and
/// floats are numbers, `Text` is a string, `Json` is the parsed document, and `Bytes` is
/// `{"base64": "..."}` so binary data never masquerades as text.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    UInt(u64),
    Float(f64),
    /// Text, and every type whose exact text matters: DECIMAL, DATE, DATETIME, TIMESTAMP, TIME,
    /// ENUM and SET labels, MariaDB's JSON (see docs/types.md).
    Text(String),
    /// BLOB, BINARY, VARBINARY and GEOMETRY columns, restored byte for byte.
    Bytes(Vec<u8>),
    /// A MySQL JSON column, parsed.
    Json(serde_json::Value),
}

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The value as JSON (see the type-level docs for the mapping): what its `Serialize` writes,
    /// the one place that spells the rule for bytes and non-finite floats.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// A plain-text rendering: the text itself, the number, `None` for NULL; bytes as lossy
    /// UTF-8. Used where a string is wanted (routing keys, log fields).
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Null => None,
            Value::Int(i) => Some(i.to_string()),
            Value::UInt(u) => Some(u.to_string()),
            Value::Float(f) => Some(f.to_string()),
            Value::Text(s) => Some(s.clone()),
            Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::Json(j) => Some(j.to_string()),
        }
    }
}

impl Serialize for Value {
    /// Bytes as `{"base64": ...}` (so binary data never masquerades as text), non-finite floats
    /// as their text (JSON has no NaN or infinity); the rest as JSON has it.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        use serde::ser::SerializeMap;
        match self {
            Value::Null => s.serialize_unit(),
            Value::Int(i) => s.serialize_i64(*i),
            Value::UInt(u) => s.serialize_u64(*u),
            Value::Float(f) if f.is_finite() => s.serialize_f64(*f),
            Value::Float(f) => s.collect_str(f),
            Value::Text(t) => s.serialize_str(t),
            Value::Bytes(b) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry(
                    "base64",
                    &base64::engine::general_purpose::STANDARD.encode(b),
                )?;
                m.end()
            }
            Value::Json(j) => j.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    /// The inverse of [`Value::to_json`] as far as JSON allows: `{"base64": ..}` becomes bytes,
    /// other objects and arrays become `Json`, integers `Int`/`UInt`, other numbers `Float`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine as _;
        let json = serde_json::Value::deserialize(d)?;
        Ok(match json {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Json(serde_json::Value::Bool(b)),
            serde_json::Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Value::Int(i)
                } else if let Some(u) = n.as_u64() {
                    Value::UInt(u)
                } else {
                    Value::Float(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            serde_json::Value::String(s) => Value::Text(s),
            serde_json::Value::Object(ref m) if m.len() == 1 && m.contains_key("base64") => {
                let text = m["base64"].as_str().unwrap_or_default();
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(serde::de::Error::custom)?;
                Value::Bytes(bytes)
            }
            other => Value::Json(other),
        })
    }
}

/// The column names of one table layout, shared by every row (and every [`ColumnSet`]) decoded
/// with that layout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Columns {
    names: Vec<Arc<str>>,
    /// Name lookup for wide tables (a scan is faster below [`Columns::SCAN_MAX`] columns).
    index: Option<HashMap<Arc<str>, u32>>,
}

impl Columns {
    const SCAN_MAX: usize = 16;

    pub fn new(names: Vec<Arc<str>>) -> Columns {
        let mut c = Columns { names, index: None };
        c.reindex();
        c
    }

    fn reindex(&mut self) {
        self.index = (self.names.len() > Self::SCAN_MAX).then(|| {
            let mut m = HashMap::with_capacity(self.names.len());
            for (i, n) in self.names.iter().enumerate() {
                // the first of two equal names wins, as a scan would find it
                m.entry(n.clone()).or_insert(i as u32);
            }
            m
        });
    }

    fn push(&mut self, name: Arc<str>) -> u32 {
        let i = self.names.len() as u32;
        if let Some(m) = &mut self.index {
            m.entry(name.clone()).or_insert(i);
            self.names.push(name);
        } else {
            self.names.push(name);
            self.reindex();
        }
        i
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn names(&self) -> &[Arc<str>] {
        &self.names
    }

    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// The position of a column.
    pub fn find(&self, name: &str) -> Option<usize> {
        match &self.index {
            Some(m) => m.get(name).map(|&i| i as usize),
            None => self.names.iter().position(|n| &**n == name),
        }
    }
}

/// A row image: column name to value, in table column order.
///
/// The names live in shared [`Columns`] (one allocation per table layout and batch, not per
/// row); the row holds the values, each tagged with its column. Behaves like an ordered map
/// (`get`, `iter`, `insert`, `row["name"]`); two rows are equal when they hold the same names
/// with the same values, whatever the order (like `IndexMap`). JSON: an object in column order.
#[derive(Clone, Default)]
pub struct Row {
    columns: Arc<Columns>,
    /// `(column, value)`, in row order. Decoded rows have every column in order; an UPDATE's
    /// `old` holds the changed ones only.
    slots: Vec<(u32, Value)>,
}

impl Row {
    pub fn new() -> Row {
        Row::default()
    }

    pub fn with_capacity(n: usize) -> Row {
        Row {
            columns: Arc::default(),
            slots: Vec::with_capacity(n),
        }
    }

    /// A row holding one value per column of `columns`, in order.
    pub fn from_values(columns: Arc<Columns>, values: Vec<Value>) -> Row {
        debug_assert_eq!(columns.len(), values.len());
        let slots = values
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i as u32, v))
            .collect();
        Row { columns, slots }
    }

    /// A row over shared `columns` from `(column position, value)` pairs.
    pub fn from_slots(columns: Arc<Columns>, slots: Vec<(u32, Value)>) -> Row {
        debug_assert!(slots.iter().all(|(i, _)| (*i as usize) < columns.len()));
        Row { columns, slots }
    }

    /// The shared column names this row is built on.
    pub fn columns(&self) -> &Arc<Columns> {
        &self.columns
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn slot(&self, name: &str) -> Option<usize> {
        let c = self.columns.find(name)?;
        match self.slots.get(c) {
            Some((i, _)) if *i as usize == c => Some(c),
            _ => self.slots.iter().position(|(i, _)| *i as usize == c),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.slot(name).map(|s| &self.slots[s].1)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.slot(name).is_some()
    }

    /// Sets a column's value (kept in place if the row has it, appended otherwise) and
    /// returns the previous value.
    pub fn insert(&mut self, name: Arc<str>, value: Value) -> Option<Value> {
        if let Some(s) = self.slot(&name) {
            return Some(std::mem::replace(&mut self.slots[s].1, value));
        }
        let c = match self.columns.find(&name) {
            Some(c) => c as u32,
            None => Arc::make_mut(&mut self.columns).push(name),
        };
        self.slots.push((c, value));
        None
    }

    /// `(name, value)` in row order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Value)> + '_ {
        self.slots
            .iter()
            .map(|(i, v)| (self.columns.name(*i as usize), v))
    }

    /// `(shared name, value)` in row order.
    pub fn iter_shared(&self) -> impl ExactSizeIterator<Item = (&Arc<str>, &Value)> + '_ {
        self.slots
            .iter()
            .map(|(i, v)| (&self.columns.names[*i as usize], v))
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl ExactSizeIterator<Item = &Value> + '_ {
        self.slots.iter().map(|(_, v)| v)
    }
}

impl std::ops::Index<&str> for Row {
    type Output = Value;
    fn index(&self, name: &str) -> &Value {
        self.get(name)
            .unwrap_or_else(|| panic!("row has no column `{name}`"))
    }
}

impl PartialEq for Row {
    fn eq(&self, other: &Row) -> bool {
        self.len() == other.len() && self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

impl fmt::Debug for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Into<Arc<str>>> FromIterator<(K, Value)> for Row {
    fn from_iter<I: IntoIterator<Item = (K, Value)>>(iter: I) -> Row {
        let mut row = Row::new();
        for (k, v) in iter {
            row.insert(k.into(), v);
        }
        row
    }
}

impl Serialize for Row {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Row {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let m = IndexMap::<String, Value>::deserialize(d)?;
        Ok(m.into_iter().collect())
    }
}

/// A set of column names (an event's `changed` and `primary_keys`), stored as bits over
/// shared [`Columns`]: no allocation per row for tables of up to 64 columns. Iterates in
/// column order; JSON: a list of names.
#[derive(Clone, Default)]
pub struct ColumnSet {
    columns: Arc<Columns>,
    bits: Bits,
}

#[derive(Clone, PartialEq, Eq)]
enum Bits {
    Inline(u64),
    Wide(Arc<[u64]>),
}

impl Default for Bits {
    fn default() -> Self {
        Bits::Inline(0)
    }
}

impl Bits {
    fn get(&self, i: usize) -> bool {
        match self {
            Bits::Inline(b) => i < 64 && b & (1 << i) != 0,
            Bits::Wide(w) => w.get(i / 64).is_some_and(|b| b & (1 << (i % 64)) != 0),
        }
    }

    fn count(&self) -> usize {
        match self {
            Bits::Inline(b) => b.count_ones() as usize,
            Bits::Wide(w) => w.iter().map(|b| b.count_ones() as usize).sum(),
        }
    }
}

/// Builds the bits of a [`ColumnSet`] over `n` columns.
#[derive(Debug, Clone)]
pub struct ColumnSetBuilder {
    inline: u64,
    wide: Vec<u64>,
}

impl ColumnSetBuilder {
    pub fn new(n: usize) -> Self {
        ColumnSetBuilder {
            inline: 0,
            wide: if n > 64 {
                vec![0; n.div_ceil(64)]
            } else {
                Vec::new()
            },
        }
    }

    pub fn set(&mut self, i: usize) {
        if self.wide.is_empty() {
            self.inline |= 1 << i;
        } else {
            self.wide[i / 64] |= 1 << (i % 64);
        }
    }

    pub fn build(self, columns: Arc<Columns>) -> ColumnSet {
        let bits = if self.wide.is_empty() {
            Bits::Inline(self.inline)
        } else {
            Bits::Wide(self.wide.into())
        };
        ColumnSet { columns, bits }
    }
}

impl ColumnSet {
    pub fn new() -> Self {
        ColumnSet::default()
    }

    /// Every column of `columns`.
    pub fn all(columns: Arc<Columns>) -> ColumnSet {
        let mut b = ColumnSetBuilder::new(columns.len());
        for i in 0..columns.len() {
            b.set(i);
        }
        b.build(columns)
    }

    pub fn is_empty(&self) -> bool {
        self.bits.count() == 0
    }

    pub fn len(&self) -> usize {
        self.bits.count()
    }

    /// Column positions in the set, ascending.
    pub fn positions(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.columns.len()).filter(|&i| self.bits.get(i))
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        self.positions().map(|i| self.columns.name(i))
    }

    pub fn iter_shared(&self) -> impl Iterator<Item = &Arc<str>> + '_ {
        self.positions().map(|i| &self.columns.names[i])
    }

    pub fn contains(&self, name: &str) -> bool {
        // a name can repeat only in hand-built sets; check every occurrence
        match self.columns.find(name) {
            Some(i) if self.bits.get(i) => true,
            Some(_) if self.columns.index.is_none() => self
                .columns
                .names
                .iter()
                .enumerate()
                .any(|(i, n)| &**n == name && self.bits.get(i)),
            _ => false,
        }
    }

    pub fn clear(&mut self) {
        *self = ColumnSet::default();
    }

    /// The names, as owned strings.
    pub fn to_vec(&self) -> Vec<String> {
        self.iter().map(str::to_string).collect()
    }
}

impl<K: Into<Arc<str>>> FromIterator<K> for ColumnSet {
    fn from_iter<I: IntoIterator<Item = K>>(iter: I) -> ColumnSet {
        let names: Vec<Arc<str>> = iter.into_iter().map(Into::into).collect();
        ColumnSet::all(Arc::new(Columns::new(names)))
    }
}

impl<K: Into<Arc<str>>> From<Vec<K>> for ColumnSet {
    fn from(v: Vec<K>) -> ColumnSet {
        v.into_iter().collect()
    }
}

impl<const N: usize> From<[&str; N]> for ColumnSet {
    fn from(v: [&str; N]) -> ColumnSet {
        v.into_iter().collect()
    }
}

impl<const N: usize> PartialEq<[&str; N]> for ColumnSet {
    fn eq(&self, other: &[&str; N]) -> bool {
        self.iter().eq(other.iter().copied())
    }
}

impl PartialEq for ColumnSet {
    fn eq(&self, other: &ColumnSet) -> bool {
        self.iter().eq(other.iter())
    }
}

impl fmt::Debug for ColumnSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for ColumnSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for ColumnSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Vec::<String>::deserialize(d)?.into_iter().collect())
    }
}

/// Where an event sits in the binlog. `(log_file, offset, row_index)` identifies a row change
/// uniquely, which is what deterministic message ids are derived from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Position {
    /// Binlog file name, e.g. `mysql-bin.000003`.
    pub log_file: Arc<str>,
    /// Start offset of the binlog event in that file.
    pub offset: u64,
    /// Index of the row inside the binlog row event (0-based).
    pub row_index: u32,
    /// The MySQL `server_id` that wrote the binlog event (0 if Canal did not say).
    #[serde(default)]
    pub server_id: u64,
    /// The server's GTID set at this event, when the Canal server tracks GTIDs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gtid: Option<Arc<str>>,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}#{}", self.log_file, self.offset, self.row_index)
    }
}

/// One change: a row of an INSERT/UPDATE/DELETE, or a DDL/query statement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeEvent {
    /// The Canal destination (instance) this came from.
    pub destination: Arc<str>,
    pub database: Arc<str>,
    pub table: Arc<str>,
    pub event_type: EventType,
    /// The row: the after image for INSERT/UPDATE, the before image for DELETE; empty for DDL.
    pub data: Row,
    /// UPDATE only: the before values of the columns that changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<Row>,
    /// Names of the columns Canal flags as updated (UPDATE: changed; INSERT: all).
    #[serde(default, skip_serializing_if = "ColumnSet::is_empty")]
    pub changed: ColumnSet,
    /// Primary-key column names.
    #[serde(default, skip_serializing_if = "ColumnSet::is_empty")]
    pub primary_keys: ColumnSet,
    pub position: Position,
    /// When the change was executed on the source, milliseconds since the Unix epoch (ages
    /// and lags are measured against [`crate::clock::now_ms`]).
    pub executed_at: i64,
    /// True for schema changes (Canal's `isDdl`).
    #[serde(default)]
    pub is_ddl: bool,
    /// The statement text for DDL and query events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    /// SNAPSHOT events only: the backfill that read the row, and its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Arc<SnapshotOrigin>>,
}

/// Where a SNAPSHOT event comes from: which backfill read it, and the row's primary key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotOrigin {
    /// The backfill's id.
    pub backfill: Arc<str>,
    /// The primary key's values, as a JSON array in key column order (e.g. `[42]`,
    /// `["eu",7]`): with the backfill, table and consumer, what the message id is made of.
    pub key: String,
    /// The consumer the backfill is for; `None`: every consumer whose filters name SNAPSHOT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<Arc<str>>,
}

/// Which backfill read a SNAPSHOT row came from: the position and time of the read's high
/// watermark, where all its rows are emitted (no two reads share one).
pub type ReadMark<'a> = (&'a Position, i64);

/// Whether two rows are SNAPSHOT rows of different backfill reads (live rows never are).
pub fn other_read(a: Option<ReadMark<'_>>, b: Option<ReadMark<'_>>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a != b)
}

impl ChangeEvent {
    /// The read a SNAPSHOT row came from (see [`other_read`]); `None` for other events.
    pub fn read(&self) -> Option<ReadMark<'_>> {
        self.snapshot
            .as_ref()
            .map(|_| (&self.position, self.executed_at))
    }

    /// `database.table`.
    pub fn full_table(&self) -> String {
        format!("{}.{}", self.database, self.table)
    }

    /// The value of a column in `data`.
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.data.get(column)
    }

    /// The value a column had before an UPDATE, if it changed.
    pub fn old_value(&self, column: &str) -> Option<&Value> {
        self.old.as_ref().and_then(|o| o.get(column))
    }

    /// Whether an UPDATE changed this column (Canal's `updated` flag).
    pub fn column_changed(&self, column: &str) -> bool {
        self.changed.contains(column)
    }

    /// The JSON form used by `tail` and as the input of templates.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a ChangeEvent always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_json_round_trip_keeps_bytes_and_null_apart_from_text() {
        let values = vec![
            Value::Null,
            Value::Text(String::new()),
            Value::Bytes(vec![0, 0xff, 0x80]),
            Value::Int(-5),
            Value::UInt(u64::MAX),
            Value::Float(1.5),
        ];
        for v in values {
            let json = serde_json::to_string(&v).unwrap();
            let back: Value = serde_json::from_str(&json).unwrap();
            assert_eq!(back, v, "{json}");
        }
    }

    #[test]
    fn event_type_parses_case_insensitively() {
        assert_eq!(EventType::parse("insert"), Some(EventType::Insert));
        assert_eq!(EventType::parse(" Alter "), Some(EventType::Alter));
        assert_eq!(EventType::parse("upsert"), None);
    }
}
