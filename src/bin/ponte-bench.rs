//! `ponte-bench`: measures Ponte against the broker's own message pump (a RabbitMQ Shovel) on
//! the same broker in the same run. Run it through `bench/run.sh`, which starts the broker.
//!
//! For one scenario (messages, partners, size, positive receipts) it:
//! 1. moves N pre-loaded messages from one queue to another with a shovel (`ack-mode`
//!    `on-confirm`): the rate the broker alone sustains (with `--shovel-per-sender`, from one
//!    queue per sending partner, a shovel each, as Ponte's load is spread);
//! 2. pre-loads the same kind of load (demo referrals and benefit-status messages, 5% invalid in
//!    varied ways) into the partners' inbound queues, starts `ponte run` and measures the drain:
//!    steady-state rate (10%–90% of the outputs), the process's CPU time per message and its
//!    peak RSS, and its start-up time;
//! 3. optionally offers messages at a fixed rate (half the measured maximum) with an open-loop
//!    publisher and records each delivered copy's end-to-end latency; then offers the same rate
//!    to a shovel between two empty queues: the latency the broker alone gives on this machine.
//!
//! With `--rounds N` it moves the load N times (steps 1 and 2, in turn) and reports medians,
//! with the range of the figures that move most. It prints one row and appends it to a CSV
//! file. It never fails on a timing.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::slice;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use ponte::broker::Queues;
use ponte::directory::Directory;
use ponte::settings::QueueType;
use serde_json::{Value, json};

#[path = "shared/proc_stat.rs"]
mod proc_stat;

#[derive(Parser, Debug, Clone)]
#[command(about = "Ponte throughput, CPU, memory and latency against a RabbitMQ shovel")]
struct Args {
    /// AMQP URL of the benchmark broker (with credentials).
    #[arg(long)]
    url: String,
    /// `scripts/broker.sh ctl` arguments of that broker: "NAME PORT DIR".
    #[arg(long)]
    node: String,
    /// Messages to pre-load.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Configured partners (at least 4: the demo institutions, plus generated employment centres).
    #[arg(long, default_value_t = 4)]
    partners: usize,
    /// Approximate size of a message in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Which messages make up the load: the demo's mix, where benefit-status messages fan out
    /// (about 1.4 copies per message), or referrals only (one copy per message, as many
    /// publishes as the shovel makes): what Ponte costs when the broker moves the same traffic.
    #[arg(long, value_enum, default_value_t = Mix::Demo)]
    mix: Mix,
    /// How the senders make their message ids.
    #[arg(long, value_enum, default_value_t = Ids::V4)]
    ids: Ids,
    /// The type of every queue of the run (`broker.queue_type` for Ponte's; the shovel's and
    /// the forwarder's the same, so that the broker moves the load between queues of one kind).
    #[arg(long, value_enum, default_value_t = QueueType::Classic)]
    queue_type: QueueType,
    /// The storage version of every classic queue of the run, set by a broker policy for the
    /// run's queues (RabbitMQ 3.10 and later; cleared at the end). Without it the broker's own
    /// default applies (`classic_queue.default_version`: 1 up to RabbitMQ 3.12).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    classic_queue_version: Option<u8>,
    /// The AMQP properties the load is published with. The broker spends more on a message
    /// whose properties take more than about 64 bytes, and Ponte's delivered copies carry the
    /// labels the wire contract asks for (`message_id`, `type`), which take them past it; a
    /// load published with the same labels costs the shovel and the forwarder what Ponte's
    /// copies cost the broker.
    #[arg(long, value_enum, default_value_t = Labels::Bare)]
    labels: Labels,
    /// The national institute's own prefetch (`prefetch` in its partner file), reserved out of
    /// `broker.max_in_flight` before the other partners share the rest.
    #[arg(long)]
    inps_prefetch: Option<u16>,
    /// Positive receipts (a receipt for every delivered message) on or off.
    #[arg(long, default_value = "off")]
    receipts: String,
    /// Start Ponte on a data folder that already remembers this many past messages (crosswalk
    /// records and delivery log records spread over the retention period), as after a year in
    /// service, instead of an empty one.
    #[arg(long, default_value_t = 0)]
    history: usize,
    /// Skip the shovel run (its rate is then reported as empty).
    #[arg(long)]
    no_shovel: bool,
    /// Give the shovel the load spread as Ponte gets it: one source queue per sending partner,
    /// holding that partner's messages, and a shovel from each into the one destination. With
    /// many partners what the broker spends depends on how many queues the load is spread over.
    #[arg(long)]
    shovel_per_sender: bool,
    /// Also move the load with a no-op AMQP forwarder (consume, publish with confirms, ack in
    /// batches; no validation): what any client-side gateway costs the broker; with
    /// `--latency-secs`, its latency at the same rate too.
    #[arg(long)]
    forwarder: bool,
    /// The forwarder's drain moves the load as Ponte does: from each sender's queue, a
    /// consumer each, publishing each message it takes to a queue of its own for each queue
    /// Ponte publishes that message to (its recipients' copies; a rejected message's parked
    /// original and receipt; with `--receipts on`, every receipt), the forwarders of each 64
    /// senders sharing a consuming and a publishing connection as Ponte's flows do, each
    /// starting with the window Ponte's flow would start with. The broker then does Ponte's
    /// work on the wire, and the forwarder's rate is what a client doing nothing but that work
    /// moves on this broker (with `--labels labelled`, its copies labelled as Ponte's are).
    #[arg(long, requires = "forwarder")]
    fan_out: bool,
    /// The forwarder spends this many microseconds of CPU on each message it takes (a busy
    /// loop on the task that took it) before publishing it, standing for a gateway's own work:
    /// what a client's own CPU costs its rate and the broker, with nothing else changed.
    #[arg(long, default_value_t = 0, requires = "forwarder")]
    forwarder_busy_us: u64,
    /// The forwarder's busy loop reads this many MiB of memory, a cache line at a time in no
    /// particular order, rather than spinning in place: a gateway's own work touches its memory,
    /// and the broker shares the machine's caches.
    #[arg(long, default_value_t = 0, requires = "forwarder_busy_us")]
    forwarder_busy_mib: usize,
    /// The forwarder holds a run of confirmed messages this many milliseconds after the first
    /// of them before acknowledging it (at once when 128 are waiting), as Ponte's flows hold
    /// theirs for one ack frame to serve many messages: what that costs the rate and the broker.
    #[arg(long, default_value_t = 0, requires = "forwarder")]
    forwarder_ack_delay_ms: u64,
    /// The forwarder publishes each copy `mandatory`, as Ponte does so that a copy no queue
    /// takes comes back rather than being confirmed and lost: RabbitMQ's classic queues answer
    /// every mandatory message with a message of their own to the publishing channel, and this
    /// shows what that costs the broker.
    #[arg(long, requires = "forwarder")]
    forwarder_mandatory: bool,
    /// Also measure latency at half the maximum rate, for this many seconds.
    #[arg(long, default_value_t = 0)]
    latency_secs: u64,
    /// Offer this rate (messages/s) for the latency measurement instead of half the measured
    /// maximum: to compare two builds at the same load.
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Move the load this many times, the shovel, the forwarder and Ponte in turn each round
    /// (each round with new message ids and, without `--history`, an empty data folder), and
    /// report each figure's median, with the range of the rate, the ratio and the CPU: on a
    /// shared machine one run moves by ±15%; the ratio of each round's pair moves less. With
    /// `--latency-secs`, latency is measured as many times after the drains (Ponte, the shovel
    /// and the forwarder in turn each round), with the range of each one's p99.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// The ponte binary to measure.
    #[arg(long, default_value = "target/release/ponte")]
    ponte: PathBuf,
    /// CSV file the row is appended to.
    #[arg(long, default_value = "target/bench/results.csv")]
    csv: PathBuf,
    /// Name of this row.
    #[arg(long, default_value = "base")]
    scenario: String,
    /// Where to write the generated configuration and latency samples.
    #[arg(long, default_value = "target/bench")]
    work: PathBuf,
    /// Keep the run's data folder (`<work>/config-<scenario>/data`: the crosswalk and the
    /// delivery log of every message moved) to look at; by default it is removed at the end
    /// (a million-message or history row leaves gigabytes).
    #[arg(long)]
    keep_data: bool,
}

/// The messages of a load.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Mix {
    /// 60% referrals (one copy), 40% benefit-status messages (two or three copies).
    Demo,
    /// Referrals only: one copy per valid message.
    Referrals,
}

/// How senders make message ids (the gateway's store looks each one up and indexes it).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Ids {
    /// Random UUIDs: index entries land at random places.
    V4,
    /// Time-ordered UUIDs, as a generator of RFC 9562 makes them: a batch of them counted
    /// within each millisecond.
    V7,
}

impl Ids {
    fn make(self) -> String {
        match self {
            Ids::V4 => uuid::Uuid::new_v4().to_string(),
            Ids::V7 => uuid::Uuid::now_v7().to_string(),
        }
    }
}

/// The AMQP properties of the load's messages.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Labels {
    /// Content type and persistence: all the wire contract asks of a sender.
    Bare,
    /// Also the envelope's `message_id` and `type`, as on Ponte's delivered copies.
    Labelled,
}

impl Labels {
    /// The properties of `body` published as part of the load.
    fn properties(self, body: &[u8]) -> BasicProperties {
        match self {
            Labels::Bare => bare_properties(),
            Labels::Labelled => {
                labelled_properties(&serde_json::from_slice(body).unwrap_or_default())
            }
        }
    }
}

/// Content type and persistence.
fn bare_properties() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}

/// Also `envelope`'s `message_id` and `type`, when it has both.
fn labelled_properties(envelope: &Value) -> BasicProperties {
    let label = |field: &str| envelope[field].as_str().map(|v| v.into());
    match (label("message_id"), label("type")) {
        (Some(id), Some(kind)) => bare_properties().with_message_id(id).with_type(kind),
        // Not an envelope (the load's invalid messages): nothing to label it with.
        _ => bare_properties(),
    }
}

/// An option's value as given on the command line (clap's name for it), and written in the CSV.
fn name_of(value: impl clap::ValueEnum) -> String {
    let value = value
        .to_possible_value()
        .expect("no value is hidden from the command line");
    value.get_name().to_string()
}

/// One row of results.
#[derive(Debug, Default)]
struct Row {
    shovel_rate: Option<f64>,
    ponte_rate: f64,
    cpu_us: f64,
    /// Ponte's CPU per message by thread: the runtime's workers, the store's writer and
    /// checkpoints, the delivery log's writer. The rest of `cpu_us` is the process's other
    /// threads (start-up, log lines, metrics).
    cpu_split: Split,
    peak_rss_mib: f64,
    startup_ms: f64,
    latency: Option<Latency>,
    /// The shovel's latency at the same offered rate.
    shovel_latency: Option<Latency>,
    /// The broker's own CPU per message while the shovel, then Ponte, moved the load.
    shovel_broker_us: Option<f64>,
    ponte_broker_us: f64,
    /// The no-op forwarder: its rate, the broker's and its own CPU per message.
    forwarder: Option<(f64, f64, f64)>,
    /// The no-op forwarder's latency at the same offered rate.
    forwarder_latency: Option<Latency>,
    /// Ponte's rate over the shovel's, the median of the rounds' pairs.
    ratio: Option<f64>,
    /// Over the rounds: how many, and the lowest and highest ratio, rate and CPU.
    spread: Spread,
}

/// Microseconds of CPU per message in each of Ponte's busy threads.
#[derive(Debug, Default, Clone, Copy)]
struct Split {
    workers: f64,
    store: f64,
    log: f64,
}

impl Split {
    /// The CPU seconds of `pid`'s threads by part, each thread counted by its name.
    fn of_threads(pid: u32) -> Result<Split> {
        let mut split = Split::default();
        for (name, cpu) in
            proc_stat::threads(&pid.to_string()).with_context(|| format!("/proc/{pid}/task"))?
        {
            match name.as_str() {
                // The flows' threads (`ponte-flows-N`) and the runtime's workers.
                n if n.starts_with(ponte::shards::THREAD) || n == "tokio-rt-worker" => {
                    split.workers += cpu
                }
                "ponte-store" | "ponte-checkpoin" => split.store += cpu,
                "ponte-journal" => split.log += cpu,
                _ => {}
            }
        }
        Ok(split)
    }

    /// What each part spent between `self` and `later`, per message of `count`, in µs.
    fn per_message(self, later: Split, count: usize) -> Split {
        let per = |before: f64, after: f64| (after - before) / count as f64 * 1e6;
        Split {
            workers: per(self.workers, later.workers),
            store: per(self.store, later.store),
            log: per(self.log, later.log),
        }
    }
}

/// The range of the figures that move most between rounds.
#[derive(Debug, Default)]
struct Spread {
    rounds: usize,
    ratio: Option<(f64, f64)>,
    ponte_rate: (f64, f64),
    cpu_us: (f64, f64),
}

