//! The client crate's examples, run as components of a real session, so that none of them
//! rots: the NDJSON feed handler produces, the VWAP strategy consumes, and the strategy's
//! answer equals the VWAP computed here from the same input.

mod common;

use std::fmt::Write as _;
use std::path::PathBuf;

use common::*;

/// An example binary, built by `cargo test` next to the test binaries' profile directory.
fn example(b: &Bins, name: &str) -> PathBuf {
    let p = b
        .shmctl
        .parent()
        .expect("the profile directory")
        .join("examples")
        .join(name);
    assert!(
        p.is_file(),
        "example {name} not found at {}: `cargo test` builds the examples (or `cargo build --release --examples -p aegis-shm-client`)",
        p.display()
    );
    p
}

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
