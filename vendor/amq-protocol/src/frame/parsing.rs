/// Traits required for parsing
pub use crate::types::parsing::traits;
use crate::{
    frame::*,
    protocol::{basic::parse_properties, *},
    types::parsing::*,
};
use nom::{
    Parser,
    bytes::streaming::{tag, take},
    combinator::{all_consuming, flat_map, map, map_opt, map_res},
    error::context,
};
use traits::ParsableInput;

/// Parse a channel id
pub fn parse_channel<I: ParsableInput>(i: I) -> ParserResult<I, AMQPChannel> {
    context("parse_channel", map(parse_id, From::from)).parse(i)
}

/// Parse the protocol header
pub fn parse_protocol_header<I: ParsableInput>(i: I) -> ParserResult<I, ProtocolVersion> {
    context(
        "parse_protocol_header",
        map(
            (
                tag(&metadata::NAME.as_bytes()[1..]),
                tag(&[0][..]),
                parse_short_short_uint,
                parse_short_short_uint,
                parse_short_short_uint,
            ),
            |(_, _, major, minor, revision)| ProtocolVersion {
                major,
                minor,
                revision,
            },
        ),
    )
    .parse(i)
}

/// Parse the frame type
pub fn parse_frame_type<I: ParsableInput>(i: I) -> ParserResult<I, AMQPFrameType> {
    context(
        "parse_frame_type",
        map_opt(parse_short_short_uint, |method| match method {
            c if c == metadata::NAME.as_bytes()[0] => Some(AMQPFrameType::ProtocolHeader),
            constants::FRAME_METHOD => Some(AMQPFrameType::Method),
            constants::FRAME_HEADER => Some(AMQPFrameType::Header),
            constants::FRAME_BODY => Some(AMQPFrameType::Body),
            constants::FRAME_HEARTBEAT => Some(AMQPFrameType::Heartbeat),
            _ => None,
        }),
    )
    .parse(i)
}

/// Parse a full AMQP Frame (with contents)
pub fn parse_frame<I: ParsableInput>(i: I) -> ParserResult<I, AMQPFrame> {
    context(
        "parse_frame",
        flat_map(parse_frame_type, move |frame_type| {
            move |i: I| match frame_type {
                AMQPFrameType::ProtocolHeader => {
                    map(parse_protocol_header, AMQPFrame::ProtocolHeader).parse(i)
                }
                frame_type => map_res(
                    parse_raw_frame(frame_type),
                    |AMQPRawFrame {
                         channel_id,
                         frame_type,
                         payload,
                     }: AMQPRawFrame<I>| match frame_type {
                        // This should be unreachable be better have a sensitive value anyways
                        AMQPFrameType::ProtocolHeader => {
                            Ok(AMQPFrame::ProtocolHeader(ProtocolVersion::amqp_0_9_1()))
                        }
                        AMQPFrameType::Method => all_consuming(parse_class)
                            .parse(payload)
                            .map(|(_, m)| AMQPFrame::Method(channel_id, m)),
                        AMQPFrameType::Header => all_consuming(parse_content_header)
                            .parse(payload)
                            .map(|(_, h)| AMQPFrame::Header(channel_id, h)),
                        AMQPFrameType::Body => Ok(AMQPFrame::Body(
                            channel_id,
                            payload.iter_elements().collect(),
                        )),
                        AMQPFrameType::Heartbeat => Ok(if channel_id == 0 {
                            AMQPFrame::Heartbeat
                        } else {
                            AMQPFrame::InvalidHeartbeat(channel_id)
                        }),
                    },
                )
                .parse(i),
            }
        }),
    )
    .parse(i)
}

/// Parse a full AMQP Frame (with contents) from a plain slice: the same as [`parse_frame`],
/// with the frames of every message read directly (Ponte: PONTE.md). A method frame, a content
/// header, a body and a heartbeat that are whole are read here (a header by
/// [`parse_content_header`], `basic.deliver` and `basic.ack` field by field); anything else,
/// and anything that does not read, goes to [`parse_frame`], so that what is incomplete or
/// broken is answered as it was.
pub fn parse_frame_slice(i: &[u8]) -> ParserResult<&[u8], AMQPFrame> {
    match frame_in_place(i) {
        Some(read) => Ok(read),
        None => parse_frame(i),
    }
}

