//! Config-driven consumers: TOML files under `config/consumers/` turned into [`Consumer`]s.
//!
//! This module owns:
//! - the consumer file schema (documented in `config/consumers/README.md`) and its loading and
//!   validation ([`load_dir`], [`parse_file`] → [`ConsumerSpec`]);
//! - rule conditions and payload templates, in CEL (the `cel` crate), compiled once at load;
//! - [`ConfigConsumer`], the [`Consumer`] implementation that runs the rules;
//! - the helpers the command line uses: [`sample_events`] and [`run_on_events`] for
//!   `canal-consumer test NAME`, [`describe`] for `canal-consumer list`.
//!
//! # How it fails
//! - Anything wrong in a file is a [`RulesError`] at load time, naming the file and the key
//!   path (`config/consumers/x.toml: consumers.x.rules[1].when.condition: ...`): TOML syntax,
//!   unknown keys, missing plugin, unknown priority, event type or policy, bad regex, CEL
//!   syntax errors, unknown variables or functions, malformed `${...}` templates, a rule whose
//!   `when` no filter of its consumer can satisfy, and a consumer name defined twice (across
//!   files). The service must not start with one.
//! - What can only fail on a given row (a column the row lacks, a type error, a condition that
//!   is not a bool) fails that rule for that event, and the rule's `on_error` policy applies:
//!   `error_handler` triggers the `error_handler` plugin with
//!   `{consumer, rule, error, event}`, `dead_letter` publishes the same body to the dead-letter
//!   route, `stop` returns [`crate::consumer::ConsumerError::Fatal`]. Nothing is dropped
//!   silently.
//!
//! # CEL variables and helpers
//! `data` (the row: after image, before image for DELETE), `old` (UPDATE: the before values of
//! the changed columns only; `{}` otherwise), `changed` (names of changed columns),
//! `primary_keys`, `database`, `table`, `destination`, `event_type` (`"INSERT"`...),
//! `position` (`{log_file, offset, row_index, server_id, gtid}`), `executed_at` (ms since the epoch),
//! `sql` (the statement of DDL/query events, else `null`).
//! Column values map to CEL as: NULL → `null`, signed/unsigned integers → `int`/`uint`,
//! floats → `double`, text (and DECIMAL, dates, times, ENUM, SET) → `string`, binary →
//! `bytes`, JSON → maps/lists.
//!
//! - `changed("status")`: true iff the event is an UPDATE that changed `status`.
//! - `transition("status", "pending", "paid")`: true iff the event is an UPDATE that changed
//!   `status` from `'pending'` to `'paid'` (numbers compare across int/uint/double).
//! - `primary_key()`: the row's primary-key columns and values as a map, e.g. `{"id": 7}`.

mod consumer;
mod expr;
mod spec;
mod template;
#[cfg(test)]
mod tests;

pub use consumer::{ConfigConsumer, DEAD_LETTER_PLUGIN};
pub use expr::{HELPERS, VARIABLES};
pub use spec::{
    BulkSpec, ConsumerSpec, OnError, RuleSpec, When, default_dead_letter_route, valid_name,
};
pub use template::Template;

use crate::consumer::actor::{finish_part, process_event};
use crate::consumer::filter::NameMatch;
use crate::consumer::{Consumer, ConsumerContext, ProcessFailure};
use crate::event::{ChangeEvent, EventType, Position, Row, Value};
use crate::trigger::{MessageFormat, Route, Trigger};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// Everything that can be wrong with consumer files.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {}{message}", file.display(), if key.is_empty() { String::new() } else { format!("{key}: ") })]
    Invalid {
        file: PathBuf,
        /// The key path, e.g. `consumers.example_consumer.rules[1].when.condition`.
        key: String,
        message: String,
    },
    #[error("{}: consumers.{name}: consumer `{name}` is already defined in {}", file.display(), first.display())]
    DuplicateConsumer {
        file: PathBuf,
        name: String,
        first: PathBuf,
    },
}

/// Parses and validates one consumer file's text.
pub fn parse_file(file: &Path, text: &str) -> Result<Vec<ConsumerSpec>, RulesError> {
    spec::parse_file(file, text)
}

/// Loads every `*.toml` file in `dir` (sorted by name; other files are ignored), validates
/// them, and rejects a consumer name defined twice.
pub fn load_dir(dir: &Path) -> Result<Vec<ConsumerSpec>, RulesError> {
    let io = |source| RulesError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io)?;
    files.retain(|p| p.extension().is_some_and(|e| e == "toml") && p.is_file());
    files.sort();
    let mut out: Vec<ConsumerSpec> = Vec::new();
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| RulesError::Io {
            path: file.clone(),
            source,
        })?;
        for spec in parse_file(&file, &text)? {
            if let Some(first) = seen.get(&spec.name) {
                return Err(RulesError::DuplicateConsumer {
                    file: file.clone(),
                    name: spec.name,
                    first: first.clone(),
                });
            }
            seen.insert(spec.name.clone(), file.clone());
            out.push(spec);
        }
    }
    tracing::debug!(dir = %dir.display(), consumers = out.len(), "consumer files loaded");
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// test NAME

