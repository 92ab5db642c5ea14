//! A zero-copy reader for the hot part of Canal's entries: `RowChange`, `RowData` and `Column`
//! (`proto/canal_entry.proto`), which prost would decode into three owned strings per column.
//! Column names, declared types and values are borrowed from the entry; names and types are
//! only compared with the cached layout, values become [`Value`](crate::event::Value)s directly.
//!
//! It accepts what prost accepts for these messages: every field of every wire type in any
//! order, unknown fields skipped (groups included), the last value of a repeated scalar wins,
//! and strings must be UTF-8 (checked for names and types when a layout is first built, since
//! a layout only ever matches bytes it was built from). Malformed input is a [`WireError`],
//! never a panic; `tests/fuzz_smoke.rs` checks the result against prost's on mutated input.

/// Why bytes are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("invalid varint at byte {0}")]
    Varint(usize),
    #[error("invalid key at byte {0}")]
    Key(usize),
    #[error("field {field} has wire type {wire}")]
    WireType { field: u32, wire: u8 },
    #[error("unbalanced group at byte {0}")]
    Group(usize),
    #[error("invalid UTF-8 in a string field")]
    Utf8,
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

pub fn utf8(b: &[u8]) -> Result<&str, WireError> {
    std::str::from_utf8(b).map_err(|_| WireError::Utf8)
}

/// An empty vector with the allocation of `v` (the in-place collect keeps it), for column
/// slices of another entry.
pub fn reuse<'b>(mut v: Vec<ColumnRef<'_>>) -> Vec<ColumnRef<'b>> {
    v.clear();
    v.into_iter().map(|_| ColumnRef::default()).collect()
}

/// The batch id from the first bytes of a MESSAGES packet (the session skips a packet too large
/// to hold by this id): `Packet.body` (field 5) holds `Messages`, whose `batch_id` (field 1)
/// comes first. Canal, like every protobuf writer, writes fields in number order, so it is
/// within the first few bytes. `None` if `head` is cut short or is not such a packet.
pub fn batch_id_from_head(head: &[u8]) -> Option<i64> {
    let mut r = Reader::new(head);
    // Packet: the varint fields before the body (magic, version, type, compression)
    loop {
        match r.key().ok()? {
            (5, LEN) => {
                r.varint().ok()?; // the body's length: the body itself is cut off
                break;
            }
            (_, VARINT) => {
                r.varint().ok()?;
            }
            _ => return None,
        }
    }
    // Messages: field 1, a varint, first
    match r.key().ok()? {
        (1, VARINT) => r.varint().ok().map(|v| v as i64),
        _ => None,
    }
}

/// An `Entry`'s `entryType` (field 2; `None` if absent or the entry is not well formed): the
/// connection judges the end of an answer by it without decoding the entry.
pub fn entry_type(entry: &[u8]) -> Option<u64> {
    let mut r = Reader::new(entry);
    while !r.done() {
        match r.key().ok()? {
            (2, VARINT) => return r.varint().ok(),
            (f, w) => r.skip(f, w).ok()?,
        }
    }
    None
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    #[inline(always)]
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    #[inline(always)]
    fn varint(&mut self) -> Result<u64, WireError> {
        // most varints (keys, lengths, flags) are one byte
        if let Some(&b) = self.buf.get(self.pos)
            && b < 0x80
        {
            self.pos += 1;
            return Ok(u64::from(b));
        }
        self.varint_long()
    }

    #[inline(never)]
    fn varint_long(&mut self) -> Result<u64, WireError> {
        let start = self.pos;
        let mut v: u64 = 0;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(WireError::Truncated(self.pos));
            };
            self.pos += 1;
            if i == 9 && b > 1 {
                return Err(WireError::Varint(start));
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(WireError::Varint(start))
    }

    /// `(field, wire type)`.
    #[inline(always)]
    fn key(&mut self) -> Result<(u32, u8), WireError> {
        let at = self.pos;
        let key = self.varint()?;
        let wire = (key & 7) as u8;
        let field = key >> 3;
        if key > u64::from(u32::MAX) || wire > FIXED32 || field == 0 {
            return Err(WireError::Key(at));
        }
        Ok((field as u32, wire))
    }

    #[inline(always)]
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        match self.buf.get(self.pos..).and_then(|rest| rest.get(..n)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(WireError::Truncated(self.pos)),
        }
    }

    #[inline(always)]
    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.varint()?;
        self.take(usize::try_from(n).map_err(|_| WireError::Truncated(self.pos))?)
    }

    /// Skips the value of a field of `wire` type (a group up to its end).
    fn skip(&mut self, field: u32, wire: u8) -> Result<(), WireError> {
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            LEN => self.bytes().map(drop),
            FIXED32 => self.take(4).map(drop),
            START_GROUP => {
                // nested groups, up to prost's recursion limit
                let mut open = vec![field];
                while let Some(&inner) = open.last() {
                    if open.len() > 100 {
                        return Err(WireError::Group(self.pos));
                    }
                    let (f, w) = self.key()?;
                    match w {
                        START_GROUP => open.push(f),
                        END_GROUP if f == inner => {
                            open.pop();
                        }
                        END_GROUP => return Err(WireError::Group(self.pos)),
                        w => self.skip(f, w)?,
                    }
                }
                Ok(())
            }
            _ => Err(WireError::Group(self.pos)),
        }
    }

    #[inline(always)]
    fn expect(&self, field: u32, wire: u8, want: u8) -> Result<(), WireError> {
        if wire == want {
            Ok(())
        } else {
            Err(WireError::WireType { field, wire })
        }
    }
}

