//! Broker: connecting to RabbitMQ, the queue names of the wire contract, and the topology the
//! gateway declares (idempotently) before it consumes.

use futures_util::future::try_join_all;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Value, json};

use std::path::Path;

use crate::directory::Directory;
use crate::settings::{BrokerSettings, QueueType};

/// A failure of the broker or of the connection to it. Always transient for the messages in
/// flight: they are not acknowledged, so the broker hands them back.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker URL: {0}")]
    Url(String),
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("queue {queue} does not exist; start the gateway once so it declares its queues")]
    NoQueue { queue: String },
    #[error("the broker did not confirm a publish within {0} s")]
    ConfirmTimeout(u64),
    #[error("the connection to the broker did not open within {0} s")]
    ConnectTimeout(u64),
    #[error(
        "the session did not open within {0} s (connections, topology, channels and consumers)"
    )]
    SetupTimeout(u64),
    #[error("the broker did not answer {0} within {1} s")]
    NoAnswer(&'static str, u64),
    #[error("the broker refused a publish (nack)")]
    Nacked,
    #[error("a flow ended abnormally")]
    FlowPanicked,
    /// Logged, with its cause, where the message was handed back.
    #[error("a flow stopped after a broker failure while settling a message")]
    SettleFailed,
    #[error("the consumer on {queue} was cancelled by the broker")]
    ConsumerCancelled { queue: String },
    #[error("the channel closed before the message could be acknowledged")]
    ChannelClosed,
}

/// The queue names of one gateway installation (BRIEF.md: `<prefix>.in.<partner>` …).
#[derive(Debug, Clone)]
pub struct Queues {
    pub prefix: String,
}

impl Queues {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }
    /// Written by the partner (its broker user may write only here), read by Ponte.
    pub fn inbound(&self, partner: &str) -> String {
        format!("{}.in.{partner}", self.prefix)
    }
    /// Messages delivered to the partner.
    pub fn outbound(&self, partner: &str) -> String {
        format!("{}.out.{partner}", self.prefix)
    }
    /// One receipt per message the partner sent.
    pub fn receipts(&self, partner: &str) -> String {
        format!("{}.receipts.{partner}", self.prefix)
    }
    /// The original of each message of the partner that was rejected, with its reason.
    pub fn rejected(&self, partner: &str) -> String {
        format!("{}.rejected.{partner}", self.prefix)
    }
    /// Messages for the partner that could not be delivered after retries.
    pub fn dead_letters(&self, partner: &str) -> String {
        format!("{}.dlq.{partner}", self.prefix)
    }
    /// Copies waiting to be tried again after `delay_ms` (a delay queue: messages expire into
    /// the redelivery queue).
    pub fn retry(&self, delay_ms: u64) -> String {
        format!("{}.retry.{delay_ms}ms", self.prefix)
    }
    /// Copies whose wait in a delay queue is over, consumed by Ponte to try them again.
    pub fn redeliver(&self) -> String {
        format!("{}.redeliver", self.prefix)
    }
    /// Topic exchange receiving every delivery-log record, when `log.events_exchange` is on.
    pub fn events(&self) -> String {
        format!("{}.events", self.prefix)
    }
    /// All five queues of a partner.
    pub fn of_partner(&self, partner: &str) -> [String; 5] {
        [
            self.inbound(partner),
            self.outbound(partner),
            self.receipts(partner),
            self.rejected(partner),
            self.dead_letters(partner),
        ]
    }
}

/// Every configured partner's queue names, computed once so the hot path never formats them.
#[derive(Debug)]
pub struct QueueNames {
    by_partner: crate::ConfigMap<String, PartnerQueues>,
}

#[derive(Debug)]
struct PartnerQueues {
    id: std::sync::Arc<str>,
    inbound: String,
    outbound: String,
    receipts: String,
    rejected: String,
    /// Copies published to this partner and not yet confirmed (`ponte_copies_in_flight`).
    in_flight: metrics::Gauge,
}

