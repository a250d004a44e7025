//! `aegis-shmctl serve`: the daemon in the foreground.

use std::path::Path;

use super::CliError;
use aegis::daemon::Daemon;

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(socket: &Path, state_dir: Option<&Path>) -> Result<(), CliError> {
    Daemon::handle_signals();
    let state_dir = state_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| aegis::subscriptions::default_state_dir(socket));
    let d = Daemon::bind(socket, &state_dir)?;
    eprintln!(
        "aegis: serving on {} (pid {}); subscription state in {}",
        socket.display(),
        std::process::id(),
        state_dir.display()
    );
    d.run();
    eprintln!("aegis: stopped; segments and socket removed");
    Ok(())
}
