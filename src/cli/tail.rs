//! `canal-consumer tail`: print change events as JSON lines, for debugging.
//!
//! Two ways, chosen by whether the service answers at its admin endpoint:
//!
//! - **The tap** ([`run`] when the service runs): the service streams what its consumers
//!   process (`GET /tap`, see [`crate::tap`]), one JSON line per (consumer, event) with the
//!   triggers it produced. Read-only: `tail` never talks to Canal then, so it cannot change the
//!   service's subscription, roll back or ack its batches. It needs the admin token (row data
//!   is sensitive). A reader too slow for the stream loses lines, never the pipeline; `tail`
//!   says on stderr how many.
//! - **Canal directly** ([`run_direct`], only when no admin endpoint answers): it subscribes
//!   like the service does, as the configured client id, prints every event and never acks
//!   unless `--ack` is given: on exit it rolls back, so the events stay in Canal for the real
//!   consumer. It says so on stderr before it starts.

use crate::admin::access::{Token, token_path};
use crate::admin::client::{self, ClientError, TapQuery};
use crate::canal::connection::{AckBatch, CanalConnection, CanalEvent, ConnectionConfig, Shutdown};
use crate::config::Config;
use actix::prelude::*;
use std::io::Write;

/// Options of `tail`.
#[derive(Debug, Clone, Default)]
pub struct TailArgs {
    /// Regex on `database.table` (tap, and client-side when reading Canal directly).
    pub table: Option<String>,
    /// Tap only: one consumer.
    pub consumer: Option<String>,
    /// Tap only: only events that fired a trigger.
    pub fired: bool,
    /// Tap only: the service-side queue for this reader, in lines.
    pub buffer: Option<usize>,
    /// Direct only: Canal subscription filter (default: `table` when given, else the current
    /// subscription).
    pub filter: String,
    /// Direct only: ack what was printed.
    pub ack: bool,
    /// Stop after this many events.
    pub limit: Option<u64>,
}

/// Run `tail`: the tap when the service's admin endpoint answers, else Canal directly.
/// Returns the process exit code.
pub fn run(cfg: &Config, args: TailArgs) -> i32 {
    let table = match args.table.as_deref().map(regex::Regex::new).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: --table: not a valid regex: {e}");
            return 2;
        }
    };
    let addr = client::connect_addr(&cfg.admin.bind);
    if cfg.admin.enabled {
        let token_file = token_path(cfg);
        let (token, token_problem) = match Token::read(&token_file) {
            Ok(Some(t)) => (Some(t), None),
            Ok(None) => (
                None,
                Some(format!("{} does not exist", token_file.display())),
            ),
            Err(e) => (None, Some(e.to_string())),
        };
        let direct_only = !args.filter.is_empty() || args.ack;
        let query = TapQuery {
            table: args.table.clone(),
            consumer: args.consumer.clone(),
            fired: args.fired,
            buffer: args.buffer,
        };
        let mut printed = 0u64;
        let limit = args.limit;
        let stdout = std::io::stdout();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let result = if direct_only {
            // --filter/--ack act on Canal: only allowed when no service answers.
            rt.block_on(client::request(&addr, "GET", "/health"))
                .map(|_| ())
        } else {
            if limit == Some(0) {
                return 0;
            }
            let open =
                || eprintln!("tail: reading the running service's tap at {addr} (read-only)");
            rt.block_on(client::tap(&addr, token.as_ref(), &query, open, |line| {
                if let Some(n) = dropped(line) {
                    eprintln!("tail: the tap dropped {n} events (this reader is too slow)");
                    return true;
                }
                let mut out = stdout.lock();
                if out.write_all(line).is_err() || out.write_all(b"\n").is_err() {
                    return false; // stdout closed (e.g. piped into head)
                }
                let _ = out.flush();
                printed += 1;
                limit.is_none_or(|l| printed < l)
            }))
        };
        match result {
            Ok(()) if direct_only => {
                eprintln!(
                    "error: canal-consumer is running at {addr}: --filter and --ack would act on \
                     its Canal subscription and batches. Use the tap instead: --table REGEX, \
                     --consumer NAME, --fired"
                );
                return 2;
            }
            Ok(()) => return 0,
            Err(ClientError::NotRunning { .. }) => {}
            Err(e @ ClientError::Unauthorized(_)) => {
                eprintln!("error: {e}");
                match token_problem {
                    Some(p) => eprintln!(
                        "the tap streams row data and needs the admin token: {p} (key \
                         admin.token_file; run tail as the service's user)"
                    ),
                    None => eprintln!(
                        "the token in {} is not the running service's (key admin.token_file)",
                        token_file.display()
                    ),
                }
                return 1;
            }
            Err(e) => {
                eprintln!("error: {e}");
                return 1;
            }
        }
    }
    if args.consumer.is_some() || args.fired || args.buffer.is_some() {
        eprintln!(
            "error: --consumer, --fired and --buffer need the running service's tap, and no \
             admin endpoint answers at {addr}"
        );
        return 2;
    }
    let c = &cfg.canal;
    let why = if cfg.admin.enabled {
        format!("canal-consumer is not running (no admin endpoint at {addr})")
    } else {
        "the admin endpoint is disabled (admin.enabled = false), so tail cannot tell whether a \
         service reads this destination"
            .to_string()
    };
    let after = if args.ack {
        "it acks what it prints (--ack): those events will not reach the service"
    } else {
        "it rolls back on exit, so nothing is consumed"
    };
    eprintln!(
        "tail: {why}; reading Canal directly at {}:{}, destination {}, as client id {}; {after}",
        c.host, c.port, c.destination, c.client_id
    );
    // Canal keeps one subscription per client id: without --filter, subscribe to what --table
    // asks for (else the previous subscriber's filter, whatever it was, would stay in force).
    let filter = match (args.filter.is_empty(), &args.table) {
        (true, Some(t)) => t.clone(),
        _ => args.filter,
    };
    run_direct(TailOptions {
        connection: cfg.canal.connection(filter, true),
        limit: args.limit,
        ack: args.ack,
        table,
    })
}

