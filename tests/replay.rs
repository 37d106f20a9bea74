//! `ponte rejected list|show|replay` against a real broker: ops see why a message was parked,
//! an unchanged message is refused with its original reason and stays parked, and the corrected
//! one goes through the whole pipeline and is delivered.

mod common;

use common::{Gateway, broker_url, depth, directory, ponte, random_prefix, referral};
use serde_json::json;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn a_rejected_message_is_inspected_refused_unchanged_and_replayed_corrected() {
    let prefix = random_prefix();
    let gw = Gateway::start_with(directory(&broker_url(), &prefix)).await;
    let mut sent = referral("cpi-modena", "CPI-MO-01", "036023");
    sent["payload"]["reason"] = json!("because");
    gw.send("cpi-modena", &sent).await;
    assert_eq!(
        gw.receipt("cpi-modena").await["payload"]["code"],
        "schema-violation"
    );
    let id = sent["message_id"].as_str().unwrap().to_string();
    let id = id.as_str();
    let rejected = gw.queues.rejected("cpi-modena");
    let wait_parked = async || {
        for _ in 0..50 {
            if depth(&gw.url, &rejected).await == 1 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("the message is not parked");
    };
    wait_parked().await;

    let list = ponte(&prefix, &["rejected", "list", "cpi-modena"]);
    assert!(list.status.success(), "{}", text(&list.stderr));
    let line = text(&list.stdout);
    assert!(line.starts_with(id), "{line}");
    assert!(line.contains("\tschema-violation\t"), "{line}");
    // Listing leaves the message where it is.
    wait_parked().await;

    let show = ponte(&prefix, &["rejected", "show", "cpi-modena", id]);
    assert!(show.status.success());
    let shown = text(&show.stdout);
    assert!(
        shown.contains("# x-ponte-code: schema-violation"),
        "{shown}"
    );
    assert!(shown.contains("\"because\""), "{shown}");

    // Unchanged, it would be rejected again: refused with the original reason, still parked.
    let again = ponte(
        &prefix,
        &["rejected", "replay", "cpi-modena", "--message-id", id],
    );
    assert_eq!(again.status.code(), Some(1));
    let why = text(&again.stderr);
    assert!(
        why.contains("would be rejected again: schema-violation"),
        "{why}"
    );
    assert!(why.contains("\"/payload/reason\" (enum)"), "{why}");
    wait_parked().await;
    gw.assert_empty(&gw.queues.outbound("inps")).await;

    // Corrected under the same id: replayed through the pipeline and delivered.
    let dir = std::env::temp_dir().join(format!("ponte-replay-{prefix}"));
    std::fs::create_dir_all(&dir).unwrap();
    let fixed = dir.join("fixed.json");
    sent["payload"]["reason"] = json!("pact-signed");
    std::fs::write(&fixed, serde_json::to_vec(&sent).unwrap()).unwrap();
    let replay = ponte(
        &prefix,
        &[
            "rejected",
            "replay",
            "cpi-modena",
            "--message-id",
            id,
            "--file",
            fixed.to_str().unwrap(),
        ],
    );
    assert!(replay.status.success(), "{}", text(&replay.stderr));
    let delivered = gw.take(&gw.queues.outbound("inps"), 1).await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].json()["message_id"], id);
    assert_eq!(delivered[0].json()["payload"]["reason"], "R02");
    assert_eq!(
        gw.receipt("cpi-modena").await["payload"]["code"],
        "delivered"
    );
    assert_eq!(depth(&gw.url, &rejected).await, 0);

    let _ = std::fs::remove_dir_all(&dir);
    gw.stop().await;
}

