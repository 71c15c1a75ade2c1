//! What the inbox knows of one owned partition: the offsets read and not
//! yet stored, the offset it takes next, and whether its fetch is paused.
//! Pure bookkeeping: the consumer calls are the inbox's and [`super::wake`]'s.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

/// How long a woken partition is fetched after its last record before it
/// is paused again: two of the broker's longest fetch waits and more, so a
/// command a hint announced is fetched before the partition sleeps.
pub const AWAKE: Duration = Duration::from_millis(300);

/// Offsets of one owned partition read and not yet stored.
pub(super) struct Pending {
    /// Offset → acknowledged.
    pub(super) offsets: BTreeMap<i64, bool>,
    /// The offset after the last one taken, by the fetch or the tap, once
    /// known. Every offset below it was taken (a tap only takes a
    /// partition's next offset), so a fetch that brings one again (a tapped
    /// command whose seek failed, a batch a broker sends again) is skipped.
    /// A partition's offsets only grow: a partition taken anew starts a
    /// new `Pending`.
    next: Option<i64>,
    /// An offset known to exist and not taken yet (the offset after it):
    /// from the broker's report of the end or from the tap, never from a
    /// hint, which anyone may forge. The partition is not paused before
    /// it is read that far: a slow fetch is not thrown away by a pause.
    want: Option<i64>,
    /// Whether the consumer's fetch of the partition is paused.
    paused: bool,
    /// When an awake partition may be paused, if no record comes first.
    awake_until: Instant,
}

impl Pending {
    /// A partition just taken: fetched, since where it starts is not known yet.
    pub(super) fn new(now: Instant) -> Self {
        Pending { offsets: BTreeMap::new(), next: None, want: None, paused: false, awake_until: now + AWAKE }
    }

    /// Notes that the consumer brought `offset`; false when it was taken already.
    pub(super) fn fetched(&mut self, offset: i64, now: Instant) -> bool {
        self.awake_until = now + AWAKE;
        if self.next.is_some_and(|next| offset < next) {
            return false;
        }
        self.next = Some(offset + 1);
        true
    }

    /// Takes `offset` from the tap if it is the partition's next one.
    pub(super) fn tap(&mut self, offset: i64) -> bool {
        if self.next != Some(offset) {
            return false;
        }
        self.next = Some(offset + 1);
        true
    }

    /// Whether a command at `offset` may not be taken yet: at or past the
    /// next offset, or anywhere while that is unknown.
    pub(super) fn behind(&self, offset: i64) -> bool {
        self.next.is_none_or(|next| offset >= next)
    }

    /// Whether a broker reporting `end` for the partition (the offset after
    /// its last record) holds a command not taken yet.
    pub(super) fn behind_end(&self, end: i64) -> bool {
        self.next.is_some_and(|next| end > next)
    }

    /// Notes that records exist up to `end` (the offset after them): the
    /// partition is fetched until it has read them.
    pub(super) fn expect(&mut self, end: i64) {
        self.want = self.want.max(Some(end));
    }

    /// Keeps the partition fetched for [`AWAKE`] from `now`; true when it
    /// was paused, so its fetch is to be resumed.
    pub(super) fn wake(&mut self, now: Instant) -> bool {
        self.awake_until = self.awake_until.max(now + AWAKE);
        std::mem::replace(&mut self.paused, false)
    }

    /// Marks it paused again: its fetch could not be resumed.
    pub(super) fn not_resumed(&mut self) {
        self.paused = true;
    }

    /// Gives an awake partition [`AWAKE`] more from `now`: the consumer
    /// went unread for a while, so no record coming says nothing.
    pub(super) fn stay_awake(&mut self, now: Instant) {
        if !self.paused {
            self.awake_until = self.awake_until.max(now + AWAKE);
        }
    }

    /// Pauses the partition if it has been fetched to its end for [`AWAKE`]
    /// (no record since), where it stands is known and no record known to
    /// exist is left to read; true when it is paused now, so its fetch is
    /// to be paused.
    pub(super) fn settle(&mut self, now: Instant) -> bool {
        let Some(next) = self.next else { return false };
        if self.paused || now < self.awake_until || self.want.is_some_and(|want| next < want) {
            return false;
        }
        self.paused = true;
        true
    }

    /// The offset it takes next, once known.
    pub(super) fn next(&self) -> Option<i64> {
        self.next
    }