impl QueueNames {
    pub fn new<'a>(queues: &Queues, partners: impl IntoIterator<Item = &'a str>) -> Self {
        let by_partner = partners
            .into_iter()
            .map(|p| {
                let names = PartnerQueues {
                    id: p.into(),
                    inbound: queues.inbound(p),
                    outbound: queues.outbound(p),
                    receipts: queues.receipts(p),
                    rejected: queues.rejected(p),
                    in_flight: metrics::gauge!("ponte_copies_in_flight", "recipient" => p.to_string()),
                };
                (p.to_string(), names)
            })
            .collect();
        Self { by_partner }
    }

    fn get(&self, partner: &str) -> &PartnerQueues {
        self.by_partner
            .get(partner)
            .unwrap_or_else(|| panic!("{partner} is not a configured partner"))
    }

    pub fn inbound(&self, partner: &str) -> &str {
        &self.get(partner).inbound
    }
    pub fn outbound(&self, partner: &str) -> &str {
        &self.get(partner).outbound
    }
    /// The partner's shared id and its outbound queue.
    pub fn outbound_entry(&self, partner: &str) -> (std::sync::Arc<str>, &str) {
        let q = self.get(partner);
        (q.id.clone(), &q.outbound)
    }
    pub fn receipts(&self, partner: &str) -> &str {
        &self.get(partner).receipts
    }
    /// The gauge of `partner`'s copies awaiting their confirm.
    pub fn in_flight(&self, partner: &str) -> &metrics::Gauge {
        &self.get(partner).in_flight
    }
    pub fn rejected(&self, partner: &str) -> &str {
        &self.get(partner).rejected
    }
}

/// Opens a connection. lapin's automatic recovery stays off: the gateway's own supervisor
/// reconnects, redeclares and resumes, so every step of recovery is visible and tested.
pub async fn connect(directory: &Directory, name: &str) -> Result<Link, BrokerError> {
    let uri = directory.settings.broker_uri().map_err(BrokerError::Url)?;
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let secs = directory.settings.broker.connect_timeout_secs;
    // Until it is a `Link`, the socket is severed however this ends: failed, timed out, or
    // dropped unfinished (beside another connection that failed, say).
    let mut link = Link {
        connection: None,
        socket: Socket::default(),
        watching: None,
    };
    let tls = directory.broker_tls.0.clone();
    let opening = open_link(uri, properties, tls, link.socket.clone());
    let connection = tokio::time::timeout(std::time::Duration::from_secs(secs), opening)
        .await
        .map_err(|_| BrokerError::ConnectTimeout(secs))??;
    let events = connection.events_listener();
    link.watching = Some(tokio::spawn(watch_blocked(events, name.to_owned())).abort_handle());
    link.connection = Some(connection);
    Ok(link)
}

/// Says when the broker blocks the connection `name` (`connection.blocked`: a memory or disk
/// alarm; the broker reads none of its publishes until it is over) and when it unblocks it: a
/// WARN and then an INFO line, and `ponte_broker_blocked{connection}` 1 meanwhile. Its copies
/// wait meanwhile, their publish timeouts stopped ([`crate::deliver::confirmed`]); without a
/// word, an operator would see only a gateway that stopped delivering.
async fn watch_blocked(events: impl futures_util::Stream<Item = lapin::Event>, name: String) {
    use futures_util::StreamExt;
    /// Sets the gauge back to 0 however the watch ends: a connection that ends blocked takes
    /// its block with it.
    struct Blocked {
        gauge: metrics::Gauge,
        since: Option<std::time::Instant>,
    }
    impl Drop for Blocked {
        fn drop(&mut self) {
            if self.since.is_some() {
                self.gauge.set(0.0);
            }
        }
    }
    let mut blocked = Blocked {
        gauge: metrics::gauge!("ponte_broker_blocked", "connection" => name.clone()),
        since: None,
    };
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            lapin::Event::ConnectionBlocked(reason) if blocked.since.is_none() => {
                tracing::warn!(
                    connection = %name,
                    %reason,
                    "the broker blocks this connection (a memory or disk alarm): \
                     what it publishes waits until the broker unblocks it"
                );
                blocked.gauge.set(1.0);
                blocked.since = Some(std::time::Instant::now());
            }
            lapin::Event::ConnectionUnblocked => {
                if let Some(since) = blocked.since.take() {
                    tracing::info!(
                        connection = %name,
                        blocked_secs = since.elapsed().as_secs_f64(),
                        "the broker unblocked this connection"
                    );
                    blocked.gauge.set(0.0);
                }
            }
            _ => {}
        }
    }
}

