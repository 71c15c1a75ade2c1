//! How the model client is configured: its endpoints (from the command
//! line's `url=…,model=…` form or built in code) and its retry and timeout
//! policy. This module parses and checks; it opens no connection.

use std::path::PathBuf;
use std::time::Duration;

/// Requests one endpoint serves at once when its spec does not say.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// Retries on one endpoint before failing over to the next.
pub const DEFAULT_RETRIES: u32 = 2;
/// The first wait before a retry; each retry doubles it up to [`MAX_BACKOFF`].
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(200);
/// The longest wait between retries, unless `Retry-After` asks for more.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long an endpoint may send nothing before the attempt times out.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A configuration the client cannot start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An endpoint spec that does not parse.
    #[error("endpoint spec {spec:?}: {reason} (expected url=http://host:port/v1,model=NAME[,name=N][,key-file=F][,concurrency=N])")]
    Spec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An endpoint whose settings are wrong.
    #[error("endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint's name.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// A key file that cannot be read, or is empty.
    #[error("endpoint {endpoint:?}: key file {path}: {reason}")]
    KeyFile {
        /// The endpoint's name.
        endpoint: String,
        /// The file.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// One OpenAI-compatible endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// Its name in metrics, records and logs (default: the URL's `host:port`).
    pub name: String,
    /// The API's base URL, the part before `/chat/completions` (e.g. `http://127.0.0.1:8080/v1`).
    pub base_url: String,
    /// The model asked for.
    pub model: String,
    /// A file holding the bearer key, read once when the client starts (whitespace trimmed).
    pub key_file: Option<PathBuf>,
    /// Requests in flight to it at most; more wait for a turn.
    pub concurrency: usize,
    /// Most tokens one answer may have (`max_tokens`); `None`: the endpoint's own limit.
    pub max_tokens: Option<u32>,
}

impl EndpointConfig {
    /// An endpoint named after its URL's `host:port`, without a key, at the default concurrency.
    pub fn new(base_url: &str, model: &str) -> Result<Self, ConfigError> {
        let parse_error = |reason: String| ConfigError::Spec { spec: base_url.to_owned(), reason };
        let url = check_url(base_url).map_err(parse_error)?;
        let name = match (url.host_str(), url.port_or_known_default()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            _ => base_url.to_owned(),
        };
        Ok(EndpointConfig {
            name,
            base_url: base_url.trim_end_matches('/').to_owned(),
            model: model.to_owned(),
            key_file: None,
            concurrency: DEFAULT_CONCURRENCY,
            max_tokens: None,
        })
    }

    /// Parses the command line's form:
    /// `url=http://host:port/v1,model=NAME[,name=N][,key-file=FILE][,concurrency=N][,max-tokens=N]`.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let error = |reason: String| ConfigError::Spec { spec: spec.to_owned(), reason };
        let (mut url, mut model, mut name, mut key_file, mut concurrency, mut max_tokens) =
            (None, None, None, None, None, None);
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| error(format!("{part:?} is not key=value")))?;
            let value = value.trim();
            if value.is_empty() {
                return Err(error(format!("{key} is empty")));
            }
            let slot = match key.trim() {
                "url" => &mut url,
                "model" => &mut model,
                "name" => &mut name,
                "key-file" | "key_file" => &mut key_file,
                "concurrency" => &mut concurrency,
                "max-tokens" | "max_tokens" => &mut max_tokens,
                other => return Err(error(format!("unknown key {other:?}"))),
            };
            if slot.replace(value).is_some() {
                return Err(error(format!("{} given twice", key.trim())));
            }
        }
        let url = url.ok_or_else(|| error("url= is missing".to_owned()))?;
        let model = model.ok_or_else(|| error("model= is missing".to_owned()))?;
        let mut endpoint = EndpointConfig::new(url, model).map_err(|_| error(format!("bad url {url:?}")))?;
        if let Some(name) = name {
            endpoint.name = name.to_owned();
        }
        endpoint.key_file = key_file.map(PathBuf::from);
        if let Some(concurrency) = concurrency {
            endpoint.concurrency = match concurrency.parse() {
                Ok(n) if n > 0 => n,
                _ => return Err(error(format!("concurrency {concurrency:?} is not a positive number"))),
            };
        }
        if let Some(max_tokens) = max_tokens {
            endpoint.max_tokens = match max_tokens.parse() {
                Ok(n) if n > 0 => Some(n),
                _ => return Err(error(format!("max-tokens {max_tokens:?} is not a positive number"))),
            };
        }
        Ok(endpoint)
    }

    /// The URL the client posts to.
    pub fn completions_url(&self) -> String {
        format!("{}/chat/completions", self.base_url.trim_end_matches('/'))
    }
}

/// Checks that `url` is an absolute `http` or `https` URL with a host.
pub(super) fn check_url(url: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!("{url:?} is not an http(s) URL with a host"));
    }
    Ok(parsed)
}

/// The endpoints and the retry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    /// The endpoints, in the order they are tried.
    pub endpoints: Vec<EndpointConfig>,
    /// Retries on one endpoint before failing over to the next.
    pub retries: u32,
    /// The first wait before a retry, doubled each time up to [`MAX_BACKOFF`].
    pub backoff: Duration,
    /// How long an endpoint may send nothing (no headers, no bytes) before the attempt times out.
    pub idle_timeout: Duration,
}

impl ModelConfig {
    /// `endpoints` with the default policy.
    pub fn new(endpoints: Vec<EndpointConfig>) -> Self {
        ModelConfig {
            endpoints,
            retries: DEFAULT_RETRIES,
            backoff: DEFAULT_BACKOFF,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

impl Default for ModelConfig {
    /// No endpoint: every call fails with `no_endpoint`.
    fn default() -> Self {
        ModelConfig::new(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_full_form() {
        let e =
            EndpointConfig::parse("url=http://127.0.0.1:8080/v1/,model=smollm2,name=local,key-file=/k,concurrency=2")
                .unwrap();
        assert_eq!(e.base_url, "http://127.0.0.1:8080/v1");
        assert_eq!(e.model, "smollm2");
        assert_eq!(e.name, "local");
        assert_eq!(e.key_file, Some(PathBuf::from("/k")));
        assert_eq!(e.concurrency, 2);
        assert_eq!(e.completions_url(), "http://127.0.0.1:8080/v1/chat/completions");
    }

    #[test]
    fn names_an_endpoint_after_its_host_and_port() {
        let e = EndpointConfig::parse("model=m, url=https://api.example.com/v1").unwrap();
        assert_eq!(e.name, "api.example.com:443");
        assert_eq!(e.concurrency, DEFAULT_CONCURRENCY);
        assert_eq!(e.key_file, None);
    }

    #[test]
    fn refuses_bad_specs() {
        for spec in [
            "model=m",
            "url=http://h/v1",
            "url=ftp://h/v1,model=m",
            "url=not a url,model=m",
            "url=http://h/v1,model=m,concurrency=0",
            "url=http://h/v1,model=m,concurrency=x",
            "url=http://h/v1,model=m,colour=red",
            "url=http://h/v1,model=m,model=n",
            "url=http://h/v1,model=",
            "url=http://h/v1,model",
        ] {
            assert!(matches!(EndpointConfig::parse(spec), Err(ConfigError::Spec { .. })), "{spec} was accepted");
        }
    }
}
