//! Settings: the main configuration file (`ponte.toml`), layered with `PONTE_*` environment
//! variables. Secrets are accepted from the environment only.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Environment variables override the file: `PONTE_BROKER__URL`, `PONTE_LOG__FORMAT`, … (a double
/// underscore separates levels). The broker password is read only from `PONTE_BROKER__PASSWORD`.
pub const ENV_PREFIX: &str = "PONTE";

/// Everything the main file configures. Unknown keys are errors, so a typo never silently falls
/// back to a default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub broker: BrokerSettings,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub log: LogSettings,
    #[serde(default)]
    pub paths: Paths,
    #[serde(default)]
    pub store: StoreSettings,
    #[serde(default)]
    pub delivery: DeliverySettings,
    #[serde(default)]
    pub ops: OpsSettings,
    #[serde(default)]
    pub runtime: RuntimeSettings,
}

/// The threads that run the partners' flows (receiving, checking, publishing, settling).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSettings {
    /// How many; 0, the default, is one per core. The partners are split into as many groups
    /// (of at most 64, each with its own connections), and each group runs on one of them
    /// (`shards`).
    pub workers: usize,
}

/// The ops endpoints (`/metrics`, `/healthz`, `/readyz`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsSettings {
    /// Address to serve them on; loopback by default; empty to switch them off.
    pub listen: String,
}

impl Default for OpsSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

/// Retries of copies a recipient could not take, and when to give up on them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySettings {
    /// Wait before the first retry; each later one waits twice as long (with jitter).
    pub retry_initial_ms: u64,
    /// Longest wait between two attempts.
    pub retry_max_ms: u64,
    /// Attempts (the first one included) after which a copy is dead-lettered.
    pub max_attempts: u32,
    /// Age after which a copy still not delivered is dead-lettered, whatever its attempts.
    pub max_age_secs: u64,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            retry_initial_ms: 1000,
            retry_max_ms: 300_000,
            max_attempts: 10,
            max_age_secs: 24 * 3600,
        }
    }
}

impl DeliverySettings {
    /// The waits of the broker-side delay queues: the initial one, doubled until the longest.
    pub fn delays_ms(&self) -> Vec<u64> {
        let initial = self.retry_initial_ms.max(1);
        let longest = self.retry_max_ms.max(initial);
        let mut delays = vec![initial];
        while let Some(&last) = delays.last()
            && last < longest
        {
            delays.push((last * 2).min(longest));
        }
        delays
    }

    /// The wait after the `attempt`th failed attempt (1-based), before jitter.
    pub fn delay_after(&self, attempt: u32) -> std::time::Duration {
        let delays = self.delays_ms();
        let index = (attempt.max(1) as usize - 1).min(delays.len() - 1);
        std::time::Duration::from_millis(delays[index])
    }

    /// Whether a copy that has failed `attempts` times, first `age` ago, is given up.
    pub fn exhausted(&self, attempts: u32, age: std::time::Duration) -> bool {
        attempts >= self.max_attempts.max(1) || age.as_secs() >= self.max_age_secs
    }
}

/// The embedded store: person and case crosswalks (and what later needs to survive restarts).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// Data folder, relative to the configuration folder; holds `ponte.db`. Created with
    /// owner-only permissions: it holds person identifiers.
    pub dir: PathBuf,
    /// How long the case crosswalk remembers a message, so that a later answer to it can be
    /// linked; the links between references themselves are kept.
    pub message_retention_days: u64,
    /// A message a sender publishes again (same `sender` and `message_id`) within this many days
    /// of its delivery is not delivered again; the sender gets a `duplicate` receipt.
    pub duplicate_window_days: u64,
    /// How long the delivery log keeps its records.
    pub log_retention_days: u64,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            dir: "../data".into(),
            message_retention_days: 400,
            duplicate_window_days: 7,
            log_retention_days: 400,
        }
    }
}

