//! `aegis-shmctl serve`: the daemon in the foreground.

use std::path::Path;

use super::CliError;
use aegis::daemon::Daemon;

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(socket: &Path) -> Result<(), CliError> {
    Daemon::handle_signals();
    let d = Daemon::bind(socket)?;
    eprintln!(
        "aegis: serving on {} (pid {})",
        socket.display(),
        std::process::id()
    );
    d.run();
    eprintln!("aegis: stopped; segments and socket removed");
    Ok(())
}
