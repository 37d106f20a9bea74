//! Map: each recipient gets the envelope in its own terms: `recipient` set, the office code
//! translated to the recipient's office competent for the municipality (the sender's code kept
//! in the gateway-owned `sender_office`), and only the identifier schemes it accepts.

use serde_json::{Value, json};

use crate::partner::Partner;
use crate::rejection::{Code, FieldError, Rejection};

/// The envelope as `recipient` will receive it.
pub fn for_recipient(envelope: Value, recipient: &Partner) -> Result<Value, Rejection> {
    let mut out = envelope;
    out["recipient"] = Value::String(recipient.id.clone());
    translate_office(&mut out, recipient)?;
    reduce_identifiers(&mut out, recipient)?;
    Ok(out)
}

fn translate_office(envelope: &mut Value, recipient: &Partner) -> Result<(), Rejection> {
    // A recipient without offices (say, a national body with one desk) keeps the sender's code.
    if recipient.offices.is_empty() {
        return Ok(());
    }
    let Some(payload) = envelope.get_mut("payload").and_then(Value::as_object_mut) else {
        return Ok(());
    };
    let Some(sender_office) = payload.get("office").cloned() else {
        return Ok(());
    };
    let municipality = payload
        .get("municipality")
        .and_then(Value::as_str)
        .unwrap_or("");
    let Some(office) = recipient.office_for(municipality) else {
        return Err(Rejection::one(
            Code::UnmappableIdentifier,
            FieldError::new(
                "/payload/office",
                "officeCode",
                format!(
                    "{} has no office competent for municipality {municipality}",
                    recipient.id
                ),
            ),
        ));
    };
    payload.insert("office".into(), json!(office));
    payload.insert("sender_office".into(), sender_office);
    Ok(())
}

fn reduce_identifiers(envelope: &mut Value, recipient: &Partner) -> Result<(), Rejection> {
    let Some(identifiers) = envelope
        .pointer_mut("/subject/identifiers")
        .and_then(Value::as_array_mut)
    else {
        return Ok(());
    };
    // A `local` identifier is the sender's own registry number: meaningless to anyone else.
    identifiers.retain(|id| {
        let scheme = id.get("scheme").and_then(Value::as_str).unwrap_or("");
        scheme != "local" && recipient.accepts_scheme(scheme)
    });
    if identifiers.is_empty() {
        return Err(Rejection::one(
            Code::UnmappableIdentifier,
            FieldError::new(
                "/subject/identifiers",
                "identifierScheme",
                format!(
                    "none of the person's identifiers is in a scheme {} accepts ({})",
                    recipient.id,
                    recipient.identifier_schemes.join(", ")
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

    fn demo() -> Directory {
        Directory::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config")).unwrap()
    }

    fn referral(municipality: &str) -> Value {
        json!({
            "type": "referral",
            "sender": "cpi-modena",
            "subject": {"identifiers": [
                {"scheme": "local", "value": "P-1"},
                {"scheme": "it.cf", "value": "RSSMRA85T10A562S"}
            ]},
            "payload": {"office": "CPI-MO-02", "municipality": municipality}
        })
    }

    #[test]
    fn office_is_translated_and_the_senders_code_kept() {
        let d = demo();
        let out = for_recipient(referral("036005"), &d.partners["inps"]).unwrap();
        assert_eq!(out["recipient"], "inps");
        assert_eq!(out["payload"]["office"], "3600");
        assert_eq!(out["payload"]["sender_office"], "CPI-MO-02");
        let out = for_recipient(referral("037006"), &d.partners["inps"]).unwrap();
        assert_eq!(out["payload"]["office"], "3700");
    }

    #[test]
    fn the_senders_local_identifier_is_never_passed_on() {
        let d = demo();
        let out = for_recipient(referral("036005"), &d.partners["inps"]).unwrap();
        assert_eq!(
            out["subject"]["identifiers"],
            json!([{"scheme": "it.cf", "value": "RSSMRA85T10A562S"}])
        );
    }

    #[test]
    fn no_office_for_the_municipality_is_unmappable() {
        let d = demo();
        let r = for_recipient(referral("001272"), &d.partners["inps"]).unwrap_err();
        assert_eq!(r.code, Code::UnmappableIdentifier);
        assert_eq!(r.errors[0].path, "/payload/office");
    }

    #[test]
    fn no_accepted_identifier_is_unmappable() {
        let d = demo();
        let mut m = referral("036005");
        m["subject"]["identifiers"] = json!([{"scheme": "ch.ahvn13", "value": "756.1234.5678.97"}]);
        let r = for_recipient(m, &d.partners["inps"]).unwrap_err();
        assert_eq!(r.code, Code::UnmappableIdentifier);
        assert_eq!(r.errors[0].path, "/subject/identifiers");
    }
}
