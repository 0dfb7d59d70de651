//! Prometheus metrics: request latency, policy evaluation time, decision latency, submitted actions by
//! outcome, finished jobs and webhook outcomes, and two gauges read from the store at scrape time so replicas
//! agree: pending approvals and the job queue depth. Besides the design's series, two say where a proxied model
//! call's time goes: write transactions' commits, and the wait for the model provider.
//!
//! Labels are low-cardinality (route templates, states and configured provider names, never ids). This module
//! does not serve HTTP.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    kind: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncLabels {
    sync: &'static str,
}

/// A configured model provider, and how the wait for its answer ended: `answered`, `failed` or `abandoned`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
    outcome: &'static str,
}

/// How often the gauges read from the store are refreshed at most.
const STORE_GAUGES_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    requests: Family<RouteLabels, Histogram>,
    policy_evaluation: Histogram,
    decision_latency: Histogram,
    actions: Family<StateLabels, Counter>,
    pending_approvals: Gauge,
    replica_feed_deaf: Gauge,
    open_waits: Gauge,
    open_waits_refused: Counter,
    jobs_open: Family<JobLabels, Gauge>,
    jobs_finished: Family<JobLabels, Counter>,
    webhook_deliveries: Family<OutcomeLabels, Counter>,
    commits: Family<SyncLabels, Histogram>,
    llm_upstream: Family<ProviderLabels, Histogram>,
    /// When the gauges read from the store were last refreshed ([`Metrics::store_gauges_due`]).
    store_gauges_read: std::sync::Mutex<Option<Instant>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("countersign");
        let requests = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register("http_request_duration_seconds", "HTTP request latency", requests.clone());
        let policy_evaluation = Histogram::new(exponential_buckets(0.000_001, 2.0, 20));
        registry.register("policy_evaluation_seconds", "Policy evaluation time", policy_evaluation.clone());
        let decision_latency = Histogram::new(exponential_buckets(1.0, 2.0, 18));
        registry.register(
            "approval_decision_latency_seconds",
            "Time from approval request to decision",
            decision_latency.clone(),
        );
        let actions = Family::<StateLabels, Counter>::default();
        registry.register(
            "actions_submitted",
            "Submitted actions by the state the policy put them in",
            actions.clone(),
        );
        let pending_approvals = Gauge::default();
        registry.register("pending_approvals", "Approvals waiting for a decision", pending_approvals.clone());
        let replica_feed_deaf = Gauge::default();
        registry.register(
            "replica_feed_deaf_seconds",
            "With PostgreSQL: how long this replica has not heard the other replicas' changes (its LISTEN \
             connection lost and not back yet); 0 while it hears them, and always with SQLite",
            replica_feed_deaf.clone(),
        );
        let open_waits = Gauge::default();
        registry.register(
            "open_waits",
            "Waits held open on this replica: long polls, held model and MCP tool calls, audit and dashboard \
             streams, MCP resource subscriptions",
            open_waits.clone(),
        );
        let open_waits_refused = Counter::default();
        registry.register(
            "open_waits_refused",
            "Waits refused (429) because their principal already held rate_limit.open_waits of them",
            open_waits_refused.clone(),
        );
        let jobs_open = Family::<JobLabels, Gauge>::default();
        registry.register("jobs_open", "Queued and running jobs (the queue depth)", jobs_open.clone());
        let jobs_finished = Family::<JobLabels, Counter>::default();
        registry.register("jobs_finished", "Jobs that ended, by kind and final state", jobs_finished.clone());
        let webhook_deliveries = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts by outcome (delivered, failed, refused)",
            webhook_deliveries.clone(),
        );
        // From 50 µs: a commit that syncs costs at least the disk's own sync.
        let commits = Family::<SyncLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
        });
        registry.register(
            "store_commit_seconds",
            "Time a write transaction's commit takes until it is acknowledged: on disk (sync=\"durable\"), or, for \
             a model call's claim, whose sync is left to the call's finish, written (sync=\"deferred\"). \
             Commits that fail are not observed",
            commits.clone(),
        );
        // From 100 µs to about 14 minutes: a model can take minutes to answer.
        let llm_upstream = Family::<ProviderLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_1, 2.0, 24))
        });
        registry.register(
            "llm_upstream_seconds",
            "Time from sending a model request the LLM proxy carries out on the client's connection to the \
             provider's response headers (outcome=\"answered\", whatever the status), to the failure to get them \
             (outcome=\"failed\"), or to the client hanging up first (outcome=\"abandoned\"), by provider",
            llm_upstream.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                requests,
                policy_evaluation,
                decision_latency,
                actions,
                pending_approvals,
                replica_feed_deaf,
                open_waits,
                open_waits_refused,
                jobs_open,
                jobs_finished,
                webhook_deliveries,
                commits,
                llm_upstream,
                store_gauges_read: std::sync::Mutex::new(None),
            }),
        }
    }

    pub fn observe_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        self.inner
            .requests
            .get_or_create(&RouteLabels { method: method.to_owned(), route: route.to_owned(), status })
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_policy_evaluation(&self, elapsed: Duration) {
        self.inner.policy_evaluation.observe(elapsed.as_secs_f64());
    }

    pub fn observe_decision_latency(&self, elapsed: Duration) {
        self.inner.decision_latency.observe(elapsed.as_secs_f64());
    }

    pub fn action_submitted(&self, state: &str) {
        self.inner.actions.get_or_create(&StateLabels { state: state.to_owned() }).inc();
    }

    pub fn set_pending_approvals(&self, count: i64) {
        self.inner.pending_approvals.set(count);
    }

    /// Whether the gauges read from the store (pending approvals, open jobs) are due a refresh: at most once
    /// a second, so a client hammering the unauthenticated `/metrics` does not make the store count as often.
    pub fn store_gauges_due(&self) -> bool {
        let mut read = self.inner.store_gauges_read.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if read.is_some_and(|at| now.duration_since(at) < STORE_GAUGES_EVERY) {
            return false;
        }
        *read = Some(now);
        true
    }

    /// One more wait held open ([`crate::gateway::WaitSlot`]), or one fewer (`opened` false).
    pub fn wait_open(&self, opened: bool) {
        self.inner.open_waits.inc_by(if opened { 1 } else { -1 });
    }

    pub fn wait_refused(&self) {
        self.inner.open_waits_refused.inc();
    }

    pub fn set_replica_feed_deaf(&self, deaf: Option<Duration>) {
        self.inner.replica_feed_deaf.set(deaf.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)));
    }

    /// Sets the queue depth; kinds and states absent from `open` go to zero.
    pub fn set_open_jobs(&self, open: &[(String, String, i64)]) {
        for kind in countersign_core::domain::JobKind::ALL {
            for state in ["queued", "running"] {
                let count = open.iter().find(|(k, s, _)| k == kind.as_str() && s == state).map_or(0, |(_, _, n)| *n);
                self.inner
                    .jobs_open
                    .get_or_create(&JobLabels { kind: kind.as_str().to_owned(), state: state.to_owned() })
                    .set(count);
            }
        }
    }

    pub fn job_finished(&self, kind: &str, state: &str) {
        self.inner.jobs_finished.get_or_create(&JobLabels { kind: kind.to_owned(), state: state.to_owned() }).inc();
    }

    pub fn webhook_outcome(&self, outcome: &str) {
        self.inner.webhook_deliveries.get_or_create(&OutcomeLabels { outcome: outcome.to_owned() }).inc();
    }

    /// A write transaction's commit, acknowledged after `elapsed`; `deferred` when its sync was left to a
    /// later commit.
    pub fn observe_commit(&self, deferred: bool, elapsed: Duration) {
        let sync = if deferred { "deferred" } else { "durable" };
        self.inner.commits.get_or_create(&SyncLabels { sync }).observe(elapsed.as_secs_f64());
    }

    /// Starts timing a model request sent inline to `provider`, until [`UpstreamWait::ended`]; dropped before
    /// that (the client hung up and the request with it), it is observed as `abandoned`.
    pub fn llm_upstream_wait(&self, provider: &str) -> UpstreamWait {
        UpstreamWait { metrics: self.clone(), provider: provider.to_owned(), started: Instant::now(), ended: false }
    }

    /// The text exposition format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)?;
        Ok(out)
    }
}

/// The wait for a model provider's response headers, observed once: see [`Metrics::llm_upstream_wait`].
pub struct UpstreamWait {
    metrics: Metrics,
    provider: String,
    started: Instant,
    ended: bool,
}

impl UpstreamWait {
    /// The headers came (`answered`, whatever the status) or the request failed.
    pub fn ended(mut self, answered: bool) {
        self.observe(if answered { "answered" } else { "failed" });
    }

    fn observe(&mut self, outcome: &'static str) {
        self.ended = true;
        let labels = ProviderLabels { provider: std::mem::take(&mut self.provider), outcome };
        self.metrics.inner.llm_upstream.get_or_create(&labels).observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for UpstreamWait {
    fn drop(&mut self) {
        if !self.ended {
            self.observe("abandoned");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn store_gauges_are_read_at_most_once_a_second() {
        let metrics = Metrics::new();
        assert!(metrics.store_gauges_due(), "the first scrape reads them");
        assert!(!metrics.store_gauges_due(), "a scrape right after serves what was read");
        *metrics.inner.store_gauges_read.lock().unwrap() = Some(Instant::now() - STORE_GAUGES_EVERY);
        assert!(metrics.store_gauges_due(), "a second later they are read again");
    }
}
