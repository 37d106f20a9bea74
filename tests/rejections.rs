//! Every rejection code the core pipeline produces, as a sending system sees it: a receipt with
//! the code and the errors (JSON pointer, rule, message), the original parked in the sender's
//! rejected queue with its reason, nothing delivered, and the queue moving on.

mod common;

use common::{Gateway, benefit_status, referral};
use serde_json::{Value, json};

/// Sends `body` as `partner` and checks the rejection: code, first error's path and keyword.
async fn rejected(
    gw: &Gateway,
    partner: &str,
    body: &[u8],
    code: &str,
    path: &str,
    keyword: &str,
) -> Value {
    let (receipt, parked) = gw.expect_rejection(partner, body).await;
    assert_eq!(receipt["payload"]["status"], "rejected", "{receipt}");
    assert_eq!(receipt["payload"]["code"], code, "{receipt}");
    assert_eq!(receipt["payload"]["recipients"], json!([]));
    let first = &receipt["payload"]["errors"][0];
    assert_eq!(first["path"], path, "{receipt}");
    assert_eq!(first["keyword"], keyword, "{receipt}");
    assert!(!first["message"].as_str().unwrap().is_empty());
    assert!(
        gw.directory.schemas.is_valid("receipt", "1.0", &receipt),
        "{receipt}"
    );
    // The parked original is byte for byte what was sent, with the reason in its headers.
    assert_eq!(parked.body, body);
    assert_eq!(parked.header("x-ponte-code").as_deref(), Some(code));
    assert_eq!(parked.header("x-ponte-partner").as_deref(), Some(partner));
    assert!(
        parked
            .header("x-ponte-reason")
            .is_some_and(|r| !r.is_empty())
    );
    let errors: Value = serde_json::from_str(&parked.header("x-ponte-errors").unwrap()).unwrap();
    assert_eq!(errors, receipt["payload"]["errors"]);
    receipt
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

#[tokio::test]
async fn not_json_is_invalid_json_and_still_answered() {
    let gw = Gateway::start().await;
    let receipt = rejected(
        &gw,
        "cpi-modena",
        b"<referral>not json</referral>",
        "invalid-json",
        "",
        "json",
    )
    .await;
    assert!(receipt.get("correlation_id").is_none());
    gw.stop().await;
}

#[tokio::test]
async fn invalid_utf8_is_invalid_json() {
    let gw = Gateway::start().await;
    let mut body = bytes(&referral("cpi-modena", "CPI-MO-01", "036023"));
    let at = body.windows(3).position(|w| w == b"D.L").unwrap();
    body[at] = 0xff;
    rejected(&gw, "cpi-modena", &body, "invalid-json", "", "utf8").await;
    gw.stop().await;
}

#[tokio::test]
async fn over_size_is_too_large() {
    let gw = Gateway::start().await;
    let mut m = referral("cpi-modena", "CPI-MO-01", "036023");
    m["payload"]["notes"] = json!("x".repeat(1024 * 1024 + 1));
    let receipt = rejected(&gw, "cpi-modena", &bytes(&m), "too-large", "", "maxBytes").await;
    // A message refused before parsing cannot be correlated by its message_id.
    assert!(receipt.get("correlation_id").is_none());
    gw.stop().await;
}

#[tokio::test]
async fn ten_thousand_deep_json_is_too_large() {
    let gw = Gateway::start().await;
    let body = format!("{{\"a\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
    rejected(
        &gw,
        "cpi-modena",
        body.as_bytes(),
        "too-large",
        "",
        "maxDepth",
    )
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn schema_violations_are_all_listed_with_their_pointers() {
    let gw = Gateway::start().await;
    let mut m = referral("cpi-modena", "CPI-MO-01", "036023");
    m["subject"]["identifiers"][0]["value"] = json!("RSSMRA85T10A562T");
    m["payload"]["reason"] = json!("bored");
    let receipt = rejected(
        &gw,
        "cpi-modena",
        &bytes(&m),
        "schema-violation",
        "/subject/identifiers/0/value",
        "format",
    )
    .await;
    assert_eq!(receipt["correlation_id"], m["message_id"]);
    let errors = receipt["payload"]["errors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e["path"] == "/payload/reason" && e["keyword"] == "enum")
    );
    // The person identifier is not repeated in the receipt.
    assert!(!receipt.to_string().contains("RSSMRA85T10A562T"));
    gw.stop().await;
}

#[tokio::test]
async fn gateway_owned_field_set_by_a_sender_is_refused() {
    let gw = Gateway::start().await;
    let mut m = referral("cpi-modena", "CPI-MO-01", "036023");
    m["payload"]["sender_office"] = json!("CPI-MO-99");
    rejected(
        &gw,
        "cpi-modena",
        &bytes(&m),
        "schema-violation",
        "/payload/sender_office",
        "readOnly",
    )
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn unknown_type_and_unsupported_version() {
    let gw = Gateway::start().await;
    let mut m = referral("cpi-modena", "CPI-MO-01", "036023");
    m["type"] = json!("pension-claim");
    rejected(
        &gw,
        "cpi-modena",
        &bytes(&m),
        "unknown-type",
        "/type",
        "enum",
    )
    .await;
    let mut m = referral("cpi-modena", "CPI-MO-01", "036023");
    m["version"] = json!("2.0");
    rejected(
        &gw,
        "cpi-modena",
        &bytes(&m),
        "unsupported-version",
        "/version",
        "enum",
    )
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn spoofed_sender_is_sender_mismatch_answered_to_the_queue_owner() {
    let gw = Gateway::start().await;
    // cpi-modena's back office claims to be INPS.
    let m = benefit_status("naspi", "036023");
    let receipt = rejected(
        &gw,
        "cpi-modena",
        &bytes(&m),
        "sender-mismatch",
        "/sender",
        "sender",
    )
    .await;
    assert_eq!(receipt["recipient"], "cpi-modena");
    gw.assert_empty(&gw.queues.receipts("inps")).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_partner_sending_a_type_it_may_not_is_not_authorized() {
    let gw = Gateway::start().await;
    let mut m = benefit_status("adi", "036023");
    m["sender"] = json!("comune-modena");
    rejected(
        &gw,
        "comune-modena",
        &bytes(&m),
        "not-authorized",
        "/type",
        "authorization",
    )
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_recipient_that_may_not_receive_the_type_is_not_authorized() {
    let gw = Gateway::start().await;
    let mut m = referral("cpi-modena", "CPI-MO-01", "036023");
    m["recipient"] = json!("comune-modena");
    rejected(
        &gw,
        "cpi-modena",
        &bytes(&m),
        "not-authorized",
        "/recipient",
        "authorization",
    )
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn unknown_recipient() {
    let gw = Gateway::start().await;
    let mut m = referral("cpi-modena", "CPI-MO-01", "036023");
    m["recipient"] = json!("inail");
    rejected(
        &gw,
        "cpi-modena",
        &bytes(&m),
        "unknown-recipient",
        "/recipient",
        "recipient",
    )
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn no_rule_and_no_competent_partner_are_no_route() {
    let gw = Gateway::start().await;
    // The comune routes only employment-readiness referrals.
    let mut m = referral("comune-modena", "SS-MO-01", "036023");
    m["payload"]["reason"] = json!("social-support");
    rejected(&gw, "comune-modena", &bytes(&m), "no-route", "", "route").await;
    // No CPI is competent for Turin.
    let m = benefit_status("naspi", "001272");
    rejected(
        &gw,
        "inps",
        &bytes(&m),
        "no-route",
        "/payload/municipality",
        "competence",
    )
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn identifiers_and_offices_the_recipient_cannot_use_are_unmappable() {
    let gw = Gateway::start().await;
    // INPS accepts only the codice fiscale.
    let mut m = referral("cpi-modena", "CPI-MO-01", "036023");
    m["subject"]["identifiers"] = json!([{"scheme": "ch.ahvn13", "value": "756.1234.5678.97"}]);
    rejected(
        &gw,
        "cpi-modena",
        &bytes(&m),
        "unmappable-identifier",
        "/subject/identifiers",
        "identifierScheme",
    )
    .await;
    // INPS has no office for Turin.
    let m = referral("cpi-modena", "CPI-MO-01", "001272");
    rejected(
        &gw,
        "cpi-modena",
        &bytes(&m),
        "unmappable-identifier",
        "/payload/office",
        "officeCode",
    )
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_poison_message_does_not_block_the_messages_behind_it() {
    let gw = Gateway::start().await;
    let mut bodies = vec![
        b"\xff\xfe not even utf-8".to_vec(),
        b"{\"deep\":".repeat(5000),
    ];
    let valid: Vec<Value> = (0..20)
        .map(|_| referral("cpi-modena", "CPI-MO-01", "036023"))
        .collect();
    bodies.extend(valid.iter().map(bytes));
    common::publish_many(&gw.url, &gw.queues.inbound("cpi-modena"), &bodies).await;
    let out = gw.take(&gw.queues.outbound("inps"), 20).await;
    assert_eq!(out.len(), 20);
    let mut got: Vec<String> = out
        .iter()
        .map(|m| m.json()["message_id"].as_str().unwrap().to_string())
        .collect();
    let mut want: Vec<String> = valid
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(gw.take(&gw.queues.rejected("cpi-modena"), 2).await.len(), 2);
    assert_eq!(
        gw.take(&gw.queues.receipts("cpi-modena"), 22).await.len(),
        22
    );
    assert_eq!(
        common::depth(&gw.url, &gw.queues.inbound("cpi-modena")).await,
        0
    );
    gw.stop().await;
}

/// A partner's client may write properties RabbitMQ passes on as they are: bytes that are not
/// UTF-8 in a short string (the specification asks for UTF-8), headers nested thousands deep,
/// properties larger than the gateway's frames once were, or so large that a parked copy has
/// no room for the reason's headers. Reading the first or the third, or parking the last,
/// failed a connection of the gateway at each delivery, for every partner of the session, for
/// ever; reading the second overflowed a thread's stack and aborted the process.
#[tokio::test]
async fn unusual_properties_are_read_and_the_queue_moves_on() {
    use common::raw::{self, Properties, field};
    let gw = Gateway::start().await;
    let inbound = gw.queues.inbound("cpi-modena");
    let send =
        async |body: &[u8], properties| raw::publish(&gw.url, &inbound, body, properties).await;
    // A referral whose AMQP message_id is not UTF-8.
    let labelled = referral("cpi-modena", "CPI-MO-01", "036023");
    send(
        &bytes(&labelled),
        Properties::json().message_id(b"ref-\xff\xfe-1"),
    )
    .await;
    // A referral with a header whose name is not UTF-8.
    let headed = referral("cpi-modena", "CPI-MO-01", "036023");
    send(
        &bytes(&headed),
        Properties::json().header(b"x-n\xf6te", b'S', b"kept"),
    )
    .await;
    // Not JSON, with an AMQP type that is not UTF-8: rejected, and parked with its properties.
    send(b"not json", Properties::json().kind(b"refer\xe9al")).await;
    // Not JSON either, with headers that fill the broker's largest frame (128 KiB): no room
    // is left for the reason's headers on the parked original.
    let filling = Properties::json().header(b"x-trace", b'S', &[b'z'; 130_900]);
    send(b"not json either", filling).await;
    // A referral with a header of tables nested 4,600 deep (32 KB, within the gateway's frames).
    let nested = referral("cpi-modena", "CPI-MO-01", "036023");
    let deep = (1..4600).fold(Vec::new(), |inner, _| field(b"a", b'F', &inner));
    send(
        &bytes(&nested),
        Properties::json().header(b"a", b'F', &deep),
    )
    .await;
    // A referral whose properties take 100 KB (a header's value), more than a frame of 32 KiB:
    // the broker sends the properties in one frame whatever its consumer's frame size.
    let large = referral("cpi-modena", "CPI-MO-01", "036023");
    send(
        &bytes(&large),
        Properties::json().header(b"x-trace", b'S', &[b'z'; 100_000]),
    )
    .await;
    // And an ordinary message behind them.
    let plain = referral("cpi-modena", "CPI-MO-01", "036023");
    gw.send("cpi-modena", &plain).await;

    let out = gw.take(&gw.queues.outbound("inps"), 5).await;
    let mut got: Vec<Value> = out.iter().map(|m| m.json()["message_id"].clone()).collect();
    let mut want = vec![
        labelled["message_id"].clone(),
        headed["message_id"].clone(),
        nested["message_id"].clone(),
        large["message_id"].clone(),
        plain["message_id"].clone(),
    ];
    got.sort_by_key(|v| v.to_string());
    want.sort_by_key(|v| v.to_string());
    assert_eq!(got, want);
    let receipts: Vec<Value> = gw
        .take(&gw.queues.receipts("cpi-modena"), 7)
        .await
        .iter()
        .map(|m| m.json())
        .collect();
    assert_eq!(receipts.len(), 7);
    let rejected: Vec<&Value> = receipts
        .iter()
        .filter(|r| r["payload"]["status"] == "rejected")
        .collect();
    assert_eq!(rejected.len(), 2, "{receipts:?}");
    assert!(
        rejected
            .iter()
            .all(|r| r["payload"]["code"] == "invalid-json")
    );
    let parked = gw.take(&gw.queues.rejected("cpi-modena"), 2).await;
    assert_eq!(parked.len(), 2);
    let parked_with = |body: &[u8]| parked.iter().find(|m| m.body == body).unwrap();
    // Its body as sent, its type with `?` for the byte that was not UTF-8.
    let bad_type = parked_with(b"not json");
    assert_eq!(
        bad_type.properties.kind().as_ref().map(|t| t.as_str()),
        Some("refer?al")
    );
    assert_eq!(
        bad_type.header("x-ponte-code").as_deref(),
        Some("invalid-json")
    );
    // The reason in place of the headers there was no room beside, and how large they were.
    let full = parked_with(b"not json either");
    assert_eq!(full.header("x-ponte-code").as_deref(), Some("invalid-json"));
    assert_eq!(full.header("x-trace"), None);
    let dropped: usize = full
        .header("x-ponte-headers-dropped")
        .unwrap()
        .parse()
        .unwrap();
    assert!(dropped > 130_900, "{dropped}");
    assert_eq!(common::depth(&gw.url, &inbound).await, 0);
    gw.stop().await;
}

/// Ponte publishes a rejected message's original again, to park it, and the broker reads some of
/// its properties as instructions to that publisher: a `CC` header as more queues to put it in
/// (a sender could have its unchecked message put in any partner's outbound queue, with
/// Ponte's right to write there), `user_id` as a claim the broker checks against Ponte's own
/// user (refused: the message came back at each session, for ever), `expiration` as a time to
/// drop the parked original; and an operator's replay reads Ponte's `x-ponte-*` headers on it.
#[tokio::test]
async fn a_parked_original_goes_nowhere_else_and_stays_whatever_its_properties_say() {
    use common::raw::{self, Properties, strings};
    let gw = Gateway::start().await;
    // The sender has a broker user of its own, as in production.
    let sender = common::SenderUser::create(
        &gw.url,
        &format!("{}-sender", gw.directory.settings.broker.prefix),
    );
    let user = &sender.name;
    let elsewhere = [
        gw.queues.outbound("inps"),
        gw.queues.outbound("cpi-bologna"),
    ];
    let properties = Properties::json()
        .header(
            b"CC",
            b'A',
            &strings(&[elsewhere[0].as_bytes(), elsewhere[1].as_bytes()]),
        )
        .header(b"x-ponte-recipients", b'S', b"cpi-modena")
        .user_id(user.as_bytes())
        .expiration(b"300")
        .transient();
    raw::publish(
        &sender.url,
        &gw.queues.inbound("cpi-modena"),
        b"not json",
        properties,
    )
    .await;

    let receipt = gw.receipt("cpi-modena").await;
    assert_eq!(receipt["payload"]["code"], "invalid-json", "{receipt}");
    // Past the original's expiration, the parked original is still there, and nowhere else.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let parked = gw.take(&gw.queues.rejected("cpi-modena"), 1).await;
    assert_eq!(parked.len(), 1);
    let parked = &parked[0];
    assert_eq!(parked.body, b"not json");
    assert_eq!(
        parked.header("x-ponte-code").as_deref(),
        Some("invalid-json")
    );
    assert_eq!(
        parked.header("x-ponte-user-id").as_deref(),
        Some(user.as_str())
    );
    assert_eq!(parked.header("x-ponte-expiration").as_deref(), Some("300"));
    assert_eq!(parked.header("x-ponte-cc"), Some(elsewhere.join(",")));
    assert_eq!(parked.header("CC"), None);
    // Ponte's headers are Ponte's: the sender's `x-ponte-recipients` would narrow a replay.
    assert_eq!(parked.header("x-ponte-recipients"), None);
    assert_eq!(parked.properties.delivery_mode(), &Some(2));
    for queue in &elsewhere {
        gw.assert_empty(queue).await;
    }
    gw.stop().await;
}
