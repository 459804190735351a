//! Collectives on burn tensors. A tensor on this rank's CUDA device is handed to NCCL as device
//! memory: no copy to the host and back. Any other tensor (flex, wgpu, …) takes the host path of
//! the [`Communicator`] methods.
//!
//! The device path, on the calling thread: the tensor is resolved to its CubeCL buffer (made
//! contiguous first if it is strided), an output tensor is allocated on the same device and
//! resolved the same way, and the burn device is synchronised so that every queued kernel that
//! writes the input has finished. The issue thread then runs the NCCL call on the
//! communicator's own stream on the two device pointers and records the completion event;
//! [`Pending::wait`] waits for that event and returns the output tensor. Both buffers stay
//! allocated and bound in place (cubecl's `ManagedResource`) until NCCL is done with them, also
//! when the `Pending` is dropped unwaited. Autodiff tensors are refused on CUDA (call
//! `without_autodiff` first): a collective has no backward here.
//!
//! `all_to_all_v` sends from the tensor's memory too, but receives into a buffer of the comm
//! stream, since how many rows arrive is known only after the count exchange on the issue
//! thread; the waiting thread then copies them device-to-device into a new burn tensor, on a
//! stream of its own.
//!
//! burn's `cuda` feature as this workspace enables it has no fusion, so the CUDA primitive is
//! the CubeCL tensor itself; an application that turns on burn's `fusion` gets a compile error
//! here, not a wrong pointer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::prelude::{Device, Tensor, TensorData};
use burn::tensor::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl_runtime::runtime::Runtime;
use cubecl_runtime::server::ServerStorage;
use cubecl_runtime::storage::{ComputeStorage, ManagedResource};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream};
use cudarc::nccl::result::NcclError;
use cudarc::nccl::{Comm, ReduceOp};

use super::{NcclComm, cuda_err, nccl_err};
use crate::comm::semantics;
use crate::comm::{
    CallShape, CollectiveCall, CollectiveKind, CollectiveTag, CommError, Communicator, Pending,
    Rows,
};

type CudaServer = <CudaRuntime as Runtime>::Server;
type CudaResource =
    ManagedResource<<<CudaServer as ServerStorage>::Storage as ComputeStorage>::Resource>;

/// A resolved CUDA buffer: the tensor that owns it and the binding that keeps it in place (both
/// held until NCCL is done), and its device address.
struct DeviceBuffer {
    _owner: CubeTensor,
    _bound: CudaResource,
    ptr: u64,
    len: usize,
}

impl NcclComm {
    /// The CUDA ordinal of a burn device, `None` for any other backend. This rank's GPU is
    /// checked first; the device count needs libcuda, which a constructed communicator has
    /// loaded (`device_count` would panic without it).
    fn cuda_ordinal(&self, device: &Device) -> Option<usize> {
        let mine = self.shared.ctx.ordinal();
        if *device == Device::cuda(mine) {
            return Some(mine);
        }
        let count = usize::try_from(CudaContext::device_count().ok()?).ok()?;
        (0..count).find(|&i| *device == Device::cuda(i))
    }
}

fn backend_err(op: &str, detail: String) -> CommError {
    CommError::Backend {
        backend: "nccl",
        op: op.to_owned(),
        detail,
    }
}

/// Resolves a float tensor on a CUDA device to its contiguous f32 device buffer.
fn resolve<const D: usize>(t: Tensor<D>, op: &str) -> Result<DeviceBuffer, CommError> {
    if t.is_autodiff() {
        return Err(CommError::InvalidArgument(format!(
            "{op}: the tensor tracks gradients; pass `tensor.without_autodiff()` to a collective"
        )));
    }
    let dtype = t.dtype();
    if dtype != DType::F32 {
        return Err(CommError::InvalidArgument(format!(
            "{op}: NCCL collectives here take f32 tensors, got {dtype:?}"
        )));
    }
    let len = t.shape().num_elements();
    let ct = t
        .try_into_primitive::<CubeBackend>()
        .map_err(|e| backend_err(op, format!("not a CubeCL tensor: {e:?}")))?;
    let ct = if ct.is_contiguous() {
        ct
    } else {
        burn_cubecl::kernel::into_contiguous(ct)
    };
    let resource = ct
        .client
        .get_resource::<CudaServer>(ct.handle.clone())
        .map_err(|e| backend_err(op, format!("CUDA buffer of the tensor: {e:?}")))?;
    let (ptr, bytes) = (resource.resource().ptr, resource.resource().size);
    let need = len * std::mem::size_of::<f32>();
    if usize::try_from(bytes).map_or(true, |b| b < need) {
        return Err(backend_err(
            op,
            format!("the tensor's CUDA buffer has {bytes} bytes, {need} needed"),
        ));
    }
    Ok(DeviceBuffer {
        _owner: ct,
        _bound: resource,
        ptr,
        len,
    })
}

