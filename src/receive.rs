//! Receive: one flow per partner consumes that partner's inbound queue, runs the pipeline on
//! each message, publishes what the verdict asks for, and settles messages in arrival order as
//! their confirms come in. Prefetch bounds how many messages a flow has in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::BasicCancelOptions;
use lapin::{Channel, message::Delivery};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::broker::{ANSWER_WITHIN, BrokerError, consume, stop_consuming};
use crate::deliver::{Labels, Publishing, properties};
use crate::partner::Partner;
use crate::pipeline::{Outcome, Pipeline};
use crate::prefetch;
use crate::settle::{self, Acknowledger, Inbound, Partial, Pending, Settled, Settler};
use tokio::time::timeout;

/// One partner's inbound flow.
pub struct Flow {
    pub pipeline: Arc<Pipeline>,
    pub partner: Partner,
    /// Channel the inbound queue is consumed on.
    pub consume: Channel,
    /// Unacknowledged messages the broker may push to this flow, at first.
    pub prefetch: u16,
    /// The flow's share of `broker.max_in_flight`, when it shares it with others: it gives back
    /// what it does not use and takes more when held back (see [`crate::prefetch`]). Kept
    /// across the flow's restarts, so what it took is still counted as its own.
    pub window: Option<prefetch::Window>,
    /// What each message of the window may hold on average (`broker.max_in_flight_bytes`
    /// shared out): a flow whose messages are larger has fewer unacknowledged at once.
    pub bytes_per_message: u64,
    pub settler: Arc<Settler>,
    /// Ponte's own broker user (`broker.url`): replay headers count only on a message whose
    /// `user_id`, which the broker checks, is this one; a sender could write them too.
    pub operator: Option<String>,
    /// Turns true once every flow of the session consumes. A flow handles nothing before: with
    /// a backlog, the first partners' messages would otherwise take the CPU while the others'
    /// consumers are still being set up (start-up with a thousand partners).
    pub started: tokio::sync::watch::Receiver<bool>,
}

/// A flow's consumer, with the prefetch it was started with and what sets it.
struct Consuming {
    consumer: lapin::Consumer,
    tag: String,
    /// How many times the consumer was started again: each start takes a tag of its own.
    restarts: u32,
    prefetch: u16,
    /// The size of the flow's recent messages, which may hold the prefetch below the window.
    sizes: prefetch::Sizes,
    /// `ponte_prefetch` for the flow's partner.
    gauge: metrics::Gauge,
}

type Settling = FuturesOrdered<futures_util::future::BoxFuture<'static, Settled>>;

impl Flow {
    /// Consumes until `stop` is cancelled (settles what is in flight, returns `Ok`) or the broker
    /// fails (returns the error; unacknowledged messages go back to the queue). Says so on
    /// `ready`, when given one, once it consumes. May be run again, on new channels, once it
    /// has returned.
    pub async fn run(
        &mut self,
        stop: CancellationToken,
        ready: Option<tokio::sync::mpsc::Sender<()>>,
    ) -> Result<(), BrokerError> {
        let mut window = self.window.take();
        let ran = self.serve(stop, ready, &mut window).await;
        self.window = window;
        ran
    }

