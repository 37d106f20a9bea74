//! `ponte check` reports every configuration mistake at once, each with its file, and `ponte run`
//! refuses to start on a configuration that check rejects.

mod common;

use std::path::Path;
use std::process::Command;

use common::repo;

fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A copy of the demo configuration with one mistake in every file.
fn broken_config() -> tempdir::Dir {
    let dir = tempdir::Dir::new();
    let d = dir.path();
    write(
        d,
        "ponte.toml",
        &format!(
            "[broker]\nurl = \"amqp://guest:secret@127.0.0.1:5672/%2f\"\nprefech = 10\n\n[paths]\nschemas = {:?}\n",
            repo().join("schemas")
        ),
    );
    let demo = |name: &str| std::fs::read_to_string(repo().join("config").join(name)).unwrap();
    for partner in ["inps", "cpi-modena", "cpi-bologna", "osservatorio-er"] {
        let file = format!("partners/{partner}.toml");
        // A window of nothing, and one larger than broker.max_in_flight (10,000) all alone.
        let prefetch = match partner {
            "osservatorio-er" => "prefetch = 0\n",
            "cpi-bologna" => "prefetch = 20000\n",
            _ => "",
        };
        write(d, &file, &format!("{prefetch}{}", demo(&file)));
    }
    write(
        d,
        "partners/comune.toml",
        &demo("partners/comune-modena.toml"),
    );
    write(d, "partners/broken.toml", "id = \n");
    write(
        d,
        "authorization.toml",
        &(demo("authorization.toml")
            + "\n[[allow]]\nfrom = [\"inps\"]\ntype = \"pension-claim\"\nto = [\"cpi-modena\"]\n"),
    );
    write(
        d,
        "tables/offices.csv",
        &(demo("tables/offices.csv") + "cpi-bologna,CPI-BO-09,036005\n"),
    );
    write(d, "tables/codes.csv", &demo("tables/codes.csv"));
    write(
        d,
        "routes.toml",
        &demo("routes.toml").replace(
            "to = [{ partner = \"inps\" }]",
            "to = [{ partner = \"inail\" }]",
        ),
    );
    dir
}

/// Minimal self-cleaning temporary folder.
mod tempdir {
    pub struct Dir(std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            let p = std::env::temp_dir().join(format!("ponte-check-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn ponte(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ponte"))
        .args(args)
        .env_remove("PONTE_BROKER__PASSWORD")
        .output()
        .unwrap()
}

#[test]
fn demo_configuration_is_valid() {
    let out = ponte(&["check", repo().join("config").to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("5 partners"));
}

#[test]
fn check_prints_the_authorization_matrix_for_auditors() {
    let out = ponte(&["check", repo().join("config").to_str().unwrap(), "--matrix"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("FROM"))
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    // One row per sender and recipient of the demo matrix.
    assert_eq!(rows.len(), 8, "{stdout}");
    let row = |from: &str, to: &str| {
        rows.iter()
            .find(|r| r[0] == from && r[3] == to)
            .unwrap_or_else(|| panic!("no {from} -> {to} row in\n{stdout}"))
    };
    assert_eq!(row("cpi-modena", "inps")[1], "referral");
    assert_eq!(row("cpi-modena", "inps").last(), Some(&"/payload/health"));
    assert_eq!(row("inps", "comune-modena")[4], "/payload/benefit");
    assert!(!rows.iter().any(|r| r[0] == "inps" && r[1] == "referral"));
}

#[test]
fn a_partner_file_with_rights_says_where_they_moved() {
    let dir = tempdir::Dir::new();
    let d = dir.path();
    for file in [
        "ponte.toml",
        "routes.toml",
        "authorization.toml",
        "tables/offices.csv",
    ] {
        write(
            d,
            file,
            &std::fs::read_to_string(repo().join("config").join(file)).unwrap(),
        );
    }
    write(
        d,
        "ponte.toml",
        &format!("[paths]\nschemas = {:?}\n", repo().join("schemas")),
    );
    for partner in [
        "inps",
        "cpi-modena",
        "cpi-bologna",
        "comune-modena",
        "osservatorio-er",
    ] {
        let file = format!("partners/{partner}.toml");
        let mut text = std::fs::read_to_string(repo().join("config").join(&file)).unwrap();
        if partner == "inps" {
            text = text.replacen("\n", "\nmay_send = [\"benefit-status\"]\n", 1);
        }
        write(d, &file, &text);
    }
    let out = ponte(&["check", d.to_str().unwrap()]);
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(
        report.contains("rights are in authorization.toml"),
        "{report}"
    );
}

#[test]
fn check_reports_every_error_with_its_file() {
    let dir = broken_config();
    let d = dir.path();
    let out = ponte(&["check", d.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let report = String::from_utf8_lossy(&out.stderr);
    let expect = [
        ("ponte.toml", "password"),
        ("ponte.toml", "prefech"),
        ("authorization.toml", "pension-claim"),
        ("partners/comune.toml", "must equal the file name"),
        ("partners/broken.toml", "TOML parse error"),
        (
            "tables/offices.csv",
            "municipality 036005 is already covered by cpi-modena",
        ),
        ("routes.toml", "inail"),
        (
            "partners/osservatorio-er.toml",
            "prefetch must be at least 1",
        ),
        ("partners", "more than broker.max_in_flight (10000)"),
    ];
    for (file, needle) in expect {
        let path = d.join(file);
        let line = format!("{}: ", path.display());
        assert!(
            report
                .lines()
                .any(|l| l.starts_with(&line) && l.contains(needle)),
            "no error about {needle:?} in {file}:\n{report}"
        );
    }
    assert!(
        report.trim_end().ends_with("configuration errors"),
        "{report}"
    );
}

#[test]
fn run_refuses_a_configuration_that_check_rejects() {
    let dir = broken_config();
    let out = ponte(&["run", "--config", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(report.contains("refusing to start"), "{report}");
    assert!(report.contains("pension-claim"), "{report}");
}

#[test]
fn deploy_definitions_match_the_demo_topology() {
    let out = ponte(&[
        "definitions",
        "--config",
        repo().join("config").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/definitions.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        generated, committed,
        "deploy/definitions.json is stale: regenerate it with `ponte definitions > deploy/definitions.json`"
    );
    // Five queues per partner, ten delay queues (1 s doubling to 256 s, then 300 s) and the
    // redelivery queue.
    assert_eq!(
        committed["queues"].as_array().unwrap().len(),
        5 * 5 + 10 + 1
    );
}

#[test]
fn partner_keys_are_needed_to_run_and_check_but_not_by_the_tools() {
    let config = repo().join("config");
    let without_key = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ponte"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .env_remove("PONTE_PSEUDONYM_KEY_OSSERVATORIO_ER")
            .output()
            .unwrap()
    };
    let check = without_key(&["check"]);
    assert_eq!(check.status.code(), Some(1));
    let report = String::from_utf8_lossy(&check.stderr);
    assert!(
        report.contains("PONTE_PSEUDONYM_KEY_OSSERVATORIO_ER is not set"),
        "{report}"
    );
    let run = without_key(&["run"]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("refusing to start"));
    // Acting as a partner or an operator needs no partner's key.
    let definitions = without_key(&["definitions"]);
    assert!(
        definitions.status.success(),
        "{}",
        String::from_utf8_lossy(&definitions.stderr)
    );
}
