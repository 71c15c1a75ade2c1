//! Contexts as the transaction manager serves them: who may see one (its
//! owner or an admin; to anyone else it does not exist), creating and
//! forking them in the directory, and turning requests into commands on
//! `semantic.commands`, keyed by the context id. Reading the journal goes
//! through [`Journal`]; answering is the LLM manager's job, never this
//! module's: it produces commands and reads records, and calls no model.

use chrono::Utc;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::bus::kafka::KafkaConfig;
use crate::envelope::{Envelope, Payload};
use crate::platform::{ApiError, Platform, StoreError};
use crate::semantic::commands::CommandSender;
use crate::semantic::directory::{ContextDirectory, ContextInfo, CreateError};
use crate::semantic::fold::{Entry, Transcript};
use crate::semantic::journal::{Journal, JournalError, Range, MAX_FORK_DEPTH};
use crate::semantic::records::{ContextCreated, ForkPoint, MAX_MESSAGE_BYTES, MAX_SYSTEM_BYTES, MAX_TOOLS};
use crate::tools::protocol::ToolError;
use crate::tools::ToolAddress;

/// Most contexts `GET /api/contexts` lists.
pub const MAX_LISTED: usize = 200;
/// Longest model name a context may ask for.
pub const MAX_MODEL_NAME: usize = 256;

/// What the LLM routes answer when no model endpoint is configured.
pub const NO_MODEL: &str = "no model endpoint is configured, so no model can answer: give the llm-manager one \
    with --llm-endpoint url=http://HOST:PORT/v1,model=NAME (or run `nexus dev` with its local model installed). \
    Existing contexts can still be read.";
/// What the context routes answer on a node without the semantic bus.
pub const NO_CONTEXTS: &str = "this node serves no contexts: it has no semantic bus";

/// What a new context is: the body of `POST /api/contexts`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewContext {
    /// The model to ask; omitted: the first configured endpoint's.
    #[serde(default)]
    pub model: Option<String>,
    /// The system prompt (at most 32 KiB).
    #[serde(default)]
    pub system: Option<String>,
    /// Instead of `system`: the name of one of the platform's system
    /// prompts (`assistant`, `document_reader`, `panel_operator`).
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Callable names of the tools its model is offered (`<panel-id>.<tool>` or a system tool; at most 128).
    #[serde(default)]
    pub tools: Vec<String>,
}

/// A command on `semantic.commands`: its envelope id and where it landed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
pub struct Accepted {
    /// The command envelope's id.
    pub id: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset: its turn's records carry it as `command_offset`. `None`
    /// when the broker acknowledged it without one (a retry across a broker
    /// restart) and the Kafka bridge could not find it: the command is on
    /// the log all the same, and the journal copy of a message carries its
    /// `id` as `causationid`.
    pub offset: Option<i64>,
}

/// Why a context request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// The request is malformed; the message says how.
    #[error("{0}")]
    Invalid(String),
    /// A message over [`MAX_MESSAGE_BYTES`].
    #[error("the message is {0} bytes, over the limit of {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    /// The owner has as many contexts as they may.
    #[error("you have {0} contexts already, the most allowed")]
    Quota(usize),
    /// No such context, or another user's.
    #[error("context not found")]
    NotFound,
    /// The LLM manager has not journaled the context's creation yet.
    #[error("context {0} has no journal yet (the LLM manager has not taken its creation); try again shortly")]
    NotJournaled(String),
    /// No model endpoint is configured.
    #[error("{NO_MODEL}")]
    NoModel,
    /// The directory failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `semantic.commands` did not take the command.
    #[error("the semantic bus did not take the command: {0}")]
    Bus(String),
    /// The journal could not be read.
    #[error(transparent)]
    Journal(JournalError),
    /// What the directory or the journal holds makes no sense.
    #[error("{0}")]
    Internal(String),
}

impl From<JournalError> for ContextError {
    fn from(e: JournalError) -> Self {
        match e {
            JournalError::NotFound(_) => ContextError::NotFound,
            JournalError::NotJournaled(id) => ContextError::NotJournaled(id),
            JournalError::Store(e) => ContextError::Store(e),
            e => ContextError::Journal(e),
        }
    }
}