/// A whole frame at the start of `i` and what follows it, or `None`.
fn frame_in_place(i: &[u8]) -> Option<(&[u8], AMQPFrame)> {
    let (&kind, rest) = i.split_first()?;
    let channel_id = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]);
    let size = u32::from_be_bytes(rest.get(2..6)?.try_into().ok()?) as usize;
    let end = 6usize.checked_add(size)?;
    let payload = rest.get(6..end)?;
    if *rest.get(end)? != constants::FRAME_END {
        return None;
    }
    let after = &rest[end + 1..];
    let frame = match kind {
        constants::FRAME_METHOD => AMQPFrame::Method(channel_id, method_in_place(payload)?),
        constants::FRAME_HEADER => {
            let (_, header) = all_consuming(parse_content_header).parse(payload).ok()?;
            AMQPFrame::Header(channel_id, header)
        }
        constants::FRAME_BODY => AMQPFrame::Body(channel_id, payload.to_vec()),
        constants::FRAME_HEARTBEAT if channel_id == 0 => AMQPFrame::Heartbeat,
        constants::FRAME_HEARTBEAT => AMQPFrame::InvalidHeartbeat(channel_id),
        _ => return None,
    };
    Some((after, frame))
}

/// A method's payload: `basic.deliver` and `basic.ack` read here (their one flag a bit, not an
/// [`AMQPFlags`](crate::types::AMQPFlags) looked up by name), any other by [`parse_class`].
fn method_in_place(payload: &[u8]) -> Option<AMQPClass> {
    let class = u16::from_be_bytes(payload.get(..2)?.try_into().ok()?);
    let method = u16::from_be_bytes(payload.get(2..4)?.try_into().ok()?);
    let arguments = &payload[4..];
    let read = match (class, method) {
        (60, 60) => {
            let (i, consumer_tag) = parse_short_string(arguments).ok()?;
            let delivery_tag = u64::from_be_bytes(i.get(..8)?.try_into().ok()?);
            let redelivered = i.get(8)? & 1 == 1;
            let (i, exchange) = parse_short_string(&i[9..]).ok()?;
            let (i, routing_key) = parse_short_string(i).ok()?;
            i.is_empty()
                .then_some(basic::AMQPMethod::Deliver(basic::Deliver {
                    consumer_tag,
                    delivery_tag,
                    redelivered,
                    exchange,
                    routing_key,
                }))?
        }
        (60, 80) if arguments.len() == 9 => basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: u64::from_be_bytes(arguments[..8].try_into().ok()?),
            multiple: arguments[8] & 1 == 1,
        }),
        _ => {
            return all_consuming(parse_class)
                .parse(payload)
                .ok()
                .map(|(_, m)| m);
        }
    };
    Some(AMQPClass::Basic(read))
}

/// Parse a raw AMQP frame
pub fn parse_raw_frame<I: ParsableInput>(
    frame_type: AMQPFrameType,
) -> impl FnMut(I) -> ParserResult<I, AMQPRawFrame<I>> {
    move |i: I| {
        context(
            "parse_raw_frame",
            flat_map((parse_id, parse_long_uint), move |(channel_id, size)| {
                map(
                    (take(size), tag(&[constants::FRAME_END][..])),
                    move |(payload, _)| AMQPRawFrame {
                        frame_type,
                        channel_id,
                        payload,
                    },
                )
            }),
        )
        .parse(i)
    }
}

