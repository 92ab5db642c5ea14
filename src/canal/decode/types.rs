//! Type restoration: a column value Canal rendered as text, back to the type its column was
//! declared with (see the parent module's docs for the rules), and the SQL types a declared
//! type may hold (the shifted-row check). Pure functions of a declared type and a string; a
//! value that does not parse as its type stays text, never a panic.

use crate::canal::proto::entry::Column;
use crate::event::Value;

/// The base name of a declared MySQL type: `bigint(20) unsigned` -> `bigint`.
///
/// Canal's table meta keeps the spelling of the DDL it parsed (with its table-meta history,
/// `BOOLEAN` stays `boolean`, `SERIAL` stays `serial`), so MySQL's synonyms are mapped to the
/// type they stand for. Expects lower case.
pub(super) fn base_type(mysql_type: &str) -> &str {
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
pub(super) fn expected_sql_types(base: &str) -> Option<&'static [i32]> {
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

/// Declared types MySQL stores like BLOBs in the binlog but that hold text.
pub(super) fn is_blob_stored_text(base: &str) -> bool {
    matches!(
        base,
        "tinytext" | "text" | "mediumtext" | "longtext" | "json"
    )
}

/// `java.sql.Types.CLOB`.
pub(super) const SQL_CLOB: i32 = 2005;

/// `java.sql.Types.BLOB`: what Canal reports for values it ships as ISO-8859-1 bytes.
pub(super) const SQL_BLOB: i32 = 2004;

/// How a declared type's values are restored, parsed once per column layout.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Kind {
    Integer,
    Bit,
    Float,
    Decimal {
        scale: usize,
    },
    Binary {
        len: usize,
    },
    Bytes,
    /// The labels, or `None` if the declaration could not be parsed (values stay as sent).
    Enum(Option<Vec<String>>),
    Set(Option<Vec<String>>),
    /// Text stored as a BLOB in the binlog (TEXT types); `json` for MariaDB's JSON alias or
    /// MySQL's JSON type (decided per value by the SQL type Canal reports).
    BlobText {
        json: bool,
    },
    /// No declared type: decided by the SQL type.
    BySqlType,
    Text,
}

impl Kind {
    pub(super) fn of(mysql_type: &str) -> Kind {
        let declared = mysql_type.to_ascii_lowercase();
        match base_type(&declared) {
            "tinyint" | "smallint" | "mediumint" | "int" | "bigint" | "year" => Kind::Integer,
            "bit" => Kind::Bit,
            "float" | "double" => Kind::Float,
            "decimal" => Kind::Decimal {
                scale: decimal_scale(&declared),
            },
            "binary" => Kind::Binary {
                len: binary_len(&declared),
            },
            "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" | "geometry"
            | "point" | "linestring" | "polygon" | "multipoint" | "multilinestring"
            | "multipolygon" | "geometrycollection" => Kind::Bytes,
            "enum" => Kind::Enum(type_labels(mysql_type)),
            "set" => Kind::Set(type_labels(mysql_type)),
            "json" => Kind::BlobText { json: true },
            base if is_blob_stored_text(base) => Kind::BlobText { json: false },
            "" => Kind::BySqlType,
            _ => Kind::Text,
        }
    }

