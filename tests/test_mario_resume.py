"""Never lose a Mario run: resume, signals and faults with real emulator worker processes, through the real CLI."""

import os
import shutil
import signal

import numpy as np
import pytest
import torch

from tests.helpers import children_of, only_run_dir, run_script, scalars, start_script

SCRIPT = "ppo_mario.py"
TINY_RUN = ["--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "1"]


def run_cli(*args, timeout=600):
    return run_script(SCRIPT, *args, timeout=timeout)


def start_cli(*args):
    return start_script(SCRIPT, *args)


def test_resume_goes_on_with_continuous_curves(tmp_path):
    straight = tmp_path / "straight"
    assert run_cli("--total-timesteps", "768", "--save-interval", "3", "--runs-dir", str(straight), *TINY_RUN).returncode == 0
    straight_dir = only_run_dir(straight)
    resumed_dir = tmp_path / "resumed" / os.path.basename(straight_dir)
    shutil.copytree(straight_dir, resumed_dir)
    os.remove(resumed_dir / "checkpoints" / "step_0000000768.pt")

    result = run_cli("--resume", str(resumed_dir), "--action-set", "complex")
    assert result.returncode == 0, result.stderr
    assert "warning: --action-set complex ignored: the resumed run keeps right_only" in result.stderr
    assert f"resuming {resumed_dir} at iteration 3, step 384" in result.stdout
    lr = scalars(resumed_dir, "charts/learning_rate")
    assert [step for step, _ in lr] == [128 * i for i in range(1, 7)]
    np.testing.assert_allclose([v for _, v in lr], [v for _, v in scalars(straight_dir, "charts/learning_rate")], rtol=1e-6)
    final = torch.load(resumed_dir / "checkpoints" / "step_0000000768.pt", weights_only=True)
    assert final["iteration"] == 6 and final["action_set"] == "right_only" and final["num_actions"] == 5


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_group_checkpoints_and_leaves_no_emulator_behind(tmp_path, sig, code):
    process = start_cli("--total-timesteps", "1000000", "--runs-dir", str(tmp_path), *TINY_RUN)
    assert process.stdout.readline().startswith("iter 1/")
    workers = children_of(process.pid)
    assert len(workers) == 2
    os.killpg(process.pid, sig)  # to the whole group, like Ctrl-C in a terminal
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert f"{signal.Signals(sig).name}: stopping after the current step and writing a checkpoint" in err
    assert "Traceback" not in err
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]
    run_dir = only_run_dir(tmp_path)
    (name,) = os.listdir(os.path.join(run_dir, "checkpoints"))
    checkpoint = torch.load(os.path.join(run_dir, "checkpoints", name), weights_only=True)
    assert checkpoint["iteration"] >= 1 and checkpoint["env_id"] == "SuperMarioBros-1-1-v0"


def test_a_dead_emulator_worker_is_a_clear_error(tmp_path):
    process = start_cli("--total-timesteps", "1000000", "--runs-dir", str(tmp_path), *TINY_RUN)
    assert process.stdout.readline().startswith("iter 1/")
    workers = children_of(process.pid)
    os.kill(int(workers[0]), signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1 and len(err.strip().splitlines()) == 1
    assert "error: environment worker 0 (SuperMarioBros-1-1-v0) died" in err
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]


def test_a_checkpoint_for_another_env_is_refused_naming_both(tmp_path):
    assert run_cli("--total-timesteps", "128", "--runs-dir", str(tmp_path), *TINY_RUN).returncode == 0
    result = run_cli("--eval-checkpoint", only_run_dir(tmp_path), "--env-id", "ALE/Breakout-v5")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert ("is for SuperMarioBros-1-1-v0 (observations [4, 84, 84], 5 actions), not ALE/Breakout-v5 "
            "(observations [4, 84, 84], 4 actions)") in result.stderr


