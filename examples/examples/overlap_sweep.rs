//! Sweeps `comm_ratio` for expert and tensor parallelism and plots where overlap stops being possible:
//! overlap %, speedup over the blocking baseline, and FarSkip wall time over the compute-only bound.
//!
//! `cargo run --release -p farskip-examples --example overlap_sweep -- --preset small --tokens 256 --out sweep.svg`

use std::path::PathBuf;

use anyhow::Result;
use burn::prelude::*;
use clap::Parser;
use farskip_dist::experiment::{OverlapConfig, Parallel, overlap_inference};
use farskip_examples::{OverlapModelArgs, init_logging, tune_allocator};
use farskip_train::plot::line_chart_svg;

#[derive(Parser, Debug)]
#[command(about = "Overlap and speedup of the FarSkip schedule as communication gets slower")]
struct Args {
    /// Ranks.
    #[arg(long, default_value_t = 2)]
    world: usize,
    #[command(flatten)]
    model: OverlapModelArgs,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    /// comm_ratio values.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,1,2,4")]
    ratios: Vec<f64>,
    /// Where the SVG goes.
    #[arg(long, default_value = "overlap_sweep.svg")]
    out: PathBuf,
}

fn main() -> std::process::ExitCode {
    farskip_examples::exit_status(try_main())
}

fn try_main() -> Result<()> {
    init_logging();
    tune_allocator();
    let args = Args::parse();
    let device = Device::default();
    let model = args.model.load(&device)?;
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for parallel in [Parallel::Expert, Parallel::Tensor] {
        let (mut overlap, mut speedup) = (Vec::new(), Vec::new());
        for &r in &args.ratios {
            let cfg = OverlapConfig {
                world: args.world,
                parallel,
                comm_ratio: r,
                tokens: args.tokens,
                repeats: 3,
                seed: 1,
                balance: false,
                connectivity: farskip_model::Connectivity::farskip(),
            };
            let rep = overlap_inference(&model, &cfg)?;
            println!("{}", serde_json::to_string(&rep)?);
            overlap.push((r, rep.overlap_pct / 100.0));
            speedup.push((r, rep.speedup));
        }
        let name = if parallel == Parallel::Expert {
            "EP"
        } else {
            "TP"
        };
        series.push((format!("{name} overlap (fraction)"), overlap));
        series.push((format!("{name} speedup vs blocking"), speedup));
    }
    line_chart_svg(
        &args.out,
        "FarSkip overlap vs comm_ratio",
        ("comm_ratio (collective time / overlap window)", "value"),
        &series,
    )?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
