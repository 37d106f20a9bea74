//! The delivery log on a real broker: a message's journey is found by message_id after delivery,
//! after rejection and replay, and after a retry; it holds no person identifier; `ponte log
//! verify` passes, then names the record altered in the store.

mod common;

use std::time::Duration;

use common::{
    Gateway, broker_url, directory, ponte, random_prefix, referral, refuse_publishes,
    shared_broker_ctl,
};
use serde_json::{Value, json};

fn journey(prefix: &str, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["log", "--json"];
    all.extend_from_slice(args);
    let out = ponte(prefix, &all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn steps(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["step"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_messages_journey_is_queried_and_the_log_proves_it_was_not_altered() {
    let prefix = random_prefix();
    let gw = Gateway::start_with(directory(&broker_url(), &prefix)).await;

    // Delivered.
    let delivered = referral("cpi-modena", "CPI-MO-01", "036023");
    gw.send("cpi-modena", &delivered).await;
    assert_eq!(gw.take(&gw.queues.outbound("inps"), 1).await.len(), 1);
    // Rejected, then corrected and replayed by ops.
    let mut wrong = referral("cpi-modena", "CPI-MO-01", "036023");
    wrong["payload"]["reason"] = json!("because");
    gw.send("cpi-modena", &wrong).await;
    assert_eq!(gw.take(&gw.queues.rejected("cpi-modena"), 1).await.len(), 1);
    // Retried: INPS's queue refuses for a moment.
    let policy = refuse_publishes(&gw, &gw.queues.outbound("inps"));
    let retried = referral("cpi-modena", "CPI-MO-01", "036023");
    gw.send("cpi-modena", &retried).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    shared_broker_ctl(&["clear_policy", &policy]);
    assert_eq!(gw.take(&gw.queues.outbound("inps"), 1).await.len(), 1);
    gw.pipeline.journal.flush();

    let id = |v: &Value| v["message_id"].as_str().unwrap().to_string();
    let record = &journey(&prefix, &["--message-id", &id(&delivered)]);
    assert_eq!(steps(record), ["delivered"]);
    assert_eq!(record[0]["sender"], "cpi-modena");
    assert_eq!(record[0]["recipients"], "inps");
    assert_eq!(record[0]["type"], "referral");
    assert_eq!(record[0]["code"], "delivered");
    assert!(record[0]["latency_ms"].as_f64().unwrap() > 0.0);

    let record = journey(&prefix, &["--message-id", &id(&wrong)]);
    assert_eq!(steps(&record), ["rejected"]);
    assert_eq!(record[0]["code"], "schema-violation");

    let record = journey(&prefix, &["--message-id", &id(&retried)]);
    let seen = steps(&record);
    assert!(seen.contains(&"retrying".to_string()), "{seen:?}");
    assert_eq!(seen.last().unwrap(), "delivered", "{seen:?}");
    assert!(
        record.last().unwrap()["detail"]
            .as_str()
            .unwrap()
            .starts_with("attempts: "),
        "{record:?}"
    );

    // The partner fixes its message; ops replay it: the replay is in the journey.
    let mut fixed = wrong.clone();
    fixed["payload"]["reason"] = json!("pact-signed");
    let file = std::env::temp_dir().join(format!("{prefix}-fixed.json"));
    std::fs::write(&file, serde_json::to_vec(&fixed).unwrap()).unwrap();
    // The parked copy was taken above; park it again the way the gateway does, by sending it.
    gw.send("cpi-modena", &wrong).await;
    common::wait_for_depth(
        &gw.url,
        &gw.queues.rejected("cpi-modena"),
        1,
        Duration::from_secs(5),
    )
    .await;
    let replay = ponte(
        &prefix,
        &[
            "rejected",
            "replay",
            "cpi-modena",
            "--message-id",
            &id(&wrong),
            "--file",
            file.to_str().unwrap(),
        ],
    );
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert_eq!(gw.take(&gw.queues.outbound("inps"), 1).await.len(), 1);
    gw.pipeline.journal.flush();
    let record = journey(&prefix, &["--message-id", &id(&wrong)]);
    assert_eq!(steps(&record), ["rejected", "rejected", "delivered"]);
    assert!(
        record[2]["detail"]
            .as_str()
            .unwrap()
            .contains("replay from"),
        "{record:?}"
    );

    // Filters: by sender and code, by recipient.
    let rejected = journey(
        &prefix,
        &["--sender", "cpi-modena", "--code", "schema-violation"],
    );
    assert_eq!(rejected.len(), 2);
    let to_inps = journey(&prefix, &["--recipient", "inps", "--step", "delivered"]);
    // The first, the retried one (on its later attempt) and the replayed one.
    assert_eq!(to_inps.len(), 3, "{to_inps:?}");

    // No person identifier in the log, in any form.
    let db = common::data_dir(&prefix).join("log.db");
    gw.stop_keeping_queues().await;
    let bytes = std::fs::read(&db).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(!text.contains("RSSMRA85T10A562S"));

    // The chain holds; an altered record is named.
    let verify = ponte(&prefix, &["log", "verify"]);
    assert!(verify.status.success());
    assert!(String::from_utf8_lossy(&verify.stdout).contains("intact"));
    let connection = rusqlite::Connection::open(&db).unwrap();
    let altered: i64 = connection
        .query_row(
            "UPDATE event SET code = 'delivered'
             WHERE seq = (SELECT min(seq) FROM event WHERE step = 'rejected') RETURNING seq",
            [],
            |r| r.get(0),
        )
        .unwrap();
    drop(connection);
    let verify = ponte(&prefix, &["log", "verify"]);
    assert!(!verify.status.success());
    let said = String::from_utf8_lossy(&verify.stdout).into_owned();
    assert!(said.contains(&format!("record {altered} ")), "{said}");
    common::delete_queues(&directory(&broker_url(), &prefix)).await;
    let _ = std::fs::remove_dir_all(common::data_dir(&prefix));
}

/// A gateway, run in-process with the demo configuration, that publishes its records to the
/// events exchange; and the broker's URL.
async fn with_events_exchange() -> (Gateway, String) {
    let url = broker_url();
    let gw = Gateway::start_with(common::directory_with(
        &common::repo().join("config"),
        &url,
        &random_prefix(),
        &[("log.events_exchange", "true")],
    ))
    .await;
    (gw, url)
}

/// Binds a queue of its own to the events exchange, as an organisation's log system would, and
/// returns its name.
async fn bind_feed(channel: &lapin::Channel, gw: &Gateway) -> String {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    let feed = format!("{}.my-log-system", gw.directory.settings.broker.prefix);
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(feed.as_str().into(), durable, Default::default())
        .await
        .unwrap();
    channel
        .queue_bind(
            feed.as_str().into(),
            gw.queues.events().as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    feed
}

#[tokio::test]
async fn every_step_is_also_published_to_the_events_exchange_when_asked() {
    use lapin::options::QueueDeleteOptions;
    let (gw, url) = with_events_exchange().await;
    let connection = common::connect(&url).await;
    let channel = connection.create_channel().await.unwrap();
    let feed = bind_feed(&channel, &gw).await;

    let delivered = referral("cpi-modena", "CPI-MO-01", "036023");
    gw.send("cpi-modena", &delivered).await;
    let mut wrong = referral("cpi-modena", "CPI-MO-01", "036023");
    wrong["payload"]["reason"] = json!("because");
    gw.send("cpi-modena", &wrong).await;

    let events = common::drain(&url, &feed, 2, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 2);
    let mut seen: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            let v = e.json();
            (
                v["message_id"].as_str().unwrap().to_string(),
                v["step"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    seen.sort();
    let mut expected = vec![
        (
            delivered["message_id"].as_str().unwrap().to_string(),
            "delivered".to_string(),
        ),
        (
            wrong["message_id"].as_str().unwrap().to_string(),
            "rejected".to_string(),
        ),
    ];
    expected.sort();
    assert_eq!(seen, expected);
    for event in &events {
        let text = event.text();
        assert!(
            !text.contains("RSSMRA85T10A562S"),
            "no person identifier: {text}"
        );
        assert!(!text.contains("payload"), "no payload: {text}");
    }
    channel
        .queue_delete(feed.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    gw.stop().await;
}

/// The events exchange deleted under a running gateway (an operator's mistake) has the broker
/// close the events publisher's channel at its next record: the publisher alone starts again,
/// the exchange is declared again and later records reach it; every referral is delivered
/// meanwhile, no other flow restarts and the session goes on.
#[tokio::test]
async fn a_deleted_events_exchange_restarts_the_events_publisher_alone() {
    use lapin::options::ExchangeDeclareOptions;
    let (gw, url) = with_events_exchange().await;
    let exchange = gw.queues.events();
    let connection = common::connect(&url).await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await
        .unwrap();

    // The first record published to the missing exchange closes the channel; the next fails.
    let restarts = "ponte_flow_restarts_total";
    let events = ["flow=\"events\""];
    let mut sent = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while common::recorded(restarts, &events) < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the events publisher restarts"
        );
        gw.send("cpi-modena", &referral("cpi-modena", "CPI-MO-01", "036023"))
            .await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Declared again with the topology; a passive declaration fails (and closes its channel)
    // while it is not.
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let mut feed_channel = None;
    while feed_channel.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the events exchange is declared again"
        );
        let probe = connection.create_channel().await.unwrap();
        let declared = probe
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                passive,
                Default::default(),
            )
            .await;
        match declared {
            Ok(()) => feed_channel = Some(probe),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let feed_channel = feed_channel.unwrap();
    let feed = bind_feed(&feed_channel, &gw).await;

    let last = referral("cpi-modena", "CPI-MO-01", "036023");
    gw.send("cpi-modena", &last).await;
    let at_inps = gw.take(&gw.queues.outbound("inps"), sent + 1).await;
    assert_eq!(at_inps.len(), sent + 1, "every referral reached INPS");
    // Records of the referrals sent during the restart may come first.
    let mut published = Vec::new();
    while !published.contains(&last["message_id"]) {
        assert!(
            std::time::Instant::now() < deadline + Duration::from_secs(20),
            "the last referral's record reaches the exchange: {published:?}"
        );
        for event in common::drain(&url, &feed, 1, Duration::from_secs(1)).await {
            published.push(event.json()["message_id"].clone());
        }
    }
    common::assert_restarted_alone_once(&gw, &events);
    feed_channel
        .queue_delete(feed.as_str().into(), Default::default())
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    gw.stop().await;
}
