//! [`MpiComm`]: the MPI backend (feature `mpi`), one process per rank, launched by `mpirun`.
//!
//! [`MpiWorld::init`] initialises MPI with `MPI_THREAD_MULTIPLE`; [`MpiWorld::communicator`] gives
//! a communicator of its own (a duplicate of `MPI_COMM_WORLD`) with a progress thread. A
//! collective is queued to that thread and returns at once: the thread starts the non-blocking MPI
//! calls (`MPI_Iallgather`, `MPI_Ialltoall(v)`, `MPI_Ibcast`, `MPI_Ibarrier`), chains the steps of
//! one collective and polls them to completion (`MPI_Test` with a short sleep, so a rank's compute
//! keeps its cores), one collective after another in issue order, like a CUDA stream. The issuing
//! thread never enters MPI.
//!
//! Every collective starts with an all-gather of the calls' fixed-size encodings
//! ([`CollectiveCall::to_words`]) and this rank's issue time, so a mismatched call is reported as
//! [`CommError::Mismatch`] on every rank instead of corrupting data or hanging, and the trace knows
//! when the last rank issued. `all_to_all_v` then exchanges its per-peer group counts with a
//! non-blocking all-to-all before the rows move.
//!
//! Sums are bit-identical to [`LocalWorld`](super::LocalWorld)'s: MPI does not specify the order in
//! which `MPI_Allreduce` adds, so sums never use MPI's reductions. `reduce_scatter` moves each
//! rank's chunk to its owner with `MPI_Ialltoall` and adds the chunks in rank order `0..n` on the
//! owner; `all_reduce` does the same on `⌈len/n⌉`-element chunks and all-gathers the sums (the
//! traffic of a ring all-reduce).
//!
//! Faults: a wait gives up after the timeout, and while waiting it checks every peer on this host
//! by the pid exchanged at set-up: a rank whose process is gone fails the wait at once with
//! [`CommError::PeerFailed`] naming it. Open MPI's `mpirun` by default kills the whole job when one
//! rank dies (the others end with SIGTERM and `mpirun` exits non-zero naming the dead rank);
//! with `mpirun --enable-recovery` the other ranks keep running and report the lost rank through
//! this check. A communicator whose wait failed is aborted; [`MpiWorld`] then skips
//! `MPI_Finalize` (collectives are still in flight), so the process can exit with its error.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mpi::Threading;
use mpi::datatype::{Partition, PartitionMut};
use mpi::request::{Request, Scope};
use mpi::topology::{Communicator as _, SimpleCommunicator};
use mpi::traits::{CommunicatorCollectives, Root};

use super::pending::DEFAULT_TIMEOUT;
use super::semantics::{self, Output, Payload};
use super::{
    CallShape, CollectiveCall, CollectiveKind, CollectiveTag, CommError, Communicator, Pending,
    Rows,
};
use crate::trace::{Span, Stream, Trace};

/// Why MPI could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MpiInitError {
    /// MPI was already initialised in this process.
    #[error("MPI is already initialised in this process (one MpiWorld per process)")]
    AlreadyInitialised,
    /// The MPI library cannot run threads that call it concurrently.
    #[error(
        "the MPI library gives thread level {got:?}; the MPI backend needs MPI_THREAD_MULTIPLE"
    )]
    NoThreadMultiple {
        /// The level MPI provided.
        got: String,
    },
    /// The process was not started by `mpirun` (or another MPI launcher).
    #[error(
        "this process was not started by mpirun: launch one process per rank, e.g. `mpirun -np 2 {program} …`"
    )]
    NotLaunched {
        /// The program, for the suggested command line.
        program: String,
    },
    /// A set-up step failed.
    #[error("MPI set-up failed in {step}: {detail}")]
    Setup {
        /// The step.
        step: &'static str,
        /// What went wrong.
        detail: String,
    },
}

/// Set when a communicator gave up on a collective: MPI still owns its buffers, so `MPI_Finalize`
/// must not run.
static UNCLEAN: AtomicBool = AtomicBool::new(false);

/// The MPI environment of this process: initialised by [`MpiWorld::init`], finalised on drop
/// (unless a collective had to be abandoned). Create it once, before any communicator, and drop it
/// after them.
pub struct MpiWorld {
    universe: Option<mpi::environment::Universe>,
    rank: usize,
    size: usize,
}

