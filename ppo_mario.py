"""PPO (clipped surrogate, GAE) with a CNN on Super Mario Bros, in one file.

Read top to bottom, the file follows the algorithm: Args -> make_env (the preprocessing, as a spec) -> Agent -> rollout
-> GAE -> PPO losses -> update -> train() -> evaluation. Below the marked line is the support code: the Mario wrappers,
the vector envs, run management (checkpoints, resume, fork, signals), torchrun, input checks and the command line.

    python ppo_mario.py --env-id SuperMarioBros-1-1-v0 --cuda
    python ppo_mario.py --eval-checkpoint runs/<run_name> --eval-episodes 10   # newest checkpoint of the run
    python ppo_mario.py --resume runs/<run_name>                                # continue an interrupted run
    python ppo_mario.py --fork runs/<run_name> --ent-coef 0.05                  # a new run from there, other settings
    torchrun --standalone --nproc_per_node 4 ppo_mario.py --cuda                # data-parallel over 4 GPUs
    python ppo_mario.py --env-id ALE/Breakout-v5       # the same PPO on Atari with CleanRL ppo_atari's settings

gym-super-mario-bros comes in two lines: 7.4 (Python < 3.13, old gym API, adapted here with shimmy) and 9.x
(Python >= 3.13, gymnasium-native). The installed one is picked at run time.
"""

import argparse
import contextlib
import ctypes
import difflib
import glob
import importlib.metadata
import io
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import signal
import sys
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

import cv2
import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import tyro
from gymnasium.vector import AutoresetMode
from torch.distributions.categorical import Categorical
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    # PPO
    total_timesteps: int = 2_000_000
    """total agent steps (each is 4 emulator frames) to train for, summed over torchrun ranks; the learning rate
    anneals over it"""
    learning_rate: float = 2.5e-4
    """Adam learning rate at the start of training"""
    anneal_lr: bool = True
    """decay the learning rate linearly to zero over the run"""
    num_envs: int = 8
    """parallel environments per torchrun rank; the batch is num_envs * num_steps (to use more cores with the same
    batch, raise num_envs and lower num_steps by the same factor)"""
    num_steps: int = 512
    """steps per environment per rollout"""
    gamma: float = 0.9
    """discount factor (a short horizon suits Mario's dense progress reward)"""
    gae_lambda: float = 0.95
    """lambda of generalised advantage estimation"""
    num_minibatches: int = 16
    """minibatches the batch is split into per epoch (256 samples each with the defaults)"""
    update_epochs: int = 4
    """passes over the batch per update"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_coef: float = 0.2
    """epsilon of the clipped surrogate (and of value clipping)"""
    clip_vloss: bool = True
    """clip the value update to clip_coef around the old value estimate"""
    ent_coef: float = 0.01
    """weight of the entropy bonus (keeps the policy trying other actions)"""
    vf_coef: float = 0.5
    """weight of the value loss"""
    max_grad_norm: float = 0.5
    """clip the global gradient norm to this"""
    target_kl: float | None = None
    """stop the epochs of an update early when the approximate KL passes this"""

    # Environment
    env_id: str = "SuperMarioBros-1-1-v0"
    """SuperMarioBros-<world>-<stage>-v<0..3>, the full game SuperMarioBros-v0, SuperMarioBrosRandomStages-v0,
    SuperMarioBros2-..., or an ALE id such as ALE/Breakout-v5, which takes CleanRL ppo_atari's environment and its
    defaults for total_timesteps, num_steps, gamma, num_minibatches, clip_coef and noop_max (`--env-id ALE/... --help`
    shows them); in evaluation, the checkpoint's"""
    action_set: Literal["right_only", "simple", "complex"] = "right_only"
    """joypad button combinations the agent picks from: right_only (5, no step to the left), simple (7), complex (12);
    in evaluation, the checkpoint's"""
    previous_action: bool = False
    """show the policy the previous agent step's action as one more observation channel: Mario jumps (or swims a
    stroke) only when A is pressed anew, and frames cannot tell a held A from a released one, so without it a greedy
    policy can stand at a pipe pressing A for ever; in evaluation, the checkpoint's"""
    noop_max: int = 0
    """start each training episode after 0..noop_max random no-op steps (not counted in the episode), so that enemies
    and platforms meet the agent at a different phase each time"""
    random_game_rng: bool = False
    """seed the game's own pseudo-random register at random on each training reset: the emulator is deterministic, so
    otherwise every start gives the same enemy pattern (such as flying fish) and a policy can learn those by heart"""
    start_states: float = 0.0
    """start this share of training episodes from a state along the furthest episode the env has played (replayed from
    the reset state), first near its end, then further back as episodes from there get past it (Backplay); the
    training curves include those episodes, and mario/episode_start_step tells them apart (0: from the reset state)"""
    sticky_actions: float = 0.0
    """in training, repeat the previous action instead of the chosen one with this probability at each agent step
    (Machado et al. 2018), so that a policy cannot rely on an exact sequence of inputs"""
    stuck_timeout: int = 100
    """truncate an episode after this many agent steps (~7 s of game time) without new rightward progress in the
    current stage and life (0: off); a stuck Mario would otherwise spend the rest of the 400-second clock on one screen"""
    # Reward shaping (7.4 package line): the env's reward is x progress, a time penalty and -15 on death. The flag
    # bonus makes finishing the stage the dominant signal, the death penalty makes pits costly, the score term pays for
    # stomping enemies, and the scale keeps value targets near 1 so the value loss does not swamp the policy loss. The
    # 9.x reward already holds score, completion and death terms, so there only reward_scale applies.
    flag_bonus: float = 50.0
    """added at each stage's flag (or axe)"""
    death_penalty: float = 50.0
    """subtracted at each life lost"""
    score_coef: float = 1 / 40
    """times the in-game score gained in a step"""
    reward_scale: float = 0.1
    """multiplies the whole reward the agent learns from (episodic_return logs the env's own reward)"""
    pay_skipped_ground: bool = True
    """pay x reward for the new ground a pipe moves Mario to (the env pays x at most 5 pixels a frame, so a pipe to
    further on pays nothing, and a dead end beside it would pay more)"""
    height_coef: float = 0.0
    """times the height Mario gains in a step (y_pos in pixels; a fall pays it back): summed over a life it is the
    height he ends at above where he started, but it pays a jump up onto higher ground when it happens"""
    sync_envs: bool = False
    """step the environments in this process (SyncVectorEnv) instead of one process each (AsyncVectorEnv)"""

    # Run management
    exp_name: str = "ppo_mario"
    """the name of this experiment; the first part of the run name"""
    seed: int = 1
    """seed of python, numpy, torch and the environments"""
    torch_deterministic: bool = True
    """make cuDNN pick deterministic algorithms"""
    cuda: bool = False
    """train on the GPU when one is available (a warning, then CPU, when not)"""
    runs_dir: str = "runs"
    """TensorBoard logs, checkpoints and videos go to <runs_dir>/<run_name>/"""
    save_interval: int = 25
    """write a checkpoint every this many iterations (and at the end, and on Ctrl-C / SIGTERM)"""
    keep_checkpoints: int = 3
    """how many of the newest checkpoints to keep"""
    resume: str | None = None
    """continue a run: a checkpoint file, or a run directory to take its newest checkpoint; the run keeps its Args,
    and its save, device and video settings unless given"""
    fork: str | None = None
    """start a new run from a checkpoint's weights, optimizer state and step count, with its Args but for the flags
    given: other settings from a point of a run without training to it again (a run directory: its newest)"""
    capture_video: bool = False
    """write a video of a greedy evaluation episode every video_interval iterations"""
    video_interval: int = 50
    """iterations between evaluation videos with --capture-video"""

    # Evaluation
    eval_checkpoint: str | None = None
    """play a saved model instead of training: a checkpoint file, or a run directory for its newest checkpoint"""
    eval_episodes: int = 10
    """episodes to play in evaluation"""
    eval_sample: bool = False
    """sample actions from the policy in evaluation instead of taking the most likely one"""
    eval_noop_max: int = 30
    """start each evaluation episode with up to this many random no-op steps, so greedy episodes differ"""
    video_path: str | None = None
    """in evaluation, write the first episode to this .mp4 or .gif (default: beside the checkpoint)"""


# CleanRL ppo_atari's hyperparameters where they differ from Mario's (its others equal Args'), so that ALE curves
# compare with its published ones. An ALE/ id on the command line takes them as its defaults.
ATARI_DEFAULTS = {"total_timesteps": 10_000_000, "num_steps": 128, "gamma": 0.99, "num_minibatches": 4,
                  "clip_coef": 0.1, "noop_max": 30}


def default_args(env_id: str) -> Args:
    """The defaults for env_id: Args' own, with ATARI_DEFAULTS for an ALE/ id."""
    return Args(env_id=env_id, **(ATARI_DEFAULTS if env_id.startswith("ALE/") else {}))


def make_env(args: Args, render: bool = False):
    """A thunk for the vector env. Observations are uint8 stacks of 4 grayscale 84x84 frames, one agent step per 4
    emulator frames; info["episode"] at an episode's end holds the env's own (unshaped) return and its length in
    agent steps (for Atari: of the whole game, all lives)."""
    def thunk():
        if multiprocessing.parent_process() is not None:
            # In an AsyncVectorEnv worker. Ctrl-C (and a service manager's SIGTERM) reach the whole process group, but
            # stopping is the trainer's job: it saves a checkpoint, then closes the workers.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if args.env_id.startswith("ALE/"):
            import ale_py
            gym.register_envs(ale_py)
            # CleanRL ppo_atari's environment (its NoFrameskip-v4 ids): no sticky actions, the minimal action set,
            # no-op starts, skip 4 with max-pooling, 84x84 grayscale, a lost life ends the learner's episode, FIRE
            # after a reset, the reward's sign, a stack of 4. The frame skip lives in the wrapper, not the env.
            env = gym.make(args.env_id, frameskip=1, repeat_action_probability=0.0, full_action_space=False,
                           render_mode="rgb_array" if render else None)
            env = gym.wrappers.AtariPreprocessing(env, noop_max=args.noop_max, frame_skip=4, screen_size=84)
            env = gym.wrappers.RecordEpisodeStatistics(env)
            env = EpisodicLife(env)
            if "FIRE" in env.unwrapped.get_action_meanings():
                env = FireReset(env)
            env = gym.wrappers.TransformReward(env, lambda r: float(np.sign(r)))
            return gym.wrappers.FrameStackObservation(env, 4)
        def emulator():
            # Repeat each action 4 frames; the observation is the max of the last two (sprites flicker between
            # frames). Gymnasium's MaxAndSkipObservation, but copying nes-py's frames channel by channel: 5x faster.
            return MaxAndSkip(make_mario_base_env(args.env_id, args.action_set, render), skip=FRAMES_PER_STEP)

        env = emulator()
        if args.start_states:
            env = StartStates(env, args.start_states, make_start_env=emulator)  # its second emulator, the same stack
        if args.random_game_rng:
            env = RandomGameRng(env)
        if args.noop_max:
            env = NoopStart(env, args.noop_max)
        if args.sticky_actions:
            env = StickyActions(env, args.sticky_actions)
        env = TrackProgress(env, args.stuck_timeout)
        env = gym.wrappers.RecordEpisodeStatistics(env)
        env = ShapeReward(env, args.flag_bonus, args.death_penalty, args.score_coef, args.reward_scale,
                          add_terms=not is_gymnasium_native(), pay_skipped_ground=args.pay_skipped_ground,
                          height_coef=args.height_coef)
        # Gymnasium's GrayscaleObservation + ResizeObservation(84, 84), with the grayscale in OpenCV: numpy's took ~4 ms
        # a step, a third of the time spent above the emulator.
        env = GrayResize(env, 84)
        env = gym.wrappers.FrameStackObservation(env, 4)
        return PreviousAction(env, env.action_space.n) if args.previous_action else env
    return thunk


