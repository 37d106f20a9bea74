//! Store: what the gateway remembers between messages and across restarts.
//!
//! - The **person crosswalk**: a partner's own person id (`local` scheme, say a municipality's
//!   registry number) for a shared identifier, learnt from the messages that partner sends with
//!   both, or imported with `ponte crosswalk import`.
//! - The **case crosswalk**: which references of different partners (`referral_id`,
//!   `application_id`, …) name the same case, learnt when a message answers an earlier one
//!   (`correlation_id`).
//!
//! [`Store`] is the interface; [`SqliteStore`] keeps it in one SQLite file in the data
//! folder. Several gateway instances sharing one crosswalk would implement the trait on a shared
//! database instead.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{
    Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError, sync_channel,
};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use smallvec::{SmallVec, smallvec};

use crate::recent::Recent;

/// Writes are grouped into one transaction committed this long after its first write (inbound
/// messages are acknowledged once their writes are committed), or at once when a look-up waits
/// for one of its writes...
const COMMIT_EVERY: Duration = Duration::from_millis(10);
/// ...or after this many writes, whichever comes first.
const COMMIT_AFTER: usize = 512;
/// Writes handed to the writer and not yet applied, at most; beyond that, writing waits.
const QUEUE: usize = 16_384;
/// Rows of messages recorded and not yet delivered that the writer keeps the place of, at most.
const UNDELIVERED_KEPT: usize = 65_536;
/// A new message's row waits in the writer's memory for its delivery this long at most, across
/// commits, so that it is written once, delivered, rather than written and then updated (see
/// [`Newest`])...
const HOLD_UNDELIVERED: Duration = Duration::from_millis(500);
/// ...and at most this many rows wait: past that, the oldest are written at the next commit.
const HELD_AT_MOST: usize = 16_384;
/// The keys marked by writes not yet durable are cut back no more often than every this many.
const MARKED_AT_LEAST: usize = 4096;
/// How long a read waits for a recent write it depends on to be committed before giving up.
const WAIT_AT_MOST: Duration = Duration::from_secs(10);
/// The store's write-ahead log is cut back once it holds this many pages (64 MiB).
const LOG_LIMIT_FRAMES: i64 = 16384;
/// Pruning removes at most this many message records per write, so that commits (and the
/// acknowledgements waiting for them) go on between its steps: a day's records of a large store
/// removed in one transaction held the writer for seconds.
const PRUNE_STEP: usize = 1000;
/// How often the log is copied into the database file. Each copy ends in an fsync of what it
/// wrote; a second's worth of pages made that fsync long enough (30–90 ms) for the broker's
/// own fsyncs on the same disk to wait behind it, which delays its publisher confirms. A
/// quarter of a second keeps each burst small.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// The store could not be read or written. The message at hand is handed back to its queue,
/// never acknowledged on a guess.
#[derive(Debug, thiserror::Error)]
#[error("store {path}: {message}")]
pub struct StoreError {
    pub path: String,
    pub message: String,
}

/// One message, as the crosswalk records it.
#[derive(Debug, Clone, Copy)]
pub struct MessageCase<'a> {
    pub message_id: &'a str,
    pub sender: &'a str,
    /// The sender's own reference for the case, from the property the schema marks
    /// `x-case-reference`.
    pub reference: Option<&'a str>,
    /// The `message_id` this message answers.
    pub correlation_id: Option<&'a str>,
    /// Who this message goes to.
    pub recipients: &'a [&'a str],
    /// `(scheme, value, local)`: the sender's own person id for each shared identifier the
    /// message carries alongside it.
    pub local_ids: &'a [(&'a str, &'a str, &'a str)],
}

/// When a message was delivered, and to whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Unix seconds.
    pub at: i64,
    pub recipients: Vec<String>,
    /// Every recipient got its copy; `false` while some copies are still to be delivered (one
    /// was refused by the broker and the message went back to its queue).
    pub complete: bool,
}

/// What the gateway remembers, as the pipeline uses it: the crosswalks and the messages already
/// delivered.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Records `message` (its case reference, its recipients, the sender's local ids), links its
    /// case to the case of the message it answers when it answers one sent to its sender, and
    /// returns each recipient's own reference for the case (in `recipients` order).
    fn record(&self, message: &MessageCase<'_>) -> Result<Vec<Option<String>>, StoreError>;

    /// `partner`'s own person id for the shared identifier `(scheme, value)`.
    fn local_id(
        &self,
        partner: &str,
        scheme: &str,
        value: &str,
    ) -> Result<Option<String>, StoreError>;

    /// Adds or replaces `partner`'s own person ids for shared identifiers:
    /// `(scheme, value, local)`.
    fn import_local_ids(
        &self,
        partner: &str,
        rows: &[(String, String, String)],
    ) -> Result<usize, StoreError>;

    /// Whether `sender`'s `message_id` was delivered within the last `window`.
    fn seen(
        &self,
        sender: &str,
        message_id: &str,
        window: Duration,
    ) -> Result<Option<Seen>, StoreError>;

    /// Records that `sender`'s `message_id` was delivered to `recipients` (all of them when
    /// `complete`, else some so far), replacing an earlier record. Durable at the next commit
    /// ([`Store::commits`]), which the inbound message's acknowledgement waits for.
    fn remember(
        &self,
        sender: &str,
        message_id: &str,
        recipients: &[&str],
        complete: bool,
    ) -> Result<(), StoreError>;

    /// Forgets message records older than `age` whose delivery, if any, is older than `window`
    /// (case links stay); returns how many. A delivery older than `window` no longer counts
    /// anyway: [`Store::seen`] looks within its own window.
    fn prune(&self, age: Duration, window: Duration) -> Result<usize, StoreError>;

    /// Makes every write so far durable now (at shutdown, and where nothing else commits).
    fn flush(&self) -> Result<(), StoreError>;

    /// How many writes were made so far: [`Store::commits`] reaches this number once they are
    /// durable.
    fn written(&self) -> u64;

    /// The number of writes made durable so far, updated at every commit (the store commits
    /// on its own, every few milliseconds); an error when a commit failed.
    fn commits(&self) -> tokio::sync::watch::Receiver<Committed>;

    /// Commits what was written so far without waiting for the group to be due, nor for the
    /// commit: for a flow that can take no more messages until its settled ones are saved.
    fn commit_soon(&self) {}
}

/// Writes made durable so far, or why the last commit failed.
pub type Committed = Result<u64, String>;

/// The crosswalks in one SQLite file, written behind the message path.
///
/// The message path never waits for the disk. Look-ups run on a reading connection (in WAL
/// mode a reader never waits for the writer, nor for a commit's writes or a checkpoint's
/// fsyncs); writes are handed to the store's own thread, which applies them in order on the
/// writing connection and commits them as one transaction 10 ms after the first (after 512
/// writes, or at once when a look-up needs one of them): one transaction per write would cost
/// about 90 µs per message on the benchmark machine. Flows acknowledge a run of messages only
/// once a commit covers what the run recorded ([`Store::commits`]), so a delivery is on disk
/// before its message is acknowledged; a crash of the process can forget at most the crosswalk
/// links of its last moments (later messages about those cases then arrive without the
/// recipient's reference).
///
/// A look-up must still see every write handed over before it, committed or not (the same
/// message sent again at once, an answer to a message recorded a moment ago, a case just
/// linked). Each write marks the keys it will change (a message id, a person id, a case
/// reference, a case); a look-up that reads a marked key waits until that write is committed
/// and reads again. A new message's row may wait in the writer's memory for its delivery
/// beyond its write's commit (see [`Newest`]): the one look-up that reads undelivered rows, an
/// answer's of the message it answers, has the writer write them first. Messages rarely touch what the last few milliseconds wrote, so the wait is
/// rare; `ponte_store_wait_seconds` shows it.
///
/// A duplicate check asks an in-memory filter of the ids delivered lately first (`recent`);
/// only an id that may have been delivered is looked up.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    front: Arc<Mutex<Front>>,
    shared: Arc<Shared>,
    /// Writes handed over so far: numbered under the front's lock, read by flows without it.
    written: Arc<AtomicU64>,
    writer: Option<std::thread::JoinHandle<()>>,
    waits: metrics::Histogram,
    /// Whether the writer's filter of keys with a record has read those of the store (tests
    /// wait for it).
    #[cfg(test)]
    filed_loaded: Arc<AtomicBool>,
}

/// What the message path holds: the reading connection, the keys that writes not yet committed
/// will change, and the way to the writer. Writes are numbered and handed over under this lock,
/// so the writer applies them in the order of their numbers.
#[derive(Debug)]
struct Front {
    reader: Connection,
    /// Hash of a key → the number of the last write that changes it. The hashes are
    /// [`KEY_HASHER`]'s, which a sender cannot predict: foldhash too.
    marked: HashMap<u64, u64, foldhash::fast::RandomState>,
    /// `marked` is cut back to the keys of writes not yet durable once it holds this many:
    /// twice what was left the last time, at least [`MARKED_AT_LEAST`] (rows held for their
    /// delivery keep their keys marked a while: see [`Newest`]).
    marked_limit: usize,
    /// The ids delivered lately: most duplicate checks end here.
    recent: Recent,
    /// The references that may belong to a case: most look-ups of a reference's case end here.
    linked: Filter,
    /// The newest records' keys, not yet in `message_index`.
    fresh: Fresh,
    written: Arc<AtomicU64>,
    writer: SyncSender<Op>,
}

/// A Bloom filter of what the store holds, in front of a look-up that nearly always finds
/// nothing: "certainly not there" needs no read of the store; "maybe" reads it, and the store
/// has the final word.
///
/// Entries are added as they are handed over or written (before the writer can commit them);
/// those in the store at start are read by a thread of its own, and until they are in, every
/// answer is "maybe". Nothing is removed: past the entries the filter was sized for, more
/// answers are "maybe", never a wrong "no".
#[derive(Debug)]
struct Filter {
    filter: Arc<fastbloom::AtomicBloomFilter>,
    loaded: Arc<AtomicBool>,
}

impl Filter {
    /// An empty filter of `bits`, and a thread named `thread` filling it with `read` from the
    /// store at `path`; `what` names the entries in the log.
    fn load(
        path: &Path,
        bits: usize,
        thread: &str,
        what: &'static str,
        read: impl FnOnce(&Path, &fastbloom::AtomicBloomFilter) -> rusqlite::Result<usize>
        + Send
        + 'static,
    ) -> Filter {
        let filter = Filter {
            filter: Arc::new(fastbloom::AtomicBloomFilter::with_num_bits(bits).hashes(5)),
            loaded: Arc::new(AtomicBool::new(false)),
        };
        crate::recent::fill_in_background(
            thread,
            what,
            path,
            filter.filter.clone(),
            filter.loaded.clone(),
            read,
        );
        filter
    }

    fn add(&self, entry: &impl Hash) {
        self.filter.insert(entry);
    }

    /// Whether the store may hold `entry`: `false` is certain.
    fn may_hold(&self, entry: &impl Hash) -> bool {
        !self.loaded.load(Ordering::Acquire) || self.filter.contains(entry)
    }
}

/// Which `(partner, reference)` pairs may belong to a case. Nearly every message carries a
/// reference no answer ever linked, and asking the store for its case, even to find none, begins
/// a read of the store: some 2 µs a message. A pair is added when a write that may link it is
/// handed over. 1 MiB: about 1 "maybe" in 1,000 for pairs never linked with half a million
/// linked.
const LINKED_BITS: usize = 1 << 23;
/// Pairs read at a time at start.
const LINKED_LOAD_STEP: i64 = 50_000;

fn linked(path: &Path) -> Filter {
    Filter::load(
        path,
        LINKED_BITS,
        "ponte-linked",
        "linked case references",
        read_linked,
    )
}

/// Which message keys have a record, for the writer. Nearly every message recorded is new, and
/// finding that it has no record yet was a look-up in `message_index`, whose keys are random:
/// some 2 µs of the writer's time a message with an index in the cache, a read of the disk once
/// it outgrows it. A key is added as its record is inserted. 4 MiB: about 1 "maybe" in 15,000
/// for new ids with a million records, 1 in 170 with three million.
const FILED_BITS: usize = 1 << 25;
/// Records read at a time at start.
const FILED_LOAD_STEP: i64 = 50_000;

fn filed(path: &Path) -> Filter {
    Filter::load(
        path,
        FILED_BITS,
        "ponte-filed",
        "message records' keys",
        read_filed,
    )
}

/// Reads every key of `message_index` into `into`, [`FILED_LOAD_STEP`] at a time, each step a
/// short read of its own. At open, every record's key is in that index (the keys of the last
/// records before a stop are indexed first: `index_the_rest`), which is some 20 bytes a record
/// against the table's hundreds; a record inserted after the first step had its key added by
/// the writer.
fn read_filed(path: &Path, into: &fastbloom::AtomicBloomFilter) -> rusqlite::Result<usize> {
    let connection = Connection::open(path)?;
    // Each page is read once, in order: a cache would only hold the memory.
    connection.execute_batch("PRAGMA busy_timeout = 5000; PRAGMA cache_size = 16;")?;
    let mut step = connection.prepare(
        "SELECT key, seq FROM message_index WHERE (key, seq) > (?1, ?2)
         ORDER BY key, seq LIMIT ?3",
    )?;
    let (mut after, mut count) = ((i64::MIN, i64::MIN), 0);
    loop {
        let mut rows = step.query(params![after.0, after.1, FILED_LOAD_STEP])?;
        let mut read = 0;
        while let Some(row) = rows.next()? {
            after = (row.get(0)?, row.get(1)?);
            into.insert(&after.0);
            read += 1;
        }
        count += read;
        if read < FILED_LOAD_STEP {
            return Ok(count as usize);
        }
    }
}

/// Reads every linked pair into `into`, [`LINKED_LOAD_STEP`] at a time, each step a short read
/// of its own (one read over millions of rows would hold the store's checkpoints back). A pair
/// linked meanwhile was added when its write was handed over.
fn read_linked(path: &Path, into: &fastbloom::AtomicBloomFilter) -> rusqlite::Result<usize> {
    let connection = Connection::open(path)?;
    connection.execute_batch("PRAGMA busy_timeout = 5000;")?;
    let mut step = connection.prepare(
        "SELECT partner, reference FROM case_link WHERE (partner, reference) > (?1, ?2)
         ORDER BY partner, reference LIMIT ?3",
    )?;
    let (mut after, mut count) = ((String::new(), String::new()), 0);
    loop {
        let pairs: Vec<(String, String)> = step
            .query_map(params![after.0, after.1, LINKED_LOAD_STEP], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        for (partner, reference) in &pairs {
            into.insert(&(partner.as_str(), reference.as_str()));
        }
        count += pairs.len();
        if pairs.len() < LINKED_LOAD_STEP as usize {
            return Ok(count);
        }
        after = pairs.into_iter().last().unwrap_or_default();
    }
}

/// The keys of the newest records (`(key, seq)`), held in memory until they are written to
/// `message_index`.
///
/// A random message id's key lands anywhere in an index ordered by key. Indexed with each
/// record, every commit wrote (and every checkpoint copied) about one page of the index per new
/// message, and once the index outgrew the page cache, read that page back first: with a year's
/// history, some 15 µs per message. Held here, the keys are written a slice of the key space
/// per commit ([`Sweep`]), so that the keys of one slice share the index's pages. Look-ups read
/// both the index and these.
///
/// Only the keys wait: each record is in the table, committed with its write. A store closed
/// (or stopped by a crash) with keys still here indexes them at its next open, from the records
/// after `message_indexed.upto`.
type Fresh = Arc<Mutex<BTreeSet<(i64, i64)>>>;

/// New records after which the sweep has been over the whole key space once, about: how many
/// keys wait in memory (16 bytes each, and the set's own).
const FRESH_KEYS: u64 = 1 << 16;

fn lock_fresh(fresh: &Fresh) -> MutexGuard<'_, BTreeSet<(i64, i64)>> {
    // A set of keys is never left half-changed.
    fresh.lock().unwrap_or_else(|p| p.into_inner())
}

/// The writer's side of [`Fresh`]: adds the keys of new records, and writes them to
/// `message_index` a slice of the key space per commit, each slice as wide as the keys added
/// since the last one take on average. Keys spread evenly (random ids) so go out about as fast
/// as they come, each some [`FRESH_KEYS`] records after its record; keys made from the time
/// (v7 ids) gather in one narrow slice and go out together once per sweep, at the index's end.
struct Sweep {
    fresh: Fresh,
    /// New records per sweep over the whole key space: [`FRESH_KEYS`].
    per_sweep: u64,
    /// Where the next slice begins, in the key space made unsigned (`key ^ i64::MIN`).
    at: u64,
    /// Keys added since the last slice was written.
    added: u64,
    /// Every key that has a record, or may have.
    filed: Filter,
    /// Keys taken out of `fresh` by the open group (their records pruned, or appended anew):
    /// put back should it roll back, since its records are then where they were.
    taken: Vec<(i64, i64)>,
}

