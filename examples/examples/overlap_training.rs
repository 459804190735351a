//! Expert-parallel training on an in-process world: standard connectivity with blocking collectives against
//! FarSkip with forward and backward communication overlapped, checked against single-rank training.
//!
//! `cargo run --release -p farskip-examples --example overlap_training -- --world 2 --preset small \
//!     --steps 3 --comm-ratio 1.0 --trace train.json --svg train.svg --json`
//!
//! One process per rank under MPI (built with `--features mpi`; rank 0 prints and writes the files):
//! `mpirun -np 2 target/release/examples/overlap_training --backend mpi --world 2 --steps 3 --json`

use anyhow::Result;
use clap::Parser;
use farskip_dist::experiment::{Backend, Parallel, TrainingConfig, overlap_training_on};
use farskip_examples::{
    BackendArgs, OverlapModelArgs, OverlapOutputArgs, exit_on_error, init_logging, tune_allocator,
};

#[derive(Parser, Debug)]
#[command(
    about = "Measure forward/backward communication overlap of expert-parallel FarSkip training"
)]
struct Args {
    #[command(flatten)]
    device: farskip_examples::DeviceArgs,
    /// Ranks (threads of one process, or the processes of `mpirun -np` with --backend mpi).
    #[arg(long, default_value_t = 2)]
    world: usize,
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    model: OverlapModelArgs,
    /// Optimizer steps.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Tokens per rank per step, as two sequences of half the length (two-micro-batch overlap runs one while
    /// the other's collectives are in flight; every schedule trains the same windows). 512, as in the
    /// benchmark config: with fewer the ranks' expert loads differ more from layer to layer (sampling noise of
    /// the routing), and the rank that waits for a late peer cannot hide its collective.
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// Repeats: each calibrates the link afresh and trains FarSkip, the blocking baseline and two-micro-batch
    /// overlap back to back; each schedule reports its repeat with the median step.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Collective time as a multiple of the compute the FarSkip schedule hides it behind.
    #[arg(long, default_value_t = 1.0)]
    comm_ratio: f64,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// --trace, --svg (of the step with the median wall time in training), --json.
    #[command(flatten)]
    out: OverlapOutputArgs,
    /// Place experts on ranks by their load on a calibration batch (farskip_dist::balance) instead of in
    /// contiguous blocks. Helps when expert popularity is stable (trained routers); a random-initialised
    /// router's loads change from batch to batch, so it is off by default.
    #[arg(long)]
    balance: bool,
    /// The overlapped run's connectivity: farskip (the paper's) or farskip-dN (all layers, routed outputs in
    /// flight for N layers). The link is calibrated on depth 1's windows whatever this is.
    #[arg(long, default_value = "farskip")]
    connectivity: farskip_model::Connectivity,
}

fn main() -> std::process::ExitCode {
    farskip_examples::exit_status(try_main())
}

fn try_main() -> Result<()> {
    init_logging();
    tune_allocator();
    let args = Args::parse();
    let device = args.device.device()?;
    let model = args.model.load(&device)?;
    let backend = args.backend.backend(args.world, Parallel::Expert, &model)?;
    let result = run(&args, &model, &backend);
    exit_on_error(&backend, result)
}

fn run(args: &Args, model: &farskip_model::Model, backend: &Backend) -> Result<()> {
    let cfg = TrainingConfig {
        world: args.world,
        steps: args.steps,
        comm_ratio: args.comm_ratio,
        tokens: args.tokens,
        repeats: args.repeats,
        lr: args.lr,
        seed: 3,
        balance: args.balance,
        connectivity: args.connectivity.clone(),
    };
    let report = overlap_training_on(backend, model, &cfg)?;
    if !backend.is_reporting_rank() {
        return Ok(());
    }
    let title = format!(
        "EP training step, world {} comm_ratio {}",
        args.world, args.comm_ratio
    );
    args.out
        .write(&title, &report.trace, &report.blocking_trace)?;
    if args.out.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "world {} comm_ratio {}: blocking {:.1} ms/step, FarSkip {:.1} ms/step ({:.2}x), two-micro-batch {:.1} ms/step \
             (overlap {:.1}%), FarSkip overlap fwd {:.1}% bwd {:.1}%, \
             exposed comm fwd {:.1} / bwd {:.1} ms (waiting for a later peer {:.1} / {:.1} ms), compute {:.1} ms, \
             loss diff {:.2e}, grad rel diff {:.2e}",
            report.world,
            report.comm_ratio,
            report.blocking_step_ms,
            report.farskip_step_ms,
            report.speedup,
            report.tbo_step_ms,
            report.tbo_overlap_pct,
            report.fwd_overlap_pct,
            report.bwd_overlap_pct,
            report.fwd_exposed_ms,
            report.bwd_exposed_ms,
            report.fwd_peer_wait_ms,
            report.bwd_peer_wait_ms,
            report.compute_step_ms,
            report.loss_max_abs_diff,
            report.grad_max_rel_diff
        );
    }
    Ok(())
}
