//! The receipt codes and the errors that explain a rejection: the one place where a failure of a
//! message is classified as permanent (the message is wrong) or left to the transport as transient.

use serde::Serialize;

/// The fixed set of receipt codes (modelled on the Swiss sedex receipt codes). Every receipt, log
/// line and metric label about a message outcome uses one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Code {
    Delivered,
    InvalidJson,
    SchemaViolation,
    UnknownType,
    UnsupportedVersion,
    SenderMismatch,
    NotAuthorized,
    UnknownRecipient,
    NoRoute,
    UnmappableIdentifier,
    Duplicate,
    TooLarge,
    Undeliverable,
}

impl Code {
    /// The code as it appears on the wire, in logs and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Delivered => "delivered",
            Code::InvalidJson => "invalid-json",
            Code::SchemaViolation => "schema-violation",
            Code::UnknownType => "unknown-type",
            Code::UnsupportedVersion => "unsupported-version",
            Code::SenderMismatch => "sender-mismatch",
            Code::NotAuthorized => "not-authorized",
            Code::UnknownRecipient => "unknown-recipient",
            Code::NoRoute => "no-route",
            Code::UnmappableIdentifier => "unmappable-identifier",
            Code::Duplicate => "duplicate",
            Code::TooLarge => "too-large",
            Code::Undeliverable => "undeliverable",
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reason a message was refused: where (a JSON pointer into the message), which rule, and a
/// sentence for the people fixing the sending system. Never carries the offending value itself,
/// so receipts and parked-message headers do not repeat person identifiers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// JSON pointer to the offending part of the message; `""` for the whole message.
    pub path: String,
    /// The rule that failed: a JSON Schema keyword, or one of Ponte's own rules
    /// (`maxBytes`, `maxDepth`, `utf8`, `json`, `readOnly`, `sender`, `authorization`,
    /// `recipient`, `route`, `competence`, `identifierScheme`, `officeCode`).
    pub keyword: String,
    /// Human-readable explanation.
    pub message: String,
}

impl FieldError {
    pub fn new(
        path: impl Into<String>,
        keyword: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            path: path.into(),
            keyword: keyword.into(),
            message: message.into(),
        }
    }
}

/// A permanent failure: the message is wrong and will stay wrong however often it is retried. It
/// is answered with a rejection receipt, parked in the sender's rejected queue, and acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: Code,
    pub errors: Vec<FieldError>,
}

impl Rejection {
    /// The most errors a receipt carries; a message with thousands of violations gets the first
    /// ones, which is enough to fix it and keeps receipts small.
    pub const MAX_ERRORS: usize = 50;

    pub fn new(code: Code, errors: Vec<FieldError>) -> Self {
        debug_assert!(code != Code::Delivered);
        let mut errors = errors;
        errors.truncate(Self::MAX_ERRORS);
        Self { code, errors }
    }

    pub fn one(code: Code, error: FieldError) -> Self {
        Self::new(code, vec![error])
    }

    /// The first error's message, used as the short reason on parked messages.
    pub fn reason(&self) -> &str {
        self.errors.first().map_or("", |e| e.message.as_str())
    }
}
