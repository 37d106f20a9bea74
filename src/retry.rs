//! Retry: copies a recipient could not take now wait in the broker, never in the gateway's
//! memory. A copy refused by the recipient's queue goes to a delay queue `<prefix>.retry.<wait>`
//! (its time-to-live is the wait; jitter shortens it per message); when the wait is over the
//! broker dead-letters it into `<prefix>.redeliver`, which Ponte consumes to try the copy again.
//! Each failed attempt doubles the wait, up to `delivery.retry_max_ms`. After
//! `delivery.max_attempts`, or `delivery.max_age_secs` after its first attempt, the copy goes to
//! `<prefix>.dlq.<recipient>` with headers saying why, and the sender gets an `undeliverable`
//! receipt for that recipient.
//!
//! The attempt count and the time of the first attempt travel with the copy, in headers, so they
//! survive a gateway restart.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::types::ShortString;
use lapin::{BasicProperties, Channel};
use tracing::warn;

use crate::broker::{BrokerError, Queues};
use crate::deliver::{Labels, confirmed, header, properties, publish, with_headers};
use crate::journal::{Event, Journal};
use crate::receipt::{self, Answered, Undelivered};
use crate::rejection::{Code, FieldError};
use crate::settings::DeliverySettings;

pub const SENDER: &str = "x-ponte-sender";
pub const RECIPIENT: &str = "x-ponte-recipient";
pub const ATTEMPTS: &str = "x-ponte-attempts";
/// Unix time in milliseconds of the first attempt.
pub const FIRST_ATTEMPT: &str = "x-ponte-first-attempt-ms";
pub const LAST_ERROR: &str = "x-ponte-last-error";
/// Set on a copy sent again by an operator (`ponte dlq replay`).
pub const REPLAY: &str = "x-ponte-replay";

/// Longest excerpt of an HTTP response body kept in a dead letter's headers.
const EXCERPT_CHARS: usize = 512;

/// One copy for one recipient and its history so far.
#[derive(Debug, Clone)]
pub struct Copy {
    pub sender: String,
    pub recipient: String,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub message_type: Option<String>,
    /// Attempts made so far (the one that just failed included).
    pub attempts: u32,
    pub first_attempt_ms: u64,
    pub replay: Option<String>,
}

impl Copy {
    /// Reads a copy's history from the headers it carries in the delay and redelivery queues.
    pub fn from_properties(properties: &BasicProperties) -> Option<Copy> {
        let text = |name: &str| header(properties, name);
        Some(Copy {
            sender: text(SENDER)?,
            recipient: text(RECIPIENT)?,
            message_id: properties.message_id().as_ref().map(|s| s.to_string()),
            correlation_id: properties.correlation_id().as_ref().map(|s| s.to_string()),
            message_type: properties.kind().as_ref().map(|s| s.to_string()),
            attempts: text(ATTEMPTS).and_then(|a| a.parse().ok()).unwrap_or(0),
            first_attempt_ms: text(FIRST_ATTEMPT)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(now_ms),
            replay: text(REPLAY),
        })
    }

    fn labels(&self) -> Labels<'_> {
        Labels {
            message_id: self.message_id.as_deref(),
            correlation_id: self.correlation_id.as_deref(),
            message_type: self.message_type.as_deref(),
        }
    }

    /// The properties of the copy as its recipient gets it: no retry bookkeeping.
    pub fn delivered_properties(&self) -> BasicProperties {
        properties(&self.labels())
    }

    /// A delivery-log record of `step` for this copy, with `why`.
    pub fn event(&self, step: &'static str, why: &str) -> Event {
        let mut detail = format!("attempts: {}", self.attempts);
        if !why.is_empty() {
            detail.push_str("; ");
            detail.push_str(&excerpt(why));
        }
        if let Some(from) = &self.replay {
            detail.push_str(&format!("; replay from {from}"));
        }
        Event {
            message_id: self.message_id.clone().unwrap_or_default(),
            correlation_id: self.correlation_id.clone().unwrap_or_default(),
            sender: self.sender.clone(),
            recipients: self.recipient.clone(),
            message_type: self.message_type.clone().unwrap_or_default(),
            code: if step == "dead-lettered" {
                Code::Undeliverable.as_str().into()
            } else if step == "delivered" {
                Code::Delivered.as_str().into()
            } else {
                "".into()
            },
            detail,
            ..Event::now(step)
        }
    }

    /// How long ago the first attempt was made.
    pub fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.first_attempt_ms))
    }

    fn headers(&self, last_error: &str) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (SENDER, self.sender.clone()),
            (RECIPIENT, self.recipient.clone()),
            (ATTEMPTS, self.attempts.to_string()),
            (FIRST_ATTEMPT, self.first_attempt_ms.to_string()),
            (LAST_ERROR, excerpt(last_error)),
        ];
        if let Some(replay) = &self.replay {
            headers.push((REPLAY, replay.clone()));
        }
        headers
    }
}