/// Runs `run` on two foreign device buffers wrapped as cudarc slices on `stream`; the slices
/// are leaked afterwards so cudarc never frees burn's memory.
///
/// # Safety
/// `send` and `recv` must be live CUDA allocations of at least their `len` f32 values on the
/// stream's device, not written by anything else until the stream has passed this call.
unsafe fn on_device(
    stream: &Arc<CudaStream>,
    send: &DeviceBuffer,
    recv: &DeviceBuffer,
    run: impl FnOnce(&CudaSlice<f32>, &mut CudaSlice<f32>) -> Result<(), NcclError>,
) -> Result<(), NcclError> {
    // SAFETY: the caller guarantees both pointers are live allocations of `len` f32 values.
    let s = unsafe { stream.upgrade_device_ptr::<f32>(send.ptr, send.len) };
    // SAFETY: as above.
    let mut r = unsafe { stream.upgrade_device_ptr::<f32>(recv.ptr, recv.len) };
    let result = run(&s, &mut r);
    s.leak();
    r.leak();
    result
}

impl NcclComm {
    /// Sums `t` over all ranks (same shape). On this rank's CUDA device the sum runs on the
    /// tensor's device memory; any other tensor goes through [`Communicator::all_reduce`].
    pub fn all_reduce_tensor<const D: usize>(
        &self,
        tag: CollectiveTag,
        t: Tensor<D>,
    ) -> Pending<Tensor<D>> {
        let shape = t.shape();
        self.tensor_collective(
            CollectiveKind::AllReduce,
            tag,
            t,
            shape,
            |c, tag, v| c.all_reduce(tag, v),
            |comm, send, recv| comm.all_reduce(send, recv, &ReduceOp::Sum).map(|_| ()),
        )
    }

    /// Concatenates every rank's `t` along dimension 0, in rank order (shapes must agree). On
    /// this rank's CUDA device the gather runs on device memory; otherwise through
    /// [`Communicator::all_gather`].
    pub fn all_gather_tensor<const D: usize>(
        &self,
        tag: CollectiveTag,
        t: Tensor<D>,
    ) -> Pending<Tensor<D>> {
        let mut dims = t.dims();
        if let Some(rows) = dims.first_mut() {
            *rows *= self.world;
        }
        let out = Shape::from(dims);
        self.tensor_collective(
            CollectiveKind::AllGather,
            tag,
            t,
            out,
            |c, tag, v| c.all_gather(tag, v),
            |comm, send, recv| comm.all_gather(send, recv).map(|_| ()),
        )
    }

