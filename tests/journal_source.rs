//! Journal-backed sources: the sequencer merging straight from journals the daemon maps gives
//! the same bus, byte for byte, as the same journals pushed through rings by producers; a
//! corrupt or mismatched journal is refused with the file and the frame named.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use aegis::sequencer::{merge_key, Config, Input, Mode, Sequencer, SequencerError};
use aegis::source::{JournalOpenError, JournalSource, SourceReader};
use aegis_shm_client::event::{AnyEvent, Book, Decimal, Kline, Symbol, Trade};
use aegis_shm_client::frame::{flags, FrameHeader, Kind};
use aegis_shm_client::segment::HeapRegion;
use aegis_shm_client::spmc::{self, BusReader, BusWriter, Policy};
use aegis_shm_client::spsc::{self, Producer, RingReader};
use aegis_shm_client::wait::{Backoff, Deadline};
use aegis_tools::journal::{JournalReader, JournalWriter};
use aegis_tools::names::{FileInfo, FileKind};
use sha2::{Digest, Sha256};

const RING: usize = 4096;
const BUS: usize = 1 << 14;

/// A private directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("aegis-jsrc-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dec(m: i64) -> Decimal {
    Decimal {
        mantissa: m,
        scale: 2,
    }
}

fn event(kind: FileKind, i: u64) -> AnyEvent {
    let symbol = Symbol::new("BTCUSDT").unwrap();
    match kind {
        FileKind::Kline => AnyEvent::Kline(Kline {
            symbol,
            interval: Symbol::new("1m").unwrap(),
            open_time: i,
            close_time: i + 59_999,
            open: dec(1),
            high: dec(2),
            low: dec(1),
            close: dec(2),
            volume: dec(3),
            quote_volume: dec(4),
            trades: i,
            taker_buy_base: dec(5),
            taker_buy_quote: dec(6),
        }),
        FileKind::BookTicker => AnyEvent::Book(Book {
            symbol,
            update_id: i,
            bid_price: dec(10),
            bid_qty: dec(11),
            ask_price: dec(12),
            ask_qty: dec(13),
        }),
        _ => AnyEvent::Trade(Trade {
            symbol,
            id: i,
            price: dec(100 + i as i64),
            qty: dec(1),
            buyer_maker: i.is_multiple_of(2),
        }),
    }
}

/// Writes a journal of `n` events of `kind`; times step by `step` (ties across journals).
fn write_journal(dir: &Path, name: &str, kind: FileKind, n: u64, step: u64) -> PathBuf {
    let path = dir.join(format!("{name}.aegisj"));
    let interval = (kind == FileKind::Kline).then_some("1m");
    let info = FileInfo::new(kind, "BTCUSDT", interval).unwrap();
    let mut w = JournalWriter::create(&path, &info).unwrap();
    for i in 0..n {
        w.append(1_000 + (i / step) * 10, 0, &event(kind, i))
            .unwrap();
    }
    w.finish().unwrap();
    path
}

fn kind_of(kind: FileKind) -> Kind {
    kind.event_kind()
}

