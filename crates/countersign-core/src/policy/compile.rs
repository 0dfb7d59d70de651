//! From policy text to a compiled `Policy`: parse each file, merge a folder's files, check what needs more
//! than one node (effect synonyms, unique rule names, keys defined in two files), order and index the rules,
//! pack the rules' content patterns into shared regex sets (one scan per index bucket instead of one per
//! rule), and compute the version from the canonical form.
//!
//! Every error names the file and, whenever the offending spot exists in the text, its line and column.
//! Nothing here evaluates actions; `Policy::evaluate` in the parent module does.

use std::collections::HashMap;

use regex::RegexSetBuilder;
use serde_json::{Map as JsonMap, Value as Json, json};
use sha2::{Digest, Sha256};

use super::condition::{Conditions, ContentGroup, ContentMatcher, ParamCondition};
use super::glob::Glob;
use super::index::RuleIndex;
use super::locate::{Step, Target, find_duplicate_key, locate};
use super::spec::{
    ApprovalSpec, ConditionsSpec, FileSpec, GovynType, OneOrMany, REGEX_SIZE_LIMIT, RuleSpec, number_json,
};
use super::{ApprovalRoute, Axis, Effect, Policy, PolicyError, yaml_message};
use crate::audit::sorted_json;
use crate::capability::NameGlob;
use crate::risk::CapabilityProfile;

/// Default approval group when neither the policy's defaults nor anything more specific names one.
pub const DEFAULT_APPROVAL_GROUP: &str = "admins";
/// Default approval timeout: 15 minutes.
pub const DEFAULT_APPROVAL_TIMEOUT_SECONDS: u64 = 15 * 60;
/// Default number of distinct approvers.
pub const DEFAULT_QUORUM: u32 = 1;
/// Priority of a rule that does not state one.
pub const DEFAULT_PRIORITY: i64 = 0;

/// An approval route with any part left to a lower level.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct PartialRoute {
    pub group: Option<String>,
    pub timeout_seconds: Option<u64>,
    pub quorum: Option<u32>,
}

impl PartialRoute {
    fn from_spec(spec: Option<&ApprovalSpec>) -> Self {
        match spec {
            None => Self::default(),
            Some(spec) => Self {
                group: spec.group.as_ref().map(|g| g.0.clone()),
                timeout_seconds: spec.timeout.as_ref().map(|t| t.seconds),
                quorum: spec.quorum.map(|q| q.0),
            },
        }
    }

    fn canonical_json(&self) -> Json {
        let mut object = JsonMap::new();
        if let Some(group) = &self.group {
            object.insert("group".into(), Json::from(group.as_str()));
        }
        if let Some(timeout) = self.timeout_seconds {
            object.insert("timeout_seconds".into(), Json::from(timeout));
        }
        if let Some(quorum) = self.quorum {
            object.insert("quorum".into(), Json::from(quorum));
        }
        Json::Object(object)
    }
}

/// Resolves each field independently: the first level (most specific first) that sets it wins.
pub(crate) fn resolve_route(levels: &[Option<&PartialRoute>], fallback: &ApprovalRoute) -> ApprovalRoute {
    let levels = || levels.iter().flatten();
    ApprovalRoute {
        group: levels().find_map(|l| l.group.clone()).unwrap_or_else(|| fallback.group.clone()),
        timeout_seconds: levels().find_map(|l| l.timeout_seconds).unwrap_or(fallback.timeout_seconds),
        quorum: levels().find_map(|l| l.quorum).unwrap_or(fallback.quorum),
    }
}

/// A rule ready to be checked.
pub(crate) struct CompiledRule {
    pub name: String,
    pub priority: i64,
    pub effect: Effect,
    pub conditions: Conditions,
    pub approval: PartialRoute,
    pub message: Option<String>,
    pub axes: Vec<Axis>,
    /// The rule as written, for verdicts.
    pub snapshot: Json,
    /// Where it was written, for explanations: `file.yaml, rule 3`.
    pub origin: String,
    /// Where it was written, for locating errors found after sorting: file and position in its rule list.
    pub file_index: usize,
    pub index_in_file: usize,
}

