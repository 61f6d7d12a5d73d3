"""Never lose a CartPole run: checkpoints, resume, signals, faults — driven as a user would, through the real CLI."""

import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch

from tests.helpers import children_of, only_run_dir, run_script, scalars, start_script

SCRIPT = "ppo_cartpole.py"


def run_cli(*args, timeout=300):
    return run_script(SCRIPT, *args, timeout=timeout)


def start_cli(*args):
    return start_script(SCRIPT, *args)


def test_checkpoints_hold_the_whole_state_and_only_the_newest_are_kept(tmp_path):
    result = run_cli("--total-timesteps", "2560", "--save-interval", "2", "--keep-checkpoints", "2",
                     "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_0000002048.pt", "step_0000002560.pt"]
    checkpoint = torch.load(os.path.join(run_dir, "checkpoints", "step_0000002560.pt"), weights_only=True)
    assert checkpoint["global_step"] == 2560 and checkpoint["iteration"] == 10
    assert checkpoint["env_id"] == "CartPole-v1" and checkpoint["obs_shape"] == [4] and checkpoint["num_actions"] == 2
    assert {"model", "optimizer", "rng", "args"} <= set(checkpoint)
    assert {"python", "numpy", "torch", "cuda"} == set(checkpoint["rng"])
    assert checkpoint["args"]["total_timesteps"] == 2560


def test_resume_continues_the_run_like_a_straight_one(tmp_path):
    # 40k steps straight, keeping the checkpoint from the middle.
    straight = tmp_path / "straight"
    args = ["--total-timesteps", "40000", "--save-interval", "78", "--keep-checkpoints", "5", "--seed", "1"]
    assert run_cli(*args, "--runs-dir", str(straight)).returncode == 0
    straight_dir = only_run_dir(straight)

    # The same run as if it had stopped in the middle: only its first half (curves and the mid checkpoint) is left.
    resumed_dir = tmp_path / "resumed" / os.path.basename(straight_dir)
    shutil.copytree(straight_dir, resumed_dir)
    for name in os.listdir(resumed_dir / "checkpoints"):
        if name != "step_0000019968.pt":
            os.remove(resumed_dir / "checkpoints" / name)
    result = run_cli("--resume", str(resumed_dir))
    assert result.returncode == 0, result.stderr
    assert f"resuming {resumed_dir} at iteration 78, step 19968" in result.stdout

    # TensorBoard: every iteration's point exactly once, with the straight run's learning-rate schedule.
    straight_lr, resumed_lr = scalars(straight_dir, "charts/learning_rate"), scalars(resumed_dir, "charts/learning_rate")
    assert [step for step, _ in resumed_lr] == [256 * i for i in range(1, 157)]
    np.testing.assert_allclose([v for _, v in resumed_lr], [v for _, v in straight_lr], rtol=1e-6)
    # Before the resume point the curves are the straight run's own; after it they go on from the saved state.
    returns = scalars(resumed_dir, "charts/episodic_return")
    steps = [step for step, _ in returns]
    assert steps == sorted(steps)
    assert [r for r in returns if r[0] <= 19968] == [r for r in scalars(straight_dir, "charts/episodic_return") if r[0] <= 19968]
    # The continued run learns as the straight one does (that the weights and optimizer state are the saved ones:
    # test_checkpoints.py).
    final = torch.load(resumed_dir / "checkpoints" / "step_0000039936.pt", weights_only=True)
    assert final["global_step"] == 39936 and final["iteration"] == 156
    assert np.mean([v for _, v in returns[-20:]]) >= 200
    assert np.mean([v for _, v in scalars(straight_dir, "charts/episodic_return")[-20:]]) >= 200


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_closes_workers_and_exits(tmp_path, sig, code):
    process = start_cli("--total-timesteps", "10000000", "--async-envs", "--num-envs", "3", "--log-interval", "5",
                        "--runs-dir", str(tmp_path))
    assert process.stdout.readline().startswith("iter 5/")
    workers = children_of(process.pid)
    assert len(workers) == 3
    os.killpg(process.pid, sig)  # to the whole group, like Ctrl-C in a terminal
    out, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert f"{signal.Signals(sig).name}: stopping after the current step and writing a checkpoint" in err
    assert "Traceback" not in err
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]
    run_dir = only_run_dir(tmp_path)
    (name,) = os.listdir(os.path.join(run_dir, "checkpoints"))
    checkpoint = torch.load(os.path.join(run_dir, "checkpoints", name), weights_only=True)
    assert checkpoint["iteration"] >= 5 and f"saved {os.path.join(run_dir, 'checkpoints', name)}" in out