/// `{"dropped":N}` → N.
fn dropped(line: &[u8]) -> Option<u64> {
    if !line.starts_with(b"{\"dropped\":") {
        return None;
    }
    serde_json::from_slice::<serde_json::Value>(line)
        .ok()?
        .get("dropped")?
        .as_u64()
}

/// Options of reading Canal directly.
#[derive(Debug, Clone)]
pub struct TailOptions {
    pub connection: ConnectionConfig,
    /// Stop after this many events.
    pub limit: Option<u64>,
    /// Ack what was printed.
    pub ack: bool,
    /// Print only events whose `database.table` matches.
    pub table: Option<regex::Regex>,
}

struct Printer {
    connection: Option<Addr<CanalConnection>>,
    printed: u64,
    limit: Option<u64>,
    ack: bool,
    table: Option<regex::Regex>,
    done: bool,
}

#[derive(Message)]
#[rtype(result = "()")]
struct Attach(Addr<CanalConnection>);

impl Actor for Printer {
    type Context = Context<Self>;
}

impl Handler<Attach> for Printer {
    type Result = ();
    fn handle(&mut self, msg: Attach, _: &mut Context<Self>) {
        self.connection = Some(msg.0);
    }
}

impl Printer {
    fn finish(&mut self, ctx: &mut Context<Self>) {
        if self.done {
            return;
        }
        self.done = true;
        let conn = self.connection.clone();
        let rollback = !self.ack;
        ctx.spawn(
            async move {
                if let Some(c) = conn {
                    let _ = c.send(Shutdown { rollback }).await;
                }
            }
            .into_actor(self)
            .map(|_, _, _| System::current().stop()),
        );
    }
}

impl Handler<CanalEvent> for Printer {
    type Result = ();

    fn handle(&mut self, msg: CanalEvent, ctx: &mut Context<Self>) {
        match msg {
            CanalEvent::Batch(batch) => {
                if self.done {
                    return;
                }
                let stdout = std::io::stdout();
                let mut out = stdout.lock();
                let mut complete = true;
                for e in batch.events.iter() {
                    if self.limit.is_some_and(|l| self.printed >= l) {
                        complete = false;
                        break;
                    }
                    if self
                        .table
                        .as_ref()
                        .is_some_and(|r| !r.is_match(&e.full_table()))
                    {
                        continue;
                    }
                    let line = serde_json::to_string(e).expect("events serialize");
                    if writeln!(out, "{line}").is_err() {
                        complete = false; // stdout closed (e.g. piped into head)
                        self.limit = Some(self.printed);
                        break;
                    }
                    self.printed += 1;
                }
                let _ = out.flush();
                if self.ack
                    && complete
                    && let Some(c) = &self.connection
                {
                    c.do_send(AckBatch(batch.batch));
                }
                if self.limit.is_some_and(|l| self.printed >= l) {
                    self.finish(ctx);
                }
            }
            CanalEvent::Reset { .. } => {}
            CanalEvent::Fatal { error } => {
                eprintln!("error: {error}");
                System::current().stop_with_code(2);
            }
        }
    }
}

/// Read Canal directly until the limit is reached or Ctrl-C. Returns the process exit code.
pub fn run_direct(opts: TailOptions) -> i32 {
    let sys = System::new();
    let code = sys.block_on(async move {
        let printer = Printer {
            connection: None,
            printed: 0,
            limit: opts.limit,
            ack: opts.ack,
            table: opts.table.clone(),
            done: false,
        }
        .start();
        let conn = CanalConnection::new(opts.connection, printer.clone().recipient()).start();
        printer.do_send(Attach(conn.clone()));
        let p = printer.clone();
        actix::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = conn
                    .send(Shutdown {
                        rollback: !opts.ack,
                    })
                    .await;
                drop(p);
                System::current().stop();
            }
        });
        0
    });
    match sys.run_with_code() {
        Ok(c) if c != 0 => c,
        Ok(_) => code,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
