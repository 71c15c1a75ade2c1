//! The tools' shared state in Redis: the listing every node reads, and the
//! idempotency claims that make a call run at most once.
//!
//! Layout:
//! * `nexus:tools:system` — hash, system tool name → [`ToolSpec`] JSON.
//! * `nexus:tools:panel:{panel}` — hash, local tool name → spec; it expires
//!   unless the panel's sidecar keeps refreshing it, so the tools of a panel
//!   whose sidecar died leave the listing.
//! * `nexus:tools:prompts:{panel}` — hash, prompt name → [`Prompt`] JSON,
//!   written, kept and dropped with the panel's tools.
//! * `nexus:tools:resources:{panel}` — hash, resource uri →
//!   [`PanelResource`] JSON, likewise.
//! * `nexus:tools:listers:{panel}` — sorted set of the replicas (sidecars)
//!   keeping that listing alive, scored by when each one's share expires
//!   (Redis time): a replica that stops takes the listing down only when it
//!   was the last live one.
//! * `nexus:tools:panels-of:{user}` — set of the user's listed panels;
//!   entries whose listing expired (no listers left) are pruned when listed.
//! * `nexus:tool-call:{tool}:{caller}:{key}` — hash with the `call` id that
//!   claimed an idempotency key and, once done, its `result` — kept only
//!   when the caller chose the key; a call without one leaves a bare claim
//!   that expires `CLAIM_SLACK` (5 s) after it ends, long enough to silence a
//!   second delivery of the same call.
//!
//! * `nexus:tool-cancel:{n}:{caller}:{label}` — sorted set of `{reply
//!   channel} {call id}` of the caller's running calls they named `label`
//!   (an MCP request id; `n` is the caller's length, so names cannot run
//!   into each other), scored by each call's deadline (Redis time, ms), so
//!   that a cancellation taken by any node finds the node that waits for
//!   the call. Entries past their deadline do not count, and the key
//!   expires with its last deadline.
//!
//! Who may see or call what is decided by [`ToolSpec::visible_to`], not here.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use std::future::Future;

use super::prompts::Prompt;
use super::protocol::{remaining_until, Outcome, ToolError, ToolRequest, ToolResult};
use super::resources::PanelResource;
use super::{ToolAddress, ToolOwner, ToolSpec};

const SYSTEM_KEY: &str = "nexus:tools:system";
/// How long a finished call's result answers retries with its key.
pub const RESULT_TTL: Duration = Duration::from_secs(600);
/// How long a claim outlives its call's deadline, so a claimant that died
/// mid-call frees the key soon after.
const CLAIM_SLACK: Duration = Duration::from_secs(5);
/// The first and the longest pause between tries to keep an outcome
/// while Redis is away: short, since callers are retrying meanwhile.
const KEEP_RETRY_FIRST: Duration = Duration::from_millis(50);
const KEEP_RETRY_MAX: Duration = Duration::from_millis(500);

fn panel_key(panel: &str) -> String {
    format!("nexus:tools:panel:{panel}")
}

fn prompts_key(panel: &str) -> String {
    format!("nexus:tools:prompts:{panel}")
}

fn resources_key(panel: &str) -> String {
    format!("nexus:tools:resources:{panel}")
}

fn listers_key(panel: &str) -> String {
    format!("nexus:tools:listers:{panel}")
}

/// Notes that `ARGV[1]` keeps the listing alive for `ARGV[2]` ms from now,
/// forgets the shares that ran out, and keeps the set as long as its
/// longest share.
const LISTER_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return 1
";

/// `ARGV[1]` stops keeping the listing; it goes when no live replica keeps it.
const UNLIST_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) > 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[4], KEYS[5])
redis.call('SREM', KEYS[3], ARGV[2])
return 1
";

fn panels_of_key(user: &str) -> String {
    format!("nexus:tools:panels-of:{user}")
}

fn call_key(tool: &str, caller: &str, key: &str) -> String {
    format!("nexus:tool-call:{tool}:{caller}:{key}")
}

