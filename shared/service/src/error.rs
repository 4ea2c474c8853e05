//! The one mapping from a use case's failure to a gRPC status.

use diesel::result::{DatabaseErrorKind, Error as DieselError};

/// Why a request failed, in the terms a caller can act on.
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
    /// A dependency is unreachable; retrying later may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<DieselError> for ApiError {
    fn from(error: DieselError) -> Self {
        match &error {
            // The connection broke: the server went away mid-request.
            DieselError::DatabaseError(
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
                _,
            )
            | DieselError::BrokenTransactionManager => {
                Self::Unavailable(format!("the database is unreachable: {error}"))
            }
            DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => {
                Self::Unavailable(format!(
                    "a concurrent change got in the way; retry: {error}"
                ))
            }
            // Shutting down, starting up, recovering, or our connection
            // terminated by an administrator.
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, info)
                if info.message().contains("connection")
                    || info.message().contains("the database system is") =>
            {
                Self::Unavailable(format!("the database is unreachable: {error}"))
            }
            // Waited longer than the session allows (see
            // `shop_db::SessionLimits`): someone else holds the rows, or the
            // database is overloaded. Worth a retry.
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, info)
                if info.message().contains("lock timeout") =>
            {
                Self::Unavailable(format!(
                    "the rows this needs are locked by another transaction; retry: {}",
                    info.message()
                ))
            }
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, info)
                if info.message().contains("statement timeout") =>
            {
                Self::Unavailable(format!(
                    "the database did not answer in time; retry: {}",
                    info.message()
                ))
            }
            // A sum of the request's numbers and the stored ones that a
            // BIGINT cannot hold (22003): the request's fault, not a bug.
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, info)
                if info.message().contains("out of range") =>
            {
                Self::OutOfRange(format!(
                    "a number is out of range (at most {} in sums): {}",
                    i64::MAX,
                    info.message()
                ))
            }
            _ => Self::Internal(error.to_string()),
        }
    }
}

impl From<shop_auth::Denied> for ApiError {
    fn from(denied: shop_auth::Denied) -> Self {
        Self::PermissionDenied(denied.to_string())
    }
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for ApiError {
    fn from(error: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        Self::Unavailable(format!("the database is unreachable: {error}"))
    }
}

impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> Self {
        match error {
            ApiError::InvalidArgument(message) => Self::invalid_argument(message),
            ApiError::NotFound(message) => Self::not_found(message),
            ApiError::AlreadyExists(message) => Self::already_exists(message),
            ApiError::FailedPrecondition(message) => Self::failed_precondition(message),
            ApiError::PermissionDenied(message) => Self::permission_denied(message),
            ApiError::OutOfRange(message) => Self::out_of_range(message),
            ApiError::Unavailable(message) => Self::unavailable(message),
            ApiError::Internal(message) => {
                tracing::error!(%message, "internal error");
                Self::internal("internal error")
            }
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

/// Whether a database error is a unique violation.
pub fn is_unique_violation(error: &DieselError) -> bool {
    matches!(
        error,
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)
    )
}

#[cfg(test)]
mod tests {
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