/// What running a consumer over some events produced.
#[derive(Debug, Clone)]
pub struct TestRun {
    /// The messages it would publish, in order.
    pub triggers: Vec<Trigger>,
    /// Events the consumer's filters accepted.
    pub matched: usize,
    /// Set if the consumer stopped (fatal error, `stop` policy or panic): the index of the
    /// event and the error. Events after it were not processed.
    pub stopped: Option<(usize, ProcessFailure)>,
}

/// Runs `consumer` over `events` exactly as its actor would (filters, `process_event`, the
/// error policy), without a broker. Triggers use the default route and format unless the
/// consumer sets its own.
pub fn run_on_events(consumer: &mut dyn Consumer, events: &[ChangeEvent]) -> TestRun {
    run_on_events_routed(consumer, events, Route::default())
}

/// [`run_on_events`] with the service's default route (its configured queue).
pub fn run_on_events_routed(
    consumer: &mut dyn Consumer,
    events: &[ChangeEvent],
    route: Route,
) -> TestRun {
    let mut ctx = ConsumerContext::new(consumer.name(), route, MessageFormat::default());
    let mut matched = 0;
    let mut stopped = None;
    for (i, e) in events.iter().enumerate() {
        if !consumer.wants(e) {
            continue;
        }
        matched += 1;
        if let Err(error) = process_event(consumer, &mut ctx, e) {
            stopped = Some((i, error));
            break;
        }
    }
    // the events are one part: bulk rules send their messages now
    if stopped.is_none()
        && let Err(error) = finish_part(consumer, &mut ctx)
    {
        stopped = Some((events.len(), error));
    }
    TestRun {
        triggers: ctx.take_triggers(),
        matched,
        stopped,
    }
}

/// Sample events built from a consumer's filters, for `test NAME` without an event file: one
/// per filter and event type, with a row holding `id` and every column the rules read (ids and
/// `*_id` columns are integers, others text). UPDATEs change every column but `id`. Positions
/// and timestamps are fixed, so message ids are stable across runs.
pub fn sample_events(spec: &ConsumerSpec) -> Vec<ChangeEvent> {
    let mut columns: BTreeSet<String> = BTreeSet::new();
    for r in &spec.rules {
        columns.extend(r.payload.columns());
        if let Some(c) = &r.when.condition {
            columns.extend(c.columns());
        }
    }
    columns.remove("id");
    let sample = |col: &str, old: bool| -> Value {
        if col.ends_with("_id") {
            Value::Int(if old { 1 } else { 2 })
        } else {
            Value::Text(format!("{}{col}", if old { "old " } else { "sample " }))
        }
    };
    let mut out = Vec::new();
    for f in &spec.filters {
        let database = sample_name(&f.database, "sample_db");
        let table = sample_name(&f.table, "sample_table");
        let types: Vec<EventType> = if f.event_types.is_empty() {
            vec![EventType::Insert, EventType::Update, EventType::Delete]
        } else {
            f.event_types.iter().copied().collect()
        };
        for t in types {
            let n = out.len() as u64;
            let mut data = Row::new();
            let (mut old, mut changed) = (None, Vec::new());
            let mut primary_keys = Vec::new();
            if t.is_row() {
                data.insert("id".into(), Value::Int(1));
                primary_keys.push("id".to_string());
                for c in &columns {
                    data.insert(c.as_str().into(), sample(c, false));
                }
                match t {
                    EventType::Update => {
                        let mut o = Row::new();
                        for c in &columns {
                            o.insert(c.as_str().into(), sample(c, true));
                            changed.push(c.clone());
                        }
                        old = Some(o);
                    }
                    EventType::Insert => changed = data.keys().map(str::to_string).collect(),
                    _ => {}
                }
            }
            out.push(ChangeEvent {
                destination: "example".into(),
                database: database.as_str().into(),
                table: table.as_str().into(),
                event_type: t,
                data,
                old,
                changed: changed.into(),
                primary_keys: primary_keys.into(),
                position: Position {
                    log_file: "mysql-bin.000001".into(),
                    offset: 4 + 100 * n,
                    row_index: 0,
                    server_id: 1,
                    gtid: None,
                },
                executed_at: 1_700_000_000_000,
                is_ddl: !t.is_row(),
                sql: (!t.is_row()).then(|| format!("-- sample {t} on {database}.{table}")),
                snapshot: None,
            });
        }
    }
    out
}

