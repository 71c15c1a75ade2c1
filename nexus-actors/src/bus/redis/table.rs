//! The subscription table: which links follow which channel or pattern.
//! Shared by the bridge (which changes it) and its reader task (which
//! delivers through it); it does no I/O, the bridge tells Redis.

use std::collections::HashMap;
use std::sync::Arc;

use indexmap::IndexMap;

use super::Topic;
use crate::bus::{BusEvent, BusMessage};
use crate::kernel::{Link, SendError};

/// The links following one topic, by subscriber id: adding or removing
/// one costs the same with ten or ten thousand followers (thousands of
/// sessions on one document), and delivery walks them in a vector.
pub(super) type Followers = IndexMap<String, Link<BusEvent>>;

/// Who follows what, and the gauge that counts the topics.
pub(super) struct Table {
    pub(super) topics: HashMap<Topic, Followers>,
    gauge: prometheus::IntGauge,
    /// Subscribes the bridge sent and Redis has not confirmed yet, per
    /// topic: when Redis confirms an unsubscribe of a topic the table holds
    /// and none is pending, nothing will subscribe it again (see
    /// [`Table::dropped_while_followed`]). An entry lives while its command is in flight.
    subscribing: HashMap<Topic, u32>,
}

impl Table {
    pub(super) fn new(gauge: prometheus::IntGauge) -> Self {
        Table { topics: HashMap::new(), gauge, subscribing: HashMap::new() }
    }

    /// Notes a subscribe of `topic` handed to Redis.
    pub(super) fn subscribing(&mut self, topic: Topic) {
        *self.subscribing.entry(topic).or_default() += 1;
    }

    /// Notes a subscribe of `topic` confirmed by Redis, or failed. (Redis
    /// also confirms those a client makes again by itself after a
    /// reconnection: the count stops at zero.)
    pub(super) fn subscribed(&mut self, topic: &Topic) {
        let Some(pending) = self.subscribing.get_mut(topic) else { return };
        *pending -= 1;
        if *pending == 0 {
            self.subscribing.remove(topic);
        }
    }

    /// Forgets every subscribe in flight, once the commands that sent them
    /// were dropped unfinished (their confirmations may never come).
    pub(super) fn forget_subscribing(&mut self) {
        self.subscribing.clear();
    }

    /// Given that Redis just confirmed `topic` unsubscribed (the bridge's
    /// own unsubscribe, or Redis's: a slot that moved): whether the topic
    /// is still followed here with no subscribe on its way, so that it is
    /// not subscribed on Redis and nothing will subscribe it. Replies come
    /// in the order the commands went out, so a subscribe pending now went
    /// out after this unsubscribe and will undo it.
    pub(super) fn dropped_while_followed(&self, topic: &Topic) -> bool {
        self.topics.contains_key(topic) && !self.subscribing.contains_key(topic)
    }

    fn count(&self) {
        self.gauge.set(self.topics.len() as i64);
    }

    /// Adds (or replaces) `link` on `topic`.
    pub(super) fn add(&mut self, topic: Topic, link: Link<BusEvent>) {
        self.topics.entry(topic).or_default().insert(link.to().to_owned(), link);
        self.count();
    }

    /// Removes `subscriber` from `topic`; whether that dropped the topic.
    pub(super) fn remove(&mut self, topic: &Topic, subscriber: &str) -> bool {
        let Some(links) = self.topics.get_mut(topic) else { return false };
        links.swap_remove(subscriber);
        let emptied = links.is_empty();
        if emptied {
            self.topics.remove(topic);
            self.count();
        }
        emptied
    }

    /// Keeps, on every topic that `on` picks, the links for which `keep`
    /// holds; the topics left without any are dropped and returned.
    pub(super) fn retain_on(
        &mut self,
        on: impl Fn(&Topic) -> bool,
        mut keep: impl FnMut(&Link<BusEvent>) -> bool,
    ) -> Vec<Topic> {
        let mut emptied = Vec::new();
        self.topics.retain(|topic, links| {
            if !on(topic) {
                return true;
            }
            links.retain(|_, link| keep(link));
            if links.is_empty() {
                emptied.push(topic.clone());
            }
            !links.is_empty()
        });
        if !emptied.is_empty() {
            self.count();
        }
        emptied
    }

