//! Errors of collectives ([`CommError`]) and of ranks run by `LocalWorld::run` ([`RankError`]).

use std::time::Duration;

use super::CollectiveCall;

/// Why a collective failed. Each variant names the ranks and the call at fault.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommError {
    /// A call was malformed on this rank before anything was sent.
    #[error("invalid collective argument: {0}")]
    InvalidArgument(String),

    /// Two ranks made different calls at the same position of the collective sequence.
    #[error(
        "mismatched collective #{seq}: rank {rank} called {call} but rank {peer} called {peer_call}"
    )]
    Mismatch {
        /// Position in the sequence of collectives (0-based, per communicator).
        seq: u64,
        /// This rank.
        rank: usize,
        /// This rank's call.
        call: Box<CollectiveCall>,
        /// The first rank whose call differs.
        peer: usize,
        /// That rank's call.
        peer_call: Box<CollectiveCall>,
    },

    /// A peer panicked, returned an error or gave up before joining this collective.
    #[error("rank {rank} failed before joining {op}: {reason}")]
    PeerFailed {
        /// The failed peer.
        rank: usize,
        /// The collective this rank was waiting in.
        op: String,
        /// What happened to the peer.
        reason: String,
    },

    /// A peer dropped its communicator (finished its work) without joining this collective.
    #[error("rank {rank} left after {issued} collectives and never joined {op}")]
    PeerExited {
        /// The departed peer.
        rank: usize,
        /// How many collectives the peer had issued.
        issued: u64,
        /// The collective this rank was waiting in.
        op: String,
    },

    /// The collective did not complete within the timeout.
    #[error("timed out after {waited:?} in {op}; ranks not yet joined: {missing:?}")]
    Timeout {
        /// The collective.
        op: String,
        /// How long this rank waited.
        waited: Duration,
        /// Ranks that had not made the call (empty when unknown).
        missing: Vec<usize>,
    },

    /// This rank's communicator was aborted earlier (its own failure or timeout), so no further
    /// collective can run on it.
    #[error("communicator of rank {rank} was aborted ({reason}); cannot run {op}")]
    Aborted {
        /// This rank.
        rank: usize,
        /// The collective that was refused.
        op: String,
        /// Why the communicator was aborted.
        reason: String,
    },

    /// Peers sent data that contradicts the plan this rank holds (for example row counts that
    /// differ from what was dispatched).
    #[error("inconsistent data in {op}: {detail}")]
    Protocol {
        /// The collective.
        op: String,
        /// What did not add up.
        detail: String,
    },

    /// The transport itself failed (thread spawn, CUDA, NCCL).
    #[error("{backend} backend failed in {op}: {detail}")]
    Backend {
        /// Which backend (`"local"`, `"nccl"`).
        backend: &'static str,
        /// The collective or setup step.
        op: String,
        /// The underlying error.
        detail: String,
    },
}

/// How one rank of `LocalWorld::run` ended, when it did not return `Ok`.
#[derive(Debug, thiserror::Error)]
pub enum RankError<E> {
    /// The rank's closure returned an error.
    #[error("rank returned an error: {0}")]
    Failed(E),
    /// The rank's closure panicked.
    #[error("rank panicked: {0}")]
    Panicked(String),
    /// The world could not start this rank.
    #[error("rank could not start: {0}")]
    Start(CommError),
}
