//! Multi-process test of the data plane on real `/dev/shm`.
//!
//! ```text
//!  producer process ──SPSC ring (64 KiB)──> relay thread ──bus (64 KiB, Block)──> consumer process (slot 0)
//!                                           (stands in for the sequencer)     └─> consumer process (slot 1)
//! ```
//!
//! The test binary re-executes itself: every child role is a `#[test]` function that returns at
//! once unless `AEGIS_MP_ROLE` names it, and the parent runs
//! `<this binary> --exact <role test> --nocapture --test-threads=1` with the session in
//! environment variables. Children report on stdout with lines that contain `AEGIS-MP ` (libtest
//! may print `test <name> ... ` on the same line, so the marker is searched, not anchored).
//!
//! Every process computes the same checksum: SHA-256 over each event frame's `ts`, `kind`,
//! `source_seq`, payload length and payload bytes (never `bus_seq`, which only the bus assigns).
//!
//! A [`Session`] guard owns the children and the segment names: its `Drop` kills every child
//! still running (by pid) and removes `/dev/shm/aegis-<sid>-*`, so a failing test leaves
//! nothing behind.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use aegis_shm_client::event::{AnyEvent, Book, Decimal, EventRef, Kline, Symbol, Trade};
use aegis_shm_client::frame::{flags, FrameHeader, Kind};
use aegis_shm_client::segment::{segment_path, Region, ShmRegion, SHM_DIR};
use aegis_shm_client::spmc::{self, BusMonitor, BusReader, BusWriter, Policy, WriteError};
use aegis_shm_client::spsc::{self, Producer, RingReader};
use aegis_shm_client::wait::{Backoff, Deadline, WaitStrategy};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

/// Events pushed by the producer in the main test.
const EVENTS: u64 = 1_000_000;
/// Events pushed in the kill test, and how many the victim reads before it stops reading.
const KILL_EVENTS: u64 = 200_000;
const KILL_PAUSE_AT: u64 = 100_000;

/// Capacity of the source ring and of the bus: both much smaller than the data (~150 MB).
const RING_CAP: usize = 64 << 10;
const BUS_CAP: usize = 64 << 10;

/// Frames per producer commit batch, and at most per relay batch (one bus publish each).
const PRODUCER_BATCH: u32 = 64;
const RELAY_BATCH: usize = 256;

/// The producer's source id; consumers check it comes through.
const SOURCE_ID: u16 = 3;
const SEED: u64 = 0x5EED_AE61_5000_0001;

/// The deadline every blocking call of a child (and of the relay) gets.
const CHILD_DEADLINE: Duration = Duration::from_secs(60);
/// How long the parent waits for a child's final report / exit before it kills it.
const EXIT_TIMEOUT: Duration = Duration::from_secs(75);
/// How long the parent waits for a consumer to report `attached`.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(20);

const ENV_ROLE: &str = "AEGIS_MP_ROLE";
const ENV_SID: &str = "AEGIS_MP_SID";
const ENV_EPOCH: &str = "AEGIS_MP_EPOCH";
const ENV_SLOT: &str = "AEGIS_MP_SLOT";
const ENV_EVENTS: &str = "AEGIS_MP_EVENTS";
const ENV_PAUSE_AT: &str = "AEGIS_MP_PAUSE_AT";
const ENV_STOP_AT: &str = "AEGIS_MP_STOP_AT";

/// Marker of every line a child reports on stdout.
const MARK: &str = "AEGIS-MP ";

const RING_SUFFIX: &str = "src-mp";
const BUS_SUFFIX: &str = "bus";

// ---------------------------------------------------------------------------------------------
// Shared by every role: the event generator and the checksum
// ---------------------------------------------------------------------------------------------

/// Deterministic event stream: splitmix64, a mix of Trade/Book/Kline, non-decreasing `ts`
/// (equal timestamps happen often).
struct Gen {
    state: u64,
    ts: u64,
    trade_id: u64,
    update_id: u64,
    symbols: [Symbol; 4],
    intervals: [Symbol; 2],
}

impl Gen {
    fn new(seed: u64) -> Gen {
        let sym = |s| Symbol::new(s).expect("valid symbol");
        Gen {
            state: seed,
            ts: 1_726_876_800_000_000_000,
            trade_id: 1_000_000,
            update_id: 50_000_000,
            symbols: [
                sym("BTCUSDT"),
                sym("ETHUSDT"),
                sym("SOLUSDT"),
                sym("BNBUSDT"),
            ],
            intervals: [sym("1m"), sym("5m")],
        }
    }

    fn u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn dec(&mut self) -> Decimal {
        let r = self.u64();
        Decimal {
            mantissa: (r >> 20) as i64 % 10_000_000_000_000,
            scale: (r % 9) as u8,
        }
    }

