//! `aegis-shmctl bench`: the comparison table of SPEC section 9, every row measured in one
//! run on this machine, with the ratios against the baselines.
//!
//! Latency: Aegis end to end (producer → pinned sequencer → consumer, 64-byte events), the
//! raw cache-line ping-pong between the same two cores, and one Unix socket carrying JSON.
//! Throughput: Aegis replaying journals (mmap) of 3 sources, the same merge in one process
//! over in-memory vectors, and one Unix socket per topic carrying JSON.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use aegis_shm_client::frame::Kind;
use aegis_tools::journal::{JournalReader, JournalWriter};
use aegis_tools::names::{FileInfo, FileKind};
use serde_json::json;

use super::bench_live::quote;
use super::private_daemon::{tool, PrivateDaemon, TempDir};
use super::table::{Align::Left, Align::Right, TextTable};
use super::{plot, CliError};
use crate::cli::{BenchArgs, CreateArgs, RunArgs};
use aegis::sequencer;
use aegis_shm_client::protocol::Mode;
use compare::{BenchError, Feed, FramePusher, LatencyRow, ThroughputRow};
use serde::Serialize;

/// The comparison harness (ping-pong, socket-JSON, in-process merge, Aegis), kept under
/// `benches/` and out of the daemon's library; this verb only parses arguments and prints.
#[path = "../../benches/compare/mod.rs"]
mod compare;

/// Writes the synthetic three-source stream as journals in `dir`.
fn write_journals(events: u64, dir: &Path) -> Result<Vec<PathBuf>, CliError> {
    let sources = compare::synthetic_sources(events);
    let mut paths = Vec::new();
    for s in &sources {
        let info = match s.kind {
            Kind::Trade => FileInfo::new(FileKind::Trade, "BTCUSDT", None),
            Kind::Book => FileInfo::new(FileKind::BookTicker, "BTCUSDT", None),
            _ => FileInfo::new(FileKind::Kline, "BTCUSDT", Some("1m")),
        }
        .map_err(|e| CliError(e.to_string()))?;
        let path = dir.join(format!("{}.aegisj", s.name));
        let mut w = JournalWriter::create(&path, &info).map_err(|e| CliError(e.to_string()))?;
        for j in 0..s.len() {
            // `source_seq` = the index, as `aegis-replay --convert` writes journals.
            let (mut h, payload) = s.frame(j);
            h.source_seq = j as u64;
            w.append_frame(&h, payload)
                .map_err(|e| CliError(e.to_string()))?;
        }
        w.finish().map_err(|e| CliError(e.to_string()))?;
        paths.push(path);
    }
    Ok(paths)
}

/// The threads-in-one-process row: producer threads push the journals into rings, the
/// sequencer and one consumer thread run beside them.
fn threads_throughput(journals: &[PathBuf]) -> Result<ThroughputRow, CliError> {
    let feeds = journals
        .iter()
        .map(|path| {
            let path = path.clone();
            Feed {
                name: path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                push: Box::new(move |p: &mut FramePusher| {
                    let mut r =
                        JournalReader::open(&path).map_err(|e| BenchError::Setup(e.to_string()))?;
                    r.for_each(|f| -> Result<(), JournalFeedError> {
                        p.push(&f.header, f.payload)
                            .map_err(JournalFeedError::Bench)
                    })
                    .map(drop)
                    .map_err(|e| match e {
                        JournalFeedError::Bench(b) => b,
                        JournalFeedError::Journal(j) => BenchError::Failed(j),
                    })
                }),
            }
        })
        .collect();
    compare::aegis_throughput_feeds(
        "aegis, threads in one process (journals → rings → sequencer → consumer)",
        feeds,
        1 << 22,
        1 << 22,
    )
    .map_err(|e| CliError(e.to_string()))
}

/// Peak resident sets of the real path's processes, in kB.
#[derive(Serialize, Debug, Default)]
struct PeakRss {
    daemon_kb: Option<u64>,
    replay_kb: Option<u64>,
    tap_kb: Option<u64>,
}

impl PeakRss {
    /// The larger of each figure.
    fn max(self, o: PeakRss) -> PeakRss {
        let m = |a: Option<u64>, b: Option<u64>| a.max(b);
        PeakRss {
            daemon_kb: m(self.daemon_kb, o.daemon_kb),
            replay_kb: m(self.replay_kb, o.replay_kb),
            tap_kb: m(self.tap_kb, o.tap_kb),
        }
    }
}