impl Row {
    /// One row of the rounds' medians (the ratio: of each round's pair) and their ranges.
    fn of_rounds(rounds: &[Row]) -> Row {
        let all = |pick: fn(&Row) -> f64| -> Vec<f64> { rounds.iter().map(pick).collect() };
        let some = |pick: fn(&Row) -> Option<f64>| -> Option<Vec<f64>> {
            rounds.iter().map(pick).collect()
        };
        let ratios = some(|r| Some(r.ponte_rate / r.shovel_rate?));
        let forwarder = |pick: fn(&(f64, f64, f64)) -> f64| -> Option<f64> {
            let values: Option<Vec<f64>> = rounds
                .iter()
                .map(|r| r.forwarder.as_ref().map(pick))
                .collect();
            values.map(median)
        };
        Row {
            shovel_rate: some(|r| r.shovel_rate).map(median),
            ponte_rate: median(all(|r| r.ponte_rate)),
            cpu_us: median(all(|r| r.cpu_us)),
            cpu_split: Split {
                workers: median(all(|r| r.cpu_split.workers)),
                store: median(all(|r| r.cpu_split.store)),
                log: median(all(|r| r.cpu_split.log)),
            },
            peak_rss_mib: all(|r| r.peak_rss_mib).into_iter().fold(0.0, f64::max),
            startup_ms: median(all(|r| r.startup_ms)),
            shovel_broker_us: some(|r| r.shovel_broker_us).map(median),
            ponte_broker_us: median(all(|r| r.ponte_broker_us)),
            forwarder: forwarder(|f| f.0)
                .zip(forwarder(|f| f.1))
                .zip(forwarder(|f| f.2))
                .map(|((rate, broker), own)| (rate, broker, own)),
            ratio: ratios.clone().map(median),
            spread: Spread {
                rounds: rounds.len(),
                ratio: ratios.as_deref().map(range),
                ponte_rate: range(&all(|r| r.ponte_rate)),
                cpu_us: range(&all(|r| r.cpu_us)),
            },
            ..Row::default()
        }
    }
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The lowest and the highest value.
fn range(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.partners >= 4, "--partners must be at least 4");
    std::fs::create_dir_all(&args.work)?;
    let prefix = format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let config = write_config(&args, &prefix)?;
    let directory = Directory::load(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    // The environment overrides the generated configuration; the run's other queues follow
    // --queue-type, and queues of two types would fail the run half-way.
    anyhow::ensure!(
        directory.settings.broker.queue_type == args.queue_type,
        "PONTE_BROKER__QUEUE_TYPE says {}: give --queue-type {0} instead",
        directory.settings.broker.queue_type.as_str()
    );
    anyhow::ensure!(
        args.classic_queue_version.is_none() || args.queue_type == QueueType::Classic,
        "--classic-queue-version is for classic queues, not --queue-type {}",
        args.queue_type.as_str()
    );
    if args.history > 0 {
        let started = Instant::now();
        fill_history(&ponte::pipeline::store_dir(&directory), args.history)?;
        eprintln!(
            "  history: {} past messages written in {:.0} s",
            args.history,
            started.elapsed().as_secs_f64()
        );
    }
    let load = Load::generate(&directory, args.messages, args.size, args.mix, args.ids);
    eprintln!(
        "bench {}: {} messages ({} invalid, mix {}), {} partners, ~{} bytes, receipts {}, {} queues, {} load, {} ids, {} expected outputs",
        args.scenario,
        args.messages,
        load.invalid,
        name_of(args.mix),
        args.partners,
        load.mean_size(),
        args.receipts,
        match args.classic_queue_version {
            Some(version) => format!("classic v{version}"),
            None => args.queue_type.as_str().to_string(),
        },
        name_of(args.labels),
        name_of(args.ids),
        load.expected_outputs
    );
    check_csv_header(&args.csv)?;
    let connection = connect(&args.url).await?;
    // A policy on the broker (one an earlier experiment left, say) applies to the run's queues
    // too, and changes what is measured: the figures are then not the broker's defaults.
    let policies = ctl_output(
        &args.node,
        &["list_policies", "--quiet", "--no-table-headers"],
    )?;
    if !policies.trim().is_empty() {
        eprintln!("  the broker has policies, which apply to the run's queues they match:");
        eprint!("{policies}");
    }
    if let Some(version) = args.classic_queue_version {
        // Before any queue of the run is declared, so that each is made at this version.
        ctl(
            &args.node,
            &[
                "set_policy",
                "--apply-to",
                "queues",
                "--priority",
                "10",
                &queue_version_policy(&prefix),
                &run_queues_pattern(&args, &prefix),
                &format!("{{\"queue-version\":{version}}}"),
            ],
        )?;
    }
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let measured = tokio::select! {
        measured = measure(&args, &config, &directory, &connection, load) => measured,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = terminate.recv() => Err(anyhow::anyhow!("terminated")),
    };
    // Whatever happened: an interrupted or failed run's queues would otherwise stay on the
    // broker with their messages (and a shovel go on moving them), slowing every later run.
    cleanup(&args, &connection, &directory).await;
    if !args.keep_data {
        let _ = std::fs::remove_dir_all(ponte::pipeline::store_dir(&directory));
    }
    let (load, row) = measured?;
    report(&args, &load, &row)?;
    Ok(())
}

/// Moves the load `--rounds` times and measures latency; returns the last round's load and
/// the row to report.
async fn measure(
    args: &Args,
    config: &Path,
    directory: &Directory,
    connection: &Connection,
    mut load: Load,
) -> Result<(Load, Row)> {
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        // Each round sends messages of its own (the store remembers those it delivered) and,
        // unless it is meant to hold a history, starts on an empty data folder as the first.
        if round > 1 {
            eprintln!("  round {round} of {}", args.rounds);
            if args.history == 0 {
                let _ = std::fs::remove_dir_all(ponte::pipeline::store_dir(directory));
            }
            load = Load::generate(directory, args.messages, args.size, args.mix, args.ids);
        }
        let mut row = Row::default();
        if !args.no_shovel {
            let (rate, broker) = shovel(args, connection, &load).await?;
            row.shovel_rate = Some(rate);
            row.shovel_broker_us = Some(broker * 1e6);
        }
        if args.forwarder {
            row.forwarder = Some(forwarder(args, connection, directory, &load).await?);
        }
        drain_with_ponte(args, config, directory, connection, &load, &mut row).await?;
        rounds.push(row);
    }
    let mut row = Row::of_rounds(&rounds);
    if args.rounds > 1 {
        let s = &row.spread;
        eprintln!(
            "  median of {} rounds: ponte {:.0} msg/s ({:.0}–{:.0}), {:.1} µs CPU/msg ({:.1}–{:.1}){}",
            s.rounds,
            row.ponte_rate,
            s.ponte_rate.0,
            s.ponte_rate.1,
            row.cpu_us,
            s.cpu_us.0,
            s.cpu_us.1,
            match (row.ratio, s.ratio) {
                (Some(ratio), Some((lo, hi))) => format!(", ratio {ratio:.3} ({lo:.3}–{hi:.3})"),
                _ => String::new(),
            }
        );
    }
    if args.latency_secs > 0 {
        // The same messages, at the same rate, through Ponte, then the shovel, then the
        // forwarder; each round in turn, so that a slow minute of the machine falls on one
        // round of each rather than on all of one.
        let rate = args.latency_rate.unwrap_or(row.ponte_rate / 2.0);
        let (mut ponte, mut shovel, mut forwarder) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=args.rounds {
            // New message ids each round: the store remembers those it delivered.
            let offered = Load::generate(
                directory,
                (rate * args.latency_secs as f64) as usize,
                args.size,
                args.mix,
                args.ids,
            );
            let suffix = match args.rounds {
                1 => String::new(),
                _ => format!("-round{round}"),
            };
            // The drain's purged outputs leave the broker work for some seconds (its queue
            // index and message store tidy up behind them); time Ponte on a broker at rest,
            // as the shovel is timed after it.
            broker_at_rest(&args.node).await?;
            ponte.push(latency(args, config, directory, &offered, rate, &suffix).await?);
            if !args.no_shovel {
                let mover = Mover::Shovel;
                shovel.push(side_latency(args, connection, &offered, rate, mover, &suffix).await?);
            }
            if args.forwarder {
                let mover = Mover::Forwarder;
                forwarder
                    .push(side_latency(args, connection, &offered, rate, mover, &suffix).await?);
            }
        }
        row.latency = Latency::of_rounds(ponte);
        row.shovel_latency = Latency::of_rounds(shovel);
        row.forwarder_latency = Latency::of_rounds(forwarder);
        if args.rounds > 1 {
            let line = |name: &str, l: &Option<Latency>| {
                l.as_ref().map_or(String::new(), |l| {
                    format!(
                        ", {name} p99 {:.2} ms ({:.2}–{:.2})",
                        l.p99, l.p99_range.0, l.p99_range.1
                    )
                })
            };
            eprintln!(
                "  latency, median of {} rounds{}{}{}",
                args.rounds,
                line("Ponte", &row.latency),
                line("shovel", &row.shovel_latency),
                line("forwarder", &row.forwarder_latency),
            );
        }
        let mut series = vec![("Ponte", row.latency.as_ref().unwrap(), "#c0392b")];
        if let Some(shovel) = &row.shovel_latency {
            series.push(("shovel", shovel, "#2471a3"));
        }
        if let Some(forwarder) = &row.forwarder_latency {
            series.push(("no-op forwarder", forwarder, "#7d8c3a"));
        }
        let path = args.work.join(format!("latency-{}.svg", args.scenario));
        std::fs::write(&path, percentile_plot(&series, rate))?;
        eprintln!("  latency by percentile: {}", path.display());
    }
    Ok((load, row))
}

/// Fills the data folder with `n` past messages, the oldest a little younger than the retention
/// (so pruning at start finds little): one crosswalk record and one delivery log record each,
/// with random message ids, as the gateway would have left them. The log's hashes are
/// placeholders (`ponte log verify` would refuse them); the gateway only chains on from the
/// last one. Both are indexed as the gateway leaves them.
fn fill_history(data: &Path, n: usize) -> Result<()> {
    // The gateway's own layout, created by opening both.
    drop(ponte::store::SqliteStore::open(data)?);
    drop(ponte::journal::Journal::open(data).map_err(anyhow::Error::msg)?);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let span = 390 * 24 * 3600;
    let senders = ["inps", "cpi-modena", "cpi-bologna", "comune-modena"];
    let recipients = [
        "cpi-modena,osservatorio-er",
        "inps",
        "inps",
        "inps,cpi-modena",
    ];
    let bulk = |file: &str| -> Result<rusqlite::Connection> {
        let connection = rusqlite::Connection::open(data.join(file))?;
        connection
            .execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -1000000; BEGIN;")?;
        Ok(connection)
    };
    let store = bulk("ponte.db")?;
    let log = bulk("log.db")?;
    {
        let mut message = store.prepare(
            "INSERT INTO message (key, message_id, sender, reference, recipients, recorded_at,
                                  delivered, complete, delivered_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?5, 1, ?6)",
        )?;
        let mut event = log.prepare(
            "INSERT INTO event (seq, at_ms, step, message_id, correlation_id, sender, recipients,
                                type, code, latency_ms, detail, prev_hash, hash)
             VALUES (?1, ?2, 'delivered', ?3, ?4, ?5, ?6, 'referral', 'delivered', 12.5, '',
                     ?7, ?7)",
        )?;
        let placeholder = "0".repeat(64);
        let mut previous = String::new();
        for i in 0..n {
            let id = uuid::Uuid::new_v4().to_string();
            let at = now.as_secs() as i64 - span + (span * i as i64) / n as i64;
            let (sender, to) = (senders[i % 4], recipients[i % 4]);
            message.execute(rusqlite::params![
                ponte::store::message_key(&id),
                id,
                sender,
                format!("REF-{i}"),
                to,
                at
            ])?;
            // A third of them answer the message before.
            let correlation = if i % 3 == 0 { previous.as_str() } else { "" };
            event.execute(rusqlite::params![
                i as i64 + 1,
                at * 1000,
                id,
                correlation,
                sender,
                to,
                placeholder
            ])?;
            previous = id;
        }
    }
    store.execute_batch("COMMIT; PRAGMA wal_checkpoint(TRUNCATE);")?;
    log.execute_batch("COMMIT; PRAGMA wal_checkpoint(TRUNCATE);")?;
    drop((store, log));
    // Opening both again indexes the records written above (the store's keys, the log's ids
    // in parts), as the gateway would have while writing them: the row's start-up is then not
    // an upgrade's.
    drop(ponte::store::SqliteStore::open(data)?);
    drop(ponte::journal::Journal::open(data).map_err(anyhow::Error::msg)?);
    Ok(())
}

