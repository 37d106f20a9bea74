//! Map: each recipient gets the envelope in its own terms, and only what it may see:
//! - `recipient` set, and `recipient_reference`: its own reference for the case, when the case
//!   crosswalk knows one;
//! - the office code translated to the recipient's office competent for the municipality (the
//!   sender's code kept in the gateway-owned `sender_office`), and codes the recipient has its own
//!   names for translated through its code table;
//! - person identifiers in the schemes it accepts, in its preferred order: shared ones as they
//!   are, its own person id (`local`) from the crosswalk or its look-up service, or keyed
//!   pseudonyms; the sender's own `local` id is never passed on;
//! - the payload cut down to the fields it may receive.

use hmac::Mac;

use crate::envelope::{Node, Object, Text};
use crate::partner::{FieldTree, Partner, SHARED_SCHEMES, Secret};
use crate::rejection::{Code, FieldError, Rejection};
use crate::resolve::{Resolved, Resolvers};
use crate::store::Store;
use crate::tables::Tables;

/// What mapping needs besides the message and the recipient.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub tables: &'a Tables,
    pub store: &'a dyn Store,
    pub resolvers: &'a Resolvers,
}

/// Why a copy could not be made.
#[derive(Debug)]
pub enum Unmapped {
    /// This recipient cannot receive this message: refused for it, with the field that failed.
    Refused(Rejection),
    /// A service mapping depends on is unavailable now: the message is tried again later.
    Later(String),
}

impl From<Rejection> for Unmapped {
    fn from(r: Rejection) -> Self {
        Unmapped::Refused(r)
    }
}

/// The envelope as `recipient` will receive it. `reference` is the recipient's own reference
/// for the case, from the case crosswalk.
pub fn for_recipient<'a>(
    envelope: Node<'a>,
    message_type: &'a str,
    recipient: &'a Partner,
    reference: Option<String>,
    context: Context<'a>,
) -> impl Future<Output = Result<Node<'a>, Unmapped>> + 'a {
    Mapping {
        future: mapped(envelope, message_type, recipient, reference, context),
    }
}

pin_project_lite::pin_project! {
    /// A copy's mapping, polled in a function of its own: an `async fn`'s body is inlined into
    /// whatever awaits it, and `bench/run.sh --callgrind` counts mapping by this one's name.
    struct Mapping<F> {
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for Mapping<F> {
    type Output = F::Output;

    #[inline(never)]
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.project().future.poll(cx)
    }
}

/// What mapping writes borrows from the configuration (the recipient's id, its offices and
/// codes) rather than copying it into each copy.
async fn mapped<'a>(
    envelope: Node<'a>,
    message_type: &'a str,
    recipient: &'a Partner,
    reference: Option<String>,
    context: Context<'a>,
) -> Result<Node<'a>, Unmapped> {
    let mut out = envelope;
    if let Some(top) = out.as_object_mut() {
        top.insert("recipient", Node::String(Text::borrowed(&recipient.id)));
        if let Some(reference) = reference {
            top.insert("recipient_reference", Node::text(reference));
        }
    }
    let mut errors = Vec::new();
    translate_office(&mut out, recipient, context.tables, &mut errors);
    translate_codes(
        &mut out,
        message_type,
        recipient,
        context.tables,
        &mut errors,
    );
    if let Err(unmapped) = map_identifiers(&mut out, recipient, context).await {
        match unmapped {
            Unmapped::Refused(r) => errors.extend(r.errors),
            later => return Err(later),
        }
    }
    if !errors.is_empty() {
        return Err(Unmapped::Refused(Rejection::new(
            Code::UnmappableIdentifier,
            errors,
        )));
    }
    if let Some(fields) = recipient.field_trees.get(message_type) {
        minimize(&mut out, fields);
    }
    Ok(out)
}

