"""Mario checkpoints: what a resume restores (RNG streams, weights, optimizer state), what it refuses, and
that an error once the environments run closes them. Real runs through the real CLI."""

import os
import random
import subprocess
import time

import numpy as np
import pytest
import torch

import ppo_mario
from tests.helpers import ROOT, only_run_dir, run_script, start_script

SCRIPTS = [pytest.param(ppo_mario, id="mario")]
# A few iterations, each a batch of 128 (2 Async envs x 64 steps).
TINY = {ppo_mario: ["--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "1"]}


def script_file(script):
    return os.path.basename(script.__file__)


def tiny_run(script, runs_dir, *args):
    result = run_script(script_file(script), "--runs-dir", str(runs_dir), *TINY[script], *args)
    assert result.returncode == 0, result.stderr
    return only_run_dir(runs_dir)


def checkpoint_files(run_dir):
    return sorted(os.listdir(os.path.join(run_dir, "checkpoints")))


def finished_run_checkpoint(script, runs_dir):
    """A finished run of 256 steps (one or two iterations): its directory, its one checkpoint's path, and that
    checkpoint, to edit."""
    run_dir = tiny_run(script, runs_dir, "--total-timesteps", "256")
    (name,) = checkpoint_files(run_dir)
    path = os.path.join(run_dir, "checkpoints", name)
    return run_dir, path, torch.load(path, weights_only=True)


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


@pytest.mark.parametrize("script", SCRIPTS)
def test_rng_states_load_to_the_cpu_and_go_on_as_in_the_uninterrupted_process(script, tmp_path):
    script.seed_everything(5, True)
    draws()  # the run has drawn from every generator before it saves
    path = str(tmp_path / "step.pt")
    torch.save({"model": {"w": torch.ones(2)}, "rng": script.get_rng_states()}, path)
    uninterrupted = [draws() for _ in range(3)]

    script.seed_everything(6, True)  # a new process, seeded as train() seeds it before loading the checkpoint
    draws()
    checkpoint = script.load_checkpoint(path, torch.device("meta"))  # the model goes to the device asked for ...
    assert checkpoint["model"]["w"].device.type == "meta"
    rng_tensors = [checkpoint["rng"]["torch"], checkpoint["rng"]["numpy"][1], *checkpoint["rng"]["cuda"]]
    assert all(t.device.type == "cpu" for t in rng_tensors)  # ... the RNG states stay on the CPU
    script.set_rng_states(checkpoint["rng"])
    assert [draws() for _ in range(3)] == uninterrupted


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_restores_the_weights_and_the_optimizer_state(script, tmp_path):
    run_dir = tiny_run(script, tmp_path, "--total-timesteps", "512",
                       "--save-interval", "2", "--keep-checkpoints", "10")
    first, *_, last = checkpoint_files(run_dir)
    straight_last = torch.load(os.path.join(run_dir, "checkpoints", last), weights_only=True)
    for name in checkpoint_files(run_dir)[1:]:
        os.remove(os.path.join(run_dir, "checkpoints", name))
    # Mark the state the resume must start from: a critic bias no training run would reach in a few steps, and Adam's
    # moment estimates of that bias. Loaded, they stay near these values; a fresh model or optimizer would not.
    path = os.path.join(run_dir, "checkpoints", first)
    checkpoint = torch.load(path, weights_only=True)
    bias = [name for name in checkpoint["model"] if name.startswith("critic") and name.endswith("bias")][-1]
    index = list(checkpoint["model"]).index(bias)
    checkpoint["model"][bias].fill_(100.0)
    adam = checkpoint["optimizer"]["state"][index]
    adam["exp_avg_sq"].fill_(1e6)  # a huge second moment: Adam's steps on this bias become ~1000x smaller
    steps_before = int(adam["step"])
    torch.save(checkpoint, path)

    result = run_script(script_file(script), "--resume", run_dir)
    assert result.returncode == 0, result.stderr
    resumed_last = torch.load(os.path.join(run_dir, "checkpoints", last), weights_only=True)
    assert resumed_last["iteration"] == straight_last["iteration"]
    assert abs(float(resumed_last["model"][bias]) - 100.0) < 0.01
    resumed_adam = resumed_last["optimizer"]["state"][index]
    assert int(resumed_adam["step"]) == int(straight_last["optimizer"]["state"][index]["step"]) > steps_before
    assert float(resumed_adam["exp_avg_sq"]) > 1e5


def tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files + [""])


def test_resuming_an_evaluation_only_model_is_one_line_and_creates_nothing(tmp_path):
    # A copy in its own folder, so that anything the resume would create beside it (checkpoints/, runs/) shows.
    models = tmp_path / "models"
    models.mkdir()
    model = models / "SuperMarioBros-1-1-v0.pt"
    model.write_bytes(open(os.path.join(ROOT, "models", "SuperMarioBros-1-1-v0.pt"), "rb").read())
    before = tree(tmp_path)
    result = run_script("ppo_mario.py", "--resume", str(model), "--runs-dir", str(tmp_path / "runs"), timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {model} is an evaluation-only model (no optimizer state); play it with --eval-checkpoint, or resume "
        "from runs/<run>/checkpoints"]
    assert tree(tmp_path) == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_of_another_world_size_is_refused(script, tmp_path):
    run_dir, path, checkpoint = finished_run_checkpoint(script, tmp_path)
    assert checkpoint["world_size"] == 1
    checkpoint["world_size"] = 2
    torch.save(checkpoint, path)
    result = run_script(script_file(script), "--resume", run_dir)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {path} was written by a run on 2 torchrun rank(s), not 1; resume it with torchrun --nproc_per_node 2, "
        "or start a new run"]


def processes_mentioning(text):
    """Live processes whose command line holds `text` (forked env workers share their parent's)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_error_once_the_environments_run_closes_them(script, tmp_path):
    # A real error after the env workers have started: an optimizer state that does not fit the model (torch raises
    # ValueError as the resume loads it). The process must end, and take its env worker processes with it.
    run_dir, path, checkpoint = finished_run_checkpoint(script, tmp_path)
    checkpoint["args"]["total_timesteps"] = 10 ** 7
    checkpoint["optimizer"]["param_groups"][0]["params"] = [0]
    torch.save(checkpoint, path)
    process = start_script(script_file(script), "--resume", run_dir)
    try:
        _, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the process hung after the error")
    assert process.returncode == 1 and "ValueError" in err
    deadline = time.time() + 10
    while processes_mentioning(str(tmp_path)) and time.time() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(str(tmp_path)) == []
