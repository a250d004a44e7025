//! `aegis-replay`: a producer that replays Binance CSV files or journals into an Aegis session,
//! one source per file, as fast as possible (or paced with `--speed`). `--convert OUT`
//! turns one CSV file into a journal instead.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aegis_shm_client::client::Component;
use aegis_shm_client::event::{AnyEvent, Event};
use aegis_shm_client::protocol::{Register, Role, SourceDecl};
use aegis_shm_client::spsc::{ClaimError, Producer, PushError};
use aegis_shm_client::stats::{SourceState, StatsView};
use aegis_shm_client::wait::{Backoff, Deadline};
use aegis_tools::journal::{self, JournalError, JournalReader};
use aegis_tools::names::{self, FileInfo, FileKind};
use aegis_tools::sort::{CsvEvents, OrderCheck};
use clap::Parser;

/// Replay Binance CSV files or journals into an Aegis session.
///
/// Every input must be sorted by event time (equal times are fine): replay stops at the first
/// row that goes back, naming FILE:LINE (a journal: FILE and the frame index). `--sort` sorts
/// CSV exports that are not in time order.
#[derive(Parser, Debug)]
#[command(name = "aegis-replay", version)]
struct Args {
    /// Source name (default: the file name without extension; one FILE only).
    #[arg(long)]
    source: Option<String>,
    /// File kind: kline, trade, aggtrade or book (default: from the file name).
    #[arg(long)]
    kind: Option<FileKind>,
    /// Symbol (default: from the file name).
    #[arg(long)]
    symbol: Option<String>,
    /// Kline interval (default: from the file name).
    #[arg(long)]
    interval: Option<String>,
    /// Pace by event time: 1 = real time, 10 = ten times faster. Default: as fast as possible.
    #[arg(long)]
    speed: Option<f64>,
    /// Convert the (single) CSV FILE into a journal at this path, then exit.
    #[arg(long)]
    convert: Option<PathBuf>,
    /// Sort each CSV FILE by event time, stably (equal times keep file order), for exports
    /// not in time order. Reads the file twice: the first pass parses every line and keeps
    /// its time and offset (16 bytes an event), the second re-reads the lines in time order.
    #[arg(long)]
    sort: bool,
    /// Component name (default: replay-<pid>).
    #[arg(long)]
    name: Option<String>,
    /// Control socket (default: $AEGIS_SOCKET, else /tmp/aegis/aegis-components.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// How long to wait for the session to start, in seconds.
    #[arg(long, default_value_t = 300)]
    start_timeout: u64,
    /// Give up when the ring stays full this long (a stuck session), in seconds.
    #[arg(long, default_value_t = 120)]
    stall_timeout: u64,
    /// Push journals through the source ring even in a backtest. By default a backtest
    /// hands a journal to the daemon, which maps it read-only and merges straight from it
    /// (no copy into a ring, no hop through this process); this process then only follows
    /// the source's progress. `--speed` always pushes through the ring.
    #[arg(long)]
    via_ring: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// Input files (CSV, or journals made with --convert).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

struct Input {
    path: PathBuf,
    name: String,
    info: FileInfo,
    journal: bool,
    /// The journal is offered to the daemon (it decides: backtest yes, live no).
    offer: bool,
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("aegis-replay: error: {msg}");
    std::process::exit(1);
}

fn main() {
    let args = Args::parse();
    if args.source.is_some() && args.files.len() > 1 {
        fail("--source names one source: give one FILE per process, or let names default to file stems");
    }
    if let Some(out) = &args.convert {
        convert(&args, out);
        return;
    }
    let inputs: Vec<Input> = args
        .files
        .iter()
        .map(|p| {
            let journal =
                journal::is_journal(p).unwrap_or_else(|e| fail(format!("{}: {e}", p.display())));
            let info = if journal {
                JournalReader::open(p)
                    .unwrap_or_else(|e| fail(e))
                    .info()
                    .clone()
            } else {
                names::resolve(
                    p,
                    args.kind,
                    args.symbol.as_deref(),
                    args.interval.as_deref(),
                )
                .unwrap_or_else(|e| fail(e))
            };
            let name = match &args.source {
                Some(s) => s.clone(),
                None => names::default_source_name(p).unwrap_or_else(|e| fail(e)),
            };
            Input {
                path: p.clone(),
                name,
                info,
                journal,
                offer: journal && args.speed.is_none() && !args.via_ring,
            }
        })
        .collect();
    let sources = inputs
        .iter()
        .map(|i| SourceDecl {
            name: i.name.clone(),
            kind: aegis_shm_client::protocol::SourceKind::try_from(i.info.kind.event_kind())
                .expect("a file kind is an event kind"),
            topic: i.info.topic(),
            journal: i.offer.then(|| absolute(&i.path)),
        })
        .collect();
    let token = std::env::var("AEGIS_SESSION_TOKEN").unwrap_or_else(|_| {
        fail("AEGIS_SESSION_TOKEN is not set: run under `aegis-shmctl session run`, or export the token printed by `session create`")
    });
    let comp = Component::connect(
        args.socket.as_deref(),
        Register {
            component_name: args
                .name
                .clone()
                .unwrap_or_else(|| format!("replay-{}", std::process::id())),
            session_token: token,
            role: Some(Role::Producer),
            sources,
            pid: Some(std::process::id()),
            ..Register::default()
        },
    )
    .unwrap_or_else(|e| fail(e));
    let (handed, inputs): (Vec<Input>, Vec<Input>) = inputs
        .into_iter()
        .partition(|i| comp.is_journal_backed(&i.name));
    let producers: Vec<(Producer, u32)> = inputs
        .iter()
        .map(|i| comp.producer(&i.name).unwrap_or_else(|e| fail(e)))
        .collect();
    let stats = (!handed.is_empty()).then(|| comp.stats().unwrap_or_else(|e| fail(e)));
    comp.ready(Duration::from_secs(args.start_timeout))
        .unwrap_or_else(|e| fail(e));
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let followed = Arc::new(AtomicU64::new(0));
    let progress = std::io::stderr().is_terminal().then(|| {
        let (stop, total, followed) = (stop.clone(), total.clone(), followed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(PROGRESS_EVERY);
                let n = total.load(Ordering::Relaxed) + followed.load(Ordering::Relaxed);
                eprint!(
                    "\raegis-replay: {n} events, {:.0} events/s   ",
                    n as f64 / start.elapsed().as_secs_f64()
                );
            }
            eprintln!();
        })
    });
    let comp = Arc::new(comp);
    let mut handles = Vec::new();
    for (input, (producer, topic)) in inputs.into_iter().zip(producers) {
        let (stop, total, comp) = (stop.clone(), total.clone(), comp.clone());
        let (speed, sort) = (args.speed, args.sort);
        let stall = Duration::from_secs(args.stall_timeout);
        handles.push(std::thread::spawn(move || {
            let r = replay(
                input, producer, topic, speed, sort, stall, &stop, &total, &comp,
            );
            if r.is_err() {
                // Tell the others (and `follow`) at once, not after a stall timeout.
                stop.store(true, Ordering::Relaxed);
            }
            r
        }));
    }
    let mut errors = Vec::new();
    let mut counts = Vec::new();
    if let Some(stats) = &stats {
        let stall = Duration::from_secs(args.stall_timeout);
        match follow(&handed, stats, &comp, &followed, stall, &stop) {
            Ok(n) => counts.extend(n),
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                errors.push(e)
            }
        }
    }
    for h in handles {
        match h.join() {
            Ok(Ok(c)) => counts.push(c),
            Ok(Err(e)) => {
                stop.store(true, Ordering::Relaxed);
                errors.push(e)
            }
            Err(_) => errors.push("a replay thread panicked".to_string()),
        }
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        let _ = p.join();
    }
    let comp = Arc::try_unwrap(comp).unwrap_or_else(|_| fail("internal: component still shared"));
    if !errors.is_empty() {
        let msg = errors.join("; ");
        let _ = comp.error("replay_failed", &msg);
        fail(msg);
    }
    let secs = start.elapsed().as_secs_f64();
    let n: u64 = counts.iter().sum();
    if args.json {
        println!(
            "{{\"events\":{n},\"seconds\":{secs:.6},\"events_per_s\":{:.0}}}",
            n as f64 / secs
        );
    } else {
        eprintln!(
            "aegis-replay: {n} events from {} sources in {secs:.3} s ({:.0} events/s)",
            counts.len(),
            n as f64 / secs
        );
    }
    comp.finished().unwrap_or_else(|e| fail(e));
}

