"""The fast path for reading a shard: one read into a writable buffer, the tar headers parsed in place,
members returned as zero-copy views of that buffer.

webdataset's reader pulls a tar through Python's tarfile in 10 KB pieces and copies every member out; on
SDXL-size samples (~450 KB) that dominated the loader's time (measured:
bench/README.md#measurements-behind-defaults). The shards this project writes
(trainer.data.shards.ShardWriter) are plain ustar files: regular members with short names. This scanner
reads exactly that and nothing more. Anything else (compression, pax or GNU headers, links, a bad header
checksum, a member that runs past the end, a missing end-of-archive block, a duplicate member) makes it
return None, and the caller reads the shard again with webdataset's general reader, which then reports
what is wrong with it. Grouping by key follows webdataset's rules (key = path up to the first '.' of the
file name, suffix lower-cased, `__x__` members skipped), so both paths give the same samples.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0")
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")


def _octal(field: bytes) -> Optional[int]:
    text = field.rstrip(b"\0 ").lstrip(b" ")
    if not text:
        return 0
    if not all(48 <= c <= 55 for c in text):  # base-256 sizes (huge members) and garbage: not ours
        return None
    return int(text, 8)


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156])
    # The checksum is the sum of the header's bytes with its own field read as eight spaces.
    return stored is not None and stored == sum(header) - sum(header[148:156]) + 8 * 32


def _member_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\x00":  # POSIX ustar: long paths are split into prefix/name
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8")


def scan_members(buffer: memoryview) -> Optional[list[tuple[str, memoryview]]]:
    """[(name, data view)] of a plain ustar archive's regular members, or None if it is not one."""
    members: list[tuple[str, memoryview]] = []
    offset, end = 0, len(buffer)
    while True:
        if offset + BLOCK > end:
            return None  # no end-of-archive block: truncated
        header = bytes(buffer[offset:offset + BLOCK])
        if header == _ZERO_BLOCK:
            return members
        if not _checksum_ok(header):
            return None
        size = _octal(header[124:136])
        if size is None or header[156:157] not in _REGULAR:
            return None
        start = offset + BLOCK
        if start + size > end:
            return None
        try:
            members.append((_member_name(header), buffer[start:start + size]))
        except UnicodeDecodeError:
            return None
        offset = start + (size + BLOCK - 1) // BLOCK * BLOCK


def group_samples(members: list[tuple[str, memoryview]], url: str) -> Optional[list[dict]]:
    """Consecutive members with the same key become one sample dict (webdataset's grouping)."""
    samples: list[dict] = []
    current: Optional[dict] = None
    for name, data in members:
        if ("/" not in name and name.startswith("__") and name.endswith("__")) or _META.match(name):
            continue
        match = _KEY_SUFFIX.match(name)
        if match is None:
            continue
        key, suffix = match.group(1), match.group(2).lower()
        if current is None or key != current["__key__"]:
            current = {"__key__": key, "__url__": url}
            samples.append(current)
        if suffix in current:
            return None  # a duplicate member: the general reader names it
        current[suffix] = data
    return samples


def read_plain_shard(path: str) -> Optional[list[dict]]:
    """The shard's samples (values are writable memoryviews of one buffer), or None: use the general
    reader. Raises OSError if the file cannot be read at all.

    One read into an uninitialised buffer (numpy's empty: a bytearray would first be zero-filled, a
    pass over the shard for nothing). Not a memory map: a shard truncated while mapped would kill the
    process with SIGBUS, and a bad shard must be reported, not fatal.
    """
    with open(path, "rb", buffering=0) as file:
        size = os.fstat(file.fileno()).st_size
        buffer = np.empty(size, dtype=np.uint8)
        view = memoryview(buffer)
        got = 0
        while got < size:
            count = file.readinto(view[got:])
            if not count:
                return None  # shorter than it said: the general reader reports it
            got += count
    members = scan_members(view)
    return None if members is None else group_samples(members, path)
