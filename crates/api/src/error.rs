//! Why a request could not be decoded, and the error codes of the wire.
//!
//! A [`DecodeError`] is an operating error (bad input from a client), never a
//! bug: the server answers it with HTTP 400 / gRPC `INVALID_ARGUMENT` and
//! applies nothing. Business outcomes (`exceeds_credits`, ...) are not errors:
//! they are the ledger's per-event result codes.

use std::fmt;

use cellpay_ledger::FilterError;

/// The most characters of a client's value echoed back in an error message,
/// so that a huge bad value does not make a huge error.
pub const ERROR_VALUE_ECHO_CHARS_MAX: usize = 64;

/// The most characters of a JSON parser message echoed back (it may quote a field name).
pub const ERROR_JSON_MESSAGE_CHARS_MAX: usize = 256;

/// Where a bad value sits in a request, printed as `transfers[3].amount`,
/// `ids[0]`, `transfers`, `filter.limit` or `account_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldPath {
    /// The list or object that holds the value (`"transfers"`, `"filter"`), or `""` at the top level.
    pub parent: &'static str,
    /// The element's position, when `parent` is a list.
    pub index: Option<usize>,
    /// The field's name, or `""` when the value is the element or the list itself.
    pub field: &'static str,
}

impl FieldPath {
    /// A field of the `index`-th element of a list: `transfers[3].amount`.
    pub fn event(parent: &'static str, index: usize, field: &'static str) -> FieldPath {
        FieldPath { parent, index: Some(index), field }
    }

    /// A whole list, or a field of an object that is not in a list: `transfers`, `filter.limit`.
    pub fn field(parent: &'static str, field: &'static str) -> FieldPath {
        FieldPath { parent, index: None, field }
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.parent)?;
        if let Some(index) = self.index {
            write!(f, "[{index}]")?;
        }
        if !self.field.is_empty() {
            if !self.parent.is_empty() {
                f.write_str(".")?;
            }
            f.write_str(self.field)?;
        }
        Ok(())
    }
}

/// A request (or, on the client side, a reply) whose wire shape is wrong.
/// The message names the field and the event: `transfers[3].amount: not a decimal u128: "abc"`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("request body is {bytes} bytes, more than the {bytes_max} allowed")]
    BodyTooLarge { bytes: usize, bytes_max: usize },
    /// Not JSON, or JSON of the wrong shape (wrong type, unknown field, number out of range).
    #[error("malformed JSON: {message}")]
    Json { message: String },
    #[error("{field}: missing required field")]
    MissingField { field: FieldPath },
    /// Anything but ASCII digits without a leading zero.
    #[error("{field}: not a decimal {type_name}: {value:?}")]
    NotDecimal { field: FieldPath, type_name: &'static str, value: String },
    #[error("{field}: out of range for {type_name}: {value}")]
    OutOfRange { field: FieldPath, type_name: &'static str, value: String },
    #[error("{field}: unknown flag {name:?} (expected one of: {expected})")]
    UnknownFlag { field: FieldPath, name: String, expected: String },
    #[error("{field}: flag {name:?} is listed more than once")]
    DuplicateFlag { field: FieldPath, name: String },
    #[error("{field}: batch is empty (send 1 to {events_max} events)")]
    BatchEmpty { field: FieldPath, events_max: usize },
    #[error("{field}: batch holds {count} events, more than the {events_max} allowed")]
    BatchTooLarge { field: FieldPath, count: usize, events_max: usize },
    #[error("invalid filter: {0}")]
    Filter(#[from] FilterError),
    /// In a reply: a result code this client does not know.
    #[error("{field}: unknown result code {value}")]
    UnknownResult { field: FieldPath, value: String },
    /// In a reply: results are one per event, in request order.
    #[error("{field}: expected {expected}, found {found}")]
    ResultIndex { field: FieldPath, expected: usize, found: u32 },
}

impl DecodeError {
    /// The error's code on the wire (`{"error": {"code": ...}}`).
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::BodyTooLarge { .. } => ErrorCode::BodyTooLarge,
            DecodeError::Json { .. } => ErrorCode::InvalidJson,
            DecodeError::MissingField { .. } => ErrorCode::MissingField,
            DecodeError::NotDecimal { .. } | DecodeError::OutOfRange { .. } => ErrorCode::InvalidNumber,
            DecodeError::UnknownFlag { .. } | DecodeError::DuplicateFlag { .. } => ErrorCode::InvalidFlag,
            DecodeError::BatchEmpty { .. } => ErrorCode::BatchEmpty,
            DecodeError::BatchTooLarge { .. } => ErrorCode::BatchTooLarge,
            DecodeError::Filter(_) => ErrorCode::InvalidFilter,
            // Only a client decodes replies: a reply it cannot read is the server's fault.
            DecodeError::UnknownResult { .. } | DecodeError::ResultIndex { .. } => ErrorCode::Internal,
        }
    }

    pub(crate) fn json(error: &serde_json::Error) -> DecodeError {
        DecodeError::Json { message: truncate(&error.to_string(), ERROR_JSON_MESSAGE_CHARS_MAX) }
    }

    pub(crate) fn not_decimal(field: FieldPath, type_name: &'static str, value: &str) -> DecodeError {
        DecodeError::NotDecimal { field, type_name, value: truncate(value, ERROR_VALUE_ECHO_CHARS_MAX) }
    }

    /// `value` as it should be printed: a number, or a string already [`quoted`].
    pub(crate) fn out_of_range(field: FieldPath, type_name: &'static str, value: String) -> DecodeError {
        DecodeError::OutOfRange { field, type_name, value }
    }
}