/// A slice of the key space made unsigned: from its start, to its end (excluded) or, `None`,
/// to the end of the space.
#[derive(Clone, Copy)]
struct Slice(u64, Option<u64>);

/// The key at `place` in the key space made unsigned.
fn key_at(place: u64) -> i64 {
    (place ^ (1 << 63)) as i64
}

impl Sweep {
    fn add(&mut self, key: i64, seq: i64) {
        self.filed.add(&key);
        lock_fresh(&self.fresh).insert((key, seq));
        self.added += 1;
    }

    /// The key of the record `seq`, which the open group removes: out of memory now, so that
    /// no slice writes it to `message_index` after its record is gone (the group removes it
    /// from there, if it is there).
    fn forget(&mut self, key: i64, seq: i64) {
        if lock_fresh(&self.fresh).remove(&(key, seq)) {
            self.taken.push((key, seq));
        }
    }

    /// The open group rolled back: the keys it took are put back with their records.
    fn rolled_back(&mut self) {
        lock_fresh(&self.fresh).extend(self.taken.drain(..));
    }

    /// The row of `sender`'s `message_id` (`key` its key), and whom it was meant for; looked up
    /// only when the filter of keys with a record cannot rule it out.
    fn find(
        &self,
        tx: &Connection,
        key: i64,
        message_id: &str,
        sender: &str,
    ) -> rusqlite::Result<Option<(i64, String)>> {
        if !self.filed.may_hold(&key) {
            return Ok(None);
        }
        first_by_key(
            tx,
            &self.fresh,
            key,
            "SELECT seq, recipients FROM message WHERE seq = ?1 AND message_id = ?2 AND sender = ?3",
            &[&message_id, &sender],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    /// The slice the next commit writes.
    fn next(&self) -> Slice {
        let width = self.added.saturating_mul(u64::MAX / self.per_sweep);
        Slice(self.at, self.at.checked_add(width))
    }

    /// Writes the keys of `slice` to `message_index` in `tx`; at the end of the key space, also
    /// records up to which record every key is now indexed. Returns the keys written.
    fn write(&self, tx: &Connection, Slice(from, to): Slice) -> rusqlite::Result<Vec<(i64, i64)>> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let (keys, rest) = {
            let fresh = lock_fresh(&self.fresh);
            let start = Included((key_at(from), i64::MIN));
            let end = to.map_or(Unbounded, |to| Excluded((key_at(to), i64::MIN)));
            // A slice of no width (nothing added) is an empty range: its end is its start.
            let keys: Vec<(i64, i64)> = fresh.range((start, end)).copied().collect();
            // Swept to the end: every key still waiting was added after the sweep passed it.
            let rest = to.is_none().then(|| {
                fresh
                    .range(..(key_at(from), i64::MIN))
                    .map(|(_, seq)| *seq)
                    .min()
            });
            (keys, rest)
        };
        let mut insert =
            tx.prepare_cached("INSERT OR IGNORE INTO message_index (key, seq) VALUES (?1, ?2)")?;
        for (key, seq) in &keys {
            insert.execute(params![key, seq])?;
        }
        match rest {
            None => {}
            Some(Some(oldest_waiting)) => {
                tx.prepare_cached("UPDATE message_indexed SET upto = ?1")?
                    .execute([oldest_waiting - 1])?;
            }
            Some(None) => {
                tx.prepare_cached(ALL_INDEXED)?.execute([])?;
            }
        }
        Ok(keys)
    }

    /// `slice`'s `keys` are committed: they leave memory, and the next slice follows.
    fn written(&mut self, Slice(_, to): Slice, keys: &[(i64, i64)]) {
        let mut fresh = lock_fresh(&self.fresh);
        for entry in keys {
            fresh.remove(entry);
        }
        self.at = to.unwrap_or(0);
        self.added = 0;
        self.taken.clear();
    }
}

/// Reads, with `row`, the first record of `key` that `query` finds: those whose keys are in
/// `message_index` first (the older), then those whose keys are still in memory (`fresh`).
/// `query` reads the record numbered `?1`; `rest` are its parameters from `?2`. A new id, nearly every
/// message's, costs one seek in the index and none in the table.
///
/// A look-up of the message path runs beside the writer moving keys from memory to the index;
/// one that read the index before the move was committed, and memory after it, would miss the
/// key. Memory is read first: a key leaves it only once the index holds it.
fn first_by_key<T>(
    connection: &Connection,
    fresh: &Fresh,
    key: i64,
    query: &str,
    rest: &[&dyn rusqlite::ToSql],
    row: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Option<T>> {
    let waiting: Vec<i64> = lock_fresh(fresh)
        .range((key, i64::MIN)..=(key, i64::MAX))
        .map(|(_, seq)| *seq)
        .collect();
    let indexed: Vec<i64> = connection
        .prepare_cached("SELECT seq FROM message_index WHERE key = ?1")?
        .query_map([key], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut read = connection.prepare_cached(query)?;
    for seq in indexed.into_iter().chain(waiting) {
        let mut parameters: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(rest.len() + 1);
        parameters.push(&seq);
        parameters.extend_from_slice(rest);
        if let Some(found) = read.query_row(&parameters[..], &row).optional()? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// What a look-up depends on.
#[derive(Hash)]
enum Key<'a> {
    /// Every row of a message id (by its 64-bit look-up key).
    Message(i64),
    /// A partner's own person id for a shared identifier: `(partner, scheme, value)`.
    Person(&'a str, &'a str, &'a str),
    /// The case a partner's reference belongs to.
    Reference(&'a str, &'a str),
    /// The references of a case.
    Case(i64),
}

/// How keys are hashed for [`Front::marked`]: foldhash, seeded at random once per process, so
/// that a sender cannot choose message ids whose keys collide.
static KEY_HASHER: std::sync::LazyLock<foldhash::fast::RandomState> =
    std::sync::LazyLock::new(foldhash::fast::RandomState::default);

impl Key<'_> {
    fn hash(&self) -> u64 {
        KEY_HASHER.hash_one(self)
    }
}

/// Why a look-up stopped: the database failed, it read a key a write not yet committed
/// changes (the number of that write), it read a message's row the writer still holds
/// (recorded by that write), or the writer could not take a write.
enum Stop {
    Sql(rusqlite::Error),
    Until(u64),
    Held,
    Writer(String),
}

impl From<rusqlite::Error> for Stop {
    fn from(error: rusqlite::Error) -> Stop {
        Stop::Sql(error)
    }
}

impl Front {
    /// Whether `key` reads as the writes committed so far (`durable`) leave it. A message's
    /// rows read that way when delivered: an undelivered row may still wait in the writer's
    /// memory (see [`Newest`]; [`Front::recorded`] reads those too).
    fn settled(&self, key: &Key<'_>, durable: Durable) -> Result<(), Stop> {
        match self.marked.get(&key.hash()) {
            Some(&write) if write > durable.writes => Err(Stop::Until(write)),
            _ => Ok(()),
        }
    }

    /// Whether the rows of message `key`, delivered or not, are all in the table.
    fn recorded(&self, key: i64, durable: Durable) -> Result<(), Stop> {
        match self.marked.get(&Key::Message(key).hash()) {
            Some(&write) if write > durable.rows => Err(Stop::Held),
            _ => Ok(()),
        }
    }

    /// Hands `write` to the writer, marking `keys` as changed by it; returns its number.
    fn hand_over(&mut self, write: Write, keys: &[u64], durable: Durable) -> Result<u64, Stop> {
        // Never blocks the message path: a writer that far behind is a store that fails.
        self.writer.try_send(Op::Write(write)).map_err(|e| {
            Stop::Writer(match e {
                TrySendError::Full(_) => format!("the store's writer is {QUEUE} writes behind"),
                TrySendError::Disconnected(_) => writer_gone(),
            })
        })?;
        let number = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        if self.marked.len() >= self.marked_limit {
            self.marked.retain(|_, write| *write > durable.rows);
            self.marked_limit = (self.marked.len() * 2).max(MARKED_AT_LEAST);
        }
        for key in keys {
            self.marked.insert(*key, number);
        }
        Ok(number)
    }
}

fn writer_gone() -> String {
    "the store's writer has stopped".into()
}

/// What the store's thread shares: the writes made durable so far, for the message path (which
/// waits on it) and for flows (which watch it to acknowledge).
#[derive(Debug)]
struct Shared {
    /// The store is being dropped: the writer stops trying again a write that fails.
    stopping: AtomicBool,
    /// A look-up waits for a write of the open group: the writer commits it now rather than
    /// when due.
    hurry: AtomicBool,
    /// How far the writes are committed.
    committed: Mutex<Durable>,
    changed: Condvar,
    watch: tokio::sync::watch::Sender<Committed>,
}

/// How far the writes are committed: every write up to `writes`, and of those, every message
/// row recorded up to `rows` (the rows of later ones may still wait in the writer's memory for
/// their delivery: see [`Newest`]).
#[derive(Debug, Clone, Copy, Default)]
struct Durable {
    writes: u64,
    rows: u64,
}

impl Shared {
    fn committed(&self) -> Durable {
        *self.committed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn advance(&self, to: Durable) {
        *self.committed.lock().unwrap_or_else(|p| p.into_inner()) = to;
        self.changed.notify_all();
        let _ = self.watch.send_replace(Ok(to.writes));
    }

    fn fail(&self, error: String) {
        let _ = self.watch.send_replace(Err(error));
    }

    /// Waits until write `number` is committed.
    fn wait_for(&self, number: u64) -> Result<(), String> {
        let committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        let (committed, timeout) = self
            .changed
            .wait_timeout_while(committed, WAIT_AT_MOST, |committed| {
                committed.writes < number
            })
            .unwrap_or_else(|p| p.into_inner());
        if timeout.timed_out() && committed.writes < number {
            return Err(format!(
                "a recent write was not committed within {} s",
                WAIT_AT_MOST.as_secs()
            ));
        }
        Ok(())
    }
}

/// What the store's thread is asked to do.
enum Op {
    Write(Write),
    /// Commit now, and say whether that worked.
    Flush(SyncSender<Result<(), String>>),
    /// Commit, then start the log over (it has grown past its bound).
    CutLog(i64),
    Stop,
}

/// One write, applied in the open group transaction (written again if the group fails).
enum Write {
    Record(Recorded),
    Remember {
        /// The sender, the message id and the recipients delivered to.
        fields: Packed<3>,
        /// The id's [`message_key`], made once on the message path.
        key: i64,
        complete: bool,
        at: i64,
    },
    Import {
        partner: String,
        rows: Vec<(String, String, String)>,
        /// Told how many rows, once applied.
        done: SyncSender<usize>,
    },
    /// One step of pruning: at most [`PRUNE_STEP`] records read, from the one after `after`.
    Prune {
        age: i64,
        window: i64,
        after: i64,
        /// Told how many rows went, and where the next step begins (none: pruning is done).
        done: SyncSender<(usize, Option<i64>)>,
    },
}

/// One field of [`Packed`]: a text, or names listed comma-separated (as the table lists
/// recipients).
enum Part<'a> {
    Text(&'a str),
    Names(&'a [&'a str]),
}

impl Part<'_> {
    fn len(&self) -> usize {
        match self {
            Part::Text(text) => text.len(),
            Part::Names(names) => names.iter().map(|n| n.len() + 1).sum(),
        }
    }
}

/// A write's strings in one buffer. A write is built on a runtime worker for every message
/// and freed on the store's thread, where each block freed from another thread costs more than
/// one allocated: one block for all its fields rather than one each.
struct Packed<const N: usize> {
    text: String,
    /// Where each field ends in `text`.
    ends: [usize; N],
}

impl<const N: usize> Packed<N> {
    fn new(parts: [Part<'_>; N]) -> Self {
        let mut text = String::with_capacity(parts.iter().map(Part::len).sum());
        let mut ends = [0; N];
        for (part, end) in parts.iter().zip(&mut ends) {
            match part {
                Part::Text(t) => text.push_str(t),
                Part::Names(names) => crate::push_joined(&mut text, names.iter().copied()),
            }
            *end = text.len();
        }
        Packed { text, ends }
    }

    /// Field `i`.
    fn get(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.text[start..self.ends[i]]
    }
}

/// A [`MessageCase`] handed to the writer.
struct Recorded {
    /// The message id, the sender, the recipients, then the reference and the id answered
    /// (empty when there is none).
    fields: Packed<5>,
    has_reference: bool,
    has_correlation_id: bool,
    /// The id's [`message_key`], made once on the message path.
    key: i64,
    local_ids: Vec<(String, String, String)>,
    at: i64,
}

impl Recorded {
    fn of(m: &MessageCase<'_>, key: i64) -> Recorded {
        Recorded {
            fields: Packed::new([
                Part::Text(m.message_id),
                Part::Text(m.sender),
                Part::Names(m.recipients),
                Part::Text(m.reference.unwrap_or_default()),
                Part::Text(m.correlation_id.unwrap_or_default()),
            ]),
            has_reference: m.reference.is_some(),
            has_correlation_id: m.correlation_id.is_some(),
            key,
            local_ids: m
                .local_ids
                .iter()
                .map(|(s, v, l)| (s.to_string(), v.to_string(), l.to_string()))
                .collect(),
            at: crate::unix_secs(),
        }
    }

    fn message_id(&self) -> &str {
        self.fields.get(0)
    }

    fn sender(&self) -> &str {
        self.fields.get(1)
    }

    /// Comma-separated.
    fn recipients(&self) -> &str {
        self.fields.get(2)
    }

    fn reference(&self) -> Option<&str> {
        self.has_reference.then(|| self.fields.get(3))
    }

    fn correlation_id(&self) -> Option<&str> {
        self.has_correlation_id.then(|| self.fields.get(4))
    }
}

/// Adds or replaces one of a partner's own person ids.
const UPSERT_PERSON: &str = "INSERT INTO person (partner, scheme, value, local, updated_at)
     VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT (partner, scheme, value) DO UPDATE SET local = excluded.local, updated_at = excluded.updated_at";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS person (
    partner TEXT NOT NULL,
    scheme TEXT NOT NULL,
    value TEXT NOT NULL,
    local TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (partner, scheme, value)
) WITHOUT ROWID;
-- One row per message a sender sent: its case reference and recipients (for the case
-- crosswalk), and once delivered, to whom (for duplicate detection). Appended in the order of
-- `recorded_at` (cheap; a message processed again is appended anew, so that pruning finds the
-- oldest at the start), found by a 64-bit key made from the message id (`message_key`; the
-- text is compared too) in `message_index`, or among the newest records' keys held in memory.
CREATE TABLE IF NOT EXISTS message (
    seq INTEGER PRIMARY KEY,
    key INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    reference TEXT,
    recipients TEXT NOT NULL,
    recorded_at INTEGER NOT NULL,
    delivered TEXT,
    complete INTEGER NOT NULL DEFAULT 0,
    delivered_at INTEGER
);
-- The records' keys, written in sorted runs (see `Fresh`) rather than each in a random place.
CREATE TABLE IF NOT EXISTS message_index (
    key INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (key, seq)
) WITHOUT ROWID;
-- Every record up to `upto` has its key in `message_index`; the keys of later ones may still
-- be only in memory, and are indexed when the store is opened.
CREATE TABLE IF NOT EXISTS message_indexed (upto INTEGER NOT NULL);
-- A case is a set of references, one or more per partner; created when an answer links two.
CREATE TABLE IF NOT EXISTS case_link (
    partner TEXT NOT NULL,
    reference TEXT NOT NULL,
    case_id INTEGER NOT NULL,
    PRIMARY KEY (partner, reference)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS case_link_case ON case_link (case_id, partner, reference);
";

/// The layout [`SCHEMA`] creates.
const VERSION: i64 = 6;

/// From version 2, which kept the messages sent and those delivered in two tables (two random
/// index inserts per message instead of one).
const FROM_VERSION_2: &str = "
INSERT INTO message (key, message_id, sender, reference, recipients, recorded_at)
    SELECT key, message_id, sender, reference, recipients, max(recorded_at)
    FROM sent_message GROUP BY key, message_id, sender;
UPDATE message SET delivered = d.recipients, complete = d.complete, delivered_at = d.delivered_at
    FROM delivery d
    WHERE d.key = message.key AND d.message_id = message.message_id AND d.sender = message.sender;
INSERT INTO message (key, message_id, sender, recipients, recorded_at, delivered, complete, delivered_at)
    SELECT key, message_id, sender, recipients, delivered_at, recipients, complete, delivered_at
    FROM delivery d
    WHERE NOT EXISTS (SELECT 1 FROM message m
                      WHERE m.key = d.key AND m.message_id = d.message_id AND m.sender = d.sender);
DROP TABLE sent_message;
DROP TABLE delivery;
";

/// Creates the tables, or brings an older layout up to [`VERSION`], in one transaction. A
/// later layout is refused: this release would look its records up under keys they do not
/// have.
fn migrate(connection: &mut Connection) -> Result<(), String> {
    let version: i64 = connection
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if version > VERSION {
        return Err(format!(
            "written by a later release of Ponte (layout {version}, this release reads up to {VERSION}): run that release, or restore a backup of the data folder from before it"
        ));
    }
    upgrade(connection, version).map_err(|e| e.to_string())
}

fn upgrade(connection: &mut Connection, version: i64) -> rusqlite::Result<()> {
    let tx = connection.transaction()?;
    tx.execute_batch(SCHEMA)?;
    if version == 2 {
        tx.execute_batch(FROM_VERSION_2)?;
    }
    if (2..4).contains(&version) {
        rekey(&tx)?;
    }
    if (2..6).contains(&version) {
        in_order_of_time(&tx)?;
    }
    if version < 6 {
        index_apart(&tx)?;
    }
    tx.execute_batch(&format!("PRAGMA user_version = {VERSION}"))?;
    tx.commit()
}

/// From version 5 and before, whose message records were also indexed by time
/// (`message_recorded`), for pruning: every new record's entry cost about as much as the row
/// itself. A record processed again had its time changed in place, so the table was not in the
/// order of time. It is written anew in that order, once (the records are numbered anew, and
/// their keys indexed again by [`index_apart`]); pruning then reads it from the start.
fn in_order_of_time(tx: &Connection) -> rusqlite::Result<()> {
    let started = Instant::now();
    tx.execute_batch(
        "DROP INDEX IF EXISTS message_recorded;
         ALTER TABLE message RENAME TO message_before;",
    )?;
    tx.execute_batch(SCHEMA)?;
    let records = tx.execute(
        "INSERT INTO message (key, message_id, sender, reference, recipients, recorded_at,
                              delivered, complete, delivered_at)
         SELECT key, message_id, sender, reference, recipients, recorded_at,
                delivered, complete, delivered_at
         FROM message_before ORDER BY recorded_at, seq",
        [],
    )?;
    tx.execute_batch("DROP TABLE message_before")?;
    if records > 0 {
        let took_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            records,
            took_ms,
            "message records put in the order of their time, once"
        );
    }
    Ok(())
}

/// From version 5 and before: version 4 and earlier indexed the keys on the message table
/// itself (`message_key`), where each new record's entry went to a random page of that index;
/// version 5's records are numbered anew ([`in_order_of_time`]). The keys are indexed in
/// `message_index`, once, and the old index is dropped.
fn index_apart(tx: &Connection) -> rusqlite::Result<()> {
    let started = Instant::now();
    tx.execute_batch(
        "DELETE FROM message_index; DROP INDEX IF EXISTS message_key;
         DELETE FROM message_indexed; INSERT INTO message_indexed (upto) VALUES (0);",
    )?;
    let records = index_after(tx, 0)?;
    if records > 0 {
        let took_ms = started.elapsed().as_millis() as u64;
        tracing::info!(records, took_ms, "message records' keys indexed, once");
    }
    Ok(())
}

/// Indexes the keys of the records after the last one known to be indexed (those whose keys
/// were only in memory when the store was last closed), at open.
fn index_the_rest(connection: &mut Connection) -> rusqlite::Result<()> {
    let tx = connection.transaction()?;
    let upto: i64 = tx.query_row("SELECT upto FROM message_indexed", [], |r| r.get(0))?;
    index_after(&tx, upto)?;
    tx.commit()
}

/// Marks every record as having its key in `message_index`.
const ALL_INDEXED: &str =
    "UPDATE message_indexed SET upto = (SELECT coalesce(max(seq), 0) FROM message)";

/// Indexes the keys of the records after `upto`, sorted, and marks every record indexed;
/// returns how many keys that was.
fn index_after(tx: &Connection, upto: i64) -> rusqlite::Result<usize> {
    let records = tx.execute(
        "INSERT OR IGNORE INTO message_index (key, seq)
         SELECT key, seq FROM message WHERE seq > ?1 ORDER BY key, seq",
        [upto],
    )?;
    tx.execute(ALL_INDEXED, [])?;
    Ok(records)
}

/// From version 3 and before, whose keys were the first half of any UUID (see
/// [`message_key`]): the key of every record of an id other than a random one is computed
/// again. Records of random ids keep theirs, so that an earlier release still finds them.
fn rekey(tx: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    let started = Instant::now();
    tx.create_scalar_function(
        "ponte_message_key",
        1,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |call| Ok(message_key(call.get_raw(0).as_str().unwrap_or_default())),
    )?;
    let changed = tx.execute(
        "UPDATE message SET key = ponte_message_key(message_id)
         WHERE key != ponte_message_key(message_id)",
        [],
    )?;
    tx.remove_function("ponte_message_key", 1)?;
    if changed > 0 {
        let took_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            records = changed,
            took_ms,
            "message records keyed anew, once"
        );
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) `ponte.db` in `dir`. The folder is created with owner-only
    /// permissions: the file holds person identifiers.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_with(dir, LOG_LIMIT_FRAMES, FRESH_KEYS, COMMIT_EVERY)
    }

