"""PPO (clipped surrogate, GAE) on Gymnasium's CartPole-v1, in one file.

Read top to bottom in the order of the algorithm:
  Args -> environments -> agent -> GAE -> PPO losses -> training loop -> evaluation.

    python ppo_cartpole.py                                   # train, log to runs/<run_name>/
    python ppo_cartpole.py --eval-checkpoint runs/<run_name>/model.pt --video-path cartpole.gif
"""

import difflib
import os
import random
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, fields

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from gymnasium.vector import AutoresetMode
from torch.distributions.categorical import Categorical
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = "ppo_cartpole"
    """the name of this experiment; the first part of the run name"""
    seed: int = 1
    """seed of python, numpy, torch and the environments"""
    torch_deterministic: bool = True
    """make cuDNN pick deterministic algorithms"""
    cuda: bool = False
    """train on the GPU when one is available (a warning, then CPU, when not)"""
    torch_threads: int = 1
    """CPU threads for torch; one is fastest for networks this small"""
    runs_dir: str = "runs"
    """TensorBoard logs and the model go to <runs_dir>/<run_name>/"""
    capture_video: bool = False
    """write a gif of one greedy episode before and after training into the run directory"""

    # Algorithm. The defaults solve CartPole-v1 (mean of the last 20 episodes >= 475) within 60k steps on every seed
    # we measured (benchmark/cartpole_learning.py): small batches of 256 and a high learning rate mean many updates early.
    env_id: str = "CartPole-v1"
    """the Gymnasium id of the environment (discrete actions, vector observations)"""
    total_timesteps: int = 60_000
    """total environment steps to train for"""
    learning_rate: float = 3e-3
    """Adam learning rate at the start of training"""
    anneal_lr: bool = True
    """decay the learning rate linearly to zero over the run"""
    num_envs: int = 8
    """parallel environments"""
    async_envs: bool = False
    """step the environments in subprocesses (AsyncVectorEnv) instead of in this process"""
    num_steps: int = 32
    """steps per environment per rollout; the batch is num_envs * num_steps"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """lambda of generalised advantage estimation"""
    num_minibatches: int = 2
    """minibatches the batch is split into per epoch"""
    update_epochs: int = 10
    """passes over the batch per update"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_coef: float = 0.2
    """epsilon of the clipped surrogate (and of value clipping)"""
    clip_vloss: bool = True
    """clip the value update to clip_coef around the old value estimate"""
    ent_coef: float = 0.0
    """weight of the entropy bonus"""
    vf_coef: float = 0.5
    """weight of the value loss"""
    max_grad_norm: float = 0.5
    """clip the global gradient norm to this"""
    target_kl: float | None = None
    """stop the epochs of an update early when the approximate KL passes this"""
    log_interval: int = 25
    """print a progress line every this many iterations"""

    # Evaluation
    eval_checkpoint: str | None = None
    """play a saved model instead of training"""
    eval_episodes: int = 10
    """episodes to play in evaluation"""
    eval_sample: bool = False
    """sample actions from the policy in evaluation instead of taking the most likely one"""
    video_path: str | None = None
    """in evaluation, write the first episode to this .gif or .mp4"""


def fail(message: str):
    """Stop with one line that says what is wrong and how to fix it (no traceback)."""
    sys.exit(f"error: {message}")


def validate_args(args: Args):
    for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "eval_episodes",
                 "torch_threads", "log_interval"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("learning_rate", "clip_coef", "max_grad_norm"):
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 < args.gamma <= 1 or not 0 <= args.gae_lambda <= 1:
        fail(f"--gamma must be in (0, 1] and --gae-lambda in [0, 1], got {args.gamma} and {args.gae_lambda}")
    if args.target_kl is not None and not args.target_kl > 0:
        fail(f"--target-kl must be positive, got {args.target_kl}")
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches:
        fail(f"--num-minibatches {args.num_minibatches} does not divide the batch of {batch_size} "
             f"(num_envs * num_steps); pick a divisor of {batch_size}")
    if args.eval_checkpoint is None and args.total_timesteps < batch_size:
        fail(f"--total-timesteps {args.total_timesteps} is smaller than one batch of {batch_size} "
             f"(num_envs * num_steps); raise it or shrink the batch")


# ---------------------------------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------------------------------

