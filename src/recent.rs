//! Recent deliveries: which message ids may have been delivered within the duplicate window,
//! held in memory so that checking a new message for a duplicate needs no read of the store.
//!
//! Every message is checked, and nearly every one is new. In the store, the check is a look-up
//! in an index keyed by the message id's random bits: with a year of history, a page of that
//! index that is rarely in the cache. A Bloom filter answers "certainly not delivered" for
//! nearly all new ids; only a "maybe" (a duplicate, or a false positive, about 1 in 6,000 with
//! a million deliveries a week) is looked up in the store, which has the final word.
//!
//! A Bloom filter cannot forget, so deliveries go into generations: the current one, and the
//! one before. A generation becomes the previous one after a window, and is dropped a window
//! later, so an id stays at least a window after it was added. The filter stays the same size
//! (at most two generations of [`BITS`]) whatever the traffic; with more deliveries per window
//! than it was sized for, more answers are "maybe", never a wrong "no".
//!
//! At start, the filter knows nothing yet: the ids delivered within the window are read from
//! the store by a thread of its own, while every look-up goes to the store. Ids delivered from
//! the start on are added as they are handed to the store's writer, so nothing falls between
//! the two.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use fastbloom::AtomicBloomFilter;

/// Bits per generation: 4 MiB.
const BITS: usize = 1 << 25;
/// Bits set per id.
const HASHES: u32 = 4;
/// Records read at a time at start.
const LOAD_STEP: usize = 50_000;

/// The ids delivered lately (their store keys), in generations of one window.
#[derive(Debug)]
pub struct Recent {
    /// The window, in seconds, that the filter answers for; set by [`Recent::begin`], which
    /// also starts loading. A look-up with another window goes to the store.
    window: Option<i64>,
    /// Whether the ids delivered before start are in.
    loaded: Arc<AtomicBool>,
    current: Arc<AtomicBloomFilter>,
    previous: Option<Arc<AtomicBloomFilter>>,
    /// When the current generation began, in seconds since the epoch.
    since: i64,
}

impl Recent {
    pub fn new(now: i64) -> Recent {
        Recent {
            window: None,
            loaded: Arc::new(AtomicBool::new(false)),
            current: Arc::new(generation()),
            previous: None,
            since: now,
        }
    }

    /// Notes that `key` is being delivered.
    pub fn add(&mut self, key: i64, now: i64) {
        self.turn(now);
        self.current.insert(&key);
    }

    /// Sets the window the filter answers for, and starts reading the ids delivered within it
    /// from the store at `path`; until they are in, every answer is "maybe" (and without this,
    /// always). Only the first call counts.
    pub fn begin(&mut self, window: i64, now: i64, path: &Path) {
        if self.window.is_none() {
            self.window = Some(window);
            self.load(path, now - window);
        }
    }

    /// Whether `key` may have been delivered within `window` seconds: `false` is certain,
    /// `true` asks the store.
    pub fn may_hold(&mut self, key: i64, window: i64, now: i64) -> bool {
        if self.window != Some(window) || !self.loaded.load(Ordering::Acquire) {
            return true;
        }
        if !self.loaded.load(Ordering::Acquire) {
            return true;
        }
        self.turn(now);
        self.current.contains(&key) || self.previous.as_ref().is_some_and(|p| p.contains(&key))
    }

    /// Starts a new generation once the current one is a window old; the one before is
    /// dropped. An id added at `t` is in the current generation until the next turn (at or
    /// after `t`), then in the previous one until the turn after, at least a window later.
    fn turn(&mut self, now: i64) {
        let Some(window) = self.window else { return };
        if now >= self.since + window {
            let next = Arc::new(generation());
            self.previous = Some(std::mem::replace(&mut self.current, next));
            self.since = now;
        }
    }

    /// Reads the keys of the messages delivered since `since` into the current generation, on
    /// a thread of its own. A generation turned meanwhile keeps them a window longer than
    /// they need: they were delivered before the load began. On failure the filter stays
    /// unloaded and every look-up goes to the store.
    fn load(&self, path: &Path, since: i64) {
        fill_in_background(
            "ponte-recent",
            "recent deliveries",
            path,
            self.current.clone(),
            self.loaded.clone(),
            move |path, into| read_keys(path, since, into),
        );
    }

    /// Whether the ids delivered before start are in (tests wait for it).
    #[cfg(test)]
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }
}

