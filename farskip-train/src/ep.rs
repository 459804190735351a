//! Expert-parallel recovery training on a [`LocalWorld`]: the learner's steps run on `world` rank threads, each
//! holding the replicated (non-expert) weights and a contiguous block of every MoE layer's experts, with the
//! overlapped forward/backward schedule of [`farskip_dist::training`].
//!
//! [`EpTrainer`] keeps its ranks alive between steps: a background thread runs [`LocalWorld::run_with`], whose
//! rank closures loop on a command channel (step, gather, stop). Each rank owns its AdamW state, so an optimizer
//! step never moves weights between threads. The result equals single-rank training up to float rounding:
//!
//! - the global batch's rows are split evenly over the ranks and every loss is a mean over all ranks' tokens;
//! - replicated gradients are all-reduced inside the step, expert gradients stay with their owner;
//! - gradient clipping is burn's per-parameter `GradientClipping::Norm`: replicated tensors are clipped as they
//!   are (their gradients are identical on every rank), and each expert bank by the norm of the *whole* unsharded
//!   tensor, `sqrt(all_reduce(Σ local slice²))`;
//! - the teacher (frozen, without autodiff) runs on each rank's own rows.
//!
//! [`crate::train`] uses it when [`crate::TrainConfig::world`] is above 1; evaluation gathers the ranks' expert
//! blocks back into one [`Model`] ([`EpTrainer::gather`]).

use std::collections::HashSet;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;

use burn::grad_clipping::GradientClipping;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use farskip_dist::comm::{CollectiveTag, CommError, Communicator, LocalComm, LocalWorld};
use farskip_dist::comm::{LinkModel, LocalWorldConfig, RankError};
use farskip_dist::schedule::ScheduleError;
use farskip_dist::trace::Trace;
use farskip_dist::training::{EpTrainRank, Objective, merge_rank_models};
use farskip_model::Model;
use farskip_model::model::Ffn;

use crate::data::inputs_targets;
use crate::learner::{Method, TrainConfig, TrainError};

/// What the driver asks of a rank.
#[allow(
    clippy::large_enum_variant,
    reason = "a handful of commands per step; boxing the tensor handle buys nothing"
)]
enum Command {
    /// One optimizer step on this rank's rows `[rows, seq + 1]` at learning rate `lr`.
    Step { windows: Tensor<2, Int>, lr: f64 },
    /// Send back this rank's model (without autodiff).
    Gather,
}

/// What a rank answers.
enum Reply {
    /// The rank is built and waits for commands.
    Ready,
    /// The global mean loss of the step (identical on every rank).
    Loss(f64),
    /// This rank's model.
    Model(Box<Model>),
    /// The rank failed; its error.
    Failed(String),
}

type WorldResult = Result<Vec<Result<(), RankError<ScheduleError>>>, CommError>;

/// Expert-parallel training on `world` in-process ranks whose threads live as long as the trainer (see the
/// module docs). Dropping it stops the ranks.
///
/// ```
/// use burn::prelude::*;
/// use farskip_model::{Connectivity, Model, ModelConfig};
/// use farskip_train::ep::EpTrainer;
/// use farskip_train::{Method, TrainConfig};
///
/// let device = Device::flex();
/// let teacher = Model::new(&ModelConfig::small_moe(256, 32, 2, 2, 1, 16, 4, 2, 32, None), &device)?;
/// let student = teacher.clone().with_connectivity(Connectivity::farskip())?;
/// let mut cfg = TrainConfig::new("fcsd", Method::Fcsd { temperature: 1.0 }, 2, 1e-3);
/// cfg.world = 2;
/// let mut trainer = EpTrainer::new(&student, Some(&teacher), &cfg)?;
/// let windows = Tensor::<2, Int>::from_ints([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], &device);
/// let loss = trainer.step(windows, 1e-3)?; // one row per rank: the global mean KL, before the step
/// assert!(loss.is_finite());
/// let model = trainer.gather()?; // every expert back in one model
/// assert_eq!(model.num_params(), student.num_params());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct EpTrainer {
    label: String,
    world: usize,
    /// The ranks this process runs (all of them, or its own under MPI); `commands[i]` reaches `ranks[i]`.
    ranks: Vec<usize>,
    /// MPI: the communicator that gathers the other processes' experts.
    #[cfg(feature = "mpi")]
    gather_comm: Option<farskip_dist::MpiComm>,
    commands: Vec<Sender<Command>>,
    replies: Receiver<(usize, Reply)>,
    thread: Option<JoinHandle<WorldResult>>,
}

