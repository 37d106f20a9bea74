//! Decode: the raw AMQP body becomes a JSON object, or a rejection saying why it cannot: too many
//! bytes, nested too deep, not UTF-8, not JSON, or not an object. Encode: a copy or a receipt
//! becomes the bytes published. Also the JSON Pointers the configuration uses to reach into an
//! envelope.

use crate::envelope::{Node, parse_by_serde, parse_plain};
use crate::rejection::{Code, FieldError, Rejection};

/// Limits applied before any parsing, so a hostile or broken sender cannot make the gateway
/// spend memory or stack on a message it will refuse anyway.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_bytes: usize,
    pub max_depth: usize,
}

impl From<&crate::settings::Limits> for DecodeLimits {
    fn from(limits: &crate::settings::Limits) -> Self {
        DecodeLimits {
            max_bytes: limits.max_message_bytes,
            max_depth: limits.max_depth,
        }
    }
}

/// Turns a message body into the envelope: a JSON value that is always an object, its strings
/// borrowed from the body where they can be.
pub fn decode(body: &[u8], limits: DecodeLimits) -> Result<Node<'_>, Rejection> {
    if body.len() > limits.max_bytes {
        return Err(Rejection::one(
            Code::TooLarge,
            FieldError::new(
                "",
                "maxBytes",
                format!(
                    "message is {} bytes; the limit is {}",
                    body.len(),
                    limits.max_bytes
                ),
            ),
        ));
    }
    // SIMD, chosen at run time; the parser below then reads text known to be UTF-8 and does not
    // check it again.
    let text = simdutf8::compat::from_utf8(body).map_err(|e| {
        Rejection::one(
            Code::InvalidJson,
            FieldError::new(
                "",
                "utf8",
                format!(
                    "message is not valid UTF-8 (first invalid byte at offset {})",
                    e.valid_up_to()
                ),
            ),
        )
    })?;
    // Most messages: read in one pass that keeps to the depth limit as it goes.
    if let Some(envelope @ Node::Object(_)) = parse_plain(text, limits.max_depth) {
        return Ok(envelope);
    }
    // The rest are refused, or have nesting serde_json reads and the pass does not: the depth
    // first, then serde_json's reading and its error.
    if let Some(offset) = first_offset_deeper_than(body, limits.max_depth) {
        return Err(Rejection::one(
            Code::TooLarge,
            FieldError::new(
                "",
                "maxDepth",
                format!(
                    "message nests arrays or objects deeper than {} levels (at byte offset {offset})",
                    limits.max_depth
                ),
            ),
        ));
    }
    match parse_by_serde(text) {
        Ok(envelope @ Node::Object(_)) => Ok(envelope),
        Ok(other) => Err(Rejection::one(
            Code::InvalidJson,
            FieldError::new(
                "",
                "type",
                format!("message must be a JSON object, not {}", json_kind(&other)),
            ),
        )),
        Err(e) => Err(Rejection::one(
            Code::InvalidJson,
            FieldError::new("", "json", format!("message is not JSON: {e}")),
        )),
    }
}

/// The JSON text of a copy or a receipt, byte for byte what `serde_json::to_vec` writes (fields
/// in the order they have, the same escapes and numbers), written by sonic-rs, whose SIMD string
/// escaping is what makes the difference: serde_json escapes byte by byte, and a copy's free-text
/// fields are most of its bytes (a 430 KB referral: 35 against 320 µs).
///
/// sonic-rs makes room for six times a string's length before escaping it, so a `Vec` it writes
/// from empty grows several times over and is left mostly unused, and a copy keeps its bytes
/// until the broker confirms it. The text is written into a buffer the thread keeps for the next
/// one, and the copy is exactly its length: one allocation per copy.
///
/// The buffer is kept up to a room that a copy of the largest message `limits.max_message_bytes`
/// allows by default (1 MiB, one string: room for 6 MiB) fits in. Let go at each large message,
/// it was made again for the next, each of its pages faulted in by the kernel anew (see
/// docs/performance.md, "Large messages: fewer copies and page faults"). Only the pages written
/// are the process's memory: the room sonic-rs asks for and never writes is address space, not
/// RSS.
// Never inlined: `bench/run.sh --callgrind` counts it by its name.
#[inline(never)]
pub fn encode<T: serde::Serialize + ?Sized>(value: &T) -> Vec<u8> {
    written(|buffer| {
        sonic_rs::to_writer(buffer, value)
            .expect("what Ponte publishes always serializes: string keys only")
    })
}