impl std::fmt::Debug for MpiWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiWorld")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Whether an MPI launcher (Open MPI's `mpirun`, or a PMI/PMIx launcher) started this process.
pub fn launched_by_mpirun() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

impl MpiWorld {
    /// Initialises MPI with `MPI_THREAD_MULTIPLE`. Refuses a process that no MPI launcher started
    /// (Open MPI would otherwise run it as a world of one, which hides a launch mistake).
    pub fn init() -> Result<Self, MpiInitError> {
        if !launched_by_mpirun() {
            let program = std::env::args()
                .next()
                .unwrap_or_else(|| "PROGRAM".to_owned());
            return Err(MpiInitError::NotLaunched { program });
        }
        let (universe, level) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or(MpiInitError::AlreadyInitialised)?;
        if level != Threading::Multiple {
            return Err(MpiInitError::NoThreadMultiple {
                got: format!("{level:?}"),
            });
        }
        let world = universe.world();
        let (rank, size) = (world.rank(), world.size());
        Ok(Self {
            universe: Some(universe),
            rank: usize::try_from(rank).unwrap_or_default(),
            size: usize::try_from(size).unwrap_or_default(),
        })
    }

    /// This process's rank in `MPI_COMM_WORLD`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of processes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// A new communicator over all processes (a duplicate of `MPI_COMM_WORLD`, so its collectives
    /// never mix with another communicator's) with its own progress thread. Collective over all
    /// ranks: every process must call it, in the same order.
    pub fn communicator(&self, config: MpiConfig) -> Result<MpiComm, MpiInitError> {
        let Some(universe) = &self.universe else {
            return Err(MpiInitError::Setup {
                step: "communicator",
                detail: "MPI was finalised".to_owned(),
            });
        };
        MpiComm::start(universe.world().duplicate(), self.rank, self.size, config)
    }
}

impl Drop for MpiWorld {
    fn drop(&mut self) {
        if let Some(universe) = self.universe.take()
            && UNCLEAN.load(Ordering::SeqCst)
        {
            // MPI_Finalize would wait for the abandoned collectives; exit without it.
            std::mem::forget(universe);
        }
    }
}

/// Settings of an [`MpiComm`].
#[derive(Debug, Clone)]
pub struct MpiConfig {
    /// How long a wait may take before it fails (default 300 s).
    pub timeout: Duration,
    /// Where the progress thread records each collective (stream `Comm`): from when the last rank
    /// issued it to when its data arrived. Disabled by default.
    pub trace: Trace,
}

impl Default for MpiConfig {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            trace: Trace::disabled(),
        }
    }
}

impl MpiConfig {
    /// The same settings with another timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same settings recording collectives into `trace`.
    pub fn with_trace(mut self, trace: Trace) -> Self {
        self.trace = trace;
        self
    }
}

/// An MPI communicator handle that only the progress thread uses after set-up.
struct CommHandle(SimpleCommunicator);

// SAFETY: MPI runs with MPI_THREAD_MULTIPLE (checked by `MpiWorld::init`), so a communicator may be
// used from any thread; after set-up only the progress thread touches it.
unsafe impl Send for CommHandle {}

type Reply = mpsc::SyncSender<Result<Output, CommError>>;

/// One collective for the progress thread.
struct Job {
    seq: u64,
    call: CollectiveCall,
    payload: Payload,
    posted: SystemTime,
    reply: Reply,
}

/// What the waiting side needs to judge peers.
struct Peers {
    rank: usize,
    /// Each rank's process id and host name (exchanged at set-up).
    procs: Vec<(u32, String)>,
}

impl Peers {
    /// The first peer on this host whose process is gone (no `/proc` entry, or a zombie).
    fn first_lost(&self) -> Option<(usize, u32)> {
        let host = &self.procs.get(self.rank)?.1;
        self.procs
            .iter()
            .enumerate()
            .filter(|(r, (_, h))| *r != self.rank && h == host)
            .find(|(_, (pid, _))| !process_alive(*pid))
            .map(|(r, (pid, _))| (r, *pid))
    }
}

fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses: "pid (comm) S ...".
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// One rank of an MPI job: a duplicated world communicator and the progress thread that runs its
/// collectives.
pub struct MpiComm {
    rank: usize,
    size: usize,
    timeout: Duration,
    queue: Mutex<(u64, Option<mpsc::Sender<Job>>)>,
    peers: Arc<Peers>,
    aborted: Arc<Mutex<Option<String>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

fn setup_err(step: &'static str) -> impl FnOnce(std::io::Error) -> MpiInitError {
    move |e| MpiInitError::Setup {
        step,
        detail: e.to_string(),
    }
}

impl MpiComm {
    fn start(
        comm: SimpleCommunicator,
        rank: usize,
        size: usize,
        config: MpiConfig,
    ) -> Result<Self, MpiInitError> {
        // Set-up may block: share each rank's pid and host so a wait can tell a dead peer.
        let host = host_name();
        let mut mine = [0u64; 9];
        mine[0] = u64::from(std::process::id());
        for (w, chunk) in mine[1..].iter_mut().zip(host.as_bytes().chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_le_bytes(b);
        }
        let mut all = vec![0u64; 9 * size];
        comm.all_gather_into(&mine[..], &mut all[..]);
        let procs = all
            .chunks(9)
            .map(|w| {
                let bytes: Vec<u8> = w[1..].iter().flat_map(|x| x.to_le_bytes()).collect();
                let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
                (
                    u32::try_from(w[0]).unwrap_or(0),
                    String::from_utf8_lossy(&bytes[..end]).into_owned(),
                )
            })
            .collect();
        let (tx, rx) = mpsc::channel::<Job>();
        let handle = CommHandle(comm);
        let trace = config.trace.clone();
        let thread = thread::Builder::new()
            .name(format!("farskip-mpi-{rank}"))
            .spawn(move || progress_thread(handle, rank, size, &trace, &rx))
            .map_err(setup_err("spawning the progress thread"))?;
        Ok(Self {
            rank,
            size,
            timeout: config.timeout,
            queue: Mutex::new((0, Some(tx))),
            peers: Arc::new(Peers { rank, procs }),
            aborted: Arc::new(Mutex::new(None)),
            thread: Some(thread),
        })
    }

    /// The timeout of this communicator's collectives.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn submit<T: Send + 'static>(
        &self,
        kind: CollectiveKind,
        call: Result<CollectiveCall, CommError>,
        payload: Payload,
        extract: fn(Output, &str) -> Result<T, CommError>,
    ) -> Pending<T> {
        let call = match call {
            Ok(call) => call,
            Err(e) => return Pending::ready(format!("{kind} on rank {}", self.rank), Err(e)),
        };
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let seq = queue.0;
        queue.0 += 1;
        let op = semantics::describe(&call, seq, self.rank);
        if let Some(reason) = self
            .aborted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Pending::ready(
                op.clone(),
                Err(CommError::Aborted {
                    rank: self.rank,
                    op,
                    reason,
                }),
            );
        }
        let (reply, answer) = mpsc::sync_channel(1);
        let job = Job {
            seq,
            call,
            payload,
            posted: SystemTime::now(),
            reply,
        };
        let sent = queue.1.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        drop(queue);
        if !sent {
            let err = CommError::Backend {
                backend: "mpi",
                op: op.clone(),
                detail: format!("the progress thread of rank {} has stopped", self.rank),
            };
            return Pending::ready(op, Err(err));
        }
        let peers = Arc::clone(&self.peers);
        let aborted = Arc::clone(&self.aborted);
        let rank = self.rank;
        Pending::from_waiter(op.clone(), self.timeout, move |timeout| {
            let started = Instant::now();
            // Wait in slices, checking between them whether a peer's process has died.
            const SLICE: Duration = Duration::from_millis(100);
            let fail = |reason: String, err: CommError| {
                UNCLEAN.store(true, Ordering::SeqCst);
                aborted
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_or_insert(reason);
                Err(err)
            };
            loop {
                let left = timeout.saturating_sub(started.elapsed());
                match answer.recv_timeout(left.min(SLICE)) {
                    Ok(result) => return result.and_then(|out| extract(out, &op)),
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(CommError::Backend {
                            backend: "mpi",
                            op,
                            detail: format!("the progress thread of rank {rank} has stopped"),
                        });
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                }
                if let Some((lost, pid)) = peers.first_lost() {
                    let reason = format!("its process (pid {pid}) is gone");
                    let err = CommError::PeerFailed {
                        rank: lost,
                        op: op.clone(),
                        reason: reason.clone(),
                    };
                    return fail(format!("rank {lost} was lost in {op}: {reason}"), err);
                }
                if started.elapsed() >= timeout {
                    let err = CommError::Timeout {
                        op: op.clone(),
                        waited: started.elapsed(),
                        missing: Vec::new(),
                    };
                    return fail(format!("gave up on {op} after {timeout:?}"), err);
                }
            }
        })
    }

    fn flat(&self, kind: CollectiveKind, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        let call = semantics::prepare_flat(kind, tag, data.len(), self.size);
        self.submit(kind, call, Payload::Flat(data), Output::into_flat)
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.1 = None;
        drop(queue);
        let aborted = self
            .aborted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        if let Some(thread) = self.thread.take() {
            if aborted || thread::panicking() {
                // The thread may be stuck in a collective a dead peer never joins: leave it.
                UNCLEAN.store(true, Ordering::SeqCst);
            } else {
                // Collectives queued but never waited on still run (peers need them), then it ends.
                let _ = thread.join();
            }
        }
    }
}

