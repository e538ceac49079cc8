//! Ordered locking for deploys that wait for locks (`--wait`) on several targets.
//!
//! An environment's targets are locked at once, in parallel. Two deploys that share targets
//! and both wait could each hold one target and wait for the other's for ever. The classic
//! cure: a run may wait for a target's lock only while every lock it holds is of a target
//! ranked before that one (here: by the name the target is given, the same order for every
//! run that names targets alike). Then no run waits for a run that waits for it: in any cycle
//! of waits, the run waiting for the lowest-ranked target would hold a higher-ranked one.
//!
//! A deploy attempt that finds itself waiting for a target ranked before one it holds gives
//! way: it stops (every lock it holds is released, nothing is made live), waits for that
//! target's lock alone, lets go of it and starts again.

use crate::DeployError;
use std::sync::Mutex;

/// The locks of one deploy attempt: which targets are held, which are waited for, and the
/// target it gave way to, if any.
pub(crate) struct LockBook {
    /// Each target's rank: its position among the targets sorted by name.
    rank: Vec<usize>,
    /// Only a deploy that waits, on more than one target, can wait in a cycle.
    ordered: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    held: Vec<bool>,
    waiting: Vec<bool>,
    /// The target whose wait broke the order: the attempt stops and waits for it alone.
    gave_way: Option<usize>,
}

impl LockBook {
    /// The book of a deploy of targets named `names` (in the order given); `waits`: with
    /// `--wait` (without it a busy target fails the deploy, and nothing waits).
    pub(crate) fn new(names: &[String], waits: bool) -> LockBook {
        let mut order: Vec<usize> = (0..names.len()).collect();
        order.sort_by(|&a, &b| names[a].cmp(&names[b]).then(a.cmp(&b)));
        let mut rank = vec![0; names.len()];
        for (r, &i) in order.iter().enumerate() {
            rank[i] = r;
        }
        LockBook {
            rank,
            ordered: waits && names.len() > 1,
            state: Mutex::new(State {
                held: vec![false; names.len()],
                waiting: vec![false; names.len()],
                gave_way: None,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Target `i`'s lock is busy and its session waits (asked at each of the agent's
    /// `Waiting` answers): whether the attempt gives way instead, because it holds a target
    /// ranked after `i` (or gave way already).
    pub(crate) fn waits(&self, i: usize) -> bool {
        if !self.ordered {
            return false;
        }
        let mut s = self.state();
        s.waiting[i] = true;
        if s.gave_way.is_none()
            && s.held
                .iter()
                .zip(&self.rank)
                .any(|(&h, &r)| h && r > self.rank[i])
        {
            s.gave_way = Some(i);
        }
        s.gave_way.is_some()
    }

    /// Target `i`'s lock is taken: whether the attempt goes on (false: it gave way, because
    /// it waits for a target ranked before `i`, or gave way already).
    pub(crate) fn took(&self, i: usize) -> bool {
        if !self.ordered {
            return true;
        }
        let mut s = self.state();
        s.held[i] = true;
        s.waiting[i] = false;
        if s.gave_way.is_none() {
            let below = (0..self.rank.len()).find(|&k| s.waiting[k] && self.rank[k] < self.rank[i]);
            s.gave_way = below;
        }
        s.gave_way.is_none()
    }

    /// The target this attempt gave way to, if it did.
    pub(crate) fn gave_way(&self) -> Option<usize> {
        self.state().gave_way
    }

    /// Reads the answer to the lock of target `i` (named `target`) queued in `session`,
    /// `on_wait` hearing the holder: the lock taken in order, or
    /// [`DeployError::GaveWay`] when the attempt gives way.
    ///
    /// # Errors
    /// The lock's answer, or [`DeployError::GaveWay`].
    pub(crate) fn locked(
        &self,
        session: &mut flip_transfer::Session,
        i: usize,
        target: &str,
        on_wait: &mut dyn FnMut(&str),
    ) -> Result<(), DeployError> {
        let taken = session.locked_unless(on_wait, &|| self.waits(i))?;
        if !taken || !self.took(i) {
            return Err(DeployError::GaveWay {
                target: target.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn holding_a_later_target_while_waiting_for_an_earlier_one_gives_way() {
        // Named in flip.toml as [web2, web1]: web1 ranks first.
        let b = LockBook::new(&names(&["web2", "web1"]), true);
        assert!(b.took(0), "web2 taken, nothing waited for");
        assert!(b.waits(1), "waiting for web1 while holding web2");
        assert_eq!(b.gave_way(), Some(1));
        // Either way round.
        let b = LockBook::new(&names(&["web2", "web1"]), true);
        assert!(!b.waits(1), "waiting for web1, holding nothing");
        assert!(!b.took(0), "web2 taken while web1 is waited for");
        assert_eq!(b.gave_way(), Some(1));
    }

    #[test]
    fn waiting_for_a_later_target_while_holding_earlier_ones_goes_on() {
        let b = LockBook::new(&names(&["a", "b", "c"]), true);
        assert!(b.took(0));
        assert!(b.took(1));
        assert!(!b.waits(2));
        assert!(!b.waits(2), "asked again at each Waiting");
        assert!(b.took(2));
        assert_eq!(b.gave_way(), None);
    }

    #[test]
    fn without_wait_or_with_one_target_nothing_gives_way() {
        let b = LockBook::new(&names(&["b", "a"]), false);
        assert!(b.took(0));
        assert!(!b.waits(1));
        let b = LockBook::new(&names(&["a"]), true);
        assert!(!b.waits(0));
        assert!(b.took(0));
        assert_eq!(b.gave_way(), None);
    }
}