/// Why an attempt failed, as the dead letter and the receipt tell it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub reason: String,
    /// The HTTP status the endpoint answered, if it answered.
    pub status: Option<u16>,
    /// The start of the endpoint's answer.
    pub response: Option<String>,
}

impl Failure {
    pub fn new(reason: impl Into<String>) -> Failure {
        Failure {
            reason: reason.into(),
            status: None,
            response: None,
        }
    }
}

/// Where retried and given-up copies go: the channel (in confirm mode) that publishes them, the
/// queue names and retry settings, and the delivery log.
#[derive(Clone, Copy)]
pub struct Outbox<'a> {
    pub channel: &'a Channel,
    pub journal: &'a Journal,
    pub queues: &'a Queues,
    pub settings: &'a DeliverySettings,
    pub timeout_secs: u64,
}

/// Puts `body` in the delay queue for its next attempt and returns once the broker confirmed.
pub async fn schedule(
    outbox: Outbox<'_>,
    copy: &Copy,
    body: &[u8],
    failure: &Failure,
) -> Result<(), BrokerError> {
    let Outbox {
        channel,
        queues,
        settings,
        timeout_secs,
        ..
    } = outbox;
    let delay = settings.delay_after(copy.attempts);
    let queue = queues.retry(delay.as_millis() as u64);
    let wait = jitter(delay);
    let properties = with_headers(copy.delivered_properties(), &copy.headers(&failure.reason))
        .with_expiration(ShortString::from(wait.as_millis().to_string()));
    let confirm = publish(channel, &queue, body, properties)?;
    confirmed(channel, confirm, &queue, timeout_secs).await?;
    note_retry(outbox.journal, copy, failure, wait);
    Ok(())
}

/// Gives up on a copy: parks it in `<prefix>.dlq.<recipient>` with why, how many attempts and
/// when, then sends the sender an `undeliverable` receipt for that recipient. Returns once the
/// broker confirmed both.
pub async fn dead_letter(
    outbox: Outbox<'_>,
    copy: &Copy,
    body: &[u8],
    failure: &Failure,
) -> Result<(), BrokerError> {
    let Outbox {
        channel,
        journal,
        queues,
        timeout_secs,
        ..
    } = outbox;
    let mut headers = copy.headers(&failure.reason);
    headers.push(("x-ponte-code", Code::Undeliverable.as_str().to_string()));
    headers.push(("x-ponte-reason", excerpt(&failure.reason)));
    headers.push((
        "x-ponte-first-attempt-at",
        crate::journal::rfc3339(copy.first_attempt_ms as i64),
    ));
    headers.push(("x-ponte-dead-lettered-at", receipt::now_rfc3339()));
    if let Some(status) = failure.status {
        headers.push(("x-ponte-http-status", status.to_string()));
    }
    if let Some(response) = &failure.response {
        headers.push(("x-ponte-response", excerpt(response)));
    }
    let dlq = queues.dead_letters(&copy.recipient);
    let parked = publish(
        channel,
        &dlq,
        body,
        with_headers(copy.delivered_properties(), &headers),
    )?;

    let errors = [FieldError::new(
        "",
        "delivery",
        format!(
            "not delivered to {} after {} attempt(s): {}",
            copy.recipient,
            copy.attempts,
            excerpt(&failure.reason)
        ),
    )];
    let undelivered = [Undelivered {
        recipient: &copy.recipient,
        code: Code::Undeliverable,
        errors: &errors,
    }];
    let answered = Answered {
        partner: &copy.sender,
        message_id: copy.message_id.as_deref(),
        message_type: copy.message_type.as_deref(),
    };
    let receipt = receipt::build(answered, Code::Undeliverable, &[], &[], &[], &undelivered);
    let receipts = queues.receipts(&copy.sender);
    let id = receipt.message_id.to_string();
    let labels = Labels {
        message_id: Some(&id),
        correlation_id: copy.message_id.as_deref(),
        message_type: Some("receipt"),
    };
    let answer = publish(channel, &receipts, &receipt.body, properties(&labels))?;
    confirmed(channel, parked, &dlq, timeout_secs).await?;
    confirmed(channel, answer, &receipts, timeout_secs).await?;
    journal.record(copy.event("dead-lettered", &failure.reason));
    metrics::counter!("ponte_dead_letters_total", "recipient" => copy.recipient.clone())
        .increment(1);
    warn!(
        message_id = copy.message_id.as_deref().unwrap_or(""),
        r#type = copy.message_type.as_deref().unwrap_or(""),
        sender = %copy.sender,
        recipient = %copy.recipient,
        attempts = copy.attempts,
        http_status = failure.status.unwrap_or(0),
        outcome = "dead-lettered",
        code = Code::Undeliverable.as_str(),
        reason = %excerpt(&failure.reason),
        "copy dead-lettered; the sender is told it is undeliverable"
    );
    Ok(())
}

