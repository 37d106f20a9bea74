//! Retries and dead letters on a real broker: a copy its recipient's queue refuses waits in the
//! broker's delay queues while the sender's other messages and the other recipients go on; it is
//! delivered once the queue takes it again; out of attempts it is dead-lettered with its reason,
//! the sender is told it is undeliverable, and ops replay it with `ponte dlq`.

mod common;

use std::time::Duration;

use common::{
    Gateway, benefit_status, broker_url, depth, directory_with, drain, ponte, random_prefix,
    referral, refuse_publishes, repo, shared_broker_ctl, wait_for_depth,
};
use serde_json::{Value, json};

fn id_of(v: &Value) -> String {
    v["message_id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_copy_its_queue_refuses_waits_in_the_broker_and_the_sender_moves_on() {
    let gw = Gateway::start().await;
    let out = gw.queues.outbound("inps");
    let policy = refuse_publishes(&gw, &out);
    let first = referral("cpi-modena", "CPI-MO-01", "036023");
    let second = referral("cpi-modena", "CPI-MO-01", "036023");
    gw.send("cpi-modena", &first).await;
    gw.send("cpi-modena", &second).await;
    // Another partner's traffic to another recipient flows meanwhile.
    let status = benefit_status("naspi", "036023");
    gw.send("inps", &status).await;
    assert_eq!(gw.take(&gw.queues.outbound("cpi-modena"), 1).await.len(), 1);

    // Both messages are answered at once: taken in charge, their copies being retried; the
    // inbound queue is not held back by the refusing recipient.
    let mut answered = Vec::new();
    for receipt in gw.take(&gw.queues.receipts("cpi-modena"), 2).await {
        let receipt = receipt.json();
        answered.push(receipt["correlation_id"].as_str().unwrap().to_string());
        assert_eq!(receipt["payload"]["status"], "delivered");
        assert_eq!(receipt["payload"]["recipients"], json!([]));
        assert_eq!(receipt["payload"]["retrying"], json!(["inps"]));
    }
    answered.sort();
    let mut expected = vec![id_of(&first), id_of(&second)];
    expected.sort();
    assert_eq!(answered, expected);
    assert_eq!(depth(&gw.url, &gw.queues.inbound("cpi-modena")).await, 0);
    gw.assert_empty(&gw.queues.rejected("cpi-modena")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    gw.assert_empty(&gw.queues.dead_letters("inps")).await;

    // The queue takes messages again: each copy arrives once, without retry bookkeeping.
    shared_broker_ctl(&["clear_policy", &policy]);
    let delivered = drain(&gw.url, &out, 10, Duration::from_secs(5)).await;
    let mut ids: Vec<String> = delivered.iter().map(|m| id_of(&m.json())).collect();
    ids.sort();
    assert_eq!(ids, expected, "each copy exactly once");
    for copy in &delivered {
        assert_eq!(copy.header("x-ponte-attempts"), None);
        assert_eq!(copy.json()["recipient"], "inps");
        assert_eq!(
            copy.json()["payload"]["reason"],
            "R01",
            "mapped into INPS's code"
        );
    }
    gw.assert_empty(&gw.queues.receipts("cpi-modena")).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_fan_out_with_one_refused_copy_reaches_the_others_at_once() {
    let gw = Gateway::start().await;
    let out = gw.queues.outbound("osservatorio-er");
    let policy = refuse_publishes(&gw, &out);
    let sent = benefit_status("naspi", "036023");
    gw.send("inps", &sent).await;
    // The CPI's copy does not wait for the observatory's.
    let at_cpi = gw.take(&gw.queues.outbound("cpi-modena"), 1).await;
    assert_eq!(at_cpi.len(), 1);
    let receipt = gw.receipt("inps").await;
    assert_eq!(receipt["payload"]["code"], "delivered");
    assert_eq!(receipt["payload"]["recipients"], json!(["cpi-modena"]));
    assert_eq!(receipt["payload"]["retrying"], json!(["osservatorio-er"]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    shared_broker_ctl(&["clear_policy", &policy]);
    let at_observatory = drain(&gw.url, &out, 5, Duration::from_secs(5)).await;
    assert_eq!(at_observatory.len(), 1);
    assert_eq!(id_of(&at_observatory[0].json()), id_of(&sent));
    gw.assert_empty(&gw.queues.outbound("cpi-modena")).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_copy_out_of_attempts_is_dead_lettered_answered_undeliverable_and_replayed_by_ops() {
    let prefix = random_prefix();
    let directory = directory_with(
        &repo().join("config"),
        &broker_url(),
        &prefix,
        &[("delivery.max_attempts", "3")],
    );
    let gw = Gateway::start_with(directory).await;
    let out = gw.queues.outbound("inps");
    let policy = refuse_publishes(&gw, &out);
    let sent = referral("cpi-modena", "CPI-MO-01", "036023");
    gw.send("cpi-modena", &sent).await;
    let first = gw.receipt("cpi-modena").await;
    assert_eq!(first["payload"]["retrying"], json!(["inps"]));

    let dlq = gw.queues.dead_letters("inps");
    wait_for_depth(&gw.url, &dlq, 1, Duration::from_secs(15)).await;
    let receipt = gw.receipt("cpi-modena").await;
    assert_eq!(receipt["correlation_id"], sent["message_id"]);
    assert_eq!(receipt["payload"]["status"], "undeliverable");
    assert_eq!(receipt["payload"]["code"], "undeliverable");
    assert_eq!(receipt["payload"]["undelivered"][0]["recipient"], "inps");
    assert_eq!(
        receipt["payload"]["undelivered"][0]["errors"][0]["keyword"],
        "delivery"
    );
    assert_ne!(receipt["message_id"], first["message_id"]);

    // Ops see why, how many attempts and when.
    let list = ponte(&prefix, &["dlq", "list", "inps"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let line = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(line.starts_with(&id_of(&sent)), "{line}");
    assert!(line.contains("\tundeliverable\t"), "{line}");
    assert!(line.contains("3 attempt(s), from cpi-modena"), "{line}");
    assert!(line.contains("queue full"), "{line}");
    let show = ponte(&prefix, &["dlq", "show", "inps", &id_of(&sent)]);
    let shown = String::from_utf8_lossy(&show.stdout).into_owned();
    assert!(shown.contains("# x-ponte-attempts: 3"), "{shown}");
    assert!(shown.contains("# x-ponte-dead-lettered-at: "), "{shown}");
    assert!(shown.contains("\"recipient\": \"inps\""), "{shown}");
    assert_eq!(
        depth(&gw.url, &dlq).await,
        1,
        "show leaves the letter in place"
    );

    // The queue is fixed; ops replay the letter and it is delivered.
    shared_broker_ctl(&["clear_policy", &policy]);
    let replay = ponte(&prefix, &["dlq", "replay", "inps", "--all"]);
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let delivered = drain(&gw.url, &out, 5, Duration::from_secs(5)).await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(id_of(&delivered[0].json()), id_of(&sent));
    assert_eq!(depth(&gw.url, &dlq).await, 0);
    gw.stop().await;
}
