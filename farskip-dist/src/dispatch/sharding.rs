//! [`ExpertSharding`]: which rank owns which expert (contiguous blocks, sizes differing by at
//! most one, the first ranks taking the extra experts).

use std::ops::Range;

use super::DispatchError;

/// Experts `0..num_experts` split into `world` contiguous blocks, one per rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExpertSharding {
    num_experts: usize,
    world: usize,
}

impl ExpertSharding {
    /// Shards `num_experts` experts over `world` ranks. Ranks beyond `num_experts` own none.
    pub fn new(num_experts: usize, world: usize) -> Result<Self, DispatchError> {
        if num_experts == 0 || world == 0 {
            return Err(DispatchError::Sharding { num_experts, world });
        }
        Ok(Self { num_experts, world })
    }

    /// The number of experts.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    fn start(&self, rank: usize) -> usize {
        let rank = rank.min(self.world);
        let (base, extra) = (self.num_experts / self.world, self.num_experts % self.world);
        rank * base + rank.min(extra)
    }

    /// The global ids of the experts `rank` owns (empty for a rank outside the world).
    pub fn local_range(&self, rank: usize) -> Range<usize> {
        self.start(rank)..self.start(rank + 1)
    }

    /// How many experts `rank` owns.
    pub fn num_local(&self, rank: usize) -> usize {
        self.local_range(rank).len()
    }

    /// The rank that owns `expert`, or `None` if there is no such expert.
    pub fn owner(&self, expert: usize) -> Option<usize> {
        if expert >= self.num_experts {
            return None;
        }
        let (base, extra) = (self.num_experts / self.world, self.num_experts % self.world);
        let big = extra * (base + 1);
        Some(if expert < big {
            expert / (base + 1)
        } else {
            // Here base > 0: with base == 0 every expert lies below `big`.
            extra + (expert - big) / base
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_contiguous_and_owner_agrees() -> Result<(), DispatchError> {
        for experts in 1..=9 {
            for world in 1..=5 {
                let s = ExpertSharding::new(experts, world)?;
                let mut next = 0;
                for r in 0..world {
                    let range = s.local_range(r);
                    assert_eq!(range.start, next);
                    assert!(range.len() == experts / world || range.len() == experts / world + 1);
                    for e in range.clone() {
                        assert_eq!(s.owner(e), Some(r), "expert {e} of {experts} over {world}");
                    }
                    next = range.end;
                }
                assert_eq!(next, experts);
                assert_eq!(s.owner(experts), None);
                assert!(s.local_range(world).is_empty());
            }
        }
        Ok(())
    }

    #[test]
    fn empty_sharding_is_an_error() {
        assert!(ExpertSharding::new(0, 2).is_err());
        assert!(ExpertSharding::new(4, 0).is_err());
    }
}