impl StoreSettings {
    pub fn duplicate_window(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.duplicate_window_days * 24 * 3600)
    }

    pub fn log_retention(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.log_retention_days * 24 * 3600)
    }

    pub fn message_retention(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.message_retention_days * 24 * 3600)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSettings {
    /// AMQP URL of the broker, without a password (`amqp://user@host:port/vhost`).
    pub url: String,
    /// Set only through `PONTE_BROKER__PASSWORD`; a password in a file is refused.
    pub password: Option<String>,
    /// First segment of every queue name: `<prefix>.in.<partner>` and so on. Lets several gateways
    /// (or test runs) share one broker.
    pub prefix: String,
    /// Unacknowledged inbound messages the broker may push per partner queue. Bounds memory and
    /// the number of publisher confirms in flight per flow. [`DEFAULT_PREFETCH`] unless set.
    pub prefetch: u16,
    /// Unacknowledged inbound messages across all partners: with many partners, each flow's
    /// prefetch shrinks so that the total stays under this, which bounds memory.
    pub max_in_flight: u32,
    /// Bytes of unacknowledged inbound messages across all partners. Prefetch counts messages;
    /// each message of a flow's window may hold this divided by the windows' total on average,
    /// and a flow whose recent messages are larger holds fewer at once (at least one), so that
    /// a backlog of large messages cannot take more than this (Ponte's memory for it is two to
    /// three times as much, with the parsed messages and their copies).
    pub max_in_flight_bytes: u64,
    /// Largest AMQP frame, in bytes; larger bodies are split into several frames, but a
    /// message's properties travel in one. At least the broker's own `frame_max` (RabbitMQ's
    /// default, 128 KiB, is the default here): whatever properties a publisher may send must
    /// fit, or the message ends the consuming connection at each delivery. The client keeps
    /// buffers of 32 frames per connection, so this also sets what a connection may take (up to
    /// 8 MiB at 128 KiB).
    pub frame_max: u32,
    /// How long a publish may wait for the broker's confirm before the message is treated as a
    /// transient failure and handed back to its queue.
    pub publish_timeout_secs: u64,
    /// How long opening a connection (TCP, TLS and the AMQP handshake) may take before it
    /// counts as failed and is tried again: a broker node starting or stopping, or a proxy
    /// whose broker is gone, may accept the connection and never answer.
    pub connect_timeout_secs: u64,
    /// How long opening a whole session may take — connecting, declaring the topology, opening
    /// every channel and starting every consumer — before it counts as failed and is tried
    /// again: a broker that accepts connections and then stops answering (a node busy or
    /// partitioned, still sending heartbeats) would otherwise hold the gateway not ready for
    /// ever.
    pub setup_timeout_secs: u64,
    /// Queue type the gateway declares: `classic` or `quorum`.
    pub queue_type: QueueType,
    /// Longest wait between reconnection attempts when the broker is unreachable.
    pub max_reconnect_delay_secs: u64,
    /// PEM file of certificate authorities to trust for the broker's certificate, besides the
    /// system's (a broker with a certificate of an institution's own authority); relative to
    /// the configuration folder. Only with an `amqps://` URL.
    pub ca_file: Option<PathBuf>,
    /// PEM file holding Ponte's client certificate chain and its private key, for a broker that
    /// requires one (`ssl_options.fail_if_no_peer_cert`, or the EXTERNAL mechanism); relative to
    /// the configuration folder. Only with an `amqps://` URL.
    pub client_identity_file: Option<PathBuf>,
}

