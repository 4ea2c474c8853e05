//! A saga of two services on pg-jetstream alone. `booking` records a
//! booking PENDING and emits `booking.requested` in the same transaction;
//! `seats` holds the seats if the show has them (`seats.held`) or refuses
//! (`seats.refused`); `booking` confirms or rejects. Each service has its
//! own database; they share nothing but NATS.
//!
//! ```text
//! NATS_URL=nats://127.0.0.1:4222 DATABASE_URL=postgres://postgres@127.0.0.1/postgres \
//!     cargo run -p pg-jetstream --example booking_saga
//! ```
//!
//! It makes the databases `booking` and `seats` where `DATABASE_URL`'s
//! server is, books 12 seats, one to three at a time, of a show that has
//! 10, and prints how each booking ended. `tests/runtime/example.rs` runs
//! it against servers of its own.

use std::error::Error;
use std::time::{Duration, Instant};

use diesel::sql_types::{Integer, Text, Uuid as SqlUuid};
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
use pg_jetstream::db::PgPool;
use pg_jetstream::envelope::OutgoingEvent;
use pg_jetstream::{Config, Context, Event, Handler, HandlerError, Messaging, Route, Router};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

// The contract: three protobuf messages (written by hand here; generated
// from .proto files in a real system) and their types and subjects.

