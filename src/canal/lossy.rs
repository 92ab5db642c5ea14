//! Text that Canal decoded lossily, noticed (UTF-8 mode).
//!
//! With the destination's `canal.instance.connectionCharset` at UTF-8 (our default,
//! `canal.connection_charset = "UTF-8"`), Canal decodes every text column itself, as UTF-8,
//! whatever the column's own charset. The bytes of a latin1 (or gbk, big5, ...) column that
//! are not valid UTF-8 become U+FFFD REPLACEMENT CHARACTER inside Canal: `'café ÿ ß'` arrives
//! as `'caf\u{FFFD} \u{FFFD} \u{FFFD}'`, and nothing in the stream says so. So in that mode a
//! U+FFFD in a text value is the mark of that loss (a genuine U+FFFD written to a UTF-8 column
//! looks the same, and is counted too: rare, and harmless to report).
//!
//! This module is plain data, no I/O: [`scan`] finds the marked rows of a batch and their
//! columns; [`LossyText`] counts them per table and column and says which columns are new (the
//! Manager logs those once, `status` lists them all, `/metrics` counts them), and builds the
//! dead-letter reason for `canal.on_lossy_text = "park"`. The fix is the raw-text mode
//! (`canal.connection_charset = "ISO-8859-1"` with `canal.source_url`, README "Character
//! sets"), in which this check does not run: text is decoded by us, with each column's charset.

use crate::event::{ChangeEvent, Position, Row, Value};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// What Canal puts in place of bytes it could not decode.
pub const LOSSY_MARK: char = '\u{FFFD}';

/// What the README and `status` tell an operator to do about it.
pub const LOSSY_FIX: &str = "Canal decoded this non-UTF-8 column as UTF-8 and replaced its \
     non-ASCII characters with U+FFFD; set the destination's \
     canal.instance.connectionCharset = ISO-8859-1 and run the service with \
     canal.connection_charset = \"ISO-8859-1\" and canal.source_url (README, \"Character sets\")";

/// What to do with a row whose text carries the mark (`canal.on_lossy_text`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLossyText {
    /// Deliver it as it arrived, count it and warn (the default).
    #[default]
    Deliver,
    /// Put it in the dead-letter queue, with the reason, instead of delivering changed data.
    Park,
}

/// The rows of one batch whose text carries [`LOSSY_MARK`]: `(event index, columns)`, in event
/// order, each column once per row (in `data` or in `old`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LossyRows {
    pub rows: Vec<(usize, Vec<Arc<str>>)>,
}

impl LossyRows {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

fn marked_columns(row: &Row, out: &mut Vec<Arc<str>>) {
    for (name, value) in row.iter_shared() {
        if let Value::Text(t) = value
            && t.contains(LOSSY_MARK)
            && !out.contains(name)
        {
            out.push(name.clone());
        }
    }
}

/// The rows of `events` with a text value that carries [`LOSSY_MARK`].
pub fn scan(events: &[ChangeEvent]) -> LossyRows {
    let mut rows = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let mut cols = Vec::new();
        marked_columns(&e.data, &mut cols);
        if let Some(old) = &e.old {
            marked_columns(old, &mut cols);
        }
        if !cols.is_empty() {
            rows.push((i, cols));
        }
    }
    LossyRows { rows }
}

/// One column seen with lossy text, as `status` and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossyColumn {
    pub database: String,
    pub table: String,
    pub column: String,
    /// Rows whose value in this column carried U+FFFD.
    pub rows: u64,
    /// Where it was first seen.
    pub first_position: Position,
    /// What happened to those rows: delivered as they arrived, or parked.
    pub policy: OnLossyText,
    /// What to do about it.
    pub fix: String,
}

/// Counts of lossy text per table and column. See the module docs.
#[derive(Debug, Default)]
pub struct LossyText {
    policy: OnLossyText,
    columns: BTreeMap<(String, String, String), LossyColumn>,
}

impl LossyText {
    pub fn new(policy: OnLossyText) -> Self {
        LossyText {
            policy,
            columns: BTreeMap::new(),
        }
    }

    pub fn policy(&self) -> OnLossyText {
        self.policy
    }