/// Merges the journals (name, path, kind) in a backtest, each from a ring (pushed by a
/// producer thread, as `aegis-replay` would) or straight from the journal; returns the digest
/// of the bus (headers without `publish_ns`, payloads) and the merge keys in bus order.
fn merge(
    journals: &[(&str, PathBuf, FileKind)],
    from_journal: &[bool],
) -> Result<([u8; 32], Vec<u128>), SequencerError> {
    let bus_region = Arc::new(HeapRegion::new(spmc::region_len(BUS)));
    let bus = BusWriter::create(bus_region.clone(), BUS, 3, Policy::Block).unwrap();
    let mut reader = BusReader::attach(bus_region, Some(3), None).unwrap();
    let mut inputs = Vec::new();
    let mut producers = Vec::new();
    for ((name, path, kind), &direct) in journals.iter().zip(from_journal) {
        let source: SourceReader = if direct {
            JournalSource::open(path, kind_of(*kind)).unwrap().into()
        } else {
            let region = Arc::new(HeapRegion::new(spsc::region_len(RING)));
            let mut p = Producer::create(region.clone(), RING, 3, 0).unwrap();
            p.set_stamp(false);
            let path = path.clone();
            producers.push(std::thread::spawn(move || {
                let mut j = JournalReader::open(&path).unwrap();
                j.for_each(|f| {
                    p.push_frame(
                        &f.header,
                        f.payload,
                        &mut Backoff::default(),
                        Deadline::after(Duration::from_secs(30)),
                    )
                    .map(drop)
                    .map_err(|e| aegis_tools::journal::JournalError::Event {
                        path: path.clone(),
                        reason: e.to_string(),
                    })
                })
                .unwrap();
                p.finish(
                    &mut Backoff::default(),
                    Deadline::after(Duration::from_secs(30)),
                )
                .unwrap();
            }));
            RingReader::open(region, Some(3)).unwrap().into()
        };
        inputs.push(Input {
            name: name.to_string(),
            topic_id: None,
            reader: source,
        });
    }
    let seq = Sequencer::new(inputs, bus, Config::new(Mode::Backtest), None)?;
    let stop = Arc::new(AtomicBool::new(false));
    let handle = aegis::sequencer::spawn("journal", seq, stop).unwrap();
    let mut hasher = Sha256::new();
    let mut keys = Vec::new();
    loop {
        let f = reader
            .next(
                &mut Backoff::default(),
                Deadline::after(Duration::from_secs(30)),
            )
            .expect("a bus frame within 30 s");
        let mut h: FrameHeader = *f.header;
        h.publish_ns = 0;
        hasher.update(h.to_bytes());
        hasher.update(f.payload);
        if f.is_eof() {
            break;
        }
        keys.push(merge_key(h.ts, f.kind(), h.source_id, h.source_seq));
    }
    let r = handle.join().unwrap();
    for p in producers {
        p.join().unwrap();
    }
    r.map(|_| (hasher.finalize().into(), keys))
}

#[test]
fn journal_backed_sources_give_the_same_bus_as_rings() {
    let dir = Dir::new("same");
    let journals = [
        (
            "klines",
            write_journal(&dir.0, "k", FileKind::Kline, 300, 1),
            FileKind::Kline,
        ),
        (
            "trades",
            write_journal(&dir.0, "t", FileKind::Trade, 3000, 10),
            FileKind::Trade,
        ),
        (
            "book",
            write_journal(&dir.0, "b", FileKind::BookTicker, 2000, 7),
            FileKind::BookTicker,
        ),
    ];
    let (rings, keys) = merge(&journals, &[false, false, false]).unwrap();
    assert_eq!(keys.len(), 5300);
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "bus out of merge-key order"
    );
    let (direct, _) = merge(&journals, &[true, true, true]).unwrap();
    assert_eq!(
        direct, rings,
        "journal-backed sources must give the ring path's bus"
    );
    let (mixed, _) = merge(&journals, &[true, false, true]).unwrap();
    assert_eq!(mixed, rings);
}

/// A change to a frame header's first 8 bytes.
type Edit = dyn Fn(&mut [u8]);

