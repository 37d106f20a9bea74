//! The ops endpoints of a running `ponte run`: metrics count exactly what was sent, `/healthz`
//! answers while the process lives, and `/readyz` turns not-ready while the broker is stopped and
//! ready again once it is back.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{PrivateBroker, Running, broker_url, publish_many, random_prefix, referral, repo};
use ponte::broker::Queues;

fn start(url: &str, prefix: &str, port: u16) -> Running {
    start_with(url, prefix, port, &[])
}

/// The same with more settings from the environment (`("PONTE_RUNTIME__WORKERS", "1")`, …).
fn start_with(url: &str, prefix: &str, port: u16, settings: &[(&str, &str)]) -> Running {
    let child = common::ponte_run(&repo().join("config"), url, prefix)
        .env("PONTE_OPS__LISTEN", format!("127.0.0.1:{port}"))
        .env("PONTE_BROKER__MAX_RECONNECT_DELAY_SECS", "1")
        .env("PONTE_LOG__LEVEL", "warn")
        .envs(settings.iter().copied())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Running(Some(child))
}

/// The names of the threads of the process `pid`.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).unwrap())
        .map(|name| name.trim().to_string())
        .collect()
}

async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let client = ponte::resolve::http_client(Duration::from_secs(2))
        .build()
        .unwrap();
    let response = client
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.unwrap_or_default()))
}

