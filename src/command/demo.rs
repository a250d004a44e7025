//! `aegis-shmctl demo`: placeholder.

use std::path::Path;

use super::CliError;
use crate::cli::DemoArgs;

/// Runs the demo.
pub fn run(_socket: &Path, _a: &DemoArgs) -> Result<bool, CliError> {
    Err(CliError("demo is not wired yet".into()))
}
