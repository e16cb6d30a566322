"""End to end through the real CLI and real DeepSpeed engines (ZeRO-2; fp32 on the smoke recipe, bf16 in one test)."""
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from conftest import latest_checkpoint, latest_state, run_cli, toy_batch

EXPORTS = ("teacher", "stage1_32", "stage2_8", "stage2_8_lora", "stage5_1")
JOBS = {  # job -> its folder under jobs/
    "teacher": "teacher",
    "stage1_32.0_mse": "stage1_32/stage1_32.0_mse",
    "stage2_8.0_adv_cond_lora": "stage2_8/stage2_8.0_adv_cond_lora",
    "stage2_8.1_adv_uncond_lora": "stage2_8/stage2_8.1_adv_uncond_lora",
    "stage2_8.2_adv_uncond": "stage2_8/stage2_8.2_adv_uncond",
    "stage5_1.0_x0": "stage5_1/stage5_1.0_x0",
    "stage5_1.1_adv_uncond": "stage5_1/stage5_1.1_adv_uncond",
}


def export_weights(out: Path, job: str) -> dict:
    return load_file(str(out / "exports" / job / "unet" / "diffusion_pytorch_model.safetensors"))


def final_state(out: Path, job: str) -> dict:
    return latest_state(out / "jobs" / JOBS[job])


def sample_with_diffusers(export: Path, steps: int):
    """diffusers alone: the export's UNet and scheduler, `steps` steps from noise on toy conditioning.
    Returns (scheduler, image, the UNet's last output)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(export / "unet")
    sched = EulerDiscreteScheduler.from_pretrained(export / "scheduler")
    sched.set_timesteps(steps)
    batch = toy_batch(2)
    x = batch["latent"] * sched.init_noise_sigma
    added = {"text_embeds": batch["pooled"], "time_ids": batch["time_ids"]}
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(sched.scale_model_input(x, t), t, encoder_hidden_states=batch["prompt_embeds"],
                       added_cond_kwargs=added).sample
            x = sched.step(out, t, x).prev_sample
    return sched, x, out


def test_progression_writes_exports_grids_and_tensorboard(smoke_run):
    for job, folder in JOBS.items():
        assert list((smoke_run / "jobs" / folder / "tb").glob("events.out.tfevents.*")), job
        assert list((smoke_run / "jobs" / folder / "grids").glob("*.png")), job
    for name in EXPORTS:
        assert (smoke_run / "exports" / name / "export.json").is_file(), name
    assert (smoke_run / "grids" / "progression.png").is_file()
    manifest = json.loads((smoke_run / "exports" / "stage1_32" / "export.json").read_text())
    assert manifest["steps"] == 32 and manifest["teacher_steps"] == 128 and manifest["prediction_type"] == "v_prediction"


def test_exports_declare_steps_and_prediction_types(smoke_run):
    from diffusers import EulerDiscreteScheduler

    expected = {"stage1_32": (32, "v_prediction"), "stage2_8": (8, "v_prediction"), "stage2_8_lora": (8, "v_prediction"),
                "stage5_1": (1, "sample")}  # the smoke recipe's teacher predicts v (shapes.yaml's: x0; SDXL: epsilon)
    for name, (steps, pred) in expected.items():
        manifest = json.loads((smoke_run / "exports" / name / "export.json").read_text())
        sched = EulerDiscreteScheduler.from_pretrained(smoke_run / "exports" / name / "scheduler")
        assert (manifest["steps"], manifest["prediction_type"]) == (steps, pred), name
        assert sched.config.prediction_type == pred and sched.config.timestep_spacing == "trailing", name
    assert (smoke_run / "exports" / "stage2_8_lora" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((smoke_run / "exports" / "stage2_8" / "export.json").read_text())["teacher"].endswith("stage1_32")


def test_tensorboard_holds_losses_and_grids(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(smoke_run / "jobs" / JOBS["stage1_32.0_mse"] / "tb"))
    acc.Reload()
    tag = "stage1_32.0_mse"
    assert {f"{tag}/loss", f"{tag}/lr", f"{tag}/samples_per_s", f"{tag}/data_bad_samples"} <= set(acc.Tags()["scalars"])
    losses = [e.value for e in acc.Scalars(f"{tag}/loss")]
    assert len(losses) >= 2 and all(np.isfinite(losses))
    assert f"{tag}/samples" in acc.Tags()["images"]

    acc = EventAccumulator(str(smoke_run / "jobs" / JOBS["stage5_1.1_adv_uncond"] / "tb"))
    acc.Reload()
    tag = "stage5_1.1_adv_uncond"
    scalars = set(acc.Tags()["scalars"])
    assert {f"{tag}/{k}" for k in ("d_loss", "g_loss", "d_acc_real", "d_acc_fake", "mse", "lr")} <= scalars
    assert any(k.startswith(f"{tag}/d_acc_fake_t") for k in scalars)  # multi-timestep terms


def test_the_progression_runs_in_bf16(tmp_path):
    """The smoke recipe runs fp32 engines (fast on any CPU); this runs it on the bf16 engines the GPU recipes use:
    every phase's engines hold bf16 weights, every logged loss is finite and every export is written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "bf16"
    run_cli(["trainer.run", "--config", "configs/smoke.yaml", "--set", f"run.out_dir={out}",
             "--set", "deepspeed=ds_configs/zero2_cpu.json"])
    for job, folder in JOBS.items():
        state = latest_checkpoint(out / "jobs" / folder)
        engines = [p for p in state.iterdir() if (p / "state").is_dir()]
        assert engines, job
        for engine in engines:  # DeepSpeed names the optimizer state of a bf16 engine bf16_zero_pp_rank_*
            assert list((engine / "state").glob("bf16_zero_pp_rank_*_optim_states.pt")), (job, engine.name)
        acc = EventAccumulator(str(out / "jobs" / folder / "tb"))
        acc.Reload()
        losses = [e.value for tag in acc.Tags()["scalars"] if tag.endswith("loss") for e in acc.Scalars(tag)]
        assert losses and all(np.isfinite(losses)), job
    for name in EXPORTS:
        assert (out / "exports" / name / "export.json").is_file(), name
    teacher, student = export_weights(out, "teacher"), export_weights(out, "stage5_1")
    assert all(torch.isfinite(w).all() for w in student.values())
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)


