//! The stream digest of `aegis-tap --format digest` and the event counts of `--format count`.
//!
//! [`StreamDigest`] is a SHA-256 over, for each frame fed to it, in order:
//!
//! ```text
//! FrameHeader::to_bytes() with publish_ns set to 0  (48 bytes)
//! payload                                            (header.len bytes, no padding)
//! ```
//!
//! `publish_ns` is the producer's latency stamp, the only field that depends on timing; every
//! other field (length, kind, flags, source id, topic id, ts, source seq, bus seq) is part of
//! the stream's identity. The payload length is in the header, so the concatenation is
//! unambiguous. Two identical streams therefore give the same hex digest, whatever the speed
//! or the scheduling of the run. Which frames to feed is the caller's choice; `aegis-tap`
//! feeds the event frames it receives (not padding, heartbeats or the end-of-stream frame).
//!
//! [`Counts`] tallies events per kind and per topic name, and renders them for people or as
//! JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use aegis_shm_client::frame::{flags, FrameHeader, Kind};
use sha2::{Digest as _, Sha256};

use crate::ndjson::write_json_str;

/// The header bytes that enter the digest: [`FrameHeader::to_bytes`] with `publish_ns` zeroed.
pub fn canonical_header(header: &FrameHeader) -> [u8; 48] {
    FrameHeader {
        publish_ns: 0,
        ..*header
    }
    .to_bytes()
}

/// A running digest over a stream of frames (see the module docs).
#[derive(Clone, Default)]
pub struct StreamDigest {
    hasher: Sha256,
    frames: u64,
}

impl StreamDigest {
    /// An empty digest.
    pub fn new() -> StreamDigest {
        StreamDigest::default()
    }

    /// Adds one frame. `payload` is the frame's payload (`header.len` bytes).
    pub fn update(&mut self, header: &FrameHeader, payload: &[u8]) {
        self.hasher.update(canonical_header(header));
        self.hasher.update(payload);
        self.frames += 1;
    }

    /// Frames added so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// The digest as 64 lowercase hex digits.
    pub fn finish(self) -> String {
        let mut hex = String::with_capacity(64);
        for b in self.hasher.finalize() {
            let _ = write!(hex, "{b:02x}");
        }
        hex
    }
}

/// Events per kind and per topic (`aegis-tap --format count`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// All events.
    pub events: u64,
    /// Trade events.
    pub trades: u64,
    /// Book events.
    pub books: u64,
    /// Kline events.
    pub klines: u64,
    /// Custom (application) events.
    pub customs: u64,
    /// Events flagged LATE (live mode).
    pub late: u64,
    /// Events per topic name.
    pub topics: BTreeMap<String, u64>,
    /// Events per topic id, counted by [`Counts::add_by_id`] until [`Counts::name_topics`]
    /// moves them into `topics` (a map lookup by name per event was a tenth of a tap's time).
    by_id: Vec<u64>,
}

/// Topic ids counted in a vector by [`Counts::add_by_id`]; larger ones are counted by name.
const MAX_TOPIC_ID: u32 = 1024;

impl Counts {
    /// No events.
    pub fn new() -> Counts {
        Counts::default()
    }

    /// The per-kind and LATE counts of an event frame.
    #[inline]
    fn add_kind(&mut self, header: &FrameHeader) {
        match header.kind() {
            Some(Kind::Trade) => self.trades += 1,
            Some(Kind::Book) => self.books += 1,
            Some(Kind::Custom) => self.customs += 1,
            _ => self.klines += 1,
        }
        self.events += 1;
        if header.has(flags::LATE) {
            self.late += 1;
        }
    }

    /// Counts one frame under `topic`. Control frames (padding, heartbeats, end of stream)
    /// are not events and are ignored.
    pub fn add(&mut self, header: &FrameHeader, topic: &str) {
        if header.kind().is_none_or(|k| k == Kind::Control) {
            return;
        }
        self.add_kind(header);
        match self.topics.get_mut(topic) {
            Some(n) => *n += 1,
            None => {
                self.topics.insert(topic.to_string(), 1);
            }
        }
    }

    /// Like [`Counts::add`], keyed by the frame's topic id: call [`Counts::name_topics`]
    /// before rendering. `unknown` names an id beyond `MAX_TOPIC_ID` (1024).
    #[inline]
    pub fn add_by_id(&mut self, header: &FrameHeader, unknown: &str) {
        let id = header.topic_id;
        if id >= MAX_TOPIC_ID {
            return self.add(header, unknown);
        }
        if header.kind().is_none_or(|k| k == Kind::Control) {
            return;
        }
        let i = id as usize;
        if i >= self.by_id.len() {
            self.by_id.resize(i + 1, 0);
        }
        self.by_id[i] += 1;
        self.add_kind(header);
    }

