//! Startup and shutdown: `Server::build(config)` opens and migrates the store, bootstraps an empty one,
//! loads the policy and the audit signing key, binds the listener (port 0 allowed); `run_until(shutdown)`
//! re-arms expiry timers, releases the job leases a previous process held, starts the workers, serves until
//! the future resolves, then drains.
//!
//! `main` only adds signals; tests build the same server on port 0.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use countersign_core::checkpoint::AuditSigner;
use countersign_core::clock::{Clock, SystemClock};
use countersign_core::store::Store;
use countersign_store::{PostgresStore, ReplicaFeed, SqliteStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::connectors::Connectors;
use crate::gateway::policy::PolicyRegistry;
use crate::gateway::{Bootstrapped, ExpiryRequest, Gateway, GatewayParts};
use crate::metrics::Metrics;
use crate::workers;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("policy: {0}")]
    Policy(String),
    #[error("store: {0}")]
    Store(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
}

pub struct Server {
    gateway: Gateway,
    listener: TcpListener,
    local_addr: SocketAddr,
    bootstrapped: Option<Bootstrapped>,
    max_body_bytes: usize,
    llm_max_body_bytes: usize,
    watch_policy: bool,
    expiry_requests: mpsc::UnboundedReceiver<ExpiryRequest>,
    /// With PostgreSQL: other replicas' changes, heard since the store was opened.
    replicas: Option<ReplicaFeed>,
    shutdown: CancellationToken,
}

/// How long a client may take to send a request's headers, from the moment the connection is free for one:
/// also how long an idle keep-alive connection stays open. Above the idle timeouts of common load balancers
/// and proxies (60 s for nginx's upstream keep-alive and AWS's ALB), so they close first and never reuse a
/// connection just as it closes. (`axum::serve` gives hyper no timer, so its own 30 s default was off and a
/// client trickling headers held its connection for ever.)
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);
/// How long a request body may go without sending anything (a body is read frame by frame; the whole may
/// take longer).
const BODY_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a write may wait for a client that does not read what it asked for (each write, not a whole
/// response): past it the connection is closed, instead of holding its task, its buffers and a file descriptor
/// for ever. An idle stream (nothing to send) is not a stalled write.
const WRITE_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A connection whose writes fail once one has waited [`WRITE_STALL_TIMEOUT`] for the client to take it.
struct WriteDeadline<T> {
    io: T,
    /// Armed at a write the socket could not take, cleared at the next one it took.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteDeadline<T> {
    fn new(io: T) -> Self {
        WriteDeadline { io, stalled: None }
    }

    /// What a write that got `poll` answers: its result, or, once stalled past the deadline, an error.
    fn deadline<R>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL_TIMEOUT)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading the response")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.deadline(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.deadline(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.deadline(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_shutdown(cx);
        this.deadline(cx, poll)
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets the connections finish. As `axum::serve`
/// does, with three limits it lacks: a deadline for a request's headers, for each piece of its body, and for
/// each write of its response ([`WriteDeadline`]). HTTP/1
/// only: telling HTTP/2 apart means reading a connection's first bytes with no deadline, so a client sending
/// nothing would hold its connection for ever (TLS and HTTP/2 belong to the proxy in front).
async fn serve(
    listener: TcpListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;
    let app = app.map_request(|request: axum::http::Request<hyper::body::Incoming>| {
        request.map(|body| axum::body::Body::new(tower_http::timeout::TimeoutBody::new(BODY_IDLE_TIMEOUT, body)))
    });
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, say: wait a moment instead of spinning.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small request/response exchanges: do not let Nagle hold back the last segment.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(app.clone());
        let connection = builder.serve_connection(TokioIo::new(WriteDeadline::new(stream)), service).into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::trace!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Installs the process-wide TLS crypto provider once (reqwest is built without one).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Writes the generated admin key (0600) and syncs it to disk.
fn write_admin_key(data_dir: &Path, key: &str) -> std::io::Result<()> {
    write_private_file(&data_dir.join("admin.key"), format!("{key}\n").as_bytes())
}

/// Writes `bytes` to `path` readable by its owner only (0600), synced: through a new file beside it renamed
/// over `path` (the directory synced after), so a file left there with a wider mode (restored from a backup)
/// or a symlink planted there never receives them, and a failed write leaves nothing half-written at `path`.
fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let partial = path.with_file_name(format!(".{name}.{}.partial", ulid::Ulid::generate()));
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&partial)?;
    let written =
        file.write_all(bytes).and_then(|()| file.sync_all()).and_then(|()| std::fs::rename(&partial, path)).and_then(
            |()| match path.parent() {
                Some(dir) => std::fs::File::open(dir).and_then(|d| d.sync_all()),
                None => Ok(()),
            },
        );
    if written.is_err() {
        // Ours (created above), so ours to remove.
        let _ = std::fs::remove_file(&partial);
    }
    written
}

