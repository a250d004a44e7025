//! Aegis end-to-end latency (producer → pinned sequencer → consumer), and its interleaving
//! with the ping-pong baseline.

use super::*;

pub(super) fn aegis_latency_name(spin: bool) -> &'static str {
    if spin {
        "aegis (spin, pinned)"
    } else {
        "aegis (backoff, pinned)"
    }
}

/// Name of the fan-out row: the Aegis latency row with a second consumer on the bus.
pub(super) const FANOUT_NAME: &str = "aegis (spin, pinned), 2 consumers (the second parks)";

/// Name of the hop-split row: the Aegis latency row with the frames stamped by the sequencer
/// as it copies them to the bus, so that it measures the second hop alone.
pub(super) const BUS_HOP_NAME: &str = "aegis bus hop only (sequencer → consumer, spin, pinned)";

/// What one interleaved latency run of the Aegis rig measures.
#[derive(Clone, Copy)]
pub(super) struct Rig {
    /// Consumers besides the measuring one (the fan-out row).
    extra: usize,
    /// The sequencer stamps the frames (the bus-hop row).
    stamp_at_merge: bool,
}

impl Rig {
    /// The headline row: one consumer, the producer's stamp.
    pub(super) const ONE: Rig = Rig {
        extra: 0,
        stamp_at_merge: false,
    };
}

/// [`pingpong`], [`aegis_latency`] and the same with a second consumer on the bus, interleaved:
/// `rounds` alternating runs of `samples / rounds` samples each, merged into one row per
/// measurement. The second consumer is a thread of its own that reads every frame and parks
/// when idle ([`Park`]): on 2 cores the measuring thread and the pinned sequencer take both, so
/// a second *spinning* consumer would have no core and the row would measure preemption. On a virtual
/// machine the hypervisor moves virtual cores between physical cores (same core, sibling,
/// another complex) from one second to the next, and a cross-core hop then costs anywhere
/// between 25 and 175 ns; interleaving makes both rows sample the same placements, so their
/// ratio is meaningful. Returns `[ping-pong, aegis, fan-out, bus hop, raw relay]`.
pub fn latency_interleaved(
    samples: u64,
    rounds: u64,
    spin: bool,
) -> Result<[LatencyRow; 5], BenchError> {
    let rounds = rounds.clamp(1, samples.max(1));
    let per = samples / rounds;
    let (mut pp, mut ae, mut fan, mut hop) = (histogram(), histogram(), histogram(), histogram());
    let mut relay = histogram();
    let fan_rig = Rig {
        extra: 1,
        ..Rig::ONE
    };
    let hop_rig = Rig {
        stamp_at_merge: true,
        ..Rig::ONE
    };
    for r in 0..rounds {
        // The last round takes the remainder, so the rows hold exactly `samples` each.
        let n = if r + 1 == rounds {
            samples - per * (rounds - 1)
        } else {
            per
        };
        pp.add(pingpong_histogram(n)?)
            .map_err(|e| BenchError::Failed(e.to_string()))?;
        ae.add(aegis_latency_histogram(n, spin, Rig::ONE)?)
            .map_err(|e| BenchError::Failed(e.to_string()))?;
        fan.add(aegis_latency_histogram(n, spin, fan_rig)?)
            .map_err(|e| BenchError::Failed(e.to_string()))?;
        hop.add(aegis_latency_histogram(n, spin, hop_rig)?)
            .map_err(|e| BenchError::Failed(e.to_string()))?;
        relay
            .add(relay_histogram(n)?)
            .map_err(|e| BenchError::Failed(e.to_string()))?;
    }
    Ok([
        latency_row(PINGPONG, &pp),
        latency_row(aegis_latency_name(spin), &ae),
        latency_row(FANOUT_NAME, &fan),
        latency_row(BUS_HOP_NAME, &hop),
        latency_row(RELAY, &relay),
    ])
}

pub(super) fn sample_trade(i: u64) -> Trade {
    Trade {
        symbol: Symbol(*b"BTCUSDT\0\0\0\0\0\0\0\0\0"),
        id: i,
        price: Decimal {
            mantissa: 6_320_105 + (i % 1000) as i64,
            scale: 2,
        },
        qty: Decimal {
            mantissa: 5 + (i % 7) as i64,
            scale: 1,
        },
        buyer_maker: i.is_multiple_of(3),
    }
}

/// Idle time before each event of `aegis_latency(_, false)`.
pub const BACKOFF_GAP: Duration = Duration::from_micros(100);

/// Producer → sequencer → consumer latency of one 64-byte `Trade`, the producer and the
/// consumer being one thread on the first core and the sequencer pinned to the second (see the
/// module docs). `spin`: sequencer and consumer busy-spin, events back to back. Otherwise
/// both use [`Backoff`] and every event follows [`BACKOFF_GAP`] of silence (the thread
/// sleeps), so the figure shows what backing off costs on a sparse stream (back to back, a
/// backoff never gets past its spinning phase and the figure would equal the spinning one).
#[cfg_attr(not(test), allow(dead_code))] // used by the tests, not the verb
pub fn aegis_latency(samples: u64, spin: bool) -> Result<LatencyRow, BenchError> {
    Ok(latency_row(
        aegis_latency_name(spin),
        &aegis_latency_histogram(samples, spin, Rig::ONE)?,
    ))
}