    /// The next event: `(ts, topic_id, event)`.
    fn next_event(&mut self) -> (u64, u32, AnyEvent) {
        let r = self.u64();
        // 0, 0, 0, 1 µs or up to 1 ms later: equal timestamps are common.
        self.ts += match r % 8 {
            0..=2 => 0,
            3 => 1_000,
            _ => (r >> 40) % 1_000_000,
        };
        let topic = ((r >> 8) % 4) as u32;
        let symbol = self.symbols[topic as usize];
        let ev = match (r >> 16) % 20 {
            0..=9 => {
                self.trade_id += 1;
                AnyEvent::Trade(Trade {
                    symbol,
                    id: self.trade_id,
                    price: self.dec(),
                    qty: self.dec(),
                    buyer_maker: r & (1 << 32) != 0,
                })
            }
            10..=16 => {
                self.update_id += 1 + (r >> 50) % 3;
                AnyEvent::Book(Book {
                    symbol,
                    update_id: self.update_id,
                    bid_price: self.dec(),
                    bid_qty: self.dec(),
                    ask_price: self.dec(),
                    ask_qty: self.dec(),
                })
            }
            _ => AnyEvent::Kline(Kline {
                symbol,
                interval: self.intervals[((r >> 33) & 1) as usize],
                open_time: self.ts - 60_000_000_000,
                close_time: self.ts,
                open: self.dec(),
                high: self.dec(),
                low: self.dec(),
                close: self.dec(),
                volume: self.dec(),
                quote_volume: self.dec(),
                trades: self.u64() % 100_000,
                taker_buy_base: self.dec(),
                taker_buy_quote: self.dec(),
            }),
        };
        (self.ts, topic + 1, ev)
    }
}

/// SHA-256 over every event frame's `ts`, `kind`, `source_seq`, payload length and payload.
struct Checksum {
    sha: Sha256,
    count: u64,
}

impl Checksum {
    fn new() -> Checksum {
        Checksum {
            sha: Sha256::new(),
            count: 0,
        }
    }

    fn add(&mut self, ts: u64, kind: u8, source_seq: u64, payload: &[u8]) {
        let mut h = [0u8; 21];
        h[0..8].copy_from_slice(&ts.to_le_bytes());
        h[8] = kind;
        h[9..17].copy_from_slice(&source_seq.to_le_bytes());
        h[17..21].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        self.sha.update(h);
        self.sha.update(payload);
        self.count += 1;
    }

    fn hex(self) -> String {
        self.sha
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// A 16-byte aligned scratch buffer (rkyv archives are accessed at 16-byte alignment).
#[repr(C, align(16))]
struct Aligned([u8; 512]);

// ---------------------------------------------------------------------------------------------
// Child roles
// ---------------------------------------------------------------------------------------------

fn role() -> Option<String> {
    std::env::var(ENV_ROLE).ok()
}

fn env<T: std::str::FromStr>(name: &str) -> T {
    let v = std::env::var(name).unwrap_or_else(|_| panic!("child needs {name}"));
    v.parse()
        .unwrap_or_else(|_| panic!("{name}={v:?} does not parse"))
}

fn open_shm(suffix: &str) -> Arc<dyn Region> {
    let sid: String = env(ENV_SID);
    let path = segment_path(&sid, suffix);
    Arc::new(ShmRegion::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display())))
}

/// Child role: pushes `AEGIS_MP_EVENTS` generated events into the source ring, then EOF.
#[test]
fn child_producer() {
    if role().as_deref() != Some("producer") {
        return;
    }
    let epoch: u64 = env(ENV_EPOCH);
    let events: u64 = env(ENV_EVENTS);
    let mut tx = Producer::open(open_shm(RING_SUFFIX), Some(epoch), SOURCE_ID)
        .unwrap_or_else(|e| panic!("producer open: {e}"));
    tx.set_batch(PRODUCER_BATCH);
    let mut wait = Backoff::default();
    let deadline = Deadline::after(CHILD_DEADLINE);
    let mut gen = Gen::new(SEED);
    let mut sum = Checksum::new();
    let mut buf = Aligned([0; 512]);
    for i in 0..events {
        let (ts, topic, ev) = gen.next_event();
        let len = ev.encode_into(&mut buf.0).expect("encode");
        let pushed = match ev {
            AnyEvent::Trade(e) => tx
                .push(ts, topic, e, &mut wait, deadline)
                .map_err(|e| e.to_string()),
            AnyEvent::Book(e) => tx
                .push(ts, topic, e, &mut wait, deadline)
                .map_err(|e| e.to_string()),
            AnyEvent::Kline(e) => tx
                .push(ts, topic, e, &mut wait, deadline)
                .map_err(|e| e.to_string()),
            AnyEvent::Custom(e) => tx
                .push(ts, topic, e, &mut wait, deadline)
                .map_err(|e| e.to_string()),
        };
        let seq = pushed.unwrap_or_else(|e| panic!("producer: push of event {i} failed: {e}"));
        assert_eq!(seq, i, "producer: source_seq");
        sum.add(ts, ev.kind() as u8, seq, &buf.0[..len]);
    }
    tx.finish(&mut wait, deadline)
        .unwrap_or_else(|e| panic!("producer: finish failed: {e}"));
    let count = sum.count;
    println!("{MARK}checksum={} count={count}", sum.hex());
}

