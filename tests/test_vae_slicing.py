"""The encoding path runs the VAE one image at a time (slicing), and slicing changes no latent beyond float
rounding."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data.encode import encode_to_shards
from trainer.data.encoders import load_encoders
from trainer.data.shapes import ShapesDataset
from trainer.testing import make_tiny_sdxl_folder

COUNT, BATCH = 6, 4  # a full batch and a partial one
RESOLUTION = 64  # the tiny VAE's sample_size


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return make_tiny_sdxl_folder(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)


def _samples():
    dataset = ShapesDataset(COUNT, seed=7, resolution=RESOLUTION)
    return [(dataset[i].image, dataset[i].caption, f"s{i:02d}") for i in range(COUNT)]


def _encode(model_dir: Path, out: Path, dtype: torch.dtype = torch.float32, **kwargs):
    """(latents by key as written to the shards, the batch sizes the VAE's encoder saw, its slicing flag)."""
    encoders = load_encoders(model_dir, dtype=dtype)
    vae = encoders.codec.vae
    seen: list[int] = []
    inner = vae._encode  # what AutoencoderKL.encode calls once per slice, or once for the whole batch

    def spy(x, *args, **kw):
        seen.append(int(x.shape[0]))
        return inner(x, *args, **kw)

    vae._encode = spy
    encode_to_shards(encoders, _samples(), out, RESOLUTION, batch_size=BATCH, samples_per_shard=COUNT,
                     dtype="float32", progress=False, **kwargs)
    latents = {}
    for shard in sorted(out.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".latent.npy"):
                    latents[member.name.split(".")[0]] = np.load(io.BytesIO(tar.extractfile(member).read()))
    assert sorted(latents) == [key for _, _, key in _samples()]
    return latents, seen, vae.use_slicing


def test_encode_path_turns_slicing_on(tmp_path, sdxl_dir):
    whole, whole_batches, whole_flag = _encode(sdxl_dir, tmp_path / "unsliced", vae_slicing=False)
    sliced, sliced_batches, sliced_flag = _encode(sdxl_dir, tmp_path / "sliced")  # the default

    assert not whole_flag and whole_batches == [BATCH, COUNT - BATCH]
    assert sliced_flag and sliced_batches == [1] * COUNT  # one image at a time through the VAE
    for key in whole:
        assert sliced[key].shape == whole[key].shape == (4, RESOLUTION // 2, RESOLUTION // 2)
        # float32: the random tiny VAE on the shapes' flat backgrounds (GroupNorm over near-constant maps)
        # amplifies rounding to ~1e-4 on latents of ~0.1, batched or not; the float64 test shows that the two
        # compute the same latents
        np.testing.assert_allclose(sliced[key], whole[key], rtol=0, atol=2e-3)


def test_slicing_gives_the_same_latents_to_float_rounding(tmp_path, sdxl_dir):
    whole, _, _ = _encode(sdxl_dir, tmp_path / "unsliced", dtype=torch.float64, vae_slicing=False)
    sliced, _, flag = _encode(sdxl_dir, tmp_path / "sliced", dtype=torch.float64)
    assert flag
    for key in whole:
        # computed in float64 and stored in float32: equal to the storage's rounding
        np.testing.assert_allclose(sliced[key], whole[key], rtol=1e-6, atol=1e-9)
