//! Supervision, bounded mailboxes and the mailbox graph.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Arbiter;
use nexus_actors::kernel::{AskError, Panicked, SendError};
use nexus_actors::telemetry::Metrics;
use nexus_actors::{Behaviour, Ctx, Handler, Kernel, Message, Reply};

/// Counts messages; panics on `Poison`.
struct Fragile {
    seen: u64,
}

impl Behaviour for Fragile {
    const KIND: &'static str = "fragile";
}

struct Work;
impl Message for Work {
    type Reply = u64;
}

struct Poison;
impl Message for Poison {
    type Reply = ();
}

impl Handler<Work> for Fragile {
    fn handle(&mut self, _: Work, _: &mut Ctx<Self>) -> Reply<u64> {
        self.seen += 1;
        Reply::Now(self.seen)
    }
}

impl Handler<Poison> for Fragile {
    fn handle(&mut self, _: Poison, _: &mut Ctx<Self>) -> Reply<()> {
        panic!("poison message");
    }
}

/// Another kind on the same arbiter, to show it is unaffected.
struct Steady {
    seen: u64,
}

impl Behaviour for Steady {
    const KIND: &'static str = "steady";
}

impl Handler<Work> for Steady {
    fn handle(&mut self, _: Work, _: &mut Ctx<Self>) -> Reply<u64> {
        self.seen += 1;
        Reply::Now(self.seen)
    }
}

#[actix_rt::test]
async fn panicking_handler_restarts_actor_and_others_keep_running() {
    let kernel = Kernel::new("test");
    let fragile = kernel.spawn("fragile-1", || Fragile { seen: 0 });
    let steady = kernel.spawn("steady-1", || Steady { seen: 0 });
    let to_fragile = fragile.link::<Work>("test");
    let poison = fragile.link::<Poison>("test");
    let to_steady = steady.link::<Work>("test");

    assert_eq!(to_fragile.ask(Work).await.unwrap(), 1);
    assert_eq!(to_fragile.ask(Work).await.unwrap(), 2);
    assert_eq!(to_steady.ask(Work).await.unwrap(), 1);

    assert!(matches!(poison.ask(Poison).await, Err(AskError::Panicked(Panicked))));

    // The next message is processed by a fresh instance of the behaviour.
    assert_eq!(to_fragile.ask(Work).await.unwrap(), 1);
    assert_eq!(to_steady.ask(Work).await.unwrap(), 2);
    assert!(fragile.is_alive());
    assert_eq!(fragile.cell().restart_count(), 1);
    assert_eq!(Metrics::counter_value(&kernel.metrics().actor_restarts, &["fragile"]), 1);
    assert_eq!(Metrics::counter_value(&kernel.metrics().actor_restarts, &["steady"]), 0);
    assert!(kernel.render_metrics().contains("nexus_actor_restarts_total{actor=\"fragile\"} 1"));

    // A second poison in a row backs off longer but still recovers.
    assert!(poison.ask(Poison).await.is_err());
    assert_eq!(to_fragile.ask(Work).await.unwrap(), 1);
    assert_eq!(fragile.cell().restart_count(), 2);
}

#[actix_rt::test]
async fn panicking_reply_future_is_reported_without_restart() {
    struct Lazy;
    impl Behaviour for Lazy {
        const KIND: &'static str = "lazy";
    }
    struct Later(bool);
    impl Message for Later {
        type Reply = &'static str;
    }
    impl Handler<Later> for Lazy {
        fn handle(&mut self, Later(explode): Later, _: &mut Ctx<Self>) -> Reply<&'static str> {
            Reply::later(async move {
                actix::clock::sleep(Duration::from_millis(5)).await;
                assert!(!explode, "reply future exploded");
                "done"
            })
        }
    }
    let kernel = Kernel::new("test");
    let lazy = kernel.spawn("lazy", || Lazy).link::<Later>("test");
    assert_eq!(lazy.ask(Later(false)).await.unwrap(), "done");
    assert!(matches!(lazy.ask(Later(true)).await, Err(AskError::Panicked(_))));
    assert_eq!(lazy.ask(Later(false)).await.unwrap(), "done");
    assert_eq!(Metrics::counter_value(&kernel.metrics().actor_panics, &["lazy"]), 1);
}

/// Blocks its thread on the first message until the test lets go.
struct Gate {
    gate: Arc<Mutex<Option<mpsc::Receiver<()>>>>,
    handled: Arc<Mutex<Vec<u32>>>,
}

impl Behaviour for Gate {
    const KIND: &'static str = "gate";
    const MAILBOX: usize = 8;
}

struct Item(u32);
impl Message for Item {
    type Reply = ();
}

