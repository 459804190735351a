//! Distil your own checkpoint: convert an HF MoE checkpoint to FarSkip, recover it with FCSD on a corpus, and
//! save it as an HF checkpoint that reloads as FarSkip (weights in the checkpoint's dtype, config.json with the
//! FarSkip keys, the tokenizer files, report.md and the loss curve).
//!
//! `cargo run --release -p farskip-examples --example distill -- --model DIR --corpus FILE \
//!     --connectivity farskip --out OUT_DIR [--steps N] [--force] [--json]`

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use farskip_examples::{init_logging, tune_allocator};
use farskip_model::Connectivity;
use farskip_train::{DistillConfig, run_distill};

#[derive(Parser, Debug)]
#[command(
    about = "Convert an HF MoE checkpoint to FarSkip, recover it with FCSD and save it as an HF checkpoint"
)]
struct Args {
    #[command(flatten)]
    device: farskip_examples::DeviceArgs,
    /// Hugging Face checkpoint directory (config.json + safetensors; tokenizer.json is used when present,
    /// bytes otherwise).
    #[arg(long)]
    model: PathBuf,
    /// Text corpus; its last 5 % is held out for choosing the checkpoint and for the reported numbers.
    #[arg(long)]
    corpus: PathBuf,
    /// The student: farskip | farskip-attn-only | farskip-mlp-only, optionally :START..=END.
    #[arg(long, default_value = "farskip")]
    connectivity: Connectivity,
    /// Where the distilled checkpoint goes (must be empty or absent unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Replace a non-empty --out.
    #[arg(long)]
    force: bool,
    /// Recovery steps (early stopping may end sooner).
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Tokens per batch.
    #[arg(long, default_value_t = 2048)]
    tokens_per_batch: usize,
    /// Seed of the batch order.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Print the results as one JSON line.
    #[arg(long)]
    json: bool,
}

fn main() -> std::process::ExitCode {
    farskip_examples::exit_status(try_main())
}

fn try_main() -> Result<()> {
    init_logging();
    tune_allocator();
    let args = Args::parse();
    let mut cfg = DistillConfig::new(&args.model, &args.corpus, args.connectivity, &args.out);
    cfg.force = args.force;
    cfg.steps = args.steps;
    cfg.lr = args.lr;
    cfg.seq_len = args.seq_len;
    cfg.tokens_per_batch = args.tokens_per_batch;
    cfg.seed = args.seed;
    let (report, _) = run_distill(&cfg, &args.device.device()?)
        .with_context(|| format!("distilling {}", args.model.display()))?;
    if args.json {
        println!("{}", report.json());
    } else {
        println!("\n{}", report.table());
        println!(
            "saved {} ({}, {} steps) to {}",
            args.model.display(),
            report.connectivity,
            report.steps,
            args.out.display()
        );
    }
    Ok(())
}
