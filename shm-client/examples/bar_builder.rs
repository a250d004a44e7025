//! A component that is both a consumer and a producer: it reads the session's trades of one
//! symbol and publishes OHLCV bars (klines) of a fixed interval into the same session, as a
//! source of its own, so every other consumer sees the bars merged with the trades.
//!
//! ```text
//! aegis-shmctl session run day1 --mode live \
//!     -c "aegis-replay --speed 10 BTCUSDT-trades-2024-09-21.csv" \
//!     -c "cargo run --release -p aegis-shm-client --example bar_builder -- BTCUSDT 1" \
//!     -c "aegis-tap --format ndjson --out day1.ndjson"
//! ```
//!
//! Arguments: the symbol (default `BTCUSDT`) and the bar interval in seconds (default 1). The
//! source is `bars-<SYMBOL>-<N>s`, on topic `klines.<SYMBOL>.<N>s`.
//!
//! How it keeps the merge moving, and in order:
//!
//! - A bar's event time is its close time (as for exchange klines). When the first trade of
//!   a bar arrives, the builder sends a heartbeat at that bar's close time: its next event is
//!   never earlier, so the sequencer does not hold other sources back for it until then. A
//!   trade past the close waits (at most the session's `max_lateness`) for the bar, which
//!   then goes out before it, in event-time order.
//! - Its own bars come back on the bus, like every event; it reads trades only.
//! - The session ends when every source has ended, this one included. The builder ends its
//!   source once every other source has ended *and* it has received every event they had
//!   merged (the ctl segment's per-source counts): then the last bar is complete.
//!
//! **Live sessions only.** In a backtest the merge waits until every source has an event, and
//! this source's next event depends on trades the merge would be holding back: a feedback loop
//! that an exact merge cannot run without a look-ahead contract (issue 13 takes it up).

use std::time::{Duration, Instant};

use aegis_shm_client::client::Component;
use aegis_shm_client::event::{Decimal, EventRef, Kline, Symbol};
use aegis_shm_client::protocol::{Role, SourceDecl, SourceKind};
use aegis_shm_client::spmc::ReadError;
use aegis_shm_client::spsc::Producer;
use aegis_shm_client::stats::{SourceState, StatsView};
use aegis_shm_client::wait::{Backoff, Deadline, Park};

/// How long a push may wait for room in the ring.
const STALL: Duration = Duration::from_secs(60);
/// How long the bus may stay silent before the builder gives up.
const IDLE: Duration = Duration::from_secs(60);
/// While idle, how often the builder looks at whether the other sources have ended.
const CHECK: Duration = Duration::from_millis(10);

/// The bar being built.
struct Bar {
    open_time: u64,
    open: Decimal,
    high: Decimal,
    low: Decimal,
    close: Decimal,
    volume: Decimal,
    quote_volume: Decimal,
    trades: u64,
    taker_buy_base: Decimal,
    taker_buy_quote: Decimal,
}

type Error = Box<dyn std::error::Error>;

fn add(a: Decimal, b: Decimal) -> Result<Decimal, Error> {
    a.checked_add(b)
        .ok_or_else(|| format!("{a} + {b} does not fit a decimal").into())
}

fn mul(a: Decimal, b: Decimal) -> Result<Decimal, Error> {
    a.checked_mul(b)
        .ok_or_else(|| format!("{a} × {b} does not fit a decimal").into())
}

impl Bar {
    fn new(open_time: u64, price: Decimal) -> Bar {
        let zero = Decimal {
            mantissa: 0,
            scale: 0,
        };
        Bar {
            open_time,
            open: price,
            high: price,
            low: price,
            close: price,
            volume: zero,
            quote_volume: zero,
            trades: 0,
            taker_buy_base: zero,
            taker_buy_quote: zero,
        }
    }

    fn add_trade(&mut self, price: Decimal, qty: Decimal, buyer_maker: bool) -> Result<(), Error> {
        if price.cmp_value(&self.high).is_gt() {
            self.high = price;
        }
        if price.cmp_value(&self.low).is_lt() {
            self.low = price;
        }
        self.close = price;
        let notional = mul(price, qty)?;
        self.volume = add(self.volume, qty)?;
        self.quote_volume = add(self.quote_volume, notional)?;
        if !buyer_maker {
            // The buyer took liquidity: a taker buy.
            self.taker_buy_base = add(self.taker_buy_base, qty)?;
            self.taker_buy_quote = add(self.taker_buy_quote, notional)?;
        }
        self.trades += 1;
        Ok(())
    }

    fn kline(&self, symbol: Symbol, interval: Symbol, len_ns: u64) -> Kline {
        Kline {
            symbol,
            interval,
            open_time: self.open_time,
            close_time: self.close_time(len_ns),
            open: self.open,
            high: self.high,
            low: self.low,
            close: self.close,
            volume: self.volume,
            quote_volume: self.quote_volume,
            trades: self.trades,
            taker_buy_base: self.taker_buy_base,
            taker_buy_quote: self.taker_buy_quote,
        }
    }

