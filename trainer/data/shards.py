"""The shard format: WebDataset tar files of cached latents and text embeddings.

One sample holds `latent.npy` (C,h,w), `prompt_embeds.npy` (L,D), optionally `pooled.npy` (P,) and
`time_ids.npy` (6,) (SDXL micro-conditioning: original h,w, crop top,left, target h,w), and `txt`
(the caption). Arrays are plain .npy files, so `webdataset.WebDataset(url).decode()` reads the
shards with no project code. `index.json` beside the shards lists them with their sample counts
and the array shapes: the loader splits work and resumes from it without opening a tar.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import webdataset as wds

INDEX_NAME = "index.json"
FORMAT = "sdxl-lightning-shards/1"
ARRAY_FIELDS = ("latent", "prompt_embeds", "pooled", "time_ids")
OPTIONAL_FIELDS = ("pooled", "time_ids")
DTYPES = ("float16", "float32")
# time_ids hold pixel sizes and crop offsets; float16 cannot hold odd integers above 2048, so
# they stay float32 whatever the dtype of the embeddings.
FLOAT32_FIELDS = ("time_ids",)

ArrayLike = Union[np.ndarray, torch.Tensor]


class BadSample(Exception):
    """A sample that cannot be used, with where it is and why."""

    def __init__(self, shard: str, key: str, field: str, reason: str):
        super().__init__(shard, key, field, reason)
        self.shard, self.key, self.field, self.reason = shard, key, field, reason

    def __str__(self) -> str:
        return f"shard {self.shard} sample {self.key}: {self.field}: {self.reason}"


def to_numpy(value: ArrayLike) -> np.ndarray:
    """Numpy view of a tensor or array (tensors go through float32 on the CPU)."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    return np.asarray(value)


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: Union[bytes, bytearray, memoryview]) -> np.ndarray:
    """An .npy file's array; over a writable buffer (the loader's shard buffer) a view, not a copy.
    Object arrays are refused (allow_pickle=False semantics)."""
    view = memoryview(data)
    head = io.BytesIO(view[:4096])
    version = np.lib.format.read_magic(head)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(head)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(head)
    else:
        return np.load(io.BytesIO(view), allow_pickle=False)
    if dtype.hasobject:
        raise ValueError("object arrays cannot be loaded (no pickles)")
    count = int(np.prod(shape, dtype=np.int64))
    array = np.frombuffer(view, dtype=dtype, count=count, offset=head.tell())
    array = array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    if not array.flags.writeable:  # over immutable bytes: torch wants a writable array
        array = array.copy()
    elif not array.flags.c_contiguous:  # Fortran order
        array = np.ascontiguousarray(array)
    return array


def format_shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(int(size)) for size in shape) + "]"


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


class ShardWriter:
    """Write samples into numbered tar shards and, on close, their index.json.

    Each shard is written under a temporary name and renamed once complete, so a crash never
    leaves a half-written shard under a final name. index.json is only written by a clean close.
    """

    def __init__(self, out_dir: Union[str, Path], prefix: str = "train",
                 samples_per_shard: int = 1000, dtype: str = "float16"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.dtype = dtype
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict[str, Any]] = []
        self.shapes: Optional[dict[str, list[int]]] = None
        self.num_samples = 0
        self._seen_keys: set[str] = set()
        self._tar: Optional[wds.TarWriter] = None
        self._tar_count = 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _temp_path(self) -> Path:
        return self.out_dir / (shard_name(self.prefix, len(self.shards)) + ".tmp")

    def _check_shapes(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        shapes = {name: list(array.shape) for name, array in arrays.items()}
        if self.shapes is None:
            self.shapes = shapes
            return
        for name in ARRAY_FIELDS:
            expected, got = self.shapes.get(name), shapes.get(name)
            if expected != got:
                raise ValueError(f"sample {key}: {name} has shape {got}, but earlier samples "
                                 f"have {expected}; all samples of one writer must match")

    def write(self, key: str, latent: ArrayLike, prompt_embeds: ArrayLike,
              pooled: Optional[ArrayLike] = None, time_ids: Optional[ArrayLike] = None,
              caption: str = "") -> None:
        """Append one sample; `key` must be unique, without '.' or '/' (the tar grouping key)."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must be non-empty, without '.' or '/'")
        if key in self._seen_keys:
            raise ValueError(f"sample key {key!r} written twice")
        arrays = {"latent": latent, "prompt_embeds": prompt_embeds,
                  "pooled": pooled, "time_ids": time_ids}
        arrays = {name: to_numpy(value) for name, value in arrays.items() if value is not None}
        for name in arrays:
            dtype = "float32" if name in FLOAT32_FIELDS else self.dtype
            with np.errstate(over="ignore"):  # overflow is reported just below, with the key
                arrays[name] = arrays[name].astype(dtype)
            # Checked after the cast: float32 values past 65504 become inf in float16.
            if not np.isfinite(arrays[name]).all():
                raise ValueError(f"sample {key}: {name} is not finite as {dtype}")
        self._check_shapes(key, arrays)

        if self._tar is None:
            self._tar = wds.TarWriter(str(self._temp_path()), encoder=False, mtime=0)
            self._tar_count = 0
        record = {"__key__": key, "txt": caption.encode("utf-8")}
        record.update({f"{name}.npy": encode_npy(array) for name, array in arrays.items()})
        self._tar.write(record)
        self._seen_keys.add(key)
        self._tar_count += 1
        self.num_samples += 1
        if self._tar_count == self.samples_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._tar = None
        name = shard_name(self.prefix, len(self.shards))
        os.replace(self._temp_path(), self.out_dir / name)
        self.shards.append({"name": name, "count": self._tar_count})

    def index(self) -> dict[str, Any]:
        """The index.json content for what has been written so far."""
        shapes = self.shapes or {}
        keys = [f"{name}.npy" for name in ARRAY_FIELDS if name in shapes] + ["txt"]
        return {"format": FORMAT, "shards": list(self.shards), "keys": keys,
                "shapes": shapes, "dtype": self.dtype, "num_samples": self.num_samples}

    def close(self) -> None:
        """Finish the last shard and write index.json (atomically, like the shards)."""
        if self._tar is not None:
            self._finish_shard()
        temp = self.out_dir / (INDEX_NAME + ".tmp")
        temp.write_text(json.dumps(self.index(), indent=1))
        os.replace(temp, self.out_dir / INDEX_NAME)

    def abort(self) -> None:
        """Drop the shard in progress; complete shards stay, no index.json is written."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            self._temp_path().unlink(missing_ok=True)


def read_index(shard_dir: Union[str, Path]) -> dict[str, Any]:
    """Load `shard_dir/index.json`, checking its format tag."""
    path = Path(shard_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no shard index at {path}: write shards with "
                                f"trainer.data.shards.ShardWriter (it writes index.json on close)")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}")
    return index


