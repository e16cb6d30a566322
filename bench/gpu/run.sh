#!/usr/bin/env bash
# The GPU check, one command on a lent GPU machine (one H100/H200, no network; the lease: 15 minutes of device
# time per session, start-up (~40 s) and every later call included):
#   (a) bench/gpu/tiny_sdxl_check.py: configs/sdxl.yaml on a tiny random SDXL through `python -m trainer.run`
#       (NCCL, one rank): checkpoints, a SIGUSR2 preemption and resume, a preempted and resumed EMA phase,
#       the five exports; the trainer's "GPU memory at phase start" lines
#   (b) bench/rank0.py --preset sdxl: rank 0's solo work at SDXL size (grid decode on the GPU and on one CPU
#       thread, UNet load, export) against run.main_work_timeout_s / run.collective_timeout_s; it runs in the
#       background, beside (a) and (c), on one CPU thread (so its times are upper bounds)
#   (c) bench/step.py --preset sdxl, most telling first: LoRA micro-batch 4 with --profile (GPU-idle share of the
#       step, top kernels and CPU ops, the bare teacher forward's TFLOP/s as is and channels_last); the MSE
#       stage; full micro-batch 1 (the memory model: fits up to 3); last, full micro-batch 1 with optimizer
#       offload (torch's Adam on the CPU over 3.9 B fp32 parameters: slow, and least telling), one timed step;
#       MFU and peak memory; then bench/memory.py --compare (model vs measured peaks)
# and one summary at the end: stdout, $OUT/summary.md, $OUT/summary.json.
#   here:  bash bench/gpu/fetch_wheels.sh            (once; fills .whl/)
#   there: bash bench/gpu/run.sh                     (through the device tool, carry [".whl"]; results in $OUT)
#   smoke test on a CPU: PRESET=tiny OUT=/tmp/gpu_check bash bench/gpu/run.sh   (times: bench/README.md)
# Time: every part runs under `timeout`, within BUDGET_S (default 540 s: the 15-minute lease less start-up, the
# summary and the transfers, and ~5 minutes kept for a second, shorter call); (a) gets A_LIMIT_S (330 s: on
# 2026-11-28 its third run needed more than the ~50 s that 240 left it); a (c) run that no longer fits is
# skipped and reported. Measured times: bench/results/gpu_check_2026-11-28.md. Exit: 0 every part OK; 1 a
# part FAILED; 2 nothing failed but a part is INCOMPLETE (cut by the time budget).
set -uo pipefail
cd "$(dirname "$0")/../.."
T0=$SECONDS
OUT=${OUT:-/tmp/gpu_check}
PRESET=${PRESET:-sdxl}
if [[ "$PRESET" == tiny ]]; then BUDGET_S=${BUDGET_S:-1800} A_LIMIT_S=${A_LIMIT_S:-600}
else BUDGET_S=${BUDGET_S:-540} A_LIMIT_S=${A_LIMIT_S:-330}; fi
ITERS=${ITERS:-3}
WARMUP=${WARMUP:-1}
RANK0_SCRATCH=${RANK0_SCRATCH:-/tmp/rank0_scratch}
mkdir -p "$OUT"
rm -rf "$OUT/tiny_sdxl" "$OUT/c_logs"
rm -f "$OUT"/{log.txt,step.json,memory.json,memory_compare.md,rank0.json,rank0.log,rank0.rc,tiny_sdxl.json,tiny_sdxl.md,tiny_sdxl.log,c_runs.jsonl,summary.md,summary.json,logs.tar.gz}
mkdir -p "$OUT/c_logs"
if [[ "$PRESET" != tiny ]] && compgen -G ".whl/*.whl" > /dev/null; then  # (the smoke test uses .venv)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site
fi
PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python && "$PRESET" == tiny ]] && PYTHON=.venv/bin/python
export PYTHON PRESET OUT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi 2>/dev/null | head -15
"$PYTHON" -c "import torch, deepspeed, diffusers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'deepspeed', deepspeed.__version__, 'diffusers', diffusers.__version__)" 2>&1 | grep -v -i warn

left() { echo $(( BUDGET_S - (SECONDS - T0) )); }
cap() { local l; l=$(( $(left) - $2 )); (( l < 1 )) && l=1; (( l < $1 )) && echo "$l" || echo "$1"; }  # min(CAP, time left - RESERVE), >= 1

