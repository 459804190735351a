//! Logits (and optionally greedy ids) of a Hugging Face MoE checkpoint under a chosen connectivity.
//!
//! `cargo run --release -p farskip-examples --example forward -- --model DIR --input ids.safetensors \
//!     --connectivity farskip:1..=3 --out out.safetensors --generate 8 --prompt-len 8 --json`
//!
//! `cargo run --release -p farskip-examples --example forward -- --model DIR --prompt "text" --generate 20`
//! prints the decoded continuation (the checkpoint needs a tokenizer.json). Without --connectivity the model
//! runs as its config.json records.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use clap::Parser;
use farskip_examples::{
    exit_status, init_logging, load_model_as, random_ids, read_ids, tune_allocator, write_tensors,
};
use farskip_model::checkpoint::TensorWriter;
use farskip_model::{Connectivity, MemoryCheck};
use farskip_train::data::HfTokenizer;

#[derive(Parser, Debug)]
#[command(about = "Forward pass and greedy generation with standard or FarSkip connectivity")]
struct Args {
    #[command(flatten)]
    device: farskip_examples::DeviceArgs,
    /// Hugging Face checkpoint directory (config.json + model.safetensors).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A preset with random weights instead of --model (small = the benchmark config).
    #[arg(long)]
    preset: Option<String>,
    /// safetensors file with `input_ids` (int64 [batch, seq]); random ids when absent.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Text input, tokenized with the checkpoint's tokenizer.json (with --generate: prints the continuation).
    #[arg(long, conflicts_with = "input")]
    prompt: Option<String>,
    /// Random input: batch size.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Random input: sequence length.
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// standard | farskip | farskip-dN (skip depth N) | farskip-attn-only | farskip-mlp-only, optionally
    /// :START..=END or :START..END.
    /// Default: the checkpoint's own (config.json's FarSkip keys), standard for a preset.
    #[arg(long)]
    connectivity: Option<Connectivity>,
    /// Where to write `logits` (and `greedy_ids`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Generate this many tokens greedily after the first --prompt-len tokens of each row.
    #[arg(long)]
    generate: Option<usize>,
    /// Prompt length for --generate (default: the whole input).
    #[arg(long)]
    prompt_len: Option<usize>,
    /// Print one JSON line with shapes and timing.
    #[arg(long)]
    json: bool,
    /// Load a checkpoint even when it needs more memory than is available (a warning instead of an error).
    #[arg(long)]
    force: bool,
    /// Weight dtype in memory: f32 or bf16 (bf16 keeps projection, expert, embedding and head weights bf16;
    /// products accumulate in f32). Default: the checkpoint's own.
    #[arg(long)]
    dtype: Option<farskip_model::hf::WeightDtype>,
}

fn main() -> ExitCode {
    exit_status(run())
}

fn run() -> Result<()> {
    init_logging();
    tune_allocator();
    let args = Args::parse();
    // Inference only: independent work runs side by side on single-threaded lanes.
    farskip_model::lanes::set_enabled(true);
    let device = args.device.device()?;
    let memory = if args.force {
        MemoryCheck::Warn
    } else {
        MemoryCheck::Refuse
    };
    let load_start = Instant::now();
    let mut model = load_model_as(
        args.model.as_deref(),
        args.preset.as_deref(),
        &device,
        memory,
        args.dtype,
    )?;
    let load_ms = load_start.elapsed().as_secs_f64() * 1e3;
    if let Some(c) = &args.connectivity {
        model = model.with_connectivity(c.clone())?;
    }
    let connectivity = model.connectivity().to_string();
    let tokenizer = match (&args.prompt, &args.model) {
        (Some(_), Some(dir)) => {
            let path = dir.join("tokenizer.json");
            anyhow::ensure!(
                path.is_file(),
                "--prompt needs {} (the checkpoint has no tokenizer)",
                path.display()
            );
            Some(HfTokenizer::from_file(&path)?)
        }
        (Some(_), None) => bail!("--prompt needs --model DIR with a tokenizer.json"),
        (None, _) => None,
    };
    let input = match (&args.input, &args.prompt, &tokenizer) {
        (Some(p), _, _) => read_ids(p, "input_ids", &device)?,
        (None, Some(text), Some(tok)) => {
            let ids: Vec<i64> = tok.encode(text)?.into_iter().map(i64::from).collect();
            anyhow::ensure!(!ids.is_empty(), "--prompt {text:?} encodes to no tokens");
            let n = ids.len();
            Tensor::from_data(TensorData::new(ids, [1, n]), &device)
        }
        _ => random_ids(
            args.batch,
            args.tokens,
            model.config().vocab_size,
            1,
            &device,
        ),
    };
    let [batch, seq] = input.dims();
    model.check_input(&input)?;

    // One warm-up pass so the timing below is steady-state.
    let _ = model.forward_unchecked(input.clone().narrow(1, 0, seq.min(8)), None);
    let start = Instant::now();
    let (logits, host_reads) =
        farskip_model::host_reads::count(|| model.forward_unchecked(input.clone(), None));
    let vocab = logits.dims()[2];
    let logits_data = logits.into_data();
    let forward_s = start.elapsed().as_secs_f64();

    let mut writer = TensorWriter::default();
    writer.f32_any("logits", vec![batch, seq, vocab], logits_data);
    let mut gen_s = None;
    let mut continuation = None;
    if let Some(n) = args.generate {
        let p = args.prompt_len.unwrap_or(seq);
        if p == 0 || p > seq {
            bail!("--prompt-len {p} must be in 1..={seq}");
        }
        let start = Instant::now();
        let g = model
            .generate(input.clone().narrow(1, 0, p), n)
            .context("greedy generation")?;
        let ids: Vec<i64> = g
            .ids
            .into_data()
            .try_into_vec_as::<i64>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        gen_s = Some(start.elapsed().as_secs_f64());
        writer.i64("greedy_ids", vec![batch, p + n], &ids);
        if let Some(tok) = &tokenizer {
            let new: Vec<u32> = ids[p..].iter().map(|&i| i as u32).collect();
            continuation = Some(tok.decode(&new)?);
        }
    }
    if let Some(out) = &args.out {
        write_tensors(out, &writer)?;
    }
    let tokens = (batch * seq) as f64;
    if args.json {
        let mut j = serde_json::json!({
            "connectivity": connectivity,
            "batch": batch, "seq": seq, "vocab": vocab,
            "logits_shape": [batch, seq, vocab],
            "forward_ms": forward_s * 1e3,
            "tokens_per_s": tokens / forward_s,
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "device": args.device.name()?.to_string(),
            "host_reads": host_reads,
            "load_ms": load_ms,
            "peak_rss_mb": farskip_examples::peak_rss_mb(),
            "moe_layers": model.layers.iter().filter(|l| matches!(l.ffn, farskip_model::Ffn::Moe(_))).count(),
        });
        if let (Some(s), Some(n)) = (gen_s, args.generate) {
            j["generate_ms"] = serde_json::json!(s * 1e3);
            j["generated_tokens_per_s"] = serde_json::json!((batch * n) as f64 / s);
        }
        if let Some(text) = &continuation {
            j["continuation"] = serde_json::json!(text);
        }
        println!("{j}");
    } else {
        if let Some(text) = &continuation {
            println!("{text}");
        }
        eprintln!(
            "{connectivity} [{batch}, {seq}] -> logits [{batch}, {seq}, {vocab}] in {:.1} ms ({:.0} tokens/s)",
            forward_s * 1e3,
            tokens / forward_s
        );
    }
    Ok(())
}
