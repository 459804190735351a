//! [`NcclComm`]: the NCCL backend (feature `nccl`), one process per GPU, built on cudarc.
//!
//! Setup follows torchrun: [`LaunchEnv`] gives the rank, world and GPU; rank 0 creates the NCCL
//! unique id and hands it to the others over the TCP rendezvous of [`crate::launch`]. The CUDA
//! driver and NCCL libraries are loaded at run time: a machine without them gets
//! [`NcclInitError::NoCudaDriver`] / [`NcclInitError::NoNcclLibrary`], never a panic.
//!
//! Collectives take host buffers like the other backends: each is copied to the GPU, run on a
//! dedicated comm stream, and an event recorded after it; [`Pending::wait`] polls that event
//! (with the timeout) and copies the result back. Every NCCL call is made by an issue thread per
//! communicator, in issue order, so the caller never blocks: `all_to_all_v` exchanges headers and
//! counts first (the issue thread waits for them, small), then moves the rows as grouped
//! send/recv, while the rank that issued it computes. With [`NcclConfig::verify_calls`] every
//! other collective first all-gathers a fixed-size encoding of the call, so mismatched calls are
//! reported instead of hanging. The `all_to_all_v` exchange lives in `all_to_all`.
//!
//! Burn tensors: [`NcclComm::all_reduce_tensor`], [`NcclComm::all_gather_tensor`] and
//! [`NcclComm::all_to_all_v_tensor`] hand a tensor on this rank's CUDA device to NCCL as device
//! memory, with no host copy (see `tensor`); a tensor on any other device takes the host path
//! above.
//!
//! Not here: peer-failure detection beyond timeouts; NCCL sums are identical on all ranks but
//! not in rank order.

use std::ffi::c_char;
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DriverError};
use cudarc::nccl::result::NcclError;
use cudarc::nccl::{Comm, Id, ReduceOp, group_end, group_start};

use crate::comm::semantics;
use crate::comm::{
    CollectiveCall, CollectiveKind, CollectiveTag, CommError, Communicator, Pending, Rows,
};
use crate::launch::{LaunchEnv, LaunchError};

mod all_to_all;
mod tensor;

/// Why an [`NcclComm`] could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NcclInitError {
    /// The CUDA driver library could not be loaded (no GPU driver on this machine).
    #[error("no CUDA driver library (libcuda) can be loaded: the NCCL backend needs a CUDA GPU")]
    NoCudaDriver,
    /// The NCCL library could not be loaded.
    #[error("no NCCL library (libnccl) can be loaded")]
    NoNcclLibrary,
    /// `LOCAL_RANK` names a GPU this host does not have.
    #[error("LOCAL_RANK {local_rank} has no GPU: this host has {devices}")]
    NoDevice {
        /// The requested GPU ordinal.
        local_rank: usize,
        /// GPUs on this host.
        devices: i32,
    },
    /// The launch environment or the rendezvous failed.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// A CUDA call failed.
    #[error("CUDA {step} failed: {detail}")]
    Cuda {
        /// The setup step.
        step: &'static str,
        /// The driver's error.
        detail: String,
    },
    /// An NCCL call failed.
    #[error("NCCL {step} failed: {detail}")]
    Nccl {
        /// The setup step.
        step: &'static str,
        /// The NCCL result code.
        detail: String,
    },
    /// The unique id received from rank 0 has the wrong size.
    #[error("the NCCL unique id from rank 0 has {got} bytes, expected 128")]
    BadId {
        /// Bytes received.
        got: usize,
    },
}

/// Settings of an [`NcclComm`].
#[derive(Debug, Clone)]
pub struct NcclConfig {
    /// Default timeout of [`Pending::wait`] and of the blocking header exchanges.
    pub timeout: Duration,
    /// How long rank 0 waits for the other ranks at the rendezvous (and they for it).
    pub rendezvous_timeout: Duration,
    /// All-gather each call's signature before running it, so that mismatched collectives are
    /// reported. Costs a blocking round trip per collective; on by default in debug builds.
    /// `all_to_all_v` always verifies (its header exchange carries the signature for free).
    pub verify_calls: bool,
}

impl Default for NcclConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            rendezvous_timeout: Duration::from_secs(120),
            verify_calls: cfg!(debug_assertions),
        }
    }
}

