//! Device→host reads made by the model's forward path, counted.
//!
//! On a GPU-like device every read of a tensor's data waits for the queued work to finish, so the number of reads
//! per forward pass bounds how often the host stalls the device. The forward path reads only what it must: the
//! expert ids of each MoE layer's routing (a dispatch needs the per-expert counts on the host, see
//! [`SlotPlan::from_experts`](crate::moe::experts::SlotPlan::from_experts)), and nothing in attention. Every such
//! read goes through one wrapper that counts it; [`count`] reports the reads a closure made.
//!
//! On the CPU (flex), inputs of at most [`MAX_ROWS`](crate::matvec::MAX_ROWS) tokens take host paths that read
//! their rows instead: an MoE layer reads its input rows (one read, in place of the expert ids) and, decoding one
//! position with a KV cache, an attention layer reads its input row (one read).
//!
//! Reads made only to validate input ([`Model::check_input`](crate::Model::check_input)) or to return results are
//! counted too when they happen inside [`count`]; a forward pass on valid input
//! ([`Model::forward_unchecked`](crate::Model::forward_unchecked)) makes at most one read per MoE layer.

use std::cell::Cell;

use burn::prelude::*;

thread_local! {
    /// Reads made on this thread so far.
    static READS: Cell<usize> = const { Cell::new(0) };
}

/// Runs `f` and returns its result with the number of device→host reads the model made on this thread
/// meanwhile.
///
/// ```
/// use burn::prelude::*;
/// use farskip_model::{Model, ModelConfig, host_reads};
///
/// let device = Device::flex();
/// let config = ModelConfig::small_moe(64, 32, 2, 4, 2, 8, 4, 2, 16, None);
/// let model = Model::new(&config, &device)?;
/// let ids = Tensor::<2, Int>::from_ints([[1, 2, 3, 4]], &device);
/// let (_, reads) = host_reads::count(|| model.forward_unchecked(ids, None));
/// assert_eq!(reads, 2); // one per MoE layer: the routing's expert ids
/// # Ok::<(), farskip_model::ModelError>(())
/// ```
pub fn count<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = READS.with(Cell::get);
    let out = f();
    let after = READS.with(Cell::get);
    (out, after - before)
}

/// The values of an int tensor on the host, counted as one device→host read.
/// Counts one device→host read made outside [`read_ints`] (the few-row host paths).
pub(crate) fn note_read() {
    READS.with(|r| r.set(r.get() + 1));
}

pub(crate) fn read_ints<const D: usize>(t: Tensor<D, Int>) -> TensorData {
    READS.with(|r| r.set(r.get() + 1));
    t.into_data()
}
