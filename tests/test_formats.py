"""Deployment formats (trainer.formats): original-layout single-file checkpoints and kohya-layout LoRAs,
read back with diffusers' own loaders, offline, on tiny models (and key-level checks on the real SDXL /
SD 1.5 architectures, built on the meta device)."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from trainer import formats
from trainer.formats import FormatError
from trainer.method.lora import add_lora, lora_target_modules, merge_lora, save_lora
from trainer.testing import make_tiny_sd15_folder, make_tiny_sdxl_folder

PIPELINES = {"sdxl": StableDiffusionXLPipeline, "sd15": StableDiffusionPipeline}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    return {"sdxl": make_tiny_sdxl_folder(root / "sdxl", seed=1), "sd15": make_tiny_sd15_folder(root / "sd15", seed=2)}


@pytest.fixture(scope="module")
def single_files(folders, tmp_path_factory) -> dict[str, Path]:
    """float32 single files: the round trip is then exact."""
    root = tmp_path_factory.mktemp("single")
    return {family: formats.write_single_file(folder, root / f"{family}.safetensors", dtype=torch.float32)
            for family, folder in folders.items()}


def folder_weights(folder: Path, family: str) -> dict[str, dict[str, torch.Tensor]]:
    """The folder's weights as diffusers itself loads the pipeline."""
    pipe = PIPELINES[family].from_pretrained(folder, local_files_only=True)
    return {part: getattr(pipe, part).state_dict() for part in formats.PARTS[family]}


# ---------------------------------------------------------------------------------------------------
# single-file checkpoints


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_from_single_file_reads_back_every_weight(folders, single_files, family):
    file = single_files[family]
    with safe_open(str(file), "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
    prefixes = {"sdxl": ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                         "conditioner.embedders.1.model."),
                "sd15": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")}[family]
    assert all(k.startswith(prefixes) for k in keys)
    assert all(any(k.startswith(p) for k in keys) for p in prefixes)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys and "first_stage_model.encoder.conv_in.weight" in keys
    assert metadata["modelspec.architecture"] == formats.single_file_metadata(family)["modelspec.architecture"]

    # diffusers' own reader, offline: the local folder is the config, nothing is downloaded
    pipe = PIPELINES[family].from_single_file(str(file), config=str(folders[family]), local_files_only=True)
    want = folder_weights(folders[family], family)
    for part in formats.PARTS[family]:
        got = getattr(pipe, part).state_dict()
        assert set(got) == set(want[part]), part
        for k, v in want[part].items():
            assert not got[k].is_meta, f"{part}.{k} not loaded"
            assert got[k].dtype == torch.float32 and torch.equal(got[k], v), f"{part}.{k}"
    formats.verify_single_file(file, folders[family])  # the module's own check agrees


def test_export_folder_with_linked_parts(folders, tmp_path):
    """An export holds its own unet/ and links the base model's other parts: the folders are just read."""
    import shutil

    base, export = folders["sdxl"], tmp_path / "export"
    export.mkdir()
    for name in ("unet", "scheduler"):
        shutil.copytree(base / name, export / name)
    shutil.copy2(base / "model_index.json", export / "model_index.json")
    for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        (export / name).symlink_to((base / name).resolve())
    unet = UNet2DConditionModel.from_pretrained(export / "unet")
    with torch.no_grad():
        unet.conv_in.bias.add_(1.0)  # the trained UNet differs from the base's
    unet.save_pretrained(export / "unet")
    file = formats.write_single_file(export, tmp_path / "export.safetensors", dtype=torch.float32)
    formats.verify_single_file(file, export)
    with safe_open(str(file), "pt") as f:
        assert torch.equal(f.get_tensor("model.diffusion_model.input_blocks.0.0.bias"), unet.conv_in.bias)
    with pytest.raises(FormatError, match=r"export\.safetensors: .* reads unet with 1 weights unlike"):
        formats.verify_single_file(file, base)


def test_fp16_file_is_the_folder_rounded_to_fp16(folders, tmp_path):
    file = formats.write_single_file(folders["sdxl"], tmp_path / "sdxl16.safetensors")  # default dtype float16
    with safe_open(str(file), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    got = formats.load_with_diffusers(file, folders["sdxl"], "sdxl")
    want = folder_weights(folders["sdxl"], "sdxl")
    for part, weights in want.items():
        for k, v in weights.items():
            assert torch.equal(got[part][k].to(torch.float16), v.to(torch.float16)), f"{part}.{k}"
    formats.verify_single_file(file, folders["sdxl"])


def test_two_writes_are_byte_identical(folders, single_files, tmp_path):
    again = formats.write_single_file(folders["sdxl"], tmp_path / "again.safetensors", dtype=torch.float32)
    assert again.read_bytes() == single_files["sdxl"].read_bytes()
    half = [formats.write_single_file(folders["sd15"], tmp_path / f"sd15_{i}.safetensors") for i in range(2)]
    assert half[0].read_bytes() == half[1].read_bytes()
    header = json.loads(half[0].read_bytes()[8:8 + int.from_bytes(half[0].read_bytes()[:8], "little")])
    assert list(header) == ["__metadata__", *sorted(k for k in header if k != "__metadata__")]


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_mapping_both_ways_loses_no_key(folders, single_files, family):
    family_found, states, configs = formats.load_folder(folders[family])
    assert family_found == family
    entries = formats.plan({p: list(s) for p, s in states.items()}, configs, family)
    forward = formats.key_map(entries)
    every = {f"{p}.{k}" for p, s in states.items() for k in s}
    assert set(forward) == every  # every diffusers key maps ...
    with safe_open(str(single_files[family]), "pt") as f:
        assert sorted(set(forward.values())) == sorted(f.keys())  # ... into the file, which holds nothing else
        original = {k: f.get_tensor(k) for k in f.keys()}
    fused = [e for e in entries if e.op == "cat"]
    assert all(len(e.sources) == 3 for e in fused) and len(fused) == (4 if family == "sdxl" else 0)  # 2 layers x w/b
    # back: diffusers' converters give each diffusers key back from its original key, same tensor
    flat = {p: not any(k.startswith("text_model.") for k in s) for p, s in states.items() if p.startswith("text")}
    back = formats.from_original(original, configs, family, flat)
    for part, state in states.items():
        assert set(back[part]) == set(state), part
        assert all(torch.equal(back[part][k], v) for k, v in state.items()), part


def _real_configs(family: str) -> dict:
    vae = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4)
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            max_position_embeddings=77, vocab_size=49408, projection_dim=768)
    if family == "sd15":
        unet = dict(cross_attention_dim=768, attention_head_dim=8)  # the rest are UNet2DConditionModel's defaults
        return {"unet": unet, "vae": vae, "text_encoder": clip_l}
    unet = dict(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                block_out_channels=[320, 640, 1280], layers_per_block=2, transformer_layers_per_block=[1, 2, 10],
                attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)
    big_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                           max_position_embeddings=77, vocab_size=49408, projection_dim=1280)
    return {"unet": unet, "vae": vae, "text_encoder": clip_l, "text_encoder_2": big_g}


