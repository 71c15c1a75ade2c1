//! `nexus`: the command-line entry point. Parsing and wiring only.

mod context;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use nexus_actors::bus::kafka::KafkaConfig;
use nexus_actors::infra;
use nexus_actors::node::{self, KubernetesPanels, NodeConfig, PanelsConfig, Role};
use nexus_actors::platform::auth::keys::{unix_now, KeySet};
use nexus_actors::platform::auth::limiter::LoginLimits;
use nexus_actors::platform::auth::TOKEN_TTL;
use nexus_actors::platform::Quotas;
use nexus_actors::roles::llm_manager::model::{EndpointConfig, ModelConfig};
use nexus_actors::roles::llm_manager::LlmManagerConfig;
use nexus_actors::roles::panel_manager::kubernetes::KubeConfig;
use nexus_actors::roles::panel_manager::local::{is_pool, Egress, Limits, NetworkConfig, SandboxChoice};
use nexus_actors::roles::panel_manager::templates;
use nexus_actors::sidecar::{self, SidecarConfig};
use nexus_actors::watchdog::{self, WatchdogConfig};

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
    /// (/healthz, /metrics, /api/graph, the Studio at /), the traffic
    /// gateway on --gateway, and panel instances on this machine (isolated
    /// per --sandbox; files under --data-dir/panels). Redis: REDIS_URL if set, else
    /// redis://127.0.0.1:6379 if it answers, else a redis-server child with
    /// its data under --data-dir. Kafka: KAFKA_BROKERS if set, else a tansu
    /// child when tansu is installed, else librdkafka's in-process mock
    /// cluster (keeps nothing; last resort). Logs: RUST_LOG (default info).
    /// Spans: OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT when set.
    Dev {
        /// Address of the HTTP endpoints.
        #[arg(long, default_value = "127.0.0.1:7070", env = "NEXUS_HTTP")]
        http: SocketAddr,
        /// Where embedded brokers keep data and logs, and panels their files.
        #[arg(long, default_value = ".nexus", env = "NEXUS_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        panels: PanelArgs,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        llm: LlmArgs,
    },
    /// Run a node with selected roles against explicit brokers (operators).
    ///
    /// Roles: transaction-manager, llm-manager, panel-manager,
    /// traffic-gateway (each arrives in its own release; a role this build
    /// lacks is refused with a clear error). Without --roles the node runs
    /// the kernel, both bus bridges and its HTTP endpoints.
    Node(NodeArgs),
    /// Run beside one panel instance: list its tools, forward tool calls to it.
    ///
    /// Reads the panel's GET /manifest (polling until it answers, then every
    /// --poll-interval-ms), lists its tools for the panel's owner, forwards
    /// calls from the bus to POST /mcp/execute, and serves the panel
    /// POST /proxy (publishes on nexus:panel:<id>:out:<channel> only),
    /// POST /reload, GET /healthz and GET /metrics on --listen (loopback only).
    /// The panel record must exist (POST /api/panels).
    ///
    /// With --netns the sidecar stays on the host network (its Redis
    /// connections stay outside) while --listen is bound inside the
    /// instance's network namespace, where the panel finds it on its own
    /// loopback.
    Sidecar(SidecarArgs),
    /// Run beside a Studio instance: delete it after no heartbeat for --timeout-secs.
    ///
    /// Serves POST /heartbeat (resets the clock; 401 without the --token
    /// secret in X-Nexus-Watchdog-Token; 410 once expired),
    /// GET /healthz and GET /metrics on --listen (loopback only; inside
    /// --netns when given). Startup counts as a heartbeat. When the time is
    /// up it publishes nexus.instance.expire on
    /// nexus:instance:<id>:control, and again every few seconds until it is
    /// stopped with the instance. With --expire-via kubernetes it deletes
    /// its own Pod (--pod-name) through the Kubernetes API instead.
    Watchdog(WatchdogArgs),
    /// Seed a Studio volume with the panel's template, once (the Kubernetes
    /// Studio Pod's init container).
    ///
    /// Writes the template --source (template:<name>) into --dir unless the
    /// directory already holds anything (lost+found aside): the owner's
    /// work is never overwritten.
    SeedVolume {
        /// The panel's source, template:<name>.
        #[arg(long)]
        source: String,
        /// The volume's mount point.
        #[arg(long, default_value = "/home")]
        dir: PathBuf,
    },
    /// Make or rotate the token-signing key file every node of a deployment reads.
    ///
    /// `generate FILE` writes a new key file (0600) and refuses to overwrite
    /// one. `rotate FILE` adds a key that signs from one minute on (nodes
    /// reload the file every few seconds, so all have it by then) and keeps
    /// the old key verifying until the tokens it signed have expired (12 h);
    /// keys past that are dropped.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Look at an LLM context straight from the buses (operators).
    ///
    /// `tail ID` prints its journal records, one JSON line each, from the
    /// first (or --from OFFSET), then follows new ones (--follow=false stops
    /// at the end). `transcript ID [--at OFFSET]` prints the conversation as
    /// it stood at OFFSET, with every step's timing, rebuilt from the records
    /// alone. Reads the directory in Redis (--redis-url, REDIS_URL) and the
    /// journal on Kafka (--kafka-brokers, KAFKA_BROKERS); needs no node.
    Context {
        #[command(subcommand)]
        action: context::ContextAction,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Write a new key file.
    Generate { file: PathBuf },
    /// Add a new signing key and retire the current one.
    Rotate { file: PathBuf },
}

