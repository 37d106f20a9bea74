//! Authorize: the sender is the partner that owns the queue the message arrived on, it may send
//! this type, and every recipient may receive it.

use serde_json::Value;

use crate::partner::Partner;
use crate::rejection::{Code, FieldError, Rejection};

/// The `sender` field must name the queue's owner: a partner's broker user can write only to its
/// own inbound queue, so this is what proves who sent the message.
pub fn check_sender(envelope: &Value, owner: &Partner) -> Result<(), Rejection> {
    let claimed = envelope.get("sender").and_then(Value::as_str).unwrap_or("");
    if claimed != owner.id {
        return Err(Rejection::one(
            Code::SenderMismatch,
            FieldError::new(
                "/sender",
                "sender",
                format!(
                    "message arrived on the queue of {} but claims to be from {claimed:?}",
                    owner.id
                ),
            ),
        ));
    }
    Ok(())
}

pub fn check_may_send(sender: &Partner, message_type: &str) -> Result<(), Rejection> {
    if !sender.may_send.contains(message_type) {
        return Err(Rejection::one(
            Code::NotAuthorized,
            FieldError::new(
                "/type",
                "authorization",
                format!("{} is not authorized to send {message_type}", sender.id),
            ),
        ));
    }
    Ok(())
}

pub fn check_may_receive(recipient: &Partner, message_type: &str) -> Result<(), Rejection> {
    if !recipient.may_receive.contains(message_type) {
        return Err(Rejection::one(
            Code::NotAuthorized,
            FieldError::new(
                "/recipient",
                "authorization",
                format!(
                    "{} is not authorized to receive {message_type}",
                    recipient.id
                ),
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::Directory;
    use serde_json::json;

    fn demo() -> Directory {
        Directory::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config")).unwrap()
    }

    #[test]
    fn the_sender_must_be_the_queue_owner() {
        let d = demo();
        let m = json!({"sender": "inps"});
        assert!(check_sender(&m, &d.partners["inps"]).is_ok());
        assert_eq!(
            check_sender(&m, &d.partners["cpi-modena"])
                .unwrap_err()
                .code,
            Code::SenderMismatch
        );
        assert_eq!(
            check_sender(&json!({}), &d.partners["inps"])
                .unwrap_err()
                .code,
            Code::SenderMismatch
        );
    }

    #[test]
    fn rights_come_from_the_partner_files() {
        let d = demo();
        assert!(check_may_send(&d.partners["inps"], "benefit-status").is_ok());
        assert_eq!(
            check_may_send(&d.partners["inps"], "referral")
                .unwrap_err()
                .code,
            Code::NotAuthorized
        );
        assert!(check_may_receive(&d.partners["comune-modena"], "benefit-status").is_ok());
        assert_eq!(
            check_may_receive(&d.partners["comune-modena"], "referral")
                .unwrap_err()
                .code,
            Code::NotAuthorized
        );
    }
}
