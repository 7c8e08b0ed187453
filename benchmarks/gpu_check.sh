#!/usr/bin/env bash
# One call on a lent GPU machine (H200): build, run the CUDA and Triton tests and the float64
# GPU meta-step equality tests, run the benchmarks, and print a short table last.
#
#   on the device (the device tool sets $OUT):   bash benchmarks/gpu_check.sh
#     with carry [".whl"] when benchmarks/prepare_gpu_payload.sh has built the peer libraries
#     (learn2learn, higher) there: they are installed offline and timed against MetaLearner.
#   dry run of the CPU parts on a CPU machine:   GPU_CHECK_DRY_RUN=1 OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
#
# Budget: under 8 minutes in all (GPU_CHECK_BUDGET, default 450 s, for the steps). Every step has
# its own timeout, so one slow step cannot starve the others. Every step's full log and JSON go to $LOG (a scratch folder), which is re-packed into
# $OUT/gpu_check_logs.tar.gz after each step (the device tool returns at most 8 files, and a run cut
# short still returns what finished); the summary table goes to $OUT/summary.md.
# pytest runs as `python -P -m pytest` so the source folder never shadows the installed package.
# Nothing here needs ../shared or the network: inputs are random tensors with the official shapes.
set -uo pipefail

OUT="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$OUT"
LOG="${GPU_CHECK_LOG_DIR:-$(mktemp -d /tmp/gpu_check_logs.XXXXXX)}"
mkdir -p "$LOG"
DRY="${GPU_CHECK_DRY_RUN:-0}"
PY="${PYTHON:-python3}"
if [[ "$DRY" == 1 ]]; then DEVICE=cpu; else DEVICE=cuda; fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if [[ -z "${CUDA_HOME:-}" ]]; then  # where nvcc is, as torch.utils.cpp_extension would look
  if command -v nvcc >/dev/null; then CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then CUDA_HOME=/usr/local/cuda; fi
fi
[[ -n "${CUDA_HOME:-}" ]] && export CUDA_HOME && export PATH="$CUDA_HOME/bin:$PATH"
export PYTHONDONTWRITEBYTECODE=1
export MAMLPP_FAST_BUILD_CUDA="${MAMLPP_FAST_BUILD_CUDA:-auto}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1
ROOT="$(pwd)"
STEPS=()

# The whole script's budget in seconds (bash's SECONDS counts from the start): a step gets at most
# what is left of it, and is skipped when under 15 s are left, so the summary table is always
# printed inside the device call (the steps' own limits add up to far more than 8 minutes; they
# are ceilings for a hung step, not the expected times).
BUDGET="${GPU_CHECK_BUDGET:-450}"

# run NAME SECONDS COMMAND...: one step, logged, timed, never fatal.
run() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 15)); then
    echo "=== $name skipped: ${left}s of the ${BUDGET}s budget left"
    STEPS+=("$name|skipped|0")
    echo "$name|skipped|0" >>"$LOG/steps.txt"
    return
  fi
  ((limit > left)) && limit=$left
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$LOG/$name.log" 2>&1
  local rc=$?
  STEPS+=("$name|$rc|$((SECONDS - start))")
  echo "$name|$rc|$((SECONDS - start))" >>"$LOG/steps.txt"
  tail -n 3 "$LOG/$name.log"
  tar czf "$OUT/gpu_check_logs.tar.gz" -C "$LOG" .
}

# 1. Build and install against the machine's torch (no network there).
if [[ "$DRY" != 1 ]]; then
  run gpu 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  run build 200 "$PY" -m pip install --no-build-isolation --no-deps -v "$ROOT"
fi
# The peer libraries, when carried (.whl/ from benchmarks/prepare_gpu_payload.sh; the image has
# no network). A dry run uses whatever the local Python has.
PEERS=0
if [[ "$DRY" != 1 && -d "$ROOT/.whl" ]]; then
  run peers_install 60 "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$ROOT"/.whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import peers; \
