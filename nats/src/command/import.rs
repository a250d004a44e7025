//! `aegis-nats import`: a producer into a session on this host that writes a JetStream stream
//! (format in `wire.rs`) into source rings.
//!
//! **How the remote bus equals the local one.** The importer registers one source per source
//! of the exported session, with the same name, kind and topic (read from the stream's
//! manifest), and writes each frame into the ring of the source it came from, in bus order.
//! The remote session therefore has the same source names (so the same ranks) and the same
//! topic table, and its sequencer merges the same per-source streams by the same key: in a
//! backtest the remote bus has the same events in the same order with the same bus seqs, and
//! `aegis-tap --format ndjson` prints the same lines. (A pre-sequenced source that the daemon
//! would copy to the bus as it is would be simpler; the daemon has none yet.)
//!
//! The exact merge waits for every source that has not ended, so a source whose next event
//! is far ahead in the stream could hold it back while the importer cannot push another
//! source's frames into a full ring. The importer keeps such frames in memory
//! (`--lookahead-bytes`) and ends a source's ring as soon as the stream says the source ended
//! (`Aegis-Ended`), not only at END-OF-STREAM.
//!
//! Two halves, as in the exporter: the NATS side runs on a single-threaded tokio runtime and
//! checks every message (contiguity, headers, frame, event archive); a plain thread pushes
//! into the rings.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aegis_shm_client::client::Component;
use aegis_shm_client::frame::{FrameHeader, Seq};
use aegis_shm_client::protocol::{Mode, Register, Role, SourceDecl};
use aegis_shm_client::spsc::{ClaimError, Producer, PushError};
use aegis_shm_client::wait::{Backoff, Deadline, WaitStrategy};
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;

use crate::cli::Import;
use crate::retry;
use crate::wire::{self, Frame, Manifest, MsgHeaders};

/// What the NATS side hands the ring pusher.
enum Push {
    /// A frame of source `rank`.
    Frame(u16, Frame),
    /// Source `rank` has no more events: end its ring.
    End(u16),
    /// END-OF-STREAM: end every ring (the exported session aborted if `true`).
    Eos(bool),
}

/// What an import did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Frames written into the rings.
    pub imported: u64,
    /// Frames read before --from-seq and not imported.
    pub skipped: u64,
    /// The last bus seq imported.
    pub last_bus_seq: Option<Seq>,
    /// Seconds from the first message to END-OF-STREAM.
    pub seconds: f64,
    /// Times the ordered consumer was re-created after an error.
    pub reconnects: u64,
    /// The largest number of bytes held for full rings at once.
    pub lookahead_peak: usize,
}

/// How long the pusher waits without any ring taking a frame before it gives up.
const STALL: Duration = Duration::from_secs(60);
/// Longest wait of either half before it looks at the daemon and the other half again.
const POLL: Duration = Duration::from_millis(200);
/// The stream reader's error when the ring pusher stopped first (with its own reason).
const PUSHER_STOPPED: &str = "the ring pusher stopped";
/// Frames queued between the two halves.
const CHANNEL: usize = 4096;

