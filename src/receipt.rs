//! Receipt: Ponte's answer to every message a partner sends, itself an envelope of type
//! `receipt` (schema `schemas/receipt/1.0.json`), sent to `<prefix>.receipts.<sender>`.

use serde::Serialize;
use uuid::Uuid;

use crate::partner::GATEWAY_ID;
use crate::rejection::{Code, FieldError};

/// Namespace of receipt ids: a receipt's id is derived from what it answers, so the receipt for
/// a redelivered message carries the same id and a partner can drop the repeat.
const RECEIPT_NAMESPACE: Uuid = Uuid::from_u128(0x7d1f_52a4_2c4e_4b0e_9a5e_0b9f_3c1d_6e21);

/// The UUIDv5 of `name` in [`RECEIPT_NAMESPACE`], what `Uuid::new_v5` gives, with SHA-1 from the
/// `sha1` crate: it uses the processor's SHA instructions where there are some, where `uuid`
/// hashes in software (124 against 189 ns per id on a processor with them).
fn name_based(name: &[u8]) -> Uuid {
    use sha1::Digest;
    let digest = sha1::Sha1::new()
        .chain_update(RECEIPT_NAMESPACE.as_bytes())
        .chain_update(name)
        .finalize();
    let mut bytes = [0; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

#[derive(Debug, Serialize)]
struct ReceiptEnvelope<'a> {
    message_id: Uuid,
    #[serde(rename = "type")]
    message_type: &'static str,
    version: &'static str,
    sender: &'static str,
    recipient: &'a str,
    sent_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
    payload: ReceiptPayload<'a>,
}

#[derive(Debug, Serialize)]
struct ReceiptPayload<'a> {
    status: &'static str,
    code: Code,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_type: Option<&'a str>,
    recipients: &'a [&'a str],
    /// Recipients whose copy their queue could not take yet: it is being retried, and an
    /// `undeliverable` receipt follows if it never gets through.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    retrying: &'a [&'a str],
    errors: &'a [FieldError],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    undelivered: &'a [Undelivered<'a>],
}

/// A recipient a message was not delivered to while others received it.
#[derive(Debug, Clone, Serialize)]
pub struct Undelivered<'a> {
    pub recipient: &'a str,
    pub code: Code,
    pub errors: &'a [FieldError],
}

/// What a receipt answers.
#[derive(Debug, Clone, Copy)]
pub struct Answered<'a> {
    /// The partner that owns the inbound queue: receipts always go back to it, whatever the
    /// message claimed, so a spoofed `sender` cannot aim receipts at someone else.
    pub partner: &'a str,
    /// The answered message's `message_id`, when it had a well-formed one.
    pub message_id: Option<&'a str>,
    pub message_type: Option<&'a str>,
}

/// A serialized receipt ready to publish.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub message_id: Uuid,
    pub body: Vec<u8>,
}

