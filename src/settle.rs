//! Settle: once the broker has confirmed every copy (and the receipt, when the partner wants one
//! for deliveries), the inbound message is acknowledged; a rejected message once its parked
//! original and its receipt are confirmed. Each flow settles its messages in arrival order and
//! acknowledges runs of them with one `multiple` ack. Any broker failure on the way hands the
//! message back instead: it is requeued, never rejected.

use std::collections::VecDeque;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::{Acker, Channel, PublisherConfirm};
use smallvec::SmallVec;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::{BrokerError, QueueNames, Queues};
use crate::deliver::{Labels, Publishing, Timer, confirmed, confirmed_by, properties, publish};
use crate::journal::{Event, Journal};
use crate::pipeline::Refused;
use crate::receipt::{self, Answered, Undelivered};
use crate::rejection::{Code, Rejection};
use crate::retry;
use crate::settings::DeliverySettings;
use crate::store::{Committed, Store};

/// Settled messages wait at most this long before their run is closed, so that a run of them
/// shares one ack frame (sent once the store's commit covers the run)...
const ACK_DELAY: Duration = Duration::from_millis(5);
/// ...unless this many are waiting, or half a smaller window (see [`closing_run`]). The
/// benchmark's forwarder holds its acks to the same number.
pub const ACK_BATCH: usize = 128;

/// How long a flow pauses before requeueing a message the broker refused (nack), so a broker
/// that refuses everything is not hammered with the same message in a tight loop.
const REQUEUE_DELAY: Duration = Duration::from_secs(1);

/// What every settlement of one flow shares.
#[derive(Debug, Clone)]
pub struct Settler {
    pub channel: Channel,
    /// The largest frame of the channel's connection: a message's properties must fit one.
    pub frame_max: u32,
    pub queues: Arc<QueueNames>,
    pub confirm_timeout_secs: u64,
    /// Whether the partner of this flow wants a receipt for delivered messages too.
    pub positive_receipts: bool,
    /// Cancelled to have the flow started again on new channels, with the topology declared
    /// again, when a failure says the channel or the topology is not what it should be (the
    /// whole session starts again when the connection is).
    pub reconnect: CancellationToken,
    /// Where delivered messages are remembered (duplicate detection); made durable before the
    /// inbound acks.
    pub store: Arc<dyn Store>,
    /// Retries of copies a recipient's queue refused.
    pub delivery: DeliverySettings,
    pub names: Queues,
    /// The delivery log.
    pub journal: Arc<Journal>,
}

impl Settler {
    /// Where this flow's refused copies go.
    pub fn outbox(&self) -> retry::Outbox<'_> {
        retry::Outbox {
            channel: &self.channel,
            journal: &self.journal,
            queues: &self.names,
            settings: &self.delivery,
            timeout_secs: self.confirm_timeout_secs,
        }
    }

    /// Waits for the confirm of a message this flow published to `queue` (see [`confirmed`]).
    async fn confirmed(&self, confirm: PublisherConfirm, queue: &str) -> Result<(), BrokerError> {
        confirmed(&self.channel, confirm, queue, self.confirm_timeout_secs).await
    }

    /// Waits for the confirm of a message this flow published to `queue` by a `timer` shared
    /// with the confirms of others published with it (see [`confirmed_by`]).
    fn confirmed_by<'a>(
        &'a self,
        confirm: PublisherConfirm,
        queue: &'a str,
        timer: Pin<&'a mut Timer>,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send + 'a {
        confirmed_by(
            &self.channel,
            confirm,
            queue,
            self.confirm_timeout_secs,
            timer,
        )
    }

    /// Waits for a copy's confirm by a `timer` shared with the others published with it;
    /// returns the outcome and the body (see [`Publishing::confirmed`]).
    fn copy_confirmed<'a>(
        &'a self,
        publishing: Publishing,
        queue: &'a str,
        timer: Pin<&'a mut Timer>,
    ) -> impl Future<Output = (Result<(), BrokerError>, Vec<u8>)> + Send + 'a {
        publishing.confirmed(&self.channel, queue, self.confirm_timeout_secs, timer)
    }
}

/// The inbound message being settled.
#[derive(Debug)]
pub struct Inbound {
    pub acker: Acker,
    /// The partner whose queue it arrived on.
    pub partner: Arc<str>,
    pub message_id: Option<String>,
    pub message_type: Option<String>,
    pub correlation_id: Option<String>,
    pub received: Instant,
    pub redelivered: bool,
    /// Sent again by an operator (`ponte rejected replay`): from which queue.
    pub replay: Option<String>,
}

