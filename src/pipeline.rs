//! Pipeline: everything that decides what happens to one inbound message — decode → validate →
//! authorize → route → record in the crosswalk → map for each recipient — with no broker in
//! sight. Its verdict says what to publish; `settle` does it.

use std::path::Path;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::authorize::{check_may_send, check_recipients, check_sender};
use crate::decode::{Pointer, decode};
use crate::directory::Directory;
use crate::envelope::Node;
use crate::map::{Context, Unmapped, for_recipient};
use crate::partner::{Partner, SHARED_SCHEMES};
use crate::rejection::{Code, FieldError, Rejection};
use crate::resolve::Resolvers;
use crate::route::recipients;
use crate::store::{MessageCase, SqliteStore, Store};
use crate::tables::Tables;

/// One recipient's copy of a message, serialized.
#[derive(Debug, Clone)]
pub struct Copy {
    pub recipient: String,
    pub body: Vec<u8>,
}

/// A recipient the message could not be mapped for, while others may still receive it.
#[derive(Debug, Clone)]
pub struct Refused {
    pub recipient: String,
    pub rejection: Rejection,
}

/// What happens to the message.
#[derive(Debug)]
pub enum Outcome {
    /// Deliver these copies; `refused` lists recipients that get none (the receipt says so);
    /// `earlier` those an earlier attempt already delivered to.
    Deliver {
        copies: Vec<Copy>,
        refused: Vec<Refused>,
        earlier: Vec<String>,
    },
    /// Nobody receives it: parked with its reason.
    Reject(Rejection),
    /// Cannot be decided now (the store or a look-up service is unavailable): back to its queue,
    /// to be tried again.
    Retry(String),
    /// A message the broker gives back (after a crash or lost connection) that was already
    /// delivered to these recipients: not delivered again, only answered again.
    AlreadyDelivered { recipients: Vec<String> },
}

/// The envelope's own ids and type, read once: each step after validation needs some of them,
/// and each look-up in the envelope goes through its fields.
struct Heading<'a> {
    message_id: &'a str,
    message_type: &'a str,
    correlation_id: Option<&'a str>,
}

/// What the pipeline decided about one message.
#[derive(Debug)]
pub struct Verdict {
    /// The message's own `message_id`, when it had a string one (even if otherwise invalid).
    pub message_id: Option<String>,
    pub message_type: Option<String>,
    pub correlation_id: Option<String>,
    pub outcome: Outcome,
}

/// The configuration and the services mapping uses.
#[derive(Debug)]
pub struct Pipeline {
    pub directory: Arc<Directory>,
    pub store: Arc<dyn Store>,
    pub resolvers: Resolvers,
    /// The endpoints of partners that receive by HTTP, by partner id.
    pub endpoints: std::collections::BTreeMap<String, crate::courier::Endpoint>,
    /// The delivery log, in the data folder.
    pub journal: Arc<crate::journal::Journal>,
}

impl Pipeline {
    pub fn new(directory: Arc<Directory>, store: Arc<dyn Store>) -> anyhow::Result<Pipeline> {
        if let Some(p) = directory
            .partners
            .values()
            .find(|p| p.accepts_scheme("pseudonym") && p.pseudonym_key.is_none())
        {
            anyhow::bail!("{}: loaded without its pseudonym key", p.id);
        }
        let endpoints =
            crate::courier::endpoints(&directory.partners).map_err(anyhow::Error::msg)?;
        let resolvers = Resolvers::new(directory.partners.values())
            .map_err(|e| anyhow::anyhow!("look-up service client: {e}"))?;
        let journal = crate::journal::Journal::open(&store_dir(&directory))
            .map_err(|e| anyhow::anyhow!("delivery log: {e}"))?;
        Ok(Pipeline {
            directory,
            store,
            resolvers,
            endpoints,
            journal: Arc::new(journal),
        })
    }

    /// With the embedded store in the configured data folder.
    pub fn open(directory: Arc<Directory>) -> anyhow::Result<Pipeline> {
        let store = SqliteStore::open(&store_dir(&directory))?;
        store.check_duplicates_within(directory.settings.store.duplicate_window());
        Self::new(directory, Arc::new(store))
    }

    /// Runs every step for a message that arrived on `owner`'s inbound queue; `redelivered` is
    /// the broker's flag (the message was handed out before and not acknowledged).
    pub async fn process(&self, owner: &Partner, body: &[u8], redelivered: bool) -> Verdict {
        self.process_for(owner, body, redelivered, None).await
    }

