//! Courier: delivery to a partner that receives by HTTPS. Copies reach the partner's outbound
//! queue as for any partner; the courier consumes that queue and POSTs each copy, one at a time
//! and in queue order, to the partner's endpoint with an `Idempotency-Key` equal to the message
//! id.
//!
//! - 2xx: delivered; the copy is acknowledged.
//! - 408, 429, 5xx, a timeout or a connection failure: the endpoint is unavailable. The copy stays
//!   in the broker, unacknowledged (a restart gives it back), and is tried again after a backoff
//!   with jitter, or after the endpoint's `Retry-After`, capped at `delivery.retry_max_ms`.
//!   Later copies wait behind it, so the partner receives every sender's messages in order.
//!   Out of attempts or age, it is dead-lettered.
//! - Any other status: the endpoint refuses this copy; it is dead-lettered at once with the
//!   status and the start of the answer, and the sender gets an `undeliverable` receipt.
//!
//! Prefetch bounds what the courier holds; a slow endpoint only makes its own queue longer.

use std::sync::Arc;
use std::time::Duration;

use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::broker::{BrokerError, Queues, one_at_a_time};
use crate::deliver::header;
use crate::journal::Journal;
use crate::partner::{HttpSettings, Partner};
use crate::resolve::{describe, http_client, with_tls_files};
use crate::retry::{self, Failure};
use crate::settings::DeliverySettings;

/// Copies the broker hands the courier ahead of the one being posted.
const PREFETCH: u16 = 16;

/// What one POST came to.
#[derive(Debug)]
enum Posted {
    Delivered(u16),
    /// The endpoint cannot take it now; `retry_after` is what it asked for.
    Unavailable {
        failure: Failure,
        retry_after: Option<Duration>,
    },
    /// The endpoint refuses this copy for good.
    Refused(Failure),
}

/// A partner's endpoint, with its client built once at start-up.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub client: reqwest::Client,
    pub url: reqwest::Url,
}

impl Endpoint {
    /// The endpoint of `settings`: its URL and a client with its timeout, extra authorities and
    /// client certificate.
    pub fn new(settings: &HttpSettings) -> Result<Endpoint, String> {
        Ok(Endpoint {
            client: client(settings)?,
            url: reqwest::Url::parse(&settings.url).map_err(|e| e.to_string())?,
        })
    }
}

/// Every HTTP partner's endpoint, by partner id.
pub fn endpoints(
    partners: &std::collections::BTreeMap<String, Partner>,
) -> Result<std::collections::BTreeMap<String, Endpoint>, String> {
    partners
        .values()
        .filter_map(|p| Some((p, p.http.as_ref()?)))
        .map(|(p, http)| {
            let endpoint = Endpoint::new(http).map_err(|e| format!("{}: http: {e}", p.id))?;
            Ok((p.id.clone(), endpoint))
        })
        .collect()
}

pub struct Courier {
    /// The partner delivered to.
    pub partner: String,
    pub endpoint: Endpoint,
    pub delivery: DeliverySettings,
    pub names: Queues,
    pub consume: Channel,
    /// In confirm mode: dead letters and receipts.
    pub publish: Channel,
    pub timeout_secs: u64,
    pub journal: Arc<Journal>,
}

/// The envelope fields a courier needs from a copy.
#[derive(Deserialize)]
struct Head {
    sender: String,
}

/// The HTTP client of a partner's endpoint, with its extra authorities and client certificate.
fn client(settings: &HttpSettings) -> Result<reqwest::Client, String> {
    let builder = http_client(settings.timeout()).redirect(reqwest::redirect::Policy::none());
    with_tls_files(
        builder,
        settings.ca_file.as_deref(),
        settings.client_identity_file.as_deref(),
    )?
    .build()
    .map_err(|e| e.to_string())
}

impl Courier {
    /// Consumes the partner's outbound queue until `stop` is cancelled (`Ok`) or the broker
    /// fails; says so on `ready`, when given one, once it consumes. May be run again, on new
    /// channels, once it has returned.
    pub async fn run(
        &self,
        stop: CancellationToken,
        ready: Option<tokio::sync::mpsc::Sender<()>>,
    ) -> Result<(), BrokerError> {
        let queue = self.names.outbound(&self.partner);
        let tag = format!("ponte-courier-{}", self.partner);
        one_at_a_time(
            (&self.consume, &self.publish),
            &queue,
            &tag,
            PREFETCH,
            &stop,
            ready,
            |delivery| self.handle(delivery, &stop),
        )
        .await
    }

