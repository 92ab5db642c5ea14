//! The change-event model every consumer sees.
//!
//! A [`ChangeEvent`] is one row change (or one DDL statement) decoded from a Canal entry. It is
//! independent of the wire format: the Canal codec builds it (`canal::decode`), consumers read
//! it, and rules render it. Column values are typed ([`Value`]): SQL NULL is distinct from the
//! empty string, binary columns hold their exact bytes, and decimals, dates and times keep their
//! exact text so nothing is lost to floating point or time-zone conversion.
//!
//! Transaction begin/end are boundaries, not events: they never become a `ChangeEvent`.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use std::fmt;

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
}

impl EventType {
    /// Every kind, in Canal's numbering order.
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
        }
    }

    /// True for INSERT, UPDATE and DELETE.
    pub fn is_row(self) -> bool {
        matches!(
            self,
            EventType::Insert | EventType::Update | EventType::Delete
        )
    }

    /// Parses a name case-insensitively; `DDL` is not accepted here (it is a set, see
    /// [`EventType::DDL`]).
    pub fn parse(name: &str) -> Option<EventType> {
        let upper = name.trim().to_ascii_uppercase();
        EventType::ALL.into_iter().find(|t| t.as_str() == upper)
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

    /// The value as JSON (see the type-level docs for the mapping).
    pub fn to_json(&self) -> serde_json::Value {
        use base64::Engine as _;
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Int(i) => (*i).into(),
            Value::UInt(u) => (*u).into(),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or_else(|| serde_json::Value::String(f.to_string())),
            Value::Text(s) => serde_json::Value::String(s.clone()),
            Value::Bytes(b) => serde_json::json!({
                "base64": base64::engine::general_purpose::STANDARD.encode(b)
            }),
            Value::Json(j) => j.clone(),
        }
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
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
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

/// A row image: column name to value, in table column order.
pub type Row = IndexMap<String, Value>;

/// Where an event sits in the binlog. `(log_file, offset, row_index)` identifies a row change
/// uniquely, which is what deterministic message ids are derived from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Position {
    /// Binlog file name, e.g. `mysql-bin.000003`.
    pub log_file: String,
    /// Start offset of the binlog event in that file.
    pub offset: u64,
    /// Index of the row inside the binlog row event (0-based).
    pub row_index: u32,
    /// The MySQL `server_id` that wrote the binlog event (0 if Canal did not say).
    #[serde(default)]
    pub server_id: u64,
    /// The server's GTID set at this event, when the Canal server tracks GTIDs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gtid: Option<String>,
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
    pub destination: String,
    pub database: String,
    pub table: String,
    pub event_type: EventType,
    /// The row: the after image for INSERT/UPDATE, the before image for DELETE; empty for DDL.
    pub data: Row,
    /// UPDATE only: the before values of the columns that changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<Row>,
    /// Names of the columns Canal flags as updated (UPDATE: changed; INSERT: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
    /// Primary-key column names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub primary_keys: Vec<String>,
    pub position: Position,
    /// When the change was executed on the source, milliseconds since the Unix epoch.
    pub executed_at: i64,
    /// True for schema changes (Canal's `isDdl`).
    #[serde(default)]
    pub is_ddl: bool,
    /// The statement text for DDL and query events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
}

impl ChangeEvent {
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
        self.changed.iter().any(|c| c == column)
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
