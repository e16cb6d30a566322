"""SLURM -> torch.distributed environment (trainer/runtime/dist_env.py): host lists, rank mapping for N nodes x
G tasks, when it applies, and the hook in init_distributed with two real processes (no SLURM needed)."""
import os
import subprocess
import sys

import pytest
from conftest import ROOT, cli_env

from trainer.runtime.dist_env import (
    PORT_BASE,
    PORT_SPAN,
    expand_hostlist,
    expand_tasks_per_node,
    fill_from_slurm,
    from_slurm,
    master_port,
)


@pytest.mark.parametrize("hostlist, hosts", [
    ("vm", ["vm"]),
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("node[008-010]", ["node008", "node009", "node010"]),
    ("a[1-2],b[3],c", ["a1", "a2", "b3", "c"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("gpu-a100.cluster[1,3]", ["gpu-a100.cluster1", "gpu-a100.cluster3"]),
    ("x[7]", ["x7"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu01-03]", "gpu[3-1]", "gpu[a-b]", "a,,b", "gpu[1-2]]"])
def test_expand_hostlist_refuses_malformed(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("8") == [8]
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(ValueError):
        expand_tasks_per_node("2(3)")


def srun_env(job_id: int, nodes: list[str], node: int, local: int, per_node: int, nodelist: str) -> dict:
    """What srun gives task `local` on node `node` of an N x G step (block distribution)."""
    world = len(nodes) * per_node
    return {
        "SLURM_JOB_ID": str(job_id), "SLURM_PROCID": str(node * per_node + local), "SLURM_LOCALID": str(local),
        "SLURM_NODEID": str(node), "SLURM_NTASKS": str(world), "SLURM_STEP_NUM_TASKS": str(world),
        "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": nodelist, "SLURM_STEP_NODELIST": nodelist,
        "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{len(nodes)})" if len(nodes) > 1 else str(per_node),
    }


@pytest.mark.parametrize("n_nodes, per_node", [(1, 1), (1, 2), (1, 8), (2, 1), (2, 4), (3, 2), (4, 8), (16, 8)])
def test_rank_mapping_n_nodes_by_g_tasks(n_nodes, per_node):
    nodes = [f"gpu{i + 1:02d}" for i in range(n_nodes)]
    nodelist = f"gpu[01-{n_nodes:02d}]" if n_nodes > 1 else "gpu01"
    envs = [from_slurm(srun_env(4242, nodes, n, g, per_node, nodelist)) for n in range(n_nodes) for g in range(per_node)]
    world = n_nodes * per_node
    assert sorted(int(e["RANK"]) for e in envs) == list(range(world))  # every rank exactly once
    assert {e["WORLD_SIZE"] for e in envs} == {str(world)}
    assert {e["MASTER_ADDR"] for e in envs} == {"gpu01"}  # rank 0's node (block distribution)
    assert len({e["MASTER_PORT"] for e in envs}) == 1
    assert {e["LOCAL_WORLD_SIZE"] for e in envs} == {str(per_node)}
    for e in envs:
        rank, local, node = int(e["RANK"]), int(e["LOCAL_RANK"]), int(e["NODE_RANK"])
        assert 0 <= local < per_node and rank == node * per_node + local


def test_uneven_tasks_per_node():
    env = srun_env(7, ["a", "b"], 1, 0, 2, "a,b")
    env.update(SLURM_STEP_NUM_TASKS="3", SLURM_NTASKS="3", SLURM_STEP_TASKS_PER_NODE="2,1", SLURM_PROCID="2")
    out = from_slurm(env)
    assert (out["RANK"], out["WORLD_SIZE"], out["LOCAL_WORLD_SIZE"], out["MASTER_ADDR"]) == ("2", "3", "1", "a")


def test_master_port_per_job_and_restart():
    ports = {master_port(j) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(PORT_BASE <= p < PORT_BASE + PORT_SPAN for p in ports)
    assert master_port(123456, restart=1) != master_port(123456)
    assert PORT_BASE <= master_port(10 ** 12, restart=7) < PORT_BASE + PORT_SPAN
    env = srun_env(99, ["a"], 0, 0, 2, "a")
    assert from_slurm({**env, "MASTER_PORT": "31337"})["MASTER_PORT"] == "31337"  # the user's choice stays
    assert from_slurm({**env, "SLURM_RESTART_COUNT": "2"})["MASTER_PORT"] == str(master_port(99, 2))


def test_fill_only_for_srun_tasks_without_rank():
    task = srun_env(5, ["a", "b"], 1, 1, 2, "a,b")
    env = dict(task)
    assert fill_from_slurm(env) and env["RANK"] == "3" and env["MASTER_ADDR"] == "a"
    torchrun = {**task, "RANK": "0", "WORLD_SIZE": "1"}
    assert not fill_from_slurm(torchrun) and torchrun["RANK"] == "0" and "MASTER_ADDR" not in torchrun
    # the batch script itself has SLURM_PROCID and the allocation's SLURM_NTASKS, but it is one process
    batch = {k: v for k, v in task.items() if not k.startswith("SLURM_STEP")}
    assert not fill_from_slurm(batch) and "RANK" not in batch
    assert not fill_from_slurm({})


def test_from_slurm_refuses_a_rank_outside_the_step():
    with pytest.raises(ValueError):
        from_slurm({**srun_env(5, ["a"], 0, 0, 2, "a"), "SLURM_PROCID": "2"})


PROBE = """
import os
import torch
import torch.distributed as dist
from trainer.runtime.engines import init_distributed
info = init_distributed()
x = torch.tensor([info.rank + 1.0])
dist.all_reduce(x)
print("probe", info.rank, info.local_rank, info.world_size, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], int(x.item()))
"""


def test_init_distributed_forms_a_group_from_srun_variables():
    """Two processes with what srun gives its tasks (no RANK): init_distributed joins them into one group."""
    job_id = 900000 + os.getpid() % 9000  # a port of its own
    procs = []
    for rank in range(2):
        env = cli_env(**srun_env(job_id, ["localhost"], 0, rank, 2, "localhost"))
        procs.append(subprocess.Popen([sys.executable, "-c", PROBE], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    lines = sorted(line.split() for out, _ in outs for line in out.splitlines() if line.startswith("probe"))
    port = str(master_port(job_id))
    assert lines == [["probe", "0", "0", "2", "localhost", port, "3"], ["probe", "1", "1", "2", "localhost", port, "3"]]
