//! `aegis-shmctl demo`: the embedded default. Starts a daemon on a private socket, replays the
//! bundled Binance klines plus generated trade and book streams through a backtest session
//! with several consumer processes, prints their rates, latencies and digests (which must be
//! equal), cleans up, and exits 0.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::private_daemon::{tool, PrivateDaemon, TempDir};
use super::session::{Outcome, RunSummary};
use super::table::{Align::Left, Align::Right, TextTable};
use super::CliError;
use crate::cli::{CreateArgs, DemoArgs, RunArgs};
use aegis_shm_client::protocol::Mode;

/// The real Binance 1m klines of 2024-09-21, bundled in the binary.
const KLINES_1M: &str = include_str!("../../data/binance/BTCUSDT-1m-2024-09-21.csv");
const KLINES_NAME: &str = "BTCUSDT-1m-2024-09-21.csv";
const DAY_START_MS: u64 = 1_726_876_800_000;
const DAY_MS: u64 = 86_400_000;

/// A tiny deterministic generator (xorshift64*), so every run replays the same streams.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Timestamps (ms) for `n` events over the day, non-decreasing, with one in eight landing
/// exactly on a kline close time (`...59999`), so ties across kinds are common.
fn timestamps(n: u64, rng: &mut Rng) -> impl Iterator<Item = u64> + '_ {
    (0..n).map(move |i| {
        let t = DAY_START_MS + i * DAY_MS / n;
        if rng.next().is_multiple_of(8) {
            // The close time of the minute this event falls in.
            (t / 60_000) * 60_000 + 59_999
        } else {
            t
        }
    })
}

/// Writes a Binance `trades` CSV (6 columns, no header, ms), sorted by time.
fn write_trades(path: &Path, n: u64) -> std::io::Result<()> {
    let mut rng = Rng(0x5EED_0001);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut ts: Vec<u64> = timestamps(n, &mut Rng(7)).collect();
    ts.sort_unstable();
    let mut price = 6_320_105i64; // cents
    for (i, t) in ts.into_iter().enumerate() {
        price += (rng.next() % 21) as i64 - 10;
        let qty = 1 + rng.next() % 200_000; // 1e-5 units
        let maker = if rng.next().is_multiple_of(2) {
            "True"
        } else {
            "False"
        };
        writeln!(
            out,
            "{},{}.{:02},{}.{:05},{:.7},{},{}",
            4_000_000_000u64 + i as u64,
            price / 100,
            price % 100,
            qty / 100_000,
            qty % 100_000,
            (price as f64 / 100.0) * (qty as f64 / 100_000.0),
            t,
            maker
        )?;
    }
    out.flush()
}

/// Writes a Binance `bookTicker` CSV (with a header, as futures files have), sorted by time.
fn write_book(path: &Path, n: u64) -> std::io::Result<()> {
    let mut rng = Rng(0x5EED_0002);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "update_id,best_bid_price,best_bid_qty,best_ask_price,best_ask_qty,transaction_time,event_time")?;
    let mut ts: Vec<u64> = timestamps(n, &mut Rng(11)).collect();
    ts.sort_unstable();
    let mut bid = 6_320_100i64;
    for (i, t) in ts.into_iter().enumerate() {
        bid += (rng.next() % 21) as i64 - 10;
        let ask = bid + 1 + (rng.next() % 3) as i64;
        writeln!(
            out,
            "{},{}.{:02},{}.{:03},{}.{:02},{}.{:03},{},{}",
            9_000_000_000u64 + i as u64,
            bid / 100,
            bid % 100,
            rng.next() % 5,
            rng.next() % 1000,
            ask / 100,
            ask % 100,
            rng.next() % 5,
            rng.next() % 1000,
            t,
            t + 1
        )?;
    }
    out.flush()
}

/// The demo's input files: the bundled klines and the generated trades and book updates.
struct Inputs {
    klines: PathBuf,
    trades_csv: PathBuf,
    book_csv: PathBuf,
}