def test_a_fork_is_a_new_run_that_starts_from_the_checkpoints_weights_optimizer_and_step(tmp_path):
    assert run_cli("--total-timesteps", "256", "--ent-coef", "0.03", "--runs-dir", str(tmp_path / "parent"),
                   *TINY_RUN).returncode == 0
    parent_dir = only_run_dir(tmp_path / "parent")
    parent = torch.load(os.path.join(parent_dir, "checkpoints", "step_0000000256.pt"), weights_only=True)

    # A learning rate of 1e-12 moves no weight: the fork's checkpoints hold the weights it started from.
    result = run_cli("--fork", parent_dir, "--exp-name", "forked", "--learning-rate", "1e-12", "--total-timesteps",
                     "768", "--save-interval", "1", "--runs-dir", str(tmp_path / "fork"))
    assert result.returncode == 0, result.stderr
    fork_dir = only_run_dir(tmp_path / "fork")
    assert os.path.basename(fork_dir).startswith("SuperMarioBros-1-1-v0__forked__1__")
    assert f"forking {parent_dir} at step 256 into {fork_dir}" in result.stdout
    forked = torch.load(os.path.join(fork_dir, "checkpoints", "step_0000000512.pt"), weights_only=True)
    assert forked["args"]["learning_rate"] == 1e-12 and forked["args"]["fork"] == parent_dir
    assert forked["args"]["ent_coef"] == 0.03 and forked["args"]["num_envs"] == 2  # flags not given: the parent's
    for name, tensor in parent["model"].items():
        torch.testing.assert_close(forked["model"][name], tensor, atol=1e-9, rtol=0)
    # Adam's own step count goes on: 2 iterations of 2 minibatches after the parent's.
    assert forked["optimizer"]["state"][0]["step"] == parent["optimizer"]["state"][0]["step"] + 4
    # The curves go on from step 256 on the schedule of 6 iterations, of which the parent's 2 are done.
    lr = scalars(fork_dir, "charts/learning_rate")
    assert [step for step, _ in lr] == [384, 512, 640, 768]
    np.testing.assert_allclose([v for _, v in lr], [1e-12 * (1 - i / 6) for i in range(2, 6)], rtol=1e-6)

    # Resumed, the fork goes on from its own newest checkpoint, not from the parent its Args name.
    os.remove(os.path.join(fork_dir, "checkpoints", "step_0000000768.pt"))
    result = run_cli("--resume", fork_dir)
    assert result.returncode == 0, result.stderr
    assert f"resuming {fork_dir} at iteration 5, step 640" in result.stdout
    resumed = torch.load(os.path.join(fork_dir, "checkpoints", "step_0000000768.pt"), weights_only=True)
    assert resumed["iteration"] == 6 and resumed["args"]["fork"] == parent_dir
    assert resumed["optimizer"]["state"][0]["step"] == parent["optimizer"]["state"][0]["step"] + 8
    assert [step for step, _ in scalars(fork_dir, "charts/learning_rate")] == [384, 512, 640, 768]


