//! Table filters: which database, table and event types a consumer wants.

use crate::consumer::canal_regex;
use crate::event::{ChangeEvent, EventType};
use regex::Regex;
use std::collections::BTreeSet;

/// A name matcher: exact (case-insensitive, like MySQL identifiers on Canal's side) or a regex
/// anchored on both ends.
#[derive(Debug, Clone)]
pub enum NameMatch {
    Exact(String),
    Pattern(NamePattern),
}

/// A compiled name pattern with its Canal filter form (see [`crate::consumer::canal_regex`]).
#[derive(Debug, Clone)]
pub struct NamePattern {
    source: String,
    regex: Regex,
    canal: String,
}

impl NamePattern {
    /// The pattern as written.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// Why a name pattern was refused.
#[derive(Debug, thiserror::Error)]
pub enum PatternError {
    #[error("bad regex: {0}")]
    Regex(#[from] regex::Error),
    #[error("cannot be expressed as a Canal subscription filter: {0}")]
    Canal(String),
}

impl NameMatch {
    pub fn exact(name: &str) -> Self {
        NameMatch::Exact(name.to_string())
    }

    /// Compiles `pattern` anchored as `^(?:pattern)$`, and its Canal filter form.
    pub fn pattern(pattern: &str) -> Result<Self, PatternError> {
        let regex = Regex::new(&format!("^(?:{pattern})$"))?;
        let canal = canal_regex::translate(pattern).map_err(PatternError::Canal)?;
        Ok(NameMatch::Pattern(NamePattern {
            source: pattern.to_string(),
            regex,
            canal,
        }))
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            NameMatch::Exact(n) => n.eq_ignore_ascii_case(name),
            NameMatch::Pattern(p) => p.regex.is_match(name),
        }
    }

    /// The matcher as a Canal filter regex fragment (matched by Canal, case-insensitively,
    /// against the lower-cased `schema.table`). Never contains a comma or a top-level `|`.
    pub fn canal_regex(&self) -> String {
        match self {
            NameMatch::Exact(n) => canal_regex::literal(&n.to_lowercase()),
            NameMatch::Pattern(p) => p.canal.clone(),
        }
    }
}

/// `add_filter(database, table, {event types})`.
#[derive(Debug, Clone)]
pub struct TableFilter {
    pub database: NameMatch,
    pub table: NameMatch,
    /// Empty means every event type Canal sends; SNAPSHOT (rows a backfill read) only when
    /// named.
    pub event_types: BTreeSet<EventType>,
}

impl TableFilter {
    /// Exact database and table names.
    pub fn new(database: &str, table: &str, event_types: &[EventType]) -> Self {
        TableFilter {
            database: NameMatch::exact(database),
            table: NameMatch::exact(table),
            event_types: event_types.iter().copied().collect(),
        }
    }

    /// Whether this filter lets live events through (any type but SNAPSHOT): a consumer with
    /// such a filter takes its SNAPSHOT rows in the lane, beside its live changes.
    pub fn takes_live(&self) -> bool {
        self.event_types.is_empty() || self.event_types.iter().any(|t| *t != EventType::Snapshot)
    }

    pub fn matches(&self, event: &ChangeEvent) -> bool {
        let by_type = if self.event_types.is_empty() {
            event.event_type != EventType::Snapshot
        } else {
            self.event_types.contains(&event.event_type)
        };
        by_type && self.database.matches(&event.database) && self.table.matches(&event.table)
    }

    /// This filter as one Canal subscription regex on `schema.table`.
    pub fn canal_regex(&self) -> String {
        format!(
            "{}\\.{}",
            self.database.canal_regex(),
            self.table.canal_regex()
        )
    }
}

/// The Canal subscription filter covering `filters`: their regexes, de-duplicated, joined with
/// commas. Empty input gives an empty string, which keeps the server's own filter; callers that
/// want "nothing" must handle that case themselves.
pub fn canal_filter<'a>(filters: impl IntoIterator<Item = &'a TableFilter>) -> String {
    let set: BTreeSet<String> = filters.into_iter().map(|f| f.canal_regex()).collect();
    set.into_iter().collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_pattern_filters_and_their_canal_form() {
        let f = TableFilter::new("test_db", "users", &[EventType::Insert]);
        assert_eq!(f.canal_regex(), "test_db\\.users");
        let g = TableFilter {
            database: NameMatch::exact("shop"),
            table: NameMatch::pattern("orders_\\d+").unwrap(),
            event_types: Default::default(),
        };
        assert!(g.table.matches("orders_12"));
        assert!(!g.table.matches("orders_12x"));
        assert_eq!(
            canal_filter([&f, &g, &f]),
            "shop\\.orders_[\\x30-\\x39٠-９]+,test_db\\.users"
        );
        let h = TableFilter {
            database: NameMatch::exact("My-DB"),
            table: NameMatch::pattern("^(t_a|t_b)$").unwrap(),
            event_types: Default::default(),
        };
        assert_eq!(h.canal_regex(), "my\\x2ddb\\.(?:t_a|t_b)");
        assert!(h.database.matches("my-db") && h.table.matches("t_b"));
        assert!(!h.table.matches("t_c"));
    }
}