/// Writes the bundled klines and generates `events` trades and book updates (3:2) in `dir`.
fn generate_inputs(dir: &Path, events: u64) -> Result<Inputs, CliError> {
    let inputs = Inputs {
        klines: dir.join(KLINES_NAME),
        trades_csv: dir.join("BTCUSDT-trades-2024-09-21.csv"),
        book_csv: dir.join("BTCUSDT-bookTicker-2024-09-21.csv"),
    };
    std::fs::write(&inputs.klines, KLINES_1M)?;
    let n_trades = events * 3 / 5;
    let n_book = events - n_trades;
    let t = Instant::now();
    write_trades(&inputs.trades_csv, n_trades)?;
    write_book(&inputs.book_csv, n_book)?;
    println!(
        "generated {n_trades} trades and {n_book} book updates in {:.2} s ({})",
        t.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(inputs)
}

/// CSV → journal once (parse-bound), so that the run replays journals by mmap (the fast
/// path). Returns the journals.
fn convert(replay: &Path, csvs: &[&Path]) -> Result<Vec<PathBuf>, CliError> {
    let mut journals = Vec::new();
    for csv in csvs {
        let journal = csv.with_extension("aegisj");
        let out = Command::new(replay)
            .arg("--convert")
            .arg(&journal)
            .arg(csv)
            .stderr(Stdio::inherit())
            .output()?;
        if !out.status.success() {
            return Err(CliError(format!("converting {} failed", csv.display())));
        }
        print!("{}", String::from_utf8_lossy(&out.stdout));
        journals.push(journal);
    }
    Ok(journals)
}

/// Runs the backtest session `demo`: one replay of every input, `consumers` digest taps
/// whose stats go to `tap-<i>.stats` in `dir`.
fn run_session(
    socket: &Path,
    dir: &Path,
    replay: &Path,
    tap: &Path,
    sources: &[PathBuf],
    consumers: usize,
) -> Result<Outcome, CliError> {
    let files: Vec<String> = sources.iter().map(|p| p.display().to_string()).collect();
    let mut commands = vec![format!(
        "{} --name replay {}",
        replay.display(),
        files.join(" ")
    )];
    for i in 0..consumers {
        commands.push(format!(
            "{} --name tap-{i} --format digest --json --out {}",
            tap.display(),
            dir.join(format!("tap-{i}.digest")).display()
        ));
    }
    let args = RunArgs {
        create: CreateArgs {
            name: "demo".into(),
            mode: Mode::Backtest,
            expect: None,
            sequencer_core: None,
            bus_bytes: None,
            source_bytes: None,
            max_lateness_us: None,
            reconcile_s: None,
            record: None,
            record_segment_bytes: None,
        },
        commands,
        timeout: 600,
        keep: false,
        restart_killed: None,
    };
    super::session::run_components(socket, &args, |i, c| {
        if i > 0 {
            if let Ok(f) = std::fs::File::create(dir.join(format!("tap-{}.stats", i - 1))) {
                c.stderr(f);
            }
        }
    })
}

/// Prints each consumer's rate, latencies and digest; returns whether every digest is equal
/// (and present).
fn report_consumers(dir: &Path, consumers: usize) -> bool {
    let mut t = TextTable::new(&[
        ("consumer", Left),
        ("events", Right),
        ("events/s", Right),
        ("p50 µs", Right),
        ("p99 µs", Right),
        ("p99.9 µs", Right),
        ("max µs", Right),
        ("digest", Left),
    ]);
    let mut digests = Vec::new();
    let mut said = Vec::new();
    for i in 0..consumers {
        let stats = std::fs::read_to_string(dir.join(format!("tap-{i}.stats"))).unwrap_or_default();
        let line = stats
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or("{}");
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        let digest = std::fs::read_to_string(dir.join(format!("tap-{i}.digest")))
            .unwrap_or_default()
            .trim()
            .to_string();
        let l = &v["latency_us"];
        t.row([
            format!("tap-{i}"),
            v["events"].to_string(),
            v["events_per_s"].to_string(),
            l["p50"].to_string(),
            l["p99"].to_string(),
            l["p999"].to_string(),
            l["max"].to_string(),
            if digest.is_empty() {
                "(none)".to_string()
            } else {
                digest.clone()
            },
        ]);
        // Show what the tap said besides its stats line (its error, when it failed). The
        // old test, `!line.starts_with('{')`, could never hold: `line` falls back to "{}".
        for l in stats.lines().filter(|l| !l.starts_with('{')) {
            said.push(format!("tap-{i}: {l}"));
        }
        digests.push(digest);
    }
    t.print(0);
    for l in said {
        eprintln!("{l}");
    }
    let same = !digests[0].is_empty() && digests.iter().all(|d| *d == digests[0]);
    println!("digests equal: {}", if same { "yes" } else { "NO" });
    same
}

/// Prints the session's outcome: rate, and why it or a component failed.
fn report_session(run: &RunSummary, wall: f64) {
    let s = run.session.as_ref();
    let merged = s.map_or(0, |s| s.sequencer.events_merged);
    let elapsed = s.and_then(|s| s.elapsed_s);
    println!(
        "session demo: {} — {merged} events merged in {:.3} s ({:.0} events/s end to end, {wall:.2} s with process start-up)",
        s.map_or("?", |s| s.state.name()),
        elapsed.unwrap_or(0.0),
        merged as f64 / elapsed.unwrap_or(f64::INFINITY)
    );
}

/// Prints why the session did not finish and which component failed, if any.
fn report_failures(run: &RunSummary) {
    // Say why the session did not finish: the daemon's reason was not shown before.
    if let Some(r) = run.session.as_ref().and_then(|s| s.reason.as_ref()) {
        println!("session reason: {r}");
    }
    for c in run.components.iter().filter(|c| c.exit != Some(0)) {
        println!(
            "component failed (exit {}): {}",
            c.exit.map_or_else(|| "null".to_string(), |e| e.to_string()),
            c.command
        );
    }
}

/// How many segments of the session (`aegis-<sid>-*`, from the bus name `aegis-<sid>-bus`)
/// are left in /dev/shm: the control and source segments too, not only the bus.
fn segments_left(run: &RunSummary) -> Result<usize, CliError> {
    let prefix = run
        .session
        .as_ref()
        .and_then(|s| s.segments.bus.file_name()?.to_str()?.strip_suffix("bus"))
        .map(str::to_string);
    Ok(std::fs::read_dir(aegis_shm_client::segment::SHM_DIR)?
        .filter_map(|e| e.ok())
        .filter(|e| {
            prefix
                .as_deref()
                .is_some_and(|p| e.file_name().to_str().is_some_and(|n| n.starts_with(p)))
        })
        .count())
}

/// Runs the demo. Ok(true) when every consumer saw the same stream.
pub fn run(_socket: &Path, a: &DemoArgs) -> Result<bool, CliError> {
    if a.consumers < 2 {
        return Err(CliError("the demo runs at least 2 consumers".into()));
    }
    let replay = tool("aegis-replay")?;
    let tap = tool("aegis-tap")?;
    let tmp = TempDir::new("aegis-demo")?;
    let dir = tmp.0.clone();
    let socket = dir.join("aegis.sock");

    println!("== Aegis demo: backtest of bundled Binance klines + generated trades and book ==");
    let inputs = generate_inputs(&dir, a.events)?;
    let mut sources = vec![inputs.klines.clone()];
    sources.extend(convert(&replay, &[&inputs.trades_csv, &inputs.book_csv])?);
    let daemon = PrivateDaemon::start(&socket)?;
    let t = Instant::now();
    let outcome = run_session(&socket, &dir, &replay, &tap, &sources, a.consumers)?;
    report_session(&outcome.run, t.elapsed().as_secs_f64());
    let same = report_consumers(&dir, a.consumers);
    report_failures(&outcome.run);
    drop(daemon);
    drop(tmp);
    let left = segments_left(&outcome.run)?;
    if left > 0 {
        println!("segments left in /dev/shm: {left}");
    } else {
        println!("cleaned up: daemon stopped, no segment left in /dev/shm");
    }
    Ok(outcome.ok && same && left == 0)
}
