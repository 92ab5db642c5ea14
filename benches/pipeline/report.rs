//! How phases are reported: the machine's busy cores as text and JSON, latency as JSON, and the
//! JSON files under `target/`.

use crate::latency::Latency;

/// "1.85 = bench 0.74 + broker 1.02 + ..." for a phase's [`crate::accounting::Busy::cores`].
pub(crate) fn busy_text((machine, split): &(f64, Vec<(&'static str, f64)>)) -> String {
    let parts: Vec<String> = split.iter().map(|(n, c)| format!("{n} {c:.2}")).collect();
    format!("{machine:.2} = {}", parts.join(" + "))
}

pub(crate) fn busy_json((machine, split): &(f64, Vec<(&'static str, f64)>)) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("machine".into(), (*machine).into());
    for (n, c) in split {
        m.insert((*n).into(), (*c).into());
    }
    serde_json::Value::Object(m)
}

/// A latency phase as JSON, with the CPU the service and the Canal server used over it.
pub(crate) fn latency_json(l: &Latency) -> serde_json::Value {
    serde_json::json!({
        "rate": l.rate, "achieved": l.achieved, "rows": l.n,
        "p50_ms": l.p50, "p99_ms": l.p99, "max_ms": l.max,
        "service_cpu_s": l.cpu.map(|c| c.0), "canal_server_cpu_s": l.cpu.and_then(|c| c.1),
    })
}

/// Write `report` to `target/<name>` (pretty JSON); a failed write is not worth stopping for.
pub(crate) fn write_json(name: &str, report: &serde_json::Value) {
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(name);
    let _ = std::fs::write(&out, serde_json::to_string_pretty(report).unwrap());
}