/// `broker.prefetch` unless set. A busy flow's messages wait mostly for their recipients' queues
/// to confirm the copies, so its window, not the CPU, is what holds a drain back: 400 moved the
/// demo load 7–13% faster than 200 (one copy per message, 11–14%) for 5–10 MiB more, with the
/// same latency at half the maximum rate. The benchmark's no-op clients take the same window.
pub const DEFAULT_PREFETCH: u16 = 400;

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            url: "amqp://guest@127.0.0.1:5672/%2f".into(),
            password: None,
            prefix: "ponte".into(),
            prefetch: DEFAULT_PREFETCH,
            max_in_flight: 10_000,
            max_in_flight_bytes: 128 * 1024 * 1024,
            frame_max: 128 * 1024,
            publish_timeout_secs: 30,
            connect_timeout_secs: 30,
            setup_timeout_secs: 120,
            queue_type: QueueType::Classic,
            max_reconnect_delay_secs: 10,
            ca_file: None,
            client_identity_file: None,
        }
    }
}

impl BrokerSettings {
    /// Each flow's prefetch, in the order of `own` (the partners' own settings): a partner that
    /// sets one has it; the others share the rest of `max_in_flight` evenly, each getting
    /// `prefetch` or less when that many flows at `prefetch` would exceed it. Never below 1.
    pub fn prefetches(&self, own: &[Option<u16>]) -> Vec<u16> {
        let share = self.share(own);
        own.iter().map(|p| p.unwrap_or(share).max(1)).collect()
    }

    /// What the partners without a prefetch of their own share, when they start below
    /// `prefetch` and their windows follow their traffic ([`crate::prefetch`]).
    pub fn pool(&self, own: &[Option<u16>]) -> Option<crate::prefetch::Pool> {
        let others = own.iter().filter(|p| p.is_none()).count();
        crate::prefetch::Pool::new(self.unreserved(own), others, self.share(own), self.prefetch)
    }

    /// What each message of a window may hold on average, in bytes: `max_in_flight_bytes`
    /// divided by the most messages the flows may have unacknowledged at once (their
    /// prefetches, or `max_in_flight` when the windows follow the traffic).
    pub fn bytes_per_message(&self, own: &[Option<u16>]) -> u64 {
        let mut slots: u64 = self.prefetches(own).iter().map(|p| u64::from(*p)).sum();
        if self.pool(own).is_some() {
            slots = slots.max(u64::from(self.max_in_flight));
        }
        self.max_in_flight_bytes / slots.max(1)
    }

    /// `max_in_flight` less what the partners' own prefetches reserve.
    fn unreserved(&self, own: &[Option<u16>]) -> u32 {
        let reserved: u32 = own.iter().flatten().map(|p| u32::from(*p)).sum();
        self.max_in_flight.saturating_sub(reserved)
    }

    /// The starting prefetch of a partner without one of its own.
    fn share(&self, own: &[Option<u16>]) -> u16 {
        let others = own.iter().filter(|p| p.is_none()).count();
        let share = self.unreserved(own) as usize / others.max(1);
        share.clamp(1, usize::from(self.prefetch)) as u16
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Classic,
    Quorum,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest message body accepted; bigger ones are rejected with `too-large`.
    pub max_message_bytes: usize,
    /// Deepest nesting of arrays and objects accepted; deeper ones are rejected with `too-large`.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 1024 * 1024,
            max_depth: 32,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `ponte=debug,lapin=warn`); `RUST_LOG` overrides it.
    pub level: String,
    /// Also publish every delivery-log record, as JSON, to the topic exchange
    /// `<prefix>.events` (routing key `<step>.<sender>`), for an organisation's own log system.
    pub events_exchange: bool,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
            events_exchange: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the rest of the configuration lives, relative to the folder of the main file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Paths {
    pub schemas: PathBuf,
    pub partners: PathBuf,
    pub routes: PathBuf,
    /// The authorization matrix: who may send which type to whom, for what.
    pub authorization: PathBuf,
    /// Code tables (`offices.csv`, `codes.csv`), reloaded on SIGHUP.
    pub tables: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Self {
            schemas: "../schemas".into(),
            partners: "partners".into(),
            routes: "routes.toml".into(),
            authorization: "authorization.toml".into(),
            tables: "tables".into(),
        }
    }
}

/// Name of the main file inside the configuration folder.
pub const MAIN_FILE: &str = "ponte.toml";

