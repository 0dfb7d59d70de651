//! What the benches share: a built server run on a task with its bootstrapped admin client, the percentile
//! of sorted samples, milliseconds for printing, and a fresh PostgreSQL database for a bench that measures
//! that backend too.
#![allow(clippy::unwrap_used)]
// Each bench compiles this module on its own and uses only some of it.
#![allow(dead_code)]

use std::time::Duration;

/// The `p` quantile (0.0 to 1.0) of `sorted`, nearest rank; zero for no samples.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index.min(sorted.len().saturating_sub(1))).copied().unwrap_or_default()
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A new, empty database on the server of `base` (a PostgreSQL URL), so each measurement starts clean.
pub async fn fresh_database(base: &str) -> String {
    use sqlx::Connection;
    let name = format!("cs_bench_{}", ulid::Ulid::generate().to_string().to_lowercase());
    let mut admin = sqlx::PgConnection::connect(base).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.unwrap();
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

/// A server running on a task until [`Running::stop`], with a client holding the admin key it bootstrapped.
pub struct Running {
    pub url: String,
    pub admin: countersign::client::Client,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    pub fn start(server: countersign::server::Server) -> Running {
        let url = format!("http://{}", server.local_addr());
        let key = server.bootstrapped().unwrap().generated_key.clone().unwrap();
        let admin = countersign::client::Client::new(url.clone(), Some(key)).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run_until(async move {
            let _ = stopped.await;
        }));
        Running { url, admin, stop, task }
    }

    /// Shuts the server down and waits for it to finish.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// Serves `app` on a free loopback port with Nagle off, as the gateway's own listener is (small
/// request/response exchanges and server-sent chunks must not wait for a delayed ACK); answers the address.
pub async fn serve_loopback(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Every sample the client tasks took, sorted.
pub async fn gather(tasks: Vec<tokio::task::JoinHandle<Vec<Duration>>>) -> Vec<Duration> {
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort();
    all
}

/// What the disk under `dir` charges for one durable commit, with no database in the way: `rounds` times,
/// `pages` WAL-sized frames (a page of the size the store gives a new database and its 24-byte header, as
/// SQLite writes them) are written after the last and the file is `fdatasync`ed; the sync times, sorted. The
/// file is written whole and synced first, as a WAL that has started over is, so a timed sync writes data
/// only and allocates no blocks. A proxied call waits for one such sync, of both its commits' frames (the
/// record's, written before the send, and the outcome's, before the answer), so this is the floor of its
/// added latency on this machine, whatever the gateway does.
pub async fn disk_sync_floor(dir: &std::path::Path, pages: usize, rounds: usize) -> Vec<Duration> {
    use std::os::unix::fs::FileExt;
    const FRAME: usize = countersign_store::sqlite::PAGE_SIZE as usize + 24;
    let path = dir.join(format!("sync-floor-{pages}"));
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let span = (FRAME * pages * 64) as u64;
        file.write_all_at(&vec![0u8; FRAME * pages * 64], 0).unwrap();
        file.sync_all().unwrap();
        let frame: Vec<u8> = (0..FRAME).map(|i| (i % 251) as u8).collect();
        let mut offset = 0u64;
        let mut samples = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            for _ in 0..pages {
                if offset + FRAME as u64 > span {
                    offset = 0;
                }
                file.write_all_at(&frame, offset).unwrap();
                offset += FRAME as u64;
            }
            let started = std::time::Instant::now();
            file.sync_data().unwrap();
            samples.push(started.elapsed());
        }
        std::fs::remove_file(&path).unwrap();
        samples.sort();
        samples
    })
    .await
    .unwrap()
}
