//! The design Aegis replaces: Unix-domain sockets carrying JSON lines (latency and
//! throughput), with their own schema.

use super::*;

/// A trade as the JSON design carried it.
#[derive(Serialize, Deserialize, Debug)]
pub(super) struct JsonTrade {
    symbol: String,
    id: u64,
    price: String,
    qty: String,
    buyer_maker: bool,
    ts: u64,
    publish_ns: u64,
}

/// Best bid and ask as the JSON design carried it.
#[derive(Serialize, Deserialize, Debug)]
pub(super) struct JsonBook {
    symbol: String,
    update_id: u64,
    bid_price: String,
    bid_qty: String,
    ask_price: String,
    ask_qty: String,
    ts: u64,
}

/// A kline as the JSON design carried it.
#[derive(Serialize, Deserialize, Debug)]
pub(super) struct JsonKline {
    symbol: String,
    interval: String,
    open_time: u64,
    close_time: u64,
    open: String,
    high: String,
    low: String,
    close: String,
    volume: String,
    quote_volume: String,
    trades: u64,
    taker_buy_base: String,
    taker_buy_quote: String,
    ts: u64,
}

pub(super) fn json_trade(i: u64, ts: u64, publish_ns: u64) -> JsonTrade {
    let t = sample_trade(i);
    JsonTrade {
        symbol: "BTCUSDT".into(),
        id: i,
        price: t.price.to_string(),
        qty: t.qty.to_string(),
        buyer_maker: t.buyer_maker,
        ts,
        publish_ns,
    }
}

/// One-way latency of the socket + JSON design: the producer (first core) stamps, serialises
/// and writes one line; the consumer (second core, blocked in `read`) reads and parses it and
/// records `now - stamp`. One event in flight at a time.
pub fn socket_json_latency(samples: u64) -> Result<LatencyRow, BenchError> {
    let skip = warmup(samples);
    let total = skip + samples;
    let cores = two_cores();
    let (mut tx, rx) = UnixStream::pair().map_err(setup_err("socketpair"))?;
    tx.set_write_timeout(Some(STEP_TIMEOUT))?;
    rx.set_read_timeout(Some(STEP_TIMEOUT))?;
    let received = Arc::new(AtomicU64::new(0));
    let abort = Arc::new(AtomicBool::new(false));
    let _guard = StopOnDrop(vec![abort.clone()]);

    let (r, a) = (received.clone(), abort.clone());
    let consumer = std::thread::Builder::new()
        .name("aegis-bench-json-rx".into())
        .spawn(move || -> Result<Histogram<u64>, BenchError> {
            pin(cores.map(|c| c.1));
            let res = json_receive(rx, (total, skip), &r);
            if res.is_err() {
                a.store(true, Ordering::Relaxed);
            }
            res
        })
        .map_err(setup_err("spawn"))?;

    let a = abort.clone();
    let producer = std::thread::Builder::new()
        .name("aegis-bench-json-tx".into())
        .spawn(move || -> Result<(), BenchError> {
            pin(cores.map(|c| c.0));
            let res = json_send(&mut tx, total, &received, &a);
            if res.is_err() {
                a.store(true, Ordering::Relaxed);
            }
            res
        })
        .map_err(setup_err("spawn"))?;
    let p = join(producer, "JSON producer");
    let h = join(consumer, "JSON consumer");
    let h = match (h, p) {
        (Ok(h), Ok(())) => h,
        (h, p) => {
            first_error(h.map(drop), p)?;
            unreachable!("one of them failed")
        }
    };
    Ok(latency_row("socket + JSON (Unix socket)", &h))
}

/// The consumer of [`socket_json_latency`]: reads and parses `total` lines, records the
/// latency of all but the first `skip`, and tells the producer each one arrived.
fn json_receive(
    rx: UnixStream,
    (total, skip): (u64, u64),
    received: &AtomicU64,
) -> Result<Histogram<u64>, BenchError> {
    let mut h = histogram();
    let mut rx = BufReader::new(rx);
    let mut line = String::new();
    for i in 0..total {
        line.clear();
        let n = rx.read_line(&mut line).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                BenchError::Timeout("JSON consumer")
            }
            _ => BenchError::Io(e),
        })?;
        if n == 0 {
            return Err(BenchError::Aborted);
        }
        let t: JsonTrade = serde_json::from_str(&line)
            .map_err(|e| BenchError::Failed(format!("bad JSON line: {e}")))?;
        let now = monotonic_ns();
        if t.id != i {
            return Err(BenchError::Failed(format!("expected {i}, got {}", t.id)));
        }
        if i >= skip {
            h.saturating_record(now.saturating_sub(t.publish_ns));
        }
        received.store(i + 1, Ordering::Release);
    }
    Ok(h)
}

