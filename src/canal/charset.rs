//! Column character sets for a destination that ships text as raw bytes.
//!
//! Stock Canal decodes the bytes of every CHAR/VARCHAR/TEXT column with one charset, the
//! instance's `canal.instance.connectionCharset`, whatever the column's own charset; the entry
//! it sends names neither. With `connectionCharset = ISO-8859-1` every byte becomes the char
//! with the same code, so the bytes arrive intact, and the service decodes them with the
//! column's charset, which it reads from the source database's `information_schema`
//! (`canal::source`). This module owns the pure part: MySQL charset names, the decoding, and
//! the map of known tables with the rule for when an entry of it may be used.
//!
//! It fails with [`CharsetError`]: bytes that are not valid in the column's charset, a charset
//! no decoder here knows, or text Canal did not ship as ISO-8859-1 (the destination is not
//! configured as the service expects). Each names the column; none guesses.
//!
//! Freshness: a table's charsets are looked up when the first row of it needs them and again
//! after every DDL on it (the DDL's binlog position is kept with the entry, see
//! [`CharsetMap::get`]). The lookup reads the database as it is now, so binlog written before
//! a charset-changing DDL and read after it (after downtime, say) is decoded with the newer
//! charset; docs/types.md says so.

use encoding_rs::Encoding;
use std::collections::HashMap;

/// How the bytes of one text column are turned into characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charset {
    /// An encoding `encoding_rs` decodes (UTF-8, the single-byte sets, GBK, Big5, ...).
    Encoded(&'static Encoding),
    /// UTF-32 (big endian, as MySQL stores it), which `encoding_rs` does not offer.
    Utf32,
    /// The column is not in the table now (dropped since the row was written): its charset is
    /// unknown, so the bytes are taken if they are UTF-8 and refused otherwise.
    Vanished,
}

impl Charset {
    /// The decoder for a MySQL/MariaDB charset name (`information_schema.COLUMNS.
    /// CHARACTER_SET_NAME`), `None` when there is none here. Where MySQL's set and the WHATWG
    /// one differ only in C1 controls (latin1 is cp1252 in MySQL), the WHATWG decoder is used:
    /// both map the five bytes cp1252 leaves undefined to U+0081, U+008D, U+008F, U+0090 and
    /// U+009D.
    pub fn from_mysql(name: &str) -> Option<Charset> {
        use encoding_rs::*;
        let e = match name.to_ascii_lowercase().as_str() {
            "utf8" | "utf8mb3" | "utf8mb4" | "ascii" => UTF_8,
            "latin1" => WINDOWS_1252,
            "latin2" => ISO_8859_2,
            "latin5" => WINDOWS_1254,
            "latin7" => ISO_8859_13,
            "greek" => ISO_8859_7,
            "hebrew" => ISO_8859_8,
            "cp1250" => WINDOWS_1250,
            "cp1251" => WINDOWS_1251,
            "cp1256" => WINDOWS_1256,
            "cp1257" => WINDOWS_1257,
            "koi8r" => KOI8_R,
            "koi8u" => KOI8_U,
            "cp866" => IBM866,
            "macroman" => MACINTOSH,
            "tis620" => WINDOWS_874,
            "sjis" | "cp932" => SHIFT_JIS,
            "ujis" | "eucjpms" => EUC_JP,
            "euckr" => EUC_KR,
            "gbk" | "gb2312" => GBK,
            "gb18030" => GB18030,
            "big5" => BIG5,
            "ucs2" | "utf16" => UTF_16BE,
            "utf16le" => UTF_16LE,
            "utf32" => return Some(Charset::Utf32),
            _ => return None,
        };
        Some(Charset::Encoded(e))
    }

    /// The characters these bytes stand for; `None` when they are not valid in this charset.
    fn decode(self, bytes: &[u8]) -> Option<String> {
        match self {
            Charset::Encoded(e) => e
                .decode_without_bom_handling_and_without_replacement(bytes)
                .map(|s| s.into_owned()),
            Charset::Utf32 => {
                if !bytes.len().is_multiple_of(4) {
                    return None;
                }
                bytes
                    .chunks_exact(4)
                    .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
                    .collect()
            }
            Charset::Vanished => String::from_utf8(bytes.to_vec()).ok(),
        }
    }
}

/// A text column's charset as looked up: its name, and the decoder (`None`: no decoder here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnCharset {
    pub name: String,
    pub charset: Option<Charset>,
}

