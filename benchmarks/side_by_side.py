#!/usr/bin/env python3
"""farskip-rs beside llama.cpp on one checkpoint, in alternating rounds (CPU, 2 threads).

    python3 benchmarks/side_by_side.py CKPT_DIR [--rounds 3] [--scratch DIR] [--bin DIR] [--big CKPT_1B]
        [--pytorch PYTHON] [--json]

Each round runs `llamacpp_peer.sh` (llama.cpp prefill pp512 and batch-1 decode tg128, f32 and bf16) and `bench
--tokens 512 --decode 128 --no-train` with `--dtype f32` and `--dtype bf16`; odd rounds start with llama.cpp, even
rounds with farskip-rs, so that a machine whose speed drifts over the minutes does not always favour the same
program. With `--big` each round also runs `forward --dtype bf16 --tokens 512` on that checkpoint (load time and
peak RSS against the file's size); with `--pytorch PYTHON` (an interpreter with torch and transformers) also
`pytorch_bench.py` (eager forward and decode, f32 and bf16) after farskip-rs. Prints each round and the median over
rounds of every ratio.

BIN is the folder of the release examples (default: target/release/examples, or $CARGO_TARGET_DIR's). SCRATCH is
llama.cpp's build and GGUF cache (default ~/.cache/farskip-rs/llamacpp); use one per checkpoint.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def last_json(cmd, env=None):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.strip().startswith("{")]
    if out.returncode != 0 or not lines:
        sys.exit(f"{' '.join(cmd)} failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scratch", default=os.path.expanduser("~/.cache/farskip-rs/llamacpp"))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(HERE, "..", "target"))
    ap.add_argument("--bin", default=os.path.join(target, "release", "examples"))
    ap.add_argument("--big", help="a ~1 B bf16 checkpoint for forward's load_ms / peak_rss_mb")
    ap.add_argument("--pytorch", help="a Python with torch + transformers: also run pytorch_bench.py each round")
    ap.add_argument("--json", action="store_true", help="one JSON line per round and one for the medians")
    a = ap.parse_args()
    if a.rounds < 1:
        sys.exit("--rounds must be at least 1")
    for exe in ["bench"] + (["forward"] if a.big else []):
        if not os.access(os.path.join(a.bin, exe), os.X_OK):
            sys.exit(f"no {exe} in {a.bin}: cargo build --release -p farskip-examples --example bench --example forward")
    env = dict(os.environ, RAYON_NUM_THREADS="2")

    def peer():
        return last_json(["bash", os.path.join(HERE, "llamacpp_peer.sh"), a.ckpt, a.scratch])

    def ours():
        r = {}
        for dt in ("f32", "bf16"):
            b = last_json([os.path.join(a.bin, "bench"), "--model", a.ckpt, "--tokens", "512", "--decode", "128",
                           "--no-train", "--dtype", dt, "--json"], env)
            r[f"forward_{dt}"] = b["forward_tok_s"]
            r[f"decode_{dt}"] = b["decode_tok_s"]
        return r

    def torch_eager():
        r = {}
        for dt in ("f32", "bf16"):
            b = last_json([a.pytorch, os.path.join(HERE, "pytorch_bench.py"), "--model", a.ckpt, "--tokens", "512",
                           "--decode", "128", "--no-train", "--dtype", dt, "--threads", "2"], env)
            r[f"forward_{dt}"] = b["forward_tok_s"]
            r[f"decode_{dt}"] = b["decode_tok_s"]
        return r

    rows = []
    for i in range(a.rounds):
        if i % 2 == 0:
            lc, us = peer(), ours()
        else:
            us, lc = ours(), peer()
        row = dict(round=i + 1, llamacpp=lc, farskip=us)
        if a.pytorch:
            row["pytorch"] = torch_eager()
        row["ratio"] = {
            "prefill_f32": us["forward_f32"] / lc["pp512_f32"],
            "prefill_bf16": us["forward_bf16"] / lc["pp512_bf16"],
            "decode_f32": us["decode_f32"] / lc["tg128_f32"],
            "decode_bf16": us["decode_bf16"] / lc["tg128_bf16"],
        }
        if a.big:
            f = last_json([os.path.join(a.bin, "forward"), "--model", a.big, "--dtype", "bf16", "--tokens", "512",
                           "--out", os.path.join(a.scratch, "side_by_side_logits"), "--json"], env)
            size_mib = os.path.getsize(os.path.join(a.big, "model.safetensors")) / 2**20
            row["big"] = dict(load_ms=f["load_ms"], peak_rss_mb=f["peak_rss_mb"], file_mib=size_mib,
                              rss_over_file=f["peak_rss_mb"] / size_mib)
        rows.append(row)
        if a.json:
            print(json.dumps(row), flush=True)
        else:
            r = row["ratio"]
            print(f"round {i + 1}: prefill f32 {us['forward_f32']:.0f}/{lc['pp512_f32']:.0f} "
                  f"({r['prefill_f32']:.2f}x), bf16 {us['forward_bf16']:.0f}/{lc['pp512_bf16']:.0f} "
                  f"({r['prefill_bf16']:.2f}x); decode f32 {us['decode_f32']:.0f}/{lc['tg128_f32']:.0f} "
                  f"({r['decode_f32']:.2f}x), bf16 {us['decode_bf16']:.0f}/{lc['tg128_bf16']:.0f} "
                  f"({r['decode_bf16']:.2f}x) tok/s, farskip-rs/llama.cpp", flush=True)
            if a.pytorch:
                pt = row["pytorch"]
                print("  PyTorch eager: " + ", ".join(
                    f"{k.replace('_', ' ')} {us[k]:.0f}/{pt[k]:.0f} ({us[k] / pt[k]:.2f}x)" for k in pt)
                    + " tok/s, farskip-rs/PyTorch", flush=True)
            if a.big:
                b = row["big"]
                print(f"  1 B bf16: load {b['load_ms']:.0f} ms, peak RSS {b['peak_rss_mb']:.0f} MiB "
                      f"({b['rss_over_file']:.2f}x the {b['file_mib']:.0f} MiB file)", flush=True)
    med = {k: statistics.median(r["ratio"][k] for r in rows) for k in rows[0]["ratio"]}
    if a.pytorch:
        for k in rows[0]["pytorch"]:
            med[f"{k}_vs_pytorch"] = statistics.median(r["farskip"][k] / r["pytorch"][k] for r in rows)
    if a.json:
        print(json.dumps(dict(rounds=a.rounds, median_ratio=med)))
    else:
        print("median over rounds (farskip-rs / llama.cpp, or / PyTorch where named): "
              + ", ".join(f"{k} {v:.2f}x" for k, v in med.items()))


if __name__ == "__main__":
    main()
