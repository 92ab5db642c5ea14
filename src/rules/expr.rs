//! CEL for rules: the environment, compile-time checks, the per-event variables and the helper
//! functions `changed(column)` and `transition(column, from, to)`.
//!
//! Programs are compiled once when a consumer file is loaded; for each event one CEL scope is
//! built (lazily, only if a rule that passed its cheap table/event checks needs CEL) and every
//! rule of the consumer evaluates against it.

use crate::event::{ChangeEvent, Row, Value as ColValue};
use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue};
use cel::objects::Key;
use cel::{Context, Env, ExecutionError, FunctionContext, Program, Value};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

/// The variables a rule expression can read.
pub const VARIABLES: [&str; 10] = [
    "data",
    "old",
    "changed",
    "database",
    "table",
    "event_type",
    "position",
    "executed_at",
    "primary_keys",
    "destination",
];

/// Our helper functions (see the module docs of `rules`).
pub const HELPERS: [&str; 3] = ["changed", "transition", "primary_key"];

/// CEL type names, which are identifiers too (`type(x) == int`).
const TYPE_NAMES: [&str; 11] = [
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "bool",
    "list",
    "map",
    "null_type",
    "type",
    "dyn",
];

/// The shared standard environment.
pub fn env() -> Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib())).clone()
}

/// A compiled expression and its source text.
#[derive(Clone)]
pub struct Expression {
    pub source: String,
    program: Arc<Program>,
}

impl std::fmt::Debug for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expression({:?})", self.source)
    }
}

impl Expression {
    /// Compiles `source` and checks that it only names known variables and functions.
    pub fn compile(source: &str) -> Result<Expression, String> {
        let program = env()
            .compile(source)
            .map_err(|e| format!("syntax error in `{source}`: {e}"))?;
        let mut refs = Refs::default();
        refs.walk(program.expression(), &mut Vec::new());
        if let Some(v) = refs
            .free_vars
            .iter()
            .find(|v| !VARIABLES.contains(&v.as_str()) && !TYPE_NAMES.contains(&v.as_str()))
        {
            return Err(format!(
                "unknown variable `{v}` in `{source}` (known: {})",
                VARIABLES.join(", ")
            ));
        }
        if let Some(f) = refs.functions.iter().find(|f| !function_known(f)) {
            return Err(format!("unknown function `{f}` in `{source}`"));
        }
        Ok(Expression {
            source: source.to_string(),
            program: Arc::new(program),
        })
    }

    pub fn eval(&self, scope: &Context<'_, '_>) -> Result<Value, String> {
        self.program
            .execute(scope)
            .map_err(|e| format!("`{}`: {}", self.source, describe_error(&e)))
    }

    /// Columns this expression reads from `data`/`old` or names in a helper call.
    pub fn columns(&self) -> BTreeSet<String> {
        let mut refs = Refs::default();
        refs.walk(self.program.expression(), &mut Vec::new());
        refs.columns
    }
}

fn describe_error(e: &ExecutionError) -> String {
    match e {
        ExecutionError::NoSuchKey(k) => format!("no such key `{k}`"),
        other => other.to_string(),
    }
}

/// Whether a function name is an operator, one of ours, or declared by the standard library.
fn function_known(name: &str) -> bool {
    if name.starts_with(['_', '@', '!', '-']) || HELPERS.contains(&name) {
        return true;
    }
    // `Context::add_function` refuses names the environment declares as overloads: that is
    // the public way to ask whether the standard library knows `name`.
    let mut probe = Context::with_env(env());
    probe.add_function(name, |a: i64| a).is_err()
}

#[derive(Default)]
struct Refs {
    free_vars: BTreeSet<String>,
    functions: BTreeSet<String>,
    columns: BTreeSet<String>,
}

