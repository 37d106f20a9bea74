//! Delivery guarantees on a real broker: a message published twice is delivered once (also
//! across a gateway restart), a rejected message may be corrected and sent again under the same
//! id, and a store that cannot record stops the gateway from acknowledging instead of losing or
//! repeating messages.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{
    Gateway, benefit_status, broker_url, depth, directory, directory_with, random_prefix, referral,
    repo, schemas_copy,
};
use ponte::pipeline::Pipeline;
use ponte::store::{MessageCase, Seen, SqliteStore, Store, StoreError};
use serde_json::json;

#[tokio::test]
async fn a_message_published_again_a_minute_later_is_delivered_once_even_across_a_restart() {
    let url = broker_url();
    let prefix = random_prefix();
    let gw = Gateway::start_with(directory(&url, &prefix)).await;
    let sent = referral("cpi-modena", "CPI-MO-01", "036023");
    gw.send("cpi-modena", &sent).await;
    assert_eq!(gw.take(&gw.queues.outbound("inps"), 1).await.len(), 1);
    assert_eq!(
        gw.receipt("cpi-modena").await["payload"]["code"],
        "delivered"
    );

    // The back office publishes it again a minute later.
    tokio::time::sleep(Duration::from_secs(61)).await;
    let (receipt, parked) = gw
        .expect_rejection("cpi-modena", &serde_json::to_vec(&sent).unwrap())
        .await;
    assert_eq!(receipt["correlation_id"], sent["message_id"]);
    assert_eq!(receipt["payload"]["status"], "rejected");
    assert_eq!(receipt["payload"]["code"], "duplicate");
    assert_eq!(receipt["payload"]["errors"][0]["path"], "/message_id");
    assert!(
        receipt["payload"]["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("inps"),
        "{receipt}"
    );
    assert_eq!(parked.header("x-ponte-code").as_deref(), Some("duplicate"));

    // The record survives a restart of the gateway.
    gw.stop_keeping_queues().await;
    let gw = Gateway::start_with(directory(&url, &prefix)).await;
    gw.send("cpi-modena", &sent).await;
    assert_eq!(
        gw.receipt("cpi-modena").await["payload"]["code"],
        "duplicate"
    );
    gw.assert_empty(&gw.queues.outbound("inps")).await;
    // Another sender may use the same message id: ids are unique per sender.
    let mut other = benefit_status("naspi", "036023");
    other["message_id"] = sent["message_id"].clone();
    gw.send("inps", &other).await;
    assert_eq!(gw.take(&gw.queues.outbound("cpi-modena"), 1).await.len(), 1);
    gw.stop().await;
}

/// Messages larger than a frame of the broker's (128 KiB), up to the size limit, reach their
/// recipient whole: the body arrives in several frames, and each copy is written into a buffer
/// its thread keeps from one copy to the next (a shorter one after a longer one included).
#[tokio::test]
async fn messages_of_several_frames_arrive_whole() {
    // The demo schema keeps free text short; a deployment may allow more.
    let schemas = schemas_copy(|dir| {
        let path = dir.join("referral/1.0.json");
        let mut schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        schema["properties"]["payload"]["properties"]["notes"]["maxLength"] = json!(1_000_000);
        std::fs::write(&path, serde_json::to_vec(&schema).unwrap()).unwrap();
    });
    let (url, prefix) = (broker_url(), random_prefix());
    let config = repo().join("config");
    let gw = Gateway::start_with(directory_with(
        &config,
        &url,
        &prefix,
        &[("paths.schemas", schemas.to_str().unwrap())],
    ))
    .await;
    // Escapes and characters of two and three bytes, so that what is written is not what was
    // read byte for byte: ~600 KB, then ~270 KB.
    let line = "Colloquio \"presa in carico\" — più servizi\\sede\n";
    for repeats in [11_000, 5_000] {
        let notes = line.repeat(repeats);
        let mut sent = referral("cpi-modena", "CPI-MO-01", "036023");
        sent["payload"]["notes"] = json!(notes);
        assert!(serde_json::to_vec(&sent).unwrap().len() > 2 * 128 * 1024);
        gw.send("cpi-modena", &sent).await;
        let delivered = gw.take(&gw.queues.outbound("inps"), 1).await;
        assert_eq!(delivered.len(), 1);
        let copy = delivered[0].json();
        assert_eq!(copy["message_id"], sent["message_id"]);
        assert_eq!(copy["payload"]["notes"], json!(notes));
        assert_eq!(
            gw.receipt("cpi-modena").await["payload"]["code"],
            "delivered"
        );
    }
    gw.stop().await;
    std::fs::remove_dir_all(schemas).unwrap();
}

#[tokio::test]
async fn a_rejected_message_corrected_under_the_same_id_is_delivered() {
    let gw = Gateway::start().await;
    let mut sent = referral("cpi-modena", "CPI-MO-01", "036023");
    sent["payload"]["reason"] = json!("because");
    let (receipt, _) = gw
        .expect_rejection("cpi-modena", &serde_json::to_vec(&sent).unwrap())
        .await;
    assert_eq!(receipt["payload"]["code"], "schema-violation");
    sent["payload"]["reason"] = json!("pact-signed");
    gw.send("cpi-modena", &sent).await;
    let delivered = gw.take(&gw.queues.outbound("inps"), 1).await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].json()["payload"]["reason"], "R02");
    assert_eq!(
        gw.receipt("cpi-modena").await["payload"]["code"],
        "delivered"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_message_the_broker_gives_back_after_delivery_is_answered_not_delivered_again() {
    let gw = Gateway::start().await;
    let sent = referral("cpi-bologna", "CPI-BO-01", "037006");
    let body = serde_json::to_vec(&sent).unwrap();
    gw.send_raw("cpi-bologna", &body).await;
    assert_eq!(gw.take(&gw.queues.outbound("inps"), 1).await.len(), 1);
    let first = gw.receipt("cpi-bologna").await;
    // What the gateway does with the same message flagged as redelivered by the broker (as
    // after a crash between its delivery and its acknowledgement).
    let owner = &gw.directory.partners["cpi-bologna"];
    let verdict = gw.pipeline.process(owner, &body, true).await;
    match verdict.outcome {
        ponte::pipeline::Outcome::AlreadyDelivered { recipients } => {
            assert_eq!(recipients, ["inps"])
        }
        other => panic!("expected already delivered, got {other:?}"),
    }
    assert_eq!(first["payload"]["recipients"], json!(["inps"]));
    gw.stop().await;
}

/// The embedded store, failing on demand.
#[derive(Debug)]
struct Flaky {
    inner: SqliteStore,
    failing: AtomicBool,
}

impl Flaky {
    fn check(&self) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            Err(StoreError {
                path: "test".into(),
                message: "disk I/O error".into(),
            })
        } else {
            Ok(())
        }
    }
}

