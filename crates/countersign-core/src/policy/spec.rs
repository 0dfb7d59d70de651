//! The policy file as written: the serde model of one YAML file, with every check that can point at a spot
//! in the text done while deserializing.
//!
//! Validation lives inside `Deserialize` impls, in visitors, on purpose: yaml_serde tags an error raised
//! inside a visitor with the line and column of the node being read, while an error raised after a derived
//! impl returns is tagged with the enclosing node. Checks that need more than one node (duplicate rule names,
//! effect synonyms, keys defined in two files) happen in `compile`, which finds their location with `locate`.
//! Nothing here merges files, builds indexes or evaluates anything. Each spec type can render itself back as
//! JSON (`to_json`), which is what verdict snapshots and the policy version are made of.

use std::fmt;
use std::marker::PhantomData;

use regex::{Regex, RegexBuilder};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map as JsonMap, Value as Json};

use super::Effect;
use super::duration::parse_duration;
use crate::capability::{Capability, NameGlob};

/// Compiled size limit for one regular expression, so a pathological pattern fails at load, not at runtime.
pub(crate) const REGEX_SIZE_LIMIT: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------------------
// Text leaves: scalars that are parsed and validated from their text.

/// A scalar read from its text and validated in the visitor (so errors carry the scalar's location).
pub(crate) trait FromText: Sized {
    const EXPECTING: &'static str;
    fn from_text(text: &str) -> Result<Self, String>;
    fn text(&self) -> &str;
}

struct TextVisitor<T>(PhantomData<T>);

impl<T: FromText> Visitor<'_> for TextVisitor<T> {
    type Value = T;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(T::EXPECTING)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<T, E> {
        T::from_text(value).map_err(E::custom)
    }
}

macro_rules! deserialize_from_text {
    ($($type:ty),* $(,)?) => {$(
        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserializer.deserialize_str(TextVisitor(PhantomData))
            }
        }
    )*};
}

deserialize_from_text!(
    RuleName,
    DomainName,
    PrincipalName,
    CapabilityPattern,
    NamePattern,
    ContentPattern,
    ValueRegex,
    ParamPath,
);

fn plain_name(what: &str, text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{what} `{text}` must not contain spaces"));
    }
    Ok(text.to_owned())
}

/// A rule's name: non-empty, unique in the policy, and not `default` (which verdicts use for "no rule").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuleName(pub String);

impl FromText for RuleName {
    const EXPECTING: &'static str = "a rule name";

    fn from_text(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Err("a rule name must not be empty".into());
        }
        if text != text.trim() {
            return Err(format!("rule name `{text}` must not start or end with spaces"));
        }
        if text == "default" {
            return Err("the rule name `default` is reserved for the verdict of actions no rule matches".into());
        }
        Ok(Self(text.to_owned()))
    }

    fn text(&self) -> &str {
        &self.0
    }
}

/// The first part of a capability name (`finance` in `finance.issue.card`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DomainName(pub String);

impl FromText for DomainName {
    const EXPECTING: &'static str = "a capability domain such as `finance`";

    fn from_text(text: &str) -> Result<Self, String> {
        let valid = !text.is_empty()
            && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid {
            return Err(format!(
                "domain `{text}` is not a capability domain: use one or more of a-z, 0-9, _ and - (the first part of a capability name, without dots)"
            ));
        }
        Ok(Self(text.to_owned()))
    }

    fn text(&self) -> &str {
        &self.0
    }
}

/// An agent, group or user name: non-empty, no spaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PrincipalName(pub String);

impl FromText for PrincipalName {
    const EXPECTING: &'static str = "a name";

    fn from_text(text: &str) -> Result<Self, String> {
        plain_name("a name", text).map(Self)
    }

    fn text(&self) -> &str {
        &self.0
    }
}

/// A capability name or glob (`finance.*`, `*.delete.*`, `email.send.message`), lowercase like the names
/// it is meant to match, so a pattern that could never match is refused at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CapabilityPattern(pub NameGlob);

impl FromText for CapabilityPattern {
    const EXPECTING: &'static str = "a capability name or glob such as `finance.*`";