/// Builds the receipt for `answered` with `code`; `recipients` are the partners whose copy the
/// broker confirmed, `retrying` those whose copy waits for another attempt, `errors` explain a
/// rejection, `undelivered` lists the recipients that got no copy (a partly delivered message,
/// then `code` is the first of their codes; or a dead-lettered copy, code `undeliverable`).
pub fn build(
    answered: Answered<'_>,
    code: Code,
    recipients: &[&str],
    retrying: &[&str],
    errors: &[FieldError],
    undelivered: &[Undelivered<'_>],
) -> Receipt {
    let correlation_id = answered.message_id.filter(|id| Uuid::parse_str(id).is_ok());
    let message_id = match correlation_id {
        Some(id) => {
            // Each dead-lettered recipient gets its own receipt, so its id names the recipient.
            let mut name = format!("{}\n{id}\n{code}", answered.partner);
            if code == Code::Undeliverable {
                for u in undelivered {
                    name.push('\n');
                    name.push_str(u.recipient);
                }
            }
            name_based(name.as_bytes())
        }
        None => Uuid::new_v4(),
    };
    let envelope = ReceiptEnvelope {
        message_id,
        message_type: "receipt",
        version: "1.0",
        sender: GATEWAY_ID,
        recipient: answered.partner,
        sent_at: now_rfc3339(),
        correlation_id,
        payload: ReceiptPayload {
            status: if code == Code::Delivered {
                "delivered"
            } else if code == Code::Undeliverable {
                "undeliverable"
            } else if recipients.is_empty() {
                "rejected"
            } else {
                "partial"
            },
            code,
            message_type: answered.message_type,
            recipients,
            retrying,
            errors,
            undelivered,
        },
    };
    Receipt {
        message_id,
        body: crate::decode::encode(&envelope),
    }
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("the current time always formats")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::SchemaSet;
    use serde_json::Value;

    fn schemas() -> SchemaSet {
        let (set, errors) =
            SchemaSet::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas"));
        assert!(errors.is_empty());
        set
    }

    const ANSWERED: Answered<'static> = Answered {
        partner: "cpi-modena",
        message_id: Some("6f1c2a9e-8a4b-4c1e-9b7a-3d2f1e0c9b8a"),
        message_type: Some("referral"),
    };

    #[test]
    fn delivered_receipt_follows_its_schema() {
        let r = build(ANSWERED, Code::Delivered, &["inps"], &[], &[], &[]);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(schemas().is_valid("receipt", "1.0", &v), "{v}");
        assert_eq!(v["correlation_id"], ANSWERED.message_id.unwrap());
        assert_eq!(v["recipient"], "cpi-modena");
        assert_eq!(v["sender"], "ponte");
        assert_eq!(v["payload"]["status"], "delivered");
        assert_eq!(v["payload"]["recipients"][0], "inps");
    }

    #[test]
    fn rejection_receipt_lists_errors_and_follows_its_schema() {
        let errors = [FieldError::new(
            "/payload/reason",
            "enum",
            "value is not one of …",
        )];
        let r = build(ANSWERED, Code::SchemaViolation, &[], &[], &errors, &[]);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(schemas().is_valid("receipt", "1.0", &v), "{v}");
        assert_eq!(v["payload"]["status"], "rejected");
        assert_eq!(v["payload"]["code"], "schema-violation");
        assert_eq!(v["payload"]["errors"][0]["path"], "/payload/reason");
        assert_eq!(v["payload"]["errors"][0]["keyword"], "enum");
    }

    #[test]
    fn partial_receipt_lists_who_got_nothing_and_why() {
        let errors = [FieldError::new(
            "/subject/identifiers",
            "crosswalk",
            "no person id …",
        )];
        let undelivered = [Undelivered {
            recipient: "comune-modena",
            code: Code::UnmappableIdentifier,
            errors: &errors,
        }];
        let r = build(
            ANSWERED,
            Code::UnmappableIdentifier,
            &["cpi-modena"],
            &[],
            &[],
            &undelivered,
        );
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(schemas().is_valid("receipt", "1.0", &v), "{v}");
        assert_eq!(v["payload"]["status"], "partial");
        assert_eq!(v["payload"]["recipients"][0], "cpi-modena");
        assert_eq!(v["payload"]["undelivered"][0]["recipient"], "comune-modena");
        assert_eq!(
            v["payload"]["undelivered"][0]["code"],
            "unmappable-identifier"
        );
        assert_eq!(
            v["payload"]["undelivered"][0]["errors"][0]["keyword"],
            "crosswalk"
        );
    }

    #[test]
    fn same_message_same_outcome_gives_the_same_receipt_id() {
        let a = build(ANSWERED, Code::Delivered, &["inps"], &[], &[], &[]);
        let b = build(ANSWERED, Code::Delivered, &["inps"], &[], &[], &[]);
        assert_eq!(a.message_id, b.message_id);
        let other = build(ANSWERED, Code::NoRoute, &[], &[], &[], &[]);
        assert_ne!(a.message_id, other.message_id);
    }

    /// Receipt ids stay what they were, so that a partner still drops the repeat of a receipt
    /// sent before an upgrade: UUIDv5 in the receipts' namespace, whatever the name's length.
    #[test]
    fn receipt_ids_are_the_uuid_v5_of_what_they_answer() {
        let r = build(ANSWERED, Code::Delivered, &["inps"], &[], &[], &[]);
        // Computed apart (Python's `uuid.uuid5`), and fixed here for good.
        assert_eq!(
            r.message_id.to_string(),
            "19027db7-fc46-5f9e-b4a5-01106dcc50a5"
        );
        for length in 0..300 {
            let name: Vec<u8> = (0..length).map(|i| (i * 7 + length) as u8).collect();
            assert_eq!(
                name_based(&name),
                Uuid::new_v5(&RECEIPT_NAMESPACE, &name),
                "{length} bytes"
            );
        }
    }

    #[test]
    fn unreadable_message_id_gives_a_receipt_without_correlation() {
        let answered = Answered {
            message_id: Some("not-a-uuid"),
            ..ANSWERED
        };
        let r = build(answered, Code::SchemaViolation, &[], &[], &[], &[]);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(v.get("correlation_id").is_none());
        assert!(schemas().is_valid("receipt", "1.0", &v), "{v}");
    }
}