def test_export_loads_and_samples_with_diffusers_alone(smoke_run):
    sched, x, _ = sample_with_diffusers(smoke_run / "exports" / "stage2_8", steps=8)
    assert sched.config.timestep_spacing == "trailing" and sched.config.prediction_type == "v_prediction"
    assert [int(t) for t in sched.timesteps] == [999, 874, 749, 624, 499, 374, 249, 124]
    assert x.shape == (2, 12, 16, 16) and torch.isfinite(x).all()


def test_an_x0_teacher_passes_x0_prediction_down_the_progression(tmp_path):
    """The shapes recipe's parameterization: a teacher that predicts x0 (`model.prediction_type: sample`),
    stage 1 matched on the implied x0 (`mse_space: x0`), no x0 conversion in the one-step stage. Every
    export declares x0 prediction, and the one-step export samples with diffusers' own scheduler."""
    from diffusers import EulerDiscreteScheduler

    out = tmp_path / "run"
    run_cli(["trainer.run", "--config", "configs/smoke.yaml", "--set", f"run.out_dir={out}",
             "--set", "model.prediction_type=sample", "--set", "stages.0.mse_space=x0", "--set", "stages.2.x0_samples=0"])
    assert [p.name for p in (out / "jobs" / "stage5_1").iterdir() if p.is_dir()] == ["stage5_1.0_adv_uncond"]
    for name in EXPORTS:
        manifest = json.loads((out / "exports" / name / "export.json").read_text())
        sched = EulerDiscreteScheduler.from_pretrained(out / "exports" / name / "scheduler")
        assert manifest["prediction_type"] == sched.config.prediction_type == "sample", name
    teacher, student = export_weights(out, "stage2_8"), export_weights(out, "stage5_1")
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)  # trained, from x0 with no conversion

    _, image, x0 = sample_with_diffusers(out / "exports" / "stage5_1", steps=1)
    assert torch.isfinite(image).all() and torch.allclose(image, x0, atol=1e-4)  # one x0 step lands on x0


