"""ppo_cartpole.py on real CartPole: autoreset, a real run, learning, and bad input (GAE, the losses and the update:
test_ppo_core.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_cartpole
from ppo_cartpole import Agent, Args, collect_rollout, empty_rollout, make_vector_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLEANRL_KEYS = [
    "charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS", "losses/value_loss",
    "losses/policy_loss", "losses/entropy", "losses/old_approx_kl", "losses/approx_kl", "losses/clipfrac",
    "losses/explained_variance",
]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "ppo_cartpole.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


# ----------------------------------------------------------------------------------------------------------- autoreset

def test_no_stored_transition_crosses_an_episode_boundary():
    args = Args(num_envs=4, num_steps=300, seed=3)
    envs = make_vector_env(args)
    agent = Agent(4, 2)  # untrained: episodes of ~10-40 steps, so many end inside the rollout
    rollout = empty_rollout(args.num_steps, args.num_envs, (4,), "cpu")
    next_obs, _ = envs.reset(seed=args.seed)
    next_obs, episodes = collect_rollout(envs, agent, rollout, torch.as_tensor(next_obs), "cpu")
    envs.close()

    obs = rollout["obs"].numpy()
    ends = (rollout["terminations"] + rollout["truncations"]).numpy() > 0
    assert ends.sum() >= 20 and len(episodes) == ends.sum()
    # CartPole's Euler step: x' = x + 0.02 * x_dot. Inside an episode the next stored observation follows from the
    # previous one; after an episode end it is a fresh reset state (every component within +-0.05) instead.
    continues = np.abs(obs[1:, :, 0] - (obs[:-1, :, 0] + 0.02 * obs[:-1, :, 1])) < 1e-5
    np.testing.assert_array_equal(continues, ~ends[:-1])
    assert np.all(np.abs(obs[1:][ends[:-1]]) <= 0.05)
    # Every stored transition is a real one: CartPole pays 1 per step, a NEXT_STEP reset step would pay 0.
    assert torch.all(rollout["rewards"] == 1.0)


# ----------------------------------------------------------------------------------------------------------- a real run

def test_short_run_logs_cleanrl_keys_saves_the_model_and_eval_plays_it(tmp_path):
    result = run_cli("--total-timesteps", "2048", "--runs-dir", str(tmp_path), "--seed", "7", "--capture-video")
    assert result.returncode == 0, result.stderr
    # A progress line per 5% of the run (here each of the 8 iterations): percent done, elapsed time and ETA.
    lines = [line for line in result.stdout.splitlines() if line.startswith("iter ")]
    assert [line.split()[1] for line in lines] == [f"{i}/8" for i in range(1, 9)]
    assert "  50%  elapsed 0:00:" in lines[3] and lines[-1].endswith("  ETA 0:00:00") and "  100%  elapsed " in lines[-1]
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "after_training.gif").stat().st_size > 10_000  # one greedy episode
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert set(CLEANRL_KEYS) <= set(events.Tags()["scalars"])
    assert "hyperparameters/text_summary" in events.Tags()["tensors"]
    steps = [e.step for e in events.Scalars("charts/SPS")]
    assert steps == [256 * i for i in range(1, 9)]
    episode_lengths = [e.value for e in events.Scalars("charts/episodic_length")]
    assert len(episode_lengths) >= 20 and all(length >= 8 for length in episode_lengths)

    video = tmp_path / "episode.gif"
    model = torch.load(run_dir / "model.pt", weights_only=True)
    assert model["global_step"] == 2048 and model["env_id"] == "CartPole-v1" and model["args"]["seed"] == 7
    result = run_cli("--eval-checkpoint", str(run_dir), "--eval-episodes", "3", "--video-path", str(video))
    assert result.returncode == 0, result.stderr
    assert "CartPole-v1: 3 greedy episodes, return" in result.stdout
    assert video.stat().st_size > 10_000


def test_a_short_run_learns(tmp_path):
    # Random play averages ~22; the defaults reach 500 by ~25-40k steps on the seeds we measured.
    args = Args(total_timesteps=40_000, seed=1, runs_dir=str(tmp_path))
    run_dir = ppo_cartpole.main(args)
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    returns = [e.value for e in events.Scalars("charts/episodic_return")]
    assert np.mean(returns[-20:]) >= 200, returns[-20:]

    agent, env_id = ppo_cartpole.load_model(run_dir, "cpu")
    assert env_id == "CartPole-v1"
    greedy_returns = ppo_cartpole.evaluate(agent, args, "cpu", episodes=3)
    assert np.mean(greedy_returns) >= 200, greedy_returns


# ----------------------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("cli_args, message", [
    (["--env-id", "CartPol-v1"], "unknown env id 'CartPol-v1'; did you mean CartPole-v1"),
    (["--env-id", "Pendulum-v1"], "Pendulum-v1 has a Box action space and observations of shape (3,); this PPO needs Discrete actions"),
    (["--num-minibatches", "3"], "--num-minibatches 3 does not divide the batch of 256"),
    (["--num-minibatches", "256"], "--num-minibatches 256 leaves 1 sample per minibatch of the batch of 256"),
    (["--num-envs", "0"], "--num-envs must be positive, got 0"),
    (["--learning-rate", "-1e-3"], "--learning-rate must be positive, got -0.001"),
    (["--total-timesteps", "100"], "--total-timesteps 100 is smaller than one batch of 256"),
    (["--eval-checkpoint", "/nonexistent/model.pt"], "no checkpoint at /nonexistent/model.pt"),
])
def test_bad_input_gets_one_clear_line(cli_args, message):
    result = run_cli(*cli_args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip().removeprefix('error: ')}"]
    assert message in result.stderr


def test_bad_checkpoints_are_refused_clearly(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    result = run_cli("--eval-checkpoint", str(corrupt))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "the file is truncated or not a checkpoint" in result.stderr

    assert run_cli("--total-timesteps", "256", "--runs-dir", str(tmp_path / "runs")).returncode == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    result = run_cli("--eval-checkpoint", str(run_dir), "--env-id", "Acrobot-v1", "--eval-episodes", "1")
    assert result.returncode == 0, result.stderr
    assert "CartPole-v1: 1 greedy episodes" in result.stdout  # a model plays the env it was trained on


def test_cuda_without_a_gpu_warns_and_trains_on_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_cli("--cuda", "--total-timesteps", "256", "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "warning: --cuda given but no CUDA device is available; training on CPU" in result.stderr
