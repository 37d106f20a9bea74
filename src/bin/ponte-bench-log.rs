//! Benchmark of the delivery log: writes N records (default 1,000,000) the way the gateway does,
//! then times the queries ops run (`ponte log --message-id`, of a record in the log's
//! index of ids and of one among the newest, not yet in it, `--correlation-id`, `--sender
//! --code`, `--recipient`, a time range) and `ponte log verify`. Prints figures; never fails on
//! a timing.
//!
//! `cargo run --release --bin ponte-bench-log [-- N]`

use std::time::Instant;

#[path = "shared/proc_stat.rs"]
mod proc_stat;

use ponte::journal::{Event, Filter, Journal, Reader, now_ms};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = std::env::temp_dir().join(format!("ponte-bench-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let senders = ["inps", "cpi-modena", "cpi-bologna", "comune-modena"];
    let codes = [
        "delivered",
        "delivered",
        "delivered",
        "schema-violation",
        "no-route",
    ];
    let start_ms = now_ms() - n as i64;
    let mut rng = fastrand::Rng::with_seed(5);
    let ids: Vec<String> = (0..n)
        .map(|_| {
            uuid::Builder::from_random_bytes(rng.u128(..).to_le_bytes())
                .into_uuid()
                .to_string()
        })
        .collect();
    let started = Instant::now();
    let journal = Journal::open(&dir).expect("the log opens");
    for i in 0..n {
        let code = codes[i % codes.len()];
        journal.record(Event {
            at_ms: start_ms + i as i64,
            step: if code == "delivered" {
                "delivered"
            } else {
                "rejected"
            }
            .into(),
            message_id: ids[i].clone(),
            correlation_id: if i % 10 == 0 {
                ids[i / 2].clone()
            } else {
                String::new()
            },
            sender: senders[i % senders.len()].into(),
            recipients: if code == "delivered" {
                "cpi-modena,osservatorio-er".into()
            } else {
                String::new()
            },
            message_type: "benefit-status".into(),
            code: code.into(),
            latency_ms: Some(1.5),
            detail: String::new(),
        });
    }
    journal.flush();
    let wrote = started.elapsed();
    println!(
        "wrote {n} records in {:.1} s ({:.1} µs each, one writer thread in batches)",
        wrote.as_secs_f64(),
        wrote.as_secs_f64() * 1e6 / n as f64
    );
    if let Some(cpu) = thread_cpu("ponte-journal") {
        println!(
            "the writer thread's CPU: {:.1} s ({:.1} µs per record)",
            cpu,
            cpu * 1e6 / n as f64
        );
    }
    let bytes: u64 = ["log.db", "log.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum();
    println!(
        "on disk: {:.0} MiB ({:.0} bytes per record)",
        bytes as f64 / 1048576.0,
        bytes as f64 / n as f64
    );
    let reader = Reader::open(&dir).expect("the log reads");
    let time = |name: &str, filter: Filter| {
        let started = Instant::now();
        let found = reader.query(&filter).expect("the query runs");
        println!(
            "{name:<44} {:>8.1} ms  ({} records)",
            started.elapsed().as_secs_f64() * 1000.0,
            found.len()
        );
    };
    let middle = ids[n / 2].clone();
    time(
        "--message-id",
        Filter {
            message_id: Some(middle.clone()),
            limit: 100,
            ..Default::default()
        },
    );
    time(
        "--message-id (among the newest records)",
        Filter {
            message_id: Some(ids[n - 1].clone()),
            limit: 100,
            ..Default::default()
        },
    );
    time(
        "--correlation-id",
        Filter {
            correlation_id: Some(ids[n / 4].clone()),
            limit: 100,
            ..Default::default()
        },
    );
    time(
        "--sender cpi-modena --code schema-violation",
        Filter {
            sender: Some("cpi-modena".into()),
            code: Some("schema-violation".into()),
            limit: 100,
            ..Default::default()
        },
    );
    time(
        "--sender with no records (every part sought)",
        Filter {
            sender: Some("comune-bologna".into()),
            limit: 100,
            ..Default::default()
        },
    );
    time(
        "--recipient osservatorio-er (newest 100)",
        Filter {
            recipient: Some("osservatorio-er".into()),
            limit: 100,
            ..Default::default()
        },
    );
    time(
        "--recipient comune-modena (none: full scan)",
        Filter {
            recipient: Some("comune-modena".into()),
            limit: 100,
            ..Default::default()
        },
    );
    time(
        "--since/--until (one minute, newest 100)",
        Filter {
            since_ms: Some(start_ms + n as i64 / 2),
            until_ms: Some(start_ms + n as i64 / 2 + 60_000),
            limit: 100,
            ..Default::default()
        },
    );
    let started = Instant::now();
    let verified = reader.verify().expect("verify runs");
    println!(
        "{:<44} {:>8.1} ms  ({verified:?})",
        "verify",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// User and system CPU, in seconds, of this process's thread named `name` (Linux's `/proc`).
fn thread_cpu(name: &str) -> Option<f64> {
    proc_stat::threads("self")
        .ok()?
        .into_iter()
        .find_map(|(thread, cpu)| (thread == name).then_some(cpu))
}
