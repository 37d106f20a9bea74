//! The bytes each recipient receives for the demo messages, pinned: which fields, in which order,
//! how strings are escaped and numbers written. The other tests read copies back as JSON values,
//! which a change of field order or of escaping passes; a recipient's parser, signature check or
//! archive may not. The snapshots are under `tests/snapshots/`; a change to what recipients
//! receive shows there as a diff to review (`INSTA_UPDATE=always` rewrites them).

mod common;

use std::sync::Arc;

use common::{data_dir, directory_with, random_prefix, repo};
use ponte::partner::Partner;
use ponte::pipeline::{Outcome, Pipeline};
use ponte::store::{SqliteStore, Store};
use serde_json::{Value, json};

fn example(name: &str) -> Value {
    let path = repo().join("examples").join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// What `owner` sending `message` delivers: each copy's recipient and its body as sent, in the
/// order the copies go out.
async fn delivered(pipeline: &Pipeline, owner: &Partner, message: &Value) -> String {
    let body = serde_json::to_vec(message).unwrap();
    let verdict = pipeline.process(owner, &body, false).await;
    let Outcome::Deliver {
        copies, refused, ..
    } = verdict.outcome
    else {
        panic!("not delivered: {:?}", verdict.outcome);
    };
    assert!(refused.is_empty(), "refused: {refused:?}");
    copies
        .iter()
        .map(|c| {
            format!(
                "{}\n{}\n",
                c.recipient,
                std::str::from_utf8(&c.body).unwrap()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn each_recipient_receives_the_demo_messages_byte_for_byte() {
    let prefix = random_prefix();
    let config = repo().join("config");
    let directory = Arc::new(directory_with(
        &config,
        "amqp://127.0.0.1:1/%2f",
        &prefix,
        &[],
    ));
    let store = Arc::new(SqliteStore::open(&data_dir(&prefix)).unwrap());
    // The comune knows the demo person by its registry number, as after its own first referral.
    let adi = example("benefit-status-adi-inps.json");
    let cf = adi["subject"]["identifiers"][0]["value"].as_str().unwrap();
    store
        .import_local_ids(
            "comune-modena",
            &[("it.cf".into(), cf.into(), "ANA-2026-0042".into())],
        )
        .unwrap();
    let pipeline = Pipeline::new(directory.clone(), store.clone()).unwrap();
    let cpi = &directory.partners["cpi-modena"];
    let inps = &directory.partners["inps"];

    // To INPS: its office and reason codes, only the fields it may see.
    let referral = example("referral-cpi-modena.json");
    insta::assert_snapshot!("referral", delivered(&pipeline, cpi, &referral).await);

    // To the CPI, the comune (its registry number) and the observatory (a pseudonym, its fields).
    insta::assert_snapshot!("benefit_status_adi", delivered(&pipeline, inps, &adi).await);
    let sfl = example("benefit-status-sfl-inps.json");
    insta::assert_snapshot!("benefit_status_sfl", delivered(&pipeline, inps, &sfl).await);

    // An answer to the referral reaches the CPI under the CPI's own case reference.
    store.flush().unwrap();
    let mut answer = adi.clone();
    answer["message_id"] = json!("0b7e3c52-1f4a-4d8e-a6c9-7e2d5b1f9a30");
    answer["payload"]["benefit"] = json!("naspi");
    answer["correlation_id"] = referral["message_id"].clone();
    insta::assert_snapshot!("answer", delivered(&pipeline, inps, &answer).await);

    // Text a recipient must read back as sent: quotes, a backslash, a tab, accents, a sign
    // outside the Basic Multilingual Plane.
    let mut noted = referral.clone();
    noted["message_id"] = json!("9d4f1a7b-3c2e-4b8a-9f6d-1e5c7a2b8d40");
    noted["payload"]["referral_id"] = json!("MO-2026-000124");
    noted["payload"]["notes"] =
        json!("Rinvio all'ufficio \"Lavoro\": C:\\pratiche\t— città, 3 € 🙂");
    insta::assert_snapshot!("escaped", delivered(&pipeline, cpi, &noted).await);

    let _ = std::fs::remove_dir_all(data_dir(&prefix));
}