impl Refs {
    fn walk(&mut self, e: &IdedExpr, bound: &mut Vec<String>) {
        match &e.expr {
            Expr::Unspecified | Expr::Literal(_) => {}
            Expr::Ident(name) => {
                if !name.starts_with('@') && !bound.iter().any(|b| b == name) {
                    self.free_vars.insert(name.clone());
                }
            }
            Expr::Call(call) => {
                self.functions.insert(call.func_name.clone());
                if HELPERS.contains(&call.func_name.as_str())
                    && call.target.is_none()
                    && let Some(IdedExpr {
                        expr: Expr::Literal(LiteralValue::String(s)),
                        ..
                    }) = call.args.first()
                {
                    self.columns.insert(s.inner().to_string());
                }
                if call.func_name == "_[_]"
                    && let (
                        Some(IdedExpr {
                            expr: Expr::Ident(v),
                            ..
                        }),
                        Some(key),
                    ) = (call.args.first(), call.args.get(1))
                    && (v == "data" || v == "old")
                    && let Expr::Literal(LiteralValue::String(s)) = &key.expr
                {
                    self.columns.insert(s.inner().to_string());
                }
                if let Some(t) = &call.target {
                    self.walk(t, bound);
                }
                for a in &call.args {
                    self.walk(a, bound);
                }
            }
            Expr::Comprehension(c) => {
                self.walk(&c.iter_range, bound);
                self.walk(&c.accu_init, bound);
                let n = bound.len();
                bound.push(c.iter_var.clone());
                if let Some(v2) = &c.iter_var2 {
                    bound.push(v2.clone());
                }
                bound.push(c.accu_var.clone());
                self.walk(&c.loop_cond, bound);
                self.walk(&c.loop_step, bound);
                self.walk(&c.result, bound);
                bound.truncate(n);
            }
            Expr::List(l) => {
                for x in &l.elements {
                    self.walk(x, bound);
                }
            }
            Expr::Map(m) => {
                for entry in &m.entries {
                    match &entry.expr {
                        EntryExpr::StructField(f) => self.walk(&f.value, bound),
                        EntryExpr::MapEntry(me) => {
                            self.walk(&me.key, bound);
                            self.walk(&me.value, bound);
                        }
                    }
                }
            }
            Expr::Select(s) => {
                if let Expr::Ident(v) = &s.operand.expr
                    && (v == "data" || v == "old")
                {
                    self.columns.insert(s.field.clone());
                }
                self.walk(&s.operand, bound);
            }
            Expr::Struct(s) => {
                for entry in &s.entries {
                    match &entry.expr {
                        EntryExpr::StructField(f) => self.walk(&f.value, bound),
                        EntryExpr::MapEntry(me) => {
                            self.walk(&me.key, bound);
                            self.walk(&me.value, bound);
                        }
                    }
                }
            }
        }
    }
}

/// The root context of a consumer: the environment plus our helper functions. Each event gets a
/// child scope of it holding the variables.
pub fn root_context() -> Context<'static, 'static> {
    let mut ctx = Context::with_env(env());
    // Neither name is a standard overload, so these cannot fail; an error would only mean the
    // helpers are missing, which the tests catch.
    let _ = ctx.add_function("changed", helper_changed);
    let _ = ctx.add_function("transition", helper_transition);
    let _ = ctx.add_function("primary_key", helper_primary_key);
    ctx
}

/// `changed("col")`: true iff the event is an UPDATE and Canal flagged `col` as updated.
fn helper_changed(ftx: &FunctionContext, column: Arc<String>) -> Result<bool, ExecutionError> {
    if variable(ftx, "event_type")? != Value::String(Arc::new("UPDATE".into())) {
        return Ok(false);
    }
    let changed = variable(ftx, "changed")?;
    Ok(match changed {
        Value::List(items) => items
            .iter()
            .any(|c| matches!(c, Value::String(s) if **s == *column)),
        _ => false,
    })
}

