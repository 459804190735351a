//! CPU throughput of the forward pass and of one training step, plus a per-part breakdown of the forward.
//!
//! `cargo run --release -p farskip-examples --example bench -- --preset small --tokens 512 --json`
//!
//! The end-to-end passes run without extra syncs. The breakdown pass re-runs the forward layer by layer from the
//! model's public sub-steps and reads a tiny slice back after each part, so each part's time is its own. Wall
//! times are medians; `*_cpu_ms` is the mean CPU time of all threads (steadier than wall time on a busy machine).
//! `threads` is `RAYON_NUM_THREADS` if set, else the cores available (flex uses rayon's global pool). The forward
//! runs on `farskip_model::lanes` unless `--lanes false`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, ensure};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use clap::Parser;
use farskip_examples::{init_logging, load_model_as, random_ids, tune_allocator};
use farskip_model::config::WeightOn;
use farskip_model::hf::WeightDtype;
use farskip_model::moe::{SlotPlan, index_tensor};
use farskip_model::{Connectivity, Ffn, KvCache, MemoryCheck, Model};
use farskip_train::losses::cross_entropy;
use farskip_train::optim::FusedAdamWConfig;

#[derive(Parser, Debug)]
#[command(about = "Forward and training-step throughput with a per-part forward breakdown")]
struct Args {
    #[command(flatten)]
    device: farskip_examples::DeviceArgs,
    /// Hugging Face checkpoint directory (config.json + model.safetensors).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A preset with random weights instead of --model (small = the benchmark config).
    #[arg(long)]
    preset: Option<String>,
    /// Tokens per pass (batch 1).
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// standard | farskip | farskip-attn-only | farskip-mlp-only, optionally :START..=END or :START..END.
    #[arg(long, default_value = "standard")]
    connectivity: Connectivity,
    /// Timed runs of each measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Untimed warm-up runs before each measurement (the first also initialises lazily created weights).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Skip the training step.
    #[arg(long)]
    no_train: bool,
    /// Also time greedy decoding of this many tokens (batch 1, KV cache, after a prompt of 16 tokens):
    /// `decode_tok_s` in the JSON, and `decode_breakdown_us` (one more pass over the steps, part by part: per step,
    /// attention, MoE block, norms and residuals, LM head and argmax). 0 = skip.
    #[arg(long, default_value_t = 0)]
    decode: usize,
    /// Run the forward's independent work side by side on single-threaded lanes (`farskip_model::lanes`); the
    /// training step never uses them.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    lanes: bool,
    /// The training step's optimizer: `fused` (farskip-train's one-pass CPU AdamW) or `burn` (burn's AdamW).
    #[arg(long, value_enum, default_value_t = OptimizerKind::Fused)]
    optimizer: OptimizerKind,
    /// Print one JSON line.
    #[arg(long)]
    json: bool,
    /// Load a checkpoint even when it needs more memory than is available (a warning instead of an error).
    #[arg(long)]
    force: bool,
    /// Weight dtype of the forward and decode: f32 or bf16 (default: the checkpoint's own). The training step
    /// always runs in f32.
    #[arg(long)]
    dtype: Option<WeightDtype>,
}

impl Args {
    fn memory_check(&self) -> MemoryCheck {
        if self.force {
            MemoryCheck::Warn
        } else {
            MemoryCheck::Refuse
        }
    }
}

/// Which AdamW the training step uses.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum OptimizerKind {
    /// `farskip_train::optim::FusedAdamW`.
    Fused,
    /// `burn::optim::AdamW`.
    Burn,
}

/// The forward's parts, as the breakdown times them.
const PARTS: [&str; 6] = [
    "attention",
    "router",
    "dispatch",
    "experts",
    "combine",
    "norm_other",
];

fn main() -> std::process::ExitCode {
    farskip_examples::exit_status(try_main())
}

