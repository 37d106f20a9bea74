//! TLS to the broker: a RabbitMQ node whose certificate comes from an institution's own
//! authority and that requires a client certificate, reached with `broker.ca_file` and
//! `broker.client_identity_file`; and what Ponte says when either is missing or wrong.

mod common;

use std::time::Duration;

use common::{
    Certificates, Gateway, PrivateBroker, directory_with, drain, free_port, publish_many,
    random_prefix, referral, repo,
};
use ponte::directory::Directory;

/// A private node with a TLS listener that requires a client certificate of the test's
/// authority, beside its plain listener (which the test itself uses).
struct TlsBroker {
    broker: PrivateBroker,
    tls_port: u16,
    certificates: Certificates,
}

impl TlsBroker {
    fn start() -> TlsBroker {
        let certificates = Certificates::fresh();
        let dir = &certificates.dir;
        let tls_port = free_port();
        let broker = PrivateBroker::start_with(
            "rabbitmq_auth_mechanism_ssl",
            &[
                ("PONTE_BROKER_TLS_PORT", &tls_port.to_string()),
                ("PONTE_BROKER_TLS_DIR", dir.to_str().unwrap()),
            ],
        );
        TlsBroker {
            broker,
            tls_port,
            certificates,
        }
    }

    /// The demo configuration pointed at the TLS listener as `guest`, with `extra` settings.
    fn directory(&self, prefix: &str, extra: &[(&str, &str)]) -> Directory {
        let url = format!("amqps://guest:guest@localhost:{}/%2f", self.tls_port);
        directory_with(&repo().join("config"), &url, prefix, extra)
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.certificates.dir);
    }
}

#[tokio::test]
async fn a_broker_that_requires_a_client_certificate_is_reached_with_the_configured_identity() {
    let tls = TlsBroker::start();
    let certs = &tls.certificates;
    let (ca, identity) = (certs.file("ca.pem"), certs.file("client-identity.pem"));
    let without = |setting: &str| {
        let extra: Vec<(&str, &str)> = [
            ("broker.ca_file", ca.as_str()),
            ("broker.client_identity_file", identity.as_str()),
        ]
        .into_iter()
        .filter(|(key, _)| *key != setting)
        .collect();
        tls.directory(&random_prefix(), &extra)
    };

    // Without the authority, the broker's certificate is not trusted.
    let error = ponte::broker::connect(&without("broker.ca_file"), "test")
        .await
        .err()
        .expect("an unknown authority is refused");
    assert!(error.to_string().contains("UnknownIssuer"), "{error}");

    // Without the client certificate, the broker ends the handshake. In TLS 1.3 it says why
    // after the client has finished its side, so the client reads either that alert or, when
    // the socket is gone first, a reset.
    let refused = |error: &str, alerts: &[&str]| {
        assert!(
            alerts.iter().any(|a| error.contains(a)) || error.contains("Connection reset"),
            "{error}"
        );
    };
    let error = ponte::broker::connect(&without("broker.client_identity_file"), "test")
        .await
        .err()
        .expect("the broker refuses a client without a certificate");
    refused(&error.to_string(), &["CertificateRequired"]);

    // A certificate of another authority is refused too.
    let stranger = certs.file("stranger-identity.pem");
    let directory = tls.directory(
        &random_prefix(),
        &[
            ("broker.ca_file", ca.as_str()),
            ("broker.client_identity_file", stranger.as_str()),
        ],
    );
    let error = ponte::broker::connect(&directory, "test")
        .await
        .err()
        .expect("the broker refuses a certificate of another authority");
    // RabbitMQ (Erlang's TLS) answers with `bad_certificate`; other servers say `unknown_ca`.
    refused(&error.to_string(), &["BadCertificate", "UnknownCA"]);

    // With both, the gateway opens every connection over TLS, showing its certificate, and
    // messages flow.
    let gw = Gateway::start_with(without("")).await;
    let connections = tls
        .broker
        .ctl(&["list_connections", "ssl", "peer_cert_subject"]);
    let lines: Vec<&str> = connections
        .lines()
        .filter(|l| l.starts_with("true") || l.starts_with("false"))
        .collect();
    assert!(!lines.is_empty(), "{connections}");
    for line in &lines {
        assert!(
            line.starts_with("true") && line.contains("CN=ponte-client"),
            "every connection is TLS with Ponte's certificate: {connections}"
        );
    }
    let plain = tls.broker.url();
    let sent = referral("cpi-modena", "CPI-MO-01", "036023");
    publish_many(
        &plain,
        &gw.queues.inbound("cpi-modena"),
        &[serde_json::to_vec(&sent).unwrap()],
    )
    .await;
    let delivered = drain(
        &plain,
        &gw.queues.outbound("inps"),
        1,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].json()["message_id"], sent["message_id"]);
    let receipt = drain(
        &plain,
        &gw.queues.receipts("cpi-modena"),
        1,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(receipt[0].json()["payload"]["code"], "delivered");
    // The node goes with the test, and its queues with it.
    let data = ponte::pipeline::store_dir(&gw.directory);
    gw.stop_keeping_queues().await;
    let _ = std::fs::remove_dir_all(data);

    // With the EXTERNAL mechanism the certificate is the login: no user name, no password.
    tls.broker.ctl(&["add_user", "ponte-client", "unused"]);
    tls.broker.ctl(&["clear_password", "ponte-client"]);
    tls.broker.ctl(&[
        "set_permissions",
        "-p",
        "/",
        "ponte-client",
        ".*",
        ".*",
        ".*",
    ]);
    let url = format!(
        "amqps://localhost:{}/%2f?auth_mechanism=external",
        tls.tls_port
    );
    let directory = directory_with(
        &repo().join("config"),
        &url,
        &random_prefix(),
        &[
            ("broker.ca_file", ca.as_str()),
            ("broker.client_identity_file", identity.as_str()),
        ],
    );
    let gw = Gateway::start_with(directory).await;
    // (The first gateway's connections may still be listed, closed, for a few seconds.)
    let listed = tls
        .broker
        .ctl(&["list_connections", "user", "auth_mechanism", "state"]);
    let open: Vec<&str> = listed
        .lines()
        .skip_while(|l| !l.starts_with("user\t"))
        .skip(1)
        .filter(|l| !l.ends_with("\tclosed"))
        .collect();
    assert!(
        !open.is_empty()
            && open
                .iter()
                .all(|l| l.starts_with("ponte-client\tEXTERNAL\t")),
        "every connection logged in by its certificate: {listed}"
    );
    let data = ponte::pipeline::store_dir(&gw.directory);
    gw.stop_keeping_queues().await;
    let _ = std::fs::remove_dir_all(data);
}

