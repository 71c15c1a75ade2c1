//! The command line as clap parses it: the subcommands and their
//! arguments, with their environment variables and defaults, and the
//! conversions of arguments into configurations. Nothing here starts
//! anything; `main.rs` wires what is parsed.

use clap::{Args, Parser, Subcommand, ValueEnum};
use nexus_actors::node::{KubernetesPanels, PanelsConfig, Role};
use nexus_actors::platform::auth::limiter::LoginLimits;
use nexus_actors::platform::Quotas;
use nexus_actors::roles::llm_manager::model::{EndpointConfig, ModelConfig};
use nexus_actors::roles::llm_manager::LlmManagerConfig;
use nexus_actors::roles::panel_manager::kubernetes::KubeConfig;
use nexus_actors::roles::panel_manager::local::{is_pool, Egress, Limits, NetworkConfig, SandboxChoice};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
#[command(name = "nexus", version, about = "Nexus: the actor-system runtime of Nexus Graph Studio")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
        action: crate::context::ContextAction,
    },
}

#[derive(Subcommand)]
pub(crate) enum KeysAction {
    /// Write a new key file.
    Generate { file: PathBuf },
    /// Add a new signing key and retire the current one.
    Rotate { file: PathBuf },
}

/// What one user may hold at once, and which other sites' pages may call
/// the node.
#[derive(Args)]
pub(crate) struct LimitArgs {
    /// An origin (scheme://host[:port]) besides the node's own whose pages may call /mcp
    /// (repeatable; comma-separated in the environment).
    #[arg(long = "allowed-origin", value_name = "ORIGIN", env = "NEXUS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub(crate) allowed_origins: Vec<String>,
    /// Failed logins taken from one client address per minute (then 429).
    #[arg(long, default_value_t = LoginLimits::default().per_address, env = "NEXUS_LOGIN_FAILURES_PER_ADDRESS")]
    pub(crate) login_failures_per_address: u32,
    /// Failed logins taken for one username per minute, from anywhere (then 429).
    #[arg(long, default_value_t = LoginLimits::default().per_user, env = "NEXUS_LOGIN_FAILURES_PER_USER")]
    pub(crate) login_failures_per_user: u32,
    /// Panel records per user.
    #[arg(long, default_value_t = Quotas::default().panels, env = "NEXUS_MAX_PANELS_PER_USER")]
    pub(crate) max_panels_per_user: usize,
    /// Documents per user.
    #[arg(long, default_value_t = Quotas::default().documents, env = "NEXUS_MAX_DOCUMENTS_PER_USER")]
    pub(crate) max_documents_per_user: usize,
    /// Panel instances running at once per user (Studio instances and App replicas).
    #[arg(long, default_value_t = Quotas::default().instances, env = "NEXUS_MAX_INSTANCES_PER_USER")]
    pub(crate) max_instances_per_user: usize,
    /// LLM contexts per user (forks included).
    #[arg(long, default_value_t = Quotas::default().contexts, env = "NEXUS_MAX_CONTEXTS_PER_USER")]
    pub(crate) max_contexts_per_user: usize,
}

impl LimitArgs {
    pub(crate) fn login_limits(&self) -> LoginLimits {
        LoginLimits {
            per_address: self.login_failures_per_address,
            per_user: self.login_failures_per_user,
            ..LoginLimits::default()
        }
    }

    pub(crate) fn quotas(&self) -> Quotas {
        Quotas {
            panels: self.max_panels_per_user,
            documents: self.max_documents_per_user,
            instances: self.max_instances_per_user,
            contexts: self.max_contexts_per_user,
        }
    }
}

