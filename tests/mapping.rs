//! Mapping and data protection on a real broker: every recipient gets the case in its own terms
//! (its case reference, its registry number, its codes) and only what it may see (pseudonyms,
//! field lists); a recipient whose mapping fails does not stop the others; code tables reload on
//! SIGHUP; the crosswalk survives restarts; a partner's look-up service is asked over HTTP.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{
    Gateway, benefit_status, broker_url, config_copy, depth, directory, directory_from,
    random_prefix, referral,
};
use ponte::partner::Secret;
use serde_json::{Value, json};

const CF: &str = "BNCGVN70A41F257X";
const OTHER_CF: &str = "RSSMRA85T10A562S";
const THIRD_CF: &str = "VRDLGU80A01F257C";

fn about(mut m: Value, cf: &str) -> Value {
    m["subject"]["identifiers"] = json!([{"scheme": "it.cf", "value": cf}]);
    m
}

#[tokio::test]
async fn an_answer_arrives_with_the_recipients_own_case_reference() {
    let gw = Gateway::start().await;
    // The CPI refers a person to INPS under its own reference.
    let mut asked = referral("cpi-modena", "CPI-MO-02", "036005");
    asked["payload"]["referral_id"] = json!("CPI-MO-2026-17");
    gw.send("cpi-modena", &asked).await;
    let at_inps = gw.take(&gw.queues.outbound("inps"), 1).await[0].json();
    assert!(at_inps.get("recipient_reference").is_none(), "{at_inps}");

    // INPS answers under its own application number.
    let mut answer = benefit_status("naspi", "036005");
    answer["correlation_id"] = asked["message_id"].clone();
    answer["payload"]["application_id"] = json!("INPS-APP-555");
    gw.send("inps", &answer).await;
    let at_cpi = gw.take(&gw.queues.outbound("cpi-modena"), 1).await[0].json();
    assert_eq!(at_cpi["message_id"], answer["message_id"]);
    assert_eq!(at_cpi["recipient_reference"], "CPI-MO-2026-17");
    assert_eq!(at_cpi["payload"]["application_id"], "INPS-APP-555");

    // From then on, every message about the case carries the recipient's reference, both ways.
    let mut later = benefit_status("naspi", "036005");
    later["payload"]["application_id"] = json!("INPS-APP-555");
    later["payload"]["status"] = json!("terminated");
    gw.send("inps", &later).await;
    let at_cpi = gw.take(&gw.queues.outbound("cpi-modena"), 1).await[0].json();
    assert_eq!(at_cpi["recipient_reference"], "CPI-MO-2026-17");
    let mut follow_up = referral("cpi-modena", "CPI-MO-02", "036005");
    follow_up["payload"]["referral_id"] = json!("CPI-MO-2026-17");
    follow_up["payload"]["reason"] = json!("non-compliance");
    gw.send("cpi-modena", &follow_up).await;
    let at_inps = gw.take(&gw.queues.outbound("inps"), 1).await[0].json();
    assert_eq!(at_inps["recipient_reference"], "INPS-APP-555");
    // (The observatory got both benefit messages; it has no case reference of its own.)
    let observed = gw.take(&gw.queues.outbound("osservatorio-er"), 2).await;
    assert_eq!(observed.len(), 2);
    assert!(
        observed
            .iter()
            .all(|m| m.json().get("recipient_reference").is_none())
    );
    assert_eq!(gw.take(&gw.queues.receipts("inps"), 2).await.len(), 2);
    // A sender cannot set the reference itself.
    let mut forged = benefit_status("naspi", "036005");
    forged["recipient_reference"] = json!("CPI-MO-2026-17");
    let (receipt, _) = gw
        .expect_rejection("inps", &serde_json::to_vec(&forged).unwrap())
        .await;
    assert_eq!(
        receipt["payload"]["errors"][0]["path"],
        "/recipient_reference"
    );
    gw.stop().await;
}

#[tokio::test]
async fn the_case_crosswalk_survives_a_gateway_restart() {
    let url = broker_url();
    let prefix = random_prefix();
    let gw = Gateway::start_with(directory(&url, &prefix)).await;
    let mut asked = referral("cpi-bologna", "CPI-BO-01", "037006");
    asked["payload"]["referral_id"] = json!("CPI-BO-88");
    gw.send("cpi-bologna", &asked).await;
    assert_eq!(gw.take(&gw.queues.outbound("inps"), 1).await.len(), 1);
    gw.stop_keeping_queues().await;

    let gw = Gateway::start_with(directory(&url, &prefix)).await;
    let mut answer = benefit_status("dis-coll", "037006");
    answer["correlation_id"] = asked["message_id"].clone();
    gw.send("inps", &answer).await;
    let at_cpi = gw.take(&gw.queues.outbound("cpi-bologna"), 1).await[0].json();
    assert_eq!(at_cpi["recipient_reference"], "CPI-BO-88");
    gw.stop().await;
}