    fn from_text(text: &str) -> Result<Self, String> {
        let glob = NameGlob::parse(text).map_err(|e| e.to_string())?;
        if let Some(c) =
            text.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '*')))
        {
            return Err(format!(
                "capability pattern `{text}` contains `{c}` and could never match: capability names use a-z, 0-9, _, - and dots (and `*` in a glob)"
            ));
        }
        if glob.is_literal()
            && let Err(error) = Capability::parse(text)
        {
            return Err(format!("{error}; to match every capability of a domain, write `{text}.*`"));
        }
        Ok(Self(glob))
    }

    fn text(&self) -> &str {
        self.0.as_str()
    }
}

/// An agent-name or model-name glob (`deploy-*`, `gpt-4*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NamePattern(pub NameGlob);

impl FromText for NamePattern {
    const EXPECTING: &'static str = "a name or glob";

    fn from_text(text: &str) -> Result<Self, String> {
        NameGlob::parse(text).map(Self).map_err(|e| e.to_string())
    }

    fn text(&self) -> &str {
        self.0.as_str()
    }
}

fn regex_error(text: &str, error: &regex::Error) -> String {
    match error {
        regex::Error::CompiledTooBig(limit) => {
            format!("regular expression `{text}` is too large (compiled size over {limit} bytes)")
        }
        other => format!("invalid regular expression `{text}`: {}", last_line(&other.to_string())),
    }
}

/// The regex crate's syntax errors are several lines (pattern, caret, `error: …`); the last says what is wrong.
fn last_line(text: &str) -> &str {
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).map_or(text, str::trim);
    line.strip_prefix("error: ").unwrap_or(line)
}

/// One entry of `content_patterns`: a regex, matched case-insensitively. Compiled here only to validate it;
/// the rule compiles all its patterns into one `RegexSet`.
#[derive(Debug, Clone)]
pub(crate) struct ContentPattern(pub String);

impl FromText for ContentPattern {
    const EXPECTING: &'static str = "a regular expression";

    fn from_text(text: &str) -> Result<Self, String> {
        RegexBuilder::new(text)
            .case_insensitive(true)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| regex_error(text, &e))?;
        Ok(Self(text.to_owned()))
    }

    fn text(&self) -> &str {
        &self.0
    }
}

/// The operand of the `matches` parameter test: a regex, case-sensitive as written (add `(?i)` to ignore
/// case), unanchored (add `^…$` to match the whole value).
#[derive(Debug, Clone)]
pub(crate) struct ValueRegex {
    pub source: String,
    pub regex: Regex,
}

impl FromText for ValueRegex {
    const EXPECTING: &'static str = "a regular expression";

    fn from_text(text: &str) -> Result<Self, String> {
        let regex = RegexBuilder::new(text).size_limit(REGEX_SIZE_LIMIT).build().map_err(|e| regex_error(text, &e))?;
        Ok(Self { source: text.to_owned(), regex })
    }

    fn text(&self) -> &str {
        &self.source
    }
}

/// A parameter path: a key of `params`, or a dotted path into nested objects (`card.limit.amount`); a
/// segment made of digits also indexes an array (`items.0.price`).
#[derive(Debug, Clone)]
pub(crate) struct ParamPath {
    pub text: String,
    pub segments: Vec<String>,
}

impl FromText for ParamPath {
    const EXPECTING: &'static str = "a parameter name or dotted path";

    fn from_text(text: &str) -> Result<Self, String> {
        let segments: Vec<String> = text.split('.').map(str::to_owned).collect();
        if text.is_empty() || segments.iter().any(String::is_empty) {
            return Err(format!(
                "parameter path `{text}` is not valid: use a key such as `amount_cents` or a dotted path such as `card.limit`"
            ));
        }
        Ok(Self { text: text.to_owned(), segments })
    }

    fn text(&self) -> &str {
        &self.text
    }
}

// ---------------------------------------------------------------------------------------------------------
// Numeric and mixed leaves.

/// `version: 1`, the only version of the format.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VersionSpec;

impl<'de> Deserialize<'de> for VersionSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct VersionVisitor;
        impl Visitor<'_> for VersionVisitor {
            type Value = VersionSpec;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("`version: 1`")
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<VersionSpec, E> {
                if value == 1 {
                    Ok(VersionSpec)
                } else {
                    Err(E::custom(format!(
                        "unsupported policy format version {value}: this Countersign reads `version: 1`"
                    )))
                }
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<VersionSpec, E> {
                Err(E::custom(format!(
                    "unsupported policy format version {value}: this Countersign reads `version: 1`"
                )))
            }
        }
        deserializer.deserialize_any(VersionVisitor)
    }
}

