use crate::{
    Connection, Error, PromiseResolver,
    channel::Reply,
    connection_step::ConnectionStep,
    internal_rpc::InternalRPCHandle,
    promise::Cancelable,
    types::{ChannelId, FrameSize},
};
use amq_protocol::{
    frame::{AMQPFrame, GenError, ProtocolVersion},
    protocol::{AMQPClass, basic::AMQPMethod},
};
use std::{
    collections::{HashMap, VecDeque},
    fmt,
    ops::Deref,
    sync::{Arc, Mutex, MutexGuard},
};
use tracing::trace;

pub(crate) struct ExpectedReply(
    pub(crate) Reply,
    pub(crate) Box<dyn Cancelable + Send + Sync>,
);

impl fmt::Debug for ExpectedReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ExpectedReply").field(&self.0).finish()
    }
}

#[derive(Clone, Default)]
pub(crate) struct Frames(Arc<Mutex<Inner>>);

impl Frames {
    pub(crate) fn push(
        &self,
        channel_id: ChannelId,
        frame: AMQPFrame,
        canceler: Box<dyn Cancelable + Send + Sync>,
        expected_reply: Option<ExpectedReply>,
        resolver: Option<PromiseResolver<()>>,
    ) {
        self.lock_inner()
            .push(channel_id, frame, canceler, expected_reply, resolver);
    }

    pub(crate) fn push_frames(
        &self,
        channel_id: ChannelId,
        frames: Vec<AMQPFrame>,
        resolver: PromiseResolver<()>,
    ) {
        // A poisoned channel's error goes to the resolver.
        let _ = self
            .lock_inner()
            .push_frames(channel_id, frames, Some(resolver));
    }

    /// Queues `frames` with nobody waiting for their write; the channel's poison, if it has
    /// one, is returned instead.
    pub(crate) fn push_frames_unawaited(
        &self,
        channel_id: ChannelId,
        frames: Vec<AMQPFrame>,
    ) -> Result<(), Error> {
        self.lock_inner().push_frames(channel_id, frames, None)
    }

    /// Writes the next frames with `write` and takes them off the queue, or leaves them queued
    /// when `write` has no room for them yet (`BufferTooSmall`). `flow`: whether channels may
    /// send content, that is publish. See [`Inner::write_next`].
    pub(crate) fn write_next(
        &self,
        flow: bool,
        mut write: impl FnMut(&AMQPFrame) -> Result<u64, GenError>,
    ) -> Written {
        self.lock_inner().write_next(flow, &mut write)
    }

    /// The frames the next [`Frames::write_next`] writes, for tests.
    #[cfg(test)]
    pub(crate) fn written(&self, flow: bool) -> Vec<AMQPFrame> {
        let mut frames = Vec::new();
        let _ = self.write_next(flow, |frame| {
            frames.push(frame.clone());
            Ok(8)
        });
        frames
    }

    pub(crate) fn find_connection_step(&self, channel_id: ChannelId) -> Option<ConnectionStep> {
        match self.find_expected_reply(channel_id, |reply| {
            matches!(&reply.0, Reply::ConnectionStep(..))
        }) {
            Some(Reply::ConnectionStep(step)) => Some(step),
            _ => None,
        }
    }

    pub(crate) fn connection_resolver(
        &self,
        channel_id: ChannelId,
    ) -> Option<PromiseResolver<Connection>> {
        let resolver = self
            .find_connection_step(channel_id)
            .map(ConnectionStep::into_connection_resolver);
        // We carry the Connection here to drop the lock() above before dropping the Connection
        resolver.map(|(resolver, _connection)| resolver)
    }

    pub(crate) fn clear_connection_steps(&self, error: &Error) {
        // Each call to connection_resolver() removes one step from expected_replies[0],
        // so this loop always terminates.
        while let Some(resolver) = self.connection_resolver(0) {
            resolver.reject(error.clone());
        }
    }

