//! [`LocalWorld`]: ranks as threads of one process, each with a comm thread that runs its
//! collectives in issue order (like a CUDA stream) and sleeps for the simulated link time, so
//! that communication really overlaps the rank's compute. Also [`LocalWorld::run`], which runs
//! one closure per rank and turns a panic or an error into a failure its peers see at once.
//!
//! The rendezvous itself is in `world`, the link model in `link`.

mod link;
mod world;

use std::fmt::Display;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

pub use link::LinkModel;
use world::World;

use super::pending::DEFAULT_TIMEOUT;
use super::semantics::{self, Output, Payload};
use super::{
    CollectiveCall, CollectiveKind, CollectiveTag, CommError, Communicator, Pending, RankError,
    Rows,
};
use crate::trace::{Span, Stream, Trace};

/// Settings of a [`LocalWorld`].
#[derive(Debug, Clone)]
pub struct LocalWorldConfig {
    /// The simulated interconnect.
    pub link: LinkModel,
    /// How long a collective may wait for its peers, and the default timeout of
    /// [`Pending::wait`]. A rank that times out is marked failed, so its peers stop too.
    pub timeout: Duration,
    /// Where comm threads record their collectives (stream `Comm`); disabled by default.
    pub trace: Trace,
    /// Threads of each rank's own rayon pool, which the rank's tensor ops run on (flex parallelises with
    /// rayon), so ranks do not compete for one shared pool; `None` gives each rank an equal share of the
    /// machine's cores (at least one). Used by [`LocalWorld::run`] and [`LocalWorld::run_with`].
    pub threads_per_rank: Option<usize>,
    /// Pin each rank's pool threads to cores of their own (Linux; when the ranks' threads fit the cores this
    /// process may use), so the operating system cannot put two ranks' compute on one core and skew them.
    /// Default: on, unless the environment sets `FARSKIP_PIN_RANKS=0`.
    pub pin_ranks: bool,
}

impl LocalWorldConfig {
    /// Defaults: the given link, a 300 s timeout, no trace.
    pub fn new(link: LinkModel) -> Self {
        Self {
            link,
            timeout: DEFAULT_TIMEOUT,
            trace: Trace::disabled(),
            threads_per_rank: None,
            pin_ranks: std::env::var("FARSKIP_PIN_RANKS").map_or(true, |v| v.trim() != "0"),
        }
    }

    /// The same settings with rank pinning on or off (see [`LocalWorldConfig::pin_ranks`]).
    pub fn with_pinned_ranks(mut self, pin: bool) -> Self {
        self.pin_ranks = pin;
        self
    }

