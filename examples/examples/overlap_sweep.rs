//! Sweeps `comm_ratio` for expert and tensor parallelism and plots, in two panels, the overlap and the speedup over
//! the blocking baseline of FarSkip at skip depth 1, 2 and 3, of two-micro-batch overlap (TBO) and of both at once
//! (`farskip+tbo`, depth 1), all over the
//! same link (each collective lasts `comm_ratio ×` its depth-1 FarSkip window), with what perfect hiding would give
//! as dashed lines.
//!
//! `cargo run --release -p farskip-examples --example overlap_sweep -- --preset small --tokens 256 --out sweep.svg`

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use farskip_dist::experiment::{OverlapConfig, Parallel, overlap_inference};
use farskip_examples::{OverlapModelArgs, init_logging, tune_allocator};
use farskip_model::Connectivity;
use farskip_train::plot::{Line, Panel, Stroke, panels_svg};

#[derive(Parser, Debug)]
#[command(
    about = "Overlap and speedup of FarSkip (depth 1, 2, 3) and two-micro-batch overlap as communication gets slower"
)]
struct Args {
    #[command(flatten)]
    device: farskip_examples::DeviceArgs,
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
    /// Skip depths of the FarSkip runs.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    depths: Vec<usize>,
    /// Repeats per setting (each with a freshly calibrated link; medians reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
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
    let device = args.device.device()?;
    let model = args.model.load(&device)?;
    let (mut overlap, mut speedup) = (Vec::new(), Vec::new());
    for (p, parallel) in [Parallel::Expert, Parallel::Tensor].into_iter().enumerate() {
        let name = if parallel == Parallel::Expert {
            "EP"
        } else {
            "TP"
        };
        let colour = |i: usize| p * (args.depths.len() + 3) + i;
        let mut depth_points = vec![(Vec::new(), Vec::new()); args.depths.len()];
        let (mut tbo_overlap, mut tbo_speedup, mut bound) = (Vec::new(), Vec::new(), Vec::new());
        let (mut fs_tbo_overlap, mut fs_tbo_speedup) = (Vec::new(), Vec::new());
        for &r in &args.ratios {
            for (d, &depth) in args.depths.iter().enumerate() {
                let connectivity: Connectivity = format!("farskip-d{depth}").parse()?;
                let cfg = OverlapConfig {
                    world: args.world,
                    parallel,
                    comm_ratio: r,
                    tokens: args.tokens,
                    repeats: args.repeats,
                    seed: 1,
                    balance: false,
                    connectivity,
                };
                let rep = overlap_inference(&model, &cfg)?;
                println!("{}", serde_json::to_string(&rep)?);
                depth_points[d].0.push((r, rep.overlap_pct));
                depth_points[d].1.push((r, rep.speedup));
                if d == 0 {
                    // TBO and the bound come from the first depth's repeats (the same link and machine speed).
                    tbo_overlap.push((r, rep.tbo_overlap_pct));
                    tbo_speedup.push((r, rep.blocking_ms / rep.tbo_ms));
                    fs_tbo_overlap.push((r, rep.farskip_tbo_overlap_pct));
                    fs_tbo_speedup.push((r, rep.blocking_ms / rep.farskip_tbo_ms));
                    bound.push((r, rep.blocking_ms / rep.compute_ms));
                }
            }
        }
        for (d, (o, s)) in depth_points.into_iter().enumerate() {
            let label = format!("{name} FarSkip d={}", args.depths[d]);
            overlap.push(line(&label, o, Stroke::Solid, colour(d)));
            speedup.push(line(&label, s, Stroke::Solid, colour(d)));
        }
        let t = colour(args.depths.len());
        overlap.push(line(&format!("{name} TBO"), tbo_overlap, Stroke::Solid, t));
        speedup.push(line(&format!("{name} TBO"), tbo_speedup, Stroke::Solid, t));
        let ft = colour(args.depths.len() + 1);
        overlap.push(line(
            &format!("{name} farskip+tbo"),
            fs_tbo_overlap,
            Stroke::Solid,
            ft,
        ));
        speedup.push(line(
            &format!("{name} farskip+tbo"),
            fs_tbo_speedup,
            Stroke::Solid,
            ft,
        ));
        speedup.push(line(
            &format!("{name} bound: blocking / compute"),
            bound,
            Stroke::Dashed,
            colour(args.depths.len() + 2),
        ));
    }
    // With every collective lasting R x its depth-1 window, depth 1 can hide at most 1/R of it.
    let depth1_bound = args
        .ratios
        .iter()
        .map(|&r| (r, 100f64.min(100.0 / r)))
        .collect();
    overlap.push(line(
        "bound for depth 1: min(100, 100/R)",
        depth1_bound,
        Stroke::Dashed,
        12,
    ));
    let x = "comm_ratio (collective time / depth-1 overlap window)";
    panels_svg(
        &args.out,
        &format!("{} ranks, {} tokens per rank", args.world, args.tokens),
        &[
            Panel {
                title: "overlap (% of comm hidden)".into(),
                x_desc: x.into(),
                y_desc: "overlap %".into(),
                lines: overlap,
            },
            Panel {
                title: "speedup over blocking".into(),
                x_desc: x.into(),
                y_desc: "blocking wall / wall".into(),
                lines: speedup,
            },
        ],
    )?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn line(name: &str, points: Vec<(f64, f64)>, stroke: Stroke, colour: usize) -> Line {
    Line {
        name: name.to_owned(),
        points,
        stroke,
        colour,
    }
}