/// Writes a 100-trade journal in `dir` with frame #42's header changed by `edit` (given the
/// header's first 8 bytes: len, kind, flags, source id) and merges it straight from the
/// journal: the bus's merge keys, or why the merge failed.
fn merge_edited(
    dir: &Dir,
    name: &str,
    edit: impl Fn(&mut [u8]),
) -> (PathBuf, Result<usize, String>) {
    let path = write_journal(&dir.0, name, FileKind::Trade, 100, 1);
    // The journal header is 64 bytes; frames have a fixed stride.
    let mut bytes = std::fs::read(&path).unwrap();
    let stride = (bytes.len() - 64) / 100;
    edit(&mut bytes[64 + 42 * stride..64 + 42 * stride + 8]);
    std::fs::write(&path, &bytes).unwrap();
    let journals = [("trades", path.clone(), FileKind::Trade)];
    let r = match merge(&journals, &[true]) {
        Ok((_, keys)) => Ok(keys.len()),
        Err(SequencerError::SourceFailed {
            source_name,
            reason,
        }) => {
            assert_eq!(source_name, "trades");
            Err(reason)
        }
        Err(other) => panic!("expected a source failure, got {other}"),
    };
    (path, r)
}

#[test]
fn a_corrupt_journal_frame_fails_the_backtest_naming_file_and_frame() {
    let dir = Dir::new("corrupt");
    let len = |b: &[u8]| u32::from_le_bytes(b[..4].try_into().unwrap());
    let set_len = |b: &mut [u8], n: u32| b[..4].copy_from_slice(&n.to_le_bytes());
    // Each rule the merge's quick check of a journal frame stands for (its kind, its payload
    // length, its flags: each known flag but LATE, and unknown bits), broken alone (the
    // control case breaks kind and flags together, as an end-of-stream frame in the middle
    // would): every one is refused with check_frame's own reason.
    let cases: [(&str, Box<Edit>, &str); 12] = [
        ("kind9", Box::new(|b| b[4] = 9), "unknown frame kind 9"),
        (
            "book",
            Box::new(|b| b[4] = Kind::Book as u8),
            "a book frame in a trade journal",
        ),
        (
            "control",
            Box::new(|b| {
                b[4] = Kind::Control as u8;
                b[5] = flags::EOF
            }),
            "control frame (flags 0x01) where an event was expected",
        ),
        (
            "longer",
            Box::new(move |b| {
                let n = len(b);
                set_len(b, n + 8)
            }),
            "payload of 72 bytes, a trade is 64 bytes",
        ),
        (
            "shorter",
            Box::new(move |b| {
                let n = len(b);
                set_len(b, n - 1)
            }),
            "payload of 63 bytes, a trade is 64 bytes",
        ),
        (
            "huge",
            Box::new(move |b| set_len(b, u32::MAX)),
            "does not fit",
        ),
        (
            "eof",
            Box::new(|b| b[5] = flags::EOF),
            "unexpected flags 0x01 on an event",
        ),
        (
            "padding",
            Box::new(|b| b[5] = flags::PADDING | flags::LATE),
            "padding on an event",
        ),
        (
            "heartbeat",
            Box::new(|b| b[5] = flags::HEARTBEAT),
            "unexpected flags 0x04 on an event",
        ),
        (
            "abort",
            Box::new(|b| b[5] = flags::ABORT | flags::LATE),
            "unexpected flags 0x12 on an event",
        ),
        (
            "gap",
            Box::new(|b| b[5] = flags::GAP),
            "unknown frame flags 0x20",
        ),
        (
            "unknown",
            Box::new(|b| b[5] = 0x80),
            "unknown frame flags 0x80",
        ),
    ];
    for (name, edit, expected) in cases {
        let (path, r) = merge_edited(&dir, name, edit);
        let reason = r.expect_err(name);
        assert!(
            reason.contains(&path.display().to_string())
                && reason.contains("frame #42")
                && reason.contains(expected),
            "{name}: {reason}"
        );
    }
    // LATE is the one flag a journal frame may carry (a recorded late event): merged, and
    // the bus's flags are the sequencer's own.
    let (_, r) = merge_edited(&dir, "late", |b| b[5] = flags::LATE);
    assert_eq!(r, Ok(100));
}

