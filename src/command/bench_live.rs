//! The live real-path rows of `aegis-shmctl bench` (issue 18): what a strategy author gets
//! with each consumer wait strategy, on the path users run.
//!
//! For every strategy (`spin`, `yield`, `backoff`, `park`), one live session on a private
//! daemon runs two processes, as `session run` starts them:
//!
//! - `aegis-replay --speed 1` of a journal of trades spaced `1 s / rate` apart in event time:
//!   a paced feed, pushed through the source ring (batch of 1, every frame stamped at commit);
//! - `aegis-tap --wait W --format count --json`, which records every event's producer →
//!   consumer latency (`now - publish_ns`) and reports its own CPU time.
//!
//! The sequencer uses the daemon's default wait (park) in every row: only the consumer's
//! strategy changes. A second session per strategy replays two trades [`IDLE_GAP`] apart and
//! gives the consumer's CPU share while the feed is idle. The daemon's CPU share (from
//! `/proc/<pid>/stat`) is reported for the paced session.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use aegis_shm_client::event::{encode_into, Decimal, Event, Symbol, Trade};
use aegis_shm_client::frame::{FrameHeader, Kind};
use aegis_shm_client::protocol::Mode;
use aegis_shm_client::wait::WaitKind;
use aegis_tools::journal::JournalWriter;
use aegis_tools::names::{FileInfo, FileKind};
use serde::Serialize;
use serde_json::Value;

use super::private_daemon::{tool, PrivateDaemon};
use super::CliError;
use crate::cli::{CreateArgs, RunArgs};

/// Event time between the two trades of the idle session.
pub const IDLE_GAP: Duration = Duration::from_secs(2);

/// Event time of the first trade (2024-09-21, as the bundled data).
const TS0: u64 = 1_726_876_800_000_000_000;

/// One row: a consumer wait strategy on the live real path.
#[derive(Serialize, Debug, Clone)]
pub struct LiveRow {
    /// What was measured.
    pub name: String,
    /// The consumer's wait strategy.
    pub wait: String,
    /// Events the consumer received (all of them, or the row is an error).
    pub events: u64,
    /// Producer → consumer latency percentiles, ns.
    pub p50_ns: u64,
    /// 99th percentile, ns.
    pub p99_ns: u64,
    /// 99.9th percentile, ns.
    pub p999_ns: u64,
    /// Largest, ns.
    pub max_ns: u64,
    /// The consumer's CPU time over the paced session's wall time, in percent of one core.
    pub consumer_cpu_pct: f64,
    /// The same while the feed is idle (the two-trade session).
    pub idle_cpu_pct: f64,
    /// The daemon's CPU time over the paced session, in percent of one core.
    pub daemon_cpu_pct: f64,
}

/// Writes a journal of `n` trades spaced `gap` apart in event time.
fn write_trades(path: &Path, n: u64, gap: Duration) -> Result<(), CliError> {
    let info =
        FileInfo::new(FileKind::Trade, "BTCUSDT", None).map_err(|e| CliError(e.to_string()))?;
    let mut w = JournalWriter::create(path, &info).map_err(|e| CliError(e.to_string()))?;
    let mut buf = vec![0u8; Trade::ARCHIVED_LEN];
    let symbol = Symbol::new("BTCUSDT").map_err(CliError)?;
    for i in 0..n {
        let t = Trade {
            symbol,
            id: i,
            price: Decimal {
                mantissa: 6_320_105 + (i % 1000) as i64,
                scale: 2,
            },
            qty: Decimal {
                mantissa: 5 + (i % 7) as i64,
                scale: 1,
            },
            buyer_maker: i % 3 == 0,
        };
        let len = encode_into(&t, &mut buf).map_err(|e| CliError(e.to_string()))?;
        let ts = TS0 + i * gap.as_nanos() as u64;
        let h = FrameHeader::event(Kind::Trade, ts, 0, len);
        w.append_frame(&h, &buf[..len])
            .map_err(|e| CliError(e.to_string()))?;
    }
    w.finish().map_err(|e| CliError(e.to_string()))?;
    Ok(())
}

/// What the tap said about one session.
struct TapReport {
    events: u64,
    seconds: f64,
    cpu_s: f64,
    latency_ns: [u64; 4],
}

