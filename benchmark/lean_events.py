"""Copy a run's TensorBoard event files without the scalar tags given, for committing runs that were logged with tags
ppo_mario.py no longer writes per episode (older runs wrote mario/x_pos, mario/world, mario/stage and the rolling
mario/flag_get at every episode). Every other event (steps, wall times, hyperparameter text) is copied unchanged, file
by file under the same names, so tbcurves.py, mario_windows.py and TensorBoard read the copy as they read the run.

--max-points N also thins each scalar tag to N evenly spaced points over the whole run (all its files), the first and
last kept: a reference curve of a few hundred kB. Tags logged once per episode have equally many points, so they keep
the same episodes and mario_windows.py still pairs them, though its per-window figures become a sample's.

    python benchmark/lean_events.py runs/<run> benchmark/mario-1-3/<probe>/<run>
    python benchmark/lean_events.py runs/<run> /tmp/<run> --max-points 1000 --drop    # drop no tag, thin them all
"""

import argparse
import collections
import os
import sys

import numpy as np
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.record_writer import RecordWriter

DROPPED = ["mario/x_pos", "mario/world", "mario/stage", "mario/flag_get"]


def events(path: str):
    for record in RawEventFileLoader(path).Load():
        yield Event.FromString(record)  # as written: no read-time migration


def scalar_counts(paths: list[str]) -> collections.Counter:
    """How many points each scalar tag has in these event files together."""
    counts = collections.Counter()
    for path in paths:
        for event in events(path):
            counts.update(value.tag for value in event.summary.value if value.HasField("simple_value"))
    return counts


def evenly_spaced(count: int, max_points: int) -> set[int]:
    """Indices of at most `max_points` evenly spaced points out of `count`, the first and the last included."""
    return set(np.linspace(0, count - 1, min(count, max_points)).round().astype(int).tolist())


def copy_lean(source: str, destination: str, dropped: list[str], max_points: int | None = None) -> list[str]:
    """Write each events file of `source` to `destination` without the scalars tagged `dropped` and, with
    `max_points`, with at most that many points per scalar tag; returns the names."""
    names = sorted(name for name in os.listdir(source) if name.startswith("events.out.tfevents"))
    if not names:
        sys.exit(f"error: {source} has no TensorBoard event files; give a run directory (runs/<run>)")
    paths = [os.path.join(source, name) for name in names]
    # The points kept are spaced over the run, not each file, so a resumed run's curve stays even across the resume.
    kept_points = ({tag: evenly_spaced(count, max_points) for tag, count in scalar_counts(paths).items()}
                   if max_points else {})
    seen = collections.Counter()  # points of each scalar tag read so far

    def keep(value) -> bool:
        if value.tag in dropped:
            return False
        if value.tag not in kept_points:  # not a scalar (the hyperparameter text), or no thinning asked
            return True
        seen[value.tag] += 1
        return seen[value.tag] - 1 in kept_points[value.tag]

    os.makedirs(destination, exist_ok=True)
    for name, path in zip(names, paths):
        temporary = os.path.join(destination, name + ".tmp")
        with open(temporary, "wb") as file:
            writer = RecordWriter(file)
            for event in events(path):
                if event.HasField("summary"):
                    kept = [value for value in event.summary.value if keep(value)]
                    if not kept:
                        continue
                    del event.summary.value[:]
                    event.summary.value.extend(kept)
                writer.write(event.SerializeToString())
            writer.flush()
        os.replace(temporary, os.path.join(destination, name))
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a run directory holding events.out.tfevents.* files")
    parser.add_argument("destination", help="where the lean copies go (created; same file names)")
    parser.add_argument("--drop", nargs="*", default=DROPPED, help="scalar tags to leave out (none: --drop alone)")
    parser.add_argument("--max-points", type=int, help="keep at most this many evenly spaced points per scalar tag")
    args = parser.parse_args()
    if os.path.abspath(args.source) == os.path.abspath(args.destination):
        sys.exit("error: the destination is the source; give another directory")
    if args.max_points is not None and args.max_points < 2:
        sys.exit("error: --max-points must be at least 2 (the first and the last point)")
    for name in copy_lean(args.source, args.destination, args.drop, args.max_points):
        before, after = (os.path.getsize(os.path.join(d, name)) for d in (args.source, args.destination))
        print(f"{name}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
