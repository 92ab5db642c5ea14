//! Payload templates: TOML values whose strings may hold `${ CEL }` interpolations.
//!
//! - A string that is exactly one `${expr}` (surrounding blanks allowed) takes the value of the
//!   expression with its type: `"${data.id}"` gives the number `42`, `"${data}"` the whole row
//!   as an object, `"${old.status}"` may give `null`.
//! - Any other string with `${...}` is text: each expression is rendered as text (strings as
//!   they are, numbers in decimal, `null` as nothing, lists and maps as JSON).
//! - `$${` writes a literal `${`.
//! - Numbers, booleans, dates, arrays and tables are literals (arrays and tables are walked for
//!   strings to interpolate).

use super::expr::{Expression, Scope};
use std::collections::BTreeSet;

/// A compiled template.
#[derive(Debug, Clone)]
pub enum Template {
    /// No interpolation anywhere below: the value as is.
    Literal(serde_json::Value),
    /// Exactly one expression: its value, typed.
    Expr(Expression),
    /// Text with interpolations.
    Text(Vec<Segment>),
    Array(Vec<Template>),
    Object(Vec<(String, Template)>),
}

#[derive(Debug, Clone)]
pub enum Segment {
    Text(String),
    Expr(Expression),
}

impl Template {
    /// Compiles a TOML value. Errors name the key path below the template's own key, e.g.
    /// `.user.id` (empty for the root).
    pub fn compile(value: &toml::Value) -> Result<Template, (String, String)> {
        compile_at(value, &mut String::new())
    }

    /// True if rendering never needs CEL.
    pub fn is_literal(&self) -> bool {
        matches!(self, Template::Literal(_))
    }

    /// Renders the template for the scope's event.
    pub fn render(&self, scope: &mut Scope<'_, '_>) -> Result<serde_json::Value, String> {
        self.render_at(scope, &mut String::new())
    }

    fn render_at(
        &self,
        scope: &mut Scope<'_, '_>,
        path: &mut String,
    ) -> Result<serde_json::Value, String> {
        let at = |path: &str, e: String| {
            if path.is_empty() {
                e
            } else {
                format!("payload{path}: {e}")
            }
        };
        match self {
            Template::Literal(v) => Ok(v.clone()),
            Template::Expr(e) => e.json(scope).map_err(|e| at(path, e)),
            Template::Text(segments) => {
                let mut out = String::new();
                for s in segments {
                    match s {
                        Segment::Text(t) => out.push_str(t),
                        Segment::Expr(e) => out.push_str(&e.text(scope).map_err(|e| at(path, e))?),
                    }
                }
                Ok(serde_json::Value::String(out))
            }
            Template::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, t) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    out.push(t.render_at(scope, path)?);
                    path.truncate(len);
                }
                Ok(serde_json::Value::Array(out))
            }
            Template::Object(entries) => {
                let mut out = serde_json::Map::with_capacity(entries.len());
                for (k, t) in entries {
                    let len = path.len();
                    path.push('.');
                    path.push_str(k);
                    out.insert(k.clone(), t.render_at(scope, path)?);
                    path.truncate(len);
                }
                Ok(serde_json::Value::Object(out))
            }
        }
    }

    /// Every expression in the template (for listings and sample events).
    pub fn expressions(&self) -> Vec<&Expression> {
        let mut out = Vec::new();
        self.collect(&mut out);
        out
    }

    fn collect<'a>(&'a self, out: &mut Vec<&'a Expression>) {
        match self {
            Template::Literal(_) => {}
            Template::Expr(e) => out.push(e),
            Template::Text(segments) => out.extend(segments.iter().filter_map(|s| match s {
                Segment::Expr(e) => Some(e),
                Segment::Text(_) => None,
            })),
            Template::Array(items) => items.iter().for_each(|t| t.collect(out)),
            Template::Object(entries) => entries.iter().for_each(|(_, t)| t.collect(out)),
        }
    }

    /// Columns the template reads.
    pub fn columns(&self) -> BTreeSet<String> {
        self.expressions()
            .into_iter()
            .flat_map(|e| e.columns())
            .collect()
    }
}

