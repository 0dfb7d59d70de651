//! The `countersign` binary: parses the command line, starts telemetry, and dispatches. `serve` runs the
//! gateway until SIGINT/SIGTERM and reloads the policy on SIGHUP; every other command is the client in
//! `countersign::cli`. No business logic lives here.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use countersign::cli;
use countersign::config::{Config, EXAMPLE, ServeArgs};
use countersign::server::Server;
use countersign::telemetry::{self, LogFormat};
use countersign::workers::policy_watch;

#[derive(Parser)]
#[command(name = "countersign", version, about = "The governance gateway for AI agents")]
struct Cli {
    /// Log format (default: `log_format` in the configuration file, else text).
    #[arg(long, global = true, env = "COUNTERSIGN_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    #[command(flatten)]
    remote: cli::Remote,
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
    #[command(flatten)]
    Client(cli::Command),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print a commented example configuration.
    Example,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = args.resolve()?;
            telemetry::init(cli.log_format.unwrap_or(config.log_format));
            serve(config).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Config { command: ConfigCommand::Example } => {
            print!("{EXAMPLE}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Client(command) => {
            telemetry::init(cli.log_format.unwrap_or_default());
            Ok(cli::run(cli.remote, command).await)
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
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
    tracing::info!(url = %url, store = server.gateway().store().backend(), version = env!("CARGO_PKG_VERSION"), "serving");

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
