"""The discriminator: shapes on the toy and on SDXL's real config (meta device), the backbone equals the
UNet's encoder path, gradients reach the input and every parameter, the losses, and a D that can learn."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel

from trainer.method.discriminator import (Discriminator, adaptive_head_blocks, d_accuracy, d_loss,
                                   discriminator_from_unet, g_loss)
from trainer.testing import make_tiny_sd15_folder, make_tiny_sdxl_folder
from trainer.method.models import TOY_TEXT_DIM, Conditioning, build_toy_unet, load_unet

B = 2


def toy_cond(batch: int = B, seed: int = 0, text_dim: int = TOY_TEXT_DIM, pooled_dim: int | None = TOY_TEXT_DIM,
             tokens: int = 5) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    pooled = None if pooled_dim is None else torch.randn(batch, pooled_dim, generator=g)
    time_ids = None if pooled_dim is None else torch.tensor([[32.0, 32, 0, 0, 32, 32]]).repeat(batch, 1)
    return Conditioning(torch.randn(batch, tokens, text_dim, generator=g), pooled, time_ids)


def unet_mid_output(unet: UNet2DConditionModel, x, t, cond: Conditioning) -> torch.Tensor:
    """The UNet's own mid-block output, caught by a forward hook during a full forward."""
    caught = {}
    handle = unet.mid_block.register_forward_hook(lambda mod, args, out: caught.setdefault("mid", out))
    added = None if cond.pooled is None else {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added)
    handle.remove()
    return caught["mid"]


@pytest.fixture(scope="module")
def toy_unet() -> UNet2DConditionModel:
    return build_toy_unet()


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return load_unet(make_tiny_sdxl_folder(root / "sdxl")), load_unet(make_tiny_sd15_folder(root / "sd15"))


# --- shapes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("conditional", [False, True])
def test_toy_shapes_and_head_depth(toy_unet, conditional):
    d = discriminator_from_unet(toy_unet, conditional)
    assert d.mid_size == 4 and d.head_blocks == 1  # 16x16 latent, two downsamplers -> 4x4 -> one block
    x = torch.randn(B, 12, 16, 16)
    t = torch.tensor([999, 499])
    extra = (torch.randn(B, 12, 16, 16), torch.tensor([999, 999])) if conditional else ()
    logits = d(x, t, toy_cond(), *extra)
    assert logits.shape == (B,) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # Default head width: the mid block's (64) for both forms; the conditional head's 1x1 conv first mixes
    # the two concatenated maps (128 channels) down to it.
    if conditional:
        assert d.head[0].kernel_size == (1, 1) and (d.head[0].in_channels, d.head[0].out_channels) == (128, 64)
    else:
        assert d.head[0].kernel_size == (4, 4) and d.head[0].in_channels == 64
    assert d.head[-1].in_channels == 64


def test_head_depth_rule_and_width_rounding(toy_unet):
    assert [adaptive_head_blocks(s) for s in (2, 4, 8, 16, 32, 64)] == [1, 1, 1, 2, 3, 4]
    d = discriminator_from_unet(toy_unet, conditional=False, head_blocks=2, head_channels=40)
    # 40 rounds up to 64 for GroupNorm(32), which is the mid width already: no width change needed.
    assert d.head_blocks == 2 and d.head[0].kernel_size == (4, 4) and d.head[0].out_channels == 64
    # 70 rounds up to 96: a 1x1 conv changes the width first.
    d = Discriminator(toy_unet, conditional=False, head_channels=70)
    assert d.head[0].kernel_size == (1, 1) and d.head[0].out_channels == 96
    assert d(torch.randn(B, 12, 16, 16), torch.tensor([5, 5]), toy_cond()).shape == (B,)
    with pytest.raises(ValueError):
        Discriminator(toy_unet, conditional=False, head_blocks=3)  # 4x4 -> 2 -> 1 -> 0


def sdxl_meta_unet() -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=2048,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )


@pytest.mark.parametrize("conditional", [False, True])
def test_sdxl_config_on_meta(conditional):
    d = discriminator_from_unet(sdxl_meta_unet(), conditional)
    assert d.mid_size == 32 and d.head_blocks == 3  # 1024 px -> 128x128 latent -> 32x32 mid map
    assert all(p.is_meta for p in d.parameters())
    meta = lambda *shape: torch.empty(*shape, device="meta")
    cond = Conditioning(meta(B, 77, 2048), meta(B, 1280), meta(B, 6))
    t = torch.tensor([999, 499], device="meta")
    extra = (meta(B, 4, 128, 128), t) if conditional else ()
    logits = d(meta(B, 4, 128, 128), t, cond, *extra)
    assert logits.shape == (B,) and logits.dtype == torch.float32


def test_tiny_sdxl_and_sd15_unets(tiny_folders):
    sdxl, sd15 = tiny_folders
    x = torch.randn(B, 4, 32, 32)
    t = torch.tensor([999, 10])
    for unet, cond in ((sdxl, toy_cond(text_dim=96, pooled_dim=32)), (sd15, toy_cond(text_dim=32, pooled_dim=None))):
        for conditional in (False, True):
            d = discriminator_from_unet(unet, conditional)
            assert d.head_blocks == 2  # 32x32 latent, one downsampler -> 16x16 -> two blocks
            extra = (torch.randn_like(x), t) if conditional else ()
            assert d(x, t, cond, *extra).shape == (B,)
    assert discriminator_from_unet(sd15, False).backbone.add_embedding is None


