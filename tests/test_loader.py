"""Shard format (writer, plain-webdataset readback, sample checks) and the resumable loader."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

import trainer.data.loader as loader_module
from trainer.data.loader import auto_lanes, make_loader, rank_positions, read_raw_samples, slots_before
from trainer.data.shards import (BadSample, ShardWriter, decode_sample, encode_npy, list_shards,
                            read_index)

LATENT, EMBEDS, POOLED = (12, 16, 16), (8, 32), (32,)
SHAPES = {"latent": list(LATENT), "prompt_embeds": list(EMBEDS), "pooled": list(POOLED),
          "time_ids": [6]}


def arrays_for(i: int) -> dict:
    """Small random arrays; latent[0, 0, 0] holds i so a batch row can be traced to its sample."""
    rng = np.random.default_rng(i)
    latent = rng.standard_normal(LATENT).astype(np.float32)
    latent[0, 0, 0] = i
    return {"latent": latent, "prompt_embeds": rng.standard_normal(EMBEDS).astype(np.float32),
            "pooled": rng.standard_normal(POOLED).astype(np.float32),
            "time_ids": np.array([1024, 1024, 0, 3, 1024, 1024], dtype=np.float32)}


def write_shards(out_dir: Path, num_samples: int = 80, per_shard: int = 10, **kwargs) -> Path:
    with ShardWriter(out_dir, samples_per_shard=per_shard, **kwargs) as writer:
        for i in range(num_samples):
            writer.write(f"{i:06d}", caption=f"caption {i}", **arrays_for(i))
    return out_dir


def take(stream_or_loader, count: int) -> list[dict]:
    iterator = iter(stream_or_loader)
    return [next(iterator) for _ in range(count)]


def keys_of(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["keys"]]


# -- shards ------------------------------------------------------------------------------


def test_writer_output_reads_with_plain_webdataset(tmp_path):
    write_shards(tmp_path, num_samples=25, per_shard=10)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index == {
        "format": "sdxl-lightning-shards/1",
        "shards": [{"name": "train-000000.tar", "count": 10}, {"name": "train-000001.tar",
                   "count": 10}, {"name": "train-000002.tar", "count": 5}],
        "keys": ["latent.npy", "prompt_embeds.npy", "pooled.npy", "time_ids.npy", "txt"],
        "shapes": SHAPES, "dtype": "float16", "num_samples": 25}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "index.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"]

    seen = []
    for path in list_shards(tmp_path):
        for sample in wds.WebDataset(path, shardshuffle=False).decode():
            i = int(sample["__key__"])
            seen.append(i)
            expected = arrays_for(i)
            assert sample["txt"] == f"caption {i}"
            for name in ("latent", "prompt_embeds", "pooled"):
                array = sample[f"{name}.npy"]
                assert array.dtype == np.float16 and list(array.shape) == SHAPES[name]
                assert np.array_equal(array, expected[name].astype(np.float16))
            # Pixel sizes and crops stay exact: time_ids are always float32.
            assert sample["time_ids.npy"].dtype == np.float32
            assert np.array_equal(sample["time_ids.npy"], expected["time_ids"])
    assert seen == list(range(25))


def test_writer_float32_tensors_and_optional_fields(tmp_path):
    with ShardWriter(tmp_path, prefix="val", dtype="float32") as writer:
        writer.write("a", torch.ones(LATENT, dtype=torch.bfloat16), torch.zeros(EMBEDS))
    index = read_index(tmp_path)
    assert index["keys"] == ["latent.npy", "prompt_embeds.npy", "txt"]
    assert index["shards"] == [{"name": "val-000000.tar", "count": 1}]
    sample = next(iter(wds.WebDataset(str(tmp_path / "val-000000.tar"),
                                      shardshuffle=False).decode()))
    assert sample["latent.npy"].dtype == np.float32 and sample["latent.npy"].sum() == np.prod(LATENT)
    assert "pooled.npy" not in sample and sample["txt"] == ""


def test_writer_rejects_mismatched_shapes_and_non_finite(tmp_path):
    with pytest.raises(ValueError, match="latent"):
        with ShardWriter(tmp_path) as writer:
            writer.write("a", np.zeros(LATENT), np.zeros(EMBEDS))
            writer.write("b", np.zeros((12, 16, 15)), np.zeros(EMBEDS))
    with ShardWriter(tmp_path / "x") as writer:
        writer.write("a", np.zeros(LATENT), np.zeros(EMBEDS), pooled=np.zeros(POOLED))
        with pytest.raises(ValueError, match="pooled"):
            writer.write("b", np.zeros(LATENT), np.zeros(EMBEDS))
        with pytest.raises(ValueError, match="not finite"):  # 1e6 overflows float16
            writer.write("c", np.full(LATENT, 1e6), np.zeros(EMBEDS), pooled=np.zeros(POOLED))
        with pytest.raises(ValueError, match="twice"):
            writer.write("a", np.zeros(LATENT), np.zeros(EMBEDS), pooled=np.zeros(POOLED))


def test_crashed_writer_leaves_complete_shards_only(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(tmp_path, samples_per_shard=4) as writer:
            for i in range(6):
                writer.write(f"{i}", **{k: v for k, v in arrays_for(i).items()})
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]
    with pytest.raises(FileNotFoundError, match="index.json"):
        read_index(tmp_path)


def raw_sample(i: int) -> dict:
    arrays = arrays_for(i)
    raw = {f"{name}.npy": encode_npy(array) for name, array in arrays.items()}
    return {"__key__": f"{i:06d}", "txt": b"caption", **raw}


def test_decode_sample_checks_every_field():
    sample = decode_sample(raw_sample(5), SHAPES, "train-000000.tar")
    assert sample["latent"].dtype == torch.float32 and sample["latent"][0, 0, 0] == 5
    assert sample["key"] == "000005" and sample["caption"] == "caption"
    assert set(sample) == {"latent", "prompt_embeds", "pooled", "time_ids", "caption", "key"}

    cases = [
        ("latent.npy", encode_npy(np.full(LATENT, np.nan, np.float16)), "contains NaN"),
        ("pooled.npy", encode_npy(np.full(POOLED, np.inf, np.float32)), "contains Inf"),
        ("latent.npy", encode_npy(np.zeros((12, 16, 15), np.float16)),
         "expected shape [12,16,16] got [12,16,15]"),
        ("prompt_embeds.npy", b"garbage", "cannot decode .npy"),
        ("prompt_embeds.npy", None, "missing"),
        ("txt", b"\xff\xfe", "not utf-8"),
    ]
    for field, value, reason in cases:
        raw = raw_sample(123)
        if value is None:
            del raw[field]
        else:
            raw[field] = value
        with pytest.raises(BadSample) as caught:
            decode_sample(raw, SHAPES, "train-000003.tar")
        assert caught.value.field == field and caught.value.key == "000123"
        assert str(caught.value).startswith(f"shard train-000003.tar sample 000123: {field}: ")
        assert reason in str(caught.value)


# -- loader order ------------------------------------------------------------------------


def loader_at(tmp_path, batch_size, seed, **kw):
    return make_loader(tmp_path, batch_size=batch_size, seed=seed, **kw)


def by_position(batches: list[dict]) -> dict[int, str]:
    return {int(p): k for batch in batches for p, k in zip(batch["positions"], batch["keys"])}


def test_lane_arithmetic():
    assert [auto_lanes(n) for n in (1, 2, 3, 8, 20, 1000, 1024, 4096)] == [1, 2, 1, 8, 4, 8, 64, 64]
    assert [slots_before(10, lane, 4) for lane in range(4)] == [3, 3, 2, 2]  # positions 0..9 over 4 lanes
    assert rank_positions(16, 1, 2, 3) == [17, 19, 21]


def test_every_sample_once_per_epoch_across_ranks_and_workers(tmp_path):
    write_shards(tmp_path)  # 8 shards x 10 -> 8 lanes; 2 ranks x 2 workers, 2 lanes each
    keys = []
    for rank in range(2):
        batches = take(loader_at(tmp_path, 5, 3, rank=rank, world_size=2, num_workers=2), 8)
        for batch in batches:
            assert batch["latent"].shape == (5, *LATENT) and batch["time_ids"].shape == (5, 6)
            # The stored dtype (float16) travels; the loop casts to float32 on the device.
            assert batch["latent"].dtype == torch.float16 and batch["time_ids"].dtype == torch.float32
            # Each row is the sample its key names; the positions are the rank's: p % 2 == rank.
            assert [int(v) for v in batch["latent"][:, 0, 0, 0]] == [int(k) for k in batch["keys"]]
            assert batch["caption"] == [f"caption {int(k)}" for k in batch["keys"]]
            assert all(int(p) % 2 == rank for p in batch["positions"])
        keys += keys_of(batches)
    assert sorted(keys) == [f"{i:06d}" for i in range(80)]


def test_order_follows_seed_and_epoch(tmp_path):
    write_shards(tmp_path)
    first = keys_of(take(loader_at(tmp_path, 8, 1), 20))
    again = keys_of(take(loader_at(tmp_path, 8, 1), 20))
    other = keys_of(take(loader_at(tmp_path, 8, 2), 20))
    assert first == again and first != other
    epoch_0, epoch_1 = first[:80], first[80:160]
    assert sorted(epoch_0) == sorted(epoch_1) == [f"{i:06d}" for i in range(80)]
    assert epoch_0 != epoch_1


@pytest.mark.parametrize("world_size, num_workers", [(2, 0), (4, 1), (8, 2)])
def test_positions_hold_the_same_samples_on_any_world_size(tmp_path, world_size, num_workers):
    """A job's position p is the same sample whether 1, 2, 4 or 8 ranks read (with or without workers):
    the same run, split differently."""
    write_shards(tmp_path)
    one_rank = by_position(take(loader_at(tmp_path, 4, 7), 40))  # positions 0..159: two epochs
    split = {}
    for rank in range(world_size):
        split.update(by_position(take(loader_at(tmp_path, 4, 7, rank=rank, world_size=world_size,
                                                num_workers=num_workers), 40 // world_size)))
    assert split == one_rank and sorted(split) == list(range(160))


def assert_same_batches(left: list[dict], right: list[dict]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a["keys"] == b["keys"] and a["caption"] == b["caption"] and torch.equal(a["positions"], b["positions"])
        for name in ("latent", "prompt_embeds", "pooled", "time_ids"):
            assert torch.equal(a[name], b[name])


@pytest.mark.parametrize("num_workers, total, start", [(0, 30, 11), (2, 24, 7)])
def test_resume_gives_the_uninterrupted_batches(tmp_path, num_workers, total, start):
    write_shards(tmp_path)
    # batch 3 does not divide the shards: batches straddle shards and epochs.
    for rank in range(2):
        def loader(start_batch):
            return loader_at(tmp_path, 3, 5, rank=rank, world_size=2, num_workers=num_workers,
                             start_position=start_batch * 3 * 2)
        assert_same_batches(take(loader(0), total)[start:], take(loader(start), total - start))


def test_resume_skips_whole_shards_unread(tmp_path, monkeypatch):
    write_shards(tmp_path)
    reads = []

    def recording_read(path):
        reads.append(Path(path).name)
        return read_raw_samples(path)

    monkeypatch.setattr(loader_module, "read_raw_samples", recording_read)
    full = take(loader_at(tmp_path, 4, 0, lanes=1), 12)
    reads_full = list(reads)
    reads.clear()
    # One lane: position 28 is slot 28, so the epoch's shards 1 and 2 are skipped, the 3rd is read.
    assert_same_batches(full[7:], take(loader_at(tmp_path, 4, 0, lanes=1, start_position=28), 5))
    assert reads == reads_full[2:]


def test_lanes_that_the_shards_or_the_ranks_cannot_have(tmp_path):
    write_shards(tmp_path, num_samples=30, per_shard=10)
    with pytest.raises(ValueError, match=r"data.lanes=4: .* only 3 shards"):
        make_loader(tmp_path, batch_size=4, seed=0, lanes=4)
    with pytest.raises(ValueError, match=r"1 data lanes cannot be split over 2 ranks: .*multiple of 2 shards"):
        make_loader(tmp_path, batch_size=4, seed=0, rank=0, world_size=2)  # 3 shards -> 1 lane


# -- bad data ----------------------------------------------------------------------------


def corrupt_shard(path: Path) -> list[str]:
    """Rewrite a shard with a NaN latent, a wrong-shaped latent and a missing prompt_embeds."""
    samples, error = read_raw_samples(str(path))
    assert error is None
    samples[0]["latent.npy"] = encode_npy(np.full(LATENT, np.nan, np.float16))
    samples[1]["latent.npy"] = encode_npy(np.zeros((12, 16, 15), np.float16))
    del samples[2]["prompt_embeds.npy"]
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    return [sample["__key__"] for sample in samples[:3]]


def truncate_shard(path: Path, keep_fraction: float = 0.5) -> int:
    """Cut the file (at half by default); return how many samples are still readable."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    samples, error = read_raw_samples(str(path))
    assert error is not None or len(samples) < 10
    return len(samples)


