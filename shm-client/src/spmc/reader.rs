//! A consumer's end of the bus.

use std::sync::Arc;

use super::layout::{
    self, cursor_word, is_attached, owner_word, Mapped, Policy, MAX_CONSUMERS, NO_EOF,
};
use super::mask::{TopicMask, TopicOutOfRange};
use super::monitor::release_slot;
use crate::doorbell::Bell;
use crate::event::{self, DecodeError, EventRef};
use crate::frame::{self, flags, FrameError, FrameHeader, Kind, Seq, FRAME_HEADER_LEN};
use crate::ring::scan::Found;
use crate::segment::OpenError;
use crate::segment::Region;
use crate::sync::{fence, Ordering};
use crate::wait::{Deadline, WaitStrategy};

/// Why a consumer could not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// Overwrite policy: the writer lapped this consumer. It has resumed at the head and
    /// skipped exactly `missed` frames. The next call returns the frame it resumed at.
    #[error("consumer overrun: {missed} frames missed")]
    Overrun {
        /// Frames skipped.
        missed: u64,
    },
    /// A bus frame failed validation (a bug or memory corruption: the writer validates).
    #[error("corrupt bus frame: {0}")]
    Corrupt(FrameError),
    /// The deadline passed with nothing to read.
    #[error("timed out waiting for the bus")]
    Timeout,
    /// The slot was released under us: the daemon declared this consumer dead, or evicted it
    /// (`aegis-shmctl session evict`). Every later read returns it too; the consumer never
    /// reads a frame of a later lap.
    #[error("this consumer was evicted: the daemon released its bus slot {0}")]
    Detached(usize),
}

/// Why attaching to the bus failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The segment could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Every slot is taken, or the requested one is.
    #[error("no free consumer slot ({0})")]
    NoSlot(String),
}

/// A frame handed to a consumer.
#[derive(Clone, Copy, Debug)]
pub struct BusFrame<'a> {
    /// The header: in bus memory (block policy), or the reader's validated copy (overwrite).
    /// A reference, not a copy: a 48-byte header moved by value through every layer between
    /// the ring and the consumer's loop cost three store-forwarding stalls per frame (wide
    /// loads over the narrower stores that had just written it), a third of a counting
    /// consumer's time. The same zero-copy caveat as `payload` applies.
    pub header: &'a FrameHeader,
    /// The payload: in bus memory (block policy) or in the consumer's scratch copy (overwrite).
    ///
    /// Zero-copy caveat (block policy): the bytes stay put while this consumer holds its slot.
    /// If the daemon releases the slot (a dead or evicted consumer) while the caller holds a
    /// frame, the writer may overwrite it under the caller; the next read then reports
    /// [`ReadError::Detached`]. A consumer that must never act on such a frame re-checks
    /// with [`BusReader::is_attached`] after using it.
    pub payload: &'a [u8],
    checked: bool,
}

impl<'a> BusFrame<'a> {
    /// The frame's kind.
    pub fn kind(&self) -> Kind {
        Kind::from_u8(self.header.kind).unwrap_or(Kind::Control)
    }
    /// Whether this is the END-OF-STREAM frame.
    pub fn is_eof(&self) -> bool {
        self.header.kind == Kind::Control as u8 && self.header.has(flags::EOF)
    }
    /// The event, read in place; validated unless the reader opted into the unchecked path.
    pub fn event(&self) -> Result<EventRef<'a>, DecodeError> {
        if self.checked {
            event::decode(self.kind(), self.payload)
        } else {
            // SAFETY: the consumer opted in with `BusReader::set_unchecked`, promising the bus
            // carries archives written by Aegis producers (and the sequencer validated every
            // frame header).
            unsafe { event::decode_unchecked(self.kind(), self.payload) }
        }
    }
}

/// Where a polled frame is.
#[derive(Clone, Copy)]
enum At {
    /// In the bus, its header at this data offset (block policy).
    InPlace(usize),
    /// Header in `BusReader::current`, payload in `BusReader::scratch` (overwrite policy).
    Scratch,
}

/// Frames between two stores of the consumer cursor.
const CURSOR_BATCH: u32 = 64;