/// An approval timeout: a duration string (`15m`) or whole seconds; never zero.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TimeoutSpec {
    pub written: Json,
    pub seconds: u64,
}

/// The longest approval timeout a policy may set: a year. Longer is almost always a unit slip (`86400000`
/// meant as milliseconds), and a pending approval is meant to end.
pub const MAX_APPROVAL_TIMEOUT_SECONDS: u64 = 365 * 24 * 3600;

fn check_timeout(seconds: u64) -> Result<(), String> {
    if seconds == 0 {
        return Err("an approval timeout must be longer than zero".into());
    }
    if seconds > MAX_APPROVAL_TIMEOUT_SECONDS {
        return Err(format!(
            "an approval timeout may be at most 365 days (`365d`, {MAX_APPROVAL_TIMEOUT_SECONDS} seconds); this one is {seconds} seconds"
        ));
    }
    Ok(())
}

impl<'de> Deserialize<'de> for TimeoutSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TimeoutVisitor;
        impl Visitor<'_> for TimeoutVisitor {
            type Value = TimeoutSpec;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a duration such as `30s`, `15m`, `1h`, `2d`, or whole seconds")
            }
            fn visit_u64<E: de::Error>(self, seconds: u64) -> Result<TimeoutSpec, E> {
                check_timeout(seconds).map_err(E::custom)?;
                Ok(TimeoutSpec { written: Json::from(seconds), seconds })
            }
            fn visit_i64<E: de::Error>(self, seconds: i64) -> Result<TimeoutSpec, E> {
                match u64::try_from(seconds) {
                    Ok(seconds) => self.visit_u64(seconds),
                    Err(_) => Err(E::custom("an approval timeout must be longer than zero")),
                }
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<TimeoutSpec, E> {
                let seconds = parse_duration(text).map_err(E::custom)?.as_secs();
                check_timeout(seconds).map_err(E::custom)?;
                Ok(TimeoutSpec { written: Json::from(text), seconds })
            }
        }
        deserializer.deserialize_any(TimeoutVisitor)
    }
}

/// How many distinct approvers must approve: at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QuorumSpec(pub u32);

impl<'de> Deserialize<'de> for QuorumSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct QuorumVisitor;
        impl Visitor<'_> for QuorumVisitor {
            type Value = QuorumSpec;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a whole number of approvers, at least 1")
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<QuorumSpec, E> {
                match u32::try_from(value) {
                    Ok(0) => Err(E::custom("quorum must be at least 1 (0 would approve without anyone approving)")),
                    Ok(quorum) => Ok(QuorumSpec(quorum)),
                    Err(_) => Err(E::custom(format!("quorum {value} is too large"))),
                }
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<QuorumSpec, E> {
                Err(E::custom(format!("quorum must be at least 1, not {value}")))
            }
        }
        deserializer.deserialize_any(QuorumVisitor)
    }
}

fn finite_number<E: de::Error>(value: f64) -> Result<f64, E> {
    if value.is_finite() { Ok(value) } else { Err(E::custom("expected a finite number")) }
}

/// A number operand of `gt`, `gte`, `lt`, `lte`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct NumberSpec(pub f64);

struct NumberVisitor(&'static str);

impl Visitor<'_> for NumberVisitor {
    type Value = f64;
    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.0)
    }
    // Policy numbers are thresholds written by people; above 2^53 the nearest f64 is fine.
    #[allow(clippy::cast_precision_loss)]
    fn visit_u64<E: de::Error>(self, value: u64) -> Result<f64, E> {
        Ok(value as f64)
    }
    #[allow(clippy::cast_precision_loss)]
    fn visit_i64<E: de::Error>(self, value: i64) -> Result<f64, E> {
        Ok(value as f64)
    }
    fn visit_f64<E: de::Error>(self, value: f64) -> Result<f64, E> {
        finite_number(value)
    }
}

