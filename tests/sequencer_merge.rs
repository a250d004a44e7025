//! The sequencer against a reference sort: for random sources, timing and ring sizes, the bus
//! carries exactly the input sorted by the merge key, and the bus bytes do not depend on timing.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use aegis::sequencer::{merge_key, Config, Input, Mode, Sequencer, SequencerError};
use aegis_shm_client::event::{AnyEvent, Book, Custom, Decimal, EventRef, Kline, Symbol, Trade};
use aegis_shm_client::frame::{flags, FrameHeader, Kind};
use aegis_shm_client::segment::HeapRegion;
use aegis_shm_client::spmc::{self, BusReader, BusWriter, Policy};
use aegis_shm_client::spsc::{self, Producer, RingReader};
use aegis_shm_client::wait::{Backoff, Deadline};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

/// An input event: its kind, its ts, and a tag that identifies it on the bus.
#[derive(Clone, Copy, Debug)]
struct Ev {
    kind: Kind,
    ts: u64,
}

fn make_event(kind: Kind, tag: u64) -> AnyEvent {
    let sym = Symbol::new("BTCUSDT").unwrap();
    let d = Decimal {
        mantissa: tag as i64,
        scale: 2,
    };
    match kind {
        Kind::Trade => AnyEvent::Trade(Trade {
            symbol: sym,
            id: tag,
            price: d,
            qty: d,
            buyer_maker: tag.is_multiple_of(2),
        }),
        Kind::Book => AnyEvent::Book(Book {
            symbol: sym,
            update_id: tag,
            bid_price: d,
            bid_qty: d,
            ask_price: d,
            ask_qty: d,
        }),
        Kind::Kline => AnyEvent::Kline(Kline {
            symbol: sym,
            interval: Symbol::new("1m").unwrap(),
            open_time: 0,
            close_time: 0,
            open: d,
            high: d,
            low: d,
            close: d,
            volume: d,
            quote_volume: d,
            trades: tag,
            taker_buy_base: d,
            taker_buy_quote: d,
        }),
        Kind::Custom => AnyEvent::Custom(Custom::new("signal", &tag.to_le_bytes()).unwrap()),
        Kind::Control => unreachable!("not an event"),
    }
}

fn tag_of(e: EventRef<'_>) -> u64 {
    match e {
        EventRef::Trade(t) => t.id.to_native(),
        EventRef::Book(b) => b.update_id.to_native(),
        EventRef::Kline(k) => k.trades.to_native(),
        EventRef::Custom(c) => u64::from_le_bytes(c.bytes().try_into().expect("8 bytes")),
    }
}

fn tag(source: usize, idx: usize) -> u64 {
    ((source as u64) << 32) | idx as u64
}

/// Pushes `ev` into a producer, retrying on a full ring.
fn push(p: &mut Producer, ts: u64, topic: u32, ev: AnyEvent) {
    let mut w = Backoff::default();
    let d = Deadline::after(Duration::from_secs(60));
    let r = match ev {
        AnyEvent::Trade(e) => p.push(ts, topic, e, &mut w, d).map(drop).map_err(|_| ()),
        AnyEvent::Book(e) => p.push(ts, topic, e, &mut w, d).map(drop).map_err(|_| ()),
        AnyEvent::Kline(e) => p.push(ts, topic, e, &mut w, d).map(drop).map_err(|_| ()),
        AnyEvent::Custom(e) => p.push(ts, topic, e, &mut w, d).map(drop).map_err(|_| ()),
    };
    r.expect("push within the deadline");
}

struct Run {
    /// (source rank, tag) of every bus event, in bus order.
    order: Vec<(u16, u64)>,
    /// Digest of the bus frames (headers without `publish_ns`, plus payloads).
    digest: [u8; 32],
    eof_flags: u8,
}