impl Settings {
    /// The `[paths]` table of a main file that failed to load as a whole, so the rest of the
    /// configuration can still be checked in the same run.
    pub fn paths_only(dir: &Path) -> Paths {
        #[derive(Deserialize)]
        struct OnlyPaths {
            #[serde(default)]
            paths: Paths,
        }
        std::fs::read_to_string(dir.join(MAIN_FILE))
            .ok()
            .and_then(|text| {
                let table: toml::Table = text.parse().ok()?;
                let paths = table.get("paths")?.clone();
                let wrapped = toml::Table::from_iter([("paths".to_string(), paths)]);
                wrapped.try_into::<OnlyPaths>().ok()
            })
            .map(|p| p.paths)
            .unwrap_or_default()
    }

    /// Reads `<dir>/ponte.toml` and the environment, then applies `overrides` (dotted keys, as
    /// `broker.prefix`), which tools and tests use. Errors are returned as sentences.
    pub fn load(dir: &Path, overrides: &[(&str, &str)]) -> Result<Settings, Vec<String>> {
        let file = dir.join(MAIN_FILE);
        let text = std::fs::read_to_string(&file)
            .map_err(|e| vec![format!("cannot read {}: {e}", file.display())])?;
        let mut errors = Vec::new();
        // The password must not be written into a file that ends up in a repository or ConfigMap.
        match text.parse::<toml::Table>() {
            Ok(table) => {
                let in_file = table
                    .get("broker")
                    .and_then(|b| b.as_table())
                    .is_some_and(|b| b.contains_key("password"));
                if in_file {
                    errors.push(
                        "broker.password must not be set in a file; set PONTE_BROKER__PASSWORD in the environment"
                            .to_string(),
                    );
                }
                let url = table
                    .get("broker")
                    .and_then(|b| b.get("url"))
                    .and_then(|u| u.as_str());
                if let Some(url) = url
                    && url_has_password(url)
                {
                    errors.push(
                        "broker.url must not contain a password; set PONTE_BROKER__PASSWORD in the environment"
                            .to_string(),
                    );
                }
            }
            Err(e) => return Err(vec![format!("{e}")]),
        }
        let mut builder = config::Config::builder()
            .add_source(config::File::from(file.clone()).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("_")
                    .separator("__")
                    .source(Some(settings_variables())),
            );
        for (key, value) in overrides {
            builder = match builder.set_override(*key, *value) {
                Ok(b) => b,
                Err(e) => return Err(vec![e.to_string()]),
            };
        }
        let loaded = builder
            .build()
            .and_then(|c| c.try_deserialize::<Settings>());
        match loaded {
            Ok(mut settings) => {
                // An empty value (a template's unset variable) sets nothing.
                for file in [
                    &mut settings.broker.ca_file,
                    &mut settings.broker.client_identity_file,
                ] {
                    file.take_if(|f| f.as_os_str().is_empty());
                }
                errors.extend(settings.check());
                if errors.is_empty() {
                    Ok(settings)
                } else {
                    Err(errors)
                }
            }
            Err(e) => {
                errors.push(e.to_string());
                Err(errors)
            }
        }
    }