impl EpTrainer {
    /// Starts `cfg.world` ranks training `student` (a plain-device model) with `cfg.method`, AdamW with
    /// `cfg.weight_decay` and per-parameter clipping at `cfg.grad_clip` (the settings of the single-process
    /// [`crate::train`]). The teacher is needed by the distilling methods. Errors name the setting at fault: a
    /// model that is not MoE in every layer, a connectivity other than standard or all-layer FarSkip, more ranks
    /// than experts.
    pub fn new(
        student: &Model,
        teacher: Option<&Model>,
        cfg: &TrainConfig,
    ) -> Result<Self, TrainError> {
        let world = cfg.world;
        let invalid = |message: String| TrainError::InvalidConfig {
            key: "world",
            message,
        };
        if world == 0 {
            return Err(invalid("must be >= 1".into()));
        }
        if cfg.method.needs_teacher() && teacher.is_none() {
            return Err(TrainError::MissingTeacher(cfg.method.name()));
        }
        let experts = student.config().moe.as_ref().map_or(0, |m| m.num_experts);
        if experts > 0 && world > experts {
            return Err(invalid(format!(
                "{world} ranks but the model has only {experts} experts per layer to shard"
            )));
        }
        #[cfg(feature = "mpi")]
        let mpi = mpi_run(&cfg.label);
        #[cfg(feature = "mpi")]
        if let Some((size, _, _)) = &mpi
            && *size != world
        {
            return Err(invalid(format!(
                "{world} ranks but the MPI job has {size} processes (one rank per process)"
            )));
        }
        #[cfg(feature = "mpi")]
        let ranks: Vec<usize> = match &mpi {
            Some((_, rank, _)) => vec![*rank],
            None => (0..world).collect(),
        };
        #[cfg(not(feature = "mpi"))]
        let ranks: Vec<usize> = (0..world).collect();
        let (reply_tx, replies) = mpsc::channel::<(usize, Reply)>();
        let mut commands = Vec::with_capacity(world);
        let mut inboxes = Vec::with_capacity(world);
        for _ in &ranks {
            let (tx, rx) = mpsc::channel::<Command>();
            commands.push(tx);
            inboxes.push(Mutex::new(Some(rx)));
        }
        let rank = RankSetup {
            student: student.valid(),
            teacher: teacher.map(Module::valid),
            method: cfg.method.clone(),
            cfg: cfg.clone(),
        };
        #[cfg(feature = "mpi")]
        let (thread, gather_comm) = match mpi {
            Some((_, r, comms)) => {
                let (comm, gather) = comms.ok_or_else(|| TrainError::Distributed {
                    label: cfg.label.clone(),
                    world,
                    message: format!(
                        "no MPI communicator was prepared for run {:?} (farskip_train::ep::use_mpi)",
                        cfg.label
                    ),
                })?;
                let thread = std::thread::Builder::new()
                    .name(format!("farskip-ep-{}", cfg.label))
                    .spawn(move || {
                        let reply = |m: Reply| {
                            let _ = reply_tx.send((r, m));
                        };
                        let inbox = inboxes[0]
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .take();
                        let result = match inbox {
                            Some(inbox) => rank.run(&comm, &inbox, &reply),
                            None => Ok(()),
                        };
                        if let Err(e) = &result {
                            reply(Reply::Failed(e.to_string()));
                        }
                        Ok(vec![result.map_err(RankError::Failed)])
                    });
                (thread, Some(gather))
            }
            None => (Self::spawn_local(world, cfg, rank, inboxes, reply_tx), None),
        };
        #[cfg(not(feature = "mpi"))]
        let thread = Self::spawn_local(world, cfg, rank, inboxes, reply_tx);
        let thread = thread.map_err(|e| TrainError::Distributed {
            label: cfg.label.clone(),
            world,
            message: format!("spawning the world thread: {e}"),
        })?;
        let mut trainer = Self {
            label: cfg.label.clone(),
            world,
            ranks,
            #[cfg(feature = "mpi")]
            gather_comm,
            commands,
            replies,
            thread: Some(thread),
        };
        trainer.collect(|r| match r {
            Reply::Ready => Some(()),
            _ => None,
        })?;
        Ok(trainer)
    }