# --- the backbone is the UNet's encoder, and a copy -----------------------------------------------

def test_backbone_equals_unet_encoder_path(toy_unet, tiny_folders):
    x, t, cond = torch.randn(B, 12, 16, 16), torch.tensor([999, 3]), toy_cond()
    d = discriminator_from_unet(toy_unet, conditional=False)
    with torch.no_grad():
        torch.testing.assert_close(d.backbone(x, t, cond), unet_mid_output(toy_unet, x, t, cond), rtol=0, atol=0)
    sdxl, sd15 = tiny_folders
    x = torch.randn(B, 4, 32, 32)
    for unet, cond in ((sdxl, toy_cond(text_dim=96, pooled_dim=32)), (sd15, toy_cond(pooled_dim=None))):
        with torch.no_grad():
            torch.testing.assert_close(discriminator_from_unet(unet, False).backbone(x, t, cond),
                                       unet_mid_output(unet, x, t, cond), rtol=0, atol=0)


def test_backbone_is_an_independent_copy(toy_unet):
    unet = build_toy_unet(seed=1)
    d = discriminator_from_unet(unet, conditional=False)
    ours = {id(p) for p in d.parameters()} | {p.data_ptr() for p in d.parameters()}
    assert not ours & ({id(p) for p in unet.parameters()} | {p.data_ptr() for p in unet.parameters()})
    before = d.backbone.conv_in.weight.clone()
    with torch.no_grad():
        unet.conv_in.weight.add_(1.0)  # changing the UNet leaves D alone ...
    torch.testing.assert_close(d.backbone.conv_in.weight, before)
    unet_mid = unet.mid_block.resnets[0].conv1.weight.clone()
    with torch.no_grad():
        d.backbone.mid_block.resnets[0].conv1.weight.mul_(0)  # ... and changing D leaves the UNet alone
    torch.testing.assert_close(unet.mid_block.resnets[0].conv1.weight, unet_mid)