/// Writes a configuration with the demo institutions plus generated employment centres.
fn write_config(args: &Args, prefix: &str) -> Result<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = args.work.join(format!("config-{}", args.scenario));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("partners"))?;
    // Large-message rows need room in the free-text field; everything else is the real schema.
    let schemas = dir.join("schemas");
    copy_dir(&repo.join("schemas"), &schemas)?;
    let referral = schemas.join("referral/1.0.json");
    let mut schema: Value = serde_json::from_str(&std::fs::read_to_string(&referral)?)?;
    schema["properties"]["payload"]["properties"]["notes"]["maxLength"] =
        json!(args.size.max(2000) * 2);
    std::fs::write(&referral, serde_json::to_vec_pretty(&schema)?)?;
    // `broker.prefetch` and the rest at Ponte's defaults, as a deployment that sets none has them.
    std::fs::write(
        dir.join("ponte.toml"),
        format!(
            "[broker]\nprefix = \"{prefix}\"\nqueue_type = \"{}\"\n\n[limits]\nmax_message_bytes = {}\n\n[log]\nlevel = \"warn,ponte::gateway=info\"\n\n[paths]\nschemas = \"schemas\"\n\n[store]\ndir = \"data\"\n",
            args.queue_type.as_str(),
            (args.size * 4).max(1024 * 1024)
        ),
    )?;
    let receipts = if args.receipts == "on" {
        "all"
    } else {
        "rejections"
    };
    for entry in std::fs::read_dir(repo.join("config/partners"))? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        let mut text: String = text
            .lines()
            .filter(|l| !l.starts_with("receipts"))
            .map(|l| {
                // The benchmark's comune takes the codice fiscale: its registry numbers would
                // need a crosswalk filled for a hundred thousand generated people.
                if l == "identifier_schemes = [\"local\"]" {
                    "identifier_schemes = [\"it.cf\"]\n"
                } else {
                    l
                }
                .to_string()
                    + "\n"
            })
            .collect();
        text = text.replacen("\n", &format!("\nreceipts = \"{receipts}\"\n"), 1);
        if let Some(prefetch) = args.inps_prefetch
            && path.file_stem().is_some_and(|stem| stem == "inps")
        {
            text = text.replacen("\n", &format!("\nprefetch = {prefetch}\n"), 1);
        }
        std::fs::write(dir.join("partners").join(path.file_name().unwrap()), text)?;
    }
    let mut cpis = vec!["cpi-modena".to_string(), "cpi-bologna".to_string()];
    let mut offices = std::fs::read_to_string(repo.join("config/tables/offices.csv"))?;
    for i in 1..=args.partners - 4 {
        let id = bench_cpi(i);
        std::fs::write(
            dir.join("partners").join(format!("{id}.toml")),
            format!(
                "id = \"{id}\"\nname = \"Benchmark employment centre {i}\"\nkind = \"cpi\"\nreceipts = \"{receipts}\"\nidentifier_schemes = [\"it.cf\"]\n"
            ),
        )?;
        let municipality = bench_municipality(i);
        offices.push_str(&format!(
            "inps,3900,{municipality}\n{id},CPI-B-{i:04},{municipality}\n"
        ));
        cpis.push(id);
    }
    std::fs::create_dir_all(dir.join("tables"))?;
    std::fs::write(dir.join("tables/offices.csv"), offices)?;
    std::fs::copy(
        repo.join("config/tables/codes.csv"),
        dir.join("tables/codes.csv"),
    )?;
    let demo_cpis = "[\"cpi-modena\", \"cpi-bologna\"]";
    let all_cpis = format!("{cpis:?}");
    for file in ["routes.toml", "authorization.toml"] {
        let text =
            std::fs::read_to_string(repo.join("config").join(file))?.replace(demo_cpis, &all_cpis);
        std::fs::write(dir.join(file), text)?;
    }
    Ok(dir)
}

fn bench_cpi(i: usize) -> String {
    format!("cpi-bench-{i:04}")
}

fn bench_municipality(i: usize) -> String {
    format!("09{i:04}")
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// The generated messages, by the partner that sends them.
#[derive(Default)]
struct Load {
    by_sender: Vec<(String, Vec<Vec<u8>>)>,
    /// For each sender of `by_sender`, where Ponte publishes each of its messages: the places in
    /// `outputs` of its recipients' queues, or of the sender's rejected and receipt queues.
    routes: Vec<Vec<Route>>,
    /// The queues Ponte publishes the load to.
    outputs: Outputs,
    invalid: usize,
    expected_outputs: usize,
    bytes: usize,
    count: usize,
    /// How many of the messages are referrals (the ones that carry the padding).
    referrals: usize,
}

impl Load {
    /// `count` messages whose mean size is about `size` bytes. Only referrals have a free-text
    /// field to pad (60% of the demo mix, all of the referrals mix): a first pass measures what
    /// the other messages weigh, and the same messages (the generator is seeded) are made again
    /// with each referral padded to make up the difference.
    fn generate(directory: &Directory, count: usize, size: usize, mix: Mix, ids: Ids) -> Load {
        let trial = Self::padded(directory, count, size, mix, ids);
        let referrals = trial.referrals.max(1);
        let missing = (size * count) as i64 - trial.bytes as i64;
        let referral_bytes = (size as i64 + missing / referrals as i64).max(0) as usize;
        Self::padded(directory, count, referral_bytes, mix, ids)
    }

    /// `count` messages, each referral padded to about `referral_bytes`.
    fn padded(
        directory: &Directory,
        count: usize,
        referral_bytes: usize,
        mix: Mix,
        ids: Ids,
    ) -> Load {
        let tables = directory.tables.load();
        let mut cpis: Vec<(&str, &str, &str)> = directory
            .partners
            .values()
            .filter(|p| p.kind == "cpi")
            .flat_map(|p| {
                tables
                    .offices_of(&p.id)
                    .map(move |(m, o)| (p.id.as_str(), o, m))
            })
            .collect();
        // Offices come from a hash map: sort them so that every run sends the same load.
        cpis.sort();
        let mut by_sender: HashMap<String, (Vec<Vec<u8>>, Vec<Route>)> = HashMap::new();
        let mut outputs = Outputs::default();
        let (mut invalid, mut expected, mut bytes, mut referrals) = (0, 0, 0, 0);
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for i in 0..count {
            let (cpi, office, municipality) = cpis[(next() % cpis.len() as u64) as usize];
            let roll = next() % 100;
            let (sender, mut message, copies) = if roll < 60 || mix == Mix::Referrals {
                let mut m = referral(ids, cpi, office, municipality);
                let base = serde_json::to_vec(&m).unwrap().len();
                m["payload"]["notes"] =
                    json!("n".repeat(referral_bytes.saturating_sub(base + 12).max(1)));
                referrals += 1;
                (cpi.to_string(), m, 1)
            } else {
                let adi = roll >= 88;
                let m = benefit_status(ids, if adi { "adi" } else { "naspi" }, municipality);
                // The competent CPI, the observatory, and for inclusion benefits the comune.
                let comune = adi && tables.competent("comune", municipality).is_some();
                ("inps".to_string(), m, if comune { 3 } else { 2 })
            };
            // 5% invalid, in varied ways (below).
            let rejected = i % 20 == 7;
            // Where Ponte publishes it: to each recipient, or, once it is made invalid below,
            // its original parked and a receipt to the sender.
            let route: Route = if rejected {
                ["rejected", "receipts"]
                    .map(|kind| outputs.place(kind, &sender))
                    .into()
            } else {
                let from = &directory.partners[&sender];
                let kind = message["type"].as_str().unwrap_or_default();
                let tree = ponte::envelope::Node::from(&message);
                let to = ponte::route::recipients(&tree, kind, from, directory, &tables)
                    .expect("the load's valid messages have recipients");
                to.iter().map(|p| outputs.place("out", &p.id)).collect()
            };
            let body = if rejected {
                invalid += 1;
                expected += 1;
                match (i / 20) % 6 {
                    0 => {
                        message["subject"]["identifiers"][0]["value"] = json!("RSSMRA85T10A562T");
                        serde_json::to_vec(&message).unwrap()
                    }
                    1 => b"this is not JSON".to_vec(),
                    2 => {
                        message["sender"] = json!("someone-else");
                        serde_json::to_vec(&message).unwrap()
                    }
                    3 => {
                        message["type"] = json!("pension-claim");
                        serde_json::to_vec(&message).unwrap()
                    }
                    4 => {
                        message["payload"].as_object_mut().unwrap().remove("office");
                        serde_json::to_vec(&message).unwrap()
                    }
                    _ => {
                        let mut b = serde_json::to_vec(&message).unwrap();
                        let at = b.len() / 2;
                        b[at] = 0xff;
                        b
                    }
                }
            } else {
                expected += copies;
                serde_json::to_vec(&message).unwrap()
            };
            bytes += body.len();
            let of_sender = by_sender.entry(sender).or_default();
            of_sender.0.push(body);
            of_sender.1.push(route);
        }
        let mut by_sender: Vec<_> = by_sender.into_iter().collect();
        by_sender.sort_by(|a, b| a.0.cmp(&b.0));
        let (by_sender, routes) = by_sender
            .into_iter()
            .map(|(sender, (bodies, routes))| ((sender, bodies), routes))
            .unzip();
        Load {
            by_sender,
            routes,
            outputs,
            invalid,
            expected_outputs: expected,
            bytes,
            count,
            referrals,
        }
    }

    fn mean_size(&self) -> usize {
        self.bytes / self.count.max(1)
    }
}

/// The queues one message goes out to, each as its place in [`Load::outputs`].
type Route = Box<[u16]>;

/// The queues a load's messages go out to, in the order first met, each as [`output_label`]
/// names it.
#[derive(Default, Clone)]
struct Outputs {
    labels: Vec<String>,
    places: HashMap<String, u16>,
}

impl Outputs {
    /// The place of `partner`'s queue of this `kind`, numbered when first met.
    fn place(&mut self, kind: &str, partner: &str) -> u16 {
        let label = output_label(kind, partner);
        if let Some(&place) = self.places.get(&label) {
            return place;
        }
        let place = u16::try_from(self.labels.len()).expect("fewer than 65,536 output queues");
        self.labels.push(label.clone());
        self.places.insert(label, place);
        place
    }
}

/// How a queue Ponte publishes to is named among the forwarder's destinations: its kind
/// (`out`, `rejected`, `receipts`) and its partner, as in Ponte's own queue names.
fn output_label(kind: &str, partner: &str) -> String {
    format!("{kind}.{partner}")
}

fn referral(ids: Ids, sender: &str, office: &str, municipality: &str) -> Value {
    json!({
        "message_id": ids.make(),
        "type": "referral",
        "version": "1.0",
        "sender": sender,
        "sent_at": "2026-11-23T09:15:00+01:00",
        "subject": {"identifiers": [{"scheme": "it.cf", "value": "RSSMRA85T10A562S"}]},
        "payload": {
            "referral_id": "REF-2026-000123",
            "reason": "non-compliance",
            "office": office,
            "municipality": municipality,
            "legal_basis": "D.Lgs. 150/2015 art. 21",
            "consent": {"given": true, "reference": "CONS-2026-77"},
            "urgency": "normal",
            "requested_services": ["orientamento", "formazione"],
            "notes": ""
        }
    })
}

fn benefit_status(ids: Ids, benefit: &str, municipality: &str) -> Value {
    json!({
        "message_id": ids.make(),
        "type": "benefit-status",
        "version": "1.0",
        "sender": "inps",
        "sent_at": "2026-11-23T10:02:00+01:00",
        "subject": {"identifiers": [{"scheme": "it.cf", "value": "BNCGVN70A41F257X"}]},
        "payload": {
            "benefit": benefit,
            "application_id": "APP-2026-004471",
            "status": "suspended",
            "effective_date": "2026-12-01",
            "office": "3600",
            "municipality": municipality,
            "reason_code": "NC-01",
            "amount": {"value": 512.5, "currency": "EUR"}
        }
    })
}

async fn connect(url: &str) -> Result<Connection> {
    Ok(Connection::connect(url, ConnectionProperties::default()).await?)
}

async fn declare(args: &Args, channel: &Channel, queue: &str) -> Result<()> {
    ponte::broker::declare_queue(channel, queue, args.queue_type, true).await?;
    Ok(())
}

/// Publishes persistent messages with confirms pipelined in windows.
async fn preload(
    args: &Args,
    connection: &Connection,
    queue: &str,
    bodies: &[Vec<u8>],
) -> Result<()> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    declare(args, &channel, queue).await?;
    let mut pending = std::collections::VecDeque::new();
    for body in bodies {
        let properties = args.labels.properties(body);
        pending.push_back(
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await?,
        );
        if pending.len() >= 1000 {
            while pending.len() > 500 {
                pending.pop_front().unwrap().await?;
            }
        }
    }
    for c in pending {
        c.await?;
    }
    channel.close(200, "preloaded".into()).await?;
    Ok(())
}

fn ctl(node: &str, args: &[&str]) -> Result<()> {
    run_ctl(node, args, Stdio::inherit())
}

/// The same, for a command that may fail as expected (its complaint is not printed).
fn quiet_ctl(node: &str, args: &[&str]) -> Result<()> {
    run_ctl(node, args, Stdio::null())
}

fn run_ctl(node: &str, args: &[&str], stderr: Stdio) -> Result<()> {
    let status = ctl_command(node, args)
        .stdout(Stdio::null())
        .stderr(stderr)
        .status()?;
    if !status.success() {
        bail!("rabbitmqctl {args:?} failed");
    }
    Ok(())
}

