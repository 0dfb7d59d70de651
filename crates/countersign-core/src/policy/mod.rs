//! The policy engine: load a YAML policy (one file or a folder's files), validate it with errors that name
//! file, line and column, compile it, and decide actions with it.
//!
//! `Policy::evaluate` is a pure function of the compiled policy, the action and the facts the gateway passes
//! in (earlier successes): no IO, no clock, no randomness, no panics, whatever JSON the action carries.
//! Evaluation cannot fail; the internal inconsistencies it guards against (an index entry or a content
//! pattern group that points nowhere, which the compiler never produces) answer deny, never allow. This module does not read files, watch folders, store versions or route
//! approvals to people; the gateway does, using `version`, `sources`, `group_members` and the verdict's
//! `approval` route.
//!
//! # Semantics in brief
//!
//! - Rules are tried by `priority` ascending (a rule without one has priority 0; negative is allowed), ties
//!   in the order written (a folder's files in the order given, then top to bottom). The first rule whose
//!   conditions all hold decides; no match means `defaults.effect` (allow unless set).
//! - A condition whose field is absent, or of another type than the test needs, does not hold.
//! - Approval routes resolve field by field: agent override, then the rule's, then the capability domain's,
//!   then `defaults.approval`, then group `admins`, 15 minutes, quorum 1.
//! - The version is the SHA-256 of the canonical JSON of the merged policy (keys sorted, defaults filled in),
//!   so comments, layout and quoting do not change it, and any change of meaning does.
//!
//! Submodules: `spec` (the YAML model and per-node validation), `locate` (positions for errors serde cannot
//! place), `compile` (merge, checks across nodes, ordering, version), `condition` (matching), `index`
//! (candidate rules per capability and agent), `glob` (fast glob matching), `duration`.

mod compile;
mod condition;
mod duration;
mod glob;
mod index;
mod locate;
mod spec;

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use compile::{DEFAULT_APPROVAL_GROUP, DEFAULT_APPROVAL_TIMEOUT_SECONDS, DEFAULT_PRIORITY, DEFAULT_QUORUM};
pub use duration::parse_duration;
pub use spec::MAX_APPROVAL_TIMEOUT_SECONDS;

use crate::capability::Capability;
use crate::risk::{RiskAssessment, assess};
use compile::{CompiledRule, PartialRoute, ProfileTable, resolve_route};
use condition::{ContentGroup, Miss, Subject};
use index::RuleIndex;

/// What a policy decides for an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    Deny,
    RequireApproval,
}

impl Effect {
    /// The spelling used in policies and on the wire: `allow`, `deny`, `require_approval`.
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
            Effect::RequireApproval => "require_approval",
        }
    }
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kinds of evidence a rule decided on: who (`identity`: the agent), what it says (`semantic`:
/// content patterns, models), how much is at stake (`risk`: parameter thresholds, first use, risk score,
/// token threshold), or the capability alone (`pin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Axis {
    Identity,
    Semantic,
    Risk,
    Pin,
}

/// Who must approve, by when, and how many of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRoute {
    pub group: String,
    pub timeout_seconds: u64,
    pub quorum: u32,
}

/// A policy that cannot be loaded. Displays as `file:line:column: message`, leaving out what is unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render_error(.file, *.line, *.column, .message))]
pub struct PolicyError {
    pub file: String,
    /// 1-based.
    pub line: Option<usize>,
    /// 1-based, counted in characters by the YAML parser.
    pub column: Option<usize>,
    pub message: String,
}

fn render_error(file: &str, line: Option<usize>, column: Option<usize>, message: &str) -> String {
    match (line, column) {
        _ if file.is_empty() => message.to_owned(),
        (Some(line), Some(column)) => format!("{file}:{line}:{column}: {message}"),
        (Some(line), None) => format!("{file}:{line}: {message}"),
        _ => format!("{file}: {message}"),
    }
}

/// yaml_serde's message without the ` at line L column C` it appends (we report those separately).
pub(crate) fn yaml_message(error: &yaml_serde::Error) -> String {
    let text = error.to_string();
    match error.location() {
        Some(location) => text.replacen(&format!(" at line {} column {}", location.line(), location.column()), "", 1),
        None => text,
    }
}

/// Facts about the action's history that the gateway looks up before evaluating.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Earlier successful executions of this capability by this agent. `first_use` means zero.
    pub prior_successes: u64,
}

