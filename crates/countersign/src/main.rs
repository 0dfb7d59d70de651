//! The `countersign` binary: parses the command line, starts telemetry, and dispatches. `serve` runs the
//! gateway until SIGINT/SIGTERM and reloads the policy on SIGHUP. No business logic lives here.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use countersign::config::{EXAMPLE, ServeArgs};
use countersign::server::Server;
use countersign::workers::policy_watch;

#[derive(Parser)]
#[command(name = "countersign", version, about = "The governance gateway for AI agents")]
struct Cli {
    /// Log format: text or json.
    #[arg(long, global = true, env = "COUNTERSIGN_LOG_FORMAT", default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Audit log tools that need no server.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify an exported audit log (JSON Lines) offline: the hash chain, and every checkpoint's signature.
    /// Exit code 0 when intact, 1 when broken (the first broken event is named), 2 on a usage error.
    Verify {
        /// The export file (from `GET /v1/audit/export`).
        #[arg(long)]
        file: std::path::PathBuf,
        /// The instance's public key, base64 (from `GET /v1/audit/public-key`).
        #[arg(long)]
        public_key: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print a commented example configuration.
    Example,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    countersign::telemetry::init(cli.log_format == "json");
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Config { command: ConfigCommand::Example } => {
            print!("{EXAMPLE}");
            Ok(())
        }
        Command::Audit { command: AuditCommand::Verify { file, public_key, json } } => {
            verify_export(&file, &public_key, json)
        }
    }
}

fn verify_export(file: &std::path::Path, public_key: &str, json: bool) -> anyhow::Result<()> {
    let reader = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let report = countersign_core::checkpoint::verify_export(std::io::BufReader::new(reader), public_key.trim())
        .context("cannot verify")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.ok {
        println!(
            "ok: {} events (seq {} to {}), {} signed checkpoints, head {}",
            report.events,
            report.first_seq.unwrap_or(0),
            report.last_seq.unwrap_or(0),
            report.checkpoints,
            report.head_hash.as_deref().unwrap_or("-")
        );
    } else {
        let at = report.first_broken_seq.map(|s| format!(" at seq {s}")).unwrap_or_default();
        println!("BROKEN{at}: {}", report.reason.as_deref().unwrap_or("the chain does not verify"));
    }
    if !report.ok {
        std::process::exit(1);
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    let data_dir = config.data_dir.clone();
    let server = Server::build(config).await.context("cannot start")?;
    let url = server.gateway().public_url().to_owned();
    if let Some(boot) = server.bootstrapped() {
        match &boot.generated_key {
            Some(key) => {
                println!("Bootstrapped org `default` with user `admin`.");
                println!("Admin key (shown once, also written to {}): {key}", data_dir.join("admin.key").display());
            }
            None => println!("Bootstrapped org `default` with the admin key from COUNTERSIGN_BOOTSTRAP_ADMIN_KEY."),
        }
    } else {
        println!("Admin key: see {} (written at first start)", data_dir.join("admin.key").display());
    }
    println!("Countersign is listening on {url}");
    println!("Dashboard: {url}/ui/");
    println!("API:       {url}/v1/  (health: {url}/healthz)");

    let gateway = server.gateway().clone();
    tokio::spawn(async move {
        let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
        while hangup.recv().await.is_some() {
            policy_watch::reload(&gateway, "SIGHUP").await;
        }
    });
    server.run_until(shutdown_signal()).await.context("server stopped with an error")?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
