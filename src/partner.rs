//! Partners: the institutions Ponte connects, one configuration file each under
//! `config/partners/`, saying which person identifier schemes a partner accepts, which fields of
//! each message type it may receive, and how its own person ids are found. Who may send what to
//! whom is in the authorization matrix; offices and codes are in the code tables.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::decode::Pointer;
use crate::validate::SchemaSet;

/// Identifier schemes a partner may accept. `it.cf` and `ch.ahvn13` are shared; `local` is the
/// partner's own person id, found through the crosswalk; `pseudonym` is a keyed pseudonym of the
/// shared identifiers, for partners that may not know who the person is.
pub const SCHEMES: &[&str] = &["it.cf", "ch.ahvn13", "local", "pseudonym"];

/// Schemes every partner understands in the same way.
pub const SHARED_SCHEMES: &[&str] = &["it.cf", "ch.ahvn13"];

/// The sender id of messages Ponte itself produces (receipts); no partner may use it.
pub const GATEWAY_ID: &str = "ponte";

/// Reads one environment variable (tests and tools supply their own).
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Shortest pseudonym key accepted, in bytes.
const MIN_KEY_BYTES: usize = 32;

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
    identifier_schemes: Vec<String>,
    /// Environment variable holding the key of this partner's pseudonyms.
    pseudonym_key_env: Option<String>,
    /// Remote look-up of this partner's own person ids, for identifiers the crosswalk lacks.
    resolver: Option<ResolverSettings>,
    /// Deliver to this partner by HTTPS POST instead of letting it consume its outbound queue.
    http: Option<HttpSettings>,
    /// Per message type, the JSON pointers under `/payload` this partner may receive; the rest of
    /// the payload is removed before delivery. A type not listed is delivered whole.
    #[serde(default)]
    fields: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    receipts: Receipts,
    /// Messages of this partner's inbound queue the gateway may have in flight, reserved out of
    /// `broker.max_in_flight` ahead of the even share of the other partners: for the few that
    /// send most of the traffic when many partners are configured.
    prefetch: Option<u16>,
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

/// A partner's look-up service for its own person ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolverSettings {
    /// `https://…` (plain `http://` only on a loopback address).
    pub url: String,
    #[serde(default = "default_resolver_timeout")]
    pub timeout_ms: u64,
    /// Answers kept in memory, at most.
    #[serde(default = "default_cache_entries")]
    pub cache_entries: u64,
    /// How long an answer is kept.
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl_secs: u64,
    /// PEM file of extra certificate authorities to trust for the service (besides the
    /// system's), relative to the partner file.
    pub ca_file: Option<PathBuf>,
    /// PEM file holding Ponte's client certificate chain and its private key, for a service
    /// that requires mutual TLS; relative to the partner file.
    pub client_identity_file: Option<PathBuf>,
}

/// A partner that receives by HTTPS: Ponte consumes the partner's outbound queue itself and
/// POSTs each copy, in order, to `url`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// `https://…` (plain `http://` only on a loopback address).
    pub url: String,
    /// How long one POST may take, connection included.
    #[serde(default = "default_http_timeout")]
    pub timeout_ms: u64,
    /// PEM file of extra certificate authorities to trust for this endpoint (besides the
    /// system's), relative to the partner file.
    pub ca_file: Option<PathBuf>,
    /// PEM file holding Ponte's client certificate chain and its private key, for endpoints that
    /// require mutual TLS; relative to the partner file.
    pub client_identity_file: Option<PathBuf>,
    /// Copies waiting in the partner's outbound queue, at most. When it is full, further copies
    /// wait in the broker's delay queues, so a slow endpoint never grows the gateway's memory.
    #[serde(default = "default_max_queued")]
    pub max_queued: u32,
}

fn default_http_timeout() -> u64 {
    10_000
}
fn default_max_queued() -> u32 {
    100_000
}

impl HttpSettings {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

fn default_resolver_timeout() -> u64 {
    2000
}
fn default_cache_entries() -> u64 {
    10_000
}
fn default_cache_ttl() -> u64 {
    3600
}

impl ResolverSettings {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// A pseudonym key, which never shows in logs or debug output. It is held as the HMAC-SHA256
/// state keyed with it: each pseudonym starts from a copy of that state rather than hashing the
/// key again (two of the four SHA-256 blocks a short identifier's pseudonym takes).
#[derive(Clone)]
pub struct Secret(Arc<Hmac<Sha256>>);

impl Secret {
    pub fn new(bytes: impl AsRef<[u8]>) -> Secret {
        let keyed = Hmac::<Sha256>::new_from_slice(bytes.as_ref())
            .expect("HMAC accepts keys of any length");
        Secret(Arc::new(keyed))
    }