impl Inbound {
    fn answered(&self) -> Answered<'_> {
        Answered {
            partner: &self.partner,
            message_id: self.message_id.as_deref(),
            message_type: self.message_type.as_deref(),
        }
    }
}

/// A message whose confirms are all in: ready to be acknowledged, or to be handed back.
#[derive(Debug)]
pub struct Settled {
    pub inbound: Inbound,
    pub result: Result<Outcome, HandBack>,
}

/// Why a message goes back to its queue instead of being acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum HandBack {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The pipeline could not decide now (store or look-up service unavailable).
    #[error("{0}")]
    Later(String),
}

/// How a settled message ended, for its log line.
#[derive(Debug)]
pub enum Outcome {
    /// Delivered to `recipients`; `retrying` wait in the delay queues for another attempt;
    /// `refused` got no copy (a partly delivered message).
    Delivered {
        recipients: Vec<Arc<str>>,
        retrying: Vec<Arc<str>>,
        refused: Vec<(String, Code)>,
    },
    Rejected {
        code: Code,
    },
    /// Given back by the broker after delivery: answered again, not delivered again.
    AlreadyDelivered {
        recipients: Vec<String>,
    },
}

impl Outcome {
    /// The outcome's name and code, as logs and metrics label it.
    fn label(&self) -> (&'static str, Code) {
        match self {
            Outcome::Delivered { refused, .. } if refused.is_empty() => {
                ("delivered", Code::Delivered)
            }
            Outcome::Delivered { refused, .. } => ("partial", refused[0].1),
            Outcome::AlreadyDelivered { .. } => ("already-delivered", Code::Delivered),
            Outcome::Rejected { code } => ("rejected", *code),
        }
    }
}

/// One recipient's copy, handed to the channel, awaiting its confirm; its body comes back with the
/// confirm, so that a copy the recipient's queue refuses can go to the delay queues.
pub struct Pending {
    pub recipient: Arc<str>,
    pub publishing: Publishing,
}

/// A partly delivered message: who got nothing and why, and the confirm of its parked original.
#[derive(Debug)]
pub struct Partial {
    pub refused: Vec<Refused>,
    pub parked: PublisherConfirm,
}

/// A message that goes back to its queue without anything published.
pub fn later(inbound: Inbound, why: String) -> Settled {
    Settled {
        inbound,
        result: Err(HandBack::Later(why)),
    }
}

