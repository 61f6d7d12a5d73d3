"""Mario learning curves: N seeds of ppo_mario.py with its defaults on one stage for a step budget, then, from their
TensorBoard events, the mean and max x_pos and the flag rate against steps (table + PNGs via compare_runs.py).

Runs are resumable: a seed whose run directory already exists is continued with --resume, so the budget can be spread
over several sessions.

    python benchmark/mario_learning.py --seeds 1 2 3 --total-timesteps 2000000 --cuda
    python benchmark/mario_learning.py --seeds 1 --total-timesteps 100000 --runs-dir runs/mario-bench   # CPU taste
"""

import argparse
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import compare_runs  # noqa: E402
from tbcurves import load_curve  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="SuperMarioBros-1-1-v0")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--total-timesteps", type=int, default=2_000_000)
    parser.add_argument("--runs-dir", default="runs/mario-learning")
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more ppo_mario.py flags, after --")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]

    for seed in args.seeds:
        seed_dir = os.path.join(args.runs_dir, f"seed{seed}")
        command = [sys.executable, os.path.join(ROOT, "ppo_mario.py")] + (["--cuda"] if args.cuda else [])
        if os.path.isdir(seed_dir) and os.listdir(seed_dir):
            (run,) = os.listdir(seed_dir)
            command += ["--resume", os.path.join(seed_dir, run)]
        else:
            command += ["--env-id", args.env_id, "--seed", str(seed), "--total-timesteps", str(args.total_timesteps),
                        "--runs-dir", seed_dir, "--exp-name", "mario-learning", *extra]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)

    pattern = os.path.join(args.runs_dir, "seed*", "*")
    out = os.path.join(args.runs_dir, "x_pos.png")
    compare_runs.main([pattern, "--tag", "mario/max_x_pos", "--out", out, "--window", "100", "--smooth", "100"])
    compare_runs.main([pattern, "--tag", "mario/flag_get", "--out", os.path.join(args.runs_dir, "flag_rate.png"),
                       "--window", "1", "--smooth", "1"])

    print("\n| seed | steps | episodes | max x_pos | mean max_x_pos, last 100 | flag rate, last 100 | first flag at step | SPS |")
    print("|-|-|-|-|-|-|-|-|")
    for seed in args.seeds:
        seed_dir = os.path.join(args.runs_dir, f"seed{seed}")
        run = os.path.join(seed_dir, os.listdir(seed_dir)[0])
        x, flags, sps = (load_curve(run, tag) for tag in ("mario/max_x_pos", "mario/episode_flag_get", "charts/SPS"))
        cleared = np.flatnonzero(flags.values > 0)
        first_flag = f"{flags.steps[cleared[0]]:,}" if len(cleared) else "-"
        print(f"| {seed} | {sps.steps[-1]:,} | {len(x.values)} | {x.values.max():.0f} | {np.mean(x.values[-100:]):.0f} | "
              f"{np.mean(flags.values[-100:]):.0%} | {first_flag} | {np.mean(sps.values):,.0f} |")


if __name__ == "__main__":
    main()
