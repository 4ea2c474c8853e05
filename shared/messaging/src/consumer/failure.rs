//! How failures are told apart: a batch's transaction that failed for
//! reasons that say nothing about its messages (tried again in place), and a
//! message's own failure, transient or permanent.

use std::any::Any;

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
    /// Whether the failure says nothing about the messages (see
    /// [`passing`]): the batch is tried again in place.
    pub(super) fn is_passing(&self) -> bool {
        match self {
            Self::NoConnection(_) => true,
            Self::Transaction(error) => passing(error),
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
fn passing(error: &diesel::result::Error) -> bool {
    shop_db::Failure::of(error).is_passing()
}

/// The database error inside a handler's failure, when it is [`passing`].
pub(super) fn into_passing(error: HandlerError) -> Result<diesel::result::Error, HandlerError> {
    match error {
        HandlerError::Transient(source) => match source.downcast::<diesel::result::Error>() {
            Ok(error) if passing(&error) => Ok(*error),
            Ok(error) => Err(HandlerError::Transient(error)),
            Err(source) => Err(HandlerError::Transient(source)),
        },
        permanent @ HandlerError::Permanent(_) => Err(permanent),
    }
}

pub(super) enum Failure {
    Transient(String),
    Permanent(String),
}

impl From<HandlerError> for Failure {
    fn from(error: HandlerError) -> Self {
        match error {
            HandlerError::Transient(source) => Self::Transient(error_chain(&*source)),
            HandlerError::Permanent(reason) => Self::Permanent(reason),
        }
    }
}

/// An error and its causes on one line, `: `-separated: how a failure is
/// logged or stored as a reason.
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

pub(super) fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".to_owned())
}