/// Polls `req` to completion without spinning a core: MPI progresses non-blocking collectives
/// inside `MPI_Test`, and the rank's compute needs the cores between polls.
fn complete<'a, D: ?Sized, S: Scope<'a>>(mut req: Request<'a, D, S>) {
    let mut pause = Duration::from_micros(5);
    loop {
        match req.test() {
            Ok(_) => return,
            Err(r) => req = r,
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_micros(200));
    }
}

fn count(n: usize, op: &str) -> Result<i32, CommError> {
    i32::try_from(n).map_err(|_| {
        CommError::InvalidArgument(format!(
            "{op}: {n} elements exceed MPI's count limit ({})",
            i32::MAX
        ))
    })
}

/// Words of the header every collective starts with: the call's encoding and the issue time.
const HEADER: usize = CollectiveCall::WORDS + 1;

fn progress_thread(
    comm: CommHandle,
    rank: usize,
    size: usize,
    trace: &Trace,
    jobs: &mpsc::Receiver<Job>,
) {
    let comm = &comm.0;
    for job in jobs {
        let op = semantics::describe(&job.call, job.seq, rank);
        let tag = job.call.tag.clone();
        let result = run_collective(comm, rank, size, &job, &op);
        if let Ok((_, all_issued)) = &result
            && trace.is_enabled()
        {
            let now = SystemTime::now();
            let ago = |t: SystemTime| now.duration_since(t).unwrap_or_default();
            let end = trace.offset_of(Instant::now());
            let at = |t: SystemTime| end.saturating_sub(ago(t));
            trace.record(Span {
                rank,
                stream: Stream::Comm,
                layer: tag.layer,
                op: tag.name,
                phase: tag.phase,
                start: at(*all_issued),
                end,
                issued: Some(at(job.posted)),
                all_issued: Some(at(*all_issued)),
            });
        }
        // The caller may have dropped its Pending; the collective still had to run for the peers.
        let _ = job.reply.send(result.map(|(out, _)| out));
    }
}

