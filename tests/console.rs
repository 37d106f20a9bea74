//! The console end to end in headless Chromium, against a running `ponte run` on a real broker:
//! load the page, filter the steps, open a message's journey, replay a dead letter with the
//! token and see it delivered. Without the token a replay is refused.

mod common;

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{broker_url, depth, drain, publish_many, random_prefix, referral, repo};
use headless_chrome::{Browser, LaunchOptions, Tab};
use ponte::broker::Queues;

const TOKEN: &str = "console-test-token-1234";

fn start(prefix: &str, port: u16) -> Child {
    common::ponte_run(&repo().join("config"), &broker_url(), prefix)
        .env("PONTE_OPS__LISTEN", format!("127.0.0.1:{port}"))
        .env("PONTE_DELIVERY__MAX_ATTEMPTS", "2")
        .env("PONTE_DELIVERY__RETRY_INITIAL_MS", "200")
        .env("PONTE_DELIVERY__RETRY_MAX_MS", "1000")
        .env("PONTE_LOG__LEVEL", "warn")
        .env(ponte::console::TOKEN_ENV, TOKEN)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn browser() -> Browser {
    Browser::new(
        LaunchOptions::default_builder()
            .path(Some(PathBuf::from("/usr/bin/chromium")))
            .sandbox(false)
            .headless(true)
            .build()
            .unwrap(),
    )
    .expect("headless Chromium starts")
}

/// The step column of the records the page shows, top to bottom.
fn steps(tab: &Tab) -> Vec<String> {
    tab.wait_for_elements("tr.record td.step")
        .unwrap()
        .iter()
        .map(|e| e.get_inner_text().unwrap())
        .collect()
}

/// Waits until the page shows `text`, reloading `url` between looks.
fn wait_for_text(tab: &Tab, url: &str, text: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let content = tab.get_content().unwrap();
        if content.contains(text) {
            return content;
        }
        assert!(
            Instant::now() < deadline,
            "{text:?} not on {url}:\n{content}"
        );
        std::thread::sleep(Duration::from_millis(300));
        tab.navigate_to(url)
            .unwrap()
            .wait_until_navigated()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ops_filter_open_a_journey_and_replay_a_dead_letter_in_the_browser() {
    let (prefix, port) = (random_prefix(), common::free_port());
    let url = broker_url();
    let queues = Queues::new(&prefix);
    let child = common::Running(Some(start(&prefix, port)));
    let base = format!("http://127.0.0.1:{port}");
    let client = ponte::resolve::http_client(Duration::from_secs(2))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map_or(true, |r| !r.status().is_success())
    {
        assert!(Instant::now() < deadline, "the gateway gets ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // One message INPS's queue refuses until it is dead-lettered, one rejected message.
    let out = queues.outbound("inps");
    let policy = format!("full-{prefix}");
    common::shared_broker_ctl(&[
        "set_policy",
        "--apply-to",
        "queues",
        &policy,
        &format!("^{}$", out.replace('.', "\\.")),
        r#"{"max-length": 0, "overflow": "reject-publish"}"#,
    ]);
    let letter = referral("cpi-modena", "CPI-MO-01", "036023");
    let letter_id = letter["message_id"].as_str().unwrap().to_string();
    let mut wrong = referral("cpi-modena", "CPI-MO-01", "036023");
    wrong["payload"]["reason"] = "because".into();
    publish_many(
        &url,
        &queues.inbound("cpi-modena"),
        &[
            serde_json::to_vec(&letter).unwrap(),
            serde_json::to_vec(&wrong).unwrap(),
        ],
    )
    .await;
    let dlq = queues.dead_letters("inps");
    // The copy is dead-lettered.
    common::wait_for_depth(&url, &dlq, 1, Duration::from_secs(20)).await;
    common::shared_broker_ctl(&["clear_policy", &policy]);

    // Without the token, a replay is refused.
    let refused = client
        .post(format!("{base}/dlq/replay"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("partner=inps&token=guess")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    assert_eq!(depth(&url, &dlq).await, 1);

    let home = format!("{base}/");
    let journey_of_letter = format!("{base}/journey?message_id={letter_id}");
    let browsed = tokio::task::spawn_blocking({
        let (home, journey_of_letter, letter_id) =
            (home.clone(), journey_of_letter.clone(), letter_id.clone());
        let wrong_id = wrong["message_id"].as_str().unwrap().to_string();
        move || {
            let browser = browser();
            let tab: Arc<Tab> = browser.new_tab().unwrap();
            // The page loads with recent steps and the parked counts.
            tab.navigate_to(&home)
                .unwrap()
                .wait_until_navigated()
                .unwrap();
            tab.wait_for_element("table#records").unwrap();
            let page = wait_for_text(&tab, &home, "dead-lettered", Duration::from_secs(10));
            assert!(page.contains("schema-violation"), "{page}");
            let letters = tab
                .wait_for_element("#parked-inps .letters")
                .unwrap()
                .get_inner_text()
                .unwrap();
            assert_eq!(letters, "1");

            // Filter: only rejected steps.
            tab.wait_for_element("input[name=step]")
                .unwrap()
                .click()
                .unwrap();
            tab.type_str("rejected").unwrap();
            tab.wait_for_element("#apply").unwrap().click().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !tab.get_url().contains("step=rejected") {
                assert!(
                    Instant::now() < deadline,
                    "the filter is applied: {}",
                    tab.get_url()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            tab.wait_until_navigated().unwrap();
            assert_eq!(steps(&tab), ["rejected"]);

            // Open that message's journey.
            tab.wait_for_element("a.journey").unwrap().click().unwrap();
            let shown = tab
                .wait_for_element("#message")
                .unwrap()
                .get_inner_text()
                .unwrap();
            assert_eq!(
                shown.trim(),
                wrong_id,
                "the journey of the rejected message"
            );
            assert!(tab.get_content().unwrap().contains("schema-violation"));

            // Replay the dead letter with the token.
            tab.navigate_to(&home)
                .unwrap()
                .wait_until_navigated()
                .unwrap();
            tab.wait_for_element("#token-inps")
                .unwrap()
                .click()
                .unwrap();
            tab.type_str(TOKEN).unwrap();
            tab.wait_for_element("#replay-inps")
                .unwrap()
                .click()
                .unwrap();
            let note = tab
                .wait_for_element("#note")
                .unwrap()
                .get_inner_text()
                .unwrap();
            assert!(note.contains("1 dead letter(s) of inps replayed"), "{note}");

            // The letter's journey now ends delivered.
            tab.navigate_to(&journey_of_letter)
                .unwrap()
                .wait_until_navigated()
                .unwrap();
            let journey = wait_for_text(
                &tab,
                &journey_of_letter,
                "replay from",
                Duration::from_secs(10),
            );
            assert!(journey.contains(&letter_id));
            steps(&tab)
        }
    })
    .await
    .unwrap();
    assert!(
        browsed.contains(&"dead-lettered".to_string()),
        "{browsed:?}"
    );
    assert_eq!(browsed.last().unwrap(), "delivered", "{browsed:?}");
    let delivered = drain(&url, &out, 5, Duration::from_secs(5)).await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(depth(&url, &dlq).await, 0);

    child.stop();
    common::delete_queues(&common::directory(&url, &prefix)).await;
}