def _real_models(family: str) -> dict:
    """The real architectures, weights on the meta device (no memory, no download)."""
    cfg = _real_configs(family)
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**cfg["unet"]), "vae": AutoencoderKL(**cfg["vae"]),
                  "text_encoder": CLIPTextModel(cfg["text_encoder"])}
        if family == "sdxl":
            models["text_encoder_2"] = CLIPTextModelWithProjection(cfg["text_encoder_2"])
    return models


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_real_architecture_keys_map_and_come_back(family):
    models = _real_models(family)
    states = {p: {k: v for k, v in m.state_dict().items() if not k.endswith("position_ids")} for p, m in models.items()}
    configs = {p: (m.config.to_dict() if p.startswith("text") else dict(m.config)) for p, m in models.items()}
    original = formats.to_original(states, configs, family)  # raises unless diffusers' converters give it all back
    entries = formats.plan({p: list(s) for p, s in states.items()}, configs, family)
    flat = {p: not any(k.startswith("text_model.") for k in s) for p, s in states.items() if p.startswith("text")}
    back = formats.from_original(original, configs, family, flat)
    by_source = {s: e for e in entries for s in e.sources}
    for part, state in states.items():  # meta tensors carry no values: a plain copy must be the very same tensor
        for k, v in state.items():
            if by_source[f"{part}.{k}"].op == "copy":
                assert back[part][k] is v, f"{part}.{k}"
    # names every original-layout reader knows
    known = {"sdxl": ["model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
                      "model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.label_emb.0.0.weight",
                      "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight",
                      "model.diffusion_model.output_blocks.2.2.conv.weight",
                      "model.diffusion_model.output_blocks.5.2.conv.weight", "model.diffusion_model.out.2.weight",
                      "first_stage_model.decoder.up.3.upsample.conv.weight",
                      "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
                      "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                      "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
                      "conditioner.embedders.1.model.text_projection"],
             "sd15": ["model.diffusion_model.input_blocks.1.1.proj_in.weight",
                      "model.diffusion_model.output_blocks.2.1.conv.weight",
                      "model.diffusion_model.output_blocks.8.2.conv.weight",
                      "model.diffusion_model.middle_block.2.in_layers.2.weight",
                      "model.diffusion_model.time_embed.2.weight",
                      "first_stage_model.decoder.mid.attn_1.proj_out.weight",
                      "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"]}[family]
    assert set(known) <= set(original)
    if family == "sdxl":
        assert original["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert original["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)


