"""FID-Whole, FID-Patch and text alignment of exported models against a reference image set.

    python eval/fid_patch.py --model runs/shapes/exports/stage3_4 --steps 4 --reference shapes \
        --backend shapes --out runs/shapes/eval/stage3_4

For every --model (an export folder, or a diffusers SDXL / SD 1.5 folder) and every --steps (default: the
export's own steps) it generates --count images from the reference's prompts with fixed seeds, through
diffusers objects (eval.generate), and scores them (eval.scoring) with the chosen feature backend
(eval.features):
  FID-Whole  the whole image resized to the extractor's input (16 px shapes classifier, 299 px Inception),
  FID-Patch  the centre crop of each full-resolution image at the extractor's input size, no resizing
             (n/a where images are smaller than that input),
  alignment  shapes: attribute accuracy of the shapes classifier; inception: CLIP score (--clip),
  and with the shapes reference the share of images with a second copy of the shape or a filled shape
  drawn hollow (eval/pixel_scores.py failure_signatures; with --objects above 1 eval/scene_scores.py's
  quadrant rules, which also count missing and misplaced shapes, wrong colours and the scenes drawn as
  captioned); with --position-in-caption below 1 (data whose captions leave the position out, so a prompt
  has several modes) also those shares over the position-free prompts alone (`<failure>_rate_position_free`),
  where a blend of modes shows as a second copy.
Writes to --out: results.json, results.md, grid.png (reference row + one row per model and step count,
same prompts and noise), fid_vs_steps.png, and a TensorBoard event file under tb/.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from eval.features import make_backend  # noqa: E402
from eval.pixel_scores import background_grain, failure_signatures  # noqa: E402
from eval.plot import labelled_grid, metrics_vs_steps  # noqa: E402
from eval.reference import REFERENCE_SEED, ReferenceSet  # noqa: E402
from eval.scene_scores import scene_signatures  # noqa: E402
from eval.sample_cache import RecordingSampler, ReplaySampler, load_samples, sample_key, save_samples  # noqa: E402
from eval.report import markdown_table, update_model_card, write_results  # noqa: E402
from eval.scoring import SetScores  # noqa: E402
from eval.tensorboard_log import write_eval_tensorboard  # noqa: E402
from trainer.data.shapes import TEXTURES, ShapesOptions, parse_scene  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--model", action="append", required=True, type=Path, help="export or model folder (repeatable)")
    p.add_argument("--lora", action="append", default=[],
                   help="a diffusers LoRA .safetensors (or a LoRA export folder, exports/<stage>_lora) to load onto "
                        "the model, e.g. the base model: once for every --model, or once per --model in order ('none' "
                        "for a model without). A LoRA export's steps, guidance and scheduler are used, and "
                        "--update-model-card writes into its card")
    p.add_argument("--label", action="append", default=[], help="row name per --model (default: the folder's name)")
    p.add_argument("--teacher", type=Path, default=None,
                   help="an export folder whose own samples (its steps and guidance, the rows' prompts and noise) "
                        "are a second reference: every row also gets FID-Whole and FID-Patch against them "
                        "(how faithfully a student reproduces its teacher, beside how close it is to the data)")
    p.add_argument("--teacher-steps", type=int, default=None, help="the --teacher's steps (default: its export's)")
    p.add_argument("--teacher-guidance", type=float, default=None, help="the --teacher's CFG (default: its export's)")
    p.add_argument("--teacher-cache", type=Path, default=None,
                   help="a folder keeping the --teacher's sampled images between runs (keyed by the model's files, "
                        "steps, guidance, seed, dtype, device and prompts): later runs re-score them, not re-sample")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="step counts (default: each export's own)")
    p.add_argument("--guidance", type=float, action="append", default=[],
                   help="CFG scale, once for every --model or once per --model (default: the export's; 1 = none)")
    p.add_argument("--reference", required=True, help="'shapes' or a folder of images (+ name.txt captions)")
    p.add_argument("--prompts", type=Path, default=None, help="prompts file, one a line (default: the reference's captions)")
    p.add_argument("--reference-resolution", type=int, default=32, help="shapes reference image size")
    p.add_argument("--position-in-caption", type=float, default=1.0,
                   help="shapes reference: the share of captions naming the position (the data's "
                        "data.shapes.position_in_caption)")
    p.add_argument("--texture", choices=TEXTURES, default="none",
                   help="shapes reference: the data's data.shapes.texture")
    p.add_argument("--dots", type=int, default=0, help="shapes reference: the data's data.shapes.dots")
    p.add_argument("--objects", type=int, default=1,
                   help="shapes reference: the data's data.shapes.objects; above 1 the failure counts are read "
                        "quadrant by quadrant and the shapes classifier's alignment (one shape) is skipped")
    p.add_argument("--backend", choices=("shapes", "inception"), default="shapes")
    p.add_argument("--classifier", type=Path, default=None, help="shapes classifier (default: assets/shapes_classifier.safetensors)")
    p.add_argument("--inception", type=Path, default=None, help="pt_inception-2015-12-05-6726825d.pth (inception backend)")
    p.add_argument("--clip", type=Path, default=None, help="transformers CLIPModel folder for the CLIP score (inception backend)")
    p.add_argument("--inception-dims", type=int, choices=(64, 192, 768, 2048), default=2048,
                   help="Inception features: 2048 (pool3, the standard FID) or an earlier block's, as pytorch-fid's --dims")
    p.add_argument("--count", type=int, default=1000, help="images per model and step count (and reference images)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="noise seed: image i starts from the noise of (seed, i)")
    p.add_argument("--bootstrap", type=int, default=200,
                   help="resamples for the 95%% bootstrap intervals of FID and alignment (0: none; each resample "
                        "recomputes both FIDs, slow with 2048-d Inception features)")
    p.add_argument("--save-features", action="store_true",
                   help="also write features.npz: every image's whole and patch features and alignment, for the "
                        "reference ('reference.<kind>'), the --teacher ('teacher.<kind>') and each row i "
                        "('row<i>.<kind>'), in prompt order: paired comparisons across runs (needs --bootstrap > 0)")
    p.add_argument("--grid-count", type=int, default=8, help="images per row of grid.png")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="sampling dtype")
    p.add_argument("--update-model-card", action="store_true", help="write the rows into each export's README.md")
    p.add_argument("--no-tensorboard", action="store_true")
    args = p.parse_args(argv)
    n = len(args.model)
    if len(args.lora) not in (0, 1, n):
        p.error(f"--lora given {len(args.lora)} times for {n} models: give it once or once per model")
    if len(args.guidance) not in (0, 1, n):
        p.error(f"--guidance given {len(args.guidance)} times for {n} models: give it once or once per model")
    if args.label and len(args.label) != n:
        p.error(f"--label given {len(args.label)} times for {n} models")
    if args.save_features and args.bootstrap <= 0:
        p.error("--save-features keeps the per-image features that --bootstrap keeps: give --bootstrap > 0")
    return args


def _loras(args) -> list:
    loras = args.lora * len(args.model) if len(args.lora) == 1 else (args.lora or [None] * len(args.model))
    return [None if lora in (None, "none") else Path(lora) for lora in loras]


def pixel_rules(args: argparse.Namespace):
    """The shapes reference's per-image failure rules, (uint8 images, captions) -> {name: bool per image}: one
    shape's, or with several shapes per image the quadrant rules; None for another reference."""
    if args.reference != "shapes":
        return None
    rules = failure_signatures if args.objects == 1 else scene_signatures
    return lambda images, captions: rules(images, captions, args.texture)


