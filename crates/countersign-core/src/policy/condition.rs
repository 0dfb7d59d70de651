//! A rule's conditions, compiled, and the check of one action against them.
//!
//! Every check is total: whatever JSON the action carries, a condition either holds or does not, and a field
//! that is absent or of the wrong type simply does not match. Nothing here allocates on the matching path
//! except the list of parameter strings for `content_patterns`, which is built once per action, lazily.
//! Describing why a condition held or failed (for explanations) is separate and only runs when asked.
//! This module does not order rules or pick a winner (see `index` and `Policy::evaluate`).

use std::cell::OnceCell;

use regex::RegexSet;
use serde_json::Value as Json;

use super::glob::Glob;
use super::spec::{ParamPath, ParamTest};

/// What conditions read about one action, and what is worked out from it lazily (the parameter strings,
/// and which content patterns match them), so that many rules share one scan.
pub(crate) struct Subject<'a> {
    pub agent: &'a str,
    pub capability: &'a str,
    pub params: &'a Json,
    pub prior_successes: u64,
    pub risk_score: f64,
    content_groups: &'a [ContentGroup],
    strings: OnceCell<Vec<&'a str>>,
    /// Per content group: a bit set of its patterns that match some parameter string.
    content_hits: OnceCell<Vec<OnceCell<Vec<u64>>>>,
}

impl<'a> Subject<'a> {
    pub fn new(
        agent: &'a str,
        capability: &'a str,
        params: &'a Json,
        prior_successes: u64,
        risk_score: f64,
        content_groups: &'a [ContentGroup],
    ) -> Self {
        Self {
            agent,
            capability,
            params,
            prior_successes,
            risk_score,
            content_groups,
            strings: OnceCell::new(),
            content_hits: OnceCell::new(),
        }
    }

    fn first_use(&self) -> bool {
        self.prior_successes == 0
    }

    /// Whether a model request's prompt or input is given (partly) as token ids, which OpenAI's completions
    /// and embeddings accept (`prompt`/`input`: integers, or arrays of them) and which no content pattern can
    /// read. Like a number its parsers disagree on, such text meets the content patterns of a rule that denies
    /// or holds, and none of one that allows: unreadable text can neither slip a restriction nor win an
    /// allowance. Only model requests (`llm.*`, whose params are the provider request body) are read so.
    fn has_token_ids(&self) -> bool {
        self.capability.starts_with("llm.")
            && ["prompt", "input"].iter().filter_map(|field| self.params.get(*field)?.as_array()).any(|items| {
                items.iter().any(|item| match item {
                    Json::Number(_) => true,
                    Json::Array(inner) => inner.iter().any(Json::is_number),
                    _ => false,
                })
            })
    }

    /// Whether a model request carries documents or files the model reads and no content pattern can (a PDF
    /// given inline, a file by id, a document by URL): the LLM proxy lists them in `params.unreadable`. Taken
    /// as token ids are: meeting the content patterns of a rule that denies or holds, so a sentence cannot slip
    /// a restriction by arriving inside a PDF. Images are not listed.
    fn has_unreadable_documents(&self) -> bool {
        self.capability.starts_with("llm.")
            && self.params.get("unreadable").and_then(Json::as_array).is_some_and(|items| !items.is_empty())
    }

    /// Text a content pattern cannot read: token ids or documents.
    fn has_unreadable_text(&self) -> bool {
        self.has_token_ids() || self.has_unreadable_documents()
    }

    /// Every string value in `params`, at any depth, never keys; collected on first use.
    fn strings(&self) -> &[&'a str] {
        self.strings.get_or_init(|| collect_strings(self.params))
    }

    /// Which patterns of content group `group` match any parameter string; scanned once per action.
    /// `None` only if the group does not exist (a compiler bug, which the caller turns into a deny).
    fn content_hits(&self, group: usize) -> Option<&[u64]> {
        let cells = self.content_hits.get_or_init(|| self.content_groups.iter().map(|_| OnceCell::new()).collect());
        let set = &self.content_groups.get(group)?.set;
        let hits = cells.get(group)?.get_or_init(|| {
            let mut bits = vec![0u64; set.len().div_ceil(64)];
            for text in self.strings() {
                for pattern in set.matches(text).iter() {
                    if let Some(word) = bits.get_mut(pattern / 64) {
                        *word |= 1 << (pattern % 64);
                    }
                }
            }
            bits
        });
        Some(hits)
    }
}

