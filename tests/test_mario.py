"""ppo_mario.py on the real NES emulator (the ROM ships with gym-super-mario-bros) and on real ALE."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_mario
from benchmark import mario_windows
from ppo_mario import (Agent, Args, EnvGroups, Rollout, TrackProgress, action_labels, collect_rollout,
                       draw_action_probs, evaluate, is_gymnasium_native, make_env, play_episode)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE = "SuperMarioBros-1-1-v0"
RIGHT, RIGHT_JUMP = 1, 2  # indices in the right_only (default) and simple action sets
RIGHT_JUMP_RUN = 4  # right + A + B in right_only
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


def test_the_fast_observation_pipeline_shows_gymnasiums_picture_and_changes_nothing_else():
    # Gymnasium's own wrappers, in make_env's order, as the reference: the same episode of random actions through both
    # (3 lives of 1-1 with the stuck time-out off: deaths, a reset, and the final observations of an ended episode).
    args = Args(env_id=STAGE, stuck_timeout=0)
    env = make_env(args)()
    reference = ppo_mario.make_mario_base_env(STAGE, args.action_set, render=False)
    reference = gym.wrappers.MaxAndSkipObservation(reference, skip=4)
    reference = ppo_mario.TrackProgress(reference, args.stuck_timeout)
    reference = gym.wrappers.RecordEpisodeStatistics(reference)
    reference = ppo_mario.ShapeReward(reference, args.flag_bonus, args.death_penalty, args.score_coef,
                                      args.reward_scale, add_terms=not is_gymnasium_native(),
                                      pay_skipped_ground=args.pay_skipped_ground, height_coef=args.height_coef)
    reference = gym.wrappers.GrayscaleObservation(reference)
    reference = gym.wrappers.ResizeObservation(reference, (84, 84))
    reference = gym.wrappers.FrameStackObservation(reference, 4)
    assert env.observation_space == reference.observation_space

    rng = np.random.default_rng(0)
    obs, info = env.reset(seed=0)
    expected_obs, expected_info = reference.reset(seed=0)
    largest_difference, steps, episodes = 0, 0, 0
    while episodes < 2:
        action = int(rng.integers(env.action_space.n))
        obs, reward, terminated, truncated, info = env.step(action)
        expected_obs, *expected, expected_info = reference.step(action)
        assert [reward, terminated, truncated] == expected, f"step {steps}"
        for episode_info in (info, expected_info):  # the episode's wall-clock time is the one thing that may differ
            episode_info.get("episode", {}).pop("t", None)
        np.testing.assert_equal(info, expected_info, err_msg=f"step {steps}")
        largest_difference = max(largest_difference, np.abs(obs.astype(int) - expected_obs.astype(int)).max())
        steps += 1
        if terminated or truncated:
            episodes += 1
            obs, info = env.reset()
            expected_obs, expected_info = reference.reset()
            np.testing.assert_equal(info, expected_info)
    env.close()
    reference.close()
    assert steps > 300 and largest_difference <= 2  # the same picture, to a grey level or two


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


@pytest.mark.skipif(is_gymnasium_native(), reason="the reward terms are the 7.4 line's")
def test_the_ground_a_pipe_skips_is_paid_so_the_flag_outpays_the_warp_zone_ceiling():
    # Two greedy episodes of a 1-2 probe checkpoint (simple actions, step 1,187,840), recorded as joypad actions from
    # the reset state (no-ops first): one walks into the exit pipe and on to the flag, the other runs along the ceiling
    # to the wall above the Warp Zone and stands there until the stuck time-out. The emulator replays them exactly.
    with open(os.path.join(ROOT, "tests", "data", "mario_1-2_routes.json")) as f:
        routes = json.load(f)
    returns, pipe_step_reward = {}, {}
    for pay in (False, True):
        env = make_env(Args(env_id="SuperMarioBros-1-2-v0", action_set="simple", pay_skipped_ground=pay))()
        for name, actions in routes.items():
            rewards, infos, terminated, truncated = play(env, actions)
            assert len(rewards) == len(actions)
            returns[name, pay] = rewards.sum()
            skips = {t: info["skipped_x"] for t, info in enumerate(infos) if info["skipped_x"]}
            if name == "warp_zone_ceiling":
                assert truncated and not terminated and 2950 < infos[-1]["x_pos"] < 3150 and skips == {}
                continue
            assert terminated and infos[-1]["flag_get"]
            # One skip: the pipe moves Mario from x ~2645 to ~2872 in one step, new ground all of it.
            [(t, skipped)] = skips.items()
            assert skipped == infos[t]["x_pos"] - infos[t - 1]["x_pos"] > 200
            pipe_step_reward[pay] = rewards[t]
        env.close()
    assert pipe_step_reward[False] < 1  # the env's own reward pays (almost) nothing for 200+ pixels
    assert pipe_step_reward[True] - pipe_step_reward[False] == pytest.approx(0.1 * skipped)
    # Without the pay the dead end earns more than the flag; with it, the flag earns more.
    assert returns["warp_zone_ceiling", False] > returns["exit_pipe_to_the_flag", False]
    assert returns["exit_pipe_to_the_flag", True] > returns["warp_zone_ceiling", True]
    pipe_route_gain = returns["exit_pipe_to_the_flag", True] - returns["exit_pipe_to_the_flag", False]
    assert pipe_route_gain == pytest.approx(0.1 * skipped)
    assert returns["warp_zone_ceiling", True] == returns["warp_zone_ceiling", False]


@pytest.mark.skipif(is_gymnasium_native(), reason="the reward terms are the 7.4 line's")
def test_height_coef_pays_the_climb_onto_higher_ground_and_nothing_for_the_wrap_of_a_fall():
    # 1-3 from the reset state: run, a held running jump up onto the first treetop (16 pixels above the start), then
    # run off its edge into the gap. y_pos wraps from near 0 to ~255 as Mario drops below the screen.
    route = [RIGHT] * 30 + [RIGHT_JUMP_RUN] * 8 + [RIGHT] * 40
    plain_env = make_env(Args(env_id="SuperMarioBros-1-3-v0", height_coef=0.0))()
    height_env = make_env(Args(env_id="SuperMarioBros-1-3-v0", height_coef=0.5))()
    plain, infos, terminated, _ = play(plain_env, route)
    paid, _, _, _ = play(height_env, route)
    plain_env.close()
    height_env.close()
    heights = np.array([info["y_pos"] for info in infos])
    assert terminated and heights[-2] < 30 and heights[-1] > 200 and not infos[-1]["flag_get"]
    extra = (paid - plain) / 0.1  # the height term before the default reward_scale of 0.1
    np.testing.assert_allclose(extra[1:-1], 0.5 * np.diff(heights[:-1]), atol=1e-6)
    assert extra[-1] == pytest.approx(0)  # the wrap is no climb
    landed = next(t for t in range(31, len(heights)) if heights[t] == heights[t - 1] > heights[0])
    assert heights[landed] - heights[0] == 16 and max(heights[:landed]) >= 140
    assert extra[:landed + 1].sum() == pytest.approx(0.5 * 16)  # up 60+, down 40+: the 16 kept are what is paid


class ScriptedMarioInfo(gym.Env):
    """Stands in for the emulator below TrackProgress: each step returns the next of a script of (life, x_pos) in
    world 1 stage 1, for moves no short test can play (a pipe into a bonus room and out of it further on)."""
    observation_space = gym.spaces.Discrete(1)
    action_space = gym.spaces.Discrete(1)

    def __init__(self, script):
        self.script = script

    def reset(self, **kwargs):
        self.t = 0
        return 0, {}

    def step(self, action):
        life, x_pos = self.script[self.t]
        self.t += 1
        return 0, 0.0, False, False, {"world": 1, "stage": 1, "life": life, "x_pos": x_pos, "y_pos": 79,
                                      "flag_get": False}


def test_only_new_ground_counts_as_skipped():
    script = [(2, 40), (2, 46), (2, 52), (2, 58),  # walk
              (2, 10), (2, 16), (2, 22),            # a pipe back down to a room with a low x, and on in it
              (2, 88),                              # a pipe out, 30 pixels past the farthest x of the life
              (2, 94), (2, 130),                    # walk, then a pipe again, from the farthest x: 36 new
              (1, 40), (1, 46), (1, 300)]           # a life lost: x starts over, then a pipe: all of it new
    env = TrackProgress(ScriptedMarioInfo(script))
    env.reset()
    skipped = [env.step(0)[4]["skipped_x"] for _ in script]
    assert skipped == [0, 0, 0, 0, 0, 0, 0, 30, 0, 36, 0, 0, 254]


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


def test_a_noop_start_can_be_fixed_for_one_episode():
    # reset(options={"noops": k}) is the start after k no-ops, whatever the wrapper's generator would draw: the same
    # screen as the reset state stepped k times with NOOP. 1-2's Goombas move meanwhile, so the screens differ by k.
    plain = make_env(Args(env_id="SuperMarioBros-1-2-v0"))()
    env = make_env(Args(env_id="SuperMarioBros-1-2-v0", noop_max=30))()
    screens = []
    for noops in (0, 9, 30):
        obs, _ = env.reset(seed=0, options={"noops": noops})
        expected, _ = plain.reset(seed=0)
        for _ in range(noops):
            expected, *_ = plain.step(0)
        np.testing.assert_array_equal(obs[-1], expected[-1])
        screens.append(obs[-1])
    assert not np.array_equal(screens[0], screens[1]) and not np.array_equal(screens[1], screens[2])
    plain.close()
    env.close()


def test_noop_starts_are_no_part_of_the_episode():
    # Seed 0 draws 26 no-ops; counted as episode steps, a stuck time-out of 5 would truncate inside reset().
    args = Args(env_id=STAGE, noop_max=30, stuck_timeout=5, flag_bonus=0, death_penalty=0, score_coef=0, reward_scale=1)
    assert np.random.default_rng(0).integers(0, 31) == 26
    env = make_env(args)()
    rewards, infos, terminated, _ = play(env, [RIGHT] * 300)  # play() resets with seed 0: walks into the Goomba
    assert terminated and infos[-1]["episode"]["l"] == len(rewards) < 100
    assert infos[-1]["episode"]["r"] == pytest.approx(rewards.sum())
    env.close()


def shipped_agent(stage="1-1"):
    model = torch.load(os.path.join(ROOT, "models", f"SuperMarioBros-{stage}-v0.pt"), weights_only=True)
    agent = Agent(4, model["num_actions"])
    agent.load_state_dict(model["model"])
    return agent


@pytest.mark.skipif(is_gymnasium_native(), reason="the reward terms are the 7.4 line's")
def test_the_full_game_counts_progress_flags_and_deaths_per_stage_and_life():
    # The shipped 1-1 model, greedy from the reset state of the full game: it clears 1-1, then loses its three lives
    # in 1-2. The stuck time-out (30 here) must count progress in 1-2's own x, life by life; the flag bonus is paid
    # once, the death penalty at each life lost, and the score tally at the end of 1-1 (the remaining time turned into
    # points as 1-2 begins) is not paid as score.
    agent = shipped_agent()
    raw = make_env(Args(env_id="SuperMarioBros-v0", stuck_timeout=30, flag_bonus=0, death_penalty=0, score_coef=0,
                        reward_scale=1))()
    obs, _ = raw.reset(seed=0)
    actions, rewards, infos, done = [], [], [], False
    while not done:
        with torch.no_grad():
            actions.append(int(agent.action_probs(torch.as_tensor(obs).unsqueeze(0))[0].argmax()))
        obs, reward, terminated, truncated, info = raw.step(actions[-1])
        rewards.append(reward)
        infos.append(info)
        done = terminated or truncated
    raw.close()
    assert terminated and not truncated and infos[-1]["life"] == 255  # game over, not a time-out
    assert [(i["world"], i["stage"]) for i in infos][0] == (1, 1) and (infos[-1]["world"], infos[-1]["stage"]) == (1, 2)
    assert infos[-1]["furthest_stage"] == 2 and infos[-1]["flags"] == 1 and infos[-1]["max_x_pos"] < 1000
    flag_step = next(t for t, i in enumerate(infos) if i["flag_get"])
    tally = infos[flag_step + 1]["score"] - infos[flag_step]["score"]
    assert infos[flag_step + 1]["stage"] == 2 and tally > 10_000

    shaped = make_env(Args(env_id="SuperMarioBros-v0", stuck_timeout=30, flag_bonus=50, death_penalty=30,
                           score_coef=0.05, reward_scale=1))()
    shaped.reset(seed=0)
    shaped_rewards = [shaped.step(action)[1] for action in actions]
    shaped.close()
    extra = np.array(shaped_rewards) - np.array(rewards)
    assert extra.sum() == pytest.approx(50 - 3 * 30 + 0.05 * (infos[-1]["score"] - tally))
    assert extra[flag_step] == pytest.approx(50 + 0.05 * (infos[flag_step]["score"] - infos[flag_step - 1]["score"]))
    lives_lost = [t for t in range(1, len(infos)) if infos[t]["life"] != infos[t - 1]["life"]]
    assert len(lives_lost) == 3 and all(extra[t] == pytest.approx(-30) for t in lives_lost)

    result = run_cli("--eval-checkpoint", os.path.join("models", "SuperMarioBros-1-1-v0.pt"), "--env-id",
                     "SuperMarioBros-v0", "--eval-episodes", "1", "--eval-noop-max", "0", "--stuck-timeout", "30",
                     "--video-path", os.path.join(ROOT, ".pytest_cache", "full-game.mp4"))
    assert result.returncode == 0, result.stderr
    assert "SuperMarioBros-v0: 1 greedy episodes, cleared 0/1 (0%), furthest stage 1-2, " in result.stdout


def test_atari_uses_cleanrl_ppo_atari_settings_and_logs_whole_games():
    args = ppo_mario.cli_args(["--env-id", "ALE/Breakout-v5"])
    assert (args.total_timesteps, args.num_steps, args.gamma, args.num_minibatches, args.clip_coef, args.noop_max) == (
        10_000_000, 128, 0.99, 4, 0.1, 30)
    assert (args.learning_rate, args.num_envs, args.gae_lambda, args.update_epochs, args.ent_coef) == (
        2.5e-4, 8, 0.95, 4, 0.01)
    assert ppo_mario.cli_args(["--env-id=ALE/Breakout-v5", "--gamma", "0.9"]).gamma == 0.9  # a flag given wins
    assert ppo_mario.cli_args([]).gamma == 0.9 and ppo_mario.cli_args([]).num_steps == 512  # Mario's

    env = make_env(args)()
    ale = env.unwrapped.ale
    assert ale.getFloat("repeat_action_probability") == 0.0  # no sticky actions, as NoFrameskip-v4
    env.reset(seed=0)
    assert ale.lives() == 5
    # NOOP only: the FIRE after each reset launches the ball, nobody returns it. Each lost life ends the learner's
    # episode; the game, and the episode statistics, go on until the last one.
    steps, clipped_return, lives_lost = 0, 0.0, 0
    while True:
        _, reward, terminated, truncated, info = env.step(0)
        steps, clipped_return = steps + 1, clipped_return + reward
        if terminated or truncated:
            if "episode" in info:
                break
            lives_lost += 1
            assert ale.lives() == 5 - lives_lost
            env.reset()
    env.close()
    assert lives_lost == 4 and ale.lives() == 0
    # Agent steps of the whole game: the learner's, the FIRE after each of the 5 resets and the no-op that stands for
    # the reset after each of the 4 lives lost.
    assert info["episode"]["l"] == steps + 5 + 4
    assert info["episode"]["r"] >= clipped_return  # unclipped score (clipped to +-1 per step for the learner)


# ----------------------------------------------------------------------------------------------------------- autoreset

@pytest.mark.parametrize("sync_envs, groups", [(True, 1), (False, 2)])  # (False, 2): the pipelined rollout
def test_no_stored_transition_crosses_a_real_episode_end(sync_envs, groups):
    args = Args(env_id=STAGE, num_envs=3, num_steps=100, stuck_timeout=4, sync_envs=sync_envs, seed=2)
    envs = EnvGroups(args)
    assert len(envs.groups) == groups
    torch.manual_seed(0)
    agent = Agent(4, envs.single_action_space.n)
    torch.nn.init.normal_(agent.actor.weight, std=0.3)  # a policy that differs from one observation to the next
    rollout = Rollout.empty(args.num_steps, args.num_envs, (4, 84, 84), "cpu")
    first_obs = envs.reset(seed=args.seed)
    _, episodes = collect_rollout(envs, agent, rollout, torch.as_tensor(first_obs), "cpu")
    envs.close()

    # Actions, logprobs and values belong to their observation row: recomputed from the stored row they match, and
    # replaying the stored actions from the same reset reproduces the stored observations.
    with torch.no_grad():
        _, logprobs, _, values = agent.get_action_and_value(rollout.obs.flatten(0, 1), rollout.actions.flatten())
    torch.testing.assert_close(logprobs.view(args.num_steps, -1), rollout.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(values.view(args.num_steps, -1), rollout.values, rtol=0, atol=1e-5)
    replay = gym.vector.SyncVectorEnv([make_env(args)] * args.num_envs, autoreset_mode=AutoresetMode.SAME_STEP)
    replayed, _ = replay.reset(seed=args.seed)
    for t in range(args.num_steps):
        np.testing.assert_array_equal(replayed, rollout.obs[t].numpy(), err_msg=f"step {t}")
        replayed, *_ = replay.step(rollout.actions[t].numpy())
    replay.close()

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
                "mario/max_x_pos", "mario/flag_get", "mario/episode_flag_get", "mario/furthest_stage"}
    assert tags == expected, tags ^ expected  # lean: nothing per episode that another tag already says
    per_episode = [events.Scalars(tag) for tag in ("charts/episodic_return", "mario/max_x_pos",
                                                   "mario/episode_flag_get", "mario/furthest_stage")]
    assert len({tuple(e.step for e in scalars) for scalars in per_episode}) == 1  # one value per episode, same steps
    assert {e.value for e in events.Scalars("mario/furthest_stage")} == {1.0}  # 1-1
    assert all(40 <= e.value < 3300 for e in events.Scalars("mario/max_x_pos"))  # Mario starts at x 40
    assert {e.value for e in events.Scalars("mario/episode_flag_get")} <= {0.0, 1.0}
    iteration_steps = [e.step for e in events.Scalars("charts/SPS")]
    assert iteration_steps == [128, 256, 384, 512]
    flag_rate = events.Scalars("mario/flag_get")  # once per iteration: the share of the last 100 episodes
    assert {e.step for e in flag_rate} <= set(iteration_steps) and flag_rate[-1].step == 512
    last_100 = [e.value for e in events.Scalars("mario/episode_flag_get")][-100:]
    assert flag_rate[-1].value == pytest.approx(np.mean(last_100))

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


def test_evaluation_can_play_one_episode_after_each_given_noop_count():
    # The 1-1 model walks into 1-2's first Goomba, which moves during no-ops: the later the start, the sooner Mario
    # dies. Seed 0 draws 26 no-ops for the first episode; noop_counts=[0, 26] must play the episode from the reset
    # state, then that drawn one.
    agent = shipped_agent()
    args = Args(env_id="SuperMarioBros-1-2-v0", seed=0, eval_noop_max=30, stuck_timeout=20)
    (drawn,) = evaluate(agent, args, "cpu", episodes=1)
    (from_reset,) = evaluate(agent, replace(args, eval_noop_max=0), "cpu", episodes=1)
    fixed = evaluate(agent, args, "cpu", episodes=2, noop_counts=[0, 26])
    assert fixed == [from_reset, drawn] and from_reset["length"] > drawn["length"]


def test_action_probabilities_are_drawn_above_the_frame():
    frame = np.zeros((240, 256, 3), dtype=np.uint8)
    annotated = draw_action_probs(frame, np.array([0.1, 0.9]), ["NOOP", "right"], chosen=1)
    panel = annotated[:-240]
    assert annotated.shape[1:] == (256, 3) and panel.shape[0] == 2 * 12 + 4
    green = (panel[..., 1] > 200) & (panel[..., 0] < 100)
    assert green[12:24].sum() > 0.8 * green.sum() > 0  # the chosen action's bar is the long green one


def test_the_video_shows_each_action_on_the_frame_it_was_chosen_on():
    torch.manual_seed(0)
    agent = Agent(4, 5)
    torch.nn.init.normal_(agent.actor.weight, std=0.3)  # probabilities that change from frame to frame
    args = Args(env_id=STAGE, stuck_timeout=10, noop_max=5)
    env = make_env(args, render=True)()
    labels = action_labels(args, env)
    info, frames = play_episode(agent, env, "cpu", seed=3, labels=labels)
    assert len(frames) == info["episode"]["l"] > 10
    # Replayed from the same reset: frame t is the screen action t was chosen on (the reset screen first), drawn with
    # the probabilities that chose it.
    obs, _ = env.reset(seed=3)
    for t, frame in enumerate(frames):
        with torch.no_grad():
            probs = agent.action_probs(torch.as_tensor(obs).unsqueeze(0))[0]
        action = int(probs.argmax())
        expected = draw_action_probs(np.array(env.render()), probs.numpy(), labels, action)
        np.testing.assert_array_equal(frame, expected, err_msg=f"frame {t}")
        obs, *_ = env.step(action)
    env.close()


def test_atari_smoke_run(tmp_path):
    result = run_cli("--env-id", "ALE/Breakout-v5", "--total-timesteps", "256", "--runs-dir", str(tmp_path),
                     "--sync-envs", "--height-coef", "1", *TINY_RUN)
    assert result.returncode == 0, result.stderr
    # A Mario-only setting changed from its default does nothing here: one warning says so.
    assert result.stderr.count("warning: --height-coef 1.0 does nothing: ALE/Breakout-v5 is not a Mario env") == 1
    (run_dir,) = tmp_path.iterdir()
    (path,) = (run_dir / "checkpoints").iterdir()
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["obs_shape"] == [4, 84, 84] and checkpoint["num_actions"] == 4


def test_evaluation_plays_the_checkpoints_own_stage_unless_another_is_given(tmp_path):
    result = run_cli("--eval-checkpoint", os.path.join("models", "SuperMarioBros-1-4-v0.pt"), "--eval-episodes", "1",
                     "--stuck-timeout", "20", "--video-path", str(tmp_path / "e.gif"))
    assert result.returncode == 0, result.stderr
    assert "SuperMarioBros-1-4-v0: 1 greedy episodes" in result.stdout
    result = run_cli("--eval-checkpoint", os.path.join("models", "SuperMarioBros-1-4-v0.pt"), "--eval-episodes", "1",
                     "--stuck-timeout", "20", "--env-id", "SuperMarioBros-1-1-v0", "--video-path", str(tmp_path / "e.gif"))
    assert result.returncode == 0, result.stderr
    assert "SuperMarioBros-1-1-v0: 1 greedy episodes" in result.stdout


# ----------------------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("cli_args, message", [
    (["--env-id", "SuperMarioBros-1-1-v9"], "did you mean SuperMarioBros-1-1-v"),
    (["--env-id", "SuperMarioBros-1-1-v9"], "it has SuperMarioBros-<world>-<stage>-v0"),
    (["--env-id", "ALE/Breakot-v5"], "unknown Atari id 'ALE/Breakot-v5'; did you mean ALE/Breakout-v5"),
    (["--num-minibatches", "7"], "--num-minibatches 7 does not divide the batch"),
    (["--num-envs", "1", "--num-steps", "16", "--num-minibatches", "16"], "leaves 1 sample per minibatch"),
    (["--noop-max", "-1"], "--noop-max must be 0 or more, got -1"),
    (["--eval-checkpoint", "/nonexistent.pt"], "no checkpoint at /nonexistent.pt"),
    (["--sticky-actions", "1"], "--sticky-actions must be in [0, 1) and --start-states in [0, 1], got 1.0 and 0.0"),
    (["--start-states", "0.5", "--random-game-rng"], "--start-states replays episodes exactly"),
    (["--start-states", "0.5", "--env-id", "SuperMarioBros-v0"], "SuperMarioBros-v0 is not a single stage"),
])
def test_bad_input_gets_one_clear_line(cli_args, message):
    result = run_cli(*cli_args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr


# ----------------------------------------------------------------------------------------------------------- variety in training

def screens_of_a_run_right(env, seed, steps=60):
    """The newest frame of each step of a fixed run-and-jump, from reset(seed)."""
    env.reset(seed=seed)
    frames = []
    for t in range(steps):
        obs, _, terminated, truncated, _ = env.step(4 if (t // 8) % 2 == 0 else 1)  # right+A+B, then right
        frames.append(obs[-1].copy())
        if terminated or truncated:
            break
    return np.array(frames)


def test_a_random_game_rng_changes_the_flying_fish_and_repeats_under_a_seed():
    # 2-3's flying Cheep-Cheeps are timed by the game's pseudo-random register. The emulator is deterministic: without
    # the option every reset shows the same fish; with it, each seed its own, and the same seed the same.
    plain = make_env(Args(env_id="SuperMarioBros-2-3-v0", stuck_timeout=0))()
    env = make_env(Args(env_id="SuperMarioBros-2-3-v0", stuck_timeout=0, random_game_rng=True))()
    np.testing.assert_array_equal(screens_of_a_run_right(plain, 1), screens_of_a_run_right(plain, 2))
    seed_1, seed_2 = screens_of_a_run_right(env, 1), screens_of_a_run_right(env, 2)
    assert seed_1.shape != seed_2.shape or (seed_1 != seed_2).any()
    np.testing.assert_array_equal(screens_of_a_run_right(env, 1), seed_1)
    env.reset(seed=3)
    register = env.unwrapped.ram[0x07A7:0x07AE]
    plain.reset(seed=3)
    assert register.all() and (register != plain.unwrapped.ram[0x07A7:0x07AE]).any()
    env.close()
    plain.close()


class Executed(gym.Wrapper):
    """Records the action that reaches the emulator."""

    def reset(self, **kwargs):
        self.actions = []
        return self.env.reset(**kwargs)

    def step(self, action):
        self.actions.append(action)
        return self.env.step(action)


def test_sticky_actions_repeat_the_previous_action_with_their_probability():
    executed = Executed(ppo_mario.make_mario_base_env(STAGE, "right_only", render=False))
    env = ppo_mario.StickyActions(executed, 0.25)
    env.reset(seed=0)
    chosen = np.random.default_rng(1).integers(0, 5, 400)
    for action in chosen:
        env.step(int(action))
    # Written out: the wrapper's generator, seeded by reset(seed=0), draws once a step; a draw under p repeats the
    # action that reached the emulator before (NOOP at an episode's start).
    repeats = np.random.default_rng([0, 3]).random(len(chosen)) < 0.25
    expected, previous = [], 0
    for action, repeat in zip(chosen, repeats):
        previous = previous if repeat else int(action)
        expected.append(previous)
    assert executed.actions == expected and 80 < repeats.sum() < 120
    env.close()


def test_evaluation_never_uses_the_training_variety():
    agent, checkpoint = ppo_mario.load_for_evaluation(os.path.join(ROOT, "models", "SuperMarioBros-1-1-v0.pt"),
                                                      Args(), "cpu")
    plain = Args(env_id=STAGE, stuck_timeout=30)
    # Two episodes: in training, the second would start from a state along the first (a clear) and be shorter.
    for varied in (Args(env_id=STAGE, stuck_timeout=30, sticky_actions=0.5, start_states=1.0, noop_max=30),
                   Args(env_id=STAGE, stuck_timeout=30, random_game_rng=True)):
        assert evaluate(agent, varied, "cpu", 2, noop_counts=[0, 0]) == evaluate(agent, plain, "cpu", 2, noop_counts=[0, 0])


def test_a_start_state_is_the_exact_state_of_the_furthest_episode_and_starts_a_fresh_episode():
    # 2-3 with a fixed run-and-jump after the no-op start: Mario falls into the water after ~94 steps.
    env = make_env(Args(env_id="SuperMarioBros-2-3-v0", stuck_timeout=0, start_states=1.0, noop_max=30))()
    start_states = env
    while not isinstance(start_states, ppo_mario.StartStates):
        start_states = start_states.env

    def play(first_step):
        """The rest of the episode from its step first_step: frames, the RAM after each step, infos."""
        frames, ram, infos = [], [], []
        while True:
            t = first_step + len(frames)
            obs, _, terminated, truncated, info = env.step(4 if (t // 8) % 2 == 0 else 1)
            frames.append(obs[-1].copy())
            ram.append(env.unwrapped.ram.copy())
            infos.append(info)
            if terminated or truncated:
                return frames, ram, infos

    env.reset(seed=0)
    frames, ram, infos = play(0)
    assert infos[-1]["episode"]["l"] == len(frames) > 60
    noops = len(start_states.furthest_actions) - len(frames)  # recorded too: the replay starts from the reset state

    start = 40
    obs, info = env.reset(options={"start": noops + start})
    assert info["start_step"] == noops + start  # and no no-ops after it
    np.testing.assert_array_equal(env.unwrapped.ram, ram[start - 1])  # the exact state: RAM and frame
    np.testing.assert_array_equal(obs[-1], frames[start - 1])
    rest, rest_ram, rest_infos = play(start)
    np.testing.assert_array_equal(rest_ram, ram[start:])  # and the same game from there
    # A fresh episode: its statistics and progress count from the start state.
    assert rest_infos[-1]["episode"]["l"] == len(rest) == len(frames) - start
    assert rest_infos[0]["max_x_pos"] == infos[start]["x_pos"]
    # Every step tells where its episode began, so the logs can tell the two kinds of episode apart.
    assert {i["start_step"] for i in infos} == {0} and {i["start_step"] for i in rest_infos} == {noops + start}
    env.close()


def test_a_run_with_start_states_logs_where_each_episode_began(tmp_path):
    result = run_cli("--total-timesteps", "640", "--runs-dir", str(tmp_path), "--stuck-timeout", "20",
                     "--start-states", "1", *TINY_RUN)
    assert result.returncode == 0, result.stderr
    (run_dir,) = tmp_path.iterdir()
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    starts = events.Scalars("mario/episode_start_step")
    lengths = events.Scalars("charts/episodic_length")
    assert [e.step for e in starts] == [e.step for e in lengths]  # one per episode
    # Each env's first episode begins at the reset state; with --start-states 1 the later ones 50 steps (back_steps)
    # before the end of a longer episode played earlier (with Mario still moving, the furthest).
    assert starts[0].value == starts[1].value == 0
    later = [(i, start.value) for i, start in enumerate(starts) if start.value > 0]
    assert later and all(start + 50 in {e.value for e in lengths[:i]} for i, start in later)
    from_reset = mario_windows.load_episodes(str(run_dir), from_reset=True)
    assert len(from_reset[0]) == sum(e.value == 0 for e in starts)


def test_an_episode_cut_short_by_the_stuck_time_out_counts_for_the_start_states():
    env = make_env(Args(env_id=STAGE, stuck_timeout=10, start_states=1.0))()
    start_states = env
    while not isinstance(start_states, ppo_mario.StartStates):
        start_states = start_states.env
    env.reset(seed=0)
    steps, truncated = 0, False
    while not truncated:
        _, _, _, truncated, _ = env.step(0)  # Mario stands still: the time-out above the wrapper ends the episode
        steps += 1
    env.reset()
    assert len(start_states.furthest_actions) == steps and start_states.furthest_x >= 0
    env.close()


def test_start_states_move_back_once_episodes_from_there_reach_the_flag():
    env = ppo_mario.StartStates(ppo_mario.make_mario_base_env(STAGE, "right_only", render=False), 1.0,
                                lambda: ppo_mario.make_mario_base_env(STAGE, "right_only", render=False), back_steps=10,
                                window=4)

    def episode(start, length, max_x, flag):
        env.start, env.actions, env.max_x = start, list(range(length)), max_x
        env.episode_ended(flag)

    episode(0, 100, 500, False)
    assert (env.start_point, env.furthest_x) == (90, 500)  # 10 steps before the end of the furthest episode
    episode(90, 120, 450, False)
    episode(0, 80, 400, False)
    assert env.start_point == 90 and len(env.furthest_actions) == 100  # neither went further
    for _ in range(2):
        episode(90, 95, 490, False)
    assert env.start_point == 90  # 3 episodes from there, none further (the one from the reset state does not count)
    episode(90, 95, 490, False)
    assert env.start_point == 80  # a full window from a start that no play got past: back by 10 steps
    for _ in range(4):
        episode(80, 95, 490, False)
    assert env.start_point == 70
    episode(70, 120, 510, False)  # further: its end is the new frontier
    assert (env.start_point, env.furthest_x) == (110, 510)
    episode(110, 150, 800, True)  # further, and the flag: the new episode to start along
    assert (env.start_point, env.furthest_cleared) == (140, True)
    for flag in (True, False, True):
        episode(140, 150, 800, flag)
    assert env.start_point == 140  # 3 of the 4 needed
    episode(140, 150, 800, False)
    assert env.start_point == 130  # 2 of 4 from there reached the flag: back by 10 steps
    for _ in range(4):
        episode(130, 150, 800, False)
    assert env.start_point == 130  # along an episode that cleared, a start is not given up
    env.close()


def action_band(action: int, num_actions: int) -> np.ndarray:
    """The previous-action channel for `action`: the rows of its band of num_actions equal bands lit."""
    band = np.zeros((84, 84), np.uint8)
    band[action * 84 // num_actions:(action + 1) * 84 // num_actions] = 255
    return band


def test_previous_action_bands_cover_the_rows_once():
    for num_actions in (5, 7, 12):
        assert (sum(action_band(a, num_actions) // 255 for a in range(num_actions)) == 1).all()


def test_the_previous_action_channel_shows_what_the_game_executed():
    # With sticky actions the game sometimes repeats the previous action instead of the chosen one. Replaying the
    # actions the channel showed on a plain env must give the same frames: the channel tells what the game did.
    shown_env = make_env(Args(env_id=STAGE, previous_action=True, sticky_actions=0.5, stuck_timeout=0))()
    plain_env = make_env(Args(env_id=STAGE, stuck_timeout=0))()
    obs, _ = shown_env.reset(seed=0)
    plain_obs, _ = plain_env.reset(seed=0)
    assert obs.shape == (5, 84, 84) and shown_env.observation_space.shape == (5, 84, 84)
    np.testing.assert_array_equal(obs[4], action_band(0, 5))  # NOOP at the start
    np.testing.assert_array_equal(obs[:4], plain_obs)
    rng = np.random.default_rng(0)
    chosen_differs = 0
    for _ in range(120):
        action = int(rng.integers(5))
        obs, _, terminated, truncated, _ = shown_env.step(action)
        (shown,) = [a for a in range(5) if (obs[4] == action_band(a, 5)).all()]
        chosen_differs += shown != action
        plain_obs, _, plain_terminated, plain_truncated, _ = plain_env.step(shown)
        np.testing.assert_array_equal(obs[:4], plain_obs)
        assert (terminated, truncated) == (plain_terminated, plain_truncated)
        if terminated or truncated:
            break
    assert chosen_differs > 10  # the sticky repeats were shown, not the choices
    shown_env.close()
    plain_env.close()


def test_a_start_state_shows_the_last_replayed_action():
    env = make_env(Args(env_id=STAGE, previous_action=True, start_states=1.0, stuck_timeout=0))()
    env.reset(seed=0)
    actions = [1, 2, 3, 4] * 10
    for action in actions:
        env.step(action)
    obs, info = env.reset(options={"start": 31})  # the unfinished episode is the furthest: start after its 31 steps
    assert info["start_step"] == 31
    np.testing.assert_array_equal(obs[4], action_band(actions[30], 5))
    env.close()


def test_a_run_with_the_previous_action_trains_and_its_checkpoint_plays_with_it(tmp_path):
    result = run_cli("--total-timesteps", "256", "--runs-dir", str(tmp_path), "--stuck-timeout", "20",
                     "--previous-action", *TINY_RUN)
    assert result.returncode == 0, result.stderr
    (run_dir,) = tmp_path.iterdir()
    checkpoint = torch.load(run_dir / "checkpoints" / "step_0000000256.pt", weights_only=True)
    assert checkpoint["obs_shape"] == [5, 84, 84] and checkpoint["args"]["previous_action"] is True
    result = run_cli("--eval-checkpoint", str(run_dir), "--eval-episodes", "1", "--stuck-timeout", "20",
                     "--video-path", str(tmp_path / "eval.gif"))  # the checkpoint's observation, not the default
    assert result.returncode == 0, result.stderr
    assert f"{STAGE}: 1 greedy episodes" in result.stdout
    # A model trained without the channel cannot fork into a run with it: one line says so.
    result = run_cli("--fork", os.path.join(ROOT, "models", "SuperMarioBros-1-1-v0.pt"), "--previous-action",
                     "--runs-dir", str(tmp_path / "fork"), *TINY_RUN)
    assert result.returncode != 0 and "--previous-action" in result.stderr and "Traceback" not in result.stderr