# -- (b) in the background: one CPU thread, beside (a) and (c) --------------------------------------------
if [[ "$PRESET" == tiny ]]; then RANK0_ARGS=(--preset tiny); else RANK0_ARGS=(--preset sdxl --cpu-decode-images 1); fi
B_START=$SECONDS
echo "== (b) bench/rank0.py ${RANK0_ARGS[*]} in the background (log: $OUT/rank0.log)"
B_LIMIT=$(cap 100000 25)
( start=$SECONDS
  timeout -k 30 "$B_LIMIT" "$PYTHON" bench/rank0.py "${RANK0_ARGS[@]}" --out "$RANK0_SCRATCH" --setup-threads 2 \
      --json "$OUT/rank0.json" > "$OUT/rank0.log" 2>&1
  echo "$? $(( SECONDS - start ))" > "$OUT/rank0.rc" ) &
B_PID=$!

# -- (a) ----------------------------------------------------------------------------------------------------
echo "== (a) bench/gpu/tiny_sdxl_check.py (log: $OUT/tiny_sdxl.log)"
A_START=$SECONDS
timeout -k 10 "$(cap "$A_LIMIT_S" 150)" "$PYTHON" bench/gpu/tiny_sdxl_check.py "$OUT" > "$OUT/tiny_sdxl.log" 2>&1
A_RC=$?
A_S=$(( SECONDS - A_START ))
grep -E "^\s+\[(ok|FAILED)\]|^   SIGUSR2|^-- " "$OUT/tiny_sdxl.log" | tail -40
echo "   (a) exit $A_RC, $A_S s"

# -- (c) ----------------------------------------------------------------------------------------------------
C_START=$SECONDS
# step NAME CAP_S MIN_S ARGS...: one bench/step.py run under `timeout`, skipped when MIN_S no longer fit
step() {
    local name=$1 limit=$2 need=$3; shift 3
    local log="$OUT/c_logs/$name.log" t start rc status
    t=$(cap "$limit" 30)
    if (( t < need )); then
        echo "== (c) $name: SKIPPED ($(left) s left of the budget, needs ~$need s)"
        printf '{"name": "%s", "args": "%s", "status": "skipped", "rc": null, "seconds": 0}\n' "$name" "$*" >> "$OUT/c_runs.jsonl"
        return
    fi
    echo "== (c) $name: bench/step.py --preset $PRESET $* (limit $t s)"
    start=$SECONDS
    timeout -k 10 "$t" "$PYTHON" bench/step.py --preset "$PRESET" --iters "$ITERS" --warmup "$WARMUP" \
        --json "$OUT/step.json" "$@" > "$log" 2>&1
    rc=$?
    grep -v -i "warn" "$log" | grep -E "^(==|  )" | tee -a "$OUT/log.txt"
    if (( rc == 0 )); then status=ok
    elif (( rc == 124 || rc == 137 )); then status=timeout; grep -E "^-- " "$log" | tail -3  # how far it got
    elif grep -q -E "OutOfMemoryError|CUDA out of memory" "$log"; then status=oom
    else status=failed; grep -v -i "warn" "$log" | tail -15
    fi
    echo "   $name: $status (exit $rc, $(( SECONDS - start )) s)"
    printf '{"name": "%s", "args": "%s", "status": "%s", "rc": %d, "seconds": %d}\n' \
        "$name" "$*" "$status" "$rc" "$(( SECONDS - start ))" >> "$OUT/c_runs.jsonl"
}
# most telling first; the offload run last: on 2026-11-28 it did not finish in 152 s (torch's Adam on the CPU)
step lora_mb4         200 90 --mode lora --micro-batch 4 --profile
step mse_lora_mb4     120 60 --mode lora --micro-batch 4 --objective mse --student-steps 32
step full_mb1         100 60 --mode full --micro-batch 1          # the memory model: fits an 80 GB card (up to mb 3)
step full_mb1_offload 240 90 --mode full --micro-batch 1 --offload --iters 1   # (the last --iters wins)
M_START=$SECONDS
M_RC=skipped
if (( $(left) > 20 )) && [[ -f "$OUT/step.json" ]]; then
    timeout -k 5 "$(cap 90 5)" "$PYTHON" bench/memory.py --preset "$PRESET" --compare "$OUT/step.json" \
        --json "$OUT/memory.json" > "$OUT/memory_compare.md" 2>&1
    M_RC=$?
