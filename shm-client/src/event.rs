//! The event schema (rkyv 0.8): [`Trade`], [`Book`] and [`Kline`] (market data), and
//! [`Custom`] (an application's own event: a type name and opaque bytes).
//!
//! Every event is fixed-size, with no out-of-line data, so its archive is exactly
//! `size_of::<Archived…>()` bytes and a producer knows how much ring space to claim before it
//! serialises straight into ring memory. Prices and quantities are [`Decimal`]s: an integer
//! mantissa and a decimal scale, normalised (no trailing zeros), so any 8-decimal Binance input
//! round-trips exactly.

use std::fmt;

use rkyv::rancor;
use rkyv::{Archive, Deserialize, Serialize};

use crate::frame::Kind;

/// An exact decimal: `mantissa / 10^scale`, normalised so that `mantissa % 10 != 0` unless
/// `scale == 0`. Two equal values therefore have equal representations.
#[derive(Archive, Serialize, Deserialize, Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug))]
pub struct Decimal {
    /// The digits, with the sign.
    pub mantissa: i64,
    /// How many of the digits are after the point (0..=18).
    pub scale: u8,
}

/// Why a decimal string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid decimal {input:?}: {reason}")]
pub struct DecimalError {
    /// The input.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Decimal {
    /// Parses `-?digits(.digits)?`. Exact: fails rather than rounds.
    pub fn parse(s: &str) -> Result<Decimal, DecimalError> {
        let err = |reason| DecimalError {
            input: s.to_string(),
            reason,
        };
        let (neg, body) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let (int, frac) = match body.split_once('.') {
            Some((i, f)) => (i, f),
            None => (body, ""),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(err("no digits"));
        }
        if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return Err(err("not a decimal number"));
        }
        let frac = frac.trim_end_matches('0');
        if frac.len() > 18 {
            return Err(err("more than 18 decimals"));
        }
        let mut m: i64 = 0;
        for b in int.bytes().chain(frac.bytes()) {
            m = m
                .checked_mul(10)
                .and_then(|m| m.checked_add((b - b'0') as i64))
                .ok_or_else(|| err("out of range"))?;
        }
        Ok(Decimal {
            mantissa: if neg { -m } else { m },
            scale: frac.len() as u8,
        })
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_decimal(f, self.mantissa, self.scale)
    }
}

impl fmt::Display for ArchivedDecimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_decimal(f, self.mantissa.to_native(), self.scale)
    }
}

impl ArchivedDecimal {
    /// The native value.
    pub fn get(&self) -> Decimal {
        Decimal {
            mantissa: self.mantissa.to_native(),
            scale: self.scale,
        }
    }

    /// The value as the nearest `f64` (see [`Decimal::to_f64`]).
    pub fn to_f64(&self) -> f64 {
        self.get().to_f64()
    }
}

/// Powers of ten up to 10^18, each exactly representable as an `f64`.
const POW10: [f64; 19] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18,
];

impl Decimal {
    /// The value as the nearest `f64`, for arithmetic (a VWAP, a moving average): one
    /// division of two exactly representable numbers when `|mantissa| < 2^53`, so the result
    /// is correctly rounded. The decimal itself stays exact; convert at the edge.
    pub fn to_f64(&self) -> f64 {
        self.mantissa as f64 / POW10[(self.scale as usize).min(18)]
    }

    /// Both mantissas at the larger scale, in `i128` (always exact: at most 19 + 18 digits).
    fn aligned(self, other: Decimal) -> (i128, i128, u8) {
        let scale = self.scale.max(other.scale).min(18);
        let up = |d: Decimal| d.mantissa as i128 * 10i128.pow((scale - d.scale.min(scale)) as u32);
        (up(self), up(other), scale)
    }

    /// The decimal of `mantissa / 10^scale` with trailing zeros dropped, if it fits.
    fn normalized(mut mantissa: i128, mut scale: u8) -> Option<Decimal> {
        while scale > 0 && mantissa % 10 == 0 {
            mantissa /= 10;
            scale -= 1;
        }
        (scale <= 18)
            .then(|| i64::try_from(mantissa).ok())
            .flatten()
            .map(|mantissa| Decimal { mantissa, scale })
    }

    /// The exact sum, or `None` if it does not fit 18 digits after the point and an `i64`
    /// mantissa.
    pub fn checked_add(self, other: Decimal) -> Option<Decimal> {
        let (a, b, scale) = self.aligned(other);
        Decimal::normalized(a + b, scale)
    }

