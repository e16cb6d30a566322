"""How often a 2-rank gloo job dies at exit when its ranks keep the process group alive, against ranks
that leave it first (trainer.runtime.collectives.shutdown). Each trial is one torchrun launch of this file
in worker mode: both groups the trainer uses, a few collectives, exit status 0.

    python bench/gloo_exit.py --trials 40
"""
import argparse
import os
import subprocess
import sys
import time
from datetime import timedelta

from tqdm import tqdm


def worker(leave: bool) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    host = dist.new_group(backend="gloo")
    for _ in range(20):
        dist.all_reduce(torch.ones(1000))
        dist.all_reduce(torch.ones(1), group=host)
    if dist.get_rank() == 0:
        time.sleep(0.05)  # the ranks reach their exits apart, as a real run's do
    if leave:
        dist.destroy_process_group(host)
        dist.destroy_process_group()
    sys.exit(0)


def trial(leave: bool) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--worker", *(["--leave"] if leave else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, capture_output=True, timeout=120).returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--leave", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.leave)
    failed = {False: 0, True: 0}
    for _ in tqdm(range(args.trials), desc="trials"):  # alternated, so both see the same load on the machine
        for leave in failed:
            failed[leave] += trial(leave) != 0
    for leave, n in failed.items():
        print(f"{'leaves the group' if leave else 'keeps the group'}: {n}/{args.trials} launches failed")


if __name__ == "__main__":
    main()