/// A consumer's end of the bus.
pub struct BusReader {
    m: Mapped,
    policy: Policy,
    slot: usize,
    /// The slot's owner word (generation and attached bit) as we attached: the slot is ours
    /// while the word is unchanged.
    owner: u64,
    /// Next byte to read. Invariant: `published_cursor <= pos`.
    pos: u64,
    published_cursor: u64,
    unpublished: u32,
    cached_tail: u64,
    checked: bool,
    /// The slot's topic filter as loaded at the start of the current poll (the slot's word is
    /// the filter; this is the copy one poll works with).
    topics: TopicMask,
    /// Overwrite policy: the bus sequence expected next (from attach on: the bus sequence that
    /// went with the tail we started at).
    expected: Seq,
    /// Overwrite policy: lapped; the next frame tells how many were missed.
    lapped: bool,
    /// Overwrite policy: the frame in `current` and `scratch` is to be handed out on the next
    /// call (it followed an overrun report).
    pending: bool,
    /// Overwrite policy: the validated copy of the last frame's header.
    current: FrameHeader,
    scratch: Vec<u128>,
    read: u64,
}

// SAFETY: the reader is the only writer of its slot's cursor; moving it moves that role.
unsafe impl Send for BusReader {}

impl BusReader {
    /// Attaches to the bus in slot `slot` (as assigned by the daemon) or in the first free
    /// slot. Starts at the head: frames already published are not delivered.
    pub fn attach(
        region: Arc<dyn Region>,
        epoch: Option<u64>,
        slot: Option<usize>,
    ) -> Result<BusReader, AttachError> {
        let (m, policy) = layout::open(region, epoch)?;
        let ctrl = m.ctrl();
        let candidates: Vec<usize> = match slot {
            Some(s) if s < MAX_CONSUMERS => vec![s],
            Some(s) => return Err(AttachError::NoSlot(format!("slot {s} is out of range"))),
            None => (0..MAX_CONSUMERS).collect(),
        };
        let mut chosen = None;
        for i in candidates {
            let s = &ctrl.slots[i];
            // Nothing is stored into a slot before we own it: the cursor of a slot another
            // consumer holds must not be touched (it used to be reset to 0 here, and a caught-up
            // consumer never stores its cursor again, so a block-policy writer waited forever;
            // regression test: `regression_attach_does_not_clobber_an_attached_slot_cursor`).
            // Until we store our starting cursor below, its word carries another generation's
            // tag, and a writer that sees the slot attached holds (`BusWriter::min_cursor`).
            let cur = s.owner.load(Ordering::Relaxed);
            if is_attached(cur) {
                continue;
            }
            let mine = owner_word((cur >> 1) + 1);
            // AcqRel: pairs with the Release CAS of the previous release (`release_slot`) and
            // the Acquire load of `owner` in `BusWriter::min_cursor`.
            if s.owner
                .compare_exchange(cur, mine, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                chosen = Some((i, mine));
                break;
            }
        }
        let (slot_i, owner) = chosen.ok_or_else(|| {
            AttachError::NoSlot(match slot {
                Some(s) => format!("slot {s} is taken"),
                None => format!("all {MAX_CONSUMERS} slots are taken"),
            })
        })?;
        // SeqCst fence: pairs with the one in `BusWriter::min_cursor` (Dekker): either the
        // writer sees our slot attached, or we see every tail it published before its scan.
        fence(Ordering::SeqCst);
        // The tail and the bus sequence of the frame at it: a consumer lapped before its
        // first read still knows how many frames it missed.
        let (tail, seq) = ctrl.tail_and_seq();
        let s = &ctrl.slots[slot_i];
        s.pid.store(std::process::id(), Ordering::Relaxed);
        s.read.store(0, Ordering::Relaxed);
        s.overruns.store(0, Ordering::Relaxed);
        s.missed.store(0, Ordering::Relaxed);
        // Every topic until the consumer subscribes (Relaxed: see `mask.rs`).
        s.topics.store(TopicMask::ALL.0, Ordering::Relaxed);
        // Release: pairs with the Acquire load in `BusWriter::min_cursor`. A swap, not a plain
        // store: read-modify-writes of one word are totally ordered, so a stale consumer's CAS
        // (expecting its own generation's tag) either comes before this one and is overwritten,
        // or after and fails. (With a plain store, loom finds an execution where a CAS ordered
        // after it in execution wins in the modification order.)
        s.cursor.swap(cursor_word(tail, owner), Ordering::Release);
        let scratch_words = (m.ring.cap() as usize).div_ceil(16);
        Ok(BusReader {
            slot: slot_i,
            owner,
            pos: tail,
            published_cursor: tail,
            unpublished: 0,
            cached_tail: tail,
            checked: true,
            topics: TopicMask::ALL,
            expected: seq,
            lapped: false,
            pending: false,
            current: FrameHeader::default(),
            scratch: if policy == Policy::Overwrite {
                vec![0u128; scratch_words]
            } else {
                Vec::new()
            },
            read: 0,
            m,
            policy,
        })
    }

