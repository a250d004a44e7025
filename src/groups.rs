//! Hot standby (SPEC section 12): groups of components of which one holds the lease.
//!
//! A component that registers with a `group` joins it. The first live member is `active`
//! (the group's epoch goes to 1), later ones are `standby`. When the active member dies (its
//! connection closes, its pid is gone, or it is silent past its policy's bound) it is fenced
//! and the first live standby, in registration order, is promoted: the epoch goes up by one
//! and it gets `PROMOTED`. A fenced member that comes back (a SIGSTOP, then SIGCONT) gets
//! `ERROR not_active` for every request; its frames are never merged, since the sequencer
//! reads only the active member's ring of a source (`takeover.rs`).
//!
//! Producer groups publish one source; every member has its own ring (the first member the
//! source's usual `src-NAME` ring, the others `src-NAME~K`). A promotion hands the new
//! active's ring to the sequencer and tells it `resume_after`, the last source seq merged.
//! A live producer that is restarted under the same source name (no group) takes its source
//! over the same way, within [`RESTART_WINDOW`] of its predecessor's death.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aegis_shm_client::protocol::{
    self, AckSource, Discovered, ErrorCode, Failover, GroupInfo, GroupMember, GroupRole, Lease,
    Register, Reply, Role,
};
use aegis_shm_client::segment::{segment_path, ShmRegion};
use aegis_shm_client::spsc::{self, RingReader};

use crate::refusal::Refusal;
use crate::sequencer::Mode;
use crate::session::{Backing, Session, DEFAULT_SOURCE_BYTES};

/// How long a live source whose producer died (and no standby took over) stays open for a
/// restarted producer: the merge does not end for it meanwhile. After it, the source has left
/// the merge for good.
pub const RESTART_WINDOW: Duration = Duration::from_secs(5);

/// One group of a session.
#[derive(Debug)]
pub struct Group {
    /// Name.
    pub name: String,
    /// Policy (every member agrees).
    pub failover: Failover,
    /// Producers (of `source`) or consumers.
    pub producer: bool,
    /// The one source of a producer group.
    pub source: Option<String>,
    /// 0 before the first lease; +1 on every promotion.
    pub epoch: u64,
    /// The active member's connection.
    pub active: Option<u64>,
    /// Every member's connection, in registration order.
    pub members: Vec<u64>,
    /// Promotions after the first lease.
    pub failovers: u64,
    /// When the last one happened.
    pub last_failover: Option<SystemTime>,
    /// A producer group whose active member finished the source: nobody is promoted any more.
    pub done: bool,
}

impl Group {
    /// A group with no member yet.
    pub fn new(name: &str, failover: Failover, producer: bool, source: Option<String>) -> Group {
        Group {
            name: name.to_string(),
            failover,
            producer,
            source,
            epoch: 0,
            active: None,
            members: Vec::new(),
            failovers: 0,
            last_failover: None,
            done: false,
        }
    }

    /// Adds member `conn`: it takes the lease if nobody holds it (a new epoch), else it is a
    /// standby.
    pub fn join(&mut self, conn: u64) -> GroupRole {
        self.members.push(conn);
        if self.active.is_none() && !self.done {
            self.lease_to(conn);
            GroupRole::Active
        } else {
            GroupRole::Standby
        }
    }

    /// The lease goes to `next` (the first live standby), or to nobody: the active member
    /// is gone. Returns the new active member.
    pub fn promote(&mut self, next: Option<u64>) -> Option<u64> {
        self.active = None;
        let next = next.filter(|_| !self.done)?;
        self.lease_to(next);
        Some(next)
    }

    fn lease_to(&mut self, conn: u64) {
        self.epoch += 1;
        if self.epoch > 1 {
            self.failovers += 1;
            self.last_failover = Some(SystemTime::now());
        }
        self.active = Some(conn);
    }
}

/// What a REGISTER into a group asks for.
pub(crate) struct Join {
    name: String,
    failover: Failover,
}