def layer_init(layer, std: float = np.sqrt(2), bias_const: float = 0.0):
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    def __init__(self, in_channels: int, num_actions: int, channels_last: bool = False):
        super().__init__()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.trunk = nn.Sequential(
            layer_init(nn.Conv2d(in_channels, 32, 8, stride=4)), nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(),
            nn.Flatten(),
            layer_init(nn.Linear(64 * 7 * 7, 512)), nn.ReLU(),
        )
        self.actor = layer_init(nn.Linear(512, num_actions), std=0.01)  # near-uniform initial policy
        self.critic = layer_init(nn.Linear(512, 1), std=1.0)
        self.to(memory_format=self.memory_format)

    def features(self, obs):
        # Observations stay uint8 everywhere else (4x less memory than float32); scaled here, on the device, after the
        # layout change (done on the uint8 tensor: 4x fewer bytes to move).
        return self.trunk(obs.contiguous(memory_format=self.memory_format).float().div_(255.0))

    def get_value(self, obs):
        return self.critic(self.features(obs)).squeeze(-1)

    def get_action_and_value(self, obs, action=None):
        hidden = self.features(obs)
        dist = Categorical(logits=self.actor(hidden), validate_args=False)
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.critic(hidden).squeeze(-1)

    def action_probs(self, obs):
        return self.actor(self.features(obs)).softmax(-1)


@dataclass
class Rollout:
    """Storage for one rollout, one row per step; every tensor is [num_steps, num_envs, ...]."""
    obs: torch.Tensor  # uint8
    actions: torch.Tensor
    logprobs: torch.Tensor
    rewards: torch.Tensor
    terminations: torch.Tensor
    truncations: torch.Tensor
    values: torch.Tensor
    final_values: torch.Tensor  # V(final observation) where an episode was truncated, else 0

    @classmethod
    def empty(cls, num_steps: int, num_envs: int, obs_shape: tuple, device):
        shape = (num_steps, num_envs)
        tensors = {f.name: torch.zeros(shape, device=device) for f in fields(cls) if f.name not in ("obs", "actions")}
        # Frames are stored channels-last (the C of C x H x W innermost), the layout the CNN reads by default: a
        # minibatch gathered from the flattened rollout is then laid out for the convolutions already.
        channels, height, width = obs_shape
        obs = torch.zeros(shape + (height, width, channels), dtype=torch.uint8, device=device).permute(0, 1, 4, 2, 3)
        return cls(obs=obs, actions=torch.zeros(shape, dtype=torch.long, device=device), **tensors)


EPISODE_KEYS = ("x_pos", "max_x_pos", "flag_get", "world", "stage", "furthest_stage", "start_step")


def collect_rollout(envs: "EnvGroups", agent, rollout: Rollout, next_obs, device, stop=None):
    """Fill `rollout` by stepping `envs` from `next_obs`. Returns the observation to continue from and the finished
    episodes as (step index, {"return", "length", and for Mario x_pos, max_x_pos, flag_get, world, stage,
    furthest_stage, and with --start-states start_step}).
    Returns early, with the rollout incomplete, once `stop` is requested.

    Each pass acts for every group in turn and sends it stepping, after storing the outcome of that group's previous
    step: while the policy acts for one group, the other group's environments are stepping."""
    episodes = []
    num_steps = rollout.obs.shape[0]
    next_obs = next_obs.clone()  # updated group by group below; the caller's tensor stays as it was
    for step in range(num_steps + 1):
        stopping = step == num_steps or (stop is not None and stop.requested)
        for g, group in enumerate(envs.slices):
            if step > 0:
                obs, reward, terminated, truncated, infos = envs.receive(g)
                t = step - 1
                rollout.rewards[t, group] = torch.as_tensor(reward, dtype=torch.float32, device=device)
                rollout.terminations[t, group] = torch.as_tensor(terminated, dtype=torch.float32, device=device)
                rollout.truncations[t, group] = torch.as_tensor(truncated, dtype=torch.float32, device=device)
                next_obs[group] = torch.as_tensor(obs, device=device)
                rollout.final_values[t, group] = 0.0
                if "final_obs" in infos:  # an episode ended; next_obs already holds the new episode's start
                    bootstrap = np.flatnonzero(truncated & ~terminated)
                    if len(bootstrap):
                        final_obs = torch.as_tensor(np.stack(infos["final_obs"][bootstrap]), device=device)
                        with torch.no_grad():
                            rollout.final_values[t, group.start + bootstrap] = agent.get_value(final_obs)
                    final_info = infos["final_info"]
                    for i in np.flatnonzero(final_info.get("_episode", [])):  # Atari: none at a life lost
                        episode = {"return": float(final_info["episode"]["r"][i]),
                                   "length": int(final_info["episode"]["l"][i])}
                        episode.update({key: float(final_info[key][i]) for key in EPISODE_KEYS if key in final_info})
                        episodes.append((t, episode))
            if not stopping:
                rollout.obs[step, group] = next_obs[group]
                with torch.no_grad():
                    action, logprob, _, value = agent.get_action_and_value(next_obs[group])
                rollout.actions[step, group], rollout.logprobs[step, group], rollout.values[step, group] = action, logprob, value
                envs.send(g, action.cpu().numpy())
        if stopping:
            break
    return next_obs, episodes


def compute_gae(rewards, values, terminations, truncations, final_values, next_value, gamma, gae_lambda):
    """Advantages and returns of a rollout. rewards, values, terminations, truncations and final_values are
    [num_steps, num_envs]; final_values holds V(final observation) where an episode was truncated; next_value is
    V(next_obs), the state after the last row.

        V(s_{t+1}) = values[t+1] inside an episode, final_values[t] after a truncation, next_value after the last row
        delta_t    = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t)        (TD error)
        A_t        = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}             (GAE, cut at every episode end)
        R_t        = A_t + V(s_t)                                                   (lambda-return: the value target)

    A truncated episode (the stuck time-out) keeps its bootstrap term instead of being scored like a death, and like
    a terminated one it stops the sum, so no advantage reaches into the next episode.
    """
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        next_values = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        next_values = torch.where(truncations[t].bool(), final_values[t], next_values)
        done = torch.maximum(terminations[t], truncations[t])
        delta = rewards[t] + gamma * (1.0 - terminations[t]) * next_values - values[t]
        next_advantage = delta + gamma * gae_lambda * (1.0 - done) * next_advantage
        advantages[t] = next_advantage
    return advantages, advantages + values


def policy_loss(new_logprob, old_logprob, advantages, clip_coef):
    """Clipped surrogate, negated for gradient descent:

        r_t(theta) = pi_theta(a_t|s_t) / pi_theta_old(a_t|s_t)
        L^CLIP     = E[ min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) ]
    """
    ratio = (new_logprob - old_logprob).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef) * advantages
    return -torch.min(unclipped, clipped).mean()


def value_loss(new_values, old_values, returns, clip_coef=None):
    """0.5 * squared error to the lambda-return; with clip_coef, the pessimistic max of the plain and the clipped error,
    where the clipped prediction moves at most clip_coef away from the value recorded in the rollout."""
    unclipped = (new_values - returns) ** 2
    if clip_coef is None:
        return 0.5 * unclipped.mean()
    clipped_values = old_values + (new_values - old_values).clamp(-clip_coef, clip_coef)
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped).mean()


def normalize_advantages(advantages):
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


def ppo_update(agent: Agent, optimizer, batch: dict, args: Args) -> dict:
    """update_epochs passes of minibatch gradient descent on the PPO loss over one flattened rollout. Returns the last
    minibatch's losses and the diagnostics CleanRL logs. Raises NonFiniteError instead of stepping on a bad gradient."""
    batch_size = len(batch["actions"])
    minibatch_size = batch_size // args.num_minibatches
    clipfracs = []
    for epoch in range(args.update_epochs):
        permutation = torch.randperm(batch_size, device=batch["actions"].device)
        for start in range(0, batch_size, minibatch_size):
            mb = permutation[start:start + minibatch_size]
            _, new_logprob, entropy, new_value = agent.get_action_and_value(batch["obs"][mb], batch["actions"][mb])
            with torch.no_grad():
                # Diagnostics: KL(old || new) estimators (http://joschu.net/blog/kl-approx.html) and clip rate.
                logratio = new_logprob - batch["logprobs"][mb]
                old_approx_kl = (-logratio).mean()
                approx_kl = ((logratio.exp() - 1) - logratio).mean()
                clipfracs.append(((logratio.exp() - 1.0).abs() > args.clip_coef).float().mean().item())

            advantages = normalize_advantages(batch["advantages"][mb]) if args.norm_adv else batch["advantages"][mb]
            pg_loss = policy_loss(new_logprob, batch["logprobs"][mb], advantages, args.clip_coef)
            v_loss = value_loss(new_value, batch["values"][mb], batch["returns"][mb],
                                args.clip_coef if args.clip_vloss else None)
            entropy_loss = entropy.mean()
            loss = pg_loss - args.ent_coef * entropy_loss + args.vf_coef * v_loss

            optimizer.zero_grad()
            loss.backward()
            average_gradients(agent)  # under torchrun: every rank takes the same step from the same weights
            grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise NonFiniteError(f"loss {loss.item():.4g}, gradient norm {grad_norm.item():.4g}")
            optimizer.step()

        if args.target_kl is not None and all_reduce_mean(approx_kl.clone()) > args.target_kl:  # decided jointly
            break
    return {"value_loss": v_loss.item(), "policy_loss": pg_loss.item(), "entropy": entropy_loss.item(),
            "old_approx_kl": old_approx_kl.item(), "approx_kl": approx_kl.item(), "clipfrac": float(np.mean(clipfracs))}


