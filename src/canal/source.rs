//! Column charsets read from the source database (`canal.source_url`).
//!
//! Used only with `canal.connection_charset = "ISO-8859-1"` (see `canal::charset`): the service
//! asks the MySQL/MariaDB server Canal reads for the charset of each text column of a table,
//! from `information_schema.COLUMNS`, when a row of the table first needs it and after each
//! DDL on it. The account needs to see the tables (Canal's own account, with SELECT, does).
//!
//! Fails with [`SourceError`]: a URL that cannot be used is definite (the config check refuses
//! it at start); a query that fails is transient, and the connection actor retries it with
//! backoff while fetching nothing.

use crate::canal::charset::{Charset, ColumnCharset, TableCharsets, TableName};
use mysql_async::prelude::Queryable as _;
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The URL is not a usable `mysql://` URL (definite).
    #[error("canal.source_url: {0}")]
    Url(String),
    /// The query failed (transient: the server may be down or restarting).
    #[error("reading column charsets of {table} from the source database {url}: {source}")]
    Query {
        table: String,
        url: String,
        source: mysql_async::Error,
    },
}

impl SourceError {
    /// Transient or definite (see [the crate docs](crate#errors)): a failed query is
    /// transient, an unusable URL definite.
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Query { .. })
    }
}

/// A small pool of connections to the source database.
pub struct SourceSchema {
    pool: mysql_async::Pool,
    /// For messages: the URL with its password hidden.
    shown: String,
}

impl std::fmt::Debug for SourceSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceSchema")
            .field("url", &self.shown)
            .finish()
    }
}

/// Checks a `canal.source_url` value without connecting.
pub fn check_url(url: &str) -> Result<(), SourceError> {
    if !url.starts_with("mysql://") {
        return Err(SourceError::Url(
            "must be a mysql://user:password@host:port URL".into(),
        ));
    }
    mysql_async::Opts::from_url(url)
        .map(|_| ())
        .map_err(|e| SourceError::Url(e.to_string()))
}

impl SourceSchema {
    /// A pool for `url` (nothing is connected until the first lookup).
    pub fn new(url: &str, shown: String) -> Result<SourceSchema, SourceError> {
        check_url(url)?;
        let opts = mysql_async::Opts::from_url(url).map_err(|e| SourceError::Url(e.to_string()))?;
        let opts = mysql_async::OptsBuilder::from_opts(opts).pool_opts(
            mysql_async::PoolOpts::default()
                .with_constraints(mysql_async::PoolConstraints::new(0, 2).expect("0 <= 2")),
        );
        Ok(SourceSchema {
            pool: mysql_async::Pool::new(opts),
            shown,
        })
    }

    /// The charsets of `table`'s text columns as the source database has them now.
    pub async fn table_charsets(&self, table: &TableName) -> Result<TableCharsets, SourceError> {
        let err = |source| SourceError::Query {
            table: format!("{}.{}", table.0, table.1),
            url: self.shown.clone(),
            source,
        };
        let mut conn = self.pool.get_conn().await.map_err(err)?;
        // Every column of the table, so that "no rows" means the table is gone. Of the types
        // whose values are recoded, only MySQL's JSON has no charset: its strings are utf8mb4.
        let rows: Vec<(String, Option<String>)> = conn
            .exec(
                "SELECT COLUMN_NAME, CHARACTER_SET_NAME FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
                (&table.0, &table.1),
            )
            .await
            .map_err(err)?;
        if rows.is_empty() {
            return Ok(TableCharsets::Gone);
        }
        let columns: HashMap<String, ColumnCharset> = rows
            .into_iter()
            .map(|(column, charset)| {
                let name = charset.unwrap_or_else(|| "utf8mb4".into());
                (
                    column.to_lowercase(),
                    ColumnCharset {
                        charset: Charset::from_mysql(&name),
                        name,
                    },
                )
            })
            .collect();
        Ok(TableCharsets::Columns(columns))
    }

    /// Closes the pool's connections.
    pub async fn close(self) {
        let _ = self.pool.disconnect().await;
    }
}