    /// Opens with the log cut back past `log_limit` frames, a sweep over the newest keys every
    /// `per_sweep` new records, and groups committed `commit_every` after their first write.
    fn open_with(
        dir: &Path,
        log_limit: i64,
        per_sweep: u64,
        commit_every: Duration,
    ) -> Result<SqliteStore, StoreError> {
        let path = dir.join("ponte.db");
        let error = |message: String| StoreError {
            path: path.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| error(format!("cannot create folder: {e}")))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        let connect = || -> rusqlite::Result<Connection> {
            let connection = Connection::open(&path)?;
            // WAL: readers never wait for the writer; NORMAL: a commit survives a crash of the
            // process (not necessarily of the machine), without an fsync per message. The log
            // is checkpointed by a thread of its own.
            connection.execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;
                 PRAGMA wal_autocheckpoint = 0; PRAGMA cache_size = -8192;",
            )?;
            // The writer uses some twenty statements: none is prepared again for want of room.
            connection.set_prepared_statement_cache_capacity(32);
            Ok(connection)
        };
        let mut writing = connect().map_err(|e| error(e.to_string()))?;
        migrate(&mut writing).map_err(error)?;
        index_the_rest(&mut writing).map_err(|e| error(e.to_string()))?;
        let fresh = Fresh::default();
        // When the log starts over, its file is cut back to the same bound.
        writing
            .execute_batch(&format!(
                "PRAGMA journal_size_limit = {}",
                log_limit.saturating_mul(4096)
            ))
            .map_err(|e| error(e.to_string()))?;
        let reader = connect().map_err(|e| error(e.to_string()))?;
        let checkpoints = connect().map_err(|e| error(e.to_string()))?;
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            hurry: AtomicBool::new(false),
            committed: Mutex::new(Durable::default()),
            changed: Condvar::new(),
            watch: tokio::sync::watch::Sender::new(Ok(0)),
        });
        let (to_writer, ops) = sync_channel(QUEUE);
        let shown = path.display().to_string();
        let filed = filed(&path);
        #[cfg(test)]
        let filed_loaded = filed.loaded.clone();
        let writer = {
            let (shared, shown) = (shared.clone(), shown.clone());
            let sweep = Sweep {
                fresh: fresh.clone(),
                per_sweep,
                at: 0,
                added: 0,
                filed,
                taken: Vec::new(),
            };
            std::thread::Builder::new()
                .name("ponte-store".into())
                .spawn(move || write_behind(writing, sweep, ops, &shared, &shown, commit_every))
                .map_err(|e| error(format!("cannot start the writer thread: {e}")))?
        };
        let written = Arc::new(AtomicU64::new(0));
        // Checkpoints (copying the log into the database file, with an fsync) run on a
        // connection of their own, beside both the writer and the message path.
        let (checkpointing, to_cut) = (shared.clone(), to_writer.clone());
        std::thread::Builder::new()
            .name("ponte-checkpoint".into())
            .spawn(move || {
                checkpoint_periodically(&checkpointing, &to_cut, checkpoints, &shown, log_limit)
            })
            .map_err(|e| error(format!("cannot start the checkpoint thread: {e}")))?;
        let linked = linked(&path);
        Ok(SqliteStore {
            path,
            front: Arc::new(Mutex::new(Front {
                reader,
                marked: HashMap::default(),
                marked_limit: MARKED_AT_LEAST,
                recent: Recent::new(crate::unix_secs()),
                linked,
                fresh,
                written: written.clone(),
                writer: to_writer,
            })),
            shared,
            written,
            writer: Some(writer),
            waits: metrics::histogram!("ponte_store_wait_seconds"),
            #[cfg(test)]
            filed_loaded,
        })
    }

    /// Starts loading the ids delivered within `window` (the gateway's duplicate window), so
    /// that duplicate checks soon need no read of the store for a new message; without it,
    /// every check reads the store.
    pub fn check_duplicates_within(&self, window: Duration) {
        self.lock_front()
            .recent
            .begin(window.as_secs() as i64, crate::unix_secs(), &self.path);
    }

    fn error(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    fn lock_front(&self) -> MutexGuard<'_, Front> {
        // Nothing under this lock leaves the front half-changed: safe to take over.
        self.front.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` with the front (reading connection, marked keys) and the number of the last
    /// committed write. When `f` reads a key a write not yet committed changes, it stops; it is
    /// run again once that write is committed. How long all that waited beyond `f`'s own work is
    /// recorded in `ponte_store_wait_seconds`: the lock (other flows' look-ups), and the rare
    /// wait for a commit.
    fn front<T>(
        &self,
        mut f: impl FnMut(&mut Front, Durable) -> Result<T, Stop>,
    ) -> Result<T, StoreError> {
        let mut waited = Duration::ZERO;
        loop {
            let durable = self.shared.committed();
            let mut front = match self.front.try_lock() {
                // Free, as it nearly always is: no wait to time (two reads of the clock for
                // each of a message's three look-ups).
                Ok(front) => front,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    let asked = Instant::now();
                    let front = self.lock_front();
                    waited += asked.elapsed();
                    front
                }
            };
            let result = f(&mut front, durable);
            drop(front);
            match result {
                Ok(value) => {
                    self.waits.record(waited);
                    return Ok(value);
                }
                Err(Stop::Sql(e)) => return Err(self.error(e)),
                Err(Stop::Writer(why)) => return Err(self.error(why)),
                Err(Stop::Until(write)) => {
                    let since = Instant::now();
                    // The write is in the open group (or about to be): commit it now.
                    self.hurry();
                    crate::wait_aside(|| self.shared.wait_for(write)).map_err(|e| self.error(e))?;
                    waited += since.elapsed();
                }
                Err(Stop::Held) => {
                    // The row waits in the writer's memory for its delivery: written now, with
                    // every row held (an answer to a message not yet confirmed, the same
                    // message again while the first is in flight: rare).
                    let since = Instant::now();
                    self.flush()?;
                    waited += since.elapsed();
                }
            }
        }
    }

    /// Has the writer commit its open group now rather than when it is due, and take what
    /// waits behind it.
    fn hurry(&self) {
        self.shared.hurry.store(true, Ordering::SeqCst);
        if let Some(writer) = &self.writer {
            writer.thread().unpark();
        }
    }

    /// Hands `write` over, marking `keys`.
    fn hand_over(&self, write: Write, keys: &[u64]) -> Result<(), StoreError> {
        let mut write = Some(write);
        self.front(|front, durable| {
            let write = write
                .take()
                .expect("a hand-over never waits, so it runs once");
            front.hand_over(write, keys, durable)?;
            Ok(())
        })
    }

    /// The writer's answer to a request, within [`WAIT_AT_MOST`].
    fn answer<T>(&self, outcome: &Receiver<T>) -> Result<T, StoreError> {
        crate::wait_aside(|| outcome.recv_timeout(WAIT_AT_MOST)).map_err(|e| match e {
            RecvTimeoutError::Timeout => self.error(format!(
                "the store's writer did not answer within {} s",
                WAIT_AT_MOST.as_secs()
            )),
            RecvTimeoutError::Disconnected => self.error(writer_gone()),
        })
    }

    #[cfg(test)]
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        f(&self.lock_front().reader).map_err(|e| self.error(e))
    }
}

/// The store's thread: applies the writes handed over, in order, in one group transaction, and
/// commits the group `commit_every` ([`COMMIT_EVERY`]) after its first write (after
/// [`COMMIT_AFTER`] writes, or at once when a look-up waits for it), until the store is dropped.
///
/// A write or a commit that fails rolls the group back; the group is then written again, and
/// again, until it is saved (see [`save`]): a write handed over is never counted as committed
/// unless it is, so no message is acknowledged on a write that was lost.
// Never inlined: `bench/run.sh --callgrind` counts the store's thread by this name.
#[inline(never)]
fn write_behind(
    connection: Connection,
    sweep: Sweep,
    ops: Receiver<Op>,
    shared: &Shared,
    path: &str,
    commit_every: Duration,
) {
    let mut writer = Writer {
        connection,
        newest: Newest::default(),
        sweep,
        group: None,
        spare: Vec::new(),
        applied: 0,
        shared,
        path,
    };
    loop {
        // Idle, the first write wakes the thread and opens a group (or the first row held
        // comes due: see `Newest`)...
        let op = match writer.newest.due() {
            None => ops.recv().unwrap_or(Op::Stop),
            Some(due) => match ops.recv_timeout(due.saturating_duration_since(Instant::now())) {
                Ok(op) => op,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = writer.commit_held(false);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => Op::Stop,
            },
        };
        if !writer.handle(op) {
            return;
        }
        // ...and what arrives while it is open is taken when it is due: one wake-up per group
        // rather than one per write (two per message).
        while let Some(since) = writer.group.as_ref().map(|open| open.since) {
            // Parked rather than asleep, so that a look-up waiting for the group wakes it.
            let due = since + commit_every;
            loop {
                let now = Instant::now();
                if now >= due || shared.hurry.swap(false, Ordering::SeqCst) {
                    break;
                }
                std::thread::park_timeout(due - now);
            }
            loop {
                let op = match ops.try_recv() {
                    Ok(op) => op,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => Op::Stop,
                };
                if !writer.handle(op) {
                    return;
                }
            }
            let _ = writer.commit();
        }
    }
}

/// The store's thread's state.
struct Writer<'a> {
    connection: Connection,
    newest: Newest,
    sweep: Sweep,
    group: Option<Group>,
    /// The last group's list of writes, emptied, for the next group (at most
    /// [`COMMIT_AFTER`]): grown anew for each group, it moved its writes to a larger block
    /// some nine times over.
    spare: Vec<Write>,
    /// Writes taken from the queue so far (committed or in the open group).
    applied: u64,
    shared: &'a Shared,
    path: &'a str,
}

impl Writer<'_> {
    /// Opens a group if none is open.
    fn open(&mut self) -> rusqlite::Result<()> {
        if self.group.is_some() {
            return Ok(());
        }
        self.group = Some(Group {
            since: Instant::now(),
            writes: std::mem::take(&mut self.spare),
        });
        self.connection.execute_batch("BEGIN IMMEDIATE")
    }

    /// Commits the open group, with the rows held that are due.
    fn commit(&mut self) -> Result<(), String> {
        self.save(Ok(()), false)
    }

    /// Commits the open group, or one of its own when rows are held, with `every` row held or
    /// only those due.
    fn commit_held(&mut self, every: bool) -> Result<(), String> {
        if self.group.is_none() && self.newest.held.is_empty() {
            return Ok(());
        }
        let begun = self.open();
        self.save(begun, every)
    }

    /// Commits the open group, whose last write came out as `outcome`: on success, tells
    /// everyone that the first `applied` writes are saved; on failure, reports it on
    /// [`Store::commits`] (flows give back the messages waiting for it), rolls the group back
    /// and writes it again after a pause, until it commits. Gives up only when the store is
    /// being dropped (the writes are then lost, and so are the acknowledgements that waited for
    /// them).
    ///
    /// The rows held are written with it, `every` one of them or those due (see [`Newest`]).
    fn save(&mut self, outcome: rusqlite::Result<()>, every: bool) -> Result<(), String> {
        let Some(open) = self.group.take() else {
            return Ok(());
        };
        let (connection, path, newest) = (&self.connection, self.path, &mut self.newest);
        let sweep = &mut self.sweep;
        let committing = Instant::now();
        let first = self.applied + 1 - open.writes.len() as u64;
        let aged = committing.checked_sub(HOLD_UNDELIVERED);
        let write_rows = |newest: &mut Newest, sweep: &mut Sweep| match every {
            true => newest.write(connection, sweep),
            false => newest.write_due(connection, sweep, aged),
        };
        // The rows due are written, then the group's commit also writes the next slice of the
        // newest records' keys.
        let outcome = outcome.and_then(|()| write_rows(newest, sweep));
        let slice = sweep.next();
        let mut indexed = Vec::new();
        let mut outcome = outcome
            .and_then(|()| sweep.write(connection, slice).map(|keys| indexed = keys))
            .and_then(|()| connection.execute_batch("COMMIT"));
        slow(path, "commit", committing, open.writes.len() as i64);
        let mut pause = Duration::from_millis(50);
        while let Err(error) = outcome {
            let _ = connection.execute_batch("ROLLBACK");
            newest.rolled_back();
            sweep.rolled_back();
            self.shared.fail(error.to_string());
            if self.shared.stopping.load(Ordering::SeqCst) {
                tracing::error!(store = %path, %error, writes = open.writes.len(), "cannot save crosswalk records; stopping without them");
                return Err(error.to_string());
            }
            tracing::error!(store = %path, %error, writes = open.writes.len(), "cannot save crosswalk records; trying again");
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(1));
            outcome = connection
                .execute_batch("BEGIN IMMEDIATE")
                .and_then(|()| {
                    (first..)
                        .zip(&open.writes)
                        .try_for_each(|w| apply(connection, newest, sweep, w, open.since))
                })
                .and_then(|()| write_rows(newest, sweep))
                .and_then(|()| sweep.write(connection, slice).map(|keys| indexed = keys))
                .and_then(|()| connection.execute_batch("COMMIT"));
        }
        sweep.written(slice, &indexed);
        newest.saved();
        self.shared.advance(Durable {
            writes: self.applied,
            rows: newest.rows_upto(self.applied),
        });
        let mut writes = open.writes;
        writes.clear();
        self.spare = writes;
        Ok(())
    }

    /// Carries out one request; `false` once asked to stop.
    fn handle(&mut self, op: Op) -> bool {
        match op {
            Op::Write(write) => {
                self.applied += 1;
                let number = self.applied;
                let done = self.open().and_then(|()| {
                    let opened = self.group.as_ref().expect("opened above").since;
                    let (newest, sweep) = (&mut self.newest, &mut self.sweep);
                    apply(&self.connection, newest, sweep, (number, &write), opened)
                });
                let open = self.group.as_mut().expect("opened above");
                open.writes.push(write);
                let full = open.writes.len() >= COMMIT_AFTER;
                if done.is_err() {
                    let _ = self.save(done, false);
                } else if full {
                    let _ = self.commit();
                }
            }
            Op::Flush(done) => {
                let _ = done.send(self.commit_held(true));
            }
            Op::CutLog(frames) => {
                // Writes wait while the last frames are copied, so that the next write starts
                // the log over: a pause of about one fsync.
                let started = Instant::now();
                let cut = self.commit().and_then(|()| {
                    checkpoint(&self.connection, "RESTART").map_err(|e| e.to_string())
                });
                let path = self.path;
                match cut {
                    Ok(_) => {
                        tracing::debug!(store = %path, frames, held_ms = started.elapsed().as_millis() as u64, "store log cut back")
                    }
                    Err(error) => {
                        tracing::warn!(store = %path, %error, "cannot checkpoint the store's log")
                    }
                }
            }
            Op::Stop => {
                let _ = self.commit_held(true);
                return false;
            }
        }
        true
    }
}

/// The open group transaction.
struct Group {
    since: Instant,
    /// Kept until committed, to be written again if the group fails.
    writes: Vec<Write>,
}

/// Runs `PRAGMA wal_checkpoint(mode)`; returns the number of frames in the log.
fn checkpoint(connection: &Connection, mode: &str) -> rusqlite::Result<i64> {
    connection.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| r.get(1))
}

/// A commit or a checkpoint that takes longer than this is logged (DEBUG), to find what holds
/// acknowledgements back.
const SLOW: Duration = Duration::from_millis(20);

fn slow(path: &str, what: &str, since: Instant, count: i64) {
    let took = since.elapsed();
    if took >= SLOW {
        let took_ms = took.as_millis() as u64;
        tracing::debug!(store = %path, step = what, took_ms, count, "slow store step");
    }
}

/// Checkpoints the log every [`CHECKPOINT_EVERY`], until the store is dropped.
///
/// A checkpoint copies the log into the database file, beside the writer; the log starts over
/// only when a write begins after *every* frame was copied, which under steady traffic never
/// happens (new commits keep arriving), so the log would grow without bound. Once it holds more
/// than `log_limit` frames, the writer is asked to cut it back ([`Op::CutLog`]): once per
/// `log_limit` frames written (several seconds apart at the benchmark's full rate; never at low
/// traffic, where the log starts over on its own). The log's file is cut back to `log_limit`
/// pages when it starts over.
fn checkpoint_periodically(
    shared: &Shared,
    writer: &SyncSender<Op>,
    connection: Connection,
    path: &str,
    log_limit: i64,
) {
    loop {
        std::thread::sleep(CHECKPOINT_EVERY);
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let copying = Instant::now();
        let copied = checkpoint(&connection, "PASSIVE");
        slow(path, "checkpoint", copying, *copied.as_ref().unwrap_or(&0));
        match copied {
            Ok(frames) if frames > log_limit => {
                if writer.send(Op::CutLog(frames)).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(store = %path, %error, "cannot checkpoint the store's log")
            }
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // The writer commits what it holds and stops.
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = self.lock_front().writer.send(Op::Stop);
        self.hurry();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The writer's newest rows. A new message's row waits here for its delivery, across commits,
/// so that it is written once, delivered: one statement rather than an insert, then an update
/// of the same row (draining, a message's copies are confirmed tens of milliseconds after it is
/// recorded, after the group that recorded it is saved). A row is written at the commit of the
/// group in which its delivery comes, or at the first commit [`HOLD_UNDELIVERED`] after the
/// group that recorded it opened (a message none of whose copies went, a copy still
/// unconfirmed), or when anything reads the table it is missing from: pruning, an answer to
/// it, a look-up of its key ([`Stop::Held`]), a flush. Acknowledgements never wait for a row
/// held: a delivered message is acknowledged once its delivery is committed, which writes its
/// row; a message acknowledged without a delivery (all its copies parked) has its row written
/// within the bound, which a crash may lose, as it may lose the crosswalk records of the last
/// moments anyway.
///
/// Once written, where the rows not yet delivered are, by their look-up key ([`message_key`]),
/// so that a delivery updates its message's row without looking it up in the index again (the
/// writer's one look-up per delivered message); the row found is checked to be the message's
/// (two senders' ids may share a key). Bounded: past [`UNDELIVERED_KEPT`] that map starts
/// over, and a message it does not know is looked up as before.
#[derive(Default)]
struct Newest {
    /// Rows not yet written, by their key, one per key (at most [`HELD_AT_MOST`] after a
    /// commit): a thousand or more wait while a backlog drains, and each write looks its key
    /// up here.
    held: HashMap<i64, Held, foldhash::fast::RandomState>,
    /// The held rows' write numbers and keys, oldest first, so that a commit finds the rows
    /// past their bound and the oldest number without walking every row. An entry whose row
    /// was written since (or holds another number) is passed over.
    order: VecDeque<(u64, i64)>,
    /// Keys of held rows delivered since the last commit: written at the next.
    delivered: Vec<i64>,
    /// Rows written in the open group: given back to `held` if it rolls back, so that applying
    /// its writes again finds them there.
    written: Vec<Held>,
    /// Rows written and not yet delivered: their seq by their key.
    undelivered: HashMap<i64, i64>,
}

/// A message's row, held until its delivery or the bound.
struct Held {
    /// The number of the write that recorded it.
    number: u64,
    since: Instant,
    key: i64,
    message_id: String,
    sender: String,
    reference: Option<String>,
    /// Comma-separated, as in the table.
    recipients: String,
    recorded_at: i64,
    /// Its delivery, confirmed before the row was written: to whom, complete, when.
    delivered: Option<(String, bool, i64)>,
}

impl Newest {
    /// The held row of `sender`'s `message_id`. Another message's row held under the same key
    /// is written first, and then found in the table as any other.
    fn held(
        &mut self,
        tx: &Connection,
        sweep: &mut Sweep,
        key: i64,
        message_id: &str,
        sender: &str,
    ) -> rusqlite::Result<Option<&mut Held>> {
        let Some(row) = self.held.get(&key) else {
            return Ok(None);
        };
        if row.message_id == message_id && row.sender == sender {
            return Ok(self.held.get_mut(&key));
        }
        self.write_key(tx, sweep, key)?;
        Ok(None)
    }

    /// Holds `row` until its delivery or its bound.
    fn hold(&mut self, row: Held) {
        self.order.push_back((row.number, row.key));
        self.held.insert(row.key, row);
    }

    /// Whether the entry `(number, key)` of `order` is a row still held.
    fn live(&self, (number, key): (u64, i64)) -> bool {
        self.held.get(&key).is_some_and(|row| row.number == number)
    }

    /// The oldest held row's entry, once the entries of rows written are passed over.
    fn oldest(&mut self) -> Option<(u64, i64)> {
        while let Some(&entry) = self.order.front() {
            if self.live(entry) {
                return Some(entry);
            }
            self.order.pop_front();
        }
        None
    }

    /// Writes every held row.
    fn write(&mut self, tx: &Connection, sweep: &mut Sweep) -> rusqlite::Result<()> {
        let keys = self.held.keys().copied().collect();
        self.write_keys(tx, sweep, keys)
    }

    /// Writes the held row of `key`, if any.
    fn write_key(&mut self, tx: &Connection, sweep: &mut Sweep, key: i64) -> rusqlite::Result<()> {
        self.write_keys(tx, sweep, vec![key])
    }

    /// Writes the rows due at a commit: those delivered, those held since `before` or earlier,
    /// and the oldest past [`HELD_AT_MOST`].
    fn write_due(
        &mut self,
        tx: &Connection,
        sweep: &mut Sweep,
        before: Option<Instant>,
    ) -> rusqlite::Result<()> {
        let mut keys = std::mem::take(&mut self.delivered);
        while let Some((_, key)) = self.oldest() {
            let row = &self.held[&key];
            let aged = before.is_some_and(|before| row.since <= before);
            if !aged && self.held.len().saturating_sub(keys.len()) <= HELD_AT_MOST {
                break;
            }
            keys.push(key);
            self.order.pop_front();
        }
        self.write_keys(tx, sweep, keys)
    }

    /// Writes the held rows of `keys` (those still held; each once), in the order they were
    /// recorded. Should a write fail, the rows not written are held again, and the group rolls
    /// back (see [`Newest::rolled_back`]).
    fn write_keys(
        &mut self,
        tx: &Connection,
        sweep: &mut Sweep,
        keys: Vec<i64>,
    ) -> rusqlite::Result<()> {
        let mut rows: Vec<Held> = keys
            .into_iter()
            .filter_map(|key| self.held.remove(&key))
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        rows.sort_unstable_by_key(|row| row.number);
        let mut insert = tx.prepare_cached(
            "INSERT INTO message (key, message_id, sender, reference, recipients, recorded_at,
                                  delivered, complete, delivered_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        let mut outcome = Ok(());
        for row in rows {
            if outcome.is_err() {
                self.held.insert(row.key, row);
                continue;
            }
            let (delivered, complete, delivered_at) = match &row.delivered {
                Some((to, complete, at)) => (Some(to.as_str()), *complete, Some(*at)),
                None => (None, false, None),
            };
            outcome = insert
                .execute(params![
                    row.key,
                    row.message_id,
                    row.sender,
                    row.reference,
                    row.recipients,
                    row.recorded_at,
                    delivered,
                    complete,
                    delivered_at
                ])
                .map(|_| ());
            if outcome.is_err() {
                self.held.insert(row.key, row);
                continue;
            }
            let seq = tx.last_insert_rowid();
            sweep.add(row.key, seq);
            if row.delivered.is_none() {
                self.note(row.key, seq);
            }
            self.written.push(row);
        }
        outcome
    }

    /// The open group is saved: its rows are in the table.
    fn saved(&mut self) {
        self.written.clear();
    }

    /// The open group rolled back: the rows it wrote are held again (applying the group's
    /// writes again finds them and changes them as before), and the list of them in order made
    /// anew. Of the rows of one key (two messages whose ids share it), the first written wins:
    /// a row could be held under that key only once the one before was written, so every later
    /// one was recorded by the group itself, and applying it again records it again.
    fn rolled_back(&mut self) {
        for row in self.written.drain(..).rev() {
            self.held.insert(row.key, row);
        }
        let mut order: Vec<(u64, i64)> = self.held.values().map(|r| (r.number, r.key)).collect();
        order.sort_unstable();
        self.order = order.into();
        self.delivered = (self.held.values())
            .filter(|row| row.delivered.is_some())
            .map(|row| row.key)
            .collect();
    }

    /// Every message row recorded by the writes up to `applied` is written, except those held:
    /// the number before the first of them.
    fn rows_upto(&mut self, applied: u64) -> u64 {
        self.oldest().map_or(applied, |(number, _)| number - 1)
    }

    /// When the oldest held row is due.
    fn due(&mut self) -> Option<Instant> {
        let (_, key) = self.oldest()?;
        Some(self.held[&key].since + HOLD_UNDELIVERED)
    }

    /// Notes where the undelivered row of `key` is.
    fn note(&mut self, key: i64, seq: i64) {
        if self.undelivered.len() >= UNDELIVERED_KEPT {
            self.undelivered.clear();
        }
        self.undelivered.insert(key, seq);
    }

    fn take(&mut self, key: i64) -> Option<i64> {
        self.undelivered.remove(&key)
    }
}

/// Applies write `number` (inside the open group transaction, `opened` when it began). Import
/// and prune are answered here.
fn apply(
    connection: &Connection,
    newest: &mut Newest,
    sweep: &mut Sweep,
    (number, write): (u64, &Write),
    opened: Instant,
) -> rusqlite::Result<()> {
    match write {
        Write::Record(m) => apply_record(connection, newest, sweep, number, m, opened),
        Write::Remember {
            fields,
            key,
            complete,
            at,
        } => apply_remember(
            connection,
            newest,
            sweep,
            (fields.get(0), fields.get(1), *key),
            fields.get(2),
            *complete,
            *at,
        ),
        Write::Import {
            partner,
            rows,
            done,
        } => {
            import(connection, partner, rows)?;
            let _ = done.try_send(rows.len());
            Ok(())
        }
        Write::Prune {
            age,
            window,
            after,
            done,
        } => {
            // Pruning reads the table: the rows held are written first.
            newest.write(connection, sweep)?;
            let _ = done.try_send(prune(connection, sweep, *age, *window, *after)?);
            Ok(())
        }
    }
}

fn import(
    connection: &Connection,
    partner: &str,
    rows: &[(String, String, String)],
) -> rusqlite::Result<()> {
    let now = crate::unix_secs();
    for (scheme, value, local) in rows {
        connection
            .prepare_cached(UPSERT_PERSON)?
            .execute(params![partner, scheme, value, local, now])?;
    }
    Ok(())
}

/// How far from the order of their `recorded_at` the message records may be: a row is
/// written up to [`HOLD_UNDELIVERED`] after its time, and the rows held are written as they
/// are delivered. Pruning reads on past the first record within retention until one this much
/// younger. (A wall clock set back by more keeps the records after the step until the next
/// day's pruning passes them.)
const RECORDED_OUT_OF_ORDER_SECS: i64 = 60;

/// One step of pruning: reads up to [`PRUNE_STEP`] message records after `after`, in the order
/// of the table (that of `recorded_at`), and removes those past their retention (`recorded_at
/// < age`) unless they still count for duplicates (delivered since `window`). Returns how many
/// went, and the last record read when the records after it may be past their retention too.
fn prune(
    connection: &Connection,
    sweep: &mut Sweep,
    age: i64,
    window: i64,
    after: i64,
) -> rusqlite::Result<(usize, Option<i64>)> {
    let young = age.saturating_add(RECORDED_OUT_OF_ORDER_SECS);
    let mut records: Vec<(i64, i64)> = Vec::new();
    let (mut last, mut read, mut ended) = (after, 0, false);
    {
        let mut step = connection.prepare_cached(
            "SELECT seq, key, recorded_at, delivered_at FROM message WHERE seq > ?1
             ORDER BY seq LIMIT ?2",
        )?;
        let mut rows = step.query(params![after, PRUNE_STEP as i64])?;
        while let Some(row) = rows.next()? {
            let (seq, key, recorded_at): (i64, i64, i64) = (row.get(0)?, row.get(1)?, row.get(2)?);
            if recorded_at >= young {
                ended = true;
                break;
            }
            let delivered_at: Option<i64> = row.get(3)?;
            if recorded_at < age && delivered_at.is_none_or(|at| at < window) {
                records.push((seq, key));
            }
            (last, read) = (seq, read + 1);
        }
    }
    remove(connection, sweep, &records)?;
    let next = (!ended && read == PRUNE_STEP).then_some(last);
    Ok((records.len(), next))
}

/// Removes the message `records` (`(seq, key)`), and their keys.
fn remove(
    connection: &Connection,
    sweep: &mut Sweep,
    records: &[(i64, i64)],
) -> rusqlite::Result<()> {
    let mut unindex =
        connection.prepare_cached("DELETE FROM message_index WHERE key = ?1 AND seq = ?2")?;
    let mut delete = connection.prepare_cached("DELETE FROM message WHERE seq = ?1")?;
    for &(seq, key) in records {
        unindex.execute(params![key, seq])?;
        delete.execute([seq])?;
        // Nearly always already in the index; one still in memory must not be written there
        // after its record is gone.
        sweep.forget(key, seq);
    }
    Ok(())
}

fn apply_remember(
    connection: &Connection,
    newest: &mut Newest,
    sweep: &mut Sweep,
    (sender, message_id, key): (&str, &str, i64),
    delivered: &str,
    complete: bool,
    at: i64,
) -> rusqlite::Result<()> {
    // The id and sender are compared with the row's too: a row kept below may not be the
    // message's (another sender's id of the same key, a group rolled back and written again
    // numbers its rows anew, pruning removes rows), and then changes nothing.
    let mark = |seq: i64| {
        connection
            .prepare_cached(
                "UPDATE message SET delivered = ?1, complete = ?2, delivered_at = ?3
                 WHERE seq = ?4 AND message_id = ?5 AND sender = ?6",
            )?
            .execute(params![delivered, complete, at, seq, message_id, sender])
    };
    // The row recorded a moment ago: held in memory, so it is written delivered...
    if let Some(row) = newest.held(connection, sweep, key, message_id, sender)? {
        row.delivered = Some((delivered.to_string(), complete, at));
        newest.delivered.push(key);
        return Ok(());
    }
    // ...or written, if the writer knows where it is; else looked up.
    if let Some(seq) = newest.take(key)
        && mark(seq)? == 1
    {
        return Ok(());
    }
    match sweep.find(connection, key, message_id, sender)? {
        Some((seq, _)) => {
            mark(seq)?;
        }
        None => {
            connection
                .prepare_cached(
                    "INSERT INTO message (key, message_id, sender, recipients, recorded_at,
                                          delivered, complete, delivered_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?4, ?6, ?5)",
                )?
                .execute(params![key, message_id, sender, delivered, at, complete])?;
            sweep.add(key, connection.last_insert_rowid());
        }
    };
    Ok(())
}

