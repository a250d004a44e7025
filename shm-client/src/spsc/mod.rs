//! The SPSC source ring: one producer process writes frames, the sequencer is the only reader.
//!
//! Positions are monotonic byte counts (`u64`, never wrapping in practice); the ring offset of
//! position `p` is `p & (capacity - 1)`.
//!
//! ```text
//!   head (reader releases)        tail (producer publishes)
//!   v                             v
//! [ free | frames not yet consumed | free ... ]   tail - head <= capacity
//! ```
//!
//! Protocol:
//! - The producer writes frame bytes at `tail`, then publishes `tail` with a Release store —
//!   once per batch, not once per frame.
//! - The reader loads `tail` with Acquire, reads frames up to it, and publishes `head` with a
//!   Release store once it no longer needs the bytes.
//! - The producer reuses bytes only below `head + capacity`, with `head` loaded with Acquire.

mod layout;
mod producer;
mod reader;

pub use crate::ring::{check_capacity, MIN_CAPACITY};
pub use layout::{create_shm, geometry, init_region, region_len, RingControl};
pub use producer::{Claim, ClaimError, Producer, PushError};
pub use reader::{park_any, FrameRef, RingReader};
