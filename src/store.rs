//! Store: what the gateway remembers between messages and across restarts.
//!
//! - The **person crosswalk**: a partner's own person id (`local` scheme, say a municipality's
//!   registry number) for a shared identifier, learnt from the messages that partner sends with
//!   both, or imported with `ponte crosswalk import`.
//! - The **case crosswalk**: which references of different partners (`referral_id`,
//!   `application_id`, …) name the same case, learnt when a message answers an earlier one
//!   (`correlation_id`).
//!
//! [`Crosswalk`] is the interface; [`SqliteStore`] keeps it in one SQLite file in the data
//! folder. Several gateway instances sharing one crosswalk would implement the trait on a shared
//! database instead.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

/// Writes are grouped into one transaction committed at least this often...
const COMMIT_EVERY: Duration = Duration::from_millis(20);
/// ...or after this many writes, whichever comes first.
const COMMIT_AFTER: usize = 512;

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

/// The crosswalks, as the pipeline uses them.
pub trait Crosswalk: Send + Sync + std::fmt::Debug {
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

    /// Forgets message records older than `age` (case links stay); returns how many.
    fn prune(&self, age: Duration) -> Result<usize, StoreError>;

    /// Makes every write so far durable (used at shutdown).
    fn flush(&self) -> Result<(), StoreError>;
}

/// The crosswalks in one SQLite file.
///
/// One write per message would cost a transaction per message (about 90 µs on the benchmark
/// machine); writes are instead grouped into one transaction committed every 20 ms or 512
/// writes, each write inside its own savepoint so that a failed one leaves no trace. A crash of
/// the process can therefore forget the crosswalk records of its last 20 ms: later messages about
/// those cases then arrive without the recipient's reference. No message is lost by it.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    connection: Connection,
    /// A transaction is open, holding `pending` writes.
    open: bool,
    pending: usize,
}

