//! Ponte ("bridge") is an inter-agency data-exchange gateway. Each institution's back office
//! publishes to its own RabbitMQ queue; Ponte validates every message against shared JSON
//! Schemas, checks that the sender is who it claims and may send it, routes it, maps it into
//! each recipient's terms, republishes it with publisher confirms, acknowledges the inbound
//! message only when every copy is confirmed, and answers the sender with a receipt.
//!
//! # Layout
//!
//! Configuration, loaded once and shared immutably:
//! - [`settings`]: the main file and environment overrides.
//! - [`partner`]: one file per institution: identifier schemes, field lists, look-up service.
//! - [`authorize`]'s matrix: who may send which type to whom, for what.
//! - [`tables`]: offices and codes per partner, swapped whole on reload.
//! - [`directory`]: everything loaded and cross-checked, all errors at once.
//! - [`broker`]: connections, queue names and topology; [`pem`]: TLS files, checked on load.
//!
//! A message meets, in order:
//! - [`receive`]: a flow per partner consumes its inbound queue.
//! - [`decode`]: size and depth limits, UTF-8, JSON, into an [`envelope`] tree that borrows its
//!   strings from the body.
//! - [`validate`]: the schema of its (type, version), compiled once at start-up, with
//!   [`identifiers`] checking check characters and digits.
//! - [`authorize`]: sender equals queue owner; the matrix allows every recipient.
//! - [`route`]: named recipient or routing rules (competence by municipality, fan-out).
//! - [`store`]: the person and case crosswalks, in an embedded SQLite file; a duplicate check
//!   asks an in-memory filter of recent deliveries (`recent`) before the file.
//! - [`map`]: per recipient: its office, codes, identifiers (crosswalk, [`resolve`] look-up
//!   service, pseudonyms), its case reference, and only the fields it may receive.
//! - [`deliver`]: persistent, mandatory publishes with pending confirms.
//! - [`settle`]: confirms awaited, receipt ([`receipt`]) published, inbound acked; or the
//!   original parked with its [`rejection`] reason.
//! - [`retry`]: a copy its recipient could not take waits in the broker's delay queues;
//!   [`redeliver`] tries it again; out of attempts it is dead-lettered. [`courier`] POSTs the
//!   copies of partners that receive by HTTP.
//! - [`journal`]: every step recorded in the hash-chained delivery log.
//!
//! [`pipeline`] strings the deciding steps together; [`gateway`] supervises connections, reconnects
//! and shutdown, and starts a failed flow again alone; [`ops`] serves metrics, probes and the
//! [`console`]; [`telemetry`] writes the log lines to stderr from a thread of its own; [`client`]
//! is the partner and operator side used by `ponte send`, `ponte rejected|dlq` and the tests.

pub mod authorize;
pub mod broker;
pub mod client;
pub mod console;
pub mod courier;
pub mod decode;
pub mod deliver;
pub mod directory;
pub mod envelope;
pub mod gateway;
pub mod identifiers;
pub mod journal;
pub mod map;
pub mod ops;
pub mod partner;
pub mod pem;
pub mod pipeline;
pub mod prefetch;
pub mod receipt;
pub mod receive;
mod recent;
pub mod redeliver;
pub mod rejection;
pub mod resolve;
pub mod retry;
pub mod route;
pub mod settings;
pub mod settle;
pub mod shards;
pub mod store;
pub mod tables;
pub mod telemetry;
pub mod validate;

/// A hash map keyed by what the configuration names (partners, message types, municipalities,
/// codes), looked up several times per message: hashed with foldhash, several times cheaper than
/// the standard SipHash for short keys. Its keys are the operator's, never a sender's, so a
/// sender cannot grow it with keys chosen to collide; what a sender writes is only looked up.
pub type ConfigMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Runs `wait`, which blocks its thread (for the delivery log's writer to take a record, for the
/// store's writer to commit), so that on a worker of a multi-threaded runtime the worker's other
/// tasks first move to another thread and do not wait with it (the redelivery flow, the HTTP
/// couriers, the ops endpoints that show what is happening). Elsewhere it simply runs: on a
/// partners' flows' thread (`shards`), whose other flows wait with it, and in a command.
pub(crate) fn wait_aside<R>(wait: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
        _ => wait(),
    }
}

/// Appends `names` to `text`, comma-separated: how the store and the delivery log list
/// recipients. Written straight into the one buffer kept, not collected and joined.
pub(crate) fn push_joined<'a>(text: &mut String, names: impl IntoIterator<Item = &'a str>) {
    for (i, name) in names.into_iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(name);
    }
}

/// Runs `use_it` on a byte buffer the thread keeps between calls, empty: what a copy is
/// serialized into, a delivery log record's text to hash. Made once per thread rather than per
/// message; a buffer grown past 8 MiB by a larger message is let go.
pub(crate) fn with_thread_buffer<R>(use_it: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    const KEPT: usize = 8 * 1024 * 1024;
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUFFER.with_borrow_mut(|buffer| {
        buffer.clear();
        let result = use_it(buffer);
        if buffer.capacity() > KEPT {
            *buffer = Vec::new();
        }
        result
    })
}

/// A SHA-256 digest (a delivery log record's hash, a pseudonym's HMAC) as its 64 lowercase hex
/// digits, written into a slice: `hex::encode` pushes each digit as a `char` into a `String` it
/// grows, some 1.7 K instructions a digest.
pub(crate) fn hex_of_digest(digest: &[u8]) -> String {
    let mut digits = [0u8; 64];
    hex::encode_to_slice(digest, &mut digits).expect("a SHA-256 digest is 64 hex digits");
    String::from_utf8(digits.to_vec()).expect("hex digits are ASCII")
}

/// Seconds since the Unix epoch, for the times Ponte keeps in whole seconds (the store's
/// records, a copy's AMQP `timestamp`). Read from the kernel's coarse real-time clock: the time
/// of its last tick (a few milliseconds ago), which the vDSO returns without the processor's
/// time-stamp counter that an exact reading waits for (about a third of the cost on the
/// benchmark's machine; a message read the clock in seconds some four times).
pub fn unix_secs() -> i64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a `timespec` the call may write; the clock is one every Linux since
    // 2.6.32 has. Through glibc, which finds the vDSO (and falls back to the system call where
    // there is none, as under valgrind).
    let read = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut now) };
    if read != 0 {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
    }
    now.tv_sec
}

/// For tests of [`wait_aside`]: a runtime where one waiting task would hold back every other.
#[cfg(test)]
pub(crate) mod one_worker {
    use std::time::Duration;

    /// A multi-threaded runtime with one worker: a task that blocks it leaves no other thread.
    pub fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    /// Whether a task spawned now on `runtime` (say, the ops endpoint's) runs within 3 s.
    pub fn another_task_runs(runtime: &tokio::runtime::Runtime) -> bool {
        let (ran, answer) = std::sync::mpsc::channel();
        runtime.spawn(async move { ran.send(()).unwrap() });
        answer.recv_timeout(Duration::from_secs(3)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn seconds_are_the_wall_clock_s_whole_seconds() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let coarse = super::unix_secs();
        // The coarse clock is the real-time clock at its last tick: at most a tick behind an
        // exact reading (a monotonic clock, say, would be decades off).
        assert!(
            (before - 1..=before + 1).contains(&coarse),
            "{coarse} against {before}"
        );
    }
}
