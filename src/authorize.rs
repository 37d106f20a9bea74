//! Authorize: the sender is the partner that owns the queue the message arrived on, and the
//! authorization matrix (`config/authorization.toml`) allows this sender to send this type and
//! version to every recipient, for this purpose. Anything the matrix does not allow is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Deserialize;

use crate::decode::Pointer;
use crate::envelope::Node;
use crate::partner::Partner;
use crate::rejection::{Code, FieldError, Rejection};
use crate::validate::SchemaSet;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MatrixFile {
    #[serde(default)]
    allow: Vec<AllowFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowFile {
    from: Vec<String>,
    #[serde(rename = "type")]
    message_type: String,
    /// MAJOR versions allowed; absent: every version the schemas define.
    #[serde(default)]
    versions: Vec<String>,
    to: Vec<String>,
    /// The purposes this is allowed for: JSON pointer → accepted values, all must hold.
    #[serde(default)]
    when: BTreeMap<String, Vec<String>>,
}

/// One rule of the matrix: these senders may send this type to these recipients.
#[derive(Debug, Clone)]
pub struct Allow {
    pub from: BTreeSet<String>,
    pub message_type: String,
    /// MAJOR versions; empty means all.
    pub versions: BTreeSet<String>,
    pub to: BTreeSet<String>,
    pub when: Conditions,
}

impl Allow {
    fn covers(&self, sender: &str, message_type: &str, version: &str, recipient: &str) -> bool {
        self.message_type == message_type
            && self.from.contains(sender)
            && self.to.contains(recipient)
            && (self.versions.is_empty() || self.versions.contains(major(version)))
    }

    fn purpose_holds(&self, envelope: &Node) -> bool {
        conditions_hold(&self.when, envelope)
    }
}

/// Conditions on a message (a matrix rule's purposes, a route's `when`): the string at each
/// pointer must be one of its values.
pub type Conditions = Vec<(Pointer, Vec<String>)>;

/// The conditions of `pointer → values` as a configuration file writes them.
pub fn conditions(when: BTreeMap<String, Vec<String>>) -> Conditions {
    when.into_iter()
        .map(|(pointer, values)| (Pointer::from(pointer), values))
        .collect()
}

/// Whether every `pointer → values` condition holds for `envelope`.
pub fn conditions_hold(when: &[(Pointer, Vec<String>)], envelope: &Node) -> bool {
    when.iter().all(|(pointer, values)| {
        pointer
            .get(envelope)
            .and_then(Node::as_str)
            .is_some_and(|v| values.iter().any(|x| x == v))
    })
}

fn major(version: &str) -> &str {
    version.split('.').next().unwrap_or(version)
}

/// Who may send which type (and version) to whom, and for what.
#[derive(Debug, Default)]
pub struct Matrix {
    pub rules: Vec<Allow>,
}

impl Matrix {
    /// Reads `authorization.toml` and checks it against the partners and schemas. The matrix
    /// comes back even with errors, so that the routes can still be checked against it and one
    /// run reports the real mistakes rather than their consequences.
    pub fn load(
        text: &str,
        partners: &BTreeMap<String, Partner>,
        schemas: &SchemaSet,
    ) -> (Matrix, Vec<String>) {
        let raw: MatrixFile = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => return (Matrix::default(), vec![e.to_string()]),
        };
        let mut errors = Vec::new();
        let mut rules = Vec::new();
        for (i, rule) in raw.allow.into_iter().enumerate() {
            let at = format!("allow #{} ({})", i + 1, rule.message_type);
            if !schemas.has_type(&rule.message_type)
                || crate::validate::GATEWAY_TYPES.contains(&rule.message_type.as_str())
            {
                errors.push(format!(
                    "{at}: no schema defines a message type {:?} that partners send",
                    rule.message_type
                ));
            }
            let majors: BTreeSet<&str> = schemas
                .versions(&rule.message_type)
                .map(|(v, _)| major(v))
                .collect();
            for v in &rule.versions {
                if !majors.contains(v.as_str()) {
                    errors.push(format!(
                        "{at}: versions: {v:?} is not a MAJOR version of {} the schemas define",
                        rule.message_type
                    ));
                }
            }
            for (field, ids) in [("from", &rule.from), ("to", &rule.to)] {
                if ids.is_empty() {
                    errors.push(format!("{at}: {field}: at least one partner is needed"));
                }
                for id in ids {
                    if !partners.contains_key(id) {
                        errors.push(format!("{at}: {field}: unknown partner {id:?}"));
                    }
                }
            }
            for pointer in rule.when.keys() {
                if schemas.field(&rule.message_type, pointer).is_none() {
                    errors.push(format!(
                        "{at}: when: {} has no field {pointer:?}",
                        rule.message_type
                    ));
                }
            }
            rules.push(Allow {
                from: rule.from.into_iter().collect(),
                message_type: rule.message_type,
                versions: rule.versions.into_iter().collect(),
                to: rule.to.into_iter().collect(),
                when: conditions(rule.when),
            });
        }
        for p in partners.values() {
            let receives = rules.iter().any(|r| r.to.contains(&p.id));
            if receives && p.identifier_schemes.is_empty() {
                errors.push(format!(
                    "{}: receives messages but accepts no identifier scheme (identifier_schemes in its partner file)",
                    p.id
                ));
            }
        }
        (Matrix { rules }, errors)
    }

    /// Whether some rule lets `sender` send `message_type` to anyone.
    pub fn may_send(&self, sender: &str, message_type: &str) -> bool {
        self.rules
            .iter()
            .any(|r| r.message_type == message_type && r.from.contains(sender))
    }

    /// Whether some rule lets `sender` send `message_type` to `recipient`, for any purpose.
    pub fn may_ever_send(&self, sender: &str, message_type: &str, recipient: &str) -> bool {
        self.rules.iter().any(|r| {
            r.message_type == message_type && r.from.contains(sender) && r.to.contains(recipient)
        })
    }

    /// Whether this message, of `message_type` and `version`, may go from `sender` to
    /// `recipient`.
    pub fn allows(
        &self,
        sender: &str,
        recipient: &str,
        (message_type, version): (&str, &str),
        envelope: &Node,
    ) -> bool {
        self.rules.iter().any(|r| {
            r.covers(sender, message_type, version, recipient) && r.purpose_holds(envelope)
        })
    }

    /// The matrix as a table an auditor can read: one line per sender, type and recipient, with
    /// the versions, the purposes and the payload fields withheld from the recipient.
    pub fn render(&self, partners: &BTreeMap<String, Partner>, schemas: &SchemaSet) -> String {
        let mut rows: Vec<[String; 6]> = Vec::new();
        for rule in &self.rules {
            for from in &rule.from {
                for to in &rule.to {
                    let versions = if rule.versions.is_empty() {
                        "all".to_string()
                    } else {
                        rule.versions.iter().cloned().collect::<Vec<_>>().join(",")
                    };
                    let when = if rule.when.is_empty() {
                        "any".to_string()
                    } else {
                        rule.when
                            .iter()
                            .map(|(p, v)| format!("{p} in [{}]", v.join(",")))
                            .collect::<Vec<_>>()
                            .join("; ")
                    };
                    let fields = partners
                        .get(to)
                        .and_then(|p| p.fields.get(&rule.message_type))
                        .map_or("all".to_string(), |allowed| {
                            let withheld = withheld(schemas, &rule.message_type, allowed);
                            if withheld.is_empty() {
                                "all".to_string()
                            } else {
                                format!("all but {}", withheld.join(","))
                            }
                        });
                    rows.push([
                        from.clone(),
                        rule.message_type.clone(),
                        versions,
                        to.clone(),
                        when,
                        fields,
                    ]);
                }
            }
        }
        rows.sort();
        let header = [
            "FROM",
            "TYPE",
            "VERSIONS",
            "TO",
            "PURPOSE",
            "PAYLOAD FIELDS",
        ]
        .map(String::from);
        let mut widths = header.clone().map(|h| h.len());
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// The payload fields of `message_type` (any version) a recipient with the field list `allowed`
/// does not receive: the outermost ones only.
fn withheld(schemas: &SchemaSet, message_type: &str, allowed: &[String]) -> Vec<String> {
    let related = |a: &str, b: &str| {
        a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
    };
    let mut out: Vec<String> = Vec::new();
    let fields: BTreeSet<&String> = schemas
        .versions(message_type)
        .flat_map(|(_, s)| s.fields.keys())
        .filter(|p| p.starts_with("/payload/"))
        .collect();
    for field in fields {
        let covered = allowed.iter().any(|a| related(field, a));
        let inside_withheld = out.iter().any(|w| field.starts_with(&format!("{w}/")));
        if !covered && !inside_withheld {
            out.push(field.clone());
        }
    }
    out
}

/// The `sender` field must name the queue's owner: a partner's broker user can write only to its
/// own inbound queue, so this is what proves who sent the message.
pub fn check_sender(envelope: &Node, owner: &Partner) -> Result<(), Rejection> {
    let claimed = envelope.get("sender").and_then(Node::as_str).unwrap_or("");
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

pub fn check_may_send(
    matrix: &Matrix,
    sender: &Partner,
    message_type: &str,
) -> Result<(), Rejection> {
    if !matrix.may_send(&sender.id, message_type) {
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

/// Every recipient must be allowed by the matrix for this message (type, version, purpose).
pub fn check_recipients(
    matrix: &Matrix,
    sender: &Partner,
    recipients: &[&Partner],
    (message_type, version): (&str, &str),
    envelope: &Node,
) -> Result<(), Rejection> {
    let refused: Vec<FieldError> = recipients
        .iter()
        .filter(|r| !matrix.allows(&sender.id, &r.id, (message_type, version), envelope))
        .map(|r| {
            FieldError::new(
                "/recipient",
                "authorization",
                format!(
                    "{} is not authorized to send this {} to {} (authorization matrix)",
                    sender.id, message_type, r.id
                ),
            )
        })
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        Err(Rejection::new(Code::NotAuthorized, refused))
    }
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
        let m = Node::from(json!({"sender": "inps"}));
        assert!(check_sender(&m, &d.partners["inps"]).is_ok());
        assert_eq!(
            check_sender(&m, &d.partners["cpi-modena"])
                .unwrap_err()
                .code,
            Code::SenderMismatch
        );
        assert_eq!(
            check_sender(&Node::from(json!({})), &d.partners["inps"])
                .unwrap_err()
                .code,
            Code::SenderMismatch
        );
    }

    #[test]
    fn the_matrix_allows_by_sender_type_recipient_version_and_purpose() {
        let d = demo();
        let m = &d.matrix;
        assert!(check_may_send(m, &d.partners["inps"], "benefit-status").is_ok());
        assert_eq!(
            check_may_send(m, &d.partners["inps"], "referral")
                .unwrap_err()
                .code,
            Code::NotAuthorized
        );
        let benefit =
            |b: &str| Node::from(json!({"type": "benefit-status", "payload": {"benefit": b}}));
        let (v1, v2) = (("benefit-status", "1.0"), ("benefit-status", "2.0"));
        // Inclusion benefits may go to the comune, unemployment benefits may not.
        assert!(m.allows("inps", "comune-modena", v1, &benefit("adi")));
        assert!(!m.allows("inps", "comune-modena", v1, &benefit("naspi")));
        assert!(m.allows("inps", "cpi-modena", v1, &benefit("naspi")));
        // Only the MAJOR versions listed.
        assert!(!m.allows("inps", "cpi-modena", v2, &benefit("naspi")));
        // Never the other way round.
        assert!(!m.allows("cpi-modena", "inps", v1, &benefit("naspi")));
        // Only the type the rule names.
        assert!(!m.allows("inps", "cpi-modena", ("referral", "1.0"), &benefit("naspi")));
        let r = check_recipients(
            m,
            &d.partners["inps"],
            &[&d.partners["cpi-modena"], &d.partners["comune-modena"]],
            v1,
            &benefit("naspi"),
        )
        .unwrap_err();
        assert_eq!(r.code, Code::NotAuthorized);
        assert_eq!(r.errors.len(), 1);
        assert!(r.errors[0].message.contains("comune-modena"));
    }

    #[test]
    fn matrix_mistakes_are_all_reported() {
        let d = demo();
        let text = r#"
            [[allow]]
            from = ["inps", "nobody"]
            type = "pension-claim"
            to = []

            [[allow]]
            from = ["inps"]
            type = "benefit-status"
            versions = ["7"]
            to = ["cpi-modena"]
            when = { "/payload/colour" = ["red"] }
        "#;
        let (_, errors) = Matrix::load(text, &d.partners, &d.schemas);
        assert_eq!(errors.len(), 5, "{errors:#?}");
    }

    #[test]
    fn the_printed_matrix_names_every_pair_and_what_is_withheld() {
        let d = demo();
        let table = d.matrix.render(&d.partners, &d.schemas);
        let line = |from: &str, to: &str| {
            table
                .lines()
                .find(|l| l.starts_with(from) && l.contains(&format!(" {to} ")))
                .unwrap_or_else(|| panic!("no line {from} -> {to} in\n{table}"))
                .to_string()
        };
        assert!(line("cpi-modena", "inps").ends_with("all but /payload/health"));
        assert!(line("inps", "comune-modena").contains("/payload/benefit in [adi,sfl]"));
        assert!(line("inps", "osservatorio-er").contains("/payload/application_id"));
        assert!(!table.contains("comune-modena  benefit-status"));
    }
}