class NonFiniteError(RuntimeError):
    pass


def train(args: Args) -> str:
    """Train, or continue the run args.resume points at; returns the run directory. Under torchrun, rank 0 alone
    writes TensorBoard (with every rank's episodes) and checkpoints."""
    run = start_run(args)  # torchrun ranks, device, run directory, and the checkpoint to resume or fork from
    args, device, is_main = run.args, run.device, run.rank == 0
    batch_size = args.num_envs * args.num_steps * run.world_size  # the samples of one iteration, all ranks together
    num_iterations = args.total_timesteps // batch_size
    stop, writer, global_step = GracefulStop(), None, 0
    envs = EnvGroups(args)
    try:  # from the moment the environments exist: whatever raises below, `finally` closes them (no orphan worker)
        obs_shape = envs.single_observation_space.shape
        # Channels-last weights and inputs: the layout CPU convolutions run fastest in (benchmark/mario_throughput.py).
        agent = Agent(obs_shape[0], envs.single_action_space.n, channels_last=True).to(device)
        optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
        global_step, iteration = restore_training_state(run, agent, optimizer, envs, batch_size)
        writer = open_writer(run, global_step) if is_main else None
        rollout = Rollout.empty(args.num_steps, args.num_envs, obs_shape, device)
        recent = {"return": deque(maxlen=20), "x_pos": deque(maxlen=20), "flag_get": deque(maxlen=100)}
        # On the CPU, acting uses one thread: the emulator workers need the other cores, and idle OpenMP threads would
        # spin on them. The update gets them all.
        update_threads = torch.get_num_threads()
        rollout_threads = 1 if device.type == "cpu" else update_threads
        start_time, start_iteration = time.time(), iteration
        next_obs = torch.as_tensor(envs.reset(seed=args.seed + iteration + 10_000 * run.rank), device=device)
        while iteration < num_iterations:
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - iteration / num_iterations)
            rollout_start = time.time()
            torch.set_num_threads(rollout_threads)
            # Alone, a signal cuts the rollout short; under torchrun the ranks decide together after it.
            next_obs, episodes = collect_rollout(envs, agent, rollout, next_obs, device,
                                                 stop if run.world_size == 1 else None)
            torch.set_num_threads(update_threads)
            if stop.agreed(device):  # an incomplete rollout is dropped: the checkpoint ends the last iteration
                break
            rollout_sps = int(batch_size / (time.time() - rollout_start))
            episodes = gather_to_main(episodes)
            if is_main:
                log_episodes(writer, episodes, global_step, args.num_envs, run.world_size, recent)

            with torch.no_grad():
                next_value = agent.get_value(next_obs)
            advantages, returns = compute_gae(rollout.rewards, rollout.values, rollout.terminations, rollout.truncations,
                                              rollout.final_values, next_value, args.gamma, args.gae_lambda)
            # Flatten the rollout into one batch of num_steps * num_envs samples.
            batch = {"obs": rollout.obs.reshape((-1,) + obs_shape), "actions": rollout.actions.reshape(-1),
                     "logprobs": rollout.logprobs.reshape(-1), "values": rollout.values.reshape(-1),
                     "advantages": advantages.reshape(-1), "returns": returns.reshape(-1)}
            try:
                stats = ppo_update(agent, optimizer, batch, args)
            except NonFiniteError as e:
                fail(f"non-finite {e} at iteration {iteration + 1}; stopped without saving; the last good checkpoint is "
                     f"{run.checkpoint_path or 'none (none was written yet)'}; lower --learning-rate or --max-grad-norm")
            iteration += 1
            global_step += batch_size
            save_now = iteration % args.save_interval == 0 or iteration == num_iterations
            curricula = start_state_curricula(envs, args) if save_now else []  # every rank's envs, gathered on rank 0
            if is_main:
                y_pred, y_true = batch["values"].cpu().numpy(), batch["returns"].cpu().numpy()
                stats["explained_variance"] = np.nan if np.var(y_true) == 0 else 1 - np.var(y_true - y_pred) / np.var(y_true)
                elapsed = time.time() - start_time
                sps = int((iteration - start_iteration) * batch_size / elapsed)
                writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
                for key, value in stats.items():
                    writer.add_scalar(f"losses/{key}", value, global_step)
                writer.add_scalar("charts/SPS", sps, global_step)
                writer.add_scalar("charts/rollout_SPS", rollout_sps, global_step)
                if recent["flag_get"]:
                    writer.add_scalar("mario/flag_get", np.mean(recent["flag_get"]), global_step)
                eta = elapsed / (iteration - start_iteration) * (num_iterations - iteration)
                print(progress_line(iteration, num_iterations, global_step, sps, rollout_sps, recent, elapsed, eta),
                      flush=True)
                if save_now:
                    run.checkpoint_path = save_checkpoint(run.run_dir, agent, optimizer, args, global_step, iteration,
                                                          envs, curricula)
                    print(f"saved {run.checkpoint_path}", flush=True)
            if stop.agreed(device):  # a signal arrived during the update
                break
            if is_main and args.capture_video and (iteration % args.video_interval == 0 or iteration == num_iterations):
                evaluate(agent, args, device, episodes=1,
                         video_path=os.path.join(run.run_dir, "videos", f"iteration_{iteration:05d}.mp4"))
        finish_run(run, agent, optimizer, envs, stop, global_step, iteration)
    except (EOFError, BrokenPipeError, ConnectionError) as e:
        fail_on_dead_worker(envs, args, e, global_step, run.run_dir)
    finally:
        envs.close()
        if writer:
            writer.close()
        stop.restore()
        if dist.is_initialized():
            dist.destroy_process_group()
    if stop.requested:
        sys.exit(128 + stop.signum)
    return run.run_dir


def play_episode(agent: Agent, env, device, seed: int | None, generator: torch.Generator | None = None,
                 labels: list[str] | None = None, options: dict | None = None) -> tuple[dict, list[np.ndarray]]:
    """One whole episode from env.reset(seed=seed, options=options) (for Atari, a whole game: play goes on after a
    lost life), greedy, or sampled with `generator`. Returns the last info, with "truncated" (whether the episode was
    cut short: for Mario, by the stuck time-out), and, given action labels, one video frame
    per action: the screen the action was chosen on (the reset screen first) with that choice's probabilities drawn
    above it."""
    obs, _ = env.reset(seed=seed, options=options)
    frames = []
    while True:
        with torch.no_grad():
            probs = agent.action_probs(torch.as_tensor(obs, device=device).unsqueeze(0))[0]
        action = int(torch.multinomial(probs, 1, generator=generator)) if generator is not None else int(probs.argmax())
        if labels is not None:  # np.array copies: nes-py renders into one reused buffer
            frames.append(draw_action_probs(np.array(env.render()), probs.cpu().numpy(), labels, action))
        obs, _, terminated, truncated, info = env.step(action)
        if "episode" in info:
            return {**info, "truncated": truncated}, frames
        if terminated or truncated:  # Atari: a life lost ended the learner's episode, not the game
            obs, _ = env.reset()


def evaluate(agent: Agent, args: Args, device, episodes: int, video_path: str | None = None,
             noop_counts: list[int] | None = None) -> list[dict]:
    """Play whole episodes, greedy unless args.eval_sample, each after a random number of no-op steps (up to
    eval_noop_max) so that greedy episodes differ, or, given noop_counts, one episode after each of those counts
    (episodes is then len(noop_counts)). Returns {"return", "length", "x_pos", "flag_get", "furthest_stage",
    "truncated"} per episode; the first episode goes to video_path with the action probabilities drawn above it."""
    # Evaluation plays the game as it is: no training-only variety (start states, random game RNG, sticky actions).
    env = make_env(replace(args, noop_max=args.eval_noop_max, random_game_rng=False, sticky_actions=0.0,
                           start_states=0.0), render=video_path is not None)()
    labels = action_labels(args, env) if video_path else None
    # Sampled evaluation draws from its own generator: it repeats under the same --seed, whatever training did.
    generator = torch.Generator(device).manual_seed(args.seed) if args.eval_sample else None
    starts = [None] * episodes if noop_counts is None else [{"noops": noops} for noops in noop_counts]
    results = []
    for episode, options in enumerate(starts):
        # The first reset's seed seeds the no-op starts of all the episodes.
        info, frames = play_episode(agent, env, device, args.seed if episode == 0 else None, generator,
                                    labels if episode == 0 else None, options)
        if frames:
            write_video(frames, video_path)
        results.append({"return": float(info["episode"]["r"]), "length": int(info["episode"]["l"]),
                        "x_pos": float(info.get("x_pos", np.nan)), "flag_get": bool(info.get("flag_get", False)),
                        "furthest_stage": info.get("furthest_stage"), "truncated": info["truncated"]})
    env.close()
    return results


def run_evaluation(args: Args):
    device = pick_device(args.cuda)
    path = newest_checkpoint(args.eval_checkpoint)
    agent, _ = load_for_evaluation(path, args, device, args.env_id)
    video_path = args.video_path or os.path.splitext(path)[0] + "-eval.mp4"
    results = evaluate(agent, args, device, args.eval_episodes, video_path)

    returns = [r["return"] for r in results]
    line = f"{args.env_id}: {len(results)} {'sampled' if args.eval_sample else 'greedy'} episodes, "
    if results[0]["furthest_stage"] is not None:  # Mario
        clears = sum(r["flag_get"] for r in results)
        line += (f"cleared {clears}/{len(results)} ({clears / len(results):.0%}), furthest stage "
                 f"{stage_name(max(r['furthest_stage'] for r in results))}, mean x_pos {np.mean([r['x_pos'] for r in results]):.0f}, ")
    print(line + f"return {np.mean(returns):.1f} ± {np.std(returns):.1f}")
    print(f"wrote {video_path}")
    return results


# ============================================= support code ===========================================================
# Environments: the two package lines, the emulator, the Mario and Atari wrappers, the vector envs


