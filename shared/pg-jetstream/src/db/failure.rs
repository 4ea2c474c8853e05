//! What a failed statement means, told once for every caller: the API's
//! status mapping and the consumer's retry rules match on [`Failure`]
//! rather than reading messages themselves.

use diesel::result::{DatabaseErrorKind as Kind, Error};

/// The kinds of statement failure that callers treat differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The server is unreachable, went away, or is starting or stopping.
    Unreachable,
    /// Another transaction got in the way: a deadlock, a serialisation
    /// failure, a lock held past the session's `lock_timeout`. The same
    /// work may well succeed a moment later.
    Contention,
    /// The statement ran past the session's `statement_timeout`.
    Timeout,
    /// A number left its column's range (22003).
    OutOfRange,
    /// A unique constraint refused the row.
    UniqueViolation,
    /// Anything else: a bug, a constraint, a schema mismatch.
    Other,
}

impl Failure {
    /// The kind of `error`. diesel-async keeps the SQLSTATE only for the
    /// kinds diesel names (unique, serialisation, closed connection, ...)
    /// and reports the rest as `Unknown` with the server's message, so
    /// deadlocks (40P01), lock and statement timeouts (55P03, 57014),
    /// numeric overflow (22003) and the server going away (57P01-03, 53300)
    /// are told here by their messages, whole phrases where they begin or
    /// end, never a word that a table's or a constraint's name could hold.
    /// The messages are English because a service makes sure of it before
    /// it starts ([`english_messages`](crate::db::english_messages)).
    pub fn of(error: &Error) -> Self {
        match error {
            Error::BrokenTransactionManager
            | Error::DatabaseError(Kind::ClosedConnection | Kind::UnableToSendCommand, _) => {
                Self::Unreachable
            }
            Error::DatabaseError(Kind::SerializationFailure, _) => Self::Contention,
            Error::DatabaseError(Kind::UniqueViolation, _) => Self::UniqueViolation,
            Error::DatabaseError(Kind::Unknown, info) => Self::of_message(info.message()),
            _ => Self::Other,
        }
    }

    fn of_message(message: &str) -> Self {
        const CONTENTION: [&str; 3] = [
            "deadlock detected",
            "canceling statement due to lock timeout",
            "could not obtain lock on ",
        ];
        const UNREACHABLE: [&str; 5] = [
            "terminating connection ",
            "the database system is ",
            "remaining connection slots are reserved",
            "sorry, too many clients already",
            "server closed the connection unexpectedly",
        ];
        if CONTENTION.iter().any(|start| message.starts_with(start)) {
            Self::Contention
        } else if message == "canceling statement due to statement timeout" {
            Self::Timeout
        } else if UNREACHABLE.iter().any(|start| message.starts_with(start)) {
            Self::Unreachable
        } else if message.ends_with(" out of range") {
            Self::OutOfRange
        } else {
            Self::Other
        }
    }

    /// Whether the failure says nothing about the work itself, so the same
    /// transaction is simply tried again in place: it may well succeed a
    /// moment later.
    pub fn retry_in_place(self) -> bool {
        matches!(self, Self::Unreachable | Self::Contention)
    }
}

/// An error and its causes on one line, `: `-separated: how a failure
/// (a statement's, a pool's, a batch's) is logged or stored as a reason.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unknown(message: &str) -> Error {
        Error::DatabaseError(Kind::Unknown, Box::new(message.to_owned()))
    }

    #[test]
    fn each_kind_is_told_apart() {
        let cases = [
            (unknown("deadlock detected"), Failure::Contention),
            (
                unknown("canceling statement due to lock timeout"),
                Failure::Contention,
            ),
            (
                Error::DatabaseError(Kind::SerializationFailure, Box::new(String::new())),
                Failure::Contention,
            ),
            (
                unknown("canceling statement due to statement timeout"),
                Failure::Timeout,
            ),
            (
                unknown("the database system is shutting down"),
                Failure::Unreachable,
            ),
            (
                unknown("terminating connection due to administrator command"),
                Failure::Unreachable,
            ),
            (
                Error::DatabaseError(Kind::ClosedConnection, Box::new(String::new())),
                Failure::Unreachable,
            ),
            (Error::BrokenTransactionManager, Failure::Unreachable),
            (unknown("bigint out of range"), Failure::OutOfRange),
            (
                Error::DatabaseError(Kind::UniqueViolation, Box::new(String::new())),
                Failure::UniqueViolation,
            ),
            (unknown("column \"nope\" does not exist"), Failure::Other),
            // Names that hold the words the messages are told by.
            (
                unknown("relation \"connection_log\" does not exist"),
                Failure::Other,
            ),
            (
                unknown("null value in column \"lock timeout\" of relation \"t\""),
                Failure::Other,
            ),
            (
                unknown("sorry, too many clients already"),
                Failure::Unreachable,
            ),
            (Error::NotFound, Failure::Other),
        ];
        for (error, kind) in cases {
            assert_eq!(Failure::of(&error), kind, "{error}");
        }
        assert!(Failure::Contention.retry_in_place());
        assert!(Failure::Unreachable.retry_in_place());
        assert!(!Failure::Timeout.retry_in_place());
        assert!(!Failure::Other.retry_in_place());
    }
}