    /// Offers `event` to every live link of `topic`; true when the topic
    /// was dropped because all of them were closed.
    /// Every link gets the same shared message: fan-out copies a pointer,
    /// not the envelope.
    pub(super) fn offer(&mut self, topic: &Topic, event: &Arc<BusMessage>) -> bool {
        let Some(links) = self.topics.get_mut(topic) else { return false };
        links.retain(|_, link| match link.try_tell(BusEvent::Message(event.clone())) {
            Ok(()) | Err(SendError::Full(_)) => true,
            Err(SendError::Closed(_)) => false,
        });
        let emptied = links.is_empty();
        if emptied {
            self.topics.remove(topic);
            self.count();
        }
        emptied
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::envelope::Envelope;
    use crate::kernel::{Behaviour, Ctx, Handler, Kernel, Reply};

    struct Sink;
    impl Behaviour for Sink {
        const KIND: &'static str = "sink";
    }
    impl Handler<BusEvent> for Sink {
        fn handle(&mut self, _: BusEvent, _: &mut Ctx<Self>) -> Reply<()> {
            Reply::Now(())
        }
    }

    #[actix_rt::test]
    async fn the_table_drops_a_topic_with_its_last_link_and_counts_what_it_holds() {
        let kernel = Kernel::new("test");
        let gauge = kernel.metrics().redis_subscriptions.clone();
        let mut table = Table::new(gauge.clone());
        let (a, b) = (kernel.spawn("a", || Sink), kernel.spawn("b", || Sink));
        let doc = Topic::Channel("nexus:doc:1".into());
        let all = Topic::Pattern("nexus:doc:*".into());
        table.add(doc.clone(), a.link("redis-bridge"));
        table.add(doc.clone(), a.link("redis-bridge"));
        table.add(doc.clone(), b.link("redis-bridge"));
        table.add(all.clone(), b.link("redis-bridge"));
        assert_eq!((table.topics[&doc].len(), gauge.get()), (2, 2), "a subscriber counts once per topic");

        assert!(!table.remove(&doc, "a"), "b still follows it");
        assert!(!table.remove(&Topic::Channel("nexus:doc:2".into()), "a"), "nothing to drop");
        assert!(table.remove(&doc, "b"));
        assert_eq!(gauge.get(), 1);

        // A subscriber that stopped without unsubscribing goes with the
        // next delivery, and its topic with it.
        b.stop();
        for _ in 0..500 {
            if !b.is_alive() {
                break;
            }
            actix::clock::sleep(Duration::from_millis(10)).await;
        }
        let event = Arc::new(BusMessage {
            channel: "nexus:doc:1".into(),
            pattern: Some("nexus:doc:*".into()),
            envelope: ping(),
        });
        assert!(table.offer(&all, &event));
        assert_eq!((table.topics.len(), gauge.get()), (0, 0));
    }

    #[actix_rt::test]
    async fn thousands_of_followers_of_one_topic_are_added_and_removed_one_by_one() {
        let kernel = Kernel::new("test");
        let mut table = Table::new(prometheus::IntGauge::new("g", "g").unwrap());
        let doc = Topic::Shard("nexus:doc:{1}".into());
        let sessions: Vec<_> = (0..2_000).map(|i| kernel.spawn(format!("session/{i}"), || Sink)).collect();
        for session in &sessions {
            table.add(doc.clone(), session.link("redis-bridge"));
        }
        table.add(doc.clone(), sessions[7].link("redis-bridge"));
        assert_eq!(table.topics[&doc].len(), 2_000, "a follower added again is held once");
        assert!(!table.remove(&doc, "session/7"));
        assert!(!table.remove(&doc, "session/7"), "gone already");
        assert_eq!(table.topics[&doc].len(), 1_999);
        assert!(!table.topics[&doc].contains_key("session/7"));
        for i in (0..2_000).filter(|i| *i != 7) {
            assert_eq!(table.remove(&doc, &format!("session/{i}")), i == 1_999, "the last one drops the topic");
        }
        assert!(table.topics.is_empty());
    }

    #[actix_rt::test]
    async fn an_unsubscribe_drops_a_followed_topic_unless_a_subscribe_comes_after_it() {
        let kernel = Kernel::new("test");
        let mut table = Table::new(prometheus::IntGauge::new("g", "g").unwrap());
        let topic = Topic::Shard("nexus:doc:{1}".into());
        assert!(!table.dropped_while_followed(&topic), "not followed");
        table.add(topic.clone(), kernel.spawn("a", || Sink).link("redis-bridge"));
        assert!(table.dropped_while_followed(&topic), "followed, and nothing subscribes it again");
        table.subscribing(topic.clone());
        table.subscribing(topic.clone());
        assert!(!table.dropped_while_followed(&topic), "a subscribe went out after it");
        table.subscribed(&topic);
        assert!(!table.dropped_while_followed(&topic), "one is still on its way");
        table.subscribed(&topic);
        table.subscribed(&topic);
        assert!(table.dropped_while_followed(&topic), "both confirmed (and one more from a reconnection)");
    }

    fn ping() -> Envelope {
        Envelope::with_type("nexus.test.ping", "test", serde_json::json!({}))
    }
}
