//! The JSONL line forms: a bare JSON payload, or kcat's `-J` envelope.
//!
//! kcat writes one object per record: `topic`, `partition`, `offset`, then
//! `tstype` and `ts` when the record has a timestamp, `broker`, `headers` (a
//! flat `[name, value, …]` array whose values may be null), `key` and
//! `payload` (strings or null; null payload = tombstone). A line is an
//! envelope when it is an object with `topic`, `partition`, `offset` and
//! `payload` and no key outside that set; any other JSON is a bare payload.
//!
//! kcat writes key, payload and header bytes as they are, so a dump can hold
//! bytes that are not UTF-8 inside an envelope's strings: such a line is
//! still read as an envelope, its strings as bytes. A bare payload must be
//! valid JSON, hence UTF-8.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::event::{Event, Header, Position};

/// kcat's field names, in the order it writes them.
const KCAT_FIELDS: [&str; 9] = [
    "topic",
    "partition",
    "offset",
    "tstype",
    "ts",
    "broker",
    "headers",
    "key",
    "payload",
];

/// Decodes one line (without its newline). `fallback` is the position of a
/// bare line: the file's stream, partition 0, the line number.
pub fn decode_line(line: &[u8], fallback: &Position) -> Result<Event, String> {
    if let Err(e) = std::str::from_utf8(line) {
        return byte_envelope(line)
            .ok_or_else(|| format!("not valid UTF-8 (at byte {})", e.valid_up_to()));
    }
    let shape: Shape = serde_json::from_slice(line).map_err(|e| format!("not valid JSON: {e}"))?;
    match shape {
        Shape::Bare => Ok(Event {
            position: fallback.clone(),
            key: None,
            payload: Some(line.to_vec()),
            headers: Vec::new(),
            timestamp_ms: None,
        }),
        Shape::Envelope(fields) => {
            envelope_event(fields).map_err(|e| format!("kcat envelope: {e}"))
        }
    }
}

/// An envelope whose strings hold bytes that are not UTF-8, or `None` if
/// the line is not such an envelope.
fn byte_envelope(line: &[u8]) -> Option<Event> {
    let raw: RawEnvelope = serde_json::from_slice(line).ok()?;
    let bytes = |b: Option<RawBytes>| b.map(|b| b.0);
    let mut headers = Vec::new();
    let mut items = raw.headers.unwrap_or_default().into_iter();
    while let Some(name) = items.next() {
        let value = items.next()?;
        headers.push(Header {
            name: String::from_utf8(name?.0).ok()?,
            value: bytes(value),
        });
    }
    Some(Event {
        position: Position {
            stream: raw.topic,
            partition: i32::try_from(raw.partition).ok()?,
            offset: raw.offset,
        },
        key: bytes(raw.key),
        payload: bytes(raw.payload?),
        headers,
        timestamp_ms: raw.ts,
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvelope {
    topic: String,
    partition: i64,
    offset: i64,
    #[serde(default)]
    #[allow(dead_code)]
    tstype: Option<IgnoredAny>,
    #[serde(default)]
    ts: Option<i64>,
    #[serde(default)]
    #[allow(dead_code)]
    broker: Option<IgnoredAny>,
    #[serde(default)]
    headers: Option<Vec<Option<RawBytes>>>,
    #[serde(default)]
    key: Option<RawBytes>,
    /// Required: absent is `None`, null is `Some(None)`.
    #[serde(default, deserialize_with = "present")]
    payload: Option<Option<RawBytes>>,
}

fn present<'de, D: Deserializer<'de>, T: serde::Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A JSON string's bytes, without requiring UTF-8.
struct RawBytes(Vec<u8>);

impl<'de> serde::Deserialize<'de> for RawBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl Visitor<'_> for Bytes {
            type Value = RawBytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<RawBytes, E> {
                Ok(RawBytes(v.to_vec()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawBytes, E> {
                Ok(RawBytes(v.as_bytes().to_vec()))
            }
        }
        deserializer.deserialize_bytes(Bytes)
    }
}

enum Shape {
    Bare,
    Envelope(Box<[Option<Value>; 9]>),
}

fn envelope_event(fields: Box<[Option<Value>; 9]>) -> Result<Event, String> {
    {
        let [
            topic,
            partition,
            offset,
            _tstype,
            ts,
            _broker,
            headers,
            key,
            payload,
        ] = *fields;
        let topic = match topic {
            Some(Value::String(s)) => s,
            _ => return Err("`topic` must be a string".into()),
        };
        let int = |v: Option<Value>, name: &str| -> Result<Option<i64>, String> {
            match v {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => n
                    .as_i64()
                    .map(Some)
                    .ok_or_else(|| format!("`{name}` must be an integer")),
                Some(_) => Err(format!("`{name}` must be an integer")),
            }
        };
        let partition = int(partition, "partition")?.ok_or("`partition` must be an integer")?;
        let partition = i32::try_from(partition).map_err(|_| "`partition` is out of range")?;
        let offset = int(offset, "offset")?.ok_or("`offset` must be an integer")?;
        let timestamp_ms = int(ts, "ts")?;
        let bytes = |v: Option<Value>, name: &str| -> Result<Option<Vec<u8>>, String> {
            match v {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.into_bytes())),
                Some(_) => Err(format!("`{name}` must be a string or null")),
            }
        };
        let headers = match headers {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                if items.len() % 2 != 0 {
                    return Err("`headers` must be a flat [name, value, …] array".into());
                }
                let mut out = Vec::with_capacity(items.len() / 2);
                let mut items = items.into_iter();
                while let (Some(name), Some(value)) = (items.next(), items.next()) {
                    let Value::String(name) = name else {
                        return Err("header names must be strings".into());
                    };
                    out.push(Header {
                        name,
                        value: bytes(Some(value), "headers")?,
                    });
                }
                out
            }
            Some(_) => return Err("`headers` must be an array".into()),
        };
        Ok(Event {
            position: Position {
                stream: topic,
                partition,
                offset,
            },
            key: bytes(key, "key")?,
            payload: bytes(payload, "payload")?,
            headers,
            timestamp_ms,
        })
    }
}

