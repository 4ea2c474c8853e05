//! Authentication at the edge of a gRPC server, and tokens from a client.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::codegen::http;

use crate::{AuthError, Caller, Verifier};

/// Services that answer without a token: probes and `grpcurl list`.
const OPEN: [&str; 2] = ["/grpc.health.v1.Health/", "/grpc.reflection."];

/// A tower layer that verifies the bearer token of every call but the open
/// ones, refuses the call with `UNAUTHENTICATED` before any handler runs,
/// and puts the [`Caller`] in the request's extensions.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    verifier: Verifier,
}

impl AuthLayer {
    /// A layer that checks tokens with `verifier`.
    pub fn new(verifier: Verifier) -> Self {
        Self { verifier }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            verifier: self.verifier.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps.
#[derive(Debug, Clone)]
pub struct Authenticated<S> {
    inner: S,
    verifier: Verifier,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Authenticated<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone is not ready; the one that was polled serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path();
        if OPEN.iter().any(|open| path.starts_with(open)) {
            return Box::pin(inner.call(request));
        }
        let verifier = self.verifier.clone();
        let token = bearer_token(request.headers());
        Box::pin(async move {
            let checked = match token {
                Ok(token) => verifier.verify(&token).await,
                Err(error) => Err(error),
            };
            match checked {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                    inner.call(request).await
                }
                Err(error) => {
                    tracing::debug!(%error, "call refused");
                    Ok(error.to_status().into_http())
                }
            }
        })
    }
}

fn bearer_token(headers: &http::HeaderMap) -> Result<String, AuthError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthError::Missing)?;
    if values.next().is_some() {
        return Err(AuthError::Malformed(
            "more than one authorization value".into(),
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| AuthError::Malformed("the authorization value is not text".into()))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| AuthError::Malformed("expected `Bearer <token>`".into()))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed(
            "expected the Bearer scheme, as in `Bearer <token>`".into(),
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Malformed("the bearer token is empty".into()));
    }
    Ok(token.to_owned())
}

/// The caller the [`AuthLayer`] verified; `UNAUTHENTICATED` when the call
/// did not pass through one (a server wired without it refuses everything).
pub fn caller_of<T>(request: &tonic::Request<T>) -> Result<Caller, tonic::Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| AuthError::Missing.to_status())
}

/// A client interceptor that sends `authorization: Bearer <token>` with
/// every call (or nothing, for a client that has no token).
#[derive(Clone)]
pub struct Bearer {
    value: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bearer")
            .field("token", &self.value.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Bearer {
    /// Sends `token`. A token that cannot be metadata (not ASCII) is sent
    /// as nothing, and the server answers `UNAUTHENTICATED`.
    pub fn new(token: &str) -> Self {
        let value = format!("Bearer {token}").parse().ok().map(
            |mut value: tonic::metadata::MetadataValue<_>| {
                value.set_sensitive(true);
                value
            },
        );
        Self { value }
    }

    /// Sends no token.
    pub fn none() -> Self {
        Self { value: None }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.value {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel that sends a bearer token: what the generated clients take.
pub type BearerChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// `channel`, sending `token` with every call.
pub fn with_token(channel: tonic::transport::Channel, token: &str) -> BearerChannel {
    tonic::service::interceptor::InterceptedService::new(channel, Bearer::new(token))
}
