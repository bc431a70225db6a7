#!/usr/bin/env bash
# The GPU checks of issue 7, in one pass (about 7 minutes on an H100/H200), each step guarded
# so a failure or a time-out in one still lets the others run:
#   1. CUDA correctness: the CUDA tests and the pure-core tests (generator, reward model,
#      group, trainer, metrics) - they import goalrank_core only, no ray/prefect/mlflow/boto3;
#   2. throughput and MFU of GoalRank generator training (fp32, tf32, bf16 autocast; against
#      the card's dense data-sheet peak) and of G-E's components (reward model, supervised
#      generator): bench.throughput;
#   3. the scaling law up to ~108M generator parameters on the GPU: bench.scaling.
#
#   OUT=/some/dir GOALRANK_DATA_DIR=.devdata bash bench/gpu_checks.sh
#
# GOALRANK_DATA_DIR must hold ml-100k/ (u.data, u.item, u.user). Results and logs go to $OUT,
# flat, at most 8 files: env.txt, pytest.log, throughput.log, throughput_cuda_full.json,
# scaling.log, scaling_cuda_full.json, summary.json. GPU_CHECKS_TINY=1 shrinks every size
# (a CPU smoke run of the script itself); GPU_CHECKS_GUARD=1 makes ray/prefect/mlflow/boto3
# imports fail, as on the GPU machine; PYTHON picks the interpreter (default python3);
# GPU_CHECKS_LIMIT_SCALE multiplies every step's time limit (default 1, 8 when tiny).
set +e
set -u
cd "$(dirname "$0")/.." || exit 1
: "${OUT:?set OUT to the results folder}"
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export GOALRANK_DATA_DIR=$(cd "${GOALRANK_DATA_DIR:-.devdata}" 2>/dev/null && pwd || echo "${GOALRANK_DATA_DIR:-.devdata}")
export PYTHONUNBUFFERED=1
TINY=${GPU_CHECKS_TINY:-0}
# Step limits are for the GPU machine; a tiny CPU smoke run on a busy box gets them scaled.
SCALE=${GPU_CHECKS_LIMIT_SCALE:-$([ "$TINY" = 1 ] && echo 8 || echo 1)}
if [ "${GPU_CHECKS_GUARD:-0}" = 1 ]; then RUN="$PY -m bench.gpu_util run"; PYTEST="$RUN pytest"
else RUN="$PY -m"; PYTEST="$PY -m pytest"; fi
if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then DEV=cuda; else DEV=cpu; fi
T_START=$(date +%s)
declare -A RC WALL

step() {  # step NAME LIMIT_S LOG CMD...: run CMD under `timeout`, log its output, time it
  local name=$1 limit=$(( $2 * SCALE )) log=$3; shift 3
  local t0=$(date +%s)
  echo "=== [$name] start $(date -u +%H:%M:%S) (limit ${limit}s): $*" | tee -a "$OUT/$log"
  timeout --kill-after=15 "$limit" "$@" >>"$OUT/$log" 2>&1
  RC[$name]=$?
  WALL[$name]=$(( $(date +%s) - t0 ))
  echo "=== [$name] rc=${RC[$name]} wall=${WALL[$name]}s$([ "${RC[$name]}" = 124 ] && echo ' (timed out)')" | tee -a "$OUT/$log"
  tail -n 4 "$OUT/$log" | sed "s/^/    [$name] /"
}

