"""A base model given as a single-file checkpoint (a finetune as ComfyUI / A1111 users hold it) plus a local
diffusers config folder: converted once through diffusers' from_single_file, checked against the folder's
architecture first, with one-line errors for a file that does not fit."""
import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from trainer import formats
from trainer.base_model import SOURCE_FILE, check_single_file, convert_single_file
from trainer.formats import FormatError
from trainer.testing import make_tiny_sd15_folder, make_tiny_sdxl_folder

from conftest import ROOT, cli_env


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Config folders (seed 0) and single-file finetunes of them (seed 1: other weights, same architecture)."""
    root = tmp_path_factory.mktemp("single_file_base")
    config = {"sdxl": make_tiny_sdxl_folder(root / "sdxl", seed=0), "sd15": make_tiny_sd15_folder(root / "sd15", seed=0)}
    finetune = {"sdxl": make_tiny_sdxl_folder(root / "sdxl_ft", seed=1), "sd15": make_tiny_sd15_folder(root / "sd15_ft", seed=1)}
    files = {f: formats.write_single_file(finetune[f], root / f"{f}_finetune.safetensors") for f in config}
    return root, config, finetune, files


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_single_file_becomes_a_folder_with_the_files_weights(models, tmp_path, family):
    _, config, finetune, files = models
    out = convert_single_file(files[family], config[family], tmp_path / "base")
    _, got, _ = formats.load_folder(out, dtype=None)
    _, want, _ = formats.load_folder(finetune[family], dtype=None)
    _, other, _ = formats.load_folder(config[family], dtype=None)
    for part in formats.PARTS[family]:
        assert got[part].keys() == want[part].keys(), part
        for key in want[part]:  # the file holds float16: the folder keeps exactly those values
            assert torch.equal(got[part][key].float(), want[part][key].to(torch.float16).float()), (part, key)
    assert {v.dtype for v in load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors")).values()} == {torch.float16}
    assert any(not torch.equal(got["unet"][k].float(), other["unet"][k]) for k in other["unet"])  # not the config's
    source = json.loads((out / SOURCE_FILE).read_text())
    assert source["file"] == str(files[family]) and source["family"] == family and source["dtype"] == "float16"
    assert (out / "scheduler" / "scheduler_config.json").is_file() and (out / "tokenizer").is_dir()
    assert convert_single_file(files[family], config[family], out) == out  # reused, not converted again


def test_a_folder_made_from_another_file_is_not_reused(models, tmp_path):
    _, config, _, files = models
    out = convert_single_file(files["sdxl"], config["sdxl"], tmp_path / "base")
    other = tmp_path / "other.safetensors"
    other.write_bytes(files["sdxl"].read_bytes())
    with pytest.raises(FormatError, match=r"was converted from .*sdxl_finetune.safetensors.*not from .*other.safetensors"):
        convert_single_file(other, config["sdxl"], out)


def _cut(src, dst, drop):
    tensors = load_file(str(src))
    save_file({k: v for k, v in tensors.items() if not k.startswith(drop)}, str(dst))
    return dst


@pytest.mark.parametrize("case, pattern", [
    ("sd15 file, sdxl folder", r"sd15_finetune.safetensors is an SD 1.5 checkpoint, but the config folder .*sdxl is SDXL"),
    ("sdxl file, sd15 folder", r"sdxl_finetune.safetensors is an SDXL checkpoint, but the config folder .*sd15 is SD 1.5"),
    ("no vae", r"no_vae.safetensors does not hold .*sdxl's SDXL architecture: it lacks \d+ of its \d+ tensors, e.g. first_stage_model\."),
    ("other width", r"wide.safetensors does not match .*sdxl: \d+ tensors have other shapes, e.g. model.diffusion_model\."),
    ("not safetensors", r"broken.safetensors: not a readable safetensors file"),
    ("no text encoders", r"unet_only.safetensors: not an SDXL or SD 1.5 single-file checkpoint"),
])
def test_a_file_that_does_not_fit_is_one_line(models, tmp_path, case, pattern):
    root, config, _, files = models
    folder = config["sd15"] if case == "sdxl file, sd15 folder" else config["sdxl"]
    file = {
        "sd15 file, sdxl folder": lambda: files["sd15"],
        "sdxl file, sd15 folder": lambda: files["sdxl"],
        "no vae": lambda: _cut(files["sdxl"], tmp_path / "no_vae.safetensors", "first_stage_model."),
        "other width": lambda: _wide_sdxl(tmp_path),
        "not safetensors": lambda: (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 64) and tmp_path / "broken.safetensors",
        "no text encoders": lambda: _cut(files["sdxl"], tmp_path / "unet_only.safetensors", "conditioner."),
    }[case]()
    with pytest.raises(FormatError, match=pattern) as err:
        check_single_file(file, folder)
    assert "\n" not in str(err.value)


def _wide_sdxl(tmp_path):
    """An SDXL file whose UNet is wider than the config folder's."""
    folder = make_tiny_sdxl_folder(tmp_path / "wide_sdxl", seed=2)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    from diffusers import UNet2DConditionModel

    unet_config["block_out_channels"] = [c * 2 for c in unet_config["block_out_channels"]]
    UNet2DConditionModel.from_config(unet_config).save_pretrained(folder / "unet")
    return formats.write_single_file(folder, tmp_path / "wide.safetensors")