    /// Sends rows to every rank, like [`Communicator::all_to_all_v`], with the rows as a tensor:
    /// `rows` is `[Σ counts, row_len]`, peer-major then group-major, and `counts[p]` the row
    /// counts per group for rank `p`. Returns the received rows, `[Σ received, row_len]` in rank
    /// order, and the counts received per peer and group. On this rank's CUDA device the rows
    /// are sent from the tensor's device memory and received into device memory (the received
    /// rows take one device-to-device copy into a burn tensor, as their number is only known
    /// once the counts have arrived); any other tensor goes through the host.
    pub fn all_to_all_v_tensor(
        &self,
        tag: CollectiveTag,
        rows: Tensor<2>,
        counts: Vec<Vec<usize>>,
    ) -> Pending<(Tensor<2>, Vec<Vec<usize>>)> {
        let [n_rows, row_len] = rows.dims();
        let device = rows.device();
        let kind = CollectiveKind::AllToAllV;
        let op = format!("{kind} on rank {}", self.rank);
        let Some(ordinal) = self.cuda_ordinal(&device).filter(|_| n_rows * row_len > 0) else {
            let data = match rows.into_data().try_into_vec_as::<f32>() {
                Ok(v) => v,
                Err(e) => {
                    let err = CommError::InvalidArgument(format!("{op}: tensor data: {e:?}"));
                    return Pending::ready(op, Err(err));
                }
            };
            let send = Rows {
                row_len,
                data,
                counts,
            };
            return self.all_to_all_v(tag, send).map(move |got| {
                let n = got.num_rows();
                let out = Tensor::from_data(TensorData::new(got.data, [n, got.row_len]), &device);
                Ok((out, got.counts))
            });
        };
        let call = rows_call(tag, &counts, n_rows, row_len, self.world);
        let mine = self.shared.ctx.ordinal();
        if ordinal != mine {
            let e = CommError::InvalidArgument(format!(
                "{op}: the rows are on CUDA device {ordinal}, this rank's NCCL communicator on {mine}"
            ));
            return Pending::ready(op, Err(e));
        }
        let send = resolve(rows, &op).and_then(|b| {
            device
                .sync()
                .map_err(|e| backend_err(&op, format!("synchronising the burn device: {e:?}")))?;
            Ok(b)
        });
        let send = match send {
            Ok(b) => b,
            Err(e) => return Pending::ready(op, Err(e)),
        };
        let out_offsets = peer_offsets(&counts);
        self.start(kind, call, move |this, comm, call, seq, op| {
            let counts_in = this.exchange_counts(comm, call, seq, op, &counts)?;
            let rows_in: Vec<usize> = counts_in.iter().map(|g| g.iter().sum()).collect();
            let total: usize = rows_in.iter().sum();
            let mut recv = this
                .stream
                .alloc_zeros::<f32>((total * row_len).max(1))
                .map_err(cuda_err(op, "allocate received rows"))?;
            // SAFETY: `send` owns its allocation (and its cubecl binding) until `InFlight` lets
            // it go, after NCCL is done; the slice is leaked so cudarc never frees it.
            let s = unsafe { this.stream.upgrade_device_ptr::<f32>(send.ptr, send.len) };
            let sent = this.send_rows(comm, op, &out_offsets, &rows_in, row_len, &s, &mut recv);
            s.leak();
            sent?;
            let done = this
                .stream
                .record_event(None)
                .map_err(cuda_err(op, "record event"))?;
            let in_flight = InFlight {
                buffers: vec![send],
                done,
                timeout: this.config.timeout,
            };
            Ok(Box::new(move |stream: &Arc<CudaStream>, op: &str| {
                drop(in_flight);
                let out = received_tensor(stream, op, &recv, total, row_len, &device)?;
                Ok((out, counts_in))
            }))
        })
    }

    /// The device path when `t` is on this rank's CUDA device, the host path (`host`) otherwise.
    fn tensor_collective<const D: usize>(
        &self,
        kind: CollectiveKind,
        tag: CollectiveTag,
        t: Tensor<D>,
        out_shape: Shape,
        host: impl FnOnce(&Self, CollectiveTag, Vec<f32>) -> Pending<Vec<f32>>,
        run: impl FnOnce(&Comm, &CudaSlice<f32>, &mut CudaSlice<f32>) -> Result<(), NcclError>
        + Send
        + 'static,
    ) -> Pending<Tensor<D>> {
        let device = t.device();
        let len = t.shape().num_elements();
        // An empty tensor has no device buffer to hand over; the host path moves nothing.
        let Some(ordinal) = self.cuda_ordinal(&device).filter(|_| len > 0) else {
            return host_path(self, tag, t, out_shape, host);
        };
        let call = semantics::prepare_flat(kind, tag, len, self.world);
        let op = format!("{kind} on rank {}", self.rank);
        let mine = self.shared.ctx.ordinal();
        if ordinal != mine {
            let e = CommError::InvalidArgument(format!(
                "{op}: the tensor is on CUDA device {ordinal}, this rank's NCCL communicator on {mine}"
            ));
            return Pending::ready(op, Err(e));
        }
        let prepared = (|| {
            let send = resolve(t, &op)?;
            let out = Tensor::<D>::zeros(out_shape, &device);
            let recv = resolve(out.clone(), &op)?;
            // Every kernel burn queued (including the ones writing `send` and zeroing `out`)
            // finishes before NCCL reads or writes the buffers on its own stream.
            device
                .sync()
                .map_err(|e| backend_err(&op, format!("synchronising the burn device: {e:?}")))?;
            Ok::<_, CommError>((send, recv, out))
        })();
        let (send, recv, out) = match prepared {
            Ok(p) => p,
            Err(e) => return Pending::ready(op, Err(e)),
        };
        self.start(kind, call, move |this, comm, _, _, op| {
            // SAFETY: `send` and `recv` own their allocations until `InFlight` lets them go,
            // which is after NCCL is done with them; `out` is fresh and only returned after
            // the completion event, and `send` was consumed from the caller.
            unsafe { on_device(&this.stream, &send, &recv, |s, r| run(comm, s, r)) }
                .map_err(nccl_err(op, kind.name()))?;
            let done = this
                .stream
                .record_event(None)
                .map_err(cuda_err(op, "record event"))?;
            let in_flight = InFlight {
                buffers: vec![send, recv],
                done,
                timeout: this.config.timeout,
            };
            Ok(Box::new(move |_: &Arc<CudaStream>, _: &str| {
                drop(in_flight);
                Ok(out)
            }))
        })
    }
}