# 0. What machine this is (one file).
{
  date -u; uname -a; nvidia-smi 2>&1 | head -20
  $PY -c "import torch, numpy, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__,
'cuda', torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"
  $PY -m bench.gpu_util peak
  echo "device=$DEV tiny=$TINY data=$GOALRANK_DATA_DIR"; ls "$GOALRANK_DATA_DIR" "$GOALRANK_DATA_DIR/ml-100k" 2>&1 | head
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. CUDA correctness + the pure-core tests (skip markers: `slow` ones are left out).
TESTS="tests/test_generator.py tests/test_generator_decode.py tests/test_reward_model.py tests/test_group.py
       tests/test_trainer.py tests/test_metrics.py"
CUDA_TESTS="tests/test_generator.py tests/test_generator_decode.py"
step cuda_tests 60 pytest.log $PYTEST -v -p no:cacheprovider -m "not slow" -ra -k cuda $CUDA_TESTS
step core_tests 90 pytest.log $PYTEST -v -p no:cacheprovider -m "not slow" -ra --durations=8 -k "not cuda" $TESTS

# 2. Throughput and MFU. The set-up fit (proposers, reward model, groups) is shortened with
# --set; the timed bare loops do not depend on it.
if [ "$TINY" = 1 ]; then
  TP_ARGS=(--mode quick --max-users 20 --epochs 2 --extra-batch-sizes 64 --precision fp32,tf32,bf16 --peak-tflops auto)
else
  TP_ARGS=(--mode full --epochs 2 --precision fp32,tf32,bf16 --peak-tflops auto --extra-batch-sizes 2048
           --set train.aux_epochs=1 --set train.reward_epochs=1 --set train.epochs=1)
fi
step throughput 130 throughput.log $RUN bench.throughput --device "$DEV" --ge --results-dir "$OUT" "${TP_ARGS[@]}"

# 3. Scaling up to ~108M generator parameters (the JSON is rewritten after every size, so a
# time-out keeps the sizes it finished; sizes ascend).
if [ "$TINY" = 1 ]; then
  SC_ARGS=(--mode quick --max-users 20 --k 2 --sizes 8x1x2,16x1x2)
else
  SC_ARGS=(--mode full --tf32 --sizes 64x2x4,256x4x8,512x6x8,768x8x12,1152x8x16
           --set train.aux_epochs=1 --set train.reward_epochs=2 --set train.epochs=1 --set group.rounds=1)
fi
step scaling 180 scaling.log $RUN bench.scaling --device "$DEV" --results-dir "$OUT" "${SC_ARGS[@]}"

# Summary: each step's exit code and wall time, and the headline numbers from the JSONs.
TOTAL=$(( $(date +%s) - T_START ))
$PY - "$OUT" "$DEV" "$TOTAL" "${RC[cuda_tests]}" "${WALL[cuda_tests]}" "${RC[core_tests]}" "${WALL[core_tests]}" \
    "${RC[throughput]}" "${WALL[throughput]}" "${RC[scaling]}" "${WALL[scaling]}" <<'EOF'

import glob, json, os, re, sys
out, dev, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps = {n: {"rc": int(sys.argv[4 + 2 * i]), "wall_s": int(sys.argv[5 + 2 * i])}
         for i, n in enumerate(("cuda_tests", "core_tests", "throughput", "scaling"))}
s = {"device": dev, "total_wall_s": total, "steps": steps}
log = open(os.path.join(out, "pytest.log")).read() if os.path.exists(os.path.join(out, "pytest.log")) else ""
m = re.findall(r"^=*\s*(\d.*(?:passed|failed|error|deselected).*?) in [\d.]+s", log, re.M)
s["pytest"] = {"results (cuda, core)": m, "failed": re.findall(r"^(?:FAILED|ERROR) (\S+)", log, re.M),
               "skipped": re.findall(r"^SKIPPED \[\d+\] (.*)", log, re.M)}
def section(name, pattern, fn):
    for f in sorted(glob.glob(os.path.join(out, pattern))):
        try:
            s[name] = {"file": os.path.basename(f), **fn(json.load(open(f)))}
        except Exception as exc:  # a partial or odd file: say so, keep the rest of the summary
            s[name] = {"file": os.path.basename(f), "error": repr(exc)}


def tp(doc):
    d = doc["data"]
    return {"setup_s": d.get("setup_s"), "peak_tflops": doc["config"].get("peak_tflops"),
            "goalrank_mfu": {p: v["mfu"] for p, v in d["by_precision"].items()},
            "goalrank_samples_per_s": {p: v["samples_per_s"] for p, v in d["by_precision"].items()},
            "goalrank_mfu_other_batch": {k: v["mfu"] for k, v in d.get("by_batch_size", {}).items()},
            "ge_mfu": {c: {p: q["mfu"] for p, q in v["by_precision"].items()} for c, v in d.get("ge_components", {}).items()},
            "train_mflop_per_request": d["flops"]["train_flops_per_request"] / 1e6}


def sc(doc):
    return {"sizes_done": doc["config"].get("sizes_done"),
            "points": [{"params": p["params"], "goalrank_ndcg@6": p["goalrank"]["ndcg@6"],
                        "mixture_ndcg@6": p["mixture"]["ndcg@6"], "fit_s": round(p["fit_s"] + p["mixture_fit_s"], 1)}
                       for p in doc["data"]["points"]]}


section("throughput", "throughput*.json", tp)
section("scaling", "scaling*.json", sc)
json.dump(s, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(s, indent=1))
EOF
echo "=== gpu_checks done in ${TOTAL}s: cuda tests rc=${RC[cuda_tests]} (${WALL[cuda_tests]}s), core tests rc=${RC[core_tests]} (${WALL[core_tests]}s), throughput rc=${RC[throughput]} (${WALL[throughput]}s), scaling rc=${RC[scaling]} (${WALL[scaling]}s); files in $OUT:"
ls -la "$OUT"
