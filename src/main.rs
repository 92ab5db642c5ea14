//! The `canal-consumer` binary: parses the command line and dispatches to `cli`.

use canal_consumer::cli;
use canal_consumer::config::{CanalConfig, Secret};
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "canal-consumer",
    version,
    about = "MySQL row changes from Canal to plugin tasks on RabbitMQ"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct CanalArgs {
    /// Canal server host
    #[arg(long, env = "CANAL_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Canal server port
    #[arg(long, env = "CANAL_PORT", default_value_t = 11111)]
    port: u16,
    /// Canal destination (instance)
    #[arg(long, env = "CANAL_DESTINATION", default_value = "example")]
    destination: String,
    /// Canal GET size
    #[arg(long, env = "CANAL_BATCH_SIZE", default_value_t = 100)]
    batch_size: i32,
    /// Canal user
    #[arg(long, env = "CANAL_USERNAME", default_value = "")]
    username: String,
    /// Canal password (plain text; scrambled on the wire)
    #[arg(
        long,
        env = "CANAL_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    password: String,
}

#[derive(Subcommand)]
enum Command {
    /// Print change events as JSON lines (rolls back on exit unless --ack)
    Tail {
        #[command(flatten)]
        canal: CanalArgs,
        /// Canal subscription filter (comma-separated regexes on schema.table)
        #[arg(long, default_value = "")]
        filter: String,
        /// Stop after N events
        #[arg(long)]
        limit: Option<u64>,
        /// Acknowledge printed batches (they will not be delivered again)
        #[arg(long)]
        ack: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Tail {
            canal,
            filter,
            limit,
            ack,
        } => {
            init_stderr_logging();
            let cfg = CanalConfig {
                host: canal.host,
                port: canal.port,
                destination: canal.destination,
                batch_size: canal.batch_size,
                username: canal.username,
                password: Secret::new(canal.password),
                ..Default::default()
            };
            cli::tail::run(cli::tail::TailOptions {
                connection: cfg.connection(filter, true),
                limit,
                ack,
            })
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn init_stderr_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();
}