    /// The same, for a message replayed by an operator only for `only` (the recipients a partly
    /// delivered message was refused for): those who already received it are not sent it again,
    /// and it is not refused as a duplicate.
    pub async fn process_for(
        &self,
        owner: &Partner,
        body: &[u8],
        redelivered: bool,
        only: Option<&[String]>,
    ) -> Verdict {
        let envelope = match decode(body, (&self.directory.settings.limits).into()) {
            Ok(e) => e,
            Err(rejection) => {
                return Verdict {
                    message_id: None,
                    message_type: None,
                    correlation_id: None,
                    outcome: Outcome::Reject(rejection),
                };
            }
        };
        let field = |name: &str| envelope.get(name).and_then(Node::as_str).map(String::from);
        let (message_id, message_type, correlation_id) =
            (field("message_id"), field("type"), field("correlation_id"));
        let heading = Heading {
            message_id: message_id.as_deref().unwrap_or_default(),
            message_type: message_type.as_deref().unwrap_or_default(),
            correlation_id: correlation_id.as_deref(),
        };
        let outcome = match self
            .copies(owner, envelope, &heading, redelivered, only)
            .await
        {
            Ok(outcome) => outcome,
            Err(rejection) => Outcome::Reject(rejection),
        };
        Verdict {
            message_id,
            message_type,
            correlation_id,
            outcome,
        }
    }

    /// The copies of a message, each mapped for its recipient. `heading` is read by `process_for`
    /// before validation; once validation passes, each of its fields is the envelope's string.
    async fn copies(
        &self,
        owner: &Partner,
        envelope: Node<'_>,
        heading: &Heading<'_>,
        redelivered: bool,
        only: Option<&[String]>,
    ) -> Result<Outcome, Rejection> {
        let directory = &*self.directory;
        let schema = directory.schemas.validate(&envelope)?;
        let message_type = heading.message_type;
        check_sender(&envelope, owner)?;
        let message_id = heading.message_id;
        let window = directory.settings.store.duplicate_window();
        let mut earlier = Vec::new();
        match self.store.seen(&owner.id, message_id, window) {
            Err(error) => return Ok(Outcome::Retry(error.to_string())),
            // Replayed for the recipients it was refused for: the others already have it.
            Ok(Some(seen)) if only.is_some() => earlier = seen.recipients,
            // Some copies went out before the broker refused another: send only the rest.
            Ok(Some(seen)) if !seen.complete => earlier = seen.recipients,
            // Given back by the broker after it went out: answer again, deliver nothing.
            Ok(Some(seen)) if redelivered => {
                return Ok(Outcome::AlreadyDelivered {
                    recipients: seen.recipients,
                });
            }
            Ok(Some(seen)) => {
                let at = time::OffsetDateTime::from_unix_timestamp(seen.at)
                    .ok()
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_default();
                return Err(Rejection::one(
                    Code::Duplicate,
                    FieldError::new(
                        "/message_id",
                        "duplicate",
                        format!(
                            "{} already sent this message_id, delivered at {at} to {}; it is not delivered again",
                            owner.id,
                            seen.recipients.join(", ")
                        ),
                    ),
                ));
            }
            Ok(None) => {}
        }
        // One snapshot of the tables for the whole message, whatever a reload does meanwhile.
        let tables = directory.tables.load_full();
        let mut targets = authorized_recipients(
            directory,
            owner,
            &envelope,
            (message_type, &schema.version),
            &tables,
        )?;
        targets
            .retain(|t| !earlier.contains(&t.id) && only.is_none_or(|only| only.contains(&t.id)));
        if targets.is_empty() {
            return Ok(Outcome::AlreadyDelivered {
                recipients: earlier,
            });
        }

        // A message's few recipients, listed without a block of their own.
        let names: SmallVec<[&str; 4]> = targets.iter().map(|p| p.id.as_str()).collect();
        let references = match self.record(
            &envelope,
            heading,
            owner,
            schema.case_reference.as_ref(),
            &names,
        ) {
            Ok(r) => r,
            Err(why) => return Ok(Outcome::Retry(why)),
        };
        let context = Context {
            tables: &tables,
            store: &*self.store,
            resolvers: &self.resolvers,
        };
        let mut copies = Vec::with_capacity(targets.len());
        let mut refused = Vec::new();
        // Every recipient but the last gets a clone; the last gets the envelope itself.
        let last = targets.len() - 1;
        let mut envelope = Some(envelope);
        for (i, (recipient, reference)) in targets.into_iter().zip(references).enumerate() {
            let source = if i == last {
                envelope.take()
            } else {
                envelope.clone()
            };
            let source = source.expect("the envelope is only taken by the last recipient");
            match for_recipient(source, message_type, recipient, reference, context).await {
                Ok(mapped) => copies.push(Copy {
                    recipient: recipient.id.clone(),
                    body: crate::decode::encode_node(&mapped),
                }),
                Err(Unmapped::Refused(rejection)) => refused.push(Refused {
                    recipient: recipient.id.clone(),
                    rejection,
                }),
                Err(Unmapped::Later(why)) => return Ok(Outcome::Retry(why)),
            }
        }
        if copies.is_empty() && earlier.is_empty() {
            return Err(merged(refused));
        }
        Ok(Outcome::Deliver {
            copies,
            refused,
            earlier,
        })
    }