/// Checks a `Pair` (`props`): two strings.
fn pair(buf: &[u8]) -> Result<(), WireError> {
    let mut r = Reader::new(buf);
    while !r.done() {
        let (field, wire) = r.key()?;
        match field {
            1 | 2 => {
                r.expect(field, wire, LEN)?;
                utf8(r.bytes()?)?;
            }
            _ => r.skip(field, wire)?,
        }
    }
    Ok(())
}

/// The parts of a `RowChange` the decoder uses; rows are read on demand.
#[derive(Debug, Default)]
pub struct RowChangeRef<'a> {
    pub event_type: Option<i32>,
    pub is_ddl: Option<bool>,
    pub sql: &'a str,
    pub ddl_schema_name: &'a str,
    /// The whole message, to iterate the `row_datas` fields.
    buf: &'a [u8],
}

impl<'a> RowChangeRef<'a> {
    /// Reads the scalar fields and checks the structure of everything else.
    pub fn parse(buf: &'a [u8]) -> Result<RowChangeRef<'a>, WireError> {
        let mut out = RowChangeRef {
            buf,
            ..Default::default()
        };
        let mut r = Reader::new(buf);
        while !r.done() {
            let (field, wire) = r.key()?;
            match field {
                1 => {
                    r.expect(field, wire, VARINT)?;
                    r.varint()?;
                }
                2 => {
                    r.expect(field, wire, VARINT)?;
                    out.event_type = Some(r.varint()? as i32);
                }
                10 => {
                    r.expect(field, wire, VARINT)?;
                    out.is_ddl = Some(r.varint()? != 0);
                }
                11 => {
                    r.expect(field, wire, LEN)?;
                    out.sql = utf8(r.bytes()?)?;
                }
                12 => {
                    // rows are parsed (and checked) when iterated
                    r.expect(field, wire, LEN)?;
                    r.bytes()?;
                }
                13 => {
                    r.expect(field, wire, LEN)?;
                    pair(r.bytes()?)?;
                }
                14 => {
                    r.expect(field, wire, LEN)?;
                    out.ddl_schema_name = utf8(r.bytes()?)?;
                }
                _ => r.skip(field, wire)?,
            }
        }
        Ok(out)
    }

    /// Checks every row (names and types included) without decoding it.
    pub fn check_rows(&self) -> Result<(), WireError> {
        let (mut before, mut after) = (Vec::new(), Vec::new());
        for row in self.rows() {
            row?.columns(&mut before, &mut after)?;
            for c in before.iter().chain(&after) {
                utf8(c.name)?;
                utf8(c.mysql_type)?;
            }
        }
        Ok(())
    }

    /// The `row_datas`, in order.
    pub fn rows(&self) -> impl Iterator<Item = Result<RowDataRef<'a>, WireError>> + 'a {
        let mut r = Reader::new(self.buf);
        std::iter::from_fn(move || {
            while !r.done() {
                // the structure was checked by `parse`
                let (field, wire) = r.key().ok()?;
                if field == 12 && wire == LEN {
                    return Some(r.bytes().map(|buf| RowDataRef { buf }));
                }
                r.skip(field, wire).ok()?;
            }
            None
        })
    }
}

/// One serialized `RowData`.
#[derive(Debug, Clone, Copy)]
pub struct RowDataRef<'a> {
    buf: &'a [u8],
}

