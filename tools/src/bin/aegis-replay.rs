//! `aegis-replay`: a producer that replays Binance CSV files, Binance zip archives (one CSV
//! inside, checked against the `.CHECKSUM` beside it) or journals into an Aegis session, one
//! source per file, as fast as possible (or paced with `--speed`). `--convert OUT` turns one
//! CSV file or archive into a journal instead; `--verify` only checks archives.
//!
//! Every input is opened and checked before anything is sent to the session: an archive's
//! checksum, entries, entry name and declared size, a journal's header. Errors found only
//! while reading (a bad CSV line, damage inside an archive) stop the replay and fail the
//! session.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aegis_shm_client::client::{Component, Standby};
use aegis_shm_client::event::{AnyEvent, Event};
use aegis_shm_client::protocol::{Failover, GroupRole, Register, Role, SourceDecl};
use aegis_shm_client::spsc::{ClaimError, Producer, PushError};
use aegis_shm_client::stats::{SourceState, StatsView};
use aegis_shm_client::wait::{Backoff, Deadline};
use aegis_tools::archive::{self, ArchiveError, CsvArchive};
use aegis_tools::journal::{self, JournalError, JournalReader};
use aegis_tools::names::{self, FileInfo, FileKind};
use aegis_tools::progress::Progress;
use aegis_tools::sort::{CsvEvents, OrderCheck};
use aegis_tools::symbols::{Gate, SymbolFilter};
use clap::Parser;
use serde_json::json;

/// Replay Binance CSV files, Binance zip archives or journals into an Aegis session.
///
/// Every input must be sorted by event time (equal times are fine): replay stops at the first
/// row that goes back, naming FILE:LINE (a journal: FILE and the frame index). `--sort` sorts
/// CSV exports that are not in time order.
///
/// A zip archive (as downloaded from Binance: NAME.zip holding NAME.csv) is streamed, never
/// unpacked. When NAME.zip.CHECKSUM is beside it, the archive's SHA-256 is checked against it
/// before anything is sent.
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
    /// Convert the (single) CSV or zip FILE into a journal at this path, then exit.
    #[arg(long)]
    convert: Option<PathBuf>,
    /// Only verify each zip FILE: against FILE.CHECKSUM (which must exist), and its entries,
    /// entry name and declared size. Replays nothing; exits non-zero if any FILE fails.
    #[arg(long, conflicts_with_all = ["convert", "no_verify", "sort", "speed", "via_ring"])]
    verify: bool,
    /// Do not check zip archives against their .CHECKSUM files (their entries, entry name
    /// and declared size are still checked).
    #[arg(long)]
    no_verify: bool,
    /// Sort each CSV FILE by event time, stably (equal times keep file order), for exports
    /// not in time order. Reads the file twice: the first pass parses every line and keeps
    /// its time and offset (16 bytes an event), the second re-reads the lines in time order.
    /// Not for zip archives (they cannot be read by offset).
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
    /// Produce only these symbols, comma-separated (BTCUSDT,ETHUSDT): the initial desired
    /// symbol set of this producer. The session's desired set rules from then on:
    /// `aegis-shmctl subscribe SESSION NAME --symbols ...` changes it live (pushed at once,
    /// enforced by the reconciliation every --reconcile-s). Journals then go through the ring
    /// (a journal handed to the daemon cannot be filtered).
    #[arg(long, value_name = "S,...", value_parser = check_symbol_list)]
    symbols: Option<String>,
    /// With a recording DIR: start at the first event whose ts (ns since the Unix epoch) is
    /// at least TS, found through the recording's index. Bus seqs of the replay start at 0.
    #[arg(long, value_name = "TS")]
    from: Option<u64>,
    /// With a recording DIR: end before the first event whose ts (ns) is greater than TS.
    #[arg(long, value_name = "TS")]
    to: Option<u64>,
    /// Join this group (hot standby): one member replays, the others stand by and take
    /// over where it stopped if it dies. One FILE (the group's one source); live sessions.
    #[arg(long)]
    group: Option<String>,
    /// The group's failover policy: aggressive (< 2 s), balanced (2-5 s) or conservative
    /// (5-10 s) after the active member stops answering. Default: balanced.
    #[arg(long, requires = "group")]
    failover: Option<Failover>,
    /// How long a standby waits to be promoted, in seconds.
    #[arg(long, default_value_t = 86_400)]
    standby_timeout: u64,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// Input files: CSV, Binance zip archives (NAME.zip holding NAME.csv), or journals made
    /// with --convert. Or one recording directory (`session create|run --record DIR`),
    /// replayed into a backtest session as one pre-sequenced stream: the replay's bus
    /// equals the recorded bus frame for frame.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

