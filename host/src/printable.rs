//! Text that came from a guest or an input, made safe to print on a
//! terminal: a processor's log line or a dead letter's bytes must not be able
//! to move the cursor, retitle the window or clear the screen.

use std::borrow::Cow;
use std::fmt::Write as _;

/// `bytes` as text a terminal shows as-is: valid UTF-8 stays (non-ASCII
/// letters included), control characters are escaped Rust-style (`\n`,
/// `\u{1b}`) and bytes that are not UTF-8 are shown as `\xNN`. Borrowed when
/// there is nothing to escape.
pub fn printable(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.chars().any(char::is_control) => Cow::Borrowed(text),
        _ => {
            let mut out = String::with_capacity(bytes.len() + 8);
            for chunk in bytes.utf8_chunks() {
                for c in chunk.valid().chars() {
                    if c.is_control() {
                        out.extend(c.escape_default());
                    } else {
                        out.push(c);
                    }
                }
                for b in chunk.invalid() {
                    let _ = write!(out, "\\x{b:02x}");
                }
            }
            Cow::Owned(out)
        }
    }
}

/// [`printable`] for a `str`.
pub fn printable_str(text: &str) -> Cow<'_, str> {
    printable(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_and_everything_else_is_escaped() {
        assert!(matches!(
            printable("payé 42".as_bytes()),
            Cow::Borrowed("payé 42")
        ));
        assert_eq!(
            printable(b"\x1b]0;owned\x07\x1b[2J"),
            "\\u{1b}]0;owned\\u{7}\\u{1b}[2J"
        );
        assert_eq!(printable(b"a\tb\r\nc\x7f"), "a\\tb\\r\\nc\\u{7f}");
        assert_eq!(printable(b"ok \xff\xfe \xc3\xa9"), "ok \\xff\\xfe é");
        // C1 controls (U+0080..U+009F) are escaped too: some terminals obey them.
        assert_eq!(printable_str("\u{9b}2J"), "\\u{9b}2J");
        assert_eq!(printable(b""), "");
    }
}
