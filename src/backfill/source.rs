//! The backfill's side of the source database (`canal.source_url`): the table's layout and
//! primary key, its chunks in key order, and the watermark table (watermarks, every
//! backfill's record, and the heartbeat row).
//!
//! Values are read over MySQL's text protocol and typed by each column's declared type
//! ([`DeclaredType`]), so a SNAPSHOT row holds the same [`Value`]s as a binlog change of the same
//! row (the session's time zone is UTC, as Canal renders TIMESTAMP values). Key values go back into SQL as literals: numbers as digits, text as a hex literal with a
//! `utf8mb4` introducer (compared under the column's own collation, whatever the server's
//! `sql_mode`), bytes as a hex literal.
//!
//! Fails with [`BackfillError`]: what the request itself gets wrong (no such table, no primary
//! key, a `where` the server refuses) is definite; a query that fails on the way (the server is
//! down or restarting) is transient.

use super::BackfillError;
use super::record::{Backfill, Progress, Spec, State};
use crate::canal::decode::DeclaredType;
use crate::event::{Columns, Row, Value};
use mysql_async::prelude::Queryable as _;
use std::sync::Arc;

/// MySQL's "table doesn't exist".
const ER_NO_SUCH_TABLE: u16 = 1146;

/// A table's layout as the backfill reads it.
#[derive(Debug, Clone)]
pub struct TableMeta {
    pub database: String,
    pub table: String,
    pub columns: Arc<Columns>,
    pub types: Vec<DeclaredType>,
    /// The primary key's columns, in key order.
    pub key: Vec<Arc<str>>,
}

/// A pool of connections to the source database, and the watermark table's name.
pub struct Source {
    pool: mysql_async::Pool,
    shown: String,
    wm_db: String,
    wm_table: String,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("url", &self.shown)
            .field(
                "watermark_table",
                &format!("{}.{}", self.wm_db, self.wm_table),
            )
            .finish()
    }
}

/// `name` quoted as an identifier.
pub fn ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// `v` as an SQL literal (see the module docs).
pub fn literal(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => format!("{f:e}"),
        Value::Text(t) => format!("_utf8mb4 X'{}'", hex::encode(t.as_bytes())),
        Value::Json(j) => format!("_utf8mb4 X'{}'", hex::encode(j.to_string().as_bytes())),
        Value::Bytes(b) => format!("X'{}'", hex::encode(b)),
    }
}

/// `(k1, k2, ..) op (v1, v2, ..)` in lexicographic key order, written out so that every
/// server uses the key's index: `k1 > v1 OR (k1 = v1 AND k2 > v2)`. `op` is `>` (after) or
/// `<=` (up to).
pub fn key_bound(key: &[Arc<str>], values: &[Value], after: bool) -> String {
    let mut ors = Vec::new();
    for i in 0..key.len() {
        let mut ands: Vec<String> = (0..i)
            .map(|j| format!("{} = {}", ident(&key[j]), literal(&values[j])))
            .collect();
        let last = i + 1 == key.len();
        let op = match (after, last) {
            (true, _) => ">",
            (false, false) => "<",
            (false, true) => "<=",
        };
        ands.push(format!("{} {op} {}", ident(&key[i]), literal(&values[i])));
        ors.push(format!("({})", ands.join(" AND ")));
    }
    ors.join(" OR ")
}

impl Source {
    pub fn new(url: &str, shown: String, watermark: (String, String)) -> Result<Source, String> {
        crate::canal::source::check_url(url).map_err(|e| e.to_string())?;
        let opts = mysql_async::Opts::from_url(url).map_err(|e| e.to_string())?;
        // TIMESTAMP values as Canal renders them (in UTC); `--where` conditions on TIMESTAMP
        // columns are read in UTC too
        let opts = mysql_async::OptsBuilder::from_opts(opts)
            .init(vec!["SET SESSION time_zone = '+00:00'"])
            .pool_opts(
                mysql_async::PoolOpts::default()
                    .with_constraints(mysql_async::PoolConstraints::new(0, 4).expect("0 <= 4")),
            );
        Ok(Source {
            pool: mysql_async::Pool::new(opts),
            shown,
            wm_db: watermark.0,
            wm_table: watermark.1,
        })
    }

