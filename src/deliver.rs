//! Deliver: publishing copies, receipts and parked originals, persistent and `mandatory`, on a
//! channel in confirm mode. Publishing returns once the frames are queued for the socket, with a
//! pending confirm, so many messages are in flight per channel; `settle` awaits the confirms. A
//! flow goes on to its next message while the connection's I/O loop writes the frames of
//! several messages at once ([`Publishing`]).

use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, PublisherConfirm};
use tokio::time::Instant;

use crate::broker::BrokerError;

/// Header of a parked message replayed by ops for only some recipients (comma-separated): those a
/// partly delivered message was refused for.
pub const REPLAY_FOR: &str = "x-ponte-replay-for";

/// AMQP delivery mode that makes the broker write the message to disk.
pub const PERSISTENT: u8 = 2;

/// What a published message says about itself in its AMQP properties.
#[derive(Debug, Default, Clone)]
pub struct Labels<'a> {
    pub message_id: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    pub message_type: Option<&'a str>,
}

/// The content type of everything Ponte publishes.
pub const JSON: ShortString = ShortString::from_static("application/json");

/// The application id of everything Ponte publishes.
const PONTE: ShortString = ShortString::from_static("ponte");

/// Properties of a message Ponte publishes: JSON, persistent, labelled. The constants are not
/// copied for each message.
pub fn properties(labels: &Labels<'_>) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_content_type(JSON)
        .with_delivery_mode(PERSISTENT)
        .with_app_id(PONTE)
        .with_timestamp(crate::unix_secs() as u64);
    if let Some(id) = labels.message_id.filter(|s| s.len() <= 255) {
        p = p.with_message_id(id.into());
    }
    if let Some(id) = labels.correlation_id.filter(|s| s.len() <= 255) {
        p = p.with_correlation_id(id.into());
    }
    if let Some(t) = labels.message_type.filter(|s| s.len() <= 255) {
        p = p.with_type(t.into());
    }
    p
}

/// Adds string headers to a message's properties, keeping the headers it already had.
pub fn with_headers(properties: BasicProperties, headers: &[(&str, String)]) -> BasicProperties {
    let mut table = properties.headers().clone().unwrap_or_default();
    for (name, value) in headers {
        table.insert((*name).into(), AMQPValue::LongString(value.as_str().into()));
    }
    properties.with_headers(table)
}

/// The bytes `properties` take in a message's content header (their flags and values).
pub fn properties_len(properties: &BasicProperties) -> usize {
    let written = cookie_factory::gen_simple(
        lapin::protocol::basic::gen_properties(properties),
        Vec::new(),
    );
    written.map_or(usize::MAX, |bytes| bytes.len())
}

/// Bytes of a content header frame besides the properties: the frame's type, channel, size and
/// end (8), and the header's class, weight and body size (12).
const CONTENT_HEADER_FRAME: usize = 20;

/// Whether a message with `properties` can be published on a connection whose frames hold
/// `frame_max` bytes: AMQP sends a message's properties in one frame, whatever their size.
pub fn fits(properties: &BasicProperties, frame_max: u32) -> bool {
    properties_len(properties).saturating_add(CONTENT_HEADER_FRAME) <= frame_max as usize
}

