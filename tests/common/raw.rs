//! A publisher that writes AMQP frames by hand, for what no client library lets a test send: a
//! message whose properties are not what the specification allows (a short string that is not
//! UTF-8), as a partner's own client may well publish and RabbitMQ passes on.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A message's properties as they go on the wire, any bytes allowed: JSON and persistent, with
/// what a case adds.
pub struct Properties {
    headers: Option<Vec<u8>>,
    delivery_mode: u8,
    expiration: Option<Vec<u8>>,
    message_id: Option<Vec<u8>>,
    kind: Option<Vec<u8>>,
    user_id: Option<Vec<u8>>,
}

impl Properties {
    pub fn json() -> Properties {
        Properties {
            headers: None,
            delivery_mode: 2,
            expiration: None,
            message_id: None,
            kind: None,
            user_id: None,
        }
    }

    /// One more header, `name` = `value` of AMQP type `tag` (`S`: long string, `F`: table,
    /// `A`: array).
    pub fn header(mut self, name: &[u8], tag: u8, value: &[u8]) -> Properties {
        self.headers
            .get_or_insert_with(Vec::new)
            .extend(field(name, tag, value));
        self
    }

    /// Not persistent.
    pub fn transient(mut self) -> Properties {
        self.delivery_mode = 1;
        self
    }

    pub fn expiration(mut self, milliseconds: &[u8]) -> Properties {
        self.expiration = Some(milliseconds.to_vec());
        self
    }

    pub fn message_id(mut self, id: &[u8]) -> Properties {
        self.message_id = Some(id.to_vec());
        self
    }

    pub fn kind(mut self, kind: &[u8]) -> Properties {
        self.kind = Some(kind.to_vec());
        self
    }

    /// The publisher's broker user, which RabbitMQ checks.
    pub fn user_id(mut self, user: &[u8]) -> Properties {
        self.user_id = Some(user.to_vec());
        self
    }

    /// The property flags, and the values in the order the flags give them.
    fn encode(&self) -> (u16, Vec<u8>) {
        let (mut flags, mut values) = (CONTENT_TYPE | DELIVERY_MODE, short(b"application/json"));
        if let Some(table) = &self.headers {
            flags |= HEADERS;
            values.extend(long(table));
        }
        values.push(self.delivery_mode);
        let mut short_property = |flag: u16, value: &Option<Vec<u8>>| {
            if let Some(value) = value {
                flags |= flag;
                values.extend(short(value));
            }
        };
        short_property(EXPIRATION, &self.expiration);
        short_property(MESSAGE_ID, &self.message_id);
        short_property(TYPE, &self.kind);
        short_property(USER_ID, &self.user_id);
        (flags, values)
    }
}

/// An array of long strings, as a header's value (`A`).
pub fn strings(items: &[&[u8]]) -> Vec<u8> {
    items
        .iter()
        .flat_map(|item| [vec![b'S'], long(item)].concat())
        .collect()
}

/// Property flags of a content header (AMQP 0-9-1, basic class), in the order their values
/// follow one another.
const CONTENT_TYPE: u16 = 1 << 15;
const HEADERS: u16 = 1 << 13;
const DELIVERY_MODE: u16 = 1 << 12;
const EXPIRATION: u16 = 1 << 8;
const MESSAGE_ID: u16 = 1 << 7;
const TYPE: u16 = 1 << 5;
const USER_ID: u16 = 1 << 4;

/// One field of a table: its name, its type, and its value (with its length, for `S` and `F`).
pub fn field(name: &[u8], tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = short(name);
    out.push(tag);
    out.extend(long(value));
    out
}

/// A short string: one length byte, then the bytes as given.
fn short(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::try_from(bytes.len()).expect("a short string holds 255 bytes")];
    out.extend_from_slice(bytes);
    out
}

