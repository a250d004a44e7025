//! Source kinds and Binance file names.
//!
//! Binance's public data files are named `SYMBOL-TYPE-DATE.csv`, where TYPE is a kline
//! interval (`1m`, `1h`, `1d`, `1mo`, ...), `trades`, `aggTrades` or `bookTicker`, and DATE is
//! `YYYY-MM-DD` (daily files) or `YYYY-MM` (monthly files):
//!
//! | file name | kind | symbol | interval |
//! |---|---|---|---|
//! | `BTCUSDT-1m-2024-09-21.csv` | [`FileKind::Kline`] | `BTCUSDT` | `1m` |
//! | `BTCUSDT-1h-2024-08.csv` | [`FileKind::Kline`] | `BTCUSDT` | `1h` |
//! | `BTCUSDT-trades-2024-01-01.csv` | [`FileKind::Trade`] | `BTCUSDT` | |
//! | `BTCUSDT-aggTrades-2024-01-01.csv` | [`FileKind::AggTrade`] | `BTCUSDT` | |
//! | `BTCUSDT-bookTicker-2024-01-01.csv` | [`FileKind::BookTicker`] | `BTCUSDT` | |
//!
//! A Binance download `SYMBOL-TYPE-DATE.zip` (holding `SYMBOL-TYPE-DATE.csv`, see
//! [`crate::archive`]) reads the same way: only the last extension is dropped.
//!
//! [`infer`] reads a name; [`resolve`] combines it with the user's `--kind`, `--symbol` and
//! `--interval` overrides (an override always wins, and when the overrides say everything the
//! name is not read at all). [`default_source_name`] is the file name without its extension.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use aegis_shm_client::event::Symbol;
use aegis_shm_client::frame::Kind;

/// The kind of a source file. Two file kinds carry trades: `trades` and `aggTrades`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileKind {
    /// Klines (candles), 12 columns.
    Kline,
    /// Individual trades (`trades`), 6 or 7 columns.
    Trade,
    /// Aggregated trades (`aggTrades`), 7 or 8 columns.
    AggTrade,
    /// Best bid and ask (`bookTicker`), 7 columns.
    BookTicker,
}

impl FileKind {
    /// Every file kind.
    pub const ALL: [FileKind; 4] = [
        FileKind::Kline,
        FileKind::Trade,
        FileKind::AggTrade,
        FileKind::BookTicker,
    ];

    /// The frame kind of the events this file produces.
    pub fn event_kind(self) -> Kind {
        match self {
            FileKind::Kline => Kind::Kline,
            FileKind::Trade | FileKind::AggTrade => Kind::Trade,
            FileKind::BookTicker => Kind::Book,
        }
    }

    /// The name used by `--kind` (`kline`, `trade`, `aggtrade`, `book`).
    pub fn flag_name(self) -> &'static str {
        match self {
            FileKind::Kline => "kline",
            FileKind::Trade => "trade",
            FileKind::AggTrade => "aggtrade",
            FileKind::BookTicker => "book",
        }
    }

    /// A stable byte for journal headers (1..=4).
    pub fn to_u8(self) -> u8 {
        self.journal_kind() as u8
    }

    /// The journal header's kind code ([`FileKind::to_u8`] is its value).
    pub fn journal_kind(self) -> aegis_shm_client::journal::JournalKind {
        use aegis_shm_client::journal::JournalKind;
        match self {
            FileKind::Kline => JournalKind::Kline,
            FileKind::Trade => JournalKind::Trade,
            FileKind::AggTrade => JournalKind::AggTrade,
            FileKind::BookTicker => JournalKind::Book,
        }
    }

    /// The inverse of [`FileKind::to_u8`].
    pub fn from_u8(b: u8) -> Option<FileKind> {
        FileKind::ALL.into_iter().find(|k| k.to_u8() == b)
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.flag_name())
    }
}

impl FromStr for FileKind {
    type Err = NameError;

    /// Accepts the `--kind` names (`kline`, `trade`, `aggtrade`, `book`) and, case-insensitively,
    /// the Binance spellings and plurals (`klines`, `trades`, `aggTrades`, `bookTicker`, ...).
    fn from_str(s: &str) -> Result<FileKind, NameError> {
        match s.to_ascii_lowercase().as_str() {
            "kline" | "klines" => Ok(FileKind::Kline),
            "trade" | "trades" => Ok(FileKind::Trade),
            "aggtrade" | "aggtrades" | "agg-trade" | "agg_trade" => Ok(FileKind::AggTrade),
            "book" | "bookticker" | "book-ticker" | "book_ticker" => Ok(FileKind::BookTicker),
            _ => Err(NameError(format!(
                "unknown kind {s:?}: expected kline, trade, aggtrade or book"
            ))),
        }
    }
}