fi
M_S=$(( SECONDS - M_START ))
C_S=$(( SECONDS - C_START ))

# -- (b): wait for it -----------------------------------------------------------------------------------------
wait "$B_PID"
read -r B_RC B_S < "$OUT/rank0.rc" 2>/dev/null || { B_RC=1; B_S=$(( SECONDS - B_START )); }
(( B_RC != 0 )) && { echo "== (b) exit $B_RC; last lines of $OUT/rank0.log:"; grep -v -i warn "$OUT/rank0.log" | tail -15; }
rm -rf "$RANK0_SCRATCH"/rank0-*  # in case `timeout` had to kill it
rmdir "$RANK0_SCRATCH" 2>/dev/null

# -- the summary ----------------------------------------------------------------------------------------------
export A_RC A_S B_RC B_S C_S M_RC M_S BUDGET_S
TOTAL_S=$(( SECONDS - T0 )) "$PYTHON" - <<'PY'
import json
import os
import re
from pathlib import Path

out = Path(os.environ["OUT"])
env = os.environ
total, budget = int(env["TOTAL_S"]), int(env["BUDGET_S"])


def load(name, default=None):
    path = out / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


summary = {"preset": env["PRESET"], "total_s": total, "budget_s": budget, "parts": {}}
md = []

# (a)
a = load("tiny_sdxl.json", {})
a_rc, a_s = int(env["A_RC"]), int(env["A_S"])
a_status = "OK" if a_rc == 0 and a.get("ok") else ("INCOMPLETE" if a_rc in (124, 137) else "FAILED")
summary["parts"]["a"] = {"status": a_status, "seconds": a_s, "rc": a_rc, **{k: a.get(k) for k in (
    "device", "backend", "parts", "checks", "preemptions", "gpu_memory", "exports")}}
md.append(f"## (a) tiny SDXL through trainer.run: {a_status} ({a_s} s, exit {a_rc})")
for p in a.get("parts", []):
    md.append(f"- {p['name']}: {'ok' if p['ok'] else 'FAILED'} {p['seconds']:.1f} s" + (f" ({p['error']})" if p.get("error") else ""))
checks = a.get("checks", [])
md.append(f"- checks passed: {sum(c['ok'] for c in checks)}/{len(checks)}")
md += [f"  - FAILED {c['name']}: {c['detail']}" for c in checks if not c["ok"]]
md += [f"- preempted {p['job']} at {p['samples']}/{p['of']} samples, resumed" for p in a.get("preemptions", [])]
exports = a.get("exports", {})
if exports:
    md.append(f"- exports with export.json, listed by the trainer: {sum(e['export_json'] and e['listed'] for e in exports.values())}/{len(exports)}")
gpu = a.get("gpu_memory", [])
if gpu:
    allocated = [g["allocated_gib"] for g in gpu]
    md.append(f"- GPU memory at phase start (allocated / reserved GiB; allocated {min(allocated):.2f}-{max(allocated):.2f} "
              f"over {len(gpu)} phase starts: growth would mean a phase's engines outlived it):")
    md += [f"  - {g['job']}: {g['allocated_gib']:.2f} / {g['reserved_gib']:.2f} ({g['run']})" for g in gpu]
else:
    md.append("- GPU memory at phase start: " + ("none printed (CPU run)" if a.get("backend") == "gloo" else "no lines found"))

# (b)
b = load("rank0.json", {})
b_rc, b_s = int(env["B_RC"]), int(env["B_S"])
b_status = "OK" if b_rc == 0 and b.get("ok") else ("INCOMPLETE" if b_rc in (124, 137, 143) and not b.get("errors") else "FAILED")
summary["parts"]["b"] = {"status": b_status, "seconds": b_s, "rc": b_rc, **{k: b.get(k) for k in (
    "preset", "device", "cpu", "threads", "timeouts", "times", "skipped", "errors")}}
md.append("")
md.append(f"## (b) rank 0's solo work, {b.get('preset', '?')} sizes, {b.get('threads', 1)} CPU thread "
          f"({b.get('cpu', '?')}), in the background: {b_status} ({b_s} s, exit {b_rc})")