/// The run with the median rate (the lower middle one of an even count).
fn median_run(mut runs: Vec<ThroughputRow>) -> ThroughputRow {
    runs.sort_by(|a, b| a.events_per_s.total_cmp(&b.events_per_s));
    let mid = (runs.len() - 1) / 2;
    runs.swap_remove(mid)
}

/// Bus bytes of the real-path session.
const REAL_PATH_BUS: usize = 4 << 20;

/// The headline row, the path users run: a daemon, then `session run` with one
/// `aegis-replay` of the journals and one `aegis-tap --format count`, as separate processes.
/// The rate is the session's own: events merged over the time from its start to its end.
fn real_path_throughput(
    journals: &[PathBuf],
    dir: &Path,
) -> Result<(ThroughputRow, PeakRss), CliError> {
    let (replay, tap) = (tool("aegis-replay")?, tool("aegis-tap")?);
    let socket = dir.join("bench.sock");
    let daemon = PrivateDaemon::start(&socket)?;
    let files: Vec<String> = journals.iter().map(|p| quote(p)).collect();
    let args = RunArgs {
        create: CreateArgs {
            name: "bench".into(),
            mode: Mode::Backtest,
            expect: None,
            sequencer_core: None,
            bus_bytes: Some(REAL_PATH_BUS),
            source_bytes: None,
            max_lateness_us: None,
            reconcile_s: None,
            record: None,
            record_segment_bytes: None,
        },
        commands: vec![
            format!("exec {} {}", quote(&replay), files.join(" ")),
            format!("exec {} --format count", quote(&tap)),
        ],
        timeout: 600,
        keep: false,
        restart_killed: None,
    };
    let out = super::session::run_components(&socket, &args, |_, c| {
        c.stdout(Stdio::null()).stderr(Stdio::null());
    })?;
    let rss = PeakRss {
        daemon_kb: daemon.peak_rss_kb(),
        replay_kb: out.run.components.first().and_then(|c| c.max_rss_kb),
        tap_kb: out.run.components.get(1).and_then(|c| c.max_rss_kb),
    };
    drop(daemon);
    let session = out.run.session.as_ref();
    let (merged, secs) = session
        .map(|s| (s.sequencer.events_merged, s.elapsed_s.unwrap_or(0.0)))
        .unwrap_or_default();
    if !out.ok || secs <= 0.0 {
        return Err(CliError(format!(
            "the real-path session failed: {}",
            out.run
                .reason
                .clone()
                .or_else(|| session.and_then(|s| s.reason.clone()))
                .unwrap_or_else(|| "a component failed".into())
        )));
    }
    let row = ThroughputRow::new(
        "aegis real path (daemon + aegis-replay + aegis-tap processes, 3 journals)",
        merged,
        std::time::Duration::from_secs_f64(secs),
    );
    Ok((row, rss))
}

enum JournalFeedError {
    Bench(BenchError),
    Journal(String),
}

impl From<aegis_tools::journal::JournalError> for JournalFeedError {
    fn from(e: aegis_tools::journal::JournalError) -> JournalFeedError {
        JournalFeedError::Journal(e.to_string())
    }
}