def smb_version() -> str:
    return importlib.metadata.version("gym-super-mario-bros")


def is_gymnasium_native() -> bool:
    """True for the 9.x line (gymnasium API), False for 7.4 (old gym API)."""
    return int(smb_version().split(".")[0]) >= 9


def import_smb():
    """gym_super_mario_bros (importing it registers its ids). On the 7.4 line that imports the unmaintained gym, whose
    import-time notice is silenced: gym is only nes-py's base class and registry here, and shimmy adapts its API."""
    with contextlib.redirect_stderr(io.StringIO()):
        import gym_super_mario_bros
    return gym_super_mario_bros


def mario_env_ids() -> list[str]:
    """Every id the installed gym-super-mario-bros registers."""
    import_smb()
    if is_gymnasium_native():
        registry = gym.registry
    else:
        import gym as old_gym
        registry = old_gym.envs.registry
    return sorted(env_id for env_id in registry if env_id.startswith("SuperMarioBros"))


def summarize_ids(env_ids: list[str]) -> str:
    """'SuperMarioBros-<world>-<stage>-v0..v3, SuperMarioBros-v0..v3, ...': the id families, compactly."""
    versions = {}
    for env_id in env_ids:
        family, version = re.sub(r"(?<=[A-Za-z-])[1-9A-D]-\d+(?=-v)", "<world>-<stage>", env_id).rsplit("-v", 1)
        versions.setdefault(family, set()).add(int(version))
    return ", ".join(f"{family}-v{min(v)}" + (f"..v{max(v)}" if len(v) > 1 else "") for family, v in versions.items())


