"""PPO (clipped surrogate, GAE) on Gymnasium's CartPole-v1 in one file, read top to bottom in the order of the
algorithm: Args -> environments -> agent -> rollout -> GAE -> losses -> update -> training loop -> evaluation. Resume,
signals and torchrun live in ppo_mario.py, whose runs take hours; this one takes seconds.

    python ppo_cartpole.py                                                              # train into runs/<run_name>/
    python ppo_cartpole.py --eval-checkpoint runs/<run_name> --video-path cartpole.gif  # play the saved model"""

import difflib
import os
import random
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from datetime import timedelta

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
    # PPO. Small batches and a high learning rate: many updates early, CartPole solved well within the 60k steps.
    total_timesteps: int = 60_000
    """total environment steps to train for"""
    learning_rate: float = 3e-3
    """Adam learning rate at the start of training"""
    anneal_lr: bool = True
    """decay the learning rate linearly to zero over the run"""
    num_envs: int = 8
    """parallel environments"""
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

    # Environment and run
    env_id: str = "CartPole-v1"
    """the Gymnasium id of the environment (discrete actions, vector observations)"""
    exp_name: str = "ppo_cartpole"
    """the name of this experiment; the first part of the run name"""
    seed: int = 1
    """seed of python, numpy, torch and the environments"""
    cuda: bool = False
    """train on the GPU when one is available (a warning, then CPU, when not)"""
    runs_dir: str = "runs"
    """TensorBoard logs, the final model (model.pt) and videos go to <runs_dir>/<run_name>/"""
    capture_video: bool = False
    """write a gif of one greedy episode after training into the run directory"""

    # Evaluation
    eval_checkpoint: str | None = None
    """play a saved model (on the env it was trained on) instead of training: a model file, or a run directory"""
    eval_episodes: int = 10
    """episodes to play in evaluation"""
    video_path: str | None = None
    """in evaluation, write the first episode to this gif"""


def make_env(env_id: str, render: bool = False):
    """A thunk for the vector env: one environment that records its episodes' return and length."""
    return lambda: gym.wrappers.RecordEpisodeStatistics(gym.make(env_id, render_mode="rgb_array" if render else None))


def make_vector_env(args: Args):
    # SAME_STEP autoreset: the step that ends an episode already returns the next episode's first observation, and the
    # ended episode's last observation comes in info["final_obs"]. Every stored transition is then a real one (the
    # default NEXT_STEP mode would insert a reset step whose action is ignored), and truncated episodes can bootstrap.
    return gym.vector.SyncVectorEnv([make_env(args.env_id) for _ in range(args.num_envs)],
                                    autoreset_mode=AutoresetMode.SAME_STEP)


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0):
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Separate actor and critic MLPs (64-64, tanh)."""
    def __init__(self, obs_dim: int, num_actions: int):
        super().__init__()
        def mlp(outputs: int, std: float):
            return nn.Sequential(layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(), layer_init(nn.Linear(64, 64)), nn.Tanh(),
                                 layer_init(nn.Linear(64, outputs), std=std))
        self.critic = mlp(1, std=1.0)
        self.actor = mlp(num_actions, std=0.01)  # a small last layer: the initial policy is close to uniform

    def get_value(self, x):
        return self.critic(x).squeeze(-1)

    def get_action_and_value(self, x, action=None):
        dist = Categorical(logits=self.actor(x), validate_args=False)
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.get_value(x)


def empty_rollout(num_steps: int, num_envs: int, obs_shape: tuple, device) -> dict:
    """Storage for one rollout: [num_steps, num_envs, ...]; final_values: V(final obs) after a truncation, else 0."""
    rollout = {name: torch.zeros((num_steps, num_envs), device=device) for name in
               ("logprobs", "rewards", "terminations", "truncations", "values", "final_values")}
    rollout["actions"] = torch.zeros((num_steps, num_envs), dtype=torch.long, device=device)
    return {"obs": torch.zeros((num_steps, num_envs) + obs_shape, device=device), **rollout}


def collect_rollout(envs, agent, rollout: dict, next_obs, device):
    """Fill `rollout` by stepping `envs` from `next_obs`; returns the next observation and (step, return, length)s."""
    episodes = []
    for step in range(rollout["obs"].shape[0]):
        rollout["obs"][step] = next_obs
        with torch.no_grad():
            action, logprob, _, value = agent.get_action_and_value(next_obs)
        rollout["actions"][step], rollout["logprobs"][step], rollout["values"][step] = action, logprob, value
        next_obs, reward, terminated, truncated, infos = envs.step(action.cpu().numpy())
        rollout["rewards"][step] = torch.as_tensor(reward, device=device)
        rollout["terminations"][step] = torch.as_tensor(terminated, device=device)
        rollout["truncations"][step] = torch.as_tensor(truncated, device=device)
        next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
        rollout["final_values"][step] = 0.0
        if "final_obs" in infos:  # some episode ended this step; next_obs already holds the new episode's start
            bootstrap = np.flatnonzero(truncated & ~terminated)
            if len(bootstrap):
                final_obs = torch.as_tensor(np.stack(infos["final_obs"][bootstrap]), dtype=torch.float32, device=device)
                with torch.no_grad():
                    rollout["final_values"][step, bootstrap] = agent.get_value(final_obs)
            episode = infos["final_info"]["episode"]
            for i in np.flatnonzero(infos["final_info"]["_episode"]):
                episodes.append((step, float(episode["r"][i]), int(episode["l"][i])))
    return next_obs, episodes


def compute_gae(rewards, values, terminations, truncations, final_values, next_value, gamma, gae_lambda):
    """Advantages and returns of a rollout. rewards, values, terminations, truncations and final_values are
    [num_steps, num_envs]; final_values holds V(final observation) where an episode was truncated; next_value is
    V(next_obs), the state after the last row.

        V(s_{t+1}) = values[t+1] inside an episode, final_values[t] after a truncation, next_value after the last row
        delta_t    = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t)        (TD error)
        A_t        = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}             (GAE, cut at every episode end)
        R_t        = A_t + V(s_t)                                                   (lambda-return: the value target)

    A truncation keeps its bootstrap term (the pole was still up when time ran out); like a termination it ends the sum.
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
    minibatch's losses and the diagnostics CleanRL logs. Stops with one line instead of stepping on a bad gradient."""
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
            grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            if not torch.isfinite(grad_norm):
                fail(f"non-finite loss {loss.item():.4g} or gradient norm {grad_norm.item():.4g}; lower "
                     "--learning-rate or --max-grad-norm")
            optimizer.step()
        if args.target_kl is not None and approx_kl > args.target_kl:
            break
    return {"value_loss": v_loss.item(), "policy_loss": pg_loss.item(), "entropy": entropy_loss.item(),
            "old_approx_kl": old_approx_kl.item(), "approx_kl": approx_kl.item(), "clipfrac": float(np.mean(clipfracs))}


