//! `aegis-shmctl bench`: placeholder until the comparison module lands.

use super::CliError;
use crate::cli::BenchArgs;

/// Runs the comparison.
pub fn run(_json: bool, _a: &BenchArgs) -> Result<(), CliError> {
    Err(CliError("bench is not wired yet".into()))
}
