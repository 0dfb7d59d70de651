//! The PostgreSQL store: one database shared by any number of gateway replicas.
//!
//! SQLite serialises writers with one file lock; here several replicas write at once, and the store keeps the
//! gateway's read-check-write steps safe with row locks instead:
//!
//! - **Writer transactions** ([`Store::write`]) run at READ COMMITTED and are marked as writers. In them, every
//!   read of a mutable row the gateway may then change — `get_action`, `find_action_by_idempotency_key`,
//!   `get_approval`, `find_approval_by_token_hash`, `get_job`, `get_webhook`, `find_session_by_hash` and
//!   `retention` — is `SELECT … FOR NO KEY UPDATE`. Two replicas deciding the same approval queue on its row; the
//!   second reads it only after the first commits, and so sees it decided. A lookup that finds nothing locks
//!   nothing: two concurrent inserts of the same unique key meet at the unique index and the second gets
//!   `StoreError::Conflict`.
//! - **The audit head.** `audit_heads` holds each org's newest `(seq, hash)`. `append_audit` locks that row
//!   (creating it at seq 0 on the org's first event), seals the event after it, inserts the event and moves the
//!   head in one statement. Appends to one org from any number of replicas therefore queue on one row and the
//!   chain stays gapless; different orgs never wait for each other. The lock is held until commit, so a
//!   transaction that appends should take its other row locks first, or PostgreSQL may break a lock cycle by
//!   failing one transaction (mapped to `StoreError::Unavailable`).
//! - **Policies.** A writer locks the org's row before it reads or inserts a policy, so an org's policy writes
//!   take turns and the newest `seq` is the last committed (`lock_org_policy`).
//! - **Jobs** are claimed with `FOR NO KEY UPDATE SKIP LOCKED`: a claimer skips rows another replica is claiming, so
//!   each due job goes to exactly one replica and claimers never wait for each other.
//! - **Reader transactions** ([`Store::read`]) are `REPEATABLE READ READ ONLY`: one consistent snapshot (as a
//!   SQLite read transaction has), no locks, and no serialization failures.
//!
//! Between replicas, [`StoreTx::publish`] is `NOTIFY` on [`CHANGES_CHANNEL`] inside the transaction (delivered
//! only if it commits), and [`PostgresStore::subscribe`] is the `LISTEN` side, on a connection of its own.
//!
//! Connections speak TLS when the server offers it (sqlx's default `sslmode=prefer`, rustls with the system's
//! roots). Only `sslmode=verify-full` checks the server's certificate and name; connecting to a host off this
//! machine without it logs a warning at start. (`verify-ca` skips the name, and sqlx trusts the system's
//! roots beside `sslrootcert`, so any publicly trusted certificate would pass: it gets the warning too.)
//!
//! The schema (`migrations/postgres/`) refuses to change or remove audit events and checkpoints with trigger
//! functions, exactly as the SQLite triggers do. Rows become domain records through the shared mappers in
//! `rows`; this module holds no business rules.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use countersign_core::audit::{AuditEvent, GENESIS_HASH, NewAuditEvent};
use countersign_core::capability::NameGlob;
use countersign_core::checkpoint::Checkpoint;
use countersign_core::domain::{
    Action, Agent, ApiKey, Approval, DecisionRecord, Delivery, Job, JobKind, Org, PrincipalRef, Session, StoredPolicy,
    User, Webhook,
};
use countersign_core::ids::{ActionId, AgentId, ApprovalId, JobId, KeyId, OrgId, SessionId, UserId, WebhookId};
use countersign_core::risk::PRECEDENT_CAP;
use countersign_core::state::{ActionState, ApprovalStatus, JobState};
use countersign_core::store::{
    ActionFilter, AuditFilter, AuditHead, JobEnd, JobFilter, Listed, PAGE_BYTES, Page, PendingDeadline, Retention,
    Store, StoreError, StoreTx,
};
use sqlx::postgres::{PgArguments, PgConnectOptions, PgListener, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Row, Transaction};

use crate::rows::{
    SqlxRow, action_bytes, action_row, agent_row, approval_row, audit_row, audit_rows, batch_error, checkpoint_row,
    corrupt, dashboard_session_row, decision_row, delivery_row, from_us, get, job_row, key_row, limit, map_sqlx,
    migrator, opt_from_us, opt_us, org_row, page_cut, policy_row, retention_row, revoked_sessions, seal_pending,
    session_row, to_json, to_us, user_row, webhook_row, within_page_bytes,
};
use crate::writes::{self, Expect, Write, push_write};

const MIGRATIONS: [(i64, &str, &str); 4] = [
    (1, "init", include_str!("../migrations/postgres/0001_init.sql")),
    (2, "instance_secrets", include_str!("../migrations/postgres/0002_instance_secrets.sql")),
    (3, "dashboard_sessions", include_str!("../migrations/postgres/0003_dashboard_sessions.sql")),
    (4, "session_minting_key", include_str!("../migrations/postgres/0004_session_minting_key.sql")),
];

/// Prepared statements kept per connection (sqlx's default is 100).
const STATEMENT_CACHE: usize = 400;

/// Settings each pooled connection makes for its session (with `SET`, which any role may, and which passes
/// through connection poolers that refuse startup options), each unless the database URL's `options` names
/// it. A replica whose host dies or is cut off while its transaction holds row locks (an org's audit head,
/// an approval) would otherwise keep them until the server's TCP stack gives up on it (two hours by default),
/// and every other replica's writes to that org would queue behind them: the server now probes an idle
/// connection after 30 s and ends it after three unanswered probes 10 s apart. A transaction left open and
/// idle for 5 minutes (none of the gateway's is) is ended too.
const SESSION_SETTINGS: [(&str, &str); 4] = [
    ("tcp_keepalives_idle", "30"),
    ("tcp_keepalives_interval", "10"),
    ("tcp_keepalives_count", "3"),
    ("idle_in_transaction_session_timeout", "'5min'"),
];

