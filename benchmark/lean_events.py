"""Copy a run's TensorBoard event files without the scalar tags given, for committing runs that were logged with tags
ppo_mario.py no longer writes per episode (older runs wrote mario/x_pos, mario/world, mario/stage and the rolling
mario/flag_get at every episode). Every other event (steps, wall times, hyperparameter text) is copied unchanged, file
by file under the same names, so tbcurves.py, mario_windows.py and TensorBoard read the copy as they read the run.

    python benchmark/lean_events.py runs/<run> benchmark/mario-1-3/<probe>/<run>
"""

import argparse
import os
import sys

from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.record_writer import RecordWriter

DROPPED = ["mario/x_pos", "mario/world", "mario/stage", "mario/flag_get"]


def copy_lean(source: str, destination: str, dropped: list[str]) -> list[str]:
    """Write each events file of `source` to `destination` without the scalars tagged `dropped`; returns the names."""
    names = sorted(name for name in os.listdir(source) if name.startswith("events.out.tfevents"))
    if not names:
        sys.exit(f"error: {source} has no TensorBoard event files; give a run directory (runs/<run>)")
    os.makedirs(destination, exist_ok=True)
    for name in names:
        temporary = os.path.join(destination, name + ".tmp")
        with open(temporary, "wb") as file:
            writer = RecordWriter(file)
            for record in RawEventFileLoader(os.path.join(source, name)).Load():
                event = Event.FromString(record)  # as written: no read-time migration
                if event.HasField("summary"):
                    kept = [value for value in event.summary.value if value.tag not in dropped]
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
    parser.add_argument("--drop", nargs="+", default=DROPPED, help="scalar tags to leave out")
    args = parser.parse_args()
    if os.path.abspath(args.source) == os.path.abspath(args.destination):
        sys.exit("error: the destination is the source; give another directory")
    for name in copy_lean(args.source, args.destination, args.drop):
        before, after = (os.path.getsize(os.path.join(d, name)) for d in (args.source, args.destination))
        print(f"{name}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
