//! Distributed runtime for FarSkip-Collective MoE models: async collectives, the expert-parallel
//! token dispatcher, the overlapped schedules and the trace that measures how much communication
//! they hide.
//!
//! ```
//! use burn::prelude::*;
//! use farskip_dist::experiment::{Parallel, max_abs_diff, run_forward};
//! use farskip_dist::{CollectiveTag, Communicator, LinkModel, LocalWorld, Trace};
//! use farskip_model::{Connectivity, Model, ModelConfig};
//!
//! // Ranks as threads of this process. A collective returns at once with a `Pending`.
//! let sums = LocalWorld::run(2, LinkModel::instant(), |comm| {
//!     let pending = comm.all_reduce(CollectiveTag::new("sum"), vec![comm.rank() as f32 + 1.0]);
//!     // ... compute here while the all-reduce is in flight ...
//!     pending.wait()
//! })?;
//! for sum in sums {
//!     assert_eq!(sum?, vec![3.0]);
//! }
//!
//! // An expert-parallel FarSkip forward over two ranks equals the single-rank forward up to float rounding
//! // (per-rank row counts can pick other kernels, whose sums round in another order).
//! let device = Device::flex();
//! let config = ModelConfig::small_moe(64, 32, 2, 4, 2, 8, 4, 2, 16, None);
//! let model = Model::new(&config, &device)?.with_connectivity(Connectivity::farskip())?;
//! let ids = Tensor::<2, Int>::from_ints(
//!     [[1, 2, 3, 4, 9, 10, 11, 12], [5, 6, 7, 8, 13, 14, 15, 16]],
//!     &device,
//! );
//! let link = LinkModel::instant();
//! let (logits, _wall) = run_forward(&model, Parallel::Expert, 2, &ids, link, &Trace::disabled())?;
//! assert!(max_abs_diff(logits, model.forward(ids)?) <= 1e-5);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! What lives here (DESIGN.md §3-5):
//! - [`comm`]: the [`Communicator`] trait whose collectives return a `#[must_use]` [`Pending`],
//!   and its backends [`SingleRank`] and [`LocalWorld`] (ranks as threads, with a [`LinkModel`]
//!   that makes communication time controllable on a CPU). `nccl` (feature `nccl`) adds the
//!   cudarc/NCCL backend; `MpiComm` (feature `mpi`) one process per rank under `mpirun`, every
//!   collective a non-blocking MPI call on a progress thread; [`LinkedComm`] puts the link model over
//!   any communicator.
//! - [`launch`]: the torchrun-style environment and the small TCP rendezvous used to share an
//!   NCCL unique id.
//! - [`mod@dispatch`]: expert-parallel `dispatch` → [`DispatchPlan`] → `combine`, bit-exact against
//!   a single rank.
//! - [`schedule`]: the expert- and tensor-parallel inference schedules (`EpRank`, `TpRank`), which
//!   drive a model's named sub-steps in the FarSkip order so that collectives overlap compute.
//! - [`training`]: expert-parallel training steps with overlapped forward and backward
//!   communication.
//! - [`balance`]: expert placement by measured load (relabelled experts, the same function), so EP ranks
//!   reach their collectives together.
//! - [`experiment`]: running a batch on a `LocalWorld` (or one process per rank under MPI) and the
//!   calibrated overlap experiment.
//! - [`trace`]: compute/comm intervals per rank, the overlap metric, Chrome-trace JSON and SVG.
//! - [`plan`]: the planner — schedule descriptions simulated with roofline and α–β costs, or with op costs
//!   measured here, to predict what FarSkip buys on a model and cluster.
//!
//! What does not live here: model layers (farskip-model) and losses or optimisers
//! (farskip-train).
#![warn(missing_docs)]

pub mod comm;
pub mod dispatch;
pub mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod trace;

pub use comm::{
    CallShape, CollectiveCall, CollectiveKind, CollectiveTag, CommError, Communicator, LinkModel,
    LinkedComm, LocalComm, LocalWorld, LocalWorldConfig, Pending, RankError, Rows, SingleRank,
};
#[cfg(feature = "mpi")]
pub use comm::{MpiComm, MpiConfig, MpiInitError, MpiWorld, launched_by_mpirun};
pub use dispatch::{
    DispatchError, DispatchPlan, ExpertInputs, ExpertSharding, Routing, combine, combine_start,
    combine_start_traced, dispatch, dispatch_start, dispatch_start_traced, weighted_sum_slots,
};
pub use trace::{
    Phase, Span, SpanGuard, Stream, Trace, comm_time, compute_time, overlap_pct, peer_wait_time,
};
pub mod balance;
pub mod experiment;
pub mod plan;
pub mod schedule;
pub mod training;