/// Capability risk profiles: literal names first, then globs from most to least specific.
#[derive(Debug, Default)]
pub(crate) struct ProfileTable {
    exact: HashMap<String, CapabilityProfile>,
    globs: Vec<(NameGlob, CapabilityProfile)>,
}

impl ProfileTable {
    /// The profile of a literal key equal to the name; else of the matching glob with the most literal
    /// characters; ties go to the glob written first.
    pub fn lookup(&self, capability: &str) -> Option<&CapabilityProfile> {
        self.exact
            .get(capability)
            .or_else(|| self.globs.iter().find(|(glob, _)| glob.matches(capability)).map(|(_, p)| p))
    }
}

fn specificity(glob: &NameGlob) -> usize {
    glob.as_str().chars().filter(|c| *c != '*').count()
}

fn error_at(file: &str, location: Option<(usize, usize)>, message: impl Into<String>) -> PolicyError {
    PolicyError {
        file: file.to_owned(),
        line: location.map(|(line, _)| line),
        column: location.map(|(_, column)| column),
        message: message.into(),
    }
}

fn describe_place(file: &str, location: Option<(usize, usize)>) -> String {
    match location {
        Some((line, column)) => format!("{file}:{line}:{column}"),
        None => file.to_owned(),
    }
}

/// The text of a file given to `from_sources`, with its parsed spec.
struct ParsedFile<'s> {
    name: &'s str,
    text: &'s str,
    spec: FileSpec,
}

impl ParsedFile<'_> {
    /// Line and column of `rules[index]` (or of one of its fields), under `rules:` or its alias `policies:`.
    fn locate_rule(&self, index: usize, field: Option<&str>, target: Target) -> Option<(usize, usize)> {
        ["rules", "policies"].iter().find_map(|key| {
            let mut path = vec![Step::Key(key), Step::Index(index)];
            if let Some(field) = field {
                path.push(Step::Key(field));
            }
            locate(self.text, &path, target)
        })
    }

    fn locate_key(&self, section: &str, key: Option<&str>) -> Option<(usize, usize)> {
        match key {
            None => locate(self.text, &[Step::Key(section)], Target::Key),
            Some(key) => locate(self.text, &[Step::Key(section), Step::Key(key)], Target::Key),
        }
    }
}

fn parse_file<'s>(name: &'s str, text: &'s str) -> Result<ParsedFile<'s>, PolicyError> {
    if let Some((message, location)) = find_duplicate_key(text) {
        return Err(error_at(name, location, message));
    }
    let spec: FileSpec = yaml_serde::from_str(text).map_err(|error| {
        let location = error.location().map(|l| (l.line(), l.column()));
        error_at(name, location, yaml_message(&error))
    })?;
    if spec.version.is_none() {
        return Err(error_at(
            name,
            Some((1, 1)),
            "missing `version: 1`: every policy file starts with the format version",
        ));
    }
    Ok(ParsedFile { name, text, spec })
}

