//! The row permutations of expert parallelism, on host index vectors only: the send layout
//! (slots sorted by expert, so grouped by owner rank and local expert), the regrouping of
//! received rows by local expert, and the [`DispatchPlan`] / [`ExpertInputs`] that carry them
//! from `dispatch` to `combine`.

use std::ops::Range;

use burn::prelude::{Device, Tensor};

use super::ExpertSharding;

/// Where this rank's token slots go: `order` lists slot ids (`token * top_k + j`) sorted by
/// expert (stable, so by token then slot within an expert); `counts[p][l]` is how many of them
/// go to local expert `l` of rank `p`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SendLayout {
    pub(super) order: Vec<usize>,
    pub(super) counts: Vec<Vec<usize>>,
}

/// Counting sort of the slots by expert. Experts must be `< sharding.num_experts()`.
pub(super) fn send_layout(experts: &[usize], sharding: &ExpertSharding) -> SendLayout {
    let e = sharding.num_experts();
    let mut per_expert = vec![0usize; e];
    for &x in experts {
        per_expert[x] += 1;
    }
    let mut next = vec![0usize; e];
    let mut at = 0;
    for (n, c) in next.iter_mut().zip(&per_expert) {
        *n = at;
        at += c;
    }
    let mut order = vec![0usize; experts.len()];
    for (slot, &x) in experts.iter().enumerate() {
        order[next[x]] = slot;
        next[x] += 1;
    }
    let counts = (0..sharding.world())
        .map(|p| per_expert[sharding.local_range(p)].to_vec())
        .collect();
    SendLayout { order, counts }
}

/// For each row of the expert-grouped order (local expert major, then source rank), the index
/// of that row in the received buffer (source rank major, then local expert). `recv[s][l]` is
/// the rows rank `s` sent for local expert `l`; every source must list `local` groups.
pub(super) fn grouped_from_received(recv: &[Vec<usize>], local: usize) -> Vec<usize> {
    // Row offset of (source, expert) chunks in the received buffer.
    let mut offsets = Vec::with_capacity(recv.len());
    let mut at = 0;
    for groups in recv {
        let mut row = Vec::with_capacity(local);
        for &c in groups {
            row.push(at);
            at += c;
        }
        offsets.push(row);
    }
    let mut out = Vec::with_capacity(at);
    for l in 0..local {
        for (s, groups) in recv.iter().enumerate() {
            let start = offsets[s][l];
            out.extend(start..start + groups[l]);
        }
    }
    out
}

/// The rows this rank must run through its experts, grouped by local expert.
#[derive(Debug, Clone)]
pub struct ExpertInputs {
    /// `[rows, hidden]`: the rows of local expert 0, then of local expert 1, ...; within an
    /// expert, by source rank, then in the source's token order.
    pub tokens: Tensor<2>,
    /// Rows per local expert (`counts.len() == experts.len()`).
    pub counts: Vec<usize>,
    /// The global ids of the local experts.
    pub experts: Range<usize>,
}

impl ExpertInputs {
    /// The rows of local expert `local` (0-based within [`ExpertInputs::experts`]).
    pub fn rows_of(&self, local: usize) -> Range<usize> {
        let start: usize = self.counts.iter().take(local).sum();
        start..start + self.counts.get(local).copied().unwrap_or(0)
    }

    /// The total number of rows.
    pub fn num_rows(&self) -> usize {
        self.counts.iter().sum()
    }
}

/// Everything `combine` needs to send expert outputs back and reassemble them per token.
/// Produced only by `dispatch`, consumed by `combine`, so the two cannot be mismatched.
#[derive(Debug, Clone)]
pub struct DispatchPlan {
    pub(super) sharding: ExpertSharding,
    pub(super) tokens: usize,
    pub(super) top_k: usize,
    pub(super) send_order: Vec<usize>,
    pub(super) send_counts: Vec<Vec<usize>>,
    pub(super) recv_counts: Vec<Vec<usize>>,
    pub(super) grouped_from_recv: Vec<usize>,
    pub(super) weights: Tensor<2>,
    pub(super) device: Device,
}

impl DispatchPlan {
    /// Local tokens this plan combines back.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Experts per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// The expert sharding used.
    pub fn sharding(&self) -> &ExpertSharding {
        &self.sharding
    }

    /// Rows this rank received for its experts (= rows `combine` expects back).
    pub fn received_rows(&self) -> usize {
        self.grouped_from_recv.len()
    }

    /// Rows this rank sent to each rank (its own included).
    pub fn sent_per_rank(&self) -> Vec<usize> {
        self.send_counts.iter().map(|g| g.iter().sum()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_layout_sorts_stably_by_expert() -> Result<(), super::super::DispatchError> {
        // 3 tokens, k = 2; 4 experts over 2 ranks (0,1 | 2,3).
        let experts = [3, 0, 0, 2, 1, 0];
        let s = ExpertSharding::new(4, 2)?;
        let layout = send_layout(&experts, &s);
        assert_eq!(layout.order, vec![1, 2, 5, 4, 3, 0]);
        assert_eq!(layout.counts, vec![vec![3, 1], vec![1, 1]]);
        Ok(())
    }

    #[test]
    fn regroup_by_local_expert() {
        // Two sources, two local experts: s0 sent [2, 1], s1 sent [0, 3].
        // Received rows: s0e0 = 0,1; s0e1 = 2; s1e1 = 3,4,5.
        let recv = vec![vec![2, 1], vec![0, 3]];
        assert_eq!(grouped_from_received(&recv, 2), vec![0, 1, 2, 3, 4, 5]);
        let recv = vec![vec![1, 1], vec![1, 1]];
        // s0e0 = 0, s0e1 = 1, s1e0 = 2, s1e1 = 3 → e0: 0, 2; e1: 1, 3.
        assert_eq!(grouped_from_received(&recv, 2), vec![0, 2, 1, 3]);
    }
}