/// The audit signing key: the data dir's `audit-signing.key`, created on the first start. Only its public half
/// is recorded in the database, so checkpoints cannot be forged by anyone who can read the database, and a
/// start with another key (a replica given none, or a lost file replaced by a new one) is refused, since its
/// checkpoints would verify against nothing signed before. Replicas share the file (copied by the operator).
/// A private key earlier versions kept in the database for PostgreSQL replicas is written to a replica's file
/// when it has none, and a warning asks for it to be deleted.
async fn load_signer(store: &dyn Store, data_dir: &Path) -> Result<AuditSigner, StartError> {
    use countersign_core::checkpoint::{load_if_present, load_or_create, load_or_install};
    let path = data_dir.join(SIGNING_KEY_FILE);
    let key_error =
        |e: countersign_core::checkpoint::CheckpointError| StartError::Config(format!("audit signing key: {e}"));
    let store_error = |e: countersign_core::store::StoreError| StartError::Store(e.to_string());
    let mut tx = store.write().await.map_err(store_error)?;
    let legacy = tx.legacy_signing_key().await.map_err(store_error)?;
    let legacy_held = legacy.is_some();
    let legacy = legacy.map(|text| AuditSigner::from_file_contents(&text)).transpose().map_err(key_error)?;
    let recorded = tx.audit_public_key().await.map_err(store_error)?;
    // The key this database's checkpoints are signed with: the one recorded, else the one an earlier version
    // kept in the database (whatever file a replica kept from before then).
    let from_legacy = recorded.is_none() && legacy.is_some();
    let expected = recorded.or_else(|| legacy.as_ref().map(AuditSigner::public_key_base64));
    let mismatch = |signer: &AuditSigner, expected: &str| {
        let remedy = if from_legacy {
            ", kept in the database by an earlier version: move that file aside and start again, and the key will \
             be written to it from the database"
        } else {
            ": copy the right audit-signing.key from a replica or a backup"
        };
        StartError::Config(format!(
            "audit signing key: {} is key {}, but this database's checkpoints are signed with key {}{remedy}",
            path.display(),
            signer.key_id(),
            key_id(expected)
        ))
    };
    let signer = match (load_if_present(&path).map_err(key_error)?, legacy, &expected) {
        (Some(signer), _, _) => signer,
        // Only the key expected is ever written to the file.
        (None, Some(shared), Some(expected)) if &shared.public_key_base64() == expected => {
            load_or_install(&path, || Ok(shared)).map_err(key_error)?
        }
        (None, _, Some(expected)) => {
            return Err(StartError::Config(format!(
                "audit signing key: {} does not exist, but this database's checkpoints are signed with key {}: \
                 copy {SIGNING_KEY_FILE} from a replica (or a backup) into the data directory. To start over \
                 without it, delete the row named audit_public_key from instance_secrets; every checkpoint made \
                 so far will then no longer verify",
                path.display(),
                key_id(expected)
            )));
        }
        (None, _, None) => load_or_create(&path).map_err(key_error)?,
    };
    // Recorded by the first start (or the first of several replicas starting at once: the others are refused).
    let public_key = signer.public_key_base64();
    if let Some(expected) = expected.as_deref()
        && expected != public_key
    {
        return Err(mismatch(&signer, expected));
    }
    let recorded = tx.record_audit_public_key(&public_key).await.map_err(store_error)?;
    if recorded != public_key {
        return Err(mismatch(&signer, &recorded));
    }
    tx.commit().await.map_err(store_error)?;
    if legacy_held {
        tracing::warn!(
            "the audit signing key's private half is still stored in the database (instance_secrets, \
             name audit_signing_key), where anyone who can read the database could sign checkpoints: once every \
             replica has started with this version (each now holds {SIGNING_KEY_FILE}), delete it with \
             DELETE FROM instance_secrets WHERE name = 'audit_signing_key'. Backups taken before then still \
             hold it; the key cannot be rotated without leaving earlier checkpoints unverifiable"
        );
    }
    Ok(signer)
}

