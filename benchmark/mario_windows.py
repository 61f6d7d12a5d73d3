"""Mario training episodes per window of agent steps: how many ended, how far they got (on average and at most), how
many reached the flag, and (--past X) how many got past a wall at x_pos X; --ends START END tells where the episodes
that ended in that span of steps without the flag stopped (max x_pos in bins of 50, the largest heaps first).

Reads a run directory's TensorBoard events (all event files of a resumed run). Whether an episode reached the flag is
its `mario/episode_flag_get`; runs from before that tag existed give the flag's x position instead (--flag-x, 3161 on
1-1), and an episode counts as a clear when it ended there.

    python benchmark/mario_windows.py benchmark/mario-1-1/seed1/<run> --flag-x 3161
    python benchmark/mario_windows.py runs/<run> --window 50000
    python benchmark/mario_windows.py runs/<run> --past 783    # 1-3's first wall
    python benchmark/mario_windows.py runs/<run> --ends 2500000 3000000    # where the last 500k steps' misses stopped
    python benchmark/mario_windows.py benchmark/mario-2-3/<probe>/* --csv benchmark/mario-2-3/<probe>.csv

Runs with --start-states log each episode's start step: the table then also counts the episodes that began from a
start state and their mean start step (how far along the furthest episode the curriculum starts), and --from-reset
keeps only the episodes from the reset state, the ones evaluation plays.

    python benchmark/mario_windows.py runs/<run> --from-reset

--csv writes the rows of every run given to one file, a `run` column telling them apart, under one comment line per
run with its first flag and last episode step: the summary kept in the tree of a run whose events are not.
"""

import argparse
import csv
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tbcurves import load_curve  # noqa: E402


def load_episodes(run_dir: str, flag_x: int | None = None,
                  from_reset: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Each training episode's end step, max x_pos, whether it reached the flag and (runs with --start-states, else
    None) its start step, from a run's events; with from_reset only the episodes that began at the reset state."""
    max_x = load_curve(run_dir, "mario/max_x_pos")
    if max_x is None:
        sys.exit(f"error: {run_dir} has no mario/max_x_pos events; give the directory of a Mario run")
    flags = load_curve(run_dir, "mario/episode_flag_get")
    if flags is not None:
        cleared = flags.values > 0.5
    elif flag_x is not None:
        cleared = load_curve(run_dir, "mario/x_pos").values >= flag_x
    else:
        sys.exit(f"error: {run_dir} has no mario/episode_flag_get events (an older run); "
                 f"give the stage's flag position with --flag-x (3161 on 1-1)")
    start_steps = load_curve(run_dir, "mario/episode_start_step")
    starts = None if start_steps is None else start_steps.values
    # A run still writing its events can end between an episode's tags: keep the episodes all its tags have.
    episodes = min(len(max_x.values), len(cleared), *([] if starts is None else [len(starts)]))
    steps, max_x, cleared = max_x.steps[:episodes], max_x.values[:episodes], cleared[:episodes]
    if starts is not None:
        starts = starts[:episodes]
        if from_reset:
            keep = starts == 0
            steps, max_x, cleared, starts = steps[keep], max_x[keep], cleared[keep], None
    return steps, max_x, cleared, starts


def episode_windows(run_dir: str, window: int, flag_x: int | None = None, past: int | None = None,
                    from_reset: bool = False) -> tuple[list[dict], int | None]:
    """One row per window of `window` agent steps (episodes ending in (start, end]) and the step of the first flag;
    with `past`, each row also counts the episodes whose max x_pos went beyond it; for a run with start states, the
    episodes from one and their mean start step (with from_reset: only the episodes from the reset state)."""
    steps, max_x, cleared, starts = load_episodes(run_dir, flag_x, from_reset)
    rows, last = [], int(steps[-1])
    for start in range(0, last, window):
        end = min(start + window, last)
        in_window = (steps > start) & (steps <= end)
        if in_window.any():
            rows.append({"start": start, "end": end, "episodes": int(in_window.sum()),
                         "flags": int(cleared[in_window].sum()), "flag_rate": float(cleared[in_window].mean()),
                         "mean_max_x_pos": float(max_x[in_window].mean()),
                         "furthest_x_pos": float(max_x[in_window].max())})
            if past is not None:
                rows[-1]["past"] = int((max_x[in_window] > past).sum())
            if starts is not None:
                from_start = starts[in_window][starts[in_window] > 0]
                rows[-1]["from_start_states"] = len(from_start)
                rows[-1]["mean_start_step"] = float(from_start.mean()) if len(from_start) else 0.0
    first_flag = int(steps[np.argmax(cleared)]) if cleared.any() else None
    return rows, first_flag