/// One action to decide.
#[derive(Debug, Clone, Copy)]
pub struct EvalInput<'a> {
    pub agent: &'a str,
    pub capability: &'a Capability,
    pub params: &'a serde_json::Value,
    pub facts: &'a Facts,
}

/// A decision and everything needed to show and audit it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub effect: Effect,
    /// The deciding rule's name, or `default` when no rule matched.
    pub rule: String,
    pub policy_version: String,
    /// The axes of the deciding rule's conditions; empty for `default`.
    pub axes: Vec<Axis>,
    /// The deciding rule's message.
    pub message: Option<String>,
    /// Who must approve; present exactly when the effect is `require_approval`.
    pub approval: Option<ApprovalRoute>,
    /// The deciding rule as written (name, priority, effect, conditions, approval, message); `None` for
    /// `default`.
    pub snapshot: Option<serde_json::Value>,
    pub risk: RiskAssessment,
    /// Which rule matched and why, or why none did.
    pub explanation: String,
}

/// A compiled policy: immutable, `Send + Sync`, meant to be shared in an `Arc` and swapped whole on reload.
pub struct Policy {
    sources: Vec<(String, String)>,
    version: String,
    default_effect: Effect,
    default_route: ApprovalRoute,
    domain_routes: HashMap<String, PartialRoute>,
    agent_routes: HashMap<String, PartialRoute>,
    profiles: ProfileTable,
    groups: HashMap<String, Vec<String>>,
    /// In decision order: priority ascending, then file order.
    rules: Vec<CompiledRule>,
    index: RuleIndex,
    /// Shared regex sets for `content_patterns`; rules point into them.
    content_groups: Vec<ContentGroup>,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("version", &self.version)
            .field("files", &self.sources.iter().map(|(name, _)| name).collect::<Vec<_>>())
            .field("rules", &self.rules.len())
            .finish_non_exhaustive()
    }
}

/// How many failed candidates a default verdict's explanation describes.
const EXPLAINED_MISSES: usize = 5;

impl Policy {
    /// Loads a policy from one file's text. `file_name` is used in error messages.
    pub fn from_source(file_name: &str, text: &str) -> Result<Policy, PolicyError> {
        compile::compile(&[(file_name.to_owned(), text.to_owned())])
    }

    /// Loads a policy from several files, given in file-name order (a folder). Each file states
    /// `version: 1`. `defaults` may be set in one file only; `domains`, `agents`, `capabilities` and
    /// `groups` are merged, and a key defined in two files is an error naming both; rules are concatenated
    /// in the order given, so among equal priorities an earlier file's rules come first.
    pub fn from_sources(files: &[(String, String)]) -> Result<Policy, PolicyError> {
        compile::compile(files)
    }

    /// Lowercase hex SHA-256 of the policy's canonical form.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The files it was loaded from: (file name, original text).
    pub fn sources(&self) -> &[(String, String)] {
        &self.sources
    }

