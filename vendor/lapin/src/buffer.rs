use crate::parsing::ParsingContext;
use amq_protocol::frame::{
    AMQPFrame, BackToTheBuffer, GenError, GenResult, WriteContext, gen_frame,
};
use futures_io::{AsyncRead, AsyncWrite};
use std::{
    cmp,
    io::{self, IoSlice, IoSliceMut},
    pin::Pin,
    task::{Context, Poll},
};

/// How far into its memory a buffer's data may move before what is left of it is copied back
/// to the start...
const COMPACT_AFTER: usize = 64 * 1024;
/// ...if that is at most this much (a frame's start; a larger remainder waits until less is
/// left, so that a copy costs at most a sixteenth of what was read meanwhile).
const COMPACT_AT_MOST: usize = 4 * 1024;

#[derive(Debug, PartialEq, Clone)]
pub(crate) struct Buffer {
    memory: Vec<u8>,
    capacity: usize,
    position: usize,
    end: usize,
    available_data: usize,
}

pub(crate) struct Checkpoint {
    end: usize,
    backwards: bool,
}

impl Buffer {
    pub(crate) fn with_capacity(capacity: usize) -> Buffer {
        Buffer {
            memory: vec![0; capacity],
            capacity,
            position: 0,
            end: 0,
            available_data: 0,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.position = 0;
        self.end = 0;
        self.available_data = 0;
    }

    pub(crate) fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            end: self.end,
            backwards: true,
        }
    }

    pub(crate) fn rollback(&mut self, checkpoint: Checkpoint) {
        if checkpoint.end == self.end {
            return;
        }
        if checkpoint.backwards {
            if self.end > checkpoint.end {
                self.available_data -= self.end - checkpoint.end;
            } else {
                self.available_data -= self.end + (self.capacity - checkpoint.end);
            }
        } else if self.end > checkpoint.end {
            self.available_data += (self.capacity - self.end) + checkpoint.end;
        } else {
            self.available_data += checkpoint.end - self.end;
        }
        self.end = checkpoint.end;
    }

    pub(crate) fn grow(&mut self, new_size: usize) -> bool {
        if self.capacity >= new_size {
            return false;
        }

        let old_capacity = self.capacity;
        let growth = new_size - old_capacity;

        self.memory.resize(new_size, 0);
        self.capacity = new_size;

        if self.end <= self.position && self.available_data > 0 {
            // We have data and the "tail" was at the beginning of the buffer.
            // We need to move it in the new end.
            let (old, new) = self.memory.split_at_mut(old_capacity);
            if self.end < growth {
                // There is enough room in the new end for this whole "tail".
                new.copy_from_slice(&old[..self.end]);
                self.end += old_capacity;
            } else {
                // Fill the new end with as much data as we can.
                new.copy_from_slice(&old[..growth]);
                // We still have [growth..old_end] to move into [0..new_end]
                // copy_within handles the overlap correctly, if any.
                self.memory.copy_within(growth..self.end, 0);
                // We also update the end pointer to the right location.
                self.end -= growth;
            }
        }

        true
    }

    pub(crate) fn available_data(&self) -> usize {
        self.available_data
    }

    /// The data waiting to be read, when it lies in one piece (it does not wrap around the
    /// end of the memory): nearly always, and then it parses as a plain slice.
    pub(crate) fn contiguous_data(&self) -> Option<&[u8]> {
        let end = self.position + self.available_data;
        (end <= self.capacity).then(|| &self.memory[self.position..end])
    }

    /// Serializes `frame` after the data; returns its size, or the error that left the buffer
    /// as it was (`BufferTooSmall` when it does not fit yet).
    ///
    /// Into the free memory right after the data first, in one piece (Ponte's change): nearly
    /// always all of the free memory, as the send buffer's data goes back to its start once
    /// written, and the frame's fields (some fifty a message) are then a plain slice's writes,
    /// where through the ring's `Write` each was a call that asked where the free space wraps.
    /// A frame that does not fit there goes through the ring; a body frame, whose size is known,
    /// without being copied there first (up to a `frame_max` of bytes, near the end of the
    /// memory while the socket is slower than the publishers).
    pub(crate) fn write_frame(&mut self, frame: &AMQPFrame) -> Result<u64, GenError> {
        let space = if self.available_data == self.capacity {
            &mut []
        } else if self.end >= self.position {
            &mut self.memory[self.end..]
        } else {
            &mut self.memory[self.end..self.position]
        };
        let written = match frame {
            // A body frame is its bytes and 8 of type, channel, size and end.
            AMQPFrame::Body(_, body) if space.len() < body.len() + 8 => {
                Err(GenError::BufferTooSmall(body.len() + 8 - space.len()))
            }
            _ => gen_frame(frame)(Space(space).into()).map(|w| w.into_inner().1),
        };
        match written {
            Ok(size) => {
                self.fill(size as usize);
                Ok(size)
            }
            Err(GenError::BufferTooSmall(_)) => {
                let checkpoint = self.checkpoint();
                let written = gen_frame(frame)(self.into()).map(|w| w.into_inner().1);
                if written.is_err() {
                    self.rollback(checkpoint);
                }
                written
            }
            Err(error) => Err(error),
        }
    }

    pub(crate) fn available_space(&self) -> usize {
        self.capacity - self.available_data
    }

    pub(crate) fn consume(&mut self, count: usize) -> usize {
        let cnt = cmp::min(count, self.available_data());
        self.position += cnt;
        self.position %= self.capacity;
        self.available_data -= cnt;
        self.compact();
        cnt
    }

    /// Brings what is left back to the start of the memory (Ponte's change): when nothing is
    /// left, and when a little is (the start of a frame not yet read whole) once the data has
    /// moved [`COMPACT_AFTER`] in. As a plain ring, the data went round the whole memory (32
    /// frames, 4 MiB at a `frame_max` of 128 KiB): every page of both buffers of every
    /// connection ended up resident, and each frame was written to and read from memory last
    /// touched a lap before, out of the caches.
    fn compact(&mut self) {
        if self.available_data == 0 {
            self.reset();
        } else if self.position >= COMPACT_AFTER
            && self.available_data <= COMPACT_AT_MOST
            && self.end > self.position
        {
            self.memory.copy_within(self.position..self.end, 0);
            self.position = 0;
            self.end = self.available_data;
        }
    }

    pub(crate) fn fill(&mut self, count: usize) -> usize {
        let cnt = cmp::min(count, self.available_space());
        self.end += cnt;
        self.end %= self.capacity;
        self.available_data += cnt;
        cnt
    }

    pub(crate) fn poll_write_to<T: AsyncWrite + ?Sized>(
        &self,
        cx: &mut Context<'_>,
        writer: Pin<&mut T>,
    ) -> Poll<io::Result<usize>> {
        if self.available_data() == 0 {
            Poll::Ready(Ok(0))
        } else if self.end > self.position {
            writer.poll_write(cx, &self.memory[self.position..self.end])
        } else {
            writer.poll_write_vectored(
                cx,
                &[
                    IoSlice::new(&self.memory[self.position..]),
                    IoSlice::new(&self.memory[..self.end]),
                ],
            )
        }
    }

    pub(crate) fn poll_read_from<T: AsyncRead + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        reader: Pin<&mut T>,
    ) -> Poll<io::Result<usize>> {
        if self.available_space() == 0 {
            Poll::Ready(Ok(0))
        } else if self.end >= self.position {
            let (start, end) = self.memory.split_at_mut(self.end);
            reader.poll_read_vectored(
                cx,
                &mut [
                    IoSliceMut::new(&mut *end),
                    IoSliceMut::new(&mut start[..self.position]),
                ][..],
            )
        } else {
            reader.poll_read(cx, &mut self.memory[self.end..self.position])
        }
    }

    pub(crate) fn offset(&self, buf: ParsingContext<'_>) -> usize {
        let dataptr = self.memory[self.position..].as_ptr() as usize;
        let bufptr = buf.as_ptr() as usize;

        if dataptr < bufptr {
            bufptr - dataptr
        } else {
            let start = &self.memory[..0];
            let startptr = start.as_ptr() as usize;
            bufptr + self.capacity - self.position - startptr
        }
    }

    pub(crate) fn parsing_context(&self) -> ParsingContext<'_> {
        if self.available_data() == 0 {
            self.memory[self.end..self.end].into()
        } else if self.end > self.position {
            self.memory[self.position..self.end].into()
        } else {
            [&self.memory[self.position..], &self.memory[..self.end]].into()
        }
    }
}

