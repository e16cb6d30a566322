"""bench/memory.py: the meta-device memory model (parameter counts, activation measurement, ZeRO-2 terms,
the recipe's global batch check, and the SDXL report end to end)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, cli_env

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import memory  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.discriminator import discriminator_from_unet  # noqa: E402
from trainer.lora import add_lora, lora_state_dict  # noqa: E402
from trainer.models import build_toy_unet  # noqa: E402

TINY = memory.PRESETS["tiny"]
SDXL_UNET_PARAMS = 2.567e9  # stabilityai/stable-diffusion-xl-base-1.0's UNet


@pytest.fixture(scope="module", autouse=True)
def sdxl_run(tmp_path_factory):
    """The SDXL report in a subprocess, started before the toy tests so that it runs alongside them (it
    takes ~15 s, most of the file's time); test_sdxl_report waits for it."""
    out = tmp_path_factory.mktemp("memory") / "sdxl.json"
    proc = subprocess.Popen([sys.executable, "bench/memory.py", "--preset", "sdxl", "--json", str(out)], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def tiny_models():
    return memory.MetaModels.build(TINY, head_blocks=None)


def test_tiny_param_counts_equal_the_real_modules(tiny_models):
    real = build_toy_unet()
    counts = tiny_models.counts()
    assert counts.student == sum(p.numel() for p in real.parameters())
    for form in ("cond", "uncond"):
        real_d = discriminator_from_unet(real, conditional=form == "cond")
        assert counts.disc[form] == sum(p.numel() for p in real_d.parameters())


def test_lora_count_equals_what_peft_reports_on_the_real_toy(tiny_models):
    real = add_lora(build_toy_unet(), rank=TINY.lora_rank)
    peft_count = sum(t.numel() for t in lora_state_dict(real).values())  # peft's own adapter state dict
    assert tiny_models.counts().lora == peft_count > 0


def test_checkpointing_leaves_fewer_saved_bytes(tiny_models):
    with_ckpt = memory.student_saved(tiny_models.unet, TINY, 4, checkpointing=True)
    without = memory.student_saved(tiny_models.unet, TINY, 4, checkpointing=False)
    assert 0 < with_ckpt.saved < without.saved
    assert 0 < with_ckpt.block < without.saved  # one block's recompute is part of the whole
    assert without.block == 0
    disc = tiny_models.discs["cond"]
    d_with = memory.disc_step_saved(disc, TINY, 4, checkpointing=True)
    d_without = memory.disc_step_saved(disc, TINY, 4, checkpointing=False)
    assert 0 < d_with.saved < d_without.saved


def test_activations_are_proportional_to_the_micro_batch(tiny_models):
    measure = lambda b: memory.measure_activations(tiny_models, TINY, b, student_ckpt=True, disc_ckpt=True,
                                                   disc_forms=("cond",))
    one = measure(1)
    assert measure(3) == one.scaled(3)  # exactly: no term has a batch-independent part
    assert one.disc_g_step["cond"] < one.disc_step["cond"]  # one forward, D frozen vs two with D trainable


def test_flash_stand_in_saves_what_the_flash_kernel_saves():
    q = torch.empty(2, 4, 64, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    kv = torch.empty(2, 4, 8, 16, device="meta", dtype=torch.bfloat16)
    counter = memory.SavedTensorBytes()
    with memory.flash_attention_on_meta(), counter.hooks():
        out = torch.nn.functional.scaled_dot_product_attention(q, kv, kv)
    assert out.shape == (2, 4, 64, 16)
    # q, k (= v, one tensor), the output, and an fp32 logsumexp per query: no 64 x 8 probabilities.
    assert counter.bytes == 2 * (q.numel() + kv.numel() + out.numel()) + 4 * 2 * 4 * 64
    assert torch.nn.functional.scaled_dot_product_attention.__module__ != memory.__name__  # restored


def test_live_intermediates_follow_frees():
    mib = 2 ** 20
    x = torch.empty(mib, device="meta", dtype=torch.uint8)
    with torch.no_grad(), memory.LiveIntermediates() as live:
        a = x + 1  # 1 MiB
        b = a * 2  # 2 MiB live
        del a
        c = b.view(-1)  # a view: no new memory
        d = c + 1  # 2 MiB live again (b and d)
        del b, c, d
    assert live.peak == 2 * mib and live.largest == mib and live.live == 0


def test_zero2_partitioned_terms_scale_as_one_over_world_size():
    zero = memory.ZeroSettings(reduce_bucket=int(2e8), overlap_comm=True)
    total, trainable = 2_000_000_000, 1_000_000_000
    for offload in (False, True):
        engines = {n: memory.zero2_engine(total, trainable, n, zero, offload, accumulates=True) for n in (1, 8, 64)}
        for n, e in engines.items():
            assert e.weights == engines[1].weights == 2 * total  # ZeRO-2 never partitions weights
            assert e.buckets == engines[1].buckets == 2 * 2 * 2e8
            for term in ("grads", "optimizer", "cpu", "step_transient"):
                assert getattr(e, term) * n == pytest.approx(getattr(engines[1], term))
        assert engines[1].grads == 2 * trainable
        if offload:
            assert engines[1].optimizer == engines[1].step_transient == 0 and engines[1].cpu == 22 * trainable
        else:
            assert engines[1].optimizer == 12 * trainable and engines[1].cpu == 0


def test_global_batch_check_flags_a_wrong_recipe():
    good = memory.global_batch_rows(load_config(ROOT / "configs/sdxl.yaml", check_paths=False))
    assert good and all(r["ok"] and r["global_batch"] == 512 for r in good)
    bad = memory.global_batch_rows(load_config(ROOT / "configs/sdxl.yaml", ["stages.0.global_batch=256"],
                                               check_paths=False))
    assert [r["world_size"] for r in bad if not r["ok"]] == [8, 64]


def test_tiny_main_writes_json_and_compares(tmp_path, capsys):
    peaks = tmp_path / "peaks.json"
    peaks.write_text(json.dumps([  # as bench/step.py writes them, plus rows that must be skipped
        {"preset": "tiny", "mode": "lora", "objective": "adv", "micro_batch": 4, "world_size": 1, "offload": False,
         "peak_gib": 0.1},
        {"preset": "tiny", "mode": "full", "objective": "mse", "cfg_scale": 6.0, "micro_batch": 4, "offload": True,
         "peak_gib": 0.05},
        {"preset": "tiny", "mode": "full", "micro_batch": 4, "device": "meta"},  # no peak: a FLOP row
        {"preset": "sdxl", "mode": "full", "micro_batch": 1, "world_size": 8, "offload": True, "peak_gib": 30.0}]))
    out = tmp_path / "tiny.json"
    assert memory.main(["--preset", "tiny", "--micro-batch", "4", "--json", str(out), "--compare", str(peaks)]) == 0
    report = json.loads(out.read_text())
    assert [(c["preset"], c["phase"]) for c in report["compare"]] == [("tiny", "adv_lora"), ("tiny", "stage1_mse")]
    assert report["compare"][0]["ratio"] == pytest.approx(0.1 / report["compare"][0]["modelled_gib"])
    assert {r["micro_batch"] for r in report["rows"]} == {4}
    assert "Measured vs modelled" in capsys.readouterr().out


def test_sdxl_report(sdxl_run):
    proc, out = sdxl_run
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert report["params"]["student"] == pytest.approx(SDXL_UNET_PARAMS, rel=1e-3)
    checked = {(r["stage"], r["world_size"]): r for r in report["global_batch"]}
    assert {w for _, w in checked} == {8, 64}
    assert all(r["ok"] and r["micro_batch"] * r["accumulation"] * r["world_size"] == 512 for r in checked.values())
    acts = report["activations_bytes"]
    assert acts["student"] < acts["student_no_ckpt"]
    assert {(r["phase"], r["world_size"], r["offload"]) for r in report["rows"]} == {
        (p, w, o) for p in ("stage1_mse", "adv_lora", "adv_full") for w in (1, 8, 64) for o in (False, True)}
    assert "global_batch" in stdout.lower() or "Global batch" in stdout