    /// The user names of a group declared under `groups:`; `None` if the policy does not declare it.
    pub fn group_members(&self, group: &str) -> Option<&[String]> {
        self.groups.get(group).map(Vec::as_slice)
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The effect for actions no rule matches.
    pub fn default_effect(&self) -> Effect {
        self.default_effect
    }

    /// The route an action of `capability` by `agent` would take if no rule's `approval` applied: agent
    /// override, then the domain's, then the defaults.
    pub fn default_route(&self, agent: &str, capability: &Capability) -> ApprovalRoute {
        self.route(agent, capability, None)
    }

    fn route(&self, agent: &str, capability: &Capability, rule: Option<&PartialRoute>) -> ApprovalRoute {
        resolve_route(
            &[self.agent_routes.get(agent), rule, self.domain_routes.get(capability.domain())],
            &self.default_route,
        )
    }

    /// Decides one action. Pure and total: never panics, never errs; see the module documentation.
    pub fn evaluate(&self, input: &EvalInput<'_>) -> Verdict {
        let capability = input.capability.as_str();
        let risk = assess(self.profiles.lookup(capability), input.facts.prior_successes);
        let subject = Subject::new(
            input.agent,
            capability,
            input.params,
            input.facts.prior_successes,
            risk.score,
            &self.content_groups,
        );
        let mut checked = 0usize;
        let mut misses: Vec<(&CompiledRule, Miss)> = Vec::new();
        for rank in self.index.candidates(input.agent, capability) {
            let Some(rule) = self.rules.get(rank) else {
                return self.fail_closed(input, risk, "the rule index points past the rules");
            };
            checked += 1;
            match rule.conditions.check(&subject, rule.effect != Effect::Allow) {
                Ok(()) => return self.rule_verdict(rule, input, &subject, risk),
                Err(Miss::Broken) => {
                    return self.fail_closed(input, risk, &format!("rule `{}` could not be checked", rule.name));
                }
                Err(Miss::Capability) => {}
                Err(miss) => {
                    if misses.len() < EXPLAINED_MISSES {
                        misses.push((rule, miss));
                    }
                }
            }
        }
        self.default_verdict(input, &subject, risk, checked, &misses)
    }

    fn rule_verdict(
        &self,
        rule: &CompiledRule,
        input: &EvalInput<'_>,
        subject: &Subject<'_>,
        risk: RiskAssessment,
    ) -> Verdict {
        let approval = (rule.effect == Effect::RequireApproval)
            .then(|| self.route(input.agent, input.capability, Some(&rule.approval)));
        let mut explanation = format!(
            "rule `{}` ({}, priority {}) decided {}: {}",
            rule.name,
            rule.origin,
            rule.priority,
            rule.effect,
            rule.conditions.describe_match(subject).join("; ")
        );
        push_route(&mut explanation, approval.as_ref());
        Verdict {
            effect: rule.effect,
            rule: rule.name.clone(),
            policy_version: self.version.clone(),
            axes: rule.axes.clone(),
            message: rule.message.clone(),
            approval,
            snapshot: Some(rule.snapshot.clone()),
            risk,
            explanation,
        }
    }

    fn default_verdict(
        &self,
        input: &EvalInput<'_>,
        subject: &Subject<'_>,
        risk: RiskAssessment,
        checked: usize,
        misses: &[(&CompiledRule, Miss)],
    ) -> Verdict {
        let effect = self.default_effect;
        let mut explanation = if checked == 0 {
            format!("no rule applies to capability `{}`", input.capability)
        } else {
            let mut text = format!(
                "no rule matched: {checked} rule{} could apply to capability `{}`",
                if checked == 1 { "" } else { "s" },
                input.capability
            );
            if misses.is_empty() {
                text.push_str(", and none of their capability patterns matches it");
            } else {
                text.push_str(" (");
                let described: Vec<String> = misses
                    .iter()
                    .map(|(rule, miss)| format!("`{}`: {}", rule.name, rule.conditions.describe_miss(*miss, subject)))
                    .collect();
                text.push_str(&described.join("; "));
                text.push(')');
            }
            text
        };
        explanation.push_str(&format!("; the default effect {effect} applies"));
        let approval = (effect == Effect::RequireApproval).then(|| self.route(input.agent, input.capability, None));
        push_route(&mut explanation, approval.as_ref());
        Verdict {
            effect,
            rule: "default".to_owned(),
            policy_version: self.version.clone(),
            axes: Vec::new(),
            message: None,
            approval,
            snapshot: None,
            risk,
            explanation,
        }
    }

    /// The verdict for "could not decide": deny, by style rule 3.
    fn fail_closed(&self, input: &EvalInput<'_>, risk: RiskAssessment, reason: &str) -> Verdict {
        Verdict {
            effect: Effect::Deny,
            rule: "default".to_owned(),
            policy_version: self.version.clone(),
            axes: Vec::new(),
            message: None,
            approval: None,
            snapshot: None,
            risk,
            explanation: format!(
                "evaluation error for capability `{}`: {reason}; denied, because evaluation errors deny",
                input.capability
            ),
        }
    }
}

fn push_route(explanation: &mut String, route: Option<&ApprovalRoute>) {
    if let Some(route) = route {
        explanation.push_str(&format!(
            "; approval by group `{}`, quorum {}, within {}s",
            route.group, route.quorum, route.timeout_seconds
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Policy>();
    }

    #[test]
    fn error_display_leaves_out_unknown_positions() {
        let mut error = PolicyError { file: "p.yaml".into(), line: Some(3), column: Some(7), message: "bad".into() };
        assert_eq!(error.to_string(), "p.yaml:3:7: bad");
        error.column = None;
        assert_eq!(error.to_string(), "p.yaml:3: bad");
        error.line = None;
        assert_eq!(error.to_string(), "p.yaml: bad");
    }
}
