"""trainer.launch without a cluster: the plan, --stages, skipping complete exports, validation before any
submission, the dry run, the distributed environment of a task, and trainer.run --stage. The SLURM runs
themselves are in tests/test_slurm.py."""
import pickle
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT, cli_env

from trainer.config import ConfigError, load_config
from trainer.runtime.dist_env import master_port
from trainer.launch import ClusterTask, distributed_env, parse_stages, plan_jobs, select_jobs

RECIPE = "tests/slurm_smoke.yaml"


def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=300)


def fake_export(path):
    (path / "unet").mkdir(parents=True)
    (path / "unet" / "config.json").write_text("{}")
    (path / "export.json").write_text("{}")


def config(tmp_path, *overrides):
    return load_config(ROOT / RECIPE, [f"run.out_dir={tmp_path}", "deepspeed=" + str(ROOT / "ds_configs/zero2_cpu.json"),
                                       *overrides])


@pytest.mark.parametrize("text, expected", [("1-2", (1, 2)), ("2", (2, 2)), ("1-", (1, 2)), ("-1", (0, 1)), ("0-0", (0, 0))])
def test_parse_stages(text, expected):
    assert parse_stages(text, last=2) == expected


@pytest.mark.parametrize("text", ["3", "2-1", "a-b", "1-5", ""])
def test_parse_stages_refuses(text):
    with pytest.raises(ConfigError):
        parse_stages(text, last=2)


def test_plan_skips_complete_exports_and_checks_the_first_teacher(tmp_path):
    cfg = config(tmp_path)
    assert [(j.number, j.name, j.done) for j in plan_jobs(cfg)] == [(0, "teacher", False), (1, "stage1_32", False),
                                                                     (2, "stage2_8", False)]
    with pytest.raises(ConfigError, match="needs its teacher"):
        select_jobs(cfg, plan_jobs(cfg), "2")
    fake_export(tmp_path / "exports" / "teacher")
    jobs = select_jobs(cfg, plan_jobs(cfg), "")
    assert [(j.name, j.done) for j in jobs] == [("teacher", True), ("stage1_32", False), ("stage2_8", False)]
    assert [j.name for j in select_jobs(cfg, plan_jobs(cfg), "1-1")] == ["stage1_32"]
    # no teacher training (teacher.init or samples 0): the first job is stage 1
    assert [j.name for j in plan_jobs(config(tmp_path, "teacher.samples=0"))] == ["stage1_32", "stage2_8"]


def test_bad_config_is_one_line_and_submits_nothing(tmp_path):
    proc = cli(["trainer.launch", "--config", RECIPE, "--set", f"run.out_dir={tmp_path}", "--set", "stages.0.sample=3",
                "--executor", "slurm"])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown key 'stages[0].sample'" in proc.stderr
    assert not (tmp_path / "launch").exists() and proc.stdout == ""
    proc = cli(["trainer.launch", "--config", RECIPE, "--set", f"run.out_dir={tmp_path}", "--stages", "2", "--dry-run"])
    assert proc.returncode == 2 and "needs its teacher" in proc.stderr
    proc = cli(["trainer.launch", "--config", RECIPE, "--set", f"run.out_dir={tmp_path}", "--executor", "local", "--no-wait"])
    assert proc.returncode == 2 and "--no-wait" in proc.stderr


def test_dry_run_prints_the_chain(tmp_path):
    fake_export(tmp_path / "exports" / "teacher")
    proc = cli(["trainer.launch", "--config", RECIPE, "--set", f"run.out_dir={tmp_path}", "--dry-run", "--executor", "slurm",
                "--tasks-per-node", "2", "--gpus-per-node", "0"])
    assert proc.returncode == 0, proc.stderr
    assert "2 of 3 selected jobs to run on slurm: 1 node(s) x 2 tasks, 0 GPUs/node" in proc.stdout
    assert f"--jobs stage1_32 --set run.out_dir={tmp_path}" in proc.stdout
    rows = {line.split()[1]: line for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()}
    assert "DONE (skipped)" in rows["teacher"] and "would submit" in rows["stage1_32"]
    assert rows["stage2_8"].split()[3] == "stage1_32"  # after
    assert not (tmp_path / "launch").exists()


def test_task_environment_from_submitit():
    slurm = SimpleNamespace(cluster="slurm", hostnames=["gpu07", "gpu08"], raw_job_id="4711", global_rank=9,
                            local_rank=1, num_tasks=16, num_nodes=2, node=1)
    env = distributed_env(slurm)
    assert env == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "NODE_RANK": "1",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(master_port(4711))}
    local = SimpleNamespace(cluster="local", hostnames=["x"], raw_job_id="321", global_rank=0, local_rank=0,
                            num_tasks=2, num_nodes=1, node=0)
    assert distributed_env(local)["MASTER_ADDR"] == "127.0.0.1"


def test_trainer_job_checkpoint_is_itself():
    job = ClusterTask("/abs/recipe.yaml", ["run.out_dir=/x"], "stage1_32", "/work")
    assert job.argv() == ["--config", "/abs/recipe.yaml", "--jobs", "stage1_32", "--set", "run.out_dir=/x"]
    again = pickle.loads(pickle.dumps(job.checkpoint()))
    assert again.function.argv() == job.argv() and again.args == () and again.kwargs == {}


def test_run_stage_option_is_validated(tmp_path):
    proc = cli(["trainer.run", "--config", RECIPE, "--set", f"run.out_dir={tmp_path}", "--stage", "3"])
    assert proc.returncode == 2 and "--stage 3: the recipe has 2 stages" in proc.stderr
    assert not (tmp_path / "config.yaml").exists()


def test_stage_scripts_share_one_header():
    """Every sbatch script requeues itself, warns with USR2 and runs one job of the recipe."""
    for name, select in [("teacher", "--jobs teacher")] + [(f"stage{n}", f"--stage {n}") for n in range(1, 6)]:
        text = (ROOT / "slurm" / f"{name}.sh").read_text()
        for line in ("#SBATCH --requeue", "#SBATCH --signal=USR2@", "#SBATCH --ntasks-per-node=", "#SBATCH --gpus-per-node=",
                     "#SBATCH --open-mode=append", f"lightning_job {select} \"$@\""):
            assert line in text, (name, line)
