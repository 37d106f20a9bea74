//! The envelope as the pipeline holds it: a JSON tree that borrows its strings from the
//! delivery's body, objects as their fields in the sender's order. Decoding it allocates only
//! for objects, arrays and strings with escapes, where a `serde_json::Value` allocates for every
//! string and name and hashes every name; cloning it for a second recipient copies no text the
//! body already holds. The schemas validate it as it is (see [`Tree`]); a copy is written from
//! it byte for byte as serde_json writes the same value.

use std::borrow::Cow;
use std::collections::HashMap;
use std::collections::hash_map::Entry;

use jsonschema::JsonType;
use jsonschema::json::{Array, Json, NodeIdentity};
use serde::ser::SerializeMap;
use serde_json::{Number, Value};

/// One JSON value of a message.
#[derive(Debug, Clone)]
pub enum Node<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Text<'a>),
    Array(Vec<Node<'a>>),
    Object(Object<'a>),
}

/// One field of an object: its name and its value.
pub type Field<'a> = (Text<'a>, Node<'a>);

/// A string of a message or a field's name: its text, borrowed or owned, and whether it is known
/// to need no escapes in JSON. Most strings of a copy are the sender's, read from between their
/// quotes where the sender wrote no escape: JSON allows no quote, backslash or control character
/// there unescaped, so the text goes into the copy as it is, without looking at its characters
/// again (see [`Node::write_json`]). Only this module's readers of JSON text can say so of a
/// string; any other is looked at when written.
#[derive(Clone)]
pub struct Text<'a>(Source<'a>);

#[derive(Clone)]
enum Source<'a> {
    /// The text between a string's quotes in a message, with no escape: JSON as it stands.
    Verbatim(&'a str),
    Borrowed(&'a str),
    Owned(String),
}

impl<'a> Text<'a> {
    /// Text the gateway did not read from between a string's quotes: written with escapes where
    /// it needs them.
    pub fn borrowed(text: &'a str) -> Text<'a> {
        Text(Source::Borrowed(text))
    }

    pub fn owned(text: String) -> Text<'a> {
        Text(Source::Owned(text))
    }

    /// The text of a JSON string read between its quotes, where no escape was found: only this
    /// module's readers, which have found the closing quote and no backslash or control
    /// character before it, may say so.
    fn verbatim(text: &'a str) -> Text<'a> {
        Text(Source::Verbatim(text))
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            Source::Verbatim(text) | Source::Borrowed(text) => text,
            Source::Owned(text) => text,
        }
    }
}

impl std::ops::Deref for Text<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Text<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<str> for Text<'_> {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl std::fmt::Debug for Text<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

/// A JSON object: its fields in order, each name once. Found by going through them, which for
/// the few fields a message's objects have is cheaper than hashing the name.
#[derive(Debug, Default)]
pub struct Object<'a>(Vec<Field<'a>>);

impl Clone for Object<'_> {
    /// A copy with the original's room: a message's envelope is cloned for each recipient but
    /// the last, and mapping adds fields to each clone's envelope and payload. `Vec::clone`
    /// makes a block of the fields' number, which the first field added then moved to a
    /// larger one.
    fn clone(&self) -> Self {
        let mut fields = Vec::with_capacity(self.0.capacity());
        fields.extend(self.0.iter().cloned());
        Object(fields)
    }
}

impl<'a> Node<'a> {
    /// The field `name`, when this is an object that has it.
    pub fn get(&self, name: &str) -> Option<&Node<'a>> {
        self.as_object()?.get(name)
    }

    /// [`Node::get`], for changing the value.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Node<'a>> {
        self.as_object_mut()?.get_mut(name)
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::String(text) => Some(text),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Node<'a>]> {
        match self {
            Node::Array(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_array_mut(&mut self) -> Option<&mut Vec<Node<'a>>> {
        match self {
            Node::Array(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_object(&self) -> Option<&Object<'a>> {
        match self {
            Node::Object(object) => Some(object),
            _ => None,
        }
    }

    pub fn as_object_mut(&mut self) -> Option<&mut Object<'a>> {
        match self {
            Node::Object(object) => Some(object),
            _ => None,
        }
    }

    /// An object of `fields`, in their order; a name given twice keeps the last value.
    pub fn object<const N: usize>(fields: [(&'static str, Node<'a>); N]) -> Node<'a> {
        let mut object = Object(Vec::with_capacity(N));
        for (name, value) in fields {
            object.insert(name, value);
        }
        Node::Object(object)
    }

    /// A string node that owns its text.
    pub fn text(text: impl Into<String>) -> Node<'a> {
        Node::String(Text::owned(text.into()))
    }

    /// The same value as a `serde_json::Value`: for rejection reports and tests, never on the
    /// way of a message that is delivered.
    pub fn to_value(&self) -> Value {
        match self {
            Node::Null => Value::Null,
            Node::Bool(b) => Value::Bool(*b),
            Node::Number(n) => Value::Number(n.clone()),
            Node::String(text) => Value::String(text.to_string()),
            Node::Array(items) => Value::Array(items.iter().map(Node::to_value).collect()),
            Node::Object(object) => Value::Object(
                object
                    .iter()
                    .map(|(name, value)| (name.to_string(), value.to_value()))
                    .collect(),
            ),
        }
    }

    /// Whether this is equal to `value` as JSON Schema's `const` and `enum` compare: numbers
    /// by their value, objects whatever their order.
    pub fn equals(&self, value: &Value) -> bool {
        match (self, value) {
            (Node::Null, Value::Null) => true,
            (Node::Bool(a), Value::Bool(b)) => a == b,
            (Node::Number(a), Value::Number(_)) => {
                jsonschema::json::cmp::equal(&Value::Number(a.clone()), value)
            }
            (Node::String(a), Value::String(b)) => a.as_str() == b,
            (Node::Array(a), Value::Array(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.equals(b))
            }
            (Node::Object(a), Value::Object(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .all(|(name, a)| b.get(name).is_some_and(|b| a.equals(b)))
            }
            _ => false,
        }
    }
}