assert {'learn2learn', 'higher'} <= set(peers.available_peers())" >/dev/null 2>&1 && PEERS=1
run backends 60 bash -c "cd /tmp && $PY -c 'import mamlpp_fast, torch; print(mamlpp_fast.describe_backends()); print(torch.__version__, torch.version.cuda)'"

# 2. Tests: CUDA kernels, Triton kernels (compiled on the GPU, interpreted on the CPU), and whole
#    float64 meta-steps on the GPU against the CPU reference.
if [[ "$DRY" == 1 ]]; then
  run tests 300 "$PY" -P -m pytest -q -p no:cacheprovider -x tests/kernels -k "not cuda"
else
  run tests 240 "$PY" -P -m pytest -q -p no:cacheprovider -rfE -m "cuda or triton" tests/ops tests/kernels \
    tests/test_meta_learner_equivalence.py tests/test_cuda_graphs.py tests/test_mixed_precision.py
fi

# The trainer on the device: SIGTERM mid-epoch, resume, same end as an uninterrupted run (with the
# graphed meta-step and Adam step re-recorded after the resume).
run train_smoke 90 "$PY" benchmarks/train_smoke.py --device "$DEVICE" --cuda-graphs

# 3. Benchmarks, most important first (JSON and PNG in $LOG). Small repetition counts keep the
#    whole script inside the lease.
REPS=10; [[ "$DRY" == 1 ]] && REPS=1
SETTINGS=maml++_omniglot_20w1s,maml++_mini-imagenet_5w1s
PROVIDERS=reference,mamlpp_fast:aten,mamlpp_fast,mamlpp_fast+triton,mamlpp_fast+graphs,mamlpp_fast+graphs+eageradam,mamlpp_fast+graphs+cudnnbench,mamlpp_fast+graphs+explicit,mamlpp_fast+graphs+bmm,mamlpp_fast+graphs+triton,mamlpp_fast+graphs+triton/auto/auto/auto,mamlpp_fast+graphs+blockdiag/auto/auto/auto,mamlpp_fast+graphs+bf16,torchfunc
if [[ "$DRY" == 1 ]]; then  # no Triton kernels on the CPU
  SETTINGS=maml++_omniglot_5w1s
  PROVIDERS=reference,mamlpp_fast:aten,mamlpp_fast,mamlpp_fast+grouped,mamlpp_fast+graphs,mamlpp_fast+graphs+bmm,mamlpp_fast+bf16,torchfunc
fi
run bench_meta_step 170 "$PY" benchmarks/bench_meta_step.py --device "$DEVICE" --settings "$SETTINGS" \
  --providers "$PROVIDERS" --reps "$REPS" --json "$LOG/bench_meta_step.json"
if [[ "$PEERS" == 1 ]]; then  # learn2learn and higher against the reference and MetaLearner
  # (+graphs runs eagerly, with a warning, in a CPU dry run)
  run bench_meta_step_peers 90 "$PY" benchmarks/bench_meta_step.py --device "$DEVICE" --settings "$SETTINGS" \
    --providers reference,learn2learn,higher,mamlpp_fast+graphs --reps "$(( REPS < 5 ? REPS : 5 ))" --json "$LOG/bench_meta_step_peers.json"
fi
PROFILE_SETTING=maml++_omniglot_20w1s; [[ "$DRY" == 1 ]] && PROFILE_SETTING=maml++_omniglot_5w1s
run profile_meta_step 60 "$PY" benchmarks/profile_meta_step.py --device "$DEVICE" --setting "$PROFILE_SETTING"
run bench_lslr_update 45 "$PY" benchmarks/bench_lslr_update.py --device "$DEVICE" --json "$LOG/bench_lslr_update.json"
run bench_bn_lrelu_pool 60 "$PY" benchmarks/bench_bn_lrelu_pool.py --device "$DEVICE" --quick --json "$LOG/bench_bn_lrelu_pool.json"
run bench_task_cross_entropy 30 "$PY" benchmarks/bench_task_cross_entropy.py --device "$DEVICE" \
  --json "$LOG/bench_task_cross_entropy.json"