/// The audit signing key's file in the data dir.
const SIGNING_KEY_FILE: &str = "audit-signing.key";

/// A recorded public key's id, for messages (the key itself if it does not parse).
fn key_id(public_key: &str) -> String {
    countersign_core::checkpoint::public_key_id(public_key).unwrap_or_else(|_| public_key.to_owned())
}

impl Server {
    pub async fn build(config: Config) -> Result<Server, StartError> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Server, StartError> {
        install_crypto_provider();
        // Private to the server's user when it creates it: the database holds webhook signing secrets and
        // every action's params, and exports hold the whole audit log. (A directory that exists keeps its mode.)
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&config.data_dir)
                .map_err(|source| StartError::DataDir { path: config.data_dir.display().to_string(), source })?;
        }
        let mut postgres = None;
        let store: Arc<dyn Store> = match &config.database_url {
            Some(url) if url.expose().starts_with("postgres://") || url.expose().starts_with("postgresql://") => {
                let pg = PostgresStore::connect(url.expose()).await.map_err(|e| StartError::Store(e.to_string()))?;
                // Listening before anything is served or cached: a change another replica commits from here on
                // (a revoked key, a decision) is heard, never missed in the gap before a worker subscribes.
                let feed = pg
                    .subscribe()
                    .await
                    .map_err(|e| StartError::Store(format!("cannot listen for the other replicas' changes: {e}")))?;
                postgres = Some(feed);
                Arc::new(pg)
            }
            Some(_) => {
                return Err(StartError::Config(
                    "database_url must be a postgres:// URL; leave it out to use the embedded SQLite store".into(),
                ));
            }
            None => Arc::new(
                SqliteStore::open(&config.data_dir.join("countersign.db"))
                    .await
                    .map_err(|e| StartError::Store(e.to_string()))?,
            ),
        };
        let policies = PolicyRegistry::load(config.policy.clone()).map_err(|e| StartError::Policy(e.to_string()))?;
        let connectors = Connectors::new(config.upstreams.clone(), &config.network.allow_private)
            .map_err(|e| StartError::Config(e.to_string()))?
            .with_llm(config.llm.clone())
            .with_mcp(config.mcp_servers.clone());
        let signer = load_signer(store.as_ref(), &config.data_dir).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind { addr: config.listen, source })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.listen, source })?;
        let public_url = config.public_url.clone().unwrap_or_else(|| format!("http://{local_addr}"));
        if !local_addr.ip().is_loopback() && !public_url.starts_with("https://") {
            // Behind a TLS proxy the dashboard's cookie would still go out without `Secure`.
            tracing::warn!(
                %public_url,
                "listening beyond loopback without an https public_url: dashboard cookies are not marked Secure; \
                 set public_url to the https address clients use"
            );
        }
        let shutdown = CancellationToken::new();
        let (expiry_tx, expiry_requests) = mpsc::unbounded_channel();
        let gateway = Gateway::new(GatewayParts {
            store: store.clone(),
            clock,
            policies,
            connectors,
            expiry: expiry_tx,
            jobs: config.jobs.clone(),
            rate_limit: config.rate_limit,
            signer,
            data_dir: config.data_dir.clone(),
            metrics: Metrics::new(),
            public_url: public_url.trim_end_matches('/').to_owned(),
            shutdown: shutdown.clone(),
            auth_cache: config.auth_cache,
            replica_feed: postgres.as_ref().map(ReplicaFeed::health),
        });
        let provided = config.bootstrap_admin_key.as_ref().map(|k| k.expose().to_owned());
        let data_dir = config.data_dir.clone();
        let bootstrapped = gateway
            .bootstrap(provided.as_deref(), |key| write_admin_key(&data_dir, key))
            .await
            .map_err(|e| StartError::Store(e.to_string()))?;
        gateway.activate_policies().await.map_err(|e| StartError::Store(e.to_string()))?;
        Ok(Server {
            gateway,
            listener,
            local_addr,
            bootstrapped,
            max_body_bytes: config.max_body_bytes,
            llm_max_body_bytes: config.llm_max_body_bytes,
            watch_policy: config.watch_policy,
            expiry_requests,
            replicas: postgres,
            shutdown,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// What the first start on an empty store created, if this was it.
    pub fn bootstrapped(&self) -> Option<&Bootstrapped> {
        self.bootstrapped.as_ref()
    }

    /// Serves until `shutdown` resolves, then stops taking requests, finishes in-flight ones and running
    /// executions, and stops the workers.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let token = self.shutdown.clone();
        let tracker = TaskTracker::new();
        let gateway = self.gateway.clone();

        tracker.spawn(workers::expiry::run(gateway.clone(), self.expiry_requests, token.clone()));
        // SQLite is one process: every lease in it belonged to a process that is gone.
        let stale = if gateway.store().backend() == "sqlite" { gateway.release_job_leases().await } else { Ok(0) };
        match stale {
            Ok(n) if n > 0 => tracing::info!(jobs = n, "jobs left running by an earlier process are due again"),
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "cannot release stale job leases"),
        }
        if let Some(feed) = self.replicas {
            tracker.spawn(workers::replicas::run(gateway.clone(), feed, token.clone()));
        }
        tracker.spawn(workers::jobs::run(gateway.clone(), token.clone(), tracker.clone()));
        tracker.spawn(workers::jobs::sweep_retention(gateway.clone(), token.clone()));
        // Upstream MCP servers connect in the background: one that is down never holds up the start. They
        // stay connected until every request and job that may call them has finished.
        let upstreams = TaskTracker::new();
        let upstreams_stop = CancellationToken::new();
        gateway.start_mcp_upstreams(&upstreams_stop, &upstreams);
        if self.watch_policy {
            tracker.spawn(workers::policy_watch::run(gateway.clone(), token.clone()));
        }
        // Re-arm timers and finish what an earlier process left behind.
        // Runs on its own until the store answers; nothing waits for it.
        drop(gateway.rearm_expiry_timers_until_done("start"));

        let inline = gateway.clone();
        let app = crate::http::router(gateway, self.max_body_bytes, self.llm_max_body_bytes);
        let serve_token = token.clone();
        let result = serve(self.listener, app, async move {
            shutdown.await;
            serve_token.cancel();
        })
        .await;
        token.cancel();
        tracker.close();
        tracker.wait().await;
        // Tool calls still in flight finish (and are recorded) before their upstreams are dropped.
        inline.inline_finished().await;
        upstreams_stop.cancel();
        upstreams.close();
        upstreams.wait().await;
        result
    }
}
