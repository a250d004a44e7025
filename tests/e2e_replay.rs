//! End-to-end tests with real processes: `aegis-shmctl serve`, `aegis-shmctl session run`,
//! `aegis-replay` and `aegis-tap`, over Binance-style CSV files, checked against a reference
//! merge this file computes on its own (it does not use `aegis-tools`).
//!
//! 1. [`replay_matches_an_independent_reference_merge`]: five sources (the bundled real 1m
//!    klines, generated `trades` in ms, `aggTrades` in µs with a header and `True`/`False`,
//!    `trades` in µs with 7 columns, `bookTicker` with a header), with many timestamps equal
//!    to kline close times across every kind and long runs of equal timestamps. One
//!    `aegis-replay` produces all of them; three `aegis-tap` consume (NDJSON to a file, a digest
//!    to a file, a digest on stdout). The NDJSON must equal the reference field by field, with
//!    `seq` = 0..n-1, and the two digests must be equal.
//! 2. [`tiny_rings_under_cpu_load_give_the_same_digest`]: the same run with a 4 KiB bus and
//!    4 KiB source rings while two busy loops compete for the CPU: the same digest.
//! 3. [`demo_runs_clean`]: `aegis-shmctl demo --events 200000` exits 0, prints
//!    `digests equal: yes` and leaves no segment, directory or process behind.
//!
//! The tools are found next to `aegis-shmctl` (`target/release` for `cargo test --release`):
//! build them first with `cargo build --release --workspace` (`cargo test` only builds the
//! binaries of this package, so `aegis-replay` and `aegis-tap` may otherwise be stale).
//!
//! Every test runs in its own temporary directory with a private socket. A [`Harness`] guard
//! owns every process it starts (each in its own process group, killed by pid) and, on drop,
//! even on panic, stops its daemon, removes the `/dev/shm/aegis-<sid>-*` segments of that
//! daemon's sessions and the directory. Every wait has a deadline; no test asserts how long
//! anything takes. The tests run one at a time (a lock): the demo test compares `/dev/shm`
//! before and after, and the load test's busy loops should not slow the others.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::killpg;
use nix::unistd::Pid;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

/// How long the demo may take.
const DEMO_DEADLINE: Duration = Duration::from_secs(600);

const SYMBOL: &str = "BTCUSDT";
const DAY_START_MS: u64 = 1_726_876_800_000;
const DAY_MS: u64 = 86_400_000;
const MINUTES: u64 = 1440;

/// Events per generated file (before bursts).
const N_TRADES: usize = 40_000;
const N_AGG: usize = 20_000;
const N_ETH: usize = 20_000;
const N_BOOK: usize = 30_000;
/// Every `BURST_EVERY` minutes (from minute `BURST_AT`), each generated file gets a burst of
/// `BURST` events exactly on the kline close time: runs of equal timestamps longer than a
/// 4 KiB ring, tied across every kind and every source.
const BURST_EVERY: u64 = 97;
const BURST_AT: u64 = 13;
const BURST: usize = 120;

// ---------------------------------------------------------------------------------------------

/// xorshift64*: the same inputs on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bool(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

/// The close time (ms) of the 1m kline of `minute`.
fn close_ms(minute: u64) -> u64 {
    DAY_START_MS + minute * 60_000 + 59_999
}

/// Sorted event times for about `n` events over the day, as (ms, extra µs): a fifth exactly on
/// a kline close time, short runs of equal times, bursts on close times (see [`BURST`]). With
/// `sub_ms`, other events get a random sub-millisecond part (for µs files).
fn times(n: usize, seed: u64, sub_ms: bool) -> Vec<(u64, u64)> {
    let mut rng = Rng(seed);
    let mut v = Vec::with_capacity(n + 16 * BURST);
    let mut i = 0u64;
    while v.len() < n {
        let t = DAY_START_MS + i * DAY_MS / n as u64;
        i += 1;
        let close = close_ms((t - DAY_START_MS) / 60_000);
        let sub = if sub_ms { rng.below(1000) } else { 0 };
        match rng.below(10) {
            0 | 1 => v.push((close, 0)),
            2 => {
                for _ in 0..2 + rng.below(6) {
                    v.push((t, sub));
                }
            }
            _ => v.push((t, sub)),
        }
    }
    for m in (BURST_AT..MINUTES).step_by(BURST_EVERY as usize) {
        v.extend(std::iter::repeat_n((close_ms(m), 0), BURST));
    }
    // The day's very first instant and last close time, in every file.
    v.push((DAY_START_MS, 0));
    v.push((close_ms(MINUTES - 1), 0));
    v.sort_unstable();
    v
}