    fn close_time(&self, len_ns: u64) -> u64 {
        self.open_time + len_ns - 1
    }
}

/// The builder's output side.
struct Out {
    producer: Producer,
    topic: u32,
    symbol: Symbol,
    interval: Symbol,
    len_ns: u64,
    wait: Backoff,
    bars: u64,
}

impl Out {
    fn publish(&mut self, bar: &Bar) -> Result<(), Error> {
        let k = bar.kline(self.symbol, self.interval, self.len_ns);
        let ts = k.close_time;
        self.producer
            .push(ts, self.topic, k, &mut self.wait, Deadline::after(STALL))?;
        self.bars += 1;
        Ok(())
    }

    /// Promises that nothing earlier than `ts` comes from this source.
    fn heartbeat(&mut self, ts: u64) -> Result<(), Error> {
        self.producer
            .heartbeat(ts, &mut self.wait, Deadline::after(STALL))?;
        Ok(())
    }
}

/// Whether every other source has ended and every event it merged has been received.
fn upstream_done(stats: &StatsView, me: usize, received: &[u64]) -> bool {
    stats.sources().iter().filter(|s| s.id != me).all(|s| {
        matches!(
            s.state,
            SourceState::Ended | SourceState::Failed | SourceState::Removed
        ) && received.get(s.id).copied().unwrap_or(0) == s.events
    })
}

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let symbol_name = args.next().unwrap_or_else(|| "BTCUSDT".into());
    let secs: u64 = args.next().map_or(Ok(1), |s| s.parse())?;
    if secs == 0 {
        return Err("the interval must be at least 1 second".into());
    }
    let interval_name = format!("{secs}s");
    let source = format!("bars-{symbol_name}-{interval_name}");
    let decl = SourceDecl {
        name: source.clone(),
        kind: SourceKind::Kline,
        topic: format!("klines.{symbol_name}.{interval_name}"),
        journal: None,
        recording: None,
    };
    let c = Component::from_env("bar-builder", Role::Both, vec![decl])?;
    let (producer, topic) = c.producer(&source)?;
    let mut bus = c.consumer()?;
    let stats = c.stats()?;
    c.ready(Duration::from_secs(300))?;
    // Source ids are ranks, fixed when the session starts.
    let me = stats
        .sources()
        .iter()
        .find(|s| s.name == source)
        .map(|s| s.id)
        .ok_or("our source is not in the session")?;
    let symbol = Symbol::new(&symbol_name)?;
    let mut out = Out {
        producer,
        topic,
        symbol,
        interval: Symbol::new(&interval_name)?,
        len_ns: secs * 1_000_000_000,
        wait: Backoff::default(),
        bars: 0,
    };
    let mut received = vec![0u64; aegis_shm_client::stats::MAX_SOURCES];
    let mut bar: Option<Bar> = None;
    let mut ended = false;
    let mut wait = Park::default();
    let mut idle_since: Option<Instant> = None;
    loop {
        let f = match bus.try_next() {
            Ok(Some(f)) => f,
            Ok(None) => {
                let now = Instant::now();
                if now.duration_since(*idle_since.get_or_insert(now)) > IDLE {
                    return Err(format!("nothing arrived for {IDLE:?}").into());
                }
                if let Some(r) = c.stop_requested() {
                    return Err(format!("the daemon stopped the session: {r}").into());
                }
                if !ended && upstream_done(&stats, me, &received) {
                    // Every trade is in: the last bar is complete.
                    if let Some(b) = bar.take() {
                        out.publish(&b)?;
                    }
                    out.producer.finish(&mut out.wait, Deadline::after(STALL))?;
                    ended = true;
                }
                bus.idle(&mut wait, Deadline::after(CHECK));
                continue;
            }
            Err(ReadError::Overrun { missed }) => {
                return Err(
                    format!("lapped: {missed} events missed, the bars would be wrong").into(),
                )
            }
            Err(e) => return Err(e.into()),
        };
        idle_since = None;
        if f.is_eof() {
            break;
        }
        let h = f.header;
        if h.source_id as usize == me {
            continue;
        }
        if let Some(n) = received.get_mut(h.source_id as usize) {
            *n += 1;
        }
        let EventRef::Trade(t) = f.event()? else {
            continue;
        };
        if t.symbol.as_str() != symbol_name {
            continue;
        }
        let (price, qty) = (t.price.get(), t.qty.get());
        let open_time = h.ts - h.ts % out.len_ns;
        if bar.as_ref().is_some_and(|b| b.open_time != open_time) {
            let done = bar.take().expect("checked");
            out.publish(&done)?;
        }
        let b = match &mut bar {
            Some(b) => b,
            None => {
                let b = bar.insert(Bar::new(open_time, price));
                // The new bar's close is the earliest ts this source can still send.
                let close = b.close_time(out.len_ns);
                out.heartbeat(close)?;
                b
            }
        };
        b.add_trade(price, qty, t.buyer_maker)?;
    }
    println!("{source}: {} bars", out.bars);
    c.finished()?;
    Ok(())
}
