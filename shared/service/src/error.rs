//! The one mapping from a use case's failure to a gRPC status.

use diesel::result::Error as DieselError;

/// Why a request failed, in the terms a caller can act on. The failures of
/// what a use case stands on keep their cause as a [`source`]; what each
/// means for the caller (retry, or a bug) is decided once, in the mapping to
/// a [`tonic::Status`].
///
/// [`source`]: std::error::Error::source
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; the message says which field and why.
    #[error("{0}")]
    InvalidArgument(String),
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The thing to create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is well-formed but the system is not in a state to take it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A value would leave its range (a sum past what a column holds).
    #[error("{0}")]
    OutOfRange(String),
    /// The caller is authenticated but may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller's token does not allow this.
    #[error(transparent)]
    Denied(#[from] shop_auth::Denied),
    /// A dependency is unreachable; retrying later may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// A statement failed.
    #[error("the database failed")]
    Database(#[from] DieselError),
    /// No connection could be had.
    #[error("the database is unreachable")]
    Pool(#[from] diesel_async::pooled_connection::deadpool::PoolError),
    /// A stored value this version does not know.
    #[error("a stored value is not one this service knows")]
    Stored(#[from] shop_domain::UnknownLabel),
    /// A bug or an unexpected failure.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What a statement's failure means for the caller.
fn database_status(error: &DieselError) -> tonic::Status {
    use pg_jetstream::db::Failure;
    use tonic::Status;
    let message = match error {
        DieselError::DatabaseError(_, info) => info.message().to_owned(),
        other => other.to_string(),
    };
    match Failure::of(error) {
        Failure::Unreachable => {
            Status::unavailable(format!("the database is unreachable: {error}"))
        }
        Failure::Contention => Status::unavailable(format!(
            "another transaction got in the way (a lock held too long, a deadlock or a serialisation conflict); retry: {message}"
        )),
        // Waited longer than the session allows (see
        // `pg_jetstream::db::SessionLimits`): the database is overloaded. Worth a retry.
        Failure::Timeout => Status::unavailable(format!(
            "the database did not answer in time; retry: {message}"
        )),
        // A sum of the request's numbers and the stored ones that a BIGINT
        // cannot hold: the request's fault, not a bug.
        Failure::OutOfRange => Status::out_of_range(format!(
            "a number is out of range (at most {} in sums): {message}",
            i64::MAX
        )),
        Failure::UniqueViolation | Failure::Other => internal(error),
    }
}

/// INTERNAL, its detail logged here with its causes and kept from the
/// caller.
fn internal(error: &(dyn std::error::Error + 'static)) -> tonic::Status {
    let causes = pg_jetstream::db::error_chain(error);
    tracing::error!(error = %causes, "internal error");
    tonic::Status::internal("internal error")
}

impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> Self {
        match error {
            ApiError::InvalidArgument(message) => Self::invalid_argument(message),
            ApiError::NotFound(message) => Self::not_found(message),
            ApiError::AlreadyExists(message) => Self::already_exists(message),
            ApiError::FailedPrecondition(message) => Self::failed_precondition(message),
            ApiError::PermissionDenied(message) => Self::permission_denied(message),
            ApiError::Denied(denied) => Self::permission_denied(denied.to_string()),
            ApiError::OutOfRange(message) => Self::out_of_range(message),
            ApiError::Unavailable(message) => Self::unavailable(message),
            ApiError::Database(error) => database_status(&error),
            ApiError::Pool(error) => {
                Self::unavailable(format!("the database is unreachable: {error}"))
            }
            error @ (ApiError::Stored(_) | ApiError::Internal(_)) => internal(&error),
        }
    }
}

/// Parses a UUID field, naming it in the error.
pub fn parse_uuid(field: &str, value: &str) -> Result<uuid::Uuid, ApiError> {
    if value.is_empty() {
        return Err(ApiError::InvalidArgument(format!("{field} is required")));
    }
    uuid::Uuid::parse_str(value)
        .map_err(|_| ApiError::InvalidArgument(format!("{field} must be a UUID, got {value:?}")))
}

/// A page size: 0 means 50, at most 1000, never negative.
pub fn page_size(requested: i32) -> Result<i64, ApiError> {
    match requested {
        0 => Ok(50),
        n if n < 0 => Err(ApiError::InvalidArgument(format!(
            "page_size must not be negative, got {n}"
        ))),
        n => Ok(i64::from(n.min(1000))),
    }
}

/// The id a page token this service gave out names (the last item of the
/// previous page); none for the first page.
pub fn page_after(token: &str) -> Result<Option<uuid::Uuid>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    uuid::Uuid::parse_str(token).map(Some).map_err(|_| {
        ApiError::InvalidArgument("page_token is not one this service gave out".into())
    })
}

/// Whether a database error is a unique violation.
pub fn is_unique_violation(error: &DieselError) -> bool {
    pg_jetstream::db::Failure::of(error) == pg_jetstream::db::Failure::UniqueViolation
}

/// What a saga step's refusal means for the event that asked for it: a step
/// that cannot be decided yet is retried; a refused one is dead-lettered
/// with its reason.
pub fn step_failed(error: shop_domain::StepError) -> pg_jetstream::HandlerError {
    use pg_jetstream::HandlerError;
    use shop_domain::StepError;
    match error {
        StepError::NotYet(_) => HandlerError::retryable(error),
        StepError::Refused(reason) => HandlerError::Permanent(reason),
    }
}

/// A stored status this version does not know: retrying the event cannot
/// help, so it is dead-lettered.
pub fn unknown_stored(error: shop_domain::UnknownLabel) -> pg_jetstream::HandlerError {
    pg_jetstream::HandlerError::Permanent(error.to_string())
}

#[cfg(test)]
mod tests {
    use diesel::result::DatabaseErrorKind;

    use super::*;

    #[test]
    fn bad_requests_are_never_internal() {
        let status = tonic::Status::from(ApiError::InvalidArgument("email is required".into()));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "email is required");
        assert_eq!(
            tonic::Status::from(parse_uuid("user_id", "x").unwrap_err()).code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            tonic::Status::from(page_size(-1).unwrap_err()).code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(page_size(0).unwrap(), 50);
        assert_eq!(page_after("").unwrap(), None);
        assert_eq!(
            tonic::Status::from(page_after("x").unwrap_err()).message(),
            "page_token is not one this service gave out"
        );
        assert_eq!(page_size(5000).unwrap(), 1000);
    }

    #[test]
    fn a_database_that_went_away_is_unavailable_not_internal() {
        let dropped = DieselError::DatabaseError(
            DatabaseErrorKind::UnableToSendCommand,
            Box::new("connection closed".to_owned()),
        );
        let starting = DieselError::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new("the database system is starting up".to_owned()),
        );
        for error in [dropped, starting, DieselError::BrokenTransactionManager] {
            let status = tonic::Status::from(ApiError::from(error));
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
        }
        let bug = DieselError::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new("column \"nope\" does not exist".to_owned()),
        );
        assert_eq!(
            tonic::Status::from(ApiError::from(bug)).code(),
            tonic::Code::Internal
        );
    }

    #[test]
    fn internal_errors_hide_their_detail() {
        let status = tonic::Status::from(ApiError::Internal("secret table name".into()));
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(!status.message().contains("secret"));
    }
}