/// What one user may hold at once, and which other sites' pages may call
/// the node.
#[derive(Args)]
struct LimitArgs {
    /// An origin (scheme://host[:port]) besides the node's own whose pages may call /mcp
    /// (repeatable; comma-separated in the environment).
    #[arg(long = "allowed-origin", value_name = "ORIGIN", env = "NEXUS_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// Failed logins taken from one client address per minute (then 429).
    #[arg(long, default_value_t = LoginLimits::default().per_address, env = "NEXUS_LOGIN_FAILURES_PER_ADDRESS")]
    login_failures_per_address: u32,
    /// Failed logins taken for one username per minute, from anywhere (then 429).
    #[arg(long, default_value_t = LoginLimits::default().per_user, env = "NEXUS_LOGIN_FAILURES_PER_USER")]
    login_failures_per_user: u32,
    /// Panel records per user.
    #[arg(long, default_value_t = Quotas::default().panels, env = "NEXUS_MAX_PANELS_PER_USER")]
    max_panels_per_user: usize,
    /// Documents per user.
    #[arg(long, default_value_t = Quotas::default().documents, env = "NEXUS_MAX_DOCUMENTS_PER_USER")]
    max_documents_per_user: usize,
    /// Panel instances running at once per user (Studio instances and App replicas).
    #[arg(long, default_value_t = Quotas::default().instances, env = "NEXUS_MAX_INSTANCES_PER_USER")]
    max_instances_per_user: usize,
    /// LLM contexts per user (forks included).
    #[arg(long, default_value_t = Quotas::default().contexts, env = "NEXUS_MAX_CONTEXTS_PER_USER")]
    max_contexts_per_user: usize,
}

impl LimitArgs {
    fn login_limits(&self) -> LoginLimits {
        LoginLimits {
            per_address: self.login_failures_per_address,
            per_user: self.login_failures_per_user,
            ..LoginLimits::default()
        }
    }

    fn quotas(&self) -> Quotas {
        Quotas {
            panels: self.max_panels_per_user,
            documents: self.max_documents_per_user,
            instances: self.max_instances_per_user,
            contexts: self.max_contexts_per_user,
        }
    }
}