#[tokio::test]
async fn the_comune_receives_its_registry_number_instead_of_the_codice_fiscale() {
    let gw = Gateway::start().await;
    // The comune's own referral carries its registry number next to the codice fiscale.
    let mut own = referral("comune-modena", "SS-MO-01", "036023");
    own["payload"]["reason"] = json!("employment-readiness");
    own["subject"]["identifiers"] = json!([
        {"scheme": "local", "value": "ANA-2026-0042"},
        {"scheme": "it.cf", "value": CF}
    ]);
    gw.send("comune-modena", &own).await;
    let at_cpi = gw.take(&gw.queues.outbound("cpi-modena"), 1).await[0].json();
    // The comune's registry number is its own business: the CPI gets the codice fiscale.
    assert_eq!(
        at_cpi["subject"]["identifiers"],
        json!([{"scheme": "it.cf", "value": CF}])
    );

    gw.send("inps", &about(benefit_status("adi", "036023"), CF))
        .await;
    let at_comune = gw.take(&gw.queues.outbound("comune-modena"), 1).await[0].json();
    assert_eq!(
        at_comune["subject"]["identifiers"],
        json!([{"scheme": "local", "value": "ANA-2026-0042"}])
    );
    assert_eq!(at_comune["payload"]["benefit"], "ASS-INCL");
    assert!(!at_comune.to_string().contains(CF));
    gw.stop().await;
}

#[tokio::test]
async fn the_statistics_partner_receives_only_pseudonyms_and_its_fields() {
    let gw = Gateway::start().await;
    let key = std::env::var("PONTE_PSEUDONYM_KEY_OSSERVATORIO_ER").unwrap();
    let expected = ponte::map::pseudonym(&Secret::new(key), "it.cf", CF);
    for benefit in ["naspi", "dis-coll"] {
        gw.send("inps", &about(benefit_status(benefit, "036023"), CF))
            .await;
    }
    let copies = gw.take(&gw.queues.outbound("osservatorio-er"), 2).await;
    assert_eq!(copies.len(), 2);
    for copy in &copies {
        let v = copy.json();
        assert_eq!(
            v["subject"]["identifiers"],
            json!([{"scheme": "pseudonym", "value": expected}])
        );
        assert!(
            !copy.text().contains(CF),
            "the codice fiscale reached statistics"
        );
        let mut fields: Vec<&String> = v["payload"].as_object().unwrap().keys().collect();
        fields.sort();
        assert_eq!(
            fields,
            ["benefit", "effective_date", "municipality", "status"]
        );
    }
    // The CPI, meanwhile, got the person's real identifier.
    let at_cpi = gw.take(&gw.queues.outbound("cpi-modena"), 2).await;
    assert_eq!(at_cpi[0].json()["subject"]["identifiers"][0]["value"], CF);
    gw.stop().await;
}

#[tokio::test]
async fn health_data_never_reaches_inps_and_reasons_arrive_in_its_codes() {
    let gw = Gateway::start().await;
    let mut sent = referral("cpi-modena", "CPI-MO-01", "036023");
    sent["payload"]["reason"] = json!("disability-assessment");
    sent["payload"]["health"] =
        json!({"work_limitations": "no lifting", "disability_percentage": 46});
    gw.send("cpi-modena", &sent).await;
    let at_inps = gw.take(&gw.queues.outbound("inps"), 1).await.remove(0);
    let v = at_inps.json();
    assert!(v["payload"].get("health").is_none(), "{v}");
    assert!(!at_inps.text().contains("no lifting"));
    assert_eq!(v["payload"]["reason"], "R06");
    assert_eq!(v["payload"]["legal_basis"], sent["payload"]["legal_basis"]);
    gw.stop().await;
}

