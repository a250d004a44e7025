//! Application events (SPEC section 13, issue 13): a component publishes `custom` events as a
//! source of the merged stream. Real daemon, real processes, real `/dev/shm`:
//!
//! - the `signals` example (role both) publishes a signal for every 10th trade of a live
//!   session; two taps (B: NDJSON, C: counts) receive every one of them, and the publisher
//!   receives none of its own, unless it opts in;
//! - the live session is recorded; replaying the recording into a backtest gives the same tap
//!   digest and NDJSON, custom events included, and the custom events change the digest;
//! - on equal ts a custom event sorts after a kline (the merge key);
//! - a bad type name is refused with a clear error, by the client and by the daemon.

mod common;

use std::path::{Path, PathBuf};

use aegis::sequencer::merge_key;
use aegis_shm_client::client::{ClientError, Component};
use aegis_shm_client::event::{Custom, CustomError, TYPE_NAME_LEN};
use aegis_shm_client::protocol::{ErrorCode, Register, Role, SourceDecl, SourceKind};
use aegis_shm_client::Kind;
use common::*;
use serde_json::Value;

/// Trades in the feed, and a signal for every `EVERY`th (ids 0, 10, 20, ...).
const TRADES: u64 = 3000;
const EVERY: u64 = 10;
const SIGNALS: u64 = TRADES / EVERY;

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The hex of `text`'s bytes, as the NDJSON shows a custom event's bytes.
fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The JSON line the `signals` example printed for component `name`.
fn signals_summary(r: &RunOutput, name: &str) -> Value {
    r.stdout_head
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["component"] == name)
        .unwrap_or_else(|| panic!("no summary of {name} in {:?}", r.stdout_head))
}

/// Bus big enough that nothing is lapped; lateness long enough that the merge waits for the
/// signals source rather than flagging everything LATE.
const LIVE: [&str; 4] = ["--bus-bytes", "16777216", "--max-lateness-us", "200000"];

/// `tap --name NAME --format FORMAT [--topics T] --out FILE`, and the file.
fn tap(h: &Harness, b: &Bins, name: &str, format: &str, topics: Option<&str>) -> (String, PathBuf) {
    let out = h.dir.join(format!("{name}.{format}"));
    let topics = topics.map_or(String::new(), |t| format!("--topics {t}"));
    let cmd = format!(
        "exec {} --name {name} --format {format} --json {topics} --out {}",
        q(&b.tap),
        q(&out)
    );
    (cmd, out)
}