if [[ "$DRY" != 1 ]]; then  # the same ops replayed from CUDA graphs: GPU time, as inside cuda_graphs=True
  run bench_lslr_update_graphed 45 "$PY" benchmarks/bench_lslr_update.py --device cuda --graphed \
    --json "$LOG/bench_lslr_update_graphed.json"
  run bench_bn_lrelu_pool_graphed 60 "$PY" benchmarks/bench_bn_lrelu_pool.py --device cuda --quick --graphed \
    --json "$LOG/bench_bn_lrelu_pool_graphed.json"
  run bench_task_cross_entropy_graphed 30 "$PY" benchmarks/bench_task_cross_entropy.py --device cuda --graphed \
    --json "$LOG/bench_task_cross_entropy_graphed.json"
fi
CONV_ARGS=(); [[ "$DRY" == 1 ]] && CONV_ARGS=(--quick --modes fwd)
run bench_task_conv 60 "$PY" benchmarks/bench_task_conv.py --device "$DEVICE" "${CONV_ARGS[@]}" --json "$LOG/bench_task_conv.json"
LAYOUT_ARGS=(); [[ "$DRY" == 1 ]] && LAYOUT_ARGS=(--quick)
run bench_task_conv_layout 45 "$PY" benchmarks/bench_task_conv_layout.py --device "$DEVICE" "${LAYOUT_ARGS[@]}" \
  --json "$LOG/bench_task_conv_layout.json"
ROOF_SETTING=maml++_omniglot_20w1s; [[ "$DRY" == 1 ]] && ROOF_SETTING=maml++_omniglot_5w1s
run bench_roofline 50 "$PY" benchmarks/bench_roofline.py --device "$DEVICE" --settings "$ROOF_SETTING" \
  --providers reference,mamlpp_fast+graphs --reps 3 --json "$LOG/bench_roofline.json"
if [[ "$DRY" != 1 ]]; then  # the scale issue's memory target (mini-ImageNet, B=32, 20 vs 5 steps)
  run bench_memory_target 60 "$PY" benchmarks/bench_memory.py --target --device cuda
fi
if [[ "$DRY" == 1 ]]; then
  run bench_scaling 120 "$PY" benchmarks/bench_scaling.py --quick --axes tasks --no-reference --out "$LOG"
else
  run bench_scaling 90 "$PY" benchmarks/bench_scaling.py --device cuda --provider mamlpp_fast+graphs \
    --axes tasks,steps,image --reps 3 --out "$LOG" --json "$LOG/bench_scaling.json"
fi

# 4. The short table, last.
"$PY" - "$LOG" "${STEPS[@]}" <<'PY' | tee "$OUT/summary.md"
import json, os, sys
out, steps = sys.argv[1], sys.argv[2:]
print("| step | exit | seconds |\n|---|---|---|")
for s in steps:
    name, rc, secs = s.split("|")
    print(f"| {name} | {rc} | {secs} |")
target = os.path.join(out, "bench_memory_target.log")
if os.path.exists(target):
    print("\n" + "\n".join(l for l in open(target).read().splitlines() if l.startswith(("|", "target"))))
profile = os.path.join(out, "profile_meta_step.log")
if os.path.exists(profile):
    print("\n" + "\n".join(l for l in open(profile).read().splitlines() if l.startswith("summary:")))
smoke = os.path.join(out, "train_smoke.log")
if os.path.exists(smoke):
    print("\n" + "\n".join(l for l in open(smoke).read().splitlines() if l.startswith("train_smoke:")))
