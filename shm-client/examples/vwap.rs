//! A strategy: the volume-weighted average price of every symbol's trades, printed when the
//! stream ends.
//!
//! Run it as a component of a session (`aegis-shmctl session run` gives it `AEGIS_SOCKET`
//! and `AEGIS_SESSION_TOKEN`):
//!
//! ```text
//! aegis-shmctl session run day1 --mode backtest \
//!     -c "aegis-replay BTCUSDT-trades-2024-09-21.csv" \
//!     -c "cargo run --release -p aegis-shm-client --example vwap"
//! ```
//!
//! It prints one line per symbol, sorted: `SYMBOL vwap=PRICE volume=QTY trades=N`.

use std::collections::BTreeMap;
use std::time::Duration;

use aegis_shm_client::client::Component;
use aegis_shm_client::event::AnyEvent;
use aegis_shm_client::protocol::Role;

/// Per symbol: sum of price × quantity, sum of quantity, trades.
#[derive(Default)]
struct Vwap {
    notional: f64,
    volume: f64,
    trades: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let c = Component::from_env("vwap", Role::Consumer, vec![])?;
    // Attach before READY: nothing is published before the reader is there.
    let events = c.events(Duration::from_secs(60))?;
    c.ready(Duration::from_secs(300))?;
    let mut by_symbol: BTreeMap<String, Vwap> = BTreeMap::new();
    for ev in events {
        if let AnyEvent::Trade(t) = ev?.event {
            let v = by_symbol.entry(t.symbol.to_string()).or_default();
            v.notional += t.price.to_f64() * t.qty.to_f64();
            v.volume += t.qty.to_f64();
            v.trades += 1;
        }
    }
    for (symbol, v) in &by_symbol {
        println!(
            "{symbol} vwap={:.8} volume={:.8} trades={}",
            v.notional / v.volume,
            v.volume,
            v.trades
        );
    }
    c.finished()?;
    Ok(())
}
