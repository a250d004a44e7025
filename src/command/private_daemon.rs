//! A daemon of our own on a private socket, for the verbs that run a whole session
//! (`demo`, `bench`), and the tools found next to `aegis-shmctl`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aegis::session::pid_alive;

use super::CliError;

/// How long the daemon may take to listen, and to exit after SIGTERM.
const START_DEADLINE: Duration = Duration::from_secs(10);
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// Between two looks at the socket or the exit.
const POLL: Duration = Duration::from_millis(20);

/// The path of tool `name` (`aegis-replay`, `aegis-tap`), next to this executable.
pub fn tool(name: &str) -> Result<PathBuf, CliError> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        return Err(CliError(format!(
            "{} not found next to {}: build the whole workspace (`cargo build --release --workspace`)",
            name,
            exe.display()
        )));
    }
    Ok(path)
}

/// `aegis-shmctl serve` on a private socket. Dropping it stops the daemon (SIGTERM: it
/// removes its segments and its socket; SIGKILL if it does not exit in time).
pub struct PrivateDaemon {
    child: Child,
}

impl PrivateDaemon {
    /// Starts the daemon and waits until it listens on `socket`.
    pub fn start(socket: &Path) -> Result<PrivateDaemon, CliError> {
        let child = Command::new(std::env::current_exe()?)
            .arg("serve")
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let daemon = PrivateDaemon { child };
        let end = Instant::now() + START_DEADLINE;
        while !socket.exists() {
            if Instant::now() > end || !pid_alive(daemon.child.id()) {
                return Err(CliError(format!(
                    "the private daemon did not start within {START_DEADLINE:?}"
                )));
            }
            std::thread::sleep(POLL);
        }
        Ok(daemon)
    }

    /// The CPU time it used so far (user + system), in seconds, if readable.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        // Fields after the command name (which may hold spaces, inside parentheses):
        // state is field 3, utime and stime are fields 14 and 15, in clock ticks.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (hz > 0).then(|| ticks as f64 / hz as f64)
    }

    /// Its peak resident set so far, in kB (`VmHWM`), if readable.
    pub fn peak_rss_kb(&self) -> Option<u64> {
        super::session::peak_rss_kb(self.child.id())
    }
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let end = Instant::now() + STOP_DEADLINE;
        while Instant::now() < end && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(POLL);
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A directory of our own, removed (with everything in it) on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `<tmp>/<prefix>-<pid>` afresh.
    pub fn new(prefix: &str) -> Result<TempDir, CliError> {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
