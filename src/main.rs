//! The `canal-consumer` binary: parses the command line and dispatches.
//!
//! Every command reads the same layered configuration (defaults < `--config` file or
//! `config/canal-consumer.toml` < environment < flags); see `config`.

use canal_consumer::admin::access::{Token, check_bind, token_path};
use canal_consumer::admin::client;
use canal_consumer::config::{self, CanalFlags, CliOverrides, Config, ServiceFlags};
use canal_consumer::event::ChangeEvent;
use canal_consumer::{cli, logging, rules, service, state::StateFile};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// jemalloc instead of glibc's malloc. The publish path allocates each message on the actor
/// thread and lapin's I/O thread frees it; with glibc that cross-thread traffic was a sixth of
/// the service's CPU in the per-row backfill (BENCHMARKS.md, "jemalloc"). Its options are built
/// in from `.cargo/config.toml`; `_RJEM_MALLOC_CONF` in the environment overrides them.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "canal-consumer",
    version,
    about = "MySQL row changes from Alibaba Canal, routed to consumers, turned into plugin tasks on RabbitMQ",
    long_about = None
)]
struct Cli {
    /// Config file (default: config/canal-consumer.toml when it exists)
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: stream from Canal, run consumers, publish plugin tasks
    Start {
        #[command(flatten)]
        canal: CanalFlags,
        #[command(flatten)]
        service: ServiceFlags,
    },
    /// Print change events as JSON lines: from the running service's tap (read-only, needs
    /// the admin token), or, only when no service answers, from Canal directly
    Tail {
        #[command(flatten)]
        canal: CanalFlags,
        #[command(flatten)]
        service: ServiceFlags,
        /// Only tables whose `database.table` matches this regex
        #[arg(long, value_name = "REGEX")]
        table: Option<String>,
        /// Tap: only this consumer's events
        #[arg(long, value_name = "NAME")]
        consumer: Option<String>,
        /// Tap: only events that fired a trigger
        #[arg(long)]
        fired: bool,
        /// Tap: lines the service queues for this reader before dropping (default 1024)
        #[arg(long, value_name = "LINES")]
        buffer: Option<usize>,
        /// Reading Canal directly: subscription filter (comma-separated regexes on
        /// schema.table; default: --table when given); refused while the service runs
        #[arg(long, default_value = "")]
        filter: String,
        /// Stop after N events
        #[arg(long)]
        limit: Option<u64>,
        /// Reading Canal directly: acknowledge printed batches (they will not be delivered
        /// again); refused while the service runs
        #[arg(long)]
        ack: bool,
    },
    /// List the consumers: filters, rules, plugins, enabled state
    List {
        /// JSON output
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        service: ServiceFlags,
    },
    /// Show the running service's status (fit for `watch -n 5`)
    Status {
        /// JSON output
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        service: ServiceFlags,
    },
    /// Enable a consumer (live if the service runs; persisted)
    Enable {
        name: String,
        #[command(flatten)]
        service: ServiceFlags,
    },
    /// Disable a consumer (live if the service runs; persisted)
    Disable {
        name: String,
        #[command(flatten)]
        service: ServiceFlags,
    },
    /// Run one consumer on sample events and print the messages it would publish (no
    /// Canal server or broker needed)
    Test {
        name: String,
        /// Events as JSON: one object, an array, or JSON lines (e.g. saved from `tail`);
        /// default: events built from the consumer's filters
        #[arg(long, value_name = "FILE")]
        event: Option<PathBuf>,
        #[command(flatten)]
        service: ServiceFlags,
    },
    /// Pass what the Canal stream is stalled at (a frame over canal.max_frame_bytes, an entry
    /// that cannot be decoded), acking it without delivering its rows; TOKEN is what `status`
    /// shows (`frame-<n>` or `batch:<id>`)
    Skip {
        token: String,
        #[command(flatten)]
        service: ServiceFlags,
    },
    /// Backfills: bring existing rows (or those matching --where) through the consumers as
    /// SNAPSHOT events while the live stream keeps flowing (start, list, status, pause,
    /// resume, cancel; needs the admin token)
    Backfill {
        #[command(subcommand)]
        action: BackfillCmd,
        #[command(flatten)]
        service: ServiceFlags,
    },
    /// The dead-letter queue: parked events (list, show, replay, purge)
    Dlq {
        #[command(subcommand)]
        action: DlqCmd,
        #[command(flatten)]
        service: ServiceFlags,
    },
    /// Validate the configuration and consumer definitions, print the effective config
    CheckConfig {
        /// Config file to check (default: --config or config/canal-consumer.toml)
        file: Option<PathBuf>,
        #[command(flatten)]
        canal: CanalFlags,
        #[command(flatten)]
        service: ServiceFlags,
    },
}