def test_bad_samples_and_truncated_shard_are_reported_skipped_counted(tmp_path, caplog):
    write_shards(tmp_path)
    bad_keys = corrupt_shard(tmp_path / "train-000001.tar")
    kept = truncate_shard(tmp_path / "train-000002.tar")
    assert 0 < kept < 10
    loader = loader_at(tmp_path, 5, 0, max_bad_fraction=0.5)
    stream = loader.stream
    with caplog.at_level(logging.WARNING, logger="trainer.data.loader"):
        batches = take(loader, 32)  # two epochs of 80 slots

    messages = [record.getMessage() for record in caplog.records]
    for reason in ("latent.npy: contains NaN", "latent.npy: expected shape [12,16,16] got [12,16,15]",
                   "prompt_embeds.npy: missing"):
        hits = [m for m in messages if reason in m]
        assert len(hits) == 1, (reason, messages)  # reported once, not once per epoch
        assert "train-000001.tar" in hits[0]
    truncated = [m for m in messages if "train-000002.tar" in m]
    assert len(truncated) == 1 and str(tmp_path) in truncated[0]
    assert f"read {kept} of 10 samples" in truncated[0] and "Error" in truncated[0]

    bad_per_epoch = 3 + (10 - kept)
    assert stream.stats()["samples_bad"] == 2 * bad_per_epoch
    assert stream.stats()["samples_ok"] == 2 * (80 - bad_per_epoch)
    # Data still flows: full-size, finite batches, and no bad sample in them.
    seen = set()
    for batch in batches:
        assert batch["latent"].shape == (5, *LATENT) and torch.isfinite(batch["latent"]).all()
        seen.update(batch["keys"])
    assert not seen & set(bad_keys) and len(seen) == 80 - bad_per_epoch


