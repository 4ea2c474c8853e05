//! `shopctl dlq`: the dead letters, with their reasons; replay to the
//! consumer that gave up; purge.

use anyhow::Context as _;
use async_nats::jetstream;
use pg_jetstream::dead_letters::{DeadLetter, DeadLetters};
use pg_jetstream::envelope::headers;

use shopctl::events::describe;
use shopctl::nats::NatsArgs;

/// Options of `shopctl dlq`.
#[derive(Debug, clap::Args)]
pub(crate) struct Dlq {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    nats: NatsArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// The dead letters, oldest first, with their consumer and reason, a
    /// page at a time.
    List {
        /// Only those of this consumer (a service name).
        #[arg(long)]
        consumer: Option<String>,
        /// Start at this number (the one the previous page names).
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// The most to show.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One dead letter in full: headers, reason, the event's fields.
    Show {
        /// Its number in `dlq list`.
        sequence: u64,
    },
    /// Hand dead letters back to the consumer that gave up on them (only
    /// that consumer receives them), and remove them from the queue.
    Replay(Selection),
    /// Delete dead letters for good.
    Purge(Selection),
}

/// Which dead letters a command acts on.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct Selection {
    /// Their numbers in `dlq list`.
    sequences: Vec<u64>,
    /// All of them (of `--consumer`, when given).
    #[arg(long)]
    all: bool,
    /// With `--all`: only those of this consumer.
    #[arg(long, requires = "all")]
    consumer: Option<String>,
}

impl Dlq {
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        let js = jetstream::new(self.nats.connect().await?);
        let queue = DeadLetters::open(js).await?;
        match self.command {
            Command::List {
                consumer,
                from,
                limit,
            } => {
                let page = queue.page(from, limit, consumer.as_deref()).await?;
                print_list(&page.letters);
                if let Some(next) = page.next {
                    let only = consumer
                        .map(|consumer| format!(" --consumer {consumer}"))
                        .unwrap_or_default();
                    println!("more: shopctl dlq list{only} --from {next} --limit {limit}");
                }
            }
            Command::Show { sequence } => print_letter(&queue.get(sequence).await?),
            Command::Replay(selection) => {
                for sequence in selection.resolve(&queue).await? {
                    let letter = queue
                        .replay(sequence)
                        .await
                        .with_context(|| format!("replaying #{sequence}"))?;
                    println!(
                        "replayed #{sequence} ({}) to {}",
                        letter.subject, letter.consumer
                    );
                }
            }
            Command::Purge(selection) => {
                for sequence in selection.resolve(&queue).await? {
                    queue
                        .delete(sequence)
                        .await
                        .with_context(|| format!("purging #{sequence}"))?;
                    println!("purged #{sequence}");
                }
            }
        }
        Ok(())
    }
}

impl Selection {
    async fn resolve(self, queue: &DeadLetters) -> anyhow::Result<Vec<u64>> {
        if !self.all {
            return Ok(self.sequences);
        }
        // Only the numbers are kept, a page at a time.
        let mut sequences = Vec::new();
        let mut from = 1;
        loop {
            let page = queue.page(from, 500, self.consumer.as_deref()).await?;
            sequences.extend(page.letters.iter().map(|letter| letter.sequence));
            match page.next {
                Some(next) => from = next,
                None => break,
            }
        }
        if sequences.is_empty() {
            println!("no dead letters");
        }
        Ok(sequences)
    }
}

fn print_list(letters: &[DeadLetter]) {
    if letters.is_empty() {
        println!("no dead letters");
        return;
    }
    println!(
        "{:>6}  {:<23}  {:<9}  {:<18}  {:>10}  {:<36}  REASON",
        "#", "DEAD-LETTERED", "CONSUMER", "SUBJECT", "DELIVERIES", "SAGA"
    );
    for letter in letters {
        println!(
            "{:>6}  {:<23}  {:<9}  {:<18}  {:>10}  {:<36}  {}",
            letter.sequence,
            letter.time.format("%Y-%m-%d %H:%M:%S%.3f"),
            letter.consumer,
            letter.subject,
            letter.deliveries,
            letter.header(headers::CORRELATION_ID).unwrap_or("-"),
            letter.reason
        );
    }
}

fn print_letter(letter: &DeadLetter) {
    println!("dead letter #{}", letter.sequence);
    println!("  consumer     {}", letter.consumer);
    println!("  reason       {}", letter.reason);
    println!(
        "  when         {}",
        letter.time.format("%Y-%m-%d %H:%M:%S%.3f UTC")
    );
    println!("  deliveries   {}", letter.deliveries);
    println!(
        "  from         {} #{} on {}",
        letter.stream, letter.stream_sequence, letter.subject
    );
    let event_type = letter.header(headers::TYPE).unwrap_or("");
    println!(
        "  event        {}",
        if event_type.is_empty() {
            "-"
        } else {
            event_type
        }
    );
    println!("  fields       {}", describe(event_type, &letter.body));
    println!("  body         {} bytes", letter.body.len());
    println!("  headers");
    let mut all: Vec<(String, String)> = letter
        .original_headers()
        .iter()
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |value| (name.to_string(), value.to_string()))
        })
        .collect();
    all.sort();
    for (name, value) in all {
        println!("    {name}: {value}");
    }
}
