//! Map: each recipient gets the envelope in its own terms: `recipient` set, the office code
//! translated to the recipient's office competent for the municipality (the sender's code kept
//! in the gateway-owned `sender_office`), and only the identifier schemes it accepts.

use serde_json::{Value, json};

use crate::partner::Partner;
use crate::rejection::{Code, FieldError, Rejection};

/// The envelope as `recipient` will receive it.
pub fn for_recipient(envelope: &Value, recipient: &Partner) -> Result<Value, Rejection> {
    let mut out = envelope.clone();
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
    let municipality = payload.get("municipality").and_then(Value::as_str).unwrap_or("");
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