def test_an_evaluation_only_export_forks_with_its_weights_and_step_and_a_fresh_optimizer(tmp_path):
    # How a run goes on across machines that keep no runs/: its newest checkpoint exported (no optimizer state) and
    # forked from there.
    assert run_cli("--total-timesteps", "256", "--ent-coef", "0.03", "--runs-dir", str(tmp_path / "parent"),
                   *TINY_RUN).returncode == 0
    parent_dir = only_run_dir(tmp_path / "parent")
    parent = torch.load(os.path.join(parent_dir, "checkpoints", "step_0000000256.pt"), weights_only=True)
    export = str(tmp_path / "relay.pt")
    result = run_script("benchmark/mario_clear_rate.py", parent_dir, "--episodes", "1", "--target", "0", "--export",
                        export, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "optimizer" not in torch.load(export, weights_only=True)

    result = run_cli("--fork", export, "--learning-rate", "1e-12", "--total-timesteps", "512", "--runs-dir",
                     str(tmp_path / "fork"))
    assert result.returncode == 0, result.stderr
    assert f"forking {export} at step 256 into" in result.stdout
    forked = torch.load(os.path.join(only_run_dir(tmp_path / "fork"), "checkpoints", "step_0000000512.pt"),
                        weights_only=True)
    assert forked["args"]["ent_coef"] == 0.03 and forked["args"]["num_envs"] == 2  # the export's Args go on
    for name, tensor in parent["model"].items():
        torch.testing.assert_close(forked["model"][name], tensor, atol=1e-9, rtol=0)
    # A fresh Adam: 2 iterations of 2 minibatches, not the parent's count and more.
    assert forked["optimizer"]["state"][0]["step"] == 4 < parent["optimizer"]["state"][0]["step"] + 4


def test_a_fork_that_cannot_go_on_is_one_clear_line(tmp_path):
    assert run_cli("--total-timesteps", "256", "--runs-dir", str(tmp_path / "parent"), *TINY_RUN).returncode == 0
    parent_dir = only_run_dir(tmp_path / "parent")
    for cli_args, message in [
        (["--action-set", "complex", "--total-timesteps", "512"],
         "(observations [4, 84, 84], 5 actions), not SuperMarioBros-1-1-v0 (observations [4, 84, 84], 12 actions); "
         "keep its --action-set (right_only)"),
        ([], "is at step 256, already at --total-timesteps 256; raise --total-timesteps"),  # the parent's total
        (["--resume", parent_dir], "--resume continues a run and --fork starts a new one"),
    ]:
        result = run_cli("--fork", parent_dir, "--runs-dir", str(tmp_path / "fork"), *cli_args)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def checkpoint_steps(run_dir):
    """The steps of the run's checkpoints (a kill -9 may leave a half-written step_*.pt.tmp, never a step_*.pt)."""
    return [int(name[5:15]) for name in sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) if name.endswith(".pt")]


def test_a_plain_resume_keeps_the_runs_save_settings_and_a_flag_given_wins(tmp_path):
    # Saved every iteration, all kept: the way a run keeps checkpoints to pick the best one by evaluation.
    assert run_cli("--total-timesteps", "768", "--save-interval", "1", "--keep-checkpoints", "100", "--runs-dir",
                   str(tmp_path), *TINY_RUN).returncode == 0
    run_dir = only_run_dir(tmp_path)
    for step in (512, 640, 768):
        os.remove(os.path.join(run_dir, "checkpoints", f"step_{step:010d}.pt"))

    # --help shows the run's own values as the defaults.
    result = run_cli("--resume", run_dir, "--help")
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.replace("│", " ").split())
    assert "how many of the newest checkpoints to keep (default: 100)" in help_text
    assert "steps per environment per rollout (default: 64)" in help_text

    result = run_cli("--resume", run_dir)  # with the defaults, it would save only at the end and keep 3
    assert result.returncode == 0, result.stderr
    assert checkpoint_steps(run_dir) == [128 * i for i in range(1, 7)]
    final = torch.load(os.path.join(run_dir, "checkpoints", "step_0000000768.pt"), weights_only=True)
    assert final["args"]["save_interval"] == 1 and final["args"]["keep_checkpoints"] == 100

    # Given explicitly, even at its default value, a flag wins and the later checkpoints record it.
    os.remove(os.path.join(run_dir, "checkpoints", "step_0000000768.pt"))
    result = run_cli("--resume", run_dir, "--keep-checkpoints", "3")
    assert result.returncode == 0, result.stderr
    assert checkpoint_steps(run_dir) == [512, 640, 768]
    final = torch.load(os.path.join(run_dir, "checkpoints", "step_0000000768.pt"), weights_only=True)
    assert final["args"]["save_interval"] == 1 and final["args"]["keep_checkpoints"] == 3


