//! `aegis-tap`: a consumer that prints the bus as NDJSON (SPEC section 7), a digest, or
//! counts, and reports its events/s and end-to-end latency percentiles on stderr.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aegis_shm_client::client::{ClientError, Component, Started};
use aegis_shm_client::event;
use aegis_shm_client::frame::{flags, monotonic_ns, FrameHeader, Kind, Seq};
use aegis_shm_client::protocol::{Failover, GroupRole, Mode, Register, Role};
use aegis_shm_client::recording::RecordingState;
use aegis_shm_client::spmc::{BusReader, ReadError};
use aegis_shm_client::wait::{self, Deadline, WaitKind, WaitStrategy};
use aegis_tools::digest::{Counts, StreamDigest};
use aegis_tools::ndjson;
use clap::{Parser, ValueEnum};

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
enum Format {
    Ndjson,
    Digest,
    Count,
}

/// Read an Aegis session's bus.
#[derive(Parser, Debug)]
#[command(name = "aegis-tap", version)]
struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Ndjson)]
    format: Format,
    /// Only these topics (comma-separated), e.g. trades.BTCUSDT,klines.BTCUSDT.1m: the initial
    /// desired topic set of this consumer, unless the daemon holds one for its name already.
    /// `aegis-shmctl subscribe SESSION NAME --topics ...` changes it live.
    #[arg(long, value_name = "T,...", value_parser = check_topic_list)]
    topics: Option<String>,
    /// Write to FILE instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Component name (default: tap-<pid>).
    #[arg(long)]
    name: Option<String>,
    /// Control socket (default: $AEGIS_SOCKET, else /tmp/aegis/aegis-components.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Print a JSON stats line (events, events/s, latency percentiles, digest) on stderr.
    #[arg(long)]
    json: bool,
    /// Wait strategy: park (default: sleeps on the bus's doorbell while idle), backoff, yield
    /// or spin.
    #[arg(long, default_value = "park")]
    wait: WaitKind,
    /// Skip payload validation (bytecheck); trusts every producer of the session.
    #[arg(long)]
    unchecked: bool,
    /// How long to wait for the session to start, in seconds.
    #[arg(long, default_value_t = 300)]
    start_timeout: u64,
    /// Give up when nothing arrives for this long, in seconds.
    #[arg(long, default_value_t = 120)]
    idle_timeout: u64,
    /// In a live session that records (`--record`): start at the first recorded frame, read
    /// the recording, then switch to the live bus with no gap and no duplicate (bus seqs
    /// stay contiguous), as if the tap had been there from the start. Not with --topics.
    #[arg(long, conflicts_with = "topics")]
    catch_up: bool,
    /// Join this consumer group (hot standby): one member is active, the others standbys
    /// that read the bus too and are promoted if it dies. Every member writes its output;
    /// the summary says which role it ended in.
    #[arg(long)]
    group: Option<String>,
    /// The group's failover policy: aggressive (< 2 s), balanced (2-5 s) or conservative
    /// (5-10 s). Default: balanced.
    #[arg(long, requires = "group")]
    failover: Option<Failover>,
}

/// Checks a `--topics` list (clap keeps the text; [`topic_list`] splits it).
fn check_topic_list(s: &str) -> Result<String, String> {
    topic_list(s).map(|_| s.to_string())
}

fn topic_list(s: &str) -> Result<Vec<String>, String> {
    aegis_shm_client::subscription::parse_topics(s).map_err(|e| e.to_string())
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("aegis-tap: error: {msg}");
    std::process::exit(1);
}

/// How long one wait for the bus lasts before the tap looks at the daemon and the idle timeout.
const POLL: Duration = Duration::from_millis(500);
/// Bytes of the output buffer.
const OUT_BUFFER: usize = 1 << 20;
/// Events between two progress lines on a terminal.
const PROGRESS_EVERY: u64 = 1 << 20;
/// In a burst of frames read back to back, the latency of one in this many is recorded (and
/// of every frame that follows a wait, so a paced stream is measured in full).
const LATENCY_SAMPLE: u64 = 64;

