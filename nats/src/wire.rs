//! How an Aegis bus travels through a JetStream stream: subjects, headers, the manifest, and
//! the checks the importer makes on every message. Both directions of the bridge use this one
//! module, so the format is written down once.
//!
//! A stream `NAME` holds one exported bus, in bus order:
//!
//! | subject | what | payload |
//! |---|---|---|
//! | `aegis.NAME._manifest` | first message: the session's sources (by rank) and topics | JSON [`Manifest`] |
//! | `aegis.NAME.<topic>` | one bus event | the frame bytes: 48-byte header + rkyv archive |
//! | `aegis.NAME._eos` | the bus's END-OF-STREAM (with ABORT if the session failed) | the frame bytes (header only) |
//!
//! Every frame message carries the headers [`H_BUS_SEQ`], [`H_TS`], [`H_KIND`], [`H_EPOCH`],
//! [`H_FROM`] and `Nats-Msg-Id` = `<epoch>-<bus seq>`; optionally [`H_ENDED`].
//!
//! **Contiguity.** [`H_FROM`] is the first bus seq the message accounts for: the exporter read
//! every bus frame from `from` to `bus_seq - 1` and left them out on purpose (`--topics`), so
//! an importer that has everything up to `from - 1` may take this message. Without
//! `--topics`, `from == bus_seq`. A frame the exporter never saw (a live bus lapped it, or it
//! restarted at the head of a live bus) breaks the chain, and the importer names the missing
//! range.
//!
//! **Source ends.** [`H_ENDED`] lists the ranks of sources that have no event after this
//! message. A backtest merge on the remote host waits for every source that has not ended, so
//! the importer ends a source's ring as soon as the exporter learns that the source ended (see
//! `export.rs`), not only at END-OF-STREAM.

use std::fmt;

use aegis_shm_client::event::{self, EventRef};
use aegis_shm_client::frame::{flags, FrameHeader, Kind, Seq, FRAME_HEADER_LEN};
use aegis_shm_client::protocol::SourceKind;
use serde::{Deserialize, Serialize};

/// The bus sequence number of the frame.
pub const H_BUS_SEQ: &str = "Aegis-Bus-Seq";
/// The frame's event time (ns since the Unix epoch).
pub const H_TS: &str = "Aegis-Ts";
/// `trade`, `book`, `kline` or `control`.
pub const H_KIND: &str = "Aegis-Kind";
/// The epoch of the session whose bus the frame came from.
pub const H_EPOCH: &str = "Aegis-Epoch";
/// The first bus seq the message accounts for (see the module docs).
pub const H_FROM: &str = "Aegis-From";
/// Comma-separated ranks of sources that have no event after this message.
pub const H_ENDED: &str = "Aegis-Ended";
/// The JetStream de-duplication header.
pub const H_MSG_ID: &str = "Nats-Msg-Id";

/// Format version of the manifest; an importer refuses another.
pub const FORMAT: u32 = 1;

/// Subject token of the manifest (no topic can start with `_` and be a valid Aegis topic
/// *and* this exact word: [`check_topic`] refuses the two reserved words).
pub const MANIFEST: &str = "_manifest";
/// Subject token of END-OF-STREAM.
pub const EOS: &str = "_eos";

/// The subjects a stream for `stream` holds.
pub fn stream_subjects(stream: &str) -> String {
    format!("aegis.{stream}.>")
}

/// The subject of a message on `token` (a topic, [`MANIFEST`] or [`EOS`]).
pub fn subject(stream: &str, token: &str) -> String {
    format!("aegis.{stream}.{token}")
}

/// `Nats-Msg-Id` of a frame: the session epoch and the bus seq.
pub fn msg_id(epoch: u64, seq: Seq) -> String {
    format!("{epoch}-{seq}")
}

/// `Nats-Msg-Id` of a session's manifest.
pub fn manifest_msg_id(epoch: u64) -> String {
    format!("{epoch}-manifest")
}

/// Whether `name` may name a JetStream stream here: `[A-Za-z0-9_-]{1,64}` (JetStream forbids
/// `.`, `*`, `>`, spaces and path separators; we keep to the plain set).
pub fn valid_stream_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Refuses a topic that cannot be a subject suffix: an empty token (`a..b`, a leading or
/// trailing dot) or one of the reserved words.
pub fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.split('.').any(str::is_empty) {
        return Err(format!(
            "topic {topic:?} has an empty subject token (a leading, trailing or double dot)"
        ));
    }
    if topic == MANIFEST || topic == EOS {
        return Err(format!(
            "topic {topic:?} is a word the bridge reserves for its own subjects"
        ));
    }
    Ok(())
}

