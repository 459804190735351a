//! The planner: what FarSkip buys on a given model and cluster, predicted by simulating the schedules.
//!
//! A schedule description ([`desc`]: the op order of one rank, the collectives it issues and where it waits)
//! is walked by an event simulator ([`sim`]) with a cost model ([`cost`]: a roofline per op from the parsed
//! [`ModelConfig`] and an α–β model per collective on a [`Cluster`], or [`calibrate`]: op costs measured on
//! this machine and the overlap experiments' calibrated link). Three schedules are simulated on the same
//! costs — blocking (standard connectivity), FarSkip at the connectivity's depth, and two-micro-batch overlap
//! (TBO) of the standard model — for inference (prefill, decode) and EP training (forward and backward).
//!
//! The executors in [`crate::schedule`] and [`crate::training`] do not walk these descriptions: the builders
//! follow their op order, and a test compares the op sequence a LocalWorld trace records with the
//! description's — EP and TP inference at depths 1 and 2 and with a layer range, EP training at depths 1 and 2 —
//! so a change in one shows up as a failure.
//!
//! ```
//! use farskip_dist::plan::{Cluster, Layout, Mode, Workload, predict_roofline};
//! use farskip_model::{Connectivity, hf::parse_config};
//!
//! let json = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"),
//!     "/../examples/data/configs/qwen3_30b_a3b.json"))?;
//! let config = parse_config(&serde_json::from_str(&json)?)?;
//! let cluster = Cluster::h100();
//! let layout = Layout::new(8, 1, 1, &cluster)?;
//! let work = Workload::new(Mode::Prefill, 4096, 4096);
//! let plan = predict_roofline(&config, &Connectivity::farskip(), &cluster, layout, &work)?;
//! assert!(plan.prediction.speedup >= 1.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use farskip_model::{Connectivity, ModelConfig, ModelError};
use serde::Serialize;

use crate::trace::Phase;

pub mod calibrate;
pub mod cluster;
pub mod cost;
pub mod desc;
mod lockstep;
pub mod sim;
pub mod sweep;

pub use cluster::Cluster;
pub use cost::{CostModel, Roofline};
pub use desc::{OpKey, Schedule, ScheduleKind, Split, Step};
pub use sim::{Interval, Lane, Metrics, SimError, Timeline};

/// Errors of the planner.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A cluster description is invalid.
    #[error("cluster: {0}")]
    Cluster(String),
    /// The parallel layout does not fit the cluster or the model.
    #[error("layout: {0}")]
    Layout(String),
    /// The workload is invalid.
    #[error("workload: {0}")]
    Workload(String),
    /// The connectivity does not fit the model.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The simulation failed.
    #[error(transparent)]
    Sim(#[from] SimError),
    /// A calibration file could not be read or written.
    #[error("calibration {path}: {message}")]
    Calibration {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
}

/// What the planner runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Prompt processing: every token of the sequence at once.
    Prefill,
    /// One new token per sequence against a cache of `seq_len`.
    Decode,
    /// An EP training step: forward and backward.
    Train,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "prefill" => Ok(Self::Prefill),
            "decode" => Ok(Self::Decode),
            "train" => Ok(Self::Train),
            o => Err(format!(
                "unknown mode `{o}` (expected prefill, decode or train)"
            )),
        }
    }
}

/// How the devices are split: `ep × tp` devices over `nodes` nodes; TP groups are contiguous (inside a node
/// when they fit), EP groups stride across them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Layout {
    /// Expert-parallel ranks.
    pub ep: usize,
    /// Tensor-parallel ranks.
    pub tp: usize,
    /// Nodes.
    pub nodes: usize,
    per_node: usize,
}

