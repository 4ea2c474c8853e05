//! The limits every service states in its proto comments and enforces, so
//! that no request can reach a sum a column cannot hold.
//!
//! With these, the largest order total is 100 lines x 1,000 units x
//! [`MAX_PRICE_CENTS`] = 10^15 cents, and a balance stays at most
//! [`MAX_BALANCE_CENTS`] plus the refunds of its own captures, far below
//! `i64::MAX` (about 9.2 x 10^18).

/// The largest request message a server decodes (1 MiB); a larger one is
/// refused with OUT_OF_RANGE before it reaches a handler. The largest valid
/// request, an order of 100 lines, is under 30 KiB.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// The highest unit price (10^10 cents: a hundred million).
pub const MAX_PRICE_CENTS: i64 = 10_000_000_000;

/// The most units one `CreateProduct` or `AddStock` brings in, and the
/// most a product may have been stocked with in all (10^12).
pub const MAX_UNITS: i64 = 1_000_000_000_000;

/// The largest single deposit (10^13 cents).
pub const MAX_DEPOSIT_CENTS: i64 = 10_000_000_000_000;

/// The highest balance a deposit may bring a wallet to (10^15 cents).
pub const MAX_BALANCE_CENTS: i64 = 1_000_000_000_000_000;
