"""Encoders (codecs, text encoders, model folders) and the caching step (trainer.data.encode)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from trainer.data.encode import encode_to_shards, iter_image_folder, iter_shapes, resize_and_crop
from trainer.data.encoders import (
    PixelUnshuffleCodec,
    ToyTextEncoder,
    VaeCodec,
    create_toy_encoders,
    load_encoders,
)
from trainer.data.shapes import ShapesDataset, ShapesOptions
from trainer.testing import make_tiny_sd15_folder, make_tiny_sdxl_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle at top left", "a blue ring at center", ""]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    return create_toy_encoders(tmp_path_factory.mktemp("toy"), seed=0)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return make_tiny_sdxl_folder(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)


def test_pixel_unshuffle_round_trips_exactly():
    codec = PixelUnshuffleCodec(factor=2)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = codec.encode(images)
    assert latents.shape == (2, 12, 16, 16)
    assert (codec.latent_channels, codec.downsample) == (12, 2)
    assert torch.equal(codec.decode(latents), images)


def test_toy_text_encoder_is_deterministic_and_tells_captions_apart():
    first = ToyTextEncoder.create(seed=0).encode(CAPTIONS)
    again = ToyTextEncoder.create(seed=0).encode(CAPTIONS)
    assert first.prompt_embeds.shape == (3, 16, 32) and first.pooled.shape == (3, 32)
    assert torch.equal(first.prompt_embeds, again.prompt_embeds) and torch.equal(first.pooled, again.pooled)
    assert torch.isfinite(first.prompt_embeds).all()  # the empty (unconditional) caption included
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert not torch.allclose(first.pooled[a], first.pooled[b])
        assert not torch.allclose(first.prompt_embeds[a], first.prompt_embeds[b])
    other_seed = ToyTextEncoder.create(seed=1).encode(CAPTIONS)
    assert not torch.allclose(first.pooled, other_seed.pooled)


def test_toy_tokenizer_covers_every_shapes_caption():
    tokenizer = ToyTextEncoder.create(seed=0).tokenizer
    unk = tokenizer.token_id("<unk>")
    captions = [ShapesDataset(60, seed=3)[i].caption for i in range(60)]
    assert not (tokenizer(captions) == unk).any()
    empty = tokenizer([""])[0].tolist()
    bos, eos, pad = (tokenizer.token_id(t) for t in ("<bos>", "<eos>", "<pad>"))
    assert empty == [bos, eos] + [pad] * 14
    assert tokenizer(["a purple blob"])[0, 2].item() == unk
    pairs = [ShapesDataset(60, seed=3, options=ShapesOptions(objects=2))[i].caption for i in range(60)]
    assert not (tokenizer(pairs) == unk).any()


def test_toy_tokenizer_refuses_a_caption_it_would_cut():
    tokenizer = ToyTextEncoder.create(seed=0).tokenizer
    fits = "a red ring at top left, a blue square at bottom right, a cross"  # 14 words
    assert tokenizer([fits])[0, -1].item() == tokenizer.token_id("<eos>")
    too_long = fits + " at top right"
    with pytest.raises(ValueError, match="17 words.*holds 14") as error:
        tokenizer([too_long])
    assert too_long in str(error.value)


def test_toy_folder_round_trip_gives_identical_embeddings(toy_dir):
    encoders = load_encoders(toy_dir)
    assert encoders.kind == "toy" and encoders.resolution == 32
    assert isinstance(encoders.codec, PixelUnshuffleCodec)
    loaded = encoders.text.encode(CAPTIONS)
    fresh = ToyTextEncoder.create(seed=0).encode(CAPTIONS)
    assert torch.equal(loaded.prompt_embeds, fresh.prompt_embeds) and torch.equal(loaded.pooled, fresh.pooled)
    model = encoders.text.text_model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert encoders.time_ids((48, 64), (0, 8), (32, 32)).tolist() == [48, 64, 0, 8, 32, 32]


def test_tiny_sdxl_folder_loads_as_sdxl_with_penultimate_layers(sdxl_dir):
    encoders = load_encoders(sdxl_dir)
    assert encoders.kind == "sdxl" and isinstance(encoders.codec, VaeCodec)
    text = encoders.text
    out = text.encode(CAPTIONS)
    assert out.prompt_embeds.shape == (3, 16, 32 + 64) and text.embed_dim == 96
    assert out.pooled.shape == (3, 32) and text.pooled_dim == 32

    # The same thing by hand: penultimate hidden states (not the final, layer-normed output).
    parts = []
    for tokenizer, model in [(text.tokenizer, text.text_encoder), (text.tokenizer_2, text.text_encoder_2)]:
        ids = tokenizer(CAPTIONS, padding="max_length", max_length=16, truncation=True,
                        return_tensors="pt").input_ids
        hidden = model(ids, output_hidden_states=True)
        parts.append(hidden.hidden_states[-2])
        assert not torch.allclose(hidden.hidden_states[-2], hidden.last_hidden_state)
    assert torch.allclose(out.prompt_embeds, torch.cat(parts, dim=-1))
    assert torch.allclose(out.pooled, hidden.text_embeds)

    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = encoders.codec.encode(images)
    assert latents.shape == (2, 4, 16, 16)
    assert torch.equal(latents, encoders.codec.encode(images))  # the posterior mean: reproducible
    assert encoders.codec.decode(latents).shape == images.shape


def test_tiny_sdxl_folder_runs_in_the_diffusers_pipeline(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    result = pipe(
        "a red circle", num_inference_steps=1, height=32, width=32, output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert result.images.shape == (1, 32, 32, 3) and np.isfinite(result.images).all()


def test_tiny_sd15_folder_is_detected(tmp_path):
    encoders = load_encoders(make_tiny_sd15_folder(tmp_path / "sd15"))
    assert encoders.kind == "sd15"
    out = encoders.text.encode(CAPTIONS)
    assert out.prompt_embeds.shape == (3, 16, 32) and out.pooled is None
    assert encoders.time_ids((32, 32), (0, 0), (32, 32)) is None


def test_incomplete_model_folders_name_what_is_missing(tmp_path, sdxl_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoders(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="latent_codec.json"):
        load_encoders(tmp_path)
    broken = tmp_path / "broken_sdxl"
    shutil.copytree(sdxl_dir, broken)
    shutil.rmtree(broken / "tokenizer_2")
    (broken / "text_encoder_2" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_encoders(broken)
    assert "broken_sdxl" in str(error.value)
    assert "tokenizer_2/" in str(error.value) and "text_encoder_2/weights" in str(error.value)


def test_resize_and_crop_records_sdxl_time_id_inputs():
    wide = Image.fromarray(np.zeros((20, 40, 3), np.uint8))  # 40 wide, 20 high
    prepared = resize_and_crop(wide, 16)
    assert prepared.pixels.shape == (16, 16, 3)
    assert prepared.original_hw == (20, 40) and prepared.crop_tl == (0, 8)


def _read_shards(out_dir: Path) -> list[dict]:
    urls = sorted(str(p) for p in out_dir.glob("train-*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def test_encode_shapes_to_shards_readable_with_plain_webdataset(tmp_path, toy_dir):
    encoders = load_encoders(toy_dir)
    stats = encode_to_shards(
        encoders, iter_shapes(40, seed=5, resolution=32), tmp_path, resolution=32,
        batch_size=16, samples_per_shard=16, total=40, progress=False,
    )
    assert stats["samples"] == 40 and stats["shards"] == 3 and stats["skipped"] == 0
    assert json.loads((tmp_path / "index.json").read_text())["num_samples"] == 40

    dataset = ShapesDataset(40, seed=5, resolution=32)
    samples = _read_shards(tmp_path)
    assert len(samples) == 40
    for index, sample in enumerate(samples):
        assert sample["latent.npy"].shape == (12, 16, 16) and sample["latent.npy"].dtype == np.float16
        assert sample["prompt_embeds.npy"].shape == (16, 32)
        assert sample["pooled.npy"].shape == (32,)
        assert sample["time_ids.npy"].tolist() == [32, 32, 0, 0, 32, 32]
        assert sample["txt"] == dataset[index].caption
    decoded = encoders.codec.decode(torch.from_numpy(samples[7]["latent.npy"]).float()[None])[0]
    original = torch.from_numpy(dataset[7].image).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(decoded, original, atol=1e-3)
    expected = encoders.text.encode([dataset[7].caption]).prompt_embeds[0]
    assert torch.allclose(torch.from_numpy(samples[7]["prompt_embeds.npy"]).float(), expected, atol=1e-2)


def test_the_configs_shapes_options_reach_the_shards(tmp_path):
    """data.shapes.position_in_caption / texture / dots / objects are what the trainer's shards hold: the shards'
    captions and decoded images are ShapesDataset's with those options."""
    from trainer.config import load_config
    from trainer.pipeline import prepare_base, prepare_shards
    from trainer.runtime.engines import init_distributed

    options = ShapesOptions(position_in_caption=0.5, texture="stripes", dots=4, objects=2)
    cfg = load_config(REPO_ROOT / "configs" / "smoke.yaml", [
        f"run.out_dir={tmp_path}", "data.shapes.count=12", "data.shapes.seed=4",
        f"data.shapes.position_in_caption={options.position_in_caption}", f"data.shapes.texture={options.texture}",
        f"data.shapes.dots={options.dots}", f"data.shapes.objects={options.objects}"])
    info = init_distributed()
    base = prepare_base(cfg, info)
    samples = _read_shards(prepare_shards(cfg, base, info))
    data = ShapesDataset(12, seed=4, resolution=cfg.data.shapes.resolution, options=options)
    assert [s["txt"] for s in samples] == [data[i].caption for i in range(12)]
    codec = load_encoders(base).codec
    for index in (0, 5, 11):
        decoded = codec.decode(torch.from_numpy(samples[index]["latent.npy"]).float()[None])[0]
        image = torch.from_numpy(data[index].image).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.allclose(decoded, image, atol=1e-2)


