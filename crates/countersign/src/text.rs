//! Text an agent wrote, made safe to show a person: the invisible format characters (bidirectional
//! overrides and isolates, zero-width characters, the byte-order mark) that can make a value look like
//! something other than the bytes that will be replayed. The dashboard shows each as a visible marker; the
//! CLI escapes them with the control characters.

/// Whether `c` is a format character that changes how text around it is drawn, or draws as nothing:
/// U+061C, U+180E, U+200B–U+200F, U+202A–U+202E, U+2060–U+2064, U+2066–U+2069 and U+FEFF.
pub fn is_hidden_format(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// `text` with each hidden format character shown as `⟨U+XXXX⟩`.
pub fn reveal(text: &str) -> String {
    if !text.chars().any(is_hidden_format) {
        return text.to_owned();
    }
    let mut shown = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if is_hidden_format(c) {
            shown.push_str(&format!("⟨U+{:04X}⟩", u32::from(c)));
        } else {
            shown.push(c);
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_and_zero_widths_show_as_markers_and_other_text_is_untouched() {
        assert_eq!(reveal("pay \u{202E}321\u{202C} to bob"), "pay ⟨U+202E⟩321⟨U+202C⟩ to bob");
        assert_eq!(reveal("a\u{200B}b\u{FEFF}"), "a⟨U+200B⟩b⟨U+FEFF⟩");
        assert_eq!(reveal("naïve — ok ✓ 東京"), "naïve — ok ✓ 東京");
    }
}