    /// The exact product (a notional: price × quantity), or `None` if it does not fit.
    pub fn checked_mul(self, other: Decimal) -> Option<Decimal> {
        let m = (self.mantissa as i128).checked_mul(other.mantissa as i128)?;
        let mut scale = self.scale as u32 + other.scale as u32;
        let mut m = m;
        // Drop trailing zeros first: 1.50 × 2.0 has scale 3 but value 3.
        while scale > 18 && m % 10 == 0 {
            m /= 10;
            scale -= 1;
        }
        Decimal::normalized(m, u8::try_from(scale).ok()?)
    }

    /// Compares the values (`1.5` and `1.50` are equal here, though not `==`: the derived
    /// equality compares mantissa and scale).
    pub fn cmp_value(&self, other: &Decimal) -> std::cmp::Ordering {
        let (a, b, _) = self.aligned(*other);
        a.cmp(&b)
    }
}

fn write_decimal(f: &mut fmt::Formatter<'_>, mantissa: i64, scale: u8) -> fmt::Result {
    if mantissa < 0 {
        f.write_str("-")?;
    }
    let digits = mantissa.unsigned_abs().to_string();
    let scale = scale as usize;
    if scale == 0 {
        return f.write_str(&digits);
    }
    if digits.len() > scale {
        let (i, d) = digits.split_at(digits.len() - scale);
        write!(f, "{i}.{d}")
    } else {
        write!(f, "0.{}{digits}", "0".repeat(scale - digits.len()))
    }
}

/// Bytes of a [`Symbol`].
pub const SYMBOL_LEN: usize = 16;

/// A short ASCII name (a symbol or an interval), zero-padded. Fixed-size so that events have
/// no out-of-line data.
#[derive(Archive, Serialize, Deserialize, Copy, Clone, PartialEq, Eq, Hash, Default)]
#[rkyv(derive(Debug))]
pub struct Symbol(pub [u8; SYMBOL_LEN]);

impl Symbol {
    /// Makes a symbol from 1 to 16 ASCII letters, digits, `_`, `-` or `.`.
    pub fn new(s: &str) -> Result<Symbol, String> {
        if s.is_empty() || s.len() > SYMBOL_LEN {
            return Err(format!("symbol {s:?} must be 1 to {SYMBOL_LEN} characters"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(format!(
                "symbol {s:?} has characters outside [A-Za-z0-9._-]"
            ));
        }
        let mut out = [0u8; SYMBOL_LEN];
        out[..s.len()].copy_from_slice(s.as_bytes());
        Ok(Symbol(out))
    }

    /// The symbol as text.
    pub fn as_str(&self) -> &str {
        symbol_str(&self.0)
    }
}

impl ArchivedSymbol {
    /// The symbol as text (invalid UTF-8 shows as `?`).
    pub fn as_str(&self) -> &str {
        symbol_str(&self.0)
    }
}

fn symbol_str(b: &[u8; SYMBOL_LEN]) -> &str {
    padded_str(b)
}

/// The text of a zero-padded ASCII field (invalid UTF-8 shows as `?`).
fn padded_str(b: &[u8]) -> &str {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    std::str::from_utf8(&b[..end]).unwrap_or("?")
}

impl fmt::Display for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for ArchivedSymbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// A trade (Binance `trades` or `aggTrades`).
#[derive(Archive, Serialize, Deserialize, Copy, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Trade {
    /// The symbol, e.g. `BTCUSDT`.
    pub symbol: Symbol,
    /// Trade id (aggregate trade id for aggTrades).
    pub id: u64,
    /// Price.
    pub price: Decimal,
    /// Quantity.
    pub qty: Decimal,
    /// Whether the buyer was the maker.
    pub buyer_maker: bool,
}

/// Best bid and ask (Binance `bookTicker`).
#[derive(Archive, Serialize, Deserialize, Copy, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Book {
    /// The symbol.
    pub symbol: Symbol,
    /// Order-book update id.
    pub update_id: u64,
    /// Best bid price.
    pub bid_price: Decimal,
    /// Best bid quantity.
    pub bid_qty: Decimal,
    /// Best ask price.
    pub ask_price: Decimal,
    /// Best ask quantity.
    pub ask_qty: Decimal,
}