/// `units` in 1e-8 as a Binance 8-decimal string (`0.00100000`).
fn dec8(units: u64) -> String {
    format!("{}.{:08}", units / 100_000_000, units % 100_000_000)
}

/// `cents` as a short decimal (`63201.5`, `63186`, `63201.05`).
fn dec_short(cents: u64) -> String {
    match cents % 100 {
        0 => format!("{}", cents / 100),
        c if c % 10 == 0 => format!("{}.{}", cents / 100, c / 10),
        c => format!("{}.{c:02}", cents / 100),
    }
}

fn tf(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

/// A generated or copied input file and how the reference reads it.
#[derive(Clone, Debug)]
struct InputFile {
    path: PathBuf,
    kind: FileKind,
    symbol: &'static str,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum FileKind {
    Kline,
    Trade,
    AggTrade,
    Book,
}

/// Writes the five inputs into `dir`.
fn write_inputs(dir: &Path) -> Vec<InputFile> {
    let write = |name: &str, body: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>| {
        let path = dir.join(name);
        let mut w = std::io::BufWriter::new(fs::File::create(&path).expect("create input"));
        body(&mut w).and_then(|()| w.flush()).expect("write input");
        path
    };
    let mut out = Vec::new();

    // The real Binance 1m klines of 2024-09-21 (12 columns, ms, no header).
    let klines = dir.join("BTCUSDT-1m-2024-09-21.csv");
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/binance/BTCUSDT-1m-2024-09-21.csv"),
        &klines,
    )
    .expect("copy the bundled klines");
    out.push(InputFile {
        path: klines,
        kind: FileKind::Kline,
        symbol: SYMBOL,
    });

    // Spot trades: 6 columns, ms, no header, 8-decimal prices.
    let path = write("BTCUSDT-trades-2024-09-21.csv", &mut |w| {
        let mut rng = Rng(0x7EAD_0001);
        let mut price = 6_320_105u64;
        for (i, (ms, _)) in times(N_TRADES, 1, false).into_iter().enumerate() {
            price = price + rng.below(21) - 10;
            let qty = 1 + rng.below(50_000_000);
            writeln!(
                w,
                "{},{},{},{},{ms},{}",
                4_000_000_000u64 + i as u64,
                dec8(price * 1_000_000),
                dec8(qty),
                dec8(price * qty / 100),
                tf(rng.bool())
            )?;
        }
        Ok(())
    });
    out.push(InputFile {
        path,
        kind: FileKind::Trade,
        symbol: SYMBOL,
    });

    // aggTrades: a header line, 8 columns, µs, True/False, short decimals.
    let path = write("BTCUSDT-aggTrades-2024-09-21.csv", &mut |w| {
        writeln!(w, "agg_trade_id,price,quantity,first_trade_id,last_trade_id,transact_time,is_buyer_maker,is_best_match")?;
        let mut rng = Rng(0x7EAD_0002);
        let mut price = 6_320_000u64;
        let mut first = 9_000_000_000u64;
        for (i, (ms, us)) in times(N_AGG, 2, true).into_iter().enumerate() {
            price = price + rng.below(41) - 20;
            let n = 1 + rng.below(5);
            writeln!(
                w,
                "{},{},{},{first},{},{},{},True",
                3_000_000_000u64 + i as u64,
                dec_short(price),
                dec_short(1 + rng.below(100_000)),
                first + n - 1,
                ms * 1000 + us,
                tf(rng.bool())
            )?;
            first += n;
        }
        Ok(())
    });
    out.push(InputFile {
        path,
        kind: FileKind::AggTrade,
        symbol: SYMBOL,
    });

    // 2025-style spot trades of another symbol: 7 columns, µs, no header.
    let path = write("ETHUSDT-trades-2024-09-21.csv", &mut |w| {
        let mut rng = Rng(0x7EAD_0003);
        let mut price = 258_123u64;
        for (i, (ms, us)) in times(N_ETH, 3, true).into_iter().enumerate() {
            price = price + rng.below(11) - 5;
            let qty = rng.below(20_000_000_000); // sometimes 0
            writeln!(
                w,
                "{},{},{},{},{},{},True",
                1_500_000_000u64 + i as u64,
                dec8(price * 1_000_000),
                dec8(qty),
                dec8(price * (qty / 1000) / 100_000),
                ms * 1000 + us,
                tf(rng.bool())
            )?;
        }
        Ok(())
    });
    out.push(InputFile {
        path,
        kind: FileKind::Trade,
        symbol: "ETHUSDT",
    });

    // bookTicker: a header line (as futures files have), 7 columns, ms.
    let path = write("BTCUSDT-bookTicker-2024-09-21.csv", &mut |w| {
        writeln!(w, "update_id,best_bid_price,best_bid_qty,best_ask_price,best_ask_qty,transaction_time,event_time")?;
        let mut rng = Rng(0x7EAD_0004);
        let mut bid = 6_320_100u64;
        for (i, (ms, _)) in times(N_BOOK, 4, false).into_iter().enumerate() {
            bid = bid + rng.below(21) - 10;
            let ask = bid + 1 + rng.below(3);
            writeln!(
                w,
                "{},{},{},{},{},{ms},{}",
                7_000_000_000u64 + i as u64,
                dec_short(bid),
                dec8(rng.below(500_000_000)),
                dec8(ask * 1_000_000),
                dec_short(rng.below(100_000)),
                ms + rng.below(5)
            )?;
        }
        Ok(())
    });
    out.push(InputFile {
        path,
        kind: FileKind::Book,
        symbol: SYMBOL,
    });
    out
}

