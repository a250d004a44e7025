//! A streaming parser for Binance CSV files (SPEC section 5).
//!
//! [`CsvReader`] reads any [`BufRead`] one line at a time (it never holds more than one line)
//! and yields `(ts_ns, event)` pairs, where `ts_ns` is the event time in nanoseconds:
//!
//! | file kind | columns | event time |
//! |---|---|---|
//! | klines | open_time, open, high, low, close, volume, close_time, quote_volume, count, taker_buy_base, taker_buy_quote, ignore | close_time (7) |
//! | trades | id, price, qty, quote_qty, time, is_buyer_maker[, is_best_match] | time (5) |
//! | aggTrades | agg_trade_id, price, quantity, first_trade_id, last_trade_id, transact_time, is_buyer_maker[, is_best_match] | transact_time (6) |
//! | bookTicker | update_id, best_bid_price, best_bid_qty, best_ask_price, best_ask_qty, transaction_time, event_time | transaction_time (6) |
//!
//! - A header line may be present (futures files) or not (spot files): the first non-blank
//!   line is a header when its first field is not a number.
//! - Booleans are `true`/`false` in any case (`True`/`False` in spot files).
//! - Timestamps are milliseconds, microseconds (spot files since 2025) or nanoseconds, told
//!   apart by magnitude (see [`normalize_ts`]), and always normalised to nanoseconds; a kline's
//!   open and close times both are.
//! - Prices and quantities are parsed exactly with [`Decimal::parse`].
//! - Blank lines are skipped; `\r\n` line ends and a UTF-8 byte-order mark are accepted.
//!
//! Errors name the line (1-based, counting the header), the column (1-based, and its name) and
//! the value.
//!
//! ```
//! use aegis_tools::csv::CsvReader;
//! use aegis_tools::FileKind;
//!
//! let data = "id,price,qty,quote_qty,time,is_buyer_maker\n\
//!             7,63201.05,0.001,63.20105,1704067200000,True\n";
//! let mut rd = CsvReader::new(data.as_bytes(), FileKind::Trade, "BTCUSDT", None).unwrap();
//! let (ts, _event) = rd.next().unwrap().unwrap();
//! assert_eq!(ts, 1_704_067_200_000_000_000);
//! assert!(rd.next().is_none());
//! ```

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use aegis_shm_client::event::{AnyEvent, Book, Decimal, Kline, Symbol, Trade};

use crate::names::{FileInfo, FileKind};

const KLINE_COLUMNS: &[&str] = &[
    "open_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "close_time",
    "quote_volume",
    "count",
    "taker_buy_base",
    "taker_buy_quote",
    "ignore",
];
const TRADE_COLUMNS: &[&str] = &[
    "id",
    "price",
    "qty",
    "quote_qty",
    "time",
    "is_buyer_maker",
    "is_best_match",
];
const AGG_TRADE_COLUMNS: &[&str] = &[
    "agg_trade_id",
    "price",
    "quantity",
    "first_trade_id",
    "last_trade_id",
    "transact_time",
    "is_buyer_maker",
    "is_best_match",
];
const BOOK_TICKER_COLUMNS: &[&str] = &[
    "update_id",
    "best_bid_price",
    "best_bid_qty",
    "best_ask_price",
    "best_ask_qty",
    "transaction_time",
    "event_time",
];

/// The most columns any supported format has.
const MAX_COLUMNS: usize = 12;

/// The column names of a file kind, in order (optional trailing columns included).
pub fn column_names(kind: FileKind) -> &'static [&'static str] {
    match kind {
        FileKind::Kline => KLINE_COLUMNS,
        FileKind::Trade => TRADE_COLUMNS,
        FileKind::AggTrade => AGG_TRADE_COLUMNS,
        FileKind::BookTicker => BOOK_TICKER_COLUMNS,
    }
}

/// The accepted column counts of a file kind (inclusive range).
fn column_counts(kind: FileKind) -> (usize, usize) {
    match kind {
        FileKind::Kline => (12, 12),
        FileKind::Trade => (6, 7),
        FileKind::AggTrade => (7, 8),
        FileKind::BookTicker => (7, 7),
    }
}

