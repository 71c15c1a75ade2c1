//! A mock Kubernetes API server for the `kubernetes` driver's tests: no
//! real API server runs on these machines, so this one speaks the API's
//! JSON over a real socket, on a free loopback port and a thread of its
//! own ([`crate::loopback`]; dropping it stops it).
//!
//! It keeps namespaced objects by collection path, answers create (409
//! when the name is taken), get, list and delete, streams watches
//! (`?watch=true`, from a resourceVersion, by label selector), serves pod
//! logs, and records every request. The test drives the cluster's side:
//! [`MockKube::set_status`] plays the kubelet or Knative,
//! [`MockKube::remove`] someone deleting an object, [`MockKube::fail`]
//! and [`MockKube::hang`] a failing or silent API server. It judges nothing.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::loopback::{full, Body, Loopback};

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `GET`, `POST`, `DELETE`, ...
    pub method: String,
    /// The path, e.g. `/api/v1/namespaces/panels/pods`.
    pub path: String,
    /// The decoded query parameters.
    pub query: HashMap<String, String>,
    /// The JSON body (`Null` when none).
    pub body: Value,
}

impl Recorded {
    /// `METHOD path`, what most assertions compare.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

struct Fault {
    method: Method,
    path_contains: String,
    /// Only requests whose body holds this.
    body_contains: String,
    answer: Answer,
    times: usize,
}

#[derive(Clone)]
enum Answer {
    /// This status, and nothing done.
    Status(u16, String),
    /// Nothing done, no answer.
    Hang,
    /// Done, but no answer (a connection lost after the server acted).
    Lost,
}

#[derive(Default)]
struct Inner {
    version: u64,
    /// collection path → name → object.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// (resourceVersion, collection, type, object).
    events: Vec<(u64, String, &'static str, Value)>,
    requests: Vec<Recorded>,
    faults: Vec<Fault>,
    logs: HashMap<String, (String, String)>,
}

impl Inner {
    /// The stored collection whose path ends in `plural`.
    fn collection(&self, plural: &str) -> Option<String> {
        self.objects.keys().find(|c| c.ends_with(&format!("/{plural}"))).cloned()
    }
}

struct State {
    inner: Mutex<Inner>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a change and wakes the watches.
    fn record(&self, inner: &mut Inner, collection: &str, kind: &'static str, object: Value) {
        self.changed.send_replace(inner.version);
        inner.events.push((inner.version, collection.to_owned(), kind, object));
    }
}

/// The server; see the module documentation.
pub struct MockKube {
    server: Loopback,
    state: Arc<State>,
}

impl MockKube {
    /// Starts a server on a free loopback port.
    pub fn start() -> MockKube {
        let (changed, _) = tokio::sync::watch::channel(0);
        let state = Arc::new(State { inner: Mutex::new(Inner::default()), changed });
        let served = state.clone();
        let server = Loopback::start("mock-kube", move |request| handle(served.clone(), request));
        MockKube { server, state }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// Writes a kubeconfig for this server with `namespace` as the
    /// context's namespace, and returns its path.
    pub fn kubeconfig(&self, dir: &Path, namespace: &str) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: mock\nclusters:\n- name: mock\n  cluster:\n    server: {}\ncontexts:\n- name: mock\n  context:\n    cluster: mock\n    user: mock\n    namespace: {namespace}\nusers:\n- name: mock\n  user:\n    token: mock-token\n",
            self.url()
        );
        std::fs::write(&path, text).expect("write the kubeconfig");
        path
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().requests.clone()
    }

    /// The requests so far that changed something (not GETs).
    pub fn writes(&self) -> Vec<Recorded> {
        self.requests().into_iter().filter(|r| r.method != "GET").collect()
    }

    /// The stored object `name` of the collection ending in `plural`.
    pub fn object(&self, plural: &str, name: &str) -> Option<Value> {
        let inner = self.state.lock();
        inner.objects.get(&inner.collection(plural)?)?.get(name).cloned()
    }

