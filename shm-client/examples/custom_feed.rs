//! A producer of application events: turns NDJSON lines on standard input into `custom`
//! events of one type, published as one source (topic `custom.<type>`). It replays decisions
//! recorded elsewhere (or by `aegis-tap`) into a session, a backtest included: its events
//! have their own times, so the exact merge can place them.
//!
//! Each line is one event: `{"ts":1726876859999000000,"bytes":"6275792030"}` (`ts` in ns,
//! `bytes` in hex, two digits per byte). The lines `aegis-tap --format ndjson` prints for
//! custom events have these fields too, so a tap's output can be fed back; a line whose `type`
//! (if present) is not this feed's type, or whose `kind` is not `custom`, is skipped. Lines
//! must come in event-time order: a line that goes back in time, a bad field, too many
//! bytes, stop the feed with its line number.
//!
//! ```text
//! aegis-shmctl session run day1 --mode backtest \
//!     -c "aegis-replay BTCUSDT-1m-2024-09-21.csv" \
//!     -c "cargo run --release -p aegis-shm-client --example custom_feed -- orders order < orders.ndjson" \
//!     -c "aegis-tap --format ndjson"
//! ```
//!
//! Arguments: the source's name (default `custom-feed`) and the event type (default
//! `signal`).

use std::io::BufRead;
use std::time::Duration;

use aegis_shm_client::client::Component;
use aegis_shm_client::protocol::{Role, SourceDecl};
use aegis_shm_client::wait::{Backoff, Deadline};

/// How long the feed waits for room in its ring before it calls the session stuck.
const STALL: Duration = Duration::from_secs(60);

/// Hex, two digits per byte, either case.
fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("{s:?} has an odd number of hex digits"));
    }
    let digit = |c: u8| {
        (c as char)
            .to_digit(16)
            .map(|d| d as u8)
            .ok_or_else(|| format!("{:?} is not a hex digit", c as char))
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Ok((digit(p[0])? << 4) | digit(p[1])?))
        .collect()
}

/// The event of one line, `None` for a line of another kind or type.
fn parse(text: &str, type_name: &str) -> Result<Option<(u64, Vec<u8>)>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let other = |field: &str, want: &str| v.get(field).is_some_and(|k| k != want);
    if other("kind", "custom") || other("type", type_name) {
        return Ok(None);
    }
    let ts = v["ts"]
        .as_u64()
        .ok_or("ts must be an unsigned integer (ns)")?;
    let bytes = v["bytes"].as_str().ok_or("bytes must be a hex string")?;
    Ok(Some((ts, parse_hex(bytes)?)))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let source = args.next().unwrap_or_else(|| "custom-feed".into());
    let type_name = args.next().unwrap_or_else(|| "signal".into());
    // A bad type name is refused here, before the session hears of it.
    let decl = SourceDecl::custom(&source, &type_name)?;
    let c = Component::from_env(&format!("{source}-feed"), Role::Producer, vec![decl])?;
    let mut feed = c.custom_publisher(&source)?;
    c.ready(Duration::from_secs(300))?;
    let mut wait = Backoff::default();
    let mut last_ts = 0;
    for (i, text) in std::io::stdin().lock().lines().enumerate() {
        let text = text?;
        if text.trim().is_empty() {
            continue;
        }
        let line = i + 1;
        let Some((ts, bytes)) =
            parse(&text, &type_name).map_err(|e| format!("line {line}: {e}"))?
        else {
            continue;
        };
        if ts < last_ts {
            return Err(format!("line {line}: ts {ts} goes back from {last_ts}").into());
        }
        last_ts = ts;
        feed.publish(ts, &bytes, &mut wait, Deadline::after(STALL))
            .map_err(|e| format!("line {line}: {e}"))?;
        if let Some(r) = c.stop_requested() {
            return Err(format!("the daemon stopped the session: {r}").into());
        }
    }
    feed.finish(&mut wait, Deadline::after(STALL))?;
    c.finished()?;
    Ok(())
}