/// Iterative (not recursive) so that no nesting depth of caller-supplied JSON can exhaust the stack.
fn collect_strings(root: &Json) -> Vec<&str> {
    let mut strings = Vec::new();
    let mut stack = vec![root];
    while let Some(value) = stack.pop() {
        match value {
            Json::String(text) => strings.push(text.as_str()),
            Json::Array(items) => stack.extend(items.iter()),
            Json::Object(entries) => stack.extend(entries.values()),
            Json::Null | Json::Bool(_) | Json::Number(_) => {}
        }
    }
    strings
}

/// Case-insensitive content patterns of several rules compiled into one set, so that one scan of an
/// action's strings answers all of them. The compiler packs the rules of one index bucket together.
pub(crate) struct ContentGroup {
    pub set: RegexSet,
}

/// A rule's `content_patterns`: patterns `first..first + sources.len()` of content group `group`.
pub(crate) struct ContentMatcher {
    pub sources: Vec<String>,
    pub group: usize,
    pub first: usize,
}

impl ContentMatcher {
    /// The index (into `sources`) of the first of this rule's patterns that matched, if any.
    fn first_hit(&self, subject: &Subject<'_>) -> Result<Option<usize>, Miss> {
        let hits = subject.content_hits(self.group).ok_or(Miss::Broken)?;
        Ok((0..self.sources.len()).find(|offset| {
            let bit = self.first + offset;
            hits.get(bit / 64).is_some_and(|word| word & (1 << (bit % 64)) != 0)
        }))
    }
}

/// One parameter path and the comparisons that must all hold on it.
pub(crate) struct ParamCondition {
    pub path: ParamPath,
    pub tests: Vec<ParamTest>,
}

/// A rule's compiled conditions. `None` / empty means "not a condition of this rule".
#[derive(Default)]
pub(crate) struct Conditions {
    pub capability: Option<Vec<Glob>>,
    pub agent: Option<Vec<Glob>>,
    pub first_use: Option<bool>,
    pub risk_at_least: Option<f64>,
    pub max_tokens_threshold: Option<u64>,
    pub models: Option<Vec<Glob>>,
    pub params: Vec<ParamCondition>,
    pub content: Option<ContentMatcher>,
}

/// The first condition that did not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Miss {
    Capability,
    Agent,
    FirstUse,
    Risk,
    MaxTokens,
    Models,
    Param(usize),
    Content,
    /// Not a condition that failed: the compiled policy is inconsistent. Evaluation denies.
    Broken,
}

const TOKEN_FIELDS: [&str; 2] = ["max_tokens", "max_completion_tokens"];

impl Conditions {
    /// True when the rule has a capability condition and nothing else, or no condition at all.
    pub fn is_pin(&self) -> bool {
        self.agent.is_none()
            && self.first_use.is_none()
            && self.risk_at_least.is_none()
            && self.max_tokens_threshold.is_none()
            && self.models.is_none()
            && self.params.is_empty()
            && self.content.is_none()
    }

    /// Checks the conditions cheapest first; answers the first that fails. `restrictive`: the rule denies or
    /// holds for approval, so a value whose number parsers disagree on meets its comparisons (see
    /// [`Reading`]); for a rule that allows, it meets none.
    pub fn check(&self, subject: &Subject<'_>, restrictive: bool) -> Result<(), Miss> {
        if let Some(globs) = &self.capability
            && !globs.iter().any(|g| g.matches(subject.capability))
        {
            return Err(Miss::Capability);
        }
        if let Some(globs) = &self.agent
            && !globs.iter().any(|g| g.matches(subject.agent))
        {
            return Err(Miss::Agent);
        }
        if let Some(first_use) = self.first_use
            && first_use != subject.first_use()
        {
            return Err(Miss::FirstUse);
        }
        if let Some(threshold) = self.risk_at_least
            && subject.risk_score < threshold
        {
            return Err(Miss::Risk);
        }
        if let Some(threshold) = self.max_tokens_threshold
            && requested_tokens_above(subject.params, threshold, restrictive).is_none()
        {
            return Err(Miss::MaxTokens);
        }
        if let Some(globs) = &self.models {
            let model = subject.params.get("model").and_then(Json::as_str);
            if !model.is_some_and(|m| globs.iter().any(|g| g.matches(m))) {
                return Err(Miss::Models);
            }
        }
        for (index, condition) in self.params.iter().enumerate() {
            let holds = lookup(subject.params, &condition.path.segments)
                .is_some_and(|value| condition.tests.iter().all(|t| test_holds(t, value, restrictive)));
            if !holds {
                return Err(Miss::Param(index));
            }
        }
        if let Some(content) = &self.content
            && content.first_hit(subject)?.is_none()
            && !(restrictive && subject.has_unreadable_text())
        {
            return Err(Miss::Content);
        }
        Ok(())
    }