def test_resume_over_bad_data_gives_the_same_batches(tmp_path):
    write_shards(tmp_path)
    corrupt_shard(tmp_path / "train-000004.tar")
    truncate_shard(tmp_path / "train-000006.tar")

    def stream(start_batch):
        return loader_at(tmp_path, 6, 2, start_position=6 * start_batch, max_bad_fraction=0.5)
    assert_same_batches(take(stream(0), 30)[13:], take(stream(13), 17))


def test_batches_with_no_good_sample_keep_positions(tmp_path):
    write_shards(tmp_path)
    assert truncate_shard(tmp_path / "train-000003.tar", keep_fraction=0.1) <= 1
    # With batch 2, the shard's 9-10 lost slots leave whole windows without a good sample.

    def stream(start_batch):
        return loader_at(tmp_path, 2, 4, start_position=2 * start_batch, max_bad_fraction=0.5, lanes=1)
    full = take(stream(0), 60)
    assert all(len(batch["keys"]) == 2 for batch in full)
    assert [int(p) for b in full for p in b["positions"]] == list(range(120))  # every position keeps its place
    # Some batch is stood in for by the next one with data.
    assert any(a["keys"] == b["keys"] for a, b in zip(full, full[1:]))
    for start in range(0, 56, 3):
        assert_same_batches(full[start:start + 4], take(stream(start), 4))


