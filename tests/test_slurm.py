"""On a real SLURM (scripts/local_slurm.sh start; scripts/test.sh starts it when run as root on Debian):
the sbatch scripts with 2 ranks, trainer.launch's afterok chain, a failing job that cancels its dependent,
and preemption (scancel --signal=USR2 mid-stage) -> checkpoint, requeue, resume, bit-identical weights,
through both the sbatch scripts and the submitit launcher.

Recipe: tests/slurm_smoke.yaml (toy teacher + two short MSE stages), 2 tasks per job, 1 CPU each.
Skipped, with the reason, where `sinfo` is missing or no node of the cluster takes jobs."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, latest_state

RECIPE = "tests/slurm_smoke.yaml"
SBATCH_2_RANKS = ["--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
LAUNCH_2_RANKS = ["--executor", "slurm", "--tasks-per-node", "2", "--gpus-per-node", "0", "--cpus-per-task", "1",
                  "--timeout-min", "10", "--poll-s", "2"]
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
PHASE = "jobs/stage1_32/stage1_32.0_mse"  # stage 1's only phase (one MSE job)


def _cluster_problem() -> str:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM is not installed (sinfo/sbatch not found); as root on Debian: bash scripts/local_slurm.sh start"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo does not answer: no SLURM controller is up (bash scripts/local_slurm.sh start)"
    if out.returncode != 0:
        return f"no SLURM controller answers ({out.stderr.strip()[:120]}): bash scripts/local_slurm.sh start"
    if not any(s.rstrip("*~#$@+") in ("idle", "mixed", "allocated", "completing") for s in out.stdout.split()):
        return f"no SLURM node takes jobs (states: {out.stdout.split()})"
    if subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, timeout=20).returncode != 0:
        return "sacct does not work (no slurmdbd): the launcher cannot see failed jobs"
    return ""


PROBLEM = _cluster_problem()
pytestmark = pytest.mark.skipif(bool(PROBLEM), reason=PROBLEM)
SUBMITTED: list[str] = []  # cancelled at the end if a failing test left any behind


@pytest.fixture(scope="module", autouse=True)
def _cancel_leftovers():
    yield
    if SUBMITTED:
        subprocess.run(["scancel", *SUBMITTED], capture_output=True)


def sbatch(script: str, out: Path, *options: str, args: tuple = ()) -> str:
    cmd = ["sbatch", "--parsable", *SBATCH_2_RANKS, "-o", str(out / "slurm-%x-%j.out"), *options, script, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(CONFIG=RECIPE), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    SUBMITTED.append(job_id)
    return job_id


def sacct(job_id: str) -> list[dict]:
    """Every run of the job (a requeued job has one row per run), oldest first."""
    fields = ["JobID", "State", "ExitCode", "Start", "End"]
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", ",".join(fields)],
                         capture_output=True, text=True, timeout=60).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.startswith(job_id + "|")]


def steps(job_id: str) -> list[str]:
    out = subprocess.run(["sacct", "-D", "-n", "-P", "-j", job_id, "-o", "JobID"], capture_output=True, text=True,
                         timeout=60).stdout
    return [line for line in out.split() if "." in line]


def wait_final(job_ids: list[str], timeout: float = 420) -> dict[str, str]:
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = {j: (sacct(j) or [{"State": "?"}])[-1]["State"].split()[0] for j in job_ids}
        if all(s in final for s in states.values()):
            return states
        time.sleep(2)
    raise AssertionError(f"jobs still not finished after {timeout} s: {states}")


def wait_for(path: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.2)


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def final_state(out: Path) -> dict:
    return latest_state(out / PHASE)


def start_from_teacher(reference: Path, out: Path) -> Path:
    """A run folder holding the reference run's base model, shards and teacher export: stage 1 to do."""
    (out / "exports").mkdir(parents=True)
    for part in ("base", "shards", "grid_prompts.safetensors"):
        if (reference / part).is_dir():
            shutil.copytree(reference / part, out / part)
        elif (reference / part).exists():
            shutil.copy2(reference / part, out / part)
    shutil.copytree(reference / "exports" / "teacher", out / "exports" / "teacher")
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """slurm/teacher.sh, then slurm/stage1.sh after it (afterok), uninterrupted, 2 ranks each."""
    out = tmp_path_factory.mktemp("slurm-reference")
    overrides = ("--set", f"run.out_dir={out}")
    teacher = sbatch("slurm/teacher.sh", out, args=overrides)
    stage1 = sbatch("slurm/stage1.sh", out, f"--dependency=afterok:{teacher}", "--kill-on-invalid-dep=yes", args=overrides)
    states = wait_final([teacher, stage1])
    logs = "\n".join(p.read_text() for p in sorted(out.glob("slurm-*.out")))
    assert states == {teacher: "COMPLETED", stage1: "COMPLETED"}, logs[-5000:]
    return out, teacher, stage1, logs


