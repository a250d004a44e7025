//! The terminal of the live view: raw mode and the alternate screen while it runs, and the
//! terminal as it was afterwards, however the view ends: `q`, Ctrl-C (a key in raw mode),
//! SIGINT/SIGTERM/SIGHUP from outside, an error, or a panic.

use std::io::{stdout, Stdout};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::cursor::Show;
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use ratatui::Terminal;

/// Set by a termination signal; the view's loop looks at it between two waits for a key.
static STOP: AtomicBool = AtomicBool::new(false);

/// Whether a termination signal arrived.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: nix::libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::Relaxed);
}

/// Makes SIGINT, SIGTERM and SIGHUP ask the view to stop (and restore the terminal) instead
/// of killing the process with the terminal left in raw mode.
fn catch_signals() -> std::io::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: `on_signal` is async-signal-safe (one atomic store, no allocation, no lock),
        // and this process installs no other handler for these signals.
        unsafe { sigaction(sig, &action) }.map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// Whether the terminal is in raw mode on the alternate screen (set by [`Screen::enter`]).
static ENTERED: AtomicBool = AtomicBool::new(false);

/// Puts the terminal back: cooked mode, the main screen, a visible cursor. Only the first
/// call after [`Screen::enter`] acts: the panic hook and the drop of the [`Screen`] both
/// call it, and leaving the alternate screen twice would move the cursor back over what was
/// printed in between (the panic message). Errors are ignored: there is nothing better to
/// do with them on the way out.
pub fn restore() {
    if ENTERED.swap(false, Ordering::SeqCst) {
        let _ = disable_raw_mode();
        let _ = execute!(stdout(), LeaveAlternateScreen, Show);
    }
}

/// Chains a panic hook that restores the terminal before the previous hook prints the panic
/// (on the main screen, where it stays readable). Installed once per process.
fn restore_on_panic() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}

/// The terminal in raw mode on the alternate screen; restored when dropped.
pub struct Screen {
    /// The ratatui terminal drawing on stdout.
    pub terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl Screen {
    /// Catches the termination signals, installs the panic hook, and switches the terminal to
    /// raw mode and the alternate screen. Fails (with the terminal restored) if stdout is no
    /// terminal that can do that.
    pub fn enter() -> std::io::Result<Screen> {
        catch_signals()?;
        restore_on_panic();
        ENTERED.store(true, Ordering::SeqCst);
        let entered = enable_raw_mode()
            .and_then(|()| execute!(stdout(), EnterAlternateScreen))
            .and_then(|()| Terminal::new(CrosstermBackend::new(stdout())));
        match entered {
            Ok(terminal) => Ok(Screen { terminal }),
            Err(e) => {
                restore();
                Err(e)
            }
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}