#[test]
fn custom_events_reach_other_consumers_not_their_publisher_and_replay_from_a_recording() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("custom-live");
    let csv = trades_csv(&h.dir, TRADES);
    let rec = h.dir.join("rec");
    let socket = h.start_daemon(&b);
    let (tap_b, nd_b) = tap(&h, &b, "B", "ndjson", None);
    let (tap_c, count_c) = tap(&h, &b, "C", "count", None);
    let (tap_d, digest_d) = tap(&h, &b, "D", "digest", None);
    let commands = [
        format!("exec {} {}", q(&b.replay), q(&csv)),
        format!("exec {} A {EVERY}", q(&example(&b, "signals"))),
        tap_b,
        tap_c,
        tap_d,
    ];
    let mut extra = LIVE.to_vec();
    extra.extend(["--record", rec.to_str().unwrap()]);
    let r = session_run(
        &mut h,
        &b,
        &socket,
        "custom-live",
        "live",
        &extra,
        &commands,
    );
    assert_run_ok(&h, &r, (TRADES + SIGNALS) as usize);

    // A published a signal per 10th trade, saw every trade, and none of its own signals.
    let a = signals_summary(&r, "A");
    assert_eq!(a["published"], SIGNALS, "{a}");
    assert_eq!(a["received"]["trade"], TRADES, "{a}");
    assert_eq!(a["received"]["custom"], 0, "A received its own events: {a}");
    assert_eq!(a["own"], 0, "{a}");

    // B saw every signal, each right after its trade's ts slot, with its type and bytes.
    let text = read(&nd_b);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("an NDJSON line"))
        .collect();
    assert_eq!(lines.len() as u64, TRADES + SIGNALS);
    let customs: Vec<&Value> = lines.iter().filter(|v| v["kind"] == "custom").collect();
    assert_eq!(customs.len() as u64, SIGNALS);
    let mut ids: Vec<u64> = Vec::new();
    for v in &customs {
        assert_eq!(v["topic"], "custom.signal", "{v}");
        assert_eq!(v["type"], "signal", "{v}");
        assert_eq!(v["source"], "A-signals", "{v}");
        let id = v["ts"].as_u64().unwrap() / 1_000_000 - 1_726_876_800_000;
        assert_eq!(v["bytes"], hex(&format!("BTCUSDT {id}")), "{v}");
        ids.push(id);
    }
    ids.sort_unstable();
    assert_eq!(ids, (0..TRADES).step_by(EVERY as usize).collect::<Vec<_>>());
    // The field order of the contract: seq, ts, kind, source, topic, type, bytes.
    let raw = text.lines().find(|l| l.contains("\"custom\"")).unwrap();
    let keys: Vec<&str> = raw
        .split(['{', ',', '}'])
        .filter_map(|f| f.split_once(':').map(|(k, _)| k.trim_matches('"')))
        .collect();
    let late = keys.contains(&"late");
    let mut want = vec!["seq", "ts", "kind", "source", "topic"];
    if late {
        want.push("late");
    }
    want.extend(["type", "bytes"]);
    assert_eq!(keys, want, "{raw}");

    // C counted them under their kind and topic.
    let c: Value = serde_json::from_str(read(&count_c).trim()).expect("count JSON");
    assert_eq!(c["kinds"]["custom"], SIGNALS, "{c}");
    assert_eq!(c["kinds"]["trade"], TRADES, "{c}");
    assert_eq!(c["topics"]["custom.signal"], SIGNALS, "{c}");

    // The recording replayed into a backtest: same digest and NDJSON, custom events included.
    let live_digest = read(&digest_d);
    assert!(is_digest(live_digest.trim()), "{live_digest}");
    let (rb, rnd) = tap(&h, &b, "RB", "ndjson", None);
    let (rd, rdg) = tap(&h, &b, "RD", "digest", None);
    let (rt, rtdg) = tap(&h, &b, "RT", "digest", Some("trades.BTCUSDT"));
    let commands = [format!("exec {} {}", q(&b.replay), q(&rec)), rb, rd, rt];
    let r = session_run(
        &mut h,
        &b,
        &socket,
        "custom-replay",
        "backtest",
        &[],
        &commands,
    );
    assert_run_ok(&h, &r, (TRADES + SIGNALS) as usize);
    assert_eq!(read(&rdg), live_digest, "the replay's digest");
    assert!(
        read(&rnd) == text,
        "the replay's NDJSON differs from the live tap's"
    );
    // The same stream without its custom events has another digest: they are digested.
    let trades_only = read(&rtdg);
    assert!(is_digest(trades_only.trim()), "{trades_only}");
    assert_ne!(
        trades_only, live_digest,
        "custom events do not change the digest"
    );
    assert_segments_gone(&h);
}

#[test]
fn a_publisher_that_opts_in_receives_its_own_events() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("custom-own");
    let csv = trades_csv(&h.dir, TRADES);
    let socket = h.start_daemon(&b);
    let (tap_b, nd_b) = tap(&h, &b, "B", "count", None);
    let commands = [
        format!("exec {} {}", q(&b.replay), q(&csv)),
        format!(
            "exec {} A {EVERY} --receive-own",
            q(&example(&b, "signals"))
        ),
        tap_b,
    ];
    let r = session_run(&mut h, &b, &socket, "custom-own", "live", &LIVE, &commands);
    assert_run_ok(&h, &r, (TRADES + SIGNALS) as usize);
    let a = signals_summary(&r, "A");
    assert_eq!(a["published"], SIGNALS, "{a}");
    assert_eq!(a["received"]["custom"], SIGNALS, "{a}");
    assert_eq!(a["own"], SIGNALS, "{a}");
    let c: Value = serde_json::from_str(read(&nd_b).trim()).expect("count JSON");
    assert_eq!(c["kinds"]["custom"], SIGNALS, "{c}");
    assert_segments_gone(&h);
}