impl Handler<Item> for Gate {
    fn handle(&mut self, Item(n): Item, _: &mut Ctx<Self>) -> Reply<()> {
        let gate = self.gate.lock().unwrap().take();
        if let Some(rx) = gate {
            let _ = rx.recv();
        }
        self.handled.lock().unwrap().push(n);
        Reply::Now(())
    }
}

#[test]
fn full_mailbox_refuses_hands_back_and_counts_and_keeps_what_it_accepted() {
    let system = actix_rt::System::new();
    let (release, gate) = mpsc::channel();
    let gate = Arc::new(Mutex::new(Some(gate)));
    let handled = Arc::new(Mutex::new(Vec::new()));
    let kernel = Kernel::new("test");
    let arbiter = Arbiter::new();
    let (g, h) = (gate.clone(), handled.clone());
    let actor = system.block_on(async {
        kernel.spawn_on(&arbiter.handle(), "gate-1", move || Gate { gate: g.clone(), handled: h.clone() })
    });
    let link = actor.link::<Item>("network");

    // The first item blocks the actor; wait until it is taken.
    link.try_tell(Item(0)).unwrap();
    while gate.lock().unwrap().is_some() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut accepted = vec![0];
    let mut refused = Vec::new();
    for n in 1..=100 {
        match link.try_tell(Item(n)) {
            Ok(()) => accepted.push(n),
            Err(SendError::Full(Item(back))) => refused.push(back),
            Err(SendError::Closed(_)) => panic!("actor closed"),
        }
    }
    // Capacity 8 (plus the one slot actix reserves per sender).
    assert!(accepted.len() <= 1 + 8 + 1, "accepted {}", accepted.len());
    assert!(accepted.len() > 8, "accepted {}", accepted.len());
    assert_eq!(accepted.len() + refused.len(), 101);
    assert_eq!(Metrics::counter_value(&kernel.metrics().mailbox_dropped, &["gate"]), refused.len() as u64);
    // Item 0 is being handled; the rest wait.
    assert_eq!(actor.cell().depth(), accepted.len() as u64 - 1);

    release.send(()).unwrap();
    system.block_on(async {
        for _ in 0..500 {
            if handled.lock().unwrap().len() == accepted.len() {
                break;
            }
            actix::clock::sleep(Duration::from_millis(5)).await;
        }
    });
    assert_eq!(*handled.lock().unwrap(), accepted, "every accepted message is handled, in order");
    assert_eq!(actor.cell().depth(), 0);
    arbiter.stop();
}

#[actix_rt::test]
async fn graph_shows_actors_edges_and_counts() {
    let kernel = Kernel::new("test");
    let a = kernel.spawn("steady-a", || Steady { seen: 0 });
    let b = kernel.spawn("steady-b", || Steady { seen: 0 });
    let from_x = a.link::<Work>("x");
    let from_y = a.link::<Work>("y");
    // An actor that sends as well as receives: its outgoing edge goes with it.
    let a_to_b = b.link::<Work>("steady-a");
    a_to_b.ask(Work).await.unwrap();
    for _ in 0..3 {
        from_x.ask(Work).await.unwrap();
    }
    from_y.tell(Work).unwrap();
    from_y.ask(Work).await.unwrap();

    let graph = kernel.graph().snapshot();
    let actor = graph.actors.iter().find(|v| v.id == "steady-a").expect("actor listed");
    assert_eq!(actor.kind, "steady");
    assert_eq!(actor.handled, 5);
    assert_eq!(actor.mailbox_depth, 0);
    let edge = |from: &str| graph.edges.iter().find(|e| e.from == from && e.to == "steady-a").map(|e| e.count);
    assert_eq!(edge("x"), Some(3));
    assert_eq!(edge("y"), Some(2));
    assert!(graph.edges.iter().any(|e| e.from == "steady-a" && e.to == "steady-b"));
    let json = serde_json::to_value(&graph).unwrap();
    assert_eq!(json["actors"][0]["id"], "steady-a");

    a.stop();
    for _ in 0..100 {
        if !a.is_alive() {
            break;
        }
        actix::clock::sleep(Duration::from_millis(5)).await;
    }
    let graph = kernel.graph().snapshot();
    assert!(graph.actors.iter().all(|v| v.id != "steady-a"), "stopped actors leave the graph");
    assert!(
        graph.edges.iter().all(|e| e.from != "steady-a" && e.to != "steady-a"),
        "and so do their edges, both ways: {:?}",
        graph.edges.iter().map(|e| (&e.from, &e.to)).collect::<Vec<_>>()
    );
    assert!(matches!(from_x.tell(Work), Err(SendError::Closed(Work))));
}
