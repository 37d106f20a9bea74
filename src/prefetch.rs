//! Prefetch that follows the traffic. When `broker.max_in_flight` is too small for every flow
//! to have `broker.prefetch` (more than 25 partners at the defaults), the flows without a
//! prefetch of their own start with an equal share of what is left. A flow the broker holds back
//! (its unacknowledged messages reached its prefetch) takes up to as much again from what others
//! gave back, up to `broker.prefetch`, as soon as it is held back and then at most every
//! [`GROW_AGAIN_AFTER`]; each second, a flow that used at most a quarter of
//! its prefetch over the last [`QUIET_LOOKS`] seconds gives back what it did not use (keeping
//! twice its peak, and at least [`FLOOR`]). A flow that grew keeps its window for
//! [`KEEP_AFTER_GROWING`] seconds, so that a partner sending bursts does not restart its
//! consumer at every one. The total never exceeds `broker.max_in_flight`, so memory stays
//! bounded by count as before; a partner that sends most of the traffic gets the window it
//! needs without anyone setting a `prefetch` for it. A gateway that starts (or reconnects) on a
//! backlog gives those windows where the messages are ([`Pool::allot`]): a queue holding most
//! of them does not wait at an equal share until the others have drained and given theirs back.
//!
//! Prefetch counts messages, whatever their size. `broker.max_in_flight_bytes` bounds their
//! bytes too: each message of a flow's window may hold `bytes_per_message` on average, and a
//! flow whose recent messages are larger has fewer unacknowledged at once ([`Sizes`]). A
//! flow starts as if its messages were as large as `limits.max_message_bytes` allows, so
//! that a backlog of large messages waiting at start cannot take more either.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::partner::Partner;
use crate::settings::BrokerSettings;

/// How often a flow looks at what it used.
pub const EVERY: Duration = Duration::from_secs(1);

/// The least a flow keeps: a partner that sends a message now and then still has a few in
/// flight at once, and a burst doubles it each second from there.
pub const FLOOR: u16 = 4;

/// Over how many looks a flow's peak is taken when it may give back.
pub const QUIET_LOOKS: usize = 5;

/// How many looks a flow that grew keeps its window.
pub const KEEP_AFTER_GROWING: u32 = 30;

/// How soon a flow still held back grows again. Growing at the next look, once a second, a
/// sender whose traffic starts after a quiet spell waited up to six seconds for its window to
/// double from the floor to `broker.prefetch`, its messages queueing meanwhile (with a thousand
/// partners, close to a second of latency at 2,000 msg/s); by tenths of a second it takes
/// about 0.6 s. Each growth restarts the flow's consumer, and the tenth of a second lets the
/// larger window fill before it is judged too small.
pub const GROW_AGAIN_AFTER: Duration = Duration::from_millis(100);

/// The partners whose windows follow their traffic: with a `pool`, those without a
/// `prefetch` of their own. Their flows start with windows where their queues' backlog is.
pub fn following<'a>(partners: &[&'a Partner], pool: Option<&Pool>) -> Vec<&'a Partner> {
    match pool {
        Some(_) => (partners.iter().copied())
            .filter(|p| p.prefetch.is_none())
            .collect(),
        None => Vec::new(),
    }
}

/// The window each partner's flow starts with, by partner id: its own `prefetch`, or its share
/// of `broker.max_in_flight`; with a `pool`, each of the [`following`] partners, whose queues
/// hold `backlogs` (in that order), what [`Pool::allot`] gives it.
pub fn starting<'a>(
    broker: &BrokerSettings,
    partners: &[&'a Partner],
    pool: Option<&Pool>,
    backlogs: &[u32],
) -> HashMap<&'a str, u16> {
    let own: Vec<Option<u16>> = partners.iter().map(|p| p.prefetch).collect();
    let mut windows: HashMap<&str, u16> = (partners.iter().map(|p| p.id.as_str()))
        .zip(broker.prefetches(&own))
        .collect();
    if let Some(pool) = pool {
        let following = following(partners, Some(pool)).into_iter();
        windows.extend(following.map(|p| p.id.as_str()).zip(pool.allot(backlogs)));
    }
    windows
}

