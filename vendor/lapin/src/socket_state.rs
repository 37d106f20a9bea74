use crate::Result;
use atomic_waker::AtomicWaker;
use std::{
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    task::{Poll, Wake, Waker},
};
use tracing::trace;

pub(crate) struct SocketState {
    readable: bool,
    writable: bool,
    handle: SocketStateHandle,
}

impl Default for SocketState {
    fn default() -> Self {
        Self {
            readable: true,
            writable: true,
            handle: SocketStateHandle {
                events: Arc::new(Events::default()),
            },
        }
    }
}

#[derive(Clone)]
pub(crate) struct SocketStateHandle {
    events: Arc<Events>,
}

/// The socket events sent since the I/O loop last took them, one bit each, and the loop's
/// waker (Ponte's change: a `flume` channel carried one message per event, each sent under the
/// channel's lock; the loop only ever needs to know which kinds came).
#[derive(Default)]
struct Events {
    sent: AtomicU8,
    waker: AtomicWaker,
}

impl Events {
    fn send(&self, event: SocketEvent) {
        self.sent.fetch_or(event.bit(), Ordering::AcqRel);
        self.waker.wake();
    }

    fn take(&self) -> u8 {
        self.sent.swap(0, Ordering::AcqRel)
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum SocketEvent {
    Readable,
    Writable,
    Wake,
}

impl SocketEvent {
    fn bit(self) -> u8 {
        match self {
            SocketEvent::Readable => 1,
            SocketEvent::Writable => 2,
            SocketEvent::Wake => 4,
        }
    }
}

pub(crate) struct SocketStateWaker {
    handle: SocketStateHandle,
    event: SocketEvent,
}

impl SocketState {
    pub(crate) fn readable(&mut self) -> bool {
        self.readable
    }

    pub(crate) fn writable(&mut self) -> bool {
        self.writable
    }

    /// Waits until an event is sent, and takes every event sent so far.
    pub(crate) async fn wait(&mut self) {
        let events = &self.handle.events;
        let sent = std::future::poll_fn(|cx| {
            // Registered before the look: an event sent after it wakes this task.
            events.waker.register(cx.waker());
            match events.take() {
                0 => Poll::Pending,
                sent => Poll::Ready(sent),
            }
        })
        .await;
        self.handle_events(sent);
    }

    pub(crate) fn reset(&mut self) {
        self.readable = true;
        self.writable = true;
    }

    pub(crate) fn handle(&self) -> SocketStateHandle {
        self.handle.clone()
    }

    pub(crate) fn handle_read_poll(&mut self, poll: Poll<usize>) -> Option<usize> {
        match poll {
            Poll::Ready(sz) => Some(sz),
            Poll::Pending => {
                self.readable = false;
                None
            }
        }
    }

    pub(crate) fn handle_write_poll<T>(&mut self, poll: Poll<T>) -> Option<T> {
        match poll {
            Poll::Ready(sz) => Some(sz),
            Poll::Pending => {
                self.writable = false;
                None
            }
        }
    }

    pub(crate) fn handle_io_result(&mut self, result: Result<()>) -> Result<()> {
        if let Err(err) = result {
            if err.interrupted() {
                self.handle.wake();
            } else if err.wouldblock() {
                // ignore, let the reactor handle that
            } else {
                if err.is_io_error() {
                    self.readable = false;
                    self.writable = false;
                }
                return Err(err);
            }
        }
        Ok(())
    }

    pub(crate) fn poll_events(&mut self) {
        let sent = self.handle.events.take();
        self.handle_events(sent);
    }

    /// Takes in the events of `sent` (bits of [`SocketEvent::bit`]); a wake alone changes
    /// nothing but ends a wait.
    fn handle_events(&mut self, sent: u8) {
        if sent == 0 {
            return;
        }
        trace!(sent, "Got events for socket");
        if sent & SocketEvent::Readable.bit() != 0 {
            self.readable = true;
        }
        if sent & SocketEvent::Writable.bit() != 0 {
            self.writable = true;
        }
    }

    pub(crate) fn readable_waker(&self) -> Waker {
        self.waker(SocketEvent::Readable)
    }

    pub(crate) fn writable_waker(&self) -> Waker {
        self.waker(SocketEvent::Writable)
    }

    fn waker(&self, event: SocketEvent) -> Waker {
        let handle = self.handle();
        let waker = SocketStateWaker { handle, event };
        Waker::from(Arc::new(waker))
    }
}

impl SocketStateHandle {
    pub(crate) fn send(&self, event: SocketEvent) {
        self.events.send(event);
    }

    pub(crate) fn wake(&self) {
        self.send(SocketEvent::Wake);
    }
}

impl Wake for SocketStateWaker {
    fn wake(self: Arc<Self>) {
        self.handle.send(self.event)
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.handle.send(self.event)
    }
}