/// What a source file holds: its kind, its symbol and (klines only) its interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    /// The file kind.
    pub kind: FileKind,
    /// The symbol, e.g. `BTCUSDT` (valid for [`Symbol::new`]).
    pub symbol: String,
    /// The kline interval, e.g. `1m`; `Some` exactly for [`FileKind::Kline`].
    pub interval: Option<String>,
}

impl FileInfo {
    /// Builds and validates: the symbol and interval must be valid [`Symbol`]s, and klines need
    /// an interval while the other kinds refuse one.
    pub fn new(
        kind: FileKind,
        symbol: &str,
        interval: Option<&str>,
    ) -> Result<FileInfo, NameError> {
        Symbol::new(symbol).map_err(|e| NameError(format!("bad symbol: {e}")))?;
        match (kind, interval) {
            (FileKind::Kline, None) => {
                return Err(NameError(
                    "klines need an interval (e.g. --interval 1m)".to_string(),
                ))
            }
            (FileKind::Kline, Some(i)) => {
                Symbol::new(i).map_err(|e| NameError(format!("bad interval: {e}")))?;
            }
            (_, Some(i)) => {
                return Err(NameError(format!(
                    "an interval ({i:?}) only applies to klines, not to {kind} files"
                )))
            }
            (_, None) => {}
        }
        Ok(FileInfo {
            kind,
            symbol: symbol.to_string(),
            interval: interval.map(str::to_string),
        })
    }

    /// The topic name (SPEC section 5): `trades.<SYMBOL>` (trades and aggTrades),
    /// `book.<SYMBOL>` or `klines.<SYMBOL>.<interval>`.
    pub fn topic(&self) -> String {
        match self.kind {
            FileKind::Trade | FileKind::AggTrade => format!("trades.{}", self.symbol),
            FileKind::BookTicker => format!("book.{}", self.symbol),
            FileKind::Kline => format!(
                "klines.{}.{}",
                self.symbol,
                self.interval.as_deref().unwrap_or("")
            ),
        }
    }

    /// The symbol as a [`Symbol`] (validated by [`FileInfo::new`]; fails only if the public
    /// fields were changed since).
    pub fn symbol(&self) -> Result<Symbol, NameError> {
        Symbol::new(&self.symbol).map_err(|e| NameError(format!("bad symbol: {e}")))
    }

    /// The interval as a [`Symbol`], or an all-zero symbol when there is none.
    pub fn interval(&self) -> Result<Symbol, NameError> {
        match &self.interval {
            Some(i) => Symbol::new(i).map_err(|e| NameError(format!("bad interval: {e}"))),
            None => Ok(Symbol::default()),
        }
    }
}

/// Why a name could not be read or a kind, symbol or interval was refused. The message says
/// what was expected and which flag overrides it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameError(pub String);

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NameError {}

/// The file name of `path` without directories and without its last extension.
fn stem(path: &Path) -> Option<&str> {
    path.file_stem().and_then(|s| s.to_str())
}

/// Whether `s` looks like a kline interval: digits followed by `s`, `m`, `h`, `d`, `w` or `mo`
/// (Binance uses `1s`, `1m`..`30m`, `1h`..`12h`, `1d`, `3d`, `1w`, `1mo`).
fn is_interval(s: &str) -> bool {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && matches!(&s[digits..], "s" | "m" | "h" | "d" | "w" | "mo")
}