def check_env_id(env_id: str):
    """Stop with the ids that do exist when env_id is not one of them."""
    if env_id.startswith("ALE/"):
        import ale_py
        gym.register_envs(ale_py)
        if env_id not in gym.registry:
            close = difflib.get_close_matches(env_id, [k for k in gym.registry if k.startswith("ALE/")], n=3)
            fail(f"unknown Atari id '{env_id}'" + (f"; did you mean {', '.join(close)}?" if close else ""))
        return
    env_ids = mario_env_ids()
    if env_id not in env_ids:
        close = difflib.get_close_matches(env_id, env_ids, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        fail(f"'{env_id}' is not an id of the installed gym-super-mario-bros {smb_version()}; {hint}"
             f"it has {summarize_ids(env_ids)} (or use an ALE/ id)")


def joypad_actions(action_set: str) -> list[list[str]]:
    import_smb()
    from gym_super_mario_bros import actions

    return {"right_only": actions.RIGHT_ONLY, "simple": actions.SIMPLE_MOVEMENT, "complex": actions.COMPLEX_MOVEMENT}[action_set]


def nes_emulator(env):
    """nes-py's NESEnv under make_mario_base_env's env (on the 7.4 line inside shimmy's adapter for the old gym API)."""
    inner = env.unwrapped
    return getattr(inner, "gym_env", inner).unwrapped


def make_mario_base_env(env_id: str, action_set: str, render: bool):
    """The emulator with a Discrete joypad action space, as a gymnasium env (frames are 240x256x3 uint8)."""
    gym_super_mario_bros = import_smb()
    from nes_py.wrappers import JoypadSpace

    render_mode = "rgb_array" if render else None
    if is_gymnasium_native():
        return JoypadSpace(gym.make(env_id, render_mode=render_mode), joypad_actions(action_set))
    # 7.4: build the env class from its old-gym registration directly (gym.make would add 0.26-API wrappers that
    # nes-py 8 does not speak), then let shimmy translate the gym 0.21 API to gymnasium's.
    import gym as old_gym
    import shimmy

    spec = old_gym.envs.registry[env_id]
    env_class = getattr(gym_super_mario_bros, spec.entry_point.split(":")[1])
    env = JoypadSpace(env_class(**spec.kwargs), joypad_actions(action_set))
    return shimmy.GymV21CompatibilityV0(env=env, render_mode=render_mode)


FRAMES_PER_STEP = 4  # each agent step repeats its action for 4 emulator frames
# The 7.4 env's x reward pays moves of at most 5 pixels a frame (more is a respawn or a pipe); Mario runs at under 3.
MAX_RUN_STEP = 5 * FRAMES_PER_STEP
# Mario rises and falls at under 8 pixels a frame; y_pos moves more only when it wraps (a fall below the screen).
MAX_CLIMB_STEP = 8 * FRAMES_PER_STEP


class TrackProgress(gym.Wrapper):
    """Progress through the game, for logging and the stuck time-out. A full-game id (SuperMarioBros-v0) plays stage
    after stage with x_pos restarting at each and a life lost not ending the episode, so progress is counted per
    stage and per life:

        info["max_x_pos"]       the farthest x in the current stage (at an episode's end: in the furthest stage)
        info["furthest_stage"]  the furthest stage reached, numbered 1-1 -> 1, 1-2 -> 2, ..., 8-4 -> 32
        info["flags"]           flags (ends of stages: flag or axe) reached in the episode
        info["stage_cleared"]   whether the current stage's flag has been reached (until the next stage begins)
        info["skipped_x"]       new ground (beyond the farthest x of the life) reached by a jump in x that no walk
                                or run makes in one step: a pipe to another part of the stage; else 0
        info["height_gained"]   the change in y_pos in the step (negative: down); 0 at a new stage or life and
                                when y_pos wraps as Mario falls below the screen

    With stuck_timeout > 0 the episode is truncated after that many steps without a new farthest x of the current
    life in the current stage (a truncation: the value of the state still counts)."""

    def __init__(self, env, stuck_timeout: int = 0):
        super().__init__(env)
        self.stuck_timeout = stuck_timeout

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.stage, self.life = (info.get("world"), info.get("stage")), info.get("life")
        self.max_x_pos = self.life_max_x_pos = self.steps_without_progress = 0
        self.furthest_stage, self.flags, self.cleared_stage = 0, 0, None
        self.x_pos, self.y_pos = info.get("x_pos"), info.get("y_pos")
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        stage = (info["world"], info["stage"])
        skipped_x = height_gained = 0
        if stage != self.stage or info["life"] != self.life:  # a new stage, or a respawn: progress starts over
            if stage != self.stage:
                self.max_x_pos = 0
            self.stage, self.life, self.life_max_x_pos, self.steps_without_progress = stage, info["life"], 0, 0
        elif self.x_pos is not None:
            if info["x_pos"] - self.x_pos > MAX_RUN_STEP:
                skipped_x = max(0, info["x_pos"] - max(self.x_pos, self.life_max_x_pos))
            if abs(info["y_pos"] - self.y_pos) <= MAX_CLIMB_STEP:
                height_gained = info["y_pos"] - self.y_pos
        self.x_pos, self.y_pos = info["x_pos"], info["y_pos"]
        self.max_x_pos = max(self.max_x_pos, info["x_pos"])
        if info["x_pos"] > self.life_max_x_pos:
            self.life_max_x_pos, self.steps_without_progress = info["x_pos"], 0
        else:
            self.steps_without_progress += 1
        if info["flag_get"] and self.cleared_stage != stage:  # the flag stays set for a few steps: count it once
            self.flags, self.cleared_stage = self.flags + 1, stage
        self.furthest_stage = max(self.furthest_stage, 4 * (stage[0] - 1) + stage[1])
        info.update(max_x_pos=self.max_x_pos, furthest_stage=self.furthest_stage, flags=self.flags,
                    stage_cleared=self.cleared_stage == stage, skipped_x=skipped_x, height_gained=height_gained)
        if self.stuck_timeout and self.steps_without_progress >= self.stuck_timeout:
            truncated = True
        return obs, reward, terminated, truncated, info


class ShapeReward(gym.Wrapper):
    """reward_scale * (env reward + score_coef * score gained + flag_bonus at each stage's flag - death_penalty at each
    life lost [+ skipped_x, the ground a pipe skips, with pay_skipped_ground] + height_coef * height_gained), over
    TrackProgress (whose flag count, skipped_x and height_gained it reads). The score the game adds while tallying a
    cleared stage (its remaining time, counted until the next stage begins) is not paid: it rewards the clock, not
    play. With add_terms=False (the 9.x line, whose reward has the score, flag and death terms already) only the scale
    applies."""

    def __init__(self, env, flag_bonus: float, death_penalty: float, score_coef: float, reward_scale: float,
                 add_terms: bool, pay_skipped_ground: bool, height_coef: float):
        super().__init__(env)
        self.flag_bonus, self.death_penalty, self.score_coef = flag_bonus, death_penalty, score_coef
        self.reward_scale, self.add_terms, self.pay_skipped_ground = reward_scale, add_terms, pay_skipped_ground
        self.height_coef = height_coef

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.last = {"score": info.get("score", 0), "lives": lives_left(info.get("life", 2)), "flags": 0,
                     "stage_cleared": False}
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        now = {"score": info["score"], "lives": lives_left(info["life"]), "flags": info["flags"],
               "stage_cleared": info["stage_cleared"]}
        if self.add_terms:
            if not self.last["stage_cleared"]:
                reward += self.score_coef * (now["score"] - self.last["score"])
            reward += self.flag_bonus * (now["flags"] - self.last["flags"])
            if self.pay_skipped_ground:
                reward += info["skipped_x"]
            reward += self.height_coef * info["height_gained"]
            # A single-stage episode ends at a death before the life counter drops; a full game counts lives.
            if (terminated and not info["flag_get"]) or now["lives"] < self.last["lives"]:
                reward -= self.death_penalty
        self.last = now
        return obs, self.reward_scale * reward, terminated, truncated, info


class MaxAndSkip(gym.Wrapper):
    """Gymnasium's MaxAndSkipObservation: repeat the action `skip` frames, sum the rewards, return the max of the last
    two frames (in a new array, so nes-py's reused screen buffer is never kept). nes-py's screen is a view with its
    channels reversed, which numpy copies pixel by pixel (~1 ms a frame); one channel at a time it copies ~5x faster."""

    def __init__(self, env, skip: int):
        super().__init__(env)
        self.skip = skip
        self.frames = np.zeros((2, *env.observation_space.shape), dtype=env.observation_space.dtype)

    def step(self, action):
        total_reward, terminated, truncated, info = 0.0, False, False, {}
        for i in range(self.skip):
            obs, reward, terminated, truncated, info = self.env.step(action)
            if i >= self.skip - 2:
                frame = self.frames[i - (self.skip - 2)]
                for channel in range(frame.shape[-1]):
                    frame[..., channel] = obs[..., channel]
            total_reward += float(reward)
            if terminated or truncated:
                break
        return np.maximum(self.frames[0], self.frames[1]), total_reward, terminated, truncated, info


class GrayResize(gym.ObservationWrapper):
    """An RGB frame to a size x size grayscale one, as Gymnasium's GrayscaleObservation (its luminance weights in
    float64, truncated to uint8: the same picture) then ResizeObservation (area averaging), with the weighted sum in
    OpenCV instead of numpy."""

    WEIGHTS = np.array([[0.2125, 0.7154, 0.0721]])  # R, G, B

    def __init__(self, env, size: int):
        super().__init__(env)
        self.size = size
        self.observation_space = gym.spaces.Box(0, 255, (size, size), np.uint8)

    def observation(self, frame):
        gray = cv2.transform(frame.astype(np.float64), self.WEIGHTS).astype(np.uint8)
        return cv2.resize(gray, (self.size, self.size), interpolation=cv2.INTER_AREA)


def lives_left(life_counter: int) -> int:
    """The game's life counter: 2 at the start, 0 for the last life, 255 after it (game over)."""
    return -1 if life_counter == 255 else life_counter


class StartStates(gym.Wrapper):
    """Start states along the env's own furthest episode (Backplay, Resnick et al. 2018; Salimans & Chen 2018): with
    probability p an episode starts after the first `start_point` steps of that episode (the steps after it are the
    episode). The start point lies back_steps agent steps before the furthest episode's end; once that episode reached
    the flag, it moves back by back_steps whenever at least half of the last `window` episodes from there reach it too,
    down to the reset state; before that, also when none of `window` episodes from there got further (the end of an
    episode that died may be a state no play survives). Below the no-op starts, which it records with the agent's actions (after a replayed start,
    info["start_step"] tells them to add none; every step's info carries it, so the logs tell the episodes from a start
    state apart). reset(options={"start": k}) starts after the first k steps instead. The furthest episode and the start
    point (`curriculum`) live in the env worker; checkpoints keep them, so a resumed run goes on from where its envs were.

    The start state is exact: a second emulator (from make_start_env) replays the furthest episode's first steps from
    the reset state once per start point (the emulator is deterministic) and keeps that state in nes-py's backup slot,
    which its reset restores. Replaying at every reset instead would stall the env's group for seconds each time."""

    def __init__(self, env, p: float, make_start_env, back_steps: int = 50, window: int = 10):
        super().__init__(env)
        self.p, self.back_steps = p, back_steps
        self.rng = np.random.default_rng()
        self.furthest_actions, self.furthest_x, self.furthest_cleared, self.start_point = [], -1, False, 0
        self.outcomes = deque(maxlen=window)  # of the episodes from start_point: further than the furthest, or the flag
        self.actions, self.max_x, self.start, self.ended = [], 0, 0, True
        self.reset_env, self.make_start_env = env, make_start_env
        self.start_env, self.start_env_holds, self.start_state = None, (None, 0), None

    def reset(self, *, seed=None, options=None):
        if not self.ended:  # cut short above this wrapper (the stuck time-out): an episode that did not reach the flag
            self.episode_ended(False)
        options = dict(options or {})
        start = options.pop("start", None)
        if seed is not None:
            self.rng = np.random.default_rng([seed, 1])  # a stream of its own beside the other wrappers' seeded ones
        if start is None:
            start = self.start_point if self.start_point and self.rng.random() < self.p else 0
        if start:
            self.env = self.start_env_at(start)
            self.env.reset()  # restores the backup: the state after the first `start` steps
            obs, info, self.max_x = self.start_state
            obs, info = obs.copy(), dict(info)
            self.actions = list(self.furthest_actions[:start])
            info["previous_action"] = self.actions[-1]  # the replay's last, which the game's RAM remembers as held
        else:
            self.env = self.reset_env
            obs, info = self.env.reset(seed=seed, options=options or None)
            self.actions, self.max_x = [], info.get("x_pos", 0)
        self.start, self.ended = start, False
        info["start_step"] = start
        return obs, info

    def start_env_at(self, start: int):
        """The second emulator with the state after the furthest episode's first `start` steps in its backup slot, and
        (self.start_state) the observation, info and furthest x of those steps."""
        held_actions, held_start = self.start_env_holds
        if held_actions is not self.furthest_actions or held_start != start:
            if self.start_env is not None:
                self.start_env.close()
            self.start_env = self.make_start_env()
            obs, info = self.start_env.reset()
            max_x = info.get("x_pos", 0)
            for action in self.furthest_actions[:start]:
                obs, _, _, _, info = self.start_env.step(action)
                max_x = max(max_x, info["x_pos"])
            nes_emulator(self.start_env)._backup()
            self.start_env_holds, self.start_state = (self.furthest_actions, start), (obs, info, max_x)
        return self.start_env

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["start_step"] = self.start
        self.actions.append(action)
        self.max_x = max(self.max_x, info["x_pos"])
        if terminated or truncated:
            self.episode_ended(bool(info["flag_get"]))
        return obs, reward, terminated, truncated, info

    def close(self):
        if self.start_env is not None:
            self.start_env.close()
        self.reset_env.close()

    @property
    def curriculum(self) -> dict:
        """The furthest episode, the start point and the outcomes from it, as plain types a checkpoint keeps."""
        return {"furthest_actions": [int(a) for a in self.furthest_actions], "furthest_x": int(self.furthest_x),
                "furthest_cleared": bool(self.furthest_cleared), "start_point": int(self.start_point),
                "outcomes": [bool(o) for o in self.outcomes]}

    @curriculum.setter
    def curriculum(self, state: dict):
        self.furthest_actions, self.furthest_x = list(state["furthest_actions"]), state["furthest_x"]
        self.furthest_cleared, self.start_point = state["furthest_cleared"], state["start_point"]
        self.outcomes.clear()
        self.outcomes.extend(state["outcomes"])

    def episode_ended(self, flag: bool):
        """A further episode (or the first to reach the flag) becomes the one to start along; once the furthest reached
        the flag, the start point moves back as the episodes from it reach the flag too; before, when none from it got
        further."""
        self.ended = True
        further = not self.furthest_cleared and (flag or self.max_x > self.furthest_x)
        if self.start and self.start == self.start_point:
            self.outcomes.append(further or flag)
        if further:
            self.furthest_actions, self.furthest_x, self.furthest_cleared = self.actions, self.max_x, flag
            self.start_point = max(0, len(self.actions) - self.back_steps)
            self.outcomes.clear()
        elif len(self.outcomes) == self.outcomes.maxlen and (np.mean(self.outcomes) >= 0.5 or not (
                self.furthest_cleared or any(self.outcomes))):
            self.start_point = max(0, self.start_point - self.back_steps)
            self.outcomes.clear()


class RandomGameRng(gym.Wrapper):
    """Writes random bytes into Super Mario Bros' pseudo-random register (PseudoRandomBitReg: 7 bytes of RAM at 0x07A7,
    shifted every frame, which times enemies such as the flying Cheep-Cheeps) after each reset. All bytes are
    non-zero: a register of zeros would stay zero. The bytes come from the wrapper's own generator, seeded by
    reset(seed=...)."""

    ADDRESS, SIZE = 0x07A7, 7

    def __init__(self, env):
        super().__init__(env)
        self.rng = np.random.default_rng()

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        if seed is not None:
            self.rng = np.random.default_rng([seed, 2])
        self.env.unwrapped.ram[self.ADDRESS:self.ADDRESS + self.SIZE] = self.rng.integers(1, 256, self.SIZE)
        return obs, info


class StickyActions(gym.Wrapper):
    """With probability p, an agent step repeats the previous action instead of the one chosen (the first step of an
    episode repeats NOOP). Above the no-op starts, so that those stay no-ops."""

    def __init__(self, env, p: float):
        super().__init__(env)
        self.p, self.previous = p, 0
        self.rng = np.random.default_rng()

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.rng = np.random.default_rng([seed, 3])
        self.previous = 0
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        if self.rng.random() < self.p:
            action = self.previous
        self.previous = action
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["executed_action"] = action
        return obs, reward, terminated, truncated, info


class PreviousAction(gym.Wrapper):
    """Appends the action of the previous agent step to the frame stack as one more uint8 channel: the rows of band i
    (of num_actions equal bands) lit for action i. The action is the one the game executed (a sticky repeat, or the
    last of a replayed start state, when a wrapper below says so in info); NOOP at an episode's start."""

    def __init__(self, env, num_actions: int):
        super().__init__(env)
        channels, height, width = env.observation_space.shape
        self.observation_space = gym.spaces.Box(0, 255, (channels + 1, height, width), np.uint8)
        self.bands = np.zeros((num_actions, 1, height, width), np.uint8)
        for action in range(num_actions):
            self.bands[action, 0, action * height // num_actions:(action + 1) * height // num_actions] = 255

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return self.with_action(obs, info.get("previous_action", 0)), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self.with_action(obs, info.get("executed_action", action)), reward, terminated, truncated, info

    def with_action(self, obs, action) -> np.ndarray:
        return np.concatenate([obs, self.bands[int(action)]])


class NoopStart(gym.Wrapper):
    """Starts each episode after a uniform 0..noop_max no-op steps. The emulator is deterministic: from one start
    state, a policy can learn by heart when each enemy arrives instead of watching for it. The count comes from the
    wrapper's own generator, seeded by reset(seed=...). It wraps the emulator below the episode statistics, progress
    tracking and reward, so the no-ops are no part of the episode. reset(options={"noops": k}) starts after exactly k
    no-ops instead, to evaluate every start state in turn."""

    def __init__(self, env, noop_max: int):
        super().__init__(env)
        self.noop_max = noop_max
        self.rng = np.random.default_rng()

    def reset(self, *, seed=None, options=None):
        options = dict(options or {})
        noops = options.pop("noops", None)
        obs, info = self.env.reset(seed=seed, options=options or None)
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        if noops is None:
            noops = 0 if info.get("start_step") else self.rng.integers(0, self.noop_max + 1)
        for _ in range(noops):
            obs, _, terminated, truncated, info = self.env.step(0)  # action 0 is NOOP in every joypad set
            if terminated or truncated:
                obs, info = self.env.reset()
        return obs, info


class EpisodicLife(gym.Wrapper):
    """Atari: a lost life ends the learner's episode (terminated: the value of what follows does not count), but not
    the game: reset() after a lost life steps a no-op instead of restarting. Below this wrapper, the episode
    statistics see whole games."""

    def __init__(self, env):
        super().__init__(env)
        self.lives, self.game_over = 0, True

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.game_over = terminated or truncated
        lives = self.env.unwrapped.ale.lives()
        terminated = terminated or 0 < lives < self.lives
        self.lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, **kwargs):
        if not self.game_over:
            obs, _, terminated, truncated, info = self.env.step(0)
            self.game_over = terminated or truncated  # the game can end on that no-op too
        if self.game_over:
            obs, info = self.env.reset(**kwargs)
        self.lives = self.env.unwrapped.ale.lives()
        return obs, info


class FireReset(gym.Wrapper):
    """Atari games that wait for FIRE to start (Breakout launches its ball with it): press it after every reset."""

    def reset(self, **kwargs):
        self.env.reset(**kwargs)
        obs, _, terminated, truncated, info = self.env.step(1)  # FIRE is action 1 where a game has it
        if terminated or truncated:
            obs, info = self.env.reset(**kwargs)
        return obs, info


class EnvGroups:
    """num_envs environments as one or two vector envs ("groups"). With two AsyncVectorEnv groups the rollout is
    pipelined: one group's emulators step while the policy acts for the other, so acting costs no stepping time
    (double-buffered sampling). Each group uses SAME_STEP autoreset: the step that ends an episode already returns
    the next episode's first observation, and the ended episode's last one comes in info["final_obs"]. Every stored
    transition is then a real one (Gymnasium's default NEXT_STEP mode would insert a reset step whose action is
    ignored), and truncated episodes can bootstrap."""

    def __init__(self, args: Args):
        groups = 1 if args.sync_envs or args.num_envs < 2 else 2
        sizes = [args.num_envs // groups + (g < args.num_envs % groups) for g in range(groups)]
        vector_cls = gym.vector.SyncVectorEnv if args.sync_envs else gym.vector.AsyncVectorEnv
        self.groups = []
        try:
            for size in sizes:
                self.groups.append(vector_cls([make_env(args) for _ in range(size)],
                                              autoreset_mode=AutoresetMode.SAME_STEP))
        except BaseException:
            self.close()  # the groups already started
            raise
        self.slices = [slice(sum(sizes[:g]), sum(sizes[:g + 1])) for g in range(groups)]
        self.num_envs = args.num_envs
        self.single_observation_space = self.groups[0].single_observation_space
        self.single_action_space = self.groups[0].single_action_space
        self.processes = [process for group in self.groups for process in getattr(group, "processes", [])]
        self.actions = [None] * groups

    def reset(self, seed: int):
        return np.concatenate([group.reset(seed=seed + envs.start)[0] for group, envs in zip(self.groups, self.slices)])

    def get_curricula(self) -> list[dict]:
        """Each env's StartStates curriculum, in env order (between steps: none may be pending)."""
        return [curriculum for group in self.groups for curriculum in group.get_attr("curriculum")]

    def set_curricula(self, curricula: list[dict]):
        for group, envs in zip(self.groups, self.slices):
            group.set_attr("curriculum", curricula[envs])

    def send(self, g: int, actions: np.ndarray):
        """Start group g's step (in its worker processes, for an AsyncVectorEnv)."""
        if isinstance(self.groups[g], gym.vector.AsyncVectorEnv):
            self.groups[g].step_async(actions)
        else:
            self.actions[g] = actions

    def receive(self, g: int):
        """Group g's step results, as gymnasium's vector step returns them."""
        if isinstance(self.groups[g], gym.vector.AsyncVectorEnv):
            return self.groups[g].step_wait()
        return self.groups[g].step(self.actions[g])

    def close(self, worker_died: bool = False):
        """After a worker died, a pending step can never complete: kill the workers (SIGKILL, as they ignore SIGINT
        and SIGTERM) instead of waiting for them, then let gymnasium release the pipes."""
        for group in self.groups:
            if group.closed:
                continue
            if not worker_died:
                group.close()
                continue
            for process in group.processes:
                process.kill()
                process.join()
            with contextlib.suppress(EOFError, OSError), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "close while waiting for a pending step": expected here
                group.close(terminate=True)
            group.closed = True


# ----------------------------------------------------------------------------------------------------------------------
# Training runs: setup and logging, checkpoints, resume and fork, signals
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What train() sets up before its loop."""
    args: Args  # for a resumed run, the run's own (see resumed_args)
    rank: int
    world_size: int
    device: torch.device
    run_dir: str
    checkpoint: dict | None  # the checkpoint to resume or fork from
    checkpoint_path: str | None  # the newest good checkpoint of this run


def start_run(args: Args) -> Run:
    """Join torchrun's process group (if any), pick the device, load the checkpoint to resume or fork from, name and
    check the run directory, and seed the random generators."""
    rank, world_size, local_rank = setup_distributed(args.cuda)
    device = pick_device(args.cuda, local_rank)
    checkpoint, checkpoint_path = None, None
    if args.resume:
        checkpoint_path = newest_checkpoint(args.resume)
        checkpoint = load_training_checkpoint(checkpoint_path, world_size)
        args = resumed_args(args, checkpoint["args"])
        validate_args(args)
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_path)))
    else:
        run_dir = os.path.join(args.runs_dir, f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__"
                                              f"{int(time.time())}")
        if args.fork:  # a resumed fork goes on from its own checkpoint: its saved --fork only records where it began
            checkpoint = load_checkpoint(args.fork)
            batch_size = args.num_envs * args.num_steps * world_size
            if checkpoint["global_step"] // batch_size >= args.total_timesteps // batch_size:
                fail(f"--fork {args.fork} is at step {checkpoint['global_step']}, already at --total-timesteps "
                     f"{args.total_timesteps}; raise --total-timesteps")
    check_env_id(args.env_id)
    run_dir = broadcast_from_main(run_dir)  # the ranks may have started in different seconds
    if rank == 0:
        check_writable(run_dir)
    seed_everything(args.seed, args.torch_deterministic)
    keep_freed_memory()
    return Run(args, rank, world_size, device, run_dir, checkpoint, checkpoint_path)


def restore_training_state(run: Run, agent: Agent, optimizer, envs: EnvGroups, batch_size: int) -> tuple[int, int]:
    """Load the resumed or forked checkpoint into the agent and optimizer (a resume also restores the random
    streams); give every torchrun rank the same weights. Returns the global step and iteration to go on from."""
    args, checkpoint, is_main = run.args, run.checkpoint, run.rank == 0
    global_step = iteration = 0
    if checkpoint:
        if not args.resume:
            check_fits(checkpoint, args.fork, list(envs.single_observation_space.shape),
                       int(envs.single_action_space.n), args.env_id,
                       f"keep its --action-set ({checkpoint['action_set']}) and --previous-action setting, and an --env-id of "
                       "the same kind")
        agent.load_state_dict(checkpoint["model"])  # copied onto the device's tensors
        if "optimizer" in checkpoint:  # an evaluation-only model forks with a fresh optimizer
            optimizer.load_state_dict(checkpoint["optimizer"])  # moved to the parameters' device by torch
        global_step = checkpoint["global_step"]
        if args.resume:
            iteration = checkpoint["iteration"]
            set_rng_states(checkpoint["rng"])
            curricula = checkpoint.get("start_states") or []  # none before checkpoints kept them: they begin anew
            if args.start_states and curricula:
                envs.set_curricula(curricula[run.rank * args.num_envs:(run.rank + 1) * args.num_envs])
            if is_main:
                print(f"resuming {run.run_dir} at iteration {iteration}, step {global_step}")
        else:
            # The step count goes on, and with it the learning-rate schedule, at this run's batch size and rate.
            iteration = global_step // batch_size
            optimizer.param_groups[0]["lr"] = args.learning_rate
            if is_main:
                print(f"forking {args.fork} at step {global_step} into {run.run_dir}")
    if run.world_size > 1:
        for tensor in agent.state_dict().values():
            dist.broadcast(tensor, src=0)  # identical starting weights on every rank
        torch.manual_seed(args.seed + 1000 * run.rank + iteration)  # but each rank samples its own actions
    return global_step, iteration


def open_writer(run: Run, global_step: int) -> SummaryWriter:
    """The run's TensorBoard writer. purge_step drops what an interrupted process logged after its checkpoint (steps
    > global_step): a resumed run's curves go on without duplicate or missing points."""
    writer = SummaryWriter(run.run_dir, purge_step=global_step + 1 if run.args.resume else None)
    if not run.args.resume:
        writer.add_text("hyperparameters",
                        "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(run.args).items()))
    return writer


def progress_line(iteration: int, num_iterations: int, global_step: int, sps: int, rollout_sps: int, recent: dict,
                  elapsed: float, eta: float) -> str:
    def clock(seconds: float) -> str:
        return f"{int(seconds // 3600)}:{time.strftime('%M:%S', time.gmtime(seconds))}"

    line = (f"iter {iteration}/{num_iterations} ({iteration / num_iterations:.0%})  step {global_step}  SPS {sps} "
            f"(rollout {rollout_sps})  elapsed {clock(elapsed)}  ETA {clock(eta)}")
    if recent["return"]:
        line += f"  return(last 20) {np.mean(recent['return']):.1f}"
    if recent["x_pos"]:
        line += f"  x_pos {np.mean(recent['x_pos']):.0f}  flags {np.mean(recent['flag_get']):.0%}"
    return line


def finish_run(run: Run, agent: Agent, optimizer, envs: EnvGroups, stop: "GracefulStop", global_step: int,
               iteration: int):
    """After the loop: under torchrun, check that the ranks agree; on a signal, checkpoint the last complete iteration
    unless that checkpoint exists already."""
    stopping = stop.agreed(run.device)  # every rank asks: a signal that came after the loop's last check counts too
    if run.world_size > 1 and not stopping:
        check_ranks_agree(agent, run.device)
    curricula = start_state_curricula(envs, run.args) if stopping else []
    if run.world_size > 1:
        dist.barrier()  # no rank tears the process group down while another still uses it
    if run.rank == 0 and stopping and (run.checkpoint_path is None
                                       or not run.checkpoint_path.endswith(f"step_{global_step:010d}.pt")):
        run.checkpoint_path = save_checkpoint(run.run_dir, agent, optimizer, run.args, global_step, iteration, envs,
                                              curricula)
        print(f"saved {run.checkpoint_path}", flush=True)


def fail_on_dead_worker(envs: EnvGroups, args: Args, error: Exception, global_step: int, run_dir: str):
    # The pipe can report the death before the process is reaped: wait for the first exit to name the worker.
    ended = multiprocessing.connection.wait([process.sentinel for process in envs.processes], timeout=5)
    dead = [i for i, process in enumerate(envs.processes) if process.sentinel in ended]
    envs.close(worker_died=True)
    fail(f"environment worker {', '.join(map(str, dead)) or '?'} ({args.env_id}) died ({type(error).__name__}) at step "
         f"{global_step}; continue from the last checkpoint with --resume {run_dir}")


def log_episodes(writer, episodes, global_step: int, num_envs: int, world_size: int, recent: dict):
    """Each finished episode (as (rank, (step index, episode))) at the step it ended; for Mario also where it got and
    whether it reached the flag."""
    for rank, (step, episode) in episodes:
        at_step = global_step + ((step * world_size + rank) + 1) * num_envs
        writer.add_scalar("charts/episodic_return", episode["return"], at_step)
        writer.add_scalar("charts/episodic_length", episode["length"], at_step)
        recent["return"].append(episode["return"])
        if "x_pos" in episode:
            recent["x_pos"].append(episode["x_pos"])
            recent["flag_get"].append(episode["flag_get"])
            # Per episode only what no other tag says (events of 30k episodes add up): the furthest x and stage
            # (1-1 -> 1, ..., 8-4 -> 32) and the 0/1 flag, from which any window's flag rate follows.
            writer.add_scalar("mario/max_x_pos", episode["max_x_pos"], at_step)
            writer.add_scalar("mario/episode_flag_get", float(episode["flag_get"]), at_step)
            writer.add_scalar("mario/furthest_stage", episode["furthest_stage"], at_step)
            if "start_step" in episode:  # --start-states: 0 at the reset state, else the step it began after
                writer.add_scalar("mario/episode_start_step", episode["start_step"], at_step)


def seed_everything(seed: int, torch_deterministic: bool):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def start_state_curricula(envs: EnvGroups, args: Args) -> list[dict]:
    """With --start-states, every env's curriculum, torchrun ranks in order, on rank 0 (a collective: all ranks call
    it); otherwise none."""
    if not args.start_states:
        return []
    return [curriculum for _, curriculum in gather_to_main(envs.get_curricula())]


def get_rng_states() -> dict:
    """Python, numpy and torch generator states, as types torch.load(weights_only=True) accepts."""
    name, key, pos, has_gauss, cached_gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached_gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict):
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached_gauss))
    torch.set_rng_state(states["torch"])
    for index, state in enumerate(states["cuda"][:torch.cuda.device_count()]):  # the GPUs this machine has
        torch.cuda.set_rng_state(state, index)