/// The in-process setup of the Aegis latency row: one source ring, a live sequencer pinned to
/// the second core, an overwrite bus with one consumer.
struct LatencyRig {
    producer: Producer,
    consumer: BusReader,
    /// Further consumers, read by threads of their own (the fan-out row).
    extra: Vec<BusReader>,
    sequencer: JoinHandle<Result<sequencer::Summary, sequencer::SequencerError>>,
    stop: Arc<AtomicBool>,
    cores: Option<(core_affinity::CoreId, core_affinity::CoreId)>,
}

/// Ring and bus size of the latency rig.
const LATENCY_RING: usize = 1 << 16;

fn latency_rig(spin: bool, rig: Rig) -> Result<LatencyRig, BenchError> {
    let Rig {
        extra,
        stamp_at_merge,
    } = rig;
    let cores = two_cores();
    let ring_region = Arc::new(HeapRegion::new(spsc::region_len(LATENCY_RING)));
    let mut producer =
        Producer::create(ring_region.clone(), LATENCY_RING, EPOCH, 0).map_err(setup_err("ring"))?;
    producer.set_batch(1);
    producer.set_stamp(true);
    let reader = RingReader::open(ring_region, Some(EPOCH)).map_err(setup_err("ring reader"))?;
    let bus_region = Arc::new(HeapRegion::new(spmc::region_len(LATENCY_RING)));
    let bus = BusWriter::create(bus_region.clone(), LATENCY_RING, EPOCH, Policy::Overwrite)
        .map_err(setup_err("bus"))?;
    let consumer = BusReader::attach(bus_region.clone(), Some(EPOCH), None)
        .map_err(setup_err("bus reader"))?;
    let extra = (0..extra)
        .map(|_| BusReader::attach(bus_region.clone(), Some(EPOCH), None))
        .collect::<Result<Vec<_>, _>>()
        .map_err(setup_err("bus reader"))?;
    let mut config = Config::new(Mode::Live {
        // One source that always has a head: lateness never holds the merge.
        max_lateness: Duration::from_micros(1),
    });
    config.core = cores.map(|c| c.1.id);
    config.stamp_at_merge = stamp_at_merge;
    config.wait = if spin {
        WaitKind::Spin
    } else {
        WaitKind::Backoff
    };
    let input = Input {
        name: "trades".into(),
        topic_id: Some(0),
        reader: reader.into(),
    };
    let seq = Sequencer::new(vec![input], bus, config, None).map_err(setup_err("sequencer"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let sequencer =
        sequencer::spawn("bench-latency", seq, stop.clone()).map_err(setup_err("spawn"))?;
    Ok(LatencyRig {
        producer,
        consumer,
        extra,
        sequencer,
        stop,
        cores,
    })
}

/// Pushes trade `i` and waits for it on the bus; returns its producer → consumer latency.
fn round_trip<W: WaitStrategy>(
    producer: &mut Producer,
    consumer: &mut BusReader,
    w: &mut Waiter<W>,
    i: u64,
    abort: &AtomicBool,
) -> Result<u64, BenchError> {
    let ts = TS0 + i;
    match producer.try_push(ts, 0, sample_trade(i)) {
        Ok(_) => {}
        Err(PushError::Full(ev)) => {
            wait_for_room(abort, "producer (ring full)", ev, |ev, deadline| {
                producer.push(ts, 0, ev, &mut spinning(), deadline)
            })?
        }
        Err(e) => return Err(BenchError::Failed(e.to_string())),
    }
    w.progress();
    let lat = loop {
        match consumer.try_next() {
            Ok(Some(f)) => {
                if f.is_eof() {
                    return Err(BenchError::Failed(
                        "END-OF-STREAM before the last event".into(),
                    ));
                }
                let id = match f.event() {
                    Ok(EventRef::Trade(t)) => t.id.to_native(),
                    other => {
                        return Err(BenchError::Failed(format!(
                            "unexpected bus frame: {other:?}"
                        )))
                    }
                };
                let now = monotonic_ns();
                if id != i || f.header.ts != ts {
                    return Err(BenchError::Failed(format!("expected trade {i}, got {id}")));
                }
                break now.saturating_sub(f.header.publish_ns);
            }
            Ok(None) => w.idle(abort)?,
            Err(e) => return Err(BenchError::Failed(e.to_string())),
        }
    };
    w.progress();
    Ok(lat)
}

/// Ends the stream and waits for END-OF-STREAM; nothing else may arrive.
fn end_of_stream<W: WaitStrategy>(
    producer: &mut Producer,
    consumer: &mut BusReader,
    w: &mut Waiter<W>,
    abort: &AtomicBool,
) -> Result<(), BenchError> {
    producer
        .finish(&mut Backoff::default(), Deadline::after(STEP_TIMEOUT))
        .map_err(|_| BenchError::Timeout("producer EOF"))?;
    loop {
        match consumer.try_next() {
            Ok(Some(f)) if f.is_eof() => return Ok(()),
            Ok(Some(_)) => return Err(BenchError::Failed("an extra frame on the bus".into())),
            Ok(None) => w.idle(abort)?,
            Err(e) => return Err(BenchError::Failed(e.to_string())),
        }
    }
}

/// `total` round trips, the first `skip` unrecorded; `gap`: idle time before each event.
fn measure<W: WaitStrategy>(
    producer: &mut Producer,
    consumer: &mut BusReader,
    mut w: Waiter<W>,
    (total, skip): (u64, u64),
    gap: Option<Duration>,
    abort: &AtomicBool,
) -> Result<Histogram<u64>, BenchError> {
    let mut h = histogram();
    for i in 0..total {
        if let Some(gap) = gap {
            std::thread::sleep(gap);
        }
        let lat = round_trip(producer, consumer, &mut w, i, abort)?;
        if i >= skip {
            h.saturating_record(lat);
        }
    }
    end_of_stream(producer, consumer, &mut w, abort)?;
    Ok(h)
}

/// A further consumer: reads every frame (parking when idle) until END-OF-STREAM or `abort`;
/// returns how many events it read and how many it missed (lapped: the bus is live and never
/// waits for a consumer that was not scheduled).
fn extra_consumer(mut r: BusReader, abort: Arc<AtomicBool>) -> Result<(u64, u64), BenchError> {
    let mut wait = Park::default();
    let (mut events, mut missed) = (0, 0);
    loop {
        if abort.load(Ordering::Relaxed) {
            return Err(BenchError::Aborted);
        }
        match r.next(&mut wait, Deadline::after(ABORT_POLL)) {
            Ok(f) if f.is_eof() => return Ok((events, missed)),
            Ok(_) => events += 1,
            Err(ReadError::Timeout) => {}
            Err(ReadError::Overrun { missed: m }) => missed += m,
            Err(e) => return Err(BenchError::Failed(e.to_string())),
        }
    }
}

pub(super) fn aegis_latency_histogram(
    samples: u64,
    spin: bool,
    rig: Rig,
) -> Result<Histogram<u64>, BenchError> {
    let skip = warmup(samples);
    let total = skip + samples;
    let LatencyRig {
        mut producer,
        mut consumer,
        extra,
        sequencer: seq_handle,
        stop,
        cores,
    } = latency_rig(spin, rig)?;
    let abort = Arc::new(AtomicBool::new(false));
    let guard = StopOnDrop(vec![stop.clone(), abort.clone()]);
    let readers = extra
        .into_iter()
        .map(|r| {
            let a = abort.clone();
            std::thread::Builder::new()
                .name("aegis-bench-fan".into())
                .spawn(move || extra_consumer(r, a))
                .map_err(setup_err("spawn"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let a = abort.clone();
    let worker = std::thread::Builder::new()
        .name("aegis-bench-pc".into())
        .spawn(move || -> Result<Histogram<u64>, BenchError> {
            pin(cores.map(|c| c.0));
            let what = "latency producer/consumer";
            let (p, c, n) = (&mut producer, &mut consumer, (total, skip));
            let r = if spin {
                measure(p, c, Waiter::new(spinning(), what), n, None, &a)
            } else {
                let w = Waiter::new(Backoff::default(), what);
                measure(p, c, w, n, Some(BACKOFF_GAP), &a)
            };
            if r.is_err() {
                a.store(true, Ordering::Relaxed);
            }
            r
        })
        .map_err(setup_err("spawn"))?;
    let h = join(worker, "latency producer/consumer");
    if h.is_err() {
        stop.store(true, Ordering::Relaxed);
    }
    let s = seq_handle
        .join()
        .map_err(|_| BenchError::Failed("sequencer panicked".into()))?;
    if h.is_err() || s.is_err() {
        abort.store(true, Ordering::Relaxed);
    }
    let read: Vec<Result<(u64, u64), BenchError>> = readers
        .into_iter()
        .map(|t| join(t, "fan-out consumer"))
        .collect();
    drop(guard);
    let h = h?;
    let summary = s.map_err(|e| BenchError::Failed(format!("sequencer: {e}")))?;
    for r in read {
        let (n, missed) = r?;
        if n + missed != total {
            return Err(BenchError::Failed(format!(
                "the second consumer read {n} events and missed {missed}, expected {total} in all"
            )));
        }
    }
    if summary.merged != total {
        return Err(BenchError::Failed(format!(
            "sequencer merged {} events, expected {total}",
            summary.merged
        )));
    }
    Ok(h)
}
