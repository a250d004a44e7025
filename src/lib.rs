//! # aegis
//!
//! The daemon side of Aegis: the sequencer that merges source rings into the bus, sessions,
//! and the `aegis-shmctl` command line. Co-located processes use `aegis-shm-client` instead.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod cli;
pub mod command;
pub mod daemon;
pub mod sequencer;
pub mod session;