/// A closed bar (Binance kline). Its event time is its close time.
#[derive(Archive, Serialize, Deserialize, Copy, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Kline {
    /// The symbol.
    pub symbol: Symbol,
    /// The interval, e.g. `1m`.
    pub interval: Symbol,
    /// Open time, ns since the epoch.
    pub open_time: u64,
    /// Close time, ns since the epoch (the event time).
    pub close_time: u64,
    /// Open price.
    pub open: Decimal,
    /// High price.
    pub high: Decimal,
    /// Low price.
    pub low: Decimal,
    /// Close price.
    pub close: Decimal,
    /// Base volume.
    pub volume: Decimal,
    /// Quote volume.
    pub quote_volume: Decimal,
    /// Number of trades.
    pub trades: u64,
    /// Taker buy base volume.
    pub taker_buy_base: Decimal,
    /// Taker buy quote volume.
    pub taker_buy_quote: Decimal,
}

/// Longest [`Custom`] type name, in bytes.
pub const TYPE_NAME_LEN: usize = 32;
/// Most opaque bytes a [`Custom`] event carries.
pub const MAX_CUSTOM_BYTES: usize = 256;

/// Why a [`Custom`] event (or a custom source's topic) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CustomError {
    /// The type name is empty.
    #[error("a custom event's type name must not be empty")]
    EmptyTypeName,
    /// The type name is longer than [`TYPE_NAME_LEN`] bytes.
    #[error("custom event type name {name:?} is {len} bytes long, the limit is {TYPE_NAME_LEN}")]
    TypeNameTooLong {
        /// The name (cut to 64 characters if longer).
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The type name has a character outside `[A-Za-z0-9._-]`.
    #[error("custom event type name {name:?} has characters outside [A-Za-z0-9._-] (it names the topic custom.<type>)")]
    BadTypeName {
        /// The name, escaped for printing.
        name: String,
    },
    /// More than [`MAX_CUSTOM_BYTES`] bytes.
    #[error("a custom event carries at most {MAX_CUSTOM_BYTES} bytes, got {0}")]
    TooManyBytes(usize),
    /// A custom source's topic does not start with `custom.`.
    #[error("topic {0:?} is not custom.<type>")]
    NotCustomTopic(String),
}

/// The type name of a [`Custom`] event: 1 to [`TYPE_NAME_LEN`] ASCII letters, digits, `_`,
/// `-` or `.`, zero-padded. Its events travel on topic `custom.<type>`.
#[derive(Archive, Serialize, Deserialize, Copy, Clone, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug))]
pub struct TypeName([u8; TYPE_NAME_LEN]);

impl TypeName {
    /// Checks and pads `name`. Fails if it is empty, longer than [`TYPE_NAME_LEN`] bytes, or
    /// has a character outside `[A-Za-z0-9._-]` (no spaces, no control characters).
    pub fn new(name: &str) -> Result<TypeName, CustomError> {
        check_type_name(name.as_bytes())?;
        let mut out = [0u8; TYPE_NAME_LEN];
        out[..name.len()].copy_from_slice(name.as_bytes());
        Ok(TypeName(out))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        padded_str(&self.0)
    }

    /// The topic its events travel on: `custom.<type>`.
    pub fn topic(&self) -> String {
        custom_topic(self.as_str())
    }
}

impl fmt::Debug for TypeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// Prefix of the topics of custom events: `custom.<type>`.
pub const CUSTOM_TOPIC_PREFIX: &str = "custom.";

/// The topic of custom events of type `type_name`: `custom.<type>`.
pub fn custom_topic(type_name: &str) -> String {
    format!("{CUSTOM_TOPIC_PREFIX}{type_name}")
}

/// The type name a custom source's topic names (`custom.signal` → `signal`), checked as
/// [`TypeName::new`] checks it. Fails if `topic` does not start with `custom.`
/// ([`CustomError::NotCustomTopic`]) or names a bad type.
pub fn custom_topic_type(topic: &str) -> Result<TypeName, CustomError> {
    let name = topic
        .strip_prefix(CUSTOM_TOPIC_PREFIX)
        .ok_or_else(|| CustomError::NotCustomTopic(topic.to_string()))?;
    TypeName::new(name)
}