def test_a_fork_keeps_its_parents_save_and_video_settings_unless_given(tmp_path):
    assert run_cli("--total-timesteps", "256", "--save-interval", "1", "--keep-checkpoints", "100",
                   "--video-interval", "7", "--runs-dir", str(tmp_path / "parent"), *TINY_RUN).returncode == 0
    parent_dir = only_run_dir(tmp_path / "parent")

    result = run_cli("--fork", parent_dir, "--total-timesteps", "768", "--runs-dir", str(tmp_path / "fork"))
    assert result.returncode == 0, result.stderr
    fork_dir = only_run_dir(tmp_path / "fork")
    assert checkpoint_steps(fork_dir) == [384, 512, 640, 768]
    final = torch.load(os.path.join(fork_dir, "checkpoints", "step_0000000768.pt"), weights_only=True)
    assert final["args"]["video_interval"] == 7 and final["args"]["keep_checkpoints"] == 100

    result = run_cli("--fork", parent_dir, "--total-timesteps", "768", "--keep-checkpoints", "3", "--save-interval",
                     "2", "--runs-dir", str(tmp_path / "fork2"))
    assert result.returncode == 0, result.stderr
    fork_dir = only_run_dir(tmp_path / "fork2")
    assert checkpoint_steps(fork_dir) == [512, 768]  # iterations 4 and 6 (and the last)
    final = torch.load(os.path.join(fork_dir, "checkpoints", "step_0000000768.pt"), weights_only=True)
    assert final["args"]["save_interval"] == 2 and final["args"]["keep_checkpoints"] == 3


def test_checkpoints_hold_the_whole_state_and_only_the_newest_are_kept(tmp_path):
    assert run_cli("--total-timesteps", "640", "--save-interval", "2", "--keep-checkpoints", "2", "--runs-dir",
                   str(tmp_path), *TINY_RUN).returncode == 0
    run_dir = only_run_dir(tmp_path)
    assert checkpoint_steps(run_dir) == [512, 640]  # iterations 4 and 5 (the last); 256 pruned
    checkpoint = torch.load(os.path.join(run_dir, "checkpoints", "step_0000000640.pt"), weights_only=True)
    assert checkpoint["global_step"] == 640 and checkpoint["iteration"] == 5 and checkpoint["world_size"] == 1
    assert checkpoint["env_id"] == "SuperMarioBros-1-1-v0" and checkpoint["obs_shape"] == [4, 84, 84]
    assert checkpoint["num_actions"] == 5 and checkpoint["action_set"] == "right_only"
    assert {"model", "optimizer", "rng", "args"} <= set(checkpoint)
    assert {"python", "numpy", "torch", "cuda"} == set(checkpoint["rng"])
    assert checkpoint["args"]["total_timesteps"] == 640


def test_a_checkpoint_written_before_an_option_existed_says_so_and_a_given_flag_sets_it(tmp_path):
    assert run_cli("--total-timesteps", "384", "--save-interval", "1", "--runs-dir", str(tmp_path),
                   *TINY_RUN).returncode == 0
    run_dir = only_run_dir(tmp_path)
    path = os.path.join(run_dir, "checkpoints", "step_0000000256.pt")
    os.remove(os.path.join(run_dir, "checkpoints", "step_0000000384.pt"))
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["args"]["sticky_actions"], checkpoint["args"]["pay_skipped_ground"]  # as an older version wrote it
    torch.save(checkpoint, path)

    result = run_cli("--resume", run_dir, "--no-pay-skipped-ground")
    assert result.returncode == 0, result.stderr
    assert (f"warning: {run_dir} was written before these options existed; the run goes on with --sticky-actions 0.0, "
            "--pay-skipped-ground False (give a flag to choose another value)") in result.stderr
    assert "ignored" not in result.stderr
    resumed = torch.load(os.path.join(run_dir, "checkpoints", "step_0000000384.pt"), weights_only=True)["args"]
    assert resumed["pay_skipped_ground"] is False and resumed["sticky_actions"] == 0.0