    /// Whether its fetch is paused.
    pub(super) fn paused(&self) -> bool {
        self.paused
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::{Pending, AWAKE};

    #[test]
    fn the_tap_takes_only_a_partitions_next_offset_and_the_fetch_skips_what_it_took() {
        let mut p = Pending::new(Instant::now());
        assert!(!p.tap(5), "where the consumer starts is not known yet");
        assert!(p.fetched(5, Instant::now()));
        assert!(!p.tap(7), "6 is not read yet");
        assert!(p.tap(6));
        assert!(p.tap(7));
        assert!(!p.tap(7), "taken once");
        assert!(!p.fetched(6, Instant::now()), "the fetch of a tapped offset is skipped");
        assert!(!p.fetched(7, Instant::now()));
        assert!(p.fetched(8, Instant::now()), "an offset that was not tapped is taken from the fetch");
        assert!(!p.tap(8), "the fetch took it first");
        assert!(p.tap(9));
    }

    #[test]
    fn the_tap_keeps_taking_when_no_fetch_comes_between_and_nothing_is_taken_twice() {
        // The consumer is moved past each tapped command, so a long run of
        // them may see no fetch at all.
        let mut p = Pending::new(Instant::now());
        assert!(p.fetched(0, Instant::now()));
        let many = 10_000;
        assert!((1..=many).all(|o| p.tap(o)));
        assert!(!p.fetched(1, Instant::now()), "the oldest tapped command, brought back by a failed seek");
        assert!(!p.fetched(many, Instant::now()));
        assert!(!p.fetched(0, Instant::now()), "a batch sent again");
        assert!(p.tap(many + 1));
    }

    #[test]
    fn offsets_the_fetch_passes_over_are_not_waited_for() {
        let mut p = Pending::new(Instant::now());
        assert!(p.fetched(0, Instant::now()));
        assert!(p.tap(1) && p.tap(2));
        assert!(p.fetched(5, Instant::now()), "the log was cut under 3 and 4");
        assert!(!p.tap(4));
        assert!(p.tap(6));
    }

    #[test]
    fn a_partition_sleeps_only_once_read_to_its_end_and_wakes_for_what_may_wait() {
        let t0 = Instant::now();
        let mut p = Pending::new(t0);
        assert!(!p.settle(t0 + AWAKE * 10), "where it starts is not known: it keeps being fetched");
        assert!(p.behind(0), "anything may wait while the start is unknown");
        assert!(p.fetched(7, t0 + AWAKE));
        assert!(!p.settle(t0 + AWAKE + AWAKE / 2), "a record came less than AWAKE ago");
        assert!(p.settle(t0 + AWAKE * 2));
        assert!(p.paused() && !p.settle(t0 + AWAKE * 3), "paused once");
        assert!(!p.behind(7), "taken already: a hint for it wakes nothing");
        assert!(p.behind(8) && p.behind(100));
        assert!(!p.behind_end(8), "the end is right after the last record taken");
        assert!(p.behind_end(9));
        assert!(p.tap(8), "the tap still takes the next offset while paused");
        assert!(!p.behind_end(9));
        let t1 = t0 + AWAKE * 4;
        assert!(p.wake(t1), "paused: its fetch resumes");
        assert!(!p.wake(t1), "awake already");
        assert!(!p.settle(t1 + AWAKE - Duration::from_millis(1)));
        assert!(p.settle(t1 + AWAKE));
    }

    #[test]
    fn a_partition_with_records_known_to_wait_stays_awake_until_it_reads_them() {
        let t0 = Instant::now();
        let mut p = Pending::new(t0);
        assert!(p.fetched(3, t0));
        p.expect(7);
        assert!(!p.settle(t0 + AWAKE * 10), "4 to 6 are known to exist");
        assert!(p.fetched(5, t0 + AWAKE * 10));
        assert!(!p.settle(t0 + AWAKE * 20), "6 is still to come");
        assert!(p.tap(6));
        assert!(p.settle(t0 + AWAKE * 20));
        p.expect(2);
        assert!(p.wake(t0 + AWAKE * 21));
        assert!(p.settle(t0 + AWAKE * 22), "an end already read keeps nothing awake");
        p.stay_awake(t0 + AWAKE * 23);
        assert!(p.paused(), "a paused partition stays paused");
    }
}