/// Why a CSV file could not be read.
#[derive(Debug)]
pub enum ParseError {
    /// The file could not be opened.
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        error: io::Error,
    },
    /// Reading failed.
    Io {
        /// The line being read (1-based).
        line: u64,
        /// The cause.
        error: io::Error,
    },
    /// The line is not UTF-8.
    NotUtf8 {
        /// The line (1-based).
        line: u64,
    },
    /// The line has the wrong number of columns for the file kind.
    Columns {
        /// The line (1-based).
        line: u64,
        /// The file kind being parsed.
        kind: FileKind,
        /// Columns found.
        found: usize,
    },
    /// A field has an invalid value.
    Field {
        /// The line (1-based).
        line: u64,
        /// The column (1-based).
        column: usize,
        /// The column's name.
        name: &'static str,
        /// The value found.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The reader was set up wrongly (bad symbol, a kline file without an interval, ...).
    Config(String),
    /// `--sort`: the line indexed at this byte offset was no longer there (or no longer
    /// valid) when it was read again: the file changed between the two passes.
    Changed {
        /// The line's byte offset.
        offset: u64,
    },
}

impl ParseError {
    /// The line the error is about, if any.
    pub fn line(&self) -> Option<u64> {
        match self {
            ParseError::Io { line, .. }
            | ParseError::NotUtf8 { line }
            | ParseError::Columns { line, .. }
            | ParseError::Field { line, .. } => Some(*line),
            ParseError::Open { .. } | ParseError::Config(_) | ParseError::Changed { .. } => None,
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Open { path, error } => {
                write!(f, "cannot open {:?}: {error}", path.display())
            }
            ParseError::Io { line, error } => write!(f, "line {line}: read error: {error}"),
            ParseError::NotUtf8 { line } => write!(f, "line {line}: not valid UTF-8"),
            ParseError::Columns { line, kind, found } => {
                let (lo, hi) = column_counts(*kind);
                let want = if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo} or {hi}")
                };
                write!(
                    f,
                    "line {line}: {found} columns, but a {kind} file has {want} ({}); \
                     is --kind right?",
                    column_names(*kind)[..hi].join(",")
                )
            }
            ParseError::Field {
                line,
                column,
                name,
                value,
                reason,
            } => write!(
                f,
                "line {line}, column {column} ({name}): {value:?}: {reason}"
            ),
            ParseError::Config(msg) => f.write_str(msg),
            ParseError::Changed { offset } => write!(
                f,
                "the line at byte {offset} changed while the file was being sorted"
            ),
        }
    }
}

impl std::error::Error for ParseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ParseError::Open { error, .. } | ParseError::Io { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Below this a timestamp is in milliseconds. 1e14 ms is the year 5138, so no real
/// millisecond timestamp reaches it, while 1e14 µs is 1973-03-03, so every microsecond
/// timestamp of market data is above it.
const MICROS_FROM: u64 = 100_000_000_000_000;
/// From here on a timestamp is in nanoseconds: the same argument one step up (1e17 µs is the
/// year 5138, 1e17 ns is 1973-03-03).
const NANOS_FROM: u64 = 100_000_000_000_000_000;

/// Normalises a timestamp in milliseconds, microseconds or nanoseconds since the epoch to
/// nanoseconds, telling the unit by magnitude: `< 1e14` is ms, `< 1e17` is µs, else ns (see
/// the constants for why these thresholds cannot be confused for dates between 1973 and 5138).
/// `None` when the result does not fit in a u64 (after the year 2554).
pub fn normalize_ts(raw: u64) -> Option<u64> {
    if raw >= NANOS_FROM {
        Some(raw)
    } else if raw >= MICROS_FROM {
        raw.checked_mul(1_000)
    } else {
        raw.checked_mul(1_000_000)
    }
}

/// Whether `s` is a non-empty run of ASCII digits.
fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// The fields of one line, with the context needed for specific errors.
struct Fields<'a> {
    line: u64,
    names: &'static [&'static str],
    values: [&'a str; MAX_COLUMNS],
}