fn cancel_key(caller: &str, label: &str) -> String {
    format!("nexus:tool-cancel:{}:{caller}:{label}", caller.len())
}

/// The prompts or resources `found` in a panel's listing, sorted, when the
/// panel's `record` names `user` its owner; none otherwise.
fn owned_extras<T: serde::de::DeserializeOwned>(
    found: Vec<Option<String>>,
    record: Option<String>,
    user: &str,
    sort_key: fn(&T) -> String,
) -> Vec<T> {
    let owner = record.and_then(|r| serde_json::from_str::<crate::platform::Panel>(&r).ok()).map(|p| p.owner);
    if owner.as_deref() != Some(user) {
        return Vec::new();
    }
    let mut extras: Vec<T> = found.into_iter().flatten().filter_map(|json| serde_json::from_str(&json).ok()).collect();
    extras.sort_by_key(sort_key);
    extras
}

/// What a panel's manifest offers besides tools, listed with them.
#[derive(Debug, Clone, Copy, Default)]
pub struct PanelExtras<'a> {
    /// Its prompts.
    pub prompts: &'a [Prompt],
    /// Its read-only resources.
    pub resources: &'a [PanelResource],
}

/// Why the tools' state in Redis could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ToolStoreError {
    /// Redis could not be reached or refused the command.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// What claiming an idempotency key found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// This call holds the key: run it, then [`ToolStore::finish`].
    Won,
    /// The same call was delivered twice (another replica holds it): stay silent.
    SameCall,
    /// An earlier call with this key finished: answer with its outcome.
    Done(Outcome),
    /// An earlier call with this key is still running.
    Running,
}

/// The tools' state in Redis. Cheap to clone.
#[derive(Clone)]
pub struct ToolStore {
    conn: ConnectionManager,
}

impl ToolStore {
    /// Connects to the Redis at `url`; the connection reconnects by itself when it drops.
    pub async fn connect(url: &str) -> Result<Self, ToolStoreError> {
        let conn = redis::Client::open(url)?.get_connection_manager().await?;
        Ok(ToolStore { conn })
    }

    /// Lists a system tool (every node serving it writes the same spec).
    pub async fn put_system(&self, spec: &ToolSpec) -> Result<(), ToolStoreError> {
        let json = serde_json::to_string(spec).unwrap_or_default();
        let () = self.conn.clone().hset(SYSTEM_KEY, &spec.name, json).await?;
        Ok(())
    }