def save_checkpoint(run_dir: str, agent: Agent, optimizer, args: Args, global_step: int, iteration: int, envs,
                    curricula: list[dict]) -> str:
    """Write <run_dir>/checkpoints/step_<global_step>.pt atomically (a crash never leaves a half-written file under
    that name), then delete all but the newest keep_checkpoints. `curricula`: every env's start-state curriculum
    (see start_state_curricula)."""
    checkpoint = {
        "model": agent.state_dict(),
        "optimizer": optimizer.state_dict(),
        "global_step": global_step,
        "iteration": iteration,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,  # iterations count batches of all ranks
        "rng": get_rng_states(),
        "args": asdict(args),
        "env_id": args.env_id,
        "action_set": args.action_set,
        "obs_shape": list(envs.single_observation_space.shape),
        "num_actions": int(envs.single_action_space.n),
        "start_states": curricula,
    }
    path = os.path.join(run_dir, "checkpoints", f"step_{global_step:010d}.pt")
    torch.save(checkpoint, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    for old in sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step_*.pt")))[:-args.keep_checkpoints]:
        os.remove(old)
    return path


def newest_checkpoint(path: str) -> str:
    """`path` itself if it is a file; for a run directory (or its checkpoints/ folder), its newest checkpoint."""
    if not os.path.isdir(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "checkpoints", "step_*.pt")) + glob.glob(os.path.join(path, "step_*.pt")))
    if not found:
        fail(f"no checkpoint in {path}; pass a run directory that has checkpoints/step_*.pt, or a checkpoint file")
    return found[-1]


