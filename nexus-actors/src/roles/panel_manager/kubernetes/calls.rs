//! Calls to the Kubernetes API, each with a deadline, retried with
//! backoff where waiting can help: a 5xx, a 429, a timeout or a dropped
//! connection, a quota refusal. Everything else is an error at once, in
//! words the owner can act on.

use std::future::Future;
use std::time::Duration;

use kube::api::{Api, DeleteParams, PostParams};
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::KubeError;
use crate::telemetry::Metrics;

/// How calls are retried.
#[derive(Debug, Clone)]
pub struct Retry {
    /// One call's deadline.
    pub timeout: Duration,
    /// The first wait; each further one doubles, up to `max_wait`.
    pub first_wait: Duration,
    /// The longest wait.
    pub max_wait: Duration,
    /// Calls in all, the first one included.
    pub attempts: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            timeout: Duration::from_secs(10),
            first_wait: Duration::from_millis(200),
            max_wait: Duration::from_secs(5),
            attempts: 6,
        }
    }
}

/// Why one attempt failed, and whether another may help.
enum Failure {
    Again(String),
    Final(KubeError),
}

fn classify(what: &str, error: kube::Error) -> Failure {
    match error {
        kube::Error::Api(status) => {
            let message = format!("{what}: {} ({})", status.message, status.code);
            match status.code {
                403 if status.message.contains("exceeded quota") => Failure::Again(message),
                429 | 500..=599 => Failure::Again(message),
                403 => Failure::Final(KubeError::Forbidden(message)),
                404 => Failure::Final(KubeError::NotFound(message)),
                409 => Failure::Final(KubeError::Conflict(message)),
                _ => Failure::Final(KubeError::Refused(message)),
            }
        }
        // The connection or the deadline: the server may answer next time.
        error @ (kube::Error::HyperError(_) | kube::Error::Service(_)) => Failure::Again(format!("{what}: {error}")),
        // A body that does not decode, a request that cannot be built, no
        // credentials: no retry changes that.
        other => Failure::Final(KubeError::Refused(format!("{what}: {other}"))),
    }
}

/// Runs `call` until it succeeds, fails for good, or runs out of attempts.
pub(super) async fn retried<T, F, Fut>(retry: &Retry, metrics: &Metrics, what: &str, call: F) -> Result<T, KubeError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut wait = retry.first_wait;
    let mut last = String::new();
    for attempt in 1..=retry.attempts.max(1) {
        let failure = match tokio::time::timeout(retry.timeout, call()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => classify(what, error),
            Err(_) => Failure::Again(format!("{what}: no answer within {:?}", retry.timeout)),
        };
        match failure {
            Failure::Final(error) => return Err(error),
            Failure::Again(message) => {
                metrics.kube_api_retries.inc();
                tracing::warn!(attempt, %message, "nexus_kube_api_retries_total");
                last = message;
            }
        }
        if attempt < retry.attempts {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(retry.max_wait);
        }
    }
    Err(KubeError::Unavailable { attempts: retry.attempts, last })
}

/// Creates `object`; one that exists already counts as made when `ours`
/// says it is (a retried create the server had carried out), else it is a
/// conflict.
pub(super) async fn create<K>(
    api: &Api<K>,
    retry: &Retry,
    metrics: &Metrics,
    kind: &str,
    object: &K,
    ours: impl Fn(&K) -> bool,
) -> Result<K, KubeError>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let what = format!("creating {kind} {name}");
    let params = PostParams::default();
    let made = retried(retry, metrics, &what, || api.create(&params, object)).await;
    match made {
        Err(KubeError::Conflict(message)) => {
            let existing = retried(retry, metrics, &what, || api.get(&name)).await?;
            if ours(&existing) {
                Ok(existing)
            } else {
                Err(KubeError::Conflict(format!("{message}; it is not this instance's")))
            }
        }
        other => other,
    }
}

/// Deletes `name` with `params`; one already gone counts as deleted.
pub(super) async fn delete<K>(
    api: &Api<K>,
    retry: &Retry,
    metrics: &Metrics,
    kind: &str,
    name: &str,
    params: &DeleteParams,
) -> Result<(), KubeError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let what = format!("deleting {kind} {name}");
    match retried(retry, metrics, &what, || api.delete(name, params)).await {
        Ok(_) | Err(KubeError::NotFound(_)) => Ok(()),
        Err(error) => Err(error),
    }
}
