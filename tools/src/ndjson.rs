//! The NDJSON line format of `aegis-tap --format ndjson` (SPEC section 7): one JSON object per
//! event, in bus order, no spaces, fields in this order:
//!
//! - kline: `seq, ts, kind, source, topic, symbol, interval, open_time, close_time, open,
//!   high, low, close, volume, quote_volume, trades, taker_buy_base, taker_buy_quote`
//! - trade: `seq, ts, kind, source, topic, symbol, id, price, qty, buyer_maker`
//! - book: `seq, ts, kind, source, topic, symbol, update_id, bid_price, bid_qty, ask_price,
//!   ask_qty`
//! - custom (an application's event, SPEC section 13): `seq, ts, kind, source, topic, type,
//!   bytes`, where `topic` is `custom.<type>` and `bytes` is the event's bytes as lowercase
//!   hex, two digits per byte (`""` when there are none)
//!
//! Integers (sequence numbers, ids, counts, times in nanoseconds) are bare JSON numbers;
//! prices and quantities are JSON strings holding the exact decimal, normalised (trailing
//! zeros dropped: `"63186"` for `63186.00000000`); `buyer_maker` is a JSON boolean.
//!
//! **Extension:** in live mode an event the sequencer flagged LATE (older than one already
//! emitted) carries `"late":true` right after `"topic"`. The field is absent otherwise, so
//! backtest output is exactly the SPEC format.
//!
//! ```text
//! {"seq":0,"ts":1726876859999000000,"kind":"kline","source":"BTCUSDT-1m-2024-09-21","topic":"klines.BTCUSDT.1m","symbol":"BTCUSDT","interval":"1m",...}
//! {"seq":7,"ts":1704067200000000000,"kind":"trade","source":"t","topic":"trades.BTCUSDT","late":true,"symbol":"BTCUSDT","id":1,...}
//! ```

use std::io::{self, Write};

use aegis_shm_client::event::EventRef;
use aegis_shm_client::frame::{flags, FrameHeader};

/// Writes `s` as a JSON string, quotes included, escaping `"`, `\` and control characters.
pub fn write_json_str(out: &mut impl Write, s: &str) -> io::Result<()> {
    out.write_all(b"\"")?;
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => b"",
            _ => continue,
        };
        out.write_all(&bytes[start..i])?;
        if esc.is_empty() {
            write!(out, "\\u{b:04x}")?;
        } else {
            out.write_all(esc)?;
        }
        start = i + 1;
    }
    out.write_all(&bytes[start..])?;
    out.write_all(b"\"")
}

/// Writes one NDJSON line (with its `\n`) for an event read from the bus: `seq` is the bus
/// sequence number to show, `header` the frame's header (for `ts` and the LATE flag),
/// `source` and `topic` the names behind the frame's source and topic ids. Pass a buffered
/// writer: the line is written in many small pieces.
pub fn write_line(
    out: &mut impl Write,
    seq: u64,
    header: &FrameHeader,
    source: &str,
    topic: &str,
    ev: EventRef,
) -> io::Result<()> {
    let kind = match ev {
        EventRef::Trade(_) => "trade",
        EventRef::Book(_) => "book",
        EventRef::Kline(_) => "kline",
        EventRef::Custom(_) => "custom",
    };
    write!(
        out,
        "{{\"seq\":{seq},\"ts\":{},\"kind\":\"{kind}\",\"source\":",
        header.ts
    )?;
    write_json_str(out, source)?;
    out.write_all(b",\"topic\":")?;
    write_json_str(out, topic)?;
    if header.has(flags::LATE) {
        out.write_all(b",\"late\":true")?;
    }
    match ev {
        EventRef::Kline(k) => {
            out.write_all(b",\"symbol\":")?;
            write_json_str(out, k.symbol.as_str())?;
            out.write_all(b",\"interval\":")?;
            write_json_str(out, k.interval.as_str())?;
            writeln!(
                out,
                ",\"open_time\":{},\"close_time\":{},\"open\":\"{}\",\"high\":\"{}\",\
                 \"low\":\"{}\",\"close\":\"{}\",\"volume\":\"{}\",\"quote_volume\":\"{}\",\
                 \"trades\":{},\"taker_buy_base\":\"{}\",\"taker_buy_quote\":\"{}\"}}",
                k.open_time.to_native(),
                k.close_time.to_native(),
                k.open,
                k.high,
                k.low,
                k.close,
                k.volume,
                k.quote_volume,
                k.trades.to_native(),
                k.taker_buy_base,
                k.taker_buy_quote,
            )
        }
        EventRef::Trade(t) => {
            out.write_all(b",\"symbol\":")?;
            write_json_str(out, t.symbol.as_str())?;
            writeln!(
                out,
                ",\"id\":{},\"price\":\"{}\",\"qty\":\"{}\",\"buyer_maker\":{}}}",
                t.id.to_native(),
                t.price,
                t.qty,
                t.buyer_maker,
            )
        }
        EventRef::Book(b) => {
            out.write_all(b",\"symbol\":")?;
            write_json_str(out, b.symbol.as_str())?;
            writeln!(
                out,
                ",\"update_id\":{},\"bid_price\":\"{}\",\"bid_qty\":\"{}\",\
                 \"ask_price\":\"{}\",\"ask_qty\":\"{}\"}}",
                b.update_id.to_native(),
                b.bid_price,
                b.bid_qty,
                b.ask_price,
                b.ask_qty,
            )
        }
        EventRef::Custom(c) => {
            out.write_all(b",\"type\":")?;
            write_json_str(out, c.type_name())?;
            out.write_all(b",\"bytes\":\"")?;
            write_hex(out, c.bytes())?;
            out.write_all(b"\"}\n")
        }
    }
}