    pub(crate) fn retry_connection_header(&self) -> bool {
        let mut inner = self.lock_inner();
        let resolver = inner.expected_replies.get(&0).and_then(|replies| {
            replies.iter().find_map(|reply| match &reply.0 {
                Reply::ConnectionStep(ConnectionStep::ProtocolHeader(resolver, _)) => {
                    Some(resolver.clone())
                }
                _ => None,
            })
        });
        let Some(resolver) = resolver else {
            return false;
        };

        // Keep the expected reply and its original connection promise. The old
        // header may still be queued or partially written on the previous socket.
        inner
            .frames
            .retain(|frame| !matches!(frame.frame, AMQPFrame::ProtocolHeader(_)));
        inner
            .retry_frames
            .retain(|frame| !matches!(frame.frame, AMQPFrame::ProtocolHeader(_)));
        inner.retry_frames.push_front(FrameEntry::new(
            AMQPFrame::ProtocolHeader(ProtocolVersion::amqp_0_9_1()),
            FrameSending::new(Some(Box::new(resolver)), None),
        ));
        true
    }

    pub(crate) fn find_expected_reply<P: FnMut(&ExpectedReply) -> bool>(
        &self,
        channel_id: ChannelId,
        finder: P,
    ) -> Option<Reply> {
        self.lock_inner()
            .expected_replies
            .get_mut(&channel_id)
            .and_then(|replies| {
                replies
                    .iter()
                    .position(finder)
                    .and_then(|idx| replies.remove(idx))
            })
            .map(|t| t.0)
    }

    pub(crate) fn next_expected_close_ok_reply(
        &self,
        channel_id: ChannelId,
        error: Error,
    ) -> Option<Reply> {
        self.lock_inner()
            .next_expected_close_ok_reply(channel_id, error)
    }

    pub(crate) fn has_pending(&self) -> bool {
        self.lock_inner().has_pending()
    }

    pub(crate) fn drop_pending(&self, error: Error, internal_rpc: &InternalRPCHandle) {
        self.lock_inner().drop_pending(error, internal_rpc);
    }

    pub(crate) fn take_expected_replies(
        &self,
        channel_id: ChannelId,
    ) -> Option<VecDeque<ExpectedReply>> {
        self.lock_inner().expected_replies.remove(&channel_id)
    }

    pub(crate) fn clear_expected_replies(&self, channel_id: ChannelId, error: Error) {
        if let Some(replies) = self.take_expected_replies(channel_id) {
            Self::cancel_expected_replies(replies, error)
        }
    }

    pub(crate) fn clear_all_expected_replies(&self, error: Error) {
        self.lock_inner().clear_all_expected_replies(error)
    }

    pub(crate) fn cancel_expected_replies(replies: VecDeque<ExpectedReply>, error: Error) {
        Inner::cancel_expected_replies(replies, error)
    }

    pub(crate) fn drop_frames_for_channel(&self, channel_id: ChannelId, error: Error) {
        self.lock_inner().drop_frames_for_channel(channel_id, error)
    }

    pub(crate) fn poison_channel(&self, channel_id: ChannelId, error: Error) {
        self.lock_inner().channels_poison.insert(channel_id, error);
    }

    pub(crate) fn poison(&self) -> Option<Error> {
        self.lock_inner().poison.clone()
    }

    pub(crate) fn drop_poison(&self) {
        self.lock_inner().poison.take();
    }

    pub(crate) fn drop_channel_poison(&self, channel_id: ChannelId) {
        self.lock_inner().channels_poison.remove(&channel_id);
    }

    fn lock_inner(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) struct FrameEntry {
    frame: AMQPFrame,
    sending: FrameSending,
}

impl Deref for FrameEntry {
    type Target = AMQPFrame;

    fn deref(&self) -> &Self::Target {
        &self.frame
    }
}

impl FrameEntry {
    fn new(frame: AMQPFrame, sending: FrameSending) -> Self {
        Self { frame, sending }
    }

    fn reject(&self, error: Error) {
        self.sending.reject(error)
    }

