//! The sequencer's per-source checks and live-mode rules: watermarks, bounded lateness, LATE
//! events, timestamps going backwards, corrupt frames.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use aegis::sequencer::{self, Config, Input, Mode, Sequencer, SequencerError, Summary};
use aegis_shm_client::event::{Book, Decimal, Symbol, Trade};
use aegis_shm_client::frame::{flags, FrameHeader, Kind};
use aegis_shm_client::segment::HeapRegion;
use aegis_shm_client::spmc::{self, BusReader, BusWriter, Policy, ReadError};
use aegis_shm_client::spsc::{self, Producer, RingReader};
use aegis_shm_client::stats::{self, SourceState, StatsWriter};
use aegis_shm_client::wait::{Backoff, Deadline, SpinYield};

const RING: usize = 4096;
const BUS: usize = 1 << 16;

fn trade(id: u64) -> Trade {
    Trade {
        symbol: Symbol::new("ETHUSDT").unwrap(),
        id,
        price: Decimal::parse("1.5").unwrap(),
        qty: Decimal::parse("2").unwrap(),
        buyer_maker: false,
    }
}

struct Rig {
    producers: Vec<Producer>,
    reader: BusReader,
    control: Arc<StatsWriter>,
    stop: Arc<AtomicBool>,
    removals: Arc<std::sync::atomic::AtomicU64>,
    handle: JoinHandle<Result<Summary, SequencerError>>,
}

fn rig(names: &[&str], mode: Mode) -> Rig {
    let policy = match mode {
        Mode::Backtest => Policy::Block,
        Mode::Live { .. } => Policy::Overwrite,
    };
    let bus_region = Arc::new(HeapRegion::new(spmc::region_len(BUS)));
    let bus = BusWriter::create(bus_region.clone(), BUS, 1, policy).unwrap();
    let reader = BusReader::attach(bus_region, Some(1), None).unwrap();
    let mut inputs = Vec::new();
    let mut producers = Vec::new();
    for name in names {
        let region = Arc::new(HeapRegion::new(spsc::region_len(RING)));
        let mut p = Producer::create(region.clone(), RING, 1, 0).unwrap();
        p.set_stamp(false);
        producers.push(p);
        inputs.push(Input {
            name: name.to_string(),
            topic_id: None,
            reader: RingReader::open(region, Some(1)).unwrap().into(),
        });
    }
    let control = Arc::new(StatsWriter::create(
        Arc::new(HeapRegion::new(stats::geometry().total_len())),
        1,
    ));
    let mut config = Config::new(mode);
    config.wait = aegis_shm_client::wait::WaitKind::Yield;
    let seq = Sequencer::new(inputs, bus, config, Some(control.clone())).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let removals = seq.removals();
    let handle = sequencer::spawn("rules", seq, stop.clone()).unwrap();
    Rig {
        producers,
        reader,
        control,
        stop,
        removals,
        handle,
    }
}

fn push(p: &mut Producer, ts: u64, id: u64) {
    p.push(
        ts,
        0,
        trade(id),
        &mut Backoff::default(),
        Deadline::after(Duration::from_secs(10)),
    )
    .unwrap();
    p.flush();
}

/// The next event's (ts, id, flags), within 10 s.
fn next(r: &mut BusReader) -> (u64, u64, u8) {
    let f = r
        .next(
            &mut SpinYield::default(),
            Deadline::after(Duration::from_secs(10)),
        )
        .expect("a frame within 10 s");
    if f.is_eof() {
        return (f.header.ts, u64::MAX, f.header.flags);
    }
    let id = match f.event().unwrap() {
        aegis_shm_client::event::EventRef::Trade(t) => t.id.to_native(),
        other => panic!("unexpected {other:?}"),
    };
    (f.header.ts, id, f.header.flags)
}

/// Nothing arrives within `d` (used only where the rule under test holds the merge for far
/// longer than `d`).
fn nothing_for(r: &mut BusReader, d: Duration) {
    match r.next(&mut SpinYield::default(), Deadline::after(d)) {
        Err(ReadError::Timeout) => {}
        Ok(f) => panic!("expected nothing, got {:?}", f.header),
        Err(e) => panic!("{e}"),
    }
}

fn finish(mut rig: Rig) -> (Result<Summary, SequencerError>, Arc<StatsWriter>) {
    for p in &mut rig.producers {
        p.finish(
            &mut Backoff::default(),
            Deadline::after(Duration::from_secs(10)),
        )
        .unwrap();
    }
    let r = rig.handle.join().unwrap();
    (r, rig.control)
}

