//! Helpers shared by the examples: model selection (`--model DIR` or `--preset`), tensor files, logging.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::Distribution;
use farskip_dist::experiment::Parallel;
use farskip_model::checkpoint::{TensorStore, TensorWriter};
use farskip_model::hf::WeightDtype;
use farskip_model::{MemoryCheck, Model, ModelConfig};

/// An example's exit status from what its `run` returned: success, or status 1 after printing the error and
/// its causes on one line of stderr (`error: loading model from DIR: config.json ...`).
pub fn exit_status(result: Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes joined by `: `, leaving out a cause its parent's message already ends with (the
/// libraries' errors print their I/O source themselves).
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

/// Installs a `tracing` subscriber that logs to stderr (`RUST_LOG` overrides the level, default `warn`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Keeps freed memory in the process instead of handing it back to the kernel after every tensor (glibc only;
/// elsewhere a no-op). A training step allocates and frees tens of buffers of 1–32 MiB; with glibc's defaults
/// each is a fresh `mmap` whose pages the kernel zeroes on first touch and a `munmap` that flushes the other
/// cores' TLBs (perf: ~15 % of the step in the kernel). Allocation only: results are unchanged.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before the program's threads allocate much.
    unsafe {
        // No block comes from mmap, whatever its size: every tensor is carved from the heap. (A 32 MiB
        // threshold, glibc's ceiling, still left the small preset's expert banks — exactly 32 MiB, and their
        // gradients and zero-filled buffers — one mmap + first-touch faults each: ~33 K page faults per
        // training step; ~2 K without.)
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // One arena for every thread. glibc gives each thread that allocates its own arena, and an arena other
        // than the main one lives in 64 MiB mmap'd heaps that are unmapped as soon as they empty: the LocalWorld
        // ranks (each on its own threads) re-faulted their expert-bank gradients and optimizer buffers on every
        // step — `overlap_training --world 2 --steps 3`: 2.85 M page faults, 34.7 s of 36.9 s wall in the
        // kernel, 11.4 GB peak RSS; with one arena 0.93 M, 6.2 s, 18.9 s wall, 3.7 GB. Tensor-sized allocations
        // are few, so the shared arena's lock is not contended.
        libc::mallopt(libc::M_ARENA_MAX, 1);
        // Freed heap memory stays mapped (no trimming), and the heap grows in 64 MiB steps.
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// A model from `--model DIR` or a named `--preset` (random weights, seeded).
pub fn load_model(model: Option<&Path>, preset: Option<&str>, device: &Device) -> Result<Model> {
    load_model_with(model, preset, device, MemoryCheck::Refuse)
}

/// [`load_model`], with what a checkpoint that needs more memory than is available does: an error, or a
/// warning (`--force`). f32 weights.
pub fn load_model_with(
    model: Option<&Path>,
    preset: Option<&str>,
    device: &Device,
    memory: MemoryCheck,
) -> Result<Model> {
    // Training and the overlap examples need f32 weights whatever the checkpoint holds.
    load_model_as(model, preset, device, memory, Some(WeightDtype::F32))
}

/// [`load_model_with`], keeping a checkpoint's weights in `dtype` (`None`: the checkpoint's own). Presets are
/// f32 only.
pub fn load_model_as(
    model: Option<&Path>,
    preset: Option<&str>,
    device: &Device,
    memory: MemoryCheck,
    dtype: Option<WeightDtype>,
) -> Result<Model> {
    if preset.is_some() && dtype == Some(WeightDtype::Bf16) {
        bail!("--dtype bf16 needs --model DIR (presets are f32)");
    }
    match (model, preset) {
        (Some(dir), None) => Model::from_pretrained_as(dir, device, memory, dtype)
            .with_context(|| format!("loading model from {}", dir.display())),
        (None, Some(name)) => {
            device.seed(0);
            Ok(Model::new(&preset_config(name)?, device)?)
        }
        (Some(_), Some(_)) => bail!("give either --model or --preset, not both"),
        (None, None) => bail!("give --model DIR or --preset small"),
    }
}

/// The model options of the overlap examples: `--model DIR` or `--preset NAME` (`small` when neither is given),
/// and `--embedding-std` for a preset's token embeddings.
#[derive(clap::Args, Debug, Clone)]
pub struct OverlapModelArgs {
    /// Hugging Face checkpoint directory (every layer MoE for expert parallelism).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A preset with random weights (small = the benchmark Qwen3-MoE config, tiny = a 4-layer toy); small when
    /// neither --model nor --preset is given.
    #[arg(long)]
    pub preset: Option<String>,
    #[arg(long, default_value_t = 1.0, help = EMBEDDING_STD_HELP)]
    pub embedding_std: f64,
    /// Load a checkpoint even when it needs more memory than is available (a warning instead of an error).
    #[arg(long)]
    pub force: bool,
}

impl OverlapModelArgs {
    /// The model: the checkpoint as it is, or the preset (default `small`) with its token embeddings drawn from
    /// N(0, `embedding_std`²). See [`EMBEDDING_STD_HELP`].
    pub fn load(&self, device: &Device) -> Result<Model> {
        let std = self.embedding_std;
        ensure!(
            std.is_finite() && std > 0.0,
            "--embedding-std must be finite and > 0, got {std}"
        );
        let preset = match (&self.model, &self.preset) {
            (None, None) => Some("small"),
            (_, p) => p.as_deref(),
        };
        let memory = if self.force {
            MemoryCheck::Warn
        } else {
            MemoryCheck::Refuse
        };
        let mut m = load_model_with(self.model.as_deref(), preset, device, memory)?;
        if self.model.is_none() {
            // Seeded like the rest of the preset: the same model on every run.
            device.seed(1);
            let [vocab, hidden] = m.embed.weight.dims();
            m.embed.weight = Param::from_tensor(Tensor::random(
                [vocab, hidden],
                Distribution::Normal(0.0, std),
                device,
            ));
        }
        Ok(m)
    }
}

/// The output options of the overlap examples: `--trace FILE.json`, `--svg FILE.svg`, `--json`.
#[derive(clap::Args, Debug, Clone)]
pub struct OverlapOutputArgs {
    /// Write the FarSkip run's trace as Chrome-trace JSON (opens in Perfetto), and the blocking baseline's next to
    /// it (`FILE_blocking.json`).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Write the FarSkip and blocking timelines as SVG (the blocking one next to it, `FILE_blocking.svg`).
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
}

impl OverlapOutputArgs {
    /// Writes what `--trace` and `--svg` asked for: both traces as Chrome JSON, both timelines as SVG.
    pub fn write(
        &self,
        title: &str,
        trace: &farskip_dist::trace::Trace,
        blocking: &farskip_dist::trace::Trace,
    ) -> Result<()> {
        if let Some(p) = &self.trace {
            std::fs::write(p, trace.to_chrome_json())
                .with_context(|| format!("writing {}", p.display()))?;
            let other = beside(p, "blocking", "json");
            std::fs::write(&other, blocking.to_chrome_json())
                .with_context(|| format!("writing {}", other.display()))?;
        }
        if let Some(p) = &self.svg {
            write_timelines(p, title, trace, blocking)?;
        }
        Ok(())
    }
}

/// What `--embedding-std` of the overlap examples does (their help text).
pub const EMBEDDING_STD_HELP: &str = "Standard deviation of a preset's token embeddings (a --model checkpoint keeps \
its own). 1.0, PyTorch's nn.Embedding default, keeps each token's identity in the residual stream, so the random \
router spreads tokens over the experts (and the ranks) as a trained, load-balanced router does. 0.02, HF's \
initializer_range, gives the random model whose residual stream after layer 0 is dominated by attention's \
running mean: its router sends whole sequences to a few experts, one rank gets most rows, and a collective cannot \
start before the overloaded rank joins it — which measures the load imbalance, not the schedule";

/// Configs of the presets.
pub fn preset_config(name: &str) -> Result<ModelConfig> {
    match name {
        "small" => Ok(ModelConfig::preset_small()),
        "tiny" => Ok(ModelConfig::small_moe(
            256,
            64,
            4,
            4,
            2,
            16,
            8,
            2,
            32,
            Some(32),
        )),
        other => bail!("unknown preset `{other}` (expected small or tiny)"),
    }
}

/// Reads `name` (int64 `[rows, cols]`) from a safetensors file.
pub fn read_ids(path: &Path, name: &str, device: &Device) -> Result<Tensor<2, Int>> {
    let store = TensorStore::open_files(&[path.to_path_buf()])?;
    let (v, shape) = store
        .i64(name)
        .with_context(|| format!("reading `{name}` from {}", path.display()))?;
    if shape.len() != 2 {
        bail!(
            "`{name}` in {} has shape {shape:?}, expected [batch, seq]",
            path.display()
        );
    }
    Ok(Tensor::from_data(
        TensorData::new(v, [shape[0], shape[1]]),
        device,
    ))
}

/// Uniform random token ids, seeded (the distributed experiments' generator, so every example draws alike).
pub use farskip_dist::experiment::random_ids;

/// Writes named tensors to a safetensors file.
pub fn write_tensors(path: &Path, writer: &TensorWriter) -> Result<()> {
    writer
        .write(path, None)
        .with_context(|| format!("writing {}", path.display()))
}

/// `DIR/STEM_{suffix}.{ext}` next to `path` (`DIR/STEM.*`).
fn beside(path: &Path, suffix: &str, ext: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map_or("timeline".into(), |s| s.to_string_lossy());
    path.with_file_name(format!("{stem}_{suffix}.{ext}"))
}

/// Writes a trace's SVG timeline to `path` and the blocking baseline's next to it (`<stem>_blocking.svg`).
pub fn write_timelines(
    path: &Path,
    title: &str,
    trace: &farskip_dist::trace::Trace,
    blocking: &farskip_dist::trace::Trace,
) -> Result<()> {
    std::fs::write(path, trace.to_svg(&format!("FarSkip: {title}")))
        .with_context(|| format!("writing {}", path.display()))?;
    let other = beside(path, "blocking", "svg");
    std::fs::write(
        &other,
        blocking.to_svg(&format!("standard, blocking: {title}")),
    )
    .with_context(|| format!("writing {}", other.display()))
}

/// The `--device` option of the examples.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DeviceArgs {
    /// flex (burn's CPU backend) or wgpu (burn's CubeCL backend on the first wgpu adapter; needs a build with
    /// `--features wgpu`). Default: $BURN_DEVICE when set, else flex.
    #[arg(long)]
    pub device: Option<farskip_model::DeviceName>,
}

impl DeviceArgs {
    /// The device asked for, brought up: an error (not a panic) for a backend the build lacks or a machine
    /// without an adapter.
    pub fn device(&self) -> Result<Device> {
        Ok(self.name()?.device()?)
    }

    /// The device's name: `--device`, else `BURN_DEVICE`, else flex.
    pub fn name(&self) -> Result<farskip_model::DeviceName> {
        Ok(farskip_model::DeviceName::resolve(self.device)?)
    }
}

/// Which distributed engine runs the ranks of an example.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// Ranks as threads of this process (LocalWorld).
    #[default]
    Local,
    /// One process per rank: launch with `mpirun -np N` (binary built with `--features mpi`).
    Mpi,
}

