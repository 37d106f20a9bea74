use crate::{
    Error, Promise, PromiseResolver,
    id_sequence::IdSequence,
    protocol::{AMQPError, AMQPSoftError},
    publisher_confirm::{Confirmation, PublisherConfirm},
    returned_messages::ReturnedMessages,
    shared::SharedMutex,
    types::DeliveryTag,
};
use std::{collections::VecDeque, fmt, sync::MutexGuard};
use tracing::trace;

#[derive(Clone)]
pub(crate) struct Acknowledgements(SharedMutex<Inner>);

type AMQPResult = Result<(), AMQPError>;

impl Acknowledgements {
    pub(crate) fn new(channel_id: u16, returned_messages: ReturnedMessages) -> Self {
        Self(SharedMutex::new(Inner::new(channel_id, returned_messages)))
    }

    pub(crate) fn register_pending(&self) -> PublisherConfirm {
        self.lock_inner().register_pending()
    }

    pub(crate) fn get_last_pending(&self) -> Option<Promise<()>> {
        self.lock_inner().last_pending()
    }

    pub(crate) fn ack(&self, delivery_tag: DeliveryTag) -> AMQPResult {
        self.lock_inner().drop_pending(delivery_tag, true)
    }

    pub(crate) fn nack(&self, delivery_tag: DeliveryTag) -> AMQPResult {
        self.lock_inner().drop_pending(delivery_tag, false)
    }

    pub(crate) fn ack_all_pending(&self) {
        self.lock_inner().drop_all(true);
    }

    pub(crate) fn nack_all_pending(&self) {
        self.lock_inner().drop_all(false);
    }

    pub(crate) fn ack_all_before(&self, delivery_tag: DeliveryTag) -> AMQPResult {
        self.lock_inner()
            .complete_pending_before(delivery_tag, true)
    }

    pub(crate) fn nack_all_before(&self, delivery_tag: DeliveryTag) -> AMQPResult {
        self.lock_inner()
            .complete_pending_before(delivery_tag, false)
    }

    pub(crate) fn on_channel_error(&self, error: Error) {
        self.lock_inner().on_channel_error(error);
    }

    pub(crate) fn reset(&self, error: Error) {
        self.lock_inner().reset(error);
    }

    fn lock_inner(&self) -> MutexGuard<'_, Inner> {
        self.0.lock()
    }
}

impl fmt::Debug for Acknowledgements {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Acknowledgements");
        if let Some(inner) = self.0.try_lock() {
            debug
                .field("delivery_tag", &inner.delivery_tag)
                .field("returned_messages", &inner.returned_messages)
                .field(
                    "pending",
                    &inner.pending.iter().map(|(tag, _)| tag).collect::<Vec<_>>(),
                );
        }
        debug.finish()
    }
}

struct Inner {
    channel_id: u16,
    delivery_tag: IdSequence<DeliveryTag>,
    /// The confirms not yet received, in the order published: tags only grow, so the oldest
    /// is at the front, where the broker's acknowledgements nearly always find theirs.
    pending: VecDeque<(DeliveryTag, PromiseResolver<Confirmation>)>,
    /// Callers of `wait_for_confirms`, each with the last tag published when it asked: answered
    /// once no confirm up to that tag is pending.
    waiting: VecDeque<(DeliveryTag, PromiseResolver<()>)>,
    /// Why the confirm of the last publish failed, while no publish followed it: what
    /// `wait_for_confirms` then answers.
    last_failed: Option<Error>,
    returned_messages: ReturnedMessages,
}

impl Inner {
    fn new(channel_id: u16, returned_messages: ReturnedMessages) -> Self {
        Self {
            channel_id,
            delivery_tag: IdSequence::new(false),
            pending: VecDeque::new(),
            waiting: VecDeque::new(),
            last_failed: None,
            returned_messages,
        }
    }

    fn register_pending(&mut self) -> PublisherConfirm {
        let delivery_tag = self.delivery_tag.next();
        trace!("Publishing with delivery_tag {}", delivery_tag);
        let (promise, resolver) = Promise::new("acknowledgement");
        let promise = PublisherConfirm::new(promise, self.returned_messages.clone());
        self.last_failed = None;
        self.pending.push_back((delivery_tag, resolver));
        promise
    }

    /// What `wait_for_confirms` waits for: every confirm up to the last publish.
    fn last_pending(&mut self) -> Option<Promise<()>> {
        if let Some(error) = self.last_failed.take() {
            return Some(Promise::new_with_data("acknowledgement-error", Err(error)));
        }
        let last = self.pending.back()?.0;
        let (promise, resolver) = Promise::new("acknowledgement-error");
        self.waiting.push_back((last, resolver));
        Some(promise)
    }

    fn complete_pending(&mut self, success: bool, resolver: PromiseResolver<Confirmation>) {
        let returned_message = self.returned_messages.get_waiting_message().map(Box::new);
        resolver.resolve(if success {
            Confirmation::Ack(returned_message)
        } else {
            Confirmation::Nack(returned_message)
        });
    }

    /// Answers the callers of `wait_for_confirms` whose confirms all came.
    fn answer_waiting(&mut self) {
        while let Some((last, _)) = self.waiting.front() {
            if self
                .pending
                .front()
                .is_some_and(|(oldest, _)| oldest <= last)
            {
                break;
            }
            if let Some((_, resolver)) = self.waiting.pop_front() {
                resolver.resolve(());
            }
        }
    }

    fn drop_all(&mut self, success: bool) {
        for (_, resolver) in std::mem::take(&mut self.pending) {
            self.complete_pending(success, resolver);
        }
        self.answer_waiting();
    }