/// A connection to the broker that, once dropped, ends its socket at once.
///
/// lapin lets go of a connection only through the AMQP close handshake or missed heartbeats:
/// a connection given up on while the broker is alive but silent (a set-up past its deadline,
/// a close without an answer, a handshake that never finishes) kept its I/O loop and its
/// socket for as long as the broker kept silent — three of each for every failed attempt to
/// open a session. A `Link` keeps a second handle on the socket and shuts it down when dropped
/// (after a clean close too: the socket then ends at once, whoever would have ended it), which
/// ends lapin's I/O loop with it.
pub struct Link {
    /// Set once open.
    connection: Option<Connection>,
    socket: Socket,
    /// The watch of its blocks ([`watch_blocked`]), ended with it.
    watching: Option<tokio::task::AbortHandle>,
}

impl std::ops::Deref for Link {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.connection
            .as_ref()
            .expect("a link is handed out only once open")
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.socket.sever();
        if let Some(watching) = &self.watching {
            watching.abort();
        }
    }
}

/// A second handle on a connection's TCP socket, set once the socket is connected.
#[derive(Clone, Default)]
struct Socket(std::sync::Arc<std::sync::Mutex<Held>>);

#[derive(Default)]
enum Held {
    #[default]
    Connecting,
    Open(std::net::TcpStream),
    /// Given up on: lapin, which tries the connection again when the broker ends it during the
    /// handshake, is refused a new one.
    Severed,
}

impl Socket {
    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Shuts the socket down in both directions (whoever reads it sees its end), and any
    /// socket connected for it later.
    fn sever(&self) {
        if let Held::Open(socket) = std::mem::replace(&mut *self.held(), Held::Severed) {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Keeps a duplicate of `socket`, just connected; refused once severed.
    fn keep(&self, socket: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
        let mut held = self.held();
        if let Held::Severed = *held {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the connection was given up on",
            ));
        }
        *held = Held::Open(std::net::TcpStream::from(socket.try_clone_to_owned()?));
        Ok(())
    }
}

/// Opens a connection as `lapin::Connection::connect_uri` does — TCP, then TLS for `amqps`,
/// trusting the system's authorities and those of `tls` and showing its client certificate —
/// keeping a duplicate of the TCP socket in `socket`.
async fn open_link(
    uri: lapin::uri::AMQPUri,
    properties: ConnectionProperties,
    tls: lapin::tcp::OwnedTLSConfig,
    socket: Socket,
) -> Result<Connection, lapin::Error> {
    let runtime = lapin::runtime::default_runtime()?;
    Connection::connector(
        uri,
        runtime,
        async move |uri, runtime| {
            let (host, port) = (uri.authority.host.clone(), uri.authority.port);
            let addresses = runtime.to_socket_addrs((host.clone(), port));
            let stream = lapin::tcp::AsyncTcpStream::connect(&runtime, addresses).await?;
            match &stream {
                lapin::tcp::AsyncTcpStream::Plain(tcp) => {
                    socket.keep(std::os::fd::AsFd::as_fd(tcp.get_ref()))?
                }
                // `connect` gives plain TCP; TLS comes after, below.
                _ => return Err(std::io::Error::other("not a plain TCP stream").into()),
            }
            Ok(match uri.scheme {
                lapin::uri::AMQPScheme::AMQP => stream,
                lapin::uri::AMQPScheme::AMQPS => stream.into_tls(&host, tls.as_ref()).await?,
            })
        },
        properties,
    )
    .await
}