/// Awaits the confirms of a message's copies (and, for a partly delivered one, of its parked
/// original), then publishes and awaits its receipt. A copy the recipient's queue refuses (a
/// nack: the queue is full) goes to the delay queues to be tried again, and the message counts
/// as delivered to it. `earlier` are the recipients an earlier attempt already delivered to
/// (their copies are not sent again).
///
/// A plain function returning its future, not an `async fn`: an `async fn` keeps its
/// arguments twice in its future, as given and as its locals, and this one is held (boxed) by
/// every message waiting for its copies' confirms.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn's future keeps its arguments twice"
)]
pub fn delivered(
    settler: Arc<Settler>,
    inbound: Inbound,
    copies: Vec<Pending>,
    partial: Option<Partial>,
    earlier: Vec<String>,
) -> impl Future<Output = Settled> + Send + 'static {
    async move {
        let result = async {
            let mut recipients: Vec<Arc<str>> =
                earlier.iter().map(|r| Arc::from(r.as_str())).collect();
            let mut retrying: Vec<Arc<str>> = Vec::new();
            let mut failure = None;
            // The copies and the parked original were all published before the first is
            // awaited: their confirms share one timeout.
            let mut timer = pin!(None);
            for Pending {
                recipient,
                publishing,
            } in copies
            {
                let queue = settler.queues.outbound(&recipient);
                let (confirmation, body) = settler
                    .copy_confirmed(publishing, queue, timer.as_mut())
                    .await;
                settler.queues.in_flight(&recipient).decrement(1);
                match confirmation {
                    Ok(()) => recipients.push(recipient),
                    // Boxed: a future holds room for the largest thing it awaits, and unboxed,
                    // the retry (with the receipt's publish, when that was a future) made every
                    // message waiting for its copies' confirms 3.3 KB. Retrying is rare.
                    Err(BrokerError::Nacked) => {
                        let retry = Box::pin(retry_later(&settler, &inbound, &recipient, &body));
                        match retry.await {
                            Ok(()) => retrying.push(recipient),
                            Err(error) => {
                                failure.get_or_insert(error);
                            }
                        }
                    }
                    Err(error) => {
                        failure.get_or_insert(error);
                    }
                }
            }
            // A message's few recipients, listed without a block of their own.
            let names: SmallVec<[&str; 4]> =
                recipients.iter().chain(&retrying).map(|r| &**r).collect();
            if let Some(error) = failure {
                // Some copies went out: remember which, so that when the message comes back only
                // the others are sent.
                if let Some(id) = &inbound.message_id
                    && !names.is_empty()
                    && let Err(store_error) =
                        settler.store.remember(&inbound.partner, id, &names, false)
                {
                    warn!(
                        %store_error,
                        "cannot record a partial delivery; its copies may go out again"
                    );
                }
                return Err(error.into());
            }
            // Remembered before the ack (which waits for the store's commit), so that the same
            // message coming back is recognised and not delivered again.
            if let Some(id) = &inbound.message_id {
                settler
                    .store
                    .remember(&inbound.partner, id, &names, true)
                    .map_err(|e| HandBack::Later(e.to_string()))?;
            }
            // Its borrows of the lists end here, before they are moved into the outcome.
            drop(names);
            let refused = match partial {
                Some(partial) => {
                    let parked = settler.queues.rejected(&inbound.partner);
                    settler
                        .confirmed_by(partial.parked, parked, timer.as_mut())
                        .await?;
                    partial.refused
                }
                None => Vec::new(),
            };
            // A partly delivered message is always answered: the sender must learn who got nothing.
            if settler.positive_receipts || !refused.is_empty() {
                let undelivered: Vec<Undelivered<'_>> = refused
                    .iter()
                    .map(|r| Undelivered {
                        recipient: &r.recipient,
                        code: r.rejection.code,
                        errors: &r.rejection.errors,
                    })
                    .collect();
                let code = undelivered.first().map_or(Code::Delivered, |u| u.code);
                let reached: Vec<&str> = recipients.iter().map(|r| &**r).collect();
                let waiting: Vec<&str> = retrying.iter().map(|r| &**r).collect();
                let receipt = receipt::build(
                    inbound.answered(),
                    code,
                    &reached,
                    &waiting,
                    &[],
                    &undelivered,
                );
                let queue = settler.queues.receipts(&inbound.partner);
                let confirm = publish_receipt(&settler, queue, &receipt, &inbound)?;
                // Published only now, its confirm has a timeout of its own, started anew where
                // the copies' was: the message's future has room for one.
                timer.set(None);
                settler.confirmed_by(confirm, queue, timer.as_mut()).await?;
            }
            Ok(Outcome::Delivered {
                recipients,
                retrying,
                refused: refused
                    .into_iter()
                    .map(|r| (r.recipient, r.rejection.code))
                    .collect(),
            })
        }
        .await;
        Settled { inbound, result }
    }
}

/// Puts a copy its recipient's queue refused in the first delay queue.
async fn retry_later(
    settler: &Settler,
    inbound: &Inbound,
    recipient: &str,
    body: &[u8],
) -> Result<(), BrokerError> {
    let copy = retry::Copy {
        sender: String::from(&*inbound.partner),
        recipient: recipient.to_string(),
        message_id: inbound.message_id.clone(),
        correlation_id: inbound.correlation_id.clone(),
        message_type: inbound.message_type.clone(),
        attempts: 1,
        first_attempt_ms: retry::now_ms(),
        replay: None,
    };
    let failure = retry::Failure::new(format!(
        "{} refused the copy (queue full)",
        settler.queues.outbound(recipient)
    ));
    retry::schedule(settler.outbox(), &copy, body, &failure).await?;
    Ok(())
}

/// Answers a message the broker gave back after it had been delivered: the same receipt again
/// (same id, so the partner can drop it), nothing delivered.
pub async fn already_delivered(
    settler: Arc<Settler>,
    inbound: Inbound,
    recipients: Vec<String>,
) -> Settled {
    let result = async {
        if settler.positive_receipts {
            let names: Vec<&str> = recipients.iter().map(String::as_str).collect();
            let receipt =
                receipt::build(inbound.answered(), Code::Delivered, &names, &[], &[], &[]);
            let queue = settler.queues.receipts(&inbound.partner);
            let confirm = publish_receipt(&settler, queue, &receipt, &inbound)?;
            settler.confirmed(confirm, queue).await?;
        }
        Ok(Outcome::AlreadyDelivered { recipients })
    }
    .await;
    Settled { inbound, result }
}

