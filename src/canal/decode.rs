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
//!   the text is kept as written (whether Canal's table meta calls it `longtext` or `json`);
//! - text is taken as Canal decoded it (its connection charset), or, for a destination that
//!   ships text as raw bytes ([`Decoder::with_charsets`]), decoded with each column's charset.
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
//! Speed: entries are read by prost, but the row changes inside them (nearly all the bytes) by
//! our own zero-copy reader ([`wire`]): column names, declared types and values are borrowed
//! from the frame. What rows of one table share is built once per table and column layout and
//! batch ([`Decoder`]): the column names ([`crate::event::Columns`], shared by every row through
//! an `Arc`), the parsed declared types (ENUM/SET labels, DECIMAL scales, BINARY lengths), the
//! SQL types each may hold, the key columns. Per row only the values are made. The prost-based
//! decoder this replaced lives on as `canal::fuzz::reference_decode`, and every fuzz input is
//! checked to decode the same with both. `benches/decode.rs` measures both against prost alone.
//!
//! (Why this file is long: about 320 of its lines are the unit tests of every column type's
//! byte-level decoding, kept beside the code they pin.)

use crate::canal::charset::{self, BinlogPos, CharsetError, CharsetMap, Lookup, Need, TableName};
use crate::canal::proto::entry::{Column, Entry, EntryType, EventType as WireEventType, Header};
use crate::event::{
    ArcStr, ChangeEvent, ColumnSet, ColumnSetBuilder, Columns, EventType, Position, Row, Value,
};
use prost::Message as _;
use std::collections::HashMap;
use std::sync::Arc;

/// A decoding failure inside a batch.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("entry {index}: malformed {what}: {source}")]
    Protobuf {
        index: usize,
        what: &'static str,
        source: prost::DecodeError,
    },
    /// The row-change bytes break the protobuf wire format (read by our own reader, see
    /// [`wire`]).
    #[error("entry {index}: malformed {what}: {reason}")]
    Wire {
        index: usize,
        what: &'static str,
        reason: wire::WireError,
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
    Decoder::new(destination).decode_entries(entries, out)
}

/// Raw text mode state while one batch is decoded (`canal.connection_charset =
/// "ISO-8859-1"`): Canal shipped the bytes of text columns as ISO-8859-1 characters, and each
/// is decoded with its column's charset from `map` (`canal::charset`).
#[derive(Debug)]
struct RawText {
    map: Arc<CharsetMap>,
    /// The latest DDL on each table so far in this batch.
    ddl_seen: HashMap<TableName, BinlogPos>,
    /// Lookups the batch needs, with the columns found missing.
    needs: Vec<(Need, Vec<String>)>,
}