    /// Posts one copy until it is delivered or dead-lettered, or the gateway stops (then it goes
    /// back to the queue, in its place).
    async fn handle(
        &self,
        delivery: Delivery,
        stop: &CancellationToken,
    ) -> Result<(), BrokerError> {
        let properties = &delivery.properties;
        let sender = serde_json::from_slice::<Head>(&delivery.data)
            .map(|h| h.sender)
            .unwrap_or_default();
        let mut copy = retry::Copy {
            sender,
            recipient: self.partner.clone(),
            message_id: properties.message_id().as_ref().map(|s| s.to_string()),
            correlation_id: properties.correlation_id().as_ref().map(|s| s.to_string()),
            message_type: properties.kind().as_ref().map(|s| s.to_string()),
            attempts: 0,
            // When Ponte put it in the queue (a timestamp in seconds).
            first_attempt_ms: properties
                .timestamp()
                .map_or_else(retry::now_ms, |t| t.saturating_mul(1000)),
            replay: header(properties, retry::REPLAY),
        };
        loop {
            copy.attempts += 1;
            let failure = match self.post(&delivery.data, copy.message_id.as_deref()).await {
                Posted::Delivered(status) => {
                    self.journal
                        .record(copy.event("delivered", &format!("HTTP {status}")));
                    info!(
                        message_id = copy.message_id.as_deref().unwrap_or(""),
                        r#type = copy.message_type.as_deref().unwrap_or(""),
                        sender = %copy.sender,
                        recipient = %copy.recipient,
                        attempts = copy.attempts,
                        http_status = status,
                        outcome = "delivered",
                        code = "delivered",
                        replay = copy.replay.as_deref().unwrap_or(""),
                        "copy delivered to the partner's endpoint"
                    );
                    break;
                }
                Posted::Refused(failure) => Some(failure),
                Posted::Unavailable {
                    failure,
                    retry_after,
                } => {
                    if self.delivery.exhausted(copy.attempts, copy.age()) {
                        Some(failure)
                    } else {
                        let longest = Duration::from_millis(self.delivery.retry_max_ms);
                        let wait = retry_after
                            .unwrap_or_else(|| {
                                retry::jitter(self.delivery.delay_after(copy.attempts))
                            })
                            .min(longest);
                        retry::note_retry(&self.journal, &copy, &failure, wait);
                        tokio::select! {
                            () = stop.cancelled() => {
                                delivery.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await?;
                                return Ok(());
                            }
                            () = tokio::time::sleep(wait) => {}
                        }
                        None
                    }
                }
            };
            if let Some(failure) = failure {
                let outbox = retry::Outbox {
                    channel: &self.publish,
                    journal: &self.journal,
                    queues: &self.names,
                    settings: &self.delivery,
                    timeout_secs: self.timeout_secs,
                };
                retry::dead_letter(outbox, &copy, &delivery.data, &failure).await?;
                break;
            }
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    async fn post(&self, body: &[u8], message_id: Option<&str>) -> Posted {
        let mut request = self
            .endpoint
            .client
            .post(self.endpoint.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(id) = message_id {
            request = request.header("Idempotency-Key", id);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => {
                return Posted::Unavailable {
                    failure: Failure::new(describe(&e, "partner endpoint")),
                    retry_after: None,
                };
            }
        };
        let status = response.status().as_u16();
        if response.status().is_success() {
            return Posted::Delivered(status);
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(retry_after);
        let text = response.text().await.unwrap_or_default();
        let failure = Failure {
            reason: format!("partner endpoint answered HTTP {status}"),
            status: Some(status),
            response: Some(retry::excerpt(&text)),
        };
        if matches!(status, 408 | 429) || (500..600).contains(&status) {
            Posted::Unavailable {
                failure,
                retry_after,
            }
        } else {
            Posted::Refused(failure)
        }
    }
}

/// A `Retry-After` value: seconds, or an HTTP date.
fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        let wait = retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(wait > Duration::from_secs(100) && wait <= Duration::from_secs(120));
        assert_eq!(retry_after("soon"), None);
    }
}