/// What `rabbitmqctl args` prints.
fn ctl_output(node: &str, args: &[&str]) -> Result<String> {
    let output = ctl_command(node, args).stderr(Stdio::inherit()).output()?;
    if !output.status.success() {
        bail!("rabbitmqctl {args:?} failed");
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn ctl_command(node: &str, args: &[&str]) -> Command {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let node: Vec<&str> = node.split(' ').collect();
    let mut command = Command::new(repo.join("scripts/broker.sh"));
    command.arg("ctl").args(&node).args(args);
    command
}

/// A drain measured in its steady state, between 10 % and 90 % of its progress (start-up and
/// the tail left out).
struct Steady {
    /// Units of progress a second.
    rate: f64,
    /// The broker's CPU seconds per unit of progress.
    broker: f64,
    /// The cores the process that moves the load (the gateway, or the forwarder's) kept busy;
    /// with the broker's, what the drain takes of the machine.
    mover_cores: f64,
}

impl Steady {
    /// The cores the broker and the mover kept busy together.
    fn cores(&self) -> f64 {
        self.rate * self.broker + self.mover_cores
    }
}

/// The steady-state rate at which `progress` reaches `total`, the broker's CPU seconds per unit
/// of progress over that same window, and the cores process `mover` (none for the shovel,
/// which runs in the broker) kept busy meanwhile.
async fn steady_rate(
    node: &str,
    mover: Option<u32>,
    total: usize,
    limit: Duration,
    mut progress: impl AsyncFnMut() -> Result<usize>,
) -> Result<Steady> {
    let start = Instant::now();
    let (mut t10, mut t90) = (None, None);
    let (lo, hi) = (total / 10, total * 9 / 10);
    let cpu = || -> Result<(f64, f64)> {
        let moving = mover.map_or(Ok(0.0), |pid| usage(pid).map(|(cpu, _)| cpu))?;
        Ok((broker_cpu(node)?, moving))
    };
    let mut last = (Duration::ZERO, 0, cpu()?);
    loop {
        let done = progress().await?;
        let now = start.elapsed();
        let sample = (now, done, cpu()?);
        if t10.is_none() && done >= lo {
            // A small load can pass both marks between two polls: the window then starts at
            // the poll before (at worst the start), or it would be empty and the rate NaN.
            t10 = Some(if done >= hi { last } else { sample });
        }
        if done >= hi && t90.is_none() {
            t90 = Some(sample);
        }
        last = sample;
        if done >= total {
            break;
        }
        if now > limit {
            bail!("only {done} of {total} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ((a, da, ca), (b, db, cb)) = (t10.unwrap(), t90.unwrap());
    let span = (b - a).as_secs_f64();
    let moved = (db - da) as f64;
    Ok(if span > 0.0 && moved > 0.0 {
        Steady {
            rate: moved / span,
            broker: (cb.0 - ca.0) / moved,
            mover_cores: (cb.1 - ca.1) / span,
        }
    } else {
        Steady {
            rate: f64::NAN,
            broker: f64::NAN,
            mover_cores: f64::NAN,
        }
    })
}

/// The shovel's steady rate and the broker's CPU seconds per message meanwhile.
async fn shovel(args: &Args, connection: &Connection, load: &Load) -> Result<(f64, f64)> {
    if args.shovel_per_sender {
        return shovels_per_sender(args, connection, load).await;
    }
    let (src, dst) = side_queues(args, connection, load, "shovel").await?;
    let [name, _] = shovel_names(args);
    set_shovel(args, &name, &src, &dst)?;
    let rate = drained(args, connection, slice::from_ref(&dst), load.count, None).await;
    ctl(&args.node, &["clear_parameter", "shovel", &name])?;
    delete_queues(args, &[&src, &dst]).await?;
    let steady = rate?;
    let (rate, broker) = (steady.rate, steady.broker);
    eprintln!(
        "  shovel: {rate:.0} msg/s (broker {:.1} µs CPU/msg, {:.2} cores)",
        broker * 1e6,
        steady.cores()
    );
    Ok((rate, broker))
}

/// The source queue of `mover` for the `i`th sender: the shovel's with `--shovel-per-sender`,
/// the forwarder's in a latency run.
fn sender_source(args: &Args, mover: &str, i: impl std::fmt::Display) -> String {
    format!("bench-{mover}-{}.src.{i}", args.scenario)
}

/// The same as [`shovel`], from one queue per sender, a shovel each, into one destination.
/// The shovels are set and cleared in one `rabbitmqctl eval` each: a thousand
/// `set_parameter` calls would take minutes.
async fn shovels_per_sender(
    args: &Args,
    connection: &Connection,
    load: &Load,
) -> Result<(f64, f64)> {
    let (_, dst) = side_names(args, "shovel");
    let sources = sender_queues(args, connection, load, "shovel", slice::from_ref(&dst)).await?;
    let mut all: Vec<&str> = sources.iter().map(String::as_str).collect();
    all.push(&dst);
    let definition = shovel_definition(&sender_source(args, "shovel", "@@"), &dst);
    let set = format!(
        "T = <<\"{}\">>, [ok = rabbit_runtime_parameters:parse_set(<<\"/\">>, <<\"shovel\">>, \
         <<\"{}\", (integer_to_binary(I))/binary>>, \
         binary:replace(T, <<\"@@\">>, integer_to_binary(I), [global]), <<\"ponte-bench\">>) \
         || I <- lists:seq(0, {})], ok.",
        definition
            .to_string()
            .replace('\\', "\\\\")
            .replace('"', "\\\""),
        sender_shovel_prefix(args),
        sources.len() - 1
    );
    ctl(&args.node, &["eval", &set])?;
    let rate = drained(args, connection, slice::from_ref(&dst), load.count, None).await;
    clear_sender_shovels(args)?;
    delete_queues(args, &all).await?;
    let steady = rate?;
    let (rate, broker) = (steady.rate, steady.broker);
    eprintln!(
        "  shovel ({} queues, a shovel each): {rate:.0} msg/s (broker {:.1} µs CPU/msg, {:.2} cores)",
        sources.len(),
        broker * 1e6,
        steady.cores()
    );
    Ok((rate, broker))
}

/// A source queue per sender holding that sender's messages, for `mover`, and `dsts` empty.
async fn sender_queues(
    args: &Args,
    connection: &Connection,
    load: &Load,
    mover: &str,
    dsts: &[String],
) -> Result<Vec<String>> {
    let sources: Vec<String> = (0..load.by_sender.len())
        .map(|i| sender_source(args, mover, i))
        .collect();
    let all: Vec<&str> = sources.iter().chain(dsts).map(String::as_str).collect();
    delete_queues(args, &all).await?;
    let channel = connection.create_channel().await?;
    for queue in dsts {
        declare(args, &channel, queue).await?;
    }
    for (source, (_, bodies)) in sources.iter().zip(&load.by_sender) {
        preload(args, connection, source, bodies).await?;
    }
    Ok(sources)
}

/// What the names of the shovels of `--shovel-per-sender` begin with.
fn sender_shovel_prefix(args: &Args) -> String {
    format!("bench-{}.sender.", args.scenario)
}

/// Clears every shovel of `--shovel-per-sender` (those a failed run left too). Tried three
/// times: once in a few runs with a thousand shovels the `eval` failed, and with it the row.
fn clear_sender_shovels(args: &Args) -> Result<()> {
    let prefix = sender_shovel_prefix(args);
    let clear = format!(
        "[rabbit_runtime_parameters:clear(<<\"/\">>, <<\"shovel\">>, N, <<\"ponte-bench\">>) \
         || P <- rabbit_runtime_parameters:list(<<\"/\">>, <<\"shovel\">>), \
         N <- [proplists:get_value(name, P)], binary:match(N, <<\"{prefix}\">>) =:= {{0, {}}}], ok.",
        prefix.len()
    );
    let mut attempt = 1;
    loop {
        match ctl(&args.node, &["eval", &clear]) {
            Err(error) if attempt < 3 => eprintln!("  clearing the shovels: {error}; again"),
            cleared => return cleared,
        }
        attempt += 1;
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// A dynamic shovel's definition: `src` to `dst` on this broker, acknowledging on confirm.
fn shovel_definition(src: &str, dst: &str) -> Value {
    json!({
        "src-protocol": "amqp091", "src-uri": "amqp://", "src-queue": src,
        "dest-protocol": "amqp091", "dest-uri": "amqp://", "dest-queue": dst,
        "ack-mode": "on-confirm", "src-delete-after": "never"
    })
}

/// Starts a dynamic shovel `name` moving `src` to `dst`, acknowledging on confirm.
fn set_shovel(args: &Args, name: &str, src: &str, dst: &str) -> Result<()> {
    let definition = shovel_definition(src, dst);
    ctl(
        &args.node,
        &["set_parameter", "shovel", name, &definition.to_string()],
    )
}

/// The no-op forwarder's steady rate, the broker's CPU seconds per message and its own.
async fn forwarder(
    args: &Args,
    connection: &Connection,
    directory: &Directory,
    load: &Load,
) -> Result<(f64, f64, f64)> {
    // Every message once, from one queue to one queue as the shovel moves them; or, with
    // `--fan-out`, as Ponte moves them: from each sender's queue, a consumer each, each
    // message published to a queue for each queue Ponte publishes it to.
    let (sources, dsts, published) = match args.fan_out {
        false => {
            let (src, dst) = side_queues(args, connection, load, "forwarder").await?;
            (vec![(src, None)], vec![dst], load.count)
        }
        true => fan_out_queues(args, connection, load).await?,
    };
    // With `--fan-out`, the senders' forwarders share connections as Ponte's flows do, and
    // start with the windows Ponte's flows would start with.
    let (groups, windows) = match args.fan_out {
        true => (
            Link::groups(args, sources.len()).await?,
            starting_windows(directory, load),
        ),
        false => (Vec::new(), Vec::new()),
    };
    let pace = Pace::of(args);
    let forwarding: Vec<Forwarding> = (sources.iter().enumerate())
        .map(|(i, (source, plan))| {
            let link = groups.get(i / ponte::gateway::PARTNERS_PER_CONNECTION);
            let link = link.cloned().unwrap_or_else(|| Link::Own(args.url.clone()));
            let window = windows.get(i).copied();
            let window = window.unwrap_or(ponte::settings::DEFAULT_PREFETCH);
            Forwarding::start(link, source, &dsts, plan.clone(), (window, pace.clone()))
        })
        .collect();
    let (cpu_before, _) = usage(std::process::id())?;
    let rate = drained(args, connection, &dsts, published, Some(std::process::id())).await;
    let (cpu_after, _) = usage(std::process::id())?;
    let stopped = Forwarding::stop_all(forwarding).await;
    for group in &groups {
        group.close().await;
    }
    stopped?;
    let side: Vec<&str> = sources
        .iter()
        .map(|(q, _)| q)
        .chain(&dsts)
        .map(String::as_str)
        .collect();
    delete_queues(args, &side).await?;
    // Counted at the queue, per message published; reported per message taken, as Ponte's.
    let steady = rate?;
    let (rate, broker) = (steady.rate, steady.broker);
    let per_taken = published as f64 / load.count as f64;
    let (rate, broker) = (rate / per_taken, broker * per_taken);
    // The benchmark's own polling runs in this process too: a small overestimate.
    let own = (cpu_after - cpu_before) / load.count as f64;
    let fanned = match args.fan_out {
        true => format!(
            ", {per_taken:.2} published per message over {} queues, windows of {}-{}",
            dsts.len(),
            windows.iter().min().unwrap_or(&0),
            windows.iter().max().unwrap_or(&0)
        ),
        false => String::new(),
    };
    let busy = pace.described();
    eprintln!(
        "  no-op forwarder: {rate:.0} msg/s (broker {:.1} µs CPU/msg, forwarder {:.1}{busy}{fanned}; {:.2} cores)",
        broker * 1e6,
        own * 1e6,
        steady.cores()
    );
    Ok((rate, broker, own))
}

/// For each sender of `load`, the window its flow in Ponte would start with: `broker.prefetch`,
/// or its own `prefetch`, or, where the partners share `broker.max_in_flight`, a share given
/// where the backlog is. Ponte's windows then follow the traffic within that total; a
/// forwarder's stays as it starts.
fn starting_windows(directory: &Directory, load: &Load) -> Vec<u16> {
    let partners: Vec<&ponte::partner::Partner> = directory.partners.values().collect();
    let broker = &directory.settings.broker;
    let own: Vec<Option<u16>> = partners.iter().map(|p| p.prefetch).collect();
    let pool = broker.pool(&own);
    let backlog = |partner: &ponte::partner::Partner| {
        let sent = load
            .by_sender
            .iter()
            .find(|(sender, _)| *sender == partner.id);
        sent.map_or(0, |(_, bodies)| bodies.len() as u32)
    };
    let following = ponte::prefetch::following(&partners, pool.as_ref());
    let backlogs: Vec<u32> = following.into_iter().map(backlog).collect();
    let windows = ponte::prefetch::starting(broker, &partners, pool.as_ref(), &backlogs);
    (load.by_sender.iter())
        .map(|(sender, _)| windows.get(sender.as_str()).copied().unwrap_or(1))
        .collect()
}

/// The connections a forwarder consumes and publishes on: one of its own for both, or a pair
/// (consuming, publishing) it shares with the forwarders of up to
/// [`ponte::gateway::PARTNERS_PER_CONNECTION`] senders, as Ponte's flows share theirs.
#[derive(Clone)]
enum Link {
    Own(String),
    Shared(Arc<Connection>, Arc<Connection>),
}

impl Link {
    /// The shared pairs for `senders` forwarders, one per group of senders.
    async fn groups(args: &Args, senders: usize) -> Result<Vec<Link>> {
        let mut groups = Vec::new();
        for _ in 0..senders.div_ceil(ponte::gateway::PARTNERS_PER_CONNECTION) {
            let consuming = Arc::new(connect(&args.url).await?);
            let publishing = Arc::new(connect(&args.url).await?);
            groups.push(Link::Shared(consuming, publishing));
        }
        Ok(groups)
    }

    /// The consuming and the publishing connection, and the connection to close once the
    /// forwarder stops: its own, not a shared pair, which [`Link::close`] closes.
    async fn open(self) -> Result<(Arc<Connection>, Arc<Connection>, Option<Arc<Connection>>)> {
        Ok(match self {
            Link::Own(url) => {
                let own = Arc::new(connect(&url).await?);
                (own.clone(), own.clone(), Some(own))
            }
            Link::Shared(consuming, publishing) => (consuming, publishing, None),
        })
    }

    /// Closes a shared pair, once every forwarder on it has stopped.
    async fn close(&self) {
        if let Link::Shared(consuming, publishing) = self {
            close(consuming).await;
            close(publishing).await;
        }
    }
}

/// The no-op forwarder running between two queues.
struct Forwarding {
    task: tokio::task::JoinHandle<Result<()>>,
    stop: tokio_util::sync::CancellationToken,
}

impl Forwarding {
    /// Forwards from `src` with `window` messages unacknowledged at most, at `pace`.
    fn start(
        link: Link,
        src: &str,
        dsts: &[String],
        plan: Plan,
        (window, pace): (u16, Pace),
    ) -> Forwarding {
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(forward(
            link,
            src.to_string(),
            dsts.to_vec(),
            (plan, window, pace),
            stop.clone(),
        ));
        Forwarding { task, stop }
    }

    /// Stops every one of `all` before the first failure is reported, so that none keeps
    /// consuming into the next run.
    async fn stop_all(all: Vec<Forwarding>) -> Result<()> {
        let mut stopped = Ok(());
        for forwarding in all {
            let this = forwarding.stop().await;
            if stopped.is_ok() {
                stopped = this;
            }
        }
        stopped
    }

    async fn stop(self) -> Result<()> {
        self.stop.cancel();
        self.task.await?
    }
}

/// Where the forwarder publishes each message it takes, by its place in its source queue: to
/// its one destination (`None`), or with `--fan-out` to the destinations standing for the
/// queues Ponte publishes that message's outputs to.
type Plan = Option<Arc<[Route]>>;

/// The destinations of the `n`th message taken (from 0) under `plan`: places in the list of
/// destinations, the first one when the plan has none for it.
fn planned(plan: &Plan, n: usize) -> &[u16] {
    const FIRST: &[u16] = &[0];
    match plan.as_ref().and_then(|routes| routes.get(n)) {
        Some(route) if !route.is_empty() => route,
        _ => FIRST,
    }
}

/// What a forwarder does beyond moving messages: by default nothing.
#[derive(Clone, Default)]
struct Pace {
    /// CPU spent on each message taken, in a busy loop.
    busy: Duration,
    /// What the busy loop reads (nothing: it spins in place).
    memory: Arc<[u64]>,
    /// How long a run of confirmed messages waits, from its first, to be acknowledged.
    ack_delay: Duration,
    /// Copies published `mandatory`.
    mandatory: bool,
}

impl Pace {
    /// The pace the forwarder options ask for. Every forwarder's busy loop reads the same
    /// memory, as a gateway's flows share theirs.
    fn of(args: &Args) -> Pace {
        let words = args.forwarder_busy_mib * (1 << 20) / 8;
        Pace {
            busy: Duration::from_micros(args.forwarder_busy_us),
            memory: (0..words as u64).collect(),
            ack_delay: Duration::from_millis(args.forwarder_ack_delay_ms),
            mandatory: args.forwarder_mandatory,
        }
    }

    /// What the forwarder's line says of it: nothing for the default.
    fn described(&self) -> String {
        let mut text = match (self.busy.as_micros(), (self.memory.len() * 8) >> 20) {
            (0, _) => String::new(),
            (us, 0) => format!(", {us} µs of it a busy loop per message"),
            (us, mib) => format!(", {us} µs of it a busy loop per message reading {mib} MiB"),
        };
        if !self.ack_delay.is_zero() {
            text += &format!(", acks held {} ms", self.ack_delay.as_millis());
        }
        if self.mandatory {
            text += ", copies mandatory";
        }
        text
    }
}

/// Spends `pace.busy` of CPU: spinning in place, or reading `pace.memory` a cache line at a
/// time from a place that depends on `n`, each line's place a step of a pseudo-random walk.
fn busy_loop(pace: &Pace, n: usize) {
    let until = Instant::now() + pace.busy;
    let lines = pace.memory.len() / 8;
    let mut at = (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut sum = 0u64;
    while Instant::now() < until {
        if lines == 0 {
            std::hint::spin_loop();
            continue;
        }
        for _ in 0..64 {
            at = at.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            sum = sum.wrapping_add(pace.memory[(at >> 33) as usize % lines * 8]);
        }
    }
    std::hint::black_box(sum);
}

/// Consumes `src` with a window of `window` messages, publishes each message to `dsts` with a
/// confirm (or, by `plan`, a copy of it to each of its destinations, each with its confirm),
/// and acknowledges confirmed runs with one `multiple` ack, until `stop`; at `pace`.
async fn forward(
    link: Link,
    src: String,
    dsts: Vec<String>,
    (plan, window, pace): (Plan, u16, Pace),
    stop: tokio_util::sync::CancellationToken,
) -> Result<()> {
    use futures_util::FutureExt;
    let (consuming, publishing, own) = link.open().await?;
    let inbound = consuming.create_channel().await?;
    let outbound = publishing.create_channel().await?;
    outbound
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut consumer = ponte::broker::consume(&inbound, &src, "bench-forwarder", window).await?;
    let mut confirms = futures_util::stream::FuturesOrdered::new();
    let mut taken = 0;
    // With `pace.ack_delay`: the newest confirmed message not yet acknowledged, how many, and
    // when the first of them was confirmed.
    let mut held: Option<(lapin::Acker, usize, tokio::time::Instant)> = None;
    let ack = |acker: lapin::Acker| async move {
        acker
            .ack(lapin::options::BasicAckOptions { multiple: true })
            .await
    };
    loop {
        let due = held.as_ref().map(|(_, _, since)| *since + pace.ack_delay);
        tokio::select! {
            () = stop.cancelled() => break,
            Some(first) = confirms.next(), if !confirms.is_empty() => {
                let (mut acker, confirmed): (lapin::Acker, lapin::Result<_>) = first;
                confirmed?;
                let mut count = 1;
                while let Some(Some((next, confirmed))) = confirms.next().now_or_never() {
                    confirmed?;
                    acker = next;
                    count += 1;
                }
                if pace.ack_delay.is_zero() {
                    ack(acker).await?;
                    continue;
                }
                let (count, since) = match held.take() {
                    Some((_, before, since)) => (before + count, since),
                    None => (count, tokio::time::Instant::now()),
                };
                // A run as long as Ponte's flows close at once is acknowledged at once.
                if count >= ponte::settle::ACK_BATCH {
                    ack(acker).await?;
                } else {
                    held = Some((acker, count, since));
                }
            }
            () = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                if let Some((acker, ..)) = held.take() {
                    ack(acker).await?;
                }
            }
            delivery = consumer.next() => {
                let delivery = delivery.context("consumer ended")??;
                if !pace.busy.is_zero() {
                    busy_loop(&pace, taken);
                }
                // The first copy's confirm apart: with one copy a message, as without
                // `--fan-out`, the forwarder allocates nothing more per message than before.
                let publish = |place: u16| {
                    outbound.basic_publish(
                        "".into(),
                        dsts[usize::from(place)].as_str().into(),
                        BasicPublishOptions {
                            mandatory: pace.mandatory,
                            ..BasicPublishOptions::default()
                        },
                        &delivery.data,
                        delivery.properties.clone(),
                    )
                };
                let (&place, rest) = planned(&plan, taken)
                    .split_first()
                    .expect("a plan gives every message a destination");
                let first = publish(place).await?;
                let mut more = Vec::new();
                for &place in rest {
                    more.push(publish(place).await?);
                }
                taken += 1;
                let acker = delivery.acker;
                confirms.push_back(async move {
                    // Acknowledged once every copy is confirmed; the first refusal fails it.
                    let mut confirmed = first.await;
                    for confirm in more {
                        let this = confirm.await;
                        if confirmed.is_ok() {
                            confirmed = this;
                        }
                    }
                    (acker, confirmed)
                });
            }
        }
    }
    if let Some((acker, ..)) = held.take() {
        ack(acker).await?;
    }
    if let Some(own) = own {
        close(&own).await;
    }
    Ok(())
}

/// Closes one of the benchmark's own connections, waiting for the broker's answer at most as
/// long as Ponte does: an answer lost on a loaded machine must not hold the run for ever.
async fn close(connection: &Connection) {
    let closing = connection.close(200, "done".into());
    let _ = tokio::time::timeout(ponte::broker::ANSWER_WITHIN, closing).await;
}

/// The names `side_queues` is called with: each side-by-side mover, for a drain and for a
/// latency run.
const MOVERS: [&str; 4] = ["shovel", "forwarder", "shovel-latency", "forwarder-latency"];

/// The source and destination queue of a side-by-side mover.
fn side_names(args: &Args, mover: &str) -> (String, String) {
    (
        format!("bench-{mover}-{}.src", args.scenario),
        format!("bench-{mover}-{}.dst", args.scenario),
    )
}

/// The policy `--classic-queue-version` sets for the run whose Ponte has queue prefix `prefix`.
fn queue_version_policy(prefix: &str) -> String {
    format!("{prefix}-queue-version")
}

/// A pattern matching the name of every queue of the run: Ponte's (under its `prefix`), and
/// the side queues of the shovel and the forwarder (see [`side_names`], [`sender_source`]).
fn run_queues_pattern(args: &Args, prefix: &str) -> String {
    // Each character other than a letter or digit escaped: PCRE reads `\` before one as itself.
    let literal = |s: &str| {
        s.chars().fold(String::new(), |mut out, c| {
            if !c.is_ascii_alphanumeric() {
                out.push('\\');
            }
            out.push(c);
            out
        })
    };
    format!(
        "^({}\\.|bench-.+-{}\\.)",
        literal(prefix),
        literal(&args.scenario)
    )
}

/// The forwarder's destination standing for Ponte's output queue `label` (an
/// [`output_label`]), when it publishes as Ponte does (`--fan-out`).
fn fan_out_queue(dst: &str, label: &str) -> String {
    format!("{dst}.{label}")
}

/// For `--fan-out`: a source queue per sender holding that sender's messages, with where each
/// of them goes; a destination for each queue Ponte publishes the load to, empty; and how many
/// messages Ponte publishes for the load (its copies, parked originals and receipts).
async fn fan_out_queues(
    args: &Args,
    connection: &Connection,
    load: &Load,
) -> Result<(Vec<(String, Plan)>, Vec<String>, usize)> {
    let (plans, labels) = fan_out_plans(load, args.receipts == "on");
    let (_, dst) = side_names(args, "forwarder");
    let dsts: Vec<String> = (labels.iter())
        .map(|label| fan_out_queue(&dst, label))
        .collect();
    let sources = sender_queues(args, connection, load, "forwarder", &dsts).await?;
    let published = plans
        .iter()
        .flatten()
        .flat_map(|routes| routes.iter())
        .map(|route| route.len())
        .sum();
    Ok((sources.into_iter().zip(plans).collect(), dsts, published))
}

/// Each sender's plan for the fan-out forwarder, and the labels of the queues it publishes to:
/// the load's routes, and with `positive` receipts a receipt to the sender for every message.
fn fan_out_plans(load: &Load, positive: bool) -> (Vec<Plan>, Vec<String>) {
    let mut outputs = load.outputs.clone();
    let plans = (load.by_sender.iter().zip(&load.routes))
        .map(|((sender, _), routes)| {
            let receipt = positive.then(|| outputs.place("receipts", sender));
            let routes = routes.iter().map(|route| match receipt {
                // A rejected message's route has its receipt already.
                Some(receipt) if !route.contains(&receipt) => {
                    route.iter().copied().chain([receipt]).collect()
                }
                _ => route.clone(),
            });
            Some(routes.collect())
        })
        .collect();
    (plans, outputs.labels)
}

/// The shovels of this scenario: its drain's and its latency run's.
fn shovel_names(args: &Args) -> [String; 2] {
    [
        format!("bench-{}", args.scenario),
        format!("bench-latency-{}", args.scenario),
    ]
}

/// A source queue holding the whole load and an empty destination, for a side-by-side mover.
async fn side_queues(
    args: &Args,
    connection: &Connection,
    load: &Load,
    mover: &str,
) -> Result<(String, String)> {
    let (src, dst) = side_names(args, mover);
    delete_queues(args, &[&src, &dst]).await?;
    let channel = connection.create_channel().await?;
    declare(args, &channel, &dst).await?;
    let all: Vec<Vec<u8>> = load
        .by_sender
        .iter()
        .flat_map(|(_, b)| b.iter().cloned())
        .collect();
    preload(args, connection, &src, &all).await?;
    Ok((src, dst))
}

/// The steady rate at which `total` messages arrive in `dsts`, the broker's CPU meanwhile, and
/// the cores `mover` kept busy.
async fn drained(
    args: &Args,
    connection: &Connection,
    dsts: &[String],
    total: usize,
    mover: Option<u32>,
) -> Result<Steady> {
    let channel = connection.create_channel().await?;
    steady_rate(
        &args.node,
        mover,
        total,
        Duration::from_secs(1800),
        async || {
            let mut ready = 0;
            for dst in dsts {
                ready += ponte::broker::ready(&channel, dst).await? as usize;
            }
            Ok(ready)
        },
    )
    .await
}

/// Deletes each of `queues` that exists, on connections of its own: a broker that cannot delete
/// a quorum queue in time (5 s, on a loaded machine) closes the connection that asked, which
/// must not be the run's. After such a failure the next queue is deleted on a new connection.
async fn delete_queues(args: &Args, queues: &[&str]) -> Result<()> {
    let mut open: Option<(Connection, Channel)> = None;
    for q in queues {
        let (_, channel) = match &open {
            Some(open) => open,
            None => {
                let connection = connect(&args.url).await?;
                let channel = connection.create_channel().await?;
                open.insert((connection, channel))
            }
        };
        if let Err(error) = channel.queue_delete((*q).into(), Default::default()).await {
            eprintln!("  deleting {q}: {error}");
            if let Some((connection, _)) = open.take() {
                close(&connection).await;
            }
        }
    }
    if let Some((connection, _)) = open {
        close(&connection).await;
    }
    Ok(())
}

/// How long a gateway asked to stop may take: it settles what it has in flight, each confirm
/// within `broker.publish_timeout_secs` (30 s by default), then writes its last records.
const STOP_WITHIN: Duration = Duration::from_secs(60);

/// A `ponte run` started by the benchmark. [`Gateway::stop`] ends it as an operator would
/// (SIGTERM, then its exit status); a gateway the benchmark gives up on (an error, Ctrl-C) is
/// killed when dropped, so that none outlives its run and goes on loading the broker.
struct Gateway(Option<Child>);

impl Gateway {
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// Asks Ponte to stop and waits for it, at most [`STOP_WITHIN`]: one that has not stopped by
    /// then is killed, and the run ends with an error saying so rather than waiting for ever.
    fn stop(mut self) -> Result<()> {
        let mut child = self.0.take().expect("a gateway is stopped once");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let asked = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if asked.elapsed() > STOP_WITHIN {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "ponte did not stop within {} s of SIGTERM; killed",
                    STOP_WITHIN.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            bail!("ponte exited with {status}");
        }
        Ok(())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `ponte run` and returns it once it logs that it is ready, with the start-up time.
/// Everything it logs goes to `ponte.log` in the work folder (each start after the last), to
/// set beside the latency samples' times; its warnings and errors are shown too.
fn start_ponte(args: &Args, config: &Path) -> Result<(Gateway, Duration)> {
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.work.join("ponte.log"))?;
    let started = Instant::now();
    let mut child = Command::new(&args.ponte)
        .args(["run", "--config"])
        .arg(config)
        .env("PONTE_BROKER__URL", &args.url)
        .env("PONTE_OPS__LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", args.ponte.display()))?;
    let stderr = child.stderr.take().unwrap();
    let gateway = Gateway(Some(child));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(|l| l.ok())
        {
            if line.contains("gateway ready")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(());
            }
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("  ponte: {line}");
            }
            let _ = writeln!(log, "{line}");
        }
    });
    rx.recv_timeout(Duration::from_secs(120))
        .context("ponte did not become ready")?;
    Ok((gateway, started.elapsed()))
}

/// Waits (at most 30 s) until the broker uses less than 5% of a core over a second.
async fn broker_at_rest(node: &str) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(30);
    let mut before = broker_cpu(node)?;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = broker_cpu(node)?;
        if now - before < 0.05 {
            return Ok(());
        }
        before = now;
    }
    eprintln!("  (the broker is still busy after 30 s; timing anyway)");
    Ok(())
}

/// User + system CPU seconds of the broker node (`--node`'s folder holds its pid file).
fn broker_cpu(node: &str) -> Result<f64> {
    let dir = node
        .split_whitespace()
        .nth(2)
        .context("--node: NAME PORT DIR")?;
    let pid = std::fs::read_to_string(Path::new(dir).join("node.pid"))?;
    Ok(usage(pid.trim().parse()?)?.0)
}

/// User + system CPU seconds and peak RSS (MiB) of a process, from /proc.
fn usage(pid: u32) -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let cpu = proc_stat::cpu_seconds(&stat).with_context(|| format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    Ok((cpu, hwm / 1024.0))
}

async fn output_count(channel: &Channel, queues: &[String]) -> Result<usize> {
    let mut total = 0;
    for q in queues {
        total += ponte::broker::ready(channel, q).await? as usize;
    }
    Ok(total)
}

async fn drain_with_ponte(
    args: &Args,
    config: &Path,
    directory: &Directory,
    connection: &Connection,
    load: &Load,
    row: &mut Row,
) -> Result<()> {
    let queues = Queues::new(&directory.settings.broker.prefix);
    ponte::broker::declare_topology(connection, directory).await?;
    let channel = connection.create_channel().await?;
    for (sender, bodies) in &load.by_sender {
        preload(args, connection, &queues.inbound(sender), bodies).await?;
    }
    let outputs: Vec<String> = directory
        .partners
        .keys()
        .flat_map(|p| [queues.outbound(p), queues.rejected(p)])
        .collect();
    let (gateway, startup) = start_ponte(args, config)?;
    row.startup_ms = startup.as_secs_f64() * 1000.0;
    let pid = gateway.id();
    let (cpu_before, _) = usage(pid)?;
    let threads_before = Split::of_threads(pid)?;
    let steady = steady_rate(
        &args.node,
        Some(pid),
        load.expected_outputs,
        Duration::from_secs(3600),
        async || output_count(&channel, &outputs).await,
    )
    .await?;
    // Outputs counted; give the last acknowledgements a moment, then read the process's usage.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (cpu_after, rss) = usage(pid)?;
    row.cpu_split = threads_before.per_message(Split::of_threads(pid)?, load.count);
    // Progress counts outputs (copies and parked originals); the broker's cost is per message.
    row.ponte_broker_us = steady.broker * load.expected_outputs as f64 / load.count as f64 * 1e6;
    gateway.stop()?;
    row.ponte_rate = steady.rate * load.count as f64 / load.expected_outputs as f64;
    row.cpu_us = (cpu_after - cpu_before) / load.count as f64 * 1e6;
    row.peak_rss_mib = rss;
    let split = &row.cpu_split;
    // The cores the drain kept busy, Ponte's and the broker's: where they near the machine's,
    // the rate is those cores over what a message costs the two.
    let cores = steady.cores();
    eprintln!(
        "  ponte: {:.0} msg/s, {:.1} µs CPU/msg (workers {:.1}, store {:.1}, log {:.1}; broker {:.1}; {cores:.2} cores), peak RSS {:.1} MiB, ready in {:.0} ms",
        row.ponte_rate,
        row.cpu_us,
        split.workers,
        split.store,
        split.log,
        row.ponte_broker_us,
        row.peak_rss_mib,
        row.startup_ms
    );
    for q in &outputs {
        channel
            .queue_purge(q.as_str().into(), Default::default())
            .await?;
    }
    for p in directory.partners.keys() {
        channel
            .queue_purge(queues.receipts(p).as_str().into(), Default::default())
            .await?;
    }
    Ok(())
}

/// Ponte's end-to-end latency at `rate`: from a sender's publish to the copy's arrival in a
/// recipient's outbound queue.
async fn latency(
    args: &Args,
    config: &Path,
    directory: &Directory,
    load: &Load,
    rate: f64,
    suffix: &str,
) -> Result<Latency> {
    let queues = Queues::new(&directory.settings.broker.prefix);
    let (gateway, _) = start_ponte(args, config)?;
    let schedule: Vec<(String, Vec<u8>)> = load
        .by_sender
        .iter()
        .flat_map(|(sender, bodies)| bodies.iter().map(|b| (queues.inbound(sender), b.clone())))
        .collect();
    let outputs: Vec<String> = directory
        .partners
        .keys()
        .map(|p| queues.outbound(p))
        .collect();
    let name = format!("{}{suffix}", args.scenario);
    let pid = gateway.id();
    let (cpu_before, _) = usage(pid)?;
    let timed = time_through(args, &name, schedule, &outputs, rate).await;
    let (cpu_after, _) = usage(pid)?;
    gateway.stop()?;
    // Messages that arrive one by one cost more each than a backlog drained in runs: every one
    // wakes the threads it passes through.
    let cpu_us = (cpu_after - cpu_before) / load.count as f64 * 1e6;
    eprintln!("  ponte CPU at {rate:.0} msg/s offered: {cpu_us:.1} µs/msg");
    Ok(Latency {
        cpu_us: Some(cpu_us),
        ..timed?
    })
}

/// What moves a side queue's messages in a latency run besides Ponte.
#[derive(Clone, Copy)]
enum Mover {
    /// The broker's own shovel: the floor under Ponte's latency.
    Shovel,
    /// The no-op AMQP forwarder: what being a client of the broker costs at all.
    Forwarder,
}

/// A side mover's latency at the same `rate` (publish into its source queue, arrival in its
/// destination); its samples' file is named with `suffix` (the round).
async fn side_latency(
    args: &Args,
    connection: &Connection,
    load: &Load,
    rate: f64,
    mover: Mover,
    suffix: &str,
) -> Result<Latency> {
    let label = match mover {
        Mover::Shovel => "shovel",
        Mover::Forwarder => "forwarder",
    };
    let (src, dst) = side_queues(
        args,
        connection,
        &Load::default(),
        &format!("{label}-latency"),
    )
    .await?;
    let [_, name] = shovel_names(args);
    // The shovel takes the whole load from one queue. The forwarder takes each sender's
    // messages from a queue of their own, a forwarder each, as Ponte consumes each sender's
    // queue in a flow of its own: through one consumer, one message after another, its latency
    // would be that queue's wait (with the demo mix, above Ponte's).
    let per_sender: Vec<String> = match mover {
        Mover::Shovel => Vec::new(),
        Mover::Forwarder => (0..load.by_sender.len())
            .map(|i| sender_source(args, "forwarder-latency", i))
            .collect(),
    };
    let mut forwarding = Vec::new();
    match mover {
        Mover::Shovel => set_shovel(args, &name, &src, &dst)?,
        Mover::Forwarder => {
            for source in &per_sender {
                preload(args, connection, source, &[]).await?;
                forwarding.push(Forwarding::start(
                    Link::Own(args.url.clone()),
                    source,
                    slice::from_ref(&dst),
                    None,
                    (ponte::settings::DEFAULT_PREFETCH, Pace::default()),
                ));
            }
        }
    }
    let schedule = load
        .by_sender
        .iter()
        .enumerate()
        .flat_map(|(i, (_, bodies))| {
            let source = per_sender.get(i).unwrap_or(&src);
            bodies.iter().map(|b| (source.clone(), b.clone()))
        })
        .collect();
    let timed = time_through(
        args,
        &format!("{}-{label}{suffix}", args.scenario),
        schedule,
        slice::from_ref(&dst),
        rate,
    )
    .await;
    match mover {
        Mover::Shovel => ctl(&args.node, &["clear_parameter", "shovel", &name])?,
        Mover::Forwarder => {
            Forwarding::stop_all(forwarding).await?;
        }
    }
    let mut queues: Vec<&str> = per_sender.iter().map(String::as_str).collect();
    queues.extend([src.as_str(), dst.as_str()]);
    delete_queues(args, &queues).await?;
    timed
}

/// End-to-end latency figures at a fixed offered rate, in milliseconds.
#[derive(Debug, Clone)]
struct Latency {
    p50: f64,
    p99: f64,
    max: f64,
    offered: f64,
    /// Every copy's latency in milliseconds, smallest first.
    sorted: Vec<f64>,
    /// The lowest and highest p99 of the rounds (of one round: its own).
    p99_range: (f64, f64),
    /// Ponte's CPU time per message offered, while they were (not measured for the others).
    cpu_us: Option<f64>,
}

impl Latency {
    /// The rounds' medians of each figure, their p99s' range, and the samples of the round
    /// whose p99 is the median (the lower middle one of an even count), for the plot. `None`
    /// for no rounds.
    fn of_rounds(mut rounds: Vec<Latency>) -> Option<Latency> {
        if rounds.is_empty() {
            return None;
        }
        let all = |pick: fn(&Latency) -> f64| -> Vec<f64> { rounds.iter().map(pick).collect() };
        let (p50, max, offered) = (all(|l| l.p50), all(|l| l.max), all(|l| l.offered));
        let p99s = all(|l| l.p99);
        let cpu: Option<Vec<f64>> = rounds.iter().map(|l| l.cpu_us).collect();
        rounds.sort_by(|a, b| a.p99.total_cmp(&b.p99));
        let middle = rounds.swap_remove((rounds.len() - 1) / 2);
        Some(Latency {
            p50: median(p50),
            p99: median(p99s.clone()),
            max: median(max),
            offered: median(offered),
            sorted: middle.sorted,
            p99_range: range(&p99s),
            cpu_us: cpu.map(median),
        })
    }
}

/// Publishes `schedule` (queue, body) open loop at `rate`, in an order that interleaves the
/// senders, and times each message from its publish until a consumer of one of `outputs`
/// receives it (matched by message id). Samples go to `latency-<name>.csv` in sending order,
/// with the output each copy came out of, so that a slow moment or a slow recipient shows.
async fn time_through(
    args: &Args,
    name: &str,
    mut schedule: Vec<(String, Vec<u8>)>,
    outputs: &[String],
    rate: f64,
) -> Result<Latency> {
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Default::default();
    // (sent, latency) in milliseconds, sent counted from `start`, and the output it came out of.
    let samples: Arc<Mutex<Vec<(f64, f64, usize)>>> = Default::default();
    let start = Instant::now();
    // The clock time too, to find a burst in Ponte's log (`ponte.log`) or the broker's.
    let unix_start_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64()
        * 1000.0;
    let consumer_connection = connect(&args.url).await?;
    let mut consumers = Vec::new();
    for (output, queue) in outputs.iter().enumerate() {
        let channel = consumer_connection.create_channel().await?;
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let (sent, samples) = (sent.clone(), samples.clone());
        consumers.push(tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let at = Instant::now();
                if let Some(id) = d.properties.message_id().as_ref()
                    && let Some(t0) = sent.lock().unwrap().get(id.as_str())
                {
                    samples.lock().unwrap().push((
                        (*t0 - start).as_secs_f64() * 1000.0,
                        (at - *t0).as_secs_f64() * 1000.0,
                        output,
                    ));
                }
            }
        }));
    }
    // Interleave senders as they would arrive.
    schedule.sort_by_key(|(_, b)| {
        let mut h = 0u64;
        for x in b.iter().take(64) {
            h = h.wrapping_mul(31).wrapping_add(u64::from(*x));
        }
        h
    });
    // Each message's id (how its copies are matched at the outputs) and properties, made before
    // the clock starts: the open loop, on the same cores as what it times, only publishes.
    let labelled: Vec<(String, BasicProperties)> = schedule
        .iter()
        .map(|(_, body)| {
            let envelope = serde_json::from_slice::<Value>(body).unwrap_or_default();
            let id = envelope["message_id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            // A bare load carries the id alone.
            let properties = match args.labels {
                Labels::Bare => bare_properties().with_message_id(id.as_str().into()),
                Labels::Labelled => labelled_properties(&envelope),
            };
            (id, properties)
        })
        .collect();
    let publisher = connect(&args.url).await?;
    let channel = publisher.create_channel().await?;
    let start = Instant::now();
    let mut offered = 0usize;
    // Open loop: each message is published at its scheduled time, whatever happened before.
    for (i, ((queue, body), (id, properties))) in schedule.iter().zip(labelled).enumerate() {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        sent.lock().unwrap().insert(id, Instant::now());
        drop(
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await?,
        );
        offered += 1;
    }
    let offered_rate = offered as f64 / start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for c in consumers {
        c.abort();
    }
    close(&publisher).await;
    close(&consumer_connection).await;
    let mut timed = samples.lock().unwrap().clone();
    if timed.is_empty() {
        bail!("no latency samples");
    }
    timed.sort_by(|a, b| a.0.total_cmp(&b.0));
    let path = args.work.join(format!("latency-{name}.csv"));
    let mut f = std::fs::File::create(&path)?;
    writeln!(f, "sent_ms,sent_unix_ms,latency_ms,queue")?;
    for (sent, latency, output) in &timed {
        let unix = unix_start_ms + sent;
        writeln!(f, "{sent:.1},{unix:.1},{latency:.3},{}", outputs[*output])?;
    }
    let mut samples: Vec<f64> = timed.iter().map(|(_, l, _)| *l).collect();
    samples.sort_by(f64::total_cmp);
    let pick = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    let result = Latency {
        p50: pick(0.5),
        p99: pick(0.99),
        max: *samples.last().unwrap(),
        offered: offered_rate,
        sorted: samples.clone(),
        p99_range: (pick(0.99), pick(0.99)),
        cpu_us: None,
    };
    eprintln!(
        "  {name} latency at {offered_rate:.0} msg/s offered: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} copies; samples in {})",
        result.p50,
        result.p99,
        result.max,
        samples.len(),
        path.display()
    );
    Ok(result)
}