/// One flow's window: its prefetch, the pool it shares, and what it used over its last looks.
#[derive(Debug)]
pub struct Window {
    pool: Arc<Pool>,
    pub prefetch: u16,
    /// The most messages unacknowledged at once since the last look.
    most: usize,
    /// The same for each of the last [`QUIET_LOOKS`] looks.
    recent: [usize; QUIET_LOOKS],
    looks: u32,
    grew_at: Option<u32>,
    /// When it last grew because it was held back.
    held_at: Option<Instant>,
}

impl Window {
    pub fn new(pool: Arc<Pool>, prefetch: u16) -> Window {
        Window {
            pool,
            prefetch,
            most: 0,
            recent: [0; QUIET_LOOKS],
            looks: 0,
            grew_at: None,
            held_at: None,
        }
    }

    /// Notes that the flow has `unacknowledged` messages at once, `now`: the new prefetch when
    /// that is its whole window (the broker holds it back) and it may grow at once, rather than
    /// at its next look.
    pub fn saw(&mut self, unacknowledged: usize, now: Instant) -> Option<u16> {
        self.most = self.most.max(unacknowledged);
        let held = unacknowledged >= usize::from(self.prefetch);
        let lately = self
            .held_at
            .is_some_and(|at| now.saturating_duration_since(at) < GROW_AGAIN_AFTER);
        if !held || lately {
            return None;
        }
        // Without a peak the pool only grows a window or leaves it: a change is a growth.
        let grown = self.set(self.pool.next(self.prefetch, unacknowledged, None))?;
        self.held_at = Some(now);
        Some(grown)
    }

    /// Every [`EVERY`], with the flow's `unacknowledged` messages now: the new prefetch, when
    /// it changes.
    pub fn look(&mut self, unacknowledged: usize) -> Option<u16> {
        self.looks += 1;
        self.recent[self.looks as usize % QUIET_LOOKS] = self.most;
        let peak = self.recent.iter().copied().max().unwrap_or(0);
        let may_give_back = self
            .grew_at
            .is_none_or(|at| self.looks - at >= KEEP_AFTER_GROWING);
        let next = self
            .pool
            .next(self.prefetch, self.most, may_give_back.then_some(peak));
        self.most = unacknowledged;
        self.set(next)
    }

    /// Takes `next` as the prefetch: `Some` when it changes. A window that grows keeps its size
    /// for [`KEEP_AFTER_GROWING`] looks from this one.
    fn set(&mut self, next: u16) -> Option<u16> {
        if next > self.prefetch {
            self.grew_at = Some(self.looks);
        }
        (next != self.prefetch).then(|| {
            self.prefetch = next;
            next
        })
    }
}

/// The prefetch that keeps a window of `base` messages of up to `largest` bytes within `base ×
/// per_message` bytes: `base` when they fit, fewer when not, never below 1 (a message larger
/// than the whole allowance still goes through, alone).
pub fn within_bytes(base: u16, per_message: u64, largest: u64) -> u16 {
    if largest <= per_message {
        return base;
    }
    let fits = u64::from(base) * per_message / largest;
    u16::try_from(fits).unwrap_or(base).clamp(1, base)
}

/// The largest messages a flow received over its last [`QUIET_LOOKS`] looks, which cap its
/// window in bytes ([`within_bytes`]).
#[derive(Debug)]
pub struct Sizes {
    per_message: u64,
    /// The largest message since the last look.
    now: u64,
    recent: [u64; QUIET_LOOKS],
    looks: usize,
    /// What the cap is based on: at first `limits.max_message_bytes`, then what was received.
    largest: u64,
    /// While `largest` is still that assumption: how many messages were received.
    assumed_for: Option<u32>,
}

