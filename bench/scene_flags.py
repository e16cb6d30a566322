"""What the quadrant rules (eval/scene_scores.py) flag, to look at: for each rule, the first images of a model
that it flags, each beside the teacher's image of the same prompt and noise, and the rates of both.

    python bench/scene_flags.py --model /tmp/ob/run/exports/stage5_1 --teacher /tmp/ob/run/exports/teacher \
        --objects 2 --position-in-caption 0.5 --texture stripes --dots 8 --count 400 --out flags.png

Rows: "<rule> teacher" and "<rule> model" in pairs, the same prompts column by column (the model's flagged
images; the teacher's image of that prompt may or may not be flagged). Prints the rates as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.pixel_scores import sample_prompts  # noqa: E402
from eval.plot import labelled_grid  # noqa: E402
from eval.reference import ReferenceSet  # noqa: E402
from eval.scene_scores import SIGNATURES, scene_signatures  # noqa: E402
from trainer.data.shapes import TEXTURES, ShapesOptions  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--teacher", required=True, type=Path)
    p.add_argument("--objects", type=int, default=2)
    p.add_argument("--position-in-caption", type=float, default=1.0)
    p.add_argument("--texture", choices=TEXTURES, default="none")
    p.add_argument("--dots", type=int, default=0)
    p.add_argument("--count", type=int, default=400)
    p.add_argument("--per-rule", type=int, default=10, help="flagged images shown per rule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.objects < 2:
        raise SystemExit("--objects: the quadrant rules read several shapes per image (2..4)")
    options = ShapesOptions(args.position_in_caption, args.texture, args.dots, args.objects)
    prompts = ReferenceSet("shapes", args.count, options=options).prompts
    with torch.no_grad():
        model = sample_prompts(args.model, prompts, seed=args.seed, device=args.device)
        teacher = sample_prompts(args.teacher, prompts, seed=args.seed, device=args.device)
    flags = {"model": scene_signatures(model, prompts, args.texture),
             "teacher": scene_signatures(teacher, prompts, args.texture)}
    rows = []
    for rule in SIGNATURES:
        shown = np.flatnonzero(flags["model"][rule])[:args.per_rule]
        rows += [(f"{rule} teacher", list(teacher[shown])), (f"{rule} model", list(model[shown]))]
    rows = [(name, images) for name, images in rows if images]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labelled_grid(rows, tile=64)).save(args.out)
    rates = {who: {rule: float(found.mean()) for rule, found in f.items()} for who, f in flags.items()}
    print(json.dumps({"model": str(args.model), "teacher": str(args.teacher), "count": args.count, **rates}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