    /// The world thread of in-process ranks: a LocalWorld whose rank closures loop on their command channels.
    fn spawn_local(
        world: usize,
        cfg: &TrainConfig,
        rank: RankSetup,
        inboxes: Vec<Mutex<Option<Receiver<Command>>>>,
        reply_tx: Sender<(usize, Reply)>,
    ) -> std::io::Result<JoinHandle<WorldResult>> {
        std::thread::Builder::new()
            .name(format!("farskip-ep-{}", cfg.label))
            .spawn(move || {
                // Ranks wait on their command channel between steps, never inside a collective, so the
                // collectives' default timeout only bounds one step.
                let config = LocalWorldConfig::new(LinkModel::instant());
                LocalWorld::run_with(world, config, |comm: &LocalComm| {
                    let r = comm.rank();
                    let inbox = inboxes[r]
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .take();
                    let reply = |m: Reply| {
                        // The driver may be gone (dropped mid-run); nothing to tell it then.
                        let _ = reply_tx.send((r, m));
                    };
                    let result = match inbox {
                        Some(inbox) => rank.run(comm, &inbox, &reply),
                        None => Err(ScheduleError::Model(
                            farskip_model::ModelError::InvalidInput(format!(
                                "rank {r} started twice"
                            )),
                        )),
                    };
                    if let Err(e) = &result {
                        reply(Reply::Failed(e.to_string()));
                    }
                    result
                })
            })
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// One optimizer step on the global batch `windows` (`[batch, seq + 1]`, `batch` divisible by the world: rank
    /// `r` takes rows `r·batch/world ..`) at learning rate `lr`. Returns the global mean loss before the step.
    pub fn step(&mut self, windows: Tensor<2, Int>, lr: f64) -> Result<f64, TrainError> {
        let [batch, _] = windows.dims();
        if batch == 0 || !batch.is_multiple_of(self.world) {
            return Err(TrainError::InvalidConfig {
                key: "world",
                message: format!(
                    "expert parallelism splits the batch's rows over the ranks: a batch of {batch} sequences does \
                     not divide evenly over {} ranks",
                    self.world
                ),
            });
        }
        let rows = batch / self.world;
        for (i, r) in self.ranks.clone().into_iter().enumerate() {
            let part = windows.clone().narrow(0, r * rows, rows);
            self.send(i, Command::Step { windows: part, lr })?;
        }
        let losses = self.collect(|r| match r {
            Reply::Loss(l) => Some(l),
            _ => None,
        })?;
        Ok(losses[0])
    }

    /// The whole model as it stands: rank 0's replicated weights and every rank's experts, concatenated in rank
    /// order, on the plain device.
    pub fn gather(&mut self) -> Result<Model, TrainError> {
        for i in 0..self.ranks.len() {
            self.send(i, Command::Gather)?;
        }
        let models: Vec<Model> = self
            .collect(|r| match r {
                Reply::Model(m) => Some(*m),
                _ => None,
            })?
            .into_iter()
            .collect();
        #[cfg(feature = "mpi")]
        if let Some(comm) = &self.gather_comm {
            let own = models.into_iter().next();
            let merged = own
                .ok_or_else(|| "no rank in this process".to_owned())
                .and_then(|m| gather_experts(comm, m));
            return merged.map_err(|e| self.error(format!("gathering the experts over MPI: {e}")));
        }
        merge_rank_models(&models).map_err(|e| self.error(format!("merging the ranks: {e}")))
    }

    fn error(&self, message: String) -> TrainError {
        TrainError::Distributed {
            label: self.label.clone(),
            world: self.world,
            message,
        }
    }

    /// Sends `command` to the `i`-th rank of this process.
    fn send(&mut self, i: usize, command: Command) -> Result<(), TrainError> {
        let rank = self.ranks.get(i).copied().unwrap_or(i);
        let sent = match self.commands.get(i) {
            Some(tx) => tx.send(command).is_ok(),
            None => false,
        };
        if !sent {
            return Err(self.fail(Some(rank), "has stopped".into()));
        }
        Ok(())
    }

    /// One reply per rank, in rank order; the first failure (or a rank that vanished) stops the world and
    /// returns every rank's error.
    fn collect<T>(
        &mut self,
        mut want: impl FnMut(Reply) -> Option<T>,
    ) -> Result<Vec<T>, TrainError> {
        let mut got: Vec<Option<T>> = self.ranks.iter().map(|_| None).collect();
        for _ in 0..self.ranks.len() {
            match self.replies.recv() {
                Ok((r, Reply::Failed(message))) => return Err(self.fail(Some(r), message)),
                Ok((r, reply)) => match (want(reply), self.ranks.iter().position(|x| *x == r)) {
                    (Some(v), Some(i)) if got[i].is_none() => got[i] = Some(v),
                    _ => return Err(self.fail(Some(r), "answered out of turn".into())),
                },
                Err(_) => {
                    return Err(self.fail(None, "the ranks stopped without answering".into()));
                }
            }
        }
        Ok(got.into_iter().flatten().collect())
    }

    /// Stops the world and describes every rank's failure, once per distinct message
    /// (`rank 0, rank 1: …`), `first` first.
    fn fail(&mut self, rank: Option<usize>, first: String) -> TrainError {
        let mut failures = vec![(rank, first)];
        let outcomes = self.shutdown();
        // Every rank that returned an error also sent it; a panic or a failed start only shows in the outcome.
        while let Ok((r, reply)) = self.replies.try_recv() {
            if let Reply::Failed(m) = reply {
                failures.push((Some(r), m));
            }
        }
        for (r, outcome) in outcomes.into_iter().enumerate() {
            match outcome {
                Ok(()) | Err(WorldFailure::Rank(RankError::Failed(_))) => {}
                Err(WorldFailure::Rank(e)) => failures.push((Some(r), e.to_string())),
                Err(WorldFailure::World(m)) => failures.push((None, m)),
            }
        }
        let mut grouped: Vec<(Vec<usize>, String)> = Vec::new();
        for (r, m) in failures {
            let at = match grouped.iter().position(|(_, g)| *g == m) {
                Some(at) => at,
                None => {
                    grouped.push((Vec::new(), m));
                    grouped.len() - 1
                }
            };
            if let Some(r) = r
                && !grouped[at].0.contains(&r)
            {
                grouped[at].0.push(r);
            }
        }
        let message = grouped
            .into_iter()
            .map(|(ranks, m)| {
                if ranks.is_empty() {
                    m
                } else {
                    let ranks: Vec<String> = ranks.iter().map(|r| format!("rank {r}")).collect();
                    format!("{}: {m}", ranks.join(", "))
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        self.error(message)
    }

    /// Closes the command channels (each rank's loop ends) and joins the world thread: each rank's outcome.
    fn shutdown(&mut self) -> Vec<Result<(), WorldFailure>> {
        self.commands.clear();
        let Some(thread) = self.thread.take() else {
            return Vec::new();
        };
        match thread.join() {
            Ok(Ok(ranks)) => ranks
                .into_iter()
                .map(|r| r.map_err(WorldFailure::Rank))
                .collect(),
            Ok(Err(e)) => vec![Err(WorldFailure::World(format!(
                "the world did not start: {e}"
            )))],
            Err(_) => vec![Err(WorldFailure::World("the world thread panicked".into()))],
        }
    }
}

/// Why a rank (or the whole world) ended badly.
enum WorldFailure {
    Rank(RankError<ScheduleError>),
    World(String),
}

impl Drop for EpTrainer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Everything a rank needs, shared read-only by the rank closures.
struct RankSetup {
    student: Model,
    teacher: Option<Model>,
    method: Method,
    /// The run's settings (optimizer and clipping).
    cfg: TrainConfig,
}

impl RankSetup {
    /// The rank's command loop; returns when the driver closes the channel.
    fn run<C: Communicator + ?Sized>(
        &self,
        comm: &C,
        inbox: &Receiver<Command>,
        reply: &impl Fn(Reply),
    ) -> Result<(), ScheduleError> {
        let world = comm.world_size();
        let mut rank = EpTrainRank::new(&self.student, comm.rank(), world)?;
        // Clipping is done here (expert banks need the norm over all ranks), not by the optimizer.
        let mut optim = self.cfg.unclipped_optimizer();
        let experts = expert_params(rank.model());
        let trace = Trace::disabled();
        reply(Reply::Ready);
        while let Ok(command) = inbox.recv() {
            match command {
                Command::Step { windows, lr } => {
                    let objective = self.objective(&windows);
                    let step = rank.step_with(comm, &trace, windows, &objective)?;
                    let loss = comm
                        .all_reduce(CollectiveTag::new("ep_train_loss"), vec![step.loss as f32])
                        .wait()?;
                    let grads = clip_gradients(
                        comm,
                        rank.model(),
                        step.grads,
                        &experts,
                        self.cfg.grad_clip,
                    )?;
                    rank = rank.map_model(|m| optim.step(lr, m, grads));
                    reply(Reply::Loss(f64::from(loss[0])));
                }
                Command::Gather => reply(Reply::Model(Box::new(rank.model().valid()))),
            }
        }
        Ok(())
    }

    /// The method's loss on this rank's windows, with the teacher's outputs on the same rows.
    fn objective(&self, windows: &Tensor<2, Int>) -> Objective {
        let teacher = || {
            self.teacher
                .as_ref()
                .expect("checked in EpTrainer::new: distilling methods have a teacher")
        };
        let inputs = || inputs_targets(windows.clone()).0;
        match &self.method {
            Method::Pretrain | Method::Sft => Objective::CrossEntropy,
            Method::Fcsd { temperature } => Objective::Distill {
                teacher_logits: teacher().forward_unchecked(inputs(), None),
                temperature: *temperature,
            },
            Method::KlL2 {
                temperature,
                l2_weight,
            } => {
                let (teacher_logits, teacher_hidden) = teacher().forward_with_hidden(inputs());
                Objective::DistillHidden {
                    teacher_logits,
                    teacher_hidden,
                    temperature: *temperature,
                    l2_weight: *l2_weight,
                }
            }
        }
    }
}

/// `(id, dims)` of every expert-bank parameter of a model, layer by layer (the same order on every rank).
fn expert_params(model: &Model) -> Vec<(ParamId, Vec<usize>)> {
    #[derive(Default)]
    struct List(Vec<(ParamId, Vec<usize>)>);
    impl ModuleVisitor for List {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push((param.id, param.dims().to_vec()));
        }
    }
    let mut list = List::default();
    for layer in &model.layers {
        if let Ffn::Moe(moe) = &layer.ffn {
            moe.experts.visit(&mut list);
        }
    }
    list.0
}

/// Per-parameter gradient-norm clipping over the whole world, equal to burn's `GradientClipping::Norm(max_norm)`
/// on the unsharded model; also gives an expert block that saw no token a zero gradient when some rank's block of
/// the same bank has one (as the single unsharded tensor would have).
fn clip_gradients<C: Communicator + ?Sized>(
    comm: &C,
    model: &Model,
    mut grads: GradientsParams,
    experts: &[(ParamId, Vec<usize>)],
    max_norm: Option<f64>,
) -> Result<GradientsParams, ScheduleError> {
    // Expert banks: [Σ local², …, has a gradient, …] summed over ranks.
    let mut local = Vec::with_capacity(2 * experts.len());
    let mut present = Vec::with_capacity(experts.len());
    for (id, dims) in experts {
        let (sq, has) = match dims.len() {
            3 => match grads.get::<3>(*id) {
                Some(g) => (g.square().sum().into_scalar::<f32>(), 1.0),
                None => (0.0, 0.0),
            },
            _ => (0.0, 0.0),
        };
        local.push(sq);
        present.push(has);
    }
    local.extend(present);
    let global = comm
        .all_reduce(CollectiveTag::new("ep_train_clip"), local)
        .wait()?;
    let n = experts.len();
    for (k, (id, dims)) in experts.iter().enumerate() {
        if dims.len() != 3 || global[n + k] == 0.0 {
            continue;
        }
        let grad = match grads.remove::<3>(*id) {
            Some(g) => g,
            None => {
                let shape: [usize; 3] = [dims[0], dims[1], dims[2]];
                Tensor::zeros(shape, &model.device().inner())
            }
        };
        let grad = match max_norm {
            Some(c) => {
                // burn's clip_by_norm: coef = c / (‖g‖ + min_positive), at most 1.
                let norm = global[k].sqrt();
                let coef = (c as f32 / (norm + f32::MIN_POSITIVE)).min(1.0);
                grad.mul_scalar(coef)
            }
            None => grad,
        };
        grads.register::<3>(*id, grad);
    }
    // Replicated parameters: their gradients are already the global ones, identical on every rank.
    if let Some(c) = max_norm {
        struct Clip<'a> {
            grads: &'a mut GradientsParams,
            skip: HashSet<ParamId>,
            clipping: GradientClipping,
        }
        impl ModuleVisitor for Clip<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if self.skip.contains(&param.id) {
                    return;
                }
                if let Some(g) = self.grads.remove::<D>(param.id) {
                    self.grads
                        .register::<D>(param.id, self.clipping.clip_gradient(g));
                }
            }
        }
        model.visit(&mut Clip {
            grads: &mut grads,
            skip: experts.iter().map(|(id, _)| *id).collect(),
            clipping: GradientClipping::Norm(c as f32),
        });
    }
    Ok(grads)
}

