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

// jemalloc: the message path allocates some 55 blocks per message (the decoded JSON, frames,
// copies, records), most of them held while some 1,600 messages are in flight, so a block comes
// back long after it was freed. jemalloc hands blocks out of a per-thread cache of pointers and
// first touches a block where Ponte writes it; mimalloc, before it, read each free block's link
// to hand it out, and that cold read was an eighth of the flows' time (docs/performance.md,
// "jemalloc in place of mimalloc"). glibc's allocator cost more than jemalloc.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read as it starts (`_RJEM_MALLOC_CONF` in the environment is read after
/// them, and wins). No transparent huge pages: on a host whose kernel gives them to every
/// mapping (`/sys/kernel/mm/transparent_hugepage/enabled` at `always`, some distributions'
/// default), each arena's memory went in 2 MiB pages, mostly empty: 308 MiB peak RSS with 1,000
/// partners against 150 with them off, about what a host at `madvise` gets either way.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static malloc_conf: &[u8; 10] = b"thp:never\0";

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
        /// Also print the authorization matrix: who may send what to whom, for what, and which
        /// payload fields each recipient receives.
        #[arg(long)]
        matrix: bool,
    },
    /// Inspect and replay the messages parked in a partner's rejected queue.
    Rejected {
        #[command(subcommand)]
        action: ParkedAction,
    },
    /// Inspect and replay the copies for a partner that were dead-lettered after retries (or
    /// refused by its HTTP endpoint).
    Dlq {
        #[command(subcommand)]
        action: ParkedAction,
    },
    /// Query the delivery log: every step of every message, newest last. `ponte log verify`
    /// checks its hash chain.
    #[command(args_conflicts_with_subcommands = true)]
    Log {
        #[command(subcommand)]
        action: Option<LogAction>,
        #[command(flatten)]
        query: LogQuery,
    },
    /// Load a partner's own person ids into the crosswalk from a CSV file (scheme,value,local).
    Crosswalk {
        #[command(subcommand)]
        action: CrosswalkAction,
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

#[derive(Subcommand)]
enum ParkedAction {
    /// One line per parked message: message_id, code, when, reason.
    List { partner: String },
    /// One parked message in full, with its x-ponte-* headers.
    Show { partner: String, message_id: String },
    /// Send parked messages again. A rejected message goes through the whole pipeline again; one
    /// that would be refused again by the configuration as it stands (unchanged and still wrong)
    /// stays parked and its reason is printed; `--file` replaces it by a corrected version with
    /// the same message_id. A dead letter is delivered to its recipient again, with fresh
    /// attempts, if the sender may still send it that type.
    Replay {
        partner: String,
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        message_id: Option<String>,
        /// Every parked message of the partner.
        #[arg(long)]
        all: bool,
        /// The corrected message to send instead of the parked one.
        #[arg(long, requires = "message_id")]
        file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum LogAction {
    /// Check the hash chain of the delivery log; names the first record altered or removed.
    Verify,
}

#[derive(clap::Args)]
struct LogQuery {
    #[arg(long)]
    message_id: Option<String>,
    #[arg(long)]
    correlation_id: Option<String>,
    #[arg(long)]
    sender: Option<String>,
    #[arg(long)]
    recipient: Option<String>,
    /// A receipt code (delivered, schema-violation, undeliverable, ...).
    #[arg(long)]
    code: Option<String>,
    /// delivered, partial, rejected, already-delivered, handed-back, retrying, dead-lettered.
    #[arg(long)]
    step: Option<String>,
    /// From: RFC 3339 time, a date (YYYY-MM-DD, UTC), or an age such as 90m, 2h, 1d.
    #[arg(long)]
    since: Option<String>,
    /// Until: the same forms.
    #[arg(long)]
    until: Option<String>,
    /// Newest records to show, at most.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// Keep printing new records as they are written.
    #[arg(long)]
    follow: bool,
}

#[derive(Subcommand)]
enum CrosswalkAction {
    /// Add or replace the partner's ids listed in FILE (header: scheme,value,local).
    Import {
        /// The partner whose own ids these are.
        #[arg(long)]
        partner: String,
        file: PathBuf,
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

/// For the partner and operator tools, which never map a message: no keys needed.
fn load_for_tools(dir: &std::path::Path) -> anyhow::Result<Directory> {
    Directory::load_without_secrets(dir).map_err(|errors| anyhow::anyhow!("{errors}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The partners' flows run on threads of their own (`ponte::shards`, `runtime.workers`);
    // this runtime runs the rest: the sessions' supervision, the redelivery flow, the HTTP
    // couriers, the ops endpoints and the tools.
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|runtime| runtime.block_on(execute(cli)));
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("ponte: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check { dir, matrix } => {
            let dir = dir.unwrap_or(cli.config);
            match Directory::load(&dir) {
                Ok(directory) => {
                    let tables = directory.tables.load();
                    println!(
                        "{}: configuration is valid: {} partners, {} routes, {} authorization rules, {} office rows, {} code rows, message types: {}",
                        dir.display(),
                        directory.partners.len(),
                        directory.routes.len(),
                        directory.matrix.rules.len(),
                        tables.office_rows,
                        tables.code_rows,
                        directory.schemas.types().collect::<Vec<_>>().join(", ")
                    );
                    if matrix {
                        println!();
                        print!(
                            "{}",
                            directory
                                .matrix
                                .render(&directory.partners, &directory.schemas)
                        );
                    }
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
            // Held to the end: dropping it writes the log lines still waiting.
            let _log = ponte::telemetry::init(&directory.settings.log)
                .context("starting the log writer")?;
            ponte::ops::metrics();
            let pipeline = Arc::new(
                ponte::pipeline::Pipeline::open(Arc::new(directory))
                    .context("refusing to start")?,
            );
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            tokio::spawn(reload_on_hangup(pipeline.directory.clone()));
            tokio::spawn(prune_daily(pipeline.clone()));
            let status = ponte::gateway::Status::default();
            let listen = pipeline.directory.settings.ops.listen.clone();
            if !listen.is_empty() {
                let listener = tokio::net::TcpListener::bind(&listen)
                    .await
                    .with_context(|| format!("ops.listen {listen}"))?;
                let ops = ponte::ops::serve(listener, pipeline.clone(), status.clone());
                tokio::spawn(async move {
                    if let Err(error) = ops.await {
                        tracing::error!(%error, "ops endpoints stopped");
                    }
                });
            }
            ponte::gateway::run(pipeline.clone(), shutdown, status)
                .await
                .context("starting the threads that run the partners' flows")?;
            pipeline.store.flush().context("saving the crosswalk")?;
            pipeline.journal.flush();
            Ok(ExitCode::SUCCESS)
        }
        Command::Rejected { action } => parked(&cli.config, Parked::Rejected, action).await,
        Command::Dlq { action } => parked(&cli.config, Parked::DeadLetters, action).await,
        Command::Crosswalk {
            action: CrosswalkAction::Import { partner, file },
        } => {
            let directory = load_for_tools(&cli.config)?;
            anyhow::ensure!(
                directory.partners.contains_key(&partner),
                "no partner {partner:?} is configured"
            );
            let rows = read_crosswalk(&file)?;
            let store = ponte::store::SqliteStore::open(&ponte::pipeline::store_dir(&directory))?;
            use ponte::store::Store as _;
            let n = store.import_local_ids(&partner, &rows)?;
            println!(
                "{n} person ids of {partner} imported from {}",
                file.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Send { partner, files } => {
            let directory = load_for_tools(&cli.config)?;
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
        Command::Log { action, query } => log(&cli.config, action, query).await,
        Command::Definitions { vhost } => {
            let directory = load_for_tools(&cli.config)?;
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
            let directory = load_for_tools(&cli.config)?;
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

/// The queues of parked messages ops can inspect and replay.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Parked {
    /// `<prefix>.rejected.<partner>`: originals the partner sent that were refused.
    Rejected,
    /// `<prefix>.dlq.<partner>`: copies for the partner given up after retries.
    DeadLetters,
}

/// `ponte rejected|dlq list|show|replay`.
async fn parked(
    config: &std::path::Path,
    kind: Parked,
    action: ParkedAction,
) -> anyhow::Result<ExitCode> {
    let directory = Arc::new(load_for_tools(config)?);
    let partner = match &action {
        ParkedAction::List { partner }
        | ParkedAction::Show { partner, .. }
        | ParkedAction::Replay { partner, .. } => partner.clone(),
    };
    let Some(owner) = directory.partners.get(&partner).cloned() else {
        anyhow::bail!("no partner {partner:?} is configured");
    };
    if let ParkedAction::Replay { file: Some(_), .. } = &action {
        anyhow::ensure!(
            kind == Parked::Rejected,
            "--file corrects a rejected message; a dead letter is replayed as it was mapped"
        );
    }
    let names = Queues::new(&directory.settings.broker.prefix);
    let (queue, at_header) = match kind {
        Parked::Rejected => (names.rejected(&partner), "x-ponte-rejected-at"),
        Parked::DeadLetters => (names.dead_letters(&partner), "x-ponte-dead-lettered-at"),
    };
    let parked = ponte::client::browse(&directory, &queue).await?;
    let id_of = |t: &ponte::client::Taken| t.message_id.clone().unwrap_or_default();
    let result = match action {
        ParkedAction::List { .. } => {
            for (_, t) in &parked.messages {
                let attempts = match t.header(ponte::retry::ATTEMPTS) {
                    Some(n) => format!(
                        "{n} attempt(s), from {}: ",
                        t.header(ponte::retry::SENDER).unwrap_or("?")
                    ),
                    None => String::new(),
                };
                println!(
                    "{}\t{}\t{}\t{attempts}{}",
                    id_of(t),
                    t.header("x-ponte-code").unwrap_or(""),
                    t.header(at_header).unwrap_or(""),
                    t.header("x-ponte-reason").unwrap_or("")
                );
            }
            eprintln!("{} message(s) in {queue}", parked.messages.len());
            Ok(ExitCode::SUCCESS)
        }
        ParkedAction::Show { message_id, .. } => {
            match parked.messages.iter().find(|(_, t)| id_of(t) == message_id) {
                Some((_, t)) => {
                    for (k, v) in &t.headers {
                        println!("# {k}: {v}");
                    }
                    match serde_json::from_slice::<serde_json::Value>(&t.body) {
                        Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
                        Err(_) => println!("{}", String::from_utf8_lossy(&t.body)),
                    }
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!("no message {message_id} in {queue}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        ParkedAction::Replay {
            message_id,
            all,
            file,
            ..
        } => {
            let replacement = match &file {
                Some(f) => {
                    Some(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?)
                }
                None => None,
            };
            let mut refused = 0;
            let mut replayed = 0;
            for (index, (_, t)) in parked.messages.iter().enumerate() {
                let id = id_of(t);
                if !all && message_id.as_deref() != Some(id.as_str()) {
                    continue;
                }
                let body = replacement.as_deref().unwrap_or(&t.body);
                if let Some(fixed) = &replacement {
                    let fixed_id = serde_json::from_slice::<serde_json::Value>(fixed)
                        .ok()
                        .and_then(|v| {
                            v.get("message_id")
                                .and_then(|m| m.as_str())
                                .map(String::from)
                        });
                    anyhow::ensure!(
                        fixed_id.as_deref() == Some(id.as_str()),
                        "the corrected message must keep the message_id {id}"
                    );
                }
                if kind == Parked::DeadLetters {
                    match ponte::client::replay_dead_letter(&directory, &partner, t, &queue).await?
                    {
                        Ok(()) => {
                            parked.remove(index).await?;
                            replayed += 1;
                            println!("{id}: replayed to {partner}");
                        }
                        Err(why) => {
                            refused += 1;
                            eprintln!("{id}: not replayed: {why}");
                        }
                    }
                    continue;
                }
                if let Err(rejection) = ponte::pipeline::precheck(&directory, &owner, body) {
                    refused += 1;
                    let what = if replacement.is_some() {
                        "corrected message"
                    } else {
                        "unchanged message"
                    };
                    let first = rejection.errors.first();
                    eprintln!(
                        "{id}: not replayed: the {what} would be rejected again: {} at {:?} ({}): {}",
                        rejection.code,
                        first.map_or("", |e| e.path.as_str()),
                        first.map_or("", |e| e.keyword.as_str()),
                        rejection.reason()
                    );
                    continue;
                }
                // A partly delivered message goes again only to those it was refused for.
                let only = t.header("x-ponte-recipients");
                ponte::client::republish(&directory, &partner, body, &queue, only).await?;
                parked.remove(index).await?;
                replayed += 1;
                println!(
                    "{id}: replayed to {}",
                    Queues::new(&directory.settings.broker.prefix).inbound(&partner)
                );
            }
            if replayed == 0 && refused == 0 {
                eprintln!("no matching message in {queue}");
            }
            Ok(if refused == 0 && (replayed > 0 || all) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    };
    parked.close().await;
    result
}

/// Reads a crosswalk CSV (header `scheme,value,local`), refusing the whole file on any bad row.
fn read_crosswalk(file: &std::path::Path) -> anyhow::Result<Vec<(String, String, String)>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Row {
        scheme: String,
        value: String,
        local: String,
    }
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(file)
        .with_context(|| format!("reading {}", file.display()))?;
    let mut rows = Vec::new();
    for (i, row) in reader.deserialize::<Row>().enumerate() {
        let row = row.with_context(|| format!("{}: row {}", file.display(), i + 1))?;
        anyhow::ensure!(
            ponte::partner::SHARED_SCHEMES.contains(&row.scheme.as_str()),
            "{}: row {}: scheme must be one of {}",
            file.display(),
            i + 1,
            ponte::partner::SHARED_SCHEMES.join(", ")
        );
        anyhow::ensure!(
            !row.local.is_empty() && row.local.len() <= 64 && !row.value.is_empty(),
            "{}: row {}: value and local must be 1 to 64 characters",
            file.display(),
            i + 1
        );
        rows.push((row.scheme, row.value, row.local));
    }
    Ok(rows)
}

/// Reloads the code tables on SIGHUP; invalid tables are reported and the old ones kept.
async fn reload_on_hangup(directory: Arc<Directory>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    while hangup.recv().await.is_some() {
        match directory.reload_tables() {
            Ok(tables) => tracing::info!(
                offices = tables.office_rows,
                codes = tables.code_rows,
                "code tables reloaded"
            ),
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!(file = %e.file.display(), error = %e.message, "code table error");
                }
                tracing::error!(
                    errors = errors.0.len(),
                    "code tables not reloaded; the previous tables stay in force"
                );
            }
        }
    }
}

/// `ponte log [filters] | ponte log verify`.
async fn log(
    config: &std::path::Path,
    action: Option<LogAction>,
    q: LogQuery,
) -> anyhow::Result<ExitCode> {
    use ponte::journal::{Filter, Reader, parse_time};
    let directory = load_for_tools(config)?;
    let reader =
        Reader::open(&ponte::pipeline::store_dir(&directory)).map_err(anyhow::Error::msg)?;
    if let Some(LogAction::Verify) = action {
        return Ok(match reader.verify()? {
            Ok(n) => {
                println!("delivery log intact: {n} record(s) chained");
                ExitCode::SUCCESS
            }
            Err(broken) => {
                println!("delivery log BROKEN: {broken}");
                ExitCode::FAILURE
            }
        });
    }
    let time = |t: &Option<String>| t.as_deref().map(parse_time).transpose();
    let mut filter = Filter {
        message_id: q.message_id,
        correlation_id: q.correlation_id,
        sender: q.sender,
        recipient: q.recipient,
        code: q.code,
        step: q.step,
        since_ms: time(&q.since).map_err(anyhow::Error::msg)?,
        until_ms: time(&q.until).map_err(anyhow::Error::msg)?,
        after_seq: None,
        limit: q.limit,
    };
    loop {
        for record in reader.query(&filter)? {
            if q.json {
                println!("{}", serde_json::to_string(&record)?);
            } else {
                println!("{}", record.line());
            }
            filter.after_seq = Some(record.seq);
        }
        if !q.follow {
            return Ok(ExitCode::SUCCESS);
        }
        if filter.after_seq.is_none() {
            filter.after_seq = Some(0);
        }
        filter.limit = 10_000;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Forgets crosswalk message records past their retention (unless delivered within the
/// duplicate window) and delivery log records past theirs, at start and once a day.
async fn prune_daily(pipeline: Arc<ponte::pipeline::Pipeline>) {
    loop {
        let pruning = pipeline.clone();
        // Both go by steps, waiting on the store and the log in between: off the runtime's
        // threads, which carry the messages meanwhile.
        let _ = tokio::task::spawn_blocking(move || prune(&pruning)).await;
        tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
    }
}

fn prune(pipeline: &ponte::pipeline::Pipeline) {
    let store = &pipeline.directory.settings.store;
    let started = std::time::Instant::now();
    match pipeline
        .store
        .prune(store.message_retention(), store.duplicate_window())
    {
        Ok(n) => tracing::info!(
            pruned = n,
            secs = started.elapsed().as_secs_f64(),
            "old message records pruned"
        ),
        Err(error) => tracing::error!(%error, "cannot prune the crosswalk"),
    }
    let started = std::time::Instant::now();
    let log = ponte::journal::Reader::open(&ponte::pipeline::store_dir(&pipeline.directory))
        .map_err(|e| e.to_string())
        .and_then(|reader| {
            reader
                .prune(store.log_retention())
                .map_err(|e| e.to_string())
        });
    match log {
        Ok(n) => tracing::info!(
            pruned = n,
            secs = started.elapsed().as_secs_f64(),
            "old delivery log records pruned"
        ),
        Err(error) => tracing::error!(%error, "cannot prune the delivery log"),
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

#[cfg(test)]
mod tests {
    use std::ffi::{CStr, c_char, c_void};

    /// The options above are jemalloc's: it runs without transparent huge pages whatever the
    /// host's default (jemalloc's own would be `default`, the kernel's choice).
    #[test]
    fn jemalloc_runs_without_transparent_huge_pages() {
        let mut value: *const c_char = std::ptr::null();
        let mut len = size_of::<*const c_char>();
        // SAFETY: `opt.thp` is a `const char *` to a string jemalloc keeps; `value` has its size.
        let status = unsafe {
            tikv_jemalloc_sys::mallctl(
                c"opt.thp".as_ptr(),
                (&raw mut value).cast::<c_void>(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(status, 0, "jemalloc answers for opt.thp");
        // SAFETY: a NUL-terminated string of jemalloc's, for the life of the process.
        assert_eq!(unsafe { CStr::from_ptr(value) }, c"never");
    }
}