impl Node<'_> {
    /// Appends the JSON text of this value to `out`: what serde_json writes of the same value,
    /// byte for byte (no spaces, fields in their order, serde_json's escapes and numbers). A
    /// string read from the message without escapes is copied as it is between its quotes; any
    /// other string is escaped by sonic-rs, as every string was before (see
    /// [`crate::decode::encode_node`]).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Node::Null => out.extend_from_slice(b"null"),
            Node::Bool(true) => out.extend_from_slice(b"true"),
            Node::Bool(false) => out.extend_from_slice(b"false"),
            Node::Number(number) => sonic_rs::to_writer(&mut *out, number)
                .expect("serde_json's numbers are always finite"),
            Node::String(text) => text.write_json(out),
            Node::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    item.write_json(out);
                }
                out.push(b']');
            }
            Node::Object(object) => {
                out.push(b'{');
                for (i, (name, value)) in object.0.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    name.write_json(out);
                    out.push(b':');
                    value.write_json(out);
                }
                out.push(b'}');
            }
        }
    }
}

impl Text<'_> {
    /// Appends the text as a JSON string, in its quotes.
    fn write_json(&self, out: &mut Vec<u8>) {
        match &self.0 {
            Source::Verbatim(text) => {
                out.reserve(text.len() + 2);
                out.push(b'"');
                out.extend_from_slice(text.as_bytes());
                out.push(b'"');
            }
            Source::Borrowed(text) => escaped(text, out),
            Source::Owned(text) => escaped(text, out),
        }
    }
}

/// `text` as a JSON string, escaped where it needs it.
fn escaped(text: &str, out: &mut Vec<u8>) {
    sonic_rs::to_writer(out, text).expect("a string always serializes");
}

/// A tree that borrows the strings of a `Value`: what the pipeline's steps are given in tests
/// and by tools that hold a message as a `Value`.
impl<'a> From<&'a Value> for Node<'a> {
    fn from(value: &'a Value) -> Node<'a> {
        match value {
            Value::Null => Node::Null,
            Value::Bool(b) => Node::Bool(*b),
            Value::Number(n) => Node::Number(n.clone()),
            Value::String(text) => Node::String(Text::borrowed(text)),
            Value::Array(items) => Node::Array(items.iter().map(Node::from).collect()),
            Value::Object(map) => Node::Object(Object(
                map.iter()
                    .map(|(name, value)| (Text::borrowed(name), Node::from(value)))
                    .collect(),
            )),
        }
    }
}

/// A tree that owns what `value` held.
impl From<Value> for Node<'static> {
    fn from(value: Value) -> Node<'static> {
        match value {
            Value::Null => Node::Null,
            Value::Bool(b) => Node::Bool(b),
            Value::Number(n) => Node::Number(n),
            Value::String(text) => Node::String(Text::owned(text)),
            Value::Array(items) => Node::Array(items.into_iter().map(Node::from).collect()),
            Value::Object(map) => Node::Object(Object(
                map.into_iter()
                    .map(|(name, value)| (Text::owned(name), Node::from(value)))
                    .collect(),
            )),
        }
    }
}

impl<'a> Object<'a> {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Node<'a>> {
        self.0
            .iter()
            .find(|(n, _)| *n == *name)
            .map(|(_, value)| value)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Node<'a>> {
        self.0
            .iter_mut()
            .find(|(n, _)| *n == *name)
            .map(|(_, value)| value)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Sets the field `name`: in its place when the object has it, else after the others (as
    /// serde_json's ordered map does).
    pub fn insert(&mut self, name: &'static str, value: Node<'a>) {
        match self.get_mut(name) {
            Some(slot) => *slot = value,
            None => self.0.push((Text::borrowed(name), value)),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Node<'a>)> {
        self.0.iter().map(|(name, value)| (&**name, value))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(name, _)| &**name)
    }

    /// The fields themselves, to keep some and put them in an order.
    pub fn fields_mut(&mut self) -> &mut Vec<Field<'a>> {
        &mut self.0
    }
}

impl serde::Serialize for Node<'_> {
    /// As `serde_json::Value` serializes: a copy's bytes are what serde_json would write.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Node::Null => serializer.serialize_unit(),
            Node::Bool(b) => serializer.serialize_bool(*b),
            Node::Number(n) => n.serialize(serializer),
            Node::String(text) => serializer.serialize_str(text),
            Node::Array(items) => serializer.collect_seq(items),
            Node::Object(object) => {
                let mut map = serializer.serialize_map(Some(object.len()))?;
                for (name, value) in object.iter() {
                    map.serialize_entry(name, value)?;
                }
                map.end()
            }
        }
    }
}

/// Parses `text` as serde_json parses it into a `Value` (the same values, the same field order,
/// a repeated name's last value at its first place, the same errors), with the strings written
/// without escapes borrowed from `text`. Each object and array is made once at its final size:
/// a field is kept on a stack until its object ends, and the envelope and its `payload` are
/// made with room for the fields mapping adds to every copy (see [`Place::room`]).
///
/// Read by [`parse_plain`] when it can, by serde_json's parser otherwise.
///
/// One difference, on purpose: serde_json, with a feature another crate turns on, reads an
/// object whose one key is `$serde_json::private::RawValue` as the JSON text in its string. Here
/// it is an object with that field, as the sender wrote it.
pub fn parse(text: &str) -> serde_json::Result<Node<'_>> {
    match parse_plain(text, SERDE_DEPTH) {
        Some(node) => Ok(node),
        None => parse_by_serde(text),
    }
}

