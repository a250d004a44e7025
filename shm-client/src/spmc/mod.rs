//! The broadcast bus: one writer (the sequencer), up to [`MAX_CONSUMERS`] readers, each with
//! its own cursor on its own cache line.
//!
//! Positions are monotonic byte counts as in the source rings. Two policies:
//!
//! - **`Block`** (backtest): the writer never overwrites bytes an attached consumer has not
//!   released. Before reusing bytes it loads every attached slot's `cursor` with Acquire
//!   (pairs with the consumer's Release store in `BusReader::publish_cursor`). Consumers read
//!   frames in place, zero-copy.
//! - **`Overwrite`** (live): the writer never waits. Before it overwrites bytes it announces how
//!   far it will write in `claim` (a seqlock: store `claim`, Release fence, write bytes, publish
//!   `tail`). A consumer copies the frame out, then (Acquire fence) reloads `claim`: if the
//!   writer may have overwritten the frame, the copy is discarded and the consumer is lapped.
//!   It resumes at the head and reports `Overrun { missed }`, where `missed` is the exact
//!   number of bus frames it skipped (computed from the bus sequence of the frame it resumes
//!   at).
//!
//! Each slot also holds its consumer's topic filter ([`TopicMask`], one word), so that the
//! daemon can show it and the client library can reconcile it with the desired set.

mod layout;
mod mask;
mod monitor;
mod reader;
mod writer;

pub use layout::MAX_CONSUMERS;
pub use layout::{create_shm, geometry, init_region, region_len, BusControl, Policy, Slot};
pub use mask::{TopicMask, TopicOutOfRange, MAX_TOPICS};
pub use monitor::{BusMonitor, SlotStats};
pub use reader::{AttachError, BusFrame, BusReader, ReadError, SlotTopics};
pub use writer::{BusWriter, WriteError};