/// The call signature of a tensor `all_to_all_v`, after the checks [`Rows::validate`] makes.
fn rows_call(
    tag: CollectiveTag,
    counts: &[Vec<usize>],
    n_rows: usize,
    row_len: usize,
    world: usize,
) -> Result<CollectiveCall, CommError> {
    if counts.len() != world {
        return Err(CommError::InvalidArgument(format!(
            "{tag}: all_to_all_v: {} per-peer counts for a world of {world}",
            counts.len()
        )));
    }
    let counted: usize = counts.iter().flatten().sum();
    if counted != n_rows {
        return Err(CommError::InvalidArgument(format!(
            "{tag}: all_to_all_v: counts sum to {counted} rows but the tensor has {n_rows}"
        )));
    }
    Ok(CollectiveCall {
        kind: CollectiveKind::AllToAllV,
        tag,
        shape: CallShape::Rows { row_len },
    })
}

/// The first row sent to each peer, and the end.
fn peer_offsets(counts: &[Vec<usize>]) -> Vec<usize> {
    let mut offsets = vec![0];
    let mut at = 0;
    for groups in counts {
        at += groups.iter().sum::<usize>();
        offsets.push(at);
    }
    offsets
}

/// Copies `total` received rows from the comm buffer into a new burn tensor on `device`. Runs
/// after the collective's completion event, on a stream of its own: the comm stream may
/// already hold later collectives that wait for peers.
fn received_tensor(
    stream: &Arc<CudaStream>,
    op: &str,
    recv: &CudaSlice<f32>,
    total: usize,
    row_len: usize,
    device: &Device,
) -> Result<Tensor<2>, CommError> {
    let len = total * row_len;
    if len == 0 {
        let empty = TensorData::new(Vec::<f32>::new(), [total, row_len]);
        return Ok(Tensor::from_data(empty, device));
    }
    let out = Tensor::<2>::zeros([total, row_len], device);
    let dst = resolve(out.clone(), op)?;
    device
        .sync()
        .map_err(|e| backend_err(op, format!("synchronising the burn device: {e:?}")))?;
    let copy = stream
        .context()
        .new_stream()
        .map_err(cuda_err(op, "copy stream"))?;
    // SAFETY: `dst` is a live, bound allocation of `len` f32 values that nothing else writes
    // until `copy` has synchronised below; the slice is leaked so cudarc never frees it.
    let mut d = unsafe { copy.upgrade_device_ptr::<f32>(dst.ptr, len) };
    let copied = copy
        .memcpy_dtod(&recv.slice(0..len), &mut d)
        .map_err(cuda_err(op, "copy received rows"));
    d.leak();
    copied?;
    copy.synchronize()
        .map_err(cuda_err(op, "synchronise the copy stream"))?;
    drop(dst);
    Ok(out)
}

/// Keeps burn's buffers alive while NCCL may still use them. Normally dropped after the
/// completion event (at once); when the caller drops its `Pending` unwaited, the drop waits for
/// the event instead, and if that does not come within the timeout the buffers are leaked rather
/// than handed back to burn's allocator under a running collective.
struct InFlight {
    buffers: Vec<DeviceBuffer>,
    done: CudaEvent,
    timeout: Duration,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let started = Instant::now();
        loop {
            match self.done.try_is_complete() {
                Ok(true) => return,
                Ok(false) if started.elapsed() < self.timeout => {
                    std::thread::sleep(Duration::from_micros(50));
                }
                _ => {
                    std::mem::forget(std::mem::take(&mut self.buffers));
                    return;
                }
            }
        }
    }
}

