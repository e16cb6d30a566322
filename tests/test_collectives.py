"""trainer/runtime/collectives.py: the only module that talks to torch.distributed, with tensors on the process
group's device, and rank 0's solo work awaited outside the step's collective timeout."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainer.runtime.collectives as collectives

from conftest import ROOT, cli_env

TRAINER_FILES = sorted((ROOT / "trainer").rglob("*.py"))


def _distributed_uses(path: Path) -> list[str]:
    """Imports of torch.distributed and attribute uses torch.distributed.<x> in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [f"{path.name}:{node.lineno} import {a.name}" for a in node.names if a.name.startswith("torch.distributed")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            found.append(f"{path.name}:{node.lineno} from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and ast.unparse(node).startswith("torch.distributed."):
            found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_collective_outside_the_collectives_module():
    others = [p for p in TRAINER_FILES if p.name != "collectives.py"]
    assert len(others) > 20
    uses = [use for path in others for use in _distributed_uses(path)]
    assert uses == [], f"torch.distributed used outside trainer/runtime/collectives.py: {uses}"
    assert _distributed_uses(ROOT / "trainer" / "runtime" / "collectives.py")  # the scan does see them where they are


def test_the_scan_catches_a_direct_collective(tmp_path):
    source = tmp_path / "rogue.py"
    source.write_text("import torch\n\ndef sync():\n    torch.distributed.barrier()\n")
    assert _distributed_uses(source) == ["rogue.py:4 torch.distributed.barrier"]
    source.write_text("import torch.distributed as dist\n")
    assert _distributed_uses(source) == ["rogue.py:1 import torch.distributed"]


class Stop(Exception):
    pass


def test_with_nccl_the_collective_gets_a_cuda_tensor(monkeypatch):
    """NCCL reduces only CUDA tensors: with the backend reported as NCCL, any_rank hands all_reduce a tensor
    on the current GPU (a fake CUDA tensor: this machine has none); with gloo, a CPU tensor."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    seen = []

    def all_reduce(tensor, op=None, group=None):
        seen.append(tensor.device)
        raise Stop  # the fake tensor holds no value to read back

    backend = {"name": "nccl"}
    monkeypatch.setattr(collectives.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(collectives.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(collectives.dist, "get_backend", lambda group=None: backend["name"])
    monkeypatch.setattr(collectives.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    with FakeTensorMode(), pytest.raises(Stop):
        collectives.any_rank(True)
    backend["name"] = "gloo"
    with pytest.raises(Stop):
        collectives.any_rank(True)
    assert seen == [torch.device("cuda", 3), torch.device("cpu")]


def test_the_gpu_is_chosen_before_the_process_group(monkeypatch):
    calls = []
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(collectives.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(collectives.dist, "get_world_size", lambda group=None: 1)
    import deepspeed

    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.append(("init", kw["dist_backend"], kw["timeout"].total_seconds())))
    collectives.init(collective_timeout_s=60, main_work_timeout_s=600)
    assert calls == [("set_device", 5), ("init", "nccl", 60.0)]


def test_two_ranks_rank0_work_outlasts_the_collective_timeout(tmp_path):
    """2 gloo ranks, a 3 s process-group timeout: rank 0's 6 s of solo work is waited for (on_main), its
    failure reaches the other rank as an error, and every collective returns the same on both ranks; the
    same work awaited in a plain barrier times out (the control)."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "collectives_runner.py")], cwd=ROOT, env=cli_env(OUT=str(tmp_path)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, seen in enumerate(ranks):
        assert seen["world_size"] == 2 and seen["any_of_rank1"] is True and seen["any_of_none"] is False
        assert seen["means"] == {"a": 0.5, "b": 2.0} and seen["strings"] == ["r0", "r1"]
        assert seen["broadcast"] == {"from": 0} and seen["slow_result"] == 42 and seen["after"] == ["ok", "ok"]
        assert seen["plain_barrier"].startswith("failed"), seen
    assert ranks[1]["waited_s"] >= 5.5  # it really waited past the 3 s timeout
    assert ranks[0]["failure"] == "OSError: disk full"
    assert ranks[1]["failure"] == "MainWorkFailed: rank 0 failed while failing work: OSError: disk full"


def test_two_rank_job_survives_an_export_slower_than_the_timeout(tmp_path):
    """The teacher job on 2 gloo ranks with a 15 s collective timeout and an export slowed by 30 s: the other
    rank waits for rank 0 outside the timeout and the run ends normally; its summary lists only the exports
    that exist (the teacher's: no stage ran)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "fault_runner.py"), "--config", "configs/smoke.yaml", "--jobs", "teacher",
           "--set", f"run.out_dir={out}", "--set", "run.collective_timeout_s=15"]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(FAULT="slow_export:30"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[rank 0] exporting teacher: 3" in proc.stdout  # 30+ s
    summary = json.loads(proc.stdout.split("=== done ===", 1)[1].split("\nTensorBoard")[0])
    assert list(summary["exports"]) == ["teacher"] and (out / "exports" / "teacher" / "export.json").is_file()


@pytest.mark.parametrize("fault, status", [("", 0), ("usr2_in_setup", 75)], ids=["done", "preempted"])
def test_every_rank_leaves_the_process_group_before_it_exits(tmp_path, fault, status):
    """A gloo group alive at interpreter exit can abort a rank (SIGABRT) after a run that ended well, and its
    exit status then reads as a failure: a run that finishes, or stops for a requeue, leaves both groups
    first, on both ranks."""
    report = tmp_path / "report"
    report.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "fault_runner.py"), "--config", "configs/smoke.yaml", "--jobs", "teacher",
           "--set", f"run.out_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(FAULT=fault, REPORT=str(report)), capture_output=True,
                          text=True, timeout=600)
    assert (proc.returncode == 0) == (status == 0), proc.stderr[-4000:]  # torchrun says 1 for any rank's 75
    for r in (0, 1):
        assert json.loads((report / f"rank{r}.json").read_text()) == {"code": status, "group_alive": False}


def test_checkpointed_tensors_are_loaded_onto_an_explicit_device():
    """Every safetensors/torch.load read in trainer/ names where its tensors go (and torch.load is
    weights_only): a default would put a GPU run's state on the wrong device."""
    loose = []
    for path in TRAINER_FILES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                keys = {k.arg: k.value for k in node.keywords}
                if name.endswith("load_file") or name.endswith("safe_open"):
                    ok = "device" in keys
                elif name == "torch.load":
                    ok = "map_location" in keys and ast.unparse(keys.get("weights_only", ast.Constant(False))) == "True"
                else:
                    continue
                if not ok:
                    loose.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert loose == []


def test_ema_resumes_into_the_modules_own_tensors():
    """The EMA shadow lives where the module lives; a checkpoint's average is copied into it, so a CPU
    file never replaces GPU tensors."""
    from trainer.runtime.loop import EMA

    module = torch.nn.Linear(3, 2)
    ema = EMA(module, 0.9)
    before = {k: v for k, v in ema.shadow.items()}
    saved = {k: torch.full_like(v, 7.0) for k, v in ema.shadow.items()}
    ema.load(saved)
    assert all(ema.shadow[k] is before[k] and torch.equal(ema.shadow[k], saved[k]) for k in saved)
    with pytest.raises(RuntimeError, match="EMA does not match"):
        ema.load({"weight": saved["weight"]})


def test_the_probe_and_grids_see_the_average_and_training_resumes_on_the_trained_weights():
    """What the probe and the sample grids measure is what the job exports (the EMA where there is one); the
    trained weights, in the module's own dtype and storage, come back bit for bit, also after an error."""
    from trainer.runtime.loop import EMA, exported_weights

    module = torch.nn.Linear(3, 2).to(torch.bfloat16).train()
    storage = module.weight.data_ptr()
    trained = {k: v.clone() for k, v in module.state_dict().items()}
    ema = EMA(module, 0.9)
    ema.load({k: torch.full_like(v, 0.5) for k, v in ema.shadow.items()})
    with exported_weights(module, ema) as seen:
        assert not seen.training and torch.equal(seen.weight, torch.full((2, 3), 0.5, dtype=torch.bfloat16))
    assert module.training and module.weight.data_ptr() == storage
    assert all(torch.equal(module.state_dict()[k], v) for k, v in trained.items())
    with pytest.raises(ValueError), exported_weights(module, ema):
        raise ValueError("a probe that fails")
    assert all(torch.equal(module.state_dict()[k], v) for k, v in trained.items()) and module.training
    with exported_weights(module, None) as seen:  # no average: the trained weights themselves
        assert torch.equal(seen.weight, trained["weight"])
