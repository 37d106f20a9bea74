//! Console: a small web page on the ops address for the people watching deliveries. Recent
//! steps from the delivery log with filters, one message's whole journey, and per partner the
//! messages waiting in its rejected and dead-letter queues, with a replay of its dead letters.
//!
//! Reading needs nothing; replaying (an action that changes things) needs the token from the
//! environment variable `PONTE_CONSOLE_TOKEN`. Without that variable the console is read-only.
//! Pages are rendered on the server; every value is HTML-escaped.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::Form;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};

use crate::broker::Queues;
use crate::journal::{Filter, Logged, Reader};
use crate::pipeline::{Pipeline, store_dir};

/// Environment variable holding the token that allows replays from the console.
pub const TOKEN_ENV: &str = "PONTE_CONSOLE_TOKEN";

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
table{border-collapse:collapse;font-size:.9rem}td,th{border-bottom:1px solid #ddd;padding:.25rem .5rem;text-align:left}
form.filter input{width:9rem}.bad{color:#a00}.ok{color:#070}h1 a{color:inherit;text-decoration:none}";

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} — Ponte</title>\
         <style>{STYLE}</style></head><body><h1><a href=\"/\">Ponte</a> · {}</h1>{body}</body></html>",
        escape(title),
        escape(title)
    ))
}

fn records_table(records: &[Logged]) -> String {
    let mut html = String::from(
        "<table id=\"records\"><tr><th>time</th><th>step</th><th>code</th><th>sender</th>\
         <th>recipients</th><th>type</th><th>message</th><th>latency</th><th>detail</th></tr>",
    );
    for r in records.iter().rev() {
        let e = &r.event;
        let class = match &*e.step {
            "rejected" | "dead-lettered" | "handed-back" => "bad",
            "delivered" => "ok",
            _ => "",
        };
        let _ = write!(
            html,
            "<tr class=\"record\"><td>{}</td><td class=\"step {class}\">{}</td><td class=\"code\">{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td><a class=\"journey\" href=\"/journey?message_id={}\">{}</a></td>\
             <td>{}</td><td>{}</td></tr>",
            escape(&r.at),
            escape(&e.step),
            escape(&e.code),
            escape(&e.sender),
            escape(&e.recipients),
            escape(&e.message_type),
            url::form_urlencoded::byte_serialize(e.message_id.as_bytes()).collect::<String>(),
            escape(&e.message_id),
            e.latency_ms
                .map(|l| format!("{l:.1} ms"))
                .unwrap_or_default(),
            escape(&e.detail),
        );
    }
    html.push_str("</table>");
    html
}

fn reader(pipeline: &Pipeline) -> Result<Reader, (StatusCode, String)> {
    Reader::open(&store_dir(&pipeline.directory)).map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e))
}