#[test]
fn on_equal_ts_a_custom_event_sorts_after_every_market_data_kind() {
    let ts = 1_726_876_859_999_000_000;
    // Whatever the ranks and sequences: kind decides before them.
    for (rank, seq) in [(0u16, 0u64), (7, 3), (u16::MAX, (1 << 46) - 1)] {
        let custom = merge_key(ts, Kind::Custom, 0, 0);
        for k in [Kind::Trade, Kind::Book, Kind::Kline] {
            assert!(merge_key(ts, k, rank, seq) < custom, "{k:?} rank {rank}");
        }
        assert!(merge_key(ts, Kind::Custom, rank, seq) < merge_key(ts + 1, Kind::Trade, 0, 0));
    }
    assert!(Kind::Kline.priority() < Kind::Custom.priority());
    assert_eq!(Kind::from_u8(Kind::Custom as u8), Some(Kind::Custom));
    assert_eq!(Kind::Custom.name(), "custom");
}

#[test]
fn bad_type_names_are_refused_with_a_clear_error() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("custom-bad");
    let socket = h.start_daemon(&b);
    // The client refuses before anything is sent.
    let long = "s".repeat(TYPE_NAME_LEN + 1);
    let e = SourceDecl::custom("x", &long).unwrap_err();
    assert!(matches!(e, CustomError::TypeNameTooLong { .. }), "{e:?}");
    assert!(
        e.to_string().contains("33 bytes long, the limit is 32"),
        "{e}"
    );
    assert!(Custom::new("signal", &[0; 257]).is_err());
    assert_eq!(
        SourceDecl::custom("x", "").unwrap_err(),
        CustomError::EmptyTypeName
    );
    // The daemon refuses a hand-made declaration too, saying why.
    let v = shmctl_json(
        &b,
        &socket,
        &["session", "create", "custom-bad", "--mode", "live"],
    );
    let token = v["token"].as_str().expect("token").to_string();
    let register = |topic: &str, kind: SourceKind| {
        Component::connect(
            Some(&socket),
            Register {
                component_name: "bad".into(),
                session_token: token.clone(),
                role: Some(Role::Producer),
                sources: vec![SourceDecl {
                    name: "bad-src".into(),
                    kind,
                    topic: topic.into(),
                    journal: None,
                    recording: None,
                }],
                pid: Some(std::process::id()),
                ..Register::default()
            },
        )
    };
    for (topic, kind, says) in [
        (
            format!("custom.{long}"),
            SourceKind::Custom,
            "33 bytes long, the limit is 32",
        ),
        (
            "custom.a:b".to_string(),
            SourceKind::Custom,
            "[A-Za-z0-9._-]",
        ),
        (
            "signals".to_string(),
            SourceKind::Custom,
            "is not custom.<type>",
        ),
        (
            "custom.signal".to_string(),
            SourceKind::Trade,
            "custom.* topics are for sources of kind custom",
        ),
    ] {
        match register(&topic, kind) {
            Err(ClientError::Refused { code, message }) => {
                assert!(
                    matches!(code, ErrorCode::BadRequest | ErrorCode::BadName),
                    "{topic}: {code}: {message}"
                );
                assert!(message.contains(says), "{topic}: {message}");
            }
            Err(e) => panic!("{topic}: refused otherwise: {e}"),
            Ok(_) => panic!("{topic} ({kind:?}) was accepted"),
        }
    }
    // A good one is accepted.
    let ok = register("custom.signal", SourceKind::Custom).expect("a valid custom source");
    assert_eq!(ok.ack().sources[0].kind, SourceKind::Custom);
}

/// The bundled day of 1m klines: 1440 bars, the first closing at this ts (ns), one a minute.
const KLINES: &str = "data/binance/BTCUSDT-1m-2024-09-21.csv";
const FIRST_CLOSE: u64 = 1_726_876_859_999_000_000;
const MINUTE: u64 = 60_000_000_000;

