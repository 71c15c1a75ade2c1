//! A trace started before a publish is the parent of the receiving actor's
//! span, across Redis and across Kafka. One test: it installs the global
//! tracing subscriber with the OpenTelemetry SDK's in-memory exporter.

mod common;

use std::sync::{Arc, Mutex};

use actix::Arbiter;
use common::{eventually, tempdir, Collector, Recorder, Seen};
use nexus_actors::bus::kafka::{ensure_topics, Consume, KafkaBridge, KafkaConfig, Produce};
use nexus_actors::bus::redis::{RedisBridge, Subscribe, Topic};
use nexus_actors::bus::BusEvent;
use nexus_actors::infra::{RedisServer, Tansu, TansuStorage};
use nexus_actors::{Envelope, Kernel};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::json;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

fn root_span(name: &'static str) -> (tracing::Span, SpanContext) {
    let span = tracing::info_span!("test.root", name);
    let cx = span.context().span().span_context().clone();
    assert!(cx.is_valid());
    (span, cx)
}

fn handled_by<'a>(spans: &'a [SpanData], actor: &str) -> Vec<&'a SpanData> {
    spans
        .iter()
        .filter(|s| s.name == "nexus.actor.handle")
        .filter(|s| s.attributes.iter().any(|kv| kv.key.as_str() == "actor" && kv.value.as_str() == actor))
        .collect()
}

#[actix_rt::test]
async fn publish_trace_parents_the_receiving_actor_span_over_redis_and_kafka() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let redis = RedisServer::start(&tempdir("trace-redis"), false).unwrap();
    let tansu = Tansu::start(&tempdir("trace-tansu"), TansuStorage::Memory).unwrap();
    let kernel = Kernel::new("test");
    let arbiter = Arbiter::new();
    let redis_bridge = RedisBridge::spawn(&kernel, &arbiter.handle(), &redis.url()).unwrap();
    let config = KafkaConfig::new(tansu.brokers());
    let kafka_bridge = KafkaBridge::spawn(&kernel, &arbiter.handle(), config.clone()).await.unwrap();
    ensure_topics(&config, &["test.trace"]).await.unwrap();

    // Redis.
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    let collector = kernel.spawn("collector", move || Collector { events: e.clone() });
    redis_bridge
        .link::<Subscribe>("test")
        .ask(Subscribe { topic: Topic::Channel("nexus:trace".into()), subscriber: collector.link("redis-bridge") })
        .await
        .unwrap()
        .unwrap();
    eventually(10, "subscription live", || events.lock().unwrap().iter().any(|e| matches!(e, BusEvent::Up(_)))).await;
    let (redis_root, redis_cx) = root_span("redis");
    let envelope = redis_root.in_scope(|| Envelope::with_type("nexus.test.traced", "test", json!({ "seq": 0 })));
    assert!(envelope.traceparent.as_deref().is_some_and(|tp| tp.contains(&redis_cx.trace_id().to_string())));
    redis_bridge.publisher.publish("nexus:trace", envelope).await.unwrap();
    eventually(10, "traced redis message", || events.lock().unwrap().iter().any(|e| matches!(e, BusEvent::Message(_))))
        .await;

    // Kafka: the context travels in the traceparent header.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    let recorder = kernel.spawn("recorder", move || Recorder::new(s.clone()));
    let (kafka_root, kafka_cx) = root_span("kafka");
    let envelope = kafka_root.in_scope(|| Envelope::with_type("nexus.test.traced", "test", json!({ "seq": 1 })));
    let sent_traceparent = envelope.traceparent.clone();
    kafka_bridge
        .link::<Produce>("test")
        .ask(Produce { topic: "test.trace".into(), key: "ctx".into(), envelope })
        .await
        .unwrap()
        .unwrap();
    kafka_bridge
        .link::<Consume>("test")
        .ask(Consume {
            group: "g-trace".into(),
            topics: vec!["test.trace".into()],
            subscriber: recorder.link("kafka-bridge"),
        })
        .await
        .unwrap()
        .unwrap();
    eventually(60, "traced kafka record", || !seen.lock().unwrap().acked.is_empty()).await;
    assert_eq!(seen.lock().unwrap().trace[0], sent_traceparent);

    drop((redis_root, kafka_root));
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    for (actor, root) in [("collector", &redis_cx), ("recorder", &kafka_cx)] {
        let handled = handled_by(&spans, actor);
        assert!(
            handled.iter().any(|s| s.span_context.trace_id() == root.trace_id() && s.parent_span_id == root.span_id()),
            "no {actor} span is a child of the publishing span; {actor} spans: {handled:?}"
        );
    }
}