def test_too_many_bad_samples_stop_with_a_clear_error(tmp_path):
    write_shards(tmp_path, num_samples=200, per_shard=20)
    truncate_shard(tmp_path / "train-000003.tar")
    with pytest.raises(RuntimeError, match=r"too many bad samples: \d+ of \d+ \(\d+\.\d%\) > "
                                           r"data\.max_bad_fraction=1%"):
        take(loader_at(tmp_path, 10, 0), 40)


@pytest.mark.parametrize("damage", ["garbage", "directory", "missing"])
def test_a_shard_that_cannot_be_read_is_reported_and_skipped(tmp_path, caplog, damage):
    """Not a tar at all, unreadable (a directory in its place), or gone since index.json was written: reported with its path,
    its samples counted bad, the other shards keep feeding the run."""
    write_shards(tmp_path)
    shard = tmp_path / "train-000003.tar"
    if damage == "garbage":
        shard.write_bytes(b"this is not a tar file" * 100)
    elif damage == "directory":
        shard.unlink()
        shard.mkdir()
    else:
        shard.unlink()
    loader = loader_at(tmp_path, 5, 0, max_bad_fraction=0.5)
    stream = loader.stream
    with caplog.at_level(logging.WARNING, logger="trainer.data.loader"):
        batches = take(loader, 16)  # one epoch of 80 slots
    hits = [r.getMessage() for r in caplog.records if "train-000003.tar" in r.getMessage()]
    assert len(hits) == 1 and str(tmp_path) in hits[0]
    assert stream.stats()["samples_bad"] == 10 and stream.stats()["samples_ok"] == 70
    assert all(torch.isfinite(b["latent"]).all() for b in batches)