/// What `ponte check` (and `ponte run`, which refuses to start) says about TLS files — the
/// broker's, a look-up service's, an HTTP endpoint's: each mistake with its setting and file.
#[test]
fn tls_files_are_checked_with_the_configuration() {
    let certs = Certificates::fresh();
    let dir = &certs.dir;
    let load = |url: &str, extra: &[(&str, &str)]| {
        let mut overrides = vec![("broker.url", url)];
        overrides.extend_from_slice(extra);
        Directory::load_with_overrides(&repo().join("config"), &overrides)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let tls_url = "amqps://ponte@localhost:5671/%2f";
    let (ca, identity, key) = (
        certs.file("ca.pem"),
        certs.file("client-identity.pem"),
        certs.file("client.key"),
    );

    let good = [
        ("broker.ca_file", ca.as_str()),
        ("broker.client_identity_file", identity.as_str()),
    ];
    assert_eq!(load(tls_url, &good), "");
    // An empty value, as a template leaves an unset variable, sets nothing.
    assert_eq!(load(tls_url, &[("broker.ca_file", "")]), "");

    let errors = load("amqp://ponte@localhost:5672/%2f", &good);
    assert!(
        errors.contains("broker.ca_file is set but broker.url is not amqps://")
            && errors.contains("broker.client_identity_file is set but broker.url is not amqps://"),
        "{errors}"
    );

    let missing = dir.join("nowhere.pem");
    let errors = load(tls_url, &[("broker.ca_file", missing.to_str().unwrap())]);
    assert!(
        errors.contains(&format!(
            "broker.ca_file: cannot read {}",
            missing.display()
        )),
        "{errors}"
    );

    // A key alone is no certificate; a certificate alone is no identity.
    let errors = load(tls_url, &[("broker.ca_file", key.as_str())]);
    assert!(
        errors.contains(&format!("broker.ca_file: {key} holds no PEM certificate")),
        "{errors}"
    );
    let errors = load(tls_url, &[("broker.client_identity_file", ca.as_str())]);
    assert!(
        errors.contains(&format!(
            "broker.client_identity_file: {ca} holds no private key in PEM"
        )),
        "{errors}"
    );

    // In partner files, relative to the file.
    let config = common::config_copy(|config| {
        std::fs::copy(&key, config.join("partners/registry-ca.pem")).unwrap();
        for (partner, section) in [
            (
                "comune-modena",
                "[resolver]\nurl = \"https://localhost:1/lookup\"\nca_file = \"registry-ca.pem\"\n",
            ),
            (
                "osservatorio-er",
                "[http]\nurl = \"https://localhost:1/deliveries\"\nclient_identity_file = \"nowhere.pem\"\n",
            ),
        ] {
            let file = config.join(format!("partners/{partner}.toml"));
            let text = std::fs::read_to_string(&file).unwrap() + "\n" + section;
            std::fs::write(file, text).unwrap();
        }
    });
    let errors = Directory::load_with_overrides(
        &config,
        &[("paths.schemas", repo().join("schemas").to_str().unwrap())],
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    let partners = config.join("partners");
    for expected in [
        format!(
            "comune-modena.toml: resolver.ca_file: {} holds no PEM certificate",
            partners.join("registry-ca.pem").display()
        ),
        format!(
            "osservatorio-er.toml: http.client_identity_file: cannot read {}",
            partners.join("nowhere.pem").display()
        ),
    ] {
        assert!(errors.contains(&expected), "{expected}\n{errors}");
    }
    let _ = std::fs::remove_dir_all(&config);
    let _ = std::fs::remove_dir_all(dir);
}
