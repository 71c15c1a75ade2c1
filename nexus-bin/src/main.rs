//! `nexus`: the command-line entry point. Parsing and wiring only.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use nexus_actors::bus::kafka::KafkaConfig;
use nexus_actors::infra;
use nexus_actors::node::{self, NodeConfig, Role};

#[derive(Parser)]
#[command(name = "nexus", version, about = "Nexus: the actor-system runtime of Nexus Graph Studio")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole platform in one process, with embedded defaults.
    ///
    /// Starts one node with every role this build has, HTTP on --http
    /// (/healthz, /metrics, /api/graph). Redis: REDIS_URL if set, else
    /// redis://127.0.0.1:6379 if it answers, else a redis-server child with
    /// its data under --data-dir. Kafka: KAFKA_BROKERS if set, else a tansu
    /// child when tansu is installed, else librdkafka's in-process mock
    /// cluster (keeps nothing; last resort). Logs: RUST_LOG (default info).
    /// Spans: OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT when set.
    Dev {
        /// Address of the HTTP endpoints.
        #[arg(long, default_value = "127.0.0.1:7070", env = "NEXUS_HTTP")]
        http: SocketAddr,
        /// Where embedded brokers keep data and logs.
        #[arg(long, default_value = ".nexus", env = "NEXUS_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Run a node with selected roles against explicit brokers (operators).
    ///
    /// Roles: transaction-manager, llm-manager, panel-manager,
    /// traffic-gateway (each arrives in its own release; a role this build
    /// lacks is refused with a clear error). Without --roles the node runs
    /// the kernel, both bus bridges and its HTTP endpoints.
    Node(NodeArgs),
}

#[derive(Args)]
struct NodeArgs {
    /// Comma-separated roles to run.
    #[arg(long, value_delimiter = ',', env = "NEXUS_ROLES")]
    roles: Vec<Role>,
    /// Address of the HTTP endpoints.
    #[arg(long, default_value = "127.0.0.1:7070", env = "NEXUS_HTTP")]
    http: SocketAddr,
    /// Redis URL.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Kafka bootstrap servers, host:port[,host:port].
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// Name of this node in logs, metrics and envelopes.
    #[arg(long, env = "NEXUS_NODE_NAME", default_value = "nexus-node")]
    name: String,
    /// File holding the password of the user `admin`, who is created (or
    /// given this password) at start: how an operator gets a first user.
    #[arg(long, env = "NEXUS_ADMIN_PASSWORD_FILE")]
    admin_password_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = nexus_actors::telemetry::init("nexus");
    match cli.command {
        Command::Dev { http, data_dir } => dev(http, data_dir),
        Command::Node(args) => {
            let first_user = match &args.admin_password_file {
                Some(path) => {
                    let password = std::fs::read_to_string(path)
                        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
                    Some(("admin".to_owned(), password.trim().to_owned()))
                }
                None => None,
            };
            let config = NodeConfig {
                name: args.name,
                http: args.http,
                redis_url: args.redis_url,
                kafka: KafkaConfig::new(args.kafka_brokers),
                roles: args.roles,
                first_user,
            };
            actix_rt::System::new().block_on(node::run(config))?;
            Ok(())
        }
    }
}

fn dev(http: SocketAddr, data_dir: PathBuf) -> anyhow::Result<()> {
    let redis = infra::dev::redis(&data_dir)?;
    let kafka = infra::dev::kafka(&data_dir)?;
    let password = infra::dev::admin_password(&data_dir)?;
    let config = NodeConfig {
        name: "nexus-dev".to_owned(),
        http,
        redis_url: redis.url.clone(),
        kafka: KafkaConfig::new(kafka.brokers.clone()),
        roles: Role::available(),
        first_user: Some(("admin".to_owned(), password.clone())),
    };
    println!("nexus dev: http://{http}/healthz  http://{http}/metrics  http://{http}/api/graph");
    println!("  redis: {} ({})", redis.url, redis.origin);
    println!("  kafka: {} ({})", kafka.brokers, kafka.origin);
    println!("  log in as admin (password kept in {}):", data_dir.join("admin-password").display());
    println!(
        "    curl -s -X POST http://{http}/api/login -H 'content-type: application/json' \\\n      -d '{{\"username\":\"admin\",\"password\":\"{password}\"}}'"
    );
    println!(
        "  then send the token as 'Authorization: Bearer <token>'; API description: http://{http}/api/openapi.json"
    );
    actix_rt::System::new().block_on(node::run(config))?;
    Ok(())
}
