//! The byte ring both ring kinds are built on: the SPSC source rings ([`crate::spsc`]) and
//! the SPMC broadcast bus ([`crate::spmc`]).
//!
//! Everything that is the same for the two lives here, written once:
//!
//! - [`layout`]: the capacity rule and the view of the data area ([`layout::RingData`]): how a
//!   monotonic position maps to an offset, and how many bytes are left before the wrap.
//! - [`mapped`]: a validated mapping of a ring segment ([`mapped::Mapped`]): segment header,
//!   control block and data area.
//! - [`claim`]: the writer's side of the frame rules: a frame takes at most half the ring, and
//!   one that does not fit before the wrap is placed at the start of the next lap after
//!   padding (a PADDING frame, or an implicit skip when the gap is shorter than a header).
//! - [`scan`]: the reader's side of the same rules: what lies at a position (padding to the
//!   wrap, or a frame header).
//!
//! What differs stays with each ring: who may reuse bytes (the SPSC `head`, the bus's slowest
//! consumer or its seqlock `claim`), the cursors, and how much a reader trusts what it reads.

pub(crate) mod claim;
pub(crate) mod layout;
pub(crate) mod mapped;
pub(crate) mod scan;

pub use layout::{check_capacity, MIN_CAPACITY};