/// The NCCL communicator, owned by the issue thread.
struct Inner {
    comm: Comm,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent (NCCL docs, "Thread safety"); only the issue thread uses it.
unsafe impl Send for Inner {}

/// Set when this rank gave up on a collective: NCCL may be wedged, so nothing runs after.
type AbortFlag = Arc<Mutex<Option<String>>>;

/// One collective for the issue thread: makes its NCCL calls on the communicator.
type IssueJob = Box<dyn FnOnce(&Comm) + Send>;

/// The issue side: sequence numbers are handed out in the order jobs are queued.
struct Issue {
    next_seq: u64,
    jobs: Option<mpsc::Sender<IssueJob>>,
}

/// What both the issuing caller and the issue thread use.
struct Shared {
    rank: usize,
    world: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    aborted: AbortFlag,
    config: NcclConfig,
}

/// One rank of an NCCL job (one process, one GPU).
pub struct NcclComm {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
    issue: Mutex<Issue>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

fn cuda_init(step: &'static str) -> impl FnOnce(DriverError) -> NcclInitError {
    move |e| NcclInitError::Cuda {
        step,
        detail: e.to_string(),
    }
}

fn nccl_init(step: &'static str) -> impl FnOnce(NcclError) -> NcclInitError {
    move |e| NcclInitError::Nccl {
        step,
        detail: format!("{:?}", e.0),
    }
}

fn cuda_err(op: &str, step: &'static str) -> impl FnOnce(DriverError) -> CommError {
    let op = op.to_owned();
    move |e| CommError::Backend {
        backend: "nccl",
        op,
        detail: format!("CUDA {step}: {e}"),
    }
}

fn nccl_err(op: &str, step: &'static str) -> impl FnOnce(NcclError) -> CommError {
    let op = op.to_owned();
    move |e| CommError::Backend {
        backend: "nccl",
        op,
        detail: format!("NCCL {step}: {:?}", e.0),
    }
}

/// Whether the CUDA driver and NCCL libraries can be loaded (checked without touching CUDA).
pub fn libraries_present() -> Result<(), NcclInitError> {
    // SAFETY: only tries to dlopen the libraries; no CUDA function is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(NcclInitError::NoCudaDriver);
    }
    // SAFETY: as above, for libnccl.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(NcclInitError::NoNcclLibrary);
    }
    Ok(())
}

impl NcclComm {
    /// Joins the job described by the torchrun environment variables.
    pub fn from_env(config: NcclConfig) -> Result<Self, NcclInitError> {
        libraries_present()?;
        Self::new(&LaunchEnv::from_env()?, config)
    }

    /// Joins the job described by `env`: checks for the libraries, opens GPU `local_rank`,
    /// shares the NCCL unique id from rank 0 and initialises the communicator (which blocks
    /// until all ranks have joined).
    pub fn new(env: &LaunchEnv, config: NcclConfig) -> Result<Self, NcclInitError> {
        libraries_present()?;
        if i32::try_from(env.world_size).is_err() {
            return Err(LaunchError::RankOutOfRange {
                rank: env.rank,
                world: env.world_size,
            }
            .into());
        }
        let devices = CudaContext::device_count().map_err(cuda_init("device count"))?;
        if !usize::try_from(devices).is_ok_and(|d| env.local_rank < d) {
            return Err(NcclInitError::NoDevice {
                local_rank: env.local_rank,
                devices,
            });
        }
        let ctx = CudaContext::new(env.local_rank).map_err(cuda_init("context creation"))?;
        let stream = ctx
            .new_stream()
            .map_err(cuda_init("comm stream creation"))?;

        let mine: Vec<u8> = if env.rank == 0 {
            let id = Id::new().map_err(nccl_init("unique id"))?;
            id.internal().iter().map(|c| *c as u8).collect()
        } else {
            Vec::new()
        };
        let shared = env.share_from_root(&mine, config.rendezvous_timeout)?;
        let raw: [c_char; 128] = shared
            .iter()
            .map(|b| *b as c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| NcclInitError::BadId { got: shared.len() })?;
        let comm = Comm::from_rank(
            Arc::clone(&stream),
            env.rank,
            env.world_size,
            Id::uninit(raw),
        )
        .map_err(nccl_init("communicator init"))?;
        let (tx, rx) = mpsc::channel::<IssueJob>();
        let inner = Inner { comm };
        std::thread::Builder::new()
            .name(format!("farskip-nccl-{}", env.rank))
            .spawn(move || {
                let inner = inner;
                // Runs queued collectives until the communicator is dropped; each ends within its
                // timeout, so the thread does too.
                for job in rx {
                    job(&inner.comm);
                }
            })
            .map_err(|e| NcclInitError::Cuda {
                step: "spawning the issue thread",
                detail: e.to_string(),
            })?;
        Ok(Self {
            rank: env.rank,
            world: env.world_size,
            shared: Arc::new(Shared {
                rank: env.rank,
                world: env.world_size,
                ctx,
                stream,
                aborted: Arc::new(Mutex::new(None)),
                config,
            }),
            issue: Mutex::new(Issue {
                next_seq: 0,
                jobs: Some(tx),
            }),
        })
    }