/// Parse a content header frame
pub fn parse_content_header<I: ParsableInput>(i: I) -> ParserResult<I, AMQPContentHeader> {
    context(
        "parse_content_header",
        map(
            (
                parse_id,
                parse_short_uint,
                parse_long_long_uint,
                context("parse_properties", parse_properties),
            ),
            // weight is always 0 per the spec and unused; accept any value for compatibility
            |(class_id, _weight, body_size, properties)| AMQPContentHeader {
                class_id,
                body_size,
                properties,
            },
        ),
    )
    .parse(i)
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::types::{AMQPValue, FieldTable};

    #[test]
    fn test_protocol_header() {
        assert_eq!(
            parse_frame(&[b'A', b'M', b'Q', b'P', 0, 0, 9, 1][..]),
            Ok((
                &[][..],
                AMQPFrame::ProtocolHeader(ProtocolVersion::amqp_0_9_1())
            ))
        );
    }

    #[test]
    fn test_heartbeat() {
        assert_eq!(
            parse_frame(&[8, 0, 0, 0, 0, 0, 0, 206][..]),
            Ok((&[][..], AMQPFrame::Heartbeat))
        );
        assert_eq!(
            parse_frame(&[8, 0, 1, 0, 0, 0, 0, 206][..]),
            Ok((&[][..], AMQPFrame::InvalidHeartbeat(1)))
        );
    }

    #[test]
    fn test_parse_declare_queue_frame() {
        let frame = AMQPFrame::Method(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: "some_queue".into(),
                passive: true,
                durable: true,
                exclusive: true,
                auto_delete: true,
                nowait: true,
                arguments: Default::default(),
            })),
        );

        let mut buffer = vec![0u8; 30];

        assert!(gen_frame(&frame)(buffer.as_mut_slice().into()).is_ok());
        assert_eq!(parse_frame(buffer.as_slice()), Ok((&[][..], frame)));
    }

    /// `frame` as it goes on the wire.
    fn written(frame: &AMQPFrame) -> Vec<u8> {
        let mut buffer = vec![0u8; 4096];
        let rest = gen_frame(frame)(buffer.as_mut_slice().into())
            .expect("the frame fits")
            .write
            .len();
        let length = buffer.len() - rest;
        buffer.truncate(length);
        buffer
    }

    /// The frames of a message and those around it, as the broker sends them.
    fn frames() -> Vec<AMQPFrame> {
        let mut headers = FieldTable::default();
        headers.insert("x-ponte-replay".into(), AMQPValue::LongString("a".into()));
        headers.insert("count".into(), AMQPValue::LongInt(3));
        let properties = basic::AMQPProperties::default()
            .with_message_id("m-1".into())
            .with_type("referral".into())
            .with_delivery_mode(2)
            .with_headers(headers);
        let deliver = |redelivered| {
            AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: "ctag-1".into(),
                delivery_tag: 4_294_967_301,
                redelivered,
                exchange: "".into(),
                routing_key: "inbound.inps".into(),
            }))
        };
        let ack = |multiple| {
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 77,
                multiple,
            }))
        };
        vec![
            AMQPFrame::Method(1, deliver(false)),
            AMQPFrame::Method(65_535, deliver(true)),
            AMQPFrame::Method(3, ack(true)),
            AMQPFrame::Method(3, ack(false)),
            AMQPFrame::Method(
                3,
                AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                    delivery_tag: 9,
                    multiple: true,
                    requeue: false,
                })),
            ),
            AMQPFrame::Method(
                2,
                AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                    exchange: "".into(),
                    routing_key: "outbound.ors".into(),
                    mandatory: true,
                    immediate: false,
                })),
            ),
            AMQPFrame::Header(
                1,
                AMQPContentHeader {
                    class_id: 60,
                    body_size: 1021,
                    properties,
                },
            ),
            AMQPFrame::Header(
                1,
                AMQPContentHeader {
                    class_id: 60,
                    body_size: 0,
                    properties: Default::default(),
                },
            ),
            AMQPFrame::Body(1, br#"{"message_id":"m-1"}"#.to_vec()),
            AMQPFrame::Body(1, Vec::new()),
            AMQPFrame::Heartbeat,
            AMQPFrame::InvalidHeartbeat(4),
            AMQPFrame::ProtocolHeader(ProtocolVersion::amqp_0_9_1()),
        ]
    }

    #[test]
    fn frames_read_in_place_are_those_the_parser_reads() {
        for frame in frames() {
            let mut wire = written(&frame);
            wire.extend_from_slice(&[1, 0, 1]);
            let read = parse_frame_slice(&wire);
            assert_eq!(read, parse_frame(wire.as_slice()), "{frame:?}");
            assert_eq!(read, Ok((&[1u8, 0, 1][..], frame.clone())));
            // Read in place, not handed to `parse_frame` (all but the protocol header).
            assert!(
                frame_in_place(&wire).is_some() || wire[0] == b'A',
                "{frame:?}"
            );
        }
    }

    #[test]
    fn a_frame_cut_short_or_broken_is_answered_as_the_parser_answers_it() {
        for frame in frames() {
            let wire = written(&frame);
            for length in 0..wire.len() {
                assert_eq!(
                    parse_frame_slice(&wire[..length]),
                    parse_frame(&wire[..length]),
                    "{frame:?} cut at {length}"
                );
            }
            // A frame that does not end with the frame end (the protocol header has none).
            let mut broken = wire.clone();
            *broken.last_mut().unwrap() = 0;
            assert_eq!(
                parse_frame_slice(&broken).is_err(),
                !matches!(frame, AMQPFrame::ProtocolHeader(_))
            );
            assert_eq!(parse_frame_slice(&broken), parse_frame(broken.as_slice()));
        }
    }

    #[test]
    fn a_method_with_bytes_past_its_arguments_is_refused_as_before() {
        for frame in &frames()[..4] {
            let mut wire = written(frame);
            // One more byte inside the payload: its size, then the byte before the frame end.
            let size = u32::from_be_bytes(wire[3..7].try_into().unwrap()) + 1;
            wire[3..7].copy_from_slice(&size.to_be_bytes());
            let end = wire.len() - 1;
            wire.insert(end, 0);
            assert!(parse_frame(wire.as_slice()).is_err(), "{frame:?}");
            assert_eq!(parse_frame_slice(&wire), parse_frame(wire.as_slice()));
        }
    }
}
