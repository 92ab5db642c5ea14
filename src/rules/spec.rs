//! The consumer file schema (raw TOML) and its validation into [`ConsumerSpec`].

use super::RulesError;
use super::expr::Expression;
use super::template::Template;
use crate::consumer::filter::{NameMatch, TableFilter};
use crate::event::EventType;
use crate::trigger::{MessageFormat, Priority, Route};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Raw schema: what a file may contain. Every table denies unknown keys.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    consumers: IndexMap<String, RawConsumer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsumer {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    description: String,
    #[serde(default)]
    format: Option<MessageFormat>,
    #[serde(default)]
    route: Option<RawRoute>,
    #[serde(default)]
    priority: Option<Priority>,
    #[serde(default)]
    on_error: Option<OnError>,
    #[serde(default)]
    dead_letter_route: Option<RawRoute>,
    /// `park` (default) or `stall`: what happens to a part that keeps failing or that the
    /// broker cannot route.
    #[serde(default)]
    on_poison: Option<crate::consumer::OnPoison>,
    /// Failures of the same part before it is parked (default 3, at least 1).
    #[serde(default)]
    poison_attempts: Option<u32>,
    #[serde(default)]
    filters: Vec<RawFilter>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    #[serde(default)]
    exchange: String,
    routing_key: String,
}

impl From<RawRoute> for Route {
    fn from(r: RawRoute) -> Route {
        Route {
            exchange: r.exchange,
            routing_key: r.routing_key,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    database: Option<String>,
    database_pattern: Option<String>,
    table: Option<String>,
    table_pattern: Option<String>,
    events: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    when: RawWhen,
    plugin: String,
    #[serde(default)]
    payload: Option<toml::Value>,
    #[serde(default)]
    priority: Option<Priority>,
    #[serde(default)]
    route: Option<RawRoute>,
    #[serde(default)]
    format: Option<MessageFormat>,
    #[serde(default)]
    on_error: Option<OnError>,
    #[serde(default)]
    batch: Option<RawBatch>,
}

/// `batch = { max_rows = 500, max_wait = "50ms" }` on a rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    max_rows: i64,
    #[serde(default)]
    max_wait: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWhen {
    database: Option<String>,
    table: Option<String>,
    table_pattern: Option<String>,
    events: Option<toml::Value>,
    condition: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Validated model.

/// What happens to a rule whose condition or payload fails on a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Trigger the `error_handler` plugin with `{consumer, rule, error, event}`.
    #[default]
    ErrorHandler,
    /// Publish `{consumer, rule, error, event}` to the consumer's dead-letter route.
    DeadLetter,
    /// Stop the consumer (its supervisor restarts it and the event is retried).
    Stop,
}

impl OnError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::ErrorHandler => "error_handler",
            OnError::DeadLetter => "dead_letter",
            OnError::Stop => "stop",
        }
    }
}

/// A validated consumer definition: what `load_dir` returns and `ConfigConsumer::new` takes.
/// Cheap to clone (compiled programs are shared).
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub name: String,
    pub enabled: bool,
    pub description: String,
    /// The file it was defined in.
    pub source: PathBuf,
    pub filters: Vec<TableFilter>,
    /// Route for this consumer's triggers unless a rule overrides it; `None` keeps the
    /// service default (the `plugin_tasks` queue).
    pub route: Option<Route>,
    /// Format unless a rule overrides it; `None` keeps the service default.
    pub format: Option<MessageFormat>,
    /// The consumer's default error policy (rules may override it).
    pub on_error: OnError,
    /// Where `dead_letter` sends failed rows.
    pub dead_letter_route: Route,
    /// What happens to parts that keep failing or cannot be routed.
    pub poison: crate::consumer::PoisonPolicy,
    pub rules: Vec<RuleSpec>,
}