    /// Moves the counts of [`Counts::add_by_id`] under their topic names.
    pub fn name_topics(&mut self, name: impl Fn(u32) -> String) {
        for (id, n) in std::mem::take(&mut self.by_id).into_iter().enumerate() {
            if n > 0 {
                *self.topics.entry(name(id as u32)).or_insert(0) += n;
            }
        }
    }

    /// A table for people, ending with a newline:
    ///
    /// ```text
    /// events   2184
    ///   trade      0
    ///   book       0
    ///   kline   2184
    ///   custom     0
    ///   late       0
    /// topics
    ///   klines.BTCUSDT.1h   744
    ///   klines.BTCUSDT.1m  1440
    /// ```
    pub fn render_human(&self) -> String {
        let rows = [
            ("trade", self.trades),
            ("book", self.books),
            ("kline", self.klines),
            ("custom", self.customs),
            ("late", self.late),
        ];
        let num_w = self.events.to_string().len();
        let mut s = String::new();
        let _ = writeln!(s, "events   {:>num_w$}", self.events);
        for (name, n) in rows {
            let _ = writeln!(s, "  {name:<6} {n:>num_w$}");
        }
        s.push_str("topics\n");
        let name_w = self.topics.keys().map(String::len).max().unwrap_or(0);
        let count_w = self
            .topics
            .values()
            .map(|n| n.to_string().len())
            .max()
            .unwrap_or(0);
        for (topic, n) in &self.topics {
            let _ = writeln!(s, "  {topic:<name_w$}  {n:>count_w$}");
        }
        s
    }

    /// One line of JSON (no newline):
    /// `{"events":2184,"kinds":{"trade":0,"book":0,"kline":2184,"custom":0},"late":0,"topics":{"klines.BTCUSDT.1h":744,"klines.BTCUSDT.1m":1440}}`
    /// (topics sorted by name).
    pub fn render_json(&self) -> String {
        let mut out = Vec::new();
        let _ = write_json(&mut out, self);
        String::from_utf8(out).unwrap_or_default()
    }
}