#[derive(Subcommand)]
enum BackfillCmd {
    /// Start a backfill of TABLE (database.table) and follow its progress; prints its id
    Start {
        table: String,
        /// Deliver only to this consumer (its rule on the table must list SNAPSHOT in events)
        #[arg(long, value_name = "NAME")]
        consumer: Option<String>,
        /// Only rows matching this SQL condition, e.g. "updated_at >= '2026-12-01'"
        #[arg(long = "where", value_name = "SQL")]
        condition: Option<String>,
        /// Rows per chunk (default backfill.chunk)
        #[arg(long, value_name = "N")]
        chunk: Option<usize>,
        /// At most R rows per second
        #[arg(long, value_name = "R")]
        rate: Option<f64>,
        /// Print the id and return without following the progress
        #[arg(long)]
        detach: bool,
    },
    /// Every backfill of this service
    List {
        #[arg(long)]
        json: bool,
    },
    /// One backfill; --follow draws its progress until it ends
    Status {
        id: String,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        follow: bool,
    },
    /// Pause after the chunk in flight
    Pause { id: String },
    /// Go on from the last confirmed chunk
    Resume { id: String },
    /// Stop for good after the chunk in flight
    Cancel { id: String },
}

#[derive(Subcommand)]
enum DlqCmd {
    /// One line per parked message (the queue is not changed)
    List,
    /// One parked message in full
    Show { id: String },
    /// Run parked events through their consumer's current definition and publish the result
    /// (original ids); a message leaves the queue once its replay is confirmed
    Replay {
        /// Only this consumer's parked events
        #[arg(long)]
        consumer: Option<String>,
        /// Only this message
        #[arg(long)]
        id: Option<String>,
    },
    /// Delete every parked message
    Purge,
}

fn overrides(canal: &CanalFlags, service: &ServiceFlags) -> CliOverrides {
    CliOverrides {
        canal: canal.clone(),
        service: service.clone(),
    }
}

/// Print an error that stops the command (bad configuration or input) and give exit code 2.
fn usage_error(e: impl std::fmt::Display) -> i32 {
    eprintln!("error: {e}");
    2
}

fn load(file: Option<&Path>, o: CliOverrides) -> Result<Config, i32> {
    config::load(file, o).map_err(usage_error)
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(f)
}

fn print_or_exit(r: Result<String, client::ClientError>) -> i32 {
    match r {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            e.exit_code()
        }
    }
}

fn read_events(path: &Path) -> Result<Vec<ChangeEvent>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        return serde_json::from_str(trimmed).map_err(|e| format!("{}: {e}", path.display()));
    }
    // one object, or JSON lines; lines of the tap (`{"consumer", "event", "triggers"}`, as
    // `tail` prints them while the service runs) give their event
    let mut out = Vec::new();
    for (i, item) in serde_json::Deserializer::from_str(trimmed)
        .into_iter::<serde_json::Value>()
        .enumerate()
    {
        let at = |e: &dyn std::fmt::Display| format!("{}: event {}: {e}", path.display(), i + 1);
        let mut v = item.map_err(|e| at(&e))?;
        if v.get("event").is_some_and(|e| e.is_object()) && v.get("database").is_none() {
            v = v["event"].take();
        }
        out.push(serde_json::from_value(v).map_err(|e| at(&e))?);
    }
    Ok(out)
}