impl<'a> Fields<'a> {
    fn err(&self, i: usize, reason: impl Into<String>) -> ParseError {
        ParseError::Field {
            line: self.line,
            column: i + 1,
            name: self.names[i],
            value: self.values[i].to_string(),
            reason: reason.into(),
        }
    }

    fn decimal(&self, i: usize) -> Result<Decimal, ParseError> {
        Decimal::parse(self.values[i]).map_err(|e| self.err(i, e.reason))
    }

    fn uint(&self, i: usize) -> Result<u64, ParseError> {
        let v = self.values[i];
        if !is_number(v) {
            return Err(self.err(i, "not an unsigned integer"));
        }
        v.parse()
            .map_err(|_| self.err(i, "integer out of range (more than 64 bits)"))
    }

    fn ts(&self, i: usize) -> Result<u64, ParseError> {
        let raw = self.uint(i)?;
        normalize_ts(raw).ok_or_else(|| self.err(i, "timestamp out of range"))
    }

    fn boolean(&self, i: usize) -> Result<bool, ParseError> {
        let v = self.values[i];
        if v.eq_ignore_ascii_case("true") {
            Ok(true)
        } else if v.eq_ignore_ascii_case("false") {
            Ok(false)
        } else {
            Err(self.err(i, "not a boolean (true or false)"))
        }
    }
}

/// A streaming parser over one Binance CSV file: an iterator of `(ts_ns, event)` results.
///
/// After an I/O error the iterator ends; after a bad line it goes on with the next one (the
/// callers of this crate stop at the first error).
pub struct CsvReader<R> {
    input: R,
    kind: FileKind,
    symbol: Symbol,
    interval: Symbol,
    buf: Vec<u8>,
    line: u64,
    bytes: u64,
    /// Byte offset of the last line read.
    line_start: u64,
    seen_first: bool,
    done: bool,
}

impl CsvReader<BufReader<File>> {
    /// Opens a file for [`CsvReader::new`], with a 256 KiB buffer.
    pub fn open(path: &Path, info: &FileInfo) -> Result<Self, ParseError> {
        let file = File::open(path).map_err(|error| ParseError::Open {
            path: path.to_path_buf(),
            error,
        })?;
        CsvReader::new(
            BufReader::with_capacity(256 * 1024, file),
            info.kind,
            &info.symbol,
            info.interval.as_deref(),
        )
    }
}

impl<R: BufRead> CsvReader<R> {
    /// A parser of `kind` lines for `symbol`; klines need `interval`, other kinds refuse one.
    pub fn new(
        input: R,
        kind: FileKind,
        symbol: &str,
        interval: Option<&str>,
    ) -> Result<Self, ParseError> {
        let info = FileInfo::new(kind, symbol, interval).map_err(|e| ParseError::Config(e.0))?;
        let cfg = |e: crate::names::NameError| ParseError::Config(e.0);
        Ok(CsvReader {
            input,
            kind,
            symbol: info.symbol().map_err(cfg)?,
            interval: info.interval().map_err(cfg)?,
            buf: Vec::with_capacity(256),
            line: 0,
            bytes: 0,
            line_start: 0,
            seen_first: false,
            done: false,
        })
    }

    /// The number of the last line read (1-based; 0 before the first).
    pub fn line(&self) -> u64 {
        self.line
    }

    /// Bytes read so far (for progress reports).
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// The byte offset in the input of the last line read (where the last event's line
    /// starts).
    pub fn line_start(&self) -> u64 {
        self.line_start
    }

    /// Parses `text`, the text of line `line` of this reader's input (without its line end),
    /// as this reader would: used to re-read lines by offset ([`crate::sort`]).
    pub fn parse_line(&mut self, line: u64, text: &str) -> Result<(u64, AnyEvent), ParseError> {
        self.line = line;
        self.parse(text)
    }

    /// The file kind being parsed.
    pub fn kind(&self) -> FileKind {
        self.kind
    }