#[test]
fn live_watermark_releases_events_up_to_it_and_holds_newer_ones() {
    let mut rig = rig(
        &["a", "b"],
        Mode::Live {
            max_lateness: Duration::from_secs(30),
        },
    );
    // b heartbeats first, so it has a watermark and no dry spell to run out.
    rig.producers[1]
        .heartbeat(
            15,
            &mut Backoff::default(),
            Deadline::after(Duration::from_secs(1)),
        )
        .unwrap();
    push(&mut rig.producers[0], 10, 1);
    push(&mut rig.producers[0], 20, 2);
    assert_eq!(next(&mut rig.reader), (10, 1, 0));
    // ts 20 is newer than b's watermark (15), and b is within max_lateness: held.
    nothing_for(&mut rig.reader, Duration::from_millis(300));
    rig.producers[1]
        .heartbeat(
            20,
            &mut Backoff::default(),
            Deadline::after(Duration::from_secs(1)),
        )
        .unwrap();
    assert_eq!(next(&mut rig.reader), (20, 2, 0));
    let (r, _) = finish(rig);
    assert_eq!(r.unwrap().late, 0);
}

#[test]
fn live_idle_source_holds_the_merge_only_for_max_lateness_then_late_events_are_flagged() {
    let mut rig = rig(
        &["a", "b"],
        Mode::Live {
            max_lateness: Duration::from_millis(5),
        },
    );
    push(&mut rig.producers[0], 100, 1);
    // b never sent anything: after max_lateness the merge goes on without it.
    assert_eq!(next(&mut rig.reader), (100, 1, 0));
    // b's event at ts 50 arrives after ts 100 went out: delivered, flagged LATE, counted.
    push(&mut rig.producers[1], 50, 2);
    assert_eq!(next(&mut rig.reader), (50, 2, flags::LATE));
    let (r, control) = finish(rig);
    let summary = r.unwrap();
    assert_eq!(summary.late, 1);
    assert_eq!(
        control
            .counters()
            .late
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// The sequencer's failure, after its thread ended.
fn failure(rig: Rig) -> (String, String) {
    match rig.handle.join().unwrap() {
        Err(SequencerError::SourceFailed {
            source_name,
            reason,
        }) => (source_name, reason),
        other => panic!("expected a source failure, got {other:?}"),
    }
}

#[test]
fn backwards_ts_fails_a_backtest_naming_source_seq_and_both_timestamps() {
    let mut rig = rig(&["a"], Mode::Backtest);
    push(&mut rig.producers[0], 10, 1);
    push(&mut rig.producers[0], 5, 2);
    push(&mut rig.producers[0], 11, 3);
    // Whatever went out before the failure, the bus ends with EOF + ABORT.
    loop {
        let (_, id, fl) = next(&mut rig.reader);
        if id == u64::MAX {
            assert_eq!(fl, flags::EOF | flags::ABORT);
            break;
        }
        assert_eq!(id, 1, "nothing after the backwards event may go out");
    }
    let control = rig.control.clone();
    let (source, reason) = failure(rig);
    assert_eq!(source, "a");
    // Source seq 1 (the second event) has ts 5 after ts 10.
    assert!(
        reason.contains("seq 1") && reason.contains("ts 5") && reason.contains("ts 10"),
        "{reason}"
    );
    let src = &control.sources()[0];
    assert_eq!((src.rejected, src.state), (1, SourceState::Failed));
}

#[test]
fn backwards_ts_in_live_is_refused_counted_and_the_stream_goes_on() {
    let mut rig = rig(
        &["a"],
        Mode::Live {
            max_lateness: Duration::from_millis(1),
        },
    );
    push(&mut rig.producers[0], 10, 1);
    push(&mut rig.producers[0], 5, 2);
    push(&mut rig.producers[0], 4, 3);
    push(&mut rig.producers[0], 11, 4);
    assert_eq!(next(&mut rig.reader), (10, 1, 0));
    assert_eq!(next(&mut rig.reader), (11, 4, 0));
    let (r, control) = finish(rig);
    let summary = r.unwrap();
    assert_eq!((summary.merged, summary.rejected), (2, 2));
    let src = &control.sources()[0];
    assert_eq!(
        (src.events, src.rejected, src.state),
        (2, 2, SourceState::Ended)
    );
}

#[test]
fn stale_heartbeats_do_not_hold_a_live_merge() {
    let mut rig = rig(
        &["a", "b"],
        Mode::Live {
            max_lateness: Duration::from_millis(5),
        },
    );
    // b sends nothing but heartbeats with an old watermark, far more often than max_lateness.
    let stop = Arc::new(AtomicBool::new(false));
    let mut b = rig.producers.pop().unwrap();
    let beating = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                b.heartbeat(
                    1,
                    &mut Backoff::default(),
                    Deadline::after(Duration::from_secs(1)),
                )
                .unwrap();
                b.flush();
                std::thread::sleep(Duration::from_micros(200));
            }
            b
        })
    };
    push(&mut rig.producers[0], 100, 1);
    // Held at most max_lateness after b ran dry, whatever b's heartbeats say.
    assert_eq!(next(&mut rig.reader), (100, 1, 0));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    rig.producers.push(beating.join().unwrap());
    let (r, _) = finish(rig);
    assert_eq!(r.unwrap().merged, 1);
}