/// A binlog position as `(file, offset)`, ordered as the binlog is.
pub type BinlogPos = (String, u64);

/// What the source database says about one table now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableCharsets {
    /// The table exists: its text columns' charsets by lower-cased column name.
    Columns(HashMap<String, ColumnCharset>),
    /// The table no longer exists (dropped or renamed since the binlog was written).
    Gone,
}

#[derive(Debug, Clone)]
struct Known {
    charsets: TableCharsets,
    /// Looked up after the DDL at this position was in the stream (None: before any DDL the
    /// service saw on the table).
    after_ddl: Option<BinlogPos>,
}

/// `(database, table)`.
pub type TableName = (String, String);

/// A table whose charsets decoding needs (first sight, a DDL, a column not known yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub table: TableName,
    /// The latest DDL on the table in the stream before the row that needs it.
    pub after_ddl: Option<BinlogPos>,
}

/// Lookup result of [`CharsetMap::get`].
pub enum Lookup<'a> {
    Known(&'a TableCharsets),
    Needed,
}

/// The tables whose charsets the service knows. Owned by the connection actor; the lookups
/// themselves are I/O (`canal::source`).
#[derive(Debug, Default, Clone)]
pub struct CharsetMap {
    tables: HashMap<TableName, Known>,
}

impl CharsetMap {
    /// The table's charsets, usable for a row that follows the DDL at `after_ddl` (the latest
    /// DDL on this table earlier in the batch being decoded) only if they were looked up after
    /// that DDL was in the stream.
    pub fn get(&self, table: &TableName, after_ddl: Option<&BinlogPos>) -> Lookup<'_> {
        match self.tables.get(table) {
            Some(k) if after_ddl.is_none_or(|d| k.after_ddl.as_ref().is_some_and(|a| a >= d)) => {
                Lookup::Known(&k.charsets)
            }
            _ => Lookup::Needed,
        }
    }

    /// Records a lookup made for `need`.
    pub fn insert(&mut self, need: &Need, charsets: TableCharsets) {
        let after_ddl = match (self.tables.get(&need.table), &need.after_ddl) {
            // a later lookup also covers the DDLs an earlier one covered
            (Some(k), Some(d)) => k.after_ddl.clone().max(Some(d.clone())),
            (Some(k), None) => k.after_ddl.clone(),
            (None, d) => d.clone(),
        };
        self.tables.insert(
            need.table.clone(),
            Known {
                charsets,
                after_ddl,
            },
        );
    }

    /// A DDL on `table` passed at `at` (in a batch already decoded): what is known about the
    /// table is stale unless it was looked up after that DDL.
    pub fn ddl_passed(&mut self, table: &TableName, at: &BinlogPos) {
        if self
            .tables
            .get(table)
            .is_some_and(|k| k.after_ddl.as_ref().is_none_or(|a| a < at))
        {
            self.tables.remove(table);
        }
    }

    pub fn len(&self) -> usize {
        self.tables.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }
}

/// A text value that cannot be turned into characters; names the column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CharsetError {
    #[error(
        "column `{column}` holds U+{code:04X}, which Canal cannot have shipped as ISO-8859-1: \
         the destination's canal.instance.connectionCharset must be ISO-8859-1 when the \
         service runs with canal.connection_charset = \"ISO-8859-1\""
    )]
    NotRaw { column: String, code: u32 },
    #[error("column `{column}`: its charset {charset} has no decoder in canal-consumer")]
    Unsupported { column: String, charset: String },
    #[error(
        "column `{column}`: the value's bytes {hex} are not valid {charset} (the column's \
         charset now; was it changed by a DDL after this row was written?)"
    )]
    Invalid {
        column: String,
        charset: String,
        hex: String,
    },
    #[error(
        "column `{column}`: it (or its table) no longer exists in the source database, so its \
         charset is unknown, and the value's bytes {hex} are not UTF-8"
    )]
    GoneNotUtf8 { column: String, hex: String },
}

/// The bytes of a text value Canal shipped as ISO-8859-1 characters.
pub fn raw_bytes(column: &str, shipped: &str) -> Result<Vec<u8>, CharsetError> {
    shipped
        .chars()
        .map(|c| {
            u8::try_from(c as u32).map_err(|_| CharsetError::NotRaw {
                column: column.to_string(),
                code: c as u32,
            })
        })
        .collect()
}

