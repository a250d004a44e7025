//! One module per `aegis-nats` verb.

pub mod export;
pub mod import;