async fn wait_for(what: &str, within: Duration, port: u16, path: &str, status: u16) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some((s, body)) = get(port, path).await
            && s == status
        {
            return body;
        }
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The sum of a metric's samples whose labels contain every one of `labels`.
fn total(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_count_the_messages_sent_and_the_probes_answer() {
    let (url, prefix, port) = (broker_url(), random_prefix(), common::free_port());
    let child = start(&url, &prefix, port);
    wait_for("ready", Duration::from_secs(30), port, "/readyz", 200).await;
    assert_eq!(get(port, "/healthz").await.unwrap().0, 200);

    let queues = Queues::new(&prefix);
    let mut bodies: Vec<Vec<u8>> = (0..5)
        .map(|_| serde_json::to_vec(&referral("cpi-modena", "CPI-MO-01", "036023")).unwrap())
        .collect();
    bodies.push(b"not json".to_vec());
    let mut wrong = referral("cpi-modena", "CPI-MO-01", "036023");
    wrong["payload"]["reason"] = "because".into();
    bodies.push(serde_json::to_vec(&wrong).unwrap());
    publish_many(&url, &queues.inbound("cpi-modena"), &bodies).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let (_, metrics) = get(port, "/metrics").await.unwrap();
        // A scrape reads the counters, then the histograms: a message settled in between shows
        // in its latency and not yet in its outcome's counter, so wait for both.
        if total(&metrics, "ponte_latency_seconds_count", &[]) >= 7.0
            && total(&metrics, "ponte_messages_total", &[]) >= 7.0
        {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "seven messages settled:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let messages = "ponte_messages_total";
    let sender = "sender=\"cpi-modena\"";
    assert_eq!(
        total(&metrics, messages, &[sender, "outcome=\"delivered\""]),
        5.0
    );
    assert_eq!(
        total(
            &metrics,
            messages,
            &[sender, "type=\"referral\"", "code=\"delivered\""]
        ),
        5.0
    );
    assert_eq!(total(&metrics, messages, &["code=\"invalid-json\""]), 1.0);
    assert_eq!(
        total(&metrics, messages, &["code=\"schema-violation\""]),
        1.0
    );
    assert_eq!(total(&metrics, messages, &[]), 7.0);
    assert_eq!(total(&metrics, "ponte_latency_seconds_count", &[]), 7.0);
    assert_eq!(
        total(&metrics, "ponte_copies_in_flight", &["recipient=\"inps\""]),
        0.0
    );
    assert_eq!(total(&metrics, "ponte_ready", &[]), 1.0);
    // Exported before anything is dropped, so an alert on its increase sees it from the start.
    assert!(
        metrics.contains("ponte_log_lines_dropped_total 0"),
        "{metrics}"
    );
    // Five demo partners at `broker.prefetch` 400 share `broker.max_in_flight_bytes` (128 MiB):
    // 67 KB a message. A flow that has received nothing yet takes its messages to be as
    // large as `limits.max_message_bytes` (1 MiB) allows: 25 at once.
    assert_eq!(
        total(&metrics, "ponte_prefetch", &["partner=\"comune-modena\""]),
        25.0
    );
    assert!(
        metrics.contains("# TYPE ponte_latency_seconds histogram"),
        "{metrics}"
    );
    // The employment centre's messages are small: within a few seconds it has the whole window.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = get(port, "/metrics").await.unwrap();
        let prefetch = total(&metrics, "ponte_prefetch", &["partner=\"cpi-modena\""]);
        if prefetch == 400.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cpi-modena's prefetch stayed at {prefetch}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Each delivered message looked for a duplicate and recorded its case, then its delivery.
    assert!(
        total(&metrics, "ponte_store_wait_seconds_count", &[]) >= 15.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE ponte_store_wait_seconds histogram"),
        "{metrics}"
    );
    child.stop();
    common::delete_queues(&common::directory(&url, &prefix)).await;
}

#[tokio::test]
async fn readyz_is_not_ready_while_the_broker_is_stopped_and_ready_again_after() {
    let broker = PrivateBroker::start();
    let (prefix, port) = (random_prefix(), common::free_port());
    let child = start(&broker.url(), &prefix, port);
    wait_for("ready", Duration::from_secs(30), port, "/readyz", 200).await;

    broker.script("stop");
    let why = wait_for("not ready", Duration::from_secs(30), port, "/readyz", 503).await;
    assert!(why.contains("broker"), "{why}");
    assert_eq!(
        get(port, "/healthz").await.unwrap().0,
        200,
        "alive all along"
    );

    broker.script("start");
    wait_for("ready again", Duration::from_secs(60), port, "/readyz", 200).await;
    let (_, metrics) = get(port, "/metrics").await.unwrap();
    assert!(
        total(&metrics, "ponte_broker_reconnects_total", &[]) >= 1.0,
        "{metrics}"
    );
    child.stop();
}

/// The gateway's threads do not grow with its broker connections: each connection's socket is
/// read and written by a task of the runtime, not by a thread of its own (lapin's I/O loop, as
/// Ponte's copy of lapin runs it; with the published crate each connection had its thread, and
/// every frame crossed between it and the runtime's workers).
#[tokio::test]
async fn the_gateway_has_no_thread_per_broker_connection() {
    let (url, prefix, port) = (broker_url(), random_prefix(), common::free_port());
    let child = start(&url, &prefix, port);
    wait_for("ready", Duration::from_secs(30), port, "/readyz", 200).await;
    let names = thread_names(child.0.as_ref().unwrap().id());
    // Ready: the demo's partners and the redelivery flow hold four connections open.
    assert!(
        !names.iter().any(|name| name.starts_with("lapin")),
        "{names:?}"
    );
    child.stop();
    common::delete_queues(&common::directory(&url, &prefix)).await;
}

/// `runtime.workers` sets how many threads run the flows (`/metrics` says how many there are,
/// and so do the threads' names), and the gateway works on one: it delivers a referral.
#[tokio::test]
async fn the_gateway_runs_its_flows_on_the_workers_configured() {
    let (url, prefix, port) = (broker_url(), random_prefix(), common::free_port());
    let workers = async || {
        let (_, metrics) = get(port, "/metrics").await.unwrap();
        total(&metrics, "ponte_runtime_workers", &[])
    };
    let flows_threads = |child: &Running| {
        let mut names: Vec<String> = thread_names(child.0.as_ref().unwrap().id())
            .into_iter()
            .filter(|name| name.starts_with(ponte::shards::THREAD))
            .collect();
        names.sort();
        names
    };
    let child = start_with(&url, &prefix, port, &[("PONTE_RUNTIME__WORKERS", "1")]);
    wait_for("ready", Duration::from_secs(30), port, "/readyz", 200).await;
    assert_eq!(workers().await, 1.0);
    assert_eq!(flows_threads(&child), ["ponte-flows-0"]);
    let queues = Queues::new(&prefix);
    let body = serde_json::to_vec(&referral("cpi-modena", "CPI-MO-01", "036023")).unwrap();
    publish_many(&url, &queues.inbound("cpi-modena"), &[body]).await;
    let delivered = common::drain(&url, &queues.outbound("inps"), 1, Duration::from_secs(20)).await;
    assert_eq!(delivered.len(), 1, "the referral reached INPS");
    child.stop();

    let child = start(&url, &prefix, port);
    wait_for("ready", Duration::from_secs(30), port, "/readyz", 200).await;
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(workers().await, cores as f64, "one per core by default");
    let mut expected: Vec<String> = (0..cores).map(|i| format!("ponte-flows-{i}")).collect();
    expected.sort();
    assert_eq!(flows_threads(&child), expected);
    child.stop();
    common::delete_queues(&common::directory(&url, &prefix)).await;
}

/// The metrics once `name` (with `labels`) has reached `at_least`.
async fn metrics_once(port: u16, name: &str, labels: &[&str], at_least: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, metrics) = get(port, "/metrics").await.unwrap();
        if total(&metrics, name, labels) >= at_least {
            return metrics;
        }
        assert!(Instant::now() < deadline, "{name} {labels:?}:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A partner's inbound queue deleted under a running gateway (an operator's mistake) cancels
/// that partner's consumer: its flow alone starts again and declares the queue again, while the
/// session, and with it every other partner's flow, goes on (no reconnect); the partner's new
/// messages are delivered.
#[tokio::test]
async fn a_deleted_inbound_queue_restarts_its_partner_s_flow_alone() {
    let (url, prefix, port) = (broker_url(), random_prefix(), common::free_port());
    let child = start(&url, &prefix, port);
    wait_for("ready", Duration::from_secs(30), port, "/readyz", 200).await;
    let queues = Queues::new(&prefix);
    let inbound = &queues.inbound("cpi-modena");

    common::delete_queue(&url, inbound).await;
    let restarts = "ponte_flow_restarts_total";
    let metrics = metrics_once(
        port,
        restarts,
        &["flow=\"inbound\"", "partner=\"cpi-modena\""],
        1.0,
    )
    .await;
    common::declared_with(&url, inbound, 1).await;
    assert_eq!(total(&metrics, restarts, &[]), 1.0, "{metrics}");
    for sender in ["cpi-modena", "cpi-bologna"] {
        let body = serde_json::to_vec(&referral(sender, "CPI-MO-01", "036023")).unwrap();
        publish_many(&url, &queues.inbound(sender), &[body]).await;
    }
    let delivered = common::drain(&url, &queues.outbound("inps"), 2, Duration::from_secs(20)).await;
    assert_eq!(delivered.len(), 2, "both partners' referrals reached INPS");

    assert_one_flow_restarted_once(port).await;
    child.stop();
    common::delete_queues(&common::directory(&url, &prefix)).await;
}

/// One flow, and no other, was started again, once; the session never reconnected and the
/// gateway is ready.
async fn assert_one_flow_restarted_once(port: u16) {
    let (_, metrics) = get(port, "/metrics").await.unwrap();
    assert_eq!(
        total(&metrics, "ponte_broker_reconnects_total", &[]),
        0.0,
        "{metrics}"
    );
    assert_eq!(
        total(&metrics, "ponte_flow_restarts_total", &[]),
        1.0,
        "{metrics}"
    );
    assert_eq!(get(port, "/readyz").await.unwrap().0, 200);
}

/// A recipient's outbound queue deleted under a running gateway: the copy for it comes back
/// unroutable, the referral goes back to its queue, and the sender's flow alone starts again,
/// declaring the topology again; the referral then reaches the recipient, with no reconnect.
#[tokio::test]
async fn a_deleted_recipient_queue_is_declared_again_and_the_copy_reaches_it() {
    let (url, prefix, port) = (broker_url(), random_prefix(), common::free_port());
    let child = start(&url, &prefix, port);
    wait_for("ready", Duration::from_secs(30), port, "/readyz", 200).await;
    let queues = Queues::new(&prefix);
    common::delete_queue(&url, &queues.outbound("inps")).await;

    let referral = referral("cpi-modena", "CPI-MO-01", "036023");
    let body = serde_json::to_vec(&referral).unwrap();
    publish_many(&url, &queues.inbound("cpi-modena"), &[body]).await;
    let restarts = "ponte_flow_restarts_total";
    metrics_once(port, restarts, &["partner=\"cpi-modena\""], 1.0).await;
    // Taking from the queue declares it: only once the gateway has.
    common::declared_with(&url, &queues.outbound("inps"), 0).await;
    let delivered = common::drain(&url, &queues.outbound("inps"), 1, Duration::from_secs(30)).await;
    assert_eq!(delivered.len(), 1, "the referral reached INPS");
    assert_eq!(delivered[0].json()["message_id"], referral["message_id"]);

    let (_, metrics) = get(port, "/metrics").await.unwrap();
    assert!(
        total(&metrics, restarts, &["partner=\"cpi-modena\""]) >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        total(&metrics, restarts, &[]),
        total(&metrics, restarts, &["partner=\"cpi-modena\""]),
        "no other flow restarted: {metrics}"
    );
    assert_eq!(
        total(&metrics, "ponte_broker_reconnects_total", &[]),
        0.0,
        "{metrics}"
    );
    child.stop();
    common::delete_queues(&common::directory(&url, &prefix)).await;
}

/// The redelivery queue deleted under a running gateway cancels the redelivery flow's consumer:
/// that flow alone starts again and declares its queue again; the partners' flows and the
/// session go on (no reconnect).
#[tokio::test]
async fn a_deleted_redelivery_queue_restarts_the_redelivery_flow_alone() {
    let (url, prefix, port) = (broker_url(), random_prefix(), common::free_port());
    let child = start(&url, &prefix, port);
    wait_for("ready", Duration::from_secs(30), port, "/readyz", 200).await;
    let queues = Queues::new(&prefix);

    common::delete_queue(&url, &queues.redeliver()).await;
    let restarts = "ponte_flow_restarts_total";
    let metrics = metrics_once(port, restarts, &["flow=\"redelivery\""], 1.0).await;
    common::declared_with(&url, &queues.redeliver(), 1).await;
    assert_eq!(total(&metrics, restarts, &[]), 1.0, "{metrics}");
    let body = serde_json::to_vec(&referral("cpi-modena", "CPI-MO-01", "036023")).unwrap();
    publish_many(&url, &queues.inbound("cpi-modena"), &[body]).await;
    let delivered = common::drain(&url, &queues.outbound("inps"), 1, Duration::from_secs(20)).await;
    assert_eq!(delivered.len(), 1, "the referral reached INPS");

    assert_one_flow_restarted_once(port).await;
    child.stop();
    common::delete_queues(&common::directory(&url, &prefix)).await;
}
