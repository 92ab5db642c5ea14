//! `canal-consumer backfill ...`: start, list, follow, pause, resume and cancel backfills of the
//! running service through its admin endpoint (with the admin token). `start` and `status
//! --follow` draw a progress bar (rows read of the estimate, rate, time left) until the
//! backfill ends or pauses; on a terminal the bar redraws in place, otherwise a line is printed
//! every few seconds.
//!
//! It reads the service's answers into the types the admin endpoint serializes
//! ([`BackfillView`]), never by key.
//!
//! How it fails: like every admin call ([`ClientError`]); a refused request prints the
//! service's reason, an answer that does not fit the types names the field. Exit codes: 0 when the asked thing happened (or a followed backfill is
//! done, paused or cancelled), 1 when it failed or was refused, 3 when the service is not
//! running.

use crate::admin::access::Token;
use crate::admin::client::{self, ClientError};
use crate::admin::render::{bar, line};
use crate::backfill::record::State;
use crate::backfill::{BackfillView, StartRequest};
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
            let b: BackfillView = client::backfill(bind, token, "POST", &path).await?;
            let id = b.backfill.id.clone();
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
                print!("{}", render_list(&client::typed::<Vec<_>>(all)?));
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
            let path = format!("/backfills/{}", client::encode(&id));
            let b = client::backfill_call(bind, token, "GET", &path).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b).unwrap_or_default());
            } else {
                print!("{}", render_one(&client::typed(b)?));
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

async fn get(bind: &str, token: Option<&Token>, id: &str) -> Result<BackfillView, ClientError> {
    let path = format!("/backfills/{}", client::encode(id));
    client::backfill(bind, token, "GET", &path).await
}

async fn change(
    bind: &str,
    token: Option<&Token>,
    id: &str,
    what: &str,
) -> Result<i32, ClientError> {
    let path = format!("/backfills/{}/{what}", client::encode(id));
    let b: BackfillView = client::backfill(bind, token, "POST", &path).await?;
    println!("{}", line(&b));
    Ok(0)
}

/// Draw the progress of `id` until it is no longer running.
async fn follow(bind: &str, token: Option<&Token>, id: &str) -> Result<i32, ClientError> {
    let tty = std::io::stderr().is_terminal();
    let mut last_print = Instant::now() - Duration::from_secs(60);
    loop {
        let b = get(bind, token, id).await?;
        let state = b.backfill.state;
        if tty {
            eprint!("\r\x1b[2K{}", bar(&b));
            let _ = std::io::stderr().flush();
        } else if last_print.elapsed() >= Duration::from_secs(5) || state != State::Running {
            eprintln!("{}", bar(&b));
            last_print = Instant::now();
        }
        if state != State::Running {
            if tty {
                eprintln!();
            }
            println!("{}", line(&b));
            return Ok(if state == State::Failed { 1 } else { 0 });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn render_one(b: &BackfillView) -> String {
    let spec = &b.backfill.spec;
    let mut s = format!("{}\n{}\n", line(b), bar(b));
    if let Some(c) = &spec.consumer {
        let _ = writeln!(s, "consumer: {c}");
    }
    if let Some(w) = &spec.condition {
        let _ = writeln!(s, "where: {w}");
    }
    s
}

fn render_list(all: &[BackfillView]) -> String {
    if all.is_empty() {
        return "no backfills\n".into();
    }
    all.iter().map(|b| line(b) + "\n").collect()
}