/// Parks the original of a message in its sender's rejected queue with the reason in headers;
/// `recipients` names those it was refused for when others still received it.
pub fn park(
    settler: &Settler,
    inbound: &Inbound,
    rejection: &Rejection,
    original: &[u8],
    original_properties: lapin::BasicProperties,
    recipients: &[&str],
) -> Result<PublisherConfirm, BrokerError> {
    publish(
        &settler.channel,
        settler.queues.rejected(&inbound.partner),
        original,
        parked_properties(
            inbound,
            rejection,
            original_properties,
            recipients,
            settler.frame_max,
        ),
    )
}

/// The header RabbitMQ reads as more routing keys for a message ("sender-selected
/// distribution"; it removes `BCC`, the other one, before delivery): left on a parked copy, it
/// would have the broker put the original, unchecked, in any queue it names, with Ponte's right
/// to write there.
const CC: &str = "CC";

/// Where Ponte's own headers' names start: on a parked original, only Ponte writes them.
const OWN_HEADERS: &str = "x-ponte-";

/// What of an original's properties its parked copy keeps, and headers saying what it could not
/// keep. Ponte publishes the copy, so: no `user_id` (the broker refuses a publish whose
/// `user_id` is not the publisher's; the sender's, which the broker checked, goes in
/// `x-ponte-user-id`), no `expiration` (a parked original waits for its operator; the sender's
/// goes in `x-ponte-expiration`), no `CC` header (its routing keys go in `x-ponte-cc`), no
/// header of Ponte's own (`x-ponte-…`: a sender's `x-ponte-recipients` would narrow what an
/// operator's replay delivers), and persistent whatever the original was.
fn parkable(
    original: &lapin::BasicProperties,
) -> (lapin::BasicProperties, Vec<(&'static str, String)>) {
    let mut kept = lapin::BasicProperties::default().with_delivery_mode(crate::deliver::PERSISTENT);
    if let Some(v) = original.content_type() {
        kept = kept.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        kept = kept.with_content_encoding(v.clone());
    }
    if let Some(v) = original.priority() {
        kept = kept.with_priority(*v);
    }
    if let Some(v) = original.correlation_id() {
        kept = kept.with_correlation_id(v.clone());
    }
    if let Some(v) = original.reply_to() {
        kept = kept.with_reply_to(v.clone());
    }
    if let Some(v) = original.message_id() {
        kept = kept.with_message_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        kept = kept.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        kept = kept.with_type(v.clone());
    }
    if let Some(v) = original.app_id() {
        kept = kept.with_app_id(v.clone());
    }
    if let Some(v) = original.cluster_id() {
        kept = kept.with_cluster_id(v.clone());
    }
    let mut notes = Vec::new();
    if let Some(headers) = original.headers() {
        let mut table = headers.inner().clone();
        table.retain(|name, _| !name.as_str().starts_with(OWN_HEADERS));
        if let Some(cc) = table.remove(CC) {
            let keys = match &cc {
                lapin::types::AMQPValue::FieldArray(keys) => {
                    let keys: Vec<String> =
                        keys.as_slice().iter().map(crate::deliver::text).collect();
                    keys.join(",")
                }
                other => crate::deliver::text(other),
            };
            notes.push(("x-ponte-cc", keys));
        }
        kept = kept.with_headers(table.into());
    }
    if let Some(v) = original.user_id() {
        notes.push(("x-ponte-user-id", v.to_string()));
    }
    if let Some(v) = original.expiration() {
        notes.push(("x-ponte-expiration", v.to_string()));
    }
    (kept, notes)
}

/// A parked original's properties: those of its own it may keep ([`parkable`]), and the
/// rejection's reason in headers.
///
/// They must fit one frame of `frame_max` bytes: the broker closes the connection of a
/// publisher whose properties do not, and the message, handed back, would be parked again at
/// each session. An original whose own headers leave no room for the reason's is parked with
/// the reason alone and `x-ponte-headers-dropped` saying how many bytes its headers took; the
/// errors, beyond the room left, only in the receipt.
fn parked_properties(
    inbound: &Inbound,
    rejection: &Rejection,
    original_properties: lapin::BasicProperties,
    recipients: &[&str],
    frame_max: u32,
) -> lapin::BasicProperties {
    let (original, mut headers) = parkable(&original_properties);
    let errors = serde_json::to_string(&rejection.errors).expect("errors always serialize");
    headers.extend([
        ("x-ponte-code", rejection.code.as_str().to_string()),
        ("x-ponte-reason", rejection.reason().to_string()),
        ("x-ponte-partner", inbound.partner.to_string()),
        ("x-ponte-rejected-at", receipt::now_rfc3339()),
    ]);
    if !recipients.is_empty() {
        headers.push(("x-ponte-recipients", recipients.join(",")));
    }
    let with_errors = |mut headers: Vec<(&'static str, String)>| {
        headers.push(("x-ponte-errors", errors.clone()));
        headers
    };
    let whole = crate::deliver::with_headers(original.clone(), &with_errors(headers.clone()));
    if crate::deliver::fits(&whole, frame_max) {
        return whole;
    }
    let bare = original.clone().with_headers(Default::default());
    headers.push((
        "x-ponte-headers-dropped",
        crate::deliver::properties_len(&original)
            .saturating_sub(crate::deliver::properties_len(&bare))
            .to_string(),
    ));
    let reasoned = crate::deliver::with_headers(bare.clone(), &with_errors(headers.clone()));
    if crate::deliver::fits(&reasoned, frame_max) {
        return reasoned;
    }
    crate::deliver::with_headers(bare, &headers)
}

/// Starts what a rejection needs (the parked original, then the receipt) without waiting for
/// the socket, as copies are ([`Publishing`]); [`rejected`] awaits their writes and confirms.
pub fn publish_rejection(
    settler: &Settler,
    inbound: &Inbound,
    rejection: &Rejection,
    original: Vec<u8>,
    original_properties: lapin::BasicProperties,
) -> Result<[Publishing; 2], BrokerError> {
    let park = Publishing::start(
        &settler.channel,
        settler.queues.rejected(&inbound.partner),
        original,
        parked_properties(
            inbound,
            rejection,
            original_properties,
            &[],
            settler.frame_max,
        ),
    )?;
    let receipt = receipt::build(
        inbound.answered(),
        rejection.code,
        &[],
        &[],
        &rejection.errors,
        &[],
    );
    let labelled = receipt_properties(&receipt, inbound);
    let answer = Publishing::start(
        &settler.channel,
        settler.queues.receipts(&inbound.partner),
        receipt.body,
        labelled,
    )?;
    Ok([park, answer])
}

/// Awaits the confirms of a rejected message's parked original and receipt.
pub async fn rejected(
    settler: Arc<Settler>,
    inbound: Inbound,
    code: Code,
    publishing: [Publishing; 2],
) -> Settled {
    let [park, answer] = publishing;
    let result = async {
        let mut timer = pin!(None);
        for (publishing, queue) in [
            (park, settler.queues.rejected(&inbound.partner)),
            (answer, settler.queues.receipts(&inbound.partner)),
        ] {
            settler
                .copy_confirmed(publishing, queue, timer.as_mut())
                .await
                .0?;
        }
        Ok(Outcome::Rejected { code })
    }
    .await;
    Settled { inbound, result }
}

fn publish_receipt(
    settler: &Settler,
    queue: &str,
    receipt: &receipt::Receipt,
    inbound: &Inbound,
) -> Result<PublisherConfirm, BrokerError> {
    let labelled = receipt_properties(receipt, inbound);
    publish(&settler.channel, queue, &receipt.body, labelled)
}

/// A receipt's properties: its own id, the answered message's as correlation id.
fn receipt_properties(receipt: &receipt::Receipt, inbound: &Inbound) -> lapin::BasicProperties {
    let id = receipt.message_id.to_string();
    properties(&Labels {
        message_id: Some(&id),
        correlation_id: inbound.message_id.as_deref(),
        message_type: Some("receipt"),
    })
}

/// Acknowledges settled messages of one flow in arrival order, one `multiple` ack per run, once
/// the store has committed what the run recorded (the store commits on its own thread every few
/// milliseconds; a flow never waits for a commit, it acknowledges when one has happened).
#[derive(Debug)]
pub struct Acknowledger {
    /// The newest settled message not yet acknowledged; acking it with `multiple` acks all
    /// earlier ones of the channel too.
    pending: Option<Acker>,
    count: usize,
    /// When the oldest message of the pending run was settled.
    since: Option<Instant>,
    /// Closed runs waiting for the store's commit, oldest first.
    uncommitted: VecDeque<Run>,
    commits: tokio::sync::watch::Receiver<Committed>,
    /// When this flow last paused for a refusing broker: one pause per interval, not one per
    /// refused message, or a full queue would stall the flow for a second per message.
    last_pause: Option<Instant>,
    metrics: FlowMetrics,
}

/// Settled messages up to `acker`, acknowledged once the store's commits reach `written`.
#[derive(Debug)]
struct Run {
    acker: Acker,
    count: usize,
    written: u64,
}

/// This flow's outcome counters and latency histogram, registered once and kept, so counting a
/// message costs no label formatting or registry look-up.
#[derive(Default)]
struct FlowMetrics {
    /// By outcome and code, then by message type.
    messages: crate::ConfigMap<(&'static str, Code), crate::ConfigMap<String, metrics::Counter>>,
    latency: Option<metrics::Histogram>,
}

impl std::fmt::Debug for FlowMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlowMetrics")
    }
}

