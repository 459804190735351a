//! Distributed runtime for FarSkip-Collective MoE models: async collectives, the expert-parallel
//! token dispatcher and the trace that measures how much communication the schedules hide.
//!
//! What lives here (DESIGN.md §3-5):
//! - [`comm`]: the [`Communicator`] trait whose collectives return a `#[must_use]` [`Pending`],
//!   and its backends [`SingleRank`] and [`LocalWorld`] (ranks as threads, with a [`LinkModel`]
//!   that makes communication time controllable on a CPU). `nccl` (feature `nccl`) adds the
//!   cudarc/NCCL backend.
//! - [`launch`]: the torchrun-style environment and the small TCP rendezvous used to share an
//!   NCCL unique id.
//! - [`mod@dispatch`]: expert-parallel `dispatch` → [`DispatchPlan`] → `combine`, bit-exact against
//!   a single rank.
//! - [`trace`]: compute/comm intervals per rank, the overlap metric, Chrome-trace JSON and SVG.
//!
//! What does not live here: model layers (farskip-model) and the FarSkip schedules that drive a
//! model's sub-steps (added on top of these pieces).
#![warn(missing_docs)]

pub mod comm;
pub mod dispatch;
pub mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod trace;

pub use comm::{
    CallShape, CollectiveCall, CollectiveKind, CollectiveTag, CommError, Communicator, LinkModel,
    LocalComm, LocalWorld, LocalWorldConfig, Pending, RankError, Rows, SingleRank,
};
pub use dispatch::{
    DispatchError, DispatchPlan, ExpertInputs, ExpertSharding, Routing, combine, combine_start,
    dispatch, dispatch_start, weighted_sum_slots,
};
pub use trace::{Phase, Span, SpanGuard, Stream, Trace, comm_time, compute_time, overlap_pct};
pub mod experiment;
pub mod schedule;
