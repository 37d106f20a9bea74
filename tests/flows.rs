//! Every flow of the demo institutions, end to end on a real broker: what each recipient's
//! queue receives, in its own terms, and the receipt each sender gets.

mod common;

use common::{Gateway, benefit_status, publish_many, referral};
use serde_json::{Value, json};

fn identifiers(m: &Value) -> &Value {
    &m["subject"]["identifiers"]
}

#[tokio::test]
async fn cpi_referral_reaches_inps_with_the_competent_inps_office() {
    let gw = Gateway::start().await;
    let sent = referral("cpi-modena", "CPI-MO-02", "036005");
    gw.send("cpi-modena", &sent).await;

    let out = gw.take(&gw.queues.outbound("inps"), 1).await;
    assert_eq!(out.len(), 1);
    let delivered = out[0].json();
    assert_eq!(delivered["message_id"], sent["message_id"]);
    assert_eq!(delivered["recipient"], "inps");
    assert_eq!(delivered["sender"], "cpi-modena");
    assert_eq!(delivered["payload"]["office"], "3600");
    assert_eq!(delivered["payload"]["sender_office"], "CPI-MO-02");
    assert_eq!(identifiers(&delivered), identifiers(&sent));
    // AMQP properties a recipient relies on.
    let p = &out[0].properties;
    assert_eq!(
        p.message_id().as_ref().unwrap().as_str(),
        sent["message_id"].as_str().unwrap()
    );
    assert_eq!(p.kind().as_ref().unwrap().as_str(), "referral");
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(*p.delivery_mode(), Some(2));

    let receipt = gw.receipt("cpi-modena").await;
    assert_eq!(receipt["type"], "receipt");
    assert_eq!(receipt["sender"], "ponte");
    assert_eq!(receipt["recipient"], "cpi-modena");
    assert_eq!(receipt["correlation_id"], sent["message_id"]);
    assert_eq!(receipt["payload"]["status"], "delivered");
    assert_eq!(receipt["payload"]["code"], "delivered");
    assert_eq!(receipt["payload"]["recipients"], json!(["inps"]));
    assert!(gw.directory.schemas.is_valid("receipt", "1.0", &receipt));
    gw.assert_empty(&gw.queues.rejected("cpi-modena")).await;
    gw.stop().await;
}

#[tokio::test]
async fn bologna_referral_maps_to_the_bologna_inps_office() {
    let gw = Gateway::start().await;
    gw.send(
        "cpi-bologna",
        &referral("cpi-bologna", "CPI-BO-02", "037032"),
    )
    .await;
    let delivered = gw.take(&gw.queues.outbound("inps"), 1).await[0].json();
    assert_eq!(delivered["payload"]["office"], "3700");
    assert_eq!(delivered["payload"]["sender_office"], "CPI-BO-02");
    assert_eq!(
        gw.receipt("cpi-bologna").await["payload"]["code"],
        "delivered"
    );
    gw.stop().await;
}

#[tokio::test]
async fn comune_employment_readiness_goes_to_the_competent_cpi() {
    let gw = Gateway::start().await;
    let mut sent = referral("comune-modena", "SS-MO-01", "036023");
    sent["payload"]["reason"] = json!("employment-readiness");
    gw.send("comune-modena", &sent).await;
    let delivered = gw.take(&gw.queues.outbound("cpi-modena"), 1).await[0].json();
    assert_eq!(delivered["recipient"], "cpi-modena");
    assert_eq!(delivered["payload"]["office"], "CPI-MO-01");
    assert_eq!(delivered["payload"]["sender_office"], "SS-MO-01");
    assert_eq!(
        gw.receipt("comune-modena").await["payload"]["recipients"],
        json!(["cpi-modena"])
    );
    gw.assert_empty(&gw.queues.outbound("inps")).await;
    gw.assert_empty(&gw.queues.outbound("cpi-bologna")).await;
    gw.stop().await;
}

