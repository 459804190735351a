//! What FarSkip buys on a model and cluster, predicted by simulating the schedules (farskip_dist::plan).
//!
//! `cargo run --release -p farskip-examples --example plan -- --model examples/data/configs/deepseek_v3.json \
//!     --cluster mi325x --ep 8 --mode train --seq-len 4096 --tokens 4096 --json`
//!
//! On this machine (`--cluster cpu-here`) with the overlap examples' flags, from op costs measured single-rank
//! (cached for `--calibration-max-age-s`, 300 s by default; `--calibrate` measures again):
//! `plan --cluster cpu-here --world 2 --parallel ep --preset small --tokens 256 --comm-ratio 1 --json`; the
//! examples' other flags (`--repeats`, `--steps`, `--lr`, `--backend local`, `--comm-timeout-s`) are taken and
//! change nothing predicted.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Parser;
use farskip_dist::experiment::Parallel;
use farskip_dist::plan::calibrate::{
    Calibration, Measured, Passes, balanced_placement, measure_inference, measure_training,
    routing_imbalance,
};
use farskip_dist::plan::{
    Cluster, Layout, Mode, Plan, Prediction, ScheduleKind, Workload, load_model_config, predict,
    predict_roofline, schedule, sweep,
};
use farskip_examples::{
    EMBEDDING_STD_HELP, OverlapModelArgs, check_world, exit_status, init_logging, load_model,
    preset_config, tune_allocator,
};
use farskip_model::{Connectivity, ModelConfig};
use farskip_train::plot::line_chart_svg;

#[derive(Parser, Debug)]
#[command(
    about = "Predict step time and overlap of the blocking, FarSkip and TBO schedules on a model and cluster"
)]
struct Args {
    #[command(flatten)]
    device: farskip_examples::DeviceArgs,
    /// HF config.json, or a checkpoint directory holding one.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A preset instead of --model (small, tiny); cpu-here's default is small.
    #[arg(long)]
    preset: Option<String>,
    /// cpu-here with a preset: its token embeddings' standard deviation, as the overlap examples draw them (the
    /// calibration must time the model they run; cached as `<preset>-emb<std>-...`).
    #[arg(long, default_value_t = 1.0, help = EMBEDDING_STD_HELP)]
    embedding_std: f64,
    /// h100, h200, mi300x, mi325x, cpu-here (op costs measured on this machine), or a cluster TOML file.
    #[arg(long, default_value = "h100")]
    cluster: String,
    /// Expert-parallel ranks.
    #[arg(long, default_value_t = 8)]
    ep: usize,
    /// Tensor-parallel ranks.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Nodes the ep × tp devices span.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// prefill, decode or train.
    #[arg(long, default_value = "prefill")]
    mode: Mode,
    /// Tokens per device (decode: sequences per device); default 4096, on cpu-here the overlap examples' own
    /// (prefill 256, train 512).
    #[arg(long)]
    tokens: Option<usize>,
    /// Sequence length (decode: cache length); the tokens' when not given.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Expert rows of the busiest EP rank over the mean. Default: measured by routing random tokens through the
    /// checkpoint when --model is a directory with weights that fit in memory, else 1 (balanced).
    #[arg(long)]
    imbalance: Option<f64>,
    /// The converted model's connectivity: farskip, farskip-dN, with an optional layer range (farskip:0..=9).
    #[arg(long, default_value = "farskip")]
    connectivity: Connectivity,
    /// The schedule whose timeline --svg and --trace draw: blocking, farskip or tbo.
    #[arg(long, default_value = "farskip")]
    schedule: String,
    /// Print one JSON line.
    #[arg(long)]
    json: bool,
    /// Write the timeline of one layer per rank as SVG.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Write the whole simulated timeline of --schedule (every rank, every layer) as a Chrome trace, the
    /// format of the overlap examples' --trace, to compare a prediction with a run span by span (cpu-here: the
    /// first of the jitter draws, whose figures the report averages).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// ep-tp, depth or layers: a sweep, printed as JSON lines and plotted to --plot.
    #[arg(long)]
    sweep: Option<String>,
    /// Where the sweep's plot goes (SVG).
    #[arg(long, default_value = "plan_sweep.svg")]
    plot: PathBuf,
    /// cpu-here: ranks of the LocalWorld run to predict.
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// cpu-here: ep or tp.
    #[arg(long, default_value = "ep")]
    parallel: Parallel,
    /// cpu-here: collective time as a multiple of its depth-1 FarSkip window (the overlap examples' link).
    #[arg(long, default_value_t = 1.0)]
    comm_ratio: f64,
    /// cpu-here: calibrate a --model checkpoint even when it needs more memory than is available (a warning
    /// instead of an error), as the overlap examples' --force does.
    #[arg(long)]
    force: bool,
    /// cpu-here, EP: predict the overlap examples' --balance run (experts placed on the ranks by their load on a
    /// placement batch instead of in contiguous blocks): the calibration measures the model so placed.
    #[arg(long)]
    balance: bool,
    /// cpu-here: measure the op costs again even if a cached calibration exists.
    #[arg(long)]
    calibrate: bool,
    /// cpu-here: draws of the ranks' op costs around their measured medians; each figure is its median over the
    /// draws, as the overlap examples report theirs over their repeats (0: every rank at the median).
    #[arg(long, default_value_t = 16)]
    jitter_draws: usize,
    /// cpu-here: reuse a cached calibration only this many seconds after it was measured (this machine's speed
    /// drifts by 10–30 % over tens of minutes; older caches are measured again).
    #[arg(long, default_value_t = 300)]
    calibration_max_age_s: u64,
    /// cpu-here: the calibration cache directory.
    #[arg(long, default_value = "target/plan-calibration")]
    calibration_dir: PathBuf,
    /// cpu-here: the overlap examples' --repeats, taken so that an example's command line is predicted as it is
    /// (the examples report their median repeat, one forward or step: the figures predicted do not depend on it).
    #[arg(long)]
    repeats: Option<usize>,
    /// cpu-here, --mode train: overlap_training's --steps (it reports the median step: not a figure predicted).
    #[arg(long)]
    steps: Option<usize>,
    /// cpu-here, --mode train: overlap_training's --lr (the step's time does not depend on it).
    #[arg(long)]
    lr: Option<f64>,
    /// cpu-here: the overlap examples' --backend; the prediction is of a LocalWorld run (local), the world whose
    /// costs the calibration measures.
    #[arg(long, value_enum)]
    backend: Option<farskip_examples::BackendKind>,
    /// cpu-here: the overlap examples' --comm-timeout-s (an MPI run's; unused by a LocalWorld prediction).
    #[arg(long)]
    comm_timeout_s: Option<u64>,
}