fn translate_office<'a>(
    envelope: &mut Node<'a>,
    recipient: &Partner,
    tables: &'a Tables,
    errors: &mut Vec<FieldError>,
) {
    // A recipient without offices (say, a national body with one desk) keeps the sender's code.
    if !tables.has_offices(&recipient.id) {
        return;
    }
    let Some(payload) = envelope.get_mut("payload").and_then(Node::as_object_mut) else {
        return;
    };
    if !payload.contains_key("office") {
        return;
    }
    let municipality = payload
        .get("municipality")
        .and_then(Node::as_str)
        .unwrap_or("");
    let Some(office) = tables.office_for(&recipient.id, municipality) else {
        errors.push(FieldError::new(
            "/payload/office",
            "officeCode",
            format!(
                "{} has no office competent for municipality {municipality}",
                recipient.id
            ),
        ));
        return;
    };
    let office = Node::String(Text::borrowed(office));
    let sender_office = match payload.get_mut("office") {
        Some(slot) => std::mem::replace(slot, office),
        None => return,
    };
    payload.insert("sender_office", sender_office);
}

fn translate_codes<'a>(
    envelope: &mut Node<'a>,
    message_type: &str,
    recipient: &Partner,
    tables: &'a Tables,
    errors: &mut Vec<FieldError>,
) {
    let Some(codes) = tables.codes(&recipient.id, message_type) else {
        return;
    };
    for (pointer, table) in codes {
        let Some(value) = pointer.get_mut(envelope) else {
            continue;
        };
        let Some(shared) = value.as_str() else {
            continue;
        };
        match table.get(shared) {
            Some(own) => *value = Node::String(Text::borrowed(own)),
            None => errors.push(FieldError::new(
                pointer.as_str(),
                "codeTable",
                format!(
                    "{} has no code of its own for {shared:?} (tables/codes.csv)",
                    recipient.id
                ),
            )),
        }
    }
}

/// `recipient`'s keyed pseudonym of the shared identifier `(scheme, value)`: the hex HMAC-SHA256
/// of `scheme:value` under the recipient's key. Stable for one person and one key; without the
/// key, neither reversible nor comparable with another partner's pseudonyms.
pub fn pseudonym(key: &Secret, scheme: &str, value: &str) -> String {
    let mut mac = key.keyed();
    mac.update(scheme.as_bytes());
    mac.update(b":");
    mac.update(value.as_bytes());
    crate::hex_of_digest(&mac.finalize().into_bytes())
}

async fn map_identifiers<'a>(
    envelope: &mut Node<'a>,
    recipient: &Partner,
    context: Context<'_>,
) -> Result<(), Unmapped> {
    let Some(identifiers) = crate::identifiers::of_mut(envelope) else {
        return Ok(());
    };
    let shared: Vec<Shared<'_, 'a>> = identifiers.iter().filter_map(Shared::of).collect();
    // Room for what one scheme takes of them, and a local id: most recipients' whole list.
    let mut out = Vec::with_capacity(shared.len() + 1);
    let mut unavailable = None;
    let mut local_missing = false;
    for scheme in &recipient.identifier_schemes {
        match scheme.as_str() {
            "pseudonym" => {
                let key = recipient
                    .pseudonym_key
                    .as_ref()
                    .expect("a pseudonymous partner is loaded with its key");
                for Shared { scheme, value, .. } in &shared {
                    let made = pseudonym(key, scheme, value);
                    let known = out.iter().any(|id| {
                        crate::identifiers::scheme_and_value(id) == Some(("pseudonym", &made))
                    });
                    if !known {
                        out.push(identifier("pseudonym", made));
                    }
                }
            }
            "local" => match local_id(recipient, &shared, context).await {
                Ok(Some(local)) => out.push(identifier("local", local)),
                Ok(None) => local_missing = true,
                Err(Unmapped::Later(why)) => unavailable = Some(why),
                Err(refused) => return Err(refused),
            },
            wanted => out.extend(
                shared
                    .iter()
                    .filter(|s| s.scheme == wanted)
                    .map(Shared::passed_on),
            ),
        }
    }
    if out.is_empty() {
        // Only wait for a look-up service when nothing else the recipient accepts is there.
        if let Some(why) = unavailable {
            return Err(Unmapped::Later(why));
        }
        let (keyword, message) = if local_missing {
            (
                "crosswalk",
                format!(
                    "no person id of {} is known for this person (crosswalk{})",
                    recipient.id,
                    if recipient.resolver.is_some() {
                        ", look-up service"
                    } else {
                        ""
                    }
                ),
            )
        } else {
            (
                "identifierScheme",
                format!(
                    "none of the person's identifiers is in a scheme {} accepts ({})",
                    recipient.id,
                    recipient.identifier_schemes.join(", ")
                ),
            )
        };
        return Err(Unmapped::Refused(Rejection::one(
            Code::UnmappableIdentifier,
            FieldError::new("/subject/identifiers", keyword, message),
        )));
    }
    *identifiers = out;
    Ok(())
}

