//! Redeliver: consumes `<prefix>.redeliver`, where copies land when their wait in a delay queue
//! is over (and where `ponte dlq replay` puts dead letters), and tries each one again: into the
//! recipient's outbound queue, with a publisher confirm. A refused copy goes to the next delay
//! queue or, out of attempts, to the dead-letter queue. The redelivered copy is acknowledged only
//! once whatever became of it is confirmed, so a crash leaves it in the queue.

use std::sync::Arc;

use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::broker::{BrokerError, Queues, declare_queue, one_at_a_time};
use crate::deliver::{confirmed, publish};
use crate::directory::Directory;
use crate::journal::Journal;
use crate::retry::{self, Failure};

/// Copies taken from the redelivery queue at a time.
const PREFETCH: u16 = 32;

pub struct Redeliverer {
    pub directory: Arc<Directory>,
    pub consume: Channel,
    /// In confirm mode.
    pub publish: Channel,
    pub journal: Arc<Journal>,
}

impl Redeliverer {
    /// Consumes until `stop` is cancelled (`Ok`) or the broker fails; says so on `ready`, when
    /// given one, once it consumes. May be run again, on new channels, once it has returned.
    pub async fn run(
        &self,
        stop: CancellationToken,
        ready: Option<tokio::sync::mpsc::Sender<()>>,
    ) -> Result<(), BrokerError> {
        let names = Queues::new(&self.directory.settings.broker.prefix);
        one_at_a_time(
            (&self.consume, &self.publish),
            &names.redeliver(),
            "ponte-redeliver",
            PREFETCH,
            &stop,
            ready,
            |delivery| self.handle(&names, delivery),
        )
        .await
    }

    fn outbox<'a>(&'a self, names: &'a Queues) -> retry::Outbox<'a> {
        retry::Outbox {
            channel: &self.publish,
            journal: &self.journal,
            queues: names,
            settings: &self.directory.settings.delivery,
            timeout_secs: self.directory.settings.broker.publish_timeout_secs,
        }
    }

    async fn handle(&self, names: &Queues, delivery: Delivery) -> Result<(), BrokerError> {
        let timeout = self.directory.settings.broker.publish_timeout_secs;
        let Some(mut copy) = retry::Copy::from_properties(&delivery.properties) else {
            // Only the gateway writes here; a message without its bookkeeping cannot be placed.
            error!(
                queue = %names.redeliver(),
                "a message without x-ponte-sender/x-ponte-recipient in the redelivery queue; dropped"
            );
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: false,
                    multiple: false,
                })
                .await?;
            return Ok(());
        };
        if !self.directory.partners.contains_key(&copy.recipient) {
            // Its queues may not exist any more: declare the dead-letter queue to keep the copy.
            declare_queue(
                &self.publish,
                &names.dead_letters(&copy.recipient),
                self.directory.settings.broker.queue_type,
                true,
            )
            .await?;
            let failure = Failure::new(format!(
                "{} is no longer a configured partner",
                copy.recipient
            ));
            retry::dead_letter(self.outbox(names), &copy, &delivery.data, &failure).await?;
            delivery.acker.ack(BasicAckOptions::default()).await?;
            return Ok(());
        }
        let outbound = names.outbound(&copy.recipient);
        let sent = publish(
            &self.publish,
            &outbound,
            &delivery.data,
            copy.delivered_properties(),
        )?;
        copy.attempts += 1;
        match confirmed(&self.publish, sent, &outbound, timeout).await {
            Ok(()) => {
                self.journal.record(copy.event("delivered", ""));
                info!(
                message_id = copy.message_id.as_deref().unwrap_or(""),
                r#type = copy.message_type.as_deref().unwrap_or(""),
                sender = %copy.sender,
                recipient = %copy.recipient,
                attempts = copy.attempts,
                outcome = "delivered",
                code = "delivered",
                replay = copy.replay.as_deref().unwrap_or(""),
                "copy delivered on a later attempt"
                )
            }
            Err(BrokerError::Nacked) => {
                let failure = Failure::new(format!("{outbound} refused the copy (queue full)"));
                retry::after_failure(self.outbox(names), &copy, &delivery.data, &failure).await?;
            }
            Err(other) => return Err(other),
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }
}