#[test]
fn journal_open_refusals() {
    let dir = Dir::new("open");
    let path = write_journal(&dir.0, "t", FileKind::Trade, 10, 1);
    assert!(matches!(
        JournalSource::open(&path, Kind::Book),
        Err(JournalOpenError::Kind { .. })
    ));
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 16]).unwrap();
    let e = JournalSource::open(&path, Kind::Trade)
        .err()
        .expect("a truncated journal");
    assert!(e.to_string().contains("truncated"), "{e}");
    std::fs::write(
        &path,
        b"not a journal at all, not at all, not at all, not at all, no!",
    )
    .unwrap();
    let e = JournalSource::open(&path, Kind::Trade)
        .err()
        .expect("not a journal");
    assert!(e.to_string().contains("magic"), "{e}");
    let e = JournalSource::open(&dir.0.join("missing"), Kind::Trade)
        .err()
        .expect("missing");
    assert!(e.to_string().contains("cannot open"), "{e}");
    // A FIFO must not hang the daemon in `open` (it would wait for a writer for ever).
    let fifo = dir.0.join("fifo.aegisj");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let e = JournalSource::open(&fifo, Kind::Trade)
        .err()
        .expect("a FIFO is refused");
    assert!(e.to_string().contains("not a regular file"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// The real path: aegis-replay hands its journals to the daemon
// ---------------------------------------------------------------------------------------------

mod common;

/// One backtest over the journals, replayed with `replay_flags`; returns the tap's digest.
fn session_digest(
    h: &mut common::Harness,
    b: &common::Bins,
    socket: &Path,
    name: &str,
    journals: &[PathBuf],
    replay_flags: &str,
) -> String {
    let files: Vec<String> = journals.iter().map(|p| common::q(p)).collect();
    let out = h.dir.join(format!("{name}.digest"));
    let commands = [
        format!(
            "exec {} {replay_flags} {}",
            common::q(&b.replay),
            files.join(" ")
        ),
        format!(
            "exec {} --format digest --out {}",
            common::q(&b.tap),
            common::q(&out)
        ),
    ];
    let r = common::session_run(h, b, socket, name, "backtest", &[], &commands);
    common::assert_run_ok(h, &r, 5300);
    std::fs::read_to_string(&out).unwrap().trim().to_string()
}

#[test]
fn replay_hands_journals_to_the_daemon_with_the_ring_paths_stream() {
    let _g = common::serial();
    let b = common::bins();
    let mut h = common::Harness::new("handover");
    let journals = vec![
        write_journal(&h.dir, "BTCUSDT-1m-2024-09-21", FileKind::Kline, 300, 1),
        write_journal(
            &h.dir,
            "BTCUSDT-trades-2024-09-21",
            FileKind::Trade,
            3000,
            10,
        ),
        write_journal(
            &h.dir,
            "BTCUSDT-bookTicker-2024-09-21",
            FileKind::BookTicker,
            2000,
            7,
        ),
    ];
    let socket = h.start_daemon(&b);
    let handed = session_digest(&mut h, &b, &socket, "handed", &journals, "");
    let ring = session_digest(&mut h, &b, &socket, "ring", &journals, "--via-ring");
    assert!(common::is_digest(&handed), "{handed:?}");
    assert_eq!(
        handed, ring,
        "a journal handed to the daemon must give the ring path's stream"
    );
    // A truncated journal is refused (by aegis-replay as it opens it, and by the daemon at
    // REGISTER): the run fails with the reason, nothing is merged.
    let bad = h.dir.join("BTCUSDT-trades-2024-09-22.aegisj");
    let mut bytes = std::fs::read(&journals[1]).unwrap();
    bytes.truncate(bytes.len() - 16);
    std::fs::write(&bad, bytes).unwrap();
    let commands = [
        format!("exec {} {}", common::q(&b.replay), common::q(&bad)),
        format!("exec {} --format count", common::q(&b.tap)),
    ];
    let r = common::session_run(&mut h, &b, &socket, "bad", "backtest", &[], &commands);
    assert!(!r.status.success(), "a truncated journal must fail the run");
}