impl From<ContextError> for ApiError {
    fn from(e: ContextError) -> Self {
        match e {
            ContextError::Invalid(message) => ApiError::BadRequest(message),
            ContextError::TooLarge(bytes) => ApiError::MessageTooLarge { bytes, limit: MAX_MESSAGE_BYTES },
            ContextError::Quota(limit) => ApiError::Quota { what: "contexts", limit },
            ContextError::NotFound => ApiError::NotFound("context"),
            e @ ContextError::NotJournaled(_) => ApiError::Conflict(e.to_string()),
            ContextError::NoModel => ApiError::LlmUnavailable(NO_MODEL),
            ContextError::Store(e) => e.into(),
            ContextError::Bus(error) => {
                tracing::warn!(%error, "command not produced");
                ApiError::Unavailable("kafka")
            }
            ContextError::Journal(JournalError::TooDeep) => ApiError::BadRequest(JournalError::TooDeep.to_string()),
            ContextError::Journal(error) => {
                tracing::warn!(%error, "journal not read");
                ApiError::Unavailable("kafka")
            }
            ContextError::Internal(message) => {
                tracing::error!(%message, "context request failed");
                ApiError::Internal(message)
            }
        }
    }
}

impl From<ContextError> for ToolError {
    fn from(e: ContextError) -> Self {
        match e {
            ContextError::Invalid(message) => ToolError::InvalidArguments { message },
            e @ (ContextError::Store(_) | ContextError::Journal(_) | ContextError::Internal(_)) => {
                ToolError::internal(e)
            }
            e => ToolError::failed(e.to_string()),
        }
    }
}

/// The transaction manager's side of contexts. Cheap to clone.
#[derive(Clone)]
pub struct ContextsApi {
    /// Who owns which context, and where its journal is.
    pub directory: ContextDirectory,
    /// Reads journals.
    pub journal: Journal,
    /// Produces and announces commands.
    pub commands: CommandSender,
    /// For `llm_ask`'s own subscriptions to a context's live records.
    pub redis: redis::Client,
    /// The `source` of the commands: the node's name.
    pub node: String,
    /// Contexts one user may hold.
    pub max_contexts: usize,
    /// Whether a model endpoint is configured: without one, the routes
    /// that need a model answer 503 `llm_unavailable` (reading still works).
    pub llm_available: bool,
    /// `nexus_context_transcripts_total`: transcripts rebuilt for readers.
    pub transcripts: prometheus::IntCounter,
}

impl ContextsApi {
    /// The contexts of `platform`'s directory over `kafka`, commands sent
    /// through `commands`, `llm_ask` subscribing on `redis_url`. No model is
    /// available until `llm_available` is set. Its counter joins `registry`
    /// (or counts apart when one is there already, as with two nodes in one test).
    pub fn new(
        platform: &Platform,
        redis_url: &str,
        kafka: KafkaConfig,
        commands: CommandSender,
        node: &str,
        registry: &prometheus::Registry,
    ) -> Result<ContextsApi, redis::RedisError> {
        let directory = ContextDirectory::new(platform.redis.clone());
        let transcripts = prometheus::IntCounter::new(
            "nexus_context_transcripts_total",
            "Context transcripts rebuilt from the journal for API readers",
        )
        .map_err(|e| redis::RedisError::from((redis::ErrorKind::Client, "metric", e.to_string())))?;
        if let Err(error) = registry.register(Box::new(transcripts.clone())) {
            tracing::warn!(%error, "context metrics not registered");
        }
        Ok(ContextsApi {
            journal: Journal::new(kafka, directory.clone()),
            directory,
            commands,
            redis: redis::Client::open(redis_url)?,
            node: node.to_owned(),
            max_contexts: platform.quotas.contexts,
            llm_available: false,
            transcripts,
        })
    }

    /// Fails with [`ContextError::NoModel`] unless a model can answer.
    pub fn need_model(&self) -> Result<(), ContextError> {
        if self.llm_available {
            Ok(())
        } else {
            Err(ContextError::NoModel)
        }
    }

