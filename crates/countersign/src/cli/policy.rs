//! `policy check FILE`, `policy test FILE --cases CASES.yaml` (both offline, no server, no key) and
//! `policy explain` (the server's current policy, `POST /v1/policy/evaluate`).
//!
//! `check` loads the file (or a folder's `.yaml`/`.yml` files) exactly as the server does
//! (`gateway::policy::load_policy_path`) and prints the error as `file:line:column: message`. `test` runs a
//! YAML list of cases, like `opa test`:
//!
//! ```yaml
//! cases:                      # or the list itself at the top level
//!   - name: deletes are refused
//!     action: {capability: db.delete.row, agent: bot, params: {}, reasoning: "optional, not evaluated"}
//!     expect: {effect: deny, rule: no-deletes}   # rule is optional
//! ```
//!
//! `action.prior_successes` (default 0) sets the one fact evaluation takes (0 means `first_use`). Nothing
//! here evaluates differently from the server: it is `Policy::evaluate`.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use countersign_core::capability::Capability;
use countersign_core::policy::{Effect, EvalInput, Facts, Policy, PolicyError};
use serde::Deserialize;
use serde_json::{Value, json};

use super::output::{self, details, field};
use super::{Ctx, Failure, Outcome, parse_json};
use crate::gateway::policy::load_policy_path;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Compile a policy file (or folder) offline; errors name file:line:column. Exit 1 when invalid.
    Check { file: PathBuf },
    /// Run a YAML file of cases against a policy offline; exit 1 if any case fails.
    Test {
        file: PathBuf,
        /// The cases: `[{name, action: {capability, params, agent, reasoning?}, expect: {effect, rule?}}]`.
        #[arg(long)]
        cases: PathBuf,
    },
    /// Ask the server how its current policy decides an action, and why (admins).
    Explain {
        #[arg(long)]
        capability: String,
        /// The parameters, a JSON object.
        #[arg(long)]
        params: Option<String>,
        /// The agent's name (default `-`, an agent that no agent-specific rule names).
        #[arg(long, default_value = "-")]
        agent: String,
    },
}

pub async fn run(ctx: &Ctx, command: PolicyCommand) -> Outcome {
    match command {
        PolicyCommand::Check { file } => check(ctx, &file),
        PolicyCommand::Test { file, cases } => test(ctx, &file, &cases),
        PolicyCommand::Explain { capability, params, agent } => {
            let params = match params {
                Some(text) => parse_json("--params", &text)?,
                None => json!({}),
            };
            let client = ctx.client()?;
            let verdict = ctx.call(client.evaluate_policy(&agent, &capability, &params)).await?.body;
            ctx.show(&verdict, explain_view)?;
            Ok(0)
        }
    }
}

fn error_json(error: &PolicyError) -> Value {
    json!({"file": error.file, "line": error.line, "column": error.column, "message": error.message})
}

fn load(ctx: &Ctx, file: &Path) -> Result<Policy, Failure> {
    load_policy_path(file).map_err(|error| {
        if ctx.json() {
            let _ = output::json(&json!({"valid": false, "error": error_json(&error)}));
        }
        output::note(&format!("error: {}", output::clean(&error.to_string())));
        Failure::Quiet(1)
    })
}

