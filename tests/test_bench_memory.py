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
from trainer.method.discriminator import discriminator_from_unet  # noqa: E402
from trainer.method.lora import add_lora, lora_state_dict  # noqa: E402
from trainer.method.models import build_toy_unet  # noqa: E402

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


@pytest.mark.parametrize("accum", ["bf16", "fp32"])
def test_zero2_partitioned_terms_scale_as_one_over_world_size(accum):
    zero = memory.ZeroSettings(reduce_bucket=int(2e8), overlap_comm=True, grad_accum_dtype=accum, comm_dtype=accum)
    total, trainable = 2_000_000_000, 1_000_000_000
    for offload in (False, True):
        engines = {n: memory.zero2_engine(total, trainable, n, zero, offload, accumulates=True) for n in (1, 8, 64)}
        for n, e in engines.items():
            assert e.weights == engines[1].weights == 2 * total  # ZeRO-2 never partitions weights
            assert e.buckets == engines[1].buckets == 2 * 2 * 2e8  # bf16, double-buffered: not partitioned
            assert e.comm == engines[1].comm
            for term in ("grads", "optimizer", "cpu", "step_transient"):
                assert getattr(e, term) * n == pytest.approx(getattr(engines[1], term))
        one = engines[1]
        if offload:
            assert one.optimizer == one.step_transient == 0
        else:
            assert one.optimizer == 12 * trainable and one.cpu == 0
        if accum == "bf16":  # DeepSpeed's default: a bf16 partition, flattened and cast to fp32 at the step
            assert one.comm == 2 * 2e8  # the flat bucket copy, reduced as it is
            if offload:  # gradients go to the CPU as they are reduced; a bf16 accumulator there
                assert one.grads == 0 and one.cpu == 20 * trainable
            else:
                assert one.grads == 2 * trainable and one.step_transient == 6 * trainable


def test_fp32_gradient_partition_and_reduction():
    """grad_accum_dtype fp32: DeepSpeed 0.19 sums each reduced bucket into an fp32 partition (on the GPU, with
    offload too) that Adam reads in place; communication_data_type fp32: the bf16 bucket is all-reduced as
    an fp32 copy. Ignoring either would leave these terms at their bf16 values."""
    bf16 = memory.ZeroSettings(reduce_bucket=int(2e8), overlap_comm=True)
    fp32 = memory.ZeroSettings(reduce_bucket=int(2e8), overlap_comm=True, grad_accum_dtype="fp32", comm_dtype="fp32")
    total = trainable = 1_000_000_000
    for offload in (False, True):
        new, old = (memory.zero2_engine(total, trainable, 8, z, offload, accumulates=True) for z in (fp32, bf16))
        assert new.grads == 4 * trainable / 8 and new.step_transient == 0
        assert new.buckets == old.buckets == 2 * 2 * 2e8  # ZeRO-2 stages gradients in bf16 either way
        assert new.comm == (2 + 4) * 2e8 and old.comm == 2 * 2e8
        assert new.cpu == (18 * trainable / 8 if offload else 0)  # no CPU accumulator: the fp32 partition is it
    with_fp32 = memory.zero2_engine(total, trainable, 1, fp32, offload=False)
    assert with_fp32.gpu_static == (2 + 4 + 12) * trainable  # bf16 weights, fp32 gradients, fp32 master + Adam
    comm_only = memory.ZeroSettings(reduce_bucket=int(2e8), overlap_comm=False, comm_dtype="fp32")
    assert memory.zero2_engine(total, trainable, 8, comm_only, offload=False).comm == (2 + 4) * 2e8