/// The arrays and objects serde_json's parser reads inside one another before it stops with
/// "recursion limit exceeded" (its `remaining_depth`, 128, counted down at each one entered).
const SERDE_DEPTH: usize = 127;

/// [`parse`] by serde_json's own parser: it reads the text [`parse_plain`] declines, and names
/// what is wrong with it.
pub(crate) fn parse_by_serde(text: &str) -> serde_json::Result<Node<'_>> {
    let mut stacks = Stacks::new();
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let tree = Building {
        stacks: &mut stacks,
        place: Place::Envelope,
    };
    let node = serde::de::DeserializeSeed::deserialize(tree, &mut deserializer)?;
    deserializer.end()?;
    Ok(node)
}

/// Reads `text` in one pass when it is JSON nested at most `max_depth` arrays and objects deep
/// (and no deeper than serde_json reads): the tree serde_json's parser would make of it (see
/// [`parse`]), or `None` for anything else, which that parser then reads or names.
///
/// Messages are read here, in some 40% fewer instructions than through serde's visitors:
/// whitespace, structure, strings without escapes (borrowed, their end found eight bytes at a
/// time) and integers are read in place, and the depth is kept to as the reading goes, where
/// serde_json's parser needs a scan of the whole body first. A string with escapes and a
/// number that is not a plain integer are handed to serde_json one token at a time, so that
/// their values are its own to the last bit (its `float_roundtrip` feature is on). Broken text
/// of any kind gives `None`, never an error of its own: the errors senders see stay
/// serde_json's.
pub fn parse_plain(text: &str, max_depth: usize) -> Option<Node<'_>> {
    let mut reading = Plain {
        text,
        at: 0,
        depth: 0,
        max_depth: max_depth.min(SERDE_DEPTH),
        stacks: Stacks::new(),
    };
    reading.skip_whitespace();
    let node = reading.value(Place::Envelope)?;
    reading.skip_whitespace();
    (reading.at == text.len()).then_some(node)
}

/// A reading by [`parse_plain`]: where it is in the text, and how deep.
struct Plain<'de> {
    text: &'de str,
    at: usize,
    depth: usize,
    max_depth: usize,
    stacks: Stacks<'de>,
}

impl<'de> Plain<'de> {
    fn bytes(&self) -> &'de [u8] {
        self.text.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.at).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn value(&mut self, place: Place) -> Option<Node<'de>> {
        match self.peek()? {
            b'"' => self.string().map(Node::String),
            b'{' => self.object(place),
            b'[' => self.array(),
            b't' => self.literal("true", Node::Bool(true)),
            b'f' => self.literal("false", Node::Bool(false)),
            b'n' => self.literal("null", Node::Null),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn literal(&mut self, word: &str, node: Node<'de>) -> Option<Node<'de>> {
        self.text[self.at..].starts_with(word).then(|| {
            self.at += word.len();
            node
        })
    }

    /// One level deeper, when the limit allows it.
    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= self.max_depth).then_some(())
    }

    /// After the separator of a list: whether there is another item (`,`) or the list ends.
    fn more(&mut self, end: u8) -> Option<bool> {
        self.skip_whitespace();
        let next = self.peek()?;
        self.at += 1;
        if next == b',' {
            self.skip_whitespace();
            Some(true)
        } else {
            (next == end).then_some(false)
        }
    }

    fn object(&mut self, place: Place) -> Option<Node<'de>> {
        self.enter()?;
        self.at += 1;
        self.skip_whitespace();
        let from = self.stacks.fields.len();
        if self.peek()? == b'}' {
            self.at += 1;
        } else {
            loop {
                if self.peek()? != b'"' {
                    return None;
                }
                let name = self.string()?;
                self.skip_whitespace();
                if self.peek()? != b':' {
                    return None;
                }
                self.at += 1;
                self.skip_whitespace();
                let value = self.value(place.of_field(&name))?;
                self.stacks.fields.push((name, value));
                if !self.more(b'}')? {
                    break;
                }
            }
        }
        self.depth -= 1;
        Some(Node::Object(object(
            &mut self.stacks.fields,
            from,
            place.room(),
        )))
    }

    fn array(&mut self) -> Option<Node<'de>> {
        self.enter()?;
        self.at += 1;
        self.skip_whitespace();
        let from = self.stacks.elements.len();
        if self.peek()? == b']' {
            self.at += 1;
        } else {
            loop {
                let element = self.value(Place::Other)?;
                self.stacks.elements.push(element);
                if !self.more(b']')? {
                    break;
                }
            }
        }
        self.depth -= 1;
        Some(Node::Array(self.stacks.elements.drain(from..).collect()))
    }

    /// A string at its opening quote: borrowed when it has no escapes, else serde_json's
    /// reading of it. A control character, which JSON allows only escaped, gives `None`.
    fn string(&mut self) -> Option<Text<'de>> {
        let start = self.at + 1;
        let end = start + string_stop(&self.bytes()[start..])?;
        match self.bytes()[end] {
            b'"' => {
                self.at = end + 1;
                // No quote, backslash or control character before the closing quote.
                Some(Text::verbatim(&self.text[start..end]))
            }
            b'\\' => self.escaped(end),
            _ => None,
        }
    }

    /// A string with escapes, its first backslash at `at`: read by serde_json.
    fn escaped(&mut self, mut at: usize) -> Option<Text<'de>> {
        // To the closing quote, stepping over each escaped character.
        loop {
            at += 2;
            at += memchr::memchr2(b'"', b'\\', self.bytes().get(at..)?)?;
            if self.bytes()[at] == b'"' {
                break;
            }
        }
        let text: String = serde_json::from_str(&self.text[self.at..=at]).ok()?;
        self.at = at + 1;
        Some(Text::owned(text))
    }

    /// A number: an integer that fits in 18 digits read here, anything else by serde_json.
    fn number(&mut self) -> Option<Node<'de>> {
        let start = self.at;
        let length = self.bytes()[start..]
            .iter()
            .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
            .unwrap_or(self.text.len() - start);
        self.at = start + length;
        let token = &self.text[start..self.at];
        let (negative, digits) = match token.strip_prefix('-') {
            Some(digits) => (true, digits),
            None => (false, token),
        };
        let plain = matches!(digits.len(), 1..=18)
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (digits.len() == 1 || !digits.starts_with('0'));
        // `-0` is a float to serde_json.
        if plain && !(negative && digits == "0") {
            let value: u64 = digits
                .bytes()
                .fold(0, |value, b| value * 10 + u64::from(b - b'0'));
            return Some(Node::Number(if negative {
                // 18 digits are below 2^63.
                (-(value as i64)).into()
            } else {
                value.into()
            }));
        }
        let mut deserializer = serde_json::Deserializer::from_str(token);
        let node = serde::de::DeserializeSeed::deserialize(
            Building {
                stacks: &mut self.stacks,
                place: Place::Other,
            },
            &mut deserializer,
        )
        .ok()?;
        deserializer.end().ok()?;
        matches!(node, Node::Number(_)).then_some(node)
    }
}