#[derive(Args)]
struct SidecarArgs {
    /// Id of the panel record this instance serves.
    #[arg(long, env = "NEXUS_PANEL_ID")]
    panel: String,
    /// Seconds a stopping sidecar (SIGTERM) lets running tool calls answer;
    /// the default is the longest deadline a call may have.
    #[arg(long, env = "NEXUS_DRAIN_TIMEOUT", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=3600))]
    drain_timeout: u64,
    /// Redis URL (the sidecar holds the bus credentials; the panel holds none).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Where the panel listens.
    #[arg(long, env = "NEXUS_PANEL_URL", default_value = "http://127.0.0.1:8080")]
    panel_url: String,
    /// Address of /proxy, /reload, /healthz and /metrics (must be loopback).
    #[arg(long, env = "NEXUS_SIDECAR_LISTEN", default_value = "127.0.0.1:3500")]
    listen: SocketAddr,
    /// Most tool calls running in the panel at once; past it callers get `busy`.
    #[arg(long, default_value_t = 64)]
    max_calls: usize,
    /// Messages per second the panel may publish through /proxy.
    #[arg(long, default_value_t = 50)]
    publish_rate: u32,
    /// Messages the panel may publish in a burst.
    #[arg(long, default_value_t = 100)]
    publish_burst: u32,
    /// How often the manifest is read again, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    poll_interval_ms: u64,
    /// The instance's network namespace (/run/netns/<name>): --listen is bound inside it.
    #[arg(long, env = "NEXUS_NETNS")]
    netns: Option<PathBuf>,
    /// A listener on --listen already bound by whoever started the sidecar
    /// (the local driver, before the panel runs), handed over as this
    /// descriptor.
    #[arg(long, value_parser = clap::value_parser!(i32).range(3..))]
    listen_fd: Option<i32>,
}

/// How a watchdog has its instance deleted.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExpireVia {
    /// Ask the panel manager over Redis.
    Redis,
    /// Delete its own Pod through the Kubernetes API.
    Kubernetes,
}

/// Where panel instances run.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Driver {
    /// On this machine.
    Local,
    /// On a Kubernetes cluster.
    Kubernetes,
}

#[derive(Args)]
struct WatchdogArgs {
    /// Id of the instance to delete when no heartbeat comes.
    #[arg(long)]
    instance: String,
    /// Id of the panel the instance serves.
    #[arg(long)]
    panel: String,
    /// Address of /heartbeat, /healthz and /metrics (must be loopback).
    #[arg(long, default_value = "127.0.0.1:9999")]
    listen: SocketAddr,
    /// The instance's network namespace (/run/netns/<name>): --listen is bound inside it.
    #[arg(long)]
    netns: Option<PathBuf>,
    /// A listener on --listen already bound by whoever started the watchdog,
    /// handed over as this descriptor.
    #[arg(long, value_parser = clap::value_parser!(i32).range(3..))]
    listen_fd: Option<i32>,
    /// Seconds without a heartbeat before the instance is deleted (1 to 2592000, 30 days).
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// The secret a heartbeat must carry in X-Nexus-Watchdog-Token (the gateway adds it);
    /// without it every heartbeat counts, including the panel's own.
    #[arg(long, env = "NEXUS_WATCHDOG_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Redis URL (the watchdog's connection stays on the host network).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// How the instance is deleted: redis (ask the panel manager) or
    /// kubernetes (delete this Pod, --pod-name, through the API: in-cluster
    /// config or KUBECONFIG; --listen may then be the Pod's address).
    #[arg(long, value_enum, default_value_t = ExpireVia::Redis)]
    expire_via: ExpireVia,
    /// The Pod to delete with --expire-via kubernetes (the downward API's metadata.name).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
}