def test_a_resumed_run_goes_on_with_its_envs_start_state_curricula(tmp_path):
    assert run_cli("--total-timesteps", "384", "--save-interval", "1", "--start-states", "1", "--runs-dir",
                   str(tmp_path), *TINY_RUN).returncode == 0
    run_dir = only_run_dir(tmp_path)
    path = os.path.join(run_dir, "checkpoints", "step_0000000256.pt")
    checkpoint = torch.load(path, weights_only=True)
    keys = {"furthest_actions", "furthest_x", "furthest_cleared", "start_point", "outcomes"}
    assert [set(curriculum) for curriculum in checkpoint["start_states"]] == [keys, keys]  # one per env
    os.remove(os.path.join(run_dir, "checkpoints", "step_0000000384.pt"))
    # Curricula no episode of the resumed run can replace (their furthest episodes reached the flag), one per env.
    curricula = [{"furthest_actions": [1] * 30 + [0] * 10, "furthest_x": 3000 + env, "furthest_cleared": True,
                  "start_point": 20 + env, "outcomes": [True, False]} for env in range(2)]
    checkpoint["start_states"] = curricula
    torch.save(checkpoint, path)

    result = run_cli("--resume", run_dir)
    assert result.returncode == 0, result.stderr
    resumed = torch.load(os.path.join(run_dir, "checkpoints", "step_0000000384.pt"), weights_only=True)
    for saved, now in zip(curricula, resumed["start_states"], strict=True):
        assert now["outcomes"][:2] == saved["outcomes"]  # 64 steps from step 20 add at most a few episodes
        del now["outcomes"], saved["outcomes"]
        assert now == saved


def test_kill_9_loses_at_most_one_save_interval_and_the_run_goes_on_from_there(tmp_path):
    process = start_cli("--total-timesteps", "1000000", "--save-interval", "2", "--runs-dir", str(tmp_path), *TINY_RUN)
    lines = [process.stdout.readline() for _ in range(8)]
    process.kill()
    process.wait(timeout=30)
    last_iteration = max(int(line.split()[1].split("/")[0]) for line in lines if line.startswith("iter"))
    run_dir = only_run_dir(tmp_path)
    newest = torch.load(os.path.join(run_dir, "checkpoints", f"step_{checkpoint_steps(run_dir)[-1]:010d}.pt"),
                        weights_only=True)
    assert last_iteration - newest["iteration"] <= 2  # iteration 6 may be printed but not yet saved
    # The run goes on from there; flags that would change it are ignored, with a warning.
    process = start_cli("--resume", run_dir, "--total-timesteps", "1")
    assert process.stdout.readline().startswith(f"resuming {run_dir} at iteration {newest['iteration']}")
    assert process.stdout.readline().startswith(f"iter {newest['iteration'] + 1}/")
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "warning: --total-timesteps 1 ignored: the resumed run keeps 1000000" in err


def test_non_finite_gradients_stop_cleanly_and_keep_the_last_good_checkpoint(tmp_path):
    assert run_cli("--total-timesteps", "256", "--runs-dir", str(tmp_path), *TINY_RUN).returncode == 0
    run_dir = only_run_dir(tmp_path)
    good = os.path.join(run_dir, "checkpoints", "step_0000000256.pt")
    before = torch.load(good, weights_only=True)
    # Resumed with an absurd learning rate written into the run's Args, the first update blows up.
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["args"]["learning_rate"] = 1e30
    checkpoint["args"]["total_timesteps"] = 1024
    torch.save(checkpoint, good)
    result = run_cli("--resume", run_dir)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: non-finite" in result.stderr and f"the last good checkpoint is {good}" in result.stderr
    assert checkpoint_steps(run_dir) == [256]
    after = torch.load(good, weights_only=True)
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])

    # A truncated checkpoint is refused in one line, whether resumed or played.
    with open(good, "rb") as f:
        head = f.read(1000)
    with open(good, "wb") as f:
        f.write(head)
    for flag in ("--resume", "--eval-checkpoint"):
        result = run_cli(flag, good)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert "the file is truncated or not a checkpoint" in result.stderr


def test_bad_paths_get_one_clear_line():
    for cli_args, message in [(["--runs-dir", "/proc/no-such-dir"], "cannot write the run directory /proc/no-such-dir/"),
                              (["--resume", "/nonexistent-run"], "no checkpoint at /nonexistent-run")]:
        result = run_cli(*cli_args)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