fn main() -> std::process::ExitCode {
    init_logging();
    tune_allocator();
    exit_status(run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    let kind = match args.schedule.as_str() {
        "blocking" => ScheduleKind::Blocking,
        "farskip" => ScheduleKind::FarSkip,
        "tbo" => ScheduleKind::Tbo,
        o => bail!("unknown --schedule `{o}` (expected blocking, farskip or tbo)"),
    };
    check_example_flags(&args)?;
    if args.cluster == "cpu-here" {
        return cpu_here(&args, kind);
    }
    let cluster = cluster(&args.cluster)?;
    let config = model_config(&args)?;
    let tokens = args.tokens.unwrap_or(4096);
    let imbalance = match args.imbalance {
        Some(i) => i,
        None => measured_imbalance(&args, tokens),
    };
    let workload =
        Workload::new(args.mode, tokens, args.seq_len.unwrap_or(tokens)).with_imbalance(imbalance);
    let layout = Layout::new(args.ep, args.tp, args.nodes, &cluster)?;
    if let Some(s) = &args.sweep {
        return run_sweep(&args, s, &config, &cluster, layout, &workload);
    }
    let plan = predict_roofline(&config, &args.connectivity, &cluster, layout, &workload)?;
    report(&args, &plan, kind, config.layers.len(), &cluster.name)
}

/// The imbalance the checkpoint's own router gives `--ep` ranks, when `--model` is a checkpoint directory
/// that loads here; 1 otherwise (with a note when loading failed).
fn measured_imbalance(args: &Args, tokens: usize) -> f64 {
    let Some(dir) = args.model.as_ref().filter(|p| p.is_dir()) else {
        return 1.0;
    };
    let has_weights = std::fs::read_dir(dir).is_ok_and(|mut d| {
        d.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "safetensors")))
    });
    if !has_weights || args.ep <= 1 {
        return 1.0;
    }
    let measured = args
        .device
        .device()
        .and_then(|device| load_model(Some(dir), None, &device))
        .and_then(|m| Ok(routing_imbalance(&m, args.ep, tokens.min(256), 1)?));
    match measured {
        Ok(i) => {
            eprintln!(
                "expert-load imbalance {i:.3} (the checkpoint's router, {} ranks)",
                args.ep
            );
            i
        }
        Err(e) => {
            eprintln!("note: imbalance 1 (could not route through the checkpoint: {e:#})");
            1.0
        }
    }
}