    /// The names stored in the collection ending in `plural`.
    pub fn names(&self, plural: &str) -> Vec<String> {
        let inner = self.state.lock();
        inner
            .objects
            .iter()
            .filter(|(c, _)| c.ends_with(&format!("/{plural}")))
            .flat_map(|(_, objects)| objects.keys().cloned())
            .collect()
    }

    /// Stores `object` in `collection` (a path such as
    /// `/api/v1/namespaces/ns/pods`) as someone else would have made it:
    /// `ADDED` to the watches, nothing recorded as a request.
    pub fn put(&self, collection: &str, mut object: Value) {
        let mut inner = self.state.lock();
        inner.version += 1;
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        object["metadata"]["resourceVersion"] = json!(inner.version.to_string());
        inner.objects.entry(collection.to_owned()).or_default().insert(name, object.clone());
        self.state.record(&mut inner, collection, "ADDED", object);
    }

    /// Sets the `status` of a stored object, as the cluster would, and
    /// tells the watches (`MODIFIED`). False when there is no such object.
    pub fn set_status(&self, plural: &str, name: &str, status: Value) -> bool {
        self.modify(plural, name, |object| object["status"] = status)
    }

    /// Marks a stored object as being deleted, as the API server does before
    /// its finalizers and the kubelet are done: a `deletionTimestamp` and,
    /// for a Pod, the terminal phase `Failed` (`MODIFIED` to the watches).
    pub fn mark_deleting(&self, plural: &str, name: &str) -> bool {
        self.modify(plural, name, |object| {
            object["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            if plural == "pods" {
                object["status"]["phase"] = json!("Failed");
            }
        })
    }

    /// Changes a stored object with a new resourceVersion and tells the
    /// watches (`MODIFIED`). False when there is no such object.
    fn modify(&self, plural: &str, name: &str, change: impl FnOnce(&mut Value)) -> bool {
        let mut inner = self.state.lock();
        let Some(collection) = inner.collection(plural) else { return false };
        let version = inner.version + 1;
        let Some(object) = inner.objects.get_mut(&collection).and_then(|o| o.get_mut(name)) else { return false };
        change(object);
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let object = object.clone();
        inner.version = version;
        self.state.record(&mut inner, &collection, "MODIFIED", object);
        true
    }

    /// Deletes a stored object as someone else would (`DELETED` to the
    /// watches, nothing recorded as a request).
    pub fn remove(&self, plural: &str, name: &str) -> bool {
        let mut inner = self.state.lock();
        let Some(collection) = inner.collection(plural) else { return false };
        let Some(object) = inner.objects.get_mut(&collection).and_then(|o| o.remove(name)) else { return false };
        inner.version += 1;
        self.state.record(&mut inner, &collection, "DELETED", object);
        true
    }

    /// The next `times` requests of `method` on a path containing
    /// `path_contains` are answered `status` with a `Status` saying `message`.
    pub fn fail(&self, method: Method, path_contains: &str, status: u16, message: &str, times: usize) {
        let answer = Answer::Status(status, message.to_owned());
        let fault =
            Fault { method, path_contains: path_contains.to_owned(), body_contains: String::new(), answer, times };
        self.state.lock().faults.push(fault);
    }

    /// The next `times` such requests get no answer at all.
    pub fn hang(&self, method: Method, path_contains: &str, times: usize) {
        let (path_contains, body_contains) = (path_contains.to_owned(), String::new());
        let fault = Fault { method, path_contains, body_contains, answer: Answer::Hang, times };
        self.state.lock().faults.push(fault);
    }

    /// The next `times` such requests whose body holds `body_contains`
    /// are carried out, and their answers never sent.
    pub fn lose_answer(&self, method: Method, path_contains: &str, body_contains: &str, times: usize) {
        let (path_contains, body_contains) = (path_contains.to_owned(), body_contains.to_owned());
        let fault = Fault { method, path_contains, body_contains, answer: Answer::Lost, times };
        self.state.lock().faults.push(fault);
    }

