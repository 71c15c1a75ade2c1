//! `nexus`: the command-line entry point. Parsing and wiring only.

mod args;
mod context;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nexus_actors::bus::kafka::KafkaConfig;
use nexus_actors::infra;
use nexus_actors::node::{self, NodeConfig, Role};
use nexus_actors::platform::auth::keys::{unix_now, KeySet};
use nexus_actors::platform::auth::TOKEN_TTL;
use nexus_actors::roles::llm_manager::model::EndpointConfig;
use nexus_actors::roles::panel_manager::templates;
use nexus_actors::sidecar::{self, SidecarConfig};
use nexus_actors::watchdog::{self, WatchdogConfig};

use args::{Cli, Command, ExpireVia, KeysAction, LimitArgs, LlmArgs, PanelArgs};

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
                redis_cluster: args.redis_cluster,
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
        redis_cluster: Vec::new(),
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