timeouts = b.get("timeouts", {})
for name, row in b.get("times", {}).items():
    md.append(f"- {name}: {row['seconds']:.2f} s = {row['of_main_work_timeout']:.2%} of main_work_timeout_s "
              f"({timeouts.get('main_work_timeout_s', 0):.0f} s), {row['of_collective_timeout']:.2%} of collective_timeout_s "
              f"({timeouts.get('collective_timeout_s', 0):.0f} s); binding: {row['binding_timeout']} [{row['what']}]")
md += [f"- {name}: skipped ({why})" for name, why in b.get("skipped", {}).items()]
md += [f"- {name}: FAILED ({err})" for name, err in b.get("errors", {}).items()]
if b and not b.get("done"):
    md.append("- stopped before the end (time budget): the times above are what it measured")

# (c)
runs = [json.loads(line) for line in (out / "c_runs.jsonl").read_text().splitlines()] if (out / "c_runs.jsonl").is_file() else []
rows = load("step.json", [])
memory = load("memory.json", {})
m_rc = env["M_RC"]


def row_for(run):
    args = run["args"].split()
    get = lambda flag, default: args[args.index(flag) + 1] if flag in args else default
    want = (get("--mode", "full"), get("--objective", "adv"), int(get("--micro-batch", 0)), "--offload" in args)
    for r in rows:
        if (r["mode"], r["objective"], r["micro_batch"], r["offload"]) == want:
            return r
    return None


def last_progress(run):
    """bench/step.py's last "-- " line: how far a run got before its time limit."""
    try:
        lines = [l[3:] for l in (out / "c_logs" / f"{run['name']}.log").read_text().splitlines() if l.startswith("-- ")]
    except OSError:
        return ""
    return f" (last: {lines[-1]})" if lines else " (no progress line: cut while building)"


def profile_tables(name, r):
    """--profile's tables: where the whole step's time went, and the bare teacher forward's rate."""
    prof, fwd, md_rows = r.get("profile"), r.get("unet_forward_tflops"), []
    if not prof and not fwd:
        return []
    md_rows += ["", f"### {name}: --profile"]
    if prof and "error" in prof:
        md_rows.append(f"- profile FAILED: {prof['error']}")
    elif prof:
        line = f"- one more whole step under torch.profiler: wall {prof['wall_s'] * 1e3:.0f} ms (unprofiled median {r['whole_s'] * 1e3:.0f} ms)"
        if "gpu_busy_s" in prof:
            line += (f"; GPU busy {prof['gpu_busy_s'] * 1e3:.0f} ms (kernels summed {prof['gpu_kernel_sum_s'] * 1e3:.0f} ms, "
                     f"{prof['device_events']:,} device events): **GPU idle {prof['gpu_idle_share']:.0%}** of the profiled "
                     f"step, {prof['gpu_idle_share_unprofiled']:.0%} of the unprofiled one")
        md_rows.append(line)
        if prof.get("cuda_kernels"):
            md_rows += ["", "| top CUDA kernels by total time | ms | calls |", "|---|---|---|"]
            md_rows += [f"| `{k['name']}` | {k['total_ms']:.1f} | {k['calls']} |" for k in prof["cuda_kernels"]]
        md_rows += ["", "| top CPU ops by self time | ms | calls |", "|---|---|---|"]
        md_rows += [f"| `{o['name']}` | {o['self_ms']:.1f} | {o['calls']} |" for o in prof["cpu_ops"]]
    if fwd and "error" in fwd:
        md_rows += ["", f"- bare teacher forward FAILED: {fwd['error']}"]
    elif fwd:
        md_rows += ["", f"- bare teacher forward, no grad, bf16, batch {fwd['batch']} ({fwd['forward_flops'] / 1e12:.3g} TFLOP, "
                        f"median of {fwd['repeats']}): " + "; ".join(
                            f"{f} {fwd[f]['seconds'] * 1e3:.1f} ms = {fwd[f]['tflops']:.3g} TFLOP/s"
                            + (f" ({fwd[f]['of_peak']:.1%} of peak)" if fwd[f]["of_peak"] is not None else "")
                            for f in ("contiguous", "channels_last"))]
    return md_rows