def test_wrong_files_and_folders_give_one_clear_error(folders, single_files, tmp_path):
    # an SD 1.5 file checked against the SDXL folder
    with pytest.raises(FormatError, match=r"sd15\.safetensors is not .*sdxl.* lacks \d+ keys"):
        formats.verify_single_file(single_files["sd15"], folders["sdxl"])
    # an SD 1.5 folder read as SDXL, and the other way round
    with pytest.raises(FormatError, match=r"sd15.*lacks text_encoder_2/"):
        formats.diffusers_to_original(folders["sd15"], family="sdxl")
    with pytest.raises(FormatError, match=r"sdxl: read as sd15, but it is a sdxl folder"):
        formats.diffusers_to_original(folders["sdxl"], family="sd15")
    # a truncated file
    cut = tmp_path / "cut.safetensors"
    data = single_files["sdxl"].read_bytes()
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match=r"cut\.safetensors: not a readable safetensors file"):
        formats.verify_single_file(cut, folders["sdxl"])
    # a file with one tensor changed: from_single_file reads it, the weights differ
    tampered = tmp_path / "tampered.safetensors"
    with safe_open(str(single_files["sdxl"]), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state["model.diffusion_model.out.2.bias"] = state["model.diffusion_model.out.2.bias"] + 1
    formats._write_safetensors(state, tampered)
    with pytest.raises(FormatError, match=r"tampered\.safetensors: .* reads unet with 1 weights unlike .*conv_out\.bias"):
        formats.verify_single_file(tampered, folders["sdxl"])


# ---------------------------------------------------------------------------------------------------
# kohya LoRAs


def _lora_unet(folder: Path, rank: int = 4, alpha: float = 2.0):
    """A tiny LoRA'd UNet whose LoRA is not zero, and the same UNet merged; alpha != rank on purpose."""
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    add_lora(unet, rank=rank, alpha=alpha, init_seed=5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(unet.named_parameters()):
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    return unet


@pytest.fixture(scope="module")
def sdxl_lora(folders, tmp_path_factory):
    unet = _lora_unet(folders["sdxl"])
    file = save_lora(unet, tmp_path_factory.mktemp("lora") / "lora.safetensors")
    return file, merge_lora(unet)


@pytest.mark.parametrize("naming", ["original", "diffusers"])
def test_kohya_lora_loads_in_diffusers_as_the_merged_lora(folders, sdxl_lora, tmp_path, naming):
    lora_file, merged = sdxl_lora
    out = formats.lora_to_kohya(lora_file, tmp_path / "kohya.safetensors", family="sdxl", naming=naming)
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
        metadata = f.metadata()
    n_modules = len([k for k in keys if k.endswith(".lora_down.weight")])
    assert n_modules == len(lora_target_modules(UNet2DConditionModel.from_pretrained(folders["sdxl"], subfolder="unet")))
    assert len(keys) == 3 * n_modules and all(k.startswith("lora_unet_") for k in keys)
    assert alphas == {2.0} and metadata["ss_network_dim"] == "4" and metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    if naming == "original":
        assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys  # 1 layer per block
        assert "lora_unet_output_blocks_1_2_conv.lora_up.weight" in keys  # up_blocks.0's upsampler
    else:
        assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys

    pipe = StableDiffusionXLPipeline.from_pretrained(folders["sdxl"], local_files_only=True)
    base = copy.deepcopy(pipe.unet.state_dict())
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    got, want = pipe.unet.state_dict(), merged.state_dict()
    assert set(got) == set(want)
    changed = [k for k in want if not torch.equal(want[k], base[k])]
    assert len(changed) == n_modules  # every LoRA'd weight moved, ...
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)  # ... exactly as the project's merge


def test_sd15_kohya_lora_loads_in_diffusers(folders, tmp_path):
    unet = _lora_unet(folders["sd15"], rank=2, alpha=3.0)
    lora_file = save_lora(unet, tmp_path / "lora15.safetensors")
    merged = merge_lora(unet)
    out = formats.lora_to_kohya(lora_file, tmp_path / "kohya15.safetensors", family="sd15")
    with safe_open(str(out), "pt") as f:
        assert "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight" in f.keys()  # kohya's SD 1.x names
        assert f.metadata()["ss_base_model_version"] == "sd_v1"
    pipe = StableDiffusionPipeline.from_pretrained(folders["sd15"], local_files_only=True)
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    got = pipe.unet.state_dict()
    assert set(got) == set(merged.state_dict())
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)