#[tokio::test]
async fn a_partly_delivered_message_is_replayed_only_to_the_recipient_it_was_refused_for() {
    let prefix = random_prefix();
    let gw = Gateway::start_with(directory(&broker_url(), &prefix)).await;
    // The comune does not know this person yet: its copy is refused, the others go out.
    let mut sent = common::benefit_status("adi", "036023");
    sent["subject"]["identifiers"] = json!([{"scheme": "it.cf", "value": "BNCGVN70A41F257X"}]);
    gw.send("inps", &sent).await;
    assert_eq!(gw.take(&gw.queues.outbound("cpi-modena"), 1).await.len(), 1);
    assert_eq!(
        gw.take(&gw.queues.outbound("osservatorio-er"), 1)
            .await
            .len(),
        1
    );
    assert_eq!(gw.receipt("inps").await["payload"]["status"], "partial");
    let rejected = gw.queues.rejected("inps");
    // The original is parked.
    common::wait_for_depth(&gw.url, &rejected, 1, std::time::Duration::from_secs(5)).await;

    // Ops teach the crosswalk the comune's registry number, then replay the parked original.
    let csv = common::repo().join("examples/comune-modena-registry.csv");
    let import = ponte(
        &prefix,
        &[
            "crosswalk",
            "import",
            "--partner",
            "comune-modena",
            csv.to_str().unwrap(),
        ],
    );
    assert!(import.status.success(), "{}", text(&import.stderr));
    let id = sent["message_id"].as_str().unwrap();
    let replay = ponte(&prefix, &["rejected", "replay", "inps", "--message-id", id]);
    assert!(replay.status.success(), "{}", text(&replay.stderr));

    let at_comune = gw.take(&gw.queues.outbound("comune-modena"), 1).await;
    assert_eq!(at_comune.len(), 1);
    let copy = at_comune[0].json();
    assert_eq!(copy["message_id"], sent["message_id"]);
    assert_eq!(
        copy["subject"]["identifiers"],
        json!([{"scheme": "local", "value": "ANA-2026-0042"}])
    );
    let receipt = gw.receipt("inps").await;
    assert_eq!(receipt["payload"]["status"], "delivered");
    assert_eq!(
        receipt["payload"]["recipients"],
        json!(["cpi-modena", "osservatorio-er", "comune-modena"])
    );
    // Those who had it already do not get it twice.
    gw.assert_empty(&gw.queues.outbound("cpi-modena")).await;
    gw.assert_empty(&gw.queues.outbound("osservatorio-er"))
        .await;
    assert_eq!(depth(&gw.url, &rejected).await, 0);
    gw.stop().await;
}

/// Replay headers are Ponte's operator's to write: a sender writing them on its own message
/// (with its own `user_id` or none) does not narrow the message's fan-out past the routes.
#[tokio::test]
async fn a_sender_cannot_pass_its_message_off_as_a_replay() {
    use common::raw::{self, Properties};
    let gw = Gateway::start().await;
    let inps = common::SenderUser::create(
        &gw.url,
        &format!("{}-inps", gw.directory.settings.broker.prefix),
    );
    let claims = || {
        Properties::json()
            .header(b"x-ponte-replay-for", b'S', b"cpi-modena")
            .header(b"x-ponte-replay", b'S', b"ponte.rejected.inps")
    };
    let sent = [
        common::benefit_status("adi", "036023"),
        common::benefit_status("adi", "036023"),
    ];
    let inbound = gw.queues.inbound("inps");
    raw::publish(
        &inps.url,
        &inbound,
        &serde_json::to_vec(&sent[0]).unwrap(),
        claims(),
    )
    .await;
    let signed = claims().user_id(inps.name.as_bytes());
    raw::publish(
        &inps.url,
        &inbound,
        &serde_json::to_vec(&sent[1]).unwrap(),
        signed,
    )
    .await;

    // Every recipient the routes name is served, not only the one the headers claim: the
    // observatory gets both, and the municipality, which cannot be given this person yet, is
    // tried (its copy refused).
    for recipient in ["cpi-modena", "osservatorio-er"] {
        let copies = gw.take(&gw.queues.outbound(recipient), 2).await;
        assert_eq!(copies.len(), 2, "{recipient}");
    }
    let receipts = gw.take(&gw.queues.receipts("inps"), 2).await;
    assert_eq!(receipts.len(), 2);
    for receipt in receipts.iter().map(|r| r.json()) {
        assert_eq!(
            receipt["payload"]["recipients"],
            json!(["cpi-modena", "osservatorio-er"]),
            "{receipt}"
        );
        assert_eq!(
            receipt["payload"]["undelivered"][0]["recipient"],
            "comune-modena"
        );
    }
    gw.stop().await;
}