#[tokio::test]
async fn a_recipient_whose_mapping_fails_does_not_stop_the_others() {
    let gw = Gateway::start().await;
    // The comune does not know this person: its copy cannot be made.
    let sent = about(benefit_status("adi", "036023"), OTHER_CF);
    gw.send("inps", &sent).await;
    assert_eq!(gw.take(&gw.queues.outbound("cpi-modena"), 1).await.len(), 1);
    assert_eq!(
        gw.take(&gw.queues.outbound("osservatorio-er"), 1)
            .await
            .len(),
        1
    );
    let receipt = gw.receipt("inps").await;
    let p = &receipt["payload"];
    assert_eq!(p["status"], "partial");
    assert_eq!(p["code"], "unmappable-identifier");
    assert_eq!(p["recipients"], json!(["cpi-modena", "osservatorio-er"]));
    assert_eq!(p["undelivered"][0]["recipient"], "comune-modena");
    assert_eq!(p["undelivered"][0]["code"], "unmappable-identifier");
    assert_eq!(
        p["undelivered"][0]["errors"][0]["path"],
        "/subject/identifiers"
    );
    assert_eq!(p["undelivered"][0]["errors"][0]["keyword"], "crosswalk");
    assert!(!receipt.to_string().contains(OTHER_CF));
    // The original is parked for ops, saying for whom it failed.
    let parked = gw.take(&gw.queues.rejected("inps"), 1).await;
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].json()["message_id"], sent["message_id"]);
    assert_eq!(
        parked[0].header("x-ponte-recipients").as_deref(),
        Some("comune-modena")
    );
    assert_eq!(
        parked[0].header("x-ponte-code").as_deref(),
        Some("unmappable-identifier")
    );
    gw.assert_empty(&gw.queues.outbound("comune-modena")).await;
    gw.stop().await;
}

/// Reads a child's JSON log lines as they come.
fn log_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<Value> {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && tx.send(v).is_err()
            {
                break;
            }
        }
    });
    rx
}

fn wait_for_log(rx: &std::sync::mpsc::Receiver<Value>, message: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let event = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no log line {message:?} within 30 s"));
        if event["message"] == message {
            return event;
        }
    }
}

#[tokio::test]
async fn sighup_reloads_the_code_tables_and_keeps_them_when_the_new_ones_are_wrong() {
    let url = broker_url();
    let prefix = random_prefix();
    let config = config_copy(|_| {});
    let codes = config.join("tables/codes.csv");
    let demo_codes = std::fs::read_to_string(&codes).unwrap();
    let mut child = common::ponte_run(&config, &url, &prefix)
        .env("PONTE_LOG__FORMAT", "json")
        .env("PONTE_LOG__LEVEL", "info")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let logs = log_lines(&mut child);
    wait_for_log(&logs, "gateway ready");
    let directory = directory_from(&config, &url, &prefix);
    let queues = ponte::broker::Queues::new(&prefix);
    let reason_at_inps = async || {
        let m = referral("cpi-modena", "CPI-MO-01", "036023");
        common::publish_many(
            &url,
            &queues.inbound("cpi-modena"),
            &[serde_json::to_vec(&m).unwrap()],
        )
        .await;
        let got = common::drain(&url, &queues.outbound("inps"), 1, Duration::from_secs(20)).await;
        got[0].json()["payload"]["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(reason_at_inps().await, "R01");

    // A broken table: reported, and the old tables stay in force.
    std::fs::write(
        &codes,
        demo_codes.replace("did-registered,R01", "did-register,R01"),
    )
    .unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let error = wait_for_log(&logs, "code table error");
    assert!(
        error["error"].as_str().unwrap().contains("did-register"),
        "{error}"
    );
    wait_for_log(
        &logs,
        "code tables not reloaded; the previous tables stay in force",
    );
    assert_eq!(reason_at_inps().await, "R01");

    // A good one: the next message uses it.
    std::fs::write(
        &codes,
        demo_codes.replace("did-registered,R01", "did-registered,DID"),
    )
    .unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    wait_for_log(&logs, "code tables reloaded");
    assert_eq!(reason_at_inps().await, "DID");

    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    common::delete_queues(&directory).await;
    let _ = std::fs::remove_dir_all(&config);
    let _ = std::fs::remove_dir_all(common::data_dir(&prefix));
}

/// A comune registry look-up service: knows one person; can be made slow.
struct Registry {
    port: u16,
    slow: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

async fn registry() -> Registry {
    registry_on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()).await
}

/// The same service, on `listener`.
async fn registry_on<L>(listener: L) -> Registry
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
    #[derive(Clone)]
    struct S {
        slow: Arc<AtomicBool>,
        calls: Arc<AtomicUsize>,
    }
    async fn lookup(State(s): State<S>, Json(q): Json<Value>) -> Result<Json<Value>, StatusCode> {
        s.calls.fetch_add(1, Ordering::SeqCst);
        if s.slow.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        if q["scheme"] == "it.cf" && q["value"] == CF {
            Ok(Json(json!({"local": "ANA-REG-777"})))
        } else {
            Err(StatusCode::NOT_FOUND)
        }
    }
    let state = S {
        slow: Arc::new(AtomicBool::new(false)),
        calls: Arc::new(AtomicUsize::new(0)),
    };
    let app = Router::new()
        .route("/lookup", post(lookup))
        .with_state(state.clone());
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Registry {
        port,
        slow: state.slow,
        calls: state.calls,
    }
}

/// The demo configuration with the comune's look-up service: `resolver` holds the lines of its
/// `[resolver]` section.
fn with_resolver(resolver: &str) -> std::path::PathBuf {
    config_copy(|dir| {
        let file = dir.join("partners/comune-modena.toml");
        let text = std::fs::read_to_string(&file).unwrap() + "\n[resolver]\n" + resolver;
        std::fs::write(file, text).unwrap();
    })
}

/// A benefit status about the person the registry knows: the comune gets its registry number.
async fn the_comune_gets_the_registry_number(gw: &Gateway) {
    gw.send("inps", &about(benefit_status("adi", "036023"), CF))
        .await;
    let at_comune = gw.take(&gw.queues.outbound("comune-modena"), 1).await[0].json();
    assert_eq!(
        at_comune["subject"]["identifiers"],
        json!([{"scheme": "local", "value": "ANA-REG-777"}])
    );
}

/// A registry with a certificate of the comune's own authority that requires a client
/// certificate is asked with the partner file's `resolver.ca_file` and
/// `resolver.client_identity_file`.
#[tokio::test]
async fn the_look_up_service_is_reached_over_mutual_tls() {
    let certs = common::Certificates::fresh();
    let listener = common::TlsListener::bind(&certs).await;
    let subjects = listener.subjects.clone();
    let registry = registry_on(listener).await;
    let (ca, identity) = (certs.file("ca.pem"), certs.file("client-identity.pem"));
    let config = with_resolver(&format!(
        "url = \"https://localhost:{}/lookup\"\ntimeout_ms = 2000\nca_file = {ca:?}\nclient_identity_file = {identity:?}\n",
        registry.port
    ));
    let gw = Gateway::start_with(directory_from(&config, &broker_url(), &random_prefix())).await;
    the_comune_gets_the_registry_number(&gw).await;
    assert_eq!(registry.calls.load(Ordering::SeqCst), 1);
    common::TlsListener::assert_only_ponte_connected(&subjects, "registry");
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&certs.dir);
    let _ = std::fs::remove_dir_all(&config);
}