    /// The context `id` if `user` may see it: its owner, or an admin.
    /// Anyone else gets [`ContextError::NotFound`], as for a missing one.
    pub async fn visible(&self, id: &str, user: &str, admin: bool) -> Result<ContextInfo, ContextError> {
        self.directory.visible(id, user, admin).await?.ok_or(ContextError::NotFound)
    }

    /// Creates a context owned by `owner` (a fork when `parent` is given):
    /// in the directory first, within the owner's quota, then its
    /// `nexus.context.created` command.
    pub async fn create(
        &self,
        owner: &str,
        spec: NewContext,
        parent: Option<ForkPoint>,
    ) -> Result<ContextInfo, ContextError> {
        let spec = with_system_prompt(spec)?;
        check_spec(&spec)?;
        let info = ContextInfo {
            id: uuid::Uuid::now_v7().to_string(),
            owner: owner.to_owned(),
            model: spec.model.clone(),
            tools: spec.tools.clone(),
            parent: parent.clone(),
            created_at: Utc::now(),
            partition: None,
            first_offset: None,
            last_offset: None,
        };
        // The directory first: the LLM manager notes where the journal is
        // in the entry, which must exist by then.
        match self.directory.create(&info, self.max_contexts).await {
            Ok(()) => {}
            Err(CreateError::Quota(limit)) => return Err(ContextError::Quota(limit)),
            Err(CreateError::Exists) => return Err(ContextError::Internal(format!("context id {} taken", info.id))),
            Err(CreateError::Store(e)) => return Err(e.into()),
        }
        let created = ContextCreated {
            context: info.id.clone(),
            owner: owner.to_owned(),
            model: spec.model,
            system: spec.system,
            tools: spec.tools,
            parent,
            command_offset: None,
        };
        if let Err(error) = self.command(&info.id, created).await {
            // Nothing else refers to it yet: it goes, so the quota and the list stay true.
            if let Err(removal) = self.directory.remove(&info).await {
                tracing::error!(context = %info.id, %removal, "context listed without its creation command");
            }
            return Err(error);
        }
        Ok(info)
    }

    /// Produces a command for `context` on `semantic.commands`.
    pub async fn command<T: Payload>(&self, context: &str, data: T) -> Result<Accepted, ContextError> {
        let envelope = Envelope::new(self.node.clone(), data).into_untyped();
        let id = envelope.id.clone();
        match self.commands.send(context, envelope).await {
            Ok(delivered) => {
                let offset = (delivered.offset >= 0).then_some(delivered.offset);
                Ok(Accepted { id, partition: delivered.partition, offset })
            }
            Err(error) => Err(ContextError::Bus(error.to_string())),
        }
    }

    /// Up to `limit` records of `info` from offset `from`; none while it has no journal.
    pub async fn events(&self, info: &ContextInfo, from: i64, limit: usize) -> Result<Vec<Entry>, ContextError> {
        match self.journal.read(info, Range { from, until: None, limit }).await {
            Err(JournalError::NotJournaled(_)) => Ok(Vec::new()),
            read => Ok(read?),
        }
    }

    /// `info` folded up to `at` (everything when `None`), which must be within its journal.
    pub async fn transcript(&self, info: &ContextInfo, at: Option<i64>) -> Result<Transcript, ContextError> {
        if let Some(at) = at {
            self.check_offset(info, at).await?;
        }
        let transcript = self.journal.fold(info, at, 0).await?;
        self.transcripts.inc();
        Ok(transcript)
    }

    /// Forks `parent` at `at` for `owner`: a new context with the parent's
    /// model, system prompt and tools, whose history is the parent's
    /// records up to `at`. Nothing is copied.
    pub async fn fork(&self, parent: &ContextInfo, at: i64, owner: &str) -> Result<ContextInfo, ContextError> {
        self.check_offset(parent, at).await?;
        if self.ancestors(parent).await? >= MAX_FORK_DEPTH {
            return Err(ContextError::Invalid(format!("forks nest at most {MAX_FORK_DEPTH} deep")));
        }
        let created = self.creation(parent).await?;
        let spec =
            NewContext { model: created.model, system: created.system, system_prompt: None, tools: created.tools };
        self.create(owner, spec, Some(ForkPoint { context: parent.id.clone(), offset: at })).await
    }