/// Publishes `body` to `queue` through the default exchange and returns the pending confirm. The
/// channel must be in confirm mode (`broker::confirming_channel`); any other is refused.
pub fn publish(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<PublisherConfirm, BrokerError> {
    publish_to(channel, "", queue, body, properties)
}

/// Publishes `body` to `exchange` with `routing_key`, `mandatory` so that a message no queue
/// takes comes back instead of vanishing, and returns the pending confirm.
pub fn publish_to(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<PublisherConfirm, BrokerError> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    Ok(channel.basic_publish_confirmed(
        exchange.into(),
        routing_key.into(),
        options,
        body,
        properties,
    )?)
}

/// A copy handed to the channel: numbered for its confirm and queued for the socket, in the order
/// the copies were started. On a channel in confirm mode the publish returns once its frames are
/// queued: the connection's I/O loop writes them, and whoever settles the message awaits the
/// confirm, so a flow takes its next message without waiting for the socket.
pub struct Publishing {
    confirm: PublisherConfirm,
    body: Vec<u8>,
}

impl Publishing {
    /// Queues `body` for `queue` (through the default exchange, `mandatory`). A channel that is
    /// closed already is an error at once, as with [`publish`].
    pub fn start(
        channel: &Channel,
        queue: &str,
        body: Vec<u8>,
        properties: BasicProperties,
    ) -> Result<Publishing, BrokerError> {
        let confirm = publish(channel, queue, &body, properties)?;
        Ok(Publishing { confirm, body })
    }

    /// Waits for the confirm on `channel`, the one it was started on (as [`confirmed`]), by
    /// `timer`; returns the outcome and the body, for a copy that must go elsewhere.
    pub fn confirmed<'a>(
        self,
        channel: &'a Channel,
        queue: &'a str,
        timeout_secs: u64,
        timer: Pin<&'a mut Timer>,
    ) -> impl Future<Output = (Result<(), BrokerError>, Vec<u8>)> + Send + 'a {
        let Publishing { confirm, body } = self;
        let outcome = confirmed_by(channel, confirm, queue, timeout_secs, timer);
        async move { (outcome.await, body) }
    }
}

/// A confirm timeout that several confirms share: the copies of one message, all published
/// before the first is awaited. It starts when a confirm awaited with it has not come at once
/// and runs out `timeout_secs` later, so no copy is given up sooner than that after it was
/// published, nor later than it would be with a timeout of its own. Once it has run out, a
/// confirm awaited with it has what it has got already (or waits, as any, while the broker
/// blocks the connection).
///
/// One timer a message rather than one a copy: each costs a reading of the clock and, to
/// register it in the runtime's timer wheel and take it out again, two takings of the wheel's
/// lock.
pub type Timer = Option<tokio::time::Sleep>;

/// Waits for a confirm on `channel`. A nack, a message returned as unroutable, or silence
/// beyond the timeout are transient failures: the message goes back to its queue and is tried
/// again. While the broker blocks the channel's connection (`connection.blocked`: a memory or
/// disk alarm), nothing is written on it, so a timeout that runs out then is not counted: the
/// copy waits for the broker, as it asks, and the timeout starts again. Nor is one that runs
/// out less than a whole timeout after the broker unblocked the connection: the copy was
/// written only then, behind everything else that waited, and given up a moment after it
/// would be published again and delivered twice.
pub async fn confirmed(
    channel: &Channel,
    confirm: PublisherConfirm,
    queue: &str,
    timeout_secs: u64,
) -> Result<(), BrokerError> {
    confirmed_by(channel, confirm, queue, timeout_secs, pin!(None)).await
}

/// As [`confirmed`], by a [`Timer`] shared with other confirms.
///
/// A plain function returning its future, as [`within`]: awaited for every copy inside the
/// message's future, an `async fn` would keep its arguments there twice.
pub fn confirmed_by<'a>(
    channel: &'a Channel,
    confirm: PublisherConfirm,
    queue: &'a str,
    timeout_secs: u64,
    timer: Pin<&'a mut Timer>,
) -> impl Future<Output = Result<(), BrokerError>> + Send + 'a {
    let limit = Duration::from_secs(timeout_secs);
    let confirmation = within(confirm, limit, timer, move || {
        channel.connection_blocked_within(limit)
    });
    async move {
        let confirmation = confirmation
            .await
            .ok_or(BrokerError::ConfirmTimeout(timeout_secs))??;
        if confirmation.is_nack() {
            return Err(BrokerError::Nacked);
        }
        if confirmation.take_message().is_some() {
            return Err(BrokerError::NoQueue {
                queue: queue.to_string(),
            });
        }
        Ok(())
    }
}

/// What `future` gives, or `None` once `timer` (started `limit` ahead when `future` first has
/// nothing) runs out while `blocked` says no. While it says yes, the timer starts again.
fn within<F: Future + Unpin>(
    mut future: F,
    limit: Duration,
    mut timer: Pin<&mut Timer>,
    blocked: impl Fn() -> bool,
) -> impl Future<Output = Option<F::Output>> {
    std::future::poll_fn(move |cx| {
        loop {
            if let Poll::Ready(output) = Pin::new(&mut future).poll(cx) {
                return Poll::Ready(Some(output));
            }
            if timer.is_none() {
                timer.set(Some(tokio::time::sleep(limit)));
            }
            let mut sleep = timer.as_mut().as_pin_mut().expect("the timer was started");
            match sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                // Polled again at once, the future first: the timer is only registered when
                // polled.
                Poll::Ready(()) if blocked() => sleep.reset(Instant::now() + limit),
                Poll::Ready(()) => return Poll::Ready(None),
            }
        }
    })
}