impl RawText {
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
fn is_charset_text(mysql_type: &[u8]) -> bool {
    let declared = String::from_utf8_lossy(mysql_type).to_ascii_lowercase();
    matches!(
        base_type(&declared),
        "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" | "json"
    )
}

/// `java.sql.Types.CLOB`.
const SQL_CLOB: i32 = 2005;

/// Raw text mode: the text of each text column of `cols` decoded with its charset from
/// `table` (`None` for other columns and NULLs); a column the table's entry lacks is added to
/// `missing` (look the table up again).
fn recode(
    cols: &[wire::ColumnRef<'_>],
    table: &charset::TableCharsets,
    missing: &mut Vec<String>,
) -> Result<Vec<Option<String>>, CharsetError> {
    let mut out = Vec::with_capacity(cols.len());
    for c in cols {
        if c.is_null.unwrap_or(false) || !is_charset_text(c.mysql_type) {
            out.push(None);
            continue;
        }
        let name = String::from_utf8_lossy(c.name);
        match charset::decode_text(table, &name, c.value)? {
            Some(text) => out.push(Some(text)),
            None => {
                if !missing.iter().any(|m| *m == name) {
                    missing.push(name.into_owned());
                }
                out.push(None);
            }
        }
    }
    Ok(out)
}

/// `cols` with the recoded texts in place (a BLOB-typed one retyped CLOB, so it is read as
/// text from here on).
fn with_texts<'a>(
    cols: &[wire::ColumnRef<'a>],
    texts: &'a [Option<String>],
) -> Vec<wire::ColumnRef<'a>> {
    cols.iter()
        .zip(texts)
        .map(|(c, t)| match t {
            Some(text) => wire::ColumnRef {
                value: text.as_str(),
                sql_type: if c.sql_type == SQL_BLOB {
                    SQL_CLOB
                } else {
                    c.sql_type
                },
                ..*c
            },
            None => *c,
        })
        .collect()
}

/// Decodes entries, sharing what rows have in common: one [`Columns`] (names), one parsed
/// column layout (declared types, ENUM/SET labels, DECIMAL scales, key flags) per table and
/// column layout, and one copy of each database, table and binlog file name. Rows reference
/// them; only the values are per row. Meant to live for one batch (its caches only grow).
#[derive(Debug)]
pub struct Decoder {
    destination: ArcStr,
    /// `db \0 table` -> index in `tables`.
    table_index: HashMap<String, usize>,
    tables: Vec<TableLayouts>,
    key_buf: String,
    log_file: ArcStr,
    gtid: Option<ArcStr>,
    /// Reused per row: the columns of the row images being decoded (kept empty between
    /// entries, see [`wire::reuse`]).
    before: Vec<wire::ColumnRef<'static>>,
    after: Vec<wire::ColumnRef<'static>>,
    /// Raw text mode (see [`Decoder::with_charsets`]).
    raw: Option<RawText>,
}

#[derive(Debug)]
struct TableLayouts {
    database: ArcStr,
    table: ArcStr,
    layouts: Vec<Arc<Layout>>,
}

/// What every row with one column layout shares.
#[derive(Debug)]
struct Layout {
    columns: Arc<Columns>,
    decls: Vec<Decl>,
    primary_keys: ColumnSet,
    /// Every column (the `changed` of an INSERT).
    all: ColumnSet,
    /// Two columns with one name (never in a real table): rows are built like an ordered map,
    /// the later value replacing the earlier at its place.
    duplicate_names: bool,
}

/// One column's declaration, parsed once per layout.
#[derive(Debug)]
struct Decl {
    mysql_type: Box<str>,
    is_key: bool,
    kind: Kind,
    expected: Option<&'static [i32]>,
}

impl Layout {
    fn matches(&self, cols: &[wire::ColumnRef<'_>]) -> bool {
        self.decls.len() == cols.len()
            && self
                .decls
                .iter()
                .zip(self.columns.names())
                .zip(cols)
                .all(|((d, n), c)| {
                    d.is_key == c.is_key
                        && n.as_bytes() == c.name
                        && d.mysql_type.as_bytes() == c.mysql_type
                })
    }

    fn build(cols: &[wire::ColumnRef<'_>]) -> Result<Layout, wire::WireError> {
        let mut names = Vec::with_capacity(cols.len());
        let mut decls = Vec::with_capacity(cols.len());
        for c in cols {
            names.push(ArcStr::from(wire::utf8(c.name)?));
            let mysql_type = wire::utf8(c.mysql_type)?;
            let declared = mysql_type.to_ascii_lowercase();
            decls.push(Decl {
                mysql_type: mysql_type.into(),
                is_key: c.is_key,
                kind: Kind::of(mysql_type),
                expected: if mysql_type.is_empty() {
                    None
                } else {
                    expected_sql_types(base_type(&declared))
                },
            });
        }
        let duplicate_names = names
            .iter()
            .enumerate()
            .any(|(i, n)| names[..i].contains(n));
        let columns = Arc::new(Columns::new(names));
        let mut pk = ColumnSetBuilder::new(columns.len());
        for (i, d) in decls.iter().enumerate() {
            if d.is_key {
                pk.set(i);
            }
        }
        Ok(Layout {
            primary_keys: pk.build(columns.clone()),
            all: ColumnSet::all(columns.clone()),
            columns,
            decls,
            duplicate_names,
        })
    }
}

impl Decoder {
    pub fn new(destination: &str) -> Decoder {
        Decoder {
            destination: destination.into(),
            table_index: HashMap::new(),
            tables: Vec::new(),
            key_buf: String::new(),
            log_file: ArcStr::default(),
            gtid: None,
            before: Vec::new(),
            after: Vec::new(),
            raw: None,
        }
    }

    /// Raw text mode: text columns arrive as ISO-8859-1 characters of their bytes and are
    /// decoded with the charsets in `map`. A batch with rows of tables the map cannot serve
    /// yet ends in [`DecodeError::CharsetsNeeded`] (and the output is then incomplete): look
    /// them up and decode the batch again.
    pub fn with_charsets(mut self, map: Arc<CharsetMap>) -> Decoder {
        self.raw = Some(RawText {
            map,
            ddl_seen: HashMap::new(),
            needs: Vec::new(),
        });
        self
    }

    /// Decodes every entry of a batch, appending the events to `out`.
    pub fn decode_entries<B: AsRef<[u8]>>(
        &mut self,
        entries: &[B],
        out: &mut Vec<ChangeEvent>,
    ) -> Result<DecodeStats, DecodeError> {
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
                    if !self.decode_row_entry(index, &entry, out)? {
                        stats.skipped += 1;
                    }
                }
                Some(EntryType::TransactionBegin) | Some(EntryType::TransactionEnd) => {
                    stats.transaction_boundaries += 1
                }
                _ => stats.skipped += 1,
            }
        }
        if let Some(raw) = self.raw.as_mut()
            && !raw.needs.is_empty()
        {
            return Err(DecodeError::CharsetsNeeded(std::mem::take(&mut raw.needs)));
        }
        Ok(stats)
    }

    /// The shared names of a table, and its index in `tables`.
    fn table(&mut self, database: &str, table: &str) -> usize {
        self.key_buf.clear();
        self.key_buf.push_str(database);
        self.key_buf.push('\0');
        self.key_buf.push_str(table);
        if let Some(&i) = self.table_index.get(self.key_buf.as_str()) {
            return i;
        }
        let i = self.tables.len();
        self.tables.push(TableLayouts {
            database: database.into(),
            table: table.into(),
            layouts: Vec::new(),
        });
        self.table_index.insert(self.key_buf.clone(), i);
        i
    }