fn try_main() -> Result<()> {
    init_logging();
    tune_allocator();
    let args = Args::parse();
    ensure!(args.runs > 0, "--runs must be at least 1");
    farskip_model::lanes::set_enabled(args.lanes);
    let device = args.device.device()?;
    let model = load_model_as(
        args.model.as_deref(),
        args.preset.as_deref(),
        &device,
        args.memory_check(),
        args.dtype,
    )?
    .with_connectivity(args.connectivity.clone())?;
    let vocab = model.config().vocab_size;
    let ids = random_ids(1, args.tokens + 1, vocab, 1, &device);
    let input = ids.clone().narrow(1, 0, args.tokens);
    model.check_input(&ids)?;

    let (forward_ms, forward_cpu_ms) = measure(args.warmup, args.runs, || {
        let logits = model.forward_unchecked(input.clone(), None);
        sync(&logits);
    });

    let mut parts = Vec::with_capacity(args.runs);
    for _ in 0..args.warmup {
        breakdown(&model, input.clone());
    }
    for _ in 0..args.runs {
        parts.push(breakdown(&model, input.clone()));
    }
    let part_ms: Vec<f64> = (0..PARTS.len())
        .map(|i| median(parts.iter().map(|p| p[i]).collect()))
        .collect();

    let prompt = ids.clone().narrow(1, 0, DECODE_PROMPT.min(args.tokens));
    let decode_ms = (args.decode > 0).then(|| {
        for _ in 0..args.warmup.min(1) {
            decode_ms(&model, prompt.clone(), args.decode);
        }
        median(
            (0..args.runs.min(3))
                .map(|_| decode_ms(&model, prompt.clone(), args.decode))
                .collect(),
        )
    });
    let decode_parts = (args.decode > 0).then(|| decode_breakdown(&model, prompt, args.decode));

    let (train, train_cpu_ms) = match args.no_train {
        true => (None, None),
        false => {
            // Lanes are for inference only (see `farskip_model::lanes`).
            farskip_model::lanes::set_enabled(false);
            let (t, cpu) = train_step_ms(&args, ids.clone())?;
            (Some(t), cpu)
        }
    };

    let tokens = args.tokens as f64;
    let tok_s = |ms: f64| tokens / (ms / 1e3);
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
    let breakdown_json: serde_json::Map<String, serde_json::Value> = PARTS
        .iter()
        .zip(&part_ms)
        .map(|(name, ms)| (name.to_string(), serde_json::json!(round(*ms))))
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "connectivity": args.connectivity.to_string(),
                "tokens": args.tokens,
                "threads": threads,
                "lanes": args.lanes,
                "runs": args.runs,
                "forward_ms": round(forward_ms),
                "forward_tok_s": round(tok_s(forward_ms)),
                "forward_cpu_ms": forward_cpu_ms.map(round),
                "train_ms": train.map(|t| round(t[0])),
                "train_cpu_ms": train_cpu_ms.map(round),
                "train_tok_s": train.map(|t| round(tok_s(t[0]))),
                "train_breakdown_ms": train.map(|t| serde_json::json!({
                    "forward": round(t[1]), "backward": round(t[2]), "optimizer": round(t[3]),
                })),
                "breakdown_ms": breakdown_json,
                "breakdown_total_ms": round(part_ms.iter().sum()),
                "dtype": args.dtype.map(|d| format!("{d:?}").to_lowercase()),
                "decode_tokens": args.decode,
                "decode_ms": decode_ms.map(round),
                "decode_tok_s": decode_ms.map(|ms| round(args.decode as f64 / (ms / 1e3))),
                "decode_breakdown_us": decode_parts.map(|p| {
                    let us = |i: usize| round(p[i] * 1e3 / args.decode as f64);
                    serde_json::json!({
                        "attention": us(0), "moe": us(1), "norm_other": us(2), "head": us(3)
                    })
                }),
                "peak_rss_mb": farskip_examples::peak_rss_mb().map(round),
            })
        );
    } else {
        eprintln!(
            "{} tokens, {threads} threads: forward {forward_ms:.1} ms ({:.0} tok/s)",
            args.tokens,
            tok_s(forward_ms)
        );
        if let Some([ms, f, b, o]) = train {
            eprintln!(
                "train step {ms:.1} ms ({:.0} tok/s): forward {f:.1}, backward {b:.1}, AdamW {o:.1} ms",
                tok_s(ms)
            );
        }
        for (name, ms) in PARTS.iter().zip(&part_ms) {
            eprintln!("  {name:<10} {ms:8.1} ms");
        }
        if let Some(ms) = decode_ms {
            eprintln!(
                "decode {} tokens {ms:.1} ms ({:.0} tok/s)",
                args.decode,
                args.decode as f64 / (ms / 1e3)
            );
        }
        if let Some(p) = decode_parts {
            let us = |i: usize| p[i] * 1e3 / args.decode as f64;
            eprintln!(
                "decode step, part by part (us): attention {:.0}, moe {:.0}, norm/other {:.0}, head {:.0}",
                us(0),
                us(1),
                us(2),
                us(3)
            );
        }
    }
    Ok(())
}

