//! Frame encode/decode benches, per event kind (no ring involved).
//!
//! - `frame/encode/{trade,book,kline}`: rkyv `encode_into` of the event into a 16-aligned
//!   buffer, plus the header's `to_bytes`.
//! - `frame/decode_checked/…`: `FrameHeader::from_bytes`, `decode` (bytecheck validation) and
//!   reading one field (a price mantissa).
//! - `frame/decode_unchecked/…`: the same with `decode_unchecked` (length and alignment only).

use std::hint::black_box;
use std::time::Duration;

use aegis_shm_client::event::{
    decode, decode_unchecked, encode_into, AnyEvent, Book, Decimal, DecodeError, EventRef, Kline,
    Symbol, Trade,
};
use aegis_shm_client::frame::{stride, FrameHeader, Kind, FRAME_HEADER_LEN};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const TS: u64 = 1_726_876_859_999_000_000;

#[repr(align(16))]
struct Aligned([u8; 512]);

fn d(s: &str) -> Decimal {
    Decimal::parse(s).expect("decimal")
}

fn sym(s: &str) -> Symbol {
    Symbol::new(s).expect("symbol")
}

fn events() -> [AnyEvent; 3] {
    [
        AnyEvent::Trade(Trade {
            symbol: sym("BTCUSDT"),
            id: 3_141_592_653,
            price: d("63201.05"),
            qty: d("0.00123"),
            buyer_maker: true,
        }),
        AnyEvent::Book(Book {
            symbol: sym("BTCUSDT"),
            update_id: 51_234_567_890,
            bid_price: d("63201.04"),
            bid_qty: d("1.2345"),
            ask_price: d("63201.05"),
            ask_qty: d("0.5"),
        }),
        AnyEvent::Kline(Kline {
            symbol: sym("BTCUSDT"),
            interval: sym("1m"),
            open_time: TS - 60_000_000_000,
            close_time: TS,
            open: d("63150.00"),
            high: d("63220.12"),
            low: d("63101.5"),
            close: d("63201.05"),
            volume: d("123.456"),
            quote_volume: d("7801234.56789"),
            trades: 4321,
            taker_buy_base: d("61.2"),
            taker_buy_quote: d("3870000.1"),
        }),
    ]
}

/// `decode` or `decode_unchecked`.
type DecodeFn = for<'a> fn(Kind, &'a [u8]) -> Result<EventRef<'a>, DecodeError>;

/// Encodes the event and its frame header; returns the payload length.
#[inline]
fn encode_frame(ev: &AnyEvent, buf: &mut Aligned, hdr: &mut [u8; FRAME_HEADER_LEN]) -> usize {
    let n = match ev {
        AnyEvent::Trade(e) => encode_into(e, &mut buf.0),
        AnyEvent::Book(e) => encode_into(e, &mut buf.0),
        AnyEvent::Kline(e) => encode_into(e, &mut buf.0),
        AnyEvent::Custom(e) => encode_into(e, &mut buf.0),
    }
    .expect("encode");
    *hdr = FrameHeader::event(ev.kind(), TS, 0, n).to_bytes();
    n
}

/// One price mantissa out of the archived event.
#[inline]
fn price(ev: EventRef<'_>) -> i64 {
    match ev {
        EventRef::Trade(t) => t.price.mantissa.to_native(),
        EventRef::Book(b) => b.bid_price.mantissa.to_native(),
        EventRef::Kline(k) => k.close.mantissa.to_native(),
        // No price: the length of its bytes stands in (the bench times market data only).
        EventRef::Custom(c) => c.bytes().len() as i64,
    }
}

/// Parses the header, then decodes the payload with `dec` and reads a price.
#[inline]
fn decode_frame(
    hdr: &[u8; FRAME_HEADER_LEN],
    payload: &[u8],
    dec: impl Fn(Kind, &[u8]) -> Result<EventRef<'_>, DecodeError>,
) -> i64 {
    let h = FrameHeader::from_bytes(hdr);
    let kind = h.kind().expect("kind");
    price(dec(kind, &payload[..h.len as usize]).expect("decode"))
}

fn checked(kind: Kind, p: &[u8]) -> Result<EventRef<'_>, DecodeError> {
    decode(kind, p)
}

fn unchecked(kind: Kind, p: &[u8]) -> Result<EventRef<'_>, DecodeError> {
    // SAFETY: the bench only decodes payloads it encoded itself with `encode_into`.
    unsafe { decode_unchecked(kind, p) }
}

fn check() {
    for ev in events() {
        let mut buf = Aligned([0; 512]);
        let mut hdr = [0u8; FRAME_HEADER_LEN];
        let n = encode_frame(&ev, &mut buf, &mut hdr);
        assert_eq!(n, ev.archived_len());
        let h = FrameHeader::from_bytes(&hdr);
        assert_eq!(h.kind(), Some(ev.kind()));
        assert_eq!(h.validate(4096), Ok(stride(n)));
        let want = match ev {
            AnyEvent::Trade(t) => t.price.mantissa,
            AnyEvent::Book(b) => b.bid_price.mantissa,
            AnyEvent::Kline(k) => k.close.mantissa,
            AnyEvent::Custom(c) => c.bytes().len() as i64,
        };
        assert_eq!(decode_frame(&hdr, &buf.0, checked), want);
        assert_eq!(decode_frame(&hdr, &buf.0, unchecked), want);
        eprintln!(
            "frame check: {:?} archive {n} bytes, decodes both ways",
            ev.kind()
        );
    }
}

fn bench_frame(c: &mut Criterion) {
    check();

    let mut enc = c.benchmark_group("frame/encode");
    enc.throughput(Throughput::Elements(1));
    for ev in events() {
        let mut buf = Aligned([0; 512]);
        let mut hdr = [0u8; FRAME_HEADER_LEN];
        enc.bench_function(BenchmarkId::from_parameter(ev.kind().name()), |b| {
            b.iter(|| {
                let n = encode_frame(black_box(&ev), &mut buf, &mut hdr);
                black_box((&buf, &hdr));
                n
            })
        });
    }
    enc.finish();

    for (group, dec) in [
        ("frame/decode_checked", checked as DecodeFn),
        ("frame/decode_unchecked", unchecked),
    ] {
        let mut g = c.benchmark_group(group);
        g.throughput(Throughput::Elements(1));
        for ev in events() {
            let mut buf = Aligned([0; 512]);
            let mut hdr = [0u8; FRAME_HEADER_LEN];
            let n = encode_frame(&ev, &mut buf, &mut hdr);
            g.bench_function(BenchmarkId::from_parameter(ev.kind().name()), |b| {
                b.iter(|| decode_frame(black_box(&hdr), black_box(&buf.0[..n]), dec))
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = bench_frame
}
criterion_main!(benches);
