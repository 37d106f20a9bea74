use event_listener::{Event, EventListener};
use std::{
    fmt,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

/// Shared wakeup primitive used by [`crate::notifier::Notifier`] and
/// [`crate::consumer::Consumer`].
///
/// All clones share the same [`Event`] so any [`notify`] call wakes every
/// concurrent poller.  Each clone owns its own pending [`EventListener`] slot
/// so individual tasks can register independently.
///
/// A poller waits with [`poll_until`], which looks for what it waits for before
/// it registers a listener (Ponte's change: a listener is an allocation and two
/// changes of the event's list, for nothing when what is waited for is there),
/// and once more after, so that a [`notify`] in between is not missed.
///
/// [`poll_until`]: Self::poll_until
/// [`notify`]: Self::notify
#[derive(Default)]
pub(crate) struct Listener {
    event: Arc<Event>,
    pending: Option<Pin<Box<EventListener>>>,
}

impl Listener {
    /// `Ready` with what `check` finds, once it finds something; `Pending`, with the task's
    /// waker registered, while it finds nothing. `check` must find whatever was made ready
    /// before the [`notify`](Self::notify) that announced it.
    pub(crate) fn poll_until<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut check: impl FnMut() -> Option<T>,
    ) -> Poll<T> {
        loop {
            if let Some(found) = check() {
                self.pending = None;
                return Poll::Ready(found);
            }
            match &mut self.pending {
                // Listen, then look again before waiting.
                None => self.pending = Some(Box::pin(self.event.listen())),
                Some(listener) => match listener.as_mut().poll(cx) {
                    // Notified since it listened: look again (and listen anew if need be).
                    Poll::Ready(()) => self.pending = None,
                    Poll::Pending => return Poll::Pending,
                },
            }
        }
    }

    /// Wake all clones that have a pending listener registered.
    pub(crate) fn notify(&self) {
        self.event.notify(usize::MAX);
    }
}

impl Clone for Listener {
    /// Produce a clone that shares the same [`Event`] but starts with no
    /// pending listener so each task registers its own waker independently.
    fn clone(&self) -> Self {
        Self {
            event: self.event.clone(),
            pending: None,
        }
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("pending", &self.pending.is_some())
            .finish()
    }
}
