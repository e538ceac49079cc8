//! Names and messages from outside (file names, symlink targets, labels, a server's stderr)
//! as a terminal can show them: control characters and the characters a terminal shows as
//! nothing or elsewhere escaped, so no name can rewrite the operator's screen, forge a line or
//! pass for another name. Shared by the client's output and the transport's relay of a
//! server's stderr.

/// A path or symlink target as one line can show it: backslashes doubled, control characters
/// (a newline in a file name, ...) escaped as `\n`, `\t`, `\r` or `\xNN`, so a file name can
/// never start a line of its own in the itemized list.
pub fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    escaped(s, true)
}

/// A message for the terminal: control characters (an escape sequence or a newline in a file
/// name found on the target or in the source) escaped as `\n`, `\t`, `\r` or `\xNN`, and
/// characters that reorder, break or hide text (a right-to-left override, a line separator, a
/// zero-width space: [`hidden`]) as `\u{202e}`, so no name can rewrite the operator's screen,
/// forge a line or show its text in another order; backslashes are left as they are.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    escaped(s, false)
}

/// `s` with control characters as `\n`, `\t`, `\r` or `\xNN` (only C0 and C1 controls and DEL
/// are `is_control`: all below 0x100), characters that reorder, break or hide text as `\u{XXXX}`
/// ([`hidden`]), and backslashes doubled when `backslashes`.
fn escaped(s: &str, backslashes: bool) -> std::borrow::Cow<'_, str> {
    if !s
        .chars()
        .any(|c| (backslashes && c == '\\') || c.is_control() || hidden(c))
    {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' if backslashes => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if hidden(c) => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.into()
}

/// The characters a terminal shows as nothing or in the wrong place, escaped so a name reads
/// as the characters it holds: Unicode's Default_Ignorable_Code_Point set (DerivedCoreProperties
/// of the Unicode Character Database: what a renderer shows as nothing when it has no glyph),
/// which holds
/// - the characters that change the order text is shown in (Unicode's explicit directional
///   formatting characters, UAX #9: embeddings, overrides, isolates and the implicit marks): a
///   file name holding U+202E (right-to-left override) shows `invoice\u{202e}gnp.php` as
///   `invoicephp.png` (the "Trojan Source" trick, CVE-2021-42574);
/// - the invisible ones: zero-width space and joiners, word joiner, invisible operators, the
///   byte order mark, the soft hyphen, the Hangul fillers, variation selectors, the tag
///   characters: `config\u{200b}.php` is not `config.php`, though it shows as it;
///
/// and besides the line and paragraph separators U+2028 and U+2029, which some terminals and
/// log viewers break lines at, and the interlinear annotation marks U+FFF9–U+FFFB. Text that
/// needs a joiner (an emoji sequence, some Persian or Indic names) shows it escaped: a name is
/// told apart from another before it is pretty.
pub fn hidden(c: char) -> bool {
    matches!(
        c,
        '\u{00ad}'
            | '\u{034f}'
            | '\u{061c}'
            | '\u{115f}'..='\u{1160}'
            | '\u{17b4}'..='\u{17b5}'
            | '\u{180b}'..='\u{180f}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}'
            | '\u{3164}'
            | '\u{fe00}'..='\u{fe0f}'
            | '\u{feff}'
            | '\u{ffa0}'
            | '\u{fff0}'..='\u{fffb}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0000}'..='\u{e0fff}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_reorder_what_the_terminal_shows() {
        assert_eq!(
            printable("invoice\u{202e}gnp.php"),
            "invoice\\u{202e}gnp.php"
        );
        assert_eq!(
            escape("a\u{2066}b\u{2069}\u{200f}\u{61c}\\"),
            "a\\u{2066}b\\u{2069}\\u{200f}\\u{061c}\\\\"
        );
        // Right-to-left text itself is shown as it is.
        assert_eq!(printable("שלום.php"), "שלום.php");
    }

    #[test]
    fn names_cannot_hide_characters_or_break_lines() {
        assert_eq!(printable("config\u{200b}.php"), "config\\u{200b}.php");
        assert_eq!(
            printable("a\u{2028}b\u{2029}c\u{feff}d\u{ad}e\u{2060}"),
            "a\\u{2028}b\\u{2029}c\\u{feff}d\\u{00ad}e\\u{2060}"
        );
        assert_eq!(printable("tag\u{e0041}"), "tag\\u{e0041}");
        assert_eq!(
            printable("\u{3164}\u{115f}x\u{fe0f}\u{e0100}"),
            "\\u{3164}\\u{115f}x\\u{fe0f}\\u{e0100}"
        );
        // Letters of any script, accents and emoji show.
        assert_eq!(printable("café-日本-❤.php"), "café-日本-❤.php");
    }
}