/// An identifier the gateway makes, `{"scheme": …, "value": …}`.
fn identifier<'a>(scheme: &'static str, value: String) -> Node<'a> {
    Node::object([
        ("scheme", Node::String(Text::borrowed(scheme))),
        ("value", Node::text(value)),
    ])
}

/// One of the message's identifiers in a shared scheme, as the sender wrote it.
struct Shared<'s, 'a> {
    scheme: &'s str,
    value: &'s str,
    written: &'s Node<'a>,
}

impl<'s, 'a> Shared<'s, 'a> {
    /// `id`, if it is an identifier in a shared scheme.
    fn of(id: &'s Node<'a>) -> Option<Shared<'s, 'a>> {
        let (scheme, value) = crate::identifiers::scheme_and_value(id)?;
        SHARED_SCHEMES.contains(&scheme).then_some(Shared {
            scheme,
            value,
            written: id,
        })
    }

    /// The identifier as a copy carries it, `{"scheme": …, "value": …}`: the sender's own,
    /// cloned, when it is written so, else made anew from its two fields.
    fn passed_on(&self) -> Node<'a> {
        let field = |name| self.written.get(name).cloned().unwrap_or(Node::Null);
        match self.written.as_object() {
            Some(object) if object.names().eq(["scheme", "value"]) => self.written.clone(),
            _ => Node::object([("scheme", field("scheme")), ("value", field("value"))]),
        }
    }
}

/// The recipient's own person id for any of the shared identifiers: the crosswalk first, then
/// its look-up service.
async fn local_id(
    recipient: &Partner,
    shared: &[Shared<'_, '_>],
    context: Context<'_>,
) -> Result<Option<String>, Unmapped> {
    for Shared { scheme, value, .. } in shared {
        let known = context
            .store
            .local_id(&recipient.id, scheme, value)
            .map_err(|e| Unmapped::Later(e.to_string()))?;
        if known.is_some() {
            return Ok(known);
        }
    }
    let Some(resolver) = context.resolvers.get(&recipient.id) else {
        return Ok(None);
    };
    for Shared { scheme, value, .. } in shared {
        match resolver.local_id(scheme, value).await {
            Resolved::Found(local) => return Ok(Some(local)),
            Resolved::Unknown => {}
            Resolved::Unavailable(why) => return Err(Unmapped::Later(why)),
        }
    }
    Ok(None)
}

/// Keeps, of the payload, only the fields `allowed` lists, in the list's order.
fn minimize(envelope: &mut Node, allowed: &FieldTree) {
    let Some(payload) = envelope.get_mut("payload") else {
        return;
    };
    match payload.as_object_mut() {
        Some(object) => {
            keep(object, allowed);
        }
        None => *payload = Node::Object(Object::default()),
    }
}

