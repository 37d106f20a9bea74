//! Shared test harness: a real RabbitMQ (started by `scripts/test.sh`, URL in `TEST_BROKER_URL`),
//! a random queue prefix per test so tests run in parallel on one broker, the gateway run
//! in-process or as the real binary, and helpers to publish and drain queues in bulk.
#![allow(dead_code)]

pub mod raw;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use ponte::broker::Queues;
use ponte::directory::Directory;
use ponte::gateway::Status;
use ponte::pipeline::Pipeline;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shared test broker. Tests need a real one; `scripts/test.sh` starts it.
pub fn broker_url() -> String {
    std::env::var("TEST_BROKER_URL").expect(
        "TEST_BROKER_URL is not set: run the suite with scripts/test.sh, which starts a local RabbitMQ",
    )
}

pub fn random_prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// The in-process gateway's warnings and errors (or what `PONTE_TEST_LOG` asks for, e.g.
/// `ponte=debug`) go to the test's output, which the test runner shows when the test fails.
pub fn logs() {
    let filter = std::env::var("PONTE_TEST_LOG").unwrap_or_else(|_| "ponte=warn".to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}

/// The demo configuration pointed at `url` with its own queue prefix.
pub fn directory(url: &str, prefix: &str) -> Directory {
    directory_from(&repo().join("config"), url, prefix)
}

/// The data folder of the test using `prefix`.
pub fn data_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ponte-data-{prefix}"))
}

pub fn directory_from(config: &Path, url: &str, prefix: &str) -> Directory {
    directory_with(config, url, prefix, &[])
}

/// The configuration in `config` for a test under `prefix`, with settings changed by `extra`
/// (`("delivery.max_attempts", "3")`, …).
pub fn directory_with(config: &Path, url: &str, prefix: &str, extra: &[(&str, &str)]) -> Directory {
    let schemas = repo().join("schemas");
    let schemas = schemas.to_str().unwrap();
    let data = data_dir(prefix);
    let mut overrides = vec![
        ("broker.url", url),
        ("broker.prefix", prefix),
        ("paths.schemas", schemas),
        ("store.dir", data.to_str().unwrap()),
        ("broker.publish_timeout_secs", "10"),
        ("broker.max_reconnect_delay_secs", "1"),
        // Retries in tests come back within a second.
        ("delivery.retry_initial_ms", "200"),
        ("delivery.retry_max_ms", "1000"),
    ];
    overrides.extend_from_slice(extra);
    Directory::load_with_overrides(config, &overrides).unwrap_or_else(|e| panic!("{e}"))
}

/// The `ponte run` binary on the configuration in `config`, with the test's broker, prefix and
/// data folder.
/// Runs a `ponte` tool command (not the gateway) against the shared broker under `prefix`.
pub fn ponte(prefix: &str, args: &[&str]) -> std::process::Output {
    ponte_in(&repo().join("config"), prefix, args)
}

/// The same with the configuration in `config`.
pub fn ponte_in(config: &Path, prefix: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ponte"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("PONTE_BROKER__URL", broker_url())
        .env("PONTE_BROKER__PREFIX", prefix)
        .env("PONTE_STORE__DIR", data_dir(prefix))
        .output()
        .unwrap()
}

pub fn ponte_run(config: &Path, url: &str, prefix: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ponte"));
    command
        .args(["run", "--config"])
        .arg(config)
        .env("PONTE_BROKER__URL", url)
        .env("PONTE_BROKER__PREFIX", prefix)
        .env("PONTE_STORE__DIR", data_dir(prefix))
        // Many gateways run at once: each gets a port of its own for its ops endpoints.
        .env("PONTE_OPS__LISTEN", "127.0.0.1:0");
    command
}

/// A copy of the demo configuration in a fresh folder (schemas stay where they are), for tests
/// that change it; `change` edits the copy.
pub fn config_copy(change: impl FnOnce(&Path)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ponte-config-{}", uuid::Uuid::new_v4()));
    copy_dir(&repo().join("config"), &dir);
    let main = dir.join("ponte.toml");
    let text = std::fs::read_to_string(&main).unwrap().replace(
        "schemas = \"../schemas\"",
        &format!("schemas = {:?}", repo().join("schemas")),
    );
    std::fs::write(&main, text).unwrap();
    change(&dir);
    dir
}

