"""Part (a) of the GPU check: the paper's recipe (configs/sdxl.yaml, all five stages, every phase) on a tiny
random SDXL through `python -m trainer.run`, one rank (NCCL and ds_configs/zero2_gpu.json on a GPU; gloo and
ds_configs/zero2_cpu_fp32.json on a CPU, many of which emulate bf16 slowly), with what a long run meets on a cluster:
  1. a tiny SDXL folder (trainer.testing.make_tiny_sdxl_folder) and a "finetune" of it held the way users hold
     theirs: one original-layout .safetensors file (another seed's weights), which the run distils from
     (model.base = the file, model.base_config = the folder); 32 rendered shapes (name.png + name.txt) encoded
     into shards by `python -m trainer.encode --source folder` from that file at the tiny VAE's resolution;
  2. run 1: periodic checkpoints; SIGUSR2 once stage1_32's MSE phase has written its first one -> exit 75;
  3. run 2 (same command): resumes there; SIGUSR2 once stage5_1's adv_cond phase (full UNet, EMA kept:
     stages.4.ema_decay=0.9) has written its first checkpoint -> exit 75 with the EMA in the checkpoint;
  4. run 3 (same command): resumes that phase (engines + EMA) and finishes: exports/<stage>/export.json for
     all five stages, listed in the summary JSON the trainer prints.
It collects the trainer's "[<job>] GPU memory at phase start: ..." lines and rank 0's solo-work times.
  python bench/gpu/tiny_sdxl_check.py OUT [WORK]      (on the GPU machine; run.sh calls it)
  .venv/bin/python bench/gpu/tiny_sdxl_check.py /tmp/gpu_check      (on a CPU)
Results: $OUT/tiny_sdxl.json (+ .md), logs in $OUT/tiny_sdxl/. Exit 0 when every check passed, else 1.
~1.5 min on the 2-core dev VM; scratch in $TINY_WORK (default /tmp/tiny_sdxl_check, removed unless TINY_KEEP=1).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # the recipe's relative paths (configs/, ds_configs/)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
os.environ.setdefault("PYTHONUNBUFFERED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "/tmp/gpu_check"))
WORK = Path(sys.argv[2] if len(sys.argv) > 2 else os.environ.get("TINY_WORK", "/tmp/tiny_sdxl_check"))
LOGS = OUT / "tiny_sdxl"
RUN_TIMEOUT_S = float(os.environ.get("TINY_RUN_TIMEOUT_S", "400"))  # per trainer invocation
IMAGES = int(os.environ.get("TINY_IMAGES", "32"))
PY = sys.executable
started = time.perf_counter()

for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # one fresh rank of its own
    os.environ.pop(key, None)
shutil.rmtree(WORK, ignore_errors=True)
shutil.rmtree(LOGS, ignore_errors=True)
WORK.mkdir(parents=True)
LOGS.mkdir(parents=True)

import torch  # noqa: E402

from trainer.config import load_config  # noqa: E402

CUDA = torch.cuda.is_available()
MODEL, IMAGES_DIR, SHARDS, RUN = WORK / "tiny-sdxl", WORK / "images", WORK / "shards", WORK / "run"
FINETUNE = WORK / "tiny-sdxl-finetune.safetensors"  # what the run distils: a single file, MODEL as its config
result = {"ok": False, "device": torch.cuda.get_device_name() if CUDA else "cpu",
          "backend": "nccl" if CUDA else "gloo", "parts": [], "checks": [], "gpu_memory": [], "rank0_work": [],
          "preemptions": [], "exports": {}, "wall_s": 0.0}


def save_result() -> None:
    result["wall_s"] = round(time.perf_counter() - started, 1)
    (OUT / "tiny_sdxl.json").write_text(json.dumps(result, indent=1))


def check(name: str, ok: bool, detail: str = "") -> bool:
    result["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
    print(f"  [{'ok' if ok else 'FAILED'}] {name}{': ' + detail if detail else ''}", flush=True)
    save_result()
    return bool(ok)


def part(name: str, fn):
    """Runs one part, timed; an exception fails the part (and the check) without stopping the report."""
    print(f"-- {name}", flush=True)
    start = time.perf_counter()
    try:
        value, ok, note = fn(), True, ""
    except Exception as err:  # noqa: BLE001 - reported in the summary
        value, ok, note = None, False, f"{type(err).__name__}: {err}"
        print(f"  FAILED: {note}", flush=True)
    seconds = round(time.perf_counter() - start, 1)
    result["parts"].append({"name": name, "ok": ok, "seconds": seconds, **({"error": note} if note else {})})
    print(f"   ({seconds:.1f} s)", flush=True)
    save_result()
    return value


# -- inputs ----------------------------------------------------------------------------------------------


def make_model() -> int:
    from trainer.formats import write_single_file
    from trainer.testing import make_tiny_sdxl_folder

    make_tiny_sdxl_folder(MODEL, seed=0)
    write_single_file(make_tiny_sdxl_folder(WORK / "finetune-folder", seed=1), FINETUNE)
    shutil.rmtree(WORK / "finetune-folder")
    return int(json.loads((MODEL / "vae" / "config.json").read_text())["sample_size"])


def make_images(resolution: int) -> None:
    from PIL import Image

    from trainer.data.shapes import ShapesDataset

    IMAGES_DIR.mkdir(parents=True)
    data = ShapesDataset(IMAGES, seed=0, resolution=resolution)
    for i in range(len(data)):
        item = data[i]
        Image.fromarray(item.image).save(IMAGES_DIR / f"img{i:04d}.png")
        (IMAGES_DIR / f"img{i:04d}.txt").write_text(item.caption + "\n")


def encode(resolution: int) -> None:
    cmd = [PY, "-m", "trainer.data.encode", "--model", str(FINETUNE), "--model-config", str(MODEL),
           "--converted", str(WORK / "converted"), "--source", "folder", "--input", str(IMAGES_DIR),
           "--out", str(SHARDS), "--resolution", str(resolution), "--samples-per-shard", "16", "--batch-size", "16"]
    with open(LOGS / "encode.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=300).returncode
    if rc != 0 or not (SHARDS / "index.json").is_file():
        raise RuntimeError(f"trainer.data.encode exited {rc} (log: {LOGS / 'encode.log'})")


# -- the recipe, shrunk ------------------------------------------------------------------------------------

MICRO, GLOBAL = 2, 4  # accumulation 2 on one rank, as the recipe accumulates on 8 GPUs
SHORT, LONG = 8, 32  # samples per phase; LONG for the two phases that are preempted (8 steps, checkpoint every step)
recipe = load_config("configs/sdxl.yaml", check_paths=False)
stages = [s.name for s in recipe.stages]
student_steps = {s.name: s.student_steps for s in recipe.stages}
overrides = [
    f"model.base={FINETUNE}", f"model.base_config={MODEL}", f"data.shards={SHARDS}", f"run.out_dir={RUN}",
    f"deepspeed=ds_configs/{'zero2_gpu' if CUDA else 'zero2_cpu_fp32'}.json",
    "data.num_workers=1", "log.sample_every_samples=0", f"log.checkpoint_every_samples={GLOBAL}", "log.every_steps=2",
    "log.keep_last=2", "stages.4.ema_decay=0.9",
]
for i, stage in enumerate(recipe.stages):
    length = LONG if i in (0, 4) else SHORT
    overrides += [f"stages.{i}.samples={length}", f"stages.{i}.micro_batch={MICRO}", f"stages.{i}.global_batch={GLOBAL}"]
    if stage.variant == "lora+full":
        overrides += [f"stages.{i}.full_samples={SHORT}", f"stages.{i}.lora.rank=4"]
    if stage.x0_samples:
        overrides += [f"stages.{i}.x0_samples={SHORT}"]
CMD = [PY, "-m", "trainer.run", "--config", "configs/sdxl.yaml", *(a for o in overrides for a in ("--set", o))]
(LOGS / "command.txt").write_text(" ".join(CMD) + "\n")

FIRST_TARGET = f"{stages[0]}.0_mse"  # the MSE stage
EMA_TARGET = f"{stages[4]}.1_adv_cond"  # the one-step stage: x0, then adv_cond (full UNet, EMA)
STOPPED = re.compile(r"\[(\S+)\] stopped at (\d+) samples(?: \([^)]*\))?; checkpoint written")
RESUMED = re.compile(r"\[(\S+)\] resumed from (\S+) at (\d+) samples")
GPU_MEM = re.compile(r"\[(\S+)\] GPU memory at phase start: ([\d.]+) GiB allocated, ([\d.]+) GiB reserved")
SOLO = re.compile(r"\[rank 0\] (.+?): ([\d.]+) s$", re.M)


def ckpt_dir(job: str) -> Path:
    return RUN / "jobs" / job.split(".")[0] / job / "ckpt"


def trainer_run(name: str, preempt: str = "") -> tuple[int, str, dict]:
    """One invocation of the same command; with `preempt`, SIGUSR2 once that job's first checkpoint exists."""
    log_path = LOGS / f"{name}.log"
    trigger = ckpt_dir(preempt) / "LATEST" if preempt else None
    signalled: dict = {}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(CMD, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while proc.poll() is None:
            if trigger is not None and not signalled and trigger.is_file():
                proc.send_signal(signal.SIGUSR2)
                signalled = {"job": preempt, "after_checkpoint": trigger.read_text().strip(),
                             "at_s": round(time.perf_counter() - start, 1)}
                print(f"   SIGUSR2 to {proc.pid} at {signalled['at_s']} s ({preempt} wrote {signalled['after_checkpoint']})",
                      flush=True)
            if time.perf_counter() - start > RUN_TIMEOUT_S:
                proc.kill()
                proc.wait()
                raise TimeoutError(f"{name}: still running after {RUN_TIMEOUT_S:.0f} s (TINY_RUN_TIMEOUT_S); killed")
            time.sleep(0.05)
    text = log_path.read_text(errors="replace")
    for job, allocated, reserved in GPU_MEM.findall(text):
        result["gpu_memory"].append({"run": name, "job": job, "allocated_gib": float(allocated),
                                     "reserved_gib": float(reserved)})
    for what, seconds in SOLO.findall(text.replace("\r", "\n")):
        result["rank0_work"].append({"run": name, "what": what, "seconds": float(seconds)})
    print(f"   exit {proc.returncode}; log {log_path}", flush=True)
    if proc.returncode not in (0, 75):
        tail = "\n".join(text.replace("\r", "\n").splitlines()[-25:])
        print(f"   --- last lines of {log_path}\n{tail}", flush=True)
    return proc.returncode, text, signalled


def expect_preempted(name: str, rc: int, text: str, signalled: dict, job: str, total: int) -> int:
    stops = STOPPED.findall(text)
    stopped = int(stops[-1][1]) if stops else -1
    check(f"{name}: SIGUSR2 sent while {job} trained", bool(signalled),
          f"after its checkpoint {signalled.get('after_checkpoint')}" if signalled else "its first checkpoint never appeared")
    check(f"{name}: exit 75 (preempted, checkpoint written)", rc == 75, f"exit {rc}")
    check(f"{name}: preempted in {job}, mid-job", bool(stops) and stops[-1][0] == job and 0 < stopped < total,
          f"stopped {stops[-1][0]} at {stopped} of {total} samples" if stops else "no 'stopped at' line")
    latest = ckpt_dir(job) / "LATEST"
    named = latest.read_text().strip() if latest.is_file() else ""
    check(f"{name}: {job}'s LATEST names the preemption checkpoint", named == f"samples-{stopped:012d}", named or "no LATEST")
    result["preemptions"].append({"run": name, "job": job, "samples": stopped, "of": total, "checkpoint": named, **signalled})
    return stopped


def expect_resumed(name: str, text: str, job: str, samples: int) -> None:
    resumed = [(j, int(n)) for j, _, n in RESUMED.findall(text)]
    check(f"{name}: {job} resumed at {samples} samples", (job, samples) in resumed,
          f"resumed: {resumed}" if resumed else "no 'resumed from' line")


def run_part(title: str, name: str, preempt: str = "") -> tuple[int, str, dict]:
    outcome = part(title, lambda: trainer_run(name, preempt))
    if outcome is None:
        raise RuntimeError(f"{name} did not finish (see its part)")
    return outcome


def check_distilled_the_file() -> None:
    """The run's base (teacher and D's encoder) holds the single file's weights, read by diffusers."""
    from trainer.formats import load_folder, load_with_diffusers

    _, converted, _ = load_folder(RUN / "base", dtype=None)
    from_file = load_with_diffusers(FINETUNE, MODEL, "sdxl")
    _, config_weights, _ = load_folder(MODEL, dtype=None)
    same = all(torch.equal(converted[p][k].float(), from_file[p][k].float()) for p in from_file for k in from_file[p])
    differs = any(not torch.equal(converted["unet"][k].float(), config_weights["unet"][k].float()) for k in converted["unet"])
    check("the run's base is the single-file finetune (diffusers' from_single_file), not the config folder's weights",
          same and differs, f"equal to the file: {same}; differs from the config folder: {differs}")


def run_all() -> None:
    rc, text, sig = run_part("run 1: train, SIGUSR2 in " + FIRST_TARGET, "run1", FIRST_TARGET)
    first = expect_preempted("run 1", rc, text, sig, FIRST_TARGET, LONG)

    rc, text, sig = run_part("run 2: resume, SIGUSR2 in " + EMA_TARGET + " (EMA)", "run2", EMA_TARGET)
    expect_resumed("run 2", text, FIRST_TARGET, first)
    second = expect_preempted("run 2", rc, text, sig, EMA_TARGET, LONG)
    latest = ckpt_dir(EMA_TARGET) / "LATEST"
    ema = ckpt_dir(EMA_TARGET) / latest.read_text().strip() / "ema.safetensors" if latest.is_file() else None
    check("run 2: the preemption checkpoint holds the EMA", ema is not None and ema.is_file(), str(ema))

    rc, text, _ = run_part("run 3: resume, finish, export", "run3")
    expect_resumed("run 3", text, EMA_TARGET, second)
    check("run 3: exit 0", rc == 0, f"exit {rc}")
    done = None
    if "=== done ===" in text:
        body = text.split("=== done ===", 1)[1]
        try:
            done = json.JSONDecoder().raw_decode(body[body.index("{"):])[0]
        except ValueError as err:
            check("run 3: the trainer's summary JSON parses", False, str(err))
    check("run 3: the trainer printed its summary JSON", done is not None)
    listed = (done or {}).get("exports", {})
    for stage in stages:
        manifest = RUN / "exports" / stage / "export.json"
        steps = json.loads(manifest.read_text()).get("steps") if manifest.is_file() else None
        result["exports"][stage] = {"export_json": manifest.is_file(), "listed": stage in listed, "steps": steps}
        check(f"exports/{stage}/export.json ({student_steps[stage]} steps), listed in the summary",
              manifest.is_file() and steps == student_steps[stage]
              and Path(listed.get(stage, "/nonexistent")).resolve() == manifest.parent.resolve(),
              f"steps {steps}, listed {stage in listed}")
    from trainer.formats import verify_single_file

    for stage in stages:  # what ComfyUI and A1111 load, read back by diffusers' own single-file loader
        single = RUN / "exports" / stage / f"{stage}.safetensors"
        try:
            verify_single_file(single, RUN / "exports" / stage)
            ok, detail = True, ""
        except Exception as err:  # noqa: BLE001 - reported
            ok, detail = False, f"{type(err).__name__}: {err}"
        check(f"exports/{stage}/{single.name}: original-layout checkpoint, from_single_file reads the export's weights",
              ok, detail)
    kohya = sorted((RUN / "exports").glob("*_lora/lora/*_kohya.safetensors"))
    lora_stages = [s.name for s in recipe.stages if s.variant in ("lora", "lora+full")]
    check(f"a kohya LoRA beside each LoRA export ({len(lora_stages)})", len(kohya) == len(lora_stages),
          ", ".join(str(k.relative_to(RUN)) for k in kohya))
    check_distilled_the_file()
    final = ckpt_dir(EMA_TARGET) / (ckpt_dir(EMA_TARGET) / "LATEST").read_text().strip() \
        if (ckpt_dir(EMA_TARGET) / "LATEST").is_file() else None
    check(f"{EMA_TARGET}'s final checkpoint holds the EMA", final is not None and (final / "ema.safetensors").is_file(),
          str(final))


print(f"== (a) tiny SDXL, configs/sdxl.yaml through trainer.run: {result['device']}, {result['backend']}, one rank; "
      f"work {WORK}", flush=True)
resolution = part("tiny SDXL model folder", make_model)
if resolution:
    part(f"{IMAGES} images ({resolution} px, name.png + name.txt)", lambda: make_images(resolution))
    part("trainer.data.encode --source folder", lambda: encode(resolution))
if all(p["ok"] for p in result["parts"]):
    try:
        run_all()
    except Exception as err:  # noqa: BLE001 - a failed run's part is already recorded
        check("the three trainer runs", False, str(err))
else:
    check("inputs (model, images, shards)", False, "see the failed part")

if CUDA and not result["gpu_memory"]:
    check("the trainer printed 'GPU memory at phase start' lines", False, "none found in the logs")
result["ok"] = all(p["ok"] for p in result["parts"]) and all(c["ok"] for c in result["checks"])
save_result()

lines = [f"## (a) tiny SDXL through trainer.run ({result['device']}, {result['backend']}): "
         f"{'OK' if result['ok'] else 'FAILED'}, {result['wall_s']:.0f} s", ""]
lines += [f"- {p['name']}: {'ok' if p['ok'] else 'FAILED'}, {p['seconds']:.1f} s" + (f" ({p['error']})" if 'error' in p else '')
          for p in result["parts"]]
bad = [c for c in result["checks"] if not c["ok"]]
lines += [f"- checks: {len(result['checks']) - len(bad)}/{len(result['checks'])} passed"]
lines += [f"  - FAILED {c['name']}: {c['detail']}" for c in bad]
lines += [f"- preempted {p['job']} at {p['samples']}/{p['of']} samples ({p['checkpoint']})" for p in result["preemptions"]]
if result["rank0_work"]:
    slow = max(result["rank0_work"], key=lambda r: r["seconds"])
    lines += [f"- rank 0 solo work: {len(result['rank0_work'])} items, longest {slow['what']} {slow['seconds']:.1f} s"]
if result["gpu_memory"]:
    lines += ["- GPU memory at phase start (allocated / reserved GiB):"]
    lines += [f"  - {g['job']}: {g['allocated_gib']:.2f} / {g['reserved_gib']:.2f} ({g['run']})" for g in result["gpu_memory"]]
else:
    lines += ["- GPU memory at phase start: none printed (no GPU)" if not CUDA else "- GPU memory lines: MISSING"]
(OUT / "tiny_sdxl.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines), flush=True)
if os.environ.get("TINY_KEEP") != "1":
    shutil.rmtree(WORK, ignore_errors=True)
sys.exit(0 if result["ok"] else 1)