/// The tap's idle time: since when nothing arrived, and when the daemon was last asked.
#[derive(Default)]
struct Idle {
    since: Option<Instant>,
    checked: Option<Instant>,
}

impl Idle {
    /// One wait for the bus. Every [`POLL`] of idleness it checks whether the daemon stopped
    /// the session, and gives up after the idle timeout.
    fn wait(&mut self, args: &Args, comp: &Component, bus: &BusReader, w: &mut impl WaitStrategy) {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        if self.checked.is_none_or(|c| now.duration_since(c) >= POLL) {
            self.checked = Some(now);
            note_lease(comp);
            if let Some(r) = comp.stop_requested() {
                fail(format!("the daemon stopped the session: {r}"));
            }
            if now.duration_since(since) > Duration::from_secs(args.idle_timeout) {
                fail(format!("nothing arrived for {} s", args.idle_timeout));
            }
        }
        // A parking strategy sleeps until the bus moves, at most until the next check.
        let next_check = self.checked.unwrap_or(now) + POLL;
        bus.idle(w, Deadline::at(next_check));
    }
}

/// Reports a change of the group lease on stderr (promoted, fenced), once.
fn note_lease(comp: &Component) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEEN_EPOCH: AtomicU64 = AtomicU64::new(0);
    let Some(l) = comp.lease() else { return };
    if let Some(why) = comp.fenced() {
        fail(format!("fenced out of group {}: {why}", l.group));
    }
    let before = SEEN_EPOCH.swap(l.epoch, Ordering::Relaxed);
    if before != 0 && before != l.epoch && l.role == GroupRole::Active {
        eprintln!(
            "aegis-tap: promoted to active in group {} (epoch {})",
            l.group, l.epoch
        );
    }
}

/// CPU time this process used so far (user + system), in seconds.
fn cpu_seconds() -> Option<f64> {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid rusage to write; RUSAGE_SELF needs nothing else.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return None;
    }
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(s(u.ru_utime) + s(u.ru_stime))
}

/// Largest latency the histogram records, in nanoseconds.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

fn main() {
    let args = Args::parse();
    let mut tap = Tap::attach(&args);
    let mut out = open_output(&args);
    let mut totals = Totals::new();
    let start = Instant::now();
    let aborted = if args.catch_up {
        tap.catch_up(&args, &mut out, &mut totals)
    } else {
        tap.consume(&args, &mut out, &mut totals)
    };
    let names = &tap.topic_names;
    totals
        .counts
        .name_topics(|id| names.get(&id).cloned().unwrap_or_else(|| "?".to_string()));
    note_lease(&tap.comp);
    totals.report(&args, &tap.name, start.elapsed().as_secs_f64(), &mut out);
    if let (Some(l), true) = (tap.comp.lease(), args.json) {
        eprintln!(
            "{{\"group\":{:?},\"role\":\"{}\",\"epoch\":{}}}",
            l.group, l.role, l.epoch
        );
    }
    if aborted {
        let _ = tap
            .comp
            .error("aborted", "the session aborted: the stream is incomplete");
        fail("the session aborted: the stream is incomplete");
    }
    tap.comp.finished().unwrap_or_else(|e| fail(e));
}

/// A consumer registered with the daemon and attached to the started session's bus.
struct Tap {
    name: String,
    comp: Component,
    /// What the `stats` request answers (written by the reading loop, read by the handler).
    live: Arc<LiveCounts>,
    bus: BusReader,
    started: Started,
    topic_names: HashMap<u32, String>,
}

/// What the tap counts while it reads.
struct Totals {
    digest: StreamDigest,
    counts: Counts,
    hist: hdrhistogram::Histogram<u64>,
    events: u64,
    overruns: u64,
    missed: u64,
    /// `--catch-up`: the first pass over the recording (up to the first time it had
    /// nothing more): its events and seconds, the reader's rate.
    recorded: Option<(u64, f64)>,
    /// `--catch-up`: events read from the recording in all (passes after laps included).
    recorded_total: u64,
}