/// Child role: attaches to `AEGIS_MP_SLOT`, reports `attached`, reads until END-OF-STREAM,
/// checking every frame. With `AEGIS_MP_PAUSE_AT=n` it stops reading after `n` events, reports
/// `paused` and waits to be killed, holding its slot.
#[test]
fn child_consumer() {
    if role().as_deref() != Some("consumer") {
        return;
    }
    let epoch: u64 = env(ENV_EPOCH);
    let slot: usize = env(ENV_SLOT);
    let pause_at: Option<u64> = std::env::var(ENV_PAUSE_AT).ok().map(|_| env(ENV_PAUSE_AT));
    let stop_at: Option<u64> = std::env::var(ENV_STOP_AT).ok().map(|_| env(ENV_STOP_AT));
    let mut rx = BusReader::attach(open_shm(BUS_SUFFIX), Some(epoch), Some(slot))
        .unwrap_or_else(|e| panic!("consumer {slot}: attach: {e}"));
    assert_eq!(rx.slot(), slot);
    println!("{MARK}attached slot={slot}");
    let deadline = Deadline::after(CHILD_DEADLINE);
    let mut wait = Backoff::default();
    let mut sum = Checksum::new();
    let mut last_ts = 0;
    loop {
        if pause_at == Some(sum.count) {
            println!("{MARK}paused count={}", sum.count);
            // Hold the slot (and the bus) until the parent kills us with SIGKILL.
            while !deadline.expired() {
                thread::sleep(Duration::from_millis(20));
            }
            panic!("consumer {slot}: paused at {} and never killed", sum.count);
        }
        if stop_at == Some(sum.count) {
            println!("{MARK}stopping count={}", sum.count);
            // SAFETY: raise has no memory-safety preconditions; the parent sends SIGCONT.
            unsafe { libc::raise(libc::SIGSTOP) };
        }
        let n = sum.count;
        let f = rx.next(&mut wait, deadline).unwrap_or_else(|e| {
            println!("{MARK}error after={n} {e}");
            panic!("consumer {slot}: next after {n} events: {e}")
        });
        if f.is_eof() {
            assert_eq!(
                f.header.bus_seq, n,
                "consumer {slot}: bus_seq of END-OF-STREAM"
            );
            break;
        }
        let h = f.header;
        assert_eq!(h.bus_seq, n, "consumer {slot}: bus_seq of event {n}");
        assert_eq!(h.source_seq, n, "consumer {slot}: source_seq of event {n}");
        assert_eq!(h.source_id, SOURCE_ID, "consumer {slot}: source_id of {n}");
        assert!(h.ts >= last_ts, "consumer {slot}: ts went backwards at {n}");
        last_ts = h.ts;
        let ok = match f.event() {
            Ok(EventRef::Trade(t)) => f.kind() == Kind::Trade && t.id.to_native() > 0,
            Ok(EventRef::Book(b)) => f.kind() == Kind::Book && b.update_id.to_native() > 0,
            Ok(EventRef::Kline(k)) => f.kind() == Kind::Kline && k.close_time.to_native() == h.ts,
            Ok(EventRef::Custom(_)) => {
                panic!("consumer {slot}: event {n} is custom, none was sent")
            }
            Err(e) => panic!("consumer {slot}: event {n} does not validate: {e}"),
        };
        assert!(
            ok,
            "consumer {slot}: event {n} does not match its header {h:?}"
        );
        sum.add(h.ts, h.kind, h.source_seq, f.payload);
    }
    let count = sum.count;
    println!("{MARK}checksum={} count={count}", sum.hex());
}

// ---------------------------------------------------------------------------------------------
// The relay (stands in for the sequencer), run on a thread of the parent
// ---------------------------------------------------------------------------------------------

/// Shared between the relay thread and the parent.
#[derive(Default)]
struct RelayCtl {
    /// Set by the parent (or the guard) to make the relay give up.
    stop: AtomicBool,
    /// Bus frames written so far (updated per batch, and whenever the relay finds the bus full).
    written: AtomicU64,
    /// Whether the relay is waiting on a full bus right now.
    blocked: AtomicBool,
    /// `slot + 1` of a slot the relay must free with `BusWriter::release_slot` (0: none): what
    /// the daemon will do for a dead consumer.
    release: AtomicUsize,
}

struct RelayReport {
    checksum: String,
    events: u64,
    bus_frames: u64,
}