impl<'de> Deserialize<'de> for NumberSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NumberVisitor("a number")).map(Self)
    }
}

/// `risk_at_least`: a score between 0 and 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RiskThreshold(pub f64);

impl<'de> Deserialize<'de> for RiskThreshold {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RiskVisitor;
        impl Visitor<'_> for RiskVisitor {
            type Value = RiskThreshold;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a risk score between 0 and 1")
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<RiskThreshold, E> {
                match value {
                    0 => Ok(RiskThreshold(0.0)),
                    1 => Ok(RiskThreshold(1.0)),
                    _ => Err(E::custom(format!("risk_at_least must be between 0 and 1, not {value}"))),
                }
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<RiskThreshold, E> {
                Err(E::custom(format!("risk_at_least must be between 0 and 1, not {value}")))
            }
            fn visit_f64<E: de::Error>(self, value: f64) -> Result<RiskThreshold, E> {
                if (0.0..=1.0).contains(&value) {
                    Ok(RiskThreshold(value))
                } else {
                    Err(E::custom(format!("risk_at_least must be between 0 and 1, not {value}")))
                }
            }
        }
        deserializer.deserialize_any(RiskVisitor)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Containers.

/// A condition value that is one item or a list meaning "any of". An empty list is refused: it could never
/// match, which is almost certainly a mistake.
#[derive(Debug, Clone)]
pub(crate) enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn items(&self) -> &[T] {
        match self {
            OneOrMany::One(item) => std::slice::from_ref(item),
            OneOrMany::Many(items) => items,
        }
    }
}

impl<T: FromText> OneOrMany<T> {
    fn to_json(&self) -> Json {
        match self {
            OneOrMany::One(item) => Json::from(item.text()),
            OneOrMany::Many(items) => Json::Array(items.iter().map(|i| Json::from(i.text())).collect()),
        }
    }
}

impl<'de, T: FromText + Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OneOrManyVisitor<T>(PhantomData<T>);
        impl<'de, T: FromText + Deserialize<'de>> Visitor<'de> for OneOrManyVisitor<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(formatter, "{} or a list of them", T::EXPECTING)
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
                T::from_text(value).map(OneOrMany::One).map_err(E::custom)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<T>()? {
                    items.push(item);
                }
                if items.is_empty() {
                    return Err(de::Error::custom(
                        "an empty list never matches: list at least one entry or remove the condition",
                    ));
                }
                Ok(OneOrMany::Many(items))
            }
        }
        deserializer.deserialize_any(OneOrManyVisitor(PhantomData))
    }
}

/// A mapping kept in file order (glob keys of `capabilities` are matched in order). Duplicate keys are
/// refused, with the location of the second one, by `compile`'s pre-pass; this type refuses them too.
#[derive(Debug, Clone)]
pub(crate) struct OrderedMap<K, V>(pub Vec<(K, V)>);

impl<K, V> Default for OrderedMap<K, V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<'de, K: FromText + Deserialize<'de>, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<K, V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<K, V>(PhantomData<(K, V)>);
        impl<'de, K: FromText + Deserialize<'de>, V: Deserialize<'de>> Visitor<'de> for MapVisitor<K, V> {
            type Value = OrderedMap<K, V>;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(formatter, "a mapping keyed by {}", K::EXPECTING)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries: Vec<(K, V)> = Vec::new();
                while let Some(key) = map.next_key::<K>()? {
                    if entries.iter().any(|(k, _)| k.text() == key.text()) {
                        return Err(de::Error::custom(format!("`{}` is defined twice", key.text())));
                    }
                    let value = map.next_value::<V>()?;
                    entries.push((key, value));
                }
                Ok(OrderedMap(entries))
            }
        }
        deserializer.deserialize_map(MapVisitor(PhantomData))
    }
}

/// The operand list of `in`: one or more JSON values.
#[derive(Debug, Clone)]
struct JsonList(Vec<Json>);

impl<'de> Deserialize<'de> for JsonList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor;
        impl<'de> Visitor<'de> for ListVisitor {
            type Value = JsonList;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a list of values")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<JsonList, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Json>()? {
                    items.push(item);
                }
                if items.is_empty() {
                    return Err(de::Error::custom("`in` needs at least one value"));
                }
                Ok(JsonList(items))
            }
        }
        deserializer.deserialize_seq(ListVisitor)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Parameter tests.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ParamOp {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
    In,
    Matches,
}