/// Where the output goes: `--out FILE`, or stdout.
fn open_output(args: &Args) -> Box<dyn Write> {
    match &args.out {
        Some(p) => Box::new(BufWriter::with_capacity(
            OUT_BUFFER,
            File::create(p).unwrap_or_else(|e| fail(format!("{}: {e}", p.display()))),
        )),
        None => Box::new(BufWriter::with_capacity(
            OUT_BUFFER,
            std::io::stdout().lock(),
        )),
    }
}

impl Tap {
    /// Registers as a consumer, attaches to the bus, waits for the session to start and
    /// subscribes to the requested topics.
    fn attach(args: &Args) -> Tap {
        let token = std::env::var("AEGIS_SESSION_TOKEN").unwrap_or_else(|_| {
            fail("AEGIS_SESSION_TOKEN is not set: run under `aegis-shmctl session run`, or export the token printed by `session create`")
        });
        let name = args
            .name
            .clone()
            .unwrap_or_else(|| format!("tap-{}", std::process::id()));
        let comp = Component::connect(
            args.socket.as_deref(),
            Register {
                component_name: name.clone(),
                session_token: token,
                role: Some(Role::Consumer),
                topics: args
                    .topics
                    .as_deref()
                    .map(|t| topic_list(t).unwrap_or_else(|e| fail(e)))
                    .unwrap_or_default(),
                pid: Some(std::process::id()),
                group: args.group.clone(),
                failover: args.failover,
                ..Register::default()
            },
        )
        .unwrap_or_else(|e| fail(e));
        let live = Arc::new(LiveCounts::default());
        serve_stats(&comp, &name, &live);
        let mut bus = comp.consumer().unwrap_or_else(|e| fail(e));
        if args.unchecked {
            // SAFETY: the user asked for it: every producer of the session is trusted to write
            // archives with aegis-shm-client.
            unsafe { bus.set_unchecked() };
        }
        let started = comp
            .ready(Duration::from_secs(args.start_timeout))
            .unwrap_or_else(|e| fail(e));
        if let Some(l) = comp.lease() {
            eprintln!(
                "aegis-tap: {} in group {} (epoch {}, {})",
                l.role, l.group, l.epoch, l.failover
            );
            note_lease(&comp);
        }
        let topic_names: HashMap<u32, String> = started
            .topics
            .iter()
            .map(|(n, id)| (*id, n.clone()))
            .collect();
        // The client library set the bus slot's topic mask from the session's desired set
        // (seeded by --topics, changed by `aegis-shmctl subscribe`, repaired by its
        // reconciliation); what it could not apply is said here.
        for e in comp.subscriptions().errors {
            eprintln!("aegis-tap: warning: {e}");
        }
        live.started.store(true, Ordering::Relaxed);
        Tap {
            name,
            comp,
            live,
            bus,
            started,
            topic_names,
        }
    }

