//! The threads that run the partners' flows: each a runtime of one thread, and each group of
//! partners — its two connections (lapin's I/O loops are tasks) and its flows — on one of them.
//!
//! On one runtime of several workers, a message was taken from the socket on one worker, handled
//! on whichever worker its flow's task ran next, and settled on whichever ran the confirm that
//! woke it: its blocks were allocated on one thread and freed on another, each free an atomic
//! exchange on a page the freeing thread does not own, and each such block walked again, cold,
//! when its own thread took it back. Draining on two cores shared with the broker, one worker
//! spent some 8% less CPU per message than two at the same rate, most of the difference in
//! those frees and in switches between the workers (docs/performance.md, "A group's flows on
//! one thread"). A shard keeps all of a group's tasks on one thread; the groups, at least one
//! per shard where there are partners enough, spread over the shards and so over the cores.
//!
//! What a shard gives up: a task that blocks its thread holds back the other flows of its shard
//! (on the runtime's workers, `block_in_place` let them move to another worker). The store and
//! the delivery log make a flow wait only when their writers are thousands of records behind.

use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The name of every shard's thread, numbered from 0: `ponte-flows-0`, … (what `ponte-bench`
/// counts as the flows' CPU).
pub const THREAD: &str = "ponte-flows";

/// How long a shard, told to stop, waits for what its blocking threads still run (a connection
/// attempt) before it leaves them.
const STOP_WITHIN: Duration = Duration::from_secs(1);

/// Started with the gateway, stopped when dropped.
#[derive(Debug)]
pub struct Shards {
    handles: Vec<Handle>,
    stop: CancellationToken,
}

impl Shards {
    /// `count` threads (one per core if 0), each running a runtime of its own until dropped.
    pub fn start(count: usize) -> std::io::Result<Shards> {
        let count = match count {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(count);
        for i in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("{THREAD}-{i}"))
                .spawn(move || {
                    runtime.block_on(stop.cancelled());
                    runtime.shutdown_timeout(STOP_WITHIN);
                })?;
        }
        Ok(Shards { handles, stop })
    }

    /// How many threads run the flows (never none).
    pub fn threads(&self) -> usize {
        self.handles.len()
    }

    /// The shard of group `group`: groups go round the shards.
    pub fn of_group(&self, group: usize) -> &Handle {
        &self.handles[group % self.handles.len()]
    }

    /// Partners per group: as many as share one pair of connections (`most`), but no more than
    /// spreads `partners` over every shard.
    pub fn group_size(&self, partners: usize, most: usize) -> usize {
        partners.div_ceil(self.handles.len()).clamp(1, most.max(1))
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_spread_over_every_shard_up_to_a_connection_s_share() {
        let shards = Shards::start(2).unwrap();
        assert_eq!(shards.threads(), 2);
        // Four partners: two groups of two, one on each thread.
        assert_eq!(shards.group_size(4, 64), 2);
        assert_eq!(shards.group_size(1, 64), 1);
        assert_eq!(shards.group_size(0, 64), 1);
        // A thousand: groups of 64 at most, going round the two.
        assert_eq!(shards.group_size(1000, 64), 64);
        let thread = |group: usize| {
            let (tx, rx) = std::sync::mpsc::channel();
            shards.of_group(group).spawn(async move {
                tx.send(std::thread::current().name().map(String::from))
                    .unwrap();
            });
            rx.recv_timeout(Duration::from_secs(5)).unwrap()
        };
        assert_eq!(thread(0).as_deref(), Some("ponte-flows-0"));
        assert_eq!(thread(1).as_deref(), Some("ponte-flows-1"));
        assert_eq!(thread(2).as_deref(), Some("ponte-flows-0"));
    }

    #[test]
    fn a_shard_s_thread_ends_when_the_shards_are_dropped() {
        let shards = Shards::start(1).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // A task that never ends holds its sender until its runtime goes.
        shards.of_group(0).spawn(async move {
            let _held = tx;
            std::future::pending::<()>().await
        });
        drop(shards);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
    }
}