def check_env_id(env_id: str):
    """Unknown ids and non-discrete action spaces stop here with a clear message."""
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, gym.registry.keys(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see gymnasium.pprint_registry() for the ids"
        fail(f"unknown env id '{env_id}'{hint}")
    env = gym.make(env_id)
    action_space, observation_space = env.action_space, env.observation_space
    env.close()
    if not isinstance(action_space, gym.spaces.Discrete):
        fail(f"{env_id} has a {type(action_space).__name__} action space; this PPO needs a Discrete one "
             "(e.g. CartPole-v1, Acrobot-v1)")
    if not isinstance(observation_space, gym.spaces.Box) or len(observation_space.shape) != 1:
        fail(f"{env_id} has observations of shape {observation_space.shape}; this MLP needs a flat vector")


def make_env(env_id: str, render: bool = False):
    """A thunk for the vector env: one environment that records its episodes' return and length."""
    def thunk():
        env = gym.make(env_id, render_mode="rgb_array" if render else None)
        return gym.wrappers.RecordEpisodeStatistics(env)
    return thunk


def make_vector_env(args: Args):
    # SAME_STEP autoreset: the step that ends an episode already returns the next episode's first observation, and the
    # ended episode's last observation comes in info["final_obs"]. Every stored transition is then a real one (Gymnasium's
    # default NEXT_STEP mode would insert a reset step whose action is ignored), and truncated episodes can bootstrap.
    vector_cls = gym.vector.AsyncVectorEnv if args.async_envs else gym.vector.SyncVectorEnv
    return vector_cls([make_env(args.env_id) for _ in range(args.num_envs)], autoreset_mode=AutoresetMode.SAME_STEP)


# ---------------------------------------------------------------------------------------------------------------------
# Agent: separate actor and critic MLPs
# ---------------------------------------------------------------------------------------------------------------------

def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0):
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    def __init__(self, obs_dim: int, num_actions: int):
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        # A small last layer makes the initial policy close to uniform.
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, num_actions), std=0.01),
        )

    def get_value(self, x):
        return self.critic(x).squeeze(-1)

    def get_action_and_value(self, x, action=None):
        dist = Categorical(logits=self.actor(x), validate_args=False)
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.get_value(x)

    def greedy_action(self, x):
        return self.actor(x).argmax(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Rollout: num_steps transitions from each environment with the current policy
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """Storage for one rollout, one row per step; every tensor is [num_steps, num_envs, ...]."""
    obs: torch.Tensor
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
        tensors = {f.name: torch.zeros(shape, device=device) for f in fields(cls)}
        tensors["obs"] = torch.zeros(shape + obs_shape, device=device)
        tensors["actions"] = torch.zeros(shape, dtype=torch.long, device=device)
        return cls(**tensors)


def collect_rollout(envs, agent, rollout: Rollout, next_obs, device):
    """Fill `rollout` by stepping `envs` from `next_obs`. Returns the observation to continue from and the finished
    episodes as (step index, return, length)."""
    episodes = []
    for step in range(rollout.obs.shape[0]):
        rollout.obs[step] = next_obs
        with torch.no_grad():
            action, logprob, _, value = agent.get_action_and_value(next_obs)
        rollout.actions[step], rollout.logprobs[step], rollout.values[step] = action, logprob, value

        next_obs, reward, terminated, truncated, infos = envs.step(action.cpu().numpy())
        rollout.rewards[step] = torch.as_tensor(reward, device=device)
        rollout.terminations[step] = torch.as_tensor(terminated, device=device)
        rollout.truncations[step] = torch.as_tensor(truncated, device=device)
        next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)

        rollout.final_values[step] = 0.0
        if "final_obs" in infos:  # some episode ended this step; next_obs already holds the new episode's start
            bootstrap = np.flatnonzero(truncated & ~terminated)
            if len(bootstrap):
                final_obs = torch.as_tensor(np.stack(infos["final_obs"][bootstrap]), dtype=torch.float32, device=device)
                with torch.no_grad():
                    rollout.final_values[step, bootstrap] = agent.get_value(final_obs)
            episode = infos["final_info"]["episode"]
            for i in np.flatnonzero(infos["final_info"]["_episode"]):
                episodes.append((step, float(episode["r"][i]), int(episode["l"][i])))
    return next_obs, episodes


# ---------------------------------------------------------------------------------------------------------------------
# Generalised advantage estimation
# ---------------------------------------------------------------------------------------------------------------------

