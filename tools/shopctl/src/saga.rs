//! `shopctl saga <order_id>`: one saga's timeline across the services, read
//! from the streams, so that a person sees where a saga stopped and why.

use std::time::Duration;

use async_nats::jetstream;
use shopctl::nats::NatsArgs;
use shopctl::timeline::{Outcome, Timeline};
use uuid::Uuid;

/// Options of `shopctl saga`.
#[derive(Debug, clap::Args)]
pub(crate) struct Saga {
    /// The order whose saga to show.
    order_id: Uuid,
    /// How long after the order was placed to look for its events, in
    /// seconds (the saga deadline and a margin).
    #[arg(long, default_value_t = 600)]
    window: u64,
    #[command(flatten)]
    nats: NatsArgs,
}

impl Saga {
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        let js = jetstream::new(self.nats.connect().await?);
        if self.order_id.get_timestamp().is_none() {
            println!(
                "{} is not a UUIDv7: reading the streams from their start",
                self.order_id
            );
        }
        let window = Duration::from_secs(self.window);
        print(&Timeline::read(&js, self.order_id, window).await?);
        Ok(())
    }
}

fn print(timeline: &Timeline) {
    let Some(first) = timeline.steps.first() else {
        println!(
            "no events with correlation id {}: not an order of this system, or older than the streams keep (7 days)",
            timeline.order_id
        );
        return;
    };
    println!(
        "saga {}, from {}",
        timeline.order_id,
        first.time.format("%Y-%m-%d %H:%M:%S%.3f UTC")
    );
    if let Some(trace_id) = timeline.trace_id() {
        println!("trace {trace_id} (Jaeger: search by this trace id)");
    }
    for step in &timeline.steps {
        let micros = (step.time - first.time).num_microseconds().unwrap_or(0);
        let at = format!("+{}.{:01} ms", micros / 1000, (micros % 1000) / 100);
        match &step.dead_letter {
            None => println!(
                "  {at:>12}  {:<9}  {:<18}  {}",
                step.service, step.subject, step.detail
            ),
            Some(letter) => println!(
                "  {at:>12}  {:<9}  DEAD LETTER #{}: gave up on {} from {}: {}",
                letter.consumer, letter.sequence, step.subject, step.service, letter.reason
            ),
        }
    }
    match timeline.outcome() {
        Outcome::Confirmed => println!("outcome: CONFIRMED"),
        Outcome::Cancelled(detail) => println!("outcome: CANCELLED, {detail}"),
        Outcome::NotEnded(last) => println!(
            "outcome: not ended; the last event is {}",
            last.as_deref().unwrap_or("none")
        ),
    }
    let letters: Vec<_> = timeline
        .dead_letters()
        .map(|letter| format!("#{}", letter.sequence))
        .collect();
    if !letters.is_empty() {
        println!(
            "dead letters {}: `shopctl dlq show <n>` tells more; `shopctl dlq replay <n>` retries once the cause is fixed",
            letters.join(", ")
        );
    }
}