    /// One phrase per condition saying why it held. Call only after `check` answered `Ok`.
    pub fn describe_match(&self, subject: &Subject<'_>) -> Vec<String> {
        let mut reasons = Vec::new();
        if let Some(globs) = &self.capability {
            reasons.push(match globs.iter().find(|g| g.matches(subject.capability)) {
                Some(glob) => format!("capability `{}` matches `{glob}`", subject.capability),
                None => format!("capability `{}` matches", subject.capability),
            });
        }
        if let Some(globs) = &self.agent {
            reasons.push(match globs.iter().find(|g| g.matches(subject.agent)) {
                Some(glob) => format!("agent `{}` matches `{glob}`", subject.agent),
                None => format!("agent `{}` matches", subject.agent),
            });
        }
        if let Some(first_use) = self.first_use {
            reasons.push(if first_use {
                "first use: this agent has never had this capability succeed".to_owned()
            } else {
                format!("not first use: {} earlier successes", subject.prior_successes)
            });
        }
        if let Some(threshold) = self.risk_at_least {
            reasons.push(format!("risk score {:.2} is at least {threshold}", subject.risk_score));
        }
        if let Some(threshold) = self.max_tokens_threshold
            && let Some((field, requested)) = requested_tokens_above(subject.params, threshold, true)
        {
            reasons.push(format!("requested {field} {requested} is above {threshold}"));
        }
        if let Some(globs) = &self.models
            && let Some(model) = subject.params.get("model").and_then(Json::as_str)
        {
            match globs.iter().find(|g| g.matches(model)) {
                Some(glob) => reasons.push(format!("model `{model}` matches `{glob}`")),
                None => reasons.push(format!("model `{model}` matches")),
            }
        }
        for condition in &self.params {
            if let Some(value) = lookup(subject.params, &condition.path.segments) {
                reasons.push(format!(
                    "params.{} = {} ({})",
                    condition.path.text,
                    short_json(value),
                    describe_tests(&condition.tests)
                ));
            }
        }
        if let Some(content) = &self.content {
            match content.first_hit(subject).ok().flatten().and_then(|index| content.sources.get(index)) {
                Some(pattern) => reasons.push(format!("parameter text matches content pattern `{pattern}`")),
                None if subject.has_token_ids() => reasons.push(
                    "the prompt is given as token ids, which content patterns cannot read: a rule that denies or \
                     holds takes it as matching"
                        .to_owned(),
                ),
                None if subject.has_unreadable_documents() => reasons.push(
                    "the request carries documents or files content patterns cannot read (params.unreadable): a \
                     rule that denies or holds takes them as matching"
                        .to_owned(),
                ),
                None => reasons.push("parameter text matches a content pattern".to_owned()),
            }
        }
        if reasons.is_empty() {
            reasons.push("the rule has no conditions".to_owned());
        }
        reasons
    }

    /// Says why the condition `miss` did not hold for this action.
    pub fn describe_miss(&self, miss: Miss, subject: &Subject<'_>) -> String {
        match miss {
            Miss::Capability => format!(
                "capability `{}` does not match {}",
                subject.capability,
                list_globs(self.capability.as_deref().unwrap_or_default())
            ),
            Miss::Agent => format!(
                "agent `{}` does not match {}",
                subject.agent,
                list_globs(self.agent.as_deref().unwrap_or_default())
            ),
            Miss::FirstUse => {
                if subject.first_use() {
                    "the rule wants earlier successes, and this is the first use".to_owned()
                } else {
                    format!("the rule wants a first use, and there were {} earlier successes", subject.prior_successes)
                }
            }
            Miss::Risk => {
                format!("risk score {:.2} is below {}", subject.risk_score, self.risk_at_least.unwrap_or_default())
            }
            Miss::MaxTokens => {
                let threshold = self.max_tokens_threshold.unwrap_or_default();
                match TOKEN_FIELDS.iter().find_map(|f| subject.params.get(*f).map(|v| (*f, v))) {
                    Some((field, value)) => format!("requested {field} {} is not above {threshold}", short_json(value)),
                    None => "params has no max_tokens or max_completion_tokens".to_owned(),
                }
            }
            Miss::Models => match subject.params.get("model") {
                Some(Json::String(model)) => {
                    format!("model `{model}` is not in {}", list_globs(self.models.as_deref().unwrap_or_default()))
                }
                Some(other) => format!("params.model is {}, not a model name", short_json(other)),
                None => "params has no model".to_owned(),
            },
            Miss::Param(index) => match self.params.get(index) {
                Some(condition) => match lookup(subject.params, &condition.path.segments) {
                    None => format!("params.{} is absent", condition.path.text),
                    Some(value) => format!(
                        "params.{} = {} fails {}",
                        condition.path.text,
                        short_json(value),
                        describe_tests(&condition.tests)
                    ),
                },
                None => "a parameter condition does not hold".to_owned(),
            },
            Miss::Content => "no string in params matches the content patterns".to_owned(),
            Miss::Broken => "the compiled policy is inconsistent".to_owned(),
        }
    }
}