struct Input {
    path: PathBuf,
    name: String,
    info: FileInfo,
    /// A zip input, opened and checked (and verified, unless --no-verify).
    archive: Option<CsvArchive>,
    journal: bool,
    /// The journal is offered to the daemon (it decides: backtest yes, live no).
    offer: bool,
    /// Bytes of input, for progress: a CSV's size, an archive's CSV text, a journal's frames.
    size: u64,
    /// A journal's frame count (0 otherwise), to turn its frames replayed into bytes.
    frames: u64,
}

impl Input {
    /// How far `events` events are into this input, in bytes, for a journal (whose frames
    /// are counted, not measured).
    fn journal_bytes(&self, events: u64) -> u64 {
        if self.frames == 0 {
            return 0;
        }
        (self.size as u128 * events.min(self.frames) as u128 / self.frames as u128) as u64
    }
}

/// Checks a `--symbols` list (clap keeps the text; [`symbol_list`] splits it).
fn check_symbol_list(s: &str) -> Result<String, String> {
    symbol_list(s).map(|_| s.to_string())
}

fn symbol_list(s: &str) -> Result<Vec<String>, String> {
    aegis_shm_client::subscription::parse_symbols(s).map_err(|e| e.to_string())
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("aegis-replay: error: {msg}");
    std::process::exit(1);
}

