//! The state a `LocalWorld` shares between its ranks: one rendezvous slot per collective
//! sequence number, each rank's liveness, and the blocking `execute` that a rank's comm thread
//! runs for one collective (join, wait for peers, check calls, compute, sleep for the link).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::LinkModel;
use crate::comm::semantics::{self, Output, Payload};
use crate::comm::{CollectiveCall, CommError};
use crate::trace::Trace;

/// What is known about a rank.
#[derive(Debug, Clone)]
enum RankStatus {
    Alive,
    /// Dropped its communicator after issuing `issued` collectives.
    Departed {
        issued: u64,
    },
    /// Panicked, returned an error, or gave up; nothing it has not joined can complete.
    Failed {
        reason: String,
    },
}

#[derive(Debug)]
struct Entry {
    call: CollectiveCall,
    payload: Arc<Payload>,
    /// When the rank issued the collective (stamped on the rank's thread).
    posted: Instant,
}

/// The rendezvous of one collective (one sequence number).
#[derive(Debug)]
struct Slot {
    entries: Vec<Option<Entry>>,
    joined: usize,
    complete_at: Option<Instant>,
    taken: usize,
}

#[derive(Debug)]
struct State {
    slots: HashMap<u64, Slot>,
    status: Vec<RankStatus>,
}

/// Shared by all ranks of one local world.
#[derive(Debug)]
pub(super) struct World {
    pub(super) size: usize,
    pub(super) link: LinkModel,
    pub(super) timeout: Duration,
    pub(super) trace: Trace,
    state: Mutex<State>,
    changed: Condvar,
}