impl FlowMetrics {
    fn count(&mut self, inbound: &Inbound, outcome: &Outcome, latency: Duration) {
        let (outcome, code) = outcome.label();
        // An unknown type is whatever the sender wrote: not a label (it would grow without
        // bound).
        let message_type = match code {
            Code::UnknownType => "",
            _ => inbound.message_type.as_deref().unwrap_or(""),
        };
        let by_type = self.messages.entry((outcome, code)).or_default();
        match by_type.get(message_type) {
            Some(counter) => counter.increment(1),
            None => {
                let counter = metrics::counter!(
                    "ponte_messages_total",
                    "sender" => inbound.partner.to_string(),
                    "type" => message_type.to_string(),
                    "outcome" => outcome,
                    "code" => code.as_str()
                );
                counter.increment(1);
                by_type.insert(message_type.to_string(), counter);
            }
        }
        self.latency
            .get_or_insert_with(|| metrics::histogram!("ponte_latency_seconds"))
            .record(latency.as_secs_f64());
    }
}

impl Acknowledger {
    /// Takes the next settled message, in arrival order. A failure first acknowledges the run
    /// before it, then hands the failed message back.
    pub async fn settle(&mut self, settled: Settled, settler: &Settler) {
        match settled.result {
            Ok(outcome) => {
                // Read once, for the histogram, the delivery log's record and a run's start.
                let now = Instant::now();
                let latency = now.saturating_duration_since(settled.inbound.received);
                self.metrics.count(&settled.inbound, &outcome, latency);
                self.pending = Some(log_outcome(
                    settled.inbound,
                    &outcome,
                    latency,
                    &settler.journal,
                ));
                self.count += 1;
                self.since.get_or_insert(now);
            }
            Err(error) => {
                self.flush(settler).await;
                let pause = matches!(
                    error,
                    HandBack::Broker(BrokerError::Nacked) | HandBack::Later(_)
                ) && self
                    .last_pause
                    .is_none_or(|at| at.elapsed() >= REQUEUE_DELAY);
                if pause {
                    self.last_pause = Some(Instant::now());
                }
                hand_back(settler, settled.inbound, error, pause).await;
            }
        }
    }

