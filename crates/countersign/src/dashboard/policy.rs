//! The Policy page: the org's current policy (text, version, origin, rule count); validating a pasted
//! policy, with the error's file, line and column; and a dry run of an action (capability, params JSON,
//! agent) showing the verdict and its explanation.
//!
//! Compiling and evaluating are the gateway's (`check_policy`, `evaluate_policy`, which creates nothing);
//! this module parses the forms and renders. Activating a policy is left to the API and the CLI.

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use countersign_core::capability::Capability;
use countersign_core::policy::Verdict;
use serde::Deserialize;
use serde_json::Value;

use super::DashboardState;
use super::approvals::Chrome;
use super::session::{Posted, UiUser};
use super::view::{self, render};
use crate::error::Error;

pub struct PolicyFile {
    pub name: String,
    pub source: String,
}

/// The outcome of validating a pasted policy.
pub enum Checked {
    Valid { version: String, rules: usize },
    Invalid { file: String, line: String, column: String, message: String, whole: String },
}

/// The outcome of a dry run.
pub struct DryRun {
    pub effect: String,
    pub rule: String,
    pub axes: String,
    pub message: Option<String>,
    pub explanation: String,
    pub approval: Option<String>,
    pub risk: String,
    pub risk_factors: Vec<String>,
    pub snapshot: Option<String>,
}

impl DryRun {
    fn new(v: &Verdict) -> DryRun {
        let axes = v
            .axes
            .iter()
            .filter_map(|a| serde_json::to_value(a).ok().and_then(|v| v.as_str().map(str::to_owned)))
            .collect::<Vec<_>>()
            .join(", ");
        DryRun {
            effect: v.effect.as_str().to_owned(),
            rule: v.rule.clone(),
            axes,
            message: v.message.clone(),
            explanation: v.explanation.clone(),
            approval: v.approval.as_ref().map(|r| {
                format!(
                    "{} approval(s) from group `{}` within {}",
                    r.quorum,
                    r.group,
                    view::span(i64::try_from(r.timeout_seconds).unwrap_or(i64::MAX))
                )
            }),
            risk: format!("{:.2}", v.risk.score),
            risk_factors: v.risk.factors.clone(),
            snapshot: v.snapshot.as_ref().map(view::yaml),
        }
    }
}

#[derive(Deserialize, Default)]
pub struct ValidateForm {
    #[serde(default)]
    source: String,
}

#[derive(Deserialize, Default)]
pub struct DryRunForm {
    #[serde(default)]
    agent: String,
    #[serde(default)]
    capability: String,
    #[serde(default)]
    params: String,
}

#[derive(Template)]
#[template(path = "policy.html")]
struct PolicyPage {
    chrome: Chrome,
    version: String,
    origin: String,
    rules: usize,
    files: Vec<PolicyFile>,
    /// Why this user may not dry-run (the gateway's admin check).
    blocked: Option<String>,
    validate: ValidateForm,
    checked: Option<Checked>,
    dry: DryRunForm,
    dry_run: Option<DryRun>,
    dry_error: Option<String>,
}

fn page(
    state: &DashboardState,
    ui: &UiUser,
    validate: ValidateForm,
    checked: Option<Checked>,
    dry: DryRunForm,
    outcome: Option<Result<DryRun, String>>,
) -> Result<PolicyPage, Error> {
    // An org refused its stored policy still gets the page: it says why, and validate prepares the fix.
    let (version, origin, rules, files) = match state.gateway.current_policy(&ui.caller) {
        Ok(active) => (
            active.policy.version().to_owned(),
            active.origin.clone(),
            active.policy.rule_count(),
            active
                .policy
                .sources()
                .iter()
                .map(|(name, source)| PolicyFile { name: name.clone(), source: source.clone() })
                .collect(),
        ),
        Err(Error::Conflict { message, .. }) => ("none".to_owned(), format!("none: {message}"), 0, Vec::new()),
        Err(other) => return Err(other),
    };
    let (dry_run, dry_error) = match outcome {
        Some(Ok(run)) => (Some(run), None),
        Some(Err(message)) => (None, Some(message)),
        None => (None, None),
    };
    Ok(PolicyPage {
        chrome: Chrome::new(ui, "policy"),
        version,
        origin,
        rules,
        files,
        blocked: view::admin_block(ui),
        validate,
        checked,
        dry,
        dry_run,
        dry_error,
    })
}

fn fresh_dry() -> DryRunForm {
    DryRunForm { params: "{}".into(), ..DryRunForm::default() }
}

pub async fn show(State(state): State<DashboardState>, ui: UiUser) -> Result<Response, Error> {
    Ok(render(StatusCode::OK, &page(&state, &ui, ValidateForm::default(), None, fresh_dry(), None)?))
}

pub async fn validate(State(state): State<DashboardState>, posted: Posted<ValidateForm>) -> Result<Response, Error> {
    let Posted { ui, form } = posted;
    // A non-admin sees the page saying why (the form is shown disabled), not a bare refusal.
    if view::admin_block(&ui).is_some() {
        return Ok(render(StatusCode::FORBIDDEN, &page(&state, &ui, form, None, fresh_dry(), None)?));
    }
    let files = [("policy.yaml".to_owned(), form.source.clone())];
    let (status, checked) = match state.gateway.check_policy(&ui.caller, &files)? {
        Ok(policy) => {
            (StatusCode::OK, Checked::Valid { version: policy.version().to_owned(), rules: policy.rule_count() })
        }
        Err(e) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Checked::Invalid {
                file: e.file.clone(),
                line: e.line.map(|l| l.to_string()).unwrap_or_default(),
                column: e.column.map(|c| c.to_string()).unwrap_or_default(),
                message: e.message.clone(),
                whole: e.to_string(),
            },
        ),
    };
    Ok(render(status, &page(&state, &ui, form, Some(checked), fresh_dry(), None)?))
}

/// Parses the dry-run form and asks the gateway; a refusal comes back as the message to show.
async fn dry_run(state: &DashboardState, ui: &UiUser, form: &DryRunForm) -> Result<Verdict, Error> {
    let capability =
        Capability::parse(form.capability.trim()).map_err(|e| Error::invalid("capability", e.to_string()))?;
    let params: Value = match form.params.trim() {
        "" => Value::Object(Default::default()),
        text => serde_json::from_str(text)
            .map_err(|e| Error::bad_request("params", format!("the params are not JSON: {e}")))?,
    };
    if !params.is_object() {
        return Err(Error::bad_request("params", "the params must be a JSON object"));
    }
    let agent = form.agent.trim();
    if agent.is_empty() {
        return Err(Error::bad_request("agent", "name the agent the action would come from"));
    }
    state.gateway.evaluate_policy(&ui.caller, agent, &capability, &params).await
}

pub async fn evaluate(State(state): State<DashboardState>, posted: Posted<DryRunForm>) -> Result<Response, Error> {
    let Posted { ui, form } = posted;
    let (status, outcome) = match dry_run(&state, &ui, &form).await {
        Ok(verdict) => (StatusCode::OK, Ok(DryRun::new(&verdict))),
        Err(error) => {
            let (status, message) = view::shown(error)?;
            (status, Err(message))
        }
    };
    Ok(render(status, &page(&state, &ui, ValidateForm::default(), None, form, Some(outcome))?))
}
