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
//! Files: this one decodes entries and builds the per-table layouts; `types` restores values
//! to their declared types; [`wire`] reads the row changes zero-copy; `tests.rs` pins every
//! column type's byte-level decoding.

use crate::canal::charset::{self, BinlogPos, CharsetError, CharsetMap, Lookup, Need, TableName};
use crate::canal::proto::entry::{Column, Entry, EntryType, EventType as WireEventType, Header};
use crate::event::{
    ChangeEvent, ColumnSet, ColumnSetBuilder, Columns, EventType, Position, Row, Value,
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
    destination: Arc<str>,
    /// `db \0 table` -> index in `tables`.
    table_index: HashMap<String, usize>,
    tables: Vec<TableLayouts>,
    key_buf: String,
    log_file: Arc<str>,
    gtid: Option<Arc<str>>,
    /// Reused per row: the columns of the row images being decoded (kept empty between
    /// entries, see [`wire::reuse`]).
    before: Vec<wire::ColumnRef<'static>>,
    after: Vec<wire::ColumnRef<'static>>,
    /// Raw text mode (see [`Decoder::with_charsets`]).
    raw: Option<RawText>,
}

#[derive(Debug)]
struct TableLayouts {
    database: Arc<str>,
    table: Arc<str>,
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
            names.push(Arc::<str>::from(wire::utf8(c.name)?));
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
            log_file: Arc::<str>::default(),
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

    fn position_names(&mut self, header: &Header) -> (Arc<str>, Option<Arc<str>>) {
        if *self.log_file != *header.logfile_name {
            self.log_file = header.logfile_name.as_str().into();
        }
        let gtid = if header.gtid.is_empty() {
            None
        } else {
            if self.gtid.as_ref().is_none_or(|g| **g != *header.gtid) {
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

/// `mismatch` for one column on its own (tests and the reference decoder in
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

mod types;
pub mod wire;

use types::*;
pub use types::{DeclaredType, column_value, type_labels};

#[cfg(test)]
mod tests;