/// One training step (forward, next-token cross-entropy, backward, AdamW): the median of the whole step and of
/// its three phases (each phase ends with a host read, which flex makes free).
fn train_step_ms(args: &Args, ids: Tensor<2, Int>) -> Result<([f64; 4], Option<f64>)> {
    let device = args.device.device()?.autodiff();
    let mut model = Some(
        load_model_as(
            args.model.as_deref(),
            args.preset.as_deref(),
            &device,
            args.memory_check(),
            Some(WeightDtype::F32),
        )?
        .with_connectivity(args.connectivity.clone())?,
    );
    let ids = Tensor::<2, Int>::from_data(ids.into_data(), &device);
    let input = ids.clone().narrow(1, 0, args.tokens);
    let target = ids.narrow(1, 1, args.tokens);
    let mut optim = match args.optimizer {
        OptimizerKind::Fused => FusedAdamWConfig::new().init(),
        OptimizerKind::Burn => AdamWConfig::new().init(),
    };
    let mut phases: Vec<[f64; 4]> = Vec::with_capacity(args.runs);
    let mut cpu_start = None;
    for run in 0..args.warmup + args.runs {
        if run == args.warmup {
            cpu_start = cpu_ms();
        }
        let m = model.take().expect("model is put back after every step");
        let start = Instant::now();
        let loss = cross_entropy(m.forward_unchecked(input.clone(), None), target.clone());
        sync(&loss);
        let forward = start.elapsed();
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        let backward = start.elapsed();
        model = Some(optim.step(1e-4, m, grads));
        let step = start.elapsed();
        if run >= args.warmup {
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            phases.push([
                ms(step),
                ms(forward),
                ms(backward - forward),
                ms(step - backward),
            ]);
        }
    }
    let cpu = cpu_start
        .zip(cpu_ms())
        .map(|(a, b)| (b - a) / args.runs as f64);
    Ok((
        std::array::from_fn(|i| median(phases.iter().map(|p| p[i]).collect())),
        cpu,
    ))
}

/// Prompt length before the timed decode steps.
const DECODE_PROMPT: usize = 16;

/// Wall time (ms) of `steps` greedy decode steps (batch 1, KV cache) after the untimed prefill of `prompt`.
fn decode_ms(model: &Model, prompt: Tensor<2, Int>, steps: usize) -> f64 {
    let mut cache = KvCache::new(model.layers.len());
    let logits = model.forward_unchecked(prompt, Some(&mut cache));
    let mut next = last_argmax(logits);
    let _ = next.clone().into_data();
    let start = Instant::now();
    for _ in 0..steps {
        let logits = model.forward_unchecked(next, Some(&mut cache));
        next = last_argmax(logits);
    }
    let _ = next.into_data();
    start.elapsed().as_secs_f64() * 1e3
}

/// Where a decode step goes: the same greedy steps as [`decode_ms`] taken part by part through the model's public
/// sub-steps (attention with its cache, the MoE block or dense MLP, norms and residuals, the LM head and the
/// argmax), each timed to a host read of its output. ms summed over the steps: `[attention, moe, norm_other,
/// head]`.
fn decode_breakdown(model: &Model, prompt: Tensor<2, Int>, steps: usize) -> [f64; 4] {
    use farskip_model::matvec::rms_norm;
    let mut ms = [0.0; 4];
    let [attention, moe_part, other, head] = [0, 1, 2, 3];
    let mut timed = |part: usize, start: Instant| ms[part] += start.elapsed().as_secs_f64() * 1e3;
    let connectivity = model.connectivity();
    let mut cache = KvCache::new(model.layers.len());
    let logits = model.forward_unchecked(prompt, Some(&mut cache));
    let mut next = last_argmax(logits);
    for _ in 0..steps {
        let offset = cache.len();
        let t = Instant::now();
        let mut state = farskip_model::Residual::Plain(model.embed(next.clone()));
        sync(&state.clone().full());
        timed(other, t);
        for (i, layer) in model.layers.iter().enumerate() {
            let t = Instant::now();
            let inputs = connectivity.layer_inputs(layer.index(), state);
            let attn_in = rms_norm(&layer.input_norm, inputs.attn_in);
            sync(&attn_in);
            timed(other, t);

            let t = Instant::now();
            let attn = layer
                .attention
                .forward(attn_in, offset, Some(&mut cache.layers[i]));
            sync(&attn);
            timed(attention, t);

            let t = Instant::now();
            let post_attention = inputs.residual + attn;
            let x = rms_norm(&layer.post_norm, inputs.ffn_in.stream(&post_attention));
            sync(&x);
            timed(other, t);

            state = match &layer.ffn {
                Ffn::Dense(mlp) => {
                    let t = Instant::now();
                    let y = mlp.forward(x);
                    sync(&y);
                    timed(moe_part, t);
                    let t = Instant::now();
                    let s = connectivity.dense_output(post_attention, y, inputs.in_flight);
                    sync(&s.clone().full());
                    timed(other, t);
                    s
                }
                Ffn::Moe(moe) => {
                    let [b, s, h] = x.dims();
                    let t = Instant::now();
                    let out = moe.forward(x.reshape([b * s, h]));
                    sync(&out.routed);
                    timed(moe_part, t);
                    let t = Instant::now();
                    let back = |y: Tensor<2>| y.reshape([b, s, h]);
                    let out = connectivity.moe_output(
                        post_attention,
                        back(out.routed),
                        out.shared.map(back),
                        inputs.in_flight,
                    );
                    sync(&out.clone().full());
                    timed(other, t);
                    out
                }
            };
        }
        let t = Instant::now();
        next = last_argmax(model.logits(state.full()));
        let _ = next.clone().into_data();
        timed(head, t);
    }
    ms
}