def compute_gae(rewards, values, terminations, truncations, final_values, next_value, gamma, gae_lambda):
    """Advantages and returns of a rollout. rewards, values, terminations, truncations and final_values are
    [num_steps, num_envs]; final_values holds V(final observation) where an episode was truncated; next_value is
    V(next_obs), the state after the last row.

        V(s_{t+1}) = values[t+1] inside an episode, final_values[t] after a truncation, next_value after the last row
        delta_t    = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t)        (TD error)
        A_t        = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}             (GAE, cut at every episode end)
        R_t        = A_t + V(s_t)                                                   (lambda-return: the value target)

    A truncated episode keeps its bootstrap term (the pole was still up when time ran out) instead of being scored as a
    failure, and like a terminated one it stops the sum, so no advantage reaches into the next episode.
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


# ---------------------------------------------------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------

def pick_device(want_cuda: bool):
    if want_cuda and not torch.cuda.is_available():
        print("warning: --cuda given but no CUDA device is available; training on CPU", file=sys.stderr)
    return torch.device("cuda" if want_cuda and torch.cuda.is_available() else "cpu")


def seed_everything(seed: int, torch_deterministic: bool):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def save_checkpoint(path: str, agent: Agent, optimizer, args: Args, global_step: int, iteration: int, env):
    """Atomically: a half-written file never replaces a good one."""
    checkpoint = {
        "model": agent.state_dict(),
        "optimizer": optimizer.state_dict(),
        "global_step": global_step,
        "iteration": iteration,
        "args": asdict(args),
        "env_id": args.env_id,
        "obs_shape": list(env.single_observation_space.shape),
        "num_actions": int(env.single_action_space.n),
    }
    tmp_path = f"{path}.tmp"
    torch.save(checkpoint, tmp_path)
    os.replace(tmp_path, path)


def make_run_dir(args: Args) -> tuple[str, str]:
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.runs_dir, run_name)
    try:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, ".write_test"), "w"):
            pass
        os.remove(os.path.join(run_dir, ".write_test"))
    except OSError as e:
        fail(f"cannot write the run directory {run_dir} ({e.strerror}); pass a writable --runs-dir")
    return run_name, run_dir


def train(args: Args) -> str:
    """Train; returns the run directory (TensorBoard events and model.pt)."""
    batch_size = args.num_envs * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    num_iterations = args.total_timesteps // batch_size

    run_name, run_dir = make_run_dir(args)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))

    seed_everything(args.seed, args.torch_deterministic)
    torch.set_num_threads(args.torch_threads)
    device = pick_device(args.cuda)

    envs = make_vector_env(args)
    obs_dim = envs.single_observation_space.shape[0]
    agent = Agent(obs_dim, envs.single_action_space.n).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    if args.capture_video:
        evaluate(agent, args, device, episodes=1, video_path=os.path.join(run_dir, "before_training.gif"))

    rollout = Rollout.empty(args.num_steps, args.num_envs, envs.single_observation_space.shape, device)
    global_step = 0
    recent_returns = deque(maxlen=20)
    start_time = time.time()
    next_obs, _ = envs.reset(seed=args.seed)
    next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)

    for iteration in range(1, num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - (iteration - 1.0) / num_iterations)

        next_obs, episodes = collect_rollout(envs, agent, rollout, next_obs, device)
        for step, episode_return, episode_length in episodes:
            recent_returns.append(episode_return)
            writer.add_scalar("charts/episodic_return", episode_return, global_step + (step + 1) * args.num_envs)
            writer.add_scalar("charts/episodic_length", episode_length, global_step + (step + 1) * args.num_envs)
        global_step += args.num_steps * args.num_envs

        with torch.no_grad():
            next_value = agent.get_value(next_obs)
        advantages, returns = compute_gae(rollout.rewards, rollout.values, rollout.terminations, rollout.truncations,
                                          rollout.final_values, next_value, args.gamma, args.gae_lambda)

        # Flatten the rollout into one batch of num_steps * num_envs samples.
        b_obs = rollout.obs.reshape((-1,) + envs.single_observation_space.shape)
        b_actions, b_logprobs, b_values = rollout.actions.reshape(-1), rollout.logprobs.reshape(-1), rollout.values.reshape(-1)
        b_advantages, b_returns = advantages.reshape(-1), returns.reshape(-1)

        clipfracs = []
        for epoch in range(args.update_epochs):
            permutation = torch.randperm(batch_size, device=device)
            for start in range(0, batch_size, minibatch_size):
                mb = permutation[start:start + minibatch_size]
                _, new_logprob, entropy, new_value = agent.get_action_and_value(b_obs[mb], b_actions[mb])
                with torch.no_grad():
                    # Diagnostics: KL(old || new) estimators (http://joschu.net/blog/kl-approx.html) and clip rate.
                    logratio = new_logprob - b_logprobs[mb]
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((logratio.exp() - 1) - logratio).mean()
                    clipfracs.append(((logratio.exp() - 1.0).abs() > args.clip_coef).float().mean().item())

                mb_advantages = normalize_advantages(b_advantages[mb]) if args.norm_adv else b_advantages[mb]
                pg_loss = policy_loss(new_logprob, b_logprobs[mb], mb_advantages, args.clip_coef)
                v_loss = value_loss(new_value, b_values[mb], b_returns[mb], args.clip_coef if args.clip_vloss else None)
                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + args.vf_coef * v_loss

                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()

            if args.target_kl is not None and approx_kl > args.target_kl:
                break

        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

        sps = int(global_step / (time.time() - start_time))
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        writer.add_scalar("losses/value_loss", v_loss.item(), global_step)
        writer.add_scalar("losses/policy_loss", pg_loss.item(), global_step)
        writer.add_scalar("losses/entropy", entropy_loss.item(), global_step)
        writer.add_scalar("losses/old_approx_kl", old_approx_kl.item(), global_step)
        writer.add_scalar("losses/approx_kl", approx_kl.item(), global_step)
        writer.add_scalar("losses/clipfrac", np.mean(clipfracs), global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        if iteration % args.log_interval == 0 or iteration == num_iterations:
            mean_return = f"{np.mean(recent_returns):.1f}" if recent_returns else "-"
            print(f"iter {iteration}/{num_iterations}  step {global_step}  SPS {sps}  return(last 20) {mean_return}")

    model_path = os.path.join(run_dir, "model.pt")
    save_checkpoint(model_path, agent, optimizer, args, global_step, num_iterations, envs)
    print(f"saved {model_path}")
    if args.capture_video:
        evaluate(agent, args, device, episodes=1, video_path=os.path.join(run_dir, "after_training.gif"))
    envs.close()
    writer.close()
    return run_dir


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------

def write_video(frames, path: str, fps: int = 50):
    from moviepy import ImageSequenceClip  # imported here: only video writing needs moviepy

    clip = ImageSequenceClip(list(frames), fps=fps)
    if path.endswith(".gif"):
        clip.write_gif(path, fps=fps, logger=None)
    else:
        clip.write_videofile(path, fps=fps, logger=None)


def evaluate(agent: Agent, args: Args, device, episodes: int, video_path: str | None = None) -> list[float]:
    """Play whole episodes (greedy unless args.eval_sample) and return their returns; the first goes to video_path."""
    env = make_env(args.env_id, render=video_path is not None)()
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=args.seed + episode)
        frames = [env.render()] if video_path and episode == 0 else None
        done, total = False, 0.0
        while not done:
            x = torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0)
            with torch.no_grad():
                action = agent.get_action_and_value(x)[0] if args.eval_sample else agent.greedy_action(x)
            obs, reward, terminated, truncated, _ = env.step(int(action.item()))
            total += float(reward)
            done = terminated or truncated
            if frames is not None:
                frames.append(env.render())
        if frames is not None:
            write_video(frames, video_path)
        returns.append(total)
    env.close()
    return returns


def load_checkpoint(path: str, env_id: str, device):
    """The saved agent, after checking that it fits env_id's observations and actions."""
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        fail(f"no checkpoint at {path}; pass the model.pt of a finished run")
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__}); the file is truncated or not a checkpoint")
    env = gym.make(env_id)
    obs_shape, num_actions = list(env.observation_space.shape), int(env.action_space.n)
    env.close()
    if (checkpoint["env_id"], checkpoint["obs_shape"], checkpoint["num_actions"]) != (env_id, obs_shape, num_actions):
        fail(f"checkpoint {path} is for {checkpoint['env_id']} (observations {checkpoint['obs_shape']}, "
             f"{checkpoint['num_actions']} actions), not {env_id} (observations {obs_shape}, {num_actions} actions); "
             "pass the matching --env-id")
    agent = Agent(obs_shape[0], num_actions).to(device)
    agent.load_state_dict(checkpoint["model"])
    return agent


def main(args: Args):
    validate_args(args)
    check_env_id(args.env_id)
    if args.eval_checkpoint is None:
        return train(args)
    device = pick_device(args.cuda)
    agent = load_checkpoint(args.eval_checkpoint, args.env_id, device)
    returns = evaluate(agent, args, device, args.eval_episodes, args.video_path)
    mode = "sampled" if args.eval_sample else "greedy"
    print(f"{args.env_id}: {len(returns)} {mode} episodes, return {np.mean(returns):.1f} ± {np.std(returns):.1f}")
    if args.video_path:
        print(f"wrote {args.video_path}")
    return returns


if __name__ == "__main__":
    main(tyro.cli(Args))