/// One rule: when it fires, which plugin it triggers, with what.
#[derive(Debug, Clone)]
pub struct RuleSpec {
    pub name: String,
    pub description: String,
    pub when: When,
    pub plugin: String,
    pub payload: Template,
    pub priority: Priority,
    pub route: Option<Route>,
    pub format: Option<MessageFormat>,
    pub on_error: OnError,
    /// Bulk mode: consecutive matching rows go out as one message whose payload is the list
    /// of their payloads. `None`: one message per row (the default).
    pub batch: Option<BulkSpec>,
}

/// A rule's bulk settings (see `config/consumers/README.md`, "Bulk rules").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkSpec {
    /// At most this many rows per message (1 to [`BulkSpec::MAX_ROWS`]).
    pub max_rows: usize,
    /// How long a row may wait for more rows. A bulk never spans a Canal batch (it is sent
    /// at the end of the consumer's part of the batch at the latest), so within this
    /// release no row ever waits for a later batch and this bound is always met.
    pub max_wait: std::time::Duration,
}

impl BulkSpec {
    pub const MAX_ROWS: usize = 10_000;
    pub const DEFAULT_MAX_WAIT: std::time::Duration = std::time::Duration::from_millis(50);
    pub const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
}

/// A rule's guard: cheap name/event checks first, then the CEL condition.
#[derive(Debug, Clone, Default)]
pub struct When {
    pub database: Option<NameMatch>,
    pub table: Option<NameMatch>,
    /// Empty: any event type the consumer's filters let through.
    pub events: BTreeSet<EventType>,
    pub condition: Option<Expression>,
}

impl When {
    /// The checks that need no CEL.
    pub fn matches_names(&self, event: &crate::event::ChangeEvent) -> bool {
        (self.events.is_empty() || self.events.contains(&event.event_type))
            && self
                .database
                .as_ref()
                .is_none_or(|d| d.matches(&event.database))
            && self.table.as_ref().is_none_or(|t| t.matches(&event.table))
    }
}

impl RuleSpec {
    /// True if evaluating this rule needs a CEL scope.
    pub fn needs_cel(&self) -> bool {
        self.when.condition.is_some() || !self.payload.is_literal()
    }
}

// ---------------------------------------------------------------------------------------------
// Loading.

/// Checks `batch = { max_rows, max_wait }`; errors name the key.
fn bulk_spec(at: &str, b: RawBatch) -> Result<BulkSpec, (String, String)> {
    let max_rows = usize::try_from(b.max_rows)
        .ok()
        .filter(|n| (1..=BulkSpec::MAX_ROWS).contains(n))
        .ok_or_else(|| {
            (
                format!("{at}.max_rows"),
                format!(
                    "max_rows must be between 1 and {}, got {}",
                    BulkSpec::MAX_ROWS,
                    b.max_rows
                ),
            )
        })?;
    let max_wait = match b.max_wait {
        None => BulkSpec::DEFAULT_MAX_WAIT,
        Some(text) => {
            let key = format!("{at}.max_wait");
            let d = humantime::parse_duration(text.trim()).map_err(|e| {
                (
                    key.clone(),
                    format!("max_wait {text:?} is not a duration like \"50ms\": {e}"),
                )
            })?;
            if d.is_zero() || d > BulkSpec::MAX_WAIT {
                return Err((
                    key,
                    format!(
                        "max_wait must be more than 0 and at most {}, got {text:?}",
                        humantime::format_duration(BulkSpec::MAX_WAIT)
                    ),
                ));
            }
            d
        }
    };
    Ok(BulkSpec { max_rows, max_wait })
}

/// Parses and validates one file's text. `file` is only used in error messages and
/// [`ConsumerSpec::source`].
pub fn parse_file(file: &Path, text: &str) -> Result<Vec<ConsumerSpec>, RulesError> {
    let de = toml::Deserializer::parse(text).map_err(|e| toml_error(file, text, "", e))?;
    let raw: RawFile = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        toml_error(file, text, &key, e.into_inner())
    })?;
    raw.consumers
        .into_iter()
        .map(|(name, c)| validate_consumer(file, name, c))
        .collect()
}