/// Runs a backtest merge of `sources` (named `names`) with threads for producers, the
/// sequencer and one consumer. `delays[i]`: producer i sleeps that many µs every 7 events.
fn run(
    names: &[String],
    sources: &[Vec<Ev>],
    ring_cap: usize,
    bus_cap: usize,
    delays: &[u64],
    batch: u32,
) -> Result<Run, SequencerError> {
    let bus_region = Arc::new(HeapRegion::new(spmc::region_len(bus_cap)));
    let bus = BusWriter::create(bus_region.clone(), bus_cap, 7, Policy::Block).unwrap();
    let mut reader = BusReader::attach(bus_region, Some(7), None).unwrap();
    let mut inputs = Vec::new();
    let mut producers = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let region = Arc::new(HeapRegion::new(spsc::region_len(ring_cap)));
        let mut p = Producer::create(region.clone(), ring_cap, 7, 0).unwrap();
        p.set_batch(batch);
        p.set_stamp(false);
        inputs.push(Input {
            name: name.clone(),
            topic_id: None,
            reader: RingReader::open(region, Some(7)).unwrap().into(),
        });
        let evs = sources[i].clone();
        let delay = delays[i % delays.len()];
        producers.push(std::thread::spawn(move || {
            for (idx, e) in evs.iter().enumerate() {
                push(&mut p, e.ts, i as u32, make_event(e.kind, tag(i, idx)));
                if delay > 0 && idx % 7 == 0 {
                    std::thread::sleep(Duration::from_micros(delay));
                }
            }
            p.finish(
                &mut Backoff::default(),
                Deadline::after(Duration::from_secs(60)),
            )
            .unwrap();
        }));
    }
    let mut config = Config::new(Mode::Backtest);
    config.batch = 17;
    let seq = Sequencer::new(inputs, bus, config, None)?;
    let stop = Arc::new(AtomicBool::new(false));
    let handle = aegis::sequencer::spawn("test", seq, stop.clone()).unwrap();
    let mut order = Vec::new();
    let mut hasher = Sha256::new();
    let eof_flags;
    loop {
        let f = reader
            .next(
                &mut Backoff::default(),
                Deadline::after(Duration::from_secs(60)),
            )
            .expect("bus frame within 60 s");
        let mut h: FrameHeader = *f.header;
        h.publish_ns = 0;
        hasher.update(h.to_bytes());
        hasher.update(f.payload);
        if f.is_eof() {
            eof_flags = h.flags;
            break;
        }
        order.push((h.source_id, tag_of(f.event().expect("valid payload"))));
    }
    // The sequencer first: if it failed, the producers may be stuck on full rings, and its
    // error says why.
    handle.join().unwrap()?;
    for p in producers {
        p.join().unwrap();
    }
    Ok(Run {
        order,
        digest: hasher.finalize().into(),
        eof_flags,
    })
}

/// The reference: every input event sorted by the merge key, with ranks from sorted names.
fn reference(names: &[String], sources: &[Vec<Ev>]) -> Vec<(u16, u64)> {
    let mut sorted: Vec<usize> = (0..names.len()).collect();
    sorted.sort_by(|&a, &b| names[a].cmp(&names[b]));
    let mut rank = vec![0u16; names.len()];
    for (r, &i) in sorted.iter().enumerate() {
        rank[i] = r as u16;
    }
    let mut all: Vec<(u128, u16, u64)> = Vec::new();
    for (i, evs) in sources.iter().enumerate() {
        for (idx, e) in evs.iter().enumerate() {
            all.push((
                merge_key(e.ts, e.kind, rank[i], idx as u64),
                rank[i],
                tag(i, idx),
            ));
        }
    }
    all.sort_by_key(|x| x.0);
    all.into_iter().map(|(_, r, t)| (r, t)).collect()
}

/// The market-data kinds, and with `custom` the application events too. A custom frame (352
/// bytes) needs a ring of 1 KiB at least (a frame may take half a ring), so the proptests with
/// custom events use rings from 1 KiB and those without keep the 512-byte ones.
fn kind_strategy(custom: bool) -> BoxedStrategy<Kind> {
    if custom {
        prop_oneof![
            Just(Kind::Trade),
            Just(Kind::Book),
            Just(Kind::Kline),
            Just(Kind::Custom)
        ]
        .boxed()
    } else {
        prop_oneof![Just(Kind::Trade), Just(Kind::Book), Just(Kind::Kline)].boxed()
    }
}

/// A source: non-decreasing timestamps from a tiny range, so ties across kinds and sources
/// are everywhere.
fn source_strategy(custom: bool) -> impl Strategy<Value = Vec<Ev>> {
    prop::collection::vec((0u64..3, kind_strategy(custom)), 0..120).prop_map(|steps| {
        let mut ts = 1_000;
        steps
            .into_iter()
            .map(|(d, kind)| {
                ts += d;
                Ev { kind, ts }
            })
            .collect()
    })
}

fn names_for(n: usize, shuffle: u64) -> Vec<String> {
    // Names whose sorted order differs from their index order.
    (0..n)
        .map(|i| format!("src-{:02}", (i as u64 * 7 + shuffle) % 97))
        .collect::<Vec<_>>()
}

