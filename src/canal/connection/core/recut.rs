//! The re-cut: where the deliveries of rows Canal may send again must end, so that what the
//! subscriber builds from a delivery (bulk messages and their ids, above all) comes out the
//! same the second time ([`super::ConnectionCore`]).
//!
//! Canal cuts a batch wherever its store stands when a GET is answered, so rows it sends again
//! (after a rollback, a reconnect, a Canal restart or a restart of this service) usually come
//! in batches cut elsewhere than the first time. The router makes each consumer's bulk messages
//! from one delivery (`max_rows` at a time, the rest at the delivery's end), so a different cut
//! means different bulks under different ids. The core therefore remembers where each
//! delivery ended ([`Cuts`]) until Canal has acked past it, and cuts the rows that come again
//! at the same places: a batch that holds a remembered end is split there, and a batch that
//! ends before the next remembered end is held back until the rest of that delivery has come
//! (the next GET long-polls for it). The ends are also written to the rewind guard's file
//! (before the delivery is handed on), so a restarted service cuts the same way.
//!
//! How it fails: when the rows up to a remembered end do not come (the subscription's filter
//! changed, a row was skipped), [`EMPTY_POLLS`] long polls in a row that come back empty
//! (`canal.fetch_wait` each: a restarted Canal server's parser may pause) end the wait and
//! the held rows are delivered as they are: their bulks then differ, nothing is lost. So do a
//! drain, and held rows that alone fill the in-flight window. Ends that Canal can no longer
//! send (a different MySQL server or binlog) are dropped.

use super::rewind::not_after;
use crate::event::Position;
use std::collections::VecDeque;

/// Long polls in a row that find nothing before held rows go as they are.
pub const EMPTY_POLLS: u32 = 3;

/// A row's key for the comparisons: position and execution time (ms).
pub type Key = (Position, i64);

/// Is `k` at or before `end` (the rewind guard's rule: same binlog, not executed later)?
pub fn at_or_before(k: (&Position, i64), end: &Key) -> bool {
    k.1 <= end.1 && not_after(k.0, &end.0)
}

/// The ends of the deliveries whose rows Canal has not acked yet, oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cuts {
    ends: VecDeque<Key>,
    /// Bumped on every change (the shell writes the file when it moved).
    version: u64,
}

impl Cuts {
    /// Ends read back from the file of an earlier run; those at or before `acked` are gone.
    pub fn restored(ends: Vec<Key>, acked: Option<&Key>) -> Self {
        let mut c = Cuts::default();
        // in order, once each (the file and its log may both hold one)
        for end in ends {
            c.delivered(end);
        }
        c.version = 0;
        if let Some(a) = acked {
            c.acked(a);
        }
        c
    }

    pub fn ends(&self) -> impl Iterator<Item = &Key> {
        self.ends.iter()
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// A delivery ended at `end`: remember it (in order; once).
    pub fn delivered(&mut self, end: Key) {
        if let Some(back) = self.ends.back()
            && !at_or_before((&end.0, end.1), back)
            && !at_or_before((&back.0, back.1), &end)
        {
            // not comparable with what is remembered (another MySQL server or binlog): the
            // old ends can never be met again
            self.ends.clear();
        }
        let at = self
            .ends
            .iter()
            .position(|e| !at_or_before((&e.0, e.1), &end))
            .unwrap_or(self.ends.len());
        if at > 0 && self.ends[at - 1] == end {
            return;
        }
        self.ends.insert(at, end);
        self.version += 1;
    }

    /// Canal acked everything up to `acked`: ends at or before it are no longer needed.
    pub fn acked(&mut self, acked: &Key) {
        let before = self.ends.len();
        while self
            .ends
            .front()
            .is_some_and(|e| at_or_before((&e.0, e.1), acked))
        {
            self.ends.pop_front();
        }
        if self.ends.len() != before {
            self.version += 1;
        }
    }

    /// Where to cut rows whose keys `key(0..n)` follow each other in binlog order: the lengths
    /// of the complete pieces, in order, and whether the last of the remaining rows ends short
    /// of a remembered end (then they are held back: [`Plan::hold`]).
    pub fn plan<'a>(&self, n: usize, key: impl Fn(usize) -> (&'a Position, i64)) -> Plan {
        let mut plan = Plan::default();
        if n == 0 {
            return plan;
        }
        // the usual case: every row is past every remembered end
        if self.ends.back().is_none_or(|e| !at_or_before(key(0), e)) {
            plan.pieces.push(n);
            return plan;
        }
        let mut start = 0;
        for end in &self.ends {
            if start == n {
                break;
            }
            let upto = (start..n)
                .take_while(|&i| at_or_before(key(i), end))
                .count();
            if upto == 0 {
                // an end before these rows (or not comparable with them)
                continue;
            }
            if start + upto == n {
                let last = key(n - 1);
                if last.1 == end.1 && *last.0 == end.0 {
                    // the delivery's last row itself: complete
                    plan.pieces.push(upto);
                } else {
                    plan.hold = true;
                    plan.held = upto;
                }
                return plan;
            }
            plan.pieces.push(upto);
            start += upto;
        }
        if start < n {
            plan.pieces.push(n - start);
        }
        plan
    }
}