def test_kohya_bytes_are_deterministic(sdxl_lora, tmp_path):
    files = [formats.lora_to_kohya(sdxl_lora[0], tmp_path / f"k{i}.safetensors", family="sdxl") for i in range(2)]
    assert files[0].read_bytes() == files[1].read_bytes()


def _diffusers_reads_kohya_modules(kohya: dict, layers_per_block: int) -> set[str]:
    """The UNet modules diffusers' kohya reader (load_lora_weights' first step) puts each LoRA on."""
    state, _ = StableDiffusionXLPipeline.lora_state_dict(dict(kohya), unet_config=SimpleNamespace(layers_per_block=layers_per_block))
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    return {k.removesuffix(".lora_A.weight") for k in peft if k.endswith(".lora_A.weight")}


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_real_architecture_kohya_names(family):
    """Every LoRA target of the real UNet gets a kohya name that the original checkpoint has a weight for
    (what ComfyUI and A1111 look up) and that diffusers' kohya reader maps back to the same module."""
    unet = _real_models(family)["unet"]
    targets = lora_target_modules(unet)
    checkpoint = {e.original for e in formats._plan_unet(list(unet.state_dict()), dict(unet.config))}
    with_attention = formats._up_blocks_with_attention(targets)
    naming = "original" if family == "sdxl" else "diffusers"
    names = {}
    for module in targets:
        weight = formats.UNET_PREFIX + formats.unet_original_key(module, 2, with_attention) + ".weight"
        assert weight in checkpoint, module
        # ComfyUI's and A1111's lookup: lora_unet_ + the checkpoint key without diffusion_model. and .weight
        lookup = "lora_unet_" + weight.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")
        assert formats.kohya_module_name(module, "original", 2, with_attention) == lookup
        names[formats.kohya_module_name(module, naming, 2, with_attention)] = module
    tiny = torch.zeros(1, 1)
    kohya = {}
    for name in names:
        kohya.update({f"{name}.lora_down.weight": tiny, f"{name}.lora_up.weight": tiny, f"{name}.alpha": torch.tensor(1.0)})
    assert _diffusers_reads_kohya_modules(kohya, 2) == set(targets)


def test_wrong_lora_files_give_one_clear_error(sdxl_lora, tmp_path):
    lora_file, _ = sdxl_lora
    kohya = formats.lora_to_kohya(lora_file, tmp_path / "kohya.safetensors", family="sdxl")
    with pytest.raises(FormatError, match=r"kohya\.safetensors: not a LoRA file of this trainer"):
        formats.lora_to_kohya(kohya, tmp_path / "again.safetensors", family="sdxl")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(lora_file.read_bytes()[:-64])
    with pytest.raises(FormatError, match=r"cut\.safetensors: not a readable safetensors file"):
        formats.lora_to_kohya(cut, tmp_path / "x.safetensors", family="sdxl")
    with pytest.raises(FormatError, match=r"lora\.safetensors: cannot tell SDXL from SD 1\.5"):
        formats.lora_to_kohya(lora_file, tmp_path / "x.safetensors")  # tiny widths: family must be given
    bare = tmp_path / "bare.safetensors"
    with safe_open(str(lora_file), "pt") as f:
        formats._write_safetensors({k: f.get_tensor(k) for k in f.keys()}, bare)
    with pytest.raises(FormatError, match=r"bare\.safetensors: no lora_adapter_metadata"):
        formats.lora_to_kohya(bare, tmp_path / "x.safetensors", family="sdxl")
