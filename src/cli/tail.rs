//! `canal-consumer tail`: print change events as JSON lines, for debugging.
//!
//! It subscribes like the service does, prints every event (one JSON object per line) and
//! never acks unless `--ack` is given: on exit it rolls back, so the events stay in Canal for the
//! real consumer.

use crate::canal::connection::{AckBatch, CanalConnection, CanalEvent, ConnectionConfig, Shutdown};
use actix::prelude::*;
use std::io::Write;

/// Options of `tail`.
#[derive(Debug, Clone)]
pub struct TailOptions {
    pub connection: ConnectionConfig,
    /// Stop after this many events.
    pub limit: Option<u64>,
    /// Ack what was printed.
    pub ack: bool,
}

struct Printer {
    connection: Option<Addr<CanalConnection>>,
    printed: u64,
    limit: Option<u64>,
    ack: bool,
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

/// Run `tail` until the limit is reached or Ctrl-C. Returns the process exit code.
pub fn run(opts: TailOptions) -> i32 {
    let sys = System::new();
    let code = sys.block_on(async move {
        let printer = Printer {
            connection: None,
            printed: 0,
            limit: opts.limit,
            ack: opts.ack,
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