fn toml_error(file: &Path, text: &str, key: &str, e: toml::de::Error) -> RulesError {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
    let message = e.message().trim().to_string();
    let message = match line {
        Some(l) => format!("{message} (line {l})"),
        None => message,
    };
    RulesError::Invalid {
        file: file.to_path_buf(),
        key: key.to_string(),
        message,
    }
}

fn validate_consumer(
    file: &Path,
    name: String,
    c: RawConsumer,
) -> Result<ConsumerSpec, RulesError> {
    let base = format!("consumers.{name}");
    let err = |key: String, message: String| RulesError::Invalid {
        file: file.to_path_buf(),
        key,
        message,
    };
    if !valid_name(&name) {
        return Err(err(
            base,
            "a consumer name must be letters, digits, `_` or `-`".into(),
        ));
    }
    if c.filters.is_empty() {
        return Err(err(
            format!("{base}.filters"),
            "a consumer needs at least one [[filters]] entry".into(),
        ));
    }
    let mut filters = Vec::with_capacity(c.filters.len());
    for (i, f) in c.filters.into_iter().enumerate() {
        let at = format!("{base}.filters[{i}]");
        let database = name_match(&at, "database", f.database, f.database_pattern, true)
            .map_err(|(k, m)| err(k, m))?
            .expect("required");
        let table = name_match(&at, "table", f.table, f.table_pattern, true)
            .map_err(|(k, m)| err(k, m))?
            .expect("required");
        let event_types = match f.events {
            None => [EventType::Insert, EventType::Update, EventType::Delete]
                .into_iter()
                .collect(),
            Some(v) => parse_events(&v).map_err(|m| err(format!("{at}.events"), m))?,
        };
        filters.push(TableFilter {
            database,
            table,
            event_types,
        });
    }
    let on_error = c.on_error.unwrap_or_default();
    let default_priority = c.priority.unwrap_or_default();
    let mut rules = Vec::with_capacity(c.rules.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, r) in c.rules.into_iter().enumerate() {
        let at = format!("{base}.rules[{i}]");
        if !valid_name(&r.name) {
            return Err(err(
                format!("{at}.name"),
                format!(
                    "rule name {:?} must be non-empty letters, digits, `_` or `-`",
                    r.name
                ),
            ));
        }
        if let Some(first) = seen.insert(r.name.clone(), i) {
            return Err(err(
                format!("{at}.name"),
                format!(
                    "rule `{}` is already defined at {base}.rules[{first}]",
                    r.name
                ),
            ));
        }
        if r.plugin.trim().is_empty() {
            return Err(err(
                format!("{at}.plugin"),
                "plugin must not be empty".into(),
            ));
        }
        let when_at = format!("{at}.when");
        let when = When {
            database: r.when.database.map(|d| NameMatch::exact(&d)),
            table: name_match(&when_at, "table", r.when.table, r.when.table_pattern, false)
                .map_err(|(k, m)| err(k, m))?,
            events: match r.when.events {
                None => BTreeSet::new(),
                Some(v) => parse_events(&v).map_err(|m| err(format!("{when_at}.events"), m))?,
            },
            condition: match r.when.condition {
                None => None,
                Some(src) => Some(
                    Expression::compile_condition(&src)
                        .map_err(|m| err(format!("{when_at}.condition"), m))?,
                ),
            },
        };
        if !can_fire(&when, &filters) {
            return Err(err(
                when_at,
                "this rule can never fire: no filter of the consumer lets its database, table \
                 and event types through"
                    .into(),
            ));
        }
        let payload = match r.payload {
            None => Template::Literal(serde_json::json!({})),
            Some(v) => {
                Template::compile(&v).map_err(|(sub, m)| err(format!("{at}.payload{sub}"), m))?
            }
        };
        let batch = match r.batch {
            None => None,
            Some(b) => Some(bulk_spec(&format!("{at}.batch"), b).map_err(|(k, m)| err(k, m))?),
        };
        rules.push(RuleSpec {
            batch,
            name: r.name,
            description: r.description,
            when,
            plugin: r.plugin,
            payload,
            priority: r.priority.unwrap_or(default_priority),
            route: r.route.map(Route::from),
            format: r.format,
            on_error: r.on_error.unwrap_or(on_error),
        });
    }
    Ok(ConsumerSpec {
        name,
        enabled: c.enabled,
        description: c.description,
        source: file.to_path_buf(),
        filters,
        route: c.route.map(Route::from),
        format: c.format,
        on_error,
        dead_letter_route: c
            .dead_letter_route
            .map(Route::from)
            .unwrap_or_else(default_dead_letter_route),
        poison: crate::consumer::PoisonPolicy {
            on_poison: c.on_poison.unwrap_or_default(),
            attempts: c
                .poison_attempts
                .unwrap_or(crate::consumer::PoisonPolicy::default().attempts)
                .max(1),
        },
        rules,
    })
}

