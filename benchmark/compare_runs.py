"""Compare TensorBoard runs: mean ± std across seeds against global step, per group, to a PNG and a CSV, and a table.

Runs are TensorBoard run directories (ours or CleanRL's: both name them <env_id>__<exp_name>__<seed>__<time>), given
as paths or globs. By default they are grouped by experiment name; --group REGEX groups by the regex's first capture
group (or whole match) in the run's path instead.

    python benchmark/compare_runs.py "runs/CartPole-v1__*"
    python benchmark/compare_runs.py runs/* ../cleanrl/runs/* --tag charts/episodic_return --threshold 475 --out cmp.png
    python benchmark/compare_runs.py "runs/*" --group "lr[0-9.e-]+" --smooth 50
    python benchmark/compare_runs.py "runs/ALE-Breakout-v5__*" --at-steps 250000 500000 1000000 --window 100
"""

import argparse
import csv
import glob
import os
import re
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tbcurves import first_crossing, load_curve, trailing_mean  # noqa: E402


def group_name(run_dir: str, pattern: str | None) -> str:
    if pattern:
        match = re.search(pattern, run_dir)
        if not match:
            return "(no match)"
        return match.group(1) if match.groups() else match.group(0)
    parts = os.path.basename(os.path.normpath(run_dir)).split("__")
    return "__".join(parts[:2]) if len(parts) >= 4 else parts[0]  # <env_id>__<exp_name>


def expand(patterns: list[str]) -> list[str]:
    """Run directories: every directory holding event files at or under the given paths or globs."""
    runs = set()
    for pattern in patterns:
        for path in glob.glob(pattern) or [pattern]:
            for event_file in glob.glob(os.path.join(path, "**", "events.out.tfevents.*"), recursive=True):
                runs.add(os.path.dirname(event_file))
    return sorted(runs)


def summarize(curves: dict, sps: dict, threshold: float | None, window: int) -> list[dict]:
    rows = []
    for group, runs in curves.items():
        finals = [np.mean(curve.values[-window:]) for curve in runs.values()]
        row = {"group": group, "runs": len(runs), "final_mean": float(np.mean(finals)), "final_std": float(np.std(finals)),
               "final_step": int(np.mean([curve.steps[-1] for curve in runs.values()])),
               "sps": float(np.mean([sps[run] for run in runs if sps.get(run) is not None] or [np.nan]))}
        if threshold is not None:
            crossings = [first_crossing(curve, threshold, window) for curve in runs.values()]
            reached = [c for c in crossings if c is not None]
            row["reached"] = len(reached)
            row["steps_to_threshold"] = [c[0] for c in reached]
            row["seconds_to_threshold"] = [c[1] for c in reached]
        rows.append(row)
    return rows


def mean_curves(curves: dict, smooth: int, points: int = 200) -> dict:
    """Per group: a common step grid up to the shortest run, the smoothed curves interpolated onto it, mean and std."""
    result = {}
    for group, runs in curves.items():
        end = min(curve.steps[-1] for curve in runs.values())
        start = max(curve.steps[0] for curve in runs.values())
        grid = np.linspace(start, end, points) if end > start else np.array([end])
        stacked = np.stack([np.interp(grid, c.steps, trailing_mean(c.values, smooth)) for c in runs.values()])
        result[group] = (grid, stacked.mean(axis=0), stacked.std(axis=0), len(runs))
    return result


def plot(averaged: dict, tag: str, threshold: float | None, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for group, (grid, mean, std, n) in averaged.items():
        ax.plot(grid, mean, label=f"{group} ({n} run{'s' if n > 1 else ''})")
        ax.fill_between(grid, mean - std, mean + std, alpha=0.2)
    if threshold is not None:
        ax.axhline(threshold, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("global step")
    ax.set_ylabel(tag)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories or globs")
    parser.add_argument("--tag", default="charts/episodic_return")
    parser.add_argument("--group", help="regex; its first capture group (or the match) in the run path names the group")
    parser.add_argument("--smooth", type=int, default=20, help="trailing mean over this many points before averaging")
    parser.add_argument("--threshold", type=float, help="report steps and wall time until the trailing mean reaches it")
    parser.add_argument("--window", type=int, default=20, help="points in the trailing mean for final value and threshold")
    parser.add_argument("--out", default="comparison.png", help="PNG to write; the CSV goes beside it")
    parser.add_argument("--at-steps", type=int, nargs="*", default=[],
                        help="also tabulate, per group, the mean of the last --window points logged by each step")
    args = parser.parse_args(argv)

    run_dirs = expand(args.runs)
    if not run_dirs:
        sys.exit(f"error: no TensorBoard event files under {' '.join(args.runs)}")
    curves, sps = defaultdict(dict), {}
    for run in run_dirs:
        curve = load_curve(run, args.tag)
        if curve is None:
            print(f"skipping {run}: no {args.tag}", file=sys.stderr)
            continue
        curves[group_name(run, args.group)][run] = curve
        sps_curve = load_curve(run, "charts/SPS")
        sps[run] = float(sps_curve.values[-1]) if sps_curve is not None else None
    if not curves:
        sys.exit(f"error: none of the {len(run_dirs)} runs logged {args.tag}")

    averaged = mean_curves(curves, args.smooth)
    plot(averaged, args.tag, args.threshold, args.out)
    csv_path = os.path.splitext(args.out)[0] + ".csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "step", "mean", "std", "runs"])
        for group, (grid, mean, std, n) in averaged.items():
            writer.writerows([group, int(step), f"{m:.6g}", f"{s:.6g}", n] for step, m, s in zip(grid, mean, std))

    rows = summarize(curves, sps, args.threshold, args.window)
    header = f"| group | runs | final {args.tag} (mean ± std of last {args.window}) | final step | SPS |"
    if args.threshold is not None:
        header += f" reached {args.threshold:g} | steps to it (mean, min-max) | seconds to it (mean) |"
    print(header)
    print("|" + "-|" * header.count(" | ") + "-|")
    for row in rows:
        line = (f"| {row['group']} | {row['runs']} | {row['final_mean']:.1f} ± {row['final_std']:.1f} | "
                f"{row['final_step']:,} | {row['sps']:,.0f} |")
        if args.threshold is not None:
            steps, seconds = row["steps_to_threshold"], row["seconds_to_threshold"]
            line += (f" {row['reached']}/{row['runs']} | "
                     + (f"{np.mean(steps):,.0f}, {min(steps):,}-{max(steps):,} | {np.mean(seconds):.1f} |" if steps else "- | - |"))
        print(line)
    if args.at_steps:
        print(f"\n| group | " + " | ".join(f"step {step:,}" for step in args.at_steps) + " |")
        print("|-|" + "-|" * len(args.at_steps))
        for group, runs in curves.items():
            cells = [values_at(runs.values(), step, args.window) for step in args.at_steps]
            print(f"| {group} | " + " | ".join(cells) + " |")
    print(f"wrote {args.out} and {csv_path}")
    return rows


def values_at(curves, step: int, window: int) -> str:
    """Mean ± std across runs of the mean of each run's last `window` points logged at or before `step`."""
    means = [np.mean(c.values[c.steps <= step][-window:]) for c in curves if c.steps[0] <= step <= c.steps[-1]]
    return f"{np.mean(means):.1f} ± {np.std(means):.1f}" if means else "-"


if __name__ == "__main__":
    main()
