//! Comparing binlog positions for the rewind guard ([`super::ConnectionCore`]).

use crate::event::Position;

/// Is `p` at or before `q` in the same binlog (same MySQL server, same log name stem)?
/// Positions of different servers or binlog stems are not comparable: never "before".
pub fn not_after(p: &Position, q: &Position) -> bool {
    if p.server_id != q.server_id && p.server_id != 0 && q.server_id != 0 {
        return false;
    }
    let (Some((ps, pn)), Some((qs, qn))) = (log_seq(&p.log_file), log_seq(&q.log_file)) else {
        return false;
    };
    ps == qs && (pn, p.offset, p.row_index) <= (qn, q.offset, q.row_index)
}

/// `mysql-bin.000042` -> (`mysql-bin`, 42).
fn log_seq(name: &str) -> Option<(&str, u64)> {
    let (stem, n) = name.rsplit_once('.')?;
    Some((stem, n.parse().ok()?))
}
