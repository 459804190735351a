//! Where the ranks of an experiment live ([`Backend`]): threads of this process (`LocalWorld`), or
//! one process per rank under `mpirun` (feature `mpi`). Under MPI every process runs the whole
//! experiment as its own rank; what a report needs from the other ranks (their logits, wall times,
//! trace spans, gradients) is gathered on a separate communicator after the timed part, so the
//! report is the same on every process.

#[cfg(feature = "mpi")]
pub use mpi_ranks::MpiBackend;

/// Where the ranks of an experiment run.
#[derive(Debug, Default)]
pub enum Backend {
    /// Ranks as threads of this process, on a `LocalWorld`.
    #[default]
    Local,
    /// This process is one rank of an MPI job; the experiment's world is the job's.
    #[cfg(feature = "mpi")]
    Mpi(Box<MpiBackend>),
}

impl Backend {
    /// `"local"` or `"mpi"`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Local => "local",
            #[cfg(feature = "mpi")]
            Self::Mpi(_) => "mpi",
        }
    }

    /// Whether this process reports (prints) the results: always for `Local`, rank 0 under MPI.
    pub fn is_reporting_rank(&self) -> bool {
        match self {
            Self::Local => true,
            #[cfg(feature = "mpi")]
            Self::Mpi(m) => m.world.rank() == 0,
        }
    }

    /// The number of ranks this backend imposes (`None`: any, chosen by the caller).
    pub fn fixed_world(&self) -> Option<usize> {
        match self {
            Self::Local => None,
            #[cfg(feature = "mpi")]
            Self::Mpi(m) => Some(m.world.size()),
        }
    }
}

/// Per-rank values of one number, gathered in rank order (a helper for reports built from
/// per-rank measurements).
#[cfg(feature = "mpi")]
pub(crate) fn gather_f64(
    comm: &dyn crate::comm::Communicator,
    name: &'static str,
    value: f64,
) -> Result<Vec<f64>, crate::comm::CommError> {
    // Two f32 halves keep the f64 exact (hi + lo).
    let hi = value as f32;
    let lo = (value - f64::from(hi)) as f32;
    let all = comm
        .all_gather(crate::comm::CollectiveTag::new(name), vec![hi, lo])
        .wait()?;
    Ok(all
        .chunks_exact(2)
        .map(|c| f64::from(c[0]) + f64::from(c[1]))
        .collect())
}

#[cfg(feature = "mpi")]
pub(crate) mod mpi_ranks {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use crate::comm::{
        CollectiveTag, CommError, Communicator, MpiComm, MpiConfig, MpiInitError, MpiWorld,
    };
    use crate::trace::{Phase, Span, Stream, Trace};

    /// The MPI side of [`super::Backend::Mpi`]: the job and three communicators — the ranks'
    /// collectives, a second group for replicated gradients (training), and an untraced one for
    /// gathering results after the timed part.
    #[derive(Debug)]
    pub struct MpiBackend {
        // Fields drop in this order: the communicators before the world that finalises MPI.
        pub(crate) data: MpiComm,
        pub(crate) grads: MpiComm,
        pub(crate) plain: MpiComm,
        pub(crate) world: Arc<MpiWorld>,
    }

    impl MpiBackend {
        /// Initialises MPI (see [`MpiWorld::init`]) and its communicators, each with `timeout`.
        /// Each process's rayon pool gets its share of this host's cores (the cores over the
        /// ranks on this host), as `LocalWorld` gives each rank thread.
        pub fn init(timeout: Duration) -> Result<Self, MpiInitError> {
            let world = Arc::new(MpiWorld::init()?);
            let local = std::env::var("OMPI_COMM_WORLD_LOCAL_SIZE")
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(world.size())
                .max(1);
            let cores = std::thread::available_parallelism().map_or(1, usize::from);
            // Fails only when the pool was built already, which keeps that pool.
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads((cores / local).max(1))
                .build_global();
            let config = MpiConfig::default().with_timeout(timeout);
            Ok(Self {
                data: world.communicator(config.clone())?,
                grads: world.communicator(config.clone())?,
                plain: world.communicator(config)?,
                world,
            })
        }

        /// The MPI job.
        pub fn world(&self) -> &MpiWorld {
            &self.world
        }

        /// The MPI job, shared (for code that creates its own communicators, e.g. expert-parallel training).
        pub fn job(&self) -> &Arc<MpiWorld> {
            &self.world
        }