impl io::Write for &mut Buffer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let amt = if self.available_space() == 0 {
            0
        } else if self.end >= self.position {
            let mut space = &mut self.memory[self.end..];
            let mut amt = space.write(data)?;
            if amt == self.capacity - self.end {
                let mut space = &mut self.memory[..self.position];
                amt += space.write(&data[amt..])?;
            }
            amt
        } else {
            let mut space = &mut self.memory[self.end..self.position];
            space.write(data)?
        };
        self.fill(amt);
        Ok(amt)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The free memory a frame is serialized into in one piece (Ponte's change): a slice's writes,
/// a field's bytes copied without a call. Through `&mut [u8]`'s `Write` each field of a frame
/// (some fifty a message, most of one to eight bytes) was a call to `memcpy` for a length known
/// only there, as many instructions as the copy's own; here a field of a known size is a store
/// or two, and a short one of any size two overlapping loads and stores.
struct Space<'a>(&'a mut [u8]);

impl io::Write for Space<'_> {
    #[inline]
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let space = std::mem::take(&mut self.0);
        // What fits (a field that does not fails the frame, and the ring takes it).
        let amt = if data.len() <= space.len() {
            data.len()
        } else {
            space.len()
        };
        let (written, rest) = space.split_at_mut(amt);
        copy(written, &data[..amt]);
        self.0 = rest;
        Ok(amt)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `to.copy_from_slice(from)`, with the short lengths of most fields copied inline: two