impl Join {
    /// The group's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

impl Session {
    /// REGISTER: checks the group fields against the session and the group's other members.
    pub(crate) fn check_group(&self, reg: &Register, role: Role) -> Result<Option<Join>, Refusal> {
        let Some(name) = &reg.group else {
            if reg.failover.is_some() {
                return Err(Refusal::bad_request(
                    "a failover policy needs a group (--group G)",
                ));
            }
            return Ok(None);
        };
        if !protocol::valid_name(name) {
            return Err(Refusal::bad_name("group name", name));
        }
        let failover = reg.failover.unwrap_or_default();
        if role == Role::Both {
            return Err(Refusal::bad_request(
                "the members of a group are all producers or all consumers: a component of role `both` joins none",
            ));
        }
        let producer = role.produces();
        if producer {
            if self.mode == Mode::Backtest {
                return Err(Refusal::bad_request(
                    "producer groups need a live session: a backtest cannot lose a producer and stay exact (it fails instead)",
                ));
            }
            if reg.sources.len() != 1 {
                return Err(Refusal::bad_request(format!(
                    "a producer group publishes one source: {} declared {}",
                    reg.component_name,
                    reg.sources.len()
                )));
            }
        }
        match self.groups.get(name) {
            Some(g) => {
                if g.producer != producer {
                    return Err(Refusal::bad_request(format!(
                        "group {name} is a group of {}",
                        if g.producer { "producers" } else { "consumers" }
                    )));
                }
                if g.failover != failover {
                    return Err(Refusal::bad_request(format!(
                        "group {name} has failover policy {}, not {failover}: every member must agree",
                        g.failover
                    )));
                }
                if g.done {
                    return Err(Refusal::new(
                        ErrorCode::SessionOver,
                        format!("group {name} is done: its active member finished the source"),
                    ));
                }
                if let (Some(src), Some(d)) = (&g.source, reg.sources.first()) {
                    let rec = &self.sources[src];
                    if &d.name != src || d.kind != rec.kind || d.topic != rec.topic {
                        return Err(Refusal::bad_request(format!(
                            "group {name} publishes source {src} ({} on {}); {} declared {} ({} on {})",
                            rec.kind, rec.topic, reg.component_name, d.name, d.kind, d.topic
                        )));
                    }
                }
            }
            None => {
                if let Some(d) = reg.sources.first() {
                    if self.sources.contains_key(&d.name) {
                        return Err(Refusal::new(
                            ErrorCode::DuplicateName,
                            format!(
                                "source {} is already published outside group {name}",
                                d.name
                            ),
                        ));
                    }
                }
            }
        }
        Ok(Some(Join {
            name: name.clone(),
            failover,
        }))
    }

    /// REGISTER: the declared sources that exist already and that this registration may
    /// take: its group's source, or (no group, live) a source whose producer is gone and
    /// whose restart window is still open.
    pub(crate) fn takeover_sources(
        &self,
        reg: &Register,
        join: Option<&Join>,
    ) -> Result<Vec<String>, Refusal> {
        let mut taken = Vec::new();
        for d in &reg.sources {
            let Some(rec) = self.sources.get(&d.name) else {
                continue;
            };
            if self.closed_sources.contains(&d.name) {
                return Err(Refusal::new(
                    ErrorCode::SessionOver,
                    format!(
                        "source {} left the merge: its producer died more than {} s ago (the restart window)",
                        d.name,
                        RESTART_WINDOW.as_secs()
                    ),
                ));
            }
            if join.is_some() {
                // `check_group` made sure it is the group's source.
                taken.push(d.name.clone());
                continue;
            }
            if let Some(g) = self
                .groups
                .values()
                .find(|g| g.source.as_deref() == Some(&d.name))
            {
                return Err(Refusal::new(
                    ErrorCode::DuplicateName,
                    format!(
                        "source {} belongs to group {}: register with --group {} to take it over",
                        d.name, g.name, g.name
                    ),
                ));
            }
            let owner_gone = self
                .components
                .iter()
                .filter(|c| c.sources.contains(&d.name))
                .all(|c| c.state.gone());
            let live = matches!(self.mode, Mode::Live { .. });
            if !live || !owner_gone {
                return Err(Refusal::new(
                    ErrorCode::DuplicateName,
                    format!("source {} is already registered", d.name),
                ));
            }
            if d.kind != rec.kind || d.topic != rec.topic {
                return Err(Refusal::bad_request(format!(
                    "source {} is {} on {}, not {} on {}",
                    d.name, rec.kind, rec.topic, d.kind, d.topic
                )));
            }
            taken.push(d.name.clone());
        }
        Ok(taken)
    }