    pub fn new(settler: &Settler) -> Acknowledger {
        Acknowledger {
            pending: None,
            count: 0,
            since: None,
            uncommitted: VecDeque::new(),
            commits: settler.store.commits(),
            last_pause: None,
            metrics: FlowMetrics::default(),
        }
    }

    /// Whether closed runs wait for the store's next commit.
    pub fn uncommitted(&self) -> bool {
        !self.uncommitted.is_empty()
    }

    /// When the pending run is due to be acknowledged: a few milliseconds after its first
    /// message settled, so that one ack frame serves many messages.
    pub fn due(&self) -> Option<tokio::time::Instant> {
        self.since
            .map(|since| tokio::time::Instant::from_std(since) + ACK_DELAY)
    }

    /// Settled messages not yet acknowledged: the pending run and the closed ones waiting for
    /// the store's commit. The broker counts them against the flow's prefetch.
    pub fn unacknowledged(&self) -> usize {
        self.count + self.uncommitted.iter().map(|r| r.count).sum::<usize>()
    }

    /// Whether the pending run is big enough to acknowledge now, in a flow whose window is
    /// `prefetch` (see [`closing_run`]).
    pub fn full(&self, prefetch: u16) -> bool {
        self.count >= closing_run(prefetch)
    }

    /// Whether this flow's window is all settled messages waiting for an ack: the broker sends
    /// it nothing more until one goes out. `in_flight` is how many it is still settling.
    pub fn holds_window(&self, in_flight: usize, prefetch: u16) -> bool {
        prefetch > 0 && in_flight == 0 && self.unacknowledged() >= usize::from(prefetch)
    }