/// Where a string's text stops: the offset of the first `"`, `\` or control character (below
/// U+0020) in `bytes`. Eight bytes at a time, as serde_json's own parser looks for them: most
/// strings of a message are a few words, too short for `memchr`'s vectors to pay for their
/// set-up.
fn string_stop(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::MAX / 255;
    /// Marks the zero bytes of a word with their high bit: the lowest mark is a zero byte,
    /// marks above it may not be (what is looked for is the first).
    fn zero_bytes(word: u64) -> u64 {
        word.wrapping_sub(ONES) & !word
    }
    let mut chunks = bytes.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().expect("chunks of eight"));
        let control = word.wrapping_sub(ONES * 0x20) & !word;
        let quote = zero_bytes(word ^ (ONES * u64::from(b'"')));
        let backslash = zero_bytes(word ^ (ONES * u64::from(b'\\')));
        let found = (control | quote | backslash) & (ONES << 7);
        if found != 0 {
            return Some(at + found.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|i| at + i)
}

/// The fields and the elements of the objects and arrays a parse is inside of: each object is
/// made once its last field is read, at its size.
struct Stacks<'de> {
    fields: Vec<Field<'de>>,
    elements: Vec<Node<'de>>,
}

/// Fields a thread keeps room for between parses, at most: a parse that grew its stacks past
/// this (a message of thousands of fields) gives its blocks back rather than hold them.
const SPARE_FIELDS: usize = 1024;

thread_local! {
    /// The stacks' blocks of this thread's last parse, empty, for its next one: every message
    /// made two blocks (some 4 KB) and freed them.
    static SPARE: std::cell::Cell<Option<(Vec<Field<'static>>, Vec<Node<'static>>)>> =
        const { std::cell::Cell::new(None) };
}

impl Stacks<'_> {
    fn new() -> Self {
        match SPARE.take() {
            Some((fields, elements)) => Stacks {
                fields: emptied(fields),
                elements: emptied(elements),
            },
            None => Stacks {
                fields: Vec::with_capacity(64),
                elements: Vec::with_capacity(16),
            },
        }
    }
}

impl Drop for Stacks<'_> {
    fn drop(&mut self) {
        if self.fields.capacity() > SPARE_FIELDS || self.elements.capacity() > SPARE_FIELDS {
            return;
        }
        let fields = emptied(std::mem::take(&mut self.fields));
        let elements = emptied(std::mem::take(&mut self.elements));
        SPARE.set(Some((fields, elements)));
    }
}

/// `items` emptied, as a vector of `To`, in the same block when `To` has `From`'s size and
/// alignment (here: the same type, borrowing for another lifetime): collecting a vector's own
/// iterator reuses its block, and there is nothing left in it.
fn emptied<From, To>(mut items: Vec<From>) -> Vec<To> {
    items.clear();
    items.into_iter().map(|_| unreachable!("emptied")).collect()
}

/// Where in the message a value is, for the room its object is made with.
#[derive(Clone, Copy)]
enum Place {
    Envelope,
    Payload,
    Other,
}

impl Place {
    /// Fields more than the sender's an object here is made with room for: those mapping adds
    /// to every copy, `recipient` and `recipient_reference` at the top and `sender_office` in
    /// `payload`.
    fn room(self) -> usize {
        match self {
            Place::Envelope => 2,
            Place::Payload => 1,
            Place::Other => 0,
        }
    }

    /// The place of a value under `name` in an object here.
    fn of_field(self, name: &str) -> Place {
        match (self, name) {
            (Place::Envelope, "payload") => Place::Payload,
            _ => Place::Other,
        }
    }
}

/// Builds one value, objects and arrays through [`Stacks`].
struct Building<'s, 'de> {
    stacks: &'s mut Stacks<'de>,
    place: Place,
}

impl<'de> serde::de::DeserializeSeed<'de> for Building<'_, 'de> {
    type Value = Node<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Node<'de>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Building<'_, 'de> {
    type Value = Node<'de>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("any valid JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Node<'de>, E> {
        Ok(Node::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Node<'de>, E> {
        Ok(Node::Number(value.into()))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Node<'de>, E> {
        Ok(Node::Number(value.into()))
    }

    fn visit_f64<E>(self, value: f64) -> Result<Node<'de>, E> {
        Ok(Number::from_f64(value).map_or(Node::Null, Node::Number))
    }