    /// The slot this reader holds.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// The bus policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Opt into reading payloads without bytecheck validation.
    ///
    /// # Safety
    /// Only sound if every producer of the session writes archives with this crate, since
    /// [`BusFrame::event`] then trusts the payload bytes.
    pub unsafe fn set_unchecked(&mut self) {
        self.checked = false;
    }

    /// Deliver only these topic ids (plus control frames); `None` delivers everything.
    /// Skipping a frame reads only its header. The filter is the slot's topic mask (see
    /// [`TopicMask`]), so the daemon sees it; it applies from the next poll on. Fails for an id
    /// of 64 or more (a session has at most 64 topics), leaving the filter as it was.
    pub fn subscribe(&mut self, topics: Option<&[u32]>) -> Result<(), TopicOutOfRange> {
        let mask = match topics {
            None => TopicMask::ALL,
            Some(ids) => TopicMask::from_ids(ids.iter().copied())?,
        };
        self.set_topics(mask);
        Ok(())
    }

    /// Stores `mask` as this consumer's topic filter (from the next poll on). Returns false,
    /// storing nothing, if the slot is no longer ours.
    pub fn set_topics(&self, mask: TopicMask) -> bool {
        store_topics(&self.m, self.slot, self.owner, mask)
    }

    /// The topic filter in the slot now.
    pub fn topics(&self) -> TopicMask {
        TopicMask(
            self.m.ctrl().slots[self.slot]
                .topics
                .load(Ordering::Relaxed),
        )
    }

    /// A handle on this consumer's topic filter for another thread of the process (the
    /// client library's reconciliation): it reads and repairs the slot's mask while the
    /// reader is in use. Maps the bus once more.
    pub fn topic_handle(&self) -> Result<SlotTopics, OpenError> {
        Ok(SlotTopics {
            m: layout::open(self.m.region(), None)?.0,
            slot: self.slot,
            owner: self.owner,
        })
    }

    #[inline]
    fn wanted(&self, h: &FrameHeader) -> bool {
        self.topics.wants(h)
    }

    /// Stores our cursor, by CAS from the word we stored last: a consumer whose slot was
    /// released (and maybe re-attached) fails, and never moves its successor's cursor.
    fn publish_cursor(&mut self) {
        if self.published_cursor != self.pos {
            let s = &self.m.ctrl().slots[self.slot];
            // Release: pairs with the Acquire load in `BusWriter::min_cursor`; we are done
            // reading the bytes below `pos` before the writer may reuse them.
            if s.cursor
                .compare_exchange(
                    cursor_word(self.published_cursor, self.owner),
                    cursor_word(self.pos, self.owner),
                    Ordering::Release,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                s.read.store(self.read, Ordering::Relaxed);
                self.published_cursor = self.pos;
            }
        }
        self.unpublished = 0;
    }

    /// Whether the slot is still ours: attached, and not released (and perhaps re-attached by
    /// another consumer) since. The daemon releases the slot of a consumer it declares dead
    /// or evicts.
    pub fn is_attached(&self) -> bool {
        self.m.ctrl().slots[self.slot].owner.load(Ordering::Relaxed) == self.owner
    }

    fn check_attached(&self) -> Result<(), ReadError> {
        // Acquire fence: pairs with the Release fence at the end of `BusWriter::min_cursor`:
        // if anything we read before this point was written by the writer after a scan that
        // saw our slot released, the load below sees that release (or a later owner word).
        fence(Ordering::Acquire);
        if !self.is_attached() {
            return Err(ReadError::Detached(self.slot));
        }
        Ok(())
    }

