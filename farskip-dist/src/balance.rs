//! Expert placement by load: which experts share a rank under expert parallelism.
//!
//! A collective cannot finish before its slowest rank joins it, so under EP the rank whose experts received
//! the most tokens sets the pace, and the others spend part of their overlap window waiting. Routers are
//! rarely uniform (a random-initialised one even less so: one rank can get twice the rows of another), so,
//! like DeepSeek's EPLB (without its replicas), we measure each expert's load on calibration tokens and
//! place experts so that every rank gets about the same number of rows. Placement is a relabelling of the
//! experts ([`MoeBlock::permute_experts`](farskip_model::moe::MoeBlock::permute_experts)), so the model
//! computes the same function and the contiguous [`ExpertSharding`] of the relabelled model is the
//! balanced placement.
//!
//! ```
//! use farskip_dist::balance::{balanced_order, rank_loads};
//! let loads = [90, 10, 80, 20, 50, 50, 40, 60];
//! let order = balanced_order(&loads, 2)?;
//! let by_rank = rank_loads(&loads, &order, 2)?;
//! assert_eq!(by_rank, vec![200, 200]);
//! # Ok::<(), farskip_dist::DispatchError>(())
//! ```

use std::sync::{Arc, Mutex, PoisonError};

use farskip_model::Model;
use farskip_model::model::Ffn;

use crate::dispatch::{DispatchError, ExpertSharding};
use crate::schedule::ScheduleError;

/// Per-layer, per-expert row counts, shared by the ranks that record them (cheap to clone).
#[derive(Clone, Debug, Default)]
pub struct ExpertLoads(Arc<Mutex<Vec<Vec<usize>>>>);

impl ExpertLoads {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `counts[e]` rows routed to expert `e` of `layer`.
    pub fn record(&self, layer: usize, counts: &[usize]) {
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if all.len() <= layer {
            all.resize(layer + 1, Vec::new());
        }
        let row = &mut all[layer];
        if row.len() < counts.len() {
            row.resize(counts.len(), 0);
        }
        for (r, c) in row.iter_mut().zip(counts) {
            *r += c;
        }
    }