    /// What `pods/<pod>/log` answers: the running container's log and the
    /// previous one's (`?previous=true`).
    pub fn set_log(&self, pod: &str, current: &str, previous: &str) {
        self.state.lock().logs.insert(pod.to_owned(), (current.to_owned(), previous.to_owned()));
    }
}

fn respond(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    full(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), content_type, body)
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    respond(code, "application/json", body.to_string())
}

fn bytes_contain(bytes: &[u8], needle: &str) -> bool {
    needle.is_empty() || bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(uri: &hyper::Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Whether `object`'s labels match `selector` (`k=v,k2=v2`, `k`).
fn selected(object: &Value, selector: Option<&String>) -> bool {
    let Some(selector) = selector else { return true };
    selector.split(',').filter(|t| !t.is_empty()).all(|term| match term.split_once('=') {
        Some((k, v)) => object["metadata"]["labels"][k].as_str() == Some(v),
        None => object["metadata"]["labels"].get(term).is_some(),
    })
}

/// `(collection, name, subresource)` of a namespaced path.
fn parse(path: &str) -> Option<(String, Option<String>, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let at = parts.iter().position(|p| *p == "namespaces")?;
    if parts.len() < at + 3 {
        return None;
    }
    let collection = format!("/{}", parts[..at + 3].join("/"));
    Some((collection, parts.get(at + 3).map(|s| s.to_string()), parts.get(at + 4).map(|s| s.to_string())))
}

fn list_kind(collection: &str) -> (String, String) {
    let parts: Vec<&str> = collection.trim_matches('/').split('/').collect();
    let api_version = if parts[0] == "api" { parts[1].to_owned() } else { format!("{}/{}", parts[1], parts[2]) };
    let kind = match parts.last().copied().unwrap_or("") {
        "pods" => "Pod",
        "persistentvolumeclaims" => "PersistentVolumeClaim",
        "secrets" => "Secret",
        "serviceaccounts" => "ServiceAccount",
        "roles" => "Role",
        "rolebindings" => "RoleBinding",
        "services" => "Service",
        _ => "Object",
    };
    (api_version, format!("{kind}List"))
}

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Response<Body> {
    let (method, uri) = (request.method().clone(), request.uri().clone());
    let path = uri.path().to_owned();
    let query = query(&uri);
    let bytes = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let fault = {
        let mut inner = state.lock();
        inner.requests.push(Recorded {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            body: body.clone(),
        });
        let watch = query.get("watch").is_some_and(|w| w == "true");
        let fault = inner.faults.iter_mut().find(|f| {
            let matches =
                f.method == method && path.contains(&f.path_contains) && bytes_contain(&bytes, &f.body_contains);
            f.times > 0 && matches && !watch
        });
        fault.map(|f| {
            f.times -= 1;
            f.answer.clone()
        })
    };
    match fault {
        Some(Answer::Status(code, message)) => {
            let reason = match code {
                409 => "AlreadyExists",
                403 => "Forbidden",
                429 => "TooManyRequests",
                _ => "InternalError",
            };
            return status(code, reason, &message);
        }
        Some(Answer::Hang) => std::future::pending::<()>().await,
        Some(Answer::Lost) => {
            drop(answer(state, method, &path, &query, body));
            return std::future::pending::<Response<Body>>().await;
        }
        None => {}
    }
    answer(state, method, &path, &query, body)
}

/// What the API server does and says for a request.
fn answer(
    state: Arc<State>,
    method: Method,
    path: &str,
    query: &HashMap<String, String>,
    body: Value,
) -> Response<Body> {
    let Some((collection, name, sub)) = parse(path) else {
        return status(404, "NotFound", "the mock serves namespaced objects only");
    };
    match (method, name, sub) {
        (Method::GET, None, None) if query.get("watch").is_some_and(|w| w == "true") => watch(state, collection, query),
        (Method::GET, None, None) => {
            let inner = state.lock();
            let items: Vec<Value> = inner
                .objects
                .get(&collection)
                .into_iter()
                .flat_map(|o| o.values())
                .filter(|o| selected(o, query.get("labelSelector")))
                .cloned()
                .collect();
            let (api_version, kind) = list_kind(&collection);
            let list = json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": inner.version.to_string()}, "items": items});
            respond(200, "application/json", list.to_string())
        }
        (Method::POST, None, None) => {
            let mut inner = state.lock();
            let Some(name) = body["metadata"]["name"].as_str().map(str::to_owned) else {
                return status(422, "Invalid", "metadata.name: Required value");
            };
            if inner.objects.get(&collection).is_some_and(|o| o.contains_key(&name)) {
                return status(409, "AlreadyExists", &format!("{name:?} already exists"));
            }
            inner.version += 1;
            let mut object = body;
            object["metadata"]["resourceVersion"] = json!(inner.version.to_string());
            object["metadata"]["uid"] = json!(format!("uid-{}", inner.version));
            inner.objects.entry(collection.clone()).or_default().insert(name, object.clone());
            state.record(&mut inner, &collection, "ADDED", object.clone());
            respond(201, "application/json", object.to_string())
        }
        (Method::GET, Some(name), None) => match state.lock().objects.get(&collection).and_then(|o| o.get(&name)) {
            Some(object) => respond(200, "application/json", object.to_string()),
            None => status(404, "NotFound", &format!("{name:?} not found")),
        },
        (Method::GET, Some(name), Some(sub)) if sub == "log" => {
            let inner = state.lock();
            let previous = query.get("previous").is_some_and(|p| p == "true");
            match inner.logs.get(&name) {
                Some((_, previous_log)) if previous => respond(200, "text/plain", previous_log.clone()),
                Some((current, _)) if !current.is_empty() => respond(200, "text/plain", current.clone()),
                _ => status(400, "BadRequest", &format!("container \"panel\" in pod {name:?} is waiting to start")),
            }
        }
        (Method::DELETE, Some(name), None) => {
            let mut inner = state.lock();
            match inner.objects.get_mut(&collection).and_then(|o| o.remove(&name)) {
                Some(object) => {
                    inner.version += 1;
                    state.record(&mut inner, &collection, "DELETED", object.clone());
                    respond(200, "application/json", object.to_string())
                }
                None => status(404, "NotFound", &format!("{name:?} not found")),
            }
        }
        _ => status(405, "MethodNotAllowed", "the mock does not serve this"),
    }
}

/// Streams the collection's changes after `resourceVersion`, one JSON
/// event per line, until the client goes.
fn watch(state: Arc<State>, collection: String, query: &HashMap<String, String>) -> Response<Body> {
    let from = query.get("resourceVersion").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let selector = query.get("labelSelector").cloned();
    let changed = state.changed.subscribe();
    let frames = futures::stream::unfold((from, changed), move |(mut last, mut changed)| {
        let (state, collection, selector) = (state.clone(), collection.clone(), selector.clone());
        async move {
            loop {
                let lines: String = {
                    let inner = state.lock();
                    let fresh: Vec<_> =
                        inner.events.iter().filter(|(v, c, _, _)| *v > last && *c == collection).collect();
                    if let Some((v, _, _, _)) = fresh.last() {
                        last = *v;
                    }
                    fresh
                        .into_iter()
                        .filter(|(_, _, _, o)| selected(o, selector.as_ref()))
                        .map(|(_, _, kind, object)| format!("{}\n", json!({"type": kind, "object": object})))
                        .collect()
                };
                if !lines.is_empty() {
                    return Some((Ok::<_, Infallible>(Frame::data(Bytes::from(lines))), (last, changed)));
                }
                if changed.changed().await.is_err() {
                    return None;
                }
            }
        }
    });
    let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}