/// The `SET` statements of [`SESSION_SETTINGS`] not named in the URL's `options` (`-c name=value …`).
fn session_settings(url_options: &str) -> String {
    SESSION_SETTINGS
        .iter()
        .filter(|(name, _)| !url_options.contains(name))
        .map(|(name, value)| format!("SET {name} = {value};"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The oldest server this store works with (`server_version_num`): 13 (`MATERIALIZED` common table
/// expressions need 12).
const MIN_SERVER_VERSION: u32 = 130_000;

/// Connections per replica. Each open transaction holds one.
const MAX_CONNECTIONS: u32 = 16;
/// How long a transaction waits for a free connection before the store answers `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The `LISTEN`/`NOTIFY` channel on which each commit tells the other replicas what it changed.
pub const CHANGES_CHANNEL: &str = "countersign_changes";

/// Heartbeats of the replica feed (see [`ReplicaFeed`]); their messages are empty.
const HEARTBEAT_CHANNEL: &str = "countersign_heartbeat";
/// How long the replica feed hears nothing before it publishes a heartbeat.
pub const HEARTBEAT_QUIET: Duration = Duration::from_secs(5);
/// How long after publishing a heartbeat the feed gives its connection up if it has heard nothing.
pub const HEARTBEAT_ECHO: Duration = Duration::from_secs(5);
/// How often the feed says [`FeedEvent::Deaf`] while it cannot listen.
pub const DEAF_REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// The `application_name` of the replica feed's connection (the pool's are `countersign`).
pub const FEED_APPLICATION_NAME: &str = "countersign replica feed";
/// How long the replica feed waits before trying to listen again after a failure: at first, and at most.
const FIRST_RELISTEN_DELAY: Duration = Duration::from_millis(250);
const MAX_RELISTEN_DELAY: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Kept to open the replica feed's own connection; holds the password, so it is left out of `Debug`.
    options: PgConnectOptions,
    /// Set when a connection from the pool turned out dead (see [`PING_IDLE`]).
    lost: ConnectionLost,
}

/// A connection idle for this long or longer is pinged before the pool hands it out. sqlx pings every
/// connection as it returns to the pool, and by default again as it leaves it: a round trip before every
/// transaction. A connection back for less than this was alive a moment ago; one idle longer may have been
/// dropped by the server or by something on the way (then the ping fails and the pool opens another). When a
/// `BEGIN` nonetheless meets a dead connection (the server restarted or failed over within that second), the
/// others may be dead too: for [`PING_ALL_AFTER_LOSS`] every connection is pinged before it is handed out,
/// and the `BEGIN` is tried once more.
const PING_IDLE: Duration = Duration::from_secs(1);

/// See [`PING_IDLE`].
const PING_ALL_AFTER_LOSS: Duration = Duration::from_secs(5);

/// When a connection from the pool was last found dead (see [`PING_IDLE`]).
#[derive(Clone, Default)]
struct ConnectionLost(Arc<Mutex<Option<Instant>>>);

impl ConnectionLost {
    fn noticed(&self) {
        if let Ok(mut at) = self.0.lock() {
            *at = Some(Instant::now());
        }
    }

    /// Whether a connection idle for `idle_for` is pinged before it is handed out.
    fn ping(&self, idle_for: Duration) -> bool {
        let lately = match self.0.lock() {
            Ok(at) => at.is_some_and(|at| at.elapsed() < PING_ALL_AFTER_LOSS),
            Err(_) => true,
        };
        lately || idle_for >= PING_IDLE
    }
}

/// An error that says the connection itself is gone (closed, reset, or ended by the server), not that the
/// statement failed.
fn connection_gone(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) => true,
        // Class 08: connection exception; 57P01/57P02: the server ended the session (shutdown, crash).
        sqlx::Error::Database(db) => db.code().is_some_and(|c| c.starts_with("08") || c == "57P01" || c == "57P02"),
        _ => false,
    }
}

/// Whether a connection made with `options` checks the server's certificate and name (`verify-full`), or
/// needs no TLS (a Unix socket, or the loopback interface, which never leaves the machine).
fn certificate_verified(options: &PgConnectOptions) -> bool {
    use sqlx::postgres::PgSslMode;
    let host = options.get_host();
    let local = options.get_socket().is_some()
        || host.starts_with('/')
        || host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    local || matches!(options.get_ssl_mode(), PgSslMode::VerifyFull)
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`) and brings the schema up to date.
    /// Several replicas may start at once: sqlx holds an advisory lock while it migrates.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Internal(format!("invalid database URL: {e}")))?
            .application_name("countersign")
            // Batches of queued writes vary (which writes, how many audit rows): room to keep them prepared.
            .statement_cache_capacity(STATEMENT_CACHE);
        if !certificate_verified(&options) {
            tracing::warn!(
                host = options.get_host(),
                "the PostgreSQL server's certificate is not verified, so the connection could be read or altered \
                 on the way; add `sslmode=verify-full` (and `sslrootcert=/path/to/ca.pem` unless the system's roots \
                 sign it) to the database URL"
            );
        }
        let lost = ConnectionLost::default();
        let hook = lost.clone();
        let settings = session_settings(options.get_options().unwrap_or_default());
        let pool = PgPoolOptions::new()
            .after_connect(move |conn, _| {
                let settings = settings.clone();
                Box::pin(async move {
                    if !settings.is_empty() {
                        sqlx::Executor::execute(&mut *conn, AssertSqlSafe(settings)).await?;
                    }
                    Ok(())
                })
            })
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .before_acquire(move |conn, meta| {
                let ping = hook.ping(meta.idle_for);
                Box::pin(async move {
                    if ping {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options.clone())
            .await
            .map_err(map_sqlx)?;
        let (number, version): (String, String) =
            sqlx::query_as("SELECT current_setting('server_version_num'), current_setting('server_version')")
                .fetch_one(&pool)
                .await
                .map_err(map_sqlx)?;
        if number.parse::<u32>().is_ok_and(|n| n < MIN_SERVER_VERSION) {
            return Err(StoreError::Internal(format!("PostgreSQL 13 or newer is needed; this server is {version}")));
        }
        migrator(&MIGRATIONS).run(&pool).await.map_err(|e| StoreError::Internal(format!("migration failed: {e}")))?;
        Ok(PostgresStore { pool, options, lost })
    }

    /// A transaction begun with `begin` (see [`PING_IDLE`] for the second try).
    async fn begin(&self, begin: &'static str) -> Result<Transaction<'static, Postgres>, StoreError> {
        match self.pool.begin_with(begin).await {
            Ok(tx) => Ok(tx),
            Err(e) if connection_gone(&e) => {
                tracing::info!(error = %e, "a pooled connection was gone; pinging the others and beginning again");
                self.lost.noticed();
                self.pool.begin_with(begin).await.map_err(map_sqlx)
            }
            Err(e) => Err(map_sqlx(e)),
        }
    }

    /// The connection pool, for what the `Store` trait does not cover.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Starts listening to what the other replicas publish ([`StoreTx::publish`]), on a connection of its
    /// own (not one of the pool's). A replica hears its own messages too.
    pub async fn subscribe(&self) -> Result<ReplicaFeed, StoreError> {
        let options = self.options.clone().application_name(FEED_APPLICATION_NAME);
        let listener = listen(&options).await?;
        Ok(ReplicaFeed {
            options,
            pool: self.pool.clone(),
            listener: Some(listener),
            last_heard: Instant::now(),
            asked: None,
            reported_deaf: None,
            next_attempt: Instant::now(),
            retry: FIRST_RELISTEN_DELAY,
            health: FeedHealth::default(),
        })
    }
}

/// Listens on a connection of a pool of its own. A pool per connection: a listener given up as deaf keeps its
/// connection (sqlx sends it `UNLISTEN` as it drops) for as long as the server behind it does not answer, so
/// the next listener must not wait for that one.
async fn listen(options: &PgConnectOptions) -> Result<PgListener, StoreError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_lazy_with(options.clone());
    let mut listener = PgListener::connect_with(&pool).await.map_err(map_sqlx)?;
    listener.ignore_pool_close_event(true);
    // A lost connection is the feed's to replace (and to report), not sqlx's to replace silently.
    listener.eager_reconnect(false);
    tokio::time::timeout(ACQUIRE_TIMEOUT, listener.listen_all([CHANGES_CHANNEL, HEARTBEAT_CHANNEL]))
        .await
        .map_err(|_| StoreError::Unavailable(format!("LISTEN got no answer within {ACQUIRE_TIMEOUT:?}")))?
        .map_err(map_sqlx)?;
    Ok(listener)
}

/// What the replica feed hears.
#[derive(Debug, PartialEq, Eq)]
pub enum FeedEvent {
    /// A message a replica (this one included) published.
    Message(String),
    /// Not listening: the connection was lost, or heard nothing (not even a heartbeat) for too long, and a
    /// new one is not listening yet. Said at once and then every [`DEAF_REPORT_INTERVAL`] while it lasts:
    /// anything published meanwhile is missed, so the caller should re-read what it watches each time.
    Deaf,
    /// Listening again after a loss: anything published in between was missed, so the caller should re-read
    /// what it watches.
    Resumed,
}

/// Whether a replica feed is listening, for readiness; shared with whoever asks.
#[derive(Clone, Debug)]
pub struct FeedHealth(Arc<Mutex<Option<Instant>>>);

impl Default for FeedHealth {
    fn default() -> Self {
        FeedHealth(Arc::new(Mutex::new(None)))
    }
}

impl FeedHealth {
    /// How long the feed has not been listening, or `None` while it listens.
    pub fn deaf_for(&self) -> Option<Duration> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).map(|since| since.elapsed())
    }

    fn set_deaf(&self, deaf: bool) {
        let mut since = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match (deaf, *since) {
            (true, None) => *since = Some(Instant::now()),
            (false, _) => *since = None,
            (true, Some(_)) => {}
        }
    }
}

/// Messages from every replica's commits, in commit order, as they were published.
///
/// A connection can die without a word (a frozen server, a firewall that drops packets): nothing is read and
/// no error comes. So a feed that has heard nothing for [`HEARTBEAT_QUIET`] publishes a heartbeat through the
/// store's pool, and one that does not hear it (or anything else) within [`HEARTBEAT_ECHO`] more gives the
/// connection up and listens on a new one. Every replica hears every heartbeat, so a busy or several-replica
/// deployment seldom needs to send one.
pub struct ReplicaFeed {
    options: PgConnectOptions,
    /// The store's pool: heartbeats go out through it, as commits' messages do.
    pool: PgPool,
    listener: Option<PgListener>,
    /// When anything was last heard on this connection.
    last_heard: Instant,
    /// When a heartbeat was published, if one was since then.
    asked: Option<Instant>,
    /// When [`FeedEvent::Deaf`] was last said, while not listening.
    reported_deaf: Option<Instant>,
    /// When to try to listen again, and how long to wait after that attempt if it fails too.
    next_attempt: Instant,
    retry: Duration,
    health: FeedHealth,
}

impl ReplicaFeed {
    /// Whether this feed is listening, for readiness.
    pub fn health(&self) -> FeedHealth {
        self.health.clone()
    }

    /// What is heard next; `None` when the feed has closed for good. A lost connection is re-opened with
    /// backoff, saying [`FeedEvent::Deaf`] meanwhile.
    pub async fn recv(&mut self) -> Option<FeedEvent> {
        // Silence counts only while waiting here: what arrived while the caller was busy is in the socket.
        let entered = Instant::now();
        loop {
            let Some(listener) = self.listener.as_mut() else {
                let now = Instant::now();
                let next_report = self.reported_deaf.map_or(now, |at| at + DEAF_REPORT_INTERVAL);
                if now >= next_report {
                    self.reported_deaf = Some(now);
                    return Some(FeedEvent::Deaf);
                }
                if now < self.next_attempt {
                    tokio::time::sleep_until(self.next_attempt.min(next_report).into()).await;
                    continue;
                }
                match listen(&self.options).await {
                    Ok(listener) => {
                        self.listener = Some(listener);
                        self.heard();
                        self.retry = FIRST_RELISTEN_DELAY;
                        self.reported_deaf = None;
                        self.health.set_deaf(false);
                        return Some(FeedEvent::Resumed);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot listen for other replicas; retrying in {:?}", self.retry);
                        self.next_attempt = Instant::now() + self.retry;
                        self.retry = (self.retry * 2).min(MAX_RELISTEN_DELAY);
                    }
                }
                continue;
            };
            let deadline = match self.asked {
                Some(asked) => asked + HEARTBEAT_ECHO,
                None => self.last_heard.max(entered) + HEARTBEAT_QUIET,
            };
            // Cancelling `try_recv` while it waits loses nothing (sqlx takes a message only once it is whole);
            // it never reconnects on its own here (`eager_reconnect` is off), which could not be cancelled
            // safely.
            match tokio::time::timeout_at(deadline.into(), listener.try_recv()).await {
                Err(_) if self.asked.is_none() => {
                    self.asked = Some(Instant::now());
                    let pool = self.pool.clone();
                    tokio::spawn(async move {
                        let publish = sqlx::query("SELECT pg_notify($1, '')").bind(HEARTBEAT_CHANNEL).execute(&pool);
                        if let Ok(Err(error)) = tokio::time::timeout(HEARTBEAT_ECHO, publish).await {
                            tracing::debug!(%error, "cannot publish the replica feed's heartbeat");
                        }
                    });
                }
                Err(_) => {
                    tracing::warn!(
                        "the connection that listens for other replicas heard nothing for {:?}, not even a \
                         heartbeat; listening on a new one",
                        HEARTBEAT_QUIET + HEARTBEAT_ECHO
                    );
                    self.lose();
                }
                Ok(Ok(Some(notification))) => {
                    self.heard();
                    if notification.channel() == CHANGES_CHANNEL {
                        return Some(FeedEvent::Message(notification.payload().to_owned()));
                    }
                }
                // Lost (sqlx dropped the connection): listen again on a new one, and say so.
                Ok(Ok(None)) => {
                    tracing::warn!("lost the connection that listens for other replicas");
                    self.lose();
                }
                Ok(Err(sqlx::Error::PoolClosed)) => return None,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "lost the connection that listens for other replicas");
                    self.lose();
                }
            }
        }
    }

    fn heard(&mut self) {
        self.last_heard = Instant::now();
        self.asked = None;
    }

    fn lose(&mut self) {
        self.listener = None;
        self.reported_deaf = None;
        self.next_attempt = Instant::now();
        self.health.set_deaf(true);
    }
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    async fn write(&self) -> Result<Box<dyn StoreTx>, StoreError> {
        let tx = self.begin("BEGIN ISOLATION LEVEL READ COMMITTED").await?;
        Ok(Box::new(PgTx::new(tx, true)))
    }

    async fn read(&self) -> Result<Box<dyn StoreTx>, StoreError> {
        let tx = self.begin("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
        Ok(Box::new(PgTx::new(tx, false)))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(map_sqlx)?;
        Ok(())
    }

    /// A transaction of its own (one statement) that writes a WAL record, so its commit, synchronous as every
    /// commit but a deferred one (at the server's level: `on`, `remote_apply`, …), returns once the WAL is
    /// flushed up to it: every commit before it, deferred ones included, is then on disk. The record is a
    /// transactional logical-decoding message (prefix `countersign`, empty), which any role may write at any
    /// `wal_level`. A transaction that only takes an id writes no WAL before its commit record, and
    /// PostgreSQL commits such a transaction asynchronously, flushing nothing.
    async fn durable(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_logical_emit_message(true, 'countersign', ''::text)::text")
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }
}

struct PgTx {
    tx: Transaction<'static, Postgres>,
    /// Begun by `write()`: reads of mutable rows lock them.
    writer: bool,
    /// The org and (seq, hash) of the last audit event this transaction appended. Its `audit_heads` row is
    /// locked until the commit, so the next append of the same org follows it without asking again.
    head: Option<(OrgId, i64, String)>,
    /// Audit events sealed but not yet written: written together, with the head row moved to the last,
    /// before the transaction's next statement or its commit. A rollback drops them with everything else.
    pending_audit: Vec<AuditEvent>,
    /// Why a conditional write found its row changed ([`StoreError::Stale`]): then every later statement and
    /// the commit fail, as on SQLite, so a caller that carried on cannot commit half a change.
    stale: Option<String>,
    /// Writes not sent yet (see [`Queue`]).
    queue: Queue,
    /// A statement failed (PostgreSQL then aborts the transaction): every later statement and the commit fail
    /// too, since PostgreSQL's `COMMIT` of an aborted transaction rolls back without an error.
    failed: bool,
    /// The commit returns before its WAL is flushed ([`StoreTx::defer_sync`]).
    defer: bool,
}

/// Writes a transaction has queued and not sent yet.
///
/// Every statement is a round trip to the server, and a proxied model call's transactions are mostly writes
/// whose outcome the caller need not see at once: inserts and updates of one row, and `NOTIFY`. Those are
/// queued, each as a data-modifying `WITH` query (`w0 AS (INSERT … RETURNING 1)`), and sent in one statement
/// with the sealed audit events and, when there is one, the transaction's next read of a table no queued
/// write touches (the audit head a later append locks, the webhooks the delivery fan-out lists); before any
/// other statement, and before the commit, they go alone. The statement answers how many rows each write
/// changed, so an update that found no row fails the transaction as it would have alone, and the read runs
/// after the writes (it is the inner side of a lateral join on their counts), so the rows they change are
/// locked before the read's lock, in the order of the calls. Their foreign keys are checked at the
/// statement's end, after the read (so a row may refer to one inserted beside it), and each check locks the
/// row it refers to `FOR KEY SHARE`, which only `FOR UPDATE` would wait for; this store locks rows it reads to
/// change `FOR NO KEY UPDATE` (it never deletes them or changes their keys), so those late locks wait for no
/// one. The queries of one statement see one snapshot and none sees another's changes: a write on a table
/// with a queued write is sent after it, not beside it, unless both insert.
#[derive(Default)]
struct Queue {
    /// `w0 AS (…), w1 AS (…), `.
    sql: sqlx::QueryBuilder<Postgres>,
    /// Per queued write, in order: its table (none for `NOTIFY`) and what its count of changed rows must be.
    writes: Vec<(Option<&'static str>, Expect)>,
}

/// Writes one statement carries at most (each binds at most 21 values; with a full audit insert the
/// statement stays far below PostgreSQL's 65,535).
const MAX_QUEUED_WRITES: usize = 256;

/// Audit rows per multi-row `INSERT` (ten parameters each, far below PostgreSQL's limit).
const AUDIT_ROWS_PER_INSERT: usize = 64;

impl SqlxRow for PgRow {
    fn flag_of(&self, column: &str) -> Result<bool, StoreError> {
        self.try_get(column).map_err(map_sqlx)
    }
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

impl PgTx {
    /// Seals an event after (seq, hash) and keeps it as the head the next append in this transaction follows.
    fn seal(&mut self, org: &OrgId, seq: i64, hash: &str, event: NewAuditEvent) -> AuditEvent {
        let sealed = seal_pending(&mut self.pending_audit, org, seq, hash, event);
        self.head = Some((org.clone(), sealed.seq, sealed.hash.clone()));
        sealed
    }

    fn new(tx: Transaction<'static, Postgres>, writer: bool) -> Self {
        PgTx {
            tx,
            writer,
            head: None,
            pending_audit: Vec::new(),
            stale: None,
            queue: Queue::default(),
            failed: false,
            defer: false,
        }
    }

    /// Queues `write` (see [`Queue`]), first sending the queue if it holds a write on the same table that
    /// this one must follow.
    async fn queue(&mut self, Write { table, sql, values, expect }: Write) -> Result<(), StoreError> {
        let insert = matches!(expect, Expect::Insert);
        let follows = |(queued, queued_expect): &(Option<&str>, Expect)| {
            *queued == Some(table) && !(insert && matches!(queued_expect, Expect::Insert))
        };
        if self.queue.writes.len() >= MAX_QUEUED_WRITES || self.queue.writes.iter().any(follows) {
            self.send().await?;
        }
        self.start_write(Some(table), expect);
        push_write(&mut self.queue.sql, sql, values);
        self.queue.sql.push(" RETURNING 1), ");
        Ok(())
    }

    /// Opens the next queued write's `WITH` query (`wN AS (`), the statement's `WITH` before the first.
    fn start_write(&mut self, table: Option<&'static str>, expect: Expect) {
        if self.queue.writes.is_empty() {
            self.queue.sql.push("WITH ");
        }
        self.queue.sql.push(format_args!("w{} AS (", self.queue.writes.len()));
        self.queue.writes.push((table, expect));
    }

    /// Before every statement sent on its own and the commit: sends the queued writes and the sealed audit
    /// events, if any.
    async fn send(&mut self) -> Result<(), StoreError> {
        self.send_with(None::<fn(&mut sqlx::QueryBuilder<Postgres>)>).await.map(drop)
    }

    /// Sends the queued writes and the sealed audit events (see [`Queue`]), with `read` after them in the same
    /// statement: a query on a table no queued write touches, pushed onto it. Returns the read's rows, each
    /// beside the writes' counts; when it found nothing, one row whose read columns are all null.
    async fn send_with(
        &mut self,
        read: Option<impl FnOnce(&mut sqlx::QueryBuilder<Postgres>)>,
    ) -> Result<Vec<PgRow>, StoreError> {
        if let Some(why) = &self.stale {
            return Err(StoreError::Stale(format!("{why}; the transaction can only roll back")));
        }
        if self.failed {
            return Err(StoreError::Internal(
                "an earlier statement of this transaction failed, so it can only roll back".into(),
            ));
        }
        let pending = std::mem::take(&mut self.pending_audit);
        // One statement moves an org's head once: audit events of several orgs, or more than one insert
        // holds, go in statements of their own first, all but the last run.
        let mut runs = pending.chunk_by(|a, b| a.org_id == b.org_id).flat_map(|run| run.chunks(AUDIT_ROWS_PER_INSERT));
        let last = runs.next_back();
        for rows in runs {
            self.send_batch(sqlx::QueryBuilder::new("WITH "), Vec::new(), Some(rows), None::<fn(&mut _)>).await?;
        }
        let writes = std::mem::take(&mut self.queue.writes);
        let sql = std::mem::take(&mut self.queue.sql);
        if writes.is_empty() && last.is_none() {
            let Some(read) = read else { return Ok(Vec::new()) };
            let mut query = sqlx::QueryBuilder::new("");
            read(&mut query);
            let rows = query.build().fetch_all(&mut *self.tx).await;
            return self.failing(rows);
        }
        let sql = if writes.is_empty() { sqlx::QueryBuilder::new("WITH ") } else { sql };
        self.send_batch(sql, writes, last, read).await
    }

    /// One statement of [`PgTx::send_with`]: `sql` holds `WITH` and the queued writes, to which this adds the
    /// audit `rows` (the org's head moved to the last), the counts and `read`. Then checks the counts.
    async fn send_batch(
        &mut self,
        mut sql: sqlx::QueryBuilder<Postgres>,
        writes: Vec<(Option<&'static str>, Expect)>,
        rows: Option<&[AuditEvent]>,
        read: Option<impl FnOnce(&mut sqlx::QueryBuilder<Postgres>)>,
    ) -> Result<Vec<PgRow>, StoreError> {
        if let Some(rows) = rows {
            sql.push("cs_appended AS (");
            let (insert, values) = audit_rows(rows).inspect_err(|_| self.failed = true)?;
            push_write(&mut sql, &insert, values);
            sql.push(
                " RETURNING org_id, seq, hash),
                 cs_last AS (SELECT org_id, seq, hash FROM cs_appended ORDER BY seq DESC LIMIT 1),
                 cs_moved AS (UPDATE audit_heads h SET seq = cs_last.seq, hash = cs_last.hash FROM cs_last
                    WHERE h.org_id = cs_last.org_id RETURNING 1), ",
            );
        }
        // Materialized and the outer side of the join: the writes run before the read.
        sql.push("cs_counts AS MATERIALIZED (SELECT ");
        for i in 0..writes.len() {
            sql.push(format_args!("(SELECT count(*) FROM w{i}) AS cs_w{i}, "));
        }
        sql.push(if rows.is_some() { "(SELECT count(*) FROM cs_moved) AS cs_moved" } else { "0::bigint AS cs_moved" });
        sql.push(") SELECT * FROM cs_counts");
        if let Some(read) = read {
            sql.push(" LEFT JOIN LATERAL (");
            read(&mut sql);
            sql.push(") AS cs_read ON true");
        }
        let answer = sql.build().fetch_all(&mut *self.tx).await.map_err(batch_error);
        // Any error, the statement's or a count's, fails the transaction for good (a stale count: as stale).
        let checked = answer.and_then(|answer| match counts_hold(answer.first(), writes, rows) {
            Ok(()) => Ok(answer),
            Err(CountFailed::Stale(what)) => Err(self.went_stale(what)),
            Err(CountFailed::Other(e)) => Err(e),
        });
        if checked.is_err() && self.stale.is_none() {
            self.failed = true;
        }
        checked
    }

    /// Audit events matching `filter`: oldest first after `seq`, or (`newest`) newest first before it.
    async fn select_audit(
        &mut self,
        org: &OrgId,
        filter: &AuditFilter,
        newest: bool,
        seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        const OLDEST_SQL: &str = "SELECT * FROM audit_events WHERE org_id = $1 AND seq > $2
               AND ($3::text IS NULL OR action = $3)
               AND ($4::text IS NULL OR left(action, length($4)) = $4)
               AND ($5::text IS NULL OR actor::jsonb ->> 'id' = $5)
               AND ($6::text[] IS NULL OR subject = ANY($6))
               AND ($7::bigint IS NULL OR time_us >= $7)
               AND ($8::bigint IS NULL OR time_us <= $8)
             ORDER BY seq ASC LIMIT $9";
        const NEWEST_SQL: &str = "SELECT * FROM audit_events WHERE org_id = $1 AND seq < $2
               AND ($3::text IS NULL OR action = $3)
               AND ($4::text IS NULL OR left(action, length($4)) = $4)
               AND ($5::text IS NULL OR actor::jsonb ->> 'id' = $5)
               AND ($6::text[] IS NULL OR subject = ANY($6))
               AND ($7::bigint IS NULL OR time_us >= $7)
               AND ($8::bigint IS NULL OR time_us <= $8)
             ORDER BY seq DESC LIMIT $9";
        let (action_exact, action_prefix) = match filter.action.as_deref() {
            Some(a) if a.ends_with(".*") => (None, Some(a.trim_end_matches('*').to_owned())),
            Some(a) => (Some(a.to_owned()), None),
            None => (None, None),
        };
        let subjects = (!filter.subjects.is_empty()).then(|| filter.subjects.clone());
        let rows = self
            .fetch_all(
                sqlx::query(if newest { NEWEST_SQL } else { OLDEST_SQL })
                    .bind(org.as_str().to_owned())
                    .bind(seq)
                    .bind(action_exact)
                    .bind(action_prefix)
                    .bind(filter.actor.clone())
                    .bind(subjects)
                    .bind(filter.since_us)
                    .bind(filter.until_us)
                    .bind(i64::from(limit.clamp(1, 10_000))),
            )
            .await?;
        rows.iter().map(audit_row).collect()
    }

    /// In a writer, locks the org's row until commit before its policy is read or written, so an org's policy
    /// writes take turns: a policy's `seq` is given at its insert, not at its commit, so two replicas writing at
    /// once could commit in the other order and leave the newest `seq` (what every replica puts in force) to
    /// the one whose `policy.updated` is not the last in the audit log; and a replica starting beside an
    /// admin's `PUT /v1/policy` could record its file policy over the `api` one it did not yet see. Nothing
    /// else locks the row this way (a foreign key's check takes `FOR KEY SHARE`, which this does not block).
    /// A transaction that activates several orgs' policies (a start, a file reload) takes them in turn, after
    /// appending to the previous org's chain; it cannot deadlock with another, since every such pass walks
    /// the orgs in one order (`list_orgs`: `created_at`, `id`) and a `PUT /v1/policy` locks one org's row,
    /// then its chain. A reader locks nothing.
    async fn lock_org_policy(&mut self, org: &OrgId) -> Result<(), StoreError> {
        if self.writer {
            self.execute(
                sqlx::query("SELECT 1 FROM orgs WHERE id = $1 FOR NO KEY UPDATE").bind(org.as_str().to_owned()),
            )
            .await?;
        }
        Ok(())
    }

    /// `sql` as is in a reader; with `FOR NO KEY UPDATE` appended in a writer.
    fn locking(&self, sql: &'static str) -> PgQuery<'static> {
        if self.writer { sqlx::query(AssertSqlSafe(format!("{sql} FOR NO KEY UPDATE"))) } else { sqlx::query(sql) }
    }

    /// A conditional write found no row as expected: it and everything after it fail.
    fn went_stale(&mut self, why: String) -> StoreError {
        self.stale = Some(why.clone());
        StoreError::Stale(why)
    }

    async fn fetch_all(&mut self, query: PgQuery<'_>) -> Result<Vec<PgRow>, StoreError> {
        self.send().await?;
        let rows = query.fetch_all(&mut *self.tx).await;
        self.failing(rows)
    }

    async fn fetch_optional(&mut self, query: PgQuery<'_>) -> Result<Option<PgRow>, StoreError> {
        self.send().await?;
        let row = query.fetch_optional(&mut *self.tx).await;
        self.failing(row)
    }

    /// A statement's result: an error fails the transaction for good (see `failed`), so that a caller that
    /// carried on past it cannot commit.
    fn failing<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, StoreError> {
        result.map_err(|e| {
            self.failed = true;
            map_sqlx(e)
        })
    }

    async fn fetch_count(&mut self, query: PgQuery<'_>) -> Result<i64, StoreError> {
        let row = self.fetch_optional(query).await?;
        row.map(|r| get(&r, "n")).transpose().map(|n| n.unwrap_or(0))
    }

    async fn execute(&mut self, query: PgQuery<'_>) -> Result<u64, StoreError> {
        self.send().await?;
        let done = query.execute(&mut *self.tx).await;
        self.failing(done).map(|r| r.rows_affected())
    }

    /// Maps approval rows and attaches their decisions, fetched in one query.
    async fn approvals_with_decisions(&mut self, rows: Vec<PgRow>) -> Result<Vec<Approval>, StoreError> {
        let mut approvals = rows.iter().map(approval_row).collect::<Result<Vec<_>, _>>()?;
        let Some(first) = approvals.first() else { return Ok(approvals) };
        let org = first.org_id.as_str().to_owned();
        let ids: Vec<String> = approvals.iter().map(|a| a.id.as_str().to_owned()).collect();
        let rows = self
            .fetch_all(
                sqlx::query(
                    "SELECT * FROM decisions WHERE org_id = $1 AND approval_id = ANY($2)
                     ORDER BY created_at, user_id",
                )
                .bind(org)
                .bind(ids),
            )
            .await?;
        for row in &rows {
            let approval_id: String = get(row, "approval_id")?;
            let decision = decision_row(row)?;
            if let Some(approval) = approvals.iter_mut().find(|a| a.id.as_str() == approval_id) {
                approval.decisions.push(decision);
            }
        }
        Ok(approvals)
    }

    async fn one_approval(&mut self, row: Option<PgRow>) -> Result<Option<Approval>, StoreError> {
        Ok(self.approvals_with_decisions(row.into_iter().collect()).await?.pop())
    }
}

/// Why a batch's counts do not hold.
enum CountFailed {
    /// A conditional update found its row changed.
    Stale(String),
    Other(StoreError),
}

/// Checks a batch's counts (see [`PgTx::send_batch`]): each queued write's against what it expects, and
/// that the audit `rows`, if any, moved their org's head.
fn counts_hold(
    counts: Option<&PgRow>,
    writes: Vec<(Option<&'static str>, Expect)>,
    rows: Option<&[AuditEvent]>,
) -> Result<(), CountFailed> {
    let other = CountFailed::Other;
    let counts = counts.ok_or_else(|| other(StoreError::Internal("a batch of writes answered no row".into())))?;
    for (i, (_, expect)) in writes.into_iter().enumerate() {
        let n: i64 = get(counts, &format!("cs_w{i}")).map_err(other)?;
        match expect {
            Expect::One(what) if n != 1 => return Err(other(StoreError::Internal(what))),
            Expect::Unchanged(what) if n != 1 => return Err(CountFailed::Stale(what)),
            _ => {}
        }
    }
    if let Some(rows) = rows
        && get::<i64>(counts, "cs_moved").map_err(other)? != 1
    {
        let org = rows.first().map(|e| e.org_id.to_string()).unwrap_or_default();
        return Err(other(StoreError::Internal(format!("audit head of org {org} did not move"))));
    }
    Ok(())
}

/// A page of actions, newest first, up to [`PAGE_BYTES`] of them.
const LIST_ACTIONS: &str = within_page_bytes!(
    "actions",
    "DESC",
    "JOIN",
    "$1",
    "$7",
    "SELECT a.id AS id, ",
    action_bytes!(),
    " AS bytes FROM actions a WHERE a.org_id = $1
       AND ($2::text IS NULL OR a.state = $2) AND ($3::text IS NULL OR a.agent_id = $3)
       AND ($4::text IS NULL OR a.capability = $4) AND ($5::text IS NULL OR a.id < $5)
     ORDER BY a.id DESC LIMIT $6",
);

/// Approvals, up to [`PAGE_BYTES`] of their actions, in `$order` from the cursor (`$after`), filtered by
/// status (`$status`, the parameter `$2`): the pending queue oldest first, any other status newest first.
macro_rules! approvals_page {
    ($order:literal, $after:literal, $status:literal) => {
        within_page_bytes!(
            "approvals",
            $order,
            "JOIN",
            "$1",
            "$5",
            "SELECT ap.id AS id, ",
            action_bytes!(),
            " AS bytes FROM approvals ap LEFT JOIN actions a ON a.id = ap.action_id AND a.org_id = ap.org_id
             WHERE ap.org_id = $1 AND ",
            $status,
            " AND ($3::text IS NULL OR ap.id ",
            $after,
            " $3) ORDER BY ap.id ",
            $order,
            " LIMIT $4",
        )
    };
}
const LIST_PENDING_APPROVALS: &str = approvals_page!("ASC", ">", "ap.status = $2");
const LIST_DECIDED_APPROVALS: &str = approvals_page!("DESC", "<", "($2::text IS NULL OR ap.status = $2)");

/// Retention's end: the seq before the first event at or after the cutoff, else the head. Event times do
/// not strictly grow with seq (replicas' clocks drift; a writer reads the clock before it waits for the
/// chain's lock), so "the newest event older than the cutoff" could pass a newer one. Both lookups walk the
/// (org, seq) key: the first only over the old prefix, the second to one row.
const LAST_AUDIT_SEQ_BEFORE: &str = "SELECT COALESCE(
        (SELECT seq FROM audit_events WHERE org_id = $1 AND time_us >= $2 ORDER BY seq LIMIT 1) - 1,
        (SELECT seq FROM audit_events WHERE org_id = $1 ORDER BY seq DESC LIMIT 1)) AS seq";

#[async_trait::async_trait]
impl StoreTx for PgTx {
    async fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        if self.defer && self.writer {
            // Asynchronous commit, with the last statement before the `COMMIT` (a setting local to the
            // transaction): the commit is ordered in the WAL before every later one, so the next synchronous
            // commit (the call's finish), or `durable`, flushes it too.
            self.start_write(None, Expect::Insert);
            self.queue.sql.push("SELECT set_config('synchronous_commit', 'off', true)), ");
        }
        self.send().await?;
        self.tx.commit().await.map_err(map_sqlx)
    }

    fn defer_sync(&mut self, defer: bool) {
        self.defer = defer;
    }

    async fn publish(&mut self, message: &str) -> Result<(), StoreError> {
        self.start_write(None, Expect::Insert);
        self.queue.sql.push("SELECT pg_notify(").push_bind(CHANGES_CHANNEL).push(", ").push_bind(message.to_owned());
        self.queue.sql.push(")), ");
        Ok(())
    }

    async fn audit_public_key(&mut self) -> Result<Option<String>, StoreError> {
        let row = self
            .fetch_optional(sqlx::query("SELECT value FROM instance_secrets WHERE name = 'audit_public_key'"))
            .await?;
        row.map(|row| row.try_get::<String, _>("value").map_err(map_sqlx)).transpose()
    }

    async fn record_audit_public_key(&mut self, candidate: &str) -> Result<String, StoreError> {
        self.execute(
            sqlx::query(
                "INSERT INTO instance_secrets (name, value) VALUES ('audit_public_key', $1) ON CONFLICT DO NOTHING",
            )
            .bind(candidate.to_owned()),
        )
        .await?;
        self.audit_public_key().await?.ok_or_else(|| StoreError::Internal("the audit public key vanished".into()))
    }

    async fn legacy_signing_key(&mut self) -> Result<Option<String>, StoreError> {
        let row = self
            .fetch_optional(sqlx::query("SELECT value FROM instance_secrets WHERE name = 'audit_signing_key'"))
            .await?;
        row.map(|row| row.try_get::<String, _>("value").map_err(map_sqlx)).transpose()
    }

    async fn count_orgs(&mut self) -> Result<i64, StoreError> {
        self.fetch_count(sqlx::query("SELECT COUNT(*) AS n FROM orgs")).await
    }

    async fn list_orgs(&mut self) -> Result<Vec<Org>, StoreError> {
        let rows = self.fetch_all(sqlx::query("SELECT * FROM orgs ORDER BY created_at, id")).await?;
        rows.iter().map(org_row).collect()
    }

    async fn insert_org(&mut self, org: &Org) -> Result<(), StoreError> {
        self.execute(
            sqlx::query("INSERT INTO orgs (id, name, created_at) VALUES ($1, $2, $3)")
                .bind(org.id.as_str().to_owned())
                .bind(org.name.clone())
                .bind(to_us(org.created_at)),
        )
        .await
        .map(drop)
    }

    async fn get_org(&mut self, id: &OrgId) -> Result<Option<Org>, StoreError> {
        let row =
            self.fetch_optional(sqlx::query("SELECT * FROM orgs WHERE id = $1").bind(id.as_str().to_owned())).await?;
        row.as_ref().map(org_row).transpose()
    }

    async fn insert_user(&mut self, user: &User) -> Result<(), StoreError> {
        self.execute(
            sqlx::query(
                "INSERT INTO users (id, org_id, name, role, instance_admin, created_at, disabled_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(user.id.as_str().to_owned())
            .bind(user.org_id.as_str().to_owned())
            .bind(user.name.clone())
            .bind(user.role.as_str())
            .bind(user.instance_admin)
            .bind(to_us(user.created_at))
            .bind(opt_us(user.disabled_at)),
        )
        .await
        .map(drop)
    }

    async fn get_user(&mut self, org: &OrgId, id: &UserId) -> Result<Option<User>, StoreError> {
        let row = self
            .fetch_optional(
                sqlx::query("SELECT * FROM users WHERE org_id = $1 AND id = $2")
                    .bind(org.as_str().to_owned())
                    .bind(id.as_str().to_owned()),
            )
            .await?;
        row.as_ref().map(user_row).transpose()
    }

    async fn find_user_by_name(&mut self, org: &OrgId, name: &str) -> Result<Option<User>, StoreError> {
        let row = self
            .fetch_optional(
                sqlx::query("SELECT * FROM users WHERE org_id = $1 AND name = $2")
                    .bind(org.as_str().to_owned())
                    .bind(name.to_owned()),
            )
            .await?;
        row.as_ref().map(user_row).transpose()
    }

    async fn list_users(&mut self, org: &OrgId) -> Result<Vec<User>, StoreError> {
        let rows = self
            .fetch_all(
                sqlx::query("SELECT * FROM users WHERE org_id = $1 ORDER BY created_at, id")
                    .bind(org.as_str().to_owned()),
            )
            .await?;
        rows.iter().map(user_row).collect()
    }

    async fn disable_user(
        &mut self,
        org: &OrgId,
        id: &UserId,
        at: DateTime<Utc>,
    ) -> Result<Option<Vec<SessionId>>, StoreError> {
        let n = self
            .execute(
                sqlx::query("UPDATE users SET disabled_at = $1 WHERE org_id = $2 AND id = $3 AND disabled_at IS NULL")
                    .bind(to_us(at))
                    .bind(org.as_str().to_owned())
                    .bind(id.as_str().to_owned()),
            )
            .await?;
        if n == 0 {
            return Ok(None);
        }
        // The sessions minted with the user's keys end with the user.
        let rows = self
            .fetch_all(
                sqlx::query(
                    "UPDATE sessions SET revoked_at = $1 WHERE org_id = $2 AND revoked_at IS NULL AND minted_with IN
                        (SELECT id FROM api_keys WHERE org_id = $2 AND principal_kind = 'user' AND principal_id = $3)
                     RETURNING id",
                )
                .bind(to_us(at))
                .bind(org.as_str().to_owned())
                .bind(id.as_str().to_owned()),
            )
            .await?;
        revoked_sessions(&rows).map(Some)
    }

    async fn insert_agent(&mut self, agent: &Agent) -> Result<(), StoreError> {
        self.execute(
            sqlx::query(
                "INSERT INTO agents (id, org_id, name, owner_user_id, created_at, disabled_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(agent.id.as_str().to_owned())
            .bind(agent.org_id.as_str().to_owned())
            .bind(agent.name.clone())
            .bind(agent.owner.as_ref().map(|o| o.as_str().to_owned()))
            .bind(to_us(agent.created_at))
            .bind(opt_us(agent.disabled_at)),
        )
        .await
        .map(drop)
    }

    async fn get_agent(&mut self, org: &OrgId, id: &AgentId) -> Result<Option<Agent>, StoreError> {
        let row = self
            .fetch_optional(
                sqlx::query("SELECT * FROM agents WHERE org_id = $1 AND id = $2")
                    .bind(org.as_str().to_owned())
                    .bind(id.as_str().to_owned()),
            )
            .await?;
        row.as_ref().map(agent_row).transpose()
    }

    async fn find_agent_by_name(&mut self, org: &OrgId, name: &str) -> Result<Option<Agent>, StoreError> {
        let row = self
            .fetch_optional(
                sqlx::query("SELECT * FROM agents WHERE org_id = $1 AND name = $2")
                    .bind(org.as_str().to_owned())
                    .bind(name.to_owned()),
            )
            .await?;
        row.as_ref().map(agent_row).transpose()
    }

    async fn list_agents(&mut self, org: &OrgId) -> Result<Vec<Agent>, StoreError> {
        let rows = self
            .fetch_all(
                sqlx::query("SELECT * FROM agents WHERE org_id = $1 ORDER BY created_at, id")
                    .bind(org.as_str().to_owned()),
            )
            .await?;
        rows.iter().map(agent_row).collect()
    }

    async fn disable_agent(&mut self, org: &OrgId, id: &AgentId, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let n = self
            .execute(
                sqlx::query("UPDATE agents SET disabled_at = $1 WHERE org_id = $2 AND id = $3 AND disabled_at IS NULL")
                    .bind(to_us(at))
                    .bind(org.as_str().to_owned())
                    .bind(id.as_str().to_owned()),
            )
            .await?;
        Ok(n > 0)
    }

    async fn insert_key(&mut self, key: &ApiKey) -> Result<(), StoreError> {
        let (kind, principal_id) = match &key.principal {
            PrincipalRef::User(id) => ("user", id.as_str().to_owned()),
            PrincipalRef::Agent(id) => ("agent", id.as_str().to_owned()),
        };
        self.execute(
            sqlx::query(
                "INSERT INTO api_keys (id, org_id, principal_kind, principal_id, hash, prefix, last_four, created_at,
                    expires_at, revoked_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(key.id.as_str().to_owned())
            .bind(key.org_id.as_str().to_owned())
            .bind(kind)
            .bind(principal_id)
            .bind(key.hash.clone())
            .bind(key.prefix.clone())
            .bind(key.last_four.clone())
            .bind(to_us(key.created_at))
            .bind(opt_us(key.expires_at))
            .bind(opt_us(key.revoked_at)),
        )
        .await
        .map(drop)
    }

    async fn find_key_by_hash(&mut self, hash: &str) -> Result<Option<ApiKey>, StoreError> {
        let row =
            self.fetch_optional(sqlx::query("SELECT * FROM api_keys WHERE hash = $1").bind(hash.to_owned())).await?;
        row.as_ref().map(key_row).transpose()
    }

    async fn list_keys(&mut self, org: &OrgId) -> Result<Vec<ApiKey>, StoreError> {
        let rows = self
            .fetch_all(
                sqlx::query("SELECT * FROM api_keys WHERE org_id = $1 ORDER BY created_at, id")
                    .bind(org.as_str().to_owned()),
            )
            .await?;
        rows.iter().map(key_row).collect()
    }

    async fn get_key(&mut self, org: &OrgId, id: &KeyId) -> Result<Option<ApiKey>, StoreError> {
        let query = sqlx::query("SELECT * FROM api_keys WHERE org_id = $1 AND id = $2")
            .bind(org.as_str().to_owned())
            .bind(id.as_str().to_owned());
        let row = self.fetch_optional(query).await?;
        row.as_ref().map(key_row).transpose()
    }

    async fn revoke_key(
        &mut self,
        org: &OrgId,
        id: &KeyId,
        at: DateTime<Utc>,
    ) -> Result<Option<Vec<SessionId>>, StoreError> {
        let n = self
            .execute(
                sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE org_id = $2 AND id = $3 AND revoked_at IS NULL")
                    .bind(to_us(at))
                    .bind(org.as_str().to_owned())
                    .bind(id.as_str().to_owned()),
            )
            .await?;
        if n == 0 {
            return Ok(None);
        }
        let rows = self
            .fetch_all(
                sqlx::query(
                    "UPDATE sessions SET revoked_at = $1 WHERE org_id = $2 AND minted_with = $3 AND revoked_at IS NULL
                     RETURNING id",
                )
                .bind(to_us(at))
                .bind(org.as_str().to_owned())
                .bind(id.as_str().to_owned()),
            )
            .await?;
        revoked_sessions(&rows).map(Some)
    }

    async fn insert_session(&mut self, session: &Session) -> Result<(), StoreError> {
        let scopes: Vec<&str> = session.scopes.iter().map(NameGlob::as_str).collect();
        self.execute(
            sqlx::query(
                "INSERT INTO sessions (id, org_id, agent_id, hash, scopes, created_by, created_at, expires_at,
                    revoked_at, minted_with)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(session.id.as_str().to_owned())
            .bind(session.org_id.as_str().to_owned())
            .bind(session.agent_id.as_str().to_owned())
            .bind(session.hash.clone())
            .bind(to_json(&scopes)?)
            .bind(session.created_by.clone())
            .bind(to_us(session.created_at))
            .bind(to_us(session.expires_at))
            .bind(opt_us(session.revoked_at))
            .bind(session.minted_with.as_ref().map(|k| k.as_str().to_owned())),
        )
        .await
        .map(drop)
    }

    async fn find_session_by_hash(&mut self, hash: &str) -> Result<Option<Session>, StoreError> {
        let query = self.locking("SELECT * FROM sessions WHERE hash = $1").bind(hash.to_owned());
        let row = self.fetch_optional(query).await?;
        row.as_ref().map(session_row).transpose()
    }

    async fn list_sessions(&mut self, org: &OrgId, agent: Option<&AgentId>) -> Result<Vec<Session>, StoreError> {
        let rows = self
            .fetch_all(
                sqlx::query(
                    "SELECT * FROM sessions WHERE org_id = $1 AND ($2::text IS NULL OR agent_id = $2)
                     ORDER BY created_at DESC, id DESC",
                )
                .bind(org.as_str().to_owned())
                .bind(agent.map(|a| a.as_str().to_owned())),
            )
            .await?;
        rows.iter().map(session_row).collect()
    }

    async fn revoke_session(&mut self, org: &OrgId, id: &SessionId, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let n = self
            .execute(
                sqlx::query("UPDATE sessions SET revoked_at = $1 WHERE org_id = $2 AND id = $3 AND revoked_at IS NULL")
                    .bind(to_us(at))
                    .bind(org.as_str().to_owned())
                    .bind(id.as_str().to_owned()),
            )
            .await?;
        Ok(n > 0)
    }

    async fn insert_dashboard_session(
        &mut self,
        session: &countersign_core::domain::DashboardSession,
    ) -> Result<(), StoreError> {
        self.execute(
            sqlx::query(
                "INSERT INTO dashboard_sessions
                    (token_hash, org_id, user_id, key_hash, created_at, expires_at, last_seen_at, revoked_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(session.token_hash.clone())
            .bind(session.org_id.as_str().to_owned())
            .bind(session.user_id.as_str().to_owned())
            .bind(session.key_hash.clone())
            .bind(to_us(session.created_at))
            .bind(to_us(session.expires_at))
            .bind(to_us(session.last_seen_at))
            .bind(opt_us(session.revoked_at)),
        )
        .await
        .map(drop)
    }

    async fn find_dashboard_session(
        &mut self,
        token_hash: &str,
    ) -> Result<Option<countersign_core::domain::DashboardSession>, StoreError> {
        let row = self
            .fetch_optional(
                sqlx::query("SELECT * FROM dashboard_sessions WHERE token_hash = $1").bind(token_hash.to_owned()),
            )
            .await?;
        row.as_ref().map(dashboard_session_row).transpose()
    }

    async fn touch_dashboard_session(
        &mut self,
        org: &OrgId,
        token_hash: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let n = self
            .execute(
                sqlx::query(
                    "UPDATE dashboard_sessions SET last_seen_at = GREATEST(last_seen_at, $1)
                     WHERE org_id = $2 AND token_hash = $3 AND revoked_at IS NULL",
                )
                .bind(to_us(at))
                .bind(org.as_str().to_owned())
                .bind(token_hash.to_owned()),
            )
            .await?;
        Ok(n > 0)
    }

    async fn revoke_dashboard_session(
        &mut self,
        org: &OrgId,
        token_hash: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let n = self
            .execute(
                sqlx::query(
                    "UPDATE dashboard_sessions SET revoked_at = $1
                     WHERE org_id = $2 AND token_hash = $3 AND revoked_at IS NULL",
                )
                .bind(to_us(at))
                .bind(org.as_str().to_owned())
                .bind(token_hash.to_owned()),
            )
            .await?;
        Ok(n > 0)
    }

    async fn delete_expired_dashboard_sessions(&mut self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        self.execute(sqlx::query("DELETE FROM dashboard_sessions WHERE expires_at <= $1").bind(to_us(now))).await
    }

    async fn insert_action(&mut self, a: &Action) -> Result<(), StoreError> {
        self.queue(writes::insert_action(a)?).await?;
        // An idempotency key may meet its twin, a conflict the caller answers: sent now, so it is this call's.
        if a.idempotency_key.is_some() {
            self.send().await?;
        }
        Ok(())
    }

    async fn update_action(&mut self, a: &Action) -> Result<(), StoreError> {
        self.queue(writes::update_action(a)?).await
    }

    async fn end_action(&mut self, a: &Action, from: ActionState) -> Result<(), StoreError> {
        self.queue(writes::end_action(a, from)?).await
    }

    async fn get_action(&mut self, org: &OrgId, id: &ActionId) -> Result<Option<Action>, StoreError> {
        let query = self
            .locking("SELECT * FROM actions WHERE org_id = $1 AND id = $2")
            .bind(org.as_str().to_owned())
            .bind(id.as_str().to_owned());
        let row = self.fetch_optional(query).await?;
        row.as_ref().map(action_row).transpose()
    }

    async fn find_action_by_idempotency_key(
        &mut self,
        org: &OrgId,
        agent: &AgentId,
        key: &str,
    ) -> Result<Option<Action>, StoreError> {
        let query = self
            .locking("SELECT * FROM actions WHERE org_id = $1 AND agent_id = $2 AND idempotency_key = $3")
            .bind(org.as_str().to_owned())
            .bind(agent.as_str().to_owned())
            .bind(key.to_owned());
        let row = self.fetch_optional(query).await?;
        row.as_ref().map(action_row).transpose()
    }

    async fn list_actions(
        &mut self,
        org: &OrgId,
        filter: &ActionFilter,
        page: &Page,
    ) -> Result<Listed<Action>, StoreError> {
        let rows = self
            .fetch_all(
                sqlx::query(LIST_ACTIONS)
                    .bind(org.as_str().to_owned())
                    .bind(filter.state.map(ActionState::as_str))
                    .bind(filter.agent_id.as_ref().map(|a| a.as_str().to_owned()))
                    .bind(filter.capability.clone())
                    .bind(page.after.clone())
                    .bind(limit(page))
                    .bind(PAGE_BYTES),
            )
            .await?;
        Ok(Listed { cut: page_cut(&rows)?, items: rows.iter().map(action_row).collect::<Result<_, _>>()? })
    }

    async fn count_successes(&mut self, org: &OrgId, agent: &AgentId, capability: &str) -> Result<u64, StoreError> {
        let n = self
            .fetch_count(
                sqlx::query(
                    "SELECT COUNT(*) AS n FROM (SELECT 1 FROM actions WHERE org_id = $1 AND agent_id = $2
                       AND capability = $3 AND state IN ('succeeded', 'approved')
                       AND (state = 'succeeded' OR (target IS NULL AND approval_id IS NOT NULL))
                       LIMIT $4) AS earlier",
                )
                .bind(org.as_str().to_owned())
                .bind(agent.as_str().to_owned())
                .bind(capability.to_owned())
                .bind(i64::try_from(PRECEDENT_CAP).unwrap_or(i64::MAX)),
            )
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn insert_approval(&mut self, a: &Approval) -> Result<(), StoreError> {
        self.execute(
            sqlx::query(
                "INSERT INTO approvals (id, org_id, action_id, group_name, quorum, status, expires_at, token_hash,
                    policy_version, request_hash, rule, snapshot, risk, created_at, decided_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            )
            .bind(a.id.as_str().to_owned())
            .bind(a.org_id.as_str().to_owned())
            .bind(a.action_id.as_str().to_owned())
            .bind(a.group.clone())
            .bind(i64::from(a.quorum))
            .bind(a.status.as_str())
            .bind(to_us(a.expires_at))
            .bind(a.token_hash.clone())
            .bind(a.policy_version.clone())
            .bind(a.request_hash.clone())
            .bind(a.rule.clone())
            .bind(a.snapshot.as_ref().map(to_json).transpose()?)
            .bind(to_json(&a.risk)?)
            .bind(to_us(a.created_at))
            .bind(opt_us(a.decided_at)),
        )
        .await
        .map(drop)
    }

    async fn update_approval(&mut self, a: &Approval) -> Result<(), StoreError> {
        let n = self
            .execute(
                sqlx::query("UPDATE approvals SET status = $1, decided_at = $2 WHERE org_id = $3 AND id = $4")
                    .bind(a.status.as_str())
                    .bind(opt_us(a.decided_at))
                    .bind(a.org_id.as_str().to_owned())
                    .bind(a.id.as_str().to_owned()),
            )
            .await?;
        if n == 1 { Ok(()) } else { Err(StoreError::Internal(format!("approval {} vanished", a.id))) }
    }

    async fn insert_decision(
        &mut self,
        org: &OrgId,
        approval: &ApprovalId,
        d: &DecisionRecord,
    ) -> Result<(), StoreError> {
        self.execute(
            sqlx::query(
                "INSERT INTO decisions (approval_id, org_id, user_id, user_name, decision, note, counted, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(approval.as_str().to_owned())
            .bind(org.as_str().to_owned())
            .bind(d.user_id.as_str().to_owned())
            .bind(d.user_name.clone())
            .bind(d.decision.as_str())
            .bind(d.note.clone())
            .bind(d.counted)
            .bind(to_us(d.created_at)),
        )
        .await
        .map(drop)
    }

    async fn get_approval(&mut self, org: &OrgId, id: &ApprovalId) -> Result<Option<Approval>, StoreError> {
        let query = self
            .locking("SELECT * FROM approvals WHERE org_id = $1 AND id = $2")
            .bind(org.as_str().to_owned())
            .bind(id.as_str().to_owned());
        let row = self.fetch_optional(query).await?;
        self.one_approval(row).await
    }

    async fn find_approval_by_token_hash(&mut self, hash: &str) -> Result<Option<Approval>, StoreError> {
        let query = self.locking("SELECT * FROM approvals WHERE token_hash = $1").bind(hash.to_owned());
        let row = self.fetch_optional(query).await?;
        self.one_approval(row).await
    }

    async fn list_approvals(
        &mut self,
        org: &OrgId,
        status: Option<ApprovalStatus>,
        page: &Page,
    ) -> Result<Listed<Approval>, StoreError> {
        // Pending: oldest first (the queue); anything else: newest first (history). ULIDs sort by time.
        let sql = if status == Some(ApprovalStatus::Pending) { LIST_PENDING_APPROVALS } else { LIST_DECIDED_APPROVALS };
        let rows = self
            .fetch_all(
                sqlx::query(sql)
                    .bind(org.as_str().to_owned())
                    .bind(status.map(ApprovalStatus::as_str))
                    .bind(page.after.clone())
                    .bind(limit(page))
                    .bind(PAGE_BYTES),
            )
            .await?;
        Ok(Listed { cut: page_cut(&rows)?, items: self.approvals_with_decisions(rows).await? })
    }

    async fn count_pending_approvals(&mut self) -> Result<i64, StoreError> {
        self.fetch_count(sqlx::query("SELECT COUNT(*) AS n FROM approvals WHERE status = 'pending'")).await
    }

    async fn list_pending_deadlines(&mut self) -> Result<Vec<PendingDeadline>, StoreError> {
        let rows = self
            .fetch_all(sqlx::query(
                "SELECT org_id, id, expires_at FROM approvals WHERE status = 'pending' ORDER BY expires_at",
            ))
            .await?;
        rows.iter()
            .map(|row| {
                Ok(PendingDeadline {
                    org_id: OrgId::from_stored(get(row, "org_id")?),
                    approval_id: ApprovalId::from_stored(get(row, "id")?),
                    expires_at: from_us(get(row, "expires_at")?)?,
                })
            })
            .collect()
    }

    async fn append_audit(&mut self, org: &OrgId, event: NewAuditEvent) -> Result<AuditEvent, StoreError> {
        if let Some((head_org, seq, hash)) = self.head.take()
            && head_org == *org
        {
            return Ok(self.seal(org, seq, &hash, event));
        }
        const LOCK_HEAD: &str = "SELECT seq, hash FROM audit_heads WHERE org_id = $1 FOR NO KEY UPDATE";
        // No write is queued on audit_heads (the audit rows move it, in the statement itself before the read):
        // the lock goes with the queued writes, after them.
        let owner = org.as_str().to_owned();
        let rows = self
            .send_with(Some(|sql: &mut sqlx::QueryBuilder<Postgres>| {
                sql.push("SELECT seq, hash FROM audit_heads WHERE org_id = ")
                    .push_bind(owner)
                    .push(" FOR NO KEY UPDATE");
            }))
            .await?;
        let mut head = rows.into_iter().find(|row| matches!(get::<Option<i64>>(row, "seq"), Ok(Some(_))));
        if head.is_none() {
            // The org's first event: create its head at the genesis. A concurrent first append waits on the
            // unique index, then does nothing; both then queue on the row lock below.
            self.execute(
                sqlx::query(
                    "INSERT INTO audit_heads (org_id, seq, hash) VALUES ($1, 0, $2) ON CONFLICT (org_id) DO NOTHING",
                )
                .bind(org.as_str().to_owned())
                .bind(GENESIS_HASH),
            )
            .await?;
            head = self.fetch_optional(sqlx::query(LOCK_HEAD).bind(org.as_str().to_owned())).await?;
        }
        let head = head.ok_or_else(|| StoreError::Internal(format!("audit head of org {org} is missing")))?;
        let (seq, hash): (i64, String) = (get(&head, "seq")?, get(&head, "hash")?);
        Ok(self.seal(org, seq, &hash, event))
    }

    async fn list_audit(
        &mut self,
        org: &OrgId,
        filter: &AuditFilter,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        self.select_audit(org, filter, false, after_seq, limit).await
    }

    async fn list_audit_newest(
        &mut self,
        org: &OrgId,
        filter: &AuditFilter,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        self.select_audit(org, filter, true, before_seq.unwrap_or(i64::MAX), limit).await
    }

    async fn audit_head(&mut self, org: &OrgId) -> Result<Option<AuditHead>, StoreError> {
        let row = self
            .fetch_optional(
                sqlx::query("SELECT seq, hash, time_us FROM audit_events WHERE org_id = $1 ORDER BY seq DESC LIMIT 1")
                    .bind(org.as_str().to_owned()),
            )
            .await?;
        row.map(|row| {
            Ok(AuditHead { seq: get(&row, "seq")?, hash: get(&row, "hash")?, time: from_us(get(&row, "time_us")?)? })
        })
        .transpose()
    }

    async fn last_audit_seq_before(&mut self, org: &OrgId, before: DateTime<Utc>) -> Result<Option<i64>, StoreError> {
        let row = self
            .fetch_optional(sqlx::query(LAST_AUDIT_SEQ_BEFORE).bind(org.as_str().to_owned()).bind(to_us(before)))
            .await?;
        let seq = match row {
            Some(row) => get::<Option<i64>>(&row, "seq")?,
            None => None,
        };
        Ok(seq.filter(|seq| *seq > 0))
    }

    async fn insert_checkpoint(&mut self, c: &Checkpoint) -> Result<(), StoreError> {
        self.execute(
            sqlx::query(
                "INSERT INTO audit_checkpoints (org_id, seq, head_hash, time_us, key_id, signature)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (org_id, seq) DO NOTHING",
            )
            .bind(c.org_id.clone())
            .bind(c.seq)
            .bind(c.head_hash.clone())
            .bind(c.time_us)
            .bind(c.key_id.clone())
            .bind(c.signature.clone()),
        )
        .await
        .map(drop)
    }

    async fn checkpoint_at(&mut self, org: &OrgId, seq: i64) -> Result<Option<Checkpoint>, StoreError> {
        let row = self
            .fetch_optional(
                sqlx::query("SELECT * FROM audit_checkpoints WHERE org_id = $1 AND seq = $2")
                    .bind(org.as_str().to_owned())
                    .bind(seq),
            )
            .await?;
        row.as_ref().map(checkpoint_row).transpose()
    }

    async fn list_checkpoints(
        &mut self,
        org: &OrgId,
        after_seq: i64,
        upto_seq: i64,
        limit: u32,
    ) -> Result<Vec<Checkpoint>, StoreError> {
        let rows = self
            .fetch_all(
                sqlx::query(
                    "SELECT * FROM audit_checkpoints WHERE org_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4",
                )
                .bind(org.as_str().to_owned())
                .bind(after_seq)
                .bind(upto_seq)
                .bind(i64::from(limit)),
            )
            .await?;
        rows.iter().map(checkpoint_row).collect()
    }

    async fn retention(&mut self, org: &OrgId) -> Result<Retention, StoreError> {
        let query = self.locking("SELECT * FROM audit_retention WHERE org_id = $1").bind(org.as_str().to_owned());
        let row = self.fetch_optional(query).await?;
        match row {
            Some(row) => retention_row(&row),
            None => Ok(Retention { org_id: org.clone(), days: None, deleted_upto: 0 }),
        }
    }

    async fn list_retention_windows(&mut self) -> Result<Vec<Retention>, StoreError> {
        let rows =
            self.fetch_all(sqlx::query("SELECT * FROM audit_retention WHERE days IS NOT NULL ORDER BY org_id")).await?;
        rows.iter().map(retention_row).collect()
    }

    async fn set_retention_days(&mut self, org: &OrgId, days: Option<u32>) -> Result<(), StoreError> {
        self.execute(
            sqlx::query(
                "INSERT INTO audit_retention (org_id, days) VALUES ($1, $2)
                 ON CONFLICT (org_id) DO UPDATE SET days = excluded.days",
            )
            .bind(org.as_str().to_owned())
            .bind(days.map(i64::from)),
        )
        .await
        .map(drop)
    }

    async fn delete_audit_prefix(&mut self, org: &OrgId, upto_seq: i64) -> Result<u64, StoreError> {
        self.execute(
            sqlx::query(
                "INSERT INTO audit_retention (org_id, deleted_upto) VALUES ($1, $2)
                 ON CONFLICT (org_id) DO UPDATE SET deleted_upto = excluded.deleted_upto",
            )
            .bind(org.as_str().to_owned())
            .bind(upto_seq),
        )
        .await?;
        self.execute(
            sqlx::query("DELETE FROM audit_events WHERE org_id = $1 AND seq <= $2")
                .bind(org.as_str().to_owned())
                .bind(upto_seq),
        )
        .await
    }

    async fn insert_job(&mut self, j: &Job) -> Result<(), StoreError> {
        self.queue(writes::insert_job(j)?).await
    }

    async fn update_job(&mut self, j: &Job) -> Result<(), StoreError> {
        self.queue(writes::update_job(j)?).await
    }

    async fn end_queued_job(&mut self, end: &JobEnd) -> Result<(), StoreError> {
        self.queue(writes::end_queued_job(end)?).await
    }

    async fn get_job(&mut self, org: &OrgId, id: &JobId) -> Result<Option<Job>, StoreError> {
        let query = self
            .locking("SELECT * FROM jobs WHERE org_id = $1 AND id = $2")
            .bind(org.as_str().to_owned())
            .bind(id.as_str().to_owned());
        let row = self.fetch_optional(query).await?;
        row.as_ref().map(job_row).transpose()
    }

    async fn list_jobs(&mut self, org: &OrgId, filter: &JobFilter, page: &Page) -> Result<Vec<Job>, StoreError> {
        // An agent's ($7): only executions of its own actions, found from those actions (`actions_precedent`,
        // then `jobs_subject`), so a request costs as much as the agent's actions, not the org's job history.
        let query = match filter.agent {
            Some(_) => sqlx::query(
                "SELECT jobs.* FROM actions JOIN jobs ON jobs.org_id = actions.org_id AND jobs.subject = actions.id
                 WHERE actions.org_id = $1 AND actions.agent_id = $7 AND jobs.kind = 'action.execute'
                   AND ($2::text IS NULL OR jobs.kind = $2) AND ($3::text IS NULL OR jobs.state = $3)
                   AND ($4::text IS NULL OR jobs.subject = $4) AND ($5::text IS NULL OR jobs.id < $5)
                 ORDER BY jobs.id DESC LIMIT $6",
            ),
            None => sqlx::query(
                "SELECT * FROM jobs WHERE org_id = $1
                   AND ($2::text IS NULL OR kind = $2) AND ($3::text IS NULL OR state = $3)
                   AND ($4::text IS NULL OR subject = $4) AND ($5::text IS NULL OR id < $5)
                 ORDER BY id DESC LIMIT $6",
            ),
        };
        let mut query = query
            .bind(org.as_str().to_owned())
            .bind(filter.kind.map(JobKind::as_str))
            .bind(filter.state.map(JobState::as_str))
            .bind(filter.subject.clone())
            .bind(page.after.clone())
            .bind(limit(page));
        if let Some(agent) = &filter.agent {
            query = query.bind(agent.as_str().to_owned());
        }
        let rows = self.fetch_all(query).await?;
        rows.iter().map(job_row).collect()
    }

    async fn claim_job(
        &mut self,
        now: DateTime<Utc>,
        owner: &str,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<Job>, StoreError> {
        // SKIP LOCKED: a job another replica is claiming right now is passed over, not waited for. A row
        // claimed and committed since this statement's snapshot is re-checked under its lock and dropped.
        // Jobs whose lease ran out first (a replica died running them: few, and each is taken once, with a
        // new lease), then due queued jobs; otherwise a steady backlog of queued jobs would keep a dead
        // replica's job, and its action stuck `executing`, from being taken up again until the backlog
        // drained. Each probe walks its own partial index (`jobs_leased`, `jobs_due`) instead of one OR that
        // would look at every running job.
        for probe in [
            "SELECT id FROM jobs WHERE state = 'running' AND lease_until <= $1 ORDER BY lease_until LIMIT 1
             FOR NO KEY UPDATE SKIP LOCKED",
            "SELECT id FROM jobs WHERE state = 'queued' AND run_at <= $1 ORDER BY run_at LIMIT 1
             FOR NO KEY UPDATE SKIP LOCKED",
        ] {
            let row = self
                .fetch_optional(
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = $2,
                            lease_until = $3, started_at = COALESCE(started_at, $1)
                         WHERE id = ({probe})
                         RETURNING *"
                    )))
                    .bind(to_us(now))
                    .bind(owner.to_owned())
                    .bind(to_us(lease_until)),
                )
                .await?;
            if let Some(row) = row {
                return job_row(&row).map(Some);
            }
        }
        Ok(None)
    }

    async fn next_job_due(&mut self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let row = self
            .fetch_optional(sqlx::query(
                "SELECT LEAST(
                    (SELECT MIN(run_at) FROM jobs WHERE state = 'queued'),
                    (SELECT MIN(lease_until) FROM jobs WHERE state = 'running')) AS t",
            ))
            .await?;
        match row {
            Some(row) => opt_from_us(get(&row, "t")?),
            None => Ok(None),
        }
    }

    async fn renew_job_lease(&mut self, id: &JobId, owner: &str, until: DateTime<Utc>) -> Result<bool, StoreError> {
        let n = self
            .execute(
                sqlx::query(
                    "UPDATE jobs SET lease_until = $1 WHERE id = $2 AND state = 'running' AND lease_owner = $3",
                )
                .bind(to_us(until))
                .bind(id.as_str().to_owned())
                .bind(owner.to_owned()),
            )
            .await?;
        Ok(n == 1)
    }

    async fn release_job_leases(&mut self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        self.execute(sqlx::query("UPDATE jobs SET lease_until = $1 WHERE state = 'running'").bind(to_us(now))).await
    }

    async fn count_open_jobs(&mut self) -> Result<Vec<(JobKind, JobState, i64)>, StoreError> {
        let rows = self
            .fetch_all(sqlx::query(
                "SELECT kind, state, COUNT(*) AS n FROM jobs WHERE state IN ('queued', 'running') GROUP BY kind, state",
            ))
            .await?;
        rows.iter()
            .map(|row| {
                let kind: String = get(row, "kind")?;
                let state: String = get(row, "state")?;
                Ok((
                    JobKind::parse(&kind).ok_or_else(|| corrupt("kind", &kind))?,
                    JobState::parse(&state).ok_or_else(|| corrupt("state", &state))?,
                    get(row, "n")?,
                ))
            })
            .collect()
    }

    async fn insert_webhook(&mut self, w: &Webhook) -> Result<(), StoreError> {
        self.execute(
            sqlx::query(
                "INSERT INTO webhooks (id, org_id, url, events, secret, format, description, created_at, deleted_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(w.id.as_str().to_owned())
            .bind(w.org_id.as_str().to_owned())
            .bind(w.url.clone())
            .bind(to_json(&w.events)?)
            .bind(w.secret.clone())
            .bind(w.format.as_str())
            .bind(w.description.clone())
            .bind(to_us(w.created_at))
            .bind(opt_us(w.deleted_at)),
        )
        .await
        .map(drop)
    }

    async fn get_webhook(&mut self, org: &OrgId, id: &WebhookId) -> Result<Option<Webhook>, StoreError> {
        let query = self
            .locking("SELECT * FROM webhooks WHERE org_id = $1 AND id = $2")
            .bind(org.as_str().to_owned())
            .bind(id.as_str().to_owned());
        let row = self.fetch_optional(query).await?;
        row.as_ref().map(webhook_row).transpose()
    }

    async fn list_webhooks(&mut self, org: &OrgId) -> Result<Vec<Webhook>, StoreError> {
        // No write is queued on webhooks: the list goes with the queued writes (the delivery fan-out's).
        let org = org.as_str().to_owned();
        let rows = self
            .send_with(Some(|sql: &mut sqlx::QueryBuilder<Postgres>| {
                sql.push("SELECT * FROM webhooks WHERE org_id = ").push_bind(org).push(" AND deleted_at IS NULL");
            }))
            .await?;
        let mut hooks = Vec::with_capacity(rows.len());
        for row in &rows {
            if get::<Option<String>>(row, "id")?.is_some() {
                hooks.push(webhook_row(row)?);
            }
        }
        hooks.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        Ok(hooks)
    }

    async fn delete_webhook(&mut self, org: &OrgId, id: &WebhookId, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let n = self
            .execute(
                sqlx::query("UPDATE webhooks SET deleted_at = $1 WHERE org_id = $2 AND id = $3 AND deleted_at IS NULL")
                    .bind(to_us(at))
                    .bind(org.as_str().to_owned())
                    .bind(id.as_str().to_owned()),
            )
            .await?;
        Ok(n == 1)
    }

    async fn insert_delivery(&mut self, d: &Delivery) -> Result<(), StoreError> {
        self.queue(writes::insert_delivery(d)).await
    }

    async fn list_deliveries(
        &mut self,
        org: &OrgId,
        webhook: &WebhookId,
        page: &Page,
    ) -> Result<Vec<Delivery>, StoreError> {
        let rows = self
            .fetch_all(
                sqlx::query(
                    "SELECT * FROM webhook_deliveries WHERE org_id = $1 AND webhook_id = $2
                       AND ($3::text IS NULL OR id < $3)
                     ORDER BY id DESC LIMIT $4",
                )
                .bind(org.as_str().to_owned())
                .bind(webhook.as_str().to_owned())
                .bind(page.after.clone())
                .bind(limit(page)),
            )
            .await?;
        rows.iter().map(delivery_row).collect()
    }

    async fn insert_policy(&mut self, p: &StoredPolicy) -> Result<(), StoreError> {
        self.lock_org_policy(&p.org_id).await?;
        self.execute(
            sqlx::query(
                "INSERT INTO policies (org_id, version, sources, origin, created_at) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(p.org_id.as_str().to_owned())
            .bind(p.version.clone())
            .bind(to_json(&p.sources)?)
            .bind(p.origin.clone())
            .bind(to_us(p.created_at)),
        )
        .await
        .map(drop)
    }

    async fn current_policy(&mut self, org: &OrgId) -> Result<Option<StoredPolicy>, StoreError> {
        self.lock_org_policy(org).await?;
        let row = self
            .fetch_optional(
                sqlx::query("SELECT * FROM policies WHERE org_id = $1 ORDER BY seq DESC LIMIT 1")
                    .bind(org.as_str().to_owned()),
            )
            .await?;
        row.as_ref().map(policy_row).transpose()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn verified(url: &str) -> bool {
        certificate_verified(&PgConnectOptions::from_str(url).unwrap())
    }

    #[test]
    fn only_a_checked_certificate_or_a_local_server_goes_without_a_warning() {
        assert!(!verified("postgres://cs@db.example.com/countersign"));
        assert!(!verified("postgres://cs@db.example.com/countersign?sslmode=require"));
        assert!(!verified("postgres://cs@10.0.0.5:5432/countersign?sslmode=prefer"));
        assert!(verified("postgres://cs@db.example.com/countersign?sslmode=verify-full"));
        assert!(!verified("postgres://cs@db.example.com/countersign?sslmode=verify-ca&sslrootcert=/etc/ca.pem"));
        assert!(verified("postgres://cs@127.0.0.1:5432/countersign"));
        assert!(verified("postgres://cs@localhost/countersign"));
        assert!(verified("postgres://cs@[::1]:5432/countersign"));
        assert!(verified("postgres://cs@%2Fvar%2Frun%2Fpostgresql/countersign"));
        assert!(verified("postgres://cs@db.example.com/countersign?host=/var/run/postgresql"));
    }
}