def _recipe(tmp_path, **model) -> str:
    recipe = yaml.safe_load((ROOT / "configs" / "sdxl.yaml").read_text())
    recipe["model"].update(model)
    recipe["data"]["shards"] = str(tmp_path)
    (tmp_path / "index.json").write_text("{}")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize("model, key, words", [
    ({"base": "sdxl_finetune.safetensors"}, "model.base_config", "name a local diffusers folder"),
    ({"base": "sd15_finetune.safetensors", "base_config": "sdxl"}, "model.base", "is an SD 1.5 checkpoint, but the config folder"),
    ({"base": "missing.safetensors", "base_config": "sdxl"}, "model.base", "does not exist"),
])
def test_the_trainer_refuses_a_single_file_base_that_does_not_fit_in_one_line(models, tmp_path, model, key, words):
    root = models[0]
    model = {k: str(root / v) for k, v in model.items()}
    proc = subprocess.run([sys.executable, "-m", "trainer.run", "--config", _recipe(tmp_path, **model)],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert key in errors[0] and words in errors[0]


def _embeddings(shard_dir):
    from trainer.data.shards import decode_sample, read_index
    from trainer.data.tarscan import read_plain_shard

    index = read_index(shard_dir)
    shards = sorted(shard_dir.glob("*.tar"))
    samples = [decode_sample(raw, index["shapes"], str(s)) for s in shards for raw in read_plain_shard(str(s))]
    return torch.stack([s["prompt_embeds"].float() for s in samples])


def test_encode_reads_a_single_file(models, tmp_path):
    """trainer.encode from the single file (+ config folder): the shards' text embeddings are the finetune's
    (to the file's float16 rounding), not the config folder's."""
    _, config, finetune, files = models
    embeds = {}
    for name, model in (("file", ["--model", str(files["sdxl"]), "--model-config", str(config["sdxl"]),
                                  "--converted", str(tmp_path / "converted")]),
                        ("finetune", ["--model", str(finetune["sdxl"])]), ("config", ["--model", str(config["sdxl"])])):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, "-m", "trainer.encode", *model, "--out", str(out), "--count", "4",
                               "--samples-per-shard", "4", "--dtype", "float32", "--device", "cpu"],
                              cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        embeds[name] = _embeddings(out)
    assert (tmp_path / "converted" / SOURCE_FILE).is_file()
    near = float((embeds["file"] - embeds["finetune"]).abs().max())
    far = float((embeds["file"] - embeds["config"]).abs().max())
    assert near < 1e-2 < far, (near, far)
