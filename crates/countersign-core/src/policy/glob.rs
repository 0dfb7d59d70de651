//! Globs compiled for matching speed: the same language and answers as `NameGlob::matches` (`*` matches any
//! run of characters, dots included), without backtracking.
//!
//! A glob `P0*P1*…*Pk` matches a name that starts with `P0`, ends with `Pk`, and contains `P1 … Pk-1` in
//! order, without overlap, in between; finding each middle piece at its leftmost occurrence is enough, so
//! matching is a prefix check, a suffix check and a few substring searches. This module keeps the original
//! `NameGlob` for display and indexing; it does not parse or validate globs.

use std::fmt;

use crate::capability::NameGlob;

#[derive(Debug, Clone)]
pub(crate) struct Glob {
    original: NameGlob,
    shape: Shape,
}

#[derive(Debug, Clone)]
enum Shape {
    Literal,
    Wildcard { prefix: String, middle: Vec<String>, suffix: String },
}

impl Glob {
    pub fn new(original: NameGlob) -> Self {
        let shape = if original.is_literal() {
            Shape::Literal
        } else {
            let mut pieces: Vec<&str> = original.as_str().split('*').collect();
            // At least one `*`, so at least two pieces: the first is the prefix, the last the suffix.
            let suffix = pieces.pop().unwrap_or_default().to_owned();
            let prefix = if pieces.is_empty() { String::new() } else { pieces.remove(0).to_owned() };
            let middle = pieces.into_iter().filter(|p| !p.is_empty()).map(str::to_owned).collect();
            Shape::Wildcard { prefix, middle, suffix }
        };
        Self { original, shape }
    }

    pub fn as_name_glob(&self) -> &NameGlob {
        &self.original
    }

    pub fn matches(&self, name: &str) -> bool {
        match &self.shape {
            Shape::Literal => name == self.original.as_str(),
            Shape::Wildcard { prefix, middle, suffix } => {
                let Some(rest) = name.strip_prefix(prefix.as_str()) else {
                    return false;
                };
                let Some(mut rest) = rest.strip_suffix(suffix.as_str()) else {
                    return false;
                };
                for piece in middle {
                    match find(rest, piece).and_then(|at| rest.get(at + piece.len()..)) {
                        Some(after) => rest = after,
                        None => return false,
                    }
                }
                true
            }
        }
    }
}

/// Leftmost occurrence of `needle` in `haystack`. Names and pieces are short (tens of bytes), where a plain
/// scan beats `str::find`'s searcher set-up. A match of a whole UTF-8 sequence always starts on a character
/// boundary, so the offset can slice `haystack`.
fn find(haystack: &str, needle: &str) -> Option<usize> {
    let needle = needle.as_bytes();
    let first = *needle.first()?;
    let bytes = haystack.as_bytes();
    let last_start = bytes.len().checked_sub(needle.len())?;
    (0..=last_start).find(|&at| bytes.get(at) == Some(&first) && bytes.get(at..at + needle.len()) == Some(needle))
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.original, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Differential test: on every pattern and name over a small alphabet, the compiled glob answers what
    /// `NameGlob::matches` answers.
    #[test]
    fn agrees_with_name_glob_everywhere() {
        let alphabet = ['a', 'b', '.', '*'];
        let mut patterns = vec![String::new()];
        for _ in 0..5 {
            let longer: Vec<String> =
                patterns.iter().flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}"))).collect();
            patterns.extend(longer);
        }
        patterns.sort();
        patterns.dedup();
        let names: Vec<String> = patterns.iter().filter(|p| !p.contains('*')).cloned().collect();
        let mut compared = 0;
        for pattern in &patterns {
            let Ok(glob) = NameGlob::parse(pattern) else {
                continue;
            };
            let compiled = Glob::new(glob.clone());
            for name in &names {
                assert_eq!(compiled.matches(name), glob.matches(name), "{pattern} vs {name}");
                compared += 1;
            }
        }
        assert!(compared > 100_000, "{compared}");
    }
}
