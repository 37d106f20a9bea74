//! Pipeline: the pure part of handling one inbound message — decode → validate → authorize →
//! route → map — with no broker in sight. Its verdict says what to publish; `settle` does it.

use serde_json::Value;

use crate::authorize::{check_may_receive, check_may_send, check_sender};
use crate::decode::{DecodeLimits, decode};
use crate::directory::Directory;
use crate::map::for_recipient;
use crate::partner::Partner;
use crate::rejection::Rejection;
use crate::route::recipients;

/// One recipient's copy of a message, serialized.
#[derive(Debug, Clone)]
pub struct Copy {
    pub recipient: String,
    pub body: Vec<u8>,
}

/// What the pipeline decided about one message.
#[derive(Debug)]
pub struct Verdict {
    /// The message's own `message_id`, when it had a string one (even if otherwise invalid).
    pub message_id: Option<String>,
    pub message_type: Option<String>,
    pub correlation_id: Option<String>,
    /// The copies to deliver, or why the message is refused.
    pub outcome: Result<Vec<Copy>, Rejection>,
}

/// Runs every step for a message that arrived on `owner`'s inbound queue.
pub fn process(directory: &Directory, owner: &Partner, body: &[u8]) -> Verdict {
    let limits = DecodeLimits {
        max_bytes: directory.settings.limits.max_message_bytes,
        max_depth: directory.settings.limits.max_depth,
    };
    let envelope = match decode(body, limits) {
        Ok(e) => e,
        Err(rejection) => {
            return Verdict {
                message_id: None,
                message_type: None,
                correlation_id: None,
                outcome: Err(rejection),
            };
        }
    };
    let field = |name: &str| envelope.get(name).and_then(Value::as_str).map(String::from);
    let (message_id, message_type, correlation_id) =
        (field("message_id"), field("type"), field("correlation_id"));
    Verdict {
        outcome: copies(
            directory,
            owner,
            envelope,
            message_type.as_deref().unwrap_or_default(),
        ),
        message_id,
        message_type,
        correlation_id,
    }
}

fn copies(
    directory: &Directory,
    owner: &Partner,
    envelope: Value,
    message_type: &str,
) -> Result<Vec<Copy>, Rejection> {
    directory.schemas.validate(&envelope)?;
    check_sender(&envelope, owner)?;
    check_may_send(owner, message_type)?;
    let targets = recipients(&envelope, message_type, owner, directory)?;
    for recipient in &targets {
        check_may_receive(recipient, message_type)?;
    }
    // Every recipient but the last gets a clone; the last gets the envelope itself.
    let last = targets.len() - 1;
    let mut envelope = Some(envelope);
    targets
        .into_iter()
        .enumerate()
        .map(|(i, recipient)| {
            let source = if i == last {
                envelope.take()
            } else {
                envelope.clone()
            };
            let source = source.expect("the envelope is only taken by the last recipient");
            let mapped = for_recipient(source, recipient)?;
            Ok(Copy {
                recipient: recipient.id.clone(),
                body: serde_json::to_vec(&mapped).expect("a JSON value always serializes"),
            })
        })
        .collect()
}
