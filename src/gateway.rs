//! Gateway: the supervisor. Connects, declares the topology, starts one flow per partner, and
//! when the broker fails tears everything down and starts again with backoff; a failure of one
//! flow alone (a partner's, the redelivery flow, a courier, the events publisher) starts that
//! flow again (see `supervise`). On shutdown stops consuming, waits for in-flight messages to
//! settle, and returns.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{join_all, try_join_all};
use lapin::Channel;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::{
    ANSWER_WITHIN, BrokerError, Events, Link, QueueNames, Queues, close_channel, close_channels,
    confirming_channel, connect, declare_topology,
};
use crate::courier::Courier;
use crate::directory::Directory;
use crate::partner::{Partner, Receipts};
use crate::pipeline::Pipeline;
use crate::prefetch::Window;
use crate::receive::Flow;
use crate::redeliver::Redeliverer;
use crate::settle::Settler;
use crate::shards::Shards;

/// Observable state of a running gateway, for readiness probes and tests.
#[derive(Debug, Clone)]
pub struct Status {
    ready: watch::Sender<bool>,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            ready: watch::Sender::new(false),
        }
    }
}

impl Status {
    /// True while connected, with the topology declared and every flow consuming.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until the gateway is ready.
    pub async fn ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }
}

/// Runs the gateway until `shutdown` is cancelled. Broker failures are never fatal: the gateway
/// keeps reconnecting, so it may also be started before the broker. Fails only if the threads
/// that run the flows cannot be started.
pub async fn run(
    pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
    status: Status,
) -> std::io::Result<()> {
    let directory = &pipeline.directory;
    let max_delay = Duration::from_secs(directory.settings.broker.max_reconnect_delay_secs.max(1));
    let mut delay = FIRST_DELAY;
    let mut reconnects: u64 = 0;
    // The flows' threads live as long as the gateway: a new session puts its groups on the same.
    let shards = Shards::start(directory.settings.runtime.workers)?;
    metrics::gauge!("ponte_runtime_workers").set(shards.threads() as f64);
    while !shutdown.is_cancelled() {
        let result = session(&pipeline, &shards, &shutdown, &status, &mut delay).await;
        status.ready.send_replace(false);
        if shutdown.is_cancelled() {
            break;
        }
        reconnects += 1;
        metrics::counter!("ponte_broker_reconnects_total").increment(1);
        match result {
            Ok(()) => warn!(reconnects, "restarting the broker session"),
            Err(error) => warn!(
                reconnects,
                %error,
                retry_in_ms = delay.as_millis() as u64,
                "broker session failed; reconnecting"
            ),
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(jitter(delay)) => {}
        }
        delay = (delay * 2).min(max_delay);
    }
    info!("gateway stopped");
    Ok(())
}

/// The first wait before reconnecting, or before starting a failed flow again; each failure in
/// a row doubles it, up to `broker.max_reconnect_delay_secs`.
const FIRST_DELAY: Duration = Duration::from_millis(200);

/// Partners whose flows share one pair of connections. lapin checks every channel of a
/// connection for flow control on each frame it writes, so thousands of channels on one
/// connection make every frame slow; small groups keep that check short.
pub const PARTNERS_PER_CONNECTION: usize = 64;