/// What a TLS connection to the broker trusts besides the system's authorities
/// (`broker.ca_file`) and the client certificate it shows (`broker.client_identity_file`), read
/// and checked once, with the rest of the configuration.
#[derive(Clone, Default)]
pub struct BrokerTls(lapin::tcp::OwnedTLSConfig);

impl BrokerTls {
    /// Reads the files `settings` names, relative to the configuration folder `dir`; every
    /// problem is a sentence naming its setting and file.
    pub fn load(settings: &BrokerSettings, dir: &Path) -> Result<BrokerTls, Vec<String>> {
        let at = |file: &Option<std::path::PathBuf>| file.as_ref().map(|f| dir.join(f));
        let crate::pem::Section {
            authorities,
            identity,
        } = crate::pem::section(
            "broker",
            at(&settings.ca_file).as_deref(),
            at(&settings.client_identity_file).as_deref(),
        )?;
        Ok(BrokerTls(lapin::tcp::OwnedTLSConfig {
            identity: identity.map(|pem| lapin::tcp::OwnedIdentity::PKCS8 {
                pem: pem.clone(),
                key: pem,
            }),
            // PEM is ASCII: what parsed as certificates is text.
            cert_chain: authorities.map(|pem| String::from_utf8_lossy(&pem).into_owned()),
        }))
    }
}

/// Says what is configured, never the key.
impl std::fmt::Debug for BrokerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerTls")
            .field("authorities", &self.0.cert_chain.is_some())
            .field("client_identity", &self.0.identity.is_some())
            .finish()
    }
}

/// A channel with publisher confirms switched on.
pub async fn confirming_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Declares every partner's five durable queues, and the fanout exchange in front of its inbound
/// queue. Safe to repeat: declaring what exists with the same arguments changes nothing.
///
/// Partners publish to the exchange `<prefix>.in.<partner>` (same name as the queue): RabbitMQ
/// checks write permission on the exchange, so a partner's broker user can be allowed to write
/// to its own inbound exchange and nowhere else — which is what makes "sender = queue owner" a
/// proof of origin. (The default exchange would let any user that may write to it reach any
/// queue.)
pub async fn declare_topology(
    connection: &Connection,
    directory: &Directory,
) -> Result<(), BrokerError> {
    let partners: Vec<&crate::partner::Partner> = directory.partners.values().collect();
    let per_channel = partners.len().div_ceil(DECLARING_CHANNELS).max(1);
    let shared = async {
        let channel = connection.create_channel().await?;
        if directory.settings.log.events_exchange {
            let events = Queues::new(&directory.settings.broker.prefix).events();
            declare_exchange(&channel, &events, ExchangeKind::Topic).await?;
        }
        for (queue, arguments) in retry_queues(directory) {
            declare_queue_with(&channel, &queue, arguments, true).await?;
        }
        let _ = channel.close(200, "declared".into()).await;
        Ok::<_, BrokerError>(())
    };
    let partners = try_join_all(partners.chunks(per_channel).map(|chunk| async move {
        let channel = connection.create_channel().await?;
        let queues = Queues::new(&directory.settings.broker.prefix);
        for partner in chunk {
            let inbound = queues.inbound(&partner.id);
            declare_exchange(&channel, &inbound, ExchangeKind::Fanout).await?;
            for (queue, arguments) in partner_queues(directory, partner) {
                declare_queue_with(&channel, &queue, arguments, false).await?;
            }
            channel
                .queue_bind(
                    inbound.as_str().into(),
                    inbound.as_str().into(),
                    "".into(),
                    QueueBindOptions { nowait: true },
                    FieldTable::default(),
                )
                .await?;
        }
        // The declarations above are sent without waiting for each answer (thousands of round
        // trips for a large directory); the broker handles a channel's methods in order and
        // closes the channel on the first that fails, so one synchronous call at the end
        // confirms them all.
        if let Some(last) = chunk.last() {
            ready(&channel, &queues.inbound(&last.id)).await?;
        }
        let _ = channel.close(200, "declared".into()).await;
        Ok::<_, BrokerError>(())
    }));
    tokio::try_join!(shared, partners)?;
    Ok(())
}