#[test]
fn producer_flags_on_event_frames_never_reach_the_bus() {
    let mut rig = rig(&["a"], Mode::Backtest);
    let mut payload = Vec::new();
    {
        // An event frame encoded by hand, with every control flag a producer could set.
        let region = Arc::new(HeapRegion::new(spsc::region_len(RING)));
        let mut p = Producer::create(region.clone(), RING, 1, 0).unwrap();
        p.try_push(10, 0, trade(7)).unwrap();
        p.flush();
        let mut r = RingReader::open(region, Some(1)).unwrap();
        let f = r.peek().unwrap().unwrap();
        payload.extend_from_slice(f.payload);
    }
    let h = FrameHeader {
        kind: Kind::Trade as u8,
        flags: flags::EOF | flags::HEARTBEAT | flags::ABORT | flags::LATE,
        ts: 10,
        len: payload.len() as u32,
        ..FrameHeader::default()
    };
    rig.producers[0].try_push_frame(&h, &payload).unwrap();
    push(&mut rig.producers[0], 11, 8);
    assert_eq!(next(&mut rig.reader), (10, 7, 0));
    assert_eq!(next(&mut rig.reader), (11, 8, 0));
    let (r, _) = finish(rig);
    assert_eq!(r.unwrap().merged, 2);
}

fn book(id: u64) -> Book {
    Book {
        symbol: Symbol::new("ETHUSDT").unwrap(),
        update_id: id,
        bid_price: Decimal::parse("1.5").unwrap(),
        bid_qty: Decimal::parse("2").unwrap(),
        ask_price: Decimal::parse("1.6").unwrap(),
        ask_qty: Decimal::parse("3").unwrap(),
    }
}

#[test]
fn a_run_of_trades_at_one_ts_longer_than_the_ring_goes_through() {
    let mut rig = rig(&["a"], Mode::Backtest);
    // Ten rings' worth of trades at one timestamp: no look-ahead, no staging needed.
    let n = 10 * RING as u64 / 64;
    let mut p = rig.producers.pop().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..n {
            push(&mut p, 42, i);
        }
        p
    });
    for i in 0..n {
        assert_eq!(next(&mut rig.reader), (42, i, 0));
    }
    rig.producers.push(writer.join().unwrap());
    let (r, _) = finish(rig);
    assert_eq!(r.unwrap().merged, n);
}

#[test]
fn staging_is_bounded_by_the_ring_and_fails_the_source_beyond_it() {
    let mut rig = rig(&["a"], Mode::Backtest);
    // Book updates at one timestamp: a later trade at that ts would go first, so the run must
    // be seen whole before any of it goes out. Longer than the staging bound (the ring's size,
    // at least 1 MiB): refused.
    let mut p = rig.producers.pop().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..(2 << 20) / 64 {
            let r = p.push(
                42,
                0,
                book(i),
                &mut Backoff::default(),
                Deadline::after(Duration::from_millis(500)),
            );
            p.flush();
            if r.is_err() {
                break;
            }
        }
    });
    let (_, id, fl) = next(&mut rig.reader);
    assert_eq!(id, u64::MAX, "no part of the run may go out");
    assert_eq!(fl, flags::EOF | flags::ABORT);
    writer.join().unwrap();
    let (source, reason) = failure(rig);
    assert_eq!(source, "a");
    assert!(
        reason.contains("one timestamp (42)") && reason.contains("staging bound"),
        "{reason}"
    );
}

fn push_corrupt(p: &mut Producer) {
    let bad = FrameHeader {
        kind: 9,
        ts: 30,
        len: 64,
        ..FrameHeader::default()
    };
    p.try_push_frame(&bad, &[0u8; 64]).unwrap();
    p.flush();
}

