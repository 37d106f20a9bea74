//! Partners: the institutions Ponte connects, one configuration file each under
//! `config/partners/`, saying what a partner may send and receive, which person identifier
//! schemes it accepts, and which of its offices is competent for which municipality.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use serde::Deserialize;

/// Identifier schemes the wire contract defines.
pub const SCHEMES: &[&str] = &["it.cf", "ch.ahvn13", "local"];

/// The sender id of messages Ponte itself produces (receipts); no partner may use it.
pub const GATEWAY_ID: &str = "ponte";

/// A partner as written in its file. Unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartnerFile {
    id: String,
    name: String,
    /// What sort of institution this is (`inps`, `cpi`, `comune`, …); routing rules address
    /// "the competent partner of kind X".
    kind: String,
    #[serde(default)]
    may_send: Vec<String>,
    #[serde(default)]
    may_receive: Vec<String>,
    #[serde(default)]
    identifier_schemes: Vec<String>,
    #[serde(default)]
    offices: Vec<OfficeFile>,
    #[serde(default)]
    receipts: Receipts,
}

/// Which receipts a partner gets. Every rejection is always answered; a partner that trusts
/// "no news is good news" can switch off positive receipts, which halves the broker's publishes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Receipts {
    /// A receipt for every message (the default).
    #[default]
    All,
    /// Receipts only for rejected messages.
    Rejections,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OfficeFile {
    code: String,
    #[serde(default)]
    municipalities: Vec<String>,
}

/// A configured partner, checked and immutable.
#[derive(Debug, Clone)]
pub struct Partner {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub may_send: BTreeSet<String>,
    pub may_receive: BTreeSet<String>,
    /// Schemes this partner accepts in `subject.identifiers`, in its preferred order.
    pub identifier_schemes: Vec<String>,
    pub offices: Vec<Office>,
    pub receipts: Receipts,
    /// Competent office code by ISTAT municipality code.
    office_by_municipality: HashMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Office {
    pub code: String,
    pub municipalities: Vec<String>,
}

impl Partner {
    /// The partner's office competent for `municipality`, if it has one.
    pub fn office_for(&self, municipality: &str) -> Option<&str> {
        self.office_by_municipality
            .get(municipality)
            .map(String::as_str)
    }

    /// Whether this partner is competent for `municipality` at all.
    pub fn is_competent_for(&self, municipality: &str) -> bool {
        self.office_by_municipality.contains_key(municipality)
    }

    pub fn accepts_scheme(&self, scheme: &str) -> bool {
        self.identifier_schemes.iter().any(|s| s == scheme)
    }

    /// Reads one partner file; `known_types` are the message types the schemas define. Returns
    /// every problem found in the file.
    pub fn load(file: &Path, known_types: &BTreeSet<String>) -> Result<Partner, Vec<String>> {
        let text = std::fs::read_to_string(file).map_err(|e| vec![format!("cannot read: {e}")])?;
        let raw: PartnerFile = toml::from_str(&text).map_err(|e| vec![e.to_string()])?;
        let mut errors = Vec::new();
        if !is_partner_id(&raw.id) {
            errors.push(format!(
                "id {:?} must match [a-z][a-z0-9-]* (at most 64 characters)",
                raw.id
            ));
        }
        if raw.id == GATEWAY_ID {
            errors.push(format!(
                "id {GATEWAY_ID:?} is reserved for the gateway itself"
            ));
        }
        let stem = file.file_stem().unwrap_or_default().to_string_lossy();
        if stem != raw.id {
            errors.push(format!(
                "id {:?} must equal the file name ({stem}.toml)",
                raw.id
            ));
        }
        if !is_partner_id(&raw.kind) {
            errors.push(format!("kind {:?} must match [a-z][a-z0-9-]*", raw.kind));
        }
        for (field, types) in [
            ("may_send", &raw.may_send),
            ("may_receive", &raw.may_receive),
        ] {
            for t in types {
                if crate::validate::GATEWAY_TYPES.contains(&t.as_str()) {
                    errors.push(format!("{field}: {t:?} is produced by the gateway only"));
                } else if !known_types.contains(t) {
                    errors.push(format!("{field}: no schema defines message type {t:?}"));
                }
            }
        }
        for scheme in &raw.identifier_schemes {
            if !SCHEMES.contains(&scheme.as_str()) {
                errors.push(format!(
                    "identifier_schemes: unknown scheme {scheme:?}; known: {}",
                    SCHEMES.join(", ")
                ));
            }
        }
        if !raw.may_receive.is_empty() && raw.identifier_schemes.is_empty() {
            errors.push("identifier_schemes: a partner that receives messages must accept at least one scheme".into());
        }
        let mut office_by_municipality = HashMap::new();
        let mut codes = BTreeSet::new();
        for office in &raw.offices {
            if !is_office_code(&office.code) {
                errors.push(format!(
                    "offices: code {:?} is not a valid office code",
                    office.code
                ));
            }
            if !codes.insert(office.code.clone()) {
                errors.push(format!("offices: code {:?} is listed twice", office.code));
            }
            for m in &office.municipalities {
                if m.len() != 6 || !m.bytes().all(|b| b.is_ascii_digit()) {
                    errors.push(format!(
                        "offices: {:?} is not a six-digit ISTAT municipality code (office {})",
                        m, office.code
                    ));
                } else if let Some(other) =
                    office_by_municipality.insert(m.clone(), office.code.clone())
                {
                    errors.push(format!(
                        "offices: municipality {m} is assigned to both {other} and {}",
                        office.code
                    ));
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Partner {
            id: raw.id,
            name: raw.name,
            kind: raw.kind,
            may_send: raw.may_send.into_iter().collect(),
            may_receive: raw.may_receive.into_iter().collect(),
            identifier_schemes: raw.identifier_schemes,
            offices: raw
                .offices
                .into_iter()
                .map(|o| Office {
                    code: o.code,
                    municipalities: o.municipalities,
                })
                .collect(),
            receipts: raw.receipts,
            office_by_municipality,
        })
    }
}

pub fn is_partner_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn is_office_code(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}
