//! The client crate's examples, run as components of a real session, so that none of them
//! rots: the NDJSON feed handler produces, the VWAP strategy consumes, and the strategy's
//! answer equals the VWAP computed here from the same input.

mod common;

use std::fmt::Write as _;

use common::*;

#[test]
fn feed_handler_and_vwap_strategy_run_in_a_session() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("examples");
    let n = 5000u64;
    let (mut ndjson, mut notional, mut volume) = (String::new(), 0.0f64, 0.0f64);
    for i in 0..n {
        let price = format!("{}.{:02}", 63000 + i % 37, i % 100);
        let qty = format!("0.{:03}", 1 + i % 250);
        notional += price.parse::<f64>().unwrap() * qty.parse::<f64>().unwrap();
        volume += qty.parse::<f64>().unwrap();
        let ts = 1_726_876_800_000_000_000u64 + i * 1_000_000;
        writeln!(
            ndjson,
            r#"{{"ts":{ts},"symbol":"ETHUSDT","id":{i},"price":"{price}","qty":"{qty}","buyer_maker":{}}}"#,
            i % 2 == 0
        )
        .unwrap();
    }
    let input = h.dir.join("trades.ndjson");
    std::fs::write(&input, ndjson).unwrap();
    let socket = h.start_daemon(&b);
    let commands = [
        format!(
            "exec {} feed ETHUSDT < {}",
            q(&example(&b, "ndjson_feed")),
            q(&input)
        ),
        format!("exec {}", q(&example(&b, "vwap"))),
    ];
    let r = session_run(&mut h, &b, &socket, "examples", "backtest", &[], &commands);
    assert_run_ok(&h, &r, n as usize);
    let want = format!(
        "ETHUSDT vwap={:.8} volume={:.8} trades={n}",
        notional / volume,
        volume
    );
    assert!(
        r.stdout_head.lines().any(|l| l == want),
        "the strategy printed {:?}, expected {want:?}",
        r.stdout_head
    );
}

/// The example that is both a consumer and a producer: in a live session the NDJSON feed sends
/// trades, the bar builder turns them into 1-second bars published into the same session, and
/// a tap sees both. Every bar the tap saw equals the bar computed here, exactly (decimals), and
/// there is one per second of event time that had trades.
#[test]
fn bar_builder_is_both_consumer_and_producer() {
    use aegis_shm_client::event::Decimal;
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("bars");
    let n = 3000u64;
    let t0 = 1_726_876_800_000_000_000u64;
    // Expected bars by open time: open, high, low, close, volume, quote volume, trades.
    type Bar = (Decimal, Decimal, Decimal, Decimal, Decimal, Decimal, u64);
    let mut want: std::collections::BTreeMap<u64, Bar> = Default::default();
    let mut ndjson = String::new();
    for i in 0..n {
        let (price, qty) = (
            format!("{}.{:02}", 2500 + (i * 7) % 41, i % 100),
            format!("0.{:03}", 1 + i % 250),
        );
        // 1.3 ms apart: about 3.9 s of event time, so 4 bars.
        let ts = t0 + i * 1_300_000;
        writeln!(
            ndjson,
            r#"{{"ts":{ts},"symbol":"ETHUSDT","id":{i},"price":"{price}","qty":"{qty}","buyer_maker":{}}}"#,
            i % 2 == 0
        )
        .unwrap();
        let (p, q) = (
            Decimal::parse(&price).unwrap(),
            Decimal::parse(&qty).unwrap(),
        );
        let open = ts - ts % 1_000_000_000;
        let e = want.entry(open).or_insert((
            p,
            p,
            p,
            p,
            Decimal::parse("0").unwrap(),
            Decimal::parse("0").unwrap(),
            0,
        ));
        if p.cmp_value(&e.1).is_gt() {
            e.1 = p;
        }
        if p.cmp_value(&e.2).is_lt() {
            e.2 = p;
        }
        e.3 = p;
        e.4 = e.4.checked_add(q).unwrap();
        e.5 = e.5.checked_add(p.checked_mul(q).unwrap()).unwrap();
        e.6 += 1;
    }
    let input = h.dir.join("trades.ndjson");
    std::fs::write(&input, ndjson).unwrap();
    let tap_out = h.dir.join("tap.ndjson");
    let socket = h.start_daemon(&b);
    let commands = [
        format!(
            "exec {} feed ETHUSDT < {}",
            q(&example(&b, "ndjson_feed")),
            q(&input)
        ),
        format!("exec {} ETHUSDT 1", q(&example(&b, "bar_builder"))),
        format!("exec {} --format ndjson --out {}", q(&b.tap), q(&tap_out)),
    ];
    // A bus far larger than the stream: nothing can be lapped.
    let extra = ["--bus-bytes", "16777216", "--max-lateness-us", "200000"];
    let r = session_run(&mut h, &b, &socket, "bars", "live", &extra, &commands);
    assert_run_ok(&h, &r, n as usize + want.len());
    let text = std::fs::read_to_string(&tap_out).unwrap();
    let dec =
        |v: &serde_json::Value| Decimal::parse(v.as_str().expect("a decimal string")).unwrap();
    let mut got = std::collections::BTreeMap::new();
    let mut trades = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        match v["kind"].as_str() {
            Some("trade") => trades += 1,
            Some("kline") => {
                assert_eq!(v["topic"], "klines.ETHUSDT.1s");
                assert_eq!(v["interval"], "1s");
                let open_time = v["open_time"].as_u64().unwrap();
                assert_eq!(v["close_time"].as_u64().unwrap(), open_time + 999_999_999);
                assert_eq!(v["ts"].as_u64().unwrap(), open_time + 999_999_999);
                got.insert(
                    open_time,
                    (
                        dec(&v["open"]),
                        dec(&v["high"]),
                        dec(&v["low"]),
                        dec(&v["close"]),
                        dec(&v["volume"]),
                        dec(&v["quote_volume"]),
                        v["trades"].as_u64().unwrap(),
                    ),
                );
            }
            other => panic!("unexpected event kind {other:?}: {line}"),
        }
    }
    assert_eq!(trades, n, "the tap saw every trade");
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (t, w) in &want {
        let g = &got[t];
        let same = |a: &Decimal, b: &Decimal| a.cmp_value(b).is_eq();
        assert!(
            same(&g.0, &w.0)
                && same(&g.1, &w.1)
                && same(&g.2, &w.2)
                && same(&g.3, &w.3)
                && same(&g.4, &w.4)
                && same(&g.5, &w.5)
                && g.6 == w.6,
            "bar at {t}: got {g:?}, want {w:?}"
        );
    }
    assert!(
        r.stdout_head
            .contains(&format!("bars-ETHUSDT-1s: {} bars", want.len())),
        "the builder's summary: {:?}",
        r.stdout_head
    );
}
