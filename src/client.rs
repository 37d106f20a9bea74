//! Client: what a partner's back office (or an operator) does against the broker, for the demo
//! and for tests: publish a message as a partner, and take messages from a partner's queues.

use std::time::{Duration, Instant};

use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use serde_json::Value;

use crate::broker::{BrokerError, Queues, confirming_channel, connect};
use crate::deliver::{Labels, confirmed, header, properties, publish_to, with_headers};
use crate::directory::Directory;

/// Publishes each body to `partner`'s inbound exchange, as that partner's back office would, and
/// waits for the broker's confirms. `sent` is called after each confirmed message.
pub async fn send(
    directory: &Directory,
    partner: &str,
    bodies: impl IntoIterator<Item = Vec<u8>>,
    mut sent: impl FnMut(usize),
) -> Result<(), BrokerError> {
    let connection = connect(directory, "ponte send").await?;
    let channel = confirming_channel(&connection).await?;
    let queue = Queues::new(&directory.settings.broker.prefix).inbound(partner);
    let timeout = directory.settings.broker.publish_timeout_secs;
    let mut result = Ok(());
    for (index, body) in bodies.into_iter().enumerate() {
        result = publish_confirmed(&channel, &queue, "", &body, &[], None, timeout).await;
        if result.is_err() {
            break;
        }
        sent(index);
    }
    let _ = connection.close(200, "sent".into()).await;
    result
}

/// Publishes one message body to `exchange` (with `routing_key`) with the AMQP labels taken from
/// the envelope itself (message_id, correlation_id, type), `headers` and `user_id`, and waits
/// for the broker's confirm.
async fn publish_confirmed(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    headers: &[(&str, String)],
    user_id: Option<&str>,
    timeout_secs: u64,
) -> Result<(), BrokerError> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.get(name))
            .and_then(Value::as_str)
    };
    let labels = Labels {
        message_id: field("message_id"),
        correlation_id: field("correlation_id"),
        message_type: field("type"),
    };
    let mut props = with_headers(properties(&labels), headers);
    if let Some(user) = user_id {
        props = props.with_user_id(user.into());
    }
    let confirm = publish_to(channel, exchange, routing_key, body, props)?;
    confirmed(channel, confirm, exchange, timeout_secs).await
}

/// A message taken from a queue.
#[derive(Debug)]
pub struct Taken {
    pub body: Vec<u8>,
    /// `x-ponte-*` headers (the reason of a parked message).
    pub headers: Vec<(String, String)>,
    pub message_id: Option<String>,
}

impl Taken {
    fn from_delivery(delivery: &lapin::message::Delivery) -> Taken {
        let headers = delivery
            .properties
            .headers()
            .as_ref()
            .map(|t| {
                t.inner()
                    .keys()
                    .filter_map(|k| {
                        let k = k.as_str();
                        header(&delivery.properties, k).map(|v| (k.to_string(), v))
                    })
                    .collect()
            })
            .unwrap_or_default();
        // The AMQP property when the publisher set one, else the envelope's own field.
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_string())
            .or_else(|| {
                serde_json::from_slice::<Value>(&delivery.data)
                    .ok()?
                    .get("message_id")?
                    .as_str()
                    .map(String::from)
            });
        Taken {
            body: delivery.data.clone(),
            headers,
            message_id,
        }
    }

    /// The value of one header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every message of a queue, held unacknowledged: nothing is removed unless taken with
/// [`Browse::remove`]; the rest go back to the queue, in their order, when the browse closes.
pub struct Browse {
    connection: crate::broker::Link,
    /// Held open: closing the channel gives the messages back to the queue.
    _channel: lapin::Channel,
    pub messages: Vec<(Acker, Taken)>,
}

/// Reads every message currently in `queue` without removing any.
pub async fn browse(directory: &Directory, queue: &str) -> Result<Browse, BrokerError> {
    let connection = connect(directory, "ponte browse").await?;
    let channel = connection.create_channel().await?;
    let mut messages = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await?
    {
        let taken = Taken::from_delivery(&message.delivery);
        messages.push((message.delivery.acker, taken));
    }
    Ok(Browse {
        connection,
        _channel: channel,
        messages,
    })
}

impl Browse {
    /// Removes the message at `index` from its queue for good.
    pub async fn remove(&self, index: usize) -> Result<(), BrokerError> {
        let acked = self.messages[index]
            .0
            .ack(BasicAckOptions::default())
            .await?;
        if acked {
            Ok(())
        } else {
            Err(BrokerError::ChannelClosed)
        }
    }

    /// Ends the browse: every message not removed goes back to its queue.
    pub async fn close(self) {
        let _ = self.connection.close(200, "browsed".into()).await;
    }
}

