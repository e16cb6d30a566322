import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer.config import ConfigError, load_config

from conftest import ROOT, cli_env


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def base_recipe() -> dict:
    return yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text()) | {"deepspeed": str(ROOT / "ds_configs/zero2_cpu.json")}


def test_shipped_recipes_load():
    for name in ("shapes.yaml", "smoke.yaml", "sdxl.yaml"):
        cfg = load_config(ROOT / "configs" / name, check_paths=name != "sdxl.yaml")  # sdxl: user's paths
        assert cfg.stages and cfg.stages[0].teacher_steps == 128 and cfg.stages[0].student_steps == 32


# The paper's training setup, as it states it: MSE stage lr 1e-5 Adam(0.9, 0.999); adversarial stages
# lr 1e-6 with a LoRA and 5e-7 with the full UNet, for the student and D alike, Adam(0, 0.99); no weight
# decay; batch 512; LoRA rank 64; no MSE term in the adversarial stages; multi-timestep D at
# t* in {10, 250, 500, 750}, weights 1:1:1:1 then 5:1:1:1, for the 2- and 1-step models; x0 for 1 step.
PAPER_MSE = {"lr": 1e-5, "betas": [0.9, 0.999], "weight_decay": 0.0}
PAPER_LORA = {"lr": 1e-6, "betas": [0.0, 0.99], "weight_decay": 0.0}
PAPER_FULL = {"lr": 5e-7, "betas": [0.0, 0.99], "weight_decay": 0.0}


def stated(optim) -> dict:
    return {"lr": optim.lr, "betas": list(optim.betas), "weight_decay": optim.weight_decay}


def test_sdxl_recipe_is_the_papers():
    cfg = load_config(ROOT / "configs" / "sdxl.yaml", check_paths=False)
    steps = [(s.teacher_steps, s.student_steps) for s in cfg.stages]
    assert steps == [(128, 32), (32, 8), (8, 4), (4, 2), (2, 1)]
    assert [s.cfg_scale for s in cfg.stages] == [6.0, 1.0, 1.0, 1.0, 1.0]
    assert [s.variant for s in cfg.stages[1:]] == ["lora+full"] * 3 + ["full"]
    assert cfg.model.prediction_type == "epsilon" and cfg.data.source == "shards"
    for s in cfg.stages:
        for phase in s.plan():
            where = f"{s.name} {phase.kind} {phase.train}"
            student = phase.optim
            if phase.kind in ("mse", "x0"):  # x0: not stated; the recipe uses the MSE stage's optimizer
                assert stated(student) == PAPER_MSE, where
                continue
            paper = PAPER_LORA if phase.train == "lora" else PAPER_FULL
            assert stated(student) == paper and stated(phase.disc.optim) == paper, where
            # not stated by the paper, so the recipe says it: clipping for both networks, no schedule
            for optim in (student, phase.disc.optim):
                assert optim.grad_clip == 1.0 and optim.warmup_steps == 0 and optim.decay == "constant", where
        if s.objective != "mse":
            assert s.mse_weight == 0.0 and s.lora.rank == 64 and s.disc.warmup_samples == 0 and s.ema_decay == 0.0
            assert s.disc.head_blocks == 3 and s.disc.head_channels is None
        multi = s.student_steps <= 2 and s.objective != "mse"
        assert s.disc.t_star == ([10, 250, 500, 750] if multi else []), s.name
        assert (s.disc.t_star_weights, s.disc.t_star_late_weights) == (([1, 1, 1, 1], [5, 1, 1, 1]) if multi else ([], []))
        for world in (8, 64):  # the paper's global batch, on 8 and on 64 GPUs
            assert s.micro_batch * s.accumulation(world) * world == 512
        with pytest.raises(ConfigError, match="global_batch.*not a multiple"):
            s.accumulation(48)
    assert cfg.stages[4].x0_samples > 0 and all(s.x0_samples == 0 for s in cfg.stages[:4])
    assert cfg.log.comparison_grid == "never"


