//! The benchmark keeps working: a 2,000-message run of `ponte-bench` (two rounds) against a
//! broker of its own (with the shovel plugin) produces a full row of figures, and a run,
//! finished or interrupted, leaves nothing behind on the broker; so does `ponte-bench-clients`,
//! the AMQP clients alone. No figure is judged: timings belong to the benchmark, not to the tests.

mod common;

use common::PrivateBroker;

#[test]
fn a_small_benchmark_run_produces_every_figure() {
    let broker = PrivateBroker::start_with_plugins("rabbitmq_shovel");
    let work = broker.dir.join("bench");
    let csv = work.join("results.csv");
    let status = ponte_bench(&broker, &csv, &work)
        .args([
            "--messages",
            "2000",
            "--partners",
            "6",
            "--latency-secs",
            "2",
            "--forwarder",
            "--rounds",
            "2",
            "--ids",
            "v7",
            "--scenario",
            "smoke",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let row: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(header.len(), row.len());
    let field = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!(field("scenario"), "smoke");
    assert_eq!(field("messages"), "2000");
    assert_eq!(field("ids"), "v7");
    assert_eq!(field("partners"), "6");
    assert_eq!(
        field("classic_queue_version"),
        "",
        "the broker's own default"
    );
    let number = |name: &str| -> f64 {
        field(name)
            .parse()
            .unwrap_or_else(|_| panic!("{name} = {:?}", field(name)))
    };
    for name in [
        "shovel_msgs_per_s",
        "ponte_msgs_per_s",
        "ratio",
        "cpu_us_per_msg",
        "peak_rss_mib",
        "latency_p50_ms",
        "latency_p99_ms",
        "forwarder_msgs_per_s",
        "forwarder_latency_p50_ms",
        "forwarder_latency_p99_ms",
        "latency_cpu_us_per_msg",
    ] {
        let value = number(name);
        assert!(value > 0.0, "{name} = {value}");
    }
    // Ponte's CPU by thread: the workers handle every message, and the three parts are
    // within the whole. Each is counted in the kernel's ticks (10 ms, 5 µs a message over
    // 2,000), and rounded apart from the whole: up to four ticks each are allowed.
    let parts = [
        "cpu_workers_us_per_msg",
        "cpu_store_us_per_msg",
        "cpu_log_us_per_msg",
    ];
    assert!(number(parts[0]) > 0.0, "{}", number(parts[0]));
    for part in parts {
        assert!(number(part) >= 0.0, "{part} = {}", number(part));
    }
    let sum: f64 = parts.iter().map(|p| number(p)).sum();
    assert!(
        sum <= number("cpu_us_per_msg") + parts.len() as f64 * 4.0 * 5.0,
        "the parts ({sum:.1} µs) outgrow the whole ({} µs)",
        number("cpu_us_per_msg")
    );
    // Two rounds: the medians lie within the rounds' ranges.
    assert_eq!(field("rounds"), "2");
    for (median, low, high) in [
        ("ratio", "ratio_min", "ratio_max"),
        (
            "ponte_msgs_per_s",
            "ponte_msgs_per_s_min",
            "ponte_msgs_per_s_max",
        ),
        ("cpu_us_per_msg", "cpu_us_per_msg_min", "cpu_us_per_msg_max"),
        ("latency_p99_ms", "latency_p99_min_ms", "latency_p99_max_ms"),
        (
            "shovel_latency_p99_ms",
            "shovel_latency_p99_min_ms",
            "shovel_latency_p99_max_ms",
        ),
        (
            "forwarder_latency_p99_ms",
            "forwarder_latency_p99_min_ms",
            "forwarder_latency_p99_max_ms",
        ),
    ] {
        assert!(
            number(low) > 0.0
                && number(low) <= number(median) + 0.01
                && number(median) <= number(high) + 0.01,
            "{low} {median} {high}: {} {} {}",
            field(low),
            field(median),
            field(high)
        );
    }
    // Latency was measured each round, each mover's samples in a file of their own.
    for round in ["round1", "round2"] {
        for mover in ["", "-shovel", "-forwarder"] {
            let samples = work.join(format!("latency-smoke{mover}-{round}.csv"));
            let text = std::fs::read_to_string(&samples).unwrap();
            assert!(
                text.starts_with("sent_ms,sent_unix_ms,latency_ms,queue\n"),
                "{text:.200}"
            );
            assert!(
                text.lines().count() > 1,
                "{}: no samples",
                samples.display()
            );
        }
    }
    // The plot has a line for Ponte, one for the shovel and one for the forwarder.
    let plot = std::fs::read_to_string(work.join("latency-smoke.svg")).unwrap();
    assert!(plot.starts_with("<svg"), "{plot}");
    assert_eq!(plot.matches("<polyline").count(), 3, "{plot}");
    assert!(
        plot.contains(">Ponte: p50")
            && plot.contains(">shovel: p50")
            && plot.contains(">no-op forwarder: p50"),
        "{plot}"
    );
    // The run leaves the broker as it found it, and no data folder behind.
    assert_eq!(left_on_broker(&broker), "", "after a finished run");
    let config = work.join("config-smoke");
    assert!(config.join("ponte.toml").exists());
    assert!(!config.join("data").exists(), "the data folder is removed");

    // With the load spread as Ponte gets it: a shovel from each sender's queue, set and
    // cleared together; and the forwarder publishing each message to a queue for each one
    // Ponte publishes it to, which go with the run too. The broker has a policy of its own,
    // which the run names, and leaves.
    broker.ctl(&[
        "set_policy",
        "someone-elses",
        "^elsewhere$",
        r#"{"max-length":1}"#,
    ]);
    let output = ponte_bench(&broker, &csv, &work)
        .args([
            "--messages",
            "600",
            "--partners",
            "6",
            "--shovel-per-sender",
            "--forwarder",
            "--fan-out",
            // The forwarder's own work, held acks and mandatory copies, to stand for a gateway's.
            "--forwarder-busy-us",
            "20",
            "--forwarder-busy-mib",
            "1",
            "--forwarder-ack-delay-ms",
            "5",
            "--forwarder-mandatory",
            "--classic-queue-version",
            "2",
            "--scenario",
            "spread",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("the broker has policies") && stderr.contains("someone-elses"),
        "{stderr}"
    );
    broker.ctl(&["clear_policy", "someone-elses"]);
    // More destinations than senders: the recipients' queues, and the senders' rejected and
    // receipt queues.
    let fanned = stderr
        .split_once("published per message over ")
        .and_then(|(_, rest)| rest.split_once(" queues"))
        .and_then(|(n, _)| n.parse::<usize>().ok());
    assert!(fanned.is_some_and(|n| n > 5), "{fanned:?}: {stderr}");
    assert!(
        stderr.contains(
            "20 µs of it a busy loop per message reading 1 MiB, acks held 5 ms, copies mandatory"
        ),
        "{stderr}"
    );
    let text = std::fs::read_to_string(&csv).unwrap();
    let spread: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("spread,"))
        .unwrap()
        .split(',')
        .collect();
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
    assert_eq!(row[column("shovel_sources")], "1");
    // The institute and the employment centres send; the others only receive.
    assert_eq!(spread[column("shovel_sources")], "5", "{text}");
    assert_eq!(spread[column("classic_queue_version")], "2", "{text}");
    for name in ["shovel_msgs_per_s", "forwarder_msgs_per_s"] {
        let rate: f64 = spread[column(name)].parse().unwrap();
        assert!(rate > 0.0, "{name}: {text}");
    }
    assert_eq!(left_on_broker(&broker), "", "after a spread run");

    // Interrupted while Ponte drains: neither the gateway nor the run's queues stay behind to
    // load the broker under the next run. A source queue of a forwarder, as a latency run of the
    // same row interrupted earlier would have left it, goes too.
    let leftover = "bench-forwarder-latency-stopped.src.1";
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(common::publish_many(
            &broker.url(),
            leftover,
            &[b"{}".to_vec()],
        ));
    assert!(left_on_broker(&broker).contains(leftover));
    let mut bench = ponte_bench(&broker, &csv, &work)
        .args([
            "--messages",
            "20000",
            "--no-shovel",
            "--classic-queue-version",
            "2",
            "--scenario",
            "stopped",
        ])
        .spawn()
        .unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let gateway = loop {
        let running = children(bench.id())
            .into_iter()
            .find(|pid| command_of(*pid).as_deref() == Some("ponte"));
        if let Some(pid) = running {
            break pid;
        }
        assert!(
            std::time::Instant::now() < until,
            "the benchmark never started ponte"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    std::thread::sleep(std::time::Duration::from_secs(1));
    // Every queue of the run is under the run's storage-version policy: Ponte's, and the
    // forwarder's source left by the earlier run of the same row.
    let listed = broker.ctl(&[
        "list_queues",
        "name",
        "policy",
        "--quiet",
        "--no-table-headers",
    ]);
    let queues: Vec<&str> = listed.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(queues.len() > 5, "{listed}");
    for queue in &queues {
        assert!(queue.trim_end().ends_with("-queue-version"), "{listed}");
    }
    assert!(listed.contains(leftover), "{listed}");
    unsafe { libc::kill(bench.id() as i32, libc::SIGINT) };
    let status = bench.wait().unwrap();
    assert!(!status.success());
    assert_eq!(command_of(gateway), None, "the gateway still runs");
    assert_eq!(left_on_broker(&broker), "", "after an interrupted run");
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(!text.contains("stopped"), "an interrupted run wrote a row");
}

/// `ponte-bench` on `broker`, measuring the `ponte` built with the tests, appending to `csv`
/// and writing its other files in `work`.
fn ponte_bench(
    broker: &PrivateBroker,
    csv: &std::path::Path,
    work: &std::path::Path,
) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ponte-bench"));
    command
        .arg("--csv")
        .arg(csv)
        .arg("--work")
        .arg(work)
        .args(["--url", &broker.url()])
        .args([
            "--node",
            &format!("{} {} {}", broker.name, broker.port, broker.dir.display()),
        ])
        .args(["--ponte", env!("CARGO_BIN_EXE_ponte")]);
    command
}

/// The broker's queues, shovels and policies, one per line (empty when it has none).
fn left_on_broker(broker: &PrivateBroker) -> String {
    let mut left = broker.ctl(&["list_queues", "name", "--quiet", "--no-table-headers"]);
    left += &broker.ctl(&["list_parameters", "--quiet", "--no-table-headers"]);
    left += &broker.ctl(&["list_policies", "--quiet", "--no-table-headers"]);
    left.trim().to_string()
}

/// The processes `pid` started that still run.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// The command name of a running process.
fn command_of(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_string())
}

#[test]
fn the_mapping_benchmark_prints_a_cost_for_every_demo_message() {
    let stdout = printed(
        env!("CARGO_BIN_EXE_ponte-bench-mapping"),
        &["--iterations", "50"],
    );
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().rev().take(4).collect())
        .collect();
    // Per row, from the right: pipeline µs, validate µs, copies, bytes.
    let copies: Vec<&str> = rows.iter().map(|r| r[2]).collect();
    assert_eq!(copies, ["1", "2", "2", "3", "0"], "{stdout}");
    for row in &rows {
        for figure in &row[..2] {
            let value: f64 = figure.parse().unwrap();
            assert!(value > 0.0, "{stdout}");
        }
    }
}

#[test]
fn the_delivery_log_benchmark_writes_queries_and_verifies() {
    let stdout = printed(env!("CARGO_BIN_EXE_ponte-bench-log"), &["2000"]);
    assert!(stdout.starts_with("wrote 2000 records"), "{stdout}");
    assert!(stdout.contains("--message-id"), "{stdout}");
    assert!(
        stdout.contains("(1 records)"),
        "the message is found: {stdout}"
    );
    assert!(
        stdout.contains("(Ok(2000))"),
        "the chain verifies: {stdout}"
    );
}

/// What a benchmark binary prints, once it has succeeded.
fn printed(binary: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(binary)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ponte-bench-clients` keeps working: on the suite's broker, each client's no-op forwarder
/// moves a small backlog and a short fixed-rate load, every message arrives (the tool fails
/// otherwise), each row of its table has a rate and a CPU figure, and its queues are gone after.
#[test]
fn the_client_comparison_moves_every_message_with_both_clients() {
    let prefix = common::random_prefix();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ponte-bench-clients"))
        .args(["--url", &common::broker_url(), "--prefix", &prefix])
        .args(["--messages", "500", "--rate", "200", "--rate-secs", "1"])
        .args(["--rounds", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let table = String::from_utf8(output.stdout).unwrap();
    let rows: Vec<(&str, &str)> = table
        .lines()
        .skip(1)
        .map(|line| {
            let client = line.split_whitespace().next().unwrap();
            let load = if line.contains("backlog of 500") {
                "backlog"
            } else if line.contains("200 msg/s for 1 s") {
                "rate"
            } else {
                panic!("a row of neither load: {line}")
            };
            // …, msg/s, µs CPU/msg, (their range).
            let words: Vec<&str> = line.split_whitespace().collect();
            let rate: f64 = words[words.len() - 3].parse().unwrap();
            let cpu: f64 = words[words.len() - 2].parse().unwrap();
            assert!(rate > 0.0 && cpu > 0.0, "{line}");
            (client, load)
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("lapin", "backlog"),
            ("lapin", "rate"),
            ("amqprs", "backlog"),
            ("amqprs", "rate")
        ]
    );
    let queues = common::shared_broker_ctl_output(&["list_queues", "name"]);
    assert!(!queues.contains(&prefix), "queues left behind: {queues}");
}