/// Writes one frame on the bus with the blocking `write`, in 20 ms slices so that it can
/// notice a stop request or a slot to release between them.
fn relay_write(
    bus: &mut BusWriter,
    h: &FrameHeader,
    payload: &[u8],
    ctl: &RelayCtl,
    wait: &mut Backoff,
    deadline: Deadline,
) -> Result<(), String> {
    loop {
        match bus.write(h, payload, wait, Deadline::after(Duration::from_millis(20))) {
            Ok(_) => {
                ctl.blocked.store(false, Ordering::Relaxed);
                return Ok(());
            }
            Err(WriteError::Timeout) => {
                ctl.written.store(bus.next_seq(), Ordering::Relaxed);
                ctl.blocked.store(true, Ordering::Release);
                let r = ctl.release.swap(0, Ordering::AcqRel);
                if r > 0 {
                    bus.release_slot(r - 1);
                }
                if ctl.stop.load(Ordering::Relaxed) {
                    return Err("relay: stopped while the bus was full".into());
                }
                if deadline.expired() {
                    return Err(format!(
                        "relay: bus still full at the deadline after {} frames: {:?}",
                        bus.next_seq(),
                        bus.slot_stats()
                    ));
                }
            }
            Err(e) => return Err(format!("relay: bus write: {e}")),
        }
    }
}