/// One source of the exported session, at its rank.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ManifestSource {
    /// The source's name (the NDJSON `source`).
    pub name: String,
    /// Its declared kind.
    pub kind: SourceKind,
    /// Its topic (the NDJSON `topic`).
    pub topic: String,
}

/// What an importer needs before it can register: the exported session's sources, in rank
/// order, with their kinds and topics.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The exported session's name.
    pub session: String,
    /// Its UUID.
    pub session_id: String,
    /// Its segment epoch (the first half of every `Nats-Msg-Id`).
    pub epoch: u64,
    /// `backtest` or `live`.
    pub mode: String,
    /// Sources by rank (source id).
    pub sources: Vec<ManifestSource>,
}

impl Manifest {
    /// Parses and checks a manifest: format, source names, topics, at most `u16` sources.
    pub fn parse(payload: &[u8]) -> Result<Manifest, String> {
        let m: Manifest =
            serde_json::from_slice(payload).map_err(|e| format!("bad manifest: {e}"))?;
        if m.format != FORMAT {
            return Err(format!(
                "manifest format {} (this aegis-nats reads format {FORMAT})",
                m.format
            ));
        }
        if m.sources.len() > u16::MAX as usize {
            return Err("manifest names too many sources".into());
        }
        for s in &m.sources {
            if !aegis_shm_client::protocol::valid_name(&s.name) {
                return Err(format!("manifest: bad source name {:?}", s.name));
            }
            check_topic(&s.topic).map_err(|e| format!("manifest: {e}"))?;
        }
        Ok(m)
    }

    /// Whether `other` describes the same bus layout (sources, kinds, topics, mode): then a
    /// run of the same backtest may continue a stream this one started.
    pub fn same_layout(&self, other: &Manifest) -> bool {
        self.sources == other.sources && self.mode == other.mode
    }
}

/// The frame bytes of a message: header then payload.
pub fn encode_frame(header: &FrameHeader, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(payload);
    out
}

/// The headers of a frame message, as the importer reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MsgHeaders {
    /// [`H_BUS_SEQ`].
    pub bus_seq: Seq,
    /// [`H_TS`].
    pub ts: u64,
    /// [`H_KIND`].
    pub kind: String,
    /// [`H_EPOCH`].
    pub epoch: u64,
    /// [`H_FROM`].
    pub from: Seq,
    /// [`H_ENDED`].
    pub ended: Vec<u16>,
}

/// Why a message on the stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// A header is missing or not a number.
    #[error("header {0}: {1}")]
    Header(&'static str, String),
    /// The payload is not a frame.
    #[error("payload: {0}")]
    Frame(String),
    /// The frame disagrees with its headers or subject.
    #[error("{0}")]
    Mismatch(String),
    /// The event archive does not validate.
    #[error("event archive does not validate: {0}")]
    Event(String),
}

impl MsgHeaders {
    /// Reads the headers with `get` (header name → value).
    pub fn read<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<MsgHeaders, MessageError> {
        let num = |name: &'static str| -> Result<u64, MessageError> {
            let v = get(name).ok_or_else(|| MessageError::Header(name, "missing".into()))?;
            v.trim()
                .parse::<u64>()
                .map_err(|e| MessageError::Header(name, format!("{v:?}: {e}")))
        };
        let ended = match get(H_ENDED) {
            None => Vec::new(),
            Some(v) if v.trim().is_empty() => Vec::new(),
            Some(v) => v
                .split(',')
                .map(|r| {
                    r.trim()
                        .parse::<u16>()
                        .map_err(|e| MessageError::Header(H_ENDED, format!("{v:?}: {e}")))
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(MsgHeaders {
            bus_seq: num(H_BUS_SEQ)?,
            ts: num(H_TS)?,
            kind: get(H_KIND)
                .ok_or_else(|| MessageError::Header(H_KIND, "missing".into()))?
                .to_string(),
            epoch: num(H_EPOCH)?,
            from: num(H_FROM)?,
            ended,
        })
    }
}

/// A frame taken off the stream and checked: the header, and the payload copied into
/// 16-byte-aligned memory (rkyv reads archives in place, which needs the alignment).
pub struct Frame {
    /// The header as the exporter's bus had it.
    pub header: FrameHeader,
    buf: Vec<u128>,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("header", &self.header)
            .finish()
    }
}

impl Frame {
    /// The payload (the rkyv archive; empty for END-OF-STREAM).
    pub fn payload(&self) -> &[u8] {
        // SAFETY: `buf` holds at least `header.len` initialised bytes (see `check`), and u128
        // has no padding, so its bytes may be viewed as u8.
        let all = unsafe {
            std::slice::from_raw_parts(self.buf.as_ptr() as *const u8, self.buf.len() * 16)
        };
        &all[..self.header.len as usize]
    }