    /// Reads the bus until END-OF-STREAM, writing every frame in `args.format`. Returns
    /// whether the stream ended aborted.
    fn consume(&mut self, args: &Args, out: &mut Box<dyn Write>, totals: &mut Totals) -> bool {
        let mut w = wait::strategy(args.wait);
        let tty = std::io::stderr().is_terminal() && args.out.is_some();
        let unknown = String::from("?");
        // The clock is read only while idle and for the frames whose latency is recorded:
        // reading it for every frame cost half the tap's time in a backtest running flat out.
        let mut idle = Idle::default();
        let mut burst = 0u64;
        loop {
            let f = match self.bus.try_next() {
                Ok(Some(f)) => f,
                Ok(None) => {
                    idle.wait(args, &self.comp, &self.bus, &mut w);
                    burst = 0;
                    continue;
                }
                Err(ReadError::Overrun { missed: m }) => {
                    totals.overruns += 1;
                    totals.missed += m;
                    self.live.overruns.store(totals.overruns, Ordering::Relaxed);
                    self.live.missed.store(totals.missed, Ordering::Relaxed);
                    eprintln!("aegis-tap: overrun: {m} events missed (resumed at the head)");
                    continue;
                }
                Err(e) => {
                    // A fenced member's slot is released: say why, not only that it was (the
                    // bus may tell before the daemon's `not_active` arrives: ask it).
                    if self.comp.lease().is_some() {
                        if let Err(ClientError::NotActive(why)) =
                            self.comp.discover(None, Some(&self.name))
                        {
                            fail(format!("fenced: {why}"));
                        }
                    }
                    fail(e)
                }
            };
            if idle.since.take().is_some() {
                w.reset();
            }
            if f.is_eof() {
                return f.header.has(flags::ABORT);
            }
            let h = f.header;
            // Latency of the first frame after a wait, and of one in LATENCY_SAMPLE of a burst.
            if h.publish_ns != 0 && burst.is_multiple_of(LATENCY_SAMPLE) {
                let _ = totals
                    .hist
                    .record(monotonic_ns().saturating_sub(h.publish_ns).max(1));
            }
            burst += 1;
            let res = match args.format {
                Format::Ndjson => {
                    let topic = self.topic_names.get(&h.topic_id).unwrap_or(&unknown);
                    let ev = f
                        .event()
                        .unwrap_or_else(|e| fail(format!("bus frame {}: {e}", h.bus_seq)));
                    let source = self
                        .started
                        .source_names
                        .get(h.source_id as usize)
                        .unwrap_or(&unknown);
                    ndjson::write_line(out, h.bus_seq, h, source, topic, ev)
                }
                Format::Digest => {
                    if let Err(e) = f.event() {
                        fail(format!("bus frame {}: {e}", h.bus_seq));
                    }
                    totals.digest.update(h, f.payload);
                    Ok(())
                }
                Format::Count => {
                    totals.counts.add_by_id(h, &unknown);
                    Ok(())
                }
            };
            res.unwrap_or_else(|e| fail(format!("write: {e}")));
            totals.events += 1;
            self.live.events.store(totals.events, Ordering::Relaxed);
            if tty && totals.events.is_multiple_of(PROGRESS_EVERY) {
                eprint!("\raegis-tap: {} events", totals.events);
            }
        }
    }
}

/// The counts the `stats` request answers: one writer (the reading loop, a Relaxed store per
/// event), read by the request handler's thread.
#[derive(Default)]
struct LiveCounts {
    started: AtomicBool,
    events: AtomicU64,
    overruns: AtomicU64,
    missed: AtomicU64,
}

/// Answers the request type `stats` (`aegis-shmctl call SESSION TAP stats`) with the tap's
/// counts as JSON, on the client library's handler thread: the reading loop never waits for it.
fn serve_stats(comp: &Component, name: &str, live: &Arc<LiveCounts>) {
    let (name, live, since) = (name.to_string(), live.clone(), Instant::now());
    comp.serve("stats", move |_| {
        Ok(serde_json::json!({
            "name": name,
            "started": live.started.load(Ordering::Relaxed),
            "events": live.events.load(Ordering::Relaxed),
            "overruns": live.overruns.load(Ordering::Relaxed),
            "missed": live.missed.load(Ordering::Relaxed),
            "uptime_s": since.elapsed().as_secs_f64(),
        }))
    });
}