#[derive(Args)]
pub(crate) struct SidecarArgs {
    /// Id of the panel record this instance serves.
    #[arg(long, env = "NEXUS_PANEL_ID")]
    pub(crate) panel: String,
    /// Seconds a stopping sidecar (SIGTERM) lets running tool calls answer;
    /// the default is the longest deadline a call may have.
    #[arg(long, env = "NEXUS_DRAIN_TIMEOUT", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) drain_timeout: u64,
    /// Redis URL (the sidecar holds the bus credentials; the panel holds none).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub(crate) redis_url: String,
    /// Where the panel listens.
    #[arg(long, env = "NEXUS_PANEL_URL", default_value = "http://127.0.0.1:8080")]
    pub(crate) panel_url: String,
    /// Address of /proxy, /reload, /healthz and /metrics (must be loopback).
    #[arg(long, env = "NEXUS_SIDECAR_LISTEN", default_value = "127.0.0.1:3500")]
    pub(crate) listen: SocketAddr,
    /// Most tool calls running in the panel at once; past it callers get `busy`.
    #[arg(long, default_value_t = 64)]
    pub(crate) max_calls: usize,
    /// Messages per second the panel may publish through /proxy.
    #[arg(long, default_value_t = 50)]
    pub(crate) publish_rate: u32,
    /// Messages the panel may publish in a burst.
    #[arg(long, default_value_t = 100)]
    pub(crate) publish_burst: u32,
    /// How often the manifest is read again, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub(crate) poll_interval_ms: u64,
    /// The instance's network namespace (/run/netns/<name>): --listen is bound inside it.
    #[arg(long, env = "NEXUS_NETNS")]
    pub(crate) netns: Option<PathBuf>,
    /// A listener on --listen already bound by whoever started the sidecar
    /// (the local driver, before the panel runs), handed over as this
    /// descriptor.
    #[arg(long, value_parser = clap::value_parser!(i32).range(3..))]
    pub(crate) listen_fd: Option<i32>,
}

/// How a watchdog has its instance deleted.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ExpireVia {
    /// Ask the panel manager over Redis.
    Redis,
    /// Delete its own Pod through the Kubernetes API.
    Kubernetes,
}

/// Where panel instances run.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Driver {
    /// On this machine.
    Local,
    /// On a Kubernetes cluster.
    Kubernetes,
}

#[derive(Args)]
pub(crate) struct WatchdogArgs {
    /// Id of the instance to delete when no heartbeat comes.
    #[arg(long)]
    pub(crate) instance: String,
    /// Id of the panel the instance serves.
    #[arg(long)]
    pub(crate) panel: String,
    /// Address of /heartbeat, /healthz and /metrics (must be loopback).
    #[arg(long, default_value = "127.0.0.1:9999")]
    pub(crate) listen: SocketAddr,
    /// The instance's network namespace (/run/netns/<name>): --listen is bound inside it.
    #[arg(long)]
    pub(crate) netns: Option<PathBuf>,
    /// A listener on --listen already bound by whoever started the watchdog,
    /// handed over as this descriptor.
    #[arg(long, value_parser = clap::value_parser!(i32).range(3..))]
    pub(crate) listen_fd: Option<i32>,
    /// Seconds without a heartbeat before the instance is deleted (1 to 2592000, 30 days).
    #[arg(long, default_value_t = 1800)]
    pub(crate) timeout_secs: u64,
    /// The secret a heartbeat must carry in X-Nexus-Watchdog-Token (the gateway adds it);
    /// without it every heartbeat counts, including the panel's own.
    #[arg(long, env = "NEXUS_WATCHDOG_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// Redis URL (the watchdog's connection stays on the host network).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub(crate) redis_url: String,
    /// How the instance is deleted: redis (ask the panel manager) or
    /// kubernetes (delete this Pod, --pod-name, through the API: in-cluster
    /// config or KUBECONFIG; --listen may then be the Pod's address).
    #[arg(long, value_enum, default_value_t = ExpireVia::Redis)]
    pub(crate) expire_via: ExpireVia,
    /// The Pod to delete with --expire-via kubernetes (the downward API's metadata.name).
    #[arg(long, env = "POD_NAME")]
    pub(crate) pod_name: Option<String>,
}

