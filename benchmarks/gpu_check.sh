#!/usr/bin/env bash
# One call on a lent GPU machine (H200): build, run the CUDA and Triton tests and the float64
# GPU meta-step equality tests, run the benchmarks, and print a short table last.
#
#   on the device (the device tool sets $OUT):   bash benchmarks/gpu_check.sh
#   dry run of the CPU parts on a CPU machine:   GPU_CHECK_DRY_RUN=1 OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
#
# Budget: under 8 minutes in all. Every step has its own timeout, so one slow step cannot starve
# the others; every step's full log goes to $OUT/<step>.log and the summary to $OUT/summary.md.
# pytest runs as `python -P -m pytest` so the source folder never shadows the installed package.
# Nothing here needs ../shared or the network: inputs are random tensors with the official shapes.
set -uo pipefail

OUT="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$OUT"
DRY="${GPU_CHECK_DRY_RUN:-0}"
PY="${PYTHON:-python3}"
if [[ "$DRY" == 1 ]]; then DEVICE=cpu; else DEVICE=cuda; fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PYTHONDONTWRITEBYTECODE=1
export MAMLPP_FAST_BUILD_CUDA="${MAMLPP_FAST_BUILD_CUDA:-auto}"
ROOT="$(pwd)"
STEPS=()

# run NAME SECONDS COMMAND...: one step, logged, timed, never fatal.
run() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  STEPS+=("$name|$rc|$((SECONDS - start))")
  tail -n 3 "$OUT/$name.log"
}

# 1. Build and install against the machine's torch (no network there).
if [[ "$DRY" != 1 ]]; then
  run build 240 "$PY" -m pip install --no-build-isolation --no-deps -v "$ROOT"
fi
run backends 60 bash -c "cd /tmp && $PY -c 'import mamlpp_fast, torch; print(mamlpp_fast.describe_backends()); print(torch.__version__, torch.version.cuda)'"

# 2. Tests: CUDA kernels, Triton kernels (compiled on the GPU, interpreted on the CPU), and whole
#    float64 meta-steps on the GPU against the CPU reference.
if [[ "$DRY" == 1 ]]; then
  run tests 300 "$PY" -P -m pytest -q -p no:cacheprovider -x tests/kernels -k "not cuda"
else
  run tests 200 "$PY" -P -m pytest -q -p no:cacheprovider -m "cuda or triton" tests/ops tests/kernels \
    tests/test_meta_learner_equivalence.py
fi

# 3. Benchmarks (JSON in $OUT). Small repetition counts keep the whole script inside the lease.
REPS=10; [[ "$DRY" == 1 ]] && REPS=1
run bench_lslr_update 60 "$PY" benchmarks/bench_lslr_update.py --device "$DEVICE" --json "$OUT/bench_lslr_update.json"
run bench_bn_lrelu_pool 90 "$PY" benchmarks/bench_bn_lrelu_pool.py --device "$DEVICE" --quick --json "$OUT/bench_bn_lrelu_pool.json"
SETTINGS=maml++_omniglot_20w1s
[[ "$DRY" == 1 ]] && SETTINGS=maml++_omniglot_5w1s
run bench_meta_step 150 "$PY" benchmarks/bench_meta_step.py --device "$DEVICE" --settings "$SETTINGS" \
  --providers reference,mamlpp_fast:aten,mamlpp_fast,torchfunc --reps "$REPS" --json "$OUT/bench_meta_step.json"

# 4. The short table, last.
"$PY" - "$OUT" "${STEPS[@]}" <<'PY' | tee "$OUT/summary.md"
import json, os, sys
out, steps = sys.argv[1], sys.argv[2:]
print("| step | exit | seconds |\n|---|---|---|")
for s in steps:
    name, rc, secs = s.split("|")
    print(f"| {name} | {rc} | {secs} |")
tests = os.path.join(out, "tests.log")
if os.path.exists(tests):
    lines = [l for l in open(tests).read().splitlines() if " passed" in l or " failed" in l or " error" in l]
    print("\ntests:", lines[-1] if lines else "no summary line")
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path))["results"] if os.path.exists(path) else []
rows = load("bench_meta_step.json")
if rows:
    print("\n| meta-step | provider | s/iter | speed-up vs reference |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']['setting']} | {r['provider']} | {r['seconds_median']:.4f} | {r['speedup_vs_reference']:.2f} |")
blp = load("bench_bn_lrelu_pool.json")
if blp:
    by = {}
    for r in blp:
        c = r["config"]
        by.setdefault((c["n"], c["B"], c["C"], c["S"], c["mode"]), {})[c["provider"]] = r["median_ms"]
    print("\n| bn_lrelu_pool n,B,C,S,mode | " + " | ".join(sorted({p for v in by.values() for p in v})) + " |")
    for key, t in list(by.items())[:12]:
        print(f"| {key} | " + " | ".join(f"{t[p]:.3f}" for p in sorted(t)) + " |")
PY
