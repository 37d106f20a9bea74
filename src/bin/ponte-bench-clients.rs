//! `ponte-bench-clients`: how much of a message's CPU is the AMQP client's own. The same no-op
//! forwarder (consume with Ponte's prefetch, publish each message to another queue with a
//! publisher confirm, acknowledge confirmed runs with one `multiple` ack) written twice: with
//! lapin, Ponte's client, and with amqprs; both run their socket I/O as tasks of the runtime.
//! Each forwarder runs in a process of its own, so that its CPU time is its own, as a task on
//! the runtime's workers, as Ponte's flows run; it moves a preloaded backlog, then a load
//! offered at a fixed rate. Prints a table; never fails on a timing.
//!
//! `cargo run --release --bin ponte-bench-clients -- --url amqp://guest:guest@127.0.0.1:5672/%2f`

use std::collections::{BTreeSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use ponte::settings::QueueType;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Gives up when a forwarder has had nothing to do for this long.
const STALLED: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(about = "CPU per message of a no-op forwarder with lapin and with amqprs")]
struct Args {
    /// The broker (a local one: the figures are for the same machine).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// Messages in the backlog each forwarder drains.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    messages: u64,
    /// Messages per second offered in the fixed-rate run (0: none).
    #[arg(long, default_value_t = 3_400)]
    rate: u32,
    /// How long the fixed-rate load is offered.
    #[arg(long, default_value_t = 10)]
    rate_secs: u32,
    /// Each client's runs, alternating, to see the spread.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// The type of the two queues.
    #[arg(long, value_enum, default_value = "classic")]
    queue_type: QueueType,
    /// The queues' names start with this (deleted after each run).
    #[arg(long, default_value = "bench-clients")]
    prefix: String,
    #[command(subcommand)]
    forward: Option<Forward>,
}

#[derive(Subcommand, Debug)]
enum Forward {
    /// Runs one forwarder until it has forwarded `count` messages; prints `ready` once it
    /// consumes, then `forwarded <count> <seconds> <cpu seconds>` from its first delivery on.
    #[command(hide = true)]
    Forward {
        #[arg(long)]
        client: Client,
        #[arg(long)]
        src: String,
        #[arg(long)]
        dst: String,
        #[arg(long)]
        count: u64,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum Client {
    Lapin,
    Amqprs,
}

impl Client {
    /// As the command line and the table write it.
    fn name(self) -> &'static str {
        match self {
            Client::Lapin => "lapin",
            Client::Amqprs => "amqprs",
        }
    }
}

/// What a forwarder is given to move.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Load {
    /// A backlog preloaded before it starts.
    Drain,
    /// Messages offered at a fixed rate while it runs.
    Rate,
}

/// Ponte's prefetch per partner queue.
const PREFETCH: u16 = ponte::settings::DEFAULT_PREFETCH;

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match &args.forward {
        Some(Forward::Forward {
            client,
            src,
            dst,
            count,
        }) => runtime.block_on(async {
            // On a worker, not on this thread: a forwarder that waits here hands every wait
            // across threads, to and from the workers where the client's I/O runs.
            let (url, client, src, dst, count) =
                (args.url.clone(), *client, src.clone(), dst.clone(), *count);
            tokio::spawn(async move { forward(&url, client, &src, &dst, count).await }).await?
        }),
        None => runtime.block_on(compare(&args)),
    }
}

/// One forwarder's run: the rate it moved its messages at, and its CPU per message.
#[derive(Debug, Clone, Copy)]
struct Run {
    rate: f64,
    cpu_us: f64,
}

