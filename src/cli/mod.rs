//! The parts of the command line that need more than a few lines: `tail` ([`tail`]), `test`
//! ([`test`](mod@test)), `dlq` ([`dlq`]) and `backfill` ([`backfill`]). The other subcommands (`start`, `list`, `status`, `enable`, `disable`,
//! `skip`, `check-config`) are short and live in `main.rs`'s `run`, next to the clap definitions; the
//! flags they share are declared once in `config::cli`.

pub mod backfill;
pub mod dlq;
pub mod tail;
pub mod test;
