"""Greedy clear rate of Mario checkpoints.

Each checkpoint (every checkpoint of a run directory, or the .pt files given) plays N greedy episodes with
ppo_mario.py's own evaluation code, each after 0 to --noop-max random no-op steps so that episodes differ (--sample
draws actions from the policy instead, as in training: the policy's own clear rate, not its argmax's; --noop-max 0
starts every episode from the reset state, as training does by default, where greedy episodes are all the same).
The emulator is deterministic, so a greedy episode depends only on its no-op count: --all-starts plays one episode
from each count 0..--noop-max instead, the exact greedy clear rate over every start the random draws can give. Prints
a table (step, clear rate, mean x_pos, and how many episodes the stuck time-out ended: a policy that stands still,
such as a greedy one pressing a held jump button at a pipe) and the first step whose clear rate reaches --target; for a run directory also
writes clear_rate.csv and clear_rate.png beside its checkpoints (clear_rate_sampled.* with --sample,
clear_rate_all_starts.* with --all-starts, *_noopN.* with another --noop-max). --export writes the newest checkpoint
that reached the target as a model file for evaluation only (the weights and what evaluation needs; no optimizer, no
RNG states).

    python benchmark/mario_clear_rate.py models/SuperMarioBros-1-1-v0.pt --episodes 30     # the shipped model
    python benchmark/mario_clear_rate.py models/SuperMarioBros-1-1-v0.pt --all-starts      # each of the 31 starts
    python benchmark/mario_clear_rate.py runs/<run> --episodes 10 --target 0.9 --export models/SuperMarioBros-1-1-v0.pt
"""

import argparse
import csv
import glob
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ppo_mario  # noqa: E402

# What `ppo_mario.py --eval-checkpoint` reads from a checkpoint; an exported model keeps only these.
MODEL_KEYS = ("model", "global_step", "args", "env_id", "action_set", "obs_shape", "num_actions")
NOOP_MAX = ppo_mario.Args.eval_noop_max


def clear_rate(path: str, episodes: int, seed: int, sample: bool = False, noop_max: int = NOOP_MAX,
               all_starts: bool = False) -> dict:
    """Episodes of one checkpoint, as `ppo_mario.py --eval-checkpoint PATH --eval-episodes N --eval-noop-max M
    [--eval-sample]` plays them; with all_starts, one greedy episode after each no-op count 0..noop_max instead, and
    the row names the counts whose episode failed."""
    args = ppo_mario.Args(seed=seed, eval_sample=sample, eval_noop_max=noop_max)
    agent, checkpoint = ppo_mario.load_for_evaluation(path, args, "cpu")
    noop_counts = list(range(noop_max + 1)) if all_starts else None
    results = ppo_mario.evaluate(agent, args, "cpu", episodes, noop_counts=noop_counts)
    row = {"path": path, "step": checkpoint["global_step"], "episodes": len(results),
           "clear_rate": float(np.mean([r["flag_get"] for r in results])),
           "mean_x_pos": float(np.mean([r["x_pos"] for r in results])),
           "mean_return": float(np.mean([r["return"] for r in results])),
           "stuck_time_outs": sum(r["truncated"] for r in results)}
    if all_starts:
        row["failed_noops"] = " ".join(str(noops) for noops, r in zip(noop_counts, results) if not r["flag_get"])
    return row


def export_model(checkpoint_path: str, out: str):
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save({key: checkpoint[key] for key in MODEL_KEYS}, f"{out}.tmp")
    os.replace(f"{out}.tmp", out)
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB) from {checkpoint_path}")


def plot(rows: list[dict], target: float, mode: str, out: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["clear_rate"] for r in rows], marker="o")
    ax.axhline(target, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("agent steps")
    ax.set_ylabel(f"{mode} clear rate ({rows[0]['episodes']} episodes)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run directories and/or checkpoint files")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1, help="seeds the no-op starts (and the envs)")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--every", type=int, default=1, help="evaluate every k-th checkpoint of a run (and the last)")
    parser.add_argument("--export", help="write the newest checkpoint that reached --target here as a model file")
    parser.add_argument("--sample", action="store_true", help="sample actions from the policy instead of greedy")
    parser.add_argument("--noop-max", type=int, default=NOOP_MAX,
                        help="random no-op steps before each episode, 0 to this (0: from the reset state)")
    parser.add_argument("--all-starts", action="store_true",
                        help="greedy, one episode after each no-op count 0..--noop-max (replaces --episodes)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.noop_max < 0:
        sys.exit(f"error: --noop-max must be 0 or more, got {args.noop_max}")
    if args.all_starts and args.sample:
        sys.exit("error: --all-starts plays greedy episodes; drop --sample or --all-starts")

    checkpoints, run_dir = [], None
    for path in args.paths:
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "checkpoints", "step_*.pt")))
            if not found:
                sys.exit(f"error: no checkpoints/step_*.pt in {path}")
            checkpoints += found[::-1][::args.every][::-1]  # every k-th, counted back from the newest
            run_dir = path
        elif os.path.isfile(path):
            checkpoints.append(path)
        else:
            sys.exit(f"error: {path} is neither a run directory nor a checkpoint file")

    mode = "sampled" if args.sample else "greedy"
    if args.all_starts:
        start = f"one after each of 0-{args.noop_max} no-ops"
    else:
        start = f"after 0-{args.noop_max} no-ops" if args.noop_max else "from the reset state"
    print(f"| checkpoint | step | {mode} episodes {start} | cleared | mean x_pos | mean return | stuck time-outs |"
          + " failed after (no-ops) |" * args.all_starts)
    print("|-|-|-|-|-|-|-|" + "-|" * args.all_starts)
    rows = []
    for path in checkpoints:
        row = clear_rate(path, args.episodes, args.seed, args.sample, args.noop_max, args.all_starts)
        rows.append(row)
        print(f"| {os.path.basename(path)} | {row['step']:,} | {row['episodes']} | {row['clear_rate']:.0%} | "
              f"{row['mean_x_pos']:.0f} | {row['mean_return']:.1f} | {row['stuck_time_outs']} |"
              + f" {row.get('failed_noops') or 'none'} |" * args.all_starts, flush=True)

    reached = [row for row in rows if row["clear_rate"] >= args.target]
    print(f"first checkpoint clearing >= {args.target:.0%}: " + (f"step {reached[0]['step']:,}" if reached else "none"))
    if run_dir is not None:
        name = ("clear_rate" + "_sampled" * args.sample + "_all_starts" * args.all_starts
                + (f"_noop{args.noop_max}" if args.noop_max != NOOP_MAX else ""))
        with open(os.path.join(run_dir, f"{name}.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        plot(rows, args.target, mode, os.path.join(run_dir, f"{name}.png"))
        print(f"wrote {os.path.join(run_dir, name)}.csv and {name}.png")
    if args.export:
        if not reached:
            sys.exit(f"error: no checkpoint reached a clear rate of {args.target:.0%}; nothing exported")
        export_model(reached[-1]["path"], args.export)


if __name__ == "__main__":
    main()