    /// The dedicated stream collectives run on (for making compute streams wait on it).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.shared.stream
    }

    /// The CUDA context of this rank's GPU.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.shared.ctx
    }

    fn aborted_reason(&self) -> Option<String> {
        self.shared
            .aborted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs one collective: checks and numbers it, then queues it to the issue thread, which
    /// optionally verifies the call across ranks, lets `enqueue` put the NCCL work on the comm
    /// stream and records the completion event. The caller returns at once.
    fn start<T: Send + 'static>(
        &self,
        kind: CollectiveKind,
        call: Result<CollectiveCall, CommError>,
        enqueue: impl FnOnce(&Shared, &Comm, &CollectiveCall, u64, &str) -> Result<Finish<T>, CommError>
        + Send
        + 'static,
    ) -> Pending<T> {
        let call = match call {
            Ok(call) => call,
            Err(e) => return Pending::ready(format!("{kind} on rank {}", self.rank), Err(e)),
        };
        let mut issue = self.issue.lock().unwrap_or_else(PoisonError::into_inner);
        let seq = issue.next_seq;
        issue.next_seq += 1;
        let op = semantics::describe(&call, seq, self.rank);
        if let Some(reason) = self.aborted_reason() {
            return Pending::ready(
                op.clone(),
                Err(CommError::Aborted {
                    rank: self.rank,
                    op,
                    reason,
                }),
            );
        }
        let (reply, issued) = mpsc::sync_channel::<Result<(Finish<T>, CudaEvent), CommError>>(1);
        let shared = Arc::clone(&self.shared);
        let job_op = op.clone();
        let job: IssueJob = Box::new(move |comm: &Comm| {
            let started = Instant::now();
            let result = shared
                .ctx
                .bind_to_thread()
                .map_err(cuda_err(&job_op, "bind context"))
                .and_then(|()| {
                    if shared.config.verify_calls && kind != CollectiveKind::AllToAllV {
                        shared.verify(comm, &call, seq, &job_op, started)?;
                    }
                    let finish = enqueue(&shared, comm, &call, seq, &job_op)?;
                    let event = shared
                        .stream
                        .record_event(None)
                        .map_err(cuda_err(&job_op, "record event"))?;
                    Ok((finish, event))
                });
            // The caller may have dropped its Pending; the collective still ran for the peers.
            let _ = reply.send(result);
        });
        let sent = issue.jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        drop(issue);
        if !sent {
            let err = CommError::Backend {
                backend: "nccl",
                op: op.clone(),
                detail: format!("the issue thread of rank {} has stopped", self.rank),
            };
            return Pending::ready(op, Err(err));
        }
        let stream = Arc::clone(&self.shared.stream);
        let aborted = Arc::clone(&self.shared.aborted);
        let rank = self.rank;
        let waited_op = op.clone();
        Pending::from_waiter(op, self.shared.config.timeout, move |timeout| {
            let started = Instant::now();
            let (finish, event) = match issued.recv_timeout(timeout) {
                Ok(result) => result?,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let waited = started.elapsed();
                    let mut flag = aborted.lock().unwrap_or_else(PoisonError::into_inner);
                    flag.get_or_insert_with(|| {
                        format!("rank {rank} timed out after {waited:?} in {waited_op}")
                    });
                    return Err(CommError::Timeout {
                        op: waited_op,
                        waited,
                        missing: Vec::new(),
                    });
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(CommError::Backend {
                        backend: "nccl",
                        op: waited_op,
                        detail: format!("the issue thread of rank {rank} has stopped"),
                    });
                }
            };
            wait_event(&event, started, timeout, &waited_op, &aborted, rank)?;
            finish(&stream, &waited_op)
        })
    }
}