def test_kill_9_loses_at_most_one_save_interval(tmp_path):
    process = start_cli("--total-timesteps", "10000000", "--save-interval", "4", "--log-interval", "1",
                        "--runs-dir", str(tmp_path))
    lines = [process.stdout.readline() for _ in range(12)]
    process.kill()
    process.wait(timeout=30)
    last_iteration = max(int(line.split()[1].split("/")[0]) for line in lines if line.startswith("iter"))
    run_dir = only_run_dir(tmp_path)
    newest = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))[-1]
    checkpoint = torch.load(os.path.join(run_dir, "checkpoints", newest), weights_only=True)
    assert last_iteration - checkpoint["iteration"] < 4
    # The run goes on from there; flags that would change it are ignored, with a warning.
    process = start_cli("--resume", run_dir, "--log-interval", "1", "--total-timesteps", "1")
    assert process.stdout.readline().startswith(f"resuming {run_dir} at iteration {checkpoint['iteration']}")
    assert process.stdout.readline().startswith(f"iter {checkpoint['iteration'] + 1}/")
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "warning: --total-timesteps 1 ignored: the resumed run keeps 10000000" in err


def test_a_dead_worker_is_a_clear_error_not_a_hang(tmp_path):
    process = start_cli("--total-timesteps", "10000000", "--async-envs", "--num-envs", "3", "--log-interval", "5",
                        "--runs-dir", str(tmp_path))
    assert process.stdout.readline().startswith("iter 5/")
    workers = children_of(process.pid)
    os.kill(int(workers[1]), signal.SIGKILL)
    started = time.time()
    _, err = process.communicate(timeout=60)
    assert time.time() - started < 30
    assert process.returncode == 1
    assert err.strip().splitlines() == [err.strip()]  # one line
    assert "error: environment worker 1 (CartPole-v1) died" in err and "--resume" in err
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]


def test_non_finite_gradients_stop_cleanly_and_keep_the_last_good_checkpoint(tmp_path):
    assert run_cli("--total-timesteps", "1024", "--runs-dir", str(tmp_path)).returncode == 0
    run_dir = only_run_dir(tmp_path)
    good = os.path.join(run_dir, "checkpoints", "step_0000001024.pt")
    before = torch.load(good, weights_only=True)
    # Resume under a new run with an absurd learning rate: the first update blows up.
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["args"]["learning_rate"] = 1e30
    checkpoint["args"]["total_timesteps"] = 4096
    torch.save(checkpoint, good)
    result = run_cli("--resume", run_dir)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: non-finite" in result.stderr and f"the last good checkpoint is {good}" in result.stderr
    after = torch.load(good, weights_only=True)
    assert os.listdir(os.path.join(run_dir, "checkpoints")) == ["step_0000001024.pt"]
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


@pytest.mark.parametrize("cli_args, message", [
    (["--runs-dir", "/proc/no-such-dir"], "cannot write the run directory /proc/no-such-dir/"),
    (["--resume", "/nonexistent-run"], "no checkpoint at /nonexistent-run"),
])
def test_bad_paths_get_one_clear_line(cli_args, message):
    result = run_cli(*cli_args)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_truncated_checkpoint_is_refused_clearly(tmp_path):
    assert run_cli("--total-timesteps", "256", "--runs-dir", str(tmp_path)).returncode == 0
    (path,) = (tmp_path / os.listdir(tmp_path)[0] / "checkpoints").iterdir()
    path.write_bytes(path.read_bytes()[:1000])
    for flag in ("--resume", "--eval-checkpoint"):
        result = run_cli(flag, str(path))
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert "the file is truncated or not a checkpoint" in result.stderr
