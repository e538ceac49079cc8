//! Relaying the server's stderr: each line prefixed with the host, and the last few KiB kept for
//! error messages.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// A writer that prefixes every line with `PREFIX: ` and writes each complete line to the inner
/// writer with one `write_all` (so lines from several hosts sharing stderr do not interleave
/// mid-line). An unterminated last line is written, with a newline, on [`PrefixLines::finish`]
/// or drop.
pub struct PrefixLines<W: Write> {
    prefix: Vec<u8>,
    inner: W,
    partial: Vec<u8>,
}

/// A line longer than this is written out in pieces, each prefixed.
const MAX_LINE: usize = 64 * 1024;

impl<W: Write> PrefixLines<W> {
    /// Lines will start with `host: `.
    pub fn new(host: &str, inner: W) -> Self {
        PrefixLines {
            prefix: format!("{host}: ").into_bytes(),
            inner,
            partial: Vec::new(),
        }
    }

    /// Writes out a pending unterminated line.
    ///
    /// # Errors
    /// What writing to the inner writer returns.
    pub fn finish(&mut self) -> io::Result<()> {
        if !self.partial.is_empty() {
            self.partial.push(b'\n');
            self.emit()?;
        }
        self.inner.flush()
    }

    /// Writes the pending line (which ends in a newline) as a terminal can show it: what the
    /// server wrote is its text, so an escape sequence in it (a hostile server, a login script:
    /// a cursor move that forges a line, a title or clipboard write) is escaped
    /// ([`flip_manifest::text::printable`]), as bytes that are not UTF-8 are replaced.
    fn emit(&mut self) -> io::Result<()> {
        let body = match self.partial.last() {
            Some(b'\n') => &self.partial[..self.partial.len() - 1],
            _ => &self.partial[..],
        };
        // A CRLF line end (ssh writes its own messages so) is a line end; a carriage return
        // anywhere else is shown escaped (it could overwrite what the line showed before it).
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        let text = String::from_utf8_lossy(body);
        let shown = flip_manifest::text::printable(&text);
        let mut line = Vec::with_capacity(self.prefix.len() + shown.len() + 1);
        line.extend_from_slice(&self.prefix);
        line.extend_from_slice(shown.as_bytes());
        line.push(b'\n');
        self.partial.clear();
        self.inner.write_all(&line)
    }
}

impl<W: Write> Write for PrefixLines<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&rest[..=nl]);
            self.emit()?;
            rest = &rest[nl + 1..];
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > MAX_LINE {
            self.partial.push(b'\n');
            self.emit()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> Drop for PrefixLines<W> {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// The last bytes of a stream, shared between the relay and whoever reports errors.
#[derive(Clone, Default)]
pub(crate) struct Tail(Arc<Mutex<Vec<u8>>>);

pub(crate) const TAIL_BYTES: usize = 4096;

impl Tail {
    pub(crate) fn push(&self, data: &[u8]) {
        let mut tail = self.0.lock().unwrap_or_else(|e| e.into_inner());
        tail.extend_from_slice(data);
        if tail.len() > TAIL_BYTES {
            let cut = tail.len() - TAIL_BYTES;
            tail.drain(..cut);
        }
    }

    /// The kept text, lossily decoded and trimmed.
    pub(crate) fn text(&self) -> String {
        let tail = self.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&tail).trim().to_string()
    }
}

/// The relay: prefixes lines for the user's stderr and keeps the tail.
pub(crate) struct Relay {
    out: PrefixLines<Box<dyn Write + Send>>,
    pub(crate) tail: Tail,
}

impl Relay {
    pub(crate) fn new(host: &str, sink: Box<dyn Write + Send>) -> Self {
        Relay {
            out: PrefixLines::new(host, sink),
            tail: Tail::default(),
        }
    }

    /// Passes on a chunk of stderr. Failing to write our own stderr is not worth failing the
    /// deploy over, so errors are ignored.
    pub(crate) fn data(&mut self, data: &[u8]) {
        self.tail.push(data);
        self.show(data);
    }

    /// Passes on a chunk already kept in the tail (held back for a while: see
    /// `command::Gate`).
    pub(crate) fn show(&mut self, data: &[u8]) {
        let _ = self.out.write_all(data);
    }

    /// Flushes a pending unterminated line.
    pub(crate) fn finish(&mut self) {
        let _ = self.out.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crlf_line_end_is_a_line_end_and_a_lone_carriage_return_is_escaped() {
        let mut out = Vec::new();
        {
            let mut w = PrefixLines::new("web1", &mut out);
            w.write_all(b"ssh: Could not resolve hostname web1\r\nforged\rline\n")
                .unwrap();
        }
        let shown = String::from_utf8(out).unwrap();
        assert!(
            shown.starts_with("web1: ssh: Could not resolve hostname web1\nweb1: forged"),
            "{shown:?}"
        );
        assert!(!shown.contains('\r'), "{shown:?}");
    }

    #[test]
    fn prefixes_lines_across_chunks() {
        let mut out = Vec::new();
        {
            let mut w = PrefixLines::new("web1", &mut out);
            w.write_all(b"hel").unwrap();
            w.write_all(b"lo\nwor").unwrap();
            w.write_all(b"ld\n\nlast").unwrap();
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "web1: hello\nweb1: world\nweb1: \nweb1: last\n"
        );
    }

    /// What a server writes to stderr cannot move the cursor, clear the screen, set the
    /// title or forge a line of its own on the operator's terminal.
    #[test]
    fn escape_sequences_from_the_server_are_shown_escaped() {
        let mut out = Vec::new();
        {
            let mut w = PrefixLines::new("web1", &mut out);
            w.write_all(b"\x1b[2J\x1b]0;pwned\x07done\rweb1: deploy ok\xff\n")
                .unwrap();
            w.write_all("a\u{2028}b\u{202e}c".as_bytes()).unwrap();
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "web1: \\x1b[2J\\x1b]0;pwned\\x07done\\rweb1: deploy ok\u{fffd}\nweb1: a\\u{2028}b\\u{202e}c\n"
        );
    }

    #[test]
    fn tail_keeps_the_end() {
        let t = Tail::default();
        t.push(&vec![b'a'; 5000]);
        t.push(b"end\n");
        let text = t.text();
        assert!(text.ends_with("aend"));
        assert!(text.len() <= TAIL_BYTES);
    }
}