    /// Count a batch's marked rows (from [`scan`] over `events`). Returns the columns seen for
    /// the first time, to be reported once.
    pub fn record(&mut self, events: &[ChangeEvent], lossy: &LossyRows) -> Vec<LossyColumn> {
        let mut new = Vec::new();
        for (i, cols) in &lossy.rows {
            let Some(e) = events.get(*i) else { continue };
            for c in cols {
                let key = (e.database.to_string(), e.table.to_string(), c.to_string());
                let entry = self.columns.entry(key).or_insert_with(|| LossyColumn {
                    database: e.database.to_string(),
                    table: e.table.to_string(),
                    column: c.to_string(),
                    rows: 0,
                    first_position: e.position.clone(),
                    policy: self.policy,
                    fix: LOSSY_FIX.to_string(),
                });
                if entry.rows == 0 {
                    new.push(entry.clone());
                }
                entry.rows += 1;
            }
        }
        new
    }

    /// Every column seen so far, by database, table and column.
    pub fn columns(&self) -> Vec<LossyColumn> {
        self.columns.values().cloned().collect()
    }

    /// Why a marked row is parked (`canal.on_lossy_text = "park"`).
    pub fn park_reason(event: &ChangeEvent, columns: &[Arc<str>]) -> String {
        let names: Vec<&str> = columns.iter().map(|c| &**c).collect();
        format!(
            "lossy text: column(s) {} of {}.{} arrived with U+FFFD (canal.on_lossy_text = \
             \"park\"): {LOSSY_FIX}",
            names.join(", "),
            event.database,
            event.table
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Columns, EventType};
    use std::sync::Arc;

    fn event(table: &str, data: &[(&str, Value)], old: Option<&[(&str, Value)]>) -> ChangeEvent {
        let row = |vals: &[(&str, Value)]| {
            let cols = Arc::new(Columns::new(
                vals.iter().map(|(n, _)| Arc::<str>::from(*n)).collect(),
            ));
            Row::from_values(cols, vals.iter().map(|(_, v)| v.clone()).collect())
        };
        ChangeEvent {
            destination: "example".into(),
            database: "db".into(),
            table: table.into(),
            event_type: EventType::Update,
            data: row(data),
            old: old.map(row),
            changed: Default::default(),
            primary_keys: Default::default(),
            position: Position {
                log_file: "mysql-bin.000001".into(),
                offset: 4,
                row_index: 0,
                server_id: 0,
                gtid: None,
            },
            executed_at: 0,
            is_ddl: false,
            sql: None,
            snapshot: None,
        }
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn marked_text_is_found_per_row_and_column() {
        let events = vec![
            event("t", &[("id", Value::Int(1)), ("name", text("café"))], None),
            event(
                "t",
                &[("id", Value::Int(2)), ("name", text("caf\u{FFFD}"))],
                Some(&[("name", text("\u{FFFD}"))]),
            ),
            // bytes are restored exactly, never text: an EF BF BD in a BLOB is data
            event(
                "t",
                &[
                    ("id", Value::Int(3)),
                    ("b", Value::Bytes("\u{FFFD}".as_bytes().to_vec())),
                    ("n", Value::Null),
                ],
                None,
            ),
            event(
                "u",
                &[("a", text("\u{FFFD} ok")), ("b", text("ß \u{FFFD}"))],
                None,
            ),
        ];
        let found = scan(&events);
        assert_eq!(
            found.rows,
            vec![
                (1, vec![Arc::<str>::from("name")]),
                (3, vec![Arc::<str>::from("a"), Arc::<str>::from("b")])
            ]
        );
    }

    #[test]
    fn columns_are_counted_and_reported_new_once() {
        let a = event("t", &[("name", text("caf\u{FFFD}"))], None);
        let b = event(
            "t",
            &[("name", text("\u{FFFD}")), ("x", text("\u{FFFD}"))],
            None,
        );
        let mut lossy = LossyText::new(OnLossyText::Park);
        let new = lossy.record(std::slice::from_ref(&a), &scan(std::slice::from_ref(&a)));
        assert_eq!(new.len(), 1);
        assert_eq!(
            (new[0].table.as_str(), new[0].column.as_str()),
            ("t", "name")
        );
        let batch = vec![a.clone(), b];
        let new = lossy.record(&batch, &scan(&batch));
        let names: Vec<&str> = new.iter().map(|c| c.column.as_str()).collect();
        assert_eq!(names, ["x"], "only the column not seen before is new");
        let all = lossy.columns();
        let counts: Vec<(&str, u64)> = all.iter().map(|c| (c.column.as_str(), c.rows)).collect();
        assert_eq!(counts, [("name", 3), ("x", 1)]);
        assert!(all.iter().all(|c| c.policy == OnLossyText::Park));
        assert!(all[0].fix.contains("canal.connection_charset"));
        let why = LossyText::park_reason(&a, &[Arc::<str>::from("name")]);
        assert!(why.contains("name of db.t"), "{why}");
        assert!(why.contains("ISO-8859-1"), "{why}");
    }
}