#[test]
fn corrupt_frame_fails_a_backtest_with_the_reason_and_aborts_the_bus() {
    let mut rig = rig(&["good", "bad"], Mode::Backtest);
    push(&mut rig.producers[0], 10, 1);
    push(&mut rig.producers[1], 20, 2);
    push_corrupt(&mut rig.producers[1]);
    // The good source ends, so the merge reaches the corrupt frame (a trade head goes out
    // without looking ahead, so it is found when it is next, not before).
    rig.producers[0]
        .finish(
            &mut Backoff::default(),
            Deadline::after(Duration::from_secs(10)),
        )
        .unwrap();
    // The good event (10) and the bad source's valid one (20) may go out; then EOF + ABORT.
    let mut seen = Vec::new();
    loop {
        let (ts, id, fl) = next(&mut rig.reader);
        if id == u64::MAX {
            assert_eq!(fl, flags::EOF | flags::ABORT);
            break;
        }
        seen.push((ts, id));
    }
    assert!(
        seen.len() <= 2 && seen.iter().all(|&(ts, _)| ts <= 20),
        "{seen:?}"
    );
    let r = rig.handle.join().unwrap();
    match r {
        Err(SequencerError::SourceFailed {
            source_name,
            reason,
        }) => {
            assert_eq!(source_name, "bad");
            assert!(reason.contains("unknown frame kind 9"), "{reason}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    let bad = rig
        .control
        .sources()
        .into_iter()
        .find(|s| s.name == "bad")
        .unwrap();
    assert_eq!(bad.state, SourceState::Failed);
    assert!(bad.reason.unwrap().contains("unknown frame kind"));
}

#[test]
fn corrupt_frame_in_live_fails_only_that_source() {
    let mut rig = rig(
        &["good", "bad"],
        Mode::Live {
            max_lateness: Duration::from_millis(1),
        },
    );
    push_corrupt(&mut rig.producers[1]);
    for i in 0..100 {
        push(&mut rig.producers[0], 100 + i, i);
    }
    for i in 0..100 {
        assert_eq!(next(&mut rig.reader), (100 + i, i, 0));
    }
    rig.producers[0]
        .finish(
            &mut Backoff::default(),
            Deadline::after(Duration::from_secs(10)),
        )
        .unwrap();
    assert_eq!(next(&mut rig.reader).1, u64::MAX);
    let summary = rig.handle.join().unwrap().unwrap();
    assert_eq!(summary.merged, 100);
    let bad = rig
        .control
        .sources()
        .into_iter()
        .find(|s| s.name == "bad")
        .unwrap();
    assert_eq!(bad.state, SourceState::Failed);
}

#[test]
fn removed_live_source_no_longer_holds_the_merge() {
    let mut rig = rig(
        &["a", "b"],
        Mode::Live {
            max_lateness: Duration::from_secs(30),
        },
    );
    rig.producers[1]
        .heartbeat(
            1,
            &mut Backoff::default(),
            Deadline::after(Duration::from_secs(1)),
        )
        .unwrap();
    push(&mut rig.producers[0], 10, 1);
    nothing_for(&mut rig.reader, Duration::from_millis(200));
    // What the daemon does when b's producer dies: set b's bit (rank 1).
    rig.removals
        .fetch_or(1 << 1, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(next(&mut rig.reader), (10, 1, 0));
    rig.producers.truncate(1);
    let (r, control) = finish(rig);
    assert_eq!(r.unwrap().merged, 1);
    let b = control
        .sources()
        .into_iter()
        .find(|s| s.name == "b")
        .unwrap();
    assert_eq!(b.state, SourceState::Removed);
}

#[test]
fn stop_flag_ends_a_stalled_backtest() {
    let mut rig = rig(&["a", "b"], Mode::Backtest);
    push(&mut rig.producers[0], 10, 1);
    // b never sends: an exact merge must wait; the stop flag ends it with Stopped, EOF+ABORT.
    nothing_for(&mut rig.reader, Duration::from_millis(100));
    rig.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        next(&mut rig.reader),
        (0, u64::MAX, flags::EOF | flags::ABORT)
    );
    assert_eq!(rig.handle.join().unwrap(), Err(SequencerError::Stopped));
}

#[test]
fn duplicate_source_names_are_refused() {
    let bus_region = Arc::new(HeapRegion::new(spmc::region_len(BUS)));
    let bus = BusWriter::create(bus_region, BUS, 1, Policy::Block).unwrap();
    let mk = || {
        let region = Arc::new(HeapRegion::new(spsc::region_len(RING)));
        spsc::init_region(&*region, RING, 1).unwrap();
        Input {
            name: "same".into(),
            topic_id: None,
            reader: RingReader::open(region, Some(1)).unwrap().into(),
        }
    };
    let r = Sequencer::new(vec![mk(), mk()], bus, Config::new(Mode::Backtest), None);
    assert!(matches!(r, Err(SequencerError::Config(m)) if m.contains("duplicate")));
}

#[test]
fn kind_priority_is_trade_book_kline() {
    assert!(Kind::Trade.priority() < Kind::Book.priority());
    assert!(Kind::Book.priority() < Kind::Kline.priority());
}