    /// Replaces the listed tools of `panel` (owned by `user`) with `specs`,
    /// and its prompts and resources with `extras`', kept by the replica
    /// `lister`; they leave the listing after `ttl` unless refreshed.
    pub async fn put_panel(
        &self,
        panel: &str,
        user: &str,
        lister: &str,
        specs: &[ToolSpec],
        extras: PanelExtras<'_>,
        ttl: Duration,
    ) -> Result<(), ToolStoreError> {
        let (key, prompts_key, ttl_ms) = (panel_key(panel), prompts_key(panel), ttl.as_millis() as i64);
        let resources_key = resources_key(panel);
        let mut pipe = redis::pipe();
        pipe.atomic().del(&key).del(&prompts_key).del(&resources_key);
        for spec in specs {
            pipe.hset(&key, spec.local_name(), serde_json::to_string(spec).unwrap_or_default());
        }
        for prompt in extras.prompts {
            pipe.hset(&prompts_key, &prompt.name, serde_json::to_string(prompt).unwrap_or_default());
        }
        for resource in extras.resources {
            pipe.hset(&resources_key, &resource.uri, serde_json::to_string(resource).unwrap_or_default());
        }
        pipe.pexpire(&key, ttl_ms).pexpire(&prompts_key, ttl_ms).pexpire(&resources_key, ttl_ms);
        pipe.sadd(panels_of_key(user), panel);
        pipe.cmd("EVAL").arg(LISTER_SCRIPT).arg(1).arg(listers_key(panel)).arg(lister).arg(ttl_ms);
        let () = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Extends the listing of `panel` (owned by `user`) by the replica
    /// `lister`; `false` when it had already expired. It also lists the
    /// panel among the user's again, in case a reader pruned it in the
    /// moment it was expired.
    pub async fn refresh_panel(
        &self,
        panel: &str,
        user: &str,
        lister: &str,
        ttl: Duration,
    ) -> Result<bool, ToolStoreError> {
        let ttl_ms = ttl.as_millis() as i64;
        let mut pipe = redis::pipe();
        // The listers outlive no share: while they are there, so is the
        // listing (which may hold prompts or resources and no tool).
        pipe.exists(listers_key(panel));
        pipe.pexpire(panel_key(panel), ttl_ms).ignore().pexpire(prompts_key(panel), ttl_ms).ignore();
        pipe.pexpire(resources_key(panel), ttl_ms).ignore();
        pipe.sadd(panels_of_key(user), panel).ignore();
        pipe.cmd("EVAL").arg(LISTER_SCRIPT).arg(1).arg(listers_key(panel)).arg(lister).arg(ttl_ms).ignore();
        let (alive,): (bool,) = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(alive)
    }

    /// The replica `lister` stops keeping the tools of `panel` listed; they
    /// leave the listing if no other live replica keeps them. True when they left.
    pub async fn remove_panel(&self, panel: &str, user: &str, lister: &str) -> Result<bool, ToolStoreError> {
        let left: i64 = redis::Script::new(UNLIST_SCRIPT)
            .key(listers_key(panel))
            .key(panel_key(panel))
            .key(panels_of_key(user))
            .key(prompts_key(panel))
            .key(resources_key(panel))
            .arg(lister)
            .arg(panel)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(left == 1)
    }

    /// The listed tool at `address`, if any. A panel's listing is written
    /// by its sidecar, which could claim anything: its tool counts only as
    /// the panel's own, and owned by whom the panel's record says.
    pub async fn find(&self, address: &ToolAddress<'_>) -> Result<Option<ToolSpec>, ToolStoreError> {
        let (panel, tool) = match address {
            ToolAddress::System(name) => {
                let json: Option<String> = self.conn.clone().hget(SYSTEM_KEY, name).await?;
                return Ok(json.and_then(|j| serde_json::from_str(&j).ok()));
            }
            ToolAddress::Panel { panel, tool } => (*panel, *tool),
        };
        let (json, record): (Option<String>, Option<String>) = redis::pipe()
            .hget(panel_key(panel), tool)
            .get(crate::platform::panels::panel_key(panel))
            .query_async(&mut self.conn.clone())
            .await?;
        let Some(spec) = json.and_then(|j| serde_json::from_str::<ToolSpec>(&j).ok()) else { return Ok(None) };
        let owner = record.and_then(|r| serde_json::from_str::<crate::platform::Panel>(&r).ok()).map(|p| p.owner);
        let honest = match (&spec.owner, owner) {
            (ToolOwner::Panel { panel: listed, user }, Some(owner)) => {
                listed == panel && *user == owner && spec.name == format!("{panel}.{tool}")
            }
            _ => false,
        };
        if !honest {
            tracing::warn!(panel, tool, "a panel's listing names another panel, owner or name; ignored");
            return Ok(None);
        }
        Ok(Some(spec))
    }

    /// Every system tool and every tool of `user`'s panels, sorted by name.
    pub async fn list_for(&self, user: &str) -> Result<Vec<ToolSpec>, ToolStoreError> {
        let mut conn = self.conn.clone();
        let system: Vec<String> = conn.hvals(SYSTEM_KEY).await?;
        let panels: Vec<String> = conn.smembers(panels_of_key(user)).await?;
        let mut pipe = redis::pipe();
        for panel in &panels {
            pipe.hvals(panel_key(panel)).exists(listers_key(panel));
        }
        let listed: Vec<(Vec<String>, bool)> =
            if panels.is_empty() { Vec::new() } else { pipe.query_async(&mut conn).await? };
        // A panel whose listing expired (no replica keeps it) leaves the index.
        let gone: Vec<&String> =
            panels.iter().zip(&listed).filter(|(_, (_, alive))| !alive).map(|(panel, _)| panel).collect();
        let per_panel: Vec<Vec<String>> = listed.into_iter().map(|(tools, _)| tools).collect();
        if !gone.is_empty() {
            let () = conn.srem(panels_of_key(user), gone).await?;
        }
        let parse = |json: &String| serde_json::from_str::<ToolSpec>(json).ok();
        // A panel's tools only as its own: its sidecar writes the listing.
        let own = panels.iter().zip(&per_panel).flat_map(|(panel, tools)| {
            tools.iter().filter_map(parse).filter(move |spec| match &spec.owner {
                ToolOwner::Panel { panel: listed, .. } => {
                    listed == panel && spec.name.strip_prefix(panel.as_str()).is_some_and(|t| t.starts_with('.'))
                }
                ToolOwner::System => false,
            })
        });
        let mut specs: Vec<ToolSpec> =
            system.iter().filter_map(parse).chain(own).filter(|spec| spec.visible_to(user)).collect();
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(specs)
    }

    /// The prompts of `user`'s panels, as `(panel, prompt)`, sorted by
    /// panel and name. Like tools, a panel's prompts count only when the
    /// panel's record names `user` its owner.
    pub async fn prompts_for(&self, user: &str) -> Result<Vec<(String, Prompt)>, ToolStoreError> {
        self.extras_for(user, prompts_key, |p: &Prompt| p.name.clone()).await
    }

    /// `user`'s prompt `name` of `panel`, if the panel is theirs and has it.
    pub async fn prompt(&self, user: &str, panel: &str, name: &str) -> Result<Option<Prompt>, ToolStoreError> {
        Ok(self.panel_extras(&prompts_key(panel), panel, user, Some(name), |p: &Prompt| p.name.clone()).await?.pop())
    }

    /// The resources of `user`'s panels, as `(panel, resource)`, sorted by
    /// panel and uri, on the same terms as prompts.
    pub async fn resources_for(&self, user: &str) -> Result<Vec<(String, PanelResource)>, ToolStoreError> {
        self.extras_for(user, resources_key, |r: &PanelResource| r.uri.clone()).await
    }

    /// `user`'s resource `uri` of `panel`, if the panel is theirs and declares it.
    pub async fn resource(&self, user: &str, panel: &str, uri: &str) -> Result<Option<PanelResource>, ToolStoreError> {
        let by_uri = |r: &PanelResource| r.uri.clone();
        Ok(self.panel_extras(&resources_key(panel), panel, user, Some(uri), by_uri).await?.pop())
    }

    /// Prompts or resources (in the hash `key_of(panel)`) of every panel of `user`.
    async fn extras_for<T: serde::de::DeserializeOwned>(
        &self,
        user: &str,
        key_of: fn(&str) -> String,
        sort_key: fn(&T) -> String,
    ) -> Result<Vec<(String, T)>, ToolStoreError> {
        let mut conn = self.conn.clone();
        let mut panels: Vec<String> = conn.smembers(panels_of_key(user)).await?;
        if panels.is_empty() {
            return Ok(Vec::new());
        }
        panels.sort();
        let mut pipe = redis::pipe();
        for panel in &panels {
            pipe.hvals(key_of(panel)).get(crate::platform::panels::panel_key(panel));
        }
        let listed: Vec<(Vec<Option<String>>, Option<String>)> = pipe.query_async(&mut conn).await?;
        let mut all = Vec::new();
        for (panel, (found, record)) in panels.into_iter().zip(listed) {
            let extras = owned_extras(found, record, user, sort_key);
            all.extend(extras.into_iter().map(|extra| (panel.clone(), extra)));
        }
        Ok(all)
    }

    /// The entries of the hash `key` of `panel` (or only `field`), if
    /// `user` owns the panel.
    async fn panel_extras<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        panel: &str,
        user: &str,
        field: Option<&str>,
        sort_key: fn(&T) -> String,
    ) -> Result<Vec<T>, ToolStoreError> {
        let mut pipe = redis::pipe();
        match field {
            Some(field) => pipe.cmd("HMGET").arg(key).arg(field),
            None => pipe.hvals(key),
        };
        pipe.get(crate::platform::panels::panel_key(panel));
        let (found, record): (Vec<Option<String>>, Option<String>) = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(owned_extras(found, record, user, sort_key))
    }