/// One connected period: returns `Ok` when asked to stop (or to reconnect), `Err` when the
/// broker failed.
async fn session(
    pipeline: &Arc<Pipeline>,
    shards: &Shards,
    shutdown: &CancellationToken,
    status: &Status,
    delay: &mut Duration,
) -> Result<(), BrokerError> {
    let directory: &Directory = &pipeline.directory;
    let session_stop = shutdown.child_token();
    let started = watch::Sender::new(false);
    // Opening the session — connections, topology, channels, every flow's consumer — has one
    // bound in all: a broker that accepts connections and then stops answering (a node busy
    // or partitioned, still sending heartbeats) would otherwise hold the session for ever.
    let setup_secs = directory.settings.broker.setup_timeout_secs;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(setup_secs);
    // Dropped unfinished, the opening closes what it opened and aborts the flows it started.
    let Opened {
        connections,
        mut flows,
        mut consuming,
        expected,
    } = tokio::select! {
        opened = tokio::time::timeout_at(deadline, open(pipeline, shards, &session_stop, &started)) => {
            opened.map_err(|_| BrokerError::SetupTimeout(setup_secs))??
        }
        () = session_stop.cancelled() => return Ok(()),
    };

    // Ready once every flow consumes; a flow that fails first ends the session.
    let mut consuming_flows = 0;
    let mut failure = None;
    while consuming_flows < expected && failure.is_none() {
        tokio::select! {
            Some(()) = consuming.recv() => consuming_flows += 1,
            Some(ended) = flows.join_next() => failure = flow_failure(ended),
            () = tokio::time::sleep_until(deadline) => {
                failure = Some(BrokerError::SetupTimeout(setup_secs));
            }
            () = session_stop.cancelled() => break,
        }
    }
    if failure.is_none() && consuming_flows == expected {
        // Backoff starts again from its shortest only once a session worked: a broker that
        // accepts connections and fails the set-up each time is not tried five times a second.
        *delay = FIRST_DELAY;
        started.send_replace(true);
        status.ready.send_replace(true);
        info!(
            partners = directory.partners.len(),
            connections = connections.len(),
            prefix = %directory.settings.broker.prefix,
            "gateway ready"
        );
    }
    if failure.is_some() {
        status.ready.send_replace(false);
        session_stop.cancel();
    }
    let bound = Duration::from_secs(directory.settings.broker.publish_timeout_secs) + WIND_DOWN;
    let failure = wind_down(&mut flows, failure, bound, || {
        // Not ready from the first failure on, not only once every flow has wound down
        // (a flow may wait up to publish_timeout_secs for confirms that will never come).
        status.ready.send_replace(false);
        session_stop.cancel();
    })
    .await;
    status.ready.send_replace(false);
    // Every flow has settled what it had in flight (or failed, leaving it to the broker). A
    // close waits for the broker's answer, which a connection that just died may never give:
    // the session, and with it the reconnect, must not wait for it. Dropped, a connection is
    // closed by the socket's end.
    join_all(connections.iter().map(|connection| {
        tokio::time::timeout(
            ANSWER_WITHIN,
            connection.close(200, "ponte stopping".into()),
        )
    }))
    .await;
    match failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// An opened session: its connections; its flows, consuming and waiting for `started`; the
/// channel on which each flow says it consumes, and how many will.
struct Opened {
    connections: Vec<Arc<Link>>,
    flows: JoinSet<Result<(), BrokerError>>,
    consuming: mpsc::Receiver<()>,
    expected: usize,
}

/// Connects, declares the topology, opens every channel and starts every flow.
async fn open(
    pipeline: &Arc<Pipeline>,
    shards: &Shards,
    session_stop: &CancellationToken,
    started: &watch::Sender<bool>,
) -> Result<Opened, BrokerError> {
    let directory: &Directory = &pipeline.directory;
    let queues = Arc::new(QueueNames::new(
        &Queues::new(&directory.settings.broker.prefix),
        directory.partners.keys().map(String::as_str),
    ));
    let partners: Vec<&Partner> = directory.partners.values().collect();
    let broker = &directory.settings.broker;
    let own: Vec<Option<u16>> = partners.iter().map(|p| p.prefetch).collect();
    // The partners without a prefetch of their own share the rest, following their traffic.
    let pool = broker.pool(&own).map(Arc::new);
    // Those flows start with windows where the backlog is: their queues are counted once
    // declared.
    let following = crate::prefetch::following(&partners, pool.as_deref());
    let counted: Vec<&str> = following.iter().map(|p| queues.inbound(&p.id)).collect();
    // The topology is declared while the flows' connections and channels open (flows start
    // consuming only once both are done): start-up is the longer of the two, not their sum.
    let topology = async {
        let setup = connect(directory, "ponte setup").await?;
        declare_topology(&setup, directory).await?;
        let backlogs = crate::broker::backlogs(&setup, &counted).await?;
        let _ =
            tokio::time::timeout(ANSWER_WITHIN, setup.close(200, "topology declared".into())).await;
        tracing::debug!("topology declared");
        Ok::<_, BrokerError>(backlogs)
    };
    let mut connections = Vec::new();
    let mut flows = JoinSet::new();
    let (ready_tx, ready_rx) = mpsc::channel::<()>(partners.len().max(1));
    // Open every group's connections and channels concurrently: start-up time is then a few
    // round trips, not one per channel. Each group opens on its shard, where lapin's I/O loops
    // for its connections then run; dropped unfinished, the set aborts what is still opening.
    let group_size = shards.group_size(partners.len(), PARTNERS_PER_CONNECTION);
    let mut opening = JoinSet::new();
    for (group, members) in partners.chunks(group_size).enumerate() {
        let directory = pipeline.directory.clone();
        let members = members.len();
        opening.spawn_on(
            async move {
                // Consuming and publishing use separate connections, so flow control that
                // blocks a publishing connection never stops acknowledgements from going out.
                let names = (
                    format!("ponte consume {group}"),
                    format!("ponte publish {group}"),
                );
                let (consuming, publishing) =
                    tokio::try_join!(connect(&directory, &names.0), connect(&directory, &names.1))?;
                let channels = try_join_all((0..members).map(|_| async {
                    let consume = consuming.create_channel().await?;
                    let publish = confirming_channel(&publishing).await?;
                    Ok::<_, BrokerError>((consume, publish))
                }))
                .await?;
                Ok::<_, BrokerError>((group, consuming, publishing, channels))
            },
            shards.of_group(group),
        );
    }
    let groups = async {
        let mut groups = Vec::with_capacity(opening.len());
        while let Some(opened) = opening.join_next().await {
            let opened = opened.map_err(|error| {
                warn!(%error, "opening a group of partners' connections ended abnormally");
                BrokerError::FlowPanicked
            })?;
            groups.push(opened?);
        }
        groups.sort_by_key(|(group, ..)| *group);
        Ok::<_, BrokerError>(groups)
    };
    let (backlogs, groups) = tokio::try_join!(topology, groups)?;
    let prefetches = crate::prefetch::starting(broker, &partners, pool.as_deref(), &backlogs);
    if pool.is_some() {
        let queued: u64 = backlogs.iter().map(|b| u64::from(*b)).sum();
        tracing::debug!(queued, "windows given where the backlog is");
    }
    let bytes_per_message = broker.bytes_per_message(&own);
    let operator = directory.settings.broker_user();
    let redeclared = Arc::new(Redeclared::default());
    for ((group, consuming, publishing, channels), members) in
        groups.into_iter().zip(partners.chunks(group_size))
    {
        let shard = shards.of_group(group);
        let (consuming, publishing) = (Arc::new(consuming), Arc::new(publishing));
        for (&partner, (consume, publish)) in members.iter().zip(channels) {
            let settler = Arc::new(Settler {
                channel: publish,
                frame_max: publishing.configuration().frame_max(),
                queues: queues.clone(),
                confirm_timeout_secs: directory.settings.broker.publish_timeout_secs,
                positive_receipts: partner.receipts == Receipts::All,
                // Each start of the flow has its own (see `supervise`).
                reconnect: CancellationToken::new(),
                store: pipeline.store.clone(),
                delivery: directory.settings.delivery.clone(),
                names: Queues::new(&directory.settings.broker.prefix),
                journal: pipeline.journal.clone(),
            });
            let flow = Flow {
                pipeline: pipeline.clone(),
                partner: partner.clone(),
                consume,
                prefetch: prefetches[partner.id.as_str()],
                // Only a flow that shares `broker.max_in_flight` keeps count of what it uses.
                window: pool
                    .clone()
                    .filter(|_| partner.prefetch.is_none())
                    .map(|pool| Window::new(pool, prefetches[partner.id.as_str()])),
                bytes_per_message,
                settler,
                operator: operator.clone(),
                started: started.subscribe(),
            };
            let supervised = Supervised {
                flow,
                on: Connections {
                    consuming: consuming.clone(),
                    publishing: publishing.clone(),
                    redeclared: redeclared.clone(),
                    directory: pipeline.directory.clone(),
                },
            };
            flows.spawn_on(
                supervise(
                    supervised,
                    session_stop.clone(),
                    started.subscribe(),
                    ready_tx.clone(),
                ),
                shard,
            );
        }
        connections.push(consuming);
        connections.push(publishing);
    }
    // The redelivery flow and the HTTP couriers share one more pair of connections.
    let (retry_consuming, retry_publishing) = tokio::try_join!(
        connect(directory, "ponte retry consume"),
        connect(directory, "ponte retry publish"),
    )?;
    let retry = Connections {
        consuming: Arc::new(retry_consuming),
        publishing: Arc::new(retry_publishing),
        redeclared,
        directory: pipeline.directory.clone(),
    };
    let names = Queues::new(&directory.settings.broker.prefix);
    let timeout_secs = directory.settings.broker.publish_timeout_secs;
    let (consume, publish) = retry.pair().await?;
    let redeliverer = Redeliverer {
        directory: pipeline.directory.clone(),
        consume,
        publish,
        journal: pipeline.journal.clone(),
    };
    flows.spawn(supervise(
        Supervised {
            flow: redeliverer,
            on: retry.clone(),
        },
        session_stop.clone(),
        started.subscribe(),
        ready_tx.clone(),
    ));
    let mut expected = partners.len() + 1;
    for (partner, endpoint) in &pipeline.endpoints {
        let (consume, publish) = retry.pair().await?;
        let courier = Courier {
            partner: partner.clone(),
            endpoint: endpoint.clone(),
            delivery: directory.settings.delivery.clone(),
            names: names.clone(),
            consume,
            publish,
            timeout_secs,
            journal: pipeline.journal.clone(),
        };
        flows.spawn(supervise(
            Supervised {
                flow: courier,
                on: retry.clone(),
            },
            session_stop.clone(),
            started.subscribe(),
            ready_tx.clone(),
        ));
        expected += 1;
    }
    if directory.settings.log.events_exchange {
        let events = Events {
            channel: retry.publishing.create_channel().await?,
            exchange: names.events(),
            records: pipeline.journal.subscribe(),
        };
        flows.spawn(supervise(
            Supervised {
                flow: events,
                on: retry.clone(),
            },
            session_stop.clone(),
            started.subscribe(),
            ready_tx.clone(),
        ));
    }
    connections.push(retry.consuming);
    connections.push(retry.publishing);
    drop(ready_tx);
    tracing::debug!(
        connections = connections.len(),
        "channels open; waiting for every flow to consume"
    );
    Ok(Opened {
        connections,
        flows,
        consuming: ready_rx,
        expected,
    })
}

/// A flow the session can start again alone, on new channels of the connections it runs on: a
/// partner's inbound flow, the redelivery flow, an HTTP partner's courier, the events publisher.
trait Restartable: Send {
    /// What the log and `ponte_flow_restarts_total` call it: the kind of flow (`inbound`,
    /// `redelivery`, `courier`, `events`) and its partner (empty for the redelivery flow and the
    /// events publisher).
    fn name(&self) -> (&'static str, &str);
    /// Closes its channels, once it has failed.
    fn close(&self) -> impl Future<Output = ()> + Send;
    /// Opens new channels on `on` for its next run.
    fn reopen(&mut self, on: &Connections) -> impl Future<Output = Result<(), BrokerError>> + Send;
    /// Runs until `stop` is cancelled (`Ok`) or it fails; says so on `ready`, when given one, once
    /// it consumes.
    fn run(
        &mut self,
        stop: CancellationToken,
        ready: Option<mpsc::Sender<()>>,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;
}

impl Restartable for Flow {
    fn name(&self) -> (&'static str, &str) {
        ("inbound", &self.partner.id)
    }

    async fn close(&self) {
        close_channels(&self.consume, &self.settler.channel, "flow restarting").await;
    }

    async fn reopen(&mut self, on: &Connections) -> Result<(), BrokerError> {
        let (consume, publish) = on.pair().await?;
        self.consume = consume;
        self.settler = Arc::new(Settler {
            channel: publish,
            ..(*self.settler).clone()
        });
        Ok(())
    }

    async fn run(
        &mut self,
        stop: CancellationToken,
        ready: Option<mpsc::Sender<()>>,
    ) -> Result<(), BrokerError> {
        // The flow's settlements ask for a restart by cancelling this run's token.
        self.settler = Arc::new(Settler {
            reconnect: stop.clone(),
            ..(*self.settler).clone()
        });
        Flow::run(self, stop, ready).await
    }
}

impl Restartable for Redeliverer {
    fn name(&self) -> (&'static str, &str) {
        ("redelivery", "")
    }

    async fn close(&self) {
        close_channels(&self.consume, &self.publish, "flow restarting").await;
    }

    async fn reopen(&mut self, on: &Connections) -> Result<(), BrokerError> {
        (self.consume, self.publish) = on.pair().await?;
        Ok(())
    }

    async fn run(
        &mut self,
        stop: CancellationToken,
        ready: Option<mpsc::Sender<()>>,
    ) -> Result<(), BrokerError> {
        Redeliverer::run(self, stop, ready).await
    }
}

impl Restartable for Courier {
    fn name(&self) -> (&'static str, &str) {
        ("courier", &self.partner)
    }

    async fn close(&self) {
        close_channels(&self.consume, &self.publish, "flow restarting").await;
    }

    async fn reopen(&mut self, on: &Connections) -> Result<(), BrokerError> {
        (self.consume, self.publish) = on.pair().await?;
        Ok(())
    }

    async fn run(
        &mut self,
        stop: CancellationToken,
        ready: Option<mpsc::Sender<()>>,
    ) -> Result<(), BrokerError> {
        Courier::run(self, stop, ready).await
    }
}

/// The events publisher consumes nothing and publishes without confirms: one plain channel. It
/// is not among the flows the session waits for to be ready.
impl Restartable for Events {
    fn name(&self) -> (&'static str, &str) {
        ("events", "")
    }

    async fn close(&self) {
        close_channel(&self.channel, "flow restarting").await;
    }

    async fn reopen(&mut self, on: &Connections) -> Result<(), BrokerError> {
        self.channel = on.publishing.create_channel().await?;
        Ok(())
    }

    async fn run(
        &mut self,
        stop: CancellationToken,
        _ready: Option<mpsc::Sender<()>>,
    ) -> Result<(), BrokerError> {
        Events::run(self, stop).await
    }
}

/// A flow with what it takes to start it again on new channels.
struct Supervised<F> {
    flow: F,
    on: Connections,
}

/// The connections a group of flows runs on, and what declares the topology again.
#[derive(Clone)]
struct Connections {
    consuming: Arc<Link>,
    publishing: Arc<Link>,
    /// Shared by every flow of the session.
    redeclared: Arc<Redeclared>,
    directory: Arc<Directory>,
}

impl Connections {
    /// A channel to consume on and one to publish on with confirms: what a flow that forwards
    /// messages runs on.
    async fn pair(&self) -> Result<(Channel, Channel), BrokerError> {
        let consume = self.consuming.create_channel().await?;
        Ok((consume, confirming_channel(&self.publishing).await?))
    }
}

/// The topology declared again for the flows that start again: once for every flow that failed
/// before that declaration began. A failure that hits many flows at once (a publishing connection
/// blocked for every flow of a group, say) would otherwise have each of them declare the whole
/// topology at the same time.
#[derive(Default)]
struct Redeclared(tokio::sync::Mutex<Option<tokio::time::Instant>>);

impl Redeclared {
    /// Runs `declare`, unless a declaration that began after `failed` has done its work (one
    /// under way is waited for).
    async fn after(
        &self,
        failed: tokio::time::Instant,
        declare: impl Future<Output = Result<(), BrokerError>>,
    ) -> Result<(), BrokerError> {
        let mut began = self.0.lock().await;
        if began.is_some_and(|at| at >= failed) {
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        declare.await?;
        *began = Some(now);
        Ok(())
    }
}

/// Runs a flow for the session. Once the session has started, a failure of this flow alone —
/// its channel closed by the broker, its consumer cancelled (its queue deleted), a copy returned
/// as unroutable or not confirmed in time, a bug — starts this flow again, after a backoff, on
/// new channels of the same connections, once the topology is declared again (a queue deleted by
/// mistake comes back): the other flows go on undisturbed. The failure is returned, and ends the
/// session, when it comes before the session has started, when a connection of the flow is
/// down, or when starting the flow again fails.
async fn supervise(
    mut s: Supervised<impl Restartable>,
    session_stop: CancellationToken,
    started: watch::Receiver<bool>,
    ready: mpsc::Sender<()>,
) -> Result<(), BrokerError> {
    let directory = s.on.directory.clone();
    let broker = &directory.settings.broker;
    let max_delay = Duration::from_secs(broker.max_reconnect_delay_secs.max(1));
    let (kind, partner) = s.flow.name();
    let partner = partner.to_string();
    let mut delay = FIRST_DELAY;
    let mut ready = Some(ready);
    loop {
        let run_stop = session_stop.child_token();
        let began = tokio::time::Instant::now();
        let ran = AssertUnwindSafe(s.flow.run(run_stop.clone(), ready.take()))
            .catch_unwind()
            .await;
        let failure = match ran {
            Ok(Ok(())) if session_stop.is_cancelled() => return Ok(()),
            Ok(Ok(())) => BrokerError::SettleFailed,
            Ok(Err(error)) => error,
            Err(_) => {
                warn!(flow = kind, partner, "a flow ended abnormally");
                BrokerError::FlowPanicked
            }
        };
        let failed = tokio::time::Instant::now();
        let connected = s.on.consuming.status().connected() && s.on.publishing.status().connected();
        if session_stop.is_cancelled() || !*started.borrow() || !connected {
            return Err(failure);
        }
        if began.elapsed() >= max_delay {
            delay = FIRST_DELAY;
        }
        metrics::counter!("ponte_flow_restarts_total", "flow" => kind, "partner" => partner.clone())
            .increment(1);
        warn!(
            flow = kind,
            partner,
            error = %failure,
            retry_in_ms = delay.as_millis() as u64,
            "the flow failed; starting it again alone"
        );
        s.flow.close().await;
        let setup_secs = broker.setup_timeout_secs;
        let reopen = async {
            tokio::time::sleep(jitter(delay)).await;
            let declare = declare_topology(&s.on.consuming, &directory);
            s.on.redeclared.after(failed, declare).await?;
            s.flow.reopen(&s.on).await
        };
        let reopened = tokio::select! {
            () = session_stop.cancelled() => return Ok(()),
            reopened = tokio::time::timeout(Duration::from_secs(setup_secs) + delay, reopen) => reopened,
        };
        reopened.map_err(|_| BrokerError::SetupTimeout(setup_secs))??;
        delay = (delay * 2).min(max_delay);
    }
}

/// How long beyond the confirm timeout the flows may take to wind down once one has failed.
const WIND_DOWN: Duration = Duration::from_secs(5);

/// Waits for every flow to end and returns the first failure (`failure`, or the first flow's),
/// calling `failed` at each flow's failure. Once a failure is known, the others have `bound`
/// to wind down: a flow waits at most the confirm timeout for what it has in flight, but an
/// await on a connection that died at the wrong moment may never end, and the session — and
/// with it the reconnect — would wait for it for ever. Flows left after `bound` are aborted:
/// the session is ending, and their unacknowledged messages come back to their queues when its
/// connections close. Without a failure (shutdown), every flow settles what it has, however
/// long that takes.
async fn wind_down(
    flows: &mut JoinSet<Result<(), BrokerError>>,
    mut failure: Option<BrokerError>,
    bound: Duration,
    mut failed: impl FnMut(),
) -> Option<BrokerError> {
    let mut deadline = failure
        .as_ref()
        .map(|_| tokio::time::Instant::now() + bound);
    loop {
        let ended = match deadline {
            None => flows.join_next().await,
            Some(at) => match tokio::time::timeout_at(at, flows.join_next()).await {
                Ok(ended) => ended,
                Err(_) => {
                    warn!(
                        flows = flows.len(),
                        secs = bound.as_secs_f64(),
                        "flows did not wind down after a failure; abandoning them (their unacknowledged messages come back to their queues)"
                    );
                    flows.abort_all();
                    while flows.join_next().await.is_some() {}
                    return failure;
                }
            },
        };
        let Some(ended) = ended else {
            return failure;
        };
        if let Some(error) = flow_failure(ended) {
            failed();
            failure.get_or_insert(error);
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + bound);
        }
    }
}

fn flow_failure(
    ended: Result<Result<(), BrokerError>, tokio::task::JoinError>,
) -> Option<BrokerError> {
    match ended {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(error),
        Err(panic) => {
            // A bug, not a broker failure: restart the session so the partner's flow resumes.
            warn!(%panic, "a flow ended abnormally");
            Some(BrokerError::FlowPanicked)
        }
    }
}

/// Spreads reconnect attempts of several gateways so they do not hit a recovering broker in step.
fn jitter(delay: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    delay.mul_f64(0.75 + f64::from(nanos % 1000) / 2000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn once_a_flow_failed_one_that_never_ends_is_abandoned_after_the_bound() {
        let mut flows = JoinSet::new();
        flows.spawn(std::future::pending::<Result<(), BrokerError>>());
        flows.spawn(async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Err(BrokerError::Nacked)
        });
        let started = std::time::Instant::now();
        let mut failures = 0;
        let failure = tokio::time::timeout(
            Duration::from_secs(10),
            wind_down(&mut flows, None, Duration::from_millis(200), || {
                failures += 1
            }),
        )
        .await
        .expect("the session ends although a flow never does");
        assert!(matches!(failure, Some(BrokerError::Nacked)));
        assert_eq!(failures, 1);
        assert!(flows.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn flows_that_failed_together_declare_the_topology_once_and_a_later_failure_again() {
        let redeclared = Redeclared::default();
        let declared = std::sync::atomic::AtomicUsize::new(0);
        let declare = || async {
            declared.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(())
        };
        let failed = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (a, b, c) = tokio::join!(
            redeclared.after(failed, declare()),
            redeclared.after(failed, declare()),
            redeclared.after(failed, declare()),
        );
        assert!(a.is_ok() && b.is_ok() && c.is_ok());
        assert_eq!(declared.load(std::sync::atomic::Ordering::SeqCst), 1);

        // A flow that fails once that declaration has begun needs one of its own.
        let later = tokio::time::Instant::now();
        redeclared.after(later, declare()).await.unwrap();
        assert_eq!(declared.load(std::sync::atomic::Ordering::SeqCst), 2);

        // A failed declaration does not count: the next flow declares again.
        let failing = tokio::time::Instant::now();
        let refused = redeclared
            .after(failing, async { Err(BrokerError::Nacked) })
            .await;
        assert!(refused.is_err());
        redeclared.after(failing, declare()).await.unwrap();
        assert_eq!(declared.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn without_a_failure_every_flow_settles_however_long_it_takes() {
        let mut flows = JoinSet::new();
        for _ in 0..2 {
            flows.spawn(async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(())
            });
        }
        let started = std::time::Instant::now();
        let failure = wind_down(&mut flows, None, Duration::from_millis(50), || {}).await;
        assert!(failure.is_none());
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(flows.is_empty());
    }
}