def with_alignment(args: argparse.Namespace, backend) -> bool:
    """The shapes classifier's alignment reads one-shape captions; CLIP's reads any."""
    return backend.name != "shapes" or args.objects == 1


def score_reference(reference: ReferenceSet, backend, batch_size: int, grid_count: int, keep_features: bool = False,
                    alignment: bool = True):
    """The reference's scores, its first `grid_count` images, and (shapes reference) its background std."""
    scores = SetScores(backend, alignment=alignment, keep_features=keep_features)
    grid, grain = [], []
    for images, captions in tqdm(reference.batches(batch_size), total=-(-reference.count // batch_size),
                                 desc="reference", unit="batch"):
        scores.add(images, captions if all(c is not None for c in captions) else None)
        grid.extend(images[:max(0, grid_count - len(grid))])
        if reference.source == "shapes":
            grain.append(background_grain(np.asarray(images)) * len(images))
    return scores, grid, (sum(grain) / reference.count if grain else None)


def sample_scores(sampler, prompts: list[str], steps: int, guidance: float, args: argparse.Namespace, backend,
                  keep: bool, desc: str):
    """Scores of `sampler`'s images of `prompts` (image i from the noise of (args.seed, i)); also the
    images' failure counts and background grain where the reference is the shapes set."""
    scores, grid, seconds = SetScores(backend, alignment=with_alignment(args, backend), keep_features=keep), [], 0.0
    rules = pixel_rules(args)
    failures, failures_free, free_count = {}, {}, 0  # failures_free: over the prompts that name no position
    grain_sum = 0.0  # background grain (pixel std of the flat background), summed over batches
    for start in tqdm(range(0, args.count, args.batch_size), desc=desc, unit="batch"):
        idx = list(range(start, min(start + args.batch_size, args.count)))
        batch_prompts = [prompts[i] for i in idx]
        t0 = time.perf_counter()
        images = sampler.sample(batch_prompts, idx, steps, guidance, args.seed)
        seconds += time.perf_counter() - t0
        scores.add(images, batch_prompts)
        if rules is not None:  # the one-step failure signatures, by a pixel rule
            free = np.array([parse_scene(p)[0][2] is None for p in batch_prompts])
            free_count += int(free.sum())
            for key, found in rules(images, batch_prompts).items():
                failures[key] = failures.get(key, 0) + int(found.sum())
                failures_free[key] = failures_free.get(key, 0) + int(found[free].sum())
            grain_sum += background_grain(images) * len(idx)
        grid.extend(images[:max(0, args.grid_count - len(grid))])
    extra = {"sec_per_image": seconds / args.count}
    if rules is not None:
        extra.update({f"{k}_rate": v / args.count for k, v in failures.items()})
        if free_count:
            extra.update({f"{k}_rate_position_free": v / free_count for k, v in failures_free.items()})
            extra["position_free_count"] = free_count
        extra["background_grain"] = grain_sum / args.count
    return scores, grid, extra


def teacher_reference(args: argparse.Namespace, prompts: list[str], backend, keep: bool) -> tuple[SetScores, dict]:
    """The --teacher's scores on the rows' prompts and noise, and what was sampled (model, steps, guidance) with
    its failure rates and background grain (shapes reference)."""
    from eval.generate import ExportSampler

    sampler = ExportSampler(args.teacher, None, args.device, DTYPES[args.dtype])
    steps = args.teacher_steps or sampler.default_steps
    if steps is None:
        raise SystemExit(f"--teacher {args.teacher} has no export.json saying its steps: pass --teacher-steps")
    guidance = args.teacher_guidance if args.teacher_guidance is not None else sampler.default_guidance
    key = sample_key(args.teacher, steps, guidance, args.seed, args.dtype, args.device, prompts[:args.count])
    cached = load_samples(args.teacher_cache, key) if args.teacher_cache else None
    source = ReplaySampler(cached) if cached is not None else RecordingSampler(sampler)
    desc = f"teacher {steps} steps" + (" (cached)" if cached is not None else "")
    scores, _, extra = sample_scores(source, prompts, steps, guidance, args, backend, keep, desc=desc)
    if args.teacher_cache and cached is None:
        save_samples(args.teacher_cache, key, source.stacked())
    extra.pop("sec_per_image")  # a replayed cache's time says nothing
    return scores, {"model": str(args.teacher), "steps": steps, "guidance": guidance, **extra}


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python eval/fid_patch.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    with torch.no_grad():
        return evaluate(args, command)


def evaluate(args: argparse.Namespace, command: str) -> int:
    from eval.generate import ExportSampler

    backend = make_backend(args.backend, classifier=args.classifier, inception=args.inception, clip=args.clip,
                           device=args.device, inception_dims=args.inception_dims)
    options = ShapesOptions(args.position_in_caption, args.texture, args.dots, args.objects)
    reference = ReferenceSet(args.reference, args.count, args.reference_resolution, args.prompts, options=options)
    keep = args.bootstrap > 0
    alignment = with_alignment(args, backend)
    ref_scores, ref_grid, ref_grain = score_reference(reference, backend, args.batch_size, args.grid_count, keep,
                                                      alignment)
    meta = {"command": command, "backend": backend.name, "alignment_name": backend.alignment_name,
            "reference": args.reference, "count": args.count, "seed": args.seed,
            "reference_alignment": ref_scores.alignment().get("alignment"),
            "reference_background_grain": ref_grain,
            "reference_options": dataclasses.asdict(options) if args.reference == "shapes" else None}
    if args.reference == "shapes":  # the floor: other real images of the same prompts, scored like a model
        floor_scores, _, _ = score_reference(reference.same_prompts(REFERENCE_SEED + 1), backend, args.batch_size, 0, keep,
                                             alignment)
        floor = floor_scores.compare(ref_scores, args.bootstrap)
        meta["floor"] = {k: v for k, v in floor.items() if k.startswith(("fid_whole", "fid_patch"))}

    rows, grid_rows = [], [("reference", ref_grid)]
    kept = {"reference": ref_scores}  # what --save-features writes
    prompts = reference.prompts
    teacher_scores = None
    if args.teacher is not None:  # the second reference: the teacher's samples of the same prompts and noise
        teacher_scores, meta["teacher_reference"] = teacher_reference(args, prompts, backend, keep)
        kept["teacher"] = teacher_scores
    for m, (model_dir, lora) in enumerate(zip(args.model, _loras(args))):
        sampler = ExportSampler(model_dir, lora, args.device, DTYPES[args.dtype])
        label = args.label[m] if args.label else model_dir.name + ("+lora" if lora else "")
        step_counts = args.steps or [sampler.default_steps]
        if None in step_counts:
            raise SystemExit(f"{model_dir} has no export.json saying its steps: pass --steps")
        given = args.guidance[0] if len(args.guidance) == 1 else (args.guidance[m] if args.guidance else None)
        guidance = given if given is not None else sampler.default_guidance
        model_rows = []
        for steps in step_counts:
            scores, grid, extra = sample_scores(sampler, prompts, steps, guidance, args, backend, keep,
                                                desc=f"{label} {steps} steps")
            row = {"label": label, "model": str(model_dir), "lora": str(lora) if lora else None, "steps": steps,
                   "guidance": guidance, "prediction_type": sampler.prediction_type,
                   "stage": sampler.manifest.get("stage"), "variant": sampler.manifest.get("variant"),
                   **scores.compare(ref_scores, args.bootstrap), "count": args.count, "backend": backend.name, **extra}
            if teacher_scores is not None:
                versus = scores.compare(teacher_scores, args.bootstrap)
                for key in ("fid_whole", "fid_patch"):  # `<key>_vs_teacher` and its interval `<key>_vs_teacher_ci`
                    row[f"{key}_vs_teacher"] = versus[key]
                    if f"{key}_ci" in versus:
                        row[f"{key}_vs_teacher_ci"] = versus[f"{key}_ci"]
            kept[f"row{len(rows)}"] = scores
            rows.append(row)
            model_rows.append(row)
            grid_rows.append((f"{label} {steps} st", grid))
            print(f"{label} @ {steps} steps: FID-Whole {row['fid_whole']:.3f}  FID-Patch "
                  f"{'n/a' if row['fid_patch'] is None else format(row['fid_patch'], '.3f')}  alignment "
                  f"{'n/a' if row['alignment'] is None else format(row['alignment'], '.4f')}", flush=True)
        if args.update_model_card:  # a LoRA export's card when the row is that LoRA on a base model
            update_model_card(sampler.lora_export or model_dir, model_rows, meta, backend.alignment_name)
        del sampler

    out = args.out
    json_path, md_path = write_results(out, meta, rows, backend.alignment_name)
    if args.save_features:
        arrays = {f"{name}.{kind}": scores.rows(kind) for name, scores in kept.items()
                  for kind in ("whole", "patch", "alignment") if scores.rows(kind) is not None}
        np.savez(out / "features.npz", **arrays)
    from PIL import Image

    grid = labelled_grid(grid_rows)
    Image.fromarray(grid).save(out / "grid.png")
    metrics = [("fid_whole", "FID-Whole"), ("fid_patch", "FID-Patch"), ("alignment", "alignment")]
    metrics_vs_steps(rows, metrics).save(out / "fid_vs_steps.png")
    if not args.no_tensorboard:
        write_eval_tensorboard(out / "tb", rows, grid, markdown_table(rows, backend.alignment_name))
    print(markdown_table(rows, backend.alignment_name))
    print(f"wrote {json_path}, {md_path}, {out / 'grid.png'}, {out / 'fid_vs_steps.png'}"
          + ("" if args.no_tensorboard else f", {out / 'tb'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