impl<'de> serde::Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ShapeVisitor)
    }
}

struct ShapeVisitor;

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Shape, E> {
        Ok(Shape::Bare)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Shape, E> {
        Ok(Shape::Bare)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape::Bare)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::Bare)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Shape, E> {
        Ok(Shape::Bare)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Shape, E> {
        Ok(Shape::Bare)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Shape::Bare)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        let mut fields: Box<[Option<Value>; 9]> = Box::default();
        let mut foreign = false;
        while let Some(FieldIndex(key)) = map.next_key()? {
            match key {
                Some(i) if !foreign => fields[i] = Some(map.next_value()?),
                _ => {
                    foreign = true;
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let required = [0, 1, 2, 8].iter().all(|&i| fields[i].is_some());
        Ok(if required && !foreign {
            Shape::Envelope(fields)
        } else {
            Shape::Bare
        })
    }
}

/// A map key as the index of the kcat field it names (`None`: another
/// key), read without copying it: a bare line's keys are never kept, and
/// `Cow<str>` would own a copy of each (serde borrows only in derives).
struct FieldIndex(Option<usize>);

impl<'de> serde::Deserialize<'de> for FieldIndex {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = FieldIndex;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }

            fn visit_str<E: de::Error>(self, key: &str) -> Result<FieldIndex, E> {
                Ok(FieldIndex(KCAT_FIELDS.iter().position(|f| *f == key)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Appends `bytes` as a JSON string. Valid UTF-8 is escaped as JSON
/// requires; bytes that are not UTF-8 are written as they are, as kcat does,
/// so nothing is lost (such a line is not strict JSON, and says so by
/// failing strict parsers rather than by silently changing).
pub fn write_json_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // Runs of bytes that need no escape are copied whole: payloads are
    // mostly such runs between the quotes they hold.
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let control;
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => {
                control = [
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 15)],
                ];
                &control
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[run..i]);
        out.extend_from_slice(escape);
        run = i + 1;
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
}

fn write_opt_bytes(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(b) => write_json_bytes(out, b),
        None => out.extend_from_slice(b"null"),
    }
}

/// One record as [`append_line`] writes it, borrowed.
pub struct Line<'a, H> {
    pub stream: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    /// Header names and values, in order.
    pub headers: H,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
}

