//! The metric names an operator's PromQL asks for: the expressions of
//! `deploy/grafana/canal-consumer.json` and `deploy/prometheus/alerts.yml`, reduced to the
//! series names they select, to be checked against what `/metrics` serves.
#![allow(dead_code)]

use std::collections::BTreeSet;

/// Names produced by Prometheus itself, not by the service.
pub const PROMETHEUS_OWN: &[&str] = &["up"];

/// Metrics the dashboard and alerts already ask for that the service does not export yet
/// (none today: `consumer_parked_total` arrived with poison handling); a name listed here must
/// not be exported, so the list cannot go stale.
pub const PENDING: &[&str] = &[];

/// The series names a scrape serves: each sample's name, and for a histogram the `_bucket`,
/// `_sum` and `_count` series PromQL asks for (the parser folds them into one sample).
pub fn served_names(scrape: &prometheus_parse::Scrape) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for s in &scrape.samples {
        if matches!(s.value, prometheus_parse::Value::Histogram(_)) {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{}{suffix}", s.metric));
            }
        } else {
            names.insert(s.metric.clone());
        }
    }
    names
}

const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    // aggregation operators, which may be followed by `by (...)` instead of `(`
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// The series names in one PromQL expression: identifiers outside label matchers (`{...}`),
/// range/subquery brackets (`[...]`), strings and grouping clauses, that are not followed by
/// `(` (functions) and are not keywords, aggregation operators or numbers.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // after `by`, `without`, `on`, `ignoring`, `group_left`, `group_right` the next (...) is a
    // label list
    let mut label_list_next = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    i += 1;
                }
                i += 1;
            }
            '(' if label_list_next => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                i += 1;
                label_list_next = false;
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let called = j < chars.len() && chars[j] == '(';
                let lower = word.to_ascii_lowercase();
                if [
                    "by",
                    "without",
                    "on",
                    "ignoring",
                    "group_left",
                    "group_right",
                ]
                .contains(&lower.as_str())
                {
                    label_list_next = true;
                } else if !called && !KEYWORDS.contains(&lower.as_str()) {
                    names.insert(word);
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // numbers and durations (5m, 1e3, 0x1F)
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Grafana's `label_values(metric, label)` variable query: the metric.
pub fn label_values_metric(query: &str) -> Option<String> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let metric = inner.split(',').next()?.trim();
    metric_names(metric).into_iter().next()
}

/// Every PromQL expression of the shipped dashboard and alert rules, with where it is.
pub fn operator_queries() -> Vec<(String, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    let dash_path = root.join("deploy/grafana/canal-consumer.json");
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&dash_path).expect("deploy/grafana/canal-consumer.json"),
    )
    .expect("the dashboard is JSON");
    fn panels(v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in v.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((format!("dashboard panel {:?}", p["title"]), e.to_string()));
                }
            }
            panels(&p["panels"], out);
        }
    }
    panels(&dash["panels"], &mut out);
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = v["query"]["query"].as_str().or(v["query"].as_str())
            && q.starts_with("label_values(")
        {
            let metric = label_values_metric(q).expect("label_values(metric, label)");
            out.push((format!("dashboard variable {:?}", v["name"]), metric));
        }
    }
    let alerts_path = root.join("deploy/prometheus/alerts.yml");
    let docs = yaml_rust2::YamlLoader::load_from_str(
        &std::fs::read_to_string(&alerts_path).expect("deploy/prometheus/alerts.yml"),
    )
    .expect("alerts.yml is YAML");
    for group in docs[0]["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            let name = rule["alert"].as_str().or(rule["record"].as_str());
            let expr = rule["expr"].as_str().expect("every rule has an expr");
            out.push((format!("alert {name:?}"), expr.to_string()));
        }
    }
    out
}