@pytest.mark.parametrize("mutate, key, words", [
    (lambda d: d["teacher"].update(lrr=1), "teacher.lrr", "unknown key"),
    (lambda d: d["teacher"].update(loss_weighting="p2"), "teacher.loss_weighting", "not none, min_snr or min_snr_plus_one"),
    (lambda d: d["teacher"].update(input_perturbation=-0.1), "teacher.input_perturbation", "must be >= 0"),
    (lambda d: d["stages"][0].update(student_steps="many"), "stages[0].student_steps", "expected int"),
    (lambda d: d["stages"][0].update(student_steps=5), "stages[0].student_steps", "does not divide"),
    (lambda d: d["stages"].insert(1, {"name": "s2", "student_steps": 4, "teacher_steps": 16}), "stages[1].teacher_steps", "previous stage"),
    (lambda d: d["model"].update(base="/no/such/folder"), "model.base", "does not exist"),
    (lambda d: d["model"].update(prediction_type="x0"), "model.prediction_type", "not one of"),
    (lambda d: d.update(deepspeed="/no/such.json"), "deepspeed", "does not exist"),
    (lambda d: d["stages"][0].update(objective="gan"), "stages[0].objective", "not one of"),
    (lambda d: d["data"].update(source="shards", shards="/no/shards"), "data.shards", "index.json"),
    (lambda d: d["data"].pop("source"), "data.shards", "no shard folder given"),
    (lambda d: d["data"].update(source="web"), "data.source", "not one of"),
    (lambda d: d["data"].update(source="shapes", shapes={"position_in_caption": 2}), "data.shapes.position_in_caption",
     "must be in [0, 1]"),
    (lambda d: d["data"].update(source="shapes", shapes={"texture": "dots"}), "data.shapes.texture", "not one of"),
    (lambda d: d["data"].update(source="shapes", shapes={"dots": -2}), "data.shapes.dots", "must be >= 0"),
    (lambda d: d["data"].update(source="shapes", shapes={"objects": 5}), "data.shapes.objects", "one shape per corner"),
    (lambda d: d["run"].update(collective_timeout_s=0), "run.collective_timeout_s", "must be positive"),
    (lambda d: d["log"].update(comparison_grid="yes"), "log.comparison_grid", "auto, always or never"),
    (lambda d: d["stages"][1]["disc"].update(lora_optim={"lr": -1}), "stages[1].disc.lora_optim.lr", "must be positive"),
    (lambda d: d["stages"][1]["disc"].update(head_channels=0), "stages[1].disc.head_channels", "must be positive"),
    (lambda d: d["stages"][1]["disc"].update(steps_per_student_step=0), "stages[1].disc.steps_per_student_step",
     "must be >= 1"),
    (lambda d: d["stages"][0].update(global_batch=50, micro_batch=32), "stages[0].global_batch", "multiple of micro_batch"),
    (lambda d: d["stages"][0].update(global_batch=64, micro_batch=32, grad_accum=2), "stages[0].grad_accum", "either global_batch"),
    (lambda d: d["stages"][0].update(ema_decay=1.0), "stages[0].ema_decay", "must be in [0, 1)"),
    (lambda d: d["stages"][0].update(mse_optim={"lr": 0}), "stages[0].mse_optim.lr", "must be positive"),
    (lambda d: d["stages"][0].update(mse_samples=-1), "stages[0].mse_samples", "must be >= 0"),
    (lambda d: d["stages"][1]["lora"].update(relative_to="student"), "stages[1].lora.relative_to", "base or teacher"),
    (lambda d: d.update(probe={"stop_when_flat": True}), "probe.stop_when_flat", "needs probe.every_samples"),
    (lambda d: d.update(probe={"every_samples": 64, "count": 4}), "probe.count", "at least 16"),
    (lambda d: d.update(probe={"every_samples": 64, "backend": "inception"}), "probe.weights", "Inception weights"),
    (lambda d: d["stages"].insert(2, {**d["stages"][1], "name": "s3", "student_steps": 4, "teacher_steps": 8,
                                      "lora": {"rank": 8}}) or d["stages"][3].update(teacher_steps=4),
     "stages[2].lora", "cannot continue the previous stage's LoRA (rank 4 alpha None)"),
])
def test_bad_config_names_key_and_file(tmp_path, mutate, key, words):
    data = base_recipe()
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and key in msg and words in msg and "\n" not in msg