impl World {
    pub(super) fn new(size: usize, link: LinkModel, timeout: Duration, trace: Trace) -> Self {
        Self {
            size,
            link,
            timeout,
            trace,
            state: Mutex::new(State {
                slots: HashMap::new(),
                status: vec![RankStatus::Alive; size],
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written (every update is a
        // single assignment), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks `rank` failed (the first reason wins) and wakes every waiting rank.
    pub(super) fn mark_failed(&self, rank: usize, reason: String) {
        let mut st = self.lock();
        Self::fail_locked(&mut st, rank, reason);
        drop(st);
        self.changed.notify_all();
    }

    fn fail_locked(st: &mut State, rank: usize, reason: String) {
        if let Some(s) = st.status.get_mut(rank)
            && !matches!(s, RankStatus::Failed { .. })
        {
            *s = RankStatus::Failed { reason };
        }
    }

    /// Marks `rank` as gone after `issued` collectives, unless it already failed.
    pub(super) fn mark_departed(&self, rank: usize, issued: u64) {
        let mut st = self.lock();
        if let Some(s) = st.status.get_mut(rank)
            && matches!(s, RankStatus::Alive)
        {
            *s = RankStatus::Departed { issued };
        }
        drop(st);
        self.changed.notify_all();
    }

    /// Ranks that have not joined collective `seq` (empty if nobody has).
    pub(super) fn missing(&self, seq: u64) -> Vec<usize> {
        let st = self.lock();
        st.slots.get(&seq).map_or_else(Vec::new, |slot| {
            (0..self.size)
                .filter(|&r| slot.entries[r].is_none())
                .collect()
        })
    }

    /// Runs collective `seq` for `rank`: joins it, waits for every peer (or a failure, or the
    /// timeout counted from `started`), checks that all calls agree and computes this rank's result.
    /// Returns it with when the last rank issued the collective and the modelled transfer: it starts then
    /// (or when this rank's link is free, `link_free`) and lasts what the link model says. Timing comes from
    /// the ranks' issue times, not from when this comm thread got a core.
    pub(super) fn execute(
        &self,
        rank: usize,
        seq: u64,
        call: CollectiveCall,
        payload: Payload,
        (posted, started, link_free): (Instant, Instant, Instant),
    ) -> Result<(Output, Instant, Instant, Instant), CommError> {
        let op = semantics::describe(&call, seq, rank);
        let deadline = started + self.timeout;
        let mut st = self.lock();
        if let RankStatus::Failed { reason } = &st.status[rank] {
            return Err(CommError::Aborted {
                rank,
                op,
                reason: reason.clone(),
            });
        }
        let size = self.size;
        let slot = st.slots.entry(seq).or_insert_with(|| Slot {
            entries: (0..size).map(|_| None).collect(),
            joined: 0,
            complete_at: None,
            taken: 0,
        });
        slot.entries[rank] = Some(Entry {
            call,
            payload: Arc::new(payload),
            posted,
        });
        slot.joined += 1;
        if slot.joined == size {
            slot.complete_at = slot.entries.iter().flatten().map(|e| e.posted).max();
            self.changed.notify_all();
        }

        loop {
            let Some(slot) = st.slots.get(&seq) else {
                return Err(CommError::Protocol {
                    op,
                    detail: "rendezvous slot vanished".to_owned(),
                });
            };
            if slot.joined == size {
                break;
            }
            if let Some(err) = self.peer_failure(&st, slot, rank, seq, &op) {
                return Err(err);
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> =
                    (0..size).filter(|&r| slot.entries[r].is_none()).collect();
                let waited = now - started;
                let reason = format!("timed out after {waited:?} in {op} waiting for {missing:?}");
                Self::fail_locked(&mut st, rank, reason);
                drop(st);
                self.changed.notify_all();
                return Err(CommError::Timeout {
                    op,
                    waited,
                    missing,
                });
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }

        let Some(slot) = st.slots.get_mut(&seq) else {
            return Err(CommError::Protocol {
                op,
                detail: "rendezvous slot vanished".to_owned(),
            });
        };
        slot.taken += 1;
        let complete_at = slot.complete_at.unwrap_or_else(Instant::now);
        let entries: Vec<(CollectiveCall, Arc<Payload>)> = slot
            .entries
            .iter()
            .flatten()
            .map(|e| (e.call.clone(), Arc::clone(&e.payload)))
            .collect();
        if slot.taken == size {
            st.slots.remove(&seq);
        }
        drop(st);

        let calls: Vec<&CollectiveCall> = entries.iter().map(|(c, _)| c).collect();
        if let Some(peer) = semantics::find_mismatch(&calls, rank) {
            return Err(CommError::Mismatch {
                seq,
                rank,
                call: Box::new(calls[rank].clone()),
                peer,
                peer_call: Box::new(calls[peer].clone()),
            });
        }
        let payloads: Vec<&Payload> = entries.iter().map(|(_, p)| p.as_ref()).collect();
        let out = semantics::result_for(calls[rank], &payloads, rank, &op)?;
        let bytes = semantics::wire_bytes(calls[rank], &payloads);
        let start = complete_at.max(link_free);
        Ok((
            out,
            complete_at,
            start,
            start + self.link.duration(calls[rank], bytes),
        ))
    }

    /// The error for a peer that can no longer join `seq`, if any (this rank's own abort first).
    fn peer_failure(
        &self,
        st: &State,
        slot: &Slot,
        rank: usize,
        seq: u64,
        op: &str,
    ) -> Option<CommError> {
        if let RankStatus::Failed { reason } = &st.status[rank] {
            return Some(CommError::Aborted {
                rank,
                op: op.to_owned(),
                reason: reason.clone(),
            });
        }
        (0..self.size)
            .filter(|&q| slot.entries[q].is_none())
            .find_map(|q| match &st.status[q] {
                RankStatus::Failed { reason } => Some(CommError::PeerFailed {
                    rank: q,
                    op: op.to_owned(),
                    reason: reason.clone(),
                }),
                RankStatus::Departed { issued } if *issued <= seq => Some(CommError::PeerExited {
                    rank: q,
                    issued: *issued,
                    op: op.to_owned(),
                }),
                _ => None,
            })
    }
}
