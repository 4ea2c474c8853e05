//! Prepared statements kept for statements diesel will not keep.
//!
//! diesel keeps a connection's prepared statements only for queries whose
//! SQL it can key by their Rust type: it refuses every `UPDATE` (a changeset
//! may skip `None` fields), every multi-row `INSERT` (the SQL grows with the
//! rows), every insert of a struct with optional fields (`None` becomes
//! `DEFAULT`) and every `ON CONFLICT ... DO UPDATE`. Each of those is prepared
//! afresh: a round trip to parse and plan it, a second to run it, and a
//! close. On the saga's hot path that is about a third of all statements.
//!
//! [`KeepPrepared`] keys such a statement by its SQL text and bind types instead,
//! which is right for any query whatever its type: the same text is the same
//! statement. Different texts are different entries, so a query whose text
//! varies (a multi-row insert) keeps one statement per row count it was
//! used with.

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::result::QueryResult;

/// `query`, prepared once per connection and kept (see the module doc).
///
/// ```ignore
/// KeepPrepared(diesel::update(accounts::table.find(id)).set(balance.eq(balance - 1)))
///     .execute(conn)
///     .await?;
/// ```
#[derive(Debug, Clone, Copy)]
pub struct KeepPrepared<Q>(pub Q);

impl<Q: Query> Query for KeepPrepared<Q> {
    type SqlType = Q::SqlType;
}

/// No static id: the statement cache then keys by SQL text and bind types.
impl<Q> QueryId for KeepPrepared<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for KeepPrepared<Q> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &Pg) -> QueryResult<bool> {
        Ok(true)
    }
}