    /// The HMAC state keyed with the secret, to feed a message to.
    pub fn keyed(&self) -> Hmac<Sha256> {
        (*self.0).clone()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

/// A configured partner, checked and immutable.
#[derive(Debug, Clone)]
pub struct Partner {
    pub id: String,
    pub name: String,
    pub kind: String,
    /// Schemes this partner accepts in `subject.identifiers`, in its preferred order.
    pub identifier_schemes: Vec<String>,
    pub pseudonym_key: Option<Secret>,
    pub pseudonym_key_env: Option<String>,
    pub resolver: Option<ResolverSettings>,
    /// Set for a partner that receives by HTTPS; paths are resolved against the partner folder.
    pub http: Option<HttpSettings>,
    /// Per message type, the payload fields it may receive (absent: all), as written.
    pub fields: BTreeMap<String, Vec<String>>,
    /// The same, as trees of keys below `payload`, unescaped once here rather than per message.
    pub field_trees: BTreeMap<String, FieldTree>,
    pub receipts: Receipts,
    /// This partner's own prefetch, when its file sets one (see
    /// [`crate::settings::BrokerSettings::prefetches`]).
    pub prefetch: Option<u16>,
}

impl Partner {
    pub fn accepts_scheme(&self, scheme: &str) -> bool {
        self.identifier_schemes.iter().any(|s| s == scheme)
    }

    /// Reads one partner file, checking field lists against `schemas`; `env` reads the
    /// environment for pseudonym keys (`None`: keys are not read). Returns every problem found in
    /// the file.
    pub fn load(
        file: &Path,
        schemas: &SchemaSet,
        env: Option<EnvLookup<'_>>,
    ) -> Result<Partner, Vec<String>> {
        let text = std::fs::read_to_string(file).map_err(|e| vec![format!("cannot read: {e}")])?;
        let raw: PartnerFile = toml::from_str(&text).map_err(|e| {
            let mut message = e.to_string();
            for moved in ["may_send", "may_receive"] {
                if message.contains(&format!("`{moved}`")) {
                    message.push_str(" (rights are in authorization.toml)");
                }
            }
            if message.contains("`offices`") {
                message.push_str(" (offices are in tables/offices.csv)");
            }
            vec![message]
        })?;
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
        if raw.prefetch == Some(0) {
            errors.push("prefetch must be at least 1".into());
        }
        if !is_partner_id(&raw.kind) {
            errors.push(format!("kind {:?} must match [a-z][a-z0-9-]*", raw.kind));
        }
        let mut seen = BTreeSet::new();
        for scheme in &raw.identifier_schemes {
            if !SCHEMES.contains(&scheme.as_str()) {
                errors.push(format!(
                    "identifier_schemes: unknown scheme {scheme:?}; known: {}",
                    SCHEMES.join(", ")
                ));
            }
            if !seen.insert(scheme) {
                errors.push(format!("identifier_schemes: {scheme:?} is listed twice"));
            }
        }
        let pseudonymous = raw.identifier_schemes.iter().any(|s| s == "pseudonym");
        if pseudonymous && raw.identifier_schemes.len() > 1 {
            errors.push(
                "identifier_schemes: a partner that receives pseudonyms may not receive any other scheme"
                    .into(),
            );
        }
        let pseudonym_key = match (&raw.pseudonym_key_env, pseudonymous) {
            (None, true) => {
                errors.push(
                    "pseudonym_key_env: a partner that receives pseudonyms needs the name of the environment variable holding its key".into(),
                );
                None
            }
            (Some(_), false) => {
                errors.push("pseudonym_key_env: set only for a partner whose identifier_schemes is [\"pseudonym\"]".into());
                None
            }
            (Some(_), true) if env.is_none() => None,
            (Some(name), true) => match env.and_then(|env| env(name)) {
                Some(key) if key.len() >= MIN_KEY_BYTES => Some(Secret::new(key)),
                Some(_) => {
                    errors.push(format!(
                        "pseudonym_key_env: the key in {name} must be at least {MIN_KEY_BYTES} bytes"
                    ));
                    None
                }
                None => {
                    errors.push(format!(
                        "pseudonym_key_env: environment variable {name} is not set"
                    ));
                    None
                }
            },
            (None, false) => None,
        };
        let folder = file.parent().unwrap_or(Path::new("."));
        let mut raw = raw;
        if let Some(resolver) = &mut raw.resolver {
            let files = [&mut resolver.ca_file, &mut resolver.client_identity_file];
            errors.extend(tls_files("resolver", folder, files));
        }
        if let Some(http) = &mut raw.http {
            let files = [&mut http.ca_file, &mut http.client_identity_file];
            errors.extend(tls_files("http", folder, files));
        }
        if let Some(resolver) = &raw.resolver {
            if !raw.identifier_schemes.iter().any(|s| s == "local") {
                errors.push(
                    "resolver: only a partner that accepts the \"local\" scheme looks up its own ids"
                        .into(),
                );
            }
            if let Err(e) = check_resolver_url(&resolver.url) {
                errors.push(format!("resolver.url: {e}"));
            }
            if resolver.timeout_ms == 0 || resolver.cache_entries == 0 {
                errors.push("resolver: timeout_ms and cache_entries must be at least 1".into());
            }
        }
        if let Some(http) = &raw.http {
            if let Err(e) = check_resolver_url(&http.url) {
                errors.push(format!("http.url: {e}"));
            }
            if http.timeout_ms == 0 || http.max_queued == 0 {
                errors.push("http: timeout_ms and max_queued must be at least 1".into());
            }
        }
        let http = raw.http;
        for (message_type, pointers) in &raw.fields {
            if !schemas.has_type(message_type) {
                errors.push(format!(
                    "fields: no schema defines message type {message_type:?}"
                ));
                continue;
            }
            for pointer in pointers {
                if !pointer.starts_with("/payload/") {
                    errors.push(format!(
                        "fields.{message_type}: {pointer:?} must point under /payload/ (the envelope is always delivered)"
                    ));
                } else if schemas.field(message_type, pointer).is_none() {
                    errors.push(format!(
                        "fields.{message_type}: {message_type} has no field {pointer:?}"
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
            identifier_schemes: raw.identifier_schemes,
            pseudonym_key,
            pseudonym_key_env: raw.pseudonym_key_env,
            resolver: raw.resolver,
            http,
            field_trees: raw
                .fields
                .iter()
                .map(|(t, pointers)| (t.clone(), FieldTree::of(pointers)))
                .collect(),
            fields: raw.fields,
            receipts: raw.receipts,
            prefetch: raw.prefetch,
        })
    }
}

/// One message type's field list as a tree of the payload's keys: each name listed, or parent
/// of fields listed, with its place in the list (a parent's is its first field's) and, for a
/// parent listed only through some of its fields, those fields. Mapping looks each key of a
/// payload up in it once.
#[derive(Debug, Clone, Default)]
pub struct FieldTree(crate::ConfigMap<String, (usize, Option<FieldTree>)>);

impl FieldTree {
    pub fn of(pointers: &[String]) -> FieldTree {
        let mut tree = FieldTree::default();
        for (place, pointer) in pointers.iter().enumerate() {
            // Below `/payload`, which every listed pointer starts with.
            let pointer = Pointer::new(pointer);
            let keys: Vec<&str> = pointer.tokens().skip(1).collect();
            tree.add(place, &keys);
        }
        tree
    }

    /// Adds the field at `keys` at `place`. A field listed with one of its parents stands for
    /// the parent, in the first place either has: a parent listed whole takes in the fields
    /// below it, and a field below one listed whole, or listed again, changes nothing.
    fn add(&mut self, place: usize, keys: &[&str]) {
        let Some((name, below)) = keys.split_first() else {
            return;
        };
        let (_, fields) = self
            .0
            .entry(name.to_string())
            .or_insert_with(|| (place, Some(FieldTree::default())));
        match fields {
            Some(fields) if !below.is_empty() => fields.add(place, below),
            Some(_) => *fields = None,
            None => {}
        }
    }

    /// The place of the field `name` and, if only some of its fields are listed, those.
    pub fn get(&self, name: &str) -> Option<&(usize, Option<FieldTree>)> {
        self.0.get(name)
    }
}

/// A section's TLS files — `[ca_file, client_identity_file]` — resolved against the partner
/// file's `folder` and checked; the errors name the section and setting.
fn tls_files(section: &str, folder: &Path, files: [&mut Option<PathBuf>; 2]) -> Vec<String> {
    let [ca, identity] = files.map(|file| {
        *file = file.as_ref().map(|f| folder.join(f));
        file.as_deref()
    });
    crate::pem::section(section, ca, identity)
        .err()
        .unwrap_or_default()
}

/// A partner's service (look-up or delivery endpoint) must be reached over TLS; plain HTTP only
/// on the local machine.
fn check_resolver_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let loopback = matches!(
        parsed.host(),
        Some(url::Host::Ipv4(ip)) if ip.is_loopback()
    ) || matches!(parsed.host(), Some(url::Host::Ipv6(ip)) if ip.is_loopback())
        || parsed.host_str() == Some("localhost");
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(format!(
            "{url:?} must be https:// (http:// only on a loopback address)"
        )),
    }
}

pub fn is_partner_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}
