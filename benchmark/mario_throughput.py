"""Super Mario Bros throughput, every figure measured in this one run so they can be read as ratios:

  1. the bare emulator (nes-py's frame advance alone) and the SMB env stepped frame by frame with its own reward and
     info, in frames/s (one process, random joypad actions);
  2. one fully wrapped env, in frames/s (4 per agent step), as ratios to the bare emulator; with --before, the
     wrapped env of that version of ppo_mario.py too, measured alternately with this one;
  3. Sync vs Async vector envs with random actions, for 1..--max-envs envs;
  4. the training loop's rollout (acting + stepping, pipelined over two env groups) against random-action stepping of
     the same envs on the same worker processes (target: >= 0.9x);
  5. whole training (rollout + update) with the default hyperparameters, before and after a change, alternated in
     short real runs: SPS, the PPO update's share of an iteration's wall time, and the peak memory (RSS) with the
     share of the uint8 rollout buffer. "After" is this checkout's ppo_mario.py; "before" is --before (another version
     of the script, e.g. from git) with --before-flags.

    python benchmark/mario_throughput.py                  # ~15 minutes on 2 cores
    git show HEAD~3:ppo_mario.py > /tmp/before.py && python benchmark/mario_throughput.py --only-training --before /tmp/before.py
    python benchmark/mario_throughput.py --cuda --max-envs 16
"""

import argparse
import importlib.util
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


def bare_emulator_frames_per_second(frames: int) -> float:
    """nes-py's frame advance alone, random joypad bytes: the floor no wrapper can go below."""
    env = ppo_mario.make_mario_base_env(ENV_ID, "simple", render=False)
    env.reset(seed=0)
    nes = getattr(env, "gym_env", env).unwrapped  # on the 7.4 line, below shimmy, which guards private names
    buttons = np.random.default_rng(0).integers(0, 256, size=frames)
    start = time.perf_counter()
    for button in buttons:
        nes._frame_advance(int(button))
    rate = frames / (time.perf_counter() - start)
    env.close()
    return rate