/// The MPI job whose processes run the ranks of [`EpTrainer`]s, and the communicators prepared for each run
/// (by label), when [`use_mpi`] set them.
#[cfg(feature = "mpi")]
struct MpiRuns {
    job: std::sync::Weak<farskip_dist::MpiWorld>,
    /// Per run label: the training communicator and the one that gathers experts.
    comms: std::collections::HashMap<String, (farskip_dist::MpiComm, farskip_dist::MpiComm)>,
}

#[cfg(feature = "mpi")]
static MPI_RUNS: Mutex<Option<MpiRuns>> = Mutex::new(None);

/// Makes the [`EpTrainer`]s of the runs labelled `labels` run one rank per process of `job` (whose size must be
/// `TrainConfig::world`): each process runs the same driver (the same data and seeds), steps its own rank and
/// gathers the other processes' experts for evaluation.
///
/// The communicators are created here, in the order of `labels` (creating one is collective over the job, and
/// runs that start on several threads would create theirs in a different order on each process). Call it with
/// the same labels on every process; a run whose label was not prepared fails with an error naming it.
/// [`stop_mpi`] drops what is left; keep `job` alive until then.
#[cfg(feature = "mpi")]
pub fn use_mpi(
    job: &std::sync::Arc<farskip_dist::MpiWorld>,
    labels: &[&str],
) -> Result<(), farskip_dist::MpiInitError> {
    let mut comms = std::collections::HashMap::new();
    for label in labels {
        let config = farskip_dist::MpiConfig::default;
        let pair = (job.communicator(config())?, job.communicator(config())?);
        comms.insert((*label).to_owned(), pair);
    }
    *MPI_RUNS.lock().unwrap_or_else(PoisonError::into_inner) = Some(MpiRuns {
        job: std::sync::Arc::downgrade(job),
        comms,
    });
    Ok(())
}