/// How to cut a run of rows ([`Cuts::plan`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The lengths of the complete pieces, in order.
    pub pieces: Vec<usize>,
    /// The rows after them (`held` of them) end short of a remembered end: hold them back.
    pub hold: bool,
    pub held: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(offset: u64) -> Key {
        (
            Position {
                log_file: "mysql-bin.000001".into(),
                offset,
                row_index: 0,
                server_id: 1,
                gtid: None,
            },
            offset as i64,
        )
    }

    fn plan(c: &Cuts, rows: &[u64]) -> Plan {
        let keys: Vec<Key> = rows.iter().map(|&o| k(o)).collect();
        c.plan(keys.len(), |i| (&keys[i].0, keys[i].1))
    }

    #[test]
    fn rows_past_every_end_are_one_piece() {
        let mut c = Cuts::default();
        assert_eq!(plan(&c, &[1, 2, 3]).pieces, vec![3]);
        c.delivered(k(3));
        assert_eq!(plan(&c, &[4, 5]).pieces, vec![2]);
    }

    #[test]
    fn rows_sent_again_are_cut_where_their_deliveries_ended() {
        let mut c = Cuts::default();
        c.delivered(k(3));
        c.delivered(k(5));
        // one batch holding both deliveries and more: cut at 3 and 5
        assert_eq!(
            plan(&c, &[1, 2, 3, 4, 5, 6, 7]),
            Plan {
                pieces: vec![3, 2, 2],
                hold: false,
                held: 0
            }
        );
        // a batch ending at an end exactly: complete
        assert_eq!(plan(&c, &[1, 2, 3]).pieces, vec![3]);
        // a batch ending short of the first end: held
        assert_eq!(
            plan(&c, &[1, 2]),
            Plan {
                pieces: vec![],
                hold: true,
                held: 2
            }
        );
        // short of the second end after a complete piece
        assert_eq!(
            plan(&c, &[2, 3, 4]),
            Plan {
                pieces: vec![2],
                hold: true,
                held: 1
            }
        );
        // the row at an end never comes (filtered out): the next row after it closes the piece
        assert_eq!(plan(&c, &[1, 2, 4, 5]).pieces, vec![2, 2]);
    }

    #[test]
    fn acked_ends_are_forgotten_and_other_binlogs_replace_them() {
        let mut c = Cuts::default();
        c.delivered(k(3));
        c.delivered(k(5));
        c.delivered(k(5));
        assert_eq!(c.len(), 2);
        c.acked(&k(4));
        assert_eq!(c.ends().cloned().collect::<Vec<_>>(), vec![k(5)]);
        let mut other = k(1);
        other.0.server_id = 2;
        c.delivered(other.clone());
        assert_eq!(c.ends().cloned().collect::<Vec<_>>(), vec![other]);
        let r = Cuts::restored(vec![k(3), k(5), k(9)], Some(&k(5)));
        assert_eq!(r.ends().cloned().collect::<Vec<_>>(), vec![k(9)]);
    }
}