    pub(crate) fn into_serialized_frame(self, sz: FrameSize) -> (FrameSize, FrameSending) {
        (sz, self.sending)
    }
}

pub(crate) struct FrameSending {
    canceler: Option<Box<dyn Cancelable + Send + Sync>>,
    resolver: Option<PromiseResolver<()>>,
}

impl FrameSending {
    fn new(
        canceler: Option<Box<dyn Cancelable + Send + Sync>>,
        resolver: Option<PromiseResolver<()>>,
    ) -> Self {
        Self { canceler, resolver }
    }

    pub(crate) fn reject(&self, error: Error) {
        if let Some(resolver) = self.resolver.as_ref() {
            resolver.reject(error);
        } else if let Some(canceler) = self.canceler.as_ref() {
            canceler.cancel(error);
        }
    }

    pub(crate) fn resolve(&self) {
        if let Some(resolver) = self.resolver.as_ref() {
            resolver.resolve(());
        }
    }
}

/// What one [`Frames::write_next`] wrote: its size and what waits on it, `None` when nothing
/// was queued, or the error that left the next frame queued (`BufferTooSmall`: no room yet).
pub(crate) type Written = Result<Option<(FrameSize, FrameSending)>, GenError>;

/// A publish's frames (its method, content header and body), queued as one entry and written
/// from the queue where they are (Ponte's change). Queued frame by frame, each frame (some 300
/// bytes: a content header holds its properties inline) was moved into the queue, out of it,
/// into a second queue that kept a publish's frames together and out of that one again: about
/// a third of the gateway's `memmove` in a drain's profile.
struct Publish {
    channel_id: ChannelId,
    frames: Vec<AMQPFrame>,
    /// How many of `frames` are written. A publish begun is finished before any other frame of
    /// the connection: its content header and body must follow its method directly, or the
    /// broker closes the connection (`UNEXPECTED_FRAME`).
    written: usize,
    /// Resolved once the last frame is written to the socket.
    resolver: Option<PromiseResolver<()>>,
}

impl Publish {
    fn reject(&self, error: Error) {
        if let Some(resolver) = self.resolver.as_ref() {
            resolver.reject(error);
        }
    }
}

#[derive(Default)]
struct Inner {
    retry_frames: VecDeque<FrameEntry>,
    frames: VecDeque<FrameEntry>,
    /// Publishes, held while the broker's `channel.flow` stops content.
    publishes: VecDeque<Publish>,
    expected_replies: HashMap<ChannelId, VecDeque<ExpectedReply>>,
    poison: Option<Error>,
    channels_poison: HashMap<ChannelId, Error>,
}

impl fmt::Debug for Frames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Frames");
        if let Ok(inner) = self.0.try_lock() {
            debug.field("expected_replies", &inner.expected_replies);
        }
        debug.finish()
    }
}

impl Inner {
    fn push(
        &mut self,
        channel_id: ChannelId,
        frame: AMQPFrame,
        canceler: Box<dyn Cancelable + Send + Sync>,
        expected_reply: Option<ExpectedReply>,
        resolver: Option<PromiseResolver<()>>,
    ) {
        let sending = FrameSending::new(Some(canceler), resolver);
        if let Some(error) = self.check_poison(channel_id) {
            trace!(channel=%channel_id, frame=?frame, "Discarding frame because of poisoning");
            if let Some(reply) = expected_reply {
                Self::cancel_expected_reply(reply, error.clone());
            }
            sending.reject(error);
            return;
        }

        self.frames.push_back(FrameEntry::new(frame, sending));
        if let Some(reply) = expected_reply {
            trace!(
                channel=%channel_id,
                expected_reply=?reply,
                "state is now waiting"
            );
            self.expected_replies
                .entry(channel_id)
                .or_default()
                .push_back(reply);
        }
    }

    fn push_frames(
        &mut self,
        channel_id: ChannelId,
        frames: Vec<AMQPFrame>,
        resolver: Option<PromiseResolver<()>>,
    ) -> Result<(), Error> {
        if let Some(error) = self.check_poison(channel_id) {
            trace!(channel=%channel_id, frames=?frames, "Discarding frames because of poisoning");
            if let Some(resolver) = resolver {
                resolver.reject(error.clone());
            }
            return Err(error);
        }

        if frames.is_empty() {
            if let Some(resolver) = resolver {
                resolver.resolve(());
            }
        } else {
            self.publishes.push_back(Publish {
                channel_id,
                frames,
                written: 0,
                resolver,
            });
        }
        Ok(())
    }

