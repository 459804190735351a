#!/usr/bin/env python3
"""Planner (cpu-here, calibrated single-rank) against the overlap examples it predicts, on this machine.

Each setting calibrates afresh (`plan --calibrate`), then runs the example, so both see the machine at about the
same load. Prints a markdown table of predicted vs measured farskip_ms, blocking_ms and overlap_pct.

    python3 benchmarks/plan_vs_measured.py [TARGET_DIR]
"""
import json
import os
import subprocess
import sys

target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CARGO_TARGET_DIR", "target")
bin_dir = os.path.join(target, "release", "examples")

SETTINGS = [
    # (mode, parallel, comm_ratio, connectivity, world)
    ("prefill", "ep", 0.5, "farskip", 2),
    ("prefill", "ep", 1.0, "farskip", 2),
    ("prefill", "ep", 2.0, "farskip", 2),
    ("prefill", "tp", 0.5, "farskip", 2),
    ("prefill", "tp", 1.0, "farskip", 2),
    ("prefill", "tp", 2.0, "farskip", 2),
    ("train", "ep", 1.0, "farskip", 2),
    # Settings outside the list the planner was written against.
    ("prefill", "ep", 2.0, "farskip-d2", 2),
    ("prefill", "tp", 1.5, "farskip:0..=3", 2),
    ("prefill", "ep", 1.0, "farskip", 4),
]


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def load():
    return os.getloadavg()[0]


rows = []
for mode, par, ratio, conn, world in SETTINGS:
    common = ["--world", str(world), "--preset", "small", "--comm-ratio", str(ratio)]
    if mode == "train":
        plan = run([f"{bin_dir}/plan", "--cluster", "cpu-here", "--mode", "train", "--calibrate", "--json"] + common)
        meas = run([f"{bin_dir}/overlap_training", "--steps", "3", "--json"] + common)
        pred = (plan["farskip_step_ms"], plan["blocking_step_ms"], plan["fwd_overlap_pct"], plan["bwd_overlap_pct"])
        got = (meas["farskip_step_ms"], meas["blocking_step_ms"], meas["fwd_overlap_pct"], meas["bwd_overlap_pct"])
    else:
        extra = ["--parallel", par, "--tokens", "256", "--connectivity", conn]
        plan = run([f"{bin_dir}/plan", "--cluster", "cpu-here", "--calibrate", "--json"] + common + extra)
        meas = run([f"{bin_dir}/overlap_inference", "--json"] + common + extra)
        pred = (plan["farskip_ms"], plan["blocking_ms"], plan["overlap_pct"])
        got = (meas["farskip_ms"], meas["blocking_ms"], meas["overlap_pct"])
    rows.append((mode, f"{par} x{world}", ratio, conn, pred, got, load()))
    print(f"done {mode} {par} {ratio} {conn}: pred {pred} meas {got}", file=sys.stderr)

def overlap(p, m):
    cells = [f"{p[i]:.0f} / {m[i]:.0f} ({p[i] - m[i]:+.0f})" for i in range(2, len(p))]
    return " ; ".join(cells)


print("| mode | split x world | R | connectivity | farskip_ms pred / meas | blocking_ms pred / meas | overlap % pred / meas (train: fwd ; bwd) | load |")
print("|---|---|---|---|---|---|---|---|")
for mode, par, ratio, conn, p, m, l in rows:
    ef = 100 * (p[0] - m[0]) / m[0]
    eb = 100 * (p[1] - m[1]) / m[1]
    print(
        f"| {mode} | {par} | {ratio} | {conn} | {p[0]:.0f} / {m[0]:.0f} ({ef:+.0f} %) | "
        f"{p[1]:.0f} / {m[1]:.0f} ({eb:+.0f} %) | {overlap(p, m)} | {l:.1f} |"
    )