/// A copy of the shared schemas in a fresh folder, for tests that change them (given to the
/// gateway as `paths.schemas`); `change` edits the copy.
pub fn schemas_copy(change: impl FnOnce(&Path)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ponte-schemas-{}", uuid::Uuid::new_v4()));
    copy_dir(&repo().join("schemas"), &dir);
    change(&dir);
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Deletes every queue of the configuration's partners under its prefix.
pub async fn delete_queues(directory: &Directory) {
    let queues = Queues::new(&directory.settings.broker.prefix);
    let connection = connect(&directory.settings.broker.url).await;
    let channel = connection.create_channel().await.unwrap();
    for partner in directory.partners.keys() {
        for queue in queues.of_partner(partner) {
            let _ = channel.queue_delete(queue.into(), Default::default()).await;
        }
    }
    for (queue, _) in ponte::broker::retry_queues(directory) {
        let _ = channel.queue_delete(queue.into(), Default::default()).await;
    }
    let _ = connection.close(200, "done".into()).await;
}

/// A gateway running inside the test process.
pub struct Gateway {
    pub directory: Arc<Directory>,
    pub pipeline: Arc<Pipeline>,
    pub queues: Queues,
    pub url: String,
    pub status: Status,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Gateway {
    /// Starts the demo configuration on the shared broker under a fresh prefix.
    pub async fn start() -> Gateway {
        Self::start_with(directory(&broker_url(), &random_prefix())).await
    }

    pub async fn start_with(directory: Directory) -> Gateway {
        let directory = Arc::new(directory);
        let pipeline = Arc::new(Pipeline::open(directory.clone()).expect("store opens"));
        Self::start_pipeline(pipeline).await
    }

    pub async fn start_pipeline(pipeline: Arc<Pipeline>) -> Gateway {
        logs();
        // The recorder [`recorded`] reads, installed before the gateway takes its metrics'
        // handles: a handle taken before it records nowhere, and every figure read back as 0.
        ponte::ops::metrics();
        let directory = pipeline.directory.clone();
        let shutdown = CancellationToken::new();
        let status = Status::default();
        let task = tokio::spawn(ponte::gateway::run(
            pipeline.clone(),
            shutdown.clone(),
            status.clone(),
        ));
        tokio::time::timeout(Duration::from_secs(30), status.ready())
            .await
            .expect("gateway ready within 30 s");
        Gateway {
            queues: Queues::new(&directory.settings.broker.prefix),
            url: directory.settings.broker.url.clone(),
            directory,
            pipeline,
            status,
            shutdown,
            task,
        }
    }

    /// Stops the gateway, leaving its queues for the test to inspect.
    pub async fn stop_keeping_queues(self) -> (Queues, String) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("gateway stops within 60 s")
            .unwrap()
            .expect("the gateway's threads started");
        (self.queues, self.url)
    }

    /// Stops the gateway and deletes the test's queues and data folder.
    pub async fn stop(self) {
        let directory = self.directory.clone();
        self.stop_keeping_queues().await;
        delete_queues(&directory).await;
        let _ = std::fs::remove_dir_all(ponte::pipeline::store_dir(&directory));
    }

    /// Publishes `message` to `partner`'s inbound queue.
    pub async fn send(&self, partner: &str, message: &Value) {
        self.send_raw(partner, &serde_json::to_vec(message).unwrap())
            .await;
    }

    pub async fn send_raw(&self, partner: &str, body: &[u8]) {
        publish_many(&self.url, &self.queues.inbound(partner), &[body.to_vec()]).await;
    }

    /// Waits for `count` messages on `queue` and returns them.
    pub async fn take(&self, queue: &str, count: usize) -> Vec<Message> {
        drain(&self.url, queue, count, Duration::from_secs(20)).await
    }

    /// The receipt for one message the partner sent.
    pub async fn receipt(&self, partner: &str) -> Value {
        let mut r = self.take(&self.queues.receipts(partner), 1).await;
        assert_eq!(r.len(), 1, "expected one receipt for {partner}");
        r.remove(0).json()
    }

    /// Asserts that nothing more arrives on `queue` within a short wait.
    pub async fn assert_empty(&self, queue: &str) {
        let extra = drain(&self.url, queue, 1, Duration::from_millis(500)).await;
        assert!(
            extra.is_empty(),
            "{queue} should be empty, got {:?}",
            extra[0].text()
        );
    }

    async fn assert_empty_owned(&self, queue: String) {
        self.assert_empty(&queue).await;
    }

    /// Sends `message` as `partner` and returns its rejection receipt and parked original,
    /// checking that no partner received anything.
    pub async fn expect_rejection(&self, partner: &str, body: &[u8]) -> (Value, Message) {
        self.send_raw(partner, body).await;
        let receipt = self.receipt(partner).await;
        let parked = self.take(&self.queues.rejected(partner), 1).await;
        assert_eq!(
            parked.len(),
            1,
            "the original is parked in {}",
            self.queues.rejected(partner)
        );
        let checks = self
            .directory
            .partners
            .keys()
            .map(|p| self.assert_empty_owned(self.queues.outbound(p)));
        futures_util::future::join_all(checks).await;
        (receipt, parked.into_iter().next().unwrap())
    }
}

/// A message taken from a queue.
#[derive(Debug, Clone)]
pub struct Message {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

impl Message {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        ponte::deliver::header(&self.properties, name)
    }
}

pub async fn connect(url: &str) -> Connection {
    let mut uri: lapin::uri::AMQPUri = url.parse().unwrap();
    if uri.authority.userinfo.password.is_empty() {
        uri.authority.userinfo.password = "guest".into();
    }
    Connection::connect_uri(uri, ConnectionProperties::default())
        .await
        .expect("test broker reachable")
}

/// Publishes persistent messages with pipelined confirms, as a partner's back office would.
pub async fn publish_many(url: &str, queue: &str, bodies: &[Vec<u8>]) {
    let connection = connect(url).await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // The gateway declares its queues; declaring here too lets a test publish before it starts.
    declare(&connection, &channel, queue).await;
    let mut pending = Vec::with_capacity(bodies.len());
    for body in bodies {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        pending.push(
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await
                .unwrap(),
        );
        if pending.len() >= 500 {
            for c in pending.drain(..) {
                assert!(c.await.unwrap().is_ack());
            }
        }
    }
    for c in pending {
        assert!(c.await.unwrap().is_ack());
    }
    connection.close(200, "done".into()).await.unwrap();
}

/// Declares `queue` (classic) unless it exists: a queue the gateway or the test declared first
/// keeps its type (a quorum queue redeclared as classic would close the channel).
async fn declare(connection: &Connection, channel: &lapin::Channel, queue: &str) {
    let probe = connection.create_channel().await.unwrap();
    if ponte::broker::ready(&probe, queue).await.is_ok() {
        let _ = probe.close(200, "exists".into()).await;
        return;
    }
    ponte::broker::declare_queue(channel, queue, ponte::settings::QueueType::Classic, true)
        .await
        .unwrap();
}

/// Takes up to `count` messages from `queue`, returning once `count` arrived or once no message
/// came for `wait` (so a long queue is read whole however busy the machine). Each message taken
/// is acknowledged; the rest stay in the queue (those the broker had already pushed return to it
/// when the connection closes), so a test may take one message at a time.
pub async fn drain(url: &str, queue: &str, count: usize, wait: Duration) -> Vec<Message> {
    let connection = connect(url).await;
    let channel = connection.create_channel().await.unwrap();
    declare(&connection, &channel, queue).await;
    let window = u16::try_from(count.clamp(1, 1000)).unwrap();
    channel
        .basic_qos(window, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while out.len() < count {
        match tokio::time::timeout(wait, consumer.next()).await {
            Ok(Some(Ok(d))) => {
                d.acker.ack(BasicAckOptions::default()).await.unwrap();
                out.push(Message {
                    body: d.data,
                    properties: d.properties,
                });
            }
            _ => break,
        }
    }
    let _ = connection.close(200, "done".into()).await;
    out
}

/// Waits until `queue` holds `n` ready messages; fails the test after `within`.
pub async fn wait_for_depth(url: &str, queue: &str, n: u32, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    while depth(url, queue).await != n {
        assert!(
            std::time::Instant::now() < deadline,
            "{queue} did not reach {n} messages within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A loopback port free at the time of asking, for a process the test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Number of ready messages in `queue` (0 while it does not exist yet).
pub async fn depth(url: &str, queue: &str) -> u32 {
    let connection = connect(url).await;
    let channel = connection.create_channel().await.unwrap();
    let Ok(ready) = ponte::broker::ready(&channel, queue).await else {
        return 0;
    };
    let _ = connection.close(200, "done".into()).await;
    ready
}

/// How many consumers `queue` has, `None` while it does not exist.
pub async fn consumers(url: &str, queue: &str) -> Option<u32> {
    let connection = connect(url).await;
    let channel = connection.create_channel().await.unwrap();
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, Default::default())
        .await
        .ok()
        .map(|queue| queue.consumer_count());
    let _ = connection.close(200, "done".into()).await;
    declared
}

/// Waits until `queue` exists with at least `consumers` consumers.
pub async fn declared_with(url: &str, queue: &str, at_least: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while consumers(url, queue).await < Some(at_least) {
        assert!(
            std::time::Instant::now() < deadline,
            "{queue} declared with {at_least} consumers"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `done`, polling every 50 ms; fails the test saying `what` after `within`.
pub async fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sum of a metric's samples whose labels contain every one of `labels`, from this process's
/// recorder (a gateway run in-process).
pub fn recorded(name: &str, labels: &[&str]) -> f64 {
    ponte::ops::metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The flow `labels` name, and no other, was started again, once; the in-process gateway never
/// reconnected and is ready.
pub fn assert_restarted_alone_once(gw: &Gateway, labels: &[&str]) {
    let restarts = "ponte_flow_restarts_total";
    assert_eq!(recorded(restarts, labels), 1.0);
    assert_eq!(recorded(restarts, &[]), 1.0, "no other flow restarted");
    assert_eq!(recorded("ponte_broker_reconnects_total", &[]), 0.0);
    assert!(gw.status.is_ready());
}

pub async fn delete_queue(url: &str, queue: &str) {
    let connection = connect(url).await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(queue.into(), Default::default())
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
}

/// Runs `rabbitmqctl ARGS` against the shared test broker (`TEST_BROKER_NODE`, set by
/// `scripts/test.sh`).
pub fn shared_broker_ctl(args: &[&str]) {
    shared_broker_ctl_output(args);
}

/// The same, returning what `rabbitmqctl` printed.
pub fn shared_broker_ctl_output(args: &[&str]) -> String {
    let output = shared_broker_ctl_command(args)
        .output()
        .expect("scripts/broker.sh runs");
    assert!(output.status.success(), "rabbitmqctl {args:?} failed");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `rabbitmqctl args` against the shared broker, to run.
fn shared_broker_ctl_command(args: &[&str]) -> Command {
    let node =
        std::env::var("TEST_BROKER_NODE").expect("TEST_BROKER_NODE is set by scripts/test.sh");
    let mut command = Command::new(repo().join("scripts/broker.sh"));
    command.arg("ctl").args(node.split(' ')).args(args);
    command
}

/// A sending partner's broker user of its own on the shared broker, as in production (the
/// gateway's user is another), allowed everything on `/`; deleted when dropped. `url` logs in
/// as it, on the broker at `broker_url`.
pub struct SenderUser {
    pub name: String,
    pub url: String,
}

impl SenderUser {
    pub fn create(broker_url: &str, name: &str) -> SenderUser {
        shared_broker_ctl(&["add_user", name, "sender-secret"]);
        shared_broker_ctl(&["set_permissions", "-p", "/", name, ".*", ".*", ".*"]);
        let broker: lapin::uri::AMQPUri = broker_url.parse().unwrap();
        let url = format!(
            "amqp://{name}:sender-secret@{}:{}/%2f",
            broker.authority.host, broker.authority.port
        );
        SenderUser {
            name: name.to_string(),
            url,
        }
    }
}

impl Drop for SenderUser {
    fn drop(&mut self) {
        // Not asserted: a test that failed is unwinding already.
        let _ = shared_broker_ctl_command(&["delete_user", &self.name]).output();
    }
}

/// A `ponte` process that is killed if the test ends without stopping it (a failed assertion),
/// so no gateway outlives its test.
pub struct Running(pub Option<std::process::Child>);

impl Running {
    /// SIGTERM, then waits: the gateway must stop cleanly (exit 0).
    pub fn stop(mut self) {
        let mut child = self.0.take().expect("running");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert!(child.wait().unwrap().success(), "ponte exits 0 on SIGTERM");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A RabbitMQ node of the test's own, for tests that stop or kill the broker.
pub struct PrivateBroker {
    pub name: String,
    pub port: u16,
    pub dir: PathBuf,
}

impl PrivateBroker {
    pub fn start() -> PrivateBroker {
        Self::start_with_plugins("")
    }

    /// Starts a node with these plugins enabled (comma-separated, e.g. `rabbitmq_shovel`).
    pub fn start_with_plugins(plugins: &str) -> PrivateBroker {
        Self::start_with(plugins, &[])
    }

    /// The same, with more of `scripts/broker.sh`'s settings (`PONTE_BROKER_TLS_PORT`, …).
    pub fn start_with(plugins: &str, env: &[(&str, &str)]) -> PrivateBroker {
        let id = uuid::Uuid::new_v4().simple().to_string();
        // 16000–20999, its distribution port (`broker.sh`: 6000 above) 22000–26999: apart from
        // each other, from the fixed nodes' (5673–5691 and 11673–11691), and below the ephemeral
        // range, where an outgoing connection may hold a port when the node wants it.
        let port = 16000 + (u16::from_str_radix(&id[..4], 16).unwrap() % 5000);
        let broker = PrivateBroker {
            name: format!("fault-{}", &id[..8]),
            port,
            dir: repo().join("target/test-brokers").join(&id[..8]),
        };
        let status = Command::new(repo().join("scripts/broker.sh"))
            .args([
                "start",
                &broker.name,
                &broker.port.to_string(),
                broker.dir.to_str().unwrap(),
            ])
            .env("PONTE_BROKER_PLUGINS", plugins)
            .envs(env.iter().copied())
            .status()
            .expect("scripts/broker.sh runs");
        assert!(status.success(), "broker.sh start failed");
        broker
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Runs `rabbitmqctl ARGS` against this node and returns what it printed.
    pub fn ctl(&self, args: &[&str]) -> String {
        let output = Command::new(repo().join("scripts/broker.sh"))
            .args(["ctl", &self.name, &self.port.to_string()])
            .arg(&self.dir)
            .args(args)
            .output()
            .expect("scripts/broker.sh runs");
        assert!(output.status.success(), "rabbitmqctl {args:?} failed");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    pub fn script(&self, command: &str) {
        let status = Command::new(repo().join("scripts/broker.sh"))
            .args([
                command,
                &self.name,
                &self.port.to_string(),
                self.dir.to_str().unwrap(),
            ])
            .status()
            .expect("scripts/broker.sh runs");
        assert!(status.success(), "broker.sh {command} failed");
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.script("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sample messages of the demo institutions.
pub fn referral(sender: &str, office: &str, municipality: &str) -> Value {
    json!({
        "message_id": uuid::Uuid::new_v4().to_string(),
        "type": "referral",
        "version": "1.0",
        "sender": sender,
        "sent_at": "2026-11-23T09:15:00+01:00",
        "subject": {"identifiers": [{"scheme": "it.cf", "value": "RSSMRA85T10A562S"}]},
        "payload": {
            "referral_id": "REF-2026-0001",
            "reason": "did-registered",
            "office": office,
            "municipality": municipality,
            "legal_basis": "D.Lgs. 150/2015 art. 19",
            "consent": {"given": true}
        }
    })
}

pub fn benefit_status(benefit: &str, municipality: &str) -> Value {
    json!({
        "message_id": uuid::Uuid::new_v4().to_string(),
        "type": "benefit-status",
        "version": "1.0",
        "sender": "inps",
        "sent_at": "2026-11-23T10:02:00+01:00",
        "subject": {"identifiers": [{"scheme": "it.cf", "value": "BNCGVN70A41F257X"}]},
        "payload": {
            "benefit": benefit,
            "application_id": "APP-2026-4471",
            "status": "suspended",
            "effective_date": "2026-12-01",
            "office": "3600",
            "municipality": municipality,
            "reason_code": "NC-01"
        }
    })
}

/// Makes the broker nack every publish to `queue` (a full queue that refuses new messages), until
/// the returned policy is cleared.
pub fn refuse_publishes(gw: &Gateway, queue: &str) -> String {
    let policy = format!("full-{}", gw.queues.prefix);
    let pattern = format!("^{}$", queue.replace('.', "\\."));
    shared_broker_ctl(&[
        "set_policy",
        "--apply-to",
        "queues",
        &policy,
        &pattern,
        r#"{"max-length": 0, "overflow": "reject-publish"}"#,
    ]);
    policy
}

/// A certificate authority of the test's own, a server certificate for `localhost` and two
/// client identities (certificate chain and key in one PEM file): one it signed, one
/// self-signed. Made with `openssl` (which `scripts/test.sh` installs).
pub struct Certificates {
    pub dir: PathBuf,
}

impl Certificates {
    pub fn make(dir: &Path) -> Certificates {
        std::fs::create_dir_all(dir).unwrap();
        let openssl = |args: &[&str]| {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl runs");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let self_signed = |name: &str, subject: &str| {
            let (key_file, pem_file) = (format!("{name}.key"), format!("{name}.pem"));
            let mut args = vec!["req", "-x509", "-days", "2", "-subj", subject];
            args.extend(key);
            args.extend(["-keyout", &key_file, "-out", &pem_file]);
            openssl(&args);
        };
        self_signed("ca", "/CN=Ponte test authority");
        self_signed("stranger", "/CN=ponte-stranger");
        for (name, extension) in [
            ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
            ("client", "extendedKeyUsage=clientAuth"),
        ] {
            let (key_file, csr, pem, ext) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            std::fs::write(dir.join(&ext), format!("{extension}\n")).unwrap();
            let mut args = vec!["req", "-subj"];
            let subject = format!("/CN=ponte-{name}");
            args.push(&subject);
            args.extend(key);
            args.extend(["-keyout", &key_file, "-out", &csr]);
            openssl(&args);
            openssl(&[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-extfile",
                &ext,
                "-out",
                &pem,
            ]);
        }
        for name in ["client", "stranger"] {
            let identity = [
                std::fs::read(dir.join(format!("{name}.pem"))).unwrap(),
                std::fs::read(dir.join(format!("{name}.key"))).unwrap(),
            ]
            .concat();
            std::fs::write(dir.join(format!("{name}-identity.pem")), identity).unwrap();
        }
        Certificates {
            dir: dir.to_path_buf(),
        }
    }

    /// In a fresh folder of its own under `target/test-tls`.
    pub fn fresh() -> Certificates {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self::make(&repo().join("target/test-tls").join(&id[..8]))
    }

    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }
}

/// TCP accepted, then TLS: a client that fails the handshake (no certificate, or one of another
/// authority) is dropped and the next one accepted.
pub struct TlsListener {
    tcp: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    /// Every client accepted, by its certificate (as text: its names are readable in it).
    pub subjects: Arc<std::sync::Mutex<Vec<String>>>,
}

impl TlsListener {
    /// Asserts that clients connected and that every one showed Ponte's certificate.
    pub fn assert_only_ponte_connected(subjects: &std::sync::Mutex<Vec<String>>, server: &str) {
        let subjects = subjects.lock().unwrap();
        assert!(
            !subjects.is_empty() && subjects.iter().all(|s| s.contains("ponte-client")),
            "the {server} saw Ponte's certificate: {subjects:?}"
        );
    }

    /// On a loopback port of its own, with the server certificate of `certs`, requiring a
    /// client certificate of its authority.
    pub async fn bind(certs: &Certificates) -> TlsListener {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls;
        let pem = |name: &str| std::fs::read(certs.dir.join(name)).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut authority = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(&pem("ca.pem")) {
            authority.add(certificate.unwrap()).unwrap();
        }
        let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
            authority.into(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let chain = CertificateDer::pem_slice_iter(&pem("server.pem"))
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(&pem("server.key")).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(clients)
            .with_single_cert(chain, key)
            .unwrap();
        TlsListener {
            tcp: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            subjects: Arc::default(),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, address)) = self.tcp.accept().await else {
                continue;
            };
            let Ok(stream) = self.tls.accept(tcp).await else {
                continue;
            };
            // The subject is DER; its common name is readable text inside it.
            if let Some(certificate) = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
            {
                let text = String::from_utf8_lossy(certificate.as_ref()).into_owned();
                self.subjects.lock().unwrap().push(text);
            }
            return (stream, address);
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
