"""CartPole-v1: steps and wall time until the mean of the last 20 training episodes reaches 475, per seed, for our
defaults and, side by side in the same run, for CleanRL ppo.py's default hyperparameters run through the same script;
then the mean of the last 20 training episodes at the end (does it stay solved?) and a greedy evaluation of the final
model over 10 episodes.

    python benchmark/cartpole_learning.py                 # 5 seeds each, ~7 min on 2 cores
    python benchmark/cartpole_learning.py --seeds 1 2 --configs ours
    python benchmark/cartpole_learning.py --runs-dir runs/cartpole-bench --plot benchmark/cartpole_curves.png
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_runs  # noqa: E402
from tbcurves import first_crossing, load_curve  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "ours": [],
    # CleanRL ppo.py's hyperparameters (cleanrl/ppo.py, v1.x).
    "cleanrl-defaults": [
        "--total-timesteps", "500000", "--learning-rate", "2.5e-4", "--num-envs", "4", "--num-steps", "128",
        "--num-minibatches", "4", "--update-epochs", "4", "--ent-coef", "0.01",
    ],
}


def run_seed(config: str, seed: int, runs_dir: str) -> dict:
    runs_dir = os.path.join(runs_dir, f"{config}-{seed}")
    command = [sys.executable, os.path.join(ROOT, "ppo_cartpole.py"), "--seed", str(seed), "--runs-dir", runs_dir,
               "--exp-name", config, *CONFIGS[config]]
    start = time.time()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.time() - start
    (run_dir,) = [os.path.join(runs_dir, name) for name in os.listdir(runs_dir)]
    curve = load_curve(run_dir)
    crossing = first_crossing(curve, threshold=475, window=20)
    evaluation = subprocess.run(
        [sys.executable, os.path.join(ROOT, "ppo_cartpole.py"), "--eval-checkpoint", run_dir,
         "--eval-episodes", "10"], check=True, capture_output=True, text=True).stdout
    eval_mean = float(re.search(r"return ([\d.]+) ±", evaluation).group(1))
    sps = int(curve.steps[-1] / curve.seconds[-1])
    return {"config": config, "seed": seed, "solve_step": crossing and crossing[0], "solve_seconds": crossing and crossing[1],
            "total_seconds": wall, "sps": sps, "final": float(np.mean(curve.values[-20:])), "eval": eval_mean}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--runs-dir", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--plot", help="also draw mean ± std of the episodic return per config to this PNG")
    args = parser.parse_args()

    rows = []
    with (nullcontext(args.runs_dir) if args.runs_dir else tempfile.TemporaryDirectory()) as runs_dir:
        for config in args.configs:
            for seed in args.seeds:
                row = run_seed(config, seed, runs_dir)
                rows.append(row)
                print(f"{config:17s} seed {seed}: solved at "
                      + (f"{row['solve_step']:>7,} steps, {row['solve_seconds']:5.1f} s" if row["solve_step"] else "   never")
                      + f"  | {row['sps']:,} SPS, last 20 at the end {row['final']:.1f}, greedy eval {row['eval']:.1f}", flush=True)
        if args.plot:
            compare_runs.main([os.path.join(runs_dir, "*", "*"), "--threshold", "475", "--out", args.plot])

    print("\n| config | seeds solved (mean-of-20 >= 475) | steps to solve (min-max) | seconds to solve (mean, max) | SPS "
          "| mean of last 20 at the end | greedy eval of the final model (10 ep) |")
    print("|-|-|-|-|-|-|-|")
    summary = {}
    for config in args.configs:
        group = [r for r in rows if r["config"] == config]
        solved = [r for r in group if r["solve_step"]]
        steps = [r["solve_step"] for r in solved]
        seconds = [r["solve_seconds"] for r in solved]
        summary[config] = np.mean(seconds) if seconds else None
        print(f"| {config} | {len(solved)}/{len(group)} | "
              + (f"{min(steps):,}-{max(steps):,} | {np.mean(seconds):.1f}, {max(seconds):.1f} | " if solved else "- | - | ")
              + f"{int(np.mean([r['sps'] for r in group])):,} | {np.mean([r['final'] for r in group]):.1f} | "
              + f"{np.mean([r['eval'] for r in group]):.1f} |")
    if summary.get("ours") and summary.get("cleanrl-defaults"):
        print(f"\nwall time to solve, cleanrl-defaults / ours: {summary['cleanrl-defaults'] / summary['ours']:.1f}x")


if __name__ == "__main__":
    main()
