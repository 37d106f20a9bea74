//! Gateway: the supervisor. Connects, declares the topology, starts one flow per partner, and
//! when the broker fails tears everything down and starts again with backoff; on shutdown stops
//! consuming, waits for in-flight messages to settle, and returns.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::{
    BrokerError, QueueNames, Queues, confirming_channel, connect, declare_topology,
};
use crate::directory::Directory;
use crate::receive::Flow;
use crate::settle::Settler;

/// Observable state of a running gateway, for readiness probes and tests.
#[derive(Debug, Clone)]
pub struct Status {
    ready: watch::Sender<bool>,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            ready: watch::Sender::new(false),
        }
    }
}

impl Status {
    /// True while connected, with the topology declared and every flow consuming.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until the gateway is ready.
    pub async fn ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }
}

/// Runs the gateway until `shutdown` is cancelled. Broker failures are never fatal: the gateway
/// keeps reconnecting, so it may also be started before the broker.
pub async fn run(directory: Arc<Directory>, shutdown: CancellationToken, status: Status) {
    let max_delay = Duration::from_secs(directory.settings.broker.max_reconnect_delay_secs.max(1));
    let mut delay = Duration::from_millis(200);
    let mut reconnects: u64 = 0;
    while !shutdown.is_cancelled() {
        let result = session(&directory, &shutdown, &status, &mut delay).await;
        status.ready.send_replace(false);
        if shutdown.is_cancelled() {
            break;
        }
        reconnects += 1;
        match result {
            Ok(()) => warn!(reconnects, "restarting the broker session"),
            Err(error) => warn!(
                reconnects,
                %error,
                retry_in_ms = delay.as_millis() as u64,
                "broker session failed; reconnecting"
            ),
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(jitter(delay)) => {}
        }
        delay = (delay * 2).min(max_delay);
    }
    info!("gateway stopped");
}

/// One connected period: returns `Ok` when asked to stop (or to reconnect), `Err` when the
/// broker failed.
async fn session(
    directory: &Arc<Directory>,
    shutdown: &CancellationToken,
    status: &Status,
    delay: &mut Duration,
) -> Result<(), BrokerError> {
    // Consuming and publishing use separate connections, so flow control that blocks the
    // publishing connection never stops acknowledgements from going out.
    let consuming = connect(directory, "ponte consume").await?;
    let publishing = connect(directory, "ponte publish").await?;
    let setup = publishing.create_channel().await?;
    declare_topology(&setup, directory).await?;
    let _ = setup.close(200, "topology declared".into()).await;
    *delay = Duration::from_millis(200);

    let queues = Arc::new(QueueNames::new(
        &Queues::new(&directory.settings.broker.prefix),
        directory.partners.keys().map(String::as_str),
    ));
    let session_stop = shutdown.child_token();
    let mut flows = JoinSet::new();
    for partner in directory.partners.values() {
        let settler = Arc::new(Settler {
            channel: confirming_channel(&publishing).await?,
            queues: queues.clone(),
            confirm_timeout_secs: directory.settings.broker.publish_timeout_secs,
            positive_receipts: partner.receipts == crate::partner::Receipts::All,
            reconnect: session_stop.clone(),
        });
        let flow = Flow {
            directory: directory.clone(),
            partner: partner.clone(),
            consume: consuming.create_channel().await?,
            settler,
        };
        flows.spawn(flow.run(session_stop.clone()));
    }
    status.ready.send_replace(true);
    info!(
        partners = directory.partners.len(),
        prefix = %directory.settings.broker.prefix,
        "gateway ready"
    );

    let mut failure = None;
    while let Some(ended) = flows.join_next().await {
        let error = match ended {
            Ok(Ok(())) => continue,
            Ok(Err(error)) => error,
            Err(panic) => {
                warn!(%panic, "a flow ended abnormally");
                continue;
            }
        };
        if failure.is_none() {
            failure = Some(error);
        }
        session_stop.cancel();
    }
    status.ready.send_replace(false);
    // Every flow has settled what it had in flight (or failed, leaving it to the broker).
    let _ = consuming.close(200, "ponte stopping".into()).await;
    let _ = publishing.close(200, "ponte stopping".into()).await;
    match failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Spreads reconnect attempts of several gateways so they do not hit a recovering broker in step.
fn jitter(delay: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    delay.mul_f64(0.75 + f64::from(nanos % 1000) / 2000.0)
}
