//! The expert-parallel token dispatcher (Megatron style): [`dispatch`] sends every (token, slot)
//! row to the rank owning its expert and returns the rows grouped by local expert plus a
//! [`DispatchPlan`]; [`combine`] sends the expert outputs back and returns each token's
//! weighted sum of its `k` outputs.
//!
//! Both are two-phase (`*_start` returns a [`Pending`], `wait` finishes), so a schedule can
//! compute while the all-to-all is in flight. The weighted sum is [`weighted_sum_slots`],
//! adding slot 0, 1, …, k−1 in order per token: a single-rank MoE that uses the same function is
//! bit-identical to expert parallelism at any world size.
//!
//! Rows cross ranks as host f32 buffers, so the returned tensors are fresh (untracked) leaves;
//! gradients cross the collective with the segmented backward of the training executor. Only the
//! combine weights keep their autodiff graph (router gradients flow through `combine`).
//! The index bookkeeping lives in `plan`, the expert ownership in `sharding`.

mod plan;
mod sharding;

use burn::prelude::{Int, Tensor, TensorData};

pub use plan::{DispatchPlan, ExpertInputs};
pub use sharding::ExpertSharding;

use crate::comm::{CollectiveTag, CommError, Communicator, Pending, Rows};
#[cfg(doc)]
use crate::schedule::ops;
use crate::trace::{HostSpans, Trace};

/// Why dispatch or combine refused its inputs or failed.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// An expert sharding with no experts or no ranks.
    #[error("cannot shard {num_experts} experts over {world} ranks")]
    Sharding {
        /// Requested experts.
        num_experts: usize,
        /// Requested ranks.
        world: usize,
    },
    /// The sharding was built for another world size than the communicator's.
    #[error("expert sharding is for {sharding} ranks but the communicator has {comm}")]
    WorldMismatch {
        /// Ranks in the sharding.
        sharding: usize,
        /// Ranks in the communicator.
        comm: usize,
    },
    /// The routing's expert list does not have `tokens × top_k` entries.
    #[error("routing lists {experts} experts for {tokens} tokens × top_k {top_k}")]
    RoutingLength {
        /// Entries in the expert list.
        experts: usize,
        /// Tokens (rows of the weights).
        tokens: usize,
        /// Slots per token (columns of the weights).
        top_k: usize,
    },
    /// The routing covers another number of tokens than the input rows.
    #[error("routing is for {routing} tokens but x has {x} rows")]
    TokenCount {
        /// Tokens in the routing.
        routing: usize,
        /// Rows of `x`.
        x: usize,
    },
    /// A routed expert id is not an expert of the sharding.
    #[error("token {token} slot {slot} routes to expert {expert}, but there are {num_experts}")]
    ExpertOutOfRange {
        /// The token (row of `x`).
        token: usize,
        /// The slot (0..top_k).
        slot: usize,
        /// The offending expert id.
        expert: usize,
        /// Experts in the sharding.
        num_experts: usize,
    },
    /// A router index tensor holds a negative expert id.
    #[error("token {token} slot {slot} routes to negative expert id {expert}")]
    NegativeExpert {
        /// The token (row of the indices).
        token: usize,
        /// The slot (0..top_k).
        slot: usize,
        /// The offending id.
        expert: i64,
    },
    /// The expert outputs do not have one row per received row.
    #[error("expert outputs have {got} rows but this rank received {expected}")]
    OutputRows {
        /// Rows of the expert outputs.
        got: usize,
        /// Rows dispatched to this rank.
        expected: usize,
    },
    /// An expert placement does not fit the loads or the model.
    #[error("expert placement: {0}")]
    Placement(String),
    /// A tensor could not be read back to the host.
    #[error("reading {what} back to the host failed: {detail}")]
    Read {
        /// Which tensor.
        what: &'static str,
        /// The backend's message.
        detail: String,
    },
    /// The collective failed.
    #[error(transparent)]
    Comm(#[from] CommError),
}