impl Shared {
    /// All-gathers the call's wire encoding and reports the first disagreement.
    fn verify(
        &self,
        comm: &Comm,
        call: &CollectiveCall,
        seq: u64,
        op: &str,
        started: Instant,
    ) -> Result<(), CommError> {
        let words = call.to_words();
        let send = self
            .stream
            .clone_htod(&words[..])
            .map_err(cuda_err(op, "copy call signature"))?;
        let mut recv = self
            .stream
            .alloc_zeros::<u64>(CollectiveCall::WORDS * self.world)
            .map_err(cuda_err(op, "allocate signatures"))?;
        comm.all_gather(&send, &mut recv)
            .map_err(nccl_err(op, "all_gather of call signatures"))?;
        let all = self.sync_read(&recv, op, started)?;
        let calls: Vec<CollectiveCall> = all
            .chunks_exact(CollectiveCall::WORDS)
            .enumerate()
            .map(|(r, w)| decode(w, r, op))
            .collect::<Result<_, _>>()?;
        check_calls(&calls, self.rank, seq)
    }

    /// Waits for the comm stream (with the timeout) and copies `buf` to the host.
    fn sync_read<T: cudarc::driver::DeviceRepr>(
        &self,
        buf: &CudaSlice<T>,
        op: &str,
        started: Instant,
    ) -> Result<Vec<T>, CommError> {
        let event = self
            .stream
            .record_event(None)
            .map_err(cuda_err(op, "record event"))?;
        wait_event(
            &event,
            started,
            self.config.timeout,
            op,
            &self.aborted,
            self.rank,
        )?;
        self.stream
            .clone_dtoh(buf)
            .map_err(cuda_err(op, "copy to host"))
    }

    fn peer(p: usize, op: &str) -> Result<i32, CommError> {
        i32::try_from(p).map_err(|_| CommError::InvalidArgument(format!("{op}: rank {p}")))
    }
}

impl NcclComm {
    /// Flat collectives: host → device, `run`, and a device → host copy of `out_len` values.
    fn flat(
        &self,
        kind: CollectiveKind,
        call: Result<CollectiveCall, CommError>,
        data: Vec<f32>,
        out_len: usize,
        run: impl FnOnce(&Comm, &CudaSlice<f32>, &mut CudaSlice<f32>) -> Result<(), NcclError>
        + Send
        + 'static,
    ) -> Pending<Vec<f32>> {
        self.start(kind, call, move |this, comm, _, _, op| {
            if data.is_empty() && out_len == 0 {
                return Ok(Box::new(|_, _| Ok(Vec::new())));
            }
            // One spare element: CUDA refuses zero-byte allocations.
            let mut send = this
                .stream
                .alloc_zeros::<f32>(data.len().max(1))
                .map_err(cuda_err(op, "allocate send buffer"))?;
            if !data.is_empty() {
                this.stream
                    .memcpy_htod(&data, &mut send)
                    .map_err(cuda_err(op, "copy to device"))?;
            }
            let mut recv = this
                .stream
                .alloc_zeros::<f32>(out_len.max(1))
                .map_err(cuda_err(op, "allocate receive buffer"))?;
            run(comm, &send, &mut recv).map_err(nccl_err(op, kind.name()))?;
            Ok(Box::new(move |stream: &Arc<CudaStream>, op: &str| {
                let mut out = stream
                    .clone_dtoh(&recv)
                    .map_err(cuda_err(op, "copy to host"))?;
                out.truncate(out_len);
                drop(send);
                Ok(out)
            }))
        })
    }
}

/// Completes a collective on the waiting thread once its event has fired.
type Finish<T> = Box<dyn FnOnce(&Arc<CudaStream>, &str) -> Result<T, CommError> + Send>;

fn decode(words: &[u64], rank: usize, op: &str) -> Result<CollectiveCall, CommError> {
    let fixed: Option<&[u64; CollectiveCall::WORDS]> = words.try_into().ok();
    fixed
        .and_then(CollectiveCall::from_words)
        .ok_or_else(|| CommError::Protocol {
            op: op.to_owned(),
            detail: format!("rank {rank} sent an undecodable call signature"),
        })
}

