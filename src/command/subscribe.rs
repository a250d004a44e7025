//! `aegis-shmctl subscribe` and `aegis-shmctl subscriptions`: set a component's desired set,
//! and show desired vs actual for a session (SPEC section 14).

use std::path::Path;
use std::time::Duration;

use aegis_shm_client::protocol::Request;
use aegis_shm_client::subscription::{parse_symbols, parse_topics, Subscribed, SubscriptionsView};

use super::table::{Align::Left, Align::Right, TextTable};
use super::{print_json, request, CliError};
use crate::cli::SubscribeArgs;

/// Deadline of one request to the daemon (a change is written to disk before the answer).
const T: Duration = Duration::from_secs(10);

/// `subscribe SESSION COMPONENT --topics T,... | --symbols S,...`.
pub fn subscribe(socket: &Path, json_out: bool, a: &SubscribeArgs) -> Result<(), CliError> {
    let topics = a.topics.as_deref().map(parse_topics).transpose()?;
    let symbols = a.symbols.as_deref().map(parse_symbols).transpose()?;
    let req = Request::Subscribe {
        name: a.session.clone(),
        component: a.component.clone(),
        topics,
        symbols,
    };
    let v: Subscribed = request(socket, &req, T)?;
    if json_out {
        print_json(&v);
        return Ok(());
    }
    let set = if a.topics.is_some() {
        format!("topics {}", v.desired.topics)
    } else {
        format!("symbols {}", v.desired.symbols)
    };
    println!(
        "{} of session {}: {set} (version {}); {}",
        v.component,
        v.name,
        v.desired.version,
        if v.pushed {
            "pushed to the running component"
        } else {
            "no running component of that name: it gets this set when it registers"
        }
    );
    Ok(())
}

/// `subscriptions SESSION`.
pub fn subscriptions(socket: &Path, json_out: bool, name: String) -> Result<(), CliError> {
    let v: SubscriptionsView = request(socket, &Request::SessionSubscriptions { name }, T)?;
    if json_out {
        print_json(&v);
        return Ok(());
    }
    println!(
        "session {}: reconciliation every {} s ('*' = every name)",
        v.name, v.reconcile_s
    );
    let mut t = TextTable::new(&[
        ("COMPONENT", Left),
        ("STATE", Left),
        ("SET", Left),
        ("DESIRED", Left),
        ("ACTUAL", Left),
        ("SYNC", Left),
        ("DRIFT", Right),
        ("RECONCILES", Right),
        ("LAST_AGE_S", Right),
        ("LAST_MS", Right),
        ("ERRORS", Left),
    ]);
    let dash = || "-".to_string();
    for c in &v.components {
        t.row([
            c.component.clone(),
            c.state
                .map_or("unregistered".to_string(), |s| s.to_string()),
            match c.set {
                aegis_shm_client::subscription::SetKind::Topics => "topics".to_string(),
                aegis_shm_client::subscription::SetKind::Symbols => "symbols".to_string(),
            },
            c.desired.to_string(),
            c.actual.as_ref().map_or("?".to_string(), |a| a.to_string()),
            c.in_sync
                .map_or(dash(), |s| if s { "yes" } else { "NO" }.to_string()),
            c.drift.to_string(),
            c.reconciles.to_string(),
            c.last_reconcile_age_s.map_or(dash(), |a| format!("{a:.1}")),
            c.last_reconcile_ms.map_or(dash(), |m| format!("{m:.3}")),
            if c.errors.is_empty() {
                dash()
            } else {
                c.errors.join("; ")
            },
        ]);
    }
    t.print(2);
    Ok(())
}
