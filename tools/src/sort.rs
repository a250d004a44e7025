//! The events of a CSV file in event-time order, for exports that are not sorted
//! (`aegis-replay --sort`, `--convert OUT --sort`).
//!
//! Memory stays bounded by the number of events, not their size: the first pass parses every
//! line (so a bad line fails before anything is replayed) and keeps only its event time and
//! byte offset, 16 bytes an event; the index is sorted by (time, offset), which is a stable
//! sort by time (equal times keep file order); the second pass re-reads each line at its
//! offset and parses it again. The file is read twice.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;

use aegis_shm_client::event::AnyEvent;

use crate::csv::{CsvReader, ParseError};
use crate::names::FileInfo;

/// A CSV file's events sorted by event time, stably: an iterator of `(ts_ns, event)` results.
pub struct SortedCsv {
    file: File,
    /// The parser (its input is exhausted by the first pass; only its settings are used).
    parser: CsvReader<BufReader<File>>,
    /// `(ts, byte offset of the line)`, sorted.
    index: Vec<(u64, u64)>,
    next: usize,
    buf: Vec<u8>,
}

impl SortedCsv {
    /// Reads and parses the whole file once, building the index. Fails on the first bad line.
    pub fn open(path: &Path, info: &FileInfo) -> Result<SortedCsv, ParseError> {
        let mut parser = CsvReader::open(path, info)?;
        let mut index = Vec::new();
        while let Some(item) = parser.next() {
            let (ts, _) = item?;
            index.push((ts, parser.line_start()));
        }
        // Offsets grow with file order, so sorting the pairs sorts by time stably.
        index.sort_unstable();
        let file = File::open(path).map_err(|error| ParseError::Open {
            path: path.to_path_buf(),
            error,
        })?;
        Ok(SortedCsv {
            file,
            parser,
            index,
            next: 0,
            buf: Vec::with_capacity(512),
        })
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the file has no events.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Reads the line at `offset` into `self.buf` (without its line end).
    fn read_line_at(&mut self, offset: u64) -> Result<(), ParseError> {
        let changed = || ParseError::Changed { offset };
        self.buf.clear();
        let mut chunk = [0u8; 512];
        loop {
            let at = offset + self.buf.len() as u64;
            let n = self
                .file
                .read_at(&mut chunk, at)
                .map_err(|error| ParseError::Io { line: 0, error })?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Err(changed())
                } else {
                    Ok(())
                };
            }
            if let Some(end) = chunk[..n].iter().position(|&b| b == b'\n') {
                self.buf.extend_from_slice(&chunk[..end]);
                return Ok(());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

impl Iterator for SortedCsv {
    type Item = Result<(u64, AnyEvent), ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        let &(ts, offset) = self.index.get(self.next)?;
        self.next += 1;
        if let Err(e) = self.read_line_at(offset) {
            return Some(Err(e));
        }
        let buf = std::mem::take(&mut self.buf);
        let parsed = std::str::from_utf8(&buf)
            .ok()
            .map(|t| t.trim_end_matches('\r').trim_start_matches('\u{feff}'))
            .and_then(|t| self.parser.parse_line(0, t).ok());
        self.buf = buf;
        Some(match parsed {
            Some((got, ev)) if got == ts => Ok((ts, ev)),
            _ => Err(ParseError::Changed { offset }),
        })
    }
}

/// The events of a CSV file: in file order, or sorted ([`SortedCsv`]). `R` is where the
/// file-order text comes from: a file, or an entry streamed out of a zip archive
/// ([`crate::archive::CsvArchive::events`]), which can only be read in file order.
pub enum CsvEvents<R = BufReader<File>> {
    /// In file order, streaming.
    InFileOrder(CsvReader<R>),
    /// Sorted by event time.
    Sorted(SortedCsv),
}

impl CsvEvents {
    /// Opens `path`, sorted by event time if `sort`.
    pub fn open(path: &Path, info: &FileInfo, sort: bool) -> Result<CsvEvents, ParseError> {
        Ok(if sort {
            CsvEvents::Sorted(SortedCsv::open(path, info)?)
        } else {
            CsvEvents::InFileOrder(CsvReader::open(path, info)?)
        })
    }
}

impl<R: BufRead> CsvEvents<R> {
    /// The 1-based line number of the last event in the file (in file order only; sorted
    /// events are in order by construction, so no order error names one).
    pub fn line(&self) -> u64 {
        match self {
            CsvEvents::InFileOrder(r) => r.line(),
            CsvEvents::Sorted(_) => 0,
        }
    }

    /// Progress in bytes of the (last) pass.
    pub fn bytes_read(&self) -> u64 {
        match self {
            CsvEvents::InFileOrder(r) => r.bytes_read(),
            CsvEvents::Sorted(s) => s.index.get(s.next.wrapping_sub(1)).map_or(0, |e| e.1),
        }
    }
}

impl<R: BufRead> Iterator for CsvEvents<R> {
    type Item = Result<(u64, AnyEvent), ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            CsvEvents::InFileOrder(r) => r.next(),
            CsvEvents::Sorted(s) => s.next(),
        }
    }
}

/// Checks that events come in event-time order (equal times are fine): the check
/// `aegis-replay` applies to every input as it reads it.
#[derive(Default)]
pub struct OrderCheck {
    prev: u64,
}

impl OrderCheck {
    /// Takes the next event time; `Err(prev)` if it is before the previous one.
    #[inline]
    pub fn next(&mut self, ts: u64) -> Result<(), u64> {
        if ts < self.prev {
            return Err(self.prev);
        }
        self.prev = ts;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::FileKind;
    use crate::test_util::TempPath;

    fn trades(times: &[u64]) -> String {
        times
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{},1.5,0.1,0.15,{t},true,true\n", i + 1))
            .collect()
    }

    #[test]
    fn sorts_stably_and_reads_every_line_again() {
        let path = TempPath::new("sort.csv");
        // Equal times (ids 2 and 4 at 5, ids 1 and 5 at 9) keep file order.
        let times = [
            1_700_000_000_009,
            1_700_000_000_005,
            1_700_000_000_001,
            1_700_000_000_005,
            1_700_000_000_009,
        ];
        std::fs::write(
            path.path(),
            format!(
                "id,price,qty,quote_qty,time,is_buyer_maker,is_best_match\n{}",
                trades(&times)
            ),
        )
        .unwrap();
        let info = FileInfo::new(FileKind::Trade, "BTCUSDT", None).unwrap();
        let got: Vec<(u64, u64)> = SortedCsv::open(path.path(), &info)
            .unwrap()
            .map(|r| {
                let (ts, ev) = r.unwrap();
                match ev {
                    AnyEvent::Trade(t) => (ts / 1_000_000, t.id),
                    _ => unreachable!(),
                }
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (1_700_000_000_001, 3),
                (1_700_000_000_005, 2),
                (1_700_000_000_005, 4),
                (1_700_000_000_009, 1),
                (1_700_000_000_009, 5)
            ]
        );
    }

    #[test]
    fn order_check_names_the_previous_time() {
        let mut c = OrderCheck::default();
        assert_eq!(c.next(5), Ok(()));
        assert_eq!(c.next(5), Ok(()));
        assert_eq!(c.next(4), Err(5));
        assert_eq!(c.next(6), Ok(()));
    }
}