    /// Whether this is the bus's END-OF-STREAM.
    pub fn is_eos(&self) -> bool {
        self.header.kind == Kind::Control as u8 && self.header.has(flags::EOF)
    }

    /// The event, validated (bytecheck).
    pub fn event(&self) -> Result<EventRef<'_>, MessageError> {
        let kind = self.header.kind().unwrap_or(Kind::Control);
        event::decode(kind, self.payload()).map_err(|e| MessageError::Event(e.to_string()))
    }
}

/// Checks one frame message against its headers and the manifest, and returns the frame:
/// the payload is a whole frame, the header validates, bus seq, ts and kind agree with the
/// headers, the source exists and the subject is its topic (or [`EOS`] for END-OF-STREAM),
/// and the event archive validates.
pub fn check(
    manifest: &Manifest,
    token: &str,
    h: &MsgHeaders,
    bytes: &[u8],
) -> Result<Frame, MessageError> {
    if bytes.len() < FRAME_HEADER_LEN {
        return Err(MessageError::Frame(format!(
            "{} bytes, shorter than a frame header ({FRAME_HEADER_LEN})",
            bytes.len()
        )));
    }
    let header = FrameHeader::from_bytes(bytes[..FRAME_HEADER_LEN].try_into().expect("48 bytes"));
    let payload = &bytes[FRAME_HEADER_LEN..];
    if header.len as usize != payload.len() {
        return Err(MessageError::Frame(format!(
            "the frame header says {} payload bytes, the message has {}",
            header.len,
            payload.len()
        )));
    }
    header
        .validate(aegis_shm_client::frame::stride(payload.len()))
        .map_err(|e| MessageError::Frame(e.to_string()))?;
    let kind = header.kind().unwrap_or(Kind::Control);
    let mismatch = |what: &str, frame: String, hdr: String| {
        MessageError::Mismatch(format!("{what}: the frame says {frame}, the headers {hdr}"))
    };
    if header.bus_seq != h.bus_seq {
        return Err(mismatch(
            "bus seq",
            header.bus_seq.to_string(),
            h.bus_seq.to_string(),
        ));
    }
    if header.ts != h.ts {
        return Err(mismatch("ts", header.ts.to_string(), h.ts.to_string()));
    }
    if kind.name() != h.kind {
        return Err(mismatch("kind", kind.name().into(), h.kind.clone()));
    }
    if h.from > h.bus_seq {
        return Err(MessageError::Mismatch(format!(
            "{H_FROM} {} is after the bus seq {}",
            h.from, h.bus_seq
        )));
    }
    for &r in &h.ended {
        if r as usize >= manifest.sources.len() {
            return Err(MessageError::Mismatch(format!(
                "{H_ENDED} names source {r}; the manifest has {}",
                manifest.sources.len()
            )));
        }
    }
    if kind == Kind::Control {
        if !header.has(flags::EOF) || token != EOS {
            return Err(MessageError::Mismatch(format!(
                "a control frame (flags {:#04x}) on subject token {token:?}: only END-OF-STREAM travels, on {EOS:?}",
                header.flags
            )));
        }
    } else {
        let src = manifest
            .sources
            .get(header.source_id as usize)
            .ok_or_else(|| {
                MessageError::Mismatch(format!(
                    "source id {} is not in the manifest ({} sources)",
                    header.source_id,
                    manifest.sources.len()
                ))
            })?;
        if Kind::from(src.kind) != kind {
            return Err(MessageError::Mismatch(format!(
                "a {} frame from source {}, declared {}",
                kind.name(),
                src.name,
                Kind::from(src.kind).name()
            )));
        }
        if src.topic != token {
            return Err(MessageError::Mismatch(format!(
                "subject topic {token:?}, but source {} publishes {:?}",
                src.name, src.topic
            )));
        }
    }
    let mut buf = vec![0u128; payload.len().div_ceil(16)];
    // SAFETY: `buf` has room for `payload.len()` bytes (rounded up to whole u128s) and does
    // not overlap `payload`.
    unsafe {
        std::ptr::copy_nonoverlapping(payload.as_ptr(), buf.as_mut_ptr() as *mut u8, payload.len())
    };
    let frame = Frame { header, buf };
    if kind != Kind::Control {
        frame.event()?;
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aegis_shm_client::event::{Decimal, Symbol, Trade};

    fn manifest() -> Manifest {
        Manifest {
            format: FORMAT,
            session: "day1".into(),
            session_id: "x".into(),
            epoch: 7,
            mode: "backtest".into(),
            sources: vec![ManifestSource {
                name: "t".into(),
                kind: SourceKind::Trade,
                topic: "trades.BTCUSDT".into(),
            }],
        }
    }

    fn trade_frame(seq: Seq) -> (FrameHeader, Vec<u8>) {
        let t = Trade {
            symbol: Symbol::new("BTCUSDT").unwrap(),
            id: 1,
            price: Decimal::parse("1.5").unwrap(),
            qty: Decimal::parse("2").unwrap(),
            buyer_maker: true,
        };
        let mut buf = vec![0u8; 256];
        let n = event::encode_into(&t, &mut buf).unwrap();
        buf.truncate(n);
        let mut h = FrameHeader::event(Kind::Trade, 1_000, 0, n);
        h.bus_seq = seq;
        (h, buf)
    }

    fn headers(seq: Seq) -> MsgHeaders {
        MsgHeaders {
            bus_seq: seq,
            ts: 1_000,
            kind: "trade".into(),
            epoch: 7,
            from: seq,
            ended: vec![],
        }
    }

    #[test]
    fn a_good_frame_passes_and_keeps_its_event() {
        let (h, p) = trade_frame(3);
        let f = check(
            &manifest(),
            "trades.BTCUSDT",
            &headers(3),
            &encode_frame(&h, &p),
        )
        .unwrap();
        assert_eq!(f.header, h);
        match f.event().unwrap() {
            EventRef::Trade(t) => assert_eq!(t.price.to_string(), "1.5"),
            _ => panic!("not a trade"),
        }
    }

    #[test]
    fn garbage_is_refused_with_the_reason() {
        let m = manifest();
        let (h, p) = trade_frame(3);
        let bytes = encode_frame(&h, &p);
        let e = check(&m, "trades.BTCUSDT", &headers(3), b"hello").unwrap_err();
        assert!(e.to_string().contains("shorter than a frame header"), "{e}");
        let e = check(&m, "trades.BTCUSDT", &headers(4), &bytes).unwrap_err();
        assert!(e.to_string().contains("bus seq"), "{e}");
        let e = check(&m, "book.BTCUSDT", &headers(3), &bytes).unwrap_err();
        assert!(e.to_string().contains("subject topic"), "{e}");
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[FRAME_HEADER_LEN..n].fill(0xff);
        let e = check(&m, "trades.BTCUSDT", &headers(3), &bad).unwrap_err();
        assert!(matches!(e, MessageError::Event(_)), "{e}");
        let e = check(&m, "trades.BTCUSDT", &headers(3), &bytes[..n - 1]).unwrap_err();
        assert!(e.to_string().contains("payload bytes"), "{e}");
    }

    #[test]
    fn headers_parse_and_refuse() {
        let get = |k: &str| match k {
            H_BUS_SEQ => Some("5"),
            H_TS => Some("9"),
            H_KIND => Some("trade"),
            H_EPOCH => Some("7"),
            H_FROM => Some("5"),
            H_ENDED => Some("0,2"),
            _ => None,
        };
        let h = MsgHeaders::read(get).unwrap();
        assert_eq!(h.ended, vec![0, 2]);
        let e = MsgHeaders::read(|k| if k == H_BUS_SEQ { Some("x") } else { get(k) }).unwrap_err();
        assert!(e.to_string().contains(H_BUS_SEQ), "{e}");
    }

    #[test]
    fn topics_that_are_no_subject_are_refused() {
        assert!(check_topic("klines.BTCUSDT.1m").is_ok());
        assert!(check_topic("a..b").is_err());
        assert!(check_topic(".a").is_err());
        assert!(check_topic(MANIFEST).is_err());
        assert!(valid_stream_name("aegis-day1_x"));
        assert!(!valid_stream_name("a.b"));
    }
}