impl Inner {
    fn commit(&mut self) -> rusqlite::Result<()> {
        if self.open {
            self.connection.execute_batch("COMMIT")?;
            self.open = false;
            self.pending = 0;
        }
        Ok(())
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS person (
    partner TEXT NOT NULL,
    scheme TEXT NOT NULL,
    value TEXT NOT NULL,
    local TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (partner, scheme, value)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS message (
    message_id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    reference TEXT,
    recipients TEXT NOT NULL,
    recorded_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS message_recorded_at ON message (recorded_at);
CREATE TABLE IF NOT EXISTS case_reference (
    partner TEXT NOT NULL,
    reference TEXT NOT NULL,
    case_id TEXT NOT NULL,
    PRIMARY KEY (partner, reference)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS case_reference_case ON case_reference (case_id, partner, reference);
";

impl SqliteStore {
    /// Opens (creating if needed) `ponte.db` in `dir`. The folder is created with owner-only
    /// permissions: the file holds person identifiers.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
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
        let connection = Connection::open(&path).map_err(|e| error(e.to_string()))?;
        // WAL: readers never wait for the writer; NORMAL: a commit survives a crash of the
        // process (not necessarily of the machine), without an fsync per message.
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;",
            )
            .and_then(|()| connection.execute_batch(SCHEMA))
            .map_err(|e| error(e.to_string()))?;
        let inner = Arc::new(Mutex::new(Inner {
            connection,
            open: false,
            pending: 0,
        }));
        let committer = Arc::downgrade(&inner);
        let shown = path.display().to_string();
        std::thread::Builder::new()
            .name("ponte-store".into())
            .spawn(move || commit_periodically(committer, shown))
            .map_err(|e| error(format!("cannot start the commit thread: {e}")))?;
        Ok(SqliteStore { path, inner })
    }

    fn error(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A write that panicked stays inside its savepoint, which the next write's transaction
        // handling rolls back with it; the lock is safe to take over.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs one write inside its own savepoint of the open group transaction.
    fn write<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut inner = self.lock();
        let result = (|| {
            if !inner.open {
                inner.connection.execute_batch("BEGIN")?;
                inner.open = true;
            }
            let run = |sql: &str| inner.connection.prepare_cached(sql)?.execute([]);
            run("SAVEPOINT write")?;
            match f(&inner.connection) {
                Ok(value) => {
                    run("RELEASE write")?;
                    inner.pending += 1;
                    if inner.pending >= COMMIT_AFTER {
                        inner.commit()?;
                    }
                    Ok(value)
                }
                Err(e) => {
                    run("ROLLBACK TO write")?;
                    run("RELEASE write")?;
                    Err(e)
                }
            }
        })();
        result.map_err(|e| self.error(e))
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        f(&self.lock().connection).map_err(|e| self.error(e))
    }
}

/// Commits the open group transaction every [`COMMIT_EVERY`] until the store is dropped.
fn commit_periodically(inner: Weak<Mutex<Inner>>, path: String) {
    loop {
        std::thread::sleep(COMMIT_EVERY);
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let mut inner = inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(error) = inner.commit() {
            tracing::error!(store = %path, %error, "cannot commit crosswalk records");
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

/// The case of `(partner, reference)`, created when it has none yet.
fn case_of(tx: &Connection, partner: &str, reference: &str) -> rusqlite::Result<String> {
    let found: Option<String> = tx
        .prepare_cached("SELECT case_id FROM case_reference WHERE partner = ?1 AND reference = ?2")?
        .query_row(params![partner, reference], |r| r.get(0))
        .optional()?;
    if let Some(case) = found {
        return Ok(case);
    }
    let case = uuid::Uuid::new_v4().to_string();
    tx.prepare_cached(
        "INSERT INTO case_reference (partner, reference, case_id) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![partner, reference, case])?;
    Ok(case)
}

impl Crosswalk for SqliteStore {
    fn record(&self, m: &MessageCase<'_>) -> Result<Vec<Option<String>>, StoreError> {
        self.write(|tx| {
            let now = now_secs();
            for (scheme, value, local) in m.local_ids {
                tx.prepare_cached(
                    "INSERT INTO person (partner, scheme, value, local, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (partner, scheme, value) DO UPDATE SET local = excluded.local, updated_at = excluded.updated_at",
                )?
                .execute(params![m.sender, scheme, value, local, now])?;
            }
            tx.prepare_cached(
                "INSERT OR REPLACE INTO message (message_id, sender, reference, recipients, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![m.message_id, m.sender, m.reference, m.recipients.join(","), now])?;
            let Some(reference) = m.reference else {
                return Ok(vec![None; m.recipients.len()]);
            };
            let mut case = case_of(tx, m.sender, reference)?;
            if let Some(answered) = m.correlation_id {
                let original: Option<(String, Option<String>, String)> = tx
                    .prepare_cached("SELECT sender, reference, recipients FROM message WHERE message_id = ?1")?
                    .query_row(params![answered], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()?;
                // Only an answer from a partner the original went to links the two cases: a
                // partner cannot attach itself to someone else's case by guessing a message id.
                if let Some((sender, Some(original_reference), recipients)) = original
                    && sender != m.sender
                    && recipients.split(',').any(|r| r == m.sender)
                {
                    let theirs = case_of(tx, &sender, &original_reference)?;
                    if theirs != case {
                        tx.prepare_cached("UPDATE case_reference SET case_id = ?1 WHERE case_id = ?2")?
                            .execute(params![theirs, case])?;
                        case = theirs;
                    }
                }
            }
            let mut references = Vec::with_capacity(m.recipients.len());
            {
                // The index on (case_id, partner, reference) yields the smallest reference first.
                // (An ORDER BY ... LIMIT here made SQLite prepare the statement again on every
                // call, a quarter of the pipeline's time.)
                let mut lookup = tx.prepare_cached(
                    "SELECT reference FROM case_reference WHERE case_id = ?1 AND partner = ?2",
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
                tx.prepare_cached(
                    "INSERT INTO person (partner, scheme, value, local, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (partner, scheme, value) DO UPDATE SET local = excluded.local, updated_at = excluded.updated_at",
                )?
                .execute(params![partner, scheme, value, local, now])?;
            }
            Ok(rows.len())
        })
    }

    fn prune(&self, age: Duration) -> Result<usize, StoreError> {
        let before = now_secs() - age.as_secs() as i64;
        self.write(|connection| {
            connection.execute(
                "DELETE FROM message WHERE recorded_at < ?1",
                params![before],
            )
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.lock().commit().map_err(|e| self.error(e))
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
}