/// overlapping loads and stores of the widest size that fits in the length.
#[inline(always)]
fn copy(to: &mut [u8], from: &[u8]) {
    debug_assert_eq!(to.len(), from.len());
    match from.len() {
        17.. => to.copy_from_slice(from),
        8..=16 => overlapping::<8>(to, from),
        4..=7 => overlapping::<4>(to, from),
        2..=3 => overlapping::<2>(to, from),
        1 => to[0] = from[0],
        0 => {}
    }
}

/// `to.copy_from_slice(from)` for a length from `W` to `2 × W`: its first `W` bytes and its last
/// `W`, which overlap.
#[inline(always)]
fn overlapping<const W: usize>(to: &mut [u8], from: &[u8]) {
    let n = from.len();
    let head: [u8; W] = from[..W].try_into().expect("at least W bytes");
    let tail: [u8; W] = from[n - W..].try_into().expect("at least W bytes");
    to[n - W..].copy_from_slice(&tail);
    to[..W].copy_from_slice(&head);
}

impl BackToTheBuffer for Space<'_> {
    /// As cookie-factory's for `&mut [u8]`: the reserved bytes written after what follows them.
    fn reserve_write_use<
        Tmp,
        Gen: Fn(WriteContext<Self>) -> Result<(WriteContext<Self>, Tmp), GenError>,
        Before: Fn(WriteContext<Self>, Tmp) -> GenResult<Self>,
    >(
        s: WriteContext<Self>,
        reserved: usize,
        generator: &Gen,
        before: &Before,
    ) -> Result<WriteContext<Self>, GenError> {
        let (Space(space), position) = s.into_inner();
        if space.len() < reserved {
            return Err(GenError::BufferTooSmall(reserved - space.len()));
        }
        let (kept, rest) = space.split_at_mut(reserved);
        let (after, tmp) = generator(WriteContext {
            write: Space(rest),
            position: position + reserved as u64,
        })?;
        let kept = before(
            WriteContext {
                write: Space(kept),
                position,
            },
            tmp,
        )?;
        if !kept.write.0.is_empty() {
            return Err(GenError::BufferTooBig(kept.write.0.len()));
        }
        Ok(after)
    }
}

