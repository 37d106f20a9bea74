//! What ops see: one structured INFO event per message outcome, in JSON when configured, with
//! the fields to find a message by — and never a person identifier or payload content.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::{broker_url, publish_many, random_prefix, referral, repo};
use ponte::broker::Queues;
use serde_json::{Value, json};

/// `ponte run` with JSON logs at the default level; a thread collects its log lines (returned
/// once it exits) and says when the gateway is ready.
fn json_logging_gateway(
    url: &str,
    prefix: &str,
) -> (
    std::process::Child,
    std::thread::JoinHandle<Vec<String>>,
    std::sync::mpsc::Receiver<()>,
) {
    let mut child = common::ponte_run(&repo().join("config"), url, prefix)
        .env("PONTE_LOG__FORMAT", "json")
        .env("PONTE_LOG__LEVEL", "info")
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("gateway ready") {
                let _ = ready_tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    (child, reader, ready_rx)
}

#[tokio::test]
async fn json_logs_carry_one_outcome_event_per_message_and_no_person_data_or_keys() {
    let url = broker_url();
    let prefix = random_prefix();
    let queues = Queues::new(&prefix);
    let good = referral("cpi-modena", "CPI-MO-01", "036023");
    let mut bad = referral("cpi-modena", "CPI-MO-01", "036023");
    bad["subject"]["identifiers"] = json!([{"scheme": "it.cf", "value": "BNCGVN70A41F257Q"}]);
    let bodies = [&good, &bad].map(|m| serde_json::to_vec(m).unwrap());
    publish_many(&url, &queues.inbound("cpi-modena"), &bodies).await;
    // An inclusion benefit: pseudonymized for the observatory, unmappable for the comune.
    let partial = common::benefit_status("adi", "036023");
    publish_many(
        &url,
        &queues.inbound("inps"),
        &[serde_json::to_vec(&partial).unwrap()],
    )
    .await;

    let (mut child, reader, _) = json_logging_gateway(&url, &prefix);
    let delivered = common::drain(&url, &queues.outbound("inps"), 1, Duration::from_secs(20)).await;
    assert_eq!(delivered.len(), 1);
    let receipts = common::drain(
        &url,
        &queues.receipts("cpi-modena"),
        2,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(receipts.len(), 2);
    let receipts = common::drain(&url, &queues.receipts("inps"), 1, Duration::from_secs(20)).await;
    assert_eq!(receipts.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let lines = reader.join().unwrap();

    let events: Vec<Value> = lines
        .iter()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect();
    let outcomes: Vec<&Value> = events
        .iter()
        .filter(|e| e.get("outcome").is_some())
        .collect();
    assert_eq!(outcomes.len(), 3, "{lines:#?}");
    let partly = outcomes.iter().find(|e| e["outcome"] == "partial").unwrap();
    assert_eq!(partly["level"], "INFO");
    assert_eq!(partly["refused"], "comune-modena");
    assert_eq!(partly["code"], "unmappable-identifier");
    for (event, sent, outcome, code) in [
        (
            outcomes
                .iter()
                .find(|e| e["outcome"] == "delivered")
                .unwrap(),
            &good,
            "delivered",
            "delivered",
        ),
        (
            outcomes
                .iter()
                .find(|e| e["outcome"] == "rejected")
                .unwrap(),
            &bad,
            "rejected",
            "schema-violation",
        ),
    ] {
        assert_eq!(event["level"], "INFO");
        assert_eq!(event["message_id"], sent["message_id"]);
        assert_eq!(event["type"], "referral");
        assert_eq!(event["sender"], "cpi-modena");
        assert_eq!(event["outcome"], outcome);
        assert_eq!(event["code"], code);
        assert!(event["latency_ms"].as_f64().is_some());
    }
    assert_eq!(
        outcomes
            .iter()
            .find(|e| e["outcome"] == "delivered")
            .unwrap()["recipients"],
        "inps"
    );
    let all = lines.join("\n");
    let key = std::env::var("PONTE_PSEUDONYM_KEY_OSSERVATORIO_ER").unwrap();
    let pseudonym = ponte::map::pseudonym(
        &ponte::partner::Secret::new(key.clone()),
        "it.cf",
        "BNCGVN70A41F257X",
    );
    for secret in [
        "RSSMRA85T10A562S",
        "BNCGVN70A41F257Q",
        "BNCGVN70A41F257X",
        "REF-2026-0001",
        "APP-2026-4471",
        "D.Lgs.",
        &key,
        &pseudonym,
    ] {
        assert!(!all.contains(secret), "{secret} appears in the logs");
    }
}

/// A copy whose queue is gone comes back from the broker whole. Ponte says which queue is
/// missing and tries again (the topology is declared anew); nothing in the logs shows the
/// message — neither as text nor as the bytes a returned message is made of.
#[tokio::test]
async fn a_copy_the_broker_returns_is_not_written_into_the_logs() {
    let url = broker_url();
    let prefix = random_prefix();
    let queues = Queues::new(&prefix);
    let (mut child, reader, ready) = json_logging_gateway(&url, &prefix);
    ready
        .recv_timeout(Duration::from_secs(30))
        .expect("gateway ready");
    common::shared_broker_ctl(&["delete_queue", &queues.outbound("inps")]);

    let sent = referral("cpi-modena", "CPI-MO-01", "036023");
    let body = serde_json::to_vec(&sent).unwrap();
    publish_many(&url, &queues.inbound("cpi-modena"), &[body]).await;
    // Once its queue is declared again, the copy arrives.
    let delivered = common::drain(&url, &queues.outbound("inps"), 1, Duration::from_secs(30)).await;
    assert_eq!(delivered.len(), 1);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let lines = reader.join().unwrap();
    let all = lines.join("\n");
    assert!(
        all.contains(&format!("queue {} does not exist", queues.outbound("inps"))),
        "Ponte says which queue was missing: {all}"
    );
    let person = "RSSMRA85T10A562S";
    let as_bytes = person
        .bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    for shown in [
        person,
        &as_bytes,
        sent["payload"]["reason"].as_str().unwrap(),
    ] {
        assert!(!all.contains(shown), "{shown} appears in the logs: {all}");
    }
    common::delete_queues(&common::directory(&url, &prefix)).await;
}

/// Whoever reads Ponte's stderr (journald, a pipe to a log shipper) may stall. Deliveries do not
/// wait for it: with a reader that stops reading once the gateway is ready, 2,000 referrals — a
/// line each, many times what a pipe holds — all reach INPS. When the reader reads again, every
/// message's line is there, as plain text (no terminal, no colour codes).
#[tokio::test]
async fn a_log_reader_that_stops_reading_does_not_hold_up_deliveries() {
    const COUNT: usize = 2_000;
    let url = broker_url();
    let prefix = random_prefix();
    let queues = Queues::new(&prefix);
    let mut child = common::ponte_run(&repo().join("config"), &url, &prefix)
        .env("PONTE_LOG__LEVEL", "info")
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let gateway = common::Running(Some(child));
    let mut line = String::new();
    while !line.contains("gateway ready") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "ponte exited");
    }

    let bodies: Vec<Vec<u8>> = (0..COUNT)
        .map(|_| serde_json::to_vec(&referral("cpi-modena", "CPI-MO-01", "036023")).unwrap())
        .collect();
    publish_many(&url, &queues.inbound("cpi-modena"), &bodies).await;
    let delivered = common::drain(
        &url,
        &queues.outbound("inps"),
        COUNT,
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        delivered.len(),
        COUNT,
        "referrals delivered while nobody read the log"
    );

    let reader =
        std::thread::spawn(move || stderr.lines().map_while(Result::ok).collect::<Vec<_>>());
    gateway.stop();
    let lines = reader.join().unwrap();
    let outcomes = lines
        .iter()
        .filter(|l| l.contains("message delivered"))
        .count();
    assert_eq!(outcomes, COUNT, "one line per message, none lost");
    assert!(
        !lines.iter().any(|l| l.contains('\u{1b}')),
        "colour codes in a log that is not a terminal"
    );
    common::delete_queues(&common::directory(&url, &prefix)).await;
}