/// Merges one top-level mapping section across files; a key defined in two files is an error.
fn merge_section<'s, V>(
    files: &'s [ParsedFile<'s>],
    section: &str,
    entries_of: impl Fn(&'s FileSpec) -> Option<Vec<(&'s str, V)>>,
) -> Result<Vec<(&'s str, V)>, PolicyError> {
    let mut merged: Vec<(&'s str, V)> = Vec::new();
    let mut defined_in: HashMap<&'s str, usize> = HashMap::new();
    for (file_index, file) in files.iter().enumerate() {
        for (key, value) in entries_of(&file.spec).unwrap_or_default() {
            if let Some(&first) = defined_in.get(key) {
                let earlier = files
                    .get(first)
                    .map_or_else(String::new, |f| describe_place(f.name, f.locate_key(section, Some(key))));
                return Err(error_at(
                    file.name,
                    file.locate_key(section, Some(key)),
                    format!("{section}: `{key}` is already defined in {earlier}"),
                ));
            }
            defined_in.insert(key, file_index);
            merged.push((key, value));
        }
    }
    Ok(merged)
}

/// What the rule's `effect`, `type` and `approval_required` say together.
fn rule_effect(file: &ParsedFile<'_>, index: usize, rule: &RuleSpec) -> Result<Effect, PolicyError> {
    let name = &rule.name.0;
    let contradiction = |field: &str, message: String| {
        Err(error_at(file.name, file.locate_rule(index, Some(field), Target::Key), message))
    };
    let effect = match (rule.effect, rule.govyn_type) {
        (Some(_), Some(_)) => {
            return contradiction(
                "type",
                format!("rule `{name}` has both `effect` and `type`: give one (`type` is the Govyn-style spelling)"),
            );
        }
        (Some(effect), None) => effect,
        (None, Some(GovynType::Approval)) => Effect::RequireApproval,
        (None, Some(GovynType::Allow)) => Effect::Allow,
        (None, Some(GovynType::Deny)) => Effect::Deny,
        (None, None) => {
            let hint = if rule.approval_required == Some(true) {
                " (`approval_required: true` goes with `type: approval`)"
            } else {
                ""
            };
            return Err(error_at(
                file.name,
                file.locate_rule(index, None, Target::Value),
                format!(
                    "rule `{name}` has no effect: add `effect: allow`, `effect: deny` or `effect: require_approval`{hint}"
                ),
            ));
        }
    };
    match rule.approval_required {
        Some(true) if effect != Effect::RequireApproval => contradiction(
            "approval_required",
            format!("rule `{name}` says `approval_required: true` but its effect is {}", effect.as_str()),
        ),
        Some(false) if effect == Effect::RequireApproval => contradiction(
            "approval_required",
            format!("rule `{name}` says `approval_required: false` but its effect is require_approval"),
        ),
        _ => Ok(effect),
    }
}

fn globs_of<T>(list: Option<&OneOrMany<T>>, glob: impl Fn(&T) -> &NameGlob) -> Option<Vec<Glob>> {
    list.map(|l| l.items().iter().map(|item| Glob::new(glob(item).clone())).collect())
}

fn compile_conditions(spec: &ConditionsSpec) -> Conditions {
    Conditions {
        capability: globs_of(spec.capability.as_ref(), |p| &p.0),
        agent: globs_of(spec.agent.as_ref(), |p| &p.0),
        first_use: spec.first_use,
        risk_at_least: spec.risk_at_least.map(|r| r.0),
        max_tokens_threshold: spec.max_tokens_threshold,
        models: globs_of(spec.models.as_ref(), |p| &p.0),
        params: spec
            .params
            .as_ref()
            .map(|params| {
                params
                    .0
                    .iter()
                    .map(|(path, tests)| ParamCondition { path: path.clone(), tests: tests.0.clone() })
                    .collect()
            })
            .unwrap_or_default(),
        // The group is assigned by `build_content_groups` once the index exists; until then it points at no
        // group, which evaluation would treat as an inconsistency and deny.
        content: spec.content_patterns.as_ref().map(|patterns| ContentMatcher {
            sources: patterns.items().iter().map(|p| p.0.clone()).collect(),
            group: usize::MAX,
            first: 0,
        }),
    }
}

/// Most patterns packed into one content group. Scanning cost barely grows with the number of patterns,
/// compile time does (about linearly), and the lazy DFA's cache stays effective at this size.
const GROUP_PATTERNS: usize = 256;

/// Packs the content patterns of the rules of each index bucket into shared `RegexSet`s, so an action is
/// scanned once per bucket rather than once per rule. A rule in several buckets joins the first one's group.
fn build_content_groups(
    files: &[ParsedFile<'_>],
    rules: &mut [CompiledRule],
    index: &RuleIndex,
) -> Result<Vec<ContentGroup>, PolicyError> {
    let mut groups = Vec::new();
    let mut assigned = vec![false; rules.len()];
    for list in index.lists() {
        let mut pending: Vec<usize> = Vec::new();
        let mut pending_patterns = 0;
        for &rank in list {
            let rank = rank as usize;
            let Some(content) = rules.get(rank).and_then(|rule| rule.conditions.content.as_ref()) else {
                continue;
            };
            if assigned.get(rank).copied().unwrap_or(true) {
                continue;
            }
            let size = content.sources.len();
            if !pending.is_empty() && pending_patterns + size > GROUP_PATTERNS {
                pack_group(files, rules, &pending, &mut groups)?;
                pending.clear();
                pending_patterns = 0;
            }
            pending.push(rank);
            pending_patterns += size;
            if let Some(slot) = assigned.get_mut(rank) {
                *slot = true;
            }
        }
        if !pending.is_empty() {
            pack_group(files, rules, &pending, &mut groups)?;
        }
    }
    Ok(groups)
}

fn pack_group(
    files: &[ParsedFile<'_>],
    rules: &mut [CompiledRule],
    members: &[usize],
    groups: &mut Vec<ContentGroup>,
) -> Result<(), PolicyError> {
    let sources: Vec<&str> = members
        .iter()
        .filter_map(|&rank| rules.get(rank)?.conditions.content.as_ref())
        .flat_map(|content| content.sources.iter().map(String::as_str))
        .collect();
    let built = RegexSetBuilder::new(&sources)
        .case_insensitive(true)
        .size_limit(REGEX_SIZE_LIMIT.saturating_mul(GROUP_PATTERNS))
        .build();
    match built {
        Ok(set) => {
            let group = groups.len();
            groups.push(ContentGroup { set });
            let mut first = 0;
            for &rank in members {
                if let Some(content) = rules.get_mut(rank).and_then(|rule| rule.conditions.content.as_mut()) {
                    content.group = group;
                    content.first = first;
                    first += content.sources.len();
                }
            }
            Ok(())
        }
        // Together too big: compile each rule's patterns on its own.
        Err(_) if members.len() > 1 => {
            members.iter().try_for_each(|&rank| pack_group(files, rules, std::slice::from_ref(&rank), groups))
        }
        Err(error) => {
            let Some(rule) = members.first().and_then(|&rank| rules.get(rank)) else {
                return Err(error_at("", None, format!("content_patterns cannot be compiled: {error}")));
            };
            let (file_name, location) = match files.get(rule.file_index) {
                Some(file) => (
                    file.name,
                    ["rules", "policies"].iter().find_map(|key| {
                        let path = [
                            Step::Key(key),
                            Step::Index(rule.index_in_file),
                            Step::Key("conditions"),
                            Step::Key("content_patterns"),
                        ];
                        locate(file.text, &path, Target::Value)
                    }),
                ),
                None => ("", None),
            };
            Err(error_at(
                file_name,
                location,
                format!("rule `{}`: content_patterns cannot be compiled together: {error}", rule.name),
            ))
        }
    }
}

fn axes_of(spec: &ConditionsSpec, conditions: &Conditions) -> Vec<Axis> {
    let mut axes = Vec::new();
    if spec.agent.is_some() {
        axes.push(Axis::Identity);
    }
    if spec.content_patterns.is_some() || spec.models.is_some() {
        axes.push(Axis::Semantic);
    }
    if spec.params.is_some()
        || spec.first_use.is_some()
        || spec.risk_at_least.is_some()
        || spec.max_tokens_threshold.is_some()
    {
        axes.push(Axis::Risk);
    }
    if conditions.is_pin() {
        axes.push(Axis::Pin);
    }
    axes
}

fn rule_snapshot(rule: &RuleSpec, effect: Effect, priority: i64, conditions: &ConditionsSpec) -> Json {
    let mut object = JsonMap::new();
    object.insert("name".into(), Json::from(rule.name.0.as_str()));
    object.insert("priority".into(), Json::from(priority));
    object.insert("effect".into(), Json::from(effect.as_str()));
    object.insert("conditions".into(), conditions.to_json());
    if let Some(approval) = &rule.approval {
        object.insert("approval".into(), approval.to_json());
    }
    if let Some(message) = &rule.message {
        object.insert("message".into(), Json::from(message.as_str()));
    }
    Json::Object(object)
}

/// Compiles files given in order (a folder's files sorted by name) into one policy.
pub(crate) fn compile(files: &[(String, String)]) -> Result<Policy, PolicyError> {
    if files.is_empty() {
        return Err(error_at("", None, "no policy files: a policy needs at least one file with `version: 1`"));
    }
    let parsed: Vec<ParsedFile<'_>> =
        files.iter().map(|(name, text)| parse_file(name, text)).collect::<Result<_, _>>()?;

    // defaults: at most one file may set them.
    let mut defaults = None;
    let mut defaults_file: Option<&ParsedFile<'_>> = None;
    for file in &parsed {
        if let Some(spec) = &file.spec.defaults {
            if let Some(first) = defaults_file {
                return Err(error_at(
                    file.name,
                    file.locate_key("defaults", None),
                    format!(
                        "`defaults` is already defined in {}",
                        describe_place(first.name, first.locate_key("defaults", None))
                    ),
                ));
            }
            defaults = Some(spec);
            defaults_file = Some(file);
        }
    }
    let default_effect = defaults.and_then(|d| d.effect).unwrap_or(Effect::Allow);
    let default_route = resolve_route(
        &[Some(&PartialRoute::from_spec(defaults.and_then(|d| d.approval.as_ref())))],
        &ApprovalRoute {
            group: DEFAULT_APPROVAL_GROUP.to_owned(),
            timeout_seconds: DEFAULT_APPROVAL_TIMEOUT_SECONDS,
            quorum: DEFAULT_QUORUM,
        },
    );

    let domains = merge_section(&parsed, "domains", |spec| {
        spec.domains.as_ref().map(|m| m.0.iter().map(|(k, v)| (k.0.as_str(), v)).collect())
    })?;
    let agents = merge_section(&parsed, "agents", |spec| {
        spec.agents.as_ref().map(|m| m.0.iter().map(|(k, v)| (k.0.as_str(), v)).collect())
    })?;
    let groups = merge_section(&parsed, "groups", |spec| {
        spec.groups.as_ref().map(|m| m.0.iter().map(|(k, v)| (k.0.as_str(), v)).collect())
    })?;
    let capabilities = merge_section(&parsed, "capabilities", |spec| {
        spec.capabilities.as_ref().map(|m| m.0.iter().map(|(k, v)| (k.0.as_str(), (k, v))).collect())
    })?;

    // Rules, in file order, with unique names.
    let mut rules: Vec<CompiledRule> = Vec::new();
    let mut canonical_rules: Vec<Json> = Vec::new();
    let mut names: HashMap<&str, (usize, usize)> = HashMap::new();
    for (file_index, file) in parsed.iter().enumerate() {
        for (index, rule) in file.spec.rules.iter().flatten().enumerate() {
            if let Some(&(first_file, first_index)) = names.get(rule.name.0.as_str()) {
                let earlier = parsed.get(first_file).map_or_else(String::new, |f| {
                    describe_place(f.name, f.locate_rule(first_index, Some("name"), Target::Value))
                });
                return Err(error_at(
                    file.name,
                    file.locate_rule(index, Some("name"), Target::Value),
                    format!("rule name `{}` is already used by the rule at {earlier}", rule.name.0),
                ));
            }
            names.insert(&rule.name.0, (file_index, index));
            let effect = rule_effect(file, index, rule)?;
            let priority = rule.priority.unwrap_or(DEFAULT_PRIORITY);
            let empty = ConditionsSpec::default();
            let conditions_spec = rule.conditions.as_ref().unwrap_or(&empty);
            let conditions = compile_conditions(conditions_spec);
            let snapshot = rule_snapshot(rule, effect, priority, conditions_spec);
            let approval = PartialRoute::from_spec(rule.approval.as_ref());
            let mut canonical = snapshot.clone();
            if let Json::Object(object) = &mut canonical
                && rule.approval.is_some()
            {
                object.insert("approval".into(), approval.canonical_json());
            }
            canonical_rules.push(canonical);
            rules.push(CompiledRule {
                name: rule.name.0.clone(),
                priority,
                effect,
                axes: axes_of(conditions_spec, &conditions),
                conditions,
                approval,
                message: rule.message.clone(),
                snapshot,
                origin: format!("{}, rule {}", file.name, index + 1),
                file_index,
                index_in_file: index,
            });
        }
    }
    if u32::try_from(rules.len()).is_err() {
        return Err(error_at("", None, "too many rules"));
    }
    // Decision order: priority ascending; the sort is stable, so ties keep file order.
    rules.sort_by_key(|rule| rule.priority);
    let index = RuleIndex::build(
        rules.iter().map(|rule| (rule.conditions.capability.as_deref(), rule.conditions.agent.as_deref())),
    );
    let content_groups = build_content_groups(&parsed, &mut rules, &index)?;

    let mut profiles = ProfileTable::default();
    for (_, (pattern, spec)) in &capabilities {
        let profile =
            CapabilityProfile { reversible: spec.reversible.unwrap_or(true), external: spec.external.unwrap_or(false) };
        if pattern.0.is_literal() {
            profiles.exact.insert(pattern.0.as_str().to_owned(), profile);
        } else {
            profiles.globs.push((pattern.0.clone(), profile));
        }
    }
    profiles.globs.sort_by_key(|(glob, _)| std::cmp::Reverse(specificity(glob)));

    let domain_routes: HashMap<String, PartialRoute> = domains
        .iter()
        .map(|(name, spec)| ((*name).to_owned(), PartialRoute::from_spec(spec.approval.as_ref())))
        .collect();
    let agent_routes: HashMap<String, PartialRoute> = agents
        .iter()
        .map(|(name, spec)| ((*name).to_owned(), PartialRoute::from_spec(spec.approval.as_ref())))
        .collect();
    let group_members: HashMap<String, Vec<String>> = groups
        .iter()
        .map(|(name, members)| ((*name).to_owned(), members.iter().map(|m| m.0.clone()).collect()))
        .collect();

    let canonical = json!({
        "version": 1,
        "defaults": {
            "effect": default_effect.as_str(),
            "approval": {
                "group": default_route.group,
                "timeout_seconds": default_route.timeout_seconds,
                "quorum": default_route.quorum,
            },
        },
        "domains": domain_routes.iter().map(|(k, v)| (k.clone(), v.canonical_json())).collect::<JsonMap<_, _>>(),
        "agents": agent_routes.iter().map(|(k, v)| (k.clone(), v.canonical_json())).collect::<JsonMap<_, _>>(),
        "capabilities": capabilities.iter().map(|(name, (_, spec))| json!([
            name,
            {"reversible": spec.reversible.unwrap_or(true), "external": spec.external.unwrap_or(false)},
        ])).collect::<Vec<_>>(),
        "groups": group_members.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<JsonMap<_, _>>(),
        "rules": canonical_rules,
    });
    let version = hex::encode(Sha256::digest(canonical_json(&canonical).as_bytes()));

    Ok(Policy {
        sources: files.to_vec(),
        version,
        default_effect,
        default_route,
        domain_routes,
        agent_routes,
        profiles,
        groups: group_members,
        rules,
        index,
        content_groups,
    })
}

/// JSON with object keys sorted at every level and no whitespace: the same value always gives the same text.
/// 1.0 and 1 are the same number to a policy, so whole floats are written as integers.
pub(crate) fn canonical_json(value: &Json) -> String {
    sorted_json(value, &|number, out| match number.as_f64() {
        Some(f) if number.is_f64() => out.extend_from_slice(number_json(f).to_string().as_bytes()),
        _ => out.extend_from_slice(number.to_string().as_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let value = json!({"b": 1, "a": {"z": [1.0, 2.5], "y": null}});
        assert_eq!(canonical_json(&value), r#"{"a":{"y":null,"z":[1,2.5]},"b":1}"#);
    }

    #[test]
    fn routes_resolve_field_by_field() {
        let agent = PartialRoute { group: Some("sre".into()), ..PartialRoute::default() };
        let rule = PartialRoute { timeout_seconds: Some(60), group: Some("ops".into()), ..PartialRoute::default() };
        let domain = PartialRoute { quorum: Some(2), timeout_seconds: Some(3600), ..PartialRoute::default() };
        let fallback = ApprovalRoute { group: "admins".into(), timeout_seconds: 900, quorum: 1 };
        let route = resolve_route(&[Some(&agent), Some(&rule), Some(&domain)], &fallback);
        assert_eq!(route, ApprovalRoute { group: "sre".into(), timeout_seconds: 60, quorum: 2 });
        assert_eq!(resolve_route(&[None, None], &fallback), fallback);
    }
}