def test_deepspeed_json_that_contradicts_the_recipe(tmp_path):
    import json

    for extra, key in (({"train_micro_batch_size_per_gpu": 4}, "micro_batch"),
                       ({"gradient_accumulation_steps": 2}, "grad_accum"),
                       ({"optimizer": {"type": "Adam"}}, "optimizer")):
        ds = json.loads((ROOT / "ds_configs/zero2_cpu.json").read_text()) | extra
        ds_path = tmp_path / "ds.json"
        ds_path.write_text(json.dumps(ds))
        data = base_recipe() | {"deepspeed": str(ds_path)}
        with pytest.raises(ConfigError, match=key) as err:
            load_config(write(tmp_path, data))
        assert str(ds_path) in str(err.value)


def test_teacher_path_that_is_not_a_unet(tmp_path):
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "README.md").write_text("hello")
    data = base_recipe()
    data["teacher"]["init"] = str(tmp_path / "not_a_model")
    with pytest.raises(ConfigError, match=r"teacher.init: .* holds no UNet"):
        load_config(write(tmp_path, data))
    data = base_recipe()
    data["model"]["base"] = str(tmp_path / "not_a_model")
    with pytest.raises(ConfigError, match=r"model.base: .* has no unet/config.json"):
        load_config(write(tmp_path, data))


def test_unknown_key_suggests_the_close_one(tmp_path):
    data = base_recipe()
    data["log"]["keep_lats"] = 3
    with pytest.raises(ConfigError, match=r"did you mean 'log.keep_last'"):
        load_config(write(tmp_path, data))


def test_overrides_set_single_keys(tmp_path):
    path = write(tmp_path, base_recipe())
    cfg = load_config(path, ["stages.0.optim.lr=3e-5", "run.seed=7", "teacher.optim.betas=[0.0, 0.99]"])
    assert cfg.stages[0].optim.lr == 3e-5 and cfg.run.seed == 7 and cfg.teacher.optim.betas == [0.0, 0.99]
    with pytest.raises(ConfigError, match="no list item '3'"):
        load_config(path, ["stages.3.samples=1"])
    with pytest.raises(ConfigError, match="unknown key 'stages\\[0\\].sample'"):
        load_config(path, ["stages.0.sample=1"])


def test_cli_bad_config_is_one_line_and_starts_nothing(tmp_path):
    data = base_recipe()
    data["run"]["out_dir"] = str(tmp_path / "out")
    data["stages"][0]["student_steps"] = 3
    path = write(tmp_path, data)
    proc = subprocess.run([sys.executable, "-m", "trainer.run", "--config", str(path)], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "stages[0].student_steps" in lines[0] and str(path) in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage, phases", [
    (dict(objective="mse"), ["0_mse"]),
    (dict(objective="adv_cond+adv_uncond", variant="lora+full", samples=24, full_samples=16),
     ["0_adv_cond_lora:24", "1_adv_uncond_lora:24", "2_adv_uncond:16"]),
    (dict(student_steps=1, teacher_steps=2, objective="mse+adv_cond", x0_samples=8, samples=24),
     ["0_x0:8", "1_mse:24", "2_adv_cond:24"]),
    (dict(student_steps=1, teacher_steps=2, objective="mse+adv_cond", x0_samples=8, samples=24, mse_samples=40),
     ["0_x0:8", "1_mse:40", "2_adv_cond:24"]),
])
def test_stage_phases_follow_the_objective_and_variant(stage, phases):
    from trainer.config import StageConfig

    got = [p.job_name("s", i)[2:] + (f":{p.samples}" if ":" in phases[i] else "")
           for i, p in enumerate(StageConfig(**stage).plan())]
    assert got == phases


def test_phase_optimizers():
    from trainer.config import OptimConfig, StageConfig

    mse = OptimConfig(lr=2e-5)
    stage = StageConfig(student_steps=1, teacher_steps=2, objective="mse+adv_cond", x0_samples=8, mse_optim=mse)
    assert [p.optim for p in stage.plan()] == [stage.x0_optim, mse, stage.optim]
    lora = StageConfig(objective="mse", variant="lora", mse_optim=mse)
    assert [p.optim for p in lora.plan()] == [lora.lora.optim]  # LoRA phases: lora.optim
    plain = StageConfig(objective="mse")
    assert [p.optim for p in plain.plan()] == [plain.optim]