impl<'a> RowDataRef<'a> {
    /// Reads the before and after columns into the (cleared) vectors.
    pub fn columns(
        &self,
        before: &mut Vec<ColumnRef<'a>>,
        after: &mut Vec<ColumnRef<'a>>,
    ) -> Result<(), WireError> {
        before.clear();
        after.clear();
        let mut r = Reader::new(self.buf);
        while !r.done() {
            // the common one-byte keys first (see `ColumnRef::parse`)
            match r.buf[r.pos] {
                0x0a => {
                    r.pos += 1;
                    before.push(ColumnRef::parse(r.bytes()?)?);
                    continue;
                }
                0x12 => {
                    r.pos += 1;
                    after.push(ColumnRef::parse(r.bytes()?)?);
                    continue;
                }
                _ => {}
            }
            let (field, wire) = r.key()?;
            match field {
                1 | 2 => {
                    r.expect(field, wire, LEN)?;
                    let col = ColumnRef::parse(r.bytes()?)?;
                    if field == 1 {
                        before.push(col)
                    } else {
                        after.push(col)
                    }
                }
                3 => {
                    r.expect(field, wire, LEN)?;
                    pair(r.bytes()?)?;
                }
                _ => r.skip(field, wire)?,
            }
        }
        Ok(())
    }
}

/// One `Column`, borrowed. `name` and `mysql_type` are unchecked bytes (see the module
/// docs); `value` is checked UTF-8.
#[derive(Debug, Clone, Copy, Default)]
pub struct ColumnRef<'a> {
    pub index: i32,
    pub sql_type: i32,
    pub name: &'a [u8],
    pub is_key: bool,
    pub updated: bool,
    pub is_null: Option<bool>,
    pub value: &'a str,
    pub mysql_type: &'a [u8],
}

impl<'a> ColumnRef<'a> {
    #[inline(always)]
    fn parse(buf: &'a [u8]) -> Result<ColumnRef<'a>, WireError> {
        let mut c = ColumnRef::default();
        let mut r = Reader::new(buf);
        // Canal writes one-byte keys with the declared wire types: dispatch on the byte;
        // anything else (unknown fields, long keys) takes the general path.
        while let Some(&key) = r.buf.get(r.pos) {
            r.pos += 1;
            match key {
                0x08 => c.index = r.varint()? as i32,
                0x10 => c.sql_type = r.varint()? as i32,
                0x1a => c.set_name(r.bytes()?)?,
                0x20 => c.is_key = r.varint()? != 0,
                0x28 => c.updated = r.varint()? != 0,
                0x30 => c.is_null = Some(r.varint()? != 0),
                0x3a => pair(r.bytes()?)?,
                0x42 => c.value = utf8(r.bytes()?)?,
                0x48 => {
                    r.varint()?;
                }
                0x52 => c.set_mysql_type(r.bytes()?)?,
                _ => {
                    r.pos -= 1;
                    c.field(&mut r)?;
                }
            }
        }
        Ok(c)
    }

    // An overwritten occurrence is checked now (the last one with the layout).
    fn set_name(&mut self, b: &'a [u8]) -> Result<(), WireError> {
        if !self.name.is_empty() {
            utf8(self.name)?;
        }
        self.name = b;
        Ok(())
    }

    fn set_mysql_type(&mut self, b: &'a [u8]) -> Result<(), WireError> {
        if !self.mysql_type.is_empty() {
            utf8(self.mysql_type)?;
        }
        self.mysql_type = b;
        Ok(())
    }

    /// One field, by its decoded key.
    #[inline(never)]
    fn field(&mut self, r: &mut Reader<'a>) -> Result<(), WireError> {
        let (field, wire) = r.key()?;
        match field {
            1 | 2 | 4 | 5 | 6 | 9 => {
                r.expect(field, wire, VARINT)?;
                let v = r.varint()?;
                match field {
                    1 => self.index = v as i32,
                    2 => self.sql_type = v as i32,
                    4 => self.is_key = v != 0,
                    5 => self.updated = v != 0,
                    6 => self.is_null = Some(v != 0),
                    _ => {}
                }
            }
            3 | 7 | 8 | 10 => {
                r.expect(field, wire, LEN)?;
                let b = r.bytes()?;
                match field {
                    3 => self.set_name(b)?,
                    7 => pair(b)?,
                    8 => self.value = utf8(b)?,
                    _ => self.set_mysql_type(b)?,
                }
            }
            _ => r.skip(field, wire)?,
        }
        Ok(())
    }
}
