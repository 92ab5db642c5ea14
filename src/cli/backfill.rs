//! `canal-consumer backfill ...`: start, list, follow, pause, resume and cancel backfills of the
//! running service through its admin endpoint (with the admin token). `start` and `status
//! --follow` draw a progress bar (rows read of the estimate, rate, time left) until the
//! backfill ends or pauses; on a terminal the bar redraws in place, otherwise a line is printed
//! every few seconds.
//!
//! How it fails: like every admin call ([`ClientError`]); a refused request prints the
//! service's reason. Exit codes: 0 when the asked thing happened (or a followed backfill is
//! done, paused or cancelled), 1 when it failed or was refused, 3 when the service is not
//! running.

use crate::admin::access::Token;
use crate::admin::client::{self, ClientError};
use crate::backfill::StartRequest;
use serde_json::Value;
use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

/// What to do.
#[derive(Debug, Clone)]
pub enum Action {
    Start {
        req: StartRequest,
        detach: bool,
    },
    List {
        json: bool,
    },
    Status {
        id: String,
        json: bool,
        follow: bool,
    },
    Pause(String),
    Resume(String),
    Cancel(String),
}

/// Run `action` against the service at `bind`; returns the exit code.
pub async fn run(bind: &str, token: Option<&Token>, action: Action) -> i32 {
    match act(bind, token, action).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

async fn act(bind: &str, token: Option<&Token>, action: Action) -> Result<i32, ClientError> {
    match action {
        Action::Start { req, detach } => {
            let mut q = vec![format!("table={}", client::encode(&req.table))];
            if let Some(c) = &req.consumer {
                q.push(format!("consumer={}", client::encode(c)));
            }
            if let Some(w) = &req.condition {
                q.push(format!("where={}", client::encode(w)));
            }
            if let Some(n) = req.chunk {
                q.push(format!("chunk={n}"));
            }
            if let Some(r) = req.rate {
                q.push(format!("rate={r}"));
            }
            let path = format!("/backfills?{}", q.join("&"));
            let b = client::backfill_call(bind, token, "POST", &path).await?;
            let id = b["id"].as_str().unwrap_or_default().to_string();
            println!("{id}");
            eprintln!("started: {}", line(&b));
            if detach {
                return Ok(0);
            }
            follow(bind, token, &id).await
        }
        Action::List { json } => {
            let all = client::backfill_call(bind, token, "GET", "/backfills").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
            } else {
                print!("{}", render_list(&all));
            }
            Ok(0)
        }
        Action::Status {
            id,
            json,
            follow: f,
        } => {
            if f {
                return follow(bind, token, &id).await;
            }
            let b = get(bind, token, &id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b).unwrap_or_default());
            } else {
                print!("{}", render_one(&b));
            }
            Ok(0)
        }
        Action::Pause(id) | Action::Resume(id) | Action::Cancel(id) if id.is_empty() => {
            Err(ClientError::BadResponse("no backfill id".into()))
        }
        Action::Pause(id) => change(bind, token, &id, "pause").await,
        Action::Resume(id) => change(bind, token, &id, "resume").await,
        Action::Cancel(id) => change(bind, token, &id, "cancel").await,
    }
}

async fn get(bind: &str, token: Option<&Token>, id: &str) -> Result<Value, ClientError> {
    let path = format!("/backfills/{}", client::encode(id));
    client::backfill_call(bind, token, "GET", &path).await
}

async fn change(
    bind: &str,
    token: Option<&Token>,
    id: &str,
    what: &str,
) -> Result<i32, ClientError> {
    let path = format!("/backfills/{}/{what}", client::encode(id));
    let b = client::backfill_call(bind, token, "POST", &path).await?;
    println!("{}", line(&b));
    Ok(0)
}