    fn check(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.broker.url.parse::<lapin::uri::AMQPUri>().is_err() {
            errors.push(format!(
                "broker.url {:?} is not an AMQP URL",
                self.broker.url
            ));
        }
        if !is_prefix(&self.broker.prefix) {
            errors.push(format!(
                "broker.prefix {:?} must be lower-case letters, digits, '-' and '.', starting with a letter",
                self.broker.prefix
            ));
        }
        if self.broker.prefetch == 0 {
            errors.push("broker.prefetch must be at least 1".into());
        }
        if self.broker.frame_max < 4096 {
            errors.push("broker.frame_max must be at least 4096 (AMQP's minimum)".into());
        }
        if self.broker.max_in_flight == 0 {
            errors.push("broker.max_in_flight must be at least 1".into());
        }
        if self.broker.max_in_flight_bytes < 1024 * 1024 {
            errors.push("broker.max_in_flight_bytes must be at least 1048576 (1 MiB)".into());
        }
        if self.broker.publish_timeout_secs == 0 {
            errors.push("broker.publish_timeout_secs must be at least 1".into());
        }
        if self.broker.connect_timeout_secs == 0 {
            errors.push("broker.connect_timeout_secs must be at least 1".into());
        }
        if self.broker.setup_timeout_secs == 0 {
            errors.push("broker.setup_timeout_secs must be at least 1".into());
        }
        let tls = self
            .broker
            .url
            .parse::<lapin::uri::AMQPUri>()
            .ok()
            .map(|u| u.scheme)
            == Some(lapin::uri::AMQPScheme::AMQPS);
        for (key, file) in [
            ("ca_file", &self.broker.ca_file),
            ("client_identity_file", &self.broker.client_identity_file),
        ] {
            if file.is_some() && !tls {
                errors.push(format!(
                    "broker.{key} is set but broker.url is not amqps://: the connection would not use TLS"
                ));
            }
        }
        let d = &self.delivery;
        if d.retry_initial_ms == 0 || d.max_attempts == 0 || d.retry_max_ms < d.retry_initial_ms {
            errors.push(
                "delivery: retry_initial_ms and max_attempts must be at least 1, retry_max_ms at least retry_initial_ms"
                    .into(),
            );
        }
        if self.limits.max_message_bytes == 0 || self.limits.max_depth == 0 {
            errors.push("limits.max_message_bytes and limits.max_depth must be at least 1".into());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            errors.push(format!("log.level {:?}: {e}", self.log.level));
        }
        errors
    }

    /// The broker user Ponte connects as, when `broker.url` names one (with EXTERNAL
    /// authentication the certificate is the login and the URL need not name it). Ponte's own
    /// replays carry it as `user_id`, which the broker checks, so that a flow can tell them from
    /// a sender's messages.
    pub fn broker_user(&self) -> Option<String> {
        let named = self
            .broker
            .url
            .split_once("://")
            .is_some_and(|(_, rest)| rest.split('/').next().is_some_and(|a| a.contains('@')));
        let uri = self.broker_uri().ok()?;
        let user = uri.authority.userinfo.username;
        (named && !user.is_empty()).then_some(user)
    }

    /// The broker URL with the password from the environment filled in.
    pub fn broker_uri(&self) -> Result<lapin::uri::AMQPUri, String> {
        let mut uri: lapin::uri::AMQPUri = self.broker.url.parse()?;
        if let Some(password) = &self.broker.password {
            uri.authority.userinfo.password = password.clone();
        }
        if uri.query.frame_max.is_none() {
            uri.query.frame_max = Some(self.broker.frame_max);
        }
        Ok(uri)
    }
}

/// The environment variables that address a setting: `PONTE_<SECTION>__<KEY>`. Others that
/// merely start with `PONTE_` (`PONTE_CONFIG_DIR`, scripts' own variables) are not settings and
/// must not trip the unknown-key check.
fn settings_variables() -> std::collections::HashMap<String, String> {
    let prefix = format!("{ENV_PREFIX}_");
    std::env::vars()
        .filter(|(k, _)| {
            k.strip_prefix(&prefix)
                .is_some_and(|rest| rest.contains("__"))
        })
        .collect()
}

