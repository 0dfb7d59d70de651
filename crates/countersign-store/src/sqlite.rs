//! The SQLite store: one file under the data directory, WAL journal, one writer at a time.
//!
//! Writes go through exactly one connection, held behind tokio's fair mutex, so writers queue in order instead of
//! meeting SQLite's busy handler, which sleeps in steps of milliseconds; reads use a pool of their own and never
//! wait for a writer (WAL). Write transactions still start with `BEGIN IMMEDIATE`, so a second process on the
//! same file cannot upgrade a lock under us and the audit chain's head cannot move between reading it and
//! appending after it. The writer is driven by rusqlite on the calling thread, the readers by sqlx's pool (a
//! thread per connection): a round trip to such a thread costs two thread wake-ups, more than most statements
//! take, and the writer runs every statement of every write transaction. A write transaction queues its inserts,
//! updates and audit rows and runs them with the next statement that needs them or before its `COMMIT` (see
//! [`Batch`]). Commits are group-committed: a commit returns once an `fdatasync` of the WAL that began after it
//! has finished, and one sync serves every writer queued behind it (see
//! [`Durability`]). The writer does not checkpoint the WAL on commit (`wal_autocheckpoint = 0`): a background
//! checkpoint runs once writes pause, or after [`CHECKPOINT_BOUND`] commits if they never do. Passive passes on a
//! reader connection copy the log into the database file while writers go on, and a last one, in the writer's
//! turn, copies the few frames appended meanwhile so the log can start over (see [`Durability::checkpoint`]).
//! Rows become domain records through the mappers in `rows`, shared with the PostgreSQL store; this module holds
//! no business rules.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

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
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection as _, Sqlite, SqlitePool, Transaction};

use crate::rows::{
    action_bytes, action_row, agent_row, approval_row, audit_row, audit_rows, audit_write_failed, checkpoint_row,
    corrupt, dashboard_session_row, decision_row, delivery_row, from_us, get, job_row, key_row, limit, map_sqlx,
    migrator, opt_from_us, opt_us, org_row, page_cut, policy_row, retention_row, revoked_sessions, seal_pending,
    session_row, to_json, to_us, user_row, webhook_row, within_page_bytes,
};
use crate::stmt::{Row, Stmt, is_constraint, is_io, map_lite, q};
use crate::writes::{self, Expect, Write};

const MIGRATIONS: [(i64, &str, &str); 6] = [
    (1, "init", include_str!("../migrations/sqlite/0001_init.sql")),
    (2, "jobs_webhooks_checkpoints", include_str!("../migrations/sqlite/0002_jobs_webhooks_checkpoints.sql")),
    (3, "dashboard_sessions", include_str!("../migrations/sqlite/0003_dashboard_sessions.sql")),
    (4, "session_minting_key", include_str!("../migrations/sqlite/0004_session_minting_key.sql")),
    (5, "audit_events_rowid", include_str!("../migrations/sqlite/0005_audit_events_rowid.sql")),
    (6, "instance_secrets", include_str!("../migrations/sqlite/0006_instance_secrets.sql")),
];

/// How long a transaction waits for its connection (a writer, for the one writer) before it gives up.
const WRITER_WAIT: Duration = Duration::from_secs(15);

/// The page size of a database file this store creates (one that exists keeps its own). Each commit appends
/// every page it changed to the WAL, and its sync writes them all: a proxied model call's two commits change
/// about 28 pages of SQLite's default 4,096 bytes (index leaves, row pages, the chain head), almost all far
/// from full, and about 34 of 2,048 bytes, so each call syncs 70 KB instead of 115 KB. Measured on the LLM
/// proxy at 1 client, interleaved with a 4,096-byte store in one process: 0.14 to 0.19 ms less added latency
/// at the median (of 1.5 to 2 ms), and no change at 64 clients. 1,024 bytes saved a little more with short
/// prompts, but lost throughput at 64 clients with 6 KB prompts, whose rows then spill into chains of
/// overflow pages.
pub const PAGE_SIZE: u32 = 2048;

/// A checkpoint copies the WAL into the database file and syncs that file: megabytes written while commits
/// wait for their own syncs, which then queue behind it on the disk. So it runs when writes pause for
/// [`CHECKPOINT_IDLE`] with at least [`CHECKPOINT_SOFT`] commits since the last one, and under writes that never
/// pause only every [`CHECKPOINT_BOUND`] commits (about 17,000 pages, 36 MB, of WAL at a model call's write
/// sizes), where its cost is shared by more commits: a hot page is copied once however often it changed.
/// Measured on the LLM proxy, interleaved in one process with the former checkpoint every 256 commits, in
/// two runs: p99 at 1 client 2.7 and 3.0 ms instead of 4.3 ms (p99.5 3.4 and 3.6 instead of 6.3 and 6.5),
/// p99 at 64 clients 95 ms instead of 102 and 103, medians unchanged.
const CHECKPOINT_BOUND: u64 = 1024;
const CHECKPOINT_SOFT: u64 = 32;
const CHECKPOINT_IDLE: Duration = Duration::from_millis(25);
/// Reader passes a checkpoint may take before the writer's: each copies what writers appended during the
/// last, so they converge on a tail short enough to copy in the writer's turn.
const CHECKPOINT_READER_PASSES: usize = 4;
/// Frames appended during a reader pass after which the writer's pass follows without another reader pass.
const CHECKPOINT_TAIL_FRAMES: i64 = 256;
/// How long a deferred commit ([`StoreTx::defer_sync`]) may wait for another's sync to cover it before one
/// runs for it alone. Its caller's own durable commit usually comes first: a sync started at once instead
/// would hold the disk just when that commit needs it (the LLM proxy's p99 at 1 client went from 2.9 ms to
/// 5.4 ms, and its throughput at 64 clients fell by a fifth).
const DEFERRED_SYNC_WITHIN: Duration = Duration::from_millis(2);

#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Every write transaction's connection, with what writers remember (see [`Writer`]).
    writer: Arc<tokio::sync::Mutex<Writer>>,
    /// Read transactions and the background checkpoint.
    reader: SqlitePool,
    durability: Arc<Durability>,
}

/// The single writer. A write transaction holds this lock (tokio's fair mutex, so writers queue in order)
/// from before its `BEGIN` until its commit has updated the memo (or, failing, emptied it, since what is on
/// disk is then not known): no writer ever reads what another has not finished committing, and the
/// connection is never shared.
struct Writer {
    /// Held for the store's life, outside any pool, and driven by rusqlite on the calling thread: sqlx runs
    /// each connection on a thread of its own, and a statement's round trip there (two thread wake-ups, 60 to
    /// 120 µs on the 2-vCPU machine the benchmarks run on) cost more than the statement itself.
    conn: rusqlite::Connection,
    /// A transaction was begun on `conn` and not yet committed or rolled back. A write transaction dropped
    /// or cancelled midway leaves one, which its [`WriterTurn`] rolls back as it goes (or, if that fails,
    /// whoever takes the writer next).
    open: bool,
    memo: WriterMemo,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("open", &self.open).finish_non_exhaustive()
    }
}

impl Writer {
    /// Rolls back the transaction left open, if any.
    fn settle(&mut self) -> Result<(), StoreError> {
        if !self.open {
            return Ok(());
        }
        // Without a transaction (a COMMIT that failed, or a BEGIN that never ran) SQLite has ended it already.
        if !self.conn.is_autocommit() {
            self.conn.execute_batch("ROLLBACK").map_err(map_lite)?;
        }
        self.open = false;
        Ok(())
    }
}

/// A write transaction's hold on the [`Writer`]. Dropped with a transaction open (an error, or a caller
/// that went away), it rolls the transaction back.
struct WriterTurn(tokio::sync::OwnedMutexGuard<Writer>);

impl Drop for WriterTurn {
    fn drop(&mut self) {
        if let Err(e) = self.0.settle() {
            let why = "rolling back an abandoned write transaction failed; the next writer tries again";
            tracing::warn!(error = %e, "{why}");
        }
    }
}

impl std::ops::Deref for WriterTurn {
    type Target = Writer;
    fn deref(&self) -> &Writer {
        &self.0
    }
}

impl std::ops::DerefMut for WriterTurn {
    fn deref_mut(&mut self) -> &mut Writer {
        &mut self.0
    }
}

/// Counts a transaction among those waiting for the writer's lock ([`Durability::waiting`]) until dropped,
/// which a caller that stops waiting does too.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn on(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the single writer (and one process per file) knows is on disk without reading it, since only this
/// store's commits change it.
#[derive(Debug, Default)]
struct WriterMemo {
    /// Each org's audit head, so a write transaction's first append need not read it.
    heads: HashMap<OrgId, (i64, String)>,
    /// Each org's live webhooks as last read by a write transaction that changed none, so the delivery fan-out
    /// in every action's commit need not read them. Forgotten by a transaction that changes them, before the
    /// change, so a rolled-back change costs a read at most.
    webhooks: HashMap<OrgId, Vec<Webhook>>,
}

/// Group commit and checkpoints for the database file.
///
/// A commit is reported (unless it [`StoreTx::defer_sync`]s) only once the WAL is on disk up to it, in one of two
/// ways, chosen as its transaction begins:
/// - **Alone** (no other writer waiting for the lock, and the commit not deferred as far as is known then): the
///   transaction runs with `synchronous = FULL`, so SQLite syncs the WAL inside its `COMMIT`, on the calling
///   thread (a runtime worker, blocked meanwhile: cheaper here than any hand-off). That sync covers every
///   commit before it too. SQLite syncs only a commit that wrote frames, and skips both for one that changed no page, so only a
///   transaction that inserted a row (every one that appends audit events) counts as synced by its `COMMIT`;
///   any other then waits for the shared sync as well.
/// - **Shared** (a writer waiting): it runs with `synchronous = NORMAL`, so SQLite writes the WAL frames under
///   the write lock but does not sync them, and the commit returns after an `fdatasync` of the WAL file that
///   began after it, taken out of the single writer's turn and shared. Whoever finds no sync running starts one
///   covering every commit so far; commits that land meanwhile wait for the next, so one sync serves a whole
///   queue of writers. Syncing inside the `COMMIT` would hold the lock through each sync and serialize them.
///
/// Either way the guarantee is that of `synchronous = FULL`: the WAL is on disk before the commit is
/// acknowledged. Commits are counted in the order they happen (under the lock), so a sync inside a `COMMIT`
/// marks every commit counted before it synced. A read transaction first waits for the syncs of every commit
/// made before it begins, so what a reader sees (and may act on) is on disk too; only a commit racing the
/// reader's start by microseconds can escape that.
///
/// A failed sync poisons the store: the kernel may have dropped the dirty pages and cleared the error, so no
/// later sync could prove anything, and every write, read and readiness check fails until a restart. The sync
/// runs detached, so a caller that goes away meanwhile cannot lose its outcome. A `COMMIT` that was to sync and
/// a checkpoint that fail with an I/O error poison the store too (SQLite's own sync may have been the one to
/// see the error). The writer's `COMMIT` runs to its end on the calling thread, so no caller going away
/// midway can lose that error.
#[derive(Debug)]
struct Durability {
    /// The files to sync.
    files: LogFiles,
    /// Commits made, and the number known to be on disk.
    committed: AtomicU64,
    synced: AtomicU64,
    /// Held while a sync runs.
    syncing: tokio::sync::Mutex<()>,
    /// Transactions waiting for the writer's lock: a transaction that begins while none waits has SQLite
    /// sync its commit.
    waiting: AtomicUsize,
    /// Whether a commit with no writer waiting is synced inside its `COMMIT` (tests of the shared sync turn
    /// it off).
    sync_in_commit: bool,
    poisoned: AtomicBool,
    checkpoint_running: AtomicBool,
    /// The commit count when the last checkpoint started.
    checkpointed_at: AtomicU64,
    /// Set while a task waits for writes to pause.
    idle_watch: AtomicBool,
    /// Checkpoints finished (passes that failed included), for tests to await.
    checkpoints: tokio::sync::watch::Sender<u64>,
    /// `<database>.lock`, locked for the store's life: one process per database file.
    _lock: Option<std::fs::File>,
}

/// The WAL, held open for the store's life (Linux reports a write-back error to the descriptors open when it
/// happened, so a file opened afresh for each sync could miss one), and the database file beside it.
#[derive(Debug)]
struct LogFiles {
    wal_path: PathBuf,
    /// Opened at the first sync if SQLite had not created the file yet.
    wal: std::sync::Mutex<Option<Arc<std::fs::File>>>,
    db: std::fs::File,
}

