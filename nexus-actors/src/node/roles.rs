//! Starting the node's parts one role at a time, each from the node's
//! configuration and the parts started before it: the tool registry, the
//! transaction manager's state, the panel manager and its runtime driver,
//! the gateway, the LLM manager and the relay of panels' agent messages.
//! Which roles run, and in what order, is [`super::start`]'s decision.

use std::sync::Arc;

use super::{Bridges, NodeConfig, NodeError, Role};
use crate::kernel::{ActorRef, Kernel};
use crate::platform::auth::keys::KeyRing;
use crate::platform::node_lease::{LeaseTimes, NodeLease};
use crate::platform::{Platform, Redis, UserRole};
use crate::roles::llm_manager::{self as llm_role, LlmManagerDeps, LlmManagerHandle};
use crate::roles::panel_manager::driver::RuntimeDriver;
use crate::roles::panel_manager::kubernetes::{KubeConfig, KubeDriver, Templates};
use crate::roles::panel_manager::local::{LocalConfig, LocalDriver};
use crate::roles::panel_manager::{self as pm_role, PanelManagerConfig, PanelManagerHandle};
use crate::roles::traffic_gateway::{self as gateway_role, Gateway, GatewayConfig};
use crate::roles::transaction_manager as tm_role;
use crate::semantic::commands::CommandSender;
use crate::tools::registry::{RegisterTool, RegistryDeps};
use crate::tools::store::ToolStore;
use crate::tools::ToolRegistry;

/// Takes the node's name for as long as it runs: before any role can treat
/// what another node of the same name owns as its own.
pub(super) async fn lease_name(
    kernel: &Kernel,
    config: &NodeConfig,
    platform: &Platform,
) -> Result<NodeLease, NodeError> {
    let lost = prometheus::IntCounter::new(
        "nexus_node_lease_lost_total",
        "Renewals of this node's name lease that found it gone or another node's",
    )
    .map_err(|e| NodeError::Metrics(e.to_string()))?;
    kernel.metrics().registry().register(Box::new(lost.clone())).map_err(|e| NodeError::Metrics(e.to_string()))?;
    Ok(NodeLease::acquire(&platform.redis, &config.name, LeaseTimes::default(), lost).await?)
}

/// Starts passing panels' agent messages on to their owners' contexts.
pub(super) fn agent_messages(
    kernel: &Kernel,
    config: &NodeConfig,
    platform: &Platform,
    bridges: &Bridges,
) -> Result<(), NodeError> {
    use tm_role::agent_messages::{AgentMessages, AgentMessagesDeps};
    let counter = prometheus::IntCounterVec::new(
        prometheus::Opts::new("nexus_agent_messages_total", "Panel agents' messages to contexts, by outcome"),
        &["outcome"],
    )
    .map_err(|e| NodeError::Metrics(e.to_string()))?;
    kernel.metrics().registry().register(Box::new(counter.clone())).map_err(|e| NodeError::Metrics(e.to_string()))?;
    let id = AgentMessages::KIND;
    AgentMessages::spawn(
        kernel,
        AgentMessagesDeps {
            source: config.name.clone(),
            subscribe: bridges.redis.link(id),
            commands: CommandSender::new(&config.name, bridges.kafka.link(id), bridges.redis.publisher.clone()),
            redis: platform.redis.clone(),
            panels: platform.panels.clone(),
            directory: crate::semantic::directory::ContextDirectory::new(platform.redis.clone()),
            counter,
        },
    );
    Ok(())
}

/// Starts the LLM manager, unless no model endpoint is configured: then
/// it says so and the LLM routes answer 503.
pub(super) async fn llm_manager(
    kernel: &Kernel,
    config: &NodeConfig,
    platform: &Platform,
    bridges: &Bridges,
    registry: &ActorRef<ToolRegistry>,
) -> Result<Option<LlmManagerHandle>, NodeError> {
    if config.llm.model.endpoints.is_empty() {
        tracing::warn!("llm-manager: no model endpoint is configured; it does not start and LLM routes answer 503");
        return Ok(None);
    }
    let deps = LlmManagerDeps {
        kernel: kernel.clone(),
        kafka_config: config.kafka.clone(),
        kafka: bridges.kafka.clone(),
        redis: bridges.redis.clone(),
        store: platform.redis.clone(),
        registry: registry.clone(),
    };
    Ok(Some(llm_role::start(deps, config.llm.clone()).await?))
}