fn check_type_name(b: &[u8]) -> Result<(), CustomError> {
    let shown = || {
        String::from_utf8_lossy(b)
            .escape_debug()
            .take(64)
            .collect::<String>()
    };
    if b.is_empty() {
        return Err(CustomError::EmptyTypeName);
    }
    if b.len() > TYPE_NAME_LEN {
        return Err(CustomError::TypeNameTooLong {
            name: shown(),
            len: b.len(),
        });
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
    {
        return Err(CustomError::BadTypeName { name: shown() });
    }
    Ok(())
}

/// An application event: a component's own signal, order or fill, published as a source of
/// kind `custom` into the merged stream (SPEC section 13). On equal timestamps it sorts after
/// every market-data kind. Fixed-size like every event: [`MAX_CUSTOM_BYTES`] inline, of which
/// the first [`Custom::bytes`] are the event's; the rest are zero, so equal events have equal
/// archives (and digests).
#[derive(Archive, Serialize, Deserialize, Copy, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Custom {
    type_name: TypeName,
    len: u16,
    bytes: [u8; MAX_CUSTOM_BYTES],
}

impl Custom {
    /// An event of type `type_name` (see [`TypeName::new`]) carrying `bytes` (at most
    /// [`MAX_CUSTOM_BYTES`]). The bytes are opaque to Aegis: their encoding is the
    /// application's.
    pub fn new(type_name: &str, bytes: &[u8]) -> Result<Custom, CustomError> {
        Custom::typed(TypeName::new(type_name)?, bytes)
    }

    /// As [`Custom::new`], with a type name checked already.
    pub fn typed(type_name: TypeName, bytes: &[u8]) -> Result<Custom, CustomError> {
        if bytes.len() > MAX_CUSTOM_BYTES {
            return Err(CustomError::TooManyBytes(bytes.len()));
        }
        let mut b = [0u8; MAX_CUSTOM_BYTES];
        b[..bytes.len()].copy_from_slice(bytes);
        Ok(Custom {
            type_name,
            len: bytes.len() as u16,
            bytes: b,
        })
    }

    /// The type name.
    pub fn type_name(&self) -> &str {
        self.type_name.as_str()
    }

    /// The event's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..(self.len as usize).min(MAX_CUSTOM_BYTES)]
    }
}

impl fmt::Debug for Custom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Custom")
            .field("type_name", &self.type_name)
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl ArchivedCustom {
    /// The type name (`?` if it is not UTF-8, which [`decode`] refuses).
    pub fn type_name(&self) -> &str {
        padded_str(&self.type_name.0)
    }

    /// The event's bytes (cut to [`MAX_CUSTOM_BYTES`] if the length says more, which
    /// [`decode`] refuses).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..(self.len.to_native() as usize).min(MAX_CUSTOM_BYTES)]
    }

    /// What bytecheck cannot see: a valid type name, a length within bounds, zero bytes
    /// after the event's.
    fn check(&self) -> Result<(), String> {
        let name = &self.type_name.0;
        let end = name.iter().position(|&c| c == 0).unwrap_or(TYPE_NAME_LEN);
        check_type_name(&name[..end]).map_err(|e| e.to_string())?;
        if name[end..].iter().any(|&c| c != 0) {
            return Err("custom type name not zero-padded".into());
        }
        let len = self.len.to_native() as usize;
        if len > MAX_CUSTOM_BYTES {
            return Err(CustomError::TooManyBytes(len).to_string());
        }
        if self.bytes[len..].iter().any(|&c| c != 0) {
            return Err("custom event bytes not zero-padded".into());
        }
        Ok(())
    }
}

/// An event type that can travel in a frame.
pub trait Event: Archive + for<'a, 'b> Serialize<HighSerializer<'a, 'b>> + Sized {
    /// The frame kind of this event.
    const KIND: Kind;
    /// Exact size of the archive (events have no out-of-line data).
    const ARCHIVED_LEN: usize = std::mem::size_of::<Self::Archived>();
}

/// The rkyv serializer used to write events into ring memory.
pub type HighSerializer<'a, 'b> = rkyv::api::high::HighSerializer<
    rkyv::ser::writer::Buffer<'b>,
    rkyv::ser::allocator::ArenaHandle<'a>,
    rancor::Error,
>;

impl Event for Trade {
    const KIND: Kind = Kind::Trade;
}
impl Event for Book {
    const KIND: Kind = Kind::Book;
}
impl Event for Kline {
    const KIND: Kind = Kind::Kline;
}
impl Event for Custom {
    const KIND: Kind = Kind::Custom;
}

