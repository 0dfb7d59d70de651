//! Text an agent wrote, made safe to show a person: the invisible format characters (bidirectional
//! overrides and isolates, zero-width characters, the byte-order mark) that can make a value look like
//! something other than the bytes that will be replayed. The dashboard shows each as a visible marker; the
//! CLI escapes them with the control characters.

/// Whether `c` changes how the text around it is drawn, or draws as nothing: the bidi controls and Unicode's
/// default-ignorable code points (soft hyphen, zero widths including the joiners, variation selectors,
/// Hangul fillers, interlinear annotation marks, tag characters, which can carry a hidden message to a
/// model, and the blocks reserved as ignorable). The joiners are marked too, so emoji sequences and some
/// scripts show markers: an approver seeing more than was drawn is the safe side.
pub fn is_hidden_format(c: char) -> bool {
    matches!(c, '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}'
        | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}' | '\u{FFF0}'..='\u{FFFB}'
        | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E0FFF}')
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
        // Tag characters can spell a message no one sees.
        assert_eq!(reveal("ok\u{E0041}\u{E0042}"), "ok⟨U+E0041⟩⟨U+E0042⟩");
        assert_eq!(reveal("soft\u{00AD}hyphen\u{FE0F}"), "soft⟨U+00AD⟩hyphen⟨U+FE0F⟩");
        assert_eq!(reveal("naïve — ok ✓ 東京"), "naïve — ok ✓ 東京");
    }
}