/// The property of the `bus_equals_reference_sort*` tests: the bus carries the reference sort.
fn matches_reference(
    sources: &[Vec<Ev>],
    ring_pow: u32,
    bus_pow: u32,
    delays: &[u64],
    batch: u32,
    shuffle: u64,
) -> Result<(), TestCaseError> {
    let mut names = names_for(sources.len(), shuffle);
    names.sort_unstable();
    names.dedup();
    prop_assume!(names.len() == sources.len());
    let names = names_for(sources.len(), shuffle);
    let run = run(&names, sources, 1 << ring_pow, 1 << bus_pow, delays, batch).unwrap();
    prop_assert_eq!(&run.order, &reference(&names, sources));
    prop_assert_eq!(run.eof_flags, flags::EOF);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

    #[test]
    fn bus_equals_reference_sort(
        sources in prop::collection::vec(source_strategy(false), 1..=16),
        ring_pow in 9u32..12,
        bus_pow in 9u32..13,
        delays in prop::collection::vec(prop_oneof![Just(0u64), 0u64..200], 1..4),
        batch in 1u32..9,
        shuffle in 0u64..97,
    ) {
        matches_reference(&sources, ring_pow, bus_pow, &delays, batch, shuffle)?;
    }

    #[test]
    fn bus_equals_reference_sort_with_custom_events(
        sources in prop::collection::vec(source_strategy(true), 1..=16),
        ring_pow in 10u32..12,
        bus_pow in 10u32..13,
        delays in prop::collection::vec(prop_oneof![Just(0u64), 0u64..200], 1..4),
        batch in 1u32..9,
        shuffle in 0u64..97,
    ) {
        matches_reference(&sources, ring_pow, bus_pow, &delays, batch, shuffle)?;
    }

    #[test]
    fn bus_bytes_do_not_depend_on_timing_or_ring_sizes(
        sources in prop::collection::vec(source_strategy(false), 1..=8),
        delays in prop::collection::vec(0u64..300, 1..4),
    ) {
        let names = names_for(sources.len(), 3);
        let a = run(&names, &sources, 512, 512, &[0], 1).unwrap();
        let b = run(&names, &sources, 4096, 1 << 14, &delays, 8).unwrap();
        prop_assert_eq!(a.digest, b.digest);
    }
}

#[test]
fn equal_timestamps_across_all_kinds_and_sources() {
    // Every source has a trade, a book and a kline at the same ts; names in reverse order.
    let names: Vec<String> = ["c", "b", "a"].iter().map(|s| s.to_string()).collect();
    let one = vec![
        Ev {
            kind: Kind::Kline,
            ts: 5,
        },
        Ev {
            kind: Kind::Kline,
            ts: 9,
        },
    ];
    let two = vec![
        Ev {
            kind: Kind::Book,
            ts: 5,
        },
        Ev {
            kind: Kind::Trade,
            ts: 9,
        },
    ];
    let three = vec![
        Ev {
            kind: Kind::Trade,
            ts: 5,
        },
        Ev {
            kind: Kind::Book,
            ts: 9,
        },
    ];
    let sources = vec![one, two, three];
    let run = run(&names, &sources, 512, 512, &[0], 1).unwrap();
    // ts 5: trade ("a", rank 0), book ("b", rank 1), kline ("c", rank 2);
    // ts 9: trade ("b"), book ("a"), kline ("c"). Kind beats rank; names beat input order.
    assert_eq!(
        run.order,
        vec![
            (0, tag(2, 0)),
            (1, tag(1, 0)),
            (2, tag(0, 0)),
            (1, tag(1, 1)),
            (0, tag(2, 1)),
            (2, tag(0, 1))
        ]
    );
}

#[test]
fn empty_sources_and_a_source_that_ends_first() {
    let names: Vec<String> = ["x", "y", "z"].iter().map(|s| s.to_string()).collect();
    let long: Vec<Ev> = (0..500)
        .map(|i| Ev {
            kind: Kind::Trade,
            ts: i,
        })
        .collect();
    let short: Vec<Ev> = (0..3)
        .map(|i| Ev {
            kind: Kind::Book,
            ts: i,
        })
        .collect();
    let sources = vec![Vec::new(), long, short];
    let run = run(&names, &sources, 512, 512, &[0, 50], 3).unwrap();
    assert_eq!(run.order, reference(&names, &sources));
}

#[test]
fn tiny_rings_with_runs_out_of_order() {
    // Runs of equal timestamps written kline, book, trade (the reverse of key order), longer
    // than the 512-byte rings hold: the sequencer must copy them out to reorder them, and must
    // hand the ring space back while it waits for the end of the run.
    let names: Vec<String> = ["p", "q"].iter().map(|s| s.to_string()).collect();
    let mk = |n: u64| -> Vec<Ev> {
        (0..n)
            .flat_map(|i| {
                let ts = 100 + i / 12;
                [
                    Ev {
                        kind: Kind::Kline,
                        ts,
                    },
                    Ev {
                        kind: Kind::Book,
                        ts,
                    },
                    Ev {
                        kind: Kind::Trade,
                        ts,
                    },
                ]
            })
            .collect()
    };
    let sources = vec![mk(60), mk(45)];
    let run = run(&names, &sources, 512, 512, &[0, 20], 1).unwrap();
    assert_eq!(run.order, reference(&names, &sources));
}
