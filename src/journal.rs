//! Journal: the delivery log. Every step of every message — its outcome when settled (delivered,
//! partial, rejected, given back already delivered), a hand-back to its queue, a copy sent to the
//! delay queues, delivered on a later attempt, dead-lettered, and whether it was a replay — is
//! one record with time, message_id, correlation_id, sender, recipients, type, code, latency and
//! a short detail. Never the payload, never a person identifier.
//!
//! Records live in `log.db` in the data folder, written by one thread in batches so that the
//! message path only hands a record over. The log is tamper-evident in the manner of X-Road's
//! message log: each record stores the SHA-256 of its own fields and of the previous record's
//! hash, so altering or removing a record breaks the chain from there on; `ponte log verify`
//! names the first record where it breaks. Retention removes the oldest records; the chain is
//! then verified from the oldest record kept. Records are found by message or correlation id
//! through an index written in parts of some 50,000 records, and by sender through each part's
//! list of its senders' records (see `SCHEMA`).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Records waiting for the writer, at most; beyond that, recording waits (never drops).
const QUEUE: usize = 16_384;
/// Records held for a slow events publisher before it starts losing the oldest.
const EVENTS: usize = 16_384;
/// The writer gathers records this long after the first of a batch arrives (each commit
/// rewrites the pages its records share — the table's last page, the index pages they fall
/// in — so fewer, larger batches write a quarter less to disk than 50 ms ones did; the log
/// shows a step up to a quarter of a second after it happened)...
const BATCH_EVERY: Duration = Duration::from_millis(250);
/// ...and writes at most this many in one transaction.
const BATCH_MAX: usize = 8192;

/// Pruning removes at most this many records per transaction: removing a day's records of a
/// large log at once held the log's lock for seconds, and the writer gives up on a batch after
/// waiting 5 s for it.
const PRUNE_STEP: usize = 1000;

/// How long a batch that cannot be written is tried again before its records are given up
/// (logged at ERROR); meanwhile the records behind it wait, and past [`QUEUE`] of them, so does
/// recording.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);

/// The writer lists the senders' records of a part of a log from before they were listed (see
/// [`Backfill`]) at most this often: 10–21 ms of its time a part of 50,000 records (some 7% of
/// its time meanwhile), a year of a million records a day listed in half an hour.
const BACKFILL_EVERY: Duration = Duration::from_millis(250);

/// The hash before the first record.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS event (
    seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    step TEXT NOT NULL,
    message_id TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,
    type TEXT NOT NULL,
    code TEXT NOT NULL,
    latency_ms REAL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
-- Message and correlation ids are found through parts of the log: each part is a run of
-- PART or so consecutive records, its ids' keys written sorted once it is full, so that the
-- index only grows at its end. A look-up seeks once per part and reads the open part (the
-- newest records, not yet in a part) through. See `close_part`. A release from before the
-- parts, run on this log again, indexes it by day and leaves the parts be; this one then
-- closes parts from where they stopped.
-- A part lists each sender's records too (`event_sender_part`: their numbers, each as its
-- distance from the one before, in LEB128), so that a look-up by sender goes through the parts
-- newest first; `senders` says whether it does (see `Backfill`).
CREATE TABLE IF NOT EXISTS event_part (
    first INTEGER PRIMARY KEY,
    last INTEGER NOT NULL,
    senders INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS event_key (
    part INTEGER NOT NULL,
    key INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (part, key, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS event_sender_part (
    part INTEGER NOT NULL,
    sender TEXT NOT NULL,
    seqs BLOB NOT NULL,
    PRIMARY KEY (part, sender)
) WITHOUT ROWID;
";

/// The indexes of earlier layouts. Of ids: by id alone, then under their day. Ids are random,
/// so either took each new record's entry to its own place in a large index: a batch read and
/// rewrote about one page per record, three quarters of the writer's work. By sender
/// (`event_sender`, on sender and seq): each record's entry went to the end of its sender's
/// run, in the middle of the index for all senders but the last, at some 4,700 instructions
/// a record, a sixth of the writer's count.
const OLD_INDEXES: &str =
    "DROP INDEX IF EXISTS event_message; DROP INDEX IF EXISTS event_correlation;
    DROP INDEX IF EXISTS event_message_by_day; DROP INDEX IF EXISTS event_correlation_by_day;
    DROP INDEX IF EXISTS event_sender;";

/// Records per part of the log's index of ids, at least (a part closes with the batch that
/// fills it). A look-up seeks once per part (some 7,000 for a year of a million records a day)
/// and reads the open part's records through (tens of milliseconds at most).
const PART: i64 = 50_000;

/// The records whose id (message or correlation) has the key `?K`: in the parts, by seeking
/// each, and in the open part, whose records are read through for the id `?I` in `{column}`.
const KEYED: &str = "WITH keyed(seq) AS (
    SELECT k.seq FROM event_part p CROSS JOIN event_key k ON k.part = p.first AND k.key = ?K
    UNION ALL
    SELECT seq FROM event
    WHERE seq > coalesce((SELECT last FROM event_part ORDER BY first DESC LIMIT 1), 0)
      AND {column} = ?I)";

/// One step of one message.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Event {
    /// Unix time in milliseconds.
    pub at_ms: i64,
    /// `delivered`, `partial`, `rejected`, `already-delivered`, `handed-back`, `retrying`,
    /// `dead-lettered`. Ponte's own constants when recorded, not copied for each message.
    pub step: Cow<'static, str>,
    pub message_id: String,
    pub correlation_id: String,
    pub sender: String,
    /// Comma-separated.
    pub recipients: String,
    #[serde(rename = "type")]
    pub message_type: String,
    /// A receipt code (or empty), as `step`.
    pub code: Cow<'static, str>,
    /// From receipt to settlement, for outcomes.
    pub latency_ms: Option<f64>,
    /// Attempts, a reason, where a replay came from: what the step needs to be understood.
    pub detail: String,
}

impl Event {
    pub fn now(step: &'static str) -> Event {
        Event {
            at_ms: now_ms(),
            step: Cow::Borrowed(step),
            ..Default::default()
        }
    }

    /// The hash chaining this record to the previous one: the SHA-256, in hex, of each field
    /// as text followed by a zero byte. The text is written into one buffer and hashed at once:
    /// a record is hashed per message, on the log's writer thread, and a dozen small updates of
    /// the hasher cost more than the hashing. The buffer is the thread's, kept between records.
    fn hash(&self, seq: i64, prev: &str) -> String {
        crate::with_thread_buffer(|text| {
            self.hash_text(text, seq, prev);
            crate::hex_of_digest(&Sha256::digest(&*text))
        })
    }

    /// The text [`Event::hash`] hashes, written into `text`.
    fn hash_text(&self, text: &mut Vec<u8>, seq: i64, prev: &str) {
        text.extend_from_slice(prev.as_bytes());
        // The integers as `Display` writes them, without the formatting machinery's ~900
        // instructions a call.
        let mut digits = itoa::Buffer::new();
        text.push(0);
        text.extend_from_slice(digits.format(seq).as_bytes());
        text.push(0);
        text.extend_from_slice(digits.format(self.at_ms).as_bytes());
        text.push(0);
        for part in [
            &*self.step,
            &self.message_id,
            &self.correlation_id,
            &self.sender,
            &self.recipients,
            &self.message_type,
            &self.code,
        ] {
            text.extend_from_slice(part.as_bytes());
            text.push(0);
        }
        if let Some(l) = self.latency_ms {
            write_thousandths(text, l);
        }
        text.push(0);
        text.extend_from_slice(self.detail.as_bytes());
        text.push(0);
    }
}

/// Appends `value` as `format!("{value:.3}")` writes it: through integers, unless the value is
/// negative, too large or not finite, or so near a half-way point between two thousandths that
/// multiplying it by 1,000 (exact to half a unit in the last place) could tip its rounding;
/// then through the formatter, whose exact rounding costs some 1,100 instructions. A record's
/// hash covers this text: it must stay what earlier versions wrote.
fn write_thousandths(text: &mut Vec<u8>, value: f64) {
    let scaled = value * 1000.0;
    // Below 2^52 the fraction of `scaled` is exact.
    if value.is_sign_positive() && scaled < 4.0e15 {
        let whole = scaled.floor();
        let fraction = scaled - whole;
        if (fraction - 0.5).abs() > scaled * f64::EPSILON {
            let thousandths = whole as u64 + u64::from(fraction > 0.5);
            let mut digits = itoa::Buffer::new();
            text.extend_from_slice(digits.format(thousandths / 1000).as_bytes());
            let rest = thousandths % 1000;
            text.extend_from_slice(&[
                b'.',
                b'0' + (rest / 100) as u8,
                b'0' + (rest / 10 % 10) as u8,
                b'0' + (rest % 10) as u8,
            ]);
            return;
        }
    }
    use std::io::Write;
    // Writing into a Vec cannot fail.
    let _ = write!(text, "{value:.3}");
}

/// A record as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Logged {
    pub seq: i64,
    /// RFC 3339.
    pub at: String,
    #[serde(flatten)]
    pub event: Event,
}

