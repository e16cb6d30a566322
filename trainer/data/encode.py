"""Cache a captioned image set as shards of latents and text embeddings (done once per dataset).

    python -m trainer.encode --model MODEL_DIR --out shards/ --source shapes --count 20000
    python -m trainer.encode --model sdxl/ --out shards/ --source folder --input photos/
    python -m trainer.encode --model sdxl/ --out shards/ --source wds --input 'data/{00000..00099}.tar'

Training then never runs the VAE or the text encoders. Sources yield (image, caption, key) tuples,
optionally with a fourth element naming where the sample came from (used in messages); the image
may be a PIL image, a uint8 HxWx3 array, encoded bytes or a file path, so that decoding happens
here, where an unreadable image can be skipped and counted instead of stopping a long run.
"""

from __future__ import annotations

import argparse
import glob
import io
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from trainer.data.encoders import Encoders, load_encoders
from trainer.data.shards import ShardWriter

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# PIL raises all of these for corrupt, truncated or hostile files.
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

Sample = tuple  # (image, caption, key) or (image, caption, key, origin)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def iter_shapes(count: int, seed: int = 0, resolution: int = 32, options=None) -> Iterator[Sample]:
    """The embedded captioned-shapes data, rendered at the target resolution (no resize); `options` a
    trainer.data.shapes.ShapesOptions (default: the plain data)."""
    from trainer.data.shapes import PLAIN, ShapesDataset

    dataset = ShapesDataset(count, seed=seed, resolution=resolution, options=options or PLAIN)
    for index in range(len(dataset)):
        item = dataset[index]
        yield item.image, item.caption, f"shapes-s{seed}-{index:08d}"


def find_images(folder: str | Path) -> list[Path]:
    """Every image file under folder (recursively), sorted so that runs are reproducible."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise FileNotFoundError(f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def iter_image_folder(folder: str | Path) -> Iterator[Sample]:
    """Image files paired with a same-stem .txt caption (photo.jpg + photo.txt).

    The folder is listed now, so a missing or empty folder fails at the call, not mid-run. An
    image without its caption file is passed on with caption None: encode_to_shards reports
    and skips it.
    """
    folder = Path(folder)
    images = find_images(folder)

    def samples() -> Iterator[Sample]:
        for path in images:
            caption_path = path.with_suffix(".txt")
            caption = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else None
            relative = path.relative_to(folder)
            yield path, caption, sample_key(str(relative.with_suffix(""))), str(path)

    return samples()


def expand_shard_pattern(pattern: str) -> list[str]:
    """A tar path, a folder of tars, a glob ('data/*.tar') or a brace pattern ('{000..099}.tar')."""
    if Path(pattern).is_dir():
        urls = sorted(str(p) for p in Path(pattern).glob("*.tar"))
    elif any(ch in pattern for ch in "*?["):
        urls = sorted(glob.glob(pattern))
    elif "{" in pattern:
        from braceexpand import braceexpand  # a webdataset dependency

        urls = list(braceexpand(pattern))
    else:
        urls = [pattern]
    if not urls:
        raise FileNotFoundError(f"no tar shards match {pattern}")
    local = [url for url in urls if "://" not in url and not url.startswith("pipe:")]
    absent = [url for url in local if not Path(url).is_file()]
    if absent:
        raise FileNotFoundError(f"shard files not found: {', '.join(absent[:5])}")
    return urls


def iter_image_shards(pattern: str) -> Iterator[Sample]:
    """img2dataset-style WebDataset tars: each sample has an image (jpg/png/webp) and a txt."""
    import webdataset as wds

    urls = expand_shard_pattern(pattern)

    def samples() -> Iterator[Sample]:
        # Raw bytes, no decode(): images are decoded in encode_to_shards, where a bad one is
        # counted and skipped. A corrupt tar is reported by webdataset and the rest goes on.
        dataset = wds.WebDataset(urls, shardshuffle=False, handler=wds.warn_and_continue, empty_check=False)
        for raw in dataset:
            origin = f"{raw.get('__url__', '?')}:{raw['__key__']}"
            image = next((raw[ext] for ext in ("jpg", "jpeg", "png", "webp", "bmp") if ext in raw), None)
            caption = raw["txt"].decode("utf-8", errors="replace").strip() if "txt" in raw else None
            yield image, caption, sample_key(raw["__key__"]), origin

    return samples()


def sample_key(name: str) -> str:
    """A shard key from a name: '.' and '/' would split a tar sample, so they become '_'."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name) or "_"