    /// Whether `at` is within `info`'s journal: within what the directory
    /// knows, or past it, a record of the context's own (the directory is
    /// not told of streamed text until its step's response).
    async fn check_offset(&self, info: &ContextInfo, at: i64) -> Result<(), ContextError> {
        match check_offset(info, at) {
            Err(ContextError::Invalid(reason)) if info.last_offset.is_some_and(|last| at > last) => {
                let found = self.journal.read(info, Range { from: at, until: Some(at), limit: 1 }).await?;
                if found.first().is_some_and(|e| e.offset == at) {
                    Ok(())
                } else {
                    Err(ContextError::Invalid(reason))
                }
            }
            checked => checked,
        }
    }

    /// How many forks up `info`'s root is.
    async fn ancestors(&self, info: &ContextInfo) -> Result<usize, ContextError> {
        let mut parent = info.parent.clone();
        let mut depth = 0;
        while let Some(point) = parent {
            depth += 1;
            if depth >= MAX_FORK_DEPTH {
                break;
            }
            parent = self.directory.get(&point.context).await?.and_then(|i| i.parent);
        }
        Ok(depth)
    }

    /// The creation record of `info`: among the first records of its
    /// journal, after the fences of the writers that took the context up.
    async fn creation(&self, info: &ContextInfo) -> Result<ContextCreated, ContextError> {
        const LOOKED_AT: usize = 16;
        let first = info.first_offset.ok_or_else(|| ContextError::NotJournaled(info.id.clone()))?;
        let found = self.journal.read(info, Range { from: first, until: info.last_offset, limit: LOOKED_AT }).await?;
        found
            .into_iter()
            .filter(|e| e.envelope.kind == ContextCreated::TYPE)
            .find_map(|e| ContextCreated::deserialize(&e.envelope.data).ok())
            // Fenced, and its creation not journaled yet.
            .ok_or_else(|| ContextError::NotJournaled(info.id.clone()))
    }
}

/// Whether `content` fits a message: not blank, at most [`MAX_MESSAGE_BYTES`].
pub fn check_message(content: &str) -> Result<(), ContextError> {
    if content.trim().is_empty() {
        return Err(ContextError::Invalid("content must not be empty".into()));
    }
    if content.len() > MAX_MESSAGE_BYTES {
        return Err(ContextError::TooLarge(content.len()));
    }
    Ok(())
}

/// Whether `at` is within `info`'s journal, as the directory knows it.
fn check_offset(info: &ContextInfo, at: i64) -> Result<(), ContextError> {
    let (Some(first), Some(last)) = (info.first_offset, info.last_offset) else {
        return Err(ContextError::NotJournaled(info.id.clone()));
    };
    if at < first || at > last {
        return Err(ContextError::Invalid(format!(
            "offset {at} is outside the context: its journal holds offsets {first} to {last}"
        )));
    }
    Ok(())
}

/// `spec` with the system prompt it names, if it names one, as its `system`.
fn with_system_prompt(mut spec: NewContext) -> Result<NewContext, ContextError> {
    let Some(name) = spec.system_prompt.take() else { return Ok(spec) };
    if spec.system.is_some() {
        return Err(ContextError::Invalid("give system or system_prompt, not both".into()));
    }
    let Some(prompt) = super::system_prompts::find(&name) else {
        let shown: String = name.chars().take(64).collect();
        let message = format!("no system prompt named {shown:?}; there are: {}", super::system_prompts::names());
        return Err(ContextError::Invalid(message));
    };
    spec.system = Some(prompt.text.to_owned());
    Ok(spec)
}

