#!/usr/bin/env bash
# The GPU check: build the extension on a CUDA machine, run the GPU tests, time every kernel
# and the end-to-end training step and refinement against the reference and torch backends.
# One call, about 8 minutes on an H100/H200. Logs and JSON go to $OUT (default bench/results/run).
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
#   SECTIONS="device build gpu-tests refine" bash bench/gpu_check.sh   # some sections only
#
# Sections run in priority order, each with a time limit, under one overall deadline
# (DEADLINE_S, default 420 s), so one slow part cannot starve the rest. The summary at the end
# lists every section's status, the headline lines of each table and what the run says about
# the defaults that wait for a measurement (bench/decide_defaults.py: the graph kernels, the
# TF32 mixes, the Gram pieces, the eager depthwise kernels, the depthwise launch configs, the
# strip budget, the MDTA prefetch depth, the MDTA route per dtype).
# With a 480 s limit on the whole call: DEADLINE_S=455 fits the sections up to mdta-prefetch;
# proxy-fp32 and the MDTA table after it may be cut short (the ninth session's sections up to
# its tables took about 440 s on the H200, the GPU tests 160-175 s of it, and the eleventh
# session added GPU tests; at most 8 files come back). The
# tenth session (no GPU) changed what those measure: the proxy-attention forward no longer has
# its wgmma serialised (C7515) and its backward issues fewer instructions, and MDTA's 16-bit
# streams can keep two tiles in flight; all untimed, hence the proxy table right after the
# GPU tests. The eleventh session (no GPU either, static only: bench/results/sm90_static_2026-11-27b.md)
# changed more, all untimed: the proxy forward's softmax shift (fixed by the temperature's
# bound, no running maximum, where |tau| log2 e <= 40), a leaner dk/dv loop with 64-query blocks
# as a candidate, wgmma tiles for the float32 backward (whose rows the new proxy-fp32 section
# times), the MDTA Gram pass's squares kept per element, bfloat16 mix rows no longer scaled
# (fewer registers: two programs per SM for the single mix at 96 channels, and the dual mix
# may keep two tiles in flight at depth 2); the GPU tests gained every d = 96 autotune config
# forced one at a time and bfloat16 MDTA with zero channels. The twelfth session (no GPU) made
# the CPU tests run every kernel in bf16 (tests/interpreter_bf16.py) and every proxy autotune
# config's block sizes in the interpreter; its one kernel change is outside the loops (a
# forward split with no key blocks writes out 0 instead of 0/0). The thirteenth (no GPU) changed
# no kernel: the ops' backwards check grad mode once per call (create_graph=True gradients
# refuse a second derivative instead of dropping it). A second call (about 350 s of device time; a machine
# idle for 30 s is given back, so it builds again): SECTIONS="device build launch-overhead
# train-step profile refine" DEADLINE_S=300 (the training step has not been measured since the
# sixth session), or, if the first call cut them, SECTIONS="device build proxy-fp32 mdta".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/run}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
DEADLINE=$(( $(date +%s) + ${DEADLINE_S:-420} ))
summary=()

section() {  # section NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    if [[ -n "${SECTIONS:-}" && " $SECTIONS " != *" $name "* ]]; then return 0; fi
    local start=$(date +%s)
    local left=$(( DEADLINE - start ))
    if (( left < 15 )); then summary+=("$(printf '%-16s skipped (deadline)' "$name")"); return 0; fi
    (( limit > left )) && limit=$left
    echo "=== $name (limit ${limit}s)" >> "$LOG"
    timeout --signal=INT --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    summary+=("$(printf '%-16s rc=%-3s %4ss' "$name" "$rc" "$(( $(date +%s) - start ))")")
}

