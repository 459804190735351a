//! Prefill on an in-process multi-rank world three ways over the same link — standard connectivity with blocking
//! collectives, FarSkip (`--connectivity`, any skip depth) with the overlapped schedule, and two-micro-batch
//! overlap on the standard model — checked against the single-rank model, and how much communication each hides.
//!
//! `cargo run --release -p farskip-examples --example overlap_inference -- --world 2 --parallel ep \
//!     --preset small --tokens 256 --comm-ratio 1.0 --trace trace.json --svg timeline.svg --json`
//!
//! One process per rank under MPI (built with `--features mpi`; rank 0 prints and writes the files):
//! `mpirun -np 2 target/release/examples/overlap_inference --backend mpi --world 2 --parallel ep --json`

use anyhow::Result;
use clap::Parser;
use farskip_dist::experiment::{OverlapConfig, Parallel, overlap_inference_on};
use farskip_examples::{
    BackendArgs, OverlapModelArgs, OverlapOutputArgs, exit_on_error, init_logging, tune_allocator,
};

#[derive(Parser, Debug)]
#[command(
    about = "Measure how much expert/tensor-parallel communication the FarSkip schedule hides"
)]
struct Args {
    #[command(flatten)]
    device: farskip_examples::DeviceArgs,
    /// Ranks (threads of one process, or the processes of `mpirun -np` with --backend mpi).
    #[arg(long, default_value_t = 2)]
    world: usize,
    #[command(flatten)]
    backend: BackendArgs,
    /// ep (expert parallel) or tp (tensor parallel).
    #[arg(long, default_value = "ep")]
    parallel: Parallel,
    #[command(flatten)]
    model: OverlapModelArgs,
    /// Tokens per sequence (EP: one sequence per rank).
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    /// Collective time as a multiple of the compute the FarSkip schedule can hide it behind.
    #[arg(long, default_value_t = 1.0)]
    comm_ratio: f64,
    /// Repeats, each with a freshly calibrated link and FarSkip and the baseline timed back to back; each figure
    /// is its median over the repeats.
    #[arg(long, default_value_t = 7)]
    repeats: usize,
    /// --trace, --svg (of the step with the median wall time in training), --json.
    #[command(flatten)]
    out: OverlapOutputArgs,
    /// EP: place experts on ranks by their load on a calibration batch (farskip_dist::balance) instead of in
    /// contiguous blocks. Helps when expert popularity is stable (trained routers); a random-initialised
    /// router's loads change from batch to batch, so it is off by default.
    #[arg(long)]
    balance: bool,
    /// The overlapped run's connectivity: farskip (the paper's), farskip-dN (routed outputs in flight for N
    /// layers), optionally with a layer range. The link is calibrated on depth 1's windows whatever this is.
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
    let backend = args.backend.backend(args.world, args.parallel, &model)?;
    let result = run(&args, &model, &backend);
    exit_on_error(&backend, result)
}

fn run(
    args: &Args,
    model: &farskip_model::Model,
    backend: &farskip_dist::experiment::Backend,
) -> Result<()> {
    let cfg = OverlapConfig {
        world: args.world,
        parallel: args.parallel,
        comm_ratio: args.comm_ratio,
        tokens: args.tokens,
        repeats: args.repeats,
        seed: 1,
        balance: args.balance,
        connectivity: args.connectivity.clone(),
    };
    let report = overlap_inference_on(backend, model, &cfg)?;
    if !backend.is_reporting_rank() {
        return Ok(());
    }
    let title = format!(
        "{:?} world {} comm_ratio {}",
        args.parallel, args.world, args.comm_ratio
    );
    args.out
        .write(&title, &report.trace, &report.blocking_trace)?;
    if args.out.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{:?} world {} comm_ratio {}: blocking {:.1} ms, {} {:.1} ms ({:.2}x), overlap {:.1}% (blocking {:.1}%), \
             two-micro-batch {:.1} ms (overlap {:.1}%), farskip+tbo {:.1} ms (overlap {:.1}%), compute bound {:.1} ms, \
             exposed comm {:.1} ms (waiting for a \
             later peer {:.1} ms), max |diff| {:.2e}",
            report.parallel,
            report.world,
            report.comm_ratio,
            report.blocking_ms,
            report.connectivity,
            report.farskip_ms,
            report.speedup,
            report.overlap_pct,
            report.blocking_overlap_pct,
            report.tbo_ms,
            report.tbo_overlap_pct,
            report.farskip_tbo_ms,
            report.farskip_tbo_overlap_pct,
            report.compute_ms,
            report.exposed_ms,
            report.peer_wait_ms,
            report.max_abs_diff
        );
    }
    Ok(())
}
