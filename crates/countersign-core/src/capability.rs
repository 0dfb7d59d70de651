//! Capability names (`domain.verb.entity`) and the globs that match them.
//!
//! Parsing happens here, once, at the edge: a `Capability` always holds a valid name, so nothing downstream
//! re-checks it. This module does not know about policies or scopes; those build on `NameGlob`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a capability name or glob was refused. The text is shown to the agent developer as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CapabilityError(String);

fn valid_part(part: &str) -> bool {
    !part.is_empty() && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A capability name such as `finance.issue.card`: three or more dot-separated parts, each `[a-z0-9_-]+`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Capability(String);

impl Capability {
    pub fn parse(text: &str) -> Result<Self, CapabilityError> {
        let parts: Vec<&str> = text.split('.').collect();
        if parts.len() < 3 {
            return Err(CapabilityError(format!(
                "capability `{text}` must have the form domain.verb.entity (three or more dot-separated parts)"
            )));
        }
        if let Some(bad) = parts.iter().find(|p| !valid_part(p)) {
            return Err(CapabilityError(format!(
                "capability `{text}` has an invalid part `{bad}`: each part is one or more of a-z, 0-9, _ and -"
            )));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first part of the name, which policies call the domain.
    pub fn domain(&self) -> &str {
        self.0.split('.').next().unwrap_or_default()
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Capability {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Capability::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A glob over names: `*` matches any run of characters (dots included), everything else is literal.
/// Used for capability patterns (`finance.*`, `*.delete.*`), agent-name patterns and model names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct NameGlob(String);

impl NameGlob {
    /// Accepts any non-empty pattern made of name characters, dots and `*`.
    pub fn parse(text: &str) -> Result<Self, CapabilityError> {
        if text.is_empty() {
            return Err(CapabilityError("a glob must not be empty".into()));
        }
        if let Some(c) =
            text.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '*' | ':' | '/')))
        {
            return Err(CapabilityError(format!(
                "glob `{text}` contains `{c}`: only letters, digits, `.`, `_`, `-`, `:`, `/` and `*` are allowed"
            )));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The literal text before the first `*`.
    pub fn literal_prefix(&self) -> &str {
        self.0.split('*').next().unwrap_or_default()
    }

    pub fn is_literal(&self) -> bool {
        !self.0.contains('*')
    }

    pub fn matches(&self, name: &str) -> bool {
        glob_match(self.0.as_bytes(), name.as_bytes())
    }

    /// True when every name this glob matches is also matched by `wider` (used to keep session scopes no
    /// wider than the caller's). Conservative: answers false when it cannot tell.
    pub fn is_within(&self, wider: &NameGlob) -> bool {
        if wider.0 == "*" || wider.0 == self.0 {
            return true;
        }
        // A literal is within any glob that matches it; a glob is within a wider glob when the wider one
        // is a literal prefix followed by a single trailing `*` that covers this glob's text.
        if self.is_literal() {
            return wider.matches(&self.0);
        }
        match wider.0.strip_suffix('*') {
            Some(prefix) if !prefix.contains('*') => self.0.starts_with(prefix),
            _ => false,
        }
    }
}

impl<'de> Deserialize<'de> for NameGlob {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        NameGlob::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for NameGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Iterative wildcard match with backtracking to the last `*`: linear in practice, no recursion.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names() {
        for ok in ["finance.issue.card", "llm.chat.completion", "a-b.c_d.e1", "mcp.server.tool.x"] {
            assert!(Capability::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "finance", "finance.issue", "Finance.issue.card", "a..b", "a.b.c d", "a.b.*"] {
            assert!(Capability::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Capability::parse("finance.issue.card").map(|c| c.domain().to_owned()), Ok("finance".to_owned()));
    }

    #[test]
    fn globs() {
        let cases = [
            ("finance.*", "finance.issue.card", true),
            ("finance.*", "financial.issue.card", false),
            ("*.delete.*", "db.delete.row", true),
            ("*.delete.*", "db.remove.row", false),
            ("*", "anything.at.all", true),
            ("deploy-bot", "deploy-bot", true),
            ("deploy-*", "deploy-bot", true),
            ("gpt-4*", "gpt-4o", true),
            ("gpt-4", "gpt-4o", false),
        ];
        for (pattern, name, expected) in cases {
            let glob = NameGlob::parse(pattern).map_err(|e| e.to_string());
            assert_eq!(glob.map(|g| g.matches(name)), Ok(expected), "{pattern} vs {name}");
        }
    }

    #[test]
    fn scope_narrowing() {
        let g = |s: &str| NameGlob::parse(s).map_err(|e| e.to_string());
        let within = |a: &str, b: &str| Ok::<bool, String>(g(a)?.is_within(&g(b)?));
        assert_eq!(within("finance.*", "*"), Ok(true));
        assert_eq!(within("finance.issue.*", "finance.*"), Ok(true));
        assert_eq!(within("finance.issue.card", "finance.*"), Ok(true));
        assert_eq!(within("*", "finance.*"), Ok(false));
        assert_eq!(within("email.*", "finance.*"), Ok(false));
    }
}