fn write_json(out: &mut Vec<u8>, c: &Counts) -> std::io::Result<()> {
    use std::io::Write;
    write!(
        out,
        "{{\"events\":{},\"kinds\":{{\"trade\":{},\"book\":{},\"kline\":{},\"custom\":{}}},\"late\":{},\"topics\":{{",
        c.events, c.trades, c.books, c.klines, c.customs, c.late
    )?;
    for (i, (topic, n)) in c.topics.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_str(out, topic)?;
        write!(out, ":{n}")?;
    }
    out.extend_from_slice(b"}}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{convert_csv, JournalReader};
    use crate::names::FileKind;
    use crate::test_util::{data, TempPath};

    fn digest_of(path: &std::path::Path, stamp: impl Fn(u64) -> u64) -> String {
        let rd = JournalReader::open(path).unwrap();
        let mut d = StreamDigest::new();
        for f in rd.frames() {
            let f = f.unwrap();
            let mut h = f.header;
            h.publish_ns = stamp(f.index);
            d.update(&h, f.payload);
        }
        assert_eq!(d.frames(), rd.frame_count());
        d.finish()
    }

    #[test]
    fn identical_streams_give_identical_digests_whatever_the_timing() {
        let a = TempPath::new("a.jnl");
        let b = TempPath::new("b.jnl");
        let input = data("BTCUSDT-1m-2024-09-21.csv");
        convert_csv(&input, a.path(), FileKind::Kline, "BTCUSDT", Some("1m"), 0).unwrap();
        convert_csv(&input, b.path(), FileKind::Kline, "BTCUSDT", Some("1m"), 0).unwrap();
        let da = digest_of(a.path(), |_| 0);
        assert_eq!(da.len(), 64);
        assert!(da
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(da, digest_of(b.path(), |i| i * 7919 + 12345));

        // A different topic id is a different stream.
        let c = TempPath::new("c.jnl");
        convert_csv(&input, c.path(), FileKind::Kline, "BTCUSDT", Some("1m"), 1).unwrap();
        assert_ne!(da, digest_of(c.path(), |_| 0));
    }

    #[test]
    fn every_field_but_publish_ns_counts() {
        let base = FrameHeader::event(Kind::Trade, 5, 1, 4);
        let payload = [1u8, 2, 3, 4];
        let d = |h: &FrameHeader, p: &[u8]| {
            let mut d = StreamDigest::new();
            d.update(h, p);
            d.finish()
        };
        let reference = d(&base, &payload);
        let variants = [
            FrameHeader { ts: 6, ..base },
            FrameHeader { bus_seq: 1, ..base },
            FrameHeader {
                source_seq: 1,
                ..base
            },
            FrameHeader {
                source_id: 1,
                ..base
            },
            FrameHeader {
                topic_id: 2,
                ..base
            },
            FrameHeader {
                flags: flags::LATE,
                ..base
            },
        ];
        for h in &variants {
            assert_ne!(d(h, &payload), reference, "{h:?}");
        }
        assert_ne!(d(&base, &[1, 2, 3, 5]), reference);
        assert_eq!(
            d(
                &FrameHeader {
                    publish_ns: 99,
                    ..base
                },
                &payload
            ),
            reference
        );
        // The empty stream has the SHA-256 of nothing.
        assert_eq!(
            StreamDigest::new().finish(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn custom_events_are_digested_by_type_and_bytes() {
        use aegis_shm_client::event::{encode_into, Custom, Event};
        #[repr(C, align(16))]
        struct Buf([u8; 512]);
        let digest = |ev: &Custom| {
            let mut buf = Buf([0; 512]);
            let n = encode_into(ev, &mut buf.0).unwrap();
            let mut d = StreamDigest::new();
            d.update(&FrameHeader::event(Kind::Trade, 5, 1, 64), &[7; 64]);
            d.update(&FrameHeader::event(Custom::KIND, 5, 2, n), &buf.0[..n]);
            d.finish()
        };
        let signal = digest(&Custom::new("signal", b"buy").unwrap());
        assert_eq!(signal, digest(&Custom::new("signal", b"buy").unwrap()));
        assert_ne!(signal, digest(&Custom::new("signal", b"sell").unwrap()));
        assert_ne!(signal, digest(&Custom::new("signal", b"buy\0").unwrap()));
        assert_ne!(signal, digest(&Custom::new("order", b"buy").unwrap()));
        let mut c = Counts::new();
        c.add(
            &FrameHeader::event(Kind::Custom, 5, 2, 290),
            "custom.signal",
        );
        assert_eq!((c.events, c.customs, c.klines), (1, 1, 0));
    }

    #[test]
    fn counts_render_for_people_and_as_json() {
        let mut c = Counts::new();
        let k = FrameHeader::event(Kind::Kline, 1, 0, 8);
        for _ in 0..1440 {
            c.add(&k, "klines.BTCUSDT.1m");
        }
        for _ in 0..744 {
            c.add(&k, "klines.BTCUSDT.1h");
        }
        let mut late = FrameHeader::event(Kind::Trade, 1, 0, 8);
        late.flags = flags::LATE;
        c.add(&late, "trades.BTCUSDT");
        c.add(&FrameHeader::event(Kind::Book, 1, 0, 8), "book.BTCUSDT");
        let eof = FrameHeader {
            flags: flags::EOF,
            ..FrameHeader::default()
        };
        c.add(&eof, "ignored");
        assert_eq!(
            (c.events, c.klines, c.trades, c.books, c.late),
            (2186, 2184, 1, 1, 1)
        );

        let json = c.render_json();
        assert_eq!(
            json,
            concat!(
                r#"{"events":2186,"kinds":{"trade":1,"book":1,"kline":2184,"custom":0},"late":1,"#,
                r#""topics":{"book.BTCUSDT":1,"klines.BTCUSDT.1h":744,"klines.BTCUSDT.1m":1440,"trades.BTCUSDT":1}}"#
            )
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["topics"]["klines.BTCUSDT.1m"], 1440);

        let human = c.render_human();
        assert_eq!(
            human,
            "events   2186\n  trade     1\n  book      1\n  kline  2184\n  custom    0\n  late      1\ntopics\n  \
             book.BTCUSDT          1\n  klines.BTCUSDT.1h   744\n  klines.BTCUSDT.1m  1440\n  \
             trades.BTCUSDT        1\n"
        );
        assert_eq!(
            Counts::new().render_json(),
            r#"{"events":0,"kinds":{"trade":0,"book":0,"kline":0,"custom":0},"late":0,"topics":{}}"#
        );
        assert!(Counts::new().render_human().starts_with("events   0\n"));
    }

    #[test]
    fn counting_by_topic_id_equals_counting_by_name() {
        let ev = |kind: Kind, topic_id: u32, fl: u8| FrameHeader {
            kind: kind as u8,
            flags: fl,
            topic_id,
            len: 64,
            ..FrameHeader::default()
        };
        let frames = [
            ev(Kind::Trade, 0, 0),
            ev(Kind::Book, 1, flags::LATE),
            ev(Kind::Trade, 0, 0),
            ev(Kind::Kline, 5000, 0),
            ev(Kind::Control, 0, flags::EOF),
        ];
        let name = |id: u32| format!("topic-{id}");
        let (mut by_name, mut by_id) = (Counts::new(), Counts::new());
        for h in &frames {
            by_name.add(h, &name(h.topic_id));
            by_id.add_by_id(h, "topic-5000");
        }
        by_id.name_topics(name);
        assert_eq!(by_id.render_json(), by_name.render_json());
        assert_eq!(by_id.events, 4);
        assert_eq!(by_id.late, 1);
    }
}