# --------------------------------------------------------------------------------------------
# Images: decode, resize, crop
# --------------------------------------------------------------------------------------------


class UnreadableImage(Exception):
    pass


def load_rgb(image: Any) -> Image.Image | np.ndarray:
    """A PIL image or HxWx3 uint8 array, from any form a source may yield."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise UnreadableImage(f"array must be uint8 HxWx3, got {image.dtype} {image.shape}")
        return image
    if image is None:
        raise UnreadableImage("no image in the sample (expected jpg, png or webp)")
    try:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
        with Image.open(source) as opened:
            return opened.convert("RGB")  # convert() forces the full decode inside the try
    except _IMAGE_ERRORS as error:
        raise UnreadableImage(f"{type(error).__name__}: {error}") from error


@dataclass
class PreparedImage:
    pixels: np.ndarray  # uint8 [R, R, 3]
    original_hw: tuple[int, int]
    crop_tl: tuple[int, int]  # top, left of the crop in the resized image (SDXL's convention)


def resize_and_crop(image: Image.Image | np.ndarray, resolution: int) -> PreparedImage:
    """Resize the short side to `resolution`, then take the centre square."""
    if isinstance(image, np.ndarray):
        if image.shape[:2] == (resolution, resolution):
            return PreparedImage(image, (resolution, resolution), (0, 0))
        image = Image.fromarray(image)
    width, height = image.size
    scale = resolution / min(width, height)
    new_width, new_height = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.LANCZOS)
    top, left = (new_height - resolution) // 2, (new_width - resolution) // 2
    pixels = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)
    return PreparedImage(pixels, (height, width), (top, left))


def to_model_range(pixels: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,H,W] in [-1,1]."""
    batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    key: str
    caption: str
    image: PreparedImage


def _write_batch(encoders: Encoders, batch: list[_Pending], writer: ShardWriter) -> None:
    latents = encoders.codec.encode(to_model_range([p.image.pixels for p in batch]))
    text = encoders.text.encode([p.caption for p in batch])
    latents = latents.float().cpu().numpy()
    embeds = text.prompt_embeds.float().cpu().numpy()
    pooled = text.pooled.float().cpu().numpy() if text.pooled is not None else None
    for i, pending in enumerate(batch):
        size = pending.image.pixels.shape[:2]
        time_ids = encoders.time_ids(pending.image.original_hw, pending.image.crop_tl, size)
        writer.write(
            pending.key,
            latents[i],
            embeds[i],
            pooled=pooled[i] if pooled is not None else None,
            time_ids=time_ids,
            caption=pending.caption,
        )