/// [`encode`] for a message's tree, which a copy is: the same bytes, written by
/// [`Node::write_json`], which copies the strings read from the message without escapes as
/// they are rather than looking through each again for characters to escape (most strings of
/// a copy are a few bytes, the sender's field names first; sonic-rs spent some 86 instructions
/// on each).
// Never inlined: `bench/run.sh --callgrind` counts it by its name.
#[inline(never)]
pub fn encode_node(node: &Node) -> Vec<u8> {
    written(|buffer| node.write_json(buffer))
}

/// The bytes `write` puts in a buffer the thread keeps, copied out at their exact length.
fn written(write: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    crate::with_thread_buffer(|buffer| {
        write(buffer);
        buffer.as_slice().to_vec()
    })
}

/// Scans the bytes once and returns the offset where the nesting of arrays and objects first
/// exceeds `max_depth`: where a message the one-pass reading declined is too deep. Cheaper than
/// parsing, and runs before serde_json's parser so depth bombs never reach it (the one pass
/// stops at the limit too). Most of a message's bytes are inside strings, which are skipped to
/// their next quote or backslash at once rather than byte by byte.
fn first_offset_deeper_than(body: &[u8], max_depth: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = body.get(i) {
        match b {
            b'"' => {
                // To the closing quote, stepping over escaped characters.
                i += 1;
                loop {
                    let at = i + memchr::memchr2(b'"', b'\\', body.get(i..)?)?;
                    if body[at] == b'"' {
                        i = at;
                        break;
                    }
                    i = at + 2;
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return Some(i);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}

/// A JSON pointer (RFC 6901) of the configuration, read once when it is loaded: the pipeline
/// follows some ten per message, and splitting and unescaping each again was a third of what
/// following it cost. Names what `Value::pointer` names, without allocating.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pointer {
    text: String,
    /// The tokens, `~1` and `~0` undone; `None` when the text does not start with `/`, which
    /// names nothing (but the empty pointer, the whole value).
    tokens: Option<Box<[Token]>>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Token {
    name: Box<str>,
    /// The token as an array index, if it is one.
    index: Option<usize>,
}

impl Pointer {
    pub fn new(text: &str) -> Pointer {
        Pointer::from(text.to_string())
    }

    /// The pointer as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Its tokens, `~1` and `~0` undone; none when it names nothing.
    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        self.tokens.iter().flatten().map(|token| &*token.name)
    }

    /// The value the pointer names in `value`.
    pub fn get<'a, 'b>(&self, value: &'a Node<'b>) -> Option<&'a Node<'b>> {
        self.tokens
            .as_deref()?
            .iter()
            .try_fold(value, |target, token| match target {
                Node::Object(object) => object.get(&token.name),
                Node::Array(list) => list.get(token.index?),
                _ => None,
            })
    }

    /// [`Pointer::get`], for changing the value.
    pub fn get_mut<'a, 'b>(&self, value: &'a mut Node<'b>) -> Option<&'a mut Node<'b>> {
        self.tokens
            .as_deref()?
            .iter()
            .try_fold(value, |target, token| match target {
                Node::Object(object) => object.get_mut(&token.name),
                Node::Array(list) => list.get_mut(token.index?),
                _ => None,
            })
    }
}

impl From<String> for Pointer {
    fn from(text: String) -> Pointer {
        let tokens = if text.is_empty() {
            Some(Box::default())
        } else {
            text.strip_prefix('/').map(|rest| {
                rest.split('/')
                    .map(|token| {
                        let name: Box<str> = if token.contains('~') {
                            token.replace("~1", "/").replace("~0", "~").into()
                        } else {
                            token.into()
                        };
                        Token {
                            index: index(&name),
                            name,
                        }
                    })
                    .collect()
            })
        };
        Pointer { text, tokens }
    }
}

impl std::fmt::Display for Pointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// A pointer token as an array index: digits, without a sign or a leading zero.
fn index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() > 1) {
        return None;
    }
    token.parse().ok()
}

fn json_kind(v: &Node) -> &'static str {
    match v {
        Node::Null => "null",
        Node::Bool(_) => "a boolean",
        Node::Number(_) => "a number",
        Node::String(_) => "a string",
        Node::Array(_) => "an array",
        Node::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::parse;
    use serde_json::Value;

    #[test]
    fn pointers_name_what_serde_json_s_own_do() {
        let envelope = serde_json::json!({
            "subject": {"identifiers": [{"scheme": "it.cf", "value": "X"}, {"scheme": "local"}]},
            "a/b": {"m~n": 1},
            "": {"": 2},
            "list": [10, 11],
            "~1": {"~": 5, "/": 6},
            "~": 7
        });
        for p in [
            "",
            "/subject/identifiers/0/scheme",
            "/subject/identifiers/1",
            "/subject/identifiers/2",
            "/subject/identifiers/01",
            "/subject/identifiers/+1",
            "/subject/identifiers/-",
            "/a~1b/m~0n",
            "/a/b",
            "//",
            "/",
            "/list/1",
            "/list/1/x",
            "subject",
            "/missing",
            "/~01",
            "/~01/~0",
            "/~01/~1",
            "/~0",
            "/~",
            "/~2",
            "/a~1b/",
            "/list/1/",
            "/subject//",
        ] {
            let tree = Node::from(&envelope);
            assert_eq!(
                Pointer::new(p).get(&tree).map(Node::to_value),
                envelope.pointer(p).cloned(),
                "{p}"
            );
            assert_eq!(Pointer::new(p).as_str(), p);
        }
        let mut tree = Node::from(&envelope);
        *Pointer::new("/a~1b/m~0n").get_mut(&mut tree).unwrap() = Node::text("3");
        assert_eq!(tree.to_value()["a/b"]["m~n"], "3");
        assert!(Pointer::new("/list/2").get_mut(&mut tree).is_none());
        *Pointer::new("/list/1").get_mut(&mut tree).unwrap() = Node::Null;
        assert_eq!(tree.to_value()["list"], serde_json::json!([10, null]));
    }

    /// The demo's example messages, as their files hold them.
    fn example_texts() -> Vec<String> {
        ["referral-cpi-modena", "benefit-status-adi-inps"]
            .iter()
            .map(|name| {
                let path = format!("{}/examples/{name}.json", env!("CARGO_MANIFEST_DIR"));
                std::fs::read_to_string(path).unwrap()
            })
            .collect()
    }

    /// Partners receive what serde_json would write: a sonic-rs upgrade that changed one escape,
    /// number or field order would change the bytes of every copy they receive.
    #[test]
    fn encode_writes_what_serde_json_writes() {
        let mut values: Vec<Value> = example_texts()
            .iter()
            .map(|text| serde_json::from_str(text).unwrap())
            .collect();
        values.push(serde_json::json!({
            "z": "first field stays first", "a": null, "t": true,
            "escapes": "\"\\/\u{0}\u{1f}\u{7f}\n\t\u{2028}\u{2029}é😀",
            "numbers": [0, -0.0, 1.5, 0.1, 1e21, 1e-7, 3.0, 1e300, u64::MAX, i64::MIN, 2.5e-308],
            "nested": {"": [[], {}, [{"k": "v"}]]},
            "long": "n".repeat(100_000) + "\"" + &"é".repeat(1000),
        }));
        // Every character below U+0800, one string each, and a few keys that need escapes.
        let all: Vec<String> = (0u32..0x800)
            .filter_map(char::from_u32)
            .map(|c| format!("a{c}b{c}"))
            .collect();
        values.push(serde_json::json!({ "all": all, "k\"e\u{1}y": 1 }));
        for value in &values {
            let expected = serde_json::to_string(value).unwrap();
            let bytes = encode(value);
            // A copy waits for its confirm with these bytes: no room kept for escapes not made.
            assert_eq!(bytes.capacity(), bytes.len());
            assert_eq!(String::from_utf8(bytes).unwrap(), expected);
            // A tree of the same value: its strings read from the text (copied as they are where
            // the text had no escapes), or lent by the value (escaped where they need it).
            let read = crate::envelope::parse(&expected).unwrap();
            for tree in [read, Node::from(value)] {
                let bytes = encode_node(&tree);
                assert_eq!(bytes.capacity(), bytes.len());
                assert_eq!(String::from_utf8(bytes).unwrap(), expected);
            }
        }
    }

    /// The gateway reads each message as serde_json would: the same values, field order and
    /// numbers, a repeated key's last value at its first place, the same error for broken text.
    #[test]
    fn parse_reads_what_serde_json_reads() {
        let mut texts = example_texts();
        texts.extend(
            [
                r#"{"z": 1, "a": {"y": [], "b": {}}, "m": [[1, [2, [3]]], {"k": null}]}"#,
                r#"{"k": 1, "j": 2, "k": {"x": 3}, "j": [4]}"#,
                r#"{"n": [0, -0, -0.0, 1.5, 1e21, 1E-7, 18446744073709551615, -9223372036854775808]}"#,
                r#"{"big": 18446744073709551616, "f": 2.5e-308, "t": true, "f2": false}"#,
                r#"{"e": "\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00", "é": "😀"}"#,
                r#"{"$serde_json::private::Number": "1"}"#,
                "  [1, 2]  ",
                "\"text\"",
                "null",
                r#"{"a": 1,}"#,
                r#"{"a": 1} {"b": 2}"#,
                r#"{"a" 1}"#,
                r#"{"a": [1, 2}"#,
                r#"{"a": "\ud800"}"#,
                r#"{"a": 01}"#,
                "",
                "{",
            ]
            .map(String::from),
        );
        texts.push(format!("{}1{}", "[".repeat(200), "]".repeat(200)));
        for text in &texts {
            let ours = parse(text);
            let theirs = serde_json::from_str::<Value>(text);
            match (&ours, &theirs) {
                (Ok(ours), Ok(theirs)) => {
                    assert_eq!(&ours.to_value(), theirs, "{text}");
                    // Equal maps may differ in order: the text written shows it.
                    assert_eq!(encode(ours), encode(theirs), "{text}");
                    assert_eq!(encode_node(ours), encode(theirs), "{text}");
                }
                (Err(ours), Err(theirs)) => assert_eq!(ours.to_string(), theirs.to_string()),
                _ => panic!("{text}: {ours:?} against {theirs:?}"),
            }
        }
        // serde_json gives one key of its own a meaning, with a feature another crate turns on:
        // the string under it is parsed as the value in the object's place. A sender's JSON hidden
        // in a string would pass the depth check unseen; here the key is a field like any other,
        // which the schemas refuse.
        let hidden = r#"{"$serde_json::private::RawValue": "[1, 2]"}"#;
        assert_eq!(
            serde_json::from_str::<Value>(hidden).unwrap(),
            serde_json::json!([1, 2])
        );
        assert_eq!(
            parse(hidden).unwrap().to_value(),
            serde_json::json!({"$serde_json::private::RawValue": "[1, 2]"})
        );
    }

    /// Each array is made at its length (and each object at its number of fields), not grown.
    #[test]
    fn arrays_are_made_at_their_length() {
        let mut value = parse(r#"{"a": [1, 2, 3, 4, 5], "b": [[6], []]}"#).unwrap();
        let a = value.get_mut("a").unwrap().as_array_mut().unwrap();
        assert_eq!((a.len(), a.capacity()), (5, 5));
        let b = value.get_mut("b").unwrap().as_array_mut().unwrap();
        let inner = b[0].as_array_mut().unwrap().capacity();
        assert_eq!((inner, b.capacity()), (1, 2));
    }

    const LIMITS: DecodeLimits = DecodeLimits {
        max_bytes: 1024,
        max_depth: 8,
    };

    fn code_of(body: &[u8]) -> (Code, String) {
        let r = decode(body, LIMITS).unwrap_err();
        (r.code, r.errors[0].keyword.clone())
    }

    #[test]
    fn object_is_decoded() {
        let m = decode(br#"{"a": {"b": [1, "{[["]}}"#, LIMITS).unwrap();
        assert_eq!(m.to_value()["a"]["b"][1], "{[[");
    }

    #[test]
    fn oversize_is_too_large() {
        let body = vec![b' '; 1025];
        assert_eq!(code_of(&body), (Code::TooLarge, "maxBytes".into()));
    }

    #[test]
    fn invalid_utf8_is_invalid_json() {
        let r = decode(b"{\"a\": \"\xff\xfe\"}", LIMITS).unwrap_err();
        assert_eq!(r.code, Code::InvalidJson);
        assert_eq!(r.errors[0].keyword, "utf8");
        assert!(
            r.errors[0].message.contains("offset 7"),
            "{}",
            r.errors[0].message
        );
    }

    #[test]
    fn invalid_utf8_is_named_wherever_it_is() {
        let deep = [
            "{\"a\": \"\u{e9}\", \"b\": ",
            &"[".repeat(40),
            &"]".repeat(40),
        ]
        .concat();
        let cases: [(&[u8], usize); 6] = [
            // In a key, in a value after valid multi-byte text, outside any string.
            (b"{\"\xc3\": 1}", 2),
            (b"{\"a\": \"\xc3\xa9\xed\xa0\x80\"}", 9),
            (b"{\"a\": \xff}", 6),
            // A body that would also be refused for its syntax or its depth.
            (b"{\"a\": \"\xe9\" ,,}", 7),
            (&[deep.as_bytes(), b"\xff}"].concat(), deep.len()),
            // Valid UTF-8 up to a truncated character at the end.
            (b"{\"a\": \"\xe2\x82", 7),
        ];
        for (body, offset) in cases {
            let r = decode(body, LIMITS).unwrap_err();
            assert_eq!(
                (r.code, r.errors[0].keyword.as_str()),
                (Code::InvalidJson, "utf8"),
                "{:?}: {}",
                String::from_utf8_lossy(body),
                r.errors[0].message
            );
            assert!(
                r.errors[0].message.contains(&format!("offset {offset})")),
                "{:?}: {}",
                String::from_utf8_lossy(body),
                r.errors[0].message
            );
        }
    }

    #[test]
    fn deep_nesting_is_too_large_without_parsing() {
        let body = format!("{}{}", "[".repeat(400), "]".repeat(400));
        assert_eq!(
            code_of(body.as_bytes()),
            (Code::TooLarge, "maxDepth".into())
        );
        let ok = format!("{{\"a\":{}{}}}", "[".repeat(7), "]".repeat(7));
        assert!(decode(ok.as_bytes(), LIMITS).is_ok());
    }

    /// Nesting written inside a string stays a string, also under the key serde_json reads the
    /// JSON of a string for (see `parse`): the depth limit holds for what the pipeline is given.
    #[test]
    fn nesting_hidden_in_a_string_stays_a_string() {
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let body = serde_json::json!({"payload": {"$serde_json::private::RawValue": deep}});
        let text = body.to_string();
        let decoded = decode(text.as_bytes(), LIMITS).unwrap().to_value();
        assert_eq!(decoded, body);
        assert_eq!(
            decoded["payload"]["$serde_json::private::RawValue"].as_str(),
            Some(deep.as_str())
        );
    }

    /// The scan byte by byte, as it was written first: what the faster one must agree with.
    fn deeper_byte_by_byte(body: &[u8], max_depth: usize) -> Option<usize> {
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for (i, &b) in body.iter().enumerate() {
            if in_string {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => {
                    depth += 1;
                    if depth > max_depth {
                        return Some(i);
                    }
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        None
    }

    #[test]
    fn the_depth_scan_finds_the_offset_a_byte_by_byte_scan_finds() {
        let pieces: [&[u8]; 12] = [
            b"{", b"}", b"[", b"]", b"\"", b"\\", b"\\\"", b"a", b"\\\\", b":", b",", b" ",
        ];
        // Every sequence of up to five pieces, then each behind a prefix that opens a string
        // or sits two levels deep: escapes at the end, unterminated strings, quotes in strings.
        let mut bodies: Vec<Vec<u8>> = vec![Vec::new()];
        for _ in 0..5 {
            let longer: Vec<Vec<u8>> = bodies
                .iter()
                .filter(|b| b.len() < 10)
                .flat_map(|b| pieces.iter().map(move |p| [b.as_slice(), p].concat()))
                .collect();
            bodies.extend(longer);
            bodies.sort();
            bodies.dedup();
        }
        let mut checked = 0;
        for body in &bodies {
            for prefix in [&b""[..], b"\"", b"[[", b"{\"k\":\"x\\\"\"}["] {
                let body = [prefix, body.as_slice()].concat();
                for max_depth in [0, 1, 2, 3] {
                    assert_eq!(
                        first_offset_deeper_than(&body, max_depth),
                        deeper_byte_by_byte(&body, max_depth),
                        "{:?} at depth {max_depth}",
                        String::from_utf8_lossy(&body)
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 100_000, "{checked} cases");
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        let body = format!("{{\"a\": \"{}\\\"{}\"}}", "[".repeat(50), "{".repeat(50));
        assert!(decode(body.as_bytes(), LIMITS).is_ok());
    }

    #[test]
    fn not_json_and_not_object_are_invalid_json() {
        assert_eq!(code_of(b"hello"), (Code::InvalidJson, "json".into()));
        assert_eq!(code_of(b"[1,2]"), (Code::InvalidJson, "type".into()));
        assert_eq!(code_of(b""), (Code::InvalidJson, "json".into()));
    }
}