    /// `database.table` of the watermark table.
    pub fn watermark_table(&self) -> (&str, &str) {
        (&self.wm_db, &self.wm_table)
    }

    fn wm(&self) -> String {
        format!("{}.{}", ident(&self.wm_db), ident(&self.wm_table))
    }

    fn err(&self, what: impl Into<String>) -> impl FnOnce(mysql_async::Error) -> BackfillError {
        let what = what.into();
        let url = self.shown.clone();
        move |source| BackfillError::Source {
            what: format!("{what} ({url})"),
            source,
        }
    }

    async fn conn(&self) -> Result<mysql_async::Conn, BackfillError> {
        self.pool
            .get_conn()
            .await
            .map_err(self.err("connecting to the source database"))
    }

    /// Create the watermark table if it is not there.
    pub async fn ensure_table(&self) -> Result<(), BackfillError> {
        let mut c = self.conn().await?;
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} (\
               id VARCHAR(64) NOT NULL PRIMARY KEY, \
               state VARCHAR(16) NOT NULL, \
               spec LONGTEXT NOT NULL, \
               progress LONGTEXT NOT NULL, \
               watermark VARCHAR(128) NOT NULL DEFAULT '', \
               updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6)\
             ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
            self.wm()
        );
        c.query_drop(sql).await.map_err(self.err(format!(
            "creating the watermark table {}.{} (needs CREATE on it)",
            self.wm_db, self.wm_table
        )))
    }

    /// The layout and primary key of `database.table`.
    pub async fn table_meta(
        &self,
        database: &str,
        table: &str,
    ) -> Result<TableMeta, BackfillError> {
        let mut c = self.conn().await?;
        let what = format!("reading the columns of {database}.{table}");
        let cols: Vec<(String, String)> = c
            .exec(
                "SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
                (database, table),
            )
            .await
            .map_err(self.err(what.clone()))?;
        if cols.is_empty() {
            return Err(BackfillError::Invalid(format!(
                "no table {database}.{table} on the source database (or the account in canal.source_url cannot see it)"
            )));
        }
        let key: Vec<String> = c
            .exec(
                "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE \
                 WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND CONSTRAINT_NAME = 'PRIMARY' \
                 ORDER BY ORDINAL_POSITION",
                (database, table),
            )
            .await
            .map_err(self.err(what))?;
        if key.is_empty() {
            return Err(BackfillError::Invalid(format!(
                "table {database}.{table} has no primary key: a backfill reads a table in primary-key order and matches live changes to read rows by it; give the table a primary key"
            )));
        }
        for k in &key {
            let declared = cols.iter().find(|(n, _)| n == k).map(|(_, t)| t.as_str());
            if let Some(kind) = declared.and_then(|t| DeclaredType::parse(t).unfit_for_paging()) {
                return Err(BackfillError::Invalid(format!(
                    "the primary key of {database}.{table} has a {kind} column `{k}`: a backfill pages through the key with exact comparisons, which a {kind} key does not give (rows would be missed)"
                )));
            }
        }
        Ok(TableMeta {
            database: database.into(),
            table: table.into(),
            types: cols.iter().map(|(_, t)| DeclaredType::parse(t)).collect(),
            columns: Arc::new(Columns::new(
                cols.into_iter().map(|(n, _)| Arc::<str>::from(n)).collect(),
            )),
            key: key.into_iter().map(Arc::<str>::from).collect(),
        })
    }

    fn from(meta: &TableMeta) -> String {
        format!("{}.{}", ident(&meta.database), ident(&meta.table))
    }

    fn order(meta: &TableMeta, desc: bool) -> String {
        meta.key
            .iter()
            .map(|k| format!("{}{}", ident(k), if desc { " DESC" } else { "" }))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The server's estimate of the rows matching `condition` (EXPLAIN); checks that the
    /// server accepts `condition` at all.
    pub async fn estimate(
        &self,
        meta: &TableMeta,
        condition: Option<&str>,
    ) -> Result<u64, BackfillError> {
        let mut c = self.conn().await?;
        let sql = format!(
            "EXPLAIN SELECT 1 FROM {} WHERE ({})",
            Self::from(meta),
            condition.unwrap_or("TRUE")
        );
        let rows: Vec<mysql_async::Row> = c.query(sql).await.map_err(|e| match e {
            mysql_async::Error::Server(s) => BackfillError::Invalid(format!(
                "the source database refuses --where {:?} on {}.{}: {}",
                condition.unwrap_or(""),
                meta.database,
                meta.table,
                s.message
            )),
            e => BackfillError::Source {
                what: format!("estimating rows of {}.{}", meta.database, meta.table),
                source: e,
            },
        })?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let i = r
                    .columns_ref()
                    .iter()
                    .position(|c| c.name_str() == "rows")?;
                match r.as_ref(i)? {
                    mysql_async::Value::Bytes(b) => std::str::from_utf8(b).ok()?.parse().ok(),
                    mysql_async::Value::Int(n) => u64::try_from(*n).ok(),
                    mysql_async::Value::UInt(n) => Some(*n),
                    _ => None,
                }
            })
            .max()
            .unwrap_or(0))
    }

    async fn select(&self, sql: String, meta: &TableMeta) -> Result<Vec<Row>, BackfillError> {
        let mut c = self.conn().await?;
        let rows: Vec<mysql_async::Row> = c.query(sql).await.map_err(self.err(format!(
            "reading a chunk of {}.{}",
            meta.database, meta.table
        )))?;
        Ok(rows
            .into_iter()
            .map(|r| Row::from_values(meta.columns.clone(), typed(r.unwrap(), &meta.types)))
            .collect())
    }

    fn columns_sql(meta: &TableMeta) -> String {
        meta.columns
            .names()
            .iter()
            .map(|c| ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The largest key of the rows matching `condition`, `None` if there are none.
    pub async fn max_key(
        &self,
        meta: &TableMeta,
        condition: Option<&str>,
    ) -> Result<Option<Vec<Value>>, BackfillError> {
        let sql = format!(
            "SELECT {} FROM {} WHERE ({}) ORDER BY {} LIMIT 1",
            Self::columns_sql(meta),
            Self::from(meta),
            condition.unwrap_or("TRUE"),
            Self::order(meta, true)
        );
        let rows = self.select(sql, meta).await?;
        Ok(rows.first().map(|r| key_values(r, &meta.key)))
    }

    /// Up to `limit` rows after `after` and up to `upto` in key order, matching `condition`.
    pub async fn read_chunk(
        &self,
        meta: &TableMeta,
        condition: Option<&str>,
        after: Option<&[Value]>,
        upto: &[Value],
        limit: usize,
    ) -> Result<Vec<Row>, BackfillError> {
        let mut wh = vec![format!("({})", key_bound(&meta.key, upto, false))];
        if let Some(a) = after {
            wh.push(format!("({})", key_bound(&meta.key, a, true)));
        }
        if let Some(c) = condition {
            wh.push(format!("({c})"));
        }
        let sql = format!(
            "SELECT {} FROM {} WHERE {} ORDER BY {} LIMIT {limit}",
            Self::columns_sql(meta),
            Self::from(meta),
            wh.join(" AND "),
            Self::order(meta, false)
        );
        self.select(sql, meta).await
    }

    /// Write a watermark (`low:<nonce>` or `high:<nonce>`) on backfill `id`'s row.
    pub async fn write_watermark(&self, id: &str, value: &str) -> Result<(), BackfillError> {
        let mut c = self.conn().await?;
        c.exec_drop(
            format!("UPDATE {} SET watermark = ? WHERE id = ?", self.wm()),
            (value, id),
        )
        .await
        .map_err(self.err("writing a watermark (needs UPDATE on the watermark table)"))
    }

    /// Write a low watermark (`low:<nonce>`) on backfill `id`'s row if it is still running,
    /// with `progress` (the last confirmed chunk's, not yet stored) in the same UPDATE: one
    /// commit, and one transaction through Canal, for both. False if it is no longer running
    /// (paused or cancelled meanwhile): nothing was written.
    pub async fn write_low_watermark(
        &self,
        id: &str,
        value: &str,
        progress: Option<&Progress>,
    ) -> Result<bool, BackfillError> {
        let mut c = self.conn().await?;
        let what = "writing a watermark (needs UPDATE on the watermark table)";
        match progress {
            Some(p) => c
                .exec_drop(
                    format!(
                        "UPDATE {} SET watermark = ?, progress = {KEEP_FINISHED_AT} WHERE id = ? AND state = ?",
                        self.wm()
                    ),
                    (value, json(p), id, State::Running.as_str()),
                )
                .await
                .map_err(self.err(what))?,
            None => c
                .exec_drop(
                    format!(
                        "UPDATE {} SET watermark = ? WHERE id = ? AND state = ?",
                        self.wm()
                    ),
                    (value, id, State::Running.as_str()),
                )
                .await
                .map_err(self.err(what))?,
        }
        Ok(c.affected_rows() == 1)
    }

    /// Write heartbeat row `id` (state 'heartbeat') with `value` in its watermark column:
    /// created on its first write, updated after.
    pub async fn write_heartbeat(&self, id: &str, value: &str) -> Result<(), BackfillError> {
        let mut c = self.conn().await?;
        c.exec_drop(
            format!(
                "INSERT INTO {} (id, state, spec, progress, watermark) \
                 VALUES (?, 'heartbeat', '{{}}', '{{}}', ?) \
                 ON DUPLICATE KEY UPDATE watermark = VALUES(watermark)",
                self.wm()
            ),
            (id, value),
        )
        .await
        .map_err(self.err("writing a heartbeat (needs INSERT and UPDATE on the watermark table)"))
    }

    /// Store a new backfill.
    pub async fn insert(&self, b: &Backfill) -> Result<(), BackfillError> {
        let mut c = self.conn().await?;
        c.exec_drop(
            format!(
                "INSERT INTO {} (id, state, spec, progress) VALUES (?, ?, ?, ?)",
                self.wm()
            ),
            (&b.id, b.state.as_str(), json(&b.spec), json(&b.progress)),
        )
        .await
        .map_err(self.err("storing a backfill (needs INSERT on the watermark table)"))
    }

    /// Every backfill of `owner`, oldest first.
    pub async fn list(&self, owner: &str) -> Result<Vec<Backfill>, BackfillError> {
        let mut c = self.conn().await?;
        let rows: Vec<(String, String, String, String)> = match c
            .query(format!(
                "SELECT id, state, spec, progress FROM {} ORDER BY id",
                self.wm()
            ))
            .await
        {
            Ok(rows) => rows,
            // no watermark table yet: no backfill was ever started
            Err(mysql_async::Error::Server(e)) if e.code == ER_NO_SUCH_TABLE => Vec::new(),
            Err(e) => return Err(self.err("listing backfills")(e)),
        };
        let mut out = Vec::new();
        for (id, state, spec, progress) in rows {
            if !id.starts_with("bf-") {
                continue; // not a backfill (a heartbeat row)
            }
            let (Some(state), Ok(spec), Ok(progress)) = (
                State::parse(&state),
                serde_json::from_str::<Spec>(&spec),
                serde_json::from_str::<Progress>(&progress),
            ) else {
                tracing::warn!(backfill = %id, table = %format!("{}.{}", self.wm_db, self.wm_table), "a row of the watermark table is not a backfill this version can read; ignoring it");
                continue;
            };
            if spec.owner == owner {
                out.push(Backfill {
                    id,
                    state,
                    spec,
                    progress,
                });
            }
        }
        Ok(out)
    }

    /// Backfill `id` of `owner`.
    pub async fn get(&self, owner: &str, id: &str) -> Result<Backfill, BackfillError> {
        self.list(owner)
            .await?
            .into_iter()
            .find(|b| b.id == id)
            .ok_or_else(|| BackfillError::NotFound(id.to_string()))
    }

    /// Set `id`'s state to `to` if it is still `from`, and its progress as `progress` says;
    /// false if the state changed meanwhile.
    pub async fn set_state(
        &self,
        id: &str,
        from: State,
        to: State,
        progress: ProgressWrite<'_>,
    ) -> Result<bool, BackfillError> {
        let mut c = self.conn().await?;
        let (set, value): (&str, Option<mysql_async::Value>) = match progress {
            ProgressWrite::Keep => ("", None),
            ProgressWrite::Replace(p) => (", progress = ?", Some(json(p).into())),
            ProgressWrite::FinishedAt(at) => (
                ", progress = JSON_SET(progress, '$.finished_at', ?)",
                Some(at.into()),
            ),
        };
        let mut params: Vec<mysql_async::Value> = vec![to.as_str().into()];
        params.extend(value);
        params.push(id.into());
        params.push(from.as_str().into());
        c.exec_drop(
            format!(
                "UPDATE {} SET state = ?{set} WHERE id = ? AND state = ?",
                self.wm()
            ),
            params,
        )
        .await
        .map_err(self.err("updating a backfill (needs UPDATE on the watermark table)"))?;
        Ok(c.affected_rows() == 1)
    }

    /// Store `id`'s progress (whatever its state), keeping the stored `finished_at`: the
    /// runner's progress never carries one, and an operator's cancel may have set it since the
    /// runner last looked.
    pub async fn save_progress(&self, id: &str, p: &Progress) -> Result<(), BackfillError> {
        let mut c = self.conn().await?;
        c.exec_drop(
            format!(
                "UPDATE {} SET progress = {KEEP_FINISHED_AT} WHERE id = ?",
                self.wm()
            ),
            (json(p), id),
        )
        .await
        .map_err(self.err("saving backfill progress (needs UPDATE on the watermark table)"))
    }

    pub async fn close(self) {
        let _ = self.pool.disconnect().await;
    }
}

/// What a state change does to the stored progress.
#[derive(Debug, Clone, Copy)]
pub enum ProgressWrite<'a> {
    /// Leave it as stored: an operator's pause or resume. Writing back a progress read before
    /// the UPDATE could move it back past a chunk the runner stored meanwhile.
    Keep,
    /// Only set `finished_at` (milliseconds since the epoch): an operator's cancel.
    FinishedAt(i64),
    /// The runner's own, newest progress: done or failed.
    Replace(&'a Progress),
}

/// The runner's progress (the `?`) with the stored `finished_at` kept: see
/// [`Source::save_progress`].
const KEEP_FINISHED_AT: &str =
    "JSON_SET(?, '$.finished_at', JSON_EXTRACT(progress, '$.finished_at'))";

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records always serialize")
}