c_lines, c_bad, c_cut, c_profiles = [], 0, 0, []
for run in runs:
    r = row_for(run) if run["status"] == "ok" else None
    if run["status"] == "ok" and r is not None:
        text = (f"whole step {r['whole_s'] * 1e3:.0f} ms, {r['samples_per_s']:.2f} samples/s, "
                f"whole/parts {r['whole_over_parts']:.3f}")
        if "mfu" in r:
            text += f", student {r['student_tflops']:.0f} TFLOP/s = MFU {r['mfu']:.1%}, peak {r['peak_gib']:.1f} GiB"
        run["result"] = {k: r.get(k) for k in ("whole_s", "samples_per_s", "whole_over_parts", "student_tflops", "mfu",
                                                 "peak_gib", "parts_s", "cudnn_benchmark", "profile",
                                                 "unet_forward_tflops") if k in r}
        c_profiles += profile_tables(run["name"], r)
    elif run["status"] == "oom":
        text = "out of memory (the memory model said it fits: compare the peaks)"
        c_bad += 1
    elif run["status"] in ("skipped", "timeout"):
        text = "skipped: time budget" if run["status"] == "skipped" else "cut by its time limit" + last_progress(run)
        c_cut += 1
    else:
        text = f"FAILED (exit {run['rc']}; log c_logs/{run['name']}.log)"
        c_bad += 1
    c_lines.append(f"- {run['name']} ({run['args']}): {run['status']}, {run['seconds']} s; {text}")
if m_rc == "0":
    compare = memory.get("compare", [])
    c_lines.append(f"- memory.py --compare: ok, {env['M_S']} s; measured/modelled peak: " + (", ".join(
        f"{c['phase']} {c['mode']}{' offload' if c['offload'] else ''} mb {c['micro_batch']}: {c['peak_gib']:.1f}/"
        f"{c['modelled_gib']:.1f} GiB = {c['ratio']:.2f}" for c in compare) or "no measured peaks (CPU)"))
elif m_rc == "skipped":
    c_lines.append("- memory.py --compare: skipped (time budget, or no step.json)")
    c_cut += 1
elif m_rc in ("124", "137"):  # its `timeout`: the budget's last seconds, not a failure of the model
    c_lines.append(f"- memory.py --compare: cut by its time limit ({env['M_S']} s; memory_compare.md)")
    c_cut += 1
else:
    c_lines.append(f"- memory.py --compare: FAILED (exit {m_rc}; memory_compare.md)")
    c_bad += 1
c_status = "FAILED" if c_bad or not runs else ("INCOMPLETE" if c_cut else "OK")
summary["parts"]["c"] = {"status": c_status, "seconds": int(env["C_S"]), "runs": runs,
                         "memory_compare": memory.get("compare", []), "memory_rc": m_rc}
md.append("")
md.append(f"## (c) {env['PRESET']}-preset steps (bench/step.py), memory model vs peaks: {c_status} ({env['C_S']} s)")
md += c_lines + c_profiles

statuses = {k: v["status"] for k, v in summary["parts"].items()}
summary["ok"] = all(s == "OK" for s in statuses.values())
head = [f"# GPU check ({env['PRESET']} preset): " + ", ".join(f"({k}) {s}" for k, s in statuses.items())
        + f"; {total} s of the {budget} s budget", ""]
table = ["| part | status | wall time |", "|---|---|---|",
         *(f"| ({k}) | {v['status']} | {v['seconds']} s |" for k, v in summary["parts"].items()), ""]
text = "\n".join(head + table + md) + "\n"
(out / "summary.md").write_text(text)
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print("\n" + "=" * 100 + "\n" + text, flush=True)
PY
S_RC=$?
# The device tool brings back at most 8 files from $OUT: the results stay loose, the logs go into one archive.
LOGS=(c_logs tiny_sdxl log.txt rank0.log rank0.rc tiny_sdxl.log tiny_sdxl.md c_runs.jsonl memory.json)
( cd "$OUT" && tar czf logs.tar.gz --ignore-failed-read "${LOGS[@]}" 2>/dev/null )
[[ "$PRESET" != tiny ]] && ( cd "$OUT" && rm -rf "${LOGS[@]}" )
echo "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
(( S_RC != 0 )) && { echo "summary failed (exit $S_RC)"; exit 1; }
"$PYTHON" -c "
import json, sys
s = json.load(open('$OUT/summary.json'))['parts']
st = [p['status'] for p in s.values()]
sys.exit(1 if 'FAILED' in st else 2 if 'INCOMPLETE' in st else 0)"
