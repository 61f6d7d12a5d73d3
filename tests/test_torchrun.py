"""Data-parallel PPO under torchrun: two CPU ranks with gloo, real environments, real collectives."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import children_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(script, *args, nproc=2, timeout=600):
    """Run under torchrun; on a time-out (a rank waiting forever) torchrun and its ranks are killed."""
    # --standalone picks a free local port, so concurrent runs do not collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(ROOT, script), *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [process.pid, *map(int, children_of(process.pid))]:  # each rank runs in a session of its own
            os.kill(pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def events(run_dir):
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.parametrize("script, args, batch, episodes_per_rank_at_least", [
    ("ppo_mario.py", ["--total-timesteps", "512", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2",
                      "--update-epochs", "1", "--stuck-timeout", "10", "--save-interval", "2", "--start-states", "1"], 128, 2),
])
def test_two_gloo_ranks_train_in_lockstep_and_only_rank_0_writes(tmp_path, script, args, batch, episodes_per_rank_at_least):
    result = torchrun(script, *args, "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights identical on all 2 ranks" in result.stdout
    (run_dir,) = tmp_path.iterdir()  # one run directory: rank 1 wrote nothing of its own
    assert len([f for f in os.listdir(run_dir) if f.startswith("events.out.tfevents")]) == 1

    # Every iteration advanced the global step by both ranks' batches, and the update ran on both (the all-reduce
    # would have blocked otherwise): several real iterations.
    accumulator = events(run_dir)
    steps = [e.step for e in accumulator.Scalars("charts/SPS")]
    iterations = int(args[1]) // (2 * batch)
    assert iterations >= 2 and steps == [2 * batch * i for i in range(1, iterations + 1)]
    # Rank 0 logged the episodes of both ranks.
    assert len(accumulator.Scalars("charts/episodic_length")) >= 2 * episodes_per_rank_at_least

    checkpoints = sorted(os.listdir(run_dir / "checkpoints"))
    final = torch.load(run_dir / "checkpoints" / checkpoints[-1], weights_only=True)
    assert final["global_step"] == iterations * 2 * batch and final["iteration"] == iterations
    # The start-state curricula of both ranks' envs, gathered on rank 0: every env had episodes (the stuck time-out).
    assert len(final["start_states"]) == 4 and all(c["furthest_actions"] for c in final["start_states"])


def test_a_resumed_torchrun_run_gives_each_rank_its_own_envs_start_state_curricula(tmp_path):
    args = ["--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "1", "--stuck-timeout",
            "10", "--start-states", "1", "--runs-dir", str(tmp_path)]
    assert torchrun("ppo_mario.py", "--total-timesteps", "256", *args).returncode == 0
    (run_dir,) = tmp_path.iterdir()
    path = run_dir / "checkpoints" / "step_0000000256.pt"
    checkpoint = torch.load(path, weights_only=True)
    # Four curricula no episode can replace (their furthest episodes reached the flag), each env's its own: rank 0's
    # envs first. One more iteration to go.
    curricula = [{"furthest_actions": [1] * 30 + [env] * 10, "furthest_x": 3000 + env, "furthest_cleared": True,
                  "start_point": 20 + env, "outcomes": [True]} for env in range(4)]
    checkpoint["start_states"], checkpoint["args"]["total_timesteps"] = curricula, 512
    torch.save(checkpoint, path)

    result = torchrun("ppo_mario.py", "--resume", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = torch.load(run_dir / "checkpoints" / "step_0000000512.pt", weights_only=True)["start_states"]
    for saved, now in zip(curricula, resumed, strict=True):
        assert now["outcomes"][:1] == saved["outcomes"]  # 64 steps add at most 6 episodes: the start point stays
        del now["outcomes"], saved["outcomes"]
        assert now == saved


@pytest.mark.parametrize("module", ["ppo_mario"])
def test_target_kl_early_stop_is_decided_jointly(tmp_path, module):
    # Rank 0's batch records logprobs 1 above the policy's (approx KL (e^-1 - 1) + 1 = 0.37 from the first minibatch),
    # rank 1's the policy's own (KL ~0: the learning rate is tiny). Their mean passes the target of 0.1 and rank 1's
    # alone never does: both must stop after the first epoch, with the same number of optimizer steps. A rank deciding
    # alone would run on into an all-reduce the other never joins.
    script = tmp_path / "target_kl.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {ROOT!r})
import torch, torch.distributed as dist
import {module} as script
script.setup_distributed(want_cuda=False)
rank = dist.get_rank()
torch.manual_seed(0)
agent, obs = script.Agent(4, 5), torch.randint(0, 256, (8, 4, 84, 84), dtype=torch.uint8)
with torch.no_grad():
    actions, logprobs, _, values = agent.get_action_and_value(obs)
batch = {{"obs": obs, "actions": actions, "logprobs": logprobs + (1.0 if rank == 0 else 0.0), "values": values,
         "advantages": torch.randn(8), "returns": values}}
optimizer = torch.optim.Adam(agent.parameters(), lr=1e-7)
script.ppo_update(agent, optimizer, batch, script.Args(num_minibatches=2, update_epochs=4, target_kl=0.1))
steps = torch.tensor([float(optimizer.state[next(agent.parameters())]["step"])])
gathered = [torch.zeros(1), torch.zeros(1)]
dist.all_gather(gathered, steps)
dist.destroy_process_group()
print(f"rank {{rank}} optimizer steps {{[int(s) for s in gathered]}}")
""")
    result = torchrun(str(script), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 optimizer steps [2, 2]" in result.stdout and "rank 1 optimizer steps [2, 2]" in result.stdout


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the process's threads from /proc")
@pytest.mark.parametrize("module", ["ppo_mario"])
def test_destroy_process_group_ends_the_gloo_threads(tmp_path, module):
    # A gloo worker thread still running at interpreter shutdown can abort a finished run (SIGABRT, "terminate called
    # without an active exception"): after destroy_process_group none may be left, even once the optimizer has loaded
    # torch._dynamo as train() does.
    script = tmp_path / "teardown.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {ROOT!r})
import torch, torch.distributed as dist
import {module}
{module}.setup_distributed(want_cuda=False)
torch.optim.Adam(torch.nn.Linear(2, 2).parameters())
dist.all_reduce(torch.ones(1))
rank = dist.get_rank()
dist.destroy_process_group()
with open(os.path.join({str(tmp_path)!r}, f"threads_{{rank}}.txt"), "w") as f:
    f.write(" ".join(open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")))
""")
    result = torchrun(str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    threads = {rank: (tmp_path / f"threads_{rank}.txt").read_text() for rank in (0, 1)}  # each rank its own file
    assert not any("gloo" in names for names in threads.values()), threads