/// The characters of a text value Canal shipped as ISO-8859-1, decoded with the column's
/// charset from `table`. `Ok(None)` when the column is not in the table's entry (a column newer
/// than the lookup: look the table up again).
pub fn decode_text(
    table: &TableCharsets,
    column: &str,
    shipped: &str,
) -> Result<Option<String>, CharsetError> {
    let bytes = raw_bytes(column, shipped)?;
    let hex = || {
        let mut h = hex::encode_upper(&bytes[..bytes.len().min(32)]);
        if bytes.len() > 32 {
            h.push_str("...");
        }
        h
    };
    let (name, charset) = match table {
        TableCharsets::Gone => {
            return match Charset::Vanished.decode(&bytes) {
                Some(s) => Ok(Some(s)),
                None => Err(CharsetError::GoneNotUtf8 {
                    column: column.to_string(),
                    hex: hex(),
                }),
            };
        }
        TableCharsets::Columns(cols) => match cols.get(&column.to_lowercase()) {
            None => return Ok(None),
            Some(cs) => (cs.name.as_str(), cs.charset),
        },
    };
    let Some(charset) = charset else {
        return Err(CharsetError::Unsupported {
            column: column.to_string(),
            charset: name.to_string(),
        });
    };
    match charset.decode(&bytes) {
        Some(s) => Ok(Some(s)),
        None if charset == Charset::Vanished => Err(CharsetError::GoneNotUtf8 {
            column: column.to_string(),
            hex: hex(),
        }),
        None => Err(CharsetError::Invalid {
            column: column.to_string(),
            charset: name.to_string(),
            hex: hex(),
        }),
    }
}