/// Each token's `top_k` experts and combine weights.
#[derive(Debug, Clone)]
pub struct Routing {
    experts: Vec<usize>,
    weights: Tensor<2>,
}

impl Routing {
    /// `experts[t * top_k + j]` is slot `j` of token `t`; `weights` is `[tokens, top_k]`.
    pub fn new(experts: Vec<usize>, weights: Tensor<2>) -> Result<Self, DispatchError> {
        let [tokens, top_k] = weights.dims();
        if experts.len() != tokens * top_k {
            return Err(DispatchError::RoutingLength {
                experts: experts.len(),
                tokens,
                top_k,
            });
        }
        Ok(Self { experts, weights })
    }

    /// From a router's top-k index tensor `[tokens, top_k]` and its weights of the same shape.
    pub fn from_indices(
        indices: Tensor<2, Int>,
        weights: Tensor<2>,
    ) -> Result<Self, DispatchError> {
        let [tokens, top_k] = indices.dims();
        let raw = indices
            .try_into_vec_as::<i64>()
            .map_err(|e| DispatchError::Read {
                what: "router indices",
                detail: e.to_string(),
            })?;
        let experts = raw
            .iter()
            .enumerate()
            .map(|(i, &e)| {
                usize::try_from(e).map_err(|_| DispatchError::NegativeExpert {
                    token: i / top_k.max(1),
                    slot: i % top_k.max(1),
                    expert: e,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let routing = Self::new(experts, weights)?;
        if routing.tokens() != tokens {
            return Err(DispatchError::TokenCount {
                routing: routing.tokens(),
                x: tokens,
            });
        }
        Ok(routing)
    }

    /// Expert ids, token-major (`tokens × top_k`).
    pub fn experts(&self) -> &[usize] {
        &self.experts
    }

    /// Combine weights `[tokens, top_k]`.
    pub fn weights(&self) -> &Tensor<2> {
        &self.weights
    }

    /// Number of tokens.
    pub fn tokens(&self) -> usize {
        self.weights.dims()[0]
    }

    /// Experts per token.
    pub fn top_k(&self) -> usize {
        self.weights.dims()[1]
    }
}

fn read_rows(t: Tensor<2>, what: &'static str) -> Result<Vec<f32>, DispatchError> {
    t.try_into_vec_as::<f32>().map_err(|e| DispatchError::Read {
        what,
        detail: e.to_string(),
    })
}

/// Starts dispatching the rows of `x` to the ranks owning their experts.
///
/// # Shapes
/// - `x`: `[tokens, hidden]`
/// - `routing`: `tokens × top_k` experts, weights `[tokens, top_k]`
/// - result `ExpertInputs::tokens`: `[received rows, hidden]`
///
/// Argument errors are returned at once; transport errors when the pending is waited on.
pub fn dispatch_start<C: Communicator + ?Sized>(
    comm: &C,
    sharding: &ExpertSharding,
    x: Tensor<2>,
    routing: &Routing,
    tag: CollectiveTag,
) -> Result<Pending<(ExpertInputs, DispatchPlan)>, DispatchError> {
    dispatch_start_traced(comm, sharding, x, routing, tag, &Trace::disabled())
}

/// [`dispatch_start`], with the rank's host work (the send buffer packed, the received rows grouped) traced on
/// `trace` as compute spans [`ops::DISPATCH_PACK`] and [`ops::DISPATCH_UNPACK`] when `tag` names the schedules'
/// dispatch (a collective in flight is hidden by that work as by any other).
pub fn dispatch_start_traced<C: Communicator + ?Sized>(
    comm: &C,
    sharding: &ExpertSharding,
    x: Tensor<2>,
    routing: &Routing,
    tag: CollectiveTag,
    trace: &Trace,
) -> Result<Pending<(ExpertInputs, DispatchPlan)>, DispatchError> {
    let world = comm.world_size();
    if sharding.world() != world {
        return Err(DispatchError::WorldMismatch {
            sharding: sharding.world(),
            comm: world,
        });
    }
    let [tokens, hidden] = x.dims();
    if routing.tokens() != tokens {
        return Err(DispatchError::TokenCount {
            routing: routing.tokens(),
            x: tokens,
        });
    }
    let top_k = routing.top_k();
    if let Some((i, &e)) = routing
        .experts()
        .iter()
        .enumerate()
        .find(|(_, e)| **e >= sharding.num_experts())
    {
        return Err(DispatchError::ExpertOutOfRange {
            token: i / top_k,
            slot: i % top_k,
            expert: e,
            num_experts: sharding.num_experts(),
        });
    }

    let device = x.device();
    let host = HostSpans::new(trace, comm.rank(), &tag);
    let (send, layout) = host.pack(|| -> Result<_, DispatchError> {
        let x = read_rows(x, "dispatch input x")?;
        let layout = plan::send_layout(routing.experts(), sharding);
        let mut data = Vec::with_capacity(layout.order.len() * hidden);
        for &slot in &layout.order {
            let t = slot / top_k;
            data.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
        }
        let send = Rows {
            row_len: hidden,
            data,
            counts: layout.counts.clone(),
        };
        Ok((send, layout))
    })?;
    let pending = comm.all_to_all_v(tag, send);
    let op = pending.op().to_owned();
    let rank = comm.rank();
    let sharding = *sharding;
    let weights = routing.weights().clone();
    Ok(pending.map(move |recv| {
        host.unpack(move || {
        let local = sharding.num_local(rank);
        if let Some((src, groups)) = recv
            .counts
            .iter()
            .enumerate()
            .find(|(_, g)| g.len() != local)
        {
            return Err(CommError::Protocol {
                op,
                detail: format!(
                    "rank {src} sent {} expert groups to rank {rank}, which owns {local} experts",
                    groups.len()
                ),
            });
        }
        let grouped_from_recv = plan::grouped_from_received(&recv.counts, local);
        let mut rows = Vec::with_capacity(recv.data.len());
        for &r in &grouped_from_recv {
            rows.extend_from_slice(&recv.data[r * hidden..(r + 1) * hidden]);
        }
        let counts: Vec<usize> = (0..local)
            .map(|l| recv.counts.iter().map(|g| g[l]).sum())
            .collect();
        let inputs = ExpertInputs {
            tokens: Tensor::from_data(
                TensorData::new(rows, [grouped_from_recv.len(), hidden]),
                &device,
            ),
            counts,
            experts: sharding.local_range(rank),
        };
        let plan = DispatchPlan {
            sharding,
            tokens,
            top_k,
            send_order: layout.order,
            send_counts: layout.counts,
            recv_counts: recv.counts,
            grouped_from_recv,
            weights,
            device,
        };
        Ok((inputs, plan))
    })
    }))
}

/// [`dispatch_start`] and wait.
pub fn dispatch<C: Communicator + ?Sized>(
    comm: &C,
    sharding: &ExpertSharding,
    x: Tensor<2>,
    routing: &Routing,
    tag: CollectiveTag,
) -> Result<(ExpertInputs, DispatchPlan), DispatchError> {
    Ok(dispatch_start(comm, sharding, x, routing, tag)?.wait()?)
}

/// Starts sending the expert outputs back to the ranks their tokens came from; waiting yields
/// each local token's weighted sum of its `top_k` expert outputs ([`weighted_sum_slots`]).
///
/// # Shapes
/// - `expert_outputs`: `[received rows, out]`, rows in the order of `ExpertInputs::tokens`
/// - result: `[tokens, out]`
pub fn combine_start<C: Communicator + ?Sized>(
    comm: &C,
    expert_outputs: Tensor<2>,
    plan: DispatchPlan,
    tag: CollectiveTag,
) -> Result<Pending<Tensor<2>>, DispatchError> {
    combine_start_traced(comm, expert_outputs, plan, tag, &Trace::disabled())
}

/// [`combine_start`], with the rank's host work traced on `trace` as compute spans [`ops::COMBINE_PACK`] and
/// [`ops::COMBINE_UNPACK`] when `tag` names the schedules' combine (see [`dispatch_start_traced`]).
pub fn combine_start_traced<C: Communicator + ?Sized>(
    comm: &C,
    expert_outputs: Tensor<2>,
    plan: DispatchPlan,
    tag: CollectiveTag,
    trace: &Trace,
) -> Result<Pending<Tensor<2>>, DispatchError> {
    let [rows, out] = expert_outputs.dims();
    if rows != plan.received_rows() {
        return Err(DispatchError::OutputRows {
            got: rows,
            expected: plan.received_rows(),
        });
    }
    let host = HostSpans::new(trace, comm.rank(), &tag);
    let send = host.pack(|| -> Result<_, DispatchError> {
        let y = read_rows(expert_outputs, "expert outputs")?;
        // Back to the received layout (source rank major), which is what each source expects.
        let mut data = vec![0.0f32; y.len()];
        for (g, &r) in plan.grouped_from_recv.iter().enumerate() {
            data[r * out..(r + 1) * out].copy_from_slice(&y[g * out..(g + 1) * out]);
        }
        Ok(Rows {
            row_len: out,
            data,
            counts: plan.recv_counts.clone(),
        })
    })?;
    let pending = comm.all_to_all_v(tag, send);
    let op = pending.op().to_owned();
    Ok(pending.map(move |back| {
        host.unpack(move || {
            if back.counts != plan.send_counts {
                return Err(CommError::Protocol {
                    op,
                    detail: format!(
                        "expected rows per rank and expert {:?}, got {:?}",
                        plan.send_counts, back.counts
                    ),
                });
            }
            // Peers return rows in the order this rank sent them: `send_order`.
            let (n, k) = (plan.tokens, plan.top_k);
            let mut slots = vec![0.0f32; n * k * out];
            for (i, &slot) in plan.send_order.iter().enumerate() {
                slots[slot * out..(slot + 1) * out]
                    .copy_from_slice(&back.data[i * out..(i + 1) * out]);
            }
            let y = Tensor::<3>::from_data(TensorData::new(slots, [n, k, out]), &plan.device);
            Ok(weighted_sum_slots(y, plan.weights))
        })
    }))
}

/// [`combine_start`] and wait.
pub fn combine<C: Communicator + ?Sized>(
    comm: &C,
    expert_outputs: Tensor<2>,
    plan: DispatchPlan,
    tag: CollectiveTag,
) -> Result<Tensor<2>, DispatchError> {
    Ok(combine_start(comm, expert_outputs, plan, tag)?.wait()?)
}

/// `Σ_j weights[t, j] · y[t, j, :]`, added in slot order `j = 0, 1, …` (each term rounded, then
/// added left to right). The reference combine: use it in single-rank MoE code to be
/// bit-identical to [`combine`].
///
/// # Shapes
/// - `y`: `[tokens, top_k, out]`
/// - `weights`: `[tokens, top_k]`
/// - result: `[tokens, out]`
pub fn weighted_sum_slots(y: Tensor<3>, weights: Tensor<2>) -> Tensor<2> {
    let [n, k, out] = y.dims();
    if n == 0 || k == 0 || out == 0 {
        return Tensor::zeros([n, out], &y.device());
    }
    let mut acc: Option<Tensor<2>> = None;
    for j in 0..k {
        let term = y.clone().narrow(1, j, 1).reshape([n, out]) * weights.clone().narrow(1, j, 1);
        acc = Some(match acc {
            None => term,
            Some(a) => a + term,
        });
    }
    acc.unwrap_or_else(|| Tensor::zeros([n, out], &y.device()))
}
