//! Each sidecar's own Redis user (`ACL SETUSER`), made with its instance
//! and deleted with it, so a compromised sidecar holds no more than its
//! panel's share of the bus: it may publish only to its panel's outbound
//! channels and to tool-call replies, subscribe only to its panel's call
//! channel, and touch only its panel's record (read), tool, prompt and
//! resource listing and call claims. It cannot read or write routes, sessions, accounts or
//! another panel's keys, and runs no admin or dangerous command.
//!
//! It makes and deletes users named `nexus-sidecar-<instance>`; the node's
//! own credentials never reach a sidecar. Redis keeps ACL users in memory
//! only, so the driver sets its running sidecars' users again every few
//! seconds ([`SidecarLogin`]): after a Redis restart they log in again.
//! The user contains the sidecar's connection only where Redis's `default`
//! user is protected (`requirepass` or `ACL SETUSER default off`); a
//! Redis open to every local process holds nothing back from anyone.

use redis::{ConnectionAddr, IntoConnectionInfo};
use tokio::sync::OnceCell;

use super::super::driver::DriverError;
use crate::platform::store::{Redis, StoreError};
use crate::platform::{channels, panels};

/// The users this module makes start so.
const PREFIX: &str = "nexus-sidecar-";

/// Who one sidecar logs in as.
#[derive(Debug, Clone)]
pub(super) struct SidecarLogin {
    pub(super) instance: String,
    pub(super) panel: String,
    pub(super) owner: String,
    pub(super) password: String,
}

impl SidecarLogin {
    /// A login with a fresh password.
    pub(super) fn new(instance: &str, panel: &str, owner: &str) -> SidecarLogin {
        let (instance, panel, owner) = (instance.to_owned(), panel.to_owned(), owner.to_owned());
        SidecarLogin { instance, panel, owner, password: super::new_secret() }
    }
}

/// Makes and deletes sidecar users over the node's own connection.
pub(super) struct SidecarUsers {
    redis_url: String,
    redis: OnceCell<Redis>,
}

impl SidecarUsers {
    pub(super) fn new(redis_url: &str) -> SidecarUsers {
        SidecarUsers { redis_url: redis_url.to_owned(), redis: OnceCell::new() }
    }

    async fn redis(&self) -> Result<&Redis, DriverError> {
        self.redis.get_or_try_init(|| Redis::connect(&self.redis_url)).await.map_err(store_error)
    }

    /// Sets the user of a sidecar (a user left by a crash is replaced);
    /// returns the URL that logs in as it.
    pub(super) async fn set(&self, login: &SidecarLogin) -> Result<String, DriverError> {
        let SidecarLogin { instance, panel, owner, password } = login;
        let name = user_name(instance);
        let mut setuser = redis::cmd("ACL");
        setuser.arg("SETUSER").arg(&name).arg("reset").arg("on").arg(format!(">{password}"));
        setuser.arg("-@all").arg("+@connection").arg("+@read").arg("+@write").arg("+@pubsub");
        // redis-rs runs scripts by EVALSHA, loading them on a miss.
        setuser.arg("+@transaction").arg("+eval").arg("+evalsha").arg("+script|load");
        setuser.arg("-@dangerous").arg("-@admin");
        // What would name other panels' keys and channels, run code of its
        // own making beyond a script, or switch databases.
        for denied in ["-scan", "-randomkey", "-pubsub", "-psubscribe", "-punsubscribe", "-client|tracking"] {
            setuser.arg(denied);
        }
        setuser.arg("-function").arg("-fcall").arg("-fcall_ro").arg("-select").arg("-swapdb").arg("-move");
        // (selector, literal, then any suffix?)
        let keys = [
            ("%R~", panels::panel_key(panel), false),
            ("~", format!("nexus:tools:panel:{panel}"), false),
            ("~", format!("nexus:tools:listers:{panel}"), false),
            ("~", format!("nexus:tools:prompts:{panel}"), false),
            ("~", format!("nexus:tools:resources:{panel}"), false),
            ("~", format!("nexus:tools:panels-of:{owner}"), false),
            ("~", format!("nexus:tool-call:{panel}."), true),
            ("&", channels::panel_calls(panel), false),
            ("&", channels::panel_out(panel, ""), true),
            ("&", channels::tool_replies("", "").strip_suffix(':').unwrap_or_default().to_owned(), true),
        ];
        for (selector, literal, any_suffix) in keys {
            setuser.arg(format!("{selector}{}{}", glob_escape(&literal), if any_suffix { "*" } else { "" }));
        }
        let redis = self.redis().await?;
        let setuser = &setuser;
        redis.read(|mut conn| async move { setuser.query_async::<()>(&mut conn).await }).await.map_err(store_error)?;
        login_url(&self.redis_url, &name, password)
    }

    /// Deletes `name` (gone already is fine); failures are logged.
    pub(super) async fn delete(&self, name: &str) {
        let deleted = match self.redis().await {
            Ok(redis) => redis
                .read(|mut conn| async move {
                    redis::cmd("ACL").arg("DELUSER").arg(name).query_async::<u64>(&mut conn).await
                })
                .await
                .map_err(store_error),
            Err(error) => Err(error),
        };
        if let Err(error) = deleted {
            tracing::warn!(user = name, %error, "could not delete a sidecar's redis user");
        }
    }

    /// The sidecar users of instances `ours_and_gone` says a crash left.
    pub(super) async fn sweep(&self, ours_and_gone: impl Fn(&str) -> bool) {
        let Ok(redis) = self.redis().await else { return };
        let users: Result<Vec<String>, _> =
            redis.read(|mut conn| async move { redis::cmd("ACL").arg("USERS").query_async(&mut conn).await }).await;
        for user in users.unwrap_or_default() {
            if user.strip_prefix(PREFIX).is_some_and(&ours_and_gone) {
                self.delete(&user).await;
            }
        }
    }
}

/// The user of `instance`'s sidecar.
pub(super) fn user_name(instance: &str) -> String {
    format!("{PREFIX}{instance}")
}

/// `literal` as a glob that matches only itself, whatever the panel id
/// and owner hold.
fn glob_escape(literal: &str) -> String {
    let mut escaped = String::with_capacity(literal.len());
    for c in literal.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// `redis_url` logging in as `user`.
fn login_url(redis_url: &str, user: &str, password: &str) -> Result<String, DriverError> {
    let info = redis_url.into_connection_info().map_err(|e| store_error(e.into()))?;
    let db = info.redis_settings().db();
    match info.addr() {
        ConnectionAddr::Tcp(host, port) => Ok(format!("redis://{user}:{password}@{host}:{port}/{db}")),
        ConnectionAddr::TcpTls { host, port, .. } => Ok(format!("rediss://{user}:{password}@{host}:{port}/{db}")),
        ConnectionAddr::Unix(path) => {
            Ok(format!("redis+unix://{}?db={db}&user={user}&pass={password}", path.display()))
        }
        other => Err(DriverError::Io(std::io::Error::other(format!("a sidecar cannot log in over {other:?}")))),
    }
}

fn store_error(error: StoreError) -> DriverError {
    DriverError::Io(std::io::Error::other(format!("sidecar users in redis: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_of_ids_are_matched_literally() {
        assert_eq!(glob_escape("nexus:panel:a?b[c]*"), "nexus:panel:a\\?b\\[c\\]\\*");
    }

    #[test]
    fn the_login_url_keeps_the_server_and_database() {
        let url = login_url("redis://127.0.0.1:6390/3", "u", "p").unwrap();
        assert_eq!(url, "redis://u:p@127.0.0.1:6390/3");
    }
}