def load_checkpoint(path: str, device="cpu") -> dict:
    """The checkpoint at `path`, the model's tensors on `device` and everything else on the CPU: the RNG states must
    be CPU tensors whatever the device, and the optimizer moves its state to its parameters' device as it loads it."""
    try:
        checkpoint = torch.load(newest_checkpoint(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"no checkpoint at {path}; pass a checkpoint file or a run directory")
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__}); the file is truncated or not a checkpoint")
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        fail(f"{path} holds no model; pass a checkpoint written by this script")
    checkpoint["model"] = {name: tensor.to(device) for name, tensor in checkpoint["model"].items()}
    return checkpoint


def load_training_checkpoint(path: str, world_size: int) -> dict:
    """A checkpoint to resume from: one with the training state, written by as many torchrun ranks as there are now
    (iterations, the learning-rate schedule and the seeds count per world size)."""
    checkpoint = load_checkpoint(path)
    if "optimizer" not in checkpoint:
        fail(f"{path} is an evaluation-only model (no optimizer state); play it with --eval-checkpoint, or resume "
             "from runs/<run>/checkpoints")
    saved_world_size = checkpoint.get("world_size", 1)
    if saved_world_size != world_size:
        fail(f"{path} was written by a run on {saved_world_size} torchrun rank(s), not {world_size}; resume it with "
             f"{'torchrun --nproc_per_node ' + str(saved_world_size) if saved_world_size > 1 else 'no torchrun'}, or "
             "start a new run")
    return checkpoint


# The flags a resumed run may change: they concern this process (where it runs, how often it saves and films), not
# what it learns. Every other flag comes from the checkpoint, so the run goes on as it started (same batch, same
# learning-rate schedule, same total).
RESUME_FLAGS = ("resume", "cuda", "save_interval", "keep_checkpoints", "capture_video", "video_interval")
# Those and the checkpoint a run was forked from: flags no checkpoint decides for a resumed run.
PER_PROCESS_FLAGS = RESUME_FLAGS + ("fork",)


def saved_args(saved: dict) -> Args:
    """The Args a checkpoint holds; an option it predates has its env id's default (see missing_options)."""
    return replace(default_args(saved["env_id"]), **{f.name: saved[f.name] for f in fields(Args) if f.name in saved})


def missing_options(saved: dict) -> list[str]:
    """The options a checkpoint's Args lack (it was written before they existed), RESUME_FLAGS aside."""
    return [f.name for f in fields(Args) if f.name not in saved and f.name not in PER_PROCESS_FLAGS]


def resumed_args(args: Args, saved: dict) -> Args:
    """The Args a resumed run goes on with: the checkpoint's, but RESUME_FLAGS, and the options the checkpoint
    predates, as `args` holds them. From the command line, `args` holds the run's saved values for the flags not given
    and its env id's defaults for the options it predates (see cli_args)."""
    resumed = saved_args(saved)
    for name in RESUME_FLAGS + tuple(missing_options(saved)):
        setattr(resumed, name, getattr(args, name))
    return resumed


def check_writable(run_dir: str):
    try:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        with open(os.path.join(run_dir, ".write_test"), "w"):
            pass
        os.remove(os.path.join(run_dir, ".write_test"))
    except OSError as e:
        fail(f"cannot write the run directory {run_dir} ({e.strerror}); pass a writable --runs-dir")


class GracefulStop:
    """SIGINT (Ctrl-C) and SIGTERM become a request the training loop honours at a safe point: it finishes the current
    step (or update), writes a checkpoint, closes the envs and the writer, and exits with 128 + the signal number.
    A second signal stops at once."""

    def __init__(self):
        self.signum = None
        self.previous = {sig: signal.signal(sig, self.request) for sig in (signal.SIGINT, signal.SIGTERM)}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after the current step and writing a checkpoint "
              "(send it again to quit at once)", file=sys.stderr, flush=True)

    def agreed(self, device) -> bool:
        """Whether to stop now. Under torchrun, true on every rank once any rank got a signal; a rank that got none
        exits as for SIGTERM."""
        if any_rank(self.requested, device) and not self.requested:
            self.signum = signal.SIGTERM
        return self.requested

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------------------------------
# Devices and torchrun: each rank steps its own envs and computes GAE and minibatches on its own batch;
# gradients are averaged so all ranks take the same optimizer step. Without torchrun these are no-ops.
# ----------------------------------------------------------------------------------------------------------------------


def pick_device(want_cuda: bool, local_rank: int = 0):
    if want_cuda and not torch.cuda.is_available():
        print("warning: --cuda given but no CUDA device is available; training on CPU", file=sys.stderr)
    return torch.device("cuda", local_rank) if want_cuda and torch.cuda.is_available() else torch.device("cpu")


def keep_freed_memory():
    """glibc returns every freed block over 128 KiB to the OS at once, so the tens of MB of activations of each
    minibatch are mapped and page-faulted in afresh, a visible share of the PPO update on the CPU. Serve
    such blocks from the heap and keep what is freed for reuse. Does nothing where the C library is not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB (glibc's maximum) come from the heap
        libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap instead of trimming it


def setup_distributed(want_cuda: bool) -> tuple[int, int, int]:
    """(rank, world_size, local_rank); joins the process group when started by torchrun (gloo on CPU, nccl on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = want_cuda and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    # torch.optim imports torch._dynamo on first use; imported after the group exists, it keeps references to it that
    # outlive destroy_process_group, so gloo's worker threads run on into interpreter shutdown, where one can abort the
    # process ("terminate called without an active exception"). Imported first, the group dies with destroy.
    import torch._dynamo  # noqa: F401
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), world_size, local_rank


def all_reduce_mean(tensor):
    """Average `tensor` over the ranks, in place."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def average_gradients(agent: nn.Module):
    """One all-reduce of all gradients, flattened."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in agent.parameters()]
    flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
    for grad, averaged in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(averaged.view_as(grad))


def any_rank(flag: bool, device) -> bool:
    """True on every rank if `flag` is true on any: decisions such as stopping are taken jointly, so no rank waits
    forever for another in a collective."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor(float(flag), device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def gather_to_main(items: list) -> list:
    """Every rank's items, concatenated on rank 0 as (rank, item) pairs (empty elsewhere)."""
    if not dist.is_initialized():
        return [(0, item) for item in items]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(items, gathered, dst=0)
    return [(rank, item) for rank, rank_items in enumerate(gathered or []) for item in rank_items]