fn url_has_password(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or("");
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

fn is_prefix(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_shrinks_with_many_partners_to_bound_memory() {
        let broker = BrokerSettings::default();
        assert_eq!(broker.prefetches(&[None; 4])[0], 400);
        assert_eq!(broker.prefetches(&vec![None; 100])[0], 100);
        assert_eq!(broker.prefetches(&vec![None; 1000])[0], 10);
        assert_eq!(broker.prefetches(&vec![None; 100_000])[0], 1);
    }

    #[test]
    fn windows_follow_the_traffic_only_where_the_bound_keeps_them_below_prefetch() {
        let broker = BrokerSettings::default();
        assert!(broker.pool(&[None; 4]).is_none());
        assert!(broker.pool(&[None; 25]).is_none());
        assert!(broker.pool(&[None; 26]).is_some());
        let pool = broker
            .pool(&vec![None; 1000])
            .expect("a thousand share 10,000");
        // Nothing left over at first: a flow grows only from what idle ones give back.
        assert_eq!(pool.next(10, 10, None), 10);
        assert_eq!(pool.next(10, 0, Some(0)), 4);
        assert_eq!(pool.next(10, 10, None), 16);
        // Partners with their own prefetch take no part: the one without has all it may.
        let mut own = vec![Some(200); 10];
        own.push(None);
        assert!(broker.pool(&own).is_none());
    }

    #[test]
    fn ponte_s_broker_user_is_the_one_the_url_names() {
        let user = |url: &str| {
            let mut settings = Settings::default();
            settings.broker.url = url.to_string();
            settings.broker_user()
        };
        assert_eq!(
            user("amqp://ponte@broker:5672/%2f").as_deref(),
            Some("ponte")
        );
        assert_eq!(
            user("amqp://ponte:secret@broker/ponte").as_deref(),
            Some("ponte")
        );
        assert_eq!(
            user("amqps://gateway.example@broker/%2f?auth_mechanism=external").as_deref(),
            Some("gateway.example")
        );
        // Without a user in the URL the client logs in as `guest`, or as its certificate says:
        // not a name to vouch for replays with.
        assert_eq!(user("amqps://broker/%2f?auth_mechanism=external"), None);
        assert_eq!(user("amqp://broker:5672/%2f"), None);
    }

    #[test]
    fn a_byte_bound_below_a_mebibyte_is_refused() {
        let mut settings = Settings::default();
        assert!(settings.check().is_empty(), "{:?}", settings.check());
        settings.broker.max_in_flight_bytes = 64 * 1024;
        assert_eq!(
            settings.check(),
            ["broker.max_in_flight_bytes must be at least 1048576 (1 MiB)"]
        );
    }

    #[test]
    fn the_byte_bound_is_shared_by_every_message_the_windows_may_hold() {
        let broker = BrokerSettings::default();
        // Five demo partners at 400 each: 2,000 messages may be unacknowledged at once.
        assert_eq!(
            broker.bytes_per_message(&[None; 5]),
            128 * 1024 * 1024 / 2000
        );
        // A thousand partners whose windows follow the traffic: up to `max_in_flight`.
        assert_eq!(
            broker.bytes_per_message(&vec![None; 1000]),
            128 * 1024 * 1024 / 10_000
        );
        let mut own = vec![None; 1000];
        own[0] = Some(200);
        assert_eq!(broker.bytes_per_message(&own), 128 * 1024 * 1024 / 10_000);
    }

    #[test]
    fn a_partner_s_own_prefetch_is_reserved_before_the_others_share_the_rest() {
        let broker = BrokerSettings::default();
        // The national institute and a thousand employment centres.
        let mut own = vec![None; 1001];
        own[0] = Some(200);
        let prefetches = broker.prefetches(&own);
        assert_eq!(prefetches[0], 200);
        assert!(
            prefetches[1..].iter().all(|p| *p == 9),
            "{:?}",
            &prefetches[..3]
        );
        let total: usize = prefetches.iter().map(|p| usize::from(*p)).sum();
        assert!(total <= broker.max_in_flight as usize, "{total}");
        // Own settings beyond the budget leave the others one message each, never none.
        assert_eq!(broker.prefetches(&[Some(20_000), None]), vec![20_000, 1]);
    }

    #[test]
    fn password_in_url_is_detected() {
        assert!(url_has_password("amqp://guest:guest@localhost:5672/%2f"));
        assert!(!url_has_password("amqp://guest@localhost:5672/%2f"));
        assert!(!url_has_password("amqp://localhost:5672/%2f"));
    }
}