fn cluster(name: &str) -> Result<Cluster> {
    if let Some(c) = Cluster::by_name(name) {
        return Ok(c);
    }
    let path = Path::new(name);
    if path.extension().is_some_and(|e| e == "toml") {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading cluster {name}"))?;
        return Cluster::from_toml(&text).with_context(|| format!("cluster {name}"));
    }
    bail!(
        "unknown --cluster `{name}` (expected h100, h200, mi300x, mi325x, cpu-here or a .toml file)"
    )
}

fn model_config(args: &Args) -> Result<ModelConfig> {
    match (&args.model, &args.preset) {
        (Some(p), None) => {
            Ok(load_model_config(p).with_context(|| format!("--model {}", p.display()))?)
        }
        (None, Some(name)) => preset_config(name),
        (Some(_), Some(_)) => bail!("give either --model or --preset, not both"),
        (None, None) => {
            bail!("give --model CONFIG.json (or a checkpoint directory) or --preset NAME")
        }
    }
}

fn report(
    args: &Args,
    plan: &Plan,
    kind: ScheduleKind,
    layers: usize,
    cluster: &str,
) -> Result<()> {
    let p = &plan.prediction;
    if let Some(path) = &args.svg {
        // One layer in the middle of the model, every simulated rank.
        let l = layers / 2;
        let title = format!(
            "{} on {cluster}, layer {l} ({:?})",
            args.schedule, args.mode
        );
        std::fs::write(
            path,
            plan.timeline(kind).to_trace(Some(l..=l)).to_svg(&title),
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.trace {
        std::fs::write(path, plan.timeline(kind).to_trace(None).to_chrome_json())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        let mut v = serde_json::to_value(p)?;
        if args.mode == Mode::Train {
            v["farskip_step_ms"] = p.farskip_ms.into();
            v["blocking_step_ms"] = p.blocking_ms.into();
        }
        println!("{v}");
    } else {
        println!(
            "blocking {:.3} ms, FarSkip {:.3} ms ({:.2}x), TBO {:.3} ms; overlap {:.1} %, exposed {:.3} ms, compute {:.3} ms",
            p.blocking_ms,
            p.farskip_ms,
            p.speedup,
            p.tbo_ms,
            p.overlap_pct,
            p.exposed_ms,
            p.compute_ms
        );
    }
    Ok(())
}

fn run_sweep(
    args: &Args,
    which: &str,
    config: &ModelConfig,
    cluster: &Cluster,
    layout: Layout,
    workload: &Workload,
) -> Result<()> {
    let ms = |p: &farskip_dist::plan::Prediction| (p.blocking_ms, p.farskip_ms);
    match which {
        "ep-tp" => {
            let rows = sweep::ep_tp(config, &args.connectivity, cluster, args.nodes, workload)?;
            let (mut b, mut f) = (Vec::new(), Vec::new());
            for (l, p) in &rows {
                println!(
                    "{}",
                    serde_json::json!({"ep": l.ep, "tp": l.tp, "blocking_ms": p.blocking_ms,
                    "farskip_ms": p.farskip_ms, "tbo_ms": p.tbo_ms, "overlap_pct": p.overlap_pct})
                );
                b.push((l.tp as f64, ms(p).0));
                f.push((l.tp as f64, ms(p).1));
            }
            let title = format!(
                "EP x TP on {} x {} {}",
                args.nodes, cluster.devices_per_node, cluster.name
            );
            line_chart_svg(
                &args.plot,
                &title,
                ("TP (EP = devices / TP)", "step ms"),
                &[("blocking", b), ("FarSkip", f)],
            )?;
        }
        "depth" => {
            let bws: Vec<f64> = [6.25, 12.5, 25.0, 50.0, 100.0, 200.0, 400.0]
                .iter()
                .map(|g| g * 1e9)
                .collect();
            let rows = sweep::depth(config, cluster, layout, workload, &bws, 4)?;
            let mut series: Vec<(String, Vec<(f64, f64)>)> = (1..=4)
                .map(|d| (format!("depth {d} overlap %"), Vec::new()))
                .collect();
            for (bw, d, p) in &rows {
                println!(
                    "{}",
                    serde_json::json!({"inter_gbps": bw * 8.0 / 1e9, "depth": d,
                    "farskip_ms": p.farskip_ms, "blocking_ms": p.blocking_ms, "overlap_pct": p.overlap_pct})
                );
                series[d - 1].1.push((bw * 8.0 / 1e9, p.overlap_pct));
            }
            let title = format!("skip depth vs inter-node bandwidth, {}", cluster.name);
            line_chart_svg(
                &args.plot,
                &title,
                ("inter-node Gb/s per device", "overlap %"),
                &series,
            )?;
        }
        "layers" => {
            let d = args.connectivity.depth().unwrap_or(1);
            let rows = sweep::layers(config, cluster, layout, workload, d)?;
            let mut f = Vec::new();
            for (k, p) in &rows {
                println!(
                    "{}",
                    serde_json::json!({"converted": k, "farskip_ms": p.farskip_ms,
                    "blocking_ms": p.blocking_ms, "overlap_pct": p.overlap_pct})
                );
                f.push((*k as f64, p.farskip_ms));
            }
            line_chart_svg(
                &args.plot,
                "first k layers converted",
                ("k", "step ms"),
                &[("FarSkip", f)],
            )?;
        }
        o => bail!("unknown --sweep `{o}` (expected ep-tp, depth or layers)"),
    }
    Ok(())
}

/// The seeds `overlap_inference` and `overlap_training` draw their batches with: the calibration routes the same
/// tokens, so the planner knows each EP rank's expert rows.
const INFERENCE_SEED: u64 = 1;
const TRAINING_SEED: u64 = 3;
/// What a calibration times: rounds a pause apart (a prefill's odd number, so the median round is one of them;
/// a training step is longer, so fewer), each two timed passes per side-by-side copy, as the experiments take
/// the fastest of two free passes on every rank for their link.
const INFERENCE_PASSES: Passes = Passes {
    rounds: 5,
    per_round: 2,
};
const TRAINING_PASSES: Passes = Passes {
    rounds: 3,
    per_round: 2,
};

/// The overlap examples' flags that do not change a prediction (`--repeats`, `--steps`, `--lr`, `--backend`,
/// `--comm-timeout-s`): refused off cpu-here and where the example would refuse them, else taken and unused.
fn check_example_flags(args: &Args) -> Result<()> {
    let given = [
        ("--repeats", args.repeats.is_some()),
        ("--steps", args.steps.is_some()),
        ("--lr", args.lr.is_some()),
        ("--backend", args.backend.is_some()),
        ("--comm-timeout-s", args.comm_timeout_s.is_some()),
    ];
    if args.cluster != "cpu-here" {
        if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
            bail!(
                "{flag} is an overlap example's flag: it is taken with --cluster cpu-here, which predicts \
                 those examples (got --cluster {})",
                args.cluster
            );
        }
        return Ok(());
    }
    if args.mode != Mode::Train
        && let Some((flag, _)) = given[1..3].iter().find(|(_, g)| *g)
    {
        bail!("{flag} is overlap_training's flag: predict a training step with --mode train");
    }
    if args.repeats == Some(0) || args.steps == Some(0) {
        bail!("--repeats and --steps must be > 0, as the overlap examples require");
    }
    if args.lr.is_some_and(|lr| !lr.is_finite()) {
        bail!("--lr must be finite");
    }
    if args.backend == Some(farskip_examples::BackendKind::Mpi) {
        bail!(
            "--backend mpi: the cpu-here prediction is of a LocalWorld run (ranks as threads of one process), \
             whose collectives the calibration measures; an MPI run's are not calibrated"
        );
    }
    Ok(())
}

/// Predicts a LocalWorld overlap experiment from op costs measured single-rank on this machine.
fn cpu_here(args: &Args, kind: ScheduleKind) -> Result<()> {
    let tokens = args
        .tokens
        .unwrap_or(if args.mode == Mode::Train { 512 } else { 256 });
    if args.world == 0 || tokens == 0 {
        bail!("--world and --tokens must be > 0");
    }
    if !(args.comm_ratio.is_finite() && args.comm_ratio >= 0.0) {
        bail!("--comm-ratio {} must be finite and >= 0", args.comm_ratio);
    }
    if args.mode == Mode::Decode {
        bail!("cpu-here predicts the overlap examples: --mode prefill or train");
    }
    let name = match (&args.model, &args.preset) {
        (Some(p), None) => p.display().to_string(),
        (None, Some(n)) => n.clone(),
        (None, None) => "small".to_string(),
        (Some(_), Some(_)) => bail!("give either --model or --preset, not both"),
    };
    let config = match &args.model {
        Some(p) => load_model_config(p)?,
        None => preset_config(&name)?,
    };
    let parallel = if args.mode == Mode::Train {
        Parallel::Expert
    } else {
        args.parallel
    };
    // --balance moves experts only where the examples move them: EP over more than one rank of an MoE model.
    let balance =
        args.balance && parallel == Parallel::Expert && args.world > 1 && config.moe.is_some();
    // A preset's calibration is of the model with these embeddings: the name says which (and a cache made
    // before the embeddings were part of it is not taken for one), and whether the experts were placed by load.
    let mut cache_name = if args.model.is_none() {
        format!("{name}-emb{}", args.embedding_std)
    } else {
        name.clone()
    };
    if balance {
        cache_name.push_str("-balanced");
    }
    // The overlap examples refuse a world they cannot split the model into; so does their prediction.
    check_world(args.world, parallel, &config)?;
    let tag = format!("{parallel:?}").to_lowercase();
    let mode = if args.mode == Mode::Train {
        "train"
    } else {
        "prefill"
    };
    let file = args.calibration_dir.join(format!(
        "{}-{mode}-{tag}-w{}-t{}.json",
        cache_name.replace(['/', '\\'], "_"),
        args.world,
        tokens
    ));
    let max_age = std::time::Duration::from_secs(args.calibration_max_age_s);
    let cached = if args.calibrate {
        None
    } else {
        Calibration::load(&file).ok()
    }
    .filter(|c| c.matches(&cache_name, args.mode, parallel, args.world, tokens))
    .filter(|c| match c.age() {
        Some(age) if age <= max_age => true,
        age => {
            let age = age.map_or("of unknown age".into(), |a| {
                format!("{:.1} s old", a.as_secs_f64())
            });
            eprintln!(
                "{} is {age} (--calibration-max-age-s {}): measuring again",
                file.display(),
                args.calibration_max_age_s
            );
            false
        }
    });
    let calibration = match cached {
        Some(c) => c,
        None => {
            let device = args.device.device()?;
            // The model the overlap examples run: a preset's embeddings drawn as theirs are.
            let model = OverlapModelArgs {
                model: args.model.clone(),
                preset: args.model.is_none().then(|| name.clone()),
                embedding_std: args.embedding_std,
                force: args.force,
            }
            .load(&device)?;
            let seed = if args.mode == Mode::Train {
                TRAINING_SEED
            } else {
                INFERENCE_SEED
            };
            let model = if balance {
                balanced_placement(&model, args.world, tokens, seed)?.apply(&model)?
            } else {
                model
            };
            eprintln!(
                "calibrating {name} ({mode}, {tag}, world {}, {} tokens) into {}",
                args.world,
                tokens,
                file.display()
            );
            let c = if args.mode == Mode::Train {
                measure_training(
                    &model,
                    &cache_name,
                    args.world,
                    tokens,
                    TRAINING_PASSES,
                    seed,
                )?
            } else {
                measure_inference(
                    &model,
                    &cache_name,
                    parallel,
                    args.world,
                    tokens,
                    INFERENCE_PASSES,
                    seed,
                )?
            };
            std::fs::create_dir_all(&args.calibration_dir)
                .with_context(|| format!("creating {}", args.calibration_dir.display()))?;
            if !c.rank_speed.is_empty() {
                let speeds: Vec<String> = c.rank_speed.iter().map(|s| format!("{s:.2}")).collect();
                eprintln!(
                    "each rank's op time on its core, over the median: {}",
                    speeds.join(", ")
                );
            }
            c.save(&file)?;
            c
        }
    };
    let split = match parallel {
        Parallel::Expert => farskip_dist::plan::Split::Expert,
        Parallel::Tensor => farskip_dist::plan::Split::Tensor,
    };
    let desc = schedule(
        &config,
        &Connectivity::farskip(),
        split,
        args.mode,
        ScheduleKind::FarSkip,
    );
    let costs = Measured::new(
        &calibration,
        &desc,
        config.layers.len(),
        split,
        args.comm_ratio,
    );
    // Ranks drift apart on this machine: average the figures over draws of each rank's op costs around the
    // measured medians (their spread measured too); the first draw's timeline is the one --svg draws.
    let draws = args.jitter_draws.max(1);
    let mut plans = Vec::with_capacity(draws);
    for seed in 0..draws {
        let jitter = (args.jitter_draws > 0).then_some(seed as u64);
        let costs = costs.clone().with_jitter(jitter);
        plans.push(predict(
            &config,
            &args.connectivity,
            split,
            args.mode,
            args.world,
            &costs,
        )?);
    }
    let predictions: Vec<_> = plans.iter().map(|p| p.prediction.clone()).collect();
    let mut plan = plans.swap_remove(0);
    // The examples report each figure's median over their repeats; so does the prediction over its draws.
    plan.prediction = Prediction::median(&predictions).context("no prediction")?;
    report(args, &plan, kind, config.layers.len(), "cpu-here")
}