/// Infers the kind, symbol and interval from a Binance file name (see the module docs).
/// Fails with a message naming the file and the flags that override the inference.
pub fn infer(path: &Path) -> Result<FileInfo, NameError> {
    let shown = path.display();
    let fail = |why: &str| {
        NameError(format!(
            "cannot infer the kind of {shown:?} from its name: {why}; expected \
             SYMBOL-TYPE-DATE.csv with TYPE an interval (1m, 1h, ...), trades, aggTrades or \
             bookTicker, e.g. BTCUSDT-1m-2024-09-21.csv; pass --kind, --symbol and --interval"
        ))
    };
    let stem = stem(path).ok_or_else(|| fail("no file name"))?;
    let stem = stem.strip_suffix(".csv").unwrap_or(stem);
    let mut parts = stem.split('-');
    let symbol = parts.next().unwrap_or("");
    let ty = parts.next().ok_or_else(|| fail("no TYPE part"))?;
    if let Some(bad) = parts.find(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return Err(fail(&format!("{bad:?} is not part of a date")));
    }
    let (kind, interval) = match ty {
        t if is_interval(t) => (FileKind::Kline, Some(t)),
        t => match t.to_ascii_lowercase().as_str() {
            "trades" => (FileKind::Trade, None),
            "aggtrades" => (FileKind::AggTrade, None),
            "bookticker" => (FileKind::BookTicker, None),
            _ => return Err(fail(&format!("unknown TYPE {t:?}"))),
        },
    };
    FileInfo::new(kind, symbol, interval).map_err(|e| fail(&e.0))
}

/// Combines the user's overrides with what the file name says: each given override wins; the
/// name is read only if something is missing. An `interval` override is refused for non-kline
/// kinds, and an interval read from the name is dropped when `kind` overrides it to a
/// non-kline kind.
pub fn resolve(
    path: &Path,
    kind: Option<FileKind>,
    symbol: Option<&str>,
    interval: Option<&str>,
) -> Result<FileInfo, NameError> {
    if let (Some(k), Some(s)) = (kind, symbol) {
        if k != FileKind::Kline || interval.is_some() {
            return FileInfo::new(k, s, interval);
        }
    }
    let inferred = infer(path)?;
    let kind = kind.unwrap_or(inferred.kind);
    let symbol = symbol.unwrap_or(&inferred.symbol);
    let interval = match (kind, interval) {
        (_, Some(i)) => Some(i),
        (FileKind::Kline, None) => inferred.interval.as_deref(),
        (_, None) => None,
    };
    FileInfo::new(kind, symbol, interval)
}