    /// Reads the next line into `self.buf`; `false` at the end of the input.
    fn read_line(&mut self) -> Result<bool, ParseError> {
        self.buf.clear();
        let n = self
            .input
            .read_until(b'\n', &mut self.buf)
            .map_err(|error| ParseError::Io {
                line: self.line + 1,
                error,
            })?;
        if n == 0 {
            return Ok(false);
        }
        self.line += 1;
        self.line_start = self.bytes;
        self.bytes += n as u64;
        Ok(true)
    }

    /// Parses one non-blank, non-header line.
    fn parse(&self, text: &str) -> Result<(u64, AnyEvent), ParseError> {
        let names = column_names(self.kind);
        let mut fields = Fields {
            line: self.line,
            names,
            values: [""; MAX_COLUMNS],
        };
        let mut found = 0;
        for v in text.split(',') {
            if found < MAX_COLUMNS {
                fields.values[found] = v.trim();
            }
            found += 1;
        }
        let (lo, hi) = column_counts(self.kind);
        if found < lo || found > hi {
            return Err(ParseError::Columns {
                line: self.line,
                kind: self.kind,
                found,
            });
        }
        let f = &fields;
        Ok(match self.kind {
            FileKind::Kline => {
                let open_time = f.ts(0)?;
                let close_time = f.ts(6)?;
                if close_time < open_time {
                    return Err(f.err(6, "close time before open time"));
                }
                let k = Kline {
                    symbol: self.symbol,
                    interval: self.interval,
                    open_time,
                    close_time,
                    open: f.decimal(1)?,
                    high: f.decimal(2)?,
                    low: f.decimal(3)?,
                    close: f.decimal(4)?,
                    volume: f.decimal(5)?,
                    quote_volume: f.decimal(7)?,
                    trades: f.uint(8)?,
                    taker_buy_base: f.decimal(9)?,
                    taker_buy_quote: f.decimal(10)?,
                };
                (close_time, AnyEvent::Kline(k))
            }
            FileKind::Trade => {
                let (id, price, qty) = (f.uint(0)?, f.decimal(1)?, f.decimal(2)?);
                let ts = f.ts(4)?;
                let t = Trade {
                    symbol: self.symbol,
                    id,
                    price,
                    qty,
                    buyer_maker: f.boolean(5)?,
                };
                if found == 7 {
                    f.boolean(6)?; // is_best_match: checked, not kept
                }
                (ts, AnyEvent::Trade(t))
            }
            FileKind::AggTrade => {
                let (id, price, qty) = (f.uint(0)?, f.decimal(1)?, f.decimal(2)?);
                let ts = f.ts(5)?;
                let t = Trade {
                    symbol: self.symbol,
                    id,
                    price,
                    qty,
                    buyer_maker: f.boolean(6)?,
                };
                if found == 8 {
                    f.boolean(7)?; // is_best_match: checked, not kept
                }
                (ts, AnyEvent::Trade(t))
            }
            FileKind::BookTicker => {
                let b = Book {
                    symbol: self.symbol,
                    update_id: f.uint(0)?,
                    bid_price: f.decimal(1)?,
                    bid_qty: f.decimal(2)?,
                    ask_price: f.decimal(3)?,
                    ask_qty: f.decimal(4)?,
                };
                (f.ts(5)?, AnyEvent::Book(b))
            }
        })
    }