def test_conditional_form_is_two_backbone_passes(toy_unet):
    """The conditional head sees [mid(x_t, t), mid(x_next, t_next)] on channels: check against the
    backbone called on each input alone."""
    d = discriminator_from_unet(toy_unet, conditional=True)
    x_t, x_next = torch.randn(B, 12, 16, 16), torch.randn(B, 12, 16, 16)
    t, t_next, cond = torch.tensor([999, 749]), torch.tensor([749, 499]), toy_cond()
    with torch.no_grad():
        features = torch.cat([d.backbone(x_t, t, cond), d.backbone(x_next, t_next, cond)], dim=1)
        torch.testing.assert_close(d(x_next, t_next, cond, x_t, t), d.head(features), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        d(x_next, t_next, cond)  # the conditional form needs x_t and t


@pytest.mark.parametrize("conditional", [False, True])
def test_stacked_candidates_equal_separate_calls(toy_unet, conditional):
    """Real and fake stacked in one call (the D step's; the conditional x_t branch runs once for both)
    give the logits of two separate calls."""
    d = discriminator_from_unet(toy_unet, conditional=conditional)
    x_t, real, fake = (torch.randn(B, 12, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    t, t_next, cond = torch.tensor([999, 749]), torch.tensor([749, 499]), toy_cond()
    extra = (x_t, t) if conditional else ()
    with torch.no_grad():
        stacked = d(torch.cat([real, fake]), torch.cat([t_next, t_next]), cond, *extra)
        separate = torch.cat([d(real, t_next, cond, *extra), d(fake, t_next, cond, *extra)])
    torch.testing.assert_close(stacked, separate, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple"):
        d(torch.randn(3, 12, 16, 16), torch.tensor([1, 2, 3]), cond, *extra)


# --- gradients, checkpointing, dtype, t = -1 ---------------------------------------------------------

@pytest.mark.parametrize("conditional", [False, True])
def test_gradients_reach_input_and_every_parameter(toy_unet, conditional):
    d = discriminator_from_unet(toy_unet, conditional)
    x_next = torch.randn(B, 12, 16, 16, requires_grad=True)
    extra = (torch.randn(B, 12, 16, 16), torch.tensor([999, 999])) if conditional else ()
    d(x_next, torch.tensor([749, 249]), toy_cond(), *extra).sum().backward()
    assert x_next.grad is not None and x_next.grad.abs().sum() > 0  # the student learns through D
    missing = [n for n, p in d.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_gradient_checkpointing_same_outputs_and_grads(toy_unet, monkeypatch):
    import trainer.method.discriminator as module
    calls = []
    real_checkpoint = module.checkpoint
    monkeypatch.setattr(module, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))

    def run(d):
        x = torch.randn(B, 12, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
        logits = d(x, torch.tensor([999, 10]), toy_cond(), x.detach() * 0.5, torch.tensor([999, 999]))
        logits.sum().backward()
        return logits.detach(), x.grad, {n: p.grad for n, p in d.named_parameters()}

    plain, ckpt = discriminator_from_unet(toy_unet, True), discriminator_from_unet(toy_unet, True)
    ckpt.enable_gradient_checkpointing()
    flags = [m.gradient_checkpointing for m in ckpt.backbone.modules() if hasattr(m, "gradient_checkpointing")]
    assert flags and all(flags)
    (l1, gx1, g1), (l2, gx2, g2) = run(plain), run(ckpt)
    assert calls  # the blocks really went through torch.utils.checkpoint
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(gx1, gx2)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], msg=name)


def test_bf16_module_returns_float32_logits(toy_unet):
    d = discriminator_from_unet(toy_unet, conditional=True).to(torch.bfloat16)
    logits = d(torch.randn(B, 12, 16, 16), torch.tensor([499, -1]), toy_cond(),  # float32 inputs
               torch.randn(B, 12, 16, 16), torch.tensor([999, 249]))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_t_next_minus_one_is_the_clean_timestep(toy_unet):
    d = discriminator_from_unet(toy_unet, conditional=False)
    x, cond = torch.randn(B, 12, 16, 16), toy_cond()
    with torch.no_grad():
        torch.testing.assert_close(d(x, torch.tensor([-1, -1]), cond), d(x, torch.tensor([0, 0]), cond))


# --- losses -------------------------------------------------------------------------------------------

def test_losses_on_known_logits():
    zero = torch.zeros(4)
    assert d_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert g_loss(zero).item() == pytest.approx(math.log(2))
    # D right with margin 2: real 2, fake -2 -> 2 * softplus(-2); the student's loss then is softplus(2).
    assert d_loss(torch.full((3,), 2.0), torch.full((3,), -2.0)).item() == pytest.approx(2 * math.log1p(math.exp(-2)))
    assert g_loss(torch.full((3,), -2.0)).item() == pytest.approx(math.log1p(math.exp(2)))
    huge = torch.tensor([1e4, -1e4, 80.0, -80.0], requires_grad=True)
    for loss in (d_loss(huge, -huge), d_loss(-huge, huge), g_loss(huge), g_loss(-huge)):
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, huge)
        assert torch.isfinite(grad).all()
    assert d_loss(-huge[:1], huge[:1]).item() == pytest.approx(2e4)  # linear, not inf, when D is very wrong


def test_accuracy_on_known_logits():
    acc_real, acc_fake = d_accuracy(torch.tensor([3.0, 1.0, -1.0, 0.5]), torch.tensor([-2.0, 4.0, 1.0, 0.0]))
    assert acc_real.item() == pytest.approx(0.75)  # three of four real logits > 0
    assert acc_fake.item() == pytest.approx(0.375)  # one fake < 0, a tie counts one half: 1.5 / 4
    blind = torch.zeros(4)
    assert [a.item() for a in d_accuracy(blind, blind)] == [0.5, 0.5]


# --- D can learn --------------------------------------------------------------------------------------

def test_unconditional_toy_d_learns_to_separate_two_batches(toy_unet):
    """Protects against a D that cannot learn (the first thing to check of a GAN: D can overfit a fixed batch)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    real = torch.randn(8, 12, 16, 16, generator=g) * 0.5
    fake = real + 0.3 * torch.randn(real.shape, generator=g)
    t, cond = torch.full((8,), 10), toy_cond(batch=8)
    d = discriminator_from_unet(toy_unet, conditional=False)
    opt = torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.0, 0.99))
    for step in range(60):
        logits = d(torch.cat([real, fake]), torch.cat([t, t]), Conditioning.cat(cond, cond))
        loss = d_loss(*logits.chunk(2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc_real, acc_fake = d_accuracy(*logits.detach().chunk(2))
        if step >= 10 and min(acc_real, acc_fake) > 0.9:
            break
    with torch.no_grad():
        acc_real, acc_fake = d_accuracy(d(real, t, cond), d(fake, t, cond))
    assert acc_real > 0.9 and acc_fake > 0.9, (step, loss.item(), acc_real, acc_fake)
    assert loss.item() < 2 * math.log(2)


def test_d_reads_only_the_encoder_from_disk(tmp_path):
    """D's backbone needs the encoder path alone: load_unet(only=ENCODER_PARTS) reads just those weights (the
    decoder stays unread on the meta device) and D built from it equals D built from the whole UNet."""
    from trainer.method.discriminator import ENCODER_PARTS
    from trainer.method.models import load_unet

    unet = build_toy_unet(seed=2)
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    part = load_unet(tmp_path, only=ENCODER_PARTS)
    assert part.conv_out.weight.is_meta and all(p.is_meta for p in part.up_blocks.parameters())
    assert not any(p.is_meta for p in part.down_blocks.parameters())
    from_part = discriminator_from_unet(part, conditional=True, seed=1).state_dict()
    from_whole = discriminator_from_unet(unet, conditional=True, seed=1).state_dict()
    assert from_part.keys() == from_whole.keys()
    assert all(torch.equal(from_part[k], from_whole[k]) for k in from_whole)