/// The `--backend` options of the distributed examples.
#[derive(clap::Args, Debug, Clone)]
pub struct BackendArgs {
    /// local: ranks are threads of this process; mpi: this process is one rank of `mpirun -np N …` (the
    /// world is the job's size; rank 0 prints the results).
    #[arg(long, value_enum, default_value_t = BackendKind::Local)]
    pub backend: BackendKind,
    /// MPI: seconds a collective may wait for its peers before the run fails.
    #[arg(long, default_value_t = 300)]
    pub comm_timeout_s: u64,
}

/// Refuses a `--world N` the run cannot be split into (the overlap examples, and `plan`'s prediction of them):
/// expert parallelism puts the same number of experts on every rank; tensor parallelism splits the attention
/// heads and every expert's intermediate columns evenly.
pub fn check_world(world: usize, parallel: Parallel, config: &ModelConfig) -> Result<()> {
    ensure!(world > 0, "--world must be at least 1");
    match parallel {
        Parallel::Expert => {
            if let Some(moe) = &config.moe
                && !moe.num_experts.is_multiple_of(world)
            {
                bail!(
                    "--world {world} does not divide the model's {} experts: expert parallelism needs the same \
                     number of experts on every rank",
                    moe.num_experts
                );
            }
        }
        Parallel::Tensor => config
            .check_tensor_parallel(world)
            .with_context(|| format!("--world {world} with --parallel tp"))?,
    }
    Ok(())
}