/// Runs one live session (paced replay of `journal`, one tap waiting with `wait`) on the
/// daemon at `socket`; returns the tap's report and the daemon's CPU seconds in the session.
fn live_session(
    daemon: &PrivateDaemon,
    socket: &Path,
    dir: &Path,
    journal: &Path,
    wait: WaitKind,
    name: &str,
    record: Option<PathBuf>,
) -> Result<(TapReport, f64), CliError> {
    let (replay, tap) = (tool("aegis-replay")?, tool("aegis-tap")?);
    let report_path = dir.join(format!("{name}.tap.json"));
    let args = RunArgs {
        create: CreateArgs {
            name: name.into(),
            mode: Mode::Live,
            expect: None,
            sequencer_core: None,
            bus_bytes: None,
            source_bytes: None,
            max_lateness_us: None,
            reconcile_s: None,
            record,
            record_segment_bytes: None,
        },
        commands: vec![
            format!("exec {} --speed 1 {}", quote(&replay), quote(journal)),
            format!("exec {} --wait {wait} --format count --json", quote(&tap)),
        ],
        timeout: 120,
        keep: false,
        restart_killed: None,
    };
    let cpu0 = daemon.cpu_seconds();
    let report = std::fs::File::create(&report_path)?;
    let out = super::session::run_components(socket, &args, |i, c| {
        c.stdout(Stdio::null());
        if i == 1 {
            c.stderr(report.try_clone().map_or(Stdio::null(), Stdio::from));
        } else {
            c.stderr(Stdio::null());
        }
    })?;
    let daemon_cpu = match (cpu0, daemon.cpu_seconds()) {
        (Some(a), Some(b)) => b - a,
        _ => f64::NAN,
    };
    if !out.ok {
        return Err(CliError(format!(
            "the live session {name} failed: {}",
            out.run
                .reason
                .clone()
                .unwrap_or_else(|| "a component failed".into())
        )));
    }
    let text = std::fs::read_to_string(&report_path)?;
    let v: Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| CliError(format!("no JSON report from the tap of {name}: {text}")))?;
    let num = |p: &str| v.pointer(p).and_then(Value::as_f64);
    let lat = |p: &str| num(&format!("/latency_ns/{p}")).unwrap_or(0.0) as u64;
    Ok((
        TapReport {
            events: num("/events").unwrap_or(0.0) as u64,
            seconds: num("/seconds").unwrap_or(f64::NAN),
            cpu_s: num("/cpu_s").unwrap_or(f64::NAN),
            latency_ns: [lat("p50"), lat("p99"), lat("p999"), lat("max")],
        },
        daemon_cpu,
    ))
}

/// The rows, one per consumer wait strategy: `events` trades paced at `rate` per second.
pub fn live_rows(dir: &Path, events: u64, rate: u64) -> Result<Vec<LiveRow>, CliError> {
    let paced: PathBuf = dir.join("live-trades.aegisj");
    let idle: PathBuf = dir.join("idle-trades.aegisj");
    write_trades(
        &paced,
        events,
        Duration::from_nanos(1_000_000_000 / rate.max(1)),
    )?;
    write_trades(&idle, 2, IDLE_GAP)?;
    let socket = dir.join("live.sock");
    let daemon = PrivateDaemon::start(&socket)?;
    let mut rows = Vec::new();
    for wait in [
        WaitKind::Spin,
        WaitKind::Yield,
        WaitKind::Backoff,
        WaitKind::Park,
    ] {
        rows.push(live_row(
            &daemon,
            &socket,
            dir,
            (&paced, &idle),
            wait,
            events,
            rate,
            false,
        )?);
    }
    // The same as the park row, with the session recorded (`--record`): the recorder is one
    // more bus consumer in the daemon, writing to the file system (SPEC 11: recording must
    // not slow the live path measurably).
    rows.push(live_row(
        &daemon,
        &socket,
        dir,
        (&paced, &idle),
        WaitKind::Park,
        events,
        rate,
        true,
    )?);
    Ok(rows)
}

/// One row: a paced session and an idle one with consumer wait `wait`, recorded into
/// `dir/rec-*` if `recorded`.
#[allow(clippy::too_many_arguments)]
fn live_row(
    daemon: &PrivateDaemon,
    socket: &Path,
    dir: &Path,
    (paced, idle): (&Path, &Path),
    wait: WaitKind,
    events: u64,
    rate: u64,
    recorded: bool,
) -> Result<LiveRow, CliError> {
    let tag = if recorded { "-recorded" } else { "" };
    let rec = |name: &str| recorded.then(|| dir.join(format!("rec-{name}")));
    let name = format!("live-{wait}{tag}");
    let (r, daemon_cpu) = live_session(daemon, socket, dir, paced, wait, &name, rec(&name))?;
    if r.events != events {
        return Err(CliError(format!(
            "live session with --wait {wait}: the consumer got {} of {events} events",
            r.events
        )));
    }
    let name = format!("idle-{wait}{tag}");
    let (i, _) = live_session(daemon, socket, dir, idle, wait, &name, rec(&name))?;
    let [p50_ns, p99_ns, p999_ns, max_ns] = r.latency_ns;
    Ok(LiveRow {
        name: format!(
            "aegis live real path, consumer --wait {wait} ({rate} events/s){}",
            if recorded { ", session recorded" } else { "" }
        ),
        wait: wait.to_string(),
        events: r.events,
        p50_ns,
        p99_ns,
        p999_ns,
        max_ns,
        consumer_cpu_pct: 100.0 * r.cpu_s / r.seconds,
        idle_cpu_pct: 100.0 * i.cpu_s / i.seconds,
        daemon_cpu_pct: 100.0 * daemon_cpu / r.seconds,
    })
}

/// Quotes `p` for `sh -c`.
pub fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}
