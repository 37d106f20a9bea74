//! Decode: the raw AMQP body becomes a JSON object, or a rejection saying why it cannot: too many
//! bytes, nested too deep, not UTF-8, not JSON, or not an object. Also the JSON Pointers the
//! configuration uses to reach into an envelope.

use std::borrow::Cow;

use serde_json::Value;

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

/// Turns a message body into the envelope: a JSON value that is always an object.
pub fn decode(body: &[u8], limits: DecodeLimits) -> Result<Value, Rejection> {
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
    if let Err(e) = std::str::from_utf8(body) {
        return Err(Rejection::one(
            Code::InvalidJson,
            FieldError::new(
                "",
                "utf8",
                format!(
                    "message is not valid UTF-8 (first invalid byte at offset {})",
                    e.valid_up_to()
                ),
            ),
        ));
    }
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
    match serde_json::from_slice::<Value>(body) {
        Ok(envelope @ Value::Object(_)) => Ok(envelope),
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

/// Scans the bytes once, outside strings, and returns the offset where the nesting of arrays and
/// objects first exceeds `max_depth`. Cheaper than parsing, and runs before the parser so depth
/// bombs never reach it.
fn first_offset_deeper_than(body: &[u8], max_depth: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
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

/// The value `pointer` (RFC 6901) names in `value`, as `Value::pointer`, without allocating:
/// serde_json's own makes a new string of every token, and the pipeline follows several
/// pointers per message.
pub fn pointer<'a>(value: &'a Value, pointer: &str) -> Option<&'a Value> {
    if pointer.is_empty() {
        return Some(value);
    }
    pointer
        .strip_prefix('/')?
        .split('/')
        .try_fold(value, |target, token| match target {
            Value::Object(map) => map.get(unescape(token).as_ref()),
            Value::Array(list) => index(token).and_then(|i| list.get(i)),
            _ => None,
        })
}

/// [`pointer`], for changing the value.
pub fn pointer_mut<'a>(value: &'a mut Value, pointer: &str) -> Option<&'a mut Value> {
    if pointer.is_empty() {
        return Some(value);
    }
    pointer
        .strip_prefix('/')?
        .split('/')
        .try_fold(value, |target, token| match target {
            Value::Object(map) => map.get_mut(unescape(token).as_ref()),
            Value::Array(list) => index(token).and_then(|i| list.get_mut(i)),
            _ => None,
        })
}

/// A pointer token's name: `~1` stands for `/` and `~0` for `~`.
fn unescape(token: &str) -> Cow<'_, str> {
    if token.contains('~') {
        Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
    } else {
        Cow::Borrowed(token)
    }
}

/// A pointer token as an array index: digits, without a sign or a leading zero.
fn index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() > 1) {
        return None;
    }
    token.parse().ok()
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_name_what_serde_json_s_own_do() {
        let mut envelope = serde_json::json!({
            "subject": {"identifiers": [{"scheme": "it.cf", "value": "X"}, {"scheme": "local"}]},
            "a/b": {"m~n": 1},
            "": {"": 2},
            "list": [10, 11]
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
        ] {
            assert_eq!(pointer(&envelope, p), envelope.pointer(p), "{p}");
        }
        *pointer_mut(&mut envelope, "/a~1b/m~0n").unwrap() = serde_json::json!(3);
        assert_eq!(envelope["a/b"]["m~n"], 3);
        assert!(pointer_mut(&mut envelope, "/list/2").is_none());
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
        assert_eq!(m["a"]["b"][1], "{[[");
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
    fn deep_nesting_is_too_large_without_parsing() {
        let body = format!("{}{}", "[".repeat(400), "]".repeat(400));
        assert_eq!(
            code_of(body.as_bytes()),
            (Code::TooLarge, "maxDepth".into())
        );
        let ok = format!("{{\"a\":{}{}}}", "[".repeat(7), "]".repeat(7));
        assert!(decode(ok.as_bytes(), LIMITS).is_ok());
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
