//! The FCSD recipe on the bundled corpus: train a small MoE teacher, convert it to FarSkip, recover it with
//! FCSD, SFT and KL + L2, and print the comparison.
//!
//! `cargo run --release -p farskip-examples --example recipe -- [--quick] [--corpus FILE] [--model DIR] [--world N] [--depth D] [--json]`
//!
//! `--world N` runs the recovery runs (FCSD, SFT, KL + L2) expert-parallel on N in-process ranks; the results
//! equal `--world 1` up to float rounding. With `--backend mpi` (built with `--features mpi`) each rank is a
//! process of `mpirun -np N`: every process runs the recipe, steps its own rank and gathers the experts for
//! evaluation; rank 0 prints and writes the report.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use farskip_dist::experiment::Backend;
use farskip_examples::{BackendArgs, exit_on_error, init_logging, tune_allocator};
use farskip_train::{RecipeConfig, run_recipe};

#[derive(Parser, Debug)]
#[command(about = "Train a MoE teacher, convert it to FarSkip, recover it with FCSD / SFT / KL+L2")]
struct Args {
    #[command(flatten)]
    device: farskip_examples::DeviceArgs,
    /// The ≈2-minute version (teacher 320 steps, each recovery run 96).
    #[arg(long)]
    quick: bool,
    /// Text corpus (default: the bundled Shakespeare).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/shakespeare.txt"))]
    corpus: PathBuf,
    /// Distil this Hugging Face checkpoint instead of training a teacher.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Override the number of recovery steps.
    #[arg(long)]
    recovery_steps: Option<usize>,
    /// Override the number of teacher steps.
    #[arg(long)]
    teacher_steps: Option<usize>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Expert-parallel ranks (threads of this process, or the processes of `mpirun -np` with --backend mpi) for
    /// the recovery runs; 1 is single-process training.
    /// The batch's sequences must divide by it and it may not exceed the experts per layer.
    #[arg(long, default_value_t = 1, value_parser = parse_world)]
    world: usize,
    #[command(flatten)]
    backend: BackendArgs,
    /// Skip depth of the student (FarSkip on all layers, `farskip-dD`): 1 is the paper's conversion, D ≥ 2 keeps
    /// each routed output in flight for D layers.
    #[arg(long, default_value_t = 1, value_parser = parse_depth)]
    depth: usize,
    /// Where recipe.md and loss_curves.svg go.
    #[arg(long, default_value = "report")]
    report_dir: PathBuf,
    /// Save the trained teacher here as a Hugging Face checkpoint (for sweep, distill and forward).
    #[arg(long)]
    save_teacher: Option<PathBuf>,
    /// Print the results as one JSON line at the end.
    #[arg(long)]
    json: bool,
}

fn parse_world(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("--world must be at least 1 (1 = single-process training)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!(
            "--world expects a whole number of ranks >= 1, got `{s}`: {e}"
        )),
    }
}

fn parse_depth(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("--depth must be at least 1 (1 = the paper's FarSkip)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!(
            "--depth expects a whole number of layers >= 1, got `{s}`: {e}"
        )),
    }
}

fn main() -> std::process::ExitCode {
    farskip_examples::exit_status(try_main())
}

fn try_main() -> Result<()> {
    init_logging();
    tune_allocator();
    let args = Args::parse();
    let backend = args.backend.start(args.world)?;
    let result = run(args, &backend);
    exit_on_error(&backend, result)
}

fn run(args: Args, backend: &Backend) -> Result<()> {
    let mut cfg = if args.quick {
        RecipeConfig::quick(&args.corpus)
    } else {
        RecipeConfig::full(&args.corpus)
    };
    cfg.model_dir = args.model;
    cfg.report_dir = args.report_dir;
    cfg.save_teacher = args.save_teacher;
    if let Some(s) = args.recovery_steps {
        cfg.recovery_steps = s;
    }
    if let Some(s) = args.teacher_steps {
        cfg.teacher_steps = s;
    }
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    cfg.world = args.world;
    cfg.depth = args.depth;
    #[cfg(feature = "mpi")]
    if let Backend::Mpi(mpi) = backend {
        // The recipe's three recovery runs start on three threads: their communicators are made here, in
        // one order on every process.
        farskip_train::ep::use_mpi(mpi.job(), &["fcsd", "sft", "kl_l2"])?;
        if mpi.rank() != 0 {
            // Every process runs the recipe; only rank 0 writes the report and the teacher.
            cfg.report_dir = std::env::temp_dir().join(format!(
                "farskip-recipe-rank{}-{}",
                mpi.rank(),
                std::process::id()
            ));
            cfg.save_teacher = None;
        }
    }
    let report = run_recipe(&cfg, &args.device.device()?);
    #[cfg(feature = "mpi")]
    farskip_train::ep::stop_mpi();
    let report = report?;
    if !backend.is_reporting_rank() {
        return Ok(());
    }
    println!("\n{}", report.table());
    if let Some(f) = report.recovered_fraction("fcsd") {
        println!(
            "FCSD recovers {:.1}% of the conversion's perplexity gap; report in {}",
            100.0 * f,
            cfg.report_dir.display()
        );
    }
    if args.json {
        println!("{}", report.json());
    }
    Ok(())
}