/// The panel manager's and the traffic gateway's settings.
#[derive(Args)]
struct PanelArgs {
    /// Address of the traffic gateway, the only way in to panels (/p/<panel-id>/).
    #[arg(long, default_value = "127.0.0.1:7071", env = "NEXUS_GATEWAY")]
    gateway: SocketAddr,
    /// The gateway's URL as browsers reach it (default: the address it listens on).
    #[arg(long, env = "NEXUS_PUBLIC_GATEWAY_URL")]
    public_gateway_url: Option<String>,
    /// How panel code is isolated: auto (as root: gVisor if runsc works, else
    /// bubblewrap's user, mount, PID and network namespaces, else refuse;
    /// not root: none, loudly), gvisor, namespaces, process (a plain process
    /// in its own network namespace: unisolated) or none.
    #[arg(long, default_value = "auto", env = "NEXUS_SANDBOX", value_parser = parse_sandbox)]
    sandbox: SandboxChoice,
    /// Where panel instances may connect: internet (the public internet and
    /// DNS; never private ranges, the metadata address, the host or another
    /// instance) or off.
    #[arg(long, default_value = "internet", env = "NEXUS_EGRESS", value_parser = parse_egress)]
    egress: Egress,
    /// The IPv4 pool instances' addresses come from, a /30 each; the same
    /// for every node of a machine.
    #[arg(long, default_value = "10.251.0.0/16", env = "NEXUS_INSTANCE_NET", value_parser = parse_pool)]
    instance_net: (Ipv4Addr, u8),
    /// Memory each panel instance may use, MiB; past it the panel is killed
    /// ("killed: memory limit").
    #[arg(long, default_value_t = 512, env = "NEXUS_INSTANCE_MEMORY_MIB",
          value_parser = clap::value_parser!(u64).range(16..=1 << 20))]
    instance_memory_mib: u64,
    /// CPU each panel instance may use, thousandths of a core.
    #[arg(long, default_value_t = 1000, env = "NEXUS_INSTANCE_CPU_MILLIS",
          value_parser = clap::value_parser!(u32).range(10..=1_000_000))]
    instance_cpu_millis: u32,
    /// What each App instance may write to its scratch space (its copy of the
    /// snapshot, on a tmpfs of its own), MiB.
    #[arg(long, default_value_t = 256, env = "NEXUS_INSTANCE_DISK_MIB",
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    instance_disk_mib: u64,
    /// The size of each Studio volume's own file system (its code and what
    /// the panel installs and writes there), MiB; volumes already made keep
    /// theirs.
    #[arg(long, default_value_t = 1024, env = "NEXUS_VOLUME_MIB",
          value_parser = clap::value_parser!(u64).range(16..=1 << 20))]
    volume_mib: u64,
    /// Processes and threads each panel instance may have at once.
    #[arg(long, default_value_t = 256, env = "NEXUS_INSTANCE_PIDS",
          value_parser = clap::value_parser!(u32).range(8..=1_000_000))]
    instance_pids: u32,
    /// An App instance without requests for this long is stopped (scale to zero).
    #[arg(long, default_value_t = 60, env = "NEXUS_APP_IDLE_SECS")]
    app_idle_secs: u64,
    /// Where panel instances run: local (this machine) or kubernetes (Pods
    /// and Knative Services in --kube-namespace; in-cluster config or KUBECONFIG).
    #[arg(long, value_enum, default_value_t = Driver::Local, env = "NEXUS_DRIVER")]
    driver: Driver,
    /// The panels' namespace (kubernetes driver).
    #[arg(long, default_value = "nexus-panels", env = "NEXUS_KUBE_NAMESPACE")]
    kube_namespace: String,
    /// The nexus image: the Pods' seed, sidecar and watchdog containers.
    #[arg(long, default_value = "ghcr.io/nexus-graph/nexus:latest", env = "NEXUS_KUBE_IMAGE")]
    kube_image: String,
    /// The image user code runs in (python3 and node; the Dockerfile's panel-runtime target).
    #[arg(long, default_value = "ghcr.io/nexus-graph/panel-runtime:latest", env = "NEXUS_KUBE_PANEL_IMAGE")]
    kube_panel_image: String,
    /// A directory with the operator's dev_pod.yaml and prod_service.yaml
    /// (default: the ones in deploy/k8s/templates, built in).
    #[arg(long, env = "NEXUS_KUBE_TEMPLATES")]
    kube_templates: Option<PathBuf>,
    /// The StorageClass of volumes and snapshots (default: the cluster's).
    #[arg(long, env = "NEXUS_KUBE_STORAGE_CLASS")]
    kube_storage_class: Option<String>,
    /// The Secret (key url) with the sidecars' Redis URL.
    #[arg(long, default_value = "nexus-sidecar-redis", env = "NEXUS_KUBE_REDIS_SECRET")]
    kube_redis_secret: String,
    /// A Studio instance without a heartbeat for this long deletes itself
    /// (at most 30 days).
    #[arg(long, default_value_t = 1800, env = "NEXUS_WATCHDOG_TIMEOUT_SECS",
          value_parser = clap::value_parser!(u64).range(1..=30 * 24 * 3600))]
    watchdog_timeout_secs: u64,
}