/// Serialises `ev` into `buf` (straight into ring memory on the hot path) and returns the
/// archive's length. Fails only if `buf` is shorter than `E::ARCHIVED_LEN`.
pub fn encode_into<E: Event>(ev: &E, buf: &mut [u8]) -> Result<usize, rancor::Error> {
    let out =
        rkyv::api::high::to_bytes_in::<_, rancor::Error>(ev, rkyv::ser::writer::Buffer::from(buf))?;
    Ok(out.len())
}

/// Any event, native.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum AnyEvent {
    /// A trade.
    Trade(Trade),
    /// A book update.
    Book(Book),
    /// A kline.
    Kline(Kline),
    /// An application event.
    Custom(Custom),
}

impl AnyEvent {
    /// The symbol, whatever the market-data kind; empty for a custom event, which has none.
    pub fn symbol(&self) -> &str {
        match self {
            AnyEvent::Trade(t) => t.symbol.as_str(),
            AnyEvent::Book(b) => b.symbol.as_str(),
            AnyEvent::Kline(k) => k.symbol.as_str(),
            AnyEvent::Custom(_) => "",
        }
    }

    /// The event's frame kind.
    pub fn kind(&self) -> Kind {
        match self {
            AnyEvent::Trade(_) => Kind::Trade,
            AnyEvent::Book(_) => Kind::Book,
            AnyEvent::Kline(_) => Kind::Kline,
            AnyEvent::Custom(_) => Kind::Custom,
        }
    }

    /// Serialises the event into `buf`; see [`encode_into`].
    pub fn encode_into(&self, buf: &mut [u8]) -> Result<usize, rancor::Error> {
        match self {
            AnyEvent::Trade(e) => encode_into(e, buf),
            AnyEvent::Book(e) => encode_into(e, buf),
            AnyEvent::Kline(e) => encode_into(e, buf),
            AnyEvent::Custom(e) => encode_into(e, buf),
        }
    }

    /// Exact archive length.
    pub fn archived_len(&self) -> usize {
        archived_len(self.kind()).expect("an event kind")
    }
}

/// The payload length of an event kind (events are fixed-size); `None` for control frames.
pub fn archived_len(kind: Kind) -> Option<usize> {
    match kind {
        Kind::Trade => Some(Trade::ARCHIVED_LEN),
        Kind::Book => Some(Book::ARCHIVED_LEN),
        Kind::Kline => Some(Kline::ARCHIVED_LEN),
        Kind::Custom => Some(Custom::ARCHIVED_LEN),
        Kind::Control => None,
    }
}