    fn next_event(&mut self) -> Option<Result<(u64, AnyEvent), ParseError>> {
        loop {
            match self.read_line() {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
            let Ok(text) = std::str::from_utf8(&self.buf) else {
                return Some(Err(ParseError::NotUtf8 { line: self.line }));
            };
            let mut text = text.trim_end_matches(['\n', '\r']);
            if !self.seen_first {
                text = text.trim_start_matches('\u{feff}');
            }
            if text.trim().is_empty() {
                continue;
            }
            if !self.seen_first {
                self.seen_first = true;
                let first = text.split(',').next().unwrap_or("").trim();
                if !is_number(first) {
                    continue; // a header line
                }
            }
            return Some(self.parse(text));
        }
    }
}

impl<R: BufRead> Iterator for CsvReader<R> {
    type Item = Result<(u64, AnyEvent), ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.next_event();
        if item.is_none() {
            self.done = true;
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::data;

    fn parse_all(kind: FileKind, interval: Option<&str>, text: &str) -> Vec<(u64, AnyEvent)> {
        CsvReader::new(text.as_bytes(), kind, "BTCUSDT", interval)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    }

    fn first_err(kind: FileKind, text: &str) -> ParseError {
        let interval = (kind == FileKind::Kline).then_some("1m");
        CsvReader::new(text.as_bytes(), kind, "BTCUSDT", interval)
            .unwrap()
            .find_map(Result::err)
            .expect("an error")
    }

    fn dec(s: &str) -> Decimal {
        Decimal::parse(s).unwrap()
    }

    fn sym(s: &str) -> Symbol {
        Symbol::new(s).unwrap()
    }

    #[test]
    fn real_1m_kline_file() {
        let info = FileInfo::new(FileKind::Kline, "BTCUSDT", Some("1m")).unwrap();
        let mut rd = CsvReader::open(&data("BTCUSDT-1m-2024-09-21.csv"), &info).unwrap();
        let (ts, ev) = rd.next().unwrap().unwrap();
        assert_eq!(ts, 1_726_876_859_999_000_000);
        let want = Kline {
            symbol: sym("BTCUSDT"),
            interval: sym("1m"),
            open_time: 1_726_876_800_000_000_000,
            close_time: 1_726_876_859_999_000_000,
            open: dec("63201.05"),
            high: dec("63201.06"),
            low: dec("63186"),
            close: dec("63196"),
            volume: dec("10.91101"),
            quote_volume: dec("689505.8262087"),
            trades: 2464,
            taker_buy_base: dec("6.94903"),
            taker_buy_quote: dec("439120.7714139"),
        };
        assert_eq!(ev, AnyEvent::Kline(want));
        let mut n = 1;
        let mut prev = ts;
        for item in rd.by_ref() {
            let (ts, ev) = item.unwrap();
            assert_eq!(ts - prev, 60_000_000_000, "one bar a minute");
            let AnyEvent::Kline(k) = ev else {
                panic!("not a kline")
            };
            assert_eq!(k.close_time - k.open_time, 59_999_000_000);
            prev = ts;
            n += 1;
        }
        assert_eq!(n, 1440);
        assert_eq!(rd.line(), 1440);
        assert_eq!(
            rd.bytes_read(),
            std::fs::metadata(data("BTCUSDT-1m-2024-09-21.csv"))
                .unwrap()
                .len()
        );
    }

    #[test]
    fn real_1h_monthly_kline_file() {
        let path = data("BTCUSDT-1h-2024-08.csv");
        let info = crate::names::infer(&path).unwrap();
        let events: Vec<_> = CsvReader::open(&path, &info)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(events.len(), 744); // 31 days of hourly bars
        assert_eq!(events[0].0, 1_722_473_999_999_000_000);
        let AnyEvent::Kline(k) = events[0].1 else {
            panic!("not a kline")
        };
        assert_eq!(k.interval.as_str(), "1h");
        assert_eq!(k.open_time, 1_722_470_400_000_000_000);
        assert_eq!(k.trades, 97642);
        assert_eq!(k.quote_volume.to_string(), "82114039.5356354");
    }

    const KLINE_MS: &str = "1726876800000,63201.05000000,63201.06000000,63186.00000000,\
        63196.00000000,10.91101000,1726876859999,689505.82620870,2464,6.94903000,\
        439120.77141390,0";

    #[test]
    fn klines_with_header_and_in_microseconds() {
        let plain = parse_all(FileKind::Kline, Some("1m"), KLINE_MS);
        let header = "open_time,open,high,low,close,volume,close_time,quote_volume,count,\
                      taker_buy_volume,taker_buy_quote_volume,ignore\r\n";
        let with_header = parse_all(
            FileKind::Kline,
            Some("1m"),
            &format!("{header}{KLINE_MS}\r\n"),
        );
        assert_eq!(plain, with_header);
        let micros = KLINE_MS
            .replace("1726876800000,", "1726876800000000,")
            .replace("1726876859999,", "1726876859999999,");
        let us = parse_all(FileKind::Kline, Some("1m"), &micros);
        assert_eq!(us[0].0, 1_726_876_859_999_999_000);
        let AnyEvent::Kline(k) = us[0].1 else {
            panic!("not a kline")
        };
        assert_eq!(k.open_time, 1_726_876_800_000_000_000);
    }

    #[test]
    fn trades_6_and_7_columns() {
        let spot = "1,63201.05000000,0.00100000,63.20105000,1704067200000,True,True\n\
                    2,63201.06000000,0.50000000,31600.53000000,1704067200001,False,True\n";
        let ev = parse_all(FileKind::Trade, None, spot);
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].0, 1_704_067_200_000_000_000);
        assert_eq!(
            ev[0].1,
            AnyEvent::Trade(Trade {
                symbol: sym("BTCUSDT"),
                id: 1,
                price: dec("63201.05"),
                qty: dec("0.001"),
                buyer_maker: true,
            })
        );
        let AnyEvent::Trade(t) = ev[1].1 else {
            panic!("not a trade")
        };
        assert!(!t.buyer_maker);
        assert_eq!(ev[1].0, 1_704_067_200_001_000_000);

