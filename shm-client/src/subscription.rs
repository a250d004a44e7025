//! Declarative subscriptions (SPEC section 14): the messages of the control protocol that
//! carry a component's desired set, and the rules its names follow.
//!
//! The daemon holds, per session and component name, the topics a consumer should receive
//! and the symbols a producer that accepts a symbol set should produce ([`Desired`]). It
//! pushes a `SUBSCRIPTIONS` message ([`Push`]) on every change and answers a component's
//! `SUBSCRIPTIONS` request with one. The client library compares the desired set with the
//! actual one every `reconcile_s` seconds, repairs any difference (counted as drift) and says
//! what it found in a `RECONCILED` message ([`Report`]). `docs/protocol.md` has the flow.

use serde::{Deserialize, Serialize};

use crate::protocol::{ComponentState, Role};

/// Default period of the client's reconciliation, in seconds.
pub const DEFAULT_RECONCILE_S: u64 = 30;
/// Allowed periods, in seconds.
pub const RECONCILE_S: std::ops::RangeInclusive<u64> = 1..=3600;
/// Most names in one topic or symbol list.
pub const MAX_LIST: usize = 256;

/// A set of topic or symbol names: every one, or only these.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum NameSet {
    /// Every name (a consumer that did not subscribe reads every topic).
    #[default]
    All,
    /// Only these names, sorted and without duplicates.
    Only(Vec<String>),
}

impl NameSet {
    /// The set of `names`, sorted, duplicates removed.
    pub fn only(names: impl IntoIterator<Item = String>) -> NameSet {
        let mut v: Vec<String> = names.into_iter().collect();
        v.sort();
        v.dedup();
        NameSet::Only(v)
    }

    /// Whether `name` is in the set.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            NameSet::All => true,
            NameSet::Only(v) => v.binary_search_by(|n| n.as_str().cmp(name)).is_ok(),
        }
    }
}

impl std::fmt::Display for NameSet {
    /// `*` for every name, else the names joined by commas (`-` for none).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NameSet::All => f.pad("*"),
            NameSet::Only(v) if v.is_empty() => f.pad("-"),
            NameSet::Only(v) => f.pad(&v.join(",")),
        }
    }
}

/// What a component should receive, as the daemon holds it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Consumers: the topics to deliver.
    #[serde(default)]
    pub topics: NameSet,
    /// Producers that accept a symbol set: the symbols to produce.
    #[serde(default)]
    pub symbols: NameSet,
    /// Bumped on every change (daemon-wide, persisted): a component ignores a push older than
    /// the set it holds.
    #[serde(default)]
    pub version: u64,
}

/// Why the daemon sent a `SUBSCRIPTIONS` message.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The desired set changed (`aegis-shmctl subscribe`): apply it at once.
    Changed,
    /// The component asked (its reconciliation re-reads the desired set).
    Requested,
}

/// Daemon → component: the desired set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Push {
    /// The set.
    #[serde(flatten)]
    pub desired: Desired,
    /// Why it was sent.
    pub cause: Cause,
}

/// Component → daemon (`RECONCILED`): what one reconciliation found and did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// The consumer's topic filter after the reconciliation (`None`: not a consumer, or not
    /// attached yet).
    #[serde(default)]
    pub topics: Option<NameSet>,
    /// The symbols the producer's callback reports after it (`None`: no callback).
    #[serde(default)]
    pub symbols: Option<NameSet>,
    /// The version of the desired set it reconciled with.
    #[serde(default)]
    pub version: u64,
    /// Differences found by periodic reconciliations (and repaired) since the component
    /// registered.
    #[serde(default)]
    pub drift: u64,
    /// Reconciliations run since the component registered.
    #[serde(default)]
    pub reconciles: u64,
    /// How long this one took, in microseconds.
    #[serde(default)]
    pub duration_us: u64,
    /// What could not be applied (a topic no source publishes, a slot lost, no answer).
    #[serde(default)]
    pub errors: Vec<String>,
}

/// The answer to `SUBSCRIBE`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Subscribed {
    /// Session name.
    pub name: String,
    /// Component name.
    pub component: String,
    /// The desired set now.
    pub desired: Desired,
    /// Whether a running component of that name was sent the change (else it gets it when
    /// it registers).
    pub pushed: bool,
}

/// Which set a row of `aegis-shmctl subscriptions` is about.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SetKind {
    /// A consumer's topics.
    Topics,
    /// A producer's symbols.
    Symbols,
}

/// One row of the answer to `SESSION_SUBSCRIPTIONS`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SubscriptionInfo {
    /// Component name.
    pub component: String,
    /// Its role, if a component of that name registered in this session.
    pub role: Option<Role>,
    /// Its state, likewise.
    pub state: Option<ComponentState>,
    /// Topics or symbols.
    pub set: SetKind,
    /// The desired set.
    pub desired: NameSet,
    /// The actual one: a consumer's slot mask (read by the daemon), a producer's last report;
    /// `None` while unknown.
    pub actual: Option<NameSet>,
    /// `actual == desired` (`None` while unknown).
    pub in_sync: Option<bool>,
    /// Drift repaired so far (from the component's last report).
    pub drift: u64,
    /// Reconciliations so far.
    pub reconciles: u64,
    /// Seconds since the last report.
    pub last_reconcile_age_s: Option<f64>,
    /// How long the last reconciliation took, in milliseconds.
    pub last_reconcile_ms: Option<f64>,
    /// Errors of the last reconciliation.
    pub errors: Vec<String>,
}

/// The answer to `SESSION_SUBSCRIPTIONS`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SubscriptionsView {
    /// Session name.
    pub name: String,
    /// The session's reconciliation period.
    pub reconcile_s: u64,
    /// One row per set held or reconciled, by component name.
    pub components: Vec<SubscriptionInfo>,
}

/// Why a topic or symbol list was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    /// An empty list, an empty entry (`a,,b`), or blanks around an entry.
    #[error("malformed {what} list {list:?}: {why}")]
    Malformed {
        /// `topic` or `symbol`.
        what: &'static str,
        /// The list as given.
        list: String,
        /// What is wrong.
        why: String,
    },
    /// A name outside the allowed characters or length.
    #[error("{0}")]
    BadName(String),
    /// More than [`MAX_LIST`] entries.
    #[error("a {0} list holds at most {MAX_LIST} names")]
    TooLong(&'static str),
}

/// Parses a comma-separated topic list (`trades.BTCUSDT,klines.BTCUSDT.1m`): every entry a
/// valid name (`[A-Za-z0-9._-]{1,64}`), none empty. Sorted, duplicates removed.
pub fn parse_topics(list: &str) -> Result<Vec<String>, ListError> {
    parse_list(list, "topic")
}

/// Parses a comma-separated symbol list (`BTCUSDT,ETHUSDT`): every entry 1 to 16 of
/// `[A-Za-z0-9._-]`, none empty. Sorted, duplicates removed.
pub fn parse_symbols(list: &str) -> Result<Vec<String>, ListError> {
    parse_list(list, "symbol")
}

fn parse_list(list: &str, what: &'static str) -> Result<Vec<String>, ListError> {
    let malformed = |why: String| ListError::Malformed {
        what,
        list: list.to_string(),
        why,
    };
    if list.is_empty() {
        return Err(malformed("it is empty".into()));
    }
    let names: Vec<String> = list.split(',').map(str::to_string).collect();
    for (i, n) in names.iter().enumerate() {
        if n.is_empty() {
            return Err(malformed(format!("entry {} is empty", i + 1)));
        }
        if n.trim() != n {
            return Err(malformed(format!("entry {} has blanks around it", i + 1)));
        }
    }
    check_names(&names, what)?;
    let mut names = names;
    names.sort();
    names.dedup();
    Ok(names)
}

/// Checks each name of a topic (`what == "topic"`) or symbol list, and the list's length.
pub fn check_names(names: &[String], what: &'static str) -> Result<(), ListError> {
    if names.len() > MAX_LIST {
        return Err(ListError::TooLong(what));
    }
    for n in names {
        let ok = if what == "symbol" {
            crate::event::Symbol::new(n).is_ok()
        } else {
            crate::protocol::valid_name(n)
        };
        if !ok {
            let rule = if what == "symbol" {
                "1 to 16 of [A-Za-z0-9._-]"
            } else {
                "[A-Za-z0-9._-]{1,64}"
            };
            let shown: String = n.chars().take(80).collect();
            return Err(ListError::BadName(format!(
                "{what} {shown:?}{} must be {rule}",
                if n.chars().count() > 80 { "..." } else { "" }
            )));
        }
    }
    Ok(())
}

/// The topics of the original REGISTER payload's `requires` × `supported_symbols` ×
/// `supported_timeframes` (SPEC section 14): `klines` (or `kline`) gives
/// `klines.SYMBOL.TIMEFRAME`, `orderbook` (or `book`) gives `book.SYMBOL`, `trades` (or
/// `trade`) gives `trades.SYMBOL`. Fails on an unknown kind, or `klines` without timeframes.
pub fn resolve_requires(
    requires: &[String],
    symbols: &[String],
    timeframes: &[String],
) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for r in requires {
        for s in symbols {
            match r.as_str() {
                "klines" | "kline" => {
                    if timeframes.is_empty() {
                        return Err(format!(
                            "requires {r:?} needs supported_timeframes (e.g. [\"1m\"])"
                        ));
                    }
                    out.extend(timeframes.iter().map(|t| format!("klines.{s}.{t}")));
                }
                "orderbook" | "book" => out.push(format!("book.{s}")),
                "trades" | "trade" => out.push(format!("trades.{s}")),
                other => {
                    return Err(format!(
                        "unknown required kind {other:?} (klines, orderbook or trades)"
                    ))
                }
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_or_say_why() {
        assert_eq!(
            parse_topics("trades.B,book.A,trades.B").unwrap(),
            ["book.A", "trades.B"]
        );
        for bad in ["", "a,,b", "a,", " a", "a/b"] {
            assert!(parse_topics(bad).is_err(), "{bad:?}");
        }
        assert!(parse_symbols(&"X".repeat(17)).is_err());
        let long = "t".repeat(65);
        let e = parse_topics(&long).unwrap_err().to_string();
        assert!(e.contains("must be [A-Za-z0-9._-]{1,64}"), "{e}");
    }

    #[test]
    fn requires_resolve_to_topics() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            resolve_requires(&s(&["klines", "orderbook"]), &s(&["BTCUSDT"]), &s(&["1m"])).unwrap(),
            ["book.BTCUSDT", "klines.BTCUSDT.1m"]
        );
        assert!(resolve_requires(&s(&["candles"]), &s(&["X"]), &[]).is_err());
        assert!(resolve_requires(&s(&["klines"]), &s(&["X"]), &[]).is_err());
    }

    #[test]
    fn name_sets() {
        let s = NameSet::only(["b".to_string(), "a".to_string(), "b".to_string()]);
        assert_eq!(s.to_string(), "a,b");
        assert!(s.contains("a") && !s.contains("c"));
        assert!(NameSet::All.contains("x"));
        assert_eq!(serde_json::to_string(&NameSet::All).unwrap(), "\"all\"");
    }
}