/// Runs one collective to completion on the progress thread: the header exchange, then the data.
/// Returns the result and when the last rank issued the collective.
fn run_collective(
    comm: &SimpleCommunicator,
    rank: usize,
    size: usize,
    job: &Job,
    op: &str,
) -> Result<(Output, SystemTime), CommError> {
    let nanos = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    };
    let mut header = [0u64; HEADER];
    header[..CollectiveCall::WORDS].copy_from_slice(&job.call.to_words());
    header[CollectiveCall::WORDS] = nanos(job.posted);
    let mut headers = vec![0u64; HEADER * size];
    mpi::request::scope(|scope| {
        complete(comm.immediate_all_gather_into(scope, &header[..], &mut headers[..]));
    });
    let calls: Vec<Option<CollectiveCall>> = headers
        .chunks_exact(HEADER)
        .map(|h| {
            let words: [u64; CollectiveCall::WORDS] = h[..CollectiveCall::WORDS]
                .try_into()
                .unwrap_or([0; CollectiveCall::WORDS]);
            CollectiveCall::from_words(&words)
        })
        .collect();
    let last_issue = headers
        .chunks_exact(HEADER)
        .map(|h| h[CollectiveCall::WORDS])
        .max()
        .unwrap_or(0);
    let all_issued = UNIX_EPOCH + Duration::from_nanos(last_issue);
    // Compare the encodings (what crossed the wire), so that truncated names compare alike.
    let mine = CollectiveCall::from_words(&job.call.to_words());
    let decoded: Vec<CollectiveCall> = calls
        .iter()
        .map(|c| {
            c.clone().unwrap_or_else(|| CollectiveCall {
                kind: CollectiveKind::Barrier,
                tag: CollectiveTag::new("<undecodable call>"),
                shape: CallShape::Empty,
            })
        })
        .collect();
    let refs: Vec<&CollectiveCall> = decoded.iter().collect();
    if let Some(peer) = semantics::find_mismatch(&refs, rank)
        .or_else(|| calls.iter().position(Option::is_none))
        .filter(|_| mine.is_some())
    {
        return Err(CommError::Mismatch {
            seq: job.seq,
            rank,
            call: Box::new(job.call.clone()),
            peer,
            peer_call: Box::new(decoded[peer].clone()),
        });
    }
    let out = match (&job.payload, job.call.kind) {
        (Payload::Flat(data), CollectiveKind::AllReduce) => all_reduce(comm, size, data, op)?,
        (Payload::Flat(data), CollectiveKind::ReduceScatter) => {
            reduce_scatter(comm, size, data, op)?
        }
        (Payload::Flat(data), CollectiveKind::AllGather) => {
            let mut out = vec![0f32; data.len() * size];
            count(out.len(), op)?;
            mpi::request::scope(|scope| {
                complete(comm.immediate_all_gather_into(scope, &data[..], &mut out[..]));
            });
            Output::Flat(out)
        }
        (Payload::Flat(data), CollectiveKind::Broadcast) => {
            let CallShape::Broadcast { root, .. } = job.call.shape else {
                return Err(protocol(op, "broadcast without a root"));
            };
            let mut buf = data.clone();
            count(buf.len(), op)?;
            let root = comm.process_at_rank(count(root, op)?);
            mpi::request::scope(|scope| {
                complete(root.immediate_broadcast_into(scope, &mut buf[..]));
            });
            Output::Flat(buf)
        }
        (Payload::Rows(rows), CollectiveKind::AllToAllV) => {
            Output::Rows(all_to_all_v(comm, size, rows, op)?)
        }
        (Payload::Empty, CollectiveKind::Barrier) => {
            complete(comm.immediate_barrier());
            Output::Unit
        }
        _ => return Err(protocol(op, "payload does not fit the collective")),
    };
    Ok((out, all_issued))
}

fn protocol(op: &str, detail: &str) -> CommError {
    CommError::Protocol {
        op: op.to_owned(),
        detail: detail.to_owned(),
    }
}

/// Sends chunk `p` of `data` (chunks of `chunk` elements, zero-padded) to rank `p` and returns the
/// chunks received, rank by rank.
fn chunks_to_owners(
    comm: &SimpleCommunicator,
    size: usize,
    data: &[f32],
    chunk: usize,
    op: &str,
) -> Result<Vec<f32>, CommError> {
    let mut send = data.to_vec();
    send.resize(chunk * size, 0.0);
    count(send.len(), op)?;
    let mut recv = vec![0f32; chunk * size];
    mpi::request::scope(|scope| {
        complete(comm.immediate_all_to_all_into(scope, &send[..], &mut recv[..]));
    });
    Ok(recv)
}

/// Adds the rank-by-rank chunks of `received` in rank order `0..n` (LocalWorld's order).
fn sum_in_rank_order(received: &[f32], chunk: usize) -> Vec<f32> {
    let mut out = received[..chunk].to_vec();
    for theirs in received.chunks_exact(chunk.max(1)).skip(1) {
        for (a, b) in out.iter_mut().zip(theirs) {
            *a += *b;
        }
    }
    out
}

fn reduce_scatter(
    comm: &SimpleCommunicator,
    size: usize,
    data: &[f32],
    op: &str,
) -> Result<Output, CommError> {
    let chunk = data.len() / size;
    let received = chunks_to_owners(comm, size, data, chunk, op)?;
    Ok(Output::Flat(sum_in_rank_order(&received, chunk)))
}

fn all_reduce(
    comm: &SimpleCommunicator,
    size: usize,
    data: &[f32],
    op: &str,
) -> Result<Output, CommError> {
    let chunk = data.len().div_ceil(size);
    let received = chunks_to_owners(comm, size, data, chunk, op)?;
    let mine = sum_in_rank_order(&received, chunk);
    let mut out = vec![0f32; chunk * size];
    mpi::request::scope(|scope| {
        complete(comm.immediate_all_gather_into(scope, &mine[..], &mut out[..]));
    });
    out.truncate(data.len());
    Ok(Output::Flat(out))
}

