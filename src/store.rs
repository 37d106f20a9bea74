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

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

/// Writes are grouped into one transaction committed at least this often (inbound messages are
/// acknowledged once their writes are committed)...
const COMMIT_EVERY: Duration = Duration::from_millis(5);
/// ...or after this many writes, whichever comes first.
const COMMIT_AFTER: usize = 512;
/// The store's write-ahead log is cut back once it holds this many pages (64 MiB).
const LOG_LIMIT_FRAMES: i64 = 16384;

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

    /// Forgets message records older than `age` (case links stay) and delivered-message records
    /// older than `window`; returns how many.
    fn prune(&self, age: Duration, window: Duration) -> Result<usize, StoreError>;

    /// Makes every write so far durable now (at shutdown, and where nothing else commits).
    fn flush(&self) -> Result<(), StoreError>;

    /// How many writes were made so far: [`Store::commits`] reaches this number once they are
    /// durable.
    fn written(&self) -> u64;

    /// The number of writes made durable so far, updated at every commit (the store commits
    /// on its own, every few milliseconds); an error when a commit failed.
    fn commits(&self) -> tokio::sync::watch::Receiver<Committed>;
}

/// Writes made durable so far, or why the last commit failed.
pub type Committed = Result<u64, String>;

/// The crosswalks in one SQLite file.
///
/// One transaction per write would cost about 90 µs per message on the benchmark machine; writes
/// are instead grouped into one transaction (a write of several statements inside its own
/// savepoint, so that a failed one leaves no trace), committed by the store's own thread every
/// 5 ms, or after 512 writes. Flows acknowledge a run of messages only once a commit covers
/// what the run recorded ([`Store::commits`]), so a delivery is on disk before its message is
/// acknowledged; a crash of the process can forget at most the crosswalk links of its last
/// moments (later messages about those cases then arrive without the recipient's reference).
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    inner: Arc<Mutex<Inner>>,
    written: Arc<AtomicU64>,
    waits: metrics::Histogram,
}

#[derive(Debug)]
struct Inner {
    connection: Connection,
    /// A transaction is open, holding `pending` writes.
    open: bool,
    pending: usize,
    /// Writes so far (shared: flows read it without taking the lock).
    written: Arc<AtomicU64>,
    /// Told the writes made durable at every commit.
    commits: tokio::sync::watch::Sender<Committed>,
}

impl Inner {
    fn commit(&mut self) -> rusqlite::Result<()> {
        if self.open {
            if let Err(error) = self.connection.execute_batch("COMMIT") {
                let _ = self.commits.send_replace(Err(error.to_string()));
                return Err(error);
            }
            self.open = false;
            self.pending = 0;
            let _ = self
                .commits
                .send_replace(Ok(self.written.load(Ordering::SeqCst)));
        }
        Ok(())
    }

    fn wrote(&mut self) -> rusqlite::Result<()> {
        self.pending += 1;
        self.written.fetch_add(1, Ordering::SeqCst);
        if self.pending >= COMMIT_AFTER {
            self.commit()?;
        }
        Ok(())
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
-- crosswalk), and once delivered, to whom (for duplicate detection). Appended in arrival order
-- (cheap), found by a small random key: 64 bits of the message id (the text is compared too).
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
CREATE INDEX IF NOT EXISTS message_key ON message (key);
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
const VERSION: i64 = 3;

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

/// Creates the tables, or brings an older layout up to [`VERSION`], in one transaction.
fn migrate(connection: &mut Connection) -> rusqlite::Result<()> {
    let tx = connection.transaction()?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    tx.execute_batch(SCHEMA)?;
    if version == 2 {
        tx.execute_batch(FROM_VERSION_2)?;
    }
    tx.execute_batch(&format!("PRAGMA user_version = {VERSION}"))?;
    tx.commit()
}

impl SqliteStore {
    /// Opens (creating if needed) `ponte.db` in `dir`. The folder is created with owner-only
    /// permissions: the file holds person identifiers.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_with_log_limit(dir, LOG_LIMIT_FRAMES)
    }

