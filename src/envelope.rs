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
    String(Cow<'a, str>),
    Array(Vec<Node<'a>>),
    Object(Object<'a>),
}

/// One field of an object: its name and its value.
pub type Field<'a> = (Cow<'a, str>, Node<'a>);

/// A JSON object: its fields in order, each name once. Found by going through them, which for
/// the few fields a message's objects have is cheaper than hashing the name.
#[derive(Debug, Clone, Default)]
pub struct Object<'a>(Vec<Field<'a>>);

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
        Node::String(Cow::Owned(text.into()))
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
            (Node::String(a), Value::String(b)) => a == b,
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

/// A tree that borrows the strings of a `Value`: what the pipeline's steps are given in tests
/// and by tools that hold a message as a `Value`.
impl<'a> From<&'a Value> for Node<'a> {
    fn from(value: &'a Value) -> Node<'a> {
        match value {
            Value::Null => Node::Null,
            Value::Bool(b) => Node::Bool(*b),
            Value::Number(n) => Node::Number(n.clone()),
            Value::String(text) => Node::String(Cow::Borrowed(text)),
            Value::Array(items) => Node::Array(items.iter().map(Node::from).collect()),
            Value::Object(map) => Node::Object(Object(
                map.iter()
                    .map(|(name, value)| (Cow::Borrowed(name.as_str()), Node::from(value)))
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
            Value::String(text) => Node::String(Cow::Owned(text)),
            Value::Array(items) => Node::Array(items.into_iter().map(Node::from).collect()),
            Value::Object(map) => Node::Object(Object(
                map.into_iter()
                    .map(|(name, value)| (Cow::Owned(name), Node::from(value)))
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
            .find(|(n, _)| n == name)
            .map(|(_, value)| value)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Node<'a>> {
        self.0
            .iter_mut()
            .find(|(n, _)| n == name)
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
            None => self.0.push((Cow::Borrowed(name), value)),
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
/// One difference, on purpose: serde_json, with a feature another crate turns on, reads an
/// object whose one key is `$serde_json::private::RawValue` as the JSON text in its string. Here
/// it is an object with that field, as the sender wrote it.
pub fn parse(text: &str) -> serde_json::Result<Node<'_>> {
    let mut stacks = Stacks {
        fields: Vec::with_capacity(64),
        elements: Vec::with_capacity(16),
    };
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let tree = Building {
        stacks: &mut stacks,
        place: Place::Envelope,
    };
    let node = serde::de::DeserializeSeed::deserialize(tree, &mut deserializer)?;
    deserializer.end()?;
    Ok(node)
}

/// The fields and the elements of the objects and arrays a parse is inside of: each object is
/// made once its last field is read, at its size.
struct Stacks<'de> {
    fields: Vec<Field<'de>>,
    elements: Vec<Node<'de>>,
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

    fn visit_borrowed_str<E>(self, value: &'de str) -> Result<Node<'de>, E> {
        Ok(Node::String(Cow::Borrowed(value)))
    }

    fn visit_str<E>(self, value: &str) -> Result<Node<'de>, E> {
        Ok(Node::String(Cow::Owned(value.to_owned())))
    }

    fn visit_string<E>(self, value: String) -> Result<Node<'de>, E> {
        Ok(Node::String(Cow::Owned(value)))
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
    type Value = Cow<'de, str>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Name {
    type Value = Cow<'de, str>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a field name")
    }

    fn visit_borrowed_str<E>(self, value: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(value))
    }

    fn visit_str<E>(self, value: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(value.to_owned()))
    }

    fn visit_string<E>(self, value: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(value))
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
        f(&Node::String(Cow::Borrowed(string)))
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

    #[test]
    fn strings_without_escapes_are_borrowed_from_the_text() {
        let node = parse(r#"{"plain": "text", "escaped\t": "a\nb"}"#).unwrap();
        let fields = &node.as_object().unwrap().0;
        assert!(matches!(fields[0].0, Cow::Borrowed("plain")));
        assert!(matches!(fields[0].1, Node::String(Cow::Borrowed("text"))));
        assert!(matches!(fields[1].0, Cow::Owned(_)));
        assert!(matches!(&fields[1].1, Node::String(Cow::Owned(s)) if s == "a\nb"));
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
}