impl PanelArgs {
    fn config(&self, data_dir: &Path) -> PanelsConfig {
        PanelsConfig {
            sandbox: self.sandbox,
            network: NetworkConfig {
                pool: self.instance_net.0,
                prefix: self.instance_net.1,
                egress: self.egress,
                dns: None,
            },
            limits: Limits {
                memory: self.instance_memory_mib << 20,
                cpu_millis: self.instance_cpu_millis,
                pids: self.instance_pids,
                disk: self.instance_disk_mib << 20,
                volume: self.volume_mib << 20,
            },
            app_idle: Duration::from_secs(self.app_idle_secs.max(1)),
            watchdog_timeout: Duration::from_secs(self.watchdog_timeout_secs.max(1)),
            kubernetes: (self.driver == Driver::Kubernetes).then(|| KubernetesPanels {
                config: KubeConfig {
                    nexus_image: self.kube_image.clone(),
                    panel_image: self.kube_panel_image.clone(),
                    storage_class: self.kube_storage_class.clone(),
                    redis_secret: self.kube_redis_secret.clone(),
                    ..KubeConfig::new(self.kube_namespace.clone())
                },
                templates: self.kube_templates.clone(),
            }),
            ..PanelsConfig::new(data_dir.join("panels"))
        }
    }
}

fn parse_sandbox(s: &str) -> Result<SandboxChoice, String> {
    match s {
        "auto" => Ok(SandboxChoice::Auto),
        "gvisor" => Ok(SandboxChoice::Gvisor),
        "namespaces" => Ok(SandboxChoice::Namespaces),
        "process" => Ok(SandboxChoice::Process),
        "none" => Ok(SandboxChoice::None),
        other => Err(format!("{other:?} is not one of auto, gvisor, namespaces, process, none")),
    }
}

fn parse_egress(s: &str) -> Result<Egress, String> {
    match s {
        "internet" => Ok(Egress::Internet),
        "off" => Ok(Egress::Off),
        other => Err(format!("{other:?} is not one of internet, off")),
    }
}

