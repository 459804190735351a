//! The conversion sweep: FarSkip on 0, 25, 50, 75 and 100 % of the layers, counted from the first layer and from
//! the last, without training; perplexity, top-1 agreement and KL against the standard model for each.
//!
//! `cargo run --release -p farskip-examples --example sweep -- --model DIR --corpus FILE [--json] [--svg FILE]`

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use farskip_examples::{init_logging, tune_allocator};
use farskip_model::Model;
use farskip_train::distill::corpus_tokens;
use farskip_train::sweep::{run_sweep, sweep_windows};

#[derive(Parser, Debug)]
#[command(
    about = "Convert a share of the layers to FarSkip (from the first or the last) and measure the damage"
)]
struct Args {
    #[command(flatten)]
    device: farskip_examples::DeviceArgs,
    /// Hugging Face checkpoint directory (tokenizer.json is used when present, bytes otherwise).
    #[arg(long)]
    model: PathBuf,
    /// Text corpus to measure on (its last --windows windows of --seq-len tokens).
    #[arg(long)]
    corpus: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Windows measured.
    #[arg(long, default_value_t = 64)]
    windows: usize,
    /// Write the plot (agreement against the share converted, from the start and from the end).
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Print one JSON line instead of the table.
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
    farskip_model::lanes::set_enabled(true);
    let device = args.device.device()?;
    let model = Model::from_pretrained(&args.model, &device)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let (tokens, vocab) = corpus_tokens(Some(&args.model), &args.corpus)?;
    anyhow::ensure!(
        vocab <= model.config().vocab_size,
        "the corpus needs a vocabulary of {vocab} but {} has {}",
        args.model.display(),
        model.config().vocab_size
    );
    let windows = sweep_windows(tokens, args.seq_len, args.windows)?;
    let report = run_sweep(&model, &windows, &device)?;
    if let Some(p) = &args.svg {
        let title = format!(
            "{}: FarSkip on a share of the layers, no training",
            args.model
                .file_name()
                .map_or("model".into(), |n| n.to_string_lossy())
        );
        report
            .svg(p, &title)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if args.json {
        println!("{}", report.json());
    } else {
        println!("{}", report.table());
    }
    Ok(())
}