/// Draw the progress of `id` until it is no longer running.
async fn follow(bind: &str, token: Option<&Token>, id: &str) -> Result<i32, ClientError> {
    let tty = std::io::stderr().is_terminal();
    let mut last_print = Instant::now() - Duration::from_secs(60);
    loop {
        let b = get(bind, token, id).await?;
        let state = b["state"].as_str().unwrap_or("?").to_string();
        if tty {
            eprint!("\r\x1b[2K{}", bar(&b));
            let _ = std::io::stderr().flush();
        } else if last_print.elapsed() >= Duration::from_secs(5) || state != "running" {
            eprintln!("{}", bar(&b));
            last_print = Instant::now();
        }
        if state != "running" {
            if tty {
                eprintln!();
            }
            println!("{}", line(&b));
            return Ok(if state == "failed" { 1 } else { 0 });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// `[#######-------]  45%  45000/100000 rows  1234 rows/s  ETA 44s  running`
pub fn bar(b: &Value) -> String {
    let p = &b["progress"];
    let read = n(&p["rows_read"]);
    let estimate = n(&p["estimate"]).max(read);
    let state = b["state"].as_str().unwrap_or("?");
    let frac = if state == "done" {
        1.0
    } else if estimate == 0 {
        0.0
    } else {
        read as f64 / estimate as f64
    };
    let width = 30usize;
    let filled = ((frac * width as f64).round() as usize).min(width);
    let mut s = format!(
        "{} [{}{}] {:>3.0}%  {read}/{estimate} rows",
        b["id"].as_str().unwrap_or("?"),
        "#".repeat(filled),
        "-".repeat(width - filled),
        frac * 100.0
    );
    if let Some(r) = b["rows_per_second"].as_f64() {
        let _ = write!(s, "  {r:.0} rows/s");
    }
    if let Some(eta) = b["eta_seconds"].as_u64() {
        let _ = write!(
            s,
            "  ETA {}",
            humantime::format_duration(Duration::from_secs(eta))
        );
    }
    let _ = write!(s, "  {state}");
    s
}

/// One line: id, table, state, counts.
pub fn line(b: &Value) -> String {
    let p = &b["progress"];
    let spec = &b["spec"];
    let mut s = format!(
        "{} {}.{} {}: {} rows read of ~{}, {} emitted, {} left to live changes, {} chunks",
        b["id"].as_str().unwrap_or("?"),
        spec["database"].as_str().unwrap_or("?"),
        spec["table"].as_str().unwrap_or("?"),
        b["state"].as_str().unwrap_or("?"),
        n(&p["rows_read"]),
        n(&p["estimate"]),
        n(&p["rows_emitted"]),
        n(&p["rows_dropped"]),
        n(&p["chunks"]),
    );
    if let Some(e) = p["error"].as_str() {
        let _ = write!(s, " ({e})");
    }
    s
}

fn render_one(b: &Value) -> String {
    let spec = &b["spec"];
    let mut s = format!("{}\n{}\n", line(b), bar(b));
    if let Some(c) = spec["consumer"].as_str() {
        let _ = writeln!(s, "consumer: {c}");
    }
    if let Some(w) = spec["where"].as_str() {
        let _ = writeln!(s, "where: {w}");
    }
    s
}

fn render_list(all: &Value) -> String {
    let items = all.as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        return "no backfills\n".into();
    }
    items.iter().map(|b| line(b) + "\n").collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_shows_share_rate_and_time_left() {
        let b = serde_json::json!({
            "id": "bf-1", "state": "running",
            "spec": {"database": "d", "table": "t"},
            "progress": {"rows_read": 250, "estimate": 1000},
            "rows_per_second": 50.0, "eta_seconds": 15
        });
        assert_eq!(
            bar(&b),
            "bf-1 [########----------------------]  25%  250/1000 rows  50 rows/s  ETA 15s  running"
        );
        let done = serde_json::json!({"id": "bf-1", "state": "done", "progress": {"rows_read": 3, "estimate": 0}});
        assert!(bar(&done).contains("100%"), "{}", bar(&done));
    }
}