fn parse_pool(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let bad = || format!("{s:?} is not an IPv4 prefix such as 10.251.0.0/16");
    let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
    let (addr, prefix): (Ipv4Addr, u8) = (addr.parse().map_err(|_| bad())?, prefix.parse().map_err(|_| bad())?);
    match is_pool(addr, prefix) {
        true => Ok((addr, prefix)),
        false => Err(format!("{s:?}: the pool must be a prefix of length 8 to 28 with no host bits set")),
    }
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
    /// Seconds a draining node (SIGTERM) gives requests in flight, tool
    /// calls included, before it stops them.
    #[arg(long, env = "NEXUS_DRAIN_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    drain_timeout: u64,
    /// Name of this node in logs, metrics and envelopes; what it owns is
    /// kept under it, and no two live nodes may share it: 1 to 63 ASCII
    /// letters, digits, `-`, `_` and `.`, first a letter or a digit. Default:
    /// `nexus-<host>-<random>`, made once and kept in `<data-dir>/node-name`.
    #[arg(long, env = "NEXUS_NODE_NAME")]
    name: Option<String>,
    /// File holding the password of the user `admin`, who is created (or
    /// given this password) at start: how an operator gets a first user.
    #[arg(long, env = "NEXUS_ADMIN_PASSWORD_FILE")]
    admin_password_file: Option<PathBuf>,
    /// Where the panel manager keeps Studio volumes, App snapshots and logs.
    #[arg(long, default_value = ".nexus", env = "NEXUS_DATA_DIR")]
    data_dir: PathBuf,
    /// The deployment's token-signing key file (`nexus keys generate FILE`), the same on every
    /// node; reloaded when it changes. Required by transaction-manager, panel-manager and
    /// traffic-gateway.
    #[arg(long, env = "NEXUS_JWT_KEY_FILE")]
    jwt_key_file: Option<PathBuf>,
    #[command(flatten)]
    panels: PanelArgs,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    llm: LlmArgs,
}

/// The LLM manager's model endpoints and limits.
#[derive(Args)]
struct LlmArgs {
    /// A model endpoint: `url=http://host:port/v1,model=NAME[,name=N][,key-file=F][,concurrency=4][,max-tokens=N]`
    /// (repeatable, tried in order; semicolon-separated in the environment). `nexus dev`
    /// without one starts the local model server when it is installed.
    #[arg(long = "llm-endpoint", value_name = "SPEC", env = "NEXUS_LLM_ENDPOINTS", value_delimiter = ';')]
    endpoints: Vec<String>,
    /// `nexus dev`: do not start the local model server when no endpoint is given
    /// (the LLM routes then answer 503).
    #[arg(long, env = "NEXUS_NO_LOCAL_MODEL")]
    no_local_model: bool,
    /// Model calls one turn may make.
    #[arg(long, default_value_t = 8, env = "NEXUS_LLM_MAX_STEPS")]
    llm_max_steps: u32,
    /// Longest a turn may take, in seconds.
    #[arg(long, default_value_t = 300, env = "NEXUS_LLM_TURN_TIMEOUT_SECS")]
    llm_turn_timeout_secs: u64,
    /// A context without work for this long is stopped (and rebuilt from its journal when needed), in seconds.
    #[arg(long, default_value_t = 300, env = "NEXUS_LLM_IDLE_SECS")]
    llm_idle_secs: u64,
}

impl LlmArgs {
    /// The role's configuration: the endpoints given, else `fallback`.
    fn config(&self, fallback: Option<EndpointConfig>) -> anyhow::Result<LlmManagerConfig> {
        let mut endpoints = Vec::new();
        for spec in &self.endpoints {
            endpoints.push(EndpointConfig::parse(spec).map_err(|e| anyhow::anyhow!("--llm-endpoint {spec:?}: {e}"))?);
        }
        if endpoints.is_empty() {
            endpoints.extend(fallback);
        }
        let mut config = LlmManagerConfig { model: ModelConfig::new(endpoints), ..LlmManagerConfig::default() };
        config.limits.max_steps = self.llm_max_steps;
        config.limits.deadline = Duration::from_secs(self.llm_turn_timeout_secs);
        config.idle = Duration::from_secs(self.llm_idle_secs);
        Ok(config)
    }
}

