//! The command line: `start`, `tail`, `list`, `status`, `enable`, `disable`, `test`,
//! `dlq`, `check-config`. Each subcommand lives in its own function; `main.rs` only parses and
//! dispatches.

pub mod dlq;
pub mod tail;
pub mod test;