#[tokio::test]
async fn naspi_status_goes_to_the_competent_cpi_only() {
    let gw = Gateway::start().await;
    gw.send("inps", &benefit_status("naspi", "036005")).await;
    gw.send("inps", &benefit_status("dis-coll", "037006")).await;
    let modena = gw.take(&gw.queues.outbound("cpi-modena"), 1).await[0].json();
    assert_eq!(modena["payload"]["office"], "CPI-MO-02");
    assert_eq!(modena["payload"]["sender_office"], "3600");
    let bologna = gw.take(&gw.queues.outbound("cpi-bologna"), 1).await[0].json();
    assert_eq!(bologna["payload"]["benefit"], "dis-coll");
    assert_eq!(bologna["payload"]["office"], "CPI-BO-01");
    // Unemployment benefits are not for the municipality, even where one is configured.
    gw.assert_empty(&gw.queues.outbound("comune-modena")).await;
    let receipts = gw.take(&gw.queues.receipts("inps"), 2).await;
    assert_eq!(receipts.len(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn inclusion_benefit_fans_out_to_cpi_comune_and_observatory() {
    let gw = Gateway::start().await;
    // The comune knows the person by its registry number.
    gw.pipeline
        .store
        .import_local_ids(
            "comune-modena",
            &[("it.cf".into(), "BNCGVN70A41F257X".into(), "ANA-0042".into())],
        )
        .unwrap();
    let sent = benefit_status("adi", "036023");
    gw.send("inps", &sent).await;
    let cpi = gw.take(&gw.queues.outbound("cpi-modena"), 1).await[0].json();
    let comune = gw.take(&gw.queues.outbound("comune-modena"), 1).await[0].json();
    let observatory = gw.take(&gw.queues.outbound("osservatorio-er"), 1).await[0].json();
    assert_eq!(observatory["message_id"], sent["message_id"]);
    assert_eq!(cpi["message_id"], sent["message_id"]);
    assert_eq!(comune["message_id"], sent["message_id"]);
    assert_eq!(cpi["recipient"], "cpi-modena");
    assert_eq!(comune["recipient"], "comune-modena");
    assert_eq!(cpi["payload"]["office"], "CPI-MO-01");
    assert_eq!(comune["payload"]["office"], "SS-MO-01");
    let receipt = gw.receipt("inps").await;
    assert_eq!(
        receipt["payload"]["recipients"],
        json!(["cpi-modena", "comune-modena", "osservatorio-er"])
    );
    gw.stop().await;
}

#[tokio::test]
async fn inclusion_benefit_without_a_competent_comune_goes_to_the_cpi_and_observatory() {
    let gw = Gateway::start().await;
    gw.send("inps", &benefit_status("sfl", "037032")).await;
    let cpi = gw.take(&gw.queues.outbound("cpi-bologna"), 1).await[0].json();
    assert_eq!(cpi["payload"]["office"], "CPI-BO-02");
    assert_eq!(
        gw.receipt("inps").await["payload"]["recipients"],
        json!(["cpi-bologna", "osservatorio-er"])
    );
    gw.assert_empty(&gw.queues.outbound("comune-modena")).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_named_recipient_bypasses_the_routing_rules() {
    let gw = Gateway::start().await;
    let mut sent = benefit_status("naspi", "037006");
    sent["recipient"] = json!("cpi-bologna");
    gw.send("inps", &sent).await;
    let delivered = gw.take(&gw.queues.outbound("cpi-bologna"), 1).await[0].json();
    assert_eq!(delivered["payload"]["office"], "CPI-BO-01");
    assert_eq!(
        gw.receipt("inps").await["payload"]["recipients"],
        json!(["cpi-bologna"])
    );
    gw.stop().await;
}

#[tokio::test]
async fn identifiers_the_recipient_does_not_accept_are_dropped() {
    let gw = Gateway::start().await;
    let mut sent = referral("cpi-modena", "CPI-MO-01", "036023");
    sent["subject"]["identifiers"] = json!([
        {"scheme": "local", "value": "MO-PERS-991"},
        {"scheme": "ch.ahvn13", "value": "756.1234.5678.97"},
        {"scheme": "it.cf", "value": "RSSMRA85T10A562S"}
    ]);
    gw.send("cpi-modena", &sent).await;
    let delivered = gw.take(&gw.queues.outbound("inps"), 1).await[0].json();
    assert_eq!(
        identifiers(&delivered),
        &json!([{"scheme": "it.cf", "value": "RSSMRA85T10A562S"}])
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_burst_of_messages_reaches_every_recipient_in_the_order_it_was_sent() {
    let gw = Gateway::start().await;
    // A back office publishes 300 status changes at once; each goes to a CPI and the observatory.
    let sent: Vec<Value> = (0..300).map(|_| benefit_status("sfl", "037032")).collect();
    let bodies: Vec<Vec<u8>> = sent
        .iter()
        .map(|m| serde_json::to_vec(m).unwrap())
        .collect();
    publish_many(&gw.url, &gw.queues.inbound("inps"), &bodies).await;
    assert_arrived_in_order(&gw, &sent, &["cpi-bologna", "osservatorio-er"]).await;
    gw.stop().await;
}

/// With many partners each flow's prefetch shrinks to share `broker.max_in_flight`; a partner
/// that sends most of the traffic can keep a window of its own.
#[tokio::test]
async fn a_partner_s_own_prefetch_is_reserved_and_the_others_share_the_rest() {
    let config = common::config_copy(|dir| {
        let file = dir.join("partners/inps.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        // Before the file's first table, so that it is a top-level key.
        std::fs::write(&file, format!("prefetch = 150\n{text}")).unwrap();
    });
    let prefix = common::random_prefix();
    let directory = common::directory_with(
        &config,
        &common::broker_url(),
        &prefix,
        // Bytes bound nothing here: 1 GiB over 170 messages is more than the largest allowed.
        &[
            ("broker.max_in_flight", "170"),
            ("broker.max_in_flight_bytes", "1073741824"),
        ],
    );
    let gw = Gateway::start_with(directory).await;
    let (granted, listed) = granted(&prefix);
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&config);
    // The other four share the 20 left: 5 each.
    let expected = windows(&[
        ("comune-modena", 5),
        ("cpi-bologna", 5),
        ("cpi-modena", 5),
        ("inps", 150),
        ("osservatorio-er", 5),
    ]);
    assert_eq!(granted, expected, "rabbitmqctl list_consumers:\n{listed}");
}

/// The demo partners sharing `broker.max_in_flight = 100` under a new prefix, and the national
/// institute's back office with 6,000 status changes to send, each for a CPI and the
/// observatory: the prefix, the directory (with `extra` settings), the messages and their
/// bodies.
fn institute_backlog_sharing_100(
    extra: &[(&str, &str)],
) -> (
    String,
    ponte::directory::Directory,
    Vec<Value>,
    Vec<Vec<u8>>,
) {
    let prefix = common::random_prefix();
    let settings: Vec<(&str, &str)> = [("broker.max_in_flight", "100")]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let directory = common::directory_with(
        &common::repo().join("config"),
        &common::broker_url(),
        &prefix,
        &settings,
    );
    let sent: Vec<Value> = (0..6_000)
        .map(|_| benefit_status("sfl", "037032"))
        .collect();
    let bodies = sent
        .iter()
        .map(|m| serde_json::to_vec(m).unwrap())
        .collect();
    (prefix, directory, sent, bodies)
}

/// Messages held back from a queue and put into it all at once, faster than any consumer could
/// take them as they come (a publisher competes with the gateway draining the queue): they wait
/// received and unacknowledged on a holding queue that dead-letters into the queue, and one
/// `basic.nack` (multiple, not requeued) moves them all.
struct Held {
    _connection: lapin::Connection,
    channel: lapin::Channel,
    // Dropped, the consumer would be cancelled.
    consumer: lapin::Consumer,
    last: u64,
    queue: String,
}

impl Held {
    async fn on(prefix: &str, queue: &str, bodies: &[Vec<u8>]) -> Held {
        use futures_util::StreamExt;
        use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
        use lapin::types::{AMQPValue, FieldTable};
        let connection = common::connect(&common::broker_url()).await;
        let channel = connection.create_channel().await.unwrap();
        let hold = format!("{prefix}.hold");
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(queue.into()),
        );
        channel
            .queue_declare(
                hold.as_str().into(),
                QueueDeclareOptions::default(),
                arguments,
            )
            .await
            .unwrap();
        for body in bodies {
            channel
                .basic_publish(
                    "".into(),
                    hold.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    lapin::BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap();
        }
        let mut consumer = channel
            .basic_consume(
                hold.as_str().into(),
                "held".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut last = 0;
        for _ in bodies {
            last = consumer.next().await.unwrap().unwrap().delivery_tag;
        }
        Held {
            _connection: connection,
            channel,
            consumer,
            last,
            queue: queue.to_string(),
        }
    }

    async fn release(self) {
        let options = lapin::options::BasicNackOptions {
            multiple: true,
            requeue: false,
        };
        self.channel.basic_nack(self.last, options).await.unwrap();
        // The nack has no answer: wait until the messages are there.
        let url = common::broker_url();
        for _ in 0..100 {
            if common::depth(&url, &self.queue).await > 0 {
                let hold = self.consumer.queue();
                let _ = self.channel.queue_delete(hold, Default::default()).await;
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("the held messages never reached {}", self.queue);
    }
}

/// Each partner's prefetch, as [`granted`] reads them.
fn windows(of: &[(&str, u32)]) -> std::collections::BTreeMap<String, u32> {
    of.iter().map(|(p, n)| (p.to_string(), *n)).collect()
}

/// Partners without a prefetch of their own share `broker.max_in_flight`, and the share
/// follows the traffic: the flows with nothing to do give back what they do not use, and the
/// one with a backlog takes it — never more than the bound in all, and without reordering the
/// partner's messages.
#[tokio::test]
async fn a_partner_with_a_backlog_takes_the_window_the_idle_ones_give_back() {
    let (prefix, directory, sent, bodies) = institute_backlog_sharing_100(&[]);
    let queues = ponte::broker::Queues::new(&prefix);
    // The backlog appears once the gateway runs (a backlog there at start is given its window
    // at once: the next test); here the window has to be taken from the idle flows.
    let held = Held::on(&prefix, &queues.inbound("inps"), &bodies).await;
    let gw = Gateway::start_with(directory).await;
    held.release().await;

    // What the broker grants each consumer, while the backlog drains.
    let mut most = 0;
    let mut seen = Vec::new();
    while most <= 20 && common::depth(&gw.url, &queues.inbound("inps")).await > 0 {
        let (now, _) = granted(&prefix);
        // Five partners: 20 each at first; a flow restarting its consumer may be missing.
        assert!(now.values().sum::<u32>() <= 100, "over the bound: {now:?}");
        most = most.max(now.get("inps").copied().unwrap_or(0));
        seen.push(now);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        most > 20,
        "the institute's prefetch never grew while its backlog drained: {seen:?}"
    );

    assert_arrived_in_order(&gw, &sent, &["cpi-bologna", "osservatorio-er"]).await;
    gw.stop().await;
}

/// A gateway that starts on a backlog (after an outage, say) gives the shared windows where
/// the messages are: the institute's 6,000 waiting status changes get the window at once,
/// rather than the same share as four empty queues and the wait for them to give it back.
#[tokio::test]
async fn a_gateway_starting_on_a_backlog_gives_it_the_window_at_once() {
    let (prefix, directory, sent, bodies) = institute_backlog_sharing_100(&[]);
    let queues = ponte::broker::Queues::new(&prefix);
    publish_many(&common::broker_url(), &queues.inbound("inps"), &bodies).await;
    let gw = Gateway::start_with(directory).await;

    let (now, listed) = granted(&prefix);
    // Five partners would start at 20 each; the four empty queues keep the floor of 4, and the
    // institute has the other 84 of the 100 from its first message.
    let expected = windows(&[
        ("comune-modena", 4),
        ("cpi-bologna", 4),
        ("cpi-modena", 4),
        ("inps", 84),
        ("osservatorio-er", 4),
    ]);
    assert_eq!(now, expected, "rabbitmqctl list_consumers:\n{listed}");

    assert_arrived_in_order(&gw, &sent, &["cpi-bologna", "osservatorio-er"]).await;
    gw.stop().await;
}

/// On quorum queues (`broker.queue_type = "quorum"`) too, a gateway starting on a backlog
/// drains it in one session. Its flows start small, each message taken to be as large as
/// allowed (64 KiB, where five partners at 200 share 2 MiB: 2 of the institute's 84 at
/// first), and once the first ones show their size the consumer starts again with the whole
/// window, which the broker must take as a new consumer. Every message arrives, in order, and the gateway stays connected.
#[tokio::test]
async fn on_quorum_queues_a_backlog_is_drained_in_order_without_a_reconnect() {
    let (prefix, directory, sent, bodies) = institute_backlog_sharing_100(&[
        ("broker.queue_type", "quorum"),
        ("broker.max_in_flight_bytes", "2097152"),
        ("limits.max_message_bytes", "65536"),
    ]);
    let connection = common::connect(&common::broker_url()).await;
    ponte::broker::declare_topology(&connection, &directory)
        .await
        .unwrap();
    let _ = connection.close(200, "declared".into()).await;
    let queues = ponte::broker::Queues::new(&prefix);
    publish_many(&common::broker_url(), &queues.inbound("inps"), &bodies).await;
    let gw = Gateway::start_with(directory).await;

    // A broker that closes the gateway's channel makes it reconnect: not ready meanwhile.
    let status = gw.status.clone();
    let watch = tokio::spawn(async move {
        while status.is_ready() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    });
    assert_arrived_in_order(&gw, &sent, &["cpi-bologna", "osservatorio-er"]).await;
    assert!(
        !watch.is_finished(),
        "the gateway lost its broker session while draining"
    );
    watch.abort();
    let types = common::shared_broker_ctl_output(&["list_queues", "-q", "name", "type"]);
    let ours: Vec<&str> = types.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert!(
        !ours.is_empty() && ours.iter().all(|l| l.ends_with("quorum")),
        "{ours:?}"
    );
    gw.stop().await;
}

/// Prefetch counts messages; `broker.max_in_flight_bytes` bounds their bytes too. A back
/// office that sends a backlog of messages far over the size limit (each one received whole
/// before it can be refused) gets them refused a few at a time, not two hundred at once; once
/// its messages are small again, its flow has its whole window back.
#[tokio::test]
async fn a_backlog_of_large_messages_is_taken_a_few_at_a_time_within_the_byte_bound() {
    let prefix = common::random_prefix();
    // Five partners at 400 share 2 MiB: 1,048 bytes a message, 6 of 64 KiB (the largest
    // allowed here) per flow at first, and 4 of 100 KB.
    let directory = common::directory_with(
        &common::repo().join("config"),
        &common::broker_url(),
        &prefix,
        &[
            ("broker.max_in_flight_bytes", "2097152"),
            ("limits.max_message_bytes", "65536"),
        ],
    );
    let queues = ponte::broker::Queues::new(&prefix);
    let oversized: Vec<Vec<u8>> = (0..200)
        .map(|i| format!("{i}{}", "0".repeat(100_000)).into_bytes())
        .collect();
    publish_many(
        &common::broker_url(),
        &queues.inbound("cpi-modena"),
        &oversized,
    )
    .await;
    let gw = Gateway::start_with(directory).await;

    let receipts = gw.take(&gw.queues.receipts("cpi-modena"), 200).await;
    assert_eq!(receipts.len(), 200, "every message is answered");
    assert!(
        receipts
            .iter()
            .all(|r| r.json()["payload"]["code"] == "too-large"),
        "{:?}",
        receipts[0].text()
    );
    let parked = gw.take(&gw.queues.rejected("cpi-modena"), 200).await;
    assert_eq!(parked.len(), 200, "every original is parked");
    let (now, listed) = granted(&prefix);
    assert_eq!(
        now.get("cpi-modena"),
        Some(&4),
        "the flow holds four 100 KB messages at once:\n{listed}"
    );
    assert_eq!(
        now.get("inps"),
        Some(&6),
        "a flow that received nothing yet holds six of the largest allowed:\n{listed}"
    );

    // Small messages again: within a few looks the flow has its whole window.
    let sent: Vec<Value> = (0..20)
        .map(|_| referral("cpi-modena", "CPI-MO-01", "036023"))
        .collect();
    for message in &sent {
        gw.send("cpi-modena", message).await;
    }
    assert_arrived_in_order(&gw, &sent, &["inps"]).await;
    // The window grows back once the large messages are out of the flow's last five looks (a
    // second each): some seconds. The deadline is for a machine busy with other tests, where
    // each listing of the broker's consumers takes a second or more; the wait ends as soon as
    // the window is whole.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (now, listed) = granted(&prefix);
        if now.get("cpi-modena") == Some(&400) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the flow's window never grew back:\n{listed}"
        );
        // A look sees the small messages only while they are among its last five seconds'.
        gw.send("cpi-modena", &referral("cpi-modena", "CPI-MO-01", "036023"))
            .await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    gw.stop().await;
}

/// What the broker grants each consumer of the gateway under `prefix`, by partner; and
/// `rabbitmqctl list_consumers` as it printed it. Tests running beside this one delete their
/// queues meanwhile, and a queue that ends while it is being listed breaks the listing off
/// (`badrpc`): it is then listed again.
fn granted(prefix: &str) -> (std::collections::BTreeMap<String, u32>, String) {
    let mut attempts = 0;
    let listed = loop {
        let listed = common::shared_broker_ctl_output(&[
            "list_consumers",
            "-q",
            "--no-table-headers",
            "queue_name",
            "prefetch_count",
        ]);
        attempts += 1;
        if !listed.contains("badrpc") || attempts == 10 {
            break listed;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let granted = listed
        .lines()
        .filter_map(|line| {
            let (queue, prefetch) = line.split_once('\t')?;
            let partner = queue.strip_prefix(&format!("{prefix}.in."))?;
            Some((partner.to_string(), prefetch.trim().parse().ok()?))
        })
        .collect();
    (granted, listed)
}

/// Asserts that each of `recipients` received every message of `sent`, in the order sent.
async fn assert_arrived_in_order(gw: &Gateway, sent: &[Value], recipients: &[&str]) {
    let ids: Vec<String> = sent
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_string())
        .collect();
    for recipient in recipients {
        let arrived: Vec<String> = gw
            .take(&gw.queues.outbound(recipient), ids.len())
            .await
            .iter()
            .map(|m| m.properties.message_id().as_ref().unwrap().to_string())
            .collect();
        assert!(
            arrived == ids,
            "{recipient} got {} of {} messages, or out of order",
            arrived.len(),
            ids.len()
        );
    }
}