def list_shards(spec: Union[str, Path, Sequence[Union[str, Path]]]) -> list[str]:
    """Shard paths from a directory (through its index.json) or from a list of paths."""
    if isinstance(spec, (str, Path)):
        index = read_index(spec)
        return [str(Path(spec) / shard["name"]) for shard in index["shards"]]
    return [str(path) for path in spec]


def _load_array(raw: dict, name: str, expected: list[int], shard: str, key: str) -> torch.Tensor:
    field = f"{name}.npy"
    if field not in raw:
        raise BadSample(shard, key, field, "missing")
    try:
        array = decode_npy(raw[field])
    except Exception as error:  # np.load raises several types on corrupt bytes
        raise BadSample(shard, key, field, f"cannot decode .npy: {error}") from error
    if array.dtype.kind not in "biuf":
        raise BadSample(shard, key, field, f"dtype {array.dtype} is not numeric")
    if list(array.shape) != list(expected):
        raise BadSample(shard, key, field, f"expected shape {format_shape(expected)} "
                                           f"got {format_shape(array.shape)}")
    # Floats keep their stored dtype (float16 halves the bytes every later copy moves: worker -> trainer
    # through shared memory, host -> GPU); the training loop casts on the device. torch's checks and
    # casts: numpy's float16 arithmetic is emulated, much slower
    # (measured: bench/README.md#measurements-behind-defaults).
    tensor = torch.from_numpy(array)
    if not tensor.is_floating_point():
        tensor = tensor.float()
    # min and max carry any NaN or Inf: one pass and no temporary, unlike isfinite().all()
    if tensor.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all()):
        raise BadSample(shard, key, field, "contains NaN" if bool(torch.isnan(tensor).any()) else "contains Inf")
    return tensor


def decode_sample(raw: dict, shapes: dict, shard: str) -> dict[str, Any]:
    """Decode and check one raw tar sample (bytes values) against the index's shapes.

    Returns tensors in their stored float dtype (integers become float32) `latent`, `prompt_embeds`
    (and `pooled`, `time_ids` when `shapes`
    lists them) plus `caption` and `key`; raises BadSample naming the field and the reason.
    """
    key = str(raw.get("__key__", "?"))
    for name in ("latent", "prompt_embeds"):
        if name not in shapes:
            raise ValueError(f"shapes must list {name!r}, got {sorted(shapes)}")
    sample: dict[str, Any] = {}
    for name in ARRAY_FIELDS:
        if name in shapes:
            sample[name] = _load_array(raw, name, shapes[name], shard, key)
    if "txt" not in raw:
        raise BadSample(shard, key, "txt", "missing")
    try:
        sample["caption"] = bytes(raw["txt"]).decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadSample(shard, key, "txt", f"not utf-8: {error}") from error
    sample["key"] = key
    return sample