    fn open_with_log_limit(dir: &Path, log_limit: i64) -> Result<SqliteStore, StoreError> {
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
        let mut connection = Connection::open(&path).map_err(|e| error(e.to_string()))?;
        // WAL: readers never wait for the writer; NORMAL: a commit survives a crash of the
        // process (not necessarily of the machine), without an fsync per message. The log is
        // checkpointed by the commit thread.
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;
                 PRAGMA wal_autocheckpoint = 0; PRAGMA cache_size = -8192;",
            )
            .and_then(|()| migrate(&mut connection))
            // When the log starts over, its file is cut back to the same bound.
            .and_then(|()| {
                connection.execute_batch(&format!(
                    "PRAGMA journal_size_limit = {}",
                    log_limit.saturating_mul(4096)
                ))
            })
            .map_err(|e| error(e.to_string()))?;
        let written = Arc::new(AtomicU64::new(0));
        let inner = Arc::new(Mutex::new(Inner {
            connection,
            open: false,
            pending: 0,
            written: written.clone(),
            commits: tokio::sync::watch::Sender::new(Ok(0)),
        }));
        // Checkpoints (copying the log into the database file, with an fsync) run on a
        // connection of their own in the background, never inside a message's write.
        let checkpoints = Connection::open(&path).map_err(|e| error(e.to_string()))?;
        let committer = Arc::downgrade(&inner);
        let shown = path.display().to_string();
        std::thread::Builder::new()
            .name("ponte-store".into())
            .spawn(move || commit_periodically(committer, checkpoints, shown, log_limit))
            .map_err(|e| error(format!("cannot start the commit thread: {e}")))?;
        Ok(SqliteStore {
            path,
            inner,
            written,
            waits: metrics::histogram!("ponte_store_wait_seconds"),
        })
    }

    fn error(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    /// Takes the connection, recording how long that took in `ponte_store_wait_seconds`: the
    /// store's own thread holds it while it commits, and a commit waits for the disk when the
    /// disk is busy (fsyncs), so this is where a slow disk shows up on the message path.
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        let asked = std::time::Instant::now();
        // A write that panicked stays inside its savepoint, which the next write's transaction
        // handling rolls back with it; the lock is safe to take over.
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.waits.record(asked.elapsed());
        inner
    }

    /// Runs one write inside its own savepoint of the open group transaction, so that a write
    /// of several statements that fails leaves no trace.
    fn write<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        self.write_one(|connection| {
            let run = |sql: &str| connection.prepare_cached(sql)?.execute([]);
            run("SAVEPOINT write")?;
            let result = f(connection);
            if result.is_err() {
                run("ROLLBACK TO write")?;
            }
            run("RELEASE write")?;
            result
        })
    }

    /// Runs a write whose only change is its last statement (one statement is atomic by itself:
    /// no savepoint needed) in the open group transaction.
    fn write_one<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut inner = self.lock();
        let result = (|| -> rusqlite::Result<T> {
            if !inner.open {
                inner.connection.execute_batch("BEGIN")?;
                inner.open = true;
            }
            let value = f(&inner.connection)?;
            inner.wrote()?;
            Ok(value)
        })();
        result.map_err(|e| self.error(e))
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        f(&self.lock().connection).map_err(|e| self.error(e))
    }
}

