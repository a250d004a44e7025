//! `aegis-nats export`: a consumer of a local session that publishes every bus frame to a
//! JetStream stream (format in `wire.rs`).
//!
//! Two halves, so that the data path stays free of the async runtime:
//! - a plain thread reads the bus (parking on its doorbell while idle) and copies each frame
//!   into a bounded channel. In a backtest a full channel holds the bus back (the bus waits
//!   for its consumers); in a live session the bus laps the reader, which reports the overrun,
//!   and the next message's `Aegis-From` records the missing range;
//! - the publisher, on a single-threaded tokio runtime, publishes with at most
//!   `--max-in-flight` acks outstanding (pipelined).
//!
//! **Exactly once, in order.** Every publish carries `Nats-Expected-Last-Sequence`: the stream
//! sequence the message before it got (the stream has one writer, so it is known before the
//! ack). JetStream refuses a publish whose predecessor is missing, so the stream never has a
//! hole nor a reordering, whatever fails. After any failure (an ack timeout, a lost
//! connection, a refused publish) the publisher asks the stream for its last message, drops
//! what is stored, and publishes the rest again. The same happens at start: a restarted
//! exporter resumes after the last stored bus seq. Nothing here relies on JetStream's
//! duplicate window, so a restart after any pause makes no duplicate; `Nats-Msg-Id`
//! (`<epoch>-<bus seq>`) is a second guard.
//!
//! **Restarting a backtest.** A backtest refuses new registrations once it has started, so an
//! exporter killed in the middle cannot rejoin its session. Run the same backtest again (same
//! inputs, so the same bus, byte for byte) with a new exporter: it sees a stream started by an
//! earlier epoch with the same sources, checks that this run's frame at the last stored bus
//! seq equals the stored one, and continues after it.

use std::collections::{BTreeMap, VecDeque};
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aegis_shm_client::client::Component;
use aegis_shm_client::frame::{flags, Kind, Seq};
use aegis_shm_client::protocol::{Inspect, Mode, Register, Role};
use aegis_shm_client::spmc::{BusReader, ReadError};
use aegis_shm_client::stats::{SourceState, StatsView};
use aegis_shm_client::wait::{Deadline, Park};
use async_nats::jetstream::{self, message::PublishMessage as Publish, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::cli::Export;
use crate::daemon;
use crate::retry;
use crate::wire::{self, Manifest, ManifestSource};

/// One bus frame on its way to the stream.
struct Out {
    seq: Seq,
    ts: u64,
    kind: Kind,
    /// The subject's last tokens: the topic, or [`wire::EOS`].
    token: String,
    from: Seq,
    ended: Vec<u16>,
    bytes: Vec<u8>,
}

/// What the bus reader hands the publisher.
enum Item {
    Frame(Out),
    /// END-OF-STREAM (with ABORT if the session failed).
    Eos(Out, bool),
    /// The reader stopped: the reason.
    Fail(String),
}

/// What an export did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Messages published and acknowledged (END-OF-STREAM included).
    pub published: u64,
    /// Bus frames not published because the stream already held them (a resumed export).
    pub skipped: u64,
    /// Acks that said "duplicate".
    pub duplicates: u64,
    /// Times the publisher re-read the stream after a failure.
    pub resyncs: u64,
    /// Overruns (live) and the frames they cost.
    pub overruns: u64,
    /// Frames missed in overruns.
    pub missed: u64,
    /// Seconds from the first frame read to the last ack.
    pub seconds: f64,
    /// Whether the exported session aborted.
    pub aborted: bool,
}