def test_zero_settings_follow_the_deepspeed_json(tmp_path):
    for name in ("zero2_gpu.json", "zero2_gpu_offload.json"):  # what the GPU recipes run
        zero = memory.ZeroSettings.from_ds_json(ROOT / "ds_configs" / name)
        assert (zero.model_dtype, zero.grad_accum_dtype, zero.comm_dtype) == ("bf16", "fp32", "fp32")
        assert zero.fp32_partition and zero.reduce_bucket == int(2e8) and zero.overlap_comm
    ds = json.loads((ROOT / "ds_configs" / "zero2_gpu.json").read_text())

    def write(settings: dict):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(settings))
        return path

    plain = {k: v for k, v in ds.items() if k not in ("data_types", "communication_data_type")}
    zero = memory.ZeroSettings.from_ds_json(write(plain))  # absent: DeepSpeed uses the model dtype for both
    assert (zero.grad_accum_dtype, zero.comm_dtype) == ("bf16", "bf16") and not zero.fp32_partition
    zero = memory.ZeroSettings.from_ds_json(write({**plain, "data_types": {"grad_accum_dtype": "float32"}}))
    assert (zero.grad_accum_dtype, zero.comm_dtype) == ("fp32", "bf16")  # DeepSpeed's aliases
    with pytest.raises(SystemExit, match="communication_data_type"):
        memory.ZeroSettings.from_ds_json(write({**plain, "communication_data_type": "fp8"}))
    with pytest.raises(SystemExit, match="bf16"):
        memory.ZeroSettings.from_ds_json(write({**plain, "bf16": {"enabled": False}}))


def test_head_width_reaches_the_discriminator():
    """--head-channels (or the recipe's disc.head_channels) builds the trainer's D at that width."""
    real = build_toy_unet()
    models = memory.MetaModels.build(TINY, head_blocks=None, head_channels=96)
    counts = models.counts()
    assert models.head_shape()[0] == 96
    for form in ("cond", "uncond"):
        real_d = discriminator_from_unet(real, conditional=form == "cond", head_channels=96)
        assert counts.disc[form] == sum(p.numel() for p in real_d.parameters())
        assert counts.disc_head[form] == sum(p.numel() for p in real_d.head.parameters())
    default = memory.MetaModels.build(TINY, head_blocks=None).counts()
    assert counts.disc_head["cond"] > default.disc_head["cond"]  # 96 > the toy's mid width


def test_disc_head_settings_come_from_the_recipe():
    sdxl, tiny = memory.PRESETS["sdxl"], TINY
    cfg = load_config(ROOT / "configs/sdxl.yaml", check_paths=False)
    assert memory.disc_head(cfg, sdxl) == (3, None)  # null: the mid block's width
    wide = load_config(ROOT / "configs/sdxl.yaml", ["stages.1.disc.head_channels=2560"], check_paths=False)
    assert memory.disc_head(wide, sdxl) == (3, 2560)
    assert memory.disc_head(wide, sdxl, head_channels=640) == (3, 640)  # --head-channels wins
    assert memory.disc_head(wide, tiny) == (None, None)  # sized for SDXL: the toy keeps its defaults
    assert memory.disc_head(cfg, tiny, head_channels=96) == (None, 96)


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
    # The recipe's GPU JSON accumulates and reduces in fp32: the fp32 gradient partition is static.
    assert (report["zero"]["grad_accum_dtype"], report["zero"]["comm_dtype"]) == ("fp32", "fp32")
    full_1gpu = next(r for r in report["rows"] if r["phase"] == "stage1_mse" and r["world_size"] == 1
                     and not r["offload"])
    assert full_1gpu["student_gib"] * memory.GIB == pytest.approx(18 * report["params"]["student"])


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
    # configs/sdxl.yaml's disc.head_channels is null: SDXL's mid width, 1280, for both forms; the conditional
    # head only adds the 1x1 conv that mixes its 2 x 1280 maps down (the old 2560-wide head: ~315 M).
    assert report["disc_head"] == {"channels": 1280, "blocks": 3}
    heads = report["params"]["disc_head"]
    assert heads["cond"] - heads["uncond"] == 2560 * 1280 + 1280 and heads["cond"] < 100_000_000
    assert report["params"]["disc"]["cond"] - heads["cond"] == report["params"]["disc"]["uncond"] - heads["uncond"]
    assert "global_batch" in stdout.lower() or "Global batch" in stdout
