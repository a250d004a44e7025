//! The synthetic three-source stream (trades, book, klines) every throughput row replays.

use super::*;

/// One source of the synthetic three-source stream, in memory: its timestamps, and a pool of
/// pre-encoded payloads that its `j`-th event takes `j % POOL` from.
pub struct SyntheticSource {
    /// The source's name (`book`, `klines` or `trades`).
    pub name: &'static str,
    /// Its rank: its position among the sorted names, as the sequencer assigns it.
    pub rank: u16,
    /// The kind of its events.
    pub kind: Kind,
    /// The event times, non-decreasing.
    pub ts: Vec<u64>,
    payloads: Vec<Vec<u8>>,
}

impl SyntheticSource {
    /// Number of events.
    pub fn len(&self) -> usize {
        self.ts.len()
    }

    /// Whether the source has no events.
    #[allow(dead_code)] // the pair of `len` (clippy::len_without_is_empty)
    pub fn is_empty(&self) -> bool {
        self.ts.is_empty()
    }

    /// The `j`-th frame: its header (as a producer hands it over) and its payload.
    #[inline]
    pub fn frame(&self, j: usize) -> (FrameHeader, &[u8]) {
        let p = &self.payloads[j % POOL];
        (
            FrameHeader::event(self.kind, self.ts[j], self.rank as u32, p.len()),
            p,
        )
    }

    /// The merge key of the `j`-th event (its source sequence is `j`).
    #[inline]
    pub(super) fn key(&self, j: usize) -> Option<u128> {
        self.ts
            .get(j)
            .map(|&ts| merge_key(ts, self.kind, self.rank, j as u64))
    }
}

#[repr(align(16))]
pub(super) struct Aligned([u8; 512]);

pub(super) fn encode<E: Event>(ev: &E) -> Vec<u8> {
    let mut buf = Aligned([0; 512]);
    let n = encode_into(ev, &mut buf.0).expect("a fixed-size event fits 512 bytes");
    buf.0[..n].to_vec()
}

pub(super) fn dec(mantissa: i64, scale: u8) -> Decimal {
    Decimal { mantissa, scale }
}

pub(super) fn sample_book(i: u64) -> Book {
    Book {
        symbol: Symbol(*b"BTCUSDT\0\0\0\0\0\0\0\0\0"),
        update_id: i,
        bid_price: dec(6_320_100 + (i % 100) as i64, 2),
        bid_qty: dec(12 + (i % 5) as i64, 1),
        ask_price: dec(6_320_101 + (i % 100) as i64, 2),
        ask_qty: dec(3 + (i % 9) as i64, 1),
    }
}

pub(super) fn sample_kline(i: u64) -> Kline {
    let p = |d: i64| dec(6_320_000 + d + (i % 50) as i64, 2);
    Kline {
        symbol: Symbol(*b"BTCUSDT\0\0\0\0\0\0\0\0\0"),
        interval: Symbol(*b"1m\0\0\0\0\0\0\0\0\0\0\0\0\0\0"),
        open_time: TS0 / 1_000_000 + i * 60_000,
        close_time: TS0 / 1_000_000 + i * 60_000 + 59_999,
        open: p(0),
        high: p(90),
        low: p(-40),
        close: p(17),
        volume: dec(1_234_567, 3),
        quote_volume: dec(78_020_111_233, 2),
        trades: 1000 + i,
        taker_buy_base: dec(612_345, 3),
        taker_buy_quote: dec(38_701_234_567, 2),
    }
}

/// Which of the three sources (0 trades, 1 book, 2 klines) each of the first `events`
/// global events belongs to, with its ts.
pub(super) fn global_stream(events: u64) -> impl Iterator<Item = (usize, u64)> {
    (0..events).map(|i| (PATTERN[(i % 10) as usize], TS0 + (i / 2) * 1_000))
}

/// The three-source synthetic stream of `events` events (trades, book, klines ~ 60/30/10 %),
/// sorted by name (so `rank` is the index): `book`, `klines`, `trades`.
pub fn synthetic_sources(events: u64) -> Vec<SyntheticSource> {
    // (name, kind, pattern index) sorted by name.
    let spec: [(&'static str, Kind, usize); 3] = [
        ("book", Kind::Book, 1),
        ("klines", Kind::Kline, 2),
        ("trades", Kind::Trade, 0),
    ];
    let mut ts: [Vec<u64>; 3] = Default::default();
    for (src, t) in global_stream(events) {
        ts[src].push(t);
    }
    spec.iter()
        .enumerate()
        .map(|(rank, &(name, kind, src))| SyntheticSource {
            name,
            rank: rank as u16,
            kind,
            ts: std::mem::take(&mut ts[src]),
            payloads: (0..POOL as u64)
                .map(|i| match kind {
                    Kind::Trade => encode(&sample_trade(i)),
                    Kind::Book => encode(&sample_book(i)),
                    _ => encode(&sample_kline(i)),
                })
                .collect(),
        })
        .collect()
}