/// Headers are a `FieldTable`; tests and tools read them back as strings.
pub fn header(properties: &BasicProperties, name: &str) -> Option<String> {
    let table: &FieldTable = properties.headers().as_ref()?;
    Some(text(table.inner().get(name)?))
}

/// A header's value as text: strings as they are, anything else as the client shows it.
pub fn text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    const LIMIT: Duration = Duration::from_secs(30);

    /// A confirm to wait for, as lapin's: it can be moved once polled.
    type Confirm = Pin<Box<dyn Future<Output = &'static str>>>;

    /// A confirm that comes `after` this long.
    fn confirm_after(after: Duration) -> Confirm {
        Box::pin(async move {
            tokio::time::sleep(after).await;
            "confirmed"
        })
    }

    /// A broker's alarm on a connection, as lapin's `Channel::connection_blocked_within` tells
    /// it, on the test's paused clock.
    struct Alarm {
        blocked: AtomicBool,
        unblocked: std::sync::Mutex<Option<Instant>>,
    }

    impl Alarm {
        fn raised() -> Self {
            Alarm {
                blocked: AtomicBool::new(true),
                unblocked: std::sync::Mutex::new(None),
            }
        }

        fn blocked_within(&self, window: Duration) -> bool {
            let unblocked = *self.unblocked.lock().unwrap();
            self.blocked.load(Ordering::SeqCst) || unblocked.is_some_and(|at| at.elapsed() < window)
        }

        /// Ends the broker's block on the connection `after` this long.
        async fn end_after(&self, after: Duration) {
            tokio::time::sleep(after).await;
            *self.unblocked.lock().unwrap() = Some(Instant::now());
            self.blocked.store(false, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_confirm_that_does_not_come_is_given_up_when_the_timeout_runs_out() {
        let began = Instant::now();
        let outcome = within(confirm_after(LIMIT * 2), LIMIT, pin!(None), || false).await;
        assert_eq!(outcome, None);
        assert_eq!(began.elapsed(), LIMIT);
        assert_eq!(
            within(confirm_after(LIMIT / 2), LIMIT, pin!(None), || false).await,
            Some("confirmed")
        );
    }

    /// A memory alarm of the broker lasting several timeouts: the copies wait for it, and are
    /// confirmed once it is over.
    #[tokio::test(start_paused = true)]
    async fn while_the_broker_blocks_the_connection_the_timeout_does_not_run_out() {
        let alarm = Alarm::raised();
        let timer = pin!(None);
        let (outcome, ()) = tokio::join!(
            within(confirm_after(LIMIT * 4), LIMIT, timer, || alarm
                .blocked_within(LIMIT)),
            alarm.end_after(LIMIT * 3 + LIMIT / 2),
        );
        assert_eq!(outcome, Some("confirmed"));
    }

    /// An alarm that ends just before a timeout runs out: the copy is written only then, behind
    /// all that waited, and its confirm comes in the next timeout. Given up at the first, the
    /// message would be published again and delivered twice.
    #[tokio::test(start_paused = true)]
    async fn a_copy_written_as_the_block_ends_is_given_a_whole_timeout_for_its_confirm() {
        let alarm = Alarm::raised();
        let timer = pin!(None);
        let (outcome, ()) = tokio::join!(
            within(confirm_after(LIMIT * 2 + LIMIT / 2), LIMIT, timer, || alarm
                .blocked_within(LIMIT)),
            alarm.end_after(LIMIT * 2 - LIMIT / 10),
        );
        assert_eq!(outcome, Some("confirmed"));
    }

    /// Once the block is over, a confirm that still does not come is given up at the end of the
    /// first timeout that runs out a whole timeout after it.
    #[tokio::test(start_paused = true)]
    async fn once_the_broker_unblocks_the_connection_a_silent_confirm_is_given_up() {
        let alarm = Alarm::raised();
        let began = Instant::now();
        let timer = pin!(None);
        let (outcome, ()) = tokio::join!(
            within(std::future::pending::<()>(), LIMIT, timer, || alarm
                .blocked_within(LIMIT)),
            alarm.end_after(LIMIT + LIMIT / 2),
        );
        assert_eq!(outcome, None);
        assert_eq!(began.elapsed(), LIMIT * 3);
    }

    /// A confirm that comes at `at`, however late it is awaited: a copy published at once.
    fn confirm_at(at: Instant) -> Confirm {
        Box::pin(async move {
            tokio::time::sleep_until(at).await;
            "confirmed"
        })
    }

    /// A message's copies awaited one after the other by one timer: those that do not come are
    /// given up together, one timeout after the first was awaited, not one timeout after each.
    #[tokio::test(start_paused = true)]
    async fn the_silent_copies_of_a_message_are_given_up_together() {
        let began = Instant::now();
        let mut timer = pin!(None);
        let first = confirm_at(began + LIMIT / 2);
        let (second, third) = (
            std::future::pending::<&str>(),
            std::future::pending::<&str>(),
        );
        assert_eq!(
            within(first, LIMIT, timer.as_mut(), || false).await,
            Some("confirmed")
        );
        assert_eq!(within(second, LIMIT, timer.as_mut(), || false).await, None);
        assert_eq!(within(third, LIMIT, timer.as_mut(), || false).await, None);
        assert_eq!(began.elapsed(), LIMIT);
    }

    /// The timer shared by a message's copies gives each the whole timeout from its publish:
    /// a confirm that came in time is taken, even once the timer has run out for another copy.
    #[tokio::test(start_paused = true)]
    async fn a_copy_confirmed_in_time_is_not_given_up_with_a_silent_one() {
        let began = Instant::now();
        let mut timer = pin!(None);
        let late = confirm_at(began + LIMIT - LIMIT / 10);
        let silent = std::future::pending::<&str>();
        let early = confirm_at(began + LIMIT / 2);
        let later = confirm_at(began + LIMIT - LIMIT / 20);
        assert_eq!(
            within(late, LIMIT, timer.as_mut(), || false).await,
            Some("confirmed")
        );
        assert_eq!(within(silent, LIMIT, timer.as_mut(), || false).await, None);
        assert_eq!(
            within(early, LIMIT, timer.as_mut(), || false).await,
            Some("confirmed")
        );
        assert_eq!(
            within(later, LIMIT, timer.as_mut(), || false).await,
            Some("confirmed")
        );
        assert_eq!(began.elapsed(), LIMIT);
    }

    /// A block that starts once the shared timer has run out: the copies still to be awaited
    /// wait for the broker too.
    #[tokio::test(start_paused = true)]
    async fn copies_awaited_after_their_timer_ran_out_wait_while_the_broker_blocks() {
        let began = Instant::now();
        let mut timer = pin!(None);
        let silent = std::future::pending::<&str>();
        assert_eq!(within(silent, LIMIT, timer.as_mut(), || false).await, None);
        let alarm = Alarm::raised();
        let (outcome, ()) = tokio::join!(
            within(confirm_at(began + LIMIT * 3), LIMIT, timer.as_mut(), || {
                alarm.blocked_within(LIMIT)
            }),
            alarm.end_after(LIMIT),
        );
        assert_eq!(outcome, Some("confirmed"));
    }

    #[test]
    fn properties_are_counted_as_the_wire_has_them() {
        // Two bytes of flags, then each value: a short string is its length byte and its bytes.
        assert_eq!(properties_len(&BasicProperties::default()), 2);
        let typed = BasicProperties::default().with_content_type("application/json".into());
        assert_eq!(properties_len(&typed), 2 + 1 + 16);
        // A header: the table's four length bytes, the name, its type, four length bytes, the text.
        let headed = with_headers(typed, &[("x-a", "bc".to_string())]);
        assert_eq!(properties_len(&headed), 19 + 4 + (1 + 3) + 1 + (4 + 2));
        // In a frame: 34 bytes of properties and 20 of frame and content header.
        assert!(fits(&headed, 54));
        assert!(!fits(&headed, 53));
    }
}