fn compile_at(value: &toml::Value, path: &mut String) -> Result<Template, (String, String)> {
    Ok(match value {
        toml::Value::String(s) => compile_string(s).map_err(|e| (path.clone(), e))?,
        toml::Value::Integer(i) => Template::Literal((*i).into()),
        toml::Value::Float(f) => Template::Literal(
            serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .ok_or_else(|| (path.clone(), format!("{f} cannot be written as JSON")))?,
        ),
        toml::Value::Boolean(b) => Template::Literal((*b).into()),
        toml::Value::Datetime(d) => Template::Literal(d.to_string().into()),
        toml::Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                out.push(compile_at(item, path)?);
                path.truncate(len);
            }
            if out.iter().all(Template::is_literal) {
                Template::Literal(serde_json::Value::Array(
                    out.into_iter().map(literal).collect(),
                ))
            } else {
                Template::Array(out)
            }
        }
        toml::Value::Table(table) => {
            let mut out = Vec::with_capacity(table.len());
            for (k, v) in table {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                out.push((k.clone(), compile_at(v, path)?));
                path.truncate(len);
            }
            if out.iter().all(|(_, t)| t.is_literal()) {
                Template::Literal(serde_json::Value::Object(
                    out.into_iter().map(|(k, t)| (k, literal(t))).collect(),
                ))
            } else {
                Template::Object(out)
            }
        }
    })
}

fn literal(t: Template) -> serde_json::Value {
    match t {
        Template::Literal(v) => v,
        _ => serde_json::Value::Null,
    }
}

/// Splits a string into text and `${...}` parts.
fn compile_string(s: &str) -> Result<Template, String> {
    let segments = split(s)?;
    match segments.as_slice() {
        [] => Ok(Template::Literal(serde_json::Value::String(String::new()))),
        [Part::Text(t)] => Ok(Template::Literal(serde_json::Value::String(t.clone()))),
        _ => {
            let exprs: Vec<&Part> = segments
                .iter()
                .filter(|p| matches!(p, Part::Expr(_)))
                .collect();
            let only_blank_text = segments.iter().all(|p| match p {
                Part::Text(t) => t.trim().is_empty(),
                Part::Expr(_) => true,
            });
            if let ([Part::Expr(src)], true) = (exprs.as_slice(), only_blank_text) {
                return Ok(Template::Expr(Expression::compile(src)?));
            }
            let mut out = Vec::with_capacity(segments.len());
            for p in segments {
                out.push(match p {
                    Part::Text(t) => Segment::Text(t),
                    Part::Expr(src) => Segment::Expr(Expression::compile(&src)?),
                });
            }
            Ok(Template::Text(out))
        }
    }
}

#[derive(Debug, PartialEq)]
enum Part {
    Text(String),
    Expr(String),
}

/// Finds `${ ... }` spans. The closing brace is the first `}` outside CEL string literals and
/// nested braces, so `${ {'a': 1}['a'] }` and `${ data.name + '}' }` work.
fn split(s: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            // `$${` is an escaped `${`
            text.push_str(&rest[..i]);
            text.push_str("${");
            rest = tail;
            continue;
        }
        let Some(body) = after.strip_prefix('{') else {
            text.push_str(&rest[..=i]);
            rest = after;
            continue;
        };
        text.push_str(&rest[..i]);
        let end = closing_brace(body).ok_or_else(|| {
            format!(
                "unterminated `${{` in template string {s:?} (write `$${{` for a literal `${{`)"
            )
        })?;
        let src = body[..end].trim();
        if src.is_empty() {
            return Err(format!("empty `${{}}` in template string {s:?}"));
        }
        if !text.is_empty() {
            parts.push(Part::Text(std::mem::take(&mut text)));
        }
        parts.push(Part::Expr(src.to_string()));
        rest = &body[end + 1..];
    }
    text.push_str(rest);
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    Ok(parts)
}

fn closing_brace(body: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' => quote = Some(c),
            '{' => depth += 1,
            '}' if depth == 0 => return Some(i),
            '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_finds_expressions_escapes_and_nested_braces() {
        assert_eq!(
            split("a ${x} b").unwrap(),
            vec![
                Part::Text("a ".into()),
                Part::Expr("x".into()),
                Part::Text(" b".into())
            ]
        );
        assert_eq!(split("$${x}").unwrap(), vec![Part::Text("${x}".into())]);
        assert_eq!(
            split("${ {'a': '}'}['a'] }").unwrap(),
            vec![Part::Expr("{'a': '}'}['a']".into())]
        );
        assert_eq!(
            split("cost $5").unwrap(),
            vec![Part::Text("cost $5".into())]
        );
        assert!(split("${data.id").is_err());
        assert!(split("${ }").is_err());
    }
}