fn check_calls(calls: &[CollectiveCall], rank: usize, seq: u64) -> Result<(), CommError> {
    let refs: Vec<&CollectiveCall> = calls.iter().collect();
    match semantics::find_mismatch(&refs, rank) {
        None => Ok(()),
        Some(peer) => Err(CommError::Mismatch {
            seq,
            rank,
            call: Box::new(calls[rank].clone()),
            peer,
            peer_call: Box::new(calls[peer].clone()),
        }),
    }
}

/// Polls `event` until it fires, the timeout passes (this rank is then aborted) or CUDA fails.
fn wait_event(
    event: &CudaEvent,
    started: Instant,
    timeout: Duration,
    op: &str,
    aborted: &AbortFlag,
    rank: usize,
) -> Result<(), CommError> {
    let mut spin = Duration::from_micros(5);
    loop {
        match event.try_is_complete() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => return Err(cuda_err(op, "event query")(e)),
        }
        let waited = started.elapsed();
        if waited >= timeout {
            let mut flag = aborted.lock().unwrap_or_else(PoisonError::into_inner);
            flag.get_or_insert_with(|| format!("rank {rank} timed out after {waited:?} in {op}"));
            return Err(CommError::Timeout {
                op: op.to_owned(),
                waited,
                missing: Vec::new(),
            });
        }
        std::thread::sleep(spin);
        spin = (spin * 2).min(Duration::from_millis(1));
    }
}