fn run(cli: Cli) -> Result<i32, i32> {
    let file = cli.config.as_deref();
    let is_enable = matches!(cli.command, Command::Enable { .. });
    Ok(match cli.command {
        Command::Start { canal, service } => {
            let cfg = load(file, overrides(&canal, &service))?;
            check_bind(&cfg).map_err(usage_error)?;
            let _guard = logging::init(&cfg.log).map_err(usage_error)?;
            service::run(cfg)
        }
        Command::Tail {
            canal,
            service,
            table,
            consumer,
            fired,
            buffer,
            filter,
            limit,
            ack,
        } => {
            let cfg = load(file, overrides(&canal, &service))?;
            let mut log = cfg.log.clone();
            if std::env::var_os("RUST_LOG").is_none() {
                log.level = "warn".into();
            }
            let _guard = logging::init(&log).map_err(usage_error)?;
            cli::tail::run(
                &cfg,
                cli::tail::TailArgs {
                    table,
                    consumer,
                    fired,
                    buffer,
                    filter,
                    ack,
                    limit,
                },
            )
        }
        Command::List { json, service } => {
            let cfg = load(file, overrides(&CanalFlags::default(), &service))?;
            let mut specs = service::load_consumers(&cfg).map_err(usage_error)?;
            // the running service knows the live enabled state; otherwise the state file does
            let addr = client::connect_addr(&cfg.admin.bind);
            let live = match block_on(client::request(&addr, "GET", "/consumers")) {
                Ok(r) if r.status == 200 => serde_json::from_str::<serde_json::Value>(&r.body).ok(),
                _ => None,
            };
            if let Some(serde_json::Value::Array(items)) = &live {
                for spec in &mut specs {
                    if let Some(enabled) = items
                        .iter()
                        .find(|c| c["name"] == spec.name.as_str())
                        .and_then(|c| c["enabled"].as_bool())
                    {
                        spec.enabled = enabled;
                    }
                }
            }
            let desc: Vec<_> = specs.iter().map(rules::describe).collect();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&desc).unwrap_or_default()
                );
            } else {
                print!("{}", rules::describe_table(&desc));
                if live.is_none() {
                    eprintln!(
                        "(canal-consumer is not running at {addr}; enabled state from the state file)"
                    );
                }
            }
            0
        }
        Command::Status { json, service } => {
            let cfg = load(file, overrides(&CanalFlags::default(), &service))?;
            print_or_exit(block_on(client::status(&cfg.admin.bind, json)))
        }
        Command::Enable { name, service } | Command::Disable { name, service } => {
            let enabled = is_enable;
            let cfg = load(file, overrides(&CanalFlags::default(), &service))?;
            let specs = service::load_consumers(&cfg).map_err(usage_error)?;
            if !specs.iter().any(|s| s.name == name) {
                eprintln!("error: no consumer named `{name}` (see `canal-consumer list`)");
                return Err(1);
            }
            let state = StateFile::new(&cfg.consumers.state_file);
            let token_file = token_path(&cfg);
            let token = Token::read(&token_file);
            let r = block_on(client::set_enabled(
                &cfg.admin.bind,
                token.as_ref().ok().and_then(Option::as_ref),
                &state,
                &name,
                enabled,
            ));
            if let Err(client::ClientError::Unauthorized(_)) = &r {
                match &token {
                    Ok(None) => eprintln!(
                        "hint: the admin token file {} does not exist (key admin.token_file)",
                        token_file.display()
                    ),
                    Err(e) => eprintln!("hint: {e}"),
                    Ok(Some(_)) => eprintln!(
                        "hint: the token in {} is not the running service's (key \
                         admin.token_file)",
                        token_file.display()
                    ),
                }
            }
            print_or_exit(r)
        }
        Command::Test {
            name,
            event,
            service,
        } => {
            let cfg = load(file, overrides(&CanalFlags::default(), &service))?;
            let specs = service::load_consumers(&cfg).map_err(usage_error)?;
            let Some(spec) = specs.into_iter().find(|s| s.name == name) else {
                eprintln!("error: no consumer named `{name}` (see `canal-consumer list`)");
                return Err(1);
            };
            let events = match &event {
                Some(path) => read_events(path).map_err(usage_error)?,
                None => rules::sample_events(&spec),
            };
            let route = service::default_route(&cfg);
            cli::test::run(spec, &events, route)
        }
        Command::Skip { token, service } => {
            let cfg = load(file, overrides(&CanalFlags::default(), &service))?;
            let auth = Token::read(&token_path(&cfg));
            print_or_exit(block_on(client::skip(
                &cfg.admin.bind,
                auth.as_ref().ok().and_then(Option::as_ref),
                &token,
            )))
        }
        Command::Backfill { action, service } => {
            let cfg = load(file, overrides(&CanalFlags::default(), &service))?;
            let token = Token::read(&token_path(&cfg));
            let action = match action {
                BackfillCmd::Start {
                    table,
                    consumer,
                    condition,
                    chunk,
                    rate,
                    detach,
                } => cli::backfill::Action::Start {
                    req: canal_consumer::backfill::StartRequest {
                        table,
                        consumer,
                        condition,
                        chunk,
                        rate,
                    },
                    detach,
                },
                BackfillCmd::List { json } => cli::backfill::Action::List { json },
                BackfillCmd::Status { id, json, follow } => {
                    cli::backfill::Action::Status { id, json, follow }
                }
                BackfillCmd::Pause { id } => cli::backfill::Action::Pause(id),
                BackfillCmd::Resume { id } => cli::backfill::Action::Resume(id),
                BackfillCmd::Cancel { id } => cli::backfill::Action::Cancel(id),
            };
            block_on(cli::backfill::run(
                &cfg.admin.bind,
                token.as_ref().ok().and_then(Option::as_ref),
                action,
            ))
        }
        Command::Dlq { action, service } => {
            let cfg = load(file, overrides(&CanalFlags::default(), &service))?;
            let specs = service::load_consumers(&cfg).map_err(usage_error)?;
            let action = match action {
                DlqCmd::List => cli::dlq::Action::List,
                DlqCmd::Show { id } => cli::dlq::Action::Show(id),
                DlqCmd::Replay { consumer, id } => cli::dlq::Action::Replay { consumer, id },
                DlqCmd::Purge => cli::dlq::Action::Purge,
            };
            cli::dlq::run(cfg, specs, action)
        }
        Command::CheckConfig {
            file: f,
            canal,
            service,
        } => {
            let path = f.as_deref().or(file);
            let cfg = load(path, overrides(&canal, &service))?;
            check_bind(&cfg).map_err(usage_error)?;
            let specs = service::load_consumers(&cfg).map_err(usage_error)?;
            print!("{}", cfg.to_redacted_toml());
            println!(
                "# ok: {} consumers in {} ({} enabled)",
                specs.len(),
                cfg.consumers.dir.display(),
                specs.iter().filter(|s| s.enabled).count()
            );
            0
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = run(cli).unwrap_or_else(|c| c);
    ExitCode::from(code.clamp(0, 255) as u8)
}
