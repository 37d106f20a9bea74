//! Prefetch that follows the traffic. When `broker.max_in_flight` is too small for every flow
//! to have `broker.prefetch` (more than 50 partners at the defaults), the flows without a
//! prefetch of their own start with an equal share of what is left. Each second, a flow the
//! broker held back (its unacknowledged messages reached its prefetch) takes up to as much again
//! from what others gave back, up to `broker.prefetch`; a flow that used at most a quarter of
//! its prefetch over the last [`QUIET_LOOKS`] seconds gives back what it did not use (keeping
//! twice its peak, and at least [`FLOOR`]). A flow that grew keeps its window for
//! [`KEEP_AFTER_GROWING`] seconds, so that a partner sending bursts does not restart its
//! consumer at every one. The total never exceeds `broker.max_in_flight`, so memory stays
//! bounded by count as before; a partner that sends most of the traffic gets the window it
//! needs without anyone setting a `prefetch` for it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a flow looks at what it used.
pub const EVERY: Duration = Duration::from_secs(1);

/// The least a flow keeps: a partner that sends a message now and then still has a few in
/// flight at once, and a burst doubles it each second from there.
pub const FLOOR: u16 = 4;

/// Over how many looks a flow's peak is taken when it may give back.
pub const QUIET_LOOKS: usize = 5;

/// How many looks a flow that grew keeps its window.
pub const KEEP_AFTER_GROWING: u32 = 30;

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
        }
    }

    /// Notes that the flow has `unacknowledged` messages at once.
    pub fn saw(&mut self, unacknowledged: usize) {
        self.most = self.most.max(unacknowledged);
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
        if next > self.prefetch {
            self.grew_at = Some(self.looks);
        }
        (next != self.prefetch).then(|| {
            self.prefetch = next;
            next
        })
    }
}

/// What the flows that share `broker.max_in_flight` have not taken.
#[derive(Debug)]
pub struct Pool {
    free: Mutex<u32>,
    /// Most a flow may have: `broker.prefetch`.
    cap: u16,
    /// Least a flow keeps: [`FLOOR`], or the starting share when that is smaller.
    floor: u16,
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
        // Its first second: 12 at most; it keeps 24.
        window.saw(12);
        assert_eq!(window.look(0), Some(24));
        assert_eq!(window.look(0), None);
        // A burst of 12 keeps the window for five seconds...
        window.saw(12);
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
        // Held back: it doubles.
        window.saw(50);
        assert_eq!(window.look(0), Some(100));
        // Bursts of 20 for a while, then quiet: no restart for thirty seconds.
        for look in 2..31 {
            if look % 3 == 0 && look < 20 {
                window.saw(20);
            }
            assert_eq!(window.look(0), None, "look {look}");
        }
        assert_eq!(window.look(0), Some(4));
    }
}