fn check(ctx: &Ctx, file: &Path) -> Outcome {
    let policy = load(ctx, file)?;
    // The same document as the server's `POST /v1/policy/validate`.
    let report = json!({"valid": true, "version": policy.version(), "rules": policy.rule_count()});
    ctx.show(&report, |_| {
        format!("ok: {}: {} rules, version {}", file.display(), policy.rule_count(), policy.version())
    })?;
    Ok(0)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CasesDocument {
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    action: CaseAction,
    expect: Expectation,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseAction {
    capability: String,
    agent: String,
    #[serde(default)]
    params: Option<Value>,
    /// Accepted so a case can be a real submitted action; the policy does not read it.
    #[serde(default, rename = "reasoning")]
    _reasoning: Option<Value>,
    #[serde(default)]
    prior_successes: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expectation {
    effect: Effect,
    #[serde(default)]
    rule: Option<String>,
}

/// Reads the cases: a top-level list, or a mapping with `cases:`; errors carry `file:line:column`.
fn read_cases(path: &Path) -> Result<Vec<Case>, Failure> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| Failure::Message(format!("cannot read {name}: {e}")))?;
    let located = |error: yaml_serde::Error| {
        let message = error.to_string();
        match error.location() {
            Some(at) => {
                let message = message.replacen(&format!(" at line {} column {}", at.line(), at.column()), "", 1);
                Failure::Message(format!("{name}:{}:{}: {message}", at.line(), at.column()))
            }
            None => Failure::Message(format!("{name}: {message}")),
        }
    };
    let shape: yaml_serde::Value = yaml_serde::from_str(&text).map_err(located)?;
    if shape.is_sequence() {
        yaml_serde::from_str::<Vec<Case>>(&text).map_err(located)
    } else {
        yaml_serde::from_str::<CasesDocument>(&text).map(|d| d.cases).map_err(located)
    }
}

fn run_case(policy: &Policy, case: &Case) -> Value {
    let expected = json!({"effect": case.expect.effect, "rule": case.expect.rule});
    let failed =
        |error: String| json!({"name": case.name, "ok": false, "expected": expected, "actual": null, "error": error});
    let capability = match Capability::parse(&case.action.capability) {
        Ok(c) => c,
        Err(e) => return failed(format!("invalid capability: {e}")),
    };
    let params = case.action.params.clone().unwrap_or_else(|| json!({}));
    if !params.is_object() {
        return failed("params must be a mapping".into());
    }
    let facts = Facts { prior_successes: case.action.prior_successes };
    let verdict = policy.evaluate(&EvalInput {
        agent: &case.action.agent,
        capability: &capability,
        params: &params,
        facts: &facts,
    });
    let ok = verdict.effect == case.expect.effect && case.expect.rule.as_ref().is_none_or(|r| *r == verdict.rule);
    json!({
        "name": case.name,
        "ok": ok,
        "expected": expected,
        "actual": {"effect": verdict.effect, "rule": verdict.rule, "explanation": verdict.explanation},
        "error": null,
    })
}

fn test(ctx: &Ctx, file: &Path, cases_path: &Path) -> Outcome {
    let policy = load(ctx, file)?;
    let cases = read_cases(cases_path)?;
    if cases.is_empty() {
        return Err(Failure::Message(format!("{}: no cases", cases_path.display())));
    }
    let results: Vec<Value> = cases.iter().map(|case| run_case(&policy, case)).collect();
    let failed = results.iter().filter(|r| r.get("ok") != Some(&Value::Bool(true))).count();
    let passed = results.len() - failed;
    let report = json!({
        "policy_version": policy.version(),
        "passed": passed,
        "failed": failed,
        "cases": results,
    });
    ctx.show(&report, |_| {
        let mut lines = Vec::new();
        for r in &results {
            let name = field(r, "/name");
            if r.get("ok") == Some(&Value::Bool(true)) {
                lines.push(format!("PASS  {name}"));
                continue;
            }
            let expected = describe(&r["expected"]);
            match r.get("error").and_then(Value::as_str) {
                Some(error) => lines.push(format!("FAIL  {name}: {}", output::clean(error))),
                None => {
                    lines.push(format!("FAIL  {name}: expected {expected}, got {}", describe(&r["actual"])));
                    lines.push(format!("      {}", field(r, "/actual/explanation")));
                }
            }
        }
        lines.push(format!(
            "{passed} passed, {failed} failed ({} cases, policy version {})",
            results.len(),
            policy.version().get(..12).unwrap_or(policy.version())
        ));
        lines.join("\n")
    })?;
    Ok(if failed == 0 { 0 } else { 1 })
}

fn describe(outcome: &Value) -> String {
    match outcome.get("rule").and_then(Value::as_str) {
        Some(rule) => format!("{} (rule {})", field(outcome, "/effect"), output::clean(rule)),
        None => field(outcome, "/effect"),
    }
}

fn explain_view(v: &Value) -> String {
    let approval = match v.get("approval").filter(|a| !a.is_null()) {
        Some(a) => format!(
            "group {}, quorum {}, expires after {}",
            field(a, "/group"),
            field(a, "/quorum"),
            a.get("timeout_seconds").and_then(Value::as_u64).map(output::human_span).unwrap_or_else(|| "-".into())
        ),
        None => "-".into(),
    };
    let axes = v
        .get("axes")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "-".into());
    let mut text = details(&[
        ("effect", field(v, "/effect")),
        ("rule", field(v, "/rule")),
        ("axes", axes),
        ("approval", approval),
        ("message", field(v, "/message")),
        ("risk", field(v, "/risk/score")),
        ("explanation", field(v, "/explanation")),
        ("policy", field(v, "/policy_version")),
    ]);
    if let Some(snapshot) = v.get("snapshot").filter(|s| !s.is_null()) {
        text.push_str(&format!("\n\nrule as written:\n{}", output::block(snapshot, 2)));
    }
    text
}