def test_sources_that_yield_nothing_usable_are_errors(tmp_path, toy_dir):
    with pytest.raises(FileNotFoundError, match="empty_folder"):
        iter_image_folder(tmp_path / "empty_folder")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        iter_image_folder(tmp_path / "empty_folder")
    bad = [(b"not an image", "a caption", "bad-0", "bad-0.jpg")]
    with pytest.raises(ValueError, match="bad-0.jpg"):
        encode_to_shards(load_encoders(toy_dir), bad, tmp_path / "out", 32, progress=False)
    assert not (tmp_path / "out" / "index.json").exists()


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "trainer.data.encode", *args], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=120,
    )


def _jpeg_bytes(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_cli_folder_source_skips_and_reports_unreadable_images(tmp_path, toy_dir):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "wide.jpg").write_bytes(_jpeg_bytes(48, 32, seed=0))
    (photos / "wide.txt").write_text("a red circle at top left\n")
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(photos / "plain.png")
    (photos / "plain.txt").write_text("a blue square at center")
    (photos / "broken.png").write_bytes(b"\x89PNG but not really")
    (photos / "broken.txt").write_text("a green ring at center")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(photos / "orphan.png")  # no caption file

    out = tmp_path / "shards"
    result = _run_cli("--model", str(toy_dir), "--out", str(out), "--source", "folder",
                      "--input", str(photos), "--resolution", "32")
    assert result.returncode == 0, result.stderr
    assert "broken.png" in result.stderr and "orphan.png" in result.stderr and "skipped 2" in result.stderr
    samples = {s["__key__"]: s for s in _read_shards(out)}
    assert sorted(samples) == ["plain", "wide"]
    assert samples["wide"]["txt"] == "a red circle at top left"
    assert samples["wide"]["time_ids.npy"].tolist() == [32, 48, 0, 8, 32, 32]


def test_cli_reads_img2dataset_style_tars(tmp_path, toy_dir):
    tar_path = tmp_path / "00000.tar"
    with wds.TarWriter(str(tar_path)) as sink:
        for index in range(3):
            sink.write({"__key__": f"{index:09d}", "jpg": _jpeg_bytes(40, 40, seed=index),
                        "txt": f"a red circle at top left {index}", "json": {"width": 40}})
    out = tmp_path / "shards"
    result = _run_cli("--model", str(toy_dir), "--out", str(out), "--source", "wds",
                      "--input", str(tmp_path / "*.tar"), "--resolution", "32", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    samples = _read_shards(out)
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002"]
    assert samples[2]["txt"] == "a red circle at top left 2"
    assert samples[0]["latent.npy"].dtype == np.float32
    assert samples[0]["time_ids.npy"].tolist() == [40, 40, 0, 0, 32, 32]

    empty = _run_cli("--model", str(toy_dir), "--out", str(tmp_path / "x"), "--source", "wds",
                     "--input", str(tmp_path / "missing-*.tar"))
    assert empty.returncode != 0 and "missing-*.tar" in empty.stderr