tests = os.path.join(out, "tests.log")
if os.path.exists(tests):
    lines = [l for l in open(tests).read().splitlines() if " passed" in l or " failed" in l or " error" in l]
    print("\ntests:", lines[-1] if lines else "no summary line")
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path))["results"] if os.path.exists(path) else []
rows = load("bench_meta_step.json") + load("bench_meta_step_peers.json")
if rows:
    print("\n| meta-step | provider | s/iter | speed-up vs reference |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']['setting']} | {r['provider']} | {r['seconds_median']:.4f} | {r['speedup_vs_reference']:.2f} |")
roof = os.path.join(out, "bench_roofline.json")
if os.path.exists(roof):
    data = json.load(open(roof))["results"][0]
    print("\npeaks:", "; ".join(f"{p['name']}: {p['gflops']:.0f} GFLOP/s" for p in data["peaks"]))
    for r in data["results"]:
        print(f"roofline {r['setting']} {r['provider']}: {r['gflop_per_iter']:.1f} GFLOP/iter, "
              f"{r['seconds_median'] * 1e3:.2f} ms/iter, useful {r['useful_gflops']:.0f} GFLOP/s")
def pivot(title, rows, key, column, columns=None, limit=24, value=lambda r: r["median_ms"]):
    """One markdown row per key(row), one column per column(row): value(row), in ms."""
    table = {}
    for r in rows:
        table.setdefault(key(r), {})[column(r)] = value(r)
    columns = columns or sorted({c for t in table.values() for c in t})
    print(f"\n| {title} | " + " | ".join(f"{c} ms" for c in columns) + " |\n" + "|---" * (len(columns) + 1) + "|")
    for k, t in list(table.items())[:limit]:
        print(f"| {k} | " + " | ".join(f"{t.get(c, float('nan')):.3f}" for c in columns) + " |")
conv = [r for r in load("bench_task_conv.json") if r["config"]["B"] == 8]
if conv:
    pivot("task conv (B=8) shape, mode", conv,
          lambda r: (r["config"]["dataset"], f"{r['config']['cin']}->{r['config']['cout']}", r["config"]["S"], r["config"]["mode"]),
          lambda r: r["config"]["strategy"], ["grouped", "explicit", "bmm", "loop", "triton", "blockdiag"])
layout = load("bench_task_conv_layout.json")
if layout:
    pivot("conv layer, 2nd-order pattern", layout,
          lambda r: (r["config"]["setting"], f"{r['config']['cin']}->{r['config']['cout']}", r["config"]["S"]),
          lambda r: r["config"]["layout"], ["NCHW", "NHWC"])
bn_key = lambda r: (r["config"]["n"], r["config"]["B"], r["config"]["C"], r["config"]["S"], r["config"]["mode"])  # noqa: E731
for name, title in (("bench_bn_lrelu_pool.json", "bn_lrelu_pool n,B,C,S,mode"),
                    ("bench_bn_lrelu_pool_graphed.json", "bn_lrelu_pool graphed n,B,C,S,mode")):
    rows = load(name)
    if rows:
        pivot(title, rows, bn_key, lambda r: r["config"]["provider"], limit=12)
for name, title in (("bench_lslr_update.json", "lslr_update B,theta,mode"),
                    ("bench_lslr_update_graphed.json", "lslr_update graphed B,theta,mode")):
    rows = [r for r in load(name) if r["config"]["batch"] == 8]
    if rows:
        pivot(title, rows, lambda r: (r["config"]["batch"], "shared" if r["config"]["shared"] else "batched", r["config"]["mode"]),
              lambda r: r["provider"], value=lambda r: r["timing"]["p50_ms"])
for name, title in (("bench_task_cross_entropy.json", "task_cross_entropy shapes,B,mode"),
                    ("bench_task_cross_entropy_graphed.json", "task_cross_entropy graphed shapes,B,mode")):
    rows = [r for r in load(name) if r["config"]["batch"] == 8]
    if rows:
        pivot(title, rows, lambda r: (r["config"]["set_name"], r["config"]["batch"], r["config"]["mode"]),
              lambda r: r["provider"], value=lambda r: r["timing"]["p50_ms"])
PY
