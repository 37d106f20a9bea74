//! A partner that receives by HTTP, against a real local HTTP server: copies are POSTed in order
//! with an Idempotency-Key; an endpoint answering 503 for a while gets everything once it
//! recovers, while the AMQP partners' flow goes on meanwhile (measured); an endpoint answering
//! 400 gets the copy dead-lettered after one attempt with the reason, and ops replay it once the
//! endpoint is fixed; an HTTPS endpoint of the partner's own authority that requires a client
//! certificate gets its copies with the partner file's `ca_file` and `client_identity_file`.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use common::{
    Gateway, benefit_status, broker_url, config_copy, depth, directory_from, ponte_in,
    random_prefix, recorded, wait_until,
};
use serde_json::Value;

/// What the endpoint answers, and what it saw.
#[derive(Default)]
struct Endpoint {
    /// Status to answer (200 unless set), with an optional Retry-After in seconds.
    answer: Option<(u16, Option<u64>)>,
    /// Every request: when, its Idempotency-Key, its body, and what was answered.
    requests: Vec<(Instant, Option<String>, Value, u16)>,
}

type Shared = Arc<Mutex<Endpoint>>;

async fn receive(
    State(endpoint): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let mut e = endpoint.lock().unwrap();
    let (status, retry_after) = e.answer.unwrap_or((200, None));
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    e.requests.push((Instant::now(), key, json, status));
    let mut response_headers = HeaderMap::new();
    if let Some(seconds) = retry_after {
        response_headers.insert("retry-after", seconds.to_string().parse().unwrap());
    }
    (
        StatusCode::from_u16(status).unwrap(),
        response_headers,
        format!("endpoint answered {status}: field /payload/amount not accepted"),
    )
}

