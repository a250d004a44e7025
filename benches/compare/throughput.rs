//! Throughput: Aegis on the synthetic stream (feeds → rings → sequencer → one consumer) and
//! the in-process merge baseline.

use super::*;

/// The in-process baseline merge: a linear scan over the cached heads of the sources (as the
/// sequencer does), copying each frame (header + payload) into a 1 MiB output buffer used as
/// a ring, and touching the payload there. Returns (events, checksum).
pub(super) fn inproc_merge(sources: &[SyntheticSource]) -> Result<(u64, u64), BenchError> {
    const OUT: usize = 1 << 20;
    let mut out = vec![0u8; OUT];
    let mut off = 0usize;
    let mut pos = vec![0usize; sources.len()];
    let mut heads: Vec<Option<u128>> = sources.iter().map(|s| s.key(0)).collect();
    let (mut count, mut sum, mut prev) = (0u64, 0u64, 0u128);
    loop {
        let mut best: Option<(u128, usize)> = None;
        for (i, h) in heads.iter().enumerate() {
            if let Some(k) = *h {
                if best.is_none_or(|(b, _)| k < b) {
                    best = Some((k, i));
                }
            }
        }
        let Some((key, i)) = best else { break };
        if key < prev {
            return Err(BenchError::Failed("in-process merge out of order".into()));
        }
        prev = key;
        let s = &sources[i];
        let j = pos[i];
        let (mut h, payload) = s.frame(j);
        h.source_id = s.rank;
        h.source_seq = j as u64;
        h.bus_seq = count;
        let stride = frame::stride(payload.len());
        if off + stride > OUT {
            off = 0;
        }
        out[off..off + FRAME_HEADER_LEN].copy_from_slice(&h.to_bytes());
        let p = off + FRAME_HEADER_LEN;
        out[p..p + payload.len()].copy_from_slice(payload);
        sum = sum.wrapping_add(u64::from_le_bytes(
            out[p..p + 8].try_into().expect("8 bytes"),
        ));
        off += stride;
        pos[i] = j + 1;
        heads[i] = s.key(j + 1);
        count += 1;
    }
    Ok((count, std::hint::black_box(sum)))
}

/// Baseline: the three-source merge of `events` events done in one thread over in-memory
/// vectors (building the vectors is not timed).
pub fn inproc_merge_throughput(events: u64) -> Result<ThroughputRow, BenchError> {
    let sources = synthetic_sources(events);
    let t0 = Instant::now();
    let (count, _) = inproc_merge(&sources)?;
    let elapsed = t0.elapsed();
    if count != events {
        return Err(BenchError::Failed(format!(
            "in-process merge produced {count} events, expected {events}"
        )));
    }
    Ok(ThroughputRow::new(
        "in-process merge (3 sources)",
        count,
        elapsed,
    ))
}

/// The producer end handed to a [`Feed`]: pushes frames, waiting (bounded, backing off)
/// while the ring is full.
pub struct FramePusher {
    producer: Producer,
    abort: Arc<AtomicBool>,
    backoff: Backoff,
    pushed: u64,
}