/// Runs every measurement and prints one table (or JSON).
pub fn run(json_out: bool, a: &BenchArgs) -> Result<(), CliError> {
    let e = |r: Result<LatencyRow, BenchError>| r.map_err(|e| CliError(e.to_string()));
    let t = |r: Result<ThroughputRow, BenchError>| r.map_err(|e| CliError(e.to_string()));
    eprintln!("aegis bench: latency ({} samples)...", a.samples);
    // Interleaved rounds: the hypervisor moves virtual cores around, so the two rows are
    // only comparable when measured under the same placements.
    let [pingpong, aegis, fanout, bus_hop, relay] =
        compare::latency_interleaved(a.samples, 20, true).map_err(|e| CliError(e.to_string()))?;
    let socket = e(compare::socket_json_latency(a.samples))?;
    let live = if a.live_events > 0 {
        eprintln!(
            "aegis bench: live real path, one session per consumer wait strategy ({} events at {}/s)...",
            a.live_events, a.live_rate
        );
        let dir = TempDir::new("aegis-bench-live")?;
        super::bench_live::live_rows(&dir.0, a.live_events, a.live_rate)?
    } else {
        Vec::new()
    };
    eprintln!("aegis bench: throughput ({} events)...", a.events);
    let tmp = TempDir::new("aegis-bench")?;
    let journals = write_journals(a.events, &tmp.0)?;
    // The real path and its baseline alternate, so that both sample the same spells of a
    // busy machine; each row is its median run.
    let (mut reals, mut inprocs) = (Vec::new(), Vec::new());
    let mut rss = PeakRss::default();
    for round in 0..a.rounds {
        if a.rounds > 1 {
            eprintln!(
                "aegis bench: throughput round {}/{}...",
                round + 1,
                a.rounds
            );
        }
        let (real, r) = real_path_throughput(&journals, &tmp.0)?;
        reals.push(real);
        rss = rss.max(r);
        inprocs.push(t(compare::inproc_merge_throughput(a.events))?);
    }
    let runs = json!({
        "rounds": a.rounds,
        "real_path_events_per_s": reals.iter().map(|r| r.events_per_s).collect::<Vec<_>>(),
        "inproc_events_per_s": inprocs.iter().map(|r| r.events_per_s).collect::<Vec<_>>(),
    });
    let (real, inproc) = (median_run(reals), median_run(inprocs));
    let threads = threads_throughput(&journals)?;
    drop(tmp);
    let sock_thr = t(compare::socket_json_throughput(a.events.min(2_000_000)))?;
    let latency = vec![aegis, pingpong, socket, fanout, bus_hop, relay];
    let throughput = vec![real, inproc, sock_thr, threads];
    let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
    let ratios = json!({
        "aegis_p50_over_pingpong_p50": ratio(latency[0].p50_ns as f64, latency[1].p50_ns as f64),
        "aegis_p50_over_round_trip_p50": ratio(latency[0].p50_ns as f64, 2.0 * latency[1].p50_ns as f64),
        "fanout_2_over_1_consumer_p50": ratio(latency[3].p50_ns as f64, latency[0].p50_ns as f64),
        "bus_hop_p50_over_pingpong_p50": ratio(latency[4].p50_ns as f64, latency[1].p50_ns as f64),
        "bus_hop_share_of_aegis_p50": ratio(latency[4].p50_ns as f64, latency[0].p50_ns as f64),
        "aegis_p50_over_raw_relay_p50": ratio(latency[0].p50_ns as f64, latency[5].p50_ns as f64),
        "raw_relay_p50_over_round_trip_p50": ratio(latency[5].p50_ns as f64, 2.0 * latency[1].p50_ns as f64),
        "socket_json_p50_over_aegis_p50": ratio(latency[2].p50_ns as f64, latency[0].p50_ns as f64),
        "aegis_over_inproc_throughput": ratio(throughput[0].events_per_s, throughput[1].events_per_s),
        "aegis_over_socket_json_throughput": ratio(throughput[0].events_per_s, throughput[2].events_per_s),
    });
    if let Some(path) = &a.plot {
        plot_latency(path, &latency)?;
    }
    if json_out {
        println!(
            "{}",
            json!({"latency": latency, "live": live, "throughput": throughput, "ratios": ratios, "peak_rss": rss, "throughput_runs": runs})
        );
        return Ok(());
    }
    print_tables(&latency, &live, &throughput, &rss, &ratios, &runs);
    Ok(())
}

/// Draws the latency rows' distributions into the SVG file `path` (`--plot`).
fn plot_latency(path: &Path, latency: &[LatencyRow]) -> Result<(), CliError> {
    let series: Vec<plot::Series> = latency
        .iter()
        .map(|r| plot::Series {
            name: &r.name,
            points: r.percentiles.iter().map(|p| (p.quantile, p.ns)).collect(),
        })
        .collect();
    plot::latency_svg(path, "aegis-shmctl bench: one-way latency", &series)?;
    eprintln!("aegis bench: latency plot written to {}", path.display());
    Ok(())
}