    /// Restores a non-NULL value from Canal's string rendering.
    pub(super) fn value(&self, sql_type: i32, v: &str) -> Value {
        match self {
            Kind::Integer => integer(v),
            Kind::Bit => v.parse().map(Value::UInt).unwrap_or_else(|_| text(v)),
            Kind::Float => float(v),
            Kind::Decimal { scale } => Value::Text(decimal_text(v, *scale)),
            Kind::Binary { len } => Value::Bytes(padded(latin1_bytes(v), *len)),
            Kind::Bytes => Value::Bytes(latin1_bytes(v)),
            Kind::Enum(labels) => labels
                .as_deref()
                .and_then(|l| enum_label(l, v))
                .map_or_else(|| text(v), Value::Text),
            Kind::Set(labels) => labels
                .as_deref()
                .and_then(|l| set_labels(l, v))
                .map_or_else(|| text(v), Value::Text),
            // Text stored as a BLOB in the binlog (TEXT types, MariaDB's JSON) that Canal did
            // not recognise as text because its table meta spells the type differently (`json`
            // for a table it saw created, `text(1000)`, `long varchar`): Canal then ships the
            // bytes as ISO-8859-1 characters (SQL type BLOB). Decode them as Canal decodes text
            // (its connection charset, UTF-8), so the value is the same as for `longtext`.
            Kind::BlobText { .. } if sql_type == SQL_BLOB => Value::Text(
                String::from_utf8(latin1_bytes(v))
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            ),
            // MariaDB's JSON (a LONGTEXT alias Canal ships as bytes) after raw text mode
            // decoded it with its column's charset (and retyped it CLOB): text, as above
            Kind::BlobText { json: true } if sql_type == SQL_CLOB => text(v),
            // MySQL's binary JSON, rendered as JSON text by Canal
            Kind::BlobText { json: true } => serde_json::from_str(v)
                .map(Value::Json)
                .unwrap_or_else(|_| text(v)),
            Kind::BlobText { json: false } | Kind::Text => text(v),
            Kind::BySqlType => by_sql_type(sql_type, v),
        }
    }
}

/// A column's declared type, parsed once, for values read straight from MySQL (a backfill's
/// SELECT over the text protocol) rather than from Canal: the same [`Value`] a binlog change
/// of the same value decodes to.
#[derive(Debug, Clone, PartialEq)]
pub struct DeclaredType(Kind);

impl DeclaredType {
    /// `mysql_type` as `information_schema.COLUMNS.COLUMN_TYPE` spells it (`int(11) unsigned`,
    /// `enum('a','b')`), which is also what Canal reports.
    pub fn parse(mysql_type: &str) -> DeclaredType {
        DeclaredType(Kind::of(mysql_type))
    }

    /// Whether rows can be paged through by this column in key order with exact comparisons
    /// of the values read back: not for FLOAT/DOUBLE (their text is rounded), ENUM/SET (they
    /// sort by index but compare as text) or JSON; `None` when it can, else the type's name.
    pub fn unfit_for_paging(&self) -> Option<&'static str> {
        match &self.0 {
            Kind::Float => Some("FLOAT/DOUBLE"),
            Kind::Enum(_) => Some("ENUM"),
            Kind::Set(_) => Some("SET"),
            Kind::BlobText { json: true } => Some("JSON"),
            _ => None,
        }
    }

    /// The value of MySQL's text-protocol rendering `bytes` (`None` for NULL). Where MySQL's
    /// rendering differs from Canal's, this follows what `Kind::value` makes of Canal's: BIT
    /// arrives as its bytes (Canal: the number), ENUM and SET as their labels (Canal: index
    /// and bitmask), binary types as their bytes (Canal: one char per byte). Text and bytes
    /// keep the buffer they came in (no copy).
    pub fn from_mysql_text(&self, bytes: Option<Vec<u8>>) -> Value {
        let Some(b) = bytes else {
            return Value::Null;
        };
        // text as is when it is UTF-8 (it always is from a utf8mb4 column), else lossily
        let owned = |b: Vec<u8>| {
            String::from_utf8(b)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
        };
        match &self.0 {
            Kind::Bit => Value::UInt(b.iter().fold(0u64, |n, x| (n << 8) | u64::from(*x))),
            Kind::Binary { len } => Value::Bytes(padded(b, *len)),
            Kind::Bytes => Value::Bytes(b),
            Kind::Enum(_) | Kind::Set(_) | Kind::BySqlType | Kind::Text => Value::Text(owned(b)),
            Kind::BlobText { json: false } => Value::Text(owned(b)),
            Kind::BlobText { json: true } => {
                let t = owned(b);
                serde_json::from_str(&t)
                    .map(Value::Json)
                    .unwrap_or(Value::Text(t))
            }
            kind => kind.value(0, &String::from_utf8_lossy(&b)),
        }
    }
}