    /// Closes the run collected so far; it is acknowledged as soon as the store has committed
    /// what it recorded (at once if that has happened already).
    pub async fn flush(&mut self, settler: &Settler) {
        self.since = None;
        if let Some(acker) = self.pending.take() {
            self.uncommitted.push_back(Run {
                acker,
                count: std::mem::take(&mut self.count),
                written: settler.store.written(),
            });
        }
        self.ack_committed().await;
    }

    /// Acknowledges the closed runs the store's commits cover. If a commit failed, nothing
    /// waiting is known to be saved: those runs go back to the queue instead.
    pub async fn ack_committed(&mut self) {
        let committed = self.commits.borrow_and_update().clone();
        match committed {
            Ok(written) => {
                let (mut last, mut count) = (None, 0);
                while self
                    .uncommitted
                    .front()
                    .is_some_and(|r| r.written <= written)
                {
                    let run = self.uncommitted.pop_front().expect("just looked");
                    count += run.count;
                    last = Some(run.acker);
                }
                if let Some(acker) = last {
                    ack_run(acker, count).await;
                }
            }
            Err(error) => {
                let count: usize = self.uncommitted.iter().map(|r| r.count).sum();
                let Some(run) = self.uncommitted.pop_back() else {
                    return;
                };
                self.uncommitted.clear();
                tracing::error!(
                    count,
                    %error,
                    "cannot save the record of delivered messages; not acknowledging them, they go back to their queue"
                );
                let _ = run
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        multiple: true,
                    })
                    .await;
            }
        }
    }

    /// At the end of a flow: closes the run, commits the store now and acknowledges.
    pub async fn finish(&mut self, settler: &Settler) {
        self.flush(settler).await;
        if self.uncommitted() {
            if let Err(error) = settler.store.flush() {
                tracing::error!(%error, "cannot save the record of delivered messages");
            }
            self.ack_committed().await;
        }
    }
}

/// How many settled messages close a run in a flow whose window is `prefetch`: [`ACK_BATCH`],
/// or half the window if that is fewer, so that the broker sends the next half while this one
/// is saved and acknowledged. A window of 0 (no limit) closes runs at `ACK_BATCH`.
fn closing_run(prefetch: u16) -> usize {
    match usize::from(prefetch).div_ceil(2) {
        0 => ACK_BATCH,
        half => ACK_BATCH.min(half),
    }
}

async fn ack_run(acker: Acker, count: usize) {
    let acked = match acker.ack(BasicAckOptions { multiple: true }).await {
        Ok(true) => Ok(()),
        Ok(false) => Err("the channel they arrived on is closed".to_string()),
        Err(error) => Err(error.to_string()),
    };
    if let Err(error) = acked {
        // Everything was published and confirmed; the broker will redeliver these messages
        // and their recipients may see them twice. They deduplicate on message_id.
        warn!(count, %error, "could not acknowledge settled messages; they will be redelivered");
    }
}