async fn compare(args: &Args) -> Result<()> {
    let connection = Connection::connect(&args.url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let (src, dst) = (
        format!("{}.src", args.prefix),
        format!("{}.dst", args.prefix),
    );
    let mut runs: Runs = Vec::new();
    for client in [Client::Lapin, Client::Amqprs] {
        runs.push((client, Load::Drain, Vec::new()));
        if offered(args) > 0 {
            runs.push((client, Load::Rate, Vec::new()));
        }
    }
    let measured = measure(args, &channel, &mut runs, (&src, &dst)).await;
    // Finished or failed, the run leaves no queue behind.
    let mut deleted = Ok(());
    for queue in [&src, &dst] {
        if let Err(error) = channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await
        {
            deleted = Err(error);
        }
    }
    let _ = connection.close(200, "done".into()).await;
    measured?;
    deleted?;
    print_table(args, &runs);
    Ok(())
}

/// A client, its load and its runs so far.
type Runs = Vec<(Client, Load, Vec<Run>)>;

/// Messages offered in a fixed-rate run.
fn offered(args: &Args) -> u64 {
    u64::from(args.rate) * u64::from(args.rate_secs)
}

/// Runs every client's loads `args.rounds` times, alternating.
async fn measure(
    args: &Args,
    channel: &lapin::Channel,
    runs: &mut Runs,
    (src, dst): (&str, &str),
) -> Result<()> {
    for round in 1..=args.rounds {
        for (client, load, results) in runs.iter_mut() {
            for queue in [src, dst] {
                let _ = channel.queue_delete(queue.into(), Default::default()).await;
                ponte::broker::declare_queue(channel, queue, args.queue_type, true).await?;
            }
            let count = match load {
                Load::Drain => {
                    publish(channel, src, args.messages, None).await?;
                    args.messages
                }
                Load::Rate => offered(args),
            };
            let mut child = Command::new(std::env::current_exe()?)
                .args(["--url", &args.url, "forward", "--client"])
                .arg(client.name())
                .args(["--src", src, "--dst", dst, "--count"])
                .arg(count.to_string())
                .stdout(Stdio::piped())
                .spawn()?;
            let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
            let ready = lines.next().transpose()?;
            if ready.as_deref() != Some("ready") {
                bail!("the {client:?} forwarder did not start: {ready:?}");
            }
            if *load == Load::Rate {
                publish(channel, src, offered(args), Some(f64::from(args.rate))).await?;
            }
            let report = lines.next().transpose()?.unwrap_or_default();
            if !child.wait()?.success() {
                bail!("the {client:?} forwarder failed");
            }
            let figures: Vec<f64> = report
                .strip_prefix("forwarded ")
                .context("no report")?
                .split(' ')
                .map(str::parse)
                .collect::<Result<_, _>>()?;
            let [moved, secs, cpu] = figures[..] else {
                bail!("a report of three figures, not {report:?}");
            };
            let arrived = ponte::broker::declare_queue(channel, dst, args.queue_type, true)
                .await?
                .message_count();
            if moved as u64 != count || u64::from(arrived) != count {
                bail!("{client:?} forwarded {moved} of {count}; {arrived} arrived");
            }
            let run = Run {
                rate: moved / secs,
                cpu_us: cpu / moved * 1e6,
            };
            eprintln!(
                "round {round}: {} {load:?}: {:.0} msg/s, {:.1} µs CPU/msg",
                client.name(),
                run.rate,
                run.cpu_us
            );
            results.push(run);
        }
    }
    Ok(())
}

fn print_table(args: &Args, runs: &Runs) {
    println!(
        "{:<8} {:<26} {:>9} {:>24}",
        "client", "load", "msg/s", "µs CPU/msg (range)"
    );
    for (client, load, results) in runs {
        let load = match load {
            Load::Drain => format!("backlog of {}", args.messages),
            Load::Rate => format!("{} msg/s for {} s", args.rate, args.rate_secs),
        };
        let median = |pick: fn(&Run) -> f64| {
            let mut values: Vec<f64> = results.iter().map(pick).collect();
            values.sort_by(f64::total_cmp);
            let n = values.len();
            (
                // The mean of the two middle ones for an even count.
                (values[(n - 1) / 2] + values[n / 2]) / 2.0,
                values[0],
                values[values.len() - 1],
            )
        };
        let (rate, cpu) = (median(|r| r.rate).0, median(|r| r.cpu_us));
        println!(
            "{:<8} {load:<26} {rate:>9.0} {:>10.1} ({:.1}–{:.1})",
            client.name(),
            cpu.0,
            cpu.1,
            cpu.2
        );
    }
}

/// Publishes `count` persistent ~1 KB messages to `queue`, confirms pipelined; at `rate` per
/// second when given (open loop: each on its schedule, however the last one fared).
async fn publish(
    channel: &lapin::Channel,
    queue: &str,
    count: u64,
    rate: Option<f64>,
) -> Result<()> {
    let body = vec![b'x'; 1024];
    let properties = BasicProperties::default().with_delivery_mode(2);
    let started = tokio::time::Instant::now();
    let mut confirms = futures_util::stream::FuturesUnordered::new();
    for sent in 0..count {
        if let Some(rate) = rate {
            tokio::time::sleep_until(started + Duration::from_secs_f64(sent as f64 / rate)).await;
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                properties.clone(),
            )
            .await?;
        confirms.push(confirm);
        while let Some(Some(confirmed)) = confirms.next().now_or_never() {
            confirmed?;
        }
        while confirms.len() > 1_000 {
            confirms.next().await.context("confirms ended")??;
        }
    }
    while let Some(confirmed) = confirms.next().await {
        confirmed?;
    }
    Ok(())
}

/// The process's CPU time (user + system) in seconds.
fn cpu_secs() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// From the first delivery on: its instant and the CPU used until then.
struct Clock(Option<(Instant, f64)>);

impl Clock {
    fn start(&mut self) {
        if self.0.is_none() {
            self.0 = Some((Instant::now(), cpu_secs()));
        }
    }

    fn report(&self, count: u64) {
        let (at, cpu) = self.0.unwrap_or((Instant::now(), cpu_secs()));
        println!(
            "forwarded {count} {} {}",
            at.elapsed().as_secs_f64(),
            cpu_secs() - cpu
        );
    }
}

async fn forward(url: &str, client: Client, src: &str, dst: &str, count: u64) -> Result<()> {
    match client {
        Client::Lapin => forward_lapin(url, src, dst, count).await,
        Client::Amqprs => forward_amqprs(url, src, dst, count).await,
    }
}

/// The no-op forwarder with lapin: as `ponte-bench --forwarder` runs it.
async fn forward_lapin(url: &str, src: &str, dst: &str, count: u64) -> Result<()> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let inbound = connection.create_channel().await?;
    let outbound = connection.create_channel().await?;
    outbound
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut consumer = ponte::broker::consume(&inbound, src, "bench-clients", PREFETCH).await?;
    println!("ready");
    let (mut clock, mut done) = (Clock(None), 0);
    let mut confirms = futures_util::stream::FuturesOrdered::new();
    while done < count {
        tokio::select! {
            Some(first) = confirms.next(), if !confirms.is_empty() => {
                let (mut acker, confirmed): (lapin::Acker, lapin::Result<_>) = first;
                confirmed?;
                done += 1;
                while let Some(Some((next, confirmed))) = confirms.next().now_or_never() {
                    confirmed?;
                    acker = next;
                    done += 1;
                }
                acker.ack(BasicAckOptions { multiple: true }).await?;
            }
            delivery = tokio::time::timeout(STALLED, consumer.next()) => {
                let delivery = delivery.context("stalled")?.context("consumer ended")??;
                clock.start();
                let confirm = outbound
                    .basic_publish(
                        "".into(),
                        dst.into(),
                        BasicPublishOptions::default(),
                        &delivery.data,
                        delivery.properties.clone(),
                    )
                    .await?;
                let acker = delivery.acker;
                confirms.push_back(async move { (acker, confirm.await) });
            }
        }
    }
    clock.report(done);
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// The same forwarder with amqprs, whose confirms arrive through a channel callback: publishes
/// are numbered in order, and each inbound delivery is acknowledged once the copy of it and
/// those before it are confirmed.
async fn forward_amqprs(url: &str, src: &str, dst: &str, count: u64) -> Result<()> {
    use amqprs::channel::{
        BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments,
        ConfirmSelectArguments,
    };
    // Read by lapin's parser, as the lapin forwarder's URL is: the same host, credentials and
    // virtual host, percent-decoded alike.
    let uri: lapin::uri::AMQPUri = url.parse().map_err(anyhow::Error::msg)?;
    let arguments = amqprs::connection::OpenConnectionArguments::new(
        &uri.authority.host,
        uri.authority.port,
        &uri.authority.userinfo.username,
        &uri.authority.userinfo.password,
    )
    .virtual_host(&uri.vhost)
    .finish();
    let connection = amqprs::connection::Connection::open(&arguments).await?;
    let inbound = connection.open_channel(None).await?;
    let outbound = connection.open_channel(None).await?;
    let (acks, mut confirmed) = tokio::sync::mpsc::unbounded_channel();
    outbound.register_callback(Confirms(acks)).await?;
    outbound
        .confirm_select(ConfirmSelectArguments::default())
        .await?;
    inbound
        .basic_qos(BasicQosArguments::new(0, PREFETCH, false))
        .await?;
    let (_, mut deliveries) = inbound
        .basic_consume_rx(
            BasicConsumeArguments::new(src, "bench-clients")
                .manual_ack(true)
                .finish(),
        )
        .await?;
    println!("ready");
    let (mut clock, mut done) = (Clock(None), 0);
    // (publish number, inbound delivery tag), oldest first; confirms up to `upto` and those in
    // `singles` are in.
    let mut waiting: VecDeque<(u64, u64)> = VecDeque::new();
    let (mut published, mut upto, mut singles) = (0, 0, BTreeSet::new());
    while done < count {
        tokio::select! {
            Some((tag, multiple)) = confirmed.recv() => {
                let mut next = Some((tag, multiple));
                while let Some((tag, multiple)) = next {
                    if multiple {
                        upto = upto.max(tag);
                    } else {
                        singles.insert(tag);
                    }
                    next = confirmed.try_recv().ok();
                }
                let mut last = None;
                while let Some(&(number, tag)) = waiting.front() {
                    if number > upto && !singles.remove(&number) {
                        break;
                    }
                    waiting.pop_front();
                    last = Some(tag);
                    done += 1;
                }
                if let Some(tag) = last {
                    inbound.basic_ack(BasicAckArguments::new(tag, true)).await?;
                }
            }
            message = tokio::time::timeout(STALLED, deliveries.recv()) => {
                let message = message.context("stalled")?.context("consumer ended")?;
                clock.start();
                let (Some(deliver), Some(properties), Some(content)) =
                    (message.deliver, message.basic_properties, message.content)
                else {
                    bail!("a delivery without its content");
                };
                published += 1;
                waiting.push_back((published, deliver.delivery_tag()));
                outbound
                    .basic_publish(properties, content, BasicPublishArguments::new("", dst))
                    .await?;
            }
        }
    }
    clock.report(done);
    let _ = connection.close().await;
    Ok(())
}

/// Hands amqprs's publisher confirms to the forwarder: (publish number, multiple).
struct Confirms(tokio::sync::mpsc::UnboundedSender<(u64, bool)>);

#[async_trait::async_trait]
impl amqprs::callbacks::ChannelCallback for Confirms {
    async fn close(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }

    async fn cancel(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::Cancel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }

    async fn flow(
        &mut self,
        _: &amqprs::channel::Channel,
        active: bool,
    ) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _: &amqprs::channel::Channel, ack: amqprs::Ack) {
        let _ = self.0.send((ack.delivery_tag(), ack.mutiple()));
    }

    async fn publish_nack(&mut self, _: &amqprs::channel::Channel, nack: amqprs::Nack) {
        // A refused copy is not forwarded: the run then never counts it, and fails as stalled.
        eprintln!("the broker refused copy {}", nack.delivery_tag());
    }

    async fn publish_return(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::Return,
        _: amqprs::BasicProperties,
        _: Vec<u8>,
    ) {
    }
}