/// Ordinary start-up failures (a port in use, a missing file) end in one
/// line on stderr and exit status 1, never a backtrace.
fn main() -> ExitCode {
    let cli = Cli::parse();
    let _telemetry = nexus_actors::telemetry::init("nexus");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nexus: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev { http, data_dir, panels, limits, llm } => dev(http, data_dir, panels, limits, llm),
        Command::Keys { action } => keys(action),
        Command::SeedVolume { source, dir } => {
            let wrote = templates::seed(&source, &dir)?;
            println!("{}", if wrote { "seeded" } else { "already holds files; left as it is" });
            Ok(())
        }
        Command::Context { action } => context::run(action),
        Command::Sidecar(args) => {
            let config = SidecarConfig {
                panel_url: args.panel_url,
                listen: args.listen,
                max_calls: args.max_calls,
                publish_rate: args.publish_rate,
                publish_burst: args.publish_burst,
                poll_interval: Duration::from_millis(args.poll_interval_ms.max(100)),
                netns: args.netns,
                listen_fd: args.listen_fd,
                drain_timeout: Duration::from_secs(args.drain_timeout),
                ..SidecarConfig::new(args.panel, args.redis_url)
            };
            actix_rt::System::new().block_on(sidecar::run(config))?;
            Ok(())
        }
        Command::Watchdog(args) => {
            let config = WatchdogConfig {
                listen: args.listen,
                netns: args.netns,
                listen_fd: args.listen_fd,
                timeout: Duration::from_secs(args.timeout_secs),
                token: args.token,
                pod_network: args.expire_via == ExpireVia::Kubernetes,
                ..WatchdogConfig::new(args.instance, args.panel, args.redis_url)
            };
            if args.expire_via == ExpireVia::Kubernetes {
                let pod = args
                    .pod_name
                    .ok_or_else(|| anyhow::anyhow!("--expire-via kubernetes needs --pod-name (POD_NAME)"))?;
                actix_rt::System::new().block_on(async move {
                    let expiry = watchdog::KubeExpiry::infer(pod).await?;
                    watchdog::start(config, Arc::new(expiry)).await?.run().await
                })?;
            } else {
                actix_rt::System::new().block_on(watchdog::run(config))?;
            }
            Ok(())
        }
        Command::Node(args) => {
            let first_user = match &args.admin_password_file {
                Some(path) => {
                    let password = std::fs::read_to_string(path)
                        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
                    Some(("admin".to_owned(), password.trim().to_owned()))
                }
                None => None,
            };
            let llm = args.llm.config(None)?;
            if args.roles.contains(&Role::LlmManager) && llm.model.endpoints.is_empty() {
                anyhow::bail!(
                    "role llm-manager needs a model endpoint: give --llm-endpoint url=http://HOST:PORT/v1,model=NAME"
                );
            }
            let name = match args.name {
                Some(name) => name,
                None => nexus_actors::platform::node_lease::default_name(&args.data_dir, "nexus-node")?,
            };
            let config = NodeConfig {
                name,
                http: args.http,
                redis_url: args.redis_url,
                kafka: KafkaConfig::new(args.kafka_brokers),
                roles: args.roles,
                first_user,
                gateway: args.panels.gateway,
                public_gateway_url: args.panels.public_gateway_url.clone(),
                panels: args.panels.config(&args.data_dir),
                key_file: args.jwt_key_file,
                quotas: args.limits.quotas(),
                allowed_origins: args.limits.allowed_origins.clone(),
                login_limits: args.limits.login_limits(),
                llm,
                drain_timeout: Duration::from_secs(args.drain_timeout),
            };
            actix_rt::System::new().block_on(node::run(config))?;
            Ok(())
        }
    }
}

fn keys(action: KeysAction) -> anyhow::Result<()> {
    match action {
        KeysAction::Generate { file } => {
            if file.exists() {
                anyhow::bail!("{} exists; rotate it with `nexus keys rotate {}`", file.display(), file.display());
            }
            let set = KeySet::generate();
            set.save(&file)?;
            println!("wrote {} (key {})", file.display(), set.keys[0].kid);
        }
        KeysAction::Rotate { file } => {
            let mut set = KeySet::load(&file)?;
            set.rotate(unix_now(), TOKEN_TTL);
            set.save(&file)?;
            let kids: Vec<&str> = set.keys.iter().map(|k| k.kid.as_str()).collect();
            println!("rotated {}: keys {kids:?}; the newest signs from one minute on", file.display());
        }
    }
    Ok(())
}