/// The producer of [`socket_json_latency`]: one stamped line at a time, each once the
/// previous one arrived.
fn json_send(
    tx: &mut UnixStream,
    total: u64,
    received: &AtomicU64,
    abort: &AtomicBool,
) -> Result<(), BenchError> {
    let mut buf = Vec::with_capacity(256);
    let mut w = Waiter::new(SpinYield::default(), "JSON producer");
    for i in 0..total {
        while received.load(Ordering::Acquire) != i {
            w.idle(abort)?;
        }
        w.progress();
        buf.clear();
        let msg = json_trade(i, TS0 + i, monotonic_ns());
        serde_json::to_writer(&mut buf, &msg).map_err(|e| BenchError::Failed(e.to_string()))?;
        buf.push(b'\n');
        tx.write_all(&buf)?;
    }
    Ok(())
}

/// JSON lines of one topic, pre-serialised (as the Aegis feeds push pre-encoded frames).
pub(super) fn json_pool(src: usize) -> Vec<Vec<u8>> {
    (0..POOL as u64)
        .map(|i| {
            let ts = TS0 + i * 1_000;
            let mut line = match src {
                0 => serde_json::to_vec(&json_trade(i, ts, 0)),
                1 => {
                    let b = sample_book(i);
                    serde_json::to_vec(&JsonBook {
                        symbol: "BTCUSDT".into(),
                        update_id: i,
                        bid_price: b.bid_price.to_string(),
                        bid_qty: b.bid_qty.to_string(),
                        ask_price: b.ask_price.to_string(),
                        ask_qty: b.ask_qty.to_string(),
                        ts,
                    })
                }
                _ => {
                    let k = sample_kline(i);
                    serde_json::to_vec(&JsonKline {
                        symbol: "BTCUSDT".into(),
                        interval: "1m".into(),
                        open_time: k.open_time,
                        close_time: k.close_time,
                        open: k.open.to_string(),
                        high: k.high.to_string(),
                        low: k.low.to_string(),
                        close: k.close.to_string(),
                        volume: k.volume.to_string(),
                        quote_volume: k.quote_volume.to_string(),
                        trades: k.trades,
                        taker_buy_base: k.taker_buy_base.to_string(),
                        taker_buy_quote: k.taker_buy_quote.to_string(),
                        ts,
                    })
                }
            }
            .expect("serialisable");
            line.push(b'\n');
            line
        })
        .collect()
}

/// Parses one JSON line of topic `src` and returns a value read from it (the "touch").
pub(super) fn parse_line(src: usize, line: &[u8]) -> Result<u64, BenchError> {
    let bad = |e: serde_json::Error| BenchError::Failed(format!("bad JSON line: {e}"));
    Ok(match src {
        0 => serde_json::from_slice::<JsonTrade>(line).map_err(bad)?.ts,
        1 => serde_json::from_slice::<JsonBook>(line).map_err(bad)?.ts,
        _ => serde_json::from_slice::<JsonKline>(line).map_err(bad)?.ts,
    })
}

/// Per-socket read state of the JSON consumer.
pub(super) struct LineReader {
    stream: UnixStream,
    buf: Vec<u8>,
    open: bool,
}

impl LineReader {
    /// Reads what is available (once) and parses every complete line. Returns lines parsed.
    fn pump(&mut self, src: usize, chunk: &mut [u8], sum: &mut u64) -> Result<u64, BenchError> {
        match self.stream.read(chunk) {
            Ok(0) => {
                self.open = false;
                if !self.buf.is_empty() {
                    return Err(BenchError::Failed("a partial JSON line at EOF".into()));
                }
                return Ok(0);
            }
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(0),
            Err(e) => return Err(e.into()),
        }
        let mut start = 0;
        let mut lines = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            *sum = sum.wrapping_add(parse_line(src, &self.buf[start..start + nl])?);
            start += nl + 1;
            lines += 1;
        }
        self.buf.drain(..start);
        Ok(lines)
    }
}

