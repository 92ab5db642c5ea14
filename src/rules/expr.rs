//! CEL for rules: the environment, compile-time checks, the per-event variables and the helper
//! functions `changed(column)` and `transition(column, from, to)`.
//!
//! Programs are compiled once when a consumer file is loaded; for each event one CEL scope is
//! built (lazily, only if a rule that passed its cheap table/event checks needs CEL) and every
//! rule of the consumer evaluates against it.

use crate::event::{ChangeEvent, ColumnSet, Row, Value as ColValue};
use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue};
use cel::common::types::{
    CelBytes, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelUInt,
};
use cel::common::value::Val;
use cel::objects::Key;
use cel::{Context, Env, ExecutionError, FunctionContext, Program, Value};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

/// The variables a rule expression can read.
pub const VARIABLES: [&str; 11] = [
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
    "sql",
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
    /// `data.col` / `old.col` (or `data['col']`): read straight from the row, no CEL scope.
    direct: Option<(RowVar, String)>,
}

/// Which row a direct column reference reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowVar {
    Data,
    Old,
}

/// The event a rule runs on, and its CEL scope, built only when an expression needs it
/// (direct column references and literal payloads do not).
pub struct Scope<'r, 'e> {
    root: &'r Context<'static, 'static>,
    event: &'e ChangeEvent,
    cel: Option<Context<'r, 'static>>,
}

impl<'r, 'e> Scope<'r, 'e> {
    pub fn new(root: &'r Context<'static, 'static>, event: &'e ChangeEvent) -> Self {
        Scope {
            root,
            event,
            cel: None,
        }
    }

