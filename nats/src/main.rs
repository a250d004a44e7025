//! `aegis-nats`: the bridge between Aegis sessions on different hosts through NATS JetStream
//! (SPEC section 15). `export` publishes a local session's bus to a stream; `import` writes a
//! stream into a session on another host, whose consumers then see the same events, in the
//! same order, with the same sources and topics.
//!
//! Built only on `aegis-shm-client`; the async runtime (tokio, single-threaded) and the NATS
//! client live here and nowhere else: the daemon and the data path do not use them.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod cli;
mod command;
mod daemon;
mod retry;
mod wire;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    let code = match &args.command {
        cli::Command::Export(a) => match command::export::run(a) {
            Ok(s) => {
                let rate = if s.seconds > 0.0 {
                    s.published as f64 / s.seconds
                } else {
                    0.0
                };
                if a.common.json {
                    eprintln!(
                        "{{\"published\":{},\"skipped\":{},\"duplicates\":{},\"resyncs\":{},\"overruns\":{},\"missed\":{},\"seconds\":{:.6},\"msgs_per_s\":{rate:.0},\"aborted\":{}}}",
                        s.published, s.skipped, s.duplicates, s.resyncs, s.overruns, s.missed, s.seconds, s.aborted
                    );
                } else {
                    eprintln!(
                        "aegis-nats export: {} messages published to stream {} in {:.3} s ({rate:.0}/s); {} already stored, {} resyncs{}",
                        s.published,
                        a.common.stream,
                        s.seconds,
                        s.skipped,
                        s.resyncs,
                        if s.overruns > 0 {
                            format!("; {} overruns, {} frames missed", s.overruns, s.missed)
                        } else {
                            String::new()
                        }
                    );
                }
                if s.aborted {
                    eprintln!("aegis-nats export: error: the session aborted: the stream ends with END-OF-STREAM flagged ABORT");
                    1
                } else {
                    0
                }
            }
            Err(e) => {
                eprintln!("aegis-nats export: error: {e}");
                1
            }
        },
        cli::Command::Import(a) => match command::import::run(a) {
            Ok(s) => {
                let rate = if s.seconds > 0.0 {
                    s.imported as f64 / s.seconds
                } else {
                    0.0
                };
                if a.common.json {
                    eprintln!(
                        "{{\"imported\":{},\"skipped\":{},\"last_bus_seq\":{},\"seconds\":{:.6},\"events_per_s\":{rate:.0},\"reconnects\":{},\"lookahead_peak_bytes\":{}}}",
                        s.imported,
                        s.skipped,
                        s.last_bus_seq.map_or("null".into(), |q| q.to_string()),
                        s.seconds,
                        s.reconnects,
                        s.lookahead_peak
                    );
                } else {
                    eprintln!(
                        "aegis-nats import: {} frames imported from stream {} in {:.3} s ({rate:.0}/s), up to bus seq {}; {} reconnects",
                        s.imported,
                        a.common.stream,
                        s.seconds,
                        s.last_bus_seq.map_or("none".into(), |q| q.to_string()),
                        s.reconnects
                    );
                }
                0
            }
            Err(e) => {
                eprintln!("aegis-nats import: error: {e}");
                1
            }
        },
    };
    std::process::exit(code);
}