impl Layout {
    /// `ep × tp` devices over `nodes` nodes of `cluster`.
    pub fn new(ep: usize, tp: usize, nodes: usize, cluster: &Cluster) -> Result<Self, PlanError> {
        if ep == 0 || tp == 0 || nodes == 0 {
            return Err(PlanError::Layout(format!(
                "ep {ep}, tp {tp} and nodes {nodes} must be > 0"
            )));
        }
        let world = ep * tp;
        if !world.is_multiple_of(nodes) {
            return Err(PlanError::Layout(format!(
                "ep × tp = {world} devices do not split over {nodes} nodes"
            )));
        }
        let per_node = world / nodes;
        if per_node > cluster.devices_per_node {
            return Err(PlanError::Layout(format!(
                "ep × tp = {world} devices over {nodes} nodes is {per_node} per node; a {} node has {}",
                cluster.name, cluster.devices_per_node
            )));
        }
        Ok(Self {
            ep,
            tp,
            nodes,
            per_node,
        })
    }

    /// Devices of one node in use.
    pub fn devices_per_node(&self) -> usize {
        self.per_node
    }

    /// Which collectives the layout uses.
    pub fn split(&self) -> Split {
        match (self.ep > 1, self.tp > 1) {
            (_, false) => Split::Expert,
            (false, true) => Split::Tensor,
            (true, true) => Split::Hybrid,
        }
    }

    /// Ranks the simulator runs: the EP group (ranks differ only by their expert load) or the TP group.
    pub fn simulated_ranks(&self) -> usize {
        if self.ep > 1 { self.ep } else { self.tp }
    }
}

/// What is run: the mode, the tokens per device, the sequence (or cache) length and the expert-load imbalance.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Workload {
    /// Prefill, decode or training.
    pub mode: Mode,
    /// Tokens per device (decode: sequences per device).
    pub tokens: usize,
    /// Sequence length (decode: the cache length).
    pub seq_len: usize,
    /// Expert rows of the busiest EP rank over the mean (1: perfectly balanced).
    pub imbalance: f64,
}

impl Workload {
    /// A balanced workload.
    pub fn new(mode: Mode, tokens: usize, seq_len: usize) -> Self {
        Self {
            mode,
            tokens,
            seq_len,
            imbalance: 1.0,
        }
    }

    /// The same workload with the busiest EP rank at `imbalance` × the mean expert rows.
    pub fn with_imbalance(mut self, imbalance: f64) -> Self {
        self.imbalance = imbalance;
        self
    }

    fn validate(&self, layout: &Layout) -> Result<(), PlanError> {
        if self.tokens == 0 || self.seq_len == 0 {
            return Err(PlanError::Workload(format!(
                "tokens {} and seq_len {} must be > 0",
                self.tokens, self.seq_len
            )));
        }
        if !(self.imbalance >= 1.0 && self.imbalance <= layout.ep.max(1) as f64) {
            return Err(PlanError::Workload(format!(
                "imbalance {} must be between 1 and ep = {}",
                self.imbalance, layout.ep
            )));
        }
        if self.mode == Mode::Train && layout.tp > 1 {
            return Err(PlanError::Workload(format!(
                "training is planned for expert parallelism (tp must be 1, got {})",
                layout.tp
            )));
        }
        Ok(())
    }
}

/// The planner's figures for one setting (ms per step; overlap and exposed time of the FarSkip schedule).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prediction {
    /// FarSkip schedule, wall ms.
    pub farskip_ms: f64,
    /// Blocking baseline, wall ms.
    pub blocking_ms: f64,
    /// Two-micro-batch overlap of the standard model, wall ms.
    pub tbo_ms: f64,
    /// Two-micro-batch overlap of the FarSkip model (`farskip+tbo`), wall ms: inference at skip depth 1 (the
    /// executors run it there), else `None`.
    pub farskip_tbo_ms: Option<f64>,
    /// FarSkip: comm time covered by the same rank's compute, % (forward and backward together).
    pub overlap_pct: f64,
    /// FarSkip: comm time not covered by compute, summed over the simulated ranks.
    pub exposed_ms: f64,
    /// The busiest rank's compute time (FarSkip schedule).
    pub compute_ms: f64,
    /// The busiest rank's collective time (FarSkip schedule).
    pub comm_ms: f64,
    /// `blocking_ms / farskip_ms`.
    pub speedup: f64,
    /// Training: FarSkip's forward overlap, %.
    pub fwd_overlap_pct: Option<f64>,
    /// Training: FarSkip's backward overlap, %.
    pub bwd_overlap_pct: Option<f64>,
}