def load_script(path: str):
    """Another version of ppo_mario.py, imported under its own module name."""
    spec = importlib.util.spec_from_file_location("ppo_mario_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_envs_and_rollout(args, device):
    """Parts 1-4: the emulator, one wrapped env, vector envs with random actions, and the rollout against them."""
    versions = {"this": ppo_mario} | ({"before": load_script(args.before)} if args.before else {})
    bare, smb, wrapped = [], [], {name: [] for name in versions}
    for _ in range(args.repeats):  # alternated, so that a busy moment of the machine hits all of them
        bare.append(bare_emulator_frames_per_second(4 * args.steps))
        smb.append(random_steps_per_second(ppo_mario.make_mario_base_env(ENV_ID, "right_only", render=False),
                                           4 * args.steps))
        for name, module in versions.items():
            env = module.make_env(module.Args(env_id=ENV_ID))()
            wrapped[name].append(4 * random_steps_per_second(env, args.steps))
    bare_median = np.median(bare)
    print(f"\n| what (medians of {args.repeats}) | frames/s | / bare emulator |\n|-|-|-|")
    print(f"| bare emulator (nes-py frame advance) | {bare_median:,.0f} | 1.00x |")
    print(f"| SMB env frame by frame (joypad, reward, info) | {np.median(smb):,.0f} | {np.median(smb) / bare_median:.2f}x |")
    for name, rates in wrapped.items():
        print(f"| one wrapped env, {name} ppo_mario.py (skip 4, gray, 84x84, stack 4) | {np.median(rates):,.0f} | "
              f"{np.median(rates) / bare_median:.2f}x |")

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
    if device.type == "cpu":
        torch.set_num_threads(1)  # as train() acts on the CPU: the emulator workers need the other cores
    n = args.max_envs
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-envs", type=int, default=ppo_mario.Args().num_envs,
                        help="largest env count measured; the rollout and the training run use it (default: ppo_mario's)")
    parser.add_argument("--steps", type=int, default=300, help="agent steps per env per measurement")
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--only-training", action="store_true", help="measure whole training (part 5) only")
    parser.add_argument("--iterations", type=int, default=3, help="iterations of each training run")
    parser.add_argument("--repeats", type=int, default=2,
                        help="measurements of each env in parts 1-2, and before/after pairs of training runs")
    parser.add_argument("--before", help="another version of ppo_mario.py to measure beside this one (the wrapped env "
                        "and whole training; default for training: this checkout's again)")
    parser.add_argument("--before-flags", default="", help="ppo_mario.py flags of the 'before' runs")
    args = parser.parse_args()
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    print(f"machine: {os.cpu_count()} CPU cores, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))

    if not args.only_training:
        measure_envs_and_rollout(args, device)
    n = args.max_envs

    # Whole training, before and after: short real runs with the defaults (but --max-envs envs), alternated.
    defaults = ppo_mario.Args(num_envs=n)
    batch = n * defaults.num_steps
    print(f"\nwhole training, defaults ({n} envs x {defaults.num_steps} steps, {defaults.update_epochs} epochs of "
          f"{defaults.num_minibatches} minibatches), {args.iterations} iterations a run; SPS over the whole run (start-up "
          "included) and per iteration after the first; the update's share of an iteration's wall time:")
    print("\n| run | extra flags | SPS (whole run) | SPS (iterations 2+) | rollout SPS | update share |\n|-|-|-|-|-|-|")
    peak_rss = None
    for repeat in range(args.repeats):
        for label, script, flags in (("after", os.path.join(ROOT, "ppo_mario.py"), []),
                                     ("before", args.before or os.path.join(ROOT, "ppo_mario.py"),
                                      args.before_flags.split())):
            result = whole_training(script, n, batch, args.iterations, flags + (["--cuda"] if args.cuda else []))
            peak_rss = peak_rss or result["peak_rss"]  # the first run's: RUSAGE_CHILDREN keeps the maximum over all
            print(f"| {label} {repeat + 1} | {' '.join(flags) or '(defaults)'} | {result['sps']:,.0f} | "
                  f"{result['iteration_sps']:,.0f} | {result['rollout_sps']:,.0f} | {result['update_share']:.0%} |",
                  flush=True)
    obs_bytes = batch * 4 * 84 * 84  # uint8 observations
    other_bytes = batch * (8 + 7 * 4)  # actions (int64) and 7 float32 rows: logprobs, rewards, terminations, ...
    print(f"\npeak RSS of the trainer (after 1): {peak_rss / 2**20:,.0f} MiB; rollout buffer "
          f"{(obs_bytes + other_bytes) / 2**20:,.1f} MiB ({(obs_bytes + other_bytes) / peak_rss:.1%}); as float32 the "
          f"observations alone would take {4 * obs_bytes / 2**20:,.1f} MiB")


def whole_training(script: str, n: int, batch: int, iterations: int, flags: list[str]) -> dict:
    """A real training run of `iterations` iterations. From its TensorBoard events: SPS at the end (start-up included),
    SPS over the iterations after the first (from the events' wall times), the median rollout SPS, and the update's
    share of those iterations (an iteration's time less its rollout's: the update, with GAE and logging)."""
    with tempfile.TemporaryDirectory() as runs_dir:
        command = [sys.executable, script, "--env-id", ENV_ID, "--runs-dir", runs_dir,
                   "--num-envs", str(n), "--total-timesteps", str(iterations * batch), *flags]
        subprocess.run(command, check=True, capture_output=True)
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        (run_dir,) = [os.path.join(runs_dir, d) for d in os.listdir(runs_dir)]
        sps, rollout = load_curve(run_dir, "charts/SPS"), load_curve(run_dir, "charts/rollout_SPS")
    iteration_seconds = np.diff(sps.seconds)  # iteration k ends when its SPS is logged
    rollout_seconds = batch / rollout.values[1:]
    return {"sps": sps.values[-1], "iteration_sps": batch / iteration_seconds.mean(),
            "rollout_sps": np.median(rollout.values), "peak_rss": peak_rss,
            "update_share": 1 - rollout_seconds.sum() / iteration_seconds.sum()}


if __name__ == "__main__":
    main()