impl Store for Flaky {
    fn record(&self, m: &MessageCase<'_>) -> Result<Vec<Option<String>>, StoreError> {
        self.check()?;
        self.inner.record(m)
    }
    fn local_id(&self, p: &str, s: &str, v: &str) -> Result<Option<String>, StoreError> {
        self.check()?;
        self.inner.local_id(p, s, v)
    }
    fn import_local_ids(
        &self,
        p: &str,
        rows: &[(String, String, String)],
    ) -> Result<usize, StoreError> {
        self.inner.import_local_ids(p, rows)
    }
    fn seen(&self, s: &str, id: &str, w: Duration) -> Result<Option<Seen>, StoreError> {
        self.check()?;
        self.inner.seen(s, id, w)
    }
    fn remember(&self, s: &str, id: &str, r: &[&str], complete: bool) -> Result<(), StoreError> {
        self.check()?;
        self.inner.remember(s, id, r, complete)
    }
    fn prune(&self, a: Duration, w: Duration) -> Result<usize, StoreError> {
        self.inner.prune(a, w)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.flush()
    }
    fn written(&self) -> u64 {
        self.inner.written()
    }
    fn commits(&self) -> tokio::sync::watch::Receiver<ponte::store::Committed> {
        self.inner.commits()
    }
}

#[tokio::test]
async fn a_store_that_cannot_record_stops_acknowledgements_and_nothing_is_lost() {
    let prefix = random_prefix();
    let directory = Arc::new(directory(&broker_url(), &prefix));
    let store = Arc::new(Flaky {
        inner: SqliteStore::open(&common::data_dir(&prefix)).unwrap(),
        failing: AtomicBool::new(false),
    });
    let pipeline = Arc::new(Pipeline::new(directory, store.clone()).unwrap());
    let gw = Gateway::start_pipeline(pipeline).await;

    store.failing.store(true, Ordering::SeqCst);
    let sent: Vec<_> = (0..20)
        .map(|_| referral("cpi-modena", "CPI-MO-01", "036023"))
        .collect();
    for m in &sent {
        gw.send("cpi-modena", m).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Nothing acknowledged on a guess, nothing answered, nothing rejected.
    assert_eq!(depth(&gw.url, &gw.queues.receipts("cpi-modena")).await, 0);
    assert_eq!(depth(&gw.url, &gw.queues.rejected("cpi-modena")).await, 0);
    assert_eq!(depth(&gw.url, &gw.queues.outbound("inps")).await, 0);

    // The store recovers: every message is delivered exactly once and answered.
    store.failing.store(false, Ordering::SeqCst);
    let delivered = gw.take(&gw.queues.outbound("inps"), 20).await;
    assert_eq!(delivered.len(), 20);
    let mut ids: Vec<String> = delivered
        .iter()
        .map(|m| m.json()["message_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20, "a message was delivered twice");
    assert_eq!(
        gw.take(&gw.queues.receipts("cpi-modena"), 20).await.len(),
        20
    );
    gw.stop().await;
}