def train(args: Args) -> str:
    """Train; returns the run directory, which holds the TensorBoard logs and the final model.pt."""
    run_dir = os.path.join(args.runs_dir, f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot write the run directory {run_dir} ({e.strerror}); pass a writable --runs-dir")
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # one CPU thread is fastest for networks this small
    envs = make_vector_env(args)
    obs_shape = envs.single_observation_space.shape
    agent = Agent(obs_shape[0], envs.single_action_space.n).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    batch_size = args.num_envs * args.num_steps
    num_iterations = args.total_timesteps // batch_size
    rollout = empty_rollout(args.num_steps, args.num_envs, obs_shape, device)
    recent_returns = deque(maxlen=20)
    global_step, start_time = 0, time.time()
    next_obs, _ = envs.reset(seed=args.seed)
    next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
    for iteration in range(1, num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - (iteration - 1) / num_iterations)
        next_obs, episodes = collect_rollout(envs, agent, rollout, next_obs, device)
        for step, episode_return, episode_length in episodes:
            recent_returns.append(episode_return)
            writer.add_scalar("charts/episodic_return", episode_return, global_step + (step + 1) * args.num_envs)
            writer.add_scalar("charts/episodic_length", episode_length, global_step + (step + 1) * args.num_envs)
        with torch.no_grad():
            next_value = agent.get_value(next_obs)
        advantages, returns = compute_gae(rollout["rewards"], rollout["values"], rollout["terminations"],
                                          rollout["truncations"], rollout["final_values"], next_value, args.gamma,
                                          args.gae_lambda)
        # Flatten the rollout into one batch of num_steps * num_envs samples.
        batch = {"obs": rollout["obs"].reshape((-1,) + obs_shape), "actions": rollout["actions"].reshape(-1),
                 "logprobs": rollout["logprobs"].reshape(-1), "values": rollout["values"].reshape(-1),
                 "advantages": advantages.reshape(-1), "returns": returns.reshape(-1)}
        stats = ppo_update(agent, optimizer, batch, args)
        global_step += batch_size
        y_pred, y_true = batch["values"].cpu().numpy(), batch["returns"].cpu().numpy()
        stats["explained_variance"] = np.nan if np.var(y_true) == 0 else 1 - np.var(y_true - y_pred) / np.var(y_true)
        elapsed = time.time() - start_time
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        for key, value in stats.items():
            writer.add_scalar(f"losses/{key}", value, global_step)
        writer.add_scalar("charts/SPS", int(global_step / elapsed), global_step)
        if iteration % max(1, num_iterations // 20) == 0 or iteration == num_iterations:  # every 5%
            mean_return = f"{np.mean(recent_returns):.1f}" if recent_returns else "-"
            print(f"iter {iteration}/{num_iterations}  step {global_step}  SPS {int(global_step / elapsed)}  "
                  f"return(last 20) {mean_return}  {iteration / num_iterations:.0%}  elapsed {timedelta(seconds=int(elapsed))}"
                  f"  ETA {timedelta(seconds=int(elapsed / iteration * (num_iterations - iteration)))}", flush=True)
    envs.close()
    writer.close()
    # The final model and what it fits, written atomically: a crash never leaves a half-written file.
    torch.save({"model": agent.state_dict(), "args": asdict(args), "global_step": global_step, "env_id": args.env_id,
                "obs_shape": list(obs_shape), "num_actions": int(envs.single_action_space.n)}, f"{run_dir}/model.pt.tmp")
    os.replace(f"{run_dir}/model.pt.tmp", f"{run_dir}/model.pt")
    if args.capture_video:
        evaluate(agent, args, device, episodes=1, video_path=os.path.join(run_dir, "after_training.gif"))
    return run_dir


def evaluate(agent: Agent, args: Args, device, episodes: int, video_path: str | None = None) -> list[float]:
    """Play whole greedy episodes and return their returns; the first goes to the gif video_path."""
    env = make_env(args.env_id, render=video_path is not None)()
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=args.seed + episode)
        frames = [env.render()] if video_path and episode == 0 else None
        done, total = False, 0.0
        while not done:
            x = torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0)
            with torch.no_grad():
                action = agent.actor(x).argmax(-1)  # greedy: the most likely action
            obs, reward, terminated, truncated, _ = env.step(int(action.item()))
            total += float(reward)
            done = terminated or truncated
            if frames is not None:
                frames.append(env.render())
        if frames is not None:
            from moviepy import ImageSequenceClip  # imported here: only video writing needs moviepy
            ImageSequenceClip(frames, fps=50).write_gif(video_path, logger=None)
        returns.append(total)
    env.close()
    return returns