    fn check_poison(&self, channel_id: ChannelId) -> Option<Error> {
        self.channels_poison
            .get(&channel_id)
            .or(self.poison.as_ref())
            .cloned()
    }

    /// Writes the next frames with `write`, in this order: a frame queued again (the protocol
    /// header of a new connection attempt), the rest of a publish begun, frames other than
    /// publishes, then, if `flow`, the next publish, as many of its frames as `write` has room
    /// for. Returns the size written and what waits on it; `BufferTooSmall` when `write` had no
    /// room for the next frame, which stays queued; `None` with nothing to write.
    ///
    /// A frame is written from its queue by reference and taken off once written (Ponte's
    /// change: before, each was moved out, and queued again when it did not fit).
    fn write_next(
        &mut self,
        flow: bool,
        write: &mut impl FnMut(&AMQPFrame) -> Result<u64, GenError>,
    ) -> Written {
        let begun = self.publishes.front().is_some_and(|p| p.written > 0);
        let queue = if !self.retry_frames.is_empty() {
            Some(&mut self.retry_frames)
        } else if !begun && !self.frames.is_empty() {
            Some(&mut self.frames)
        } else {
            None
        };
        if let Some(queue) = queue {
            let entry = queue.front().expect("a queue with frames");
            let written = write(&entry.frame);
            return match written {
                Ok(size) => {
                    let entry = queue.pop_front().expect("the front entry");
                    Ok(Some(entry.into_serialized_frame(size as FrameSize)))
                }
                Err(error) => {
                    if !matches!(error, GenError::BufferTooSmall(_)) {
                        // The loop fails the connection; the frame is not tried again.
                        queue.pop_front();
                    }
                    Err(error)
                }
            };
        }
        if !(flow || begun) {
            return Ok(None);
        }
        let Some(publish) = self.publishes.front_mut() else {
            return Ok(None);
        };
        let mut size = 0;
        while let Some(frame) = publish.frames.get(publish.written) {
            match write(frame) {
                Ok(written) => {
                    size += written;
                    publish.written += 1;
                }
                Err(GenError::BufferTooSmall(_)) if size > 0 => {
                    return Ok(Some((size as FrameSize, FrameSending::new(None, None))));
                }
                Err(error) => {
                    if !matches!(error, GenError::BufferTooSmall(_)) {
                        self.publishes.pop_front();
                    }
                    return Err(error);
                }
            }
        }
        let publish = self.publishes.pop_front().expect("the front publish");
        Ok(Some((
            size as FrameSize,
            FrameSending::new(None, publish.resolver),
        )))
    }

    fn has_pending(&self) -> bool {
        !(self.retry_frames.is_empty() && self.frames.is_empty() && self.publishes.is_empty())
    }

    fn drop_pending(&mut self, error: Error, internal_rpc: &InternalRPCHandle) {
        Self::drop_pending_frames(&mut self.retry_frames, error.clone(), internal_rpc);
        Self::drop_pending_frames(&mut self.frames, error.clone(), internal_rpc);
        for publish in std::mem::take(&mut self.publishes) {
            publish.reject(error.clone());
        }
        self.clear_all_expected_replies(error.clone());
        self.poison = Some(error);
    }

    fn drop_pending_frames(
        frames: &mut VecDeque<FrameEntry>,
        error: Error,
        internal_rpc: &InternalRPCHandle,
    ) {
        for frame in std::mem::take(frames) {
            match frame.frame {
                AMQPFrame::Method(channel_id, AMQPClass::Basic(AMQPMethod::Cancel(cancel))) => {
                    internal_rpc.deregister_consumer(channel_id, cancel.consumer_tag);
                    frame.sending.resolve();
                }
                _ => frame.reject(error.clone()),
            }
        }
    }

