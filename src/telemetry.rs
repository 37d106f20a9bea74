//! Telemetry: structured logs in text or JSON, as configured, written to stderr by a thread of
//! their own.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, LogSettings};

/// How often the writer writes what was logged since: one write, and one wake-up of its thread,
/// for every line of that time, rather than one of each per line (one per message at INFO).
const WRITE_EVERY: Duration = Duration::from_millis(50);

/// Bytes of log lines that may wait for the writer before new lines are dropped (and counted):
/// ten seconds and more of one line per message at 3,000 messages a second.
const BUFFERED_BYTES: usize = 8 << 20;

/// What the writer keeps of its buffer between writes: enough for the lines of [`WRITE_EVERY`]
/// at a few thousand messages a second.
const KEEP_BYTES: usize = 256 << 10;

/// How long the end of the process waits for the last lines to be written.
const LAST_WRITE_WITHIN: Duration = Duration::from_secs(1);

/// Lines logged and not yet written, shared by whoever logs and the writer.
#[derive(Default)]
struct Pending {
    lines: Mutex<Vec<u8>>,
    dropped: AtomicU64,
    stopping: AtomicBool,
}

static PENDING: OnceLock<Pending> = OnceLock::new();

/// What a logging thread writes a line to: the pending lines.
struct Line(&'static Pending);

impl Write for Line {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut lines = self.0.lines.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() + line.len() > BUFFERED_BYTES {
            self.0.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            lines.extend_from_slice(line);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes the pending lines every [`WRITE_EVERY`] until asked to stop, then what is left; says
/// on `done` when it has.
fn write_behind(pending: &Pending, done: std::sync::mpsc::Sender<()>) {
    let mut stderr = std::io::stderr();
    let mut taken = Vec::new();
    loop {
        let stopping = pending.stopping.load(Ordering::Acquire);
        if !stopping {
            std::thread::park_timeout(WRITE_EVERY);
        }
        std::mem::swap(
            &mut taken,
            &mut *pending.lines.lock().unwrap_or_else(|e| e.into_inner()),
        );
        // A reader that is gone (a closed pipe) loses the lines; nothing else can be done.
        let _ = stderr.write_all(&taken);
        taken.clear();
        // After a reader's stall, give back what the backlog took.
        taken.shrink_to(KEEP_BYTES);
        if stopping {
            let _ = done.send(());
            return;
        }
    }
}

/// Writes the last lines when dropped, at the end of the process (waiting at most
/// [`LAST_WRITE_WITHIN`] for a reader that does not read).
pub struct LogGuard {
    writer: std::thread::Thread,
    done: std::sync::mpsc::Receiver<()>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some(pending) = PENDING.get() {
            pending.stopping.store(true, Ordering::Release);
            self.writer.unpark();
            let _ = self.done.recv_timeout(LAST_WRITE_WITHIN);
        }
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the configured level.
///
/// Lines go to stderr through a writer thread of their own rather than from the thread that
/// logs: a flow logs one line per message, and a write of its own to stderr for each held it,
/// and every flow of its worker, whenever the reader of stderr (journald, a pipe) fell behind.
/// If the reader falls so far behind that [`BUFFERED_BYTES`] wait, further lines are dropped, not
/// waited for ([`dropped_lines`], `ponte_log_lines_dropped_total`): the delivery log, not stderr,
/// is the record of every message. Keep the guard until the end: dropping it writes what is left.
pub fn init(log: &LogSettings) -> std::io::Result<LogGuard> {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|from_env| EnvFilter::try_new(directives(&from_env)).ok())
        .or_else(|| EnvFilter::try_new(directives(&log.level)).ok())
        .unwrap_or_else(|| EnvFilter::new(directives("info")));
    let pending: &'static Pending = PENDING.get_or_init(Pending::default);
    let (done_tx, done) = std::sync::mpsc::channel();
    let writer = std::thread::Builder::new()
        .name("ponte-log".into())
        .spawn(move || write_behind(pending, done_tx))?
        .thread()
        .clone();
    // Colours for a person at a terminal only: journald and log shippers would keep the escape
    // codes, half of each line's bytes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(move || Line(pending));
    let _ = match log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    Ok(LogGuard { writer, done })
}

/// Log lines dropped so far because the reader of stderr fell too far behind.
pub fn dropped_lines() -> u64 {
    PENDING
        .get()
        .map_or(0, |p| p.dropped.load(Ordering::Relaxed))
}

/// Sets `ponte_log_lines_dropped_total`, and says (WARN) how many lines were dropped since it
/// last said so: once the reader catches up, that line gets through.
pub fn count_dropped() {
    static SAID: AtomicU64 = AtomicU64::new(0);
    let dropped = dropped_lines();
    metrics::counter!("ponte_log_lines_dropped_total").absolute(dropped);
    let said = SAID.swap(dropped, Ordering::Relaxed);
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
    use super::*;

    #[test]
    fn lines_beyond_the_buffer_are_dropped_whole_and_counted() {
        let pending: &'static Pending = Box::leak(Box::default());
        let line = [b'x'; 1000];
        let fits = BUFFERED_BYTES / line.len();
        for _ in 0..fits + 3 {
            Line(pending).write_all(&line).unwrap();
        }
        assert_eq!(pending.lines.lock().unwrap().len(), fits * line.len());
        assert_eq!(pending.dropped.load(Ordering::Relaxed), 3);
        // Once the writer has taken the lines, there is room again.
        pending.lines.lock().unwrap().clear();
        Line(pending).write_all(&line).unwrap();
        assert_eq!(pending.lines.lock().unwrap().len(), line.len());
        assert_eq!(pending.dropped.load(Ordering::Relaxed), 3);
    }

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