    /// The same settings with `threads` threads per rank (see [`LocalWorldConfig::threads_per_rank`]).
    pub fn with_threads_per_rank(mut self, threads: usize) -> Self {
        self.threads_per_rank = Some(threads);
        self
    }

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

/// Builds worlds of ranks that live in this process.
///
/// ```
/// use farskip_dist::{CollectiveTag, Communicator, LinkModel, LocalWorld};
/// let results = LocalWorld::run(3, LinkModel::instant(), |comm| {
///     let mine = vec![comm.rank() as f32; 2];
///     comm.all_reduce(CollectiveTag::new("sum"), mine).wait()
/// })?;
/// for r in results {
///     assert_eq!(r?, vec![3.0, 3.0]);
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct LocalWorld;

impl LocalWorld {
    /// One communicator per rank of a world of `size`, with default settings. Move each to its
    /// own thread; dropping one tells its peers the rank has left.
    #[allow(
        clippy::new_ret_no_self,
        reason = "a local world is nothing but its ranks' communicators"
    )]
    pub fn new(size: usize, link: LinkModel) -> Result<Vec<LocalComm>, CommError> {
        Self::with_config(size, LocalWorldConfig::new(link))
    }

    /// Like [`LocalWorld::new`] with explicit settings.
    pub fn with_config(size: usize, config: LocalWorldConfig) -> Result<Vec<LocalComm>, CommError> {
        if size == 0 {
            return Err(CommError::InvalidArgument(
                "a local world needs at least one rank".to_owned(),
            ));
        }
        config.link.validate()?;
        let world = Arc::new(World::new(size, config.link, config.timeout, config.trace));
        (0..size)
            .map(|rank| LocalComm::start(rank, Arc::clone(&world)))
            .collect()
    }

    /// Runs `f` on `size` rank threads and returns each rank's outcome in rank order.
    ///
    /// A rank that panics or returns `Err` is marked failed before its communicator is dropped,
    /// so every peer waiting on a collective gets [`CommError::PeerFailed`] at once.
    pub fn run<T, E, F>(
        size: usize,
        link: LinkModel,
        f: F,
    ) -> Result<Vec<Result<T, RankError<E>>>, CommError>
    where
        F: Fn(&LocalComm) -> Result<T, E> + Sync,
        T: Send,
        E: Display + Send,
    {
        Self::run_with(size, LocalWorldConfig::new(link), f)
    }

    /// Like [`LocalWorld::run`] with explicit settings.
    pub fn run_with<T, E, F>(
        size: usize,
        config: LocalWorldConfig,
        f: F,
    ) -> Result<Vec<Result<T, RankError<E>>>, CommError>
    where
        F: Fn(&LocalComm) -> Result<T, E> + Sync,
        T: Send,
        E: Display + Send,
    {
        let threads = match config.threads_per_rank {
            Some(0) => {
                return Err(CommError::InvalidArgument(
                    "threads_per_rank must be at least 1".to_owned(),
                ));
            }
            Some(n) => n,
            None => (thread::available_parallelism().map_or(1, usize::from) / size).max(1),
        };
        let cores = &rank_cores(size, threads, config.pin_ranks);
        let comms = Self::with_config(size, config)?;
        let f = &f;
        Ok(thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let rank = comm.rank;
                    thread::Builder::new()
                        .name(format!("farskip-rank-{rank}"))
                        .spawn_scoped(s, move || {
                            // The rank runs on its own pool, so its tensor ops use its share of the cores.
                            let mine = cores.get(rank).cloned().unwrap_or_default();
                            match rayon::ThreadPoolBuilder::new()
                                .num_threads(threads)
                                .thread_name(move |i| format!("farskip-rank-{rank}-{i}"))
                                .start_handler(move |i| {
                                    if let Some(&core) = mine.get(i) {
                                        pin_current_thread(core);
                                    }
                                })
                                .build()
                            {
                                Ok(pool) => pool.install(|| run_rank(comm, f)),
                                Err(e) => {
                                    let detail = e.to_string();
                                    comm.world.mark_failed(
                                        rank,
                                        format!("could not start its thread pool: {detail}"),
                                    );
                                    Err(RankError::Start(CommError::Backend {
                                        backend: "local",
                                        op: format!("building the thread pool of rank {rank}"),
                                        detail,
                                    }))
                                }
                            }
                        })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|p| Err(RankError::Panicked(panic_message(p.as_ref())))),
                    Err(e) => Err(RankError::Start(CommError::Backend {
                        backend: "local",
                        op: "spawning a rank thread".to_owned(),
                        detail: e.to_string(),
                    })),
                })
                .collect()
        }))
    }
}

