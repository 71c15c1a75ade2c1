//! The envelope every message wears when it crosses a bus.
//!
//! The shape follows CloudEvents 1.0 JSON (`specversion`, `id`, `type`,
//! `source`, `time`, `datacontenttype`, `data`) with the distributed-tracing
//! extension (`traceparent`, `tracestate`) and our `causationid` extension.
//! This module owns encoding and decoding; it never panics on bad bytes and
//! knows nothing about which bus carries the bytes.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::telemetry::TraceContext;

/// The CloudEvents version we emit and accept.
pub const SPEC_VERSION: &str = "1.0";

/// Largest encoded envelope we accept from a bus (1 MiB).
pub const MAX_ENVELOPE_BYTES: usize = 1 << 20;

/// A typed payload: the Rust type of `data` and its CloudEvents `type`.
pub trait Payload: Serialize + DeserializeOwned {
    /// The CloudEvents `type`, reverse-DNS style, e.g. `nexus.bench.ping`.
    const TYPE: &'static str;
}

/// Why bytes could not become an envelope or an envelope a payload.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes exceed [`MAX_ENVELOPE_BYTES`]; nothing was parsed.
    #[error("envelope is {size} bytes, the limit is {limit}")]
    TooLarge {
        /// Bytes received.
        size: usize,
        /// Bytes accepted at most.
        limit: usize,
    },
    /// Not JSON, a required attribute is missing, or `data` does not fit the payload type.
    #[error("envelope is not valid CloudEvents JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A `specversion` other than [`SPEC_VERSION`] (the one received).
    #[error("unsupported specversion {0:?}, expected \"1.0\"")]
    SpecVersion(String),
    /// The CloudEvents `type` is not the payload type's.
    #[error("envelope has type {found:?}, expected {expected:?}")]
    WrongType {
        /// The payload type's [`Payload::TYPE`].
        expected: &'static str,
        /// The envelope's `type`.
        found: String,
    },
}

/// A bus message: metadata plus a payload of type `T` (JSON by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T = Value> {
    /// The CloudEvents version, [`SPEC_VERSION`]; [`Envelope::decode`] refuses others.
    pub specversion: String,
    /// A unique id: a UUIDv7 for envelopes made here.
    pub id: String,
    /// The CloudEvents `type`, e.g. `nexus.bench.ping` (see [`Payload::TYPE`]).
    #[serde(rename = "type")]
    pub kind: String,
    /// Who produced it: a node name, `panel/<id>` (a panel's sidecar) or `watchdog/<instance>`.
    pub source: String,
    /// When it was made.
    pub time: DateTime<Utc>,
    /// The W3C `traceparent` of the span that made it; `None`: not traced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The W3C `tracestate` that goes with `traceparent`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
    /// The id of the envelope that caused this one (see [`Envelope::caused_by`]); `None` for a first cause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causationid: Option<String>,
    /// The media type of `data`: `application/json` (also when absent on the wire).
    #[serde(default = "json_content_type")]
    pub datacontenttype: String,
    /// The payload.
    pub data: T,
}

fn json_content_type() -> String {
    "application/json".to_owned()
}

impl<T: Payload> Envelope<T> {
    /// A new envelope for `data`, stamped with a fresh id, the current time
    /// and the trace context of the current span.
    pub fn new(source: impl Into<String>, data: T) -> Self {
        Self::with_type(T::TYPE, source, data)
    }
}

impl<T: Serialize> Envelope<T> {
    /// A new envelope whose CloudEvents `type` is given explicitly.
    pub fn with_type(kind: impl Into<String>, source: impl Into<String>, data: T) -> Self {
        let trace = TraceContext::current();
        Envelope {
            specversion: SPEC_VERSION.to_owned(),
            id: uuid::Uuid::now_v7().to_string(),
            kind: kind.into(),
            source: source.into(),
            time: Utc::now(),
            traceparent: trace.traceparent,
            tracestate: trace.tracestate,
            causationid: None,
            datacontenttype: json_content_type(),
            data,
        }
    }

    /// Marks this envelope as caused by `cause` (its id becomes our causation id).
    pub fn caused_by<U>(mut self, cause: &Envelope<U>) -> Self {
        self.causationid = Some(cause.id.clone());
        self
    }

