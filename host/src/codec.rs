//! Little-endian binary fields of tape frames and outbox pages: fixed-width
//! integers, length-prefixed bytes and strings, optional values behind a
//! flag byte.

use crate::event::Header;

/// Appends fields to a frame body.
#[derive(Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn i32(&mut self, v: i32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        // Tape frames (see `tape::MAX_FRAME`) and outbox pages are bounded
        // far below 4 GiB.
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
    }
    pub(crate) fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    pub(crate) fn opt_bytes(&mut self, v: Option<&[u8]>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.bytes(v);
            }
        }
    }
    pub(crate) fn opt_i64(&mut self, v: Option<i64>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.i64(v);
            }
        }
    }
    pub(crate) fn opt_str(&mut self, v: Option<&str>) {
        self.opt_bytes(v.map(str::as_bytes));
    }
    /// A SQL value as [`crate::state::put_value`] encodes it.
    pub(crate) fn value(&mut self, v: &rusqlite::types::Value) {
        crate::state::put_value(&mut self.buf, v.into());
    }
    /// A count, then each header's name and optional value.
    pub(crate) fn headers(&mut self, headers: &[Header]) {
        self.u32(headers.len() as u32);
        for h in headers {
            self.str(&h.name);
            self.opt_bytes(h.value.as_deref());
        }
    }
}

/// Reads fields from a frame body; every read is bounds-checked and fails
/// with what it expected.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

pub(crate) type Field<T> = Result<T, String>;

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize, what: &str) -> Field<&'a [u8]> {
        if self.buf.len() < n {
            return Err(format!(
                "{what}: needs {n} bytes, the frame has {} left",
                self.buf.len()
            ));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Field<[u8; N]> {
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returns exactly N bytes"))
    }

    pub(crate) fn u8(&mut self, what: &str) -> Field<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    pub(crate) fn u32(&mut self, what: &str) -> Field<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn i32(&mut self, what: &str) -> Field<i32> {
        Ok(i32::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn u64(&mut self, what: &str) -> Field<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn i64(&mut self, what: &str) -> Field<i64> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn digest(&mut self, what: &str) -> Field<[u8; 32]> {
        self.array(what)
    }
    pub(crate) fn bytes(&mut self, what: &str) -> Field<Vec<u8>> {
        let n = self.u32(what)? as usize;
        Ok(self.take(n, what)?.to_vec())
    }
    pub(crate) fn str(&mut self, what: &str) -> Field<String> {
        String::from_utf8(self.bytes(what)?).map_err(|_| format!("{what}: not valid UTF-8"))
    }
    fn flag(&mut self, what: &str) -> Field<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("{what}: presence flag is {other}, not 0 or 1")),
        }
    }
    pub(crate) fn opt_bytes(&mut self, what: &str) -> Field<Option<Vec<u8>>> {
        if self.flag(what)? {
            self.bytes(what).map(Some)
        } else {
            Ok(None)
        }
    }
    pub(crate) fn opt_i64(&mut self, what: &str) -> Field<Option<i64>> {
        if self.flag(what)? {
            self.i64(what).map(Some)
        } else {
            Ok(None)
        }
    }
    pub(crate) fn opt_str(&mut self, what: &str) -> Field<Option<String>> {
        if self.flag(what)? {
            self.str(what).map(Some)
        } else {
            Ok(None)
        }
    }
    /// What [`Writer::value`] wrote.
    pub(crate) fn value(&mut self, what: &str) -> Field<rusqlite::types::Value> {
        use rusqlite::types::Value;
        Ok(match self.u8(what)? {
            0 => Value::Null,
            1 => Value::Integer(self.i64(what)?),
            2 => Value::Real(f64::from_bits(self.u64(what)?)),
            tag @ (3 | 4) => {
                let n = usize::try_from(self.u64(what)?).unwrap_or(usize::MAX);
                let bytes = self.take(n, what)?.to_vec();
                if tag == 3 {
                    Value::Text(
                        String::from_utf8(bytes).map_err(|_| format!("{what}: not valid UTF-8"))?,
                    )
                } else {
                    Value::Blob(bytes)
                }
            }
            other => return Err(format!("{what}: value tag {other}, not 0 to 4")),
        })
    }
    /// What [`Writer::headers`] wrote.
    pub(crate) fn headers(&mut self) -> Field<Vec<Header>> {
        let count = self.u32("header count")?;
        // Each header takes at least 5 bytes: a corrupt count fails below
        // instead of reserving memory for it.
        let mut headers = Vec::with_capacity((count as usize).min(self.buf.len() / 5));
        for _ in 0..count {
            headers.push(Header {
                name: self.str("header name")?,
                value: self.opt_bytes("header value")?,
            });
        }
        Ok(headers)
    }
}
