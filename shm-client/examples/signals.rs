//! A strategy that publishes application events: it reads the session's trades and, for
//! every trade whose id is a multiple of EVERY, publishes a `signal` custom event (topic
//! `custom.signal`) at the trade's event time, into the same merged stream. Every other
//! consumer sees the signals next to the market data; this component does not get its own
//! back (no self-delivery) unless it is started with `--receive-own`.
//!
//! ```text
//! aegis-shmctl session run day1 --mode live \
//!     -c "aegis-replay --speed 10 BTCUSDT-trades-2024-09-21.csv" \
//!     -c "cargo run --release -p aegis-shm-client --example signals -- strategy 100" \
//!     -c "aegis-tap --format ndjson --out day1.ndjson"
//! ```
//!
//! Arguments: the component's name (default `signals`; its source is `<name>-signals`), EVERY
//! (default 100), and `--receive-own`. A signal's bytes are ASCII: `<SYMBOL> <trade id>`,
//! so in `aegis-tap --format ndjson` they show as hex (`"bytes":"4254435553445420313030"`).
//!
//! When the stream ends it prints one JSON line: the signals it published, the events it
//! received per kind, and how many of them came from its own source (0 unless
//! `--receive-own`):
//! `{"component":"strategy","published":30,"received":{"trade":3000,"book":0,"kline":0,"custom":0},"own":0}`
//!
//! It ends its source once every other source has ended and it has received every event
//! they merged (the ctl segment's per-source counts): then no trade can cause another signal.
//! So two components of this kind in one session would wait for each other; give each
//! session one. **Live sessions only**, as for the `bar_builder` example: in a backtest the
//! exact merge waits for this source's next event, which waits for trades the merge holds.

use std::time::Duration;

use aegis_shm_client::client::Component;
use aegis_shm_client::consume::Delivered;
use aegis_shm_client::event::AnyEvent;
use aegis_shm_client::protocol::{Role, SourceDecl};
use aegis_shm_client::stats::{SourceState, StatsView};
use aegis_shm_client::wait::{Backoff, Deadline};
use aegis_shm_client::Kind;

/// How long a publish may wait for room in the ring.
const STALL: Duration = Duration::from_secs(60);
/// How long the bus may stay silent before the strategy gives up.
const IDLE: Duration = Duration::from_secs(60);
/// While idle, how often it looks at whether the other sources have ended.
const CHECK: Duration = Duration::from_millis(10);

type Error = Box<dyn std::error::Error>;

/// Whether every source but `own` has ended and every event it merged has been received.
fn upstream_done(stats: &StatsView, own: u64, received: &[u64]) -> bool {
    stats
        .sources()
        .iter()
        .filter(|s| s.id >= 64 || own & (1 << s.id) == 0)
        .all(|s| {
            matches!(
                s.state,
                SourceState::Ended | SourceState::Failed | SourceState::Removed
            ) && received.get(s.id).copied().unwrap_or(0) == s.events
        })
}

fn main() -> Result<(), Error> {
    let mut name = "signals".to_string();
    let mut every = 100u64;
    let mut receive_own = false;
    for (i, a) in std::env::args().skip(1).enumerate() {
        match (i, a.as_str()) {
            (_, "--receive-own") => receive_own = true,
            (0, _) => name = a,
            (1, _) => every = a.parse().map_err(|e| format!("EVERY {a:?}: {e}"))?,
            _ => return Err(format!("unexpected argument {a:?}").into()),
        }
    }
    if every == 0 {
        return Err("EVERY must be at least 1".into());
    }
    let source = format!("{name}-signals");
    let c = Component::from_env(
        &name,
        Role::Both,
        vec![SourceDecl::custom(&source, "signal")?],
    )?;
    let mut signals = c.custom_publisher(&source)?;
    let stats = c.stats()?;
    // Attach before READY: nothing is published before the reader is there.
    let mut events = c.events(IDLE)?.receive_own_events(receive_own);
    c.ready(Duration::from_secs(300))?;
    let own = c.own_source_ids()?;
    let mut wait = Backoff::default();
    let mut received = vec![0u64; aegis_shm_client::stats::MAX_SOURCES];
    let mut by_kind = [0u64; 5];
    let (mut published, mut own_received, mut finished) = (0u64, 0u64, false);
    loop {
        let ev: Delivered = match events.try_next()? {
            Some(ev) => ev,
            None if events.ended() => break,
            None => {
                if !finished && upstream_done(&stats, own, &received) {
                    // Every trade is in: no further signal can come.
                    signals.finish(&mut wait, Deadline::after(STALL))?;
                    finished = true;
                }
                events.wait(Deadline::after(CHECK));
                continue;
            }
        };
        if let Some(n) = received.get_mut(ev.source as usize) {
            *n += 1;
        }
        by_kind[ev.event.kind() as usize] += 1;
        if ev.source < 64 && own & (1 << ev.source) != 0 {
            own_received += 1;
        }
        if let AnyEvent::Trade(t) = ev.event {
            if !finished && t.id % every == 0 {
                let text = format!("{} {}", t.symbol, t.id);
                signals.publish(ev.ts, text.as_bytes(), &mut wait, Deadline::after(STALL))?;
                published += 1;
            }
        }
    }
    let kind = |k: Kind| by_kind[k as usize];
    println!(
        "{{\"component\":\"{name}\",\"published\":{published},\"received\":{{\"trade\":{},\"book\":{},\"kline\":{},\"custom\":{}}},\"own\":{own_received}}}",
        kind(Kind::Trade),
        kind(Kind::Book),
        kind(Kind::Kline),
        kind(Kind::Custom)
    );
    c.finished()?;
    Ok(())
}