/// One comparison on a parameter.
#[derive(Debug, Clone)]
pub(crate) enum ParamTest {
    Eq(Json),
    Ne(Json),
    Gt(f64),
    Gte(f64),
    Lt(f64),
    Lte(f64),
    In(Vec<Json>),
    Matches(ValueRegex),
}

impl ParamTest {
    pub fn operator(&self) -> &'static str {
        match self {
            ParamTest::Eq(_) => "eq",
            ParamTest::Ne(_) => "ne",
            ParamTest::Gt(_) => "gt",
            ParamTest::Gte(_) => "gte",
            ParamTest::Lt(_) => "lt",
            ParamTest::Lte(_) => "lte",
            ParamTest::In(_) => "in",
            ParamTest::Matches(_) => "matches",
        }
    }

    pub fn operand_json(&self) -> Json {
        match self {
            ParamTest::Eq(value) | ParamTest::Ne(value) => value.clone(),
            ParamTest::Gt(n) | ParamTest::Gte(n) | ParamTest::Lt(n) | ParamTest::Lte(n) => number_json(*n),
            ParamTest::In(values) => Json::Array(values.clone()),
            ParamTest::Matches(regex) => Json::from(regex.source.as_str()),
        }
    }
}

/// Whole numbers render as integers (`5000`, not `5000.0`), so snapshots read as written.
pub(crate) fn number_json(value: f64) -> Json {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53: integers up to here are exact in f64
    if value.fract() == 0.0 && value.abs() <= EXACT {
        // Exact: checked just above that the value is a whole number within i64's exact range.
        #[allow(clippy::cast_possible_truncation)]
        return Json::from(value as i64);
    }
    serde_json::Number::from_f64(value).map_or(Json::Null, Json::Number)
}

/// All comparisons on one parameter (`{ gte: 100, lt: 5000 }`); all must hold.
#[derive(Debug, Clone)]
pub(crate) struct ParamTests(pub Vec<ParamTest>);

impl<'de> Deserialize<'de> for ParamTests {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TestsVisitor;
        impl<'de> Visitor<'de> for TestsVisitor {
            type Value = ParamTests;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str(
                    "a mapping of comparisons such as `{ gt: 5000 }` (eq, ne, gt, gte, lt, lte, in, matches)",
                )
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ParamTests, A::Error> {
                let mut tests = Vec::new();
                while let Some(op) = map.next_key::<ParamOp>()? {
                    let test = match op {
                        ParamOp::Eq => ParamTest::Eq(map.next_value()?),
                        ParamOp::Ne => ParamTest::Ne(map.next_value()?),
                        ParamOp::Gt => ParamTest::Gt(map.next_value::<NumberSpec>()?.0),
                        ParamOp::Gte => ParamTest::Gte(map.next_value::<NumberSpec>()?.0),
                        ParamOp::Lt => ParamTest::Lt(map.next_value::<NumberSpec>()?.0),
                        ParamOp::Lte => ParamTest::Lte(map.next_value::<NumberSpec>()?.0),
                        ParamOp::In => ParamTest::In(map.next_value::<JsonList>()?.0),
                        ParamOp::Matches => ParamTest::Matches(map.next_value()?),
                    };
                    tests.push(test);
                }
                if tests.is_empty() {
                    return Err(de::Error::custom(
                        "a parameter test needs at least one comparison: eq, ne, gt, gte, lt, lte, in or matches",
                    ));
                }
                Ok(ParamTests(tests))
            }
        }
        deserializer.deserialize_map(TestsVisitor)
    }
}

// ---------------------------------------------------------------------------------------------------------
// The document.

/// One policy file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a policy: a mapping that starts with `version: 1`")]
pub(crate) struct FileSpec {
    pub version: Option<VersionSpec>,
    pub defaults: Option<DefaultsSpec>,
    pub domains: Option<OrderedMap<DomainName, RoutingSpec>>,
    pub agents: Option<OrderedMap<PrincipalName, RoutingSpec>>,
    pub capabilities: Option<OrderedMap<CapabilityPattern, ProfileSpec>>,
    pub groups: Option<OrderedMap<PrincipalName, Vec<PrincipalName>>>,
    #[serde(alias = "policies")]
    pub rules: Option<Vec<RuleSpec>>,
}

