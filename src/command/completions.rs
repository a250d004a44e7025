//! `aegis-shmctl completions SHELL`: the shell completion script, generated from the clap
//! definitions by clap_complete, so it never drifts from the real command line.
//!
//! Install it with, for example,
//! `aegis-shmctl completions bash > ~/.local/share/bash-completion/completions/aegis-shmctl`,
//! `aegis-shmctl completions zsh > ~/.zfunc/_aegis-shmctl` (with `~/.zfunc` on `fpath`), or
//! `aegis-shmctl completions fish > ~/.config/fish/completions/aegis-shmctl.fish`.

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// Prints the completion script for `shell` on stdout.
pub fn run(shell: Shell) {
    let mut cmd = Cli::command();
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
}