impl Sizes {
    /// Before any message, messages are taken to be `assumed` bytes large.
    pub fn new(per_message: u64, assumed: u64) -> Sizes {
        Sizes {
            per_message,
            now: 0,
            recent: [0; QUIET_LOOKS],
            looks: 0,
            largest: assumed,
            assumed_for: Some(0),
        }
    }

    /// The prefetch a window of `base` messages may have now.
    pub fn cap(&self, base: u16) -> u16 {
        within_bytes(base, self.per_message, self.largest)
    }

    /// Notes a message of `bytes` received by a window of `base` messages, now at `current`;
    /// the new prefetch when it changes at once rather than at the next look: smaller, when
    /// this message makes the window hold more than its share; larger, when it completes the
    /// first window's worth of messages and they are smaller than assumed.
    pub fn saw(&mut self, bytes: u64, base: u16, current: u16) -> Option<u16> {
        self.now = self.now.max(bytes);
        let first_window = match &mut self.assumed_for {
            Some(seen) => {
                *seen += 1;
                *seen >= u32::from(current)
            }
            None => false,
        };
        if bytes <= self.largest && !first_window {
            return None;
        }
        self.assumed_for = None;
        self.largest = self.now;
        self.change(base, current)
    }

    /// Every [`EVERY`]: the prefetch a window of `base` messages, now at `current`, should have
    /// when it changes. A flow that received nothing over its last looks keeps what it has.
    pub fn look(&mut self, base: u16, current: u16) -> Option<u16> {
        self.looks += 1;
        self.recent[self.looks % QUIET_LOOKS] = self.now;
        self.now = 0;
        let recent = self.recent.iter().copied().max().unwrap_or(0);
        if recent > 0 {
            self.largest = recent;
            self.assumed_for = None;
        }
        self.change(base, current)
    }

    /// The prefetch of a consumer at `current` whose window is now `base`, when it changes:
    /// the window shrinks to its cap, and grows only to `base` or by doubling (each change
    /// restarts the flow's consumer).
    pub fn change(&self, base: u16, current: u16) -> Option<u16> {
        let cap = self.cap(base);
        let change = cap < current || cap == base && cap > current || cap / 2 >= current;
        (change && cap != current).then_some(cap)
    }
}

/// `unacknowledged` messages of a consumer at `current`, counted in messages of its window of
/// `base`: a flow held to fewer messages by their size and held back by the broker counts as
/// held back at its whole window (and may take more of what others give back, which is also
/// more bytes), and one using half of its smaller prefetch as using half of its window.
pub fn in_window(unacknowledged: usize, base: u16, current: u16) -> usize {
    if current >= base {
        return unacknowledged;
    }
    (unacknowledged * usize::from(base)).div_ceil(usize::from(current.max(1)))
}

/// What the flows that share `broker.max_in_flight` have not taken.
#[derive(Debug)]
pub struct Pool {
    free: Mutex<u32>,
    /// Most a flow may have: `broker.prefetch`.
    cap: u16,
    /// Least a flow keeps: [`FLOOR`], or the starting share when that is smaller.
    floor: u16,
    /// What each flow starts with when no backlog says otherwise.
    share: u16,
}

impl Pool {
    /// A pool for `flows` flows that start at `share` each out of `total`; `None` when every
    /// flow starts at `cap` already (nothing to follow).
    pub fn new(total: u32, flows: usize, share: u16, cap: u16) -> Option<Pool> {
        if flows == 0 || share >= cap {
            return None;
        }
        let taken = u32::try_from(flows)
            .unwrap_or(u32::MAX)
            .saturating_mul(u32::from(share));
        Some(Pool {
            free: Mutex::new(total.saturating_sub(taken)),
            cap,
            floor: FLOOR.min(share),
            share,
        })
    }