/// A row's values as the text protocol sent them, typed by the columns' declared types (see
/// the module docs); the text and bytes keep their buffers.
pub fn typed(values: Vec<mysql_async::Value>, types: &[DeclaredType]) -> Vec<Value> {
    values
        .into_iter()
        .zip(types)
        .map(|(v, t)| match v {
            mysql_async::Value::NULL => Value::Null,
            mysql_async::Value::Bytes(b) => t.from_mysql_text(Some(b)),
            // the text protocol sends nothing else; keep what came
            other => Value::Text(other.as_sql(false)),
        })
        .collect()
}

/// A row's key values, in key order.
pub fn key_values(row: &Row, key: &[Arc<str>]) -> Vec<Value> {
    key.iter()
        .map(|k| row.get(k).cloned().unwrap_or(Value::Null))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_bounds_are_lexicographic_and_literals_cannot_escape() {
        let key: Vec<Arc<str>> = vec!["region".into(), "id".into()];
        let v = [Value::Text("eu'; DROP".into()), Value::Int(7)];
        assert_eq!(
            key_bound(&key, &v, true),
            "(`region` > _utf8mb4 X'6575273b2044524f50') OR (`region` = _utf8mb4 X'6575273b2044524f50' AND `id` > 7)"
        );
        assert_eq!(
            key_bound(&key, &v, false),
            "(`region` < _utf8mb4 X'6575273b2044524f50') OR (`region` = _utf8mb4 X'6575273b2044524f50' AND `id` <= 7)"
        );
        assert_eq!(key_bound(&key[1..], &v[1..], false), "(`id` <= 7)");
        assert_eq!(ident("we`ird"), "`we``ird`");
        assert_eq!(literal(&Value::Bytes(vec![0, 255])), "X'00ff'");
    }
}
