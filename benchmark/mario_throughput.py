"""Super Mario Bros throughput, every figure measured in this one run so they can be read as ratios:

  1. the bare emulator (frames/s, one process, random joypad actions);
  2. one fully wrapped env (agent steps/s; each agent step is 4 frames);
  3. Sync vs Async vector envs with random actions, for 1..--max-envs envs;
  4. the training loop's rollout (acting + stepping, pipelined over two env groups) against random-action stepping of
     the same envs on the same worker processes (target: >= 0.9x);
  5. whole training (rollout + update) SPS from a short real run with the default hyperparameters, and its peak memory
     (RSS) with the share of the uint8 rollout buffer.

    python benchmark/mario_throughput.py                  # a few minutes on 2 cores
    python benchmark/mario_throughput.py --cuda --max-envs 16
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import gymnasium as gym
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ppo_mario  # noqa: E402
from tbcurves import load_curve  # noqa: E402

ENV_ID = "SuperMarioBros-1-1-v0"


def random_steps_per_second(env, steps: int) -> float:
    """Step one env with random actions (resetting at episode ends); steps per second."""
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
        if terminated or truncated:
            env.reset()
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def random_vector_sps(envs, steps_per_env: int) -> float:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps_per_env):
        envs.step(rng.integers(envs.single_action_space.n, size=envs.num_envs))
    return steps_per_env * envs.num_envs / (time.perf_counter() - start)


def random_groups_sps(envs: ppo_mario.EnvGroups, steps_per_env: int) -> float:
    """Random actions on the rollout's own workers, every group stepping at once."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps_per_env):
        for g, group in enumerate(envs.slices):
            envs.send(g, rng.integers(envs.single_action_space.n, size=group.stop - group.start))
        for g in range(len(envs.groups)):
            envs.receive(g)
    return steps_per_env * envs.num_envs / (time.perf_counter() - start)


def rollout_sps(envs, agent, rollout, next_obs, device) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    next_obs, _ = ppo_mario.collect_rollout(envs, agent, rollout, next_obs, device)
    return rollout.obs.shape[0] * envs.num_envs / (time.perf_counter() - start), next_obs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-envs", type=int, default=ppo_mario.Args().num_envs,
                        help="largest env count measured; the rollout and the training run use it (default: ppo_mario's)")
    parser.add_argument("--steps", type=int, default=300, help="agent steps per env per measurement")
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    print(f"machine: {os.cpu_count()} CPU cores, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))

    frames = random_steps_per_second(ppo_mario.make_mario_base_env(ENV_ID, "simple", render=False), 4 * args.steps)
    single = random_steps_per_second(ppo_mario.make_env(ppo_mario.Args(env_id=ENV_ID))(), args.steps)
    print("\n| what | throughput |\n|-|-|")
    print(f"| bare emulator, 1 process | {frames:,.0f} frames/s ({frames / 4:,.0f} agent steps/s of 4 frames) |")
    print(f"| one wrapped env (skip 4, gray, 84x84, stack 4) | {single:,.0f} agent steps/s ({single / (frames / 4):.2f}x the bare emulator) |")

    print("\n| envs | Sync agent steps/s | Async agent steps/s | Async / Sync |\n|-|-|-|-|")
    counts = sorted({n for n in (1, 2, 4, 8, 16) if n <= args.max_envs} | {args.max_envs})
    for n in counts:
        results = {}
        for sync in (True, False):
            vector_cls = gym.vector.SyncVectorEnv if sync else gym.vector.AsyncVectorEnv
            envs = vector_cls([ppo_mario.make_env(ppo_mario.Args(env_id=ENV_ID))] * n,
                              autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
            envs.reset(seed=0)
            results[sync] = random_vector_sps(envs, max(20, args.steps // n))
            envs.close()
        print(f"| {n} | {results[True]:,.0f} | {results[False]:,.0f} | {results[False] / results[True]:.2f}x |")

    # Rollout vs random stepping: the same env groups and workers, measured alternately, median of 3 each.
    n = args.max_envs
    if device.type == "cpu":
        torch.set_num_threads(1)  # as train() acts on the CPU: the emulator workers need the other cores
    config = ppo_mario.Args(env_id=ENV_ID, num_envs=n, num_steps=max(32, args.steps // n), cuda=args.cuda)
    envs = ppo_mario.EnvGroups(config)
    agent = ppo_mario.Agent(4, envs.single_action_space.n).to(device)
    rollout = ppo_mario.Rollout.empty(config.num_steps, n, (4, 84, 84), device)
    next_obs = torch.as_tensor(envs.reset(seed=0), device=device)
    random_runs, rollout_runs = [], []
    for _ in range(3):
        random_runs.append(random_groups_sps(envs, config.num_steps))
        sps, next_obs = rollout_sps(envs, agent, rollout, next_obs, device)
        rollout_runs.append(sps)
    envs.close()
    random_median, rollout_median = np.median(random_runs), np.median(rollout_runs)
    print(f"\nrollout with the policy, {n} Async envs in {len(envs.groups)} groups: {rollout_median:,.0f} agent steps/s; "
          f"random actions on the same "
          f"workers: {random_median:,.0f}; ratio {rollout_median / random_median:.2f}x (target >= 0.9x)")

    # Whole training: a short real run with the defaults (but --max-envs envs); SPS from its TensorBoard events (the
    # last iteration, so start-up is amortised); peak RSS of the trainer process (the largest child waited for).
    defaults = ppo_mario.Args(num_envs=n)
    batch = n * defaults.num_steps
    with tempfile.TemporaryDirectory() as runs_dir:
        command = [sys.executable, os.path.join(ROOT, "ppo_mario.py"), "--env-id", ENV_ID, "--runs-dir", runs_dir,
                   "--num-envs", str(n), "--total-timesteps", str(3 * batch)] + (["--cuda"] if args.cuda else [])
        subprocess.run(command, check=True, capture_output=True)
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        (run_dir,) = [os.path.join(runs_dir, d) for d in os.listdir(runs_dir)]
        sps = load_curve(run_dir, "charts/SPS").values[-1]
        roll = load_curve(run_dir, "charts/rollout_SPS").values
    obs_bytes = batch * 4 * 84 * 84  # uint8 observations
    other_bytes = batch * (8 + 7 * 4)  # actions (int64) and 7 float32 rows: logprobs, rewards, terminations, ...
    print(f"whole training, defaults ({n} envs x {defaults.num_steps} steps, {defaults.update_epochs} epochs of "
          f"{defaults.num_minibatches} minibatches): {sps:,.0f} SPS; its rollouts {np.median(roll):,.0f} SPS")
    print(f"peak RSS of the trainer: {peak_rss / 2**20:,.0f} MiB; rollout buffer {(obs_bytes + other_bytes) / 2**20:,.1f} MiB "
          f"({(obs_bytes + other_bytes) / peak_rss:.1%}); as float32 the observations alone would take "
          f"{4 * obs_bytes / 2**20:,.1f} MiB")

if __name__ == "__main__":
    main()