impl FramePusher {
    /// Copies a ready-made frame into the ring (its `len`, `source_id`, `source_seq` and
    /// `publish_ns` are filled in), waiting while the ring is full.
    #[inline]
    pub fn push(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<(), BenchError> {
        match self.producer.try_push_frame(header, payload) {
            Ok(_) => {}
            Err(ClaimError::Full) => {
                let (producer, backoff) = (&mut self.producer, &mut self.backoff);
                wait_for_room(&self.abort, "producer (ring full)", (), |(), deadline| {
                    producer.push_frame(header, payload, backoff, deadline)
                })?;
            }
            Err(e) => return Err(BenchError::Failed(e.to_string())),
        }
        self.pushed += 1;
        Ok(())
    }
}

/// A function that pushes one source's whole stream (without ending it: the runner writes the
/// EOF) through a [`FramePusher`].
pub type FeedFn = Box<dyn FnOnce(&mut FramePusher) -> Result<(), BenchError> + Send>;

/// One source of an Aegis throughput run: a name (its rank is its position among the sorted
/// names) and the function that feeds it, run on a producer thread of its own.
pub struct Feed {
    /// The source's name.
    pub name: String,
    /// Pushes the source's frames.
    pub push: FeedFn,
}

/// Aegis throughput on the synthetic three-source stream of `events` events: in-memory
/// feeds → rings of `ring_bytes` → sequencer (backtest, block bus of `bus_bytes`) → one
/// consumer.
#[cfg_attr(not(test), allow(dead_code))] // used by the tests, not the verb
pub fn aegis_throughput(
    events: u64,
    ring_bytes: usize,
    bus_bytes: usize,
) -> Result<ThroughputRow, BenchError> {
    let sources = Arc::new(synthetic_sources(events));
    let feeds = (0..sources.len())
        .map(|i| {
            let sources = sources.clone();
            Feed {
                name: sources[i].name.to_string(),
                push: Box::new(move |p: &mut FramePusher| {
                    let s = &sources[i];
                    for j in 0..s.len() {
                        let (h, payload) = s.frame(j);
                        p.push(&h, payload)?;
                    }
                    Ok(())
                }),
            }
        })
        .collect();
    aegis_throughput_feeds(
        "aegis (3 sources, in-memory feeds)",
        feeds,
        ring_bytes,
        bus_bytes,
    )
}

/// Aegis end-to-end throughput for any feeds (the synthetic stream, journal replays, ...):
/// one producer thread per feed (batches of 64 frames, no stamping), the sequencer in backtest
/// mode with a block bus, and one consumer (the calling thread) that reads every frame in
/// place, touches its payload and checks merge-key order, until END-OF-STREAM. Timed from the
/// start signal that releases the producers to END-OF-STREAM.
///
/// Waiting: producers with a full ring back off to short sleeps (see `producer_backoff`), the
/// sequencer yields when starved ([`WaitKind::Yield`]), the consumer spins then yields. Rings
/// of 1 MiB or more keep the sequencer fed across a producer's sleep; smaller rings work but
/// measure the scheduler more than Aegis.
pub fn aegis_throughput_feeds(
    name: &str,
    feeds: Vec<Feed>,
    ring_bytes: usize,
    bus_bytes: usize,
) -> Result<ThroughputRow, BenchError> {
    let stop = Arc::new(AtomicBool::new(false));
    let abort = Arc::new(AtomicBool::new(false));
    let guard = StopOnDrop(vec![stop.clone(), abort.clone()]);
    let bus_region = Arc::new(HeapRegion::new(spmc::region_len(bus_bytes)));
    let bus = BusWriter::create(bus_region.clone(), bus_bytes, EPOCH, Policy::Block)
        .map_err(setup_err("bus"))?;
    let mut consumer =
        BusReader::attach(bus_region, Some(EPOCH), None).map_err(setup_err("bus reader"))?;
    let go = Arc::new(AtomicBool::new(false));
    let mut inputs = Vec::new();
    let mut pushers = Vec::new();
    for (i, feed) in feeds.into_iter().enumerate() {
        let region = Arc::new(HeapRegion::new(spsc::region_len(ring_bytes)));
        let mut producer = Producer::create(region.clone(), ring_bytes, EPOCH, i as u16)
            .map_err(setup_err("ring"))?;
        producer.set_batch(64);
        producer.set_stamp(false);
        inputs.push(Input {
            name: feed.name.clone(),
            topic_id: None,
            reader: RingReader::open(region, Some(EPOCH))
                .map_err(setup_err("ring reader"))?
                .into(),
        });
        pushers.push((
            feed,
            FramePusher {
                producer,
                abort: abort.clone(),
                backoff: producer_backoff(),
                pushed: 0,
            },
        ));
    }
    let mut config = Config::new(Mode::Backtest);
    config.wait = WaitKind::Yield;
    let seq = Sequencer::new(inputs, bus, config, None).map_err(setup_err("sequencer"))?;
    let seq_handle =
        sequencer::spawn("bench-throughput", seq, stop.clone()).map_err(setup_err("spawn"))?;
    // On an error the guard calls off the threads already waiting for the start.
    let producers = spawn_pushers(pushers, &go, &abort)?;

    let t0 = Instant::now();
    go.store(true, Ordering::Release);
    let consumed = consume_in_order(&mut consumer, &abort);
    let elapsed = t0.elapsed();
    if consumed.is_err() {
        abort.store(true, Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
    }
    let mut pushed = 0u64;
    let mut result = consumed.as_ref().map(drop).map_err(clone_err);
    for p in producers {
        let r = join(p, "producer");
        if let Ok(n) = r {
            pushed += n;
        }
        if r.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        result = first_error(result, r.map(drop));
    }
    let summary = seq_handle
        .join()
        .map_err(|_| BenchError::Failed("sequencer panicked".into()))?;
    drop(guard);
    result?;
    let (count, _) = consumed?;
    let summary = summary.map_err(|e| BenchError::Failed(format!("sequencer: {e}")))?;
    if count != pushed || summary.merged != pushed {
        return Err(BenchError::Failed(format!(
            "pushed {pushed} events, sequencer merged {}, consumer read {count}",
            summary.merged
        )));
    }
    Ok(ThroughputRow::new(name, count, elapsed))
}

/// One thread per feed: waits for `go`, pushes the feed, ends the stream with EOF. Each
/// returns how many events it pushed; a failure raises `abort`.
fn spawn_pushers(
    pushers: Vec<(Feed, FramePusher)>,
    go: &Arc<AtomicBool>,
    abort: &Arc<AtomicBool>,
) -> Result<Vec<JoinHandle<Result<u64, BenchError>>>, BenchError> {
    let mut producers = Vec::new();
    for (feed, mut pusher) in pushers {
        let go = go.clone();
        let a = abort.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("aegis-bench-{}", feed.name))
            .spawn(move || -> Result<u64, BenchError> {
                wait_for_start(&go, &a)?;
                let r = (feed.push)(&mut pusher).and_then(|()| {
                    pusher.producer.flush();
                    pusher
                        .producer
                        .finish(&mut Backoff::default(), Deadline::after(STEP_TIMEOUT))
                        .map_err(|_| BenchError::Timeout("producer EOF"))
                });
                if r.is_err() {
                    a.store(true, Ordering::Relaxed);
                }
                r.map(|()| pusher.pushed)
            });
        producers.push(spawned.map_err(|e| BenchError::Setup(format!("spawn: {e}")))?);
    }
    Ok(producers)
}

/// Reads every frame until END-OF-STREAM, in place: touches each payload and checks that the
/// bus is in merge-key order. Returns (events, a sum over the payloads).
fn consume_in_order(
    consumer: &mut BusReader,
    abort: &AtomicBool,
) -> Result<(u64, u64), BenchError> {
    let mut w = Waiter::new(SpinYield::default(), "consumer");
    let (mut count, mut sum, mut prev) = (0u64, 0u64, 0u128);
    loop {
        match consumer.try_next() {
            Ok(Some(f)) => {
                w.progress();
                let h = f.header;
                if f.is_eof() {
                    if h.has(flags::ABORT) {
                        return Err(BenchError::Failed("the session aborted".into()));
                    }
                    return Ok((count, sum));
                }
                let key = merge_key(
                    h.ts,
                    h.kind().unwrap_or(Kind::Control),
                    h.source_id,
                    h.source_seq,
                );
                if key < prev {
                    return Err(BenchError::Failed(format!(
                        "bus out of merge-key order at bus seq {}",
                        h.bus_seq
                    )));
                }
                prev = key;
                let p = f.payload;
                if p.len() >= 8 {
                    sum = sum.wrapping_add(u64::from_le_bytes(p[..8].try_into().expect("8 bytes")));
                }
                count += 1;
            }
            Ok(None) => w.idle(abort)?,
            Err(e) => return Err(BenchError::Failed(e.to_string())),
        }
    }
}

/// How a throughput producer waits for room: it spins and yields briefly, then sleeps in
/// steps of at most 50 µs. Sleeping producers leave the (few) cores to the sequencer and the
/// consumer — on a 2-core machine the five threads of a run cannot all spin — and 50 µs is
/// far less than a ring of 1 MiB or more takes to drain, so the sequencer is not starved.
pub(super) fn producer_backoff() -> Backoff {
    Backoff::new(64, 8, Duration::from_micros(50))
}

/// A copy of an error for reporting (I/O errors keep their kind and message).
pub(super) fn clone_err(e: &BenchError) -> BenchError {
    match e {
        BenchError::Setup(s) => BenchError::Setup(s.clone()),
        BenchError::Timeout(w) => BenchError::Timeout(w),
        BenchError::Aborted => BenchError::Aborted,
        BenchError::Failed(s) => BenchError::Failed(s.clone()),
        BenchError::Io(io) => BenchError::Io(std::io::Error::new(io.kind(), io.to_string())),
    }
}