/// An SVG of latency by percentile (the x axis stretches the tail: 90%, 99%, 99.9% are equally
/// far apart), one line per series, with the 10 ms p99 target marked. Written by hand: a
/// plotting crate would need the system's fonts to lay out its labels.
fn percentile_plot(series: &[(&str, &Latency, &str)], rate: f64) -> String {
    use std::fmt::Write as _;
    let (width, height) = (720.0, 420.0);
    let (left, right, top, bottom) = (60.0, 20.0, 40.0, 50.0);
    let n = series
        .iter()
        .map(|(_, l, _)| l.sorted.len())
        .max()
        .unwrap_or(1);
    // Up to the percentile the samples resolve: 99.9% needs a thousand of them.
    let nines = (n as f64).log10().floor().clamp(1.0, 5.0);
    let highest = series.iter().map(|(_, l, _)| l.max).fold(10.0, f64::max);
    let step = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]
        .into_iter()
        .find(|s| highest / s <= 8.0)
        .unwrap_or(2000.0);
    let top_ms = (highest / step).ceil() * step;
    let x = |nine: f64| left + nine / nines * (width - left - right);
    let y = |ms: f64| height - bottom - ms / top_ms * (height - top - bottom);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="20" font-size="14">End-to-end latency by percentile at {rate:.0} msg/s offered</text>