/// Greedy choice at the last position, `[batch, 1]`.
fn last_argmax(logits: Tensor<3>) -> Tensor<2, Int> {
    let [b, t, v] = logits.dims();
    logits.narrow(1, t - 1, 1).reshape([b, v]).argmax(1)
}

/// The forward again, part by part from the public sub-steps, with a host read after each part.
fn breakdown(model: &Model, input: Tensor<2, Int>) -> [f64; PARTS.len()] {
    let mut ms = [0.0; PARTS.len()];
    let [attention, router, dispatch, experts, combine, other] = [0, 1, 2, 3, 4, 5];
    let mut timed = |part: usize, start: Instant| ms[part] += start.elapsed().as_secs_f64() * 1e3;
    let connectivity = model.connectivity();

    let t = Instant::now();
    let mut state = farskip_model::Residual::Plain(model.embed(input));
    sync(&state.clone().full());
    timed(other, t);
    for layer in &model.layers {
        let t = Instant::now();
        let inputs = connectivity.layer_inputs(layer.index(), state);
        let attn_in = layer.input_norm.forward(inputs.attn_in);
        sync(&attn_in);
        timed(other, t);

        let t = Instant::now();
        let attn = layer.attention.forward(attn_in, 0, None);
        sync(&attn);
        timed(attention, t);

        let t = Instant::now();
        let post_attention = inputs.residual + attn;
        let x = layer
            .post_norm
            .forward(inputs.ffn_in.stream(&post_attention));
        sync(&x);
        timed(other, t);

        state = match &layer.ffn {
            Ffn::Dense(mlp) => {
                let t = Instant::now();
                let y = mlp.forward(x);
                let s = connectivity.dense_output(post_attention, y, inputs.in_flight);
                sync(&s.clone().full());
                timed(other, t);
                s
            }
            Ffn::Moe(moe) => {
                let [b, s, h] = x.dims();
                let x = x.reshape([b * s, h]);

                let t = Instant::now();
                let routing = moe.route(x.clone());
                sync(&routing.weights);
                timed(router, t);

                let t = Instant::now();
                let plan = SlotPlan::from_experts(&routing.experts, moe.experts.num_experts());
                let device = x.device();
                let mut xs = x
                    .clone()
                    .select(0, index_tensor(&plan.sorted_tokens(), &device));
                if moe.router.config().weight_on == WeightOn::Input {
                    let w = routing
                        .weights
                        .clone()
                        .reshape([plan.slot_experts.len()])
                        .select(0, index_tensor(&plan.sorted_slots, &device));
                    xs = xs * w.unsqueeze_dim::<2>(1);
                }
                sync(&xs);
                timed(dispatch, t);

                let t = Instant::now();
                let ys = moe.experts.forward_grouped(xs, &plan.counts);
                sync(&ys);
                timed(experts, t);

                let t = Instant::now();
                let slot_out = ys.select(0, index_tensor(&plan.inverse(), &device));
                let routed = moe.combine_slots(slot_out, &routing);
                sync(&routed);
                timed(combine, t);

                let t = Instant::now();
                let back = |y: Tensor<2>| y.reshape([b, s, h]);
                let shared = moe.shared(x).map(back);
                let out =
                    connectivity.moe_output(post_attention, back(routed), shared, inputs.in_flight);
                sync(&out.clone().full());
                timed(other, t);
                out
            }
        };
    }
    let t = Instant::now();
    let logits = model.logits(state.full());
    sync(&logits);
    timed(other, t);
    ms
}

/// Waits for `t` by reading one element back (flex runs eagerly; this keeps the timing honest elsewhere).
fn sync<const D: usize>(t: &Tensor<D>) {
    let one = t.clone().flatten::<1>(0, D - 1).narrow(0, 0, 1);
    let _ = one.into_data();
}

/// CPU time of the whole process so far (user + system), in ms; `None` off Linux.
fn cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the `(comm)`: state is field 3, utime 14 and stime 15 (clock ticks, 100 per second).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks * 10.0)
}

/// Median wall time and mean CPU time (all threads) of `runs` calls after `warmup` calls, in ms.
fn measure(warmup: usize, runs: usize, mut f: impl FnMut()) -> (f64, Option<f64>) {
    for _ in 0..warmup {
        f();
    }
    let cpu_start = cpu_ms();
    let times = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let cpu = cpu_start.zip(cpu_ms()).map(|(a, b)| (b - a) / runs as f64);
    (median(times), cpu)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