/// An event read in place from ring memory.
#[derive(Copy, Clone, Debug)]
pub enum EventRef<'a> {
    /// A trade.
    Trade(&'a ArchivedTrade),
    /// A book update.
    Book(&'a ArchivedBook),
    /// A kline.
    Kline(&'a ArchivedKline),
    /// An application event.
    Custom(&'a ArchivedCustom),
}

impl<'a> EventRef<'a> {
    /// The event's kind.
    pub fn kind(&self) -> Kind {
        match self {
            EventRef::Trade(_) => Kind::Trade,
            EventRef::Book(_) => Kind::Book,
            EventRef::Kline(_) => Kind::Kline,
            EventRef::Custom(_) => Kind::Custom,
        }
    }

    /// The symbol, whatever the market-data kind; empty for a custom event, which has none.
    pub fn symbol(&self) -> &'a str {
        match self {
            EventRef::Trade(t) => t.symbol.as_str(),
            EventRef::Book(b) => b.symbol.as_str(),
            EventRef::Kline(k) => k.symbol.as_str(),
            EventRef::Custom(_) => "",
        }
    }

    /// A native copy of the event (cheap: events are small and fixed-size), for keeping it
    /// past the next read.
    pub fn to_owned(&self) -> AnyEvent {
        // Deserialising a validated archive of plain fields cannot fail.
        let owned = match self {
            EventRef::Trade(t) => {
                rkyv::deserialize::<Trade, rancor::Error>(*t).map(AnyEvent::Trade)
            }
            EventRef::Book(b) => rkyv::deserialize::<Book, rancor::Error>(*b).map(AnyEvent::Book),
            EventRef::Kline(k) => {
                rkyv::deserialize::<Kline, rancor::Error>(*k).map(AnyEvent::Kline)
            }
            EventRef::Custom(c) => {
                rkyv::deserialize::<Custom, rancor::Error>(*c).map(AnyEvent::Custom)
            }
        };
        owned.expect("a fixed-size archive of plain fields deserialises")
    }
}

/// Why a payload could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The frame is not an event (control frame).
    #[error("frame kind {0:?} carries no event")]
    NotAnEvent(Kind),
    /// rkyv's validation refused the bytes.
    #[error("invalid payload: {0}")]
    Invalid(String),
    /// The payload is too short, or misaligned, for the archived type.
    #[error("payload of {len} bytes cannot hold a {kind:?}")]
    BadSize {
        /// The kind.
        kind: Kind,
        /// Bytes available.
        len: usize,
    },
}

/// Reads the event in `payload` in place, validating it with bytecheck (and, for a custom
/// event, its type name, length and zero padding). Costs one pass over the archive's fields.
pub fn decode(kind: Kind, payload: &[u8]) -> Result<EventRef<'_>, DecodeError> {
    let inv = |e: rancor::Error| DecodeError::Invalid(e.to_string());
    Ok(match kind {
        Kind::Trade => {
            EventRef::Trade(rkyv::access::<ArchivedTrade, rancor::Error>(payload).map_err(inv)?)
        }
        Kind::Book => {
            EventRef::Book(rkyv::access::<ArchivedBook, rancor::Error>(payload).map_err(inv)?)
        }
        Kind::Kline => {
            EventRef::Kline(rkyv::access::<ArchivedKline, rancor::Error>(payload).map_err(inv)?)
        }
        Kind::Custom => {
            let c = rkyv::access::<ArchivedCustom, rancor::Error>(payload).map_err(inv)?;
            c.check().map_err(DecodeError::Invalid)?;
            EventRef::Custom(c)
        }
        Kind::Control => return Err(DecodeError::NotAnEvent(kind)),
    })
}