/// `GET /`: filters, recent steps, parked messages per partner.
pub async fn home(
    State(pipeline): State<Arc<Pipeline>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let reader = match reader(&pipeline) {
        Ok(r) => r,
        Err(unavailable) => return unavailable.into_response(),
    };
    let field = |name: &str| params.get(name).filter(|v| !v.is_empty()).cloned();
    let filter = Filter {
        message_id: field("message_id"),
        sender: field("sender"),
        recipient: field("recipient"),
        code: field("code"),
        step: field("step"),
        limit: 200,
        ..Default::default()
    };
    let records = match reader.query(&filter) {
        Ok(r) => r,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let mut body = String::new();
    if let Some(note) = params.get("note") {
        let _ = write!(body, "<p id=\"note\">{}</p>", escape(note));
    }
    body.push_str("<form class=\"filter\" method=\"get\" action=\"/\">");
    for name in ["message_id", "sender", "recipient", "code", "step"] {
        let _ = write!(
            body,
            "<label>{name} <input name=\"{name}\" value=\"{}\"></label> ",
            escape(&field(name).unwrap_or_default())
        );
    }
    body.push_str("<button id=\"apply\" type=\"submit\">Filter</button></form>");
    body.push_str(&parked(&pipeline).await);
    let _ = write!(body, "<h2>Recent steps ({})</h2>", records.len());
    body.push_str(&records_table(&records));
    page("deliveries", &body).into_response()
}

/// The rejected and dead-letter counts of every partner, with a replay form for dead letters.
async fn parked(pipeline: &Pipeline) -> String {
    let directory = &pipeline.directory;
    let names = Queues::new(&directory.settings.broker.prefix);
    let partners: Vec<&String> = directory.partners.keys().collect();
    let queues: Vec<String> = partners
        .iter()
        .flat_map(|p| [names.rejected(p), names.dead_letters(p)])
        .collect();
    let depths = match crate::client::depths(directory, &queues).await {
        Ok(d) => d,
        Err(e) => return format!("<p class=\"bad\">broker: {}</p>", escape(&e.to_string())),
    };
    let writable = std::env::var(TOKEN_ENV).is_ok_and(|t| !t.is_empty());
    let mut html = String::from(
        "<h2>Parked</h2><table id=\"parked\"><tr><th>partner</th><th>rejected</th><th>dead letters</th><th></th></tr>",
    );
    for (i, partner) in partners.iter().enumerate() {
        let (rejected, letters) = (depths[2 * i], depths[2 * i + 1]);
        let replay = if letters > 0 && writable {
            format!(
                "<form method=\"post\" action=\"/dlq/replay\"><input type=\"hidden\" name=\"partner\" value=\"{p}\">\
                 <input type=\"password\" name=\"token\" placeholder=\"token\" id=\"token-{p}\">\
                 <button type=\"submit\" id=\"replay-{p}\">Replay dead letters</button></form>",
                p = escape(partner)
            )
        } else if letters > 0 {
            "read-only (no console token configured)".to_string()
        } else {
            String::new()
        };
        let _ = write!(
            html,
            "<tr id=\"parked-{p}\"><td>{p}</td><td class=\"rejected\">{rejected}</td><td class=\"letters\">{letters}</td><td>{replay}</td></tr>",
            p = escape(partner)
        );
    }
    html.push_str("</table>");
    html
}

/// `GET /journey?message_id=`: every step of one message.
pub async fn journey(
    State(pipeline): State<Arc<Pipeline>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let Some(id) = params.get("message_id").filter(|v| !v.is_empty()) else {
        return Redirect::to("/").into_response();
    };
    let reader = match reader(&pipeline) {
        Ok(r) => r,
        Err(unavailable) => return unavailable.into_response(),
    };
    let filter = Filter {
        message_id: Some(id.clone()),
        limit: 1000,
        ..Default::default()
    };
    match reader.query(&filter) {
        Ok(records) => {
            // Oldest first: the journey reads top to bottom.
            let mut in_order = records;
            in_order.reverse();
            let body = format!(
                "<p>{} step(s) of message <code id=\"message\">{}</code></p>{}",
                in_order.len(),
                escape(id),
                records_table(&in_order)
            );
            page("journey", &body).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// `POST /dlq/replay` (partner, token): replays every dead letter of the partner.
pub async fn replay(
    State(pipeline): State<Arc<Pipeline>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let expected = std::env::var(TOKEN_ENV).unwrap_or_default();
    let given = form.get("token").cloned().unwrap_or_default();
    if expected.is_empty() || !same(expected.as_bytes(), given.as_bytes()) {
        return (
            StatusCode::FORBIDDEN,
            "replay needs the console token (PONTE_CONSOLE_TOKEN)\n",
        )
            .into_response();
    }
    let directory = &pipeline.directory;
    let Some(partner) = form
        .get("partner")
        .filter(|p| directory.partners.contains_key(*p))
    else {
        return (StatusCode::BAD_REQUEST, "unknown partner\n").into_response();
    };
    let queue = Queues::new(&directory.settings.broker.prefix).dead_letters(partner);
    let note = match replay_all(&pipeline, partner, &queue).await {
        Ok((replayed, refused)) => {
            tracing::info!(partner = %partner, replayed, refused, "dead letters replayed from the console");
            format!("{replayed} dead letter(s) of {partner} replayed, {refused} refused")
        }
        Err(e) => format!("replay failed: {e}"),
    };
    let to = format!(
        "/?note={}",
        url::form_urlencoded::byte_serialize(note.as_bytes()).collect::<String>()
    );
    Redirect::to(&to).into_response()
}

async fn replay_all(
    pipeline: &Pipeline,
    partner: &str,
    queue: &str,
) -> Result<(usize, usize), crate::broker::BrokerError> {
    let letters = crate::client::browse(&pipeline.directory, queue).await?;
    let (mut replayed, mut refused) = (0, 0);
    for (index, (_, letter)) in letters.messages.iter().enumerate() {
        match crate::client::replay_dead_letter(&pipeline.directory, partner, letter, queue).await?
        {
            Ok(()) => {
                letters.remove(index).await?;
                replayed += 1;
            }
            Err(_) => refused += 1,
        }
    }
    letters.close().await;
    Ok((replayed, refused))
}

/// Compares in time independent of where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