/// How many messages each of `queues` holds ready now (passive declarations, over
/// [`COUNTING_CHANNELS`] channels at once): where a gateway starting on a backlog gives its
/// windows.
pub async fn backlogs(connection: &Connection, queues: &[&str]) -> Result<Vec<u32>, BrokerError> {
    let per_channel = queues.len().div_ceil(COUNTING_CHANNELS).max(1);
    let counts = try_join_all(queues.chunks(per_channel).map(|chunk| async move {
        let channel = connection.create_channel().await?;
        let mut counts = Vec::with_capacity(chunk.len());
        for queue in chunk {
            counts.push(ready(&channel, queue).await?);
        }
        let _ = channel.close(200, "counted".into()).await;
        Ok::<_, BrokerError>(counts)
    }))
    .await?;
    Ok(counts.concat())
}

/// How many messages `queue` holds ready: a passive declaration, which fails (and closes the
/// channel) when the queue does not exist.
pub async fn ready(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(declared.message_count())
}

/// Channels the queues are counted on at once: each count is a round trip, a thousand of them
/// on four channels added 0.1–0.4 s to the start-up of the benchmark with 1,000 partners.
const COUNTING_CHANNELS: usize = 16;

/// Channels a directory's topology is declared on at once: the broker handles each channel in
/// a process of its own, so thousands of declarations are spread over its cores.
const DECLARING_CHANNELS: usize = 4;

async fn declare_exchange(
    channel: &Channel,
    exchange: &str,
    kind: ExchangeKind,
) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            exchange.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                nowait: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// The same topology as a RabbitMQ definitions document (`rabbitmqctl import_definitions`),
/// for teams that pre-provision brokers. `deploy/definitions.json` is this for the demo.
pub fn definitions(directory: &Directory, vhost: &str) -> Value {
    let queues = Queues::new(&directory.settings.broker.prefix);
    let mut q = Vec::new();
    let mut exchanges_json = Vec::new();
    let mut bindings = Vec::new();
    let as_json = |arguments: &FieldTable| -> Value {
        arguments
            .inner()
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
                    AMQPValue::LongLongInt(n) => json!(n),
                    other => json!(format!("{other:?}")),
                };
                (k.to_string(), v)
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    for (queue, arguments) in all_queues(directory) {
        q.push(json!({
            "name": queue, "vhost": vhost, "durable": true, "auto_delete": false,
            "arguments": as_json(&arguments)
        }));
    }
    for (exchange, kind) in exchanges(directory) {
        let kind = match kind {
            ExchangeKind::Topic => "topic",
            _ => "fanout",
        };
        exchanges_json.push(json!({
            "name": exchange, "vhost": vhost, "type": kind, "durable": true,
            "auto_delete": false, "internal": false, "arguments": {}
        }));
    }
    for partner in directory.partners.keys() {
        let inbound = queues.inbound(partner);
        bindings.push(json!({
            "source": inbound, "vhost": vhost, "destination": inbound,
            "destination_type": "queue", "routing_key": "", "arguments": {}
        }));
    }
    json!({
        "vhosts": [{"name": vhost}],
        "queues": q,
        "exchanges": exchanges_json,
        "bindings": bindings
    })
}

/// Declares one durable queue of `queue_type`, as the topology has it. With `wait` the broker's
/// answer (holding the queue's message count) is awaited; without, the declaration is only sent.
pub async fn declare_queue(
    channel: &Channel,
    queue: &str,
    queue_type: QueueType,
    wait: bool,
) -> Result<lapin::Queue, BrokerError> {
    declare_queue_with(channel, queue, queue_arguments(queue_type), wait).await
}

