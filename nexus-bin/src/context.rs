//! `nexus context`: an operator's look at one LLM context, read straight
//! from the buses (the directory in Redis, the journal on Kafka), with no
//! node and no token. It reads only: it produces nothing, moves no
//! consumer group and calls no model.

use std::io::Write;
use std::time::Duration;

use clap::{ArgAction, Args, Subcommand};
use nexus_actors::bus::kafka::KafkaConfig;
use nexus_actors::platform::Redis;
use nexus_actors::roles::transaction_manager::api::contexts::{ContextEvent, Json};
use nexus_actors::semantic::directory::ContextDirectory;
use nexus_actors::semantic::journal::{Journal, JournalError, Range};

/// Records `tail` reads at a time.
const TAIL_BATCH: usize = 1000;
/// How long `tail --follow` waits at the end of the journal before reading again.
const TAIL_POLL: Duration = Duration::from_millis(500);

/// What to do with a context.
#[derive(Subcommand)]
pub(crate) enum ContextAction {
    /// Print the context's journal records, one JSON line each (as GET
    /// /api/contexts/ID/events lists them), then follow new ones.
    Tail {
        /// The context's id.
        id: String,
        /// The first journal offset to print (default: the context's first record).
        #[arg(long, default_value_t = 0)]
        from: i64,
        /// Keep printing records as they are journaled (`--follow=false`: stop at the end).
        #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
        follow: bool,
        #[command(flatten)]
        buses: BusArgs,
    },
    /// Print the conversation as it stood at an offset (JSON, with every
    /// step's timing), rebuilt from the journal alone.
    Transcript {
        /// The context's id.
        id: String,
        /// The journal offset to rebuild it at (default: the end).
        #[arg(long)]
        at: Option<i64>,
        #[command(flatten)]
        buses: BusArgs,
    },
}

/// Where the buses are.
#[derive(Args)]
pub(crate) struct BusArgs {
    /// Redis URL (the context directory).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// Kafka bootstrap servers, host:port[,host:port] (the journal).
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
}

impl BusArgs {
    async fn journal(&self) -> anyhow::Result<Journal> {
        let directory = ContextDirectory::new(Redis::connect(&self.redis_url).await?);
        Ok(Journal::new(KafkaConfig::new(self.kafka_brokers.clone()), directory))
    }
}

/// Runs `nexus context …`.
pub(crate) fn run(action: ContextAction) -> anyhow::Result<()> {
    actix_rt::System::new().block_on(async move {
        match action {
            ContextAction::Tail { id, from, follow, buses } => tail(&buses.journal().await?, &id, from, follow).await,
            ContextAction::Transcript { id, at, buses } => {
                let transcript = buses.journal().await?.transcript(&id, at).await?;
                // A closed stdout (`| head`) is where the reader stopped, not an error.
                let _ = writeln!(std::io::stdout().lock(), "{}", Json(&transcript));
                Ok(())
            }
        }
    })
}

async fn tail(journal: &Journal, id: &str, mut from: i64, follow: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    loop {
        let info = journal.directory().get(id).await?.ok_or_else(|| anyhow::anyhow!("no context {id}"))?;
        let entries = match journal.read(&info, Range { from, until: None, limit: TAIL_BATCH }).await {
            Err(JournalError::NotJournaled(_)) => Vec::new(),
            read => read?,
        };
        let more = entries.len() == TAIL_BATCH;
        for entry in entries {
            from = entry.offset + 1;
            if writeln!(out, "{}", Json(&ContextEvent::from(entry))).is_err() {
                return Ok(());
            }
        }
        if out.flush().is_err() {
            return Ok(());
        }
        if !more {
            if !follow {
                return Ok(());
            }
            actix_rt::time::sleep(TAIL_POLL).await;
        }
    }
}
