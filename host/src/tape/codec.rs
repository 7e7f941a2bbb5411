//! Little-endian binary fields of tape frames: fixed-width integers,
//! length-prefixed bytes and strings, optional values behind a flag byte.

/// Appends fields to a frame body.
#[derive(Default)]
pub(super) struct Writer {
    pub(super) buf: Vec<u8>,
}

impl Writer {
    pub(super) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(super) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn i32(&mut self, v: i32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn bytes(&mut self, v: &[u8]) {
        // Frames are bounded far below 4 GiB (see `MAX_FRAME`).
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
    }
    pub(super) fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    pub(super) fn opt_bytes(&mut self, v: Option<&[u8]>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.bytes(v);
            }
        }
    }
    pub(super) fn opt_i64(&mut self, v: Option<i64>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.i64(v);
            }
        }
    }
    pub(super) fn opt_str(&mut self, v: Option<&str>) {
        self.opt_bytes(v.map(str::as_bytes));
    }
}

/// Reads fields from a frame body; every read is bounds-checked and fails
/// with what it expected.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
}

pub(super) type Field<T> = Result<T, String>;

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(super) fn is_empty(&self) -> bool {
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

    pub(super) fn u8(&mut self, what: &str) -> Field<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    pub(super) fn u32(&mut self, what: &str) -> Field<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    pub(super) fn i32(&mut self, what: &str) -> Field<i32> {
        Ok(i32::from_le_bytes(self.array(what)?))
    }
    pub(super) fn u64(&mut self, what: &str) -> Field<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    pub(super) fn i64(&mut self, what: &str) -> Field<i64> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }
    pub(super) fn digest(&mut self, what: &str) -> Field<[u8; 32]> {
        self.array(what)
    }
    pub(super) fn bytes(&mut self, what: &str) -> Field<Vec<u8>> {
        let n = self.u32(what)? as usize;
        Ok(self.take(n, what)?.to_vec())
    }
    pub(super) fn str(&mut self, what: &str) -> Field<String> {
        String::from_utf8(self.bytes(what)?).map_err(|_| format!("{what}: not valid UTF-8"))
    }
    fn flag(&mut self, what: &str) -> Field<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("{what}: presence flag is {other}, not 0 or 1")),
        }
    }
    pub(super) fn opt_bytes(&mut self, what: &str) -> Field<Option<Vec<u8>>> {
        if self.flag(what)? {
            self.bytes(what).map(Some)
        } else {
            Ok(None)
        }
    }
    pub(super) fn opt_i64(&mut self, what: &str) -> Field<Option<i64>> {
        if self.flag(what)? {
            self.i64(what).map(Some)
        } else {
            Ok(None)
        }
    }
    pub(super) fn opt_str(&mut self, what: &str) -> Field<Option<String>> {
        if self.flag(what)? {
            self.str(what).map(Some)
        } else {
            Ok(None)
        }
    }
}