    /// The CEL scope with the event's variables.
    pub fn cel(&mut self) -> &Context<'r, 'static> {
        let (root, event) = (self.root, self.event);
        self.cel.get_or_insert_with(|| {
            let mut s = root.new_inner_scope();
            bind_event(&mut s, event);
            s
        })
    }
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
        let direct = direct_column(program.expression());
        Ok(Expression {
            source: source.to_string(),
            program: Arc::new(program),
            direct,
        })
    }

    /// The expression's value as payload JSON (what `to_json` of its CEL value gives).
    pub fn json(&self, scope: &mut Scope<'_, '_>) -> Result<serde_json::Value, String> {
        match self.column(scope.event) {
            Some(ColValue::Json(j)) => to_json(&json_value(j)),
            Some(v) => Ok(v.to_json()),
            None => self.eval(scope.cel()).and_then(|v| to_json(&v)),
        }
    }

    /// The expression's value as text (what `to_text` of its CEL value gives).
    pub fn text(&self, scope: &mut Scope<'_, '_>) -> Result<String, String> {
        match self.column(scope.event) {
            Some(ColValue::Null) => Ok(String::new()),
            Some(ColValue::Json(j)) => to_text(&json_value(j)),
            Some(ColValue::Bytes(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
            Some(v) => Ok(v.as_text().unwrap_or_default()),
            None => self.eval(scope.cel()).and_then(|v| to_text(&v)),
        }
    }

    /// The column a direct reference names, if the row has it (otherwise CEL evaluates the
    /// expression and reports the error its own way).
    fn column<'e>(&self, event: &'e ChangeEvent) -> Option<&'e ColValue> {
        let (var, name) = self.direct.as_ref()?;
        match var {
            RowVar::Data => event.data.get(name),
            RowVar::Old => event.old.as_ref()?.get(name),
        }
    }

    /// Compiles a rule condition: like [`Expression::compile`], and refuses a condition whose
    /// value is known at load and is not a boolean (a literal such as `1` or `"yes"`, or a
    /// constant expression such as `1 + 2`), or that fails whatever the row.
    pub fn compile_condition(source: &str) -> Result<Expression, String> {
        let e = Expression::compile(source)?;
        let mut refs = Refs::default();
        refs.walk(e.program.expression(), &mut Vec::new());
        let constant = refs.free_vars.is_empty()
            && !refs.functions.iter().any(|f| HELPERS.contains(&f.as_str()));
        if constant {
            match e.program.execute(&root_context()) {
                Ok(Value::Bool(_)) => {}
                Ok(v) => {
                    return Err(format!(
                        "condition `{source}` is always {} ({}), not a boolean: a condition \
                         must be true or false for each row",
                        type_name(&v),
                        to_text(&v).unwrap_or_else(|_| "?".into())
                    ));
                }
                Err(err) => {
                    return Err(format!(
                        "condition `{source}` fails for every row: {}",
                        describe_error(&err)
                    ));
                }
            }
        }
        Ok(e)
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

/// `data.col`, `old.col`, `data['col']`, `old['col']`.
fn direct_column(e: &IdedExpr) -> Option<(RowVar, String)> {
    let var = |e: &IdedExpr| match &e.expr {
        Expr::Ident(v) if v == "data" => Some(RowVar::Data),
        Expr::Ident(v) if v == "old" => Some(RowVar::Old),
        _ => None,
    };
    match &e.expr {
        Expr::Select(s) if !s.test => Some((var(&s.operand)?, s.field.clone())),
        Expr::Call(c) if c.func_name == "_[_]" && c.target.is_none() && c.args.len() == 2 => {
            match &c.args[1].expr {
                Expr::Literal(LiteralValue::String(k)) => {
                    Some((var(&c.args[0])?, k.inner().to_string()))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// A CEL value's type, as CEL's `type()` names it.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::List(_) => "a list",
        Value::Map(_) => "a map",
        Value::Function(_, _) => "a function",
        Value::Int(_) => "an int",
        Value::UInt(_) => "a uint",
        Value::Float(_) => "a double",
        Value::String(_) => "a string",
        Value::Bytes(_) => "bytes",
        Value::Bool(_) => "a bool",
        Value::Null => "null",
        _ => "a value of another type",
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
    let is_update = ftx.ptx.get_variable("event_type").is_some_and(|v| {
        v.downcast_ref::<CelString>()
            .is_some_and(|s| s.inner() == "UPDATE")
    });
    if !is_update {
        return Ok(false);
    }
    let Some(changed) = ftx.ptx.get_variable("changed") else {
        return Ok(false);
    };
    Ok(changed.downcast_ref::<CelList>().is_some_and(|l| {
        l.inner().iter().any(|c| {
            c.downcast_ref::<CelString>()
                .is_some_and(|s| s.inner() == column.as_str())
        })
    }))
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
    let before = column_of(ftx, "old", &column)?;
    let after = column_of(ftx, "data", &column)?;
    Ok(
        matches!((before, after), (Some(b), Some(a)) if loosely_eq(&b, &from) && loosely_eq(&a, &to)),
    )
}

/// One column of the `data` or `old` variable, as a `Value` (only that column is converted).
fn column_of(
    ftx: &FunctionContext,
    variable: &str,
    column: &str,
) -> Result<Option<Value>, ExecutionError> {
    let Some(map) = ftx.ptx.get_variable(variable) else {
        return Ok(None);
    };
    let Some(map) = map.downcast_ref::<CelMap>() else {
        return Ok(None);
    };
    match map.inner().get(&CelMapKey::from(column)) {
        Some(v) => Value::try_from(v.as_ref()).map(Some),
        None => Ok(None),
    }
}

/// `primary_key()`: the primary-key columns of the row and their values, as a map (`{}` if the
/// table has none). A key column missing from `data` is an error.
fn helper_primary_key(ftx: &FunctionContext) -> Result<Value, ExecutionError> {
    let keys: Vec<String> = match ftx.ptx.get_variable("primary_keys") {
        Some(v) => v
            .downcast_ref::<CelList>()
            .map(|l| {
                l.inner()
                    .iter()
                    .filter_map(|k| k.downcast_ref::<CelString>().map(|s| s.inner().to_string()))
                    .collect()
            })
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let mut out: HashMap<Key, Value> = HashMap::with_capacity(keys.len());
    for name in keys {
        let v = column_of(ftx, "data", &name)?
            .ok_or_else(|| ftx.error(format!("primary-key column `{name}` is not in data")))?;
        out.insert(Key::String(Arc::new(name)), v);
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

/// Adds the event's variables to `scope`. Values are built directly as CEL's own value types
/// (no intermediate `Value`), since this runs once per event and consumer.
pub fn bind_event(scope: &mut Context<'_, '_>, event: &ChangeEvent) {
    scope.add_variable_as_val("data", Box::new(row_val(&event.data)));
    scope.add_variable_as_val(
        "old",
        Box::new(event.old.as_ref().map(row_val).unwrap_or_default()),
    );
    scope.add_variable_as_val("changed", Box::new(string_list(&event.changed)));
    scope.add_variable_as_val("primary_keys", Box::new(string_list(&event.primary_keys)));
    scope.add_variable_as_val(
        "database",
        Box::new(CelString::from(event.database.to_string())),
    );
    scope.add_variable_as_val("table", Box::new(CelString::from(event.table.to_string())));
    scope.add_variable_as_val(
        "destination",
        Box::new(CelString::from(event.destination.to_string())),
    );
    scope.add_variable_as_val(
        "event_type",
        Box::new(CelString::from(event.event_type.as_str())),
    );
    scope.add_variable_as_val(
        "sql",
        match &event.sql {
            Some(q) => Box::new(CelString::from(q.clone())),
            None => Box::new(CelNull),
        },
    );
    scope.add_variable_as_val("executed_at", Box::new(CelInt::from(event.executed_at)));
    let mut pos: HashMap<CelMapKey<'static>, Box<dyn Val>> = HashMap::with_capacity(4);
    pos.insert(
        CelMapKey::from("log_file"),
        Box::new(CelString::from(event.position.log_file.to_string())),
    );
    pos.insert(
        CelMapKey::from("offset"),
        Box::new(CelInt::from(
            i64::try_from(event.position.offset).unwrap_or(i64::MAX),
        )),
    );
    pos.insert(
        CelMapKey::from("row_index"),
        Box::new(CelInt::from(i64::from(event.position.row_index))),
    );
    pos.insert(
        CelMapKey::from("server_id"),
        Box::new(CelInt::from(
            i64::try_from(event.position.server_id).unwrap_or(i64::MAX),
        )),
    );
    pos.insert(
        CelMapKey::from("gtid"),
        match &event.position.gtid {
            Some(g) => Box::new(CelString::from(g.to_string())),
            None => Box::new(CelNull),
        },
    );
    scope.add_variable_as_val("position", Box::new(CelMap::from(pos)));
}

fn string_list(items: &ColumnSet) -> CelList<'static> {
    let items: Vec<Box<dyn Val>> = items
        .iter()
        .map(|c| Box::new(CelString::from(c.to_string())) as Box<dyn Val>)
        .collect();
    CelList::from(items)
}

fn row_val(row: &Row) -> CelMap<'static> {
    let map: HashMap<CelMapKey<'static>, Box<dyn Val>> = row
        .iter()
        .map(|(k, v)| (CelMapKey::from(k.to_string()), column_val(v)))
        .collect();
    CelMap::from(map)
}

fn column_val(v: &ColValue) -> Box<dyn Val> {
    match v {
        ColValue::Null => Box::new(CelNull),
        ColValue::Int(i) => Box::new(CelInt::from(*i)),
        ColValue::UInt(u) => Box::new(CelUInt::from(*u)),
        ColValue::Float(f) => Box::new(CelDouble::from(*f)),
        ColValue::Text(s) => Box::new(CelString::from(s.clone())),
        ColValue::Bytes(b) => Box::new(CelBytes::from(b.clone())),
        ColValue::Json(j) => {
            Box::<dyn Val>::try_from(json_value(j)).unwrap_or_else(|_| Box::new(CelNull))
        }
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
    Ok(match v {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => (*b).into(),
        Value::Int(i) => (*i).into(),
        Value::UInt(u) => (*u).into(),
        Value::Float(f) => crate::event::Value::Float(*f).to_json(),
        Value::String(s) => serde_json::Value::String(s.to_string()),
        Value::Bytes(b) => crate::event::Value::Bytes(b.to_vec()).to_json(),
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