/// The text output: the latency and throughput tables, peak RSS, the ratios and targets.
fn print_tables(
    latency: &[LatencyRow],
    live: &[super::bench_live::LiveRow],
    throughput: &[ThroughputRow],
    rss: &PeakRss,
    ratios: &serde_json::Value,
    runs: &serde_json::Value,
) {
    let mut t = TextTable::new(&[
        ("latency (one way)", Left),
        ("p50_ns", Right),
        ("p99_ns", Right),
        ("p999_ns", Right),
        ("max_ns", Right),
    ]);
    for r in latency {
        t.row([
            r.name.clone(),
            r.p50_ns.to_string(),
            r.p99_ns.to_string(),
            r.p999_ns.to_string(),
            r.max_ns.to_string(),
        ]);
    }
    t.print(0);
    println!();
    if !live.is_empty() {
        let mut t = TextTable::new(&[
            ("live real path (processes, paced feed)", Left),
            ("p50_ns", Right),
            ("p99_ns", Right),
            ("p999_ns", Right),
            ("max_ns", Right),
            ("cpu%", Right),
            ("idle cpu%", Right),
            ("daemon cpu%", Right),
        ]);
        for r in live {
            t.row([
                r.name.clone(),
                r.p50_ns.to_string(),
                r.p99_ns.to_string(),
                r.p999_ns.to_string(),
                r.max_ns.to_string(),
                format!("{:.1}", r.consumer_cpu_pct),
                format!("{:.1}", r.idle_cpu_pct),
                format!("{:.1}", r.daemon_cpu_pct),
            ]);
        }
        t.print(0);
        println!();
    }
    let mut t = TextTable::new(&[
        ("throughput", Left),
        ("events", Right),
        ("seconds", Right),
        ("events_per_s", Right),
    ]);
    for r in throughput {
        t.row([
            r.name.clone(),
            r.events.to_string(),
            format!("{:.3}", r.seconds),
            format!("{:.0}", r.events_per_s),
        ]);
    }
    t.print(0);
    println!();
    let mb =
        |kb: Option<u64>| kb.map_or("?".to_string(), |k| format!("{:.0} MB", k as f64 / 1024.0));
    println!(
        "peak RSS on the real path: daemon {}, aegis-replay {}, aegis-tap {} (target < 200 MB each)",
        mb(rss.daemon_kb),
        mb(rss.replay_kb),
        mb(rss.tap_kb)
    );
    let rates = |k: &str| {
        runs[k]
            .as_array()
            .map(|v| {
                v.iter()
                    .map(|r| format!("{:.1}", r.as_f64().unwrap_or(f64::NAN) / 1e6))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    println!(
        "real path and in-process rows: the median of {} alternated runs each (M events/s: real path {}; in-process {})",
        runs["rounds"],
        rates("real_path_events_per_s"),
        rates("inproc_events_per_s")
    );
    let f = |k: &str| ratios[k].as_f64().unwrap_or(f64::NAN);
    let mut t = TextTable::new(&[("ratio", Left), ("measured", Right), ("target", Left)]);
    t.row([
        "aegis p50 / ping-pong p50".to_string(),
        format!("{:.2}x", f("aegis_p50_over_pingpong_p50")),
        "<= 2".to_string(),
    ]);
    t.row([
        "aegis p50 / ping-pong round trip (2 hops)".to_string(),
        format!("{:.2}x", f("aegis_p50_over_round_trip_p50")),
        "<= 2 (issue 10)".to_string(),
    ]);
    t.row([
        "bus hop p50 / ping-pong p50 (sequencer → consumer, one transfer)".to_string(),
        format!("{:.2}x", f("bus_hop_p50_over_pingpong_p50")),
        "(where the latency goes)".to_string(),
    ]);
    t.row([
        "raw relay p50 / ping-pong round trip (the path's floor, no Aegis work)".to_string(),
        format!("{:.2}x", f("raw_relay_p50_over_round_trip_p50")),
        "(the floor of the target above)".to_string(),
    ]);
    t.row([
        "aegis p50 / raw relay p50 (Aegis's own work on the path)".to_string(),
        format!("{:.2}x", f("aegis_p50_over_raw_relay_p50")),
        "(where the latency goes)".to_string(),
    ]);
    t.row([
        "aegis p50, 2 consumers / 1 consumer".to_string(),
        format!("{:.2}x", f("fanout_2_over_1_consumer_p50")),
        "<= 1.3".to_string(),
    ]);
    t.row([
        "aegis p99.9".to_string(),
        format!("{} ns", latency[0].p999_ns),
        "<= 10000 ns".to_string(),
    ]);
    t.row([
        "socket-JSON p50 / aegis p50".to_string(),
        format!("{:.1}x", f("socket_json_p50_over_aegis_p50")),
        ">= 10".to_string(),
    ]);
    t.row([
        "aegis / in-process merge throughput".to_string(),
        format!("{:.2}x", f("aegis_over_inproc_throughput")),
        ">= 0.5".to_string(),
    ]);
    t.row([
        "aegis / socket-JSON throughput".to_string(),
        format!("{:.1}x", f("aegis_over_socket_json_throughput")),
        ">= 20".to_string(),
    ]);
    t.print(0);
}