def test_stage_student_starts_from_teacher_and_moves(smoke_run):
    teacher, student = export_weights(smoke_run, "teacher"), export_weights(smoke_run, "stage1_32")
    assert teacher.keys() == student.keys()
    diffs = [float((teacher[k] - student[k]).abs().max()) for k in teacher]
    assert max(diffs) > 0  # trained
    assert max(diffs) < 0.05  # from the teacher's weights, a few small steps away


def test_stage_with_ema_exports_the_average(smoke_run):
    """stages[N].ema_decay: the phase exports the student's weight average, not its last iterate."""
    from trainer.runtime.checkpoint import CheckpointManager, fp32_weights

    final = latest_checkpoint(smoke_run / "jobs" / JOBS["stage5_1.1_adv_uncond"])
    average, last = CheckpointManager.load_tensors(final, "ema.safetensors"), fp32_weights(final)
    exported = export_weights(smoke_run, "stage5_1")
    assert exported.keys() == average.keys()
    assert all(torch.equal(exported[k], average[k]) for k in exported)
    assert any(not torch.allclose(exported[k], last[k]) for k in exported)


def test_stop_and_resume_ends_bit_identical(smoke_run, tmp_path):
    """Stopped mid-teacher, mid-MSE stage and mid-adversarial phase, then resumed: the same weights as the
    uninterrupted run, every job."""
    out = tmp_path / "resumed"
    args = ["trainer.run", "--config", "configs/smoke.yaml", "--set", f"run.out_dir={out}"]
    for stop, where in ((24, "[teacher] stopped at 24"), (48, "[stage1_32.0_mse] stopped at 48"),
                        (16, "[stage2_8.0_adv_cond_lora] stopped at 16")):
        proc = run_cli(args + ["--set", f"run.stop_after_samples={stop}"], check=False)
        assert proc.returncode == 75, proc.stderr[-3000:]
        assert where in proc.stdout, proc.stdout[-2000:]
    assert not (out / "exports" / "stage2_8").exists()
    proc = run_cli(args)
    assert "[stage2_8.0_adv_cond_lora] resumed from" in proc.stdout
    for name in EXPORTS:
        a, b = export_weights(smoke_run, name), export_weights(out, name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: resumed weights differ"
    for job in JOBS:
        assert final_state(smoke_run, job)["replica_digests"] == final_state(out, job)["replica_digests"]


def test_rerun_of_a_finished_progression_does_nothing(smoke_run):
    before = {p: p.stat().st_mtime for p in (smoke_run / "exports").rglob("*.safetensors")}
    proc = run_cli(["trainer.run", "--config", "configs/smoke.yaml", "--set", f"run.out_dir={smoke_run}"])
    assert "stopped" not in proc.stdout
    assert before == {p: p.stat().st_mtime for p in (smoke_run / "exports").rglob("*.safetensors")}


def test_two_ranks_end_bit_identical(two_rank_run):
    for job in JOBS:  # teacher, MSE, LoRA and full adversarial phases (two engines), x0
        digests = final_state(two_rank_run, job)["replica_digests"]
        assert len(digests) == 2 and digests[0] == digests[1], job
    assert (two_rank_run / "exports" / "stage5_1" / "unet" / "config.json").is_file()


def _unet_inputs():
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 12, 16, 16, generator=g), torch.randn(2, 16, 32, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[32., 32, 0, 0, 32, 32]] * 2)}
    return x, torch.tensor([999, 499]), cond, added