fn displacements(counts: &[i32]) -> Vec<i32> {
    counts
        .iter()
        .scan(0i32, |at, c| {
            let d = *at;
            *at = at.saturating_add(*c);
            Some(d)
        })
        .collect()
}

/// `all_to_all_v` in three non-blocking steps: the number of groups per peer (`MPI_Ialltoall`),
/// the group counts and then the rows (`MPI_Ialltoallv` each).
fn all_to_all_v(
    comm: &SimpleCommunicator,
    size: usize,
    rows: &Rows,
    op: &str,
) -> Result<Rows, CommError> {
    let groups_out: Vec<u64> = rows.counts.iter().map(|g| g.len() as u64).collect();
    let mut groups_in = vec![0u64; size];
    mpi::request::scope(|scope| {
        complete(comm.immediate_all_to_all_into(scope, &groups_out[..], &mut groups_in[..]));
    });
    let counts_out: Vec<u64> = rows.counts.iter().flatten().map(|c| *c as u64).collect();
    let send_n = groups_out
        .iter()
        .map(|g| count(*g as usize, op))
        .collect::<Result<Vec<_>, _>>()?;
    let recv_n = groups_in
        .iter()
        .map(|g| count(*g as usize, op))
        .collect::<Result<Vec<_>, _>>()?;
    let mut counts_in = vec![0u64; groups_in.iter().sum::<u64>() as usize];
    {
        let (sd, rd) = (displacements(&send_n), displacements(&recv_n));
        let send = Partition::new(&counts_out[..], &send_n[..], &sd[..]);
        let mut recv = PartitionMut::new(&mut counts_in[..], &recv_n[..], &rd[..]);
        mpi::request::scope(|scope| {
            complete(comm.immediate_all_to_all_varcount_into(scope, &send, &mut recv));
        });
    }
    let mut counts: Vec<Vec<usize>> = Vec::with_capacity(size);
    let mut at = 0;
    for g in &groups_in {
        let g = *g as usize;
        counts.push(counts_in[at..at + g].iter().map(|c| *c as usize).collect());
        at += g;
    }
    let row_len = rows.row_len;
    let values = |n: usize| count(n.saturating_mul(row_len), op);
    let send_v = (0..size)
        .map(|p| values(rows.peer_rows(p)))
        .collect::<Result<Vec<_>, _>>()?;
    let recv_v = counts
        .iter()
        .map(|g| values(g.iter().sum()))
        .collect::<Result<Vec<_>, _>>()?;
    let total: usize = recv_v.iter().map(|v| *v as usize).sum();
    count(total, op)?;
    count(rows.data.len(), op)?;
    let mut data = vec![0f32; total];
    {
        let (sd, rd) = (displacements(&send_v), displacements(&recv_v));
        let send = Partition::new(&rows.data[..], &send_v[..], &sd[..]);
        let mut recv = PartitionMut::new(&mut data[..], &recv_v[..], &rd[..]);
        mpi::request::scope(|scope| {
            complete(comm.immediate_all_to_all_varcount_into(scope, &send, &mut recv));
        });
    }
    Ok(Rows {
        row_len,
        data,
        counts,
    })
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn all_reduce(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        self.flat(CollectiveKind::AllReduce, tag, data)
    }

    fn all_to_all_v(&self, tag: CollectiveTag, send: Rows) -> Pending<Rows> {
        let call = semantics::prepare_rows(tag, &send, self.size);
        self.submit(
            CollectiveKind::AllToAllV,
            call,
            Payload::Rows(send),
            Output::into_rows,
        )
    }

    fn all_gather(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        self.flat(CollectiveKind::AllGather, tag, data)
    }

    fn reduce_scatter(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        self.flat(CollectiveKind::ReduceScatter, tag, data)
    }

    fn broadcast(&self, tag: CollectiveTag, root: usize, data: Vec<f32>) -> Pending<Vec<f32>> {
        let call = semantics::prepare_broadcast(tag, root, data.len(), self.size);
        self.submit(
            CollectiveKind::Broadcast,
            call,
            Payload::Flat(data),
            Output::into_flat,
        )
    }

    fn barrier(&self, tag: CollectiveTag) -> Pending<()> {
        let call = Ok(semantics::prepare_barrier(tag));
        self.submit(
            CollectiveKind::Barrier,
            call,
            Payload::Empty,
            Output::into_unit,
        )
    }
}