/// Commits the open group transaction every [`COMMIT_EVERY`], and checkpoints the log about
/// once a second, until the store is dropped.
///
/// A checkpoint copies the log into the database file, beside the writer; the log starts over
/// only when a write begins after *every* frame was copied, which under steady traffic never
/// happens (new commits keep arriving), so the log would grow without bound. Once it holds more
/// than `log_limit` frames, writes are held while the last few frames are copied, so that the
/// next write starts the log over (its file keeps its size and is written from the start): a
/// pause of about one fsync, once per `log_limit` frames written (several seconds apart at the
/// benchmark's full rate; never at low traffic, where the log starts over on its own). The
/// log's file is cut back to `log_limit` pages when it starts over.
fn commit_periodically(
    inner: Weak<Mutex<Inner>>,
    checkpoints: Connection,
    path: String,
    log_limit: i64,
) {
    let mut last_checkpoint = std::time::Instant::now();
    let checkpoint = |mode: &str| -> rusqlite::Result<i64> {
        checkpoints.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| r.get(1))
    };
    loop {
        std::thread::sleep(COMMIT_EVERY);
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let committed = inner.lock().unwrap_or_else(|p| p.into_inner()).commit();
        if let Err(error) = committed {
            tracing::error!(store = %path, %error, "cannot commit crosswalk records");
        }
        if last_checkpoint.elapsed() >= Duration::from_secs(1) {
            last_checkpoint = std::time::Instant::now();
            let done = checkpoint("PASSIVE").and_then(|frames| {
                if frames <= log_limit {
                    return Ok(());
                }
                let started = std::time::Instant::now();
                let mut held = inner.lock().unwrap_or_else(|p| p.into_inner());
                held.commit()?;
                checkpoint("RESTART")?;
                drop(held);
                tracing::debug!(store = %path, frames, held_ms = started.elapsed().as_millis() as u64, "store log cut back");
                Ok(())
            });
            if let Err(error) = done {
                tracing::warn!(store = %path, %error, "cannot checkpoint the store's log");
            }
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        if let Err(error) = self.lock().commit() {
            tracing::error!(store = %self.path.display(), %error, "cannot commit crosswalk records");
        }
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The 64-bit look-up key of a message id (its UUID's first half; the text is compared too).
fn message_key(message_id: &str) -> i64 {
    uuid::Uuid::parse_str(message_id).map_or_else(
        |_| {
            let digest = <sha2::Sha256 as sha2::Digest>::digest(message_id.as_bytes());
            i64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
        },
        |u| u.as_u64_pair().0 as i64,
    )
}

/// The row of `sender`'s `message_id`, and whom it was meant for.
fn find(
    tx: &Connection,
    key: i64,
    message_id: &str,
    sender: &str,
) -> rusqlite::Result<Option<(i64, String)>> {
    tx.prepare_cached(
        "SELECT seq, recipients FROM message WHERE key = ?1 AND message_id = ?2 AND sender = ?3",
    )?
    .query_row(params![key, message_id, sender], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .optional()
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
        self.write(|tx| {
            let now = now_secs();
            for (scheme, value, local) in m.local_ids {
                tx.prepare_cached(UPSERT_PERSON)?
                .execute(params![m.sender, scheme, value, local, now])?;
            }
            let key = message_key(m.message_id);
            match find(tx, key, m.message_id, m.sender)? {
                // Processed again (given back, or replayed for some recipients): the reference
                // may have been corrected; everyone it was ever meant for stays listed, so that
                // each of them may still answer it.
                Some((seq, earlier)) => {
                    let mut all: Vec<&str> = earlier.split(',').filter(|r| !r.is_empty()).collect();
                    for r in m.recipients {
                        if !all.contains(r) {
                            all.push(r);
                        }
                    }
                    tx.prepare_cached(
                        "UPDATE message SET reference = ?1, recipients = ?2, recorded_at = ?3
                         WHERE seq = ?4",
                    )?
                    .execute(params![m.reference, all.join(","), now, seq])?;
                }
                None => {
                    tx.prepare_cached(
                        "INSERT INTO message (key, message_id, sender, reference, recipients, recorded_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )?
                    .execute(params![
                        key,
                        m.message_id,
                        m.sender,
                        m.reference,
                        m.recipients.join(","),
                        now
                    ])?;
                }
            }
            let Some(reference) = m.reference else {
                return Ok(vec![None; m.recipients.len()]);
            };
            if let Some(answered) = m.correlation_id {
                let original: Option<(String, Option<String>, String)> = tx
                    .prepare_cached(
                        "SELECT sender, reference, recipients FROM message
                         WHERE key = ?1 AND message_id = ?2",
                    )?
                    .query_row(params![message_key(answered), answered], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .optional()?;
                // Only an answer from a partner the original went to links the two cases: a
                // partner cannot attach itself to someone else's case by guessing a message id.
                if let Some((sender, Some(original_reference), recipients)) = original
                    && sender != m.sender
                    && recipients.split(',').any(|r| r == m.sender)
                {
                    let theirs = ensure_case(tx, &sender, &original_reference)?;
                    match case_of(tx, m.sender, reference)? {
                        Some(ours) if ours != theirs => {
                            tx.prepare_cached("UPDATE case_link SET case_id = ?1 WHERE case_id = ?2")?
                                .execute(params![theirs, ours])?;
                        }
                        Some(_) => {}
                        None => {
                            tx.prepare_cached(
                                "INSERT INTO case_link (partner, reference, case_id) VALUES (?1, ?2, ?3)",
                            )?
                            .execute(params![m.sender, reference, theirs])?;
                        }
                    }
                }
            }
            // Most messages belong to no linked case: one look-up and done.
            let Some(case) = case_of(tx, m.sender, reference)? else {
                return Ok(vec![None; m.recipients.len()]);
            };
            let mut references = Vec::with_capacity(m.recipients.len());
            {
                // The index on (case_id, partner, reference) yields the smallest reference first.
                // (An ORDER BY ... LIMIT here made SQLite prepare the statement again on every
                // call.)
                let mut lookup = tx.prepare_cached(
                    "SELECT reference FROM case_link WHERE case_id = ?1 AND partner = ?2",
                )?;
                for recipient in m.recipients {
                    references.push(
                        lookup
                            .query_row(params![case, recipient], |r| r.get(0))
                            .optional()?,
                    );
                }
            }
            Ok(references)
        })
    }

    fn local_id(
        &self,
        partner: &str,
        scheme: &str,
        value: &str,
    ) -> Result<Option<String>, StoreError> {
        self.read(|connection| {
            connection
                .prepare_cached(
                    "SELECT local FROM person WHERE partner = ?1 AND scheme = ?2 AND value = ?3",
                )?
                .query_row(params![partner, scheme, value], |r| r.get(0))
                .optional()
        })
    }

    fn import_local_ids(
        &self,
        partner: &str,
        rows: &[(String, String, String)],
    ) -> Result<usize, StoreError> {
        self.write(|tx| {
            let now = now_secs();
            for (scheme, value, local) in rows {
                tx.prepare_cached(UPSERT_PERSON)?
                    .execute(params![partner, scheme, value, local, now])?;
            }
            Ok(rows.len())
        })
    }

    fn seen(
        &self,
        sender: &str,
        message_id: &str,
        window: Duration,
    ) -> Result<Option<Seen>, StoreError> {
        let since = now_secs() - window.as_secs() as i64;
        self.read(|connection| {
            connection
                .prepare_cached(
                    "SELECT delivered_at, delivered, complete FROM message
                     WHERE key = ?1 AND message_id = ?2 AND sender = ?3 AND delivered_at >= ?4",
                )?
                .query_row(
                    params![message_key(message_id), message_id, sender, since],
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
                )
                .optional()
        })
    }

    fn remember(
        &self,
        sender: &str,
        message_id: &str,
        recipients: &[&str],
        complete: bool,
    ) -> Result<(), StoreError> {
        let key = message_key(message_id);
        let (delivered, now) = (recipients.join(","), now_secs());
        self.write_one(|tx| {
            match find(tx, key, message_id, sender)? {
                Some((seq, _)) => tx
                    .prepare_cached(
                        "UPDATE message SET delivered = ?1, complete = ?2, delivered_at = ?3
                         WHERE seq = ?4",
                    )?
                    .execute(params![delivered, complete, now, seq])?,
                None => tx
                    .prepare_cached(
                        "INSERT INTO message (key, message_id, sender, recipients, recorded_at,
                                              delivered, complete, delivered_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?4, ?6, ?5)",
                    )?
                    .execute(params![key, message_id, sender, delivered, now, complete])?,
            };
            Ok(())
        })
    }

    fn prune(&self, age: Duration, window: Duration) -> Result<usize, StoreError> {
        let now = now_secs();
        self.write(|connection| {
            let (age, window) = (now - age.as_secs() as i64, now - window.as_secs() as i64);
            // A message past its retention goes, unless it still counts for duplicates...
            let messages = connection.execute(
                "DELETE FROM message WHERE recorded_at < ?1
                 AND (delivered_at IS NULL OR delivered_at < ?2)",
                params![age, window],
            )?;
            // ...and a delivery past the window no longer does.
            let delivered = connection.execute(
                "UPDATE message SET delivered = NULL, complete = 0, delivered_at = NULL
                 WHERE delivered_at < ?1",
                params![window],
            )?;
            Ok(messages + delivered)
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.lock().commit().map_err(|e| self.error(e))
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    fn commits(&self) -> tokio::sync::watch::Receiver<Committed> {
        self.lock().commits.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (SqliteStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!("ponte-store-{}", uuid::Uuid::new_v4()));
        (SqliteStore::open(&dir).unwrap(), dir)
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

    #[test]
    fn an_answer_links_the_two_references_both_ways() {
        let (s, dir) = store();
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
        // Outside the window it is forgotten, and pruning removes it.
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(s.seen("inps", id, Duration::ZERO).unwrap(), None);
        assert_eq!(s.prune(week, Duration::ZERO).unwrap(), 1);
        assert_eq!(s.seen("inps", id, week).unwrap(), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn merging_two_known_cases_keeps_every_reference() {
        let (s, dir) = store();
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
        let now = now_secs();
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
        let rows: i64 = s
            .read(|c| c.query_row("SELECT count(*) FROM message", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(rows, 3);
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_log_is_cut_back_under_steady_writes() {
        let dir = std::env::temp_dir().join(format!("ponte-store-{}", uuid::Uuid::new_v4()));
        // A small limit (1 MiB), so that a few seconds of writes cross it several times.
        let s = SqliteStore::open_with_log_limit(&dir, 256).unwrap();
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
