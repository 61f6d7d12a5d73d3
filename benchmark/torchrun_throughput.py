"""Mario training throughput with 1 process vs N torchrun ranks, the same total number of environments split over the
ranks; SPS (all ranks' steps per second) from each run's last TensorBoard point.

    python benchmark/torchrun_throughput.py                      # CPU, gloo, 2 ranks (~3 min on 2 cores)
    python benchmark/torchrun_throughput.py --ranks 4 --cuda     # on a machine with 4 GPUs (NCCL)
"""

import argparse
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from tbcurves import load_curve  # noqa: E402

WORKLOADS = {
    # script, total envs, per-run flags (the per-rank batch shrinks with the envs; steps per env stay the same)
    "mario": ("ppo_mario.py", 4, ["--num-steps", "128", "--num-minibatches", "4", "--total-timesteps", "3072"]),
}


def measure(script: str, envs: int, flags: list[str], ranks: int, cuda: bool) -> float:
    with tempfile.TemporaryDirectory() as runs_dir:
        per_rank = ["--num-envs", str(envs // ranks), "--runs-dir", runs_dir, *flags] + (["--cuda"] if cuda else [])
        launcher = [sys.executable] if ranks == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        subprocess.run([*launcher, os.path.join(ROOT, script), *per_rank], check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        (run_dir,) = [os.path.join(runs_dir, name) for name in os.listdir(runs_dir)]
        return float(load_curve(run_dir, "charts/SPS").values[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPU cores; backend {'nccl' if args.cuda else 'gloo'}")
    print(f"\n| workload | total envs | SPS, 1 process | SPS, {args.ranks} ranks | ratio |\n|-|-|-|-|-|")
    for name in args.workloads:
        script, envs, flags = WORKLOADS[name]
        single = measure(script, envs, flags, 1, args.cuda)
        multi = measure(script, envs, flags, args.ranks, args.cuda)
        print(f"| {name} | {envs} | {single:,.0f} | {multi:,.0f} | {multi / single:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