/// `transition("col", from, to)`: true iff the event is an UPDATE that changed `col` from
/// `from` to `to` (values compared as CEL values, so `1` matches an integer column and
/// `'paid'` a text one).
fn helper_transition(
    ftx: &FunctionContext,
    column: Arc<String>,
    from: Value,
    to: Value,
) -> Result<bool, ExecutionError> {
    if !helper_changed(ftx, column.clone())? {
        return Ok(false);
    }
    let key = Key::String(column);
    let before = match variable(ftx, "old")? {
        Value::Map(m) => m.map.get(&key).cloned(),
        _ => None,
    };
    let after = match variable(ftx, "data")? {
        Value::Map(m) => m.map.get(&key).cloned(),
        _ => None,
    };
    Ok(
        matches!((before, after), (Some(b), Some(a)) if loosely_eq(&b, &from) && loosely_eq(&a, &to)),
    )
}

/// `primary_key()`: the primary-key columns of the row and their values, as a map (`{}` if the
/// table has none). A key column missing from `data` is an error.
fn helper_primary_key(ftx: &FunctionContext) -> Result<Value, ExecutionError> {
    let keys = match variable(ftx, "primary_keys")? {
        Value::List(items) => items,
        _ => return Ok(Value::from(HashMap::<Key, Value>::new())),
    };
    let data = match variable(ftx, "data")? {
        Value::Map(m) => m.map,
        _ => return Err(ftx.error("data is not a map")),
    };
    let mut out: HashMap<Key, Value> = HashMap::with_capacity(keys.len());
    for k in keys.iter() {
        if let Value::String(name) = k {
            let key = Key::String(name.clone());
            let v = data
                .get(&key)
                .cloned()
                .ok_or_else(|| ftx.error(format!("primary-key column `{name}` is not in data")))?;
            out.insert(key, v);
        }
    }
    Ok(Value::from(out))
}

/// Equality that treats int, uint and double with the same numeric value as equal (CEL's
/// heterogeneous equality), so `transition('level', 1, 2)` works on unsigned columns too.
fn loosely_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Int(x), Value::UInt(y)) | (Value::UInt(y), Value::Int(x)) => {
            u64::try_from(*x).is_ok_and(|x| x == *y)
        }
        (Value::Int(x), Value::Float(y)) | (Value::Float(y), Value::Int(x)) => (*x as f64) == *y,
        (Value::UInt(x), Value::Float(y)) | (Value::Float(y), Value::UInt(x)) => (*x as f64) == *y,
        _ => a == b,
    }
}

fn variable(ftx: &FunctionContext, name: &str) -> Result<Value, ExecutionError> {
    let v = ftx
        .ptx
        .get_variable(name)
        .ok_or_else(|| ExecutionError::undeclared_reference(name))?;
    Value::try_from(v.as_ref())
}

/// Adds the event's variables to `scope`.
pub fn bind_event(scope: &mut Context<'_, '_>, event: &ChangeEvent) {
    scope.add_variable_from_value("data", row_value(&event.data));
    scope.add_variable_from_value(
        "old",
        event
            .old
            .as_ref()
            .map(row_value)
            .unwrap_or_else(|| Value::from(HashMap::<Key, Value>::new())),
    );
    scope.add_variable_from_value(
        "changed",
        Value::List(Arc::new(
            event
                .changed
                .iter()
                .map(|c| Value::String(Arc::new(c.clone())))
                .collect(),
        )),
    );
    scope.add_variable_from_value(
        "primary_keys",
        Value::List(Arc::new(
            event
                .primary_keys
                .iter()
                .map(|c| Value::String(Arc::new(c.clone())))
                .collect(),
        )),
    );
    scope.add_variable_from_value("database", event.database.clone());
    scope.add_variable_from_value("table", event.table.clone());
    scope.add_variable_from_value("destination", event.destination.clone());
    scope.add_variable_from_value("event_type", event.event_type.as_str());
    scope.add_variable_from_value("executed_at", Value::Int(event.executed_at));
    let mut pos: HashMap<Key, Value> = HashMap::with_capacity(4);
    pos.insert(
        key("log_file"),
        Value::String(Arc::new(event.position.log_file.clone())),
    );
    pos.insert(
        key("offset"),
        Value::Int(i64::try_from(event.position.offset).unwrap_or(i64::MAX)),
    );
    pos.insert(
        key("row_index"),
        Value::Int(i64::from(event.position.row_index)),
    );
    pos.insert(
        key("gtid"),
        event
            .position
            .gtid
            .as_ref()
            .map(|g| Value::String(Arc::new(g.clone())))
            .unwrap_or(Value::Null),
    );
    scope.add_variable_from_value("position", Value::from(pos));
}