impl From<DecodeError> for tonic::Status {
    fn from(error: DecodeError) -> tonic::Status {
        tonic::Status::new(error.code().grpc_code(), error.to_string())
    }
}

/// A client's string, cut to `ERROR_VALUE_ECHO_CHARS_MAX` characters and quoted for a message.
pub(crate) fn quoted(text: &str) -> String {
    format!("{:?}", truncate(text, ERROR_VALUE_ECHO_CHARS_MAX))
}

/// Cuts `text` to at most `chars_max` characters, marking the cut with `…`.
pub(crate) fn truncate(text: &str, chars_max: usize) -> String {
    match text.char_indices().nth(chars_max) {
        None => text.to_string(),
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

macro_rules! error_codes {
    ($($(#[$meta:meta])* $variant:ident => $text:expr, $http:expr, $grpc:ident;)*) => {
        /// Every error code of the API (REST `{"error": {"code": ...}}`), with its HTTP status and gRPC code.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$meta])* $variant,)*
        }

        impl ErrorCode {
            /// Every code, as listed in the OpenAPI document.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The snake_case name used on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $text,)*
                }
            }

            /// The HTTP status the REST API answers with.
            pub fn http_status(self) -> u16 {
                match self {
                    $(ErrorCode::$variant => $http,)*
                }
            }

            /// The gRPC status code the gRPC API answers with.
            pub fn grpc_code(self) -> tonic::Code {
                match self {
                    $(ErrorCode::$variant => tonic::Code::$grpc,)*
                }
            }
        }

        impl fmt::Display for ErrorCode {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

error_codes! {
    /// The body is not JSON, or JSON of the wrong shape.
    InvalidJson => "invalid_json", 400, InvalidArgument;
    MissingField => "missing_field", 400, InvalidArgument;
    /// A number string that is not canonical decimal, or out of range.
    InvalidNumber => "invalid_number", 400, InvalidArgument;
    /// An unknown or repeated flag name.
    InvalidFlag => "invalid_flag", 400, InvalidArgument;
    BatchEmpty => "batch_empty", 400, InvalidArgument;
    /// More than `BATCH_EVENTS_MAX` events.
    BatchTooLarge => "batch_too_large", 400, InvalidArgument;
    /// An account filter the ledger cannot run (see `AccountFilter::validate`).
    InvalidFilter => "invalid_filter", 400, InvalidArgument;
    /// The request body is over `json::BODY_BYTES_MAX`.
    BodyTooLarge => "body_too_large", 413, ResourceExhausted;
    /// The server sheds load: retry later, with backoff.
    Overloaded => "overloaded", 503, Unavailable;
    /// A request's events belong to different cells (a node serves one cell
    /// per request; cross-cell transfers go through the gateway).
    CrossCell => "cross_cell", 400, InvalidArgument;
    /// The cell has no reachable leader now (an election, a partition):
    /// retry with the same ids, with backoff. A write may or may not have
    /// been applied; transfers are idempotent by id, so the retry is safe.
    Unavailable => "unavailable", 503, Unavailable;
    /// A write was not committed in time: its outcome is unknown; retry with the same ids.
    Timeout => "timeout", 504, DeadlineExceeded;
    /// A bug or an I/O failure in the server.
    Internal => "internal", 500, Internal;
    /// The cell does not own the shard of an account the request names (the
    /// sender's routing table is older or newer than the cell's): nothing was
    /// applied; refresh the routing table and resend.
    Misrouted => "misrouted", 503, Unavailable;
    /// An operator's change conflicts with the cluster's state (the routing
    /// table changed since it was read, a shard still holds accounts):
    /// nothing changed; read the state again.
    Conflict => "conflict", 409, FailedPrecondition;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_paths_print() {
        assert_eq!(FieldPath::event("transfers", 3, "amount").to_string(), "transfers[3].amount");
        assert_eq!(FieldPath::event("ids", 0, "").to_string(), "ids[0]");
        assert_eq!(FieldPath::field("transfers", "").to_string(), "transfers");
        assert_eq!(FieldPath::field("filter", "limit").to_string(), "filter.limit");
        assert_eq!(FieldPath::field("", "account_id").to_string(), "account_id");
    }

    #[test]
    fn truncate_cuts_on_char_boundaries() {
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("abcd", 3), "abc…");
        assert_eq!(truncate("ééé", 2), "éé…");
    }

    #[test]
    fn error_codes_are_unique_snake_case() {
        let mut names: Vec<&str> = ErrorCode::ALL.iter().map(|code| code.as_str()).collect();
        assert!(names.iter().all(|name| name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }
}