    fn drop_frames_for_channel(&mut self, channel_id: ChannelId, error: Error) {
        Self::drop_pending_frames_for_channel(channel_id, &mut self.retry_frames, error.clone());
        Self::drop_pending_frames_for_channel(channel_id, &mut self.frames, error.clone());
        self.publishes.retain(|publish| {
            if publish.channel_id == channel_id {
                publish.reject(error.clone());
                false
            } else {
                true
            }
        });
    }

    fn drop_pending_frames_for_channel(
        channel_id: ChannelId,
        frames: &mut VecDeque<FrameEntry>,
        error: Error,
    ) {
        frames.retain(|frame| {
            if frame.channel_id() == channel_id {
                frame.reject(error.clone());
                false
            } else {
                true
            }
        })
    }

    fn next_expected_close_ok_reply(
        &mut self,
        channel_id: ChannelId,
        error: Error,
    ) -> Option<Reply> {
        let expected_replies = self.expected_replies.get_mut(&channel_id)?;
        while let Some(reply) = expected_replies.pop_front() {
            match &reply.0 {
                Reply::ChannelCloseOk(_) => return Some(reply.0),
                Reply::BasicCancelOk(resolver) => resolver.resolve(()), // Channel close means consumer is canceled automatically
                _ => reply.1.cancel(error.clone()),
            }
        }
        None
    }

    fn clear_all_expected_replies(&mut self, error: Error) {
        for (_, replies) in self.expected_replies.drain() {
            Self::cancel_expected_replies(replies, error.clone());
        }
    }

    fn cancel_expected_replies(replies: VecDeque<ExpectedReply>, error: Error) {
        for reply in replies {
            Self::cancel_expected_reply(reply, error.clone());
        }
    }

