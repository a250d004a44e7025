//! # aegis
//!
//! The daemon side of Aegis: the control socket and its sessions, and the sequencer that
//! merges source rings into the bus. The `aegis-shmctl` command line is the binary's own
//! (`src/main.rs`); co-located processes use `aegis-shm-client` instead.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod daemon;
mod dispatch;
pub mod groups;
pub mod outbox;
pub mod pager;
pub mod recorder;
pub mod refusal;
mod registry;
mod requests;
pub mod sequencer;
pub mod session;
pub mod source;
pub mod subscriptions;
pub mod takeover;