#[derive(Clone, PartialEq, prost::Message)]
pub struct BookingRequested {
    #[prost(string, tag = "1")]
    pub booking_id: String,
    #[prost(int32, tag = "2")]
    pub seats: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SeatsHeld {
    #[prost(string, tag = "1")]
    pub booking_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SeatsRefused {
    #[prost(string, tag = "1")]
    pub booking_id: String,
}

impl Event for BookingRequested {
    const TYPE: &'static str = "example.booking.v1.BookingRequested";
    const SUBJECT: &'static str = "booking.requested";
}

impl Event for SeatsHeld {
    const TYPE: &'static str = "example.seats.v1.SeatsHeld";
    const SUBJECT: &'static str = "seats.held";
}

impl Event for SeatsRefused {
    const TYPE: &'static str = "example.seats.v1.SeatsRefused";
    const SUBJECT: &'static str = "seats.refused";
}

// The booking service: a command that writes and emits in one
// transaction, and the handlers that end each booking.

const BOOKINGS: &str = "CREATE TABLE IF NOT EXISTS bookings \
    (id uuid PRIMARY KEY, seats int NOT NULL, status text NOT NULL)";

/// Books `seats`: the booking and its event commit together, then the
/// event is published (or, should that fail, swept up by the relay).
async fn book(pool: &PgPool, messaging: &Messaging, seats: i32) -> Result<Uuid> {
    let id = Uuid::now_v7();
    let event = OutgoingEvent::new(&BookingRequested {
        booking_id: id.to_string(),
        seats,
    })
    .correlated(id.to_string());
    let mut conn = pool.get().await?;
    let outbox = messaging.outbox();
    let written = conn
        .transaction::<_, diesel::result::Error, _>(async |conn| {
            diesel::sql_query("INSERT INTO bookings VALUES ($1, $2, 'PENDING')")
                .bind::<SqlUuid, _>(id)
                .bind::<Integer, _>(seats)
                .execute(conn)
                .await?;
            outbox.append(conn, vec![event]).await
        })
        .await?;
    messaging.outbox().publish(written).await?;
    Ok(id)
}

#[derive(Clone)]
struct Bookings;

/// Ends a PENDING booking; a redelivery finds it ended and changes nothing.
async fn end(
    cx: &mut Context<'_>,
    booking_id: &str,
    status: &str,
) -> std::result::Result<(), HandlerError> {
    let id = pg_jetstream::consumer::uuid_field("booking_id", booking_id)?;
    diesel::sql_query("UPDATE bookings SET status = $2 WHERE id = $1 AND status = 'PENDING'")
        .bind::<SqlUuid, _>(id)
        .bind::<Text, _>(status)
        .execute(cx.conn())
        .await?;
    Ok(())
}

impl Handler<SeatsHeld> for Bookings {
    async fn handle(
        &self,
        cx: &mut Context<'_>,
        event: SeatsHeld,
    ) -> std::result::Result<(), HandlerError> {
        end(cx, &event.booking_id, "CONFIRMED").await
    }
}

impl Handler<SeatsRefused> for Bookings {
    async fn handle(
        &self,
        cx: &mut Context<'_>,
        event: SeatsRefused,
    ) -> std::result::Result<(), HandlerError> {
        end(cx, &event.booking_id, "REJECTED").await
    }
}

// The seats service: one handler that decides and emits.

const SHOWS: &str = "CREATE TABLE IF NOT EXISTS shows (id text PRIMARY KEY, \
    available int NOT NULL CHECK (available >= 0)); \
    INSERT INTO shows VALUES ('premiere', 10) ON CONFLICT DO NOTHING";

#[derive(Clone)]
struct Seats;

impl Handler<BookingRequested> for Seats {
    async fn handle(
        &self,
        cx: &mut Context<'_>,
        event: BookingRequested,
    ) -> std::result::Result<(), HandlerError> {
        // Applied once per event (the inbox sees to that), in the
        // transaction that also writes what it emits.
        let held = diesel::sql_query(
            "UPDATE shows SET available = available - $1 WHERE id = 'premiere' AND available >= $1",
        )
        .bind::<Integer, _>(event.seats)
        .execute(cx.conn())
        .await?;
        let booking_id = event.booking_id;
        if held == 1 {
            cx.emit(&SeatsHeld { booking_id });
        } else {
            cx.emit(&SeatsRefused { booking_id });
        }
        Ok(())
    }
}

/// A service's database, with the runtime's tables and its own.
async fn database(server: &str, name: &str, schema: &str) -> Result<PgPool> {
    let mut admin = AsyncPgConnection::establish(server).await?;
    let exists = diesel::sql_query(format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await;
    if let Err(error) = exists
        && !error.to_string().contains("already exists")
    {
        return Err(error.into());
    }
    let (base, _) = server
        .rsplit_once('/')
        .ok_or("DATABASE_URL has no database")?;
    let url = format!("{base}/{name}");
    pg_jetstream::db::migrate(&url, vec![pg_jetstream::MIGRATIONS]).await?;
    let mut conn = AsyncPgConnection::establish(&url).await?;
    diesel_async::SimpleAsyncConnection::batch_execute(&mut conn, schema).await?;
    Ok(pg_jetstream::db::pool(&url, 4)?)
}

/// Runs both services, books `requests` seats each, and returns each
/// booking's seats and end once none is PENDING.
pub async fn run(
    nats_url: &str,
    database_url: &str,
    requests: &[i32],
) -> Result<Vec<(i32, String)>> {
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await?);
    let booking_db = database(database_url, "booking", BOOKINGS).await?;
    let seats_db = database(database_url, "seats", SHOWS).await?;

    let bookings = Messaging::builder(js.clone(), booking_db.clone(), Config::new("booking"))
        .consume(
            "SEATS",
            Router::new()
                .on::<SeatsHeld>(Route::single())
                .on::<SeatsRefused>(Route::single()),
        )
        .start(Bookings)
        .await?;
    let seats = Messaging::builder(js, seats_db, Config::new("seats"))
        .consume(
            "BOOKING",
            Router::new().on::<BookingRequested>(Route::single()),
        )
        .start(Seats)
        .await?;

    let mut ids = Vec::new();
    for &requested in requests {
        ids.push(book(&booking_db, &bookings, requested).await?);
    }
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { tokio::join!(bookings.run(shutdown.clone()), seats.run(shutdown)) }
    });

    #[derive(diesel::QueryableByName)]
    struct Ended {
        #[diesel(sql_type = SqlUuid)]
        id: Uuid,
        #[diesel(sql_type = Integer)]
        seats: i32,
        #[diesel(sql_type = Text)]
        status: String,
    }
    let started = Instant::now();
    let ended = loop {
        let mut conn = booking_db.get().await?;
        let rows: Vec<Ended> = diesel::sql_query("SELECT id, seats, status FROM bookings")
            .load(&mut *conn)
            .await?;
        if ids.iter().all(|id| {
            rows.iter()
                .any(|row| row.id == *id && row.status != "PENDING")
        }) {
            break rows;
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err("bookings still PENDING after 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    shutdown.cancel();
    running.await?;
    Ok(ids
        .iter()
        .filter_map(|id| ended.iter().find(|row| row.id == *id))
        .map(|row| (row.seats, row.status.clone()))
        .collect())
}

#[tokio::main]
#[allow(dead_code, clippy::print_stdout)]
async fn main() -> Result<()> {
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let database_url = std::env::var("DATABASE_URL")?;
    for (seats, status) in run(&nats_url, &database_url, &[3, 2, 3, 1, 3]).await? {
        println!("{seats} seat(s): {status}");
    }
    Ok(())
}