impl Logged {
    /// One line for people: time, step, code, who to whom, type, ids, latency, detail.
    pub fn line(&self) -> String {
        let e = &self.event;
        let mut line = format!(
            "{}  {:<17} {:<22} {} -> {}  {}  {}",
            self.at,
            e.step,
            e.code,
            e.sender,
            if e.recipients.is_empty() {
                "-"
            } else {
                &e.recipients
            },
            e.message_type,
            e.message_id
        );
        if !e.correlation_id.is_empty() {
            line.push_str(&format!(" (answers {})", e.correlation_id));
        }
        if let Some(ms) = e.latency_ms {
            line.push_str(&format!("  {ms:.1} ms"));
        }
        if !e.detail.is_empty() {
            line.push_str(&format!("  [{}]", e.detail));
        }
        line
    }
}

/// A time for `ponte log --since/--until`: RFC 3339, a date (`YYYY-MM-DD`, midnight UTC), or an
/// age before now (`30s`, `90m`, `2h`, `1d`). Unix milliseconds.
pub fn parse_time(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let bad = || format!("{text:?}: expected RFC 3339, YYYY-MM-DD, or an age like 90m, 2h, 1d");
    if let Ok(t) = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    if let Ok(d) = time::Date::parse(
        text,
        time::macros::format_description!("[year]-[month]-[day]"),
    ) {
        return Ok(d.midnight().assume_utc().unix_timestamp() * 1000);
    }
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = text.split_at(split);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    Ok(now_ms() - n * seconds * 1000)
}

enum Command {
    Record(Event),
    Flush(SyncSender<()>),
}

/// The writing end of the delivery log.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    tx: SyncSender<Command>,
    /// Records for the events exchange, when someone listens; best effort (the log is the
    /// record), so a listener that falls behind loses the oldest and is told how many.
    events: std::sync::OnceLock<tokio::sync::broadcast::Sender<Event>>,
}

/// A new log is made of pages of this many bytes, four times SQLite's default. The writer
/// appends thousands of records a batch, and each page it fills is one more write to the
/// write-ahead log, read back and written again at the checkpoint: a quarter as many of them
/// took the log's thread a sixth less time per record, for as many bytes on the disk (the
/// write-ahead log grows to 16 MiB, SQLite's 1,000 pages, before its checkpoint). A log made
/// before keeps its pages: SQLite sets the size only of a database not yet written.
const PAGE_SIZE: u32 = 16_384;

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let connection = Connection::open(path)?;
    connection.execute_batch(&format!(
        "PRAGMA page_size = {PAGE_SIZE}; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         PRAGMA busy_timeout = 5000;"
    ))?;
    Ok(connection)
}

/// Creates the table and its indexes, or brings an older layout's indexes up to [`SCHEMA`]:
/// once, when the writer opens the log at start (readers, one per console request, find it
/// done).
fn migrate(connection: &mut Connection, path: &Path) -> rusqlite::Result<()> {
    let tx = connection.transaction()?;
    tx.execute_batch(OLD_INDEXES)?;
    tx.execute_batch(SCHEMA)?;
    // The parts of a log from before senders were listed in them are marked as not listed;
    // the writer lists them in the background (`Backfill`).
    if !lists_senders(&tx)? {
        tx.execute_batch("ALTER TABLE event_part ADD COLUMN senders INTEGER NOT NULL DEFAULT 0")?;
    }
    tx.commit()?;
    // A log of an earlier layout has every record in its open part: its full parts are closed
    // now, one transaction each.
    let mut told = false;
    loop {
        let tx = connection.transaction()?;
        let (first, newest) = open_part(&tx)?;
        if newest - first + 1 < PART {
            return Ok(());
        }
        if !told {
            tracing::info!(log = %path.display(), "indexing the delivery log's ids in parts, once");
            told = true;
        }
        close_part(&tx, first, first + PART - 1)?;
        tx.commit()?;
    }
}

/// The first record of the open part, and the newest record.
fn open_part(tx: &Connection) -> rusqlite::Result<(i64, i64)> {
    tx.prepare_cached(
        "SELECT coalesce((SELECT last FROM event_part ORDER BY first DESC LIMIT 1), 0) + 1,
                coalesce((SELECT seq FROM event ORDER BY seq DESC LIMIT 1), 0)",
    )?
    .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
}

/// Makes the records `first..=last` a part: the keys of their message and correlation ids,
/// sorted, go at the end of the index of ids (`event_key`), where the B-tree only grows; each
/// sender's records are listed in one row.
fn close_part(tx: &Connection, first: i64, last: i64) -> rusqlite::Result<()> {
    let mut keys: Vec<(i64, i64)> = Vec::with_capacity((last - first + 1) as usize);
    let senders = read_part(tx, first, last, Some(&mut keys))?;
    keys.sort_unstable();
    keys.dedup();
    let mut insert =
        tx.prepare_cached("INSERT INTO event_key (part, key, seq) VALUES (?1, ?2, ?3)")?;
    for (key, seq) in keys {
        insert.execute(params![first, key, seq])?;
    }
    write_senders(tx, first, senders)?;
    tx.prepare_cached("INSERT INTO event_part (first, last, senders) VALUES (?1, ?2, 1)")?
        .execute(params![first, last])?;
    Ok(())
}