fn dev(http: SocketAddr, data_dir: PathBuf, panels: PanelArgs, limits: LimitArgs, llm: LlmArgs) -> anyhow::Result<()> {
    // Before anything else lands in the data directory: one that holds files
    // but no name yet is an earlier version's, which keeps its fixed name.
    let name = nexus_actors::platform::node_lease::default_name(&data_dir, "nexus-dev")?;
    infra::dev::data_dir(&data_dir)?;
    let key_file = data_dir.join("jwt-keys.json");
    KeySet::load_or_generate(&key_file)?;
    let redis = infra::dev::redis(&data_dir)?;
    let kafka = infra::dev::kafka(&data_dir)?;
    let password = infra::dev::admin_password(&data_dir)?;
    // Kept alive as long as the node: it owns the local model server, if one started.
    let model = match llm.endpoints.is_empty() && !llm.no_local_model {
        true => Some(infra::dev::model(&data_dir)?),
        false => None,
    };
    let local = match model.as_ref().map(|m| (&m.base_url, &m.model, m.concurrency)) {
        Some((Some(url), Some(name), concurrency)) => {
            let mut endpoint = EndpointConfig::new(url, name)?;
            endpoint.name = "local".into();
            endpoint.concurrency = concurrency;
            // A small model can ramble until the turn's deadline, holding its only slot.
            endpoint.max_tokens = Some(1024);
            Some(endpoint)
        }
        _ => None,
    };
    let llm = llm.config(local)?;
    let llm_origin = match &model {
        Some(model) => model.origin.clone(),
        None => llm.model.endpoints.iter().map(|e| e.base_url.as_str()).collect::<Vec<_>>().join(", "),
    };
    let config = NodeConfig {
        name,
        http,
        redis_url: redis.url.clone(),
        kafka: KafkaConfig::new(kafka.brokers.clone()),
        roles: Role::available(),
        first_user: Some(("admin".to_owned(), password.clone())),
        gateway: panels.gateway,
        public_gateway_url: panels.public_gateway_url.clone(),
        panels: panels.config(&data_dir),
        key_file: Some(key_file.clone()),
        quotas: limits.quotas(),
        allowed_origins: limits.allowed_origins.clone(),
        login_limits: limits.login_limits(),
        llm,
        drain_timeout: node::DEFAULT_DRAIN_TIMEOUT,
    };
    println!("nexus dev: http://{http}/healthz  http://{http}/readyz  http://{http}/metrics  http://{http}/api/graph (admins)");
    println!("  redis: {} ({})", redis.url, redis.origin);
    println!("  kafka: {} ({})", kafka.brokers, kafka.origin);
    println!("  llm: {llm_origin}");
    let gateway = match panels.gateway.port() {
        0 => "the traffic gateway's port (chosen at start, logged)".to_owned(),
        _ => format!("http://{}", panels.gateway),
    };
    println!("  panels: {gateway}/p/<panel-id>/ (files under {})", data_dir.join("panels").display());
    let password_file = data_dir.join("admin-password");
    println!("  log in as admin; the password is in {} (readable by you only):", password_file.display());
    println!(
        "    curl -s -X POST http://{http}/api/login -H 'content-type: application/json' \\\n      -d \"{{\\\"username\\\":\\\"admin\\\",\\\"password\\\":\\\"$(cat {})\\\"}}\"",
        password_file.display()
    );
    println!("  token-signing keys: {} (rotate: nexus keys rotate FILE)", key_file.display());
    println!(
        "  then send the token as 'Authorization: Bearer <token>'; API description: http://{http}/api/openapi.json"
    );
    actix_rt::System::new().block_on(node::run(config))?;
    Ok(())
}
