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
    /// The names the targets are given: what ranks targets whose agents say the same.
    names: Vec<String>,
    /// Only a deploy that waits, on more than one target, can wait in a cycle.
    ordered: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    held: Vec<bool>,
    waiting: Vec<bool>,
    /// Each target's agent as its `Welcome` said: (host name, resolved root); known before
    /// the lock's answer.
    agents: Vec<Option<(String, String)>>,
    /// The target whose wait broke the order: the attempt stops and waits for it alone.
    gave_way: Option<usize>,
}

impl State {
    /// Whether target `a` ranks before target `b` (see the [module docs](self)).
    fn before(&self, names: &[String], a: usize, b: usize) -> bool {
        (&self.agents[a], &names[a], a) < (&self.agents[b], &names[b], b)
    }
}

impl LockBook {
    /// The book of a deploy of targets named `names` (in the order given); `waits`: with
    /// `--wait` (without it a busy target fails the deploy, and nothing waits).
    pub(crate) fn new(names: &[String], waits: bool) -> LockBook {
        LockBook {
            names: names.to_vec(),
            ordered: waits && names.len() > 1,
            state: Mutex::new(State {
                held: vec![false; names.len()],
                waiting: vec![false; names.len()],
                agents: vec![None; names.len()],
                gave_way: None,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Target `i`'s agent is on `host` and resolved the root to `root` (its `Welcome`): what
    /// ranks it from then on.
    pub(crate) fn met(&self, i: usize, host: &str, root: &str) {
        let mut s = self.state();
        if s.agents[i].is_none() {
            s.agents[i] = Some((host.to_string(), root.to_string()));
        }
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
            && (0..self.names.len()).any(|k| s.held[k] && s.before(&self.names, i, k))
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
            let below =
                (0..self.names.len()).find(|&k| s.waiting[k] && s.before(&self.names, k, i));
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
        let met = |s: &flip_transfer::Session| self.met(i, &s.agent_host, &s.agent_root);
        let taken = session.locked_unless(on_wait, &|s| {
            met(s);
            self.waits(i)
        })?;
        met(session);
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
    fn targets_rank_by_what_their_agents_say_not_by_the_names_given() {
        // One run names the first target by an alias, the other by its address; the second
        // target is named alike. By name, the first run ranks x before web2 and the second
        // web2 before x: each could hold one and wait for the other.
        let agents = [("h1", "/srv/app"), ("h2", "/srv/app")];
        let one = LockBook::new(&names(&["x", "web2"]), true);
        let two = LockBook::new(&names(&["10.0.0.1", "web2"]), true);
        for b in [&one, &two] {
            for (i, (host, root)) in agents.iter().enumerate() {
                b.met(i, host, root);
            }
        }
        // Both rank h1 first: holding h2 and waiting for h1 gives way in both.
        for b in [one, two] {
            assert!(b.took(1));
            assert!(b.waits(0), "holding h2, waiting for h1");
        }
        // Agents that say the same (one host name, one path): the names given decide.
        let b = LockBook::new(&names(&["b", "a"]), true);
        b.met(0, "h", "/srv/app");
        b.met(1, "h", "/srv/app");
        assert!(b.took(0));
        assert!(b.waits(1), "a ranks before b");
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