/// Every queue of the topology with its arguments: each partner's five, then the retry queues.
pub fn all_queues(directory: &Directory) -> Vec<(String, FieldTable)> {
    let mut all: Vec<_> = directory
        .partners
        .values()
        .flat_map(|partner| partner_queues(directory, partner))
        .collect();
    all.extend(retry_queues(directory));
    all
}

/// A partner's five queues with their arguments.
fn partner_queues(
    directory: &Directory,
    partner: &crate::partner::Partner,
) -> impl Iterator<Item = (String, FieldTable)> {
    let queues = Queues::new(&directory.settings.broker.prefix);
    let queue_type = directory.settings.broker.queue_type;
    let outbound = queues.outbound(&partner.id);
    queues
        .of_partner(&partner.id)
        .into_iter()
        .map(move |queue| {
            let mut arguments = queue_arguments(queue_type);
            if queue == outbound {
                outbound_arguments(&mut arguments, partner);
            }
            (queue, arguments)
        })
}

/// Every exchange of the topology: each partner's inbound fanout exchange, and the events
/// exchange when it is switched on.
pub fn exchanges(directory: &Directory) -> Vec<(String, ExchangeKind)> {
    let queues = Queues::new(&directory.settings.broker.prefix);
    let mut all: Vec<(String, ExchangeKind)> = directory
        .partners
        .keys()
        .map(|p| (queues.inbound(p), ExchangeKind::Fanout))
        .collect();
    if directory.settings.log.events_exchange {
        all.push((queues.events(), ExchangeKind::Topic));
    }
    all
}

/// The delay queues (one per wait of the backoff, each dead-lettering into the redelivery queue
/// when a message's time is up) and the redelivery queue, with their arguments.
pub fn retry_queues(directory: &Directory) -> Vec<(String, FieldTable)> {
    let queues = Queues::new(&directory.settings.broker.prefix);
    let queue_type = directory.settings.broker.queue_type;
    let mut all: Vec<(String, FieldTable)> = directory
        .settings
        .delivery
        .delays_ms()
        .into_iter()
        .map(|delay| {
            let mut arguments = queue_arguments(queue_type);
            arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay as i64));
            arguments.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            arguments.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(queues.redeliver().as_str().into()),
            );
            (queues.retry(delay), arguments)
        })
        .collect();
    all.push((queues.redeliver(), queue_arguments(queue_type)));
    all
}

/// An HTTP partner's outbound queue is Ponte's own buffer: bounded, and refusing (rather than
/// dropping) what does not fit, so a slow endpoint pushes copies into the delay queues.
fn outbound_arguments(arguments: &mut FieldTable, partner: &crate::partner::Partner) {
    if let Some(http) = &partner.http {
        arguments.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(i64::from(http.max_queued)),
        );
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
    }
}

/// Declares one durable queue with `arguments` (see [`declare_queue`]).
pub async fn declare_queue_with(
    channel: &Channel,
    queue: &str,
    arguments: FieldTable,
    wait: bool,
) -> Result<lapin::Queue, BrokerError> {
    Ok(channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                nowait: !wait,
                ..Default::default()
            },
            arguments,
        )
        .await?)
}

fn queue_arguments(queue_type: QueueType) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(queue_type.as_str().into()),
    );
    arguments
}

/// Consumes `queue` on `channel` under `tag`, with at most `prefetch` unacknowledged messages.
pub async fn consume(
    channel: &Channel,
    queue: &str,
    tag: &str,
    prefetch: u16,
) -> Result<lapin::Consumer, BrokerError> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    Ok(channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?)
}

/// How long the gateway waits for the broker to answer a cancel, a close (of a channel or a
/// connection) or a new consumer: a broker alive but silent (it still sends heartbeats), or a
/// connection that died at the wrong moment, must not hold a flow, a reconnect or the
/// gateway's shutdown for ever.
pub const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Stops consuming under `tag`, then closes a flow's channels itself rather than by dropping
/// them, so they are not still closing when their connection closes. Each step waits at most
/// [`ANSWER_WITHIN`] for the broker.
pub async fn stop_consuming(consume: &Channel, publish: &Channel, tag: &str) {
    let _ = tokio::time::timeout(
        ANSWER_WITHIN,
        consume.basic_cancel(tag.into(), BasicCancelOptions::default()),
    )
    .await;
    close_channels(consume, publish, "flow stopped").await;
}

