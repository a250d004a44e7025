//! Edge cases of the SPSC source ring and the broadcast bus, through the public API only.
//!
//! - SPSC wrap-around at every 16-byte offset of 256, 512 and 4096-byte rings, for payloads
//!   from 1 byte up to the largest frame the ring takes (half the ring: `capacity / 2 - 48`):
//!   exact bytes, header fields, explicit PADDING frames and the implicit skip (fewer than 48
//!   bytes before the end), zeroed alignment padding, and that nothing else is written.
//! - Capacity edges: exactly full, the largest frames filling the ring, too large (including a
//!   frame of the whole ring), refused capacities, batched commits.
//! - Every [`OpenError`], on heap regions and on real `/dev/shm` files.
//! - The ring reader's checks of untrusted memory: corrupt headers and cursors are errors,
//!   never panics (plus a small deterministic fuzz).
//! - Bus `Block` policy (nothing lost, consumers hold the writer back until they detach or
//!   are released, topic filters) and `Overwrite` policy (exact `Overrun { missed }` counts).
//!
//! Cursors and header fields are poked in place to build states the API cannot reach (the
//! control-block offsets of the ring cursors and the bus policy are found by observation, not
//! hard-coded). Single-threaded except for two short threaded soak tests; nothing asserts on
//! timing.
#![cfg(not(loom))]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use aegis_shm_client::event::{Decimal, Event, Kline, Symbol, Trade};
use aegis_shm_client::frame::{
    flags, stride, FrameError, FrameHeader, Kind, FRAME_HEADER_LEN, MAX_PAYLOAD_LEN,
};
use aegis_shm_client::segment::{
    self, CreateError, HeapRegion, OpenError, Region, SegmentHeader, ShmRegion, HEADER_LEN,
    INIT_READY, LAYOUT_VERSION, SEGMENT_MAGIC,
};
use aegis_shm_client::spmc::{
    self, AttachError, BusMonitor, BusReader, BusWriter, Policy, ReadError, TopicMask,
    TopicOutOfRange, WriteError, MAX_CONSUMERS,
};
use aegis_shm_client::spsc::{self, ClaimError, Producer, PushError, RingReader};
use aegis_shm_client::wait::{Backoff, BusySpin, Deadline};

const EPOCH: u64 = 0xAE61_5000_0000_0001;
const SRC: u16 = 7;

/// The largest payload a ring or bus of `cap` bytes takes: a frame may fill at most half of
/// it (so that it always fits after the padding of a wrap: see
/// `regression_large_frames_never_livelock_an_empty_ring`).
fn max_payload(cap: usize) -> usize {
    cap / 2 - FRAME_HEADER_LEN
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `len` non-zero bytes derived from `seed` (non-zero so they cannot pass for zero padding).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(seed ^ 0x5151);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&(r.next() | 0x0101_0101_0101_0101).to_le_bytes());
    }
    v.truncate(len);
    v
}

fn atomic_u64(region: &dyn Region, off: usize) -> &AtomicU64 {
    assert!(off.is_multiple_of(8) && off + 8 <= region.len());
    // SAFETY: in bounds and 8-aligned (regions are 128-aligned); the ring code accesses these
    // words as atomics too.
    unsafe { &*(region.as_ptr().add(off) as *const AtomicU64) }
}

fn atomic_u32(region: &dyn Region, off: usize) -> &AtomicU32 {
    assert!(off.is_multiple_of(4) && off + 4 <= region.len());
    // SAFETY: as above.
    unsafe { &*(region.as_ptr().add(off) as *const AtomicU32) }
}

fn copy_out(region: &dyn Region, off: usize, len: usize) -> Vec<u8> {
    assert!(off + len <= region.len());
    let mut v = vec![0u8; len];
    // SAFETY: in bounds; the tests are single-threaded wherever they look at raw memory.
    unsafe { std::ptr::copy_nonoverlapping(region.as_ptr().add(off), v.as_mut_ptr(), len) };
    v
}

fn copy_in(region: &dyn Region, off: usize, bytes: &[u8]) {
    assert!(off + bytes.len() <= region.len());
    // SAFETY: as above.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), region.as_ptr().add(off), bytes.len()) };
}

fn header_ptr(region: &dyn Region) -> *mut SegmentHeader {
    region.as_ptr() as *mut SegmentHeader
}

fn trade(id: u64) -> Trade {
    Trade {
        symbol: Symbol::new("BTCUSDT").unwrap(),
        id,
        price: Decimal::parse("63201.05").unwrap(),
        qty: Decimal {
            mantissa: id as i64 + 1,
            scale: 3,
        },
        buyer_maker: id.is_multiple_of(2),
    }
}

fn kline(id: u64) -> Kline {
    let d = Decimal::parse("1.5").unwrap();
    Kline {
        symbol: Symbol::new("BTCUSDT").unwrap(),
        interval: Symbol::new("1m").unwrap(),
        open_time: id,
        close_time: id + 59_999,
        open: d,
        high: d,
        low: d,
        close: d,
        volume: d,
        quote_volume: d,
        trades: id,
        taker_buy_base: d,
        taker_buy_quote: d,
    }
}

fn event_header(ts: u64, topic: u32) -> FrameHeader {
    FrameHeader::event(Kind::Trade, ts, topic, 0)
}

