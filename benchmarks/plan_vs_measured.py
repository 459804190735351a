#!/usr/bin/env python3
"""Planner (cpu-here, calibrated single-rank) against the overlap examples it predicts, on this machine.

Each setting calibrates afresh (`plan --calibrate`), then runs the example, so both see the machine at about the
same load. Prints a markdown table of predicted vs measured farskip_ms, blocking_ms and overlap_pct.

`--self N` runs no planner: it measures every setting N times (in N interleaved rounds) and prints how far the
runs of one setting are apart, and how many runs miss the bars (15 %, 10 points) around the setting's median
run — an oracle that knew every run in advance: the floor under any prediction's misses on this machine.

    python3 benchmarks/plan_vs_measured.py [TARGET_DIR] [--self N]
"""
import argparse
import itertools
import json
import os
import subprocess
import sys

cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
cli.add_argument("target", nargs="?", default=os.environ.get("CARGO_TARGET_DIR", "target"))
cli.add_argument("--self", dest="self_runs", type=int, default=0, metavar="N",
                 help="measure each setting N times (no planner) and print the runs' spread")
args = cli.parse_args()
bin_dir = os.path.join(args.target, "release", "examples")

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


def measure(mode, par, ratio, conn, world):
    common = ["--world", str(world), "--preset", "small", "--comm-ratio", str(ratio)]
    if mode == "train":
        m = run([f"{bin_dir}/overlap_training", "--steps", "3", "--json"] + common)
        return (m["farskip_step_ms"], m["blocking_step_ms"], m["fwd_overlap_pct"], m["bwd_overlap_pct"])
    extra = ["--parallel", par, "--tokens", "256", "--connectivity", conn]
    m = run([f"{bin_dir}/overlap_inference", "--json"] + common + extra)
    return (m["farskip_ms"], m["blocking_ms"], m["overlap_pct"])


if args.self_runs > 0:
    runs = {s: [] for s in SETTINGS}
    for r in range(args.self_runs):
        for s in SETTINGS:
            runs[s].append(measure(*s))
            print(f"round {r}: {s}: {runs[s][-1]}", file=sys.stderr)
    print(f"| mode | split x world | R | connectivity | farskip_ms runs (max over min) | blocking_ms runs (max over min) "
          f"| overlap % runs (max - min) | pairs past 15 % / 10 points | runs past them around the median |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (mode, par, ratio, conn, world), vs in runs.items():
        cols = list(zip(*vs))
        times = [f"{' '.join(f'{x:.0f}' for x in c)} ({100 * (max(c) / min(c) - 1):+.0f} %)" for c in cols[:2]]
        pcts = " ; ".join(f"{' '.join(f'{x:.0f}' for x in c)} ({max(c) - min(c):.0f})" for c in cols[2:])
        # Pairs of runs that miss each other by the planner's bars, one taken as the prediction of the other
        # (either way round: a time 15 % off the other's, an overlap 10 points off).
        past = sum(
            any(abs(a[i] - b[i]) > 0.15 * min(a[i], b[i]) for i in range(2))
            or any(abs(a[i] - b[i]) > 10 for i in range(2, len(a)))
            for a, b in itertools.combinations(vs, 2)
        )
        pairs = len(vs) * (len(vs) - 1) // 2
        # The runs' median (the upper middle of an even count) as the prediction of each run.
        mid = [sorted(c)[len(c) // 2] for c in cols]
        off = sum(
            any(abs(mid[i] - v[i]) > 0.15 * v[i] for i in range(2))
            or any(abs(mid[i] - v[i]) > 10 for i in range(2, len(v)))
            for v in vs
        )
        print(f"| {mode} | {par} x{world} | {ratio} | {conn} | {times[0]} | {times[1]} | {pcts} | {past} / {pairs} "
              f"| {off} / {len(vs)} |")
    sys.exit(0)

rows = []
for mode, par, ratio, conn, world in SETTINGS:
    common = ["--world", str(world), "--preset", "small", "--comm-ratio", str(ratio)]
    if mode == "train":
        plan = run([f"{bin_dir}/plan", "--cluster", "cpu-here", "--mode", "train", "--calibrate", "--json"] + common)
        pred = (plan["farskip_step_ms"], plan["blocking_step_ms"], plan["fwd_overlap_pct"], plan["bwd_overlap_pct"])
    else:
        extra = ["--parallel", par, "--tokens", "256", "--connectivity", conn]
        plan = run([f"{bin_dir}/plan", "--cluster", "cpu-here", "--calibrate", "--json"] + common + extra)
        pred = (plan["farskip_ms"], plan["blocking_ms"], plan["overlap_pct"])
    got = measure(mode, par, ratio, conn, world)
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