"#
    );
    let mut ms = 0.0;
    while ms <= top_ms {
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{ms} ms</text>"##,
            width - right,
            left - 6.0,
            y(ms) + 4.0,
            y = y(ms)
        );
        ms += step;
    }
    for nine in 0..=nines as usize {
        let label = match nine {
            0 => "0%".to_string(),
            k => format!("{}%", 100.0 - 100.0 / 10f64.powi(k as i32)),
        };
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{top}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            height - bottom,
            height - bottom + 18.0,
            x = x(nine as f64)
        );
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#888" stroke-dasharray="6 4"/><text x="{}" y="{:.1}" text-anchor="end" fill="#666">p99 target</text>"##,
        width - right,
        width - right - 4.0,
        y(10.0) - 4.0,
        y = y(10.0)
    );
    for (i, (name, latency, colour)) in series.iter().enumerate() {
        let sorted = &latency.sorted;
        let points: Vec<String> = (0..=400)
            .map(|k| {
                let nine = nines * f64::from(k) / 400.0;
                let p = 1.0 - 10f64.powf(-nine);
                let at = ((p * sorted.len() as f64) as usize).min(sorted.len() - 1);
                format!("{:.1},{:.1}", x(nine), y(sorted[at]))
            })
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/><text x="{}" y="{}" fill="{colour}">{name}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} copies)</text>"#,
            points.join(" "),
            left + 10.0,
            top + 16.0 + 16.0 * i as f64,
            latency.p50,
            latency.p99,
            latency.max,
            sorted.len()
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text></svg>"#,
        (width + left) / 2.0,
        height - 8.0
    );
    svg
}

