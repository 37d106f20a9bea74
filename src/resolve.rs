//! Resolve: a partner's own look-up service for its person ids, asked when the crosswalk has no
//! entry. `POST <url>` with `{"scheme": "it.cf", "value": "…"}` answers `200 {"local": "…"}`
//! (found) or `404` (the partner does not know the person). Anything else — a timeout, a refused
//! connection, a 5xx — means "ask again later": the message goes back to its queue and is never
//! rejected because a look-up service was down. Answers are kept in a bounded cache.

use std::collections::BTreeMap;
use std::sync::Once;
use std::time::Duration;

use moka::sync::Cache;
use serde::Deserialize;

use crate::partner::{Partner, ResolverSettings};

/// What a look-up answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    Found(String),
    /// The service does not know this person.
    Unknown,
    /// The service could not answer now; try the message again later.
    Unavailable(String),
}

/// One partner's look-up service.
#[derive(Debug)]
pub struct Resolver {
    partner: String,
    client: reqwest::Client,
    url: reqwest::Url,
    cache: Cache<(String, String), String>,
}

#[derive(Deserialize)]
struct Answer {
    local: String,
}

static CRYPTO: Once = Once::new();

impl Resolver {
    pub fn new(partner: &str, settings: &ResolverSettings) -> Result<Resolver, String> {
        let client = with_tls_files(
            http_client(settings.timeout()),
            settings.ca_file.as_deref(),
            settings.client_identity_file.as_deref(),
        )?
        .build()
        .map_err(|e| e.to_string())?;
        Ok(Resolver {
            partner: partner.to_string(),
            client,
            url: reqwest::Url::parse(&settings.url).map_err(|e| e.to_string())?,
            cache: Cache::builder()
                .max_capacity(settings.cache_entries)
                .time_to_live(Duration::from_secs(settings.cache_ttl_secs))
                .build(),
        })
    }

    /// The partner's own id for `(scheme, value)`.
    pub async fn local_id(&self, scheme: &str, value: &str) -> Resolved {
        let resolved = self.ask(scheme, value).await;
        let result = match &resolved {
            Resolved::Found(_) => "found",
            Resolved::Unknown => "unknown",
            Resolved::Unavailable(_) => "unavailable",
        };
        metrics::counter!("ponte_lookups_total", "partner" => self.partner.clone(), "result" => result)
            .increment(1);
        resolved
    }

    async fn ask(&self, scheme: &str, value: &str) -> Resolved {
        let key = (scheme.to_string(), value.to_string());
        if let Some(local) = self.cache.get(&key) {
            return Resolved::Found(local);
        }
        let sent = self
            .client
            .post(self.url.clone())
            .json(&serde_json::json!({"scheme": scheme, "value": value}))
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            // The error names the URL and the cause, never the identifier (it is in the body).
            Err(e) => return Resolved::Unavailable(describe(&e, "look-up service")),
        };
        match response.status().as_u16() {
            200 => match response.json::<Answer>().await {
                Ok(answer) if !answer.local.is_empty() && answer.local.len() <= 64 => {
                    self.cache.insert(key, answer.local.clone());
                    Resolved::Found(answer.local)
                }
                Ok(_) => Resolved::Unavailable(format!(
                    "look-up service of {} answered an empty or over-long id",
                    self.partner
                )),
                Err(e) => Resolved::Unavailable(describe(&e, "look-up service")),
            },
            404 => Resolved::Unknown,
            status => Resolved::Unavailable(format!(
                "look-up service of {} answered HTTP {status}",
                self.partner
            )),
        }
    }
}

/// An HTTP client for a partner's service: Ponte's user agent, `timeout` for the whole request
/// and for connecting, TLS by rustls with the process-wide ring provider.
pub fn http_client(timeout: Duration) -> reqwest::ClientBuilder {
    CRYPTO.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("ponte/", env!("CARGO_PKG_VERSION")))
}

/// Trusts the authorities in the PEM file `ca_file` besides the system's, and shows the
/// certificate chain and key in `client_identity_file`, for a service with a certificate of
/// its institution's own authority or one that requires mutual TLS.
pub fn with_tls_files(
    mut builder: reqwest::ClientBuilder,
    ca_file: Option<&std::path::Path>,
    client_identity_file: Option<&std::path::Path>,
) -> Result<reqwest::ClientBuilder, String> {
    if let Some(file) = ca_file {
        let pem = crate::pem::certificates(file)?;
        for certificate in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{}: {e}", file.display()))?
        {
            builder = builder.add_root_certificate(certificate);
        }
    }
    if let Some(file) = client_identity_file {
        let pem = crate::pem::identity(file)?;
        let identity =
            reqwest::Identity::from_pem(&pem).map_err(|e| format!("{}: {e}", file.display()))?;
        builder = builder.identity(identity);
    }
    Ok(builder)
}

/// What went wrong with a request to `service`, naming the URL and the cause, never the body.
pub fn describe(e: &reqwest::Error, service: &str) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_decode() {
        "unreadable answer"
    } else {
        "request failed"
    };
    let mut message = format!("{service} {kind}");
    if let Some(url) = e.url() {
        message.push_str(&format!(" ({})", url.as_str()));
    }
    message
}

/// Every configured partner's look-up service, by partner id.
#[derive(Debug, Default)]
pub struct Resolvers(BTreeMap<String, Resolver>);

impl Resolvers {
    pub fn new<'a>(partners: impl Iterator<Item = &'a Partner>) -> Result<Resolvers, String> {
        let mut out = BTreeMap::new();
        for p in partners {
            if let Some(settings) = &p.resolver {
                out.insert(p.id.clone(), Resolver::new(&p.id, settings)?);
            }
        }
        Ok(Resolvers(out))
    }

    pub fn get(&self, partner: &str) -> Option<&Resolver> {
        self.0.get(partner)
    }
}
