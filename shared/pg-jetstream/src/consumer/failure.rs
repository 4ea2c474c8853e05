//! How failures are told apart, in three words used the same everywhere:
//! - *retry in place*: the batch's transaction failed for a reason that
//!   says nothing about its messages (the database unreachable, a deadlock,
//!   a lock held elsewhere); the same batch is tried again here, spending no
//!   delivery;
//! - *retryable*: a message's own failure that may pass (a handler's
//!   [`HandlerError::Retryable`]); the message is nak'ed with a growing
//!   delay and counts one failed attempt;
//! - *permanent*: a message's own failure that never will; dead-lettered.

use std::any::Any;

use crate::db::error_chain;

use super::handler::HandlerError;

/// Why a batch's transaction failed as a whole; nothing was applied.
#[derive(Debug, thiserror::Error)]
pub(super) enum BatchFailed {
    #[error("no database connection")]
    NoConnection(#[source] diesel_async::pooled_connection::deadpool::PoolError),
    #[error("the batch's transaction failed")]
    Transaction(#[from] diesel::result::Error),
}

impl BatchFailed {
    /// Whether the failure says nothing about the messages: the batch is
    /// tried again in place.
    pub(super) fn retry_in_place(&self) -> bool {
        match self {
            Self::NoConnection(_) => true,
            Self::Transaction(error) => retry_in_place(error),
        }
    }

    /// The failure with its causes, as a reason for people.
    pub(super) fn reason(&self) -> String {
        error_chain(self)
    }
}

/// Whether a database error says nothing about the messages being handled
/// (the database unreachable, or another transaction in the way): the same
/// batch may well succeed a moment later.
fn retry_in_place(error: &diesel::result::Error) -> bool {
    crate::db::Failure::of(error).retry_in_place()
}

/// The database error inside a handler's failure, when it calls for the
/// batch to be tried again in place rather than the message retried.
pub(super) fn split_retry_in_place(
    error: HandlerError,
) -> Result<diesel::result::Error, HandlerError> {
    match error {
        HandlerError::Retryable(source) => match source.downcast::<diesel::result::Error>() {
            Ok(error) if retry_in_place(&error) => Ok(*error),
            Ok(error) => Err(HandlerError::Retryable(error)),
            Err(source) => Err(HandlerError::Retryable(source)),
        },
        permanent @ HandlerError::Permanent(_) => Err(permanent),
    }
}

pub(super) enum Failure {
    Retryable(String),
    Permanent(String),
}

impl From<HandlerError> for Failure {
    fn from(error: HandlerError) -> Self {
        match error {
            HandlerError::Retryable(source) => Self::Retryable(error_chain(&*source)),
            HandlerError::Permanent(reason) => Self::Permanent(reason),
        }
    }
}

pub(super) fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".to_owned())
}