fn check_spec(spec: &NewContext) -> Result<(), ContextError> {
    let invalid = |m: String| Err(ContextError::Invalid(m));
    if let Some(model) = &spec.model {
        if model.trim().is_empty() || model.len() > MAX_MODEL_NAME || model.chars().any(char::is_control) {
            return invalid(format!("model must be 1 to {MAX_MODEL_NAME} printable characters"));
        }
    }
    if spec.system.as_ref().is_some_and(|s| s.len() > MAX_SYSTEM_BYTES) {
        return invalid(format!("system must be at most {MAX_SYSTEM_BYTES} bytes"));
    }
    if spec.tools.len() > MAX_TOOLS {
        return invalid(format!("a context offers at most {MAX_TOOLS} tools"));
    }
    for (i, tool) in spec.tools.iter().enumerate() {
        if ToolAddress::parse(tool).is_none() {
            let shown: String = tool.chars().take(64).collect();
            return invalid(format!("{shown:?} is not a tool name (`<panel-id>.<tool>` or a system tool's)"));
        }
        if spec.tools[..i].contains(tool) {
            return invalid(format!("tool {tool:?} is listed twice"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(first: Option<i64>, last: Option<i64>) -> ContextInfo {
        ContextInfo {
            id: "c".into(),
            owner: "ada".into(),
            model: None,
            tools: Vec::new(),
            parent: None,
            created_at: Utc::now(),
            partition: first.map(|_| 0),
            first_offset: first,
            last_offset: last,
        }
    }

    #[test]
    fn an_offset_must_be_within_the_journal() {
        assert!(check_offset(&info(Some(3), Some(9)), 3).is_ok());
        assert!(check_offset(&info(Some(3), Some(9)), 9).is_ok());
        assert!(matches!(check_offset(&info(Some(3), Some(9)), 2), Err(ContextError::Invalid(_))));
        assert!(matches!(check_offset(&info(Some(3), Some(9)), 10), Err(ContextError::Invalid(_))));
        assert!(matches!(check_offset(&info(None, None), 0), Err(ContextError::NotJournaled(_))));
    }

    #[test]
    fn a_spec_names_real_looking_tools_once_and_a_printable_model() {
        let spec = |model: Option<&str>, tools: &[&str]| NewContext {
            model: model.map(str::to_owned),
            tools: tools.iter().map(|t| (*t).to_owned()).collect(),
            ..NewContext::default()
        };
        assert!(check_spec(&spec(Some("qwen"), &["list_documents", "0190-ab.resize"])).is_ok());
        assert!(check_spec(&spec(Some(""), &[])).is_err());
        assert!(check_spec(&spec(Some("a\nb"), &[])).is_err());
        assert!(check_spec(&spec(None, &["no spaces"])).is_err());
        assert!(check_spec(&spec(None, &["t", "t"])).is_err());
        let many: Vec<String> = (0..=MAX_TOOLS).map(|i| format!("t{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(check_spec(&spec(None, &many)).is_err());
        let long = NewContext { system: Some("x".repeat(MAX_SYSTEM_BYTES + 1)), ..NewContext::default() };
        assert!(check_spec(&long).is_err());
    }

    #[test]
    fn a_named_system_prompt_becomes_the_system_and_a_bad_name_is_refused() {
        let named = |name: &str, system: Option<&str>| NewContext {
            system_prompt: Some(name.to_owned()),
            system: system.map(str::to_owned),
            ..NewContext::default()
        };
        let spec = with_system_prompt(named("assistant", None)).expect("a known prompt");
        assert_eq!(spec.system.as_deref(), super::super::system_prompts::find("assistant").map(|p| p.text));
        assert_eq!(spec.system_prompt, None);
        let Err(ContextError::Invalid(message)) = with_system_prompt(named("nope", None)) else { panic!("refused") };
        assert!(message.contains("document_reader"), "{message}");
        assert!(matches!(with_system_prompt(named("assistant", Some("mine"))), Err(ContextError::Invalid(_))));
        let own = NewContext { system: Some("mine".into()), ..NewContext::default() };
        assert_eq!(with_system_prompt(own).expect("as it is").system.as_deref(), Some("mine"));
    }

    #[test]
    fn a_message_is_neither_blank_nor_too_large() {
        assert!(check_message("hi").is_ok());
        assert!(matches!(check_message(" \n"), Err(ContextError::Invalid(_))));
        assert!(matches!(check_message(&"x".repeat(MAX_MESSAGE_BYTES + 1)), Err(ContextError::TooLarge(_))));
        assert!(check_message(&"x".repeat(MAX_MESSAGE_BYTES)).is_ok());
    }
}
