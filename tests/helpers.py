"""What the tests share: the scripts run as a user runs them, and their TensorBoard output read back."""

import os
import signal
import subprocess
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTED = []  # processes started by start_script, killed after each test (see conftest.py)


def run_script(script, *args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def start_script(script, *args):
    """A training process in its own process group, as a terminal would start it."""
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    STARTED.append(process)
    return process


def kill_started():
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def children_of(pid):
    return subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()


def only_run_dir(runs_dir):
    (run_dir,) = [os.path.join(runs_dir, name) for name in os.listdir(runs_dir)]
    return run_dir


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]
