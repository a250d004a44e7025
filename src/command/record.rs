//! `aegis-shmctl record verify DIR`: reads a recording through and reports on it.

use aegis_shm_client::recording::{self, Verified};

use super::{print_json, CliError};
use crate::cli::RecordCommand;

/// Dispatches a `record` subcommand.
pub fn run(json_out: bool, cmd: RecordCommand) -> Result<bool, CliError> {
    match cmd {
        RecordCommand::Verify { dir } => {
            let v = recording::verify(&dir).map_err(|e| CliError(e.to_string()))?;
            if json_out {
                print_json(&v);
            } else {
                print_verified(&v);
            }
            Ok(true)
        }
    }
}

fn print_verified(v: &Verified) {
    println!(
        "recording {} of session {}: {}{}",
        v.dir.display(),
        v.session,
        v.state.name(),
        v.reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    let range = |r: Option<(u64, u64)>| r.map_or("none".to_string(), |(a, b)| format!("{a}..={b}"));
    println!(
        "  {} frames ({} events), bus seqs {}, ts {}",
        v.frames,
        v.events,
        range(v.seq_range),
        range(v.ts_range)
    );
    println!(
        "  END-OF-STREAM: {}",
        match (v.ended, v.aborted) {
            (true, false) => "recorded",
            (true, true) => "recorded, flagged ABORT (the session failed)",
            _ => "not recorded",
        }
    );
    for s in &v.segments {
        println!(
            "  segment {}: {} frames, {} bytes{}",
            s.file,
            s.frames,
            s.bytes,
            if s.complete { "" } else { ", not closed" }
        );
    }
    if v.gaps.is_empty() {
        println!("  gaps: none");
    }
    for g in &v.gaps {
        println!("  gap: bus seqs {}..={} missed", g.from, g.to);
    }
    match &v.torn_tail {
        Some(t) => println!(
            "  torn tail: {} bytes at {} offset {} (ignored: everything before it is readable)",
            t.bytes, t.file, t.offset
        ),
        None => println!("  torn tail: none"),
    }
    println!("  index: {} entries", v.index_entries);
}
