//! The `ponte` command: run the gateway, check a configuration, or act as a partner.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use ponte::broker::Queues;
use ponte::directory::Directory;

// mimalloc: the hot path allocates many small JSON nodes and frame buffers per message, where
// glibc's allocator showed up as a fifth of the CPU time in profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "ponte", version, about = "Inter-agency data-exchange gateway")]
struct Cli {
    /// Configuration folder (holding ponte.toml).
    #[arg(
        long,
        short,
        global = true,
        env = "PONTE_CONFIG_DIR",
        default_value = "config"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM or SIGINT.
    Run,
    /// Load and check all configuration, schemas and tables; report every error with its file.
    Check {
        /// Configuration folder (overrides --config).
        dir: Option<PathBuf>,
    },
    /// Publish a message file to a partner's inbound queue, as that partner.
    Send {
        /// The partner whose inbound queue receives the message.
        #[arg(long = "as")]
        partner: String,
        /// JSON file(s) to send.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the topology as a RabbitMQ definitions file, for pre-provisioned brokers.
    Definitions {
        /// Virtual host the queues live in.
        #[arg(long, default_value = "/")]
        vhost: String,
    },
    /// Take messages from one of a partner's queues and print them (acknowledging them).
    Receive {
        /// The partner whose queue to read.
        #[arg(long = "as")]
        partner: String,
        /// Which of its queues.
        #[arg(long, value_enum, default_value = "out")]
        queue: QueueKind,
        /// Most messages to take.
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Seconds to wait for messages to arrive.
        #[arg(long, default_value_t = 2)]
        wait: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum QueueKind {
    Out,
    Receipts,
    Rejected,
    Dlq,
}

fn load(dir: &std::path::Path) -> anyhow::Result<Directory> {
    Directory::load(dir).map_err(|errors| anyhow::anyhow!("{errors}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("ponte: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check { dir } => {
            let dir = dir.unwrap_or(cli.config);
            match Directory::load(&dir) {
                Ok(directory) => {
                    println!(
                        "{}: configuration is valid: {} partners, {} routes, message types: {}",
                        dir.display(),
                        directory.partners.len(),
                        directory.routes.len(),
                        directory.schemas.types().collect::<Vec<_>>().join(", ")
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    eprintln!("{errors}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Run => {
            let directory = load(&cli.config).context("refusing to start")?;
            ponte::telemetry::init(&directory.settings.log);
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            ponte::gateway::run(Arc::new(directory), shutdown, Default::default()).await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Send { partner, files } => {
            let directory = load(&cli.config)?;
            anyhow::ensure!(
                directory.partners.contains_key(&partner),
                "no partner {partner:?} is configured"
            );
            let bodies = files
                .iter()
                .map(|f| std::fs::read(f).with_context(|| format!("reading {}", f.display())))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let queue = Queues::new(&directory.settings.broker.prefix).inbound(&partner);
            ponte::client::send(&directory, &partner, bodies, |i| {
                println!("sent {} to {queue}", files[i].display());
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Definitions { vhost } => {
            let directory = load(&cli.config)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&ponte::broker::definitions(&directory, &vhost))?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Receive {
            partner,
            queue,
            count,
            wait,
        } => {
            let directory = load(&cli.config)?;
            let queues = Queues::new(&directory.settings.broker.prefix);
            let name = match queue {
                QueueKind::Out => queues.outbound(&partner),
                QueueKind::Receipts => queues.receipts(&partner),
                QueueKind::Rejected => queues.rejected(&partner),
                QueueKind::Dlq => queues.dead_letters(&partner),
            };
            let taken =
                ponte::client::take(&directory, &name, count, Duration::from_secs(wait)).await?;
            for message in &taken {
                for (k, v) in &message.headers {
                    println!("# {k}: {v}");
                }
                match serde_json::from_slice::<serde_json::Value>(&message.body) {
                    Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
                    Err(_) => println!("{}", String::from_utf8_lossy(&message.body)),
                }
            }
            eprintln!("{} message(s) from {name}", taken.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutdown requested; settling in-flight messages");
    shutdown.cancel();
}
