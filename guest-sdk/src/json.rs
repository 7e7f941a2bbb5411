//! Outputs' JSON: byte for byte what `serde_json::to_writer` writes, faster
//! inside the sandbox.
//!
//! serde_json escapes a string a byte at a time. Compiled to WebAssembly and
//! metered by fuel, that loop was the guest's most expensive function in a
//! payments event: some 330 instructions for each of the dozen keys and
//! strings of one output. Here a string is checked for bytes that need an
//! escape eight at a time and copied whole when there are none, the common
//! case; only a string that has one is escaped byte by byte.
//!
//! This serialiser writes the common shapes only. Where it would have to
//! decide something the way serde_json does (a map key that is not a string,
//! serde_json's own `RawValue` and `Number` tokens) or on any error, it gives
//! up, and [`write`]'s caller serialises the value again with serde_json,
//! which then also words the error.

use std::fmt;

use serde::ser::{self, Serialize};
use serde_json::ser::{CharEscape, CompactFormatter, Formatter};

/// Appends `value` to `out` as serde_json's compact form. `false`: the
/// serialiser gave up; `out` then holds a partial document to discard.
pub(crate) fn write<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> bool {
    value.serialize(&mut Json { out }).is_ok()
}

/// Why [`write`] stopped: it never says more, serde_json will.
#[derive(Debug)]
pub(crate) struct GiveUp;

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("left to serde_json")
    }
}

impl std::error::Error for GiveUp {}

impl ser::Error for GiveUp {
    fn custom<T: fmt::Display>(_: T) -> Self {
        GiveUp
    }
}

/// Struct names serde_json gives its own types that serialise specially.
const SERDE_JSON_TOKENS: &str = "$serde_json::private::";

struct Json<'a> {
    out: &'a mut Vec<u8>,
}

type Done = Result<(), GiveUp>;