/// Runs an import to END-OF-STREAM. Returns what it did, or why it stopped.
pub fn run(args: &Import) -> Result<Summary, String> {
    let c = &args.common;
    if !wire::valid_stream_name(&c.stream) {
        return Err(format!(
            "--stream {:?}: a stream name is [A-Za-z0-9_-]{{1,64}}",
            c.stream
        ));
    }
    let token = std::env::var("AEGIS_SESSION_TOKEN").map_err(|_| {
        "AEGIS_SESSION_TOKEN is not set: run under `aegis-shmctl session run`, or export the token printed by `session create`".to_string()
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let budget = Duration::from_secs(c.retry_for);
    let (js, stream, manifest) = rt.block_on(open(args, budget))?;
    let name = c
        .name
        .clone()
        .unwrap_or_else(|| format!("nats-import-{}", c.stream));
    let comp = Component::connect(
        c.socket.as_deref(),
        Register {
            component_name: name,
            session_token: token,
            role: Some(Role::Producer),
            sources: manifest
                .sources
                .iter()
                .map(|s| SourceDecl {
                    name: s.name.clone(),
                    kind: s.kind,
                    topic: s.topic.clone(),
                    journal: None,
                    recording: None,
                })
                .collect(),
            pid: Some(std::process::id()),
            ..Register::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let live = comp.ack().mode == Mode::Live;
    let mut rings = Vec::new();
    for s in &manifest.sources {
        let (mut p, _topic) = comp.producer(&s.name).map_err(|e| e.to_string())?;
        // Live: every frame is visible at once, so the merge sees them in stream order.
        if live {
            p.set_batch(1);
        }
        p.set_stamp(!args.keep_stamps);
        rings.push(p);
    }
    comp.ready(Duration::from_secs(c.start_timeout))
        .map_err(|e| e.to_string())?;
    let comp = Arc::new(comp);
    let (tx, rx) = std_mpsc::sync_channel::<Push>(CHANNEL);
    let stop = Arc::new(AtomicBool::new(false));
    let pusher = {
        let comp = comp.clone();
        let names: Vec<String> = manifest.sources.iter().map(|s| s.name.clone()).collect();
        let lookahead = args.lookahead_bytes;
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("aegis-nats-rings".into())
            .spawn(move || {
                let mut p = Pusher::new(rings, names, lookahead);
                let r = p.run(&rx, &comp, &stop);
                (r, p.peak)
            })
            .map_err(|e| format!("cannot start the ring pusher: {e}"))?
    };
    let result = rt.block_on(read_stream(args, &js, &stream, &manifest, &tx, &stop));
    drop(tx);
    let (pushed, peak) = pusher
        .join()
        .map_err(|_| "the ring pusher panicked".to_string())?;
    let comp = Arc::into_inner(comp).ok_or("the component is still shared")?;
    let outcome = match (result, pushed) {
        (Ok(mut s), Ok(aborted)) => {
            s.lookahead_peak = peak;
            if aborted {
                Err("the exported session aborted: the stream ends with END-OF-STREAM flagged ABORT".to_string())
            } else {
                Ok(s)
            }
        }
        // When one half stops, the other sees it stop: report the half that had a reason.
        (Err(e), Err(p)) if e == PUSHER_STOPPED => Err(p),
        (Err(e), _) | (Ok(_), Err(e)) => Err(e),
    };
    match outcome {
        Ok(s) => {
            comp.finished().map_err(|e| e.to_string())?;
            Ok(s)
        }
        Err(e) => {
            let _ = comp.error("import_failed", &e);
            Err(e)
        }
    }
}

/// Connects, opens the stream and reads its manifest, each with bounded retries.
async fn open(
    args: &Import,
    budget: Duration,
) -> Result<(jetstream::Context, stream::Stream, Manifest), String> {
    let c = &args.common;
    let client = retry::connect(&c.url, "aegis-nats import", budget).await?;
    let js = jetstream::new(client);
    let stream = retry::with_backoff(&format!("opening stream {}", c.stream), budget, || {
        js.get_stream(c.stream.clone())
    })
    .await?;
    let subject = wire::subject(&c.stream, wire::MANIFEST);
    let m = retry::with_backoff("reading the stream's manifest", budget, || {
        stream.get_last_raw_message_by_subject(&subject)
    })
    .await?;
    let manifest = Manifest::parse(&m.payload)
        .map_err(|e| format!("stream {} (stream seq {}): {e}", c.stream, m.sequence))?;
    Ok((js, stream, manifest))
}

/// Reads the stream with an ordered consumer, checks every message and hands the frames to
/// the pusher, until END-OF-STREAM.
async fn read_stream(
    args: &Import,
    js: &jetstream::Context,
    stream: &stream::Stream,
    manifest: &Manifest,
    tx: &SyncSender<Push>,
    stop: &AtomicBool,
) -> Result<Summary, String> {
    let _ = js;
    let c = &args.common;
    let budget = Duration::from_secs(c.retry_for);
    let prefix = format!("aegis.{}.", c.stream);
    let mut summary = Summary::default();
    // The next stream sequence to read, and the next bus seq the chain must account for.
    let mut next_stream_seq = 1u64;
    let mut expected: Option<Seq> = None;
    let mut ended = vec![false; manifest.sources.len()];
    let mut start: Option<Instant> = None;
    let mut idle_since = Instant::now();
    'consumer: loop {
        let from = next_stream_seq;
        let mut messages = retry::with_backoff("creating the ordered consumer", budget, || async {
            stream
                .create_consumer(consumer::pull::OrderedConfig {
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: from,
                    },
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?
                .messages()
                .await
                .map_err(|e| e.to_string())
        })
        .await?;
        loop {
            let m = match tokio::time::timeout(POLL, messages.next()).await {
                Err(_) => {
                    if stop.load(Ordering::Relaxed) {
                        return Err(PUSHER_STOPPED.into());
                    }
                    if !args.follow && idle_since.elapsed() > Duration::from_secs(args.idle_timeout)
                    {
                        return Err(format!(
                            "nothing arrived on stream {} for {} s and no END-OF-STREAM yet (last bus seq imported: {}); \
                             --follow waits for as long as it takes",
                            c.stream,
                            args.idle_timeout,
                            summary.last_bus_seq.map_or("none".into(), |s| s.to_string())
                        ));
                    }
                    continue;
                }
                Ok(None) => {
                    eprintln!("aegis-nats import: the ordered consumer ended; re-creating it");
                    summary.reconnects += 1;
                    continue 'consumer;
                }
                Ok(Some(Err(e))) => {
                    eprintln!(
                        "aegis-nats import: reading stream {}: {e}; re-creating the consumer at stream seq {next_stream_seq}",
                        c.stream
                    );
                    summary.reconnects += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'consumer;
                }
                Ok(Some(Ok(m))) => m,
            };
            idle_since = Instant::now();
            start.get_or_insert_with(Instant::now);
            let sseq = m
                .info()
                .map_err(|e| format!("a message without JetStream metadata: {e}"))?
                .stream_sequence;
            next_stream_seq = sseq + 1;
            let Some(token) = m.subject.as_str().strip_prefix(&prefix) else {
                return Err(format!(
                    "stream seq {sseq}: subject {} is outside {prefix}>",
                    m.subject
                ));
            };
            if token == wire::MANIFEST {
                continue;
            }
            let at = |what: String| format!("stream {} seq {sseq}: {what}", c.stream);
            let headers = m.headers.as_ref();
            let h = MsgHeaders::read(|k| headers.and_then(|hm| hm.get(k)).map(|v| v.as_str()))
                .map_err(|e| at(e.to_string()))?;
            let at = |what: String| {
                format!(
                    "stream {} seq {sseq} (bus seq {}): {what}",
                    c.stream, h.bus_seq
                )
            };
            if h.epoch != manifest.epoch && manifest.mode != "backtest" {
                return Err(at(format!(
                    "epoch {} is not the manifest's {}",
                    h.epoch, manifest.epoch
                )));
            }
            let frame =
                wire::check(manifest, token, &h, &m.payload).map_err(|e| at(e.to_string()))?;
            // Contiguity: everything from `expected` on must be accounted for.
            if h.bus_seq < args.from_seq {
                summary.skipped += 1;
            } else {
                let want = expected.unwrap_or(args.from_seq);
                if h.bus_seq < want {
                    return Err(at(format!(
                        "bus seq {} again: the stream repeats a frame (expected {want} next)",
                        h.bus_seq
                    )));
                }
                if h.from > want {
                    return Err(at(format!(
                        "gap: bus seqs {want}..={} are missing from the stream",
                        h.from - 1
                    )));
                }
                expected = Some(h.bus_seq + 1);
            }
            let eos = frame.is_eos();
            let abort = frame.header.has(aegis_shm_client::frame::flags::ABORT);
            if eos {
                send(tx, Push::Eos(abort), stop).await?;
                summary.seconds = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
                return Ok(summary);
            }
            let rank = frame.header.source_id;
            if ended[rank as usize] {
                return Err(at(format!(
                    "a frame of source {}, which the stream said had ended",
                    manifest.sources[rank as usize].name
                )));
            }
            if h.bus_seq >= args.from_seq {
                send(tx, Push::Frame(rank, frame), stop).await?;
                summary.imported += 1;
                summary.last_bus_seq = Some(h.bus_seq);
            }
            for &r in &h.ended {
                if !ended[r as usize] {
                    ended[r as usize] = true;
                    send(tx, Push::End(r), stop).await?;
                }
            }
        }
    }
}

/// Hands `item` to the pusher without blocking the runtime: retries while the channel is full.
async fn send(tx: &SyncSender<Push>, item: Push, stop: &AtomicBool) -> Result<(), String> {
    let mut item = item;
    let mut pause = Duration::from_micros(50);
    loop {
        match tx.try_send(item) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(i)) => {
                if stop.load(Ordering::Relaxed) {
                    return Err(PUSHER_STOPPED.into());
                }
                item = i;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(5));
            }
            Err(TrySendError::Disconnected(_)) => return Err(PUSHER_STOPPED.into()),
        }
    }
}

/// What waits for room in a source's ring.
enum Entry {
    Frame(Frame),
    Eof,
}

/// The ring side: one producer per source, and what waits for room in each.
struct Pusher {
    rings: Vec<Producer>,
    names: Vec<String>,
    pending: Vec<VecDeque<Entry>>,
    ended: Vec<bool>,
    /// Payload bytes held in `pending`, and the bound.
    held: usize,
    limit: usize,
    peak: usize,
}

impl Pusher {
    fn new(rings: Vec<Producer>, names: Vec<String>, limit: usize) -> Pusher {
        let n = rings.len();
        Pusher {
            rings,
            names,
            pending: (0..n).map(|_| VecDeque::new()).collect(),
            ended: vec![false; n],
            held: 0,
            limit,
            peak: 0,
        }
    }

    /// Pushes until END-OF-STREAM. Returns whether the exported session aborted.
    fn run(
        &mut self,
        rx: &std_mpsc::Receiver<Push>,
        comp: &Component,
        stop: &AtomicBool,
    ) -> Result<bool, String> {
        let r = self.run_inner(rx, comp);
        if r.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        r
    }

    fn run_inner(
        &mut self,
        rx: &std_mpsc::Receiver<Push>,
        comp: &Component,
    ) -> Result<bool, String> {
        let mut last_progress = Instant::now();
        let mut wait = Backoff::default();
        loop {
            if self.drain()? {
                last_progress = Instant::now();
                wait.reset();
            }
            let holding = self.pending.iter().any(|p| !p.is_empty());
            if let Some(r) = comp.stop_requested() {
                return Err(format!("the daemon stopped the session: {r}"));
            }
            if holding && last_progress.elapsed() > STALL {
                return Err(self.stall_report());
            }
            if self.held > self.limit {
                // Full: take nothing more until a ring takes something.
                wait.wait();
                continue;
            }
            let item = if holding {
                match rx.try_recv() {
                    Ok(i) => Some(i),
                    Err(std_mpsc::TryRecvError::Empty) => {
                        wait.wait();
                        None
                    }
                    Err(std_mpsc::TryRecvError::Disconnected) => return Err(self.cut_short()),
                }
            } else {
                match rx.recv_timeout(POLL) {
                    Ok(i) => Some(i),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return Err(self.cut_short()),
                }
            };
            match item {
                None => {}
                Some(Push::Frame(rank, f)) => self.offer(rank as usize, Entry::Frame(f))?,
                Some(Push::End(rank)) => self.offer(rank as usize, Entry::Eof)?,
                Some(Push::Eos(abort)) => {
                    for r in 0..self.rings.len() {
                        if !self.ended[r]
                            && !self.pending[r].iter().any(|e| matches!(e, Entry::Eof))
                        {
                            self.pending[r].push_back(Entry::Eof);
                        }
                    }
                    let deadline = Deadline::after(STALL);
                    while self.pending.iter().any(|p| !p.is_empty()) {
                        if !self.drain()? {
                            if deadline.expired() {
                                return Err(self.stall_report());
                            }
                            wait.wait();
                        }
                    }
                    return Ok(abort);
                }
            }
        }
    }

    fn cut_short(&self) -> String {
        "the stream reader stopped before END-OF-STREAM".into()
    }

    /// Queues `e` behind whatever waits for source `r`'s ring.
    fn offer(&mut self, r: usize, e: Entry) -> Result<(), String> {
        if let Entry::Frame(f) = &e {
            self.held += f.header.len as usize + 48;
        }
        self.pending[r].push_back(e);
        self.peak = self.peak.max(self.held);
        Ok(())
    }

    /// Pushes what fits into every ring. Returns whether anything moved.
    fn drain(&mut self) -> Result<bool, String> {
        let mut moved = false;
        for r in 0..self.rings.len() {
            while let Some(e) = self.pending[r].front() {
                match e {
                    Entry::Frame(f) => {
                        let mut h: FrameHeader = f.header;
                        // Only the sequencer's flags reach a bus; the sequencer numbers it.
                        h.flags = 0;
                        h.bus_seq = 0;
                        match self.rings[r].try_push_frame(&h, f.payload()) {
                            Ok(_) => {
                                self.held -= f.header.len as usize + 48;
                            }
                            Err(ClaimError::Full) => break,
                            Err(e) => {
                                return Err(format!("source {}: {e}", self.names[r]));
                            }
                        }
                    }
                    Entry::Eof => {
                        // One attempt (an expired deadline): a full ring keeps the EOF
                        // pending like a frame, and the other rings go on draining.
                        match self.rings[r]
                            .finish(&mut Backoff::default(), Deadline::after(Duration::ZERO))
                        {
                            Ok(()) => self.ended[r] = true,
                            Err(PushError::Timeout(())) | Err(PushError::Full(())) => break,
                            Err(e) => return Err(format!("ending source {}: {e}", self.names[r])),
                        }
                    }
                }
                self.pending[r].pop_front();
                moved = true;
            }
            if moved {
                self.rings[r].flush();
            }
        }
        Ok(moved)
    }

    /// Why the pusher gave up: which rings are full and which the merge waits for.
    fn stall_report(&self) -> String {
        let full: Vec<&str> = (0..self.rings.len())
            .filter(|&r| !self.pending[r].is_empty())
            .map(|r| self.names[r].as_str())
            .collect();
        let waiting: Vec<&str> = (0..self.rings.len())
            .filter(|&r| self.pending[r].is_empty() && !self.ended[r])
            .map(|r| self.names[r].as_str())
            .collect();
        format!(
            "no ring took a frame for {} s: full: {full:?} ({} bytes held); a backtest merge waits for the next event of {waiting:?}, \
             further ahead in the stream than --lookahead-bytes {} reaches (raise it, or the session's --source-bytes), \
             or a consumer of this session is not reading",
            STALL.as_secs(),
            self.held,
            self.limit
        )
    }
}
