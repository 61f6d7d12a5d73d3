"""Share of training episodes that reached the flag, per 100k agent steps, for the runs behind the shipped models,
from the per-window CSV summaries beside their reference curves (written by mario_windows.py --csv from the full
events). A forked run's curve is its parent's up to the fork, then its own; a dot marks the shipped checkpoint.

    python benchmark/plot_flag_rates.py                       # writes benchmark/shipped_flag_rates.png
"""

import argparse
import csv
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# stage: ([(CSV summary, the step it runs from)], the shipped model's step)
SHIPPED = {
    "1-1": ([("mario-1-1/seed1.csv", 0)], 1_146_880),
    "1-2": ([("mario-1-2/noop30-pay-seed1.csv", 0)], 573_440),
    "1-3": ([("mario-1-3/gamma0.98-seed1.csv", 0), ("mario-1-3/gamma0.98-height1-seed1.csv", 655_360)], 1_515_520),
    "1-4": ([("mario-1-4/seed1.csv", 0)], 204_800),
    "2-1 (past the 2M budget)": ([("mario-2-1/simple-noop30-prevact-seed1.csv", 0),
                                  ("mario-2-1/simple-noop30-prevact-fork-13settings.csv", 1_998_848)], 2_334_720),
    "2-2 (not yet reliable; reset-state episodes)": ([("mario-2-2/noop30-start50-prevact-seed1-from-reset.csv", 0),
                                                      ("mario-2-2/noop30-start50-prevact-fork491k-seed1-from-reset.csv",
                                                       491_520)], 983_040),
    "2-3 (not yet reliable)": ([("mario-2-3/noop30-seed1-rerun.csv", 0), ("mario-2-3/noop30-rng-fork.csv", 1_032_192),
                                ("mario-2-3/noop30-rng-fork-sticky10.csv", 1_933_312),
                                ("mario-2-3/noop30-sticky10-score0.csv", 2_596_864)], 2_662_400),
    "2-4": ([("mario-2-4/seed1.csv", 0), ("mario-2-4/noop30-seed1.csv", 385_024)], 614_400),
}


def windows(path: str) -> list[tuple[float, float]]:
    """(window midpoint, flag rate) per window of a summary."""
    with open(path) as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        return [((int(r["start"]) + int(r["end"])) / 2, float(r["flag_rate"])) for r in rows]


def curve(segments: list[tuple[str, int]]) -> list[tuple[float, float]]:
    """Each segment's windows from its start step to the next segment's."""
    points = []
    for (path, start), (_, end) in zip(segments, segments[1:] + [(None, float("inf"))]):
        points += [(x, y) for x, y in windows(os.path.join(HERE, path)) if start <= x < end]
    return points


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "shipped_flag_rates.png"))
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(9.5, 4))
    for stage, (segments, shipped) in SHIPPED.items():
        points = curve(segments)
        line, = ax.plot([x / 1e6 for x, _ in points], [100 * y for _, y in points], label=stage)
        x, y = min(points, key=lambda p: abs(p[0] - shipped))
        ax.plot(x / 1e6, 100 * y, "o", color=line.get_color())
    ax.set_xlabel("agent steps (millions)")
    ax.set_ylabel("training episodes at the flag (%)")
    ax.set_title("Runs behind the shipped models (dot: the shipped checkpoint)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: no curve or dot hidden
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
