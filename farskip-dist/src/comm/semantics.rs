//! What each collective computes, independent of how bytes move: argument checks, call
//! comparison across ranks, results from all ranks' contributions (sums in rank order), and the
//! bytes a collective puts on the wire (for the link model).

use super::{CallShape, CollectiveCall, CollectiveKind, CollectiveTag, CommError, Rows};

/// One rank's contribution to a collective.
#[derive(Debug)]
pub(crate) enum Payload {
    Flat(Vec<f32>),
    Rows(Rows),
    Empty,
}

/// One rank's result of a collective.
#[derive(Debug)]
pub(crate) enum Output {
    Flat(Vec<f32>),
    Rows(Rows),
    Unit,
}

impl Output {
    pub(crate) fn into_flat(self, op: &str) -> Result<Vec<f32>, CommError> {
        match self {
            Self::Flat(v) => Ok(v),
            other => Err(wrong_output(op, &other)),
        }
    }

    pub(crate) fn into_rows(self, op: &str) -> Result<Rows, CommError> {
        match self {
            Self::Rows(r) => Ok(r),
            other => Err(wrong_output(op, &other)),
        }
    }

    pub(crate) fn into_unit(self, op: &str) -> Result<(), CommError> {
        match self {
            Self::Unit => Ok(()),
            other => Err(wrong_output(op, &other)),
        }
    }
}

fn wrong_output(op: &str, got: &Output) -> CommError {
    let got = match got {
        Output::Flat(_) => "a flat buffer",
        Output::Rows(_) => "rows",
        Output::Unit => "nothing",
    };
    CommError::Protocol {
        op: op.to_owned(),
        detail: format!("backend returned {got}"),
    }
}

/// The text that names a collective in errors: `#seq call on rank r`.
pub(crate) fn describe(call: &CollectiveCall, seq: u64, rank: usize) -> String {
    format!("collective #{seq} {call} on rank {rank}")
}

/// Checks a flat collective's arguments (`all_reduce`, `all_gather`, `reduce_scatter`) and
/// derives the call that peers must match.
pub(crate) fn prepare_flat(
    kind: CollectiveKind,
    tag: CollectiveTag,
    len: usize,
    world: usize,
) -> Result<CollectiveCall, CommError> {
    if kind == CollectiveKind::ReduceScatter && !len.is_multiple_of(world) {
        return Err(CommError::InvalidArgument(format!(
            "reduce_scatter {tag}: length {len} is not divisible by world size {world}"
        )));
    }
    Ok(CollectiveCall {
        kind,
        tag,
        shape: CallShape::Elements { len },
    })
}

/// Checks an `all_to_all_v` send buffer and derives the call that peers must match.
pub(crate) fn prepare_rows(
    tag: CollectiveTag,
    rows: &Rows,
    world: usize,
) -> Result<CollectiveCall, CommError> {
    rows.validate(world).map_err(|e| match e {
        CommError::InvalidArgument(m) => CommError::InvalidArgument(format!("{tag}: {m}")),
        other => other,
    })?;
    Ok(CollectiveCall {
        kind: CollectiveKind::AllToAllV,
        tag,
        shape: CallShape::Rows {
            row_len: rows.row_len,
        },
    })
}

/// The call of a barrier.
pub(crate) fn prepare_barrier(tag: CollectiveTag) -> CollectiveCall {
    CollectiveCall {
        kind: CollectiveKind::Barrier,
        tag,
        shape: CallShape::Empty,
    }
}

/// Checks a broadcast's root and derives the call that peers must match.
pub(crate) fn prepare_broadcast(
    tag: CollectiveTag,
    root: usize,
    len: usize,
    world: usize,
) -> Result<CollectiveCall, CommError> {
    if root >= world {
        return Err(CommError::InvalidArgument(format!(
            "broadcast {tag}: root {root} is not a rank of a world of {world}"
        )));
    }
    Ok(CollectiveCall {
        kind: CollectiveKind::Broadcast,
        tag,
        shape: CallShape::Broadcast { root, len },
    })
}

/// The first rank whose call differs from `me`'s, or from rank 0's when `me` itself differs
/// from rank 0 (so both ranks of a disagreement are named the same way on every rank).
pub(crate) fn find_mismatch(calls: &[&CollectiveCall], me: usize) -> Option<usize> {
    let mine = calls.get(me)?;
    if me != 0 && calls.first().is_some_and(|c0| c0 != mine) {
        return Some(0);
    }
    calls.iter().position(|c| c != mine)
}