impl Prediction {
    /// The field-by-field mean of several predictions (e.g. of one setting under different jitter draws);
    /// `speedup` is recomputed from the mean times. `None` when `ps` is empty.
    pub fn mean(ps: &[Prediction]) -> Option<Prediction> {
        Self::field_by_field(ps, &|v| v.iter().sum::<f64>() / v.len() as f64)
    }

    /// The field-by-field median of several predictions (the upper middle of an even count): the statistic the
    /// overlap examples report over their repeats, so `plan --cluster cpu-here` reports it over its jitter
    /// draws. `speedup` is recomputed from the median times. `None` when `ps` is empty.
    pub fn median(ps: &[Prediction]) -> Option<Prediction> {
        Self::field_by_field(ps, &|v| crate::experiment::median(v.to_vec()))
    }

    /// Each field of `ps` reduced by `stat` (given every prediction's value of it; an optional field only when
    /// every prediction has it).
    fn field_by_field(ps: &[Prediction], stat: &dyn Fn(&[f64]) -> f64) -> Option<Prediction> {
        let first = ps.first()?;
        let all = |f: &dyn Fn(&Prediction) -> f64| stat(&ps.iter().map(f).collect::<Vec<_>>());
        let all_opt = |f: &dyn Fn(&Prediction) -> Option<f64>| {
            let v: Option<Vec<f64>> = ps.iter().map(f).collect();
            v.map(|v| stat(&v))
        };
        let (farskip_ms, blocking_ms) = (all(&|p| p.farskip_ms), all(&|p| p.blocking_ms));
        Some(Prediction {
            farskip_ms,
            blocking_ms,
            tbo_ms: all(&|p| p.tbo_ms),
            farskip_tbo_ms: all_opt(&|p| p.farskip_tbo_ms),
            overlap_pct: all(&|p| p.overlap_pct),
            exposed_ms: all(&|p| p.exposed_ms),
            compute_ms: all(&|p| p.compute_ms),
            comm_ms: all(&|p| p.comm_ms),
            speedup: if farskip_ms > 0.0 {
                blocking_ms / farskip_ms
            } else {
                first.speedup
            },
            fwd_overlap_pct: all_opt(&|p| p.fwd_overlap_pct),
            bwd_overlap_pct: all_opt(&|p| p.bwd_overlap_pct),
        })
    }
}

/// A prediction with the timelines behind it.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The figures.
    pub prediction: Prediction,
    /// FarSkip schedule.
    pub farskip: Timeline,
    /// Blocking baseline.
    pub blocking: Timeline,
    /// Two-micro-batch overlap.
    pub tbo: Timeline,
}

impl Plan {
    /// The timeline of one schedule.
    pub fn timeline(&self, kind: ScheduleKind) -> &Timeline {
        match kind {
            ScheduleKind::Blocking => &self.blocking,
            ScheduleKind::FarSkip => &self.farskip,
            ScheduleKind::Tbo => &self.tbo,
        }
    }
}

/// The description of one schedule kind for `mode`.
pub fn schedule(
    config: &ModelConfig,
    conn: &Connectivity,
    split: Split,
    mode: Mode,
    kind: ScheduleKind,
) -> Schedule {
    let one = |c: &Connectivity| match mode {
        Mode::Train => desc::training(config, c),
        Mode::Prefill | Mode::Decode => desc::inference(config, c, split),
    };
    match kind {
        ScheduleKind::Blocking => one(&Connectivity::Standard),
        ScheduleKind::FarSkip => one(conn),
        ScheduleKind::Tbo => match mode {
            Mode::Train => desc::training_tbo(config),
            Mode::Prefill | Mode::Decode => desc::two_micro_batches(&one(&Connectivity::Standard)),
        },
    }
}

