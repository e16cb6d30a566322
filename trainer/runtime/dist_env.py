"""torch.distributed's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) from SLURM's.

Under `srun`, every task is one rank: SLURM numbers them (SLURM_PROCID across the step, SLURM_LOCALID on
the node), the step's first node hosts rank 0, and every task can compute the same port from the job id
without talking to the others. No `scontrol` call: the compressed host list is expanded here.

    srun python -m trainer.run --config ...     # init_distributed() calls fill_from_slurm() first
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping

PORT_BASE, PORT_SPAN = 20000, 10000  # 20000-29999: above the usual services, below Linux's ephemeral range


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list -> host names, in order.

    `gpu[01-03,07],cpu5` -> gpu01 gpu02 gpu03 gpu07 cpu5; several bracket groups in one name multiply
    (`r[1-2]n[1-2]` -> r1n1 r1n2 r2n1 r2n2); zero padding follows the range's bounds, as SLURM writes it.
    """
    hosts: list[str] = []
    for name in _split_top_level(hostlist.strip()):
        expansions = [""]
        for literal, bracket in re.findall(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", name):
            suffixes = _expand_ranges(bracket, hostlist) if bracket else [""]
            expansions = [e + literal + s for e in expansions for s in suffixes]
        hosts.extend(expansions)
    return hosts


def _split_top_level(hostlist: str) -> list[str]:
    """Splits at the commas outside brackets; checks that brackets pair up."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(hostlist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if depth not in (0, 1):
            raise ValueError(f"host list '{hostlist}': unbalanced brackets")
        if ch == "," and depth == 0:
            parts.append(hostlist[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"host list '{hostlist}': unbalanced brackets")
    parts.append(hostlist[start:])
    if any(not p for p in parts):
        raise ValueError(f"host list '{hostlist}': empty host name")
    return parts


def _expand_ranges(spec: str, hostlist: str) -> list[str]:
    out = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not match:
            raise ValueError(f"host list '{hostlist}': cannot read the range '{item}'")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f"host list '{hostlist}': range '{item}' runs backwards")
        out.extend(f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1))
    return out


def master_port(job_id: int, restart: int = 0) -> int:
    """The same port on every task of a job, different for concurrent jobs (ids differ by < 10000) and
    after a requeue (restart count), so a restarted job never races its predecessor's socket."""
    return PORT_BASE + (int(job_id) + 1000 * int(restart)) % PORT_SPAN


def in_srun_step(env: Mapping[str, str]) -> bool:
    """True inside a task launched by srun. The batch script itself also has SLURM_PROCID=0 and
    SLURM_NTASKS (the allocation's), but it is one process: it must not wait for the others."""
    return "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env)


def from_slurm(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables of this srun task (raises KeyError/ValueError on a broken env)."""
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or env["SLURM_NPROCS"])
    rank = int(env["SLURM_PROCID"])
    if not 0 <= rank < world:
        raise ValueError(f"SLURM_PROCID={rank} is outside the step's {world} tasks")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    hosts = expand_hostlist(nodelist) if nodelist else ["127.0.0.1"]
    tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
    node = int(env.get("SLURM_NODEID", 0))
    counts = expand_tasks_per_node(tasks_per_node)
    out = {
        "RANK": str(rank),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(counts[node] if node < len(counts) else counts[-1]),
        "NODE_RANK": str(node),
        "MASTER_ADDR": hosts[0],
        "MASTER_PORT": env.get("MASTER_PORT") or str(master_port(int(env["SLURM_JOB_ID"]), int(env.get("SLURM_RESTART_COUNT", 0)))),
    }
    return out


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's `2(x3),1` -> [2, 2, 2, 1]."""
    counts = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise ValueError(f"tasks per node '{spec}': cannot read '{item}'")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def fill_from_slurm(env: MutableMapping[str, str] | None = None) -> bool:
    """Sets the torch.distributed variables from SLURM's when this process is an srun task and nobody
    (torchrun, the user) set RANK already. Returns whether it did."""
    env = os.environ if env is None else env
    if "RANK" in env or not in_srun_step(env):
        return False
    env.update(from_slurm(env))
    return True