def encode_to_shards(
    encoders: Encoders,
    samples: Iterable[Sample],
    out_dir: str | Path,
    resolution: int,
    batch_size: int = 64,
    samples_per_shard: int = 1000,
    dtype: str = "float16",
    total: int | None = None,
    progress: bool = True,
    vae_slicing: bool = True,
) -> dict[str, Any]:
    """Encode samples in batches and write them as shards (plus index.json) into out_dir.

    Unreadable images and images without a caption are reported as they occur, skipped and
    listed in the returned stats; a source that yields nothing usable is an error (and then no
    shard or index is written).

    vae_slicing (default on) turns on the codec's slicing: a VAE encodes the batch one image at a time,
    as the paper does for SDXL at 1024 px, so the batch size sets the text encoders' and the writer's
    batch, never the VAE's peak memory. The latents are the unsliced ones to float rounding
    (tests/test_vae_slicing.py); the toy's codec has nothing to slice.
    """
    start = time.perf_counter()
    if vae_slicing:
        encoders.codec.enable_slicing()
    writer: ShardWriter | None = None  # opened on the first batch: an empty source writes nothing
    skipped: list[str] = []
    batch: list[_Pending] = []
    bar = tqdm(total=total, unit="img", desc="encode", disable=not progress, dynamic_ncols=True)

    def flush() -> None:
        nonlocal writer
        if writer is None:
            writer = ShardWriter(out_dir, samples_per_shard=samples_per_shard, dtype=dtype)
        _write_batch(encoders, batch, writer)
        bar.update(len(batch))
        batch.clear()

    try:
        with torch.no_grad():
            for sample in samples:
                image, caption, key = sample[:3]
                origin = sample[3] if len(sample) > 3 else key
                try:
                    if caption is None:
                        raise UnreadableImage("no caption (expected a .txt beside the image)")
                    prepared = resize_and_crop(load_rgb(image), resolution)
                except UnreadableImage as error:
                    skipped.append(f"{origin}: {error}")
                    bar.update(1)
                    tqdm.write(f"skipped {origin}: {error}", file=sys.stderr)
                    continue
                batch.append(_Pending(key, caption, prepared))
                if len(batch) == batch_size:
                    flush()
            if batch:
                flush()
    except BaseException:
        if writer is not None:
            writer.abort()  # keep complete shards, never an index that claims an unfinished set
        raise
    finally:
        bar.close()

    if writer is None:
        detail = f" ({len(skipped)} skipped, first: {skipped[0]})" if skipped else ""
        raise ValueError(f"the source yielded no usable samples{detail}")
    writer.close()
    if skipped:
        print(f"skipped {len(skipped)} unusable samples:", *skipped, sep="\n  ", file=sys.stderr)
    return {
        "samples": writer.num_samples,
        "shards": len(writer.shards),
        "skipped": len(skipped),
        "skipped_samples": skipped,
        "shapes": writer.shapes,
        "out_dir": str(out_dir),
        "seconds": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.encode",
        description="\n\n".join(__doc__.split("\n\n")[:2]),  # the summary and the examples
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True,
                        help="model folder (diffusers SDXL / SD 1.5 layout, or the toy), or a single-file checkpoint "
                             "(.safetensors, with --model-config)")
    parser.add_argument("--model-config", help="a single-file --model: diffusers folder of its architecture")
    parser.add_argument("--converted", help="a single-file --model: where its diffusers folder is written "
                                            "(default <out>/base_model; give it to the recipe as model.base to reuse it)")
    parser.add_argument("--out", required=True, help="folder for the shards and index.json")
    parser.add_argument("--source", choices=("shapes", "folder", "wds"), default="shapes")
    parser.add_argument("--input", help="folder of image + .txt pairs, or tar path/glob/brace pattern")
    parser.add_argument("--count", type=int, default=10_000, help="shapes: number of images")
    parser.add_argument("--seed", type=int, default=0, help="shapes: dataset seed")
    parser.add_argument("--resolution", type=int, help="square image size (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.source != "shapes" and not args.input:
        parser.error(f"--source {args.source} needs --input")
    if args.model.endswith(".safetensors") and not args.model_config:
        parser.error(f"--model {args.model} is a single-file checkpoint: give --model-config, the diffusers folder "
                     "of its architecture (the SDXL or SD 1.5 base)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        # Check the input before loading the models: a typo should fail in a second, not a minute.
        total = None
        if args.source == "folder":
            samples, total = iter_image_folder(args.input), len(find_images(args.input))
        elif args.source == "wds":
            samples = iter_image_shards(args.input)
        model = args.model
        from trainer.base_model import convert_single_file, is_single_file

        if is_single_file(model):

            model = convert_single_file(model, args.model_config, args.converted or Path(args.out) / "base_model")
        encoders = load_encoders(model, device=args.device)
        resolution = args.resolution or encoders.resolution
        if args.source == "shapes":
            samples, total = iter_shapes(args.count, args.seed, resolution), args.count
        stats = encode_to_shards(
            encoders, samples, args.out, resolution, batch_size=args.batch_size,
            samples_per_shard=args.samples_per_shard, dtype=args.dtype, total=total,
        )
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(
        f"wrote {stats['samples']} samples in {stats['shards']} shards to {stats['out_dir']} "
        f"({stats['seconds']:.1f} s, {stats['skipped']} skipped); shapes {stats['shapes']}"
    )
    return stats


if __name__ == "__main__":
    main()