/// Host tensors: to a `Vec<f32>`, the host collective, back onto the tensor's device.
fn host_path<const D: usize>(
    comm: &NcclComm,
    tag: CollectiveTag,
    t: Tensor<D>,
    out_shape: Shape,
    host: impl FnOnce(&NcclComm, CollectiveTag, Vec<f32>) -> Pending<Vec<f32>>,
) -> Pending<Tensor<D>> {
    let device = t.device();
    let data = match t.into_data().try_into_vec_as::<f32>() {
        Ok(v) => v,
        Err(e) => {
            let op = format!("tensor collective on rank {}", comm.rank);
            let err = CommError::InvalidArgument(format!("{op}: tensor data: {e:?}"));
            return Pending::ready(op, Err(err));
        }
    };
    host(comm, tag, data)
        .map(move |v| Ok(Tensor::from_data(TensorData::new(v, out_shape), &device)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::Communicator;
    use crate::nccl::NcclConfig;

    /// The device path against the host path, on 2+ GPUs under torchrun:
    /// `torchrun --nproc-per-node 2 --no-python cargo test -p farskip-dist --features nccl -- --ignored device_path`
    #[test]
    #[ignore = "needs 2 CUDA GPUs and NCCL"]
    fn device_path_equals_host_path() -> Result<(), Box<dyn std::error::Error>> {
        let c = NcclComm::from_env(NcclConfig {
            verify_calls: true,
            ..NcclConfig::default()
        })?;
        let (r, n) = (c.rank(), c.world_size());
        let gpu = Device::cuda(c.context().ordinal());
        assert_eq!(c.cuda_ordinal(&gpu), Some(c.context().ordinal()));
        assert_eq!(c.cuda_ordinal(&Device::flex()), None);
        // Rank-dependent, non-trivial values; the transposed copy is strided on the device.
        let host: Vec<f32> = (0..12).map(|i| (r * 100 + i) as f32 * 0.5 - 3.0).collect();
        let on_gpu = Tensor::<2>::from_data(TensorData::new(host.clone(), [3, 4]), &gpu);
        let strided = on_gpu.clone().transpose();

        let want = c
            .all_reduce(CollectiveTag::new("host sum"), host.clone())
            .wait()?;
        let got = c
            .all_reduce_tensor(CollectiveTag::new("device sum"), on_gpu.clone())
            .wait()?;
        assert_eq!(got.device(), gpu);
        assert_eq!(got.dims(), [3, 4]);
        assert_eq!(got.into_data().try_into_vec::<f32>()?, want);

        let want_t = c
            .all_reduce(
                CollectiveTag::new("host sum T"),
                strided.clone().into_data().try_into_vec::<f32>()?,
            )
            .wait()?;
        let got_t = c
            .all_reduce_tensor(CollectiveTag::new("device sum T"), strided)
            .wait()?;
        assert_eq!(got_t.dims(), [4, 3]);
        assert_eq!(got_t.into_data().try_into_vec::<f32>()?, want_t);

        let want_g = c
            .all_gather(CollectiveTag::new("host gather"), host.clone())
            .wait()?;
        let got_g = c
            .all_gather_tensor(CollectiveTag::new("device gather"), on_gpu)
            .wait()?;
        assert_eq!(got_g.dims(), [3 * n, 4]);
        assert_eq!(got_g.into_data().try_into_vec::<f32>()?, want_g);

        // Rows: rank r sends rank d (r + d) % 2 + 1 rows of 3 values, in two groups for rank 0.
        let counts: Vec<Vec<usize>> = (0..n)
            .map(|d| match d {
                0 => vec![1, r % 2],
                _ => vec![(r + d) % 2 + 1],
            })
            .collect();
        let n_out: usize = counts.iter().flatten().sum();
        let data: Vec<f32> = (0..n_out * 3).map(|i| (r * 1000 + i) as f32).collect();
        let host_rows = Rows {
            row_len: 3,
            data: data.clone(),
            counts: counts.clone(),
        };
        let want_r = c
            .all_to_all_v(CollectiveTag::new("host rows"), host_rows)
            .wait()?;
        for dev in [gpu.clone(), Device::flex()] {
            let t = Tensor::<2>::from_data(TensorData::new(data.clone(), [n_out, 3]), &dev);
            let (got_r, got_counts) = c
                .all_to_all_v_tensor(CollectiveTag::new("tensor rows"), t, counts.clone())
                .wait()?;
            assert_eq!(got_r.device(), dev);
            assert_eq!(got_counts, want_r.counts);
            assert_eq!(got_r.dims(), [want_r.num_rows(), 3]);
            assert_eq!(got_r.into_data().try_into_vec::<f32>()?, want_r.data);
        }

        // A host tensor takes the host path and stays on its device.
        let flex = Tensor::<1>::from_data(TensorData::new(host.clone(), [12]), &Device::flex());
        let got_h = c
            .all_reduce_tensor(CollectiveTag::new("flex sum"), flex)
            .wait()?;
        assert_eq!(got_h.device(), Device::flex());
        assert_eq!(got_h.into_data().try_into_vec::<f32>()?, want);
        Ok(())
    }
}