    /// Records the message in the crosswalks and returns each recipient's own case reference.
    fn record(
        &self,
        envelope: &Node,
        heading: &Heading<'_>,
        sender: &Partner,
        reference: Option<&Pointer>,
        recipients: &[&str],
    ) -> Result<Vec<Option<String>>, String> {
        let scheme_values = crate::identifiers::of(envelope)
            .iter()
            .filter_map(crate::identifiers::scheme_and_value);
        // The sender's own person id next to shared ones teaches the crosswalk.
        let local_ids: Vec<(&str, &str, &str)> =
            match scheme_values.clone().find(|(scheme, _)| *scheme == "local") {
                Some((_, local)) => scheme_values
                    .filter(|(scheme, _)| SHARED_SCHEMES.contains(scheme))
                    .map(|(scheme, value)| (scheme, value, local))
                    .collect(),
                None => Vec::new(),
            };
        let message = MessageCase {
            message_id: heading.message_id,
            sender: &sender.id,
            reference: reference.and_then(|p| p.get(envelope)?.as_str()),
            correlation_id: heading.correlation_id,
            recipients,
            local_ids: &local_ids,
        };
        self.store.record(&message).map_err(|e| e.to_string())
    }
}

/// The steps that need nothing but the configuration — decode, validate, sender, matrix,
/// routing — for a message `owner` would send: what `ponte rejected replay` checks before
/// sending a parked message again, so that an unchanged one is refused with its reason.
pub fn precheck(directory: &Directory, owner: &Partner, body: &[u8]) -> Result<(), Rejection> {
    let envelope = decode(body, (&directory.settings.limits).into())?;
    let schema = directory.schemas.validate(&envelope)?;
    check_sender(&envelope, owner)?;
    let message_type = envelope
        .get("type")
        .and_then(Node::as_str)
        .unwrap_or_default();
    authorized_recipients(
        directory,
        owner,
        &envelope,
        (message_type, &schema.version),
        &directory.tables.load(),
    )
    .map(|_| ())
}

/// The recipients of a valid message from `owner`, once the matrix allows it to send this type
/// to each of them for this purpose.
fn authorized_recipients<'a>(
    directory: &'a Directory,
    owner: &Partner,
    envelope: &Node,
    (message_type, version): (&str, &str),
    tables: &Tables,
) -> Result<Vec<&'a Partner>, Rejection> {
    check_may_send(&directory.matrix, owner, message_type)?;
    let targets = recipients(envelope, message_type, owner, directory, tables)?;
    check_recipients(
        &directory.matrix,
        owner,
        &targets,
        (message_type, version),
        envelope,
    )?;
    Ok(targets)
}

/// The data folder, resolved against the configuration folder.
pub fn store_dir(directory: &Directory) -> std::path::PathBuf {
    let dir: &Path = &directory.settings.store.dir;
    directory.config_dir.join(dir)
}

/// One rejection for a message no recipient could receive: the first recipient's code, and
/// every recipient's errors, each naming its recipient.
fn merged(refused: Vec<Refused>) -> Rejection {
    let code = refused
        .first()
        .map_or(Code::UnmappableIdentifier, |r| r.rejection.code);
    let errors: Vec<FieldError> = if refused.len() == 1 {
        refused
            .into_iter()
            .flat_map(|r| r.rejection.errors)
            .collect()
    } else {
        refused
            .into_iter()
            .flat_map(|r| {
                let recipient = r.recipient;
                r.rejection.errors.into_iter().map(move |mut e| {
                    e.message = format!("{recipient}: {}", e.message);
                    e
                })
            })
            .collect()
    };
    Rejection::new(code, errors)
}