    async fn serve(
        &self,
        stop: CancellationToken,
        ready: Option<tokio::sync::mpsc::Sender<()>>,
        window: &mut Option<prefetch::Window>,
    ) -> Result<(), BrokerError> {
        let queue = self.settler.queues.inbound(&self.partner.id).to_string();
        let tag = format!("ponte-{}", self.partner.id);
        // Until its first messages show their size, a flow takes them to be as large as allowed.
        let largest_allowed = self.pipeline.directory.settings.limits.max_message_bytes;
        let sizes = prefetch::Sizes::new(self.bytes_per_message, largest_allowed as u64);
        let prefetch = sizes.cap(window.as_ref().map_or(self.prefetch, |w| w.prefetch));
        let mut c = Consuming {
            consumer: consume(&self.consume, &queue, &tag, prefetch).await?,
            tag,
            restarts: 0,
            prefetch,
            sizes,
            gauge: metrics::gauge!("ponte_prefetch", "partner" => self.partner.id.clone()),
        };
        c.gauge.set(prefetch);
        debug!(%queue, "consuming");
        if let Some(ready) = ready {
            let _ = ready.send(()).await;
        }
        let mut started = self.started.clone();
        tokio::select! {
            () = stop.cancelled() => {}
            _ = started.wait_for(|started| *started) => {}
        }
        let owner: Arc<str> = Arc::from(self.partner.id.as_str());
        let mut settling: Settling = FuturesOrdered::new();
        let mut acks = Acknowledger::new(&self.settler);
        let mut commits = self.settler.store.commits();
        let mut look = tokio::time::interval_at(
            tokio::time::Instant::now() + prefetch::EVERY,
            prefetch::EVERY,
        );
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the pending run of acks is due: one timer kept across the loop's turns and moved
        // only when the due time changes (a later time only extends it where it is in the
        // wheel). A timer made afresh at every turn (every delivery, every batch of settled
        // messages) went into the runtime's timer wheel and out again each time, and whenever
        // it was earlier than the wheel's next wake, woke the thread's own driver with a write
        // to its eventfd (most of the flows' writes; see docs/performance.md). Set before it is
        // first polled; until then, as good as never.
        let ack_timer = tokio::time::sleep(Duration::from_secs(86_400));
        tokio::pin!(ack_timer);
        loop {
            let due = acks.due();
            if let Some(at) = due
                && ack_timer.deadline() != at
            {
                ack_timer.as_mut().reset(at);
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                _ = look.tick() => {
                    let now = settling.len() + acks.unacknowledged();
                    let mut base = self.prefetch;
                    if let Some(window) = window.as_mut() {
                        window.look(prefetch::in_window(now, window.prefetch, c.prefetch));
                        base = window.prefetch;
                    }
                    if let Some(next) = c.sizes.look(base, c.prefetch) {
                        self.restart(&mut c, &mut settling, &owner, base, next).await?;
                    }
                }
                Some(settled) = settling.next(), if !settling.is_empty() => {
                    acks.settle(settled, &self.settler).await;
                    // Take every other message whose confirms are already in.
                    while let Some(Some(settled)) = settling.next().now_or_never() {
                        acks.settle(settled, &self.settler).await;
                    }
                    // A window all settled gets nothing more until an ack, and no ack until
                    // the store commits: its run closes, and the store commits now rather
                    // than when due.
                    let holds = acks.holds_window(settling.len(), c.prefetch);
                    if holds || acks.full(c.prefetch) {
                        acks.flush(&self.settler).await;
                    }
                    if holds && acks.uncommitted() {
                        self.settler.store.commit_soon();
                    }
                }
                () = &mut ack_timer, if due.is_some() => {
                    acks.flush(&self.settler).await;
                }
                Ok(()) = commits.changed(), if acks.uncommitted() => {
                    acks.ack_committed().await;
                }
                delivery = c.consumer.next() => match delivery {
                    Some(Ok(delivery)) => {
                        let mut base = window.as_ref().map_or(self.prefetch, |w| w.prefetch);
                        let mut resize = c.sizes.saw(delivery.data.len() as u64, base, c.prefetch);
                        settling.push_back(self.handle(delivery, &owner).await?);
                        if let Some(window) = window.as_mut() {
                            let now = settling.len() + acks.unacknowledged();
                            let used = prefetch::in_window(now, window.prefetch, c.prefetch);
                            // The sizes already count this message: the grown window's cap
                            // replaces what the old window's called for.
                            if let Some(grown) = window.saw(used, Instant::now()) {
                                base = grown;
                                resize = c.sizes.change(base, c.prefetch);
                            }
                        }
                        // Messages larger than the window was set for (fewer at once), a
                        // first window's worth smaller than assumed (the whole window), or a
                        // window the broker held back that grew: now, not at the next look.
                        if let Some(next) = resize {
                            self.restart(&mut c, &mut settling, &owner, base, next).await?;
                        }
                    }
                    Some(Err(error)) => return Err(error.into()),
                    None => return Err(BrokerError::ConsumerCancelled { queue }),
                },
            }
        }
        // Stop taking new messages; those received but not yet handled go back to the queue
        // when the channel closes. Settle what is in flight.
        let cancel = self
            .consume
            .basic_cancel(c.tag.as_str().into(), BasicCancelOptions::default());
        let _ = timeout(ANSWER_WITHIN, cancel).await;
        while let Some(settled) = settling.next().await {
            acks.settle(settled, &self.settler).await;
        }
        acks.finish(&self.settler).await;
        stop_consuming(&self.consume, &self.settler.channel, &c.tag).await;
        Ok(())
    }

    /// Starts the flow's consumer again with `prefetch` (of a window of `base` messages), or
    /// what the sizes of the messages received meanwhile call for. RabbitMQ fixes a consumer's
    /// prefetch when it starts (basic.qos applies to consumers started after it). Messages
    /// received meanwhile are handled first, so their order is kept.
    async fn restart(
        &self,
        c: &mut Consuming,
        settling: &mut Settling,
        owner: &Arc<str>,
        base: u16,
        mut prefetch: u16,
    ) -> Result<(), BrokerError> {
        let queue = self.settler.queues.inbound(&self.partner.id);
        let cancel = self
            .consume
            .basic_cancel(c.tag.as_str().into(), BasicCancelOptions::default());
        let _ = timeout(ANSWER_WITHIN, cancel)
            .await
            .map_err(|_| no_answer("basic.cancel"))?;
        while let Some(delivery) = c.consumer.next().await {
            let delivery = delivery?;
            if let Some(resize) = c.sizes.saw(delivery.data.len() as u64, base, prefetch) {
                prefetch = resize;
            }
            settling.push_back(self.handle(delivery, owner).await?);
        }
        debug!(%queue, prefetch, "prefetch changed");
        // A new tag for each start: a quorum queue takes a consumer that comes back under its
        // old tag for the old one, and RabbitMQ 3.10.8 (Debian 12's) then closes the channel
        // with INTERNAL_ERROR at its first delivery (rabbitmq-server#5927), every session.
        c.restarts += 1;
        c.tag = format!("ponte-{}.{}", self.partner.id, c.restarts);
        c.consumer = timeout(
            ANSWER_WITHIN,
            consume(&self.consume, queue, &c.tag, prefetch),
        )
        .await
        .map_err(|_| no_answer("basic.consume"))??;
        c.prefetch = prefetch;
        c.gauge.set(prefetch);
        Ok(())
    }