def _diffusers_lora_on_base(base_unet: Path, lora_file: Path):
    """What a user does: the base model's UNet, the exported LoRA through diffusers' own loader."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base_unet)
    unet.load_lora_adapter(str(lora_file.parent), weight_name=lora_file.name, prefix="unet")
    return unet


def _trained_student(out: Path, job: str, base_unet: Path, rank: int):
    """The student the phase trained, rebuilt from its checkpoint's fp32 master weights: base + adapter."""
    from trainer.method.lora import add_lora
    from trainer.method.models import load_unet
    from trainer.runtime.checkpoint import fp32_weights

    trained = fp32_weights(latest_checkpoint(out / "jobs" / job), "student")
    student = add_lora(load_unet(base_unet.parent), rank=rank)
    lora = {k: v for k, v in trained.items() if ".lora_" in k}
    assert lora and not student.load_state_dict(lora, strict=False).unexpected_keys
    return student


def test_stage_lora_applied_to_the_base_gives_the_trained_student(smoke_run):
    """The LoRA is relative to the base model (the teacher job's export here), not to the stage's teacher:
    diffusers loads the file into the base UNet and gets the student the last LoRA phase trained, and the
    merged UNet of the LoRA export."""
    from diffusers import UNet2DConditionModel

    base_unet = smoke_run / "exports" / "teacher" / "unet"
    lora = smoke_run / "exports" / "stage2_8_lora"
    manifest = json.loads((lora / "export.json").read_text())
    assert manifest["lora_base"] == str(smoke_run / "exports" / "teacher") and manifest["lora_relative_to"] == "base"
    assert f"applies to the base model `{manifest['lora_base']}`" in (lora / "README.md").read_text()
    x, t, cond, added = _unet_inputs()
    with torch.no_grad():
        users = _diffusers_lora_on_base(base_unet, lora / "lora" / "pytorch_lora_weights.safetensors")(
            x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
        trained = _trained_student(smoke_run, JOBS["stage2_8.1_adv_uncond_lora"], base_unet, rank=4)(
            x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
        merged = UNet2DConditionModel.from_pretrained(lora / "unet")(
            x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
        plain = UNet2DConditionModel.from_pretrained(base_unet)(x, t, encoder_hidden_states=cond,
                                                                 added_cond_kwargs=added).sample
    scale = float(trained.abs().max())
    assert float((users - trained).abs().max()) < 1e-5 * scale
    assert float((users - merged).abs().max()) < 1e-4 * scale  # folding the factors in rounds in fp32
    assert float((users - plain).abs().max()) > 1e-3 * scale  # the LoRA did something


def test_next_stage_lora_continues_the_previous_stages_from_the_base(smoke_run, tmp_path):
    """A second LoRA stage (4 steps, taught by the 8-step full export) starts its adapter from the 8-step
    stage's exported LoRA, still on the base: its file applies to the base model like the first."""
    import shutil

    import yaml

    from conftest import ROOT

    out = tmp_path / "run"
    for part in ("base", "shards", "exports"):
        shutil.copytree(smoke_run / part, out / part, symlinks=True)
    recipe = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    stage2 = next(s for s in recipe["stages"] if s["name"] == "stage2_8")
    recipe["stages"] = recipe["stages"][:2] + [{**stage2, "name": "stage3_4", "student_steps": 4, "teacher_steps": 8,
                                                "objective": "adv_cond", "variant": "lora", "samples": 16}]
    config = tmp_path / "four_step.yaml"
    config.write_text(yaml.safe_dump(recipe))
    proc = run_cli(["trainer.run", "--config", str(config), "--jobs", "stage3_4", "--set", f"run.out_dir={out}"])
    assert f"+ LoRA rank 4 (continuing {out / 'exports' / 'stage2_8_lora'})" in proc.stdout, proc.stdout[-3000:]

    first = load_file(str(out / "exports/stage2_8_lora/lora/pytorch_lora_weights.safetensors"))
    second = load_file(str(out / "exports/stage3_4_lora/lora/pytorch_lora_weights.safetensors"))
    assert first.keys() == second.keys()
    ups = [k for k in first if ".lora_B." in k]
    # continued: stage 3's factors are stage 2's plus a few small steps (a fresh adapter's B starts at 0)
    moved = max(float((second[k] - first[k]).abs().max()) for k in ups)
    size = max(float(first[k].abs().max()) for k in ups)
    assert 0 < moved < 0.5 * size

    base_unet = out / "exports" / "teacher" / "unet"
    manifest = json.loads((out / "exports/stage3_4_lora/export.json").read_text())
    assert manifest["lora_base"] == str(out / "exports" / "teacher") and manifest["teacher"] == str(out / "exports" / "stage2_8")
    x, t, cond, added = _unet_inputs()
    with torch.no_grad():
        users = _diffusers_lora_on_base(base_unet, out / "exports/stage3_4_lora/lora/pytorch_lora_weights.safetensors")(
            x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
        trained = _trained_student(out, "stage3_4/stage3_4.0_adv_cond_lora", base_unet, rank=4)(
            x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
    assert float((users - trained).abs().max()) < 1e-5 * float(trained.abs().max())


def test_a_phases_engines_are_gone_before_the_next_phase_starts(tmp_path, monkeypatch):
    """With Python's automatic garbage collection off, every engine of a phase (ZeRO-2's gradient hooks tie
    each engine into reference cycles) is freed before the next phase builds its own: memory stays flat
    across the phases of a stage, instead of holding every earlier phase's weights and Adam moments."""
    import gc
    import weakref

    from trainer.method import phases
    from trainer.config import load_config
    from trainer.runtime.engines import init_distributed
    from trainer.pipeline import run_progression

    from conftest import ROOT

    info = init_distributed()
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"run.out_dir={tmp_path}", "teacher.samples=0",
                                                         "data.shapes.count=64", "log.comparison_grid=never"])
    cfg.stages = [cfg.stages[1]]  # stage2_8, taught by the base: LoRA cond, LoRA uncond, then full uncond
    refs, alive_at_build = [], []
    original = phases.make_engine

    def make_engine(model, ds_config):
        alive_at_build.append(sum(ref() is not None for ref in refs))
        engine = original(model, ds_config)
        refs.append(weakref.ref(engine))
        return engine

    reads = []
    original_load = phases.load_unet

    def load_unet(path, only=None):
        reads.append((Path(path).resolve().relative_to(tmp_path.resolve()).as_posix(), "encoder" if only else "all"))
        return original_load(path, only)

    monkeypatch.setattr(phases, "make_engine", make_engine)
    monkeypatch.setattr(phases, "load_unet", load_unet)
    gc.disable()
    try:
        run_progression(cfg, info)
    finally:
        gc.enable()
    assert alive_at_build == [0, 1] * 3  # each phase: the student's engine, then D's beside it; nothing older
    assert all(ref() is None for ref in refs)
    # Each folder read once per phase: phases 0 and 1 start from the teacher (the base here), whose copy in
    # memory is also the teacher and D's encoder; phase 2 reads phase 1's result (the student) and the base
    # (teacher and D's encoder). +2: rank 0 reads the teacher again to merge each LoRA phase's adapter for
    # its export.
    phase1 = "jobs/stage2_8/stage2_8.1_adv_uncond_lora/result"
    assert sorted(reads) == sorted([("base", "all")] * 2 + [(phase1, "all"), ("base", "all")] + [("base", "all")] * 2)


def _stage1_from(smoke_run: Path, out: Path) -> Path:
    """A run folder holding the smoke run's base model, shards and teacher: stage 1 to do."""
    import shutil

    (out / "exports").mkdir(parents=True)
    for part in ("base", "shards"):
        shutil.copytree(smoke_run / part, out / part)
    shutil.copytree(smoke_run / "exports" / "teacher", out / "exports" / "teacher")
    return out


def test_resume_on_another_world_size_continues_the_same_run(smoke_run, tmp_path):
    """Stage 1 (fp32 engines, global batch 16 = 2 ranks x 8, or 1 rank x 8 x 2 accumulated), stopped after
    two steps on 2 ranks and resumed on 1, and the other way round: the optimizer state is re-partitioned
    through DeepSpeed's universal checkpoint, the loader continues the same positions, and both end with
    the weights of an uninterrupted run to float32 rounding (as 1 and 2 uninterrupted ranks do)."""
    runs = {}
    for name, ranks in (("one_rank", [1]), ("two_ranks", [2]), ("two_then_one", [2, 1]), ("one_then_two", [1, 2])):
        out = _stage1_from(smoke_run, tmp_path / name)
        args = ["trainer.run", "--config", "configs/smoke.yaml", "--jobs", "stage1_32", "--set", f"run.out_dir={out}",
                "--set", "deepspeed=ds_configs/zero2_cpu_fp32.json", "--set", "stages.0.samples=96",
                "--set", "stages.0.global_batch=16", "--set", "log.checkpoint_every_samples=1000"]
        if len(ranks) == 2:
            proc = run_cli(args + ["--set", "run.stop_after_samples=32"], ranks=ranks[0], check=False)
            assert proc.returncode != 0 and "[stage1_32.0_mse] stopped at 32 samples" in proc.stdout, proc.stderr[-3000:]
        proc = run_cli(args, ranks=ranks[-1])
        if len(ranks) == 2:
            assert "[stage1_32.0_mse] resumed from" in proc.stdout and "at 32 samples" in proc.stdout
            assert f"for {ranks[-1]} ranks (written by {ranks[0]})" in proc.stdout
        runs[name] = export_weights(out, "stage1_32")
    start = export_weights(smoke_run, "teacher")
    reference = runs["one_rank"]
    moved = max(float((reference[k] - start[k]).abs().max()) for k in start)
    for name in ("two_ranks", "two_then_one", "one_then_two"):
        differs = max(float((runs[name][k] - reference[k]).abs().max()) for k in reference)
        # float32 rounding of weights of order 1 (two ranks sum gradients in another order); one sample or
        # noise draw out of place moves them by ~1e-4 (stage 1 moves them by `moved`, ~6e-4)
        assert differs < 1e-6, f"{name}: {differs} off the uninterrupted run (stage 1 moved the weights {moved})"


def test_a_resume_that_would_change_the_run_stops_with_one_line(smoke_run, tmp_path):
    """A checkpoint written at another global batch (grad_accum fixed, world size changed), or reading the
    data through other lanes, cannot be continued: one line says why and which key to set; exit 2."""
    out = _stage1_from(smoke_run, tmp_path / "run")
    args = ["trainer.run", "--config", "configs/smoke.yaml", "--jobs", "stage1_32", "--set", f"run.out_dir={out}",
            "--set", "log.checkpoint_every_samples=1000"]
    proc = run_cli(args + ["--set", "run.stop_after_samples=16"], ranks=2, check=False)
    assert "[stage1_32.0_mse] stopped at 16 samples" in proc.stdout, proc.stderr[-3000:]
    proc = run_cli(args, check=False)  # 1 rank x 8 x accumulation 1: global batch 8, not 16
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "global batch of 16 (2 ranks x micro-batch 8 x accumulation 1)" in errors[0] and "global_batch) to 16" in errors[0]
    proc = run_cli(args + ["--set", "data.lanes=4"], ranks=2, check=False)
    assert proc.returncode != 0 and "through 8 lanes, this run has 4" in proc.stderr and "data.lanes: 8" in proc.stderr