/// Writes the message's line and its delivery log record, which take its labels, and gives back
/// what acknowledges it.
fn log_outcome(inbound: Inbound, outcome: &Outcome, latency: Duration, journal: &Journal) -> Acker {
    let join = |names: &mut dyn Iterator<Item = &str>| {
        let mut names = names.peekable();
        // Most lists are empty (retrying, refused) or a few partners' ids.
        let mut text = match names.peek() {
            None => return String::new(),
            Some(_) => String::with_capacity(64),
        };
        crate::push_joined(&mut text, names);
        text
    };
    let retrying = match outcome {
        Outcome::Delivered { retrying, .. } => join(&mut retrying.iter().map(|r| &**r)),
        _ => String::new(),
    };
    let (label, code) = outcome.label();
    let (recipients, refused, text) = match outcome {
        Outcome::Delivered {
            recipients,
            refused,
            ..
        } => (
            join(&mut recipients.iter().map(|r| &**r)),
            join(&mut refused.iter().map(|(r, _)| r.as_str())),
            if refused.is_empty() {
                "message delivered"
            } else {
                "message delivered to some recipients; refused for the others"
            },
        ),
        Outcome::AlreadyDelivered { recipients } => (
            recipients.join(","),
            String::new(),
            "message given back by the broker was already delivered; not delivered again",
        ),
        // A message refused for its content is routine for the gateway: INFO, not ERROR.
        Outcome::Rejected { .. } => (String::new(), String::new(), "message rejected"),
    };
    let outcome = label;
    let latency_ms = latency.as_secs_f64() * 1000.0;
    let mut detail = Vec::new();
    if !retrying.is_empty() {
        detail.push(format!("retrying: {retrying}"));
    }
    if !refused.is_empty() {
        detail.push(format!("refused for: {refused}"));
    }
    if let Some(from) = &inbound.replay {
        detail.push(format!("replay from {from}"));
    }
    if inbound.redelivered {
        detail.push("redelivered by the broker".into());
    }
    let event = Event {
        message_id: inbound.message_id.unwrap_or_default(),
        correlation_id: inbound.correlation_id.unwrap_or_default(),
        sender: String::from(&*inbound.partner),
        recipients,
        message_type: inbound.message_type.unwrap_or_default(),
        code: code.as_str().into(),
        latency_ms: Some(latency_ms),
        detail: detail.join("; "),
        ..Event::now(outcome)
    };
    // What most messages do not have (a retry, a refusal, a replay, a redelivery) is left out
    // of their line rather than written empty.
    fn some(text: &str) -> Option<&str> {
        (!text.is_empty()).then_some(text)
    }
    info!(
        message_id = event.message_id,
        r#type = event.message_type,
        sender = event.sender,
        recipients = %event.recipients,
        retrying = some(&retrying),
        refused = some(&refused),
        outcome,
        code = code.as_str(),
        latency_ms,
        redelivered = inbound.redelivered.then_some(true),
        replay = inbound.replay.as_deref(),
        "{text}"
    );
    journal.record(event);
    inbound.acker
}

/// A transient failure: the message is neither acknowledged nor rejected; it goes back to its
/// queue and is processed again.
async fn hand_back(settler: &Settler, inbound: Inbound, error: HandBack, pause: bool) {
    let message_id = inbound.message_id.as_deref().unwrap_or("");
    let message_type = inbound.message_type.as_deref().unwrap_or("");
    metrics::counter!("ponte_handed_back_total", "sender" => inbound.partner.to_string())
        .increment(1);
    settler.journal.record(Event {
        message_id: message_id.to_string(),
        correlation_id: inbound.correlation_id.clone().unwrap_or_default(),
        sender: String::from(&*inbound.partner),
        message_type: message_type.to_string(),
        detail: error.to_string(),
        ..Event::now("handed-back")
    });
    match &error {
        HandBack::Later(why) => tracing::error!(
            message_id,
            r#type = message_type,
            sender = &*inbound.partner,
            outcome = "retry",
            error = %why,
            "cannot map the message now; it goes back to its queue and is tried again"
        ),
        HandBack::Broker(error) => warn!(
            message_id,
            r#type = message_type,
            sender = &*inbound.partner,
            outcome = "retry",
            %error,
            "broker failure while settling; the message goes back to its queue"
        ),
    }
    if matches!(
        error,
        HandBack::Broker(BrokerError::Nacked) | HandBack::Later(_)
    ) {
        // The broker or a service is up but refuses: slow this flow down before trying again.
        if pause {
            tokio::time::sleep(REQUEUE_DELAY).await;
        }
    } else {
        // The channel, the connection or the topology is broken: start the flow again.
        settler.reconnect.cancel();
    }
    let _ = inbound
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_closes_at_half_a_small_window_and_at_the_batch_in_a_large_one() {
        // A window of one or two: every message is acknowledged on its own.
        assert_eq!(closing_run(1), 1);
        assert_eq!(closing_run(2), 1);
        assert_eq!(closing_run(7), 4);
        assert_eq!(closing_run(10), 5);
        // Up to the batch, and no further: the default window of 400 closes at 128 as before.
        assert_eq!(closing_run(255), 128);
        assert_eq!(closing_run(256), ACK_BATCH);
        assert_eq!(closing_run(400), ACK_BATCH);
        assert_eq!(closing_run(u16::MAX), ACK_BATCH);
        // No limit: the batch.
        assert_eq!(closing_run(0), ACK_BATCH);
    }
}