impl TableCharsets {
    /// After a lookup made because these columns were missing: a column still missing is no
    /// longer in the table ([`Charset::Vanished`]), so it is not looked up again and again.
    pub fn cover(&mut self, columns: &[String]) {
        if let TableCharsets::Columns(cols) = self {
            for c in columns {
                cols.entry(c.to_lowercase())
                    .or_insert_with(|| ColumnCharset {
                        name: "unknown (the column is no longer in the table)".into(),
                        charset: Some(Charset::Vanished),
                    });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(cols: &[(&str, &str)]) -> TableCharsets {
        TableCharsets::Columns(
            cols.iter()
                .map(|(c, n)| {
                    (
                        c.to_lowercase(),
                        ColumnCharset {
                            name: n.to_string(),
                            charset: Charset::from_mysql(n),
                        },
                    )
                })
                .collect(),
        )
    }

    /// Canal's rendering of raw bytes: one char per byte.
    fn shipped(bytes: &[u8]) -> String {
        bytes.iter().map(|&b| b as char).collect()
    }

    fn text(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    // The byte strings are MariaDB's own: `SELECT HEX(CONVERT('...' USING <charset>))`.
    #[test]
    fn decodes_each_charset_from_mariadb_bytes() {
        let t = table(&[
            ("l", "latin1"),
            ("g", "gbk"),
            ("b", "big5"),
            ("u", "utf8mb4"),
            ("u3", "utf8mb3"),
            ("c", "cp1251"),
            ("s", "sjis"),
            ("w", "utf16"),
            ("w32", "utf32"),
        ]);
        let cases: &[(&str, &[u8], &str)] = &[
            // café ÿ ß €
            (
                "l",
                &[0x63, 0x61, 0x66, 0xE9, 0x20, 0xFF, 0x20, 0xDF, 0x20, 0x80],
                "café ÿ ß €",
            ),
            ("g", &[0xBA, 0xBA, 0xD7, 0xD6], "汉字"),
            ("b", &[0xBA, 0x7E, 0xA6, 0x72], "漢字"),
            ("u", &[0xF0, 0x9F, 0x98, 0x80], "😀"),
            ("u3", &[0xC3, 0xA9], "é"),
            ("c", &[0xCF, 0xF0, 0xE8, 0xE2, 0xE5, 0xF2], "Привет"),
            ("s", &[0x93, 0xFA, 0x96, 0x7B], "日本"),
            ("w", &[0x00, 0x61, 0x6C, 0x49], "a汉"),
            ("w32", &[0x00, 0x01, 0xF6, 0x00], "😀"),
        ];
        for (col, bytes, want) in cases {
            assert_eq!(
                decode_text(&t, col, &shipped(bytes)).unwrap(),
                text(want),
                "column {col}"
            );
        }
    }

    #[test]
    fn latin1_keeps_the_bytes_cp1252_leaves_undefined() {
        let t = table(&[("l", "latin1")]);
        assert_eq!(
            decode_text(&t, "l", &shipped(&[0x81, 0x8D, 0x8F, 0x90, 0x9D])).unwrap(),
            text("\u{81}\u{8D}\u{8F}\u{90}\u{9D}")
        );
    }

    #[test]
    fn bytes_not_valid_in_the_charset_are_an_error_naming_the_column() {
        let t = table(&[("u", "utf8mb4")]);
        let e = decode_text(&t, "u", &shipped(&[0x63, 0xE9])).unwrap_err();
        assert_eq!(
            e,
            CharsetError::Invalid {
                column: "u".into(),
                charset: "utf8mb4".into(),
                hex: "63E9".into()
            }
        );
        assert!(e.to_string().contains("`u`"), "{e}");
    }

    #[test]
    fn text_that_was_not_shipped_as_iso_8859_1_is_refused() {
        let t = table(&[("u", "utf8mb4")]);
        let e = decode_text(&t, "u", "日本").unwrap_err();
        assert!(
            matches!(e, CharsetError::NotRaw { code: 0x65E5, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("connectionCharset"), "{e}");
    }

    #[test]
    fn an_unknown_charset_is_an_error_and_an_unknown_column_asks_for_a_lookup() {
        let t = table(&[("x", "armscii8")]);
        assert!(matches!(
            decode_text(&t, "x", "a"),
            Err(CharsetError::Unsupported { .. })
        ));
        assert_eq!(decode_text(&t, "new_column", "a").unwrap(), None);
        // ...until a lookup says it is gone: then UTF-8 or an error
        let mut t = table(&[("x", "latin1")]);
        t.cover(&["x".into(), "dropped".into()]);
        assert_eq!(decode_text(&t, "x", &shipped(&[0xE9])).unwrap(), text("é"));
        assert_eq!(
            decode_text(&t, "dropped", &shipped(&[0xC3, 0xA9])).unwrap(),
            text("é")
        );
        assert!(matches!(
            decode_text(&t, "dropped", &shipped(&[0xE9])),
            Err(CharsetError::GoneNotUtf8 { .. })
        ));
        // column names compare as MySQL does: case-insensitively
        let t = table(&[("Name", "latin1")]);
        assert_eq!(
            decode_text(&t, "NAME", &shipped(&[0xE9])).unwrap(),
            text("é")
        );
    }

    #[test]
    fn a_gone_table_decodes_utf8_and_refuses_anything_else() {
        assert_eq!(
            decode_text(&TableCharsets::Gone, "v", &shipped(&[0xC3, 0xA9])).unwrap(),
            text("é")
        );
        assert!(matches!(
            decode_text(&TableCharsets::Gone, "v", &shipped(&[0xE9])),
            Err(CharsetError::GoneNotUtf8 { .. })
        ));
    }

    fn pos(file: &str, off: u64) -> BinlogPos {
        (file.to_string(), off)
    }

    #[test]
    fn an_entry_serves_rows_after_a_ddl_only_if_looked_up_after_it() {
        let t: TableName = ("db".into(), "t".into());
        let mut m = CharsetMap::default();
        assert!(matches!(m.get(&t, None), Lookup::Needed));
        m.insert(
            &Need {
                table: t.clone(),
                after_ddl: None,
            },
            TableCharsets::Gone,
        );
        assert!(matches!(m.get(&t, None), Lookup::Known(_)));
        let ddl = pos("mysql-bin.000002", 400);
        assert!(matches!(m.get(&t, Some(&ddl)), Lookup::Needed));
        m.insert(
            &Need {
                table: t.clone(),
                after_ddl: Some(ddl.clone()),
            },
            TableCharsets::Gone,
        );
        assert!(matches!(m.get(&t, Some(&ddl)), Lookup::Known(_)));
        // an earlier DDL is covered by the later lookup: no endless re-lookups within a batch
        assert!(matches!(
            m.get(&t, Some(&pos("mysql-bin.000002", 100))),
            Lookup::Known(_)
        ));
        // ...and an earlier need does not move the entry back
        m.insert(
            &Need {
                table: t.clone(),
                after_ddl: Some(pos("mysql-bin.000001", 9)),
            },
            TableCharsets::Gone,
        );
        assert!(matches!(m.get(&t, Some(&ddl)), Lookup::Known(_)));
        // a DDL the entry has seen keeps it; a later one makes it stale
        m.ddl_passed(&t, &ddl);
        assert_eq!(m.len(), 1);
        m.ddl_passed(&t, &pos("mysql-bin.000003", 4));
        assert!(m.is_empty());
    }
}