/// A record's comma-separated `earlier` recipients with those of `more` it did not list yet.
fn with_recipients(earlier: &str, more: &str) -> String {
    let mut all: Vec<&str> = earlier.split(',').filter(|r| !r.is_empty()).collect();
    for r in more.split(',').filter(|r| !r.is_empty()) {
        if !all.contains(&r) {
            all.push(r);
        }
    }
    all.join(",")
}

/// Records a message: its sender's local ids, its row (recipients, reference), and the link of
/// its case to the case of the message it answers. A row held counts from `opened`, when its
/// group began: a group lasts some milliseconds against the half-second bound, and one reading
/// of the clock per group replaces one per message.
fn apply_record(
    tx: &Connection,
    newest: &mut Newest,
    sweep: &mut Sweep,
    number: u64,
    m: &Recorded,
    opened: Instant,
) -> rusqlite::Result<()> {
    for (scheme, value, local) in &m.local_ids {
        tx.prepare_cached(UPSERT_PERSON)?.execute(params![
            m.sender(),
            scheme,
            value,
            local,
            m.at
        ])?;
    }
    let key = m.key;
    // Processed again (given back, or replayed for some recipients): the reference may have
    // been corrected; everyone it was ever meant for stays listed, so that each of them may
    // still answer it.
    if let Some(row) = newest.held(tx, sweep, key, m.message_id(), m.sender())? {
        row.recipients = with_recipients(&row.recipients, m.recipients());
        row.reference = m.reference().map(String::from);
        row.recorded_at = m.at;
    } else if let Some((seq, earlier)) = sweep.find(tx, key, m.message_id(), m.sender())? {
        // Appended anew, with its delivery so far: the table stays in the order of time, which
        // pruning reads it in.
        tx.prepare_cached(
            "INSERT INTO message (key, message_id, sender, reference, recipients, recorded_at,
                                  delivered, complete, delivered_at)
             SELECT key, message_id, sender, ?1, ?2, ?3, delivered, complete, delivered_at
             FROM message WHERE seq = ?4",
        )?
        .execute(params![
            m.reference(),
            with_recipients(&earlier, m.recipients()),
            m.at,
            seq
        ])?;
        let moved = tx.last_insert_rowid();
        remove(tx, sweep, &[(seq, key)])?;
        sweep.add(key, moved);
        newest.note(key, moved);
    } else {
        newest.hold(Held {
            number,
            since: opened,
            key,
            message_id: m.message_id().to_string(),
            sender: m.sender().to_string(),
            reference: m.reference().map(String::from),
            recipients: m.recipients().to_string(),
            recorded_at: m.at,
            delivered: None,
        });
    }
    let (Some(reference), Some(answered)) = (m.reference(), m.correlation_id()) else {
        return Ok(());
    };
    // The message answered may be among the rows held: its row is written first.
    newest.write_key(tx, sweep, message_key(answered))?;
    let Some(original) = original(tx, &sweep.fresh, answered, m.sender())? else {
        return Ok(());
    };
    let theirs = ensure_case(tx, &original.0, &original.1)?;
    match case_of(tx, m.sender(), reference)? {
        Some(ours) if ours != theirs => {
            tx.prepare_cached("UPDATE case_link SET case_id = ?1 WHERE case_id = ?2")?
                .execute(params![theirs, ours])?;
        }
        Some(_) => {}
        None => {
            tx.prepare_cached(
                "INSERT INTO case_link (partner, reference, case_id) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![m.sender(), reference, theirs])?;
        }
    }
    Ok(())
}