/// The consumer of [`socket_json_throughput`]: `poll`s the sockets and parses every line
/// until each producer has shut its socket down. Returns the number of lines.
fn poll_lines(readers: &mut [LineReader], abort: &AtomicBool) -> Result<u64, BenchError> {
    let mut chunk = vec![0u8; 1 << 16];
    let (mut lines, mut sum) = (0u64, 0u64);
    let mut idle_since: Option<Instant> = None;
    while readers.iter().any(|r| r.open) {
        let mut fds: Vec<libc::pollfd> = readers
            .iter()
            .map(|r| libc::pollfd {
                fd: if r.open { r.stream.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that outlives the
        // call; negative fds are ignored by poll.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        if abort.load(Ordering::Relaxed) {
            return Err(BenchError::Aborted);
        }
        let mut progress = false;
        for (src, (r, fd)) in readers.iter_mut().zip(&fds).enumerate() {
            if r.open && fd.revents != 0 {
                let before = lines;
                lines += r.pump(src, &mut chunk, &mut sum)?;
                progress |= lines != before || !r.open;
            }
        }
        if progress {
            idle_since = None;
        } else if idle_since.get_or_insert_with(Instant::now).elapsed() > STEP_TIMEOUT {
            return Err(BenchError::Timeout("JSON consumer"));
        }
    }
    std::hint::black_box(sum);
    Ok(lines)
}

/// One producer of [`socket_json_throughput`]: `count` pre-serialised lines from `pool`.
fn write_lines(
    tx: &UnixStream,
    pool: &[Vec<u8>],
    count: u64,
    abort: &AtomicBool,
) -> Result<(), BenchError> {
    let mut w = std::io::BufWriter::with_capacity(1 << 16, tx);
    for j in 0..count {
        if j.is_multiple_of(4096) && abort.load(Ordering::Relaxed) {
            return Err(BenchError::Aborted);
        }
        w.write_all(&pool[j as usize % POOL])?;
    }
    w.flush()?;
    Ok(())
}

/// The design Aegis replaces: one Unix socket per topic (trades, book, klines ~ 60/30/10 % of
/// `events`) carrying JSON lines, written as fast as possible by one producer thread per topic
/// (pre-serialised lines through a 64 KiB buffer); one consumer thread `poll`s the three
/// sockets and parses every line.
pub fn socket_json_throughput(events: u64) -> Result<ThroughputRow, BenchError> {
    let mut counts = [0u64; 3];
    for (src, _) in global_stream(events) {
        counts[src] += 1;
    }
    let abort = Arc::new(AtomicBool::new(false));
    let _guard = StopOnDrop(vec![abort.clone()]);
    let go = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    let mut producers = Vec::new();
    for (src, &count) in counts.iter().enumerate() {
        let (tx, rx) = UnixStream::pair().map_err(setup_err("socketpair"))?;
        tx.set_write_timeout(Some(STEP_TIMEOUT))?;
        rx.set_nonblocking(true)?;
        readers.push(LineReader {
            stream: rx,
            buf: Vec::with_capacity(1 << 17),
            open: true,
        });
        let pool = json_pool(src);
        let go = go.clone();
        let a = abort.clone();
        producers.push(
            std::thread::Builder::new()
                .name(format!("aegis-bench-json-{src}"))
                .spawn(move || -> Result<(), BenchError> {
                    wait_for_start(&go, &a)?;
                    let r = write_lines(&tx, &pool, count, &a);
                    let _ = tx.shutdown(std::net::Shutdown::Write);
                    if r.is_err() {
                        a.store(true, Ordering::Relaxed);
                    }
                    r
                })
                .map_err(setup_err("spawn"))?,
        );
    }

    let t0 = Instant::now();
    go.store(true, Ordering::Release);
    let consumed = poll_lines(&mut readers, &abort);
    let elapsed = t0.elapsed();
    if consumed.is_err() {
        abort.store(true, Ordering::Relaxed);
    }
    drop(readers);
    let mut result = consumed.as_ref().map(drop).map_err(clone_err);
    for p in producers {
        result = first_error(result, join(p, "JSON producer"));
    }
    result?;
    let lines = consumed?;
    if lines != events {
        return Err(BenchError::Failed(format!(
            "JSON consumer parsed {lines} lines, expected {events}"
        )));
    }
    Ok(ThroughputRow::new(
        "socket + JSON (3 sockets)",
        lines,
        elapsed,
    ))
}