    fn drop_pending(&mut self, delivery_tag: DeliveryTag, success: bool) -> AMQPResult {
        let found = match self.pending.front() {
            Some((oldest, _)) if *oldest == delivery_tag => Some(0),
            _ => self
                .pending
                .binary_search_by_key(&delivery_tag, |(tag, _)| *tag)
                .ok(),
        };
        if let Some((_, resolver)) = found.and_then(|place| self.pending.remove(place)) {
            self.complete_pending(success, resolver);
            self.answer_waiting();
            Ok(())
        } else {
            Err(AMQPError::new(
                AMQPSoftError::PRECONDITIONFAILED.into(),
                format!(
                    "invalid {} received for inexistant delivery_tag {} on channel {}, current is {:?}, was expecting one of {:?}",
                    if success { "ack" } else { "nack" },
                    delivery_tag,
                    self.channel_id,
                    self.delivery_tag.current(),
                    self.pending.iter().map(|(tag, _)| tag).collect::<Vec<_>>()
                )
                .into(),
            ))
        }
    }

    fn complete_pending_before(&mut self, delivery_tag: DeliveryTag, success: bool) -> AMQPResult {
        // The pending confirms are in the order of their tags: those covered are at the front.
        while self
            .pending
            .front()
            .is_some_and(|(tag, _)| *tag <= delivery_tag)
        {
            if let Some((_, resolver)) = self.pending.pop_front() {
                self.complete_pending(success, resolver);
            }
        }
        self.answer_waiting();
        Ok(())
    }

    fn on_channel_error(&mut self, error: Error) {
        // The last publish's confirm fails with the channel if it was still pending.
        let last = self.delivery_tag.current();
        if self
            .pending
            .back()
            .is_some_and(|(tag, _)| Some(*tag) == last)
        {
            self.last_failed = Some(error.clone());
        }
        for (_, resolver) in std::mem::take(&mut self.pending) {
            resolver.reject(error.clone());
        }
        for (_, resolver) in std::mem::take(&mut self.waiting) {
            resolver.reject(error.clone());
        }
        self.returned_messages.clear_dropped_confirms();
    }

    fn reset(&mut self, error: Error) {
        self.delivery_tag = IdSequence::new(false);
        self.on_channel_error(error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::{
        future::Future,
        pin::Pin,
        task::{Context, Poll, Waker},
    };

    fn poll<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
        Pin::new(future).poll(&mut Context::from_waker(Waker::noop()))
    }

    fn publishes(acks: &Acknowledgements, count: usize) -> Vec<PublisherConfirm> {
        (0..count).map(|_| acks.register_pending()).collect()
    }

    fn acked() -> Poll<Result<Confirmation, Error>> {
        Poll::Ready(Ok(Confirmation::Ack(None)))
    }

    fn nacked() -> Poll<Result<Confirmation, Error>> {
        Poll::Ready(Ok(Confirmation::Nack(None)))
    }

    fn acks() -> Acknowledgements {
        Acknowledgements::new(1, ReturnedMessages::default())
    }

    #[test]
    fn confirms_come_singly_in_any_order_and_in_runs() {
        let acks = acks();
        let mut confirms = publishes(&acks, 6);

        assert!(acks.ack(3).is_ok());
        assert_eq!(poll(&mut confirms[2]), acked());
        assert!(poll(&mut confirms[0]).is_pending());
        assert!(poll(&mut confirms[3]).is_pending());

        assert!(acks.ack_all_before(2).is_ok());
        assert_eq!(poll(&mut confirms[0]), acked());
        assert_eq!(poll(&mut confirms[1]), acked());

        assert!(acks.nack(4).is_ok());
        assert_eq!(poll(&mut confirms[3]), nacked());
        assert!(acks.nack_all_before(6).is_ok());
        assert_eq!(poll(&mut confirms[4]), nacked());
        assert_eq!(poll(&mut confirms[5]), nacked());

        // A tag confirmed already, or never published, is the broker's error.
        assert!(acks.ack(3).is_err());
        assert!(acks.ack(7).is_err());
    }

    #[test]
    fn waiting_for_confirms_waits_for_every_one_up_to_the_last_publish() {
        let acks = acks();
        assert!(acks.get_last_pending().is_none());

        let _confirms = publishes(&acks, 3);
        let mut all = acks.get_last_pending().expect("three confirms pending");
        assert!(acks.ack(3).is_ok());
        assert!(poll(&mut all).is_pending());
        assert!(acks.ack_all_before(1).is_ok());
        assert!(poll(&mut all).is_pending());
        // A publish after the question is not waited for.
        let _later = acks.register_pending();
        assert!(acks.nack(2).is_ok());
        assert_eq!(poll(&mut all), Poll::Ready(Ok(())));

        assert!(acks.get_last_pending().is_some());
        acks.ack_all_pending();
        assert!(acks.get_last_pending().is_none());
    }

    #[test]
    fn a_channel_error_fails_the_pending_confirms_and_the_wait_for_them() {
        let acks = acks();
        let mut confirms = publishes(&acks, 2);
        let mut waiting = acks.get_last_pending().expect("two confirms pending");
        let error: Error = ErrorKind::ChannelsLimitReached.into();

        acks.on_channel_error(error.clone());
        assert_eq!(poll(&mut confirms[0]), Poll::Ready(Err(error.clone())));
        assert_eq!(poll(&mut confirms[1]), Poll::Ready(Err(error.clone())));
        assert_eq!(poll(&mut waiting), Poll::Ready(Err(error.clone())));
        // Asked afterwards, as before: the last publish failed, once.
        let mut asked = acks.get_last_pending().expect("the last publish failed");
        assert_eq!(poll(&mut asked), Poll::Ready(Err(error)));
        assert!(acks.get_last_pending().is_none());
    }
}