/// A long string: four length bytes, then the bytes as given.
fn long(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

/// Publishes `body` to `queue` (default exchange) with `properties`; returns once the broker
/// confirmed it.
pub async fn publish(url: &str, queue: &str, body: &[u8], properties: Properties) {
    let uri: lapin::uri::AMQPUri = url.parse().expect("broker URL");
    let (queue, body) = (queue.to_string(), body.to_vec());
    let (flags, values) = properties.encode();
    tokio::task::spawn_blocking(move || {
        let mut amqp = Raw::connect(&uri);
        amqp.publish(&queue, &body, flags, &values);
        amqp.close();
    })
    .await
    .expect("the raw publisher ran");
}

struct Raw(TcpStream);

impl Raw {
    fn connect(uri: &lapin::uri::AMQPUri) -> Raw {
        let socket = TcpStream::connect((uri.authority.host.as_str(), uri.authority.port))
            .expect("the broker accepts connections");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut amqp = Raw(socket);
        amqp.0.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
        amqp.expect(0, (10, 10));
        let credentials = format!(
            "\0{}\0{}",
            uri.authority.userinfo.username, uri.authority.userinfo.password
        );
        let mut start_ok = long(b"");
        start_ok.extend(short(b"PLAIN"));
        start_ok.extend(long(credentials.as_bytes()));
        start_ok.extend(short(b"en_US"));
        amqp.method(0, (10, 11), &start_ok);
        let tune = amqp.expect(0, (10, 30));
        // The broker's channel and frame limits, no heartbeats: the connection lives a second.
        let mut tune_ok = tune[..6].to_vec();
        tune_ok.extend_from_slice(&[0, 0]);
        amqp.method(0, (10, 31), &tune_ok);
        let mut open = short(uri.vhost.as_bytes());
        open.extend(short(b""));
        open.push(0);
        amqp.method(0, (10, 40), &open);
        amqp.expect(0, (10, 41));
        amqp.method(1, (20, 10), &short(b""));
        amqp.expect(1, (20, 11));
        amqp.method(1, (85, 10), &[0]);
        amqp.expect(1, (85, 11));
        amqp
    }

    fn publish(&mut self, queue: &str, body: &[u8], flags: u16, values: &[u8]) {
        let mut publish = vec![0, 0];
        publish.extend(short(b""));
        publish.extend(short(queue.as_bytes()));
        publish.push(0);
        self.method(1, (60, 40), &publish);
        let mut header = Vec::new();
        header.extend_from_slice(&60u16.to_be_bytes());
        header.extend_from_slice(&0u16.to_be_bytes());
        header.extend_from_slice(&(body.len() as u64).to_be_bytes());
        header.extend_from_slice(&flags.to_be_bytes());
        header.extend_from_slice(values);
        self.frame(2, 1, &header);
        self.frame(3, 1, body);
        // basic.ack: the broker has the message.
        self.expect(1, (60, 80));
    }

    fn close(mut self) {
        let mut close = 200u16.to_be_bytes().to_vec();
        close.extend(short(b"done"));
        close.extend_from_slice(&[0, 0, 0, 0]);
        self.method(0, (10, 50), &close);
        self.expect(0, (10, 51));
    }

    fn frame(&mut self, kind: u8, channel: u16, payload: &[u8]) {
        let mut frame = vec![kind];
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(0xce);
        self.0.write_all(&frame).unwrap();
    }

    fn method(&mut self, channel: u16, (class, method): (u16, u16), arguments: &[u8]) {
        let mut payload = class.to_be_bytes().to_vec();
        payload.extend_from_slice(&method.to_be_bytes());
        payload.extend_from_slice(arguments);
        self.frame(1, channel, &payload);
    }

    /// Reads frames until the method `(class, method)` on `channel`, and returns its arguments;
    /// any other method (a close, say) fails the test with its text.
    fn expect(&mut self, channel: u16, (class, method): (u16, u16)) -> Vec<u8> {
        loop {
            let mut head = [0u8; 7];
            self.0.read_exact(&mut head).expect("the broker answers");
            let size = u32::from_be_bytes(head[3..7].try_into().unwrap()) as usize;
            let mut payload = vec![0u8; size + 1];
            self.0.read_exact(&mut payload).unwrap();
            if head[0] != 1 {
                continue;
            }
            let got = (
                u16::from_be_bytes([payload[0], payload[1]]),
                u16::from_be_bytes([payload[2], payload[3]]),
            );
            let on = u16::from_be_bytes([head[1], head[2]]);
            assert_eq!(
                (on, got),
                (channel, (class, method)),
                "unexpected method: {}",
                String::from_utf8_lossy(&payload[4..size])
            );
            return payload[4..size].to_vec();
        }
    }
}