/// Reads the records `first..=last`: each sender's records' numbers, as their distances from
/// the one before (from `first - 1`) in LEB128, and into `keys` the keys of their ids.
fn read_part(
    tx: &Connection,
    first: i64,
    last: i64,
    mut keys: Option<&mut Vec<(i64, i64)>>,
) -> rusqlite::Result<Vec<(String, Vec<u8>)>> {
    // A part's senders are few: each is found among them by its name, with its list so far
    // and the last record in it.
    let mut senders: Vec<(String, Vec<u8>, i64)> = Vec::new();
    let mut rows = tx.prepare_cached(
        "SELECT seq, sender, message_id, correlation_id FROM event WHERE seq BETWEEN ?1 AND ?2",
    )?;
    let mut rows = rows.query(params![first, last])?;
    while let Some(r) = rows.next()? {
        let seq: i64 = r.get(0)?;
        let sender = r.get_ref(1)?.as_str().unwrap_or_default();
        let i = match senders.iter().position(|(s, _, _)| s == sender) {
            Some(i) => i,
            None => {
                senders.push((sender.to_string(), Vec::new(), first - 1));
                senders.len() - 1
            }
        };
        let (_, seqs, before) = &mut senders[i];
        leb128(seqs, (seq - *before) as u64);
        *before = seq;
        if let Some(keys) = keys.as_deref_mut() {
            for column in [2, 3] {
                let id = r.get_ref(column)?.as_str().unwrap_or_default();
                if !id.is_empty() {
                    keys.push((key(id), seq));
                }
            }
        }
    }
    Ok(senders
        .into_iter()
        .map(|(sender, seqs, _)| (sender, seqs))
        .collect())
}

fn write_senders(
    tx: &Connection,
    part: i64,
    senders: Vec<(String, Vec<u8>)>,
) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(
        "INSERT OR REPLACE INTO event_sender_part (part, sender, seqs) VALUES (?1, ?2, ?3)",
    )?;
    for (sender, seqs) in senders {
        insert.execute(params![part, sender, seqs])?;
    }
    Ok(())
}