impl BackendArgs {
    /// The backend for a run of `world` ranks of `model`. MPI is refused when the binary lacks the feature,
    /// when no MPI launcher started the process, when `mpirun -np` differs from `world`, and when the model
    /// cannot be split into `world` ranks of `parallel` ([`check_world`]).
    pub fn backend(
        &self,
        world: usize,
        parallel: Parallel,
        model: &Model,
    ) -> Result<farskip_dist::experiment::Backend> {
        check_world(world, parallel, model.config())?;
        self.start(world)
    }

    /// The backend for a run of `world` ranks, without the model checks of [`BackendArgs::backend`].
    pub fn start(&self, world: usize) -> Result<farskip_dist::experiment::Backend> {
        match self.backend {
            BackendKind::Local => Ok(farskip_dist::experiment::Backend::Local),
            BackendKind::Mpi => self.mpi(world),
        }
    }

    #[cfg(feature = "mpi")]
    fn mpi(&self, world: usize) -> Result<farskip_dist::experiment::Backend> {
        let mpi = farskip_dist::experiment::MpiBackend::init(std::time::Duration::from_secs(
            self.comm_timeout_s,
        ))
        .context("--backend mpi")?;
        let size = mpi.world().size();
        ensure!(
            size == world,
            "--world {world} but mpirun started {size} processes: run `mpirun -np {world} …` (one process per rank)"
        );
        Ok(farskip_dist::experiment::Backend::Mpi(Box::new(mpi)))
    }