/// `defaults:` — the effect for actions no rule matches and the approval route of last resort.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with `effect` and/or `approval`")]
pub(crate) struct DefaultsSpec {
    pub effect: Option<Effect>,
    pub approval: Option<ApprovalSpec>,
}

/// The value under a `domains:` or `agents:` key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with `approval`")]
pub(crate) struct RoutingSpec {
    pub approval: Option<ApprovalSpec>,
}

/// An approval route, any part of which may be left to a lower level (domain, defaults).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with `group`, `timeout` and/or `quorum`")]
pub(crate) struct ApprovalSpec {
    pub group: Option<PrincipalName>,
    pub timeout: Option<TimeoutSpec>,
    pub quorum: Option<QuorumSpec>,
}

impl ApprovalSpec {
    pub fn to_json(&self) -> Json {
        let mut object = JsonMap::new();
        if let Some(group) = &self.group {
            object.insert("group".into(), Json::from(group.0.as_str()));
        }
        if let Some(timeout) = &self.timeout {
            object.insert("timeout".into(), timeout.written.clone());
        }
        if let Some(quorum) = self.quorum {
            object.insert("quorum".into(), Json::from(quorum.0));
        }
        Json::Object(object)
    }
}

/// A capability's risk profile (`capabilities:` values).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with `reversible` and/or `external`")]
pub(crate) struct ProfileSpec {
    pub reversible: Option<bool>,
    pub external: Option<bool>,
}

/// The Govyn-style spelling of an effect: `type: approval | allow | deny`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum GovynType {
    Approval,
    Allow,
    Deny,
}

/// One rule as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a rule: a mapping with `name`, `effect` and optional `conditions`")]
pub(crate) struct RuleSpec {
    pub name: RuleName,
    pub priority: Option<i64>,
    pub effect: Option<Effect>,
    #[serde(rename = "type")]
    pub govyn_type: Option<GovynType>,
    pub approval_required: Option<bool>,
    pub conditions: Option<ConditionsSpec>,
    pub approval: Option<ApprovalSpec>,
    pub message: Option<String>,
}

/// A rule's conditions; all present ones must hold.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping of conditions")]
pub(crate) struct ConditionsSpec {
    pub agent: Option<OneOrMany<NamePattern>>,
    pub capability: Option<OneOrMany<CapabilityPattern>>,
    pub models: Option<OneOrMany<NamePattern>>,
    pub max_tokens_threshold: Option<u64>,
    pub content_patterns: Option<OneOrMany<ContentPattern>>,
    pub params: Option<OrderedMap<ParamPath, ParamTests>>,
    pub first_use: Option<bool>,
    pub risk_at_least: Option<RiskThreshold>,
}

impl ConditionsSpec {
    pub fn to_json(&self) -> Json {
        let mut object = JsonMap::new();
        if let Some(agent) = &self.agent {
            object.insert("agent".into(), agent.to_json());
        }
        if let Some(capability) = &self.capability {
            object.insert("capability".into(), capability.to_json());
        }
        if let Some(models) = &self.models {
            object.insert("models".into(), models.to_json());
        }
        if let Some(threshold) = self.max_tokens_threshold {
            object.insert("max_tokens_threshold".into(), Json::from(threshold));
        }
        if let Some(patterns) = &self.content_patterns {
            object.insert("content_patterns".into(), patterns.to_json());
        }
        if let Some(params) = &self.params {
            let mut tests_by_path = JsonMap::new();
            for (path, tests) in &params.0 {
                let ops: JsonMap<String, Json> =
                    tests.0.iter().map(|t| (t.operator().to_owned(), t.operand_json())).collect();
                tests_by_path.insert(path.text.clone(), Json::Object(ops));
            }
            object.insert("params".into(), Json::Object(tests_by_path));
        }
        if let Some(first_use) = self.first_use {
            object.insert("first_use".into(), Json::from(first_use));
        }
        if let Some(risk) = self.risk_at_least {
            object.insert("risk_at_least".into(), number_json(risk.0));
        }
        Json::Object(object)
    }
}