def test_fast_shard_reader_matches_webdataset_and_falls_back(tmp_path):
    """The project's shards take the one-read, zero-copy path (trainer/data/tarscan.py) and give exactly what
    webdataset's reader gives; a tar it does not handle (here gzip-compressed) goes to webdataset's."""
    import gzip

    import webdataset as wds

    from trainer.data.loader import read_raw_samples
    from trainer.data.tarscan import read_plain_shard

    write_shards(tmp_path)
    path = str(sorted(tmp_path.glob("*.tar"))[0])
    fast = read_plain_shard(path)
    with open(path, "rb") as stream:
        general = list(wds.tariterators.group_by_keys(
            {**e, "__url__": path} for e in wds.tariterators.tar_file_iterator(stream)))
    assert fast is not None and len(fast) == len(general) == 10
    for a, b in zip(fast, general):
        assert a.keys() == b.keys() and a["__key__"] == b["__key__"]
        assert all(bytes(a[k]) == bytes(b[k]) for k in a if not k.startswith("__"))
    zipped = tmp_path / "zipped.tar.gz"
    zipped.write_bytes(gzip.compress(open(path, "rb").read()))
    assert read_plain_shard(str(zipped)) is None
    samples, error = read_raw_samples(str(zipped))
    assert error is None and [s["__key__"] for s in samples] == [s["__key__"] for s in general]
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(open(path, "rb").read()[:5000])
    assert read_plain_shard(str(truncated)) is None


def test_npy_views_and_refusals():
    import io as _io

    from trainer.data.shards import decode_npy, encode_npy

    array = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    buffer = bytearray(encode_npy(array))
    view = decode_npy(memoryview(buffer))
    assert np.array_equal(view, array) and view.flags.writeable
    assert np.shares_memory(view, np.frombuffer(buffer, dtype=np.uint8))  # a view, no copy
    fortran = np.asfortranarray(array.astype(">f4"))
    out = _io.BytesIO()
    np.save(out, fortran)
    assert np.array_equal(decode_npy(out.getvalue()), array.astype(np.float32))
    out = _io.BytesIO()
    np.save(out, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object arrays"):
        decode_npy(out.getvalue())