impl Totals {
    fn new() -> Totals {
        Totals {
            digest: StreamDigest::new(),
            counts: Counts::new(),
            hist: hdrhistogram::Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_NS, 3)
                .expect("histogram bounds"),
            events: 0,
            overruns: 0,
            missed: 0,
            recorded: None,
            recorded_total: 0,
        }
    }

    /// Writes the format's trailer (digest, counts) to `out` and the summary line to stderr.
    fn report(self, args: &Args, name: &str, secs: f64, out: &mut dyn Write) {
        let Totals {
            digest,
            counts,
            hist,
            events,
            overruns,
            missed,
            recorded,
            recorded_total,
        } = self;
        let catch_up = match recorded {
            Some((n, s)) => format!(
                ",\"catch_up\":{{\"recorded_events\":{recorded_total},\"first_pass_events\":{n},\"first_pass_seconds\":{s:.6},\"events_per_s\":{:.0}}}",
                n as f64 / s.max(1e-9)
            ),
            None => String::new(),
        };
        let digest_hex = digest.finish();
        match args.format {
            Format::Digest => writeln!(out, "{digest_hex}"),
            Format::Count => writeln!(
                out,
                "{}",
                if args.json {
                    counts.render_json()
                } else {
                    counts.render_human()
                }
            ),
            Format::Ndjson => Ok(()),
        }
        .and_then(|()| out.flush())
        .unwrap_or_else(|e| fail(format!("write: {e}")));
        let q = |p: f64| hist.value_at_quantile(p) / 1000;
        let pct = |p: f64| {
            if hist.is_empty() {
                "n/a".to_string()
            } else {
                format!("{}", q(p))
            }
        };
        if args.json {
            let ns = |p: f64| hist.value_at_quantile(p);
            eprintln!(
                "{{\"name\":{:?},\"events\":{events}{catch_up},\"seconds\":{secs:.6},\"events_per_s\":{:.0},\"latency_us\":{{\"p50\":{},\"p99\":{},\"p999\":{},\"max\":{}}},\"latency_ns\":{{\"p50\":{},\"p99\":{},\"p999\":{},\"max\":{}}},\"cpu_s\":{},\"overruns\":{overruns},\"missed\":{missed},\"digest\":{:?}}}",
                name,
                events as f64 / secs,
                q(0.5),
                q(0.99),
                q(0.999),
                hist.max() / 1000,
                ns(0.5),
                ns(0.99),
                ns(0.999),
                hist.max(),
                cpu_seconds().map_or("null".to_string(), |c| format!("{c:.6}")),
                if args.format == Format::Digest { digest_hex.as_str() } else { "" }
            );
        } else {
            eprintln!(
                "aegis-tap {name}: {events} events in {secs:.3} s ({:.0} events/s); latency µs p50 {} p99 {} p99.9 {} max {}{}{}",
                events as f64 / secs,
                pct(0.5),
                pct(0.99),
                pct(0.999),
                if hist.is_empty() { "n/a".into() } else { (hist.max() / 1000).to_string() },
                if overruns > 0 { format!("; {overruns} overruns, {missed} missed") } else { String::new() },
                match recorded {
                    Some((n, s)) => format!(
                        "; {recorded_total} events from the recording (first pass: {n} in {s:.3} s, {:.0} events/s)",
                        n as f64 / s.max(1e-9)
                    ),
                    None => String::new(),
                }
            );
        }
    }
}

/// How long a catch-up waits between looks at a recording that has not got further yet.
const CATCH_UP_POLL: Duration = Duration::from_millis(1);

/// A frame copied out (a live frame parked while the recording catches up, or a recorded
/// one), its payload 16-byte aligned so that the archive can be read in place.
struct Owned {
    header: FrameHeader,
    words: Vec<u128>,
}

impl Owned {
    fn new(header: FrameHeader, payload: &[u8]) -> Owned {
        let mut o = Owned {
            header,
            words: Vec::new(),
        };
        o.set(header, payload);
        o
    }

    /// Copies `header` and `payload` in, reusing the buffer.
    fn set(&mut self, header: FrameHeader, payload: &[u8]) {
        self.header = header;
        self.header.len = payload.len() as u32;
        let words = payload.len().div_ceil(16);
        if self.words.len() < words {
            self.words.resize(words, 0);
        }
        // SAFETY: `words` holds at least `payload.len()` bytes; u128 has no invalid bit
        // patterns, and the two buffers do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                payload.as_ptr(),
                self.words.as_mut_ptr() as *mut u8,
                payload.len(),
            )
        };
    }

    fn payload(&self) -> &[u8] {
        // SAFETY: `words` holds at least `header.len` initialised bytes (copied in `new`),
        // and u8 has no alignment requirement.
        unsafe {
            std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.header.len as usize)
        }
    }
}