    /// Claims the idempotency key of a call for `call_id`, for `hold` (the
    /// call's remaining time and some slack: a claimant that dies frees it).
    /// A key whose last call failed in passing (see [`ToolStore::finish`])
    /// goes to the next call id, never to the same call delivered again.
    pub async fn claim(
        &self,
        tool: &str,
        caller: &str,
        key: &str,
        call_id: &str,
        hold: Duration,
    ) -> Result<Claim, ToolStoreError> {
        let script = redis::Script::new(
            r"local holder = redis.call('HGET', KEYS[1], 'call')
              if not holder or redis.call('HGET', KEYS[1], 'released') == holder and holder ~= ARGV[1] then
                redis.call('HSET', KEYS[1], 'call', ARGV[1])
                redis.call('HDEL', KEYS[1], 'released')
                redis.call('PEXPIRE', KEYS[1], ARGV[2])
                return {1, '', ''}
              end
              return {0, holder, redis.call('HGET', KEYS[1], 'result') or ''}",
        );
        let (won, holder, result): (i64, String, String) = script
            .key(call_key(tool, caller, key))
            .arg(call_id)
            .arg(hold.as_millis().max(1) as u64)
            .invoke_async(&mut self.conn.clone())
            .await?;
        if won == 1 {
            return Ok(Claim::Won);
        }
        if holder == call_id {
            return Ok(Claim::SameCall);
        }
        Ok(match serde_json::from_str::<Outcome>(&result) {
            Ok(outcome) => Claim::Done(outcome),
            Err(_) => Claim::Running,
        })
    }