/// Whether some filter accepts events the rule's static guard accepts (exact names only; a
/// pattern on either side is given the benefit of the doubt).
fn can_fire(when: &When, filters: &[TableFilter]) -> bool {
    let name_ok = |rule: &Option<NameMatch>, filter: &NameMatch| match (rule, filter) {
        (Some(NameMatch::Exact(r)), f) => f.matches(r),
        _ => true,
    };
    filters.iter().any(|f| {
        name_ok(&when.database, &f.database)
            && name_ok(&when.table, &f.table)
            && (when.events.is_empty()
                || f.event_types.is_empty()
                || !when.events.is_disjoint(&f.event_types))
    })
}

/// The dead-letter route when a consumer names none.
pub use crate::consumer::default_dead_letter_route;

/// The consumer-name (and rule-name) grammar: one or more ASCII letters, digits, `_` or `-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `exact` xor `pattern`; `required` says whether one must be given.
fn name_match(
    at: &str,
    what: &str,
    exact: Option<String>,
    pattern: Option<String>,
    required: bool,
) -> Result<Option<NameMatch>, (String, String)> {
    match (exact, pattern) {
        (Some(_), Some(_)) => Err((
            format!("{at}.{what}_pattern"),
            format!("give either `{what}` or `{what}_pattern`, not both"),
        )),
        (Some(e), None) if e.trim().is_empty() => Err((
            format!("{at}.{what}"),
            format!("`{what}` must not be empty"),
        )),
        (Some(e), None) => Ok(Some(NameMatch::exact(e.trim()))),
        (None, Some(p)) => NameMatch::pattern(&p)
            .map(Some)
            .map_err(|e| (format!("{at}.{what}_pattern"), format!("{p:?}: {e}"))),
        (None, None) if required => Err((
            at.to_string(),
            format!("missing `{what}` (or `{what}_pattern`)"),
        )),
        (None, None) => Ok(None),
    }
}

/// `events = ["INSERT", "UPDATE"]`, `events = "DDL"`, `events = ["DDL", "INSERT"]`, `"ALL"`.
fn parse_events(v: &toml::Value) -> Result<BTreeSet<EventType>, String> {
    let names: Vec<&str> = match v {
        toml::Value::String(s) => vec![s.as_str()],
        toml::Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .ok_or_else(|| format!("event types are strings, found {}", i.type_str()))
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(format!(
                "expected an event type or a list of them, found {}",
                other.type_str()
            ));
        }
    };
    if names.is_empty() {
        return Err("the list of event types is empty".into());
    }
    let mut out = BTreeSet::new();
    for n in names {
        match n.trim().to_ascii_uppercase().as_str() {
            "DDL" => out.extend(EventType::DDL),
            "ROW" => out.extend([EventType::Insert, EventType::Update, EventType::Delete]),
            "ALL" => out.extend(EventType::ALL),
            _ => {
                out.insert(EventType::parse(n).ok_or_else(|| {
                    format!(
                        "unknown event type {n:?} (use INSERT, UPDATE, DELETE, SNAPSHOT, DDL, ROW, ALL or one of {})",
                        EventType::ALL.map(|t| t.as_str()).join(", ")
                    )
                })?);
            }
        }
    }
    Ok(out)
}