fn sample_name(m: &NameMatch, fallback: &str) -> String {
    match m {
        NameMatch::Exact(n) => n.clone(),
        NameMatch::Pattern(_) => fallback.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// list

/// A consumer as `list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConsumerDescription {
    pub name: String,
    pub enabled: bool,
    pub description: String,
    pub source: PathBuf,
    pub filters: Vec<FilterDescription>,
    pub rules: Vec<RuleDescription>,
    /// Plugins any rule may trigger, plus the error policy's target.
    pub plugins: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FilterDescription {
    pub database: String,
    pub table: String,
    pub events: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleDescription {
    pub name: String,
    pub description: String,
    pub plugin: String,
    pub priority: String,
    /// `table users, INSERT` style summary of the static part of `when`.
    pub when: String,
    pub condition: Option<String>,
    pub on_error: String,
}

fn name_text(m: &NameMatch) -> String {
    match m {
        NameMatch::Exact(n) => n.clone(),
        NameMatch::Pattern(p) => format!("/{}/", p.source()),
    }
}

fn events_text(set: &BTreeSet<EventType>) -> Vec<String> {
    if set.is_empty() {
        return vec!["*".into()];
    }
    let ddl: BTreeSet<EventType> = EventType::DDL.into_iter().collect();
    let mut out = Vec::new();
    let mut rest = set.clone();
    if ddl.is_subset(set) {
        rest.retain(|t| !ddl.contains(t));
    }
    out.extend(rest.iter().map(|t| t.as_str().to_string()));
    if ddl.is_subset(set) {
        out.push("DDL".into());
    }
    out
}

/// Data for `canal-consumer list`.
pub fn describe(spec: &ConsumerSpec) -> ConsumerDescription {
    let mut plugins: Vec<String> = Vec::new();
    let mut add = |p: &str| {
        if !plugins.iter().any(|x| x == p) {
            plugins.push(p.to_string());
        }
    };
    for r in &spec.rules {
        add(&r.plugin);
    }
    for r in &spec.rules {
        match r.on_error {
            OnError::ErrorHandler => add(crate::consumer::ERROR_HANDLER_PLUGIN),
            OnError::DeadLetter => add(DEAD_LETTER_PLUGIN),
            OnError::Stop => {}
        }
    }
    ConsumerDescription {
        name: spec.name.clone(),
        enabled: spec.enabled,
        description: spec.description.clone(),
        source: spec.source.clone(),
        filters: spec
            .filters
            .iter()
            .map(|f| FilterDescription {
                database: name_text(&f.database),
                table: name_text(&f.table),
                events: events_text(&f.event_types),
            })
            .collect(),
        rules: spec
            .rules
            .iter()
            .map(|r| {
                let mut when = Vec::new();
                if let Some(d) = &r.when.database {
                    when.push(format!("database {}", name_text(d)));
                }
                if let Some(t) = &r.when.table {
                    when.push(format!("table {}", name_text(t)));
                }
                if !r.when.events.is_empty() {
                    when.push(events_text(&r.when.events).join("|"));
                }
                RuleDescription {
                    name: r.name.clone(),
                    description: r.description.clone(),
                    plugin: r.plugin.clone(),
                    priority: r.priority.as_str().into(),
                    when: if when.is_empty() {
                        "any".into()
                    } else {
                        when.join(", ")
                    },
                    condition: r.when.condition.as_ref().map(|c| c.source.clone()),
                    on_error: r.on_error.as_str().into(),
                }
            })
            .collect(),
        plugins,
    }
}

impl fmt::Display for ConsumerDescription {
    /// A block of text: a header line, then filters and rules as aligned rows.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} [{}]  ({})",
            self.name,
            if self.enabled { "enabled" } else { "disabled" },
            self.source.display()
        )?;
        if !self.description.is_empty() {
            writeln!(f, "  {}", self.description)?;
        }
        let fw = self
            .filters
            .iter()
            .map(|x| x.database.len() + x.table.len() + 1)
            .max()
            .unwrap_or(0);
        for x in &self.filters {
            writeln!(
                f,
                "  filter  {:<fw$}  {}",
                format!("{}.{}", x.database, x.table),
                x.events.join(", ")
            )?;
        }
        let nw = self.rules.iter().map(|r| r.name.len()).max().unwrap_or(0);
        let pw = self.rules.iter().map(|r| r.plugin.len()).max().unwrap_or(0);
        for r in &self.rules {
            write!(
                f,
                "  rule    {:<nw$}  -> {:<pw$}  {:<6}  when {}",
                r.name, r.plugin, r.priority, r.when
            )?;
            if let Some(c) = &r.condition {
                write!(f, " if {c}")?;
            }
            writeln!(f, "  on_error {}", r.on_error)?;
        }
        writeln!(f, "  plugins {}", self.plugins.join(", "))
    }
}

/// All consumers as one summary table (name, state, filters, rules, plugins).
pub fn describe_table(descriptions: &[ConsumerDescription]) -> String {
    let rows: Vec<[String; 5]> = descriptions
        .iter()
        .map(|d| {
            [
                d.name.clone(),
                if d.enabled { "enabled" } else { "disabled" }.to_string(),
                d.filters
                    .iter()
                    .map(|x| format!("{}.{} {{{}}}", x.database, x.table, x.events.join(",")))
                    .collect::<Vec<_>>()
                    .join("; "),
                d.rules.len().to_string(),
                d.plugins.join(", "),
            ]
        })
        .collect();
    let header = ["NAME", "STATE", "FILTERS", "RULES", "PLUGINS"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