fn run_rank<T, E: Display>(
    comm: LocalComm,
    f: &(impl Fn(&LocalComm) -> Result<T, E> + Sync),
) -> Result<T, RankError<E>> {
    match catch_unwind(AssertUnwindSafe(|| f(&comm))) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => {
            comm.world
                .mark_failed(comm.rank, format!("returned an error: {e}"));
            Err(RankError::Failed(e))
        }
        Err(panic) => {
            let msg = panic_message(panic.as_ref());
            comm.world
                .mark_failed(comm.rank, format!("panicked: {msg}"));
            Err(RankError::Panicked(msg))
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// One collective handed to a comm thread.
struct Job {
    seq: u64,
    call: CollectiveCall,
    payload: Payload,
    /// When the rank issued it.
    posted: Instant,
    /// The result and the modelled arrival time of the data.
    reply: mpsc::SyncSender<Result<(Output, Instant), CommError>>,
}

/// The issue side of a rank: sequence numbers must be handed out in the order jobs are queued.
struct Queue {
    next_seq: u64,
    jobs: Option<mpsc::Sender<Job>>,
}

/// One rank of a [`LocalWorld`].
///
/// Collectives are queued to this rank's comm thread and run there in issue order; the caller
/// keeps computing until it waits. Dropping the communicator tells the peers this rank is gone
/// (or failed, if the thread is panicking).
pub struct LocalComm {
    rank: usize,
    world: Arc<World>,
    queue: Mutex<Queue>,
}

impl LocalComm {
    fn start(rank: usize, world: Arc<World>) -> Result<Self, CommError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread_world = Arc::clone(&world);
        thread::Builder::new()
            .name(format!("farskip-comm-{rank}"))
            .spawn(move || comm_thread(rank, &thread_world, &rx))
            .map_err(|e| CommError::Backend {
                backend: "local",
                op: format!("spawning the comm thread of rank {rank}"),
                detail: e.to_string(),
            })?;
        Ok(Self {
            rank,
            world,
            queue: Mutex::new(Queue {
                next_seq: 0,
                jobs: Some(tx),
            }),
        })
    }

    /// The trace this world records into (disabled unless configured), for the rank's own
    /// compute spans.
    pub fn trace(&self) -> &Trace {
        &self.world.trace
    }

    /// The timeout of this world's collectives.
    pub fn timeout(&self) -> Duration {
        self.world.timeout
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
        let (reply, answer) = mpsc::sync_channel(1);
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let seq = queue.next_seq;
        queue.next_seq += 1;
        let op = semantics::describe(&call, seq, self.rank);
        let job = Job {
            seq,
            call,
            payload,
            posted: Instant::now(),
            reply,
        };
        let sent = queue.jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        drop(queue);
        if !sent {
            let err = comm_thread_gone(self.rank, &op);
            return Pending::ready(op, Err(err));
        }
        let world = Arc::clone(&self.world);
        let rank = self.rank;
        Pending::from_waiter(op.clone(), self.world.timeout, move |timeout| {
            let started = Instant::now();
            match answer.recv_timeout(timeout) {
                Ok(result) => result.and_then(|(out, arrive)| {
                    // The data is there when the link model says so, unless that is past the timeout.
                    let give_up = started + timeout;
                    if arrive > give_up {
                        sleep_until(give_up);
                        world.mark_failed(rank, format!("gave up on {op} after {timeout:?}"));
                        return Err(CommError::Timeout {
                            op: op.clone(),
                            waited: started.elapsed(),
                            missing: Vec::new(),
                        });
                    }
                    sleep_until(arrive);
                    extract(out, &op)
                }),
                Err(RecvTimeoutError::Timeout) => {
                    let missing = world.missing(seq);
                    world.mark_failed(rank, format!("gave up on {op} after {timeout:?}"));
                    Err(CommError::Timeout {
                        op,
                        waited: started.elapsed(),
                        missing,
                    })
                }
                Err(RecvTimeoutError::Disconnected) => Err(comm_thread_gone(rank, &op)),
            }
        })
    }

    fn flat(&self, kind: CollectiveKind, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        let call = semantics::prepare_flat(kind, tag, data.len(), self.world.size);
        self.submit(kind, call, Payload::Flat(data), Output::into_flat)
    }
}

fn comm_thread_gone(rank: usize, op: &str) -> CommError {
    CommError::Backend {
        backend: "local",
        op: op.to_owned(),
        detail: format!("the comm thread of rank {rank} has stopped"),
    }
}

/// Sleeps until `t` (returns at once if it has passed).
fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

fn comm_thread(rank: usize, world: &World, jobs: &mpsc::Receiver<Job>) {
    // Collectives of one rank use its link one after another, like kernels on one CUDA stream.
    let mut link_free = Instant::now();
    for job in jobs {
        let started = Instant::now();
        let tag = job.call.tag.clone();
        let result = world.execute(
            rank,
            job.seq,
            job.call,
            job.payload,
            (job.posted, started, link_free),
        );
        // The comm span is the modelled transfer: from the moment every rank has issued the collective
        // until the data arrives. Time spent waiting for a late peer is skew, not link time; it shows as
        // idle time in the timeline, and the span keeps this rank's issue time to measure it.
        let arrive = match result {
            Ok((out, all_issued, start, arrive)) => {
                if world.trace.is_enabled() {
                    world.trace.record(Span {
                        rank,
                        stream: Stream::Comm,
                        layer: tag.layer,
                        op: tag.name,
                        phase: tag.phase,
                        start: world.trace.offset_of(start),
                        end: world.trace.offset_of(arrive),
                        issued: Some(world.trace.offset_of(job.posted)),
                        all_issued: Some(world.trace.offset_of(all_issued)),
                    });
                }
                // The caller may have dropped its Pending; the collective still had to run for peers.
                let _ = job.reply.send(Ok((out, arrive)));
                arrive
            }
            Err(e) => {
                let _ = job.reply.send(Err(e));
                Instant::now()
            }
        };
        // The next collective's transfer starts after this one's.
        sleep_until(arrive);
        link_free = arrive;
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.jobs = None;
        let issued = queue.next_seq;
        drop(queue);
        if thread::panicking() {
            self.world
                .mark_failed(self.rank, "panicked (communicator dropped)".to_owned());
        } else {
            self.world.mark_departed(self.rank, issued);
        }
    }
}

impl std::fmt::Debug for LocalComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalComm")
            .field("rank", &self.rank)
            .field("world_size", &self.world.size)
            .finish_non_exhaustive()
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world.size
    }

    fn all_reduce(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        self.flat(CollectiveKind::AllReduce, tag, data)
    }

    fn all_to_all_v(&self, tag: CollectiveTag, send: Rows) -> Pending<Rows> {
        let call = semantics::prepare_rows(tag, &send, self.world.size);
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
        let call = semantics::prepare_broadcast(tag, root, data.len(), self.world.size);
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

/// The cores each of `size` ranks of `threads` threads is pinned to by [`LocalWorld::run_with`]: with `pin`,
/// consecutive cores of this process, `threads` per rank, when every rank's threads get cores of their own;
/// otherwise none (the operating system places the threads).
pub(crate) fn rank_cores(size: usize, threads: usize, pin: bool) -> Vec<Vec<usize>> {
    match allowed_cores().filter(|c| pin && c.len() >= size * threads) {
        Some(cores) => cores
            .chunks(threads.max(1))
            .take(size)
            .map(<[usize]>::to_vec)
            .collect(),
        None => Vec::new(),
    }
}

/// The cores this process may run on (Linux), in order; `None` where unknown.
#[cfg(target_os = "linux")]
pub(crate) fn allowed_cores() -> Option<Vec<usize>> {
    // SAFETY: `set` is a plain bit set the call fills; the size passed is its own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        Some(
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect(),
        )
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn allowed_cores() -> Option<Vec<usize>> {
    None
}

/// Pins the calling thread to `core` (Linux; best effort: a failure leaves it where it was).
#[cfg(target_os = "linux")]
pub(crate) fn pin_current_thread(core: usize) {
    // SAFETY: `set` is a plain bit set built here; `0` is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::debug!(core, "could not pin a rank thread");
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn pin_current_thread(_core: usize) {}