/// The default source name of a file: its name without directories and without its last
/// extension (`data/BTCUSDT-1m-2024-09-21.csv` -> `BTCUSDT-1m-2024-09-21`). Fails when the
/// result is not a valid source name (`[A-Za-z0-9._-]{1,64}`), telling the user to pass
/// `--source`.
pub fn default_source_name(path: &Path) -> Result<String, NameError> {
    let name = stem(path).unwrap_or("");
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(name.to_string())
    } else {
        Err(NameError(format!(
            "{:?} does not give a valid source name ([A-Za-z0-9._-], 1 to 64 characters); \
             pass --source NAME",
            path.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(kind: FileKind, symbol: &str, interval: Option<&str>) -> FileInfo {
        FileInfo::new(kind, symbol, interval).unwrap()
    }

    #[test]
    fn infers_binance_names() {
        for (name, want) in [
            (
                "BTCUSDT-1m-2024-09-21.csv",
                info(FileKind::Kline, "BTCUSDT", Some("1m")),
            ),
            (
                "data/binance/BTCUSDT-1h-2024-08.csv",
                info(FileKind::Kline, "BTCUSDT", Some("1h")),
            ),
            (
                "ETHUSDT-1mo-2024-08.csv",
                info(FileKind::Kline, "ETHUSDT", Some("1mo")),
            ),
            (
                "/x/BTCUSDT-trades-2024-01-01.csv",
                info(FileKind::Trade, "BTCUSDT", None),
            ),
            (
                "BTCUSDT-aggTrades-2024-01-01.csv",
                info(FileKind::AggTrade, "BTCUSDT", None),
            ),
            (
                "BTCUSDT-bookTicker-2024-01-01.csv",
                info(FileKind::BookTicker, "BTCUSDT", None),
            ),
            // A journal converted from a CSV keeps the name.
            (
                "BTCUSDT-trades-2024-01.jnl",
                info(FileKind::Trade, "BTCUSDT", None),
            ),
            (
                "BTCUSDT-1m.csv",
                info(FileKind::Kline, "BTCUSDT", Some("1m")),
            ),
        ] {
            assert_eq!(infer(Path::new(name)).unwrap(), want, "{name}");
        }
    }

    #[test]
    fn refuses_what_it_cannot_infer() {
        for name in [
            "trades.csv",
            "BTCUSDT-metrics-2024-01-01.csv",
            "BTCUSDT-1x-2024-01-01.csv",
            "BTCUSDT-1m-2024-09-21-copy.csv",
            "-1m-2024-09-21.csv",
            "AVERYLONGSYMBOLNAME1-1m-2024-09-21.csv",
            "",
        ] {
            let err = infer(Path::new(name)).unwrap_err();
            assert!(err.0.contains("cannot infer"), "{name}: {err}");
            assert!(err.0.contains("--kind"), "{name}: {err}");
        }
    }

    #[test]
    fn overrides_win_and_fill_gaps() {
        let p = Path::new("BTCUSDT-1m-2024-09-21.csv");
        assert_eq!(
            resolve(p, None, Some("ETHUSDT"), None).unwrap(),
            info(FileKind::Kline, "ETHUSDT", Some("1m"))
        );
        assert_eq!(
            resolve(p, None, None, Some("5m")).unwrap(),
            info(FileKind::Kline, "BTCUSDT", Some("5m"))
        );
        // Overriding the kind drops the interval read from the name.
        assert_eq!(
            resolve(p, Some(FileKind::Trade), None, None).unwrap(),
            info(FileKind::Trade, "BTCUSDT", None)
        );
        // Everything given: the name is not read.
        let odd = Path::new("whatever.csv");
        assert_eq!(
            resolve(odd, Some(FileKind::BookTicker), Some("BTCUSDT"), None).unwrap(),
            info(FileKind::BookTicker, "BTCUSDT", None)
        );
        assert_eq!(
            resolve(odd, Some(FileKind::Kline), Some("BTCUSDT"), Some("1h")).unwrap(),
            info(FileKind::Kline, "BTCUSDT", Some("1h"))
        );
        // Not enough given and nothing to infer.
        assert!(resolve(odd, Some(FileKind::Kline), Some("BTCUSDT"), None).is_err());
        assert!(resolve(odd, None, Some("BTCUSDT"), None).is_err());
        // Inconsistent overrides.
        let e = resolve(p, Some(FileKind::Trade), None, Some("1m")).unwrap_err();
        assert!(e.0.contains("only applies to klines"), "{e}");
        assert!(resolve(p, None, Some("BAD SYMBOL"), None).is_err());
    }

    #[test]
    fn kinds_parse_and_round_trip() {
        for k in FileKind::ALL {
            assert_eq!(k.flag_name().parse::<FileKind>().unwrap(), k);
            assert_eq!(FileKind::from_u8(k.to_u8()), Some(k));
        }
        assert_eq!("aggTrades".parse::<FileKind>().unwrap(), FileKind::AggTrade);
        assert_eq!(
            "bookTicker".parse::<FileKind>().unwrap(),
            FileKind::BookTicker
        );
        assert!("depth".parse::<FileKind>().is_err());
        assert_eq!(FileKind::from_u8(0), None);
        assert_eq!(FileKind::AggTrade.event_kind(), Kind::Trade);
        assert_eq!(FileKind::BookTicker.event_kind(), Kind::Book);
    }

    #[test]
    fn topics() {
        assert_eq!(
            info(FileKind::Kline, "BTCUSDT", Some("1m")).topic(),
            "klines.BTCUSDT.1m"
        );
        assert_eq!(
            info(FileKind::Trade, "BTCUSDT", None).topic(),
            "trades.BTCUSDT"
        );
        assert_eq!(
            info(FileKind::AggTrade, "BTCUSDT", None).topic(),
            "trades.BTCUSDT"
        );
        assert_eq!(
            info(FileKind::BookTicker, "BTCUSDT", None).topic(),
            "book.BTCUSDT"
        );
    }

    #[test]
    fn default_source_names() {
        assert_eq!(
            default_source_name(Path::new("data/binance/BTCUSDT-1m-2024-09-21.csv")).unwrap(),
            "BTCUSDT-1m-2024-09-21"
        );
        assert_eq!(default_source_name(Path::new("x.y.csv")).unwrap(), "x.y");
        assert_eq!(default_source_name(Path::new("noext")).unwrap(), "noext");
        assert!(default_source_name(Path::new("my file.csv")).is_err());
        assert!(default_source_name(Path::new("/")).is_err());
        let long = format!("{}.csv", "a".repeat(65));
        assert!(default_source_name(Path::new(&long)).is_err());
    }
}