/// Returns to in-process ranks and drops the communicators no run took.
#[cfg(feature = "mpi")]
pub fn stop_mpi() {
    MPI_RUNS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
}

/// The MPI job, when [`use_mpi`] set one: its size and rank, and the communicators prepared for `label`
/// (`None` inside when that label was not prepared).
#[cfg(feature = "mpi")]
#[allow(clippy::type_complexity, reason = "a private helper's one-off tuple")]
fn mpi_run(
    label: &str,
) -> Option<(
    usize,
    usize,
    Option<(farskip_dist::MpiComm, farskip_dist::MpiComm)>,
)> {
    let mut runs = MPI_RUNS.lock().unwrap_or_else(PoisonError::into_inner);
    let runs = runs.as_mut()?;
    let job = runs.job.upgrade()?;
    Some((job.size(), job.rank(), runs.comms.remove(label)))
}

/// This process's rank model with every MoE layer's expert banks all-gathered over `comm` (rank order, as
/// [`merge_rank_models`] concatenates them).
#[cfg(feature = "mpi")]
fn gather_experts(comm: &farskip_dist::MpiComm, mut model: Model) -> Result<Model, String> {
    let world = comm.world_size();
    let gather = |t: Tensor<3>, name: &'static str| -> Result<Tensor<3>, String> {
        let [e, a, b] = t.dims();
        let device = t.device();
        let mine = t
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| format!("{name}: {e:?}"))?;
        let all = comm
            .all_gather(CollectiveTag::new(name), mine)
            .wait()
            .map_err(|e| e.to_string())?;
        Ok(Tensor::from_data(
            TensorData::new(all, [e * world, a, b]),
            &device,
        ))
    };
    for layer in &mut model.layers {
        if let Ffn::Moe(moe) = &mut layer.ffn {
            let (gate_up_id, down_id) = (moe.experts.gate_up.id, moe.experts.down.id);
            let gate_up = gather(moe.experts.gate_up.val(), "gather_gate_up")?;
            let down = gather(moe.experts.down.val(), "gather_down")?;
            moe.experts.gate_up = Param::initialized(gate_up_id, gate_up);
            moe.experts.down = Param::initialized(down_id, down);
        }
    }
    Ok(model)
}