    fn cancel_expected_reply(reply: ExpectedReply, error: Error) {
        let ExpectedReply(reply, cancel) = reply;
        match reply {
            Reply::BasicCancelOk(resolver) => resolver.resolve(()),
            _ => cancel.cancel(error.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::promise::Promise;
    use amq_protocol::{
        frame::AMQPContentHeader,
        protocol::{BasicProperties, basic},
    };

    fn publish(channel_id: ChannelId, body: &str) -> Vec<AMQPFrame> {
        vec![
            AMQPFrame::Method(
                channel_id,
                AMQPClass::Basic(AMQPMethod::Publish(basic::Publish {
                    exchange: "".into(),
                    routing_key: "partner.in".into(),
                    mandatory: true,
                    immediate: false,
                })),
            ),
            AMQPFrame::Header(
                channel_id,
                AMQPContentHeader {
                    class_id: 60,
                    body_size: body.len() as u64,
                    properties: BasicProperties::default(),
                },
            ),
            AMQPFrame::Body(channel_id, body.as_bytes().to_vec()),
        ]
    }

    fn ack(frames: &Frames, channel_id: ChannelId) {
        let (_, resolver) = Promise::<()>::new("ack");
        frames.push(
            channel_id,
            AMQPFrame::Method(
                channel_id,
                AMQPClass::Basic(AMQPMethod::Ack(basic::Ack {
                    delivery_tag: 1,
                    multiple: true,
                })),
            ),
            Box::new(resolver),
            None,
            None,
        );
    }

    /// Each frame written, named by its kind, channel and (for a body) content.
    fn name(frame: &AMQPFrame) -> String {
        match frame {
            AMQPFrame::Method(channel, AMQPClass::Basic(AMQPMethod::Publish(_))) => {
                format!("publish {channel}")
            }
            AMQPFrame::Method(channel, AMQPClass::Basic(AMQPMethod::Ack(_))) => {
                format!("ack {channel}")
            }
            AMQPFrame::Header(channel, _) => format!("header {channel}"),
            AMQPFrame::Body(channel, body) => {
                format!("body {channel} {}", String::from_utf8_lossy(body))
            }
            other => format!("{other:?}"),
        }
    }

    /// Calls `write_next` with room for `room` frames of 10 bytes; the frames written, by name,
    /// and what the call returned.
    fn write(frames: &Frames, flow: bool, room: usize) -> (Vec<String>, Written) {
        let (mut written, mut room) = (Vec::new(), room);
        let result = frames.write_next(flow, |frame| {
            if room == 0 {
                return Err(GenError::BufferTooSmall(1));
            }
            room -= 1;
            written.push(name(frame));
            Ok(10)
        });
        (written, result)
    }

    #[test]
    fn a_publish_goes_out_whole_and_in_order() {
        let frames = Frames::default();
        let (promise, resolver) = Promise::new("publish");
        frames.push_frames(1, publish(1, "a"), resolver);
        frames.push_frames_unawaited(2, publish(2, "b")).unwrap();

        let (written, result) = write(&frames, true, usize::MAX);
        assert_eq!(written, ["publish 1", "header 1", "body 1 a"]);
        let (size, sending) = result.unwrap().unwrap();
        assert_eq!(size, 30);
        assert!(promise.try_wait().is_none(), "resolved once on the socket");
        sending.resolve();
        assert!(matches!(promise.try_wait(), Some(Ok(()))));

        let (written, _) = write(&frames, true, usize::MAX);
        assert_eq!(written, ["publish 2", "header 2", "body 2 b"]);
        assert!(matches!(write(&frames, true, usize::MAX).1, Ok(None)));
        assert!(!frames.has_pending());
    }

    #[test]
    fn a_publish_begun_is_finished_before_any_other_frame() {
        let frames = Frames::default();
        let (promise, resolver) = Promise::new("publish");
        frames.push_frames(1, publish(1, "a"), resolver);

        // Room for the method only: the rest stays queued, and what was written is returned
        // without the publish's promise.
        let (written, result) = write(&frames, true, 1);
        assert_eq!(written, ["publish 1"]);
        let (size, sending) = result.unwrap().unwrap();
        assert_eq!(size, 10);
        sending.resolve();
        assert!(promise.try_wait().is_none());

        // An ack queued now, and no room at all: nothing written, nothing lost.
        ack(&frames, 2);
        let (written, result) = write(&frames, true, 0);
        assert!(written.is_empty());
        assert!(matches!(result, Err(GenError::BufferTooSmall(_))));

        // The publish's header and body come before the ack, even with the broker's flow off.
        let (written, result) = write(&frames, false, usize::MAX);
        assert_eq!(written, ["header 1", "body 1 a"]);
        result.unwrap().unwrap().1.resolve();
        assert!(matches!(promise.try_wait(), Some(Ok(()))));
        let (written, _) = write(&frames, false, usize::MAX);
        assert_eq!(written, ["ack 2"]);
        assert!(!frames.has_pending());
    }

    #[test]
    fn publishes_wait_while_the_flow_is_off_and_other_frames_do_not() {
        let frames = Frames::default();
        frames.push_frames_unawaited(1, publish(1, "a")).unwrap();
        ack(&frames, 1);

        let (written, _) = write(&frames, false, usize::MAX);
        assert_eq!(written, ["ack 1"]);
        let (written, result) = write(&frames, false, usize::MAX);
        assert!(written.is_empty());
        assert!(matches!(result, Ok(None)));
        assert!(frames.has_pending());

        let (written, _) = write(&frames, true, usize::MAX);
        assert_eq!(written, ["publish 1", "header 1", "body 1 a"]);
    }

    #[test]
    fn a_channel_dropped_rejects_its_publishes_and_keeps_the_others() {
        let frames = Frames::default();
        let (dropped, resolver) = Promise::new("dropped");
        frames.push_frames(1, publish(1, "a"), resolver);
        frames.push_frames_unawaited(2, publish(2, "b")).unwrap();

        frames.drop_frames_for_channel(
            1,
            crate::ErrorKind::InvalidChannelState(crate::ChannelState::Closed, "test").into(),
        );
        assert!(matches!(dropped.try_wait(), Some(Err(_))));
        let (written, _) = write(&frames, true, usize::MAX);
        assert_eq!(written, ["publish 2", "header 2", "body 2 b"]);
    }
}
