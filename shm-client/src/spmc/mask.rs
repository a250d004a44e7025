//! A consumer's topic filter, kept in its bus slot ([`super::Slot`]) so that the daemon can read
//! it (`aegis-shmctl subscriptions`) and the client library can compare it with the desired set
//! and repair it (the reconciliation loop, SPEC section 14).
//!
//! One word holds the whole filter: a session has at most `stats::MAX_SOURCES` (64) sources,
//! each with one topic, so topic ids are `0..64` and bit `t` of the word says whether topic id
//! `t` is delivered. Every change is one atomic store: there is no multi-word protocol, and a
//! reader never sees half of an update.
//!
//! ## Memory ordering
//! The word guards no other data: a reader loads it (Relaxed) once per poll and tests each
//! frame's header against it, and nothing else is read or written because of it. So Relaxed
//! suffices on both sides; coherence makes a store visible to the reader's next load of the
//! word, which is the reader's next poll ("changes within one poll").
//!
//! ## Ownership
//! The word belongs to the slot's current occupant. Writers other than the reader
//! ([`SlotTopics`], the reconciliation thread) check that the slot is still held in the owner
//! word they attached with before they store. The check and the store are two steps: a writer
//! whose slot is released (and handed to another consumer) between them overwrites its
//! successor's filter once. The successor's next reconciliation repairs that and counts it as
//! drift. (A 64-bit filter leaves no bits to tag the word with a generation, as the cursor
//! word is.)

use crate::frame::{FrameHeader, Kind};

/// Topic ids a mask can name: `0..MAX_TOPICS`.
pub const MAX_TOPICS: u32 = 64;
const _: () = assert!(crate::stats::MAX_SOURCES as u32 <= MAX_TOPICS);

/// A set of topic ids, as stored in a consumer's slot. [`TopicMask::ALL`] (every bit set)
/// delivers every topic.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct TopicMask(pub u64);

/// A topic id a [`TopicMask`] cannot hold (`>= MAX_TOPICS`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("topic id {0} is out of range (a session has at most {MAX_TOPICS} topics)")]
pub struct TopicOutOfRange(pub u32);

impl Default for TopicMask {
    /// [`TopicMask::ALL`]: what a consumer reads until it subscribes.
    fn default() -> TopicMask {
        TopicMask::ALL
    }
}

impl TopicMask {
    /// Every topic: what a consumer reads until it subscribes.
    pub const ALL: TopicMask = TopicMask(u64::MAX);
    /// No topic (control frames, END-OF-STREAM included, are still delivered).
    pub const NONE: TopicMask = TopicMask(0);

    /// The mask of these topic ids.
    pub fn from_ids(ids: impl IntoIterator<Item = u32>) -> Result<TopicMask, TopicOutOfRange> {
        let mut m = 0u64;
        for id in ids {
            if id >= MAX_TOPICS {
                return Err(TopicOutOfRange(id));
            }
            m |= 1 << id;
        }
        Ok(TopicMask(m))
    }

    /// Whether topic id `id` is delivered.
    #[inline]
    pub fn contains(self, id: u32) -> bool {
        self == TopicMask::ALL || (id < MAX_TOPICS && self.0 >> id & 1 != 0)
    }

    /// Whether a frame with header `h` is delivered: control frames always are.
    #[inline]
    pub(crate) fn wants(self, h: &FrameHeader) -> bool {
        self == TopicMask::ALL || h.kind == Kind::Control as u8 || self.contains(h.topic_id)
    }

    /// The topic ids in the mask, ascending.
    pub fn ids(self) -> impl Iterator<Item = u32> {
        (0..MAX_TOPICS).filter(move |&t| self.0 >> t & 1 != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_hold_ids_below_64() {
        let m = TopicMask::from_ids([0, 5, 63]).unwrap();
        assert!(m.contains(0) && m.contains(5) && m.contains(63));
        assert!(!m.contains(1) && !m.contains(64));
        assert_eq!(m.ids().collect::<Vec<_>>(), [0, 5, 63]);
        assert_eq!(TopicMask::from_ids([64]), Err(TopicOutOfRange(64)));
        assert!(TopicMask::ALL.contains(1000));
        assert!(!TopicMask::NONE.contains(0));
    }
}
