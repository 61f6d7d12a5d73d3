"""ppo_mario.py on the real NES emulator (the ROM ships with gym-super-mario-bros) and on real ALE."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ppo_mario import (Agent, Args, EnvGroups, Rollout, collect_rollout, draw_action_probs, evaluate,
                       is_gymnasium_native, make_env)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE = "SuperMarioBros-1-1-v0"
RIGHT, RIGHT_JUMP = 1, 2  # indices in the right_only (default) and simple action sets
TINY_RUN = ["--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "1"]


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, "ppo_mario.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def play(env, actions):
    """Step the real env through `actions` (stopping at an episode end); returns rewards, infos and the last flags."""
    env.reset(seed=0)
    rewards, infos = [], []
    for action in actions:
        _, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
        infos.append(info)
        if terminated or truncated:
            break
    return np.array(rewards), infos, terminated, truncated


# ----------------------------------------------------------------------------------------------------------- env

@pytest.mark.parametrize("action_set, num_actions", [("right_only", 5), ("simple", 7), ("complex", 12)])
def test_env_factory_observations_and_action_sets(action_set, num_actions):
    env = make_env(Args(env_id=STAGE, action_set=action_set))()
    obs, _ = env.reset(seed=0)
    assert env.action_space.n == num_actions
    assert env.observation_space.shape == obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    obs, *_ = env.step(RIGHT)
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8 and obs.max() > obs.min()
    env.close()


@pytest.mark.skipif(is_gymnasium_native(), reason="the 9.x reward holds its own score, flag and death terms")
def test_reward_options_change_the_reward_as_documented():
    raw_env = make_env(Args(env_id=STAGE, flag_bonus=0, death_penalty=0, score_coef=0, reward_scale=1))()
    shaped_env = make_env(Args(env_id=STAGE, flag_bonus=50, death_penalty=30, score_coef=0.05, reward_scale=0.1))()

    # Holding right walks Mario into the first Goomba: a death, ending the episode.
    raw, _, terminated, _ = play(raw_env, [RIGHT] * 200)
    shaped, _, _, _ = play(shaped_env, [RIGHT] * 200)
    assert terminated and 20 < len(raw) < 100
    np.testing.assert_allclose(shaped[:-1], 0.1 * raw[:-1], atol=1e-9)
    assert shaped[-1] == pytest.approx(0.1 * (raw[-1] - 30))

    # Jumping onto it instead stomps it for 100 points: the score term pays score_coef per point.
    stomp = [RIGHT] * 24 + [RIGHT_JUMP] * 8 + [RIGHT] * 20
    raw, infos, _, _ = play(raw_env, stomp)
    shaped, _, _, _ = play(shaped_env, stomp)
    scores = np.diff([0] + [info["score"] for info in infos])
    assert scores.sum() >= 100
    np.testing.assert_allclose(shaped, 0.1 * (raw + 0.05 * scores), atol=1e-9)
    raw_env.close()
    shaped_env.close()


def test_stuck_timeout_truncates_and_records_progress():
    env = make_env(Args(env_id=STAGE, stuck_timeout=10))()
    _, infos, terminated, truncated = play(env, [RIGHT] * 5 + [0] * 100)  # walk a little, then stand still
    assert truncated and not terminated
    x_positions = [info["x_pos"] for info in infos]
    last_progress = x_positions.index(max(x_positions))  # Mario slides on a few steps after letting go of right
    assert len(infos) - 1 - last_progress == 10
    assert infos[-1]["max_x_pos"] == max(x_positions) > 40
    env.close()


def steps_to_first_goomba(env, seed):
    """Hold right from a reset: Mario walks into a Goomba; how many agent steps that takes."""
    env.reset(seed=seed)
    for step in range(1, 200):
        _, _, terminated, truncated, _ = env.step(RIGHT)
        if terminated or truncated:
            return step
    raise AssertionError("Mario did not die within 200 steps of holding right")


def test_noop_starts_change_when_the_goombas_arrive_and_repeat_under_a_seed():
    # 1-2 starts with Goombas on screen, walking toward Mario (1-1's first one waits off screen until Mario comes).
    plain = make_env(Args(env_id="SuperMarioBros-1-2-v0"))()
    assert {steps_to_first_goomba(plain, seed) for seed in range(4)} == {steps_to_first_goomba(plain, 0)}
    env = make_env(Args(env_id="SuperMarioBros-1-2-v0", noop_max=30))()
    # The Goombas come closer during the no-ops, so holding right meets one sooner after a longer wait.
    steps = [steps_to_first_goomba(env, seed) for seed in range(8)]
    assert len(set(steps)) >= 3 and max(steps) <= steps_to_first_goomba(plain, 0)
    assert [steps_to_first_goomba(env, seed) for seed in range(8)] == steps
    plain.close()
    env.close()


# ----------------------------------------------------------------------------------------------------------- autoreset

@pytest.mark.parametrize("sync_envs, groups", [(True, 1), (False, 2)])  # (False, 2): the pipelined rollout
def test_no_stored_transition_crosses_a_real_episode_end(sync_envs, groups):
    args = Args(env_id=STAGE, num_envs=3, num_steps=100, stuck_timeout=4, sync_envs=sync_envs, seed=2)
    envs = EnvGroups(args)
    assert len(envs.groups) == groups
    torch.manual_seed(0)
    agent = Agent(4, envs.single_action_space.n)
    rollout = Rollout.empty(args.num_steps, args.num_envs, (4, 84, 84), "cpu")
    first_obs = envs.reset(seed=args.seed)
    _, episodes = collect_rollout(envs, agent, rollout, torch.as_tensor(first_obs), "cpu")
    envs.close()

    obs = rollout.obs.numpy()
    ends = (rollout.terminations + rollout.truncations).numpy() > 0
    assert ends.sum() >= 4 and len(episodes) == ends.sum()
    for t in range(args.num_steps - 1):
        for env in range(args.num_envs):
            if ends[t, env]:
                # The next stored observation starts a new episode: the emulator's reset screen, the same every time.
                np.testing.assert_array_equal(obs[t + 1, env], first_obs[env])
            else:
                # Inside an episode the frame stack slides by one frame.
                np.testing.assert_array_equal(obs[t + 1, env, :3], obs[t, env, 1:])
    # Truncated (stuck) episodes bootstrap from the value of their real final observation.
    truncated = rollout.truncations.numpy() > 0
    assert truncated.any() and np.all(rollout.final_values.numpy()[truncated] != 0)
    assert np.all(rollout.final_values.numpy()[~truncated] == 0)
    for _, episode in episodes:
        assert episode["max_x_pos"] >= episode["x_pos"] > 0 and episode["world"] == 1 and episode["stage"] == 1


# ----------------------------------------------------------------------------------------------------------- real runs

def test_short_training_run_logs_mario_keys_and_eval_plays_the_checkpoint(tmp_path):
    result = run_cli("--total-timesteps", "512", "--runs-dir", str(tmp_path), "--stuck-timeout", "20",
                     "--capture-video", "--video-interval", "2", *TINY_RUN)
    assert result.returncode == 0, result.stderr
    assert "Gym has been unmaintained" not in result.stderr
    (run_dir,) = tmp_path.iterdir()
    assert sorted(os.listdir(run_dir / "videos")) == ["iteration_00002.mp4", "iteration_00004.mp4"]
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS",
                "charts/rollout_SPS", "losses/value_loss", "losses/policy_loss", "losses/entropy",
                "losses/old_approx_kl", "losses/approx_kl", "losses/clipfrac", "losses/explained_variance",
                "mario/x_pos", "mario/max_x_pos", "mario/flag_get", "mario/episode_flag_get", "mario/world",
                "mario/stage"}
    assert expected <= tags, expected - tags
    assert [e.step for e in events.Scalars("charts/SPS")] == [128, 256, 384, 512]
    assert all(0 < e.value < 3300 for e in events.Scalars("mario/x_pos"))
    assert {e.value for e in events.Scalars("mario/episode_flag_get")} <= {0.0, 1.0}

    checkpoint = torch.load(run_dir / "checkpoints" / "step_0000000512.pt", weights_only=True)
    assert checkpoint["env_id"] == STAGE and checkpoint["num_actions"] == 5 and checkpoint["global_step"] == 512

    video = tmp_path / "eval.mp4"
    result = run_cli("--eval-checkpoint", str(run_dir), "--eval-episodes", "2", "--stuck-timeout", "20",
                     "--video-path", str(video))
    assert result.returncode == 0, result.stderr
    assert f"{STAGE}: 2 greedy episodes, cleared 0/2 (0%), furthest stage 1-1, mean x_pos" in result.stdout
    assert video.stat().st_size > 10_000


def test_sampled_evaluation_samples_and_repeats_under_the_same_seed():
    torch.manual_seed(0)
    agent = Agent(4, 5)  # untrained: near-uniform probabilities, so sampled play differs from greedy play

    def play_evaluation(**kwargs):
        args = Args(env_id=STAGE, seed=3, stuck_timeout=20, eval_noop_max=0, **kwargs)
        return [(r["length"], r["x_pos"]) for r in evaluate(agent, args, "cpu", episodes=2)]

    sampled = play_evaluation(eval_sample=True)
    torch.rand(100)  # training's random stream moving on must not change the evaluation
    assert play_evaluation(eval_sample=True) == sampled
    assert play_evaluation() != sampled


def test_action_probabilities_are_drawn_above_the_frame():
    frame = np.zeros((240, 256, 3), dtype=np.uint8)
    annotated = draw_action_probs(frame, np.array([0.1, 0.9]), ["NOOP", "right"], chosen=1)
    panel = annotated[:-240]
    assert annotated.shape[1:] == (256, 3) and panel.shape[0] == 2 * 12 + 4
    green = (panel[..., 1] > 200) & (panel[..., 0] < 100)
    assert green[12:24].sum() > 0.8 * green.sum() > 0  # the chosen action's bar is the long green one


def test_atari_smoke_run(tmp_path):
    result = run_cli("--env-id", "ALE/Breakout-v5", "--total-timesteps", "256", "--runs-dir", str(tmp_path),
                     "--sync-envs", *TINY_RUN)
    assert result.returncode == 0, result.stderr
    (run_dir,) = tmp_path.iterdir()
    (path,) = (run_dir / "checkpoints").iterdir()
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["obs_shape"] == [4, 84, 84] and checkpoint["num_actions"] == 4


# ----------------------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("cli_args, message", [
    (["--env-id", "SuperMarioBros-1-1-v9"], "did you mean SuperMarioBros-1-1-v"),
    (["--env-id", "SuperMarioBros-1-1-v9"], "it has SuperMarioBros-<world>-<stage>-v0"),
    (["--env-id", "ALE/Breakot-v5"], "unknown Atari id 'ALE/Breakot-v5'; did you mean ALE/Breakout-v5"),
    (["--num-minibatches", "7"], "--num-minibatches 7 does not divide the batch"),
    (["--num-envs", "1", "--num-steps", "16", "--num-minibatches", "16"], "leaves 1 sample per minibatch"),
    (["--noop-max", "-1"], "--noop-max must be 0 or more, got -1"),
    (["--eval-checkpoint", "/nonexistent.pt"], "no checkpoint at /nonexistent.pt"),
])
def test_bad_input_gets_one_clear_line(cli_args, message):
    result = run_cli(*cli_args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr
