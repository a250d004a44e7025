//! A producer's symbol filter driven by the session's desired set (`aegis-replay --symbols`,
//! SPEC section 14): the client library calls [`SymbolFilter`] on a push and whenever its
//! reconciliation finds the filter differs from the desired set; the replay threads ask a
//! [`Gate`] per event, which costs one atomic load unless the set changed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aegis_shm_client::client::SymbolHandler;
use aegis_shm_client::subscription::NameSet;

/// The set a producer filters by, with a generation bumped on every change.
pub struct SymbolFilter {
    set: Mutex<NameSet>,
    /// Bumped after every change of `set`.
    generation: AtomicU64,
}

impl SymbolFilter {
    /// A filter that starts at `initial`.
    pub fn new(initial: NameSet) -> Arc<SymbolFilter> {
        Arc::new(SymbolFilter {
            set: Mutex::new(initial),
            generation: AtomicU64::new(1),
        })
    }

    /// A gate for the events of `symbol`.
    pub fn gate(self: &Arc<SymbolFilter>, symbol: &str) -> Gate {
        Gate {
            filter: self.clone(),
            symbol: symbol.to_string(),
            seen: 0,
            open: true,
        }
    }
}

impl SymbolHandler for SymbolFilter {
    fn apply(&self, desired: &NameSet) {
        *self.set.lock().unwrap_or_else(|e| e.into_inner()) = desired.clone();
        // Release: pairs with the Acquire load in `Gate::open`; the new set is stored before
        // a gate sees the new generation (and the mutex orders the set itself anyway).
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn actual(&self) -> NameSet {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One source's view of a [`SymbolFilter`].
pub struct Gate {
    filter: Arc<SymbolFilter>,
    symbol: String,
    /// The generation `open` was computed at.
    seen: u64,
    open: bool,
}

impl Gate {
    /// Whether the source's events go out now.
    #[inline]
    pub fn open(&mut self) -> bool {
        // Acquire: pairs with the Release increment in `SymbolFilter::apply`.
        let g = self.filter.generation.load(Ordering::Acquire);
        if g != self.seen {
            self.seen = g;
            self.open = self.filter.actual().contains(&self.symbol);
        }
        self.open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_follows_the_set() {
        let f = SymbolFilter::new(NameSet::only(["BTCUSDT".to_string()]));
        let (mut btc, mut eth) = (f.gate("BTCUSDT"), f.gate("ETHUSDT"));
        assert!(btc.open() && !eth.open());
        f.apply(&NameSet::only(["ETHUSDT".to_string()]));
        assert!(!btc.open() && eth.open());
        f.apply(&NameSet::All);
        assert!(btc.open() && eth.open());
    }
}
