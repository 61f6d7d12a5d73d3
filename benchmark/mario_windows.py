"""Mario training episodes per window of agent steps: how many ended, how far they got, how many reached the flag.

Reads a run directory's TensorBoard events (all event files of a resumed run). Whether an episode reached the flag is
its `mario/episode_flag_get`; runs from before that tag existed give the flag's x position instead (--flag-x, 3161 on
1-1), and an episode counts as a clear when it ended there.

    python benchmark/mario_windows.py benchmark/mario-1-1/seed1/<run> --flag-x 3161
    python benchmark/mario_windows.py runs/<run> --window 50000
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tbcurves import load_curve  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--window", type=int, default=100_000, help="agent steps per row")
    parser.add_argument("--flag-x", type=int, help="x_pos of the flag, for runs without mario/episode_flag_get")
    args = parser.parse_args()

    max_x = load_curve(args.run_dir, "mario/max_x_pos")
    if max_x is None:
        sys.exit(f"error: {args.run_dir} has no mario/max_x_pos events; give the directory of a Mario run")
    flags = load_curve(args.run_dir, "mario/episode_flag_get")
    if flags is not None:
        cleared = flags.values > 0.5
    elif args.flag_x is not None:
        cleared = load_curve(args.run_dir, "mario/x_pos").values >= args.flag_x
    else:
        sys.exit(f"error: {args.run_dir} has no mario/episode_flag_get events (an older run); "
                 f"give the stage's flag position with --flag-x (3161 on 1-1)")

    first = max_x.steps[np.argmax(cleared)] if cleared.any() else None
    print("| steps | episodes | mean max x_pos | flag rate |")
    print("|-|-|-|-|")
    last = int(max_x.steps[-1])
    for start in range(0, last, args.window):
        end = min(start + args.window, last)
        in_window = (max_x.steps > start) & (max_x.steps <= end)
        if in_window.any():
            print(f"| {start / 1000:g}k-{end / 1000:g}k | {in_window.sum()} | {max_x.values[in_window].mean():.0f} | "
                  f"{cleared[in_window].mean():.0%} |")
    print("first flag: " + (f"step {first:,}" if first is not None else "none yet"))


if __name__ == "__main__":
    main()