        let futures = "id,price,qty,quote_qty,time,is_buyer_maker\n\
                       1,63201.05,0.001,63.20105,1704067200000,true\n\
                       2,63201.06,0.5,31600.53,1704067200001,false\n";
        assert_eq!(parse_all(FileKind::Trade, None, futures), ev);

        // 2025 spot files: microseconds.
        let us = "3,1.5,2,3,1735689600000123,True,True\n";
        assert_eq!(
            parse_all(FileKind::Trade, None, us)[0].0,
            1_735_689_600_000_123_000
        );
    }

    #[test]
    fn agg_trades() {
        let spot = "100,63201.05000000,0.00100000,5,7,1704067200000,False,True\n";
        let futures = "agg_trade_id,price,quantity,first_trade_id,last_trade_id,transact_time,\
                       is_buyer_maker\n100,63201.05,0.001,5,7,1704067200000000,false";
        let a = parse_all(FileKind::AggTrade, None, spot);
        assert_eq!(a, parse_all(FileKind::AggTrade, None, futures));
        assert_eq!(a[0].0, 1_704_067_200_000_000_000);
        assert_eq!(
            a[0].1,
            AnyEvent::Trade(Trade {
                symbol: sym("BTCUSDT"),
                id: 100,
                price: dec("63201.05"),
                qty: dec("0.001"),
                buyer_maker: false,
            })
        );
    }

    #[test]
    fn book_ticker() {
        let header = "update_id,best_bid_price,best_bid_qty,best_ask_price,best_ask_qty,\
                      transaction_time,event_time\n";
        let line = "9,63201.05,1.5,63201.06,0.25,1704067200005,1704067200007\n";
        let with = parse_all(FileKind::BookTicker, None, &format!("{header}{line}"));
        let without = parse_all(FileKind::BookTicker, None, line);
        assert_eq!(with, without);
        assert_eq!(with[0].0, 1_704_067_200_005_000_000);
        assert_eq!(
            with[0].1,
            AnyEvent::Book(Book {
                symbol: sym("BTCUSDT"),
                update_id: 9,
                bid_price: dec("63201.05"),
                bid_qty: dec("1.5"),
                ask_price: dec("63201.06"),
                ask_qty: dec("0.25"),
            })
        );
    }

    #[test]
    fn blank_lines_bom_and_no_trailing_newline() {
        let text = format!("\u{feff}{KLINE_MS}\n\n{KLINE_MS}");
        assert_eq!(parse_all(FileKind::Kline, Some("1m"), &text).len(), 2);
        assert!(parse_all(FileKind::Kline, Some("1m"), "").is_empty());
        // A header alone.
        assert!(parse_all(FileKind::Trade, None, "id,price\n").is_empty());
    }

