//! `aegis-shmctl`: parses the command line, dispatches to `command/<verb>.rs`, reports errors.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod cli;
mod command;

use clap::Parser;

use cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let socket = command::socket(&cli.socket);
    let result = match cli.command {
        Command::Serve { state_dir } => {
            command::serve::run(&socket, state_dir.as_deref()).map(|()| true)
        }
        Command::Session(cmd) => command::session::run(&socket, cli.json, cmd),
        Command::Gc => command::gc::run(&socket, cli.json).map(|()| true),
        Command::Demo(a) => command::demo::run(&socket, &a),
        Command::Bench(a) => command::bench::run(cli.json, &a).map(|()| true),
        Command::Top(a) => command::top::run(&socket, cli.json, &a).map(|()| true),
        Command::Subscribe(a) => {
            command::subscribe::subscribe(&socket, cli.json, &a).map(|()| true)
        }
        Command::Subscriptions { session } => {
            command::subscribe::subscriptions(&socket, cli.json, session).map(|()| true)
        }
        Command::Call(a) => command::call::run(&socket, cli.json, &a),
        Command::Record(cmd) => command::record::run(cli.json, cmd),
        Command::Chaos(a) => command::chaos::run(&socket, cli.json, &a),
        Command::Discover(a) => command::discover::run(&socket, cli.json, &a),
        Command::Completions { shell } => {
            command::completions::run(shell);
            Ok(true)
        }
    };
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("aegis-shmctl: error: {}", e.0);
            std::process::exit(1);
        }
    }
}