    /// Ends `call_id`'s claim (if it still holds the key): a final outcome
    /// answers retries with its key for [`RESULT_TTL`] when `keep` (the
    /// caller chose the key), else the claim just expires soon; after a passing
    /// failure (timeout, busy, a panel down) the key is released, so that a
    /// retry — a new call id — runs the tool again, while the same call
    /// delivered to another server still stays silent.
    pub async fn finish(
        &self,
        tool: &str,
        caller: &str,
        key: &str,
        call_id: &str,
        outcome: &Outcome,
        keep: bool,
    ) -> Result<(), ToolStoreError> {
        let script = redis::Script::new(
            r"if redis.call('HGET', KEYS[1], 'call') ~= ARGV[1] then return 0 end
              if ARGV[2] == '1' then
                redis.call('HSET', KEYS[1], 'result', ARGV[3])
                redis.call('PEXPIRE', KEYS[1], ARGV[4])
              elseif ARGV[2] == '2' then
                redis.call('PEXPIRE', KEYS[1], ARGV[5])
              else
                redis.call('HSET', KEYS[1], 'released', ARGV[1])
              end
              return 1",
        );
        let (mode, json) = match (outcome.is_final(), keep) {
            (true, true) => ("1", serde_json::to_string(outcome).unwrap_or_default()),
            (true, false) => ("2", String::new()),
            (false, _) => ("0", String::new()),
        };
        let _: i64 = script
            .key(call_key(tool, caller, key))
            .arg(call_id)
            .arg(mode)
            .arg(json)
            .arg(RESULT_TTL.as_millis() as u64)
            .arg(CLAIM_SLACK.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// [`ToolStore::finish`] for `request`, tried again while Redis is
    /// away for as long as the claim holds (`held_until`): a retry with the
    /// same key must find this outcome, not a key that frees itself later
    /// and lets the tool run a second time.
    async fn keep(&self, tool: &str, request: &ToolRequest, outcome: &Outcome, held_until: tokio::time::Instant) {
        let (caller, key, call_id) = (&request.caller, &request.idempotency_key, &request.call_id);
        let mut delay = KEEP_RETRY_FIRST;
        loop {
            let Err(error) = self.finish(tool, caller, key, call_id, outcome, request.keep_result).await else {
                return;
            };
            if tokio::time::Instant::now() + delay >= held_until {
                tracing::warn!(%error, tool, "could not keep a tool call's outcome before its claim ran out");
                return;
            }
            tracing::info!(%error, tool, "could not keep a tool call's outcome yet; trying again");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(KEEP_RETRY_MAX);
        }
    }

    /// Notes that `caller`'s call named `label` runs as `call_id`, awaited
    /// on `reply_to`, for `ttl`.
    pub async fn note_cancellable(
        &self,
        caller: &str,
        label: &str,
        reply_to: &str,
        call_id: &str,
        ttl: Duration,
    ) -> Result<(), ToolStoreError> {
        let script = redis::Script::new(
            r"local t = redis.call('TIME')
              local ttl = tonumber(ARGV[2])
              redis.call('ZADD', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000) + ttl, ARGV[1])
              if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
              return 1",
        );
        let _: i64 = script
            .key(cancel_key(caller, label))
            .arg(format!("{reply_to} {call_id}"))
            .arg(ttl.as_millis().max(1) as u64)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// The call `call_id` named `label` has ended.
    pub async fn forget_cancellable(
        &self,
        caller: &str,
        label: &str,
        reply_to: &str,
        call_id: &str,
    ) -> Result<(), ToolStoreError> {
        let () = self.conn.clone().zrem(cancel_key(caller, label), format!("{reply_to} {call_id}")).await?;
        Ok(())
    }

    /// The running calls `caller` named `label`, as `(reply channel, call id)`.
    pub async fn cancellable(&self, caller: &str, label: &str) -> Result<Vec<(String, String)>, ToolStoreError> {
        let script = redis::Script::new(
            r"local t = redis.call('TIME')
              return redis.call('ZRANGEBYSCORE', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000), '+inf')",
        );
        let members: Vec<String> = script.key(cancel_key(caller, label)).invoke_async(&mut self.conn.clone()).await?;
        Ok(members
            .into_iter()
            .filter_map(|m| m.split_once(' ').map(|(reply_to, call_id)| (reply_to.to_owned(), call_id.to_owned())))
            .collect())
    }

    /// Runs `work` for `request` (to tool `tool`, by its full name) unless
    /// a call with the same idempotency key ran or runs, and hands the
    /// answer to `answer`: the result, that earlier call's outcome, or
    /// `in_progress`. Nothing is answered when this very call was delivered
    /// twice and another server holds it. The outcome is kept while the
    /// answer travels, and both are done when this returns.
    pub async fn run_once<A: Future<Output = ()>>(
        &self,
        tool: &str,
        request: &ToolRequest,
        work: impl Future<Output = ToolResult>,
        answer: impl FnOnce(ToolResult) -> A,
    ) {
        let hold = remaining_until(request.deadline) + CLAIM_SLACK;
        // Taken before the claim is asked for: Redis's hold ends no sooner.
        let held_until = tokio::time::Instant::now() + hold;
        let (caller, key, call_id) = (&request.caller, &request.idempotency_key, &request.call_id);
        let result = match self.claim(tool, caller, key, call_id, hold).await {
            Ok(Claim::Won) => {
                let outcome = Outcome::from(work.await);
                let keep = self.keep(tool, request, &outcome, held_until);
                futures::join!(keep, answer(outcome.clone().into()));
                return;
            }
            Ok(Claim::SameCall) => return,
            Ok(Claim::Done(outcome)) => outcome.into(),
            Ok(Claim::Running) => Err(ToolError::InProgress { key: key.clone() }),
            Err(error) => Err(ToolError::internal(format_args!("idempotency claim failed: {error}"))),
        };
        answer(result).await;
    }
}