    async fn handle(
        &self,
        delivery: Delivery,
        owner: &Arc<str>,
    ) -> Result<futures_util::future::BoxFuture<'static, Settled>, BrokerError> {
        let received = Instant::now();
        let replay = self.replay(&delivery.properties);
        // A partly delivered message replayed by ops goes only to those it was refused for.
        let only: Option<Vec<String>> = replay
            .as_ref()
            .and_then(|r| r.only.as_ref())
            .map(|names| names.split(',').map(String::from).collect());
        let verdict = self
            .pipeline
            .process_for(
                &self.partner,
                &delivery.data,
                delivery.redelivered,
                only.as_deref(),
            )
            .await;
        let inbound = Inbound {
            acker: delivery.acker,
            partner: owner.clone(),
            message_id: verdict.message_id,
            message_type: verdict.message_type,
            correlation_id: verdict.correlation_id,
            received,
            redelivered: delivery.redelivered,
            replay: replay.map(|r| r.from),
        };
        let settler = self.settler.clone();
        Ok(match verdict.outcome {
            Outcome::Deliver {
                copies,
                refused,
                earlier,
            } => {
                let labels = Labels {
                    message_id: inbound.message_id.as_deref(),
                    correlation_id: inbound.correlation_id.as_deref(),
                    message_type: inbound.message_type.as_deref(),
                };
                let mut pending = Vec::with_capacity(copies.len());
                for copy in copies {
                    let (recipient, queue) = settler.queues.outbound_entry(&copy.recipient);
                    let publishing =
                        Publishing::start(&settler.channel, queue, copy.body, properties(&labels))?;
                    settler.queues.in_flight(&recipient).increment(1);
                    pending.push(Pending {
                        recipient,
                        publishing,
                    });
                }
                let partial = match refused.first() {
                    None => None,
                    Some(first) => {
                        let names: Vec<&str> =
                            refused.iter().map(|r| r.recipient.as_str()).collect();
                        let parked = settle::park(
                            &settler,
                            &inbound,
                            &first.rejection,
                            &delivery.data,
                            delivery.properties,
                            &names,
                        )?;
                        Some(Partial { refused, parked })
                    }
                };
                settle::delivered(settler, inbound, pending, partial, earlier).boxed()
            }
            Outcome::Reject(rejection) => {
                let publishing = settle::publish_rejection(
                    &settler,
                    &inbound,
                    &rejection,
                    delivery.data,
                    delivery.properties,
                )?;
                settle::rejected(settler, inbound, rejection.code, publishing).boxed()
            }
            Outcome::Retry(why) => futures_util::future::ready(settle::later(inbound, why)).boxed(),
            Outcome::AlreadyDelivered { recipients } => {
                settle::already_delivered(settler, inbound, recipients).boxed()
            }
        })
    }

    /// The replay headers of a message, when Ponte's operator wrote them: the message carries
    /// Ponte's broker user as `user_id` (the broker refuses a `user_id` that is not the
    /// publisher's). On a sender's message they are ignored, with a warning: they would let it
    /// narrow its own fan-out past the routes, and claim a replay in the delivery log.
    fn replay(&self, properties: &lapin::BasicProperties) -> Option<Replay> {
        let from = crate::deliver::header(properties, crate::retry::REPLAY);
        let only = crate::deliver::header(properties, crate::deliver::REPLAY_FOR);
        if from.is_none() && only.is_none() {
            return None;
        }
        let user = properties.user_id().as_ref().map(|u| u.as_str());
        if user.is_some() && user == self.operator.as_deref() {
            return Some(Replay {
                from: from.unwrap_or_default(),
                only,
            });
        }
        tracing::warn!(
            sender = %self.partner.id,
            message_id = properties.message_id().as_ref().map_or("", |m| m.as_str()),
            user_id = user.unwrap_or(""),
            "replay headers on a message that Ponte did not replay; ignored"
        );
        None
    }
}

/// What a message replayed by Ponte's operator says of itself.
struct Replay {
    /// Where the message was replayed from.
    from: String,
    /// The recipients it is replayed for (comma-separated), for a partly delivered message.
    only: Option<String>,
}

fn no_answer(what: &'static str) -> BrokerError {
    BrokerError::NoAnswer(what, ANSWER_WITHIN.as_secs())
}