    #[test]
    fn timestamps_normalise_by_magnitude() {
        assert_eq!(
            normalize_ts(1_726_876_859_999),
            Some(1_726_876_859_999_000_000)
        );
        assert_eq!(
            normalize_ts(1_726_876_859_999_123),
            Some(1_726_876_859_999_123_000)
        );
        assert_eq!(
            normalize_ts(1_726_876_859_999_123_456),
            Some(1_726_876_859_999_123_456)
        );
        assert_eq!(normalize_ts(0), Some(0));
        assert_eq!(normalize_ts(MICROS_FROM - 1), None); // ms, but past 2554
        assert_eq!(normalize_ts(99_999_999_999_999_999), None); // µs, but past 2554
    }

    #[test]
    fn errors_are_specific() {
        let e = first_err(FileKind::Trade, "1,abc,0.1,1,1704067200000,True\n");
        assert_eq!(e.line(), Some(1));
        let msg = e.to_string();
        assert!(msg.contains("line 1, column 2 (price)"), "{msg}");
        assert!(msg.contains("\"abc\""), "{msg}");

        let e = first_err(
            FileKind::Trade,
            "id,price,qty,quote_qty,time,is_buyer_maker\n1,1,1,1,1704067200000,yes\n",
        );
        let msg = e.to_string();
        assert!(
            msg.contains("line 2, column 6 (is_buyer_maker): \"yes\": not a boolean"),
            "{msg}"
        );

        let e = first_err(FileKind::Kline, &format!("{KLINE_MS}\n1,2,3\n"));
        let msg = e.to_string();
        assert!(
            matches!(
                e,
                ParseError::Columns {
                    line: 2,
                    found: 3,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains("a kline file has 12"), "{msg}");

        // An aggTrades file read as trades fails on the boolean column.
        let e = first_err(
            FileKind::Trade,
            "100,63201.05,0.001,5,7,1704067200000,False\n",
        );
        assert!(e.to_string().contains("column 6 (is_buyer_maker)"), "{e}");

        let e = first_err(FileKind::Trade, "1,1,1,1,-5,True\n");
        assert!(e.to_string().contains("column 5 (time)"), "{e}");
        let e = first_err(FileKind::Trade, "1,1,1,1,99999999999999,True\n");
        assert!(e.to_string().contains("timestamp out of range"), "{e}");
        let e = first_err(FileKind::BookTicker, "99999999999999999999,1,1,1,1,1,1\n");
        assert!(e.to_string().contains("column 1 (update_id)"), "{e}");
        assert!(e.to_string().contains("out of range"), "{e}");
        let e = first_err(FileKind::Kline, &KLINE_MS.replace(",1726876859999,", ",1,"));
        assert!(e.to_string().contains("close time before open time"), "{e}");

        let mut bytes = KLINE_MS.as_bytes().to_vec();
        bytes.extend_from_slice(b"\n\xff\xfe\n");
        let e = CsvReader::new(&bytes[..], FileKind::Kline, "BTCUSDT", Some("1m"))
            .unwrap()
            .find_map(Result::err)
            .unwrap();
        assert!(matches!(e, ParseError::NotUtf8 { line: 2 }), "{e}");
    }

    #[test]
    fn bad_setup_is_refused() {
        let r = CsvReader::new(&b""[..], FileKind::Kline, "BTCUSDT", None);
        assert!(matches!(r, Err(ParseError::Config(_))));
        let r = CsvReader::new(&b""[..], FileKind::Trade, "BTC USDT", None);
        assert!(matches!(r, Err(ParseError::Config(_))));
        let info = FileInfo::new(FileKind::Trade, "BTCUSDT", None).unwrap();
        let r = CsvReader::open(Path::new("/nonexistent/aegis.csv"), &info);
        assert!(matches!(r, Err(ParseError::Open { .. })));
    }

    #[test]
    fn io_errors_end_the_stream() {
        struct Broken;
        impl io::Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let mut rd =
            CsvReader::new(BufReader::new(Broken), FileKind::Trade, "BTCUSDT", None).unwrap();
        let e = rd.next().unwrap().unwrap_err();
        assert!(
            e.to_string().contains("line 1: read error: disk on fire"),
            "{e}"
        );
        assert!(rd.next().is_none());
    }
}