/// The panel manager's and the traffic gateway's settings.
#[derive(Args)]
pub(crate) struct PanelArgs {
    /// Address of the traffic gateway, the only way in to panels (/p/<panel-id>/).
    #[arg(long, default_value = "127.0.0.1:7071", env = "NEXUS_GATEWAY")]
    pub(crate) gateway: SocketAddr,
    /// The gateway's URL as browsers reach it (default: the address it listens on).
    #[arg(long, env = "NEXUS_PUBLIC_GATEWAY_URL")]
    pub(crate) public_gateway_url: Option<String>,
    /// How panel code is isolated: auto (as root: gVisor if runsc works, else
    /// bubblewrap's user, mount, PID and network namespaces, else refuse;
    /// not root: none, loudly), gvisor, namespaces, process (a plain process
    /// in its own network namespace: unisolated) or none.
    #[arg(long, default_value = "auto", env = "NEXUS_SANDBOX", value_parser = parse_sandbox)]
    pub(crate) sandbox: SandboxChoice,
    /// Where panel instances may connect: internet (the public internet and
    /// DNS; never private ranges, the metadata address, the host or another
    /// instance) or off.
    #[arg(long, default_value = "internet", env = "NEXUS_EGRESS", value_parser = parse_egress)]
    pub(crate) egress: Egress,
    /// The IPv4 pool instances' addresses come from, a /30 each; the same
    /// for every node of a machine.
    #[arg(long, default_value = "10.251.0.0/16", env = "NEXUS_INSTANCE_NET", value_parser = parse_pool)]
    pub(crate) instance_net: (Ipv4Addr, u8),
    /// Memory each panel instance may use, MiB; past it the panel is killed
    /// ("killed: memory limit").
    #[arg(long, default_value_t = 512, env = "NEXUS_INSTANCE_MEMORY_MIB",
          value_parser = clap::value_parser!(u64).range(16..=1 << 20))]
    pub(crate) instance_memory_mib: u64,
    /// CPU each panel instance may use, thousandths of a core.
    #[arg(long, default_value_t = 1000, env = "NEXUS_INSTANCE_CPU_MILLIS",
          value_parser = clap::value_parser!(u32).range(10..=1_000_000))]
    pub(crate) instance_cpu_millis: u32,
    /// What each App instance may write to its scratch space (its copy of the
    /// snapshot, on a tmpfs of its own), MiB.
    #[arg(long, default_value_t = 256, env = "NEXUS_INSTANCE_DISK_MIB",
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub(crate) instance_disk_mib: u64,
    /// The size of each Studio volume's own file system (its code and what
    /// the panel installs and writes there), MiB; volumes already made keep
    /// theirs.
    #[arg(long, default_value_t = 1024, env = "NEXUS_VOLUME_MIB",
          value_parser = clap::value_parser!(u64).range(16..=1 << 20))]
    pub(crate) volume_mib: u64,
    /// gVisor sandboxes kept ready, each waiting with a Python interpreter
    /// started, so that an App's cold start skips the sandbox's and the
    /// interpreter's boot (local driver, under gVisor; 0: none).
    #[arg(long, default_value_t = 2, env = "NEXUS_WARM_SANDBOXES",
          value_parser = clap::value_parser!(u64).range(0..=64))]
    pub(crate) warm_sandboxes: u64,
    /// Processes and threads each panel instance may have at once.
    #[arg(long, default_value_t = 256, env = "NEXUS_INSTANCE_PIDS",
          value_parser = clap::value_parser!(u32).range(8..=1_000_000))]
    pub(crate) instance_pids: u32,
    /// An App instance without requests for this long is stopped (scale to zero).
    #[arg(long, default_value_t = 60, env = "NEXUS_APP_IDLE_SECS")]
    pub(crate) app_idle_secs: u64,
    /// Where panel instances run: local (this machine) or kubernetes (Pods
    /// and Knative Services in --kube-namespace; in-cluster config or KUBECONFIG).
    #[arg(long, value_enum, default_value_t = Driver::Local, env = "NEXUS_DRIVER")]
    pub(crate) driver: Driver,
    /// The panels' namespace (kubernetes driver).
    #[arg(long, default_value = "nexus-panels", env = "NEXUS_KUBE_NAMESPACE")]
    pub(crate) kube_namespace: String,
    /// The nexus image: the Pods' seed, sidecar and watchdog containers.
    #[arg(long, default_value = "ghcr.io/nexus-graph/nexus:latest", env = "NEXUS_KUBE_IMAGE")]
    pub(crate) kube_image: String,
    /// The image user code runs in (python3 and node; the Dockerfile's panel-runtime target).
    #[arg(long, default_value = "ghcr.io/nexus-graph/panel-runtime:latest", env = "NEXUS_KUBE_PANEL_IMAGE")]
    pub(crate) kube_panel_image: String,
    /// A directory with the operator's dev_pod.yaml and prod_service.yaml
    /// (default: the ones in deploy/k8s/templates, built in).
    #[arg(long, env = "NEXUS_KUBE_TEMPLATES")]
    pub(crate) kube_templates: Option<PathBuf>,
    /// The StorageClass of volumes and snapshots (default: the cluster's).
    #[arg(long, env = "NEXUS_KUBE_STORAGE_CLASS")]
    pub(crate) kube_storage_class: Option<String>,
    /// The Secret (key url) with the sidecars' Redis URL.
    #[arg(long, default_value = "nexus-sidecar-redis", env = "NEXUS_KUBE_REDIS_SECRET")]
    pub(crate) kube_redis_secret: String,
    /// A Studio instance without a heartbeat for this long deletes itself
    /// (at most 30 days).
    #[arg(long, default_value_t = 1800, env = "NEXUS_WATCHDOG_TIMEOUT_SECS",
          value_parser = clap::value_parser!(u64).range(1..=30 * 24 * 3600))]
    pub(crate) watchdog_timeout_secs: u64,
}