/// Fills `into` from the store at `path` with `read`, on a thread named `thread`, and sets
/// `loaded` once every record is in. On failure, or when the thread cannot start, `loaded` stays
/// unset: the filter answers "maybe" and every look-up it stands in front of reads the store.
/// `what` names the records in the log.
pub(crate) fn fill_in_background(
    thread: &str,
    what: &'static str,
    path: &Path,
    into: Arc<AtomicBloomFilter>,
    loaded: Arc<AtomicBool>,
    read: impl FnOnce(&Path, &AtomicBloomFilter) -> rusqlite::Result<usize> + Send + 'static,
) {
    let path = path.to_owned();
    let spawned = std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || {
            let began = Instant::now();
            match read(&path, &into) {
                Ok(count) => {
                    loaded.store(true, Ordering::Release);
                    tracing::info!(store = %path.display(), records = count, secs = began.elapsed().as_secs_f64(), "{what} loaded");
                }
                Err(error) => {
                    tracing::warn!(store = %path.display(), %error, "cannot load {what}; every look-up of them reads the store")
                }
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start loading {what}; every look-up of them reads the store");
    }
}

fn generation() -> AtomicBloomFilter {
    AtomicBloomFilter::with_num_bits(BITS).hashes(HASHES)
}

/// Reads the table in ranges of [`LOAD_STEP`] records, each its own short read: one read over
/// millions of records would keep the store's checkpoints from finishing meanwhile. A record
/// added after the first read was delivered, if at all, after the start: it is in already.
fn read_keys(path: &Path, since: i64, into: &AtomicBloomFilter) -> rusqlite::Result<usize> {
    let connection = rusqlite::Connection::open(path)?;
    connection.execute_batch("PRAGMA busy_timeout = 5000;")?;
    let (first, last): (i64, i64) = connection.query_row(
        "SELECT coalesce(min(seq), 1), coalesce(max(seq), 0) FROM message",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut statement = connection
        .prepare("SELECT key FROM message WHERE seq >= ?1 AND seq < ?2 AND delivered_at >= ?3")?;
    let mut count = 0;
    for from in (first..=last).step_by(LOAD_STEP) {
        let mut rows = statement.query(rusqlite::params![from, from + LOAD_STEP as i64, since])?;
        while let Some(row) = rows.next()? {
            into.insert(&row.get::<_, i64>(0)?);
            count += 1;
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEEK: i64 = 7 * 24 * 3600;

    /// A filter whose window is set and whose load found nothing (an empty store).
    fn loaded(now: i64) -> Recent {
        let mut recent = Recent::new(now);
        recent.window = Some(WEEK);
        recent.loaded.store(true, Ordering::Release);
        recent
    }

    #[test]
    fn an_id_is_held_for_at_least_a_window_and_dropped_within_two() {
        let start = 1_000_000;
        let mut recent = loaded(start);
        // Added late in the first generation, looked at now and then.
        let at = start + WEEK - 10;
        recent.add(42, at);
        for now in [at, start + WEEK, at + WEEK / 2, at + WEEK - 1] {
            assert!(recent.may_hold(42, WEEK, now), "at {now}");
        }
        // Two turns later, its generation is gone.
        assert!(!recent.may_hold(42, WEEK, start + 3 * WEEK));
        assert!(!recent.may_hold(7, WEEK, start + 3 * WEEK));
    }

    #[test]
    fn ids_never_added_are_answered_no() {
        let mut recent = loaded(0);
        for key in 0..100_000 {
            recent.add(key, 0);
        }
        let maybe = (100_000..200_000)
            .filter(|key| recent.may_hold(*key, WEEK, 1))
            .count();
        assert!(maybe < 10, "{maybe} false positives in 100,000");
        assert!((0..100_000).all(|key| recent.may_hold(key, WEEK, 1)));
    }

    #[test]
    fn loading_reads_every_delivery_within_the_window_across_its_steps() {
        let path = std::env::temp_dir().join(format!("ponte-recent-{}.db", uuid::Uuid::new_v4()));
        let mut db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch("CREATE TABLE message (seq INTEGER PRIMARY KEY, key INTEGER NOT NULL, delivered_at INTEGER)")
            .unwrap();
        // Keys 0.. by seq 1..; every third delivered within the window, the others long ago
        // or never; more than two steps' worth, with the first seqs pruned.
        let rows = 2 * LOAD_STEP as i64 + 7;
        let tx = db.transaction().unwrap();
        for key in 0..rows {
            let delivered = match key % 3 {
                0 => Some(1_000),
                1 => Some(10),
                _ => None,
            };
            tx.execute(
                "INSERT INTO message (seq, key, delivered_at) VALUES (?1, ?2, ?3)",
                rusqlite::params![key + 1, key, delivered],
            )
            .unwrap();
        }
        tx.execute("DELETE FROM message WHERE seq < 5", []).unwrap();
        tx.commit().unwrap();

        let into = generation();
        let count = read_keys(&path, 500, &into).unwrap();
        let expected: Vec<i64> = (4..rows).filter(|k| k % 3 == 0).collect();
        assert_eq!(count, expected.len());
        assert!(expected.iter().all(|k| into.contains(k)));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn until_loaded_or_for_another_window_every_answer_is_maybe() {
        let mut recent = Recent::new(0);
        recent.window = Some(WEEK);
        assert!(recent.may_hold(1, WEEK, 0));
        recent.loaded.store(true, Ordering::Release);
        assert!(!recent.may_hold(1, WEEK, 0));
        assert!(recent.may_hold(1, 2 * WEEK, 0));
    }
}