/// Appends one record as a kcat `-J` line (with its newline) to `out`.
pub fn append_line<'a, H>(out: &mut Vec<u8>, line: Line<'a, H>)
where
    H: IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
{
    use std::io::Write as _;
    out.extend_from_slice(b"{\"topic\":");
    write_json_bytes(out, line.stream.as_bytes());
    // Writing numbers into a `Vec` cannot fail.
    let _ = write!(
        out,
        ",\"partition\":{},\"offset\":{}",
        line.partition, line.offset
    );
    if let Some(ts) = line.timestamp_ms {
        let _ = write!(out, ",\"tstype\":\"create\",\"ts\":{ts}");
    }
    out.extend_from_slice(b",\"broker\":-1");
    let mut headers = line.headers.into_iter().peekable();
    if headers.peek().is_some() {
        out.extend_from_slice(b",\"headers\":[");
        for (i, (name, value)) in headers.enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json_bytes(out, name.as_bytes());
            out.push(b',');
            write_opt_bytes(out, value);
        }
        out.push(b']');
    }
    out.extend_from_slice(b",\"key\":");
    write_opt_bytes(out, line.key);
    out.extend_from_slice(b",\"payload\":");
    write_opt_bytes(out, line.payload);
    out.extend_from_slice(b"}\n");
}