    /// A ring of its own for a producer that takes over (or stands by for) an existing
    /// source: `src-NAME~K`, `~` being outside the names' alphabet.
    pub(crate) fn member_ring(&mut self, source: &str) -> Result<Arc<ShmRegion>, Refusal> {
        self.next_ring += 1;
        let path = segment_path(&self.sid, &format!("src-{source}~{}", self.next_ring));
        let bytes = self.spec.source_bytes.unwrap_or(DEFAULT_SOURCE_BYTES);
        let region = spsc::create_shm(&path, bytes, self.epoch).map_err(Refusal::internal)?;
        Ok(Arc::new(region))
    }

    /// After a REGISTER was recorded (component `conn`, its member rings in
    /// `Component::rings`, by source): joins its group and hands over the sources it takes.
    /// Fills in `resume_after`; returns the lease.
    pub(crate) fn admit(
        &mut self,
        conn: u64,
        join: Option<Join>,
        taken: &[String],
        ack_sources: &mut [AckSource],
    ) -> Option<Lease> {
        let mut take_now: Vec<String> = Vec::new();
        let lease = join.map(|j| {
            let producer = !ack_sources.is_empty();
            let source = ack_sources.first().map(|a| a.name.clone());
            let g = self
                .groups
                .entry(j.name.clone())
                .or_insert_with(|| Group::new(&j.name, j.failover, producer, source));
            let role = g.join(conn);
            if role == GroupRole::Active {
                take_now.extend(taken.iter().cloned());
            }
            Lease {
                group: j.name,
                role,
                epoch: g.epoch,
                failover: g.failover,
            }
        });
        if lease.is_none() {
            take_now.extend(taken.iter().cloned());
        }
        for name in take_now {
            let resume = self.switch_source(&name, conn);
            if let Some(a) = ack_sources.iter_mut().find(|a| a.name == name) {
                a.resume_after = resume;
            }
        }
        lease
    }

    /// Source `name` is from now on the ring of component `conn` (its member ring): in the
    /// records, and in the sequencer if it runs. Returns the last seq merged from it.
    fn switch_source(&mut self, name: &str, conn: u64) -> Option<u64> {
        let i = self.components.iter().position(|c| c.conn == conn)?;
        let c = &self.components[i];
        let k = c.sources.iter().position(|s| s == name)?;
        let ring = c.rings.get(k).cloned().flatten()?;
        let component = c.name.clone();
        let rec = self.sources.get_mut(name)?;
        let old = std::mem::replace(&mut rec.backing, Backing::Ring(ring.clone()));
        rec.component = component;
        rec.takeovers += 1;
        self.orphans.remove(name);
        let r = self.running.as_ref()?;
        let rank = r.ranks.iter().position(|n| n == name)?;
        match RingReader::open(ring, Some(self.epoch)) {
            Ok(reader) => r.takeovers.hand_over(rank, reader),
            Err(e) => eprintln!("aegis: source {name}: cannot open the new ring: {e}"),
        }
        // The sequencer may be parked on the old ring's doorbell: wake it to take the new
        // ring now (after `hand_over`, so that it finds it queued).
        if let Backing::Ring(old) = old {
            if let Ok(o) = RingReader::open(old, Some(self.epoch)) {
                o.wake();
            }
        }
        r.takeovers.last_seq(rank)
    }

    /// Live: source `name` lost its producer and nobody took over: it leaves the merge, but
    /// is held open for a restart for [`RESTART_WINDOW`].
    pub(crate) fn orphan(&mut self, name: &str) {
        let Some(r) = &self.running else { return };
        let Some(rank) = r.ranks.iter().position(|n| n == name) else {
            return;
        };
        r.takeovers.hold(rank);
        // Release: pairs with the sequencer's Acquire swap of `removals`; the hold is seen
        // with the removal, so the merge does not end in between.
        r.removals.fetch_or(1 << rank, Ordering::Release);
        self.orphans.insert(name.to_string(), Instant::now());
    }

