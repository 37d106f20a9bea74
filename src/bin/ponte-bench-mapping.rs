//! `ponte-bench-mapping`: the CPU cost per message of deciding what to deliver — decoding and
//! validation alone, then the whole pipeline (validation, authorization, routing, the crosswalk
//! record in the embedded store, and mapping + serializing every recipient's copy) — on the demo
//! messages with the demo configuration. No broker involved; it prints a table and never fails on
//! a timing.
//!
//! `cargo run --release --bin ponte-bench-mapping [-- --iterations N]`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use ponte::decode::{DecodeLimits, decode};
use ponte::directory::Directory;
use ponte::pipeline::{Outcome, Pipeline};
use ponte::store::{SqliteStore, Store};
use serde_json::{Value, json};

// The same allocator as the gateway, so the figures are the gateway's.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(about = "Cost per message of validation and mapping on the demo messages")]
struct Args {
    /// Configuration folder.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/config"))]
    config: PathBuf,
    /// Messages processed per case (after a warm-up of a tenth as many).
    #[arg(long, default_value_t = 20_000)]
    iterations: u32,
}

/// One demo message and the partner whose queue it arrives on.
struct Case {
    name: &'static str,
    owner: &'static str,
    body: Value,
}

impl Case {
    /// `n` copies of the message, each with a message id of its own, as real traffic has: the
    /// same id again would be a duplicate, whose look-up waits for the store's commit of the
    /// first.
    fn bodies(&self, n: u32) -> Vec<Vec<u8>> {
        (0..n)
            .map(|_| {
                let mut body = self.body.clone();
                if body.get("message_id").is_some() {
                    body["message_id"] = json!(uuid::Uuid::new_v4().to_string());
                }
                serde_json::to_vec(&body).expect("JSON serializes")
            })
            .collect()
    }
}

fn example(name: &str) -> Result<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    Ok(serde_json::from_str(&text)?)
}

fn cases() -> Result<Vec<Case>> {
    let referral = example("referral-cpi-modena.json")?;
    let adi = example("benefit-status-adi-inps.json")?;
    let mut naspi = adi.clone();
    naspi["payload"]["benefit"] = json!("naspi");
    let mut answer = naspi.clone();
    answer["correlation_id"] = referral["message_id"].clone();
    let invalid = example("referral-invalid-cf.json")?;
    Ok(vec![
        Case {
            name: "referral cpi → inps (codes, field list)",
            owner: "cpi-modena",
            body: referral,
        },
        Case {
            name: "benefit-status naspi → cpi, observatory (pseudonym)",
            owner: "inps",
            body: naspi,
        },
        Case {
            name: "benefit-status answer (case crosswalk)",
            owner: "inps",
            body: answer,
        },
        Case {
            name: "benefit-status adi → cpi, comune (registry no.), observatory",
            owner: "inps",
            body: adi,
        },
        Case {
            name: "referral with a wrong check character (rejected)",
            owner: "cpi-modena",
            body: invalid,
        },
    ])
}

fn per_message(elapsed: Duration, n: u32) -> f64 {
    elapsed.as_secs_f64() * 1e6 / f64::from(n)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let directory = Arc::new(Directory::load(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?);
    let data = std::env::temp_dir().join(format!("ponte-bench-mapping-{}", uuid::Uuid::new_v4()));
    let store = Arc::new(SqliteStore::open(&data)?);
    store.check_duplicates_within(directory.settings.store.duplicate_window());
    // The comune knows the demo person by its registry number, as after its own first referral.
    let adi = example("benefit-status-adi-inps.json")?;
    let cf = adi["subject"]["identifiers"][0]["value"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    store.import_local_ids(
        "comune-modena",
        &[("it.cf".into(), cf, "ANA-2026-0042".into())],
    )?;
    let pipeline = Pipeline::new(directory.clone(), store.clone())?;
    let limits = DecodeLimits::from(&directory.settings.limits);
    println!(
        "{:<62} {:>5} {:>8} {:>14} {:>14}",
        "message", "bytes", "copies", "validate µs", "pipeline µs"
    );
    let cases = cases()?;
    // The answers answer the demo referral: the store knows it, as in real traffic.
    let referral = serde_json::to_vec(&cases[0].body)?;
    pipeline
        .process(&directory.partners[cases[0].owner], &referral, false)
        .await;
    store.flush()?;
    for case in cases {
        let owner = &directory.partners[case.owner];
        let warm_up = (args.iterations / 10).max(1);
        let mut copies = 0;
        for body in case.bodies(warm_up) {
            let verdict = pipeline.process(owner, &body, false).await;
            copies = match verdict.outcome {
                Outcome::Deliver { copies, .. } => copies.len(),
                Outcome::Reject(_) | Outcome::AlreadyDelivered { .. } => 0,
                Outcome::Retry(why) => anyhow::bail!("{}: {why}", case.name),
            };
        }
        // What the case links and records is settled before it is measured.
        store.flush()?;
        let bodies = case.bodies(args.iterations);
        let start = Instant::now();
        for body in &bodies {
            let envelope = decode(body, limits).expect("the demo messages are JSON");
            let _ = std::hint::black_box(directory.schemas.validate(&envelope).is_ok());
        }
        let validate = per_message(start.elapsed(), args.iterations);
        let start = Instant::now();
        for body in &bodies {
            std::hint::black_box(pipeline.process(owner, body, false).await);
        }
        let full = per_message(start.elapsed(), args.iterations);
        println!(
            "{:<62} {:>5} {:>8} {:>14.1} {:>14.1}",
            case.name,
            bodies[0].len(),
            copies,
            validate,
            full
        );
    }
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}