#[tokio::test]
async fn the_comunes_look_up_service_answers_what_the_crosswalk_does_not_know() {
    let registry = registry().await;
    let config = with_resolver(&format!(
        "url = \"http://127.0.0.1:{}/lookup\"\ntimeout_ms = 500\n",
        registry.port
    ));
    let gw = Gateway::start_with(directory_from(&config, &broker_url(), &random_prefix())).await;

    the_comune_gets_the_registry_number(&gw).await;
    // Asked again: answered from the cache, not by another call.
    gw.send("inps", &about(benefit_status("sfl", "036023"), CF))
        .await;
    assert_eq!(
        gw.take(&gw.queues.outbound("comune-modena"), 1).await.len(),
        1
    );
    assert_eq!(registry.calls.load(Ordering::SeqCst), 1);
    assert_eq!(gw.take(&gw.queues.receipts("inps"), 2).await.len(), 2);

    // Unknown to the registry (404): refused for the comune only.
    gw.send("inps", &about(benefit_status("adi", "036023"), OTHER_CF))
        .await;
    let receipt = gw.receipt("inps").await;
    assert_eq!(receipt["payload"]["status"], "partial");
    assert_eq!(
        receipt["payload"]["undelivered"][0]["recipient"],
        "comune-modena"
    );

    // The service times out: the message is not rejected and nobody gets a copy yet; it waits
    // in its queue and is delivered once the service answers again.
    gw.take(&gw.queues.outbound("cpi-modena"), 3).await;
    gw.take(&gw.queues.outbound("osservatorio-er"), 3).await;
    registry.slow.store(true, Ordering::SeqCst);
    // A person the cache has not seen: the look-up really happens.
    let waiting = about(benefit_status("adi", "036023"), THIRD_CF);
    gw.send("inps", &waiting).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(depth(&gw.url, &gw.queues.outbound("cpi-modena")).await, 0);
    assert_eq!(depth(&gw.url, &gw.queues.receipts("inps")).await, 0);
    assert_eq!(
        depth(&gw.url, &gw.queues.rejected("inps")).await,
        1,
        "only the 404 one"
    );
    assert!(
        registry.calls.load(Ordering::SeqCst) >= 3,
        "the look-up was retried"
    );
    registry.slow.store(false, Ordering::SeqCst);
    let at_cpi = gw.take(&gw.queues.outbound("cpi-modena"), 1).await;
    assert_eq!(at_cpi.len(), 1);
    assert!(
        common::drain(
            &gw.url,
            &gw.queues.outbound("cpi-modena"),
            1,
            Duration::from_secs(2)
        )
        .await
        .is_empty(),
        "delivered more than once"
    );
    assert_eq!(at_cpi[0].json()["message_id"], waiting["message_id"]);
    let receipt = gw.receipt("inps").await;
    assert_eq!(
        receipt["payload"]["status"], "partial",
        "404 for this person"
    );
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&config);
}
