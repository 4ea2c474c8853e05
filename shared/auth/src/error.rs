//! Why a token was not accepted.

/// Why a call is not authenticated. The messages say what is wrong with the
/// token without repeating it or anything secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("no credentials: send `authorization: Bearer <token>` metadata")]
    Missing,
    /// The metadata is there but is not `Bearer <JWT>`.
    #[error("malformed credentials: {0}")]
    Malformed(String),
    /// The token's algorithm is not an asymmetric one we accept.
    #[error(
        "the token's algorithm {0} is not accepted (only RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 and EdDSA)"
    )]
    Algorithm(String),
    /// No trusted key has the token's key id (or fits its algorithm).
    #[error("the token is signed by a key this service does not trust")]
    UnknownKey,
    /// The signature does not verify with the trusted key.
    #[error("the token's signature does not verify")]
    BadSignature,
    /// Past `exp` (plus the allowed clock skew).
    #[error("the token has expired")]
    Expired,
    /// Before `nbf` (less the allowed clock skew).
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("the token was not issued by the trusted issuer")]
    Issuer,
    /// `aud` does not name this system.
    #[error("the token is not meant for this audience")]
    Audience,
    /// A required claim is missing or has the wrong type.
    #[error("the token has no valid `{0}` claim")]
    Claim(String),
    /// The trusted keys could not be loaded (the identity provider is
    /// unreachable, the file is unreadable): the caller may retry.
    #[error("the trusted keys are not available: {0}")]
    KeysUnavailable(String),
    /// The key source is configured in a way that would let others forge
    /// tokens (keys over plain HTTP), or cannot be used as given.
    #[error("the key source is refused: {0}")]
    Refused(String),
}

impl AuthError {
    /// The gRPC status for this failure: `UNAUTHENTICATED`, or `UNAVAILABLE`
    /// when the fault is ours (no keys to check against).
    pub fn to_status(&self) -> tonic::Status {
        match self {
            Self::KeysUnavailable(_) | Self::Refused(_) => {
                tonic::Status::unavailable(self.to_string())
            }
            _ => tonic::Status::unauthenticated(self.to_string()),
        }
    }
}

impl From<jsonwebtoken::errors::Error> for AuthError {
    fn from(error: jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind;
        match error.kind() {
            ErrorKind::InvalidSignature => Self::BadSignature,
            ErrorKind::ExpiredSignature => Self::Expired,
            ErrorKind::ImmatureSignature => Self::NotYetValid,
            ErrorKind::InvalidIssuer => Self::Issuer,
            ErrorKind::InvalidAudience => Self::Audience,
            ErrorKind::InvalidSubject => Self::Claim("sub".into()),
            ErrorKind::MissingRequiredClaim(claim) => Self::Claim(claim.clone()),
            // The key's family and the token's algorithm disagree.
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => Self::UnknownKey,
            ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidRsaKey(_) | ErrorKind::Crypto(_) => {
                Self::BadSignature
            }
            ErrorKind::Json(_) => Self::Malformed("the token's parts are not JSON".into()),
            _ => Self::Malformed("the token is not a well-formed JWT".into()),
        }
    }
}