/// Restores a typed value from Canal's string rendering of one column (parsing its declared
/// type; the decoder does that once per layout instead).
pub fn column_value(col: &Column) -> Value {
    if col.is_null.unwrap_or(false) {
        return Value::Null;
    }
    Kind::of(&col.mysql_type).value(col.sql_type, &col.value)
}

/// Fallback when the declared type is unknown: decide by the `java.sql.Types` code.
pub(super) fn by_sql_type(sql_type: i32, v: &str) -> Value {
    match sql_type {
        -6 | 5 | 4 | -5 => integer(v),
        -7 => v.parse().map(Value::UInt).unwrap_or_else(|_| text(v)),
        6..=8 => float(v),
        2004 | -2 | -3 | -4 => Value::Bytes(latin1_bytes(v)),
        _ => text(v),
    }
}

pub(super) fn text(v: &str) -> Value {
    Value::Text(v.to_string())
}

pub(super) fn integer(v: &str) -> Value {
    if let Ok(i) = v.parse::<i64>() {
        Value::Int(i)
    } else if let Ok(u) = v.parse::<u64>() {
        Value::UInt(u)
    } else {
        text(v)
    }
}

pub(super) fn float(v: &str) -> Value {
    match v {
        "NaN" => Value::Float(f64::NAN),
        "Infinity" => Value::Float(f64::INFINITY),
        "-Infinity" => Value::Float(f64::NEG_INFINITY),
        _ => v.parse().map(Value::Float).unwrap_or_else(|_| text(v)),
    }
}

/// Canal maps each byte to the char with the same code (ISO-8859-1); undo that. A char above
/// U+00FF cannot come from that mapping, so such text is kept as its UTF-8 bytes.
pub(super) fn latin1_bytes(v: &str) -> Vec<u8> {
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
pub(super) fn decimal_text(v: &str, scale: usize) -> String {
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

/// The declared scale of `decimal(p,s)` (lower case), 0 if none.
pub(super) fn decimal_scale(declared: &str) -> usize {
    declared
        .split_once('(')
        .and_then(|(_, args)| args.split(')').next())
        .and_then(|args| args.split(',').nth(1))
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(0)
}

/// `BINARY(n)` values are stored right-padded with zero bytes to n bytes, and that is what
/// MySQL returns; the binlog carries them with the trailing zeros stripped. Pad them back.
pub(super) fn padded(mut bytes: Vec<u8>, n: usize) -> Vec<u8> {
    if bytes.len() < n {
        bytes.resize(n, 0);
    }
    bytes
}

/// n of `binary(n)` (lower case); plain BINARY is BINARY(1).
pub(super) fn binary_len(declared: &str) -> usize {
    declared
        .strip_prefix("binary(")
        .and_then(|r| r.split(')').next())
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or(1)
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

pub(super) fn enum_label(labels: &[String], v: &str) -> Option<String> {
    let index: usize = v.parse().ok()?;
    if index == 0 {
        return Some(String::new()); // MySQL's "invalid value" enum member
    }
    labels.get(index - 1).cloned()
}

/// MySQL and MariaDB allow at most 64 members in a SET (one bit each of a u64).
pub(super) const MAX_SET_MEMBERS: usize = 64;

/// The labels of a SET bitmask, `None` when the mask names a member the type does not have,
/// or when the declared type lists more members than a SET can have (then it is not a SET
/// MySQL would accept, and the labels could not be trusted to match the bits).
pub(super) fn set_labels(labels: &[String], v: &str) -> Option<String> {
    let mask: u64 = v.parse().ok()?;
    if labels.len() > MAX_SET_MEMBERS {
        return None;
    }
    if labels.len() < MAX_SET_MEMBERS && mask >> labels.len() != 0 {
        return None;
    }
    let mut out = String::new();
    let mut first = true;
    for (i, l) in labels.iter().enumerate() {
        if mask & (1u64 << i) != 0 {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(l);
        }
    }
    Some(out)
}