/// Keeps, of `object`, the fields `allowed` lists, in its order (an object listed through some
/// of its fields is kept with those, if it has any); returns the place in the list of the first
/// kept, if any. Recurses only as deep as the field list. The fields kept stay where they are
/// when the sender's order is the list's, as it often is.
fn keep(object: &mut Object, allowed: &FieldTree) -> Option<usize> {
    let fields = object.fields_mut();
    let mut places = Vec::with_capacity(fields.len());
    fields.retain_mut(|(name, value)| {
        let place = match allowed.get(name) {
            Some((place, None)) => Some(*place),
            Some((_, Some(inner))) => value.as_object_mut().and_then(|o| keep(o, inner)),
            None => None,
        };
        places.extend(place);
        place.is_some()
    });
    let first = places.iter().min().copied();
    if !places.is_sorted() {
        let mut placed: Vec<_> = places.into_iter().zip(fields.drain(..)).collect();
        placed.sort_unstable_by_key(|(place, _)| *place);
        fields.extend(placed.into_iter().map(|(_, field)| field));
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::Directory;
    use crate::partner::Partner;
    use crate::store::{MessageCase, SqliteStore};
    use serde_json::{Map, Value, json};

    struct Fixture {
        directory: Directory,
        store: SqliteStore,
        resolvers: Resolvers,
        dir: std::path::PathBuf,
    }

    impl Fixture {
        fn new() -> Fixture {
            let directory =
                Directory::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config"))
                    .unwrap();
            let dir = std::env::temp_dir().join(format!("ponte-map-{}", uuid::Uuid::new_v4()));
            Fixture {
                directory,
                store: SqliteStore::open(&dir).unwrap(),
                resolvers: Resolvers::default(),
                dir,
            }
        }

        fn partner(&self, id: &str) -> &Partner {
            &self.directory.partners[id]
        }

        async fn map(&self, m: Value, recipient: &str) -> Result<Value, Unmapped> {
            self.map_for(m, self.partner(recipient), None).await
        }

        /// A referral (from municipality 036005) as `inps` receives it with `fields` as its
        /// field list for referrals.
        async fn referral_to_inps_with_fields(&self, fields: &[&str]) -> Value {
            let mut inps = self.partner("inps").clone();
            let fields: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
            inps.field_trees = [("referral".into(), FieldTree::of(&fields))].into();
            self.map_for(referral("036005"), &inps, None).await.unwrap()
        }

        async fn map_for(
            &self,
            m: Value,
            recipient: &Partner,
            reference: Option<String>,
        ) -> Result<Value, Unmapped> {
            let tables = self.directory.tables.load();
            let t = m["type"].as_str().unwrap().to_string();
            let context = Context {
                tables: &tables,
                store: &self.store,
                resolvers: &self.resolvers,
            };
            let mapped = for_recipient(Node::from(m), &t, recipient, reference, context).await;
            mapped.map(|copy| copy.to_value())
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn refused(r: Result<Value, Unmapped>) -> Rejection {
        match r {
            Err(Unmapped::Refused(r)) => r,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    const CF: &str = "RSSMRA85T10A562S";

    fn referral(municipality: &str) -> Value {
        json!({
            "type": "referral",
            "sender": "cpi-modena",
            "subject": {"identifiers": [
                {"scheme": "local", "value": "P-1"},
                {"scheme": "it.cf", "value": CF}
            ]},
            "payload": {
                "referral_id": "CPI-7", "reason": "did-registered", "office": "CPI-MO-02",
                "municipality": municipality, "notes": "call in the morning",
                "health": {"work_limitations": "no lifting", "disability_percentage": 46}
            }
        })
    }

    fn benefit(benefit: &str) -> Value {
        json!({
            "type": "benefit-status",
            "sender": "inps",
            "subject": {"identifiers": [{"scheme": "it.cf", "value": CF}]},
            "payload": {
                "benefit": benefit, "application_id": "APP-9", "status": "approved",
                "effective_date": "2026-12-01", "office": "3600", "municipality": "036023",
                "amount": {"value": 500, "currency": "EUR"}
            }
        })
    }

    /// A shared identifier reaches the recipient as `{"scheme", "value"}`, in that order,
    /// whichever order the sender wrote its two fields in.
    #[tokio::test]
    async fn an_identifier_is_passed_on_with_its_scheme_first() {
        let f = Fixture::new();
        for written in [
            json!({"scheme": "it.cf", "value": CF}),
            json!({"value": CF, "scheme": "it.cf"}),
        ] {
            let mut m = referral("036005");
            m["subject"]["identifiers"] = json!([{"scheme": "local", "value": "P-1"}, written]);
            let out = f.map(m, "inps").await.unwrap();
            assert_eq!(
                out["subject"]["identifiers"].to_string(),
                format!(r#"[{{"scheme":"it.cf","value":"{CF}"}}]"#)
            );
        }
    }

    #[tokio::test]
    async fn office_is_translated_and_the_senders_code_kept() {
        let f = Fixture::new();
        let out = f.map(referral("036005"), "inps").await.unwrap();
        assert_eq!(out["recipient"], "inps");
        assert_eq!(out["payload"]["office"], "3600");
        assert_eq!(out["payload"]["sender_office"], "CPI-MO-02");
        let out = f.map(referral("037006"), "inps").await.unwrap();
        assert_eq!(out["payload"]["office"], "3700");
    }

    #[tokio::test]
    async fn the_senders_local_identifier_is_never_passed_on() {
        let f = Fixture::new();
        let out = f.map(referral("036005"), "inps").await.unwrap();
        assert_eq!(
            out["subject"]["identifiers"],
            json!([{"scheme": "it.cf", "value": CF}])
        );
    }

    #[tokio::test]
    async fn no_office_for_the_municipality_is_unmappable() {
        let f = Fixture::new();
        let r = refused(f.map(referral("001272"), "inps").await);
        assert_eq!(r.code, Code::UnmappableIdentifier);
        assert_eq!(r.errors[0].path, "/payload/office");
    }

    #[tokio::test]
    async fn no_accepted_identifier_is_unmappable() {
        let f = Fixture::new();
        let mut m = referral("036005");
        m["subject"]["identifiers"] = json!([{"scheme": "ch.ahvn13", "value": "756.1234.5678.97"}]);
        let r = refused(f.map(m, "inps").await);
        assert_eq!(r.code, Code::UnmappableIdentifier);
        assert_eq!(r.errors[0].path, "/subject/identifiers");
        assert_eq!(r.errors[0].keyword, "identifierScheme");
    }

    #[tokio::test]
    async fn codes_are_translated_through_the_recipients_table() {
        let f = Fixture::new();
        let out = f.map(referral("036005"), "inps").await.unwrap();
        assert_eq!(out["payload"]["reason"], "R01");
        // A code missing from a table the recipient has for that field is unmappable.
        let r = refused(f.map(benefit("naspi"), "comune-modena").await);
        assert!(
            r.errors
                .iter()
                .any(|e| e.path == "/payload/benefit" && e.keyword == "codeTable"),
            "{r:?}"
        );
        // Partners without a table keep the shared codes.
        let out = f.map(benefit("naspi"), "cpi-modena").await.unwrap();
        assert_eq!(out["payload"]["benefit"], "naspi");
    }

    #[tokio::test]
    async fn a_partner_with_its_own_person_ids_gets_them_from_the_crosswalk() {
        let f = Fixture::new();
        // Unknown to the crosswalk: refused for the comune, saying where it looked.
        let r = refused(f.map(benefit("adi"), "comune-modena").await);
        assert_eq!(r.errors[0].path, "/subject/identifiers");
        assert_eq!(r.errors[0].keyword, "crosswalk");
        assert!(!r.errors[0].message.contains(CF), "identifier leaked");
        // The comune's own message with both ids teaches the crosswalk.
        f.store
            .record(&MessageCase {
                message_id: "m1",
                sender: "comune-modena",
                reference: None,
                correlation_id: None,
                recipients: &["cpi-modena"],
                local_ids: &[("it.cf", CF, "ANA-042")],
            })
            .unwrap();
        let out = f.map(benefit("adi"), "comune-modena").await.unwrap();
        assert_eq!(
            out["subject"]["identifiers"],
            json!([{"scheme": "local", "value": "ANA-042"}])
        );
        assert_eq!(out["payload"]["benefit"], "ASS-INCL");
    }

    #[tokio::test]
    async fn a_pseudonymous_partner_gets_only_a_stable_keyed_pseudonym() {
        let f = Fixture::new();
        let a = f.map(benefit("naspi"), "osservatorio-er").await.unwrap();
        let b = f.map(benefit("sfl"), "osservatorio-er").await.unwrap();
        let ids = &a["subject"]["identifiers"];
        assert_eq!(ids.as_array().unwrap().len(), 1);
        assert_eq!(ids[0]["scheme"], "pseudonym");
        let value = ids[0]["value"].as_str().unwrap();
        assert_eq!(value.len(), 64);
        assert!(!a.to_string().contains(CF), "the codice fiscale leaked");
        // The same person gives the same pseudonym in every message.
        assert_eq!(b["subject"]["identifiers"], a["subject"]["identifiers"]);
        // Another partner with another key gets another, unrelated pseudonym.
        let mut other = f.partner("osservatorio-er").clone();
        other.id = "istat".into();
        other.pseudonym_key = Some(Secret::new("a-different-key-for-another-research-partner"));
        let c = f.map_for(benefit("naspi"), &other, None).await.unwrap();
        assert_ne!(c["subject"]["identifiers"][0]["value"], ids[0]["value"]);
        // And another person, another pseudonym under the same key.
        let mut m = benefit("naspi");
        m["subject"]["identifiers"][0]["value"] = json!("BNCGVN70A41F257X");
        let d = f.map(m, "osservatorio-er").await.unwrap();
        assert_ne!(d["subject"]["identifiers"][0]["value"], ids[0]["value"]);
    }

    /// A research partner links a person's records across years of pseudonyms: each one must
    /// stay the plain HMAC-SHA256 of `scheme:value` under its key, however it is computed.
    /// (Expected values from Python's `hmac`; the second key is longer than SHA-256's block, so
    /// HMAC hashes it first.)
    #[test]
    fn a_pseudonym_is_the_hmac_sha256_of_scheme_and_value() {
        let cases = [
            (
                Secret::new("demo-only-pseudonym-key-never-use-for-real-data"),
                "e8e162c3290da9279ccfc9db8ae25b7b301cc58b194b2b97bdaf0311af23b69b",
            ),
            (
                Secret::new("k".repeat(200)),
                "f0c736fd199c757e43a9cf6703d34c275b896f79109471d3376a86da14914b55",
            ),
        ];
        for (key, expected) in &cases {
            // Twice with one key: the keyed state is copied, never fed a first message.
            for _ in 0..2 {
                assert_eq!(pseudonym(key, "it.cf", "RSSMRA80A01F257Y"), *expected);
            }
        }
    }

    #[tokio::test]
    async fn a_recipient_receives_only_the_fields_it_may() {
        let f = Fixture::new();
        let out = f.map(referral("036005"), "inps").await.unwrap();
        assert!(out["payload"].get("health").is_none(), "{out}");
        assert_eq!(out["payload"]["notes"], "call in the morning");
        assert_eq!(out["payload"]["referral_id"], "CPI-7");
        let out = f.map(benefit("naspi"), "osservatorio-er").await.unwrap();
        let mut kept: Vec<&String> = out["payload"].as_object().unwrap().keys().collect();
        kept.sort();
        assert_eq!(
            kept,
            [
                "amount",
                "benefit",
                "effective_date",
                "municipality",
                "status"
            ]
        );
        // A partner without a field list gets everything.
        let mut m = referral("036023");
        m["sender"] = json!("comune-modena");
        let out = f.map(m, "cpi-modena").await.unwrap();
        assert_eq!(out["payload"]["health"]["disability_percentage"], 46);
    }

    /// A copy keeps what taking each listed field out of the sender's payload in turn, in the
    /// list's order, would give: the same fields, in the same order, at every depth; whether
    /// the sender's order already is the list's, or not, or some fields are missing or sit
    /// under something that is not an object.
    #[test]
    fn a_copy_keeps_what_taking_each_listed_field_in_turn_gives() {
        let payload = json!({
            "a": 1,
            "b": {"x": 1, "y": [2], "z": {"q": 1, "r": 2}},
            "c": [1],
            "d": "text",
            "e": {"x": 3, "y": 4}
        });
        let lists: [&[&str]; 8] = [
            &["a", "b", "c", "d", "e"],
            &["e", "d", "c", "b", "a"],
            &["a", "b/x", "b/z/q", "e/y", "e/x"],
            &["b/z/r", "a", "b/z/q", "b/y", "missing", "e"],
            &["c/x", "d/x", "missing/x", "a"],
            &["b/missing", "e/missing"],
            &["e/y", "b/z/r", "b/x", "c"],
            &[],
        ];
        for list in lists {
            let mut taken = payload.clone();
            let mut expected = Value::Object(Map::new());
            for field in list {
                let keys: Vec<&str> = field.split('/').collect();
                let (name, parents) = keys.split_last().unwrap();
                let found = parents
                    .iter()
                    .try_fold(&mut taken, |at, key| at.get_mut(*key))
                    .and_then(Value::as_object_mut)
                    .and_then(|object| object.remove(*name));
                if let Some(value) = found {
                    let mut at = &mut expected;
                    for key in parents {
                        at = at
                            .as_object_mut()
                            .unwrap()
                            .entry(key.to_string())
                            .or_insert_with(|| json!({}));
                    }
                    at.as_object_mut().unwrap().insert(name.to_string(), value);
                }
            }
            let pointers: Vec<String> = list.iter().map(|f| format!("/payload/{f}")).collect();
            let mut envelope = Node::from(json!({"payload": payload.clone()}));
            minimize(&mut envelope, &FieldTree::of(&pointers));
            // As text, so that the order of the keys counts.
            assert_eq!(
                envelope.to_value()["payload"].to_string(),
                expected.to_string(),
                "{list:?}"
            );
        }
    }

    /// A recipient's copy lists its fields in the order of its field list, whatever the
    /// sender's order, the fields directly in the payload and deeper ones alike.
    #[tokio::test]
    async fn the_kept_fields_follow_the_recipients_list() {
        let fields = [
            "/payload/notes",
            "/payload/health/disability_percentage",
            "/payload/missing",
            "/payload/referral_id",
            "/payload/health/missing",
            "/payload/municipality",
        ];
        let out = Fixture::new().referral_to_inps_with_fields(&fields).await;
        let keys: Vec<&String> = out["payload"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["notes", "health", "referral_id", "municipality"]);
        assert_eq!(
            out["payload"]["health"],
            json!({"disability_percentage": 46})
        );
        assert_eq!(out["payload"]["referral_id"], "CPI-7");
        // A payload that is not an object keeps nothing (the schemas refuse one first).
        let mut envelope = referral("036005");
        envelope["payload"] = json!(["referral_id"]);
        let mut envelope = Node::from(envelope);
        minimize(&mut envelope, &FieldTree::of(&fields.map(String::from)));
        assert_eq!(envelope.to_value()["payload"], json!({}));
    }

    #[tokio::test]
    async fn a_field_listed_with_its_parent_brings_the_whole_parent() {
        let out = Fixture::new()
            .referral_to_inps_with_fields(&[
                "/payload/health/disability_percentage",
                "/payload/referral_id",
                "/payload/health",
                "/payload/health/work_limitations",
                "/payload/referral_id",
            ])
            .await;
        assert_eq!(
            out["payload"],
            json!({
                "health": {"work_limitations": "no lifting", "disability_percentage": 46},
                "referral_id": "CPI-7"
            })
        );
        let keys: Vec<&String> = out["payload"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["health", "referral_id"]);
        let keys: Vec<&String> = out["payload"]["health"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        assert_eq!(keys, ["work_limitations", "disability_percentage"]);
    }

    #[tokio::test]
    async fn the_recipients_case_reference_is_added() {
        let f = Fixture::new();
        let out = f
            .map_for(
                benefit("naspi"),
                f.partner("cpi-modena"),
                Some("CPI-7".into()),
            )
            .await
            .unwrap();
        assert_eq!(out["recipient_reference"], "CPI-7");
        let out = f.map(benefit("naspi"), "cpi-modena").await.unwrap();
        assert!(out.get("recipient_reference").is_none());
    }
}
