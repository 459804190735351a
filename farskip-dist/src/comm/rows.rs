//! [`Rows`]: equal-length f32 rows cut into per-peer segments, the payload of `all_to_all_v`.

use super::CommError;

/// Rows of `row_len` f32 values, laid out peer by peer and, within a peer, group by group.
///
/// As a send buffer, `counts[p]` lists the row counts of the groups addressed to rank `p`
/// (the expert dispatcher uses one group per expert of `p`; plain users use one group, see
/// [`Rows::per_peer`]). As a result, `counts[s]` lists the groups rank `s` sent here, in order.
/// Empty segments and empty groups are allowed.
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    /// Elements per row.
    pub row_len: usize,
    /// The rows, `Σ counts × row_len` values, peer-major then group-major.
    pub data: Vec<f32>,
    /// Row counts per peer, per group.
    pub counts: Vec<Vec<usize>>,
}

impl Rows {
    /// Rows with one group per peer: `counts[p]` rows for rank `p`.
    pub fn per_peer(row_len: usize, data: Vec<f32>, counts: Vec<usize>) -> Self {
        Self {
            row_len,
            data,
            counts: counts.into_iter().map(|c| vec![c]).collect(),
        }
    }

    /// An empty buffer for `peers` peers (no rows at all).
    pub fn empty(row_len: usize, peers: usize) -> Self {
        Self {
            row_len,
            data: Vec::new(),
            counts: vec![Vec::new(); peers],
        }
    }

    /// Rows in the segment of peer `p` (0 if `p` is out of range).
    pub fn peer_rows(&self, p: usize) -> usize {
        self.counts.get(p).map_or(0, |g| g.iter().sum())
    }

    /// Total number of rows.
    pub fn num_rows(&self) -> usize {
        self.counts.iter().flatten().sum()
    }

    /// Row offset of each peer's segment, plus the total at the end (`counts.len() + 1` entries).
    pub fn peer_offsets(&self) -> Vec<usize> {
        let mut offsets = Vec::with_capacity(self.counts.len() + 1);
        let mut at = 0;
        offsets.push(0);
        for groups in &self.counts {
            at += groups.iter().sum::<usize>();
            offsets.push(at);
        }
        offsets
    }

    /// The values of peer `p`'s segment.
    pub fn peer_data(&self, p: usize) -> &[f32] {
        let offsets = self.peer_offsets();
        match (offsets.get(p), offsets.get(p + 1)) {
            (Some(&a), Some(&b)) => &self.data[a * self.row_len..b * self.row_len],
            _ => &[],
        }
    }

    /// Checks that there is one segment per peer and that `data` holds exactly the counted rows.
    pub fn validate(&self, peers: usize) -> Result<(), CommError> {
        if self.counts.len() != peers {
            return Err(CommError::InvalidArgument(format!(
                "all_to_all_v: {} per-peer counts for a world of {peers}",
                self.counts.len()
            )));
        }
        let rows = self.num_rows();
        let expected = rows.checked_mul(self.row_len).ok_or_else(|| {
            CommError::InvalidArgument(format!(
                "all_to_all_v: {rows} rows of {} overflow",
                self.row_len
            ))
        })?;
        if self.data.len() != expected {
            return Err(CommError::InvalidArgument(format!(
                "all_to_all_v: counts sum to {rows} rows of {} values ({expected}) but data holds {}",
                self.row_len,
                self.data.len()
            )));
        }
        Ok(())
    }
}