impl BackToTheBuffer for &mut Buffer {
    fn reserve_write_use<
        Tmp,
        Gen: Fn(WriteContext<Self>) -> Result<(WriteContext<Self>, Tmp), GenError>,
        Before: Fn(WriteContext<Self>, Tmp) -> GenResult<Self>,
    >(
        s: WriteContext<Self>,
        reserved: usize,
        generator: &Gen,
        before: &Before,
    ) -> Result<WriteContext<Self>, GenError> {
        if s.write.available_space() < reserved {
            return Err(GenError::BufferTooSmall(
                reserved - s.write.available_space(),
            ));
        }
        let start = s.write.checkpoint();
        s.write.fill(reserved);
        generator(s).and_then(|(s, tmp)| {
            let mut end = s.write.checkpoint();
            end.backwards = false;
            s.write.rollback(start);
            #[allow(clippy::manual_inspect)]
            before(s, tmp).map(|s| {
                s.write.rollback(end);
                s
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BasicProperties;
    use amq_protocol::frame::AMQPContentHeader;

    /// A content header (its size is written after its properties) and a body.
    fn frames() -> [AMQPFrame; 2] {
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("4f0c5c3e-0d5e-4a61-9d0e-2b1f5c1c7a10".into());
        [
            AMQPFrame::Header(
                3,
                AMQPContentHeader {
                    class_id: 60,
                    body_size: 40,
                    properties,
                },
            ),
            AMQPFrame::Body(3, vec![b'x'; 40]),
        ]
    }

    fn serialized(frame: &AMQPFrame) -> Vec<u8> {
        gen_frame(frame)(Vec::new().into())
            .expect("a vector grows")
            .into_inner()
            .0
    }

    /// The data waiting to be written, in order.
    fn waiting(buffer: &Buffer) -> Vec<u8> {
        let mut data = buffer.memory[buffer.position..].to_vec();
        data.extend_from_slice(&buffer.memory[..buffer.end]);
        data.truncate(buffer.available_data);
        data
    }

    #[test]
    fn frames_are_written_after_the_data_in_one_piece() {
        let [header, body] = frames();
        let mut buffer = Buffer::with_capacity(512);
        buffer.fill(10);
        let size = buffer.write_frame(&header).expect("room");
        let size = size + buffer.write_frame(&body).expect("room");

        let mut expected = vec![0; 10];
        expected.extend(serialized(&header));
        expected.extend(serialized(&body));
        assert_eq!(size as usize, expected.len() - 10);
        assert_eq!(buffer.end, expected.len());
        assert_eq!(waiting(&buffer), expected);
    }

    /// A field of any length is copied whole, and nothing past it is touched.
    #[test]
    fn fields_of_every_length_are_copied_whole() {
        let from: Vec<u8> = (1..=40).collect();
        for n in 0..=40 {
            let mut to = [0u8; 41];
            copy(&mut to[..n], &from[..n]);
            assert_eq!(&to[..n], &from[..n], "{n} bytes");
            assert!(to[n..].iter().all(|&b| b == 0), "{n} bytes");
        }
    }

    /// Properties of every short length, each copy's branch, write the bytes a vector gets.
    #[test]
    fn short_properties_are_written_as_a_vector_gets_them() {
        for n in 0..=20 {
            let text = "abcdefghijklmnopqrstuvwxyz"[..n].to_string();
            let header = AMQPFrame::Header(
                1,
                AMQPContentHeader {
                    class_id: 60,
                    body_size: n as u64,
                    properties: BasicProperties::default()
                        .with_message_id(text.clone().into())
                        .with_type(text.into())
                        .with_delivery_mode(2),
                },
            );
            let mut buffer = Buffer::with_capacity(256);
            buffer.fill(3);
            buffer.write_frame(&header).expect("room");
            assert_eq!(
                waiting(&buffer),
                [vec![0; 3], serialized(&header)].concat(),
                "{n} bytes"
            );
        }
    }

    #[test]
    fn a_frame_past_the_end_of_the_memory_wraps_round_it() {
        let [header, body] = frames();
        let mut buffer = Buffer::with_capacity(128);
        // 30 bytes free after the data, 60 before it: the header fits in neither alone.
        buffer.fill(98);
        buffer.consume(60);
        assert!(buffer.write_frame(&header).is_ok());
        assert!(buffer.end < buffer.position, "the frame wraps");

        let expected = [vec![0; 38], serialized(&header)].concat();
        assert_eq!(waiting(&buffer), expected);

        // 14 bytes left, no room for the body: the data waiting is left as it was.
        let (end, available) = (buffer.end, buffer.available_data);
        assert!(matches!(
            buffer.write_frame(&body),
            Err(GenError::BufferTooSmall(_))
        ));
        assert_eq!((buffer.end, buffer.available_data), (end, available));
        assert_eq!(waiting(&buffer), expected);
    }

    #[test]
    fn a_body_past_the_end_of_the_memory_wraps_round_it() {
        let [_, body] = frames();
        let mut buffer = Buffer::with_capacity(128);
        // 28 bytes free after the data, 90 before it: the body, 48, wraps.
        buffer.fill(100);
        buffer.consume(90);
        assert!(buffer.write_frame(&body).is_ok());
        assert!(buffer.end < buffer.position, "the frame wraps");
        assert_eq!(waiting(&buffer), [vec![0; 10], serialized(&body)].concat());
    }
}
