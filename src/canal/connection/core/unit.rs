//! The connection core's check of `canal.mem_unit` against the Canal server's memunit, judged
//! from the answers ([`server_unit_larger`], [`SmallUnitProbe`]); a mismatch is named once in
//! the status (`config_warning`) and the log. It never stops the stream.

use super::{ConnectionCore, EventsView, RawView};
use crate::canal::window::{SmallUnitProbe, server_unit_larger};

impl<R: RawView, E: EventsView> ConnectionCore<R, E> {
    /// Name a Canal memunit larger than `canal.mem_unit`, once, if this answer shows one, or a
    /// smaller one, once a run of answers shows it ([`SmallUnitProbe`]).
    pub(super) fn check_unit(&mut self, raw: &R) {
        if self.status.config_warning.is_none()
            && let Some(bytes) =
                server_unit_larger(raw.asked(), self.cfg.mem_unit, raw.entry_sizes())
        {
            let w = format!(
                "canal.mem_unit is {} bytes, but the Canal server answered a GET for one unit with \
                 {bytes} bytes before its last entry: its canal.instance.memory.buffer.memunit is \
                 larger. GETs are larger than canal.batch_size means, and a quiet table's change \
                 waits for the long poll to time out (canal.fetch_wait); set canal.mem_unit to the \
                 server's memunit",
                self.cfg.mem_unit
            );
            tracing::warn!("{w}");
            self.status.config_warning = Some(w);
        }
        if self.status.config_warning.is_none()
            && let Some((lo, hi)) = self.small_unit.observe(
                raw.asked(),
                self.cfg.mem_unit,
                raw.entry_sizes(),
                raw.ends_transaction(),
            )
        {
            let unit = if lo == hi {
                format!("{lo} bytes")
            } else {
                format!("{lo} to {hi} bytes")
            };
            let w = format!(
                "canal.mem_unit is {} bytes, but the Canal server cut {} answers in a row at \
                 {unit} per unit while more was waiting: its \
                 canal.instance.memory.buffer.memunit is smaller. Each GET brings about {}x less \
                 than canal.batch_size means, which costs throughput; set canal.mem_unit to the \
                 server's memunit",
                self.cfg.mem_unit,
                SmallUnitProbe::ANSWERS,
                u64::from(self.cfg.mem_unit) / hi.max(1)
            );
            tracing::warn!("{w}");
            self.status.config_warning = Some(w);
        }
    }
}