impl LogFiles {
    /// Opens the files of the database at `db_path` as SQLite resolved it (so a symlinked database file is
    /// followed to where its WAL really is), and syncs their directory once.
    fn open(db_path: &Path) -> std::io::Result<LogFiles> {
        let writable = |path: &Path| std::fs::OpenOptions::new().write(true).open(path);
        let mut wal_path = db_path.as_os_str().to_owned();
        wal_path.push("-wal");
        let wal_path = PathBuf::from(wal_path);
        let wal = match writable(&wal_path) {
            Ok(file) => Some(Arc::new(file)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let files = LogFiles { wal: std::sync::Mutex::new(wal), db: writable(db_path)?, wal_path };
        if let Some(dir) = db_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(files)
    }

    /// `fdatasync` of the WAL, reopened only if SQLite replaced the file. A missing WAL was checkpointed into
    /// the database file and removed, so that file is synced instead.
    fn sync(&self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let wal = {
            let mut held = self.wal.lock().map_err(|_| std::io::Error::other("the WAL file's lock is poisoned"))?;
            match (std::fs::metadata(&self.wal_path), held.as_ref()) {
                (Ok(now), Some(file)) if now.ino() == file.metadata()?.ino() => Some(Arc::clone(file)),
                (Ok(_), _) => {
                    let file = Arc::new(std::fs::OpenOptions::new().write(true).open(&self.wal_path)?);
                    *held = Some(Arc::clone(&file));
                    Some(file)
                }
                (Err(e), _) if e.kind() == std::io::ErrorKind::NotFound => None,
                (Err(e), _) => return Err(e),
            }
        };
        match wal {
            Some(wal) => wal.sync_data(),
            None => self.db.sync_data(),
        }
    }
}

const POISONED: &str = "the database could not be synced to disk; \
    the store refuses work until the gateway restarts";

impl Durability {
    fn new(files: LogFiles, lock: Option<std::fs::File>) -> Durability {
        Durability {
            files,
            committed: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            syncing: tokio::sync::Mutex::new(()),
            waiting: AtomicUsize::new(0),
            sync_in_commit: true,
            poisoned: AtomicBool::new(false),
            checkpoint_running: AtomicBool::new(false),
            checkpointed_at: AtomicU64::new(0),
            idle_watch: AtomicBool::new(false),
            checkpoints: tokio::sync::watch::Sender::new(0),
            _lock: lock,
        }
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable(POISONED.into()));
        }
        Ok(())
    }

    fn poison(&self, why: &str) {
        self.poisoned.store(true, Ordering::Release);
        tracing::error!(error = why, "the SQLite database could not be synced; refusing work until restart");
    }

    /// Counts a commit just made, by its writer while it still holds the lock, so tickets follow the order of
    /// the commits: every later sync covers it, and every later read waits for it. `synced`: SQLite synced the
    /// WAL inside its `COMMIT` (which it does only for a commit that wrote frames), and so every commit counted
    /// before it. Never on a poisoned store: a sync after a failed one proves nothing.
    fn count(&self, synced: bool) -> u64 {
        let ticket = self.committed.fetch_add(1, Ordering::AcqRel) + 1;
        if synced && self.check().is_ok() {
            self.synced.fetch_max(ticket, Ordering::AcqRel);
        }
        ticket
    }

    /// After commit `ticket` ([`Durability::count`]), once the writer's lock is let go. With `wait`, returns
    /// once it is on disk. Without, returns at once (failing only if the store is already poisoned) and makes
    /// sure of a sync: usually the next durable commit's or read's covers it, else a detached one starts
    /// [`DEFERRED_SYNC_WITHIN`] later.
    async fn committed(
        self: &Arc<Self>,
        ticket: u64,
        writer: &Arc<tokio::sync::Mutex<Writer>>,
        reader: &SqlitePool,
        wait: bool,
    ) -> Result<(), StoreError> {
        self.schedule_checkpoint(ticket, writer, reader);
        if self.synced.load(Ordering::Acquire) >= ticket {
            return self.check();
        }
        if wait {
            return self.synced_to(ticket).await;
        }
        self.check()?;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return self.synced_to(ticket).await };
        let this = Arc::clone(self);
        // A failure poisons the store, which the caller's next durable step reports.
        runtime.spawn(async move {
            tokio::time::sleep(DEFERRED_SYNC_WITHIN).await;
            this.synced_to(ticket).await
        });
        Ok(())
    }

    /// Before a read: returns once every commit made so far is on disk.
    async fn settled(self: &Arc<Self>) -> Result<(), StoreError> {
        self.check()?;
        self.synced_to(self.committed.load(Ordering::Acquire)).await
    }

    async fn synced_to(self: &Arc<Self>, ticket: u64) -> Result<(), StoreError> {
        if self.synced.load(Ordering::Acquire) >= ticket {
            return self.check();
        }
        let _turn = self.syncing.lock().await;
        if self.synced.load(Ordering::Acquire) >= ticket {
            return self.check();
        }
        self.check()?;
        // Every commit counted by now has written its frames: one sync covers them all.
        let upto = self.committed.load(Ordering::Acquire);
        let this = Arc::clone(self);
        let done = tokio::task::spawn_blocking(move || match this.files.sync() {
            Ok(()) => {
                this.synced.fetch_max(upto, Ordering::AcqRel);
                true
            }
            Err(e) => {
                this.poison(&e.to_string());
                false
            }
        })
        .await;
        match done {
            Ok(true) => Ok(()),
            Ok(false) => Err(StoreError::Unavailable(POISONED.into())),
            Err(e) => {
                self.poison(&e.to_string());
                Err(StoreError::Unavailable(POISONED.into()))
            }
        }
    }

    /// After commit `ticket`: checkpoints at once if [`CHECKPOINT_BOUND`] commits have gone by since the last
    /// checkpoint, else past [`CHECKPOINT_SOFT`] makes sure a task is waiting for writes to pause.
    fn schedule_checkpoint(
        self: &Arc<Self>,
        ticket: u64,
        writer: &Arc<tokio::sync::Mutex<Writer>>,
        reader: &SqlitePool,
    ) {
        let since = ticket.saturating_sub(self.checkpointed_at.load(Ordering::Acquire));
        if since >= CHECKPOINT_BOUND {
            self.checkpoint(writer, reader);
            return;
        }
        if since < CHECKPOINT_SOFT || self.idle_watch.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.idle_watch.store(false, Ordering::Release);
            return;
        };
        let (writer, reader, this) = (Arc::clone(writer), reader.clone(), Arc::clone(self));
        runtime.spawn(async move {
            loop {
                let seen = this.committed.load(Ordering::Acquire);
                tokio::time::sleep(CHECKPOINT_IDLE).await;
                let now = this.committed.load(Ordering::Acquire);
                // One still running (a bound one, or this store's last) is waited out: the commits since it
                // copied the log are still to copy.
                if now == seen && this.checkpoint(&writer, &reader) {
                    break;
                }
                // A checkpoint copied the log meanwhile: the next commits past the soft mark watch again.
                if now.saturating_sub(this.checkpointed_at.load(Ordering::Acquire)) < CHECKPOINT_SOFT {
                    break;
                }
            }
            this.idle_watch.store(false, Ordering::Release);
        });
    }

    /// Checkpoints the WAL in the background unless a checkpoint is running (then returns false). Passive
    /// passes on a reader connection copy the frames into the database file while writers go on, until one
    /// finds at most [`CHECKPOINT_TAIL_FRAMES`] new (each copies what was appended during the last). They can
    /// never finish the log under load, since writers keep appending, and SQLite starts the WAL over from its
    /// beginning only at a write that begins with every frame copied: so a last pass takes the writer's turn,
    /// between two write transactions, and copies those few (on a reader connection, so the copy and its syncs
    /// block no runtime thread). The next write then restarts
    /// the log, which keeps the file bounded (instead of growing by every commit) and keeps its syncs
    /// overwriting blocks already allocated. If the reader passes do not get there (a long read pins old
    /// frames), the writer is not held up for the rest: the next checkpoint tries again.
    fn checkpoint(self: &Arc<Self>, writer: &Arc<tokio::sync::Mutex<Writer>>, reader: &SqlitePool) -> bool {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return false };
        if self.checkpoint_running.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.checkpointed_at.store(self.committed.load(Ordering::Acquire), Ordering::Release);
        let (writer, reader, this) = (Arc::clone(writer), reader.clone(), Arc::clone(self));
        runtime.spawn(async move {
            // A pass sees the log as it was when it began, so the frames appended while one ran are what the
            // next finds beyond it: few, and what is left is short enough for the writer's turn.
            let mut converged = Ok(false);
            let mut seen = 0;
            for _ in 0..CHECKPOINT_READER_PASSES {
                converged = passive_checkpoint(&reader).await.map(|(log, pinned)| {
                    let appended = log - std::mem::replace(&mut seen, log);
                    pinned == 0 && appended <= CHECKPOINT_TAIL_FRAMES
                });
                // An error ends the checkpoint: a pass after it could succeed and hide a failed sync.
                if !matches!(converged, Ok(false)) {
                    break;
                }
            }
            // Even with nothing left, the writer's turn is needed: a write transaction that began before the
            // log was complete appends to it, and SQLite starts the log over only at the first write that
            // begins with every frame copied, which under steady writes is the one right after this pass.
            let done = match converged {
                Ok(true) => 'last: {
                    // On a reader's connection (off the runtime's threads), taken before the writer's turn so
                    // that writers never wait for the pool.
                    let mut conn = match reader.acquire().await {
                        Ok(conn) => conn,
                        Err(e) => break 'last Err(e),
                    };
                    let mut writer = writer.lock().await;
                    let done = match writer.settle() {
                        Ok(()) => passive_checkpoint(&mut *conn).await.map(drop),
                        // The next writer tries the rollback again, and the next checkpoint this pass.
                        Err(_) => Ok(()),
                    };
                    drop(writer);
                    // The log restarts at the next write: commits from here on fill the new one.
                    this.checkpointed_at.store(this.committed.load(Ordering::Acquire), Ordering::Release);
                    done
                }
                Ok(false) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = done {
                if is_io_failure(&e) {
                    this.poison(&format!("checkpoint: {e}"));
                } else {
                    tracing::warn!(error = %e, "background WAL checkpoint failed; the next one tries again");
                }
            }
            this.checkpoint_running.store(false, Ordering::Release);
            this.checkpoints.send_modify(|done| *done += 1);
        });
        true
    }
}

/// One passive checkpoint pass on `connection`: the frames in the log as it found it, and how many of those
/// it could not copy (a reader's snapshot still needs them).
async fn passive_checkpoint<'c>(
    connection: impl sqlx::Executor<'c, Database = Sqlite>,
) -> Result<(i64, i64), sqlx::Error> {
    let rows =
        sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA main.wal_checkpoint(PASSIVE)").fetch_all(connection).await?;
    Ok(rows.first().map_or((0, 0), |(_, log, copied)| (*log, (log - copied).max(0))))
}

/// How long `open` waits for a process that is stopping to let go of the database.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Creates and locks `path` exclusively, waiting up to `wait` for another holder to let go (a process still
/// draining, or a store of this process still being dropped), then says which conflict stops it.
fn exclusive_lock(path: &Path, wait: Duration) -> Result<std::fs::File, StoreError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| StoreError::Internal(format!("cannot open the lock file {}: {e}", path.display())))?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Internal(format!(
                    "another Countersign process is using this database ({} is locked); stop it first, or give \
                     this one its own data_dir",
                    path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::Internal(format!("cannot lock {}: {e}", path.display())));
            }
        }
    }
}

/// SQLite's primary result code of a database error (its extended code's low byte: `SQLITE_IOERR` for every
/// `SQLITE_IOERR_*`).
fn primary_code(e: &sqlx::Error) -> Option<i32> {
    match e {
        sqlx::Error::Database(db) => db.code().and_then(|c| c.parse::<i32>().ok()).map(|code| code & 0xff),
        _ => None,
    }
}

/// An I/O error (`SQLITE_IOERR`, a failed sync among them) or the driver's own.
fn is_io_error(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Io(_)) || primary_code(e) == Some(10)
}

/// An error that means the disk failed the database: an I/O error, corruption or a full disk. Not a busy
/// database or a pool timeout.
fn is_io_failure(e: &sqlx::Error) -> bool {
    is_io_error(e) || matches!(primary_code(e), Some(11 | 13))
}

/// The writer's connection to the database at `path`, which exists with its schema: settings as the readers'
/// (WAL, foreign keys, a 10 s busy timeout), no checkpoints on commit ([`Durability`] runs them), and room to
/// keep every statement prepared.
fn open_writer(path: &Path) -> Result<rusqlite::Connection, StoreError> {
    let conn = rusqlite::Connection::open(path).map_err(map_lite)?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(map_lite)?;
    conn.set_prepared_statement_cache_capacity(512);
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;
         PRAGMA wal_autocheckpoint = 0;",
    )
    .map_err(map_lite)?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and brings its schema up to date. A second process on
    /// the same file is refused: two would both run its jobs and each believe it is the only writer whose
    /// commits its syncs cover.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let lock = tokio::task::spawn_blocking(move || exclusive_lock(&lock_path, LOCK_WAIT))
            .await
            .map_err(|e| StoreError::Internal(e.to_string()))??;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .page_size(PAGE_SIZE)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        // Connections live as long as the store: the last one closing would checkpoint and delete the WAL.
        // A file connection cannot go stale, so it is not pinged before each transaction (a round trip to
        // its thread, twice per proxied model call).
        // The schema's connection first: it makes the file and sets its page size and WAL mode, which a second
        // connection opening at the same moment (a pool fills itself in the background) could find locked.
        let mut setup = options.clone().pragma("wal_autocheckpoint", "0").connect().await.map_err(map_sqlx)?;
        let reader = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(8)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(WRITER_WAIT)
            // Readers never change the database (only the writer does, under `Durability`'s counting and
            // syncs): SQLite refuses any statement that would, whatever the code above it checked.
            // Checkpoints, which readers run, are not changes in that sense and still run.
            .connect_with(options.pragma("query_only", "ON"))
            .await
            .map_err(map_sqlx)?;
        migrator(&MIGRATIONS)
            .run(&mut setup)
            .await
            .map_err(|e| StoreError::Internal(format!("migration failed: {e}")))?;
        // Where SQLite itself put the database (a symlink followed), so its WAL is found beside it.
        let row = sqlx::query("SELECT file FROM pragma_database_list WHERE name = 'main'")
            .fetch_one(&mut setup)
            .await
            .map_err(map_sqlx)?;
        let db_path = PathBuf::from(get::<String>(&row, "file")?);
        let sync_path = db_path.clone();
        let files = tokio::task::spawn_blocking(move || LogFiles::open(&sync_path))
            .await
            .map_err(|e| StoreError::Internal(e.to_string()))?
            .map_err(|e| StoreError::Internal(format!("cannot open the database's files to sync them: {e}")))?;
        let durability = Arc::new(Durability::new(files, Some(lock)));
        let writer = Writer { conn: open_writer(&db_path)?, open: false, memo: WriterMemo::default() };
        // The reader pool and the writer keep the database open, so closing this one leaves the WAL as it is.
        setup.close().await.map_err(map_sqlx)?;
        Ok(SqliteStore { writer: Arc::new(tokio::sync::Mutex::new(writer)), reader, durability })
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn write(&self) -> Result<Box<dyn StoreTx>, StoreError> {
        self.durability.check()?;
        let waiting = Waiting::on(&self.durability.waiting);
        let writer = tokio::time::timeout(WRITER_WAIT, Arc::clone(&self.writer).lock_owned()).await.map_err(|_| {
            StoreError::Unavailable(format!("the database's writer stayed busy for {}s", WRITER_WAIT.as_secs()))
        })?;
        drop(waiting);
        let mut turn = WriterTurn(writer);
        turn.settle()?;
        Ok(Box::new(SqliteTx::new(TxConn::Write(turn, self.clone()))))
    }

    async fn read(&self) -> Result<Box<dyn StoreTx>, StoreError> {
        self.durability.settled().await?;
        let tx = self.reader.begin().await.map_err(map_sqlx)?;
        Ok(Box::new(SqliteTx::new(TxConn::Read(tx))))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.durability.check()?;
        sqlx::query("SELECT 1").execute(&self.reader).await.map_err(map_sqlx)?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn durable(&self) -> Result<(), StoreError> {
        self.durability.settled().await
    }
}