        /// This process's rank.
        pub fn rank(&self) -> usize {
            self.world.rank()
        }
    }

    /// Nanoseconds since the Unix epoch as four exact f32 (16 bits each).
    fn push_u64(out: &mut Vec<f32>, v: u64) {
        for k in 0..4 {
            out.push(((v >> (16 * k)) & 0xFFFF) as f32);
        }
    }

    fn read_u64(w: &[f32]) -> u64 {
        w.iter()
            .take(4)
            .enumerate()
            .fold(0, |acc, (k, x)| acc | ((*x as u64) << (16 * k)))
    }

    const NAME: usize = 32;
    const SPAN_WORDS: usize = 4 + 4 * 4 + NAME;

    /// Replaces `trace`'s spans by every rank's (each process recorded only its own), with times
    /// moved onto this process's epoch through the system clock.
    pub(crate) fn gather_trace(comm: &MpiComm, trace: &Trace) -> Result<(), CommError> {
        if !trace.is_enabled() {
            return Ok(());
        }
        let now_sys = SystemTime::now();
        let epoch = now_sys
            .checked_sub(trace.now())
            .unwrap_or(UNIX_EPOCH)
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let abs = |d: Duration| u64::try_from((epoch + d).as_nanos()).unwrap_or(u64::MAX);
        let spans = trace.spans();
        let mut mine = Vec::with_capacity(spans.len() * SPAN_WORDS);
        for s in &spans {
            mine.push(s.rank as f32);
            mine.push(match s.stream {
                Stream::Compute => 0.0,
                Stream::Comm => 1.0,
            });
            mine.push(s.layer.map_or(0.0, |l| l as f32 + 1.0));
            mine.push(match s.phase {
                Phase::Forward => 0.0,
                Phase::Backward => 1.0,
            });
            push_u64(&mut mine, abs(s.start));
            push_u64(&mut mine, abs(s.end));
            push_u64(&mut mine, s.issued.map_or(0, abs));
            push_u64(&mut mine, s.all_issued.map_or(0, abs));
            let bytes = s.op.as_bytes();
            for k in 0..NAME {
                mine.push(bytes.get(k).map_or(0.0, |b| f32::from(*b)));
            }
        }
        let counts = comm
            .all_gather(CollectiveTag::new("trace_len"), vec![spans.len() as f32])
            .wait()?;
        let most = counts.iter().map(|c| *c as usize).max().unwrap_or(0);
        mine.resize(most * SPAN_WORDS, 0.0);
        let all = comm
            .all_gather(CollectiveTag::new("trace_spans"), mine)
            .wait()?;
        let rel = |w: &[f32]| -> Option<Duration> {
            let v = read_u64(w);
            (v != 0).then(|| Duration::from_nanos(v).saturating_sub(epoch))
        };
        trace.clear();
        for (r, block) in all.chunks(most * SPAN_WORDS.max(1)).enumerate() {
            let n = counts.get(r).map_or(0, |c| *c as usize);
            for w in block.chunks_exact(SPAN_WORDS).take(n) {
                let name: Vec<u8> = w[20..]
                    .iter()
                    .map(|x| *x as u8)
                    .take_while(|b| *b != 0)
                    .collect();
                trace.record(Span {
                    rank: w[0] as usize,
                    stream: if w[1] == 0.0 {
                        Stream::Compute
                    } else {
                        Stream::Comm
                    },
                    layer: (w[2] > 0.0).then(|| w[2] as usize - 1),
                    op: String::from_utf8_lossy(&name).into_owned().into(),
                    phase: if w[3] == 0.0 {
                        Phase::Forward
                    } else {
                        Phase::Backward
                    },
                    start: rel(&w[4..8]).unwrap_or_default(),
                    end: rel(&w[8..12]).unwrap_or_default(),
                    issued: rel(&w[12..16]),
                    all_issued: rel(&w[16..20]),
                });
            }
        }
        Ok(())
    }

    /// The rank's f32 values of every rank, in rank order (all ranks pass the same length).
    pub(crate) fn gather_equal(
        comm: &MpiComm,
        name: &'static str,
        mine: Vec<f32>,
    ) -> Result<Vec<f32>, CommError> {
        comm.all_gather(CollectiveTag::new(name), mine).wait()
    }
}
