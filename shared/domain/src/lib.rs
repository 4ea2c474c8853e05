//! What the services' `domain` modules share. Pure: no I/O, and none of
//! tonic, diesel or NATS.
//!
//! - [`labels!`]: an enum stored and sent by fixed names (the statuses),
//!   with `as_str`, `parse` and `ALL` written once for all of them;
//! - [`UnknownLabel`]: what `parse` says of a name it does not know;
//! - [`StepError`]: why a saga step cannot be decided yet, or ever;
//! - [`limits`]: the bounds every request is held to;
//! - [`idempotency_key`]: the one check of a request's idempotency key;
//! - [`OrderId`], [`UserId`]: the ids the saga's steps pass between
//!   services, typed so that one cannot stand for the other.

pub mod limits;

/// Declares an enum whose variants are stored and sent by fixed names:
///
/// ```
/// shop_domain::labels! {
///     /// Where a thing stands.
///     pub enum Status {
///         Open = "OPEN",
///         Closed = "CLOSED",
///     }
/// }
/// assert_eq!(Status::parse("OPEN"), Ok(Status::Open));
/// assert_eq!(Status::Closed.as_str(), "CLOSED");
/// assert!(Status::parse("open").is_err());
/// assert_eq!(Status::ALL.len(), 2);
/// ```
#[macro_export]
macro_rules! labels {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$variant_meta:meta])* $variant:ident = $label:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$variant_meta])* $variant ),+
        }

        impl $name {
            /// Every variant, in declaration order.
            #[allow(dead_code)]
            $vis const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The name it is stored and sent by.
            #[allow(dead_code)]
            $vis const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $label),+
                }
            }

            /// The variant named `value`, exactly as [`Self::as_str`] gives it.
            #[allow(dead_code)]
            $vis fn parse(value: &str) -> ::core::result::Result<Self, $crate::UnknownLabel> {
                match value {
                    $($label => Ok(Self::$variant),)+
                    _ => Err($crate::UnknownLabel::new(stringify!($name), value)),
                }
            }
        }

        impl ::core::fmt::Display for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// Declares an id: a UUID of one kind, which no other kind of id can be
/// passed as.
macro_rules! id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(uuid::Uuid);

        impl $name {
            /// The UUID, for storing and sending.
            pub const fn get(self) -> uuid::Uuid {
                self.0
            }
        }

        impl From<uuid::Uuid> for $name {
            fn from(id: uuid::Uuid) -> Self {
                Self(id)
            }
        }

        impl ::core::fmt::Display for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id! {
    /// An order's id (UUIDv7), given by the order service.
    OrderId
}

id! {
    /// A user's id, given by the user service (or the identity provider's
    /// subject).
    UserId
}

/// A stored or received name that no variant has: data written by a newer
/// version, or by hand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}")]
pub struct UnknownLabel {
    kind: &'static str,
    value: String,
}

impl UnknownLabel {
    #[doc(hidden)]
    pub fn new(kind: &'static str, value: &str) -> Self {
        Self {
            kind,
            value: value.to_owned(),
        }
    }
}

/// Why a saga step decides nothing now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// What the step needs has not arrived yet (an event on another stream
    /// that may come later): try again.
    #[error("{0}")]
    NotYet(String),
    /// The event contradicts what is known and never will be right: set it
    /// aside for a person.
    #[error("{0}")]
    Refused(String),
}

/// A request's idempotency key: at most 200 characters and no NUL; empty
/// means none.
pub fn idempotency_key(key: &str) -> Result<Option<String>, String> {
    if key.chars().count() > 200 {
        return Err("idempotency_key must be at most 200 characters".into());
    }
    if key.contains('\0') {
        return Err("idempotency_key must not contain NUL characters".into());
    }
    Ok(Some(key.to_owned()).filter(|key| !key.is_empty()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    labels! {
        enum Colour {
            Red = "RED",
            /// A documented variant.
            Green = "GREEN",
        }
    }

    #[test]
    fn every_label_round_trips_and_others_are_named_in_the_error() {
        for colour in Colour::ALL {
            assert_eq!(Colour::parse(colour.as_str()), Ok(*colour));
            assert_eq!(colour.to_string(), colour.as_str());
        }
        assert_eq!(
            Colour::parse("BLUE").unwrap_err().to_string(),
            "unknown Colour \"BLUE\""
        );
    }

    #[test]
    fn an_idempotency_key_is_short_without_nul_and_empty_means_none() {
        assert_eq!(super::idempotency_key(""), Ok(None));
        assert_eq!(super::idempotency_key("k-1"), Ok(Some("k-1".into())));
        assert_eq!(
            super::idempotency_key(&"é".repeat(200)).map(|key| key.is_some()),
            Ok(true)
        );
        assert!(super::idempotency_key(&"k".repeat(201)).is_err());
        assert!(super::idempotency_key("a\0").unwrap_err().contains("NUL"));
    }
}
