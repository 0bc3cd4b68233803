#!/usr/bin/env bash
# The first-GPU measurement in one command: stages in order of value, each under its own
# time limit and all under one budget, every row appended to a rows.jsonl as it is
# measured, and what comes back at most four files in $OUT (a GPU lease returns 8):
#   results.tar.gz  every stage's folder (logs, rows.jsonl, results.json/.md, plots, the
#                   main job's metrics), re-packed after each stage, so a killed run keeps
#                   what finished
#   rows.jsonl      every measured row of every stage, as measured
#   summary.md      each stage's outcome and the tables of its rows
#   gpu_run.log     everything printed
#
#   bench/gpu_run.sh [--dry-run] [STAGE ...]      (default: stages 0 1 2 3 4 5 6)
#
# Stages: 0 versions, nvidia-smi and the install (no package index: pip --no-index);
# 1 `tinyfuse check`: every kernel against its float64 reference at each preset's sizes,
# first, since a wrong kernel makes its timings meaningless (a failure is reported, and
# the run goes on); 2 the main job (stories260K, 400 steps); 3 the training step of
# stories15M and stories110M: tinyfuse with and without the CUDA graph, kernels="torch",
# Hugging Face's Llama, Gemma-style and Phi-3 models plain, patched by tinyfuse and by
# Liger; 4 every op at those presets'
# shapes against eager torch and torch.compile, with the copy bandwidth; 5 the kernels'
# tests on the device and the GPU-only tests (pytest -m gpu); 6 the compiled step. A rerun
# names the stages still missing; it writes into a fresh $OUT. --dry-run runs the same stages on a CPU at smoke sizes (no install; the
# main job 12 steps): CI runs it.
#
# Liger-Kernel, which the GPU image lacks, joins stages 3 and 4 when its wheel is carried
# in .whl/ of the checkout (pure Python; torch and triton are the image's):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel==VERSION
# and the device call names .whl in carry.
#
# Measured on the H200 (2026-11-29, before the check stage existed; numbered as now): stage
# 0 48 s (33 s on a warm machine), 2 39 s, 3 77 s, 4 74 s, 5 110 s, 6 122 s: 470 s in all.
# The check stage is predicted at 30-60 s (not yet measured), its limit 90 s; stage 3 with
# the Gemma-style and Phi-3 rows (12 more row runs of ~3 s each) at 110-130 s, its limit 200 s.
#
# Environment: OUT (default bench-results/gpu), GPU_RUN_BUDGET seconds for the whole run
# (default 540: one 10-minute device command with room to pack), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results/gpu}
BUDGET=${GPU_RUN_BUDGET:-540}
PY=${PYTHON:-python3}
DRY=0
STAGES=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        [0-6]) STAGES+=("$arg") ;;
        *) echo "usage: bench/gpu_run.sh [--dry-run] [STAGE ...]   (stages 0-6)" >&2; exit 2 ;;
    esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(0 1 2 3 4 5 6)
START=$(date +%s)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tinyfuse-gpu-run.XXXXXX")  # outside $OUT: only four files go back
trap 'rm -rf "$WORK"' EXIT
LOG=$OUT/gpu_run.log
: > "$LOG"
: > "$WORK/stages.tsv"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
        && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ $DRY = 1 ]; then
    PRESETS="stories260K"; SMOKE="--smoke"; MAIN_STEPS=12; CHECK="--dtypes bf16"
else
    PRESETS="stories15M stories110M"; SMOKE=""; MAIN_STEPS=400; CHECK=""
fi
BENCH=(tinyfuse_cli bench $SMOKE --presets $PRESETS)

tinyfuse_cli() {  # the tinyfuse command (python -m tinyfuse.engine, which keeps the checkout's root off sys.path)
    "$PY" -m tinyfuse.engine "$@"
}

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }

pack() {  # the summary, all rows, and the tarball of every stage folder so far
    cat "$WORK"/*/rows.jsonl > "$OUT/rows.jsonl" 2> /dev/null || : > "$OUT/rows.jsonl"
    $PY -m tinyfuse.bench.report "$OUT/summary.md" "$WORK/stages.tsv" "$WORK"/*/rows.jsonl \
        || echo "summary failed" > "$OUT/summary.md"
    tar -czf "$OUT/results.tar.gz" -C "$WORK" --exclude='*.pt' --exclude=./site .
}