impl Tap {
    /// Writes one event frame (not the end of stream) in `args.format`. `latency`: record
    /// its end-to-end latency (live frames only: a recorded frame's stamp is from the past).
    #[allow(clippy::too_many_arguments)]
    fn write_event(
        &self,
        args: &Args,
        out: &mut Box<dyn Write>,
        totals: &mut Totals,
        h: &FrameHeader,
        payload: &[u8],
        latency: bool,
    ) {
        let unknown = "?";
        if latency && h.publish_ns != 0 {
            let _ = totals
                .hist
                .record(monotonic_ns().saturating_sub(h.publish_ns).max(1));
        }
        let kind = Kind::from_u8(h.kind).unwrap_or(Kind::Control);
        let res = match args.format {
            Format::Ndjson => {
                let topic = self
                    .topic_names
                    .get(&h.topic_id)
                    .map_or(unknown, String::as_str);
                let ev = event::decode(kind, payload)
                    .unwrap_or_else(|e| fail(format!("bus frame {}: {e}", h.bus_seq)));
                let source = self
                    .started
                    .source_names
                    .get(h.source_id as usize)
                    .map_or(unknown, String::as_str);
                ndjson::write_line(out, h.bus_seq, h, source, topic, ev)
            }
            Format::Digest => {
                if let Err(e) = event::decode(kind, payload) {
                    fail(format!("bus frame {}: {e}", h.bus_seq));
                }
                totals.digest.update(h, payload);
                Ok(())
            }
            Format::Count => {
                totals.counts.add_by_id(h, unknown);
                Ok(())
            }
        };
        res.unwrap_or_else(|e| fail(format!("write: {e}")));
        totals.events += 1;
    }

