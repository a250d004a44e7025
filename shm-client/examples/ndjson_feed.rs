//! A feed handler: turns NDJSON trades on standard input into events of one source.
//!
//! Each line is one trade:
//! `{"ts":1726876800000000000,"symbol":"BTCUSDT","id":1,"price":"63201.05","qty":"0.001","buyer_maker":true}`
//! (`ts` in ns; decimals as strings, kept exact). Lines must come in event-time order: a line
//! that goes back in time stops the feed with its line number, as `aegis-replay` does.
//!
//! ```text
//! aegis-shmctl session run day1 --mode backtest \
//!     -c "cargo run --release -p aegis-shm-client --example ndjson_feed -- feed < trades.ndjson" \
//!     -c "aegis-tap --format count"
//! ```
//!
//! Arguments: the source's name (default `ndjson-feed`) and the symbol of its topic
//! `trades.<SYMBOL>` (default `BTCUSDT`), both declared at registration.

use std::io::BufRead;
use std::time::Duration;

use aegis_shm_client::client::Component;
use aegis_shm_client::event::{Decimal, Symbol, Trade};
use aegis_shm_client::protocol::{Role, SourceDecl, SourceKind};
use aegis_shm_client::spsc::PushError;
use aegis_shm_client::wait::{Backoff, Deadline};

/// How long the feed waits for room in its ring before it calls the session stuck.
const STALL: Duration = Duration::from_secs(60);

fn field<'a>(
    v: &'a serde_json::Value,
    name: &str,
    line: usize,
) -> Result<&'a serde_json::Value, String> {
    v.get(name)
        .ok_or_else(|| format!("line {line}: no field {name:?}"))
}

/// Parses one NDJSON line into (ts, trade).
fn parse(text: &str, line: usize) -> Result<(u64, Trade), String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("line {line}: {e}"))?;
    let string = |name| {
        field(&v, name, line)?
            .as_str()
            .ok_or_else(|| format!("line {line}: {name} must be a string"))
    };
    let number = |name| {
        field(&v, name, line)?
            .as_u64()
            .ok_or_else(|| format!("line {line}: {name} must be an unsigned integer"))
    };
    let decimal = |name| Decimal::parse(string(name)?).map_err(|e| format!("line {line}: {e}"));
    let trade = Trade {
        symbol: Symbol::new(string("symbol")?).map_err(|e| format!("line {line}: {e}"))?,
        id: number("id")?,
        price: decimal("price")?,
        qty: decimal("qty")?,
        buyer_maker: field(&v, "buyer_maker", line)?
            .as_bool()
            .ok_or_else(|| format!("line {line}: buyer_maker must be true or false"))?,
    };
    Ok((number("ts")?, trade))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let source = args.next().unwrap_or_else(|| "ndjson-feed".into());
    let symbol = args.next().unwrap_or_else(|| "BTCUSDT".into());
    let decl = SourceDecl {
        name: source.clone(),
        kind: SourceKind::Trade,
        topic: format!("trades.{symbol}"),
        journal: None,
        recording: None,
    };
    let c = Component::from_env(&format!("{source}-handler"), Role::Producer, vec![decl])?;
    let (mut producer, topic) = c.producer(&source)?;
    c.ready(Duration::from_secs(300))?;
    let mut wait = Backoff::default();
    let mut last_ts = 0;
    for (i, text) in std::io::stdin().lock().lines().enumerate() {
        let text = text?;
        if text.trim().is_empty() {
            continue;
        }
        let (ts, trade) = parse(&text, i + 1)?;
        if ts < last_ts {
            return Err(format!("line {}: ts {ts} goes back from {last_ts}", i + 1).into());
        }
        last_ts = ts;
        // The clock (for the deadline) is read only when the ring is full.
        match producer.try_push(ts, topic, trade) {
            Ok(_) => {}
            Err(PushError::Full(t)) => {
                producer.push(ts, topic, t, &mut wait, Deadline::after(STALL))?;
            }
            Err(e) => return Err(e.to_string().into()),
        }
        if let Some(r) = c.stop_requested() {
            return Err(format!("the daemon stopped the session: {r}").into());
        }
    }
    producer.finish(&mut wait, Deadline::after(STALL))?;
    c.finished()?;
    Ok(())
}