/// The panel manager's driver: `kubernetes` when configured, else
/// `local`, whose metrics join the node's.
pub(super) async fn panel_driver(kernel: &Kernel, config: &NodeConfig) -> Result<Arc<dyn RuntimeDriver>, NodeError> {
    let panels = &config.panels;
    if let Some(kube) = &panels.kubernetes {
        let templates = match &kube.templates {
            Some(dir) => Templates::load(dir)?,
            None => Templates::embedded(),
        };
        let settings = KubeConfig { limits: panels.limits, node: config.name.clone(), ..kube.config.clone() };
        let driver = KubeDriver::infer(settings, templates, kernel.metrics().clone()).await?;
        // What this node's last run left goes before anything new starts.
        if let Err(error) = driver.sweep_stale().await {
            tracing::warn!(%error, "could not sweep what this node's last run left in the cluster");
        }
        tracing::info!(namespace = %kube.config.namespace, "panel instances run on Kubernetes");
        return Ok(Arc::new(driver));
    }
    let driver = LocalDriver::new(LocalConfig {
        network: panels.network.clone(),
        limits: panels.limits,
        warm_sandboxes: panels.warm_sandboxes,
        ..LocalConfig::new(panels.data_dir.clone(), panels.nexus_bin.clone(), config.redis_url.clone(), panels.sandbox)
    });
    if let Err(error) = driver.metrics().register(kernel.metrics().registry()) {
        tracing::warn!(%error, "local driver metrics not registered");
    }
    // What a crash of this node left behind goes before anything new starts.
    driver.sweep_stale().await;
    let driver = Arc::new(driver);
    // The first App start after the node's finds its warm sandbox ready.
    if panels.warm_sandboxes > 0 {
        let warming = driver.clone();
        tokio::spawn(async move { warming.warm_up().await });
    }
    Ok(driver)
}

/// Starts the panel manager over its driver.
pub(super) async fn panel_manager(
    kernel: &Kernel,
    config: &NodeConfig,
    bridges: &Bridges,
) -> Result<PanelManagerHandle, NodeError> {
    let panels = &config.panels;
    let driver = panel_driver(kernel, config).await?;
    let mut pm = PanelManagerConfig::new(config.name.clone(), config.redis_url.clone());
    pm.idle_timeout = panels.app_idle;
    pm.watchdog_timeout = panels.watchdog_timeout;
    pm.instances_per_user = config.quotas.instances;
    Ok(pm_role::start(kernel, bridges.redis.clone(), driver, pm).await?)
}

pub(super) async fn traffic_gateway(kernel: &Kernel, config: &NodeConfig, keys: KeyRing) -> Result<Gateway, NodeError> {
    let gateway_config = GatewayConfig {
        drain_timeout: config.drain_timeout,
        ..GatewayConfig::new(config.gateway, config.redis_url.clone(), keys)
    };
    let gateway = gateway_role::start(kernel, gateway_config).await?;
    tracing::info!(gateway = %gateway.local_addr(), "traffic gateway listening: /p/<panel-id>/");
    Ok(gateway)
}

/// Starts the node's tool registry: every node can call tools, and
/// records the calls on the semantic bus.
pub async fn start_registry(
    kernel: &Kernel,
    config: &NodeConfig,
    bridges: &Bridges,
) -> Result<ActorRef<ToolRegistry>, NodeError> {
    let store = ToolStore::connect(&config.redis_url).await?;
    let kafka = Some(bridges.kafka.link(ToolRegistry::KIND));
    Ok(ToolRegistry::spawn(RegistryDeps { kernel: kernel.clone(), store, redis: bridges.redis.clone(), kafka }))
}

pub(super) async fn transaction_manager(
    kernel: &Kernel,
    config: &NodeConfig,
    platform: &Platform,
    bridges: &Bridges,
    registry: &ActorRef<ToolRegistry>,
    gateway_url: Option<String>,
) -> Result<tm_role::TmState, NodeError> {
    let publish = bridges.redis.publisher.clone();
    let mut state =
        tm_role::state(platform.clone(), config.login_limits, Some(publish), &config.name, kernel.metrics().registry());
    state.ui.gateway_url = gateway_url;
    if !config.redis_cluster.is_empty() {
        state.documents = tm_role::Documents::new(Redis::connect_cluster(&config.redis_cluster).await?);
    }
    let plain = (!config.redis_cluster.is_empty()).then_some(&platform.redis);
    if let Err(error) = state.documents.adopt(plain).await {
        // What was not moved stays where it was, for the next start.
        tracing::warn!(%error, "documents under older keys were not looked for");
    }
    // Three heartbeats fit in the watchdog's timeout, however short it is set.
    state.ui.heartbeat_secs = state.ui.heartbeat_secs.min(config.panels.watchdog_timeout.as_secs() / 3).max(1);
    let produce = bridges.kafka.link(Role::TransactionManager.name());
    let commands = CommandSender::new(&config.name, produce, bridges.redis.publisher.clone());
    let (url, metrics) = (&config.redis_url, kernel.metrics().registry());
    let mut contexts =
        tm_role::contexts::ContextsApi::new(platform, url, config.kafka.clone(), commands, &config.name, metrics)?;
    // The model is the deployment's: a node configured without one answers 503 on the routes that need it.
    contexts.llm_available = !config.llm.model.endpoints.is_empty();
    state.contexts = Some(contexts);
    if let Some((user, password)) = &config.first_user {
        let hash = state.passwords.hash(password).await?;
        state.platform.accounts.set(user, &hash, UserRole::Admin).await?;
        tracing::info!(user, "first user ready (admin)");
    }
    let register = registry.link::<RegisterTool>(Role::TransactionManager.name());
    for tool in tm_role::system_tools::tools(&state.documents, state.contexts.as_ref()) {
        let name = tool.spec.name.clone();
        match register.ask(RegisterTool(tool)).await {
            Ok(result) => result?,
            Err(error) => tracing::error!(tool = %name, ?error, "tool registry stopped"),
        }
    }
    Ok(state)
}