    /// `--catch-up`: the recording from its first frame, then the live bus, with bus seqs
    /// contiguous. The bus reader is attached (at the head) before the recording is opened,
    /// so every frame is in one or the other:
    ///
    /// - **Catching up:** records come from the recording. When it has nothing more yet, one
    ///   live frame is read: one already written is dropped, the next one expected is written
    ///   and the tap is live; a later one is *parked* (copied out) and the recording is read
    ///   on until it reaches it. The bus is not read meanwhile, so it may lap the parked
    ///   reader; that costs nothing: the recording has the frames, and the next live frame
    ///   read is parked again.
    /// - **Live:** frames come from the bus. If it laps the tap, the tap goes back to the
    ///   recording (which has the frames missed) and catches up again. Never skips: a frame
    ///   that neither has (a gap the recorder itself recorded) is counted as missed and said.
    ///
    /// Returns whether the stream ended aborted.
    fn catch_up(&mut self, args: &Args, out: &mut Box<dyn Write>, totals: &mut Totals) -> bool {
        use aegis_shm_client::recording::{Cursor, Next, Record};
        if self.comp.ack().mode != Mode::Live {
            fail("--catch-up is for a live session (a backtest consumer sees the whole stream anyway)");
        }
        let Some(dir) = self.comp.ack().recording.clone() else {
            fail("--catch-up needs a session that records (session create|run --record DIR)");
        };
        let stats = self.comp.stats().unwrap_or_else(|e| fail(e));
        let mut cursor = Cursor::new(&dir);
        let mut w = wait::strategy(args.wait);
        let mut idle = Idle::default();
        let mut expected: Seq = 0;
        let mut parked: Option<Owned> = None;
        let mut live = false;
        let mut recorded = 0u64;
        let mut scratch = Owned::new(FrameHeader::default(), &[]);
        let start = Instant::now();
        loop {
            if live {
                let f = match self.bus.try_next() {
                    Ok(Some(f)) => Owned::new(*f.header, f.payload),
                    Ok(None) => {
                        idle.wait(args, &self.comp, &self.bus, &mut w);
                        continue;
                    }
                    Err(ReadError::Overrun { missed }) => {
                        // The recording has what the bus overwrote: catch up again.
                        eprintln!(
                            "aegis-tap: lapped by the live bus ({missed} frames): reading them from the recording"
                        );
                        live = false;
                        continue;
                    }
                    Err(e) => fail(e),
                };
                if idle.since.take().is_some() {
                    w.reset();
                }
                match f.header.bus_seq.cmp(&expected) {
                    std::cmp::Ordering::Less => continue,
                    std::cmp::Ordering::Greater => {
                        parked = Some(f);
                        live = false;
                        continue;
                    }
                    std::cmp::Ordering::Equal => {}
                }
                if f.header.kind == Kind::Control as u8 {
                    return f.header.has(flags::ABORT);
                }
                self.write_event(args, out, totals, &f.header, f.payload(), true);
                expected += 1;
                continue;
            }
            // Catching up.
            if let Some(p) = parked.take_if(|p| p.header.bus_seq <= expected) {
                if p.header.bus_seq == expected {
                    if p.header.kind == Kind::Control as u8 {
                        return p.header.has(flags::ABORT);
                    }
                    self.write_event(args, out, totals, &p.header, p.payload(), true);
                    expected += 1;
                    live = true;
                    continue;
                }
            }
            match cursor
                .read()
                .unwrap_or_else(|e| fail(format!("catching up: {e}")))
            {
                Next::Record(Record::Frame(h, payload)) => {
                    idle.since = None;
                    if h.bus_seq < expected {
                        continue;
                    }
                    if h.kind == Kind::Control as u8 {
                        return h.has(flags::ABORT);
                    }
                    scratch.set(h, payload);
                    self.write_event(args, out, totals, &h, scratch.payload(), false);
                    recorded += 1;
                    totals.recorded_total += 1;
                    expected = h.bus_seq + 1;
                }
                Next::Record(Record::Gap { from, count }) => {
                    let to = from + count;
                    if to > expected {
                        // Neither the recording nor (long since) the bus has them.
                        let missed = to - expected.max(from);
                        totals.overruns += 1;
                        totals.missed += missed;
                        eprintln!(
                            "aegis-tap: the recording misses bus seqs {}..={}: {missed} events missed",
                            expected.max(from),
                            to - 1
                        );
                        expected = to;
                    }
                }
                Next::End => return false,
                Next::Pending => {
                    if totals.recorded.is_none() {
                        totals.recorded = Some((recorded, start.elapsed().as_secs_f64()));
                    }
                    if parked.is_none() {
                        match self.bus.try_next() {
                            Ok(Some(f)) => {
                                idle.since = None;
                                if f.header.bus_seq >= expected {
                                    parked = Some(Owned::new(*f.header, f.payload));
                                }
                                continue;
                            }
                            Ok(None) => {}
                            // The next read is at the head; the recording has the rest.
                            Err(ReadError::Overrun { missed }) => {
                                eprintln!(
                                    "aegis-tap: lapped by the live bus ({missed} frames) while catching up: reading on in the recording"
                                );
                                continue;
                            }
                            Err(e) => fail(e),
                        }
                    }
                    if let Some(r) = stats.recording() {
                        if r.state == RecordingState::Incomplete {
                            fail(format!(
                                "catching up: the recording in {} stopped at bus seq {} ({}): the live bus cannot be reached without a gap",
                                dir.display(),
                                r.next_seq,
                                r.reason.unwrap_or_else(|| "no reason given".into())
                            ));
                        }
                    }
                    idle.tick(args, &self.comp);
                    std::thread::sleep(CATCH_UP_POLL);
                }
            }
        }
    }
}

impl Idle {
    /// One look at the daemon and the idle timeout while catching up (every [`POLL`]).
    fn tick(&mut self, args: &Args, comp: &Component) {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        if self.checked.is_none_or(|c| now.duration_since(c) >= POLL) {
            self.checked = Some(now);
            if let Some(r) = comp.stop_requested() {
                fail(format!("the daemon stopped the session: {r}"));
            }
            if now.duration_since(since) > Duration::from_secs(args.idle_timeout) {
                fail(format!(
                    "catching up: neither the recording nor the bus moved for {} s",
                    args.idle_timeout
                ));
            }
        }
    }
}
