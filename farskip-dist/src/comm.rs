//! The [`Communicator`] trait, the labels every collective carries ([`CollectiveTag`],
//! [`CollectiveCall`]) and the row payload of `all_to_all_v` ([`Rows`]).
//!
//! Backends live in submodules: [`SingleRank`] (a world of one), [`LocalWorld`] (ranks as threads
//! of one process, with a simulated link), `MpiComm` (feature `mpi`: one process per rank under
//! `mpirun`). The NCCL backend is `crate::nccl` (feature `nccl`).
//! The result semantics shared by the host backends (rank-order sums, row routing) live in
//! `semantics`; the trait itself says nothing about how bytes move.

mod error;
mod linked;
pub(crate) mod local;
#[cfg(feature = "mpi")]
mod mpi;
mod pending;
mod rows;
pub(crate) mod semantics;
mod single;
mod tag;

#[cfg(feature = "mpi")]
pub use self::mpi::{MpiComm, MpiConfig, MpiInitError, MpiWorld, launched_by_mpirun};
pub use error::{CommError, RankError};
pub use linked::LinkedComm;
pub use local::{LinkModel, LocalComm, LocalWorld, LocalWorldConfig};
pub use pending::Pending;
pub use rows::Rows;
pub use single::SingleRank;
pub use tag::{CallShape, CollectiveCall, CollectiveKind, CollectiveTag};

/// A group of ranks that run the same sequence of collectives.
///
/// Collectives work on f32 host buffers. Each returns at once with a [`Pending`] that completes
/// when every rank has made the same call; the caller may compute meanwhile. All ranks must
/// issue their collectives in the same order (as with NCCL); a rank whose call differs from its
/// peers' (another kind, another tag, or a size that must agree) gets
/// [`CommError::Mismatch`] naming both calls, where the backend can see them.
///
/// Buffers are taken by value so that a backend can move them to its comm thread without a copy.
pub trait Communicator: Send + Sync {
    /// This rank's index in `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn world_size(&self) -> usize;

    /// Element-wise sum of `data` over all ranks, added in rank order `0..world_size()` so that
    /// every rank gets bit-identical results. All ranks must pass the same length.
    fn all_reduce(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>>;

    /// Personalised exchange of rows: `send.counts[p]` rows (possibly zero) go to rank `p`.
    /// The result holds, for each source rank, the rows it sent here with its group counts, in
    /// source-rank order. All ranks must use the same `row_len`.
    fn all_to_all_v(&self, tag: CollectiveTag, send: Rows) -> Pending<Rows>;

    /// Concatenation of every rank's `data` in rank order. All ranks must pass the same length.
    fn all_gather(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>>;

    /// Sum over ranks of `data` (rank order), then rank `r` keeps chunk `r` of `world_size()`
    /// equal chunks. All ranks must pass the same length, divisible by `world_size()`.
    fn reduce_scatter(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>>;

    /// Every rank receives `root`'s `data`. All ranks pass a buffer of the same length (the
    /// contents on the other ranks are ignored) and the same `root`.
    fn broadcast(&self, tag: CollectiveTag, root: usize, data: Vec<f32>) -> Pending<Vec<f32>>;

    /// Completes once every rank has reached it.
    fn barrier(&self, tag: CollectiveTag) -> Pending<()>;
}

impl<C: Communicator + ?Sized> Communicator for std::sync::Arc<C> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        (**self).all_reduce(tag, data)
    }
    fn all_to_all_v(&self, tag: CollectiveTag, send: Rows) -> Pending<Rows> {
        (**self).all_to_all_v(tag, send)
    }
    fn all_gather(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        (**self).all_gather(tag, data)
    }
    fn reduce_scatter(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        (**self).reduce_scatter(tag, data)
    }
    fn broadcast(&self, tag: CollectiveTag, root: usize, data: Vec<f32>) -> Pending<Vec<f32>> {
        (**self).broadcast(tag, root, data)
    }
    fn barrier(&self, tag: CollectiveTag) -> Pending<()> {
        (**self).barrier(tag)
    }
}

impl<C: Communicator + ?Sized> Communicator for &C {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        (**self).all_reduce(tag, data)
    }
    fn all_to_all_v(&self, tag: CollectiveTag, send: Rows) -> Pending<Rows> {
        (**self).all_to_all_v(tag, send)
    }
    fn all_gather(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        (**self).all_gather(tag, data)
    }
    fn reduce_scatter(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        (**self).reduce_scatter(tag, data)
    }
    fn broadcast(&self, tag: CollectiveTag, root: usize, data: Vec<f32>) -> Pending<Vec<f32>> {
        (**self).broadcast(tag, root, data)
    }
    fn barrier(&self, tag: CollectiveTag) -> Pending<()> {
        (**self).barrier(tag)
    }
}