/// Runs an export to the end of the session. Returns what it did, or why it stopped.
pub fn run(args: &Export) -> Result<Summary, String> {
    let c = &args.common;
    if !wire::valid_stream_name(&c.stream) {
        return Err(format!(
            "--stream {:?}: a stream name is [A-Za-z0-9_-]{{1,64}}",
            c.stream
        ));
    }
    if args.max_in_flight == 0 {
        return Err("--max-in-flight must be at least 1".into());
    }
    let token = std::env::var("AEGIS_SESSION_TOKEN").map_err(|_| {
        "AEGIS_SESSION_TOKEN is not set: run under `aegis-shmctl session run`, or export the token printed by `session create`".to_string()
    })?;
    let name = c
        .name
        .clone()
        .unwrap_or_else(|| format!("nats-export-{}", c.stream));
    let comp = Component::connect(
        c.socket.as_deref(),
        Register {
            component_name: name,
            session_token: token,
            role: Some(Role::Consumer),
            topics: args.topics.clone(),
            pid: Some(std::process::id()),
            ..Register::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let mut bus = comp.consumer().map_err(|e| e.to_string())?;
    // Registered before the start: the bus will hand us every frame from bus seq 0, so the
    // first message accounts for everything before it (with --topics, the frames left out).
    // A late consumer of a live session starts at the head: what came before is not ours to
    // vouch for.
    let before_start = daemon::inspect(c.socket.as_deref(), &comp.ack().session)?.state
        == aegis_shm_client::protocol::SessionState::Created;
    let started = comp
        .ready(Duration::from_secs(c.start_timeout))
        .map_err(|e| e.to_string())?;
    let ack = comp.ack().clone();
    let inspect = daemon::inspect(c.socket.as_deref(), &ack.session)?;
    let mut sources = Vec::new();
    for s in &started.source_names {
        let (kind, topic) = source_decl(&inspect, s)?;
        wire::check_topic(&topic).map_err(|e| format!("source {s}: {e}"))?;
        sources.push(ManifestSource {
            name: s.clone(),
            kind,
            topic,
        });
    }
    let manifest = Manifest {
        format: wire::FORMAT,
        session: ack.session.clone(),
        session_id: ack.session_id.clone(),
        epoch: ack.epoch,
        mode: ack.mode.name().to_string(),
        sources,
    };
    if !args.topics.is_empty() {
        let mut ids = Vec::new();
        for t in &args.topics {
            match started.topics.get(t) {
                Some(id) => ids.push(*id),
                None => eprintln!(
                    "aegis-nats export: warning: no source publishes topic {t:?} in this session"
                ),
            }
        }
        bus.subscribe(Some(&ids)).map_err(|e| e.to_string())?;
    }
    let topic_names: BTreeMap<u32, String> = started
        .topics
        .iter()
        .map(|(n, id)| (*id, n.clone()))
        .collect();
    // Source ends matter to a backtest merge on the other side; a live one has none to wait for.
    // A replayed recording has none to tell either: the ctl segment counts the one source the
    // daemon reads it as, whose id is no bus source id (the importer ends them all at
    // END-OF-STREAM).
    let stats = match ack.mode {
        Mode::Backtest if inspect.replayed_sources.is_empty() => {
            Some(comp.stats().map_err(|e| e.to_string())?)
        }
        Mode::Backtest | Mode::Live => None,
    };
    let comp = Arc::new(comp);
    let (tx, rx) = mpsc::channel(args.max_in_flight.max(64));
    let reader = {
        let comp = comp.clone();
        let idle = Duration::from_secs(args.idle_timeout);
        std::thread::Builder::new()
            .name("aegis-nats-bus".into())
            .spawn(move || read_bus(bus, &comp, stats, &topic_names, &tx, idle, before_start))
            .map_err(|e| format!("cannot start the bus reader: {e}"))?
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let result = rt.block_on(publish(args, &manifest, rx));
    // The reader ends on END-OF-STREAM, a failure, or the channel closing with `rx` dropped.
    let read = reader
        .join()
        .map_err(|_| "the bus reader panicked".to_string())?;
    let comp = Arc::into_inner(comp).ok_or("the component is still shared")?;
    match result {
        Ok(mut s) => {
            s.overruns = read.0;
            s.missed = read.1;
            if s.aborted {
                let _ = comp.error("aborted", "the exported session aborted");
            } else {
                comp.finished().map_err(|e| e.to_string())?;
            }
            Ok(s)
        }
        Err(e) => {
            let _ = comp.error("export_failed", &e);
            Err(e)
        }
    }
}

/// The kind and topic of source `name` of the bus (a name of STARTED). A session that
/// replays a recording names its bus sources as the recorded session did: `inspect` lists
/// them apart (`replayed_sources`) from the one source the daemon reads the recording as.
fn source_decl(
    inspect: &Inspect,
    name: &str,
) -> Result<(aegis_shm_client::protocol::SourceKind, String), String> {
    if !inspect.replayed_sources.is_empty() {
        let info = inspect
            .replayed_sources
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| {
                format!(
                    "the daemon's inspect does not list source {name} of the replayed recording"
                )
            })?;
        return match (info.kind, info.topic.clone()) {
            (Some(kind), Some(topic)) => Ok((kind, topic)),
            _ => Err(format!(
                "source {name} of the replayed recording has no recorded kind and topic: the \
                 recording predates them (record the session again to export its replay)"
            )),
        };
    }
    let info = inspect
        .sources
        .iter()
        .find(|i| i.name == name)
        .ok_or_else(|| format!("the daemon's inspect does not list source {name}"))?;
    match (info.kind, info.topic.clone()) {
        (Some(kind), Some(topic)) => Ok((kind, topic)),
        _ => Err(format!(
            "the daemon does not know the kind and topic of source {name}"
        )),
    }
}

/// Frames between two looks at the ctl segment for sources that ended (backtest).
const ENDED_CHECK_EVERY: u32 = 64;
/// Longest single park on the bus before the reader looks at the daemon again.
const POLL: Duration = Duration::from_millis(200);

/// The bus reader thread: copies every frame into `tx` until END-OF-STREAM. Returns the
/// overruns and the frames they cost.
fn read_bus(
    mut bus: BusReader,
    comp: &Component,
    stats: Option<StatsView>,
    topics: &BTreeMap<u32, String>,
    tx: &mpsc::Sender<Item>,
    idle_timeout: Duration,
    from_zero: bool,
) -> (u64, u64) {
    let mut wait = Park::default();
    // The bus seq the next frame must have for the chain to be unbroken: 0 for a consumer
    // that was there from the start, else known once a frame was read.
    let mut next: Option<Seq> = from_zero.then_some(0);
    let mut ended = stats
        .as_ref()
        .map_or(Vec::new(), |s| vec![false; s.sources().len()]);
    let mut since_check = ENDED_CHECK_EVERY;
    let (mut overruns, mut missed) = (0, 0);
    let mut idle_since: Option<Instant> = None;
    let fail = |msg: String| {
        let _ = tx.blocking_send(Item::Fail(msg));
    };
    loop {
        let f = match bus.try_next() {
            Ok(Some(f)) => f,
            Ok(None) => {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if tx.is_closed() {
                    return (overruns, missed);
                }
                if let Some(r) = comp.stop_requested() {
                    fail(format!("the daemon stopped the session: {r}"));
                    return (overruns, missed);
                }
                if comp.disconnected() {
                    fail("the daemon closed the control connection".into());
                    return (overruns, missed);
                }
                if !idle_timeout.is_zero() && since.elapsed() > idle_timeout {
                    fail(format!(
                        "the bus was silent for {} s",
                        idle_timeout.as_secs()
                    ));
                    return (overruns, missed);
                }
                bus.idle(&mut wait, Deadline::after(POLL));
                continue;
            }
            Err(ReadError::Overrun { missed: m }) => {
                overruns += 1;
                missed += m;
                eprintln!(
                    "aegis-nats export: overrun: the live bus lapped the exporter, {m} frames missed; the stream records the gap"
                );
                next = None;
                continue;
            }
            Err(e) => {
                fail(format!("reading the bus: {e}"));
                return (overruns, missed);
            }
        };
        idle_since = None;
        let h = f.header;
        let from = next.unwrap_or(h.bus_seq);
        next = Some(h.bus_seq + 1);
        let kind = h.kind().unwrap_or(Kind::Control);
        let mut out = Out {
            seq: h.bus_seq,
            ts: h.ts,
            kind,
            token: String::new(),
            from,
            ended: Vec::new(),
            bytes: wire::encode_frame(h, f.payload),
        };
        if f.is_eof() {
            out.token = wire::EOS.to_string();
            let _ = tx.blocking_send(Item::Eos(out, h.has(flags::ABORT)));
            return (overruns, missed);
        }
        out.token = match topics.get(&h.topic_id) {
            Some(t) => t.clone(),
            None => {
                fail(format!(
                    "bus frame {} has topic id {}, unknown to the session's topic table",
                    h.bus_seq, h.topic_id
                ));
                return (overruns, missed);
            }
        };
        if let Some(st) = &stats {
            since_check += 1;
            if since_check >= ENDED_CHECK_EVERY && ended.iter().any(|e| !e) {
                since_check = 0;
                out.ended = newly_ended(st, &mut ended, h.ts);
            }
        }
        if tx.blocking_send(Item::Frame(out)).is_err() {
            return (overruns, missed);
        }
    }
}

/// Backtest: the sources that ended and whose every event is on the bus before a frame at
/// `ts`. A source that ended has all its events in the merge (as heads or staged), every one
/// at or below its watermark; the exact merge emits in key order, so once it emitted a frame
/// with a later `ts`, none of them is still to come.
fn newly_ended(stats: &StatsView, ended: &mut [bool], ts: u64) -> Vec<u16> {
    let mut out = Vec::new();
    for s in stats.sources() {
        if s.id < ended.len() && !ended[s.id] && s.state == SourceState::Ended && s.watermark < ts {
            ended[s.id] = true;
            out.push(s.id as u16);
        }
    }
    out
}

type AckFuture = Pin<
    Box<
        dyn Future<
                Output = Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
            > + Send,
    >,
>;

/// A message published (or about to be), kept until its ack so it can be sent again.
struct Sent {
    seq: Seq,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    /// The stream sequence JetStream must give it.
    stream_seq: u64,
    ack: Option<AckFuture>,
}

/// What the stream held when the exporter (re)started, or after a resync.
struct Stored {
    /// The stream's last sequence.
    last_stream_seq: u64,
    /// The bus seq of its last frame message (None: only the manifest, or nothing).
    last_bus_seq: Option<Seq>,
    /// That message's frame bytes, to compare with this run's (a continued backtest).
    last_frame: Option<Bytes>,
    /// Whether that message is END-OF-STREAM: the stream is complete.
    complete: bool,
}

/// The publisher's state.
struct Publisher {
    js: jetstream::Context,
    stream: stream::Stream,
    stream_name: String,
    epoch: u64,
    budget: Duration,
    queue: VecDeque<Sent>,
    /// The stream sequence of the last message published (acked or not).
    prev_stream_seq: u64,
    /// Everything up to this bus seq is stored.
    stored_until: Option<Seq>,
    summary: Summary,
}

async fn publish(
    args: &Export,
    manifest: &Manifest,
    mut rx: mpsc::Receiver<Item>,
) -> Result<Summary, String> {
    let c = &args.common;
    let budget = Duration::from_secs(c.retry_for);
    let client = retry::connect(&c.url, "aegis-nats export", budget).await?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .max_ack_inflight(args.max_in_flight)
        .backpressure_on_inflight(true)
        .build(client);
    let subjects = wire::stream_subjects(&c.stream);
    let stream = retry::with_backoff("creating or opening the stream", budget, || {
        js.get_or_create_stream(stream::Config {
            name: c.stream.clone(),
            subjects: vec![subjects.clone()],
            storage: stream::StorageType::File,
            description: Some(format!(
                "Aegis bus of session {} (aegis-nats export)",
                manifest.session
            )),
            ..Default::default()
        })
    })
    .await?;
    if stream.cached_info().config.subjects != vec![subjects.clone()] {
        return Err(format!(
            "stream {} exists with subjects {:?}, not [{subjects:?}]: not an aegis-nats stream",
            c.stream,
            stream.cached_info().config.subjects
        ));
    }
    let mut p = Publisher {
        js,
        stream,
        stream_name: c.stream.clone(),
        epoch: manifest.epoch,
        budget,
        queue: VecDeque::new(),
        prev_stream_seq: 0,
        stored_until: None,
        summary: Summary::default(),
    };
    let stored = p.open(manifest).await?;
    p.prev_stream_seq = stored.last_stream_seq;
    p.stored_until = stored.last_bus_seq;
    if let Some(l) = stored.last_bus_seq {
        eprintln!(
            "aegis-nats export: stream {} holds bus seqs up to {l}{}: resuming after it",
            c.stream,
            if stored.complete {
                " and END-OF-STREAM (complete)"
            } else {
                ""
            }
        );
    }
    let mut start: Option<Instant> = None;
    let mut carried_ended: Vec<u16> = Vec::new();
    let mut eos_seen = false;
    let mut failure: Option<String> = None;
    loop {
        // Input first while there is room in flight; otherwise (or when the input is
        // empty) wait for the oldest ack.
        let item = if eos_seen || failure.is_some() {
            None
        } else if p.queue.len() >= args.max_in_flight {
            p.await_front().await?;
            continue;
        } else if let Some(front) = p.queue.front_mut().and_then(|s| s.ack.as_mut()) {
            tokio::select! {
                biased;
                item = rx.recv() => Some(item),
                ack = front => {
                    p.on_ack(ack).await?;
                    continue;
                }
            }
        } else {
            Some(rx.recv().await)
        };
        let Some(item) = item else {
            // Input over: drain the acks.
            if p.queue.is_empty() {
                break;
            }
            p.await_front().await?;
            continue;
        };
        let (out, eos) = match item {
            None => {
                failure = Some("the bus reader stopped without END-OF-STREAM".into());
                continue;
            }
            Some(Item::Fail(msg)) => {
                failure = Some(msg);
                continue;
            }
            Some(Item::Frame(out)) => (out, None),
            Some(Item::Eos(out, abort)) => (out, Some(abort)),
        };
        start.get_or_insert_with(Instant::now);
        if let Some(abort) = eos {
            eos_seen = true;
            p.summary.aborted = abort;
        }
        if p.stored_until.is_some_and(|l| out.seq <= l) {
            if Some(out.seq) == stored.last_bus_seq {
                check_overlap(&out, stored.last_frame.as_ref())?;
            }
            carried_ended.extend_from_slice(&out.ended);
            p.summary.skipped += 1;
            continue;
        }
        let mut out = out;
        if !carried_ended.is_empty() {
            carried_ended.append(&mut out.ended);
            out.ended = std::mem::take(&mut carried_ended);
        }
        p.send(out).await?;
    }
    if let Some(f) = failure {
        return Err(f);
    }
    p.summary.seconds = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    Ok(p.summary)
}

/// A continued backtest: this run's frame at the last stored bus seq must be the stored one
/// (all but the publish stamp, a local clock reading).
fn check_overlap(out: &Out, stored: Option<&Bytes>) -> Result<(), String> {
    let Some(stored) = stored else { return Ok(()) };
    let strip = |b: &[u8]| {
        let mut v = b.to_vec();
        if v.len() >= 48 {
            v[40..48].fill(0);
        }
        v
    };
    if strip(stored) != strip(&out.bytes) {
        return Err(format!(
            "this session's bus differs from the stream at bus seq {} (the last stored frame): \
             it is not a run of the same backtest; export to another --stream",
            out.seq
        ));
    }
    Ok(())
}

impl Publisher {
    /// Reads what the stream holds: publishes the manifest into an empty stream, checks the
    /// manifest of a stream that has one, and finds the last stored frame.
    async fn open(&mut self, manifest: &Manifest) -> Result<Stored, String> {
        let info = retry::with_backoff("reading the stream's state", self.budget, || {
            self.stream.get_info()
        })
        .await?;
        if info.state.last_sequence == 0 {
            let payload = Bytes::from(serde_json::to_vec(manifest).expect("manifest serialises"));
            let publish = Publish::build()
                .payload(payload)
                .message_id(wire::manifest_msg_id(manifest.epoch))
                .expected_last_sequence(0)
                .header(wire::H_EPOCH, manifest.epoch.to_string().as_str());
            let subject = wire::subject(&self.stream_name, wire::MANIFEST);
            let ack = retry::with_backoff("publishing the manifest", self.budget, || async {
                self.js
                    .send_publish(subject.clone(), publish.clone())
                    .await?
                    .await
            })
            .await?;
            return Ok(Stored {
                last_stream_seq: ack.sequence,
                last_bus_seq: None,
                last_frame: None,
                complete: false,
            });
        }
        let subject = wire::subject(&self.stream_name, wire::MANIFEST);
        let m = retry::with_backoff("reading the stream's manifest", self.budget, || {
            self.stream.get_last_raw_message_by_subject(&subject)
        })
        .await?;
        let stored = Manifest::parse(&m.payload)?;
        if stored.epoch != manifest.epoch {
            if !(stored.same_layout(manifest) && manifest.mode == "backtest") {
                return Err(format!(
                    "stream {} holds session {} (epoch {}, {} sources), not this one ({} epoch {}): \
                     export to another --stream, or delete it",
                    self.stream_name,
                    stored.session,
                    stored.epoch,
                    stored.sources.len(),
                    manifest.session,
                    manifest.epoch
                ));
            }
            eprintln!(
                "aegis-nats export: stream {} was started by an earlier run of this backtest (epoch {}); \
                 continuing it once this run's bus matches the stored one",
                self.stream_name, stored.epoch
            );
        }
        self.last_stored().await
    }

    /// The stream's last message, as a resume point.
    async fn last_stored(&self) -> Result<Stored, String> {
        let (seq, msg) =
            retry::with_backoff("reading the stream's last message", self.budget, || async {
                let info = self.stream.get_info().await.map_err(|e| e.to_string())?;
                let seq = info.state.last_sequence;
                if seq == 0 {
                    return Ok::<_, String>((0, None));
                }
                let m = self
                    .stream
                    .get_raw_message(seq)
                    .await
                    .map_err(|e| format!("stream seq {seq}: {e}"))?;
                Ok((seq, Some(m)))
            })
            .await?;
        let Some(m) = msg else {
            return Ok(Stored {
                last_stream_seq: 0,
                last_bus_seq: None,
                last_frame: None,
                complete: false,
            });
        };
        if m.subject.as_str() == wire::subject(&self.stream_name, wire::MANIFEST) {
            return Ok(Stored {
                last_stream_seq: seq,
                last_bus_seq: None,
                last_frame: None,
                complete: false,
            });
        }
        let h = wire::MsgHeaders::read(|k| m.headers.get(k).map(|v| v.as_str()))
            .map_err(|e| format!("the stream's last message (stream seq {seq}): {e}"))?;
        Ok(Stored {
            last_stream_seq: seq,
            last_bus_seq: Some(h.bus_seq),
            complete: m.subject.as_str() == wire::subject(&self.stream_name, wire::EOS),
            last_frame: Some(m.payload),
        })
    }

    /// Publishes one frame message (pipelined: its ack is awaited later).
    async fn send(&mut self, out: Out) -> Result<(), String> {
        let mut headers = HeaderMap::new();
        headers.insert(wire::H_MSG_ID, wire::msg_id(self.epoch, out.seq).as_str());
        headers.insert(wire::H_BUS_SEQ, out.seq.to_string().as_str());
        headers.insert(wire::H_TS, out.ts.to_string().as_str());
        headers.insert(wire::H_KIND, out.kind.name());
        headers.insert(wire::H_EPOCH, self.epoch.to_string().as_str());
        headers.insert(wire::H_FROM, out.from.to_string().as_str());
        if !out.ended.is_empty() {
            let list: Vec<String> = out.ended.iter().map(u16::to_string).collect();
            headers.insert(wire::H_ENDED, list.join(",").as_str());
        }
        let sent = Sent {
            seq: out.seq,
            subject: wire::subject(&self.stream_name, &out.token),
            headers,
            payload: Bytes::from(out.bytes),
            stream_seq: 0,
            ack: None,
        };
        self.queue.push_back(sent);
        let i = self.queue.len() - 1;
        if let Err(e) = self.transmit(i).await {
            self.resync(e).await?;
        }
        Ok(())
    }

    /// Sends queue entry `i`, expecting the stream to be at `prev_stream_seq`.
    async fn transmit(&mut self, i: usize) -> Result<(), String> {
        let expected = self.prev_stream_seq;
        let s = &mut self.queue[i];
        let publish = Publish::build()
            .payload(s.payload.clone())
            .headers(s.headers.clone())
            .expected_last_sequence(expected);
        let fut = self
            .js
            .send_publish(s.subject.clone(), publish)
            .await
            .map_err(|e| format!("publishing bus seq {}: {e}", s.seq))?;
        s.stream_seq = expected + 1;
        s.ack = Some(Box::pin(fut.into_future()));
        self.prev_stream_seq = expected + 1;
        Ok(())
    }

    /// Waits for the oldest ack.
    async fn await_front(&mut self) -> Result<(), String> {
        let Some(fut) = self.queue.front_mut().and_then(|s| s.ack.as_mut()) else {
            return Err("internal: a queued message was never sent".into());
        };
        let ack = fut.await;
        self.on_ack(ack).await
    }

    /// Handles the oldest message's ack.
    async fn on_ack(
        &mut self,
        ack: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
    ) -> Result<(), String> {
        let front = self
            .queue
            .front()
            .expect("an ack belongs to a queued message");
        match ack {
            Ok(a) if a.sequence == front.stream_seq || a.duplicate => {
                self.summary.duplicates += a.duplicate as u64;
                self.summary.published += 1;
                self.stored_until = Some(front.seq);
                self.queue.pop_front();
                Ok(())
            }
            Ok(a) => {
                let e = format!(
                    "bus seq {} was stored at stream seq {}, expected {}",
                    front.seq, a.sequence, front.stream_seq
                );
                self.resync(e).await
            }
            Err(e) => {
                let e = format!("ack of bus seq {}: {e}", front.seq);
                self.resync(e).await
            }
        }
    }

    /// After a failure: forget every pending ack, read where the stream is, drop what it
    /// stored, and send the rest again in order. Bounded by `--retry-for` per attempt.
    async fn resync(&mut self, why: String) -> Result<(), String> {
        let start = Instant::now();
        let mut why = why;
        let acked = self.stored_until;
        loop {
            self.summary.resyncs += 1;
            eprintln!("aegis-nats export: {why}; re-reading the stream to resume");
            for s in &mut self.queue {
                s.ack = None;
            }
            if start.elapsed() > self.budget {
                return Err(format!(
                    "the stream did not recover within --retry-for {} s: {why}",
                    self.budget.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let stored = self.last_stored().await?;
            if let Some(a) = acked {
                if stored.last_bus_seq.is_none_or(|l| l < a) {
                    return Err(format!(
                        "the stream's last frame is bus seq {:?}, before bus seq {a} that it acknowledged: \
                         was the stream purged, or written by someone else?",
                        stored.last_bus_seq
                    ));
                }
            }
            if let Some(l) = stored.last_bus_seq {
                while self.queue.front().is_some_and(|s| s.seq <= l) {
                    self.queue.pop_front();
                    self.summary.published += 1;
                }
                self.stored_until = Some(l);
            }
            self.prev_stream_seq = stored.last_stream_seq;
            let mut failed = None;
            for i in 0..self.queue.len() {
                if let Err(e) = self.transmit(i).await {
                    failed = Some(e);
                    break;
                }
            }
            match failed {
                None => return Ok(()),
                Some(e) => why = e,
            }
        }
    }
}
