"""Files whose bytes depend only on their content.

safetensors writes its `__metadata__` map in the order of a Rust hash map, which changes from process to
process: the same tensors and metadata give different bytes, so two identical runs could not be compared
byte for byte. `canonical_safetensors` rewrites a file's header with the metadata keys sorted, in place; the
header keeps its length, so the tensor data is not touched.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path


def canonical_safetensors(path: str | os.PathLike) -> Path:
    path = Path(path)
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw = f.read(length)
        header = json.loads(raw)
        metadata = header.pop("__metadata__", None)
        ordered = ({"__metadata__": dict(sorted(metadata.items()))} if metadata is not None else {}) | header
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:  # never: the same entries, reordered, serialised as compactly as safetensors does
            raise ValueError(f"{path}: the canonical header is longer than the original ({len(text)} > {length})")
        f.seek(8)
        f.write(text + b" " * (length - len(text)))  # safetensors pads its header with spaces
    return path