/// Deletes the run's queues and exchanges, its side queues and its shovels.
async fn cleanup(args: &Args, connection: &Connection, directory: &Directory) {
    if args.classic_queue_version.is_some() {
        let policy = queue_version_policy(&directory.settings.broker.prefix);
        let _ = quiet_ctl(&args.node, &["clear_policy", &policy]);
    }
    for name in shovel_names(args) {
        let _ = quiet_ctl(&args.node, &["clear_parameter", "shovel", &name]);
    }
    if args.shovel_per_sender {
        let _ = clear_sender_shovels(args);
    }
    // The side queues, the per-sender sources (at most one per configured partner for each
    // mover that has them), and Ponte's whole topology as `ponte setup` declares it.
    let mut queues: Vec<String> = MOVERS
        .iter()
        .flat_map(|mover| {
            let (src, dst) = side_names(args, mover);
            [src, dst]
        })
        .collect();
    let spread = [
        Some("forwarder-latency"),
        args.shovel_per_sender.then_some("shovel"),
        args.fan_out.then_some("forwarder"),
    ];
    let spread = spread.into_iter().flatten();
    for mover in spread {
        queues.extend((0..args.partners).map(|i| sender_source(args, mover, i)));
    }
    // The forwarder's destinations with `--fan-out`: at most one for each of Ponte's output
    // queues.
    if args.fan_out {
        let (_, dst) = side_names(args, "forwarder");
        for partner in directory.partners.keys() {
            let labels = ["out", "rejected", "receipts"].map(|kind| output_label(kind, partner));
            queues.extend(labels.iter().map(|label| fan_out_queue(&dst, label)));
        }
    }
    queues.extend(
        ponte::broker::all_queues(directory)
            .into_iter()
            .map(|(q, _)| q),
    );
    let _ = delete_queues(args, &queues.iter().map(String::as_str).collect::<Vec<_>>()).await;
    if let Ok(channel) = connection.create_channel().await {
        for (exchange, _) in ponte::broker::exchanges(directory) {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
        }
    }
}

/// The CSV file's columns.
const HEADER: &str = "scenario,messages,partners,bytes_per_message,positive_receipts,shovel_msgs_per_s,ponte_msgs_per_s,ratio,cpu_us_per_msg,peak_rss_mib,startup_ms,latency_offered_msgs_per_s,latency_p50_ms,latency_p99_ms,latency_max_ms,shovel_broker_cpu_us_per_msg,ponte_broker_cpu_us_per_msg,forwarder_msgs_per_s,forwarder_broker_cpu_us_per_msg,forwarder_cpu_us_per_msg,shovel_latency_p50_ms,shovel_latency_p99_ms,shovel_latency_max_ms,forwarder_latency_p50_ms,forwarder_latency_p99_ms,forwarder_latency_max_ms,rounds,ratio_min,ratio_max,ponte_msgs_per_s_min,ponte_msgs_per_s_max,cpu_us_per_msg_min,cpu_us_per_msg_max,shovel_sources,mix,queue_type,labels,latency_p99_min_ms,latency_p99_max_ms,shovel_latency_p99_min_ms,shovel_latency_p99_max_ms,forwarder_latency_p99_min_ms,forwarder_latency_p99_max_ms,latency_cpu_us_per_msg,ids,cpu_workers_us_per_msg,cpu_store_us_per_msg,cpu_log_us_per_msg,classic_queue_version";

/// An existing CSV file must have today's columns: rows of an older benchmark would not line
/// up. Checked before a run, not after it.
fn check_csv_header(csv: &Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(csv) else {
        return Ok(());
    };
    match text.lines().next() {
        Some(header) if header != HEADER => bail!(
            "{} has other columns (written by an older ponte-bench): move it away or name another file with --csv",
            csv.display()
        ),
        _ => Ok(()),
    }
}