/// This rank's result, from every rank's payload in rank order. Calls are assumed to match.
pub(crate) fn result_for(
    call: &CollectiveCall,
    payloads: &[&Payload],
    me: usize,
    op: &str,
) -> Result<Output, CommError> {
    let n = payloads.len();
    let bad = |detail: String| CommError::Protocol {
        op: op.to_owned(),
        detail,
    };
    let flat = |r: usize| match payloads[r] {
        Payload::Flat(v) => Ok(v.as_slice()),
        _ => Err(bad(format!("rank {r} sent no flat buffer"))),
    };
    match call.kind {
        CollectiveKind::AllReduce => {
            let mut out = flat(0)?.to_vec();
            for r in 1..n {
                add_into(&mut out, flat(r)?, r).map_err(bad)?;
            }
            Ok(Output::Flat(out))
        }
        CollectiveKind::ReduceScatter => {
            let len = flat(0)?.len();
            let chunk = len / n;
            let range = me * chunk..(me + 1) * chunk;
            let mut out = flat(0)?[range.clone()].to_vec();
            for r in 1..n {
                let theirs = flat(r)?
                    .get(range.clone())
                    .ok_or_else(|| bad(format!("rank {r} sent fewer than {} values", range.end)))?;
                add_into(&mut out, theirs, r).map_err(bad)?;
            }
            Ok(Output::Flat(out))
        }
        CollectiveKind::AllGather => {
            let mut out = Vec::with_capacity(flat(0)?.len() * n);
            for r in 0..n {
                out.extend_from_slice(flat(r)?);
            }
            Ok(Output::Flat(out))
        }
        CollectiveKind::Broadcast => {
            let CallShape::Broadcast { root, .. } = call.shape else {
                return Err(bad("broadcast without a root".to_owned()));
            };
            Ok(Output::Flat(flat(root)?.to_vec()))
        }
        CollectiveKind::AllToAllV => {
            let mut out = Rows {
                row_len: 0,
                data: Vec::new(),
                counts: Vec::with_capacity(n),
            };
            for (src, payload) in payloads.iter().enumerate() {
                let Payload::Rows(rows) = payload else {
                    return Err(bad(format!("rank {src} sent no rows")));
                };
                out.row_len = rows.row_len;
                out.data.extend_from_slice(rows.peer_data(me));
                out.counts
                    .push(rows.counts.get(me).cloned().unwrap_or_default());
            }
            Ok(Output::Rows(out))
        }
        CollectiveKind::Barrier => Ok(Output::Unit),
    }
}

fn add_into(acc: &mut [f32], other: &[f32], rank: usize) -> Result<(), String> {
    if acc.len() != other.len() {
        return Err(format!(
            "rank {rank} sent {} values, expected {}",
            other.len(),
            acc.len()
        ));
    }
    for (a, b) in acc.iter_mut().zip(other) {
        *a += *b;
    }
    Ok(())
}

/// Bytes on the busiest link for this collective, the `bytes` a link model is charged with:
/// ring all-reduce `2(n−1)/n·B`, all-gather `(n−1)·B`, reduce-scatter `(n−1)/n·B`, broadcast
/// `B`, all-to-all-v the largest off-rank traffic (sent or received) of any rank, barrier 0.
/// `B` is one rank's buffer in bytes; a world of one moves nothing.
pub(crate) fn wire_bytes(call: &CollectiveCall, payloads: &[&Payload]) -> usize {
    const F32: usize = std::mem::size_of::<f32>();
    let n = payloads.len();
    if n <= 1 {
        return 0;
    }
    match call.shape {
        CallShape::Elements { len } => {
            let b = len * F32;
            match call.kind {
                CollectiveKind::AllReduce => 2 * (n - 1) * b / n,
                CollectiveKind::AllGather => (n - 1) * b,
                _ => (n - 1) * b / n,
            }
        }
        CallShape::Broadcast { len, .. } => len * F32,
        CallShape::Rows { row_len } => {
            let mut sent = vec![0usize; n];
            let mut recv = vec![0usize; n];
            for (src, payload) in payloads.iter().enumerate() {
                if let Payload::Rows(rows) = payload {
                    for dst in (0..n).filter(|&d| d != src) {
                        let r = rows.peer_rows(dst);
                        sent[src] += r;
                        recv[dst] += r;
                    }
                }
            }
            let busiest = sent.iter().zip(&recv).map(|(s, r)| *s.max(r)).max();
            busiest.unwrap_or(0) * row_len * F32
        }
        CallShape::Empty => 0,
    }
}