section device 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__)'"
section build 150 $PY -m pip install --no-build-isolation --no-deps -q -e .
section info 30 $PY -c "import json, sipl_fast; print(json.dumps(sipl_fast.info()))"
# Parallel workers: most of the time is Triton and inductor compilation, which is CPU-bound
# (H200 machine, 16 cores, 2026-11-27: 174 s with 15 workers, the graph training tests longest).
# GPU_TESTS: the test files or node ids to run (default: all of tests/).
section gpu-tests 240 $PY -m pytest -q -m gpu -p no:cacheprovider -n 15 ${GPU_TESTS:-tests} --durations=15 --junitxml="$OUT/gpu_tests.xml"
# The open issues' kernels first (3 and 4; the refinement, issue 5, met its targets on the
# H200 on 2026-11-27): the proxy-attention table, the MDTA kernels' 16-bit streams with 0, 1
# and 2 tiles loaded ahead (depth 2 new in the tenth session), replayed from CUDA graphs, and
# the MDTA table.
section proxy-attention 75 $PY bench/proxy_attention_table.py "$OUT/proxy_attention.json" --budget-s "${TABLE_BUDGET_S:-60}" --compile-budget-s 10
section mdta-prefetch 60 $PY bench/mdta_prefetch.py "$OUT/mdta_prefetch.json" --budget-s 40
# The float32 rows of the training shape and the refinement's 65536 x 4096 forward, which the
# table's budget has always cut: 3xTF32 is SIPL's default training precision, and the eleventh
# session (no GPU) gave its backward wgmma tile candidates (its 32 x 32 blocks issued 6-9x more
# instructions per logit, sm_90 SASS).
section proxy-fp32 50 $PY bench/proxy_attention_table.py "$OUT/proxy_attention_fp32.json" --dtypes fp32 --shapes "level1 train128 B8,cross_p1 512px" --providers triton,torch,reference --budget-s 35 --compile-budget-s 0
section mdta 75 $PY bench/transposed_attention_table.py "$OUT/transposed_attention.json" --budget-s "${TABLE_BUDGET_S:-60}" --compile-budget-s 10
# Host time per eager call of the attention ops (the tables' eager columns were up to 6x their
# kernels' replayed time): by route, and per Triton launch through the JIT and the compiled launcher.
section launch-overhead 30 $PY bench/launch_overhead.py "$OUT/launch_overhead.json"
section refine 130 $PY bench/refine_table.py "$OUT/refine.json"
# Launch configurations of the row-streaming depthwise kernels (the fused GDFN depthwise + gate
# was the largest kernel of a replayed refinement), each checked bit for bit against the plan.
section depthwise-sweep 60 $PY bench/depthwise_sweep.py "$OUT/depthwise_sweep.json" --budget-s 45
# The MDTA case: its eager fwd+bwd ran 3.5x its kernels' time (H200, 2026-11-27b): where the CPU goes.
section profile 90 $PY bench/profile_gpu.py --json "$OUT/profile.json" --only "${PROFILE_ONLY:-refine 512x512 steps=2 (eager|graph|reference)|train step bf16 (reference|auto)$|MDTA fwd\+bwd dec1 512x512 bfloat16}"
section train-step 100 $PY bench/train_step_table.py --steps 5 --warmup 2 --providers "${TRAIN_PROVIDERS:-auto,auto+graph,auto+graph+aten}" --json "$OUT/train_step.json"
# The autotuner's picks for MDTA's two streaming kernels (reported in the JSON), to compare
# with the launchers' plans (16-bit streams at the planned pipeline depth: deeper ones are
# not exact; with them the H200's dec1 bf16 forward ran 1.5x faster).
section mdta-autotune 70 env SIPL_FAST_TRITON_AUTOTUNE=1 $PY bench/transposed_attention_table.py "$OUT/mdta_autotune.json" --budget-s 50 --compile-budget-s 1
section pixel-ops 75 $PY bench/pixel_ops_table.py "$OUT/pixel_ops.json" --dtypes fp32,amp --ops pointwise_depthwise,projection_gate,projection_dual_gate --compile-budget-s 5

{
echo
echo "=== summary"
printf '%s\n' "${summary[@]}"
grep -aE "^(FAILED|ERROR) " "$LOG" | head -40
grep -aE "[0-9]+ (passed|failed)" "$LOG" | tail -2
grep -aiE "target|speed-up|speedup|faster than|TFLOP/s|copy bandwidth|matmul|ms/step|peak|^== |^autotuned |planned config| us per call|^launch " "$LOG" | grep -av "^ *#" | tail -80
echo
echo "=== defaults waiting for a measurement (bench/decide_defaults.py)"
timeout 20 $PY bench/decide_defaults.py "$OUT"
} | tee -a "$LOG"