impl Json<'_> {
    fn open(&mut self, open: &[u8], close: &'static [u8]) -> Compound<'_> {
        self.out.extend_from_slice(open);
        Compound {
            out: self.out,
            first: true,
            close,
        }
    }

    /// `{"variant":` followed by `open`, closed by `close` then `}`.
    fn open_variant(&mut self, variant: &str, open: &[u8], close: &'static [u8]) -> Compound<'_> {
        self.out.push(b'{');
        write_str(self.out, variant);
        self.out.push(b':');
        self.open(open, close)
    }
}

/// serde_json's integers: itoa's digits, as its compact formatter writes
/// them.
macro_rules! integers {
    ($($method:ident($ty:ty);)*) => {
        $(fn $method(self, v: $ty) -> Done {
            append(self.out, itoa::Buffer::new().format(v).as_bytes());
            Ok(())
        })*
    };
}

impl<'s, 'a> ser::Serializer for &'s mut Json<'a> {
    type Ok = ();
    type Error = GiveUp;
    type SerializeSeq = Compound<'s>;
    type SerializeTuple = Compound<'s>;
    type SerializeTupleStruct = Compound<'s>;
    type SerializeTupleVariant = Compound<'s>;
    type SerializeMap = Compound<'s>;
    type SerializeStruct = Compound<'s>;
    type SerializeStructVariant = Compound<'s>;

    integers! {
        serialize_i8(i8);
        serialize_i16(i16);
        serialize_i32(i32);
        serialize_i64(i64);
        serialize_i128(i128);
        serialize_u8(u8);
        serialize_u16(u16);
        serialize_u32(u32);
        serialize_u64(u64);
        serialize_u128(u128);
    }

    fn serialize_bool(self, v: bool) -> Done {
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }

    fn serialize_f32(self, v: f32) -> Done {
        if !v.is_finite() {
            return self.serialize_unit();
        }
        CompactFormatter.write_f32(self.out, v).map_err(|_| GiveUp)
    }

    fn serialize_f64(self, v: f64) -> Done {
        if !v.is_finite() {
            return self.serialize_unit();
        }
        CompactFormatter.write_f64(self.out, v).map_err(|_| GiveUp)
    }

    fn serialize_char(self, v: char) -> Done {
        self.serialize_str(v.encode_utf8(&mut [0; 4]))
    }

    fn serialize_str(self, v: &str) -> Done {
        write_str(self.out, v);
        Ok(())
    }

    fn serialize_bytes(self, v: &[u8]) -> Done {
        let mut seq = self.open(b"[", b"]");
        for byte in v {
            ser::SerializeSeq::serialize_element(&mut seq, byte)?;
        }
        ser::SerializeSeq::end(seq)
    }

    fn serialize_none(self) -> Done {
        self.serialize_unit()
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Done {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Done {
        self.out.extend_from_slice(b"null");
        Ok(())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Done {
        self.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Done {
        self.serialize_str(variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Done {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Done {
        self.out.push(b'{');
        write_str(self.out, variant);
        self.out.push(b':');
        value.serialize(&mut *self)?;
        self.out.push(b'}');
        Ok(())
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Compound<'s>, GiveUp> {
        Ok(self.open(b"[", b"]"))
    }

    fn serialize_tuple(self, _len: usize) -> Result<Compound<'s>, GiveUp> {
        Ok(self.open(b"[", b"]"))
    }

    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Compound<'s>, GiveUp> {
        Ok(self.open(b"[", b"]"))
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'s>, GiveUp> {
        Ok(self.open_variant(variant, b"[", b"]}"))
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Compound<'s>, GiveUp> {
        Ok(self.open(b"{", b"}"))
    }

    fn serialize_struct(self, name: &'static str, _len: usize) -> Result<Compound<'s>, GiveUp> {
        if name.starts_with(SERDE_JSON_TOKENS) {
            return Err(GiveUp);
        }
        Ok(self.open(b"{", b"}"))
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'s>, GiveUp> {
        Ok(self.open_variant(variant, b"{", b"}}"))
    }
}

/// An open array or object.
pub(crate) struct Compound<'s> {
    out: &'s mut Vec<u8>,
    first: bool,
    close: &'static [u8],
}

impl Compound<'_> {
    fn comma(&mut self) {
        if !std::mem::take(&mut self.first) {
            self.out.push(b',');
        }
    }

    fn value<T: Serialize + ?Sized>(&mut self, value: &T) -> Done {
        value.serialize(&mut Json {
            out: &mut *self.out,
        })
    }

    fn close(self) -> Done {
        self.out.extend_from_slice(self.close);
        Ok(())
    }
}

/// serde's sequence-like compounds: values separated by commas.
macro_rules! elements {
    ($($trait:ident::$method:ident),*) => {$(
        impl ser::$trait for Compound<'_> {
            type Ok = ();
            type Error = GiveUp;

            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Done {
                self.comma();
                self.value(value)
            }

            fn end(self) -> Done {
                self.close()
            }
        }
    )*};
}

elements!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl ser::SerializeMap for Compound<'_> {
    type Ok = ();
    type Error = GiveUp;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Done {
        self.comma();
        // serde_json writes a key that serialises as a string (a `str`, a
        // `char`, a unit variant, or one of those wrapped) as that string,
        // and quotes or refuses anything else: those are left to it.
        let start = self.out.len();
        self.value(key)?;
        if self.out.get(start) != Some(&b'"') {
            return Err(GiveUp);
        }
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Done {
        self.out.push(b':');
        self.value(value)
    }

    fn end(self) -> Done {
        self.close()
    }
}

/// serde's struct-like compounds: `"key":value` pairs separated by commas.
macro_rules! fields {
    ($($trait:ident),*) => {$(
        impl ser::$trait for Compound<'_> {
            type Ok = ();
            type Error = GiveUp;

            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Done {
                self.comma();
                write_str(self.out, key);
                self.out.push(b':');
                self.value(value)
            }

            fn end(self) -> Done {
                self.close()
            }
        }
    )*};
}

fields!(SerializeStruct, SerializeStructVariant);

/// `s` as a JSON string, escaped as serde_json escapes it.
fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if needs_escape(bytes) {
        write_escaped(out, bytes);
    } else {
        append(out, bytes);
    }
    out.push(b'"');
}

/// Appends `bytes` to `out`. Up to 16 bytes (most keys, ids and numbers)
/// are copied with two overlapping loads and stores: through
/// `extend_from_slice`, a copy of a length not known when compiling is a
/// `memory.copy`, which wasmtime runs as a call into the host (a dozen an
/// event for payments).
fn append(out: &mut Vec<u8>, bytes: &[u8]) {
    let n = bytes.len();
    if n == 0 || n > 16 {
        out.extend_from_slice(bytes);
        return;
    }
    out.reserve(n);
    let len = out.len();
    // SAFETY: `reserve` made room for `n` more bytes after `len`; every load
    // below lies within `bytes` and every store within `len..len + n` (the
    // two of a pair overlap when `n` is not twice their width), and all `n`
    // bytes are written before the length covers them.
    unsafe {
        let (src, dst) = (bytes.as_ptr(), out.as_mut_ptr().add(len));
        if n >= 8 {
            let (a, b) = (
                src.cast::<u64>().read_unaligned(),
                src.add(n - 8).cast::<u64>().read_unaligned(),
            );
            dst.cast::<u64>().write_unaligned(a);
            dst.add(n - 8).cast::<u64>().write_unaligned(b);
        } else if n >= 4 {
            let (a, b) = (
                src.cast::<u32>().read_unaligned(),
                src.add(n - 4).cast::<u32>().read_unaligned(),
            );
            dst.cast::<u32>().write_unaligned(a);
            dst.add(n - 4).cast::<u32>().write_unaligned(b);
        } else {
            // One to three bytes: the first, the middle and the last.
            let (a, b, c) = (*src, *src.add(n / 2), *src.add(n - 1));
            *dst = a;
            *dst.add(n / 2) = b;
            *dst.add(n - 1) = c;
        }
        out.set_len(len + n);
    }
}

const ONES: u64 = u64::from_le_bytes([1; 8]);
const HIGH_BITS: u64 = u64::from_le_bytes([0x80; 8]);

/// Whether any of the eight bytes in `word` is a control character, `"` or
/// `\`: the bytes serde_json escapes. (Each test sets a byte's high bit
/// where that byte matches; a byte of 0x80 or more never matches.)
fn word_needs_escape(word: u64) -> bool {
    let below_space = word.wrapping_sub(ONES * 0x20) & !word;
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let is_quote = quote.wrapping_sub(ONES) & !quote;
    let is_backslash = backslash.wrapping_sub(ONES) & !backslash;
    (below_space | is_quote | is_backslash) & HIGH_BITS != 0
}

/// Whether any byte of `bytes` needs an escape, eight at a time. The last
/// word overlaps the one before it rather than being copied out and padded
/// (copying it through the stack cost a stalled load per string); strings
/// shorter than a word are read as two overlapping halves or quarters.
fn needs_escape(bytes: &[u8]) -> bool {
    let n = bytes.len();
    let word = if n >= 8 {
        let mut at = 0;
        while at + 8 < n {
            if word_needs_escape(load::<8>(bytes, at)) {
                return true;
            }
            at += 8;
        }
        load::<8>(bytes, n - 8)
    } else if n >= 4 {
        load::<4>(bytes, 0) | load::<4>(bytes, n - 4) << 32
    } else if n >= 2 {
        // The upper half spaces, which need no escape.
        SPACES << 32 | load::<2>(bytes, 0) | load::<2>(bytes, n - 2) << 16
    } else if n == 1 {
        SPACES << 8 | u64::from(bytes[0])
    } else {
        return false;
    };
    word_needs_escape(word)
}

/// Eight spaces, as a word.
const SPACES: u64 = u64::from_le_bytes([b' '; 8]);

/// The `N` bytes of `bytes` at `at`, little-endian, as the low bytes of a word.
fn load<const N: usize>(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word[..N].copy_from_slice(&bytes[at..at + N]);
    u64::from_le_bytes(word)
}

/// serde_json's escaping, a byte at a time: runs of plain bytes copied
/// whole, each byte that needs one replaced by its escape.
fn write_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut start = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        let escape = match byte {
            b'"' => CharEscape::Quote,
            b'\\' => CharEscape::ReverseSolidus,
            0x08 => CharEscape::Backspace,
            0x0c => CharEscape::FormFeed,
            b'\n' => CharEscape::LineFeed,
            b'\r' => CharEscape::CarriageReturn,
            b'\t' => CharEscape::Tab,
            0x00..=0x1f => CharEscape::AsciiControl(byte),
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        // Writing to a `Vec` cannot fail.
        let _ = CompactFormatter.write_char_escape(out, escape);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use serde::Serialize;
    use serde_json::Value;

    use super::*;

    /// What `write` writes, or `None` where it leaves the value to serde_json.
    fn fast<T: Serialize + ?Sized>(value: &T) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        write(&mut out, value).then_some(out)
    }

    fn same_as_serde_json<T: Serialize + ?Sized>(value: &T) {
        let expected = serde_json::to_vec(value).expect("serde_json serialises it");
        let got = fast(value).expect("the fast path writes it");
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&expected)
        );
    }

    /// Short copies, at every length either side of the fast path's and
    /// onto every length of what is there already, append exactly the bytes.
    #[test]
    fn append_copies_every_length_exactly() {
        let source: Vec<u8> = (0..40u8)
            .map(|b| b.wrapping_mul(37).wrapping_add(1))
            .collect();
        for before in 0..20 {
            for n in 0..=source.len() {
                let mut out: Vec<u8> = vec![0xee; before];
                out.shrink_to_fit();
                append(&mut out, &source[..n]);
                assert_eq!(out.len(), before + n);
                assert!(out[..before].iter().all(|&b| b == 0xee));
                assert_eq!(&out[before..], &source[..n], "{n} bytes after {before}");
            }
        }
    }

    /// Every integer type's extremes, written as serde_json writes them.
    #[test]
    fn integers_of_every_width() {
        same_as_serde_json(&(i8::MIN, i8::MAX, u8::MAX, i16::MIN, u16::MAX, i32::MIN));
        same_as_serde_json(&(u32::MAX, i64::MIN, i64::MAX, u64::MAX, 0u64, -1i64));
        same_as_serde_json(&(i128::MIN, i128::MAX, u128::MAX, 10u128));
    }

    #[derive(Serialize)]
    struct Unit;

    #[derive(Serialize)]
    struct Newtype(String);

    #[derive(Serialize)]
    struct Pair(i32, Option<bool>);

    #[derive(Serialize)]
    enum Shape {
        Dot,
        Circle(f64),
        Line(i8, u128),
        Box { w: f32, h: f32 },
    }

    #[derive(Serialize)]
    struct Everything<'a> {
        unit: (),
        unit_struct: Unit,
        newtype: Newtype,
        pair: Pair,
        shapes: Vec<Shape>,
        chars: [char; 3],
        #[serde(with = "serde_bytes_like")]
        bytes: &'a [u8],
        empty_seq: Vec<u8>,
        empty_map: BTreeMap<String, i32>,
        big: i128,
        small: i8,
        nothing: Option<String>,
        text: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        skipped: Option<i32>,
        not_finite: [f64; 3],
        keyed_by_unit_variants: BTreeMap<Key, u16>,
    }

    #[derive(Serialize, PartialEq, Eq, PartialOrd, Ord)]
    enum Key {
        Left,
        Right,
    }

    mod serde_bytes_like {
        pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(v)
        }
    }

    #[test]
    fn every_shape_is_written_as_serde_json_writes_it() {
        same_as_serde_json(&Everything {
            unit: (),
            unit_struct: Unit,
            newtype: Newtype("new\ttype".into()),
            pair: Pair(-7, Some(true)),
            shapes: vec![
                Shape::Dot,
                Shape::Circle(0.1),
                Shape::Line(-128, u128::MAX),
                Shape::Box { w: 1.5, h: -0.0 },
            ],
            chars: ['"', 'é', '\u{1}'],
            bytes: &[0, 1, 255],
            empty_seq: vec![],
            empty_map: BTreeMap::new(),
            big: i128::MIN,
            small: i8::MIN,
            nothing: None,
            text: "quote \" backslash \\ controls \u{0}\u{8}\u{c}\n\r\t\u{1f} del \u{7f} ünï 😀",
            skipped: None,
            not_finite: [f64::NAN, f64::INFINITY, 1e300],
            keyed_by_unit_variants: [(Key::Left, 1), (Key::Right, 2)].into_iter().collect(),
        });
    }

    #[test]
    fn every_byte_that_needs_an_escape_is_found_at_every_position() {
        for byte in 0..=127u8 {
            for len in 1..=20 {
                for at in 0..len {
                    let mut s = vec![b'a'; len];
                    s[at] = byte;
                    let s = String::from_utf8(s).unwrap();
                    same_as_serde_json(&s);
                }
            }
        }
    }

    #[test]
    fn what_serde_json_decides_is_left_to_it() {
        // Keys that are not strings: serde_json quotes numbers and refuses
        // sequences; the fast path leaves both to it.
        let numbered: BTreeMap<i32, i32> = [(1, 2)].into_iter().collect();
        assert_eq!(fast(&numbered), None);
        let mut by_pair = BTreeMap::new();
        by_pair.insert((1, 2), 3);
        assert_eq!(fast(&by_pair), None);
        // A Serialize impl's own error.
        struct Fails;
        impl Serialize for Fails {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("no"))
            }
        }
        assert_eq!(fast(&[Fails]), None);
        // serde_json's own specially serialised types.
        #[derive(Serialize)]
        #[serde(rename = "$serde_json::private::RawValue")]
        struct Raw {
            #[serde(rename = "$serde_json::private::RawValue")]
            json: &'static str,
        }
        assert_eq!(fast(&Raw { json: "{}" }), None);
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            "[\\x00-\\x7f]{0,24}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_json_value_is_written_as_serde_json_writes_it(value in json_value()) {
            same_as_serde_json(&value);
        }

        #[test]
        fn any_string_is_escaped_as_serde_json_escapes_it(s in any::<String>()) {
            same_as_serde_json(&s);
        }
    }
}