impl PanelArgs {
    pub(crate) fn config(&self, data_dir: &Path) -> PanelsConfig {
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
            warm_sandboxes: self.warm_sandboxes as usize,
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
pub(crate) struct NodeArgs {
    /// Comma-separated roles to run.
    #[arg(long, value_delimiter = ',', env = "NEXUS_ROLES")]
    pub(crate) roles: Vec<Role>,
    /// Address of the HTTP endpoints.
    #[arg(long, default_value = "127.0.0.1:7070", env = "NEXUS_HTTP")]
    pub(crate) http: SocketAddr,
    /// Redis URL.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub(crate) redis_url: String,
    /// A Redis Cluster for the documents and their live changes: URLs of
    /// some of its nodes, comma-separated (redis://host:port). Without it
    /// they stay on --redis-url.
    #[arg(long, value_delimiter = ',', env = "NEXUS_REDIS_CLUSTER")]
    pub(crate) redis_cluster: Vec<String>,
    /// Kafka bootstrap servers, host:port[,host:port].
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub(crate) kafka_brokers: String,
    /// Seconds a draining node (SIGTERM) gives requests in flight, tool
    /// calls included, before it stops them.
    #[arg(long, env = "NEXUS_DRAIN_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) drain_timeout: u64,
    /// Name of this node in logs, metrics and envelopes; what it owns is
    /// kept under it, and no two live nodes may share it: 1 to 63 ASCII
    /// letters, digits, `-`, `_` and `.`, first a letter or a digit. Default:
    /// `nexus-<host>-<random>`, made once and kept in `<data-dir>/node-name`.
    #[arg(long, env = "NEXUS_NODE_NAME")]
    pub(crate) name: Option<String>,
    /// File holding the password of the user `admin`, who is created (or
    /// given this password) at start: how an operator gets a first user.
    #[arg(long, env = "NEXUS_ADMIN_PASSWORD_FILE")]
    pub(crate) admin_password_file: Option<PathBuf>,
    /// Where the panel manager keeps Studio volumes, App snapshots and logs.
    #[arg(long, default_value = ".nexus", env = "NEXUS_DATA_DIR")]
    pub(crate) data_dir: PathBuf,
    /// The deployment's token-signing key file (`nexus keys generate FILE`), the same on every
    /// node; reloaded when it changes. Required by transaction-manager, panel-manager and
    /// traffic-gateway.
    #[arg(long, env = "NEXUS_JWT_KEY_FILE")]
    pub(crate) jwt_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) panels: PanelArgs,
    #[command(flatten)]
    pub(crate) limits: LimitArgs,
    #[command(flatten)]
    pub(crate) llm: LlmArgs,
}

/// The LLM manager's model endpoints and limits.
#[derive(Args)]
pub(crate) struct LlmArgs {
    /// A model endpoint: `url=http://host:port/v1,model=NAME[,name=N][,key-file=F][,concurrency=4][,max-tokens=N]`
    /// (repeatable, tried in order; semicolon-separated in the environment). `nexus dev`
    /// without one starts the local model server when it is installed.
    #[arg(long = "llm-endpoint", value_name = "SPEC", env = "NEXUS_LLM_ENDPOINTS", value_delimiter = ';')]
    pub(crate) endpoints: Vec<String>,
    /// `nexus dev`: do not start the local model server when no endpoint is given
    /// (the LLM routes then answer 503).
    #[arg(long, env = "NEXUS_NO_LOCAL_MODEL")]
    pub(crate) no_local_model: bool,
    /// Model calls one turn may make.
    #[arg(long, default_value_t = 8, env = "NEXUS_LLM_MAX_STEPS")]
    pub(crate) llm_max_steps: u32,
    /// Longest a turn may take, in seconds.
    #[arg(long, default_value_t = 300, env = "NEXUS_LLM_TURN_TIMEOUT_SECS")]
    pub(crate) llm_turn_timeout_secs: u64,
    /// A context without work for this long is stopped (and rebuilt from its journal when needed), in seconds.
    #[arg(long, default_value_t = 300, env = "NEXUS_LLM_IDLE_SECS")]
    pub(crate) llm_idle_secs: u64,
}

impl LlmArgs {
    /// The role's configuration: the endpoints given, else `fallback`.
    pub(crate) fn config(&self, fallback: Option<EndpointConfig>) -> anyhow::Result<LlmManagerConfig> {
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