    /// Tick: sources orphaned longer than [`RESTART_WINDOW`] leave the merge for good.
    pub(crate) fn expire_orphans(&mut self) {
        let Some(r) = &self.running else { return };
        let expired: Vec<String> = self
            .orphans
            .iter()
            .filter(|(_, t)| t.elapsed() >= RESTART_WINDOW)
            .map(|(n, _)| n.clone())
            .collect();
        for name in expired {
            if let Some(rank) = r.ranks.iter().position(|n| *n == name) {
                r.takeovers.release(rank);
            }
            self.orphans.remove(&name);
            self.closed_sources.insert(name);
        }
    }

    /// A group member was declared dead (`bury`): it is fenced, and if it held the lease the
    /// first live standby is promoted. A producer group with nobody left orphans its source.
    pub(crate) fn member_gone(&mut self, i: usize) {
        let c = &mut self.components[i];
        c.fenced = true;
        let conn = c.conn;
        let Some(gname) = c.group.clone() else { return };
        let Some(g) = self.groups.get(&gname) else {
            return;
        };
        if g.active != Some(conn) {
            return;
        }
        let next = g
            .members
            .iter()
            .copied()
            .find(|m| self.component_by_conn(*m).is_some_and(|c| c.holds_on()));
        let g = self.groups.get_mut(&gname).expect("looked up above");
        let source = g.source.clone();
        match g.promote(next) {
            Some(new) => {
                let epoch = g.epoch;
                let resume_after = source.as_deref().and_then(|s| self.switch_source(s, new));
                if let Some(c) = self.component_by_conn(new) {
                    c.outbox.send(&Reply::Promoted {
                        group: gname,
                        epoch,
                        resume_after,
                    });
                }
            }
            None => {
                if let Some(s) = source.filter(|_| !self.state.is_final()) {
                    self.orphan(&s);
                }
            }
        }
    }

    /// FINISHED from component `conn`: the active member of a producer group ended its
    /// source, so its standbys are released (counted finished) and told so.
    pub(crate) fn member_finished(&mut self, conn: u64) {
        let Some(gname) = self.component_by_conn(conn).and_then(|c| c.group.clone()) else {
            return;
        };
        let Some(g) = self.groups.get_mut(&gname) else {
            return;
        };
        if !g.producer || g.active != Some(conn) {
            return;
        }
        g.done = true;
        let members = g.members.clone();
        let msg = Reply::Released {
            group: gname.clone(),
            reason: format!("the active member of group {gname} finished its source"),
        };
        for c in self.components.iter_mut() {
            if c.conn != conn && members.contains(&c.conn) && c.holds_on() {
                c.state = crate::session::CompState::Finished;
                c.outbox.send(&msg);
            }
        }
    }

    /// The answer to anything a fenced member sends: `not_active`.
    pub(crate) fn not_active(&self, conn: u64) -> Option<Reply> {
        let c = self.component_by_conn(conn)?;
        if !c.fenced {
            return None;
        }
        let gname = c.group.as_deref()?;
        let g = self.groups.get(gname)?;
        let active = g
            .active
            .and_then(|a| self.component_by_conn(a))
            .map_or("nobody".to_string(), |a| a.name.clone());
        Some(Reply::error(
            ErrorCode::NotActive,
            format!(
                "{} was fenced out of group {gname}: epoch {} is held by {active}; its frames and requests are refused",
                c.name, g.epoch
            ),
        ))
    }

    /// The silence a group member is allowed: its policy's bound (`None` outside a group).
    pub(crate) fn member_bounds(&self) -> Vec<Option<Duration>> {
        self.components
            .iter()
            .map(|c| {
                c.group
                    .as_ref()
                    .and_then(|g| self.groups.get(g))
                    .map(|g| g.failover.bound())
            })
            .collect()
    }

    fn member_info(&self, g: &Group, conn: u64) -> Option<GroupMember> {
        let c = self.component_by_conn(conn)?;
        let role = if g.active == Some(conn) {
            GroupRole::Active
        } else if c.fenced {
            GroupRole::Fenced
        } else if c.state.gone() {
            GroupRole::Gone
        } else {
            GroupRole::Standby
        };
        Some(GroupMember {
            name: c.name.clone(),
            pid: c.pid,
            role,
            state: c.public_state(),
        })
    }