/// After a failed attempt: the next delay queue, or the dead-letter queue when the copy has used
/// up its attempts or its age.
pub async fn after_failure(
    outbox: Outbox<'_>,
    copy: &Copy,
    body: &[u8],
    failure: &Failure,
) -> Result<(), BrokerError> {
    if outbox.settings.exhausted(copy.attempts, copy.age()) {
        dead_letter(outbox, copy, body, failure).await
    } else {
        schedule(outbox, copy, body, failure).await
    }
}

/// Records that `copy` failed and is tried again after `wait`: in the delivery log, the retry
/// counter and the log.
pub fn note_retry(journal: &Journal, copy: &Copy, failure: &Failure, wait: Duration) {
    journal.record(copy.event("retrying", &failure.reason));
    metrics::counter!("ponte_retries_total", "recipient" => copy.recipient.clone()).increment(1);
    tracing::info!(
        message_id = copy.message_id.as_deref().unwrap_or(""),
        sender = %copy.sender,
        recipient = %copy.recipient,
        attempts = copy.attempts,
        retry_in_ms = wait.as_millis() as u64,
        outcome = "retrying",
        reason = %failure.reason,
        "the copy could not be delivered now; it is tried again later"
    );
}

/// A wait between half of `delay` and all of it, so that copies that failed together do not come
/// back together.
pub fn jitter(delay: Duration) -> Duration {
    delay.mul_f64(0.5 + fastrand::f64() / 2.0)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The first characters of `text`, on one line.
pub fn excerpt(text: &str) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(EXCERPT_CHARS)
        .collect();
    one_line.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_longest_and_jitter_stays_within_half() {
        let settings = DeliverySettings {
            retry_initial_ms: 100,
            retry_max_ms: 1000,
            max_attempts: 5,
            max_age_secs: 60,
        };
        assert_eq!(settings.delays_ms(), vec![100, 200, 400, 800, 1000]);
        assert_eq!(settings.delay_after(1), Duration::from_millis(100));
        assert_eq!(settings.delay_after(3), Duration::from_millis(400));
        assert_eq!(settings.delay_after(40), Duration::from_millis(1000));
        for _ in 0..100 {
            let wait = jitter(Duration::from_millis(400));
            assert!(wait >= Duration::from_millis(200) && wait <= Duration::from_millis(400));
        }
        assert!(!settings.exhausted(4, Duration::from_secs(59)));
        assert!(settings.exhausted(5, Duration::ZERO));
        assert!(settings.exhausted(1, Duration::from_secs(60)));
    }

    #[test]
    fn a_copy_keeps_its_history_in_headers() {
        let copy = Copy {
            sender: "inps".into(),
            recipient: "cpi-modena".into(),
            message_id: Some("m-1".into()),
            correlation_id: None,
            message_type: Some("benefit-status".into()),
            attempts: 3,
            first_attempt_ms: 1_700_000_000_000,
            replay: None,
        };
        let properties = with_headers(copy.delivered_properties(), &copy.headers("queue full"));
        let read = Copy::from_properties(&properties).unwrap();
        assert_eq!(read.sender, "inps");
        assert_eq!(read.recipient, "cpi-modena");
        assert_eq!(read.attempts, 3);
        assert_eq!(read.first_attempt_ms, 1_700_000_000_000);
        assert_eq!(read.message_id.as_deref(), Some("m-1"));
        assert_eq!(
            header(&properties, LAST_ERROR).as_deref(),
            Some("queue full")
        );
        assert!(copy.delivered_properties().headers().is_none());
    }
}
