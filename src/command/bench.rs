//! `aegis-shmctl bench`: the comparison table of SPEC section 9, every row measured in one
//! run on this machine, with the ratios against the baselines.
//!
//! Latency: Aegis end to end (producer → pinned sequencer → consumer, 64-byte events), the
//! raw cache-line ping-pong between the same two cores, and one Unix socket carrying JSON.
//! Throughput: Aegis replaying journals (mmap) of 3 sources, the same merge in one process
//! over in-memory vectors, and one Unix socket per topic carrying JSON.

use std::path::{Path, PathBuf};

use aegis_shm_client::frame::Kind;
use aegis_tools::journal::{JournalReader, JournalWriter};
use aegis_tools::names::{FileInfo, FileKind};
use serde_json::json;

use super::CliError;
use crate::cli::BenchArgs;
use aegis::sequencer;
use compare::{BenchError, Feed, FramePusher, LatencyRow, ThroughputRow};

/// The comparison harness (ping-pong, socket-JSON, in-process merge, Aegis), kept under
/// `benches/` and out of the daemon's library; this verb only parses arguments and prints.
#[path = "../../benches/compare/mod.rs"]
mod compare;

/// Removes the bench's journal directory, whatever happens.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the synthetic three-source stream as journals, then replays them through Aegis.
fn journal_throughput(events: u64, dir: &Path) -> Result<ThroughputRow, CliError> {
    let sources = compare::synthetic_sources(events);
    let mut feeds = Vec::new();
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
            let (h, payload) = s.frame(j);
            w.append_frame(&h, payload)
                .map_err(|e| CliError(e.to_string()))?;
        }
        w.finish().map_err(|e| CliError(e.to_string()))?;
        feeds.push(Feed {
            name: s.name.to_string(),
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
        });
    }
    drop(sources);
    compare::aegis_throughput_feeds(
        "aegis (3 journals, mmap → rings → sequencer → consumer)",
        feeds,
        1 << 22,
        1 << 22,
    )
    .map_err(|e| CliError(e.to_string()))
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
    let [pingpong, aegis] =
        compare::latency_interleaved(a.samples, 20, true).map_err(|e| CliError(e.to_string()))?;
    let socket = e(compare::socket_json_latency(a.samples))?;
    eprintln!("aegis bench: throughput ({} events)...", a.events);
    let dir = std::env::temp_dir().join(format!("aegis-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let guard = TempDir(dir.clone());
    let journals = journal_throughput(a.events, &dir)?;
    drop(guard);
    let inproc = t(compare::inproc_merge_throughput(a.events))?;
    let sock_thr = t(compare::socket_json_throughput(a.events.min(2_000_000)))?;
    let latency = vec![aegis, pingpong, socket];
    let throughput = vec![journals, inproc, sock_thr];
    let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
    let ratios = json!({
        "aegis_p50_over_pingpong_p50": ratio(latency[0].p50_ns as f64, latency[1].p50_ns as f64),
        "socket_json_p50_over_aegis_p50": ratio(latency[2].p50_ns as f64, latency[0].p50_ns as f64),
        "aegis_over_inproc_throughput": ratio(throughput[0].events_per_s, throughput[1].events_per_s),
        "aegis_over_socket_json_throughput": ratio(throughput[0].events_per_s, throughput[2].events_per_s),
    });
    if json_out {
        println!(
            "{}",
            json!({"latency": latency, "throughput": throughput, "ratios": ratios})
        );
        return Ok(());
    }
    println!(
        "{:<58} {:>10} {:>10} {:>10} {:>12}",
        "latency (one way)", "p50_ns", "p99_ns", "p999_ns", "max_ns"
    );
    for r in &latency {
        println!(
            "{:<58} {:>10} {:>10} {:>10} {:>12}",
            r.name, r.p50_ns, r.p99_ns, r.p999_ns, r.max_ns
        );
    }
    println!();
    println!(
        "{:<58} {:>12} {:>10} {:>14}",
        "throughput", "events", "seconds", "events_per_s"
    );
    for r in &throughput {
        println!(
            "{:<58} {:>12} {:>10.3} {:>14.0}",
            r.name, r.events, r.seconds, r.events_per_s
        );
    }
    println!();
    let f = |k: &str| ratios[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "aegis p50 / ping-pong p50:          {:.2}x (target <= 2)",
        f("aegis_p50_over_pingpong_p50")
    );
    println!(
        "aegis p99.9:                         {} ns (target <= 10000)",
        latency[0].p999_ns
    );
    println!(
        "socket-JSON p50 / aegis p50:         {:.1}x (target >= 10)",
        f("socket_json_p50_over_aegis_p50")
    );
    println!(
        "aegis / in-process merge throughput: {:.2}x (target >= 0.5)",
        f("aegis_over_inproc_throughput")
    );
    println!(
        "aegis / socket-JSON throughput:      {:.1}x (target >= 20)",
        f("aegis_over_socket_json_throughput")
    );
    Ok(())
}