stage() {  # stage NUMBER NAME LIMIT_SECONDS COMMAND...
    local number=$1 name=$2 limit=$3
    shift 3
    local left
    left=$(remaining)
    if [ "$left" -lt 20 ]; then
        echo "== stage $number ($name): skipped, the run's budget is spent"
        printf '%s\t%s\t%s\t%s\n' "$number" "$name" "not run (budget)" 0 >> "$WORK/stages.tsv"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    mkdir -p "$WORK/$number-$name"
    echo "== stage $number ($name): at most ${limit} s, $(date -u +%H:%M:%S)"
    local t0 code
    t0=$(date +%s)
    timeout -k 10 "$limit" bash -c '"$@"' stage "$@"  # a new bash: the functions and variables are exported
    code=$?
    echo "== stage $number ($name): exit $code after $(( $(date +%s) - t0 )) s"
    printf '%s\t%s\t%s\t%s\n' "$number" "$name" "$code" "$(( $(date +%s) - t0 ))" >> "$WORK/stages.tsv"
    pack
}

versions() {
    $PY -c "import sys, platform, torch, triton; print('python', platform.python_version()); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); \
print('triton', triton.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
    $PY -c "import transformers; print('transformers', transformers.__version__)" || echo "transformers: absent"
    $PY -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" \
        || echo "liger-kernel: absent (see the head of this script to carry it)"
    git log -1 --format='commit %H %s' 2> /dev/null || echo "commit: unknown"
    nvidia-smi || echo "nvidia-smi: absent"
    if [ $DRY = 1 ]; then
        echo "dry run: no install (the package is installed already)"
    elif $PY -c "import os, tinyfuse._loader as m; assert m.__file__.startswith(os.getcwd())" 2> /dev/null; then
        echo "installed from this checkout already (a warm machine): no reinstall"
    else
        $PY -m pip install --no-build-isolation --no-deps --no-index -e . || return 1
    fi
    $PY -c "import tinyfuse._loader, tinyfuse.kernels; print('tinyfuse imports, C++ loader built')"
}

check_kernels() {  # every case's line in the log; the JSON of every case in the stage's folder
    tinyfuse_cli check --json $CHECK > "$WORK/1-check/check.json"
}

main_job() {
    local dir=$WORK/2-main
    tinyfuse_cli train --max-steps $MAIN_STEPS --out "$dir/run" > "$dir/train.log" 2>&1
    local code=$?
    tail -n 40 "$dir/train.log"
    cp "$dir/run/metrics.jsonl" "$dir/run/loss.png" "$dir/" 2> /dev/null
    return $code
}

gpu_tests() {  # the kernels' own tests at their shapes on the device, then every test marked gpu
    local parallel="" kernels=0
    $PY -c "import xdist" 2> /dev/null && parallel="-n 8"
    if [ $DRY = 0 ]; then  # in the interpreter these take minutes; CI runs them anyway
        $PY -m pytest -q -p no:cacheprovider $parallel tests/test_rms_norm.py tests/test_rope.py tests/test_swiglu.py \
            tests/test_cross_entropy.py tests/test_linear_cross_entropy.py tests/test_linear.py tests/test_model.py \
            tests/test_check.py -k "not the_command_passes"  # that one is stage 1 again
        kernels=$?
    fi
    $PY -m pytest -q -p no:cacheprovider -m gpu tests
    local marked=$?
    return $(( kernels || marked ))
}

export -f versions check_kernels main_job gpu_tests tinyfuse_cli
export PY DRY WORK MAIN_STEPS CHECK
for s in "${STAGES[@]}"; do
    case $s in
        0) stage 0 versions 150 versions ;;
        1) stage 1 check 90 check_kernels ;;
        2) stage 2 main 150 main_job ;;
        3) stage 3 step 200 "${BENCH[@]}" --only step --out "$WORK/3-step" \
               --step-rows tinyfuse tinyfuse-nograph tinyfuse-torch hf hf-tinyfuse hf-liger \
                           hf-gemma3 hf-gemma3-tinyfuse hf-gemma3-liger hf-phi3 hf-phi3-tinyfuse hf-phi3-liger ;;
        4) stage 4 kernels 240 "${BENCH[@]}" --only kernels --no-sweep --out "$WORK/4-kernels" ;;
        5) stage 5 gpu-tests 180 gpu_tests ;;
        6) stage 6 compiled-step 300 "${BENCH[@]}" --only step --out "$WORK/6-compiled-step" \
               --budget $(( $(remaining) - 90 )) --step-rows tinyfuse+compile hf+compile ;;
    esac
done
pack
echo "== done in $(( $(date +%s) - START )) s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
cat "$OUT/summary.md"