    /// Returns the next frame, or `None` if there is nothing new. The frame stays valid until
    /// the next call.
    #[inline]
    pub fn try_next(&mut self) -> Result<Option<BusFrame<'_>>, ReadError> {
        Ok(self.poll()?.map(|at| self.frame(at)))
    }

    /// Waits for the next frame with `wait` until `deadline`.
    pub fn next(
        &mut self,
        wait: &mut impl WaitStrategy,
        deadline: Deadline,
    ) -> Result<BusFrame<'_>, ReadError> {
        loop {
            if let Some(at) = self.poll()? {
                wait.reset();
                return Ok(self.frame(at));
            }
            if deadline.expired() {
                return Err(ReadError::Timeout);
            }
            self.check_attached()?;
            wait.wait_on(self, deadline);
        }
    }

    /// One wait of `wait` after a poll that found nothing (a caller's own loop around
    /// [`BusReader::try_next`]): a [`Park`](crate::wait::Park) strategy sleeps until the
    /// writer publishes, the consumer is released, or `deadline`.
    pub fn idle(&self, wait: &mut impl WaitStrategy, deadline: Deadline) {
        wait.wait_on(self, deadline);
    }

    #[inline]
    fn poll(&mut self) -> Result<Option<At>, ReadError> {
        // The filter for this poll: one load of our own slot's line (Relaxed: see `mask.rs`).
        self.topics = TopicMask(
            self.m.ctrl().slots[self.slot]
                .topics
                .load(Ordering::Relaxed),
        );
        let got = match self.policy {
            Policy::Block => self.poll_block()?,
            Policy::Overwrite => self.poll_overwrite()?,
        };
        if got.is_none() {
            // Nothing new: a released consumer learns it here too (one load of its own slot).
            self.check_attached()?;
        }
        Ok(got)
    }

    #[inline]
    fn frame(&self, at: At) -> BusFrame<'_> {
        let (header, ptr) = match at {
            // SAFETY: validated to lie inside the data area (header and payload); untouched
            // until our cursor moves past it, which happens on a later call (block policy).
            // The header is 16-aligned (a frame boundary) and every bit pattern is a value.
            At::InPlace(off) => unsafe {
                let h = self.m.ring.at(off);
                (
                    &*(h as *const FrameHeader),
                    h.add(FRAME_HEADER_LEN) as *const u8,
                )
            },
            At::Scratch => (&self.current, self.scratch.as_ptr() as *const u8),
        };
        BusFrame {
            header,
            // SAFETY: `ptr` holds `header.len` valid bytes (in the bus, or copied to scratch,
            // which holds `cap` bytes), 16-aligned.
            payload: unsafe { std::slice::from_raw_parts(ptr, header.len as usize) },
            checked: self.checked,
        }
    }

    /// Whether the reader has read everything published: then it publishes its cursor (so a
    /// writer blocked on it can go on) and reloads the tail; true if there still is nothing.
    #[inline]
    fn caught_up(&mut self) -> Result<bool, ReadError> {
        if self.pos != self.cached_tail {
            return Ok(false);
        }
        // Everything before `pos` is done with: release it before looking for more, so a
        // writer blocked on us can go on.
        self.publish_cursor();
        // Acquire (in `tail()`): pairs with the Release store in `BusWriter::publish`; the
        // frames below the tail are written before we read them.
        let tail = self.m.ctrl().tail();
        // Not trusted (issue 9, item 7): monotonic, a frame boundary, and (block policy, where
        // the writer waits for us) within a ring of our position. Under the overwrite policy
        // a tail more than a ring ahead is a lap.
        let bad = if tail < self.pos {
            Some("bus tail moved backwards")
        } else if !tail.is_multiple_of(crate::frame::FRAME_ALIGN as u64) {
            Some("bus tail is not 16-byte aligned")
        } else if self.policy == Policy::Block && tail - self.pos > self.m.ring.cap() {
            Some("bus tail is more than a ring ahead of this consumer")
        } else {
            None
        };
        if let Some(what) = bad {
            // A released consumer may see any tail: say it was evicted, not corrupt.
            self.check_attached()?;
            return Err(ReadError::Corrupt(FrameError::BadCursor(what)));
        }
        self.cached_tail = tail;
        Ok(self.pos == self.cached_tail)
    }

    /// Moves past a frame of `stride` bytes; whether the consumer wants it (counted if so).
    #[inline]
    fn advance(&mut self, h: &FrameHeader, stride: usize) -> bool {
        self.pos += stride as u64;
        self.unpublished += 1;
        let wanted = self.wanted(h);
        if wanted {
            self.read += 1;
        }
        wanted
    }

    #[inline]
    fn poll_block(&mut self) -> Result<Option<At>, ReadError> {
        if self.unpublished >= CURSOR_BATCH {
            self.publish_cursor();
        }
        loop {
            if self.caught_up()? {
                return Ok(None);
            }
            // SAFETY: the bytes from `pos` to the tail are published, and the writer does not
            // overwrite them before our cursor passes them (block policy) while the slot is
            // ours; if it was released, what we read is checked below before it is trusted.
            let found = unsafe { self.m.ring.scan(self.pos, self.cached_tail - self.pos) };
            // Evicted? Checked after reading the header and before trusting it: a consumer
            // whose slot was released may have been lapped, and must report that, never a
            // frame of a later lap (nor "corrupt"). Regression test:
            // `regression_released_block_reader_never_reads_a_later_lap`.
            self.check_attached()?;
            match found {
                Found::Padding { skip, .. } => self.pos += skip,
                Found::Short => {
                    return Err(ReadError::Corrupt(FrameError::BadCursor(
                        "tail inside a frame header",
                    )))
                }
                Found::Frame {
                    header,
                    off,
                    contiguous,
                } => {
                    let stride = header.validate(contiguous).map_err(ReadError::Corrupt)?;
                    if self.advance(&header, stride) {
                        return Ok(Some(At::InPlace(off)));
                    }
                }
            }
        }
    }

    #[inline(never)]
    fn poll_overwrite(&mut self) -> Result<Option<At>, ReadError> {
        if std::mem::take(&mut self.pending) {
            return Ok(Some(At::Scratch));
        }
        if self.unpublished >= CURSOR_BATCH {
            self.publish_cursor();
        }
        loop {
            if self.caught_up()? {
                return Ok(None);
            }
            if self.cached_tail - self.pos > self.m.ring.cap() {
                self.lap();
                continue;
            }
            // SAFETY: inside the data area. The writer may be overwriting these bytes right
            // now; the copy is validated by the seqlock check below before anything trusts it.
            let found = unsafe { self.m.ring.scan(self.pos, u64::MAX) };
            let copied = match found {
                Found::Frame {
                    header,
                    off,
                    contiguous,
                } => Some(header.validate(contiguous).map(|s| {
                    // SAFETY: `off + s <= cap`, and the payload's words (rounded up to 8
                    // bytes) lie within the frame's stride; scratch holds `cap` bytes,
                    // 16-aligned. The writer may be writing the source: copied by atomic
                    // words, checked by the seqlock below.
                    unsafe {
                        frame::copy_racy(
                            self.m.ring.at(off + FRAME_HEADER_LEN),
                            self.scratch.as_mut_ptr() as *mut u8,
                            header.len as usize,
                        )
                    };
                    (header, s)
                })),
                Found::Padding { .. } | Found::Short => None,
            };
            // Acquire fence: pairs with the Release fence after the `claim` store in
            // `BusWriter::try_write`; if the writer overwrote any byte we copied, we see its
            // claim reach past our frame.
            fence(Ordering::Acquire);
            let claim = self.m.ctrl().published.claim.load(Ordering::Relaxed);
            if claim > self.pos + self.m.ring.cap() {
                self.lap();
                continue;
            }
            if !self.is_attached() {
                return Err(ReadError::Detached(self.slot));
            }
            let (h, stride) = match (found, copied) {
                (Found::Padding { skip, .. }, _) => {
                    self.pos += skip;
                    continue;
                }
                (_, Some(Ok(frame))) => frame,
                (_, Some(Err(e))) => return Err(ReadError::Corrupt(e)),
                (_, None) => unreachable!("scanned with every byte readable"),
            };
            let missed = if self.lapped {
                h.bus_seq.saturating_sub(self.expected)
            } else {
                0
            };
            self.lapped = false;
            self.expected = h.bus_seq + 1;
            let wanted = self.advance(&h, stride);
            if missed > 0 {
                let s = &self.m.ctrl().slots[self.slot];
                s.overruns.fetch_add(1, Ordering::Relaxed);
                s.missed.fetch_add(missed, Ordering::Relaxed);
                if wanted {
                    self.current = h;
                    self.pending = true;
                }
                return Err(ReadError::Overrun { missed });
            }
            if wanted {
                self.current = h;
                return Ok(Some(At::Scratch));
            }
        }
    }

    /// Lapped: jump to the END-OF-STREAM frame if it is published (nothing is written after
    /// it, so it is still there), else to the head. The exact count is known when the frame
    /// there is read: its bus sequence minus the one we expected.
    fn lap(&mut self) {
        self.lapped = true;
        // The tail first (Acquire: pairs with the Release store in `BusWriter::publish`, which
        // comes after the store of `eof_end`): a tail past the EOF frame comes with its
        // position.
        self.cached_tail = self.m.ctrl().tail();
        let eof_end = self.m.ctrl().fixed.eof_end.load(Ordering::Relaxed);
        let eof = eof_end.wrapping_sub(frame::stride(0) as u64);
        self.pos = if eof_end != NO_EOF && eof >= self.pos && eof_end <= self.cached_tail {
            eof
        } else {
            self.cached_tail
        };
    }

    /// The bus position (bytes) of the next frame this consumer reads.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Frames delivered so far.
    pub fn delivered(&self) -> u64 {
        self.read
    }
}