/// The first token-limit field above the threshold, with its value (`restrictive` as for [`Conditions::check`]).
fn requested_tokens_above(params: &Json, threshold: u64, restrictive: bool) -> Option<(&'static str, String)> {
    TOKEN_FIELDS.iter().find_map(|field| {
        let value = params.get(*field)?;
        let above = match (value.as_u64(), reading(value)) {
            (Some(requested), _) => requested > threshold,
            // Floats (and negative numbers) compare as f64; precision loss near 2^53 is irrelevant here.
            #[allow(clippy::cast_precision_loss)]
            (None, Reading::Number(requested)) => requested > threshold as f64,
            (None, Reading::Ambiguous) => restrictive,
            (None, Reading::NotANumber) => false,
        };
        above.then(|| (*field, value.to_string()))
    })
}

/// Follows a dotted path through objects (and arrays, for numeric segments).
pub(crate) fn lookup<'v>(params: &'v Json, segments: &[String]) -> Option<&'v Json> {
    let mut current = params;
    for segment in segments {
        current = match current {
            Json::Object(entries) => entries.get(segment)?,
            Json::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current)
}

/// How a comparison reads a value.
enum Reading {
    /// A JSON number, or a string every number parser reads the same way: an optional sign, digits, and
    /// at most one `.` (`"999999"`, `" +12.5 "`, `"6000."`, `".5"`). Many upstreams (form-encoded ones,
    /// say) take amounts as strings, and a `deny` on `amount > 5000` must not be slipped by quoting it.
    Number(f64),
    /// A string that some parsers read as a number and others do not, or read differently: an exponent
    /// (`"6e3"`: 6000 or 6), `"Infinity"`, `"1_000"`, `"0x10"`, other scripts' digits. Which number the
    /// upstream will see is unknown, so it meets the comparisons of a rule that denies or holds, and none
    /// of a rule that allows: it can never win an allow, nor slip a restriction.
    Ambiguous,
    /// No number at all: `"apples"`, `true`, `null`, objects.
    NotANumber,
}

fn reading(value: &Json) -> Reading {
    let text = match value {
        Json::Number(number) => return number.as_f64().map_or(Reading::NotANumber, Reading::Number),
        Json::String(text) => text.trim(),
        _ => return Reading::NotANumber,
    };
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    let digits_and_one_dot = unsigned.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && unsigned.bytes().filter(|b| *b == b'.').count() <= 1
        && unsigned.bytes().any(|b| b.is_ascii_digit());
    if digits_and_one_dot {
        // Too long for an f64: infinity, which every comparison reads the right way round.
        return text.parse::<f64>().map_or(Reading::Ambiguous, Reading::Number);
    }
    let lower = unsigned.to_ascii_lowercase();
    if text.chars().any(char::is_numeric) || matches!(lower.as_str(), "inf" | "infinity" | "nan") {
        Reading::Ambiguous
    } else {
        Reading::NotANumber
    }
}

fn test_holds(test: &ParamTest, value: &Json, restrictive: bool) -> bool {
    let compare = |holds: &dyn Fn(f64) -> bool| match reading(value) {
        Reading::Number(number) => holds(number),
        Reading::Ambiguous => restrictive,
        Reading::NotANumber => false,
    };
    match test {
        ParamTest::Eq(expected) => json_eq(value, expected),
        ParamTest::Ne(expected) => same_kind(value, expected) && !json_eq(value, expected),
        ParamTest::Gt(limit) => compare(&|v| v > *limit),
        ParamTest::Gte(limit) => compare(&|v| v >= *limit),
        ParamTest::Lt(limit) => compare(&|v| v < *limit),
        ParamTest::Lte(limit) => compare(&|v| v <= *limit),
        ParamTest::In(options) => options.iter().any(|option| json_eq(value, option)),
        ParamTest::Matches(pattern) => value.as_str().is_some_and(|text| pattern.regex.is_match(text)),
    }
}

/// Equality where numbers compare by value (`5000` equals `5000.0`) and everything else structurally.
fn json_eq(left: &Json, right: &Json) -> bool {
    match (left, right) {
        (Json::Number(a), Json::Number(b)) => {
            let exact = |n: &serde_json::Number| n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from));
            match (exact(a), exact(b)) {
                (Some(x), Some(y)) => x == y,
                _ => a.as_f64() == b.as_f64(),
            }
        }
        _ => left == right,
    }
}