// ---------------------------------------------------------------------------------------------
// The reference merge
// ---------------------------------------------------------------------------------------------

/// One event as the NDJSON should show it (without `seq`), with its merge key.
struct RefEvent {
    ts: u64,
    /// Trade 0, Book 1, Kline 2.
    prio: u8,
    rank: usize,
    line: usize,
    want: serde_json::Map<String, Value>,
}

/// Keys whose values are decimals (compared after [`norm_dec`]).
const DECIMAL_KEYS: &[&str] = &[
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "taker_buy_base",
    "taker_buy_quote",
    "price",
    "qty",
    "bid_price",
    "bid_qty",
    "ask_price",
    "ask_qty",
];

/// A decimal with trailing zeros and a trailing dot dropped (`63186.00000000` -> `63186`).
fn norm_dec(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

/// ms, µs or ns since the epoch, by magnitude, to ns.
fn to_ns(raw: u64) -> u64 {
    if raw >= 100_000_000_000_000_000 {
        raw
    } else if raw >= 100_000_000_000_000 {
        raw * 1_000
    } else {
        raw * 1_000_000
    }
}

fn source_name(path: &Path) -> String {
    path.file_stem().unwrap().to_str().unwrap().to_string()
}

/// Reads the inputs and merges them by (ts, kind priority, rank of the source name among the
/// sorted names, line order).
fn reference(inputs: &[InputFile]) -> Vec<RefEvent> {
    let mut names: Vec<String> = inputs.iter().map(|i| source_name(&i.path)).collect();
    names.sort();
    let mut all = Vec::new();
    for input in inputs {
        let source = source_name(&input.path);
        let rank = names.iter().position(|n| *n == source).unwrap();
        let text = fs::read_to_string(&input.path).expect("read input");
        let mut first = true;
        for (line, raw) in text.lines().enumerate() {
            let raw = raw.trim_end_matches('\r');
            if raw.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = raw.split(',').map(str::trim).collect();
            if std::mem::take(&mut first) && !f[0].bytes().all(|b| b.is_ascii_digit()) {
                continue; // a header line
            }
            let ctx = || format!("{}:{}", input.path.display(), line + 1);
            let num = |i: usize| -> u64 {
                f[i].parse()
                    .unwrap_or_else(|e| panic!("{}: column {}: {e}", ctx(), i + 1))
            };
            let boolean = |i: usize| -> bool {
                match f[i].to_ascii_lowercase().as_str() {
                    "true" => true,
                    "false" => false,
                    v => panic!("{}: column {}: not a boolean: {v}", ctx(), i + 1),
                }
            };
            let d = |i: usize| Value::String(norm_dec(f[i]));
            let (ts, prio, mut want) = match input.kind {
                FileKind::Kline => {
                    assert_eq!(f.len(), 12, "{}", ctx());
                    let close = to_ns(num(6));
                    let w = json!({
                        "kind": "kline",
                        "topic": format!("klines.{}.1m", input.symbol),
                        "interval": "1m",
                        "open_time": to_ns(num(0)),
                        "close_time": close,
                        "open": d(1), "high": d(2), "low": d(3), "close": d(4), "volume": d(5),
                        "quote_volume": d(7),
                        "trades": num(8),
                        "taker_buy_base": d(9),
                        "taker_buy_quote": d(10),
                    });
                    (close, 2, w)
                }
                FileKind::Trade | FileKind::AggTrade => {
                    let (time_col, bool_col) = if input.kind == FileKind::Trade {
                        assert!(matches!(f.len(), 6 | 7), "{}", ctx());
                        (4, 5)
                    } else {
                        assert!(matches!(f.len(), 7 | 8), "{}", ctx());
                        (5, 6)
                    };
                    let ts = to_ns(num(time_col));
                    let w = json!({
                        "kind": "trade",
                        "topic": format!("trades.{}", input.symbol),
                        "id": num(0),
                        "price": d(1),
                        "qty": d(2),
                        "buyer_maker": boolean(bool_col),
                    });
                    (ts, 0, w)
                }
                FileKind::Book => {
                    assert_eq!(f.len(), 7, "{}", ctx());
                    let ts = to_ns(num(5));
                    let w = json!({
                        "kind": "book",
                        "topic": format!("book.{}", input.symbol),
                        "update_id": num(0),
                        "bid_price": d(1), "bid_qty": d(2), "ask_price": d(3), "ask_qty": d(4),
                    });
                    (ts, 1, w)
                }
            };
            let Value::Object(m) = &mut want else {
                unreachable!()
            };
            m.insert("ts".into(), json!(ts));
            m.insert("source".into(), json!(source));
            m.insert("symbol".into(), json!(input.symbol));
            all.push(RefEvent {
                ts,
                prio,
                rank,
                line,
                want: std::mem::take(m),
            });
        }
    }
    all.sort_by_key(|e| (e.ts, e.prio, e.rank, e.line));
    assert_ties(&all);
    all
}

/// The inputs must exercise every rule of the merge key: many timestamps where a trade, a
/// book event and a kline tie; ties between two trade sources; sub-millisecond times (µs
/// files) next to the millisecond ones.
fn assert_ties(all: &[RefEvent]) {
    let (mut three_kinds, mut two_trade_sources, mut sub_ms) = (0, 0, 0);
    for run in all.chunk_by(|a, b| a.ts == b.ts) {
        let kinds: BTreeSet<u8> = run.iter().map(|e| e.prio).collect();
        let trade_sources: BTreeSet<usize> =
            run.iter().filter(|e| e.prio == 0).map(|e| e.rank).collect();
        three_kinds += usize::from(kinds.len() == 3);
        two_trade_sources += usize::from(trade_sources.len() >= 2);
        sub_ms += usize::from(run[0].ts % 1_000_000 != 0);
    }
    assert!(
        three_kinds >= 500 && two_trade_sources >= 500 && sub_ms >= 500,
        "the generated inputs have too few ties: {three_kinds} timestamps with all three \
         kinds, {two_trade_sources} with two trade sources, {sub_ms} sub-millisecond"
    );
}

/// Compares the NDJSON output with the reference, field by field; panics with the first
/// differences.
fn check_ndjson(ndjson: &str, want: &[RefEvent]) {
    let mut errors = Vec::new();
    let mut n = 0usize;
    for (i, line) in ndjson.lines().enumerate() {
        n += 1;
        if errors.len() >= 10 {
            continue;
        }
        let got: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("line {}: not JSON ({e}): {line}", i + 1));
                continue;
            }
        };
        let Some(got) = got.as_object() else {
            errors.push(format!("line {}: not an object: {line}", i + 1));
            continue;
        };
        if !line.starts_with(&format!("{{\"seq\":{i},\"ts\":")) {
            errors.push(format!(
                "line {}: does not start with {{\"seq\":{i},\"ts\":...: {line}",
                i + 1
            ));
        }
        if got.get("seq") != Some(&json!(i)) {
            errors.push(format!(
                "line {}: seq {:?}, want {i}",
                i + 1,
                got.get("seq")
            ));
        }
        let Some(w) = want.get(i) else {
            continue;
        };
        for (k, wv) in &w.want {
            let ok = match (got.get(k), DECIMAL_KEYS.contains(&k.as_str())) {
                (Some(Value::String(g)), true) => Value::String(norm_dec(g)) == *wv,
                (g, _) => g == Some(wv),
            };
            if !ok {
                errors.push(format!(
                    "line {}: {k} = {}, want {wv} (reference: {}, ts {}, line {})\n  got:  {line}",
                    i + 1,
                    got.get(k).map_or("(missing)".to_string(), Value::to_string),
                    w.want["source"],
                    w.ts,
                    w.line + 1
                ));
            }
        }
        for k in got.keys() {
            if k != "seq" && !w.want.contains_key(k) {
                errors.push(format!("line {}: unexpected field {k}: {line}", i + 1));
            }
        }
    }
    if n != want.len() {
        errors.push(format!(
            "{n} NDJSON lines, the reference has {} events",
            want.len()
        ));
    }
    assert!(
        errors.is_empty(),
        "the NDJSON differs from the reference merge:\n{}",
        errors.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------

/// The full run of test 1, checked; returns its digest. Run once per process (test 2 needs
/// the digest too), whichever test comes first.
fn normal_run_digest() -> String {
    static DIGEST: Mutex<Option<String>> = Mutex::new(None);
    let mut cached = DIGEST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = &*cached {
        return d.clone();
    }
    let b = bins();
    let mut h = Harness::new("normal");
    let inputs = write_inputs(&h.dir);
    let want = reference(&inputs);
    let socket = h.start_daemon(&b);
    let (nd, dg) = (h.dir.join("tap.ndjson"), h.dir.join("tap.digest"));
    let files: Vec<String> = inputs.iter().map(|i| q(&i.path)).collect();
    let commands = [
        format!("exec {} --name replay {}", q(&b.replay), files.join(" ")),
        format!(
            "exec {} --name tap-ndjson --format ndjson --out {}",
            q(&b.tap),
            q(&nd)
        ),
        format!(
            "exec {} --name tap-digest --format digest --out {}",
            q(&b.tap),
            q(&dg)
        ),
        format!("exec {} --name tap-stdout --format digest", q(&b.tap)),
    ];
    let r = session_run(
        &mut h,
        &b,
        &socket,
        "e2e-normal",
        "backtest",
        &[],
        &commands,
    );
    assert_run_ok(&h, &r, want.len());
    assert_segments_gone(&h);

    let ndjson = fs::read_to_string(&nd).expect("read the NDJSON output");
    check_ndjson(&ndjson, &want);

    let d_file = fs::read_to_string(&dg).expect("read the digest output");
    let d_file = d_file.trim();
    let d_stdout: Vec<&str> = r.stdout_head.lines().filter(|l| is_digest(l)).collect();
    assert!(is_digest(d_file), "not a digest: {d_file:?}");
    assert_eq!(
        d_stdout,
        [d_file],
        "the stdout tap printed another digest than the file tap (stdout: {:?})",
        r.stdout_head
    );
    *cached = Some(d_file.to_string());
    d_file.to_string()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn replay_matches_an_independent_reference_merge() {
    let _serial = serial();
    let d = normal_run_digest();
    assert!(is_digest(&d));
}

#[test]
fn tiny_rings_under_cpu_load_give_the_same_digest() {
    let _serial = serial();
    let normal = normal_run_digest();

    let b = bins();
    let mut h = Harness::new("tiny");
    let inputs = write_inputs(&h.dir);
    let events = reference(&inputs).len();
    let socket = h.start_daemon(&b);
    // Two busy loops on this 2-core machine: every process of the run competes for the CPU.
    let hogs = [busy_loop(&mut h), busy_loop(&mut h)];
    let (d1, d2) = (h.dir.join("tap-1.digest"), h.dir.join("tap-2.digest"));
    let files: Vec<String> = inputs.iter().map(|i| q(&i.path)).collect();
    let commands = [
        format!("exec {} --name replay {}", q(&b.replay), files.join(" ")),
        format!(
            "exec {} --name tap-1 --format digest --out {}",
            q(&b.tap),
            q(&d1)
        ),
        format!(
            "exec {} --name tap-2 --format digest --out {}",
            q(&b.tap),
            q(&d2)
        ),
    ];
    let r = session_run(
        &mut h,
        &b,
        &socket,
        "e2e-tiny",
        "backtest",
        &["--bus-bytes", "4096", "--source-bytes", "4096"],
        &commands,
    );
    for i in hogs {
        assert!(
            pid_alive(h.pid(i)),
            "a busy loop died during the run: no load"
        );
        h.kill_group(i);
    }
    assert_run_ok(&h, &r, events);
    assert_segments_gone(&h);
    for d in [&d1, &d2] {
        let got = fs::read_to_string(d).expect("read a digest");
        assert_eq!(
            got.trim(),
            normal,
            "{}: tiny rings under load gave another stream than the normal run",
            d.display()
        );
    }
}

#[test]
fn demo_runs_clean() {
    let _serial = serial();
    let b = bins();
    let before: BTreeSet<String> = shm_files().into_iter().map(|f| f.name).collect();
    let mut h = Harness::new("demo");
    let out_path = h.dir.join("demo.stdout");
    let err_path = h.dir.join("demo.stderr");
    let i = h.spawn(
        Command::new(&b.shmctl)
            .args(["demo", "--events", "200000"])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path).expect("stdout file"))
            .stderr(fs::File::create(&err_path).expect("stderr file")),
        "aegis-shmctl demo",
    );
    let demo_pid = h.pid(i);
    let demo_dir = std::env::temp_dir().join(format!("aegis-demo-{demo_pid}"));
    h.dirs.push(demo_dir.clone());
    // The demo's processes (its daemon, its components) stay in its process group: note them
    // while it runs, to tell its segments from those of anything else on the machine.
    let mut members: BTreeSet<u32> = BTreeSet::from([demo_pid]);
    let status = h.wait(i, DEMO_DEADLINE, "aegis-shmctl demo", || {
        members.extend(group_members(demo_pid))
    });
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    let ctx = format!("demo ({status})\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(status.success(), "{ctx}");
    assert!(
        stdout.lines().any(|l| l.trim() == "digests equal: yes"),
        "{ctx}"
    );

    // Nothing left: no process of the demo's group, no directory, no segment.
    let end = Instant::now() + Duration::from_secs(10);
    while killpg(Pid::from_raw(demo_pid as i32), None).is_ok() {
        assert!(
            Instant::now() < end,
            "processes of the demo are still running: {:?}\n{ctx}",
            group_members(demo_pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !demo_dir.exists(),
        "{} is left behind\n{ctx}",
        demo_dir.display()
    );
    // New segments made by the demo's processes, or by processes that are gone (a live
    // creator is another program on this machine, not ours to judge).
    let left: Vec<ShmFile> = shm_files()
        .into_iter()
        .filter(|f| !before.contains(&f.name))
        .filter(|f| {
            f.creator
                .is_none_or(|p| members.contains(&p) || !pid_alive(p))
        })
        .collect();
    // Also clean up, should the assertion fail.
    for f in &left {
        if let Some(sid) = sid_of(&f.name) {
            h.sids.insert(sid.to_string());
        }
    }
    assert!(
        left.is_empty(),
        "segments left in /dev/shm: {left:?}\n{ctx}"
    );
}

/// The pids whose process group is `pgid` (from /proc).
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // /proc/<pid>/stat: "pid (comm) state ppid pgrp ...": comm may hold spaces.
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(2)?.parse::<u32>().ok()
                })
                == Some(pgid)
        })
        .collect()
}