/// Reads the event in `payload` in place without validating its contents. Checks only the
/// length and the alignment, so the reference is at least in bounds.
///
/// # Safety
/// `payload` must hold an archive of the event `kind` names, written by [`encode_into`] (for
/// instance, a frame that came through an Aegis ring from a trusted producer).
pub unsafe fn decode_unchecked(kind: Kind, payload: &[u8]) -> Result<EventRef<'_>, DecodeError> {
    fn get<T: rkyv::Portable>(kind: Kind, p: &[u8]) -> Result<&T, DecodeError> {
        if p.len() < std::mem::size_of::<T>()
            || !(p.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
        {
            return Err(DecodeError::BadSize { kind, len: p.len() });
        }
        // SAFETY: the length and alignment were just checked; the caller guarantees the bytes
        // are a valid archive of T.
        Ok(unsafe { rkyv::access_unchecked::<T>(p) })
    }
    Ok(match kind {
        Kind::Trade => EventRef::Trade(get(kind, payload)?),
        Kind::Book => EventRef::Book(get(kind, payload)?),
        Kind::Kline => EventRef::Kline(get(kind, payload)?),
        Kind::Custom => EventRef::Custom(get(kind, payload)?),
        Kind::Control => return Err(DecodeError::NotAnEvent(kind)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::parse(s).unwrap()
    }

    #[test]
    fn decimal_arithmetic_is_exact() {
        assert_eq!(d("0.1").checked_add(d("0.2")), Some(d("0.3")));
        assert_eq!(d("63201.05").checked_add(d("-63201.05")), Some(d("0")));
        assert_eq!(d("1.50").checked_add(d("2.5")), Some(d("4")));
        assert_eq!(d("63201.05").checked_mul(d("0.001")), Some(d("63.20105")));
        assert_eq!(d("1.5").checked_mul(d("2")), Some(d("3")));
        assert_eq!(d("-2.5").checked_mul(d("0.4")), Some(d("-1")));
        // Out of range: an i64 mantissa overflows, or more than 18 decimals remain.
        assert_eq!(d("9223372036854775807").checked_add(d("1")), None);
        assert_eq!(d("0.000000001").checked_mul(d("0.0000000011")), None);
        // 1e-9 × 1e-9 = 1e-18 still fits.
        assert_eq!(
            d("0.000000001").checked_mul(d("0.000000001")),
            Some(Decimal {
                mantissa: 1,
                scale: 18
            })
        );
        use std::cmp::Ordering::*;
        assert_eq!(
            d("1.5").cmp_value(&Decimal {
                mantissa: 150,
                scale: 2
            }),
            Equal
        );
        assert_eq!(d("63201.05").cmp_value(&d("63201.1")), Less);
        assert_eq!(d("-1").cmp_value(&d("-1.01")), Greater);
    }

    #[test]
    fn decimals_round_trip_exactly() {
        for (input, shown) in [
            ("63201.05000000", "63201.05"),
            ("0.00100000", "0.001"),
            ("63186.00000000", "63186"),
            ("689505.82620870", "689505.8262087"),
            ("-1.5", "-1.5"),
            ("0", "0"),
            ("0.00000001", "0.00000001"),
            ("92233720368.54775807", "92233720368.54775807"),
            ("10000000000000.00000000", "10000000000000"),
        ] {
            let d = Decimal::parse(input).unwrap();
            assert_eq!(d.to_string(), shown, "{input}");
            assert_eq!(Decimal::parse(shown).unwrap(), d);
        }
        for bad in [
            "",
            ".",
            "1e5",
            "abc",
            "1.2.3",
            "99999999999999999999",
            "--1",
        ] {
            assert!(Decimal::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn events_encode_to_their_fixed_size_and_decode_in_place() {
        let t = Trade {
            symbol: Symbol::new("BTCUSDT").unwrap(),
            id: 7,
            price: Decimal::parse("63201.05").unwrap(),
            qty: Decimal::parse("0.001").unwrap(),
            buyer_maker: true,
        };
        #[repr(align(16))]
        struct Buf([u8; 256]);
        let mut buf = Buf([0; 256]);
        let n = encode_into(&t, &mut buf.0).unwrap();
        assert_eq!(n, Trade::ARCHIVED_LEN);
        match decode(Kind::Trade, &buf.0[..n]).unwrap() {
            EventRef::Trade(a) => {
                assert_eq!(a.symbol.as_str(), "BTCUSDT");
                assert_eq!(a.price.to_string(), "63201.05");
                assert!(a.buyer_maker);
            }
            other => panic!("{other:?}"),
        }
        // A bool byte that is neither 0 nor 1 is refused by the checked path.
        // Layout: symbol 0..16, id 16..24, price 24..40, qty 40..56, buyer_maker at 56.
        buf.0[56] = 7;
        assert!(decode(Kind::Trade, &buf.0[..n]).is_err());
    }

    #[test]
    fn decimals_to_f64_and_symbols_display() {
        for (text, want) in [
            ("63201.05", 63201.05),
            ("0.00000001", 1e-8),
            ("-12.5", -12.5),
            ("7", 7.0),
            ("689505.8262087", 689505.8262087),
        ] {
            let d = Decimal::parse(text).unwrap();
            assert_eq!(d.to_f64(), want, "{text}");
            assert_eq!(
                d.to_f64().to_string(),
                text,
                "{text} round-trips through f64"
            );
        }
        let s = Symbol::new("BTCUSDT").unwrap();
        assert_eq!(format!("{s}"), "BTCUSDT");
    }

    /// A 16-aligned buffer, as ring memory is.
    #[repr(C, align(16))]
    struct Aligned([u8; 256]);

    #[test]
    fn event_ref_symbol_kind_and_owned_copy() {
        let trade = Trade {
            symbol: Symbol::new("ETHUSDT").unwrap(),
            id: 9,
            price: Decimal::parse("2500.5").unwrap(),
            qty: Decimal::parse("0.1").unwrap(),
            buyer_maker: true,
        };
        let mut buf = Aligned([0; 256]);
        let n = encode_into(&trade, &mut buf.0).unwrap();
        let ev = decode(Kind::Trade, &buf.0[..n]).unwrap();
        assert_eq!((ev.kind(), ev.symbol()), (Kind::Trade, "ETHUSDT"));
        if let EventRef::Trade(t) = ev {
            assert_eq!(format!("{}", t.symbol), "ETHUSDT");
            assert_eq!(t.price.to_f64(), 2500.5);
        }
        let owned = ev.to_owned();
        assert_eq!(owned, AnyEvent::Trade(trade));
        assert_eq!(owned.symbol(), "ETHUSDT");
    }
}