struct SqliteTx {
    conn: TxConn,
    /// Audit events sealed in this transaction but not yet queued. They join the queued writes in one
    /// statement before the transaction's next statement or its commit, so every statement sees them and a
    /// commit never lacks them; a rollback drops them with everything else.
    pending_audit: Vec<AuditEvent>,
    /// Writes not yet sent (see [`Batch`]).
    batch: Batch,
    /// The head this transaction left for each org it appended to: the next append follows it without
    /// reading the head again (the write lock keeps it the head), and it is the memo's head after the
    /// commit.
    appended: HashMap<OrgId, (i64, String)>,
    /// This transaction changed webhooks: what it lists of them is not yet committed, so not remembered.
    webhooks_changed: bool,
    /// The commit returns once written, not synced ([`StoreTx::defer_sync`]).
    defer_sync: bool,
    /// Begun with `synchronous = FULL`: SQLite syncs the commit inside its `COMMIT` (see [`Durability`]), if
    /// it writes frames.
    synced_commit: bool,
    /// A row was queued for insertion (audit events included): the `COMMIT` writes WAL frames for certain, so
    /// at `FULL` it syncs. A transaction that inserted nothing may change no page (an update that matched no
    /// row, or rewrote one as it was), and SQLite then skips the sync along with the write.
    inserts: bool,
}

enum TxConn {
    Read(Transaction<'static, Sqlite>),
    /// The writer, on which the transaction runs its own `BEGIN IMMEDIATE` before its first statement and its
    /// own `COMMIT`; and the store, whose group commit and checkpoints are told of the commit.
    Write(WriterTurn, SqliteStore),
}

/// Writes a transaction has queued and not run yet.
///
/// The writes whose outcome the caller need not see at once (inserts and updates of one row, and the sealed
/// audit events) are queued and run with the transaction's next statement that needs them: before a read or
/// any other statement, or before the `COMMIT`. (On the writer's connection that costs nothing more than
/// running each at once; the queue is what lets the audit events a transaction sealed go in one multi-row
/// insert, and it keeps the shape PostgreSQL's store needs, where a statement is a network round trip.) An
/// update of one row must have changed one, or the transaction fails. A write that fails fails the
/// transaction: nothing queued after it ran, and every later statement and the commit fail, so it can only
/// roll back. The one exception is a constraint refusing a statement run on its own, which SQLite undoes
/// alone ([`SqliteTx::outcome`]).
#[derive(Default)]
struct Batch {
    /// Each write, what its count of changed rows must be, and whether it carries audit events.
    writes: Vec<(Stmt, Expect, bool)>,
    failed: bool,
}

/// Audit rows per multi-row `INSERT` (ten values each, far below SQLite's limit on bound values).
const AUDIT_ROWS_PER_INSERT: usize = 64;

/// A write asked of a read transaction: refused, since only the writer's commits are counted and synced
/// ([`Durability`]), so a write committed on a reader could be acknowledged before it is on disk.
/// A writer statement's result as the store's, and whether its error is a constraint refusal, after which
/// the transaction goes on ([`SqliteTx::outcome`]).
fn on_writer<T>(result: rusqlite::Result<T>) -> (Result<T, StoreError>, bool) {
    match result {
        Ok(value) => (Ok(value), false),
        Err(e) => {
            let constraint = is_constraint(&e);
            (Err(map_lite(e)), constraint)
        }
    }
}

fn read_only() -> StoreError {
    StoreError::Internal("a read transaction cannot write; use a write transaction".into())
}

/// Runs a statement without values on the writer, kept prepared.
fn run(conn: &rusqlite::Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// Runs queued writes on the writer, in order, checking each update's count of changed rows; stops at the
/// first that fails. A failure in the audit rows is named as such, so a caller's mapping of a conflict on its
/// own row never misreads it.
fn run_writes(conn: &rusqlite::Connection, writes: &[(Stmt, Expect, bool)]) -> Result<(), StoreError> {
    for (stmt, expect, audit) in writes {
        let changed = match stmt.execute(conn) {
            Ok(n) => n,
            Err(e) if *audit => return Err(audit_write_failed(map_lite(e))),
            Err(e) => return Err(map_lite(e)),
        };
        match expect {
            Expect::One(message) if changed != 1 => return Err(StoreError::Internal(message.clone())),
            Expect::Unchanged(message) if changed != 1 => return Err(StoreError::Stale(message.clone())),
            _ => {}
        }
    }
    Ok(())
}

/// Which way an audit listing runs from its cursor.
#[derive(Clone, Copy)]
enum AuditOrder {
    /// Oldest first, after this seq.
    After(i64),
    /// Newest first, before this seq.
    Before(i64),
}

impl SqliteTx {
    fn new(conn: TxConn) -> SqliteTx {
        SqliteTx {
            conn,
            pending_audit: Vec::new(),
            batch: Batch::default(),
            appended: HashMap::new(),
            webhooks_changed: false,
            defer_sync: false,
            synced_commit: false,
            inserts: false,
        }
    }

    /// Begins the writer's transaction, if it has not begun, at the sync level its commit runs at
    /// ([`Durability`]): SQLite syncs the commit itself when no other writer waits for the lock and the commit
    /// is not known to be deferred; else the shared sync does. The level is set before every `BEGIN` (SQLite
    /// refuses to change it inside a transaction), so no earlier transaction's level carries over. A `BEGIN`
    /// that fails fails the transaction.
    fn begin(&mut self) -> Result<(), StoreError> {
        let TxConn::Write(turn, store) = &mut self.conn else { return Ok(()) };
        if turn.open {
            return Ok(());
        }
        let durability = &store.durability;
        self.synced_commit =
            durability.sync_in_commit && !self.defer_sync && durability.waiting.load(Ordering::Acquire) == 0;
        let level = match self.synced_commit {
            true => "PRAGMA synchronous = FULL",
            false => "PRAGMA synchronous = NORMAL",
        };
        turn.open = true;
        self.batch.failed = true;
        run(&turn.conn, level).and_then(|()| run(&turn.conn, "BEGIN IMMEDIATE")).map_err(map_lite)?;
        self.batch.failed = false;
        Ok(())
    }

    /// What the writer remembers; `None` for a reader.
    fn memo(&self) -> Option<&WriterMemo> {
        match &self.conn {
            TxConn::Write(turn, _) => Some(&turn.memo),
            TxConn::Read(_) => None,
        }
    }

    fn memo_mut(&mut self) -> Option<&mut WriterMemo> {
        match &mut self.conn {
            TxConn::Write(turn, _) => Some(&mut turn.memo),
            TxConn::Read(_) => None,
        }
    }

    /// Before a change to `org`'s webhooks: the memo forgets them, and this transaction remembers none.
    fn forget_webhooks(&mut self, org: &OrgId) {
        self.webhooks_changed = true;
        if let Some(memo) = self.memo_mut() {
            memo.webhooks.remove(org);
        }
    }

    /// Queues one write (see [`Batch`]). An update that changed no row fails the transaction, with
    /// [`StoreError::Stale`] for a conditional one.
    fn queue(&mut self, Write { sql, values, expect, .. }: Write) {
        self.inserts |= matches!(expect, Expect::Insert);
        self.batch.writes.push((Stmt { sql: sql.into(), values }, expect, false));
    }

    /// Moves the sealed audit events into the queued writes, in as few statements as the bound-value limit
    /// allows.
    fn queue_audit(&mut self) -> Result<(), StoreError> {
        self.inserts |= !self.pending_audit.is_empty();
        for rows in self.pending_audit.chunks(AUDIT_ROWS_PER_INSERT) {
            match audit_rows(rows) {
                Ok((sql, values)) => self.batch.writes.push((Stmt { sql: sql.into(), values }, Expect::Insert, true)),
                Err(e) => {
                    self.batch.failed = true;
                    return Err(e);
                }
            }
        }
        self.pending_audit.clear();
        Ok(())
    }

    /// Runs the queued writes, if any, after the writer's `BEGIN IMMEDIATE` if it has not gone yet, and
    /// (`commit`) the `COMMIT` after them. Returns whether a `COMMIT` went (a writer that never began has
    /// nothing to commit; a reader's commit is its `Transaction`'s).
    async fn send(&mut self, commit: bool) -> Result<bool, StoreError> {
        self.queue_audit()?;
        if self.batch.failed {
            return Err(StoreError::Internal(
                "an earlier write of this transaction failed, so it can only roll back".into(),
            ));
        }
        let writes = std::mem::take(&mut self.batch.writes);
        if !writes.is_empty() {
            self.begin()?;
        }
        self.batch.failed = true;
        let ran = match &mut self.conn {
            TxConn::Write(turn, _) => run_writes(&turn.conn, &writes),
            TxConn::Read(_) if !writes.is_empty() => Err(read_only()),
            TxConn::Read(_) => Ok(()),
        };
        if let Err(e) = ran {
            // A conflict in the audit rows may mean a remembered head was wrong: read them from disk.
            if let Some(memo) = self.memo_mut() {
                memo.heads.clear();
            }
            return Err(e);
        }
        let TxConn::Write(turn, store) = &mut self.conn else {
            self.batch.failed = false;
            return Ok(false);
        };
        if !(commit && turn.open) {
            self.batch.failed = false;
            return Ok(false);
        }
        if let Err(e) = run(&turn.conn, "COMMIT") {
            // A `COMMIT` that was to sync may have failed in SQLite's sync, which then reported the error to no
            // one else.
            if self.synced_commit && is_io(&e) {
                store.durability.poison(&format!("commit: {e}"));
            }
            if let Some(memo) = self.memo_mut() {
                memo.heads.clear();
            }
            return Err(map_lite(e));
        }
        turn.open = false;
        self.batch.failed = false;
        Ok(true)
    }

    /// Before a statement run on its own: runs the queued writes, and begins the writer's transaction.
    async fn before(&mut self) -> Result<(), StoreError> {
        self.send(false).await?;
        self.begin()
    }

    /// After a statement run on its own: a failure fails the transaction, so that every later statement and
    /// the commit fail, unless a constraint refused the one statement, which SQLite undoes alone (a caller
    /// may answer a conflict and go on). Other errors (a full disk, an I/O error, a busy database) may have
    /// rolled the whole transaction back, and what followed would run outside it.
    fn outcome<T>(&mut self, done: Result<T, StoreError>, constraint: bool) -> Result<T, StoreError> {
        // Whatever the error, a transaction SQLite has ended cannot go on.
        let ended = match &self.conn {
            TxConn::Write(turn, _) => turn.conn.is_autocommit(),
            TxConn::Read(_) => false,
        };
        self.batch.failed = done.is_err() && (!constraint || ended);
        done
    }

    /// Seals an event after (seq, hash) and remembers it as the org's head in this transaction.
    fn seal(&mut self, org: &OrgId, seq: i64, hash: &str, event: NewAuditEvent) -> AuditEvent {
        let sealed = seal_pending(&mut self.pending_audit, org, seq, hash, event);
        self.appended.insert(org.clone(), (sealed.seq, sealed.hash.clone()));
        sealed
    }

    /// Audit events matching `filter`, oldest first after a seq or newest first before one.
    async fn select_audit(
        &mut self,
        org: &OrgId,
        filter: &AuditFilter,
        order: AuditOrder,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let (bound, seq) = match order {
            AuditOrder::After(seq) => ("seq > ?", seq),
            AuditOrder::Before(seq) => ("seq < ?", seq),
        };
        let mut sql = format!("SELECT * FROM audit_events WHERE org_id = ? AND {bound}");
        let (action_exact, action_prefix) = match filter.action.as_deref() {
            Some(a) if a.ends_with(".*") => (None, Some(a.trim_end_matches('*').to_owned())),
            Some(a) => (Some(a.to_owned()), None),
            None => (None, None),
        };
        if action_exact.is_some() {
            sql.push_str(" AND action = ?");
        }
        if action_prefix.is_some() {
            sql.push_str(" AND substr(action, 1, length(?)) = ?");
        }
        if filter.actor.is_some() {
            sql.push_str(" AND json_extract(actor, '$.id') = ?");
        }
        if !filter.subjects.is_empty() {
            sql.push_str(" AND subject IN (");
            sql.push_str(&vec!["?"; filter.subjects.len()].join(", "));
            sql.push(')');
        }
        if filter.since_us.is_some() {
            sql.push_str(" AND time_us >= ?");
        }
        if filter.until_us.is_some() {
            sql.push_str(" AND time_us <= ?");
        }
        sql.push_str(match order {
            AuditOrder::After(_) => " ORDER BY seq ASC LIMIT ?",
            AuditOrder::Before(_) => " ORDER BY seq DESC LIMIT ?",
        });
        let mut query = q(sql).bind(org.as_str().to_owned()).bind(seq);
        if let Some(a) = action_exact {
            query = query.bind(a);
        }
        if let Some(p) = action_prefix {
            query = query.bind(p.clone()).bind(p);
        }
        if let Some(actor) = &filter.actor {
            query = query.bind(actor.clone());
        }
        for subject in &filter.subjects {
            query = query.bind(subject.clone());
        }
        if let Some(since) = filter.since_us {
            query = query.bind(since);
        }
        if let Some(until) = filter.until_us {
            query = query.bind(until);
        }
        let rows = self.fetch_all(query.bind(i64::from(limit.clamp(1, 10_000)))).await?;
        rows.iter().map(audit_row).collect()
    }

    async fn fetch_all(&mut self, stmt: Stmt) -> Result<Vec<Row>, StoreError> {
        self.before().await?;
        self.batch.failed = true;
        let (rows, constraint) = match &mut self.conn {
            TxConn::Write(turn, _) => on_writer(stmt.rows(&turn.conn, false)),
            TxConn::Read(tx) => match stmt.into_sqlx().fetch_all(&mut **tx).await {
                Ok(rows) => (Ok(rows.into_iter().map(Row::Reader).collect()), false),
                Err(e) => (Err(map_sqlx(e)), false),
            },
        };
        self.outcome(rows, constraint)
    }

    async fn fetch_optional(&mut self, stmt: Stmt) -> Result<Option<Row>, StoreError> {
        self.before().await?;
        self.batch.failed = true;
        let (row, constraint) = match &mut self.conn {
            TxConn::Write(turn, _) => on_writer(stmt.rows(&turn.conn, true).map(|rows| rows.into_iter().next())),
            TxConn::Read(tx) => match stmt.into_sqlx().fetch_optional(&mut **tx).await {
                Ok(row) => (Ok(row.map(Row::Reader)), false),
                Err(e) => (Err(map_sqlx(e)), false),
            },
        };
        self.outcome(row, constraint)
    }

    /// A statement whose count of changed rows the caller wants, run at once.
    async fn execute(&mut self, stmt: Stmt) -> Result<u64, StoreError> {
        self.before().await?;
        self.batch.failed = true;
        let (done, constraint) = match &mut self.conn {
            TxConn::Write(turn, _) => on_writer(stmt.execute(&turn.conn).map(|n| n as u64)),
            TxConn::Read(_) => (Err(read_only()), false),
        };
        self.outcome(done, constraint)
    }

    async fn load_decisions(&mut self, approval: &mut Approval) -> Result<(), StoreError> {
        let rows = self
            .fetch_all(
                q("SELECT * FROM decisions WHERE org_id = ? AND approval_id = ? ORDER BY created_at, user_id")
                    .bind(approval.org_id.as_str().to_owned())
                    .bind(approval.id.as_str().to_owned()),
            )
            .await?;
        approval.decisions = rows.iter().map(decision_row).collect::<Result<_, _>>()?;
        Ok(())
    }

    async fn approvals_with_decisions(&mut self, rows: Vec<Row>) -> Result<Vec<Approval>, StoreError> {
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut approval = approval_row(row)?;
            self.load_decisions(&mut approval).await?;
            out.push(approval);
        }
        Ok(out)
    }
}

/// A page of actions, newest first, up to [`PAGE_BYTES`] of them.
const LIST_ACTIONS: &str = within_page_bytes!(
    "actions",
    "DESC",
    "CROSS JOIN",
    "?",
    "?",
    "SELECT a.id AS id, ",
    action_bytes!(),
    " AS bytes FROM actions a WHERE a.org_id = ?
       AND (? IS NULL OR a.state = ?) AND (? IS NULL OR a.agent_id = ?) AND (? IS NULL OR a.capability = ?)
       AND (? IS NULL OR a.id < ?)
     ORDER BY a.id DESC LIMIT ?",
);

/// Approvals, up to [`PAGE_BYTES`] of their actions, in `$order` from the cursor (`$after`), filtered by
/// status (`$status`): the pending queue oldest first, any other status newest first.
macro_rules! approvals_page {
    ($order:literal, $after:literal, $status:literal) => {
        within_page_bytes!(
            "approvals",
            $order,
            "CROSS JOIN",
            "?",
            "?",
            "SELECT ap.id AS id, ",
            action_bytes!(),
            " AS bytes FROM approvals ap LEFT JOIN actions a ON a.id = ap.action_id AND a.org_id = ap.org_id
             WHERE ap.org_id = ? AND ",
            $status,
            " AND (? IS NULL OR ap.id ",
            $after,
            " ?) ORDER BY ap.id ",
            $order,
            " LIMIT ?",
        )
    };
}
const LIST_PENDING_APPROVALS: &str = approvals_page!("ASC", ">", "ap.status = ?");
const LIST_DECIDED_APPROVALS: &str = approvals_page!("DESC", "<", "(? IS NULL OR ap.status = ?)");

/// Retention's end: the seq before the first event at or after the cutoff, else the head. Event times do
/// not strictly grow with seq (a writer reads the clock before it waits for its turn), so "the newest event
/// older than the cutoff" could pass a newer one. Both lookups walk the (org, seq) key: the first only over
/// the old prefix, the second to one row.
const LAST_AUDIT_SEQ_BEFORE: &str = "SELECT COALESCE(
        (SELECT seq FROM audit_events WHERE org_id = ? AND time_us >= ? ORDER BY seq LIMIT 1) - 1,
        (SELECT seq FROM audit_events WHERE org_id = ? ORDER BY seq DESC LIMIT 1)) AS seq";

