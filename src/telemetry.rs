//! Telemetry: structured logs in text or JSON, as configured, written to stderr by a thread of
//! their own.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, LogSettings};

/// Log lines that may wait for the writer before new ones are dropped (and counted): about 8 MB,
/// ten seconds of one line per message at 3,000 messages a second.
const BUFFERED_LINES: usize = 32_768;

/// What the writer writes at once: the lines that came in while it wrote the last ones.
const WRITE_BUFFER: usize = 64 * 1024;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the configured level.
///
/// Lines are handed to a writer thread rather than written by the thread that logs: a flow logs
/// one line per message, and a write of its own to stderr for each cost it more than the
/// message's checks, and held it, and every flow of its worker, whenever the reader of stderr
/// (journald, a pipe) fell behind. If the reader falls so far behind that [`BUFFERED_LINES`] wait,
/// further lines are dropped, not waited for ([`dropped_lines`], `ponte_log_lines_dropped_total`):
/// the delivery log, not stderr, is the record of every message. Keep the guard until the end:
/// dropping it writes what is left.
pub fn init(log: &LogSettings) -> WorkerGuard {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|from_env| EnvFilter::try_new(directives(&from_env)).ok())
        .or_else(|| EnvFilter::try_new(directives(&log.level)).ok())
        .unwrap_or_else(|| EnvFilter::new(directives("info")));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("ponte-log")
        .finish(std::io::BufWriter::with_capacity(
            WRITE_BUFFER,
            std::io::stderr(),
        ));
    let _ = DROPPED.set(writer.error_counter());
    // Colours for a person at a terminal only: journald and log shippers would keep the escape
    // codes, half of each line's bytes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let _ = match log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    guard
}

/// Log lines dropped so far because the reader of stderr fell too far behind.
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Sets `ponte_log_lines_dropped_total`, and says (WARN) how many lines were dropped since it
/// last said so: once the reader catches up, that line gets through.
pub fn count_dropped() {
    static SAID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dropped = dropped_lines();
    metrics::counter!("ponte_log_lines_dropped_total").absolute(dropped);
    let said = SAID.swap(dropped, std::sync::atomic::Ordering::Relaxed);
    if dropped > said {
        tracing::warn!(
            dropped = dropped - said,
            "log lines dropped: stderr's reader (journald, a pipe) did not keep up; the delivery log has every message"
        );
    }
}

/// The filter `level` asks for, with the AMQP client's own events off unless it names the
/// client (`lapin=…`). Ponte logs every broker failure itself, at WARN with the client's
/// reason; the client's events would repeat each at ERROR, report a clean close as an error
/// when the broker ends the socket first, and print a message the broker returns (a copy whose
/// queue is gone) whole: its payload, person identifiers included.
pub fn directives(level: &str) -> String {
    if level.contains("lapin") {
        level.to_string()
    } else if level.trim().is_empty() {
        "lapin=off".to_string()
    } else {
        format!("{level},lapin=off")
    }
}

#[cfg(test)]
mod tests {
    use super::directives;

    #[test]
    fn the_amqp_client_is_quiet_unless_named() {
        assert_eq!(directives("info"), "info,lapin=off");
        assert_eq!(
            directives("warn,ponte::gateway=debug"),
            "warn,ponte::gateway=debug,lapin=off"
        );
        assert_eq!(directives("info,lapin=warn"), "info,lapin=warn");
        assert_eq!(directives(""), "lapin=off");
    }
}