    /// serde_json's JSON text reader (the only deserializer [`Building`] is given) lends a
    /// string only when it found no escape in it, and refuses control characters unescaped.
    fn visit_borrowed_str<E>(self, value: &'de str) -> Result<Node<'de>, E> {
        Ok(Node::String(Text::verbatim(value)))
    }

    fn visit_str<E>(self, value: &str) -> Result<Node<'de>, E> {
        Ok(Node::String(Text::owned(value.to_owned())))
    }

    fn visit_string<E>(self, value: String) -> Result<Node<'de>, E> {
        Ok(Node::String(Text::owned(value)))
    }

    fn visit_unit<E>(self) -> Result<Node<'de>, E> {
        Ok(Node::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node<'de>, A::Error> {
        let stacks = self.stacks;
        let from = stacks.elements.len();
        while let Some(element) = seq.next_element_seed(Building {
            stacks: &mut *stacks,
            place: Place::Other,
        })? {
            stacks.elements.push(element);
        }
        Ok(Node::Array(stacks.elements.drain(from..).collect()))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Node<'de>, A::Error> {
        let stacks = self.stacks;
        let from = stacks.fields.len();
        while let Some(name) = map.next_key_seed(Name)? {
            let value = map.next_value_seed(Building {
                stacks: &mut *stacks,
                place: self.place.of_field(&name),
            })?;
            stacks.fields.push((name, value));
        }
        Ok(Node::Object(object(
            &mut stacks.fields,
            from,
            self.place.room(),
        )))
    }
}

/// The object of the fields from `from` on, made once at their number and `room` more; a
/// repeated name's value replaces the first one's in its place, as serde_json's map does.
fn object<'de>(fields: &mut Vec<Field<'de>>, from: usize, room: usize) -> Object<'de> {
    /// Up to this many fields, repeated names are found by comparing each with those before it.
    const COMPARED: usize = 16;
    let count = fields.len() - from;
    let mut out = Vec::with_capacity(count + room);
    if count <= COMPARED {
        for (name, value) in fields.drain(from..) {
            match out.iter_mut().find(|(n, _): &&mut Field| *n == name) {
                Some((_, slot)) => *slot = value,
                None => out.push((name, value)),
            }
        }
        return Object(out);
    }
    // Where each field goes: `None` at the end, `Some(i)` over the i-th field kept.
    let mut first: HashMap<&str, usize> = HashMap::with_capacity(count);
    let places: Vec<Option<usize>> = fields[from..]
        .iter()
        .map(|(name, _)| {
            let kept = first.len();
            match first.entry(&**name) {
                Entry::Occupied(at) => Some(*at.get()),
                Entry::Vacant(slot) => {
                    slot.insert(kept);
                    None
                }
            }
        })
        .collect();
    drop(first);
    for ((name, value), place) in fields.drain(from..).zip(places) {
        match place {
            Some(at) => out[at].1 = value,
            None => out.push((name, value)),
        }
    }
    Object(out)
}

/// A field's name, borrowed from the text when it has no escapes.
struct Name;

impl<'de> serde::de::DeserializeSeed<'de> for Name {
    type Value = Text<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Name {
    type Value = Text<'de>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a field name")
    }

    /// As [`Building`]'s: lent by serde_json only without escapes.
    fn visit_borrowed_str<E>(self, value: &'de str) -> Result<Self::Value, E> {
        Ok(Text::verbatim(value))
    }

    fn visit_str<E>(self, value: &str) -> Result<Self::Value, E> {
        Ok(Text::owned(value.to_owned()))
    }

    fn visit_string<E>(self, value: String) -> Result<Self::Value, E> {
        Ok(Text::owned(value))
    }
}

/// The schemas' view of a [`Node`]: what `jsonschema` validates an envelope through, without
/// making a `serde_json::Value` of it.
pub struct Tree;

impl Json for Tree {
    type Node<'a> = &'a Node<'a>;
    type PreparedKey = Box<str>;
    type StringBuffer = ();

    // A look-up goes through the fields, as one pass over them does.
    const KEYS_PER_LOOKUP: usize = 2;
    const ACYCLIC: bool = true;

    fn prepare_key(key: &str) -> Box<str> {
        key.into()
    }

    fn with_string_node<T>((): &mut (), string: &str, f: impl FnOnce(Self::Node<'_>) -> T) -> T {
        f(&Node::String(Text::borrowed(string)))
    }
}

impl<'a> jsonschema::json::Node<'a, Tree> for &'a Node<'a> {
    type Object = &'a Object<'a>;
    type Array = &'a [Node<'a>];
    type Number = &'a Number;

    fn as_object(&self) -> Option<&'a Object<'a>> {
        Node::as_object(self)
    }