fn same_kind(left: &Json, right: &Json) -> bool {
    std::mem::discriminant(left) == std::mem::discriminant(right)
}

fn describe_tests(tests: &[ParamTest]) -> String {
    tests.iter().map(|t| format!("{} {}", t.operator(), short_json(&t.operand_json()))).collect::<Vec<_>>().join(", ")
}

fn list_globs(globs: &[Glob]) -> String {
    globs.iter().map(|g| format!("`{g}`")).collect::<Vec<_>>().join(", ")
}

/// A value for an explanation: JSON, cut at 80 characters so a long prompt does not flood it.
fn short_json(value: &Json) -> String {
    const LIMIT: usize = 80;
    let text = value.to_string();
    if text.chars().count() <= LIMIT {
        return text;
    }
    let mut cut: String = text.chars().take(LIMIT).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_are_values_never_keys_at_any_depth() {
        let params = json!({"send_email": 1, "a": ["x", {"b": "y", "c": [null, true, "z"]}]});
        let mut strings = collect_strings(&params);
        strings.sort_unstable();
        assert_eq!(strings, ["x", "y", "z"]);
    }

    #[test]
    fn deep_json_does_not_overflow() {
        let mut value = json!("deep");
        for _ in 0..100_000 {
            value = Json::Array(vec![value]);
        }
        assert_eq!(collect_strings(&value), ["deep"]);
        // serde_json drops nested values recursively; unwind it by hand so the test itself cannot overflow.
        let mut current = value;
        while let Json::Array(mut items) = current {
            current = items.pop().unwrap_or(Json::Null);
        }
    }

    #[test]
    fn equality_and_kinds() {
        assert!(json_eq(&json!(5000), &json!(5000.0)));
        assert!(json_eq(&json!(u64::MAX), &json!(u64::MAX)));
        assert!(!json_eq(&json!("5000"), &json!(5000)));
        assert!(test_holds(&ParamTest::Ne(json!("usd")), &json!("eur"), false));
        assert!(!test_holds(&ParamTest::Ne(json!("usd")), &json!(5), false));
    }

    #[test]
    fn comparisons_read_numeric_strings_so_quoting_an_amount_slips_nothing() {
        let holds = |test: ParamTest, value: Json, restrictive: bool| test_holds(&test, &value, restrictive);
        for restrictive in [true, false] {
            assert!(holds(ParamTest::Gt(5000.0), json!("999999"), restrictive));
            assert!(holds(ParamTest::Gt(5000.0), json!(" +5000.5 "), restrictive));
            assert!(holds(ParamTest::Gt(5000.0), json!("6000."), restrictive));
            assert!(holds(ParamTest::Lt(1.0), json!(".5"), restrictive));
            assert!(holds(ParamTest::Lte(5000.0), json!("100"), restrictive));
            assert!(holds(ParamTest::Gt(5000.0), json!("9".repeat(400)), restrictive), "overlong: infinity");
            assert!(holds(ParamTest::Lt(0.0), json!(format!("-{}", "9".repeat(400))), restrictive));
            for no_number in [json!("apples"), json!(""), json!(true), json!(null), json!({"a": 1})] {
                assert!(!holds(ParamTest::Gt(1.0), no_number.clone(), restrictive), "{no_number}");
                assert!(!holds(ParamTest::Lt(1.0e300), no_number.clone(), restrictive), "{no_number}");
            }
        }
        // Parsers disagree on these (6e3 is 6000 or 6): they meet a restriction, never an allowance.
        for ambiguous in ["500000e-2", "6e3", "Infinity", "-inf", "NaN", "1_000", "1,000", "0x10", "١٢٣", "12 apples"]
        {
            for test in [ParamTest::Gt(5000.0), ParamTest::Lte(5000.0)] {
                assert!(holds(test.clone(), json!(ambiguous), true), "{ambiguous}: a deny or hold applies");
                assert!(!holds(test, json!(ambiguous), false), "{ambiguous}: an allow does not");
            }
        }
        let tokens = json!({"max_tokens": "100000"});
        assert_eq!(requested_tokens_above(&tokens, 4000, false).map(|(f, _)| f), Some("max_tokens"));
        assert!(requested_tokens_above(&json!({"max_tokens": "1e2"}), 4000, true).is_some());
        assert!(requested_tokens_above(&json!({"max_tokens": "1e2"}), 4000, false).is_none());
    }
}