def test_disc_optimizer_follows_what_the_student_trains():
    from trainer.config import DiscConfig, OptimConfig, StageConfig

    full, lora = OptimConfig(lr=5e-7), OptimConfig(lr=1e-6)
    stage = StageConfig(student_steps=8, teacher_steps=32, objective="adv_cond+adv_uncond", variant="lora+full",
                        disc=DiscConfig(optim=full, lora_optim=lora))
    assert [p.disc.optim for p in stage.plan()] == [lora, lora, full]
    stage.disc.lora_optim = None  # unset: D keeps one optimizer in every phase
    assert [p.disc.optim for p in stage.plan()] == [full, full, full]


def test_disc_gradient_checkpointing_follows_the_student_unless_set():
    """Unset, D recomputes its activations when the student does: the toy turns both off with one key, the
    smoke and SDXL recipes keep both on; an explicit value wins."""
    for recipe, expected in (("shapes", False), ("smoke", True), ("sdxl", True)):
        cfg = load_config(ROOT / "configs" / f"{recipe}.yaml", check_paths=False)
        disc_phases = [p for stage in cfg.stages for p in stage.plan() if p.disc is not None]
        assert disc_phases and cfg.model.gradient_checkpointing == expected, recipe
        assert {p.disc.checkpointing(cfg.model.gradient_checkpointing) for p in disc_phases} == {expected}, recipe
    cfg = load_config(ROOT / "configs" / "shapes.yaml", ["stages.1.disc.gradient_checkpointing=true"], check_paths=False)
    assert cfg.stages[1].disc.checkpointing(False) and not cfg.stages[2].disc.checkpointing(False)
    assert cfg.stages[2].disc.gradient_checkpointing is None


def test_explicit_phases_equal_the_short_form_they_spell_out(tmp_path):
    """A stage's `phases:` list is the data its short form expands into: writing the expansion out gives the
    same plan (names, lengths, optimizers, D settings), and --print-plan shows it without touching a path."""
    import dataclasses

    import yaml

    short = load_config(ROOT / "configs" / "sdxl.yaml", check_paths=False)
    data = yaml.safe_load((ROOT / "configs" / "sdxl.yaml").read_text())
    stage = data["stages"][1]  # lora+full: LoRA cond, LoRA uncond, full uncond
    plan = short.stages[1].plan()
    for key in ("objective", "variant", "full_samples", "x0_samples", "mse_samples"):
        stage.pop(key, None)
    stage["phases"] = [{"kind": p.kind, "train": p.train, "samples": p.samples, "optim": dataclasses.asdict(p.optim),
                        "disc": dataclasses.asdict(p.disc)} for p in plan]
    path = tmp_path / "explicit.yaml"
    path.write_text(yaml.safe_dump(data))
    explicit = load_config(path, check_paths=False)
    assert explicit.stages[1].plan() == plan
    names = lambda cfg: [p.job_name(s.name, i) for s in cfg.stages for i, p in enumerate(s.plan())]
    assert names(explicit) == names(short)

    proc = subprocess.run([sys.executable, "-m", "trainer.run", "--config", str(path), "--print-plan"], cwd=ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "stage2_8.2_adv_uncond" in proc.stdout and "unconditional lr 5e-07" in proc.stdout
    assert len([l for l in proc.stdout.splitlines() if l.startswith("stage")]) == 13


@pytest.mark.parametrize("phases, extra, key, message", [
    ([{"kind": "gan"}], {}, "stages[0].phases[0].kind", "not one of"),
    ([{"kind": "x0", "train": "lora"}], {}, "stages[0].phases[0].train", "full UNet"),
    ([{"kind": "mse", "disc": {}}], {}, "stages[0].phases[0].disc", "only adversarial"),
    ([{"kind": "adv_cond", "optim": {"lr": -1}}], {}, "stages[0].phases[0].optim.lr", "positive"),
    ([{"kind": "mse"}], {"variant": "lora"}, "stages[0].phases", "not both"),
])
def test_bad_phases_name_their_key(tmp_path, phases, extra, key, message):
    import yaml

    data = {"stages": [{"student_steps": 8, "teacher_steps": 32, "phases": phases, **extra}]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(path, check_paths=False)
    assert key in str(err.value) and message in str(err.value) and str(path) in str(err.value)


def test_the_config_knows_the_textures_and_shape_counts_the_renderer_draws():
    from trainer.config import MAX_SHAPE_OBJECTS, SHAPE_TEXTURES
    from trainer.data.shapes import CORNERS, TEXTURES

    assert SHAPE_TEXTURES == TEXTURES and MAX_SHAPE_OBJECTS == len(CORNERS)