fn heartbeat_header(ts: u64) -> FrameHeader {
    FrameHeader {
        kind: Kind::Control as u8,
        flags: flags::HEARTBEAT,
        ts,
        ..FrameHeader::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Ring fixture
// ---------------------------------------------------------------------------------------------

/// Where the ring's `tail` and `head` cursors sit in the segment (found by observation).
#[derive(Copy, Clone, Debug)]
struct RingLayout {
    tail: usize,
    head: usize,
}

fn ring_layout() -> RingLayout {
    static LAYOUT: OnceLock<RingLayout> = OnceLock::new();
    *LAYOUT.get_or_init(|| {
        let cap = 256;
        let region = Arc::new(HeapRegion::new(spsc::region_len(cap)));
        let mut tx = Producer::create(region.clone(), cap, EPOCH, SRC).unwrap();
        let mut rx = RingReader::open(region.clone(), Some(EPOCH)).unwrap();
        tx.try_push_frame(&event_header(1, 0), &[1; 16]).unwrap(); // stride 64
        tx.try_push_frame(&event_header(2, 0), &[2; 32]).unwrap(); // stride 80
        assert!(rx.peek().unwrap().is_some());
        rx.consume();
        rx.release();
        let data = spsc::geometry(cap).data_offset;
        let find = |v: u64| {
            let hits: Vec<usize> = (HEADER_LEN..data)
                .step_by(8)
                .filter(|&o| atomic_u64(&*region, o).load(Ordering::SeqCst) == v)
                .collect();
            assert_eq!(hits.len(), 1, "cursor value {v} found at {hits:?}");
            hits[0]
        };
        RingLayout {
            tail: find(144),
            head: find(64),
        }
    })
}

/// A heap-backed source ring with raw access to its memory.
struct Ring {
    region: Arc<HeapRegion>,
    cap: usize,
    data: usize,
}

impl Ring {
    fn new(cap: usize) -> Ring {
        let region = Arc::new(HeapRegion::new(spsc::region_len(cap)));
        spsc::init_region(&*region, cap, EPOCH).unwrap();
        Ring {
            region,
            cap,
            data: spsc::geometry(cap).data_offset,
        }
    }

    /// A ring whose cursors both stand at `pos` (empty, as if `pos` bytes had gone through).
    fn at(cap: usize, pos: u64) -> Ring {
        let r = Ring::new(cap);
        r.set_tail(pos);
        r.set_head(pos);
        r
    }

    fn dyn_region(&self) -> Arc<dyn Region> {
        self.region.clone()
    }

    fn producer(&self) -> Producer {
        let mut p = Producer::open(self.dyn_region(), Some(EPOCH), SRC).unwrap();
        p.set_stamp(false);
        p
    }

    fn reader(&self) -> RingReader {
        RingReader::open(self.dyn_region(), Some(EPOCH)).unwrap()
    }

    fn tail(&self) -> u64 {
        atomic_u64(&*self.region, ring_layout().tail).load(Ordering::SeqCst)
    }
    fn head(&self) -> u64 {
        atomic_u64(&*self.region, ring_layout().head).load(Ordering::SeqCst)
    }
    fn set_tail(&self, v: u64) {
        atomic_u64(&*self.region, ring_layout().tail).store(v, Ordering::SeqCst)
    }
    fn set_head(&self, v: u64) {
        atomic_u64(&*self.region, ring_layout().head).store(v, Ordering::SeqCst)
    }

    fn data_ptr(&self) -> usize {
        self.region.as_ptr() as usize + self.data
    }
    fn data_bytes(&self) -> Vec<u8> {
        copy_out(&*self.region, self.data, self.cap)
    }
    fn fill_data(&self, byte: u8) {
        copy_in(&*self.region, self.data, &vec![byte; self.cap]);
    }
    fn header_at(&self, off: usize) -> FrameHeader {
        let b = copy_out(&*self.region, self.data + off, FRAME_HEADER_LEN);
        FrameHeader::from_bytes(b.as_slice().try_into().unwrap())
    }
    fn put_header(&self, off: usize, h: &FrameHeader) {
        copy_in(&*self.region, self.data + off, &h.to_bytes());
    }
}

fn ring_open_err(region: Arc<dyn Region>, epoch: Option<u64>) -> OpenError {
    match RingReader::open(region, epoch) {
        Ok(_) => panic!("the ring opened"),
        Err(e) => e,
    }
}

fn producer_open_err(region: Arc<dyn Region>, epoch: Option<u64>) -> OpenError {
    match Producer::open(region, epoch, SRC) {
        Ok(_) => panic!("the producer opened"),
        Err(e) => e,
    }
}

fn bus_open_err(region: Arc<dyn Region>, epoch: Option<u64>) -> OpenError {
    match BusReader::attach(region.clone(), epoch, None) {
        Ok(_) => panic!("the bus reader attached"),
        Err(AttachError::Open(e)) => {
            match BusWriter::open(region.clone(), epoch) {
                Ok(_) => panic!("the bus writer opened"),
                Err(w) => assert_eq!(w, e, "writer and reader disagree"),
            }
            match BusMonitor::open(region, epoch) {
                Ok(_) => panic!("the bus monitor opened"),
                Err(m) => assert_eq!(m, e, "monitor and reader disagree"),
            }
            e
        }
        Err(e) => panic!("unexpected attach error {e:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// SPSC: wrap-around at every offset
// ---------------------------------------------------------------------------------------------

/// Pushes one Trade frame with a `len`-byte payload into an empty ring whose cursors stand at
/// `pos`, checks every byte the producer writes (and, with `untouched`, that it writes nothing
/// else), then reads it back in place. Returns the position after the frame.
fn push_and_check(
    ring: &Ring,
    tx: &mut Producer,
    rx: &mut RingReader,
    pos: u64,
    len: usize,
    seq: u64,
    untouched: bool,
) -> u64 {
    let cap = ring.cap;
    let k = (pos % cap as u64) as usize;
    let contiguous = cap - k;
    let s = stride(len);
    let wraps = s > contiguous;
    let ctx = format!("cap {cap} pos {pos} (offset {k}) len {len} stride {s}");
    // In an empty ring a frame must go in at once, wrap included: the padding and the frame
    // together never need more than the ring (frames take at most half of it).
    assert!(
        !wraps || contiguous + s <= cap,
        "{ctx}: a frame that could never fit"
    );
    assert_eq!(ring.tail(), pos, "{ctx}");
    assert_eq!(ring.head(), pos, "{ctx}");

    let header = FrameHeader {
        len: 0,
        kind: Kind::Trade as u8,
        flags: flags::LATE,
        source_id: 0,
        topic_id: 0xC0DE + len as u32,
        reserved: 0,
        ts: 1_000 + seq,
        source_seq: 0,
        bus_seq: 0,
        publish_ns: 0x5EED,
    };
    let payload = pattern(seq * 100_003 + len as u64 * 7 + k as u64, len);
    let before = if untouched {
        ring.data_bytes()
    } else {
        Vec::new()
    };

    let r = tx.try_push_frame(&header, &payload);
    assert_eq!(r, Ok(seq), "{ctx}");

    let fpos = if wraps { pos + contiguous as u64 } else { pos };
    let foff = (fpos % cap as u64) as usize;
    assert_eq!(
        ring.tail(),
        fpos + s as u64,
        "{ctx}: batch of 1 publishes at once"
    );

    let after = ring.data_bytes();
    // Byte ranges the producer may have written.
    let mut written: Vec<(usize, usize)> = Vec::new();
    if wraps && contiguous >= FRAME_HEADER_LEN {
        assert_eq!(
            ring.header_at(k),
            FrameHeader::padding(contiguous),
            "{ctx}: explicit padding frame"
        );
        written.push((k, k + FRAME_HEADER_LEN));
    }
    let expect = FrameHeader {
        len: len as u32,
        source_id: SRC,
        source_seq: seq,
        ..header
    };
    assert_eq!(
        ring.header_at(foff),
        expect,
        "{ctx}: frame header in memory"
    );
    assert_eq!(
        &after[foff + FRAME_HEADER_LEN..foff + FRAME_HEADER_LEN + len],
        &payload[..],
        "{ctx}: payload bytes"
    );
    assert!(
        after[foff + FRAME_HEADER_LEN + len..foff + s]
            .iter()
            .all(|&b| b == 0),
        "{ctx}: alignment padding after the payload must be zero"
    );
    written.push((foff, foff + s));
    if untouched {
        written.sort_unstable();
        let mut at = 0;
        for &(a, b) in written.iter().chain([(cap, cap)].iter()) {
            if a > at {
                assert!(
                    after[at..a] == before[at..a],
                    "{ctx}: bytes {at}..{a} outside the frame written"
                );
            }
            at = at.max(b);
        }
    }

    {
        let f = rx
            .peek()
            .unwrap()
            .unwrap_or_else(|| panic!("{ctx}: no frame"));
        assert_eq!(f.header, expect, "{ctx}");
        assert_eq!(f.kind(), Kind::Trade);
        assert_eq!(f.payload, &payload[..], "{ctx}");
        assert_eq!(
            f.payload.as_ptr() as usize,
            ring.data_ptr() + foff + FRAME_HEADER_LEN,
            "{ctx}: read in place"
        );
    }
    assert_eq!(rx.peek_header().unwrap(), Some(expect), "{ctx}");
    assert_eq!(rx.backlog(), s as u64, "{ctx}");
    rx.consume();
    assert!(rx.peek().unwrap().is_none(), "{ctx}");
    rx.release();
    assert_eq!(ring.head(), fpos + s as u64, "{ctx}: released");
    fpos + s as u64
}

/// Payload lengths to try for a ring: all of them up to 512-byte rings; for larger rings the
/// small ones, every 73rd, the ones around a quarter of the ring and the largest ones.
fn wrap_lens(cap: usize) -> Vec<usize> {
    let max = max_payload(cap);
    if cap <= 512 {
        return (1..=max).collect();
    }
    let mut v: Vec<usize> = (1..=33).collect();
    v.extend([47, 48, 49, 63, 64, 65]);
    v.extend((66..max).step_by(73));
    v.extend((cap / 4 - 64..=cap / 4 + 16).step_by(3));
    v.extend(max - 17..=max);
    v.sort_unstable();
    v.dedup();
    v
}

#[test]
fn spsc_wrap_at_every_offset_cursor_placed() {
    for cap in [256usize, 512, 4096] {
        for len in wrap_lens(cap) {
            for k in (0..cap).step_by(16) {
                // Positions far into the stream as well as early ones.
                let base = if len % 2 == 0 {
                    3 * cap as u64
                } else {
                    (1u64 << 40) + cap as u64
                };
                let ring = Ring::at(cap, base + k as u64);
                ring.fill_data(0xAB); // stale bytes of an earlier lap
                let mut tx = ring.producer();
                let mut rx = ring.reader();
                let p = push_and_check(&ring, &mut tx, &mut rx, base + k as u64, len, 0, true);
                // And the ring goes on after it.
                let p = push_and_check(&ring, &mut tx, &mut rx, p, len % 40 + 1, 1, false);
                push_and_check(
                    &ring,
                    &mut tx,
                    &mut rx,
                    p,
                    max_payload(cap) - len + 1,
                    2,
                    false,
                );
            }
        }
    }
}

/// Moves a fresh ring to offset `k` with real traffic: one or two frames of strides adding up
/// to `k` (a heartbeat for a 48-byte stride, an event otherwise), pushed, read and released.
/// Offsets 16 and 32 cannot be reached this way (a frame is at least 48 bytes and never
/// straddles the end), hence the cursor-placing variant above.
fn advance_naturally(tx: &mut Producer, rx: &mut RingReader, cap: usize, k: usize) {
    let parts = if k == 0 {
        vec![]
    } else if k <= cap / 2 {
        vec![k]
    } else {
        let a = (k / 2) & !15;
        vec![a, k - a]
    };
    for part in parts {
        assert!((FRAME_HEADER_LEN..=cap / 2).contains(&part));
        if part == FRAME_HEADER_LEN {
            tx.try_push_frame(&heartbeat_header(1), &[]).unwrap();
        } else {
            tx.try_push_frame(&event_header(1, 1), &vec![0x5A; part - FRAME_HEADER_LEN])
                .unwrap();
        }
        assert!(rx.peek().unwrap().is_some());
        rx.consume();
        rx.release();
    }
}

#[test]
fn spsc_wrap_at_every_offset_after_real_traffic() {
    for cap in [256usize, 512, 4096] {
        let lens = wrap_lens(cap);
        for k in (0..cap).step_by(16).filter(|&k| k == 0 || k >= 48) {
            // A 4096-byte ring: every 4th length is enough here (the placed-cursor test covers
            // them all).
            for (i, &len) in lens.iter().enumerate() {
                if cap > 512 && i % 4 != 0 && len != max_payload(cap) {
                    continue;
                }
                let ring = Ring::new(cap);
                ring.fill_data(0xC3);
                let mut tx = ring.producer();
                let mut rx = ring.reader();
                advance_naturally(&mut tx, &mut rx, cap, k);
                let seq = tx.next_seq();
                let p = push_and_check(&ring, &mut tx, &mut rx, k as u64, len, seq, k == 0);
                push_and_check(&ring, &mut tx, &mut rx, p, 1 + len % 23, seq + 1, false);
            }
        }
    }
}

/// Found by `spsc_wrap_at_every_offset_*` while frames could fill the whole ring: a frame
/// longer than both the space left before the end of the ring and the offset it wraps from
/// needed `contiguous + stride > capacity` bytes at once, so `try_push` returned `Full`
/// forever, even on an empty ring (a Kline, 240-byte stride, after a Trade on a 256-byte
/// ring). Fixed by refusing frames over half the ring: padding and frame then always fit an
/// empty ring. The Kline comes back in `PushError::TooLarge`; on a 512-byte ring it goes in at
/// once at every offset.
#[test]
fn regression_large_frames_never_livelock_an_empty_ring() {
    let ring = Ring::new(256);
    let mut tx = ring.producer();
    assert_eq!(stride(Kline::ARCHIVED_LEN), 240);
    tx.try_push(1, 0, trade(1)).unwrap();
    match tx.try_push(2, 0, kline(2)) {
        Err(PushError::TooLarge {
            value,
            stride,
            capacity,
        }) => {
            assert_eq!(value, kline(2));
            assert_eq!((stride, capacity), (240, 256));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(tx.next_seq(), 1);
    for k in (0..512).step_by(16) {
        let ring = Ring::at(512, 512 * 3 + k);
        let mut tx = ring.producer();
        let mut rx = ring.reader();
        assert_eq!(tx.try_push(2, 0, kline(2)), Ok(0), "offset {k}");
        let f = rx.peek().unwrap().unwrap();
        assert_eq!(f.kind(), Kind::Kline);
        match aegis_shm_client::event::decode(f.kind(), f.payload).unwrap() {
            aegis_shm_client::event::EventRef::Kline(k) => assert_eq!(k.trades, 2),
            other => panic!("{other:?}"),
        }
    }
}

/// Found with the sequencer's release pattern (release only after moving frames to the bus):
/// a reader that consumed control frames and then found the ring drained never released them,
/// so a producer sending nothing but heartbeats waited for room forever. A drained `peek` now
/// releases.
#[test]
fn regression_drained_reader_releases_consumed_frames() {
    let ring = Ring::new(256);
    let mut tx = ring.producer();
    let mut rx = ring.reader();
    for round in 0..20u64 {
        let mut sent = 0;
        while tx.try_push_frame(&heartbeat_header(round), &[]).is_ok() {
            sent += 1;
        }
        assert!(sent > 0, "round {round}: no room, nothing was released");
        let mut got = 0;
        while let Some(h) = rx.peek_header().unwrap() {
            assert!(h.has(flags::HEARTBEAT));
            assert_eq!(h.ts, round);
            rx.consume();
            got += 1;
        }
        assert_eq!(got, sent);
        assert_eq!(ring.head(), ring.tail(), "a drained peek releases");
    }
}

/// `RingReader::header_at` (the sequencer's look-ahead) took any position: a misaligned one
/// read a header through a misaligned pointer, one past the published data underflowed (a
/// debug-build panic) or read bytes the producer may be writing.
#[test]
fn regression_header_at_refuses_bad_positions() {
    let ring = Ring::at(256, 256 * 7);
    let mut tx = ring.producer();
    let mut rx = ring.reader();
    for i in 0..3u8 {
        tx.try_push_frame(&event_header(i as u64, 0), &[i + 1; 16])
            .unwrap();
    }
    let head = 256 * 7;
    assert!(rx.peek().unwrap().is_some());
    assert_eq!(rx.peeked_end(), Some(head + 64));
    // Walking the published frames.
    let (h, next) = rx.header_at(head + 64).unwrap().unwrap();
    assert_eq!((h.ts, next), (1, head + 128));
    let (h, next) = rx.header_at(next).unwrap().unwrap();
    assert_eq!((h.ts, next), (2, head + 192));
    assert_eq!(rx.header_at(next).unwrap(), None);
    // Bad positions are errors, never panics or stray reads.
    for pos in [
        head + 1,
        head + 8,
        head + 68,
        head - 64,
        0,
        head + 256,
        head + 192 + 16,
        u64::MAX,
        u64::MAX - 15,
    ] {
        assert!(
            matches!(rx.header_at(pos), Err(FrameError::BadCursor(_))),
            "{pos}"
        );
    }
    // The reader is unharmed.
    assert_eq!(rx.peek().unwrap().unwrap().payload, &[1; 16]);
}

/// Found by the wrap tests: the bytes between the end of the payload and the next 16-byte
/// boundary were left as an earlier lap wrote them, though the frame format promises zeros.
#[test]
fn regression_alignment_padding_is_zeroed() {
    let ring = Ring::new(256);
    ring.fill_data(0xFF);
    let mut tx = ring.producer();
    // A payload of 1 byte leaves 15 bytes of alignment padding; a claim committed shorter
    // than claimed too.
    tx.try_push_frame(&event_header(1, 0), &[7]).unwrap();
    let mut c = tx.try_claim(40).unwrap();
    c.payload_mut()[..3].copy_from_slice(&[1, 2, 3]);
    c.commit(FrameHeader::event(Kind::Trade, 2, 0, 3));
    let d = ring.data_bytes();
    assert_eq!(d[48], 7);
    assert!(d[49..64].iter().all(|&b| b == 0), "{:?}", &d[49..64]);
    assert_eq!(&d[64 + 48..64 + 51], &[1, 2, 3]);
    assert!(d[64 + 51..64 + 64].iter().all(|&b| b == 0));
    // Past the committed stride nothing is touched.
    assert!(d[128..].iter().all(|&b| b == 0xFF));
    assert_eq!(ring.tail(), 128);

    // The bus writer, under both policies.
    for policy in [Policy::Block, Policy::Overwrite] {
        let (region, mut w) = new_bus(256, policy);
        let data = spmc::geometry(256).data_offset;
        copy_in(&*region, data, &[0xFF; 256]);
        wr(&mut w, 0, 1).unwrap();
        wr(&mut w, 1, 17).unwrap();
        let d = copy_out(&*region, data, 256);
        assert!(d[49..64].iter().all(|&b| b == 0), "{policy:?}");
        assert!(
            d[64 + 48 + 17..64 + 80].iter().all(|&b| b == 0),
            "{policy:?}"
        );
        assert!(d[144..].iter().all(|&b| b == 0xFF), "{policy:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// SPSC: capacity edges and batching
// ---------------------------------------------------------------------------------------------

#[test]
fn spsc_exactly_full_ring_refuses_and_hands_the_event_back() {
    // Raw frames: four 64-byte frames fill a 256-byte ring exactly.
    let ring = Ring::new(256);
    let mut tx = ring.producer();
    let mut rx = ring.reader();
    for i in 0..4u64 {
        assert_eq!(
            tx.try_push_frame(&event_header(i, 0), &[i as u8 + 1; 16]),
            Ok(i)
        );
    }
    assert_eq!(ring.tail(), 256);
    assert_eq!(
        tx.try_push_frame(&event_header(4, 0), &[9; 16]),
        Err(ClaimError::Full)
    );
    assert_eq!(ring.tail(), 256, "a refused frame leaves no trace");
    assert_eq!(tx.next_seq(), 4, "a refused frame takes no sequence number");
    // Even a header-only frame is refused.
    assert_eq!(
        tx.try_push_frame(&heartbeat_header(4), &[]),
        Err(ClaimError::Full)
    );
    // Reading without releasing frees nothing.
    assert_eq!(rx.peek().unwrap().unwrap().payload, &[1; 16]);
    rx.consume();
    assert_eq!(
        tx.try_push_frame(&event_header(4, 0), &[9; 16]),
        Err(ClaimError::Full)
    );
    rx.release();
    assert_eq!(tx.try_push_frame(&event_header(4, 0), &[9; 16]), Ok(4));
    assert_eq!(ring.tail(), 320);
    assert_eq!(
        tx.try_push_frame(&event_header(5, 0), &[9; 16]),
        Err(ClaimError::Full)
    );
    for want in [2u8, 3, 4, 9] {
        assert_eq!(rx.peek().unwrap().unwrap().payload, &[want; 16]);
        rx.consume();
    }
    assert!(rx.peek().unwrap().is_none());

    // Events: the event comes back, unchanged, in PushError::Full.
    let ring = Ring::new(256);
    let mut tx = ring.producer();
    let per_ring = 256 / stride(Trade::ARCHIVED_LEN);
    for i in 0..per_ring as u64 {
        tx.try_push(i, 0, trade(i)).unwrap();
    }
    let back = tx.try_push(99, 0, trade(99)).unwrap_err();
    assert_eq!(back, PushError::Full(trade(99)));
    assert_eq!(back.into_inner(), trade(99));
    // `push` with a deadline that has passed hands it back as Timeout.
    match tx.push(
        99,
        0,
        trade(98),
        &mut BusySpin,
        Deadline::after(Duration::ZERO),
    ) {
        Err(PushError::Timeout(t)) => assert_eq!(t, trade(98)),
        other => panic!("{other:?}"),
    }
}

/// The largest frame is half the ring: two of them fill it exactly, back to back, lap after
/// lap; a frame filling the whole ring is refused as too large.
#[test]
fn spsc_largest_frames_fill_the_ring() {
    for cap in [256usize, 512, 4096] {
        let ring = Ring::new(cap);
        let mut tx = ring.producer();
        let mut rx = ring.reader();
        let max = max_payload(cap);
        assert_eq!(stride(max), cap / 2);
        assert_eq!(
            tx.try_push_frame(&event_header(0, 0), &vec![1; cap - FRAME_HEADER_LEN]),
            Err(ClaimError::TooLarge {
                stride: cap,
                capacity: cap
            })
        );
        let mut seq = 0u64;
        for lap in 0..3u64 {
            let payloads = [pattern(seq, max), pattern(seq + 1, max)];
            for p in &payloads {
                assert_eq!(tx.try_push_frame(&event_header(seq, 0), p), Ok(seq));
                seq += 1;
            }
            assert_eq!(ring.tail(), (lap + 1) * cap as u64, "exactly full");
            assert_eq!(
                tx.try_push_frame(&heartbeat_header(lap), &[]),
                Err(ClaimError::Full)
            );
            for (i, p) in payloads.iter().enumerate() {
                let f = rx.peek().unwrap().unwrap();
                assert_eq!(f.payload, &p[..]);
                assert_eq!(
                    f.payload.as_ptr() as usize,
                    ring.data_ptr() + i * cap / 2 + FRAME_HEADER_LEN
                );
                rx.consume();
            }
            rx.release();
        }
        // Half a frame's worth off: the largest frame still goes in at once when the reader
        // has drained, with a padding frame in front of it.
        tx.try_push_frame(&event_header(seq, 0), &[3; 16]).unwrap();
        seq += 1;
        assert!(rx.peek().unwrap().is_some());
        rx.consume();
        tx.try_push_frame(&event_header(seq, 0), &vec![4; max])
            .unwrap();
        assert!(rx.peek().unwrap().is_some());
        rx.consume();
        assert!(rx.peek().unwrap().is_none());
        assert_eq!(
            tx.try_push_frame(&event_header(seq, 0), &vec![5; max]),
            Ok(seq + 1)
        );
        // (A padding frame of cap/2 - 64 bytes, then the frame at the start of the next lap.)
        assert_eq!(ring.tail(), 4 * cap as u64 + cap as u64 / 2);
        assert_eq!(
            ring.header_at(cap / 2 + 64),
            FrameHeader::padding(cap / 2 - 64)
        );
        let f = rx.peek().unwrap().unwrap();
        assert_eq!(f.payload, &vec![5; max][..]);
        assert_eq!(
            f.payload.as_ptr() as usize,
            ring.data_ptr() + FRAME_HEADER_LEN
        );
    }
}

#[test]
fn spsc_too_large_frames_are_refused() {
    for cap in [256usize, 512, 4096] {
        let ring = Ring::new(cap);
        let mut tx = ring.producer();
        let too_big = max_payload(cap) + 1;
        assert_eq!(
            tx.try_push_frame(&event_header(0, 0), &vec![1; too_big]),
            Err(ClaimError::TooLarge {
                stride: cap / 2 + 16,
                capacity: cap
            })
        );
        for len in [too_big, cap - FRAME_HEADER_LEN, cap, 10 * cap] {
            assert!(matches!(
                tx.try_claim(len),
                Err(ClaimError::TooLarge { .. })
            ));
        }
        assert_eq!(ring.tail(), 0);
        assert_eq!(tx.next_seq(), 0);
        // Refused at any offset, too, and without touching the ring.
        tx.try_push_frame(&event_header(0, 0), &[1; 16]).unwrap();
        assert!(matches!(
            tx.try_claim(too_big),
            Err(ClaimError::TooLarge { .. })
        ));
        assert_eq!(ring.tail(), 64);
    }
}

/// `stride()` overflowed (a debug-build panic) for a length near `usize::MAX`.
#[test]
fn regression_try_claim_huge_len_is_too_large() {
    let ring = Ring::new(256);
    let mut tx = ring.producer();
    for len in [
        usize::MAX,
        usize::MAX - 15,
        usize::MAX / 2,
        MAX_PAYLOAD_LEN + 1,
    ] {
        assert!(
            matches!(tx.try_claim(len), Err(ClaimError::TooLarge { .. })),
            "{len}"
        );
    }
    // The per-frame payload limit holds whatever the ring size.
    let cap = 4 << 20;
    let big = Ring::new(cap);
    let mut tx = big.producer();
    assert!(matches!(
        tx.try_claim(MAX_PAYLOAD_LEN + 1),
        Err(ClaimError::TooLarge { .. })
    ));
    assert!(tx.try_claim(MAX_PAYLOAD_LEN).is_ok());
}

#[test]
fn bad_capacities_are_refused() {
    for cap in [
        0usize,
        1,
        16,
        128,
        255,
        257,
        300,
        384,
        1000,
        4095,
        4097,
        3 << 10,
    ] {
        assert!(
            matches!(
                spsc::check_capacity(cap),
                Err(CreateError::BadCapacity { capacity, .. }) if capacity == cap
            ),
            "{cap}"
        );
        let region = Arc::new(HeapRegion::new(spsc::region_len(cap.max(256)) + 8192));
        assert!(spsc::init_region(&*region, cap, EPOCH).is_err(), "{cap}");
        assert!(
            spmc::init_region(&*region, cap, EPOCH, Policy::Block).is_err(),
            "{cap}"
        );
        assert!(Producer::create(region.clone(), cap, EPOCH, SRC).is_err());
        assert!(BusWriter::create(region.clone(), cap, EPOCH, Policy::Overwrite).is_err());
        // Nothing was written: the region still reads as uninitialised.
        assert_eq!(
            ring_open_err(region.clone(), None),
            OpenError::NotInitialized
        );
        // No file is created for a refused capacity.
        let f = ShmFile::new(&format!("badcap{cap}"));
        assert!(matches!(
            spsc::create_shm(&f.0, cap, EPOCH),
            Err(CreateError::BadCapacity { .. })
        ));
        assert!(matches!(
            spmc::create_shm(&f.0, cap, EPOCH, Policy::Block),
            Err(CreateError::BadCapacity { .. })
        ));
        assert!(!f.0.exists());
    }
    for cap in [256usize, 512, 1 << 20] {
        assert!(spsc::check_capacity(cap).is_ok());
    }
}

#[test]
fn spsc_batched_commits_are_invisible_until_the_batch_or_a_flush() {
    let ring = Ring::new(4096);
    let mut tx = ring.producer();
    let mut rx = ring.reader();
    tx.set_batch(4);
    let mut seq = 0u64;
    let mut push = |tx: &mut Producer| {
        tx.try_push_frame(&event_header(seq, 0), &[seq as u8 + 1; 16])
            .unwrap();
        seq += 1;
    };
    for _ in 0..3 {
        push(&mut tx);
        assert!(rx.peek().unwrap().is_none(), "visible before the batch");
        assert_eq!(ring.tail(), 0);
    }
    push(&mut tx);
    assert_eq!(ring.tail(), 4 * 64, "the 4th frame publishes the batch");
    for want in 0..4u8 {
        assert_eq!(rx.peek().unwrap().unwrap().payload, &[want + 1; 16]);
        rx.consume();
    }
    assert!(rx.peek().unwrap().is_none());
    // Part of a batch, then flush.
    push(&mut tx);
    push(&mut tx);
    assert!(rx.peek().unwrap().is_none());
    tx.flush();
    assert_eq!(ring.tail(), 6 * 64);
    assert_eq!(rx.peek().unwrap().unwrap().payload, &[5; 16]);
    rx.consume();
    assert_eq!(rx.peek().unwrap().unwrap().payload, &[6; 16]);
    rx.consume();
    // The batch count restarts after a flush: 3 more stay invisible.
    for _ in 0..3 {
        push(&mut tx);
    }
    assert!(rx.peek().unwrap().is_none());
    tx.flush();
    tx.flush(); // idempotent
    for _ in 0..3 {
        assert!(rx.peek().unwrap().is_some());
        rx.consume();
    }
    // Heartbeats and EOF flush at once, whatever the batch.
    push(&mut tx);
    tx.heartbeat(77, &mut BusySpin, Deadline::never()).unwrap();
    assert!(rx.peek().unwrap().is_some());
    rx.consume();
    let h = rx.peek_header().unwrap().unwrap();
    assert_eq!((h.kind, h.flags, h.ts, h.len), (0, flags::HEARTBEAT, 77, 0));
    rx.consume();
    tx.finish(&mut BusySpin, Deadline::never()).unwrap();
    let h = rx.peek_header().unwrap().unwrap();
    assert_eq!((h.kind, h.flags, h.ts), (0, flags::EOF, u64::MAX));
    rx.consume();
    rx.release();

    // set_batch(0) means 1.
    tx.set_batch(0);
    push(&mut tx);
    assert!(rx.peek().unwrap().is_some());
    rx.consume();
    rx.release();

    // A batch larger than the ring: filling the ring publishes what is pending.
    tx.set_batch(1000);
    let mut n = 0;
    while tx.try_push_frame(&event_header(0, 0), &[0xEE; 16]).is_ok() {
        n += 1;
    }
    assert!(n > 0);
    let mut seen = 0;
    while let Some(f) = rx.peek().unwrap() {
        assert_eq!(f.payload, &[0xEE; 16]);
        rx.consume();
        seen += 1;
    }
    assert_eq!(seen, n, "Full publishes the unfinished batch");
}

// ---------------------------------------------------------------------------------------------
// Open errors
// ---------------------------------------------------------------------------------------------

/// A segment file under `/dev/shm` removed on drop, even when the test panics.
struct ShmFile(PathBuf);

impl ShmFile {
    fn new(tag: &str) -> ShmFile {
        let p = Path::new(segment::SHM_DIR).join(format!("aegis-test{}-{tag}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        ShmFile(p)
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn segment_header_layout() {
    // The offsets the raw edits below rely on (repr(C)).
    assert_eq!(std::mem::offset_of!(SegmentHeader, magic), 0);
    assert_eq!(std::mem::offset_of!(SegmentHeader, version), 8);
    assert_eq!(std::mem::offset_of!(SegmentHeader, kind), 12);
    assert_eq!(std::mem::offset_of!(SegmentHeader, epoch), 16);
    assert_eq!(std::mem::offset_of!(SegmentHeader, capacity), 24);
    assert_eq!(std::mem::offset_of!(SegmentHeader, data_offset), 32);
    assert_eq!(std::mem::offset_of!(SegmentHeader, total_len), 40);
    assert_eq!(std::mem::offset_of!(SegmentHeader, creator_pid), 48);
    assert_eq!(std::mem::offset_of!(SegmentHeader, init), 52);
    let ring = Ring::new(256);
    let h = copy_out(&*ring.region, 0, 56);
    assert_eq!(
        u64::from_le_bytes(h[0..8].try_into().unwrap()),
        SEGMENT_MAGIC
    );
    assert_eq!(
        u32::from_le_bytes(h[8..12].try_into().unwrap()),
        LAYOUT_VERSION
    );
    assert_eq!(u32::from_le_bytes(h[12..16].try_into().unwrap()), 1);
    assert_eq!(u64::from_le_bytes(h[16..24].try_into().unwrap()), EPOCH);
    assert_eq!(u64::from_le_bytes(h[24..32].try_into().unwrap()), 256);
    assert_eq!(
        u64::from_le_bytes(h[40..48].try_into().unwrap()),
        spsc::region_len(256) as u64
    );
    assert_eq!(
        u32::from_le_bytes(h[48..52].try_into().unwrap()),
        std::process::id()
    );
    assert_eq!(
        u32::from_le_bytes(h[52..56].try_into().unwrap()),
        INIT_READY
    );
}

/// A fresh, valid ring and bus of 256 bytes on the heap.
fn fresh_ring() -> Arc<HeapRegion> {
    Ring::new(256).region
}

fn fresh_bus(policy: Policy) -> Arc<HeapRegion> {
    let region = Arc::new(HeapRegion::new(spmc::region_len(256)));
    spmc::init_region(&*region, 256, EPOCH, policy).unwrap();
    region
}

/// Applies `edit` to the header of a fresh ring and of a fresh bus, and checks that every
/// opener refuses both with `want(kind)`.
fn both_refused(edit: impl Fn(*mut SegmentHeader), want: impl Fn(u32) -> OpenError) {
    let ring = fresh_ring();
    edit(header_ptr(&*ring));
    assert_eq!(ring_open_err(ring.clone(), Some(EPOCH)), want(1));
    assert_eq!(producer_open_err(ring, Some(EPOCH)), want(1));
    let bus = fresh_bus(Policy::Block);
    edit(header_ptr(&*bus));
    assert_eq!(bus_open_err(bus, Some(EPOCH)), want(2));
}

#[test]
fn open_errors_on_heap_regions() {
    // Sanity: fresh segments open.
    assert!(RingReader::open(fresh_ring(), Some(EPOCH)).is_ok());
    assert!(BusReader::attach(fresh_bus(Policy::Block), Some(EPOCH), None).is_ok());

    // TooSmall: shorter than a header.
    for len in [0usize, 1, 56, 64, 127] {
        let r = Arc::new(HeapRegion::new(len));
        let want = OpenError::TooSmall {
            len: len.max(1),
            need: HEADER_LEN,
        };
        assert_eq!(ring_open_err(r.clone(), None), want);
        assert_eq!(producer_open_err(r.clone(), None), want);
        assert_eq!(bus_open_err(r, None), want);
    }
    // TooSmall: a valid header, but the region is shorter than its total_len.
    let full = fresh_ring();
    let total = spsc::region_len(256);
    let data = spsc::geometry(256).data_offset;
    for len in [HEADER_LEN, data, total - 16, total - 1] {
        let r = Arc::new(HeapRegion::new(len));
        copy_in(&*r, 0, &copy_out(&*full, 0, len));
        assert_eq!(
            ring_open_err(r, Some(EPOCH)),
            OpenError::TooSmall { len, need: total },
            "{len}"
        );
    }
    let bus_full = fresh_bus(Policy::Overwrite);
    let bus_total = spmc::region_len(256);
    let r = Arc::new(HeapRegion::new(bus_total - 16));
    copy_in(&*r, 0, &copy_out(&*bus_full, 0, bus_total - 16));
    assert_eq!(
        bus_open_err(r, Some(EPOCH)),
        OpenError::TooSmall {
            len: bus_total - 16,
            need: bus_total
        }
    );

    // BadMagic (any non-zero magic, or zero magic once initialised).
    for magic in [
        SEGMENT_MAGIC ^ 1,
        u64::from_le_bytes(*b"AEGISSEH"),
        u64::MAX,
        0,
    ] {
        // SAFETY (in the closure): the header of a region we own, nothing reads it meanwhile.
        both_refused(
            |h| unsafe { (*h).magic = magic },
            |_| OpenError::BadMagic { found: magic },
        );
    }

    // VersionMismatch.
    for v in [0u32, LAYOUT_VERSION + 1, u32::MAX] {
        both_refused(
            |h| unsafe { (*h).version = v },
            |_| OpenError::VersionMismatch {
                found: v,
                expected: LAYOUT_VERSION,
            },
        );
    }

    // WrongKind: a bus opened as a ring, a ring as a bus, a control segment as either.
    let bus = fresh_bus(Policy::Block);
    assert_eq!(
        ring_open_err(bus.clone(), Some(EPOCH)),
        OpenError::WrongKind {
            found: 2,
            expected: 1
        }
    );
    assert_eq!(
        producer_open_err(bus, Some(EPOCH)),
        OpenError::WrongKind {
            found: 2,
            expected: 1
        }
    );
    assert_eq!(
        bus_open_err(fresh_ring(), Some(EPOCH)),
        OpenError::WrongKind {
            found: 1,
            expected: 2
        }
    );
    both_refused(
        |h| unsafe { (*h).kind = 3 },
        |k| OpenError::WrongKind {
            found: 3,
            expected: k,
        },
    );

    // EpochMismatch (and `None` skips the check).
    for other in [0u64, EPOCH + 1, u64::MAX] {
        both_refused(
            |h| unsafe { (*h).epoch = other },
            |_| OpenError::EpochMismatch {
                found: other,
                expected: EPOCH,
            },
        );
        let ring = fresh_ring();
        assert_eq!(
            ring_open_err(ring.clone(), Some(other)),
            OpenError::EpochMismatch {
                found: EPOCH,
                expected: other
            }
        );
        assert_eq!(
            bus_open_err(fresh_bus(Policy::Overwrite), Some(other)),
            OpenError::EpochMismatch {
                found: EPOCH,
                expected: other
            }
        );
        assert!(RingReader::open(ring, None).is_ok());
    }

    // NotInitialized: all zeroes (the creator has not even written the header)...
    let zero = Arc::new(HeapRegion::new(spsc::region_len(256)));
    assert_eq!(
        ring_open_err(zero.clone(), Some(EPOCH)),
        OpenError::NotInitialized
    );
    assert_eq!(bus_open_err(zero, Some(EPOCH)), OpenError::NotInitialized);
    // ... or a complete header whose init flag is not (yet, or no longer) INIT_READY.
    for init in [0u32, 1, INIT_READY ^ 1, u32::MAX] {
        both_refused(
            |h| unsafe { (*h).init.store(init, Ordering::SeqCst) },
            |_| OpenError::NotInitialized,
        );
    }
    // The raw u32 at offset 52 is the flag.
    let ring = fresh_ring();
    atomic_u32(&*ring, 52).store(0, Ordering::SeqCst);
    assert_eq!(
        ring_open_err(ring.clone(), Some(EPOCH)),
        OpenError::NotInitialized
    );
    atomic_u32(&*ring, 52).store(INIT_READY, Ordering::SeqCst);
    assert!(RingReader::open(ring, Some(EPOCH)).is_ok());

    // Corrupt geometry.
    both_refused(
        |h| unsafe { (*h).data_offset += 128 },
        |_| OpenError::Corrupt("data offset does not match the control block"),
    );
    both_refused(
        |h| unsafe { (*h).total_len += 16 },
        |_| OpenError::Corrupt("total length does not match the capacity"),
    );
    // A capacity that is not a power of two (or too small), with a consistent total length.
    for cap in [200u64, 128, 0, 240, 16] {
        let ring = fresh_ring();
        // SAFETY: our own region, nothing reads it meanwhile.
        unsafe {
            let h = header_ptr(&*ring);
            (*h).capacity = cap;
            (*h).total_len = (*h).data_offset + cap;
        }
        assert_eq!(
            ring_open_err(ring, Some(EPOCH)),
            OpenError::Corrupt("ring capacity is not a power of two"),
            "{cap}"
        );
        let bus = fresh_bus(Policy::Block);
        // SAFETY: as above.
        unsafe {
            let h = header_ptr(&*bus);
            (*h).capacity = cap;
            (*h).total_len = (*h).data_offset + cap;
        }
        assert_eq!(
            bus_open_err(bus, Some(EPOCH)),
            OpenError::Corrupt("bus capacity is not a power of two")
        );
    }
    // A capacity larger than the region: the consistent header asks for more than there is.
    let ring = fresh_ring();
    // SAFETY: as above.
    unsafe {
        let h = header_ptr(&*ring);
        (*h).capacity = 1 << 20;
        (*h).total_len = (*h).data_offset + (1 << 20);
    }
    assert!(matches!(
        ring_open_err(ring, Some(EPOCH)),
        OpenError::TooSmall { .. }
    ));
    // An unknown bus policy word.
    let bus = fresh_bus(Policy::Block);
    atomic_u32(&*bus, bus_policy_offset()).store(7, Ordering::SeqCst);
    assert_eq!(
        bus_open_err(bus, Some(EPOCH)),
        OpenError::Corrupt("unknown bus policy")
    );

    // Precedence: magic, version, kind, init, epoch, geometry.
    both_refused(
        |h| unsafe {
            (*h).version = 9;
            (*h).epoch = 1;
            (*h).init.store(0, Ordering::SeqCst);
        },
        |_| OpenError::VersionMismatch {
            found: 9,
            expected: LAYOUT_VERSION,
        },
    );
    both_refused(
        |h| unsafe {
            (*h).epoch = 1;
            (*h).init.store(0, Ordering::SeqCst);
        },
        |_| OpenError::NotInitialized,
    );
    both_refused(
        |h| unsafe {
            (*h).epoch = 1;
            (*h).total_len = 1;
        },
        |_| OpenError::EpochMismatch {
            found: 1,
            expected: EPOCH,
        },
    );
}

/// Offset of the bus's policy word in the segment (the one u32 a Block and an Overwrite bus
/// differ in).
fn bus_policy_offset() -> usize {
    let a = copy_out(
        &*fresh_bus(Policy::Block),
        0,
        spmc::geometry(256).data_offset,
    );
    let b = copy_out(
        &*fresh_bus(Policy::Overwrite),
        0,
        spmc::geometry(256).data_offset,
    );
    let diff: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    assert_eq!(diff.len(), 1, "{diff:?}");
    assert_eq!(b[diff[0]], 1);
    diff[0] & !3
}

#[test]
fn open_errors_on_dev_shm() {
    // NotFound.
    let missing = ShmFile::new("missing");
    match ShmRegion::open(&missing.0) {
        Err(OpenError::NotFound(p)) => assert_eq!(p, missing.0),
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("opened a missing file"),
    }

    // A real ring: opens; the creator owns and removes the file.
    let f = ShmFile::new("ring");
    let owner = spsc::create_shm(&f.0, 256, EPOCH).unwrap();
    assert!(owner.is_owner());
    assert_eq!(owner.path(), f.0.as_path());
    assert!(matches!(
        spsc::create_shm(&f.0, 256, EPOCH),
        Err(CreateError::AlreadyExists(_))
    ));
    let opened: Arc<dyn Region> = Arc::new(ShmRegion::open(&f.0).unwrap());
    assert_eq!(opened.len(), spsc::region_len(256));
    // EpochMismatch.
    assert_eq!(
        ring_open_err(opened.clone(), Some(EPOCH + 1)),
        OpenError::EpochMismatch {
            found: EPOCH,
            expected: EPOCH + 1
        }
    );
    // WrongKind.
    assert_eq!(
        bus_open_err(opened.clone(), Some(EPOCH)),
        OpenError::WrongKind {
            found: 1,
            expected: 2
        }
    );
    // The two mappings share the ring: a frame pushed through one is read through the other.
    let owner: Arc<dyn Region> = Arc::new(owner);
    let mut tx = Producer::open(owner.clone(), Some(EPOCH), SRC).unwrap();
    let mut rx = RingReader::open(opened.clone(), Some(EPOCH)).unwrap();
    tx.try_push_frame(&event_header(5, 6), &[42; 20]).unwrap();
    assert_eq!(rx.peek().unwrap().unwrap().payload, &[42; 20]);
    drop((tx, rx));
    // BadMagic, written through the creator's mapping, seen through the other.
    // SAFETY: nobody else uses the segment now.
    unsafe { (*header_ptr(&*owner)).magic = 0x0123_4567_89AB_CDEF };
    assert_eq!(
        ring_open_err(opened.clone(), Some(EPOCH)),
        OpenError::BadMagic {
            found: 0x0123_4567_89AB_CDEF
        }
    );
    drop(opened);
    drop(owner);
    assert!(!f.0.exists(), "the creator removes the file");

    // A bus: EpochMismatch and BadMagic too; a disowned creator leaves the file.
    let fb = ShmFile::new("bus");
    let mut owner = spmc::create_shm(&fb.0, 512, EPOCH, Policy::Overwrite).unwrap();
    owner.disown();
    drop(owner);
    assert!(fb.0.exists());
    let opened: Arc<dyn Region> = Arc::new(ShmRegion::open(&fb.0).unwrap());
    assert_eq!(
        bus_open_err(opened.clone(), Some(7)),
        OpenError::EpochMismatch {
            found: EPOCH,
            expected: 7
        }
    );
    let r = BusReader::attach(opened.clone(), Some(EPOCH), None).unwrap();
    assert_eq!(r.policy(), Policy::Overwrite);
    drop(r);
    // SAFETY: nobody else uses the segment now.
    unsafe { (*header_ptr(&*opened)).magic = 1 };
    assert_eq!(
        bus_open_err(opened, Some(EPOCH)),
        OpenError::BadMagic { found: 1 }
    );

    // TooSmall: a file shorter than a header; a file shorter than its header's total_len.
    let ft = ShmFile::new("tiny");
    std::fs::write(&ft.0, [0u8; 10]).unwrap();
    match ShmRegion::open(&ft.0) {
        Err(e) => assert_eq!(e, OpenError::TooSmall { len: 10, need: 128 }),
        Ok(_) => panic!("opened a 10-byte segment"),
    }
    let fs = ShmFile::new("short");
    let ring = fresh_ring();
    std::fs::write(&fs.0, copy_out(&*ring, 0, 200)).unwrap();
    let short: Arc<dyn Region> = Arc::new(ShmRegion::open(&fs.0).unwrap());
    assert_eq!(
        ring_open_err(short, Some(EPOCH)),
        OpenError::TooSmall {
            len: 200,
            need: spsc::region_len(256)
        }
    );
    // NotInitialized: created but never initialised.
    let fz = ShmFile::new("zero");
    let zero: Arc<dyn Region> = Arc::new(ShmRegion::create(&fz.0, spsc::region_len(256)).unwrap());
    assert_eq!(ring_open_err(zero, Some(EPOCH)), OpenError::NotInitialized);
    assert!(!fz.0.exists());
}

// ---------------------------------------------------------------------------------------------
// The ring reader against untrusted memory
// ---------------------------------------------------------------------------------------------

/// A 256-byte ring at `pos` holding one valid frame (`len`-byte payload), both ends open.
fn one_frame_ring(pos: u64, len: usize) -> (Ring, Producer, RingReader) {
    let ring = Ring::at(256, pos);
    let mut tx = ring.producer();
    let rx = ring.reader();
    tx.try_push_frame(&event_header(1, 2), &pattern(1, len))
        .unwrap();
    (ring, tx, rx)
}

/// Peeks (twice, and through `peek_header`) and returns the error; the reader must not panic
/// and must keep refusing.
fn peek_err(rx: &mut RingReader) -> FrameError {
    let e = match rx.peek() {
        Err(e) => e,
        Ok(Some(f)) => panic!("accepted {:?}", f.header),
        Ok(None) => panic!("saw an empty ring"),
    };
    assert_eq!(rx.peek().err(), Some(e.clone()), "the error is sticky");
    assert_eq!(rx.peek_header().err(), Some(e.clone()));
    e
}

#[test]
fn reader_refuses_corrupt_headers() {
    type Edit = fn(&mut FrameHeader);
    type Want = fn(&FrameError) -> bool;
    let cases: Vec<(&str, Edit, Want)> = vec![
        (
            "unknown kind 5 (4 is custom)",
            |h| h.kind = 5,
            |e| *e == FrameError::UnknownKind(5),
        ),
        (
            "unknown kind 255",
            |h| h.kind = 255,
            |e| *e == FrameError::UnknownKind(255),
        ),
        (
            "unknown flag 0x20",
            |h| h.flags = 0x20,
            |e| *e == FrameError::UnknownFlags(0x20),
        ),
        (
            "unknown flag 0x80",
            |h| h.flags = flags::LATE | 0x80,
            |e| *e == FrameError::UnknownFlags(0x82),
        ),
        (
            "len u32::MAX",
            |h| h.len = u32::MAX,
            |e| matches!(e, FrameError::BadLength { .. }),
        ),
        (
            "len above MAX_PAYLOAD_LEN",
            |h| h.len = MAX_PAYLOAD_LEN as u32 + 1,
            |e| matches!(e, FrameError::BadLength { .. }),
        ),
        (
            "len past the end of the ring",
            |h| h.len = 256,
            |e| matches!(e, FrameError::BadLength { .. }),
        ),
        (
            "len past the published tail",
            |h| h.len = 17,
            |e| {
                *e == FrameError::BadLength {
                    stride: 80,
                    available: 64,
                }
            },
        ),
        (
            "event without payload",
            |h| h.len = 0,
            |e| matches!(e, FrameError::Inconsistent(_)),
        ),
        (
            "padding flag on an event",
            |h| h.flags = flags::PADDING,
            |e| matches!(e, FrameError::Inconsistent(_)),
        ),
        (
            "control frame without a flag",
            |h| h.kind = 0,
            |e| matches!(e, FrameError::Inconsistent(_)),
        ),
        (
            "padding frame that does not reach the end",
            |h| {
                h.kind = 0;
                h.flags = flags::PADDING;
            },
            |e| matches!(e, FrameError::BadLength { .. }),
        ),
        (
            "padding frame reaching the end, past the published tail",
            |h| *h = FrameHeader::padding(256),
            |e| matches!(e, FrameError::BadLength { .. }),
        ),
    ];
    for (name, edit, ok) in cases {
        for pos in [0u64, 256 * 9] {
            let (ring, _tx, mut rx) = one_frame_ring(pos, 16);
            let mut h = ring.header_at(0);
            edit(&mut h);
            ring.put_header(0, &h);
            let e = peek_err(&mut rx);
            assert!(ok(&e), "{name}: {e:?}");
            assert_eq!(ring.head(), pos, "{name}: nothing consumed");
        }
    }
}

#[test]
fn reader_refuses_bad_tail_cursors() {
    // Two frames read; then the tail is moved.
    type Move = fn(u64) -> u64;
    let cases: Vec<(&str, Move, &str)> = vec![
        ("backwards by a frame", |h| h - 64, "tail moved backwards"),
        ("backwards by 16", |h| h - 16, "tail moved backwards"),
        ("to 0", |_| 0, "tail moved backwards"),
        ("misaligned by 8", |h| h + 8, "tail is not 16-byte aligned"),
        ("misaligned by 1", |h| h + 1, "tail is not 16-byte aligned"),
        (
            "misaligned by 63",
            |h| h + 63,
            "tail is not 16-byte aligned",
        ),
        (
            "more than a ring ahead",
            |h| h + 256 + 16,
            "tail is more than a ring ahead",
        ),
        (
            "far ahead",
            |h| h + (1 << 40),
            "tail is more than a ring ahead",
        ),
        ("u64::MAX", |_| u64::MAX, "tail is more than a ring ahead"),
        (
            "inside a frame header",
            |h| h + 32,
            "tail inside a frame header",
        ),
        (
            "inside a frame header (16)",
            |h| h + 16,
            "tail inside a frame header",
        ),
    ];
    for (name, tail, msg) in cases {
        for base in [0u64, 1 << 33] {
            let ring = Ring::at(256, base);
            let mut tx = ring.producer();
            let mut rx = ring.reader();
            for i in 0..2u8 {
                tx.try_push_frame(&event_header(1, 2), &[i + 1; 16])
                    .unwrap();
                assert!(rx.peek().unwrap().is_some());
                rx.consume();
            }
            let head = base + 128;
            ring.set_tail(tail(head));
            let e = peek_err(&mut rx);
            assert_eq!(e, FrameError::BadCursor(msg), "{name}");
        }
    }
    // Exactly a ring ahead is a valid cursor: then the (garbage) header decides.
    let ring = Ring::new(256);
    let mut rx = ring.reader();
    ring.fill_data(0xEE);
    ring.set_tail(256);
    assert_eq!(peek_err(&mut rx), FrameError::UnknownKind(0xEE));
    // A tail inside the implicit padding at the end of the ring.
    let ring = Ring::at(256, 256 - 32);
    let mut rx = ring.reader();
    ring.set_tail(256 - 16);
    assert_eq!(
        peek_err(&mut rx),
        FrameError::BadCursor("tail inside the implicit padding")
    );
    // A tail that has not moved is just an empty ring, whatever the head's offset.
    for k in (0..256).step_by(16) {
        let ring = Ring::at(256, 256 * 5 + k);
        let mut rx = ring.reader();
        assert!(rx.peek().unwrap().is_none());
        assert!(rx.peek_header().unwrap().is_none());
    }
}

/// Found while writing the tests above: the reader took its starting head from shared
/// memory (which the producer can write) without checking it, and with a misaligned head it
/// read a frame header through a misaligned pointer (undefined behaviour; an abort in debug
/// builds).
#[test]
fn regression_reader_open_refuses_misaligned_head() {
    for head in [1u64, 4, 8, 15, 100, (1 << 40) + 8] {
        let ring = Ring::new(256);
        ring.set_head(head);
        ring.set_tail((head + 64) & !15);
        assert_eq!(
            ring_open_err(ring.dyn_region(), Some(EPOCH)),
            OpenError::Corrupt("ring head is not 16-byte aligned"),
            "{head}"
        );
    }
}

/// Garbage everywhere: random data, random cursors, valid frames with random bytes flipped.
/// Whatever the reader is given, it returns frames inside the ring, `None` or an error.
#[test]
fn reader_never_panics_on_garbage() {
    let mut rng = Rng::new(0xF022);
    for round in 0..4000u64 {
        let cap = if round % 2 == 0 { 256 } else { 512 };
        let ring = Ring::new(cap);
        let base = rng.below(1 << 20) * 16;
        if round % 3 == 0 {
            // Random bytes, random cursors.
            let junk: Vec<u8> = (0..cap).map(|_| rng.next() as u8).collect();
            copy_in(&*ring.region, ring.data, &junk);
            ring.set_head(if rng.below(4) == 0 { rng.next() } else { base });
            ring.set_tail(base + rng.below(cap as u64 * 2));
        } else {
            // Real frames, then a few bytes flipped (headers most of the time).
            ring.set_head(base);
            ring.set_tail(base);
            let mut tx = ring.producer();
            for _ in 0..rng.below(12) {
                let len = rng.below(cap as u64 / 2) as usize;
                let h = if len == 0 {
                    heartbeat_header(1)
                } else {
                    event_header(1, 1)
                };
                let _ = tx.try_push_frame(&h, &pattern(rng.next(), len));
            }
            drop(tx);
            for _ in 0..1 + rng.below(4) {
                let at = ring.data + rng.below(cap as u64) as usize;
                let at = if rng.below(2) == 0 { at & !15 } else { at };
                copy_in(&*ring.region, at, &[rng.next() as u8]);
            }
            if rng.below(4) == 0 {
                ring.set_tail(ring.tail().wrapping_add(rng.below(64)).wrapping_sub(32));
            }
        }
        let Ok(mut rx) = RingReader::open(ring.dyn_region(), Some(EPOCH)) else {
            continue;
        };
        for _ in 0..64 {
            match rx.peek() {
                Ok(Some(f)) => {
                    let start = f.payload.as_ptr() as usize;
                    assert!(start >= ring.data_ptr() + FRAME_HEADER_LEN);
                    assert!(start + f.payload.len() <= ring.data_ptr() + cap);
                    assert!(f.header.validate(cap).is_ok());
                    std::hint::black_box(f.payload.iter().map(|&b| b as u64).sum::<u64>());
                    rx.consume();
                    if rng.below(3) == 0 {
                        rx.release();
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bus helpers
// ---------------------------------------------------------------------------------------------

fn new_bus(cap: usize, policy: Policy) -> (Arc<HeapRegion>, BusWriter) {
    let region = Arc::new(HeapRegion::new(spmc::region_len(cap)));
    let w = BusWriter::create(region.clone(), cap, EPOCH, policy).unwrap();
    (region, w)
}

fn attach(region: &Arc<HeapRegion>) -> BusReader {
    BusReader::attach(region.clone(), Some(EPOCH), None).unwrap()
}

fn bus_data_ptr(region: &Arc<HeapRegion>, cap: usize) -> usize {
    region.as_ptr() as usize + spmc::geometry(cap).data_offset
}

fn topic_of(seq: u64) -> u32 {
    (seq % 5) as u32
}

/// Writes frame `seq` (a Trade frame, topic `seq % 5`, `len` bytes derived from `seq`).
fn wr(w: &mut BusWriter, seq: u64, len: usize) -> Result<u64, WriteError> {
    w.try_write(
        &FrameHeader::event(Kind::Trade, 10 * seq, topic_of(seq), 0),
        &pattern(seq, len),
    )
}

fn eof_header() -> FrameHeader {
    FrameHeader {
        kind: Kind::Control as u8,
        flags: flags::EOF,
        ts: u64::MAX,
        ..FrameHeader::default()
    }
}

/// Checks that a delivered frame is exactly what `wr(seq, len)` wrote.
fn check_frame(h: &FrameHeader, payload: &[u8], seq: u64, len: usize) {
    assert_eq!(h.bus_seq, seq);
    assert_eq!(h.len as usize, len, "frame {seq}");
    assert_eq!((h.kind, h.ts, h.topic_id), (1, 10 * seq, topic_of(seq)));
    assert_eq!(payload, &pattern(seq, len)[..], "frame {seq}: payload");
}

/// Reads until the bus has nothing new (which publishes the consumer's cursor); returns the
/// bus sequences read.
fn drain(c: &mut BusReader) -> Vec<u64> {
    let mut v = Vec::new();
    while let Some(f) = c.try_next().unwrap() {
        assert_eq!(f.payload, &pattern(f.header.bus_seq, f.payload.len())[..]);
        v.push(f.header.bus_seq);
    }
    v
}

/// Length of frame `seq` in the longer runs: mostly small, sometimes the largest the bus takes.
fn len_of(seq: u64, cap: usize) -> usize {
    match seq % 23 {
        0 => max_payload(cap),
        7 => max_payload(cap) - 7,
        _ => 1 + (seq as usize * 37) % max_payload(cap),
    }
}

// ---------------------------------------------------------------------------------------------
// Bus: wrap-around at every offset (both policies)
// ---------------------------------------------------------------------------------------------

#[test]
fn bus_wrap_at_every_offset() {
    for policy in [Policy::Block, Policy::Overwrite] {
        for cap in [256usize, 512] {
            for k in (0..cap).step_by(16).filter(|&k| k == 0 || k >= 48) {
                // Every length on the small bus; on the larger one every third, and the
                // largest ones.
                for len in 1..=max_payload(cap) {
                    if cap == 256 || len % 3 == 0 || len + 20 > max_payload(cap) {
                        bus_wrap_case(policy, cap, k, len);
                    }
                }
            }
        }
    }
}

/// Moves a fresh bus (and its caught-up consumer) to offset `k` with one or two frames, then
/// writes a frame of `len` bytes and checks what the consumer gets and what is in memory.
fn bus_wrap_case(policy: Policy, cap: usize, k: usize, len: usize) {
    let ctx = format!("{policy:?} cap {cap} offset {k} len {len}");
    let (region, mut w) = new_bus(cap, policy);
    let mut c = attach(&region);
    let parts = if k == 0 {
        vec![]
    } else if k <= cap / 2 {
        vec![k]
    } else {
        let a = (k / 2) & !15;
        vec![a, k - a]
    };
    let mut seq = 0;
    for part in parts {
        let h = if part == FRAME_HEADER_LEN {
            heartbeat_header(0)
        } else {
            FrameHeader::event(Kind::Book, 0, 0, 0)
        };
        w.try_write(&h, &vec![0x11; part - FRAME_HEADER_LEN])
            .unwrap();
        w.publish();
        assert!(c.try_next().unwrap().is_some());
        assert!(c.try_next().unwrap().is_none());
        seq += 1;
    }
    let contiguous = cap - k;
    let s = stride(len);
    let wraps = s > contiguous;
    // Padding and frame together never need more than the bus: it goes in at once.
    assert!(!wraps || contiguous + s <= cap, "{ctx}");
    let foff = if wraps { 0 } else { k };
    assert_eq!(wr(&mut w, seq, len), Ok(seq), "{ctx}");
    w.publish();
    let d = copy_out(&*region, spmc::geometry(cap).data_offset, cap);
    if wraps && contiguous >= FRAME_HEADER_LEN {
        let b = &d[k..k + FRAME_HEADER_LEN];
        assert_eq!(
            FrameHeader::from_bytes(b.try_into().unwrap()),
            FrameHeader::padding(contiguous),
            "{ctx}: padding frame"
        );
    }
    assert!(
        d[foff + FRAME_HEADER_LEN + len..foff + s]
            .iter()
            .all(|&b| b == 0),
        "{ctx}: alignment padding is zero"
    );
    let f = c.try_next().unwrap().unwrap_or_else(|| panic!("{ctx}"));
    check_frame(f.header, f.payload, seq, len);
    if policy == Policy::Block {
        assert_eq!(
            f.payload.as_ptr() as usize,
            bus_data_ptr(&region, cap) + foff + FRAME_HEADER_LEN,
            "{ctx}: read in place"
        );
    }
    assert!(c.try_next().unwrap().is_none());
    assert_eq!(w.slot_stats()[0].overruns, 0);
}

/// The bus twin of `regression_large_frames_never_livelock_an_empty_ring`: under the block
/// policy a frame longer than both the space before the end and the current offset was
/// refused forever, even with no consumer attached. Frames over half the bus are now refused
/// as too large, and the largest accepted one goes in at once, wrap included.
#[test]
fn regression_bus_large_frames_never_livelock() {
    for policy in [Policy::Block, Policy::Overwrite] {
        // Without consumers.
        let (_region, mut w) = new_bus(256, policy);
        assert_eq!(wr(&mut w, 0, 64), Ok(0)); // stride 112
        assert_eq!(
            wr(&mut w, 1, 192),
            Err(WriteError::TooLarge {
                stride: 240,
                capacity: 256
            })
        );
        assert!(matches!(
            wr(&mut w, 1, 208),
            Err(WriteError::TooLarge { .. })
        ));
        assert_eq!(wr(&mut w, 1, 64), Ok(1)); // 112..224
        assert_eq!(wr(&mut w, 2, 80), Ok(2)); // the largest (128): 224..256 implicit, at 256
        assert_eq!(w.next_seq(), 3);
        // With a consumer that keeps up.
        let (region, mut w) = new_bus(256, policy);
        let mut c = attach(&region);
        for seq in 0..40 {
            let len = [64, 80, 1, 48, 80][seq as usize % 5];
            assert_eq!(wr(&mut w, seq, len), Ok(seq), "{policy:?}");
            w.publish();
            assert_eq!(drain(&mut c), vec![seq]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bus: block policy
// ---------------------------------------------------------------------------------------------

#[test]
fn bus_block_slow_consumer_is_never_overwritten() {
    let cap = 256;
    let (region, mut w) = new_bus(cap, Policy::Block);
    let mut c = attach(&region);
    let data = spmc::geometry(cap).data_offset;
    for seq in 0..4 {
        assert_eq!(wr(&mut w, seq, 16), Ok(seq));
    }
    w.publish();
    assert_eq!(wr(&mut w, 4, 16), Err(WriteError::Full));
    assert_eq!(w.fill(), 256);
    let snapshot = copy_out(&*region, data, cap);
    for seq in 0..4 {
        {
            let f = c.try_next().unwrap().unwrap();
            check_frame(f.header, f.payload, seq, 16);
            assert_eq!(
                f.payload.as_ptr() as usize,
                bus_data_ptr(&region, cap) + 64 * seq as usize + 48
            );
        }
        // The consumer has not released anything yet (it still holds this frame).
        assert_eq!(
            wr(&mut w, 4, 16),
            Err(WriteError::Full),
            "after frame {seq}"
        );
        assert_eq!(wr(&mut w, 4, 1), Err(WriteError::Full));
        assert_eq!(
            copy_out(&*region, data, cap),
            snapshot,
            "nothing overwritten"
        );
        assert_eq!(w.slot_stats()[0].cursor, 0);
    }
    // Its next call finds nothing new and releases everything.
    assert!(c.try_next().unwrap().is_none());
    assert_eq!(w.slot_stats()[0].cursor, 256);
    assert_eq!(w.slot_stats()[0].read, 4);
    assert_eq!(wr(&mut w, 4, 16), Ok(4));
    w.publish();
    assert_eq!(drain(&mut c), vec![4]);

    // A longer run of mixed sizes, the writer always as far ahead as the consumer allows.
    let mut seq = 5;
    let mut next = 5;
    for _ in 0..300 {
        loop {
            match wr(&mut w, seq, len_of(seq, cap)) {
                Ok(s) => {
                    assert_eq!(s, seq);
                    seq += 1;
                }
                Err(WriteError::Full) => break,
                Err(e) => panic!("{e:?}"),
            }
        }
        w.publish();
        let snapshot = copy_out(&*region, data, cap);
        assert_eq!(wr(&mut w, seq, len_of(seq, cap)), Err(WriteError::Full));
        while let Some(f) = c.try_next().unwrap() {
            check_frame(f.header, f.payload, next, len_of(next, cap));
            next += 1;
            if next < seq {
                assert_eq!(copy_out(&*region, data, cap), snapshot);
            }
        }
        assert_eq!(next, seq);
    }
}

#[test]
fn bus_block_two_consumers_get_every_frame() {
    let cap = 512;
    let (region, mut w) = new_bus(cap, Policy::Block);
    let mut cs = [attach(&region), attach(&region)];
    assert_eq!(w.consumers(), 2);
    let total = 3000u64;
    let mut next = [0u64; 2];
    let mut eof_seen = [false; 2];
    let mut seq = 0u64;
    let mut rng = Rng::new(2);
    for _round in 0..1_000_000 {
        if eof_seen.iter().all(|&e| e) {
            break;
        }
        for _ in 0..rng.below(8) {
            let r = if seq < total {
                wr(&mut w, seq, len_of(seq, cap))
            } else if seq == total {
                w.try_write(&eof_header(), &[])
            } else {
                break;
            };
            match r {
                Ok(s) => {
                    assert_eq!(s, seq);
                    seq += 1;
                }
                Err(WriteError::Full) => break,
                Err(e) => panic!("{e:?}"),
            }
        }
        w.publish();
        for (i, c) in cs.iter_mut().enumerate() {
            let budget = if rng.below(4) == 0 {
                u64::MAX
            } else {
                rng.below(6)
            };
            let mut n = 0;
            while n < budget {
                let Some(f) = c.try_next().unwrap() else {
                    break;
                };
                assert_eq!(f.header.bus_seq, next[i], "consumer {i}");
                if next[i] == total {
                    assert!(f.is_eof());
                    eof_seen[i] = true;
                } else {
                    check_frame(f.header, f.payload, next[i], len_of(next[i], cap));
                }
                next[i] += 1;
                n += 1;
            }
        }
    }
    assert_eq!(eof_seen, [true, true]);
    assert_eq!(next, [total + 1, total + 1]);
    assert_eq!(cs[0].delivered(), total + 1);
}

#[test]
fn bus_block_dropping_a_consumer_frees_the_writer() {
    let (region, mut w) = new_bus(256, Policy::Block);
    let mut fast = attach(&region);
    let slow = attach(&region);
    for seq in 0..4 {
        wr(&mut w, seq, 16).unwrap();
    }
    w.publish();
    assert_eq!(drain(&mut fast), vec![0, 1, 2, 3]);
    assert_eq!(
        wr(&mut w, 4, 16),
        Err(WriteError::Full),
        "held back by the slow one"
    );
    assert_eq!(w.min_cursor(), Some(0));
    drop(slow);
    assert_eq!(w.consumers(), 1);
    assert_eq!(w.min_cursor(), Some(256));
    assert_eq!(wr(&mut w, 4, 16), Ok(4));
    // And with the last one gone, nothing holds the writer.
    drop(fast);
    assert_eq!(w.consumers(), 0);
    assert_eq!(w.min_cursor(), None);
    for seq in 5..100 {
        assert_eq!(wr(&mut w, seq, 80), Ok(seq));
    }
}

#[test]
fn bus_block_release_slot_frees_the_writer() {
    let (region, mut w) = new_bus(256, Policy::Block);
    let stalled = attach(&region);
    for seq in 0..4 {
        wr(&mut w, seq, 16).unwrap();
    }
    w.publish();
    assert_eq!(wr(&mut w, 4, 16), Err(WriteError::Full));
    // The daemon declares the stalled consumer dead.
    w.release_slot(stalled.slot());
    assert_eq!(w.consumers(), 0);
    assert_eq!(wr(&mut w, 4, 16), Ok(4));
    std::mem::forget(stalled); // (a dead process does not run its destructor)

    // Through the monitor, and a released consumer that is still alive learns it when it
    // waits for frames.
    let (region, mut w) = new_bus(256, Policy::Block);
    let mut c = attach(&region);
    let mon = BusMonitor::open(region.clone(), Some(EPOCH)).unwrap();
    for seq in 0..4 {
        wr(&mut w, seq, 16).unwrap();
    }
    w.publish();
    assert_eq!(drain(&mut c), vec![0, 1, 2, 3]);
    assert_eq!(mon.slot_stats().len(), 1);
    assert_eq!(mon.tail(), 256);
    mon.release_slot(c.slot());
    assert!(mon.slot_stats().is_empty());
    match c.next(&mut BusySpin, Deadline::never()) {
        Err(ReadError::Detached(s)) => assert_eq!(s, c.slot()),
        Err(e) => panic!("{e:?}"),
        Ok(f) => panic!("{:?}", f.header),
    }
    for seq in 4..40 {
        assert_eq!(wr(&mut w, seq, 16), Ok(seq));
    }
}

#[test]
fn bus_topic_subscription_skips_frames() {
    for policy in [Policy::Block, Policy::Overwrite] {
        let cap = 256;
        let (region, mut w) = new_bus(cap, policy);
        // Ids 64 to 69 exist on this bus (the writer does not check) but no mask can name
        // them: only the unfiltered consumer gets them.
        let topics = [3u32, 40, 63];
        let mut some = attach(&region);
        some.subscribe(Some(&topics)).unwrap();
        let mut none = attach(&region);
        none.subscribe(Some(&[])).unwrap();
        let mut all = attach(&region);
        all.subscribe(Some(&[1])).unwrap();
        all.subscribe(None).unwrap();
        let mut got: [Vec<(u64, u32, u8)>; 3] = Default::default();
        let total = 700u64;
        let mut seq = 0u64;
        let frame = |seq: u64| -> (FrameHeader, usize) {
            if seq == total {
                (eof_header(), 0)
            } else if seq % 50 == 49 {
                (heartbeat_header(seq), 0)
            } else {
                (
                    FrameHeader::event(Kind::Trade, seq, (seq % 70) as u32, 0),
                    1 + seq as usize % 40,
                )
            }
        };
        let mut stuck = 0;
        while seq <= total {
            let (h, len) = frame(seq);
            match w.try_write(&h, &pattern(seq, len)) {
                Ok(s) => {
                    assert_eq!(s, seq);
                    seq += 1;
                    stuck = 0;
                    if policy == Policy::Block {
                        continue;
                    }
                }
                Err(WriteError::Full) => {
                    stuck += 1;
                    assert!(stuck < 3, "a filtering consumer holds the writer back");
                }
                Err(e) => panic!("{e:?}"),
            }
            w.publish();
            for (i, c) in [&mut some, &mut none, &mut all].into_iter().enumerate() {
                loop {
                    match c.try_next() {
                        Ok(Some(f)) => {
                            got[i].push((f.header.bus_seq, f.header.topic_id, f.header.kind))
                        }
                        Ok(None) => break,
                        Err(e) => panic!("{policy:?}: {e:?}"),
                    }
                }
            }
        }
        w.publish();
        for (i, c) in [&mut some, &mut none, &mut all].into_iter().enumerate() {
            while let Some(f) = c.try_next().unwrap() {
                got[i].push((f.header.bus_seq, f.header.topic_id, f.header.kind));
            }
        }
        let control = |s: u64| s == total || s % 50 == 49;
        let want =
            |pred: &dyn Fn(u64) -> bool| -> Vec<u64> { (0..=total).filter(|&s| pred(s)).collect() };
        let seqs = |v: &Vec<(u64, u32, u8)>| v.iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(
            seqs(&got[0]),
            want(&|s| control(s) || topics.contains(&((s % 70) as u32))),
            "{policy:?}"
        );
        assert_eq!(seqs(&got[1]), want(&|s| control(s)), "{policy:?}");
        assert_eq!(seqs(&got[2]), want(&|_| true), "{policy:?}");
        assert_eq!(some.delivered(), got[0].len() as u64);
    }
}

/// The topic filter is the slot's mask: the daemon's monitor sees it, a change made through
/// another handle (the client's reconciliation) or straight in shared memory applies from the
/// reader's next poll, and a handle whose slot was released stores nothing.
#[test]
fn bus_topic_mask_lives_in_the_slot() {
    for policy in [Policy::Block, Policy::Overwrite] {
        let (region, mut w) = new_bus(4096, policy);
        let mon = BusMonitor::open(region.clone(), Some(EPOCH)).unwrap();
        let mut c = attach(&region);
        assert_eq!(c.topics(), TopicMask::ALL);
        assert_eq!(mon.slot_stats()[0].topics, TopicMask::ALL);
        assert_eq!(c.subscribe(Some(&[2, 64])), Err(TopicOutOfRange(64)));
        assert_eq!(
            c.topics(),
            TopicMask::ALL,
            "a refused subscription changes nothing"
        );
        c.subscribe(Some(&[0])).unwrap();
        assert_eq!(
            mon.slot_stats()[0].topics,
            TopicMask::from_ids([0]).unwrap()
        );
        let handle = c.topic_handle().unwrap();
        // Frames 0..6 with topic ids seq % 3.
        let mut seq = 0;
        let mut write = |w: &mut BusWriter, n: u64| {
            for _ in 0..n {
                let h = FrameHeader::event(Kind::Trade, seq, (seq % 3) as u32, 0);
                w.try_write(&h, &pattern(seq, 8)).unwrap();
                seq += 1;
            }
            w.publish();
        };
        let read = |c: &mut BusReader| {
            let mut got = Vec::new();
            while let Some(f) = c.try_next().unwrap() {
                got.push(f.header.topic_id);
            }
            got
        };
        write(&mut w, 6);
        assert_eq!(read(&mut c), [0, 0], "{policy:?}");
        assert!(handle.set(TopicMask::from_ids([1]).unwrap()));
        assert_eq!(handle.get(), Some(TopicMask::from_ids([1]).unwrap()));
        write(&mut w, 6);
        assert_eq!(
            read(&mut c),
            [1, 1],
            "{policy:?}: the handle's mask applies at once"
        );
        // A stray write into shared memory is the filter too (the reconciliation repairs it).
        mon.overwrite_topics(c.slot(), TopicMask::from_ids([2]).unwrap());
        write(&mut w, 6);
        assert_eq!(read(&mut c), [2, 2], "{policy:?}");
        mon.release_slot(c.slot());
        assert_eq!(handle.get(), None);
        assert!(
            !handle.set(TopicMask::ALL),
            "a released slot's mask is not ours to set"
        );
    }
}

/// Found while testing the bus: attaching stored 0 into the cursor of every slot it tried,
/// before trying to take it, including slots other consumers hold. A consumer that is caught
/// up never stores its cursor again, so a block-policy writer then waited for it forever.
#[test]
fn regression_attach_does_not_clobber_an_attached_slot_cursor() {
    let (region, mut w) = new_bus(256, Policy::Block);
    let mut a = attach(&region);
    assert_eq!(a.slot(), 0);
    for seq in 0..8 {
        wr(&mut w, seq, 16).unwrap();
        w.publish();
        assert_eq!(drain(&mut a), vec![seq]);
    }
    assert_eq!(w.slot_stats()[0].cursor, 512);
    // Another consumer attaches (trying slot 0 first), and one asks for slot 0 explicitly.
    let mut b = attach(&region);
    assert_eq!(b.slot(), 1);
    assert!(matches!(
        BusReader::attach(region.clone(), Some(EPOCH), Some(0)),
        Err(AttachError::NoSlot(_))
    ));
    assert_eq!(
        w.slot_stats()[0].cursor,
        512,
        "slot 0's cursor was clobbered"
    );
    // The writer goes on as long as both keep up.
    for seq in 8..64 {
        let mut tries = 0;
        while wr(&mut w, seq, 16) == Err(WriteError::Full) {
            tries += 1;
            assert!(tries < 3, "writer blocked by consumers that are caught up");
            drain(&mut a);
            drain(&mut b);
        }
        w.publish();
    }
}

#[test]
fn bus_slots_run_out_and_come_back() {
    let (region, mut w) = new_bus(256, Policy::Block);
    let mut readers: Vec<BusReader> = (0..MAX_CONSUMERS).map(|_| attach(&region)).collect();
    let mut slots: Vec<usize> = readers.iter().map(|r| r.slot()).collect();
    slots.sort_unstable();
    assert_eq!(slots, (0..MAX_CONSUMERS).collect::<Vec<_>>());
    assert_eq!(w.consumers(), MAX_CONSUMERS);
    assert!(matches!(
        BusReader::attach(region.clone(), Some(EPOCH), None),
        Err(AttachError::NoSlot(_))
    ));
    assert!(matches!(
        BusReader::attach(region.clone(), Some(EPOCH), Some(MAX_CONSUMERS)),
        Err(AttachError::NoSlot(_))
    ));
    assert!(matches!(
        BusReader::attach(region.clone(), Some(EPOCH), Some(5)),
        Err(AttachError::NoSlot(_))
    ));
    // Every one of them holds the writer back.
    for seq in 0..4 {
        wr(&mut w, seq, 16).unwrap();
    }
    w.publish();
    assert_eq!(wr(&mut w, 4, 16), Err(WriteError::Full));
    for r in readers.iter_mut().skip(1) {
        assert_eq!(drain(r), vec![0, 1, 2, 3]);
    }
    assert_eq!(wr(&mut w, 4, 16), Err(WriteError::Full));
    assert_eq!(drain(&mut readers[0]), vec![0, 1, 2, 3]);
    assert_eq!(wr(&mut w, 4, 16), Ok(4));
    // A dropped reader's slot is reused; so is a released one.
    let i5 = readers.iter().position(|r| r.slot() == 5).unwrap();
    drop(readers.remove(i5));
    assert_eq!(attach(&region).slot(), 5); // (dropped again at once)
    let r = BusReader::attach(region.clone(), Some(EPOCH), Some(5)).unwrap();
    assert_eq!(r.slot(), 5);
    w.release_slot(7);
    let i7 = readers.iter().position(|r| r.slot() == 7).unwrap();
    std::mem::forget(readers.remove(i7)); // a dead consumer
    assert_eq!(
        BusReader::attach(region.clone(), Some(EPOCH), Some(7))
            .unwrap()
            .slot(),
        7
    );
    // A new consumer starts at the head: what was published before is not delivered.
    w.publish();
    let mut late = BusReader::attach(region.clone(), Some(EPOCH), Some(7)).unwrap();
    assert!(late.try_next().unwrap().is_none());
}

// ---------------------------------------------------------------------------------------------
// Bus: overwrite policy
// ---------------------------------------------------------------------------------------------

/// Reads a frame that must be there.
fn must_read(c: &mut BusReader) -> (FrameHeader, Vec<u8>) {
    match c.try_next() {
        Ok(Some(f)) => (*f.header, f.payload.to_vec()),
        other => panic!("{:?}", other.map(|o| o.map(|f| f.header))),
    }
}

#[test]
fn bus_overwrite_consumer_exactly_a_ring_behind_is_not_lapped() {
    // 64-byte frames: four fill the 256-byte bus.
    let (region, mut w) = new_bus(256, Policy::Overwrite);
    let mut c = attach(&region);
    wr(&mut w, 0, 16).unwrap();
    w.publish();
    let (h, p) = must_read(&mut c);
    check_frame(&h, &p, 0, 16);
    for seq in 1..=4 {
        wr(&mut w, seq, 16).unwrap();
    }
    w.publish();
    for seq in 1..=4 {
        let (h, p) = must_read(&mut c);
        check_frame(&h, &p, seq, 16);
    }
    assert!(c.try_next().unwrap().is_none());
    assert_eq!(w.slot_stats()[0].overruns, 0);
    // With wrap padding: 96-byte frames (the third needs an explicit 64-byte padding frame).
    let (region, mut w) = new_bus(256, Policy::Overwrite);
    let mut c = attach(&region);
    wr(&mut w, 0, 48).unwrap();
    w.publish();
    must_read(&mut c);
    wr(&mut w, 1, 48).unwrap(); // 96..192
    wr(&mut w, 2, 48).unwrap(); // padding 192..256, frame 256..352: 352 - 96 == 256
    w.publish();
    for seq in 1..=2 {
        let (h, p) = must_read(&mut c);
        check_frame(&h, &p, seq, 48);
    }
}

/// "Lapped by exactly one frame": the writer has written exactly one frame over the oldest
/// frame the consumer has not read. With 64-byte frames on a 256-byte bus, a consumer that
/// has read frame 0 holds frames 1..=4 (a whole ring); frame 5 lands on frame 1's bytes.
///
/// The consumer cannot find frame boundaries in overwritten bytes, so it resumes at the head
/// (the published tail): it skips frames 1..=5, the intact ones included, and sees nothing
/// until frame 6 arrives; then `Overrun { missed: 5 }`, then frame 6.
#[test]
fn bus_overwrite_lapped_by_exactly_one_frame() {
    let (region, mut w) = new_bus(256, Policy::Overwrite);
    let mut c = attach(&region);
    wr(&mut w, 0, 16).unwrap();
    w.publish();
    must_read(&mut c);
    for seq in 1..=5 {
        wr(&mut w, seq, 16).unwrap();
    }
    w.publish();
    assert!(
        c.try_next().unwrap().is_none(),
        "lapped: resumes at the head"
    );
    wr(&mut w, 6, 16).unwrap();
    w.publish();
    assert_eq!(c.try_next().err(), Some(ReadError::Overrun { missed: 5 }));
    let (h, p) = must_read(&mut c);
    check_frame(&h, &p, 6, 16);
    assert!(c.try_next().unwrap().is_none());
    // Every frame accounted for: 2 delivered + 5 missed = 7 written.
    assert_eq!(c.delivered() + 5, w.next_seq());
    let st = w.slot_stats()[0];
    assert_eq!((st.overruns, st.missed, st.read), (1, 5, 2));

    // The same with wrap padding: 96-byte frames; frame 3 lands on frame 1 (the oldest
    // unread), frames 1..=3 are skipped.
    let (region, mut w) = new_bus(256, Policy::Overwrite);
    let mut c = attach(&region);
    wr(&mut w, 0, 48).unwrap();
    w.publish();
    must_read(&mut c);
    for seq in 1..=3 {
        wr(&mut w, seq, 48).unwrap();
    }
    w.publish();
    assert!(c.try_next().unwrap().is_none());
    wr(&mut w, 4, 48).unwrap();
    w.publish();
    assert_eq!(c.try_next().err(), Some(ReadError::Overrun { missed: 3 }));
    let (h, p) = must_read(&mut c);
    check_frame(&h, &p, 4, 48);
}

/// Lapped by exactly one frame while reading: the writer has *written* frame 5 over frame 1
/// but not published it. The consumer reads frame 1's bytes (now frame 5's header), and the
/// seqlock check (`claim`) catches it: it resumes at the published tail (frame 5), reporting
/// frames 1..=4 missed, then delivers frame 5 intact.
#[test]
fn bus_overwrite_lapped_by_exactly_one_frame_mid_read() {
    let (region, mut w) = new_bus(256, Policy::Overwrite);
    let mut c = attach(&region);
    wr(&mut w, 0, 16).unwrap();
    w.publish();
    must_read(&mut c);
    for seq in 1..=4 {
        wr(&mut w, seq, 16).unwrap();
    }
    w.publish();
    wr(&mut w, 5, 16).unwrap(); // written over frame 1, not published
    assert!(
        c.try_next().unwrap().is_none(),
        "frame 1 is gone, frame 5 not out yet"
    );
    w.publish();
    assert_eq!(c.try_next().err(), Some(ReadError::Overrun { missed: 4 }));
    let (h, p) = must_read(&mut c);
    check_frame(&h, &p, 5, 16);
    assert_eq!(c.delivered() + 4, w.next_seq());
}

#[test]
fn bus_overwrite_lapped_by_many_frames() {
    for (many, cap) in [(10u64, 256usize), (1000, 256), (5000, 4096)] {
        let (region, mut w) = new_bus(cap, Policy::Overwrite);
        let mut c = attach(&region);
        wr(&mut w, 0, 16).unwrap();
        w.publish();
        must_read(&mut c);
        for seq in 1..=many {
            wr(&mut w, seq, len_of(seq, cap)).unwrap();
            if seq % 3 == 0 {
                w.publish();
            }
        }
        w.publish();
        assert!(c.try_next().unwrap().is_none());
        wr(&mut w, many + 1, 5).unwrap();
        w.publish();
        assert_eq!(
            c.try_next().err(),
            Some(ReadError::Overrun { missed: many })
        );
        let (h, p) = must_read(&mut c);
        check_frame(&h, &p, many + 1, 5);
        // Then it goes on normally.
        wr(&mut w, many + 2, 7).unwrap();
        w.publish();
        let (h, p) = must_read(&mut c);
        check_frame(&h, &p, many + 2, 7);
        assert_eq!(w.slot_stats()[0].missed, many);
    }
}

#[test]
fn bus_overwrite_overrun_of_an_unwanted_frame() {
    // The frame a lapped consumer resumes at is not one it subscribed to: the Overrun is still
    // reported, and the frame is not delivered.
    let (region, mut w) = new_bus(256, Policy::Overwrite);
    let mut c = attach(&region);
    c.subscribe(Some(&[0])).unwrap();
    wr(&mut w, 0, 16).unwrap(); // topic 0
    w.publish();
    must_read(&mut c);
    for seq in 1..=6 {
        wr(&mut w, seq, 16).unwrap();
    }
    w.publish();
    assert!(c.try_next().unwrap().is_none());
    wr(&mut w, 7, 16).unwrap(); // topic 2
    wr(&mut w, 10, 16).unwrap(); // bus_seq 8, topic 0
    w.publish();
    assert_eq!(c.try_next().err(), Some(ReadError::Overrun { missed: 6 }));
    let (h, _) = must_read(&mut c);
    assert_eq!((h.bus_seq, h.topic_id), (8, 0));
    assert_eq!(c.delivered(), 2);
}

/// Random writes (sometimes left unpublished, so the seqlock path runs too) and random reads,
/// frames of every size up to the whole bus: every gap in what the consumer sees is reported
/// by the Overrun just before it, with the exact count, and every delivered frame is intact.
#[test]
fn bus_overwrite_accounts_for_every_frame() {
    for cap in [256usize, 512, 4096] {
        let (region, mut w) = new_bus(cap, Policy::Overwrite);
        let mut c = attach(&region);
        let mut rng = Rng::new(cap as u64);
        let mut lens: Vec<usize> = Vec::new();
        let write = |w: &mut BusWriter, rng: &mut Rng, lens: &mut Vec<usize>| {
            let len = match rng.below(10) {
                0 => 1 + rng.below(max_payload(cap) as u64) as usize,
                _ => 1 + rng.below(64) as usize,
            };
            let seq = lens.len() as u64;
            assert_eq!(wr(w, seq, len), Ok(seq));
            lens.push(len);
        };
        // The consumer reads frame 0 before anything can lap it (see the known issue below).
        write(&mut w, &mut rng, &mut lens);
        w.publish();
        must_read(&mut c);
        let (mut last, mut delivered, mut missed_total, mut overruns) = (0u64, 1u64, 0u64, 0u64);
        for _ in 0..4000 {
            let burst = if rng.below(8) == 0 { 200 } else { 6 };
            for _ in 0..rng.below(burst) {
                write(&mut w, &mut rng, &mut lens);
                if rng.below(3) != 0 {
                    w.publish();
                }
            }
            for _ in 0..rng.below(8) {
                match c.try_next() {
                    Ok(Some(f)) => {
                        let seq = f.header.bus_seq;
                        assert_eq!(seq, last + 1, "a gap nobody reported");
                        check_frame(f.header, f.payload, seq, lens[seq as usize]);
                        last = seq;
                        delivered += 1;
                    }
                    Ok(None) => break,
                    Err(ReadError::Overrun { missed }) => {
                        assert!(missed > 0);
                        missed_total += missed;
                        overruns += 1;
                        // The next call returns the frame it resumed at.
                        let (h, p) = must_read(&mut c);
                        assert_eq!(h.bus_seq, last + 1 + missed, "inexact missed count");
                        check_frame(&h, &p, h.bus_seq, lens[h.bus_seq as usize]);
                        last = h.bus_seq;
                        delivered += 1;
                    }
                    Err(e) => panic!("{e:?}"),
                }
            }
        }
        assert!(
            overruns > 10,
            "cap {cap}: the test should lap the consumer ({overruns})"
        );
        assert_eq!(delivered + missed_total, last + 1, "cap {cap}");
        assert_eq!(c.delivered(), delivered);
        let st = w.slot_stats()[0];
        assert_eq!((st.overruns, st.missed), (overruns, missed_total));
    }
}

// ---------------------------------------------------------------------------------------------
// Threaded soaks (no timing assertions; the deadlines only turn a hang into a failure)
// ---------------------------------------------------------------------------------------------

#[test]
fn bus_block_threads_lose_nothing() {
    let cap = 1024;
    let total = 20_000u64;
    let (region, mut w) = new_bus(cap, Policy::Block);
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let mut c = attach(&region);
            std::thread::spawn(move || {
                let mut wait = Backoff::default();
                let mut next = 0u64;
                loop {
                    let f = c
                        .next(&mut wait, Deadline::after(Duration::from_secs(60)))
                        .unwrap();
                    if f.is_eof() {
                        assert_eq!(f.header.bus_seq, total);
                        return next;
                    }
                    check_frame(f.header, f.payload, next, len_of(next, cap));
                    next += 1;
                }
            })
        })
        .collect();
    let mut wait = Backoff::default();
    for seq in 0..total {
        let h = FrameHeader::event(Kind::Trade, 10 * seq, topic_of(seq), 0);
        let s = w
            .write(
                &h,
                &pattern(seq, len_of(seq, cap)),
                &mut wait,
                Deadline::after(Duration::from_secs(60)),
            )
            .unwrap();
        assert_eq!(s, seq);
        if seq % 4 == 0 {
            w.publish();
        }
    }
    w.write_eof(
        u64::MAX,
        &mut wait,
        Deadline::after(Duration::from_secs(60)),
    )
    .unwrap();
    for r in readers {
        assert_eq!(r.join().unwrap(), total);
    }
}

#[test]
fn bus_overwrite_threads_account_for_every_frame() {
    let cap = 1024;
    let total = 200_000u64;
    let (region, mut w) = new_bus(cap, Policy::Overwrite);
    let mut c = attach(&region);
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let len = |seq: u64| 1 + (seq as usize * 13) % 200;
    let reader = std::thread::spawn(move || {
        let (mut last, mut delivered, mut missed_total) = (None::<u64>, 0u64, 0u64);
        let mut pending_missed = 0;
        loop {
            let finished = done2.load(Ordering::Acquire);
            match c.try_next() {
                Ok(Some(f)) => {
                    let seq = f.header.bus_seq;
                    if let Some(l) = last {
                        assert_eq!(seq, l + 1 + pending_missed, "inexact accounting");
                    }
                    pending_missed = 0;
                    check_frame(f.header, f.payload, seq, len(seq));
                    last = Some(seq);
                    delivered += 1;
                }
                Ok(None) if finished => break,
                Ok(None) => std::hint::spin_loop(),
                Err(ReadError::Overrun { missed }) => {
                    pending_missed = missed;
                    missed_total += missed;
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        (last, delivered, missed_total)
    });
    for seq in 0..total {
        assert_eq!(wr(&mut w, seq, len(seq)), Ok(seq));
        w.publish();
    }
    done.store(true, Ordering::Release);
    let (last, delivered, missed) = reader.join().unwrap();
    if let Some(last) = last {
        // Counting from the first frame it saw (it may have been lapped before that one).
        assert!(last < total);
        assert!(delivered + missed <= last + 1);
    }
}

// ---------------------------------------------------------------------------------------------
// Issue 9: lapped, released and stale consumers
// ---------------------------------------------------------------------------------------------

/// A consumer lapped before it had read its first frame did not know which bus sequence to
/// expect, so it reported nothing: the frames it skipped vanished from the accounting. It now
/// takes the bus sequence that goes with the tail it starts at (published with the tail).
#[test]
fn regression_overwrite_lap_before_the_first_frame_is_reported() {
    let (region, mut w) = new_bus(256, Policy::Overwrite);
    let mut c = attach(&region);
    for seq in 0..10 {
        wr(&mut w, seq, 16).unwrap();
    }
    w.publish();
    assert!(c.try_next().unwrap().is_none());
    wr(&mut w, 10, 16).unwrap();
    w.publish();
    assert_eq!(c.try_next().err(), Some(ReadError::Overrun { missed: 10 }));
}

/// A consumer lapped over the last frames of the stream resumed after the END-OF-STREAM
/// frame: it never saw EOF, nor an Overrun (that needs a frame after the lap). It now jumps to
/// the EOF frame (published in the control block, never overwritten), with the exact count.
#[test]
fn regression_overwrite_lap_over_the_eof_is_reported() {
    let (region, mut w) = new_bus(256, Policy::Overwrite);
    let mut c = attach(&region);
    wr(&mut w, 0, 16).unwrap();
    w.publish();
    must_read(&mut c);
    for seq in 1..=10 {
        wr(&mut w, seq, 16).unwrap();
    }
    w.try_write(&eof_header(), &[]).unwrap();
    w.publish();
    assert_eq!(c.try_next().err(), Some(ReadError::Overrun { missed: 10 }));
    let (h, _) = must_read(&mut c);
    assert!(h.has(flags::EOF) && h.bus_seq == 11, "{h:?}");
    assert!(c.try_next().unwrap().is_none());
}

/// The daemon releases a consumer's slot, a new consumer takes it, then the first consumer
/// (alive after all) drops its reader: its destructor frees the new consumer's slot, and a
/// block-policy writer stops waiting for the new consumer.
#[test]
fn regression_dropping_a_released_reader_keeps_the_new_occupant() {
    let (region, w) = new_bus(256, Policy::Block);
    let old = attach(&region);
    w.release_slot(old.slot());
    let new = attach(&region);
    assert_eq!(new.slot(), old.slot());
    drop(old);
    assert_eq!(w.consumers(), 1);
}

/// A block-policy consumer read frames in place with no ownership re-check: once the daemon
/// released its slot (a dead or evicted consumer), the writer lapped it, and on resuming it
/// read a later lap's bytes as its frames ("corrupt bus frame: inconsistent frame: control
/// frame without flag", or a wrong frame). Its next read must say it was evicted, always.
#[test]
fn regression_released_block_reader_never_reads_a_later_lap() {
    let (region, mut w) = new_bus(256, Policy::Block);
    let mut c = attach(&region);
    for seq in 0..3 {
        wr(&mut w, seq, 16).unwrap();
    }
    w.publish();
    let (h, _) = must_read(&mut c);
    assert_eq!(h.bus_seq, 0);
    BusMonitor::open(region.clone(), Some(EPOCH))
        .unwrap()
        .release_slot(c.slot());
    // The writer laps the released consumer, with frames of other lengths (their headers lie
    // where the consumer expects frame 1's).
    for seq in 3..40 {
        assert_eq!(wr(&mut w, seq, 24 + (seq as usize % 3) * 16), Ok(seq));
    }
    w.publish();
    for _ in 0..3 {
        match c.try_next() {
            Err(ReadError::Detached(s)) => assert_eq!(s, c.slot()),
            other => panic!(
                "a released consumer read {:?}",
                other.map(|f| f.map(|f| f.header))
            ),
        }
    }
    assert!(ReadError::Detached(0).to_string().contains("evicted"));
}

/// With no consumer attached, the block writer gated on its own unpublished tail: it wrote a
/// whole ring past the published tail, and a consumer attaching at the published tail then read
/// a later lap's frames (frames 4..8 twice here, never 0..4).
#[test]
fn bus_block_without_consumers_gates_on_the_published_tail() {
    let (region, mut w) = new_bus(256, Policy::Block);
    // 64-byte frames, never published explicitly.
    for seq in 0..8 {
        assert_eq!(wr(&mut w, seq, 16), Ok(seq));
    }
    let mut c = attach(&region);
    let mut got = Vec::new();
    let mut seq = 8;
    while seq < 24 {
        match wr(&mut w, seq, 16) {
            Ok(_) => seq += 1,
            Err(WriteError::Full) => got.extend(drain(&mut c)),
            Err(e) => panic!("{e}"),
        }
    }
    w.publish();
    got.extend(drain(&mut c));
    let first = got[0];
    assert_eq!(
        got,
        (first..24).collect::<Vec<_>>(),
        "frames lost or repeated"
    );
}

/// The overwrite writer published only when asked: a batch longer than the bus (the
/// sequencer writes up to 256 frames per pass) lapped its own unpublished frames, and a
/// consumer found the published tail overwritten, again and again. It now publishes by itself
/// once half a ring is unpublished.
#[test]
fn bus_overwrite_long_batch_publishes_at_half_a_ring() {
    let (region, mut w) = new_bus(256, Policy::Overwrite);
    let mon = BusMonitor::open(region.clone(), Some(EPOCH)).unwrap();
    let mut c = attach(&region);
    for seq in 0..20 {
        assert_eq!(wr(&mut w, seq, 16), Ok(seq));
        // Written: 64 * (seq + 1) bytes; never more than half a ring (plus a frame) unpublished.
        assert!(
            64 * (seq + 1) - mon.tail() <= 128 + 64,
            "frame {seq}: published {}",
            mon.tail()
        );
    }
    w.publish();
    // The consumer was lapped: it resumes at the head and learns exactly how much it missed
    // with the next frame.
    assert!(c.try_next().unwrap().is_none());
    wr(&mut w, 20, 16).unwrap();
    w.publish();
    assert_eq!(c.try_next().err(), Some(ReadError::Overrun { missed: 20 }));
    let (h, p) = must_read(&mut c);
    check_frame(&h, &p, 20, 16);
}

/// A consumer lapped before its first read, over the end of the stream: it jumps to the
/// END-OF-STREAM frame and reports every frame before it as missed.
#[test]
fn bus_overwrite_lapped_before_the_first_read_over_the_end_sees_eof() {
    let (region, mut w) = new_bus(256, Policy::Overwrite);
    // Frames before the consumer attaches are not its business.
    for seq in 0..5 {
        wr(&mut w, seq, 16).unwrap();
    }
    w.publish();
    let mut c = attach(&region);
    for seq in 5..30 {
        wr(&mut w, seq, 16).unwrap();
    }
    w.write_eof(u64::MAX, &mut BusySpin, Deadline::never())
        .unwrap();
    assert_eq!(c.try_next().err(), Some(ReadError::Overrun { missed: 25 }));
    let (h, _) = must_read(&mut c);
    assert!(h.has(flags::EOF) && h.bus_seq == 30, "{h:?}");
}

/// A writer that reopens a bus goes on with its bus sequences, and ends an interrupted
/// publish (odd seqlock version) so that attaching consumers do not wait for it.
#[test]
fn bus_writer_reopen_keeps_the_bus_sequence() {
    let (region, mut w) = new_bus(256, Policy::Overwrite);
    for seq in 0..3 {
        wr(&mut w, seq, 16).unwrap();
    }
    w.publish();
    drop(w);
    let mut w = BusWriter::open(region.clone(), Some(EPOCH)).unwrap();
    assert_eq!(w.next_seq(), 3);
    let mut c = attach(&region);
    wr(&mut w, 3, 16).unwrap();
    w.publish();
    assert_eq!(must_read(&mut c).0.bus_seq, 3);
}

// ---------------------------------------------------------------------------------------------
// Issue 9, item 7: values from shared memory are validated before any arithmetic
// ---------------------------------------------------------------------------------------------

/// `Producer::open` trusted `head` and `tail`: a head past the tail underflowed `has_room`.
#[test]
fn producer_open_refuses_bad_cursors() {
    let cases: [(u64, u64, &str); 4] = [
        (64, 0, "ring head is past its tail"),
        (0, 512, "ring tail is more than a ring past its head"),
        (8, 24, "ring cursors are not 16-byte aligned"),
        (u64::MAX, 16, "ring head is past its tail"),
    ];
    for (head, tail, msg) in cases {
        let ring = Ring::new(256);
        ring.set_head(head);
        ring.set_tail(tail);
        match producer_open_err(ring.dyn_region(), Some(EPOCH)) {
            OpenError::Corrupt(m) => assert_eq!(m, msg, "head {head}, tail {tail}"),
            e => panic!("head {head}, tail {tail}: {e}"),
        }
    }
}

/// A head that jumps past the producer's tail (or back) while it runs is no room, never an
/// underflow (a debug build panicked, a release build saw a huge free space or none).
#[test]
fn producer_never_underflows_on_a_bad_head() {
    let ring = Ring::new(256);
    let mut tx = ring.producer();
    while tx.try_push_frame(&event_header(1, 2), &[7; 16]).is_ok() {}
    for head in [ring.tail() + 4096, u64::MAX, 0] {
        ring.set_head(head);
        assert!(
            tx.try_push_frame(&event_header(1, 2), &[7; 16]).is_err(),
            "head {head}"
        );
    }
}

/// A capacity in a segment header that overflows the segment length is refused, not added
/// up unchecked.
#[test]
fn open_refuses_a_capacity_that_overflows() {
    let region: Arc<dyn Region> = fresh_bus(Policy::Block);
    let capacity = std::mem::offset_of!(SegmentHeader, capacity);
    atomic_u64(&*region, capacity).store(u64::MAX - 64, Ordering::SeqCst);
    match bus_open_err(region, Some(EPOCH)) {
        OpenError::Corrupt(m) => assert_eq!(m, "capacity overflows the address space"),
        e => panic!("{e}"),
    }
}

/// The bus reader trusted the tail: it must move forward, stay a frame boundary and (block
/// policy) stay within a ring of the consumer.
#[test]
fn bus_reader_refuses_bad_tails() {
    let tail_word = HEADER_LEN; // the first word of the bus control block
    type Move = fn(u64) -> u64;
    let cases: [(Move, &str); 4] = [
        (|t| t - 64, "bus tail moved backwards"),
        (|t| t + 8, "bus tail is not 16-byte aligned"),
        (
            |t| t + 256 + 64,
            "bus tail is more than a ring ahead of this consumer",
        ),
        (
            |_| !15,
            "bus tail is more than a ring ahead of this consumer",
        ),
    ];
    for (moved, msg) in cases {
        let (region, mut w) = new_bus(256, Policy::Block);
        let mut c = attach(&region);
        for seq in 0..2 {
            wr(&mut w, seq, 16).unwrap();
        }
        w.publish();
        assert_eq!(drain(&mut c), vec![0, 1]);
        let tail = atomic_u64(&*region, tail_word);
        tail.store(moved(tail.load(Ordering::SeqCst)), Ordering::SeqCst);
        assert_eq!(
            c.try_next().err(),
            Some(ReadError::Corrupt(FrameError::BadCursor(msg)))
        );
    }
}

/// A consumer cursor above the tail underflowed the block writer's gate (it then waited
/// forever): it counts as the tail.
#[test]
fn bus_writer_clamps_a_cursor_above_the_tail() {
    let (region, mut w) = new_bus(256, Policy::Block);
    let c = attach(&region);
    let slot = c.slot();
    std::mem::forget(c);
    // Find the slot's cursor word rather than hard-code the layout.
    assert_eq!(w.slot_stats()[0].cursor, 0);
    let slots = (HEADER_LEN..spmc::geometry(256).data_offset)
        .step_by(8)
        .filter(|&off| atomic_u64(&*region, off).load(Ordering::SeqCst) == 1)
        .collect::<Vec<_>>();
    // The only word equal to 1: the cursor word at position 0 tagged with generation 1 (the
    // owner word of generation 1 is 3, every other word of a fresh bus is 0 or the policy 0).
    assert_eq!(slots.len(), 1, "{slots:?}");
    atomic_u64(&*region, slots[0]).store((1 << 40) | 1, Ordering::SeqCst);
    assert_eq!(w.slot_stats()[0].slot, slot);
    for seq in 0..40 {
        // `Full` once a ring is unpublished (it publishes then); never for good.
        let r = match wr(&mut w, seq, 16) {
            Err(WriteError::Full) => wr(&mut w, seq, 16),
            r => r,
        };
        assert_eq!(r, Ok(seq), "the writer trusted a cursor past its tail");
    }
}

/// `Claim::commit` checked `len <= max_len` with a `debug_assert` only: a release build wrote
/// the frame past its claim (over bytes the reader may be reading) and moved the tail past it.
#[test]
fn commit_longer_than_the_claim_panics() {
    let ring = Ring::new(256);
    let mut tx = ring.producer();
    let c = tx.try_claim(16).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        c.commit(FrameHeader::event(Kind::Trade, 2, 0, 100));
    }));
    assert!(r.is_err(), "a commit past the claim went through");
    assert_eq!(ring.tail(), 0);
}

/// The bus writer did not check `MAX_PAYLOAD_LEN` (only half the bus): on a bus larger than
/// 2 MiB it wrote frames no reader accepts.
#[test]
fn bus_writer_refuses_payloads_above_the_maximum() {
    let cap = 4 * MAX_PAYLOAD_LEN;
    let (_region, mut w) = new_bus(cap, Policy::Block);
    let payload = vec![0u8; MAX_PAYLOAD_LEN + 1];
    assert!(matches!(
        w.try_write(&FrameHeader::event(Kind::Trade, 1, 0, 0), &payload),
        Err(WriteError::TooLarge { .. })
    ));
    assert_eq!(
        w.try_write(
            &FrameHeader::event(Kind::Trade, 1, 0, 0),
            &payload[..MAX_PAYLOAD_LEN]
        ),
        Ok(0)
    );
}
