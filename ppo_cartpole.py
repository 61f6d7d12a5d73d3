"""PPO (clipped surrogate, GAE) on Gymnasium's CartPole-v1, in one file.

Read top to bottom in the order of the algorithm:
  Args -> environments -> agent -> GAE -> PPO losses -> training loop -> evaluation.

    python ppo_cartpole.py                                   # train, log to runs/<run_name>/
    python ppo_cartpole.py --eval-checkpoint runs/<run_name> --video-path cartpole.gif   # newest checkpoint of the run
    python ppo_cartpole.py --resume runs/<run_name>                                       # continue an interrupted run
    torchrun --standalone --nproc_per_node 2 ppo_cartpole.py                              # data-parallel over 2 processes
"""

import contextlib
import difflib
import glob
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import sys
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, fields

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
    """TensorBoard logs and checkpoints go to <runs_dir>/<run_name>/"""
    save_interval: int = 50
    """write a checkpoint every this many iterations (and at the end, and on Ctrl-C / SIGTERM)"""
    keep_checkpoints: int = 3
    """how many of the newest checkpoints to keep"""
    resume: str | None = None
    """continue a run: a checkpoint file, or a run directory to take its newest checkpoint (the run keeps its Args)"""
    capture_video: bool = False
    """write a gif of one greedy episode before and after training into the run directory"""

    # Algorithm. The defaults solve CartPole-v1 (mean of the last 20 episodes >= 475) within 60k steps on every seed
    # we measured (benchmark/cartpole_learning.py): small batches of 256 and a high learning rate mean many updates early.
    env_id: str = "CartPole-v1"
    """the Gymnasium id of the environment (discrete actions, vector observations)"""
    total_timesteps: int = 60_000
    """total environment steps to train for (summed over torchrun ranks)"""
    learning_rate: float = 3e-3
    """Adam learning rate at the start of training"""
    anneal_lr: bool = True
    """decay the learning rate linearly to zero over the run"""
    num_envs: int = 8
    """parallel environments (per torchrun rank)"""
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
    """play a saved model instead of training: a checkpoint file, or a run directory for its newest checkpoint"""
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
                 "torch_threads", "log_interval", "save_interval", "keep_checkpoints"):
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
    if args.norm_adv and batch_size // args.num_minibatches < 2:
        fail(f"--num-minibatches {args.num_minibatches} leaves 1 sample per minibatch of the batch of {batch_size}, and "
             "advantage normalisation needs 2 or more; use fewer minibatches (or --no-norm-adv)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # > 1 under torchrun
    if args.eval_checkpoint is None and args.total_timesteps < batch_size * world_size:
        fail(f"--total-timesteps {args.total_timesteps} is smaller than one batch of {batch_size * world_size} "
             f"(num_envs * num_steps * ranks); raise it or shrink the batch")


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
        if multiprocessing.parent_process() is not None:
            # In an AsyncVectorEnv worker. Ctrl-C (and a service manager's SIGTERM) reach the whole process group, but
            # stopping is the trainer's job: it saves a checkpoint, then closes the workers.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        env = gym.make(env_id, render_mode="rgb_array" if render else None)
        return gym.wrappers.RecordEpisodeStatistics(env)
    return thunk


def close_envs(envs, worker_died: bool = False):
    """Close the vector env. After a worker died, the pending step can never complete: kill the workers (SIGKILL, as
    they ignore SIGINT and SIGTERM) instead of waiting for them, then let gymnasium release the pipes."""
    if envs.closed:
        return
    if not worker_died:
        envs.close()
        return
    for process in envs.processes:
        process.kill()
        process.join()
    with contextlib.suppress(EOFError, OSError), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "close while waiting for a pending step": expected here
        envs.close(terminate=True)
    envs.closed = True


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

    def evaluation_action(self, x, generator: torch.Generator | None = None):
        """The most likely action, or with a generator one drawn from the policy (reproducibly, apart from training's
        random stream)."""
        logits = self.actor(x)
        if generator is None:
            return logits.argmax(-1)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


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
        tensors = {f.name: torch.zeros(shape, device=device) for f in fields(cls) if f.name not in ("obs", "actions")}
        return cls(obs=torch.zeros(shape + obs_shape, device=device),
                   actions=torch.zeros(shape, dtype=torch.long, device=device), **tensors)


def collect_rollout(envs, agent, rollout: Rollout, next_obs, device, stop=None):
    """Fill `rollout` by stepping `envs` from `next_obs`. Returns the observation to continue from and the finished
    episodes as (step index, return, length). Returns early, with the rollout incomplete, once `stop` is requested."""
    episodes = []
    for step in range(rollout.obs.shape[0]):
        if stop is not None and stop.requested:
            break
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
# PPO update
# ---------------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------------
# Data parallelism under torchrun: each rank steps its own envs and computes GAE and minibatches on its own batch;
# gradients are averaged so all ranks take the same optimizer step. Without torchrun these are no-ops.
# ---------------------------------------------------------------------------------------------------------------------

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
    flat = nn.utils.parameters_to_vector(agent.parameters()).detach()
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if not torch.equal(high, low):
        fail(f"ranks finished with different weights (max difference {(high - low).abs().max().item():.3g})")
    if dist.get_rank() == 0:
        print(f"weights identical on all {dist.get_world_size()} ranks")


# ---------------------------------------------------------------------------------------------------------------------
# Training: checkpoints, resume, signals
# ---------------------------------------------------------------------------------------------------------------------

def pick_device(want_cuda: bool, local_rank: int = 0):
    if want_cuda and not torch.cuda.is_available():
        print("warning: --cuda given but no CUDA device is available; training on CPU", file=sys.stderr)
    return torch.device("cuda", local_rank) if want_cuda and torch.cuda.is_available() else torch.device("cpu")


def seed_everything(seed: int, torch_deterministic: bool):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


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


def save_checkpoint(run_dir: str, agent: Agent, optimizer, args: Args, global_step: int, iteration: int, envs) -> str:
    """Write <run_dir>/checkpoints/step_<global_step>.pt atomically (a crash never leaves a half-written file under
    that name), then delete all but the newest keep_checkpoints."""
    checkpoint = {
        "model": agent.state_dict(),
        "optimizer": optimizer.state_dict(),
        "global_step": global_step,
        "iteration": iteration,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,  # iterations count batches of all ranks
        "rng": get_rng_states(),
        "args": asdict(args),
        "env_id": args.env_id,
        "obs_shape": list(envs.single_observation_space.shape),
        "num_actions": int(envs.single_action_space.n),
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


# Flags a resumed run takes from the command line; every other one comes from the checkpoint, so the run goes on as
# it started (same batch, same learning-rate schedule, same total).
RESUME_FLAGS = ("resume", "cuda", "torch_threads", "log_interval", "save_interval", "keep_checkpoints", "capture_video")


def resumed_args(args: Args, saved: dict) -> Args:
    resumed = Args(**{f.name: saved[f.name] for f in fields(Args) if f.name in saved})
    for f in fields(Args):
        given = getattr(args, f.name)
        if f.name in RESUME_FLAGS:
            setattr(resumed, f.name, given)
        elif given != f.default and given != getattr(resumed, f.name):
            print(f"warning: --{f.name.replace('_', '-')} {given} ignored: the resumed run keeps {getattr(resumed, f.name)}",
                  file=sys.stderr)
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


def train(args: Args) -> str:
    """Train, or continue the run args.resume points at; returns the run directory. Under torchrun, rank 0 alone
    writes TensorBoard (with every rank's episodes) and checkpoints."""
    rank, world_size, local_rank = setup_distributed(args.cuda)
    is_main = rank == 0
    device = pick_device(args.cuda, local_rank)
    checkpoint, checkpoint_path = None, None  # checkpoint_path: the newest good checkpoint of this run
    if args.resume:
        checkpoint_path = newest_checkpoint(args.resume)
        checkpoint = load_training_checkpoint(checkpoint_path, world_size)
        args = resumed_args(args, checkpoint["args"])
        validate_args(args)
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_path)))
    else:
        run_dir = os.path.join(args.runs_dir, f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")
    run_dir = broadcast_from_main(run_dir)  # the ranks may have started in different seconds
    if is_main:
        check_writable(run_dir)
    batch_size = args.num_envs * args.num_steps  # per rank
    num_iterations = args.total_timesteps // (batch_size * world_size)

    seed_everything(args.seed, args.torch_deterministic)
    torch.set_num_threads(args.torch_threads)
    stop, writer, global_step = GracefulStop(), None, 0
    envs = make_vector_env(args)
    try:  # from the moment the environments exist: whatever raises below, `finally` closes them (no orphan worker)
        obs_shape = envs.single_observation_space.shape
        agent = Agent(obs_shape[0], envs.single_action_space.n).to(device)
        optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
        iteration = 0
        if checkpoint:
            agent.load_state_dict(checkpoint["model"])  # copied onto the device's tensors
            optimizer.load_state_dict(checkpoint["optimizer"])  # moved to the parameters' device by torch
            global_step, iteration = checkpoint["global_step"], checkpoint["iteration"]
            set_rng_states(checkpoint["rng"])
            if is_main:
                print(f"resuming {run_dir} at iteration {iteration}, step {global_step}")
        if world_size > 1:
            for tensor in agent.state_dict().values():
                dist.broadcast(tensor, src=0)  # identical starting weights on every rank
            torch.manual_seed(args.seed + 1000 * rank + iteration)  # but each rank samples its own actions
        if is_main:
            # purge_step drops what an interrupted process logged after its checkpoint (steps > global_step): the
            # curves go on without duplicate or missing points.
            writer = SummaryWriter(run_dir, purge_step=global_step + 1 if checkpoint else None)
            if not checkpoint:
                writer.add_text("hyperparameters",
                                "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
            if args.capture_video and not checkpoint:
                evaluate(agent, args, device, episodes=1, video_path=os.path.join(run_dir, "before_training.gif"))

        rollout = Rollout.empty(args.num_steps, args.num_envs, obs_shape, device)
        recent_returns = deque(maxlen=20)
        start_time, start_step = time.time(), global_step
        next_obs, _ = envs.reset(seed=args.seed + iteration + 10_000 * rank)
        next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
        while iteration < num_iterations:
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - iteration / num_iterations)
            # Alone, a signal cuts the rollout short; under torchrun the ranks decide together after it.
            next_obs, episodes = collect_rollout(envs, agent, rollout, next_obs, device, stop if world_size == 1 else None)
            if stop.agreed(device):  # an incomplete rollout is dropped: the checkpoint ends the last iteration
                break
            for rank_of, (step, episode_return, episode_length) in gather_to_main(episodes):
                at_step = global_step + ((step * world_size + rank_of) + 1) * args.num_envs
                recent_returns.append(episode_return)
                writer.add_scalar("charts/episodic_return", episode_return, at_step)
                writer.add_scalar("charts/episodic_length", episode_length, at_step)

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
                     f"{checkpoint_path or 'none (none was written yet)'}; lower --learning-rate or --max-grad-norm")
            iteration += 1
            global_step += batch_size * world_size
            if is_main:
                y_pred, y_true = batch["values"].cpu().numpy(), batch["returns"].cpu().numpy()
                var_y = np.var(y_true)
                stats["explained_variance"] = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
                sps = int((global_step - start_step) / (time.time() - start_time))
                writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
                for key, value in stats.items():
                    writer.add_scalar(f"losses/{key}", value, global_step)
                writer.add_scalar("charts/SPS", sps, global_step)
                if iteration % args.log_interval == 0 or iteration == num_iterations:
                    mean_return = f"{np.mean(recent_returns):.1f}" if recent_returns else "-"
                    print(f"iter {iteration}/{num_iterations}  step {global_step}  SPS {sps}  return(last 20) {mean_return}",
                          flush=True)
                if iteration % args.save_interval == 0 or iteration == num_iterations:
                    checkpoint_path = save_checkpoint(run_dir, agent, optimizer, args, global_step, iteration, envs)
                    print(f"saved {checkpoint_path}", flush=True)
            if stop.agreed(device):  # a signal arrived during the update
                break
        if world_size > 1:
            if not stop.requested:
                check_ranks_agree(agent, device)
            dist.barrier()  # no rank tears the process group down while another still uses it
        # On a signal, the state at the end of the last complete iteration, unless that checkpoint exists already.
        if is_main and stop.requested and (checkpoint_path is None
                                           or not checkpoint_path.endswith(f"step_{global_step:010d}.pt")):
            checkpoint_path = save_checkpoint(run_dir, agent, optimizer, args, global_step, iteration, envs)
            print(f"saved {checkpoint_path}", flush=True)
    except (EOFError, BrokenPipeError, ConnectionError) as e:
        # The pipe can report the death before the process is reaped: wait for the first exit to name the worker.
        ended = multiprocessing.connection.wait([process.sentinel for process in envs.processes], timeout=5)
        dead = [i for i, process in enumerate(envs.processes) if process.sentinel in ended]
        close_envs(envs, worker_died=True)
        fail(f"environment worker {', '.join(map(str, dead)) or '?'} ({args.env_id}) died ({type(e).__name__}) at step "
             f"{global_step}; continue from the last checkpoint with --resume {run_dir}")
    finally:
        close_envs(envs)
        if writer:
            writer.close()
        stop.restore()
        if dist.is_initialized():
            dist.destroy_process_group()
    if stop.requested:
        sys.exit(128 + stop.signum)
    if args.capture_video and is_main:
        evaluate(agent, args, device, episodes=1, video_path=os.path.join(run_dir, "after_training.gif"))
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
    generator = torch.Generator(device).manual_seed(args.seed) if args.eval_sample else None
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=args.seed + episode)
        frames = [env.render()] if video_path and episode == 0 else None
        done, total = False, 0.0
        while not done:
            x = torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0)
            with torch.no_grad():
                action = agent.evaluation_action(x, generator)
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


def load_agent(path: str, env_id: str, device) -> Agent:
    """The saved agent, after checking that it fits env_id's observations and actions."""
    checkpoint = load_checkpoint(path, device)
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
    if args.eval_checkpoint is None and args.resume:
        return train(args)  # the run's saved Args are validated once merged
    validate_args(args)
    check_env_id(args.env_id)
    if args.eval_checkpoint is None:
        return train(args)
    device = pick_device(args.cuda)
    agent = load_agent(args.eval_checkpoint, args.env_id, device)
    returns = evaluate(agent, args, device, args.eval_episodes, args.video_path)
    mode = "sampled" if args.eval_sample else "greedy"
    print(f"{args.env_id}: {len(returns)} {mode} episodes, return {np.mean(returns):.1f} ± {np.std(returns):.1f}")
    if args.video_path:
        print(f"wrote {args.video_path}")
    return returns


if __name__ == "__main__":
    main(tyro.cli(Args))