    #[cfg(not(feature = "mpi"))]
    fn mpi(&self, _world: usize) -> Result<farskip_dist::experiment::Backend> {
        bail!(
            "--backend mpi: this binary was built without MPI support; rebuild with \
             `cargo build --release -p farskip-examples --features mpi --examples` (needs Open MPI: \
             apt-get install openmpi-bin libopenmpi-dev libclang-dev)"
        )
    }
}

/// Runs an example's body; under MPI a failing rank prints its error and exits at once with status 1, without
/// `MPI_Finalize` (which would wait for the peers), so that `mpirun` ends the job instead of the peers waiting
/// out their timeout.
pub fn exit_on_error(
    backend: &farskip_dist::experiment::Backend,
    result: Result<()>,
) -> Result<()> {
    match (backend, result) {
        (farskip_dist::experiment::Backend::Local, r) => r,
        #[cfg(feature = "mpi")]
        (farskip_dist::experiment::Backend::Mpi(m), Err(e)) => {
            eprintln!("Error on rank {}: {e:#}", m.rank());
            std::process::exit(1);
        }
        #[cfg(feature = "mpi")]
        (_, r) => r,
    }
}

/// The process's peak resident set so far in MiB (`getrusage`'s `ru_maxrss`); `None` off Linux.
pub fn peak_rss_mb() -> Option<f64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes a `rusage` into the pointer it is given, which is valid and large enough.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
        // SAFETY: on success the struct was written (and it was zeroed before in any case).
        let usage = unsafe { usage.assume_init() };
        // Linux reports ru_maxrss in KiB.
        (rc == 0).then(|| usage.ru_maxrss as f64 / 1024.0)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}