    /// The counts so far, `[layer][expert]` (layers without an MoE block are empty).
    pub fn snapshot(&self) -> Vec<Vec<usize>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// An order of the experts (`order[i]` = the old id of new expert `i`) whose contiguous sharding over
/// `world` ranks gives every rank about the same load: longest-processing-time greedy under the ranks'
/// expert counts, then pairwise swaps between the busiest and the idlest rank while they lower the maximum.
/// Experts keep their relative order within a rank.
///
/// # Errors
/// If there are no experts or no ranks.
pub fn balanced_order(loads: &[usize], world: usize) -> Result<Vec<usize>, DispatchError> {
    let sharding = ExpertSharding::new(loads.len(), world)?;
    let capacity: Vec<usize> = (0..world).map(|r| sharding.num_local(r)).collect();
    let mut by_load: Vec<usize> = (0..loads.len()).collect();
    by_load.sort_by_key(|&e| (std::cmp::Reverse(loads[e]), e));
    let mut ranks: Vec<Vec<usize>> = vec![Vec::new(); world];
    let mut total = vec![0usize; world];
    for e in by_load {
        let r = (0..world)
            .filter(|&r| ranks[r].len() < capacity[r])
            .min_by_key(|&r| (total[r], r))
            .expect("capacities add up to the expert count");
        ranks[r].push(e);
        total[r] += loads[e];
    }
    // Swap an expert of the busiest rank with a lighter one of the idlest while that lowers the maximum.
    for _ in 0..loads.len() * loads.len() {
        let hi = (0..world).max_by_key(|&r| (total[r], r)).unwrap_or(0);
        let lo = (0..world).min_by_key(|&r| (total[r], r)).unwrap_or(0);
        let gap = total[hi] - total[lo];
        let best = ranks[hi]
            .iter()
            .enumerate()
            .flat_map(|(i, &a)| {
                ranks[lo]
                    .iter()
                    .enumerate()
                    .map(move |(j, &b)| (i, a, j, b))
            })
            .filter(|&(_, a, _, b)| loads[a] > loads[b] && 2 * (loads[a] - loads[b]) < 2 * gap)
            .min_by_key(|&(_, a, _, b)| (gap as i64 - 2 * (loads[a] - loads[b]) as i64).abs());
        let Some((i, a, j, b)) = best else { break };
        ranks[hi][i] = b;
        ranks[lo][j] = a;
        total[hi] = total[hi] - loads[a] + loads[b];
        total[lo] = total[lo] - loads[b] + loads[a];
    }
    Ok(ranks
        .into_iter()
        .flat_map(|mut r| {
            r.sort_unstable();
            r
        })
        .collect())
}

/// The rows each rank receives when the experts are placed in `order` over `world` ranks.
///
/// # Errors
/// If there are no experts or no ranks, or `order` does not index `loads`.
pub fn rank_loads(
    loads: &[usize],
    order: &[usize],
    world: usize,
) -> Result<Vec<usize>, DispatchError> {
    let sharding = ExpertSharding::new(loads.len(), world)?;
    (0..world)
        .map(|r| {
            order[sharding.local_range(r)]
                .iter()
                .map(|&e| {
                    loads.get(e).copied().ok_or_else(|| {
                        DispatchError::Placement(format!(
                            "the order names expert {e} but the loads cover {} experts",
                            loads.len()
                        ))
                    })
                })
                .sum()
        })
        .collect()
}

/// Load of the busiest rank over the mean rank load (1.0 = perfectly balanced; 0 loads give 1.0).
pub fn imbalance(rank_loads: &[usize]) -> f64 {
    let max = rank_loads.iter().copied().max().unwrap_or(0) as f64;
    let mean = rank_loads.iter().sum::<usize>() as f64 / rank_loads.len().max(1) as f64;
    if mean > 0.0 { max / mean } else { 1.0 }
}

/// A placement of every MoE layer's experts and what it does to the load of the busiest rank.
#[derive(Clone, Debug)]
pub struct Placement {
    /// Per layer: the expert order (empty for a dense layer).
    pub orders: Vec<Vec<usize>>,
}

impl Placement {
    /// Balanced orders for `loads` (`[layer][expert]`, as recorded by [`ExpertLoads`]) over `world` ranks.
    ///
    /// # Errors
    /// If a layer has loads but no experts, or `world` is 0.
    pub fn balanced(loads: &[Vec<usize>], world: usize) -> Result<Self, DispatchError> {
        let orders = loads
            .iter()
            .map(|l| {
                if l.is_empty() {
                    Ok(Vec::new())
                } else {
                    balanced_order(l, world)
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { orders })
    }

    /// Every layer's experts in their own order: contiguous blocks, as [`ExpertSharding`] places them.
    pub fn contiguous(loads: &[Vec<usize>]) -> Self {
        Self {
            orders: loads.iter().map(|l| (0..l.len()).collect()).collect(),
        }
    }

    /// Mean over MoE layers of [`imbalance`] for `loads` under contiguous placement and under this one.
    ///
    /// # Errors
    /// If `loads` does not fit the placement.
    pub fn imbalance(
        &self,
        loads: &[Vec<usize>],
        world: usize,
    ) -> Result<(f64, f64), DispatchError> {
        let (mut before, mut after, mut n) = (0.0, 0.0, 0usize);
        for (l, order) in loads.iter().zip(&self.orders) {
            if l.is_empty() || order.is_empty() {
                continue;
            }
            let identity: Vec<usize> = (0..l.len()).collect();
            before += imbalance(&rank_loads(l, &identity, world)?);
            after += imbalance(&rank_loads(l, order, world)?);
            n += 1;
        }
        let n = n.max(1) as f64;
        Ok((before / n, after / n))
    }

    /// `model` with every MoE layer's experts relabelled by this placement (the same function).
    ///
    /// # Errors
    /// If the placement does not fit the model (layer count, expert count, routing groups).
    pub fn apply(&self, model: &Model) -> Result<Model, ScheduleError> {
        let mut out = model.clone();
        for (i, layer) in out.layers.iter_mut().enumerate() {
            let Ffn::Moe(moe) = &mut layer.ffn else {
                continue;
            };
            match self.orders.get(i) {
                Some(order) if !order.is_empty() => *moe = moe.permute_experts(order)?,
                _ => {
                    return Err(ScheduleError::Dispatch(DispatchError::Placement(format!(
                        "no expert order for MoE layer {i}"
                    ))));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_order_is_a_permutation_that_never_worsens_the_busiest_rank()
    -> Result<(), DispatchError> {
        let mut state = 17u64;
        for world in 1..=4 {
            for n in [world, 8, 16, 13] {
                let loads: Vec<usize> = (0..n)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1);
                        ((state >> 40) % 200) as usize
                    })
                    .collect();
                let order = balanced_order(&loads, world)?;
                let mut sorted = order.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "a permutation");
                let identity: Vec<usize> = (0..n).collect();
                let before = rank_loads(&loads, &identity, world)?;
                let after = rank_loads(&loads, &order, world)?;
                assert_eq!(after.iter().sum::<usize>(), loads.iter().sum::<usize>());
                let max = loads.iter().copied().max().unwrap_or(0);
                let mean = loads.iter().sum::<usize>() / world;
                assert!(
                    after.iter().max() <= before.iter().max(),
                    "{loads:?} {world}: {after:?} vs {before:?}"
                );
                // LPT bound: the busiest rank exceeds the mean by at most one expert's load.
                assert!(
                    *after.iter().max().unwrap_or(&0) <= mean + max + 1,
                    "{loads:?}: {after:?}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn skewed_loads_are_evened_out() -> Result<(), DispatchError> {
        // Contiguous placement gives rank 0 all the heavy experts.
        let loads = [100, 90, 80, 70, 10, 20, 30, 40];
        let order = balanced_order(&loads, 2)?;
        let identity: Vec<usize> = (0..8).collect();
        assert!((imbalance(&rank_loads(&loads, &identity, 2)?) - 340.0 / 220.0).abs() < 1e-12);
        assert_eq!(rank_loads(&loads, &order, 2)?, vec![220, 220]);
        Ok(())
    }

    #[test]
    fn loads_accumulate_across_recorders() {
        let loads = ExpertLoads::new();
        let other = loads.clone();
        loads.record(1, &[1, 2, 3]);
        other.record(1, &[1, 0, 0]);
        assert_eq!(loads.snapshot(), vec![vec![], vec![2, 2, 3]]);
    }
}