/// Closes a flow's two channels, each waiting at most [`ANSWER_WITHIN`] for the broker (one
/// already closed returns at once).
pub async fn close_channels(consume: &Channel, publish: &Channel, why: &str) {
    tokio::join!(close_channel(consume, why), close_channel(publish, why));
}

/// Closes `channel`, waiting at most [`ANSWER_WITHIN`] for the broker's answer.
pub async fn close_channel(channel: &Channel, why: &str) {
    let _ = tokio::time::timeout(ANSWER_WITHIN, channel.close(200, why.into())).await;
}

/// A flow that handles one message of `queue` at a time: consumes, says so on `ready` (when given
/// one), hands each message to `handle` until `stop` or a broker failure, then stops consuming
/// and closes its channels. Messages not acknowledged by then go back to the queue.
pub async fn one_at_a_time<Handled>(
    channels: (&Channel, &Channel),
    queue: &str,
    tag: &str,
    prefetch: u16,
    stop: &tokio_util::sync::CancellationToken,
    ready: Option<tokio::sync::mpsc::Sender<()>>,
    mut handle: impl FnMut(lapin::message::Delivery) -> Handled,
) -> Result<(), BrokerError>
where
    Handled: Future<Output = Result<(), BrokerError>>,
{
    use futures_util::StreamExt;
    let (consuming, publishing) = channels;
    let mut consumer = consume(consuming, queue, tag, prefetch).await?;
    if let Some(ready) = ready {
        let _ = ready.send(()).await;
    }
    let result = loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break Ok(()),
            delivery = consumer.next() => match delivery {
                Some(Ok(delivery)) => {
                    if let Err(error) = handle(delivery).await {
                        break Err(error);
                    }
                }
                Some(Err(error)) => break Err(error.into()),
                None => break Err(BrokerError::ConsumerCancelled { queue: queue.to_string() }),
            },
        }
    };
    stop_consuming(consuming, publishing, tag).await;
    result
}

/// The events publisher: every delivery-log record, published to the events exchange as JSON,
/// persistent, routing key `<step>.<sender>`, without confirms (best effort: the delivery log is
/// the record). Its subscription outlives a run, so records that come while it starts again
/// wait for it (up to the journal's buffer).
pub struct Events {
    pub channel: Channel,
    pub exchange: String,
    pub records: tokio::sync::broadcast::Receiver<crate::journal::Event>,
}

impl Events {
    /// Publishes until `stop` (`Ok`) or its channel fails; then closes the channel.
    pub async fn run(
        &mut self,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<(), BrokerError> {
        use tokio::sync::broadcast::error::RecvError;
        let result = loop {
            let event = tokio::select! {
                () = stop.cancelled() => break Ok(()),
                event = self.records.recv() => event,
            };
            match event {
                Ok(event) => {
                    let body = crate::decode::encode(&event);
                    let key = format!("{}.{}", event.step, event.sender);
                    let properties = lapin::BasicProperties::default()
                        .with_content_type(crate::deliver::JSON)
                        .with_delivery_mode(crate::deliver::PERSISTENT)
                        .with_type("ponte-event".into());
                    if let Err(error) = self
                        .channel
                        .basic_publish(
                            self.exchange.as_str().into(),
                            key.as_str().into(),
                            lapin::options::BasicPublishOptions::default(),
                            &body,
                            properties,
                        )
                        .await
                    {
                        break Err(error.into());
                    }
                }
                Err(RecvError::Lagged(lost)) => tracing::warn!(
                    lost,
                    exchange = %self.exchange,
                    "events exchange publisher fell behind; these records are only in the delivery log"
                ),
                Err(RecvError::Closed) => break Ok(()),
            }
        };
        close_channel(&self.channel, "events stopped").await;
        result
    }
}