    /// Every group, for `inspect`.
    pub(crate) fn group_infos(&self) -> Vec<GroupInfo> {
        self.groups
            .values()
            .map(|g| GroupInfo {
                name: g.name.clone(),
                failover: g.failover,
                source: g.source.clone(),
                members: g
                    .members
                    .iter()
                    .filter_map(|m| self.member_info(g, *m))
                    .collect(),
                active: g
                    .active
                    .and_then(|a| self.component_by_conn(a))
                    .map(|c| c.name.clone()),
                epoch: g.epoch,
                failovers: g.failovers,
                last_failover_unix_ms: g.last_failover.and_then(|t| {
                    t.duration_since(SystemTime::UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_millis() as u64)
                }),
            })
            .collect()
    }

    /// `DISCOVER`: the live members of a group (or of the group of a component, or that
    /// component alone) and the active one.
    pub fn discover(
        &self,
        group: Option<&str>,
        component: Option<&str>,
    ) -> Result<Discovered, Refusal> {
        let gname = match (group, component) {
            (Some(g), None) => g.to_string(),
            (None, Some(name)) => {
                let c = self
                    .components
                    .iter()
                    .rev()
                    .find(|c| c.name == name)
                    .ok_or_else(|| {
                        Refusal::new(
                            ErrorCode::NoComponent,
                            format!("session {} has no component named {name:?}", self.name),
                        )
                    })?;
                match &c.group {
                    Some(g) => g.clone(),
                    None => {
                        let alive = !c.state.gone();
                        return Ok(Discovered {
                            session: self.name.clone(),
                            group: None,
                            members: alive
                                .then(|| GroupMember {
                                    name: c.name.clone(),
                                    pid: c.pid,
                                    role: GroupRole::Active,
                                    state: c.public_state(),
                                })
                                .into_iter()
                                .collect(),
                            active: alive.then(|| c.name.clone()),
                            epoch: 0,
                        });
                    }
                }
            }
            _ => {
                return Err(Refusal::bad_request(
                    "DISCOVER takes exactly one of `group` and `component`",
                ))
            }
        };
        let g = self.groups.get(&gname).ok_or_else(|| {
            Refusal::new(
                ErrorCode::NoGroup,
                format!("session {} has no group named {gname:?}", self.name),
            )
        })?;
        let members: Vec<GroupMember> = g
            .members
            .iter()
            .filter_map(|m| self.member_info(g, *m))
            .filter(|m| matches!(m.role, GroupRole::Active | GroupRole::Standby))
            .collect();
        Ok(Discovered {
            session: self.name.clone(),
            group: Some(gname),
            active: members
                .iter()
                .find(|m| m.role == GroupRole::Active)
                .map(|m| m.name.clone()),
            members,
            epoch: g.epoch,
        })
    }
}

/// Groups by name.
pub type Groups = BTreeMap<String, Group>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_member_is_active_at_epoch_one_the_next_stand_by() {
        let mut g = Group::new("feed", Failover::Aggressive, true, Some("s".into()));
        assert_eq!(g.join(1), GroupRole::Active);
        assert_eq!(g.join(2), GroupRole::Standby);
        assert_eq!((g.epoch, g.active, g.failovers), (1, Some(1), 0));
    }

    #[test]
    fn every_promotion_increments_the_epoch() {
        let mut g = Group::new("feed", Failover::Balanced, true, None);
        g.join(1);
        g.join(2);
        g.join(3);
        assert_eq!(g.promote(Some(2)), Some(2));
        assert_eq!((g.epoch, g.failovers), (2, 1));
        assert!(g.last_failover.is_some());
        assert_eq!(g.promote(Some(3)), Some(3));
        assert_eq!(g.epoch, 3);
        // Nobody left: no lease, the epoch stays; a later member takes it at a new epoch.
        assert_eq!(g.promote(None), None);
        assert_eq!((g.active, g.epoch), (None, 3));
        assert_eq!(g.join(4), GroupRole::Active);
        assert_eq!((g.epoch, g.failovers), (4, 3));
    }

    #[test]
    fn a_done_group_promotes_nobody() {
        let mut g = Group::new("feed", Failover::Conservative, true, None);
        g.join(1);
        g.join(2);
        g.done = true;
        assert_eq!(g.promote(Some(2)), None);
        assert_eq!(g.join(3), GroupRole::Standby);
    }
}
