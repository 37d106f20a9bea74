//! Receive: one flow per partner consumes that partner's inbound queue, runs the pipeline on
//! each message, publishes what the verdict asks for and hands the pending confirms to `settle`.
//! Prefetch bounds how many messages a flow has in flight.

use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, message::Delivery};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::broker::BrokerError;
use crate::deliver::{Labels, properties, publish};
use crate::directory::Directory;
use crate::pipeline::process;
use crate::settle::{self, Inbound, Settler};

/// One partner's inbound flow.
pub struct Flow {
    pub directory: Arc<Directory>,
    pub partner: String,
    /// Channel the inbound queue is consumed on.
    pub consume: Channel,
    pub settler: Arc<Settler>,
}

impl Flow {
    /// Consumes until `stop` is cancelled (returns `Ok`) or the broker fails (returns the error).
    pub async fn run(
        self,
        stop: CancellationToken,
        in_flight: TaskTracker,
    ) -> Result<(), BrokerError> {
        let queue = self.settler.queues.inbound(&self.partner);
        self.consume
            .basic_qos(
                self.directory.settings.broker.prefetch,
                BasicQosOptions::default(),
            )
            .await?;
        let tag = format!("ponte-{}", self.partner);
        let mut consumer = self
            .consume
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        debug!(%queue, "consuming");
        loop {
            let delivery = tokio::select! {
                biased;
                () = stop.cancelled() => {
                    // Stop taking new messages; those already received but not yet handled are
                    // returned by the broker when the channel closes.
                    let _ = self.consume.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                    return Ok(());
                }
                next = consumer.next() => next,
            };
            match delivery {
                Some(Ok(delivery)) => self.handle(delivery, &in_flight).await?,
                Some(Err(error)) => return Err(error.into()),
                None if stop.is_cancelled() => return Ok(()),
                None => return Err(BrokerError::ConsumerCancelled { queue }),
            }
        }
    }

    async fn handle(&self, delivery: Delivery, in_flight: &TaskTracker) -> Result<(), BrokerError> {
        let received = Instant::now();
        let owner = &self.directory.partners[&self.partner];
        let verdict = process(&self.directory, owner, &delivery.data);
        let inbound = Inbound {
            acker: delivery.acker.clone(),
            partner: self.partner.clone(),
            message_id: verdict.message_id.clone(),
            message_type: verdict.message_type.clone(),
            received,
            redelivered: delivery.redelivered,
        };
        let settler = self.settler.clone();
        match verdict.outcome {
            Ok(copies) => {
                let labels = Labels {
                    message_id: verdict.message_id.as_deref(),
                    correlation_id: verdict.correlation_id.as_deref(),
                    message_type: verdict.message_type.as_deref(),
                };
                let mut pending = Vec::with_capacity(copies.len());
                for copy in copies {
                    let queue = settler.queues.outbound(&copy.recipient);
                    let confirm =
                        publish(&settler.channel, &queue, &copy.body, properties(&labels)).await?;
                    pending.push((copy.recipient, confirm));
                }
                in_flight.spawn(settle::delivered(settler, inbound, pending));
            }
            Err(rejection) => {
                let confirms = settle::publish_rejection(
                    &settler,
                    &inbound,
                    &rejection,
                    &delivery.data,
                    delivery.properties.clone(),
                )
                .await?;
                in_flight.spawn(settle::rejected(settler, inbound, rejection.code, confirms));
            }
        }
        Ok(())
    }
}