    /// The prefetch a flow at `current` should have next, given the most messages it had
    /// unacknowledged at once over the last [`EVERY`] (`most`) and, when it may give back, over
    /// the last [`QUIET_LOOKS`] (`peak`); what it gives back or takes is counted.
    pub fn next(&self, current: u16, most: usize, peak: Option<usize>) -> u16 {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if most >= usize::from(current) {
            if current >= self.cap {
                return current;
            }
            let more = (current.saturating_mul(2).min(self.cap) - current)
                .min(u16::try_from(*free).unwrap_or(u16::MAX));
            *free -= u32::from(more);
            return current + more;
        }
        let Some(peak) = peak else {
            return current;
        };
        let keep = u16::try_from(peak.saturating_mul(2))
            .unwrap_or(u16::MAX)
            .max(self.floor);
        // Only by half or more: each change restarts the flow's consumer.
        if keep.saturating_mul(2) > current {
            return current;
        }
        *free += u32::from(current - keep);
        keep
    }

    /// Starting windows for the pool's flows, whose queues hold `backlogs` messages now: a gateway starting on a backlog (after an outage, say) gives
    /// the window where the messages are, rather than the same share to a queue of 30 as to
    /// one of 30,000, which held the large queue to `share` until the small ones had drained
    /// and given back. Each flow keeps the floor; what is above it goes to the flows with a
    /// backlog, in proportion to it, each up to its backlog and `cap`; what no backlog calls
    /// for stays in the pool for the first flows held back. With nothing queued anywhere,
    /// every flow starts at the equal share.
    pub fn allot(&self, backlogs: &[u32]) -> Vec<u16> {
        let share = self.share;
        let total_backlog: u64 = backlogs.iter().map(|b| u64::from(*b)).sum();
        if total_backlog == 0 {
            return vec![share; backlogs.len()];
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let flows = u32::try_from(backlogs.len()).unwrap_or(u32::MAX);
        let total = free.saturating_add(flows.saturating_mul(u32::from(share)));
        let floor = self.floor;
        let mut left = u64::from(total.saturating_sub(flows.saturating_mul(u32::from(floor))));
        let mut windows = vec![floor; backlogs.len()];
        // Room above the floor: no more than the backlog, nor than the cap.
        let room = |b: u32| u32::from(self.cap).min(b).saturating_sub(u32::from(floor));
        // Shared in proportion to the backlogs, the flows with the least room for their
        // backlog first: one that takes all its room leaves the rest to the others.
        let mut order: Vec<usize> = (0..backlogs.len()).filter(|&i| backlogs[i] > 0).collect();
        order.sort_by(|&a, &b| {
            let (ra, rb) = (u64::from(room(backlogs[a])), u64::from(room(backlogs[b])));
            (ra * u64::from(backlogs[b])).cmp(&(rb * u64::from(backlogs[a])))
        });
        let mut remaining = total_backlog;
        for i in order {
            let backlog = u64::from(backlogs[i]);
            let more = (left * backlog / remaining).min(u64::from(room(backlogs[i])));
            windows[i] += more as u16;
            left -= more;
            remaining -= backlog;
        }
        let given: u32 = windows.iter().map(|w| u32::from(*w)).sum();
        *free = total.saturating_sub(given);
        windows
    }

    #[cfg(test)]
    fn free(&self) -> u32 {
        *self.free.lock().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_to_follow_when_every_flow_has_the_full_prefetch() {
        assert!(Pool::new(10_000, 4, 200, 200).is_none());
        assert!(Pool::new(10_000, 0, 10, 200).is_none());
    }

    #[test]
    fn idle_flows_give_back_and_a_busy_one_takes_up_to_the_cap() {
        // A thousand partners: 10 each, nothing left over.
        let pool = Pool::new(10_000, 1_000, 10, 200).unwrap();
        assert_eq!(pool.free(), 0);
        // Held back, and nothing free: stays.
        assert_eq!(pool.next(10, 10, Some(10)), 10);
        // Two idle flows (one message at a time at most) keep twice their peak, at least 4.
        assert_eq!(pool.next(10, 1, Some(1)), 4);
        assert_eq!(pool.next(10, 0, Some(0)), 4);
        assert_eq!(pool.free(), 12);
        // The busy one doubles, as far as what was given back goes.
        assert_eq!(pool.next(10, 10, Some(10)), 20);
        assert_eq!(pool.free(), 2);
        assert_eq!(pool.next(20, 20, Some(20)), 22);
        assert_eq!(pool.free(), 0);
    }

    #[test]
    fn a_gateway_starting_on_a_backlog_gives_the_window_where_the_messages_are() {
        // A thousand partners at 10 each; the institute's queue holds 24,000 messages, each
        // employment centre's 36 (the benchmark's drain), the last one's none.
        let pool = Pool::new(10_000, 1_000, 10, 200).unwrap();
        let mut backlogs = vec![36; 1_000];
        backlogs[0] = 24_000;
        backlogs[999] = 0;
        let windows = pool.allot(&backlogs);
        assert_eq!(windows[0], 200, "the institute gets the cap at once");
        // The rest in proportion: 5.8 above the floor each, rounded down or up.
        assert!(
            windows[1..999].iter().all(|w| (9..=10).contains(w)),
            "{:?}",
            &windows[1..4]
        );
        assert_eq!(windows[999], 4, "an empty queue keeps the floor");
        let given: u32 = windows.iter().map(|w| u32::from(*w)).sum();
        assert_eq!(
            given, 10_000,
            "the bound holds, all of it given to the backlogs"
        );
        assert_eq!(pool.free(), 0);
    }

    #[test]
    fn small_backlogs_get_no_more_than_they_hold() {
        let pool = Pool::new(1_000, 10, 50, 200).unwrap();
        let windows = pool.allot(&[3, 0, 120, 1_000, 0, 0, 0, 0, 0, 0]);
        assert_eq!(windows, [4, 4, 120, 200, 4, 4, 4, 4, 4, 4]);
        assert_eq!(pool.free(), 1_000 - 352);
        // Nothing queued anywhere: the equal shares, the pool as it was.
        let pool = Pool::new(1_000, 10, 50, 200).unwrap();
        assert_eq!(pool.allot(&[0; 10]), [50; 10]);
        assert_eq!(pool.free(), 500);
    }

    #[test]
    fn backlogs_larger_than_the_pool_share_it_and_never_more() {
        // A hundred thousand partners at one message each: the floor is the share.
        let pool = Pool::new(10_000, 100_000, 1, 200).unwrap();
        let windows = pool.allot(&vec![5; 100_000]);
        assert!(windows.iter().all(|w| *w == 1));
        // Twenty flows of 1,000 queued each share 1,000: 50 each, nothing left.
        let pool = Pool::new(1_000, 20, 50, 200).unwrap();
        let windows = pool.allot(&[1_000; 20]);
        assert_eq!(windows, [50; 20]);
        assert_eq!(pool.free(), 0);
    }

    #[test]
    fn a_flow_grows_no_further_than_the_cap() {
        let pool = Pool::new(1_000, 10, 50, 200).unwrap();
        for _ in 0..9 {
            assert_eq!(pool.next(50, 0, Some(0)), 4);
        }
        assert_eq!(pool.next(50, 50, Some(50)), 100);
        assert_eq!(pool.next(100, 100, Some(100)), 200);
        assert_eq!(pool.next(200, 200, Some(200)), 200);
        assert_eq!(pool.free(), 1_000 - 9 * 4 - 200);
    }

    #[test]
    fn a_flow_shrinks_only_by_half_or_more() {
        let pool = Pool::new(1_000, 10, 50, 200).unwrap();
        assert_eq!(
            pool.next(50, 13, Some(13)),
            50,
            "keeping 26 of 50 is not worth a restart"
        );
        assert_eq!(pool.next(50, 12, Some(12)), 24);
        assert_eq!(pool.free(), 500 + 26);
        // Never below the starting share's floor.
        let small = Pool::new(100, 50, 2, 200).unwrap();
        assert_eq!(small.next(2, 0, Some(0)), 2);
    }

    #[test]
    fn a_flow_gives_back_what_it_did_not_use_over_five_seconds() {
        let pool = Arc::new(Pool::new(1_000, 10, 50, 200).unwrap());
        let mut window = Window::new(pool.clone(), 50);
        let now = Instant::now();
        // Its first second: 12 at most; it keeps 24.
        assert_eq!(window.saw(12, now), None);
        assert_eq!(window.look(0), Some(24));
        assert_eq!(window.look(0), None);
        // A burst of 12 keeps the window for five seconds...
        window.saw(12, now);
        for look in 3..8 {
            assert_eq!(window.look(0), None, "look {look}");
        }
        // ...then it gives back down to the floor.
        assert_eq!(window.look(0), Some(4));
        assert_eq!(pool.free(), 500 + 46);
    }

    #[test]
    fn a_flow_that_grew_keeps_its_window_for_thirty_seconds() {
        let pool = Arc::new(Pool::new(1_000, 10, 50, 200).unwrap());
        let mut window = Window::new(pool.clone(), 50);
        let now = Instant::now();
        // Held back: it doubles.
        assert_eq!(window.saw(50, now), Some(100));
        // Bursts of 20 for a while, then quiet: no restart for thirty seconds (looks).
        for look in 1..30 {
            if look % 3 == 0 && look < 20 {
                assert_eq!(window.saw(20, now), None);
            }
            assert_eq!(window.look(0), None, "look {look}");
        }
        assert_eq!(window.look(0), Some(4));
    }

    #[test]
    fn a_flow_held_back_grows_at_once_and_again_each_tenth_of_a_second_it_still_is() {
        let pool = Arc::new(Pool::new(1_000, 10, 50, 200).unwrap());
        let mut window = Window::new(pool.clone(), 50);
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        // Short of its window: the broker still hands it messages.
        assert_eq!(window.saw(49, at(0)), None);
        // Its whole window unacknowledged: it doubles there and then, not at its next look.
        assert_eq!(window.saw(50, at(0)), Some(100));
        assert_eq!(window.prefetch, 100);
        // Held back again before the larger window had time to fill: it waits...
        assert_eq!(window.saw(100, at(99)), None);
        assert_eq!(window.prefetch, 100);
        // ...a tenth of a second, then doubles again, up to the cap.
        assert_eq!(window.saw(100, at(100)), Some(200));
        assert_eq!(window.saw(200, at(300)), None);
        assert_eq!(pool.free(), 500 - 150);
        // The next look changes nothing: the window grew within it.
        assert_eq!(window.look(200), None);
    }

    #[test]
    fn a_flow_held_back_takes_only_what_others_gave_back() {
        // A thousand partners at 10 each, nothing left over.
        let pool = Arc::new(Pool::new(10_000, 1_000, 10, 200).unwrap());
        let mut busy = Window::new(pool.clone(), 10);
        let start = Instant::now();
        assert_eq!(busy.saw(10, start), None);
        assert_eq!(busy.prefetch, 10);
        // An idle flow gives back 6 at its look; the busy one takes them at its next message.
        let mut idle = Window::new(pool.clone(), 10);
        for _ in 0..QUIET_LOOKS {
            idle.look(0);
        }
        assert_eq!(idle.prefetch, 4);
        assert_eq!(busy.saw(10, start + Duration::from_millis(1)), Some(16));
        assert_eq!(pool.free(), 0);
    }

    const KIB: u64 = 1024;

    #[test]
    fn large_messages_get_fewer_at_once_and_small_ones_the_whole_window() {
        // 164 KiB a message on average (128 MiB over four windows of 200).
        assert_eq!(within_bytes(200, 164 * KIB, 2 * KIB), 200);
        assert_eq!(within_bytes(200, 164 * KIB, 164 * KIB), 200);
        assert_eq!(within_bytes(200, 164 * KIB, 410 * KIB), 80);
        assert_eq!(within_bytes(200, 164 * KIB, 1024 * KIB), 32);
        // Larger than the whole window's bytes: still one at a time.
        assert_eq!(within_bytes(200, 164 * KIB, 64 * 1024 * KIB), 1);
        assert_eq!(within_bytes(1, 1, u64::MAX), 1);
    }

    #[test]
    fn a_flow_starts_as_if_its_messages_were_as_large_as_allowed_and_grows_once_they_are_not() {
        let mut sizes = Sizes::new(164 * KIB, 1024 * KIB);
        assert_eq!(sizes.cap(200), 32);
        // Small messages: the whole window once the first 32 are in.
        for _ in 1..32 {
            assert_eq!(sizes.saw(2 * KIB, 200, 32), None);
        }
        assert_eq!(sizes.saw(2 * KIB, 200, 32), Some(200));
        // Nothing received: the window stays as it is.
        for _ in 0..10 {
            assert_eq!(sizes.look(200, 200), None);
        }
        // A first message larger than allowed (received whole before it is refused): fewer at
        // once, at once.
        let mut sizes = Sizes::new(164 * KIB, 1024 * KIB);
        assert_eq!(sizes.saw(2048 * KIB, 200, 32), Some(16));
    }

    #[test]
    fn a_larger_message_shrinks_the_window_at_once_and_it_grows_back_after_five_quiet_looks() {
        let mut sizes = Sizes::new(164 * KIB, 1024 * KIB);
        // Fewer small messages than a window's worth: the whole window at the next look.
        sizes.saw(2 * KIB, 200, 32);
        assert_eq!(sizes.look(200, 32), Some(200));
        // A 410 KiB referral: 80 at once, not at the next look but now.
        assert_eq!(sizes.saw(410 * KIB, 200, 200), Some(80));
        // Another as large changes nothing.
        assert_eq!(sizes.saw(410 * KIB, 200, 80), None);
        // Small messages again: the large one counts for the five looks that include it...
        for look in 0..5 {
            sizes.saw(2 * KIB, 200, 80);
            assert_eq!(sizes.look(200, 80), None, "look {look}");
        }
        // ...then the window is whole again.
        sizes.saw(2 * KIB, 200, 80);
        assert_eq!(sizes.look(200, 80), Some(200));
    }

    #[test]
    fn the_window_grows_back_only_by_doubling_or_to_its_whole_base() {
        let mut sizes = Sizes::new(100 * KIB, 1024 * KIB);
        assert_eq!(sizes.cap(200), 19);
        // 19 → 25 is not worth a restart...
        sizes.saw(800 * KIB, 200, 19);
        assert_eq!(sizes.look(200, 19), None);
        // ...19 → 50 is.
        for _ in 0..4 {
            sizes.saw(400 * KIB, 200, 19);
            assert_eq!(sizes.look(200, 19), None);
        }
        sizes.saw(400 * KIB, 200, 19);
        assert_eq!(sizes.look(200, 19), Some(50));
        for _ in 0..5 {
            sizes.saw(300 * KIB, 200, 50);
            assert_eq!(sizes.look(200, 50), None, "66 is not worth a restart");
        }
        // A smaller base (the window gave back what it did not use) lowers the cap with it.
        assert_eq!(sizes.look(100, 50), Some(33));
    }

    #[test]
    fn a_window_held_below_its_share_by_size_counts_in_messages_of_its_share() {
        // Not held below: as it is.
        assert_eq!(in_window(7, 10, 10), 7);
        // Four 1 MiB messages of a window of ten: held back, as if ten.
        assert_eq!(in_window(4, 10, 4), 10);
        // Using half of its four: half of its ten.
        assert_eq!(in_window(2, 10, 4), 5);
        // So the pool grows it (more messages, and more bytes) rather than taking its share.
        let pool = Pool::new(1_000, 10, 50, 200).unwrap();
        assert_eq!(pool.next(50, in_window(4, 50, 4), Some(4)), 100);
    }
}
