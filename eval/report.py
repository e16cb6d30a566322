"""Result files: results.json (rows + what was measured against) and a markdown table."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

COLUMNS = [("label", "model"), ("steps", "steps"), ("guidance", "guidance"), ("fid_whole", "FID-Whole"),
           ("fid_patch", "FID-Patch"), ("alignment", "alignment"), ("sec_per_image", "s / image")]


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def _with_interval(row: dict, key: str) -> str:
    """The value, and its 95% interval in brackets where the row has one (`<key>_ci`)."""
    ci = row.get(f"{key}_ci")
    return _cell(row.get(key)) + (f" [{_cell(float(ci[0]))}, {_cell(float(ci[1]))}]" if ci else "")


# the shapes reference only: pixel rules (eval/pixel_scores.py; several shapes: eval/scene_scores.py)
FAILURE_COLUMNS = [("second_copy_rate", "second copy"), ("hollow_fill_rate", "hollow fill"),
                   ("missing_shape_rate", "missing shape"), ("misplaced_rate", "misplaced"),
                   ("wrong_colour_rate", "wrong colour"), ("scene_match_rate", "scene as captioned"),
                   ("second_copy_rate_position_free", "second copy, position-free prompts"),
                   ("background_grain", "background std /255")]


# with eval/fid_patch.py --teacher: the same FIDs against the teacher's own samples
TEACHER_COLUMNS = [("fid_whole_vs_teacher", "FID-Whole vs teacher"), ("fid_patch_vs_teacher", "FID-Patch vs teacher")]


def markdown_table(rows: list[dict], alignment_name: str = "alignment") -> str:
    present = lambda cols: [c for c in cols if any(c[0] in row for row in rows)]
    columns = COLUMNS[:5] + present(TEACHER_COLUMNS) + COLUMNS[5:] + present(FAILURE_COLUMNS)
    header = [name if key != "alignment" else f"alignment ({alignment_name})" for key, name in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_with_interval(row, key) for key, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, meta: dict, rows: list[dict], alignment_name: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    md = [f"# Evaluation: {meta['backend']} backend, {meta['count']} images against {meta['reference']}", "",
          markdown_table(rows, alignment_name)]
    if meta.get("floor"):
        floor = meta["floor"]
        md.append(f"Floor (other real images of the same prompts against the reference, what a perfect model "
                  f"gets with this many images): FID-Whole "
                  f"{_with_interval(floor, 'fid_whole')}, FID-Patch {_with_interval(floor, 'fid_patch')}.")
    if any(f"{k}_ci" in r for r in rows for k in ("fid_whole", "fid_patch", "alignment")):
        md.append("Brackets: 95% bootstrap intervals (images resampled with their prompts; `--bootstrap` resamples). Two rows "
                  "differ decidedly only where their intervals do not overlap.")
    if meta.get("teacher_reference"):
        t = meta["teacher_reference"]
        md.append(f"\"vs teacher\": against {t['model']}'s own samples of the same prompts and noise ({t['steps']} steps, "
                  f"guidance {t['guidance']}): how faithfully a row reproduces that teacher, beside how close it is to the data.")
        rates = [f"{name} {_cell(t[key])}" for key, name in FAILURE_COLUMNS if t.get(key) is not None]
        if rates:
            md.append("The teacher's own samples: " + ", ".join(rates) + ".")
    if meta.get("reference_background_grain") is not None:
        md.append(f"Background std of the reference images themselves (anti-aliased edges count): "
                  f"{_cell(meta['reference_background_grain'])}/255.")
    if meta.get("reference_alignment") is not None:
        md.append(f"Alignment of the reference images themselves: {_cell(meta['reference_alignment'])}.")
    md.append(f"\nCommand: `{meta['command']}`\n")
    md_path = out / "results.md"
    md_path.write_text("\n".join(md))
    return json_path, md_path


CARD_MARK = "<!-- eval/fid_patch.py -->"


def update_model_card(model_dir: Path, rows: list[dict], meta: dict, alignment_name: str) -> Optional[Path]:
    """Replaces (or appends) the evaluation section of <model>/README.md with these rows."""
    card = Path(model_dir) / "README.md"
    if not card.is_file():
        return None
    text = card.read_text()
    if CARD_MARK in text:
        text = text[:text.index(CARD_MARK)].rstrip() + "\n"
    section = (f"\n{CARD_MARK}\n## Evaluation\n\n{meta['backend']} backend, {meta['count']} images against "
               f"{meta['reference']}, seed {meta['seed']}:\n\n{markdown_table(rows, alignment_name)}\n"
               f"Command: `{meta['command']}`\n")
    card.write_text(text + section)
    manifest = Path(model_dir) / "export.json"
    if manifest.is_file():  # the same scores for programs: export.json "scores", one entry per step count
        data = json.loads(manifest.read_text())
        data["scores"] = [{k: row.get(k) for k in ("steps", "guidance", "fid_whole", "fid_patch", "alignment", "count",
                                                   "backend", "lora")} | {"reference": meta["reference"]} for row in rows]
        manifest.write_text(json.dumps(data, indent=1))
    return card
