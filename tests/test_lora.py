"""LoRA on the UNet: which modules, frozen base, merge, and the diffusers file format (trainer.method.lora)."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from torch import nn

from trainer.testing import make_tiny_sdxl_folder
from trainer.method.lora import (add_lora, count_trainable, load_lora_into, lora_state_dict, lora_target_modules,
                          merge_lora, save_lora)
from trainer.method.models import Conditioning, build_toy_unet, unet_forward

EXCLUDED = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
            "add_embedding.linear_1", "add_embedding.linear_2"]


def toy_inputs(batch: int = 2, seed: int = 0, channels: int = 12, size: int = 16, text_dim: int = 32,
               pooled_dim: int = 32) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.tensor([999, 250][:batch])
    cond = Conditioning(torch.randn(batch, 16, text_dim, generator=g), torch.randn(batch, pooled_dim, generator=g),
                        torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(batch, 1))
    return x, t, cond


@torch.no_grad()
def run(unet: nn.Module, inputs) -> torch.Tensor:
    return unet_forward(unet, *inputs, dtype=torch.float32)


@torch.no_grad()
def perturb_lora(unet: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """lora_B starts at zero (no effect); give it small fixed random values."""
    g = torch.Generator().manual_seed(seed)
    for name, param in sorted(unet.named_parameters()):
        if ".lora_B." in name:
            param.copy_(torch.randn(param.shape, generator=g) * std)


def lora_scalings(unet: nn.Module) -> set[float]:
    return {m.scaling["default"] for m in unet.modules() if hasattr(m, "scaling") and "default" in m.scaling}


def test_targets_every_conv_and_linear_but_io_convs_and_shared_embeddings():
    unet = build_toy_unet()
    targets = lora_target_modules(unet)
    layers = [name for name, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name in EXCLUDED:
        assert name in layers and name not in targets
    assert targets == [name for name in layers if name not in EXCLUDED]
    # the kinds LCM-LoRA covers: attention, feed-forward, resnet convs and time projections, resampling
    for suffix in ("attn2.to_k", "ff.net.2", "resnets.0.conv1", "resnets.0.time_emb_proj", "downsamplers.0.conv",
                   "upsamplers.0.conv", "conv_shortcut", "proj_in"):
        assert any(name.endswith(suffix) for name in targets), suffix


def test_add_lora_trains_only_lora_and_starts_at_the_base():
    base = build_toy_unet()
    inputs = toy_inputs()
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    unet = add_lora(copy.deepcopy(base), rank=4, init_seed=7)
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's RNG stream is untouched

    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    lora_params = {n for n, _ in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert trainable == lora_params and len(lora_params) == 2 * len(lora_target_modules(base))
    n_lora = sum(p.numel() for n, p in unet.named_parameters() if n in lora_params)
    n_base = sum(p.numel() for p in base.parameters())
    assert count_trainable(unet) == (n_lora, n_lora + n_base)
    assert count_trainable(base) == (n_base, n_base)

    # lora_A comes from init_seed alone
    again = add_lora(copy.deepcopy(base), rank=4, init_seed=7)
    other = add_lora(copy.deepcopy(base), rank=4, init_seed=8)
    key = next(k for k in lora_state_dict(unet) if ".lora_A." in k)
    assert torch.equal(lora_state_dict(unet)[key], lora_state_dict(again)[key])
    assert not torch.equal(lora_state_dict(unet)[key], lora_state_dict(other)[key])

    assert lora_scalings(unet) == {1.0}  # alpha defaults to rank
    torch.testing.assert_close(run(unet, inputs), run(base, inputs), atol=0, rtol=0)
    perturb_lora(unet)
    assert (run(unet, inputs) - run(base, inputs)).abs().max() > 1e-2


@pytest.mark.parametrize("rank,alpha", [(4, None), (4, 16)])
def test_merge_equals_unmerged_and_reloads_as_a_plain_unet(tmp_path, rank, alpha):
    base = build_toy_unet()
    inputs = toy_inputs()
    unet = add_lora(copy.deepcopy(base), rank=rank, alpha=alpha)
    assert lora_scalings(unet) == {(alpha or rank) / rank}
    perturb_lora(unet)
    with_lora = run(unet, inputs)

    merged = merge_lora(unet)
    torch.testing.assert_close(run(merged, inputs), with_lora, atol=1e-5, rtol=1e-5)
    assert list(merged.state_dict()) == list(base.state_dict())
    assert count_trainable(merged) == count_trainable(base)  # the full-UNet phase trains everything

    merged.save_pretrained(tmp_path / "unet", safe_serialization=True)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    torch.testing.assert_close(run(reloaded, inputs), with_lora, atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip_keeps_rank_and_alpha(tmp_path):
    base = build_toy_unet()
    inputs = toy_inputs()
    unet = add_lora(copy.deepcopy(base), rank=4, alpha=16)
    perturb_lora(unet, std=0.05)
    expected = run(unet, inputs)
    file = save_lora(unet, tmp_path / "stage1.safetensors")
    assert file == tmp_path / "stage1.safetensors" and file.is_file()

    # a fresh UNet: the file's metadata gives rank and alpha (without it diffusers would use alpha = rank)
    fresh = load_lora_into(copy.deepcopy(base), file)
    assert lora_scalings(fresh) == {4.0}
    torch.testing.assert_close(run(fresh, inputs), expected, atol=1e-6, rtol=1e-6)
    assert count_trainable(fresh) == count_trainable(unet)

    # resuming: the run's add_lora, then its weights (from the file or from a state dict)
    for source in (file, lora_state_dict(unet)):
        resumed = load_lora_into(add_lora(copy.deepcopy(base), rank=4, alpha=16), source)
        torch.testing.assert_close(run(resumed, inputs), expected, atol=1e-6, rtol=1e-6)

    with pytest.raises(ValueError, match="alpha"):
        load_lora_into(add_lora(copy.deepcopy(base), rank=4, alpha=4), file)
    with pytest.raises(ValueError, match="add_lora"):
        load_lora_into(copy.deepcopy(base), lora_state_dict(unet))


def test_diffusers_pipeline_loads_the_saved_lora(tmp_path):
    folder = make_tiny_sdxl_folder(tmp_path / "tiny-sdxl")
    plain = UNet2DConditionModel.from_pretrained(folder / "unet")
    unet = add_lora(copy.deepcopy(plain), rank=4, alpha=8)
    perturb_lora(unet, std=0.05)
    saved = save_lora(unet, tmp_path / "lora")  # a folder: load_lora_weights finds the file by its default name
    assert saved == tmp_path / "lora" / "pytorch_lora_weights.safetensors"

    inputs = toy_inputs(channels=4, size=16, text_dim=96, pooled_dim=32)
    ours = run(unet, inputs)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    for source in (tmp_path / "lora", saved):  # the folder, then the file itself
        pipe.unload_lora_weights()
        pipe.load_lora_weights(source)
        torch.testing.assert_close(run(pipe.unet, inputs), ours, atol=1e-5, rtol=1e-5)
    assert (ours - run(plain, inputs)).abs().max() > 1e-3

    image = pipe("a red circle", num_inference_steps=1, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


def test_a_lora_file_has_the_same_bytes_in_every_process(tmp_path):
    """The metadata's target_modules (a set in peft) is written sorted: two processes with different string
    hashing write byte-identical files for the same LoRA."""
    import hashlib
    import os
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from trainer.method.lora import add_lora, save_lora\n"
        "from trainer.method.models import build_toy_unet\n"
        "save_lora(add_lora(build_toy_unet(seed=0), rank=4, init_seed=0), sys.argv[1])\n")
    digests = []
    for seed in ("1", "2"):
        out = tmp_path / f"lora{seed}.safetensors"
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, timeout=300,
                       env={**os.environ, "PYTHONHASHSEED": seed})
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


@torch.no_grad()
def test_an_adapter_extracted_from_a_difference_reproduces_a_low_rank_target():
    """init_lora_from_difference: a target that differs from the base by rank <= r in every LoRA'd layer
    (convs included) is reproduced exactly by base + the extracted adapter; a full-rank difference is
    approximated, and the share it holds is reported."""
    from trainer.method.lora import init_lora_from_difference

    base = build_toy_unet(seed=0)
    target = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    for name in lora_target_modules(base):
        weight = target.get_submodule(name).weight
        out = weight.shape[0]
        rest = weight[0].numel()
        delta = torch.randn(out, 2, generator=g) @ torch.randn(2, rest, generator=g) * 0.01  # rank 2
        weight.add_(delta.reshape(weight.shape))
    student = add_lora(copy.deepcopy(base), rank=4, alpha=8)
    assert init_lora_from_difference(student, target) == pytest.approx(1.0)
    x, t, cond = toy_inputs()
    want = unet_forward(target, x, t, cond, torch.float32)
    got = unet_forward(student, x, t, cond, torch.float32)
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()))
    assert not torch.allclose(unet_forward(base, x, t, cond, torch.float32), want, atol=1e-3)

    noisy = copy.deepcopy(base)
    for name in lora_target_modules(base):
        noisy.get_submodule(name).weight.add_(torch.randn(noisy.get_submodule(name).weight.shape, generator=g) * 0.01)
    held = init_lora_from_difference(add_lora(copy.deepcopy(base), rank=1), noisy)
    assert 0 < held < 0.9