    fn position_names(&mut self, header: &Header) -> (ArcStr, Option<ArcStr>) {
        if self.log_file != header.logfile_name.as_str() {
            self.log_file = header.logfile_name.as_str().into();
        }
        let gtid = if header.gtid.is_empty() {
            None
        } else {
            if self.gtid.as_ref().is_none_or(|g| *g != header.gtid) {
                self.gtid = Some(header.gtid.as_str().into());
            }
            self.gtid.clone()
        };
        (self.log_file.clone(), gtid)
    }

    /// Decodes one ROWDATA entry; returns false when it was skipped (a non-DDL QUERY entry).
    fn decode_row_entry(
        &mut self,
        index: usize,
        entry: &Entry,
        out: &mut Vec<ChangeEvent>,
    ) -> Result<bool, DecodeError> {
        let default_header;
        let header = match &entry.header {
            Some(h) => h,
            None => {
                default_header = Header::default();
                &default_header
            }
        };
        let wire_err = |reason| DecodeError::Wire {
            index,
            what: "RowChange",
            reason,
        };
        let change = wire::RowChangeRef::parse(entry.store_value.as_ref()).map_err(wire_err)?;
        // Header and RowChange both carry the type; Canal's Java reader defaults an absent one
        // to UPDATE, which we refuse to guess.
        let raw_type =
            change
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
        let (log_file, gtid) = self.position_names(header);
        let position = |row_index: u32| Position {
            log_file: log_file.clone(),
            offset: header.logfile_offset.max(0) as u64,
            row_index,
            server_id: header.server_id.max(0) as u64,
            gtid: gtid.clone(),
        };

        let is_ddl = change.is_ddl.unwrap_or(false);
        if is_ddl || !event_type.is_row() {
            // rows are not used, but must be well-formed like the rest of the entry
            change.check_rows().map_err(wire_err)?;
        }
        if event_type == EventType::Query && !is_ddl {
            return Ok(false);
        }
        if is_ddl || !event_type.is_row() {
            let database = if header.schema_name.is_empty() {
                change.ddl_schema_name
            } else {
                header.schema_name.as_str()
            };
            if let Some(raw) = self.raw.as_mut()
                && !header.table_name.is_empty()
            {
                raw.ddl_seen.insert(
                    (database.to_string(), header.table_name.clone()),
                    (
                        header.logfile_name.clone(),
                        header.logfile_offset.max(0) as u64,
                    ),
                );
            }
            out.push(ChangeEvent {
                destination: self.destination.clone(),
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
                sql: (!change.sql.is_empty()).then(|| change.sql.to_string()),
                snapshot: None,
            });
            return Ok(true);
        }

        // raw text mode: the table's charsets, or a lookup to ask for
        let raw_map = self.raw.as_ref().map(|r| r.map.clone());
        let table_name: TableName = (header.schema_name.clone(), header.table_name.clone());
        let after_ddl = self
            .raw
            .as_ref()
            .and_then(|r| r.ddl_seen.get(&table_name).cloned());
        let charsets = match raw_map
            .as_deref()
            .map(|m| m.get(&table_name, after_ddl.as_ref()))
        {
            None => None,
            Some(Lookup::Known(c)) => Some(c),
            Some(Lookup::Needed) => {
                let need = Need {
                    table: table_name,
                    after_ddl,
                };
                if let Some(raw) = self.raw.as_mut() {
                    raw.need(need, Vec::new());
                }
                return Ok(true);
            }
        };
        let t = self.table(&header.schema_name, &header.table_name);
        let (database, table) = (
            self.tables[t].database.clone(),
            self.tables[t].table.clone(),
        );
        // The scratch vectors hold this entry's column slices only while it is decoded.
        let mut before = wire::reuse(std::mem::take(&mut self.before));
        let mut after = wire::reuse(std::mem::take(&mut self.after));
        let mut result = Ok(true);
        for (row_index, row) in change.rows().enumerate() {
            let r = row.and_then(|row| row.columns(&mut before, &mut after));
            if let Err(e) = r {
                result = Err(wire_err(e));
                break;
            }
            let texts = match charsets {
                None => None,
                Some(c) => {
                    let mut missing = Vec::new();
                    let texts = recode(&before, c, &mut missing)
                        .and_then(|b| Ok((b, recode(&after, c, &mut missing)?)));
                    match texts {
                        Err(source) => {
                            result = Err(DecodeError::Charset {
                                index,
                                table: format!("{}.{}", header.schema_name, header.table_name),
                                log_file: header.logfile_name.clone(),
                                offset: header.logfile_offset,
                                source: Box::new(source),
                            });
                            break;
                        }
                        Ok(_) if !missing.is_empty() => {
                            let need = Need {
                                table: table_name.clone(),
                                after_ddl: after_ddl.clone(),
                            };
                            if let Some(raw) = self.raw.as_mut() {
                                raw.need(need, missing);
                            }
                            continue;
                        }
                        Ok(texts) => Some(texts),
                    }
                }
            };
            let (rb, ra);
            let (b, a) = match &texts {
                None => (&before[..], &after[..]),
                Some((tb, ta)) => {
                    rb = with_texts(&before, tb);
                    ra = with_texts(&after, ta);
                    (&rb[..], &ra[..])
                }
            };
            let event = self.row_event(t, event_type, b, a).map_err(|e| match e {
                RowError::Wire(e) => wire_err(e),
                RowError::Mismatch(reason) => DecodeError::Invalid {
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
                },
            });
            match event {
                Ok((data, old, changed, primary_keys)) => out.push(ChangeEvent {
                    destination: self.destination.clone(),
                    database: database.clone(),
                    table: table.clone(),
                    event_type,
                    data,
                    old,
                    changed,
                    primary_keys,
                    position: position(row_index as u32),
                    executed_at: header.execute_time,
                    is_ddl: false,
                    sql: None,
                    snapshot: None,
                }),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.before = wire::reuse(before);
        self.after = wire::reuse(after);
        result
    }

    /// One row's `data`, `old`, `changed` and `primary_keys`.
    fn row_event(
        &mut self,
        table: usize,
        event_type: EventType,
        before: &[wire::ColumnRef<'_>],
        after: &[wire::ColumnRef<'_>],
    ) -> Result<(Row, Option<Row>, ColumnSet, ColumnSet), RowError> {
        let layouts = &mut self.tables[table].layouts;
        let after_layout = match after {
            [] => None,
            cols => Some(layout_for(layouts, cols)?),
        };
        let before_layout = match (before, &after_layout) {
            ([], _) => None,
            (cols, Some(a)) if a.matches(cols) => Some(a.clone()),
            (cols, _) => Some(layout_for(layouts, cols)?),
        };
        // every non-NULL value must fit the column it is named as, before and after
        for (layout, cols) in [(&before_layout, before), (&after_layout, after)] {
            if let Some(l) = layout {
                for (decl, col) in l.decls.iter().zip(cols) {
                    if let Some(reason) = mismatch(decl, col) {
                        return Err(RowError::Mismatch(reason));
                    }
                }
            }
        }
        let (image, image_cols) = if event_type == EventType::Delete {
            (&before_layout, before)
        } else {
            (&after_layout, after)
        };
        let Some(image) = image else {
            let old = (event_type == EventType::Update).then(Row::new);
            return Ok((Row::new(), old, ColumnSet::new(), ColumnSet::new()));
        };
        let tracks_changes = event_type != EventType::Delete;
        let changed = if !tracks_changes {
            ColumnSet::new()
        } else if image_cols.iter().all(|c| c.updated) {
            image.all.clone()
        } else {
            let mut b = ColumnSetBuilder::new(image_cols.len());
            for (i, c) in image_cols.iter().enumerate() {
                if c.updated {
                    b.set(i);
                }
            }
            b.build(image.columns.clone())
        };
        let data = image.row(image_cols, |_| true);
        let old = match (event_type, &before_layout) {
            (EventType::Update, Some(bl)) => {
                let same = Arc::ptr_eq(bl, image) && !image.duplicate_names;
                Some(bl.row(before, |j| {
                    if same {
                        image_cols[j].updated
                    } else {
                        changed.contains(bl.columns.name(j))
                    }
                }))
            }
            (EventType::Update, None) => Some(Row::new()),
            _ => None,
        };
        Ok((data, old, changed, image.primary_keys.clone()))
    }
}

enum RowError {
    Wire(wire::WireError),
    Mismatch(String),
}

impl From<wire::WireError> for RowError {
    fn from(e: wire::WireError) -> Self {
        RowError::Wire(e)
    }
}

impl Layout {
    /// The row of the columns `keep` selects (by position), values restored by type.
    fn row(&self, cols: &[wire::ColumnRef<'_>], keep: impl Fn(usize) -> bool) -> Row {
        let value = |decl: &Decl, col: &wire::ColumnRef<'_>| {
            if col.is_null.unwrap_or(false) {
                Value::Null
            } else {
                decl.kind.value(col.sql_type, col.value)
            }
        };
        if self.duplicate_names {
            // like an ordered map: a repeated name keeps its first place and its last value
            let mut row = Row::new();
            for (j, (decl, col)) in self.decls.iter().zip(cols).enumerate() {
                if keep(j) {
                    row.insert(self.columns.names()[j].clone(), value(decl, col));
                }
            }
            return row;
        }
        let mut slots = Vec::with_capacity(cols.len());
        for (j, (decl, col)) in self.decls.iter().zip(cols).enumerate() {
            if keep(j) {
                slots.push((j as u32, value(decl, col)));
            }
        }
        Row::from_slots(self.columns.clone(), slots)
    }
}

/// The layout of `cols` among a table's known layouts, added if new.
fn layout_for(
    layouts: &mut Vec<Arc<Layout>>,
    cols: &[wire::ColumnRef<'_>],
) -> Result<Arc<Layout>, wire::WireError> {
    // most recently added first: a table rarely changes layout within a batch
    if let Some(l) = layouts.iter().rev().find(|l| l.matches(cols)) {
        return Ok(l.clone());
    }
    let l = Arc::new(Layout::build(cols)?);
    layouts.push(l.clone());
    Ok(l)
}

/// Why a column's value cannot be the column it is named as (Canal named the binlog's values
/// with a table structure that does not match them), or `None`.
fn mismatch(decl: &Decl, col: &wire::ColumnRef<'_>) -> Option<String> {
    if col.is_null.unwrap_or(false) {
        return None;
    }
    let expected = decl.expected?;
    (!expected.contains(&col.sql_type)).then(|| {
        format!(
            "column `{}` (position {}) is declared {} but holds a binlog value of SQL type {}",
            String::from_utf8_lossy(col.name),
            col.index,
            decl.mysql_type,
            col.sql_type
        )
    })
}

fn entry_kind(entry: &Entry) -> Option<EntryType> {
    // Canal always sets the entry type; a proto2 reader would default an absent one to ROWDATA.
    match entry.entry_type {
        None => Some(EntryType::RowData),
        Some(v) => EntryType::try_from(v).ok(),
    }
}

pub(crate) fn map_event_type(v: i32) -> Option<EventType> {
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

/// Declared types MySQL stores like BLOBs in the binlog but that hold text.
fn is_blob_stored_text(base: &str) -> bool {
    matches!(
        base,
        "tinytext" | "text" | "mediumtext" | "longtext" | "json"
    )
}

/// `java.sql.Types.BLOB`: what Canal reports for values it ships as ISO-8859-1 bytes.
const SQL_BLOB: i32 = 2004;

/// How a declared type's values are restored, parsed once per column layout.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
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
    fn of(mysql_type: &str) -> Kind {
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
    fn value(&self, sql_type: i32, v: &str) -> Value {
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
    /// rendering differs from Canal's, this follows what [`Kind::value`] makes of Canal's: BIT
    /// arrives as its bytes (Canal: the number), ENUM and SET as their labels (Canal: index
    /// and bitmask), binary types as their bytes (Canal: one char per byte).
    pub fn from_mysql_text(&self, bytes: Option<&[u8]>) -> Value {
        let Some(b) = bytes else {
            return Value::Null;
        };
        let text = || String::from_utf8_lossy(b);
        match &self.0 {
            Kind::Bit => Value::UInt(b.iter().fold(0u64, |n, x| (n << 8) | u64::from(*x))),
            Kind::Binary { len } => Value::Bytes(padded(b.to_vec(), *len)),
            Kind::Bytes => Value::Bytes(b.to_vec()),
            Kind::Enum(_) | Kind::Set(_) => Value::Text(text().into_owned()),
            Kind::BlobText { json: true } => {
                let t = text();
                serde_json::from_str(&t)
                    .map(Value::Json)
                    .unwrap_or_else(|_| Value::Text(t.into_owned()))
            }
            Kind::BySqlType => Value::Text(text().into_owned()),
            kind => kind.value(0, &text()),
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
fn decimal_text(v: &str, scale: usize) -> String {
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
fn decimal_scale(declared: &str) -> usize {
    declared
        .split_once('(')
        .and_then(|(_, args)| args.split(')').next())
        .and_then(|args| args.split(',').nth(1))
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(0)
}

/// `BINARY(n)` values are stored right-padded with zero bytes to n bytes, and that is what
/// MySQL returns; the binlog carries them with the trailing zeros stripped. Pad them back.
fn padded(mut bytes: Vec<u8>, n: usize) -> Vec<u8> {
    if bytes.len() < n {
        bytes.resize(n, 0);
    }
    bytes
}

/// n of `binary(n)` (lower case); plain BINARY is BINARY(1).
fn binary_len(declared: &str) -> usize {
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

fn enum_label(labels: &[String], v: &str) -> Option<String> {
    let index: usize = v.parse().ok()?;
    if index == 0 {
        return Some(String::new()); // MySQL's "invalid value" enum member
    }
    labels.get(index - 1).cloned()
}

/// MySQL and MariaDB allow at most 64 members in a SET (one bit each of a u64).
const MAX_SET_MEMBERS: usize = 64;

/// The labels of a SET bitmask, `None` when the mask names a member the type does not have,
/// or when the declared type lists more members than a SET can have (then it is not a SET
/// MySQL would accept, and the labels could not be trusted to match the bits).
fn set_labels(labels: &[String], v: &str) -> Option<String> {
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

/// [`mismatch`] for one column on its own (tests and the reference decoder in
/// `canal::fuzz`).
pub fn column_mismatch(col: &Column) -> Option<String> {
    let c = wire::ColumnRef {
        index: col.index,
        sql_type: col.sql_type,
        name: col.name.as_bytes(),
        is_key: col.is_key,
        updated: col.updated,
        is_null: col.is_null,
        value: &col.value,
        mysql_type: col.mysql_type.as_bytes(),
    };
    let layout = Layout::build(&[c]).ok()?;
    mismatch(&layout.decls[0], &c)
}

/// A zero-copy reader for the hot part of Canal's entries: `RowChange`, `RowData` and `Column`
/// (`proto/canal_entry.proto`), which prost would decode into three owned strings per column.
/// Column names, declared types and values are borrowed from the entry; names and types are
/// only compared with the cached layout, values become [`Value`]s directly.
///
/// It accepts what prost accepts for these messages: every field of every wire type in any
/// order, unknown fields skipped (groups included), the last value of a repeated scalar wins,
/// and strings must be UTF-8 (checked for names and types when a layout is first built, since
/// a layout only ever matches bytes it was built from). Malformed input is a [`WireError`],
/// never a panic; `tests/fuzz_smoke.rs` checks the result against prost's on mutated input.
pub mod wire {
    /// Why bytes are not a valid message.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum WireError {
        #[error("truncated at byte {0}")]
        Truncated(usize),
        #[error("invalid varint at byte {0}")]
        Varint(usize),
        #[error("invalid key at byte {0}")]
        Key(usize),
        #[error("field {field} has wire type {wire}")]
        WireType { field: u32, wire: u8 },
        #[error("unbalanced group at byte {0}")]
        Group(usize),
        #[error("invalid UTF-8 in a string field")]
        Utf8,
    }

    const VARINT: u8 = 0;
    const FIXED64: u8 = 1;
    const LEN: u8 = 2;
    const START_GROUP: u8 = 3;
    const END_GROUP: u8 = 4;
    const FIXED32: u8 = 5;

    pub fn utf8(b: &[u8]) -> Result<&str, WireError> {
        std::str::from_utf8(b).map_err(|_| WireError::Utf8)
    }

    /// An empty vector with the allocation of `v` (the in-place collect keeps it), for column
    /// slices of another entry.
    pub fn reuse<'b>(mut v: Vec<ColumnRef<'_>>) -> Vec<ColumnRef<'b>> {
        v.clear();
        v.into_iter().map(|_| ColumnRef::default()).collect()
    }

    struct Reader<'a> {
        buf: &'a [u8],
        pos: usize,
    }

    impl<'a> Reader<'a> {
        fn new(buf: &'a [u8]) -> Self {
            Reader { buf, pos: 0 }
        }

        #[inline(always)]
        fn done(&self) -> bool {
            self.pos >= self.buf.len()
        }

        #[inline(always)]
        fn varint(&mut self) -> Result<u64, WireError> {
            // most varints (keys, lengths, flags) are one byte
            if let Some(&b) = self.buf.get(self.pos)
                && b < 0x80
            {
                self.pos += 1;
                return Ok(u64::from(b));
            }
            self.varint_long()
        }

        #[inline(never)]
        fn varint_long(&mut self) -> Result<u64, WireError> {
            let start = self.pos;
            let mut v: u64 = 0;
            for i in 0..10 {
                let Some(&b) = self.buf.get(self.pos) else {
                    return Err(WireError::Truncated(self.pos));
                };
                self.pos += 1;
                if i == 9 && b > 1 {
                    return Err(WireError::Varint(start));
                }
                v |= u64::from(b & 0x7f) << (7 * i);
                if b < 0x80 {
                    return Ok(v);
                }
            }
            Err(WireError::Varint(start))
        }

        /// `(field, wire type)`.
        #[inline(always)]
        fn key(&mut self) -> Result<(u32, u8), WireError> {
            let at = self.pos;
            let key = self.varint()?;
            let wire = (key & 7) as u8;
            let field = key >> 3;
            if key > u64::from(u32::MAX) || wire > FIXED32 || field == 0 {
                return Err(WireError::Key(at));
            }
            Ok((field as u32, wire))
        }

        #[inline(always)]
        fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
            match self.buf.get(self.pos..).and_then(|rest| rest.get(..n)) {
                Some(s) => {
                    self.pos += n;
                    Ok(s)
                }
                None => Err(WireError::Truncated(self.pos)),
            }
        }

        #[inline(always)]
        fn bytes(&mut self) -> Result<&'a [u8], WireError> {
            let n = self.varint()?;
            self.take(usize::try_from(n).map_err(|_| WireError::Truncated(self.pos))?)
        }

        /// Skips the value of a field of `wire` type (a group up to its end).
        fn skip(&mut self, field: u32, wire: u8) -> Result<(), WireError> {
            match wire {
                VARINT => self.varint().map(drop),
                FIXED64 => self.take(8).map(drop),
                LEN => self.bytes().map(drop),
                FIXED32 => self.take(4).map(drop),
                START_GROUP => {
                    // nested groups, up to prost's recursion limit
                    let mut open = vec![field];
                    while let Some(&inner) = open.last() {
                        if open.len() > 100 {
                            return Err(WireError::Group(self.pos));
                        }
                        let (f, w) = self.key()?;
                        match w {
                            START_GROUP => open.push(f),
                            END_GROUP if f == inner => {
                                open.pop();
                            }
                            END_GROUP => return Err(WireError::Group(self.pos)),
                            w => self.skip(f, w)?,
                        }
                    }
                    Ok(())
                }
                _ => Err(WireError::Group(self.pos)),
            }
        }

        #[inline(always)]
        fn expect(&self, field: u32, wire: u8, want: u8) -> Result<(), WireError> {
            if wire == want {
                Ok(())
            } else {
                Err(WireError::WireType { field, wire })
            }
        }
    }

    /// Checks a `Pair` (`props`): two strings.
    fn pair(buf: &[u8]) -> Result<(), WireError> {
        let mut r = Reader::new(buf);
        while !r.done() {
            let (field, wire) = r.key()?;
            match field {
                1 | 2 => {
                    r.expect(field, wire, LEN)?;
                    utf8(r.bytes()?)?;
                }
                _ => r.skip(field, wire)?,
            }
        }
        Ok(())
    }

    /// The parts of a `RowChange` the decoder uses; rows are read on demand.
    #[derive(Debug, Default)]
    pub struct RowChangeRef<'a> {
        pub event_type: Option<i32>,
        pub is_ddl: Option<bool>,
        pub sql: &'a str,
        pub ddl_schema_name: &'a str,
        /// The whole message, to iterate the `row_datas` fields.
        buf: &'a [u8],
    }

    impl<'a> RowChangeRef<'a> {
        /// Reads the scalar fields and checks the structure of everything else.
        pub fn parse(buf: &'a [u8]) -> Result<RowChangeRef<'a>, WireError> {
            let mut out = RowChangeRef {
                buf,
                ..Default::default()
            };
            let mut r = Reader::new(buf);
            while !r.done() {
                let (field, wire) = r.key()?;
                match field {
                    1 => {
                        r.expect(field, wire, VARINT)?;
                        r.varint()?;
                    }
                    2 => {
                        r.expect(field, wire, VARINT)?;
                        out.event_type = Some(r.varint()? as i32);
                    }
                    10 => {
                        r.expect(field, wire, VARINT)?;
                        out.is_ddl = Some(r.varint()? != 0);
                    }
                    11 => {
                        r.expect(field, wire, LEN)?;
                        out.sql = utf8(r.bytes()?)?;
                    }
                    12 => {
                        // rows are parsed (and checked) when iterated
                        r.expect(field, wire, LEN)?;
                        r.bytes()?;
                    }
                    13 => {
                        r.expect(field, wire, LEN)?;
                        pair(r.bytes()?)?;
                    }
                    14 => {
                        r.expect(field, wire, LEN)?;
                        out.ddl_schema_name = utf8(r.bytes()?)?;
                    }
                    _ => r.skip(field, wire)?,
                }
            }
            Ok(out)
        }

        /// Checks every row (names and types included) without decoding it.
        pub fn check_rows(&self) -> Result<(), WireError> {
            let (mut before, mut after) = (Vec::new(), Vec::new());
            for row in self.rows() {
                row?.columns(&mut before, &mut after)?;
                for c in before.iter().chain(&after) {
                    utf8(c.name)?;
                    utf8(c.mysql_type)?;
                }
            }
            Ok(())
        }

        /// The `row_datas`, in order.
        pub fn rows(&self) -> impl Iterator<Item = Result<RowDataRef<'a>, WireError>> + 'a {
            let mut r = Reader::new(self.buf);
            std::iter::from_fn(move || {
                while !r.done() {
                    // the structure was checked by `parse`
                    let (field, wire) = r.key().ok()?;
                    if field == 12 && wire == LEN {
                        return Some(r.bytes().map(|buf| RowDataRef { buf }));
                    }
                    r.skip(field, wire).ok()?;
                }
                None
            })
        }
    }

    /// One serialized `RowData`.
    #[derive(Debug, Clone, Copy)]
    pub struct RowDataRef<'a> {
        buf: &'a [u8],
    }

    impl<'a> RowDataRef<'a> {
        /// Reads the before and after columns into the (cleared) vectors.
        pub fn columns(
            &self,
            before: &mut Vec<ColumnRef<'a>>,
            after: &mut Vec<ColumnRef<'a>>,
        ) -> Result<(), WireError> {
            before.clear();
            after.clear();
            let mut r = Reader::new(self.buf);
            while !r.done() {
                // the common one-byte keys first (see `ColumnRef::parse`)
                match r.buf[r.pos] {
                    0x0a => {
                        r.pos += 1;
                        before.push(ColumnRef::parse(r.bytes()?)?);
                        continue;
                    }
                    0x12 => {
                        r.pos += 1;
                        after.push(ColumnRef::parse(r.bytes()?)?);
                        continue;
                    }
                    _ => {}
                }
                let (field, wire) = r.key()?;
                match field {
                    1 | 2 => {
                        r.expect(field, wire, LEN)?;
                        let col = ColumnRef::parse(r.bytes()?)?;
                        if field == 1 {
                            before.push(col)
                        } else {
                            after.push(col)
                        }
                    }
                    3 => {
                        r.expect(field, wire, LEN)?;
                        pair(r.bytes()?)?;
                    }
                    _ => r.skip(field, wire)?,
                }
            }
            Ok(())
        }
    }

    /// One `Column`, borrowed. `name` and `mysql_type` are unchecked bytes (see the module
    /// docs); `value` is checked UTF-8.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct ColumnRef<'a> {
        pub index: i32,
        pub sql_type: i32,
        pub name: &'a [u8],
        pub is_key: bool,
        pub updated: bool,
        pub is_null: Option<bool>,
        pub value: &'a str,
        pub mysql_type: &'a [u8],
    }

    impl<'a> ColumnRef<'a> {
        #[inline(always)]
        fn parse(buf: &'a [u8]) -> Result<ColumnRef<'a>, WireError> {
            let mut c = ColumnRef::default();
            let mut r = Reader::new(buf);
            // Canal writes one-byte keys with the declared wire types: dispatch on the byte;
            // anything else (unknown fields, long keys) takes the general path.
            while let Some(&key) = r.buf.get(r.pos) {
                r.pos += 1;
                match key {
                    0x08 => c.index = r.varint()? as i32,
                    0x10 => c.sql_type = r.varint()? as i32,
                    0x1a => c.set_name(r.bytes()?)?,
                    0x20 => c.is_key = r.varint()? != 0,
                    0x28 => c.updated = r.varint()? != 0,
                    0x30 => c.is_null = Some(r.varint()? != 0),
                    0x3a => pair(r.bytes()?)?,
                    0x42 => c.value = utf8(r.bytes()?)?,
                    0x48 => {
                        r.varint()?;
                    }
                    0x52 => c.set_mysql_type(r.bytes()?)?,
                    _ => {
                        r.pos -= 1;
                        c.field(&mut r)?;
                    }
                }
            }
            Ok(c)
        }

        // An overwritten occurrence is checked now (the last one with the layout).
        fn set_name(&mut self, b: &'a [u8]) -> Result<(), WireError> {
            if !self.name.is_empty() {
                utf8(self.name)?;
            }
            self.name = b;
            Ok(())
        }

        fn set_mysql_type(&mut self, b: &'a [u8]) -> Result<(), WireError> {
            if !self.mysql_type.is_empty() {
                utf8(self.mysql_type)?;
            }
            self.mysql_type = b;
            Ok(())
        }

        /// One field, by its decoded key.
        #[inline(never)]
        fn field(&mut self, r: &mut Reader<'a>) -> Result<(), WireError> {
            let (field, wire) = r.key()?;
            match field {
                1 | 2 | 4 | 5 | 6 | 9 => {
                    r.expect(field, wire, VARINT)?;
                    let v = r.varint()?;
                    match field {
                        1 => self.index = v as i32,
                        2 => self.sql_type = v as i32,
                        4 => self.is_key = v != 0,
                        5 => self.updated = v != 0,
                        6 => self.is_null = Some(v != 0),
                        _ => {}
                    }
                }
                3 | 7 | 8 | 10 => {
                    r.expect(field, wire, LEN)?;
                    let b = r.bytes()?;
                    match field {
                        3 => self.set_name(b)?,
                        7 => pair(b)?,
                        8 => self.value = utf8(b)?,
                        _ => self.set_mysql_type(b)?,
                    }
                }
                _ => r.skip(field, wire)?,
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canal::proto::entry::{Header, Pair, RowChange, RowData, TransactionEnd};

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

    /// `set('m0','m1',...)` with `n` members.
    fn set_type(n: usize) -> String {
        let labels: Vec<String> = (0..n).map(|i| format!("'m{i}'")).collect();
        format!("set({})", labels.join(","))
    }

    #[test]
    fn set_masks_use_all_64_members_and_no_more() {
        // 64 members: the top bit is the 64th label
        let top = (1u64 << 63).to_string();
        assert_eq!(
            column_value(&col("a", &set_type(64), Some(&top))),
            Value::Text("m63".into())
        );
        assert_eq!(
            column_value(&col("a", &set_type(64), Some("3"))),
            Value::Text("m0,m1".into())
        );
        // A declared type with more members than a SET can have (a corrupt or hostile table
        // meta) must neither overflow the shift nor invent labels: the mask is kept as sent.
        for n in [65, 70, 200] {
            for mask in ["1", "5", &top, "18446744073709551615"] {
                assert_eq!(
                    column_value(&col("a", &set_type(n), Some(mask))),
                    Value::Text(mask.to_string()),
                    "set of {n} members, mask {mask}"
                );
            }
        }
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
        assert_eq!(e.changed.to_vec(), vec!["name".to_string()]);
        assert_eq!(e.old.as_ref().unwrap().len(), 1);
        assert_eq!(e.old_value("name"), Some(&Value::Text("old".into())));
        assert_eq!(e.primary_keys.to_vec(), vec!["id".to_string()]);
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
        assert_eq!(column_mismatch(&j), None);
        // `TEXT(1000)` from a DDL Canal parsed: same treatment
        let mut t = col("t", "text(1000)", Some("caf\u{c3}\u{a9}"));
        t.sql_type = SQL_BLOB;
        assert_eq!(column_value(&t), Value::Text("café".into()));
        assert_eq!(column_mismatch(&t), None);
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
        assert_eq!(column_mismatch(&null), None);
        for t in [
            "int(10) unsigned",
            "varchar(3)",
            "longtext",
            "binary(2)",
            "set('a')",
            "year",
        ] {
            assert_eq!(column_mismatch(&col("x", t, Some("1"))), None, "{t}");
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