/// Starts the endpoint and a gateway whose statistics partner receives by HTTP from it.
async fn start() -> (Gateway, Shared, std::path::PathBuf, String) {
    let endpoint: Shared = Arc::default();
    let app = Router::new()
        .route("/deliveries", post(receive))
        .with_state(endpoint.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let config = config_copy(|dir: &Path| {
        let file = dir.join("partners/osservatorio-er.toml");
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str(&format!(
            "\n[http]\nurl = \"http://127.0.0.1:{port}/deliveries\"\ntimeout_ms = 2000\n"
        ));
        std::fs::write(file, text).unwrap();
    });
    let prefix = random_prefix();
    let gw = Gateway::start_with(directory_from(&config, &broker_url(), &prefix)).await;
    (gw, endpoint, config, prefix)
}

fn id_of(v: &Value) -> String {
    v["message_id"].as_str().unwrap().to_string()
}

/// Sends `n` benefit statuses from INPS (each to the CPI by AMQP and to the observatory by HTTP)
/// and returns them with how long the CPI took to receive all its copies.
async fn send_statuses(gw: &Gateway, n: usize) -> (Vec<Value>, Duration) {
    let sent: Vec<Value> = (0..n).map(|_| benefit_status("naspi", "036023")).collect();
    let started = Instant::now();
    for message in &sent {
        gw.send("inps", message).await;
    }
    let at_cpi = gw.take(&gw.queues.outbound("cpi-modena"), n).await;
    assert_eq!(at_cpi.len(), n, "every AMQP copy arrives");
    (sent, started.elapsed())
}

#[tokio::test]
async fn an_endpoint_down_for_a_while_gets_everything_in_order_and_amqp_partners_are_unaffected() {
    const N: usize = 20;
    let (gw, endpoint, _config, _prefix) = start().await;

    // Baseline: the endpoint is up.
    let (before, baseline) = send_statuses(&gw, N).await;
    wait_until(
        "the baseline reaches the endpoint",
        Duration::from_secs(10),
        || endpoint.lock().unwrap().requests.len() == N,
    )
    .await;

    // The endpoint answers 503 (asking for a 1 s pause): the CPI's copies go on meanwhile.
    endpoint.lock().unwrap().answer = Some((503, Some(1)));
    let (during, outage) = send_statuses(&gw, N).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let failed: Vec<Instant> = endpoint
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|r| r.3 == 503)
        .map(|r| r.0)
        .collect();
    println!(
        "AMQP partner received {N} copies in {} ms with the HTTP endpoint up, {} ms while it answered 503 ({} refused attempts meanwhile)",
        baseline.as_millis(),
        outage.as_millis(),
        failed.len()
    );
    assert!(!failed.is_empty(), "the endpoint was tried while down");
    for pair in failed.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(950),
            "Retry-After: 1 is honoured between attempts"
        );
    }
    // The copies wait in the broker, not in the gateway: the CPI has everything already.
    gw.assert_empty(&gw.queues.outbound("cpi-modena")).await;

    endpoint.lock().unwrap().answer = None;
    wait_until(
        "the endpoint receives everything after it recovers",
        Duration::from_secs(20),
        || {
            endpoint
                .lock()
                .unwrap()
                .requests
                .iter()
                .filter(|r| r.3 == 200)
                .count()
                == 2 * N
        },
    )
    .await;
    let requests = endpoint.lock().unwrap().requests.clone();
    let delivered: Vec<&(Instant, Option<String>, Value, u16)> =
        requests.iter().filter(|r| r.3 == 200).collect();
    let expected: Vec<String> = before.iter().chain(&during).map(id_of).collect();
    let got: Vec<String> = delivered.iter().map(|r| id_of(&r.2)).collect();
    assert_eq!(got, expected, "each copy once, in the order INPS sent them");
    for (_, key, body, _) in &delivered {
        assert_eq!(
            key.as_deref(),
            Some(id_of(body).as_str()),
            "Idempotency-Key"
        );
        assert_eq!(body["recipient"], "osservatorio-er");
        let scheme = &body["subject"]["identifiers"][0]["scheme"];
        assert_eq!(scheme, "pseudonym", "mapped for the observatory");
    }
    assert_eq!(
        depth(&gw.url, &gw.queues.dead_letters("osservatorio-er")).await,
        0
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_endpoint_refusing_a_copy_gets_it_dead_lettered_then_replayed_after_the_fix() {
    let (gw, endpoint, config, prefix) = start().await;
    endpoint.lock().unwrap().answer = Some((400, None));
    let sent = benefit_status("naspi", "036023");
    gw.send("inps", &sent).await;

    let dlq = gw.queues.dead_letters("osservatorio-er");
    // Two receipts, in either order: delivered (the CPI got its copy, the observatory's went to
    // its queue) and, once the endpoint refused it, undeliverable.
    let receipts: Vec<Value> = gw
        .take(&gw.queues.receipts("inps"), 2)
        .await
        .iter()
        .map(|r| r.json())
        .collect();
    assert_eq!(receipts.len(), 2);
    let status = |r: &Value| r["payload"]["status"].as_str().unwrap().to_string();
    assert!(receipts.iter().any(|r| status(r) == "delivered"));
    let receipt = receipts
        .into_iter()
        .find(|r| status(r) == "undeliverable")
        .expect("an undeliverable receipt");
    assert_eq!(receipt["payload"]["status"], "undeliverable");
    assert_eq!(receipt["correlation_id"], sent["message_id"]);
    assert_eq!(
        receipt["payload"]["undelivered"][0]["recipient"],
        "osservatorio-er"
    );
    assert_eq!(
        endpoint.lock().unwrap().requests.len(),
        1,
        "one attempt only"
    );

    common::wait_for_depth(&gw.url, &dlq, 1, Duration::from_secs(10)).await;
    let show = ponte_in(
        &config,
        &prefix,
        &["dlq", "show", "osservatorio-er", &id_of(&sent)],
    );
    let shown = String::from_utf8_lossy(&show.stdout).into_owned();
    assert!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    assert!(shown.contains("# x-ponte-http-status: 400"), "{shown}");
    assert!(shown.contains("# x-ponte-attempts: 1"), "{shown}");
    assert!(shown.contains("# x-ponte-sender: inps"), "{shown}");
    assert!(
        shown.contains("/payload/amount not accepted"),
        "the start of the endpoint's answer is kept: {shown}"
    );

    // The endpoint is fixed; ops replay the letter.
    endpoint.lock().unwrap().answer = None;
    let replay = ponte_in(
        &config,
        &prefix,
        &[
            "dlq",
            "replay",
            "osservatorio-er",
            "--message-id",
            &id_of(&sent),
        ],
    );
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    wait_until(
        "the replayed copy is delivered",
        Duration::from_secs(10),
        || endpoint.lock().unwrap().requests.iter().any(|r| r.3 == 200),
    )
    .await;
    let requests = endpoint.lock().unwrap().requests.clone();
    let delivered: Vec<_> = requests.iter().filter(|r| r.3 == 200).collect();
    assert_eq!(delivered.len(), 1);
    assert_eq!(id_of(&delivered[0].2), id_of(&sent));
    assert_eq!(depth(&gw.url, &dlq).await, 0);
    gw.stop().await;
}

/// An HTTPS endpoint of the partner's own authority that requires a client certificate: the
/// partner file's `http.ca_file` and `http.client_identity_file` get copies through, and the
/// endpoint sees Ponte's certificate.
#[tokio::test]
async fn an_endpoint_that_requires_a_client_certificate_gets_copies_over_mutual_tls() {
    use axum::serve::Listener;
    let certs = common::Certificates::fresh();
    let listener = common::TlsListener::bind(&certs).await;
    let subjects = listener.subjects.clone();
    let port = listener.local_addr().unwrap().port();
    let endpoint: Shared = Arc::default();
    let app = Router::new()
        .route("/deliveries", post(receive))
        .with_state(endpoint.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let (ca, identity) = (certs.file("ca.pem"), certs.file("client-identity.pem"));
    let config = config_copy(|dir: &Path| {
        let file = dir.join("partners/osservatorio-er.toml");
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str(&format!(
            "\n[http]\nurl = \"https://localhost:{port}/deliveries\"\ntimeout_ms = 2000\nca_file = {ca:?}\nclient_identity_file = {identity:?}\n"
        ));
        std::fs::write(file, text).unwrap();
    });
    let gw = Gateway::start_with(directory_from(&config, &broker_url(), &random_prefix())).await;
    let (sent, _) = send_statuses(&gw, 3).await;
    wait_until(
        "three copies at the endpoint",
        Duration::from_secs(20),
        || endpoint.lock().unwrap().requests.len() >= 3,
    )
    .await;
    let received: Vec<String> = endpoint
        .lock()
        .unwrap()
        .requests
        .iter()
        .map(|r| id_of(&r.2))
        .collect();
    assert_eq!(received, sent.iter().map(id_of).collect::<Vec<_>>());
    common::TlsListener::assert_only_ponte_connected(&subjects, "endpoint");
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&certs.dir);
    let _ = std::fs::remove_dir_all(&config);
}

/// The HTTP partner's outbound queue deleted under a running gateway (an operator's mistake)
/// cancels its courier's consumer: the courier alone starts again, the queue is declared again,
/// and the next copy reaches the endpoint; no other flow restarts and the session goes on.
#[tokio::test]
async fn a_deleted_http_partner_queue_restarts_its_courier_alone() {
    let (gw, endpoint, _config, _prefix) = start().await;
    let outbound = gw.queues.outbound("osservatorio-er");
    common::delete_queue(&gw.url, &outbound).await;
    let restarts = "ponte_flow_restarts_total";
    let courier = ["flow=\"courier\"", "partner=\"osservatorio-er\""];
    wait_until("the courier restarts", Duration::from_secs(30), || {
        recorded(restarts, &courier) >= 1.0
    })
    .await;
    common::declared_with(&gw.url, &outbound, 1).await;

    let (sent, _) = send_statuses(&gw, 1).await;
    wait_until(
        "the copy reaches the endpoint",
        Duration::from_secs(20),
        || endpoint.lock().unwrap().requests.iter().any(|r| r.3 == 200),
    )
    .await;
    let requests = endpoint.lock().unwrap().requests.clone();
    assert_eq!(id_of(&requests[0].2), id_of(&sent[0]));
    common::assert_restarted_alone_once(&gw, &courier);
    gw.stop().await;
}