    fn as_array(&self) -> Option<&'a [Node<'a>]> {
        Node::as_array(self)
    }

    fn as_string(&self) -> Option<Cow<'a, str>> {
        Node::as_str(self).map(Cow::Borrowed)
    }

    fn as_number(&self) -> Option<&'a Number> {
        match self {
            Node::Number(number) => Some(number),
            _ => None,
        }
    }

    fn as_boolean(&self) -> Option<bool> {
        match self {
            Node::Bool(b) => Some(*b),
            _ => None,
        }
    }

    fn is_null(&self) -> bool {
        matches!(self, Node::Null)
    }

    fn json_type(&self) -> JsonType {
        match self {
            Node::Null => JsonType::Null,
            Node::Bool(_) => JsonType::Boolean,
            Node::Number(_) => JsonType::Number,
            Node::String(_) => JsonType::String,
            Node::Array(_) => JsonType::Array,
            Node::Object(_) => JsonType::Object,
        }
    }

    fn string_length_within(&self, min: u64, max: u64) -> Option<bool> {
        let Node::String(text) = self else {
            return None;
        };
        // A character takes one to four bytes: the bytes often decide it without counting.
        let bytes = text.len() as u64;
        if bytes < min || bytes.div_ceil(4) > max {
            return Some(false);
        }
        if min <= bytes.div_ceil(4) && bytes <= max {
            return Some(true);
        }
        Some((min..=max).contains(&(text.chars().count() as u64)))
    }

    fn equals_value(&self, expected: &Value) -> bool {
        self.equals(expected)
    }

    fn to_value(&self) -> Cow<'a, Value> {
        Cow::Owned(Node::to_value(self))
    }

    fn identity(&self) -> Option<NodeIdentity> {
        Some(NodeIdentity::new(std::ptr::from_ref::<Node>(*self) as usize))
    }
}

/// The fields of an object as the schemas go through them.
pub struct Members<'a>(std::slice::Iter<'a, Field<'a>>);

impl<'a> Iterator for Members<'a> {
    type Item = (&'a str, &'a Node<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(name, value)| (&**name, value))
    }
}

impl<'a> jsonschema::json::Object<'a, Tree> for &'a Object<'a> {
    type Node = &'a Node<'a>;
    type MemberName = &'a str;
    type MembersIter = Members<'a>;

    fn len(&self) -> usize {
        self.0.len()
    }

    fn get(&self, key: &Box<str>) -> Option<&'a Node<'a>> {
        Object::get(self, key)
    }

    fn members(&self) -> Members<'a> {
        Members(self.0.iter())
    }
}

impl<'a> Array<'a, Tree> for &'a [Node<'a>] {
    type Node = &'a Node<'a>;
    type ElementsIter = std::slice::Iter<'a, Node<'a>>;

    fn len(&self) -> usize {
        <[Node]>::len(self)
    }