impl Bell for BusReader {
    /// Sleeps on the bus's doorbell unless something was published past our position or the
    /// slot was released since.
    fn park(&self, timeout: std::time::Duration) {
        let ctrl = self.m.ctrl();
        ctrl.bell
            .park(|| ctrl.tail() != self.pos || !self.is_attached(), timeout);
    }
}

impl Drop for BusReader {
    fn drop(&mut self) {
        // Only free a slot that is still ours (a CAS against our owner word): a consumer
        // declared dead whose slot went to another consumer must not free its successor's.
        self.publish_cursor();
        release_slot(self.m.ctrl(), self.slot, Some(self.owner));
    }
}

/// Stores `mask` into slot `slot` if it is still held in owner word `owner` (see `mask.rs`,
/// "Ownership", for the window between the check and the store).
fn store_topics(m: &Mapped, slot: usize, owner: u64, mask: TopicMask) -> bool {
    let s = &m.ctrl().slots[slot];
    if s.owner.load(Ordering::Relaxed) != owner {
        return false;
    }
    // Relaxed: the mask guards no other data (`mask.rs`); the reader's next poll loads it.
    s.topics.store(mask.0, Ordering::Relaxed);
    true
}

/// Another thread's handle on a consumer's topic filter (from [`BusReader::topic_handle`]):
/// what the client library's reconciliation reads as the consumer's actual set and repairs.
pub struct SlotTopics {
    m: Mapped,
    slot: usize,
    owner: u64,
}

// SAFETY: the handle only loads and stores atomics of one slot of the control block; it
// never touches ring data.
unsafe impl Send for SlotTopics {}
// SAFETY: as above.
unsafe impl Sync for SlotTopics {}

impl SlotTopics {
    /// The slot's filter now; `None` if the slot is no longer the consumer's.
    pub fn get(&self) -> Option<TopicMask> {
        let s = &self.m.ctrl().slots[self.slot];
        let mask = TopicMask(s.topics.load(Ordering::Relaxed));
        (s.owner.load(Ordering::Relaxed) == self.owner).then_some(mask)
    }

    /// Stores `mask` as the consumer's filter (the reader applies it from its next poll).
    /// Returns false, storing nothing, if the slot is no longer the consumer's.
    pub fn set(&self, mask: TopicMask) -> bool {
        store_topics(&self.m, self.slot, self.owner, mask)
    }

    /// The slot.
    pub fn slot(&self) -> usize {
        self.slot
    }
}