fn leb128(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The record numbers a sender's row of a part lists (`read_part`), in order. A row altered
/// by hand gives wrong numbers, never a panic: a record is read by its number, and checked
/// against the look-up's conditions.
fn part_seqs(first: i64, bytes: &[u8]) -> Vec<i64> {
    let mut seqs = Vec::new();
    let (mut seq, mut value, mut shift) = (first - 1, 0u64, 0u32);
    for &b in bytes {
        value |= u64::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
        shift = shift.saturating_add(7);
        if b < 0x80 {
            seq = seq.wrapping_add(value as i64);
            seqs.push(seq);
            (value, shift) = (0, 0);
        }
    }
    seqs
}

/// Whether the log's parts say if their senders are listed (a log from before has no such
/// column until the writer opens it).
fn lists_senders(connection: &Connection) -> rusqlite::Result<bool> {
    connection
        .prepare("SELECT 1 FROM pragma_table_info('event_part') WHERE name = 'senders'")?
        .exists([])
}

/// The parts of a log from before senders were listed in them get their senders' lists from
/// the writer, a part at a time, newest first, at most one every [`BACKFILL_EVERY`] so that the
/// records keep their pace. Meanwhile a look-up by sender reads those parts through.
struct Backfill {
    /// Whether a part may be left to list.
    pending: bool,
    last: std::time::Instant,
}

impl Backfill {
    fn new(connection: &Connection, path: &str) -> Backfill {
        let unlisted: i64 = connection
            .query_row(
                "SELECT count(*) FROM event_part WHERE senders = 0",
                [],
                |r| r.get(0),
            )
            .unwrap_or(0);
        if unlisted > 0 {
            tracing::info!(log = %path, parts = unlisted, "listing the delivery log's senders in its parts, in the background");
        }
        Backfill {
            pending: unlisted > 0,
            last: std::time::Instant::now(),
        }
    }

    /// How long the writer may wait for records before a part is due.
    fn wait(&self) -> Option<Duration> {
        self.pending
            .then(|| BACKFILL_EVERY.saturating_sub(self.last.elapsed()))
    }

    /// Lists the senders of the newest part not yet listed, when one is due.
    fn step(&mut self, connection: &mut Connection, path: &str) {
        if !self.pending || self.last.elapsed() < BACKFILL_EVERY {
            return;
        }
        self.last = std::time::Instant::now();
        match list_a_part(connection) {
            Ok(true) => {
                tracing::debug!(log = %path, ms = self.last.elapsed().as_millis() as u64, "listed the senders of a part of the delivery log");
            }
            Ok(false) => {
                self.pending = false;
                tracing::info!(log = %path, "the delivery log's senders are listed in all its parts");
            }
            // Tried again at the next step.
            Err(error) => {
                tracing::warn!(log = %path, %error, "cannot list the senders of a part of the delivery log yet")
            }
        }
    }
}

/// Lists the senders' records of the newest part not yet listed; false when there was none.
fn list_a_part(connection: &mut Connection) -> rusqlite::Result<bool> {
    let tx = connection.transaction()?;
    let part: Option<(i64, i64)> = tx
        .query_row(
            "SELECT first, last FROM event_part WHERE senders = 0 ORDER BY first DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((first, last)) = part else {
        return Ok(false);
    };
    let senders = read_part(&tx, first, last, None)?;
    write_senders(&tx, first, senders)?;
    tx.execute(
        "UPDATE event_part SET senders = 1 WHERE first = ?1",
        params![first],
    )?;
    tx.commit()?;
    Ok(true)
}

/// The 64-bit key of a message or correlation id in the index of ids: the first eight bytes of
/// its SHA-256 (the id itself is compared when the record is read).
fn key(id: &str) -> i64 {
    let digest = Sha256::digest(id.as_bytes());
    i64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

impl Journal {
    /// Opens (creating if needed) `log.db` in `dir` and starts its writer.
    pub fn open(dir: &Path) -> Result<Journal, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("log.db");
        let connection = open_connection(&path)
            .and_then(|mut c| migrate(&mut c, &path).map(|()| c))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let last: Option<(i64, String)> = connection
            .query_row(
                "SELECT seq, hash FROM event ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let (tx, rx) = sync_channel(QUEUE);
        let shown = path.display().to_string();
        std::thread::Builder::new()
            .name("ponte-journal".into())
            .spawn(move || write(connection, rx, last, shown))
            .map_err(|e| e.to_string())?;
        Ok(Journal {
            path,
            tx,
            events: std::sync::OnceLock::new(),
        })
    }

    /// Hands a record to the writer (waits only if the writer is far behind).
    pub fn record(&self, event: Event) {
        if let Some(events) = self.events.get()
            && events.receiver_count() > 0
        {
            let _ = events.send(event.clone());
        }
        match self.tx.try_send(Command::Record(event)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(record)) => self.wait_for_room(record),
        }
    }

    /// The writer is [`QUEUE`] records behind (a disk that stalls, a log locked by another
    /// process): recording waits, nothing is dropped, and nothing else waits with it.
    fn wait_for_room(&self, record: Command) {
        crate::wait_aside(|| {
            let _ = self.tx.send(record);
        });
    }

    /// Every record from now on, for publishing elsewhere.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.events
            .get_or_init(|| tokio::sync::broadcast::Sender::new(EVENTS))
            .subscribe()
    }

    /// Returns once every record handed over so far is written.
    pub fn flush(&self) {
        let (done, wait) = sync_channel(1);
        if self.tx.send(Command::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

// Never inlined: `bench/run.sh --callgrind` counts the log's thread by its name.
#[inline(never)]
fn write(
    mut connection: Connection,
    rx: Receiver<Command>,
    last: Option<(i64, String)>,
    path: String,
) {
    let (mut seq, mut prev) = last.unwrap_or((0, GENESIS.to_string()));
    // Kept from batch to batch (at most `BATCH_MAX` records): grown anew for each, it moved its
    // records to a larger block some ten times over.
    let mut batch = Vec::new();
    let mut backfill = Backfill::new(&connection, &path);
    loop {
        let first = match backfill.wait() {
            None => rx.recv().map_err(|_| ()),
            Some(wait) => match rx.recv_timeout(wait) {
                Ok(command) => Ok(command),
                Err(RecvTimeoutError::Timeout) => {
                    backfill.step(&mut connection, &path);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => Err(()),
            },
        };
        let Ok(first) = first else {
            return;
        };
        // Let the batch gather rather than waking for each record (a wake-up per message costs
        // more than writing it), unless someone waits for the log to be written.
        if !matches!(first, Command::Flush(_)) {
            std::thread::sleep(BATCH_EVERY);
        }
        batch.push(first);
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        // A batch that cannot be written (the log locked by another process for longer than
        // the busy timeout, a full disk) is written again, the records behind it waiting, until
        // it is or [`GIVE_UP_AFTER`] has passed; the chain goes on from the last batch written.
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            match write_batch(&mut connection, &batch, seq, &prev) {
                Ok(last) => {
                    (seq, prev) = last;
                    break;
                }
                Err(error) if started.elapsed() < GIVE_UP_AFTER => {
                    tracing::error!(log = %path, %error, records = batch.len(), "cannot write the delivery log; trying again");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(error) => {
                    tracing::error!(log = %path, %error, records = batch.len(), "cannot write the delivery log; these records are lost");
                    break;
                }
            }
        }
        for command in batch.drain(..) {
            if let Command::Flush(done) = command {
                let _ = done.send(());
            }
        }
        backfill.step(&mut connection, &path);
    }
}

/// Writes the records of `batch` in one transaction, chained on from record `seq` (hash
/// `prev`); returns the last record's number and hash.
fn write_batch(
    connection: &mut Connection,
    batch: &[Command],
    seq: i64,
    prev: &str,
) -> rusqlite::Result<(i64, String)> {
    let (mut next_seq, mut next_prev) = (seq, prev.to_string());
    let tx = connection.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO event (seq, at_ms, step, message_id, correlation_id, sender,
             recipients, type, code, latency_ms, detail, prev_hash, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?;
        for command in batch {
            if let Command::Record(e) = command {
                next_seq += 1;
                let hash = e.hash(next_seq, &next_prev);
                insert.execute(params![
                    next_seq,
                    e.at_ms,
                    e.step,
                    e.message_id,
                    e.correlation_id,
                    e.sender,
                    e.recipients,
                    e.message_type,
                    e.code,
                    e.latency_ms,
                    e.detail,
                    next_prev,
                    hash
                ])?;
                next_prev = hash;
            }
        }
    }
    let (first, newest) = open_part(&tx)?;
    if newest - first + 1 >= PART {
        close_part(&tx, first, newest)?;
    }
    tx.commit()?;
    Ok((next_seq, next_prev))
}

/// What `ponte log` asks for; every field set narrows the answer.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub sender: Option<String>,
    pub recipient: Option<String>,
    pub code: Option<String>,
    pub step: Option<String>,
    /// Unix milliseconds, inclusive.
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Only records after this sequence number (for `--follow`).
    pub after_seq: Option<i64>,
    pub limit: usize,
}

/// Reads the delivery log in `dir`.
pub struct Reader {
    connection: Connection,
    /// Whether the log is indexed in parts: a log of an earlier layout, read before the gateway
    /// that brings it up to date has started, is read through for an id.
    parts: bool,
    /// Whether its parts key their senders: until then, a look-up by sender goes through the
    /// index by sender of the earlier layout.
    senders: bool,
}

impl Reader {
    pub fn open(dir: &Path) -> Result<Reader, String> {
        let path = dir.join("log.db");
        if !path.exists() {
            return Err(format!(
                "{}: no delivery log (the gateway has not run with this data folder)",
                path.display()
            ));
        }
        let connection = open_connection(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let parts = connection
            .prepare("SELECT 1 FROM sqlite_master WHERE name = 'event_part'")
            .and_then(|mut s| s.exists([]))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let senders =
            parts && lists_senders(&connection).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Reader {
            connection,
            parts,
            senders,
        })
    }

    /// The newest `filter.limit` records matching `filter`, oldest first.
    pub fn query(&self, filter: &Filter) -> rusqlite::Result<Vec<Logged>> {
        let mut out = match &filter.sender {
            Some(sender)
                if self.senders
                    && filter.message_id.is_none()
                    && filter.correlation_id.is_none() =>
            {
                self.by_sender(filter, sender)?
            }
            _ => {
                let (sql, values) = select(filter, self.parts);
                let mut statement = self.connection.prepare(&sql)?;
                statement
                    .query_map(rusqlite::params_from_iter(values), logged)?
                    .collect::<rusqlite::Result<_>>()?
            }
        };
        out.reverse();
        Ok(out)
    }

    /// The newest `filter.limit` records of `sender` matching `filter`, newest first: those of
    /// the open part read through, then each part's, newest part first, through its list of
    /// the sender's records (or read through, in a part not yet listed), until there are
    /// enough.
    fn by_sender(&self, filter: &Filter, sender: &str) -> rusqlite::Result<Vec<Logged>> {
        let limit = filter.limit.max(1);
        let after = filter.after_seq.unwrap_or(0);
        let (condition, mut values) = conditions(filter);
        // One statement for a range of records: the open part, a part read through, or one
        // listed record. Its bounds follow the filter's values, then how many are wanted.
        let n = values.len();
        let mut read = self.connection.prepare(&format!(
            "SELECT {COLUMNS} FROM event WHERE seq BETWEEN ?{} AND ?{} AND {condition}
             ORDER BY seq DESC LIMIT ?{}",
            n + 1,
            n + 2,
            n + 3
        ))?;
        values.extend([0i64; 3].map(rusqlite::types::Value::from));
        let mut between = |from: i64, to: i64, wanted: usize| {
            values[n] = from.into();
            values[n + 1] = to.into();
            values[n + 2] = (wanted as i64).into();
            read.query_map(rusqlite::params_from_iter(values.iter()), logged)?
                .collect::<rusqlite::Result<Vec<Logged>>>()
        };
        let parts: Vec<(i64, i64, bool)> = self
            .connection
            .prepare(
                "SELECT first, last, senders FROM event_part WHERE last > ?1 ORDER BY first DESC",
            )?
            .query_map(params![after], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let open = parts.first().map_or(0, |&(_, last, _)| last);
        let mut out = between(open + 1, i64::MAX, limit)?;
        let mut listed = self
            .connection
            .prepare("SELECT seqs FROM event_sender_part WHERE part = ?1 AND sender = ?2")?;
        for (first, last, senders) in parts {
            if out.len() >= limit {
                break;
            }
            if !senders {
                out.extend(between(first, last, limit - out.len())?);
                continue;
            }
            let seqs: Option<Vec<u8>> = listed
                .query_row(params![first, sender], |r| r.get(0))
                .optional()?;
            for seq in part_seqs(first, &seqs.unwrap_or_default())
                .into_iter()
                .rev()
            {
                if out.len() >= limit || seq <= after {
                    break;
                }
                out.extend(between(seq, seq, 1)?);
            }
        }
        Ok(out)
    }

    /// Checks the hash chain from the oldest record kept: `Ok(records checked)`, or the first
    /// record that was altered, or after which records were removed.
    pub fn verify(&self) -> rusqlite::Result<Result<u64, String>> {
        let mut statement = self.connection.prepare(
            "SELECT seq, at_ms, step, message_id, correlation_id, sender, recipients, type, code,
             latency_ms, detail, prev_hash, hash FROM event ORDER BY seq",
        )?;
        let mut rows = statement.query([])?;
        let mut checked = 0u64;
        let mut previous: Option<(i64, String)> = None;
        while let Some(r) = rows.next()? {
            let seq: i64 = r.get(0)?;
            let event = event_of(r)?;
            let prev_hash: String = r.get(11)?;
            let hash: String = r.get(12)?;
            if let Some((prev_seq, prev_stored)) = &previous {
                if seq != prev_seq + 1 || &prev_hash != prev_stored {
                    return Ok(Err(format!(
                        "record {seq}: the record before it (after {prev_seq}) was removed or altered"
                    )));
                }
            } else if seq == 1 && prev_hash != GENESIS {
                return Ok(Err("record 1: does not start the chain".into()));
            }
            if event.hash(seq, &prev_hash) != hash {
                return Ok(Err(format!(
                    "record {seq} (message {}) was altered: its hash does not match its contents",
                    event.message_id
                )));
            }
            previous = Some((seq, hash));
            checked += 1;
        }
        Ok(Ok(checked))
    }

    /// Removes the oldest records, up to the first one not older than `age`, so that the chain
    /// stays whole and is verified from the oldest record kept (a record written while the
    /// clock was set back stops pruning until it ages too). Goes by steps of `PRUNE_STEP`
    /// records, one transaction each, so the writer goes on logging in between.
    pub fn prune(&self, age: Duration) -> rusqlite::Result<usize> {
        let cutoff = now_ms() - age.as_millis() as i64;
        let mut oldest = self
            .connection
            .prepare("SELECT seq, at_ms FROM event ORDER BY seq LIMIT ?1")?;
        let mut pruned = 0;
        loop {
            let records: Vec<(i64, i64)> = oldest
                .query_map(params![PRUNE_STEP as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let old = records.iter().take_while(|(_, at)| *at < cutoff).count();
            let Some(&(last, _)) = old.checked_sub(1).and_then(|i| records.get(i)) else {
                return Ok(pruned);
            };
            pruned += self
                .connection
                .execute("DELETE FROM event WHERE seq <= ?1", params![last])?;
            // A part's keys go with its last record (those of a part pruned in part lead to
            // nothing: a look-up reads the record too).
            self.connection.execute(
                "DELETE FROM event_key WHERE part IN (SELECT first FROM event_part WHERE last <= ?1)",
                params![last],
            )?;
            self.connection.execute(
                "DELETE FROM event_sender_part WHERE part IN (SELECT first FROM event_part WHERE last <= ?1)",
                params![last],
            )?;
            self.connection
                .execute("DELETE FROM event_part WHERE last <= ?1", params![last])?;
            if old < PRUNE_STEP {
                return Ok(pruned);
            }
        }
    }
}

/// The columns a query reads, as [`event_of`] and [`logged`] read them.
const COLUMNS: &str = "seq, at_ms, step, message_id, correlation_id, sender, recipients, type, code, latency_ms, detail";

/// The query for `filter`, and its values; by id through the index in `parts`, or else reading
/// the log through.
fn select(filter: &Filter, parts: bool) -> (String, Vec<rusqlite::types::Value>) {
    // A look-up by id goes through the index of ids, by the message id when both are given.
    let keyed = match (&filter.message_id, &filter.correlation_id) {
        _ if !parts => None,
        (Some(id), _) => Some(("message_id", id)),
        (None, Some(id)) => Some(("correlation_id", id)),
        (None, None) => None,
    };
    let (condition, mut values) = conditions(filter);
    let with = match keyed {
        Some((column, id)) => {
            let k = values.len() + 1;
            values.push(key(id).into());
            values.push(id.clone().into());
            format!(
                "{} SELECT {COLUMNS} FROM event WHERE seq IN keyed AND ",
                KEYED
                    .replace("{column}", column)
                    .replace("?K", &format!("?{k}"))
                    .replace("?I", &format!("?{}", k + 1))
            )
        }
        None => format!("SELECT {COLUMNS} FROM event WHERE "),
    };
    let sql = format!(
        "{with}{condition} ORDER BY seq DESC LIMIT {}",
        filter.limit.max(1)
    );
    (sql, values)
}

/// The condition every record of `filter`'s answer meets (`1` for none), and its values,
/// numbered from `?1`.
fn conditions(filter: &Filter) -> (String, Vec<rusqlite::types::Value>) {
    let mut clauses: Vec<String> = Vec::new();
    let mut values: Vec<rusqlite::types::Value> = Vec::new();
    let mut text = |clause: &str, value: &Option<String>| {
        if let Some(v) = value {
            values.push(v.clone().into());
            clauses.push(clause.replace('?', &format!("?{}", values.len())));
        }
    };
    text("message_id = ?", &filter.message_id);
    text("correlation_id = ?", &filter.correlation_id);
    text("sender = ?", &filter.sender);
    text("code = ?", &filter.code);
    text("step = ?", &filter.step);
    text(
        "(',' || recipients || ',') LIKE ('%,' || ? || ',%')",
        &filter.recipient,
    );
    for (clause, value) in [
        ("at_ms >= ?", filter.since_ms),
        ("at_ms <= ?", filter.until_ms),
        ("seq > ?", filter.after_seq),
    ] {
        if let Some(v) = value {
            values.push(v.into());
            clauses.push(clause.replace('?', &format!("?{}", values.len())));
        }
    }
    if clauses.is_empty() {
        ("1".to_string(), values)
    } else {
        (clauses.join(" AND "), values)
    }
}

/// A record of a row selected as [`COLUMNS`].
fn logged(r: &rusqlite::Row<'_>) -> rusqlite::Result<Logged> {
    let event = event_of(r)?;
    Ok(Logged {
        seq: r.get(0)?,
        at: rfc3339(event.at_ms),
        event,
    })
}

/// The event of a row selected as `seq, at_ms, step, message_id, correlation_id, sender,
/// recipients, type, code, latency_ms, detail, …`.
fn event_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    Ok(Event {
        at_ms: r.get(1)?,
        step: Cow::Owned(r.get(2)?),
        message_id: r.get(3)?,
        correlation_id: r.get(4)?,
        sender: r.get(5)?,
        recipients: r.get(6)?,
        message_type: r.get(7)?,
        code: Cow::Owned(r.get(8)?),
        latency_ms: r.get(9)?,
        detail: r.get(10)?,
    })
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Unix milliseconds as RFC 3339.
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ponte-journal-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn event(id: &str, step: &'static str) -> Event {
        Event {
            message_id: id.into(),
            sender: "inps".into(),
            recipients: "cpi-modena,osservatorio-er".into(),
            message_type: "benefit-status".into(),
            code: "delivered".into(),
            latency_ms: Some(1.5),
            ..Event::now(step)
        }
    }

    #[test]
    fn a_record_s_hash_is_the_sha256_of_its_fields_as_text_each_ended_by_a_zero_byte() {
        // Expected values computed apart from Ponte (Python's hashlib over the same fields), so
        // that a log written by any earlier version still verifies.
        let mut e = Event {
            at_ms: 1_764_720_000_123,
            step: "delivered".into(),
            message_id: "6f1c2a9e-8a4b-4c1e-9b7a-3d2f1e0c9b8a".into(),
            sender: "inps".into(),
            recipients: "cpi-modena,osservatorio-er".into(),
            message_type: "benefit-status".into(),
            code: "delivered".into(),
            latency_ms: Some(12.3456),
            ..Default::default()
        };
        assert_eq!(
            e.hash(7, GENESIS),
            "1234f601bba2919f4f48d88aaf05eee4104008d46fa665a0df2857a7fea60a5b"
        );
        e.latency_ms = None;
        assert_eq!(
            e.hash(7, GENESIS),
            "adeb099534af3cb0e96fe85135d82f6830bb4bec761fbb95dbde2a70b6e4e53e"
        );
        // Numbers with a sign, as Rust and Python write them.
        e.at_ms = -1;
        assert_eq!(
            e.hash(i64::MIN, GENESIS),
            "2ee44b9e263b5e1496ef54267e2511073e1e6a7f0a49b14ab26001493ff42713"
        );
    }

    /// A latency in the hashed text is what `{:.3}` writes, for any value: typical ones, those
    /// next to a half-way point between two thousandths, and those the integers cannot take.
    #[test]
    fn latencies_are_hashed_as_the_formatter_writes_them() {
        let mut values = vec![
            0.0,
            -0.0,
            0.0005,
            0.0015,
            0.0625,
            1.5,
            2.0005,
            12.3456,
            999.9995,
            1e-300,
            f64::MIN_POSITIVE,
            4.0e12,
            4.0e12 + 0.5,
            1e15,
            1e300,
            -1.25,
            f64::MAX,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
        ];
        // A half-way point and its neighbours a few units in the last place away, and a
        // spread of values from microseconds to days, from a fixed sequence.
        for k in [0u64, 1, 7, 499, 12_345, 86_400_000, 3_000_000_000] {
            let half = (k as f64 + 0.5) / 1000.0;
            let mut below = half;
            let mut above = half;
            for _ in 0..4 {
                below = below.next_down();
                above = above.next_up();
                values.extend([below, above]);
            }
            values.push(half);
        }
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let exponent = (state % 40) as i32 - 20;
            values.push((state >> 11) as f64 / (1u64 << 53) as f64 * 2f64.powi(exponent));
        }
        for value in values {
            let mut text = Vec::new();
            write_thousandths(&mut text, value);
            assert_eq!(
                String::from_utf8(text).unwrap(),
                format!("{value:.3}"),
                "{value:e}"
            );
        }
    }

    /// The message ids of the newest ten records, oldest first.
    fn newest_ids(reader: &Reader) -> Vec<String> {
        let newest = Filter {
            limit: 10,
            ..Default::default()
        };
        let records = reader.query(&newest).unwrap();
        records.into_iter().map(|r| r.event.message_id).collect()
    }

    #[test]
    fn records_are_found_by_their_fields_and_the_chain_verifies() {
        let dir = dir();
        let journal = Journal::open(&dir).unwrap();
        for i in 0..10 {
            journal.record(event(&format!("m-{i}"), "delivered"));
        }
        journal.record(Event {
            correlation_id: "m-3".into(),
            ..event("m-answer", "rejected")
        });
        journal.flush();
        let reader = Reader::open(&dir).unwrap();
        let found = reader
            .query(&Filter {
                message_id: Some("m-4".into()),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].event.recipients, "cpi-modena,osservatorio-er");
        let to_observatory = reader
            .query(&Filter {
                recipient: Some("osservatorio-er".into()),
                limit: 100,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(to_observatory.len(), 11);
        let none = reader
            .query(&Filter {
                recipient: Some("osservatorio".into()),
                limit: 100,
                ..Default::default()
            })
            .unwrap();
        assert!(none.is_empty(), "a recipient matches whole names only");
        let answer = reader
            .query(&Filter {
                correlation_id: Some("m-3".into()),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(answer[0].event.message_id, "m-answer");
        assert_eq!(reader.verify().unwrap(), Ok(11));

        // The chain continues across a restart of the writer.
        drop(journal);
        let journal = Journal::open(&dir).unwrap();
        journal.record(event("m-after", "delivered"));
        journal.flush();
        assert_eq!(reader.verify().unwrap(), Ok(12));
    }

    #[test]
    fn times_are_read_in_three_forms() {
        assert_eq!(
            parse_time("2026-11-23T08:00:00Z").unwrap(),
            1_795_420_800_000
        );
        assert_eq!(parse_time("2026-11-23").unwrap(), 1_795_392_000_000);
        let two_hours_ago = parse_time("2h").unwrap();
        assert!((now_ms() - 7_200_000 - two_hours_ago).abs() < 1000);
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn an_altered_or_removed_record_is_named() {
        let dir = dir();
        let journal = Journal::open(&dir).unwrap();
        for i in 0..5 {
            journal.record(event(&format!("m-{i}"), "delivered"));
        }
        journal.flush();
        let reader = Reader::open(&dir).unwrap();
        reader
            .connection
            .execute("UPDATE event SET code = 'rejected' WHERE seq = 3", [])
            .unwrap();
        let broken = reader.verify().unwrap().unwrap_err();
        assert!(broken.starts_with("record 3 "), "{broken}");
        reader
            .connection
            .execute("UPDATE event SET code = 'delivered' WHERE seq = 3", [])
            .unwrap();
        assert_eq!(reader.verify().unwrap(), Ok(5));
        reader
            .connection
            .execute("DELETE FROM event WHERE seq = 2", [])
            .unwrap();
        let broken = reader.verify().unwrap().unwrap_err();
        assert!(broken.starts_with("record 3:"), "{broken}");
    }

    /// The records with `id` as their message id, or their correlation id.
    fn by_id(reader: &Reader, id: &str) -> (Vec<Logged>, Vec<Logged>) {
        let by_message = Filter {
            message_id: Some(id.into()),
            limit: 10,
            ..Default::default()
        };
        let by_correlation = Filter {
            correlation_id: Some(id.into()),
            limit: 10,
            ..Default::default()
        };
        (
            reader.query(&by_message).unwrap(),
            reader.query(&by_correlation).unwrap(),
        )
    }

    /// The parts of the index of ids, as (first, last) record.
    fn parts(reader: &Reader) -> Vec<(i64, i64)> {
        reader
            .connection
            .prepare("SELECT first, last FROM event_part ORDER BY first")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    #[test]
    fn ids_are_found_in_the_parts_and_in_the_open_part_without_reading_the_whole_log() {
        let dir = dir();
        let journal = Journal::open(&dir).unwrap();
        let total = PART + 20;
        for i in 0..total {
            journal.record(Event {
                correlation_id: if i % 2 == 0 {
                    format!("answers-{i}")
                } else {
                    String::new()
                },
                ..event(&format!("m-{i}"), "delivered")
            });
            if i + 1 == PART {
                journal.flush();
            }
        }
        journal.flush();
        let reader = Reader::open(&dir).unwrap();
        // The batch that filled the part closed it; the records after it are the open part.
        assert_eq!(parts(&reader), [(1, PART)]);
        for i in [0, PART / 2, PART - 1, PART, total - 1] {
            let (by_message, by_correlation) = by_id(&reader, &format!("m-{i}"));
            assert_eq!(by_message.len(), 1, "m-{i}");
            assert_eq!(by_message[0].seq, i + 1);
            assert!(by_correlation.is_empty(), "m-{i} answers nothing");
            let (_, answer) = by_id(&reader, &format!("answers-{i}"));
            assert_eq!(answer.len(), usize::from(i % 2 == 0), "answers-{i}");
        }
        assert!(by_id(&reader, "m-never").0.is_empty());

        // Each part is sought by the id's key; only the open part's records are read through.
        let (sql, values) = select(
            &Filter {
                message_id: Some("m-2".into()),
                limit: 10,
                ..Default::default()
            },
            true,
        );
        let plan: Vec<String> = reader
            .connection
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(rusqlite::params_from_iter(values), |r| r.get(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|step| step.contains("SEARCH k USING PRIMARY KEY (part=? AND key=?)")),
            "{plan:#?}"
        );
        assert!(
            plan.iter()
                .any(|step| step == "SEARCH event USING INTEGER PRIMARY KEY (rowid>?)"),
            "{plan:#?}"
        );
        assert!(
            !plan
                .iter()
                .any(|step| step == "SCAN event" || step.starts_with("SCAN event USING")),
            "{plan:#?}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The sender of the `i`th record of the sender tests: one record in a thousand from a
    /// rare sender, the rest from two by turns.
    fn sender_of(i: i64) -> &'static str {
        if i % 1000 == 7 {
            "rare"
        } else if i % 2 == 0 {
            "inps"
        } else {
            "cpi-modena"
        }
    }

    fn code_of(i: i64) -> &'static str {
        if i % 3 == 0 { "no-route" } else { "delivered" }
    }

    /// Look-ups by sender, each with the records (numbered from 1) the log read through gives:
    /// the newest `limit` that match, oldest first.
    fn by_sender_checked(reader: &Reader, total: i64) {
        let cases: [(&str, Option<&str>, Option<i64>, usize); 6] = [
            // Within the open part, in the newest part, and across both parts.
            ("rare", None, None, 1),
            ("rare", None, None, 10),
            ("rare", None, None, 80),
            ("inps", Some("no-route"), None, 5),
            // Following from the end of the first part.
            ("cpi-modena", None, Some(PART - 3), 200_000),
            ("nobody", None, None, 10),
        ];
        for (sender, code, after, limit) in cases {
            let filter = Filter {
                sender: Some(sender.into()),
                code: code.map(String::from),
                after_seq: after,
                limit,
                ..Default::default()
            };
            let mut expected: Vec<i64> = (0..total)
                .rev()
                .filter(|&i| sender_of(i) == sender && code.is_none_or(|c| code_of(i) == c))
                .map(|i| i + 1)
                .filter(|&seq| seq > after.unwrap_or(0))
                .take(limit)
                .collect();
            expected.reverse();
            let found: Vec<i64> = reader
                .query(&filter)
                .unwrap()
                .iter()
                .map(|l| l.seq)
                .collect();
            assert_eq!(found, expected, "{filter:?}");
        }
    }

    /// How many records of `sender` each part lists, oldest part first.
    fn listed(reader: &Reader, sender: &str) -> Vec<usize> {
        reader
            .connection
            .prepare(
                "SELECT p.first, (SELECT seqs FROM event_sender_part WHERE part = p.first AND sender = ?1)
                 FROM event_part p ORDER BY first",
            )
            .unwrap()
            .query_map([sender], |r| {
                let seqs: Option<Vec<u8>> = r.get(1)?;
                Ok(part_seqs(r.get(0)?, &seqs.unwrap_or_default()).len())
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    #[test]
    fn a_sender_s_list_reads_back_its_numbers_and_a_garbled_one_does_not_panic() {
        let mut bytes = Vec::new();
        let mut before = 99;
        for seq in [100i64, 101, 300, 20_000, 3_000_000_000] {
            leb128(&mut bytes, (seq - before) as u64);
            before = seq;
        }
        assert_eq!(
            part_seqs(100, &bytes),
            [100, 101, 300, 20_000, 3_000_000_000]
        );
        // Continuation bytes past 64 bits, then a number: read as some number, not a panic.
        let garbled = [[0xff; 20].as_slice(), &[0x01]].concat();
        assert_eq!(part_seqs(1, &garbled).len(), 1);
    }

    fn has_index_by_sender(reader: &Reader) -> bool {
        reader
            .connection
            .prepare("SELECT 1 FROM sqlite_master WHERE name = 'event_sender'")
            .unwrap()
            .exists([])
            .unwrap()
    }

    #[test]
    fn a_sender_s_records_are_found_through_its_lists_in_the_parts() {
        let dir = dir();
        let journal = Journal::open(&dir).unwrap();
        let total = 2 * PART + 30;
        for i in 0..total {
            journal.record(Event {
                sender: sender_of(i).into(),
                code: code_of(i).into(),
                ..event(&format!("m-{i}"), "delivered")
            });
            if (i + 1) % PART == 0 {
                journal.flush();
            }
        }
        journal.flush();
        let reader = Reader::open(&dir).unwrap();
        assert_eq!(parts(&reader), [(1, PART), (PART + 1, 2 * PART)]);
        // Each part keys every record of its senders; no index by sender grows per record.
        assert_eq!(listed(&reader, "rare"), [50, 50]);
        assert_eq!(listed(&reader, "inps"), [PART as usize / 2; 2]);
        assert!(!has_index_by_sender(&reader));
        by_sender_checked(&reader, total);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_log_indexed_by_sender_lists_its_senders_in_its_parts_in_the_background() {
        let dir = dir();
        let total = 2 * PART + 30;
        // The layout before: parts of ids only, and an index by sender.
        {
            let mut old = Connection::open(dir.join("log.db")).unwrap();
            let tx = old.transaction().unwrap();
            tx.execute_batch(&format!(
                "{}
                 CREATE TABLE event_part (first INTEGER PRIMARY KEY, last INTEGER NOT NULL);
                 CREATE TABLE event_key (part INTEGER NOT NULL, key INTEGER NOT NULL,
                     seq INTEGER NOT NULL, PRIMARY KEY (part, key, seq)) WITHOUT ROWID;
                 CREATE INDEX event_sender ON event (sender, seq);",
                &SCHEMA[..SCHEMA.find("-- Message and correlation ids").unwrap()]
            ))
            .unwrap();
            let mut insert = tx
                .prepare(
                    "INSERT INTO event VALUES (?1, ?2, 'delivered', ?3, '', ?4, 'cpi-modena',
                     'referral', ?5, 1.5, '', '', '')",
                )
                .unwrap();
            let mut keys = tx
                .prepare("INSERT INTO event_key VALUES (?1, ?2, ?3)")
                .unwrap();
            for i in 0..total {
                let (seq, id) = (i + 1, format!("old-{i}"));
                insert
                    .execute(params![seq, now_ms(), id, sender_of(i), code_of(i)])
                    .unwrap();
                if seq <= 2 * PART {
                    keys.execute(params![(seq - 1) / PART * PART + 1, key(&id), seq])
                        .unwrap();
                }
            }
            drop((insert, keys));
            tx.execute_batch(&format!(
                "INSERT INTO event_part VALUES (1, {PART}), ({}, {});",
                PART + 1,
                2 * PART
            ))
            .unwrap();
            tx.commit().unwrap();
        }
        // `ponte log` of this release, run before its gateway has brought the log up to date,
        // goes through the index by sender.
        let before = Reader::open(&dir).unwrap();
        by_sender_checked(&before, total);
        // Brought up to date as the writer opens it, before the writer lists a part: the index
        // by sender is gone, and a sender's records are found by reading the parts through.
        let path = dir.join("log.db");
        migrate(&mut open_connection(&path).unwrap(), &path).unwrap();
        let reader = Reader::open(&dir).unwrap();
        assert!(!has_index_by_sender(&reader), "the index by sender is gone");
        assert_eq!(listed(&reader, "rare"), [0, 0]);
        by_sender_checked(&reader, total);
        // The writer lists the parts in the background.
        let journal = Journal::open(&dir).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while listed(&reader, "rare") != [50, 50] {
            assert!(
                std::time::Instant::now() < deadline,
                "the parts are listed in time"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        by_sender_checked(&reader, total);
        // Ids are found as before, and the records written since alongside.
        assert_eq!(by_id(&reader, "old-7").0[0].seq, 8);
        journal.record(event("new", "delivered"));
        journal.flush();
        assert_eq!(by_id(&reader, "new").0[0].seq, total + 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn page_size(connection: &Connection) -> u32 {
        connection
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_new_log_is_made_of_large_pages_and_its_records_read_back() {
        let dir = dir();
        let journal = Journal::open(&dir).unwrap();
        for n in 0..2_000 {
            journal.record(event(&format!("m-{n}"), "delivered"));
        }
        journal.flush();
        let reader = Reader::open(&dir).unwrap();
        assert_eq!(page_size(&reader.connection), PAGE_SIZE);
        assert_eq!(by_id(&reader, "m-1999").0[0].seq, 2_000);
        assert_eq!(reader.verify().unwrap(), Ok(2_000));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_log_of_the_earlier_layout_is_indexed_in_parts_when_opened() {
        let dir = dir();
        // The layout before parts: the ids indexed under their day.
        {
            let mut old = Connection::open(dir.join("log.db")).unwrap();
            let tx = old.transaction().unwrap();
            tx.execute_batch(&format!(
                "{}
                 CREATE INDEX event_message_by_day ON event (at_ms / 86400000, message_id);
                 CREATE INDEX event_correlation_by_day ON event (at_ms / 86400000, correlation_id);",
                &SCHEMA[..SCHEMA.find("-- Message and correlation ids").unwrap()]
            ))
            .unwrap();
            let mut insert = tx
                .prepare(
                    "INSERT INTO event VALUES (?1, ?2, 'delivered', ?3, ?4, 'inps', 'cpi-modena',
                     'referral', 'delivered', 1.5, '', '', '')",
                )
                .unwrap();
            for seq in 1..=2 * PART + 7 {
                let correlation = if seq == 3 { "answered" } else { "" };
                insert
                    .execute(params![seq, now_ms(), format!("old-{seq}"), correlation])
                    .unwrap();
            }
            drop(insert);
            tx.commit().unwrap();
        }
        // `ponte log` of this release, run before its gateway has brought the log up to date,
        // reads it through.
        let before = Reader::open(&dir).unwrap();
        assert_eq!(by_id(&before, "old-17").0[0].seq, 17);
        assert_eq!(by_id(&before, "answered").1[0].seq, 3);
        let journal = Journal::open(&dir).unwrap();
        let reader = Reader::open(&dir).unwrap();
        assert_eq!(parts(&reader), [(1, PART), (PART + 1, 2 * PART)]);
        let old = reader
            .connection
            .prepare("SELECT 1 FROM sqlite_master WHERE name LIKE 'event_%_by_day'")
            .unwrap()
            .exists([])
            .unwrap();
        assert!(!old, "the indexes by day are gone");
        assert_eq!(
            page_size(&reader.connection),
            4096,
            "an older log keeps its pages"
        );
        for seq in [1, PART, PART + 1, 2 * PART, 2 * PART + 7] {
            let (found, _) = by_id(&reader, &format!("old-{seq}"));
            assert_eq!(found.len(), 1, "old-{seq}");
            assert_eq!(found[0].seq, seq);
        }
        assert_eq!(by_id(&reader, "answered").1[0].seq, 3);
        // Records written after the upgrade are found alongside.
        journal.record(event("new", "delivered"));
        journal.flush();
        assert_eq!(by_id(&reader, "new").0[0].seq, 2 * PART + 8);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn records_wait_out_a_log_locked_longer_than_the_busy_timeout() {
        let dir = dir();
        let journal = Journal::open(&dir).unwrap();
        journal.record(event("m-before", "delivered"));
        journal.flush();
        // Another process holds the log's write lock past the writer's 5 s busy timeout.
        let holder = Connection::open(dir.join("log.db")).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        for i in 0..3 {
            journal.record(event(&format!("m-locked-{i}"), "delivered"));
        }
        std::thread::sleep(Duration::from_secs(6));
        holder.execute_batch("COMMIT").unwrap();
        journal.record(event("m-after", "delivered"));
        journal.flush();

        let reader = Reader::open(&dir).unwrap();
        assert_eq!(
            newest_ids(&reader),
            [
                "m-before",
                "m-locked-0",
                "m-locked-1",
                "m-locked-2",
                "m-after"
            ]
        );
        assert_eq!(reader.verify().unwrap(), Ok(5));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_log_that_cannot_keep_up_holds_back_only_the_task_that_records() {
        let dir = dir();
        let journal = std::sync::Arc::new(Journal::open(&dir).unwrap());
        // Another process holds the log's write lock: the writer's batch waits, and the records
        // behind it fill the queue.
        let holder = Connection::open(dir.join("log.db")).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let runtime = crate::one_worker::runtime();
        let records = BATCH_MAX + QUEUE + 100;
        let recording = runtime.spawn({
            let journal = journal.clone();
            async move {
                for i in 0..records {
                    journal.record(event(&format!("m-{i}"), "delivered"));
                }
            }
        });
        std::thread::sleep(Duration::from_secs(1));
        assert!(!recording.is_finished(), "the log's queue never filled");
        assert!(
            crate::one_worker::another_task_runs(&runtime),
            "a task that records nothing waited for the log's writer"
        );
        assert!(!recording.is_finished());
        // Once the lock goes, every record is written.
        holder.execute_batch("COMMIT").unwrap();
        runtime.block_on(recording).unwrap();
        journal.flush();
        let reader = Reader::open(&dir).unwrap();
        assert_eq!(reader.verify().unwrap(), Ok(records as u64));
        drop(runtime);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn pruning_removes_the_old_records_in_chain_order_and_the_chain_still_verifies() {
        let dir = dir();
        let journal = Journal::open(&dir).unwrap();
        let day = 24 * 3600 * 1000;
        let at = |days_ago: i64, id: String| Event {
            at_ms: now_ms() - days_ago * day,
            ..event(&id, "delivered")
        };
        // More old records than one step removes, then one written while the clock was set a
        // year back, between two recent ones, then more old-looking ones after it.
        for i in 0..2500 {
            journal.record(at(500, format!("old-{i}")));
        }
        journal.record(at(1, "recent-1".into()));
        journal.record(at(500, "clock-set-back".into()));
        journal.record(at(1, "recent-2".into()));
        journal.flush();
        let reader = Reader::open(&dir).unwrap();
        assert_eq!(reader.verify().unwrap(), Ok(2503));

        assert_eq!(
            reader.prune(Duration::from_secs(400 * 24 * 3600)).unwrap(),
            2500
        );
        assert_eq!(
            newest_ids(&reader),
            ["recent-1", "clock-set-back", "recent-2"]
        );
        assert_eq!(reader.verify().unwrap(), Ok(3));
        // Nothing older than the oldest record kept: nothing more to prune.
        assert_eq!(
            reader.prune(Duration::from_secs(400 * 24 * 3600)).unwrap(),
            0
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_part_pruned_whole_takes_its_keys_with_it() {
        let dir = dir();
        let journal = Journal::open(&dir).unwrap();
        let old_at = now_ms() - 500 * 24 * 3600 * 1000;
        for i in 0..PART {
            journal.record(Event {
                at_ms: old_at,
                ..event(&format!("old-{i}"), "delivered")
            });
        }
        journal.flush();
        journal.record(event("recent", "delivered"));
        journal.flush();
        let reader = Reader::open(&dir).unwrap();
        assert_eq!(parts(&reader), [(1, PART)]);

        assert_eq!(
            reader.prune(Duration::from_secs(400 * 24 * 3600)).unwrap(),
            PART as usize
        );
        assert!(parts(&reader).is_empty());
        let keys: i64 = reader
            .connection
            .query_row(
                "SELECT (SELECT count(*) FROM event_key) + (SELECT count(*) FROM event_sender_part)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(keys, 0, "neither ids' keys nor senders' lists are left");
        assert!(by_id(&reader, "old-7").0.is_empty());
        assert_eq!(by_id(&reader, "recent").0[0].seq, PART + 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