/// One record as a kcat `-J` line (with its newline).
pub fn encode_line(
    position: &Position,
    timestamp_ms: Option<i64>,
    headers: &[Header],
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + payload.map_or(0, <[u8]>::len));
    append_line(
        &mut out,
        Line {
            stream: &position.stream,
            partition: position.partition,
            offset: position.offset,
            timestamp_ms,
            headers: headers
                .iter()
                .map(|h| (h.name.as_str(), h.value.as_deref())),
            key,
            payload,
        },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(line: i64) -> Position {
        Position {
            stream: "orders".into(),
            partition: 0,
            offset: line,
        }
    }

    /// What [`write_json_bytes`] must write: a byte at a time.
    fn escaped_slowly(bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![b'"'];
        for &b in bytes {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0x00..=0x1f => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
                _ => out.push(b),
            }
        }
        out.push(b'"');
        out
    }

    #[test]
    fn strings_are_escaped_as_a_byte_at_a_time_would() {
        let mut cases: Vec<Vec<u8>> = vec![Vec::new()];
        for b in 0..=255u8 {
            cases.extend([
                vec![b],
                vec![b, b'a'],
                vec![b'a', b],
                b"ab".iter().chain(&[b, b]).copied().collect(),
            ]);
        }
        // Longer strings, mostly plain with a few bytes to escape.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for len in 0..300 {
            let bytes = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if x.is_multiple_of(8) {
                        (x >> 8) as u8
                    } else {
                        b'a' + (x >> 8) as u8 % 26
                    }
                })
                .collect();
            cases.push(bytes);
        }
        for bytes in cases {
            let mut out = b"prefix".to_vec();
            write_json_bytes(&mut out, &bytes);
            assert_eq!(out[6..], escaped_slowly(&bytes), "{bytes:?}");
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let back: String = serde_json::from_slice(&out[6..]).unwrap();
                assert_eq!(back, text);
            }
        }
    }

    #[test]
    fn bare_payloads_keep_their_bytes() {
        let line = br#"{"type":"order_cancelled","order_id":"o-1"}"#;
        let event = decode_line(line, &at(3)).unwrap();
        assert_eq!(event.position, at(3));
        assert_eq!(event.payload.as_deref(), Some(&line[..]));
        assert_eq!(
            decode_line(b"42", &at(1)).unwrap().payload.as_deref(),
            Some(&b"42"[..])
        );
    }

    #[test]
    fn kcat_envelopes_are_unwrapped() {
        let line = br#"{"topic":"orders","partition":2,"offset":41,"tstype":"create","ts":1700000000000,"broker":1,"headers":["h1","v1","h2",null],"key":"o-1","payload":"{\"a\":1}"}"#;
        let event = decode_line(line, &at(1)).unwrap();
        assert_eq!(
            event.position,
            Position {
                stream: "orders".into(),
                partition: 2,
                offset: 41
            }
        );
        assert_eq!(event.timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(event.key.as_deref(), Some(&b"o-1"[..]));
        assert_eq!(event.payload.as_deref(), Some(&br#"{"a":1}"#[..]));
        assert_eq!(
            event.headers[1],
            Header {
                name: "h2".into(),
                value: None
            }
        );
    }

    #[test]
    fn escaped_keys_name_the_same_fields() {
        let line = br#"{"\u0074opic":"t","partition":0,"off\u0073et":5,"payload":"x"}"#;
        let event = decode_line(line, &at(1)).unwrap();
        assert_eq!(event.position.stream, "t");
        assert_eq!(event.position.offset, 5);
        assert_eq!(event.payload.as_deref(), Some(&b"x"[..]));
    }

    #[test]
    fn tombstones_and_foreign_keys() {
        let tomb = br#"{"topic":"t","partition":0,"offset":0,"key":null,"payload":null}"#;
        assert_eq!(decode_line(tomb, &at(1)).unwrap().payload, None);
        // An extra key makes it a bare payload that happens to look similar.
        let bare = br#"{"topic":"t","partition":0,"offset":0,"payload":null,"extra":1}"#;
        assert_eq!(decode_line(bare, &at(9)).unwrap().position, at(9));
    }

    #[test]
    fn malformed_lines_are_errors_not_panics() {
        assert!(
            decode_line(b"{\"type\":", &at(1))
                .unwrap_err()
                .contains("not valid JSON")
        );
        assert!(
            decode_line(&[0xff, 0xfe], &at(1))
                .unwrap_err()
                .contains("UTF-8")
        );
        let bad = br#"{"topic":"t","partition":"zero","offset":0,"payload":"x"}"#;
        assert!(decode_line(bad, &at(1)).unwrap_err().contains("partition"));
        let odd = br#"{"topic":"t","partition":0,"offset":0,"headers":["x"],"payload":"x"}"#;
        assert!(decode_line(odd, &at(1)).unwrap_err().contains("headers"));
    }

    #[test]
    fn envelopes_may_hold_bytes_that_are_not_utf8() {
        let position = at(4);
        let headers = vec![Header {
            name: "h".into(),
            value: Some(vec![0xc3, 0x28]),
        }];
        let line = encode_line(
            &position,
            None,
            &headers,
            Some(&[0xff]),
            Some(&[0xfe, b'"', 0]),
        );
        let event = decode_line(line.strip_suffix(b"\n").unwrap(), &at(1)).unwrap();
        assert_eq!(event.position, position);
        assert_eq!(event.headers, headers);
        assert_eq!(event.key.as_deref(), Some(&[0xff][..]));
        assert_eq!(event.payload.as_deref(), Some(&[0xfe, b'"', 0][..]));
        // Without the payload it is no envelope, and not UTF-8: malformed.
        let mut broken = b"{\"topic\":\"t\",\"partition\":0,\"offset\":0,\"key\":\"".to_vec();
        broken.extend_from_slice(&[0xff, b'"', b'}']);
        assert!(decode_line(&broken, &at(1)).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn encoded_lines_decode_to_the_same_record() {
        let position = Position {
            stream: "pay\"ments".into(),
            partition: 1,
            offset: 7,
        };
        let headers = vec![Header {
            name: "rewind-id".into(),
            value: Some(b"x/0/1/0".to_vec()),
        }];
        let line = encode_line(
            &position,
            Some(5),
            &headers,
            Some(b"k\n"),
            Some(b"{\"a\":\"\\u0001\"}"),
        );
        let event = decode_line(line.strip_suffix(b"\n").unwrap(), &at(1)).unwrap();
        assert_eq!(event.position, position);
        assert_eq!(event.headers, headers);
        assert_eq!(event.key.as_deref(), Some(&b"k\n"[..]));
        assert_eq!(event.payload.as_deref(), Some(&b"{\"a\":\"\\u0001\"}"[..]));
    }
}
