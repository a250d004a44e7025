//! `aegis-shmctl discover SESSION (--group G | --component C)`: the `DISCOVER` control
//! request from the command line (SPEC section 12). Prints the live members (active or
//! standby, neither fenced nor gone) and which one holds the lease; `--json` prints the
//! daemon's answer as it is, for scripts. An unknown session, group or component is the
//! daemon's refusal, printed as the error (exit 1).

use std::path::Path;
use std::time::Duration;

use aegis_shm_client::protocol::{Discovered, Request};

use crate::cli::DiscoverArgs;
use crate::command::table::{Align, TextTable};
use crate::command::{print_json, request, CliError};

/// Deadline of the request.
const T: Duration = Duration::from_secs(10);

/// Runs `discover`.
pub fn run(socket: &Path, json: bool, a: &DiscoverArgs) -> Result<bool, CliError> {
    let req = Request::Discover {
        session: Some(a.session.clone()),
        group: a.group.clone(),
        component: a.component.clone(),
    };
    let d: Discovered = request(socket, &req, T)?;
    if json {
        print_json(&d);
    } else {
        print_text(&d, a);
    }
    Ok(true)
}

/// The human-readable answer: one line about the group, then one row per live member.
fn print_text(d: &Discovered, a: &DiscoverArgs) {
    let active = d.active.as_deref().unwrap_or("none");
    match &d.group {
        Some(g) => println!(
            "group {g} of session {}: epoch {}, active: {active}, {} live member{}",
            d.session,
            d.epoch,
            d.members.len(),
            if d.members.len() == 1 { "" } else { "s" }
        ),
        None => println!(
            "component {} of session {}: in no group, {}",
            a.component.as_deref().unwrap_or("?"),
            d.session,
            if d.members.is_empty() {
                "not alive"
            } else {
                "alive"
            }
        ),
    }
    if d.members.is_empty() {
        return;
    }
    let mut t = TextTable::new(&[
        ("MEMBER", Align::Left),
        ("PID", Align::Right),
        ("ROLE", Align::Left),
        ("STATE", Align::Left),
    ]);
    for m in &d.members {
        t.row([
            m.name.clone(),
            m.pid.to_string(),
            m.role.to_string(),
            m.state.to_string(),
        ]);
    }
    t.print(2);
}