#[async_trait::async_trait]
impl StoreTx for SqliteTx {
    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let mut this = *self;
        // Emptied while the commit runs and refilled only once it succeeded, all under the lock: a commit
        // that fails leaves the next writer to read from disk, never to trust what may not be there.
        let known = this.memo_mut().map(std::mem::take);
        let sent = this.send(true).await?;
        let SqliteTx { conn, appended, defer_sync, synced_commit, inserts, .. } = this;
        match conn {
            TxConn::Read(tx) => tx.commit().await.map_err(map_sqlx),
            TxConn::Write(mut turn, store) => {
                if let Some(mut known) = known {
                    known.heads.extend(appended);
                    turn.memo = known;
                }
                let ticket = sent.then(|| store.durability.count(synced_commit && inserts));
                // Let the next writer in before waiting for the sync, so one sync serves a queue of commits.
                drop(turn);
                match ticket {
                    Some(ticket) => store.durability.committed(ticket, &store.writer, &store.reader, !defer_sync).await,
                    None => Ok(()),
                }
            }
        }
    }

    fn defer_sync(&mut self, defer: bool) {
        self.defer_sync = defer;
    }

    async fn audit_public_key(&mut self) -> Result<Option<String>, StoreError> {
        let row = self.fetch_optional(q("SELECT value FROM instance_secrets WHERE name = 'audit_public_key'")).await?;
        row.map(|r| get(&r, "value")).transpose()
    }

    async fn record_audit_public_key(&mut self, candidate: &str) -> Result<String, StoreError> {
        let insert = "INSERT INTO instance_secrets (name, value) VALUES ('audit_public_key', ?) ON CONFLICT DO NOTHING";
        self.execute(q(insert).bind(candidate.to_owned())).await?;
        self.audit_public_key().await?.ok_or_else(|| StoreError::Internal("the audit public key vanished".into()))
    }

    async fn count_orgs(&mut self) -> Result<i64, StoreError> {
        let row = self.fetch_optional(q("SELECT COUNT(*) AS n FROM orgs")).await?;
        row.map(|r| get(&r, "n")).transpose().map(|n| n.unwrap_or(0))
    }

    async fn list_orgs(&mut self) -> Result<Vec<Org>, StoreError> {
        let rows = self.fetch_all(q("SELECT * FROM orgs ORDER BY created_at, id")).await?;
        rows.iter().map(org_row).collect()
    }

    async fn insert_org(&mut self, org: &Org) -> Result<(), StoreError> {
        self.execute(
            q("INSERT INTO orgs (id, name, created_at) VALUES (?, ?, ?)")
                .bind(org.id.as_str().to_owned())
                .bind(org.name.clone())
                .bind(to_us(org.created_at)),
        )
        .await
        .map(drop)
    }

    async fn get_org(&mut self, id: &OrgId) -> Result<Option<Org>, StoreError> {
        let row = self.fetch_optional(q("SELECT * FROM orgs WHERE id = ?").bind(id.as_str().to_owned())).await?;
        row.as_ref().map(org_row).transpose()
    }

    async fn insert_user(&mut self, user: &User) -> Result<(), StoreError> {
        self.execute(
            q(
                "INSERT INTO users (id, org_id, name, role, instance_admin, created_at, disabled_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(user.id.as_str().to_owned())
            .bind(user.org_id.as_str().to_owned())
            .bind(user.name.clone())
            .bind(user.role.as_str())
            .bind(i64::from(user.instance_admin))
            .bind(to_us(user.created_at))
            .bind(opt_us(user.disabled_at)),
        )
        .await
        .map(drop)
    }

    async fn get_user(&mut self, org: &OrgId, id: &UserId) -> Result<Option<User>, StoreError> {
        let row = self
            .fetch_optional(
                q("SELECT * FROM users WHERE org_id = ? AND id = ?")
                    .bind(org.as_str().to_owned())
                    .bind(id.as_str().to_owned()),
            )
            .await?;
        row.as_ref().map(user_row).transpose()
    }

    async fn find_user_by_name(&mut self, org: &OrgId, name: &str) -> Result<Option<User>, StoreError> {
        let row = self
            .fetch_optional(
                q("SELECT * FROM users WHERE org_id = ? AND name = ?")
                    .bind(org.as_str().to_owned())
                    .bind(name.to_owned()),
            )
            .await?;
        row.as_ref().map(user_row).transpose()
    }

    async fn list_users(&mut self, org: &OrgId) -> Result<Vec<User>, StoreError> {
        let rows = self
            .fetch_all(q("SELECT * FROM users WHERE org_id = ? ORDER BY created_at, id").bind(org.as_str().to_owned()))
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
                q("UPDATE users SET disabled_at = ? WHERE org_id = ? AND id = ? AND disabled_at IS NULL")
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
                q("UPDATE sessions SET revoked_at = ? WHERE org_id = ? AND revoked_at IS NULL AND minted_with IN
                        (SELECT id FROM api_keys WHERE org_id = ? AND principal_kind = 'user' AND principal_id = ?)
                     RETURNING id")
                .bind(to_us(at))
                .bind(org.as_str().to_owned())
                .bind(org.as_str().to_owned())
                .bind(id.as_str().to_owned()),
            )
            .await?;
        revoked_sessions(&rows).map(Some)
    }

    async fn insert_agent(&mut self, agent: &Agent) -> Result<(), StoreError> {
        self.execute(
            q("INSERT INTO agents (id, org_id, name, owner_user_id, created_at, disabled_at) VALUES (?, ?, ?, ?, ?, ?)")
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
                q("SELECT * FROM agents WHERE org_id = ? AND id = ?")
                    .bind(org.as_str().to_owned())
                    .bind(id.as_str().to_owned()),
            )
            .await?;
        row.as_ref().map(agent_row).transpose()
    }

    async fn find_agent_by_name(&mut self, org: &OrgId, name: &str) -> Result<Option<Agent>, StoreError> {
        let row = self
            .fetch_optional(
                q("SELECT * FROM agents WHERE org_id = ? AND name = ?")
                    .bind(org.as_str().to_owned())
                    .bind(name.to_owned()),
            )
            .await?;
        row.as_ref().map(agent_row).transpose()
    }

    async fn list_agents(&mut self, org: &OrgId) -> Result<Vec<Agent>, StoreError> {
        let rows = self
            .fetch_all(q("SELECT * FROM agents WHERE org_id = ? ORDER BY created_at, id").bind(org.as_str().to_owned()))
            .await?;
        rows.iter().map(agent_row).collect()
    }

    async fn disable_agent(&mut self, org: &OrgId, id: &AgentId, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let n = self
            .execute(
                q("UPDATE agents SET disabled_at = ? WHERE org_id = ? AND id = ? AND disabled_at IS NULL")
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
            q(
                "INSERT INTO api_keys (id, org_id, principal_kind, principal_id, hash, prefix, last_four, created_at, expires_at, revoked_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        let row = self.fetch_optional(q("SELECT * FROM api_keys WHERE hash = ?").bind(hash.to_owned())).await?;
        row.as_ref().map(key_row).transpose()
    }

    async fn list_keys(&mut self, org: &OrgId) -> Result<Vec<ApiKey>, StoreError> {
        let rows = self
            .fetch_all(
                q("SELECT * FROM api_keys WHERE org_id = ? ORDER BY created_at, id").bind(org.as_str().to_owned()),
            )
            .await?;
        rows.iter().map(key_row).collect()
    }

    async fn get_key(&mut self, org: &OrgId, id: &KeyId) -> Result<Option<ApiKey>, StoreError> {
        let query = q("SELECT * FROM api_keys WHERE org_id = ? AND id = ?")
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
                q("UPDATE api_keys SET revoked_at = ? WHERE org_id = ? AND id = ? AND revoked_at IS NULL")
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
                q("UPDATE sessions SET revoked_at = ? WHERE org_id = ? AND minted_with = ? AND revoked_at IS NULL
                     RETURNING id")
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
            q(
                "INSERT INTO sessions (id, org_id, agent_id, hash, scopes, created_by, created_at, expires_at, revoked_at,
                    minted_with)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        let row = self.fetch_optional(q("SELECT * FROM sessions WHERE hash = ?").bind(hash.to_owned())).await?;
        row.as_ref().map(session_row).transpose()
    }

    async fn list_sessions(&mut self, org: &OrgId, agent: Option<&AgentId>) -> Result<Vec<Session>, StoreError> {
        let rows = self
            .fetch_all(
                q("SELECT * FROM sessions WHERE org_id = ? AND (? IS NULL OR agent_id = ?) ORDER BY created_at DESC, id DESC")
                    .bind(org.as_str().to_owned())
                    .bind(agent.map(|a| a.as_str().to_owned()))
                    .bind(agent.map(|a| a.as_str().to_owned())),
            )
            .await?;
        rows.iter().map(session_row).collect()
    }

    async fn revoke_session(&mut self, org: &OrgId, id: &SessionId, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let n = self
            .execute(
                q("UPDATE sessions SET revoked_at = ? WHERE org_id = ? AND id = ? AND revoked_at IS NULL")
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
            q("INSERT INTO dashboard_sessions
                    (token_hash, org_id, user_id, key_hash, created_at, expires_at, last_seen_at, revoked_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
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
            .fetch_optional(q("SELECT * FROM dashboard_sessions WHERE token_hash = ?").bind(token_hash.to_owned()))
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
                q("UPDATE dashboard_sessions SET last_seen_at = max(last_seen_at, ?)
                     WHERE org_id = ? AND token_hash = ? AND revoked_at IS NULL")
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
                q("UPDATE dashboard_sessions SET revoked_at = ?
                     WHERE org_id = ? AND token_hash = ? AND revoked_at IS NULL")
                .bind(to_us(at))
                .bind(org.as_str().to_owned())
                .bind(token_hash.to_owned()),
            )
            .await?;
        Ok(n > 0)
    }

    async fn delete_expired_dashboard_sessions(&mut self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        self.execute(q("DELETE FROM dashboard_sessions WHERE expires_at <= ?").bind(to_us(now))).await
    }

    async fn insert_action(&mut self, a: &Action) -> Result<(), StoreError> {
        self.queue(writes::insert_action(a)?);
        // An idempotency key may meet its twin, a conflict the caller answers: sent now, so it is this call's.
        if a.idempotency_key.is_some() {
            self.send(false).await?;
        }
        Ok(())
    }

    async fn update_action(&mut self, a: &Action) -> Result<(), StoreError> {
        self.queue(writes::update_action(a)?);
        Ok(())
    }

    async fn end_action(&mut self, a: &Action, from: ActionState) -> Result<(), StoreError> {
        self.queue(writes::end_action(a, from)?);
        Ok(())
    }

    async fn get_action(&mut self, org: &OrgId, id: &ActionId) -> Result<Option<Action>, StoreError> {
        let row = self
            .fetch_optional(
                q("SELECT * FROM actions WHERE org_id = ? AND id = ?")
                    .bind(org.as_str().to_owned())
                    .bind(id.as_str().to_owned()),
            )
            .await?;
        row.as_ref().map(action_row).transpose()
    }

    async fn find_action_by_idempotency_key(
        &mut self,
        org: &OrgId,
        agent: &AgentId,
        key: &str,
    ) -> Result<Option<Action>, StoreError> {
        let row = self
            .fetch_optional(
                q("SELECT * FROM actions WHERE org_id = ? AND agent_id = ? AND idempotency_key = ?")
                    .bind(org.as_str().to_owned())
                    .bind(agent.as_str().to_owned())
                    .bind(key.to_owned()),
            )
            .await?;
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
                q(LIST_ACTIONS)
                    .bind(org.as_str().to_owned())
                    .bind(filter.state.map(ActionState::as_str))
                    .bind(filter.state.map(ActionState::as_str))
                    .bind(filter.agent_id.as_ref().map(|a| a.as_str().to_owned()))
                    .bind(filter.agent_id.as_ref().map(|a| a.as_str().to_owned()))
                    .bind(filter.capability.clone())
                    .bind(filter.capability.clone())
                    .bind(page.after.clone())
                    .bind(page.after.clone())
                    .bind(limit(page))
                    .bind(org.as_str().to_owned())
                    .bind(PAGE_BYTES),
            )
            .await?;
        Ok(Listed { cut: page_cut(&rows)?, items: rows.iter().map(action_row).collect::<Result<_, _>>()? })
    }

    async fn count_successes(&mut self, org: &OrgId, agent: &AgentId, capability: &str) -> Result<u64, StoreError> {
        let row = self
            .fetch_optional(
                q(
                    "SELECT COUNT(*) AS n FROM (SELECT 1 FROM actions WHERE org_id = ? AND agent_id = ? AND capability = ?
                       AND state IN ('succeeded', 'approved')
                       AND (state = 'succeeded' OR (target IS NULL AND approval_id IS NOT NULL)) LIMIT ?)",
                )
                .bind(org.as_str().to_owned())
                .bind(agent.as_str().to_owned())
                .bind(capability.to_owned())
                .bind(i64::try_from(PRECEDENT_CAP).unwrap_or(i64::MAX)),
            )
            .await?;
        let n: i64 = row.map(|r| get(&r, "n")).transpose()?.unwrap_or(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn insert_approval(&mut self, a: &Approval) -> Result<(), StoreError> {
        self.execute(
            q("INSERT INTO approvals (id, org_id, action_id, group_name, quorum, status, expires_at, token_hash,
                    policy_version, request_hash, rule, snapshot, risk, created_at, decided_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
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
                q("UPDATE approvals SET status = ?, decided_at = ? WHERE org_id = ? AND id = ?")
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
            q("INSERT INTO decisions (approval_id, org_id, user_id, user_name, decision, note, counted, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
            .bind(approval.as_str().to_owned())
            .bind(org.as_str().to_owned())
            .bind(d.user_id.as_str().to_owned())
            .bind(d.user_name.clone())
            .bind(d.decision.as_str())
            .bind(d.note.clone())
            .bind(i64::from(d.counted))
            .bind(to_us(d.created_at)),
        )
        .await
        .map(drop)
    }

    async fn get_approval(&mut self, org: &OrgId, id: &ApprovalId) -> Result<Option<Approval>, StoreError> {
        let row = self
            .fetch_optional(
                q("SELECT * FROM approvals WHERE org_id = ? AND id = ?")
                    .bind(org.as_str().to_owned())
                    .bind(id.as_str().to_owned()),
            )
            .await?;
        Ok(self.approvals_with_decisions(row.into_iter().collect()).await?.pop())
    }

    async fn find_approval_by_token_hash(&mut self, hash: &str) -> Result<Option<Approval>, StoreError> {
        let row = self.fetch_optional(q("SELECT * FROM approvals WHERE token_hash = ?").bind(hash.to_owned())).await?;
        Ok(self.approvals_with_decisions(row.into_iter().collect()).await?.pop())
    }

    async fn list_approvals(
        &mut self,
        org: &OrgId,
        status: Option<ApprovalStatus>,
        page: &Page,
    ) -> Result<Listed<Approval>, StoreError> {
        // Pending: oldest first (the queue); anything else: newest first (history). ULIDs sort by time.
        let query = if status == Some(ApprovalStatus::Pending) {
            q(LIST_PENDING_APPROVALS).bind(org.as_str().to_owned()).bind("pending")
        } else {
            q(LIST_DECIDED_APPROVALS)
                .bind(org.as_str().to_owned())
                .bind(status.map(ApprovalStatus::as_str))
                .bind(status.map(ApprovalStatus::as_str))
        };
        let query = query.bind(page.after.clone()).bind(page.after.clone()).bind(limit(page));
        let rows = self.fetch_all(query.bind(org.as_str().to_owned()).bind(PAGE_BYTES)).await?;
        Ok(Listed { cut: page_cut(&rows)?, items: self.approvals_with_decisions(rows).await? })
    }

    async fn count_pending_approvals(&mut self) -> Result<i64, StoreError> {
        let row = self.fetch_optional(q("SELECT COUNT(*) AS n FROM approvals WHERE status = 'pending'")).await?;
        row.map(|r| get(&r, "n")).transpose().map(|n| n.unwrap_or(0))
    }

    async fn list_pending_deadlines(&mut self) -> Result<Vec<PendingDeadline>, StoreError> {
        let rows = self
            .fetch_all(q("SELECT org_id, id, expires_at FROM approvals WHERE status = 'pending' ORDER BY expires_at"))
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
        // The head this transaction left, else the one the last commit left (a write transaction holds the
        // write lock, so no one else moved it since), else the one on disk.
        let known = match self.appended.get(org) {
            Some(head) => Some(head.clone()),
            None => self.memo().and_then(|memo| memo.heads.get(org).cloned()),
        };
        if let Some((seq, hash)) = known {
            return Ok(self.seal(org, seq, &hash, event));
        }
        let head = self
            .fetch_optional(
                q("SELECT seq, hash FROM audit_events WHERE org_id = ? ORDER BY seq DESC LIMIT 1")
                    .bind(org.as_str().to_owned()),
            )
            .await?;
        let (seq, hash) = match head {
            Some(row) => (get::<i64>(&row, "seq")?, get::<String>(&row, "hash")?),
            // No events: a new org, or retention deleted every one; then the chain goes on from the
            // checkpoint retention left, never from genesis again.
            None => {
                let retained = self
                    .fetch_optional(
                        q("SELECT c.seq, c.head_hash FROM audit_retention r
                             JOIN audit_checkpoints c ON c.org_id = r.org_id AND c.seq = r.deleted_upto
                             WHERE r.org_id = ? AND r.deleted_upto > 0")
                        .bind(org.as_str().to_owned()),
                    )
                    .await?;
                match retained {
                    Some(row) => (get::<i64>(&row, "seq")?, get::<String>(&row, "head_hash")?),
                    None => (0, GENESIS_HASH.to_owned()),
                }
            }
        };
        Ok(self.seal(org, seq, &hash, event))
    }

    async fn list_audit(
        &mut self,
        org: &OrgId,
        filter: &AuditFilter,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        self.select_audit(org, filter, AuditOrder::After(after_seq), limit).await
    }

    async fn list_audit_newest(
        &mut self,
        org: &OrgId,
        filter: &AuditFilter,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        self.select_audit(org, filter, AuditOrder::Before(before_seq.unwrap_or(i64::MAX)), limit).await
    }

    async fn audit_head(&mut self, org: &OrgId) -> Result<Option<AuditHead>, StoreError> {
        let row = self
            .fetch_optional(
                q("SELECT seq, hash, time_us FROM audit_events WHERE org_id = ? ORDER BY seq DESC LIMIT 1")
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
            .fetch_optional(
                q(LAST_AUDIT_SEQ_BEFORE)
                    .bind(org.as_str().to_owned())
                    .bind(to_us(before))
                    .bind(org.as_str().to_owned()),
            )
            .await?;
        let seq = match row {
            Some(row) => get::<Option<i64>>(&row, "seq")?,
            None => None,
        };
        Ok(seq.filter(|seq| *seq > 0))
    }

    async fn insert_checkpoint(&mut self, c: &Checkpoint) -> Result<(), StoreError> {
        self.execute(
            q("INSERT INTO audit_checkpoints (org_id, seq, head_hash, time_us, key_id, signature)
                 VALUES (?, ?, ?, ?, ?, ?)
                 ON CONFLICT (org_id, seq) DO NOTHING")
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
                q("SELECT * FROM audit_checkpoints WHERE org_id = ? AND seq = ?")
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
                q("SELECT * FROM audit_checkpoints WHERE org_id = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?")
                    .bind(org.as_str().to_owned())
                    .bind(after_seq)
                    .bind(upto_seq)
                    .bind(i64::from(limit)),
            )
            .await?;
        rows.iter().map(checkpoint_row).collect()
    }

    async fn retention(&mut self, org: &OrgId) -> Result<Retention, StoreError> {
        let row = self
            .fetch_optional(q("SELECT * FROM audit_retention WHERE org_id = ?").bind(org.as_str().to_owned()))
            .await?;
        match row {
            Some(row) => retention_row(&row),
            None => Ok(Retention { org_id: org.clone(), days: None, deleted_upto: 0 }),
        }
    }

    async fn list_retention_windows(&mut self) -> Result<Vec<Retention>, StoreError> {
        let rows = self.fetch_all(q("SELECT * FROM audit_retention WHERE days IS NOT NULL ORDER BY org_id")).await?;
        rows.iter().map(retention_row).collect()
    }

    async fn set_retention_days(&mut self, org: &OrgId, days: Option<u32>) -> Result<(), StoreError> {
        self.execute(
            q("INSERT INTO audit_retention (org_id, days) VALUES (?, ?)
                 ON CONFLICT (org_id) DO UPDATE SET days = excluded.days")
            .bind(org.as_str().to_owned())
            .bind(days.map(i64::from)),
        )
        .await
        .map(drop)
    }

    async fn delete_audit_prefix(&mut self, org: &OrgId, upto_seq: i64) -> Result<u64, StoreError> {
        self.execute(
            q("INSERT INTO audit_retention (org_id, deleted_upto) VALUES (?, ?)
                 ON CONFLICT (org_id) DO UPDATE SET deleted_upto = excluded.deleted_upto")
            .bind(org.as_str().to_owned())
            .bind(upto_seq),
        )
        .await?;
        self.execute(
            q("DELETE FROM audit_events WHERE org_id = ? AND seq <= ?").bind(org.as_str().to_owned()).bind(upto_seq),
        )
        .await
    }

    async fn insert_job(&mut self, j: &Job) -> Result<(), StoreError> {
        self.queue(writes::insert_job(j)?);
        Ok(())
    }

    async fn update_job(&mut self, j: &Job) -> Result<(), StoreError> {
        self.queue(writes::update_job(j)?);
        Ok(())
    }

    async fn end_queued_job(&mut self, end: &JobEnd) -> Result<(), StoreError> {
        self.queue(writes::end_queued_job(end)?);
        Ok(())
    }

    async fn get_job(&mut self, org: &OrgId, id: &JobId) -> Result<Option<Job>, StoreError> {
        let row = self
            .fetch_optional(
                q("SELECT * FROM jobs WHERE org_id = ? AND id = ?")
                    .bind(org.as_str().to_owned())
                    .bind(id.as_str().to_owned()),
            )
            .await?;
        row.as_ref().map(job_row).transpose()
    }

    async fn list_jobs(&mut self, org: &OrgId, filter: &JobFilter, page: &Page) -> Result<Vec<Job>, StoreError> {
        let kind = filter.kind.map(JobKind::as_str);
        let state = filter.state.map(JobState::as_str);
        // An agent's: driven from its own actions (CROSS JOIN fixes that order in SQLite), each looked up in
        // `jobs_subject`, so a request costs as much as the agent's actions, not the org's whole job history.
        let (query, agent) = match &filter.agent {
            Some(agent) => (
                q("SELECT jobs.* FROM actions CROSS JOIN jobs ON jobs.org_id = actions.org_id AND jobs.subject = actions.id
                     WHERE actions.org_id = ? AND actions.agent_id = ? AND jobs.kind = 'action.execute'
                       AND (? IS NULL OR jobs.kind = ?) AND (? IS NULL OR jobs.state = ?)
                       AND (? IS NULL OR jobs.subject = ?) AND (? IS NULL OR jobs.id < ?)
                     ORDER BY jobs.id DESC LIMIT ?"),
                Some(agent.as_str()),
            ),
            None => (
                q("SELECT * FROM jobs WHERE org_id = ?
                       AND (? IS NULL OR kind = ?) AND (? IS NULL OR state = ?)
                       AND (? IS NULL OR subject = ?) AND (? IS NULL OR id < ?)
                     ORDER BY id DESC LIMIT ?"),
                None,
            ),
        };
        let mut query = query.bind(org.as_str().to_owned());
        if let Some(agent) = agent {
            query = query.bind(agent.to_owned());
        }
        let query = query
            .bind(kind)
            .bind(kind)
            .bind(state)
            .bind(state)
            .bind(filter.subject.clone())
            .bind(filter.subject.clone())
            .bind(page.after.clone())
            .bind(page.after.clone())
            .bind(limit(page));
        let rows = self.fetch_all(query).await?;
        rows.iter().map(job_row).collect()
    }

    async fn claim_job(
        &mut self,
        now: DateTime<Utc>,
        owner: &str,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<Job>, StoreError> {
        let row = self
            .fetch_optional(
                // Two probes, each on its partial index (`jobs_due`, `jobs_leased`); one OR over both would scan
                // every running job on each claim. A job whose lease ran out comes first, as on PostgreSQL (see
                // there: a backlog of queued jobs must not keep a dead runner's job waiting): 'running' sorts
                // after 'queued' (a compound SELECT orders by its columns only, not by an expression).
                q("SELECT * FROM (SELECT * FROM jobs WHERE state = 'queued' AND run_at <= ? ORDER BY run_at LIMIT 1)
                     UNION ALL
                     SELECT * FROM (SELECT * FROM jobs WHERE state = 'running' AND lease_until <= ?
                                    ORDER BY lease_until LIMIT 1)
                     ORDER BY state DESC LIMIT 1")
                .bind(to_us(now))
                .bind(to_us(now)),
            )
            .await?;
        let Some(mut job) = row.as_ref().map(job_row).transpose()? else { return Ok(None) };
        job.state = JobState::Running;
        job.attempts = job.attempts.saturating_add(1);
        job.lease_owner = Some(owner.to_owned());
        job.lease_until = Some(lease_until);
        job.started_at = job.started_at.or(Some(now));
        self.update_job(&job).await?;
        Ok(Some(job))
    }

    async fn next_job_due(&mut self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let row = self
            .fetch_optional(q("SELECT MIN(t) AS t FROM (
                    SELECT MIN(run_at) AS t FROM jobs WHERE state = 'queued'
                    UNION ALL SELECT MIN(lease_until) AS t FROM jobs WHERE state = 'running')"))
            .await?;
        match row {
            Some(row) => opt_from_us(get(&row, "t")?),
            None => Ok(None),
        }
    }

    async fn renew_job_lease(&mut self, id: &JobId, owner: &str, until: DateTime<Utc>) -> Result<bool, StoreError> {
        let n = self
            .execute(
                q("UPDATE jobs SET lease_until = ? WHERE id = ? AND state = 'running' AND lease_owner = ?")
                    .bind(to_us(until))
                    .bind(id.as_str().to_owned())
                    .bind(owner.to_owned()),
            )
            .await?;
        Ok(n == 1)
    }

    async fn release_job_leases(&mut self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        self.execute(q("UPDATE jobs SET lease_until = ? WHERE state = 'running'").bind(to_us(now))).await
    }

    async fn count_open_jobs(&mut self) -> Result<Vec<(JobKind, JobState, i64)>, StoreError> {
        let rows = self
            .fetch_all(q(
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
        self.forget_webhooks(&w.org_id);
        self.execute(
            q("INSERT INTO webhooks (id, org_id, url, events, secret, format, description, created_at, deleted_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
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
        let row = self
            .fetch_optional(
                q("SELECT * FROM webhooks WHERE org_id = ? AND id = ?")
                    .bind(org.as_str().to_owned())
                    .bind(id.as_str().to_owned()),
            )
            .await?;
        row.as_ref().map(webhook_row).transpose()
    }

    async fn list_webhooks(&mut self, org: &OrgId) -> Result<Vec<Webhook>, StoreError> {
        if let Some(known) = self.memo().and_then(|memo| memo.webhooks.get(org)) {
            return Ok(known.clone());
        }
        let rows = self
            .fetch_all(
                q("SELECT * FROM webhooks WHERE org_id = ? AND deleted_at IS NULL ORDER BY id")
                    .bind(org.as_str().to_owned()),
            )
            .await?;
        let hooks = rows.iter().map(webhook_row).collect::<Result<Vec<_>, _>>()?;
        if !self.webhooks_changed
            && let Some(memo) = self.memo_mut()
        {
            memo.webhooks.insert(org.clone(), hooks.clone());
        }
        Ok(hooks)
    }

    async fn delete_webhook(&mut self, org: &OrgId, id: &WebhookId, at: DateTime<Utc>) -> Result<bool, StoreError> {
        self.forget_webhooks(org);
        let n = self
            .execute(
                q("UPDATE webhooks SET deleted_at = ? WHERE org_id = ? AND id = ? AND deleted_at IS NULL")
                    .bind(to_us(at))
                    .bind(org.as_str().to_owned())
                    .bind(id.as_str().to_owned()),
            )
            .await?;
        Ok(n == 1)
    }

    async fn insert_delivery(&mut self, d: &Delivery) -> Result<(), StoreError> {
        self.queue(writes::insert_delivery(d));
        Ok(())
    }

    async fn list_deliveries(
        &mut self,
        org: &OrgId,
        webhook: &WebhookId,
        page: &Page,
    ) -> Result<Vec<Delivery>, StoreError> {
        let rows = self
            .fetch_all(
                q("SELECT * FROM webhook_deliveries WHERE org_id = ? AND webhook_id = ? AND (? IS NULL OR id < ?)
                     ORDER BY id DESC LIMIT ?")
                .bind(org.as_str().to_owned())
                .bind(webhook.as_str().to_owned())
                .bind(page.after.clone())
                .bind(page.after.clone())
                .bind(limit(page)),
            )
            .await?;
        rows.iter().map(delivery_row).collect()
    }

    async fn insert_policy(&mut self, p: &StoredPolicy) -> Result<(), StoreError> {
        self.execute(
            q("INSERT INTO policies (org_id, version, sources, origin, created_at) VALUES (?, ?, ?, ?, ?)")
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
        let row = self
            .fetch_optional(
                q("SELECT * FROM policies WHERE org_id = ? ORDER BY seq DESC LIMIT 1").bind(org.as_str().to_owned()),
            )
            .await?;
        row.as_ref().map(policy_row).transpose()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use countersign_core::audit::Actor;
    use sqlx::Connection;

    fn org(name: &str) -> Org {
        Org { id: OrgId::new(), name: name.into(), created_at: Utc::now() }
    }

    fn event(action: &str) -> NewAuditEvent {
        NewAuditEvent {
            time_us: 1,
            actor: Actor::system(),
            action: action.into(),
            subject: None,
            data: serde_json::json!({}),
        }
    }

    #[tokio::test]
    async fn every_commit_returns_after_a_sync_that_covers_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        let writers = (0..32).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut tx = store.write().await.unwrap();
                tx.insert_org(&org(&format!("org-{i}"))).await.unwrap();
                tx.commit().await.unwrap();
            })
        });
        for writer in writers.collect::<Vec<_>>() {
            writer.await.unwrap();
        }
        let durability = &store.durability;
        assert_eq!(durability.committed.load(Ordering::Acquire), 32);
        assert_eq!(durability.synced.load(Ordering::Acquire), 32, "a commit returned before its sync");
        let mut tx = store.read().await.unwrap();
        assert_eq!(tx.count_orgs().await.unwrap(), 32);
    }

    async fn page_size(store: &SqliteStore) -> i64 {
        sqlx::query_scalar("PRAGMA page_size").fetch_one(&store.reader).await.unwrap()
    }

    /// A database made before migration 5 keeps every audit event, in order, in the rowid table that
    /// migration makes: the same rows, keys and rules (no update; no delete outside a retained prefix behind a
    /// checkpoint), and the chain goes on after them. Events longer than an index cell no longer spill.
    #[tokio::test]
    async fn migration_5_keeps_every_audit_event_and_its_rules() {
        type Row = (String, i64, String, i64, String, String, Option<String>, String, String, String);
        const SELECT: &str = "SELECT org_id, seq, id, time_us, actor, action, subject, data, prev_hash, hash
                              FROM audit_events ORDER BY org_id, seq";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite");
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .page_size(PAGE_SIZE)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true);
        let mut conn = options.connect().await.unwrap();
        migrator(&MIGRATIONS[..4]).run(&mut conn).await.unwrap();
        let acme = org("acme");
        sqlx::query("INSERT INTO orgs (id, name, created_at) VALUES (?, ?, 0)")
            .bind(acme.id.as_str())
            .bind(&acme.name)
            .execute(&mut conn)
            .await
            .unwrap();
        for seq in 1..=40_i64 {
            sqlx::query(
                "INSERT INTO audit_events (org_id, seq, id, time_us, actor, action, subject, data, prev_hash, hash)
                 VALUES (?, ?, ?, ?, '{}', 'test.event', ?, ?, ?, ?)",
            )
            .bind(acme.id.as_str())
            .bind(seq)
            .bind(format!("evt_{seq:04}"))
            .bind(seq * 1000)
            .bind((seq % 3 != 0).then(|| format!("act_{}", seq % 5)))
            .bind(format!(r#"{{"n": {seq}, "text": "{}"}}"#, "x".repeat(600)))
            .bind(format!("h{}", seq - 1))
            .bind(format!("h{seq}"))
            .execute(&mut conn)
            .await
            .unwrap();
        }
        let before: Vec<Row> = sqlx::query_as(SELECT).fetch_all(&mut conn).await.unwrap();
        conn.close().await.unwrap();

        let store = SqliteStore::open(&path).await.unwrap();
        let after: Vec<Row> = sqlx::query_as(SELECT).fetch_all(&store.reader).await.unwrap();
        assert_eq!(after, before);
        let schema: String = sqlx::query_scalar("SELECT sql FROM sqlite_schema WHERE name = 'audit_events'")
            .fetch_one(&store.reader)
            .await
            .unwrap();
        assert!(!schema.contains("WITHOUT ROWID"), "{schema}");
        let spilled: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM dbstat WHERE name = 'audit_events' AND pagetype = 'overflow'")
                .fetch_one(&store.reader)
                .await
                .unwrap();
        assert_eq!(spilled, 0, "events of about 700 bytes spilled into overflow pages");
        // Its keys, as before: the primary key, the unique id, and the subject index in seq order.
        let mut keys: Vec<(bool, String)> = Vec::new();
        let indexes: Vec<(String, bool)> =
            sqlx::query_as("SELECT name, \"unique\" FROM pragma_index_list('audit_events')")
                .fetch_all(&store.reader)
                .await
                .unwrap();
        for (name, unique) in indexes {
            let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_index_info(?) ORDER BY seqno")
                .bind(name)
                .fetch_all(&store.reader)
                .await
                .unwrap();
            keys.push((unique, columns.join(",")));
        }
        keys.sort();
        assert_eq!(
            keys,
            [(false, "org_id,subject,seq".to_owned()), (true, "id".to_owned()), (true, "org_id,seq".to_owned())]
        );

        // The rules hold (tried on a connection of the test's own).
        let mut side = options.connect().await.unwrap();
        let refused = sqlx::query("UPDATE audit_events SET data = '{}' WHERE seq = 3").execute(&mut side).await;
        assert!(refused.unwrap_err().to_string().contains("append-only"));
        let refused = sqlx::query("DELETE FROM audit_events WHERE seq = 1").execute(&mut side).await;
        assert!(refused.unwrap_err().to_string().contains("append-only"));
        let copy = "INSERT INTO audit_events (org_id, seq, id, time_us, actor, action, subject, data, prev_hash, hash)
                    SELECT org_id, ?, ?, time_us, actor, action, subject, data, prev_hash, hash FROM audit_events WHERE seq = 2";
        for (seq, id, what) in [
            (Some(2), "evt_new", "a second event at a seq"),
            (Some(99), "evt_0002", "a second event with an id"),
            (None, "evt_new", "an event without a seq"),
        ] {
            let refused = sqlx::query(copy).bind(seq).bind(id).execute(&mut side).await;
            assert!(refused.is_err(), "{what}");
        }
        // Retention deletes a prefix behind a checkpoint, and nothing past it.
        for sql in [
            "INSERT INTO audit_retention (org_id, days, deleted_upto) VALUES (?, 1, 5)",
            "INSERT INTO audit_checkpoints (org_id, seq, head_hash, time_us, key_id, signature) VALUES (?, 5, 'h5', 0, 'k', 's')",
        ] {
            sqlx::query(sql).bind(acme.id.as_str()).execute(&mut side).await.unwrap();
        }
        let past = sqlx::query("DELETE FROM audit_events WHERE seq = 6").execute(&mut side).await;
        assert!(past.unwrap_err().to_string().contains("append-only"));
        let prefix = sqlx::query("DELETE FROM audit_events WHERE seq <= 5").execute(&mut side).await.unwrap();
        assert_eq!(prefix.rows_affected(), 5);
        side.close().await.unwrap();

        // The chain goes on after the last event.
        let mut tx = store.write().await.unwrap();
        let next = tx.append_audit(&acme.id, event("test.after")).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!((next.seq, next.prev_hash.as_str()), (41, "h40"));
        let all: Vec<Row> = sqlx::query_as(SELECT).fetch_all(&store.reader).await.unwrap();
        assert_eq!(all.len(), 36);
    }

    /// A new file gets the smaller page; a file made with SQLite's default keeps its pages, opens, migrates
    /// and takes writes.
    #[tokio::test]
    async fn a_new_database_uses_the_small_page_and_an_old_one_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = SqliteStore::open(&dir.path().join("new.sqlite")).await.unwrap();
        assert_eq!(page_size(&fresh).await, i64::from(PAGE_SIZE));

        let old_path = dir.path().join("old.sqlite");
        let old = SqliteConnectOptions::new()
            .filename(&old_path)
            .create_if_missing(true)
            .page_size(4096)
            .journal_mode(SqliteJournalMode::Wal);
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(old).await.unwrap();
        sqlx::query("CREATE TABLE before_us (x INTEGER)").execute(&pool).await.unwrap();
        pool.close().await;
        let store = SqliteStore::open(&old_path).await.unwrap();
        assert_eq!(page_size(&store).await, 4096);
        let mut tx = store.write().await.unwrap();
        tx.insert_org(&org("acme")).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(store.read().await.unwrap().count_orgs().await.unwrap(), 1);
    }

    async fn commit_orgs(store: &SqliteStore, count: u64) {
        for _ in 0..count {
            let id = OrgId::new();
            let mut tx = store.write().await.unwrap();
            tx.insert_org(&Org { name: format!("org-{id}"), id, created_at: Utc::now() }).await.unwrap();
            tx.commit().await.unwrap();
        }
    }

    fn wal_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join("db.sqlite-wal")).unwrap().len()
    }

    /// Once writes pause, a checkpoint copies the log, and the next write starts it over: the file stops
    /// growing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pause_in_writes_checkpoints_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        let mut done = store.durability.checkpoints.subscribe();
        commit_orgs(&store, CHECKPOINT_SOFT - 1).await;
        assert_eq!(*done.borrow(), 0, "checkpointed before the soft mark");
        commit_orgs(&store, 1).await;
        tokio::time::timeout(Duration::from_secs(30), done.wait_for(|n| *n >= 1)).await.unwrap().unwrap();
        let full = wal_len(dir.path());
        commit_orgs(&store, 2).await;
        assert_eq!(wal_len(dir.path()), full, "the log was not started over");
        assert_eq!(store.read().await.unwrap().count_orgs().await.unwrap(), CHECKPOINT_SOFT as i64 + 2);
    }

    /// Writes that never pause still get a checkpoint every bound: the log stays near the bound's size
    /// instead of growing with every commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn steady_writes_keep_the_log_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        commit_orgs(&store, 8).await;
        let before = wal_len(dir.path());
        commit_orgs(&store, 16).await;
        let per_commit = (wal_len(dir.path()) - before) / 16;
        let writers: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { commit_orgs(&store, 3 * CHECKPOINT_BOUND / 8).await })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        let mut done = store.durability.checkpoints.subscribe();
        tokio::time::timeout(Duration::from_secs(30), done.wait_for(|n| *n >= 2)).await.unwrap().unwrap();
        let len = wal_len(dir.path());
        assert!(len < 2 * CHECKPOINT_BOUND * per_commit, "the log grew to {len} bytes ({per_commit} per commit)");
    }

    /// The writer remembers an org's webhooks between transactions and forgets them at every change, so a
    /// list after a committed or a rolled-back change is what is on disk.
    #[tokio::test]
    async fn remembered_webhooks_follow_every_change_and_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        let org = org("acme");
        let hook = Webhook {
            id: WebhookId::new(),
            org_id: org.id.clone(),
            url: "https://hooks.example/in".into(),
            events: vec![NameGlob::parse("action.*").unwrap()],
            secret: "whsec_1".into(),
            format: countersign_core::domain::WebhookFormat::Json,
            description: None,
            created_at: Utc::now(),
            deleted_at: None,
        };
        let urls = |hooks: Vec<Webhook>| hooks.into_iter().map(|h| h.url).collect::<Vec<_>>();
        let mut tx = store.write().await.unwrap();
        tx.insert_org(&org).await.unwrap();
        assert!(tx.list_webhooks(&org.id).await.unwrap().is_empty());
        tx.commit().await.unwrap();

        // Added then rolled back: seen inside, gone after.
        let mut tx = store.write().await.unwrap();
        tx.insert_webhook(&hook).await.unwrap();
        assert_eq!(urls(tx.list_webhooks(&org.id).await.unwrap()), ["https://hooks.example/in"]);
        drop(tx);
        let mut tx = store.write().await.unwrap();
        assert!(tx.list_webhooks(&org.id).await.unwrap().is_empty());
        tx.insert_webhook(&hook).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = store.write().await.unwrap();
        assert_eq!(urls(tx.list_webhooks(&org.id).await.unwrap()), ["https://hooks.example/in"]);
        tx.commit().await.unwrap();

        // Remembered: a row changed behind the store's back is not read again ...
        store.writer.lock().await.conn.execute_batch("UPDATE webhooks SET url = 'https://changed.example'").unwrap();
        let mut tx = store.write().await.unwrap();
        assert_eq!(urls(tx.list_webhooks(&org.id).await.unwrap()), ["https://hooks.example/in"]);
        // ... until a change through the store forgets them.
        assert!(tx.delete_webhook(&org.id, &hook.id, Utc::now()).await.unwrap());
        tx.commit().await.unwrap();
        let mut tx = store.write().await.unwrap();
        assert!(tx.list_webhooks(&org.id).await.unwrap().is_empty());
    }

    fn job(org: &OrgId) -> Job {
        // Stored to the microsecond.
        let now = DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
        Job::new(org.clone(), JobKind::ActionExecute, None, serde_json::json!({}), now)
    }

    /// Queued writes go out together with the next statement that needs them, or with the commit, and the
    /// writer's own `BEGIN` with the first: what the transaction wrote is what it reads, and what commits.
    #[tokio::test]
    async fn queued_writes_are_read_back_and_committed_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        let org = org("o");
        let mut tx = store.write().await.unwrap();
        tx.insert_org(&org).await.unwrap();
        let mut first = job(&org.id);
        tx.insert_job(&first).await.unwrap();
        assert_eq!(tx.get_job(&org.id, &first.id).await.unwrap(), Some(first.clone()), "a queued insert went unread");
        first.state = JobState::Cancelled;
        tx.update_job(&first).await.unwrap();
        let second = job(&org.id);
        tx.insert_job(&second).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = store.read().await.unwrap();
        assert_eq!(tx.get_job(&org.id, &first.id).await.unwrap(), Some(first));
        assert_eq!(tx.get_job(&org.id, &second.id).await.unwrap(), Some(second));
    }

    /// Only the writer's commits are counted and synced, so a read transaction refuses every write: one run at
    /// once, and queued ones at its commit, which then writes nothing.
    #[tokio::test]
    async fn a_read_transaction_refuses_to_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        let mut tx = store.read().await.unwrap();
        let refused = tx.insert_org(&org("o")).await.unwrap_err();
        assert!(refused.to_string().contains("cannot write"), "{refused}");
        let mut tx = store.write().await.unwrap();
        let kept = org("p");
        tx.insert_org(&kept).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = store.read().await.unwrap();
        tx.insert_job(&job(&kept.id)).await.unwrap();
        let refused = tx.commit().await.unwrap_err();
        assert!(refused.to_string().contains("cannot write"), "{refused}");
        let mut read = store.read().await.unwrap();
        assert_eq!(
            read.list_jobs(&kept.id, &JobFilter::default(), &Page { limit: 10, after: None }).await.unwrap(),
            Vec::new()
        );
        // Below that check, the reader connections themselves refuse to change the database.
        let refused = sqlx::query("DELETE FROM orgs").execute(&store.reader).await.unwrap_err();
        assert!(refused.to_string().contains("readonly"), "{refused}");
        assert_eq!(store.read().await.unwrap().count_orgs().await.unwrap(), 1);
    }

    /// A uniqueness conflict refuses one statement and the transaction goes on (a caller may answer the
    /// conflict); a guard's refusal (a trigger: the audit log is append-only) fails the transaction, so nothing
    /// after it runs, it cannot commit, and what it did before the refusal (the retention marker) is undone.
    #[tokio::test]
    async fn a_conflict_leaves_the_transaction_going_and_a_guard_refusal_ends_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        let (first, second) = (org("o"), org("p"));
        let mut tx = store.write().await.unwrap();
        tx.insert_org(&first).await.unwrap();
        tx.append_audit(&first.id, event("org.created")).await.unwrap();
        let conflict = tx.insert_org(&first).await.unwrap_err();
        assert!(matches!(conflict, StoreError::Conflict(_)), "{conflict}");
        tx.insert_org(&second).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(store.read().await.unwrap().count_orgs().await.unwrap(), 2);

        // A retention cut with no signed checkpoint at its end: the retention marker moves first, then the
        // append-only guard refuses the delete.
        let mut tx = store.write().await.unwrap();
        tx.insert_org(&org("q")).await.unwrap();
        let refused = tx.delete_audit_prefix(&first.id, 1).await.unwrap_err();
        assert!(refused.to_string().contains("append-only"), "{refused}");
        let after = tx.count_orgs().await.unwrap_err();
        assert!(after.to_string().contains("can only roll back"), "a refused transaction went on: {after}");
        assert!(tx.commit().await.is_err(), "a refused transaction committed");
        let mut read = store.read().await.unwrap();
        assert_eq!(read.count_orgs().await.unwrap(), 2, "the refused transaction wrote");
        assert_eq!(read.retention(&first.id).await.unwrap().deleted_upto, 0, "the retention marker moved");
        assert_eq!(read.list_audit(&first.id, &AuditFilter::default(), 0, 10).await.unwrap()[0].action, "org.created");
    }

    /// An update that finds no row fails the transaction before its `COMMIT`: it commits nothing, every later
    /// statement fails, and the next writer starts clean.
    #[tokio::test]
    async fn a_queued_update_of_a_missing_row_fails_its_transaction_before_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        let org = org("o");
        let mut tx = store.write().await.unwrap();
        tx.insert_org(&org).await.unwrap();
        tx.commit().await.unwrap();

        // Sent with the commit.
        let mut tx = store.write().await.unwrap();
        let kept = job(&org.id);
        tx.insert_job(&kept).await.unwrap();
        tx.update_job(&job(&org.id)).await.unwrap();
        let failed = tx.commit().await.unwrap_err();
        assert!(matches!(&failed, StoreError::Internal(m) if m.contains("vanished")), "{failed}");
        assert_eq!(
            store.read().await.unwrap().get_job(&org.id, &kept.id).await.unwrap(),
            None,
            "a failed commit wrote"
        );

        // Sent before a read: the read fails, and so does everything after it.
        let mut tx = store.write().await.unwrap();
        tx.insert_job(&kept).await.unwrap();
        tx.update_job(&job(&org.id)).await.unwrap();
        let failed = tx.count_orgs().await.unwrap_err();
        assert!(matches!(&failed, StoreError::Internal(m) if m.contains("vanished")), "{failed}");
        let after = tx.get_job(&org.id, &kept.id).await.unwrap_err();
        assert!(after.to_string().contains("can only roll back"), "a failed transaction went on: {after}");
        assert!(tx.commit().await.is_err(), "a failed transaction committed");

        // Dropped with its transaction open: rolled back as it is dropped.
        let mut tx = store.write().await.unwrap();
        tx.insert_job(&kept).await.unwrap();
        assert!(tx.get_job(&org.id, &kept.id).await.unwrap().is_some());
        drop(tx);
        let writer = Arc::clone(&store.writer);
        let open = tokio::spawn(async move { writer.lock().await.open });
        assert!(!open.await.unwrap(), "the dropped transaction was left open");
        let mut tx = store.write().await.unwrap();
        assert_eq!(tx.get_job(&org.id, &kept.id).await.unwrap(), None, "an abandoned transaction was not rolled back");
        tx.insert_job(&kept).await.unwrap();
        tx.commit().await.unwrap();
        assert!(store.read().await.unwrap().get_job(&org.id, &kept.id).await.unwrap().is_some());
    }

    /// A deferred commit returns unsynced but counted: the next durable commit's sync, or `durable`, covers
    /// it, and a read waits for it.
    #[tokio::test]
    async fn a_deferred_commit_is_synced_by_the_next_durable_one_or_a_wait() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        let durability = &store.durability;
        let deferred = |name: &'static str| {
            let store = store.clone();
            async move {
                // Deferred before it begins, as a model call's claim is (begun alone at `FULL`, SQLite would
                // sync it).
                let mut tx = store.write().await.unwrap();
                tx.defer_sync(true);
                tx.insert_org(&org(name)).await.unwrap();
                tx.commit().await.unwrap();
            }
        };
        // The syncs a deferred commit starts wait for `syncing`, held here.
        let turn = durability.syncing.lock().await;
        deferred("first").await;
        assert_eq!(durability.committed.load(Ordering::Acquire), 1);
        assert_eq!(durability.synced.load(Ordering::Acquire), 0, "a deferred commit waited for its sync");
        drop(turn);
        store.durable().await.unwrap();
        assert_eq!(durability.synced.load(Ordering::Acquire), 1);

        let turn = durability.syncing.lock().await;
        deferred("second").await;
        let mut tx = store.write().await.unwrap();
        tx.insert_org(&org("third")).await.unwrap();
        let durable = tokio::spawn(async move { tx.commit().await });
        drop(turn);
        durable.await.unwrap().unwrap();
        assert_eq!(durability.synced.load(Ordering::Acquire), 3, "the durable commit returned before both were synced");

        let turn = durability.syncing.lock().await;
        deferred("fourth").await;
        let reader = {
            let store = store.clone();
            tokio::spawn(async move { store.read().await.unwrap().count_orgs().await.unwrap() })
        };
        drop(turn);
        assert_eq!(reader.await.unwrap(), 4);
        assert_eq!(durability.synced.load(Ordering::Acquire), 4, "a read began before the deferred commit's sync");

        // With no one else to sync it, a deferred commit gets a sync of its own.
        deferred("fifth").await;
        let synced = async {
            while durability.synced.load(Ordering::Acquire) < 5 {
                tokio::time::sleep(DEFERRED_SYNC_WITHIN).await;
            }
        };
        assert!(
            tokio::time::timeout(Duration::from_secs(10), synced).await.is_ok(),
            "a deferred commit was never synced"
        );
    }

    /// A commit with no other writer waiting is synced by SQLite inside its `COMMIT` (`synchronous = FULL`)
    /// and returns without the shared sync; one deferred as it begins runs at `NORMAL`, and waits for the shared
    /// sync if the deferral is taken back before its commit; one alone that inserted
    /// nothing (SQLite may then skip its sync) waits for the shared sync, so it never passes an unsynced commit
    /// as synced; one with a writer waiting runs at `NORMAL` and waits for the shared sync, after letting the
    /// next writer in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_commit_is_synced_by_sqlite_and_a_queue_of_commits_shares_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        let durability = Arc::clone(&store.durability);
        let level = |store: &SqliteStore| {
            let writer = Arc::clone(&store.writer);
            async move {
                let writer = writer.lock().await;
                writer.conn.query_row("PRAGMA synchronous", [], |row| row.get::<_, i64>(0)).unwrap()
            }
        };
        let synced = || durability.synced.load(Ordering::Acquire);
        const FULL: i64 = 2;
        const NORMAL: i64 = 1;
        // The shared sync waits for `syncing`, held here.
        let shared = durability.syncing.lock().await;

        let alone = org("alone");
        let mut tx = store.write().await.unwrap();
        tx.insert_org(&alone).await.unwrap();
        tx.append_audit(&alone.id, event("org.created")).await.unwrap();
        let commit = tokio::time::timeout(Duration::from_secs(10), tx.commit()).await;
        assert!(commit.is_ok(), "a lone commit waited for the shared sync");
        commit.unwrap().unwrap();
        assert_eq!(level(&store).await, FULL);
        assert_eq!(synced(), 1);

        let mut tx = store.write().await.unwrap();
        tx.defer_sync(true);
        tx.insert_org(&org("deferred")).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(level(&store).await, NORMAL);
        assert_eq!(synced(), 1, "a deferred commit was synced");

        // Deferred as it began, then taken back (a model call not claimed after all): durable, through the
        // shared sync.
        let mut tx = store.write().await.unwrap();
        tx.defer_sync(true);
        tx.insert_org(&org("taken back")).await.unwrap();
        tx.defer_sync(false);
        let taken_back = tokio::spawn(tx.commit());
        drop(store.write().await.unwrap());
        assert_eq!(level(&store).await, NORMAL);
        assert!(!taken_back.is_finished(), "a commit whose deferral was taken back returned before its sync");

        // Alone and at FULL, but it changed no page: SQLite synced nothing, so the deferred commit before it
        // is still to sync, and this one waits for that.
        let mut tx = store.write().await.unwrap();
        assert_eq!(tx.count_orgs().await.unwrap(), 3);
        let empty = tokio::spawn(tx.commit());
        drop(store.write().await.unwrap());
        assert_eq!(level(&store).await, FULL);
        assert_eq!(synced(), 1, "a commit that wrote nothing passed the deferred one before it as synced");
        assert!(!empty.is_finished(), "a commit that wrote nothing returned before the shared sync");

        let mut tx = store.write().await.unwrap();
        let next = tokio::spawn({
            let store = store.clone();
            async move { store.write().await.map(drop) }
        });
        while durability.waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        tx.insert_org(&org("queued")).await.unwrap();
        let commit = tokio::spawn(tx.commit());
        next.await.unwrap().unwrap();
        assert_eq!(level(&store).await, NORMAL);
        assert!(!commit.is_finished(), "a commit with a writer waiting returned before the shared sync");
        assert_eq!(synced(), 1);
        drop(shared);
        commit.await.unwrap().unwrap();
        empty.await.unwrap().unwrap();
        taken_back.await.unwrap().unwrap();
        assert_eq!(synced(), 5);
        assert_eq!(store.read().await.unwrap().count_orgs().await.unwrap(), 4);
    }

    /// The remembered audit head follows commits only: a transaction dropped after appending leaves the next
    /// one following the last committed event, and the chain stays gapless and valid.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_remembered_audit_head_follows_commits_only() {
        use countersign_core::audit::ChainVerifier;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        let org = org("o");
        let mut tx = store.write().await.unwrap();
        tx.insert_org(&org).await.unwrap();
        assert_eq!(tx.append_audit(&org.id, event("a")).await.unwrap().seq, 1);
        tx.commit().await.unwrap();
        let mut dropped = store.write().await.unwrap();
        assert_eq!(dropped.append_audit(&org.id, event("rolled.back")).await.unwrap().seq, 2);
        assert_eq!(dropped.append_audit(&org.id, event("rolled.back")).await.unwrap().seq, 3);
        drop(dropped);
        for expected in [2, 3] {
            let mut tx = store.write().await.unwrap();
            assert_eq!(tx.append_audit(&org.id, event("b")).await.unwrap().seq, expected);
            tx.commit().await.unwrap();
        }
        let mut tx = store.read().await.unwrap();
        let events = tx.list_audit(&org.id, &AuditFilter::default(), 0, 100).await.unwrap();
        assert_eq!(events.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["a", "b", "b"]);
        let mut verifier = ChainVerifier::default();
        events.iter().for_each(|e| verifier.push(e));
        assert!(verifier.finish().ok);

        // Many writers at once: each finds the head the one before it committed, never an older one.
        let writers = (0..64).map(|_| {
            let (store, org) = (store.clone(), org.id.clone());
            tokio::spawn(async move {
                let mut tx = store.write().await.unwrap();
                tx.append_audit(&org, event("c")).await.unwrap();
                tx.commit().await.unwrap();
            })
        });
        for writer in writers.collect::<Vec<_>>() {
            writer.await.unwrap();
        }
        let mut tx = store.read().await.unwrap();
        let events = tx.list_audit(&org.id, &AuditFilter::default(), 0, 1000).await.unwrap();
        assert_eq!(events.len(), 67);
        let mut verifier = ChainVerifier::default();
        events.iter().for_each(|e| verifier.push(e));
        assert!(verifier.finish().ok);
    }

    #[tokio::test]
    async fn a_second_store_on_the_same_file_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let first = SqliteStore::open(&path).await.unwrap();
        let lock = PathBuf::from(format!("{}.lock", path.display()));
        let second = exclusive_lock(&lock, Duration::from_millis(100)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(second.contains("another Countersign process is using this database"), "{second}");
        drop(first);
        let again = SqliteStore::open(&path).await.unwrap();
        let mut tx = again.read().await.unwrap();
        assert_eq!(tx.count_orgs().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_symlinked_database_file_syncs_the_wal_beside_the_real_file() {
        let dir = tempfile::tempdir().unwrap();
        let (real, link) = (dir.path().join("real"), dir.path().join("link"));
        std::fs::create_dir_all(&real).unwrap();
        std::fs::create_dir_all(&link).unwrap();
        drop(SqliteStore::open(&real.join("db.sqlite")).await.unwrap());
        std::os::unix::fs::symlink(real.join("db.sqlite"), link.join("db.sqlite")).unwrap();
        let store = SqliteStore::open(&link.join("db.sqlite")).await.unwrap();
        let mut tx = store.write().await.unwrap();
        tx.insert_org(&org("linked")).await.unwrap();
        tx.commit().await.unwrap();
        let wal = store.durability.files.wal_path.clone();
        assert!(wal.exists(), "{} is not where SQLite keeps the log", wal.display());
        assert_eq!(wal.parent().map(std::fs::canonicalize).transpose().unwrap(), Some(real.canonicalize().unwrap()));
        assert!(!link.join("db.sqlite-wal").exists());
    }

    /// A deferred commit on a store already poisoned fails instead of letting its caller send; one whose own
    /// (detached) sync fails poisons the store, which the caller's wait for durability reports.
    #[tokio::test]
    async fn a_deferred_commit_never_hides_a_failed_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        let mut tx = store.write().await.unwrap();
        tx.insert_org(&org("claimed")).await.unwrap();
        tx.defer_sync(true);
        store.durability.poison("a test");
        assert!(tx.commit().await.is_err(), "a deferred commit returned on a store that cannot sync");

        let db = std::fs::OpenOptions::new().write(true).open(dir.path().join("db.sqlite")).unwrap();
        let files = LogFiles { wal_path: dir.path().to_owned(), wal: std::sync::Mutex::new(None), db };
        // The shared sync, which these files fail: a commit synced inside its `COMMIT` would not use them.
        let broken = SqliteStore {
            durability: Arc::new(Durability { sync_in_commit: false, ..Durability::new(files, None) }),
            ..SqliteStore::open(&dir.path().join("other.sqlite")).await.unwrap()
        };
        let mut tx = broken.write().await.unwrap();
        tx.insert_org(&org("lost")).await.unwrap();
        tx.defer_sync(true);
        tx.commit().await.unwrap();
        let err = broken.durable().await.unwrap_err();
        assert!(matches!(&err, StoreError::Unavailable(m) if m.contains("restarts")), "{err:?}");
        assert!(broken.write().await.is_err(), "a write began after a failed sync");
    }

    #[tokio::test]
    async fn a_failed_sync_refuses_every_later_write_and_readiness() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite")).await.unwrap();
        // A directory where the WAL should be: opening it for writing fails as a failed sync would.
        let db = std::fs::OpenOptions::new().write(true).open(dir.path().join("db.sqlite")).unwrap();
        let files = LogFiles { wal_path: dir.path().to_owned(), wal: std::sync::Mutex::new(None), db };
        // The shared sync, which these files fail: a commit synced inside its `COMMIT` would not use them.
        let broken = Durability { sync_in_commit: false, ..Durability::new(files, None) };
        let poisoned = SqliteStore { durability: Arc::new(broken), ..store.clone() };
        let mut tx = poisoned.write().await.unwrap();
        tx.insert_org(&org("lost")).await.unwrap();
        let err = tx.commit().await.unwrap_err();
        assert!(matches!(&err, StoreError::Unavailable(m) if m.contains("restarts")), "{err:?}");
        assert!(poisoned.write().await.is_err(), "a write began after a failed sync");
        assert!(poisoned.read().await.is_err(), "a read began after a failed sync");
        assert!(poisoned.ping().await.is_err(), "a store that cannot sync reported ready");
        assert!(store.ping().await.is_ok());
    }
}