/// Simulates the three schedules of `config` with `costs` on `ranks` ranks.
pub fn predict(
    config: &ModelConfig,
    conn: &Connectivity,
    split: Split,
    mode: Mode,
    ranks: usize,
    costs: &dyn CostModel,
) -> Result<Plan, PlanError> {
    conn.validate(config.layers.len())?;
    let simulate = |s: &Schedule, micro: usize| -> Result<Timeline, PlanError> {
        let compute = |r: usize, k: &OpKey| costs.compute(r, k, micro);
        let collective = |k: &OpKey| costs.collective(k, micro);
        let wake = |r: usize, k: &OpKey| costs.wake_ms(r, k);
        let cores = costs.cores().unwrap_or(ranks);
        Ok(sim::simulate_with_wake(
            s,
            ranks,
            cores,
            costs.time_slice_ms(),
            &compute,
            &collective,
            &wake,
        )?)
    };
    let run = |kind: ScheduleKind| -> Result<Timeline, PlanError> {
        let micro = if kind == ScheduleKind::Tbo { 2 } else { 1 };
        let s = schedule(config, conn, split, mode, kind);
        simulate(&s, micro)
    };
    let (farskip, blocking, tbo) = (
        run(ScheduleKind::FarSkip)?,
        run(ScheduleKind::Blocking)?,
        run(ScheduleKind::Tbo)?,
    );
    // farskip+tbo: the FarSkip description cut into two interleaved micro-batches, as the executors walk it.
    let farskip_tbo = if mode != Mode::Train && desc::overlap_depth(conn) == 1 {
        let s = desc::two_micro_batches(&desc::inference(config, conn, split));
        Some(simulate(&s, 2)?)
    } else {
        None
    };
    let m = farskip.metrics(None);
    let b = blocking.metrics(None);
    let t = tbo.metrics(None);
    let train = mode == Mode::Train;
    let prediction = Prediction {
        farskip_ms: m.wall_ms,
        blocking_ms: b.wall_ms,
        tbo_ms: t.wall_ms,
        farskip_tbo_ms: farskip_tbo.as_ref().map(|f| f.metrics(None).wall_ms),
        overlap_pct: m.overlap_pct,
        exposed_ms: m.exposed_ms,
        compute_ms: m.compute_ms,
        comm_ms: m.comm_ms,
        speedup: if m.wall_ms > 0.0 {
            b.wall_ms / m.wall_ms
        } else {
            1.0
        },
        fwd_overlap_pct: train.then(|| farskip.metrics(Some(Phase::Forward)).overlap_pct),
        bwd_overlap_pct: train.then(|| farskip.metrics(Some(Phase::Backward)).overlap_pct),
    };
    Ok(Plan {
        prediction,
        farskip,
        blocking,
        tbo,
    })
}

/// [`predict`] with the roofline and α–β costs of `cluster`.
pub fn predict_roofline(
    config: &ModelConfig,
    conn: &Connectivity,
    cluster: &Cluster,
    layout: Layout,
    workload: &Workload,
) -> Result<Plan, PlanError> {
    cluster.validate()?;
    workload.validate(&layout)?;
    let costs = Roofline::new(config.clone(), cluster.clone(), layout, workload.clone());
    predict(
        config,
        conn,
        layout.split(),
        workload.mode,
        layout.simulated_ranks(),
        &costs,
    )
}

/// Parses an HF `config.json` for planning: a multimodal wrapper (`Llama4ForConditionalGeneration`) carries
/// its language model under `text_config`, which is the part the planner costs.
pub fn parse_model_config(v: &serde_json::Value) -> Result<ModelConfig, PlanError> {
    let text = v
        .get("text_config")
        .filter(|t| t.is_object() && v.get("hidden_size").is_none());
    Ok(farskip_model::hf::parse_config(text.unwrap_or(v))?)
}

/// Reads a `config.json` (or a checkpoint directory holding one) for planning ([`parse_model_config`]).
pub fn load_model_config(path: &std::path::Path) -> Result<ModelConfig, PlanError> {
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let err = |message: String| {
        PlanError::Model(ModelError::ConfigParse {
            path: file.clone(),
            message,
        })
    };
    let text = std::fs::read_to_string(&file).map_err(|e| err(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    parse_model_config(&v)
}
