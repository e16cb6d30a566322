"""trainer/files.py: safetensors files whose bytes depend only on their content."""
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer.files import canonical_safetensors


def test_canonical_header_sorts_the_metadata_and_keeps_the_file_readable(tmp_path):
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    metadata = {f"key{i}": f"value {i}\n" for i in (3, 1, 2)} | {"format": "pt"}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    size = path.stat().st_size
    canonical_safetensors(path)
    assert path.stat().st_size == size
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == metadata
    header = path.read_bytes()[8:200].decode(errors="replace")
    assert header.index('"format"') < header.index('"key1"') < header.index('"key2"') < header.index('"key3"')
    before = path.read_bytes()
    canonical_safetensors(path)
    assert path.read_bytes() == before  # idempotent
