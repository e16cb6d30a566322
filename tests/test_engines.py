"""DeepSpeed engines as the GPU recipe builds them: fp32 gradient accumulation and reduction, an optimizer
that no node has to compile, and the determinism switch."""
import json

import pytest
import torch

from trainer.config import OptimConfig
from trainer.runtime.engines import adam_params, build_ds_config, init_distributed, make_engine
from trainer.method.models import Conditioning, build_toy_unet, unet_forward

from conftest import ROOT

GPU_JSONS = ("zero2_gpu.json", "zero2_gpu_offload.json")


@pytest.mark.parametrize("name", GPU_JSONS)
def test_gpu_json_accumulates_and_reduces_in_fp32(name):
    """8 accumulated micro-batches and a 64-way reduction in bf16 would make the recipe's numerics depend on
    the world size; the GPU JSONs state fp32 for both, and DeepSpeed (built here on the CPU) applies it."""
    ds_json = json.loads((ROOT / "ds_configs" / name).read_text())
    assert ds_json["data_types"] == {"grad_accum_dtype": "fp32"} and ds_json["communication_data_type"] == "fp32"
    init_distributed()
    engine = make_engine(build_toy_unet(), build_ds_config(str(ROOT / "ds_configs" / name), 2, 2, 1, OptimConfig(lr=1e-4), "t"))
    assert engine.communication_data_type == torch.float32
    assert engine.optimizer.gradient_accumulation_dtype == torch.float32
    assert next(engine.module.parameters()).dtype == torch.bfloat16  # the weights stay bf16
    assert type(engine.optimizer.optimizer) is torch.optim.AdamW  # torch's: nothing was compiled
    cond = Conditioning(torch.randn(2, 16, 32), torch.randn(2, 32), torch.tensor([[32., 32, 0, 0, 32, 32]] * 2))
    for _ in range(2):  # one optimizer step through the accumulation
        engine.backward(unet_forward(engine, torch.randn(2, 12, 16, 16), torch.full((2,), 500), cond).square().mean())
        engine.step()
    assert engine.global_steps == 1
    engine.destroy()


def test_adam_needs_no_compiler(monkeypatch):
    """torch's Adam (fused on a GPU) unless the optimizer is offloaded and DeepSpeed's CPU Adam came prebuilt."""
    import deepspeed.git_version_info as info

    optim = OptimConfig(lr=1e-5)
    plain = {"zero_optimization": {"stage": 2}}
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert adam_params(plain, optim)["torch_adam"] is True and "fused" not in adam_params(plain, optim)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert adam_params(plain, optim)["fused"] is True
    assert adam_params(offload, optim)["torch_adam"] is True and "fused" not in adam_params(offload, optim)
    monkeypatch.setitem(info.installed_ops, "cpu_adam", True)
    assert "torch_adam" not in adam_params(offload, optim)  # prebuilt: DeepSpeed's CPU Adam, nothing to compile
    assert adam_params(plain, optim)["torch_adam"] is True


def test_deterministic_switch():
    from trainer.run import set_determinism

    try:
        set_determinism(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        set_determinism(False)
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        set_determinism(False)
        torch.backends.cudnn.benchmark = False


def test_starting_compiles_nothing(tmp_path):
    """Joining the process group and training a step build no DeepSpeed op (DeepSpeed's CPU backend would
    JIT-compile a shared-memory all-reduce into TORCH_EXTENSIONS_DIR, and a build killed midway leaves a
    lock every later run waits on)."""
    import subprocess
    import sys

    from conftest import cli_env

    script = ("from trainer.config import OptimConfig\n"
              "from trainer.runtime.engines import build_ds_config, init_distributed, make_engine\n"
              "from trainer.method.models import build_toy_unet\n"
              "init_distributed()\n"
              f"make_engine(build_toy_unet(), build_ds_config('{ROOT}/ds_configs/zero2_cpu.json', 2, 1, 1, OptimConfig(), 't'))\n")
    extensions = tmp_path / "torch_extensions"
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=cli_env(TORCH_EXTENSIONS_DIR=str(extensions)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not extensions.exists() or not any(extensions.rglob("*")), sorted(extensions.rglob("*"))


@pytest.mark.parametrize("name, dtype", [("zero2_cpu.json", torch.bfloat16), ("zero2_cpu_fp32.json", torch.float32),
                                         ("zero2_gpu.json", torch.bfloat16), ("zero2_gpu_offload.json", torch.bfloat16)])
def test_frozen_networks_run_in_the_engines_dtype(name, dtype):
    """The teacher follows the DeepSpeed JSON's precision: an fp32 recipe on a CPU without bf16 units would
    otherwise run its teacher ~30x slower than the student, and distil a teacher rounded to bf16."""
    from pathlib import Path
    from trainer.method.phases import PhaseStart

    start = PhaseStart(cfg=None, info=None, name="t", key="t", phase=None, student_dir=Path("."), student_pred="",
                       micro_batch=1, accumulation=1, deepspeed=str(ROOT / "ds_configs" / name),
                       gradient_checkpointing=False)
    source, other = build_toy_unet(seed=0), build_toy_unet(seed=1)
    copy_of_source = start.frozen(source, student_source=source)
    assert copy_of_source is not source and next(source.parameters()).dtype == torch.float32
    for frozen in (copy_of_source, start.frozen(other, student_source=source)):
        assert {p.dtype for p in frozen.parameters()} == {dtype}
        assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    # the copy shares no storage with the module the student trains: its updates leave the copy alone
    before = [p.detach().clone() for p in copy_of_source.parameters()]
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, copy_of_source.parameters()))


def test_compute_dtype_reads_the_precision_sections():
    from trainer.runtime.engines import compute_dtype

    assert compute_dtype({}) == torch.float32
    assert compute_dtype({"bf16": {"enabled": False}}) == torch.float32
    assert compute_dtype({"bfloat16": {"enabled": True}}) == torch.bfloat16
    assert compute_dtype({"fp16": {"enabled": True}}) == torch.float16
