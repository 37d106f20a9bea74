//! What can be checked of `deploy/` without a cluster: the systemd unit passes `systemd-analyze
//! verify`, the dashboard and the alert rules parse and only use metrics Ponte exports, the
//! Kubernetes manifests probe the right endpoints and mount every file of the configuration,
//! and the compose file parses. (The definitions file is loaded into the test broker by
//! scripts/test.sh before the tests run.)

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::repo;
use serde_json::Value;

/// Every metric `/metrics` can show (see src/ops.rs), with the histogram's series.
const METRICS: &[&str] = &[
    "ponte_messages_total",
    "ponte_latency_seconds_bucket",
    "ponte_latency_seconds_count",
    "ponte_latency_seconds_sum",
    "ponte_copies_in_flight",
    "ponte_prefetch",
    "ponte_retries_total",
    "ponte_dead_letters_total",
    "ponte_handed_back_total",
    "ponte_broker_reconnects_total",
    "ponte_flow_restarts_total",
    "ponte_lookups_total",
    "ponte_ready",
    "ponte_store_wait_seconds_bucket",
    "ponte_store_wait_seconds_count",
    "ponte_store_wait_seconds_sum",
    "ponte_log_lines_dropped_total",
    "ponte_broker_blocked",
];

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml_documents(path: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(&read(path))
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

/// The `ponte_*` names an expression uses.
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("ponte_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        found.insert(name);
    }
    found
}

fn assert_known(expr: &str, what: &str) {
    for name in metrics_in(expr) {
        assert!(
            METRICS.contains(&name.as_str()),
            "{what} uses {name}, which Ponte does not export: {expr}"
        );
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = read("deploy/systemd/ponte.service")
        .replace("/usr/local/bin/ponte", env!("CARGO_BIN_EXE_ponte"));
    let dir = std::env::temp_dir().join(format!("ponte-unit-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ponte.service");
    std::fs::write(&file, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&file)
        .output()
        .expect("systemd-analyze is installed");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        !said.contains("ponte.service:"),
        "warnings about the unit: {said}"
    );
}

#[test]
fn the_dashboard_parses_and_shows_only_exported_metrics() {
    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/ponte-dashboard.json")).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    let mut shown = BTreeSet::new();
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            assert_known(expr, panel["title"].as_str().unwrap());
            shown.extend(metrics_in(expr));
        }
    }
    for needed in [
        "ponte_messages_total",
        "ponte_latency_seconds_bucket",
        "ponte_dead_letters_total",
    ] {
        assert!(
            shown.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
}

#[test]
fn the_alert_rules_parse_and_cover_what_ops_must_hear_about() {
    let rules = &yaml_documents("deploy/prometheus/ponte-alerts.yml")[0];
    let mut names = BTreeSet::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            let expr = rule["expr"].as_str().unwrap();
            assert_known(expr, name);
            assert!(
                ["warning", "critical"].contains(&rule["labels"]["severity"].as_str().unwrap()),
                "{name}: severity"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: summary"
            );
            names.insert(name.to_string());
        }
    }
    for needed in [
        "PonteDeadLettersGrowing",
        "PonteNoConsumerOnInboundQueue",
        "PonteRejectionRateHigh",
        "PonteBrokerReconnectLoop",
    ] {
        assert!(names.contains(needed), "no rule {needed}");
    }
}

#[test]
fn the_kubernetes_deployment_probes_the_gateway_and_mounts_every_configuration_file() {
    let documents = yaml_documents("deploy/k8s/ponte.yaml");
    let deployment = documents
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    // The first start after an upgrade may re-index the data folder before /healthz answers.
    let startup = &container["startupProbe"];
    let allowed =
        startup["periodSeconds"].as_u64().unwrap() * startup["failureThreshold"].as_u64().unwrap();
    assert!(allowed >= 300, "the start-up probe allows only {allowed} s");
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    let volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    let config = volumes.iter().find(|v| v["name"] == "config").unwrap();
    let mounted: BTreeSet<String> = config["configMap"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap().to_string())
        .collect();
    let mut files = BTreeSet::new();
    for folder in ["", "partners/", "tables/"] {
        for entry in std::fs::read_dir(repo().join("config").join(folder)).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                files.insert(format!("{folder}{}", entry.file_name().to_string_lossy()));
            }
        }
    }
    assert_eq!(mounted, files, "the ConfigMap items and config/ differ");
    let secret = &yaml_documents("deploy/k8s/ponte-secret.example.yaml")[0];
    assert!(secret["stringData"]["PONTE_PSEUDONYM_KEY_OSSERVATORIO_ER"].is_string());
}

/// The image builds from the repository's copy of every crate `Cargo.toml` takes from a folder
/// (a patched dependency): a folder the Dockerfile does not copy fails `docker build`.
#[test]
fn the_dockerfile_copies_every_folder_the_build_reads() {
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    let patched = manifest["patch"]["crates-io"].as_table().unwrap();
    assert!(!patched.is_empty());
    let dockerfile = read("deploy/Dockerfile");
    for (name, dependency) in patched {
        let path = dependency["path"].as_str().unwrap();
        let top = path.split('/').next().unwrap();
        assert!(
            dockerfile.contains(&format!("COPY {top} {top}")),
            "the Dockerfile does not copy {top}, where {name} is built from"
        );
        assert!(repo().join(path).join("Cargo.toml").exists(), "{path}");
    }
}

#[test]
fn the_compose_file_runs_ponte_next_to_rabbitmq() {
    let compose = &yaml_documents("deploy/docker-compose.yml")[0];
    let services = compose["services"].as_object().unwrap();
    assert!(services.contains_key("rabbitmq"));
    let ponte = &services["ponte"];
    assert_eq!(ponte["build"]["dockerfile"], "deploy/Dockerfile");
    assert!(
        ponte["environment"]["PONTE_BROKER__URL"]
            .as_str()
            .unwrap()
            .contains("@rabbitmq:5672")
    );
    let dockerfile = read("deploy/Dockerfile");
    assert!(
        dockerfile.contains("FROM rust:1.95"),
        "build stage on the project's Rust"
    );
    assert!(dockerfile.contains("USER 10001"), "runs unprivileged");
}