/// Publishes `body` to `partner`'s inbound exchange again as a replay (header `x-ponte-replay`,
/// saying where it came from; `only`, for a partly delivered message, names the recipients it is
/// replayed for), and waits for the broker's confirm. It carries Ponte's broker user as
/// `user_id`, which the broker checks: the gateway honours replay headers only on messages
/// that do (a sender could write the headers too).
pub async fn republish(
    directory: &Directory,
    partner: &str,
    body: &[u8],
    from: &str,
    only: Option<&str>,
) -> Result<(), BrokerError> {
    let mut headers = vec![("x-ponte-replay", from.to_string())];
    if let Some(only) = only {
        headers.push((crate::deliver::REPLAY_FOR, only.to_string()));
    }
    let connection = connect(directory, "ponte replay").await?;
    let channel = confirming_channel(&connection).await?;
    let exchange = Queues::new(&directory.settings.broker.prefix).inbound(partner);
    let result = publish_confirmed(
        &channel,
        &exchange,
        "",
        body,
        &headers,
        directory.settings.broker_user().as_deref(),
        directory.settings.broker.publish_timeout_secs,
    )
    .await;
    let _ = connection.close(200, "replayed".into()).await;
    result
}

/// Puts a dead-lettered copy in the redelivery queue with `headers` (its sender and recipient,
/// attempts reset), so the gateway tries it again; waits for the broker's confirm.
pub async fn redeliver(
    directory: &Directory,
    body: &[u8],
    headers: &[(&str, String)],
) -> Result<(), BrokerError> {
    let connection = connect(directory, "ponte replay").await?;
    let channel = confirming_channel(&connection).await?;
    let queue = Queues::new(&directory.settings.broker.prefix).redeliver();
    let result = publish_confirmed(
        &channel,
        "",
        &queue,
        body,
        headers,
        None,
        directory.settings.broker.publish_timeout_secs,
    )
    .await;
    let _ = connection.close(200, "replayed".into()).await;
    result
}

/// Takes (and acknowledges) up to `count` messages from `queue`, waiting up to `wait` for them.
pub async fn take(
    directory: &Directory,
    queue: &str,
    count: usize,
    wait: Duration,
) -> Result<Vec<Taken>, BrokerError> {
    let connection = connect(directory, "ponte receive").await?;
    let channel = connection.create_channel().await?;
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    while out.len() < count {
        match channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await?
        {
            Some(message) => {
                let delivery = message.delivery;
                delivery.acker.ack(BasicAckOptions::default()).await?;
                out.push(Taken::from_delivery(&delivery));
            }
            None if Instant::now() >= deadline => break,
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(out)
}

/// Sends a dead-lettered copy to its recipient again through the redelivery queue, with fresh
/// attempts, if its sender may still send that type to the recipient. The inner error says why
/// not.
pub async fn replay_dead_letter(
    directory: &Directory,
    recipient: &str,
    letter: &Taken,
    queue: &str,
) -> Result<Result<(), String>, BrokerError> {
    use crate::retry;
    let Some(sender) = letter.header(retry::SENDER) else {
        return Ok(Err(
            "it does not say which partner sent it (x-ponte-sender)".into(),
        ));
    };
    let message_type = serde_json::from_slice::<Value>(&letter.body)
        .ok()
        .and_then(|v| v.get("type")?.as_str().map(String::from))
        .unwrap_or_default();
    if !directory.partners.contains_key(sender) {
        return Ok(Err(format!(
            "its sender {sender} is no longer a configured partner"
        )));
    }
    if !directory
        .matrix
        .may_ever_send(sender, &message_type, recipient)
    {
        return Ok(Err(format!(
            "authorization.toml no longer lets {sender} send {message_type} to {recipient}"
        )));
    }
    let headers = [
        (retry::SENDER, sender.to_string()),
        (retry::RECIPIENT, recipient.to_string()),
        (retry::ATTEMPTS, "0".to_string()),
        (retry::FIRST_ATTEMPT, retry::now_ms().to_string()),
        (retry::REPLAY, queue.to_string()),
    ];
    redeliver(directory, &letter.body, &headers).await?;
    Ok(Ok(()))
}

/// Messages ready in each of `queues` (0 for a queue that does not exist).
pub async fn depths(directory: &Directory, queues: &[String]) -> Result<Vec<u32>, BrokerError> {
    let connection = connect(directory, "ponte console").await?;
    let mut out = Vec::with_capacity(queues.len());
    for queue in queues {
        // A passive declare of a missing queue closes the channel: one channel per queue.
        let channel = connection.create_channel().await?;
        let depth = crate::broker::ready(&channel, queue).await.unwrap_or(0);
        out.push(depth);
        let _ = channel.close(200, "counted".into()).await;
    }
    let _ = connection.close(200, "counted".into()).await;
    Ok(out)
}
