//! # aegis-tools
//!
//! The library behind `aegis-replay` and `aegis-tap`, built only on the public API of
//! `aegis-shm-client`:
//!
//! - [`names`]: infer a source's kind, symbol and interval from a Binance file name, and its
//!   default source name;
//! - [`archive`]: Binance downloads as they come, a `.zip` holding one CSV with a
//!   `.CHECKSUM` beside it: verified, checked up front, streamed out without unpacking;
//! - [`csv`]: a streaming parser for Binance kline, trades, aggTrades and bookTicker CSV files;
//! - [`journal`]: journal files (a 64-byte header followed by frames in the bus format), written
//!   once from CSV and replayed by memory-mapping them;
//! - [`sort`]: the events of a CSV file in event-time order, stably, in bounded memory (an
//!   index of times and line offsets, lines re-read by offset);
//! - [`symbols`]: a producer's symbol filter, driven by the session's desired symbol set;
//! - [`progress`]: progress bars (indicatif) on stderr, drawn only on a terminal;
//! - [`ndjson`]: the NDJSON line format of `aegis-tap --format ndjson` (SPEC section 7);
//! - [`digest`]: the stream digest of `aegis-tap --format digest` and the event counts of
//!   `--format count`.

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod archive;
pub mod csv;
pub mod digest;
pub mod journal;
pub mod names;
pub mod ndjson;
pub mod progress;
pub mod sort;
pub mod symbols;

pub use names::{FileInfo, FileKind};

#[cfg(test)]
pub(crate) mod test_util {
    //! Helpers shared by the unit tests.

    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A path under the system temp directory, unique to this process and call, removed on
    /// drop (with any `*.partial-*` sibling a failed conversion might leave behind).
    pub struct TempPath(pub PathBuf);

    impl TempPath {
        pub fn new(name: &str) -> TempPath {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            TempPath(std::env::temp_dir().join(format!(
                "aegis-tools-test-{}-{n}-{name}",
                std::process::id()
            )))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// The repository's sample data directory.
    pub fn data(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/binance")
            .join(name)
    }
}
