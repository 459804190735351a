//! Side-by-side calibration copies that meet at every collective, as a run's ranks do.
//!
//! A calibration times `world` single-rank copies at once so that they share the cores and memory as the
//! ranks of the run they predict. The run's ranks also meet at every collective: they leave it together, and
//! on a blocking schedule both cores idle while they wait — the ops right after a wait (a norm, the router, the
//! embedding and head) then run 10–40 % slower than back to back. [`Lockstep`] gives each copy a [`SingleRank`]
//! whose collectives first wait for every copy to reach the same one (no data moves between the copies; each
//! computes its own single-rank result).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::comm::{CollectiveTag, CommError, Communicator, Pending, Rows, SingleRank};

/// How long a copy waits for the others at one collective before the calibration fails. The copies run the same
/// pass, so they only fall out of step when one of them stopped.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// A barrier for `n` copies that a copy can leave (on an error), releasing the others with an error instead of
/// leaving them waiting, and that gives up after [`STEP_TIMEOUT`].
#[derive(Debug)]
pub(crate) struct StepBarrier {
    n: usize,
    state: Mutex<StepState>,
    turned: Condvar,
}

#[derive(Debug, Default)]
struct StepState {
    arrived: usize,
    generation: u64,
    /// Why the barrier no longer holds, once it does not.
    broken: Option<String>,
}

impl StepBarrier {
    /// A barrier for `n` copies (at least one).
    pub(crate) fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            n: n.max(1),
            state: Mutex::new(StepState::default()),
            turned: Condvar::new(),
        })
    }

    /// Waits until all `n` copies have called `wait` as often as this one, or fails when a copy left or the
    /// others did not come within [`STEP_TIMEOUT`].
    pub(crate) fn wait(&self) -> Result<(), String> {
        self.wait_at_most(STEP_TIMEOUT)
    }

    fn wait_at_most(&self, timeout: Duration) -> Result<(), String> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = &s.broken {
            return Err(why.clone());
        }
        s.arrived += 1;
        if s.arrived == self.n {
            s.arrived = 0;
            s.generation += 1;
            self.turned.notify_all();
            return Ok(());
        }
        let generation = s.generation;
        let deadline = Instant::now() + timeout;
        while s.generation == generation && s.broken.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let why = format!(
                    "the side-by-side calibration copies fell out of step: {} of {} reached a collective within \
                     {timeout:?}",
                    s.arrived, self.n
                );
                s.broken = Some(why.clone());
                self.turned.notify_all();
                return Err(why);
            }
            s = self
                .turned
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        match (&s.broken, s.generation == generation) {
            (Some(why), true) => Err(why.clone()),
            _ => Ok(()),
        }
    }

    /// A copy stops (it failed): every copy waiting now or later gets `why` as an error.
    pub(crate) fn leave(&self, why: &str) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.broken.is_none() {
            s.broken = Some(format!("another calibration copy stopped: {why}"));
        }
        self.turned.notify_all();
    }
}

/// A [`SingleRank`] whose every collective first waits at a [`StepBarrier`] shared with the other copies.
#[derive(Debug, Clone)]
pub(crate) struct Lockstep {
    barrier: Arc<StepBarrier>,
}

impl Lockstep {
    pub(crate) fn new(barrier: Arc<StepBarrier>) -> Self {
        Self { barrier }
    }

    /// Meets the other copies, then runs `f` on a [`SingleRank`]; a broken barrier is the collective's error.
    fn meet<T: Send + 'static>(
        &self,
        op: &str,
        f: impl FnOnce(&SingleRank) -> Pending<T>,
    ) -> Pending<T> {
        match self.barrier.wait() {
            Ok(()) => f(&SingleRank::new()),
            Err(detail) => Pending::ready(
                op.to_string(),
                Err(CommError::Backend {
                    backend: "calibration",
                    op: op.to_string(),
                    detail,
                }),
            ),
        }
    }
}

impl Communicator for Lockstep {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        self.meet("all_reduce", |c| c.all_reduce(tag, data))
    }

    fn all_to_all_v(&self, tag: CollectiveTag, send: Rows) -> Pending<Rows> {
        self.meet("all_to_all_v", |c| c.all_to_all_v(tag, send))
    }

    fn all_gather(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        self.meet("all_gather", |c| c.all_gather(tag, data))
    }

    fn reduce_scatter(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        self.meet("reduce_scatter", |c| c.reduce_scatter(tag, data))
    }

    fn broadcast(&self, tag: CollectiveTag, root: usize, data: Vec<f32>) -> Pending<Vec<f32>> {
        self.meet("broadcast", |c| c.broadcast(tag, root, data))
    }

    fn barrier(&self, tag: CollectiveTag) -> Pending<()> {
        self.meet("barrier", |c| c.barrier(tag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag() -> CollectiveTag {
        CollectiveTag::new("lockstep test")
    }

    #[test]
    fn copies_leave_each_collective_together_with_single_rank_results() {
        let barrier = StepBarrier::new(2);
        let arrived = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for copy in 0..2u32 {
                let comm = Lockstep::new(barrier.clone());
                let arrived = &arrived;
                s.spawn(move || {
                    for step in 0..3u32 {
                        if copy == 1 {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        let out = comm.all_reduce(tag(), vec![step as f32; 4]).wait().unwrap();
                        // A world of one: the all-reduce is the identity, nothing crossed between copies.
                        assert_eq!(out, vec![step as f32; 4]);
                        arrived.lock().unwrap().push((step, copy, Instant::now()));
                    }
                });
            }
        });
        let arrived = arrived.into_inner().unwrap();
        for step in 0..3 {
            let times: Vec<Instant> = arrived
                .iter()
                .filter(|(s, _, _)| *s == step)
                .map(|(_, _, t)| *t)
                .collect();
            assert_eq!(times.len(), 2);
            // Copy 0 waited for copy 1's 20 ms sleep: both left within a few ms of each other.
            let apart = if times[0] > times[1] {
                times[0] - times[1]
            } else {
                times[1] - times[0]
            };
            assert!(
                apart < Duration::from_millis(15),
                "step {step}: {apart:?} apart"
            );
        }
    }

    #[test]
    fn a_copy_that_leaves_releases_the_others_with_an_error() {
        let barrier = StepBarrier::new(2);
        let waiting = {
            let barrier = barrier.clone();
            std::thread::spawn(move || Lockstep::new(barrier).all_reduce(tag(), vec![1.0]).wait())
        };
        std::thread::sleep(Duration::from_millis(20));
        barrier.leave("its pass failed");
        let err = waiting.join().unwrap().unwrap_err().to_string();
        assert!(
            err.contains("another calibration copy stopped: its pass failed"),
            "{err}"
        );
        // Later collectives fail at once too.
        let err = Lockstep::new(barrier)
            .barrier(tag())
            .wait()
            .unwrap_err()
            .to_string();
        assert!(err.contains("its pass failed"), "{err}");
    }

    #[test]
    fn a_copy_that_never_comes_times_out_with_a_clear_error() {
        let barrier = StepBarrier::new(2);
        let err = barrier.wait_at_most(Duration::from_millis(30)).unwrap_err();
        assert!(err.contains("fell out of step: 1 of 2"), "{err}");
        assert!(barrier.wait().is_err());
    }
}