    /// The trace context this envelope carries.
    pub fn trace_context(&self) -> TraceContext {
        TraceContext { traceparent: self.traceparent.clone(), tracestate: self.tracestate.clone() }
    }

    /// Encodes as CloudEvents JSON.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data structures with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The same envelope with its payload as untyped JSON.
    pub fn into_untyped(self) -> Envelope<Value> {
        let data = serde_json::to_value(&self.data).unwrap_or(Value::Null);
        self.map_data(|_| data)
    }
}

impl<T> Envelope<T> {
    fn map_data<U>(self, f: impl FnOnce(T) -> U) -> Envelope<U> {
        Envelope {
            specversion: self.specversion,
            id: self.id,
            kind: self.kind,
            source: self.source,
            time: self.time,
            traceparent: self.traceparent,
            tracestate: self.tracestate,
            causationid: self.causationid,
            datacontenttype: self.datacontenttype,
            data: f(self.data),
        }
    }
}

impl Envelope<Value> {
    /// Decodes bytes from a bus. Never panics; every failure is a [`DecodeError`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(DecodeError::TooLarge { size: bytes.len(), limit: MAX_ENVELOPE_BYTES });
        }
        let envelope: Envelope<Value> = serde_json::from_slice(bytes)?;
        if envelope.specversion != SPEC_VERSION {
            return Err(DecodeError::SpecVersion(envelope.specversion));
        }
        Ok(envelope)
    }

    /// Converts the payload to `T`, checking the CloudEvents `type` first.
    pub fn typed<T: Payload>(self) -> Result<Envelope<T>, DecodeError> {
        let data = self.payload()?;
        Ok(self.map_data(|_| data))
    }

    /// The payload as `T`, checking the CloudEvents `type` first; for a
    /// shared envelope, read without a copy of it.
    pub fn payload<T: Payload>(&self) -> Result<T, DecodeError> {
        if self.kind != T::TYPE {
            return Err(DecodeError::WrongType { expected: T::TYPE, found: self.kind.clone() });
        }
        Ok(T::deserialize(&self.data)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Ping {
        n: u64,
    }
    impl Payload for Ping {
        const TYPE: &'static str = "nexus.test.ping";
    }

    #[test]
    fn round_trips_as_cloudevents_json() {
        let cause = Envelope::new("test/a", Ping { n: 0 });
        let env = Envelope::new("test/b", Ping { n: 7 }).caused_by(&cause);
        let json: Value = serde_json::from_slice(&env.encode()).unwrap();
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["type"], "nexus.test.ping");
        assert_eq!(json["source"], "test/b");
        assert_eq!(json["causationid"], cause.id.as_str());
        assert_eq!(json["data"]["n"], 7);
        let back = Envelope::decode(&env.encode()).unwrap().typed::<Ping>().unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn rejects_bad_input_with_clear_errors() {
        assert!(matches!(Envelope::decode(b"not json"), Err(DecodeError::Json(_))));
        assert!(matches!(Envelope::decode(b"{\"specversion\":\"1.0\"}"), Err(DecodeError::Json(_))));
        let mut other = Envelope::new("t", Ping { n: 1 }).into_untyped();
        other.specversion = "0.3".into();
        assert!(matches!(Envelope::decode(&other.encode()), Err(DecodeError::SpecVersion(v)) if v == "0.3"));
        let huge = vec![b' '; MAX_ENVELOPE_BYTES + 1];
        assert!(matches!(Envelope::decode(&huge), Err(DecodeError::TooLarge { .. })));
        let mut wrong = Envelope::new("t", Ping { n: 1 }).into_untyped();
        wrong.kind = "nexus.other".into();
        assert!(matches!(wrong.typed::<Ping>(), Err(DecodeError::WrongType { .. })));
        let mut bad_data = Envelope::new("t", Ping { n: 1 }).into_untyped();
        bad_data.data = Value::String("x".into());
        assert!(matches!(bad_data.typed::<Ping>(), Err(DecodeError::Json(_))));
    }

    #[test]
    fn mutated_bytes_never_panic() {
        let good = Envelope::new("t", Ping { n: 42 }).encode();
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            for _ in 0..(next() % 8 + 1) {
                let i = (next() as usize) % bytes.len();
                bytes[i] = next() as u8;
            }
            let cut = (next() as usize) % (bytes.len() + 1);
            let _ = Envelope::decode(&bytes[..cut]);
        }
    }
}
