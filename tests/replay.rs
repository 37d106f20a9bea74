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