fn main() {
    let args = Args::parse();
    if args.verify {
        verify_only(&args);
    }
    if args.source.is_some() && args.files.len() > 1 {
        fail("--source names one source: give one FILE per process, or let names default to file stems");
    }
    if let Some(dir) = args.files.iter().find(|p| p.is_dir()) {
        replay_recording(&args, dir);
    }
    if args.from.is_some() || args.to.is_some() {
        fail("--from and --to give the window of a recording DIR: no FILE here is a directory");
    }
    if let Some(out) = &args.convert {
        convert(&args, out);
        return;
    }
    if args.group.is_some() && args.files.len() != 1 {
        fail("--group: a producer group publishes one source: give one FILE");
    }
    // Every input is opened and checked here, before the session hears of this process.
    let inputs: Vec<Input> = args.files.iter().map(|p| open_input(&args, p)).collect();
    let sources = inputs
        .iter()
        .map(|i| SourceDecl {
            name: i.name.clone(),
            kind: aegis_shm_client::protocol::SourceKind::try_from(i.info.kind.event_kind())
                .expect("a file kind is an event kind"),
            topic: i.info.topic(),
            journal: i.offer.then(|| absolute(&i.path)),
            recording: None,
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
            accepts_symbols: args.symbols.is_some(),
            supported_symbols: args
                .symbols
                .as_deref()
                .map(|s| symbol_list(s).unwrap_or_else(|e| fail(e)))
                .unwrap_or_default(),
            group: args.group.clone(),
            failover: args.failover,
            ..Register::default()
        },
    )
    .unwrap_or_else(|e| fail(e));
    // With --symbols, the desired set of the ACK (the session's, which may differ from ours)
    // is applied before the first event.
    let filter = args.symbols.as_ref().map(|_| {
        let f = SymbolFilter::new(aegis_shm_client::subscription::NameSet::All);
        comp.on_symbols(f.clone());
        f
    });
    let (handed, inputs): (Vec<Input>, Vec<Input>) = inputs
        .into_iter()
        .partition(|i| comp.is_journal_backed(&i.name));
    let mut producers: Vec<(Producer, u32)> = inputs
        .iter()
        .map(|i| comp.producer(&i.name).unwrap_or_else(|e| fail(e)))
        .collect();
    // Events already merged from a source (a restart, a promotion) are skipped, never sent
    // twice: the first `skip` events of each input.
    let mut skips: Vec<u64> = inputs
        .iter()
        .map(|i| {
            comp.ack()
                .sources
                .iter()
                .find(|s| s.name == i.name)
                .and_then(|s| s.resume_after)
                .map_or(0, |l| l + 1)
        })
        .collect();
    let stats = (!handed.is_empty()).then(|| comp.stats().unwrap_or_else(|e| fail(e)));
    comp.ready(Duration::from_secs(args.start_timeout))
        .unwrap_or_else(|e| fail(e));
    if let Some(lease) = comp.lease() {
        let g = &lease.group;
        if lease.role == GroupRole::Standby {
            eprintln!(
                "aegis-replay: standby in group {g} (epoch {}, {}): waiting to be promoted",
                lease.epoch, lease.failover
            );
            match comp.wait_promoted(Duration::from_secs(args.standby_timeout)) {
                Ok(Standby::Promoted {
                    epoch,
                    resume_after,
                }) => {
                    let next = resume_after.map_or(0, |l| l + 1);
                    eprintln!(
                        "aegis-replay: promoted to active in group {g} (epoch {epoch}): resuming at source seq {next}"
                    );
                    producers[0].0.set_next_seq(next);
                    skips[0] = next;
                }
                Ok(Standby::Released(why)) => {
                    eprintln!("aegis-replay: released from group {g}: {why}");
                    if args.json {
                        println!("{{\"events\":0,\"skipped\":0,\"released\":true}}");
                    }
                    return;
                }
                Err(e) => fail(e),
            }
        } else {
            eprintln!(
                "aegis-replay: active in group {g} (epoch {}, {})",
                lease.epoch, lease.failover
            );
        }
    }
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(Counts::default());
    let size = inputs.iter().chain(&handed).map(|i| i.size).sum();
    let bar = Progress::new("replaying", size, true);
    let progress = bar.is_drawn().then(|| {
        let (stop, done, bar) = (stop.clone(), done.clone(), bar.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(PROGRESS_EVERY);
                let (bytes, events) = done.sum();
                bar.set(bytes, events);
            }
            bar.finish();
        })
    });
    let comp = Arc::new(comp);
    let mut handles = Vec::new();
    let grouped = args.group.is_some();
    let skipped: u64 = skips.iter().sum();
    for ((input, (producer, topic)), skip) in inputs.into_iter().zip(producers).zip(skips) {
        let (stop, done, comp) = (stop.clone(), done.clone(), comp.clone());
        let (speed, sort) = (args.speed, args.sort);
        let gate = filter.as_ref().map(|f| f.gate(&input.info.symbol));
        let stall = Duration::from_secs(args.stall_timeout);
        handles.push(std::thread::spawn(move || {
            let how = How {
                speed,
                sort,
                stall,
                skip,
                grouped,
                gate,
            };
            let r = replay(input, producer, topic, how, &stop, &done, &comp);
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
        match follow(&handed, stats, &comp, &done, stall, &stop) {
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
            "{{\"events\":{n},\"skipped\":{skipped},\"seconds\":{secs:.6},\"events_per_s\":{:.0}}}",
            n as f64 / secs
        );
    } else {
        eprintln!(
            "aegis-replay: {n} events from {} sources in {secs:.3} s ({:.0} events/s){}",
            counts.len(),
            n as f64 / secs,
            if skipped > 0 {
                format!("; {skipped} skipped (merged before this process took over)")
            } else {
                String::new()
            }
        );
    }
    comp.finished().unwrap_or_else(|e| fail(e));
}

/// How often the progress bar is refreshed.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How often a journal-backed source's state is looked at.
const FOLLOW_POLL: Duration = Duration::from_millis(20);

/// The absolute form of `p` (the daemon opens journals by absolute path).
fn absolute(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|e| fail(format!("{}: {e}", p.display())))
        .display()
        .to_string()
}

/// Opens and checks one input FILE (exits with the error if it fails): a journal's header is
/// read, an archive is verified against its CHECKSUM (unless --no-verify) and checked
/// ([`open_archive`]), a CSV's kind comes from its name or the flags.
fn open_input(args: &Args, p: &Path) -> Input {
    let journal = journal::is_journal(p).unwrap_or_else(|e| fail(format!("{}: {e}", p.display())));
    let (info, archive, size, frames) = if journal {
        let r = JournalReader::open(p).unwrap_or_else(|e| fail(e));
        (r.info().clone(), None, r.data_len(), r.frame_count())
    } else {
        let info = names::resolve(
            p,
            args.kind,
            args.symbol.as_deref(),
            args.interval.as_deref(),
        )
        .unwrap_or_else(|e| fail(e));
        if archive::is_archive(p) {
            if args.sort {
                fail(no_sort(p));
            }
            let (a, _) = open_archive(p, !args.no_verify).unwrap_or_else(|e| fail(e));
            let size = a.size();
            (info, Some(a), size, 0)
        } else {
            let size = std::fs::metadata(p).map_or(0, |m| m.len());
            (info, None, size, 0)
        }
    };
    let name = match &args.source {
        Some(s) => s.clone(),
        None => names::default_source_name(p).unwrap_or_else(|e| fail(e)),
    };
    Input {
        path: p.to_path_buf(),
        name,
        info,
        archive,
        journal,
        offer: journal && args.speed.is_none() && !args.via_ring && args.symbols.is_none(),
        size,
        frames,
    }
}

/// Why `--sort` refuses an archive.
fn no_sort(p: &Path) -> String {
    format!(
        "{}: --sort reads a CSV twice, the second time by offset, which a zip archive cannot \
         do: unzip it first",
        p.display()
    )
}

/// Opens a zip archive: verified against its CHECKSUM file when `verify` and there is one
/// (with a progress bar over the file), then checked ([`CsvArchive::from_file`]). Returns the
/// archive and its SHA-256 if it was verified.
fn open_archive(path: &Path, verify: bool) -> Result<(CsvArchive, Option<[u8; 32]>), ArchiveError> {
    let mut file = std::fs::File::open(path).map_err(|error| ArchiveError::Io {
        path: path.to_path_buf(),
        op: "open the archive",
        error,
    })?;
    let sha256 = if verify {
        let len = file.metadata().map_or(0, |m| m.len());
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let bar = Progress::new(&format!("verifying {name}"), len, false);
        let r = archive::verify_checksum(path, &mut file, |b| bar.set_bytes(b));
        bar.finish();
        r?
    } else {
        None
    };
    Ok((CsvArchive::from_file(path, file)?, sha256))
}

/// `--verify`: checks every FILE (a zip archive with FILE.CHECKSUM beside it), reports each,
/// and exits: 0 if all passed, 1 otherwise.
fn verify_only(args: &Args) -> ! {
    let mut results = Vec::new();
    for p in &args.files {
        let r = if !archive::is_archive(p) {
            Err(format!(
                "{}: --verify checks zip archives (NAME.zip beside NAME.zip.CHECKSUM)",
                p.display()
            ))
        } else {
            let no_checksum = || {
                ArchiveError::NoChecksum {
                    path: p.clone(),
                    checksum: archive::checksum_path(p),
                }
                .to_string()
            };
            if !archive::checksum_path(p).exists() {
                Err(no_checksum())
            } else {
                match open_archive(p, true) {
                    Ok((_, Some(sha256))) => Ok(sha256),
                    Ok((_, None)) => Err(no_checksum()),
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        if !args.json {
            match &r {
                Ok(sha256) => println!("{}: OK (SHA-256 {})", p.display(), archive::hex(sha256)),
                Err(e) => eprintln!("aegis-replay: error: {e}"),
            }
        }
        results.push((p, r));
    }
    let ok = results.iter().all(|(_, r)| r.is_ok());
    if args.json {
        let files: Vec<_> = results
            .iter()
            .map(|(p, r)| match r {
                Ok(sha256) => json!({"file": p, "ok": true, "sha256": archive::hex(sha256)}),
                Err(e) => json!({"file": p, "ok": false, "error": e}),
            })
            .collect();
        println!("{}", json!({"ok": ok, "files": files}));
    }
    std::process::exit(if ok { 0 } else { 1 });
}

/// What the replay has done so far, for the progress bar and the journal followers.
#[derive(Default)]
struct Counts {
    /// Events pushed through rings.
    pushed: AtomicU64,
    /// Bytes of input behind them.
    pushed_bytes: AtomicU64,
    /// Events the daemon merged from the journals handed to it.
    followed: AtomicU64,
    /// Bytes of journal behind them.
    followed_bytes: AtomicU64,
}

impl Counts {
    /// (bytes, events) done, in all.
    fn sum(&self) -> (u64, u64) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (
            get(&self.pushed_bytes) + get(&self.followed_bytes),
            get(&self.pushed) + get(&self.followed),
        )
    }
}

/// Follows the journal-backed sources (the daemon merges them straight from their journals)
/// in the session's counters until each has ended. Returns the events merged from each. A
/// source that failed, a session stopped, or no progress for `stall` is an error; `stop`
/// (another input failed) ends it at once.
fn follow(
    handed: &[Input],
    stats: &StatsView,
    comp: &Component,
    counts: &Counts,
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
        let bytes = handed
            .iter()
            .zip(&events)
            .map(|(i, &n)| i.journal_bytes(n))
            .sum();
        counts.followed.store(sum, Ordering::Relaxed);
        counts.followed_bytes.store(bytes, Ordering::Relaxed);
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

/// How one input is replayed.
struct How {
    speed: Option<f64>,
    sort: bool,
    stall: Duration,
    /// Events at the start already merged by the session (a restart, a promotion).
    skip: u64,
    /// A group member: stops as soon as it is fenced.
    grouped: bool,
    /// The live symbol filter (`--symbols`), if any.
    gate: Option<Gate>,
}

fn replay(
    mut input: Input,
    mut p: Producer,
    topic: u32,
    how: How,
    stop: &AtomicBool,
    counts: &Counts,
    comp: &Component,
) -> Result<u64, String> {
    let How {
        speed,
        sort,
        stall,
        skip,
        grouped,
        gate,
    } = how;
    p.set_batch(if speed.is_some() { 1 } else { 64 });
    let mut out = Out {
        p,
        topic,
        pacer: Pacer { speed, first: None },
        wait: Backoff::default(),
        stall,
        stop,
        counts,
        comp,
        gate,
        n: 0,
        published: 0,
        bytes: 0,
        end_bytes: input.size,
        skip,
        grouped,
    };
    let src = input.path.display().to_string();
    if input.journal {
        let mut order = OrderCheck::default();
        let mut r = JournalReader::open(&input.path).map_err(|e| e.to_string())?;
        let mut seen = 0u64;
        r.for_each(|f| -> Result<(), ReplayError> {
            seen += 1;
            if seen <= out.skip {
                return Ok(());
            }
            order.next(f.header.ts).map_err(|prev| {
                ReplayError(
                    JournalError::FrameOrder {
                        path: input.path.clone(),
                        frame: out.n,
                        ts: f.header.ts,
                        prev,
                    }
                    .to_string(),
                )
            })?;
            out.pacer.wait(f.header.ts);
            if !out.gate_open() {
                return Ok(());
            }
            let mut h = f.header;
            h.topic_id = topic;
            // The clock (for the deadline) is read only when the ring is full.
            let pushed = match out.p.try_push_frame(&h, f.payload) {
                Ok(_) => Ok(()),
                Err(ClaimError::Full) => out
                    .p
                    .push_frame(&h, f.payload, &mut out.wait, Deadline::after(stall))
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
            let n = out.n + 1;
            out.pushed(|| input.journal_bytes(n)).map_err(ReplayError)
        })
        .map_err(|e| e.0)?;
    } else if let Some(archive) = &mut input.archive {
        let label = archive.label();
        let reader = archive.events(&input.info).map_err(|e| e.to_string())?;
        out.csv(reader, &label)?;
    } else {
        let reader =
            CsvEvents::open(&input.path, &input.info, sort).map_err(|e| format!("{src}: {e}"))?;
        out.csv(reader, &input.path)?;
    }
    out.finish(&src)
}

/// Where one input's events go: its source ring, paced, with the counts kept for progress.
struct Out<'a> {
    p: Producer,
    topic: u32,
    pacer: Pacer,
    wait: Backoff,
    stall: Duration,
    stop: &'a AtomicBool,
    counts: &'a Counts,
    comp: &'a Component,
    /// `--symbols`: whether this source's symbol is in the desired set now.
    gate: Option<Gate>,
    /// Events pushed.
    n: u64,
    /// Events pushed, as last added to `counts`.
    published: u64,
    /// Bytes of input behind them, as last added to `counts`.
    bytes: u64,
    /// Bytes of input at the end.
    end_bytes: u64,
    /// Events at the start to skip (merged already).
    skip: u64,
    /// A group member: looks at its lease after every event.
    grouped: bool,
}

impl Out<'_> {
    /// Whether the desired symbol set lets this source's events out now (always, without
    /// `--symbols`).
    #[inline]
    fn gate_open(&mut self) -> bool {
        self.gate.as_mut().is_none_or(Gate::open)
    }

    /// Counts one more event pushed. Every 4096 events: publishes the counts (with `bytes()`
    /// of input so far), and fails if another input failed or the daemon stopped the session.
    #[inline]
    fn pushed(&mut self, bytes: impl FnOnce() -> u64) -> Result<(), String> {
        self.n += 1;
        if self.grouped {
            if let Some(why) = self.comp.fenced() {
                return Err(format!("fenced, stopping at once: {why}"));
            }
        }
        if self.n.is_multiple_of(4096) {
            self.publish(bytes());
            if self.stop.load(Ordering::Relaxed) {
                return Err("stopped".into());
            }
            if let Some(r) = self.comp.stop_requested() {
                return Err(format!("the daemon stopped the session: {r}"));
            }
        }
        Ok(())
    }

    /// Adds what was done since the last call (`bytes` of input so far) to the shared counts.
    fn publish(&mut self, bytes: u64) {
        let events = self.n - self.published;
        self.counts.pushed.fetch_add(events, Ordering::Relaxed);
        self.published = self.n;
        let bytes = bytes.max(self.bytes);
        let delta = bytes - self.bytes;
        self.counts.pushed_bytes.fetch_add(delta, Ordering::Relaxed);
        self.bytes = bytes;
    }

    /// Pushes the events of a CSV (`label` names it in errors: the file, or
    /// `ARCHIVE.zip/ENTRY.csv`).
    fn csv<R: BufRead>(&mut self, mut reader: CsvEvents<R>, label: &Path) -> Result<(), String> {
        let src = label.display();
        let mut order = OrderCheck::default();
        let mut seen = 0u64;
        while let Some(item) = reader.next() {
            let (ts, ev) = item.map_err(|e| format!("{src}: {e}"))?;
            seen += 1;
            if seen <= self.skip {
                // Merged already; still parsed, so the file is checked as far as it goes.
                order.next(ts).ok();
                continue;
            }
            order.next(ts).map_err(|prev| {
                JournalError::Order {
                    path: label.to_path_buf(),
                    line: reader.line(),
                    ts,
                    prev,
                }
                .to_string()
            })?;
            self.pacer.wait(ts);
            if !self.gate_open() {
                continue;
            }
            let (p, wait, stall) = (&mut self.p, &mut self.wait, self.stall);
            let r = match ev {
                AnyEvent::Trade(e) => push_event(p, ts, self.topic, e, wait, stall),
                AnyEvent::Book(e) => push_event(p, ts, self.topic, e, wait, stall),
                AnyEvent::Kline(e) => push_event(p, ts, self.topic, e, wait, stall),
                AnyEvent::Custom(e) => push_event(p, ts, self.topic, e, wait, stall),
            };
            r.map_err(|e| format!("{src}: {e}"))?;
            self.pushed(|| reader.bytes_read())?;
        }
        // The whole text was read (blank lines at the end too).
        self.end_bytes = reader.bytes_read();
        Ok(())
    }

    /// Publishes the last counts and writes end-of-stream; returns the events pushed.
    fn finish(mut self, src: &str) -> Result<u64, String> {
        self.publish(self.end_bytes);
        self.p
            .finish(&mut self.wait, Deadline::after(self.stall))
            .map_err(|_| {
                format!(
                    "{src}: could not write end-of-stream within {:?}",
                    self.stall
                )
            })?;
        Ok(self.n)
    }
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
    let start = Instant::now();
    let n = if archive::is_archive(input) {
        if args.sort {
            fail(no_sort(input));
        }
        let mut a = open_archive(input, !args.no_verify)
            .unwrap_or_else(|e| fail(e))
            .0;
        let bar = Progress::new("converting", a.size(), true);
        let label = a.label();
        let events = a.events(&info).unwrap_or_else(|e| fail(e));
        let n = journal::convert_events(events, &label, out, &info, 0, |b, e| bar.set(b, e));
        bar.finish();
        n
    } else {
        let size = std::fs::metadata(input).map_or(0, |m| m.len());
        let bar = Progress::new("converting", size, true);
        let n = journal::convert_csv_with_progress(input, out, &info, 0, args.sort, |b, e| {
            bar.set(b, e)
        });
        bar.finish();
        n
    }
    .unwrap_or_else(|e| fail(e));
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

/// `aegis-replay DIR`: hands the recording in `dir` to the daemon, which reads it and copies
/// its bus frames to the session's bus unchanged (one pre-sequenced stream; backtest only),
/// then follows its progress until it has ended. Exits.
fn replay_recording(args: &Args, dir: &Path) -> ! {
    use aegis_shm_client::protocol::RecordingDecl;
    use aegis_shm_client::recording::{Manifest, RecordingState};
    if args.files.len() != 1 {
        fail(format!(
            "{}: a recording directory is replayed alone: give it as the only FILE",
            dir.display()
        ));
    }
    let refused = [
        (args.speed.is_some(), "--speed"),
        (args.convert.is_some(), "--convert"),
        (args.sort, "--sort"),
        (args.via_ring, "--via-ring"),
        (args.symbols.is_some(), "--symbols"),
        (args.kind.is_some(), "--kind"),
        (args.symbol.is_some(), "--symbol"),
        (args.interval.is_some(), "--interval"),
        (args.group.is_some(), "--group"),
    ];
    if let Some((_, flag)) = refused.iter().find(|(on, _)| *on) {
        fail(format!(
            "{flag} does not apply to a recording DIR: the daemon reads the recording itself \
             and replays its bus as it was, as fast as the session takes it"
        ));
    }
    if let (Some(f), Some(t)) = (args.from, args.to) {
        if f > t {
            fail(format!("--from {f} is after --to {t}: an empty window"));
        }
    }
    // Checked here first, so that a bad recording is said before the session hears of us
    // (the daemon checks it again at REGISTER).
    let manifest = Manifest::load(dir).unwrap_or_else(|e| fail(e));
    match manifest.state {
        RecordingState::Complete => {}
        RecordingState::Incomplete => eprintln!(
            "aegis-replay: warning: {}: the recording is incomplete ({}): the replay has what it holds",
            dir.display(),
            manifest.reason.as_deref().unwrap_or("no reason given")
        ),
        RecordingState::Recording => eprintln!(
            "aegis-replay: warning: {}: the recording was not closed (still being written, or its daemon died): the replay ends at its last complete frame",
            dir.display()
        ),
    }
    for g in &manifest.gaps {
        eprintln!(
            "aegis-replay: warning: {}: the recorder missed bus seqs {}..={}: the replay's bus seqs are renumbered past them",
            dir.display(),
            g.from,
            g.to
        );
    }
    let name = args
        .source
        .clone()
        .unwrap_or_else(|| "recording".to_string());
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
            sources: vec![SourceDecl {
                name: name.clone(),
                // Not used on the bus: the recorded frames keep their kinds and topics.
                kind: aegis_shm_client::protocol::SourceKind::Trade,
                topic: "recording".into(),
                journal: None,
                recording: Some(RecordingDecl {
                    dir: absolute(dir),
                    from_ts: args.from,
                    to_ts: args.to,
                }),
            }],
            pid: Some(std::process::id()),
            ..Register::default()
        },
    )
    .unwrap_or_else(|e| fail(e));
    if !comp.is_journal_backed(&name) {
        fail("the daemon did not take the recording (a daemon without recording replay?)");
    }
    let stats = comp.stats().unwrap_or_else(|e| fail(e));
    comp.ready(Duration::from_secs(args.start_timeout))
        .unwrap_or_else(|e| fail(e));
    let start = Instant::now();
    let total_bytes: u64 = manifest.segments.iter().map(|s| s.bytes).sum();
    let bar = Progress::new("replaying", total_bytes, true);
    let stall = Duration::from_secs(args.stall_timeout);
    let mut last = (0u64, Instant::now());
    let events = loop {
        if let Some(r) = comp.stop_requested() {
            fail(format!("the daemon stopped the session: {r}"));
        }
        let s = stats.sources().into_iter().find(|s| s.name == name);
        let events = s.as_ref().map_or(0, |s| s.events);
        if manifest.frames > 0 {
            let done = (total_bytes as u128 * events.min(manifest.frames) as u128
                / manifest.frames as u128) as u64;
            bar.set(done, events);
        }
        match s.as_ref().map(|s| s.state) {
            Some(SourceState::Ended) => break events,
            Some(SourceState::Failed | SourceState::Removed) => {
                let why = s
                    .and_then(|s| s.reason)
                    .unwrap_or_else(|| "no reason given".into());
                let msg = format!("{}: the daemon's replay of it failed: {why}", dir.display());
                let _ = comp.error("replay_failed", &msg);
                fail(msg);
            }
            _ => {}
        }
        if events != last.0 {
            last = (events, Instant::now());
        } else if last.1.elapsed() > stall {
            let msg = format!(
                "the daemon replayed nothing from {} for {stall:?} (is the session stuck?)",
                dir.display()
            );
            let _ = comp.error("replay_failed", &msg);
            fail(msg);
        }
        std::thread::sleep(FOLLOW_POLL);
    };
    bar.finish();
    let secs = start.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{{\"events\":{events},\"seconds\":{secs:.6},\"events_per_s\":{:.0}}}",
            events as f64 / secs
        );
    } else {
        eprintln!(
            "aegis-replay: {events} events from recording {} in {secs:.3} s ({:.0} events/s)",
            dir.display(),
            events as f64 / secs
        );
    }
    comp.finished().unwrap_or_else(|e| fail(e));
    std::process::exit(0);
}