/// Writes `bytes` as lowercase hex, two digits per byte.
pub fn write_hex(out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 128];
    for chunk in bytes.chunks(buf.len() / 2) {
        for (i, b) in chunk.iter().enumerate() {
            buf[2 * i] = DIGITS[(b >> 4) as usize];
            buf[2 * i + 1] = DIGITS[(b & 15) as usize];
        }
        out.write_all(&buf[..2 * chunk.len()])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csv::CsvReader;
    use crate::names::{infer, FileKind};
    use crate::test_util::data;
    use aegis_shm_client::event::{decode, AnyEvent};
    use aegis_shm_client::frame::Kind;

    /// Encodes `ev` into an aligned buffer and renders its line.
    fn line(seq: u64, ts: u64, flags: u8, source: &str, topic: &str, ev: &AnyEvent) -> String {
        #[repr(C, align(16))]
        struct Buf([u8; 512]);
        let mut buf = Buf([0; 512]);
        let n = ev.encode_into(&mut buf.0).unwrap();
        let mut h = FrameHeader::event(ev.kind(), ts, 0, n);
        h.flags = flags;
        let mut out = Vec::new();
        let ev = decode(ev.kind(), &buf.0[..n]).unwrap();
        write_line(&mut out, seq, &h, source, topic, ev).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn first_event(kind: FileKind, text: &str) -> (u64, AnyEvent) {
        CsvReader::new(text.as_bytes(), kind, "BTCUSDT", None)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
    }

    #[test]
    fn first_kline_of_the_sample_is_the_spec_example() {
        let path = data("BTCUSDT-1m-2024-09-21.csv");
        let info = infer(&path).unwrap();
        let (ts, ev) = CsvReader::open(&path, &info)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let got = line(0, ts, 0, "BTCUSDT-1m-2024-09-21", &info.topic(), &ev);
        // SPEC section 7, verbatim (joined: the SPEC wraps it over several lines).
        let want = concat!(
            r#"{"seq":0,"ts":1726876859999000000,"kind":"kline","source":"BTCUSDT-1m-2024-09-21","topic":"klines.BTCUSDT.1m","#,
            r#""symbol":"BTCUSDT","interval":"1m","open_time":1726876800000000000,"close_time":1726876859999000000,"#,
            r#""open":"63201.05","high":"63201.06","low":"63186","close":"63196","volume":"10.91101","quote_volume":"689505.8262087","#,
            r#""trades":2464,"taker_buy_base":"6.94903","taker_buy_quote":"439120.7714139"}"#,
            "\n"
        );
        assert_eq!(got, want);
        let v: serde_json::Value = serde_json::from_str(&got).unwrap();
        assert_eq!(v["close_time"], 1_726_876_859_999_000_000u64);
    }

    #[test]
    fn custom_lines_carry_type_and_hex_bytes() {
        use aegis_shm_client::event::{Custom, MAX_CUSTOM_BYTES};
        let ev = AnyEvent::Custom(Custom::new("signal", b"BTCUSDT buy\x00\xff").unwrap());
        assert_eq!(
            line(3, 7, flags::LATE, "A-signals", "custom.signal", &ev),
            concat!(
                r#"{"seq":3,"ts":7,"kind":"custom","source":"A-signals","topic":"custom.signal","late":true,"#,
                r#""type":"signal","bytes":"425443555344542062757900ff"}"#,
                "\n"
            )
        );
        let empty = AnyEvent::Custom(Custom::new("fill", b"").unwrap());
        assert!(line(0, 1, 0, "s", "custom.fill", &empty).ends_with(
            r#""type":"fill","bytes":""}
"#
        ));
        // The largest event, over several chunks of the writer's buffer.
        let big: Vec<u8> = (0..MAX_CUSTOM_BYTES).map(|i| (i * 7) as u8).collect();
        let mut hex = Vec::new();
        write_hex(&mut hex, &big).unwrap();
        let want: String = big.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(String::from_utf8(hex).unwrap(), want);
    }

    #[test]
    fn trade_and_book_lines() {
        let (ts, ev) = first_event(
            FileKind::Trade,
            "123,63201.05000000,0.00100000,63.20105,1704067200000,True,True\n",
        );
        assert_eq!(
            line(1, ts, 0, "BTCUSDT-trades-2024-01-01", "trades.BTCUSDT", &ev),
            concat!(
                r#"{"seq":1,"ts":1704067200000000000,"kind":"trade","source":"BTCUSDT-trades-2024-01-01","#,
                r#""topic":"trades.BTCUSDT","symbol":"BTCUSDT","id":123,"price":"63201.05","qty":"0.001","buyer_maker":true}"#,
                "\n"
            )
        );
        let (ts, ev) = first_event(
            FileKind::BookTicker,
            "9,63201.05,1.50000000,63201.06,0.00000001,1704067200005,1704067200007\n",
        );
        assert_eq!(
            line(2, ts, 0, "b", "book.BTCUSDT", &ev),
            concat!(
                r#"{"seq":2,"ts":1704067200005000000,"kind":"book","source":"b","topic":"book.BTCUSDT","#,
                r#""symbol":"BTCUSDT","update_id":9,"bid_price":"63201.05","bid_qty":"1.5","ask_price":"63201.06","ask_qty":"0.00000001"}"#,
                "\n"
            )
        );
    }

    #[test]
    fn late_events_say_so_right_after_the_topic() {
        let (ts, ev) = first_event(FileKind::Trade, "1,2,3,6,1704067200000,false\n");
        let got = line(7, ts, flags::LATE, "s", "trades.BTCUSDT", &ev);
        assert!(
            got.starts_with(
                r#"{"seq":7,"ts":1704067200000000000,"kind":"trade","source":"s","topic":"trades.BTCUSDT","late":true,"symbol":"BTCUSDT","id":1,"#
            ),
            "{got}"
        );
        let v: serde_json::Value = serde_json::from_str(&got).unwrap();
        assert_eq!(v["late"], true);
        assert_eq!(v["buyer_maker"], false);
        assert!(!line(7, ts, 0, "s", "t", &ev).contains("late"));
        assert_eq!(ev.kind(), Kind::Trade);
    }

    #[test]
    fn strings_are_escaped() {
        let (ts, ev) = first_event(FileKind::Trade, "1,2,3,6,1704067200000,false\n");
        let nasty = "a\"b\\c\nd\u{1}e\u{7f}é";
        let got = line(0, ts, 0, nasty, nasty, &ev);
        let v: serde_json::Value = serde_json::from_str(&got).unwrap();
        assert_eq!(v["source"], nasty);
        assert_eq!(v["topic"], nasty);
        assert_eq!(got.lines().count(), 1);
        let mut out = Vec::new();
        write_json_str(&mut out, "plain").unwrap();
        assert_eq!(out, b"\"plain\"");
    }

    #[test]
    fn every_line_of_both_samples_is_valid_json_in_spec_order() {
        for name in ["BTCUSDT-1m-2024-09-21.csv", "BTCUSDT-1h-2024-08.csv"] {
            let path = data(name);
            let info = infer(&path).unwrap();
            let source = crate::names::default_source_name(&path).unwrap();
            for (seq, item) in CsvReader::open(&path, &info).unwrap().enumerate() {
                let (ts, ev) = item.unwrap();
                let got = line(seq as u64, ts, 0, &source, &info.topic(), &ev);
                let v: serde_json::Value = serde_json::from_str(&got).unwrap();
                let AnyEvent::Kline(k) = ev else { panic!() };
                assert_eq!(v["seq"], seq as u64);
                assert_eq!(v["ts"], k.close_time);
                assert_eq!(v["quote_volume"], k.quote_volume.to_string());
                assert!(!got.contains(' '));
            }
        }
    }
}