# ------------------------------------------ support code: loading, devices, input checks, command line ------------


def fail(message: str):  # one line that says what is wrong and how to fix it, no traceback
    sys.exit(f"error: {message}")


def load_model(path: str, device) -> tuple[Agent, str]:
    """The saved agent (a model file, or a run directory's model.pt) and the env id it was trained on."""
    path = os.path.join(path, "model.pt") if os.path.isdir(path) else path
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        agent = Agent(saved["obs_shape"][0], saved["num_actions"]).to(device)
        agent.load_state_dict(saved["model"])
    except FileNotFoundError:
        fail(f"no checkpoint at {path}; pass a model file or a run directory that holds model.pt")
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__}); the file is truncated or not a checkpoint")
    return agent, saved["env_id"]


def validate_args(args: Args):
    for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "eval_episodes",
                 "learning_rate", "clip_coef", "max_grad_norm", "target_kl"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 < args.gamma <= 1 or not 0 <= args.gae_lambda <= 1:
        fail(f"--gamma must be in (0, 1] and --gae-lambda in [0, 1], got {args.gamma} and {args.gae_lambda}")
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches:
        fail(f"--num-minibatches {args.num_minibatches} does not divide the batch of {batch_size} "
             f"(num_envs * num_steps); pick a divisor of {batch_size}")
    if args.norm_adv and batch_size // args.num_minibatches < 2:
        fail(f"--num-minibatches {args.num_minibatches} leaves 1 sample per minibatch of the batch of {batch_size}, and "
             "advantage normalisation needs 2 or more; use fewer minibatches (or --no-norm-adv)")
    if args.eval_checkpoint is None and args.total_timesteps < batch_size:
        fail(f"--total-timesteps {args.total_timesteps} is smaller than one batch of {batch_size} "
             "(num_envs * num_steps); raise it or shrink the batch")
    if args.env_id not in gym.registry:  # unknown ids and what this PPO cannot learn stop here too
        close = difflib.get_close_matches(args.env_id, gym.registry.keys(), n=3)
        fail(f"unknown env id '{args.env_id}'" + (f"; did you mean {', '.join(close)}?" if close else ""))
    env = gym.make(args.env_id)
    if not isinstance(env.action_space, gym.spaces.Discrete) or len(env.observation_space.shape) != 1:
        fail(f"{args.env_id} has a {type(env.action_space).__name__} action space and observations of shape "
             f"{env.observation_space.shape}; this PPO needs Discrete actions and flat observations (e.g. CartPole-v1)")
    env.close()


def main(args: Args):
    validate_args(args)
    if args.cuda and not torch.cuda.is_available():
        print("warning: --cuda given but no CUDA device is available; training on CPU", file=sys.stderr)
    if args.eval_checkpoint is None:
        return train(args)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    agent, args.env_id = load_model(args.eval_checkpoint, device)  # plays the env the model was trained on
    returns = evaluate(agent, args, device, args.eval_episodes, args.video_path)
    print(f"{args.env_id}: {len(returns)} greedy episodes, return {np.mean(returns):.1f} ± {np.std(returns):.1f}")
    return returns


if __name__ == "__main__":
    main(tyro.cli(Args))
