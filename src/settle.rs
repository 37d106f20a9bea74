//! Settle: once the broker has confirmed every copy, the sender's receipt is published and the
//! inbound message acknowledged; a rejected message is acknowledged once its parked original and
//! its receipt are confirmed. Any broker failure on the way hands the message back instead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::{Acker, Channel, PublisherConfirm};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::{BrokerError, Queues};
use crate::deliver::{Labels, confirmed, properties, publish};
use crate::receipt::{self, Answered};
use crate::rejection::{Code, Rejection};

/// How long a message handed back after a transient failure waits before it is requeued, so a
/// broker in trouble is not hammered with the same message in a tight loop.
const REQUEUE_DELAY: Duration = Duration::from_secs(1);

/// What every settlement of one flow shares.
#[derive(Debug)]
pub struct Settler {
    pub channel: Channel,
    pub queues: Queues,
    pub confirm_timeout_secs: u64,
    /// Whether the partner of this flow wants a receipt for delivered messages too.
    pub positive_receipts: bool,
    /// Cancelled to make the gateway reconnect and redeclare its topology, when a failure says
    /// the connection or the topology is not what it should be.
    pub reconnect: CancellationToken,
}

/// The inbound message being settled.
#[derive(Debug)]
pub struct Inbound {
    pub acker: Acker,
    /// The partner whose queue it arrived on.
    pub partner: String,
    pub message_id: Option<String>,
    pub message_type: Option<String>,
    pub received: Instant,
    pub redelivered: bool,
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

/// Settles a message whose copies were published: awaits their confirms, then receipt, then ack.
pub async fn delivered(
    settler: Arc<Settler>,
    inbound: Inbound,
    copies: Vec<(String, PublisherConfirm)>,
) {
    let result = async {
        let mut recipients = Vec::with_capacity(copies.len());
        for (recipient, confirm) in copies {
            confirmed(
                confirm,
                &settler.queues.outbound(&recipient),
                settler.confirm_timeout_secs,
            )
            .await?;
            recipients.push(recipient);
        }
        if settler.positive_receipts {
            let names: Vec<&str> = recipients.iter().map(String::as_str).collect();
            let receipt = receipt::build(inbound.answered(), Code::Delivered, &names, &[]);
            let queue = settler.queues.receipts(&inbound.partner);
            let confirm = publish_receipt(&settler, &queue, &receipt, &inbound).await?;
            confirmed(confirm, &queue, settler.confirm_timeout_secs).await?;
        }
        Ok::<_, BrokerError>(recipients)
    }
    .await;
    match result {
        Ok(recipients) => {
            if ack(&inbound).await {
                info!(
                    message_id = inbound.message_id.as_deref().unwrap_or(""),
                    r#type = inbound.message_type.as_deref().unwrap_or(""),
                    sender = %inbound.partner,
                    recipients = %recipients.join(","),
                    outcome = "delivered",
                    code = Code::Delivered.as_str(),
                    latency_ms = inbound.received.elapsed().as_secs_f64() * 1000.0,
                    redelivered = inbound.redelivered,
                    "message delivered"
                );
            }
        }
        Err(error) => hand_back(&settler, inbound, error).await,
    }
}

/// Publishes what a rejection needs (the parked original and the receipt) and returns the
/// pending confirms, in that order.
pub async fn publish_rejection(
    settler: &Settler,
    inbound: &Inbound,
    rejection: &Rejection,
    original: &[u8],
    original_properties: lapin::BasicProperties,
) -> Result<[PublisherConfirm; 2], BrokerError> {
    let errors = serde_json::to_string(&rejection.errors).expect("errors always serialize");
    let parked = crate::deliver::with_headers(
        original_properties,
        &[
            ("x-ponte-code", rejection.code.as_str().to_string()),
            ("x-ponte-reason", rejection.reason().to_string()),
            ("x-ponte-errors", errors),
            ("x-ponte-partner", inbound.partner.clone()),
            ("x-ponte-rejected-at", receipt::now_rfc3339()),
        ],
    );
    let park = publish(
        &settler.channel,
        &settler.queues.rejected(&inbound.partner),
        original,
        parked,
    )
    .await?;
    let receipt = receipt::build(inbound.answered(), rejection.code, &[], &rejection.errors);
    let queue = settler.queues.receipts(&inbound.partner);
    let answer = publish_receipt(settler, &queue, &receipt, inbound).await?;
    Ok([park, answer])
}

/// Settles a rejected message: once the parked original and the receipt are confirmed, ack.
pub async fn rejected(
    settler: Arc<Settler>,
    inbound: Inbound,
    code: Code,
    confirms: [PublisherConfirm; 2],
) {
    let [park, answer] = confirms;
    let result = async {
        confirmed(
            park,
            &settler.queues.rejected(&inbound.partner),
            settler.confirm_timeout_secs,
        )
        .await?;
        confirmed(
            answer,
            &settler.queues.receipts(&inbound.partner),
            settler.confirm_timeout_secs,
        )
        .await
    }
    .await;
    match result {
        Ok(()) => {
            if ack(&inbound).await {
                // A message refused for its content is routine for the gateway: INFO, not ERROR.
                info!(
                    message_id = inbound.message_id.as_deref().unwrap_or(""),
                    r#type = inbound.message_type.as_deref().unwrap_or(""),
                    sender = %inbound.partner,
                    recipients = "",
                    outcome = "rejected",
                    code = code.as_str(),
                    latency_ms = inbound.received.elapsed().as_secs_f64() * 1000.0,
                    redelivered = inbound.redelivered,
                    "message rejected"
                );
            }
        }
        Err(error) => hand_back(&settler, inbound, error).await,
    }
}

async fn publish_receipt(
    settler: &Settler,
    queue: &str,
    receipt: &receipt::Receipt,
    inbound: &Inbound,
) -> Result<PublisherConfirm, BrokerError> {
    let id = receipt.message_id.to_string();
    let labels = Labels {
        message_id: Some(&id),
        correlation_id: inbound.message_id.as_deref(),
        message_type: Some("receipt"),
    };
    publish(&settler.channel, queue, &receipt.body, properties(&labels)).await
}

async fn ack(inbound: &Inbound) -> bool {
    let acked = match inbound.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => Ok(()),
        Ok(false) => Err("the channel it arrived on is closed".to_string()),
        Err(error) => Err(error.to_string()),
    };
    match acked {
        Ok(()) => true,
        Err(error) => {
            // Everything was published and confirmed; the broker will redeliver the message and
            // its recipients may see it twice. They deduplicate on message_id.
            warn!(
                message_id = inbound.message_id.as_deref().unwrap_or(""),
                sender = %inbound.partner,
                %error,
                "could not acknowledge a settled message; it will be redelivered"
            );
            false
        }
    }
}

/// A transient failure: the message is neither acknowledged nor rejected; it goes back to its
/// queue and is processed again.
async fn hand_back(settler: &Settler, inbound: Inbound, error: BrokerError) {
    warn!(
        message_id = inbound.message_id.as_deref().unwrap_or(""),
        r#type = inbound.message_type.as_deref().unwrap_or(""),
        sender = %inbound.partner,
        outcome = "retry",
        %error,
        "broker failure while settling; the message goes back to its queue"
    );
    if !matches!(error, BrokerError::Nacked) {
        settler.reconnect.cancel();
    }
    tokio::time::sleep(REQUEUE_DELAY).await;
    let _ = inbound
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await;
}
