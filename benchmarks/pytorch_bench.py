"""PyTorch eager reference for `cargo run --release -p farskip-examples --example bench`.

Builds (or loads) the benchmark Hugging Face Qwen3-MoE checkpoint and prints one JSON line with the same keys as the
Rust bench: forward tokens/s and training-step (forward + backward + AdamW) tokens/s, medians of timed runs; with
`--decode N`, `decode_tok_s`: batch-1 greedy decoding of N tokens with the KV cache after a 16-token prompt (the
median of 3 timed runs after one untimed), as `bench --decode N` measures it. `--dtype bf16` runs the forward and
the decode with bf16 weights and activations (PyTorch's CPU bf16 path), `--no-train` skips the training step.

    python3 benchmarks/pytorch_bench.py --save /tmp/qwen3moe-small       # writes config.json + model.safetensors
    python3 benchmarks/pytorch_bench.py --model /tmp/qwen3moe-small --tokens 512 --threads 2
    python3 benchmarks/pytorch_bench.py --model /tmp/qwen3moe-small --decode 128 --no-train --dtype bf16
    cargo run --release -p farskip-examples --example bench -- --model /tmp/qwen3moe-small --tokens 512 --json

Needs `torch` and `transformers` (not a dependency of the Rust workspace; CI does not run this).
"""
import argparse
import inspect
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig


def small_config():
    return Qwen3MoeConfig(
        vocab_size=256, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
        head_dim=64, num_experts=16, num_experts_per_tok=2, norm_topk_prob=True, moe_intermediate_size=512,
        intermediate_size=1024, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
        max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6, attention_bias=False,
        output_router_logits=False, router_aux_loss_coef=0.0,
    )


def median_ms(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="checkpoint directory (default: random init of the benchmark config)")
    ap.add_argument("--save", help="write a random checkpoint of the config here and exit")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--decode", type=int, default=0, help="also time greedy decoding of this many tokens")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32", help="weights of the forward and decode")
    ap.add_argument("--no-train", action="store_true", help="skip the training step")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.save:
        model = AutoModelForCausalLM.from_config(small_config(), dtype=torch.float32)
        model.save_pretrained(args.save, safe_serialization=True)
        print(f"saved to {args.save}")
        return
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    else:
        model = AutoModelForCausalLM.from_config(small_config(), dtype=torch.float32, attn_implementation="eager")
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens + 1))
    inp, tgt = ids[:, :-1], ids[:, 1:]

    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.eval()

    def forward():
        with torch.no_grad():
            model(inp, use_cache=False).logits.sum().item()

    fwd_ms = median_ms(forward, args.warmup, args.runs)

    decode_ms = None
    if args.decode > 0:
        prompt = inp[:, :16]
        # transformers >= 5.2x names the KV cache `cache` (argument and output), earlier versions
        # `past_key_values`.
        kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

        def decode():
            with torch.no_grad():
                out = model(prompt, use_cache=True)
                cache, nxt = getattr(out, kw), out.logits[:, -1].argmax(-1, keepdim=True)
                t0 = time.perf_counter()
                for _ in range(args.decode):
                    out = model(nxt, use_cache=True, **{kw: cache})
                    cache, nxt = getattr(out, kw), out.logits[:, -1].argmax(-1, keepdim=True)
                nxt.item()
                return (time.perf_counter() - t0) * 1e3

        decode()
        decode_ms = statistics.median(decode() for _ in range(3))

    result = {
        "framework": f"pytorch {torch.__version__} eager",
        "threads": torch.get_num_threads(),
        "tokens": args.tokens,
        "dtype": args.dtype,
        "forward_ms": round(fwd_ms, 1),
        "forward_tok_s": round(args.tokens / fwd_ms * 1e3, 1),
    }
    if decode_ms is not None:
        result.update(decode_tokens=args.decode, decode_ms=round(decode_ms, 1),
                      decode_tok_s=round(args.decode / decode_ms * 1e3, 1))
    if args.no_train:
        print(json.dumps(result))
        return
    model = model.float()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        logits = model(inp, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_ms = median_ms(train_step, args.warmup, args.runs)
    result.update(train_ms=round(train_ms, 1), train_tok_s=round(args.tokens / train_ms * 1e3, 1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
