//! The database plumbing (`pg_jetstream::db`) against a real PostgreSQL:
//! connecting while the server starts, session limits, the message
//! language, the pool and statements kept prepared.

mod connect;
mod limits;
mod messages;
mod pool;
mod prepared;
