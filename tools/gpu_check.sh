#!/usr/bin/env bash
# One command that proves every GPU path on a CUDA machine, in under ten minutes, and writes one summary.
#
#   bash tools/gpu_check.sh [--out DIR] [--budget SECONDS]   # on a GPU: install, test, benchmark (<= 540 s)
#   bash tools/gpu_check.sh --fetch-wheels                   # on a machine with pip access: the wheels, into .whl/
#
# On a machine without CUDA it runs nothing heavy and exits 0 with one line saying why.
#
# Stages, each under `timeout` and under a total budget the script enforces itself (default 540 s; a stage
# gets at most what is left), printing as it goes, so a partial run still reports what it reached:
#   install   the Python packages the GPU image lacks (megatron-core, omegaconf, antlr4) from .whl/, if missing
#   tests     pytest -m gpu: CUDA-graph replay == eager, bf16 autocast ~ fp32, each attention backend ==
#             the reference, NCCL on one GPU (tests/test_gpu.py and the CUDA tests of test_model / test_spec_engine)
#   mfu       tools/bench/train_mfu.py: PolicyTrainer steps of a 1.25B model, tokens/s and MFU (+ measured ceilings)
#   packing   tools/bench/packing.py: packed vs padded training tokens/s, bf16
#   rollout   tools/bench/rollout.py: plain vs SD tokens/s, transformers generate, batch-1 decode vs HBM roofline
#   fp8       tools/bench/fp8.py on the rollout stage's (cached) model: FP8 weight bytes, logits error / KL, bf16 vs FP8 tokens/s
# Output: DIR/gpu_summary.txt (the figures) and DIR/<stage>.log; DIR is --out, else $OUT, else /tmp/gpu_check.
#
# With the project's device tool (no registry there; wheels travel with the working tree, .whl/ is ignored):
#   here, once:  bash tools/gpu_check.sh --fetch-wheels
#   then:        run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=570)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

# The packages the GPU image lacks (device KINDS.md), pinned to what CI runs with; no dependencies beyond them.
WHEELS=(megatron-core==0.16.1 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2)
WHEEL_DIR=".whl"
PY_VERSION="3.12"
PYTHON="${PYTHON:-python3}"

OUT_DIR="${OUT:-/tmp/gpu_check}"
BUDGET=540
FETCH=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT_DIR="$2"; shift 2 ;;
        --budget) BUDGET="$2"; shift 2 ;;
        --fetch-wheels) FETCH=1; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

fetch_wheels() {
    local platforms=() n
    for n in 28 27 24 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    mkdir -p "$WHEEL_DIR"
    local exclude=.git/info/exclude
    if [ -d .git ]; then
        mkdir -p .git/info
        grep -qx "/$WHEEL_DIR/" "$exclude" 2>/dev/null || echo "/$WHEEL_DIR/" >>"$exclude"
    fi
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        "${platforms[@]}" -d "$WHEEL_DIR" "${WHEELS[@]}" || return 1
    ls -l "$WHEEL_DIR"
    echo "gpu_check: wheels for Python $PY_VERSION in $WHEEL_DIR/ (ignored by git; carry it: carry=[\".whl\"])"
}

if [ "$FETCH" = 1 ]; then
    fetch_wheels
    exit $?
fi