/// A backtest of the bundled klines and the `custom_feed` example fed `lines` (`customs` of
/// them its events): the tap's NDJSON and digest.
fn backtest_with_feed(
    h: &mut Harness,
    b: &Bins,
    name: &str,
    lines: &str,
    customs: usize,
) -> (String, String) {
    let input = h.dir.join(format!("{name}.in.ndjson"));
    std::fs::write(&input, lines).unwrap();
    let klines = Path::new(env!("CARGO_MANIFEST_DIR")).join(KLINES);
    let (nd, nd_out) = tap(h, b, &format!("{name}-nd"), "ndjson", None);
    let (dg, dg_out) = tap(h, b, &format!("{name}-dg"), "digest", None);
    let commands = [
        format!("exec {} {}", q(&b.replay), q(&klines)),
        format!(
            "exec {} orders order < {}",
            q(&example(b, "custom_feed")),
            q(&input)
        ),
        nd,
        dg,
    ];
    let socket = h.socket();
    let r = session_run(h, b, &socket, name, "backtest", &[], &commands);
    assert_run_ok(h, &r, 1440 + customs);
    (read(&nd_out), read(&dg_out))
}

/// In a backtest, custom events from a producer of their own (the `custom_feed` example) are
/// merged exactly: at a kline's close time the custom event comes right after the kline, and
/// between bars in time order. Changing one event's bytes changes the digest and that one line.
#[test]
fn backtest_custom_events_sort_after_klines_at_equal_ts_and_are_digested() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("custom-backtest");
    h.start_daemon(&b);
    let mut lines = String::new();
    for i in (0..1440).step_by(10) {
        let close = FIRST_CLOSE + i * MINUTE;
        lines.push_str(&format!(
            r#"{{"ts":{close},"bytes":"{}"}}"#,
            hex(&format!("buy {i}"))
        ));
        lines.push('\n');
        // Half a minute later: between two bars.
        lines.push_str(&format!(r#"{{"ts":{},"bytes":""}}"#, close + MINUTE / 2));
        lines.push('\n');
    }
    // Skipped: another type, another kind (a tap's line of a trade).
    lines.push_str(&format!(
        r#"{{"ts":{FIRST_CLOSE},"type":"fill","bytes":"00"}}"#
    ));
    lines.push('\n');
    lines.push_str(&format!(
        r#"{{"seq":0,"ts":{FIRST_CLOSE},"kind":"trade","bytes":"00"}}"#
    ));
    lines.push('\n');
    let mut sorted: Vec<&str> = lines.lines().collect();
    // The feed needs time order; the two skipped lines are at the first ts.
    sorted.sort_by_key(|l| {
        let v: Value = serde_json::from_str(l).unwrap();
        v["ts"].as_u64().unwrap()
    });
    let lines = sorted.join("\n") + "\n";
    let (nd, digest) = backtest_with_feed(&mut h, &b, "bt1", &lines, 288);
    let rows: Vec<Value> = nd
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1440 + 288);
    for (i, v) in rows.iter().enumerate() {
        assert_eq!(v["seq"], i as u64);
        if i > 0 {
            assert!(rows[i - 1]["ts"].as_u64() <= v["ts"].as_u64(), "{v}");
        }
        if v["kind"] != "custom" {
            continue;
        }
        assert_eq!(
            (&v["type"], &v["topic"]),
            (&"order".into(), &"custom.order".into())
        );
        let ts = v["ts"].as_u64().unwrap();
        if (ts - FIRST_CLOSE).is_multiple_of(MINUTE) {
            // At a close time: right after that kline.
            let k = &rows[i - 1];
            assert_eq!(
                (&k["kind"], k["close_time"].as_u64()),
                (&"kline".into(), Some(ts))
            );
            let bar = (ts - FIRST_CLOSE) / MINUTE;
            assert_eq!(v["bytes"], hex(&format!("buy {bar}")), "{v}");
        } else {
            assert_eq!(v["bytes"], "", "{v}");
        }
    }
    assert!(is_digest(digest.trim()), "{digest}");
    // One event's bytes differ: another digest, and only that line differs.
    let changed = lines.replacen(&hex("buy 700"), &hex("sell 700"), 1);
    assert_ne!(changed, lines);
    let (nd2, digest2) = backtest_with_feed(&mut h, &b, "bt2", &changed, 288);
    assert_ne!(digest2, digest, "a custom event's bytes are digested");
    let diff: Vec<(&str, &str)> = nd
        .lines()
        .zip(nd2.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(diff.len(), 1, "{diff:?}");
    assert!(diff[0].1.contains(&hex("sell 700")), "{diff:?}");
    assert_segments_gone(&h);
}