/// Runs `f` between `ncclGroupStart` and `ncclGroupEnd`, ending the group even if `f` fails.
fn grouped(op: &str, f: impl FnOnce() -> Result<(), CommError>) -> Result<(), CommError> {
    group_start().map_err(nccl_err(op, "group start"))?;
    let inside = f();
    let end = group_end().map(|_| ()).map_err(nccl_err(op, "group end"));
    inside.and(end)
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        let kind = CollectiveKind::AllReduce;
        let len = data.len();
        let call = semantics::prepare_flat(kind, tag, len, self.world);
        self.flat(kind, call, data, len, |comm, send, recv| {
            comm.all_reduce(send, recv, &ReduceOp::Sum).map(|_| ())
        })
    }

    fn all_gather(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        let kind = CollectiveKind::AllGather;
        let len = data.len();
        let call = semantics::prepare_flat(kind, tag, len, self.world);
        self.flat(
            kind,
            call,
            data,
            len * self.world,
            move |comm, send, recv| comm.all_gather(&send.slice(0..len), recv).map(|_| ()),
        )
    }

    fn reduce_scatter(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        let kind = CollectiveKind::ReduceScatter;
        let call = semantics::prepare_flat(kind, tag, data.len(), self.world);
        let chunk = data.len() / self.world;
        self.flat(kind, call, data, chunk, move |comm, send, recv| {
            comm.reduce_scatter(send, &mut recv.slice_mut(0..chunk), &ReduceOp::Sum)
                .map(|_| ())
        })
    }

    fn broadcast(&self, tag: CollectiveTag, root: usize, data: Vec<f32>) -> Pending<Vec<f32>> {
        let call = semantics::prepare_broadcast(tag, root, data.len(), self.world);
        let len = data.len();
        let is_root = root == self.rank;
        let root = i32::try_from(root).unwrap_or(i32::MAX);
        self.flat(
            CollectiveKind::Broadcast,
            call,
            data,
            len,
            move |comm, send, recv| {
                let send = send.slice(0..len);
                let mut recv = recv.slice_mut(0..len);
                comm.broadcast(is_root.then_some(&send), &mut recv, root)
                    .map(|_| ())
            },
        )
    }

    fn barrier(&self, tag: CollectiveTag) -> Pending<()> {
        let kind = CollectiveKind::Barrier;
        let call = Ok(semantics::prepare_barrier(tag));
        self.flat(kind, call, vec![0.0], 1, |comm, send, recv| {
            comm.all_reduce(send, recv, &ReduceOp::Sum).map(|_| ())
        })
        .map(|_| Ok(()))
    }

    fn all_to_all_v(&self, tag: CollectiveTag, send: Rows) -> Pending<Rows> {
        let call = semantics::prepare_rows(tag, &send, self.world);
        self.start(
            CollectiveKind::AllToAllV,
            call,
            move |this, comm, call, seq, op| this.all_to_all_v_enqueue(comm, call, seq, op, send),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world_of_one() -> LaunchEnv {
        LaunchEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".to_owned(),
            master_port: 0,
        }
    }

    #[test]
    fn constructor_reports_a_missing_driver_instead_of_panicking() {
        // SAFETY: only probes whether the library can be loaded.
        let driver = unsafe { cudarc::driver::sys::is_culib_present() };
        let result = NcclComm::new(&world_of_one(), NcclConfig::default());
        if driver {
            assert!(!matches!(result, Err(NcclInitError::NoCudaDriver)));
        } else {
            assert!(
                matches!(result, Err(NcclInitError::NoCudaDriver)),
                "{result:?}"
            );
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU and NCCL"]
    fn world_of_one_collectives() -> Result<(), Box<dyn std::error::Error>> {
        let c = NcclComm::new(&world_of_one(), NcclConfig::default())?;
        let tag = || CollectiveTag::new("t");
        assert_eq!(c.all_reduce(tag(), vec![1.0, 2.0]).wait()?, vec![1.0, 2.0]);
        assert_eq!(c.all_gather(tag(), vec![3.0]).wait()?, vec![3.0]);
        assert_eq!(
            c.reduce_scatter(tag(), vec![4.0, 5.0]).wait()?,
            vec![4.0, 5.0]
        );
        assert_eq!(c.broadcast(tag(), 0, vec![6.0]).wait()?, vec![6.0]);
        c.barrier(tag()).wait()?;
        let rows = Rows {
            row_len: 2,
            data: vec![1.0, 2.0, 3.0, 4.0],
            counts: vec![vec![1, 0, 1]],
        };
        assert_eq!(c.all_to_all_v(tag(), rows.clone()).wait()?, rows);
        let empty = Rows::per_peer(3, vec![], vec![0]);
        assert_eq!(c.all_to_all_v(tag(), empty.clone()).wait()?, empty);
        Ok(())
    }

    /// Issuing `all_to_all_v` returns at once while a peer is 200 ms late (the header and count
    /// exchange runs on the issue thread). Run like the test below, on 2+ GPUs.
    #[test]
    #[ignore = "needs 2+ CUDA GPUs with NCCL, launched by torchrun"]
    fn torchrun_all_to_all_v_does_not_block_the_issuing_rank()
    -> Result<(), Box<dyn std::error::Error>> {
        let c = NcclComm::from_env(NcclConfig::default())?;
        let (r, n) = (c.rank(), c.world_size());
        c.barrier(CollectiveTag::new("start")).wait()?;
        if r != 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        let t0 = Instant::now();
        let rows = Rows::per_peer(4, vec![r as f32; 4 * n], vec![1; n]);
        let pending = c.all_to_all_v(CollectiveTag::new("late"), rows);
        let issue = t0.elapsed();
        let got = pending.wait()?;
        assert!(
            issue < Duration::from_millis(20),
            "issuing blocked rank {r} for {issue:?}"
        );
        assert_eq!(got.num_rows(), n);
        Ok(())
    }

    /// Run with torchrun (or the variables set by hand) on 2+ GPUs:
    /// `torchrun --nproc-per-node 2 --no-python cargo test -p farskip-dist --features nccl -- --ignored torchrun`
    #[test]
    #[ignore = "needs a CUDA GPU and NCCL"]
    fn torchrun_world_sums_and_exchanges_rows() -> Result<(), Box<dyn std::error::Error>> {
        let c = NcclComm::from_env(NcclConfig {
            verify_calls: true,
            ..NcclConfig::default()
        })?;
        let (r, n) = (c.rank(), c.world_size());
        let sum = c
            .all_reduce(CollectiveTag::new("sum"), vec![r as f32; 3])
            .wait()?;
        assert_eq!(sum, vec![(n * (n - 1) / 2) as f32; 3]);
        // Rank s sends (s + d) % 2 rows to rank d, each row [s, d].
        let counts: Vec<usize> = (0..n).map(|d| (r + d) % 2).collect();
        let data: Vec<f32> = (0..n)
            .flat_map(|d| std::iter::repeat_n([r as f32, d as f32], (r + d) % 2).flatten())
            .collect();
        let got = c
            .all_to_all_v(CollectiveTag::new("a2a"), Rows::per_peer(2, data, counts))
            .wait()?;
        for s in 0..n {
            assert_eq!(got.peer_rows(s), (s + r) % 2);
            assert!(
                got.peer_data(s)
                    .chunks(2)
                    .all(|row| row == [s as f32, r as f32])
            );
        }
        Ok(())
    }
}