    fn elements(&self) -> std::slice::Iter<'a, Node<'a>> {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What a tree holds is what serde_json reads from the same text, in the same order.
    #[test]
    fn a_value_and_back_is_the_same_value() {
        let value = json!({"z": [1, -2, 2.5, null, true], "a": {"é": "x\"y", "": {}}});
        let node = Node::from(&value);
        assert_eq!(node.to_value(), value);
        assert_eq!(
            serde_json::to_string(&node).unwrap(),
            serde_json::to_string(&value).unwrap()
        );
    }

    /// A string is no larger for knowing whether it needs escapes: a message's tree is as many
    /// bytes as before.
    #[test]
    fn a_text_is_the_size_of_a_cow() {
        assert_eq!(size_of::<Text>(), size_of::<Cow<str>>());
        assert_eq!(size_of::<Node>(), 32);
    }

    /// A string the gateway did not read from between quotes is escaped when written, whatever
    /// it holds; one read from the text goes as it was.
    #[test]
    fn only_text_read_without_escapes_is_written_as_it_is() {
        let lent = "say \"hi\"\\\n\u{1}";
        let mut object = Object::default();
        object.insert("x\"", Node::String(Text::borrowed(lent)));
        object.insert("y", Node::text(lent));
        object.insert("z", parse(r#""plain \u00e9 é""#).unwrap());
        object.insert("w", parse(r#""a/b é 😀""#).unwrap());
        let mut out = Vec::new();
        Node::Object(object).write_json(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"x\"":"say \"hi\"\\\n\u0001","y":"say \"hi\"\\\n\u0001","z":"plain é é","w":"a/b é 😀"}"#
        );
    }

    /// A clone of a message is made with the room its objects were read with, so that the
    /// fields mapping adds to each recipient's copy do not move them to larger blocks.
    #[test]
    fn a_clone_keeps_the_room_its_objects_were_read_with() {
        let text = r#"{"message_id": "m", "payload": {"office": "x", "items": [{"a": 1}]}}"#;
        let node = parse_plain(text, SERDE_DEPTH).unwrap();
        let top = &node.as_object().unwrap().0;
        assert!(top.capacity() > top.len());
        // Capacities compared too.
        assert!(same_tree(&node, &node.clone()));
    }

    /// A parse's stacks go back to its thread when it ends, in the same blocks, and the next
    /// parse on the thread takes them; stacks a large message grew are let go.
    #[test]
    fn a_thread_keeps_its_stacks_between_parses_within_a_bound() {
        assert!(parse_plain(r#"{"a": [1, 2], "b": {"c": "d"}}"#, SERDE_DEPTH).is_some());
        let (fields, elements) = SPARE.take().expect("the stacks were kept");
        assert!(fields.is_empty() && fields.capacity() >= 64);
        assert!(elements.is_empty() && elements.capacity() >= 16);
        let block = fields.as_ptr() as usize;
        SPARE.set(Some((fields, elements)));
        let stacks = Stacks::new();
        assert_eq!(stacks.fields.as_ptr() as usize, block);
        drop(stacks);

        let fields: Vec<String> = (0..2000).map(|i| format!(r#""f{i}": {i}"#)).collect();
        let large = format!("{{{}}}", fields.join(","));
        let node = parse_plain(&large, SERDE_DEPTH).unwrap();
        assert_eq!(node.as_object().unwrap().0.len(), 2000);
        assert!(SPARE.take().is_none());
        // The next parse makes its stacks anew, and reads as well.
        assert!(check(r#"{"a": [1, {"b": null}], "c": "d"}"#));
    }

    #[test]
    fn strings_without_escapes_are_borrowed_from_the_text() {
        let node = parse(r#"{"plain": "text", "escaped\t": "a\nb"}"#).unwrap();
        let fields = &node.as_object().unwrap().0;
        assert!(matches!(&fields[0].0, Text(Source::Verbatim("plain"))));
        assert!(matches!(
            &fields[0].1,
            Node::String(Text(Source::Verbatim("text")))
        ));
        assert!(matches!(&fields[1].0, Text(Source::Owned(s)) if s == "escaped\t"));
        assert!(matches!(&fields[1].1, Node::String(Text(Source::Owned(s))) if s == "a\nb"));
    }

    /// A repeated name's last value lands at the first one's place, in a small object and in a
    /// large one alike.
    #[test]
    fn a_repeated_name_keeps_its_first_place() {
        for count in [3, 40] {
            let mut text: Vec<String> = (0..count).map(|i| format!("\"k{i}\": {i}")).collect();
            text.push("\"k1\": \"again\"".into());
            text.push("\"k0\": [0]".into());
            let text = format!("{{{}}}", text.join(", "));
            let node = parse(&text).unwrap();
            let ours = serde_json::to_string(&node).unwrap();
            let theirs = serde_json::to_string(&serde_json::from_str::<Value>(&text).unwrap());
            assert_eq!(ours, theirs.unwrap());
            assert_eq!(node.as_object().unwrap().len(), count);
            assert_eq!(node.get("k1").and_then(Node::as_str), Some("again"));
        }
    }

    #[test]
    fn setting_a_field_keeps_its_place_or_adds_it_last() {
        let value = json!({"a": 1, "b": 2});
        let mut node = Node::from(&value);
        let object = node.as_object_mut().unwrap();
        object.insert("a", Node::text("one"));
        object.insert("c", Node::Null);
        assert_eq!(
            serde_json::to_string(&node).unwrap(),
            r#"{"a":"one","b":2,"c":null}"#
        );
    }

    /// `const` and `enum` compare as JSON Schema does: numbers by value, objects in any order.
    #[test]
    fn equality_is_json_schema_s() {
        let value = json!({"n": 1, "o": {"x": [1.0, "s"], "y": null}});
        let node = Node::from(&value);
        assert!(node.equals(&json!({"o": {"y": null, "x": [1, "s"]}, "n": 1.0})));
        assert!(!node.equals(&json!({"n": 1, "o": {"x": [1, "s"]}})));
        assert!(!node.equals(&json!({"n": 2, "o": {"x": [1, "s"], "y": null}})));
        assert!(!Node::from(&json!("1")).equals(&json!(1)));
    }

    /// The same tree, string for string borrowed or owned alike.
    fn same_tree(a: &Node, b: &Node) -> bool {
        let same_text = |a: &Text, b: &Text| {
            a == b && std::mem::discriminant(&a.0) == std::mem::discriminant(&b.0)
        };
        match (a, b) {
            (Node::Null, Node::Null) => true,
            (Node::Bool(a), Node::Bool(b)) => a == b,
            // The same variant and value: `1` and `1.0` are unequal here.
            (Node::Number(a), Node::Number(b)) => a == b,
            (Node::String(a), Node::String(b)) => same_text(a, b),
            (Node::Array(a), Node::Array(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same_tree(a, b))
            }
            (Node::Object(a), Node::Object(b)) => {
                a.0.len() == b.0.len()
                    && a.0.capacity() == b.0.capacity()
                    && a.0
                        .iter()
                        .zip(&b.0)
                        .all(|((an, av), (bn, bv))| same_text(an, bn) && same_tree(av, bv))
            }
            _ => false,
        }
    }

    /// What the one-pass reading makes of a text is what serde_json's parser makes of it, and
    /// where it declines, `parse` still gives serde_json's value or error.
    fn check(text: &str) -> bool {
        let theirs = parse_by_serde(text);
        let plain = parse_plain(text, SERDE_DEPTH);
        if let Some(ours) = &plain {
            let theirs = theirs
                .as_ref()
                .unwrap_or_else(|e| panic!("{text}: read, but {e}"));
            assert!(
                same_tree(ours, theirs),
                "{text}: {ours:?} against {theirs:?}"
            );
        }
        match (parse(text), &theirs) {
            (Ok(ours), Ok(theirs)) => assert!(same_tree(&ours, theirs), "{text}"),
            (Err(ours), Err(theirs)) => assert_eq!(ours.to_string(), theirs.to_string()),
            (ours, theirs) => panic!("{text}: {ours:?} against {theirs:?}"),
        }
        plain.is_some()
    }

    #[test]
    fn messages_are_read_in_one_pass_as_serde_json_reads_them() {
        for name in [
            "referral-cpi-modena",
            "benefit-status-adi-inps",
            "benefit-status-sfl-inps",
            "referral-invalid-cf",
        ] {
            let path = format!("{}/examples/{name}.json", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(path).unwrap();
            assert!(check(&text), "{name} was not read in one pass");
            let compact = serde_json::to_string(&serde_json::from_str::<Value>(&text).unwrap());
            assert!(check(&compact.unwrap()), "{name}, compact");
        }
        // Read in one pass, strings with escapes and numbers other than plain integers too.
        for text in [
            r#"{"e": "\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00", "k\"ey": 1, "é": "😀"}"#,
            r#"{"n": [0, -0, -0.0, 1.5, 1e21, 1E-7, 18446744073709551615, -9223372036854775808]}"#,
            r#"{"n": [999999999999999999, -999999999999999999, 1000000000000000000, 2.5e-308]}"#,
            r#"{"n": [12345678901234567890123, 0.1, -1e-400, 1.0, 1E+2]}"#,
            r#"{"k": 1, "j": 2, "k": {"x": 3}, "j": [4]}"#,
            " \t\r\n{ \"a\" :\n[ 1 , { } , [ ] , true , false , null ] }\n ",
            r#"{"payload": {"a": 1}, "x": {"payload": {}}}"#,
            "[]",
            "\"text\"",
            "-12",
        ] {
            assert!(check(text), "{text} was not read in one pass");
        }
        // Declined, and read or refused by serde_json as before.
        for text in [
            "",
            " ",
            "{",
            r#"{"a": 1,}"#,
            r#"{"a": 1} {"b": 2}"#,
            r#"{"a" 1}"#,
            r#"{"a": [1, 2}"#,
            r#"{"a": "\ud800"}"#,
            r#"{"a": "\x"}"#,
            r#"{"a": "\"#,
            r#"{"a": "b"#,
            "{\"a\": \"tab\there\"}",
            "{\"a\": \"\\n\u{1}\"}",
            r#"{"a": 01}"#,
            r#"{"a": -}"#,
            r#"{"a": 1.}"#,
            r#"{"a": 1e5x}"#,
            r#"{"a": 1e400}"#,
            r#"{"a": 1-2}"#,
            r#"{"a": tru}"#,
            r#"{"a": truex}"#,
            r#"{"a": nul}"#,
            r#"{1: 2}"#,
            "\u{feff}{}",
            "[1] x",
        ] {
            assert!(!check(text), "{text} was read in one pass");
        }
    }

    /// Where a string stops, eight bytes at a time, is where a byte-by-byte look finds it.
    #[test]
    fn a_string_stops_where_a_byte_by_byte_look_finds() {
        let by_byte = |bytes: &[u8]| {
            bytes
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        };
        // Bytes either side of each stop: the control range's end, the quote, the backslash,
        // and bytes with the high bit set.
        let alphabet = [
            0x00, 0x1f, 0x20, b'"', b'#', b'[', b'\\', b']', b'a', 0x7f, 0x80, 0x9f, 0xa0, 0xdc,
            0xff,
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let length = (seed % 40) as usize;
            let bytes: Vec<u8> = (0..length)
                .map(|i| {
                    // Mostly plain bytes, a stop now and then.
                    let pick = (seed >> (i % 48)) as usize;
                    if pick.is_multiple_of(7) {
                        alphabet[pick / 7 % alphabet.len()]
                    } else {
                        b'a' + (pick % 26) as u8
                    }
                })
                .collect();
            assert_eq!(string_stop(&bytes), by_byte(&bytes), "{bytes:?}");
        }
    }

    /// Nesting as deep as serde_json reads is read in one pass, one level more is left to it
    /// (which refuses it), and a pass given a lower limit declines what goes past it.
    #[test]
    fn the_one_pass_keeps_to_its_depth() {
        let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        assert!(check(&nested(SERDE_DEPTH)));
        assert!(!check(&nested(SERDE_DEPTH + 1)));
        assert!(parse(&nested(SERDE_DEPTH + 1)).is_err());
        let text = r#"{"a": {"b": [1]}, "c": 2}"#;
        assert!(parse_plain(text, 3).is_some());
        assert!(parse_plain(text, 2).is_none());
    }

    /// Many generated values, written compact, pretty and with whitespace everywhere, read
    /// the same by both.
    #[test]
    fn generated_texts_are_read_as_serde_json_reads_them() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let long = "n".repeat(70);
        let pieces = [
            "a", "é", "\"", "\\", "\n", "\u{1}", "/", "😀", "\u{2028}", "payload", "", &long,
        ];
        let mut read = 0;
        for _ in 0..3_000 {
            let value = generated(&mut next, &pieces, 0);
            let value = json!({ "payload": value, "v": generated(&mut next, &pieces, 1) });
            let compact = serde_json::to_string(&value).unwrap();
            let pretty = serde_json::to_string_pretty(&value).unwrap();
            let spaced = compact
                .replace(':', " :\t")
                .replace(',', "\r\n,  ")
                .replace('[', "[ ");
            for text in [&compact, &pretty, &spaced] {
                read += usize::from(check(text));
            }
            // Cut short: never read in one pass, refused as serde_json refuses it.
            let cut = &compact[..compact.floor_char_boundary(compact.len() / 2)];
            assert!(!check(cut), "{cut}");
        }
        assert!(read > 8_500, "{read} of 9,000 read in one pass");
    }

    /// A value of up to four levels: objects, arrays, strings of `pieces`, numbers of each kind.
    fn generated(next: &mut impl FnMut() -> u64, pieces: &[&str], depth: u32) -> Value {
        let pick = next() % if depth >= 4 { 6 } else { 8 };
        match pick {
            0 => Value::Null,
            1 => Value::Bool(next().is_multiple_of(2)),
            2 => json!(next() >> (next() % 64)),
            3 => json!(-((next() >> (1 + next() % 63)) as i64)),
            4 => json!(f64::from_bits(next()) % 1e6),
            5 => {
                let text: String = (0..next() % 6)
                    .map(|_| pieces[(next() % pieces.len() as u64) as usize])
                    .collect();
                Value::String(text)
            }
            6 => Value::Array(
                (0..next() % 5)
                    .map(|_| generated(next, pieces, depth + 1))
                    .collect(),
            ),
            _ => {
                let mut object = serde_json::Map::new();
                for _ in 0..next() % 6 {
                    let name = pieces[(next() % pieces.len() as u64) as usize];
                    object.insert(name.to_string(), generated(next, pieces, depth + 1));
                }
                Value::Object(object)
            }
        }
    }
}