/// Reads the ring batch by batch (peek/consume/release), writes every event frame on the bus
/// (one publish per batch), and writes END-OF-STREAM after the ring's EOF frame.
fn relay(
    ring: Arc<dyn Region>,
    bus: Arc<dyn Region>,
    epoch: u64,
    ctl: &RelayCtl,
) -> Result<RelayReport, String> {
    let deadline = Deadline::after(CHILD_DEADLINE);
    let mut rx = RingReader::open(ring, Some(epoch)).map_err(|e| format!("relay: ring: {e}"))?;
    let mut tx = BusWriter::open(bus, Some(epoch)).map_err(|e| format!("relay: bus: {e}"))?;
    let mut ring_wait = Backoff::default();
    let mut bus_wait = Backoff::default();
    let mut sum = Checksum::new();
    loop {
        let mut n = 0;
        let mut eof = false;
        while n < RELAY_BATCH {
            let Some(f) = rx.peek().map_err(|e| format!("relay: ring: {e}"))? else {
                break;
            };
            let h = f.header;
            if h.has(flags::EOF) {
                rx.consume();
                eof = true;
                break;
            }
            if h.kind == Kind::Control as u8 {
                return Err(format!("relay: unexpected control frame {h:?}"));
            }
            sum.add(h.ts, h.kind, h.source_seq, f.payload);
            relay_write(&mut tx, &h, f.payload, ctl, &mut bus_wait, deadline)?;
            rx.consume();
            n += 1;
        }
        if n > 0 || eof {
            tx.publish();
            rx.release();
            ctl.written.store(tx.next_seq(), Ordering::Relaxed);
            ring_wait.reset();
        }
        if eof {
            tx.write_eof(u64::MAX, &mut bus_wait, deadline)
                .map_err(|e| format!("relay: write_eof: {e}"))?;
            ctl.written.store(tx.next_seq(), Ordering::Relaxed);
            return Ok(RelayReport {
                events: sum.count,
                checksum: sum.hex(),
                bus_frames: tx.next_seq(),
            });
        }
        if n == 0 {
            if ctl.stop.load(Ordering::Relaxed) {
                return Err("relay: stopped".into());
            }
            if deadline.expired() {
                return Err(format!(
                    "relay: no EOF from the ring by the deadline ({} events relayed)",
                    sum.count
                ));
            }
            ring_wait.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The parent side: a session guard that owns children and segments
// ---------------------------------------------------------------------------------------------

struct Proc {
    what: String,
    child: Child,
    /// Marker lines received so far (the part from the marker on).
    lines: Vec<String>,
    stdout_closed: bool,
    stderr: Arc<Mutex<String>>,
}

/// Owns one test session: its segment names, its children and the relay's stop flag. Dropping
/// it (also on panic) kills the children still running and removes `/dev/shm/aegis-<sid>-*`.
struct Session {
    sid: String,
    epoch: u64,
    procs: Vec<Proc>,
    rx: mpsc::Receiver<(usize, Option<String>)>,
    tx: mpsc::Sender<(usize, Option<String>)>,
    relay: Arc<RelayCtl>,
    relay_thread: Option<thread::JoinHandle<Result<RelayReport, String>>>,
    relay_report: Option<RelayReport>,
}

impl Session {
    fn new(tag: &str) -> Session {
        let pid = std::process::id();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .subsec_nanos();
        let (tx, rx) = mpsc::channel();
        let s = Session {
            sid: format!("mp{pid}{tag}"),
            epoch: (u64::from(pid) << 32) | u64::from(nanos) | 1,
            procs: Vec::new(),
            rx,
            tx,
            relay: Arc::new(RelayCtl::default()),
            relay_thread: None,
            relay_report: None,
        };
        // A leftover of an earlier run with the same pid would make `create` fail.
        s.remove_segments();
        s
    }

    fn path(&self, suffix: &str) -> PathBuf {
        segment_path(&self.sid, suffix)
    }

    fn segments(&self) -> Vec<PathBuf> {
        let prefix = format!("aegis-{}-", self.sid);
        std::fs::read_dir(SHM_DIR)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn remove_segments(&self) {
        for p in self.segments() {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Starts this test binary as child `role` (`child_<role>`), with the session's sid and
    /// epoch plus `vars` in its environment. Returns the child's index.
    fn spawn(&mut self, role: &str, what: &str, vars: &[(&str, String)]) -> usize {
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd = Command::new(exe);
        cmd.args([
            "--exact",
            &format!("child_{role}"),
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV_ROLE, role)
        .env(ENV_SID, &self.sid)
        .env(ENV_EPOCH, self.epoch.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let idx = self.procs.len();
        let out = child.stdout.take().expect("stdout");
        let tx = self.tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find(MARK) {
                    let _ = tx.send((idx, Some(line[at + MARK.len()..].to_string())));
                }
            }
            let _ = tx.send((idx, None));
        });
        let mut err = child.stderr.take().expect("stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        self.procs.push(Proc {
            what: format!("{what} (pid {})", child.id()),
            child,
            lines: Vec::new(),
            stdout_closed: false,
            stderr,
        });
        idx
    }

    /// Starts the relay thread on the session's ring and bus.
    fn start_relay(&mut self, ring: &Arc<ShmRegion>, bus: &Arc<ShmRegion>) {
        let ring: Arc<dyn Region> = ring.clone();
        let bus: Arc<dyn Region> = bus.clone();
        let epoch = self.epoch;
        let ctl = self.relay.clone();
        let handle = thread::Builder::new()
            .name("relay".into())
            .spawn(move || relay(ring, bus, epoch, &ctl))
            .expect("spawn relay");
        self.relay_thread = Some(handle);
    }

    /// Collects the relay's result if it has finished; fails at once if the relay failed.
    fn poll_relay(&mut self, block: bool) {
        let finished = self
            .relay_thread
            .as_ref()
            .is_some_and(|h| block || h.is_finished());
        if finished {
            let h = self.relay_thread.take().expect("relay thread");
            match h.join() {
                Ok(Ok(report)) => self.relay_report = Some(report),
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => panic!("the relay thread panicked"),
            }
        }
    }

    /// Waits for the relay to finish and returns its report.
    fn relay_report(&mut self) -> RelayReport {
        self.poll_relay(true);
        self.relay_report.take().expect("the relay was started")
    }

    fn stderr_of(&self, i: usize) -> String {
        let s = self.procs[i]
            .stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let s = s.trim();
        if s.is_empty() {
            "(stderr empty)".into()
        } else {
            format!("stderr:\n{s}")
        }
    }

    /// Kills child `i` (SIGKILL to its pid) if it still runs, and reaps it.
    fn kill(&mut self, i: usize) -> Option<ExitStatus> {
        let c = &mut self.procs[i].child;
        if let Ok(None) = c.try_wait() {
            let _ = c.kill();
        }
        c.wait().ok()
    }

    /// Waits until child `i` reports a line starting with `key` and returns that line. On
    /// timeout, or if the child closes stdout first, kills it and fails with what was expected.
    fn expect_line(&mut self, i: usize, key: &str, timeout: Duration) -> String {
        let until = Instant::now() + timeout;
        loop {
            if let Some(l) = self.procs[i].lines.iter().find(|l| l.starts_with(key)) {
                return l.clone();
            }
            self.poll_relay(false);
            if self.procs[i].stdout_closed {
                let status = self.kill(i);
                panic!(
                    "{} exited ({status:?}) without reporting `{key}`; it reported {:?}; {}",
                    self.procs[i].what,
                    self.procs[i].lines,
                    self.stderr_of(i)
                );
            }
            let now = Instant::now();
            if now >= until {
                let status = self.kill(i);
                panic!(
                    "{} did not report `{key}` within {timeout:?}: killed it ({status:?}); it \
                     reported {:?}; {}",
                    self.procs[i].what,
                    self.procs[i].lines,
                    self.stderr_of(i)
                );
            }
            match self
                .rx
                .recv_timeout((until - now).min(Duration::from_millis(50)))
            {
                Ok((j, Some(line))) => self.procs[j].lines.push(line),
                Ok((j, None)) => self.procs[j].stdout_closed = true,
                Err(_) => {}
            }
        }
    }

    /// Polls the relay until `done` holds; fails with `what` after `EXIT_TIMEOUT`.
    fn poll_until(&mut self, what: &str, mut done: impl FnMut(&Session) -> bool) {
        let until = Instant::now() + EXIT_TIMEOUT;
        while !done(self) {
            self.poll_relay(false);
            assert!(Instant::now() < until, "{what} within {EXIT_TIMEOUT:?}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for child `i` to exit with status 0; kills it and fails on timeout.
    fn expect_success(&mut self, i: usize, timeout: Duration) {
        let until = Instant::now() + timeout;
        loop {
            match self.procs[i].child.try_wait() {
                Ok(Some(st)) if st.success() => return,
                Ok(Some(st)) => panic!(
                    "{} exited with {st}, expected 0; {}",
                    self.procs[i].what,
                    self.stderr_of(i)
                ),
                Ok(None) if Instant::now() >= until => {
                    let st = self.kill(i);
                    panic!(
                        "{} still running {timeout:?} after it was expected to exit: killed it \
                         ({st:?}); {}",
                        self.procs[i].what,
                        self.stderr_of(i)
                    );
                }
                Ok(None) => {
                    self.poll_relay(false);
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("wait for {}: {e}", self.procs[i].what),
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.relay.stop.store(true, Ordering::Relaxed);
        for i in 0..self.procs.len() {
            self.kill(i);
        }
        self.remove_segments();
    }
}

/// `checksum=<hex> count=<n>` -> (hex, n).
fn parse_report(line: &str) -> (String, u64) {
    let mut checksum = None;
    let mut count = None;
    for kv in line.split_whitespace() {
        if let Some(v) = kv.strip_prefix("checksum=") {
            checksum = Some(v.to_string());
        } else if let Some(v) = kv.strip_prefix("count=") {
            count = v.parse().ok();
        }
    }
    match (checksum, count) {
        (Some(c), Some(n)) => (c, n),
        _ => panic!("malformed report {line:?}"),
    }
}

/// Creates the session's ring and bus (owned here: dropping them removes the files).
fn create_segments(s: &Session) -> (Arc<ShmRegion>, Arc<ShmRegion>) {
    let ring = spsc::create_shm(&s.path(RING_SUFFIX), RING_CAP, s.epoch).expect("create ring");
    let bus =
        spmc::create_shm(&s.path(BUS_SUFFIX), BUS_CAP, s.epoch, Policy::Block).expect("create bus");
    (Arc::new(ring), Arc::new(bus))
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// 1,000,000 mixed events, producer process -> ring -> relay -> bus -> two consumer processes,
/// with a ring and a bus 64 KiB each. Every process must see the same checksum.
#[test]
fn million_events_reach_two_consumer_processes_intact() {
    if role().is_some() {
        return;
    }
    let t0 = Instant::now();
    let mut s = Session::new("a");
    let (ring, bus) = create_segments(&s);

    // Consumers attach before anything is written.
    let c0 = s.spawn("consumer", "consumer slot 0", &[(ENV_SLOT, "0".into())]);
    let c1 = s.spawn("consumer", "consumer slot 1", &[(ENV_SLOT, "1".into())]);
    s.expect_line(c0, "attached", ATTACH_TIMEOUT);
    s.expect_line(c1, "attached", ATTACH_TIMEOUT);
    let monitor = BusMonitor::open(bus.clone(), Some(s.epoch)).expect("monitor");
    let slots: Vec<usize> = monitor.slot_stats().iter().map(|st| st.slot).collect();
    assert_eq!(
        slots,
        [0, 1],
        "both consumers attached before the relay starts"
    );
    drop(monitor);
    let t_attached = t0.elapsed();

    let p = s.spawn("producer", "producer", &[(ENV_EVENTS, EVENTS.to_string())]);
    s.start_relay(&ring, &bus);

    let (p_sum, p_count) = parse_report(&s.expect_line(p, "checksum=", EXIT_TIMEOUT));
    let (c0_sum, c0_count) = parse_report(&s.expect_line(c0, "checksum=", EXIT_TIMEOUT));
    let (c1_sum, c1_count) = parse_report(&s.expect_line(c1, "checksum=", EXIT_TIMEOUT));
    for i in [p, c0, c1] {
        s.expect_success(i, EXIT_TIMEOUT);
    }
    let report = s.relay_report();
    let elapsed = t0.elapsed();

    assert_eq!(p_count, EVENTS, "events pushed by the producer");
    assert_eq!(report.events, EVENTS, "events relayed");
    assert_eq!(
        report.bus_frames,
        EVENTS + 1,
        "bus frames (events + END-OF-STREAM)"
    );
    assert_eq!(c0_count, EVENTS, "events read by consumer 0");
    assert_eq!(c1_count, EVENTS, "events read by consumer 1");
    assert_eq!(report.checksum, p_sum, "relay checksum vs producer");
    assert_eq!(c0_sum, p_sum, "consumer 0 checksum vs producer");
    assert_eq!(c1_sum, p_sum, "consumer 1 checksum vs producer");

    // Normal shutdown removes the segments (the guard is only the safety net).
    drop((ring, bus));
    assert_eq!(
        s.segments(),
        Vec::<PathBuf>::new(),
        "segments left in {SHM_DIR}"
    );
    eprintln!(
        "data_plane_multiprocess: {EVENTS} events, checksum {p_sum}: consumers attached after \
         {t_attached:.2?}, all done after {elapsed:.2?}"
    );
}

/// One of two consumers is SIGKILLed while it holds the (Block policy) bus back. The writer
/// stays blocked on the dead slot until it releases it with `BusWriter::release_slot`, as the
/// daemon will; after that the surviving consumer still gets every event.
#[test]
fn killed_consumer_blocks_the_bus_until_its_slot_is_released() {
    if role().is_some() {
        return;
    }
    let t0 = Instant::now();
    let mut s = Session::new("k");
    let (survivor_slot, victim_slot) = (SURVIVOR_SLOT, VICTIM_SLOT);
    let VictimSetup {
        ring,
        bus,
        monitor,
        producer: p,
        survivor,
        victim,
    } = survivor_and_victim(&mut s, (ENV_PAUSE_AT, KILL_PAUSE_AT.to_string()));
    let ctl = s.relay.clone();

    // The victim stops reading midway; kill it with SIGKILL while it holds its slot.
    s.expect_line(victim, "paused", EXIT_TIMEOUT);
    let status = s.kill(victim).expect("reap the victim");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "victim should die of SIGKILL, got {status}"
    );

    // The writer ends up blocked on the dead consumer's slot: it is waiting on a full bus, the
    // survivor has read everything published, and nothing moves any more. Wait until that has
    // held for 200 ms in a row (a survivor that is merely slow does not count).
    let cursor_of = |m: &BusMonitor, slot: usize| {
        m.slot_stats()
            .into_iter()
            .find(|st| st.slot == slot)
            .map(|st| st.cursor)
    };
    let until = Instant::now() + EXIT_TIMEOUT;
    let mut settled_since: Option<(Instant, u64, u64)> = None;
    let (stuck_at, tail) = loop {
        s.poll_relay(false);
        let written = ctl.written.load(Ordering::Relaxed);
        let tail = monitor.tail();
        let settled =
            ctl.blocked.load(Ordering::Acquire) && cursor_of(&monitor, survivor_slot) == Some(tail);
        match settled_since {
            Some((since, w, t)) if settled && (w, t) == (written, tail) => {
                if since.elapsed() >= Duration::from_millis(200) {
                    break (written, tail);
                }
            }
            _ => settled_since = settled.then(|| (Instant::now(), written, tail)),
        }
        assert!(
            Instant::now() < until,
            "relay never settled blocked on the dead consumer: wrote {written} frames, blocked \
             {}, slots {:?}",
            ctl.blocked.load(Ordering::Relaxed),
            monitor.slot_stats()
        );
        thread::sleep(Duration::from_millis(2));
    };
    let dead_cursor = cursor_of(&monitor, victim_slot).expect("dead consumer's slot attached");
    assert!(
        stuck_at > KILL_PAUSE_AT && stuck_at < KILL_EVENTS,
        "relay blocked after {stuck_at} frames; expected past the victim's {KILL_PAUSE_AT} and \
         before the end"
    );
    // A frame (with wrap padding) needs less than 512 bytes: the bus is full behind the dead one.
    assert!(
        tail - dead_cursor + 512 > BUS_CAP as u64,
        "the bus is not full behind the dead consumer: tail {tail}, its cursor {dead_cursor}"
    );

    // ... and stays blocked for as long as the slot is held: no frame gets through.
    thread::sleep(Duration::from_millis(300));
    assert!(
        ctl.blocked.load(Ordering::Acquire),
        "relay unblocked on its own"
    );
    assert_eq!(
        ctl.written.load(Ordering::Relaxed),
        stuck_at,
        "frames written while blocked"
    );
    assert_eq!(monitor.tail(), tail, "bus tail moved while blocked");
    assert_eq!(
        cursor_of(&monitor, victim_slot),
        Some(dead_cursor),
        "dead consumer's slot changed"
    );

    // Release the slot as the daemon will: the writer goes on at once.
    ctl.release.store(victim_slot + 1, Ordering::Release);
    s.poll_until("the relay goes on after release_slot", |s| {
        s.relay.written.load(Ordering::Relaxed) > stuck_at
    });
    assert!(
        !monitor.slot_stats().iter().any(|st| st.slot == victim_slot),
        "released slot still attached"
    );

    let (p_sum, p_count) = parse_report(&s.expect_line(p, "checksum=", EXIT_TIMEOUT));
    let (c_sum, c_count) = parse_report(&s.expect_line(survivor, "checksum=", EXIT_TIMEOUT));
    for i in [p, survivor] {
        s.expect_success(i, EXIT_TIMEOUT);
    }
    let report = s.relay_report();
    assert_eq!(p_count, KILL_EVENTS, "events pushed");
    assert_eq!(report.events, KILL_EVENTS, "events relayed");
    assert_eq!(c_count, KILL_EVENTS, "events read by the survivor");
    assert_eq!(report.checksum, p_sum, "relay checksum vs producer");
    assert_eq!(c_sum, p_sum, "survivor checksum vs producer");

    drop((monitor, ring, bus));
    assert_eq!(
        s.segments(),
        Vec::<PathBuf>::new(),
        "segments left in {SHM_DIR}"
    );
    eprintln!(
        "data_plane_multiprocess: kill test ({KILL_EVENTS} events, victim killed after \
         {KILL_PAUSE_AT}, writer blocked at frame {stuck_at}) done after {:.2?}",
        t0.elapsed()
    );
}

/// The slots of the two consumers of the victim tests.
const SURVIVOR_SLOT: usize = 0;
const VICTIM_SLOT: usize = 1;

/// What [`survivor_and_victim`] set up.
struct VictimSetup {
    ring: Arc<ShmRegion>,
    bus: Arc<ShmRegion>,
    monitor: BusMonitor,
    producer: usize,
    survivor: usize,
    victim: usize,
}

/// The start of the victim tests: the segments, a surviving consumer in slot 0 and a victim
/// consumer in slot 1 (with `victim_var`, which says when it stops reading), both attached; a
/// monitor; a producer of `KILL_EVENTS` events, and the relay running.
fn survivor_and_victim(s: &mut Session, victim_var: (&str, String)) -> VictimSetup {
    let (ring, bus) = create_segments(s);
    let survivor = s.spawn(
        "consumer",
        "surviving consumer slot 0",
        &[(ENV_SLOT, SURVIVOR_SLOT.to_string())],
    );
    let victim = s.spawn(
        "consumer",
        "victim consumer slot 1",
        &[(ENV_SLOT, VICTIM_SLOT.to_string()), victim_var],
    );
    s.expect_line(survivor, "attached", ATTACH_TIMEOUT);
    s.expect_line(victim, "attached", ATTACH_TIMEOUT);
    let monitor = BusMonitor::open(bus.clone(), Some(s.epoch)).expect("monitor");
    let producer = s.spawn(
        "producer",
        "producer",
        &[(ENV_EVENTS, KILL_EVENTS.to_string())],
    );
    s.start_relay(&ring, &bus);
    VictimSetup {
        ring,
        bus,
        monitor,
        producer,
        survivor,
        victim,
    }
}

/// The state letter of process `pid` in `/proc/PID/stat` (`T` when stopped).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// A consumer stopped with SIGSTOP has its slot released (what the daemon does for a dead or
/// evicted consumer); the writer then laps it. On SIGCONT its next read must say it was
/// evicted, never hand out a frame of a later lap nor call the bus corrupt (issue 9, item 2:
/// it used to read on in place and fail with "corrupt bus frame: inconsistent frame").
#[test]
fn released_consumer_learns_it_was_evicted_never_reads_a_later_lap() {
    if role().is_some() {
        return;
    }
    let mut s = Session::new("e");
    let victim_slot = VICTIM_SLOT;
    let VictimSetup {
        ring,
        bus,
        monitor,
        producer: p,
        survivor,
        victim,
    } = survivor_and_victim(&mut s, (ENV_STOP_AT, KILL_PAUSE_AT.to_string()));

    s.expect_line(victim, "stopping", EXIT_TIMEOUT);
    let pid = s.procs[victim].child.id();
    s.poll_until("the consumer stops", |_| proc_state(pid) == Some('T'));
    let stats = monitor.slot_stats();
    let held = stats
        .iter()
        .find(|st| st.slot == victim_slot)
        .expect("the stopped consumer's slot is attached");
    assert!(monitor.release_slot_owned(victim_slot, held.owner));
    // The writer, no longer held back, laps the stopped consumer (or ends the stream).
    s.poll_until("the writer laps the released consumer", |s| {
        monitor.tail() >= held.cursor + 2 * BUS_CAP as u64
            || s.relay.written.load(Ordering::Relaxed) >= KILL_EVENTS
    });
    assert!(
        monitor.tail() > held.cursor + BUS_CAP as u64,
        "not lapped: tail {}, cursor {}",
        monitor.tail(),
        held.cursor
    );
    // SAFETY: kill has no memory-safety preconditions; `pid` is our child, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGCONT) }, 0);
    let line = s.expect_line(victim, "error", EXIT_TIMEOUT);
    assert!(line.contains("evicted"), "{line}");
    assert!(!line.contains("corrupt"), "{line}");
    let status = s.kill(victim).expect("reap the released consumer");
    assert!(!status.success(), "the released consumer exited 0");

    let (p_sum, p_count) = parse_report(&s.expect_line(p, "checksum=", EXIT_TIMEOUT));
    let (c_sum, c_count) = parse_report(&s.expect_line(survivor, "checksum=", EXIT_TIMEOUT));
    for i in [p, survivor] {
        s.expect_success(i, EXIT_TIMEOUT);
    }
    assert_eq!(p_count, KILL_EVENTS);
    assert_eq!(c_count, KILL_EVENTS);
    assert_eq!(c_sum, p_sum, "survivor checksum vs producer");
    let _ = s.relay_report();
    drop((monitor, ring, bus));
    assert_eq!(
        s.segments(),
        Vec::<PathBuf>::new(),
        "segments left in {SHM_DIR}"
    );
}