fn report(args: &Args, load: &Load, row: &Row) -> Result<()> {
    let fmt = |v: Option<f64>, d: usize| v.map_or(String::new(), |v| format!("{v:.d$}"));
    let ratio = row.ratio;
    let latency = |pick: fn(&Latency) -> f64| row.latency.as_ref().map(pick);
    let shovel_latency = |pick: fn(&Latency) -> f64| row.shovel_latency.as_ref().map(pick);
    let forwarder_latency = |pick: fn(&Latency) -> f64| row.forwarder_latency.as_ref().map(pick);
    let header = HEADER;
    let spread = &row.spread;
    // The queues the shovel moved the load from.
    let shovel_sources = match (row.shovel_rate, args.shovel_per_sender) {
        (None, _) => String::new(),
        (Some(_), true) => load.by_sender.len().to_string(),
        (Some(_), false) => "1".to_string(),
    };
    let line = format!(
        "{},{},{},{},{},{},{:.0},{},{:.2},{:.1},{:.0},{},{},{},{},{},{:.1},{},{},{},{},{},{},{},{},{},{},{},{},{:.0},{:.0},{:.2},{:.2},{},{},{},{},{},{},{},{},{},{},{},{},{:.2},{:.2},{:.2},{}",
        args.scenario,
        load.count,
        args.partners,
        load.mean_size(),
        args.receipts,
        fmt(row.shovel_rate, 0),
        row.ponte_rate,
        fmt(ratio, 3),
        row.cpu_us,
        row.peak_rss_mib,
        row.startup_ms,
        fmt(latency(|l| l.offered), 0),
        fmt(latency(|l| l.p50), 2),
        fmt(latency(|l| l.p99), 2),
        fmt(latency(|l| l.max), 2),
        fmt(row.shovel_broker_us, 1),
        row.ponte_broker_us,
        fmt(row.forwarder.map(|f| f.0), 0),
        fmt(row.forwarder.map(|f| f.1 * 1e6), 1),
        fmt(row.forwarder.map(|f| f.2 * 1e6), 1),
        fmt(shovel_latency(|l| l.p50), 2),
        fmt(shovel_latency(|l| l.p99), 2),
        fmt(shovel_latency(|l| l.max), 2),
        fmt(forwarder_latency(|l| l.p50), 2),
        fmt(forwarder_latency(|l| l.p99), 2),
        fmt(forwarder_latency(|l| l.max), 2),
        spread.rounds,
        fmt(spread.ratio.map(|r| r.0), 3),
        fmt(spread.ratio.map(|r| r.1), 3),
        spread.ponte_rate.0,
        spread.ponte_rate.1,
        spread.cpu_us.0,
        spread.cpu_us.1,
        shovel_sources,
        name_of(args.mix),
        args.queue_type.as_str(),
        name_of(args.labels),
        fmt(latency(|l| l.p99_range.0), 2),
        fmt(latency(|l| l.p99_range.1), 2),
        fmt(shovel_latency(|l| l.p99_range.0), 2),
        fmt(shovel_latency(|l| l.p99_range.1), 2),
        fmt(forwarder_latency(|l| l.p99_range.0), 2),
        fmt(forwarder_latency(|l| l.p99_range.1), 2),
        fmt(row.latency.as_ref().and_then(|l| l.cpu_us), 1),
        name_of(args.ids),
        row.cpu_split.workers,
        row.cpu_split.store,
        row.cpu_split.log,
        args.classic_queue_version
            .map_or(String::new(), |v| v.to_string()),
    );
    if let Some(parent) = args.csv.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let new = !args.csv.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.csv)?;
    if new {
        writeln!(f, "{header}")?;
    }
    writeln!(f, "{line}")?;
    println!("{header}\n{line}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fan_out_forwarder_publishes_each_message_to_a_queue_for_each_of_ponte_s() {
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let directory = Directory::load(&config).unwrap();
        let load = Load::generate(&directory, 2000, 1024, Mix::Demo, Ids::V4);
        // A route for every message, in its sender's order.
        let routes: Vec<usize> = load.routes.iter().map(Vec::len).collect();
        let bodies: Vec<usize> = load.by_sender.iter().map(|(_, b)| b.len()).collect();
        assert_eq!(routes, bodies);
        // As many as the drain waits for from Ponte, and a receipt for each rejected message.
        let routed: usize = load.routes.iter().flatten().map(|r| r.len()).sum();
        assert_eq!(routed, load.expected_outputs + load.invalid);
        // The demo configuration's five recipients, and each sender's rejected and receipts.
        let mut outputs = load.outputs.labels.clone();
        outputs.sort();
        let senders = ["cpi-bologna", "cpi-modena", "inps"];
        let mut expected: Vec<String> = ["comune-modena", "cpi-bologna", "cpi-modena"]
            .into_iter()
            .chain(["inps", "osservatorio-er"])
            .map(|p| output_label("out", p))
            .chain(senders.map(|p| output_label("rejected", p)))
            .chain(senders.map(|p| output_label("receipts", p)))
            .collect();
        expected.sort();
        assert_eq!(outputs, expected);
        // Each message where Ponte sends it: a referral to INPS; a benefit status to a CPI and
        // the observatory (and for an inclusion benefit, to the comune where one is competent);
        // a rejected message parked and answered on its own sender's queues.
        for ((sender, bodies), routes) in load.by_sender.iter().zip(&load.routes) {
            for (body, route) in bodies.iter().zip(routes) {
                let mut to: Vec<&str> = route
                    .iter()
                    .map(|&p| &*load.outputs.labels[usize::from(p)])
                    .collect();
                to.sort();
                let kind = serde_json::from_slice::<Value>(body)
                    .ok()
                    .and_then(|m| m["type"].as_str().map(String::from));
                let parked = [
                    output_label("receipts", sender),
                    output_label("rejected", sender),
                ];
                match kind.as_deref() {
                    _ if to == parked => {}
                    Some("referral") => assert_eq!(to, ["out.inps"]),
                    Some("benefit-status") => {
                        assert!(to.iter().any(|t| t.starts_with("out.cpi-")), "{to:?}");
                        assert!(to.contains(&"out.osservatorio-er"), "{to:?}");
                        assert!(to.len() == 2 || to.contains(&"out.comune-modena"), "{to:?}");
                    }
                    other => panic!("{other:?} from {sender} routed to {to:?}"),
                }
            }
        }
        // The forwarder's plans: the load's routes; with positive receipts, one more message
        // for each delivered one, to its sender's receipt queue.
        let published = |plans: &[Plan]| -> usize {
            let routes = plans.iter().flatten().flat_map(|routes| routes.iter());
            routes.map(|route| route.len()).sum()
        };
        let (plans, labels) = fan_out_plans(&load, false);
        assert_eq!((published(&plans), &labels), (routed, &load.outputs.labels));
        let (with_receipts, labels) = fan_out_plans(&load, true);
        let delivered = load.count - load.invalid;
        assert_eq!(published(&with_receipts), routed + delivered);
        assert_eq!(
            labels, load.outputs.labels,
            "every sender has a receipt queue already"
        );
        for (((sender, _), plan), routes) in
            load.by_sender.iter().zip(&with_receipts).zip(&load.routes)
        {
            let receipt = output_label("receipts", sender);
            for (planned, route) in plan.as_ref().unwrap().iter().zip(routes) {
                let last = &labels[usize::from(*planned.last().unwrap())];
                assert_eq!(last, &receipt);
                assert!(planned.starts_with(route));
            }
        }
        // Without a plan, or past its end, one copy to the first destination.
        assert_eq!(planned(&None, 7), [0]);
        let plan: Plan = Some(load.routes[0].iter().take(3).cloned().collect());
        assert_eq!(planned(&plan, 1), &*load.routes[0][1]);
        assert_eq!(planned(&plan, 3), [0]);
    }

    #[test]
    fn the_forwarder_s_busy_loop_spends_the_time_asked_spinning_or_reading_memory() {
        let busy = Duration::from_millis(20);
        // Nothing to read, less than a cache line, a few lines, and a line and a bit.
        for words in [0u64, 7, 64, 9] {
            let pace = Pace {
                busy,
                memory: (0..words).collect(),
                ack_delay: Duration::ZERO,
                mandatory: false,
            };
            for n in [0, 1, usize::MAX] {
                let began = Instant::now();
                busy_loop(&pace, n);
                assert!(began.elapsed() >= busy, "{words} words, message {n}");
            }
        }
    }

    #[test]
    fn the_fan_out_forwarders_start_with_the_windows_ponte_s_flows_would() {
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let directory = Directory::load(&config).unwrap();
        let load = Load::generate(&directory, 2000, 1024, Mix::Demo, Ids::V4);
        let senders: Vec<&str> = load.by_sender.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(senders, ["cpi-bologna", "cpi-modena", "inps"]);
        // Few partners: every flow has `broker.prefetch`.
        let prefetch = directory.settings.broker.prefetch;
        assert_eq!(starting_windows(&directory, &load), [prefetch; 3]);
        // A bound shared by the five partners' flows: given where the backlog is, the two
        // receiving partners keeping the floor.
        let shared = Directory::load_with_overrides(&config, &[("broker.max_in_flight", "100")]);
        let windows = starting_windows(&shared.unwrap(), &load);
        let floor = ponte::prefetch::FLOOR;
        assert!(
            windows.iter().sum::<u16>() <= 100 - 2 * floor,
            "{windows:?}"
        );
        assert!(windows.iter().all(|w| *w > floor), "{windows:?}");
        let backlogs: Vec<usize> = load.by_sender.iter().map(|(_, b)| b.len()).collect();
        let busiest = |of: &[usize]| (0..3).max_by_key(|&i| of[i]).unwrap();
        let windows: Vec<usize> = windows.iter().map(|w| usize::from(*w)).collect();
        assert_eq!(
            busiest(&windows),
            busiest(&backlogs),
            "{windows:?} for {backlogs:?}"
        );
    }

    #[test]
    fn latency_over_rounds_gives_the_median_p99_its_range_and_the_median_round_s_samples() {
        let round = |p50: f64, p99: f64, cpu: Option<f64>| Latency {
            p50,
            p99,
            max: p99 * 2.0,
            offered: 3000.0,
            sorted: vec![p50, p99],
            p99_range: (p99, p99),
            cpu_us: cpu,
        };
        let rounds = vec![
            round(3.0, 20.0, Some(160.0)),
            round(1.5, 8.0, Some(170.0)),
            round(2.0, 14.0, Some(150.0)),
        ];
        let l = Latency::of_rounds(rounds).unwrap();
        assert_eq!((l.p50, l.p99, l.max), (2.0, 14.0, 28.0));
        assert_eq!(l.p99_range, (8.0, 20.0));
        assert_eq!(l.sorted, vec![2.0, 14.0], "the plot shows the median round");
        assert_eq!(l.cpu_us, Some(160.0));
        // The shovel's and the forwarder's CPU is not measured: none, not a zero.
        let side = Latency::of_rounds(vec![round(1.0, 6.0, None), round(1.0, 5.0, None)]);
        let side = side.unwrap();
        assert_eq!(side.cpu_us, None);
        // Of two rounds, the p99 is their mean and the plot shows the lower one.
        assert_eq!((side.p99, side.sorted[1]), (5.5, 5.0));
        assert!(Latency::of_rounds(Vec::new()).is_none());
    }

    #[tokio::test]
    async fn a_load_that_passes_both_marks_between_two_polls_still_gets_a_rate() {
        // A node whose "broker" is this process, so that reading its CPU time works.
        let dir = std::env::temp_dir().join(format!("ponte-bench-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("node.pid"), std::process::id().to_string()).unwrap();
        let node = format!("test 0 {}", dir.display());
        // The first poll sees nothing moved yet, the second sees everything moved.
        let mut polls = [0, 2000].into_iter();
        // The mover is this process too: its cores over the window are read as well.
        let mover = Some(std::process::id());
        let steady = steady_rate(&node, mover, 2000, Duration::from_secs(10), async || {
            Ok(polls.next().unwrap_or(2000))
        })
        .await
        .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let rate = steady.rate;
        assert!(rate.is_finite() && rate > 0.0, "rate {rate}");
        let cores = steady.mover_cores;
        assert!(cores.is_finite() && cores >= 0.0, "cores {cores}");
    }

    #[test]
    fn a_referrals_load_asks_one_copy_per_message_where_the_demo_mix_fans_out() {
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let directory = Directory::load(&config).unwrap();
        let demo = Load::generate(&directory, 2000, 1024, Mix::Demo, Ids::V4);
        let referrals = Load::generate(&directory, 2000, 1024, Mix::Referrals, Ids::V4);
        let types = |load: &Load| -> Vec<String> {
            let bodies = load.by_sender.iter().flat_map(|(_, bodies)| bodies);
            let parsed = bodies.filter_map(|b| serde_json::from_slice::<Value>(b).ok());
            parsed
                .map(|m| m["type"].as_str().unwrap_or("").to_string())
                .collect()
        };
        assert!(
            types(&referrals)
                .iter()
                .all(|t| t == "referral" || t == "pension-claim")
        );
        // Every valid message one copy, every invalid one parked: one output per message.
        assert_eq!((referrals.invalid, referrals.expected_outputs), (100, 2000));
        assert!(
            (950..1100).contains(&referrals.mean_size()),
            "{}",
            referrals.mean_size()
        );
        // The demo mix: benefit-status messages to two or three recipients.
        assert!(types(&demo).iter().any(|t| t == "benefit-status"));
        assert!(
            demo.expected_outputs > 2600,
            "{} outputs",
            demo.expected_outputs
        );
    }

    #[test]
    fn a_labelled_load_carries_each_envelope_s_id_and_type_and_a_bare_one_neither() {
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let directory = Directory::load(&config).unwrap();
        let load = Load::generate(&directory, 200, 1024, Mix::Demo, Ids::V4);
        let bodies: Vec<&Vec<u8>> = load.by_sender.iter().flat_map(|(_, b)| b).collect();
        let mut labelled = 0;
        for body in &bodies {
            let bare = Labels::Bare.properties(body);
            assert_eq!(bare.message_id(), &None);
            assert_eq!(bare.kind(), &None);
            let properties = Labels::Labelled.properties(body);
            assert_eq!(properties.delivery_mode(), &Some(2));
            match serde_json::from_slice::<Value>(body) {
                Ok(envelope) if envelope["message_id"].is_string() => {
                    let id = properties.message_id().as_ref().map(|i| i.to_string());
                    let kind = properties.kind().as_ref().map(|k| k.to_string());
                    assert_eq!(id.as_deref(), envelope["message_id"].as_str());
                    assert_eq!(kind.as_deref(), envelope["type"].as_str());
                    labelled += 1;
                }
                _ => assert_eq!(properties.message_id(), &None),
            }
        }
        // The load's invalid messages include some that are no envelope at all.
        assert!(
            labelled > 150 && labelled < bodies.len(),
            "{labelled} of {}",
            bodies.len()
        );
    }
}