def write_csv(path: str, runs: list[tuple[str, list[dict], int | None]]):
    """Write each (run directory, rows, first flag) of `runs` to one CSV: a comment line per run with its first flag
    and last episode step, then the rows of all runs with the run's name first."""
    with open(path, "w", newline="") as file:
        for run_dir, rows, first_flag in runs:
            flag = f"first flag at step {first_flag}" if first_flag is not None else "no flag"
            file.write(f"# {run_name(run_dir)}: {flag}, last episode at step {rows[-1]['end']}\n")
        writer = csv.writer(file)
        writer.writerow(["run"] + list(runs[0][1][0]))
        for run_dir, rows, _ in runs:
            for row in rows:
                writer.writerow([run_name(run_dir)] + [round(value, 4) for value in row.values()])


def run_name(run_dir: str) -> str:
    return os.path.basename(os.path.normpath(run_dir))


def where_misses_ended(run_dir: str, start: int, end: int, flag_x: int | None = None, bin_width: int = 50,
                       from_reset: bool = False) -> tuple[int, int, list[tuple[int, int]]]:
    """Of the episodes ending in steps (start, end]: how many, how many without the flag, and the max x_pos of those
    (each rounded down to its bin of `bin_width`) as (bin, count), the most common first: the walls of a run."""
    steps, max_x, cleared, _ = load_episodes(run_dir, flag_x, from_reset)
    in_span = (steps > start) & (steps <= end)
    missed = max_x[in_span & ~cleared]
    bins, counts = np.unique((missed // bin_width * bin_width).astype(int), return_counts=True)
    order = np.lexsort((bins, -counts))
    return int(in_span.sum()), len(missed), [(int(bins[i]), int(counts[i])) for i in order]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="run_dir", help="a run's directory (several: a table each)")
    parser.add_argument("--window", type=int, default=100_000, help="agent steps per row")
    parser.add_argument("--flag-x", type=int, help="x_pos of the flag, for runs without mario/episode_flag_get")
    parser.add_argument("--past", type=int, help="also count the episodes whose max x_pos went beyond this x_pos")
    parser.add_argument("--ends", type=int, nargs=2, metavar=("START", "END"),
                        help="also tell where the episodes ending in steps (START, END] without the flag stopped")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows of all runs given to this CSV file")
    parser.add_argument("--from-reset", action="store_true",
                        help="a run with --start-states: only the episodes that began at the reset state")
    args = parser.parse_args(argv)

    runs = []
    past = "" if args.past is None else f" past x {args.past} |"
    for run_dir in args.run_dirs:
        rows, first_flag = episode_windows(run_dir, args.window, args.flag_x, args.past, args.from_reset)
        runs.append((run_dir, rows, first_flag))
        if len(args.run_dirs) > 1:
            print(f"\n{run_name(run_dir)}:")
        starts = bool(rows) and "from_start_states" in rows[0]
        print(f"| steps | episodes | mean max x_pos | furthest x_pos | flag rate |{past}"
              + (" from a start state | mean start step |" if starts else ""))
        print("|-|-|-|-|-|" + ("-|" if past else "") + ("-|-|" if starts else ""))
        for row in rows:
            print(f"| {row['start'] / 1000:g}k-{row['end'] / 1000:g}k | {row['episodes']} | "
                  f"{row['mean_max_x_pos']:.0f} | {row['furthest_x_pos']:.0f} | {row['flag_rate']:.0%} |"
                  + (f" {row['past']} |" if past else "")
                  + (f" {row['from_start_states']} | {row['mean_start_step']:.0f} |" if starts else ""))
        print("first flag: " + (f"step {first_flag:,}" if first_flag is not None else "none yet"))
        if args.ends:
            start, end = args.ends
            episodes, missed, heaps = where_misses_ended(run_dir, start, end, args.flag_x, from_reset=args.from_reset)
            print(f"steps {start:,}-{end:,}: {episodes} episodes ended, {missed} without the flag; their max x_pos in "
                  "bins of 50 (bin: episodes), the largest heaps first: "
                  + ", ".join(f"{x}: {n}" for x, n in heaps[:10]))
    if args.csv:
        write_csv(args.csv, runs)
    return runs


if __name__ == "__main__":
    main()