fn key(s: &str) -> Key {
    Key::String(Arc::new(s.to_string()))
}

fn row_value(row: &Row) -> Value {
    let map: HashMap<Key, Value> = row
        .iter()
        .map(|(k, v)| (Key::String(Arc::new(k.clone())), column_value(v)))
        .collect();
    Value::from(map)
}

/// One column value as a CEL value: NULL is `null`, integers `int`/`uint`, floats `double`,
/// text `string`, binary `bytes`, and JSON documents maps and lists.
pub fn column_value(v: &ColValue) -> Value {
    match v {
        ColValue::Null => Value::Null,
        ColValue::Int(i) => Value::Int(*i),
        ColValue::UInt(u) => Value::UInt(*u),
        ColValue::Float(f) => Value::Float(*f),
        ColValue::Text(s) => Value::String(Arc::new(s.clone())),
        ColValue::Bytes(b) => Value::Bytes(Arc::new(b.clone())),
        ColValue::Json(j) => json_value(j),
    }
}

fn json_value(j: &serde_json::Value) -> Value {
    match j {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::String(Arc::new(s.clone())),
        serde_json::Value::Array(a) => Value::List(Arc::new(a.iter().map(json_value).collect())),
        serde_json::Value::Object(o) => {
            let map: HashMap<Key, Value> = o
                .iter()
                .map(|(k, v)| (Key::String(Arc::new(k.clone())), json_value(v)))
                .collect();
            Value::from(map)
        }
    }
}

/// A CEL result as JSON, with the conventions of [`crate::event::Value::to_json`]: bytes become
/// `{"base64": ...}`, non-finite floats their text. Map keys become strings. Map entries are
/// sorted by key so the output is deterministic.
pub fn to_json(v: &Value) -> Result<serde_json::Value, String> {
    use base64::Engine as _;
    Ok(match v {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => (*b).into(),
        Value::Int(i) => (*i).into(),
        Value::UInt(u) => (*u).into(),
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .unwrap_or_else(|| serde_json::Value::String(f.to_string())),
        Value::String(s) => serde_json::Value::String(s.to_string()),
        Value::Bytes(b) => serde_json::json!({
            "base64": base64::engine::general_purpose::STANDARD.encode(b.as_slice())
        }),
        Value::List(items) => {
            serde_json::Value::Array(items.iter().map(to_json).collect::<Result<Vec<_>, _>>()?)
        }
        Value::Map(m) => {
            let mut entries: Vec<(String, &Value)> =
                m.map.iter().map(|(k, v)| (key_text(k), v)).collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut out = serde_json::Map::with_capacity(entries.len());
            for (k, v) in entries {
                out.insert(k, to_json(v)?);
            }
            serde_json::Value::Object(out)
        }
        other => {
            return Err(format!(
                "a {} value cannot be put in a payload",
                other.type_of()
            ));
        }
    })
}

fn key_text(k: &Key) -> String {
    match k {
        Key::Int(i) => i.to_string(),
        Key::Uint(u) => u.to_string(),
        Key::Bool(b) => b.to_string(),
        Key::String(s) => s.to_string(),
    }
}

/// A CEL result as text, for `${...}` inside a longer string: strings as they are, numbers in
/// decimal, `null` as the empty string, bytes as (lossy) UTF-8, lists and maps as JSON.
pub fn to_text(v: &Value) -> Result<String, String> {
    Ok(match v {
        Value::Null => String::new(),
        Value::String(s) => s.to_string(),
        Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => f.to_string(),
        other => to_json(other)?.to_string(),
    })
}