# ---- no GPU: nothing heavy ----
# (GPU_CHECK_FORCE=1 runs the stages anyway: a dry run of this script's own flow on a CPU machine.)
if [ "${GPU_CHECK_FORCE:-0}" != 1 ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: skipped: no CUDA device visible to $PYTHON's torch here; nothing was run"
    exit 0
fi

START=$(date +%s)
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/gpu_summary.txt"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
FAILED=0

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# run_stage NAME LIMIT_S PATTERN CMD...: runs CMD under timeout (LIMIT_S, cut to what the budget leaves), its
# output to the terminal and DIR/NAME.log; the summary gets the status, the time and the log lines matching PATTERN.
run_stage() {
    local name="$1" limit="$2" pattern="$3"
    shift 3
    local remain
    remain=$(left)
    if [ "$remain" -lt 20 ]; then
        say "[$name] SKIPPED: the ${BUDGET} s budget is spent"
        FAILED=1
        return 0
    fi
    [ "$limit" -gt "$remain" ] && limit=$remain
    echo "==== [$name] (limit ${limit} s, ${remain} s of the budget left): $*"
    local t0 rc log="$OUT_DIR/$name.log"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    local status="ok"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMED OUT after ${limit} s (partial figures below)"; FAILED=1
    elif [ "$rc" != 0 ]; then status="FAILED (exit $rc; see $name.log)"; FAILED=1
    fi
    say "[$name] $status, $(($(date +%s) - t0)) s"
    grep -E -- "$pattern" "$log" | sed 's/^/    /' >>"$SUMMARY"
    return 0
}

say "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n); budget ${BUDGET} s; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/    gpu: /' | tee -a "$SUMMARY"
"$PYTHON" -c 'import sys, torch; print(f"    python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")' | tee -a "$SUMMARY"

# ---- install what is missing ----
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c 'import megatron.core, omegaconf' 2>/dev/null; then
    if ! ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1; then
        say "[install] FAILED: megatron-core / omegaconf are not installed and $WHEEL_DIR/ holds no wheels:"
        say "    run 'bash tools/gpu_check.sh --fetch-wheels' where pip can reach PyPI, and carry $WHEEL_DIR"
        exit 1
    fi
    SITE=/tmp/gpu_check_site
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEEL_DIR"/*.whl; then
        say "[install] FAILED: pip install of $WHEEL_DIR/*.whl"
        exit 1
    fi
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
    say "[install] ok: $(cd "$WHEEL_DIR" && echo ./*.whl | sed 's|\./||g')"
else
    say "[install] nothing to install"
fi
if ! "$PYTHON" -c 'import megatron.core, omegaconf, megatron_tlt.config, megatron_tlt.parallel.tensor_parallel' 2>"$OUT_DIR/import.log"; then
    say "[install] FAILED: megatron_tlt does not import:"
    tail -n 5 "$OUT_DIR/import.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    exit 1
fi
rm -f "$OUT_DIR/import.log"

# ---- stages ----
run_stage tests 180 '(passed|failed|skipped|error|PASSED|FAILED|SKIPPED|ERROR|rel\. error)' \
    "$PYTHON" -m pytest -m gpu -v -rs -s -p no:cacheprovider -o addopts= tests/test_gpu.py tests/test_model.py tests/test_spec_engine.py

run_stage mfu 90 '(ceilings|model:|step:|train MFU)' \
    "$PYTHON" tools/bench/train_mfu.py --measure-ceilings

run_stage packing 60 '(examples, lengths|tokens/s|speedup)' \
    "$PYTHON" tools/bench/packing.py --hidden 1024 --layers 8 --heads 8 --kv-heads 8 --vocab 32000 --num-examples 256 \
    --median-len 512 --max-len 8192 --max-tokens 32768 --batch-size 8 --dtype bfloat16 --iters 2

run_stage rollout 400 '(parameters|trained in|tokens/s|SD/plain|adaptive/plain|temperature 1|EAGLE-3|outputs:|transformers generate|batch-1 decode|GPU:|total)' \
    "$PYTHON" tools/bench/rollout.py --cache-dir /tmp/megatron_tlt_bench --hidden 1024 --layers 12 --heads 16 --kv-heads 4 \
    --vocab 256 --sft-steps 150 --sft-batch 32 --drafter-prompts 128 --drafter-steps 200 --num-held-out 64 \
    --dtype bfloat16 --batch-sizes 1 4 32 --min-prompts 4 --max-new-tokens 128 --iters 2 --sampled-batch 0 --peak-bandwidth 4.8e12

run_stage fp8 90 '(weights:|logits:|throughput:|FP8 GEMM path)' \
    "$PYTHON" tools/bench/fp8.py --cache-dir /tmp/megatron_tlt_bench --hidden 1024 --layers 12 --heads 16 --kv-heads 4 \
    --vocab 256 --sft-steps 150 --sft-batch 32 --drafter-prompts 128 --drafter-steps 200 --num-held-out 64 \
    --dtype bfloat16 --batch 16 --max-new-tokens 128 --iters 2

say "gpu_check: $([ "$FAILED" = 0 ] && echo 'all stages ok' || echo 'some stages FAILED, timed out or were skipped'), $(($(date +%s) - START)) s in all"
echo "==== summary ($SUMMARY)"
cat "$SUMMARY"
exit "$FAILED"