def broadcast_from_main(value):
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_ranks_agree(agent: nn.Module, device):
    """After training: every rank must hold exactly the same weights."""
    flat = torch.cat([p.detach().reshape(-1) for p in agent.parameters()])  # reshape: channels-last weights copy
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if not torch.equal(high, low):
        fail(f"ranks finished with different weights (max difference {(high - low).abs().max().item():.3g})")
    if dist.get_rank() == 0:
        print(f"weights identical on all {dist.get_world_size()} ranks")


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation support: loading a model, videos with the action probabilities
# ----------------------------------------------------------------------------------------------------------------------


def stage_name(number: int) -> str:
    """Stage number 1..32 (TrackProgress's furthest_stage) as world-stage: 5 -> '2-1'."""
    return f"{(number - 1) // 4 + 1}-{(number - 1) % 4 + 1}"


def check_fits(checkpoint: dict, path: str, envs_obs_shape: list, num_actions: int, env_id: str, fix: str):
    if (checkpoint["obs_shape"], checkpoint["num_actions"]) != (envs_obs_shape, num_actions):
        fail(f"checkpoint {path} is for {checkpoint['env_id']} (observations {checkpoint['obs_shape']}, "
             f"{checkpoint['num_actions']} actions), not {env_id} (observations {envs_obs_shape}, {num_actions} "
             f"actions); {fix}")


def load_agent(checkpoint: dict, path: str, envs_obs_shape: list, num_actions: int, env_id: str, device) -> Agent:
    """The saved agent, after checking that it fits the env's observations and actions."""
    check_fits(checkpoint, path, envs_obs_shape, num_actions, env_id, "pass a matching --env-id")
    agent = Agent(envs_obs_shape[0], num_actions).to(device)
    agent.load_state_dict(checkpoint["model"])
    return agent


def load_for_evaluation(path: str, args: Args, device, env_id: str | None = None) -> tuple[Agent, dict]:
    """The agent saved in checkpoint `path` and the checkpoint; args takes the checkpoint's action set, and env_id
    (default: the checkpoint's env id)."""
    checkpoint = load_checkpoint(path, device)
    args.env_id = env_id or checkpoint["env_id"]
    args.action_set = checkpoint["action_set"]
    args.previous_action = checkpoint["args"].get("previous_action", False)  # the observation it was trained on
    check_env_id(args.env_id)
    env = make_env(args)()
    agent = load_agent(checkpoint, path, list(env.observation_space.shape), int(env.action_space.n),
                       args.env_id, device)
    env.close()
    return agent, checkpoint


def action_labels(args: Args, env) -> list[str]:
    if args.env_id.startswith("ALE/"):
        return env.unwrapped.get_action_meanings()
    return ["+".join(buttons) for buttons in joypad_actions(args.action_set)]


def draw_action_probs(frame: np.ndarray, probs: np.ndarray, labels: list[str], chosen: int) -> np.ndarray:
    """The frame with a panel above it: one bar per action, its length the probability, the chosen one in green."""
    row, width = 12, frame.shape[1]
    panel = np.zeros((row * len(labels) + 4, width, 3), dtype=np.uint8)
    label_width = 80
    for i, (p, label) in enumerate(zip(probs, labels)):
        y = 2 + row * i
        color = (60, 220, 60) if i == chosen else (150, 150, 150)
        cv2.rectangle(panel, (label_width, y + 2), (label_width + int(p * (width - label_width - 2)), y + row - 2), color, -1)
        cv2.putText(panel, label[:13], (2, y + row - 3), cv2.FONT_HERSHEY_PLAIN, 0.7, (255, 255, 255), 1)
    return np.vstack([panel, frame])


def write_video(frames, path: str, fps: int = 15):
    from moviepy import ImageSequenceClip  # imported here: only video writing needs moviepy

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    clip = ImageSequenceClip(list(frames), fps=fps)
    if path.endswith(".gif"):
        clip.write_gif(path, fps=fps, logger=None)
    else:
        clip.write_videofile(path, fps=fps, logger=None)


# ----------------------------------------------------------------------------------------------------------------------
# Input checks and the command line
# ----------------------------------------------------------------------------------------------------------------------


def fail(message: str):
    """Stop with one line that says what is wrong and how to fix it (no traceback)."""
    sys.exit(f"error: {message}")


def validate_args(args: Args):
    for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "eval_episodes",
                 "save_interval", "video_interval", "keep_checkpoints"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("learning_rate", "clip_coef", "max_grad_norm", "reward_scale"):
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("stuck_timeout", "noop_max", "eval_noop_max"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if not 0 < args.gamma <= 1 or not 0 <= args.gae_lambda <= 1:
        fail(f"--gamma must be in (0, 1] and --gae-lambda in [0, 1], got {args.gamma} and {args.gae_lambda}")
    if not 0 <= args.sticky_actions < 1 or not 0 <= args.start_states <= 1:
        fail(f"--sticky-actions must be in [0, 1) and --start-states in [0, 1], got {args.sticky_actions} and "
             f"{args.start_states}")
    if args.start_states and not re.search(r"-\d-\d-v\d$", args.env_id):
        fail(f"--start-states replays episodes of one stage; {args.env_id} is not a single stage "
             "(use SuperMarioBros-<world>-<stage>-v<n>)")
    if args.start_states and args.random_game_rng:
        fail("--start-states replays episodes exactly, which a --random-game-rng written at each reset would change; "
             "pass one of them")
    if args.target_kl is not None and not args.target_kl > 0:
        fail(f"--target-kl must be positive, got {args.target_kl}")
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches:
        fail(f"--num-minibatches {args.num_minibatches} does not divide the batch of {batch_size} "
             f"(num_envs * num_steps); pick a divisor of {batch_size}")
    if args.norm_adv and batch_size // args.num_minibatches < 2:
        fail(f"--num-minibatches {args.num_minibatches} leaves 1 sample per minibatch of the batch of {batch_size}, and "
             "advantage normalisation needs 2 or more; use fewer minibatches (or --no-norm-adv)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # > 1 under torchrun
    if args.eval_checkpoint is None and args.total_timesteps < batch_size * world_size:
        fail(f"--total-timesteps {args.total_timesteps} is smaller than one batch of {batch_size * world_size} "
             f"(num_envs * num_steps * ranks); raise it or shrink the batch")


# Settings that only the Mario envs read, and of those the reward terms the 9.x package line's own reward replaces.
MARIO_ONLY = ("action_set", "previous_action", "start_states", "random_game_rng", "sticky_actions", "stuck_timeout",
              "flag_bonus", "death_penalty", "score_coef", "reward_scale", "pay_skipped_ground", "height_coef")
REWARD_TERMS = ("flag_bonus", "death_penalty", "score_coef", "pay_skipped_ground", "height_coef")


def warn_unused_settings(args: Args):
    """One warning for each setting changed from its default that does nothing for the env at hand."""
    if args.env_id.startswith("ALE/"):
        unused, why = MARIO_ONLY, f"{args.env_id} is not a Mario env"
    elif is_gymnasium_native():
        unused, why = REWARD_TERMS, f"gym-super-mario-bros {smb_version()} has its own reward terms"
    else:
        return
    for name in unused:
        if getattr(args, name) != getattr(Args, name):
            print(f"warning: --{name.replace('_', '-')} {getattr(args, name)} does nothing: {why}", file=sys.stderr)


def main(args: Args):
    if args.resume and args.fork:
        fail("--resume continues a run and --fork starts a new one from a checkpoint; pass one of them")
    if args.eval_checkpoint is None and args.resume:
        return train(args)  # the run's saved Args are validated once merged
    validate_args(args)
    if args.eval_checkpoint is not None:
        return run_evaluation(args)
    if int(os.environ.get("RANK", "0")) == 0:
        warn_unused_settings(args)
    return train(args)


def given_flags(argv: list[str]) -> argparse.Namespace:
    """--env-id and the checkpoint paths on the command line, read before the full parse: they decide its defaults.
    A malformed one is left to the full parse to report."""
    names = ("env_id", "resume", "fork", "eval_checkpoint")
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    for name in names:
        parser.add_argument(f"--{name.replace('_', '-')}", f"--{name}")
    try:
        return parser.parse_known_args(argv)[0]
    except argparse.ArgumentError:
        return argparse.Namespace(**dict.fromkeys(names))


def cli_args(argv: list[str] | None = None) -> Args:
    """The command line. The defaults of the flags not given (and those --help shows) are those of the run at hand:
    an ALE/ id's (ATARI_DEFAULTS); with --resume or --fork, the checkpoint's Args, so a resumed or forked run keeps its
    own save, device and video settings too (a forgotten --keep-checkpoints must not prune the checkpoints the run
    kept); with --eval-checkpoint, the checkpoint's env id and action set."""
    argv = sys.argv[1:] if argv is None else argv
    given = given_flags(argv)
    defaults, saved, missing = default_args(given.env_id or Args.env_id), None, []
    if given.eval_checkpoint is not None:
        checkpoint = load_checkpoint(given.eval_checkpoint)
        defaults = replace(default_args(given.env_id or checkpoint["env_id"]), action_set=checkpoint["action_set"])
    elif bool(given.resume) != bool(given.fork):  # (both: main refuses that in one line)
        if given.resume:  # refused here, before any warning, if it cannot be resumed
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            checkpoint = load_training_checkpoint(newest_checkpoint(given.resume), world_size)
        else:
            checkpoint = load_checkpoint(given.fork)
        saved, missing = saved_args(checkpoint["args"]), missing_options(checkpoint["args"])
        defaults = replace(saved, resume=None, fork=None)
    args = tyro.cli(Args, args=argv, default=defaults)
    if int(os.environ.get("RANK", "0")) != 0:
        return args  # under torchrun, rank 0 alone warns
    if missing:
        values = ", ".join(f"--{name.replace('_', '-')} {getattr(args, name)}" for name in missing)
        print(f"warning: {given.resume or given.fork} was written before these options existed; the run goes on with "
              f"{values} (give a flag to choose another value)", file=sys.stderr)
    if saved and given.resume:
        for f in fields(Args):
            changeable = f.name in PER_PROCESS_FLAGS + tuple(missing)
            if not changeable and getattr(args, f.name) != getattr(saved, f.name):
                print(f"warning: --{f.name.replace('_', '-')} {getattr(args, f.name)} ignored: the resumed run keeps "
                      f"{getattr(saved, f.name)}", file=sys.stderr)
    return args


if __name__ == "__main__":
    main(cli_args())
