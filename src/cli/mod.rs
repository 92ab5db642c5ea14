//! The parts of the command line that need more than a few lines: `tail` ([`tail`]) and
//! `test` ([`test`]). The other subcommands (`start`, `list`, `status`, `enable`, `disable`,
//! `check-config`) are short and live in `main.rs`'s `run`, next to the clap definitions; the
//! flags they share are declared once in `config::cli`.

pub mod tail;
pub mod test;