/// The sender and reference of the message `answered`, when `answerer` may link its case to
/// it: only an answer from a partner the original went to links the two cases, so that a
/// partner cannot attach itself to someone else's case by guessing a message id.
fn original(
    tx: &Connection,
    fresh: &Fresh,
    answered: &str,
    answerer: &str,
) -> rusqlite::Result<Option<(String, String)>> {
    let original: Option<(String, Option<String>, String)> = first_by_key(
        tx,
        fresh,
        message_key(answered),
        "SELECT sender, reference, recipients FROM message WHERE seq = ?1 AND message_id = ?2",
        &[&answered],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    Ok(match original {
        Some((sender, Some(reference), recipients))
            if sender != answerer && recipients.split(',').any(|r| r == answerer) =>
        {
            Some((sender, reference))
        }
        _ => None,
    })
}

/// The 64-bit look-up key of a message id (the text is compared too).
///
/// A random (version 4) UUID's key is its first half. Many UUIDv7 generators (Rust's `uuid`,
/// Python's, npm's `uuid`) count the ids of one millisecond in the bits after the time, so the
/// first half of every v7 id a sender makes in one millisecond is nearly always the same; a key
/// shared by a batch of ids made every look-up of the batch read each of its rows (a load of
/// v7 ids drained more than ten times slower). A v7 id's key keeps its time first, so the index
/// grows at its end as messages arrive (a commit's new entries share pages) instead of at
/// random places; its other 20 bits mix the rest of the id. Any other UUID mixes its second
/// half into its first (a counter in the second half, as in test systems' ids, stays
/// distinct). An id that is not a UUID is hashed.
pub fn message_key(message_id: &str) -> i64 {
    /// An odd constant (2^64 / the golden ratio): multiplying by it is a bijection whose top
    /// bits depend on every bit of the factor.
    const MIX: u64 = 0x9E37_79B9_7F4A_7C15;
    let Ok(id) = uuid::Uuid::parse_str(message_id) else {
        let digest = <sha2::Sha256 as sha2::Digest>::digest(message_id.as_bytes());
        return i64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
    };
    let (high, low) = id.as_u64_pair();
    match id.get_version_num() {
        4 => high as i64,
        7 => {
            // 43 bits of milliseconds (until the year 2248), then 20 mixed: never negative.
            let millis = (high >> 16) & ((1 << 43) - 1);
            let rest = (low ^ (high & 0x0FFF).rotate_right(12)).wrapping_mul(MIX);
            ((millis << 20) | (rest >> 44)) as i64
        }
        _ => (high ^ low.wrapping_mul(MIX)) as i64,
    }
}

/// The case `(partner, reference)` belongs to, if it was ever linked to another.
fn case_of(tx: &Connection, partner: &str, reference: &str) -> rusqlite::Result<Option<i64>> {
    tx.prepare_cached("SELECT case_id FROM case_link WHERE partner = ?1 AND reference = ?2")?
        .query_row(params![partner, reference], |r| r.get(0))
        .optional()
}

/// The case of `(partner, reference)`, created when it has none yet.
fn ensure_case(tx: &Connection, partner: &str, reference: &str) -> rusqlite::Result<i64> {
    if let Some(case) = case_of(tx, partner, reference)? {
        return Ok(case);
    }
    let case: i64 = tx
        .prepare_cached("SELECT coalesce(max(case_id), 0) + 1 FROM case_link")?
        .query_row([], |r| r.get(0))?;
    tx.prepare_cached("INSERT INTO case_link (partner, reference, case_id) VALUES (?1, ?2, ?3)")?
        .execute(params![partner, reference, case])?;
    Ok(case)
}

impl Store for SqliteStore {
    fn record(&self, m: &MessageCase<'_>) -> Result<Vec<Option<String>>, StoreError> {
        self.front(|front, durable| {
            let reader = &front.reader;
            let key = message_key(m.message_id);
            // The message's key and a few more, without a block of their own.
            let mut keys: SmallVec<[u64; 4]> = smallvec![Key::Message(key).hash()];
            // A person id already known as it is changes nothing a look-up reads.
            for (scheme, value, local) in m.local_ids {
                let key = Key::Person(m.sender, scheme, value);
                let known = match front.settled(&key, durable) {
                    Ok(()) => local_id(reader, m.sender, scheme, value)?,
                    Err(_) => None,
                };
                if known.as_deref() != Some(*local) {
                    keys.push(key.hash());
                }
            }
            let references = match m.reference {
                None => vec![None; m.recipients.len()],
                Some(reference) => {
                    let (references, changed) = references(front, durable, m, reference)?;
                    keys.extend(changed);
                    references
                }
            };
            front.hand_over(Write::Record(Recorded::of(m, key)), &keys, durable)?;
            Ok(references)
        })
    }

    fn local_id(
        &self,
        partner: &str,
        scheme: &str,
        value: &str,
    ) -> Result<Option<String>, StoreError> {
        self.front(|front, durable| {
            front.settled(&Key::Person(partner, scheme, value), durable)?;
            Ok(local_id(&front.reader, partner, scheme, value)?)
        })
    }

    fn import_local_ids(
        &self,
        partner: &str,
        rows: &[(String, String, String)],
    ) -> Result<usize, StoreError> {
        let keys: Vec<u64> = rows
            .iter()
            .map(|(scheme, value, _)| Key::Person(partner, scheme, value).hash())
            .collect();
        let (done, outcome) = sync_channel(1);
        let write = Write::Import {
            partner: partner.to_string(),
            rows: rows.to_vec(),
            done,
        };
        self.hand_over(write, &keys)?;
        self.answer(&outcome)
    }

    fn seen(
        &self,
        sender: &str,
        message_id: &str,
        window: Duration,
    ) -> Result<Option<Seen>, StoreError> {
        let now = crate::unix_secs();
        let window = window.as_secs() as i64;
        let key = message_key(message_id);
        self.front(|front, durable| {
            front.settled(&Key::Message(key), durable)?;
            if !front.recent.may_hold(key, window, now) {
                return Ok(None);
            }
            let seen = first_by_key(
                &front.reader,
                &front.fresh,
                key,
                "SELECT delivered_at, delivered, complete FROM message
                 WHERE seq = ?1 AND message_id = ?2 AND sender = ?3 AND delivered_at >= ?4",
                &[&message_id, &sender, &(now - window)],
                |r| {
                    let recipients: String = r.get(1)?;
                    Ok(Seen {
                        at: r.get(0)?,
                        recipients: recipients
                            .split(',')
                            .filter(|r| !r.is_empty())
                            .map(String::from)
                            .collect(),
                        complete: r.get(2)?,
                    })
                },
            )?;
            Ok(seen)
        })
    }

    fn remember(
        &self,
        sender: &str,
        message_id: &str,
        recipients: &[&str],
        complete: bool,
    ) -> Result<(), StoreError> {
        let at = crate::unix_secs();
        let key = message_key(message_id);
        let mut write = Some(Write::Remember {
            fields: Packed::new([
                Part::Text(sender),
                Part::Text(message_id),
                Part::Names(recipients),
            ]),
            key,
            complete,
            at,
        });
        self.front(|front, durable| {
            // Before the hand-over: a look-up that follows must not miss it.
            front.recent.add(key, at);
            let write = write
                .take()
                .expect("a hand-over never waits, so it runs once");
            front.hand_over(write, &[Key::Message(key).hash()], durable)?;
            Ok(())
        })
    }

    fn prune(&self, age: Duration, window: Duration) -> Result<usize, StoreError> {
        let now = crate::unix_secs();
        let (age, window) = (now - age.as_secs() as i64, now - window.as_secs() as i64);
        let mut pruned = 0;
        // One step per write, each behind the writes already handed over: messages go on
        // being recorded and committed while a large backlog of old records goes.
        let mut after = Some(0);
        while let Some(from) = after {
            let (done, outcome) = sync_channel(1);
            let step = Write::Prune {
                age,
                window,
                after: from,
                done,
            };
            self.hand_over(step, &[])?;
            let removed;
            (removed, after) = self.answer(&outcome)?;
            pruned += removed;
        }
        // Pruning marks no key: look-ups see it once committed, which is now.
        self.flush()?;
        Ok(pruned)
    }

    fn flush(&self) -> Result<(), StoreError> {
        let (done, outcome) = sync_channel(1);
        let writer = self.lock_front().writer.clone();
        writer
            .send(Op::Flush(done))
            .map_err(|_| self.error(writer_gone()))?;
        self.hurry();
        self.answer(&outcome)?.map_err(|e| self.error(e))
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    fn commits(&self) -> tokio::sync::watch::Receiver<Committed> {
        self.shared.watch.subscribe()
    }

    fn commit_soon(&self) {
        self.hurry();
    }
}

/// Each recipient's own reference for the case of `m` (whose sender's reference is
/// `reference`), as it will be once `m` is recorded; and the keys recording it will change.
fn references(
    front: &Front,
    durable: Durable,
    m: &MessageCase<'_>,
    reference: &str,
) -> Result<(Vec<Option<String>>, Vec<u64>), Stop> {
    let reader = &front.reader;
    let mut changed = Vec::new();
    front.settled(&Key::Reference(m.sender, reference), durable)?;
    // The store is read only for a reference the filter cannot rule out.
    let case_of_linked = |partner: &str, reference: &str| {
        if front.linked.may_hold(&(partner, reference)) {
            case_of(reader, partner, reference)
        } else {
            Ok(None)
        }
    };
    let ours = case_of_linked(m.sender, reference)?;
    if let Some(case) = ours {
        front.settled(&Key::Case(case), durable)?;
    }
    // The cases whose references count, and references about to join them.
    let mut cases: Vec<i64> = ours.into_iter().collect();
    let mut joining: Vec<(String, String)> = Vec::new();
    if let Some(answered) = m.correlation_id {
        front.recorded(message_key(answered), durable)?;
        if let Some((sender, their_reference)) = original(reader, &front.fresh, answered, m.sender)?
        {
            // Answering links the two cases (see `apply_record`).
            front.settled(&Key::Reference(&sender, &their_reference), durable)?;
            let theirs = case_of_linked(&sender, &their_reference)?;
            if let Some(theirs) = theirs {
                front.settled(&Key::Case(theirs), durable)?;
                cases.push(theirs);
            }
            // Both references in one case already (a case's later answers to the same
            // original): recording links nothing, and the next look-up need not wait for it.
            if ours.is_none() || ours != theirs {
                changed.extend(cases.iter().map(|case| Key::Case(*case).hash()));
                changed.push(Key::Reference(&sender, &their_reference).hash());
                changed.push(Key::Reference(m.sender, reference).hash());
            }
            // Recording puts both references in a case.
            front
                .linked
                .add(&(sender.as_str(), their_reference.as_str()));
            front.linked.add(&(m.sender, reference));
            joining.push((sender, their_reference));
            joining.push((m.sender.to_string(), reference.to_string()));
        }
    }
    if cases.is_empty() && joining.is_empty() {
        // Most messages belong to no linked case: one look-up and done.
        return Ok((vec![None; m.recipients.len()], changed));
    }
    // The index on (case_id, partner, reference) yields each case's smallest reference first;
    // the smallest of all wins. (An ORDER BY ... LIMIT here made SQLite prepare the statement
    // again on every call.)
    let mut lookup = reader
        .prepare_cached("SELECT reference FROM case_link WHERE case_id = ?1 AND partner = ?2")?;
    let mut references = Vec::with_capacity(m.recipients.len());
    for recipient in m.recipients {
        let mut smallest: Option<String> = joining
            .iter()
            .filter(|(partner, _)| partner == recipient)
            .map(|(_, reference)| reference.clone())
            .min();
        for case in &cases {
            let found: Option<String> = lookup
                .query_row(params![case, recipient], |r| r.get(0))
                .optional()?;
            if let Some(found) = found
                && smallest.as_ref().is_none_or(|s| found < *s)
            {
                smallest = Some(found);
            }
        }
        references.push(smallest);
    }
    Ok((references, changed))
}

fn local_id(
    reader: &Connection,
    partner: &str,
    scheme: &str,
    value: &str,
) -> rusqlite::Result<Option<String>> {
    reader
        .prepare_cached(
            "SELECT local FROM person WHERE partner = ?1 AND scheme = ?2 AND value = ?3",
        )?
        .query_row(params![partner, scheme, value], |r| r.get(0))
        .optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (SqliteStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!("ponte-store-{}", uuid::Uuid::new_v4()));
        (SqliteStore::open(&dir).unwrap(), dir)
    }

    /// Waits until the references linked before the store opened are in its filter, so that a
    /// look-up is answered by the filter rather than by the store.
    fn linked_loaded(s: &SqliteStore) {
        loaded(&s.lock_front().linked.loaded);
    }

    fn loaded(loaded: &AtomicBool) {
        let began = Instant::now();
        while !loaded.load(Ordering::Acquire) {
            assert!(began.elapsed() < Duration::from_secs(10), "never loaded");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn message<'a>(
        id: &'a str,
        sender: &'a str,
        reference: &'a str,
        correlation_id: Option<&'a str>,
        recipients: &'a [&'a str],
    ) -> MessageCase<'a> {
        MessageCase {
            message_id: id,
            sender,
            reference: Some(reference),
            correlation_id,
            recipients,
            local_ids: &[],
        }
    }

    /// The store's records, and their keys: in `message_index` and in memory together.
    fn keys(s: &SqliteStore) -> (i64, usize) {
        let indexed: i64 = s
            .read(|c| c.query_row("SELECT count(*) FROM message_index", [], |r| r.get(0)))
            .unwrap();
        let records: i64 = s
            .read(|c| c.query_row("SELECT count(*) FROM message", [], |r| r.get(0)))
            .unwrap();
        let waiting = lock_fresh(&s.lock_front().fresh).len();
        (records, indexed as usize + waiting)
    }

    /// Asserts that each of the institute's `ids` is found delivered.
    fn all_found(s: &SqliteStore, ids: &[String]) {
        let week = Duration::from_secs(7 * 24 * 3600);
        for id in ids {
            assert!(
                s.seen("inps", id, week).unwrap().is_some(),
                "{id} not found"
            );
        }
    }

    #[test]
    fn keys_wait_in_memory_then_go_to_the_index_and_are_found_all_along() {
        let dir = std::env::temp_dir().join(format!("ponte-store-{}", uuid::Uuid::new_v4()));
        // A sweep over the key space every 64 new records.
        let s = SqliteStore::open_with(&dir, LOG_LIMIT_FRAMES, 64, COMMIT_EVERY).unwrap();
        let week = Duration::from_secs(7 * 24 * 3600);
        let ids: Vec<String> = (0..600).map(|_| uuid::Uuid::new_v4().to_string()).collect();
        for (i, id) in ids.iter().enumerate() {
            let reference = format!("APP-{i}");
            s.record(&message(id, "inps", &reference, None, &["cpi-modena"]))
                .unwrap();
            s.remember("inps", id, &["cpi-modena"], true).unwrap();
            if i % 50 == 49 {
                s.flush().unwrap();
            }
        }
        s.flush().unwrap();
        let waiting = lock_fresh(&s.lock_front().fresh).len();
        assert_eq!(
            keys(&s),
            (600, 600),
            "each key once, in one place or the other"
        );
        assert!(
            (1..150).contains(&waiting),
            "keys go to the index about as fast as they come: {waiting} of 600 in memory"
        );
        // Every record up to the mark has its key in the index: what is in memory is later.
        let (upto, unindexed): (i64, i64) = s
            .read(|c| {
                c.query_row(
                    "SELECT upto, (SELECT count(*) FROM message m WHERE m.seq <= upto AND NOT EXISTS
                        (SELECT 1 FROM message_index i WHERE i.key = m.key AND i.seq = m.seq))
                     FROM message_indexed",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
            })
            .unwrap();
        assert!(upto >= 600 - 150, "marked up to {upto}");
        assert_eq!(unindexed, 0);
        // One id whose key is in memory, one whose key is in the index: each is a duplicate,
        // the original of an answer, and processed again without a second record.
        let in_memory = *lock_fresh(&s.lock_front().fresh).iter().next().unwrap();
        let id_of = |sql: &str| -> String {
            s.read(|c| c.query_row(sql, [in_memory.1], |r| r.get(0)))
                .unwrap()
        };
        let both = [
            id_of("SELECT message_id FROM message WHERE seq = ?1"),
            id_of(
                "SELECT m.message_id FROM message_index i JOIN message m ON m.seq = i.seq
                 WHERE i.seq != ?1 LIMIT 1",
            ),
        ];
        for (n, id) in both.iter().enumerate() {
            let seen = s.seen("inps", id, week).unwrap().unwrap();
            assert_eq!(
                (seen.recipients, seen.complete),
                (vec!["cpi-modena".into()], true)
            );
            // A reference of its own for each answer: one reference would join both cases,
            // and the answer would be given the smaller of the institute's two references.
            let (answer, cpi_reference) = (format!("answer-{n}"), format!("CPI-{n}"));
            let refs = s
                .record(&message(
                    &answer,
                    "cpi-modena",
                    &cpi_reference,
                    Some(id),
                    &["inps"],
                ))
                .unwrap();
            let theirs = ids.iter().position(|i| i == id).unwrap();
            assert_eq!(refs, [Some(format!("APP-{theirs}"))]);
            s.record(&message(
                id,
                "inps",
                "APP-again",
                None,
                &["osservatorio-er"],
            ))
            .unwrap();
        }
        s.flush().unwrap();
        assert_eq!(keys(&s).0, 602, "the two answers, and no second record");
        drop(s);
        // Closed with keys in memory: they are indexed when the store is opened again.
        let s = SqliteStore::open(&dir).unwrap();
        assert_eq!(keys(&s), (602, 602));
        assert!(lock_fresh(&s.lock_front().fresh).is_empty());
        all_found(&s, &ids);
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The folder of a closed store in which the institute's `n` messages of random ids were
    /// delivered, and their ids.
    fn closed_with_delivered(n: usize) -> (Vec<String>, PathBuf) {
        let (s, dir) = store();
        let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect();
        for id in &ids {
            s.record(&message(id, "inps", "APP-1", None, &["cpi-modena"]))
                .unwrap();
            s.remember("inps", id, &["cpi-modena"], true).unwrap();
        }
        s.flush().unwrap();
        (ids, dir)
    }

    #[test]
    fn a_store_that_indexed_keys_on_the_message_table_moves_them_to_their_own_index() {
        let (ids, dir) = closed_with_delivered(100);
        {
            // As layout 4 had it.
            let old = Connection::open(dir.join("ponte.db")).unwrap();
            old.execute_batch(
                "DROP TABLE message_index; DROP TABLE message_indexed;
                 CREATE INDEX message_key ON message (key); PRAGMA user_version = 4;",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&dir).unwrap();
        let old_index: i64 = s
            .read(|c| {
                c.query_row(
                    "SELECT count(*) FROM sqlite_master WHERE name = 'message_key'",
                    [],
                    |r| r.get(0),
                )
            })
            .unwrap();
        assert_eq!(old_index, 0);
        assert_eq!(keys(&s), (100, 100));
        all_found(&s, &ids);
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_writer_that_cannot_take_a_write_is_named_as_such() {
        let (s, dir) = store();
        // A writer queue with no room, then one whose writer is gone.
        let (full, held) = sync_channel(0);
        let original = std::mem::replace(&mut s.lock_front().writer, full);
        let behind = s.remember("inps", "m1", &["cpi-modena"], true).unwrap_err();
        assert_eq!(
            behind.message,
            format!("the store's writer is {QUEUE} writes behind")
        );
        drop(held);
        let gone = s.record(&message("m2", "inps", "R-1", None, &["cpi-modena"]));
        assert_eq!(gone.unwrap_err().message, "the store's writer has stopped");
        // The real writer takes writes again.
        s.lock_front().writer = original;
        s.remember("inps", "m3", &["cpi-modena"], true).unwrap();
        s.flush().unwrap();
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_answer_links_the_two_references_both_ways() {
        let (s, dir) = store();
        linked_loaded(&s);
        // The CPI refers a person to INPS: INPS has no reference for that case yet.
        let refs = s
            .record(&message("m1", "cpi-modena", "CPI-7", None, &["inps"]))
            .unwrap();
        assert_eq!(refs, [None]);
        // INPS answers with its application: the CPI gets its own referral reference back.
        let refs = s
            .record(&message("m2", "inps", "APP-9", Some("m1"), &["cpi-modena"]))
            .unwrap();
        assert_eq!(refs, [Some("CPI-7".to_string())]);
        // Later messages about the case, without correlation, carry the recipient's reference.
        let refs = s
            .record(&message("m3", "inps", "APP-9", None, &["cpi-modena"]))
            .unwrap();
        assert_eq!(refs, [Some("CPI-7".to_string())]);
        let refs = s
            .record(&message("m4", "cpi-modena", "CPI-7", None, &["inps"]))
            .unwrap();
        assert_eq!(refs, [Some("APP-9".to_string())]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_partner_the_original_did_not_go_to_cannot_join_its_case() {
        let (s, dir) = store();
        s.record(&message("m1", "cpi-modena", "CPI-7", None, &["inps"]))
            .unwrap();
        let refs = s
            .record(&message(
                "m2",
                "comune-modena",
                "SS-1",
                Some("m1"),
                &["cpi-modena"],
            ))
            .unwrap();
        assert_eq!(refs, [None]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_crosswalk_survives_reopening() {
        let (s, dir) = store();
        s.record(&MessageCase {
            local_ids: &[("it.cf", "RSSMRA85T10A562S", "ANA-42")],
            ..message("m1", "comune-modena", "SS-1", None, &["cpi-modena"])
        })
        .unwrap();
        s.record(&message(
            "m2",
            "cpi-modena",
            "CPI-7",
            Some("m1"),
            &["comune-modena"],
        ))
        .unwrap();
        drop(s);
        let s = SqliteStore::open(&dir).unwrap();
        linked_loaded(&s);
        assert_eq!(
            s.local_id("comune-modena", "it.cf", "RSSMRA85T10A562S")
                .unwrap()
                .as_deref(),
            Some("ANA-42")
        );
        assert_eq!(
            s.local_id("cpi-modena", "it.cf", "RSSMRA85T10A562S")
                .unwrap(),
            None
        );
        let refs = s
            .record(&message(
                "m3",
                "cpi-modena",
                "CPI-7",
                None,
                &["comune-modena"],
            ))
            .unwrap();
        assert_eq!(refs, [Some("SS-1".to_string())]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_delivered_message_is_seen_within_the_window_and_after_reopening() {
        let (s, dir) = store();
        let week = Duration::from_secs(7 * 24 * 3600);
        let id = "6f1c2a9e-8a4b-4c1e-9b7a-3d2f1e0c9b8a";
        assert_eq!(s.seen("inps", id, week).unwrap(), None);
        // Partly delivered first, then completely: the later record replaces the earlier one.
        s.remember("inps", id, &["cpi-modena"], false).unwrap();
        let seen = s.seen("inps", id, week).unwrap().unwrap();
        assert_eq!(seen.recipients, ["cpi-modena"]);
        assert!(!seen.complete);
        s.remember("inps", id, &["cpi-modena", "osservatorio-er"], true)
            .unwrap();
        let seen = s.seen("inps", id, week).unwrap().unwrap();
        assert_eq!(seen.recipients, ["cpi-modena", "osservatorio-er"]);
        assert!(seen.complete);
        // Another sender may use the same id.
        assert_eq!(s.seen("cpi-modena", id, week).unwrap(), None);
        s.flush().unwrap();
        drop(s);
        let s = SqliteStore::open(&dir).unwrap();
        assert!(s.seen("inps", id, week).unwrap().is_some());
        // Outside the window it is forgotten; pruning removes it once past its retention, not
        // while its delivery still counts.
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(s.seen("inps", id, Duration::ZERO).unwrap(), None);
        assert_eq!(s.prune(Duration::ZERO, week).unwrap(), 0);
        assert!(s.seen("inps", id, week).unwrap().is_some());
        assert_eq!(s.prune(Duration::ZERO, Duration::ZERO).unwrap(), 1);
        assert_eq!(s.seen("inps", id, week).unwrap(), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_delivery_lands_on_its_own_message_s_row_even_once_that_row_was_pruned() {
        let (s, dir) = store();
        let week = Duration::from_secs(7 * 24 * 3600);
        let id = "0d4b7e2a-5c3f-4a8e-9f1d-7b6a5c4d3e2f";
        // The same id from two senders, one of them recorded twice (processed again).
        s.record(&message(id, "inps", "A-1", None, &["cpi-modena"]))
            .unwrap();
        s.record(&message(id, "cpi-modena", "B-1", None, &["inps"]))
            .unwrap();
        s.record(&message(id, "inps", "A-1", None, &["cpi-modena"]))
            .unwrap();
        s.remember("inps", id, &["cpi-modena"], true).unwrap();
        s.flush().unwrap();
        let rows: Vec<(String, String, Option<String>)> = s
            .read(|c| {
                c.prepare(
                    "SELECT sender, reference, delivered FROM message WHERE message_id = ?1
                     ORDER BY sender",
                )?
                .query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
            })
            .unwrap();
        let row = |sender: &str, reference: &str, delivered: Option<&str>| {
            (sender.into(), reference.into(), delivered.map(String::from))
        };
        assert_eq!(
            rows,
            [
                row("cpi-modena", "B-1", None),
                row("inps", "A-1", Some("cpi-modena"))
            ]
        );
        assert_eq!(s.seen("cpi-modena", id, week).unwrap(), None);
        // A message recorded, its row pruned before its delivery (a long outage of the
        // recipient, a short retention): the delivery is still remembered.
        let late = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d";
        s.record(&message(late, "inps", "A-2", None, &["cpi-modena"]))
            .unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        // Both undelivered rows go: cpi-modena's of the first id, and this one.
        assert_eq!(s.prune(Duration::ZERO, week).unwrap(), 2);
        s.remember("inps", late, &["cpi-modena"], true).unwrap();
        let seen = s.seen("inps", late, week).unwrap().unwrap();
        assert_eq!(
            (seen.recipients, seen.complete),
            (vec!["cpi-modena".to_string()], true)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_look_up_of_what_the_open_group_holds_has_the_group_committed_rather_than_wait() {
        // Groups that would be committed only a minute after their first write.
        let dir = std::env::temp_dir().join(format!("ponte-store-{}", uuid::Uuid::new_v4()));
        let s = SqliteStore::open_with(&dir, LOG_LIMIT_FRAMES, FRESH_KEYS, Duration::from_secs(60))
            .unwrap();
        let week = Duration::from_secs(7 * 24 * 3600);
        let id = "3b1f6c2e-9d4a-4e7b-8c5f-1a2b3c4d5e6f";
        s.record(&MessageCase {
            local_ids: &[("it.cf", "RSSMRA85T10A562S", "ANA-42")],
            ..message(id, "inps", "APP-1", None, &["cpi-modena"])
        })
        .unwrap();
        s.remember("inps", id, &["cpi-modena"], true).unwrap();
        // Each look-up reads what a write of the open group changes: it is answered once the
        // group is committed, long before the minute (a look-up gives up after 10 s).
        let seen = s.seen("inps", id, week).unwrap().unwrap();
        assert_eq!(
            (seen.recipients, seen.complete),
            (vec!["cpi-modena".into()], true)
        );
        s.record(&message(
            "another",
            "inps",
            "APP-2",
            Some(id),
            &["cpi-modena"],
        ))
        .unwrap();
        assert_eq!(
            s.local_id("inps", "it.cf", "RSSMRA85T10A562S")
                .unwrap()
                .as_deref(),
            Some("ANA-42")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_commit_asked_for_soon_saves_the_open_group_long_before_it_is_due() {
        // Groups that would be committed only a minute after their first write.
        let dir = std::env::temp_dir().join(format!("ponte-store-{}", uuid::Uuid::new_v4()));
        let s = SqliteStore::open_with(&dir, LOG_LIMIT_FRAMES, FRESH_KEYS, Duration::from_secs(60))
            .unwrap();
        let id = "5d2c7e1a-0b3f-4c8d-9e6a-2b3c4d5e6f70";
        s.record(&message(id, "inps", "APP-1", None, &["cpi-modena"]))
            .unwrap();
        s.remember("inps", id, &["cpi-modena"], true).unwrap();
        let written = s.written();
        let commits = s.commits();
        // Not asked: after a while, the writes are still waiting in the open group.
        std::thread::sleep(Duration::from_millis(200));
        assert!(*commits.borrow() != Ok(written), "{:?}", *commits.borrow());
        // Asked: saved at once, well within the minute (given up on after 10 s).
        s.commit_soon();
        let began = Instant::now();
        while *commits.borrow() != Ok(written) {
            assert!(began.elapsed() < Duration::from_secs(10), "never committed");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Another connection to the store in `dir` that makes it refuse person ids while
    /// `refusing` has a row, and holds the store's writer back (its transaction open) so that
    /// the writes handed over next make one group. See [`fail_then_save`].
    fn refusing_person_ids(dir: &Path) -> Connection {
        let other = Connection::open(dir.join("ponte.db")).unwrap();
        other
            .execute_batch(
                "PRAGMA busy_timeout = 5000;
                 CREATE TABLE refusing (x); INSERT INTO refusing VALUES (1);
                 CREATE TRIGGER refuse BEFORE INSERT ON person WHEN EXISTS (SELECT 1 FROM refusing)
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;
                 BEGIN IMMEDIATE;",
            )
            .unwrap();
        other
    }

    /// Lets the writer go on to the group `other` held back (a person id among its writes),
    /// waits until it fails, then stops refusing: the group is rolled back and written again
    /// until it is saved, which a flush waits for.
    fn fail_then_save(s: &SqliteStore, other: &Connection) {
        std::thread::sleep(Duration::from_millis(50));
        other.execute_batch("COMMIT").unwrap();
        let commits = s.commits();
        let began = Instant::now();
        while commits.borrow().is_ok() {
            assert!(began.elapsed() < Duration::from_secs(10), "never failed");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
        other.execute_batch("DELETE FROM refusing").unwrap();
        s.flush().unwrap();
    }

    /// Waits until every write handed over so far is committed.
    fn all_committed(s: &SqliteStore) {
        let (written, commits) = (s.written(), s.commits());
        let began = Instant::now();
        while *commits.borrow() != Ok(written) {
            assert!(began.elapsed() < Duration::from_secs(10), "never committed");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// How many rows `id` has, and to whom it was delivered.
    fn delivered(s: &SqliteStore, id: &str) -> (i64, Option<String>) {
        s.read(|c| {
            c.query_row(
                "SELECT count(*), group_concat(delivered) FROM message WHERE message_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .unwrap()
    }

    #[test]
    fn a_row_waits_for_its_delivery_across_commits_and_is_written_once_delivered() {
        let (s, dir) = store();
        let week = Duration::from_secs(7 * 24 * 3600);
        let (confirmed, parked) = ("m-confirmed", "m-parked");
        s.record(&message(confirmed, "inps", "APP-1", None, &["cpi-modena"]))
            .unwrap();
        s.record(&message(parked, "inps", "APP-2", None, &["cpi-modena"]))
            .unwrap();
        // The records are committed (their message could be acknowledged), their rows wait for
        // their deliveries.
        all_committed(&s);
        assert_eq!(delivered(&s, confirmed), (0, None));
        // The delivery, in a later group, writes the row whole.
        s.remember("inps", confirmed, &["cpi-modena"], true)
            .unwrap();
        all_committed(&s);
        assert_eq!(delivered(&s, confirmed), (1, Some("cpi-modena".into())));
        let seen = s.seen("inps", confirmed, week).unwrap().unwrap();
        assert_eq!(
            (seen.recipients, seen.complete),
            (vec!["cpi-modena".into()], true)
        );
        // A row never delivered is written undelivered once it has waited its bound, with no
        // further write nor flush to carry it.
        let began = Instant::now();
        while delivered(&s, parked).0 == 0 {
            assert!(began.elapsed() < Duration::from_secs(10), "never written");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(delivered(&s, parked), (1, None));
        assert_eq!(s.seen("inps", parked, week).unwrap(), None);
        assert_eq!(keys(&s), (2, 2), "two records, each key once");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_failed_group_keeps_the_rows_it_had_written_of_messages_recorded_before_it() {
        let (s, dir) = store();
        // The same id from two senders: the second's record writes the first's waiting row.
        let id = "a1b2c3d4-0000-4000-8000-000000000001";
        s.record(&message(id, "inps", "APP-1", None, &["cpi-modena"]))
            .unwrap();
        all_committed(&s);
        assert_eq!(delivered(&s, id), (0, None));
        let other = refusing_person_ids(&dir);
        s.record(&message(id, "cpi-modena", "CPI-1", None, &["inps"]))
            .unwrap();
        s.remember("inps", id, &["cpi-modena"], true).unwrap();
        s.record(&MessageCase {
            local_ids: &[("it.cf", "RSSMRA85T10A562S", "ANA-42")],
            ..message("m-refused", "inps", "APP-3", None, &["cpi-modena"])
        })
        .unwrap();
        fail_then_save(&s, &other);
        let rows: Vec<(String, String, Option<String>)> = s
            .read(|c| {
                c.prepare(
                    "SELECT sender, reference, delivered FROM message
                     WHERE message_id = ?1 ORDER BY sender",
                )?
                .query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
            })
            .unwrap();
        assert_eq!(
            rows,
            [
                ("cpi-modena".into(), "CPI-1".into(), None),
                ("inps".into(), "APP-1".into(), Some("cpi-modena".into())),
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_answer_to_a_message_whose_row_waits_for_its_delivery_links_the_case() {
        let (s, dir) = store();
        linked_loaded(&s);
        s.record(&message("m1", "cpi-modena", "CPI-7", None, &["inps"]))
            .unwrap();
        // Committed, but not delivered yet: INPS answers the copy before its confirm came.
        all_committed(&s);
        assert_eq!(delivered(&s, "m1"), (0, None));
        let refs = s
            .record(&message("m2", "inps", "APP-9", Some("m1"), &["cpi-modena"]))
            .unwrap();
        assert_eq!(refs, [Some("CPI-7".to_string())]);
        // The same message again while the first is in flight: not delivered yet.
        assert_eq!(
            s.seen("cpi-modena", "m1", Duration::from_secs(3600))
                .unwrap(),
            None
        );
        let refs = s
            .record(&message("m3", "cpi-modena", "CPI-7", None, &["inps"]))
            .unwrap();
        assert_eq!(refs, [Some("APP-9".to_string())]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_group_that_failed_is_saved_again_with_each_message_once_and_its_delivery() {
        let (s, dir) = store();
        let week = Duration::from_secs(7 * 24 * 3600);
        let other = refusing_person_ids(&dir);
        let (delivered, again, pending) = ("m-delivered", "m-again", "m-pending");
        s.record(&message(delivered, "inps", "APP-1", None, &["cpi-modena"]))
            .unwrap();
        s.record(&message(again, "inps", "APP-2", None, &["cpi-modena"]))
            .unwrap();
        s.remember("inps", delivered, &["cpi-modena"], true)
            .unwrap();
        // Processed again for another recipient, with a corrected reference.
        s.record(&message(
            again,
            "inps",
            "APP-2b",
            None,
            &["osservatorio-er"],
        ))
        .unwrap();
        s.record(&MessageCase {
            local_ids: &[("it.cf", "RSSMRA85T10A562S", "ANA-42")],
            ..message(pending, "inps", "APP-3", None, &["cpi-modena"])
        })
        .unwrap();
        fail_then_save(&s, &other);
        let rows = |id: &str| -> (i64, String, Option<String>, Option<String>) {
            s.read(|c| {
                c.query_row(
                    "SELECT count(*), group_concat(recipients), group_concat(reference),
                            group_concat(delivered)
                     FROM message WHERE message_id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
            })
            .unwrap()
        };
        assert_eq!(
            rows(delivered),
            (
                1,
                "cpi-modena".into(),
                Some("APP-1".into()),
                Some("cpi-modena".into())
            )
        );
        assert_eq!(
            rows(again),
            (
                1,
                "cpi-modena,osservatorio-er".into(),
                Some("APP-2b".into()),
                None
            )
        );
        assert_eq!(
            rows(pending),
            (1, "cpi-modena".into(), Some("APP-3".into()), None)
        );
        let seen = s.seen("inps", delivered, week).unwrap().unwrap();
        assert_eq!(
            (seen.recipients, seen.complete),
            (vec!["cpi-modena".into()], true)
        );
        assert_eq!(s.seen("inps", pending, week).unwrap(), None);
        assert_eq!(
            s.local_id("inps", "it.cf", "RSSMRA85T10A562S")
                .unwrap()
                .as_deref(),
            Some("ANA-42")
        );
        // A delivery after the group finds the row written with it.
        s.remember("inps", pending, &["cpi-modena"], true).unwrap();
        s.flush().unwrap();
        assert_eq!(rows(pending).3.as_deref(), Some("cpi-modena"));
        assert_eq!(keys(&s), (3, 3), "three records, each key once");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn after_a_restart_duplicates_are_still_caught_and_new_ids_need_no_read_of_the_store() {
        let (s, dir) = store();
        let day: i64 = 24 * 3600;
        let week = Duration::from_secs(7 * day as u64);
        let ids: Vec<String> = (0..50).map(|_| uuid::Uuid::new_v4().to_string()).collect();
        for id in &ids {
            s.remember("inps", id, &["cpi-modena"], true).unwrap();
        }
        s.flush().unwrap();
        // The first was delivered a month ago.
        s.read(|c| {
            c.execute(
                "UPDATE message SET delivered_at = delivered_at - ?1 WHERE message_id = ?2",
                params![30 * day, ids[0]],
            )
        })
        .unwrap();
        drop(s);

        let s = SqliteStore::open(&dir).unwrap();
        s.check_duplicates_within(week);
        let until = Instant::now() + Duration::from_secs(10);
        while !s.lock_front().recent.loaded() {
            assert!(
                Instant::now() < until,
                "recent deliveries not loaded within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        for id in &ids[1..] {
            assert!(s.seen("inps", id, week).unwrap().is_some(), "{id}");
        }
        assert_eq!(s.seen("inps", &ids[0], week).unwrap(), None);
        // A look-up with a longer window than the one loaded reads the store.
        assert!(
            s.seen("inps", &ids[0], Duration::from_secs(60 * day as u64))
                .unwrap()
                .is_some()
        );
        // Delivered from now on: caught too.
        let later = uuid::Uuid::new_v4().to_string();
        s.remember("inps", &later, &["cpi-modena"], true).unwrap();
        s.flush().unwrap();
        assert!(s.seen("inps", &later, week).unwrap().is_some());
        // With the message table gone, a new id is still answered (from memory); a delivered
        // one is looked up in the store, and the look-up fails.
        let other = Connection::open(dir.join("ponte.db")).unwrap();
        other.execute_batch("DROP TABLE message").unwrap();
        for _ in 0..1000 {
            let new = uuid::Uuid::new_v4().to_string();
            assert_eq!(s.seen("inps", &new, week).unwrap(), None);
        }
        assert!(s.seen("inps", &ids[1], week).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn pruning_removes_every_record_past_its_retention_and_keeps_the_rest() {
        let (s, dir) = store();
        let day = 24 * 3600;
        let ids: Vec<String> = (0..2500).map(|i| format!("old-{i}")).collect();
        for id in &ids {
            s.record(&message(id, "cpi-modena", "CPI-1", None, &["inps"]))
                .unwrap();
        }
        s.record(&message(
            "old-but-delivered",
            "inps",
            "APP-1",
            None,
            &["cpi-modena"],
        ))
        .unwrap();
        s.flush().unwrap();
        // Recorded 500 days ago.
        s.read(|c| {
            c.execute(
                "UPDATE message SET recorded_at = recorded_at - ?1",
                [500 * day],
            )
        })
        .unwrap();
        // Delivered only now (a replay): it still counts for duplicates.
        s.remember("inps", "old-but-delivered", &["cpi-modena"], true)
            .unwrap();
        s.record(&message("new", "inps", "APP-2", None, &["cpi-modena"]))
            .unwrap();
        s.flush().unwrap();

        let year = Duration::from_secs(400 * day as u64);
        let week = Duration::from_secs(7 * day as u64);
        // More than one step's worth.
        assert_eq!(s.prune(year, week).unwrap(), 2500);
        let kept: Vec<String> = s
            .read(|c| {
                c.prepare("SELECT message_id FROM message ORDER BY seq")?
                    .query_map([], |r| r.get(0))?
                    .collect()
            })
            .unwrap();
        assert_eq!(kept, ["old-but-delivered", "new"]);
        // Their keys went with them, whether indexed or still in memory.
        assert_eq!(keys(&s), (2, 2));
        assert_eq!(s.prune(year, week).unwrap(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The message ids of the store's records, in the order of the table.
    fn in_table_order(s: &SqliteStore) -> Vec<String> {
        s.read(|c| {
            c.prepare("SELECT message_id FROM message ORDER BY seq")?
                .query_map([], |r| r.get(0))?
                .collect()
        })
        .unwrap()
    }

    #[test]
    fn a_message_processed_again_goes_to_the_end_and_is_kept_for_its_new_retention() {
        let (s, dir) = store();
        let day: i64 = 24 * 3600;
        let (year, week) = (
            Duration::from_secs(400 * 86_400),
            Duration::from_secs(7 * 86_400),
        );
        s.record(&message("again", "inps", "APP-1", None, &["cpi-modena"]))
            .unwrap();
        s.remember("inps", "again", &["cpi-modena"], false).unwrap();
        s.record(&message("old", "inps", "APP-2", None, &["cpi-modena"]))
            .unwrap();
        s.flush().unwrap();
        // Recorded, and the first delivered, 500 days ago.
        s.read(|c| {
            c.execute(
                "UPDATE message SET recorded_at = recorded_at - ?1,
                                    delivered_at = delivered_at - ?1",
                [500 * day],
            )
        })
        .unwrap();
        // Given back and processed again now, for one more recipient, with a corrected
        // reference; then a new message.
        s.record(&message(
            "again",
            "inps",
            "APP-1b",
            None,
            &["osservatorio-er"],
        ))
        .unwrap();
        s.record(&message("new", "inps", "APP-3", None, &["cpi-modena"]))
            .unwrap();
        s.flush().unwrap();
        assert_eq!(in_table_order(&s), ["old", "again", "new"]);
        let again: (String, String, Option<String>) = s
            .read(|c| {
                c.query_row(
                    "SELECT reference, recipients, delivered FROM message WHERE message_id = 'again'",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
            })
            .unwrap();
        assert_eq!(
            again,
            (
                "APP-1b".into(),
                "cpi-modena,osservatorio-er".into(),
                Some("cpi-modena".into())
            )
        );
        // One key per record: the moved record's old one went with it.
        assert_eq!(keys(&s), (3, 3));
        // Its retention counts from when it was processed again.
        assert_eq!(s.prune(year, week).unwrap(), 1);
        assert_eq!(in_table_order(&s), ["again", "new"]);
        // An answer to it still links to its case.
        let refs = s
            .record(&message(
                "reply",
                "osservatorio-er",
                "OSS-1",
                Some("again"),
                &["inps"],
            ))
            .unwrap();
        assert_eq!(refs, [Some("APP-1b".to_string())]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn pruning_reads_past_a_record_within_retention_to_those_written_a_moment_late() {
        let (s, dir) = store();
        let (year, week) = (
            Duration::from_secs(400 * 86_400),
            Duration::from_secs(7 * 86_400),
        );
        s.record(&message("young", "inps", "APP-1", None, &["cpi-modena"]))
            .unwrap();
        s.record(&message("old", "inps", "APP-2", None, &["cpi-modena"]))
            .unwrap();
        s.flush().unwrap();
        // Just within retention, and after it one just past it (as a row held for its
        // delivery is written after rows recorded a moment later).
        let edge = crate::unix_secs() - 400 * 86_400;
        s.read(|c| {
            c.execute(
                "UPDATE message SET recorded_at = CASE message_id WHEN 'young' THEN ?1 ELSE ?2 END",
                [edge + 20, edge - 10],
            )
        })
        .unwrap();
        assert_eq!(s.prune(year, week).unwrap(), 1);
        assert_eq!(in_table_order(&s), ["young"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_message_processed_again_in_a_group_that_failed_has_one_row() {
        let (s, dir) = store();
        let id = "2c9e4f1a-7b3d-4e8a-9c6f-5a1b2d3e4f60";
        s.record(&message(id, "inps", "APP-1", None, &["cpi-modena"]))
            .unwrap();
        s.remember("inps", id, &["cpi-modena"], true).unwrap();
        s.flush().unwrap();
        // Its key still waits in memory (see `Fresh`), which the failed group takes it out of.
        let key = message_key(id);
        assert!(
            lock_fresh(&s.lock_front().fresh)
                .iter()
                .any(|&(k, _)| k == key)
        );
        let other = refusing_person_ids(&dir);
        s.record(&message(id, "inps", "APP-1b", None, &["osservatorio-er"]))
            .unwrap();
        s.record(&MessageCase {
            local_ids: &[("it.cf", "RSSMRA85T10A562S", "ANA-42")],
            ..message("m-refused", "inps", "APP-3", None, &["cpi-modena"])
        })
        .unwrap();
        fail_then_save(&s, &other);
        assert_eq!(delivered(&s, id), (1, Some("cpi-modena".into())));
        assert_eq!(in_table_order(&s), [id, "m-refused"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_store_indexed_by_time_is_put_in_the_order_of_time_and_pruned_from_its_start() {
        let day: i64 = 24 * 3600;
        let (year, week) = (
            Duration::from_secs(400 * 86_400),
            Duration::from_secs(7 * 86_400),
        );
        let (ids, dir) = closed_with_delivered(50);
        {
            // As layout 5 had it: indexed by time, and the first record processed again (its
            // time changed in place) after the others were recorded 500 days ago.
            let old = Connection::open(dir.join("ponte.db")).unwrap();
            old.execute(
                "UPDATE message SET recorded_at = recorded_at - ?1, delivered_at = delivered_at - ?1
                 WHERE seq > (SELECT min(seq) FROM message)",
                [500 * day],
            )
            .unwrap();
            old.execute_batch(
                "CREATE INDEX message_recorded ON message (recorded_at); PRAGMA user_version = 5;",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&dir).unwrap();
        let (version, old_index): (i64, i64) = s
            .read(|c| {
                Ok((
                    c.query_row("PRAGMA user_version", [], |r| r.get(0))?,
                    c.query_row(
                        "SELECT count(*) FROM sqlite_master WHERE name = 'message_recorded'",
                        [],
                        |r| r.get(0),
                    )?,
                ))
            })
            .unwrap();
        assert_eq!((version, old_index), (VERSION, 0));
        let mut in_time_order = ids[1..].to_vec();
        in_time_order.push(ids[0].clone());
        assert_eq!(in_table_order(&s), in_time_order);
        // Numbered anew, every record is still found, by its key.
        assert_eq!(keys(&s), (50, 50));
        assert!(s.seen("inps", &ids[0], week).unwrap().is_some());
        assert_eq!(s.prune(year, week).unwrap(), 49);
        assert_eq!(in_table_order(&s), [ids[0].clone()]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn references_linked_before_a_restart_are_all_found_however_many() {
        let (s, dir) = store();
        drop(s);
        // More linked pairs than the filter reads at a time at start: two per case.
        let cases = LINKED_LOAD_STEP + 1;
        let mut c = Connection::open(dir.join("ponte.db")).unwrap();
        let tx = c.transaction().unwrap();
        for case in 0..cases {
            for (partner, prefix) in [("inps", "APP"), ("cpi-modena", "CPI")] {
                tx.execute(
                    "INSERT INTO case_link (partner, reference, case_id) VALUES (?1, ?2, ?3)",
                    params![partner, format!("{prefix}-{case:06}"), case],
                )
                .unwrap();
            }
        }
        tx.commit().unwrap();
        drop(c);
        let s = SqliteStore::open(&dir).unwrap();
        linked_loaded(&s);
        for (n, case) in [0, cases / 2, cases - 1].into_iter().enumerate() {
            let id = format!("m{n}");
            let (app, cpi) = (format!("APP-{case:06}"), format!("CPI-{case:06}"));
            let refs = s
                .record(&message(&id, "inps", &app, None, &["cpi-modena"]))
                .unwrap();
            assert_eq!(refs, [Some(cpi)], "case {case}");
        }
        // A reference never linked has no counterpart, and the filter says so without the store.
        assert!(!s.lock_front().linked.may_hold(&("inps", "APP-X")));
        let refs = s
            .record(&message("m9", "inps", "APP-X", None, &["cpi-modena"]))
            .unwrap();
        assert_eq!(refs, [None]);
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A message processed again after a restart (given back by the broker, replayed) updates
    /// its record, found through the writer's filter of keys with a record, however many
    /// records the filter read at start; a new one is added beside them.
    #[test]
    fn records_made_before_a_restart_are_all_found_when_their_message_comes_again() {
        let (s, dir) = store();
        drop(s);
        // More records than the filter reads at a time at start.
        let records = FILED_LOAD_STEP + 1;
        let mut c = Connection::open(dir.join("ponte.db")).unwrap();
        let tx = c.transaction().unwrap();
        for n in 0..records {
            let id = format!("m{n}");
            tx.execute(
                "INSERT INTO message (key, message_id, sender, reference, recipients, recorded_at)
                 VALUES (?1, ?2, 'inps', ?3, 'cpi-modena', 0)",
                params![message_key(&id), id, format!("APP-{n}")],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        drop(c);
        let s = SqliteStore::open(&dir).unwrap();
        loaded(&s.filed_loaded);
        let again = [0, records / 2, records - 1];
        for n in again {
            let reference = format!("APP-{n}");
            let id = format!("m{n}");
            s.record(&message(&id, "inps", &reference, None, &["comune-modena"]))
                .unwrap();
        }
        s.record(&message("new", "inps", "APP-N", None, &["cpi-modena"]))
            .unwrap();
        s.flush().unwrap();
        let count: i64 = s
            .read(|c| c.query_row("SELECT count(*) FROM message", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(count, records + 1, "one record more: the new message's");
        for n in again {
            let recipients: String = s
                .read(|c| {
                    c.query_row(
                        "SELECT recipients FROM message WHERE message_id = ?1",
                        [format!("m{n}")],
                        |r| r.get(0),
                    )
                })
                .unwrap();
            assert_eq!(recipients, "cpi-modena,comune-modena", "m{n}");
        }
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn merging_two_known_cases_keeps_every_reference() {
        let (s, dir) = store();
        linked_loaded(&s);
        // Two cases known separately, then an answer joins them.
        s.record(&message("a1", "cpi-modena", "CPI-7", None, &["inps"]))
            .unwrap();
        s.record(&message("b1", "inps", "APP-9", None, &["comune-modena"]))
            .unwrap();
        s.record(&message(
            "b2",
            "comune-modena",
            "SS-1",
            Some("b1"),
            &["inps"],
        ))
        .unwrap();
        s.record(&message("a2", "inps", "APP-9", Some("a1"), &["cpi-modena"]))
            .unwrap();
        let refs = s
            .record(&message(
                "c1",
                "cpi-modena",
                "CPI-7",
                None,
                &["inps", "comune-modena"],
            ))
            .unwrap();
        assert_eq!(refs, [Some("APP-9".to_string()), Some("SS-1".to_string())]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_store_of_the_two_table_layout_is_carried_over() {
        let dir = std::env::temp_dir().join(format!("ponte-store-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let now = crate::unix_secs();
        {
            let old = Connection::open(dir.join("ponte.db")).unwrap();
            old.execute_batch(
                "CREATE TABLE sent_message (seq INTEGER PRIMARY KEY, key INTEGER NOT NULL,
                     message_id TEXT NOT NULL, sender TEXT NOT NULL, reference TEXT,
                     recipients TEXT NOT NULL, recorded_at INTEGER NOT NULL);
                 CREATE TABLE delivery (seq INTEGER PRIMARY KEY, key INTEGER NOT NULL,
                     sender TEXT NOT NULL, message_id TEXT NOT NULL, recipients TEXT NOT NULL,
                     complete INTEGER NOT NULL, delivered_at INTEGER NOT NULL);
                 PRAGMA user_version = 2;",
            )
            .unwrap();
            let sent = "INSERT INTO sent_message (key, message_id, sender, reference, recipients, recorded_at)
                        VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
            let delivered =
                "INSERT INTO delivery (key, sender, message_id, recipients, complete, delivered_at)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
            // A referral sent twice (given back once), delivered; a message known only as delivered.
            for _ in 0..2 {
                old.execute(
                    sent,
                    params![message_key("m1"), "m1", "cpi-modena", "CPI-7", "inps", now],
                )
                .unwrap();
            }
            old.execute(
                delivered,
                params![message_key("m1"), "cpi-modena", "m1", "inps", true, now],
            )
            .unwrap();
            old.execute(
                delivered,
                params![message_key("m0"), "inps", "m0", "cpi-modena", false, now],
            )
            .unwrap();
        }
        let s = SqliteStore::open(&dir).unwrap();
        let week = Duration::from_secs(7 * 24 * 3600);
        let seen = s.seen("cpi-modena", "m1", week).unwrap().unwrap();
        assert_eq!(
            (seen.recipients, seen.complete),
            (vec!["inps".to_string()], true)
        );
        let seen = s.seen("inps", "m0", week).unwrap().unwrap();
        assert_eq!(
            (seen.recipients, seen.complete),
            (vec!["cpi-modena".to_string()], false)
        );
        // The case crosswalk still knows where m1 went: INPS's answer gets the CPI's reference.
        let refs = s
            .record(&message("m2", "inps", "APP-9", Some("m1"), &["cpi-modena"]))
            .unwrap();
        assert_eq!(refs, [Some("CPI-7".to_string())]);
        s.flush().unwrap();
        let rows: i64 = s
            .read(|c| c.query_row("SELECT count(*) FROM message", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(rows, 3);
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn v7_ids_made_in_one_burst_get_keys_of_their_own_in_time_order() {
        // A tight loop makes thousands of ids per millisecond, counted in their first half.
        let ids: Vec<String> = (0..10_000)
            .map(|_| uuid::Uuid::now_v7().to_string())
            .collect();
        let mut shared: HashMap<i64, usize> = HashMap::new();
        for id in &ids {
            *shared.entry(message_key(id)).or_default() += 1;
        }
        assert!(
            shared.len() >= 9_900,
            "{} keys for 10,000 ids",
            shared.len()
        );
        assert!(
            shared.values().all(|&n| n <= 3),
            "a key shared by more than 3 ids"
        );
        // A later millisecond's ids come after: the index grows at its end.
        std::thread::sleep(Duration::from_millis(2));
        let later = message_key(&uuid::Uuid::now_v7().to_string());
        assert!(ids.iter().all(|id| message_key(id) < later));
        assert!(later > 0);
    }

    #[test]
    fn uuids_that_differ_only_in_their_second_half_get_keys_of_their_own() {
        // As a system that numbers its messages might make them (no version).
        let keys: std::collections::HashSet<i64> = (0..10_000)
            .map(|i| message_key(&format!("00000000-0000-0000-0000-{i:012}")))
            .collect();
        assert_eq!(keys.len(), 10_000);
    }

    #[test]
    fn a_store_of_a_later_layout_is_refused_untouched() {
        let dir = std::env::temp_dir().join(format!("ponte-store-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let later = Connection::open(dir.join("ponte.db")).unwrap();
        later
            .execute_batch(&format!("PRAGMA user_version = {}", VERSION + 1))
            .unwrap();
        let error = SqliteStore::open(&dir).expect_err("refused");
        assert!(error.message.contains("later release"), "{error}");
        let version: i64 = later
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, VERSION + 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn records_keyed_by_an_older_version_are_still_found() {
        let (s, dir) = store();
        let week = Duration::from_secs(7 * 24 * 3600);
        let id = uuid::Uuid::now_v7().to_string();
        let random = uuid::Uuid::new_v4().to_string();
        for id in [&id, &random] {
            s.record(&message(id, "cpi-modena", "CPI-7", None, &["inps"]))
                .unwrap();
            s.remember("cpi-modena", id, &["inps"], true).unwrap();
        }
        s.flush().unwrap();
        drop(s);
        let first_half = |id: &str| uuid::Uuid::parse_str(id).unwrap().as_u64_pair().0 as i64;
        let key_of = |c: &Connection, id: &str| -> i64 {
            c.query_row("SELECT key FROM message WHERE message_id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap()
        };
        {
            // As version 3 left it: keyed by the id's first half.
            let old = Connection::open(dir.join("ponte.db")).unwrap();
            old.execute(
                "UPDATE message SET key = ?1 WHERE message_id = ?2",
                params![first_half(&id), id],
            )
            .unwrap();
            old.execute_batch("PRAGMA user_version = 3").unwrap();
        }
        let s = SqliteStore::open(&dir).unwrap();
        let version: i64 = s
            .read(|c| c.query_row("PRAGMA user_version", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(version, VERSION);
        // Still a duplicate, and still the original an answer links to.
        let seen = s.seen("cpi-modena", &id, week).unwrap().unwrap();
        assert_eq!(
            (seen.recipients, seen.complete),
            (vec!["inps".into()], true)
        );
        let refs = s
            .record(&message("m2", "inps", "APP-9", Some(&id), &["cpi-modena"]))
            .unwrap();
        assert_eq!(refs, [Some("CPI-7".to_string())]);
        // A random id keeps the key an earlier release looks it up by.
        let kept = s.read(|c| Ok(key_of(c, &random))).unwrap();
        assert_eq!(kept, first_half(&random));
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn look_ups_do_not_wait_for_a_stalled_writer_unless_they_read_what_it_holds() {
        let (s, dir) = store();
        let week = Duration::from_secs(7 * 24 * 3600);
        s.record(&message("m1", "cpi-modena", "CPI-7", None, &["inps"]))
            .unwrap();
        s.flush().unwrap();
        // Another process holds the database's write lock: the store's writer stalls.
        let other = Connection::open(dir.join("ponte.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let mut commits = s.commits();
        let before = commits.borrow_and_update().clone();
        // Messages go on being recorded and looked up meanwhile...
        let refs = s
            .record(&message("m2", "inps", "APP-9", Some("m1"), &["cpi-modena"]))
            .unwrap();
        assert_eq!(refs, [Some("CPI-7".to_string())]);
        assert_eq!(s.seen("cpi-modena", "m1", week).unwrap(), None);
        s.remember("inps", "m2", &["cpi-modena"], true).unwrap();
        // ...while nothing is committed.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(*commits.borrow_and_update(), before);
        assert!(s.written() > before.clone().unwrap());
        // A look-up of what the writer holds waits for it and sees it.
        std::thread::scope(|scope| {
            let seen = scope.spawn(|| s.seen("inps", "m2", week));
            std::thread::sleep(Duration::from_millis(300));
            assert!(!seen.is_finished(), "read m2 before it was committed");
            other.execute_batch("COMMIT").unwrap();
            let seen = seen.join().unwrap().unwrap().unwrap();
            assert_eq!(seen.recipients, ["cpi-modena"]);
        });
        s.flush().unwrap();
        assert_eq!(*commits.borrow_and_update(), Ok(s.written()));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_look_up_waiting_for_a_stalled_writer_holds_back_only_its_own_task() {
        let (s, dir) = store();
        let s = Arc::new(s);
        let week = Duration::from_secs(7 * 24 * 3600);
        // Another process holds the database's write lock: the store's writer stalls with m1.
        let other = Connection::open(dir.join("ponte.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        s.remember("inps", "m1", &["cpi-modena"], true).unwrap();
        let runtime = crate::one_worker::runtime();
        let looking = runtime.spawn({
            let s = s.clone();
            async move { s.seen("inps", "m1", week) }
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(!looking.is_finished(), "read m1 before it was committed");
        assert!(
            crate::one_worker::another_task_runs(&runtime),
            "a task that reads nothing waited for the store's writer"
        );
        other.execute_batch("COMMIT").unwrap();
        let seen = runtime.block_on(looking).unwrap().unwrap().unwrap();
        assert_eq!(seen.recipients, ["cpi-modena"]);
        drop(runtime);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_later_answer_in_a_linked_case_does_not_hold_up_the_case_s_next_message() {
        let (s, dir) = store();
        s.record(&message("m1", "cpi-modena", "CPI-7", None, &["inps"]))
            .unwrap();
        s.record(&message("m2", "inps", "APP-9", Some("m1"), &["cpi-modena"]))
            .unwrap();
        s.flush().unwrap();
        // The writer stalls behind another process's write lock.
        let other = Connection::open(dir.join("ponte.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        // INPS answers the same referral again (a later status of the case): nothing new to link.
        let refs = s
            .record(&message("m3", "inps", "APP-9", Some("m1"), &["cpi-modena"]))
            .unwrap();
        assert_eq!(refs, [Some("CPI-7".to_string())]);
        // The CPI's next message about the case gets INPS's reference without waiting for it.
        std::thread::scope(|scope| {
            let next =
                scope.spawn(|| s.record(&message("m4", "cpi-modena", "CPI-7", None, &["inps"])));
            std::thread::sleep(Duration::from_millis(300));
            let finished = next.is_finished();
            other.execute_batch("COMMIT").unwrap();
            assert!(finished, "waited for a record that links nothing new");
            assert_eq!(next.join().unwrap().unwrap(), [Some("APP-9".to_string())]);
        });
        s.flush().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_log_is_cut_back_under_steady_writes() {
        let dir = std::env::temp_dir().join(format!("ponte-store-{}", uuid::Uuid::new_v4()));
        // A small limit (1 MiB), so that a few seconds of writes cross it several times.
        let s = SqliteStore::open_with(&dir, 256, FRESH_KEYS, COMMIT_EVERY).unwrap();
        let wal = || std::fs::metadata(dir.join("ponte.db-wal")).map_or(0, |m| m.len());
        let until = std::time::Instant::now() + Duration::from_secs(4);
        let (mut n, mut largest, mut cut) = (0u64, 0, 0);
        while std::time::Instant::now() < until {
            let id = uuid::Uuid::new_v4().to_string();
            s.record(&message(&id, "cpi-modena", "CPI-7", None, &["inps"]))
                .unwrap();
            s.remember("cpi-modena", &id, &["inps"], true).unwrap();
            n += 1;
            if n % 50 == 0 {
                s.flush().unwrap();
                let now = wal();
                if now < largest {
                    cut += 1;
                }
                largest = now;
            }
        }
        // A log that never starts over only grows while the writes go on.
        assert!(
            cut >= 2,
            "the log was cut back {cut} time(s) during {n} messages"
        );
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