/// How often the progress line and a journal-backed source's progress are refreshed.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// How often a journal-backed source's state is looked at.
const FOLLOW_POLL: Duration = Duration::from_millis(20);

/// The absolute form of `p` (the daemon opens journals by absolute path).
fn absolute(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|e| fail(format!("{}: {e}", p.display())))
        .display()
        .to_string()
}

/// Follows the journal-backed sources (the daemon merges them straight from their journals)
/// in the session's counters until each has ended. Returns the events merged from each. A
/// source that failed, a session stopped, or no progress for `stall` is an error; `stop`
/// (another input failed) ends it at once.
fn follow(
    handed: &[Input],
    stats: &StatsView,
    comp: &Component,
    followed: &AtomicU64,
    stall: Duration,
    stop: &AtomicBool,
) -> Result<Vec<u64>, String> {
    let mut last = (0u64, Instant::now());
    loop {
        if stop.load(Ordering::Relaxed) {
            // Another input of this replay failed; its error is reported with the others.
            return Ok(Vec::new());
        }
        if let Some(r) = comp.stop_requested() {
            return Err(format!("the daemon stopped the session: {r}"));
        }
        let all = stats.sources();
        let mine: Vec<_> = handed
            .iter()
            .map(|i| all.iter().find(|s| s.name == i.name))
            .collect();
        let mut events = Vec::new();
        let mut ended = true;
        for (input, s) in handed.iter().zip(&mine) {
            let Some(s) = s else {
                ended = false;
                events.push(0);
                continue;
            };
            match s.state {
                SourceState::Failed | SourceState::Removed => {
                    let why = s.reason.clone().unwrap_or_else(|| "no reason given".into());
                    return Err(format!(
                        "{}: the daemon's merge of it failed: {why}",
                        input.path.display()
                    ));
                }
                SourceState::Ended => {}
                _ => ended = false,
            }
            events.push(s.events);
        }
        let sum: u64 = events.iter().sum();
        followed.store(sum, Ordering::Relaxed);
        if ended {
            return Ok(events);
        }
        if sum != last.0 {
            last = (sum, Instant::now());
        } else if last.1.elapsed() > stall {
            return Err(format!(
                "the daemon merged nothing from the journals for {stall:?} (is the session stuck?)"
            ));
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

/// Paces by event time when `speed` is set.
struct Pacer {
    speed: Option<f64>,
    first: Option<(u64, Instant)>,
}

impl Pacer {
    fn wait(&mut self, ts: u64) {
        let Some(speed) = self.speed else { return };
        let (t0, i0) = *self.first.get_or_insert((ts, Instant::now()));
        let due = Duration::from_secs_f64(ts.saturating_sub(t0) as f64 / 1e9 / speed);
        let now = i0.elapsed();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn replay(
    input: Input,
    mut p: Producer,
    topic: u32,
    speed: Option<f64>,
    sort: bool,
    stall: Duration,
    stop: &AtomicBool,
    total: &AtomicU64,
    comp: &Component,
) -> Result<u64, String> {
    p.set_batch(if speed.is_some() { 1 } else { 64 });
    let mut pacer = Pacer { speed, first: None };
    let mut wait = Backoff::default();
    let mut n = 0u64;
    let check = |n: u64| -> Result<(), String> {
        if n.is_multiple_of(4096) {
            total.fetch_add(4096, Ordering::Relaxed);
            if stop.load(Ordering::Relaxed) {
                return Err("stopped".into());
            }
            if let Some(r) = comp.stop_requested() {
                return Err(format!("the daemon stopped the session: {r}"));
            }
        }
        Ok(())
    };
    let src = input.path.display().to_string();
    let mut order = OrderCheck::default();
    if input.journal {
        let mut r = JournalReader::open(&input.path).map_err(|e| e.to_string())?;
        r.for_each(|f| -> Result<(), ReplayError> {
            order.next(f.header.ts).map_err(|prev| {
                ReplayError(
                    JournalError::FrameOrder {
                        path: input.path.clone(),
                        frame: n,
                        ts: f.header.ts,
                        prev,
                    }
                    .to_string(),
                )
            })?;
            pacer.wait(f.header.ts);
            let mut h = f.header;
            h.topic_id = topic;
            // The clock (for the deadline) is read only when the ring is full.
            let pushed = match p.try_push_frame(&h, f.payload) {
                Ok(_) => Ok(()),
                Err(ClaimError::Full) => p
                    .push_frame(&h, f.payload, &mut wait, Deadline::after(stall))
                    .map(drop),
                Err(ClaimError::TooLarge { stride, capacity }) => Err(PushError::TooLarge {
                    value: (),
                    stride,
                    capacity,
                }),
            };
            pushed.map_err(|e| match e {
                PushError::Timeout(()) => {
                    ReplayError(format!("{src}: the ring stayed full for {stall:?}"))
                }
                e => ReplayError(format!("{src}: {e}")),
            })?;
            n += 1;
            check(n).map_err(ReplayError)
        })
        .map_err(|e| e.0)?;
    } else {
        let mut reader =
            CsvEvents::open(&input.path, &input.info, sort).map_err(|e| format!("{src}: {e}"))?;
        while let Some(item) = reader.next() {
            let (ts, ev) = item.map_err(|e| format!("{src}: {e}"))?;
            order.next(ts).map_err(|prev| {
                JournalError::Order {
                    path: input.path.clone(),
                    line: reader.line(),
                    ts,
                    prev,
                }
                .to_string()
            })?;
            pacer.wait(ts);
            let r = match ev {
                AnyEvent::Trade(e) => push_event(&mut p, ts, topic, e, &mut wait, stall),
                AnyEvent::Book(e) => push_event(&mut p, ts, topic, e, &mut wait, stall),
                AnyEvent::Kline(e) => push_event(&mut p, ts, topic, e, &mut wait, stall),
            };
            r.map_err(|e| format!("{src}: {e}"))?;
            n += 1;
            check(n)?;
        }
    }
    total.fetch_add(n % 4096, Ordering::Relaxed);
    p.finish(&mut wait, Deadline::after(stall))
        .map_err(|_| format!("{src}: could not write end-of-stream within {stall:?}"))?;
    Ok(n)
}

/// Pushes one event, reading the clock (for the stall deadline) only when the ring is full.
fn push_event<E: Event>(
    p: &mut Producer,
    ts: u64,
    topic: u32,
    e: E,
    wait: &mut Backoff,
    stall: Duration,
) -> Result<(), String> {
    match p.try_push(ts, topic, e) {
        Ok(_) => Ok(()),
        Err(PushError::Full(e)) => p
            .push(ts, topic, e, wait, Deadline::after(stall))
            .map(drop)
            .map_err(describe),
        Err(e) => Err(describe(e)),
    }
}

/// An error in the journal path: ours, or the journal's.
struct ReplayError(String);

impl From<journal::JournalError> for ReplayError {
    fn from(e: journal::JournalError) -> ReplayError {
        ReplayError(e.to_string())
    }
}

fn describe<T>(e: PushError<T>) -> String {
    match e {
        PushError::Full(_) => "ring full".into(),
        PushError::Timeout(_) => {
            "the ring stayed full past the stall timeout (is the session stuck?)".into()
        }
        PushError::TooLarge {
            stride, capacity, ..
        } => format!("frame of {stride} bytes cannot fit a ring of {capacity} bytes"),
    }
}

fn convert(args: &Args, out: &Path) {
    if args.files.len() != 1 {
        fail("--convert takes exactly one input FILE");
    }
    let input = &args.files[0];
    let info = names::resolve(
        input,
        args.kind,
        args.symbol.as_deref(),
        args.interval.as_deref(),
    )
    .unwrap_or_else(|e| fail(e));
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let n = journal::convert_csv_with_progress(input, out, &info, 0, args.sort, |bytes, events| {
        if tty {
            eprint!(
                "\raegis-replay: {events} events ({} MB) converted",
                bytes / 1_000_000
            );
        }
    })
    .unwrap_or_else(|e| fail(e));
    if tty {
        eprintln!();
    }
    let secs = start.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{{\"events\":{n},\"seconds\":{secs:.6},\"journal\":{:?}}}",
            out.display().to_string()
        );
    } else {
        println!(
            "{n} events converted to {} in {secs:.3} s ({:.0} events/s)",
            out.display(),
            n as f64 / secs
        );
    }
}
