//! The jobs pages: the org's jobs with kind and state filters and cursor pages, and one job in detail
//! (progress, result, error) with a Cancel button for admins.
//!
//! Which jobs a user sees and whether a job may be cancelled are the gateway's answers (`list_jobs`,
//! `cancel_job`); this module only parses the filters and renders.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use countersign_core::domain::{Job, JobKind};
use countersign_core::ids::JobId;
use countersign_core::state::JobState;
use serde::Deserialize;

use super::DashboardState;
use super::approvals::Chrome;
use super::session::{CsrfField, Posted, UiUser};
use super::view::{self, render};
use crate::error::Error;

const JOBS_LIMIT: u32 = 50;

pub struct JobRow {
    pub id: String,
    pub kind: String,
    pub subject: String,
    pub state: String,
    pub attempts: String,
    pub created: String,
    pub run_at: String,
    pub finished: String,
}

impl JobRow {
    fn new(job: &Job) -> JobRow {
        JobRow {
            id: job.id.to_string(),
            kind: job.kind.as_str().to_owned(),
            subject: job.subject.clone().unwrap_or_default(),
            state: job.state.as_str().to_owned(),
            attempts: format!("{}/{}", job.attempts, job.max_attempts),
            created: view::clock(job.created_at),
            run_at: view::clock(job.run_at),
            finished: view::opt_clock(job.finished_at),
        }
    }
}

#[derive(Template)]
#[template(path = "jobs.html")]
struct JobsPage {
    chrome: Chrome,
    rows: Vec<JobRow>,
    kind: String,
    state: String,
    kinds: Vec<String>,
    states: Vec<String>,
    next: Option<String>,
}

#[derive(Deserialize, Default)]
pub struct JobsQuery {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
}

/// `""` and `all` mean no filter.
fn chosen(value: Option<String>) -> String {
    value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty() && v != "all").unwrap_or_else(|| "all".into())
}

pub async fn list(
    State(state): State<DashboardState>,
    ui: UiUser,
    Query(query): Query<JobsQuery>,
) -> Result<Response, Error> {
    let kind_text = chosen(query.kind);
    let state_text = chosen(query.state);
    let page = crate::http::page_from(Some(JOBS_LIMIT), query.cursor.filter(|c| !c.is_empty()))?;
    let chosen_filter = |text: &str| (text != "all").then(|| text.to_owned());
    let filter =
        crate::gateway::job_filter(chosen_filter(&kind_text).as_deref(), chosen_filter(&state_text).as_deref(), None)?;
    let (jobs, next) = state.gateway.list_jobs(&ui.caller, &filter, &page).await?;
    let kinds = std::iter::once("all").chain(JobKind::ALL.iter().map(|k| k.as_str())).map(String::from).collect();
    let states = std::iter::once("all").chain(JobState::ALL.iter().map(|s| s.as_str())).map(String::from).collect();
    let page = JobsPage {
        chrome: Chrome::new(&ui, "jobs"),
        rows: jobs.iter().map(JobRow::new).collect(),
        kind: kind_text,
        state: state_text,
        kinds,
        states,
        next,
    };
    Ok(render(StatusCode::OK, &page))
}

#[derive(Template)]
#[template(path = "job.html")]
struct JobPage {
    chrome: Chrome,
    row: JobRow,
    started: String,
    lease: String,
    progress: Option<String>,
    result: Option<String>,
    job_error: Option<String>,
    cancellable: bool,
    blocked: Option<String>,
    error: Option<String>,
}

fn parse_id(id: &str) -> Result<JobId, Error> {
    JobId::parse(id).ok_or_else(|| Error::not_found("job", id))
}

fn job_page(ui: &UiUser, job: &Job, error: Option<String>) -> JobPage {
    JobPage {
        chrome: Chrome::new(ui, "jobs"),
        row: JobRow::new(job),
        started: view::opt_clock(job.started_at),
        lease: match (&job.lease_owner, job.lease_until) {
            (Some(owner), Some(until)) => format!("{owner} until {}", view::clock(until)),
            _ => String::new(),
        },
        progress: job.progress.as_ref().map(view::pretty_json),
        result: job.result.as_ref().map(view::pretty_json),
        job_error: job.error.clone(),
        cancellable: !job.state.is_terminal(),
        blocked: view::admin_block(ui),
        error,
    }
}

pub async fn detail(
    State(state): State<DashboardState>,
    ui: UiUser,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    let job = state.gateway.get_job(&ui.caller, &parse_id(&id)?).await?;
    Ok(render(StatusCode::OK, &job_page(&ui, &job, None)))
}

pub async fn cancel(
    State(state): State<DashboardState>,
    Path(id): Path<String>,
    posted: Posted<CsrfField>,
) -> Result<Response, Error> {
    let ui = posted.ui;
    let id = parse_id(&id)?;
    match state.gateway.cancel_job(&ui.caller, &id).await {
        Ok(job) => Ok(Redirect::to(&format!("/ui/jobs/{}", job.id)).into_response()),
        Err(error) => {
            let (status, message) = view::shown(error)?;
            let job = state.gateway.get_job(&ui.caller, &id).await?;
            Ok(render(status, &job_page(&ui, &job, Some(message))))
        }
    }
}