def test_sbatch_scripts_run_a_stage_with_two_ranks(reference):
    out, teacher, stage1, logs = reference
    assert "--jobs teacher" in logs and "--stage 1" in logs and "2 tasks" in logs
    assert (out / "exports" / "stage1_32" / "export.json").is_file()
    digests = final_state(out)["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # two ranks, same weights
    assert sacct(stage1)[-1]["Start"] >= sacct(teacher)[-1]["End"]  # afterok: after the teacher ended
    assert not (out / "exports" / "stage2_8").exists()  # stage1.sh ran stage 1 only


@pytest.mark.parametrize("sig, workers", [("USR2", 0), ("TERM", 1)])
def test_sbatch_preemption_requeues_and_resumes_bit_identical(reference, tmp_path, sig, workers):
    """SLURM's warning (USR2), and SIGTERM with a DataLoader worker in every task (SLURM signals every
    process of the step, the workers included): checkpoint, requeue, resume, the same weights."""
    ref, *_ = reference
    out = start_from_teacher(ref, tmp_path / "preempted")
    job = sbatch("slurm/stage1.sh", out, args=("--set", f"run.out_dir={out}", "--set", f"data.num_workers={workers}"))
    wait_for(out / PHASE / "tb")  # training has started (the trainer's signal handler is in place)
    time.sleep(1.5)
    assert not (out / "exports" / "stage1_32").exists(), "stage 1 finished before it could be preempted"
    subprocess.run(["scancel", f"--signal={sig}", job], check=True, timeout=60)
    assert wait_final([job]) == {job: "COMPLETED"}
    log = next(out.glob("slurm-*.out")).read_text()
    stopped = [line for line in log.splitlines() if "[stage1_32.0_mse] stopped at" in line]
    assert stopped and int(stopped[0].split("stopped at ")[1].split()[0]) < 160, log[-4000:]
    assert "requeueing job" in log and "[stage1_32.0_mse] resumed from" in log
    runs = sacct(job)
    assert [r["State"] for r in runs] == ["REQUEUED", "COMPLETED"], runs
    assert same_bytes(out / "exports" / "stage1_32" / WEIGHTS, ref / "exports" / "stage1_32" / WEIGHTS)


def launch(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer.launch", "--config", RECIPE, "--set", f"run.out_dir={out}",
                             *LAUNCH_2_RANKS, *extra], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def submitted(out: Path) -> dict[str, str]:
    record = out / "launch" / "submitted.json"
    jobs = {j["name"]: j["job_id"] for j in json.loads(record.read_text())["jobs"]} if record.is_file() else {}
    SUBMITTED.extend(jobs.values())
    return jobs


def test_launcher_chains_stages_and_survives_preemption(reference, tmp_path):
    """teacher export present -> skipped; stage 1 -> stage 2 (afterok); USR2 mid-stage-1: submitit's
    requeue, resume, same weights as the uninterrupted sbatch run; a re-run submits nothing."""
    ref, *_ = reference
    out = start_from_teacher(ref, tmp_path / "launched")
    proc = launch(out)
    wait_for(out / PHASE / "tb")
    time.sleep(1.5)
    jobs = submitted(out)
    assert not (out / "exports" / "stage1_32").exists(), "stage 1 finished before it could be preempted"
    subprocess.run(["scancel", "--signal=USR2", jobs["stage1_32"]], check=True, timeout=60)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-5000:]
    assert f"submitted stage2_8 as job {jobs['stage2_8']} (afterok:{jobs['stage1_32']})" in output
    assert "DONE (skipped)" in output and "all done" in output
    stage1, stage2 = sacct(jobs["stage1_32"]), sacct(jobs["stage2_8"])
    assert [r["State"] for r in stage1] == ["REQUEUED", "COMPLETED"], stage1
    assert [r["State"] for r in stage2] == ["COMPLETED"] and stage2[0]["Start"] >= stage1[-1]["End"]
    task0 = (out / "launch" / jobs["stage1_32"] / f"{jobs['stage1_32']}_0_log.out").read_text()
    assert "[stage1_32.0_mse] stopped at" in task0 and "Requeued job" in task0 and "resumed from" in task0
    assert same_bytes(out / "exports" / "stage1_32" / WEIGHTS, ref / "exports" / "stage1_32" / WEIGHTS)
    assert (out / "exports" / "stage2_8" / "export.json").is_file()

    again = launch(out)
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and "0 of 3 selected jobs" in output and "submitted" not in output, output


def test_launcher_failing_job_cancels_its_dependent(tmp_path):
    """A crash at run time (a toy UNet that cannot be built; the config itself validates): the teacher job
    fails, stage 1 never runs, the launcher says so and exits 1."""
    out = tmp_path / "failing"
    proc = launch(out, "--stages", "0-1", "--set", "model.unet.norm_num_groups=5")
    output, _ = proc.communicate(timeout=600)
    jobs = submitted(out)
    assert proc.returncode == 1, output[-4000:]
    assert set(jobs) == {"teacher", "stage1_32"}
    assert sacct(jobs["teacher"])[-1]["State"] == "FAILED"
    assert sacct(jobs["stage1_32"])[-1]["State"].startswith("CANCELLED")
    assert steps(jobs["stage1_32"]) == []  # it never started
    last_table = output.split("[")[-1]
    assert "FAILED" in last_table and "never ran: teacher failed" in last_table, output[-3000:]
    assert "not completed: teacher (failed), stage1_32 (cancelled)" in output
